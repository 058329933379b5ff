//! The placement policies compared by the replay, each to its definition in the FGD
//! artifact (`pkg/simulator/plugin/*.go`), plus `topoplace`, ours.
//!
//! Every baseline scores a node with an integer in 0..=100 and the highest score wins, ties
//! going to the smaller node rank; a single feasible node is taken unscored. Scores are
//! carried as `f64` so that `topoplace` can keep its exact value.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};

use super::frag::{node_capacity_fragment, node_fragment};
use super::{first_fit, Arrivals, NodeView, PodClass, Prepared, TypicalPod, GPU_MILLI, REPLAY_NODE_GPUS_MAX};
use topoplace_engine::ledger::shares::ShareLedger;
use topoplace_engine::topology::GpuMask;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Policy {
    Random,
    DotProduct,
    GpuClustering,
    GpuPacking,
    BestFit,
    Fgd,
    Topoplace,
}

impl Policy {
    pub const ALL: [Policy; 7] = [
        Policy::Random,
        Policy::DotProduct,
        Policy::GpuClustering,
        Policy::GpuPacking,
        Policy::BestFit,
        Policy::Fgd,
        Policy::Topoplace,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Policy::Random => "random",
            Policy::DotProduct => "dotproduct",
            Policy::GpuClustering => "gpuclustering",
            Policy::GpuPacking => "gpupacking",
            Policy::BestFit => "bestfit",
            Policy::Fgd => "fgd",
            Policy::Topoplace => "topoplace",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Policy {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        Policy::ALL.into_iter().find(|p| p.name() == text).ok_or_else(|| {
            let names: Vec<&str> = Policy::ALL.iter().map(|p| p.name()).collect();
            format!("unknown policy `{text}` (expected one of {})", names.join(", "))
        })
    }
}

/// CPU and GPU of the largest node the artifact's scores normalise by (128 cores, 8 GPUs).
const CPU_NORM: f64 = 128_000.0;
const GPU_NORM: f64 = 8_000.0;

/// A node's state as a hash key (shared by nodes in the same state).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct NodeKey {
    model: u8,
    gpus: u8,
    cpu_left: u64,
    gpu_left: [u16; REPLAY_NODE_GPUS_MAX as usize],
}

/// Scores of (node state, pod class) for the fragmentation policies, which are costly:
/// a per-node slot valid until the node changes (or the weights the scores were computed
/// with change: [`ScoreCache::invalidate`]), backed by a map shared by all nodes in the
/// same state.
#[derive(Debug)]
struct ScoreCache {
    classes: usize,
    generation: Vec<u32>,
    slots: Vec<(u32, f64, GpuMask)>,
    shared: HashMap<(NodeKey, u32), (f64, GpuMask)>,
}

impl ScoreCache {
    fn new(nodes: usize, classes: usize) -> Self {
        ScoreCache {
            classes,
            generation: vec![1; nodes],
            slots: vec![(0, 0.0, 0); nodes * classes],
            shared: HashMap::new(),
        }
    }

    /// Forgets every score (the weights they were computed with changed).
    fn invalidate(&mut self) {
        for generation in &mut self.generation {
            *generation += 1;
        }
        self.shared.clear();
    }
}

/// The last arrival count at which [`ArrivalDemand`] takes new weights (it takes them at 1,
/// 2, 4, ... up to here, then keeps them). Each refresh empties the score cache, and a late
/// one, on a cluster of nodes in many different states, costs a full re-scoring: refreshing
/// to the end of a run measured slower (`cargo bench --bench replay`, on a noisy machine) for
/// allocation within noise of this cap (docs/results/fgd-replay.md). A class that first
/// arrives after the last refresh weighs nothing for the rest of the run. When arrivals are
/// drawn from one mix, as the protocol's shuffled arrivals are, a class's popularity among
/// 1,024 of them has a standard error of at most 1.6 points (sqrt(0.25 / 1024)).
pub const DEMAND_REFRESH_LAST: u64 = 1024;

