//! Kubernetes Nodes into the topology model: GPU product, count, memory and clique from the
//! GPU Feature Discovery labels, topology levels from configured label keys, NVLink overrides
//! from `topoplace.io/nvlink-groups`. Nodes without GPUs are not part of the view; a GPU node
//! whose labels cannot be understood is left out with a reason the caller logs.
//!
//! What the device plugin offers wins over what the labels count: a node whose allocatable
//! `nvidia.com/gpu` is below its `nvidia.com/gpu.count` has GPUs the plugin withdrew
//! (unhealthy, or MIG-enabled under the mixed strategy) and is planned with the allocatable
//! count (0: kept, closed, so its pods stay counted). A product missing from the table is
//! planned from `nvidia.com/gpu.memory` with no NVLink assumed. Under the single MIG strategy
//! (`<product>-MIG-<profile>`) the node's MIG devices are its GPUs, each taking a member of one
//! GPU. A node whose GPUs are shared (time-slicing, MPS: `nvidia.com/gpu.replicas`) is planned
//! as its replicas, each taking a member of one GPU, as the device plugin offers them (each
//! replica one `nvidia.com/gpu`); under `renameByDefault` (`nvidia.com/gpu.shared`) it is left
//! out. Label names and their meaning are GPU Feature Discovery's (`internal/lm/resource.go`,
//! `mig-strategy.go`), the device plugin's README ("Shared Access to GPUs") and the GPU
//! Operator's GPU-sharing documentation.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Node;

use topoplace_engine::quantity;
use topoplace_engine::topology::{
    product, validate_node, ClusterSpec, DevicePool, GpuSharing, NodeSpec, NvlinkLayout, SharingStrategy, HOST_GPUS_MAX,
};
use topoplace_online::scheduler::predicates::{NodeFacts, Resources, Taint, TaintEffect};

pub const PRODUCT_LABEL: &str = "nvidia.com/gpu.product";
pub const COUNT_LABEL: &str = "nvidia.com/gpu.count";
pub const MEMORY_LABEL: &str = "nvidia.com/gpu.memory";
pub const CLIQUE_LABEL: &str = "nvidia.com/gpu.clique";
pub const TOPOGRAPH_ACCELERATOR_LABEL: &str = "network.topology.nvidia.com/accelerator";
pub const NVLINK_GROUPS_ANNOTATION: &str = "topoplace.io/nvlink-groups";
/// GFD: shared replicas per GPU (time-slicing or MPS); the node's `nvidia.com/gpu` capacity
/// is count x replicas.
pub const REPLICAS_LABEL: &str = "nvidia.com/gpu.replicas";
/// GFD: `none`, `time-slicing` or `mps`.
pub const SHARING_STRATEGY_LABEL: &str = "nvidia.com/gpu.sharing-strategy";
/// GFD: `none`, `single` or `mixed`.
pub const MIG_STRATEGY_LABEL: &str = "nvidia.com/mig.strategy";
/// GFD's suffix to the product name of shared GPUs (the device plugin's `renameByDefault:
/// false`, the default).
pub const SHARED_SUFFIX: &str = product::SHARED_SUFFIX;
/// The device plugin's name for shared replicas under `renameByDefault: true`.
pub const SHARED_RESOURCE: &str = "nvidia.com/gpu.shared";

/// The default topology levels, outermost first: Topograph's network tiers under the zone.
/// Only keys that some node carries become levels.
pub const DEFAULT_LEVEL_KEYS: [&str; 4] = [
    "topology.kubernetes.io/zone",
    "network.topology.nvidia.com/core",
    "network.topology.nvidia.com/spine",
    "network.topology.nvidia.com/leaf",
];

/// Why a node is not in the view.
#[derive(Debug, Clone, PartialEq)]
pub struct SkippedNode {
    pub node: String,
    pub reason: String,
}

/// A GPU node as the view plans it, and what the translation assumed to get there (GPUs the
/// device plugin withdrew, a product missing from the table), for the caller to log.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuNode {
    /// Its GPUs offered as `nvidia.com/gpu`.
    pub spec: NodeSpec,
    /// `spec` is planned: false for a node of the mixed MIG strategy whose GPUs are all
    /// MIG-enabled (the device plugin offers no `nvidia.com/gpu`), or whose whole GPUs could
    /// not be read (a warning says why).
    pub whole_gpus: bool,
    /// Under the mixed MIG strategy, its MIG devices: one spec per profile, offered as
    /// `nvidia.com/mig-<profile>` ([`DevicePool::Mig`]).
    pub mig_pools: Vec<NodeSpec>,
    /// Pools of `mig_pools` the device plugin offers none of now: kept so their pods stay
    /// counted, planned on by nobody (the caller closes them).
    pub closed_pools: Vec<DevicePool>,
    pub warnings: Vec<String>,
    /// The device plugin offers none of its GPUs now (allocatable `nvidia.com/gpu` 0): the
    /// node stays in the view with its labelled GPUs, so the pods bound there stay counted,
    /// but nothing new is planned on it (the caller closes it, as a cordoned node).
    pub offers_none: bool,
}

impl GpuNode {
    /// The specs the view plans: the whole GPUs' (when planned) and each MIG pool's.
    pub fn specs(&self) -> Vec<NodeSpec> {
        let whole = self.whole_gpus.then(|| self.spec.clone());
        whole.into_iter().chain(self.mig_pools.iter().cloned()).collect()
    }
}

/// The cluster spec of the GPU nodes among `nodes`, and the GPU nodes left out with why.
pub fn cluster_spec(nodes: &[Node], level_keys: &[String]) -> (ClusterSpec, Vec<SkippedNode>) {
    let mut specs = Vec::new();
    let mut skipped = Vec::new();
    for node in nodes {
        match node_spec(node) {
            // A node offering no GPU is closed in the servers' view; a bare spec cannot say so.
            Ok(Some(gpu_node)) if gpu_node.offers_none => skipped.push(SkippedNode {
                node: node.metadata.name.clone().unwrap_or_default(),
                reason: "the device plugin offers none of its GPUs".into(),
            }),
            Ok(Some(gpu_node)) => specs.extend(gpu_node.specs()),
            Ok(None) => {}
            Err(reason) => skipped.push(SkippedNode { node: node.metadata.name.clone().unwrap_or_default(), reason }),
        }
    }
    let levels = level_keys.iter().filter(|key| specs.iter().any(|n| n.labels.contains_key(*key))).cloned().collect();
    (ClusterSpec { name: "kubernetes".into(), levels, nodes: specs }, skipped)
}

