//! Trace replay: the evaluation protocol of the FGD paper (ATC'23, "Beware of
//! Fragmentation") on the Alibaba GPU-sharing trace, so that placement policies can be
//! compared on the same pod arrivals. Pure and deterministic for a trace and a seed; the
//! CSV reading, threads, progress bar and charts live in the adapters.
//!
//! The protocol (see `FGD-PROTOCOL.md` beside the traces): pods arrive one by one in a
//! seeded random order, none ever leaves, the workload is cut or repeated to a multiple of
//! the cluster's GPU capacity, a pod that fits nowhere is dropped, and after every attempt
//! the allocated share of the cluster's GPUs is sampled against the arrived GPU request.
//! Ties between equally scored nodes go to a seeded random rank of the nodes.

pub mod frag;
pub mod generate;
pub mod policy;

use std::collections::HashMap;

use rand::rngs::Xoshiro256PlusPlus;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use thiserror::Error;

pub use frag::{typical_pods, TypicalPod};
pub use policy::Policy;
use topoplace_engine::ledger::shares::{NodeCapacity, ShareError, ShareGrant, ShareLedger, ShareRequest, GPU_MILLI};
use topoplace_engine::topology::GpuMask;

/// GPUs a replayed node may have (the policies' node state is a fixed array).
pub const REPLAY_NODE_GPUS_MAX: u8 = 16;
/// Distinct GPU models a replayed cluster may have (a pod's allowed models are a `u64` set).
pub const REPLAY_MODELS_MAX: usize = 64;
/// The paper's load: arrivals are cut or repeated to 130 % of GPU capacity.
pub const LOAD_RATIO_DEFAULT: f64 = 1.3;
/// Curve columns: arrived load in whole percent, 0..=ARRIVED_PCT_MAX.
pub const ARRIVED_PCT_MAX: usize = 130;

/// A node of the trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceNode {
    pub name: String,
    pub cpu_milli: u64,
    pub memory_mib: u64,
    pub gpus: u8,
    /// GPU model label (`V100M16`, `T4`, ...); empty when the node has no GPU.
    pub model: String,
}

/// A pod of the trace, normalised: `gpu_milli` is the share of each of its `num_gpu` GPUs
/// (1..=1000), 0 for a CPU-only pod (then `num_gpu` is 0 too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TracePod {
    pub name: String,
    pub cpu_milli: u64,
    pub memory_mib: u64,
    pub num_gpu: u8,
    pub gpu_milli: u16,
    /// Accepted GPU models; empty means any.
    pub gpu_spec: Vec<String>,
}

impl TracePod {
    /// Milli-GPU the pod asks for in all.
    pub fn gpu_request(&self) -> u64 {
        u64::from(self.gpu_milli) * u64::from(self.num_gpu)
    }