/// topoplace's target workload in the pod replay: every class asked for so far in the
/// run, placed or dropped, with its popularity among those arrivals. It reads the
/// arrivals up to the current one and never the ones to come (FGD reads the whole trace
/// before the first pod). The weights are taken at 1, 2, 4, 8, ... arrivals up to
/// [`DEMAND_REFRESH_LAST`]: the popularity of n arrivals moves by about 1/sqrt(n) when n
/// doubles, so refreshing more often costs time for little change.
#[derive(Debug)]
pub(super) struct ArrivalDemand {
    /// Arrivals so far per class id.
    counts: Vec<u64>,
    total: u64,
    next_refresh: u64,
    /// The classes with at least one arrival at the last refresh, in class-id order,
    /// weights summing to 1.
    pub(super) weights: Vec<TypicalPod>,
}

impl ArrivalDemand {
    pub(super) fn new(classes: usize) -> Self {
        ArrivalDemand { counts: vec![0; classes], total: 0, next_refresh: 1, weights: Vec::new() }
    }

    /// Counts an arrival of `class_id`; true when the weights were refreshed.
    pub(super) fn arrived(&mut self, classes: &[PodClass], class_id: u32) -> bool {
        self.counts[class_id as usize] += 1;
        self.total += 1;
        if self.total < self.next_refresh {
            return false;
        }
        self.next_refresh = if self.total < DEMAND_REFRESH_LAST { self.total * 2 } else { u64::MAX };
        let total = self.total as f64;
        self.weights = classes
            .iter()
            .zip(&self.counts)
            .filter(|&(_, &count)| count > 0)
            .map(|(class, &count)| TypicalPod { class: class.clone(), weight: count as f64 / total })
            .collect();
        true
    }
}

pub(super) struct Scorer<'a> {
    policy: Policy,
    prepared: &'a Prepared,
    rank: &'a [u32],
    rng: Xoshiro256PlusPlus,
    /// Per node: (pod tag, pods) of the GPU pods on it, for GpuClustering.
    tags: Vec<Vec<(u8, u32)>>,
    cache: ScoreCache,
    scores: Vec<f64>,
    /// topoplace's weights (empty for the other policies).
    demand: ArrivalDemand,
}

/// Tag of a GPU pod for GpuClustering: 0 for a share, else its GPU count.
fn tag(class: &PodClass) -> u8 {
    if class.is_share() {
        0
    } else {
        class.num_gpu.max(1)
    }
}

impl<'a> Scorer<'a> {
    pub(super) fn new(policy: Policy, prepared: &'a Prepared, arrivals: &'a Arrivals) -> Self {
        // The random policy draws from its own stream, so the arrivals stay paired.
        let stream = arrivals.seed ^ 0x7261_6e64_6f6d_5f70;
        Scorer {
            policy,
            prepared,
            rank: &arrivals.node_rank,
            rng: Xoshiro256PlusPlus::seed_from_u64(stream),
            tags: vec![Vec::new(); prepared.nodes.len()],
            // Only the fragmentation policies read the cache; the others skip its allocation.
            cache: match policy {
                Policy::Fgd | Policy::Topoplace => ScoreCache::new(prepared.nodes.len(), prepared.classes.len()),
                _ => ScoreCache::new(prepared.nodes.len(), 0),
            },
            scores: Vec::with_capacity(prepared.nodes.len()),
            demand: ArrivalDemand::new(match policy {
                Policy::Topoplace => prepared.classes.len(),
                _ => 0,
            }),
        }
    }

    /// Bookkeeping for every arrival, before the filter (a pod that fits nowhere still
    /// counts as demand).
    pub(super) fn arrived(&mut self, class_id: u32) {
        if self.policy == Policy::Topoplace && self.demand.arrived(&self.prepared.classes, class_id) {
            self.cache.invalidate();
        }
    }

