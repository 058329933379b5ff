//! The GPU product table: what each GPU model brings (memory, intra-host fabric, link
//! bandwidths), keyed by the names NVIDIA GPU Feature Discovery writes in
//! `nvidia.com/gpu.product`, plus short aliases people type by hand.
//!
//! Memory is in MiB as NVML (and so GFD's `nvidia.com/gpu.memory`) reports it, not the
//! marketing figure: an "80 GB" H100 reports 81,559 MiB, so a floor of `80Gi` (81,920 MiB)
//! does not fit it. That is deliberate: the floor is about what a model can actually use.
//!
//! A product the table lacks (a GPU newer than this table, a workstation card) is not
//! dropped: [`register_unknown`] adds it, for the life of the process, with the memory its
//! node reports, [`Fabric::Unknown`] (no NVLink assumed) and PCIe gen4 links, so its nodes
//! are planned and a workload can select it by name.

use std::cmp::Ordering;
use std::fmt;
use std::sync::RwLock;

use thiserror::Error;

/// How the GPUs inside one host are connected to each other by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fabric {
    /// Every GPU reaches every other through NVSwitch at full bandwidth.
    NvSwitch,
    /// GPUs are linked in pairs (0-1, 2-3, ...) by NVLink bridges; other pairs use PCIe.
    BridgePairs,
    /// DGX-1 style hybrid cube-mesh: two fully linked quads plus i <-> i+4 links.
    HybridCubeMesh,
    /// No NVLink at all; GPUs talk over PCIe (and across sockets over the CPU link).
    PcieOnly,
    /// NVSwitch inside the host and one NVLink domain across the hosts of a rack
    /// (GB200 NVL72); the multi-host domain comes from `nvidia.com/gpu.clique`.
    MultiNodeNvlink,
    /// A product missing from the table ([`register_unknown`]): its links are not known, so
    /// no NVLink is assumed and its GPUs are planned as PCIe-connected.
    Unknown,
}

/// One GPU product of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuProduct {
    /// Canonical short name, used in output.
    pub name: &'static str,
    /// The GFD `nvidia.com/gpu.product` value first, then accepted aliases.
    pub aliases: &'static [&'static str],
    pub memory_mib: u64,
    pub fabric: Fabric,
    /// NVLink bandwidth per GPU (bidirectional, GB/s); 0 when the product has none.
    pub nvlink_gbps: u32,
    /// Bandwidth of one GPU's PCIe link (bidirectional, GB/s).
    pub pcie_gbps: u32,
    /// For MIG devices ([`register_mig`]) and shared replicas ([`register_shared`]): the whole
    /// GPU they are made from, and which of the two they are.
    pub parent: Option<(ProductId, DeviceKind)>,
}

/// What a device made from a whole GPU is: what the device plugin offers as one
/// `nvidia.com/gpu` when the GPU is not offered whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// A MIG device of one profile (GPU Feature Discovery's single MIG strategy).
    MigDevice,
    /// One of the replicas a time-sliced or MPS-shared GPU is offered as (the device plugin's
    /// `sharing.timeSlicing` / `sharing.mps` `replicas`).
    SharedReplica,
}