/// One node; `Ok(None)` when it has no GPUs; `Err` with the reason it is left out. Under
/// GFD's mixed MIG strategy (`nvidia.com/mig.strategy: mixed`) its MIG devices are planned per
/// profile beside its whole GPUs ([`GpuNode::mig_pools`]).
pub fn node_spec(node: &Node) -> Result<Option<GpuNode>, String> {
    let whole = whole_gpus(node);
    let mixed = node
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(MIG_STRATEGY_LABEL))
        .is_some_and(|s| s.trim().eq_ignore_ascii_case("mixed"));
    if !mixed {
        return whole;
    }
    let (pools, closed_pools, mut pool_warnings) = mig_pools(node);
    if pools.is_empty() {
        return whole.map(|gpu_node| {
            gpu_node.map(|mut g| {
                g.warnings.append(&mut pool_warnings);
                g
            })
        });
    }
    match whole {
        Ok(Some(mut gpu_node)) => {
            // The device plugin registers no resource it has no device for: without
            // `nvidia.com/gpu` in allocatable (or at 0) every GPU is MIG-enabled, and the node
            // is its MIG devices (MIG geometry changes only on GPUs without pods).
            let offers_whole = node
                .status
                .as_ref()
                .and_then(|s| s.allocatable.as_ref())
                .is_none_or(|a| a.contains_key(super::pod::GPU_RESOURCE));
            if gpu_node.offers_none || !offers_whole {
                gpu_node.offers_none = false;
                gpu_node.whole_gpus = false;
                gpu_node.warnings.retain(|w| !w.starts_with("the device plugin offers none"));
            }
            gpu_node.mig_pools = pools;
            gpu_node.closed_pools = closed_pools;
            gpu_node.warnings.append(&mut pool_warnings);
            Ok(Some(gpu_node))
        }
        // The whole GPUs' labels name nothing plannable; the MIG devices carry their own.
        Ok(None) | Err(_) => {
            let reason = match whole {
                Err(reason) => format!("its whole GPUs are left out: {reason}"),
                _ => "it has no whole GPUs".to_string(),
            };
            pool_warnings.insert(0, reason);
            // `spec` only describes the node here (`whole_gpus` false): it is never planned.
            let spec = NodeSpec { pool: DevicePool::Gpu, mig_profile: None, ..pools[0].clone() };
            Ok(Some(GpuNode {
                spec,
                whole_gpus: false,
                mig_pools: pools,
                closed_pools,
                warnings: pool_warnings,
                offers_none: false,
            }))
        }
    }
}

/// The MIG devices of a mixed-strategy node, one spec per profile, from GFD's per-profile
/// labels (`nvidia.com/mig-<profile>.count`, `.memory` in MiB, `.product`
/// `<model>-MIG-<profile>`, `.replicas`; `internal/lm/mig-strategy.go`, `resource.go`) and the
/// device plugin's allocatable `nvidia.com/mig-<profile>`, which wins over the count as for
/// whole GPUs; a profile that cannot be read is left out with a warning. A profile the plugin
/// offers none of now (allocatable 0) is kept at its count, closed (the second list), so the
/// pods bound to it stay counted. Profiles offered under `renameByDefault` (`.shared`) are
/// not read.
fn mig_pools(node: &Node) -> (Vec<NodeSpec>, Vec<DevicePool>, Vec<String>) {
    let name = node.metadata.name.clone().unwrap_or_default();
    let empty = BTreeMap::new();
    let labels = node.metadata.labels.as_ref().unwrap_or(&empty);
    let allocatable = node.status.as_ref().and_then(|s| s.allocatable.as_ref());
    let prefix = super::pod::MIG_RESOURCE_PREFIX;
    let mut profiles: std::collections::BTreeSet<&str> =
        labels.keys().filter_map(|key| key.strip_prefix(prefix)?.strip_suffix(".count")).collect();
    profiles.extend(allocatable.into_iter().flatten().filter_map(|(key, _)| key.strip_prefix(prefix)));
    profiles.retain(|profile| !profile.ends_with(super::pod::SHARED_RESOURCE_SUFFIX));
    let mut pools = Vec::new();
    let mut closed = Vec::new();
    let mut warnings = Vec::new();
    for profile in profiles {
        let label = |suffix: &str| labels.get(&format!("{prefix}{profile}.{suffix}")).map(|v| v.trim());
        let resource = format!("{prefix}{profile}");
        let mut pool = || -> Result<Option<NodeSpec>, String> {
            if !product::is_mig_profile(profile) {
                return Err("not a MIG profile name".into());
            }
            let counted = match label("count") {
                Some(text) => Some(
                    text.parse::<u64>()
                        .map_err(|_| format!("label {resource}.count `{text}` is not a whole number"))?,
                ),
                None => None,
            };
            let offered = match allocatable.and_then(|a| a.get(&resource)) {
                Some(q) => Some(
                    whole_gpus_of(&q.0)
                        .ok_or_else(|| format!("status.allocatable {resource} `{}` is not a whole number", q.0))?,
                ),
                None => None,
            };
            let count = match (counted, offered) {
                (Some(c), Some(0)) if c > 0 => {
                    warnings.push(format!(
                        "the device plugin offers none of its {c} MIG devices {profile} (status.allocatable {resource} \
                         is 0): closed, its bound pods still counted"
                    ));
                    closed.push(DevicePool::Mig(profile.to_string()));
                    c
                }
                (Some(c), Some(o)) if o < c => {
                    warnings.push(format!(
                        "{} of {c} MIG devices {profile} withdrawn by the device plugin: planned with the {o} of status.allocatable {resource}",
                        c - o
                    ));
                    o
                }
                (Some(c), _) => c,
                (None, Some(o)) => o,
                (None, None) => 0,
            };
            if count == 0 {
                return Ok(None);
            }
            if let Some(text) = label("replicas") {
                let replicas = text
                    .parse::<u64>()
                    .map_err(|_| format!("label {resource}.replicas `{text}` is not a whole number"))?;
                if replicas > 1 {
                    return Err("shared MIG devices are not planned".into());
                }
            }
            let memory = label("memory").ok_or_else(|| format!("label {resource}.memory is missing"))?;
            let memory = memory.parse::<u64>().map_err(|_| format!("label {resource}.memory `{memory}` is not MiB"))?;
            let parent_name = match label("product").and_then(product::split_mig) {
                Some((_, named)) if !named.eq_ignore_ascii_case(profile) => {
                    return Err(format!("label {resource}.product names profile `{named}`, not {profile}"));
                }
                Some((parent, _)) => parent.to_string(),
                None => labels.get(PRODUCT_LABEL).map(|p| p.trim().to_string()).ok_or_else(|| {
                    format!("no label {resource}.product or {PRODUCT_LABEL} names the GPUs they are cut from")
                })?,
            };
            let parent = product::lookup(&parent_name).filter(|p| !p.is_unknown() && p.get().parent.is_none()).ok_or_else(|| {
                format!("they are cut from `{parent_name}`, which is not a known GPU product: MIG devices are planned only for products of the table")
            })?;
            let devices = product::register_mig(parent, profile, memory).map_err(|e| e.to_string())?;
            let planned = if count > HOST_GPUS_MAX as u64 {
                warnings.push(format!("{count} MIG devices {profile}: planned with the first {HOST_GPUS_MAX}"));
                HOST_GPUS_MAX as u64
            } else {
                count
            };
            let spec = NodeSpec {
                name: name.clone(),
                labels: labels.clone(),
                product: devices,
                gpu_count: planned as u8,
                memory_mib: Some(memory),
                nvlink: None,
                clique: None,
                allocated: Vec::new(),
                mig_profile: Some(profile.to_string()),
                sharing: None,
                pool: DevicePool::Mig(profile.to_string()),
            };
            validate_node(&spec).map_err(|e| e.to_string())?;
            Ok(Some(spec))
        };
        match pool() {
            Ok(Some(spec)) => pools.push(spec),
            Ok(None) => {}
            Err(reason) => {
                closed.retain(|pool| pool.mig_profile() != Some(profile));
                warnings.push(format!("MIG devices {resource} left out: {reason}"));
            }
        }
    }
    (pools, closed, warnings)
}

