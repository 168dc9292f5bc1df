//! Demand channels that incoming migrations wait for: a source names one in
//! its `Begin` (a random token) and opens it once the destination is
//! `Ready`; the connection that greets with that token is handed to the
//! migration. A token is known only while its migration runs here.

use super::error::Refusal;
use crate::wire::frame::FrameReader;
use crate::wire::greeting::DemandToken;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// The demand channels expected now, by token.
#[derive(Default)]
pub struct DemandChannels(Mutex<HashMap<DemandToken, oneshot::Sender<FrameReader>>>);

/// A migration's claim on its token: forgotten when this drops (the migration ended).
pub struct ExpectedChannel {
    token: DemandToken,
    channels: Arc<DemandChannels>,
}

impl Drop for ExpectedChannel {
    fn drop(&mut self) {
        self.channels.0.lock().expect("demand channels lock").remove(&self.token);
    }
}

impl DemandChannels {
    /// A migration will get the channel that greets with `token`, on the
    /// receiver, while it holds the claim.
    pub fn expect(
        self: &Arc<Self>,
        token: DemandToken,
    ) -> Result<(ExpectedChannel, oneshot::Receiver<FrameReader>), Refusal> {
        let mut expected = self.0.lock().expect("demand channels lock");
        if expected.contains_key(&token) {
            return Err(Refusal::DemandTokenInUse);
        }
        let (tx, rx) = oneshot::channel();
        expected.insert(token, tx);
        Ok((ExpectedChannel { token, channels: Arc::clone(self) }, rx))
    }

    /// Hands the connection that greeted with `token` to its migration.
    pub fn attach(&self, token: DemandToken, channel: FrameReader) -> Result<(), Refusal> {
        let waiting = self.0.lock().expect("demand channels lock").remove(&token);
        match waiting {
            Some(migration) => migration.send(channel).map_err(|_| Refusal::UnknownDemandChannel),
            None => Err(Refusal::UnknownDemandChannel),
        }
    }
}