impl fmt::Display for GpuProduct {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

const PCIE_GEN3: u32 = 32;
const PCIE_GEN4: u32 = 64;
const PCIE_GEN5: u32 = 128;

/// Bandwidth of one NVLink 2 link between two V100s (bidirectional, GB/s).
pub const NVLINK2_LINK_GBPS: u32 = 50;

macro_rules! product {
    ($name:expr, [$($alias:expr),+], $mem:expr, $fabric:ident, $nvl:expr, $pcie:expr) => {
        GpuProduct {
            name: $name,
            aliases: &[$($alias),+],
            memory_mib: $mem,
            fabric: Fabric::$fabric,
            nvlink_gbps: $nvl,
            pcie_gbps: $pcie,
            parent: None,
        }
    };
}

/// The table. Order matters only for output listings (largest memory class first).
pub static PRODUCTS: &[GpuProduct] = &[
    product!("GB200", ["NVIDIA-GB200", "GB200-NVL72", "GB200"], 189_471, MultiNodeNvlink, 1800, PCIE_GEN5),
    product!("B200", ["NVIDIA-B200", "B200", "B200-SXM6"], 183_359, NvSwitch, 1800, PCIE_GEN5),
    product!(
        "H200",
        ["NVIDIA-H200", "NVIDIA-H200-141GB-HBM3E", "H200", "H200-SXM", "H200-SXM5"],
        143_771,
        NvSwitch,
        900,
        PCIE_GEN5
    ),
    product!("H100-NVL", ["NVIDIA-H100-NVL", "H100-NVL", "H100NVL"], 95_830, BridgePairs, 600, PCIE_GEN5),
    product!(
        "H100-SXM5",
        ["NVIDIA-H100-80GB-HBM3", "H100-SXM5", "H100-SXM", "H100", "NVIDIA-H100-SXM5-80GB"],
        81_559,
        NvSwitch,
        900,
        PCIE_GEN5
    ),
    product!("H800", ["NVIDIA-H800", "H800", "H800-SXM5", "NVIDIA-H800-80GB-HBM3"], 81_559, NvSwitch, 400, PCIE_GEN5),
    product!(
        "A800-SXM4-80GB",
        ["NVIDIA-A800-SXM4-80GB", "A800", "A800-SXM4", "A800-80GB"],
        81_920,
        NvSwitch,
        400,
        PCIE_GEN4
    ),
    product!(
        "A100-SXM4-80GB",
        ["NVIDIA-A100-SXM4-80GB", "A100-SXM4-80GB", "A100-80GB", "A100-SXM-80GB"],
        81_920,
        NvSwitch,
        600,
        PCIE_GEN4
    ),
    product!(
        "A100-PCIE-80GB",
        ["NVIDIA-A100-80GB-PCIE", "A100-PCIE-80GB", "A100-80GB-PCIE"],
        81_920,
        PcieOnly,
        600,
        PCIE_GEN4
    ),
    product!("L40S", ["NVIDIA-L40S", "L40S"], 46_068, PcieOnly, 0, PCIE_GEN4),
    product!(
        "A100-SXM4-40GB",
        ["NVIDIA-A100-SXM4-40GB", "A100-SXM4-40GB", "A100-40GB", "A100", "A100-SXM4"],
        40_960,
        NvSwitch,
        600,
        PCIE_GEN4
    ),
    product!(
        "A100-PCIE-40GB",
        ["NVIDIA-A100-PCIE-40GB", "A100-PCIE-40GB", "A100-PCIE"],
        40_960,
        PcieOnly,
        600,
        PCIE_GEN4
    ),
    product!(
        "V100-SXM2-32GB",
        ["TESLA-V100-SXM2-32GB", "V100-SXM2-32GB", "V100-32GB", "V100M32"],
        32_768,
        HybridCubeMesh,
        300,
        PCIE_GEN3
    ),
    product!("L4", ["NVIDIA-L4", "L4"], 23_034, PcieOnly, 0, PCIE_GEN4),
    product!("A10", ["NVIDIA-A10", "A10"], 23_028, PcieOnly, 0, PCIE_GEN4),
    product!(
        "V100-SXM2-16GB",
        ["TESLA-V100-SXM2-16GB", "V100-SXM2-16GB", "V100-16GB", "V100", "V100M16"],
        16_384,
        HybridCubeMesh,
        300,
        PCIE_GEN3
    ),
    product!("T4", ["TESLA-T4", "NVIDIA-T4", "T4"], 15_360, PcieOnly, 0, PCIE_GEN3),
];

/// Identifies a product: its position in [`PRODUCTS`], or past the table, a product
/// [`register_unknown`] added; cheap to copy and compare. Ordered as the table lists its
/// products, then unknown products by name (ignoring case and `-`/`_`/space, as [`lookup`]),
/// so an order never depends on which unknown product the process met first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProductId(u8);

impl ProductId {
    /// The product. Every id comes from [`lookup`] or [`register_unknown`], and unknown
    /// products are never removed, so the entry exists.
    pub fn get(self) -> &'static GpuProduct {
        let index = usize::from(self.0);
        match PRODUCTS.get(index) {
            Some(product) => product,
            None => unknown_products()[index - PRODUCTS.len()],
        }
    }

