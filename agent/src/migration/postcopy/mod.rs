//! Post-copy's page path, both ends: where a demand fault goes. At the
//! destination a fault is read ([`faults`]) and asked for; the source serves
//! asked-for pages before its background push ([`push`]); the destination
//! installs them, which wakes the vCPUs ([`install`]).

pub mod faults;
pub mod install;
pub mod push;
