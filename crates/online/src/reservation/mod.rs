//! The reservation book: the online placement state that the extender (and later the
//! secondary scheduler) share. It owns the cluster view, the GPU ledger, the gangs that are
//! planned and reserved but not yet bound, and the pods that are bound; it decides filter,
//! prioritize, bind and preempt answers in domain terms (host ids, pods by uid, reasons).
//!
//! Pure and synchronous like the rest of the core: time comes in as `now_ms` from the
//! caller, nothing here blocks or does I/O, and the same calls in the same order give the
//! same answers. The adapter holds it under one lock and does the HTTP and API-server work.
//!
//! Ledger holders ([`Holder`]): a reserved gang holds its GPUs as `Holder::Gang(key)`, a
//! bound pod as `Holder::Pod(uid)`. A gang moves from the first to the second only when every member's Binding
//! succeeded, so at any instant a gang is held whole (reserved or bound) or not at all.

mod api;
#[cfg(test)]
mod tests;

pub use api::{
    ApiReservation, ClusterState, DomainState, Explained, GangRequest, HostState, NodeFit, PlanOptions, PlanOutcome,
    Released, RequestError, ReservationState,
};

use std::collections::BTreeMap;

use thiserror::Error;

use topoplace_engine::ledger::{indices_mask, mask_indices, merge_by_host, Ledger, LedgerError};
use topoplace_engine::placement::{
    HostRejection, HostVerdict, MemberPlacement, PlaceRequest, Planner, PlannerConfig, PlannerParts,
};
use topoplace_engine::topology::{Cluster, GpuMask, HostId};
use topoplace_engine::workload::{Gang, GangSpec, MemoryNeed, Scope, WorkloadError};

/// How long a planned gang keeps its GPUs after its last sign of life (planned, a member
/// filtered, a member's held bind answered) while none of its members' binds is held, in ms.
pub const RESERVATION_TTL_MS_DEFAULT: u64 = 30_000;

/// The longest a gang member's bind is held waiting for the rest of its gang, in ms; then it
/// is answered with an error and the member keeps its place in the plan for kube-scheduler's
/// retry. kube-scheduler abandons an extender call after the extender's `httpTimeout`
/// (`pkg/scheduler/core/extender.go`: the HTTP client's `Timeout`); a hold plus
/// [`BINDING_BUDGET_MS`] must fit in it, so every held bind is answered before kube-scheduler
/// hangs up, with 5 s to spare for a request that waited in the book's queue. The shipped
/// `httpTimeout` is 60 s (`scheduler-config/extender/`), and a test pins that they agree.
pub const BIND_HOLD_MS_DEFAULT: u64 = 40_000;

/// How many bind holds a gang gets to assemble at bind: from its first member's held bind, the
/// whole gang must reach bind within `HOLD_ROUNDS_MAX` × [`BookConfig::bind_hold_ms`] (2 min
/// by default), or the reservation is released and its held binds answered, so a gang whose
/// member never comes (deleted while parked, never created) cannot hold its GPUs for ever. A
/// reservation made through the placement API keeps the expiry its caller asked for instead.
/// Three holds cover kube-scheduler's own retry of a parked pod (up to 90 s before 1.28).
pub const HOLD_ROUNDS_MAX: u64 = 3;

/// The time a gang's Bindings may take once its last member reached bind, in ms: the held
/// members' calls must still be open when they are answered, so this is what the hold leaves
/// of kube-scheduler's `httpTimeout`. The extender gives each Binding (with its read-back)
/// at most this long.
pub const BINDING_BUDGET_MS: u64 = 15_000;

/// A pod as the book knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodIdentity {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl std::fmt::Display for PodIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Which gang a pod belongs to (read from its labels by the adapter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GangMembership {
    /// `namespace/name`: gangs are namespaced like their pods.
    pub key: String,
    pub size: u32,
    /// The member's rank when the pod says it (`topoplace.io/rank`, LWS worker index).
    pub rank: Option<u32>,
}

/// What one pod needs, in the core's terms.
#[derive(Debug, Clone, PartialEq)]
pub struct PodDemand {
    pub pod: PodIdentity,
    pub gpus: u32,
    pub memory: MemoryNeed,
    /// Tensor parallelism of the whole replica (`topoplace.io/tensor-parallel`). `None`
    /// means the pod did not say: no NVLink is required (a data-parallel or PCIe job), though
    /// the connectivity score still prefers well-linked GPUs.
    pub tensor_parallel: Option<u32>,
    pub pipeline_parallel: Option<u32>,
    pub required: Option<Scope>,
    pub preferred: Option<Scope>,
    pub gang: Option<GangMembership>,
}

impl PodDemand {
    /// The gang this pod is part of, as the planner sees it (a single pod is a gang of one).
    pub fn gang(&self) -> Result<Gang, BookError> {
        let (name, members) = match &self.gang {
            Some(gang) => (gang.key.clone(), gang.size),
            None => (format!("pod:{}", self.pod.uid), 1),
        };
        let spec = GangSpec {
            name: name.clone(),
            replicas: 1,
            members,
            gpus_per_member: self.gpus,
            tensor_parallel: self.tensor_parallel.unwrap_or(1),
            pipeline_parallel: self.pipeline_parallel.unwrap_or(1),
            memory: self.memory.clone(),
            required: self.required.clone(),
            preferred: self.preferred.clone(),
        };
        spec.validate().map_err(|source| BookError::Demand { pod: self.pod.to_string(), source })?;
        spec.expand().into_iter().next().ok_or_else(|| BookError::Demand {
            pod: self.pod.to_string(),
            source: WorkloadError::Zero { gang: name, field: "members" },
        })
    }
}

/// Input the book cannot act on. Nothing has been reserved or changed when one is returned.
#[derive(Debug, Error, PartialEq)]
pub enum BookError {
    #[error("pod {pod}: {source}")]
    Demand {
        pod: String,
        #[source]
        source: WorkloadError,
    },
    #[error(
        "pod {pod}: gang `{gang}` was planned for {planned} members of {planned_gpus} GPUs, \
         but this pod says {size} members of {gpus} GPUs"
    )]
    GangShapeMismatch { pod: String, gang: String, planned: u32, planned_gpus: u32, size: u32, gpus: u32 },
    #[error("pod {pod}: gang `{gang}` already has all {size} members planned and at bind or filtered (a member was recreated? its slot frees when the reservation ends)")]
    GangFull { pod: String, gang: String, size: u32 },
    #[error(
        "pod {pod}: nothing is planned for it (its gang's reservation expired or was never made); filter it again"
    )]
    NotPlanned { pod: String },
    #[error("pod {pod}: planned on node `{planned}`, but bind asks for `{asked}`")]
    WrongNode { pod: String, planned: String, asked: String },
    #[error("pod {pod}: node `{node}` is not in the cluster view")]
    UnknownNode { pod: String, node: String },
    #[error("pod {pod}: no GPUs of node `{node}` can be given to it now: {reason}")]
    NoRoomAtBind { pod: String, node: String, reason: String },
    #[error("pod {pod}: {source}")]
    Ledger {
        pod: String,
        #[source]
        source: LedgerError,
    },
    #[error("gang `{gang}`: its Bindings are already in flight")]
    InFlight { gang: String },
    #[error("gang `{gang}`: {pods} pods for {members} planned members")]
    MemberCount { gang: String, pods: usize, members: usize },
}

