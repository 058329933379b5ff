//! topoplace's trace replays, pure and deterministic for a trace and a seed:
//! [`pods`], the FGD paper's protocol (pods that share GPUs arrive and never leave), and
//! [`jobs`], gangs in time on a topology (arrive, queue, run, leave, drains) through the
//! engine's planner or a baseline policy. [`traces`] reads the public traces they replay.
//! [`preemption`] is a seeded study of two priority classes through the secondary
//! scheduler's own core (`topoplace-online`), whole-unit preemption against node by node.

pub mod jobs;
pub mod pods;
pub mod preemption;
pub mod traces;
