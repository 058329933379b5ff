//! The reservation book: the online placement state that the extender, the placement API and
//! the secondary scheduler share. It owns the cluster view, the GPU ledger, the gangs that are
//! planned and reserved but not yet bound, and the pods that are bound; it decides filter,
//! prioritize, bind and preempt answers in domain terms (host ids, pods by uid, reasons).
//!
//! Its methods, by who calls them: this module (construction, expiry, invariants, the
//! snapshot); `extender` (kube-scheduler's verbs); `api` (the placement API: plan, release,
//! capacity, explain, cluster state); `scheduler` (the secondary scheduler's plans and
//! holds); `view` (the watches: cluster changes, pods bound and gone).
//!
//! Pure and synchronous like the rest of the core: time comes in as `now_ms` from the
//! caller, nothing here blocks or does I/O, and the same calls in the same order give the
//! same answers. The adapter holds it under one lock and does the HTTP and API-server work.
//!
//! Ledger holders ([`Holder`]): a reserved gang holds its GPUs as `Holder::Gang(key)`, a
//! bound pod as `Holder::Pod(uid)`. A gang moves from the first to the second only when every member's Binding
//! succeeded, so at any instant a gang is held whole (reserved or bound) or not at all. The
//! exceptions are by design and named: a LeaderWorkerSet leader bound ahead of its workers
//! (their GPUs still held by the gang), a pod joining a gang that runs (held alone, bound
//! alone), and a preemption's plan (`Holder::Nominated`: what its victims gave back so far).

mod api;
mod extender;
#[cfg(test)]
mod gang_time_tests;
mod preemption;
#[cfg(test)]
mod role_tests;
mod running;
mod scheduler;
#[cfg(test)]
pub(crate) mod tests;
mod view;

pub use api::{
    ApiReservation, ClusterState, DomainState, Explained, ExplainedReplica, GangRequest, HostState, NodeFit,
    PlanOptions, PlanOutcome, Released, ReplicaPlanOutcome, ReplicaRequest, RequestError, ReservationState,
    REQUEST_EXACT_TIME_MAX,
};
pub use preemption::{
    PreemptAnswer, PreemptionOutcome, PreemptionVerdict, NOMINATION_TTL_MS_DEFAULT, NOMINATION_WAIT_MAX_MS,
    PREEMPTION_VERDICTS_MAX,
};

use std::collections::{BTreeMap, BTreeSet};

use thiserror::Error;

use topoplace_engine::ledger::{indices_mask, mask_indices, merge_by_host, Holding, Ledger, LedgerError};
use topoplace_engine::placement::replica::ReplicaPlacement;
use topoplace_engine::placement::{
    HostRejection, HostVerdict, PlaceRequest, Planner, PlannerConfig, PlannerParts, SolverChoice,
};
use topoplace_engine::topology::{Cluster, DevicePool, GpuMask, HostId};
use topoplace_engine::workload::{
    Gang, GangSpec, MemoryNeed, Replica, RoleSpec, Scope, WorkloadError, GANG_MEMBERS_MAX,
};

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
/// whole gang must reach bind within `HOLD_ROUNDS_MAX` × [`BookConfig::bind_hold_ms`] (160 s
/// by default), or the reservation is released and its held binds answered, so a gang whose
/// member never comes (deleted while parked, never created) cannot hold its GPUs for ever. A
/// reservation made through the placement API keeps the expiry its caller asked for instead.
/// Four holds cover a first hold that lapses and kube-scheduler's own retry of the parked pod
/// (up to 90 s before 1.28): 40 s + 90 s < 160 s.
pub const HOLD_ROUNDS_MAX: u64 = 4;

/// The time a gang's Bindings may take once its last member reached bind, in ms: the held
/// members' calls must still be open when they are answered, so this is what the hold leaves
/// of kube-scheduler's `httpTimeout`. The extender gives each Binding (with its read-back)
/// at most this long.
pub const BINDING_BUDGET_MS: u64 = 15_000;

/// How long a single pod stays assumed on the node its prioritize chose, in ms, when its
/// bind (or the pod watch's word that it is bound) does not come. kube-scheduler picks a node,
/// assumes the pod in its own cache and goes on to the next pod while the bind is in flight
/// (`pkg/scheduler/scheduler.go`, `scheduleOne`: `sched.assume`, then the binding cycle in a
/// goroutine); the book assumes the same way, so the next pod's filter and prioritize see the
/// GPUs as taken (see [`Holder::Assumed`]). The bind follows within milliseconds unless a
/// PreBind plugin waits (volume binding); past this, the assumption lapses.
pub const ASSUME_TTL_MS_DEFAULT: u64 = 10_000;

/// GPUs the reservations planned for one namespace's pods may hold at once for members not
/// bound yet ([`BookConfig::namespace_unbound_gpus_max`], `serve --namespace-unbound-gpus`):
/// a filter call that would take a namespace past it holds nothing and is refused with
/// [`BookError::NamespaceOverLimit`] (the extender answers 429). An extender request is
/// a caller's word until its bind is verified, and each filter of a new gang holds the whole
/// gang's GPUs for the reservation TTL; this bounds what one namespace's requests, forged or
/// not, can keep from the others. 2,048 GPUs: 256 8-GPU hosts.
pub const NAMESPACE_UNBOUND_GPUS_MAX_DEFAULT: u32 = 2_048;

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
    /// The gang's size: the members it starts with, all placed at once (its minimum).
    pub size: u32,
    /// An elastic gang's most members (`topoplace.io/gang-max-size`, at least `size`): once
    /// it runs, more of its pods join it up to this many; `None`: no maximum but
    /// [`GANG_MEMBERS_MAX`].
    pub max: Option<u32>,
    /// The member's rank when the pod says it (`topoplace.io/rank`, LWS worker index).
    pub rank: Option<u32>,
    /// How the gang's members bind.
    pub order: BindOrder,
}

