//! The agent as a service: the daemon that serves the CLI and other agents,
//! the client the CLI talks to it with, and the HTTP endpoint.

pub mod client;
pub mod daemon;
pub mod http;