    fn view<'l>(&self, ledger: &'l ShareLedger<u32>, node: u32) -> NodeView<'l> {
        NodeView {
            model: self.prepared.node_models[node as usize],
            cpu_left: ledger.cpu_left(node),
            gpu_left: ledger.gpu_left(node),
        }
    }

    /// The node for the pod among the feasible ones (never empty).
    pub(super) fn select(&mut self, ledger: &ShareLedger<u32>, feasible: &[u32], class_id: u32) -> u32 {
        if feasible.len() == 1 {
            return feasible[0];
        }
        if self.policy == Policy::Random {
            return feasible[self.rng.random_range(0..feasible.len())];
        }
        let mut scores = std::mem::take(&mut self.scores);
        scores.clear();
        for &node in feasible {
            let score = self.score(ledger, node, class_id);
            scores.push(score);
        }
        if self.policy == Policy::BestFit {
            normalize_min_max(&mut scores);
        }
        let mut best = 0;
        for index in 1..feasible.len() {
            let better = scores[index] > scores[best]
                || (scores[index] == scores[best]
                    && self.rank[feasible[index] as usize] < self.rank[feasible[best] as usize]);
            if better {
                best = index;
            }
        }
        self.scores = scores;
        feasible[best]
    }

    fn score(&mut self, ledger: &ShareLedger<u32>, node: u32, class_id: u32) -> f64 {
        let class = &self.prepared.classes[class_id as usize];
        let view = self.view(ledger, node);
        match self.policy {
            Policy::Random => 0.0,
            Policy::DotProduct => dot_product(&view, class),
            Policy::GpuClustering => gpu_clustering(&view, class, &self.tags[node as usize]),
            Policy::GpuPacking => gpu_packing(&view, class),
            Policy::BestFit => best_fit_raw(&view, class),
            Policy::Fgd | Policy::Topoplace => self.cached(ledger, node, class_id).0,
        }
    }

    /// The fragmentation policies' (score, GPUs) for the pod on `node`.
    fn cached(&mut self, ledger: &ShareLedger<u32>, node: u32, class_id: u32) -> (f64, GpuMask) {
        let slot_index = node as usize * self.cache.classes + class_id as usize;
        let generation = self.cache.generation[node as usize];
        let (slot_generation, score, gpus) = self.cache.slots[slot_index];
        if slot_generation == generation {
            return (score, gpus);
        }
        let view = self.view(ledger, node);
        let mut gpu_left = [0u16; REPLAY_NODE_GPUS_MAX as usize];
        gpu_left[..view.gpu_left.len()].copy_from_slice(view.gpu_left);
        let key = NodeKey { model: view.model, gpus: view.gpu_left.len() as u8, cpu_left: view.cpu_left, gpu_left };
        let class = &self.prepared.classes[class_id as usize];
        let typical = &self.prepared.typical;
        let policy = self.policy;
        let (score, gpus) = *self.cache.shared.entry((key, class_id)).or_insert_with(|| match policy {
            Policy::Topoplace => topoplace(&self.demand.weights, &view, class),
            _ => fgd(typical, &view, class),
        });
        self.cache.slots[slot_index] = (generation, score, gpus);
        (score, gpus)
    }

    /// The GPUs the pod takes on the chosen node.
    pub(super) fn choose_gpus(&mut self, ledger: &ShareLedger<u32>, node: u32, class_id: u32) -> GpuMask {
        let class = &self.prepared.classes[class_id as usize];
        if class.gpu_milli == 0 {
            return 0;
        }
        let gpu_left = ledger.gpu_left(node);
        match self.policy {
            Policy::Fgd | Policy::Topoplace => self.cached(ledger, node, class_id).1,
            Policy::Random if class.is_share() => {
                let roomy: Vec<usize> = (0..gpu_left.len()).filter(|&i| gpu_left[i] >= class.gpu_milli).collect();
                // Empty only if the filter was bypassed; the ledger then refuses the empty grant.
                if roomy.is_empty() {
                    return 0;
                }
                1u64 << roomy[self.rng.random_range(0..roomy.len())]
            }
            _ => best_gpus(gpu_left, class),
        }
    }

    /// Bookkeeping after the pod went to `node`.
    pub(super) fn placed(&mut self, node: u32, class_id: u32) {
        let class = &self.prepared.classes[class_id as usize];
        self.cache.generation[node as usize] += 1;
        if class.gpu_milli > 0 {
            let tags = &mut self.tags[node as usize];
            let pod_tag = tag(class);
            match tags.iter_mut().find(|(t, _)| *t == pod_tag) {
                Some(entry) => entry.1 += 1,
                None => tags.push((pod_tag, 1)),
            }
        }
    }
}

