//! The CLI's side of the control protocol: connect to an agent, ask, get an answer.

use crate::wire::auth::Psk;
use crate::wire::control::ControlMessage;
use crate::wire::frame::{encode_message, Frame, FrameReader, FrameWriter, ProtocolError};
use crate::wire::greeting::Role;
use crate::wire::handshake::{self, HandshakeError};
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the agent at {addr}: {reason}; start one with `pcft agent --listen {addr}`")]
    Connect { addr: String, reason: String },
    #[error("{0}")]
    Refused(String),
    #[error("{reason}")]
    Failed {
        reason: String,
        /// The VM still runs at the agent that answered (see `ControlMessage::Failed`).
        vm_runs_here: bool,
    },
    #[error("agent at {addr}: {error}{hint}", hint = if matches!(error, ProtocolError::Closed | ProtocolError::Truncated) { " before answering (did it stop or crash? see its log)" } else { "" })]
    Protocol { addr: String, error: ProtocolError },
    #[error("agent at {addr} answered {what}, which this pcft does not expect")]
    Unexpected { addr: String, what: String },
}

pub struct AgentClient {
    addr: String,
    rd: FrameReader,
    wr: FrameWriter,
}

impl AgentClient {
    /// Connects to the agent at `addr`, authenticating with `psk` if given
    /// (see [`key`] for where the CLI takes it from).
    pub async fn connect_with(addr: &str, psk: Option<&Psk>) -> Result<Self, ClientError> {
        let connect = |reason: String| ClientError::Connect { addr: addr.to_string(), reason };
        let stream = TcpStream::connect(addr).await.map_err(|e| connect(e.to_string()))?;
        stream.set_nodelay(true).map_err(|e| connect(e.to_string()))?;
        let me = format!("pcft-cli-{}", std::process::id());
        match handshake::connect(stream, Role::Control, &me, psk).await {
            Ok(greeted) => Ok(AgentClient { addr: addr.to_string(), rd: greeted.rd, wr: greeted.wr }),
            Err(HandshakeError::Protocol(error)) => Err(ClientError::Protocol { addr: addr.to_string(), error }),
            Err(HandshakeError::Unexpected(what)) => Err(ClientError::Unexpected { addr: addr.to_string(), what }),
            Err(e) => Err(ClientError::Refused(format!("agent at {addr}: {e}"))),
        }
    }

    /// Connects with the key the CLI was given ([`key`]).
    pub async fn connect(addr: &str) -> Result<Self, ClientError> {
        Self::connect_with(addr, key()).await
    }

    /// Sends `message` and returns the answer; `Refuse` and `Failed` become errors.
    pub async fn request(&mut self, message: &ControlMessage) -> Result<ControlMessage, ClientError> {
        let protocol = |error| ClientError::Protocol { addr: self.addr.clone(), error };
        self.wr.write(&encode_message(message)).await.map_err(protocol)?;
        match self
            .rd
            .read::<ControlMessage>()
            .await
            .map_err(|error| ClientError::Protocol { addr: self.addr.clone(), error })?
        {
            Frame::Message(ControlMessage::Refuse { reason }) => Err(ClientError::Refused(reason)),
            Frame::Message(ControlMessage::Failed { reason, vm_runs_here }) => {
                Err(ClientError::Failed { reason, vm_runs_here })
            }
            Frame::Message(answer) => Ok(answer),
            Frame::Pages(_) => Err(ClientError::Unexpected { addr: self.addr.clone(), what: "pages".into() }),
        }
    }
}

static KEY: std::sync::OnceLock<Option<Psk>> = std::sync::OnceLock::new();

/// Sets the key that [`AgentClient::connect`] authenticates with (once: from
/// `pcft --psk-file`, or the key `pcft demo` makes); without it, connections
/// are not authenticated.
pub fn set_key(psk: Option<Psk>) {
    let _ = KEY.set(psk);
}

/// The key set with [`set_key`], if any.
pub fn key() -> Option<&'static Psk> {
    KEY.get().and_then(Option::as_ref)
}
