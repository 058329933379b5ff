//! Scoring of a candidate placement. Four components, each in 0..=1 (higher is better),
//! combined by configurable weights; every component is reported so a placement can be
//! explained against its runner-up.
//!
//! - locality: how small the domain holding the whole gang is (host > NVLink clique >
//!   innermost level > ... > cluster), halved when a preferred scope is missed;
//! - memory: the gang's per-GPU floor over the GPU's memory (the smallest class that
//!   fits wins; 1.0 when the gang states no floor);
//! - fragmentation: for each free shape the workload mix asks for, 1 minus the shape
//!   capacity destroyed beyond what the gang uses, per `max(GPUs used, shape size)`
//!   (taking 4 GPUs from an empty 8-GPU host destroys a whole-host slot, 4 GPUs more than
//!   it uses: 0.5 for that shape). Linear in what is destroyed, so the exact solver can
//!   optimise the very same number; it goes below 0 when a gang shatters several slots;
//! - connectivity: the chosen tensor-parallel groups' weakest link against the host's
//!   best, and how many of the host's remaining free GPUs keep an NVLink neighbour.

use super::gpus::{GpuChooser, UnitShape};
use crate::ledger::GpuUse;
use crate::topology::{Cluster, GpuMask, HostId};
use crate::workload::Gang;

#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Weights {
    pub locality: f64,
    pub memory: f64,
    pub fragmentation: f64,
    pub connectivity: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Weights { locality: 4.0, memory: 2.0, fragmentation: 2.0, connectivity: 1.0 }
    }
}

impl Weights {
    /// Parses `locality=4,memory=2,...`; names not given keep their defaults.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut weights = Weights::default();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, value) = part.split_once('=').ok_or_else(|| format!("weight `{part}` is not NAME=VALUE"))?;
            let value: f64 = value
                .trim()
                .parse()
                .ok()
                .filter(|v: &f64| v.is_finite() && *v >= 0.0)
                .ok_or_else(|| format!("weight `{part}`: value must be a number >= 0"))?;
            match name.trim() {
                "locality" => weights.locality = value,
                "memory" => weights.memory = value,
                "fragmentation" => weights.fragmentation = value,
                "connectivity" => weights.connectivity = value,
                other => {
                    return Err(format!(
                        "unknown weight `{other}` (expected locality, memory, fragmentation, connectivity)"
                    ))
                }
            }
        }
        Ok(weights)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct ScoreComponents {
    pub locality: f64,
    pub memory: f64,
    pub fragmentation: f64,
    pub connectivity: f64,
    pub total: f64,
}

impl ScoreComponents {
    pub fn combine(weights: &Weights, locality: f64, memory: f64, fragmentation: f64, connectivity: f64) -> Self {
        let total = weights.locality * locality
            + weights.memory * memory
            + weights.fragmentation * fragmentation
            + weights.connectivity * connectivity;
        ScoreComponents { locality, memory, fragmentation, connectivity, total }
    }
}

/// A free shape whose survival the fragmentation score protects.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FreeShape {
    /// Units of this shape inside one host.
    Units(UnitShape),
    /// A host with all its GPUs free.
    WholeHost,
    /// `hosts` whole free hosts in one innermost domain (room for a multi-host replica).
    RackRoom { hosts: u32 },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WeightedShape {
    pub shape: FreeShape,
    pub weight: f64,
}

/// Shapes used when no workload mix is known: whole hosts, NVLink quads, single GPUs and
/// room for a two-host replica in one rack.
pub fn default_shapes() -> Vec<WeightedShape> {
    vec![
        WeightedShape { shape: FreeShape::WholeHost, weight: 1.0 },
        WeightedShape { shape: FreeShape::Units(UnitShape { unit_gpus: 4, atom: 4 }), weight: 1.0 },
        WeightedShape { shape: FreeShape::Units(UnitShape { unit_gpus: 1, atom: 1 }), weight: 1.0 },
        WeightedShape { shape: FreeShape::RackRoom { hosts: 2 }, weight: 1.0 },
    ]
}

/// GPUs per host assumed when a multi-host gang is turned into a rack-room shape.
const TYPICAL_HOST_GPUS: u64 = 8;

/// The shapes a workload mix asks for, weighted by the GPUs each asks for, plus whole
/// hosts (half the weight) which every large replica needs.
pub fn shapes_for(gangs: &[Gang]) -> Vec<WeightedShape> {
    if gangs.is_empty() {
        return default_shapes();
    }
    let mut shapes: Vec<WeightedShape> = Vec::new();
    let mut add = |shape: FreeShape, weight: f64| match shapes.iter_mut().find(|s| s.shape == shape) {
        Some(existing) => existing.weight += weight,
        None => shapes.push(WeightedShape { shape, weight }),
    };
    let total: f64 = gangs.iter().map(|g| g.total_gpus() as f64).sum();
    for gang in gangs {
        let share = gang.total_gpus() as f64 / total;
        if gang.total_gpus() > TYPICAL_HOST_GPUS {
            let hosts = gang.total_gpus().div_ceil(TYPICAL_HOST_GPUS).min(u64::from(u32::MAX)) as u32;
            add(FreeShape::RackRoom { hosts }, share);
            add(FreeShape::WholeHost, share / 2.0);
        } else {
            let unit = UnitShape { unit_gpus: gang.unit_gpus(), atom: gang.tensor_parallel.min(gang.unit_gpus()) };
            add(FreeShape::Units(unit), share);
        }
    }
    add(FreeShape::WholeHost, 0.5);
    shapes
}

