//! topoplace: topology-aware gang placement of GPU workloads.
//!
//! The core ([`topology`], [`workload`], [`placement`], [`ledger`], [`quantity`], [`replay`], [`jobreplay`], [`scheduler`],
//! [`reservation`]) is pure
//! and synchronous: no I/O, no async, no Kubernetes or HTTP types, deterministic for a
//! given input. The adapters ([`files`] for the YAML formats, [`convert`] for trace
//! converters, [`kube`] and [`extender`] for Kubernetes, [`grpc`] for the placement API, [`cli`] for the command line) translate into it and call it.

pub mod cli;
pub mod convert;
pub mod extender;
pub mod files;
pub mod grpc;
pub mod jobreplay;
pub mod kube;
pub mod ledger;
pub mod placement;
pub mod quantity;
pub mod replay;
pub mod reservation;
pub mod scheduler;
pub mod topology;
pub mod workload;
