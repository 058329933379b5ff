//! topoplace's servers and adapters to the outside. [`state`] is the process's shared state
//! (the reservation book, its lock and worker thread, held binds, the clock); [`assemble`]
//! builds one whole server from it. Around it: [`pod`] (a Pod into the book's terms),
//! [`pod_group`] (the PodGroup object a pod names, read through the API server), [`binder`] (what makes a placement take effect), [`kube`] (the watches, Bindings,
//! Events, the scheduler's runtime and Lease), [`extender`] (the kube-scheduler extender over
//! HTTP) and [`grpc`] (the placement API). They translate and wait; every decision comes from
//! `topoplace-online`'s book and the engine.

pub mod assemble;
pub mod binder;
pub mod extender;
pub mod grpc;
pub mod kube;
pub mod pod;
pub mod pod_group;
pub mod state;
