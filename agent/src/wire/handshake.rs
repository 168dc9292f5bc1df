//! The greeting on every connection (`Hello`, `Welcome`), and with it the
//! authentication of both ends when they hold a pre-shared key (see [`auth`]
//! and docs/protocol.md, "Authentication").
//!
//! | client key | server key | what happens |
//! | --- | --- | --- |
//! | none | none | plain connection |
//! | K | K | `Welcome` and every later frame in both directions tagged |
//! | none | K | the server refuses: it requires authentication |
//! | K | none | the server refuses: it does not authenticate |
//! | K | K' | the client finds `Welcome`'s tag wrong, says so in one `Refuse` under its own key and hangs up; the server finds that frame's tag wrong and refuses the client (`wrong-key`) |

use crate::wire::auth::{self, Psk};
use crate::wire::frame::{encode_message, Frame, FrameReader, FrameWriter, ProtocolError};
use crate::wire::greeting::{Greeting, Role};
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// Refused at the greeting (by the peer, or by this side: the reason was sent).
    #[error("{0}")]
    Refused(String),
    /// This server requires authentication and the peer sent no key.
    #[error("{0}")]
    Unauthenticated(String),
    /// The peer authenticates and this server has no key.
    #[error("{0}")]
    UnexpectedKey(String),
    #[error("the peer answered the greeting with {0}")]
    Unexpected(String),
    #[error("the peer's greeting failed the MAC check: it does not hold this key; give both ends the same --psk-file")]
    WrongKey,
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
}

impl HandshakeError {
    /// For a server, why authentication refused the peer (the `reason` label
    /// of `pcft_auth_refusals_total`), if it did.
    pub fn auth_refusal(&self) -> Option<&'static str> {
        match self {
            HandshakeError::Unauthenticated(_) => Some("no-key"),
            HandshakeError::UnexpectedKey(_) => Some("unexpected-key"),
            _ => None,
        }
    }
}

/// An open connection after the greeting.
pub struct Greeted {
    pub rd: FrameReader,
    pub wr: FrameWriter,
    /// The peer's name (its `Hello` or `Welcome`).
    pub peer: String,
}

fn split(stream: TcpStream) -> (FrameReader, FrameWriter) {
    let (rd, wr) = stream.into_split();
    (FrameReader::for_greeting(rd), FrameWriter::new(wr))
}

/// The client's side: sends `Hello` as `agent` in `role`; with `psk`, the
/// connection is authenticated from `Welcome` on.
pub async fn connect(stream: TcpStream, role: Role, agent: &str, psk: Option<&Psk>) -> Result<Greeted, HandshakeError> {
    let (mut rd, mut wr) = split(stream);
    let nonce = psk.map(|_| auth::nonce()).transpose()?;
    wr.write(&encode_message(&Greeting::Hello { role, agent: agent.to_string(), nonce })).await?;
    let (frame, welcome) = rd.read_untagged::<Greeting>().await?;
    let (peer, server_nonce) = match frame {
        Frame::Message(Greeting::Welcome { agent, nonce }) => (agent, nonce),
        Frame::Message(Greeting::Refuse { reason }) => return Err(HandshakeError::Refused(reason)),
        other => return Err(HandshakeError::Unexpected(format!("{other:?}"))),
    };
    match (psk, nonce, server_nonce) {
        (Some(psk), Some(client), Some(server)) => {
            let session = psk.session(true, &client, &server);
            wr.authenticate(session.send);
            match rd.verify_greeting(session.recv, &welcome).await {
                Ok(()) => {}
                Err(ProtocolError::Unauthenticated) => return Err(wrong_key(&mut wr).await),
                Err(e) => return Err(e.into()),
            }
        }
        (None, _, None) => rd.greeted(),
        // A server that answers otherwise does not follow the protocol.
        _ => return Err(HandshakeError::Unexpected("a Welcome that does not match our authentication".into())),
    }
    Ok(Greeted { rd, wr, peer })
}

/// The client found `Welcome`'s tag wrong: the server holds another key. The
/// server cannot see that from its side, so before hanging up the client
/// says so in one frame tagged under its own key; the server finds that
/// frame's tag wrong and refuses (and counts) the client as `wrong-key`
/// (should the tag pass after all, `Welcome` was tampered with on the way,
/// and the server refuses a greeting frame where requests belong).
async fn wrong_key(wr: &mut FrameWriter) -> HandshakeError {
    let reason =
        "your Welcome failed the MAC check: we hold different pre-shared keys; give both ends the same --psk-file";
    let _ = wr.write(&encode_message(&Greeting::Refuse { reason: reason.into() })).await;
    HandshakeError::WrongKey
}

/// The server's side: reads `Hello` and answers; with `psk`, only a peer
/// that authenticates is welcome. A refused peer is told why, and the
/// refusal is returned (the connection is done). On an authenticated
/// connection, a later frame that fails its tag refuses the peer too
/// ([`FrameReader::refuse_as_agent`]).
pub async fn accept(stream: TcpStream, agent: &str, psk: Option<&Psk>) -> Result<(Greeted, Role), HandshakeError> {
    let (mut rd, mut wr) = split(stream);
    let (role, peer, client_nonce) = match rd.read::<Greeting>().await {
        Ok(Frame::Message(Greeting::Hello { role, agent, nonce })) => (role, agent, nonce),
        Ok(other) => {
            return Err(refuse(&mut wr, HandshakeError::Refused(format!("expected Hello, got {other:?}"))).await)
        }
        Err(e @ ProtocolError::WrongSet { .. }) => {
            return Err(refuse(&mut wr, HandshakeError::Refused(format!("expected Hello: {e}"))).await)
        }
        Err(e @ ProtocolError::Version { .. }) => {
            let reason = format!("refused a peer of another protocol version: {e}");
            return Err(refuse(&mut wr, HandshakeError::Refused(reason)).await);
        }
        Err(e) => {
            let reason = format!("refused a peer that is not a PostCopyFT agent: {e}");
            return Err(refuse(&mut wr, HandshakeError::Refused(reason)).await);
        }
    };
    let server_nonce = match (psk, client_nonce) {
        (Some(psk), Some(client)) => {
            let server = auth::nonce()?;
            let session = psk.session(false, &client, &server);
            wr.authenticate(session.send);
            rd.authenticate(session.recv);
            rd.refuse_as_agent(&peer);
            Some(server)
        }
        (None, None) => None,
        (Some(_), None) => {
            let reason = format!(
                "agent {agent} requires authentication: {peer} sent no key; give it this agent's key with --psk-file"
            );
            return Err(refuse(&mut wr, HandshakeError::Unauthenticated(reason)).await);
        }
        (None, Some(_)) => {
            let reason = format!(
                "agent {agent} does not authenticate (it has no --psk-file) but {peer} does: give both ends the same key"
            );
            return Err(refuse(&mut wr, HandshakeError::UnexpectedKey(reason)).await);
        }
    };
    wr.write(&encode_message(&Greeting::Welcome { agent: agent.to_string(), nonce: server_nonce })).await?;
    rd.greeted();
    Ok((Greeted { rd, wr, peer }, role))
}

/// Tells the peer why it is refused (best effort), and returns the refusal.
async fn refuse(wr: &mut FrameWriter, refusal: HandshakeError) -> HandshakeError {
    let _ = wr.write(&encode_message(&Greeting::Refuse { reason: refusal.to_string() })).await;
    refusal
}