    /// Whether the product is missing from the table (added by [`register_unknown`] or
    /// [`register_mig`]).
    pub fn is_unknown(self) -> bool {
        usize::from(self.0) >= PRODUCTS.len()
    }

    /// For MIG devices ([`register_mig`]), the product they are cut from.
    pub fn mig_parent(self) -> Option<ProductId> {
        self.get().parent.filter(|(_, kind)| *kind == DeviceKind::MigDevice).map(|(parent, _)| parent)
    }

    /// For shared replicas ([`register_shared`]), the product whose GPUs are shared.
    pub fn shared_parent(self) -> Option<ProductId> {
        self.get().parent.filter(|(_, kind)| *kind == DeviceKind::SharedReplica).map(|(parent, _)| parent)
    }

    /// The whole GPU product of MIG devices or shared replicas; the product itself otherwise.
    pub fn whole_gpu(self) -> ProductId {
        self.get().parent.map_or(self, |(parent, _)| parent)
    }
}

impl PartialOrd for ProductId {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ProductId {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self.is_unknown(), other.is_unknown()) {
            (false, false) => self.0.cmp(&other.0),
            (false, true) => Ordering::Less,
            (true, false) => Ordering::Greater,
            (true, true) => normalize(self.get().name).cmp(&normalize(other.get().name)).then(self.0.cmp(&other.0)),
        }
    }
}

/// Unknown products one process keeps at most: each is leaked once (a name and a table
/// entry, about 100 bytes), and node labels are written by whoever may label nodes, so the
/// count is bounded.
pub const UNKNOWN_PRODUCTS_MAX: usize = 64;

/// The longest product name accepted (GFD writes NVML's name with spaces as dashes, well
/// under this).
pub const PRODUCT_NAME_BYTES_MAX: usize = 128;

/// Bandwidth assumed for one GPU's PCIe link on a product missing from the table.
pub const UNKNOWN_PCIE_GBPS: u32 = PCIE_GEN4;

/// Products met that the table lacks, in the order met: `ProductId(PRODUCTS.len() + i)` is
/// entry `i`. Append-only.
static UNKNOWN_PRODUCTS: RwLock<Vec<&'static GpuProduct>> = RwLock::new(Vec::new());

fn unknown_products() -> std::sync::RwLockReadGuard<'static, Vec<&'static GpuProduct>> {
    UNKNOWN_PRODUCTS.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Why a product missing from the table could not be added.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum UnknownProductError {
    #[error("GPU product name is empty")]
    EmptyName,
    #[error("GPU product name is {bytes} bytes, over the limit of {PRODUCT_NAME_BYTES_MAX}")]
    NameTooLong { bytes: usize },
    #[error("GPU product `{name}` needs its memory (MiB above 0) to be planned, as it is not in the product table")]
    NoMemory { name: String },
    #[error("GPU product `{name}` is not in the product table, and {UNKNOWN_PRODUCTS_MAX} unknown products (the limit) are already known")]
    TooMany { name: String },
    #[error(
        "`{name}`: MIG devices are cut from a whole GPU by a profile like 2g.20gb (at most {MIG_PROFILE_BYTES_MAX} \
         letters, digits, `.`, `+` and `-`)"
    )]
    NotMig { name: String },
    #[error("`{name}`: only whole GPUs are shared as replicas (not MIG devices or replicas)")]
    NotShareable { name: String },
    #[error("`{name}`: a MIG device of {memory_mib} MiB is larger than its whole GPU ({whole_mib} MiB)")]
    MigMemory { name: String, memory_mib: u64, whole_mib: u64 },
    #[error(
        "GPU product `{name}` names MIG devices (`-MIG-<profile>`) or shared replicas (`-SHARED`) of another product, \
         or a product made another way under the same name"
    )]
    DerivedName { name: String },
}

