//! The greeting: the first frames of every connection, the same for both
//! roles (see `handshake` for who sends what).

use crate::wire::auth::Nonce;

/// Bytes of the token that ties a demand channel to its migration.
pub const DEMAND_TOKEN_BYTES: usize = 16;
/// Ties a migration's demand channel to it (chosen by the source, sent in `Begin`).
pub type DemandToken = [u8; DEMAND_TOKEN_BYTES];
use crate::wire::message_set::{MessageEnum, MessageSet};
use serde::{Deserialize, Serialize};

/// Who opened a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// The `pcft` CLI, with requests (control messages follow).
    Control,
    /// Another agent, migrating a VM here (migration messages follow).
    Migration,
    /// Another agent's second connection for the migration whose `Begin`
    /// carried `token`: the pages the destination asked for, and only those,
    /// so that they never wait behind the background push (QEMU's
    /// postcopy-preempt channel). Page batches follow, source to destination.
    DemandChannel { token: DemandToken },
}

/// The greeting's messages (frame kind 1, `GREETING_VERSION`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Greeting {
    /// First frame on every connection. `nonce`: the client authenticates
    /// with a pre-shared key (see `auth`), and this is its greeting nonce.
    Hello { role: Role, agent: String, nonce: Option<Nonce> },
    /// The answer to `Hello`; with a key, the server's nonce, and this frame
    /// is the first one tagged.
    Welcome { agent: String, nonce: Option<Nonce> },
    /// The server will not talk to this peer (another version, no key, a wrong key); says why.
    Refuse { reason: String },
}

impl MessageEnum for Greeting {
    const SET: MessageSet = MessageSet::Greeting;
}