/// The artifact's GPU choice `best`: a share goes to the fullest GPU it fits on (lowest
/// index on ties); anything else takes the first GPUs by index with room.
pub fn best_gpus(gpu_left: &[u16], class: &PodClass) -> GpuMask {
    if class.is_share() {
        let fullest = (0..gpu_left.len()).filter(|&i| gpu_left[i] >= class.gpu_milli).min_by_key(|&i| (gpu_left[i], i));
        return fullest.map_or(0, |i| 1u64 << i);
    }
    first_fit(gpu_left, class.gpu_milli, class.num_gpu.max(1))
}

fn gpu_free(view: &NodeView<'_>) -> f64 {
    view.gpu_left.iter().map(|&left| f64::from(left)).sum()
}

/// DotProduct (merge, max): the smaller the dot product of what is left and what is
/// asked, the higher the score.
pub fn dot_product(view: &NodeView<'_>, class: &PodClass) -> f64 {
    let cpu = view.cpu_left as f64 / CPU_NORM * (class.cpu_milli as f64 / CPU_NORM);
    let gpu = gpu_free(view) / GPU_NORM * (class.gpu_request() as f64 / GPU_NORM);
    (100.0 * (1.0 - (cpu + gpu) / 2.0)).trunc()
}

/// GpuClustering: fuller nodes first, and nodes already running pods of the same kind.
pub fn gpu_clustering(view: &NodeView<'_>, class: &PodClass, tags: &[(u8, u32)]) -> f64 {
    if class.gpu_milli == 0 {
        return 0.0;
    }
    let free: u64 = view.gpu_left.iter().map(|&l| u64::from(l)).sum();
    let base = 25 * 8000u64.saturating_sub(free) / 8000;
    let pod_tag = tag(class);
    let has_own = tags.iter().any(|&(t, n)| t == pod_tag && n > 0);
    let has_other = tags.iter().any(|&(t, n)| t != pod_tag && n > 0);
    let bonus = match (has_own, has_other) {
        (true, false) => 75,
        (true, true) => 50,
        (false, false) => 25,
        (false, true) => 0,
    };
    (base + bonus) as f64
}

/// GpuPacking: partly used GPUs first, then partly used nodes, then empty nodes.
pub fn gpu_packing(view: &NodeView<'_>, class: &PodClass) -> f64 {
    if class.gpu_milli == 0 {
        return 0.0;
    }
    let free_gpus = view.gpu_left.iter().filter(|&&l| l == GPU_MILLI).count() as i64;
    if free_gpus == view.gpu_left.len() as i64 {
        return (33 - free_gpus).max(free_gpus) as f64;
    }
    let mut order: Vec<usize> = (0..view.gpu_left.len()).collect();
    order.sort_by_key(|&i| view.gpu_left[i]);
    let picked: Vec<u16> = order
        .into_iter()
        .map(|i| view.gpu_left[i])
        .filter(|&left| left >= class.gpu_milli)
        .take(usize::from(class.num_gpu.max(1)))
        .collect();
    let whole = picked.iter().filter(|&&l| l == GPU_MILLI).count() as i64;
    if whole > 0 {
        return (50 - whole).max(33) as f64;
    }
    let left_tenths: i64 = picked.iter().map(|&l| i64::from(l) * 100 / 1000).sum();
    (100 - left_tenths / 10).max(50) as f64
}

/// BestFit before normalisation: the less CPU and GPU left after the pod, the better.
pub fn best_fit_raw(view: &NodeView<'_>, class: &PodClass) -> f64 {
    let cpu_after = (view.cpu_left as f64 - class.cpu_milli as f64) / CPU_NORM;
    let gpu_after = (gpu_free(view) - class.gpu_request() as f64) / GPU_NORM;
    ((1.0 - (cpu_after * 0.5 + gpu_after * 0.5)) * 100.0).trunc()
}