/// The product named `name` (as [`lookup`] matches names): the table's, an unknown product
/// added before, or else a new unknown product with `memory_mib` per GPU, [`Fabric::Unknown`]
/// and no NVLink. A product added before keeps the memory it was added with (each node still
/// carries its own, `NodeSpec::memory_mib`).
///
/// Errors: an empty or overlong name, a name of MIG devices or shared replicas
/// ([`UnknownProductError::DerivedName`]), `memory_mib` 0 for a new product, or
/// [`UNKNOWN_PRODUCTS_MAX`] unknown products already added.
pub fn register_unknown(name: &str, memory_mib: u64) -> Result<ProductId, UnknownProductError> {
    let name = name.trim();
    if name.is_empty() {
        return Err(UnknownProductError::EmptyName);
    }
    if name.len() > PRODUCT_NAME_BYTES_MAX {
        return Err(UnknownProductError::NameTooLong { bytes: name.len() });
    }
    if let Some(id) = lookup(name).filter(|id| id.get().parent.is_none()) {
        return Ok(id);
    }
    // A name of MIG devices or shared replicas is never a whole GPU's, so which node came
    // first cannot decide what the name means.
    if split_mig(name).is_some() || strip_shared(name).is_some() {
        return Err(UnknownProductError::DerivedName { name: name.to_string() });
    }
    if memory_mib == 0 {
        return Err(UnknownProductError::NoMemory { name: name.to_string() });
    }
    intern(name.to_string(), memory_mib, UNKNOWN_PCIE_GBPS, None)
}

/// The MIG devices of `profile` (`2g.20gb`) cut from GPUs of `parent`, as a product of their
/// own named `<parent>-MIG-<profile>` (`H100-SXM5-MIG-2g.20gb`), with `memory_mib` per device
/// and no NVLink: so a gang never mixes devices with whole GPUs or with another profile, and
/// capacity is answered per profile. Added for the life of the process, counted with the
/// unknown products ([`UNKNOWN_PRODUCTS_MAX`]); the devices' memory is the first given.
///
/// Errors: `parent` is itself MIG devices, the name is over [`PRODUCT_NAME_BYTES_MAX`], memory
/// 0, or the limit is reached.
pub fn register_mig(parent: ProductId, profile: &str, memory_mib: u64) -> Result<ProductId, UnknownProductError> {
    let parent_product = parent.get();
    let name = format!("{}{MIG_INFIX}{}", parent_product.name, profile.trim());
    if parent_product.parent.is_some() || !is_mig_profile(profile.trim()) {
        return Err(UnknownProductError::NotMig { name });
    }
    if name.len() > PRODUCT_NAME_BYTES_MAX {
        return Err(UnknownProductError::NameTooLong { bytes: name.len() });
    }
    if memory_mib == 0 {
        return Err(UnknownProductError::NoMemory { name });
    }
    if memory_mib > parent_product.memory_mib {
        return Err(UnknownProductError::MigMemory { name, memory_mib, whole_mib: parent_product.memory_mib });
    }
    intern(name, memory_mib, parent_product.pcie_gbps, Some((parent, DeviceKind::MigDevice)))
}

