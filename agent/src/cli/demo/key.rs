//! The demo's pre-shared key, in a file of its own for the agents it starts.

use crate::cli::{run_failure, Failure};
use anyhow::Context;
use pcft_agent::wire::auth::Psk;
use std::path::PathBuf;

/// The demo's pre-shared key, in a file of its own (removed when dropped):
/// the agents and the demo's own requests authenticate with it.
pub struct DemoKey {
    dir: PathBuf,
    /// The key file, for the agents' `--psk-file`.
    pub file: PathBuf,
}

impl DemoKey {
    /// The key given with --psk-file, or a new one.
    pub fn new() -> Result<DemoKey, Failure> {
        let dir = std::env::temp_dir().join(format!("pcft-demo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))
            .map_err(run_failure)?;
        let file = dir.join("psk");
        let key = match pcft_agent::agent::client::key() {
            Some(key) => key.clone(),
            None => Psk::generate().map_err(run_failure)?,
        };
        key.write_new(&file).map_err(run_failure)?;
        pcft_agent::agent::client::set_key(Some(key));
        Ok(DemoKey { dir, file })
    }
}

impl DemoKey {
    /// The directory that holds the key file (removed with the key).
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }
}

impl Drop for DemoKey {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
