//! The placement engine: a whole gang onto hosts and concrete GPU indices, or nothing.
//!
//! Stages, in the order kube-scheduler's framework would name them:
//! 1. *Filter* every host for the gang's unit (memory floor, NVLink for tensor
//!    parallelism, free GPUs that form the unit) and count how many units it holds;
//!    rejections are tallied per reason for the explanation.
//! 2. *Candidates*, per GPU product (a gang never mixes products): every host that holds
//!    the whole gang, every NVLink clique, and every topology domain that holds it while
//!    none of its children does (the smallest domains that fit), then the whole cluster.
//!    `topology.required` removes candidates wider than its scope.
//! 3. *Fill* a domain candidate top-down: where a child holds the rest, the child that
//!    fits most tightly; otherwise the roomiest child first. This keeps the gang inside as
//!    few sub-domains as possible and leaves big free blocks big.
//! 4. *Choose GPUs* inside each host ([`gpus`]) and *score* ([`score`]); the best total
//!    wins. Ties pack ([`PackKey`]): the fewest GPUs left free on the hosts taken, then the
//!    fewest whole free hosts in their innermost domains, then the earlier candidate, so the
//!    answer is deterministic.
//!
//! The engine reads a [`Ledger`] and never writes it; [`Planner::plan`] places a batch
//! by reserving each placed gang before the next is placed.

pub mod capacity;
pub mod exact;
pub mod gpus;
pub mod replica;
pub mod score;

use std::collections::HashMap;
use std::fmt::Write as _;

use thiserror::Error;

use crate::ledger::{mask_indices, GpuUse, Ledger};
use crate::quantity::format_gib;
use crate::topology::graph::nvlink_connected;
use crate::topology::{Cluster, GpuMask, HostId, ProductId};
use crate::workload::{Gang, Replica, Scope};
use gpus::{remaining_connectivity, set_quality, unit_quality, GpuChooser, UnitShape};
pub use score::{default_shapes, shapes_for, Demand, DemandKey, FreeShape, ScoreComponents, WeightedShape, Weights};

/// Candidates listed in an explanation.
const EXPLAIN_CANDIDATES_MAX: usize = 10;
/// Example hosts named per rejection reason.
const EXPLAIN_EXAMPLES_MAX: usize = 3;

#[derive(Debug, Clone)]
pub struct PlannerConfig {
    pub weights: Weights,
    pub shapes: Vec<WeightedShape>,
    pub explain: bool,
}

impl Default for PlannerConfig {
    fn default() -> Self {
        PlannerConfig { weights: Weights::default(), shapes: default_shapes(), explain: false }
    }
}

/// A gang that does not make sense for this cluster (as opposed to one that does not fit).
#[derive(Debug, Error, PartialEq)]
pub enum GangInputError {
    #[error(
        "gang `{gang}`: topology.{field} is `{level}`, which is not a level of this cluster \
         (levels: {known}; or `host`, `nvlink`)"
    )]
    UnknownLevel { gang: String, field: &'static str, level: String, known: String },
    #[error(
        "gang `{gang}`: slices.required is `{level}`, which is not a level of this cluster \
         (levels: {known}; or `host`, `nvlink`)"
    )]
    UnknownSliceLevel { gang: String, level: String, known: String },
    #[error(
        "gang `{gang}`: slices.required `{slice}` is wider than the role's own topology.required \
         `{role}`; a slice must lie inside its role's scope"
    )]
    SliceWiderThanRole { gang: String, slice: String, role: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResolvedScope {
    Nvlink,
    Host,
    Level(usize),
}

#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct MemberPlacement {
    pub member: u32,
    pub host: HostId,
    pub gpus: GpuMask,
}

#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct CandidateSummary {
    pub scope: String,
    pub product: String,
    pub hosts: Vec<String>,
    pub score: ScoreComponents,
    /// How tightly it packs: what decides between candidates of equal total ([`PackKey`]).
    pub pack: PackKey,
    /// Other hosts that would have scored and packed exactly the same (not scored again).
    pub equivalent_hosts: usize,
}

