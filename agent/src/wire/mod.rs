//! The wire between agents and between the CLI and an agent: the frame
//! codec, authentication, the greeting, and the message sets (each versioned
//! on its own) with the payload types they carry.

pub mod auth;
pub mod control;
pub mod frame;
pub mod gmac;
pub mod greeting;
pub mod handshake;
pub mod message_set;
pub mod migration;
pub mod payload;
pub mod read_ahead;