/// The node's whole GPUs (`nvidia.com/gpu`), as [`node_spec`] describes.
fn whole_gpus(node: &Node) -> Result<Option<GpuNode>, String> {
    let name = node.metadata.name.clone().unwrap_or_default();
    let empty = BTreeMap::new();
    let labels = node.metadata.labels.as_ref().unwrap_or(&empty);
    let annotations = node.metadata.annotations.as_ref().unwrap_or(&empty);
    let allocatable = node
        .status
        .as_ref()
        .and_then(|s| s.allocatable.as_ref())
        .and_then(|a| a.get(super::pod::GPU_RESOURCE))
        .map(|q| q.0.clone());
    let allocatable = match allocatable {
        Some(text) => Some(whole_gpus_of(&text).ok_or_else(|| {
            format!("status.allocatable {} `{text}` is not a whole number of GPUs", super::pod::GPU_RESOURCE)
        })?),
        None => None,
    };
    let count = match labels.get(COUNT_LABEL) {
        Some(text) => {
            text.trim().parse::<u64>().map_err(|_| format!("label {COUNT_LABEL} `{text}` is not a whole number"))?
        }
        None => match allocatable {
            Some(count) => count,
            None => return Ok(None),
        },
    };
    if count == 0 {
        return Ok(None);
    }
    let Some(product_label) = labels.get(PRODUCT_LABEL) else {
        return Err(format!("has {count} GPUs but no {PRODUCT_LABEL} label"));
    };
    // GFD's single MIG strategy: `<product>-MIG-<profile>`, the count and memory labels are
    // the MIG devices'.
    let full_label = product_label.as_str();
    let (product_label, mig_profile) = match product::split_mig(product_label) {
        Some((parent, profile)) => (parent, Some(profile.to_string())),
        None => (product_label.as_str(), None),
    };
    let replicas = match labels.get(REPLICAS_LABEL) {
        Some(text) => text
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|&r| r >= 1)
            .ok_or_else(|| format!("label {REPLICAS_LABEL} `{text}` is not a whole number of at least 1"))?,
        None => 1,
    };
    let strategy_label = labels
        .get(SHARING_STRATEGY_LABEL)
        .map(|s| s.trim())
        .filter(|s| !s.is_empty() && !s.eq_ignore_ascii_case("none"));
    let product_name = product::strip_shared(product_label).unwrap_or(product_label);
    let suffixed = product::strip_shared(full_label).is_some() || product_name.len() != product_label.len();
    let offers_renamed = node
        .status
        .as_ref()
        .and_then(|s| s.allocatable.as_ref())
        .is_some_and(|a| a.contains_key(SHARED_RESOURCE) && !a.contains_key(super::pod::GPU_RESOURCE));
    let mut warnings = Vec::new();
    // Time-slicing or MPS: each GPU is offered as `replicas` devices, and so planned. One
    // replica per GPU is a whole GPU, whatever the labels call it.
    if replicas <= 1 && !offers_renamed && (strategy_label.is_some() || suffixed) {
        warnings.push(format!(
            "its GPUs are labelled shared ({SHARING_STRATEGY_LABEL} {}, product `{full_label}`) but {REPLICAS_LABEL} is \
             {replicas}: planned as whole GPUs",
            strategy_label.unwrap_or("unset")
        ));
    }
    let sharing = if replicas > 1 || offers_renamed {
        let shared =
            || format!("{SHARING_STRATEGY_LABEL} {}, {REPLICAS_LABEL} {replicas}", strategy_label.unwrap_or("unset"));
        if offers_renamed {
            return Err(format!(
                "its GPUs are shared ({}) and offered as {SHARED_RESOURCE} (the device plugin's renameByDefault), \
                 which this view does not plan: pods asking for it are left to kube-scheduler",
                shared()
            ));
        }
        if mig_profile.is_some() {
            return Err(format!("its MIG devices are shared ({}): shared MIG devices are not planned", shared()));
        }
        let replicas = u8::try_from(replicas).ok().filter(|&r| usize::from(r) <= HOST_GPUS_MAX).ok_or_else(|| {
            format!(
                "its GPUs are shared ({}): {REPLICAS_LABEL} must be 2 to {HOST_GPUS_MAX} for a shared GPU",
                shared()
            )
        })?;
        let strategy = match strategy_label {
            None => {
                let label = match labels.get(SHARING_STRATEGY_LABEL) {
                    Some(text) if !text.trim().is_empty() => format!("{SHARING_STRATEGY_LABEL} says `{}`", text.trim()),
                    _ => format!("no {SHARING_STRATEGY_LABEL} label (GFD before MPS support)"),
                };
                warnings.push(format!(
                    "{label}, but its GPUs are shared ({REPLICAS_LABEL} {replicas}, or a {SHARED_SUFFIX} product): \
                     taken as time-sliced"
                ));
                SharingStrategy::TimeSlicing
            }
            Some(text) => SharingStrategy::parse(text)
                .ok_or_else(|| format!("label {SHARING_STRATEGY_LABEL} `{text}` is not none, time-slicing or mps"))?,
        };
        Some(GpuSharing { strategy, replicas })
    } else {
        None
    };
    let per_gpu = sharing.map_or(1, |sharing| u64::from(sharing.replicas));
    // Without the count label the device plugin's offer is the count: replicas, when shared.
    let count = if labels.contains_key(COUNT_LABEL) { count } else { count / per_gpu };
    if count == 0 {
        return Err(format!(
            "status.allocatable {} is below one GPU's {per_gpu} replicas, and there is no {COUNT_LABEL} label",
            super::pod::GPU_RESOURCE
        ));
    }
    if count > HOST_GPUS_MAX as u64 {
        return Err(format!("{count} GPUs, more than the {HOST_GPUS_MAX} supported per node"));
    }
    let mut offers_none = false;
    // The device plugin offers what the kubelet will admit: fewer than the label counts means
    // GPUs it withdrew (unhealthy; or MIG-enabled under the mixed strategy). Which ones is not
    // published: the view keeps the lowest indices (pods recorded on others stay held,
    // `Book::held_on`). A shared GPU withdrawn takes all its replicas with it.
    let allocatable = allocatable.map(|offered| offered / per_gpu);
    let planned = match allocatable {
        Some(0) => {
            warnings.push(format!(
                "the device plugin offers none of its {count} GPUs (status.allocatable {} is 0): closed, its bound \
                 pods still counted",
                super::pod::GPU_RESOURCE
            ));
            offers_none = true;
            count
        }
        Some(offered) if offered < count => {
            let why = if labels.get(MIG_STRATEGY_LABEL).is_some_and(|s| s.trim() == "mixed") {
                "MIG-enabled (mixed strategy) or unhealthy"
            } else {
                "unhealthy"
            };
            let offer = if per_gpu > 1 { format!("{offered} GPUs' replicas") } else { format!("{offered}") };
            warnings.push(format!(
                "{} of {count} GPUs withdrawn by the device plugin ({why}): planned with the {offer} of \
                 status.allocatable {}",
                count - offered,
                super::pod::GPU_RESOURCE
            ));
            offered
        }
        _ => count,
    };
    // Each device is a bit in a host's GPU mask: a node of more replicas is planned with the
    // whole GPUs whose replicas fit.
    let planned = if planned * per_gpu > HOST_GPUS_MAX as u64 {
        let fit = HOST_GPUS_MAX as u64 / per_gpu;
        warnings.push(format!(
            "{} shared replicas ({planned} GPUs x {per_gpu}) are over the {HOST_GPUS_MAX} devices a node is planned \
             with: planned with {fit} GPUs' {} replicas",
            planned * per_gpu,
            fit * per_gpu
        ));
        fit
    } else {
        planned
    };
    let memory_mib = match labels.get(MEMORY_LABEL) {
        Some(text) => {
            Some(text.trim().parse::<u64>().map_err(|_| format!("label {MEMORY_LABEL} `{text}` is not MiB"))?)
        }
        None => None,
    };
    if mig_profile.is_some() && memory_mib.is_none() {
        return Err(format!("its GPUs are MIG devices ({PRODUCT_LABEL} `{full_label}`) but {MEMORY_LABEL} is missing"));
    }
    // A product the table lacks is planned from this node's own memory label, never from
    // another node's, so the view does not depend on the order nodes arrived in.
    let product = match (product::lookup(product_name), memory_mib) {
        (Some(product), _) if !product.is_unknown() => product,
        _ if mig_profile.is_some() => {
            return Err(format!(
                "its GPUs are MIG devices of `{product_name}`, which is not a known GPU product: MIG devices are \
                 planned only for products of the table"
            ))
        }
        (_, Some(memory)) => {
            let product = product::register_unknown(product_name, memory).map_err(|e| e.to_string())?;
            warnings.push(format!(
                "GPU product `{product_name}` is not in the product table: planned from {MEMORY_LABEL} ({memory} MiB) \
                 with no NVLink assumed"
            ));
            product
        }
        (_, None) => {
            return Err(format!(
                "label {PRODUCT_LABEL} `{product_name}` is not a known GPU product, and there is no {MEMORY_LABEL} \
                 label to plan it from"
            ))
        }
    };
    // MIG devices are a product of their own, per profile: a gang never mixes them with whole
    // GPUs, and capacity is answered per profile.
    let product = match (&mig_profile, memory_mib) {
        (Some(profile), Some(memory)) => product::register_mig(product, profile, memory).map_err(|e| e.to_string())?,
        _ => product,
    };
    // Shared replicas likewise, one product per GPU product.
    let product = match sharing {
        Some(_) => product::register_shared(product).map_err(|e| e.to_string())?,
        None => product,
    };
    let mut nvlink = match annotations.get(NVLINK_GROUPS_ANNOTATION) {
        Some(text) => Some(parse_groups(text).map_err(|e| format!("annotation {NVLINK_GROUPS_ANNOTATION}: {e}"))?),
        None => None,
    };
    let mut clique = labels.get(CLIQUE_LABEL).or_else(|| labels.get(TOPOGRAPH_ACCELERATOR_LABEL)).cloned();
    // Links the view cannot use are dropped with a warning rather than the whole node: the
    // NVLink of a product missing from the table (its bandwidth is unknown) or of MIG devices
    // (they have none), and groups naming GPUs the device plugin withdrew.
    let unlinked = if mig_profile.is_some() {
        Some("its GPUs are MIG devices")
    } else if sharing.is_some() {
        Some("its GPUs are shared replicas")
    } else if product.is_unknown() {
        Some("the product's NVLink bandwidth is not known")
    } else {
        None
    };
    if let Some(why) = unlinked {
        if nvlink.take().is_some() {
            warnings.push(format!("annotation {NVLINK_GROUPS_ANNOTATION} ignored: {why}"));
        }
        if let Some(clique) = clique.take() {
            warnings.push(format!("NVLink clique `{clique}` ignored: {why}"));
        }
    }
    if let (Some(NvlinkLayout::Groups(groups)), true) = (&mut nvlink, planned < count) {
        let before: usize = groups.iter().map(Vec::len).sum();
        for group in groups.iter_mut() {
            group.retain(|&gpu| u64::from(gpu) < planned);
        }
        groups.retain(|group| !group.is_empty());
        if groups.iter().map(Vec::len).sum::<usize>() < before {
            warnings.push(format!(
                "annotation {NVLINK_GROUPS_ANNOTATION}: GPUs from {planned} on left out with the withdrawn GPUs"
            ));
        }
    }
    let spec = NodeSpec {
        name,
        labels: labels.clone(),
        product,
        gpu_count: planned as u8,
        memory_mib,
        nvlink,
        clique,
        allocated: Vec::new(),
        mig_profile,
        sharing,
        pool: Default::default(),
    };
    validate_node(&spec).map_err(|e| e.to_string())?;
    Ok(Some(GpuNode { spec, whole_gpus: true, mig_pools: Vec::new(), closed_pools: Vec::new(), warnings, offers_none }))
}

