//! topoplace's online state, shared by the extender, the gRPC API and the secondary
//! scheduler: the [`reservation`] book (the cluster view, the ledger, gangs reserved and
//! bound) and the [`scheduler`]'s queue, gang assembly and predicates.
//!
//! Pure and synchronous like the engine: time comes in as an argument, nothing here blocks
//! or does I/O; the adapters in `topoplace-server` hold it under a lock and talk to the API
//! server.

pub mod reservation;
pub mod scheduler;
