//! Scoring of a candidate placement. Four components, each in 0..=1 (higher is better),
//! combined by configurable weights; every component is reported so a placement can be
//! explained against its runner-up.
//!
//! - locality: how small the domain holding the whole gang is (host > NVLink clique >
//!   innermost level > ... > cluster), halved when a preferred scope is missed;
//! - memory: the gang's per-GPU floor over the GPU's memory (the smallest class that
//!   fits wins; 1.0 when the gang states no floor, except on MIG devices: `memory_fit`);
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

/// Shapes used when no workload mix is known: whole hosts, TP-4 quads (NVLink-connected where
/// the host's NVLink can hold four), single GPUs and room for a two-host replica in one rack.
pub fn default_shapes() -> Vec<WeightedShape> {
    vec![
        WeightedShape { shape: FreeShape::WholeHost, weight: 1.0 },
        WeightedShape { shape: FreeShape::Units(UnitShape { unit_gpus: 4, atom: 4 }), weight: 1.0 },
        WeightedShape { shape: FreeShape::Units(UnitShape { unit_gpus: 1, atom: 1 }), weight: 1.0 },
        WeightedShape { shape: FreeShape::RackRoom { hosts: 2 }, weight: 1.0 },
    ]
}

/// GPUs per host assumed when a multi-host gang is turned into a rack-room shape.
pub const TYPICAL_HOST_GPUS: u64 = 8;

/// Slots of `shape` a gang of `key` asks for: its units of its own unit shape (up to
/// [`TYPICAL_HOST_GPUS`] GPUs); above that, one rack room of its host count and that many
/// whole hosts. 0 for every other shape.
pub fn slots_asked(key: &DemandKey, shape: FreeShape) -> u64 {
    if key.total_gpus > TYPICAL_HOST_GPUS {
        let hosts = key.total_gpus.div_ceil(TYPICAL_HOST_GPUS);
        match shape {
            FreeShape::RackRoom { hosts: room } if u64::from(room) == hosts => 1,
            FreeShape::WholeHost => hosts,
            _ => 0,
        }
    } else {
        match shape {
            FreeShape::Units(unit) if unit == key.unit => key.total_gpus / u64::from(unit.unit_gpus.max(1)),
            _ => 0,
        }
    }
}

/// The shapes a workload mix asks for, weighted by the GPUs each asks for, plus whole
/// hosts (half the weight) which every large replica needs.
pub fn shapes_for(gangs: &[Gang]) -> Vec<WeightedShape> {
    shapes_from(gangs.iter().map(|g| (DemandKey::of(g), 1.0)))
}

/// What a gang asks of the free capacity, for the fragmentation score: its GPUs in all and
/// the unit one host must hold (a member, or a tensor-parallel group spanning members).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DemandKey {
    pub total_gpus: u64,
    pub unit: UnitShape,
}

impl DemandKey {
    pub fn of(gang: &Gang) -> Self {
        DemandKey {
            total_gpus: gang.total_gpus(),
            unit: UnitShape { unit_gpus: gang.unit_gpus(), atom: gang.tensor_parallel.min(gang.unit_gpus()) },
        }
    }
}

/// Shapes from demand entries (a key and how many gangs of it, possibly fractional): each
/// entry's share is its GPUs x count over the total. A gang above [`TYPICAL_HOST_GPUS`] asks
/// for rack room (and whole hosts at half its share), a smaller one for its unit; whole hosts
/// get 0.5 more. No entries (or none with weight): [`default_shapes`].
pub fn shapes_from(entries: impl Iterator<Item = (DemandKey, f64)> + Clone) -> Vec<WeightedShape> {
    let total: f64 = entries.clone().map(|(key, count)| key.total_gpus as f64 * count).sum();
    if total <= 0.0 || !total.is_finite() {
        return default_shapes();
    }
    let mut shapes: Vec<WeightedShape> = Vec::new();
    let mut add = |shape: FreeShape, weight: f64| match shapes.iter_mut().find(|s| s.shape == shape) {
        Some(existing) => existing.weight += weight,
        None => shapes.push(WeightedShape { shape, weight }),
    };
    for (key, count) in entries {
        let share = key.total_gpus as f64 * count / total;
        if share <= 0.0 {
            continue;
        }
        if key.total_gpus > TYPICAL_HOST_GPUS {
            let hosts = key.total_gpus.div_ceil(TYPICAL_HOST_GPUS).min(u64::from(u32::MAX)) as u32;
            add(FreeShape::RackRoom { hosts }, share);
            add(FreeShape::WholeHost, share / 2.0);
        } else {
            add(FreeShape::Units(key.unit), share);
        }
    }
    add(FreeShape::WholeHost, 0.5);
    shapes
}

