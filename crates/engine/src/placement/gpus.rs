//! Choosing concrete GPU indices inside one host, and counting how many units of a
//! shape a host's free GPUs still hold.
//!
//! A *unit* is `unit_gpus` GPUs made of `unit_gpus / atom` *atoms*; an atom is one
//! tensor-parallel group and must be NVLink-connected (atom 1: any single GPU), on every host
//! whose NVLink can hold a group of that size. Elsewhere (PCIe-only hosts such as L4, L40S and
//! A10; a TP-4 group on bridged pairs) the group runs over PCIe: any GPUs form it, scored by
//! the bandwidth between them ([`UnitShape::on_host`]). On hosts
//! whose GPUs are all linked alike (NVSwitch) every choice is equivalent, so the fast path
//! only keeps units on one CPU socket. On hosts with uneven links (bridged pairs, DGX-1
//! cube-mesh, explicit groups, PCIe) the choice decides this gang's bandwidth and what
//! remains for the next one, so it is searched exhaustively under a node budget.

use std::collections::HashMap;

use crate::topology::graph::nvlink_connected;
use crate::topology::{GpuMask, Host};

/// Search nodes per host choice before falling back to the greedy answer.
const SEARCH_NODES_MAX: usize = 20_000;
/// Hosts with more free GPUs than this are never searched exhaustively.
const SEARCH_GPUS_MAX: u32 = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UnitShape {
    pub unit_gpus: u32,
    /// GPUs per tensor-parallel group, NVLink-connected where the host can
    /// ([`UnitShape::on_host`]); 1 without tensor parallelism.
    pub atom: u32,
}

impl UnitShape {
    pub fn atoms_per_unit(self) -> u32 {
        self.unit_gpus / self.atom
    }

    /// The shape as `host` can honour it. A tensor-parallel group larger than the host's
    /// largest NVLink-connected set of GPUs (every group on a PCIe-only host; a TP-4 group on
    /// bridged pairs) runs over PCIe, as vLLM and NCCL allow: any GPUs of the host form it
    /// (atom 1), and each group's quality is its weakest link ([`unit_quality`]: one socket
    /// beats two). Groups the host's NVLink can hold keep atoms NVLink-connected. A gang that asks
    /// for `required: nvlink` refuses such hosts before any unit is counted.
    pub fn on_host(self, host: &Host) -> UnitShape {
        if self.atom >= 2 && self.atom > host.links.largest_nvlink_group {
            UnitShape { atom: 1, ..self }
        } else {
            self
        }
    }
}

/// One chosen unit: its atoms (tensor-parallel groups) as GPU masks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChosenUnit {
    pub atoms: Vec<GpuMask>,
}

impl ChosenUnit {
    pub fn gpus(&self) -> GpuMask {
        self.atoms.iter().fold(0, |mask, atom| mask | atom)
    }
}

fn bits(mask: GpuMask) -> impl Iterator<Item = u8> {
    let mut rest = mask;
    std::iter::from_fn(move || {
        (rest != 0).then(|| {
            let bit = rest.trailing_zeros() as u8;
            rest &= rest - 1;
            bit
        })
    })
}

/// Whether [`GpuChooser::choices`] with `limit`, having returned `returned` choices, listed
/// every distinct choice: false when it may have cut the list (its limit reached, or a host
/// with too many free GPUs to search, answered with one choice although links are uneven).
pub(crate) fn choices_complete(host: &Host, free: GpuMask, shape: UnitShape, returned: usize, limit: usize) -> bool {
    links_are_uniform(host, shape) || (free.count_ones() <= SEARCH_GPUS_MAX && returned < limit)
}

/// Every choice of GPUs is as good as another for links.
pub(crate) fn links_are_uniform(host: &Host, shape: UnitShape) -> bool {
    let shape = shape.on_host(host);
    host.links.uniform_nvlink || host.gpu_count == 1 || (shape.atom == 1 && host.links.best_nvlink_gbps == 0)
}

/// Smallest pairwise bandwidth inside `set`, relative to the host's best pair (1.0 for a
/// single GPU).
pub fn set_quality(host: &Host, set: GpuMask) -> f64 {
    if set.count_ones() < 2 {
        return 1.0;
    }
    let best = host.links.bandwidth_gbps.iter().copied().max().unwrap_or(0).max(1);
    let mut worst = u32::MAX;
    for a in bits(set) {
        for b in bits(set) {
            if a < b {
                worst = worst.min(host.links.bandwidth(host.gpu_count, a, b));
            }
        }
    }
    f64::from(worst) / f64::from(best)
}