/// How a gang's members are bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BindOrder {
    /// Every member together, once all have reached bind.
    #[default]
    Together,
    /// The leader alone first, then every other member together. LeaderWorkerSet with
    /// exclusive placement (`leaderworkerset.sigs.k8s.io/exclusive-topology`) creates a
    /// group's workers only once its leader is bound, with a node selector for the leader's
    /// domain (LWS `pkg/controllers/pod_controller.go`): the whole replica is still planned
    /// and held at the first filter, the leader's Binding goes ahead, the workers' GPUs stay
    /// held for them, and a group whose workers then fail to bind, or never come, has its
    /// leader deleted too (LWS recreates the group) rather than left half-placed.
    LeaderFirst {
        /// This pod is the group's leader.
        leader: bool,
    },
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
    /// Set when the pod's gang is a replica with roles (`topoplace.io/roles`): then
    /// `required` and `preferred` are the whole replica's scope, `gang.size` counts the pods
    /// of every role, `gang.rank` is the pod's rank within its own role, and the roles carry
    /// parallelism and memory (the pod-level fields are unused).
    pub roles: Option<RoleDemand>,
    /// The resource its GPUs are asked as (`nvidia.com/gpu`, or `nvidia.com/mig-<profile>`
    /// under the mixed MIG strategy): only hosts of this pool can take it.
    pub pool: DevicePool,
}

/// A pod of a replica with roles: which role it fills, and the replica's roles as every pod
/// of the replica describes them alike.
#[derive(Debug, Clone, PartialEq)]
pub struct RoleDemand {
    /// The pod's own role, by name: one of `roles`.
    pub role: String,
    pub roles: Vec<RoleSpec>,
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
            roles: Vec::new(),
            pool: Some(self.pool.clone()),
        };
        spec.validate().map_err(|source| BookError::Demand { pod: self.pod.to_string(), source })?;
        spec.expand().into_iter().next().ok_or_else(|| BookError::Demand {
            pod: self.pod.to_string(),
            source: WorkloadError::Zero { gang: name, field: "members" },
        })
    }

    /// The replica this pod is part of and the index of its own role in it, when its gang has
    /// roles ([`PodDemand::roles`]); `None` for a gang of one shape or a single pod. Errors:
    /// roles that do not validate (a role of 0 members, a slice that does not divide its
    /// role, two roles of one name), a pod with roles outside a gang, an unknown own role, a
    /// gang size that is not the roles' members together, a GPU count not its role's.
    pub fn replica(&self) -> Result<Option<(Replica, usize)>, BookError> {
        let Some(roles) = &self.roles else { return Ok(None) };
        let pod = self.pod.to_string();
        let mismatch = |detail: String| BookError::RoleMismatch { pod: pod.clone(), detail };
        let Some(membership) = &self.gang else {
            return Err(mismatch("a pod with roles must belong to a gang (a replica with roles is one gang)".into()));
        };
        let spec = GangSpec {
            required: self.required.clone(),
            preferred: self.preferred.clone(),
            roles: roles.roles.clone(),
            pool: Some(self.pool.clone()),
            ..GangSpec::shape(&membership.key, 1, 1, 1)
        };
        spec.validate().map_err(|source| BookError::Demand { pod: pod.clone(), source })?;
        let Some(replica) = spec.expand_replicas().into_iter().next() else {
            return Err(mismatch("its roles describe no replica".into()));
        };
        let Some(own) = replica.roles.iter().position(|r| r.name == roles.role) else {
            let names: Vec<&str> = replica.roles.iter().map(|r| r.name.as_str()).collect();
            return Err(mismatch(format!(
                "its role `{}` is not one of the replica's roles ({})",
                roles.role,
                names.join(", ")
            )));
        };
        let members: u32 = replica.roles.iter().map(|r| r.members).sum();
        if members != membership.size {
            return Err(mismatch(format!(
                "gang `{}` counts {} pods, but its roles have {members} members together",
                membership.key, membership.size
            )));
        }
        let role_gpus = replica.roles[own].gang.as_ref().map_or(0, |g| g.gpus_per_member);
        if role_gpus != self.gpus {
            return Err(mismatch(format!(
                "it asks for {} nvidia.com/gpu, but its role `{}` has {role_gpus} GPUs per member",
                self.gpus, roles.role
            )));
        }
        if let Some(rank) = membership.rank.filter(|&r| r >= replica.roles[own].members) {
            return Err(mismatch(format!(
                "its rank {rank} is past its role `{}`, which has {} members",
                roles.role, replica.roles[own].members
            )));
        }
        Ok(Some((replica, own)))
    }
}

/// Where a member's description of its gang differs from the gang's plan
/// ([`BookError::GangShapeMismatch`]).
#[derive(Debug, PartialEq)]
pub struct ShapeMismatch {
    pub pod: String,
    pub gang: String,
    /// The pod that planned the gang, or the placement API's reservation.
    pub planned_by: String,
    /// The field, named as pods say it.
    pub field: &'static str,
    pub ours: String,
    pub theirs: String,
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
        "pod {}: gang `{}` disagrees on {}: this pod says {}, but {} said {} when the gang was planned; \
         every member must describe its gang alike (nothing is held for this pod)",
        .0.pod, .0.gang, .0.field, .0.ours, .0.planned_by, .0.theirs
    )]
    GangShapeMismatch(Box<ShapeMismatch>),
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
    #[error("pod {pod}: {detail} (nothing is held for this pod)")]
    RoleMismatch { pod: String, detail: String },
    #[error("gang `{gang}` is reserved already (by the extender or the placement API), as another plan")]
    AlreadyPlanned { gang: String },
    #[error(
        "gang `{gang}`: no member is bound ahead with the rest's GPUs held (its reservation ended, or its leader is \
         not bound yet)"
    )]
    NotBoundAhead { gang: String },
    #[error(
        "pod {pod}: gang `{gang}` has no open slot of role `{role}` left for it (more pods of that role than its plan)"
    )]
    NoOpenSlot { pod: String, gang: String, role: String },
    /// A filter that would take its namespace past [`BookConfig::namespace_unbound_gpus_max`];
    /// nothing was held for it.
    #[error(
        "pod {pod}: namespace `{namespace}` holds {held} GPUs in reservations for members not bound yet; this pod's \
         plan asks {asked} more, over the limit of {limit} per namespace (--namespace-unbound-gpus); nothing is \
         held for it"
    )]
    NamespaceOverLimit { pod: String, namespace: String, held: u32, asked: u32, limit: u32 },
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
    /// See [`ASSUME_TTL_MS_DEFAULT`].
    pub assume_ttl_ms: u64,
    /// See [`BIND_HOLD_MS_DEFAULT`].
    pub bind_hold_ms: u64,
    /// See [`NOMINATION_TTL_MS_DEFAULT`].
    pub nomination_ttl_ms: u64,
    /// See [`NAMESPACE_UNBOUND_GPUS_MAX_DEFAULT`].
    pub namespace_unbound_gpus_max: u32,
    pub planner: PlannerConfig,
}

