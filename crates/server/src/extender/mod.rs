//! The kube-scheduler extender: `POST {prefix}/filter`, `/prioritize`, `/preempt`, `/bind`
//! in the wire format of `k8s.io/kube-scheduler/extender/v1`, plus `GET /healthz`, `/readyz`,
//! `/metrics` and `/state`. It translates requests into the reservation book's terms,
//! answers from it, and does the one thing the book cannot: waiting. A gang member's bind
//! is held until every member has reached bind; the last one to arrive creates all the
//! Bindings concurrently through the server's [`Binder`](crate::binder::Binder) (the API
//! server, or memory in static mode) and answers everyone. A partial failure deletes the
//! members that did bind.
//!
//! Decoding and encoding run on the async workers, in parallel; each verb's book work runs on
//! the book's worker thread ([`ServerState::on_book`]); the Bindings, deletes and Events run
//! after the lock is released.

pub mod metrics;
pub mod state_json;
pub mod tls;
pub mod wire;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures::future::join_all;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::oneshot;

use crate::binder::{BindError, Refusal};
use crate::pod;
use crate::pod_group::PodGroups;
use crate::state::{answer_dropped, take_waiters, BookWorkError, ServerState, Shared};
use metrics::Verb;
use topoplace_engine::topology::{DevicePool, HostId};
use topoplace_online::reservation::{
    BindFinish, BindStep, Book, BookError, MemberBind, NodeVerdict, PodDemand, PreemptCandidate, Ticket,
};
use wire::{
    ExtenderArgs, ExtenderBindingArgs, ExtenderBindingResult, ExtenderFilterResult, ExtenderPreemptionArgs,
    ExtenderPreemptionResult, HostPriority, MetaPod, MetaVictims, NodeList,
};

/// The ceiling of a request body, whatever the cluster's size (`serve --body-limit`); a
/// 5,000-node NodeList of real Node objects is about 40 MB.
pub const BODY_BYTES_MAX_DEFAULT: usize = 64 << 20;
/// A request body's allowance for the pod and the envelope ([`body_limit`]): a Pod object is at
/// most about 1.5 MiB (the API server's etcd request limit).
pub const BODY_BYTES_BASE: usize = 2 << 20;
/// Longest a request's body may take to arrive once its headers have (a client that trickles
/// it would otherwise keep its place among the requests in flight): 408 past it.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A request body's allowance per node in the view ([`body_limit`]): a Node object as
/// kube-scheduler sends it without `nodeCacheCapable` is 4 to 20 KB (its status lists up to 50
/// images by default, the kubelet's `nodeStatusMaxImages`); a name alone is tens of bytes.
pub const BODY_BYTES_PER_NODE: usize = 64 << 10;

/// The largest body a request may have: [`BODY_BYTES_BASE`] plus [`BODY_BYTES_PER_NODE`] for
/// each node in the view, at most `ceiling` (`serve --body-limit`). A request names nodes
/// that kube-scheduler found feasible for a GPU pod, which are nodes with GPUs, the ones the
/// view holds.
pub fn body_limit(nodes_in_view: usize, ceiling: usize) -> usize {
    BODY_BYTES_BASE.saturating_add(nodes_in_view.saturating_mul(BODY_BYTES_PER_NODE)).min(ceiling)
}

/// Requests of each verb the extender works on at once (`serve --in-flight-limit` and
/// `--bind-in-flight-limit`); one more is answered 429 at once, before its body is read,
/// naming the limit. kube-scheduler calls filter, prioritize and preempt from its one
/// scheduling loop, a pod at a time per profile, so a few are plenty; it binds in a goroutine
/// per pod, and a gang member's bind is held until its gang is complete, so binds in flight
/// are as many as the members of the gangs assembling at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InFlightLimits {
    /// Filter, prioritize and preempt, each.
    pub verbs: usize,
    pub bind: usize,
}

impl InFlightLimits {
    fn of(self, verb: Verb) -> usize {
        match verb {
            Verb::Bind => self.bind,
            Verb::Filter | Verb::Prioritize | Verb::Preempt => self.verbs,
        }
    }
}

/// 32 filter, prioritize or preempt calls each, 1,024 binds.
pub const IN_FLIGHT_LIMITS_DEFAULT: InFlightLimits = InFlightLimits { verbs: 32, bind: 1_024 };
/// Pods remembered between their filter and their bind.
pub(crate) const DEMANDS_REMEMBERED_MAX: usize = 100_000;