#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct RejectionGroup {
    pub reason: String,
    pub hosts: usize,
    pub examples: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Explanation {
    pub rejected_hosts: Vec<RejectionGroup>,
    pub domains: Vec<String>,
    pub candidates: Vec<CandidateSummary>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GangPlacement {
    pub gang: String,
    pub product: ProductId,
    pub scope: String,
    pub members: Vec<MemberPlacement>,
    pub score: ScoreComponents,
    pub candidates: usize,
    pub runner_up: Option<CandidateSummary>,
    pub explanation: Option<Explanation>,
    pub solver: SolverInfo,
}

/// Which solver produced a placement, and how good it is known to be.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "camelCase"))]
pub struct SolverInfo {
    /// `greedy`, or `exact/microlp`, `exact/highs`.
    pub solver: String,
    /// The placement's score (the scoring function's total).
    pub objective: f64,
    /// For exact: the best objective any placement could reach over the candidate hosts
    /// (equal to `objective` when proven optimal; from the LP relaxation otherwise).
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub bound: Option<f64>,
    /// (bound - objective) / |bound|.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub gap: Option<f64>,
    /// Why another solver's answer was used, or what limited this one.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub note: Option<String>,
}

impl SolverInfo {
    pub fn greedy(objective: f64) -> Self {
        SolverInfo { solver: "greedy".into(), objective, bound: None, gap: None, note: None }
    }
}

impl GangPlacement {
    /// Per host, the GPUs the gang takes (what the ledger reserves).
    pub fn holding(&self) -> Vec<(HostId, GpuMask)> {
        crate::ledger::merge_by_host(self.members.iter().map(|m| (m.host, m.gpus)))
    }

    /// GPUs the gang takes.
    pub fn gpus(&self) -> u64 {
        self.members.iter().map(|m| u64::from(m.gpus.count_ones())).sum()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Unplaced {
    pub gang: String,
    pub reason: String,
    pub explanation: Option<Explanation>,
}

#[derive(Debug, Clone, Default)]
pub struct BatchPlan {
    /// Gangs of one shape (replicas of one role).
    pub placements: Vec<GangPlacement>,
    /// Replicas with roles ([`Planner::plan_replicas`]).
    pub replicas: Vec<replica::ReplicaPlacement>,
    pub unplaced: Vec<Unplaced>,
    /// How the batch was planned, when it was not gang by gang with one solver.
    pub note: Option<String>,
}

impl BatchPlan {
    pub fn gpus_placed(&self) -> u64 {
        let gangs: u64 = self.placements.iter().map(GangPlacement::gpus).sum();
        gangs + self.replicas.iter().map(replica::ReplicaPlacement::gpus).sum::<u64>()
    }
}

/// Why a host cannot take even one unit; tallied per (reason, product).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HostRejection {
    MemoryTooSmall,
    NoNvlink,
    /// The host's GPUs are MIG devices and the gang's members need more than one GPU, or
    /// tensor parallelism (a CUDA process sees one MIG device).
    MigSlice,
    /// The host's devices are shared replicas of GPUs (time-slicing, MPS) and the gang's
    /// members need more than one GPU, or tensor parallelism: more replicas are no more GPU
    /// (the device plugin's README, "Shared Access to GPUs").
    SharedReplica,
    /// The gang asks for MIG devices of one profile ([`crate::workload::MemoryNeed::MigProfile`])
    /// and the host's GPUs are not such devices.
    OtherMigProfile,
    /// The gang's pods ask for devices of another resource than the host's
    /// ([`crate::workload::Gang::pool`]): a node of the mixed MIG strategy offers its whole
    /// GPUs as `nvidia.com/gpu` and each profile's MIG devices as `nvidia.com/mig-<profile>`.
    OtherDevicePool,
    UnitLargerThanHost,
    NotEnoughFree,
    FreeNotConnected,
    /// The caller did not offer the host (kube-scheduler's other filters removed it).
    NotOffered,
    /// The host is outside the region a replica's search confined this part to
    /// ([`replica`]).
    OutsideRegion,
}

impl HostRejection {
    /// Whether freeing GPUs on the host (evicting pods) could change the verdict.
    pub fn resolvable_by_freeing_gpus(self) -> bool {
        matches!(self, HostRejection::NotEnoughFree | HostRejection::FreeNotConnected)
    }

    fn text(self, product: &str, memory_mib: u64, gang: &Gang) -> String {
        match self {
            HostRejection::MemoryTooSmall => format!(
                "{product}: GPU memory {} is below the floor of {}",
                format_gib(memory_mib),
                format_gib(gang.memory_floor_mib)
            ),
            HostRejection::NoNvlink => format!(
                "{product}: NVLink cannot connect a tensor-parallel group of {} here, and the gang requires nvlink",
                gang.tensor_parallel
            ),
            HostRejection::MigSlice => format!(
                "{product}: its GPUs are MIG slices, which take members of one GPU without tensor parallelism \
                 (members of {} GPUs, tensorParallel {})",
                gang.gpus_per_member, gang.tensor_parallel
            ),
            HostRejection::SharedReplica => format!(
                "{product}: its GPUs are shared replicas, which take members of one GPU without tensor parallelism \
                 (members of {} GPUs, tensorParallel {})",
                gang.gpus_per_member, gang.tensor_parallel
            ),
            HostRejection::OtherMigProfile => format!(
                "{product}: not MIG devices of profile {}, which the gang asks for",
                gang.mig_profile.as_deref().unwrap_or_default()
            ),
            HostRejection::OtherDevicePool => format!(
                "{product}: its devices are not offered as {}, the resource the gang's pods ask for",
                gang.pool.as_ref().map(ToString::to_string).unwrap_or_default()
            ),
            HostRejection::UnitLargerThanHost => format!(
                "{product}: a tensor-parallel group of {} GPUs is larger than the host and the host is in no NVLink clique",
                gang.unit_gpus()
            ),
            HostRejection::NotEnoughFree => {
                format!("{product}: fewer free GPUs than one unit of {} GPUs", gang.unit_gpus())
            }
            HostRejection::FreeNotConnected => format!(
                "{product}: enough free GPUs, but no {} of them NVLink-connected in groups of {}",
                gang.unit_gpus(),
                gang.tensor_parallel
            ),
            HostRejection::NotOffered => "not offered by the scheduler".into(),
            HostRejection::OutsideRegion => "outside the region searched".into(),
        }
    }
}

/// How tightly a placement packs: the tie-break among placements of equal total score,
/// smaller first, before the candidate order (the host index). Best fit on the hosts' GPUs,
/// then on the domains' whole hosts:
/// - `free_left`: GPUs still free on the hosts the placement takes GPUs from, once it holds
///   them (a 1-GPU pod on a host with 2 free GPUs: 1; on an empty 8-GPU host: 7);
/// - `domain_whole_hosts`: hosts with every GPU free, before the placement, in the innermost
///   topology domains (racks) it touches; without levels, in the cluster. Of two racks with
///   room, the one with fewer empty hosts is broken, so the other keeps room for multi-host
///   replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct PackKey {
    pub free_left: u32,
    pub domain_whole_hosts: u32,
}

impl PackKey {
    /// The key of taking `taken` (host, GPUs) in the state `ledger`.
    pub fn of(
        cluster: &Cluster,
        ledger: &GpuUse,
        whole_free: &score::WholeFreeIndex,
        taken: &[(HostId, GpuMask)],
    ) -> Self {
        let mut free_left = 0u32;
        let mut leaves: Vec<Option<u32>> = Vec::with_capacity(taken.len());
        for &(host, mask) in taken {
            free_left += (ledger.free(host) & !mask).count_ones();
            let leaf = cluster.host(host).domain_path.last().copied();
            if !leaves.contains(&leaf) {
                leaves.push(leaf);
            }
        }
        let domain_whole_hosts = leaves
            .iter()
            .map(|leaf| match leaf {
                Some(d) => whole_free.per_leaf_domain.get(*d as usize).copied().unwrap_or(0),
                None => whole_free.cluster_total,
            })
            .sum();
        PackKey { free_left, domain_whole_hosts }
    }
}

/// Whether a placement scored `total` with `pack` beats the best so far (`best`): a higher
/// total (compared in units of 1e-9), or an equal one that packs tighter. Equal in both: the
/// earlier stays.
pub fn beats(total: f64, pack: PackKey, best: (f64, PackKey)) -> bool {
    (quantised(total), std::cmp::Reverse(pack)) > (quantised(best.0), std::cmp::Reverse(best.1))
}

/// A total in units of 1e-9, so that rounding noise does not order placements (and the order
/// is total, unlike a comparison with a tolerance).
fn quantised(total: f64) -> i64 {
    (total * 1e9).round() as i64
}

/// One host's verdict for a gang that fits on one host ([`Planner::score_hosts`]).
#[derive(Debug, Clone, PartialEq)]
pub enum HostVerdict {
    /// `pack` breaks ties between hosts of equal `score.total` ([`beats`]).
    Fits {
        members: Vec<MemberPlacement>,
        score: ScoreComponents,
        pack: PackKey,
    },
    Rejected {
        reason: HostRejection,
        text: String,
    },
}

#[derive(Debug, Default)]
struct RejectionTally {
    groups: Vec<((HostRejection, ProductId), usize, Vec<HostId>)>,
    /// Why hosts outside the request's `within` were left out ([`PlaceRequest::outside`]).
    outside: Outside,
}

impl RejectionTally {
    fn with_outside(outside: Outside) -> Self {
        RejectionTally { groups: Vec::new(), outside }
    }

    fn add(&mut self, reason: HostRejection, product: ProductId, host: HostId) {
        // Hosts outside a replica's region are one group whatever their product.
        let same = |key: &(HostRejection, ProductId)| match reason {
            HostRejection::OutsideRegion => key.0 == reason,
            _ => *key == (reason, product),
        };
        match self.groups.iter_mut().find(|(key, _, _)| same(key)) {
            Some((_, count, examples)) => {
                *count += 1;
                if examples.len() < EXPLAIN_EXAMPLES_MAX {
                    examples.push(host);
                }
            }
            None => self.groups.push(((reason, product), 1, vec![host])),
        }
    }

    fn render(&self, cluster: &Cluster, gang: &Gang) -> Vec<RejectionGroup> {
        let mut groups: Vec<RejectionGroup> = self
            .groups
            .iter()
            .map(|&((reason, product), count, ref examples)| {
                let name = product.get().name;
                let memory = examples.first().map_or(product.get().memory_mib, |&h| cluster.host(h).memory_mib);
                let text = reason.text(name, memory, gang);
                RejectionGroup {
                    reason: text,
                    hosts: count,
                    examples: examples.iter().map(|&h| cluster.host(h).name.clone()).collect(),
                }
            })
            .collect();
        groups.sort_by(|a, b| b.hosts.cmp(&a.hosts).then_with(|| a.reason.cmp(&b.reason)));
        groups
    }
}

/// A group of hosts of one clique inside one innermost domain whose members pool into
/// tensor-parallel groups larger than a host (GB200 NVL72 trays).
#[derive(Debug, Clone)]
struct Pool {
    product: ProductId,
    clique: u32,
    hosts: Vec<HostId>,
    units: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leaf {
    Host(HostId),
    Pool(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CandidateScope {
    Host(HostId),
    Clique(u32),
    Domain(usize, u32),
    Cluster,
}

struct Candidate {
    scope: CandidateScope,
    product: ProductId,
    members: Vec<MemberPlacement>,
    score: ScoreComponents,
    pack: PackKey,
    equivalent_hosts: usize,
}

/// What one `place` call computes about the hosts before it looks at candidates.
struct HostCapacity {
    /// Units a host holds by itself.
    units: Vec<u32>,
    /// Member slots of hosts whose units need a clique.
    member_slots: Vec<u32>,
    pools: Vec<Pool>,
    /// Pools by their first host, for prefix sums over host ranges.
    pools_at: HashMap<HostId, Vec<usize>>,
    /// Free GPUs per host, the tie-breaker that prefers the tighter host.
    free_gpus: Vec<u32>,
    /// Hosts with every GPU free before each host index (length hosts + 1): a domain's whole
    /// free hosts, the tie-breaker that prefers the fuller domain.
    whole_free_prefix: Vec<u32>,
}

/// A [`Planner`] without its cluster borrow ([`Planner::into_parts`]).
#[derive(Debug)]
pub struct PlannerParts {
    config: PlannerConfig,
    chooser: GpuChooser,
    host_class: Vec<u32>,
}

/// A gang's unit shape (a member, or a TP group spanning members) and member shape.
fn shapes_of(gang: &Gang) -> (UnitShape, UnitShape) {
    (
        UnitShape { unit_gpus: gang.unit_gpus(), atom: gang.tensor_parallel.min(gang.unit_gpus()) },
        UnitShape { unit_gpus: gang.gpus_per_member, atom: gang.tensor_parallel.min(gang.gpus_per_member) },
    )
}

pub struct Planner<'c> {
    cluster: &'c Cluster,
    config: PlannerConfig,
    chooser: GpuChooser,
    /// Hosts with equal product, memory and links share a class; equal class and equal
    /// free GPUs score equally on their own.
    host_class: Vec<u32>,
}

impl<'c> Planner<'c> {
    pub fn new(cluster: &'c Cluster, config: PlannerConfig) -> Self {
        let mut classes: HashMap<(ProductId, u64, &[GpuMask]), u32> = HashMap::new();
        let host_class = cluster
            .hosts
            .iter()
            .map(|host| {
                let next = classes.len() as u32;
                *classes.entry((host.product, host.memory_mib, &host.links.nvlink_neighbors)).or_insert(next)
            })
            .collect();
        Planner { cluster, config, chooser: GpuChooser::default(), host_class }
    }

    pub fn config(&self) -> &PlannerConfig {
        &self.config
    }

    /// Free slots of `shape` in the state `ledger`: units inside hosts ([`FreeShape::Units`]),
    /// hosts with every GPU free, or rack rooms (whole free hosts per innermost domain, in
    /// groups of `hosts`).
    pub fn free_slots(&mut self, ledger: &impl AsRef<GpuUse>, shape: FreeShape) -> u64 {
        self.free_slots_with(ledger.as_ref(), shape, &mut None)
    }

    /// [`Planner::free_slots`] with the whole-free-host index built at most once into `index`
    /// for every shape asked about in the same state (the index walks every host).
    fn free_slots_with(&mut self, ledger: &GpuUse, shape: FreeShape, index: &mut Option<score::WholeFreeIndex>) -> u64 {
        let cluster = self.cluster;
        match shape {
            FreeShape::Units(unit) => (0..cluster.hosts.len())
                .map(|h| u64::from(self.chooser.unit_count(cluster.host(h as HostId), ledger.free(h as HostId), unit)))
                .sum(),
            FreeShape::WholeHost => {
                u64::from(index.get_or_insert_with(|| score::WholeFreeIndex::new(cluster, ledger)).cluster_total)
            }
            FreeShape::RackRoom { hosts } => {
                let index = index.get_or_insert_with(|| score::WholeFreeIndex::new(cluster, ledger));
                let hosts = hosts.max(1);
                if cluster.levels.is_empty() {
                    u64::from(index.cluster_total / hosts)
                } else {
                    index.per_leaf_domain.iter().map(|&whole| u64::from(whole / hosts)).sum()
                }
            }
        }
    }

    /// `shapes` with each weight scaled by how scarce the shape is for the gangs `asked`
    /// (waiting now): the slots they ask over the free slots, at most 1. A shape nobody waiting
    /// asks for, or of which there are more free slots than asked, is not worth keeping at the
    /// cost of packing; one asked for beyond its supply keeps its full weight. The weight taken
    /// off goes to single GPUs ([`FreeShape::Units`] of one GPU), a shape no placement can break
    /// (it always scores 1): the fragmentation score is a weighted mean, so only a neutral
    /// remainder lowers what the other shapes count for. Slots asked: a gang of up to
    /// [`score::TYPICAL_HOST_GPUS`] GPUs asks its units of its unit shape; a larger one one rack
    /// room of its hosts and that many whole hosts. With nothing asked the shapes are returned
    /// unscaled (nothing contends; the mix is all there is to go by).
    pub fn weigh_by_scarcity(
        &mut self,
        ledger: &impl AsRef<GpuUse>,
        shapes: Vec<WeightedShape>,
        asked: &[DemandKey],
    ) -> Vec<WeightedShape> {
        if asked.is_empty() {
            return shapes;
        }
        let neutral = FreeShape::Units(UnitShape { unit_gpus: 1, atom: 1 });
        let ledger = ledger.as_ref();
        let mut whole_free = None;
        let mut taken_off = 0.0;
        let mut weighed: Vec<WeightedShape> = shapes
            .into_iter()
            .map(|weighted| {
                if weighted.shape == neutral {
                    return weighted;
                }
                let wanted: u64 = asked.iter().map(|key| score::slots_asked(key, weighted.shape)).sum();
                let scarcity = if wanted == 0 {
                    0.0
                } else {
                    let free = self.free_slots_with(ledger, weighted.shape, &mut whole_free);
                    (wanted as f64 / free.max(1) as f64).min(1.0)
                };
                taken_off += weighted.weight * (1.0 - scarcity);
                WeightedShape { weight: weighted.weight * scarcity, ..weighted }
            })
            .collect();
        if taken_off > 0.0 {
            match weighed.iter_mut().find(|s| s.shape == neutral) {
                Some(single) => single.weight += taken_off,
                None => weighed.push(WeightedShape { shape: neutral, weight: taken_off }),
            }
        }
        weighed
    }

    /// Replaces the free shapes the fragmentation score protects (for a demand that changes:
    /// [`score::Demand::shapes`]).
    pub fn set_shapes(&mut self, shapes: Vec<WeightedShape>) {
        self.config.shapes = shapes;
    }

    /// Takes the planner apart so a long-lived owner of the cluster (the online reservation
    /// book) can keep the memoised GPU-choice tables between calls without borrowing itself.
    pub fn into_parts(self) -> PlannerParts {
        PlannerParts { config: self.config, chooser: self.chooser, host_class: self.host_class }
    }

    /// A planner from [`Planner::into_parts`]; parts taken from another cluster are rebuilt.
    pub fn from_parts(cluster: &'c Cluster, parts: PlannerParts) -> Self {
        if parts.host_class.len() != cluster.hosts.len() {
            return Planner::new(cluster, parts.config);
        }
        Planner { cluster, config: parts.config, chooser: parts.chooser, host_class: parts.host_class }
    }

    /// Per host of `hosts`: `None` when the host alone holds all of `gang`, else why not.
    /// The fit test of [`Planner::score_hosts`] without building placements.
    pub fn fit_hosts(
        &mut self,
        ledger: &impl AsRef<GpuUse>,
        gang: &Gang,
        hosts: &[HostId],
    ) -> Vec<Option<(HostRejection, String)>> {
        let ledger = ledger.as_ref();
        let (unit_shape, member_shape) = shapes_of(gang);
        let need = gang.units();
        hosts
            .iter()
            .map(|&host_id| {
                let host = self.cluster.hosts.get(host_id as usize)?;
                let text = |reason: HostRejection| reason.text(host.product.get().name, host.memory_mib, gang);
                match self.host_slots(ledger, gang, host_id, unit_shape, member_shape) {
                    Ok((units, false)) if units >= need => None,
                    Ok(_) => Some((HostRejection::NotEnoughFree, text(HostRejection::NotEnoughFree))),
                    Err(reason) => Some((reason, text(reason))),
                }
            })
            .collect()
    }

    pub fn cluster(&self) -> &'c Cluster {
        self.cluster
    }

    fn resolve(
        &self,
        gang: &Gang,
        scope: &Option<Scope>,
        field: &'static str,
    ) -> Result<Option<ResolvedScope>, GangInputError> {
        self.resolve_scope(&gang.name, scope, field)
    }

    /// A slice's scope (`slices.required` of the role gang `name`), resolved as
    /// [`Planner::resolve_scope`] does.
    fn resolve_slice_scope(&self, name: &str, scope: &Scope) -> Result<Option<ResolvedScope>, GangInputError> {
        self.resolve_scope(name, &Some(scope.clone()), "slices.required").map_err(|error| match error {
            GangInputError::UnknownLevel { gang, level, known, .. } => {
                GangInputError::UnknownSliceLevel { gang, level, known }
            }
            other => other,
        })
    }

    /// A scope of the gang or replica `name` as this cluster's level, host or NVLink.
    fn resolve_scope(
        &self,
        name: &str,
        scope: &Option<Scope>,
        field: &'static str,
    ) -> Result<Option<ResolvedScope>, GangInputError> {
        Ok(match scope {
            None => None,
            Some(Scope::Host) => Some(ResolvedScope::Host),
            Some(Scope::Nvlink) => Some(ResolvedScope::Nvlink),
            Some(Scope::Level(level)) => match self.cluster.level_index(level) {
                Some(index) => Some(ResolvedScope::Level(index)),
                None => {
                    return Err(GangInputError::UnknownLevel {
                        gang: name.to_string(),
                        field,
                        level: level.clone(),
                        known: if self.cluster.levels.is_empty() {
                            "none".into()
                        } else {
                            self.cluster.levels.join(", ")
                        },
                    })
                }
            },
        })
    }

    /// Checks that a gang's topology scopes name levels this cluster has.
    pub fn check_gang(&self, gang: &Gang) -> Result<(), GangInputError> {
        self.resolve(gang, &gang.required, "required")?;
        self.resolve(gang, &gang.preferred, "preferred")?;
        Ok(())
    }

    /// Checks that every scope of a replica (its own, its roles', its slices') names a level
    /// this cluster has; the error names the replica or `replica/role` and the field.
    pub fn check_replica(&self, replica: &Replica) -> Result<(), GangInputError> {
        self.resolve_scope(&replica.name, &replica.required, "required")?;
        self.resolve_scope(&replica.name, &replica.preferred, "preferred")?;
        for role in &replica.roles {
            if let Some(gang) = &role.gang {
                self.check_gang(gang)?;
                if let Some(slicing) = &role.slices {
                    let slice = self.resolve_slice_scope(&gang.name, &slicing.scope)?;
                    let own = self.resolve(gang, &gang.required, "required")?;
                    if let (Some(ResolvedScope::Level(slice)), Some(ResolvedScope::Level(own))) = (slice, own) {
                        if slice < own {
                            return Err(GangInputError::SliceWiderThanRole {
                                gang: gang.name.clone(),
                                slice: slicing.scope.to_string(),
                                role: gang.required.as_ref().map(ToString::to_string).unwrap_or_default(),
                            });
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Places one gang against the ledger's free GPUs, reserving nothing: the one entry point
    /// for a placement, whatever the solver and the hosts ([`PlaceRequest`]; a `&Gang` asks
    /// for greedy over every host). The stages: filter and capacity per host
    /// (`host_capacity`), candidates per scope (`product_candidates`: hosts, cliques, domains,
    /// the cluster), fill and GPU choice (`build`), score and choice (`choose`); with an exact
    /// solver, a model over the greedy candidates (`exact.rs`).
    pub fn place<'r>(
        &mut self,
        ledger: &impl AsRef<GpuUse>,
        request: impl Into<PlaceRequest<'r>>,
    ) -> Result<GangPlacement, Unplaced> {
        self.place_by_solver(ledger.as_ref(), request.into())
    }

    /// For a gang that one host can hold (a single pod, or a small gang): per host of `hosts`,
    /// the best placement on that host alone and its score, or why the host cannot hold it.
    /// The scores are those [`Planner::place`] compares, so the best `Fits` is what it would pick
    /// among these hosts.
    pub fn score_hosts(&mut self, ledger: &impl AsRef<GpuUse>, gang: &Gang, hosts: &[HostId]) -> Vec<HostVerdict> {
        let ledger = ledger.as_ref();
        let cluster = self.cluster;
        let mut offered = vec![false; cluster.hosts.len()];
        for &host in hosts {
            if let Some(flag) = offered.get_mut(host as usize) {
                *flag = true;
            }
        }
        let need = gang.units();
        let (unit_shape, member_shape) = shapes_of(gang);
        let preferred = self.resolve(gang, &gang.preferred, "preferred").ok().flatten();
        // Hosts of one class with the same free GPUs (and rack state) score the same.
        let mut seen: HashMap<(u32, GpuMask, u32), (Vec<MemberPlacement>, ScoreComponents)> = HashMap::new();
        let mut tally = RejectionTally::default();
        let capacity = self.host_capacity(ledger, gang, unit_shape, member_shape, Some(&offered), &mut tally);
        let whole_free = score::WholeFreeIndex::new(cluster, ledger);
        let context = BuildContext { ledger, gang, whole_free: &whole_free, preferred, unit_shape, member_shape };
        let mut prefixes: HashMap<ProductId, Vec<u64>> = HashMap::new();
        hosts
            .iter()
            .map(|&host_id| {
                let Some(host) = cluster.hosts.get(host_id as usize) else {
                    return HostVerdict::Rejected { reason: HostRejection::NotOffered, text: "unknown host".into() };
                };
                let rejected = |reason: HostRejection| HostVerdict::Rejected {
                    reason,
                    text: reason.text(host.product.get().name, host.memory_mib, gang),
                };
                if let Err(reason) = self.host_slots(ledger, gang, host_id, unit_shape, member_shape) {
                    return rejected(reason);
                }
                if capacity.units[host_id as usize] < need {
                    return rejected(HostRejection::NotEnoughFree);
                }
                let prefix = prefixes.entry(host.product).or_insert_with(|| {
                    let mut prefix = Vec::with_capacity(cluster.hosts.len() + 1);
                    prefix.push(0u64);
                    for (index, other) in cluster.hosts.iter().enumerate() {
                        let units = if other.product == host.product { capacity.units[index] } else { 0 };
                        prefix.push(prefix.last().copied().unwrap_or(0) + u64::from(units));
                    }
                    prefix
                });
                let rack_whole = if ledger.used(host_id) == 0 {
                    host.domain_path.last().map_or(u32::MAX, |&d| d)
                } else {
                    u32::MAX - 1
                };
                let key = (self.host_class[host_id as usize], ledger.free(host_id), rack_whole);
                if let Some((members, score)) = seen.get(&key) {
                    let members: Vec<MemberPlacement> =
                        members.iter().map(|m| MemberPlacement { host: host_id, ..m.clone() }).collect();
                    // Same class and free GPUs; its own rack's whole hosts may differ.
                    let taken: Vec<(HostId, GpuMask)> = vec![(host_id, members.iter().fold(0, |m, p| m | p.gpus))];
                    let pack = PackKey::of(cluster, ledger, &whole_free, &taken);
                    return HostVerdict::Fits { members, score: *score, pack };
                }
                let view = ProductView { cluster, capacity: &capacity, product: host.product, prefix };
                match self.build(&context, &view, CandidateScope::Host(host_id), &[(Leaf::Host(host_id), need)]) {
                    Some(candidate) => {
                        seen.insert(key, (candidate.members.clone(), candidate.score));
                        HostVerdict::Fits { members: candidate.members, score: candidate.score, pack: candidate.pack }
                    }
                    None => rejected(HostRejection::FreeNotConnected),
                }
            })
            .collect()
    }

    /// [`Planner::place`], also handing out every candidate's product and scope, best first
    /// (the exact solver's pre-filter).
    fn place_ranked(
        &mut self,
        ledger: &GpuUse,
        gang: &Gang,
        ranking: Option<&mut Vec<(ProductId, CandidateScope)>>,
        offered: Option<&[bool]>,
        outside: Outside,
    ) -> Result<GangPlacement, Unplaced> {
        let unplaced = |reason: String| Unplaced { gang: gang.name.clone(), reason, explanation: None };
        let required = self.resolve(gang, &gang.required, "required").map_err(|e| unplaced(e.to_string()))?;
        let preferred = self.resolve(gang, &gang.preferred, "preferred").map_err(|e| unplaced(e.to_string()))?;
        let cluster = self.cluster;
        let (unit_shape, member_shape) = shapes_of(gang);

        // 1. Filter: every host's units, and why the others hold none.
        let mut tally = RejectionTally::with_outside(outside);
        let capacity = self.host_capacity(ledger, gang, unit_shape, member_shape, offered, &mut tally);
        // 2-5. Candidates per product (each filled and its GPUs chosen and scored by `build`).
        let whole_free = score::WholeFreeIndex::new(cluster, ledger);
        let context = BuildContext { ledger, gang, whole_free: &whole_free, preferred, unit_shape, member_shape };
        let packed = PackedOrder::new(cluster, &capacity.free_gpus);
        let search = Search { context: &context, capacity: &capacity, packed: &packed, required, need: gang.units() };
        let mut found = Found::default();
        for product in cluster.products() {
            self.product_candidates(&search, product, &mut found);
        }
        // Choose: the best candidate, its runner-up, or why there is none.
        let rejected = tally.render(cluster, gang);
        self.choose(gang, search.need, found, &rejected, ranking)
    }

    /// The candidate stage for one GPU product (a gang never mixes products): every host that
    /// holds the whole gang, then every NVLink clique, then the smallest topology domains,
    /// then the whole cluster, each narrowed by `topology.required`. Appends to `found`.
    fn product_candidates(&mut self, search: &Search, product: ProductId, found: &mut Found) {
        let cluster = self.cluster;
        let capacity = search.capacity;
        // Units per host for this product, pools counted at their first host.
        let mut leaf_units = vec![0u32; cluster.hosts.len()];
        for (index, host) in cluster.hosts.iter().enumerate() {
            if host.product == product {
                leaf_units[index] = capacity.units[index];
            }
        }
        for (&anchor, pools) in &capacity.pools_at {
            for &pool in pools {
                if capacity.pools[pool].product == product {
                    leaf_units[anchor as usize] += capacity.pools[pool].units;
                }
            }
        }
        let mut prefix = Vec::with_capacity(leaf_units.len() + 1);
        prefix.push(0u64);
        for units in &leaf_units {
            prefix.push(prefix.last().copied().unwrap_or(0) + u64::from(*units));
        }
        let total = prefix.last().copied().unwrap_or(0);
        let capped_total = total.min(u64::from(u32::MAX)) as u32;
        if found.best_capacity.is_none_or(|(best, _)| capped_total > best) {
            found.best_capacity = Some((capped_total, product));
        }
        if total < u64::from(search.need) {
            return;
        }
        let view = ProductView { cluster, capacity, product, prefix: &prefix };
        let max_host = (0..cluster.hosts.len()).map(|h| view.host_units(h as HostId)).max().unwrap_or(0);

        self.host_candidates(search, &view, found);
        match search.required {
            Some(ResolvedScope::Host) => {
                if max_host < search.need {
                    found.scope_shortfall = Some((max_host, "host".into()));
                }
                return;
            }
            Some(ResolvedScope::Nvlink) => {
                self.clique_candidates(search, &view, found);
                return;
            }
            _ => self.clique_candidates(search, &view, found),
        }
        self.domain_candidates(search, &view, found);
        if search.required.is_none() {
            self.cluster_candidate(search, &view, max_host, found);
        }
    }

    /// Hosts that hold the whole gang; of hosts alike (class, free GPUs, whether their rack
    /// is whole, their rack's whole hosts) only the first in packed order is built, the rest
    /// counted as equivalent.
    fn host_candidates(&mut self, search: &Search, view: &ProductView, found: &mut Found) {
        let cluster = self.cluster;
        let (ledger, need) = (search.context.ledger, search.need);
        let mut seen_classes: HashMap<(u32, GpuMask, u32, u32), usize> = HashMap::new();
        let whole_free = search.context.whole_free;
        for &host_id in &search.packed.hosts {
            if view.host_units(host_id) < need {
                continue;
            }
            let host = cluster.host(host_id);
            let leaf = host.domain_path.last().copied();
            let rack_whole = if ledger.used(host_id) == 0 { leaf.unwrap_or(u32::MAX) } else { u32::MAX - 1 };
            // Hosts alike score alike; their racks' whole hosts decide the tie ([`PackKey`]).
            let leaf_whole = leaf.map_or(whole_free.cluster_total, |d| whole_free.per_leaf_domain[d as usize]);
            let key = (self.host_class[host_id as usize], ledger.free(host_id), rack_whole, leaf_whole);
            if let Some(&index) = seen_classes.get(&key) {
                if let Some(candidate) = found.candidates.get_mut(index) {
                    candidate.equivalent_hosts += 1;
                }
                continue;
            }
            let built = self.build(search.context, view, CandidateScope::Host(host_id), &[(Leaf::Host(host_id), need)]);
            if let Some(candidate) = built {
                if search.required == Some(ResolvedScope::Nvlink)
                    && !gang_is_nvlink_connected(cluster, &candidate.members)
                {
                    continue;
                }
                seen_classes.insert(key, found.candidates.len());
                found.candidates.push(candidate);
            }
        }
    }

    /// NVLink cliques that hold the gang while none of their hosts does alone.
    fn clique_candidates(&mut self, search: &Search, view: &ProductView, found: &mut Found) {
        let cluster = self.cluster;
        let (capacity, need, product) = (search.capacity, search.need, view.product);
        for (clique_index, clique) in cluster.cliques.iter().enumerate() {
            let clique_index = clique_index as u32;
            let in_clique_hosts = clique.hosts.iter().filter(|&&h| cluster.host(h).product == product);
            let host_units: u64 = in_clique_hosts.clone().map(|&h| u64::from(capacity.units[h as usize])).sum();
            let pool_units: u64 = capacity
                .pools
                .iter()
                .filter(|p| p.clique == clique_index && p.product == product)
                .map(|p| u64::from(p.units))
                .sum();
            let best_single = in_clique_hosts.map(|&h| capacity.units[h as usize]).max().unwrap_or(0);
            if host_units + pool_units < u64::from(need) || best_single >= need {
                continue;
            }
            if let Some(ResolvedScope::Level(level)) = search.required {
                let first = cluster.host(clique.hosts[0]).domain_path[level];
                if clique.hosts.iter().any(|&h| cluster.host(h).domain_path[level] != first) {
                    continue;
                }
            }
            let mut leaves = Vec::new();
            let items = view.clique_leaves(clique_index);
            pick(&items, need, &mut |leaf, units| leaves.push((leaf, units)));
            if let Some(candidate) = self.build(search.context, view, CandidateScope::Clique(clique_index), &leaves) {
                found.candidates.push(candidate);
            }
        }
    }

    /// The smallest topology domains that hold the gang (none of whose children does), from
    /// the innermost level out to the outermost the gang may use; notes per level for the
    /// explanation, and the roomiest domain of the required level when none fits.
    fn domain_candidates(&mut self, search: &Search, view: &ProductView, found: &mut Found) {
        let cluster = self.cluster;
        let (need, required, product) = (search.need, search.required, view.product);
        let levels = cluster.levels.len();
        let outermost_allowed = match required {
            Some(ResolvedScope::Level(level)) => level,
            _ => 0,
        };
        for level in (outermost_allowed..levels).rev() {
            let mut fitting = 0usize;
            let mut best: Option<(u64, u32)> = None;
            for &index in &search.packed.domains[level] {
                let domain = &cluster.domains[level][index as usize];
                let units = view.range_units(&domain.hosts);
                if best.is_none_or(|(b, _)| units > b) {
                    best = Some((units, index));
                }
                if units < u64::from(need) {
                    continue;
                }
                fitting += 1;
                let child_max = if level + 1 < levels {
                    domain
                        .children
                        .clone()
                        .map(|child| view.range_units(&cluster.domains[level + 1][child as usize].hosts))
                        .max()
                        .unwrap_or(0)
                } else {
                    // Hosts are the children here. A clique pool anchored in this domain is a
                    // child holding the gang only when its whole clique lies in the domain (the
                    // clique's candidate covers it); the part of a clique that reaches past the
                    // domain (the pools are split per domain) is placed from here.
                    domain
                        .hosts
                        .clone()
                        .map(|h| u64::from(view.host_units(h)) + view.contained_pool_units(h, level, index))
                        .max()
                        .unwrap_or(0)
                };
                if child_max >= u64::from(need) {
                    continue;
                }
                let mut leaves = Vec::new();
                view.fill_domain(level, index, need, &mut leaves);
                if let Some(candidate) = self.build(search.context, view, CandidateScope::Domain(level, index), &leaves)
                {
                    found.candidates.push(candidate);
                }
            }
            if let Some((units, index)) = best {
                let domain = &cluster.domains[level][index as usize];
                if self.config.explain {
                    found.domain_notes.push(format!(
                        "{} ({}): {fitting} of {} domains hold {need} unit(s); the roomiest, {}, holds {units}",
                        short_level(&cluster.levels[level]),
                        product.get().name,
                        cluster.domains[level].len(),
                        domain.path
                    ));
                }
                if Some(ResolvedScope::Level(level)) == required && fitting == 0 {
                    let units = units.min(u64::from(u32::MAX)) as u32;
                    if found.scope_shortfall.as_ref().is_none_or(|(b, _)| units > *b) {
                        found.scope_shortfall =
                            Some((units, format!("{} `{}`", short_level(&cluster.levels[level]), domain.path)));
                    }
                }
            }
        }
    }

    /// The whole cluster, when no outermost domain holds the gang.
    fn cluster_candidate(&mut self, search: &Search, view: &ProductView, max_host: u32, found: &mut Found) {
        let cluster = self.cluster;
        let widest_child = if cluster.levels.is_empty() {
            u64::from(max_host)
        } else {
            cluster.domains[0].iter().map(|d| view.range_units(&d.hosts)).max().unwrap_or(0)
        };
        if widest_child < u64::from(search.need) {
            let mut leaves = Vec::new();
            view.fill_root(search.need, &mut leaves);
            if let Some(candidate) = self.build(search.context, view, CandidateScope::Cluster, &leaves) {
                found.candidates.push(candidate);
            }
        }
    }

    /// The choice: the highest total score wins (ties to the tighter [`PackKey`], then to the
    /// earlier candidate, so plans are deterministic), the next one is the runner-up; with no candidate, why not. `ranking`,
    /// when asked for, gets every candidate best first.
    fn choose(
        &self,
        gang: &Gang,
        need: u32,
        found: Found,
        rejected: &[RejectionGroup],
        ranking: Option<&mut Vec<(ProductId, CandidateScope)>>,
    ) -> Result<GangPlacement, Unplaced> {
        let Found { mut candidates, domain_notes, best_capacity, scope_shortfall } = found;
        let explanation = |candidates: &[Candidate]| {
            let mut ranked: Vec<&Candidate> = candidates.iter().collect();
            ranked.sort_by(|a, b| ranked_order(a, b));
            Explanation {
                rejected_hosts: rejected.to_vec(),
                domains: domain_notes.clone(),
                candidates: ranked.iter().take(EXPLAIN_CANDIDATES_MAX).map(|c| self.summary(c)).collect(),
            }
        };
        if let Some(ranking) = ranking {
            let mut order: Vec<&Candidate> = candidates.iter().collect();
            order.sort_by(|a, b| ranked_order(a, b));
            ranking.extend(order.iter().map(|c| (c.product, c.scope)));
        }
        let mut best: Option<usize> = None;
        let mut second: Option<usize> = None;
        let key = |index: usize| (candidates[index].score.total, candidates[index].pack);
        for (index, candidate) in candidates.iter().enumerate() {
            let (total, pack) = (candidate.score.total, candidate.pack);
            if best.is_none_or(|b| beats(total, pack, key(b))) {
                second = best;
                best = Some(index);
            } else if second.is_none_or(|s| beats(total, pack, key(s))) {
                second = Some(index);
            }
        }
        let Some(best) = best else {
            let reason = self.unplaced_reason(gang, need, best_capacity, scope_shortfall, rejected);
            return Err(Unplaced {
                gang: gang.name.clone(),
                reason,
                explanation: self.config.explain.then(|| explanation(&candidates)),
            });
        };
        let runner_up = second.map(|s| self.summary(&candidates[s]));
        let explained = self.config.explain.then(|| explanation(&candidates));
        let count = candidates.len();
        let winner = candidates.swap_remove(best);
        Ok(GangPlacement {
            gang: gang.name.clone(),
            product: winner.product,
            scope: self.scope_text(winner.scope),
            members: winner.members,
            score: winner.score,
            candidates: count,
            runner_up,
            explanation: explained,
            solver: SolverInfo::greedy(winner.score.total),
        })
    }

    /// Units one host holds (with `true`: member slots of a clique host whose units span
    /// hosts), or why it cannot hold even one.
    fn host_slots(
        &mut self,
        ledger: &GpuUse,
        gang: &Gang,
        host_id: HostId,
        unit_shape: UnitShape,
        member_shape: UnitShape,
    ) -> Result<(u32, bool), HostRejection> {
        let host = self.cluster.host(host_id);
        if gang.pool.as_ref().is_some_and(|pool| *pool != host.pool) {
            return Err(HostRejection::OtherDevicePool);
        }
        if let Some(profile) = &gang.mig_profile {
            if !host.mig_profile.as_deref().is_some_and(|p| p.eq_ignore_ascii_case(profile)) {
                return Err(HostRejection::OtherMigProfile);
            }
        }
        if host.partitioned() && (gang.gpus_per_member > 1 || gang.tensor_parallel > 1) {
            return Err(if host.sharing.is_some() { HostRejection::SharedReplica } else { HostRejection::MigSlice });
        }
        if host.memory_mib < gang.memory_floor_mib {
            return Err(HostRejection::MemoryTooSmall);
        }
        let free = ledger.free(host_id);
        let (shape, member_slots) = if unit_shape.unit_gpus <= u32::from(host.gpu_count) {
            (unit_shape, false)
        } else if host.clique.is_some() && member_shape.unit_gpus <= u32::from(host.gpu_count) {
            (member_shape, true)
        } else {
            return Err(HostRejection::UnitLargerThanHost);
        };
        // NVLink is a preference (tensor parallelism runs over PCIe where the host's NVLink
        // cannot hold the group, `UnitShape::on_host`) unless the gang requires it.
        if gang.required == Some(Scope::Nvlink) && shape.on_host(host) != shape {
            return Err(HostRejection::NoNvlink);
        }
        let count = self.chooser.unit_count(host, free, shape);
        if count == 0 {
            return Err(if free.count_ones() < shape.unit_gpus {
                HostRejection::NotEnoughFree
            } else {
                HostRejection::FreeNotConnected
            });
        }
        Ok((count, member_slots))
    }

    fn host_capacity(
        &mut self,
        ledger: &GpuUse,
        gang: &Gang,
        unit_shape: UnitShape,
        member_shape: UnitShape,
        offered: Option<&[bool]>,
        tally: &mut RejectionTally,
    ) -> HostCapacity {
        let cluster = self.cluster;
        let hosts = cluster.hosts.len();
        let mut units = vec![0u32; hosts];
        let mut member_slots = vec![0u32; hosts];
        let mut pool_index: HashMap<(ProductId, u32, Option<u32>), usize> = HashMap::new();
        let mut pools: Vec<Pool> = Vec::new();
        for (index, host) in cluster.hosts.iter().enumerate() {
            let host_id = index as HostId;
            if offered.is_some_and(|offered| !offered.get(index).copied().unwrap_or(false)) {
                let reason = match tally.outside {
                    Outside::NotOffered => HostRejection::NotOffered,
                    Outside::Region => HostRejection::OutsideRegion,
                };
                tally.add(reason, host.product, host_id);
                continue;
            }
            let (count, spans_hosts) = match self.host_slots(ledger, gang, host_id, unit_shape, member_shape) {
                Ok(slots) => slots,
                Err(reason) => {
                    tally.add(reason, host.product, host_id);
                    continue;
                }
            };
            if spans_hosts {
                member_slots[index] = count;
                let Some(clique) = host.clique else { continue };
                let key = (host.product, clique, host.domain_path.last().copied());
                let pool = *pool_index.entry(key).or_insert_with(|| {
                    pools.push(Pool { product: host.product, clique, hosts: Vec::new(), units: 0 });
                    pools.len() - 1
                });
                pools[pool].hosts.push(host_id);
            } else {
                units[index] = count;
            }
        }
        let per_unit = gang.members_per_unit();
        let mut pools_at: HashMap<HostId, Vec<usize>> = HashMap::new();
        for (index, pool) in pools.iter_mut().enumerate() {
            let slots: u32 = pool.hosts.iter().map(|&h| member_slots[h as usize]).sum();
            pool.units = slots / per_unit;
            if let Some(&first) = pool.hosts.iter().min() {
                pools_at.entry(first).or_default().push(index);
            }
        }
        let free_gpus = (0..hosts).map(|h| ledger.free(h as HostId).count_ones()).collect();
        let mut whole_free_prefix = Vec::with_capacity(hosts + 1);
        whole_free_prefix.push(0u32);
        for h in 0..hosts {
            let whole = u32::from(ledger.used(h as HostId) == 0 && cluster.host(h as HostId).whole_host_slot());
            whole_free_prefix.push(whole_free_prefix.last().copied().unwrap_or(0) + whole);
        }
        HostCapacity { units, member_slots, pools, pools_at, free_gpus, whole_free_prefix }
    }

    /// Turns a fill into members with concrete GPUs and scores it; `None` if a host's GPUs
    /// could not be chosen after all (the counts promised more than the choice found).
    fn build(
        &mut self,
        context: &BuildContext,
        view: &ProductView,
        scope: CandidateScope,
        leaves: &[(Leaf, u32)],
    ) -> Option<Candidate> {
        let BuildContext { ledger, gang, unit_shape, member_shape, .. } = *context;
        let cluster = self.cluster;
        let mut members: Vec<MemberPlacement> = Vec::with_capacity(gang.members as usize);
        let mut taken: Vec<(HostId, GpuMask)> = Vec::new();
        let mut quality_weighted = 0.0;
        let mut push_member = |host: HostId, gpus: GpuMask, members: &mut Vec<MemberPlacement>| {
            members.push(MemberPlacement { member: members.len() as u32, host, gpus });
            match taken.iter_mut().find(|(h, _)| *h == host) {
                Some(entry) => entry.1 |= gpus,
                None => taken.push((host, gpus)),
            }
        };
        for &(leaf, units) in leaves {
            match leaf {
                Leaf::Host(host_id) => {
                    let host = cluster.host(host_id);
                    let chosen = self.chooser.choose(host, ledger.free(host_id), units, unit_shape)?;
                    for unit in &chosen {
                        quality_weighted += unit_quality(host, unit, unit_shape) * f64::from(unit_shape.unit_gpus);
                        let gpus = unit.gpus();
                        if gang.tensor_parallel <= gang.gpus_per_member {
                            push_member(host_id, gpus, &mut members);
                        } else {
                            let indices = mask_indices(gpus);
                            for chunk in indices.chunks(gang.gpus_per_member as usize) {
                                push_member(host_id, chunk.iter().fold(0, |m, &g| m | (1u64 << g)), &mut members);
                            }
                        }
                    }
                }
                Leaf::Pool(pool) => {
                    let needed_members = units * gang.members_per_unit();
                    let items: Vec<(Leaf, u32, (u32, u32))> = view.capacity.pools[pool]
                        .hosts
                        .iter()
                        .map(|&h| (Leaf::Host(h), view.capacity.member_slots[h as usize], (view.free_key(h), h)))
                        .collect();
                    let mut per_host = Vec::new();
                    pick(&items, needed_members, &mut |leaf, count| per_host.push((leaf, count)));
                    for (leaf, count) in per_host {
                        let Leaf::Host(host_id) = leaf else { continue };
                        let host = cluster.host(host_id);
                        let chosen = self.chooser.choose(host, ledger.free(host_id), count, member_shape)?;
                        for unit in chosen {
                            // The clique's fabric links every GPU alike; the member's own
                            // GPUs are what varies.
                            quality_weighted += set_quality(host, unit.gpus()) * f64::from(member_shape.unit_gpus);
                            push_member(host_id, unit.gpus(), &mut members);
                        }
                    }
                }
            }
        }
        if members.len() != gang.members as usize {
            return None;
        }
        let score = self.evaluate(context, &taken, quality_weighted);
        let pack = PackKey::of(cluster, context.ledger, context.whole_free, &taken);
        Some(Candidate { scope, product: view.product, members, score, pack, equivalent_hosts: 0 })
    }

    /// The one scoring function: both solvers' placements are scored here. `taken` is the
    /// GPUs per host, `quality_weighted` the sum over units of unit quality x unit GPUs.
    fn evaluate(
        &mut self,
        context: &BuildContext,
        taken: &[(HostId, GpuMask)],
        quality_weighted: f64,
    ) -> ScoreComponents {
        let BuildContext { ledger, gang, whole_free, preferred, .. } = *context;
        let cluster = self.cluster;
        let used_gpus = f64::from(taken.iter().map(|(_, m)| m.count_ones()).sum::<u32>().max(1));
        let remaining: f64 = taken
            .iter()
            .map(|&(h, m)| remaining_connectivity(cluster.host(h), ledger.free(h) & !m) * f64::from(m.count_ones()))
            .sum();
        let connectivity = 0.5 * quality_weighted / used_gpus + 0.5 * remaining / used_gpus;
        let memory = score::memory_fit(cluster, gang.memory_floor_mib, taken.iter().map(|&(h, _)| h));
        let (locality, shared) = locality(cluster, taken);
        let preferred_met = match preferred {
            None => true,
            Some(ResolvedScope::Host) => taken.len() == 1,
            Some(ResolvedScope::Nvlink) => {
                (taken.len() == 1 && nvlink_connected(&cluster.host(taken[0].0).links, taken[0].1))
                    || same_clique(cluster, taken)
            }
            Some(ResolvedScope::Level(level)) => shared > level,
        };
        let locality = if preferred_met { locality } else { locality * 0.5 };
        let fragmentation =
            score::fragmentation(cluster, ledger, &mut self.chooser, whole_free, &self.config.shapes, taken);
        ScoreComponents::combine(&self.config.weights, locality, memory, fragmentation, connectivity)
    }

    fn scope_text(&self, scope: CandidateScope) -> String {
        match scope {
            CandidateScope::Host(h) => format!("host {}", self.cluster.host(h).name),
            CandidateScope::Clique(c) => format!("nvlink clique {}", self.cluster.cliques[c as usize].name),
            CandidateScope::Domain(level, index) => {
                format!(
                    "{} {}",
                    short_level(&self.cluster.levels[level]),
                    self.cluster.domains[level][index as usize].path
                )
            }
            CandidateScope::Cluster => "cluster".to_string(),
        }
    }

    fn summary(&self, candidate: &Candidate) -> CandidateSummary {
        let mut hosts: Vec<String> = Vec::new();
        for member in &candidate.members {
            let name = &self.cluster.host(member.host).name;
            if !hosts.contains(name) {
                hosts.push(name.clone());
            }
        }
        CandidateSummary {
            scope: self.scope_text(candidate.scope),
            product: candidate.product.get().name.to_string(),
            hosts,
            score: candidate.score,
            pack: candidate.pack,
            equivalent_hosts: candidate.equivalent_hosts,
        }
    }

    fn unplaced_reason(
        &self,
        gang: &Gang,
        need: u32,
        best_capacity: Option<(u32, ProductId)>,
        scope_shortfall: Option<(u32, String)>,
        rejected: &[RejectionGroup],
    ) -> String {
        let mut reason = String::new();
        let unit = if gang.members_per_unit() > 1 {
            format!(
                "{need} unit(s) of {} GPUs (tensorParallel {} over {} members)",
                gang.unit_gpus(),
                gang.tensor_parallel,
                gang.members_per_unit()
            )
        } else {
            format!("{need} member(s) of {} GPU(s)", gang.gpus_per_member)
        };
        let floor = if gang.memory_floor_mib > 0 {
            format!(" with at least {} per GPU", format_gib(gang.memory_floor_mib))
        } else {
            String::new()
        };
        match (best_capacity, scope_shortfall) {
            (Some((0, _)), _) => {
                let _ = write!(reason, "needs {unit}{floor}; no host has room for even one");
            }
            (Some((best, product)), _) if best < need => {
                let _ =
                    write!(reason, "needs {unit}{floor}; the free GPUs hold at most {best} ({})", product.get().name);
            }
            (_, Some((best, scope))) => {
                let required = gang.required.as_ref().map(ToString::to_string).unwrap_or_default();
                let _ = write!(reason, "needs {unit}{floor} inside one {required} (topology.required); the roomiest, {scope}, holds {best}");
            }
            (None, _) => {
                let _ = write!(reason, "needs {unit}{floor}; no host qualifies");
            }
            _ => {
                let _ = write!(reason, "needs {unit}{floor}; no candidate could be built inside the required scope");
            }
        }
        if !rejected.is_empty() {
            reason.push_str("; hosts rejected: ");
            let parts: Vec<String> = rejected.iter().take(3).map(|g| format!("{} x {}", g.hosts, g.reason)).collect();
            reason.push_str(&parts.join("; "));
        }
        reason
    }

    /// [`Planner::plan`] with a choice of solver for each gang.
    /// With `Exact`, the batch is first planned jointly ([`Planner::plan_joint`]); it falls
    /// back to gang by gang when the joint model cannot be used, or when it is not proven
    /// optimal and places fewer GPUs than the greedy plan would.
    pub fn plan_with(&mut self, ledger: &mut Ledger, gangs: &[Gang], solver: &SolverChoice) -> BatchPlan {
        let mut plan = BatchPlan::default();
        if let SolverChoice::Exact(config) = solver {
            let mut trial = ledger.clone();
            match self.plan_joint(&mut trial, gangs, config) {
                Ok(joint) => {
                    let mut greedy_gpus = || self.plan(&mut ledger.clone(), gangs).gpus_placed();
                    if joint.optimal || joint.plan.gpus_placed() >= greedy_gpus() {
                        *ledger = trial;
                        let mut plan = joint.plan;
                        plan.note = Some(format!(
                            "planned jointly by one MILP ({} variables, {} ms, {}): GPUs placed first, then the summed score",
                            joint.variables,
                            joint.solve_time.as_millis(),
                            if joint.optimal { "proven optimal" } else { "stopped at the time limit" }
                        ));
                        return plan;
                    }
                    plan.note = Some(
                        "the joint plan stopped at its time limit below the greedy plan; gangs planned one by one"
                            .into(),
                    );
                }
                Err(reason) => plan.note = Some(format!("not planned jointly ({reason}); gangs planned one by one")),
            }
        }
        for index in batch_order(gangs) {
            self.place_and_reserve(ledger, &gangs[index], solver, &mut plan);
        }
        plan
    }

    /// Places one gang and reserves it under its name; the outcome goes into `plan`.
    fn place_and_reserve(&mut self, ledger: &mut Ledger, gang: &Gang, solver: &SolverChoice, plan: &mut BatchPlan) {
        match self.place(&*ledger, PlaceRequest::new(gang).solver(solver)) {
            Ok(placement) => match ledger.reserve(&gang.name, &placement.holding()) {
                Ok(()) => plan.placements.push(placement),
                Err(error) => plan.unplaced.push(Unplaced {
                    gang: gang.name.clone(),
                    reason: format!("the ledger refused the placement: {error}"),
                    explanation: placement.explanation,
                }),
            },
            Err(unplaced) => plan.unplaced.push(unplaced),
        }
    }

    /// Places a batch of replicas one after another, reserving each whole under its name:
    /// the largest first, as [`batch_order`]. A batch of replicas that are each one role
    /// without slices or scope is planned exactly as [`Planner::plan_with`] plans their
    /// gangs; replicas with roles go through [`Planner::place_replica`] and are listed in
    /// [`BatchPlan::replicas`]. A replica that does not fit holds nothing.
    pub fn plan_replicas(&mut self, ledger: &mut Ledger, replicas: &[Replica], solver: &SolverChoice) -> BatchPlan {
        // A replica the planner cannot rely on (built directly, not validated) is unplaced
        // with the reason, and the rest are planned.
        let mut valid: Vec<&Replica> = Vec::with_capacity(replicas.len());
        let mut refused: Vec<Unplaced> = Vec::new();
        for replica in replicas {
            match replica.check() {
                Ok(()) => valid.push(replica),
                Err(error) => {
                    refused.push(Unplaced { gang: replica.name.clone(), reason: error.to_string(), explanation: None })
                }
            }
        }
        if let Some(gangs) = valid.iter().map(|r| r.as_single().cloned()).collect::<Option<Vec<Gang>>>() {
            let mut plan = self.plan_with(ledger, &gangs, solver);
            plan.unplaced.extend(refused);
            return plan;
        }
        let replicas = valid;
        let mut plan = BatchPlan { unplaced: refused, ..BatchPlan::default() };
        if !matches!(solver, SolverChoice::Greedy) {
            plan.note = Some("the batch has replicas with roles: planned one by one, not as one joint model".into());
        }
        for index in replica_order(&replicas) {
            let replica = replicas[index];
            if let Some(gang) = replica.as_single() {
                self.place_and_reserve(ledger, gang, solver, &mut plan);
                continue;
            }
            match self.place_replica(&*ledger, replica, solver, None) {
                Ok(placement) => match ledger.reserve(&replica.name, &placement.holding()) {
                    Ok(()) => plan.replicas.push(placement),
                    Err(error) => plan.unplaced.push(Unplaced {
                        gang: replica.name.clone(),
                        reason: format!("the ledger refused the placement: {error}"),
                        explanation: None,
                    }),
                },
                Err(unplaced) => plan.unplaced.push(unplaced),
            }
        }
        plan
    }

    /// [`Planner::place`]'s solver dispatch.
    fn place_by_solver(&mut self, ledger: &GpuUse, request: PlaceRequest<'_>) -> Result<GangPlacement, Unplaced> {
        let PlaceRequest { gang, solver, within: offered, outside } = request;
        match solver {
            SolverChoice::Greedy => self.place_ranked(ledger, gang, None, offered, outside),
            SolverChoice::Exact(config) => match self.place_exact_and_greedy(ledger, gang, config, offered) {
                (exact::ExactOutcome::Placed(placement), _, _) => Ok(*placement),
                (exact::ExactOutcome::Infeasible(mut unplaced), _, _) => {
                    unplaced.reason = format!("proven infeasible by the exact solver: {}", unplaced.reason);
                    Err(unplaced)
                }
                (exact::ExactOutcome::NoAnswer { reason }, _, greedy) => {
                    let mut placement = greedy?;
                    placement.solver.note = Some(format!("exact solver gave no answer ({reason}); greedy used"));
                    Ok(placement)
                }
            },
            SolverChoice::Auto(config) => match self.place_exact_and_greedy(ledger, gang, config, offered) {
                (exact::ExactOutcome::Placed(exact), _, Ok(mut greedy))
                    if greedy.score.total > exact.score.total + 1e-9 =>
                {
                    greedy.solver.note = Some(format!("greedy scored above exact ({:.4})", exact.score.total));
                    Ok(greedy)
                }
                (exact::ExactOutcome::Placed(exact), _, _) => Ok(*exact),
                (_, _, greedy) => greedy,
            },
        }
    }

    /// Places gangs one after another, reserving each in the ledger: the largest first
    /// ([`batch_order`]: GPUs, then unit size, ...), so big gangs are not stranded behind
    /// small ones. A gang that does not fit holds nothing.
    pub fn plan(&mut self, ledger: &mut Ledger, gangs: &[Gang]) -> BatchPlan {
        self.plan_with(ledger, gangs, &SolverChoice::Greedy)
    }
}

/// [`batch_order`] for replicas with roles: the most GPUs first, then the largest unit of
/// any role, then a replica with a role bound to one MIG profile, then the largest memory
/// floor of any role, then the given order.
pub fn replica_order(replicas: &[&Replica]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..replicas.len()).collect();
    order.sort_by_key(|&i| {
        let replica = replicas[i];
        let unit = replica.gangs().map(Gang::unit_gpus).max().unwrap_or(0);
        let pinned = replica.gangs().any(|g| g.mig_profile.is_some());
        let floor = replica.gangs().map(|g| g.memory_floor_mib).max().unwrap_or(0);
        (std::cmp::Reverse(replica.total_gpus()), std::cmp::Reverse(unit), !pinned, std::cmp::Reverse(floor), i)
    });
    order
}

/// The order a batch is placed in: the largest gangs first (GPUs, then unit size), so big
/// gangs are not stranded behind small ones; among equals, a gang bound to one MIG profile
/// (it can use those devices only, while others can also use them) before the largest memory
/// floor, then the given order.
pub fn batch_order(gangs: &[Gang]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..gangs.len()).collect();
    order.sort_by_key(|&i| {
        let gang = &gangs[i];
        (
            std::cmp::Reverse(gang.total_gpus()),
            std::cmp::Reverse(gang.unit_gpus()),
            gang.mig_profile.is_none(),
            std::cmp::Reverse(gang.memory_floor_mib),
            i,
        )
    });
    order
}

/// One placement question for [`Planner::place`]: a gang, the solver, and the hosts it may
/// use (flags indexed by host id, as when kube-scheduler's own filters removed some nodes;
/// `None`: every host).
#[derive(Debug, Clone, Copy)]
pub struct PlaceRequest<'a> {
    pub gang: &'a Gang,
    pub solver: &'a SolverChoice,
    pub within: Option<&'a [bool]>,
    /// Why the hosts outside `within` are left out, as explanations say it.
    pub outside: Outside,
}

/// Why a [`PlaceRequest`]'s hosts outside `within` are left out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Outside {
    /// kube-scheduler's own filters removed them.
    #[default]
    NotOffered,
    /// A replica's search confined the part to a region ([`replica`]).
    Region,
}

impl<'a> PlaceRequest<'a> {
    /// Greedy, over every host.
    pub fn new(gang: &'a Gang) -> Self {
        PlaceRequest { gang, solver: &SolverChoice::Greedy, within: None, outside: Outside::NotOffered }
    }

    /// Says why hosts outside `within` are left out.
    pub fn outside(self, outside: Outside) -> Self {
        PlaceRequest { outside, ..self }
    }

    pub fn solver(self, solver: &'a SolverChoice) -> Self {
        PlaceRequest { solver, ..self }
    }

    /// Only the hosts flagged in `offered` (`None`: every host).
    pub fn within(self, offered: Option<&'a [bool]>) -> Self {
        PlaceRequest { within: offered, ..self }
    }
}

impl<'a> From<&'a Gang> for PlaceRequest<'a> {
    fn from(gang: &'a Gang) -> Self {
        PlaceRequest::new(gang)
    }
}

/// Which solver places each gang.
#[derive(Debug, Clone)]
pub enum SolverChoice {
    Greedy,
    /// Exact over the greedy planner's candidates; greedy only where exact gives no answer.
    Exact(exact::ExactConfig),
    /// Greedy, and exact too where the model is small enough; the better score wins.
    Auto(exact::ExactConfig),
}

impl SolverChoice {
    /// The same choice with its exact time limit cut to at most `most`; greedy when `most`
    /// is zero (no time left for a model).
    pub fn within_time(&self, most: std::time::Duration) -> SolverChoice {
        let cut = |config: &exact::ExactConfig| exact::ExactConfig {
            time_limit: config.time_limit.min(most),
            ..config.clone()
        };
        match self {
            _ if most.is_zero() => SolverChoice::Greedy,
            SolverChoice::Greedy => SolverChoice::Greedy,
            SolverChoice::Exact(config) => SolverChoice::Exact(cut(config)),
            SolverChoice::Auto(config) => SolverChoice::Auto(cut(config)),
        }
    }
}

/// What the candidate stage reads for one gang, fixed for the whole search.
struct Search<'a> {
    context: &'a BuildContext<'a>,
    capacity: &'a HostCapacity,
    packed: &'a PackedOrder,
    required: Option<ResolvedScope>,
    /// Units the gang needs.
    need: u32,
}

/// What the candidate stage finds: the candidates, and what the explanation and the reason
/// for no placement need.
#[derive(Default)]
struct Found {
    candidates: Vec<Candidate>,
    domain_notes: Vec<String>,
    /// The product with the most units in all, and how many.
    best_capacity: Option<(u32, ProductId)>,
    /// With `topology.required`: the roomiest domain of that scope, when none holds the gang.
    scope_shortfall: Option<(u32, String)>,
}

/// What every candidate of one `place` call shares.
#[derive(Clone, Copy)]
struct BuildContext<'a> {
    ledger: &'a GpuUse,
    gang: &'a Gang,
    whole_free: &'a score::WholeFreeIndex,
    preferred: Option<ResolvedScope>,
    unit_shape: UnitShape,
    member_shape: UnitShape,
}