impl Default for BookConfig {
    fn default() -> Self {
        BookConfig {
            reservation_ttl_ms: RESERVATION_TTL_MS_DEFAULT,
            assume_ttl_ms: ASSUME_TTL_MS_DEFAULT,
            bind_hold_ms: BIND_HOLD_MS_DEFAULT,
            nomination_ttl_ms: NOMINATION_TTL_MS_DEFAULT,
            namespace_unbound_gpus_max: NAMESPACE_UNBOUND_GPUS_MAX_DEFAULT,
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
    /// Assumptions made (a pod prioritized again is assumed again and counted again).
    pub pods_assumed: u64,
    /// Assumptions that ended at [`BookConfig::assume_ttl_ms`], their pod's bind never seen.
    pub assumptions_lapsed: u64,
    /// Ledger changes that the book's own state said must succeed and that failed: each is a
    /// bug, kept in [`Book::faults`] and reported by [`Book::check`].
    pub ledger_faults: u64,
    /// Gang plans made by preemption ([`Book::preempt`]), their victims still to leave.
    pub gangs_nominated: u64,
    /// Such plans whose victims had not all left within [`BookConfig::nomination_ttl_ms`].
    pub nominations_expired: u64,
    /// Pods bound into a gang already running (a member recreated, or one more).
    pub members_joined: u64,
}

/// How many ledger faults the book keeps the text of (the count goes on past it).
pub const LEDGER_FAULTS_KEPT_MAX: usize = 16;

#[derive(Debug, Clone)]
struct Slot {
    /// The member's role: an index into the replica's roles (0 for a gang of one shape).
    role: usize,
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
    /// The member is bound already, ahead of the rest ([`BindOrder::LeaderFirst`]): its GPUs
    /// are held by its pod ([`Holder::Pod`]), no longer by the gang.
    bound: bool,
}

impl Slot {
    /// A member's place in a new plan, no pod in it yet.
    fn planned(host: HostId, gpus: GpuMask) -> Self {
        Slot::of_role(0, host, gpus)
    }

    /// A member of role `role` (an index into the replica's roles) in a new plan.
    fn of_role(role: usize, host: HostId, gpus: GpuMask) -> Self {
        Slot { role, host, gpus, pod: None, at_bind: false, held_until_ms: 0, lapsed: false, bound: false }
    }

    /// Gives the slot to `pod` with its bind open (no lapse): the pod's Binding onto it.
    fn take_at_bind(&mut self, cluster: &Cluster, pod: &PodIdentity) -> MemberBind {
        (self.pod, self.at_bind, self.lapsed) = (Some(pod.clone()), true, false);
        self.binding_of(cluster, pod.clone())
    }

    /// The Binding of `pod` onto this slot's host and GPUs.
    fn binding_of(&self, cluster: &Cluster, pod: PodIdentity) -> MemberBind {
        MemberBind { pod, host: self.host, node: cluster.host(self.host).name.clone(), gpus: mask_indices(self.gpus) }
    }
}

/// What a reservation was planned for: a gang of one shape, or a replica with roles (whose
/// slots are the members of its roles that take GPUs, role by role, in rank order).
#[derive(Debug, Clone)]
pub enum Planned {
    Gang(Gang),
    Replica(Box<Replica>),
}

impl Planned {
    /// Pods of the gang, GPU-less roles counted.
    fn members(&self) -> u32 {
        match self {
            Planned::Gang(gang) => gang.members,
            Planned::Replica(replica) => replica.roles.iter().map(|r| r.members).sum(),
        }
    }
}

/// One member of a replica's plan as the secondary scheduler handles it: the index of its
/// role in the replica, its host, its GPUs.
pub type RoleSlot = (usize, HostId, GpuMask);

/// The slots of a replica's placement: one per member that takes GPUs, role by role (in the
/// replica's role order), each role's members in their order.
fn replica_slots(replica: &Replica, placement: &ReplicaPlacement) -> Vec<Slot> {
    let mut members: Vec<(usize, u32, HostId, GpuMask)> = placement
        .parts
        .iter()
        .flat_map(|part| {
            let role = replica.roles.iter().position(|r| r.name == part.role).unwrap_or(0);
            part.placement.members.iter().map(move |m| (role, m.member, m.host, m.gpus))
        })
        .collect();
    members.sort_by_key(|&(role, member, _, _)| (role, member));
    members.into_iter().map(|(role, _, host, gpus)| Slot::of_role(role, host, gpus)).collect()
}

#[derive(Debug, Clone)]
struct GangReservation {
    planned: Planned,
    slots: Vec<Slot>,
    expires_at_ms: u64,
    /// Bindings are in flight: the reservation neither expires nor re-plans.
    binding: bool,
    /// Set when the placement API reserved it (the extender's own plans have none).
    origin: Option<ApiReservation>,
    /// When its first member's bind was held: the gang must be whole at bind within
    /// [`HOLD_ROUNDS_MAX`] holds of it, or it is released ([`Book::expire`]).
    first_held_ms: Option<u64>,
    /// The pod whose filter (or scheduling cycle) planned it; `None` for the placement API's.
    planned_by: Option<PodIdentity>,
    /// Its leader binds alone before the rest ([`BindOrder::LeaderFirst`]).
    leader_first: bool,
    /// Planned for pods joining their gang while it runs (`running`): its slots are those
    /// pods' only, and it grows as more of them come.
    joining: bool,
    /// Made from a preemption's plan once its victims left ([`Book::settle`]); cleared when
    /// the unit's pods adopt it (it is then their reservation like any other).
    from_preemption: bool,
}

impl GangReservation {
    /// Whether the secondary scheduler's pods bind onto it as it is (slot for slot): one the
    /// placement API made, or a preemption's plan, and not binding already.
    fn adoptable(&self) -> bool {
        !self.binding && (self.origin.is_some() || self.from_preemption)
    }
}

#[derive(Debug, Clone)]
struct BoundPod {
    pod: PodIdentity,
    node: String,
    /// The resource its devices came from: with `node`, the host.
    pool: DevicePool,
    /// The GPUs held for it.
    gpus: GpuMask,
    /// The GPUs its record names (`topoplace.io/gpus`, or what topoplace bound it on): the
    /// same as `gpus` unless its node shrank below them ([`Book::held_on`]), and what it is
    /// held on again once the node has them back.
    recorded: GpuMask,
    gang: Option<String>,
    /// When topoplace bound it (0 for pods observed bound), for [`Book::forget_unlisted`].
    bound_at_ms: u64,
}

/// A single pod assumed on a node until its bind arrives ([`Holder::Assumed`]).
#[derive(Debug, Clone)]
struct Assumption {
    pod: PodIdentity,
    host: HostId,
    gpus: GpuMask,
    expires_at_ms: u64,
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
    /// Single pods assumed on a node before their bind, by uid ([`Holder::Assumed`]).
    assumed: BTreeMap<String, Assumption>,
    bound: BTreeMap<String, BoundPod>,
    stats: BookStats,
    /// Ledger changes of the cluster views before the current one, so that
    /// [`Book::generation`] keeps growing across [`Book::replace_cluster`].
    earlier_changes: u64,
    /// Nodes kube-scheduler offers no pod now, by name ([`Book::set_closed_nodes`]).
    closed: std::collections::BTreeSet<String>,
    /// Device pools offering nothing now ([`Book::set_closed_pools`]).
    closed_pools: std::collections::BTreeSet<(String, DevicePool)>,
    /// Reservations the placement API has made (their ids count up from 1).
    api_reservations: u64,
    /// The first [`LEDGER_FAULTS_KEPT_MAX`] ledger faults (see [`BookStats::ledger_faults`]).
    faults: Vec<String>,
    /// Bound pods to delete so that no replica stays half-placed ([`Book::take_undo`]).
    undo: Vec<PodIdentity>,
    /// Gang plans made by preemption, by gang key ([`preemption::Nomination`]).
    nominations: BTreeMap<String, preemption::Nomination>,
    /// The gang maximum each bound pod states, by uid ([`Book::observe_gang_max`]).
    stated_max: BTreeMap<String, u32>,
    /// Bound pods being deleted (terminating), by uid ([`Book::observe_terminating`]).
    terminating: BTreeSet<String>,
    /// The latest preemption verdict of each unit that asked lately, oldest first, at most
    /// [`preemption::PREEMPTION_VERDICTS_MAX`] ([`Book::record_preemption`]).
    verdicts: std::collections::VecDeque<preemption::PreemptionVerdict>,
    /// Gangs known to have run whole, by key, while a member of theirs is bound: bound whole
    /// by this book (with the shape a member that joins later must agree with), or seen with
    /// all their members bound ([`Book::observe_gang_size`], shape unknown).
    running: BTreeMap<String, Option<Planned>>,
    /// Members seen bound by the pod watch, per gang not yet known to run whole, with the
    /// gang's size ([`Book::observe_gang_size`]).
    seen_members: BTreeMap<String, (u32, std::collections::BTreeSet<String>)>,
}

/// Who holds GPUs in the book's ledger. A gang is held whole by `Gang` while reserved or
/// binding, then by one `Pod` per member once every Binding succeeded: never both, never part
/// (but for the exceptions the module doc names: a leader bound ahead, pods joining a gang that
/// runs, a preemption's plan).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Holder {
    /// A reserved gang, by its key `namespace/name`.
    Gang(String),
    /// A bound pod, or a single pod whose Binding is in flight, by uid.
    Pod(String),
    /// A single pod, by uid, on the node the book's prioritize gave its only top score (or
    /// the one node its filter passed), from then until its bind arrives, the pod watch sees
    /// it bound (or, once bound, gone), it is filtered or prioritized again, or
    /// [`BookConfig::assume_ttl_ms`] passes (an unbound pod deleted meanwhile is not seen by
    /// the pod watch, which lists bound pods only: its assumption lapses then). kube-scheduler binds one pod while it already schedules the next; without
    /// this, a burst of small pods is scored against a book that has not heard of the pods
    /// before it, and spreads over empty nodes instead of packing.
    Assumed(String),
    /// A gang, by key, nominated by preemption: the GPUs of its plan that victims have given
    /// back so far, held until all are and the plan becomes its reservation.
    Nominated(String),
}

/// `gang:{key}`, `pod:{uid}`, `assumed:{uid}` or `nominated:{key}`: how `/state` and errors name a holder (never parsed back).
impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Holder::Gang(key) => write!(f, "gang:{key}"),
            Holder::Pod(uid) => write!(f, "pod:{uid}"),
            Holder::Assumed(uid) => write!(f, "assumed:{uid}"),
            Holder::Nominated(key) => write!(f, "nominated:{key}"),
        }
    }
}