#[derive(Debug, Clone)]
pub struct ExtenderConfig {
    /// Path prefix of the verbs (`urlPrefix`'s path), `""` or like `/topoplace`.
    pub prefix: String,
    /// The ceiling of a request body; see [`body_limit`].
    pub body_bytes_max: usize,
    /// How long after a hold lapsed its pod is asked to retry ([`GANG_RETRY_AFTER_DEFAULT`]).
    pub gang_retry_after: Duration,
    /// See [`IN_FLIGHT_LIMITS_DEFAULT`].
    pub in_flight: InFlightLimits,
    /// The namespaces whose pods the extender serves (`serve --namespaces`); `None`: every
    /// namespace. A filter for a pod of another namespace answers its `Error` and holds
    /// nothing; prioritize and preempt answer 403. Binds check it again on the API server's
    /// copy ([`crate::binder::Admission`]).
    pub namespaces: Option<std::collections::BTreeSet<String>>,
    /// Over HTTPS, the names (subject common name or DNS subject alternative name) of the
    /// client certificates that may call the verbs (`serve --verb-clients`): kube-scheduler's.
    /// A certificate of the client CA without one of them reads `/state` and `/metrics` only
    /// (a Prometheus scraper's). `None`: every certificate of the client CA may call the verbs.
    pub verb_clients: Option<std::collections::BTreeSet<String>>,
}

/// How long after a hold lapsed its pod is asked to retry: kube-scheduler must have had the
/// failed bind's answer and forgotten the pod it assumed, or it ignores an update of the pod
/// (v1.20 `skipPodUpdate` skips annotation-only updates of assumed pods).
pub const GANG_RETRY_AFTER_DEFAULT: Duration = Duration::from_millis(1_000);

impl Default for ExtenderConfig {
    fn default() -> Self {
        ExtenderConfig {
            prefix: String::new(),
            body_bytes_max: BODY_BYTES_MAX_DEFAULT,
            gang_retry_after: GANG_RETRY_AFTER_DEFAULT,
            in_flight: IN_FLIGHT_LIMITS_DEFAULT,
            namespaces: None,
            verb_clients: None,
        }
    }
}

/// The router's state: the server's state and the HTTP limits.
#[derive(Clone)]
struct Verbs {
    state: Arc<ServerState>,
    config: Arc<ExtenderConfig>,
    /// PodGroup lookups, when the server reads an API server.
    pod_groups: Option<Arc<PodGroups>>,
    /// Each verb's requests in flight ([`InFlightLimits`]), indexed by [`Verb`].
    in_flight: Arc<[Arc<tokio::sync::Semaphore>; 4]>,
}

impl Verbs {
    /// A place for one more `verb` request, or 429 naming the limit.
    fn admit(&self, verb: Verb) -> Result<tokio::sync::OwnedSemaphorePermit, Rejection> {
        self.in_flight[verb as usize].clone().try_acquire_owned().map_err(|_| {
            let (limit, flag) = match verb {
                Verb::Bind => (self.config.in_flight.bind, "--bind-in-flight-limit"),
                _ => (self.config.in_flight.verbs, "--in-flight-limit"),
            };
            Rejection {
                status: StatusCode::TOO_MANY_REQUESTS,
                message: format!(
                    "{}: {limit} requests are in flight already, the limit ({flag}); nothing was done, retry shortly",
                    verb.name()
                ),
            }
        })
    }
}

