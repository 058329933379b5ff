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
//!    searched first, with half the budget; when one of them holds the replica, wider ones
//!    are not tried.
//! 2. *Parts* inside a region, in a fixed order: roles with a scope of their own before
//!    roles without, then the most GPUs, the largest tensor-parallel unit, and the order
//!    given. A sliced role is one part per slice.
//! 3. *Branching*: a part whose own scope (a slice's, or its role's) is a topology level
//!    tries each domain of that level inside the region with enough GPUs free, the
//!    tightest first, up to [`PART_BRANCHES_MAX`] that hold it. On a cluster of several
//!    GPU products, a role without slices or a level scope takes the planner's choice first
//!    and then each product (the tightest first), so that a role the planner put on the only
//!    product a later role can use goes elsewhere when the later role needs it; any other
//!    part takes the planner's one choice. The first slice of a role also branches over GPU products, and
//!    only over domains whose enclosing domain of the role's own level has room for the
//!    whole role; later slices stay on its product and in that domain. Slices of a role
//!    are interchangeable, so after a slice whose branches were all tried, the next never
//!    goes to a domain before its predecessor's (no permutation is searched twice).
//! 4. *Choice*: the first [`REPLICA_CHOICES_MAX`] regions that hold every part are
//!    compared by their GPU-weighted mean score; the best wins, ties to the tighter region.
//!
//! Every planner call counts against [`REPLICA_SEARCH_STEPS_MAX`]; when the budget runs
//! out the best placement found so far is returned, or the replica is unplaced with the
//! reason saying the search stopped (not that nothing fits).
//!
//! With an exact solver choice the search runs as well, and then one MILP per candidate
//! region models every part at once (`exact/replica.rs`): what it places, or proves
//! impossible, is the answer ([`SolverChoice::Exact`]); with [`SolverChoice::Auto`] the
//! better of the two by the same score wins.

use crate::ledger::{merge_by_host, GpuUse, Holding, Ledger};
use crate::topology::{Cluster, HostId, ProductId};
use crate::workload::{Gang, Replica};

use super::exact::replica::ReplicaExact;
use super::{GangPlacement, Outside, PlaceRequest, Planner, ResolvedScope, SolverChoice, SolverInfo, Unplaced};

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
    /// What limited the search (its step budget), or why one solver's answer was used
    /// over the other's.
    pub note: Option<String>,
    /// Which solver's placement this is. `greedy` (objective: `score`), or `exact/<backend>`:
    /// then `objective` is the model's, the parts' scores weighted by their GPUs with each
    /// part scored against the GPUs free before the replica (parts sharing a host or rack
    /// are not scored against each other inside the model; `score` is, part after part),
    /// with its `bound` and `gap` over the regions modelled.
    pub solver: SolverInfo,
}

impl ReplicaPlacement {
    /// Per host, the GPUs the replica takes (what the ledger reserves, under one holder).
    pub fn holding(&self) -> Holding {
        merge_by_host(self.parts.iter().flat_map(|p| p.placement.members.iter().map(|m| (m.host, m.gpus))))
    }

    pub fn gpus(&self) -> u64 {
        self.parts.iter().map(|p| p.placement.gpus()).sum()
    }
}

/// One part of the search (and of the exact model): a role, or one slice of a sliced role.
pub(super) struct Part {
    /// The role's index in [`Replica::roles`].
    pub(super) role: usize,
    pub(super) slice: Option<u32>,
    /// The part as a gang: the role's gang, or a slice of it (members and scope).
    pub(super) gang: Gang,
    /// The level whose domains the part branches over: its own scope (a slice's, or its
    /// role's) when that is a level; for a slice whose scope is not, its role's level.
    branch: Option<usize>,
    /// For a slice of a role with a level scope of its own: that level.
    role_level: Option<usize>,
    /// The first slice of a sliced role: it fixes the role's GPU product (and domain of
    /// `role_level`), so it also branches over those.
    first_slice: bool,
    /// GPUs of the whole role (what the first slice's domain must have room for).
    role_gpus: u64,
    /// For a slice of a role whose slices are exclusive ([`Slicing::exclusive`]): the level
    /// of the slice's own scope, `None` for a host scope. Earlier slices' domains (hosts)
    /// are closed to it.
    apart: Option<Option<usize>>,
}

