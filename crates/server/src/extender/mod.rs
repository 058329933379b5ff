//! The kube-scheduler extender: `POST {prefix}/filter`, `/prioritize`, `/preempt`, `/bind`
//! in the wire format of `k8s.io/kube-scheduler/extender/v1`, plus `GET /healthz`, `/readyz`,
//! `/metrics` and `/state`. It translates requests into the reservation book's terms,
//! answers from it, and does the one thing the book cannot: waiting. A gang member's bind
//! is held until every member has reached bind; the last one to arrive creates all the
//! Bindings concurrently through a [`Binder`] (the API server, or memory in static mode)
//! and answers everyone. A partial failure deletes the members that did bind.
//!
//! Concurrency: one `std::sync::Mutex` around the book and the waiters. No `.await` happens
//! while it is held (the book is synchronous), so a plain mutex is right and cheap; the
//! Bindings, deletes and Events run after it is released.

pub mod metrics;
pub mod wire;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures::future::{join_all, BoxFuture};
use k8s_openapi::List;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::oneshot;

use crate::kube::pod as kube_pod;
use metrics::{Metrics, Verb};
use topoplace_engine::topology::HostId;
use topoplace_online::reservation::{
    BindFinish, BindStep, Book, Expired, MemberBind, NodeVerdict, PodDemand, PodIdentity, PreemptCandidate, Ticket,
    BINDING_BUDGET_MS,
};
use wire::{
    ExtenderArgs, ExtenderBindingArgs, ExtenderBindingResult, ExtenderFilterResult, ExtenderPreemptionArgs,
    ExtenderPreemptionResult, HostPriority, MetaPod, MetaVictims,
};

/// Request bodies above this are refused with 413 (a 5,000-node NodeList is about 40 MB).
pub const BODY_BYTES_MAX_DEFAULT: usize = 64 << 20;
/// Pods remembered between their filter and their bind.
const DEMANDS_REMEMBERED_MAX: usize = 100_000;

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

/// What creates Bindings, deletes pods and records Events: the API server, or memory.
pub trait Binder: Send + Sync + 'static {
    /// Binds `member` to its node with `topoplace.io/gpus` set to `gpus`. Binding a pod that is
    /// already bound to that node is success (the API server's 409 on a retried bind).
    fn bind<'a>(&'a self, member: &'a MemberBind, gpus: String) -> BoxFuture<'a, Result<(), BindError>>;
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
    fn retry<'a>(&'a self, pod: &'a PodIdentity) -> BoxFuture<'a, Result<(), String>>;
}

#[derive(Debug, Clone)]
pub struct ExtenderConfig {
    /// Path prefix of the verbs (`urlPrefix`'s path), `""` or like `/topoplace`.
    pub prefix: String,
    pub body_bytes_max: usize,
}

impl Default for ExtenderConfig {
    fn default() -> Self {
        ExtenderConfig { prefix: String::new(), body_bytes_max: BODY_BYTES_MAX_DEFAULT }
    }
}

type BindWaiter = oneshot::Sender<Result<(), String>>;

/// The lock on [`Shared`]; on release it publishes the book's generation if it moved, and
/// whether a book exists if that changed.
struct SharedGuard<'a> {
    guard: MutexGuard<'a, Shared>,
    generation: &'a tokio::sync::watch::Sender<u64>,
    present: &'a tokio::sync::watch::Sender<bool>,
    expiry: &'a tokio::sync::watch::Sender<Option<u64>>,
}

impl std::ops::Deref for SharedGuard<'_> {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.guard
    }
}

impl std::ops::DerefMut for SharedGuard<'_> {
    fn deref_mut(&mut self) -> &mut Shared {
        &mut self.guard
    }
}

impl Drop for SharedGuard<'_> {
    fn drop(&mut self) {
        if let Some(book) = &self.guard.book {
            let now = book.generation();
            self.generation.send_if_modified(|seen| std::mem::replace(seen, now) != now);
            let next = book.next_expiry_ms();
            self.expiry.send_if_modified(|seen| std::mem::replace(seen, next) != next);
        }
        let present = self.guard.book.is_some();
        self.present.send_if_modified(|seen| std::mem::replace(seen, present) != present);
    }
}