/// The replicas a GPU of `parent` is shared as (time-slicing or MPS), as a product of their
/// own named as GPU Feature Discovery labels them, `<parent>-SHARED` (`A100-SXM4-80GB-SHARED`),
/// with the whole GPU's memory and no NVLink: so a gang never mixes replicas with whole GPUs,
/// and capacity is answered per replica. How much memory one replica has depends on the
/// node's replica count (`topology::Host::memory_mib`). Added for the life of the process,
/// counted with the unknown products ([`UNKNOWN_PRODUCTS_MAX`]).
///
/// Errors: `parent` is itself MIG devices or replicas, the name is over
/// [`PRODUCT_NAME_BYTES_MAX`], or the limit is reached.
pub fn register_shared(parent: ProductId) -> Result<ProductId, UnknownProductError> {
    let parent_product = parent.get();
    let name = format!("{}{SHARED_SUFFIX}", parent_product.name);
    if parent_product.parent.is_some() {
        return Err(UnknownProductError::NotShareable { name });
    }
    if name.len() > PRODUCT_NAME_BYTES_MAX {
        return Err(UnknownProductError::NameTooLong { bytes: name.len() });
    }
    intern(name, parent_product.memory_mib, parent_product.pcie_gbps, Some((parent, DeviceKind::SharedReplica)))
}

/// GPU Feature Discovery's suffix to the product name of shared GPUs (the device plugin's
/// `renameByDefault: false`, its default).
pub const SHARED_SUFFIX: &str = "-SHARED";

/// `name` without [`SHARED_SUFFIX`] (compared as [`lookup`] compares names: ignoring case,
/// `_` and space as `-`), when it ends so.
pub fn strip_shared(name: &str) -> Option<&str> {
    let name = name.trim_end();
    let cut = name.len().checked_sub(SHARED_SUFFIX.len())?;
    let tail = name.get(cut..)?;
    let same = tail.bytes().zip(SHARED_SUFFIX.bytes()).all(|(a, b)| fold(a) == b);
    same.then_some(&name[..cut])
}

/// One byte of a name as [`lookup`] compares names: ASCII upper case, `_` and space as `-`.
fn fold(byte: u8) -> u8 {
    match byte {
        b' ' | b'_' => b'-',
        other => other.to_ascii_uppercase(),
    }
}

/// The product past the table named `name` (as [`lookup`] matches names): the one added
/// before (another thread may have added it since the caller looked), or a new entry, leaked
/// once, with no NVLink. Errors: [`UNKNOWN_PRODUCTS_MAX`] products already added.
fn intern(
    name: String,
    memory_mib: u64,
    pcie_gbps: u32,
    parent: Option<(ProductId, DeviceKind)>,
) -> Result<ProductId, UnknownProductError> {
    let mut unknown = UNKNOWN_PRODUCTS.write().unwrap_or_else(std::sync::PoisonError::into_inner);
    let wanted = normalize(&name);
    if let Some(index) = unknown.iter().position(|product| normalize(product.name) == wanted) {
        // The same name is the same product only when it is made the same way.
        if unknown[index].parent != parent {
            return Err(UnknownProductError::DerivedName { name });
        }
        return Ok(ProductId((PRODUCTS.len() + index) as u8));
    }
    if unknown.len() >= UNKNOWN_PRODUCTS_MAX {
        return Err(UnknownProductError::TooMany { name });
    }
    let product: &'static GpuProduct = Box::leak(Box::new(GpuProduct {
        name: Box::leak(name.into_boxed_str()),
        aliases: &[],
        memory_mib,
        fabric: Fabric::Unknown,
        nvlink_gbps: 0,
        pcie_gbps,
        parent,
    }));
    unknown.push(product);
    Ok(ProductId((PRODUCTS.len() + unknown.len() - 1) as u8))
}

/// The longest MIG profile name accepted (NVIDIA's are like `1g.10gb+me`, `4g.71gb`).
pub const MIG_PROFILE_BYTES_MAX: usize = 32;

