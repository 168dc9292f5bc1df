//! `Connecting`: reach the destination agent, greet it, have it accept the
//! VM, and (for a mode with post-copy) open the demand channel.

use crate::metrics;
use crate::migration::error::MigrationError;
use crate::migration::source::answer::{expect, unexpected};
use crate::migration::source::outbox::Outbox;
use crate::migration::source::request::MigrateOut;
use crate::wire::auth;
use crate::wire::frame::{FrameReader, FrameWriter};
use crate::wire::greeting::Role;
use crate::wire::handshake::{self, Greeted, HandshakeError};
use crate::wire::migration::MigrationMessage;
use tokio::net::TcpStream;

/// The connection to the destination, both ways, and the demand channel.
pub struct Link {
    pub rd: FrameReader,
    pub out: Outbox,
    /// The demand channel (None: the mode has no post-copy, or it could not
    /// be opened and requested pages share the connection).
    pub demand: Option<FrameWriter>,
}

/// Connects to `req.to`, greets it, sends `Begin` and waits for `Ready`;
/// then opens the demand channel.
pub async fn connect(req: &MigrateOut<'_>) -> Result<Link, MigrationError> {
    let to = req.to;
    let reply_timeout = req.reply_timeout();
    let greeted = greet(req, Role::Migration).await?;
    // A random token ties the demand channel to this migration.
    let demand_token = req.mode.uses_postcopy().then(auth::nonce).and_then(Result::ok);
    let mut link = Link { rd: greeted.rd, out: Outbox::new(greeted.wr), demand: None };
    let begin = MigrationMessage::Begin {
        name: req.vm.to_string(),
        config: Box::new(req.config.clone()),
        mode: req.mode,
        options: req.options,
        demand_token,
    };
    link.out.message(&begin).await?;
    match expect(&mut link.rd, "ready", reply_timeout).await? {
        MigrationMessage::Ready => {}
        other => return Err(unexpected(&other)),
    }
    if let Some(token) = demand_token {
        // The destination expects it from `Begin` on; without it, requested pages
        // share the connection with the push (slower faults, same outcome).
        match greet(req, Role::DemandChannel { token }).await {
            Ok(channel) => link.demand = Some(channel.wr),
            Err(e) => tracing::warn!(%to, "no demand channel, requested pages wait behind the push: {e}"),
        }
    }
    Ok(link)
}

/// Connects to `req.to` and greets it in `role`.
async fn greet(req: &MigrateOut<'_>, role: Role) -> Result<Greeted, MigrationError> {
    let to = req.to;
    let reply_timeout = req.reply_timeout();
    let connect_error = |reason| MigrationError::Connect { to: to.to_string(), reason };
    let stream = TcpStream::connect(to).await.map_err(connect_error)?;
    stream.set_nodelay(true).map_err(connect_error)?;
    let greeting = handshake::connect(stream, role, req.agent, req.psk);
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
    Ok(greeted)
}