struct Shared {
    /// `None` until the first cluster view exists (kube mode before nodes synced).
    book: Option<Book>,
    /// Binds held for their gang, by gang key: (pod uid, the held call's answer).
    waiters: HashMap<String, Vec<(String, BindWaiter)>>,
    demands: HashMap<String, PodDemand>,
    demand_order: VecDeque<String>,
}

/// The extender's state; shared by every request through an `Arc`. The gRPC placement API
/// serves from the same book, through [`Extender::with_book`].
pub struct Extender {
    shared: Mutex<Shared>,
    /// The book's generation after the last lock section: capacity watchers and the expiry
    /// sweeper wait on it.
    generation: tokio::sync::watch::Sender<u64>,
    /// Whether the book exists (the first cluster view is built): readiness waits on it.
    present: tokio::sync::watch::Sender<bool>,
    /// The earliest deadline of a waiting reservation after the last lock section: the
    /// expiry sweeper sleeps until it.
    expiry: tokio::sync::watch::Sender<Option<u64>>,
    binder: Arc<dyn Binder>,
    metrics: Metrics,
    epoch: tokio::time::Instant,
    ready: AtomicBool,
    config: ExtenderConfig,
}

impl Extender {
    pub fn new(book: Option<Book>, binder: Arc<dyn Binder>, config: ExtenderConfig) -> Arc<Self> {
        let ready = book.is_some();
        let present = tokio::sync::watch::Sender::new(book.is_some());
        let expiry = tokio::sync::watch::Sender::new(book.as_ref().and_then(Book::next_expiry_ms));
        Arc::new(Extender {
            shared: Mutex::new(Shared {
                book,
                waiters: HashMap::new(),
                demands: HashMap::new(),
                demand_order: VecDeque::new(),
            }),
            generation: tokio::sync::watch::Sender::new(0),
            present,
            expiry,
            binder,
            metrics: Metrics::default(),
            epoch: tokio::time::Instant::now(),
            ready: AtomicBool::new(ready),
            config,
        })
    }