    /// A pod sharing one GPU with others (as [`PodClass::is_share`]).
    pub fn is_share(&self) -> bool {
        self.num_gpu <= 1 && self.gpu_milli > 0 && self.gpu_milli < GPU_MILLI
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trace {
    pub nodes: Vec<TraceNode>,
    pub pods: Vec<TracePod>,
}

#[derive(Debug, Error, PartialEq)]
pub enum ReplayError {
    #[error("the trace has no node with a GPU")]
    NoGpus,
    #[error("the trace has no pods")]
    NoPods,
    #[error("node `{name}` appears twice")]
    DuplicateNode { name: String },
    #[error("node `{node}` has {gpus} GPUs; the replay supports at most {REPLAY_NODE_GPUS_MAX}")]
    TooManyGpus { node: String, gpus: u8 },
    #[error("the trace has more than {REPLAY_MODELS_MAX} GPU models")]
    TooManyModels,
    #[error("pod `{pod}`: {reason}")]
    BadPod { pod: String, reason: String },
    #[error("load ratio {0} must be a number above 0")]
    BadRatio(f64),
    #[error("arrivals: {0}")]
    BadArrivals(String),
    #[error("internal error: the ledger refused a placement the filter allowed: {0}")]
    Ledger(#[from] ShareError),
}

/// A set of GPU models, by index into [`Prepared::models`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelSet(pub u64);

impl ModelSet {
    pub const ANY: ModelSet = ModelSet(u64::MAX);

    pub fn of(model: u8) -> Self {
        ModelSet(1u64 << model)
    }

    pub fn contains(self, model: u8) -> bool {
        self.0 & (1u64 << model) != 0
    }
}

/// What the policies see of a pod: everything but memory (which only the filter reads).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PodClass {
    pub cpu_milli: u64,
    pub gpu_milli: u16,
    pub num_gpu: u8,
    /// The trace's `gpu_spec` text (part of the class identity, as in the artifact).
    pub gpu_spec: String,
    pub models: ModelSet,
}

impl PodClass {
    pub fn allows_model(&self, model: u8) -> bool {
        self.models.contains(model)
    }

    /// A pod sharing one GPU with others.
    pub fn is_share(&self) -> bool {
        self.num_gpu <= 1 && self.gpu_milli > 0 && self.gpu_milli < GPU_MILLI
    }

    pub fn gpu_request(&self) -> u64 {
        // `Prepared::new` guarantees num_gpu > 0 exactly when gpu_milli > 0.
        u64::from(self.gpu_milli) * u64::from(self.num_gpu)
    }
}

/// A node's state as the policies see it.
#[derive(Debug, Clone, Copy)]
pub struct NodeView<'a> {
    pub model: u8,
    pub cpu_left: u64,
    pub gpu_left: &'a [u16],
}

#[derive(Debug, Clone)]
struct PreparedPod {
    class: u32,
    memory_mib: u64,
}

/// A trace checked and indexed once, shared by every run.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Nodes sorted by name.
    pub nodes: Vec<TraceNode>,
    node_models: Vec<u8>,
    pub models: Vec<String>,
    /// Pods sorted by name.
    pods: Vec<PreparedPod>,
    classes: Vec<PodClass>,
    /// The FGD target workload, from the trace as given (before cutting or repeating): FGD
    /// reads the whole trace before the first pod. topoplace reads only the arrivals so far
    /// (`policy::ArrivalDemand`).
    pub typical: Vec<TypicalPod>,
    pub gpu_capacity_milli: u64,
}

