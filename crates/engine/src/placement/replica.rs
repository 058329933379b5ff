//! Replicas with roles ([`Replica`]): every role, and every slice of a role, is a *part*
//! placed by [`Planner::place`] restricted to a region of hosts; a search over the domains
//! the replica, its roles and its slices may use, with backtracking when a later part does
//! not fit. Upstream Kubernetes' gang scheduler (1.37) places the pods of a heterogeneous
//! group greedily, one after another, and says itself that it can miss a placement that
//! exists; this search goes back over earlier choices within a budget of planner calls.
//!
//! The search, in order:
//! 1. *Regions* for the whole replica: every domain of its `required` scope (a rack, a
//!    block, a host, an NVLink clique) with at least the replica's GPUs free, the tightest
//!    first; the whole cluster when it has none. Domains of its `preferred` scope are
//!    searched first; when one of them holds the replica, wider ones are not tried.
//! 2. *Parts* inside a region, in a fixed order: roles with a scope of their own before
//!    roles without, then the most GPUs, the largest tensor-parallel unit, and the order
//!    given. A sliced role is one part per slice.
//! 3. *Branching*: a part whose own scope (a slice's, or its role's) is a topology level
//!    tries each domain of that level inside the region with enough GPUs free, the
//!    tightest first, up to [`PART_BRANCHES_MAX`] that hold it; any other part takes the
//!    planner's one choice. Slices of a role are interchangeable, so a slice never goes to
//!    a domain before its predecessor's (no permutation is searched twice); the slices of
//!    a role stay on its first slice's GPU product and, when the role has a level scope of
//!    its own, inside the domain of that level that holds its first slice.
//! 4. *Choice*: the first [`REPLICA_CHOICES_MAX`] regions that hold every part are
//!    compared by their GPU-weighted mean score; the best wins, ties to the tighter region.
//!
//! Every planner call counts against [`REPLICA_SEARCH_STEPS_MAX`]; when the budget runs
//! out the best placement found so far is returned, or the replica is unplaced with the
//! reason saying the search stopped (not that nothing fits). The exact solver does not
//! model roles yet: with an exact choice, parts are placed greedily and the placement says
//! so.

use crate::ledger::{merge_by_host, GpuUse, Holding, Ledger};
use crate::topology::{Cluster, HostId};
use crate::workload::{Gang, Replica};

use super::{GangPlacement, Outside, PlaceRequest, Planner, ResolvedScope, SolverChoice, Unplaced};

/// Planner calls one replica's search may make (each places one part in one region).
pub const REPLICA_SEARCH_STEPS_MAX: u32 = 512;
/// Domains one part's branching tries that hold it, before the search goes back further.
pub const PART_BRANCHES_MAX: usize = 8;
/// Regions that hold the whole replica compared before the best is chosen.
pub const REPLICA_CHOICES_MAX: usize = 8;
/// Regions whose failures an unplaced replica's reason names.
const FAILURES_NAMED_MAX: usize = 3;

/// One part of a replica's placement: a role, or one slice of a sliced role.
#[derive(Debug, Clone, PartialEq)]
pub struct PartPlacement {
    pub role: String,
    /// The slice's index within its role, for a sliced role.
    pub slice: Option<u32>,
    /// The part's hosts and GPUs; members are numbered within the role (slice `s` of
    /// `m` members holds members `s*m .. (s+1)*m`).
    pub placement: GangPlacement,
}

/// A replica placed whole.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaPlacement {
    pub replica: String,
    /// The region that holds the replica: a domain of its required or preferred scope
    /// (`rack r1`), or `cluster`.
    pub region: String,
    /// Every part that takes GPUs, in the order the search placed them.
    pub parts: Vec<PartPlacement>,
    /// Roles whose members take no GPUs: left to kube-scheduler's own filters.
    pub gpu_less_roles: Vec<String>,
    /// The parts' score totals weighted by their GPUs.
    pub score: f64,
    /// Planner calls the search made.
    pub steps: u32,
    /// What limited the search (its step budget, an exact choice placed greedily).
    pub note: Option<String>,
}

impl ReplicaPlacement {
    /// Per host, the GPUs the replica takes (what the ledger reserves, under one holder).
    pub fn holding(&self) -> Holding {
        merge_by_host(self.parts.iter().flat_map(|p| p.placement.members.iter().map(|m| (m.host, m.gpus))))
    }

    pub fn gpus(&self) -> u64 {
        self.parts.iter().flat_map(|p| &p.placement.members).map(|m| u64::from(m.gpus.count_ones())).sum()
    }
}