    /// Milliseconds since the extender started: the book's clock.
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis().min(u128::from(u64::MAX)) as u64
    }

    fn lock(&self) -> SharedGuard<'_> {
        // A panic while holding the lock would be a bug in the book; the state it guards is
        // still checked by `Book::check`, so keep serving rather than poisoning every request.
        SharedGuard {
            guard: self.shared.lock().unwrap_or_else(|poisoned| poisoned.into_inner()),
            generation: &self.generation,
            present: &self.present,
            expiry: &self.expiry,
        }
    }

    /// The book's generation, updated whenever a lock section changed the cluster view or
    /// the ledger (whoever changed it: the extender, the watches, or the gRPC API).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Runs `work` on the book under the lock (the kube adapter feeds watch events this way).
    /// Reservations it drops (returned as [`Expired`]) have their waiting binds answered.
    pub fn with_book<T>(&self, work: impl FnOnce(&mut Option<Book>) -> (T, Vec<Expired>)) -> T {
        let mut shared = self.lock();
        let (out, dropped) = work(&mut shared.book);
        let waiters = take_waiters(&mut shared, &dropped);
        drop(shared);
        answer_dropped(waiters);
        out
    }

    /// Runs `work` on the book, if there is one, under the lock (watch events that drop no
    /// reservation).
    pub fn update_book(&self, work: impl FnOnce(&mut Book)) {
        if let Some(book) = self.lock().book.as_mut() {
            work(book);
        }
    }

    /// Whether the cluster view exists yet.
    pub fn has_book(&self) -> bool {
        self.lock().book.is_some()
    }

    /// Returns once the cluster view exists (at once for a static cluster): awaited, never
    /// polled.
    pub async fn book_installed(&self) {
        let mut present = self.present.subscribe();
        // The sender lives as long as `self`, so the wait ends only when a book exists.
        let _ = present.wait_for(|present| *present).await;
    }

    /// Releases expired reservations and answers their waiting binds.
    pub fn sweep(&self) {
        let now = self.now_ms();
        self.with_book(|book| ((), book.as_mut().map(|b| b.expire(now)).unwrap_or_default()));
    }

    /// `GET /state`.
    pub fn state_json(&self) -> serde_json::Value {
        let now = self.now_ms();
        let shared = self.lock();
        match &shared.book {
            Some(book) => serde_json::to_value(book.snapshot(now)).unwrap_or(serde_json::Value::Null),
            None => serde_json::json!({ "nodes": [], "gangs": [], "ready": false }),
        }
    }

    /// Checks the book's invariants (tests and the debug endpoint).
    pub fn check(&self) -> Result<(), String> {
        match &self.lock().book {
            Some(book) => book.check(),
            None => Ok(()),
        }
    }

    fn remember(shared: &mut Shared, demand: &PodDemand) {
        let uid = demand.pod.uid.clone();
        if shared.demands.insert(uid.clone(), demand.clone()).is_none() {
            shared.demand_order.push_back(uid);
        }
        while shared.demand_order.len() > DEMANDS_REMEMBERED_MAX {
            if let Some(old) = shared.demand_order.pop_front() {
                shared.demands.remove(&old);
            }
        }
    }

    fn filter(&self, args: ExtenderArgs) -> Result<ExtenderFilterResult, Rejection> {
        let names = node_names(&args.nodes, &args.node_names)?;
        let demand = match kube_pod::demand(&args.pod) {
            Ok(demand) => demand,
            Err(error) => return Ok(ExtenderFilterResult { error: error.to_string(), ..Default::default() }),
        };
        if demand.gpus == 0 {
            return Ok(with_passing(ExtenderFilterResult::default(), &args, &names, &vec![true; names.len()]));
        }
        let now = self.now_ms();
        let (outcome, waiters) = {
            let mut shared = self.lock();
            let Some(book) = shared.book.as_mut() else {
                return Ok(not_ready_filter());
            };
            let expired = book.expire(now);
            let ids = resolve(book, &names);
            let known: Vec<HostId> = ids.iter().flatten().copied().collect();
            let outcome = book.filter(&demand, &known, now).map(|verdicts| (ids, verdicts));
            if outcome.is_ok() {
                Self::remember(&mut shared, &demand);
            }
            (outcome, take_waiters(&mut shared, &expired))
        };
        answer_dropped(waiters);
        let (ids, verdicts) = match outcome {
            Ok(outcome) => outcome,
            Err(error) => return Ok(ExtenderFilterResult { error: error.to_string(), ..Default::default() }),
        };
        let mut result = ExtenderFilterResult::default();
        let mut passing = vec![false; names.len()];
        let mut verdicts = verdicts.into_iter();
        for (index, (name, id)) in names.iter().zip(&ids).enumerate() {
            let verdict = match id {
                Some(_) => verdicts.next(),
                None => Some(NodeVerdict::Unresolvable(NOT_IN_VIEW.into())),
            };
            match verdict {
                Some(NodeVerdict::Pass) => passing[index] = true,
                Some(NodeVerdict::Fail(reason)) => {
                    result.failed_nodes.insert(name.clone(), reason);
                }
                Some(NodeVerdict::Unresolvable(reason)) => {
                    result.failed_and_unresolvable_nodes.insert(name.clone(), reason);
                }
                None => {}
            }
        }
        Ok(with_passing(result, &args, &names, &passing))
    }

    fn prioritize(&self, args: ExtenderArgs) -> Result<Vec<HostPriority>, Rejection> {
        let names = node_names(&args.nodes, &args.node_names)?;
        let demand = kube_pod::demand(&args.pod).map_err(|e| Rejection::bad_request(e.to_string()))?;
        let zero = || names.iter().map(|n| HostPriority { host: n.clone(), score: 0 }).collect();
        if demand.gpus == 0 {
            return Ok(zero());
        }
        let mut shared = self.lock();
        let Some(book) = shared.book.as_mut() else { return Ok(zero()) };
        let ids = resolve(book, &names);
        let known: Vec<HostId> = ids.iter().flatten().copied().collect();
        let scores = book.prioritize(&demand, &known).map_err(|e| Rejection::bad_request(e.to_string()))?;
        drop(shared);
        let mut scores = scores.into_iter();
        Ok(names
            .iter()
            .zip(&ids)
            .map(|(name, id)| HostPriority {
                host: name.clone(),
                score: if id.is_some() { scores.next().unwrap_or(0) } else { 0 },
            })
            .collect())
    }

    fn preempt(&self, args: ExtenderPreemptionArgs) -> Result<ExtenderPreemptionResult, Rejection> {
        let demand = kube_pod::demand(&args.pod).map_err(|e| Rejection::bad_request(e.to_string()))?;
        let proposed: Vec<(String, MetaVictims)> = match (&args.node_name_to_meta_victims, &args.node_name_to_victims) {
            (Some(meta), _) => meta.iter().map(|(n, v)| (n.clone(), v.clone())).collect(),
            (None, Some(full)) => full
                .iter()
                .map(|(node, victims)| {
                    let pods = victims
                        .pods
                        .iter()
                        .flatten()
                        .map(|pod| MetaPod { uid: pod.metadata.uid.clone().unwrap_or_default() })
                        .collect();
                    (node.clone(), MetaVictims { pods: Some(pods), num_pdb_violations: victims.num_pdb_violations })
                })
                .collect(),
            (None, None) => {
                return Err(Rejection::bad_request(
                    "preempt: neither NodeNameToMetaVictims nor NodeNameToVictims is set".into(),
                ))
            }
        };
        // A node with no victims is an error for kube-scheduler: never hand one back.
        let proposed: Vec<(String, MetaVictims)> =
            proposed.into_iter().filter(|(_, v)| v.pods.as_ref().is_some_and(|p| !p.is_empty())).collect();
        if demand.gpus == 0 {
            return Ok(ExtenderPreemptionResult { node_name_to_meta_victims: Some(proposed.into_iter().collect()) });
        }
        let mut shared = self.lock();
        let Some(book) = shared.book.as_mut() else {
            return Ok(ExtenderPreemptionResult { node_name_to_meta_victims: Some(Default::default()) });
        };
        let mut candidates = Vec::new();
        let mut kept_names = Vec::new();
        for (node, victims) in &proposed {
            let Some(host) = book.cluster().host_id(node) else { continue };
            let uids = victims.pods.iter().flatten().map(|p| p.uid.clone()).collect();
            candidates.push(PreemptCandidate { host, victims: uids });
            kept_names.push((node.clone(), victims.clone()));
        }
        let keep = book.preempt(&demand, &candidates).map_err(|e| Rejection::bad_request(e.to_string()))?;
        drop(shared);
        let narrowed = kept_names.into_iter().zip(keep).filter(|(_, keep)| *keep).map(|(entry, _)| entry).collect();
        Ok(ExtenderPreemptionResult { node_name_to_meta_victims: Some(narrowed) })
    }

    async fn bind(self: Arc<Self>, args: ExtenderBindingArgs) -> ExtenderBindingResult {
        let fail = |error: String| ExtenderBindingResult { error };
        let now = self.now_ms();
        let (step, rx) = {
            let mut shared = self.lock();
            let Some(demand) = shared.demands.get(&args.pod_uid).cloned() else {
                return fail(format!(
                    "pod {}/{} (uid {}): not filtered by this extender (restarted?); it will be filtered again",
                    args.pod_namespace, args.pod_name, args.pod_uid
                ));
            };
            if demand.pod.namespace != args.pod_namespace || demand.pod.name != args.pod_name {
                return fail(format!(
                    "uid {} belongs to pod {}, not {}/{}",
                    args.pod_uid, demand.pod, args.pod_namespace, args.pod_name
                ));
            }
            let Some(book) = shared.book.as_mut() else { return fail(NOT_READY.into()) };
            let expired = book.expire(now);
            let step = book.bind_arrive(&demand, &args.node, now);
            // Answered before this call's own waiter joins: a lapsed hold of this same pod
            // belongs to an earlier call of it.
            let waiters = take_waiters(&mut shared, &expired);
            let rx = match &step {
                Ok(BindStep::Wait { gang, .. }) => {
                    let (tx, rx) = oneshot::channel();
                    shared.waiters.entry(gang.clone()).or_default().push((demand.pod.uid.clone(), tx));
                    Some(rx)
                }
                _ => None,
            };
            drop(shared);
            answer_dropped(waiters);
            (step, rx)
        };
        match step {
            Err(error) => fail(error.to_string()),
            Ok(BindStep::Wait { gang, retry_now }) => {
                let Some(rx) = rx else { return fail("internal: no waiter".into()) };
                if !retry_now.is_empty() {
                    // Spawned: the nudges must not wait on this held call, nor die with it.
                    let binder = self.binder.clone();
                    tokio::spawn(async move {
                        for pod in &retry_now {
                            if let Err(error) = binder.retry(pod).await {
                                tracing::warn!(%pod, %error, "asking kube-scheduler to retry a gang member failed");
                            }
                        }
                    });
                }
                match rx.await {
                    Ok(Ok(())) => ExtenderBindingResult::default(),
                    Ok(Err(error)) => fail(error),
                    Err(_) => fail(format!("gang `{gang}`: its reservation was dropped while this member waited")),
                }
            }
            Ok(BindStep::Bind { ticket, members }) => {
                // Spawned, so that kube-scheduler hanging up (its httpTimeout) cannot stop a
                // gang's Bindings half-way and leave the reservation in flight for ever.
                let ext = self.clone();
                let binding = tokio::spawn(async move { ext.bind_all(&ticket, members).await });
                match binding.await {
                    Ok(Ok(())) => ExtenderBindingResult::default(),
                    Ok(Err(error)) => fail(error),
                    Err(error) => fail(format!("the bind task failed: {error}")),
                }
            }
        }
    }

    /// Creates every Binding of a ticket concurrently, records the outcome in the book,
    /// undoes a partial bind, and answers the members that were waiting.
    async fn bind_all(&self, ticket: &Ticket, members: Vec<MemberBind>) -> Result<(), String> {
        let binder = &self.binder;
        let budget = Duration::from_millis(BINDING_BUDGET_MS);
        let outcomes = join_all(members.iter().map(|member| async move {
            let gpus = kube_pod::gpus_annotation(&member.gpus);
            let outcome = match tokio::time::timeout(budget, binder.bind(member, gpus)).await {
                Ok(outcome) => outcome,
                Err(_) => Err(BindError::Unknown {
                    reason: format!("no answer within {} s; the Binding may still land", budget.as_secs()),
                }),
            };
            (member.pod.clone(), outcome.map_err(|error| error.to_string()))
        }))
        .await;
        let now = self.now_ms();
        let (finish, waiters) = {
            let mut shared = self.lock();
            let finish = match shared.book.as_mut() {
                Some(book) => book.bind_finished(ticket, &outcomes, now),
                None => BindFinish::RolledBack { delete: Vec::new(), failures: vec![NOT_READY.into()] },
            };
            // Only a gang's members wait for each other; a single pod's bind waits for no one.
            let waiters = ticket.gang().and_then(|gang| shared.waiters.remove(gang)).unwrap_or_default();
            for member in &members {
                shared.demands.remove(&member.pod.uid);
            }
            (finish, waiters)
        };
        let result = match &finish {
            BindFinish::Bound => Ok(()),
            BindFinish::RolledBack { delete, failures } => {
                let message = format!(
                    "{}: not every member could be bound ({}); {} bound member(s) deleted so the gang is not half-bound",
                    ticket,
                    failures.join("; "),
                    delete.len()
                );
                join_all(delete.iter().map(|pod| async move {
                    if let Err(error) = binder.delete(pod).await {
                        tracing::warn!(%pod, %error, "undo: deleting a bound member failed");
                    }
                }))
                .await;
                join_all(members.iter().map(|m| binder.event(&m.pod, "GangBindRolledBack", message.clone()))).await;
                Err(message)
            }
        };
        for (_, waiter) in waiters {
            let _ = waiter.send(result.clone());
        }
        result
    }
}