/// The factor on a tensor-parallel group that runs over PCIe ([`UnitShape::on_host`]): its
/// weakest link against the host's best pair, halved. NVLink moves a group's all-reduce several
/// times faster (900 GB/s against 64 to 128 GB/s per GPU), so on a PCIe-only host a group on
/// one socket scores 0.5 and one across sockets less; on bridged pairs a group spanning pairs
/// scores far below a pair. Like every connectivity figure it is relative to the host's own
/// best pair, so across products it orders hosts only roughly.
pub const PCIE_GROUP_QUALITY: f64 = 0.5;

/// Quality of a chosen unit in 0..=1: its weakest tensor-parallel group (or, without tensor
/// parallelism, the weakest pair of the unit's GPUs), against the host's best pair; a
/// tensor-parallel group over PCIe counts [`PCIE_GROUP_QUALITY`] of that, its groups taken
/// as the unit's GPUs in index order (socket by socket).
pub fn unit_quality(host: &Host, unit: &ChosenUnit, shape: UnitShape) -> f64 {
    let on_host = shape.on_host(host);
    if on_host.atom >= 2 {
        unit.atoms.iter().map(|&atom| set_quality(host, atom)).fold(1.0, f64::min)
    } else if shape.atom >= 2 {
        let gpus: Vec<u8> = bits(unit.gpus()).collect();
        let weakest = gpus
            .chunks(shape.atom as usize)
            .map(|group| set_quality(host, group.iter().fold(0, |mask, &gpu| mask | (1u64 << gpu))))
            .fold(1.0, f64::min);
        PCIE_GROUP_QUALITY * weakest
    } else {
        set_quality(host, unit.gpus())
    }
}

/// Share of free GPUs that still have a free NVLink neighbour: 1.0 when nothing is left
/// stranded without NVLink (and on hosts that have no NVLink to lose).
pub fn remaining_connectivity(host: &Host, free: GpuMask) -> f64 {
    if host.links.best_nvlink_gbps == 0 || free.count_ones() < 2 || host.links.uniform_nvlink {
        return 1.0;
    }
    let linked = bits(free).filter(|&gpu| host.links.nvlink_neighbors[usize::from(gpu)] & free != 0).count();
    linked as f64 / f64::from(free.count_ones())
}

/// All NVLink-connected `size`-subsets of `free` (singletons for size 1), ascending.
fn atoms_of(host: &Host, free: GpuMask, size: u32) -> Vec<GpuMask> {
    let mut atoms = Vec::new();
    if size == 1 {
        atoms.extend(bits(free).map(|gpu| 1u64 << gpu));
        return atoms;
    }
    let gpus: Vec<u8> = bits(free).collect();
    if (gpus.len() as u32) < size {
        return atoms;
    }
    // Grow subsets in index order; a subset is kept when it is connected at full size.
    fn grow(host: &Host, gpus: &[u8], start: usize, size: u32, current: GpuMask, out: &mut Vec<GpuMask>) {
        if current.count_ones() == size {
            if nvlink_connected(&host.links, current) {
                out.push(current);
            }
            return;
        }
        let missing = (size - current.count_ones()) as usize;
        for index in start..gpus.len() {
            if gpus.len() - index < missing {
                break;
            }
            grow(host, gpus, index + 1, size, current | (1u64 << gpus[index]), out);
        }
    }
    grow(host, &gpus, 0, size, 0, &mut atoms);
    atoms
}

/// Counts and choices, with a memo of packing counts per host link layout.
#[derive(Debug, Default)]
pub struct GpuChooser {
    layouts: HashMap<Vec<GpuMask>, u32>,
    packing: HashMap<(u32, u32, GpuMask), u32>,
}

impl GpuChooser {
    fn layout_id(&mut self, host: &Host) -> u32 {
        let next = self.layouts.len() as u32;
        *self.layouts.entry(host.links.nvlink_neighbors.clone()).or_insert(next)
    }

