//! The GPU product table: what each GPU model brings (memory, intra-host fabric, link
//! bandwidths), keyed by the names NVIDIA GPU Feature Discovery writes in
//! `nvidia.com/gpu.product`, plus short aliases people type by hand.
//!
//! Memory is in MiB as NVML (and so GFD's `nvidia.com/gpu.memory`) reports it, not the
//! marketing figure: an "80 GB" H100 reports 81,559 MiB, so a floor of `80Gi` (81,920 MiB)
//! does not fit it. That is deliberate: the floor is about what a model can actually use.

use std::fmt;

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

/// Identifies a product by its position in [`PRODUCTS`]; cheap to copy and compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProductId(pub u8);

impl ProductId {
    pub fn get(self) -> &'static GpuProduct {
        &PRODUCTS[usize::from(self.0)]
    }
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

/// Looks a product up by any of its names, ignoring case and `-`/`_`/space differences.
pub fn lookup(name: &str) -> Option<ProductId> {
    let wanted = normalize(name);
    PRODUCTS
        .iter()
        .position(|product| {
            product.aliases.iter().any(|alias| normalize(alias) == wanted) || normalize(product.name) == wanted
        })
        .and_then(|index| u8::try_from(index).ok())
        .map(ProductId)
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
