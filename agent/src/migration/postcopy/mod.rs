//! Post-copy: where a page the destination lacks comes from. The source's
//! background push and demand queue (`push`).

pub mod push;