/// One node's answer to a filter call.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeVerdict {
    Pass,
    /// Does not fit now; evicting pods could change that (kube-scheduler's `FailedNodes`).
    Fail(String),
    /// Does not fit and preemption would not help (`FailedAndUnresolvableNodes`).
    Unresolvable(String),
}

/// What a pod arriving at bind should do next.
#[derive(Debug, Clone, PartialEq)]
pub enum BindStep {
    /// Other members of the gang have not reached bind yet: wait for [`Book::bind_finished`]
    /// (or the hold's end, [`Expired::Hold`]). `retry_now` names the members still missing
    /// when every one of them is a pod whose own held bind lapsed before: they sit in
    /// kube-scheduler's queue, and it should retry them now rather than at its next flush.
    Wait { gang: String, retry_now: Vec<PodIdentity> },
    /// Create these Bindings now (all members of the gang, or the one pod), then report the
    /// outcome with [`Book::bind_finished`].
    Bind { ticket: Ticket, members: Vec<MemberBind> },
}

/// One Binding to create.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberBind {
    pub pod: PodIdentity,
    pub host: HostId,
    pub node: String,
    pub gpus: Vec<u8>,
}

/// What happened once the Bindings of a ticket were tried.
#[derive(Debug, Clone, PartialEq)]
pub enum BindFinish {
    /// Every member is bound; its GPUs are now held per pod.
    Bound,
    /// Some Binding failed: the reservation is released, and these members that did bind
    /// must be deleted (their controllers recreate them) so the gang is not half-bound.
    RolledBack { delete: Vec<PodIdentity>, failures: Vec<String> },
}

/// What [`Book::expire`] (and a cluster change, an API release) ended: a reservation dropped,
/// or one member's held bind that reached its hold limit. The extender answers the binds
/// held for them with an error.
#[derive(Debug, Clone, PartialEq)]
pub enum Expired {
    /// The reservation is gone and its GPUs free; `members_at_bind` were holding binds.
    Reservation { gang: String, members_at_bind: Vec<PodIdentity> },
    /// `pod`'s bind was held for [`BookConfig::bind_hold_ms`] while `waiting_for` members of
    /// `gang` had not reached bind; it is answered with an error, and the pod keeps its slot
    /// in the plan (the reservation lives on for [`BookConfig::reservation_ttl_ms`]) so that
    /// kube-scheduler's retry binds it with the rest.
    Hold { gang: String, pod: PodIdentity, waiting_for: u32, held_ms: u64 },
}

impl Expired {
    /// The gang the answered binds belong to.
    pub fn gang(&self) -> &str {
        match self {
            Expired::Reservation { gang, .. } | Expired::Hold { gang, .. } => gang,
        }
    }
}

/// A preemption candidate node and the uids kube-scheduler proposes to evict there.
#[derive(Debug, Clone, PartialEq)]
pub struct PreemptCandidate {
    pub host: HostId,
    pub victims: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct BookConfig {
    /// See [`RESERVATION_TTL_MS_DEFAULT`].
    pub reservation_ttl_ms: u64,
    /// See [`BIND_HOLD_MS_DEFAULT`].
    pub bind_hold_ms: u64,
    pub planner: PlannerConfig,
}

impl Default for BookConfig {
    fn default() -> Self {
        BookConfig {
            reservation_ttl_ms: RESERVATION_TTL_MS_DEFAULT,
            bind_hold_ms: BIND_HOLD_MS_DEFAULT,
            planner: PlannerConfig::default(),
        }
    }
}

/// Counters exported as metrics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BookStats {
    pub gangs_reserved: u64,
    pub gangs_bound: u64,
    pub gangs_rolled_back: u64,
    pub gangs_expired: u64,
    /// Held binds answered unbound because the rest of their gang had not reached bind
    /// within [`BookConfig::bind_hold_ms`].
    pub bind_holds_lapsed: u64,
    pub pods_bound: u64,
    /// Ledger changes that the book's own state said must succeed and that failed: each is a
    /// bug, kept in [`Book::faults`] and reported by [`Book::check`].
    pub ledger_faults: u64,
}

/// How many ledger faults the book keeps the text of (the count goes on past it).
pub const LEDGER_FAULTS_KEPT_MAX: usize = 16;

#[derive(Debug, Clone)]
struct Slot {
    host: HostId,
    gpus: GpuMask,
    pod: Option<PodIdentity>,
    /// The member's bind is open (held, or its Binding in flight).
    at_bind: bool,
    /// With `at_bind` on a waiting reservation: when the held bind is answered unbound.
    held_until_ms: u64,
    /// The pod's held bind was answered unbound ([`Expired::Hold`]) and it has not reached
    /// bind since: kube-scheduler will retry it.
    lapsed: bool,
}

impl Slot {
    /// A member's place in a new plan, no pod in it yet.
    fn planned(host: HostId, gpus: GpuMask) -> Self {
        Slot { host, gpus, pod: None, at_bind: false, held_until_ms: 0, lapsed: false }
    }
}

#[derive(Debug, Clone)]
struct GangReservation {
    gang: Gang,
    slots: Vec<Slot>,
    expires_at_ms: u64,
    /// Bindings are in flight: the reservation neither expires nor re-plans.
    binding: bool,
    /// Set when the placement API reserved it (the extender's own plans have none).
    origin: Option<ApiReservation>,
    /// When its first member's bind was held: the gang must be whole at bind within
    /// [`HOLD_ROUNDS_MAX`] holds of it, or it is released ([`Book::expire`]).
    first_held_ms: Option<u64>,
}

#[derive(Debug, Clone)]
struct BoundPod {
    pod: PodIdentity,
    node: String,
    gpus: GpuMask,
    gang: Option<String>,
    /// When topoplace bound it (0 for pods observed bound), for [`Book::forget_unlisted`].
    bound_at_ms: u64,
}

/// The online state: cluster view, ledger, reservations, bound pods.
pub struct Book {
    cluster: Cluster,
    ledger: Ledger<Holder>,
    parts: Option<PlannerParts>,
    config: BookConfig,
    gangs: BTreeMap<String, GangReservation>,
    /// Single pods chosen at bind, Bindings in flight, by uid ([`Ticket::Pod`]).
    singles: BTreeMap<String, MemberBind>,
    bound: BTreeMap<String, BoundPod>,
    stats: BookStats,
    /// Ledger changes of the cluster views before the current one, so that
    /// [`Book::generation`] keeps growing across [`Book::replace_cluster`].
    earlier_changes: u64,
    /// Reservations the placement API has made (their ids count up from 1).
    api_reservations: u64,
    /// The first [`LEDGER_FAULTS_KEPT_MAX`] ledger faults (see [`BookStats::ledger_faults`]).
    faults: Vec<String>,
}

