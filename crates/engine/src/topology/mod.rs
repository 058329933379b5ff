//! The cluster model: hosts, their GPUs and intra-host links, the topology domains above
//! them (any number of levels, outermost first) and multi-host NVLink cliques.
//!
//! [`Cluster::build`] validates a [`ClusterSpec`] (already free of any file format), builds
//! the petgraph [`graph::TopologyGraph`] and derives from it the flat index the placement
//! engine reads on its hot path: per host the GPU x GPU bandwidth matrix and NVLink
//! adjacency, per host its domain at every level, per domain a contiguous host range.
//! Hosts are sorted by their domain path so that every domain owns a contiguous range.

pub mod graph;
pub mod product;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Range;

use thiserror::Error;

pub use product::{Fabric, GpuProduct, ProductId};

/// GPU indices are kept in `u64` masks, so a host has at most this many GPUs.
pub const HOST_GPUS_MAX: usize = 64;
/// Hosts in one cluster; a bound so that every index fits `u32` with room to spare.
pub const CLUSTER_HOSTS_MAX: usize = 1_000_000;
/// Topology levels above the host.
pub const LEVELS_MAX: usize = 16;

pub type HostId = u32;
pub type GpuMask = u64;

/// How the GPUs of one host are linked by NVLink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NvlinkLayout {
    /// All-to-all through NVSwitch.
    All,
    /// No NVLink.
    None,
    /// Bridged pairs 0-1, 2-3, ...
    Pairs,
    /// DGX-1 hybrid cube-mesh (8 GPUs).
    HybridCubeMesh,
    /// Explicit groups; all-to-all inside a group, nothing across.
    Groups(Vec<Vec<u8>>),
}

/// One host as the cluster file (or a Kubernetes Node) describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSpec {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub product: ProductId,
    pub gpu_count: u8,
    /// Overrides the product's memory (MiB).
    pub memory_mib: Option<u64>,
    /// Overrides the product's intra-host NVLink layout.
    pub nvlink: Option<NvlinkLayout>,
    /// Multi-host NVLink domain (`nvidia.com/gpu.clique`).
    pub clique: Option<String>,
    /// GPU indices already in use.
    pub allocated: Vec<u8>,
    /// The node's GPUs are MIG devices of this profile (`2g.20gb`; GPU Feature Discovery's
    /// single MIG strategy, where `nvidia.com/gpu` is one MIG device): `gpu_count` counts
    /// devices, `memory_mib` is one device's, and `product` is the profile's own
    /// ([`product::register_mig`]). They have no NVLink, and each takes a member of one GPU
    /// without tensor parallelism only.
    pub mig_profile: Option<String>,
    /// The node's GPUs are shared (time-slicing or MPS): `gpu_count` counts whole GPUs, as
    /// GFD's `nvidia.com/gpu.count` does, and the device plugin offers each as `replicas`
    /// devices, so the host has `gpu_count x replicas` devices (at most [`HOST_GPUS_MAX`]);
    /// `product` is the replicas' own ([`product::register_shared`]), `memory_mib` a whole
    /// GPU's, and `allocated` names devices. Each replica takes a member of one GPU without
    /// tensor parallelism, and is planned with `1/replicas` of its GPU's memory: MPS enforces
    /// that share; time-slicing promises none, so the fair share is what can be counted on.
    pub sharing: Option<GpuSharing>,
    /// The device-plugin resource these devices are offered as. A node of GFD's mixed MIG
    /// strategy is several specs of one name, one per pool: its whole GPUs and each MIG
    /// profile's devices; every other node is one spec of [`DevicePool::Gpu`].
    pub pool: DevicePool,
}

/// Which device-plugin resource a host's devices are offered as (k8s-device-plugin,
/// `internal/rm`; GFD `internal/lm/mig-strategy.go`). With the node's name it names a host:
/// a pod draws devices from one pool, the one its resource names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum DevicePool {
    /// `nvidia.com/gpu`: whole GPUs, the MIG devices of the single strategy, or shared
    /// replicas.
    #[default]
    Gpu,
    /// `nvidia.com/mig-<profile>`: the MIG devices of one profile under the mixed strategy.
    Mig(String),
}

