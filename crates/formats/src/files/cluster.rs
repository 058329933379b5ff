//! `kind: Cluster`: nodes one by one (`spec.nodes`) or many alike (`spec.nodeGroups`,
//! named by an explicit `names` list or by `namePattern` with `{index}` and a `count`).

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

use super::{check_header, line_of_list_entry, line_of_name, lines_naming, FileError, Metadata, API_VERSION};
use topoplace_engine::topology::{
    product, ClusterSpec, DevicePool, GpuSharing, NodeSpec, NvlinkLayout, ProductId, SharingStrategy, TopologyError,
    HOST_GPUS_MAX,
};

/// Nodes one group may generate.
pub const GROUP_NODES_MAX: u32 = 100_000;

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClusterFile {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: Metadata,
    pub spec: ClusterFileSpec,
}

#[derive(Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClusterFileSpec {
    #[serde(default)]
    pub levels: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeEntry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_groups: Vec<NodeGroupEntry>,
}

#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NodeEntry {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    pub gpu: GpuEntry,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allocated: Vec<u8>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mig_devices: Vec<MigDevicesEntry>,
}

/// MIG devices of one profile under GFD's mixed MIG strategy, offered as
/// `nvidia.com/mig-<profile>` beside the node's whole GPUs (`gpu.count` of them, which may
/// then be 0), cut from GPUs of `gpu.product`. GFD labels them `nvidia.com/mig-<profile>.count`
/// and `.memory` (`internal/lm/mig-strategy.go`, `resource.go`).
#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MigDevicesEntry {
    pub profile: String,
    pub count: u8,
    /// One device's: MiB (GFD's label) or a quantity.
    pub memory: MemoryField,
    /// Device indices in use, within this profile's devices.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allocated: Vec<u8>,
}

#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NodeGroupEntry {
    /// Explicit node names; or `namePattern` + `count`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
    /// e.g. `h100-{index}` or `h100-{index:03}` (zero-padded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_pattern: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub start_index: u32,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    pub gpu: GpuEntry,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allocated: Vec<u8>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mig_devices: Vec<MigDevicesEntry>,
}

fn is_zero(value: &u32) -> bool {
    *value == 0
}

/// A node's GPUs. A product missing from the table needs `memory`, and is then planned with
/// no NVLink assumed.
#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GpuEntry {
    pub product: ProductName,
    pub count: u8,
    /// MiB as an integer (GFD's `nvidia.com/gpu.memory`), or a quantity such as `80Gi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryField>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nvlink: Option<NvlinkField>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clique: Option<String>,
    /// The GPUs are MIG devices of this profile (GFD's single strategy, e.g. `2g.20gb`):
    /// `count` counts devices and `memory` (then required) is one device's. GFD's product
    /// form `NVIDIA-H100-80GB-HBM3-MIG-2g.20gb` says the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mig: Option<String>,
    /// The GPUs are shared, each offered as this many devices (2 or more; GFD's
    /// `nvidia.com/gpu.replicas`): `count` counts whole GPUs and `memory` is a whole GPU's.
    /// GFD's product form `NVIDIA-A100-SXM4-80GB-SHARED` says the GPUs are shared too, and then
    /// needs `replicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u8>,
    /// How they are shared: `time-slicing` (when only `replicas` is given) or `mps`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sharing: Option<String>,
}

/// What a [`GpuEntry`] resolves to: the devices' product, and the MIG profile or sharing
/// that made them.
#[derive(Debug, Clone)]
pub struct ResolvedGpus {
    pub product: ProductId,
    pub mig: Option<String>,
    pub sharing: Option<GpuSharing>,
}

/// A product name looked up in the table while parsing: `None` for a product the table
/// lacks, which the node's `gpu.memory` must then describe ([`GpuEntry`]).
#[derive(Debug, Clone, Serialize)]
#[serde(transparent)]
pub struct ProductName(pub String, #[serde(skip)] pub Option<ProductId>);

impl<'de> Deserialize<'de> for ProductName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        let id = product::lookup(&name);
        Ok(ProductName(name, id))
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum MemoryField {
    Mib(u64),
    Quantity(String),
}

impl<'de> Deserialize<'de> for MemoryField {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Mib(u64),
            Quantity(String),
        }
        match Raw::deserialize(deserializer).map_err(|_| {
            serde::de::Error::custom("gpu.memory must be MiB as a whole number (e.g. 81559) or a quantity (e.g. 80Gi)")
        })? {
            Raw::Mib(mib) => Ok(MemoryField::Mib(mib)),
            Raw::Quantity(text) => topoplace_engine::quantity::parse_mib(&text)
                .map(|_| MemoryField::Quantity(text))
                .map_err(serde::de::Error::custom),
        }
    }
}

