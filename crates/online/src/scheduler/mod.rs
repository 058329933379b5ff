//! The secondary scheduler's decisions: which pending pods (those with
//! `schedulerName: topoplace`) go where, as whole gangs or not at all. It owns the queue (units
//! of work: a gang or a single pod, their order, back-off and the starvation guard), gang
//! assembly (waiting until every member exists), the node predicates and the node resource
//! usage of every bound pod. GPUs are placed by the engine and held in the shared [`Book`].
//!
//! Pure and synchronous like the rest of the core: the kube adapter feeds it watch events and
//! the clock, calls [`Scheduler::cycle`], carries out the [`Decision`]s (Bindings, deletes,
//! status, Events) and reports each bind back through [`Scheduler::finish`].
//!
//! Queue policy: units are tried in order of priority (higher first), then the time the unit
//! became complete (older first). A unit that does not fit does not block the ones behind it
//! (backfill), except once it has waited longer than `starvation_ms`: then it is starving,
//! and units behind it in that order may no longer take the hosts it could use. Freed
//! capacity there is kept for it until it fits. Units of higher priority are never held back.

pub mod budgets;
pub mod predicates;
mod preempt;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::reservation::{
    BindFinish, BindOrder, Book, Planned, PodDemand, PodIdentity, PreemptionOutcome, PreemptionVerdict, RoleSlot,
    Ticket,
};
use predicates::{NodeFacts, PodNeeds, Resources};
use topoplace_engine::topology::HostId;
use topoplace_engine::workload::Replica;

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// How long a gang may wait for its missing members before it is reported incomplete.
    pub gang_wait_timeout_ms: u64,
    /// First retry delay after a unit did not fit or its Bindings failed; doubles per attempt.
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    /// Waiting this long makes a unit starving (see the module docs).
    pub starvation_ms: u64,
    /// How long a gang must look half-bound before its bound members are deleted (the two
    /// watches, bound and pending pods, may briefly disagree).
    pub repair_grace_ms: u64,
    /// How a unit that does not fit chooses victims: the whole unit at once (the default), or
    /// kube-scheduler's node-by-node way, kept as the baseline of the preemption study.
    pub preemption: PreemptionMode,
}

/// How the secondary scheduler's preemption chooses victims ([`preempt`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PreemptionMode {
    /// The whole unit judged at once, victims as whole gangs, the plan held until they left.
    #[default]
    WholeUnit,
    /// kube-scheduler's default preemption (`defaultpreemption`), for comparison only: each
    /// member of a gang on its own picks the one node whose victims let that member fit
    /// there (fewest victims breaking a budget, lowest highest priority, lowest priority sum, fewest
    /// pods), victims are single pods (part of a gang may be evicted), the unit's scope is
    /// not considered, and once the victims left the unit is planned afresh (it may preempt
    /// again). `topoplace replay preemption` compares the two; no server uses it.
    NodeByNode,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            gang_wait_timeout_ms: 120_000,
            backoff_initial_ms: 1_000,
            backoff_max_ms: 10_000,
            starvation_ms: 60_000,
            repair_grace_ms: 5_000,
            preemption: PreemptionMode::WholeUnit,
        }
    }
}

/// A pod waiting to be scheduled by topoplace.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingPod {
    pub demand: PodDemand,
    pub needs: PodNeeds,
    /// `spec.priority` (resolved from its PriorityClass by admission).
    pub priority: i32,
    /// `spec.preemptionPolicy: Never`: it waits rather than evicts anything.
    pub never_preempts: bool,
    /// `metadata.labels`: what PodDisruptionBudgets select it by once it is bound.
    pub labels: BTreeMap<String, String>,
}

/// A pod bound to a node (by anyone): what it takes of the node's resources.
#[derive(Debug, Clone, PartialEq)]
pub struct BoundPod {
    pub pod: PodIdentity,
    pub node: String,
    pub requests: Resources,
    pub gang: Option<String>,
    /// `spec.priority`: pods of a lower one are what a pending unit may preempt.
    pub priority: i32,
    /// `metadata.labels`: what PodDisruptionBudgets select it by.
    pub labels: BTreeMap<String, String>,
}

/// One Binding to create.
#[derive(Debug, Clone, PartialEq)]
pub struct BindMember {
    pub pod: PodIdentity,
    pub node: String,
    /// GPU indices for `topoplace.io/gpus`; empty for a pod without GPUs.
    pub gpus: Vec<u8>,
}

/// What the adapter must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Create every Binding concurrently, then report them with [`Scheduler::finish`].
    Bind { ticket: BindTicket, members: Vec<BindMember> },
    /// Set `PodScheduled=False` with `reason` and record an Event on every pod.
    NotScheduled { pods: Vec<PodIdentity>, reason: &'static str, message: String },
    /// A gang waits for members: an informational Event on the members that exist.
    GangWaiting { pods: Vec<PodIdentity>, message: String },
    /// Members of a gang are bound while others are pending (a scheduler died between its
    /// Bindings): delete the bound ones so the gang can be placed whole.
    Repair { gang: String, delete: Vec<PodIdentity>, message: String },
    /// `pods` (a unit that does not fit) preempt: delete `victims` (bound pods of a lower
    /// priority, whole gangs), each only if it is still that pod; an Event on every victim and
    /// on `pods`. The GPUs they give back are held for `pods` in the book meanwhile (pods
    /// without GPUs hold none), the requests of each pod of `nominated` count as used on its
    /// node for units of its priority or lower, and it is nominated to that node
    /// (`status.nominatedNodeName`, as kube-scheduler sets it on a preemptor).
    Preempt {
        pods: Vec<PodIdentity>,
        victims: Vec<PodIdentity>,
        nominated: Vec<(PodIdentity, String)>,
        message: String,
    },
    /// A preemption was given up (its victims did not leave in time, or what they freed no
    /// longer fits): clear `status.nominatedNodeName` on `pods`.
    ClearNominated { pods: Vec<PodIdentity> },
}

/// A preemption under way ([`Scheduler`]'s `preempting`).
#[derive(Debug, Clone)]
struct Preempting {
    /// When it was decided.
    since_ms: u64,
    /// The victims' uids.
    victims: BTreeSet<String>,
    /// The preemptor's priority.
    priority: i32,
    /// The pods nominated (`status.nominatedNodeName` set), cleared if it is given up.
    nominated: Vec<PodIdentity>,
    /// Its plan is held in the book ([`Book::nominate`]); pods without GPUs hold none.
    in_book: bool,
    /// Each nominated pod's requests on its node: counted as used there for units of its
    /// priority or lower while it waits (kube-scheduler's `addNominatedPods`), so that what
    /// its victims free is not taken by them.
    holds: Vec<(String, Resources)>,
}

/// A unit of the queue: a gang by its key (`namespace/name`), or a pod placed on its own
/// by uid.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum UnitKey {
    Gang(String),
    Pod(String),
}

impl UnitKey {
    /// The bytes of the unit's name as [`Display`](std::fmt::Display) writes it, without
    /// writing it: what the queue's last tie-break compares.
    fn name_bytes(&self) -> impl Iterator<Item = u8> + '_ {
        let (prefix, name) = match self {
            UnitKey::Gang(key) => ("", key),
            UnitKey::Pod(uid) => ("pod:", uid),
        };
        prefix.bytes().chain(name.bytes())
    }

    fn kind(&self) -> u8 {
        match self {
            UnitKey::Gang(_) => 0,
            UnitKey::Pod(_) => 1,
        }
    }

    /// The gang's key, for a gang.
    pub fn gang(&self) -> Option<&str> {
        match self {
            UnitKey::Gang(key) => Some(key),
            UnitKey::Pod(_) => None,
        }
    }
}

/// Units are ordered by name (`namespace/name`, or `pod:{uid}`), the queue's last tie-break.
impl Ord for UnitKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        match (self, other) {
            // Same prefix: the names alone decide, compared as strings are.
            (UnitKey::Gang(a), UnitKey::Gang(b)) | (UnitKey::Pod(a), UnitKey::Pod(b)) => a.cmp(b),
            // A gang key never starts with `pod:` (namespaces have no `:`); the kind breaks the
            // tie anyway, so that `Ord` agrees with `Eq`.
            _ => self.name_bytes().cmp(other.name_bytes()).then_with(|| self.kind().cmp(&other.kind())),
        }
    }
}

impl PartialOrd for UnitKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// `namespace/name` for a gang, `pod:{uid}` for a single pod (never parsed back).
impl std::fmt::Display for UnitKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UnitKey::Gang(key) => f.write_str(key),
            UnitKey::Pod(uid) => write!(f, "pod:{uid}"),
        }
    }
}

/// The Bindings of one unit in flight: through the book (pods with GPUs, whose GPUs the
/// book holds meanwhile), or `Plain` for a unit without GPUs, which the book never sees.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BindTicket {
    Book(Ticket),
    Plain(UnitKey),
}

/// The book's ticket, or `plain:{unit}` (for logs and messages; never parsed back).
impl std::fmt::Display for BindTicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BindTicket::Book(ticket) => ticket.fmt(f),
            BindTicket::Plain(unit) => write!(f, "plain:{unit}"),
        }
    }
}

/// `PodScheduled=False` reasons.
pub const REASON_UNSCHEDULABLE: &str = "Unschedulable";
pub const REASON_GANG_INCOMPLETE: &str = "GangIncomplete";

/// A bind reported back: what to undo and tell.
#[derive(Debug, Clone, PartialEq)]
pub enum Finished {
    Bound { members: Vec<BindMember> },
    RolledBack { delete: Vec<PodIdentity>, message: String, members: Vec<PodIdentity> },
}

