//! What makes a placement take effect: a [`Binder`] creates Bindings, deletes pods, records
//! Events and asks kube-scheduler to retry a pod. The API server's is
//! [`crate::kube::KubeBinder`]; [`MemoryBinder`] keeps binds in memory for `serve --cluster`.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use futures::future::BoxFuture;

use topoplace_online::reservation::{MemberBind, PodDemand, PodIdentity};

/// Why [`Binder::verify`] did not confirm a pod.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The API server's pod is not the one the request described: none of that name, another
    /// uid, bound elsewhere, being deleted, another scheduler, namespace, gang or shape. The
    /// request's pod takes no place in its gang's plan.
    #[error("{0}")]
    NotThatPod(String),
    /// The API server has the pod bound to another node already (someone else bound it): it
    /// is not bound again, and its GPUs there are to be counted as taken.
    #[error("the pod is already bound to `{node}`")]
    BoundElsewhere {
        node: String,
        /// The GPU indices its `topoplace.io/gpus` annotation records there, if any.
        gpus: Option<Vec<u8>>,
    },
    /// The pod could not be read in time (the API server did not answer): nothing is known.
    #[error("{0}")]
    Unconfirmed(String),
}

/// Why a Binding was not made, as far as the binder could tell. The undo of a partly bound
/// gang deletes only members whose Binding succeeded: a pod whose outcome is
/// [`BindError::Unknown`] is not known to be bound to the planned node, so it is never
/// deleted on that guess.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindError {
    /// The pod is bound, but to another node (409 Conflict, read back).
    #[error("409 Conflict: already bound to `{node}`")]
    Conflict { node: String },
    /// The pod no longer exists, or its name now belongs to another pod (another uid).
    #[error("the pod is gone: {reason}")]
    Gone { reason: String },
    /// The request may or may not have taken effect (a timeout, a dropped connection) and the
    /// pod could not be read back to tell.
    #[error("outcome unknown: {reason}")]
    Unknown { reason: String },
    /// The API server refused the Binding (403, 422, 500, ...), or answered 409 while the pod
    /// reads back unbound.
    #[error("{message}")]
    Api { message: String },
}

/// Whose pods the extender binds: a pod is bound only when the API server has it in one of
/// these (set through `topoplace serve --scheduler-names` and `--namespaces`). An extender
/// request names a pod by its body alone, and anyone who can reach the extender's port can
/// send one; these say which of the API server's pods such a request may take effect on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// `spec.schedulerName`s of the kube-scheduler profiles that call this extender (a pod
    /// without one has the API server's default, `default-scheduler`).
    pub scheduler_names: BTreeSet<String>,
    /// Namespaces whose pods may be bound; `None` for every namespace.
    pub namespaces: Option<BTreeSet<String>>,
}

/// The API server's default `spec.schedulerName` (`k8s.io/api/core/v1` `DefaultSchedulerName`).
pub const DEFAULT_SCHEDULER_NAME: &str = "default-scheduler";

/// `default-scheduler` and `topoplace` (the profile of the shipped kube-scheduler
/// configuration, `scheduler-config/extender/`), every namespace.
impl Default for Admission {
    fn default() -> Self {
        Admission { scheduler_names: [DEFAULT_SCHEDULER_NAME, "topoplace"].map(String::from).into(), namespaces: None }
    }
}