/// A product's slice of the host capacities, with prefix sums over the host order.
struct ProductView<'a> {
    cluster: &'a Cluster,
    capacity: &'a HostCapacity,
    product: ProductId,
    prefix: &'a [u64],
}

impl ProductView<'_> {
    fn host_units(&self, host: HostId) -> u32 {
        if self.cluster.host(host).product == self.product {
            self.capacity.units[host as usize]
        } else {
            0
        }
    }

    /// Units of this product's pools anchored at `host` whose whole clique lies in domain
    /// `domain` of `level`.
    fn contained_pool_units(&self, host: HostId, level: usize, domain: u32) -> u64 {
        let Some(pools) = self.capacity.pools_at.get(&host) else { return 0 };
        pools
            .iter()
            .map(|&pool| &self.capacity.pools[pool])
            .filter(|pool| pool.product == self.product)
            .filter(|pool| {
                let clique = &self.cluster.cliques[pool.clique as usize];
                clique.hosts.iter().all(|&h| self.cluster.host(h).domain_path[level] == domain)
            })
            .map(|pool| u64::from(pool.units))
            .sum()
    }

    fn range_units(&self, hosts: &std::ops::Range<u32>) -> u64 {
        self.prefix[hosts.end as usize] - self.prefix[hosts.start as usize]
    }

    /// Leaves inside a host range: hosts holding units alone, and pools anchored there.
    fn leaves_in(&self, hosts: std::ops::Range<u32>) -> Vec<(Leaf, u32, (u32, u32))> {
        let mut items = Vec::new();
        for host in hosts {
            let units = self.host_units(host);
            if units > 0 {
                items.push((Leaf::Host(host), units, (self.free_key(host), host)));
            }
            if let Some(pools) = self.capacity.pools_at.get(&host) {
                for &pool in pools {
                    let p = &self.capacity.pools[pool];
                    if p.product == self.product && p.units > 0 {
                        items.push((Leaf::Pool(pool), p.units, (0, host)));
                    }
                }
            }
        }
        items
    }

    /// Tighter hosts first among equals: the host with fewer free GPUs.
    fn free_key(&self, host: HostId) -> u32 {
        self.capacity.free_gpus[host as usize]
    }

    /// Fuller domains first among equals: the domain with fewer hosts whose GPUs are all free.
    fn whole_free_hosts(&self, hosts: &std::ops::Range<u32>) -> u32 {
        let prefix = &self.capacity.whole_free_prefix;
        prefix[hosts.end as usize] - prefix[hosts.start as usize]
    }

    fn clique_leaves(&self, clique: u32) -> Vec<(Leaf, u32, (u32, u32))> {
        let mut items = Vec::new();
        for &host in &self.cluster.cliques[clique as usize].hosts {
            let units = self.host_units(host);
            if units > 0 {
                items.push((Leaf::Host(host), units, (self.free_key(host), host)));
            }
        }
        for (index, pool) in self.capacity.pools.iter().enumerate() {
            if pool.clique == clique && pool.product == self.product && pool.units > 0 {
                items.push((Leaf::Pool(index), pool.units, (0, pool.hosts.first().copied().unwrap_or(0))));
            }
        }
        items
    }

    fn fill_domain(&self, level: usize, index: u32, need: u32, out: &mut Vec<(Leaf, u32)>) {
        let domain = &self.cluster.domains[level][index as usize];
        if level + 1 >= self.cluster.levels.len() {
            let items = self.leaves_in(domain.hosts.clone());
            pick(&items, need, &mut |leaf, units| out.push((leaf, units)));
            return;
        }
        let items: Vec<(u32, u32, (u32, u32))> = domain
            .children
            .clone()
            .filter_map(|child| {
                let units = self.range_units(&self.cluster.domains[level + 1][child as usize].hosts);
                let whole = self.whole_free_hosts(&self.cluster.domains[level + 1][child as usize].hosts);
                (units > 0).then_some((child, units.min(u64::from(u32::MAX)) as u32, (whole, child)))
            })
            .collect();
        let mut chosen = Vec::new();
        pick(&items, need, &mut |child, units| chosen.push((child, units)));
        for (child, units) in chosen {
            self.fill_domain(level + 1, child, units, out);
        }
    }

    fn fill_root(&self, need: u32, out: &mut Vec<(Leaf, u32)>) {
        if self.cluster.levels.is_empty() {
            let items = self.leaves_in(0..self.cluster.hosts.len() as u32);
            pick(&items, need, &mut |leaf, units| out.push((leaf, units)));
            return;
        }
        let items: Vec<(u32, u32, (u32, u32))> = (0..self.cluster.domains[0].len() as u32)
            .filter_map(|index| {
                let units = self.range_units(&self.cluster.domains[0][index as usize].hosts);
                let whole = self.whole_free_hosts(&self.cluster.domains[0][index as usize].hosts);
                (units > 0).then_some((index, units.min(u64::from(u32::MAX)) as u32, (whole, index)))
            })
            .collect();
        let mut chosen = Vec::new();
        pick(&items, need, &mut |index, units| chosen.push((index, units)));
        for (index, units) in chosen {
            self.fill_domain(0, index, units, out);
        }
    }
}