const NOT_READY: &str = "topoplace has no cluster view yet (nodes not synced)";
const NOT_IN_VIEW: &str = "node is not in topoplace's view (no GPUs, or labels it cannot read)";

fn not_ready_filter() -> ExtenderFilterResult {
    ExtenderFilterResult { error: NOT_READY.into(), ..Default::default() }
}

/// The held binds that `ended` answers, each with its answer.
fn take_waiters(shared: &mut Shared, ended: &[Expired]) -> Vec<(BindWaiter, String)> {
    let mut answers = Vec::new();
    for end in ended {
        let gang = end.gang();
        let Some(held) = shared.waiters.get_mut(gang) else { continue };
        let taken: Vec<(String, BindWaiter)> = match end {
            Expired::Reservation { .. } => std::mem::take(held),
            Expired::Hold { pod, .. } => {
                let (mine, rest) = std::mem::take(held).into_iter().partition(|(uid, _)| *uid == pod.uid);
                *held = rest;
                mine
            }
        };
        if held.is_empty() {
            shared.waiters.remove(gang);
        }
        let message = match end {
            Expired::Reservation { .. } => format!(
                "gang `{gang}`: its reservation ended before every member reached bind; its GPUs are released and \
                 the gang will be scheduled again"
            ),
            Expired::Hold { waiting_for, held_ms, .. } => format!(
                "gang `{gang}`: this bind was held {:.0} s and {waiting_for} member(s) have not reached bind; the pod \
                 keeps its place in the gang's plan and binds with the rest when kube-scheduler retries it",
                *held_ms as f64 / 1000.0
            ),
        };
        answers.extend(taken.into_iter().map(|(_, waiter)| (waiter, message.clone())));
    }
    answers
}