/// The pod's demand, its gang sized by the PodGroup object it names when the server reads an
/// API server (`groups`); otherwise, or for a pod that names none, by its own labels. The
/// error names the pod, and the PodGroup or field.
async fn demand_of(groups: Option<&PodGroups>, pod: &k8s_openapi::api::core::v1::Pod) -> Result<PodDemand, String> {
    let group = match groups {
        Some(groups) => groups.of_pod(pod).await.map_err(|error| format!("pod {}: {error}", pod::shown(pod)))?,
        None => None,
    };
    pod::demand_sized(pod, group.as_ref()).map_err(|error| error.to_string())
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

/// What the book said to a filter.
enum Filtered {
    NotReady,
    Refused(String),
    /// A named limit passed ([`BookError::NamespaceOverLimit`]): 429, nothing held.
    OverLimit(String),
    /// Each offered name's node id (`None`: not in the view) and the verdicts of the known ones.
    Verdicts(Vec<Option<HostId>>, Vec<NodeVerdict>),
}

/// The filter's book work (on the book's thread).
fn filter_on_book(state: &ServerState, demand: &PodDemand, names: &[String]) -> Filtered {
    let now = state.now_ms();
    let (outcome, waiters) = {
        let mut shared = state.lock();
        let Some(book) = shared.book.as_mut() else { return Filtered::NotReady };
        let expired = book.expire(now);
        let ids = resolve(book, names, &demand.pool);
        let known: Vec<HostId> = ids.iter().flatten().copied().collect();
        let outcome = match book.filter(demand, &known, now) {
            Ok(verdicts) => Filtered::Verdicts(ids, verdicts),
            Err(error @ BookError::NamespaceOverLimit { .. }) => Filtered::OverLimit(error.to_string()),
            Err(error) => Filtered::Refused(error.to_string()),
        };
        if matches!(outcome, Filtered::Verdicts(..)) {
            remember(&mut shared, demand);
        }
        (outcome, take_waiters(&mut shared, &expired))
    };
    answer_dropped(waiters);
    outcome
}

async fn filter(
    state: &ServerState,
    groups: Option<&PodGroups>,
    mut args: ExtenderArgs,
) -> Result<ExtenderFilterResult, Rejection> {
    let names = node_names(&args.nodes, &mut args.node_names)?;
    let demand = match demand_of(groups, &args.pod).await {
        Ok(demand) => demand,
        Err(error) => return Ok(ExtenderFilterResult { error, ..Default::default() }),
    };
    if demand.gpus == 0 {
        let passing = vec![true; names.len()];
        return Ok(with_passing(ExtenderFilterResult::default(), args.nodes, names, &passing));
    }
    let pool = demand.pool.clone();
    let (names, filtered) = state
        .on_book(move |state| {
            let filtered = filter_on_book(state, &demand, &names);
            (names, filtered)
        })
        .await?;
    let (ids, verdicts) = match filtered {
        Filtered::Verdicts(ids, verdicts) => (ids, verdicts),
        Filtered::NotReady => return Ok(not_ready_filter()),
        Filtered::Refused(error) => return Ok(ExtenderFilterResult { error, ..Default::default() }),
        Filtered::OverLimit(message) => return Err(Rejection { status: StatusCode::TOO_MANY_REQUESTS, message }),
    };
    let mut result = ExtenderFilterResult::default();
    let mut passing = vec![false; names.len()];
    let mut verdicts = verdicts.into_iter();
    for (index, (name, id)) in names.iter().zip(&ids).enumerate() {
        let verdict = match id {
            Some(_) => verdicts.next(),
            None => Some(NodeVerdict::Unresolvable(match &pool {
                DevicePool::Gpu => NOT_IN_VIEW.into(),
                other => format!("node offers no {other} devices in topoplace's view"),
            })),
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
    Ok(with_passing(result, args.nodes, names, &passing))
}

async fn prioritize(
    state: &ServerState,
    groups: Option<&PodGroups>,
    mut args: ExtenderArgs,
) -> Result<Vec<HostPriority>, Rejection> {
    let names = node_names(&args.nodes, &mut args.node_names)?;
    let demand = demand_of(groups, &args.pod).await.map_err(Rejection::bad_request)?;
    let zero = |names: Vec<String>| names.into_iter().map(|host| HostPriority { host, score: 0 }).collect();
    if demand.gpus == 0 {
        return Ok(zero(names));
    }
    let (names, scored) = state
        .on_book(move |state| {
            let now = state.now_ms();
            let mut shared = state.lock();
            let scored = shared.book.as_mut().map(|book| {
                let ids = resolve(book, &names, &demand.pool);
                let known: Vec<HostId> = ids.iter().flatten().copied().collect();
                book.prioritize(&demand, &known, now).map(|scores| (ids, scores))
            });
            drop(shared);
            (names, scored)
        })
        .await?;
    let (ids, scores) = match scored {
        None => return Ok(zero(names)),
        Some(scored) => scored.map_err(|e| Rejection::bad_request(e.to_string()))?,
    };
    let mut scores = scores.into_iter();
    Ok(names
        .into_iter()
        .zip(&ids)
        .map(|(name, id)| HostPriority { host: name, score: if id.is_some() { scores.next().unwrap_or(0) } else { 0 } })
        .collect())
}

async fn preempt(
    state: &ServerState,
    groups: Option<&PodGroups>,
    args: ExtenderPreemptionArgs,
) -> Result<ExtenderPreemptionResult, Rejection> {
    let demand = demand_of(groups, &args.pod).await.map_err(Rejection::bad_request)?;
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
    let pod_name = format!("{}/{}", demand.pod.namespace, demand.pod.name);
    let narrowed = state
        .on_book(move |state| {
            let now = state.now_ms();
            let mut shared = state.lock();
            let book = shared.book.as_mut()?;
            let mut candidates = Vec::new();
            let mut kept_names = Vec::new();
            for (node, victims) in proposed {
                let Some(host) = book.cluster().host_in(&node, &demand.pool) else { continue };
                let uids = victims.pods.iter().flatten().map(|p| p.uid.clone()).collect();
                candidates.push(PreemptCandidate { host, victims: uids });
                kept_names.push((node, victims.num_pdb_violations));
            }
            Some(book.preempt(&demand, &candidates, now).map(|answer| {
                if let Some(why) = &answer.why {
                    tracing::info!(pod = %pod_name, %why, "preempt: no candidate kept");
                }
                // The victims kept, with the rest of a victim's gang on that node added.
                kept_names
                    .into_iter()
                    .zip(answer.keep)
                    .filter_map(|((node, num_pdb_violations), keep)| {
                        let pods = keep?.into_iter().map(|uid| MetaPod { uid }).collect();
                        Some((node, MetaVictims { pods: Some(pods), num_pdb_violations }))
                    })
                    .collect()
            }))
        })
        .await?;
    match narrowed {
        None => Ok(ExtenderPreemptionResult { node_name_to_meta_victims: Some(Default::default()) }),
        Some(narrowed) => Ok(ExtenderPreemptionResult {
            node_name_to_meta_victims: Some(narrowed.map_err(|e| Rejection::bad_request(e.to_string()))?),
        }),
    }
}

/// What the book said to a member reaching bind, with the held call's answer to await.
type Arrival = Result<(BindStep, Option<oneshot::Receiver<Result<(), String>>>), String>;

/// The bind's book work (on the book's thread): the member arrives; a held one registers
/// its answer.
fn arrive_on_book(state: &ServerState, args: &ExtenderBindingArgs) -> Arrival {
    let now = state.now_ms();
    let mut shared = state.lock();
    let Some(demand) = shared.demands.get(&args.pod_uid).cloned() else {
        return Err(format!(
            "pod {}/{} (uid {}): not filtered by this extender (restarted?); it will be filtered again",
            args.pod_namespace, args.pod_name, args.pod_uid
        ));
    };
    if demand.pod.namespace != args.pod_namespace || demand.pod.name != args.pod_name {
        return Err(format!(
            "uid {} belongs to pod {}, not {}/{}",
            args.pod_uid, demand.pod, args.pod_namespace, args.pod_name
        ));
    }
    let Some(book) = shared.book.as_mut() else { return Err(NOT_READY.into()) };
    let expired = book.expire(now);
    let step = book.bind_arrive(&demand, &args.node, now);
    // Answered before this call's own waiter joins: a lapsed hold of this same pod belongs to
    // an earlier call of it.
    let waiters = take_waiters(&mut shared, &expired);
    let outcome = match step {
        Ok(step) => {
            let rx = match &step {
                BindStep::Wait { gang, .. } => {
                    let (tx, rx) = oneshot::channel();
                    shared.waiters.entry(gang.clone()).or_default().push((demand.pod.uid.clone(), tx));
                    Some(rx)
                }
                BindStep::Bind { .. } => None,
            };
            Ok((step, rx))
        }
        Err(error) => Err(error.to_string()),
    };
    drop(shared);
    answer_dropped(waiters);
    outcome
}

/// The bind verb. Its whole flow runs in a task of its own: kube-scheduler hanging up (its
/// `httpTimeout`) drops the HTTP handler, and must not drop a member's arrival half-way (a
/// gang marked binding whose Bindings never run) nor a gang's Bindings.
/// `permit` is the call's place among the binds in flight: kept while the call works (the
/// book, the verification, the Bindings), given back while it is held for its gang, so that
/// the members of a large gang waiting for each other never fill the limit and lock it out.
async fn bind(
    verbs: &Verbs,
    args: ExtenderBindingArgs,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> ExtenderBindingResult {
    let (state, retry_after) = (verbs.state.clone(), verbs.config.gang_retry_after);
    match tokio::spawn(async move { bind_flow(&state, retry_after, args, permit).await }).await {
        Ok(reply) => reply,
        Err(error) => ExtenderBindingResult { error: format!("the bind task failed: {error}") },
    }
}

async fn bind_flow(
    state: &Arc<ServerState>,
    retry_after: Duration,
    args: ExtenderBindingArgs,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> ExtenderBindingResult {
    let fail = |error: String| ExtenderBindingResult { error };
    let arrival = match state.on_book(move |state| arrive_on_book(state, &args)).await {
        Ok(arrival) => arrival,
        Err(busy) => return fail(busy.to_string()),
    };
    let (step, rx) = match arrival {
        Ok(arrived) => arrived,
        Err(error) => return fail(error),
    };
    match step {
        BindStep::Wait { gang, retry_now } => {
            // Held: bounded by the gang's planned slots, not by the binds at work.
            drop(permit);
            let Some(rx) = rx else { return fail("internal: no waiter".into()) };
            if !retry_now.is_empty() {
                // Spawned: the nudges must not wait on this held call, nor die with it.
                tokio::spawn(ask_to_retry(state.clone(), retry_after, retry_now));
            }
            match rx.await {
                Ok(Ok(())) => ExtenderBindingResult::default(),
                Ok(Err(error)) => fail(error),
                Err(_) => fail(format!("gang `{gang}`: its reservation was dropped while this member waited")),
            }
        }
        BindStep::Bind { ticket, members } => {
            let outcome = bind_all(state, &ticket, members).await;
            if let (Ok(()), Ticket::Leader { gang, .. }) = (&outcome, &ticket) {
                // Workers that reached bind while the leader's Binding was in flight wait for
                // no one else: bound now, in a task of their own (this call is answered).
                let rest = state.with_book(|book| (book.as_mut().and_then(|b| b.bind_rest(gang)), Vec::new()));
                if let Some((ticket, members)) = rest {
                    let state = state.clone();
                    tokio::spawn(async move {
                        if let Err(error) = bind_all(&state, &ticket, members).await {
                            tracing::warn!(%error, "binding the members after their leader");
                        }
                    });
                }
            }
            match outcome {
                Ok(()) => ExtenderBindingResult::default(),
                Err(error) => fail(error),
            }
        }
    }
}

/// Asks kube-scheduler to retry the lapsed members `pods`. One that is gone (deleted, or its
/// name another pod's) gives its slot up, so its replacement can take it.
async fn ask_to_retry(state: Arc<ServerState>, after: Duration, pods: Vec<topoplace_online::reservation::PodIdentity>) {
    tokio::time::sleep(after).await;
    for pod in &pods {
        match state.binder.retry(pod).await {
            Ok(()) => {}
            Err(BindError::Gone { reason }) => {
                tracing::info!(%pod, %reason, "a lapsed gang member is gone: its slot is freed");
                state.with_book(|book| ((), book.as_mut().map(|b| b.forget_pod(&pod.uid)).unwrap_or_default()));
            }
            Err(error) => tracing::warn!(%pod, %error, "asking kube-scheduler to retry a gang member failed"),
        }
    }
}

/// Creates every Binding of a ticket concurrently, records the outcome in the book,
/// answers the members that were waiting, and undoes a partial bind. Each Binding is bounded
/// by the [`Binder`](crate::binder::Binder) (the API server's: within `BINDING_BUDGET_MS`).
async fn bind_all(state: &ServerState, ticket: &Ticket, members: Vec<MemberBind>) -> Result<(), String> {
    let binder = &state.binder;
    // Nothing is bound on the request's word alone: every member is first read from the API
    // server and must be the pod the request described (same uid, unbound, of a served
    // scheduler and namespace, the same demand). One that is not refuses the whole ticket
    // before any Binding: nothing is bound, so nothing is rolled back or deleted.
    let expected: Vec<Option<PodDemand>> = {
        let shared = state.lock();
        members.iter().map(|m| shared.demands.get(&m.pod.uid).cloned()).collect()
    };
    let verdicts =
        join_all(members.iter().zip(&expected).map(|(member, expected)| binder.verify(member, expected.as_ref())))
            .await;
    if verdicts.iter().any(Result::is_err) {
        return refuse(state, ticket, &members, &verdicts).await;
    }
    let outcomes = join_all(members.iter().map(|member| async move {
        let gpus = pod::gpus_annotation(&member.gpus);
        (member.pod.clone(), binder.bind(member, gpus).await.map_err(|error| error.to_string()))
    }))
    .await;
    let now = state.now_ms();
    let (finish, waiters) = {
        let mut shared = state.lock();
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
        BindFinish::RolledBack { failures, delete } if matches!(ticket, Ticket::Leader { .. }) && delete.is_empty() => {
            Err(format!(
            "{ticket}: the leader's Binding failed ({}); its replica stays reserved and the leader binds on its retry",
            failures.join("; ")
        ))
        }
        BindFinish::RolledBack { delete, failures } => Err(format!(
            "{}: not every member could be bound ({}); {} bound member(s) deleted so the gang is not half-bound",
            ticket,
            failures.join("; "),
            delete.len()
        )),
    };
    // The held calls are answered first: the undo below has no deadline of its own. Only a
    // member of this ticket hears its outcome; a call held for a pod that lost its slot
    // meanwhile (its uid not among the members) is told so, never told it was bound.
    for (uid, waiter) in waiters {
        let answer = if members.iter().any(|m| m.pod.uid == uid) {
            result.clone()
        } else {
            Err(format!(
                "{ticket}: this pod lost its place in the gang's plan while it waited; it will be scheduled again"
            ))
        };
        let _ = waiter.send(answer);
    }
    if let (BindFinish::RolledBack { delete, .. }, Err(message)) = (&finish, &result) {
        crate::binder::undo(binder.as_ref(), delete).await;
        // Every member told, and every pod deleted for it (a leader bound ahead too).
        let told =
            members.iter().map(|m| &m.pod).chain(delete.iter().filter(|p| !members.iter().any(|m| &m.pod == *p)));
        join_all(told.map(|pod| binder.event(pod, "GangBindRolledBack", message.clone()))).await;
    }
    result
}

/// A ticket whose members the API server did not all confirm ([`crate::binder::Binder::verify`]):
/// no Binding is made, the book keeps the reservation for the real pods' retry
/// ([`Book::bind_refused`]), a refused member is told why and the others which members were
/// refused.
async fn refuse(
    state: &ServerState,
    ticket: &Ticket,
    members: &[MemberBind],
    verdicts: &[Result<(), Refusal>],
) -> Result<(), String> {
    let refused: Vec<(&MemberBind, &Refusal)> =
        members.iter().zip(verdicts).filter_map(|(m, v)| v.as_ref().err().map(|r| (m, r))).collect();
    let not_those: Vec<String> = refused
        .iter()
        .filter(|(_, refusal)| !matches!(refusal, Refusal::Unconfirmed(_)))
        .map(|(m, _)| m.pod.uid.clone())
        .collect();
    let names: Vec<String> = refused.iter().map(|(m, _)| m.pod.to_string()).collect();
    let now = state.now_ms();
    let waiters = {
        let mut shared = state.lock();
        let demands: Vec<Option<PodDemand>> =
            refused.iter().map(|(m, _)| shared.demands.get(&m.pod.uid).cloned()).collect();
        if let Some(book) = shared.book.as_mut() {
            book.bind_refused(ticket, &not_those, now);
            // A pod someone else bound meanwhile: its watch event was passed over while its
            // bind was in flight here, so its GPUs on that node are counted now. It is no
            // member of the gang's plan (topoplace did not bind it there), so it is recorded
            // without its gang: never given up as a leader bound ahead.
            for ((member, refusal), demand) in refused.iter().zip(&demands) {
                if let (Refusal::BoundElsewhere { node, gpus }, Some(demand)) = (refusal, demand) {
                    let recorded = gpus.as_deref();
                    let pool = &demand.pool;
                    if let Err(error) =
                        book.observe_bound_in(member.pod.clone(), node, pool, recorded, demand.gpus, None)
                    {
                        tracing::warn!(%error, "a pod bound elsewhere could not be accounted");
                    }
                }
            }
        }
        for uid in &not_those {
            shared.demands.remove(uid);
        }
        ticket.gang().and_then(|gang| shared.waiters.remove(gang)).unwrap_or_default()
    };
    let answer = |uid: &str| match refused.iter().find(|(m, _)| m.pod.uid == uid) {
        Some((member, refusal)) => format!("{ticket}: {}: not bound: {refusal}", member.pod),
        None => format!(
            "{ticket}: not bound: the API server does not confirm {} of its gang; nothing was bound",
            names.join(", ")
        ),
    };
    tracing::warn!(%ticket, refused = ?names, "bind refused: members not confirmed by the API server");
    for (uid, waiter) in waiters {
        let _ = waiter.send(Err(answer(&uid)));
    }
    // This call (the member whose arrival started the ticket) hears every refusal and why.
    let reasons: Vec<String> = refused.iter().map(|(m, refusal)| format!("{}: {refusal}", m.pod)).collect();
    Err(format!("{ticket}: not bound: the API server does not confirm the request ({})", reasons.join("; ")))
}

const NOT_READY: &str = "topoplace has no cluster view yet (nodes not synced)";
const NOT_IN_VIEW: &str = "node is not in topoplace's view (no GPUs, or labels it cannot read)";

fn not_ready_filter() -> ExtenderFilterResult {
    ExtenderFilterResult { error: NOT_READY.into(), ..Default::default() }
}

/// Each name's host of `pool` (the resource the pod asks for), `None` for names the book
/// does not know with such devices.
fn resolve(book: &Book, names: &[String], pool: &DevicePool) -> Vec<Option<HostId>> {
    names.iter().map(|name| book.cluster().host_in(name, pool)).collect()
}

/// The request's node names: each item's `metadata.name` of `Nodes`, or `NodeNames`.
fn node_names(nodes: &Option<NodeList>, names: &mut Option<Vec<String>>) -> Result<Vec<String>, Rejection> {
    match (nodes, names.take()) {
        (Some(list), _) => list.names().map_err(|error| Rejection::bad_request(error.to_string())),
        (None, Some(names)) => Ok(names),
        (None, None) => Err(Rejection::bad_request("neither Nodes nor NodeNames is set".into())),
    }
}

/// The reply in the form of the request: `Nodes` (the input's objects, as sent) or
/// `NodeNames`.
fn with_passing(
    mut result: ExtenderFilterResult,
    nodes: Option<NodeList>,
    names: Vec<String>,
    passing: &[bool],
) -> ExtenderFilterResult {
    let keep = |index: &usize| passing.get(*index).copied().unwrap_or(false);
    match nodes {
        Some(list) => {
            let items = list.items.into_iter().enumerate().filter(|(i, _)| keep(i)).map(|(_, n)| n).collect();
            result.nodes = Some(NodeList { items });
        }
        None => {
            result.node_names = Some(names.into_iter().enumerate().filter(|(i, _)| keep(i)).map(|(_, n)| n).collect());
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
        let mut response = (self.status, json_body(&serde_json::json!({ "Error": self.message }))).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        response
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

/// A full queue or a stopped worker is 503 (kube-scheduler retries the pod); a job that
/// failed is 500.
impl From<BookWorkError> for Rejection {
    fn from(error: BookWorkError) -> Self {
        let status = match error {
            BookWorkError::Full | BookWorkError::Stopped => StatusCode::SERVICE_UNAVAILABLE,
            BookWorkError::Failed => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Rejection { status, message: error.to_string() }
    }
}

async fn read_json<T: DeserializeOwned>(verbs: &Verbs, verb: Verb, body: Body) -> Result<T, Rejection> {
    let name = verb.name();
    let nodes = verbs.state.hosts_in_view();
    // A preempt body without nodeCacheCapable carries its victims as whole pods, as many as
    // run on the candidate nodes: only the ceiling bounds it.
    let (limit, how) = match verb {
        Verb::Preempt => (verbs.config.body_bytes_max, "--body-limit".to_string()),
        Verb::Filter | Verb::Prioritize | Verb::Bind => (
            body_limit(nodes, verbs.config.body_bytes_max),
            format!(
                "{BODY_BYTES_BASE} + {BODY_BYTES_PER_NODE} for each of the {nodes} nodes in the view, at most \
                 --body-limit {}",
                verbs.config.body_bytes_max
            ),
        ),
    };
    let read =
        tokio::time::timeout(BODY_READ_TIMEOUT, axum::body::to_bytes(body, limit)).await.map_err(|_| Rejection {
            status: StatusCode::REQUEST_TIMEOUT,
            message: format!("{name}: the request body did not arrive within {} s", BODY_READ_TIMEOUT.as_secs()),
        })?;
    let bytes: Bytes = read.map_err(|_| Rejection {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        message: format!("{name}: request body is over the limit of {limit} bytes ({how})"),
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|error| Rejection::bad_request(format!("{name}: the body is not a valid request: {error}")))
}

async fn timed<T: Serialize>(verbs: &Verbs, verb: Verb, work: impl Future<Output = Result<T, Rejection>>) -> Response {
    let start = std::time::Instant::now();
    let outcome = match verbs.admit(verb) {
        Ok(_permit) => work.await,
        Err(rejection) => Err(rejection),
    };
    verbs.state.metrics.record(verb, start.elapsed(), outcome.is_ok());
    match outcome {
        Ok(reply) => json_body(&reply),
        Err(rejection) => rejection.into_response(),
    }
}

/// Why `pod`'s namespace is not one the extender serves ([`ExtenderConfig::namespaces`]).
fn unserved_namespace(verbs: &Verbs, pod: &k8s_openapi::api::core::v1::Pod) -> Option<String> {
    let served = verbs.config.namespaces.as_ref()?;
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    (!served.contains(namespace)).then(|| {
        format!("pod {}: namespace `{namespace}` is not one this extender serves (--namespaces)", pod::shown(pod))
    })
}

fn forbidden(message: String) -> Rejection {
    Rejection { status: StatusCode::FORBIDDEN, message }
}

async fn filter_handler(State(verbs): State<Verbs>, body: Body) -> Response {
    timed(&verbs, Verb::Filter, async {
        let args: ExtenderArgs = read_json(&verbs, Verb::Filter, body).await?;
        if let Some(error) = unserved_namespace(&verbs, &args.pod) {
            return Ok(ExtenderFilterResult { error, ..Default::default() });
        }
        filter(&verbs.state, verbs.pod_groups.as_deref(), args).await
    })
    .await
}

async fn prioritize_handler(State(verbs): State<Verbs>, body: Body) -> Response {
    timed(&verbs, Verb::Prioritize, async {
        let args: ExtenderArgs = read_json(&verbs, Verb::Prioritize, body).await?;
        if let Some(error) = unserved_namespace(&verbs, &args.pod) {
            return Err(forbidden(error));
        }
        prioritize(&verbs.state, verbs.pod_groups.as_deref(), args).await
    })
    .await
}

async fn preempt_handler(State(verbs): State<Verbs>, body: Body) -> Response {
    timed(&verbs, Verb::Preempt, async {
        let args: ExtenderPreemptionArgs = read_json(&verbs, Verb::Preempt, body).await?;
        if let Some(error) = unserved_namespace(&verbs, &args.pod) {
            return Err(forbidden(error));
        }
        preempt(&verbs.state, verbs.pod_groups.as_deref(), args).await
    })
    .await
}

async fn bind_handler(State(verbs): State<Verbs>, body: Body) -> Response {
    let start = std::time::Instant::now();
    let permit = match verbs.admit(Verb::Bind) {
        Ok(permit) => permit,
        Err(rejection) => {
            verbs.state.metrics.record(Verb::Bind, start.elapsed(), false);
            return rejection.into_response();
        }
    };
    let args: ExtenderBindingArgs = match read_json(&verbs, Verb::Bind, body).await {
        Ok(args) => args,
        Err(rejection) => {
            verbs.state.metrics.record(Verb::Bind, start.elapsed(), false);
            return rejection.into_response();
        }
    };
    let reply = bind(&verbs, args, permit).await;
    verbs.state.metrics.record(Verb::Bind, start.elapsed(), reply.error.is_empty());
    json_body(&reply)
}

/// Over TLS, a connection that presented no client certificate reaches the probes only:
/// every other route answers it 403 (no HTTP authentication scheme applies: the credential
/// is the TLS client certificate) ([`tls::ClientCert::Absent`]). Plain HTTP
/// (`--insecure-http`) carries no [`tls::ClientCert`] and passes.
async fn require_client_cert(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    if matches!(request.extensions().get::<tls::ClientCert>(), Some(tls::ClientCert::Absent)) {
        return Rejection {
            status: StatusCode::FORBIDDEN,
            message: format!(
                "{}: a client certificate signed by the extender's client CA (--client-ca) is required",
                request.uri().path()
            ),
        }
        .into_response();
    }
    next.run(request).await
}

/// Over TLS with [`ExtenderConfig::verb_clients`], the verbs answer 403 to a certificate that
/// names none of them.
async fn require_verb_client(
    State(verbs): State<Verbs>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let (Some(allowed), Some(tls::ClientCert::Verified(names))) =
        (&verbs.config.verb_clients, request.extensions().get::<tls::ClientCert>())
    {
        if !names.iter().any(|name| allowed.contains(name)) {
            let allowed: Vec<&str> = allowed.iter().map(String::as_str).collect();
            return forbidden(format!(
                "{}: the client certificate names {:?}; only {} may call the verbs (--verb-clients)",
                request.uri().path(),
                names,
                allowed.join(", ")
            ))
            .into_response();
        }
    }
    next.run(request).await
}

/// The HTTP routes over `state`, verbs under `config.prefix`; with `pod_groups` (a server on
/// an API server), a pod's gang is sized by the PodGroup object it names. The verbs,
/// `/metrics` and `/state` are behind [`require_client_cert`]; `/healthz` and `/readyz` are
/// not (the kubelet's probes present no certificate).
pub fn router(state: Arc<ServerState>, config: ExtenderConfig, pod_groups: Option<Arc<PodGroups>>) -> Router {
    let prefix = config.prefix.trim_end_matches('/').to_string();
    let semaphore = |verb: Verb| {
        Arc::new(tokio::sync::Semaphore::new(config.in_flight.of(verb).min(tokio::sync::Semaphore::MAX_PERMITS)))
    };
    let in_flight = Arc::new(Verb::ALL.map(semaphore));
    let verbs = Verbs { state, config: Arc::new(config), pod_groups, in_flight };
    Router::new()
        .route(&format!("{prefix}/filter"), post(filter_handler))
        .route(&format!("{prefix}/prioritize"), post(prioritize_handler))
        .route(&format!("{prefix}/preempt"), post(preempt_handler))
        .route(&format!("{prefix}/bind"), post(bind_handler))
        .route_layer(axum::middleware::from_fn_with_state(verbs.clone(), require_verb_client))
        .route(
            "/metrics",
            get(|State(verbs): State<Verbs>| async move {
                let text = {
                    let shared = verbs.state.lock();
                    verbs.state.metrics.render(shared.book.as_ref())
                };
                ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
            }),
        )
        .route("/state", get(|State(verbs): State<Verbs>| async move { json_body(&verbs.state.state_json()) }))
        .route_layer(axum::middleware::from_fn(require_client_cert))
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(verbs): State<Verbs>| async move {
                if verbs.state.is_ready() {
                    (StatusCode::OK, "ok")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "node and pod caches not synced")
                }
            }),
        )
        .with_state(verbs)
}

/// Serves the extender on `listener` until `shutdown` resolves, then stops taking
/// connections and lets requests in flight finish (binds held for their gang included, up to
/// their hold). Over HTTPS with client certificates when `tls` is given ([`tls::serve`]),
/// plain HTTP otherwise. Expiry is the server's ([`ServerState::run_expiry`]), not this
/// function's.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<ServerState>,
    config: ExtenderConfig,
    pod_groups: Option<Arc<PodGroups>>,
    tls: Option<tls::ExtenderTls>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = router(state, config, pod_groups);
    match tls {
        Some(tls) => tls::serve(listener, tls, router, shutdown).await,
        None => axum::serve(listener, router).with_graceful_shutdown(shutdown).await,
    }
}