/// Who holds GPUs in the book's ledger. A gang is held whole by `Gang` while reserved or
/// binding, then by one `Pod` per member once every Binding succeeded: never both, never part.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Holder {
    /// A reserved gang, by its key `namespace/name`.
    Gang(String),
    /// A bound pod, or a single pod whose Binding is in flight, by uid.
    Pod(String),
}

/// `gang:{key}` or `pod:{uid}`: how `/state` and errors name a holder (never parsed back).
impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Holder::Gang(key) => write!(f, "gang:{key}"),
            Holder::Pod(uid) => write!(f, "pod:{uid}"),
        }
    }
}

/// What a set of Bindings in flight settles, handed out with [`BindStep::Bind`] and given
/// back to [`Book::bind_finished`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Ticket {
    /// Every member of the reserved gang with this key.
    Gang(String),
    /// One pod (by uid) whose GPUs were chosen at bind, held by [`Holder::Pod`] meanwhile.
    Pod(String),
    /// A pod (by uid) the book already has bound: a repeated bind to its node, nothing held.
    Bound(String),
}

/// `gang:{key}`, `pod:{uid}` or `bound:{uid}`, for logs and messages (never parsed back).
impl std::fmt::Display for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ticket::Gang(key) => write!(f, "gang:{key}"),
            Ticket::Pod(uid) => write!(f, "pod:{uid}"),
            Ticket::Bound(uid) => write!(f, "bound:{uid}"),
        }
    }
}

impl Ticket {
    /// The gang key of a gang's ticket.
    pub fn gang(&self) -> Option<&str> {
        match self {
            Ticket::Gang(key) => Some(key),
            Ticket::Pod(_) | Ticket::Bound(_) => None,
        }
    }
}

fn gang_holder(key: &str) -> Holder {
    Holder::Gang(key.to_string())
}

fn pod_holder(uid: &str) -> Holder {
    Holder::Pod(uid.to_string())
}

impl Book {
    pub fn new(cluster: Cluster, config: BookConfig) -> Self {
        let ledger = Ledger::empty(&cluster);
        Book {
            cluster,
            ledger,
            parts: None,
            config,
            gangs: BTreeMap::new(),
            singles: BTreeMap::new(),
            bound: BTreeMap::new(),
            stats: BookStats::default(),
            earlier_changes: 0,
            api_reservations: 0,
            faults: Vec::new(),
        }
    }

    /// Records a ledger change that the book's state said must succeed and did not. Nothing
    /// is dropped silently: the fault is counted, kept (the first few) and makes
    /// [`Book::check`] fail, so the simulation tests and `/metrics` see it; the book goes on
    /// with the ledger as it is, which is still consistent in itself (the ledger changes
    /// nothing on an error).
    fn ledger_fault(&mut self, context: &str, error: LedgerError) {
        self.stats.ledger_faults += 1;
        if self.faults.len() < LEDGER_FAULTS_KEPT_MAX {
            self.faults.push(format!("{context}: {error}"));
        }
    }

    /// The ledger faults recorded so far (the first [`LEDGER_FAULTS_KEPT_MAX`]).
    pub fn faults(&self) -> &[String] {
        &self.faults
    }