impl Prepared {
    pub fn new(trace: &Trace) -> Result<Self, ReplayError> {
        let mut nodes = trace.nodes.clone();
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        if let Some(pair) = nodes.windows(2).find(|pair| pair[0].name == pair[1].name) {
            return Err(ReplayError::DuplicateNode { name: pair[0].name.clone() });
        }
        let mut models: Vec<String> = Vec::new();
        let mut node_models = Vec::with_capacity(nodes.len());
        for node in &nodes {
            if node.gpus > REPLAY_NODE_GPUS_MAX {
                return Err(ReplayError::TooManyGpus { node: node.name.clone(), gpus: node.gpus });
            }
            let id = match models.iter().position(|m| *m == node.model) {
                Some(id) => id,
                None => {
                    models.push(node.model.clone());
                    models.len() - 1
                }
            };
            if id >= REPLAY_MODELS_MAX {
                return Err(ReplayError::TooManyModels);
            }
            node_models.push(id as u8);
        }
        let gpu_capacity_milli: u64 = nodes.iter().map(|n| u64::from(n.gpus) * u64::from(GPU_MILLI)).sum();
        if gpu_capacity_milli == 0 {
            return Err(ReplayError::NoGpus);
        }
        if trace.pods.is_empty() {
            return Err(ReplayError::NoPods);
        }
        let mut sorted: Vec<&TracePod> = trace.pods.iter().collect();
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        let mut class_ids: HashMap<PodClass, u32> = HashMap::new();
        let mut classes = Vec::new();
        let mut pods = Vec::with_capacity(sorted.len());
        let mut pod_classes = Vec::with_capacity(sorted.len());
        for pod in sorted {
            let bad = |reason: &str| ReplayError::BadPod { pod: pod.name.clone(), reason: reason.into() };
            if pod.gpu_milli > GPU_MILLI {
                return Err(bad("gpu_milli above 1000 (one GPU)"));
            }
            if (pod.gpu_milli == 0) != (pod.num_gpu == 0) {
                return Err(bad("asks for a GPU share without GPUs, or GPUs without a share"));
            }
            if pod.num_gpu > 1 && pod.gpu_milli < GPU_MILLI {
                return Err(bad("a share below one GPU is only for a single-GPU pod"));
            }
            let models = if pod.gpu_spec.is_empty() {
                ModelSet::ANY
            } else {
                ModelSet(
                    pod.gpu_spec
                        .iter()
                        .filter_map(|spec| models.iter().position(|m| m == spec))
                        .fold(0, |set, id| set | 1u64 << id),
                )
            };
            let class = PodClass {
                cpu_milli: pod.cpu_milli,
                gpu_milli: pod.gpu_milli,
                num_gpu: pod.num_gpu,
                gpu_spec: pod.gpu_spec.join("|"),
                models,
            };
            let next = classes.len() as u32;
            let id = *class_ids.entry(class.clone()).or_insert_with(|| {
                classes.push(class.clone());
                next
            });
            pod_classes.push(class);
            pods.push(PreparedPod { class: id, memory_mib: pod.memory_mib });
        }
        let typical = typical_pods(&pod_classes, frag::TYPICAL_COVERAGE);
        Ok(Prepared { nodes, node_models, models, pods, classes, typical, gpu_capacity_milli })
    }

    pub fn pod_count(&self) -> usize {
        self.pods.len()
    }

    fn capacities(&self) -> Vec<NodeCapacity> {
        self.nodes
            .iter()
            .map(|n| NodeCapacity {
                name: n.name.clone(),
                cpu_milli: n.cpu_milli,
                memory_mib: n.memory_mib,
                gpus: n.gpus,
            })
            .collect()
    }

    fn class_of(&self, pod: u32) -> &PodClass {
        &self.classes[self.pods[pod as usize].class as usize]
    }
}

/// One seed's arrival sequence and node ranks, shared by every policy run on that seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arrivals {
    pub seed: u64,
    /// Indices into the name-sorted pods; a repeated pod appears more than once.
    pub pods: Vec<u32>,
    /// Per node (name order), its tie-break rank: the smaller rank wins a tie.
    pub node_rank: Vec<u32>,
}

/// The arrival order for `seed`: pods by name, shuffled, then cut (random pods removed)
/// or repeated (random pods appended) until the GPU request reaches `ratio` times capacity.
///
/// Repeating stops at the first drawn pod whose *per-GPU* share would cross the target,
/// as the artifact does (it compares the per-GPU share rather than the pod's whole
/// request); copied so the arrived load matches the paper's.
pub fn arrivals(prepared: &Prepared, seed: u64, ratio: f64) -> Result<Arrivals, ReplayError> {
    if !(ratio.is_finite() && ratio > 0.0) {
        return Err(ReplayError::BadRatio(ratio));
    }
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let count = prepared.pods.len() as u32;
    let mut pods: Vec<u32> = (0..count).collect();
    pods.shuffle(&mut rng);
    let request = |pod: u32| prepared.class_of(pod).gpu_request();
    let target = ratio * prepared.gpu_capacity_milli as f64;
    let mut total: u64 = pods.iter().map(|&p| request(p)).sum();
    if total as f64 > target {
        while total as f64 > target && !pods.is_empty() {
            let removed = pods.remove(rng.random_range(0..pods.len()));
            total -= request(removed);
        }
    } else {
        loop {
            let pod = rng.random_range(0..count);
            if (total + u64::from(prepared.class_of(pod).gpu_milli)) as f64 > target {
                break;
            }
            pods.push(pod);
            total += request(pod);
        }
    }
    let mut node_rank: Vec<u32> = (0..prepared.nodes.len() as u32).collect();
    node_rank.shuffle(&mut rng);
    Ok(Arrivals { seed, pods, node_rank })
}