/// One part of the search.
struct Part {
    role: usize,
    slice: Option<u32>,
    /// The part as a gang: the role's gang, or a slice of it (members and scope).
    gang: Gang,
    /// The level whose domains the part branches over: its own scope when that is a level.
    branch: Option<usize>,
    /// For a slice of a role with a level scope of its own: that level.
    role_level: Option<usize>,
}

/// A set of hosts the replica may use.
struct Region {
    label: String,
    hosts: Vec<HostId>,
    free: u64,
}

/// Why a part did not fit, the deepest the search got in one region (parts before it
/// were placed).
struct Failure {
    part: usize,
    reason: String,
}

struct Search<'s, 'c> {
    planner: &'s mut Planner<'c>,
    parts: Vec<Part>,
    replica: &'s Replica,
    offered: Option<&'s [bool]>,
    steps: u32,
    failure: Option<Failure>,
}

impl Planner<'_> {
    /// Places a replica with roles whole against the ledger's free GPUs, reserving
    /// nothing (see the module doc); `offered` restricts the hosts as in
    /// [`PlaceRequest::within`]. A replica that is one role without slices or scope is
    /// placed as [`Planner::place`] places its gang. Unplaced names the role that did not
    /// fit and why, per region tried.
    pub fn place_replica(
        &mut self,
        ledger: &impl AsRef<GpuUse>,
        replica: &Replica,
        solver: &SolverChoice,
        offered: Option<&[bool]>,
    ) -> Result<ReplicaPlacement, Unplaced> {
        let ledger = ledger.as_ref();
        let gpu_less_roles: Vec<String> =
            replica.roles.iter().filter(|r| r.gang.is_none()).map(|r| r.name.clone()).collect();
        if let Some(gang) = replica.as_single() {
            let placement = self.place(ledger, PlaceRequest::new(gang).solver(solver).within(offered))?;
            return Ok(ReplicaPlacement {
                replica: replica.name.clone(),
                region: placement.scope.clone(),
                score: placement.score.total,
                parts: vec![PartPlacement { role: replica.roles[0].name.clone(), slice: None, placement }],
                gpu_less_roles,
                steps: 1,
                note: None,
            });
        }
        let unplaced = |reason: String| Unplaced { gang: replica.name.clone(), reason, explanation: None };
        if replica.gangs().next().is_none() {
            return Err(unplaced("no role takes GPUs, so there is nothing to place".into()));
        }
        let parts = self.parts_of(replica).map_err(|e| unplaced(e.to_string()))?;
        let required =
            self.resolve_scope(&replica.name, &replica.required, "required").map_err(|e| unplaced(e.to_string()))?;
        let preferred =
            self.resolve_scope(&replica.name, &replica.preferred, "preferred").map_err(|e| unplaced(e.to_string()))?;
        let need = replica.total_gpus();
        let mut search = Search { planner: self, parts, replica, offered, steps: 0, failure: None };
        let mut failures: Vec<(String, Failure)> = Vec::new();
        let mut outcome = None;
        if preferred.is_some() && preferred != required && within_scope(preferred, required) {
            let regions = search.regions(ledger, preferred, need);
            outcome = search.best_region(ledger, regions, &mut Vec::new());
        }
        let regions = search.regions(ledger, required, need);
        let roomy = regions.len();
        if outcome.is_none() {
            outcome = search.best_region(ledger, regions, &mut failures);
        }
        let exhausted = search.steps >= REPLICA_SEARCH_STEPS_MAX;
        let steps = search.steps;
        let Some((region, placements, score)) = outcome else {
            let mut reason = if roomy == 0 {
                match &replica.required {
                    Some(scope) => format!("no {scope} has the {need} free GPUs the replica needs"),
                    None => format!("fewer than the {need} GPUs the replica needs are free"),
                }
            } else {
                search.failure_text(&failures)
            };
            if exhausted {
                reason.push_str(&format!(
                    "; the search stopped at its limit of {REPLICA_SEARCH_STEPS_MAX} planner calls, so a placement may exist"
                ));
            }
            return Err(unplaced(reason));
        };
        let parts = search.finish(placements);
        let mut notes = Vec::new();
        if !matches!(solver, SolverChoice::Greedy) {
            notes
                .push("the exact solver does not model roles yet: parts placed greedily with backtracking".to_string());
        }
        if exhausted {
            notes.push(format!("the search stopped at its limit of {REPLICA_SEARCH_STEPS_MAX} planner calls"));
        }
        Ok(ReplicaPlacement {
            replica: replica.name.clone(),
            region,
            parts,
            gpu_less_roles,
            score,
            steps,
            note: (!notes.is_empty()).then(|| notes.join("; ")),
        })
    }

    /// The search's parts in placing order (see the module doc).
    fn parts_of(&self, replica: &Replica) -> Result<Vec<Part>, super::GangInputError> {
        let mut parts = Vec::new();
        for (index, role) in replica.roles.iter().enumerate() {
            let Some(gang) = &role.gang else { continue };
            let own = self.resolve(gang, &gang.required, "required")?;
            let own_level = match own {
                Some(ResolvedScope::Level(level)) => Some(level),
                _ => None,
            };
            match &role.slices {
                None => parts.push(Part {
                    role: index,
                    slice: None,
                    gang: gang.clone(),
                    branch: own_level,
                    role_level: None,
                }),
                Some(slicing) => {
                    let scope = self.resolve_scope(&gang.name, &Some(slicing.scope.clone()), "slices.scope")?;
                    let branch = match scope {
                        Some(ResolvedScope::Level(level)) => Some(level),
                        _ => None,
                    };
                    let slice_gang =
                        Gang { members: slicing.members, required: Some(slicing.scope.clone()), ..gang.clone() };
                    for slice in 0..role.members / slicing.members.max(1) {
                        parts.push(Part {
                            role: index,
                            slice: Some(slice),
                            gang: slice_gang.clone(),
                            branch,
                            role_level: own_level,
                        });
                    }
                }
            }
        }
        parts.sort_by_key(|part| {
            let gang = &replica.roles[part.role].gang;
            let scoped = gang.as_ref().is_some_and(|g| g.required.is_some()) || part.slice.is_some();
            let total = gang.as_ref().map_or(0, Gang::total_gpus);
            let unit = gang.as_ref().map_or(0, Gang::unit_gpus);
            (!scoped, std::cmp::Reverse(total), std::cmp::Reverse(unit), part.role, part.slice)
        });
        Ok(parts)
    }
}

