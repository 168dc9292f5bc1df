//! The `kv` guest's pure parts: the RESP2 parser, the commands, the store
//! with its digest, and the allocator they run on. They compile for the
//! guest (`no_std`) and for the host, where `cargo test` checks them.
#![cfg_attr(not(test), no_std)]

pub mod arena;
pub mod num;
pub mod resp;
pub mod server;
pub mod store;
