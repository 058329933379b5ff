//! Kubernetes Nodes into the topology model: GPU product, count, memory and clique from the
//! GPU Feature Discovery labels, topology levels from configured label keys, NVLink overrides
//! from `topoplace.io/nvlink-groups`. Nodes without GPUs are not part of the view; a GPU node
//! whose labels cannot be understood is left out with a reason the caller logs.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Node;

use topoplace_engine::quantity;
use topoplace_engine::topology::{product, validate_node, ClusterSpec, NodeSpec, NvlinkLayout, HOST_GPUS_MAX};
use topoplace_online::scheduler::predicates::{NodeFacts, Resources, Taint, TaintEffect};

pub const PRODUCT_LABEL: &str = "nvidia.com/gpu.product";
pub const COUNT_LABEL: &str = "nvidia.com/gpu.count";
pub const MEMORY_LABEL: &str = "nvidia.com/gpu.memory";
pub const CLIQUE_LABEL: &str = "nvidia.com/gpu.clique";
pub const TOPOGRAPH_ACCELERATOR_LABEL: &str = "network.topology.nvidia.com/accelerator";
pub const NVLINK_GROUPS_ANNOTATION: &str = "topoplace.io/nvlink-groups";

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

/// The cluster spec of the GPU nodes among `nodes`, and the GPU nodes left out with why.
pub fn cluster_spec(nodes: &[Node], level_keys: &[String]) -> (ClusterSpec, Vec<SkippedNode>) {
    let mut specs = Vec::new();
    let mut skipped = Vec::new();
    for node in nodes {
        match node_spec(node) {
            Ok(Some(spec)) => specs.push(spec),
            Ok(None) => {}
            Err(reason) => skipped.push(SkippedNode { node: node.metadata.name.clone().unwrap_or_default(), reason }),
        }
    }
    let levels = level_keys.iter().filter(|key| specs.iter().any(|n| n.labels.contains_key(*key))).cloned().collect();
    (ClusterSpec { name: "kubernetes".into(), levels, nodes: specs }, skipped)
}

/// One node; `Ok(None)` when it has no GPUs.
pub fn node_spec(node: &Node) -> Result<Option<NodeSpec>, String> {
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
    let count_text = labels.get(COUNT_LABEL).cloned().or(allocatable);
    let Some(count_text) = count_text else { return Ok(None) };
    let count: usize =
        count_text.trim().parse().map_err(|_| format!("label {COUNT_LABEL} `{count_text}` is not a whole number"))?;
    if count == 0 {
        return Ok(None);
    }
    if count > HOST_GPUS_MAX {
        return Err(format!("{count} GPUs, more than the {HOST_GPUS_MAX} supported per node"));
    }
    let Some(product_name) = labels.get(PRODUCT_LABEL) else {
        return Err(format!("has {count} GPUs but no {PRODUCT_LABEL} label"));
    };
    let Some(product) = product::lookup(product_name) else {
        return Err(format!("label {PRODUCT_LABEL} `{product_name}` is not a known GPU product"));
    };
    let memory_mib = match labels.get(MEMORY_LABEL) {
        Some(text) => {
            Some(text.trim().parse::<u64>().map_err(|_| format!("label {MEMORY_LABEL} `{text}` is not MiB"))?)
        }
        None => None,
    };
    let nvlink = match annotations.get(NVLINK_GROUPS_ANNOTATION) {
        Some(text) => Some(parse_groups(text).map_err(|e| format!("annotation {NVLINK_GROUPS_ANNOTATION}: {e}"))?),
        None => None,
    };
    let clique = labels.get(CLIQUE_LABEL).or_else(|| labels.get(TOPOGRAPH_ACCELERATOR_LABEL)).cloned();
    let spec = NodeSpec {
        name,
        labels: labels.clone(),
        product,
        gpu_count: count as u8,
        memory_mib,
        nvlink,
        clique,
        allocated: Vec::new(),
    };
    validate_node(&spec).map_err(|e| e.to_string())?;
    Ok(Some(spec))
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