impl Search<'_, '_> {
    fn cluster(&self) -> &Cluster {
        self.planner.cluster()
    }

    fn is_offered(&self, host: HostId) -> bool {
        self.offered.is_none_or(|flags| flags.get(host as usize).copied().unwrap_or(false))
    }

    fn free_in(&self, ledger: &GpuUse, hosts: &[HostId]) -> u64 {
        hosts.iter().filter(|&&h| self.is_offered(h)).map(|&h| u64::from(ledger.free(h).count_ones())).sum()
    }

    /// The regions of a replica scope with at least `need` GPUs free, the tightest first.
    fn regions(&self, ledger: &GpuUse, scope: Option<ResolvedScope>, need: u64) -> Vec<Region> {
        let cluster = self.cluster();
        let mut regions: Vec<Region> = match scope {
            None => {
                vec![Region { label: "cluster".into(), hosts: (0..cluster.hosts.len() as HostId).collect(), free: 0 }]
            }
            Some(ResolvedScope::Level(level)) => cluster.domains[level]
                .iter()
                .map(|domain| Region {
                    label: format!("{} {}", super::short_level(&cluster.levels[level]), domain.path),
                    hosts: domain.hosts.clone().collect(),
                    free: 0,
                })
                .collect(),
            Some(ResolvedScope::Host) => (0..cluster.hosts.len() as HostId)
                .map(|h| Region { label: format!("host {}", cluster.host(h).name), hosts: vec![h], free: 0 })
                .collect(),
            Some(ResolvedScope::Nvlink) => {
                let cliques = cluster.cliques.iter().map(|clique| Region {
                    label: format!("clique {}", clique.name),
                    hosts: clique.hosts.clone(),
                    free: 0,
                });
                let alone = (0..cluster.hosts.len() as HostId)
                    .filter(|&h| cluster.host(h).clique.is_none())
                    .map(|h| Region { label: format!("host {}", cluster.host(h).name), hosts: vec![h], free: 0 });
                cliques.chain(alone).collect()
            }
        };
        for region in &mut regions {
            region.free = self.free_in(ledger, &region.hosts);
        }
        regions.retain(|r| r.free >= need);
        regions.sort_by_key(|r| r.free);
        regions
    }