/// Whole free hosts per innermost domain, computed once per placement call.
#[derive(Debug, Clone)]
pub struct WholeFreeIndex {
    pub per_leaf_domain: Vec<u32>,
    pub cluster_total: u32,
    /// GPUs of the largest host: the size of the whole-host and rack-room shapes.
    pub host_gpus_max: u32,
}

impl WholeFreeIndex {
    pub fn new(cluster: &Cluster, ledger: &impl AsRef<GpuUse>) -> Self {
        let ledger = ledger.as_ref();
        let leaf_domains = cluster.domains.last().map_or(0, Vec::len);
        let mut per_leaf_domain = vec![0; leaf_domains];
        let mut cluster_total = 0;
        for (index, host) in cluster.hosts.iter().enumerate() {
            if ledger.used(index as HostId) == 0 {
                cluster_total += 1;
                if let Some(&leaf) = host.domain_path.last() {
                    per_leaf_domain[leaf as usize] += 1;
                }
            }
        }
        let host_gpus_max = cluster.hosts.iter().map(|h| u32::from(h.gpu_count)).max().unwrap_or(1);
        WholeFreeIndex { per_leaf_domain, cluster_total, host_gpus_max }
    }
}

/// Fragmentation component for taking `taken[i].1` GPUs on host `taken[i].0`.
pub fn fragmentation(
    cluster: &Cluster,
    ledger: &impl AsRef<GpuUse>,
    chooser: &mut GpuChooser,
    whole_free: &WholeFreeIndex,
    shapes: &[WeightedShape],
    taken: &[(HostId, GpuMask)],
) -> f64 {
    let ledger = ledger.as_ref();
    let used_gpus: u64 = taken.iter().map(|&(_, mask)| u64::from(mask.count_ones())).sum();
    if used_gpus == 0 {
        return 1.0;
    }
    let mut weighted = 0.0;
    let mut weight_sum = 0.0;
    for shape in shapes {
        let lost_gpus: u64 = match shape.shape {
            FreeShape::Units(unit) => taken
                .iter()
                .map(|&(host_id, mask)| {
                    let host = cluster.host(host_id);
                    let free = ledger.free(host_id);
                    let before = chooser.unit_count(host, free, unit);
                    let after = chooser.unit_count(host, free & !mask, unit);
                    u64::from(before.saturating_sub(after)) * u64::from(unit.unit_gpus)
                })
                .sum(),
            FreeShape::WholeHost => taken
                .iter()
                .filter(|&&(host_id, mask)| mask != 0 && ledger.used(host_id) == 0)
                .map(|&(host_id, _)| u64::from(cluster.host(host_id).gpu_count))
                .sum(),
            FreeShape::RackRoom { hosts } => rack_room_lost(cluster, ledger, whole_free, taken, hosts),
        };
        weighted += shape.weight * shape_score(lost_gpus as f64, used_gpus as f64, shape_gpus(shape.shape, whole_free));
        weight_sum += shape.weight;
    }
    if weight_sum > 0.0 {
        weighted / weight_sum
    } else {
        1.0
    }
}

/// GPUs of one slot of a shape.
pub fn shape_gpus(shape: FreeShape, whole_free: &WholeFreeIndex) -> f64 {
    match shape {
        FreeShape::Units(unit) => f64::from(unit.unit_gpus),
        FreeShape::WholeHost => f64::from(whole_free.host_gpus_max),
        FreeShape::RackRoom { hosts } => f64::from(hosts.max(1)) * f64::from(whole_free.host_gpus_max),
    }
}

/// One shape's fragmentation score: 1 minus the capacity destroyed beyond what is used,
/// per `max(used, shape size)`.
pub fn shape_score(lost_gpus: f64, used_gpus: f64, shape_gpus: f64) -> f64 {
    1.0 - (lost_gpus - used_gpus).max(0.0) / used_gpus.max(shape_gpus).max(1.0)
}

fn rack_room_lost(
    cluster: &Cluster,
    ledger: &GpuUse,
    whole_free: &WholeFreeIndex,
    taken: &[(HostId, GpuMask)],
    hosts: u32,
) -> u64 {
    let hosts = hosts.max(1);
    let host_gpus = u64::from(whole_free.host_gpus_max);
    // Whole free hosts broken per innermost domain (or per cluster without levels).
    let mut broken: Vec<(Option<u32>, u32)> = Vec::new();
    for &(host_id, mask) in taken {
        if mask == 0 || ledger.used(host_id) != 0 {
            continue;
        }
        let leaf = cluster.host(host_id).domain_path.last().copied();
        match broken.iter_mut().find(|(domain, _)| *domain == leaf) {
            Some(entry) => entry.1 += 1,
            None => broken.push((leaf, 1)),
        }
    }
    broken
        .into_iter()
        .map(|(leaf, count)| {
            let before = leaf.map_or(whole_free.cluster_total, |d| whole_free.per_leaf_domain[d as usize]);
            let after = before.saturating_sub(count);
            u64::from(before / hosts - after / hosts) * u64::from(hosts) * host_gpus
        })
        .sum()
}
