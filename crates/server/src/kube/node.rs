//! Kubernetes Nodes into the topology model: GPU product, count, memory and clique from the
//! GPU Feature Discovery labels, topology levels from configured label keys, NVLink overrides
//! from `topoplace.io/nvlink-groups`. Nodes without GPUs are not part of the view; a GPU node
//! whose labels cannot be understood is left out with a reason the caller logs.
//!
//! What the device plugin offers wins over what the labels count: a node whose allocatable
//! `nvidia.com/gpu` is below its `nvidia.com/gpu.count` has GPUs the plugin withdrew
//! (unhealthy, or MIG-enabled under the mixed strategy) and is planned with the allocatable
//! count. A product missing from the table is planned from `nvidia.com/gpu.memory` with no
//! NVLink assumed. Nodes whose GPUs are MIG slices (single strategy) or shared (time-slicing,
//! MPS) are left out with that reason: this view plans whole GPUs only. Label names and their
//! meaning are GPU Feature Discovery's (`internal/lm/resource.go`, `mig-strategy.go`) and the
//! GPU Operator's GPU-sharing documentation.

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
/// GFD: shared replicas per GPU (time-slicing or MPS); the node's `nvidia.com/gpu` capacity
/// is count x replicas.
pub const REPLICAS_LABEL: &str = "nvidia.com/gpu.replicas";
/// GFD: `none`, `time-slicing` or `mps`.
pub const SHARING_STRATEGY_LABEL: &str = "nvidia.com/gpu.sharing-strategy";
/// GFD: `none`, `single` or `mixed`.
pub const MIG_STRATEGY_LABEL: &str = "nvidia.com/mig.strategy";
/// GFD's suffix to the product name of shared GPUs (the device plugin's `renameByDefault:
/// false`, the default).
pub const SHARED_SUFFIX: &str = "-SHARED";
/// GFD's infix under the single MIG strategy: `<product>-MIG-<profile>`, with the count and
/// memory labels then counting MIG devices.
pub const MIG_PRODUCT_INFIX: &str = "-MIG-";

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
    pub spec: NodeSpec,
    pub warnings: Vec<String>,
}

/// The cluster spec of the GPU nodes among `nodes`, and the GPU nodes left out with why.
pub fn cluster_spec(nodes: &[Node], level_keys: &[String]) -> (ClusterSpec, Vec<SkippedNode>) {
    let mut specs = Vec::new();
    let mut skipped = Vec::new();
    for node in nodes {
        match node_spec(node) {
            Ok(Some(gpu_node)) => specs.push(gpu_node.spec),
            Ok(None) => {}
            Err(reason) => skipped.push(SkippedNode { node: node.metadata.name.clone().unwrap_or_default(), reason }),
        }
    }
    let levels = level_keys.iter().filter(|key| specs.iter().any(|n| n.labels.contains_key(*key))).cloned().collect();
    (ClusterSpec { name: "kubernetes".into(), levels, nodes: specs }, skipped)
}