impl DevicePool {
    /// The MIG profile of a mixed-strategy pool.
    pub fn mig_profile(&self) -> Option<&str> {
        match self {
            DevicePool::Gpu => None,
            DevicePool::Mig(profile) => Some(profile),
        }
    }
}

impl std::fmt::Display for DevicePool {
    /// The resource name: `nvidia.com/gpu`, `nvidia.com/mig-2g.20gb`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DevicePool::Gpu => write!(f, "nvidia.com/gpu"),
            DevicePool::Mig(profile) => write!(f, "nvidia.com/mig-{profile}"),
        }
    }
}

impl NodeSpec {
    /// The devices the device plugin offers: whole GPUs, MIG devices, or shared replicas.
    pub fn devices(&self) -> u32 {
        u32::from(self.gpu_count) * self.sharing.map_or(1, |sharing| u32::from(sharing.replicas))
    }
}

/// How a node's GPUs are shared: the NVIDIA device plugin's `sharing.timeSlicing` or
/// `sharing.mps` with `replicas` per GPU, as GPU Feature Discovery labels them
/// (`nvidia.com/gpu.sharing-strategy`, `nvidia.com/gpu.replicas`; the device plugin's README,
/// "Shared Access to GPUs").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuSharing {
    pub strategy: SharingStrategy,
    /// Devices each GPU is offered as, 2 or more.
    pub replicas: u8,
}

/// GFD's `nvidia.com/gpu.sharing-strategy` values other than `none`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharingStrategy {
    /// CUDA time-slicing: replicas interleave, with no memory or fault isolation.
    TimeSlicing,
    /// CUDA MPS: each replica gets an equal share of memory and compute, enforced.
    Mps,
}

impl SharingStrategy {
    /// The label value (`time-slicing`, `mps`).
    pub fn as_str(self) -> &'static str {
        match self {
            SharingStrategy::TimeSlicing => "time-slicing",
            SharingStrategy::Mps => "mps",
        }
    }

    /// From the label value (ASCII case ignored); `None` for anything else.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("time-slicing") {
            Some(SharingStrategy::TimeSlicing)
        } else if text.eq_ignore_ascii_case("mps") {
            Some(SharingStrategy::Mps)
        } else {
            None
        }
    }
}

pub use product::MIG_PROFILE_BYTES_MAX;

#[derive(Debug, Clone, PartialEq, Default)]
pub struct ClusterSpec {
    pub name: String,
    /// Label keys of the topology levels, outermost first.
    pub levels: Vec<String>,
    pub nodes: Vec<NodeSpec>,
}

