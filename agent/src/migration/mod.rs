//! Live migration between agents: the wire protocol, the messages, and the
//! source and destination sides of pre-copy, post-copy and hybrid migration.

pub mod destination;
pub mod messages;
pub mod protocol;
pub mod source;