impl MemoryField {
    fn mib(&self) -> u64 {
        match self {
            MemoryField::Mib(mib) => *mib,
            MemoryField::Quantity(text) => topoplace_engine::quantity::parse_mib(text).unwrap_or(0),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum NvlinkField {
    Named(String),
    Groups(Vec<Vec<u8>>),
}

impl<'de> Deserialize<'de> for NvlinkField {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Named(String),
            Groups(Vec<Vec<u8>>),
        }
        let expected =
            "gpu.nvlink must be `all`, `none`, `pairs`, `hybrid-cube-mesh` or groups such as [[0,1,2,3],[4,5,6,7]]";
        match Raw::deserialize(deserializer).map_err(|_| serde::de::Error::custom(expected))? {
            Raw::Named(name) if ["all", "none", "pairs", "hybrid-cube-mesh"].contains(&name.as_str()) => {
                Ok(NvlinkField::Named(name))
            }
            Raw::Named(name) => Err(serde::de::Error::custom(format!("`{name}`: {expected}"))),
            Raw::Groups(groups) => Ok(NvlinkField::Groups(groups)),
        }
    }
}

impl NvlinkField {
    fn layout(&self) -> NvlinkLayout {
        match self {
            NvlinkField::Named(name) => match name.as_str() {
                "all" => NvlinkLayout::All,
                "pairs" => NvlinkLayout::Pairs,
                "hybrid-cube-mesh" => NvlinkLayout::HybridCubeMesh,
                _ => NvlinkLayout::None,
            },
            NvlinkField::Groups(groups) => NvlinkLayout::Groups(groups.clone()),
        }
    }
}

impl GpuEntry {
    /// The entry's product: the table's, or for a product the table lacks, one planned from
    /// this entry's `memory` with no NVLink assumed ([`product::register_unknown`]), never
    /// from another entry's. Errors name what to write instead.
    fn resolve(&self) -> Result<ResolvedGpus, (&'static str, String)> {
        let ProductName(written, _) = &self.product;
        let (whole_name, shared) = match product::strip_shared(written) {
            Some(whole) => (whole, true),
            None => (written.as_str(), false),
        };
        // GFD labels unshared GPUs `replicas: 1` and `sharing-strategy: none`; said so here,
        // they are whole GPUs too. One replica per GPU is a whole GPU, whatever the strategy.
        let strategy = self.sharing.as_deref().map(str::trim).filter(|s| !s.eq_ignore_ascii_case("none"));
        if self.sharing.is_some() && strategy.is_none() && (shared || self.replicas.is_some_and(|r| r > 1)) {
            return Err((
                "sharing",
                "none, but gpu.replicas above 1 or a -SHARED product says the GPUs are shared".into(),
            ));
        }
        let strategy = match strategy {
            None => None,
            Some(text) => Some(SharingStrategy::parse(text).ok_or_else(|| {
                ("sharing", format!("`{text}` is not a sharing strategy (none, time-slicing or mps)"))
            })?),
        };
        if self.replicas == Some(1) {
            return self.resolve_whole(whole_name).map(|(product, mig)| ResolvedGpus { product, mig, sharing: None });
        }
        let sharing = match (strategy, self.replicas, shared) {
            (None, None, false) => None,
            (_, None, _) => {
                return Err((
                    "replicas",
                    "the GPUs are shared: give gpu.replicas, the devices each GPU is offered as".into(),
                ))
            }
            (strategy, Some(replicas), _) => {
                Some(GpuSharing { strategy: strategy.unwrap_or(SharingStrategy::TimeSlicing), replicas })
            }
        };
        let Some(sharing) = sharing else {
            return self.resolve_whole(written).map(|(product, mig)| ResolvedGpus { product, mig, sharing: None });
        };
        if self.mig.is_some() || product::split_mig(written).is_some() {
            let why = if self.mig.is_some() { "gpu.mig is given" } else { "the product names a MIG profile" };
            return Err(("replicas", format!("{why}, and shared MIG devices are not planned")));
        }
        let (whole, _) = self.resolve_whole(whole_name)?;
        let product = product::register_shared(whole).map_err(|e| ("product", e.to_string()))?;
        Ok(ResolvedGpus { product, mig: None, sharing: Some(sharing) })
    }