#[derive(Debug, Clone, Default)]
struct UnitState {
    /// When the unit was first seen complete (its place in the queue).
    since_ms: u64,
    first_seen_ms: u64,
    attempts: u32,
    retry_at_ms: u64,
    /// The world as it was at the last failed attempt; a retry waits until it changes.
    last_world: Option<World>,
    last_attempt_ms: u64,
    last_message: Option<String>,
    complete: bool,
    waiting_reported: bool,
    /// Since when a whole gang's worth of its pods has been pending while members of it run.
    whole_worth_since_ms: Option<u64>,
    /// An elastic start's "the rest join later" was said (see [`Scheduler::cycle`]).
    extra_reported: bool,
    incomplete_reported: bool,
    in_flight: bool,
    /// The unit was tried once on its settled preemption ([`Book::preemption_settled`]).
    settled_tried: bool,
    repaired: BTreeSet<String>,
    half_bound_since_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct World {
    free_gpus: u64,
    node_changes: u64,
    freed: u64,
}

impl World {
    /// Whether something happened since `earlier` that could let a unit fit now.
    fn may_fit_more_than(self, earlier: World) -> bool {
        self.free_gpus > earlier.free_gpus || self.node_changes != earlier.node_changes || self.freed != earlier.freed
    }
}

#[derive(Debug, Clone)]
struct Placed {
    bound: BoundPod,
    /// When topoplace assumed it (its Binding was just sent), for relists; 0 if observed.
    assumed_at_ms: u64,
}

/// The scheduler's state. See the module docs.
pub struct Scheduler {
    config: SchedulerConfig,
    nodes: BTreeMap<String, NodeFacts>,
    node_changes: u64,
    usage: HashMap<String, Resources>,
    placed: HashMap<String, Placed>,
    /// Counts resources given back (a pod left): a retry condition.
    freed: u64,
    pending: BTreeMap<String, PendingPod>,
    units: BTreeMap<UnitKey, UnitState>,
    /// Tickets in flight: unit key and the members' uids.
    in_flight: BTreeMap<BindTicket, (UnitKey, Vec<BindMember>)>,
    /// The last cycle stopped at [`CYCLE_ATTEMPTS_MAX`] with units still due.
    truncated: bool,
    /// Preemptions under way, by the unit's nomination key: when they were decided and the
    /// victims' uids. A unit waits while any of them is still bound (up to
    /// [`PREEMPTION_WAIT_MAX_MS`]), and they are nobody else's victims meanwhile.
    preempting: BTreeMap<String, Preempting>,
    /// PodDisruptionBudgets by `namespace/name` ([`budgets`]).
    budgets: BTreeMap<String, budgets::DisruptionBudget>,
    /// The adapter watches budgets ([`Scheduler::expect_budgets`]) and has not listed them yet:
    /// nothing is preempted until it has.
    budgets_awaited: bool,
}

/// The longest a unit waits for the victims of its preemption to leave, in ms (their deletion
/// failed, or their termination grace is longer): its plan is kept meanwhile; past this it is
/// given up and the unit may preempt afresh.
pub const PREEMPTION_WAIT_MAX_MS: u64 = 600_000;

/// How long an assumed pod survives a relist that does not show it bound yet.
const ASSUMED_GRACE_MS: u64 = 30_000;

/// Placement attempts (units tried against the book) in one cycle, in queue order; the units
/// still due wait for the next cycle, which the runtime starts at once
/// ([`Scheduler::more_due`]). Bounds how long one cycle holds the book: at most this many
/// attempts, each within the planner's own limits (an attempt that preempts plans by
/// bisection over the candidate nodes, then once per victim unit it reprieves).
pub const CYCLE_ATTEMPTS_MAX: usize = 256;

impl Scheduler {
    pub fn new(config: SchedulerConfig) -> Self {
        Scheduler {
            config,
            nodes: BTreeMap::new(),
            node_changes: 0,
            usage: HashMap::new(),
            placed: HashMap::new(),
            freed: 0,
            truncated: false,
            pending: BTreeMap::new(),
            units: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            preempting: BTreeMap::new(),
            budgets: BTreeMap::new(),
            budgets_awaited: false,
        }
    }

    /// The adapter watches PodDisruptionBudgets: no unit preempts until
    /// [`Scheduler::budgets_listed`] (a core without it preempts with no budget known).
    pub fn expect_budgets(&mut self) {
        self.budgets_awaited = true;
    }

    /// Every PodDisruptionBudget, listed (replaces what was known).
    pub fn budgets_listed(&mut self, budgets: Vec<budgets::DisruptionBudget>) {
        self.budgets = budgets.into_iter().map(|b| (b.key(), b)).collect();
        self.budgets_awaited = false;
    }

    /// A PodDisruptionBudget added or changed.
    pub fn budget_applied(&mut self, budget: budgets::DisruptionBudget) {
        self.budgets.insert(budget.key(), budget);
    }

    /// The PodDisruptionBudget `namespace/name` as last seen, if known.
    pub fn budget(&self, key: &str) -> Option<&budgets::DisruptionBudget> {
        self.budgets.get(key)
    }