/// The order in which candidates are generated, so that among placements equal in score and
/// in [`PackKey`] (ties go to the earlier candidate) the one in the fuller domain wins: domains of every
/// level by free GPUs ascending, hosts rack by rack in that order. The emptier racks and
/// blocks stay free for the multi-host replicas that need them whole.
struct PackedOrder {
    hosts: Vec<HostId>,
    /// Per level, domain indices.
    domains: Vec<Vec<u32>>,
}

impl PackedOrder {
    fn new(cluster: &Cluster, free_gpus: &[u32]) -> Self {
        let mut prefix = Vec::with_capacity(free_gpus.len() + 1);
        prefix.push(0u64);
        for &free in free_gpus {
            prefix.push(prefix.last().copied().unwrap_or(0) + u64::from(free));
        }
        let domains: Vec<Vec<u32>> = cluster
            .domains
            .iter()
            .map(|level| {
                let mut order: Vec<u32> = (0..level.len() as u32).collect();
                order.sort_by_key(|&d| {
                    let hosts = &level[d as usize].hosts;
                    (prefix[hosts.end as usize] - prefix[hosts.start as usize], d)
                });
                order
            })
            .collect();
        let hosts = match (domains.last(), cluster.domains.last()) {
            (Some(order), Some(leaves)) => order.iter().flat_map(|&d| leaves[d as usize].hosts.clone()).collect(),
            _ => (0..cluster.hosts.len() as HostId).collect(),
        };
        PackedOrder { hosts, domains }
    }
}