/// The artifact's min-max normalisation of BestFit scores to 0..=100, in integer maths.
fn normalize_min_max(scores: &mut [f64]) {
    let lowest = scores.iter().copied().fold(f64::INFINITY, f64::min);
    let highest = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    for score in scores.iter_mut() {
        *score = if highest > lowest { ((*score - lowest) * 100.0 / (highest - lowest)).floor() } else { 0.0 };
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

const MAX: usize = REPLAY_NODE_GPUS_MAX as usize;

/// The node after the pod takes `gpus` (its GPU shares written into `buffer`).
fn after_placing<'b>(view: &NodeView<'_>, class: &PodClass, gpus: GpuMask, buffer: &'b mut [u16; MAX]) -> NodeView<'b> {
    let count = view.gpu_left.len();
    buffer[..count].copy_from_slice(view.gpu_left);
    for (index, left) in buffer[..count].iter_mut().enumerate() {
        if gpus & (1u64 << index) != 0 {
            *left -= class.gpu_milli;
        }
    }
    NodeView { model: view.model, cpu_left: view.cpu_left - class.cpu_milli, gpu_left: &buffer[..count] }
}

/// The GPU options FGD weighs: for a share, each GPU it fits on, by index; otherwise
/// the GPUs with room in ascending order of what they have left (stable), as many as it
/// asks for.
fn fgd_options(view: &NodeView<'_>, class: &PodClass) -> Vec<GpuMask> {
    if class.gpu_milli == 0 {
        return vec![0];
    }
    if class.is_share() {
        return (0..view.gpu_left.len()).filter(|&i| view.gpu_left[i] >= class.gpu_milli).map(|i| 1u64 << i).collect();
    }
    let mut order: Vec<usize> = (0..view.gpu_left.len()).filter(|&i| view.gpu_left[i] >= class.gpu_milli).collect();
    order.sort_by_key(|&i| view.gpu_left[i]);
    vec![order.into_iter().take(usize::from(class.num_gpu.max(1))).fold(0, |mask, i| mask | 1u64 << i)]
}

/// FGD: `trunc(100 * sigmoid((F_before - F_after) / 1000))`, the best option's score and
/// GPUs (the first option wins a tie).
pub fn fgd(typical: &[super::TypicalPod], view: &NodeView<'_>, class: &PodClass) -> (f64, GpuMask) {
    let before = node_fragment(typical, view);
    let mut best: Option<(f64, GpuMask)> = None;
    for gpus in fgd_options(view, class) {
        let after = node_fragment(typical, &after_placing(view, class, gpus, &mut [0; MAX]));
        let score = (100.0 * sigmoid((before - after) / 1000.0)).trunc();
        if best.is_none_or(|(top, _)| score > top) {
            best = Some((score, gpus));
        }
    }
    best.unwrap_or((0.0, 0))
}

/// Weight of packing against fragmentation in topoplace's score: a tie-breaker, worth
/// at most a tenth of a milli-GPU of fragmentation.
const PACKING_WEIGHT: f64 = 0.001;

/// topoplace: the GPU option that grows the capacity-aware fragmentation
/// ([`node_capacity_fragment`]) of `workload` (the classes among the arrivals up to the
/// last refresh, see `ArrivalDemand`) the least, exactly (FGD truncates its score to 0..=100),
/// and among equals the node BestFit prefers, before the random rank.
pub fn topoplace(workload: &[super::TypicalPod], view: &NodeView<'_>, class: &PodClass) -> (f64, GpuMask) {
    let before = node_capacity_fragment(workload, view);
    let packing = PACKING_WEIGHT * best_fit_raw(view, class);
    let mut best: Option<(f64, GpuMask)> = None;
    for gpus in fgd_options(view, class) {
        let after = node_capacity_fragment(workload, &after_placing(view, class, gpus, &mut [0; MAX]));
        let score = before - after + packing;
        if best.is_none_or(|(top, _)| score > top) {
            best = Some((score, gpus));
        }
    }
    best.unwrap_or((0.0, 0))
}