/// A set of hosts the replica may use.
pub(super) struct Region {
    pub(super) label: String,
    pub(super) hosts: Vec<HostId>,
    pub(super) free: u64,
}

/// Why a part did not fit, the deepest the search got in one region (parts before it
/// were placed).
struct Failure {
    part: usize,
    reason: String,
    /// The planner's explanation of the part that did not fit (with `explain`).
    explanation: Option<super::Explanation>,
}

struct Search<'s, 'c> {
    planner: &'s mut Planner<'c>,
    parts: Vec<Part>,
    replica: &'s Replica,
    offered: Option<&'s [bool]>,
    /// One role's own restriction, on top of `offered`: (role index, hosts it may use).
    role_offered: Option<(usize, &'s [bool])>,
    steps: u32,
    failure: Option<Failure>,
    /// Some part had more domains that could hold it than [`PART_BRANCHES_MAX`].
    capped: bool,
    /// Planner calls this pass may reach (the preferred pass has half the budget).
    limit: u32,
    /// Per part: whether its last branch list was tried whole (the slice symmetry floor
    /// applies after such a part only).
    exhaustive: Vec<bool>,
    /// The cluster has more than one GPU product ([`Search::branches_over_products`]).
    several_products: bool,
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
        self.place_replica_offered(ledger, replica, solver, offered, None)
    }

    /// [`Planner::place_replica`], with role `role_offered.0`'s members also restricted to
    /// the hosts flagged in `role_offered.1` (indexed by host id): what kube-scheduler offered
    /// the pod of that role whose filter plans the replica, while the other roles may use
    /// every host of `offered`.
    pub fn place_replica_offered(
        &mut self,
        ledger: &impl AsRef<GpuUse>,
        replica: &Replica,
        solver: &SolverChoice,
        offered: Option<&[bool]>,
        role_offered: Option<(usize, &[bool])>,
    ) -> Result<ReplicaPlacement, Unplaced> {
        self.place_replica_counting(ledger.as_ref(), replica, solver, offered, role_offered, &mut 0)
    }