    /// Searches regions in order; returns the best of the first [`REPLICA_CHOICES_MAX`]
    /// that hold every part (region label, placements in part order, score), and records
    /// why the others did not.
    fn best_region(
        &mut self,
        ledger: &GpuUse,
        regions: Vec<Region>,
        failures: &mut Vec<(String, Failure)>,
    ) -> Option<(String, Vec<GangPlacement>, f64)> {
        let mut best: Option<(String, Vec<GangPlacement>, f64)> = None;
        let mut found = 0;
        for region in regions {
            if found == REPLICA_CHOICES_MAX || self.steps >= REPLICA_SEARCH_STEPS_MAX {
                break;
            }
            let mut allowed = vec![false; self.cluster().hosts.len()];
            for &host in &region.hosts {
                allowed[host as usize] = self.is_offered(host);
            }
            let mut scratch: Ledger<usize> = ledger.scratch();
            let mut chosen = Vec::with_capacity(self.parts.len());
            let mut domains = vec![None; self.parts.len()];
            self.failure = None;
            if self.descend(&mut scratch, &allowed, 0, &mut chosen, &mut domains) {
                found += 1;
                let score = self.score(&chosen);
                if best.as_ref().is_none_or(|(_, _, top)| score > *top + 1e-9) {
                    best = Some((region.label, chosen, score));
                }
            } else if let Some(failure) = self.failure.take() {
                failures.push((region.label, failure));
            }
        }
        best
    }

    /// Places parts `k..` inside `allowed`, each reserved on `scratch` under its index;
    /// `domains[k]` is the branch domain part `k` took. False (and nothing left reserved
    /// by these parts) when some part does not fit in any branch.
    fn descend(
        &mut self,
        scratch: &mut Ledger<usize>,
        allowed: &[bool],
        k: usize,
        chosen: &mut Vec<GangPlacement>,
        domains: &mut Vec<Option<u32>>,
    ) -> bool {
        if k == self.parts.len() {
            return true;
        }
        let mut within = allowed.to_vec();
        self.confine_to_role(k, chosen, &mut within);
        let branches: Vec<(Option<u32>, Vec<bool>)> = match self.parts[k].branch {
            None => vec![(None, within)],
            Some(level) => self.branches(scratch, level, k, domains, &within),
        };
        if branches.is_empty() {
            if let Some(level) = self.parts[k].branch {
                let need = self.parts[k].gang.total_gpus();
                let level = super::short_level(&self.cluster().levels[level]).to_string();
                self.note_failure(k, format!("no {level} of the region has the {need} GPUs it needs free"));
            }
            return false;
        }
        let mut held = 0;
        for (domain, mask) in branches {
            if held == PART_BRANCHES_MAX || self.steps >= REPLICA_SEARCH_STEPS_MAX {
                break;
            }
            self.steps += 1;
            let request = PlaceRequest::new(&self.parts[k].gang).within(Some(&mask)).outside(Outside::Region);
            let placement = self.planner.place(&*scratch, request);
            let placement = match placement {
                Ok(placement) => placement,
                Err(unplaced) => {
                    self.note_failure(k, unplaced.reason);
                    continue;
                }
            };
            held += 1;
            if let Err(error) = scratch.reserve(&k, &placement.holding()) {
                // The planner read this scratch ledger: a refusal is a planner bug; try on.
                self.note_failure(k, format!("the ledger refused the part's placement: {error}"));
                continue;
            }
            chosen.push(placement);
            domains[k] = domain;
            if self.descend(scratch, allowed, k + 1, chosen, domains) {
                return true;
            }
            chosen.pop();
            domains[k] = None;
            // Reserved just above under this part's own index.
            let _released = scratch.release(&k);
        }
        false
    }

    /// A later slice of a role goes where the role's first slice went: the same GPU product
    /// (a role never mixes products, as a gang never does) and, when the role has a level
    /// scope of its own, the same domain of that level.
    fn confine_to_role(&self, k: usize, chosen: &[GangPlacement], within: &mut [bool]) {
        let part = &self.parts[k];
        let Some(first) = (0..k).find(|&j| self.parts[j].role == part.role) else { return };
        let Some(anchor) = chosen[first].members.first().map(|m| m.host) else { return };
        let cluster = self.cluster();
        let anchor = cluster.host(anchor);
        for (host, flag) in within.iter_mut().enumerate() {
            let host = &cluster.hosts[host];
            let same_domain = part.role_level.is_none_or(|level| host.domain_path[level] == anchor.domain_path[level]);
            *flag = *flag && host.product == anchor.product && same_domain;
        }
    }

