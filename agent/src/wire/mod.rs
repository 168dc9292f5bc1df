//! The wire between agents and between the CLI and an agent: the frame
//! codec, authentication, the greeting, and the messages.

pub mod auth;
pub mod frame;
pub mod handshake;
pub mod messages;