/// What a set of Bindings in flight settles, handed out with [`BindStep::Bind`] and given
/// back to [`Book::bind_finished`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Ticket {
    /// Every member of the reserved gang with this key (but one bound ahead of it).
    Gang(String),
    /// The leader of a [`BindOrder::LeaderFirst`] gang, ahead of the rest: the gang's key
    /// and the leader's uid. Its outcome answers no other member.
    Leader { gang: String, uid: String },
    /// A pod joining a gang that runs (the gang's key, the pod's uid), bound on its own out of
    /// the gang's joining reservation.
    Joined { gang: String, uid: String },
    /// One pod (by uid) whose GPUs were chosen at bind, held by [`Holder::Pod`] meanwhile.
    Pod(String),
    /// A pod (by uid) the book already has bound: a repeated bind to its node, nothing held.
    Bound(String),
}

/// `gang:{key}`, `leader:{key}:{uid}`, `joined:{key}:{uid}`, `pod:{uid}` or `bound:{uid}`, for logs and messages
/// (never parsed back).
impl std::fmt::Display for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ticket::Gang(key) => write!(f, "gang:{key}"),
            Ticket::Leader { gang, uid } => write!(f, "leader:{gang}:{uid}"),
            Ticket::Joined { gang, uid } => write!(f, "joined:{gang}:{uid}"),
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
            Ticket::Pod(_) | Ticket::Bound(_) | Ticket::Leader { .. } | Ticket::Joined { .. } => None,
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
            assumed: BTreeMap::new(),
            bound: BTreeMap::new(),
            stats: BookStats::default(),
            earlier_changes: 0,
            closed: std::collections::BTreeSet::new(),
            closed_pools: std::collections::BTreeSet::new(),
            api_reservations: 0,
            faults: Vec::new(),
            undo: Vec::new(),
            nominations: BTreeMap::new(),
            verdicts: std::collections::VecDeque::new(),
            stated_max: BTreeMap::new(),
            terminating: BTreeSet::new(),
            running: BTreeMap::new(),
            seen_members: BTreeMap::new(),
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

    /// Answers held binds whose hold ran out ([`Expired::Hold`]: the member keeps its slot and
    /// the reservation lives [`BookConfig::reservation_ttl_ms`] more, for kube-scheduler's
    /// retry), then drops the reservations that hold no bind and whose time ran out
    /// ([`Expired::Reservation`]). A reservation expires under a held bind only at its
    /// assembly limit ([`HOLD_ROUNDS_MAX`]), and one whose Bindings are in flight is left alone.
    pub fn expire(&mut self, now_ms: u64) -> Vec<Expired> {
        self.lapse_assumptions(now_ms);
        self.settle_nominations(now_ms);
        let (ttl, hold) = (self.config.reservation_ttl_ms, self.config.bind_hold_ms);
        let mut expired = Vec::new();
        let mut due = Vec::new();
        for (key, reservation) in self.gangs.iter_mut().filter(|(_, g)| !g.binding) {
            if assembly_limit(reservation, hold).is_some_and(|limit| limit <= now_ms) {
                // Not whole at bind after its rounds of holds: released, held binds answered.
                due.push(key.clone());
                continue;
            }
            let waiting_for = reservation.slots.iter().filter(|s| !s.at_bind && !s.bound).count() as u32;
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
            if let Some(reservation) = self.end_reservation(&key) {
                self.stats.gangs_expired += 1;
                expired.push(Expired::Reservation { gang: key, members_at_bind: at_bind(&reservation) });
            }
        }
        expired
    }

    /// The next instant [`Book::expire`] has work: the earliest held bind's hold limit, a
    /// reservation's assembly limit or, for a reservation holding no bind, its expiry.
    /// An assumption's lapse counts too, rounded up to the whole second: it may come up to
    /// 1 s late, and the adapter's expiry timer is not re-armed by every prioritize (each one
    /// renews its pod's assumption).
    pub fn next_expiry_ms(&self) -> Option<u64> {
        if !self.undo.is_empty() {
            // Pods to delete ([`Book::take_undo`]): due now.
            return Some(0);
        }
        let hold = self.config.bind_hold_ms;
        let gangs = self.gangs.values().filter(|g| !g.binding).map(|g| next_deadline(g, hold));
        let assumptions = self.assumed.values().map(|a| a.expires_at_ms.div_ceil(1_000).saturating_mul(1_000));
        let nominations = self.nominations.values().map(|n| n.expires_at_ms);
        gangs.chain(assumptions).chain(nominations).min()
    }

    /// Assumes a single pod on `host` with `gpus` until `now_ms` +
    /// [`BookConfig::assume_ttl_ms`] ([`Holder::Assumed`]); an earlier assumption of the same
    /// pod is replaced. The GPUs must be free: they come from the planner on this ledger.
    fn assume(&mut self, pod: &PodIdentity, host: HostId, gpus: GpuMask, now_ms: u64) {
        self.unassume(&pod.uid);
        let holder = Holder::Assumed(pod.uid.clone());
        if let Err(error) = self.ledger.reserve(&holder, &[(host, gpus)]) {
            self.ledger_fault("assuming a single pod on its chosen node", error);
            return;
        }
        let expires_at_ms = now_ms.saturating_add(self.config.assume_ttl_ms);
        self.assumed.insert(pod.uid.clone(), Assumption { pod: pod.clone(), host, gpus, expires_at_ms });
        self.stats.pods_assumed += 1;
    }

    /// Ends the assumption of the pod with this uid, if any (its GPUs are free again).
    fn unassume(&mut self, uid: &str) {
        if self.assumed.remove(uid).is_some() {
            if let Err(error) = self.ledger.release(&Holder::Assumed(uid.to_string())) {
                self.ledger_fault("ending a single pod's assumption", error);
            }
        }
    }

    /// Ends the assumptions whose time ran out.
    fn lapse_assumptions(&mut self, now_ms: u64) {
        let due: Vec<String> =
            self.assumed.iter().filter(|(_, a)| a.expires_at_ms <= now_ms).map(|(uid, _)| uid.clone()).collect();
        for uid in due {
            self.unassume(&uid);
            self.stats.assumptions_lapsed += 1;
        }
    }

    /// When the reservation of `gang` next needs [`Book::expire`], if it is waiting.
    pub fn expiry_of(&self, gang: &str) -> Option<u64> {
        let hold = self.config.bind_hold_ms;
        self.gangs.get(gang).filter(|g| !g.binding).map(|g| next_deadline(g, hold))
    }

    /// Drops a reservation whose gang was not bound: a member bound ahead of it
    /// ([`BindOrder::LeaderFirst`]) is given up too, its GPUs released and its pod queued for
    /// deletion ([`Book::take_undo`]), so the replica is not left half-placed.
    fn end_reservation(&mut self, key: &str) -> Option<GangReservation> {
        let reservation = self.drop_reservation(key)?;
        self.undo_bound_ahead(&reservation);
        Some(reservation)
    }

    /// The members of `reservation` bound ahead of their gang: released and queued for
    /// deletion.
    fn undo_bound_ahead(&mut self, reservation: &GangReservation) {
        let pods = self.give_up_bound_ahead(reservation);
        self.undo.extend(pods);
    }

    /// The members of `reservation` bound ahead of their gang, released and no longer bound
    /// in the book: the caller deletes them.
    fn give_up_bound_ahead(&mut self, reservation: &GangReservation) -> Vec<PodIdentity> {
        let ahead: Vec<PodIdentity> =
            reservation.slots.iter().filter(|s| s.bound).filter_map(|s| s.pod.clone()).collect();
        ahead.into_iter().filter(|pod| self.give_up_bound(pod)).collect()
    }

    /// A bound pod given up so that its replica is not left half-placed: no longer bound in
    /// the book, its GPUs released; whether it was bound.
    fn give_up_bound(&mut self, pod: &PodIdentity) -> bool {
        let Some(gone) = self.bound.remove(&pod.uid) else { return false };
        self.stated_max.remove(&pod.uid);
        self.terminating.remove(&pod.uid);
        if let Err(error) = self.ledger.release(&pod_holder(&pod.uid)) {
            self.ledger_fault("giving up a member bound ahead of its gang", error);
        }
        if let Some(gang) = gone.gang {
            self.prune_running(&gang);
        }
        self.hold_nominated_all();
        true
    }

    /// Bound pods the adapter must delete (a leader bound ahead of workers that then did not
    /// bind, [`BindOrder::LeaderFirst`]); each is handed out once. Their GPUs are released
    /// already. While any wait, [`Book::next_expiry_ms`] is 0, so the adapter's expiry sweep
    /// comes for them at once.
    pub fn take_undo(&mut self) -> Vec<PodIdentity> {
        std::mem::take(&mut self.undo)
    }

    fn drop_reservation(&mut self, key: &str) -> Option<GangReservation> {
        let reservation = self.gangs.remove(key)?;
        // The holder exists exactly while the reservation does.
        if let Err(error) = self.ledger.release(&gang_holder(key)) {
            self.ledger_fault("dropping a gang reservation", error);
        }
        Some(reservation)
    }

    /// GPUs that the reservations and preemption nominations planned for pods of `namespace`
    /// hold for members not bound yet (the placement API's reservations, planned for no pod,
    /// are not counted).
    pub fn unbound_gpus_in(&self, namespace: &str) -> u32 {
        let reserved = self
            .gangs
            .values()
            .filter(|r| r.planned_by.as_ref().is_some_and(|pod| pod.namespace == namespace))
            .flat_map(|r| &r.slots)
            .filter(|slot| !slot.bound);
        let nominated =
            self.nominations.values().filter(|n| n.planned_by.namespace == namespace).flat_map(|n| &n.slots);
        reserved.chain(nominated).map(|slot| slot.gpus.count_ones()).sum()
    }

    /// Refuses a new hold of `asked` GPUs for `pod` that would take its namespace past
    /// [`BookConfig::namespace_unbound_gpus_max`].
    fn check_namespace_room(&self, pod: &PodIdentity, asked: u32) -> Result<(), BookError> {
        let (held, limit) = (self.unbound_gpus_in(&pod.namespace), self.config.namespace_unbound_gpus_max);
        if held.saturating_add(asked) > limit {
            return Err(BookError::NamespaceOverLimit {
                pod: pod.to_string(),
                namespace: pod.namespace.clone(),
                held,
                asked,
                limit,
            });
        }
        Ok(())
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
                Holder::Assumed(uid) => self.assumed.contains_key(uid),
                Holder::Nominated(key) => self.nominations.contains_key(key),
            };
            if !known {
                return Err(format!("ledger holder `{holder}` belongs to no reservation or bound pod"));
            }
        }
        for key in self.gangs.keys() {
            if self.ledger.holding(&gang_holder(key)).is_none() {
                return Err(format!("gang `{key}` is reserved but holds no GPUs"));
            }
            if self.nominations.contains_key(key) {
                return Err(format!("gang `{key}` is reserved and nominated by a preemption at once"));
            }
        }
        for (uid, assumption) in &self.assumed {
            if self.bound.contains_key(uid) || self.singles.contains_key(uid) {
                return Err(format!("pod `{uid}` is assumed and also bound or binding"));
            }
            let holding = self.ledger.holding(&Holder::Assumed(uid.clone()));
            if !holding.is_some_and(|h| h.iter().all(|&(host, _)| host == assumption.host)) {
                return Err(format!("pod `{uid}` is assumed on host {} but holds no GPUs there only", assumption.host));
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
                    resource: host.pool.to_string(),
                    gpus: host.gpu_count,
                    free: mask_indices(self.ledger.free(id)),
                    held: holders
                        .into_iter()
                        .map(|(holder, mask)| {
                            let pod = match holder {
                                Holder::Pod(uid) => self.bound.get(uid).map(|b| b.pod.to_string()),
                                Holder::Assumed(uid) => self.assumed.get(uid).map(|a| a.pod.to_string()),
                                Holder::Gang(_) | Holder::Nominated(_) => None,
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
                members: g.planned.members(),
                binding: g.binding,
                expires_in_ms: next_deadline(g, self.config.bind_hold_ms).saturating_sub(now_ms),
                slots: g
                    .slots
                    .iter()
                    .map(|s| SlotState {
                        role: match &g.planned {
                            Planned::Replica(replica) => replica.roles.get(s.role).map(|r| r.name.clone()),
                            Planned::Gang(_) => None,
                        },
                        node: self.cluster.host(s.host).name.clone(),
                        gpus: mask_indices(s.gpus),
                        pod: s.pod.as_ref().map(|p| p.to_string()),
                        at_bind: s.at_bind,
                        bound: s.bound,
                    })
                    .collect(),
            })
            .collect();
        let preemptions = self.preemption_states(now_ms);
        let verdicts = self.verdict_states(now_ms);
        Snapshot { nodes, gangs, preemptions, verdicts, stats: self.stats.clone() }
    }

    /// The preemption verdicts kept, newest first, with their age.
    fn verdict_states(&self, now_ms: u64) -> Vec<VerdictState> {
        self.verdicts
            .iter()
            .rev()
            .map(|v| VerdictState { verdict: v.clone(), age_ms: now_ms.saturating_sub(v.at_ms) })
            .collect()
    }

    /// The preemptions under way, by unit.
    fn preemption_states(&self, now_ms: u64) -> Vec<PreemptionState> {
        let name = |host: HostId| self.cluster.host(host).name.clone();
        self.nominations
            .iter()
            .map(|(key, n)| {
                let nodes: BTreeSet<String> = n.slots.iter().map(|s| name(s.host)).collect();
                PreemptionState {
                    unit: key.clone(),
                    planned_by: n.planned_by.to_string(),
                    nodes: nodes.into_iter().collect(),
                    waiting_on: self.nomination_pending(key).into_iter().map(name).collect(),
                    expires_in_ms: n.expires_at_ms.saturating_sub(now_ms),
                }
            })
            .collect()
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

/// The first field in which two descriptions of one gang differ, named as its pods say it,
/// with both values (`a`'s first): what members of one gang must agree on.
pub fn gang_shape_difference(a: &Gang, b: &Gang) -> Option<(&'static str, String, String)> {
    let scope = |s: &Option<Scope>| s.as_ref().map_or_else(|| "none".to_string(), ToString::to_string);
    // A gang the placement API planned names no pool (`None`): any pool agrees with it.
    let pools = match (&a.pool, &b.pool) {
        (Some(x), Some(y)) => (x.to_string(), y.to_string()),
        _ => (String::new(), String::new()),
    };
    let fields = [
        ("the gang's size", a.members.to_string(), b.members.to_string()),
        ("nvidia.com/gpu per member", a.gpus_per_member.to_string(), b.gpus_per_member.to_string()),
        ("topoplace.io/tensor-parallel", a.tensor_parallel.to_string(), b.tensor_parallel.to_string()),
        ("topoplace.io/pipeline-parallel", a.pipeline_parallel.to_string(), b.pipeline_parallel.to_string()),
        (
            "the per-GPU memory floor (topoplace.io/min-gpu-memory, or the model's annotations)",
            format!("{} MiB", a.memory_floor_mib),
            format!("{} MiB", b.memory_floor_mib),
        ),
        (
            "topoplace.io/mig-profile",
            a.mig_profile.clone().unwrap_or_else(|| "none".into()),
            b.mig_profile.clone().unwrap_or_else(|| "none".into()),
        ),
        ("topoplace.io/topology-required", scope(&a.required), scope(&b.required)),
        ("topoplace.io/topology-preferred", scope(&a.preferred), scope(&b.preferred)),
        ("the GPU resource asked for", pools.0, pools.1),
    ];
    fields.into_iter().find(|(_, x, y)| x != y)
}

/// The field in which pods of a replica with roles describe it, as a shape difference names it.
pub const ROLES_FIELD: &str = "topoplace.io/roles";

/// The first field in which two descriptions of one replica with roles differ (`a`'s value
/// first): the roles as a whole (names, members, GPUs, parallelism, memory floor, scopes,
/// slices), then the replica's own scope.
pub fn replica_shape_difference(a: &Replica, b: &Replica) -> Option<(&'static str, String, String)> {
    let scope = |s: &Option<Scope>| s.as_ref().map_or_else(|| "none".to_string(), ToString::to_string);
    let fields = [
        (ROLES_FIELD, roles_text(a), roles_text(b)),
        ("topoplace.io/topology-required", scope(&a.required), scope(&b.required)),
        ("topoplace.io/topology-preferred", scope(&a.preferred), scope(&b.preferred)),
    ];
    fields.into_iter().find(|(_, x, y)| x != y)
}

/// A replica's roles in one line, for shape differences:
/// `leader 1x4 GPUs (TP 1, PP 1); worker 2x8 GPUs (TP 8, PP 1, required leaf)`.
pub fn roles_text(replica: &Replica) -> String {
    let role_text = |role: &topoplace_engine::workload::Role| {
        let Some(gang) = &role.gang else { return format!("{} {}x0 GPUs", role.name, role.members) };
        let mut details = vec![format!("TP {}", gang.tensor_parallel), format!("PP {}", gang.pipeline_parallel)];
        if gang.memory_floor_mib > 0 {
            details.push(format!("{} MiB per GPU", gang.memory_floor_mib));
        }
        if let Some(profile) = &gang.mig_profile {
            details.push(format!("MIG {profile}"));
        }
        if let Some(required) = &gang.required {
            details.push(format!("required {required}"));
        }
        if let Some(preferred) = &gang.preferred {
            details.push(format!("preferred {preferred}"));
        }
        if let Some(slices) = &role.slices {
            let apart = if slices.exclusive { ", each its own" } else { "" };
            details.push(format!("slices of {} in {}{apart}", slices.members, slices.scope));
        }
        format!("{} {}x{} GPUs ({})", role.name, role.members, gang.gpus_per_member, details.join(", "))
    };
    replica.roles.iter().map(role_text).collect::<Vec<_>>().join("; ")
}

/// The first difference between two plans' shapes: [`gang_shape_difference`] for two gangs,
/// [`replica_shape_difference`] for two replicas, [`ROLES_FIELD`] for one of each.
fn planned_difference(a: &Planned, b: &Planned) -> Option<(&'static str, String, String)> {
    let text = |planned: &Planned| match planned {
        Planned::Gang(_) => "no roles".to_string(),
        Planned::Replica(replica) => roles_text(replica),
    };
    match (a, b) {
        (Planned::Gang(a), Planned::Gang(b)) => gang_shape_difference(a, b),
        (Planned::Replica(a), Planned::Replica(b)) => replica_shape_difference(a, b),
        (a, b) => Some((ROLES_FIELD, text(a), text(b))),
    }
}

/// What the pods of a gang the placement API reserved must agree with it on: its size and GPUs
/// per member, and its roles (none, or the same roles). The size and GPUs are the first two
/// fields [`gang_shape_difference`] compares, so a difference in them is the one it returns;
/// topology they need not repeat.
const RESERVED_FIELDS: [&str; 3] = ["the gang's size", "nvidia.com/gpu per member", ROLES_FIELD];

/// How pods describing a gang as `ours` conflict with the placement API's reservation of it,
/// if they do: they must agree on [`RESERVED_FIELDS`] (they cannot repeat every field of the
/// API request, and the plan already honours them), and a required topology they state must
/// hold for the reserved plan (a rack they ask for must be where the reservation is; one they
/// leave out is the reservation's). The field, `ours`' value, the reservation's.
fn reserved_conflict(
    cluster: &Cluster,
    ours: &Planned,
    reservation: &GangReservation,
) -> Option<(&'static str, String, String)> {
    let difference = planned_difference(ours, &reservation.planned);
    if let Some(conflict) = difference.filter(|(field, _, _)| RESERVED_FIELDS.contains(field)) {
        return Some(conflict);
    }
    // The API plans any pool; the pods' devices come from the one their resource names.
    let pool = match ours {
        Planned::Gang(gang) => gang.pool.clone(),
        Planned::Replica(replica) => replica.gangs().find_map(|g| g.pool.clone()),
    };
    if let Some(pool) = pool {
        if let Some(slot) = reservation.slots.iter().find(|s| cluster.host(s.host).pool != pool) {
            let host = cluster.host(slot.host);
            return Some(("the GPU resource asked for", pool.to_string(), format!("{} of {}", host.pool, host.name)));
        }
    }
    let required = |planned: &Planned| match planned {
        Planned::Gang(gang) => gang.required.clone(),
        Planned::Replica(replica) => replica.required.clone(),
    };
    let stated = required(ours)?;
    let held: Vec<(HostId, GpuMask)> = reservation.slots.iter().map(|s| (s.host, s.gpus)).collect();
    if plan_meets(cluster, &stated, &held) {
        return None;
    }
    let theirs = required(&reservation.planned).map_or_else(|| "none".to_string(), |s| s.to_string());
    Some((
        "topoplace.io/topology-required",
        stated.to_string(),
        format!("{theirs}, and its plan is not in one {stated}"),
    ))
}

/// Whether the GPUs of `held` (host, GPUs) lie in one domain of `scope`, as the planner reads
/// it: one host; one NVLink clique, or NVLink-connected GPUs of one host outside any; one
/// domain of a level. A level the cluster does not have is never met.
fn plan_meets(cluster: &Cluster, scope: &Scope, held: &[(HostId, GpuMask)]) -> bool {
    let Some(&(first, _)) = held.first() else { return true };
    let hosts = || held.iter().map(|&(h, _)| h);
    match scope {
        Scope::Host => hosts().all(|h| h == first),
        Scope::Nvlink => match cluster.host(first).clique {
            Some(clique) => hosts().all(|h| cluster.host(h).clique == Some(clique)),
            None => {
                let gpus = held.iter().fold(0, |mask, &(_, g)| mask | g);
                hosts().all(|h| h == first)
                    && topoplace_engine::topology::graph::nvlink_connected(&cluster.host(first).links, gpus)
            }
        },
        Scope::Level(name) => match cluster.level_index(name) {
            Some(level) => {
                let domain = cluster.host(first).domain_path[level];
                hosts().all(|h| cluster.host(h).domain_path[level] == domain)
            }
            None => false,
        },
    }
}

/// A member arriving at a planned gang must describe it as the gang was planned: refused,
/// naming both pods (or the placement API's reservation) and the field, when it does not. The
/// pods of a gang the placement API reserved are held to [`reserved_conflict`] instead.
/// `ours` is the pod's description of its gang.
fn check_shape(
    cluster: &Cluster,
    demand: &PodDemand,
    ours: &Planned,
    reservation: &GangReservation,
    membership: &GangMembership,
) -> Result<(), BookError> {
    let difference = match reservation.planned_by {
        Some(_) => planned_difference(ours, &reservation.planned),
        None => reserved_conflict(cluster, ours, reservation),
    };
    let Some((field, ours, theirs)) = difference else { return Ok(()) };
    let planned_by = match (&reservation.planned_by, &reservation.origin) {
        (Some(pod), _) => format!("pod {pod}"),
        (None, Some(origin)) => format!("placement API reservation `{}`", origin.id),
        (None, None) => "the pod that planned it".to_string(),
    };
    Err(BookError::GangShapeMismatch(Box::new(ShapeMismatch {
        pod: demand.pod.to_string(),
        gang: membership.key.clone(),
        planned_by,
        field,
        ours,
        theirs,
    })))
}

/// What the book holds now: nodes with free and held GPUs, reservations, counters (the
/// server renders it as `GET /state`).
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub nodes: Vec<NodeState>,
    pub gangs: Vec<GangState>,
    /// Preemptions under way: plans waiting for their victims to leave.
    pub preemptions: Vec<PreemptionState>,
    /// The latest preemption verdict of each unit that asked lately, newest first.
    pub verdicts: Vec<VerdictState>,
    pub stats: BookStats,
}

/// A kept preemption verdict and how long ago it was given, in ms.
#[derive(Debug, Clone, PartialEq)]
pub struct VerdictState {
    pub verdict: preemption::PreemptionVerdict,
    pub age_ms: u64,
}

/// A preemption under way ([`preemption::Nomination`]): its plan waits for victims to leave.
#[derive(Debug, Clone, PartialEq)]
pub struct PreemptionState {
    /// The gang's key, or `pod:{uid}` for a single pod.
    pub unit: String,
    /// `namespace/name` of the pod whose preemption made the plan.
    pub planned_by: String,
    /// The nodes of the plan.
    pub nodes: Vec<String>,
    /// The nodes where a GPU of the plan is still taken (victims not gone yet).
    pub waiting_on: Vec<String>,
    /// Until the plan is given up if its victims have not left, in ms.
    pub expires_in_ms: u64,
}

#[derive(Debug, Clone)]
pub struct NodeState {
    pub name: String,
    pub product: String,
    /// The device pool's resource name ([`DevicePool`]'s `Display`).
    pub resource: String,
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
    /// The member's role, in a replica with roles.
    pub role: Option<String>,
    pub node: String,
    pub gpus: Vec<u8>,
    pub pod: Option<String>,
    pub at_bind: bool,
    /// Bound ahead of the rest of its gang ([`BindOrder::LeaderFirst`]).
    pub bound: bool,
}
