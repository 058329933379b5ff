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
use crate::workload::{Gang, Replica};

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
                let sets = if whole_gang.unit_gpus <= host.links.largest_nvlink_group {
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

/// Replicas one count of [`Planner::replica_capacity`] reaches at most.
pub const REPLICA_CAPACITY_COUNT_MAX: u64 = 256;
/// Planner calls one [`Planner::replica_capacity`] answer may make over all its counts.
pub const REPLICA_CAPACITY_STEPS_MAX: u64 = 20_000;

/// How many replicas of a shape with roles fit now ([`Planner::replica_capacity`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaCapacity {
    /// Replicas placed one after another over every offered host.
    pub replicas: u64,
    /// The level `domains` breaks the answer down by (`None` on a cluster without levels).
    pub level: Option<usize>,
    /// Per domain of `level` (its index in `cluster.domains[level]`): replicas placed one
    /// after another inside that domain alone, and its free GPUs. Domains the budget left
    /// uncounted are not listed (and `capped` is set).
    pub domains: Vec<(u32, u64, u64)>,
    /// Some count stopped at [`REPLICA_CAPACITY_COUNT_MAX`] or the answer at
    /// [`REPLICA_CAPACITY_STEPS_MAX`]: the counts are lower bounds.
    pub capped: bool,
    /// Planner calls made.
    pub steps: u64,
}

impl Planner<'_> {
    /// How many replicas of `replica` (roles, slices, its scope) fit now on the hosts flagged
    /// in `offered` (all when `None`), broken down by the domains of `by_level` (the innermost
    /// level when `None`). A replica's roles may mix products and share hosts, so unlike
    /// [`Planner::capacity`] this is counted by placing replicas one after another with
    /// [`Planner::place_replica`] on a scratch copy of the ledger (greedy, so a lower bound of
    /// what fits), once over all hosts and once inside each domain; domains with fewer free
    /// GPUs than one replica are counted as 0 without a search. Errors: the replica's shape
    /// or scopes (as [`Planner::check_replica`]).
    pub fn replica_capacity(
        &mut self,
        ledger: &impl AsRef<GpuUse>,
        replica: &Replica,
        offered: Option<&[bool]>,
        by_level: Option<usize>,
    ) -> Result<ReplicaCapacity, GangInputError> {
        let ledger = ledger.as_ref();
        self.check_replica(replica)?;
        let cluster = self.cluster;
        let level = by_level.or_else(|| cluster.levels.len().checked_sub(1));
        let mut report = ReplicaCapacity { replicas: 0, level, domains: Vec::new(), capped: false, steps: 0 };
        report.replicas = self.count_replicas(ledger, replica, offered, &mut report);
        let Some(level) = level else { return Ok(report) };
        let need = replica.total_gpus();
        for (index, domain) in cluster.domains[level].iter().enumerate() {
            let mut mask = vec![false; cluster.hosts.len()];
            let mut free = 0u64;
            for host in domain.hosts.clone() {
                let open = offered.is_none_or(|o| o.get(host as usize).copied().unwrap_or(false));
                mask[host as usize] = open;
                if open {
                    free += u64::from(ledger.free(host).count_ones());
                }
            }
            if free >= need && report.steps >= REPLICA_CAPACITY_STEPS_MAX {
                // Not counted: left out rather than shown as 0.
                report.capped = true;
                continue;
            }
            let count = if free < need { 0 } else { self.count_replicas(ledger, replica, Some(&mask), &mut report) };
            report.domains.push((index as u32, count, free));
        }
        Ok(report)
    }

    /// Places `replica` again and again on a scratch copy of `ledger` within `offered` until
    /// it no longer fits or a limit stops it (`report.capped`); returns how many fit.
    fn count_replicas(
        &mut self,
        ledger: &GpuUse,
        replica: &Replica,
        offered: Option<&[bool]>,
        report: &mut ReplicaCapacity,
    ) -> u64 {
        let mut scratch: crate::ledger::Ledger<u64> = ledger.scratch();
        let mut count = 0u64;
        loop {
            if count == REPLICA_CAPACITY_COUNT_MAX || report.steps >= REPLICA_CAPACITY_STEPS_MAX {
                report.capped = true;
                return count;
            }
            let mut steps = 0;
            let placed = self.place_replica_counting(
                scratch.as_ref(),
                replica,
                &super::SolverChoice::Greedy,
                offered,
                None,
                &mut steps,
            );
            report.steps += u64::from(steps);
            let Ok(placement) = placed else { return count };
            if scratch.reserve(&count, &placement.holding()).is_err() {
                return count;
            }
            count += 1;
        }
    }
}

#[cfg(test)]
mod replica_tests {
    use super::*;
    use crate::ledger::Ledger;
    use crate::placement::PlannerConfig;
    use crate::testkit::node;
    use crate::topology::{Cluster, ClusterSpec};
    use crate::workload::{GangSpec, RoleSpec, Scope, Slicing};

