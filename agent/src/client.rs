//! The CLI's side of the control protocol: connect to an agent, ask, get an answer.

use crate::migration::messages::{Message, Role};
use crate::migration::protocol::{encode_message, read_frame, write_frame, Frame, ProtocolError};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the agent at {addr}: {reason}; start one with `pcft agent --listen {addr}`")]
    Connect { addr: String, reason: String },
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Failed(String),
    #[error("agent at {addr}: {error}{hint}", hint = if matches!(error, ProtocolError::Closed | ProtocolError::Truncated) { " before answering (did it stop or crash? see its log)" } else { "" })]
    Protocol { addr: String, error: ProtocolError },
    #[error("agent at {addr} answered {what}, which this pcft does not expect")]
    Unexpected { addr: String, what: String },
}

pub struct AgentClient {
    addr: String,
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
}

impl AgentClient {
    pub async fn connect(addr: &str) -> Result<Self, ClientError> {
        let connect = |reason: String| ClientError::Connect { addr: addr.to_string(), reason };
        let stream = TcpStream::connect(addr).await.map_err(|e| connect(e.to_string()))?;
        stream.set_nodelay(true).map_err(|e| connect(e.to_string()))?;
        let (rd, wr) = stream.into_split();
        let mut client = AgentClient { addr: addr.to_string(), rd, wr };
        let hello = Message::Hello { role: Role::Control, agent: format!("pcft-cli-{}", std::process::id()) };
        match client.request(&hello).await? {
            Message::Welcome { .. } => Ok(client),
            other => Err(ClientError::Unexpected { addr: addr.to_string(), what: format!("{other:?}") }),
        }
    }

    /// Sends `message` and returns the answer; `Refuse` and `Failed` become errors.
    pub async fn request(&mut self, message: &Message) -> Result<Message, ClientError> {
        let protocol = |error| ClientError::Protocol { addr: self.addr.clone(), error };
        write_frame(&mut self.wr, &encode_message(message)).await.map_err(protocol)?;
        match read_frame(&mut self.rd)
            .await
            .map_err(|error| ClientError::Protocol { addr: self.addr.clone(), error })?
        {
            Frame::Message(Message::Refuse { reason }) => Err(ClientError::Refused(reason)),
            Frame::Message(Message::Failed { reason }) => Err(ClientError::Failed(reason)),
            Frame::Message(answer) => Ok(answer),
            Frame::Pages(_) => Err(ClientError::Unexpected { addr: self.addr.clone(), what: "pages".into() }),
        }
    }
}