    /// [`Planner::place_replica_offered`], also saying in `steps` how many planner calls the
    /// search made, whether it placed the replica or not.
    pub(crate) fn place_replica_counting(
        &mut self,
        ledger: &GpuUse,
        replica: &Replica,
        solver: &SolverChoice,
        offered: Option<&[bool]>,
        role_offered: Option<(usize, &[bool])>,
        steps_out: &mut u32,
    ) -> Result<ReplicaPlacement, Unplaced> {
        let unplaced = |reason: String| Unplaced { gang: replica.name.clone(), reason, explanation: None };
        replica.check().map_err(|e| unplaced(e.to_string()))?;
        let gpu_less_roles: Vec<String> =
            replica.roles.iter().filter(|r| r.gang.is_none()).map(|r| r.name.clone()).collect();
        if let Some(gang) = replica.as_single() {
            let mask: Option<Vec<bool>> = role_offered.map(|(_, own)| {
                (0..own.len()).map(|h| own[h] && offered.is_none_or(|o| o.get(h).copied().unwrap_or(false))).collect()
            });
            let within = mask.as_deref().or(offered);
            *steps_out = 1;
            let placement = self.place(ledger, PlaceRequest::new(gang).solver(solver).within(within))?;
            return Ok(ReplicaPlacement {
                replica: replica.name.clone(),
                region: placement.scope.clone(),
                solver: placement.solver.clone(),
                score: placement.score.total,
                parts: vec![PartPlacement { role: replica.roles[0].name.clone(), slice: None, placement }],
                gpu_less_roles,
                steps: 1,
                note: None,
            });
        }
        if replica.gangs().next().is_none() {
            return Err(unplaced("no role takes GPUs, so there is nothing to place".into()));
        }
        let scopes = ReplicaScopes {
            required: self
                .resolve_scope(&replica.name, &replica.required, "required")
                .map_err(|e| unplaced(e.to_string()))?,
            preferred: self
                .resolve_scope(&replica.name, &replica.preferred, "preferred")
                .map_err(|e| unplaced(e.to_string()))?,
        };
        let greedy = self.search_replica(ledger, replica, scopes, offered, role_offered, steps_out);
        let config = match solver {
            SolverChoice::Greedy => return greedy.map_err(|failure| (*failure).into_unplaced()),
            SolverChoice::Exact(config) | SolverChoice::Auto(config) => config,
        };
        let parts = self.parts_of(replica).map_err(|e| unplaced(e.to_string()))?;
        let exact = self.place_replica_exact(ledger, replica, &parts, scopes, offered, role_offered, config);
        let steps = *steps_out;
        let exact_placement = |region: String, placements: Vec<GangPlacement>, solver: SolverInfo| ReplicaPlacement {
            replica: replica.name.clone(),
            region,
            score: weighted_score(&placements),
            parts: finish(replica, &parts, placements),
            gpu_less_roles: gpu_less_roles.clone(),
            steps,
            note: None,
            solver,
        };
        let with_note = |mut placement: ReplicaPlacement, note: String| {
            placement.note = Some(match placement.note.take() {
                Some(before) => format!("{before}; {note}"),
                None => note,
            });
            placement
        };
        // Exact and auto answer alike but where both placed the replica: auto then keeps the
        // better score, exact the model's placement.
        match (exact, greedy) {
            (ReplicaExact::Placed { placements, .. }, Ok(greedy))
                if matches!(solver, SolverChoice::Auto(_)) && greedy.score > weighted_score(&placements) + 1e-9 =>
            {
                let exact = weighted_score(&placements);
                Ok(with_note(greedy, format!("the greedy search scored above the exact solver ({exact:.4})")))
            }
            (ReplicaExact::Placed { region, placements, solver }, _) => Ok(exact_placement(region, placements, solver)),
            // A proof: what limited the search does not matter.
            (ReplicaExact::Infeasible, Err(failure)) => {
                let mut unplaced = failure.unplaced;
                unplaced.reason = format!("proven infeasible by the exact solver: {}", unplaced.reason);
                Err(unplaced)
            }
            (ReplicaExact::Infeasible, Ok(greedy)) => Ok(with_note(
                greedy,
                "the exact model found no placement although the greedy search did; greedy used".into(),
            )),
            (ReplicaExact::NoAnswer(reason), Ok(greedy)) => {
                Ok(with_note(greedy, format!("the exact solver gave no answer ({reason}); greedy used")))
            }
            (ReplicaExact::NoAnswer(reason), Err(failure)) => {
                let mut unplaced = (*failure).into_unplaced();
                unplaced.reason = format!("{}; the exact solver gave no answer ({reason})", unplaced.reason);
                Err(unplaced)
            }
        }
    }

