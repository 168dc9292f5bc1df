//! The agent as a service: the daemon that serves the CLI and other agents,
//! the client the CLI talks to it with, metrics, the HTTP endpoint and the
//! migration timeline.

pub mod client;
pub mod daemon;
pub mod http;
pub mod metrics;
pub mod timeline;