/// One node; `Ok(None)` when it has no GPUs; `Err` with the reason it is left out.
pub fn node_spec(node: &Node) -> Result<Option<GpuNode>, String> {
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
        Some(text) => Some(whole_gpus(&text).ok_or_else(|| {
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
    if count > HOST_GPUS_MAX as u64 {
        return Err(format!("{count} GPUs, more than the {HOST_GPUS_MAX} supported per node"));
    }
    let Some(product_label) = labels.get(PRODUCT_LABEL) else {
        return Err(format!("has {count} GPUs but no {PRODUCT_LABEL} label"));
    };
    if contains_ignoring_case(product_label, MIG_PRODUCT_INFIX) {
        return Err(format!(
            "its GPUs are MIG slices ({PRODUCT_LABEL} `{product_label}`, {MIG_STRATEGY_LABEL} single): \
             this view plans whole GPUs only"
        ));
    }
    let replicas = match labels.get(REPLICAS_LABEL) {
        Some(text) => text
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|&r| r >= 1)
            .ok_or_else(|| format!("label {REPLICAS_LABEL} `{text}` is not a whole number of at least 1"))?,
        None => 1,
    };
    let sharing = labels.get(SHARING_STRATEGY_LABEL).map(|s| s.trim()).filter(|s| !s.is_empty() && *s != "none");
    let product_name = strip_suffix_ignoring_case(product_label, SHARED_SUFFIX);
    if replicas > 1 || sharing.is_some() || product_name.len() != product_label.len() {
        return Err(format!(
            "its GPUs are shared ({SHARING_STRATEGY_LABEL} {}, {REPLICAS_LABEL} {replicas}): this view plans whole \
             GPUs only",
            sharing.unwrap_or("unset")
        ));
    }
    let mut warnings = Vec::new();
    // The device plugin offers what the kubelet will admit: fewer than the label counts means
    // GPUs it withdrew (unhealthy; or MIG-enabled under the mixed strategy).
    let planned = match allocatable {
        Some(offered) if offered < count => {
            if offered == 0 {
                return Err(format!(
                    "all {count} GPUs are withdrawn: status.allocatable {} is 0",
                    super::pod::GPU_RESOURCE
                ));
            }
            let why = if labels.get(MIG_STRATEGY_LABEL).is_some_and(|s| s.trim() == "mixed") {
                "MIG-enabled (mixed strategy) or unhealthy"
            } else {
                "unhealthy"
            };
            warnings.push(format!(
                "{} of {count} GPUs withdrawn by the device plugin ({why}): planned with the {offered} of \
                 status.allocatable {}",
                count - offered,
                super::pod::GPU_RESOURCE
            ));
            offered
        }
        _ => count,
    };
    let memory_mib = match labels.get(MEMORY_LABEL) {
        Some(text) => {
            Some(text.trim().parse::<u64>().map_err(|_| format!("label {MEMORY_LABEL} `{text}` is not MiB"))?)
        }
        None => None,
    };
    // A product the table lacks is planned from this node's own memory label, never from
    // another node's, so the view does not depend on the order nodes arrived in.
    let product = match (product::lookup(product_name), memory_mib) {
        (Some(product), _) if !product.is_unknown() => product,
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
    let nvlink = match annotations.get(NVLINK_GROUPS_ANNOTATION) {
        Some(text) => Some(parse_groups(text).map_err(|e| format!("annotation {NVLINK_GROUPS_ANNOTATION}: {e}"))?),
        None => None,
    };
    let clique = labels.get(CLIQUE_LABEL).or_else(|| labels.get(TOPOGRAPH_ACCELERATOR_LABEL)).cloned();
    let spec = NodeSpec {
        name,
        labels: labels.clone(),
        product,
        gpu_count: planned as u8,
        memory_mib,
        nvlink,
        clique,
        allocated: Vec::new(),
    };
    validate_node(&spec).map_err(|e| e.to_string())?;
    Ok(Some(GpuNode { spec, warnings }))
}

/// A GPU count as the API server writes an extended resource quantity: a whole number
/// (`8`), possibly in quantity form (`8000m`); `None` for anything else.
fn whole_gpus(text: &str) -> Option<u64> {
    let milli = quantity::parse_milli(text).ok()?;
    (milli >= 0 && milli % 1000 == 0).then_some((milli / 1000) as u64)
}

fn contains_ignoring_case(text: &str, part: &str) -> bool {
    text.to_ascii_uppercase().contains(&part.to_ascii_uppercase())
}

/// `text` without the suffix `suffix` (compared ignoring ASCII case).
fn strip_suffix_ignoring_case<'t>(text: &'t str, suffix: &str) -> &'t str {
    let cut = text.len().saturating_sub(suffix.len());
    match text.get(cut..) {
        Some(tail) if tail.eq_ignore_ascii_case(suffix) => &text[..cut],
        _ => text,
    }
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
        let error = node_spec(&gpu_node(&[H100, (COUNT_LABEL, "8")], Some("0"))).expect_err("nothing to plan");
        assert!(error.contains("all 8 GPUs are withdrawn"), "{error}");
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
    fn mig_slices_and_shared_gpus_are_left_out_with_the_reason() {
        let single = [(PRODUCT_LABEL, "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb"), (COUNT_LABEL, "56"), (MEMORY_LABEL, "4864")];
        let error = node_spec(&gpu_node(&single, Some("56"))).expect_err("MIG");
        assert!(error.contains("MIG slices"), "{error}");
        let renamed = [(PRODUCT_LABEL, "Tesla-T4-SHARED"), (COUNT_LABEL, "4"), (REPLICAS_LABEL, "4")];
        let error = node_spec(&gpu_node(&renamed, Some("16"))).expect_err("shared");
        assert!(error.contains("shared") && error.contains("nvidia.com/gpu.replicas 4"), "{error}");
        let time_sliced = [H100, (COUNT_LABEL, "1"), (REPLICAS_LABEL, "4"), (SHARING_STRATEGY_LABEL, "time-slicing")];
        let error = node_spec(&gpu_node(&time_sliced, Some("4"))).expect_err("shared");
        assert!(error.contains("time-slicing"), "{error}");
        let error =
            node_spec(&gpu_node(&[H100, (COUNT_LABEL, "8"), (REPLICAS_LABEL, "0")], Some("8"))).expect_err("bad");
        assert!(error.contains("label nvidia.com/gpu.replicas `0`"), "{error}");
        // Sharing switched off says so, and is planned.
        let unshared = [H100, (COUNT_LABEL, "8"), (REPLICAS_LABEL, "1"), (SHARING_STRATEGY_LABEL, "none")];
        assert_eq!(planned(&gpu_node(&unshared, Some("8"))).spec.gpu_count, 8);
    }
}