/// Demand kinds a [`Demand`] remembers at most; past it the faintest is forgotten.
pub const DEMAND_KEYS_MAX: usize = 256;

/// The demand the fragmentation score protects, online: the gangs waiting now and the gangs
/// asked for recently, each arrival's weight halving every `half_life_s` seconds. It never
/// sees the future: a replay records each job as it arrives. Deterministic for the same
/// calls (times in seconds on the caller's clock; a time earlier than the last is taken as
/// the last).
#[derive(Debug, Clone)]
pub struct Demand {
    half_life_s: f64,
    at_s: u64,
    recent: Vec<(DemandKey, f64)>,
}

impl Demand {
    /// A history with this half-life (seconds, at least 1).
    pub fn new(half_life_s: u64) -> Self {
        Demand { half_life_s: half_life_s.max(1) as f64, at_s: 0, recent: Vec::new() }
    }

    fn decay_to(&mut self, now_s: u64) {
        if now_s > self.at_s {
            let factor = 0.5f64.powf((now_s - self.at_s) as f64 / self.half_life_s);
            for entry in &mut self.recent {
                entry.1 *= factor;
            }
            self.recent.retain(|entry| entry.1 > 1e-6);
            self.at_s = now_s;
        }
    }

    /// A gang of `key` ([`DemandKey::of`]) was asked for at `now_s`.
    pub fn record(&mut self, key: DemandKey, now_s: u64) {
        self.decay_to(now_s);
        match self.recent.iter_mut().find(|entry| entry.0 == key) {
            Some(entry) => entry.1 += 1.0,
            None => {
                if self.recent.len() == DEMAND_KEYS_MAX {
                    if let Some(faintest) =
                        (0..self.recent.len()).min_by(|&a, &b| self.recent[a].1.total_cmp(&self.recent[b].1))
                    {
                        self.recent.swap_remove(faintest);
                    }
                }
                self.recent.push((key, 1.0));
            }
        }
    }

    /// The shapes to protect at `now_s` with `waiting` in the queue (each counting as one
    /// fresh arrival on top of the history): [`shapes_from`] of both.
    pub fn shapes(&mut self, waiting: &[DemandKey], now_s: u64) -> Vec<WeightedShape> {
        self.decay_to(now_s);
        let mut entries = self.recent.clone();
        for key in waiting {
            match entries.iter_mut().find(|entry| entry.0 == *key) {
                Some(entry) => entry.1 += 1.0,
                None => entries.push((*key, 1.0)),
            }
        }
        shapes_from(entries.into_iter())
    }
}

