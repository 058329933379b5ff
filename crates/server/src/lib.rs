//! topoplace's adapters to the outside: [`kube`] (Pods and Nodes into the engine's terms,
//! the watches, Bindings, Events, the scheduler's runtime and Lease), [`extender`] (the
//! kube-scheduler extender over HTTP) and [`grpc`] (the placement API). They translate and
//! wait; every decision comes from `topoplace-online`'s book and the engine.

pub mod extender;
pub mod grpc;
pub mod kube;