    /// Grows whenever the cluster view or the ledger changes: what capacity watchers compare.
    pub fn generation(&self) -> u64 {
        self.earlier_changes + self.ledger.changes()
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    pub fn ledger(&self) -> &Ledger<Holder> {
        &self.ledger
    }

    pub fn stats(&self) -> &BookStats {
        &self.stats
    }

    pub fn config(&self) -> &BookConfig {
        &self.config
    }

    /// Gangs reserved whose members have not all reached bind.
    pub fn gangs_waiting(&self) -> usize {
        self.gangs.values().filter(|g| !g.binding).count()
    }

    fn with_planner<T>(&mut self, work: impl FnOnce(&mut Planner, &mut Ledger<Holder>) -> T) -> T {
        let mut planner = match self.parts.take() {
            Some(parts) => Planner::from_parts(&self.cluster, parts),
            None => Planner::new(&self.cluster, self.config.planner.clone()),
        };
        let out = work(&mut planner, &mut self.ledger);
        self.parts = Some(planner.into_parts());
        out
    }

    /// Replaces the cluster view (nodes added, removed or relabelled). Bound pods and
    /// reservations are carried over by node name; a reservation that no longer fits is
    /// dropped and returned (its waiting members must be answered), a bound pod whose node
    /// is gone is forgotten.
    pub fn replace_cluster(&mut self, cluster: Cluster) -> Vec<Expired> {
        let old = std::mem::replace(&mut self.cluster, cluster);
        self.earlier_changes += self.ledger.changes() + 1;
        self.ledger = Ledger::empty(&self.cluster);
        self.parts = None;
        let bound = std::mem::take(&mut self.bound);
        for (uid, pod) in bound {
            let Some(host) = self.cluster.host_id(&pod.node) else { continue };
            if self.ledger.reserve(&pod_holder(&uid), &[(host, pod.gpus)]).is_ok() {
                self.bound.insert(uid, pod);
            }
        }
        let singles = std::mem::take(&mut self.singles);
        for (uid, member) in singles {
            let Some(host) = self.cluster.host_id(&member.node) else { continue };
            if self.ledger.reserve(&pod_holder(&uid), &[(host, indices_mask(&member.gpus))]).is_ok() {
                self.singles.insert(uid, MemberBind { host, ..member });
            }
        }
        let mut dropped = Vec::new();
        let gangs = std::mem::take(&mut self.gangs);
        for (key, mut reservation) in gangs {
            let mut request = Vec::new();
            let mut moved = true;
            for slot in &mut reservation.slots {
                match self.cluster.host_id(&old.host(slot.host).name) {
                    Some(host) => {
                        slot.host = host;
                        request.push((host, slot.gpus));
                    }
                    None => moved = false,
                }
            }
            let merged = merge_by_host(request);
            if moved && self.ledger.reserve(&gang_holder(&key), &merged).is_ok() {
                self.gangs.insert(key, reservation);
            } else {
                dropped.push(Expired::Reservation { gang: key, members_at_bind: at_bind(&reservation) });
            }
        }
        dropped
    }

    /// The secondary scheduler's plan for `gang` on the allowed hosts; nothing is held yet.
    pub fn plan_within(
        &mut self,
        gang: &Gang,
        allowed: &[bool],
    ) -> Result<topoplace_engine::placement::GangPlacement, topoplace_engine::placement::Unplaced> {
        self.with_planner(|planner, ledger| planner.place(ledger, PlaceRequest::new(gang).within(Some(allowed))))
    }

    /// Of the allowed hosts, those on which `gang` could take GPUs if GPUs were freed there
    /// (its product, memory class and links fit): what a starving gang has first call on.
    pub fn hosts_wanted_by(&mut self, gang: &Gang, allowed: &[bool]) -> Vec<bool> {
        self.with_planner(|planner, ledger| {
            allowed
                .iter()
                .enumerate()
                .map(|(host, &ok)| {
                    ok && planner
                        .host_units(ledger, gang, host as HostId)
                        .err()
                        .is_none_or(|(reason, _)| reason.resolvable_by_freeing_gpus())
                })
                .collect()
        })
    }

    /// The planned hosts of a gang reserved and not yet binding (through the placement API),
    /// in member order.
    pub fn reserved_hosts(&self, gang: &str) -> Option<Vec<HostId>> {
        let reservation = self.gangs.get(gang).filter(|g| !g.binding)?;
        Some(reservation.slots.iter().map(|s| s.host).collect())
    }

    /// The secondary scheduler's hold: `pods` (in rank order, one per planned member) get
    /// `placement`'s members, held and in flight at once (the scheduler binds them all
    /// itself, nobody waits for bind calls). A gang reserved already (through the placement
    /// API) is adopted instead and `placement` is ignored. Finish with [`Book::bind_finished`].
    pub fn hold_for_bind(
        &mut self,
        gang_key: Option<&str>,
        gang: Gang,
        placement: &[(HostId, GpuMask)],
        pods: &[PodIdentity],
        now_ms: u64,
    ) -> Result<(Ticket, Vec<MemberBind>), BookError> {
        let first = pods.first().map(|p| p.to_string()).unwrap_or_default();
        let Some(key) = gang_key else {
            let (Some(pod), [(host, mask)]) = (pods.first(), placement) else {
                return Err(BookError::MemberCount { gang: first, pods: pods.len(), members: placement.len() });
            };
            self.ledger
                .reserve(&pod_holder(&pod.uid), &[(*host, *mask)])
                .map_err(|source| BookError::Ledger { pod: pod.to_string(), source })?;
            let member = MemberBind {
                pod: pod.clone(),
                host: *host,
                node: self.cluster.host(*host).name.clone(),
                gpus: mask_indices(*mask),
            };
            self.singles.insert(pod.uid.clone(), member.clone());
            return Ok((Ticket::Pod(pod.uid.clone()), vec![member]));
        };
        if !self.gangs.contains_key(key) {
            if placement.len() != pods.len() {
                return Err(BookError::MemberCount { gang: key.into(), pods: pods.len(), members: placement.len() });
            }
            self.ledger
                .reserve(&gang_holder(key), &merge_by_host(placement.iter().copied()))
                .map_err(|source| BookError::Ledger { pod: first.clone(), source })?;
            let slots = placement.iter().map(|&(host, gpus)| Slot::planned(host, gpus)).collect();
            self.gangs.insert(
                key.to_string(),
                GangReservation {
                    gang,
                    slots,
                    expires_at_ms: now_ms,
                    binding: false,
                    origin: None,
                    first_held_ms: None,
                },
            );
            self.stats.gangs_reserved += 1;
        }
        let cluster = &self.cluster;
        let Some(reservation) = self.gangs.get_mut(key) else {
            return Err(BookError::NotPlanned { pod: first });
        };
        if reservation.binding {
            return Err(BookError::InFlight { gang: key.into() });
        }
        if reservation.slots.len() != pods.len() {
            return Err(BookError::MemberCount {
                gang: key.into(),
                pods: pods.len(),
                members: reservation.slots.len(),
            });
        }
        reservation.binding = true;
        let mut members = Vec::with_capacity(pods.len());
        for (slot, pod) in reservation.slots.iter_mut().zip(pods) {
            slot.pod = Some(pod.clone());
            slot.at_bind = true;
            members.push(MemberBind {
                pod: pod.clone(),
                host: slot.host,
                node: cluster.host(slot.host).name.clone(),
                gpus: mask_indices(slot.gpus),
            });
        }
        Ok((Ticket::Gang(key.to_string()), members))
    }

    /// Answers held binds whose hold ran out ([`Expired::Hold`]: the member keeps its slot and
    /// the reservation lives [`BookConfig::reservation_ttl_ms`] more, for kube-scheduler's
    /// retry), then drops the reservations that hold no bind and whose time ran out
    /// ([`Expired::Reservation`]). A reservation never expires under a held bind, and one
    /// whose Bindings are in flight is left alone.
    pub fn expire(&mut self, now_ms: u64) -> Vec<Expired> {
        let (ttl, hold) = (self.config.reservation_ttl_ms, self.config.bind_hold_ms);
        let mut expired = Vec::new();
        let mut due = Vec::new();
        for (key, reservation) in self.gangs.iter_mut().filter(|(_, g)| !g.binding) {
            if assembly_limit(reservation, hold).is_some_and(|limit| limit <= now_ms) {
                // Not whole at bind after its rounds of holds: released, held binds answered.
                due.push(key.clone());
                continue;
            }
            let waiting_for = reservation.slots.iter().filter(|s| !s.at_bind).count() as u32;
            let mut lapsed = 0;
            for slot in reservation.slots.iter_mut().filter(|s| s.at_bind && s.held_until_ms <= now_ms) {
                slot.at_bind = false;
                slot.lapsed = true;
                lapsed += 1;
                if let Some(pod) = slot.pod.clone() {
                    expired.push(Expired::Hold { gang: key.clone(), pod, waiting_for, held_ms: hold });
                }
            }
            if lapsed > 0 {
                self.stats.bind_holds_lapsed += lapsed;
                reservation.expires_at_ms = reservation.expires_at_ms.max(now_ms.saturating_add(ttl));
            }
            if !reservation.slots.iter().any(|s| s.at_bind) && reservation.expires_at_ms <= now_ms {
                due.push(key.clone());
            }
        }
        for key in due {
            if let Some(reservation) = self.drop_reservation(&key) {
                self.stats.gangs_expired += 1;
                expired.push(Expired::Reservation { gang: key, members_at_bind: at_bind(&reservation) });
            }
        }
        expired
    }

    /// The next instant [`Book::expire`] has work: the earliest held bind's hold limit, a
    /// reservation's assembly limit or, for a reservation holding no bind, its expiry.
    pub fn next_expiry_ms(&self) -> Option<u64> {
        let hold = self.config.bind_hold_ms;
        self.gangs.values().filter(|g| !g.binding).map(|g| next_deadline(g, hold)).min()
    }

    /// When the reservation of `gang` next needs [`Book::expire`], if it is waiting.
    pub fn expiry_of(&self, gang: &str) -> Option<u64> {
        let hold = self.config.bind_hold_ms;
        self.gangs.get(gang).filter(|g| !g.binding).map(|g| next_deadline(g, hold))
    }

    fn drop_reservation(&mut self, key: &str) -> Option<GangReservation> {
        let reservation = self.gangs.remove(key)?;
        // The holder exists exactly while the reservation does.
        if let Err(error) = self.ledger.release(&gang_holder(key)) {
            self.ledger_fault("dropping a gang reservation", error);
        }
        Some(reservation)
    }

    /// kube-scheduler's filter for one pod over the nodes it offers. For a gang member, the
    /// first call plans and reserves the whole gang; later calls answer from the plan.
    pub fn filter(
        &mut self,
        demand: &PodDemand,
        offered: &[HostId],
        now_ms: u64,
    ) -> Result<Vec<NodeVerdict>, BookError> {
        let gang = demand.gang()?;
        if let Some(bound) = self.bound.get(&demand.pod.uid) {
            let node = bound.node.clone();
            return Ok(self.only_node(offered, &node, &format!("pod is already bound to `{node}`")));
        }
        let Some(membership) = demand.gang.clone() else {
            let fits = self.with_planner(|planner, ledger| planner.fit_hosts(ledger, &gang, offered));
            return Ok(fits.into_iter().map(verdict_of).collect());
        };
        let key = membership.key.clone();
        if let Some(reservation) = self.gangs.get(&key) {
            check_shape(demand, &reservation.gang, &membership)?;
            let planned_off_offer = self
                .slot_of(&key, &demand.pod.uid)
                .map(|slot| !offered.contains(&reservation.slots[slot].host))
                .unwrap_or(false);
            let any_at_bind = reservation.binding || reservation.slots.iter().any(|s| s.at_bind);
            if planned_off_offer && !any_at_bind {
                // kube-scheduler no longer offers the planned node: plan the gang again.
                self.drop_reservation(&key);
            }
        }
        if !self.gangs.contains_key(&key) {
            let cluster_hosts = self.cluster.hosts.len();
            let mut mask = vec![false; cluster_hosts];
            for &host in offered {
                if let Some(flag) = mask.get_mut(host as usize) {
                    *flag = true;
                }
            }
            let planned = self
                .with_planner(|planner, ledger| planner.place(ledger, PlaceRequest::new(&gang).within(Some(&mask))));
            let placement = match planned {
                Ok(placement) => placement,
                Err(unplaced) => {
                    let reason = format!("gang `{key}` ({} GPUs) does not fit: {}", gang.total_gpus(), unplaced.reason);
                    let per_host: Vec<_> = self.with_planner(|planner, ledger| {
                        offered.iter().map(|&h| planner.host_units(ledger, &gang, h).err()).collect()
                    });
                    return Ok(per_host
                        .into_iter()
                        .map(|rejection| match rejection {
                            Some((r, text)) if !r.resolvable_by_freeing_gpus() => NodeVerdict::Unresolvable(text),
                            _ => NodeVerdict::Fail(reason.clone()),
                        })
                        .collect());
                }
            };
            self.ledger
                .reserve(&gang_holder(&key), &placement.holding())
                .map_err(|source| BookError::Ledger { pod: demand.pod.to_string(), source })?;
            let slots = placement.members.iter().map(|m: &MemberPlacement| Slot::planned(m.host, m.gpus)).collect();
            self.gangs.insert(
                key.clone(),
                GangReservation {
                    gang,
                    slots,
                    expires_at_ms: now_ms + self.config.reservation_ttl_ms,
                    binding: false,
                    origin: None,
                    first_held_ms: None,
                },
            );
            self.stats.gangs_reserved += 1;
        }
        let slot = self.assign_slot(&key, demand, &membership, now_ms)?;
        let Some(reservation) = self.gangs.get(&key) else {
            return Err(BookError::NotPlanned { pod: demand.pod.to_string() });
        };
        let host = reservation.slots[slot].host;
        let node = self.cluster.host(host).name.clone();
        if !offered.contains(&host) {
            let reason = format!("gang `{key}` has this member planned on `{node}`, which was not offered");
            return Ok(offered.iter().map(|_| NodeVerdict::Fail(reason.clone())).collect());
        }
        Ok(self.only_node(offered, &node, &format!("gang `{key}` has this member planned on `{node}`")))
    }

    fn only_node(&self, offered: &[HostId], node: &str, why: &str) -> Vec<NodeVerdict> {
        offered
            .iter()
            .map(|&h| {
                if self.cluster.host(h).name == node {
                    NodeVerdict::Pass
                } else {
                    NodeVerdict::Unresolvable(why.to_string())
                }
            })
            .collect()
    }

    fn slot_of(&self, key: &str, uid: &str) -> Option<usize> {
        self.gangs.get(key)?.slots.iter().position(|s| s.pod.as_ref().is_some_and(|p| p.uid == uid))
    }

    /// The member's slot in its gang's plan: kept if it has one, by rank if it says one,
    /// else the first free slot. A new member refreshes the reservation's expiry.
    fn assign_slot(
        &mut self,
        key: &str,
        demand: &PodDemand,
        membership: &GangMembership,
        now_ms: u64,
    ) -> Result<usize, BookError> {
        let ttl = self.config.reservation_ttl_ms;
        if let Some(slot) = self.slot_of(key, &demand.pod.uid) {
            // A member filtered again (kube-scheduler's retry) is a sign of life too.
            if let Some(reservation) = self.gangs.get_mut(key) {
                reservation.expires_at_ms = reservation.expires_at_ms.max(now_ms.saturating_add(ttl));
            }
            return Ok(slot);
        }
        let Some(reservation) = self.gangs.get_mut(key) else {
            return Err(BookError::NotPlanned { pod: demand.pod.to_string() });
        };
        let by_rank = membership.rank.map(|r| r as usize).filter(|&r| r < reservation.slots.len()).filter(|&r| {
            let slot = &reservation.slots[r];
            slot.pod.is_none() || !slot.at_bind
        });
        // Without a free slot, a newcomer without a rank takes one whose pod's hold lapsed:
        // the pod watch sees bound pods only, so a parked member deleted and replaced still
        // holds its slot.
        let free = reservation.slots.iter().position(|s| s.pod.is_none());
        let lapsed = reservation.slots.iter().position(|s| s.lapsed);
        let Some(slot) = by_rank.or(free).or(lapsed) else {
            return Err(BookError::GangFull {
                pod: demand.pod.to_string(),
                gang: key.to_string(),
                size: reservation.gang.members,
            });
        };
        // A rank taken by another pod that has not reached bind belongs to a pod that was
        // replaced (same rank, new uid): the newcomer takes it.
        reservation.slots[slot].pod = Some(demand.pod.clone());
        reservation.slots[slot].at_bind = false;
        reservation.slots[slot].lapsed = false;
        // A reservation made through the API may hold longer than the extender's TTL.
        reservation.expires_at_ms = reservation.expires_at_ms.max(now_ms.saturating_add(ttl));
        Ok(slot)
    }

    /// Scores 0..=10 per offered node (kube-scheduler's prioritize). A gang member's planned
    /// node gets 10 and the rest 0; a single pod's fitting nodes are scaled from the engine's
    /// score (the best 10, the worst 0), nodes it does not fit 0.
    pub fn prioritize(&mut self, demand: &PodDemand, offered: &[HostId]) -> Result<Vec<i64>, BookError> {
        let gang = demand.gang()?;
        let planned = match &demand.gang {
            Some(membership) => {
                let slot = self.slot_of(&membership.key, &demand.pod.uid);
                slot.and_then(|s| self.gangs.get(&membership.key).map(|g| g.slots[s].host))
            }
            None => self.bound.get(&demand.pod.uid).and_then(|b| self.cluster.host_id(&b.node)),
        };
        if demand.gang.is_some() || planned.is_some() {
            return Ok(offered.iter().map(|&h| if Some(h) == planned { 10 } else { 0 }).collect());
        }
        let verdicts = self.with_planner(|planner, ledger| planner.score_hosts(ledger, &gang, offered));
        let totals: Vec<Option<f64>> = verdicts
            .iter()
            .map(|v| match v {
                HostVerdict::Fits { score, .. } => Some(score.total),
                HostVerdict::Rejected { .. } => None,
            })
            .collect();
        let best = totals.iter().flatten().copied().fold(f64::NEG_INFINITY, f64::max);
        let worst = totals.iter().flatten().copied().fold(f64::INFINITY, f64::min);
        Ok(totals
            .iter()
            .map(|total| match total {
                None => 0,
                Some(_) if best - worst < 1e-12 => 10,
                Some(t) => ((t - worst) / (best - worst) * 10.0).round() as i64,
            })
            .collect())
    }

    /// A pod reached bind for `node`. A single pod gets its GPUs chosen and reserved now; a
    /// gang member is marked arrived, and the last one to arrive gets every member to bind.
    pub fn bind_arrive(&mut self, demand: &PodDemand, node: &str, now_ms: u64) -> Result<BindStep, BookError> {
        let pod = demand.pod.to_string();
        let Some(host) = self.cluster.host_id(node) else {
            return Err(BookError::UnknownNode { pod, node: node.to_string() });
        };
        if let Some(bound) = self.bound.get(&demand.pod.uid) {
            // Bound already (a retried bind, or its Binding raced our bookkeeping): the
            // Binding will meet a 409 and succeed only on the same node.
            if bound.node != node {
                return Err(BookError::WrongNode { pod, planned: bound.node.clone(), asked: node.to_string() });
            }
            let member =
                MemberBind { pod: demand.pod.clone(), host, node: node.to_string(), gpus: mask_indices(bound.gpus) };
            return Ok(BindStep::Bind { ticket: Ticket::Bound(demand.pod.uid.clone()), members: vec![member] });
        }
        let Some(membership) = demand.gang.clone() else {
            let uid = demand.pod.uid.clone();
            if let Some(single) = self.singles.get(&uid) {
                return Ok(BindStep::Bind { ticket: Ticket::Pod(uid), members: vec![single.clone()] });
            }
            let gang = demand.gang()?;
            let verdict = self.with_planner(|planner, ledger| planner.score_hosts(ledger, &gang, &[host]));
            let members = match verdict.into_iter().next() {
                Some(HostVerdict::Fits { members, .. }) => members,
                Some(HostVerdict::Rejected { text, .. }) => {
                    return Err(BookError::NoRoomAtBind { pod, node: node.to_string(), reason: text })
                }
                None => return Err(BookError::UnknownNode { pod, node: node.to_string() }),
            };
            let mask = members.iter().fold(0, |m, p| m | p.gpus);
            self.ledger
                .reserve(&pod_holder(&uid), &[(host, mask)])
                .map_err(|source| BookError::Ledger { pod, source })?;
            let member = MemberBind { pod: demand.pod.clone(), host, node: node.to_string(), gpus: mask_indices(mask) };
            self.singles.insert(uid.clone(), member.clone());
            return Ok(BindStep::Bind { ticket: Ticket::Pod(uid), members: vec![member] });
        };
        let key = membership.key;
        let Some(slot) = self.slot_of(&key, &demand.pod.uid) else {
            return Err(BookError::NotPlanned { pod });
        };
        let (ttl, hold) = (self.config.reservation_ttl_ms, self.config.bind_hold_ms);
        let cluster = &self.cluster;
        let Some(reservation) = self.gangs.get_mut(&key) else {
            return Err(BookError::NotPlanned { pod });
        };
        let planned = &cluster.host(reservation.slots[slot].host).name;
        if planned != node {
            return Err(BookError::WrongNode { pod, planned: planned.clone(), asked: node.to_string() });
        }
        let arrived = !reservation.slots[slot].at_bind;
        if arrived {
            let slot = &mut reservation.slots[slot];
            (slot.at_bind, slot.lapsed, slot.held_until_ms) = (true, false, now_ms.saturating_add(hold));
            reservation.expires_at_ms = reservation.expires_at_ms.max(now_ms.saturating_add(ttl));
            reservation.first_held_ms.get_or_insert(now_ms);
        }
        if reservation.binding || !reservation.slots.iter().all(|s| s.at_bind) {
            let only_lapsed_missing = reservation.slots.iter().all(|s| s.at_bind || (s.lapsed && s.pod.is_some()));
            let retry_now = if arrived && !reservation.binding && only_lapsed_missing {
                reservation.slots.iter().filter(|s| s.lapsed).filter_map(|s| s.pod.clone()).collect()
            } else {
                Vec::new()
            };
            return Ok(BindStep::Wait { gang: key, retry_now });
        }
        reservation.binding = true;
        let members = reservation
            .slots
            .iter()
            .filter_map(|s| {
                let pod = s.pod.clone()?;
                Some(MemberBind {
                    pod,
                    host: s.host,
                    node: cluster.host(s.host).name.clone(),
                    gpus: mask_indices(s.gpus),
                })
            })
            .collect();
        Ok(BindStep::Bind { ticket: Ticket::Gang(key), members })
    }

    /// The outcome of a ticket's Bindings: `Ok` per pod bound (or already bound to the
    /// planned node), `Err(reason)` per pod that was not.
    pub fn bind_finished(
        &mut self,
        ticket: &Ticket,
        outcomes: &[(PodIdentity, Result<(), String>)],
        now_ms: u64,
    ) -> BindFinish {
        let failures: Vec<String> =
            outcomes.iter().filter_map(|(pod, r)| r.as_ref().err().map(|e| format!("{pod}: {e}"))).collect();
        let members: Vec<(PodIdentity, String, GpuMask, Option<String>)> = match ticket {
            Ticket::Bound(_) => {
                return if failures.is_empty() {
                    BindFinish::Bound
                } else {
                    BindFinish::RolledBack { delete: Vec::new(), failures }
                };
            }
            Ticket::Gang(key) => {
                let Some(reservation) = self.drop_reservation(key) else {
                    return BindFinish::RolledBack { delete: Vec::new(), failures };
                };
                reservation
                    .slots
                    .iter()
                    .filter_map(|s| {
                        Some((s.pod.clone()?, self.cluster.host(s.host).name.clone(), s.gpus, Some(key.to_string())))
                    })
                    .collect()
            }
            Ticket::Pod(uid) => {
                let Some(single) = self.singles.remove(uid) else {
                    return BindFinish::RolledBack { delete: Vec::new(), failures };
                };
                if let Err(error) = self.ledger.release(&pod_holder(uid)) {
                    self.ledger_fault("settling a single pod's Binding", error);
                }
                let mask = indices_mask(&single.gpus);
                vec![(single.pod, single.node, mask, None)]
            }
        };
        if !failures.is_empty() {
            if ticket.gang().is_some() {
                self.stats.gangs_rolled_back += 1;
            }
            let delete = outcomes.iter().filter(|(_, r)| r.is_ok()).map(|(pod, _)| pod.clone()).collect();
            return BindFinish::RolledBack { delete, failures };
        }
        for (pod, node, gpus, gang) in members {
            if let Some(host) = self.cluster.host_id(&node) {
                // The GPUs were just released from the ticket's holder, so this succeeds.
                if let Err(error) = self.ledger.reserve(&pod_holder(&pod.uid), &[(host, gpus)]) {
                    self.ledger_fault("holding a bound pod's GPUs", error);
                }
            }
            self.bound.insert(pod.uid.clone(), BoundPod { pod, node, gpus, gang, bound_at_ms: now_ms });
            self.stats.pods_bound += 1;
        }
        if ticket.gang().is_some() {
            self.stats.gangs_bound += 1;
        }
        BindFinish::Bound
    }

    /// A pod seen bound on `node` (by us earlier, by a restart's predecessor, or by another
    /// scheduler): its GPUs are held. `gpus` are the indices from `topoplace.io/gpus`, or
    /// `None` to take the lowest free ones for `count` GPUs.
    pub fn observe_bound(
        &mut self,
        pod: PodIdentity,
        node: &str,
        gpus: Option<&[u8]>,
        count: u32,
        gang: Option<String>,
    ) -> Result<(), BookError> {
        if self.bound.contains_key(&pod.uid) || count == 0 || self.in_flight(&pod.uid) {
            // In flight: `bind_finished` records it with the GPUs it was given.
            return Ok(());
        }
        let Some(host) = self.cluster.host_id(node) else {
            return Err(BookError::UnknownNode { pod: pod.to_string(), node: node.to_string() });
        };
        let mask = match gpus {
            Some(indices) => indices_mask(indices),
            None => {
                let free = self.ledger.free(host);
                let mut mask = 0u64;
                for index in mask_indices(free).into_iter().take(count as usize) {
                    mask |= 1u64 << index;
                }
                if mask.count_ones() < count {
                    return Err(BookError::NoRoomAtBind {
                        pod: pod.to_string(),
                        node: node.to_string(),
                        reason: format!("{count} GPUs counted but {} free", free.count_ones()),
                    });
                }
                mask
            }
        };
        self.ledger
            .reserve(&pod_holder(&pod.uid), &[(host, mask)])
            .map_err(|source| BookError::Ledger { pod: pod.to_string(), source })?;
        self.bound.insert(pod.uid.clone(), BoundPod { pod, node: node.to_string(), gpus: mask, gang, bound_at_ms: 0 });
        Ok(())
    }

    fn in_flight(&self, uid: &str) -> bool {
        self.singles.contains_key(uid)
            || self
                .gangs
                .values()
                .any(|g| g.binding && g.slots.iter().any(|s| s.pod.as_ref().is_some_and(|p| p.uid == uid)))
    }

    /// A pod was deleted (or finished): its GPUs come back, and if it held a slot in a
    /// reservation not yet binding, the slot is free for its replacement.
    pub fn forget_pod(&mut self, uid: &str) {
        // A bound pod holds its GPUs, except one whose node left the view while its Binding
        // was in flight (`bind_finished` records it without a host to hold on).
        if self.bound.remove(uid).is_some() && self.ledger.holding(&pod_holder(uid)).is_some() {
            if let Err(error) = self.ledger.release(&pod_holder(uid)) {
                self.ledger_fault("forgetting a bound pod", error);
            }
        }
        for reservation in self.gangs.values_mut().filter(|g| !g.binding) {
            for slot in &mut reservation.slots {
                if slot.pod.as_ref().is_some_and(|p| p.uid == uid) {
                    (slot.pod, slot.at_bind, slot.lapsed) = (None, false, false);
                }
            }
        }
    }

    /// After a relist: bound pods not in `present` are gone, except those topoplace bound
    /// less than `grace_ms` ago (their watch events may not have arrived yet).
    pub fn forget_unlisted(&mut self, present: &std::collections::HashSet<String>, now_ms: u64, grace_ms: u64) {
        let gone: Vec<String> = self
            .bound
            .iter()
            .filter(|(uid, pod)| {
                !present.contains(*uid) && (pod.bound_at_ms == 0 || pod.bound_at_ms + grace_ms <= now_ms)
            })
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in gone {
            self.forget_pod(&uid);
        }
    }

    /// Whether a bound pod is known (for tests and the adapters' resync).
    pub fn is_bound(&self, uid: &str) -> bool {
        self.bound.contains_key(uid)
    }

    /// kube-scheduler's preempt: of its candidate nodes (each with the pods it would evict),
    /// keep those where the eviction lets the pod's whole gang fit with this pod on that node,
    /// and where no victim is part of a gang some of whose members would stay.
    pub fn preempt(&mut self, demand: &PodDemand, candidates: &[PreemptCandidate]) -> Result<Vec<bool>, BookError> {
        let gang = demand.gang()?;
        let planned = demand.gang.as_ref().and_then(|m| {
            let slot = self.slot_of(&m.key, &demand.pod.uid)?;
            self.gangs.get(&m.key).map(|g| g.slots[slot].host)
        });
        let mut keep = Vec::with_capacity(candidates.len());
        for candidate in candidates {
            if let Some(host) = planned {
                // The GPUs are already reserved; only kube-scheduler's own resources are short.
                keep.push(candidate.host == host);
                continue;
            }
            if !self.victims_take_whole_gangs(&candidate.victims) {
                keep.push(false);
                continue;
            }
            let mut trial = self.ledger.clone();
            for uid in &candidate.victims {
                // A trial copy: a victim that holds nothing frees nothing.
                if self.bound.contains_key(uid) && trial.holding(&pod_holder(uid)).is_some() {
                    trial.release(&pod_holder(uid)).expect("a holder just looked up in this copy releases");
                }
            }
            let host = candidate.host;
            let fits = self.with_planner(|planner, _| {
                if demand.gang.is_none() {
                    return matches!(planner.fit_hosts(&trial, &gang, &[host]).first(), Some(None));
                }
                let all = vec![true; planner.cluster().hosts.len()];
                planner
                    .place(&trial, PlaceRequest::new(&gang).within(Some(&all)))
                    .is_ok_and(|p| p.members.iter().any(|m| m.host == host))
            });
            keep.push(fits);
        }
        Ok(keep)
    }

    fn victims_take_whole_gangs(&self, victims: &[String]) -> bool {
        victims.iter().all(|uid| {
            let Some(gang) = self.bound.get(uid).and_then(|b| b.gang.as_ref()) else { return true };
            self.bound.iter().filter(|(_, b)| b.gang.as_ref() == Some(gang)).all(|(other, _)| victims.contains(other))
        })
    }

    /// Checks the book against its ledger: every holder belongs to a reservation, a ticket in
    /// flight or a bound pod, and the ledger's own invariants hold.
    pub fn check(&self) -> Result<(), String> {
        if let Some(first) = self.faults.first() {
            return Err(format!("{} ledger fault(s), the first: {first}", self.stats.ledger_faults));
        }
        self.ledger.check()?;
        for (holder, _) in self.ledger.holders() {
            let known = match holder {
                Holder::Gang(key) => self.gangs.contains_key(key),
                Holder::Pod(uid) => self.bound.contains_key(uid) || self.singles.contains_key(uid),
            };
            if !known {
                return Err(format!("ledger holder `{holder}` belongs to no reservation or bound pod"));
            }
        }
        for key in self.gangs.keys() {
            if self.ledger.holding(&gang_holder(key)).is_none() {
                return Err(format!("gang `{key}` is reserved but holds no GPUs"));
            }
        }
        Ok(())
    }

    /// The state as `GET /state` shows it.
    pub fn snapshot(&self, now_ms: u64) -> Snapshot {
        let mut holders_by_host: BTreeMap<HostId, Vec<(&Holder, GpuMask)>> = BTreeMap::new();
        for (holder, holding) in self.ledger.holders() {
            for &(host, mask) in holding.iter() {
                holders_by_host.entry(host).or_default().push((holder, mask));
            }
        }
        let nodes = self
            .cluster
            .hosts
            .iter()
            .enumerate()
            .map(|(index, host)| {
                let id = index as HostId;
                let holders = holders_by_host.remove(&id).unwrap_or_default();
                NodeState {
                    name: host.name.clone(),
                    product: host.product.get().name.to_string(),
                    gpus: host.gpu_count,
                    free: mask_indices(self.ledger.free(id)),
                    held: holders
                        .into_iter()
                        .map(|(holder, mask)| {
                            let pod = match holder {
                                Holder::Pod(uid) => self.bound.get(uid).map(|b| b.pod.to_string()),
                                Holder::Gang(_) => None,
                            };
                            HeldGpus { holder: holder.to_string(), pod, gpus: mask_indices(mask) }
                        })
                        .collect(),
                }
            })
            .collect();
        let gangs = self
            .gangs
            .iter()
            .map(|(key, g)| GangState {
                gang: key.clone(),
                members: g.gang.members,
                binding: g.binding,
                expires_in_ms: next_deadline(g, self.config.bind_hold_ms).saturating_sub(now_ms),
                slots: g
                    .slots
                    .iter()
                    .map(|s| SlotState {
                        node: self.cluster.host(s.host).name.clone(),
                        gpus: mask_indices(s.gpus),
                        pod: s.pod.as_ref().map(|p| p.to_string()),
                        at_bind: s.at_bind,
                    })
                    .collect(),
            })
            .collect();
        Snapshot { nodes, gangs, stats: self.stats.clone() }
    }
}

/// A waiting reservation's next deadline: its earliest held bind's limit, else its expiry;
/// and its assembly limit if sooner.
fn next_deadline(reservation: &GangReservation, hold_ms: u64) -> u64 {
    let held = reservation.slots.iter().filter(|s| s.at_bind).map(|s| s.held_until_ms).min();
    let deadline = held.unwrap_or(reservation.expires_at_ms);
    assembly_limit(reservation, hold_ms).map_or(deadline, |limit| deadline.min(limit))
}

/// When a reservation whose members reach bind must be whole at bind ([`HOLD_ROUNDS_MAX`]).
/// None for one the placement API made: it holds until the expiry its caller asked for.
fn assembly_limit(reservation: &GangReservation, hold_ms: u64) -> Option<u64> {
    if reservation.origin.is_some() {
        return None;
    }
    reservation.first_held_ms.map(|first| first.saturating_add(hold_ms.saturating_mul(HOLD_ROUNDS_MAX)))
}

fn at_bind(reservation: &GangReservation) -> Vec<PodIdentity> {
    reservation.slots.iter().filter(|s| s.at_bind).filter_map(|s| s.pod.clone()).collect()
}

fn verdict_of(rejection: Option<(HostRejection, String)>) -> NodeVerdict {
    match rejection {
        None => NodeVerdict::Pass,
        Some((reason, text)) if reason.resolvable_by_freeing_gpus() => NodeVerdict::Fail(text),
        Some((_, text)) => NodeVerdict::Unresolvable(text),
    }
}

fn check_shape(demand: &PodDemand, planned: &Gang, membership: &GangMembership) -> Result<(), BookError> {
    if membership.size != planned.members || demand.gpus != planned.gpus_per_member {
        return Err(BookError::GangShapeMismatch {
            pod: demand.pod.to_string(),
            gang: membership.key.clone(),
            planned: planned.members,
            planned_gpus: planned.gpus_per_member,
            size: membership.size,
            gpus: demand.gpus,
        });
    }
    Ok(())
}

/// What the book holds now: nodes with free and held GPUs, reservations, counters (the
/// server renders it as `GET /state`).
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub nodes: Vec<NodeState>,
    pub gangs: Vec<GangState>,
    pub stats: BookStats,
}

#[derive(Debug, Clone)]
pub struct NodeState {
    pub name: String,
    pub product: String,
    pub gpus: u8,
    pub free: Vec<u8>,
    pub held: Vec<HeldGpus>,
}

#[derive(Debug, Clone)]
pub struct HeldGpus {
    pub holder: String,
    pub pod: Option<String>,
    pub gpus: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct GangState {
    pub gang: String,
    pub members: u32,
    pub binding: bool,
    pub expires_in_ms: u64,
    pub slots: Vec<SlotState>,
}

#[derive(Debug, Clone)]
pub struct SlotState {
    pub node: String,
    pub gpus: Vec<u8>,
    pub pod: Option<String>,
    pub at_bind: bool,
}