    const LEAF: &str = "network.topology.nvidia.com/leaf";

    fn cluster(hosts: &[usize]) -> Cluster {
        let mut nodes = Vec::new();
        for (rack, &count) in hosts.iter().enumerate() {
            for host in 0..count {
                let name = format!("r{rack}");
                nodes.push(node(&format!("r{rack}-{host}"), "H100", 8, &[(LEAF, name.as_str())]));
            }
        }
        Cluster::build(ClusterSpec { name: "t".into(), levels: vec![LEAF.into()], nodes }).expect("cluster")
    }

    #[test]
    fn a_gang_counted_as_a_replica_matches_the_gang_count() {
        let cluster = cluster(&[3, 2, 4]);
        let ledger: Ledger<u64> = Ledger::empty(&cluster);
        let mut planner = Planner::new(&cluster, PlannerConfig::default());
        for (members, gpus, tp, required) in
            [(1, 8, 8, None), (2, 8, 8, Some("leaf")), (3, 4, 4, Some("leaf")), (1, 2, 2, None)]
        {
            let mut spec = GangSpec::shape("g", members, gpus, tp);
            spec.required = required.map(Scope::parse);
            let gang = spec.expand().remove(0);
            let counted =
                planner.replica_capacity(&ledger, &Replica::of_gang(gang.clone()), None, None).expect("count");
            let capacity = planner.capacity(&ledger, &gang, None, None).expect("capacity");
            assert_eq!(counted.replicas, capacity.replicas, "{members} x {gpus}");
            let per_domain: Vec<u64> = counted.domains.iter().map(|d| d.1).collect();
            let expected: Vec<u64> = (0..3u32)
                .map(|d| capacity.domains.iter().filter(|c| c.domain == d).map(|c| c.replicas).sum())
                .collect();
            assert_eq!(per_domain, expected, "{members} x {gpus} per rack");
            assert!(!counted.capped);
        }
    }

    #[test]
    fn replicas_with_roles_and_slices_are_counted_per_rack_and_capped_as_lower_bounds() {
        let cluster = cluster(&[4, 4, 1]);
        let ledger: Ledger<u64> = Ledger::empty(&cluster);
        let mut planner = Planner::new(&cluster, PlannerConfig::default());
        // A 4-GPU leader and two 8-GPU workers in one rack: 20 GPUs, one per 32-GPU rack.
        let mut spec =
            GangSpec::with_roles("r", vec![RoleSpec::shape("leader", 1, 4, 4), RoleSpec::shape("worker", 2, 8, 8)]);
        spec.required = Some(Scope::parse("leaf"));
        let replica = spec.expand_replicas().remove(0);
        let counted = planner.replica_capacity(&ledger, &replica, None, None).expect("count");
        assert_eq!(counted.replicas, 2);
        assert_eq!(counted.domains.iter().map(|d| d.1).collect::<Vec<_>>(), vec![1, 1, 0]);
        // Slices of two 8-GPU members, each in one rack: the racks of 4 hold 2 slices each.
        let sliced = RoleSpec {
            slices: Some(Slicing { members: 2, scope: Scope::parse("leaf"), exclusive: false }),
            ..RoleSpec::shape("w", 4, 8, 8)
        };
        let replica = GangSpec::with_roles("s", vec![sliced]).expand_replicas().remove(0);
        let counted = planner.replica_capacity(&ledger, &replica, None, None).expect("count");
        assert_eq!(counted.replicas, 2, "64 GPUs in racks of 4 hosts: two 32-GPU jobs");
        // 1-GPU replicas: 72 fit; the per-rack counts are not capped either.
        let tiny = Replica::of_gang(GangSpec::shape("t", 1, 1, 1).expand().remove(0));
        let counted = planner.replica_capacity(&ledger, &tiny, None, None).expect("count");
        assert_eq!((counted.replicas, counted.capped), (72, false));
        // 320 GPUs: the count stops at its limit and says so.
        let big = self::cluster(&[40]);
        let ledger: Ledger<u64> = Ledger::empty(&big);
        let counted =
            Planner::new(&big, PlannerConfig::default()).replica_capacity(&ledger, &tiny, None, None).expect("count");
        assert_eq!((counted.replicas, counted.capped), (REPLICA_CAPACITY_COUNT_MAX, true));
        // A bad scope is an error.
        let mut bad = GangSpec::with_roles("b", vec![RoleSpec::shape("w", 1, 8, 8)]);
        bad.required = Some(Scope::parse("row"));
        let ledger: Ledger<u64> = Ledger::empty(&cluster);
        assert!(planner.replica_capacity(&ledger, &bad.expand_replicas().remove(0), None, None).is_err());
    }
}