fn answer_dropped(answers: Vec<(BindWaiter, String)>) {
    for (waiter, message) in answers {
        let _ = waiter.send(Err(message));
    }
}

/// Each name's node id, `None` for names the book does not know.
fn resolve(book: &Book, names: &[String]) -> Vec<Option<HostId>> {
    names.iter().map(|name| book.cluster().host_id(name)).collect()
}

fn node_names(
    nodes: &Option<List<k8s_openapi::api::core::v1::Node>>,
    names: &Option<Vec<String>>,
) -> Result<Vec<String>, Rejection> {
    match (nodes, names) {
        (Some(list), _) => list
            .items
            .iter()
            .enumerate()
            .map(|(index, node)| {
                node.metadata
                    .name
                    .clone()
                    .ok_or_else(|| Rejection::bad_request(format!("Nodes.items[{index}].metadata.name is missing")))
            })
            .collect(),
        (None, Some(names)) => Ok(names.clone()),
        (None, None) => Err(Rejection::bad_request("neither Nodes nor NodeNames is set".into())),
    }
}

/// The reply in the form of the request: `Nodes` (the input's objects) or `NodeNames`.
fn with_passing(
    mut result: ExtenderFilterResult,
    args: &ExtenderArgs,
    names: &[String],
    passing: &[bool],
) -> ExtenderFilterResult {
    match &args.nodes {
        Some(list) => {
            let items = list.items.iter().zip(passing).filter(|(_, pass)| **pass).map(|(n, _)| n.clone()).collect();
            result.nodes = Some(List { items, metadata: Default::default() });
        }
        None => {
            result.node_names =
                Some(names.iter().zip(passing).filter(|(_, pass)| **pass).map(|(n, _)| n.clone()).collect());
        }
    }
    result
}

