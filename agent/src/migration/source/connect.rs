//! `Connecting`: reach the destination agent, greet it, and have it accept the VM.

use crate::metrics;
use crate::migration::error::MigrationError;
use crate::migration::source::answer::{expect, unexpected};
use crate::migration::source::outbox::Outbox;
use crate::migration::source::request::MigrateOut;
use crate::wire::frame::FrameReader;
use crate::wire::greeting::Role;
use crate::wire::handshake::{self, HandshakeError};
use crate::wire::migration::MigrationMessage;
use tokio::net::TcpStream;

/// The connection to the destination, both ways.
pub struct Link {
    pub rd: FrameReader,
    pub out: Outbox,
}

/// Connects to `req.to`, greets it, sends `Begin` and waits for `Ready`.
pub async fn connect(req: &MigrateOut<'_>) -> Result<Link, MigrationError> {
    let to = req.to;
    let reply_timeout = req.reply_timeout();
    let connect_error = |reason| MigrationError::Connect { to: to.to_string(), reason };
    let stream = TcpStream::connect(to).await.map_err(connect_error)?;
    stream.set_nodelay(true).map_err(connect_error)?;
    let greeting = handshake::connect(stream, Role::Migration, req.agent, req.psk);
    let greeted = tokio::time::timeout(reply_timeout, greeting)
        .await
        .map_err(|_| MigrationError::Timeout { what: "welcome".into(), after: reply_timeout })?
        .map_err(|e| match e {
            HandshakeError::WrongKey => {
                tracing::warn!(%to, reason = "wrong-key", "refused the destination: {}", HandshakeError::WrongKey);
                metrics::get().auth_refused("wrong-key");
                MigrationError::Refused(format!("agent {to}: {}", HandshakeError::WrongKey))
            }
            HandshakeError::Protocol(e) => MigrationError::Protocol(e),
            HandshakeError::Unexpected(what) => MigrationError::Unexpected(what),
            e => MigrationError::Refused(e.to_string()),
        })?;
    let mut link = Link { rd: greeted.rd, out: Outbox::new(greeted.wr) };
    let begin = MigrationMessage::Begin {
        name: req.vm.to_string(),
        config: req.config.clone(),
        mode: req.mode,
        options: req.options,
    };
    link.out.message(&begin).await?;
    match expect(&mut link.rd, "ready", reply_timeout).await? {
        MigrationMessage::Ready => Ok(link),
        other => Err(unexpected(&other)),
    }
}