    /// How many disjoint units of `shape` fit in `free`.
    pub fn unit_count(&mut self, host: &Host, free: GpuMask, shape: UnitShape) -> u32 {
        if shape.unit_gpus == 0 || shape.unit_gpus > u32::from(host.gpu_count) {
            return 0;
        }
        // A MIG device is all a CUDA process sees, and replicas of a shared GPU are no more GPU
        // together: no unit of several on such a host.
        if host.partitioned() && shape.unit_gpus > 1 {
            return 0;
        }
        let shape = shape.on_host(host);
        if links_are_uniform(host, shape) || shape.atom == 1 {
            return free.count_ones() / shape.unit_gpus;
        }
        let atoms = self.max_disjoint_atoms(host, free, shape.atom);
        atoms / shape.atoms_per_unit()
    }

    fn max_disjoint_atoms(&mut self, host: &Host, free: GpuMask, atom: u32) -> u32 {
        if free.count_ones() > SEARCH_GPUS_MAX {
            return greedy_atoms(host, free, atom, u32::MAX).len() as u32;
        }
        let layout = self.layout_id(host);
        self.packing_memo(host, layout, free, atom)
    }

    fn packing_memo(&mut self, host: &Host, layout: u32, free: GpuMask, atom: u32) -> u32 {
        if free.count_ones() < atom {
            return 0;
        }
        if let Some(&known) = self.packing.get(&(layout, atom, free)) {
            return known;
        }
        // Either the lowest free GPU is in no atom, or it is in one of the atoms through it.
        let lowest = free & free.wrapping_neg();
        let mut best = self.packing_memo(host, layout, free & !lowest, atom);
        for candidate in atoms_of(host, free, atom) {
            if candidate & lowest != 0 {
                best = best.max(1 + self.packing_memo(host, layout, free & !candidate, atom));
            }
        }
        self.packing.insert((layout, atom, free), best);
        best
    }

    /// Chooses `count` units from `free`, best first; `None` when they do not fit.
    pub fn choose(&mut self, host: &Host, free: GpuMask, count: u32, shape: UnitShape) -> Option<Vec<ChosenUnit>> {
        if count == 0 {
            return Some(Vec::new());
        }
        let shape = shape.on_host(host);
        if self.unit_count(host, free, shape) < count {
            return None;
        }
        if links_are_uniform(host, shape) {
            return Some(choose_on_sockets(host, free, count, shape));
        }
        if free.count_ones() <= SEARCH_GPUS_MAX {
            if let Some(best) = self.choices(host, free, count, shape, 1).into_iter().next() {
                return Some(best);
            }
        }
        let atoms = greedy_atoms(host, free, shape.atom, count * shape.atoms_per_unit());
        (atoms.len() as u32 == count * shape.atoms_per_unit()).then(|| {
            atoms.chunks(shape.atoms_per_unit() as usize).map(|chunk| ChosenUnit { atoms: chunk.to_vec() }).collect()
        })
    }

    /// Distinct ways to take `count` units from `free`, at most `limit`, best first: one
    /// on uniformly linked hosts, where all are equivalent; on uneven hosts every
    /// combination of atoms (up to the search budget), ranked by the same local measure
    /// as [`GpuChooser::choose`], so that an exact solver chooses the GPU sets itself.
    pub fn choices(
        &mut self,
        host: &Host,
        free: GpuMask,
        count: u32,
        shape: UnitShape,
        limit: usize,
    ) -> Vec<Vec<ChosenUnit>> {
        let shape = shape.on_host(host);
        if links_are_uniform(host, shape) || free.count_ones() > SEARCH_GPUS_MAX {
            return self.choose(host, free, count, shape).into_iter().collect();
        }
        let atoms = atoms_of(host, free, shape.atom);
        let total = count as usize * shape.atoms_per_unit() as usize;
        let mut found: Vec<Vec<GpuMask>> = Vec::new();
        let mut chosen = Vec::new();
        collect_atom_sets(&atoms, 0, 0, total, &mut chosen, &mut |set: &[GpuMask]| {
            found.push(set.to_vec());
            found.len() < SEARCH_NODES_MAX
        });
        let mut ranked: Vec<(f64, Vec<ChosenUnit>)> = found
            .into_iter()
            .map(|set| {
                let units: Vec<ChosenUnit> =
                    set.chunks(shape.atoms_per_unit() as usize).map(|c| ChosenUnit { atoms: c.to_vec() }).collect();
                (self.local_score(host, free, &units, shape), units)
            })
            .collect();
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
        ranked.into_iter().take(limit).map(|(_, units)| units).collect()
    }