    /// The greedy search with backtracking (the module doc), its planner calls in `steps_out`.
    fn search_replica(
        &mut self,
        ledger: &GpuUse,
        replica: &Replica,
        ReplicaScopes { required, preferred }: ReplicaScopes,
        offered: Option<&[bool]>,
        role_offered: Option<(usize, &[bool])>,
        steps_out: &mut u32,
    ) -> Result<ReplicaPlacement, Box<SearchFailure>> {
        let unplaced = |reason: String| Unplaced { gang: replica.name.clone(), reason, explanation: None };
        let gpu_less_roles: Vec<String> =
            replica.roles.iter().filter(|r| r.gang.is_none()).map(|r| r.name.clone()).collect();
        let parts = self
            .parts_of(replica)
            .map_err(|e| Box::new(SearchFailure { unplaced: unplaced(e.to_string()), limited: None }))?;
        let need = replica.total_gpus();
        let exhaustive = vec![false; parts.len()];
        let several_products = self.cluster().products().len() > 1;
        let mut search = Search {
            planner: self,
            parts,
            replica,
            offered,
            role_offered,
            steps: 0,
            failure: None,
            capped: false,
            limit: REPLICA_SEARCH_STEPS_MAX,
            exhaustive,
            several_products,
        };
        let mut failures: Vec<(String, Failure)> = Vec::new();
        let mut outcome = None;
        if preferred.is_some() && preferred != required && within_scope(preferred, required) {
            let regions = search.regions(ledger, preferred, need);
            search.limit = REPLICA_SEARCH_STEPS_MAX / 2;
            outcome = search.best_region(ledger, regions, &mut Vec::new());
            // The required pass's reason speaks for itself.
            search.capped = false;
        }
        let regions = search.regions(ledger, required, need);
        let roomy = regions.len();
        if outcome.is_none() {
            search.limit = REPLICA_SEARCH_STEPS_MAX;
            outcome = search.best_region(ledger, regions, &mut failures);
        }
        let exhausted = search.steps >= REPLICA_SEARCH_STEPS_MAX;
        let steps = search.steps;
        *steps_out = steps;
        let Some((region, placements, score)) = outcome else {
            let reason = if roomy == 0 {
                match &replica.required {
                    Some(scope) => format!("no {scope} has the {need} free GPUs the replica needs"),
                    None => format!("fewer than the {need} GPUs the replica needs are free"),
                }
            } else {
                search.failure_text(&failures)
            };
            // With `explain`, the planner's explanation of the first region's failing part.
            let explanation = failures.iter_mut().find_map(|(_, failure)| failure.explanation.take());
            let limited = if exhausted {
                Some(format!(
                    "the search stopped at its limit of {REPLICA_SEARCH_STEPS_MAX} planner calls, so a placement may exist"
                ))
            } else if search.capped {
                Some(format!(
                    "the search tried at most {PART_BRANCHES_MAX} domains per role or slice, so a placement may exist"
                ))
            } else {
                None
            };
            return Err(Box::new(SearchFailure { unplaced: Unplaced { explanation, ..unplaced(reason) }, limited }));
        };
        let parts = finish(replica, &search.parts, placements);
        let note =
            exhausted.then(|| format!("the search stopped at its limit of {REPLICA_SEARCH_STEPS_MAX} planner calls"));
        Ok(ReplicaPlacement {
            replica: replica.name.clone(),
            region,
            parts,
            gpu_less_roles,
            score,
            steps,
            note,
            solver: SolverInfo::greedy(score),
        })
    }

