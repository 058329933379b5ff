//! topoplace's placement engine: a cluster ([`topology`]) and gangs ([`workload`]) in,
//! placements out ([`placement`]), held in a [`ledger`].
//!
//! **Architecture invariant:** this crate does no I/O, no async, and knows no wire or file
//! format: it depends on none of tokio, kube, k8s-openapi, axum, tonic, prost or serde_json
//! (`cargo tree -p topoplace-engine -e normal` shows it). serde appears only behind the
//! `serde` feature, as derives on result types for the adapters that print them. For the
//! same cluster, ledger, gangs and configuration it gives the same answer.

pub mod ledger;
pub mod placement;
pub mod quantity;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
pub mod topology;
pub mod workload;