    /// How good a choice is for this host alone: unit quality first, then the units of
    /// the same shape and the NVLink neighbours that remain.
    fn local_score(&mut self, host: &Host, free: GpuMask, units: &[ChosenUnit], shape: UnitShape) -> f64 {
        let taken = units.iter().fold(0, |m, u| m | u.gpus());
        let rest = free & !taken;
        let quality = units.iter().map(|u| unit_quality(host, u, shape)).sum::<f64>() / units.len().max(1) as f64;
        let room = f64::from(self.unit_count(host, rest, shape));
        let most_room = f64::from(free.count_ones() / shape.unit_gpus);
        2.0 * quality + room / most_room.max(1.0) + remaining_connectivity(host, rest)
    }
}

/// Calls `visit` with every set of `total` disjoint atoms (in index order) until it
/// returns false.
fn collect_atom_sets(
    atoms: &[GpuMask],
    start: usize,
    taken: GpuMask,
    total: usize,
    chosen: &mut Vec<GpuMask>,
    visit: &mut impl FnMut(&[GpuMask]) -> bool,
) -> bool {
    if chosen.len() == total {
        return visit(chosen);
    }
    for index in start..atoms.len() {
        if atoms[index] & taken != 0 {
            continue;
        }
        chosen.push(atoms[index]);
        let go_on = collect_atom_sets(atoms, index + 1, taken | atoms[index], total, chosen, visit);
        chosen.pop();
        if !go_on {
            return false;
        }
    }
    true
}

/// Disjoint connected atoms, greedily from the lowest GPU (used on large hosts and when
/// the search runs out of budget).
fn greedy_atoms(host: &Host, free: GpuMask, atom: u32, limit: u32) -> Vec<GpuMask> {
    let mut rest = free;
    let mut found = Vec::new();
    while (found.len() as u32) < limit && rest.count_ones() >= atom {
        let Some(next) = first_connected_atom(host, rest, atom) else { break };
        found.push(next);
        rest &= !next;
    }
    found
}

/// The first NVLink-connected `size`-set of `free`, grown by breadth from each start GPU.
fn first_connected_atom(host: &Host, free: GpuMask, size: u32) -> Option<GpuMask> {
    for start in bits(free) {
        let mut set: GpuMask = 1 << start;
        while set.count_ones() < size {
            let frontier =
                bits(set).fold(0, |acc, gpu| acc | host.links.nvlink_neighbors[usize::from(gpu)]) & free & !set;
            if frontier == 0 {
                break;
            }
            set |= frontier & frontier.wrapping_neg();
        }
        if set.count_ones() == size {
            return Some(set);
        }
    }
    None
}