/// A request refused before the book saw it: 4xx with a JSON body naming the problem.
#[derive(Debug)]
struct Rejection {
    status: StatusCode,
    message: String,
}

impl Rejection {
    fn bad_request(message: String) -> Self {
        Rejection { status: StatusCode::BAD_REQUEST, message }
    }
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        (self.status, json_body(&serde_json::json!({ "Error": self.message }))).into_response()
    }
}

fn json_body<T: Serialize>(value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(bytes) => ([(header::CONTENT_TYPE, "application/json")], bytes).into_response(),
        Err(error) => {
            (StatusCode::INTERNAL_SERVER_ERROR, format!("encoding the reply failed: {error}")).into_response()
        }
    }
}

async fn read_json<T: DeserializeOwned>(ext: &Extender, verb: &str, body: Body) -> Result<T, Rejection> {
    let limit = ext.config.body_bytes_max;
    let bytes: Bytes = axum::body::to_bytes(body, limit).await.map_err(|_| Rejection {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        message: format!("{verb}: request body is over the limit of {limit} bytes"),
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|error| Rejection::bad_request(format!("{verb}: the body is not a valid request: {error}")))
}

async fn timed<T: Serialize>(ext: &Extender, verb: Verb, work: impl Future<Output = Result<T, Rejection>>) -> Response {
    let start = std::time::Instant::now();
    let outcome = work.await;
    ext.metrics.record(verb, start.elapsed(), outcome.is_ok());
    match outcome {
        Ok(reply) => json_body(&reply),
        Err(rejection) => rejection.into_response(),
    }
}

async fn filter_handler(State(ext): State<Arc<Extender>>, body: Body) -> Response {
    timed(&ext, Verb::Filter, async { ext.filter(read_json(&ext, "filter", body).await?) }).await
}

async fn prioritize_handler(State(ext): State<Arc<Extender>>, body: Body) -> Response {
    timed(&ext, Verb::Prioritize, async { ext.prioritize(read_json(&ext, "prioritize", body).await?) }).await
}

async fn preempt_handler(State(ext): State<Arc<Extender>>, body: Body) -> Response {
    timed(&ext, Verb::Preempt, async { ext.preempt(read_json(&ext, "preempt", body).await?) }).await
}

async fn bind_handler(State(ext): State<Arc<Extender>>, body: Body) -> Response {
    let start = std::time::Instant::now();
    let args: ExtenderBindingArgs = match read_json(&ext, "bind", body).await {
        Ok(args) => args,
        Err(rejection) => {
            ext.metrics.record(Verb::Bind, start.elapsed(), false);
            return rejection.into_response();
        }
    };
    let reply = ext.clone().bind(args).await;
    ext.metrics.record(Verb::Bind, start.elapsed(), reply.error.is_empty());
    json_body(&reply)
}

/// The HTTP routes, verbs under `config.prefix`.
pub fn router(ext: Arc<Extender>) -> Router {
    let prefix = ext.config.prefix.trim_end_matches('/').to_string();
    Router::new()
        .route(&format!("{prefix}/filter"), post(filter_handler))
        .route(&format!("{prefix}/prioritize"), post(prioritize_handler))
        .route(&format!("{prefix}/preempt"), post(preempt_handler))
        .route(&format!("{prefix}/bind"), post(bind_handler))
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(ext): State<Arc<Extender>>| async move {
                if ext.is_ready() {
                    (StatusCode::OK, "ok")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "node and pod caches not synced")
                }
            }),
        )
        .route(
            "/metrics",
            get(|State(ext): State<Arc<Extender>>| async move {
                let text = {
                    let shared = ext.lock();
                    ext.metrics.render(shared.book.as_ref())
                };
                ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
            }),
        )
        .route("/state", get(|State(ext): State<Arc<Extender>>| async move { json_body(&ext.state_json()) }))
        .with_state(ext)
}