    /// A PodDisruptionBudget deleted (`namespace/name`).
    pub fn budget_deleted(&mut self, key: &str) {
        self.budgets.remove(key);
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    // ---- watch input -------------------------------------------------------------------

    pub fn node_applied(&mut self, node: NodeFacts) {
        if self.nodes.get(&node.name) != Some(&node) {
            self.node_changes += 1;
            self.nodes.insert(node.name.clone(), node);
        }
    }

    pub fn node_deleted(&mut self, name: &str) {
        if self.nodes.remove(name).is_some() {
            self.node_changes += 1;
        }
    }

    /// After a relist of nodes: exactly these exist.
    pub fn nodes_listed(&mut self, nodes: Vec<NodeFacts>) {
        let listed: BTreeMap<String, NodeFacts> = nodes.into_iter().map(|n| (n.name.clone(), n)).collect();
        if listed != self.nodes {
            self.nodes = listed;
            self.node_changes += 1;
        }
    }

    pub fn nodes(&self) -> &BTreeMap<String, NodeFacts> {
        &self.nodes
    }

    /// A pod seen bound (by anyone). Idempotent per uid.
    pub fn bound_applied(&mut self, bound: BoundPod) {
        let uid = bound.pod.uid.clone();
        self.pending.remove(&uid);
        if let Some(old) = self.placed.remove(&uid) {
            self.take_usage(&old.bound, false);
        }
        predicates::add_usage(self.usage.entry(bound.node.clone()).or_default(), &bound.requests, 1);
        self.placed.insert(uid, Placed { bound, assumed_at_ms: 0 });
    }

    /// A bound pod left (deleted, or finished).
    pub fn bound_deleted(&mut self, uid: &str) {
        if let Some(old) = self.placed.remove(uid) {
            self.take_usage(&old.bound, true);
        }
    }

    /// After a relist of bound pods: those not listed are gone, except pods topoplace bound
    /// moments ago (their watch event may still be on its way) and pods in flight.
    pub fn bound_listed(&mut self, pods: Vec<BoundPod>, now_ms: u64) {
        let listed: BTreeSet<String> = pods.iter().map(|p| p.pod.uid.clone()).collect();
        let in_flight: BTreeSet<&str> =
            self.in_flight.values().flat_map(|(_, members)| members.iter().map(|m| m.pod.uid.as_str())).collect();
        let gone: Vec<String> = self
            .placed
            .iter()
            .filter(|(uid, placed)| {
                !listed.contains(*uid)
                    && !in_flight.contains(uid.as_str())
                    && (placed.assumed_at_ms == 0 || placed.assumed_at_ms + ASSUMED_GRACE_MS <= now_ms)
            })
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in gone {
            self.bound_deleted(&uid);
        }
        for pod in pods {
            self.bound_applied(pod);
        }
    }

    fn take_usage(&mut self, bound: &BoundPod, freed: bool) {
        if let Some(used) = self.usage.get_mut(&bound.node) {
            predicates::add_usage(used, &bound.requests, -1);
            if used.is_empty() {
                self.usage.remove(&bound.node);
            }
        }
        if freed {
            self.freed += 1;
        }
    }

    /// A pending pod appeared or changed. Ignored if it is already known bound.
    pub fn pending_applied(&mut self, pod: PendingPod) {
        let uid = pod.demand.pod.uid.clone();
        if self.placed.contains_key(&uid) {
            return;
        }
        self.pending.insert(uid, pod);
    }

    /// A pending pod left the queue (deleted, or bound: the watch's selector no longer
    /// matches it).
    pub fn pending_deleted(&mut self, uid: &str) {
        self.pending.remove(uid);
    }

    /// After a relist of pending pods: exactly these are pending.
    pub fn pending_listed(&mut self, pods: Vec<PendingPod>) {
        self.pending.clear();
        for pod in pods {
            self.pending_applied(pod);
        }
    }

    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    /// Resources requested on `node` by its pods.
    pub fn usage(&self, node: &str) -> Option<&Resources> {
        self.usage.get(node)
    }

    pub fn bound_count(&self) -> usize {
        self.placed.len()
    }

    pub fn in_flight_count(&self) -> usize {
        self.in_flight.len()
    }

    // ---- the cycle ---------------------------------------------------------------------

    fn world(&self, book: &Book) -> World {
        World { free_gpus: book.ledger().free_gpus(), node_changes: self.node_changes, freed: self.freed }
    }

    fn backoff_ms(&self, attempts: u32) -> u64 {
        let shift = attempts.saturating_sub(1).min(20);
        self.config.backoff_initial_ms.saturating_mul(1 << shift).min(self.config.backoff_max_ms)
    }

    /// Pending pods grouped into units, members in rank order (rank, then name).
    fn unit_members(&self) -> BTreeMap<UnitKey, Vec<&PendingPod>> {
        let mut units: BTreeMap<UnitKey, Vec<&PendingPod>> = BTreeMap::new();
        for pod in self.pending.values() {
            let key = match &pod.demand.gang {
                Some(gang) => UnitKey::Gang(gang.key.clone()),
                None => UnitKey::Pod(pod.demand.pod.uid.clone()),
            };
            units.entry(key).or_default().push(pod);
        }
        for members in units.values_mut() {
            members.sort_by(|a, b| {
                let rank = |p: &PendingPod| p.demand.gang.as_ref().and_then(|g| g.rank).unwrap_or(u32::MAX);
                (rank(a), &a.demand.pod.name).cmp(&(rank(b), &b.demand.pod.name))
            });
        }
        units
    }

    /// One pass over the queue: every unit that may be tried is, in queue order. Returns what
    /// the adapter must do; Bindings decided here are already held in `book`.
    pub fn cycle(&mut self, book: Option<&mut Book>, now_ms: u64) -> Vec<Decision> {
        let mut decisions = Vec::new();
        let members_by_unit: BTreeMap<UnitKey, Vec<PendingPod>> =
            self.unit_members().into_iter().map(|(k, v)| (k, v.into_iter().cloned().collect())).collect();
        let in_flight_units: BTreeSet<UnitKey> = self.in_flight.values().map(|(unit, _)| unit.clone()).collect();
        self.units.retain(|key, _| members_by_unit.contains_key(key) || in_flight_units.contains(key));

        // Groups whose leader is bound ahead with the rest's GPUs held (BindOrder::LeaderFirst):
        // how many members are bound so.
        let ahead: BTreeMap<String, usize> = match book.as_deref() {
            Some(book) => members_by_unit
                .keys()
                .filter_map(|key| key.gang())
                .map(|gang| (gang.to_string(), book.bound_ahead(gang).len()))
                .filter(|(_, bound)| *bound > 0)
                .collect(),
            None => BTreeMap::new(),
        };
        // Gangs known to have run whole with a member bound: their pending pods join them.
        let ran_whole: BTreeSet<String> = match book.as_deref() {
            Some(book) => members_by_unit
                .keys()
                .filter_map(|key| key.gang())
                .filter(|gang| book.ran_whole(gang) && !ahead.contains_key(*gang))
                .map(String::from)
                .collect(),
            None => BTreeSet::new(),
        };
        // Gang assembly and repair; collect the units that are complete, and how many of the
        // pending pods an elastic gang that has not started starts with.
        let mut complete: Vec<(UnitKey, i32)> = Vec::new();
        let mut starts_with: BTreeMap<UnitKey, usize> = BTreeMap::new();
        for (key, members) in &members_by_unit {
            let state = self
                .units
                .entry(key.clone())
                .or_insert_with(|| UnitState { first_seen_ms: now_ms, ..UnitState::default() });
            if state.in_flight {
                continue;
            }
            let pods: Vec<PodIdentity> = members.iter().map(|m| m.demand.pod.clone()).collect();
            let priority = members.iter().map(|m| m.priority).max().unwrap_or(0);
            let Some(gang) = members[0].demand.gang.clone() else {
                if !state.complete {
                    state.complete = true;
                    state.since_ms = now_ms;
                }
                complete.push((key.clone(), priority));
                continue;
            };
            let size = gang.size as usize;
            let other_size = members
                .iter()
                .find(|m| m.demand.gang.as_ref().is_some_and(|g| (g.size, g.max) != (gang.size, gang.max)));
            if let Some(other) = other_size {
                let shown = |g: Option<&crate::reservation::GangMembership>| match g.map(|g| (g.size, g.max)) {
                    Some((size, Some(max))) => format!("{size} (at most {max})"),
                    Some((size, None)) => size.to_string(),
                    None => "none".into(),
                };
                let message = format!(
                    "gang `{key}`: its members disagree on the gang's size: {} says {}, {} says {}; every member \
                     must describe its gang alike",
                    members[0].demand.pod,
                    shown(Some(&gang)),
                    other.demand.pod,
                    shown(other.demand.gang.as_ref())
                );
                if state.last_message.as_ref() != Some(&message) {
                    state.last_message = Some(message.clone());
                    decisions.push(Decision::NotScheduled { pods, reason: REASON_UNSCHEDULABLE, message });
                }
                continue;
            }
            let bound: Vec<PodIdentity> = self
                .placed
                .values()
                .filter(|p| p.bound.gang.as_deref() == Some(gang.key.as_str()))
                .map(|p| p.bound.pod.clone())
                .collect();
            let leader_pending = members.iter().any(|m| is_leader_first_leader(&m.demand));
            // A LeaderFirst group whose leader is bound and whose pods still to come take no
            // GPUs: nothing is held for them (they need none), and they follow the leader.
            let gpu_less_rest = matches!(gang.order, BindOrder::LeaderFirst { .. })
                && !bound.is_empty()
                && !leader_pending
                && members.iter().all(|m| m.demand.gpus == 0);
            let bound_ahead = ahead.get(&gang.key).copied().or(gpu_less_rest.then_some(bound.len()));
            if let Some(bound_ahead) = bound_ahead {
                // The leader is bound (its workers' GPUs held): the workers are the unit.
                state.half_bound_since_ms = None;
                if leader_pending {
                    // A new leader while the old one is still bound ahead: the old one is
                    // being deleted (its group recreated); wait until it is gone.
                    state.complete = false;
                    continue;
                }
                let expected = size.saturating_sub(bound_ahead);
                if members.len() > expected {
                    let message = format!(
                        "gang `{key}` has {bound_ahead} member(s) bound ahead and {} pending, but its size is {size}: \
                         remove the extra pods or fix the size",
                        members.len()
                    );
                    if state.last_message.as_ref() != Some(&message) {
                        state.last_message = Some(message.clone());
                        decisions.push(Decision::NotScheduled { pods, reason: REASON_UNSCHEDULABLE, message });
                    }
                    continue;
                }
                if members.len() < expected {
                    state.complete = false;
                    if !state.waiting_reported {
                        state.waiting_reported = true;
                        decisions.push(Decision::GangWaiting {
                            pods,
                            message: format!(
                                "gang `{key}`: its leader is bound and its workers' GPUs are held; {} of {expected} \
                                 workers exist, waiting for the rest",
                                members.len()
                            ),
                        });
                    }
                    continue;
                }
                if !state.complete {
                    state.complete = true;
                    state.since_ms = now_ms;
                }
                complete.push((key.clone(), priority));
                continue;
            }
            if !bound.is_empty() && ran_whole.contains(&gang.key) && leader_pending {
                // A LeaderWorkerSet recreating its group: the new leader waits until the old
                // members have left (they are not deleted for it), then the group is placed whole.
                state.half_bound_since_ms = None;
                state.complete = false;
                let message = format!(
                    "gang `{key}`: its new leader waits until the {} member(s) of its earlier group still running have left",
                    bound.len()
                );
                if state.last_message.as_ref() != Some(&message) {
                    state.last_message = Some(message.clone());
                    decisions.push(Decision::GangWaiting { pods, message });
                }
                continue;
            }
            if !bound.is_empty() && ran_whole.contains(&gang.key) {
                // Pods of a gang that runs (members recreated, or more of it): they join it,
                // each on its own; its running members are never taken for a half-bound gang.
                state.half_bound_since_ms = None;
                let elastic = gang.max.is_some_and(|max| max > gang.size);
                let whole_worth = size > 1 && members.len() >= size;
                let since = match whole_worth {
                    true => *state.whole_worth_since_ms.get_or_insert(now_ms),
                    false => {
                        state.whole_worth_since_ms = None;
                        now_ms
                    }
                };
                let waited = now_ms.saturating_sub(since);
                if whole_worth && !elastic && waited < self.config.gang_wait_timeout_ms {
                    // A whole gang's worth pending while members still run: the gang recreated
                    // whole (its old members leaving). It is placed whole once they have left;
                    // if they have not within the gang wait, the pods are taken for more of
                    // the gang (a scale-out) and join it.
                    state.complete = false;
                    let message = format!(
                        "gang `{key}`: {} pods pending, a whole gang's worth, while {} member(s) of it still run; \
                         they are placed together once those have left, or join the gang if those still run after \
                         {} s",
                        members.len(),
                        bound.len(),
                        self.config.gang_wait_timeout_ms / 1000
                    );
                    if state.last_message.as_ref() != Some(&message) {
                        state.last_message = Some(message.clone());
                        decisions.push(Decision::GangWaiting { pods, message });
                    }
                    continue;
                }
                if !state.complete {
                    state.complete = true;
                    state.since_ms = now_ms;
                }
                complete.push((key.clone(), priority));
                continue;
            }
            if bound.is_empty() {
                state.half_bound_since_ms = None;
            } else {
                let since = *state.half_bound_since_ms.get_or_insert(now_ms);
                let settled = now_ms.saturating_sub(since) >= self.config.repair_grace_ms;
                let fresh: Vec<PodIdentity> =
                    bound.iter().filter(|p| !state.repaired.contains(&p.uid)).cloned().collect();
                if settled && !fresh.is_empty() && bound.len() + members.len() >= size {
                    state.repaired.extend(fresh.iter().map(|p| p.uid.clone()));
                    decisions.push(Decision::Repair {
                        gang: gang.key.clone(),
                        message: format!(
                            "gang `{key}` has {} member(s) bound and {} pending: deleting the bound ones so the whole gang of {size} is placed again together",
                            bound.len(),
                            members.len()
                        ),
                        delete: fresh,
                    });
                }
                continue;
            }
            if members.len() > size {
                // More pods than the gang starts with: a gang of one shape starts with its
                // first `size` (rank, then name) and the rest join it once it runs, up to its
                // maximum; a replica with roles or a group bound leader-first has fixed members.
                let elastic = gang.max.is_none_or(|max| max > gang.size)
                    && gang.order == BindOrder::Together
                    && members.iter().all(|m| m.demand.roles.is_none());
                if !elastic {
                    let message = format!(
                        "gang `{key}` has {} pending pods but its size is {size}{}: remove the extra pods or fix the size",
                        members.len(),
                        if gang.max == Some(gang.size) { " and so is its maximum (topoplace.io/gang-max-size)" } else { "" }
                    );
                    if state.last_message.as_ref() != Some(&message) {
                        state.last_message = Some(message.clone());
                        decisions.push(Decision::NotScheduled { pods, reason: REASON_UNSCHEDULABLE, message });
                    }
                    continue;
                }
                if !state.extra_reported {
                    state.extra_reported = true;
                    decisions.push(Decision::GangWaiting {
                        pods: pods[size..].to_vec(),
                        message: format!(
                            "gang `{key}`: {} pods pending, more than its size {size}: it starts with {size} of them and \
                             this pod joins it once it runs{}",
                            members.len(),
                            gang.max.map(|max| format!(" (up to its maximum of {max})")).unwrap_or_default()
                        ),
                    });
                }
                starts_with.insert(key.clone(), size);
            }
            // A LeaderWorkerSet leader with exclusive placement is placed before its workers
            // exist (they are created once it is bound): its group is ready with it alone.
            if members.len() < size && !leader_pending {
                state.complete = false;
                let waited = now_ms.saturating_sub(state.first_seen_ms);
                if !state.waiting_reported {
                    state.waiting_reported = true;
                    decisions.push(Decision::GangWaiting {
                        pods,
                        message: format!(
                            "gang `{key}`: {} of {size} members exist; waiting for the rest before placing any",
                            members.len()
                        ),
                    });
                } else if waited >= self.config.gang_wait_timeout_ms && !state.incomplete_reported {
                    state.incomplete_reported = true;
                    decisions.push(Decision::NotScheduled {
                        pods,
                        reason: REASON_GANG_INCOMPLETE,
                        message: format!(
                            "gang `{key}`: only {} of {size} members exist after {} s; still waiting, nothing is held",
                            members.len(),
                            waited / 1000
                        ),
                    });
                }
                continue;
            }
            if !state.complete {
                state.complete = true;
                state.since_ms = now_ms;
            }
            complete.push((key.clone(), priority));
        }

        let Some(book) = book else { return decisions };
        // Preemptions whose victims all left become their units' reservations; those whose unit
        // is gone (its pods deleted) give back what they hold; those whose victims are still
        // leaving (a long termination grace) are kept.
        book.settle(now_ms);
        let alive: BTreeSet<String> = members_by_unit.values().map(|m| Self::nomination_key(book, m)).collect();
        let under_way: Vec<String> = self.preempting.keys().cloned().collect();
        for key in under_way {
            let started = self.preempting.get(&key).map_or(0, |p| p.since_ms);
            let overdue = now_ms >= started.saturating_add(PREEMPTION_WAIT_MAX_MS);
            if !alive.contains(&key) {
                // Its pods are gone (or no longer that unit: a gang that stopped running, whose
                // joiners' key changed): those still pending are no longer nominated.
                book.cancel_preemption(&key);
                if let Some(preempting) = self.preempting.remove(&key) {
                    let pending: Vec<PodIdentity> =
                        preempting.nominated.into_iter().filter(|pod| self.pending.contains_key(&pod.uid)).collect();
                    if !pending.is_empty() {
                        decisions.push(Decision::ClearNominated { pods: pending });
                    }
                }
            } else if overdue && self.victims_left(&key) {
                let why = format!("its victims were still bound after {} s", PREEMPTION_WAIT_MAX_MS / 1000);
                decisions.extend(self.give_up_preemption(book, &key, &why, now_ms));
            } else if self.victims_left(&key) {
                book.renew_nomination(&key, now_ms);
            }
        }
        // Queue order: priority, then time complete, then key.
        complete.sort_by(|(a, pa), (b, pb)| {
            let since = |k: &UnitKey| self.units.get(k).map_or(0, |s| s.since_ms);
            pb.cmp(pa).then(since(a).cmp(&since(b))).then(a.cmp(b))
        });
        let world = self.world(book);
        let mut protected: Option<(i32, Vec<bool>)> = None;
        let mut attempts = 0;
        self.truncated = false;
        for (key, priority) in complete {
            let Some(members) = members_by_unit.get(&key) else { continue };
            let members = &members[..starts_with.get(&key).map_or(members.len(), |&n| n.min(members.len()))];
            let Some(state) = self.units.get(&key) else { continue };
            let waited = now_ms.saturating_sub(state.since_ms);
            // A unit whose preemption's victims have all left goes now, whatever its back-off
            // (once: a unit that still does not fit backs off as before).
            let nomination_key = Self::nomination_key(book, members);
            // (A unit without GPUs holds nothing in the book: its preemption settles when its
            // victims have left.)
            let settled = state.attempts > 0
                && !state.settled_tried
                && (book.preemption_settled(&nomination_key)
                    || self.preempting.get(&nomination_key).is_some_and(|p| !p.in_book))
                && !self.victims_left(&nomination_key);
            let due = settled
                || (now_ms >= state.retry_at_ms
                    && (state.last_world.is_none_or(|last| world.may_fit_more_than(last))
                        || now_ms >= state.last_attempt_ms + self.config.backoff_max_ms));
            let starving = state.attempts > 0 && waited >= self.config.starvation_ms && protected.is_none();
            let held_back = protected.as_ref().filter(|(p, _)| priority <= *p).map(|(_, hosts)| hosts.clone());
            if !due {
                if starving {
                    protected = self.wanted_hosts(book, members).map(|hosts| (priority, hosts));
                }
                continue;
            }
            if attempts == CYCLE_ATTEMPTS_MAX {
                self.truncated = true;
                break;
            }
            attempts += 1;
            if settled {
                if let Some(state) = self.units.get_mut(&key) {
                    state.settled_tried = true;
                }
            }
            // What preemptors of this priority or higher were nominated to counts as used.
            let overlay = self.nominated_overlay(priority, &nomination_key);
            self.apply_usage(&overlay, 1);
            let attempt = match self.try_place(book, &key, members, held_back.as_deref(), now_ms) {
                Ok(decision) => Ok(decision),
                Err(message) => Err(self.preempt_or_say_why(
                    book,
                    (&key, members),
                    (priority, held_back.as_deref()),
                    message,
                    now_ms,
                )),
            };
            self.apply_usage(&overlay, -1);
            match attempt {
                Ok(decision) => {
                    if let Some(state) = self.units.get_mut(&key) {
                        state.in_flight = true;
                    }
                    // Its preemption, if any, is done with (an adopted reservation is binding).
                    if self.preempting.remove(&nomination_key).is_some() {
                        book.cancel_preemption(&nomination_key);
                    }
                    decisions.push(decision);
                }
                Err((message, preempted)) => {
                    if matches!(preempted, Some(Decision::Preempt { .. })) {
                        if let Some(state) = self.units.get_mut(&key) {
                            state.settled_tried = false;
                        }
                    }
                    decisions.extend(preempted);
                    let world_now = self.world(book);
                    let backoff = self.backoff_ms(self.units.get(&key).map_or(1, |s| s.attempts + 1));
                    if let Some(state) = self.units.get_mut(&key) {
                        state.attempts += 1;
                        state.retry_at_ms = now_ms + backoff;
                        state.last_world = Some(world_now);
                        state.last_attempt_ms = now_ms;
                        if state.last_message.as_ref() != Some(&message) {
                            state.last_message = Some(message.clone());
                            decisions.push(Decision::NotScheduled {
                                pods: members.iter().map(|m| m.demand.pod.clone()).collect(),
                                reason: REASON_UNSCHEDULABLE,
                                message,
                            });
                        }
                    }
                    let now_starving = waited >= self.config.starvation_ms;
                    if now_starving && protected.is_none() {
                        protected = self.wanted_hosts(book, members).map(|hosts| (priority, hosts));
                    }
                }
            }
        }
        without_clearing_renominated(decisions)
    }

    /// After a unit did not fit (`message` says why): its preemption, when it may preempt and
    /// a pod of a lower priority is bound, or what keeps it waiting; the message to report.
    fn preempt_or_say_why(
        &mut self,
        book: &mut Book,
        (unit, members): (&UnitKey, &[PendingPod]),
        (priority, held_back): (i32, Option<&[bool]>),
        message: String,
        now_ms: u64,
    ) -> (String, Option<Decision>) {
        let key = Self::nomination_key(book, members);
        if book.nomination_waits_on(&key).is_some() {
            // `try_place` said so already.
            return (message, None);
        }
        if self.victims_left(&key) {
            return (format!("{message}; it preempted and waits for its victims to leave"), None);
        }
        if self.preempting.contains_key(&key) {
            // Its victims left (its plan waits for nothing), yet it does not fit what they
            // freed (CPU, memory or a node predicate changed, or the plan ran out while others
            // took the GPUs): the hold is given back, and it may preempt afresh later.
            let why = "what its preemption freed no longer fits it";
            let cleared = self.give_up_preemption(book, &key, why, now_ms);
            return (format!("{message}; {why}"), cleared);
        }
        let declined = |book: &mut Book, why: String| {
            let outcome = PreemptionOutcome::Declined { why };
            let preemptor = members[0].demand.pod.clone();
            book.record_preemption(PreemptionVerdict { unit: key.clone(), preemptor, at_ms: now_ms, outcome });
        };
        if members.iter().any(|m| m.never_preempts) {
            declined(book, "its preemptionPolicy is Never".into());
            return (message, None);
        }
        if !self.placed.values().any(|p| p.bound.priority < priority) {
            // Only pods of a lower priority are ever evicted.
            declined(book, format!("every pod bound is of its priority ({priority}) or higher"));
            return (message, None);
        }
        match self.try_preempt(book, (unit, members), (priority, held_back), now_ms) {
            Ok(decision) => {
                let said = match &decision {
                    Decision::Preempt { message, .. } => message.clone(),
                    _ => String::new(),
                };
                (said, Some(decision))
            }
            Err(why) => {
                let said = format!("{message}; no preemption: {why}");
                declined(book, why);
                (said, None)
            }
        }
    }

    /// Ends the preemption under `key` without its unit placed: what the book holds for it is
    /// given back, its verdict says why, and its pods' `status.nominatedNodeName` is cleared
    /// (the decision returned, if it nominated any).
    fn give_up_preemption(&mut self, book: &mut Book, key: &str, why: &str, now_ms: u64) -> Option<Decision> {
        book.cancel_preemption(key);
        let preempting = self.preempting.remove(key)?;
        let preemptor = preempting.nominated.first().cloned()?;
        let outcome = PreemptionOutcome::Declined { why: format!("its preemption was given up: {why}") };
        book.record_preemption(PreemptionVerdict { unit: key.to_string(), preemptor, at_ms: now_ms, outcome });
        Some(Decision::ClearNominated { pods: preempting.nominated })
    }

    /// The requests of the pods nominated by preemptions of `priority` or higher other than
    /// `own`'s, by node.
    fn nominated_overlay(&self, priority: i32, own: &str) -> Vec<(String, Resources)> {
        self.preempting
            .iter()
            .filter(|(key, p)| key.as_str() != own && p.priority >= priority)
            .flat_map(|(_, p)| p.holds.iter().cloned())
            .collect()
    }

    /// Adds (`sign` 1) or takes back (-1) `overlay` on the recorded usage; a node left with
    /// no usage has no entry, as [`Scheduler::check`] expects.
    fn apply_usage(&mut self, overlay: &[(String, Resources)], sign: i64) {
        for (node, requests) in overlay {
            let used = self.usage.entry(node.clone()).or_default();
            predicates::add_usage(used, requests, sign);
            if used.is_empty() {
                self.usage.remove(node);
            }
        }
    }

    /// Whether a victim of the preemption under `key` is still bound.
    fn victims_left(&self, key: &str) -> bool {
        self.preempting.get(key).is_some_and(|p| p.victims.iter().any(|uid| self.placed.contains_key(uid)))
    }

    /// Whether the last cycle stopped at [`CYCLE_ATTEMPTS_MAX`] with units still due: run
    /// the next one at once.
    pub fn more_due(&self) -> bool {
        self.truncated
    }

    /// The GPU hosts a starving unit could use: held back from the units behind it. None for a
    /// unit that would not fit even on the whole cluster with every GPU free: waiting cannot
    /// help it, and holding hosts for it would only starve the rest.
    fn wanted_hosts(&self, book: &mut Book, members: &[PendingPod]) -> Option<Vec<bool>> {
        let first = members.first()?;
        let (planned, allowed) = if let Ok(Some((replica, _))) = first.demand.replica() {
            // A replica wants the hosts any of its roles could use (its GPU pods' predicates).
            let gpu_pods: Vec<PendingPod> = members.iter().filter(|m| m.demand.gpus > 0).cloned().collect();
            (Planned::Replica(Box::new(replica)), self.allowed_hosts(book, &gpu_pods, None).0)
        } else if first.demand.gpus > 0 {
            (Planned::Gang(first.demand.gang().ok()?), self.allowed_hosts(book, members, None).0)
        } else {
            return None;
        };
        // On every GPU host, whatever its state now (busy, cordoned, NotReady): only a shape
        // the cluster cannot hold at all is given up on.
        if !book.fits_when_empty(&planned, &vec![true; allowed.len()]) {
            return None;
        }
        let gangs: Vec<&topoplace_engine::workload::Gang> = match &planned {
            Planned::Gang(gang) => vec![gang],
            Planned::Replica(replica) => replica.gangs().collect(),
        };
        let mut wanted = vec![false; allowed.len()];
        for gang in gangs {
            for (flag, want) in wanted.iter_mut().zip(book.hosts_wanted_by(gang, &allowed)) {
                *flag |= want;
            }
        }
        Some(wanted)
    }

    /// Per GPU host of the book, whether every member passes the predicates there; and the
    /// reasons (with node counts over all nodes) for the nodes that fail.
    fn allowed_hosts(
        &self,
        book: &Book,
        members: &[PendingPod],
        held_back: Option<&[bool]>,
    ) -> (Vec<bool>, BTreeMap<String, usize>) {
        let empty = Resources::new();
        let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
        let mut passing: BTreeSet<&str> = BTreeSet::new();
        for (name, node) in &self.nodes {
            let used = self.usage.get(name).unwrap_or(&empty);
            let verdict = members.iter().try_for_each(|m| predicates::check(node, used, &m.needs));
            match verdict {
                Ok(()) => {
                    passing.insert(name.as_str());
                }
                Err(unfit) => *reasons.entry(unfit.to_string()).or_insert(0) += 1,
            }
        }
        let hosts = &book.cluster().hosts;
        // Every host of a passing node (a node of the mixed MIG strategy has one per pool).
        let mut allowed: Vec<bool> = hosts.iter().map(|h| passing.contains(h.name.as_str())).collect();
        // Passing nodes with no host passed the predicates but have no GPUs the engine could give.
        let without = passing.iter().filter(|name| book.cluster().hosts_of(name).next().is_none()).count();
        if without > 0 {
            reasons.insert("node(s) had no GPUs in topoplace's view".into(), without);
        }
        // Pools the device plugin offers nothing of now (the node itself is up).
        let mut closed_count = 0;
        for (flag, open) in allowed.iter_mut().zip(book.open_hosts()) {
            if *flag && !open {
                *flag = false;
                closed_count += 1;
            }
        }
        if closed_count > 0 {
            reasons.insert("node(s) offered none of their GPU devices".into(), closed_count);
        }
        if let Some(held) = held_back {
            let mut held_count = 0;
            for (flag, &held) in allowed.iter_mut().zip(held) {
                if *flag && held {
                    *flag = false;
                    held_count += 1;
                }
            }
            if held_count > 0 {
                reasons.insert("node(s) were kept for a starving gang ahead in the queue".into(), held_count);
            }
        }
        (allowed, reasons)
    }

    fn try_place(
        &mut self,
        book: &mut Book,
        key: &UnitKey,
        members: &[PendingPod],
        held_back: Option<&[bool]>,
        now_ms: u64,
    ) -> Result<Decision, String> {
        if let Some(nodes) = book.nomination_waits_on(&Self::nomination_key(book, members)) {
            // It preempted: it goes where its plan is, once its victims have left.
            return Err(format!("it preempted and waits for its victims to leave node(s) {}", nodes.join(", ")));
        }
        let gang_key = members[0].demand.gang.as_ref().map(|g| g.key.clone());
        if let Some(gang) = gang_key.as_deref().filter(|g| book.ran_whole(g) && book.bound_ahead(g).is_empty()) {
            // Pods that preempted to join: the GPUs their victims gave back, held for them, are
            // given back now that they join (nearest their gang's members, so on those GPUs).
            book.release_single_nomination(&Self::nomination_key(book, members));
            // A whole gang's worth of a gang that is not elastic (the gang recreated, or scaled
            // out by its size) joins together or not at all, so it never runs in part once the
            // old members left; an elastic gang's pods join as room frees.
            let together = members.len() > 1
                && members[0]
                    .demand
                    .gang
                    .as_ref()
                    .is_some_and(|g| members.len() >= g.size as usize && g.max.is_none_or(|max| max <= g.size));
            return self.try_join(book, key, gang, members, (held_back, together), now_ms);
        }
        let leader_first =
            |m: &PendingPod| m.demand.gang.as_ref().is_some_and(|g| matches!(g.order, BindOrder::LeaderFirst { .. }));
        if members.iter().any(leader_first) {
            return self.try_place_leader_first(book, key, members, held_back, now_ms);
        }
        if members.iter().any(|m| m.demand.roles.is_some()) {
            return self.try_place_replica(book, key, members, held_back, now_ms);
        }
        let gpus = members[0].demand.gpus;
        if members.iter().any(|m| m.demand.gpus != gpus) {
            let shapes: Vec<String> =
                members.iter().map(|m| format!("{} asks {} GPUs", m.demand.pod.name, m.demand.gpus)).collect();
            return Err(format!("gang `{key}`: every member must ask the same number of GPUs ({})", shapes.join(", ")));
        }
        if gpus == 0 {
            return self.place_without_gpus(key, members, now_ms);
        }
        if members[0].demand.gang.is_none() || self.config.preemption == PreemptionMode::NodeByNode {
            // A single pod that preempted (or any unit, node by node): the GPUs its victims
            // gave back, held for it, are given back now that it is planned.
            book.release_single_nomination(&Self::nomination_key(book, members));
        }
        let gang = members[0].demand.gang().map_err(|e| e.to_string())?;
        for member in &members[1..] {
            let theirs = member.demand.gang().map_err(|e| e.to_string())?;
            if let Some((field, first, other)) = crate::reservation::gang_shape_difference(&gang, &theirs) {
                return Err(format!(
                    "gang `{key}`: its members disagree on {field}: {} says {first}, {} says {other}; every member \
                     must describe its gang alike",
                    members[0].demand.pod, member.demand.pod
                ));
            }
        }
        let gang_key = members[0].demand.gang.as_ref().map(|g| g.key.clone());
        let (mut allowed, mut reasons) = self.allowed_hosts(book, members, held_back);
        // A gang reserved through the placement API, or by its own preemption, binds onto its
        // reservation.
        if let Some(hosts) = gang_key.as_deref().and_then(|k| book.reserved_hosts(k)) {
            let through = match gang_key.as_deref().is_some_and(|k| book.preemption_settled(k)) {
                true => format!("gang `{key}` holds what its preemption freed"),
                false => format!("gang `{key}` is reserved through the placement API"),
            };
            if let Some((field, ours, theirs)) =
                gang_key.as_deref().and_then(|k| book.reserved_shape_difference(k, &gang))
            {
                return Err(format!("{through} with {field} {theirs}, but its pods say {ours}"));
            }
            let blocked: Vec<String> = hosts
                .iter()
                .zip(members)
                .filter(|(&h, _)| !allowed.get(h as usize).copied().unwrap_or(false))
                .map(|(&h, m)| format!("{} on `{}`", m.demand.pod.name, book.cluster().host(h).name))
                .collect();
            if !blocked.is_empty() {
                return Err(format!(
                    "{through}, but these members fail the node predicates there: {}",
                    blocked.join(", ")
                ));
            }
            let planned: Vec<String> = hosts.iter().map(|&h| book.cluster().host(h).name.clone()).collect();
            if let Err((_, message)) = self.co_located_fit(members, &planned) {
                return Err(format!("{through}, but {message}"));
            }
            return self.hold_and_start(book, key, (gang_key.as_deref(), gang), &[], members, now_ms);
        }
        // Members sharing a node must fit there together; a node where they do not is left
        // out and the gang planned again.
        for _ in 0..4 {
            let candidates = allowed.iter().filter(|&&a| a).count();
            let placement = book.plan_within(&gang, &allowed).map_err(|unplaced| {
                let what = format!("gang `{}` ({} GPUs)", gang.name, gang.total_gpus());
                self.not_fitting(&reasons, candidates, &what, &unplaced.reason)
            })?;
            let planned: Vec<String> =
                placement.members.iter().map(|m| book.cluster().host(m.host).name.clone()).collect();
            match self.co_located_fit(members, &planned) {
                Ok(()) => {
                    let holding: Vec<(HostId, u64)> = placement.members.iter().map(|m| (m.host, m.gpus)).collect();
                    return self.hold_and_start(book, key, (gang_key.as_deref(), gang), &holding, members, now_ms);
                }
                Err((node, message)) => leave_out(book, &mut allowed, &mut reasons, &node, message)?,
            }
        }
        Err(format!("gang `{key}`: no placement left whose members fit together by CPU and memory"))
    }

    /// [`Scheduler::try_place`] for the pending pods of gang `gang`, which runs: each joins it
    /// on its own (the book's join: its GPUs near the members that run, inside the gang's
    /// scope, on nodes where it passes the predicates and fits by CPU and memory with the
    /// pods joining with it); a pod without GPUs goes where the predicates leave the most
    /// room. As many as fit, in rank then name order and up to an elastic gang's maximum,
    /// are bound as one ticket; the rest stay pending and are tried again (the gang grows as
    /// capacity frees). With `together` (a whole gang's worth pending), all of them or none.
    /// If none fits, nothing is held and the first one's reason is returned.
    fn try_join(
        &mut self,
        book: &mut Book,
        key: &UnitKey,
        gang: &str,
        members: &[PendingPod],
        (held_back, together): (Option<&[bool]>, bool),
        now_ms: u64,
    ) -> Result<Decision, String> {
        // An earlier attempt's hold, if any, is planned again with the pods pending now.
        book.drop_joining(gang);
        let mut scratch: HashMap<String, Resources> = HashMap::new();
        let mut chosen = Vec::with_capacity(members.len());
        let mut joining = Vec::with_capacity(members.len());
        let mut first_refusal: Option<String> = None;
        let mut with_gpus = false;
        for member in members {
            if let Some(reason) =
                member.demand.gang.as_ref().and_then(|m| book.join_at_maximum(m, &member.demand.pod.uid))
            {
                first_refusal.get_or_insert(format!("{}: {reason}", member.demand.pod));
                break;
            }
            if member.demand.gpus == 0 {
                // Inside the replica's required domain around the members that run.
                let replica = member.demand.replica().ok().flatten().map(|(replica, _)| replica);
                let region = replica.and_then(|r| book.region_labels(&r, &book.running_hosts(gang)));
                let node = self.node_without_gpus(member, &mut scratch, region.as_deref());
                match node {
                    Ok(node) => {
                        chosen.push((member.demand.pod.clone(), node));
                        joining.push(member.clone());
                    }
                    Err(message) => {
                        first_refusal.get_or_insert(format!(
                            "gang `{key}` runs; {} cannot join it: {message}",
                            member.demand.pod
                        ));
                    }
                }
                continue;
            }
            let (mut allowed, reasons) = self.allowed_hosts(book, std::slice::from_ref(member), held_back);
            // CPU and memory with the pods placed before it in this attempt.
            for (name, used) in &scratch {
                let Some(facts) = self.nodes.get(name) else { continue };
                if predicates::fits_resources(facts, used, &member.needs.requests).is_err() {
                    for host in book.cluster().hosts_of(name) {
                        if let Some(flag) = allowed.get_mut(host as usize) {
                            *flag = false;
                        }
                    }
                }
            }
            let candidates = allowed.iter().filter(|&&a| a).count();
            match book.hold_joining_pod(&member.demand, &allowed, now_ms) {
                Ok(Some((host, _))) => {
                    with_gpus = true;
                    let node = book.cluster().host(host).name.clone();
                    let used = scratch
                        .entry(node.clone())
                        .or_insert_with(|| self.usage.get(&node).cloned().unwrap_or_default());
                    predicates::add_usage(used, &member.needs.requests, 1);
                    chosen.push((member.demand.pod.clone(), node));
                    joining.push(member.clone());
                }
                Ok(None) => {
                    first_refusal
                        .get_or_insert(format!("gang `{key}`: {} asks GPUs its role does not have", member.demand.pod));
                }
                Err(reason) => {
                    let what = format!("{} joining gang `{gang}`", member.demand.pod);
                    first_refusal.get_or_insert(self.not_fitting(&reasons, candidates, &what, &reason));
                }
            }
        }
        if chosen.is_empty() || (together && chosen.len() < members.len()) {
            book.drop_joining(gang);
            let why = first_refusal.unwrap_or_else(|| format!("gang `{key}`: no pod to join it"));
            return Err(match together {
                true => {
                    format!("gang `{key}`: its {} pending pods join it together or not at all; {why}", members.len())
                }
                false => why,
            });
        }
        let members = joining.as_slice();
        if !with_gpus {
            let chosen = chosen.into_iter().map(|(pod, node)| (pod, node, Vec::new())).collect();
            return Ok(self.start(key, BindTicket::Plain(key.clone()), chosen, members, now_ms));
        }
        let (ticket, binds) = match book.bind_joining(gang) {
            Ok(started) => started,
            Err(error) => {
                book.drop_joining(gang);
                return Err(error.to_string());
            }
        };
        let chosen = chosen
            .into_iter()
            .map(|(pod, node)| {
                let gpus = binds.iter().find(|b| b.pod.uid == pod.uid).map(|b| b.gpus.clone()).unwrap_or_default();
                (pod, node, gpus)
            })
            .collect();
        Ok(self.start(key, BindTicket::Book(ticket), chosen, members, now_ms))
    }

    /// [`Scheduler::try_place`] for a replica with roles: every member must describe the same
    /// roles and every role must have its pods; the members that take GPUs are planned by the
    /// book's replica search on the hosts where all of them pass the predicates, the GPU-less
    /// ones by the predicates alone, on nodes of the replica's required domain when that is a
    /// topology level (a node without the level's label is outside it); all of them fit their
    /// nodes together, then all are held and bound as one ticket (a failed Binding rolls the
    /// whole replica back, GPU-less pods included).
    fn try_place_replica(
        &mut self,
        book: &mut Book,
        key: &UnitKey,
        members: &[PendingPod],
        held_back: Option<&[bool]>,
        now_ms: u64,
    ) -> Result<Decision, String> {
        let ReplicaParts { replica, gpu_members, gpu_less } = replica_members(key, members)?;
        let gang_key = key.gang().unwrap_or_default().to_string();
        let gpu_pods: Vec<PendingPod> = gpu_members.iter().map(|(_, m)| (*m).clone()).collect();
        // A replica reserved through the placement API binds onto its reservation: the
        // reservation's scope holds its GPU-less pods too, and hosts kept for a starving unit
        // do not matter (the reservation holds their GPUs already).
        if let Some((reserved, planned, id)) = book.reserved_replica(&gang_key) {
            let through = match id {
                Some(id) => format!("gang `{key}` is reserved through the placement API (reservation `{id}`)"),
                None => format!("gang `{key}` holds what its preemption freed"),
            };
            if let Some((field, ours, theirs)) = book.reserved_replica_difference(&gang_key, &replica) {
                return Err(format!("{through} with {field} {theirs}, but its pods say {ours}"));
            }
            let allowed = self.allowed_hosts(book, &gpu_pods, None).0;
            let blocked: Vec<String> = planned
                .iter()
                .filter(|(_, host, _)| !allowed.get(*host as usize).copied().unwrap_or(false))
                .map(|(_, host, _)| book.cluster().host(*host).name.clone())
                .collect();
            if !blocked.is_empty() {
                return Err(format!("{through}, but its pods fail the node predicates on {}", blocked.join(", ")));
            }
            // The pods' own required scope, when they state one (the reserved plan meets it), else
            // the reservation's, holds the GPU-less pods.
            let scoped = if replica.required.is_some() { &replica } else { &reserved };
            let unit = ReplicaUnit { key, gang_key: &gang_key, replica: scoped, gpu_members, gpu_less, members };
            return match self.bind_replica_plan(book, &unit, &planned, now_ms)? {
                Attempt::Placed(decision) => Ok(decision),
                Attempt::Unfit { message, .. } => Err(format!("{through}, but {message}")),
            };
        }
        let unit = ReplicaUnit { key, gang_key: &gang_key, replica: &replica, gpu_members, gpu_less, members };
        let (mut allowed, mut reasons) = self.allowed_hosts(book, &gpu_pods, held_back);
        if book.reserved_hosts(&gang_key).is_some() {
            return Err(format!(
                "gang `{key}` is reserved through the placement API as a gang of one shape, but its pods describe \
                 roles (topoplace.io/roles)"
            ));
        }
        for _ in 0..4 {
            let candidates = allowed.iter().filter(|&&a| a).count();
            let planned = book.plan_replica_within(&replica, &allowed).map_err(|reason| {
                let what = format!("replica `{key}` ({} GPUs in its roles)", replica.total_gpus());
                self.not_fitting(&reasons, candidates, &what, &reason)
            })?;
            match self.bind_replica_plan(book, &unit, &planned, now_ms)? {
                Attempt::Placed(decision) => return Ok(decision),
                Attempt::Unfit { node, message } => leave_out(book, &mut allowed, &mut reasons, &node, message)?,
            }
        }
        Err(format!("gang `{key}`: no placement left whose members fit together by CPU and memory"))
    }

    /// [`Scheduler::try_place`] for a group that binds its leader first
    /// ([`BindOrder::LeaderFirst`]: LeaderWorkerSet exclusive placement with a leader that
    /// takes GPUs, whose workers LWS creates only once the leader is bound). Before the leader
    /// is bound, the whole group (a gang of one shape, or a replica with roles) is planned on
    /// the hosts where the leader passes the predicates (the workers do not exist yet to be
    /// checked; LWS gives them the leader's template unless a leader template differs), held
    /// in the book, and only the leader is bound; the placement API's reservation of the group
    /// is adopted instead when there is one. Once it is bound, the workers are the unit: they
    /// bind onto the held slots ([`Scheduler::bind_rest_of_group`]).
    fn try_place_leader_first(
        &mut self,
        book: &mut Book,
        key: &UnitKey,
        members: &[PendingPod],
        held_back: Option<&[bool]>,
        now_ms: u64,
    ) -> Result<Decision, String> {
        let gang_key = key.gang().unwrap_or_default().to_string();
        let leader = members.iter().find(|m| is_leader_first_leader(&m.demand));
        let mut ahead_hosts: Vec<HostId> = book.bound_ahead(&gang_key).into_iter().map(|(_, host)| host).collect();
        if ahead_hosts.is_empty() && leader.is_none() && members.iter().all(|m| m.demand.gpus == 0) {
            // Workers without GPUs after a leader bound with nothing held for them: they
            // follow it into its domain.
            ahead_hosts = self
                .placed
                .values()
                .filter(|p| p.bound.gang.as_deref() == Some(gang_key.as_str()))
                .filter_map(|p| book.cluster().hosts_of(&p.bound.node).next())
                .collect();
        }
        if !ahead_hosts.is_empty() {
            return self.bind_rest_of_group(book, key, &gang_key, members, &ahead_hosts, now_ms);
        }
        let Some(leader) = leader else {
            return Err(format!(
                "gang `{key}`: its leader is neither pending nor bound with its workers' GPUs held; its workers wait \
                 for it"
            ));
        };
        let shape = leader.demand.replica().map_err(|e| e.to_string())?;
        let (planned, own_role) = match &shape {
            Some((replica, own)) => (Planned::Replica(Box::new(replica.clone())), *own),
            None => (Planned::Gang(leader.demand.gang().map_err(|e| e.to_string())?), 0),
        };
        let rank = leader.demand.gang.as_ref().and_then(|g| g.rank).unwrap_or(0) as usize;
        // The leader's slot: its rank's slot of its role, else the role's first.
        let leader_slot = |slots: &[RoleSlot]| {
            let of_role = || slots.iter().enumerate().filter(|(_, s)| s.0 == own_role).map(|(i, _)| i);
            of_role().nth(rank).or_else(|| of_role().next())
        };
        let leader_pods = std::slice::from_ref(leader);
        if let Some(slots) = book.reserved_slots(&gang_key) {
            let through = match book.preemption_settled(&gang_key) {
                true => format!("gang `{key}` holds what its preemption freed"),
                false => format!("gang `{key}` is reserved through the placement API"),
            };
            let difference = match &planned {
                Planned::Gang(gang) => book.reserved_shape_difference(&gang_key, gang),
                Planned::Replica(replica) => book.reserved_replica_difference(&gang_key, replica),
            };
            if let Some((field, ours, theirs)) = difference {
                return Err(format!("{through} with {field} {theirs}, but its pods say {ours}"));
            }
            let Some(index) = leader_slot(&slots) else {
                return Err(format!("{through}, but its reservation has no member of the leader's role"));
            };
            let allowed = self.allowed_hosts(book, leader_pods, None).0;
            let node = book.cluster().host(slots[index].1).name.clone();
            if !allowed.get(slots[index].1 as usize).copied().unwrap_or(false) {
                return Err(format!(
                    "{through}, but its leader {} fails the node predicates on `{node}`",
                    leader.demand.pod
                ));
            }
            if let Err((_, message)) = self.co_located_fit(leader_pods, std::slice::from_ref(&node)) {
                return Err(format!("{through}, but {message}"));
            }
            let (ticket, bind) = book
                .hold_leader_for_bind(&gang_key, None, &leader.demand.pod, index, now_ms)
                .map_err(|e| e.to_string())?;
            let chosen = vec![(bind.pod, bind.node, bind.gpus)];
            return Ok(self.start(key, BindTicket::Book(ticket), chosen, leader_pods, now_ms));
        }
        let (mut allowed, mut reasons) = self.allowed_hosts(book, leader_pods, held_back);
        for _ in 0..4 {
            let candidates = allowed.iter().filter(|&&a| a).count();
            let slots: Vec<RoleSlot> = match &planned {
                Planned::Gang(gang) => book
                    .plan_within(gang, &allowed)
                    .map(|placement| placement.members.iter().map(|m| (0, m.host, m.gpus)).collect())
                    .map_err(|unplaced| {
                        let what = format!("gang `{key}` ({} GPUs)", gang.total_gpus());
                        self.not_fitting(&reasons, candidates, &what, &unplaced.reason)
                    })?,
                Planned::Replica(replica) => book.plan_replica_within(replica, &allowed).map_err(|reason| {
                    let what = format!("replica `{key}` ({} GPUs in its roles)", replica.total_gpus());
                    self.not_fitting(&reasons, candidates, &what, &reason)
                })?,
            };
            let Some(index) = leader_slot(&slots) else {
                return Err(format!("gang `{key}`: the plan has no place for its leader {}", leader.demand.pod));
            };
            // Every member planned must fit its node by CPU and memory, not only the leader:
            // the workers do not exist yet, so the leader's requests stand in for theirs (one
            // template, unless a LeaderWorkerSet's leaderTemplate differs).
            let nodes: Vec<String> = slots.iter().map(|s| book.cluster().host(s.1).name.clone()).collect();
            let stand_ins = vec![leader.clone(); slots.len()];
            match self.co_located_fit(&stand_ins, &nodes) {
                Ok(()) => {
                    let (ticket, bind) = book
                        .hold_leader_for_bind(
                            &gang_key,
                            Some((planned.clone(), &slots)),
                            &leader.demand.pod,
                            index,
                            now_ms,
                        )
                        .map_err(|e| e.to_string())?;
                    let chosen = vec![(bind.pod, bind.node, bind.gpus)];
                    return Ok(self.start(key, BindTicket::Book(ticket), chosen, leader_pods, now_ms));
                }
                Err((node, message)) => leave_out(book, &mut allowed, &mut reasons, &node, message)?,
            }
        }
        Err(format!("gang `{key}`: no placement left whose leader fits its node by CPU and memory"))
    }

    /// The workers of a group whose leader is bound ahead ([`BindOrder::LeaderFirst`]): each
    /// that takes GPUs onto its open slot of the held plan (by role and rank), after the node
    /// predicates and resources there; each GPU-less one by the predicates inside the group's
    /// required domain; all bound under one ticket, whose failure deletes the leader too (so
    /// LWS recreates the group whole). Pods that describe the group otherwise than its plan,
    /// or fail where their GPUs are held, are an error, and the book gives the leader up when
    /// the reservation expires.
    fn bind_rest_of_group(
        &mut self,
        book: &mut Book,
        key: &UnitKey,
        gang_key: &str,
        members: &[PendingPod],
        ahead_hosts: &[HostId],
        now_ms: u64,
    ) -> Result<Decision, String> {
        let mut gpu_members: Vec<(usize, Option<u32>, &PendingPod)> = Vec::new();
        let mut gpu_less: Vec<&PendingPod> = Vec::new();
        let mut replica: Option<Replica> = None;
        for member in members {
            let pod = &member.demand.pod;
            let rank = member.demand.gang.as_ref().and_then(|g| g.rank);
            let disagree = |(field, ours, theirs): (&str, String, String)| {
                format!(
                    "gang `{key}`: {pod} says {field} {ours}, but its group was planned with {theirs} when its \
                     leader was placed; every member must describe its group alike"
                )
            };
            match member.demand.replica().map_err(|e| e.to_string())? {
                Some((theirs, own)) => {
                    let planned = Planned::Replica(Box::new(theirs));
                    if let Some(difference) = book.group_shape_difference(gang_key, &planned) {
                        return Err(disagree(difference));
                    }
                    let Planned::Replica(theirs) = planned else { continue };
                    if member.demand.gpus == 0 {
                        gpu_less.push(member);
                    } else {
                        gpu_members.push((own, rank, member));
                    }
                    replica.get_or_insert(*theirs);
                }
                None => {
                    let gang = Planned::Gang(member.demand.gang().map_err(|e| e.to_string())?);
                    if let Some(difference) = book.group_shape_difference(gang_key, &gang) {
                        return Err(disagree(difference));
                    }
                    gpu_members.push((0, rank, member));
                }
            }
        }
        let pods: Vec<(usize, Option<u32>, PodIdentity)> =
            gpu_members.iter().map(|&(role, rank, m)| (role, rank, m.demand.pod.clone())).collect();
        let slots = if pods.is_empty() && book.bound_ahead(gang_key).is_empty() {
            Vec::new()
        } else {
            book.open_slots(gang_key, &pods).map_err(|e| e.to_string())?
        };
        let order: Vec<PendingPod> = gpu_members.iter().map(|(_, _, m)| (*m).clone()).collect();
        let nodes: Vec<String> = slots.iter().map(|s| book.cluster().host(s.1).name.clone()).collect();
        let empty = Resources::new();
        for (member, node) in order.iter().zip(&nodes) {
            let Some(facts) = self.nodes.get(node) else {
                return Err(format!("gang `{key}`: node `{node}`, where its group holds GPUs, is not known"));
            };
            let used = self.usage.get(node).unwrap_or(&empty);
            if let Err(unfit) = predicates::check(facts, used, &member.needs) {
                return Err(format!(
                    "gang `{key}`: {} cannot go to `{node}`, where its group holds its GPUs: {unfit}",
                    member.demand.pod
                ));
            }
        }
        if let Err((_, message)) = self.co_located_fit(&order, &nodes) {
            return Err(format!("gang `{key}`: {message}"));
        }
        let mut plain = Vec::with_capacity(gpu_less.len());
        if !gpu_less.is_empty() {
            let hosts: Vec<HostId> = ahead_hosts.iter().copied().chain(slots.iter().map(|s| s.1)).collect();
            let region = replica.as_ref().and_then(|r| book.region_labels(r, &hosts));
            let mut scratch: HashMap<String, Resources> = HashMap::new();
            for (member, node) in order.iter().zip(&nodes) {
                let used =
                    scratch.entry(node.clone()).or_insert_with(|| self.usage.get(node).cloned().unwrap_or_default());
                predicates::add_usage(used, &member.needs.requests, 1);
            }
            for member in gpu_less {
                let node = self.node_without_gpus(member, &mut scratch, region.as_deref()).map_err(|why| {
                    let inside =
                        region.as_deref().map(|labels| format!(" inside {}", labels_text(labels))).unwrap_or_default();
                    format!("gang `{key}`: no node{inside} for its GPU-less pod {}: {why}", member.demand.pod)
                })?;
                plain.push((member.demand.pod.clone(), node));
            }
        }
        let plain = plain.into_iter().map(|(pod, node)| (pod, node, Vec::new()));
        if slots.is_empty() {
            // Only GPU-less pods: nothing of the book's is held for them.
            let chosen = plain.collect();
            return Ok(self.start(key, BindTicket::Plain(key.clone()), chosen, members, now_ms));
        }
        let (ticket, binds) = book.hold_rest_for_bind(gang_key, &pods).map_err(|e| e.to_string())?;
        let mut chosen: Vec<(PodIdentity, String, Vec<u8>)> =
            binds.into_iter().map(|b| (b.pod, b.node, b.gpus)).collect();
        chosen.extend(plain);
        Ok(self.start(key, BindTicket::Book(ticket), chosen, members, now_ms))
    }

    /// Gives a replica's GPU members their slots of `planned` (role, host, GPUs: role by role,
    /// each role's pods in rank order), its GPU-less members a node by the predicates inside
    /// the replica's required domain, and, when the GPU members fit their nodes together,
    /// holds the plan in the book (or adopts the API's reservation) and starts every Binding
    /// under one ticket. `Unfit` names a node where members planned together do not fit.
    fn bind_replica_plan(
        &mut self,
        book: &mut Book,
        unit: &ReplicaUnit<'_>,
        planned: &[RoleSlot],
        now_ms: u64,
    ) -> Result<Attempt, String> {
        let matched = match self.match_replica_plan(book, unit, planned)? {
            Ok(matched) => matched,
            Err((node, message)) => return Ok(Attempt::Unfit { node, message }),
        };
        let pods: Vec<PodIdentity> = matched.order.iter().map(|m| m.demand.pod.clone()).collect();
        let (ticket, binds) = book
            .hold_replica_for_bind(unit.gang_key, unit.replica.clone(), &matched.slots, &pods, now_ms)
            .map_err(|e| e.to_string())?;
        let mut chosen: Vec<(PodIdentity, String, Vec<u8>)> =
            binds.into_iter().map(|b| (b.pod, b.node, b.gpus)).collect();
        chosen.extend(matched.plain.into_iter().map(|(pod, node)| (pod, node, Vec::new())));
        Ok(Attempt::Placed(self.start(unit.key, BindTicket::Book(ticket), chosen, unit.members, now_ms)))
    }

    /// [`Scheduler::bind_replica_plan`] without holding anything: the GPU members matched to
    /// their slots of `planned` and the GPU-less members given their nodes, on the usage
    /// recorded now. The inner error names a node where GPU members planned together do not
    /// fit by CPU and memory (plan without it); the outer one, a member with no place.
    fn match_replica_plan<'a>(
        &self,
        book: &Book,
        unit: &ReplicaUnit<'a>,
        planned: &[RoleSlot],
    ) -> Result<Result<ReplicaMatch<'a>, (String, String)>, String> {
        let key = unit.key;
        let mut taken = vec![false; planned.len()];
        let mut order: Vec<&PendingPod> = Vec::with_capacity(planned.len());
        let mut nodes: Vec<String> = Vec::with_capacity(planned.len());
        let mut slots: Vec<RoleSlot> = Vec::with_capacity(planned.len());
        for &(role, member) in &unit.gpu_members {
            let Some(slot) = (0..planned.len()).find(|&i| !taken[i] && planned[i].0 == role) else {
                let name = unit.replica.roles.get(role).map_or("?", |r| r.name.as_str());
                return Err(format!("gang `{key}`: the plan has no place for {} of role `{name}`", member.demand.pod));
            };
            taken[slot] = true;
            slots.push(planned[slot]);
            nodes.push(book.cluster().host(planned[slot].1).name.clone());
            order.push(member);
        }
        let owned: Vec<PendingPod> = order.iter().map(|m| (*m).clone()).collect();
        if let Err(unfit) = self.co_located_fit(&owned, &nodes) {
            return Ok(Err(unfit));
        }
        let hosts: Vec<HostId> = slots.iter().map(|s| s.1).collect();
        let region = book.region_labels(unit.replica, &hosts);
        // GPU-less members, after the GPU members' usage on their nodes.
        let mut scratch: HashMap<String, Resources> = HashMap::new();
        for (member, node) in order.iter().zip(&nodes) {
            let used = scratch.entry(node.clone()).or_insert_with(|| self.usage.get(node).cloned().unwrap_or_default());
            predicates::add_usage(used, &member.needs.requests, 1);
        }
        let mut plain = Vec::with_capacity(unit.gpu_less.len());
        for member in &unit.gpu_less {
            let node = self.node_without_gpus(member, &mut scratch, region.as_deref()).map_err(|why| {
                let inside =
                    region.as_deref().map(|labels| format!(" inside {}", labels_text(labels))).unwrap_or_default();
                format!("gang `{key}`: no node{inside} for its GPU-less pod {}: {why}", member.demand.pod)
            })?;
            plain.push((member.demand.pod.clone(), node));
        }
        Ok(Ok(ReplicaMatch { order, slots, nodes, plain }))
    }