    /// The whole GPUs' product (or MIG devices' with their profile) named `written`.
    fn resolve_whole(&self, written: &str) -> Result<(ProductId, Option<String>), (&'static str, String)> {
        let id = &product::lookup(written).filter(|id| id.get().parent.is_none());
        let (name, mig) = match (product::split_mig(written), &self.mig) {
            (Some(_), Some(_)) => {
                return Err(("mig", format!("`{written}` names a MIG profile, and so does gpu.mig: give one")))
            }
            (Some((parent, profile)), None) => (parent, Some(profile.to_string())),
            (None, mig) => (written, mig.as_deref().map(|m| m.trim().to_string())),
        };
        let id = if mig.is_some() { product::lookup(name) } else { *id };
        if let Some(profile) = &mig {
            let Some(id) = id.filter(|id| !id.is_unknown()) else {
                return Err((
                    "product",
                    format!(
                        "MIG devices of `{name}`, which is not a known GPU product: MIG devices are planned only for \
                         products of the table ({})",
                        product::known_names().join(", ")
                    ),
                ));
            };
            let Some(memory) = &self.memory else {
                return Err(("memory", "the GPUs are MIG devices: give gpu.memory, one device's memory".into()));
            };
            let written_as = if self.mig.is_some() { "mig" } else { "product" };
            let devices = product::register_mig(id, profile, memory.mib())
                .map_err(|e| (field_of(&e, written_as), e.to_string()))?;
            return Ok((devices, mig));
        }
        let id = match (id, &self.memory) {
            (Some(id), _) if !id.is_unknown() => Ok(id),
            (_, Some(memory)) => {
                product::register_unknown(name, memory.mib()).map_err(|e| (field_of(&e, "product"), e.to_string()))
            }
            (_, None) => Err((
                "product",
                format!(
                "unknown GPU product `{name}`: give gpu.memory to plan it (no NVLink assumed), or use a known product \
                 ({}; GFD names such as NVIDIA-H100-80GB-HBM3 work too)",
                product::known_names().join(", ")
            ),
            )),
        }?;
        Ok((id, None))
    }
}

/// The `gpu.*` field a product registration error is about: `memory` for a missing memory,
/// else `otherwise`.
fn field_of(error: &product::UnknownProductError, otherwise: &'static str) -> &'static str {
    match error {
        product::UnknownProductError::NoMemory { .. } | product::UnknownProductError::MigMemory { .. } => "memory",
        _ => otherwise,
    }
}

/// The line of the first `product:` at or after `line` (the entry's own), for errors about
/// the node's GPUs (in flow style, the `gpu:` line).
fn product_line(text: &str, line: Option<usize>) -> Option<usize> {
    let from = line?.saturating_sub(1);
    text.lines().enumerate().skip(from).find(|(_, l)| l.contains("product:")).map(|(index, _)| index + 1).or(line)
}

fn node_spec(
    name: String,
    labels: BTreeMap<String, String>,
    gpu: &GpuEntry,
    resolved: ResolvedGpus,
    allocated: Vec<u8>,
) -> NodeSpec {
    let ResolvedGpus { product, mig: mig_profile, sharing } = resolved;
    NodeSpec {
        name,
        labels,
        product,
        gpu_count: gpu.count,
        memory_mib: gpu.memory.as_ref().map(MemoryField::mib),
        nvlink: gpu.nvlink.as_ref().map(NvlinkField::layout),
        clique: gpu.clique.clone(),
        allocated,
        mig_profile,
        sharing,
        pool: DevicePool::Gpu,
    }
}

/// The specs of one node entry: its whole GPUs (none when `gpu.count` is 0 beside MIG
/// devices) and one per `migDevices` entry; errors are `(field, message)` with the field
/// relative to the entry.
fn node_specs(
    name: &str,
    labels: &BTreeMap<String, String>,
    gpu: &GpuEntry,
    resolved: &ResolvedGpus,
    allocated: &[u8],
    mig_devices: &[MigDevicesEntry],
) -> Result<Vec<NodeSpec>, (String, String)> {
    let mut specs = Vec::new();
    if gpu.count > 0 || mig_devices.is_empty() {
        specs.push(node_spec(name.to_string(), labels.clone(), gpu, resolved.clone(), allocated.to_vec()));
    } else if !allocated.is_empty() {
        return Err(("allocated".into(), "gpu.count is 0: no whole GPU to be in use".into()));
    }
    if mig_devices.is_empty() {
        return Ok(specs);
    }
    let parent = resolved.product;
    if resolved.mig.is_some() || resolved.sharing.is_some() || parent.is_unknown() {
        return Err((
            "migDevices".into(),
            format!(
                "MIG devices of the mixed strategy are cut from whole GPUs of a known product; gpu is {}",
                parent.get().name
            ),
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for (index, entry) in mig_devices.iter().enumerate() {
        let field = |f: &str| format!("migDevices[{index}].{f}");
        let profile = entry.profile.trim();
        if !seen.insert(profile.to_ascii_lowercase()) {
            return Err((field("profile"), format!("{profile} is listed twice")));
        }
        if entry.count == 0 || usize::from(entry.count) > HOST_GPUS_MAX {
            return Err((field("count"), format!("{} is out of range (1..={HOST_GPUS_MAX})", entry.count)));
        }
        if let Some(index) = entry.allocated.iter().find(|&&i| i >= entry.count) {
            return Err((field("allocated"), format!("device {index} is not below the {} devices", entry.count)));
        }
        let product = product::register_mig(parent, profile, entry.memory.mib()).map_err(|e| {
            let f = match e {
                product::UnknownProductError::NoMemory { .. } | product::UnknownProductError::MigMemory { .. } => {
                    "memory"
                }
                _ => "profile",
            };
            (field(f), e.to_string())
        })?;
        specs.push(NodeSpec {
            name: name.to_string(),
            labels: labels.clone(),
            product,
            gpu_count: entry.count,
            memory_mib: Some(entry.memory.mib()),
            nvlink: None,
            clique: None,
            allocated: entry.allocated.clone(),
            mig_profile: Some(profile.to_string()),
            sharing: None,
            pool: DevicePool::Mig(profile.to_string()),
        });
    }
    Ok(specs)
}

/// The widest zero padding `{index:0N}` takes: a Kubernetes node name is at most 253
/// characters (a DNS subdomain).
const INDEX_WIDTH_MAX: usize = 253;

/// Expands `namePattern` for one index: `{index}` or `{index:0N}` (`N` at most
/// [`INDEX_WIDTH_MAX`]).
fn pattern_name(pattern: &str, index: u32) -> Option<String> {
    let start = pattern.find("{index")?;
    let end = start + pattern[start..].find('}')?;
    let spec = &pattern[start + "{index".len()..end];
    let number = match spec.strip_prefix(":0") {
        Some(width) => {
            let width = width.parse::<usize>().ok().filter(|&w| w <= INDEX_WIDTH_MAX)?;
            format!("{index:0width$}")
        }
        None if spec.is_empty() => index.to_string(),
        None => return None,
    };
    Some(format!("{}{number}{}", &pattern[..start], &pattern[end + 1..]))
}

/// Parses a cluster file's text into a validated spec; `file` names it in errors.
pub fn parse(file: &str, text: &str) -> Result<ClusterSpec, FileError> {
    check_header(file, text, "Cluster")?;
    let parsed: ClusterFile = super::from_yaml_str(file, text)?;
    debug_assert_eq!(parsed.api_version, API_VERSION);
    let mut nodes = Vec::new();
    // Where each node came from, for errors found after expansion.
    let mut origins: Vec<Option<usize>> = Vec::new();
    for (index, entry) in parsed.spec.nodes.into_iter().enumerate() {
        let line = line_of_name(text, &entry.name);
        let product = entry.gpu.resolve().map_err(|(field, message)| {
            let name = &entry.name;
            FileError::at_line(
                file,
                product_line(text, line),
                format!("spec.nodes[{index}].gpu.{field}: {message} (node `{name}`)"),
            )
        })?;
        let specs = node_specs(&entry.name, &entry.labels, &entry.gpu, &product, &entry.allocated, &entry.mig_devices)
            .map_err(|(field, message)| {
                let name = &entry.name;
                FileError::at_line(file, line, format!("spec.nodes[{index}].{field}: {message} (node `{name}`)"))
            })?;
        for spec in specs {
            nodes.push(spec);
            origins.push(line);
        }
    }
    for (group_index, group) in parsed.spec.node_groups.into_iter().enumerate() {
        let where_ = format!("spec.nodeGroups[{group_index}]");
        let group_line = group
            .name_pattern
            .as_deref()
            .and_then(|p| line_of_name(text, p))
            .or_else(|| group.names.first().and_then(|n| line_of_list_entry(text, n)));
        let names: Vec<String> = match (&group.name_pattern, group.count, group.names.is_empty()) {
            (None, None, false) => group.names.clone(),
            (Some(pattern), Some(count), true) => {
                if count > GROUP_NODES_MAX {
                    return Err(FileError::at_line(
                        file,
                        group_line,
                        format!("{where_}.count: {count} is over the limit of {GROUP_NODES_MAX}"),
                    ));
                }
                (group.start_index..group.start_index.saturating_add(count))
                    .map(|index| {
                        pattern_name(pattern, index).ok_or_else(|| {
                            FileError::at_line(
                                file,
                                group_line,
                                format!(
                                    "{where_}.namePattern: `{pattern}` needs `{{index}}` or `{{index:0N}}` (N at most {INDEX_WIDTH_MAX})"
                                ),
                            )
                        })
                    })
                    .collect::<Result<_, _>>()?
            }
            _ => {
                return Err(FileError::at_line(
                    file,
                    group_line,
                    format!("{where_}: give either `names` or both `namePattern` and `count`"),
                ))
            }
        };
        let product = group.gpu.resolve().map_err(|(field, message)| {
            FileError::at_line(file, product_line(text, group_line), format!("{where_}.gpu.{field}: {message}"))
        })?;
        for name in names {
            let specs = node_specs(&name, &group.labels, &group.gpu, &product, &group.allocated, &group.mig_devices)
                .map_err(|(field, message)| {
                    FileError::at_line(file, group_line, format!("{where_}.{field}: {message}"))
                })?;
            for spec in specs {
                nodes.push(spec);
                origins.push(group_line);
            }
        }
    }
    for (node, line) in nodes.iter().zip(&origins) {
        if usize::from(node.gpu_count) > HOST_GPUS_MAX {
            continue;
        }
        topoplace_engine::topology::validate_node(node).map_err(|e| FileError::at_line(file, *line, e.to_string()))?;
    }
    let spec = ClusterSpec { name: parsed.metadata.name, levels: parsed.spec.levels, nodes };
    Ok(spec)
}

/// Where a topology error points in the file: the node it names.
pub fn locate(file: &str, text: &str, error: &TopologyError) -> FileError {
    let node = match error {
        TopologyError::DuplicateNode { node } => {
            // The second occurrence is the mistake.
            let mut lines = lines_naming(text, node, true);
            let first = lines.next();
            let second = lines.next();
            return FileError::at_line(file, second.or(first), error.to_string());
        }
        TopologyError::GpuCount { node, .. }
        | TopologyError::AllocatedIndex { node, .. }
        | TopologyError::AllocatedTwice { node, .. }
        | TopologyError::Nvlink { node, .. }
        | TopologyError::CliqueWithoutFabric { node, .. }
        | TopologyError::Memory { node }
        | TopologyError::MigProfile { node, .. }
        | TopologyError::MigWith { node, .. }
        | TopologyError::MigProduct { node, .. }
        | TopologyError::MigPool { node, .. }
        | TopologyError::PoolLabels { node, .. }
        | TopologyError::Sharing { node, .. }
        | TopologyError::EmptyName { node } => Some(node),
        _ => None,
    };
    let line = node.and_then(|n| line_of_name(text, n).or_else(|| line_of_list_entry(text, n)));
    let line = line.or_else(|| match error {
        TopologyError::DuplicateLevel { .. } | TopologyError::TooManyLevels { .. } => {
            text.lines().position(|l| l.trim_start().starts_with("levels:")).map(|i| i + 1)
        }
        _ => None,
    });
    FileError::at_line(file, line, error.to_string())
}

/// Parses and builds a cluster: the one call the adapters use.
pub fn load(file: &str, text: &str) -> Result<topoplace_engine::topology::Cluster, FileError> {
    let spec = parse(file, text)?;
    topoplace_engine::topology::Cluster::build(spec).map_err(|e| locate(file, text, &e))
}

/// Renders a spec back to the file format (used by converters), grouping nodes that share
/// labels and GPU description into `nodeGroups` with explicit names.
pub fn render(spec: &ClusterSpec) -> Result<String, serde_yaml_ng::Error> {
    let mut groups: Vec<NodeGroupEntry> = Vec::new();
    // A mixed-strategy node's MIG pools go in its entry's `migDevices`.
    let mut mig_devices: BTreeMap<&str, Vec<MigDevicesEntry>> = BTreeMap::new();
    let mut whole: std::collections::BTreeSet<&str> = std::collections::BTreeSet::new();
    for node in &spec.nodes {
        match &node.pool {
            DevicePool::Mig(profile) => mig_devices.entry(node.name.as_str()).or_default().push(MigDevicesEntry {
                profile: profile.clone(),
                count: node.gpu_count,
                memory: MemoryField::Mib(node.memory_mib.unwrap_or(node.product.get().memory_mib)),
                allocated: node.allocated.clone(),
            }),
            DevicePool::Gpu => {
                whole.insert(node.name.as_str());
            }
        }
    }
    for node in &spec.nodes {
        let devices = mig_devices.get(node.name.as_str()).cloned().unwrap_or_default();
        let zero_whole = matches!(node.pool, DevicePool::Mig(_)) && !whole.contains(node.name.as_str());
        if zero_whole {
            // Only the node's first pool writes the entry.
            if spec.nodes.iter().find(|n| n.name == node.name).is_some_and(|first| !std::ptr::eq(first, node)) {
                continue;
            }
        } else if node.pool != DevicePool::Gpu {
            continue;
        }
        let gpu = GpuEntry {
            // MIG devices and shared replicas are written as their GPU's product and `mig` or
            // `replicas`.
            product: match node.product.get().parent.map(|(parent, _)| parent) {
                Some(parent) => ProductName(parent.get().name.to_string(), Some(parent)),
                None => ProductName(node.product.get().name.to_string(), Some(node.product)),
            },
            count: node.gpu_count,
            memory: node.memory_mib.map(MemoryField::Mib),
            nvlink: node.nvlink.as_ref().map(|layout| match layout {
                NvlinkLayout::All => NvlinkField::Named("all".into()),
                NvlinkLayout::None => NvlinkField::Named("none".into()),
                NvlinkLayout::Pairs => NvlinkField::Named("pairs".into()),
                NvlinkLayout::HybridCubeMesh => NvlinkField::Named("hybrid-cube-mesh".into()),
                NvlinkLayout::Groups(groups) => NvlinkField::Groups(groups.clone()),
            }),
            clique: node.clique.clone(),
            mig: node.mig_profile.clone(),
            replicas: node.sharing.map(|sharing| sharing.replicas),
            sharing: node.sharing.map(|sharing| sharing.strategy.as_str().to_string()),
        };
        // A node of MIG pools only: `gpu` names the GPUs they are cut from, none whole.
        let (gpu, allocated) = if zero_whole {
            (GpuEntry { count: 0, memory: None, mig: None, ..gpu }, Vec::new())
        } else {
            (gpu, node.allocated.clone())
        };
        let same = |group: &NodeGroupEntry| {
            group.labels == node.labels
                && group.allocated == allocated
                && serde_yaml_ng::to_string(&group.gpu).ok() == serde_yaml_ng::to_string(&gpu).ok()
                && serde_yaml_ng::to_string(&group.mig_devices).ok() == serde_yaml_ng::to_string(&devices).ok()
        };
        match groups.last_mut() {
            Some(group) if same(group) => group.names.push(node.name.clone()),
            _ => groups.push(NodeGroupEntry {
                names: vec![node.name.clone()],
                name_pattern: None,
                count: None,
                start_index: 0,
                labels: node.labels.clone(),
                gpu,
                allocated,
                mig_devices: devices,
            }),
        }
    }
    let file = ClusterFile {
        api_version: API_VERSION.into(),
        kind: "Cluster".into(),
        metadata: Metadata { name: spec.name.clone() },
        spec: ClusterFileSpec { levels: spec.levels.clone(), nodes: Vec::new(), node_groups: groups },
    };
    serde_yaml_ng::to_string(&file)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "apiVersion: topoplace.io/v1alpha1\nkind: Cluster\nmetadata: {name: t}\n";

    /// Each `(gpu entry, expected text, line)`: node `a` with that `gpu:` is refused at that
    /// line, naming the node.
    fn assert_gpu_errors(cases: &[(&str, &str, usize)]) {
        for &(gpu, expected, line) in cases {
            let message = error_of(&format!("spec:\n  nodes:\n  - name: a\n    {gpu}\n"));
            let at = format!("c.yaml:{line}:");
            assert!(
                message.contains(expected) && message.starts_with(&at) && message.contains("`a`"),
                "{gpu}: {message}"
            );
        }
    }

    fn error_of(body: &str) -> String {
        let text = format!("{HEADER}{body}");
        load("c.yaml", &text).unwrap_err().to_string()
    }

    #[test]
    fn unknown_fields_name_file_line_field_and_node() {
        let message = error_of("spec:\n  nodes:\n  - name: a\n    gpu: {product: H100, count: 8}\n  - name: b\n    gpu:\n      product: H100\n      count: 8\n      colour: red\n");
        assert!(message.starts_with("c.yaml:12:7: spec.nodes[1].gpu: unknown field `colour`"), "{message}");
        assert!(message.ends_with("(node `b`)"), "{message}");
    }

    #[test]
    fn a_product_missing_from_the_table_is_planned_from_its_memory() {
        let text = format!(
            "{HEADER}spec:\n  nodes:\n  - name: a\n    gpu: {{product: NVIDIA-Test-File-GPU, count: 4, memory: 96Gi}}\n"
        );
        let cluster = load("c.yaml", &text).expect("planned");
        let host = &cluster.hosts[0];
        assert!(host.product.is_unknown());
        assert_eq!(
            (host.product.get().name, host.memory_mib, host.links.best_nvlink_gbps),
            ("NVIDIA-Test-File-GPU", 98_304, 0)
        );
        let rendered = render(&parse("c.yaml", &text).expect("parsed")).expect("rendered");
        assert!(rendered.contains("product: NVIDIA-Test-File-GPU") && rendered.contains("memory: 98304"), "{rendered}");
        // Another node of the same product still needs its own memory.
        let message = error_of("spec:\n  nodes:\n  - name: b\n    gpu: {product: NVIDIA-Test-File-GPU, count: 4}\n");
        assert!(message.contains("unknown GPU product `NVIDIA-Test-File-GPU`: give gpu.memory"), "{message}");
    }

    /// A mixed-strategy node is one spec per pool, and is written back as one entry with its
    /// `migDevices`, whole GPUs or none.
    #[test]
    fn mixed_strategy_nodes_read_and_write_as_one_entry() {
        let text = format!(
            "{HEADER}spec:\n  nodes:\n  - name: a\n    gpu: {{product: A100-SXM4-80GB, count: 2}}\n    migDevices:\n    - {{profile: 3g.40gb, count: 2, memory: 40192, allocated: [1]}}\n  - name: b\n    gpu: {{product: A100-SXM4-80GB, count: 0}}\n    migDevices: [{{profile: 1g.10gb, count: 7, memory: 9856}}]\n"
        );
        let spec = parse("c.yaml", &text).expect("parses");
        let pools: Vec<(&str, DevicePool, u8, Vec<u8>)> =
            spec.nodes.iter().map(|n| (n.name.as_str(), n.pool.clone(), n.gpu_count, n.allocated.clone())).collect();
        assert_eq!(
            pools,
            [
                ("a", DevicePool::Gpu, 2, vec![]),
                ("a", DevicePool::Mig("3g.40gb".into()), 2, vec![1]),
                ("b", DevicePool::Mig("1g.10gb".into()), 7, vec![]),
            ]
        );
        let rendered = render(&spec).expect("renders");
        let again = parse("c.yaml", &rendered).expect("reads its own output");
        assert_eq!(again.nodes, spec.nodes, "{rendered}");
    }

    #[test]
    fn mig_devices_are_written_as_gfd_does_or_with_gpu_mig() {
        let text = format!(
            "{HEADER}spec:\n  nodes:\n  - name: a\n    gpu: {{product: H100, count: 24, mig: 2g.20gb, memory: 19968}}\n  - name: b\n    gpu: {{product: NVIDIA-H100-80GB-HBM3-MIG-2g.20gb, count: 24, memory: 19968}}\n"
        );
        let cluster = load("c.yaml", &text).expect("planned");
        for host in &cluster.hosts {
            assert_eq!(
                (host.mig_profile.as_deref(), host.memory_mib, host.links.best_nvlink_gbps),
                (Some("2g.20gb"), 19_968, 0)
            );
            assert_eq!(host.product.get().name, "H100-SXM5-MIG-2g.20gb", "a product of their own");
            assert_eq!(host.product.mig_parent().map(|p| p.get().name), Some("H100-SXM5"));
        }
        let rendered = render(&parse("c.yaml", &text).expect("parsed")).expect("rendered");
        assert!(rendered.contains("mig: 2g.20gb"), "{rendered}");
        // Product errors point at the `product:` line (7), the node's own checks at its name (6).
        let cases = [
            ("gpu: {product: H100, count: 24, mig: 2g.20gb}", "give gpu.memory, one device's memory", 7),
            ("gpu: {product: H100, count: 24, mig: 2g.20gb, memory: 0}", "gpu.memory: GPU product", 7),
            (
                "gpu: {product: H100, count: 24, mig: 2g.20gb, memory: 200Gi}",
                "gpu.memory: `H100-SXM5-MIG-2g.20gb`: a MIG",
                7,
            ),
            ("gpu: {product: Foo-MIG-1g.5gb, count: 4}", "gpu.product: MIG devices of `Foo`, which is not a known", 7),
            (
                "gpu: {product: H100-MIG-1g.10gb, count: 4, memory: 9856, replicas: 2}",
                "the product names a MIG profile",
                7,
            ),
            ("gpu: {product: H100-MIG-2g.20gb, count: 24, mig: 2g.20gb, memory: 1}", "give one", 7),
            ("gpu: {product: NVIDIA-New-MIG-1g.10gb, count: 7, memory: 9856}", "not a known GPU product", 7),
            ("gpu: {product: H100, count: 24, mig: \"2g 20gb\", memory: 1}", "by a profile like 2g.20gb", 7),
            ("gpu: {product: H100, count: 24, mig: 1g.10gb, memory: 1, nvlink: all}", "gpu.nvlink is set, but", 6),
        ];
        assert_gpu_errors(&cases);
    }

    #[test]
    fn shared_gpus_are_written_with_their_replicas_or_as_gfd_names_them() {
        let text = format!(
            "{HEADER}spec:\n  nodes:\n  - name: a\n    gpu: {{product: A100-SXM4-80GB, count: 8, replicas: 4}}\n  - name: b\n    gpu: {{product: NVIDIA-A100-SXM4-80GB-SHARED, count: 8, replicas: 4, sharing: mps}}\n    allocated: [31]\n"
        );
        let cluster = load("c.yaml", &text).expect("planned");
        for host in &cluster.hosts {
            assert_eq!((host.gpu_count, host.memory_mib, host.links.best_nvlink_gbps), (32, 81_920 / 4, 0));
            assert_eq!(host.product.get().name, "A100-SXM4-80GB-SHARED", "a product of their own");
            assert_eq!(host.product.shared_parent().map(|p| p.get().name), Some("A100-SXM4-80GB"));
        }
        assert_eq!(cluster.hosts[1].sharing.map(|s| s.strategy), Some(SharingStrategy::Mps));
        let spec = parse("c.yaml", &text).expect("parsed");
        let rendered = render(&spec).expect("rendered");
        assert!(rendered.contains("replicas: 4") && rendered.contains("sharing: mps"), "{rendered}");
        let again = parse("c.yaml", &rendered).expect("the rendered file parses");
        assert_eq!(again.nodes, spec.nodes, "{rendered}");
        // Unshared, as GFD labels it: whole GPUs.
        for gpu in [
            "product: A100-SXM4-80GB, count: 8, replicas: 1, sharing: none",
            "product: A100-SXM4-80GB, count: 8, replicas: 1, sharing: time-slicing",
            "product: NVIDIA-A100-SXM4-80GB-SHARED, count: 8, replicas: 1",
        ] {
            let unshared = format!("{HEADER}spec:\n  nodes:\n  - name: a\n    gpu: {{{gpu}}}\n");
            let host = &load("c.yaml", &unshared).expect("planned").hosts[0];
            assert_eq!((host.gpu_count, host.sharing, host.product.get().name), (8, None, "A100-SXM4-80GB"), "{gpu}");
        }
        // Product errors point at the `product:` line (7), the node's own checks at its name (6).
        let cases = [
            ("gpu: {product: A100-SXM4-80GB-SHARED, count: 8}", "gpu.replicas: the GPUs are shared", 7),
            ("gpu: {product: A100-SXM4-80GB, count: 8, sharing: mps}", "give gpu.replicas", 7),
            (
                "gpu: {product: A100-SXM4-80GB, count: 8, replicas: 4, sharing: vgpu}",
                "gpu.sharing: `vgpu` is not a sharing strategy",
                7,
            ),
            ("gpu: {product: H100, count: 7, mig: 1g.10gb, memory: 9856, replicas: 2}", "shared MIG devices", 7),
            ("gpu: {product: A100-SXM4-80GB, count: 8, replicas: 0}", "gpu.replicas: 0 (a shared GPU is", 6),
            ("gpu: {product: A100-SXM4-80GB, count: 8, replicas: 1, sharing: vgpu}", "gpu.sharing: `vgpu` is not", 7),
            ("gpu: {product: A100-SXM4-80GB, count: 8, replicas: 9}", "72 devices, over the 64", 6),
            ("gpu: {product: A100-SXM4-80GB, count: 8, replicas: 4, sharing: none}", "gpu.sharing: none, but", 7),
            ("gpu: {product: NVIDIA-New-GPU-X, count: 8, replicas: 4}", "gpu.product: unknown GPU product", 7),
            (
                "gpu: {product: A100-SXM4-80GB, count: 8, replicas: 2, nvlink: all}",
                "gpu.nvlink: a shared GPU's replica has no NVLink",
                6,
            ),
        ];
        assert_gpu_errors(&cases);
    }

    #[test]
    fn unknown_products_are_reported_at_their_line() {
        let message = error_of("spec:\n  nodes:\n  - name: a\n    gpu: {product: H1000, count: 8}\n");
        assert!(message.starts_with("c.yaml:7:"), "{message}");
        assert!(message.contains("unknown GPU product `H1000`") && message.contains("(node `a`)"), "{message}");
    }

    #[test]
    fn semantic_errors_point_at_the_node() {
        let message = error_of("spec:\n  nodes:\n  - name: a\n    gpu: {product: H100, count: 8}\n  - name: b\n    gpu: {product: H100, count: 8}\n    allocated: [9]\n");
        assert_eq!(message, "c.yaml:8: node `b`: allocated GPU index 9 is not below the node's 8 devices (gpu.count, times the replicas when shared)");
        let message = error_of("spec:\n  nodes:\n  - name: a\n    gpu: {product: H100, count: 8}\n  - name: a\n    gpu: {product: H100, count: 8}\n");
        assert_eq!(message, "c.yaml:8: node `a`: name appears twice");
        // A name repeated inside a group's `names` list points at the repeat.
        let message = error_of("spec:\n  nodes:\n  - name: a\n    gpu: {product: H100, count: 8}\n  nodeGroups:\n  - names:\n    - b\n    - a\n    gpu: {product: H100, count: 8}\n");
        assert_eq!(message, "c.yaml:11: node `a`: name appears twice");
    }

    #[test]
    fn wrong_kind_is_said_plainly() {
        let message =
            load("w.yaml", "apiVersion: topoplace.io/v1alpha1\nkind: Workload\nspec: {}\n").unwrap_err().to_string();
        assert_eq!(message, "w.yaml:2: kind is `Workload`, expected `Cluster`");
    }

    #[test]
    fn groups_expand_patterns_and_render_round_trips() {
        let text = format!(
            "{HEADER}spec:\n  levels: [rack]\n  nodeGroups:\n  - namePattern: \"gb-{{index:02}}\"\n    count: 3\n    startIndex: 1\n    labels: {{rack: r1}}\n    gpu: {{product: NVIDIA-GB200, count: 4, clique: c1}}\n"
        );
        let spec = parse("c.yaml", &text).expect("valid");
        let names: Vec<_> = spec.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["gb-01", "gb-02", "gb-03"]);
        let rendered = render(&spec).expect("renders");
        let again = parse("again.yaml", &rendered).expect("rendered file parses");
        assert_eq!(again, spec);
    }
}