/// What is wrong with a cluster; each variant names the node (and so the file position
/// can be found by the caller, which knows where the node came from).
#[derive(Debug, Error, PartialEq)]
pub enum TopologyError {
    #[error("node `{node}`: name appears twice")]
    DuplicateNode { node: String },
    #[error("node `{node}`: its {pool} devices have other labels than the node's first pool; a node's pools share its labels")]
    PoolLabels { node: String, pool: String },
    #[error(
        "node `{node}`: the pool of nvidia.com/mig-{pool} devices must be MIG devices of profile {pool}, not {profile}"
    )]
    MigPool { node: String, pool: String, profile: String },
    #[error("node `{node}`: gpu.count {count} is out of range (1..={HOST_GPUS_MAX})")]
    GpuCount { node: String, count: usize },
    #[error("node `{node}`: allocated GPU index {index} is not below the node's {count} devices (gpu.count, times the replicas when shared)")]
    AllocatedIndex { node: String, index: u8, count: u32 },
    #[error("node `{node}`: allocated GPU index {index} is listed twice")]
    AllocatedTwice { node: String, index: u8 },
    #[error("node `{node}`: gpu.nvlink {detail}")]
    Nvlink { node: String, detail: String },
    #[error("node `{node}`: gpu.clique `{clique}` is set but {product} has no multi-host NVLink")]
    CliqueWithoutFabric { node: String, clique: String, product: String },
    #[error("node `{node}`: gpu.memory must be above 0")]
    Memory { node: String },
    #[error("node `{node}`: name must not be empty")]
    EmptyName { node: String },
    #[error(
        "node `{node}`: MIG profile `{profile}` is not a profile name (like 2g.20gb; at most {MIG_PROFILE_BYTES_MAX} \
         letters, digits, `.`, `+` and `-`)"
    )]
    MigProfile { node: String, profile: String },
    #[error("node `{node}`: {field} is set, but the node's GPUs are MIG devices ({profile})")]
    MigWith { node: String, profile: String, field: &'static str },
    #[error("node `{node}`: product {product} and the MIG profile disagree (MIG devices are `product::register_mig`'s products)")]
    MigProduct { node: String, product: String },
    /// A shared node's `field` (`gpu.replicas`, `gpu.nvlink`, ...) is wrong.
    #[error("node `{node}`: {field}: {detail}")]
    Sharing { node: String, field: &'static str, detail: String },
    #[error("levels: `{level}` is listed twice")]
    DuplicateLevel { level: String },
    #[error("levels: at most {LEVELS_MAX} levels, got {count}")]
    TooManyLevels { count: usize },
    #[error("cluster has {count} nodes, more than the {CLUSTER_HOSTS_MAX} supported")]
    TooManyNodes { count: usize },
    #[error("cluster has no nodes")]
    Empty,
}

/// Per-host GPU links, derived from the graph.
#[derive(Debug, Clone, PartialEq)]
pub struct HostLinks {
    /// `gpu_count x gpu_count`, bidirectional GB/s of the best path (NVLink or PCIe).
    pub bandwidth_gbps: Vec<u32>,
    /// Per GPU, the GPUs it reaches over NVLink (directly or through an NVSwitch).
    pub nvlink_neighbors: Vec<GpuMask>,
    /// Every pair NVLinked at the same bandwidth: any GPU subset is as good as another.
    pub uniform_nvlink: bool,
    /// Highest NVLink bandwidth between any two GPUs of the host (0 without NVLink).
    pub best_nvlink_gbps: u32,
    /// GPUs in the host's largest NVLink-connected set (1 without NVLink: a GPU alone): the
    /// largest tensor-parallel group this host can keep on NVLink.
    pub largest_nvlink_group: u32,
    /// GPUs per CPU socket (PCIe root), used to keep a member on one socket.
    pub numa_masks: Vec<GpuMask>,
}

impl Host {
    /// Whether this host, all free, is a whole-host slot for the fragmentation shapes (whole
    /// hosts, rack room): not when its devices are MIG devices or shared replicas
    /// ([`Host::partitioned`]), which take single-GPU members only.
    pub fn whole_host_slot(&self) -> bool {
        !self.partitioned()
    }

    /// Whether the host's devices are parts of GPUs (MIG devices or shared replicas) rather
    /// than whole GPUs: each takes a member of one GPU without tensor parallelism only.
    pub fn partitioned(&self) -> bool {
        self.mig_profile.is_some() || self.sharing.is_some()
    }
}

impl HostLinks {
    pub fn bandwidth(&self, gpu_count: u8, a: u8, b: u8) -> u32 {
        self.bandwidth_gbps[usize::from(a) * usize::from(gpu_count) + usize::from(b)]
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Host {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub product: ProductId,
    pub gpu_count: u8,
    pub memory_mib: u64,
    pub nvlink: NvlinkLayout,
    pub links: HostLinks,
    /// Index of this host's domain at every level (`domains[level][index]`).
    pub domain_path: Vec<u32>,
    /// Index into [`Cluster::cliques`].
    pub clique: Option<u32>,
    pub nic_count: u8,
    /// The host's GPUs are MIG devices of this profile ([`NodeSpec::mig_profile`]).
    pub mig_profile: Option<String>,
    /// The host's devices are shared replicas ([`NodeSpec::sharing`]): `gpu_count` counts
    /// replicas and `memory_mib` is one replica's.
    pub sharing: Option<GpuSharing>,
    /// The resource its devices are offered as ([`NodeSpec::pool`]); `name` and `pool`
    /// together are unique, and the hosts of one node are adjacent, [`DevicePool::Gpu`] first.
    pub pool: DevicePool,
}

impl Host {
    pub fn all_gpus(&self) -> GpuMask {
        full_mask(self.gpu_count)
    }
}

pub fn full_mask(count: u8) -> GpuMask {
    if usize::from(count) >= HOST_GPUS_MAX {
        u64::MAX
    } else {
        (1u64 << count) - 1
    }
}

/// A topology domain (a zone, a spine block, a rack...): a contiguous range of hosts.
#[derive(Debug, Clone, PartialEq)]
pub struct Domain {
    pub level: usize,
    /// The label value; `None` for hosts that lack the label (each such host gets a
    /// domain of its own, so it is never taken as local to anything).
    pub value: Option<String>,
    /// Label values from the outermost level down to this one, joined by `/`.
    pub path: String,
    pub hosts: Range<u32>,
    /// Index of the enclosing domain one level up.
    pub parent: Option<u32>,
    /// Children one level down (empty at the innermost level).
    pub children: Range<u32>,
}

/// A multi-host NVLink domain (GB200 NVL72 rack and the like).
#[derive(Debug, Clone, PartialEq)]
pub struct Clique {
    pub name: String,
    pub hosts: Vec<HostId>,
}

#[derive(Debug, Clone)]
pub struct Cluster {
    pub name: String,
    pub levels: Vec<String>,
    pub hosts: Vec<Host>,
    pub domains: Vec<Vec<Domain>>,
    pub cliques: Vec<Clique>,
    pub graph: graph::TopologyGraph,
    /// GPUs in use when the cluster was described (`allocated`), per host.
    pub initially_used: Vec<GpuMask>,
    /// Per node name, its first host (the hosts of a node are adjacent).
    host_index: HashMap<String, HostId>,
}

impl Cluster {
    pub fn build(spec: ClusterSpec) -> Result<Self, TopologyError> {
        validate(&spec)?;
        let ClusterSpec { name, levels, mut nodes } = spec;

        // Sort hosts by domain path (labelled values before unlabelled, then the value)
        // and name, so that each domain is a contiguous range of hosts.
        let path_of = |node: &NodeSpec| -> Vec<(bool, String)> {
            levels
                .iter()
                .map(|key| match node.labels.get(key) {
                    Some(value) => (false, value.clone()),
                    None => (true, node.name.clone()),
                })
                .collect()
        };
        // The pools of one node (same labels, same name) end up adjacent, `Gpu` first.
        nodes.sort_by_cached_key(|node| (path_of(node), node.name.clone(), node.pool.clone()));

        let paths: Vec<Vec<(bool, String)>> = nodes.iter().map(path_of).collect();
        let (domains, mut domain_paths) = build_domains(levels.len(), &paths);
        let (mut hosts, cliques, initially_used) = build_hosts(nodes, &mut domain_paths);
        let topology_graph = graph::TopologyGraph::build(&levels, &domains, &hosts, &cliques);
        for (host_index, host) in hosts.iter_mut().enumerate() {
            host.links = topology_graph.derive_host_links(host_index as HostId, host.gpu_count);
        }
        let mut host_index = HashMap::with_capacity(hosts.len());
        for (i, host) in hosts.iter().enumerate() {
            host_index.entry(host.name.clone()).or_insert(i as HostId);
        }
        Ok(Cluster { name, levels, hosts, domains, cliques, graph: topology_graph, initially_used, host_index })
    }

    /// The host of node `name` whose devices are `nvidia.com/gpu` ([`DevicePool::Gpu`]): the
    /// node's only host unless it is of the mixed MIG strategy.
    pub fn host_id(&self, name: &str) -> Option<HostId> {
        self.host_in(name, &DevicePool::Gpu)
    }

    /// The host of node `name` whose devices are offered as `pool`.
    pub fn host_in(&self, name: &str, pool: &DevicePool) -> Option<HostId> {
        self.hosts_of(name).find(|&id| self.hosts[id as usize].pool == *pool)
    }

    /// Every host of node `name` (one per [`DevicePool`]), `Gpu` first; none for a node not
    /// in the view.
    pub fn hosts_of<'a>(&'a self, name: &'a str) -> impl Iterator<Item = HostId> + 'a {
        let first = self.host_index.get(name).copied();
        let from = first.unwrap_or(self.hosts.len() as HostId);
        (from..self.hosts.len() as HostId)
            .take_while(move |&id| first.is_some() && self.hosts[id as usize].name == name)
    }

    /// The same host in this cluster as `host` is in another (same node, same pool).
    pub fn same_host(&self, host: &Host) -> Option<HostId> {
        self.host_in(&host.name, &host.pool)
    }

    pub fn host(&self, id: HostId) -> &Host {
        &self.hosts[id as usize]
    }

    pub fn total_gpus(&self) -> u64 {
        self.hosts.iter().map(|h| u64::from(h.gpu_count)).sum()
    }

    /// The outermost level at which two hosts are in different domains, i.e. the number of
    /// levels they share (0: not even the outermost; `levels.len()`: same innermost domain).
    pub fn shared_levels(&self, a: HostId, b: HostId) -> usize {
        let (pa, pb) = (&self.host(a).domain_path, &self.host(b).domain_path);
        pa.iter().zip(pb).take_while(|(x, y)| x == y).count()
    }

    /// Products present in the cluster, in table order.
    pub fn products(&self) -> Vec<ProductId> {
        let set: BTreeSet<ProductId> = self.hosts.iter().map(|h| h.product).collect();
        set.into_iter().collect()
    }

    /// Level index of a level key or a known short name (`rack`, `block`, ...): the
    /// innermost level whose key ends with the name.
    pub fn level_index(&self, name: &str) -> Option<usize> {
        if let Some(exact) = self.levels.iter().position(|key| key == name) {
            return Some(exact);
        }
        self.levels
            .iter()
            .rposition(|key| key.rsplit(['/', '.']).next().is_some_and(|tail| tail.eq_ignore_ascii_case(name)))
    }
}

/// The domains of every level, each a contiguous range of the hosts (sorted by `paths`,
/// one `(unlabelled, value)` per level), with parents and children; and each host's domain
/// index at every level.
fn build_domains(levels: usize, paths: &[Vec<(bool, String)>]) -> (Vec<Vec<Domain>>, Vec<Vec<u32>>) {
    let mut domains: Vec<Vec<Domain>> = vec![Vec::new(); levels];
    let mut domain_paths: Vec<Vec<u32>> = vec![Vec::with_capacity(levels); paths.len()];
    let mut previous: Option<&Vec<(bool, String)>> = None;
    for (host_index, path) in paths.iter().enumerate() {
        // The first level at which this host's path differs from the previous host's.
        let first_new_level = match &previous {
            None => 0,
            Some(prev) => prev.iter().zip(path).take_while(|(a, b)| a == b).count(),
        };
        for (level, (unlabelled, value)) in path.iter().enumerate() {
            if level >= first_new_level {
                let parent = level.checked_sub(1).map(|up| u32::try_from(domains[up].len() - 1).unwrap_or(u32::MAX));
                let parent_path =
                    parent.and_then(|p| level.checked_sub(1).map(|up| domains[up][p as usize].path.clone()));
                let shown = if *unlabelled { format!("({} unlabelled)", value) } else { value.clone() };
                let path_text = match parent_path {
                    Some(prefix) => format!("{prefix}/{shown}"),
                    None => shown,
                };
                domains[level].push(Domain {
                    level,
                    value: (!unlabelled).then(|| value.clone()),
                    path: path_text,
                    hosts: host_index as u32..host_index as u32,
                    parent,
                    children: 0..0,
                });
            }
            let current = domains[level].len() - 1;
            domains[level][current].hosts.end = host_index as u32 + 1;
            domain_paths[host_index].push(current as u32);
        }
        previous = Some(path);
    }
    for level in 1..domains.len() {
        let (upper, lower) = domains.split_at_mut(level);
        for (index, domain) in lower[0].iter().enumerate() {
            if let Some(parent) = domain.parent {
                let parent_domain = &mut upper[level - 1][parent as usize];
                if parent_domain.children.is_empty() {
                    parent_domain.children = index as u32..index as u32 + 1;
                } else {
                    parent_domain.children.end = index as u32 + 1;
                }
            }
        }
    }
    (domains, domain_paths)
}

/// The hosts (links still empty: they come from the graph), the NVLink cliques, and the
/// GPUs each host has in use from the start.
fn build_hosts(nodes: Vec<NodeSpec>, domain_paths: &mut [Vec<u32>]) -> (Vec<Host>, Vec<Clique>, Vec<GpuMask>) {
    let mut clique_index: BTreeMap<String, u32> = BTreeMap::new();
    let mut cliques: Vec<Clique> = Vec::new();
    let mut hosts = Vec::with_capacity(nodes.len());
    let mut initially_used = Vec::with_capacity(nodes.len());
    for (host_index, node) in nodes.into_iter().enumerate() {
        let product = node.product.get();
        let clique = node.clique.as_ref().map(|name| {
            *clique_index.entry(name.clone()).or_insert_with(|| {
                cliques.push(Clique { name: name.clone(), hosts: Vec::new() });
                (cliques.len() - 1) as u32
            })
        });
        if let Some(clique) = clique {
            cliques[clique as usize].hosts.push(host_index as HostId);
        }
        let nvlink = if node.mig_profile.is_some() || node.sharing.is_some() {
            NvlinkLayout::None
        } else {
            node.nvlink.clone().unwrap_or(match product.fabric {
                Fabric::NvSwitch | Fabric::MultiNodeNvlink => NvlinkLayout::All,
                Fabric::BridgePairs => NvlinkLayout::Pairs,
                Fabric::HybridCubeMesh => NvlinkLayout::HybridCubeMesh,
                Fabric::PcieOnly | Fabric::Unknown => NvlinkLayout::None,
            })
        };
        initially_used.push(node.allocated.iter().fold(0u64, |mask, &gpu| mask | (1 << gpu)));
        let nic_count = match product.fabric {
            // MIG devices share their GPUs' NICs; how many GPUs they were cut from is not
            // known, so at most one NIC per device up to a full host's eight.
            _ if node.mig_profile.is_some() => node.gpu_count.min(8),
            // Shared replicas use the NICs of the whole GPUs they are made from.
            _ if node.sharing.is_some() => match node.product.whole_gpu().get().fabric {
                Fabric::NvSwitch | Fabric::MultiNodeNvlink => node.gpu_count,
                _ => node.gpu_count.div_ceil(2),
            },
            Fabric::NvSwitch | Fabric::MultiNodeNvlink => node.gpu_count,
            _ => node.gpu_count.div_ceil(2),
        };
        let replicas = node.sharing.map_or(1, |sharing| u64::from(sharing.replicas));
        // `validate_node` holds devices to `HOST_GPUS_MAX`.
        let devices = node.devices() as u8;
        hosts.push(Host {
            name: node.name,
            labels: node.labels,
            product: node.product,
            gpu_count: devices,
            memory_mib: (node.memory_mib.unwrap_or(product.memory_mib) / replicas).max(1),
            nvlink,
            links: HostLinks {
                bandwidth_gbps: Vec::new(),
                nvlink_neighbors: Vec::new(),
                uniform_nvlink: false,
                best_nvlink_gbps: 0,
                largest_nvlink_group: 1,
                numa_masks: Vec::new(),
            },
            domain_path: std::mem::take(&mut domain_paths[host_index]),
            clique,
            nic_count,
            mig_profile: node.mig_profile,
            sharing: node.sharing,
            pool: node.pool,
        });
    }
    (hosts, cliques, initially_used)
}

fn validate(spec: &ClusterSpec) -> Result<(), TopologyError> {
    if spec.nodes.is_empty() {
        return Err(TopologyError::Empty);
    }
    if spec.nodes.len() > CLUSTER_HOSTS_MAX {
        return Err(TopologyError::TooManyNodes { count: spec.nodes.len() });
    }
    if spec.levels.len() > LEVELS_MAX {
        return Err(TopologyError::TooManyLevels { count: spec.levels.len() });
    }
    let mut levels = BTreeSet::new();
    for level in &spec.levels {
        if !levels.insert(level) {
            return Err(TopologyError::DuplicateLevel { level: level.clone() });
        }
    }
    let mut names: BTreeMap<&str, &NodeSpec> = BTreeMap::new();
    let mut pools = BTreeSet::new();
    for node in &spec.nodes {
        validate_node(node)?;
        if !pools.insert((node.name.as_str(), &node.pool)) {
            return Err(TopologyError::DuplicateNode { node: node.name.clone() });
        }
        // The pools of one node are one machine: the same labels, so the same domains.
        if let Some(first) = names.insert(node.name.as_str(), node) {
            if first.labels != node.labels {
                return Err(TopologyError::PoolLabels { node: node.name.clone(), pool: node.pool.to_string() });
            }
        }
    }
    Ok(())
}

pub fn validate_node(node: &NodeSpec) -> Result<(), TopologyError> {
    let name = || node.name.clone();
    if node.name.trim().is_empty() {
        return Err(TopologyError::EmptyName { node: name() });
    }
    if node.gpu_count == 0 || usize::from(node.gpu_count) > HOST_GPUS_MAX {
        return Err(TopologyError::GpuCount { node: name(), count: node.gpu_count.into() });
    }
    if node.memory_mib == Some(0) {
        return Err(TopologyError::Memory { node: name() });
    }
    if let Some(sharing) = node.sharing {
        let problem = if sharing.replicas < 2 {
            Some(("gpu.replicas", format!("{} (a shared GPU is offered as 2 or more)", sharing.replicas)))
        } else if node.devices() as usize > HOST_GPUS_MAX {
            Some((
                "gpu.replicas",
                format!(
                    "{} GPUs x {} replicas is {} devices, over the {HOST_GPUS_MAX} supported per node",
                    node.gpu_count,
                    sharing.replicas,
                    node.devices()
                ),
            ))
        } else if node.mig_profile.is_some() {
            Some(("gpu.mig", "shared MIG devices are not planned".to_string()))
        } else if !matches!(node.nvlink, None | Some(NvlinkLayout::None)) {
            Some(("gpu.nvlink", "a shared GPU's replica has no NVLink of its own: leave it out".to_string()))
        } else if node.clique.is_some() {
            Some(("gpu.clique", "a shared GPU's replica has no NVLink of its own: leave it out".to_string()))
        } else {
            None
        };
        if let Some((field, detail)) = problem {
            return Err(TopologyError::Sharing { node: name(), field, detail });
        }
    }
    if node.sharing.is_some() != node.product.shared_parent().is_some() {
        return Err(TopologyError::Sharing {
            node: name(),
            field: "gpu.product",
            detail: format!(
                "product {} and the sharing disagree (shared replicas are `product::register_shared`'s products)",
                node.product.get().name
            ),
        });
    }
    let devices = node.devices();
    let mut seen = 0u64;
    for &index in &node.allocated {
        if u32::from(index) >= devices {
            return Err(TopologyError::AllocatedIndex { node: name(), index, count: devices });
        }
        if seen & (1 << index) != 0 {
            return Err(TopologyError::AllocatedTwice { node: name(), index });
        }
        seen |= 1 << index;
    }
    if node.mig_profile.is_some() != node.product.mig_parent().is_some() {
        return Err(TopologyError::MigProduct { node: name(), product: node.product.get().name.to_string() });
    }
    if let DevicePool::Mig(pool) = &node.pool {
        if node.mig_profile.as_deref() != Some(pool.as_str()) {
            return Err(TopologyError::MigPool {
                node: name(),
                pool: pool.clone(),
                profile: node.mig_profile.clone().unwrap_or_else(|| "none".into()),
            });
        }
    }
    if let Some(profile) = &node.mig_profile {
        if !product::is_mig_profile(profile) {
            return Err(TopologyError::MigProfile { node: name(), profile: profile.clone() });
        }
        let with = |field| Err(TopologyError::MigWith { node: name(), profile: profile.clone(), field });
        if !matches!(node.nvlink, None | Some(NvlinkLayout::None)) {
            return with("gpu.nvlink");
        }
        if node.clique.is_some() {
            return with("gpu.clique");
        }
    }
    let nvlink_error = |detail: String| TopologyError::Nvlink { node: name(), detail };
    match &node.nvlink {
        Some(NvlinkLayout::HybridCubeMesh) if node.gpu_count != 8 => {
            return Err(nvlink_error(format!("hybrid-cube-mesh needs 8 GPUs, the node has {}", node.gpu_count)));
        }
        Some(NvlinkLayout::Pairs) if !node.gpu_count.is_multiple_of(2) => {
            return Err(nvlink_error(format!("pairs needs an even GPU count, the node has {}", node.gpu_count)));
        }
        Some(NvlinkLayout::Groups(groups)) => {
            let mut used = 0u64;
            for group in groups {
                if group.is_empty() {
                    return Err(nvlink_error("has an empty group".into()));
                }
                for &gpu in group {
                    if gpu >= node.gpu_count {
                        return Err(nvlink_error(format!(
                            "names GPU {gpu}, but the node has {} GPUs (0..{})",
                            node.gpu_count,
                            node.gpu_count - 1
                        )));
                    }
                    if used & (1 << gpu) != 0 {
                        return Err(nvlink_error(format!("names GPU {gpu} in two groups")));
                    }
                    used |= 1 << gpu;
                }
            }
        }
        _ => {}
    }
    let product = node.product.get();
    if product.nvlink_gbps == 0 && !matches!(node.nvlink, None | Some(NvlinkLayout::None)) {
        return Err(nvlink_error(format!("is set, but {} has no NVLink", product.name)));
    }
    if let Some(clique) = &node.clique {
        if product.fabric != Fabric::MultiNodeNvlink {
            return Err(TopologyError::CliqueWithoutFabric {
                node: name(),
                clique: clique.clone(),
                product: product.name.to_string(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::node;

    #[test]
    fn domains_are_contiguous_host_ranges_even_when_names_repeat_under_parents() {
        // Rack `S1` exists under two different spines: they are two racks.
        let spec = ClusterSpec {
            name: "t".into(),
            levels: vec!["spine".into(), "rack".into()],
            nodes: vec![
                node("d", "H100", 8, &[("spine", "P2"), ("rack", "S1")]),
                node("a", "H100", 8, &[("spine", "P1"), ("rack", "S1")]),
                node("c", "H100", 8, &[("spine", "P1"), ("rack", "S2")]),
                node("b", "H100", 8, &[("spine", "P1"), ("rack", "S1")]),
                node("e", "H100", 8, &[]),
            ],
        };
        let cluster = Cluster::build(spec).expect("valid");
        let racks: Vec<_> = cluster.domains[1].iter().map(|d| (d.path.clone(), d.hosts.clone())).collect();
        assert_eq!(racks[0], ("P1/S1".to_string(), 0..2));
        assert_eq!(racks[1], ("P1/S2".to_string(), 2..3));
        assert_eq!(racks[2], ("P2/S1".to_string(), 3..4));
        assert_eq!(cluster.domains[0][0].children, 0..2);
        // The unlabelled host is alone in its domain at every level.
        let e = cluster.host_id("e").expect("host e");
        assert_eq!(cluster.domains[1][cluster.host(e).domain_path[1] as usize].hosts.len(), 1);
        assert_eq!(cluster.shared_levels(cluster.host_id("a").unwrap(), cluster.host_id("b").unwrap()), 2);
        assert_eq!(cluster.shared_levels(cluster.host_id("a").unwrap(), cluster.host_id("c").unwrap()), 1);
        assert_eq!(cluster.shared_levels(cluster.host_id("a").unwrap(), cluster.host_id("d").unwrap()), 0);
        assert_eq!(cluster.level_index("rack"), Some(1));
    }

    #[test]
    fn invalid_nodes_are_named() {
        let mut bad = node("n1", "H100", 8, &[]);
        bad.allocated = vec![8];
        let error = Cluster::build(ClusterSpec { nodes: vec![bad], ..Default::default() }).unwrap_err();
        assert_eq!(error.to_string(), "node `n1`: allocated GPU index 8 is not below the node's 8 devices (gpu.count, times the replicas when shared)");

        let mut bad = node("n2", "H100", 8, &[]);
        bad.nvlink = Some(NvlinkLayout::Groups(vec![vec![0, 1], vec![1, 2]]));
        let error = Cluster::build(ClusterSpec { nodes: vec![bad], ..Default::default() }).unwrap_err();
        assert!(error.to_string().contains("names GPU 1 in two groups"), "{error}");

        let mut bad = node("n3", "H100", 8, &[]);
        bad.clique = Some("c1".into());
        assert!(matches!(
            Cluster::build(ClusterSpec { nodes: vec![bad], ..Default::default() }),
            Err(TopologyError::CliqueWithoutFabric { .. })
        ));

        let twice = vec![node("x", "L4", 1, &[]), node("x", "L4", 1, &[])];
        assert_eq!(
            Cluster::build(ClusterSpec { nodes: twice, ..Default::default() }).unwrap_err(),
            TopologyError::DuplicateNode { node: "x".into() }
        );
    }
}