/// Takes `need` units from `items` (id, capacity, tie key): while some item holds all that
/// is left, the tightest such item finishes the job; otherwise the roomiest item is taken
/// whole. Fewest items touched, and the big free blocks that are not needed stay whole.
fn pick<T: Copy>(items: &[(T, u32, (u32, u32))], need: u32, take: &mut impl FnMut(T, u32)) {
    // Roomiest first, and among equals the smaller tie key: then the roomiest unused item
    // is always the next one, and the tightest item holding `left` starts the last run
    // of equal capacities that are still >= `left`.
    let mut order: Vec<&(T, u32, (u32, u32))> = items.iter().filter(|item| item.1 > 0).collect();
    order.sort_by_key(|item| (std::cmp::Reverse(item.1), item.2));
    let mut left = need;
    let mut next = 0;
    while left > 0 && next < order.len() {
        let rest = &order[next..];
        let holding = rest.partition_point(|item| item.1 >= left);
        if holding > 0 {
            let tightest = rest[holding - 1].1;
            let first_of_run = rest[..holding].partition_point(|item| item.1 > tightest);
            take(rest[first_of_run].0, left);
            return;
        }
        take(rest[0].0, rest[0].1);
        left -= rest[0].1;
        next += 1;
    }
}

#[cfg(test)]
#[test]
fn pick_finishes_with_the_tightest_fit_and_otherwise_takes_the_roomiest() {
    let items = [("a", 3, (0, 0)), ("b", 8, (0, 1)), ("c", 5, (0, 2)), ("d", 5, (0, 3)), ("e", 0, (0, 4))];
    let run = |need| {
        let mut taken = Vec::new();
        pick(&items, need, &mut |id, units| taken.push((id, units)));
        taken
    };
    assert_eq!(run(4), [("c", 4)], "c and d fit 4 most tightly; c has the smaller key");
    assert_eq!(run(3), [("a", 3)]);
    assert_eq!(run(12), [("b", 8), ("c", 4)]);
    assert_eq!(run(21), [("b", 8), ("c", 5), ("d", 5), ("a", 3)]);
}

