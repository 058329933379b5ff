//! Capacity: how many more replicas of one gang shape fit now, per GPU product, per
//! topology domain, and in all. "How many TP-8 slots are left in rack 3?"
//!
//! Counted from the same per-host unit counts the planner places with (a unit is the smallest
//! group of GPUs that must share NVLink, see [`crate::workload`]), so a count here is what
//! repeated placement would reach: a replica needs `units()` units, all of one product, and
//! all inside one domain of its required scope, so each group of hosts that may hold a
//! replica holds `floor(units / needed)` of them. Answering from counts instead of placing
//! replica after replica keeps this O(hosts) for any count; the property tests compare the
//! two.
//!
//! With `required: nvlink`, a host outside any clique holds as many replicas as it has
//! disjoint NVLink-connected sets of the gang's GPUs (hosts with NVLink islands hold fewer
//! than their units suggest); a clique pools the units of its hosts.

use std::collections::BTreeMap;

use super::gpus::UnitShape;
use super::{shapes_of, GangInputError, HostCapacity, Planner, RejectionGroup, RejectionTally, ResolvedScope};
use crate::ledger::GpuUse;
use crate::topology::{HostId, ProductId};
use crate::workload::Gang;

/// One product's share of a [`CapacityReport`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProductCapacity {
    pub product: ProductId,
    pub replicas: u64,
    pub hosts: u32,
    pub gpus: u64,
    pub free_gpus: u64,
}

/// Replicas that fit inside one domain of the breakdown level, for one product.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainCapacity {
    /// Index into `cluster.domains[level]`.
    pub domain: u32,
    pub product: ProductId,
    pub replicas: u64,
    pub free_gpus: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CapacityReport {
    pub replicas: u64,
    pub products: Vec<ProductCapacity>,
    /// The level `domains` breaks the answer down by (`None` on a cluster without levels).
    pub level: Option<usize>,
    pub domains: Vec<DomainCapacity>,
    pub rejected: Vec<RejectionGroup>,
}

/// Where replicas of a group of hosts may not mix with another group's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Group {
    Anywhere,
    Host(HostId),
    Clique(u32),
    Domain(u32),
}