/// A GPU count as the API server writes an extended resource quantity: a whole number
/// (`8`), possibly in quantity form (`8000m`); `None` for anything else.
fn whole_gpus_of(text: &str) -> Option<u64> {
    let milli = quantity::parse_milli(text).ok()?;
    (milli >= 0 && milli % 1000 == 0).then_some((milli / 1000) as u64)
}

/// `0,1,2,3;4,5,6,7`: NVLink groups, all-to-all inside each.
fn parse_groups(text: &str) -> Result<NvlinkLayout, String> {
    let groups = text
        .split(';')
        .map(|group| {
            group
                .split(',')
                .map(|g| g.trim().parse::<u8>().map_err(|_| format!("`{}` is not a GPU index", g.trim())))
                .collect::<Result<Vec<u8>, String>>()
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(NvlinkLayout::Groups(groups))
}

/// What the scheduler's predicates need of any node (GPU or not). An allocatable amount that
/// is not a quantity counts as 0 (with a warning): nothing is placed against it.
pub fn facts(node: &Node) -> NodeFacts {
    let name = node.metadata.name.clone().unwrap_or_default();
    let status = node.status.as_ref();
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|conditions| conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let spec = node.spec.as_ref();
    let taints = spec
        .and_then(|s| s.taints.as_ref())
        .map(|taints| {
            taints
                .iter()
                .filter_map(|t| {
                    Some(Taint {
                        key: t.key.clone(),
                        value: t.value.clone().unwrap_or_default(),
                        effect: TaintEffect::parse(&t.effect)?,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let mut allocatable = Resources::new();
    for (resource, amount) in status.and_then(|s| s.allocatable.as_ref()).into_iter().flatten() {
        match quantity::parse_milli(&amount.0) {
            Ok(milli) => {
                allocatable.insert(resource.clone(), milli);
            }
            Err(error) => tracing::warn!(node = %name, %resource, %error, "allocatable amount left out"),
        }
    }
    NodeFacts {
        name,
        labels: node.metadata.labels.clone().unwrap_or_default(),
        ready,
        unschedulable: spec.and_then(|s| s.unschedulable).unwrap_or(false),
        taints,
        allocatable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use topoplace_engine::topology::{Cluster, Fabric};

    /// A node as the API server returns it: GFD-style labels and an allocatable GPU count.
    fn gpu_node(labels: &[(&str, &str)], allocatable: Option<&str>) -> Node {
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        let allocatable = allocatable.map(|count| serde_json::json!({ "cpu": "64", "nvidia.com/gpu": count }));
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": "gpu-1", "labels": labels },
            "status": { "allocatable": allocatable },
        }))
        .expect("a Node")
    }

    fn planned(node: &Node) -> GpuNode {
        node_spec(node).expect("understood").expect("a GPU node")
    }

    const H100: (&str, &str) = (PRODUCT_LABEL, "NVIDIA-H100-80GB-HBM3");

    #[test]
    fn gpus_the_device_plugin_withdrew_are_not_planned() {
        let node = planned(&gpu_node(&[H100, (COUNT_LABEL, "8")], Some("7")));
        assert_eq!(node.spec.gpu_count, 7, "the allocatable count wins over the label");
        assert!(
            node.warnings[0].starts_with("1 of 8 GPUs withdrawn by the device plugin (unhealthy)"),
            "{:?}",
            node.warnings
        );
        // Under the mixed MIG strategy, MIG-enabled GPUs leave nvidia.com/gpu too.
        let mixed = planned(&gpu_node(&[H100, (COUNT_LABEL, "8"), (MIG_STRATEGY_LABEL, "mixed")], Some("6")));
        assert_eq!(mixed.spec.gpu_count, 6);
        assert!(mixed.warnings[0].contains("MIG-enabled (mixed strategy) or unhealthy"), "{:?}", mixed.warnings);
        // Healthy, or no device plugin status yet: the label's count, no warning.
        for allocatable in [Some("8"), Some("8000m"), None] {
            let node = planned(&gpu_node(&[H100, (COUNT_LABEL, "8")], allocatable));
            assert_eq!((node.spec.gpu_count, node.warnings.len()), (8, 0), "{allocatable:?}");
        }
        // None offered: kept closed with its labelled GPUs, so pods bound there stay counted.
        let none = planned(&gpu_node(&[H100, (COUNT_LABEL, "8")], Some("0")));
        assert!(none.offers_none && none.spec.gpu_count == 8, "{none:?}");
        assert!(none.warnings[0].contains("offers none of its 8 GPUs"), "{:?}", none.warnings);
        let error = node_spec(&gpu_node(&[H100, (COUNT_LABEL, "8")], Some("7.5"))).expect_err("not whole");
        assert!(error.contains("status.allocatable nvidia.com/gpu `7.5` is not a whole number of GPUs"), "{error}");
    }

    #[test]
    fn a_mesh_host_with_a_gpu_withdrawn_keeps_the_links_among_the_rest() {
        let node = planned(&gpu_node(&[(PRODUCT_LABEL, "Tesla-V100-SXM2-16GB"), (COUNT_LABEL, "8")], Some("7")));
        let cluster = Cluster::build(ClusterSpec { name: "t".into(), levels: Vec::new(), nodes: vec![node.spec] })
            .expect("a 7-GPU mesh builds");
        let links = &cluster.hosts[0].links;
        assert_eq!(links.nvlink_neighbors.len(), 7);
        assert_eq!(links.nvlink_neighbors[0], 0b0001_1110, "GPU 0 keeps its quad and GPU 4");
        assert_eq!(links.nvlink_neighbors[3], 0b0000_0111, "GPU 7 is gone");
    }

    #[test]
    fn a_product_missing_from_the_table_is_planned_from_its_memory_label() {
        let labels = [(PRODUCT_LABEL, "NVIDIA-RTX-PRO-6000-Test-Edition"), (COUNT_LABEL, "4"), (MEMORY_LABEL, "97887")];
        let node = planned(&gpu_node(&labels, Some("4")));
        let product = node.spec.product;
        assert!(product.is_unknown());
        assert_eq!((product.get().name, product.get().fabric), ("NVIDIA-RTX-PRO-6000-Test-Edition", Fabric::Unknown));
        assert_eq!((node.spec.gpu_count, node.spec.memory_mib), (4, Some(97_887)));
        assert!(
            node.warnings[0].contains("not in the product table") && node.warnings[0].contains("no NVLink assumed")
        );
        let cluster = Cluster::build(ClusterSpec { name: "t".into(), levels: Vec::new(), nodes: vec![node.spec] })
            .expect("builds");
        assert_eq!(cluster.hosts[0].links.best_nvlink_gbps, 0);
        assert_eq!(cluster.hosts[0].memory_mib, 97_887);
        let error = node_spec(&gpu_node(&labels[..2], Some("4"))).expect_err("no memory to plan from");
        assert!(error.contains("is not a known GPU product, and there is no nvidia.com/gpu.memory label"), "{error}");
    }

    #[test]
    fn groups_naming_withdrawn_gpus_and_links_the_view_cannot_use_are_dropped_not_the_node() {
        let mut node = gpu_node(&[(PRODUCT_LABEL, "NVIDIA-A100-PCIE-40GB"), (COUNT_LABEL, "4")], Some("3"));
        node.metadata.annotations = Some([(NVLINK_GROUPS_ANNOTATION.to_string(), "0,1;2,3".to_string())].into());
        let grouped = planned(&node);
        assert_eq!(grouped.spec.nvlink, Some(NvlinkLayout::Groups(vec![vec![0, 1], vec![2]])));
        assert!(grouped.warnings.iter().any(|w| w.contains("GPUs from 3 on left out")), "{:?}", grouped.warnings);
        // A product missing from the table in an NVLink clique (a rack-scale system newer than
        // the table): planned without the clique, whose bandwidth is not known.
        let labels = [
            (PRODUCT_LABEL, "NVIDIA-GB300-Clique-Test"),
            (COUNT_LABEL, "4"),
            (MEMORY_LABEL, "284208"),
            (CLIQUE_LABEL, "uuid.1"),
        ];
        let rack = planned(&gpu_node(&labels, Some("4")));
        assert_eq!(rack.spec.clique, None);
        assert!(rack.warnings.iter().any(|w| w.contains("NVLink clique `uuid.1` ignored")), "{:?}", rack.warnings);
    }

    /// GFD's mixed strategy: whole GPUs stay `nvidia.com/gpu`, each profile's MIG devices are
    /// a pool of their own, counted by what the device plugin offers; a node whose GPUs are all
    /// MIG-enabled is its MIG devices, not closed; a profile that cannot be read is left out
    /// with a warning, the rest planned.
    #[test]
    fn a_mixed_strategy_node_is_its_whole_gpus_and_a_pool_per_profile() {
        let labels = [
            (PRODUCT_LABEL, "NVIDIA-A100-SXM4-80GB"),
            (COUNT_LABEL, "4"),
            (MIG_STRATEGY_LABEL, "mixed"),
            ("nvidia.com/mig-1g.10gb.count", "7"),
            ("nvidia.com/mig-1g.10gb.memory", "9856"),
            ("nvidia.com/mig-1g.10gb.product", "NVIDIA-A100-SXM4-80GB-MIG-1g.10gb"),
            ("nvidia.com/mig-3g.40gb.count", "2"),
            ("nvidia.com/mig-3g.40gb.memory", "40192"),
        ];
        let mut node = gpu_node(&labels, Some("2"));
        let allocatable = node.status.as_mut().and_then(|s| s.allocatable.as_mut()).expect("allocatable");
        let quantity = |q: &str| k8s_openapi::apimachinery::pkg::api::resource::Quantity(q.into());
        allocatable.insert("nvidia.com/mig-1g.10gb".into(), quantity("6"));
        allocatable.insert("nvidia.com/mig-3g.40gb".into(), quantity("2"));
        let viewed = planned(&node);
        assert!(viewed.whole_gpus && !viewed.offers_none);
        let specs = viewed.specs();
        let shapes: Vec<(DevicePool, &str, u8, Option<u64>)> =
            specs.iter().map(|s| (s.pool.clone(), s.product.get().name, s.gpu_count, s.memory_mib)).collect();
        assert_eq!(
            shapes,
            [
                (DevicePool::Gpu, "A100-SXM4-80GB", 2, None),
                (DevicePool::Mig("1g.10gb".into()), "A100-SXM4-80GB-MIG-1g.10gb", 6, Some(9856)),
                (DevicePool::Mig("3g.40gb".into()), "A100-SXM4-80GB-MIG-3g.40gb", 2, Some(40192)),
            ]
        );
        assert!(
            viewed.warnings.iter().any(|w| w.contains("1 of 7 MIG devices 1g.10gb withdrawn")),
            "{:?}",
            viewed.warnings
        );
        let (spec, skipped) = cluster_spec(std::slice::from_ref(&node), &[]);
        assert_eq!((spec.nodes.len(), skipped.len()), (3, 0));
        let cluster = topoplace_engine::topology::Cluster::build(spec).expect("builds");
        let pool = DevicePool::Mig("3g.40gb".into());
        assert_eq!(cluster.host_in("gpu-1", &pool).map(|h| cluster.host(h).gpu_count), Some(2));
        assert_eq!(cluster.host_id("gpu-1").map(|h| cluster.host(h).gpu_count), Some(2), "the whole GPUs");
        assert_eq!(cluster.hosts_of("gpu-1").count(), 3);
        // Every GPU MIG-enabled: no nvidia.com/gpu offered (at 0, or not registered at all,
        // as the device plugin does for a resource of no device), and the node is its MIG
        // devices.
        let all_mig = planned(&gpu_node(&labels, Some("0")));
        assert!(!all_mig.offers_none && !all_mig.whole_gpus, "{:?}", all_mig.warnings);
        assert_eq!(all_mig.specs().len(), 2);
        let mut unregistered = node.clone();
        let allocatable = unregistered.status.as_mut().and_then(|s| s.allocatable.as_mut()).expect("allocatable");
        allocatable.remove("nvidia.com/gpu");
        let unregistered = planned(&unregistered);
        assert!(!unregistered.whole_gpus, "no whole GPU is offered");
        assert_eq!(unregistered.specs().len(), 2);
        // A profile offered at 0 now (a device-plugin restart) is kept at its count, closed, so
        // the pods bound to it stay counted.
        let mut restarting = node.clone();
        let allocatable = restarting.status.as_mut().and_then(|s| s.allocatable.as_mut()).expect("allocatable");
        allocatable.insert("nvidia.com/mig-3g.40gb".into(), quantity("0"));
        let restarting = planned(&restarting);
        assert_eq!(restarting.specs().len(), 3);
        assert_eq!(restarting.closed_pools, [DevicePool::Mig("3g.40gb".into())]);
        // Renamed shared resources are not read as profiles.
        let mut renamed = node.clone();
        let allocatable = renamed.status.as_mut().and_then(|s| s.allocatable.as_mut()).expect("allocatable");
        allocatable.insert("nvidia.com/mig-1g.10gb.shared".into(), quantity("14"));
        assert_eq!(planned(&renamed).specs().len(), 3);
        // A profile without its memory label is left out, named; the rest planned.
        let no_memory: Vec<(&str, &str)> =
            labels.iter().copied().filter(|(k, _)| *k != "nvidia.com/mig-3g.40gb.memory").collect();
        let partial = planned(&gpu_node(&no_memory, Some("2")));
        assert_eq!(partial.specs().len(), 2);
        assert!(
            partial
                .warnings
                .iter()
                .any(|w| w.contains("nvidia.com/mig-3g.40gb left out") && w.contains(".memory is missing")),
            "{:?}",
            partial.warnings
        );
    }

    #[test]
    fn mig_devices_are_the_gpus_of_a_single_strategy_node() {
        let single = [(PRODUCT_LABEL, "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb"), (COUNT_LABEL, "56"), (MEMORY_LABEL, "4864")];
        let node = planned(&gpu_node(&single, Some("56")));
        assert_eq!(node.spec.mig_profile.as_deref(), Some("1g.5gb"));
        assert_eq!((node.spec.product.get().name, node.spec.gpu_count), ("A100-SXM4-40GB-MIG-1g.5gb", 56));
        assert_eq!(node.spec.product.mig_parent().map(|p| p.get().name), Some("A100-SXM4-40GB"));
        assert_eq!(node.spec.memory_mib, Some(4864), "one device's memory");
        let error = node_spec(&gpu_node(&single[..2], Some("56"))).expect_err("no memory");
        assert!(error.contains("MIG devices") && error.contains("nvidia.com/gpu.memory is missing"), "{error}");
        let unknown = [(PRODUCT_LABEL, "NVIDIA-Test-Parent-MIG-1g.10gb"), (COUNT_LABEL, "7"), (MEMORY_LABEL, "9856")];
        let error = node_spec(&gpu_node(&unknown, Some("7"))).expect_err("unknown parent");
        assert!(error.contains("not a known GPU product"), "{error}");
    }

    #[test]
    fn shared_gpus_are_planned_as_their_replicas() {
        // The device plugin's default (renameByDefault: false): GFD suffixes the product, and
        // nvidia.com/gpu counts replicas.
        let suffixed = [
            (PRODUCT_LABEL, "Tesla-T4-SHARED"),
            (COUNT_LABEL, "4"),
            (REPLICAS_LABEL, "4"),
            (SHARING_STRATEGY_LABEL, "time-slicing"),
        ];
        let node = planned(&gpu_node(&suffixed, Some("16")));
        assert_eq!(node.spec.sharing, Some(GpuSharing { strategy: SharingStrategy::TimeSlicing, replicas: 4 }));
        assert_eq!((node.spec.product.get().name, node.spec.gpu_count, node.spec.devices()), ("T4-SHARED", 4, 16));
        assert_eq!(node.spec.product.shared_parent().map(|p| p.get().name), Some("T4"));
        assert!(node.warnings.is_empty(), "{:?}", node.warnings);
        let cluster = Cluster::build(cluster_spec(&[gpu_node(&suffixed, Some("16"))], &[]).0).expect("a cluster");
        let host = &cluster.hosts[0];
        assert_eq!((host.gpu_count, host.memory_mib), (16, 15360 / 4), "a replica has a quarter of a T4's memory");
        assert_eq!(host.links.largest_nvlink_group, 1);
        // MPS, and an older GFD with no strategy label (time-slicing, with a warning).
        let mps = [H100, (COUNT_LABEL, "8"), (REPLICAS_LABEL, "2"), (SHARING_STRATEGY_LABEL, "mps")];
        let node = planned(&gpu_node(&mps, Some("16")));
        assert_eq!(node.spec.sharing.map(|s| (s.strategy, s.replicas)), Some((SharingStrategy::Mps, 2)));
        let unlabelled = [(PRODUCT_LABEL, "NVIDIA-H100-80GB-HBM3-SHARED"), (COUNT_LABEL, "1"), (REPLICAS_LABEL, "4")];
        let node = planned(&gpu_node(&unlabelled, Some("4")));
        assert_eq!(node.spec.sharing.map(|s| s.strategy), Some(SharingStrategy::TimeSlicing));
        assert!(node.warnings[0].contains("taken as time-sliced"), "{:?}", node.warnings);
        // A GPU the device plugin withdrew takes its replicas with it; no count label: the
        // offer is replicas.
        let node = planned(&gpu_node(&suffixed, Some("12")));
        assert_eq!(node.spec.gpu_count, 3);
        assert!(node.warnings[0].starts_with("1 of 4 GPUs withdrawn"), "{:?}", node.warnings);
        let node = planned(&gpu_node(&[suffixed[0], suffixed[2], suffixed[3]], Some("16")));
        assert_eq!((node.spec.gpu_count, node.spec.devices()), (4, 16));
        // The device plugin README's example, 8 GPUs x 10 replicas: 80 devices, planned as the
        // 60 of 6 GPUs (a host's devices are one 64-bit mask).
        let ten = [H100, (COUNT_LABEL, "8"), (REPLICAS_LABEL, "10"), (SHARING_STRATEGY_LABEL, "time-slicing")];
        let node = planned(&gpu_node(&ten, Some("80")));
        assert_eq!((node.spec.gpu_count, node.spec.devices()), (6, 60));
        assert!(node.warnings[0].contains("80 shared replicas"), "{:?}", node.warnings);
        // Left out, with the reason.
        let error =
            node_spec(&gpu_node(&[H100, (COUNT_LABEL, "8"), (REPLICAS_LABEL, "0")], Some("8"))).expect_err("bad");
        assert!(error.contains("label nvidia.com/gpu.replicas `0`"), "{error}");
        let odd = [H100, (COUNT_LABEL, "8"), (REPLICAS_LABEL, "4"), (SHARING_STRATEGY_LABEL, "vgpu")];
        let error = node_spec(&gpu_node(&odd, Some("32"))).expect_err("unknown strategy");
        assert!(error.contains("`vgpu` is not none, time-slicing or mps"), "{error}");
        let mig =
            [(PRODUCT_LABEL, "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb-SHARED"), (COUNT_LABEL, "7"), (REPLICAS_LABEL, "2")];
        let error = node_spec(&gpu_node(&[mig[0], mig[1], mig[2], (MEMORY_LABEL, "4864")], Some("14")))
            .expect_err("shared MIG");
        assert!(error.contains("shared MIG devices are not planned"), "{error}");
        let renamed: Node = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "t4", "labels": { PRODUCT_LABEL: "Tesla-T4", COUNT_LABEL: "4", REPLICAS_LABEL: "4" } },
            "status": { "allocatable": { SHARED_RESOURCE: "16" } },
        }))
        .expect("a Node");
        let error = node_spec(&renamed).expect_err("renamed");
        assert!(error.contains("offered as nvidia.com/gpu.shared"), "{error}");
        // Labelled shared but one replica per GPU: whole GPUs, with a warning.
        let one = [(PRODUCT_LABEL, "NVIDIA-H100-80GB-HBM3-SHARED"), (COUNT_LABEL, "8"), (REPLICAS_LABEL, "1")];
        let node = planned(&gpu_node(&one, Some("8")));
        assert_eq!((node.spec.gpu_count, node.spec.sharing, node.spec.product.get().name), (8, None, "H100-SXM5"));
        assert!(node.warnings[0].contains("planned as whole GPUs"), "{:?}", node.warnings);
        // Sharing switched off says so, and is planned whole.
        let unshared = [H100, (COUNT_LABEL, "8"), (REPLICAS_LABEL, "1"), (SHARING_STRATEGY_LABEL, "none")];
        let node = planned(&gpu_node(&unshared, Some("8")));
        assert_eq!((node.spec.gpu_count, node.spec.sharing), (8, None));
    }
}