/// What creates Bindings, deletes pods and records Events: the API server, or memory.
pub trait Binder: Send + Sync + 'static {
    /// Binds `member` to its node with `topoplace.io/gpus` set to `gpus`. Binding a pod that is
    /// already bound to that node is success (the API server's 409 on a retried bind). Answers
    /// within `BINDING_BUDGET_MS` (15 s), settling a call without an answer itself, so that a
    /// gang's held binds are answered before kube-scheduler's `httpTimeout`.
    fn bind<'a>(&'a self, member: &'a MemberBind, gpus: String) -> BoxFuture<'a, Result<(), BindError>>;
    /// Checks, before any Binding of its ticket is made, that `member` is a pod the API server
    /// has as the request described it: the same uid, not terminating, unbound (or bound to
    /// the planned node already: a retried bind), of a scheduler name and namespace the
    /// [`Admission`] allows, and, with `expected` (the demand the extender read from the
    /// request's pod), the same demand read from the API server's copy: GPUs, gang, size,
    /// rank, roles, memory, parallelism, topology. Within the binding budget, like
    /// [`Binder::bind`].
    fn verify<'a>(
        &'a self,
        member: &'a MemberBind,
        expected: Option<&'a PodDemand>,
    ) -> BoxFuture<'a, Result<(), Refusal>>;
    /// Deletes a pod so its controller recreates it (undo of a partly bound gang).
    fn delete<'a>(&'a self, pod: &'a PodIdentity) -> BoxFuture<'a, Result<(), String>>;
    /// Records an Event on the pod; failures are logged, never fatal.
    fn event<'a>(&'a self, pod: &'a PodIdentity, reason: &'a str, message: String) -> BoxFuture<'a, ()>;
    /// Asks kube-scheduler to retry `pod` now: a gang member whose held bind lapsed, now the
    /// only kind of member its gang still misses. Before Kubernetes 1.28, a pod whose bind
    /// failed waits in kube-scheduler's unschedulable queue for a cluster event or the 60 s
    /// flush; an update of the pod itself is such an event (v1.20
    /// `pkg/scheduler/internal/queue/scheduling_queue.go`, `PriorityQueue.Update`: an updated
    /// pod moves from the unschedulable queue to the active queue). Only for that pod (uid).
    /// [`BindError::Gone`] when the pod no longer exists or its name is another pod's.
    fn retry<'a>(&'a self, pod: &'a PodIdentity) -> BoxFuture<'a, Result<(), BindError>>;
}

/// Deletes `pods` concurrently so that no gang stays half-bound (their controllers recreate
/// them); a delete that fails is logged, and the pod watch sees the pod again.
pub async fn undo(binder: &dyn Binder, pods: &[PodIdentity]) {
    futures::future::join_all(pods.iter().map(|pod| async move {
        if let Err(error) = binder.delete(pod).await {
            tracing::warn!(%pod, %error, "undo: deleting a bound member failed");
        }
    }))
    .await;
}

/// A [`Binder`] for `serve --cluster`: Bindings and Events recorded in memory.
/// It cannot reach kube-scheduler's queue, so [`Binder::retry`] only records the request.
#[derive(Default)]
pub struct MemoryBinder {
    bound: Mutex<HashMap<String, String>>,
    events: Mutex<Vec<String>>,
    retried: Mutex<Vec<PodIdentity>>,
}

impl MemoryBinder {
    /// Node of a pod bound through this binder.
    pub fn node_of(&self, uid: &str) -> Option<String> {
        self.bound.lock().unwrap_or_else(|p| p.into_inner()).get(uid).cloned()
    }

    pub fn events(&self) -> Vec<String> {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The pods [`Binder::retry`] was asked for, in order.
    pub fn retried(&self) -> Vec<PodIdentity> {
        self.retried.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Binder for MemoryBinder {
    /// `serve --cluster` has no API server to ask: every pod is taken as described.
    fn verify<'a>(
        &'a self,
        _member: &'a MemberBind,
        _expected: Option<&'a PodDemand>,
    ) -> BoxFuture<'a, Result<(), Refusal>> {
        Box::pin(async { Ok(()) })
    }

    fn bind<'a>(&'a self, member: &'a MemberBind, _gpus: String) -> BoxFuture<'a, Result<(), BindError>> {
        Box::pin(async move {
            let mut bound = self.bound.lock().unwrap_or_else(|p| p.into_inner());
            match bound.get(&member.pod.uid) {
                Some(node) if *node == member.node => Ok(()),
                Some(node) => Err(BindError::Conflict { node: node.clone() }),
                None => {
                    bound.insert(member.pod.uid.clone(), member.node.clone());
                    Ok(())
                }
            }
        })
    }

    fn delete<'a>(&'a self, pod: &'a PodIdentity) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            self.bound.lock().unwrap_or_else(|p| p.into_inner()).remove(&pod.uid);
            Ok(())
        })
    }

    fn event<'a>(&'a self, pod: &'a PodIdentity, reason: &'a str, message: String) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            self.events.lock().unwrap_or_else(|p| p.into_inner()).push(format!("{pod}: {reason}: {message}"));
        })
    }

    fn retry<'a>(&'a self, pod: &'a PodIdentity) -> BoxFuture<'a, Result<(), BindError>> {
        Box::pin(async move {
            self.retried.lock().unwrap_or_else(|p| p.into_inner()).push(pod.clone());
            Ok(())
        })
    }
}