    /// Why a unit found no place: the predicates' summary over every node, then, when some
    /// node was left, why `what` did not fit on those.
    fn not_fitting(&self, reasons: &BTreeMap<String, usize>, candidates: usize, what: &str, reason: &str) -> String {
        let mut message = predicates::summary(self.nodes.len(), reasons);
        if candidates > 0 {
            message.push_str(&format!(" GPUs: {what} does not fit on the {candidates} node(s) left: {reason}"));
        }
        message
    }

    /// Holds the plan (or adopts the API's reservation) in the book and starts the Bindings.
    fn hold_and_start(
        &mut self,
        book: &mut Book,
        key: &UnitKey,
        (gang_key, gang): (Option<&str>, topoplace_engine::workload::Gang),
        holding: &[(HostId, u64)],
        members: &[PendingPod],
        now_ms: u64,
    ) -> Result<Decision, String> {
        let pods: Vec<PodIdentity> = members.iter().map(|m| m.demand.pod.clone()).collect();
        let (ticket, binds) = book.hold_for_bind(gang_key, gang, holding, &pods, now_ms).map_err(|e| e.to_string())?;
        let ticket = BindTicket::Book(ticket);
        let chosen = binds.into_iter().map(|b| (b.pod, b.node, b.gpus)).collect();
        Ok(self.start(key, ticket, chosen, members, now_ms))
    }