/// Best first: the higher total (in units of 1e-9), then the tighter pack: the order [`beats`]
/// chooses by.
fn ranked_order(a: &Candidate, b: &Candidate) -> std::cmp::Ordering {
    quantised(b.score.total).cmp(&quantised(a.score.total)).then(a.pack.cmp(&b.pack))
}

/// `network.topology.nvidia.com/leaf` -> `leaf`, for output.
pub fn short_level(key: &str) -> &str {
    key.rsplit('/').next().unwrap_or(key)
}

/// Locality of a set of hosts, and how many levels (outermost first) they all share.
fn locality(cluster: &Cluster, taken: &[(HostId, GpuMask)]) -> (f64, usize) {
    let levels = cluster.levels.len();
    if taken.len() <= 1 {
        return (1.0, levels);
    }
    let first = taken[0].0;
    let shared = taken.iter().map(|&(h, _)| cluster.shared_levels(first, h)).min().unwrap_or(levels);
    if same_clique(cluster, taken) {
        return (0.95, shared);
    }
    if levels == 0 {
        return (0.0, 0);
    }
    (0.9 * shared as f64 / levels as f64, shared)
}

fn same_clique(cluster: &Cluster, taken: &[(HostId, GpuMask)]) -> bool {
    let first = cluster.host(taken[0].0).clique;
    first.is_some() && taken.iter().all(|&(h, _)| cluster.host(h).clique == first)
}

fn gang_is_nvlink_connected(cluster: &Cluster, members: &[MemberPlacement]) -> bool {
    let Some(first) = members.first() else { return true };
    if members.iter().all(|m| m.host == first.host) {
        let union = members.iter().fold(0, |mask, m| mask | m.gpus);
        return nvlink_connected(&cluster.host(first.host).links, union);
    }
    let clique = cluster.host(first.host).clique;
    clique.is_some() && members.iter().all(|m| cluster.host(m.host).clique == clique)
}