/// Whole free hosts per innermost domain, computed once per placement call.
/// The memory component over `hosts`: the gang's per-GPU floor over the smallest GPU memory
/// among them. Without a floor, 1.0, except on MIG devices and shared replicas: a gang that
/// states no need is taken to want a whole GPU, so a device scores the share of its GPU's
/// memory it has (a `2g.20gb` device of an H100: 0.24; one of 4 replicas: 0.25), and whole
/// GPUs win unless a floor says a device fits.
pub fn memory_fit(cluster: &Cluster, floor_mib: u64, hosts: impl Iterator<Item = HostId>) -> f64 {
    let hosts: Vec<&crate::topology::Host> = hosts.map(|h| cluster.host(h)).collect();
    if floor_mib == 0 {
        hosts
            .iter()
            .filter(|host| host.partitioned())
            .map(|host| {
                let whole = host.product.whole_gpu().get().memory_mib;
                (host.memory_mib as f64 / whole.max(1) as f64).min(1.0)
            })
            .fold(1.0, f64::min)
    } else {
        let smallest = hosts.iter().map(|host| host.memory_mib).min().unwrap_or(1);
        floor_mib as f64 / smallest.max(1) as f64
    }
}

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
            if ledger.used(index as HostId) == 0 && host.whole_host_slot() {
                cluster_total += 1;
                if let Some(&leaf) = host.domain_path.last() {
                    per_leaf_domain[leaf as usize] += 1;
                }
            }
        }
        let host_gpus_max =
            cluster.hosts.iter().filter(|h| h.whole_host_slot()).map(|h| u32::from(h.gpu_count)).max().unwrap_or(1);
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
                .filter(|&&(host_id, mask)| {
                    mask != 0 && ledger.used(host_id) == 0 && cluster.host(host_id).whole_host_slot()
                })
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
        if mask == 0 || ledger.used(host_id) != 0 || !cluster.host(host_id).whole_host_slot() {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::GangSpec;

    fn key(members: u32, gpus: u32) -> DemandKey {
        DemandKey::of(&GangSpec::shape("g", members, gpus, gpus).expand().remove(0))
    }

    fn weight(shapes: &[WeightedShape], shape: FreeShape) -> f64 {
        shapes.iter().find(|s| s.shape == shape).map_or(0.0, |s| s.weight)
    }

    #[test]
    fn demand_halves_each_half_life_and_counts_the_waiting_on_top() {
        let one = key(1, 1);
        let eight = key(1, 8);
        let units = |k: DemandKey| FreeShape::Units(k.unit);
        let mut demand = Demand::new(100);
        assert_eq!(demand.shapes(&[], 0), default_shapes(), "nothing asked: the default shapes");
        demand.record(eight, 0);
        demand.record(one, 100);
        // At 100 s: the 8-GPU arrival weighs 1/2 (8 x 0.5 = 4 GPUs), the 1-GPU one 1 (1 GPU).
        let shapes = demand.shapes(&[], 100);
        assert!((weight(&shapes, units(eight)) - 4.0 / 5.0).abs() < 1e-9, "{shapes:?}");
        assert!((weight(&shapes, units(one)) - 1.0 / 5.0).abs() < 1e-9);
        assert!((weight(&shapes, FreeShape::WholeHost) - 0.5).abs() < 1e-9);
        // Four 1-GPU jobs waiting count 4 on top of the history: 4 + 1 = 5 GPUs against 4.
        let shapes = demand.shapes(&[one; 4], 100);
        assert!((weight(&shapes, units(one)) - 5.0 / 9.0).abs() < 1e-9, "{shapes:?}");
        // Much later the history has faded: only the waiting count.
        let shapes = demand.shapes(&[eight], 100_000);
        assert!((weight(&shapes, units(eight)) - 1.0).abs() < 1e-9, "{shapes:?}");
        assert_eq!(weight(&shapes, units(one)), 0.0, "forgotten entirely");
        // A time before the last is taken as the last: nothing grows back.
        assert_eq!(demand.shapes(&[], 5), default_shapes());
    }

    #[test]
    fn demand_remembers_at_most_its_limit_of_kinds() {
        let mut demand = Demand::new(1_000_000);
        for members in 1..=(DEMAND_KEYS_MAX as u32 + 10) {
            // Each kind once (8 GPUs per member), the earlier ones fading: the faintest go.
            demand.record(key(members, 8), u64::from(members) * 1000);
        }
        assert_eq!(demand.recent.len(), DEMAND_KEYS_MAX);
        let kept: Vec<u64> = demand.recent.iter().map(|(k, _)| k.total_gpus).collect();
        assert!(!kept.contains(&8), "the first and faintest kind went");
        assert!(kept.contains(&(8 * (DEMAND_KEYS_MAX as u64 + 10))), "the last stays");
    }

    #[test]
    fn shapes_for_is_the_demand_of_each_gang_once_and_slots_follow_the_shapes() {
        let gangs: Vec<Gang> =
            [(1, 1), (2, 8), (1, 4)].iter().map(|&(m, g)| GangSpec::shape("g", m, g, g).expand().remove(0)).collect();
        let from_keys = shapes_from(gangs.iter().map(|g| (DemandKey::of(g), 1.0)));
        assert_eq!(shapes_for(&gangs), from_keys);
        assert!(weight(&from_keys, FreeShape::RackRoom { hosts: 2 }) > 0.0);
        let sixteen = key(2, 8);
        assert_eq!(slots_asked(&sixteen, FreeShape::RackRoom { hosts: 2 }), 1);
        assert_eq!(slots_asked(&sixteen, FreeShape::RackRoom { hosts: 3 }), 0);
        assert_eq!(slots_asked(&sixteen, FreeShape::WholeHost), 2);
        let four = key(1, 4);
        assert_eq!(slots_asked(&four, FreeShape::Units(four.unit)), 1);
        assert_eq!(slots_asked(&four, FreeShape::WholeHost), 0);
        assert_eq!(slots_asked(&key(1, 1), FreeShape::Units(four.unit)), 0);
    }
}