/// Serves until `shutdown` resolves, then stops taking connections and lets requests in
/// flight finish (binds waiting for their gang included, up to their reservation's expiry).
pub async fn serve(
    listener: tokio::net::TcpListener,
    ext: Arc<Extender>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let sweeper = {
        let ext = ext.clone();
        tokio::spawn(async move {
            // Sleeps until the earliest reservation's deadline, published by every lock
            // section that moves it: no wake-up while no reservation is waiting, none for
            // requests that change nothing about expiry.
            let mut deadlines = ext.expiry.subscribe();
            // A deadline just swept is not waited for again until something is published (the
            // sweep moves it, unless the book disagrees; then only a change wakes the sweeper,
            // and any change, such as a new reservation, re-arms it).
            let mut swept: Option<u64> = None;
            loop {
                let next = *deadlines.borrow_and_update();
                let deadline = next.filter(|&at| Some(at) != swept).map(|at| ext.epoch + Duration::from_millis(at));
                let expiry = async {
                    match deadline {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = expiry => {
                        swept = next;
                        ext.sweep();
                    }
                    changed = deadlines.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        swept = None;
                    }
                }
            }
        })
    };
    let result = axum::serve(listener, router(ext)).with_graceful_shutdown(shutdown).await;
    sweeper.abort();
    result
}

/// A [`Binder`] for `serve --cluster`: Bindings recorded in memory, Events kept for `/state`.
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

    fn retry<'a>(&'a self, pod: &'a PodIdentity) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            self.retried.lock().unwrap_or_else(|p| p.into_inner()).push(pod.clone());
            Ok(())
        })
    }
}