    /// Whether members planned on `nodes` (same order) fit the nodes' resources together.
    fn co_located_fit(&self, members: &[PendingPod], nodes: &[String]) -> Result<(), (String, String)> {
        let mut scratch: HashMap<&str, Resources> = HashMap::new();
        for (member, node) in members.iter().zip(nodes) {
            let used =
                scratch.entry(node.as_str()).or_insert_with(|| self.usage.get(node).cloned().unwrap_or_default());
            let Some(facts) = self.nodes.get(node) else {
                return Err((node.clone(), format!("node `{node}` is not known")));
            };
            if let Err(unfit) = predicates::fits_resources(facts, used, &member.needs.requests) {
                return Err((node.clone(), format!("node `{node}` cannot take {} too: {unfit}", member.demand.pod)));
            }
            predicates::add_usage(used, &member.needs.requests, 1);
        }
        Ok(())
    }

    /// Pods that need no GPUs: each member on the node with the most room (kube-scheduler's
    /// LeastAllocated), preferring nodes without GPUs so GPU hosts keep their CPU and memory.
    fn place_without_gpus(&mut self, key: &UnitKey, members: &[PendingPod], now_ms: u64) -> Result<Decision, String> {
        let mut scratch: HashMap<String, Resources> = HashMap::new();
        let mut chosen = Vec::new();
        for member in members {
            let node = self.node_without_gpus(member, &mut scratch, None)?;
            chosen.push((member.demand.pod.clone(), node, Vec::new()));
        }
        Ok(self.start(key, BindTicket::Plain(key.clone()), chosen, members, now_ms))
    }