/// Allocation against arrived load, binned by whole percent of arrived load.
#[derive(Debug, Clone, PartialEq)]
pub struct Curve {
    /// Per arrived percent 0..=ARRIVED_PCT_MAX: the mean allocation percent of the samples
    /// in that bin (or in the bins next to it when it has none).
    pub allocation_pct: Vec<Option<f64>>,
}

impl Curve {
    pub fn at(&self, arrived_pct: usize) -> Option<f64> {
        self.allocation_pct.get(arrived_pct).copied().flatten()
    }
}

/// Samples (arrived milli-GPU, allocated milli-GPU) into per-percent bins, as the
/// artifact's analysis does: arrived rounds half to even to a whole percent, allocation
/// to two decimals, and an empty bin takes the samples of its neighbours.
#[derive(Debug, Clone)]
struct CurveBins {
    capacity: f64,
    bins: Vec<(f64, u32)>,
}

impl CurveBins {
    fn new(capacity_milli: u64) -> Self {
        CurveBins { capacity: capacity_milli as f64, bins: Vec::new() }
    }

    fn record(&mut self, arrived: u64, used: u64) {
        let arrived_pct = (arrived as f64 * 100.0 / self.capacity).round_ties_even() as usize;
        let allocation_pct = (used as f64 * 100.0 / self.capacity * 100.0).round() / 100.0;
        if self.bins.len() <= arrived_pct {
            self.bins.resize(arrived_pct + 1, (0.0, 0));
        }
        let bin = &mut self.bins[arrived_pct];
        bin.0 += allocation_pct;
        bin.1 += 1;
    }

    fn finish(&self) -> Curve {
        let bin = |x: usize| self.bins.get(x).copied().unwrap_or((0.0, 0));
        let allocation_pct = (0..=ARRIVED_PCT_MAX)
            .map(|x| {
                let (sum, count) = bin(x);
                if count > 0 {
                    return Some(sum / f64::from(count));
                }
                let neighbours = [x.checked_sub(1).map_or((0.0, 0), bin), bin(x + 1)];
                let (sum, count) = neighbours.iter().fold((0.0, 0), |acc, b| (acc.0 + b.0, acc.1 + b.1));
                (count > 0).then(|| sum / f64::from(count))
            })
            .collect();
        Curve { allocation_pct }
    }
}

/// Where one arrival went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// Index into [`Prepared::nodes`].
    pub node: u32,
    pub gpus: GpuMask,
}

/// What one policy did on one seed.
#[derive(Debug, Clone, PartialEq)]
pub struct RunOutcome {
    pub policy: Policy,
    pub seed: u64,
    pub curve: Curve,
    /// Per arrival, where it went (`None`: it fit nowhere and was dropped).
    pub placements: Vec<Option<Placement>>,
    pub attempted: usize,
    pub placed: usize,
    /// Allocated share of the cluster's GPUs after the last arrival, in percent.
    pub final_allocation_pct: f64,
}

/// Pods between two calls of the progress callback.
pub const PROGRESS_STEP: usize = 256;

