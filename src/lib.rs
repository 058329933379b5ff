//! The `topoplace` command: the command line ([`cli`]) over the library crates under
//! `crates/` (engine, formats, replay, online, server; see ARCHITECTURE.md).

pub mod cli;