    /// The node for one pod that needs no GPUs: the most room (LeastAllocated), nodes without
    /// GPUs first, only nodes with every label of `region` (key, value) when given; its
    /// requests are added to `scratch` (usage by node, over the recorded usage). The error
    /// summarises why the nodes failed the predicates.
    fn node_without_gpus(
        &self,
        member: &PendingPod,
        scratch: &mut HashMap<String, Resources>,
        region: Option<&[(String, String)]>,
    ) -> Result<String, String> {
        let empty = Resources::new();
        let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
        let mut best: Option<(bool, i64, &str)> = None;
        for (name, node) in &self.nodes {
            if let Some(labels) = region {
                if labels.iter().any(|(key, value)| node.labels.get(key) != Some(value)) {
                    *reasons
                        .entry(format!("node(s) were outside the replica's {}", labels_text(labels)))
                        .or_insert(0) += 1;
                    continue;
                }
            }
            let used = scratch.get(name).or_else(|| self.usage.get(name)).unwrap_or(&empty);
            match predicates::check(node, used, &member.needs) {
                Ok(()) => {
                    let has_gpus = node.allocatable.get(predicates::GPU_RESOURCE).is_some_and(|&g| g > 0);
                    let room = free_share_per_mille(node, used);
                    let candidate = (!has_gpus, room, name.as_str());
                    if best.is_none_or(|b| (candidate.0, candidate.1) > (b.0, b.1)) {
                        best = Some(candidate);
                    }
                }
                Err(unfit) => *reasons.entry(unfit.to_string()).or_insert(0) += 1,
            }
        }
        let Some((_, _, node)) = best else {
            return Err(predicates::summary(self.nodes.len(), &reasons));
        };
        let node = node.to_string();
        let used = scratch.entry(node.clone()).or_insert_with(|| self.usage.get(&node).cloned().unwrap_or_default());
        predicates::add_usage(used, &member.needs.requests, 1);
        Ok(node)
    }

