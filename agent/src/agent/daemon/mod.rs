//! `pcft agent`: the per-host daemon. It runs VMs, answers the CLI, and sends
//! and receives migrations, all on one TCP port. Every connection starts with
//! `Hello`, whose role says what follows.
//!
//! - `admission`, `connection`: which connections are served, and serving them;
//! - `error`: why a request is refused or failed;
//! - `table`: the VM table, names and memory admission;
//! - `lifecycle`: start, stop, wait, remove, and releasing the memory of VMs that ended;
//! - `migration_watch`, `outgoing`: outgoing migrations, which run as the agent's own tasks;
//! - `incoming`: incoming migrations; `demand_channels`: their second connections;
//! - `shutdown`: the graceful stop on SIGTERM.

mod admission;
mod connection;
mod demand_channels;
mod error;
mod incoming;
mod lifecycle;
mod migration_watch;
mod outgoing;
mod server;
mod shutdown;
mod table;

pub use error::{DaemonError, Denial, FailoverFailure, Failure, Refusal};
pub use server::{Daemon, Limits};
pub use shutdown::ShutdownReport;
