//! The message sets that frames carry, each versioned on its own: the
//! greeting (both roles), the control messages (CLI ↔ agent) and the
//! migration messages (agent ↔ agent). A frame's kind names its set and its
//! header's version is that set's version (docs/protocol.md, "Versions"), so
//! changing one set never changes another's version.

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt;

/// Version of the greeting (`Greeting`: Hello, Welcome, Refuse). Bump it when
/// the greeting's encoding, or how a connection is authenticated, changes
/// (8: keyed BLAKE3 tags and key derivation instead of HMAC-SHA256).
pub const GREETING_VERSION: u16 = 8;
/// Version of the control messages (`ControlMessage`). Bump it when they or
/// the payload types they carry change (10: `MachineConfig` names the tap of a
/// network guest and the fixture's parameters gained its network; 11:
/// `VmPhase::Starting`, a VM whose boot holds its name and memory, and
/// `vm_runs_here` in `Failed`).
pub const CONTROL_VERSION: u16 = 11;
/// Version of the migration messages (`MigrationMessage`) and of page
/// batches. Bump it when they or the payload types they carry change
/// (9: tagged page batches carry no CRC-32C, data first; `Begin` names the
/// demand channel, `AllSent` says what it carried; 10: the machine state
/// carries the virtio-net device and the tap of a network guest, and
/// `Heartbeat` says how many output records the destination has released).
pub const MIGRATION_VERSION: u16 = 10;

/// One of the sets of messages that frames carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MessageSet {
    /// `Hello`, `Welcome` and a refusal: the first frames of every connection.
    Greeting,
    /// The CLI's requests and the agent's answers.
    Control,
    /// What a source and a destination agent say to each other (page batches belong here too).
    Migration,
}

impl MessageSet {
    /// Every set, in frame-kind order.
    pub const ALL: [MessageSet; 3] = [MessageSet::Greeting, MessageSet::Control, MessageSet::Migration];

    /// The version this build speaks of the set.
    pub fn version(self) -> u16 {
        match self {
            MessageSet::Greeting => GREETING_VERSION,
            MessageSet::Control => CONTROL_VERSION,
            MessageSet::Migration => MIGRATION_VERSION,
        }
    }

    /// The set's name, as errors and docs/protocol.md say it.
    pub fn name(self) -> &'static str {
        match self {
            MessageSet::Greeting => "greeting",
            MessageSet::Control => "control",
            MessageSet::Migration => "migration",
        }
    }
}

impl fmt::Display for MessageSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a message payload did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// A frame of another message set than the connection carries.
    #[error("a {got} message where {expected} messages were expected")]
    WrongSet { expected: MessageSet, got: MessageSet },
    /// The payload is not a message of its set.
    #[error("{detail}")]
    Malformed { set: MessageSet, detail: String },
}

/// What the frame codec carries as a message: it encodes to one set's
/// payload, and decodes from frames of the sets it holds.
pub trait WireMessage: Sized + fmt::Debug {
    /// The set this message belongs to (the frame's kind and version).
    fn set(&self) -> MessageSet;
    /// The message's payload bytes.
    fn to_payload(&self) -> Vec<u8>;
    /// The message a frame of `set` with `payload` carries.
    fn from_payload(set: MessageSet, payload: &[u8]) -> Result<Self, PayloadError>;
}

/// One postcard-encoded enum that is one whole message set.
pub trait MessageEnum: Serialize + DeserializeOwned + fmt::Debug {
    /// The set the enum is.
    const SET: MessageSet;
}

impl<T: MessageEnum> WireMessage for T {
    fn set(&self) -> MessageSet {
        T::SET
    }

    fn to_payload(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("messages always encode")
    }

    fn from_payload(set: MessageSet, payload: &[u8]) -> Result<Self, PayloadError> {
        if set != T::SET {
            return Err(PayloadError::WrongSet { expected: T::SET, got: set });
        }
        postcard::from_bytes(payload).map_err(|e| PayloadError::Malformed { set, detail: e.to_string() })
    }
}