/// Replays `arrivals` under `policy`. `progress` is called with the number of pods
/// attempted since its last call.
pub fn run(
    prepared: &Prepared,
    arrivals: &Arrivals,
    policy: Policy,
    progress: &mut dyn FnMut(usize),
) -> Result<RunOutcome, ReplayError> {
    if arrivals.node_rank.len() != prepared.nodes.len() {
        return Err(ReplayError::BadArrivals(format!(
            "{} node ranks for {} nodes",
            arrivals.node_rank.len(),
            prepared.nodes.len()
        )));
    }
    if let Some(&pod) = arrivals.pods.iter().find(|&&pod| pod as usize >= prepared.pods.len()) {
        return Err(ReplayError::BadArrivals(format!("pod index {pod} of {} pods", prepared.pods.len())));
    }
    let mut ledger: ShareLedger<u32> = ShareLedger::new(prepared.capacities())?;
    let mut scorer = policy::Scorer::new(policy, prepared, arrivals);
    let mut bins = CurveBins::new(prepared.gpu_capacity_milli);
    let mut feasible: Vec<u32> = Vec::with_capacity(prepared.nodes.len());
    let (mut arrived, mut used, mut placed) = (0u64, 0u64, 0usize);
    let mut placements = Vec::with_capacity(arrivals.pods.len());
    for (step, &pod) in arrivals.pods.iter().enumerate() {
        let class_id = prepared.pods[pod as usize].class;
        let class = &prepared.classes[class_id as usize];
        let memory = prepared.pods[pod as usize].memory_mib;
        scorer.arrived(class_id);
        feasible.clear();
        feasible.extend((0..prepared.nodes.len() as u32).filter(|&node| fits(prepared, &ledger, node, class, memory)));
        arrived += class.gpu_request();
        if !feasible.is_empty() {
            let node = scorer.select(&ledger, &feasible, class_id);
            let gpus = scorer.choose_gpus(&ledger, node, class_id);
            let request = ShareRequest { cpu_milli: class.cpu_milli, memory_mib: memory, gpu_milli: class.gpu_milli };
            ledger.reserve(step as u32, ShareGrant { node, gpus, request })?;
            scorer.placed(node, class_id);
            used += class.gpu_request();
            placed += 1;
            placements.push(Some(Placement { node, gpus }));
        } else {
            placements.push(None);
        }
        bins.record(arrived, used);
        if (step + 1) % PROGRESS_STEP == 0 {
            progress(PROGRESS_STEP);
        }
    }
    progress(arrivals.pods.len() % PROGRESS_STEP);
    debug_assert_eq!(ledger.gpu_milli_used(), used);
    debug_assert_eq!(ledger.check(), Ok(()));
    Ok(RunOutcome {
        policy,
        seed: arrivals.seed,
        curve: bins.finish(),
        placements,
        attempted: arrivals.pods.len(),
        placed,
        final_allocation_pct: used as f64 * 100.0 / prepared.gpu_capacity_milli as f64,
    })
}

/// The filter: CPU and memory fit, and for a GPU pod an allowed model with enough GPUs
/// that each have the pod's share left.
fn fits(prepared: &Prepared, ledger: &ShareLedger<u32>, node: u32, class: &PodClass, memory: u64) -> bool {
    if ledger.cpu_left(node) < class.cpu_milli || ledger.memory_left(node) < memory {
        return false;
    }
    if class.gpu_milli == 0 {
        return true;
    }
    if !class.allows_model(prepared.node_models[node as usize]) {
        return false;
    }
    has_room(ledger.gpu_left(node), class)
}

/// At least as many GPUs as the class asks for have its share left.
pub(crate) fn has_room(gpu_left: &[u16], class: &PodClass) -> bool {
    gpu_left.iter().filter(|&&left| left >= class.gpu_milli).count() >= usize::from(class.num_gpu.max(1))
}

/// The `count` GPUs a non-share pod takes: the first by index with `milli` left.
fn first_fit(gpu_left: &[u16], milli: u16, count: u8) -> GpuMask {
    gpu_left
        .iter()
        .enumerate()
        .filter(|&(_, &left)| left >= milli)
        .take(usize::from(count))
        .fold(0, |mask, (index, _)| mask | 1u64 << index)
}

#[cfg(test)]
mod tests;