    /// The search's parts in placing order (see the module doc).
    pub(super) fn parts_of(&self, replica: &Replica) -> Result<Vec<Part>, super::GangInputError> {
        let mut parts = Vec::new();
        for (index, role) in replica.roles.iter().enumerate() {
            let Some(gang) = &role.gang else { continue };
            let own = self.resolve(gang, &gang.required, "required")?;
            let own_level = match own {
                Some(ResolvedScope::Level(level)) => Some(level),
                _ => None,
            };
            let role_gpus = gang.total_gpus();
            match &role.slices {
                None => parts.push(Part {
                    role: index,
                    slice: None,
                    gang: gang.clone(),
                    branch: own_level,
                    role_level: None,
                    first_slice: false,
                    role_gpus,
                    apart: None,
                }),
                Some(slicing) => {
                    let scope = self.resolve_slice_scope(&gang.name, &slicing.scope)?;
                    let branch = match scope {
                        Some(ResolvedScope::Level(level)) => Some(level),
                        _ => own_level,
                    };
                    if let (Some(slice), Some(own)) = (branch, own_level) {
                        if slice < own {
                            return Err(super::GangInputError::SliceWiderThanRole {
                                gang: gang.name.clone(),
                                slice: slicing.scope.to_string(),
                                role: gang.required.as_ref().map(ToString::to_string).unwrap_or_default(),
                            });
                        }
                    }
                    let slice_gang =
                        Gang { members: slicing.members, required: Some(slicing.scope.clone()), ..gang.clone() };
                    let apart = slicing.exclusive.then_some(match scope {
                        Some(ResolvedScope::Level(level)) => Some(level),
                        _ => None,
                    });
                    // `Replica::check` has made sure the slices divide the role.
                    for slice in 0..role.members / slicing.members.max(1) {
                        parts.push(Part {
                            role: index,
                            slice: Some(slice),
                            gang: slice_gang.clone(),
                            branch,
                            role_level: own_level,
                            first_slice: slice == 0,
                            role_gpus,
                            apart,
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

    /// The regions of a replica scope with at least `need` GPUs free, the tightest first.
    fn regions(&self, ledger: &GpuUse, scope: Option<ResolvedScope>, need: u64) -> Vec<Region> {
        regions(self.cluster(), self.offered, ledger, scope, need)
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
            if found == REPLICA_CHOICES_MAX || self.steps >= self.limit {
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
                let score = weighted_score(&chosen);
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
        self.keep_slices_apart(k, chosen, &mut within);
        if let Some((_, own)) = self.role_offered.filter(|(role, _)| *role == self.parts[k].role) {
            for (host, flag) in within.iter_mut().enumerate() {
                *flag &= own.get(host).copied().unwrap_or(false);
            }
        }
        let part = &self.parts[k];
        // A part that also goes over GPU products starts from the planner's own choice; the
        // other products with room are added only when the parts after it found none.
        let over_products = self.branches_over_products(k);
        let mut branches: Vec<(Option<u32>, Option<ProductId>)> = if part.branch.is_some() || part.first_slice {
            self.branches(scratch, k, domains, &within)
        } else {
            vec![(None, None)]
        };
        self.exhaustive[k] = branches.len() <= PART_BRANCHES_MAX;
        if branches.is_empty() {
            let need = part.gang.total_gpus();
            let mut place = match part.branch {
                Some(level) => format!("no {} of the region", super::short_level(&self.cluster().levels[level])),
                None => "no GPU product of the region".to_string(),
            };
            if part.apart.is_some() && part.slice.is_some_and(|s| s > 0) {
                place.push_str(" outside those the role's earlier slices took (its slices are exclusive)");
            }
            self.note_failure(k, format!("{place} has the {need} GPUs it needs free"), None);
            return false;
        }
        let mut held = 0;
        let mut tried = 0;
        while tried < branches.len() {
            let (domain, product) = branches[tried];
            tried += 1;
            if self.steps >= self.limit {
                break;
            }
            if held == PART_BRANCHES_MAX {
                // More domains could hold this part; the search does not try them.
                self.capped = true;
                break;
            }
            let mask = self.mask(k, domain, product, &within);
            self.steps += 1;
            let request = PlaceRequest::new(&self.parts[k].gang).within(Some(&mask)).outside(Outside::Region);
            let placement = self.planner.place(&*scratch, request);
            let placement = match placement {
                Ok(placement) => placement,
                Err(unplaced) => {
                    self.note_failure(k, unplaced.reason, unplaced.explanation);
                    continue;
                }
            };
            let planner_product = placement.product;
            held += 1;
            if let Err(error) = scratch.reserve(&k, &placement.holding()) {
                // The planner read this scratch ledger: a refusal is a planner bug; try on.
                self.note_failure(k, format!("the ledger refused the part's placement: {error}"), None);
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
            if over_products && tried == 1 {
                // The planner's choice held this part but not the parts after it: each other
                // product with room for it, the tightest first (none in a region of one).
                let others = self.branches(scratch, k, domains, &within);
                branches.extend(others.into_iter().filter(|&(_, p)| p != Some(planner_product)));
            }
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

    /// A slice of a role with exclusive slices stays out of every domain (or host) an earlier
    /// slice of its role took.
    fn keep_slices_apart(&self, k: usize, chosen: &[GangPlacement], within: &mut [bool]) {
        let part = &self.parts[k];
        let Some(level) = part.apart else { return };
        let cluster = self.cluster();
        for (j, earlier) in self.parts[..k].iter().enumerate() {
            if earlier.role != part.role || earlier.slice.is_none() {
                continue;
            }
            for member in &chosen[j].members {
                let taken = cluster.host(member.host);
                for (host, flag) in within.iter_mut().enumerate() {
                    let same = match level {
                        Some(level) => cluster.hosts[host].domain_path[level] == taken.domain_path[level],
                        None => host as HostId == member.host,
                    };
                    *flag &= !same;
                }
            }
        }
    }

    /// Part `k`'s branches as (domain, product), the tightest first: the domains of its
    /// branch level inside `within` with the part's GPUs free (none before its predecessor
    /// slice's domain), or the whole of `within` when it has no level. The first slice of a
    /// role also branches over GPU products, and over domains whose enclosing domain of the
    /// role's own level has room for the whole role. Masks are built only for the branches
    /// tried ([`Search::mask`]).
    fn branches(
        &self,
        scratch: &Ledger<usize>,
        k: usize,
        domains: &[Option<u32>],
        within: &[bool],
    ) -> Vec<(Option<u32>, Option<ProductId>)> {
        let cluster = self.cluster();
        let part = &self.parts[k];
        let need = part.gang.total_gpus();
        let range_of = |level: Option<usize>, domain: Option<u32>| hosts_of(cluster, level, domain);
        // Room for the whole role, per (role-level domain, product): several candidates
        // share one enclosing domain.
        let mut rooms: std::collections::HashMap<(Option<u32>, Option<ProductId>), u64> = Default::default();
        let free_in = |hosts: std::ops::Range<u32>, product: Option<ProductId>| -> u64 {
            hosts
                .filter(|&h| within[h as usize] && product.is_none_or(|p| cluster.host(h).product == p))
                .map(|h| u64::from(scratch.free(h).count_ones()))
                .sum()
        };
        let products: Vec<Option<ProductId>> = if part.first_slice || self.branches_over_products(k) {
            cluster.products().into_iter().map(Some).collect()
        } else {
            vec![None]
        };
        let domain_list: Vec<Option<u32>> = match part.branch {
            Some(level) => {
                // Slices are interchangeable: after a predecessor slice whose branches were
                // all tried, none goes to a domain before the predecessor's.
                let floor = match k.checked_sub(1) {
                    Some(previous)
                        if part.slice.is_some()
                            && self.parts[previous].role == part.role
                            && self.exhaustive[previous] =>
                    {
                        domains[previous].unwrap_or(0)
                    }
                    _ => 0,
                };
                (floor..cluster.domains[level].len() as u32).map(Some).collect()
            }
            None => vec![None],
        };
        // (free GPUs, domain, product) per candidate, the tightest first.
        let mut candidates: Vec<(u64, Option<u32>, Option<ProductId>)> = Vec::new();
        for domain in domain_list {
            let hosts = range_of(part.branch, domain);
            for &product in &products {
                let free = free_in(hosts.clone(), product);
                if free < need {
                    continue;
                }
                if part.first_slice {
                    // Room for the whole role: in the domain of the role's own level around
                    // this candidate, or in the region.
                    let around = match (part.role_level, part.branch) {
                        (Some(role_level), Some(level)) if level >= role_level => {
                            let first = hosts.start;
                            Some(cluster.host(first).domain_path[role_level])
                        }
                        _ => None,
                    };
                    let room = *rooms
                        .entry((around, product))
                        .or_insert_with(|| free_in(range_of(part.role_level, around), product));
                    if room < part.role_gpus {
                        continue;
                    }
                }
                candidates.push((free, domain, product));
            }
        }
        candidates.sort();
        candidates.into_iter().map(|(_, domain, product)| (domain, product)).collect()
    }

    /// Whether part `k` also branches over GPU products, after the planner's own choice: a
    /// role without slices or a level scope, on a cluster of several products. The planner's
    /// choice for it may take the only product a later role can use (a memory floor only one
    /// product meets); the search then goes back and tries the role on each product. (A
    /// sliced role's first slice branches over products anyway, later slices keep to its
    /// product, and a role with a level scope branches over its domains.)
    fn branches_over_products(&self, k: usize) -> bool {
        let part = &self.parts[k];
        part.slice.is_none() && part.branch.is_none() && self.several_products
    }

    /// The hosts of one branch of part `k`: `within`, inside `domain` of its branch level
    /// and of `product` when given.
    fn mask(&self, k: usize, domain: Option<u32>, product: Option<ProductId>, within: &[bool]) -> Vec<bool> {
        let cluster = self.cluster();
        let hosts = hosts_of(cluster, self.parts[k].branch, domain);
        (0..cluster.hosts.len() as u32)
            .map(|h| within[h as usize] && hosts.contains(&h) && product.is_none_or(|p| cluster.host(h).product == p))
            .collect()
    }

    fn note_failure(&mut self, k: usize, reason: String, explanation: Option<super::Explanation>) {
        if self.failure.as_ref().is_none_or(|f| k >= f.part) {
            self.failure = Some(Failure { part: k, reason, explanation });
        }
    }

    /// What a part is called in a reason: `role decode`, `role workers (slice 2 of 4)`.
    fn part_name(&self, k: usize) -> String {
        let part = &self.parts[k];
        let role = &self.replica.roles[part.role];
        match (part.slice, &role.slices) {
            (Some(slice), Some(slicing)) => {
                format!("role `{}` slice {slice} (of {})", role.name, role.members / slicing.members.max(1))
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
}

/// The replica's score: its parts' score totals weighted by their GPUs.
fn weighted_score(chosen: &[GangPlacement]) -> f64 {
    let gpus = |p: &GangPlacement| p.gpus() as f64;
    let total: f64 = chosen.iter().map(gpus).sum();
    if total == 0.0 {
        return 0.0;
    }
    chosen.iter().map(|p| p.score.total * gpus(p)).sum::<f64>() / total
}

/// The placements in part order as parts, members numbered within their role.
fn finish(replica: &Replica, parts: &[Part], placements: Vec<GangPlacement>) -> Vec<PartPlacement> {
    placements
        .into_iter()
        .zip(parts)
        .map(|(mut placement, part)| {
            let role = &replica.roles[part.role];
            if let (Some(slice), Some(slicing)) = (part.slice, &role.slices) {
                for member in &mut placement.members {
                    member.member += slice * slicing.members;
                }
            }
            PartPlacement { role: role.name.clone(), slice: part.slice, placement }
        })
        .collect()
}

/// The regions of a scope (a replica's, or a sliced role's) with at least `need` GPUs free on
/// the hosts `offered` flags, the tightest first: every domain of a level, every host, every
/// NVLink clique and host outside one, or the whole cluster for no scope.
pub(super) fn regions(
    cluster: &Cluster,
    offered: Option<&[bool]>,
    ledger: &GpuUse,
    scope: Option<ResolvedScope>,
    need: u64,
) -> Vec<Region> {
    let is_offered = |host: HostId| offered.is_none_or(|flags| flags.get(host as usize).copied().unwrap_or(false));
    let mut regions: Vec<Region> = match scope {
        None => vec![Region { label: "cluster".into(), hosts: (0..cluster.hosts.len() as HostId).collect(), free: 0 }],
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
        region.free =
            region.hosts.iter().filter(|&&h| is_offered(h)).map(|&h| u64::from(ledger.free(h).count_ones())).sum();
    }
    regions.retain(|r| r.free >= need);
    regions.sort_by_key(|r| r.free);
    regions
}

/// Why the search placed nothing: the reason naming the role that did not fit, and what
/// limited the search (so that a placement may exist), if anything did.
struct SearchFailure {
    unplaced: Unplaced,
    limited: Option<String>,
}

impl SearchFailure {
    /// The unplaced replica, its reason saying what limited the search.
    fn into_unplaced(self) -> Unplaced {
        let SearchFailure { mut unplaced, limited } = self;
        if let Some(limited) = limited {
            unplaced.reason = format!("{}; {limited}", unplaced.reason);
        }
        unplaced
    }
}

/// A replica's own scopes, resolved.
#[derive(Debug, Clone, Copy)]
pub(super) struct ReplicaScopes {
    pub(super) required: Option<ResolvedScope>,
    pub(super) preferred: Option<ResolvedScope>,
}

/// The hosts of a domain of `level` (a contiguous range), or every host when either is
/// `None`.
fn hosts_of(cluster: &Cluster, level: Option<usize>, domain: Option<u32>) -> std::ops::Range<u32> {
    match (level, domain) {
        (Some(level), Some(index)) => cluster.domains[level][index as usize].hosts.clone(),
        _ => 0..cluster.hosts.len() as u32,
    }
}

/// Whether every domain of `inner` lies inside one domain of `outer` (`None`: the whole
/// cluster). Levels nest; a host lies inside every level; an NVLink clique may span racks,
/// so it lies inside nothing but the cluster.
pub(super) fn within_scope(inner: Option<ResolvedScope>, outer: Option<ResolvedScope>) -> bool {
    match (inner, outer) {
        (_, None) => true,
        (Some(ResolvedScope::Level(inner)), Some(ResolvedScope::Level(outer))) => inner >= outer,
        // A host lies in one domain of every level, and in one NVLink region (its clique or
        // itself).
        (Some(ResolvedScope::Host), Some(_)) => true,
        (Some(ResolvedScope::Nvlink), Some(ResolvedScope::Nvlink)) => true,
        _ => false,
    }
}