/// Whether `profile` can be a MIG profile name: 1 to [`MIG_PROFILE_BYTES_MAX`] ASCII letters,
/// digits, `.`, `+` and `-`.
pub fn is_mig_profile(profile: &str) -> bool {
    !profile.is_empty()
        && profile.len() <= MIG_PROFILE_BYTES_MAX
        && profile.bytes().all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
}

/// GPU Feature Discovery's infix between a product and its MIG profile under the single
/// strategy (`NVIDIA-A100-SXM4-40GB-MIG-1g.5gb`, GFD `mig-strategy.go`).
pub const MIG_INFIX: &str = "-MIG-";

/// `name` split at [`MIG_INFIX`] (compared as [`lookup`] compares names: ignoring case, `_`
/// and space as `-`) into the product and the profile.
pub fn split_mig(name: &str) -> Option<(&str, &str)> {
    let folded: Vec<u8> = name.bytes().map(fold).collect();
    // Byte for byte, so offsets are the name's; the infix is ASCII, so both cuts fall on char
    // boundaries.
    let at = folded.windows(MIG_INFIX.len()).position(|w| w == MIG_INFIX.as_bytes())?;
    Some((&name[..at], &name[at + MIG_INFIX.len()..]))
}

fn normalize(name: &str) -> String {
    name.trim()
        .chars()
        .map(|c| match c {
            ' ' | '_' => '-',
            other => other.to_ascii_uppercase(),
        })
        .collect()
}

/// Looks a product up by any of its names, ignoring case and `-`/`_`/space differences:
/// the table first, then the products added so far ([`register_unknown`], [`register_mig`],
/// [`register_shared`]). MIG devices and shared replicas are found by any name of their
/// GPU too (GFD's `NVIDIA-A100-SXM4-80GB-SHARED` is the added `A100-SXM4-80GB-SHARED`).
pub fn lookup(name: &str) -> Option<ProductId> {
    let wanted = normalize(name);
    let known = PRODUCTS.iter().position(|product| {
        product.aliases.iter().any(|alias| normalize(alias) == wanted) || normalize(product.name) == wanted
    });
    let index = known.or_else(|| {
        unknown_products().iter().position(|product| normalize(product.name) == wanted).map(|i| PRODUCTS.len() + i)
    });
    if let Some(index) = index {
        return u8::try_from(index).ok().map(ProductId);
    }
    // A derived product written with another name of its GPU (one level: the parent is
    // looked up as a name of the table or an added product).
    if name.len() > PRODUCT_NAME_BYTES_MAX {
        return None;
    }
    let derived = match (split_mig(name), strip_shared(name)) {
        (Some((parent, profile)), _) => format!("{}{MIG_INFIX}{profile}", lookup(parent)?.get().name),
        (None, Some(parent)) => format!("{}{SHARED_SUFFIX}", lookup(parent)?.get().name),
        (None, None) => return None,
    };
    let wanted = normalize(&derived);
    let index = unknown_products().iter().position(|product| normalize(product.name) == wanted)?;
    u8::try_from(PRODUCTS.len() + index).ok().map(ProductId)
}