    /// Assumes the unit's pods on their nodes and marks the ticket in flight.
    fn start(
        &mut self,
        key: &UnitKey,
        ticket: BindTicket,
        chosen: Vec<(PodIdentity, String, Vec<u8>)>,
        members: &[PendingPod],
        now_ms: u64,
    ) -> Decision {
        let mut binds = Vec::new();
        for (pod, node, gpus) in chosen {
            let requests = members
                .iter()
                .find(|m| m.demand.pod.uid == pod.uid)
                .map(|m| m.needs.requests.clone())
                .unwrap_or_default();
            let gang = members[0].demand.gang.as_ref().map(|g| g.key.clone());
            let member = members.iter().find(|m| m.demand.pod.uid == pod.uid);
            let priority = member.map_or(0, |m| m.priority);
            let labels = member.map(|m| m.labels.clone()).unwrap_or_default();
            let bound = BoundPod { pod: pod.clone(), node: node.clone(), requests, gang, priority, labels };
            predicates::add_usage(self.usage.entry(node.clone()).or_default(), &bound.requests, 1);
            self.placed.insert(pod.uid.clone(), Placed { bound, assumed_at_ms: now_ms });
            binds.push(BindMember { pod, node, gpus });
        }
        self.in_flight.insert(ticket.clone(), (key.clone(), binds.clone()));
        Decision::Bind { ticket, members: binds }
    }