/// Uniformly linked host: every unit is taken from one CPU socket when one has room
/// (the socket with the least room that fits, so big gaps stay big), lowest indices first.
fn choose_on_sockets(host: &Host, free: GpuMask, count: u32, shape: UnitShape) -> Vec<ChosenUnit> {
    let mut rest = free;
    let mut units = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let fitting_socket = host
            .links
            .numa_masks
            .iter()
            .map(|&socket| socket & rest)
            .filter(|socket_free| socket_free.count_ones() >= shape.unit_gpus)
            .min_by_key(|socket_free| socket_free.count_ones());
        let pool = fitting_socket.unwrap_or(rest);
        let gpus: Vec<u8> = bits(pool).take(shape.unit_gpus as usize).collect();
        let gpus: Vec<u8> = if gpus.len() as u32 == shape.unit_gpus {
            gpus
        } else {
            bits(rest).take(shape.unit_gpus as usize).collect()
        };
        let atoms = gpus
            .chunks(shape.atom as usize)
            .map(|chunk| chunk.iter().fold(0u64, |mask, &gpu| mask | (1 << gpu)))
            .collect::<Vec<_>>();
        for atom in &atoms {
            rest &= !atom;
        }
        units.push(ChosenUnit { atoms });
    }
    units
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::node;
    use crate::topology::{Cluster, ClusterSpec, NvlinkLayout};

    fn host(product: &str, count: u8, nvlink: Option<NvlinkLayout>) -> Host {
        let mut spec = node("h", product, count, &[]);
        spec.nvlink = nvlink;
        Cluster::build(ClusterSpec { nodes: vec![spec], ..Default::default() }).expect("valid").hosts.remove(0)
    }

    #[test]
    fn tp4_on_a_cube_mesh_takes_a_fully_linked_quad() {
        let v100 = host("V100-SXM2-32GB", 8, None);
        let mut chooser = GpuChooser::default();
        let shape = UnitShape { unit_gpus: 4, atom: 4 };
        let units = chooser.choose(&v100, 0xff, 1, shape).expect("fits");
        assert!(units[0].gpus() == 0x0f || units[0].gpus() == 0xf0, "{:#x}", units[0].gpus());
        // With GPU 1 taken, the only fully linked quad left is 4-7.
        let units = chooser.choose(&v100, 0xfd, 1, shape).expect("fits");
        assert_eq!(units[0].gpus(), 0xf0);
        assert_eq!(chooser.unit_count(&v100, 0xff, shape), 2);
        // {0, 2, 5, 7} has no NVLink path: not a TP-4 group; {0,1,4,5} is (a ring).
        assert_eq!(chooser.unit_count(&v100, 0b1010_0101, shape), 0);
        assert_eq!(chooser.unit_count(&v100, 0b0011_0011, shape), 1);
    }

    #[test]
    fn bridged_pairs_keep_pairs_whole() {
        let nvl = host("H100-NVL", 4, None);
        let mut chooser = GpuChooser::default();
        // One GPU: take the orphan of the broken pair, not a fresh pair.
        let units = chooser.choose(&nvl, 0b1110, 1, UnitShape { unit_gpus: 1, atom: 1 }).expect("fits");
        assert_eq!(units[0].gpus(), 0b0010);
        // TP-2 needs a bridged pair: 1 and 2 are not one.
        assert_eq!(chooser.unit_count(&nvl, 0b0110, UnitShape { unit_gpus: 2, atom: 2 }), 0);
        assert_eq!(
            chooser.choose(&nvl, 0b1110, 1, UnitShape { unit_gpus: 2, atom: 2 }).expect("fits")[0].gpus(),
            0b1100
        );
    }

    #[test]
    fn uniform_hosts_keep_a_unit_on_one_socket() {
        let h100 = host("H100", 8, None);
        let mut chooser = GpuChooser::default();
        // Socket 0 has GPUs 2,3 free, socket 1 has 4..7: a 2-GPU unit takes 2,3.
        let units = chooser.choose(&h100, 0b1111_1100, 1, UnitShape { unit_gpus: 2, atom: 2 }).expect("fits");
        assert_eq!(units[0].gpus(), 0b0000_1100);
        assert_eq!(chooser.unit_count(&h100, 0b1111_1100, UnitShape { unit_gpus: 4, atom: 1 }), 1);
    }

    #[test]
    fn pcie_hosts_form_tensor_parallel_groups_over_pcie_on_one_socket() {
        let l40s = host("L40S", 4, None);
        let tp2 = UnitShape { unit_gpus: 2, atom: 2 };
        let mut chooser = GpuChooser::default();
        assert_eq!(tp2.on_host(&l40s), UnitShape { unit_gpus: 2, atom: 1 });
        assert_eq!(chooser.unit_count(&l40s, 0xf, tp2), 2);
        assert_eq!(chooser.unit_count(&l40s, 0b0111, tp2), 1);
        // Sockets hold GPUs 0-1 and 2-3: with 0, 2 and 3 free, the group takes 2 and 3.
        let units = chooser.choose(&l40s, 0b1101, 1, tp2).expect("fits");
        assert_eq!(units[0].gpus(), 0b1100);
        let same_socket = unit_quality(&l40s, &units[0], tp2);
        let across = unit_quality(&l40s, &ChosenUnit { atoms: vec![0b0001, 0b0100] }, tp2);
        assert_eq!(same_socket, PCIE_GROUP_QUALITY, "over PCIe, on one socket");
        assert!(across < same_socket, "a group across sockets scores below one on a socket: {across}");
    }

    #[test]
    fn groups_larger_than_the_nvlink_islands_span_pcie_and_smaller_ones_keep_nvlink() {
        let nvl = host("H100-NVL", 4, None);
        let mut chooser = GpuChooser::default();
        let tp4 = UnitShape { unit_gpus: 4, atom: 4 };
        assert_eq!(tp4.on_host(&nvl).atom, 1, "bridged pairs cannot NVLink four GPUs");
        assert_eq!(chooser.unit_count(&nvl, 0xf, tp4), 1);
        let tp2 = UnitShape { unit_gpus: 2, atom: 2 };
        assert_eq!(tp2.on_host(&nvl), tp2, "a pair can");
        assert_eq!(chooser.unit_count(&nvl, 0b0110, tp2), 0);
    }
}