    /// Part `k`'s branches: the domains of `level` inside `within` with the part's GPUs
    /// free, the tightest first; for a slice, none before its predecessor's domain.
    fn branches(
        &self,
        scratch: &Ledger<usize>,
        level: usize,
        k: usize,
        domains: &[Option<u32>],
        within: &[bool],
    ) -> Vec<(Option<u32>, Vec<bool>)> {
        let cluster = self.cluster();
        let part = &self.parts[k];
        let floor = match (k.checked_sub(1), part.slice) {
            (Some(previous), Some(_)) if self.parts[previous].role == part.role => domains[previous].unwrap_or(0),
            _ => 0,
        };
        let need = part.gang.total_gpus();
        let mut candidates: Vec<(u64, u32)> = cluster.domains[level]
            .iter()
            .enumerate()
            .skip(floor as usize)
            .filter_map(|(index, domain)| {
                let free: u64 = domain
                    .hosts
                    .clone()
                    .filter(|&h| within[h as usize])
                    .map(|h| u64::from(scratch.free(h).count_ones()))
                    .sum();
                (free >= need).then_some((free, index as u32))
            })
            .collect();
        candidates.sort();
        candidates
            .into_iter()
            .map(|(_, index)| {
                let range = &cluster.domains[level][index as usize].hosts;
                let mask =
                    within.iter().enumerate().map(|(host, &flag)| flag && range.contains(&(host as u32))).collect();
                (Some(index), mask)
            })
            .collect()
    }

    fn note_failure(&mut self, k: usize, reason: String) {
        if self.failure.as_ref().is_none_or(|f| k >= f.part) {
            self.failure = Some(Failure { part: k, reason });
        }
    }

    fn score(&self, chosen: &[GangPlacement]) -> f64 {
        let gpus = |p: &GangPlacement| p.members.iter().map(|m| f64::from(m.gpus.count_ones())).sum::<f64>();
        let total: f64 = chosen.iter().map(gpus).sum();
        if total == 0.0 {
            return 0.0;
        }
        chosen.iter().map(|p| p.score.total * gpus(p)).sum::<f64>() / total
    }

    /// What a part is called in a reason: `role decode`, `role workers (slice 2 of 4)`.
    fn part_name(&self, k: usize) -> String {
        let part = &self.parts[k];
        let role = &self.replica.roles[part.role];
        match (part.slice, &role.slices) {
            (Some(slice), Some(slicing)) => {
                format!("role `{}` (slice {} of {})", role.name, slice + 1, role.members / slicing.members.max(1))
            }
            _ => format!("role `{}`", role.name),
        }
    }

    fn failure_text(&self, failures: &[(String, Failure)]) -> String {
        if failures.is_empty() {
            return "no region was searched".into();
        }
        let named: Vec<String> = failures
            .iter()
            .take(FAILURES_NAMED_MAX)
            .map(|(region, failure)| {
                let before: Vec<String> = (0..failure.part).map(|j| self.part_name(j)).collect();
                let after = if before.is_empty() { String::new() } else { format!(" after {}", before.join(", ")) };
                format!("in {region}, {} did not fit{after}: {}", self.part_name(failure.part), failure.reason)
            })
            .collect();
        let more = failures.len().saturating_sub(FAILURES_NAMED_MAX);
        let mut text = format!("no region holds every role: {}", named.join("; "));
        if more > 0 {
            text.push_str(&format!("; and {more} more"));
        }
        text
    }

    /// The placements in part order as parts, members numbered within their role.
    fn finish(&self, placements: Vec<GangPlacement>) -> Vec<PartPlacement> {
        placements
            .into_iter()
            .zip(&self.parts)
            .map(|(mut placement, part)| {
                let role = &self.replica.roles[part.role];
                if let (Some(slice), Some(slicing)) = (part.slice, &role.slices) {
                    for member in &mut placement.members {
                        member.member += slice * slicing.members;
                    }
                }
                PartPlacement { role: role.name.clone(), slice: part.slice, placement }
            })
            .collect()
    }
}

/// Whether every domain of `inner` lies inside one domain of `outer` (`None`: the whole
/// cluster). Levels nest; a host lies inside every level; an NVLink clique may span racks,
/// so it lies inside nothing but the cluster.
fn within_scope(inner: Option<ResolvedScope>, outer: Option<ResolvedScope>) -> bool {
    match (inner, outer) {
        (_, None) => true,
        (Some(ResolvedScope::Level(inner)), Some(ResolvedScope::Level(outer))) => inner >= outer,
        (Some(ResolvedScope::Host), Some(ResolvedScope::Level(_) | ResolvedScope::Host)) => true,
        (Some(ResolvedScope::Nvlink), Some(ResolvedScope::Nvlink)) => true,
        _ => false,
    }
}