    /// The outcome of a ticket's Bindings (`Ok` per pod bound, or already bound to the
    /// planned node). On any failure the members that did bind must be deleted, the rest
    /// are pending again and the unit backs off.
    pub fn finish(
        &mut self,
        book: Option<&mut Book>,
        ticket: &BindTicket,
        outcomes: &[(PodIdentity, Result<(), String>)],
        now_ms: u64,
    ) -> Finished {
        let Some((unit, members)) = self.in_flight.remove(ticket) else {
            return Finished::RolledBack {
                delete: Vec::new(),
                message: format!("ticket `{ticket}` is not in flight"),
                members: Vec::new(),
            };
        };
        let book_finish = match book {
            Some(book) => match ticket {
                BindTicket::Book(ticket) => {
                    let finish = book.bind_finished(ticket, outcomes, now_ms);
                    if let (Ticket::Leader { gang, .. }, BindFinish::RolledBack { .. }) = (ticket, &finish) {
                        // The leader's retry plans afresh; nothing stays held meanwhile.
                        book.drop_unbound_reservation(gang);
                    }
                    Some(finish)
                }
                BindTicket::Plain(_) => None,
            },
            None => None,
        };
        let failures: Vec<String> =
            outcomes.iter().filter_map(|(pod, r)| r.as_ref().err().map(|e| format!("{pod}: {e}"))).collect();
        let reported: BTreeSet<&str> = outcomes.iter().map(|(p, _)| p.uid.as_str()).collect();
        let all_reported = members.iter().all(|m| reported.contains(m.pod.uid.as_str()));
        let bound_ok =
            failures.is_empty() && all_reported && !matches!(book_finish, Some(BindFinish::RolledBack { .. }));
        if bound_ok {
            for member in &members {
                self.pending.remove(&member.pod.uid);
                if let Some(placed) = self.placed.get_mut(&member.pod.uid) {
                    placed.assumed_at_ms = now_ms;
                }
            }
            self.units.remove(&unit);
            return Finished::Bound { members };
        }
        let mut delete: Vec<PodIdentity> =
            outcomes.iter().filter(|(_, r)| r.is_ok()).map(|(pod, _)| pod.clone()).collect();
        // The book adds members bound ahead of the ticket (a leader whose workers failed).
        if let Some(BindFinish::RolledBack { delete: more, .. }) = &book_finish {
            for pod in more {
                if !delete.iter().any(|p| p.uid == pod.uid) {
                    delete.push(pod.clone());
                }
            }
        }
        let deleted: BTreeSet<&str> = delete.iter().map(|p| p.uid.as_str()).collect();
        for member in &members {
            if deleted.contains(member.pod.uid.as_str()) {
                // Bound, about to be deleted: no longer pending; its usage goes with its
                // watch deletion.
                self.pending.remove(&member.pod.uid);
            } else if let Some(placed) = self.placed.remove(&member.pod.uid) {
                self.take_usage(&placed.bound, true);
            }
        }
        let backoff = self.backoff_ms(self.units.get(&unit).map_or(1, |s| s.attempts + 1));
        if let Some(state) = self.units.get_mut(&unit) {
            state.repaired.extend(deleted.iter().map(|uid| uid.to_string()));
            state.in_flight = false;
            state.attempts += 1;
            state.retry_at_ms = now_ms + backoff;
            state.last_world = None;
        }
        let message = format!(
            "{unit}: not every member could be bound ({}); {} bound member(s) deleted so the gang is not half-bound; retrying in {} ms",
            if failures.is_empty() { "the outcome of some Bindings is unknown".to_string() } else { failures.join("; ") },
            delete.len(),
            backoff
        );
        Finished::RolledBack { delete, message, members: members.into_iter().map(|m| m.pod).collect() }
    }

    /// Checks the scheduler's own invariants: per-node usage equals the sum over placed pods,
    /// every in-flight member is assumed, no pod is both pending and in flight.
    pub fn check(&self) -> Result<(), String> {
        let mut expected: HashMap<String, Resources> = HashMap::new();
        for placed in self.placed.values() {
            predicates::add_usage(expected.entry(placed.bound.node.clone()).or_default(), &placed.bound.requests, 1);
        }
        expected.retain(|_, r| !r.is_empty());
        if expected != self.usage {
            return Err("node usage differs from the sum of the placed pods' requests".into());
        }
        for (ticket, (_, members)) in &self.in_flight {
            for member in members {
                if !self.placed.contains_key(&member.pod.uid) {
                    return Err(format!("ticket `{ticket}`: member {} is in flight but not assumed", member.pod));
                }
            }
        }
        Ok(())
    }
}

/// The smallest free share (per mille) over CPU and memory: LeastAllocated's measure.
fn free_share_per_mille(node: &NodeFacts, used: &Resources) -> i64 {
    ["cpu", "memory"]
        .iter()
        .filter_map(|r| {
            let allocatable = *node.allocatable.get(*r)?;
            (allocatable > 0).then(|| (allocatable - used.get(*r).copied().unwrap_or(0)) * 1000 / allocatable)
        })
        .min()
        .unwrap_or(1000)
}

/// `decisions` without the clearing of a pod's nomination when the same cycle nominates it
/// again (the adapter carries decisions out concurrently: a late clear would undo the new
/// nomination).
fn without_clearing_renominated(mut decisions: Vec<Decision>) -> Vec<Decision> {
    let renominated: BTreeSet<String> = decisions
        .iter()
        .filter_map(|d| match d {
            Decision::Preempt { nominated, .. } => Some(nominated.iter().map(|(pod, _)| pod.uid.clone())),
            _ => None,
        })
        .flatten()
        .collect();
    if renominated.is_empty() {
        return decisions;
    }
    for decision in &mut decisions {
        if let Decision::ClearNominated { pods } = decision {
            pods.retain(|pod| !renominated.contains(&pod.uid));
        }
    }
    decisions.retain(|d| !matches!(d, Decision::ClearNominated { pods } if pods.is_empty()));
    decisions
}

/// The pods of a replica with roles (`topoplace.io/roles`), checked: every one describes the
/// same roles, and each role has exactly its members. Its roles, the members that take GPUs
/// with their role's index (in the order of `members`, rank order), and those that take none.
/// Errors name the pod and the field.
fn replica_members<'a>(key: &UnitKey, members: &'a [PendingPod]) -> Result<ReplicaParts<'a>, String> {
    let first = &members[0].demand.pod;
    let describe = |member: &PendingPod| member.demand.replica().map_err(|e| e.to_string());
    let Some((replica, _)) = describe(&members[0])? else {
        return Err(format!(
            "gang `{key}`: {first} has no roles (topoplace.io/roles) but others of its gang do; every member must \
             describe its gang alike"
        ));
    };
    let mut roles_of = Vec::with_capacity(members.len());
    for member in members {
        let Some((theirs, own)) = describe(member)? else {
            return Err(format!(
                "gang `{key}`: {} has no roles (topoplace.io/roles) but {first} has; every member must describe \
                 its gang alike",
                member.demand.pod
            ));
        };
        if let Some((field, ours, other)) = crate::reservation::replica_shape_difference(&replica, &theirs) {
            return Err(format!(
                "gang `{key}`: its members disagree on {field}: {first} says {ours}, {} says {other}; every member \
                 must describe its gang alike",
                member.demand.pod
            ));
        }
        roles_of.push(own);
    }
    for (index, role) in replica.roles.iter().enumerate() {
        let count = roles_of.iter().filter(|&&r| r == index).count();
        if count != role.members as usize {
            return Err(format!(
                "gang `{key}`: role `{}` has {} members, but {count} of the gang's pods are in it",
                role.name, role.members
            ));
        }
    }
    // Members that take GPUs, per role in rank order (the order `members` has).
    let gpu_members: Vec<(usize, &PendingPod)> =
        roles_of.iter().copied().zip(members).filter(|(_, m)| m.demand.gpus > 0).collect();
    let gpu_less: Vec<&PendingPod> = members.iter().filter(|m| m.demand.gpus == 0).collect();
    Ok(ReplicaParts { replica, gpu_members, gpu_less })
}

/// A replica's pods by what they take: [`replica_members`]'s answer.
struct ReplicaParts<'a> {
    replica: Replica,
    /// Members that take GPUs, with their role's index, in rank order.
    gpu_members: Vec<(usize, &'a PendingPod)>,
    /// Members that take none.
    gpu_less: Vec<&'a PendingPod>,
}

/// A replica with roles being placed by the secondary scheduler: its members, those that
/// take GPUs with their role's index, those that take none.
struct ReplicaUnit<'a> {
    key: &'a UnitKey,
    gang_key: &'a str,
    replica: &'a Replica,
    gpu_members: Vec<(usize, &'a PendingPod)>,
    gpu_less: Vec<&'a PendingPod>,
    members: &'a [PendingPod],
}

/// A replica's members matched to a plan ([`Scheduler::match_replica_plan`]).
struct ReplicaMatch<'a> {
    /// The GPU members, in the order of `slots` and `nodes`.
    order: Vec<&'a PendingPod>,
    slots: Vec<RoleSlot>,
    nodes: Vec<String>,
    /// The GPU-less members and their nodes.
    plain: Vec<(PodIdentity, String)>,
}

/// One try of a replica's plan.
enum Attempt {
    Placed(Decision),
    /// Members planned onto `node` do not fit it together (CPU, memory): plan without it.
    Unfit {
        node: String,
        message: String,
    },
}

/// `key=value,key=value`, for messages.
fn labels_text(labels: &[(String, String)]) -> String {
    labels.iter().map(|(key, value)| format!("{key}={value}")).collect::<Vec<_>>().join(",")
}

/// Leaves `node` out of the next plan (its members did not fit it together), counting why; the
/// error is `message` when the node is not in the book's view.
fn leave_out(
    book: &Book,
    allowed: &mut [bool],
    reasons: &mut BTreeMap<String, usize>,
    node: &str,
    message: String,
) -> Result<(), String> {
    let mut hosts = book.cluster().hosts_of(node).peekable();
    if hosts.peek().is_none() {
        return Err(message);
    }
    for host in hosts {
        allowed[host as usize] = false;
    }
    *reasons.entry("Insufficient resources for the members planned together".into()).or_insert(0) += 1;
    Ok(())
}

/// Whether the pod is the leader of a group that binds its leader first
/// ([`BindOrder::LeaderFirst`]).
fn is_leader_first_leader(demand: &PodDemand) -> bool {
    demand.gang.as_ref().is_some_and(|g| g.order == BindOrder::LeaderFirst { leader: true })
}
