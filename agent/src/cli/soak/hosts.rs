//! The soak's two hosts: an agent process in each of the testbed's host
//! namespaces, which the soak kills, freezes and restarts as its failures
//! require (the demo's agents live once; these come back).

use crate::cli::demo::agents::spawn_agent;
use crate::cli::demo::key::DemoKey;
use crate::cli::Failure;
use std::process::Child;

/// The agents' control and migration port inside a host namespace.
pub const PORT: u16 = 7401;

/// One host: its namespace, where its agent is reached, and the agent process.
pub struct Host {
    /// `a` or `b`.
    pub name: &'static str,
    pub ns: String,
    /// The agent's control address, from the soak (the root namespace).
    pub control: String,
    /// The agent's address over the link between the hosts (where migrations go).
    pub over_pair: String,
    child: Option<Child>,
    /// Processes of this host's agent so far (one more after each restart).
    pub starts: u32,
}

impl Host {
    pub fn new(name: &'static str, ns: &str, control: String, over_pair: String) -> Host {
        Host { name, ns: ns.to_string(), control, over_pair, child: None, starts: 0 }
    }

    /// Starts the agent (again, after `kill`).
    pub fn start(&mut self, key: &DemoKey) -> Result<(), Failure> {
        let listen = format!("0.0.0.0:{PORT}");
        let (child, _) = spawn_agent(&format!("host-{}", self.name), Some(&self.ns), &listen, Some(key), &[])?;
        self.child = Some(child);
        self.starts += 1;
        Ok(())
    }

    /// The agent's process id (0: not running).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends `signal` to the agent.
    pub fn signal(&self, signal: i32) {
        if self.pid() != 0 {
            // SAFETY: kill(2) of our own child's pid (`ip netns exec` runs pcft in its place).
            unsafe { libc::kill(self.pid() as libc::pid_t, signal) };
        }
    }

    /// SIGKILLs the agent and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.kill();
    }
}