impl Planner<'_> {
    /// How many replicas of `gang` fit now on the hosts flagged in `offered` (all when
    /// `None`), broken down by the domains of `by_level` (the innermost level when `None`).
    pub fn capacity(
        &mut self,
        ledger: &impl AsRef<GpuUse>,
        gang: &Gang,
        offered: Option<&[bool]>,
        by_level: Option<usize>,
    ) -> Result<CapacityReport, GangInputError> {
        let ledger = ledger.as_ref();
        let cluster = self.cluster;
        let required = self.resolve(gang, &gang.required, "required")?;
        self.resolve(gang, &gang.preferred, "preferred")?;
        let level = by_level.or_else(|| cluster.levels.len().checked_sub(1));
        let (unit_shape, member_shape) = shapes_of(gang);
        let mut tally = RejectionTally::default();
        let capacity = self.host_capacity(ledger, gang, unit_shape, member_shape, offered, &mut tally);
        let need = u64::from(gang.units().max(1));
        let leaves = self.capacity_leaves(ledger, gang, &capacity, required);
        let group_of = |host: HostId, clique: Option<u32>, pooled: bool| -> Option<Group> {
            Some(match required {
                None => Group::Anywhere,
                // Units that span hosts can never be on one host.
                Some(ResolvedScope::Host) if pooled => return None,
                Some(ResolvedScope::Host) => Group::Host(host),
                Some(ResolvedScope::Nvlink) => match clique {
                    Some(clique) => Group::Clique(clique),
                    None => Group::Host(host),
                },
                Some(ResolvedScope::Level(level)) => Group::Domain(cluster.host(host).domain_path[level]),
            })
        };
        // Replicas never mix groups of the required scope, nor (for the breakdown) domains of
        // the breakdown level: sum units per (product, domain, group), then floor each.
        let breakdown_finer = |group: Group| match (group, required, level) {
            (Group::Anywhere, _, _) => false,
            (_, Some(ResolvedScope::Level(required)), Some(level)) => required >= level,
            _ => true,
        };
        let mut per_group: BTreeMap<(ProductId, Group), u64> = BTreeMap::new();
        let mut per_domain_group: BTreeMap<(u32, ProductId, Option<Group>), u64> = BTreeMap::new();
        for &(product, host, units, clique, pooled) in &leaves {
            let Some(group) = group_of(host, clique, pooled) else { continue };
            *per_group.entry((product, group)).or_default() += units;
            if let Some(level) = level {
                let domain = cluster.host(host).domain_path[level];
                let inner = breakdown_finer(group).then_some(group);
                *per_domain_group.entry((domain, product, inner)).or_default() += units;
            }
        }
        let (mut products, free_per_domain) = self.free_by_product(ledger, offered, level);
        for (&(product, _), &units) in &per_group {
            if let Some(entry) = products.get_mut(&product) {
                entry.replicas += units / need;
            }
        }
        let mut domains: BTreeMap<(u32, ProductId), u64> = free_per_domain.keys().map(|&key| (key, 0)).collect();
        for (&(domain, product, _), &units) in &per_domain_group {
            *domains.entry((domain, product)).or_default() += units / need;
        }
        let products: Vec<ProductCapacity> = products.into_values().collect();
        Ok(CapacityReport {
            replicas: products.iter().map(|p| p.replicas).sum(),
            products,
            level,
            domains: domains
                .into_iter()
                .map(|((domain, product), replicas)| DomainCapacity {
                    domain,
                    product,
                    replicas,
                    free_gpus: free_per_domain.get(&(domain, product)).copied().unwrap_or(0),
                })
                .collect(),
            rejected: tally.render(cluster, gang),
        })
    }

    /// The leaves capacity is counted from: a host's own units (with `required: nvlink`, its
    /// NVLink-connected sets that hold the whole gang), or a pool of clique hosts whose units
    /// span hosts; as (product, host, units, clique, pooled).
    fn capacity_leaves(
        &mut self,
        ledger: &GpuUse,
        gang: &Gang,
        capacity: &HostCapacity,
        required: Option<ResolvedScope>,
    ) -> Vec<(ProductId, HostId, u64, Option<u32>, bool)> {
        let cluster = self.cluster;
        let need = u64::from(gang.units().max(1));
        let mut leaves: Vec<(ProductId, HostId, u64, Option<u32>, bool)> = Vec::new();
        let gang_gpus = gang.total_gpus().min(u64::from(u32::MAX)) as u32;
        let whole_gang = UnitShape { unit_gpus: gang_gpus, atom: gang_gpus };
        for (index, host) in cluster.hosts.iter().enumerate() {
            let mut units = u64::from(capacity.units[index]);
            if units > 0 && required == Some(ResolvedScope::Nvlink) && host.clique.is_none() {
                // Within one host, `nvlink` asks for the whole gang on one NVLink-connected set
                // of GPUs: count those sets (hosts with NVLink islands hold fewer than units say).
                let sets = if whole_gang.unit_gpus <= u32::from(host.gpu_count) {
                    self.chooser.unit_count(host, ledger.free(index as HostId), whole_gang)
                } else {
                    0
                };
                units = u64::from(sets) * need;
            }
            if units > 0 {
                leaves.push((host.product, index as HostId, units, host.clique, false));
            }
        }
        for pool in &capacity.pools {
            if let Some(&first) = pool.hosts.iter().min() {
                leaves.push((pool.product, first, u64::from(pool.units), Some(pool.clique), true));
            }
        }
        leaves
    }

    /// Per product, its hosts, GPUs and free GPUs on the offered hosts (replicas still 0);
    /// and free GPUs per (domain of `level`, product).
    fn free_by_product(
        &self,
        ledger: &GpuUse,
        offered: Option<&[bool]>,
        level: Option<usize>,
    ) -> (BTreeMap<ProductId, ProductCapacity>, BTreeMap<(u32, ProductId), u64>) {
        let cluster = self.cluster;
        let mut products: BTreeMap<ProductId, ProductCapacity> = BTreeMap::new();
        let mut free_per_domain: BTreeMap<(u32, ProductId), u64> = BTreeMap::new();
        for (index, host) in cluster.hosts.iter().enumerate() {
            if offered.is_some_and(|offered| !offered.get(index).copied().unwrap_or(false)) {
                continue;
            }
            let free = u64::from(ledger.free(index as HostId).count_ones());
            let entry = products.entry(host.product).or_insert(ProductCapacity {
                product: host.product,
                replicas: 0,
                hosts: 0,
                gpus: 0,
                free_gpus: 0,
            });
            entry.hosts += 1;
            entry.gpus += u64::from(host.gpu_count);
            entry.free_gpus += free;
            if let Some(level) = level {
                *free_per_domain.entry((host.domain_path[level], host.product)).or_default() += free;
            }
        }
        (products, free_per_domain)
    }

    /// Units of `gang` that `host` holds now (member slots for a clique host whose units span
    /// hosts), or why it holds none.
    pub fn host_units(
        &mut self,
        ledger: &impl AsRef<GpuUse>,
        gang: &Gang,
        host: HostId,
    ) -> Result<u32, (super::HostRejection, String)> {
        let ledger = ledger.as_ref();
        let (unit_shape, member_shape) = shapes_of(gang);
        match self.host_slots(ledger, gang, host, unit_shape, member_shape) {
            Ok((count, _)) => Ok(count),
            Err(reason) => {
                let host = self.cluster.host(host);
                Err((reason, reason.text(host.product.get().name, host.memory_mib, gang)))
            }
        }
    }
}