/// Every accepted name, for error messages that list what would have worked.
pub fn known_names() -> Vec<&'static str> {
    PRODUCTS.iter().map(|product| product.name).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gfd_names_and_aliases_resolve_to_the_same_product() {
        let h100 = lookup("NVIDIA-H100-80GB-HBM3").expect("GFD name");
        assert_eq!(lookup("h100 sxm5"), Some(h100));
        assert_eq!(lookup("H100"), Some(h100));
        assert_eq!(h100.get().memory_mib, 81_559);
        assert_eq!(lookup("Tesla-V100-SXM2-16GB").map(|p| p.get().fabric), Some(Fabric::HybridCubeMesh));
        assert_eq!(lookup("NVIDIA-GB200").map(|p| p.get().fabric), Some(Fabric::MultiNodeNvlink));
        assert_eq!(lookup("NVIDIA-L40S").map(|p| p.get().memory_mib), Some(46_068));
    }

    #[test]
    fn unknown_products_are_added_once_and_ordered_after_the_table_by_name() {
        let b = register_unknown("NVIDIA-Test-Zeta-96GB", 98_304).expect("added");
        let a = register_unknown("nvidia test alpha", 49_152).expect("added");
        assert!(a.is_unknown() && b.is_unknown());
        assert_eq!(a.get().fabric, Fabric::Unknown);
        assert_eq!((a.get().nvlink_gbps, a.get().memory_mib), (0, 49_152));
        assert_eq!(register_unknown("NVIDIA-TEST-ALPHA", 1), Ok(a), "the same product, its first memory kept");
        assert_eq!(lookup("nvidia-test-zeta-96gb"), Some(b));
        let h100 = lookup("H100").expect("table");
        assert_eq!(register_unknown("H100", 1), Ok(h100), "a table product is never added");
        let mut ids = vec![b, h100, a];
        ids.sort();
        assert_eq!(ids, vec![h100, a, b], "table first, then unknown products by name");
        assert_eq!(register_unknown("  ", 1), Err(UnknownProductError::EmptyName));
        assert_eq!(
            register_unknown("NVIDIA-Test-NoMemory", 0),
            Err(UnknownProductError::NoMemory { name: "NVIDIA-Test-NoMemory".into() })
        );
        assert!(matches!(register_unknown(&"X".repeat(200), 1), Err(UnknownProductError::NameTooLong { bytes: 200 })));
    }

    #[test]
    fn shared_replicas_are_a_product_of_their_own_found_by_any_name_of_their_gpu() {
        let t4 = lookup("T4").expect("T4");
        let shared = register_shared(t4).expect("replicas");
        assert_eq!((shared.get().name, shared.shared_parent(), shared.whole_gpu()), ("T4-SHARED", Some(t4), t4));
        assert_eq!(register_shared(t4), Ok(shared), "added once");
        for name in ["Tesla-T4-SHARED", "tesla_t4_shared", "T4 SHARED"] {
            assert_eq!(lookup(name), Some(shared), "{name}");
        }
        assert_eq!(strip_shared("Foo_shared "), Some("Foo"));
        assert_eq!(strip_shared("SHARED"), None);
        assert!(matches!(register_shared(shared), Err(UnknownProductError::NotShareable { .. })));
        // A whole GPU never takes a derived product's name, whichever node comes first.
        for name in [
            "NVIDIA-Test-Shared-GPU-SHARED",
            "NVIDIA-Test-Shared-GPU_SHARED",
            "NVIDIA-Test-Y-MIG-1g.10gb",
            "H100-SXM5_MIG_1g.10gb",
            "H100 MIG 1g.10gb",
        ] {
            assert!(matches!(register_unknown(name, 1024), Err(UnknownProductError::DerivedName { .. })), "{name}");
        }
        let whole = register_unknown("NVIDIA-Test-Shared-GPU", 24_576).expect("a whole GPU");
        let replicas = register_shared(whole).expect("its replicas");
        assert_eq!(replicas.get().name, "NVIDIA-Test-Shared-GPU-SHARED");
        assert!(matches!(
            register_unknown("NVIDIA-Test-Shared-GPU-SHARED", 1024),
            Err(UnknownProductError::DerivedName { .. })
        ));
    }

    #[test]
    fn unknown_names_are_not_guessed() {
        assert_eq!(lookup("H1000"), None);
        assert_eq!(lookup(""), None);
    }

    #[test]
    fn no_alias_names_two_products() {
        let mut seen = std::collections::HashMap::new();
        for (index, product) in PRODUCTS.iter().enumerate() {
            for alias in product.aliases.iter().chain(std::iter::once(&product.name)) {
                if let Some(previous) = seen.insert(normalize(alias), index) {
                    assert_eq!(previous, index, "alias {alias} names two products");
                }
            }
        }
    }
}
