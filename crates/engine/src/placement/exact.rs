//! Exact placement: one gang as a mixed-integer linear program (good_lp), solved by
//! microlp (pure Rust, always built) or HiGHS (cargo feature `highs`).
//!
//! The model, per GPU product (a gang never mixes products), over a candidate host set:
//! - `x[h,o]` binary: host `h` takes option `o`, i.e. `n` units on concrete GPUs. Uniform
//!   hosts have one option per `n` (all GPU sets are equivalent); uneven hosts (cube-mesh,
//!   bridged pairs, groups) have one per distinct GPU set, so the solver picks the GPUs.
//! - `y[d]` binary: the domain that holds the whole gang (a host, an NVLink clique, a
//!   topology domain, or the cluster); exactly one; a host may be used only inside it.
//!   `topology.required` removes the domains wider than its scope.
//! - `sum n * x = units` (all or nothing: the model is infeasible, never partial).
//! - fragmentation: per free shape `t[s] >= lost[s] - used`, `t >= 0`; rack room with an
//!   integer count of free slots per rack.
//!
//! The objective is the scoring function of [`super::score`] term by term: locality of the
//! chosen domain, memory fit, fragmentation and connectivity. The decoded placement is
//! scored again by [`Planner::evaluate`], so greedy and exact answers are compared by the
//! same code. When the solver stops at its time limit, the bound comes from the LP
//! relaxation.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use good_lp::{
    constraint, variable, Constraint, Expression, ProblemVariables, ResolutionError, Solution, SolutionStatus,
    SolverModel, Variable, WithTimeLimit,
};

use super::gpus::{unit_quality, ChosenUnit};
use super::score::{self, shape_gpus, FreeShape, WeightedShape};
use super::{
    gang_is_nvlink_connected, BuildContext, CandidateScope, GangPlacement, MemberPlacement, Planner, ResolvedScope,
    SolverInfo, Unplaced,
};
use crate::ledger::{mask_indices, GpuUse, Ledger};
use crate::topology::{GpuMask, HostId, ProductId};
use crate::workload::Gang;

pub(super) mod replica;

/// GPU-set choices per host and unit count on unevenly linked hosts.
pub const OPTIONS_PER_HOST_MAX: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum Backend {
    Microlp,
    Highs,
}

impl Backend {
    pub fn parse(name: &str) -> Result<Self, String> {
        match name.trim() {
            "microlp" => Ok(Backend::Microlp),
            "highs" if cfg!(feature = "highs") => Ok(Backend::Highs),
            "highs" => Err("this build has no HiGHS backend (build with `--features highs`)".into()),
            other => Err(format!("unknown MILP backend `{other}` (expected microlp or highs)")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Microlp => "microlp",
            Backend::Highs => "highs",
        }
    }

    /// The backends this build has.
    pub fn available() -> Vec<Backend> {
        let mut backends = vec![Backend::Microlp];
        if cfg!(feature = "highs") {
            backends.push(Backend::Highs);
        }
        backends
    }
}

/// Which hosts the model may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CandidateHosts {
    /// The hosts of the greedy planner's best `n` candidates (all eligible hosts when the
    /// greedy planner finds none, so infeasibility is proven over the whole cluster).
    FromGreedy(usize),
    /// Every host that can take at least one unit.
    All,
}

#[derive(Debug, Clone)]
pub struct ExactConfig {
    pub backend: Backend,
    pub time_limit: Duration,
    pub candidates: CandidateHosts,
    /// Candidate hosts per product; beyond it the set is cut (best candidates first) and
    /// infeasibility is no longer a proof.
    pub hosts_max: usize,
    /// Models with more variables are not solved (used by `auto`: exact only where it is
    /// expected to finish inside the time limit).
    pub variables_max: Option<usize>,
}

/// `auto` solves exactly only models up to this many variables; measured to finish well
/// inside the default time limit with microlp (see docs/results/exact-gap.md).
pub const AUTO_VARIABLES_MAX: usize = 2_000;

impl Default for ExactConfig {
    fn default() -> Self {
        ExactConfig {
            backend: Backend::Microlp,
            time_limit: Duration::from_secs(2),
            candidates: CandidateHosts::FromGreedy(8),
            hosts_max: 400,
            variables_max: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum ExactOutcome {
    Placed(Box<GangPlacement>),
    /// No placement exists among every eligible host: a proof, not a time-out.
    Infeasible(Unplaced),
    /// No answer: the time limit came before any solution, the candidate set was cut, or
    /// the gang's shape is outside the model.
    NoAnswer {
        reason: String,
    },
}

/// Statistics of one exact solve, for benchmarks.
#[derive(Debug, Clone, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct ExactStats {
    pub hosts: usize,
    pub variables: usize,
    pub solve_time: Duration,
}

struct HostOption {
    host: HostId,
    units: u32,
    chosen: Vec<ChosenUnit>,
    mask: GpuMask,
    /// 0.5 x quality + 0.5 x remaining connectivity, weighted by GPUs.
    connectivity_weighted: f64,
    /// Per shape (0 for rack room, which the model counts per rack).
    lost: Vec<f64>,
    breaks_whole_host: bool,
    /// Any GPUs of the host would do as well (uniform links): in a joint batch the GPUs
    /// are chosen after the solve, and only the count is constrained.
    interchangeable: bool,
}

struct DomainChoice {
    scope: CandidateScope,
    hosts: Vec<HostId>,
    locality: f64,
}

struct SolvedModel {
    chosen: Vec<usize>,
    objective: f64,
    status: SolutionStatus,
}

impl Planner<'_> {
    /// Places one gang exactly over its candidate hosts; reserves nothing.
    pub fn place_exact(
        &mut self,
        ledger: &impl AsRef<GpuUse>,
        gang: &Gang,
        config: &ExactConfig,
    ) -> (ExactOutcome, ExactStats) {
        let ledger = ledger.as_ref();
        let (outcome, stats, _) = self.place_exact_and_greedy(ledger, gang, config, None);
        (outcome, stats)
    }

    /// [`Planner::place_exact`], also handing back the greedy placement it computes for its
    /// candidate ranking, so that callers comparing or falling back do not compute it again.
    /// With `offered`, only the flagged hosts (indexed by host id) are considered.
    pub fn place_exact_and_greedy(
        &mut self,
        ledger: &impl AsRef<GpuUse>,
        gang: &Gang,
        config: &ExactConfig,
        offered: Option<&[bool]>,
    ) -> (ExactOutcome, ExactStats, Result<GangPlacement, Unplaced>) {
        let ledger = ledger.as_ref();
        let started = Instant::now();
        let mut stats = ExactStats::default();
        let no_answer = |reason: String| ExactOutcome::NoAnswer { reason };
        let mut ranking = Vec::new();
        let greedy = self.place_ranked(ledger, gang, Some(&mut ranking), offered, super::Outside::NotOffered);
        let (required, preferred) =
            match (self.resolve(gang, &gang.required, "required"), self.resolve(gang, &gang.preferred, "preferred")) {
                (Ok(r), Ok(p)) => (r, p),
                (Err(e), _) | (_, Err(e)) => return (no_answer(e.to_string()), stats, greedy),
            };
        let (unit_shape, member_shape) = super::shapes_of(gang);
        let mut tally = super::RejectionTally::default();
        let capacity = self.host_capacity(ledger, gang, unit_shape, member_shape, offered, &mut tally);
        if !capacity.pools.is_empty() {
            return (
                no_answer("tensor-parallel groups larger than a host are placed by the greedy solver only".into()),
                stats,
                greedy,
            );
        }
        let whole_free = score::WholeFreeIndex::new(self.cluster, ledger);
        let context = BuildContext { ledger, gang, whole_free: &whole_free, preferred, unit_shape, member_shape };
        let hosts = self.exact_candidate_hosts(&capacity.units, &ranking, config);
        let solved = self.solve_per_product(&context, &hosts, (required, preferred), config, started, &mut stats);
        stats.solve_time = started.elapsed();
        let outcome = self.exact_outcome(gang, config, &hosts, solved, &greedy);
        (outcome, stats, greedy)
    }

    /// The exact model's candidate hosts per product: the hosts of the greedy planner's best
    /// ranked scopes (or of the whole cluster), eligible ones only, at most `hosts_max` each.
    fn exact_candidate_hosts(
        &self,
        units: &[u32],
        ranking: &[(ProductId, CandidateScope)],
        config: &ExactConfig,
    ) -> ExactHosts {
        let mut per_product: BTreeMap<ProductId, Vec<HostId>> = BTreeMap::new();
        let eligible = |h: HostId| units[h as usize] > 0;
        let seeds: Vec<(ProductId, CandidateScope)> = match config.candidates {
            CandidateHosts::FromGreedy(count) if !ranking.is_empty() => ranking.iter().take(count).copied().collect(),
            _ => self.cluster.products().into_iter().map(|p| (p, CandidateScope::Cluster)).collect(),
        };
        for (product, scope) in seeds {
            let hosts = per_product.entry(product).or_default();
            for host in self.scope_hosts(scope) {
                if eligible(host) && self.cluster.host(host).product == product && !hosts.contains(&host) {
                    hosts.push(host);
                }
            }
        }
        let mut truncated = false;
        for hosts in per_product.values_mut() {
            if hosts.len() > config.hosts_max {
                hosts.truncate(config.hosts_max);
                truncated = true;
            }
            hosts.sort_unstable();
        }
        let complete = !truncated
            && per_product.values().map(Vec::len).sum::<usize>()
                == (0..self.cluster.hosts.len() as HostId).filter(|&h| eligible(h)).count();
        ExactHosts { per_product, truncated, complete }
    }

    /// One MILP per product over its candidate hosts, within the time limit from `started`;
    /// the best decoded placement by the shared score, and how the solves ended.
    fn solve_per_product(
        &mut self,
        context: &BuildContext,
        hosts: &ExactHosts,
        (required, preferred): (Option<ResolvedScope>, Option<ResolvedScope>),
        config: &ExactConfig,
        started: Instant,
        stats: &mut ExactStats,
    ) -> ProductSolves {
        let mut best: Option<(GangPlacement, f64)> = None;
        let mut all_optimal = true;
        let mut bound_max: Option<f64> = None;
        let mut errors = Vec::new();
        let mut timed_out = false;
        for (&product, hosts) in &hosts.per_product {
            stats.hosts += hosts.len();
            let deadline = config.time_limit.saturating_sub(started.elapsed());
            let Some(model) = self.exact_model(context, hosts, required, preferred) else { continue };
            stats.variables += model.variable_count();
            if config.variables_max.is_some_and(|most| model.variable_count() > most) {
                errors.push(format!(
                    "{}: {} variables, over the limit of {}",
                    product.get().name,
                    model.variable_count(),
                    config.variables_max.unwrap_or(0)
                ));
                continue;
            }
            match model.solve(config.backend, deadline, false) {
                Ok(solved) => {
                    let bound = if matches!(solved.status, SolutionStatus::Optimal) {
                        solved.objective
                    } else {
                        all_optimal = false;
                        {
                            // The bound gets only the time that is left: the limit holds.
                            let left = config.time_limit.saturating_sub(started.elapsed());
                            if left.is_zero() {
                                f64::INFINITY
                            } else {
                                model.solve(config.backend, left, true).map_or(f64::INFINITY, |r| r.objective)
                            }
                        }
                    };
                    bound_max = Some(bound_max.map_or(bound, |b: f64| b.max(bound)));
                    let mut chosen: Vec<&HostOption> = solved.chosen.iter().map(|&i| &model.options[i]).collect();
                    chosen.sort_by_key(|o| o.host);
                    let units_by_host: Vec<(HostId, Vec<ChosenUnit>)> =
                        chosen.iter().map(|o| (o.host, o.chosen.clone())).collect();
                    let placement = self.decode(context, &model, product, &units_by_host, SolverInfo::greedy(0.0));
                    let total = placement.score.total;
                    if best.as_ref().is_none_or(|(b, _)| total > b.score.total + 1e-9) {
                        best = Some((placement, solved.objective));
                    }
                }
                Err(SolveError::Infeasible) => {}
                Err(SolveError::TimeLimit) => {
                    all_optimal = false;
                    timed_out = true;
                }
                Err(other) => {
                    all_optimal = false;
                    errors.push(format!("{}: {other}", product.get().name));
                }
            }
        }
        ProductSolves { best, all_optimal, bound_max, errors, timed_out }
    }

    /// What the per-product solves come to: a placement with its bound and gap, a proof that
    /// none exists (every eligible host was in the model and every solve ended), or no answer
    /// and why.
    fn exact_outcome(
        &self,
        gang: &Gang,
        config: &ExactConfig,
        hosts: &ExactHosts,
        solved: ProductSolves,
        greedy: &Result<GangPlacement, Unplaced>,
    ) -> ExactOutcome {
        let ProductSolves { best, all_optimal, bound_max, errors, timed_out } = solved;
        let (truncated, complete) = (hosts.truncated, hosts.complete);
        match best {
            Some((mut placement, solver_objective)) => {
                // No finite bound when the time ran out before the relaxation could run.
                let bound = bound_max.filter(|b| b.is_finite());
                let gap = bound.map(|b| (b - solver_objective).max(0.0) / b.abs().max(1e-9));
                let mut notes = Vec::new();
                if !all_optimal {
                    notes.push(format!("stopped at the time limit of {} ms", config.time_limit.as_millis()));
                }
                if truncated {
                    notes.push(format!("candidate hosts cut to {} per product", config.hosts_max));
                }
                placement.solver = SolverInfo {
                    solver: format!("exact/{}", config.backend.name()),
                    objective: placement.score.total,
                    bound,
                    gap,
                    note: (!notes.is_empty()).then(|| notes.join("; ")),
                };
                ExactOutcome::Placed(Box::new(placement))
            }
            None if errors.is_empty() && complete && !timed_out => {
                let unplaced = match greedy {
                    Err(unplaced) => unplaced.clone(),
                    Ok(_) => Unplaced {
                        gang: gang.name.clone(),
                        reason: "the exact model has no solution although the greedy planner found one".into(),
                        explanation: None,
                    },
                };
                ExactOutcome::Infeasible(unplaced)
            }
            None => {
                let reason = if !errors.is_empty() {
                    format!("solver failed: {}", errors.join("; "))
                } else if !complete && !timed_out {
                    "no solution over the pre-filtered candidate hosts (not a proof over the cluster)".into()
                } else {
                    format!("no solution within the time limit of {} ms", config.time_limit.as_millis())
                };
                ExactOutcome::NoAnswer { reason }
            }
        }
    }

    /// Plans a batch jointly: one MILP over every gang, maximising the GPUs placed first
    /// and then the sum of the gangs' scores. Each gang's score terms are taken against the
    /// starting state (gangs sharing a host or rack are not scored against each other
    /// inside the model); the placements are re-scored one by one afterwards, in batch
    /// order, as they are reserved. `Err` says why the batch cannot be planned jointly
    /// (the caller falls back to gang-by-gang planning); the ledger is then unchanged.
    pub fn plan_joint(
        &mut self,
        ledger: &mut Ledger,
        gangs: &[Gang],
        config: &ExactConfig,
    ) -> Result<JointPlan, String> {
        let started = Instant::now();
        let start = ledger.clone();
        let whole_free = score::WholeFreeIndex::new(self.cluster, &start);
        let mut formulation = Formulation::new(false);
        let mut per_gang: Vec<(Variable, Vec<ProductModel>)> = Vec::new();
        let mut variables = 0usize;
        for gang in gangs {
            let models = self.joint_gang_models(&start, &whole_free, gang, config, &mut formulation, &mut variables)?;
            per_gang.push(models);
        }
        let models = per_gang.iter().flat_map(|(_, models)| models.iter().map(|(_, model, x)| (model, x.as_slice())));
        shared_gpu_constraints(&mut formulation, models, start.gpus());
        // GPUs placed come first: one GPU outweighs any difference in scores.
        let per_gpu = 50.0 * gangs.len().max(1) as f64;
        for ((placed, _), gang) in per_gang.iter().zip(gangs) {
            formulation.objective += per_gpu * gang.total_gpus() as f64 * *placed;
        }
        let all_x: Vec<Variable> =
            per_gang.iter().flat_map(|(_, models)| models.iter().flat_map(|(_, _, x)| x.iter().copied())).collect();
        let solved =
            formulation.solve(config.backend, config.time_limit, &all_x).map_err(|e| format!("joint solve: {e}"))?;
        let chosen: BTreeSet<usize> = solved.chosen.iter().copied().collect();
        // The caller's ledger changes only when the whole plan decodes.
        let (plan, working) = self.decode_joint(&start, gangs, &per_gang, &chosen, config)?;
        *ledger = working;
        let optimal = matches!(solved.status, SolutionStatus::Optimal);
        Ok(JointPlan { plan, objective: solved.objective, optimal, variables, solve_time: started.elapsed() })
    }

    /// One gang's part of the joint model: a `placed` binary, switched on by exactly one
    /// product's model over the hosts with room for its units. Counts the variables against
    /// the model's limit.
    fn joint_gang_models(
        &mut self,
        start: &Ledger,
        whole_free: &score::WholeFreeIndex,
        gang: &Gang,
        config: &ExactConfig,
        formulation: &mut Formulation,
        variables: &mut usize,
    ) -> Result<(Variable, Vec<ProductModel>), String> {
        let required = self.resolve(gang, &gang.required, "required").map_err(|e| e.to_string())?;
        let preferred = self.resolve(gang, &gang.preferred, "preferred").map_err(|e| e.to_string())?;
        let (unit_shape, member_shape) = super::shapes_of(gang);
        let mut tally = super::RejectionTally::default();
        let capacity = self.host_capacity(start.gpus(), gang, unit_shape, member_shape, None, &mut tally);
        if !capacity.pools.is_empty() {
            return Err(format!(
                "gang `{}`: tensor-parallel groups larger than a host are planned greedily",
                gang.name
            ));
        }
        let context = BuildContext { ledger: start.gpus(), gang, whole_free, preferred, unit_shape, member_shape };
        let placed = formulation.binary();
        let mut models = Vec::new();
        let mut choice = Expression::from(0.0);
        for product in self.cluster.products() {
            let hosts: Vec<HostId> = (0..self.cluster.hosts.len() as HostId)
                .filter(|&h| capacity.units[h as usize] > 0 && self.cluster.host(h).product == product)
                .collect();
            if hosts.is_empty() {
                continue;
            }
            let Some(model) = self.exact_model(&context, &hosts, required, preferred) else { continue };
            *variables += model.variable_count() + 1;
            if let Some(most) = config.variables_max {
                if *variables > most {
                    return Err(format!("the joint model exceeds {most} variables"));
                }
            }
            let active = formulation.binary();
            choice += active;
            let x = model.add_to(formulation, Expression::from(active), 1.0);
            models.push((product, model, x));
        }
        formulation.constraints.push(constraint!(choice == placed));
        Ok((placed, models))
    }

    /// Decodes the joint solution in batch order, reserving each placement in a copy of
    /// `start`, re-scored as it is reserved; a gang the solution left out gets the reason.
    /// Returns the plan and the copy.
    fn decode_joint(
        &mut self,
        start: &Ledger,
        gangs: &[Gang],
        per_gang: &[(Variable, Vec<ProductModel>)],
        chosen: &BTreeSet<usize>,
        config: &ExactConfig,
    ) -> Result<(super::BatchPlan, Ledger), String> {
        let mut working = start.clone();
        let mut offsets = Vec::new();
        let mut offset = 0usize;
        for (_, models) in per_gang {
            let mut per_model = Vec::new();
            for (_, model, _) in models {
                per_model.push(offset);
                offset += model.options.len();
            }
            offsets.push(per_model);
        }
        let mut plan = super::BatchPlan::default();
        for index in super::batch_order(gangs) {
            let gang = &gangs[index];
            let models = &per_gang[index].1;
            let picked = models.iter().zip(&offsets[index]).find_map(|((product, model, _), &base)| {
                let options: Vec<&HostOption> = (0..model.options.len())
                    .filter(|i| chosen.contains(&(base + i)))
                    .map(|i| &model.options[i])
                    .collect();
                (!options.is_empty()).then_some((*product, model, options))
            });
            let Some((product, model, options)) = picked else {
                let reason = match self.place(start, gang) {
                    Err(unplaced) => unplaced.reason,
                    Ok(_) => {
                        "fits alone, but not together with the gangs placed: the joint plan maximises the GPUs placed"
                            .into()
                    }
                };
                plan.unplaced.push(Unplaced { gang: gang.name.clone(), reason, explanation: None });
                continue;
            };
            let solver = format!("exact-joint/{}", config.backend.name());
            let placement = self.decode_joint_gang(working.gpus(), gang, product, model, &options, solver)?;
            working.reserve(&gang.name, &placement.holding()).map_err(|e| format!("joint plan: {e}"))?;
            plan.placements.push(placement);
        }
        Ok((plan, working))
    }

    /// One gang of the joint solution as a placement against `working` (GPUs of uniform
    /// hosts chosen now, on what is still free), scored by the shared scoring function;
    /// `solver` names the solver in the placement.
    fn decode_joint_gang(
        &mut self,
        working: &GpuUse,
        gang: &Gang,
        product: ProductId,
        model: &ExactModel,
        options: &[&HostOption],
        solver: String,
    ) -> Result<GangPlacement, String> {
        let unit_shape =
            super::gpus::UnitShape { unit_gpus: gang.unit_gpus(), atom: gang.tensor_parallel.min(gang.unit_gpus()) };
        let mut units_by_host: Vec<(HostId, Vec<ChosenUnit>)> = Vec::new();
        for option in options {
            let host = self.cluster.host(option.host);
            let chosen = if option.interchangeable {
                self.chooser
                    .choose(host, working.free(option.host), option.units, unit_shape)
                    .ok_or_else(|| format!("gang `{}`: host `{}` lost its room", gang.name, host.name))?
            } else {
                option.chosen.clone()
            };
            units_by_host.push((option.host, chosen));
        }
        let current_whole_free = score::WholeFreeIndex::new(self.cluster, working);
        let preferred = self.resolve(gang, &gang.preferred, "preferred").map_err(|e| e.to_string())?;
        let context = BuildContext {
            ledger: working,
            gang,
            whole_free: &current_whole_free,
            preferred,
            unit_shape,
            member_shape: unit_shape,
        };
        let solver = SolverInfo { solver, objective: 0.0, bound: None, gap: None, note: None };
        Ok(self.decode(&context, model, product, &units_by_host, solver))
    }
}

/// GPUs are shared between the gangs of a joint model (or the parts of a replica): per host at most its free GPUs, and a
/// concrete GPU set (uneven hosts) at most once.
fn shared_gpu_constraints<'m>(
    formulation: &mut Formulation,
    models: impl IntoIterator<Item = (&'m ExactModel, &'m [Variable])>,
    start: &GpuUse,
) {
    let mut per_host: BTreeMap<HostId, Vec<(u32, GpuMask, bool, Variable)>> = BTreeMap::new();
    for (model, x) in models {
        for (option, &v) in model.options.iter().zip(x) {
            per_host.entry(option.host).or_default().push((
                option.mask.count_ones(),
                option.mask,
                option.interchangeable,
                v,
            ));
        }
    }
    for (host, options) in &per_host {
        let used: Expression = options.iter().map(|&(gpus, _, _, v)| f64::from(gpus) * v).sum();
        formulation.constraints.push(constraint!(used <= f64::from(start.free(*host).count_ones())));
        for gpu in mask_indices(start.free(*host)) {
            let holders: Vec<Variable> = options
                .iter()
                .filter(|&&(_, mask, interchangeable, _)| !interchangeable && mask & (1 << gpu) != 0)
                .map(|o| o.3)
                .collect();
            if holders.len() > 1 {
                formulation.constraints.push(constraint!(holders.iter().copied().sum::<Expression>() <= 1));
            }
        }
    }
}

impl Planner<'_> {
    fn scope_hosts(&self, scope: CandidateScope) -> Vec<HostId> {
        match scope {
            CandidateScope::Host(h) => vec![h],
            CandidateScope::Clique(c) => self.cluster.cliques[c as usize].hosts.clone(),
            CandidateScope::Domain(level, index) => self.cluster.domains[level][index as usize].hosts.clone().collect(),
            CandidateScope::Cluster => (0..self.cluster.hosts.len() as HostId).collect(),
        }
    }

    /// Locality of a domain as [`super::locality`] would score a gang filling it, with the
    /// preferred scope applied.
    fn domain_locality(&self, scope: CandidateScope, preferred: Option<ResolvedScope>, all_connected: bool) -> f64 {
        let levels = self.cluster.levels.len();
        let (value, met) = match scope {
            CandidateScope::Host(_) => (
                1.0,
                match preferred {
                    Some(ResolvedScope::Nvlink) => all_connected,
                    _ => true,
                },
            ),
            CandidateScope::Clique(c) => {
                let hosts = &self.cluster.cliques[c as usize].hosts;
                let shared = hosts.iter().map(|&h| self.cluster.shared_levels(hosts[0], h)).min().unwrap_or(levels);
                (
                    0.95,
                    match preferred {
                        Some(ResolvedScope::Host) => false,
                        Some(ResolvedScope::Level(level)) => shared > level,
                        _ => true,
                    },
                )
            }
            CandidateScope::Domain(level, _) => (
                0.9 * (level + 1) as f64 / levels as f64,
                match preferred {
                    None => true,
                    Some(ResolvedScope::Level(wanted)) => level >= wanted,
                    _ => false,
                },
            ),
            CandidateScope::Cluster => (0.0, preferred.is_none()),
        };
        if met {
            value
        } else {
            value * 0.5
        }
    }

    fn exact_model(
        &mut self,
        context: &BuildContext,
        hosts: &[HostId],
        required: Option<ResolvedScope>,
        preferred: Option<ResolvedScope>,
    ) -> Option<ExactModel> {
        let BuildContext { ledger, gang, whole_free, .. } = *context;
        let cluster = self.cluster;
        debug_assert!(hosts.windows(2).all(|w| w[0] < w[1]), "candidate hosts are sorted and distinct");
        let need = gang.units();
        let shapes = self.config.shapes.clone();
        let (options, host_units, options_cut) = self.host_options(context, hosts, required, &shapes);
        let domains = self.model_domains(hosts, &host_units, &options, need, required, preferred);
        if domains.is_empty() {
            return None;
        }
        let memory = super::score::memory_fit(cluster, gang.memory_floor_mib, hosts.iter().copied());
        // Rack room: per shape, the whole free hosts of each rack the candidates touch.
        let mut racks: BTreeMap<Option<u32>, Vec<HostId>> = BTreeMap::new();
        for &host in hosts {
            if ledger.used(host) == 0 && cluster.host(host).whole_host_slot() {
                racks.entry(cluster.host(host).domain_path.last().copied()).or_default().push(host);
            }
        }
        let racks: Vec<(u32, Vec<HostId>)> = racks
            .into_iter()
            .map(|(leaf, members)| {
                (leaf.map_or(whole_free.cluster_total, |d| whole_free.per_leaf_domain[d as usize]), members)
            })
            .collect();
        Some(ExactModel {
            options,
            domains,
            racks,
            shapes: shapes.iter().map(|s| (s.shape, s.weight, shape_gpus(s.shape, whole_free))).collect(),
            need,
            used_gpus: f64::from(gang.unit_gpus()) * f64::from(need),
            weights: self.config.weights,
            memory,
            host_gpus_max: f64::from(whole_free.host_gpus_max),
            options_cut,
        })
    }

    /// The model's host options: per candidate host, every unit count up to the gang's need,
    /// and per count the concrete GPU sets (uniform hosts: one, they are interchangeable),
    /// each with its connectivity and the free shapes it destroys. Also each host's most units,
    /// and whether some host's GPU sets were cut to [`OPTIONS_PER_HOST_MAX`] (or to one on a
    /// host with too many free GPUs to search): one gang takes any of them as well as another
    /// for its count, but parts of a replica sharing the host may need the sets left out.
    fn host_options(
        &mut self,
        context: &BuildContext,
        hosts: &[HostId],
        required: Option<ResolvedScope>,
        shapes: &[WeightedShape],
    ) -> (Vec<HostOption>, BTreeMap<HostId, u32>, bool) {
        let BuildContext { ledger, gang, unit_shape, .. } = *context;
        let cluster = self.cluster;
        let need = gang.units();
        let mut options: Vec<HostOption> = Vec::new();
        let mut host_units: BTreeMap<HostId, u32> = BTreeMap::new();
        let mut cut = false;
        for &host_id in hosts {
            let host = cluster.host(host_id);
            let free = ledger.free(host_id);
            let most = self.chooser.unit_count(host, free, unit_shape).min(need);
            host_units.insert(host_id, most);
            for units in 1..=most {
                let choices = self.chooser.choices(host, free, units, unit_shape, OPTIONS_PER_HOST_MAX);
                cut |= !super::gpus::choices_complete(host, free, unit_shape, choices.len(), OPTIONS_PER_HOST_MAX);
                for chosen in choices {
                    let mask = chosen.iter().fold(0, |m, u| m | u.gpus());
                    if required == Some(ResolvedScope::Nvlink)
                        && !crate::topology::graph::nvlink_connected(&host.links, mask)
                    {
                        continue;
                    }
                    let quality_weighted: f64 = chosen
                        .iter()
                        .map(|u| unit_quality(host, u, unit_shape) * f64::from(unit_shape.unit_gpus))
                        .sum();
                    let remaining =
                        super::gpus::remaining_connectivity(host, free & !mask) * f64::from(mask.count_ones());
                    let lost = shapes
                        .iter()
                        .map(|shape| match shape.shape {
                            FreeShape::Units(unit) => {
                                let before = self.chooser.unit_count(host, free, unit);
                                let after = self.chooser.unit_count(host, free & !mask, unit);
                                f64::from(before.saturating_sub(after)) * f64::from(unit.unit_gpus)
                            }
                            FreeShape::WholeHost if ledger.used(host_id) == 0 && host.whole_host_slot() => {
                                f64::from(host.gpu_count)
                            }
                            _ => 0.0,
                        })
                        .collect();
                    options.push(HostOption {
                        host: host_id,
                        units,
                        chosen,
                        mask,
                        connectivity_weighted: 0.5 * quality_weighted + 0.5 * remaining,
                        lost,
                        breaks_whole_host: ledger.used(host_id) == 0 && host.whole_host_slot(),
                        interchangeable: super::gpus::links_are_uniform(host, unit_shape),
                    });
                }
            }
        }
        (options, host_units, cut)
    }

    /// The domains that may hold the gang, innermost first: hosts that hold it alone, NVLink
    /// cliques, topology domains of the levels `required` allows, the cluster; each with the
    /// locality score it gives.
    fn model_domains(
        &self,
        hosts: &[HostId],
        host_units: &BTreeMap<HostId, u32>,
        options: &[HostOption],
        need: u32,
        required: Option<ResolvedScope>,
        preferred: Option<ResolvedScope>,
    ) -> Vec<DomainChoice> {
        let cluster = self.cluster;
        let capacity_in = |members: &[HostId]| -> u64 { members.iter().map(|h| u64::from(host_units[h])).sum() };
        let mut domains: Vec<DomainChoice> = Vec::new();
        // Only `preferred: nvlink` asks whether every option of a host is NVLink-connected.
        let mut all_connected: BTreeMap<HostId, bool> = BTreeMap::new();
        if preferred == Some(ResolvedScope::Nvlink) {
            for option in options {
                let connected = crate::topology::graph::nvlink_connected(&cluster.host(option.host).links, option.mask);
                *all_connected.entry(option.host).or_insert(true) &= connected;
            }
        }
        for &host in hosts {
            if host_units[&host] >= need {
                let connected = all_connected.get(&host).copied().unwrap_or(true);
                let locality = self.domain_locality(CandidateScope::Host(host), preferred, connected);
                domains.push(DomainChoice { scope: CandidateScope::Host(host), hosts: vec![host], locality });
            }
        }
        if required != Some(ResolvedScope::Host) {
            for (index, clique) in cluster.cliques.iter().enumerate() {
                let members: Vec<HostId> =
                    clique.hosts.iter().copied().filter(|h| host_units.contains_key(h)).collect();
                if members.len() < 2 || capacity_in(&members) < u64::from(need) {
                    continue;
                }
                if let Some(ResolvedScope::Level(level)) = required {
                    let first = cluster.host(clique.hosts[0]).domain_path[level];
                    if clique.hosts.iter().any(|&h| cluster.host(h).domain_path[level] != first) {
                        continue;
                    }
                }
                let scope = CandidateScope::Clique(index as u32);
                domains.push(DomainChoice {
                    scope,
                    hosts: members,
                    locality: self.domain_locality(scope, preferred, true),
                });
            }
        }
        if !matches!(required, Some(ResolvedScope::Host | ResolvedScope::Nvlink)) {
            let outermost = match required {
                Some(ResolvedScope::Level(level)) => level,
                _ => 0,
            };
            for level in (outermost..cluster.levels.len()).rev() {
                let mut seen = BTreeSet::new();
                for &host in hosts {
                    let index = cluster.host(host).domain_path[level];
                    if !seen.insert(index) {
                        continue;
                    }
                    // Candidate hosts are sorted and a domain is a host range: a slice.
                    let range = &cluster.domains[level][index as usize].hosts;
                    let first = hosts.partition_point(|h| *h < range.start);
                    let members: Vec<HostId> = hosts[first..hosts.partition_point(|h| *h < range.end)].to_vec();
                    if members.len() < 2 || capacity_in(&members) < u64::from(need) {
                        continue;
                    }
                    let scope = CandidateScope::Domain(level, index);
                    domains.push(DomainChoice {
                        scope,
                        hosts: members,
                        locality: self.domain_locality(scope, preferred, true),
                    });
                }
            }
            if required.is_none() && hosts.len() >= 2 && capacity_in(hosts) >= u64::from(need) {
                let scope = CandidateScope::Cluster;
                domains.push(DomainChoice {
                    scope,
                    hosts: hosts.to_vec(),
                    locality: self.domain_locality(scope, preferred, true),
                });
            }
        }
        domains
    }

    /// A placement from the units chosen per host, scored by [`Planner::evaluate`]; its
    /// scope is the innermost model domain that holds every host used.
    fn decode(
        &mut self,
        context: &BuildContext,
        model: &ExactModel,
        product: ProductId,
        units_by_host: &[(HostId, Vec<ChosenUnit>)],
        solver: SolverInfo,
    ) -> GangPlacement {
        let gang = context.gang;
        let (members, taken, quality_weighted) = members_from(gang, context.unit_shape, self.cluster, units_by_host);
        debug_assert!(
            gang.required != Some(crate::workload::Scope::Nvlink) || gang_is_nvlink_connected(self.cluster, &members)
        );
        let score = self.evaluate(context, &taken, quality_weighted);
        let scope = model
            .domains
            .iter()
            .find(|d| taken.iter().all(|(h, _)| d.hosts.contains(h)))
            .map_or(CandidateScope::Cluster, |d| d.scope);
        GangPlacement {
            gang: gang.name.clone(),
            product,
            scope: self.scope_text(scope),
            members,
            score,
            candidates: model.domains.len(),
            runner_up: None,
            explanation: None,
            solver: SolverInfo { objective: score.total, ..solver },
        }
    }
}

/// One gang's model for one product inside a joint batch, with its option variables.
type ProductModel = (ProductId, ExactModel, Vec<Variable>);

/// A batch planned by one MILP.
#[derive(Debug, Clone)]
pub struct JointPlan {
    pub plan: super::BatchPlan,
    /// The joint objective (GPUs placed x weight + summed scores).
    pub objective: f64,
    /// Proven optimal (else the time limit stopped it).
    pub optimal: bool,
    pub variables: usize,
    pub solve_time: Duration,
}

/// Members, GPUs per host and the quality sum of units chosen per host.
fn members_from(
    gang: &Gang,
    unit_shape: super::gpus::UnitShape,
    cluster: &crate::topology::Cluster,
    units_by_host: &[(HostId, Vec<ChosenUnit>)],
) -> (Vec<MemberPlacement>, Vec<(HostId, GpuMask)>, f64) {
    let mut members: Vec<MemberPlacement> = Vec::new();
    let mut taken = Vec::new();
    let mut quality = 0.0;
    for (host, units) in units_by_host {
        taken.push((*host, units.iter().fold(0, |m, u| m | u.gpus())));
        for unit in units {
            quality += unit_quality(cluster.host(*host), unit, unit_shape) * f64::from(unit_shape.unit_gpus);
            if gang.tensor_parallel <= gang.gpus_per_member {
                members.push(MemberPlacement { member: members.len() as u32, host: *host, gpus: unit.gpus() });
            } else {
                for chunk in mask_indices(unit.gpus()).chunks(gang.gpus_per_member as usize) {
                    let gpus = chunk.iter().fold(0, |m, &g| m | (1u64 << g));
                    members.push(MemberPlacement { member: members.len() as u32, host: *host, gpus });
                }
            }
        }
    }
    (members, taken, quality)
}

struct ExactModel {
    options: Vec<HostOption>,
    domains: Vec<DomainChoice>,
    /// (whole free hosts of the rack, the candidate hosts among them)
    racks: Vec<(u32, Vec<HostId>)>,
    shapes: Vec<(FreeShape, f64, f64)>,
    need: u32,
    used_gpus: f64,
    weights: super::Weights,
    memory: f64,
    host_gpus_max: f64,
    /// Some host's GPU sets were cut ([`Planner::host_options`]).
    options_cut: bool,
}

impl ExactModel {
    fn variable_count(&self) -> usize {
        self.options.len() + self.domains.len() + self.shapes.len() * (1 + self.racks.len())
    }

    fn solve(&self, backend: Backend, time_limit: Duration, relaxed: bool) -> Result<SolvedModel, SolveError> {
        let mut formulation = Formulation::new(relaxed);
        let x = self.add_to(&mut formulation, Expression::from(1.0), 1.0);
        formulation.solve(backend, time_limit, &x)
    }

    /// Adds this gang's variables, constraints and objective, switched on by `active`
    /// (the constant 1 for one gang; a product choice of one gang in a joint batch or of one
    /// part of a replica), its objective scaled by `weight` (1 but for a replica's parts,
    /// weighted by their GPUs). Returns the option variables, in `options` order.
    fn add_to(&self, f: &mut Formulation, active: Expression, weight: f64) -> Vec<Variable> {
        let x: Vec<Variable> = (0..self.options.len()).map(|_| f.binary()).collect();
        let y: Vec<Variable> = (0..self.domains.len()).map(|_| f.binary()).collect();
        // This gang's objective terms, added to the formulation's scaled by `weight`.
        let mut objective = Expression::from(0.0);
        objective += self.weights.memory * self.memory * active.clone();
        f.constraints.push(constraint!(y.iter().copied().sum::<Expression>() == active.clone()));
        let units: Expression = self.options.iter().zip(&x).map(|(o, &v)| f64::from(o.units) * v).sum();
        f.constraints.push(constraint!(units == f64::from(self.need) * active.clone()));
        let mut by_host: BTreeMap<HostId, Vec<Variable>> = BTreeMap::new();
        for (option, &v) in self.options.iter().zip(&x) {
            by_host.entry(option.host).or_default().push(v);
        }
        let mut domains_of: BTreeMap<HostId, Vec<Variable>> = BTreeMap::new();
        for (domain, &v) in self.domains.iter().zip(&y) {
            for host in &domain.hosts {
                domains_of.entry(*host).or_default().push(v);
            }
        }
        for (host, options) in &by_host {
            let used: Expression = options.iter().copied().sum();
            let inside: Expression =
                domains_of.get(host).map_or_else(|| Expression::from(0.0), |ys| ys.iter().copied().sum());
            f.constraints.push(constraint!(used.clone() <= inside));
            f.constraints.push(constraint!(used <= 1));
        }
        for (domain, &v) in self.domains.iter().zip(&y) {
            objective += self.weights.locality * domain.locality * v;
        }
        for (option, &v) in self.options.iter().zip(&x) {
            objective += self.weights.connectivity * option.connectivity_weighted / self.used_gpus * v;
        }
        let weight_sum: f64 = self.shapes.iter().map(|s| s.1).sum::<f64>().max(1e-12);
        for (index, &(shape, shape_weight, size)) in self.shapes.iter().enumerate() {
            let mut lost: Expression = self.options.iter().zip(&x).map(|(o, &v)| o.lost[index] * v).sum();
            if let FreeShape::RackRoom { hosts: slot } = shape {
                let slot = f64::from(slot.max(1));
                for (whole, members) in &self.racks {
                    let slots_before = (f64::from(*whole) / slot).floor();
                    let after = f.integer(slots_before);
                    let broken: Expression = self
                        .options
                        .iter()
                        .zip(&x)
                        .filter(|(o, _)| o.breaks_whole_host && members.contains(&o.host))
                        .map(|(_, &v)| Expression::from(v))
                        .sum();
                    f.constraints.push(constraint!(slot * after + broken <= f64::from(*whole)));
                    lost += (slots_before - after) * slot * self.host_gpus_max;
                }
            }
            let excess = f.vars.add(variable().min(0));
            f.constraints.push(constraint!(excess >= lost - self.used_gpus * active.clone()));
            let share = shape_weight / weight_sum;
            objective +=
                self.weights.fragmentation * share * (active.clone() - excess / self.used_gpus.max(size).max(1.0));
        }
        f.objective += weight * objective;
        x
    }
}

/// A MILP under construction: variables, constraints, objective (maximised).
struct Formulation {
    vars: ProblemVariables,
    constraints: Vec<Constraint>,
    objective: Expression,
    /// Integrality dropped: the LP relaxation, whose optimum bounds the MILP's.
    relaxed: bool,
}

impl Formulation {
    fn new(relaxed: bool) -> Self {
        Formulation {
            vars: ProblemVariables::new(),
            constraints: Vec::new(),
            objective: Expression::from(0.0),
            relaxed,
        }
    }

    fn binary(&mut self) -> Variable {
        if self.relaxed {
            self.vars.add(variable().min(0).max(1))
        } else {
            self.vars.add(variable().binary())
        }
    }

    fn integer(&mut self, most: f64) -> Variable {
        if self.relaxed {
            self.vars.add(variable().min(0).max(most))
        } else {
            self.vars.add(variable().integer().min(0).max(most))
        }
    }

    /// Solves and reports which of `x` are set.
    fn solve(self, backend: Backend, time_limit: Duration, x: &[Variable]) -> Result<SolvedModel, SolveError> {
        let Formulation { vars, constraints, objective, .. } = self;
        let problem = vars.maximise(objective.clone());
        let seconds = time_limit.as_secs_f64().max(0.001);
        match backend {
            Backend::Microlp => {
                finish(problem.using(good_lp::microlp).with_time_limit(seconds), constraints, &objective, x)
            }
            #[cfg(feature = "highs")]
            Backend::Highs => {
                // HiGHS stops at a relative gap of 0.01 % by default, which good_lp reports as
                // a gap limit. A proof is asked of it, as microlp gives one: with the relative
                // gap at 0 it stops only within its absolute tolerance (1e-6, below what scores
                // resolve), which good_lp still calls a gap limit: that is the optimum.
                let highs = problem
                    .using(good_lp::highs)
                    .set_threads(1)
                    .set_mip_rel_gap(0.0)
                    .map_err(|error| SolveError::Other(error.to_string()))?;
                finish(highs.with_time_limit(seconds), constraints, &objective, x).map(|mut solved| {
                    if matches!(solved.status, SolutionStatus::GapLimit) {
                        solved.status = SolutionStatus::Optimal;
                    }
                    solved
                })
            }
            #[cfg(not(feature = "highs"))]
            Backend::Highs => Err(SolveError::Other("built without the `highs` feature".into())),
        }
    }
}

/// The exact model's candidate hosts per product, and whether they are every eligible host.
struct ExactHosts {
    per_product: BTreeMap<ProductId, Vec<HostId>>,
    /// Some product had more than `hosts_max` candidates.
    truncated: bool,
    /// Every eligible host is a candidate: infeasibility is then a proof.
    complete: bool,
}

/// How the per-product solves ended.
struct ProductSolves {
    /// The best placement by the shared score, with the solver's objective for it.
    best: Option<(GangPlacement, f64)>,
    all_optimal: bool,
    /// The largest bound over the products (an LP relaxation's after a time-out).
    bound_max: Option<f64>,
    errors: Vec<String>,
    timed_out: bool,
}

/// good_lp's microlp backend reports a time limit reached before any feasible solution as
/// `ResolutionError::Other` with exactly this text (good_lp 1.15, `src/solvers/microlp.rs`);
/// good_lp has no variant for it. HiGHS answers a time limit with a solution whose status is
/// `TimeLimit` when it has found one; without one, good_lp reports HiGHS's `NoSolutionFound`
/// as an error like any other (unchanged: it was never read as a time-out). [`SolveError::from`] is the one place a solver's error text is read.
const MICROLP_TIME_LIMIT: &str = "Time limit reached before finding a feasible solution";

/// Why a solve gave no solution, as the exact planner acts on it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SolveError {
    /// No placement satisfies the model's constraints.
    Infeasible,
    /// The time limit came before any feasible solution.
    TimeLimit,
    /// Anything else the backend said (unbounded, an internal error, a backend not built).
    Other(String),
}

impl From<ResolutionError> for SolveError {
    fn from(error: ResolutionError) -> Self {
        match error {
            ResolutionError::Infeasible => SolveError::Infeasible,
            ResolutionError::Other(text) if text == MICROLP_TIME_LIMIT => SolveError::TimeLimit,
            other => SolveError::Other(other.to_string()),
        }
    }
}

impl std::fmt::Display for SolveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SolveError::Infeasible => f.write_str("infeasible"),
            SolveError::TimeLimit => f.write_str("the time limit came before any feasible solution"),
            SolveError::Other(text) => f.write_str(text),
        }
    }
}

fn finish<M: SolverModel>(
    mut model: M,
    constraints: Vec<Constraint>,
    objective: &Expression,
    x: &[Variable],
) -> Result<SolvedModel, SolveError>
where
    ResolutionError: From<M::Error>,
{
    for c in constraints {
        model = model.with(c);
    }
    let solution = model.solve().map_err(|e| SolveError::from(ResolutionError::from(e)))?;
    let chosen = x.iter().enumerate().filter(|(_, &v)| solution.value(v) > 0.5).map(|(i, _)| i).collect();
    Ok(SolvedModel { chosen, objective: solution.eval(objective), status: solution.status() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::{PlannerConfig, Unplaced};
    use crate::testkit::node;
    use crate::topology::{Cluster, ClusterSpec};
    use crate::workload::{GangSpec, Scope};

    fn gang(members: u32, gpus: u32, tp: u32, required: Option<Scope>) -> Gang {
        GangSpec { required, ..GangSpec::shape("g", members, gpus, tp) }.expand().remove(0)
    }

    /// Every way to place the gang: unit counts per host, then every GPU choice.
    fn brute_force_best(planner: &mut Planner, ledger: &Ledger, gang: &Gang) -> Option<f64> {
        let cluster = planner.cluster;
        let whole_free = score::WholeFreeIndex::new(cluster, ledger);
        let unit_shape = super::super::gpus::UnitShape {
            unit_gpus: gang.unit_gpus(),
            atom: gang.tensor_parallel.min(gang.unit_gpus()),
        };
        let required = planner.resolve(gang, &gang.required, "required").ok()?;
        let context = BuildContext {
            ledger: ledger.gpus(),
            gang,
            whole_free: &whole_free,
            preferred: None,
            unit_shape,
            member_shape: unit_shape,
        };
        let mut best: Option<f64> = None;
        let mut counts = vec![0u32; cluster.hosts.len()];
        fn walk(
            planner: &mut Planner,
            context: &BuildContext,
            required: Option<ResolvedScope>,
            index: usize,
            left: u32,
            counts: &mut Vec<u32>,
            best: &mut Option<f64>,
        ) {
            let cluster = planner.cluster;
            if index == counts.len() {
                if left > 0 {
                    return;
                }
                let used: Vec<HostId> = (0..counts.len()).filter(|&h| counts[h] > 0).map(|h| h as HostId).collect();
                let ok = match required {
                    Some(ResolvedScope::Host) => used.len() == 1,
                    Some(ResolvedScope::Level(level)) => used
                        .iter()
                        .all(|&h| cluster.host(h).domain_path[level] == cluster.host(used[0]).domain_path[level]),
                    _ => true,
                } && used.iter().all(|&h| cluster.host(h).product == cluster.host(used[0]).product);
                if !ok {
                    return;
                }
                // Every combination of each host's GPU choices.
                let per_host: Vec<Vec<Vec<ChosenUnit>>> = used
                    .iter()
                    .map(|&h| {
                        let host = cluster.host(h);
                        planner.chooser.choices(
                            host,
                            context.ledger.free(h),
                            counts[h as usize],
                            context.unit_shape,
                            10_000,
                        )
                    })
                    .collect();
                let mut pick = vec![0usize; used.len()];
                loop {
                    let mut taken = Vec::new();
                    let mut quality = 0.0;
                    for (slot, &h) in used.iter().enumerate() {
                        let chosen = &per_host[slot][pick[slot]];
                        taken.push((h, chosen.iter().fold(0, |m, u| m | u.gpus())));
                        quality += chosen
                            .iter()
                            .map(|u| {
                                unit_quality(cluster.host(h), u, context.unit_shape)
                                    * f64::from(context.unit_shape.unit_gpus)
                            })
                            .sum::<f64>();
                    }
                    let total = planner.evaluate(context, &taken, quality).total;
                    if best.is_none_or(|b| total > b) {
                        *best = Some(total);
                    }
                    let mut slot = 0;
                    loop {
                        if slot == pick.len() {
                            return;
                        }
                        pick[slot] += 1;
                        if pick[slot] < per_host[slot].len() {
                            break;
                        }
                        pick[slot] = 0;
                        slot += 1;
                    }
                }
            }
            let host = cluster.host(index as HostId);
            let most =
                planner.chooser.unit_count(host, context.ledger.free(index as HostId), context.unit_shape).min(left);
            for units in 0..=most {
                counts[index] = units;
                walk(planner, context, required, index + 1, left - units, counts, best);
            }
            counts[index] = 0;
        }
        walk(planner, &context, required, 0, gang.units(), &mut counts, &mut best);
        best
    }

    pub(super) fn tiny_cluster(seed: u64) -> Cluster {
        let kinds = [("H100", 8u8), ("V100-SXM2-16GB", 8), ("H100-NVL", 4), ("L40S", 4)];
        let mut state = seed;
        let mut next = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            state >> 33
        };
        let nodes = (0..4)
            .map(|i| {
                let (product, count) = kinds[(next() % 2 + if seed.is_multiple_of(2) { 0 } else { 2 }) as usize];
                let mut spec = node(&format!("n{i}"), product, count, &[("rack", if i < 2 { "r1" } else { "r2" })]);
                let used = next() & ((1u64 << count) - 1) & next();
                spec.allocated = mask_indices(used);
                spec
            })
            .collect();
        Cluster::build(ClusterSpec { name: "tiny".into(), levels: vec!["rack".into()], nodes }).expect("valid")
    }

    #[test]
    fn on_tiny_instances_the_exact_answer_is_the_brute_force_optimum() {
        let mut compared = 0;
        let mut greedy_below = 0;
        for seed in 0..40u64 {
            let cluster = tiny_cluster(seed);
            let ledger = Ledger::new(&cluster);
            for (members, gpus, tp, required) in [
                (1, 2, 2, None),
                (2, 2, 1, None),
                (2, 4, 4, None),
                (3, 1, 1, Some(Scope::Level("rack".into()))),
                (1, 4, 4, Some(Scope::Host)),
            ] {
                let gang = gang(members, gpus, tp, required.clone());
                let mut planner = Planner::new(&cluster, PlannerConfig::default());
                let brute = brute_force_best(&mut planner, &ledger, &gang);
                for backend in Backend::available() {
                    let config = ExactConfig {
                        backend,
                        candidates: CandidateHosts::All,
                        time_limit: Duration::from_secs(30),
                        ..Default::default()
                    };
                    let (outcome, _) = planner.place_exact(&ledger, &gang, &config);
                    match (brute, outcome) {
                        (Some(best), ExactOutcome::Placed(placement)) => {
                            assert!(
                                (placement.score.total - best).abs() < 1e-6,
                                "seed {seed} {gang:?}: exact {} vs brute {best}",
                                placement.score.total
                            );
                            // The model's objective is the scoring function itself.
                            let bound = placement.solver.bound.expect("bound");
                            assert!(
                                (bound - placement.score.total).abs() < 1e-6,
                                "model {bound} vs score {}",
                                placement.score.total
                            );
                            compared += 1;
                            // Exact is the optimum, so greedy is never above it.
                            let greedy =
                                planner.place(&ledger, &gang).expect("greedy places what exact places").score.total;
                            assert!(greedy <= best + 1e-9, "greedy {greedy} above the optimum {best}");
                            if greedy < best - 1e-9 {
                                greedy_below += 1;
                            }
                        }
                        (None, ExactOutcome::Infeasible(_)) => {}
                        (brute, other) => panic!("seed {seed} {gang:?}: brute {brute:?}, exact {other:?}"),
                    }
                }
            }
        }
        assert!(compared > 60, "compared {compared} placements");
        // Measured: greedy reaches the optimum on all of these (reported, not asserted:
        // a better exact answer is allowed, a better greedy one is a bug).
        eprintln!("greedy below the optimum in {greedy_below} of {compared}");
    }

    #[test]
    fn an_infeasible_gang_is_reported_infeasible_with_nothing_placed() {
        let cluster = tiny_cluster(3);
        let ledger = Ledger::new(&cluster);
        let mut planner = Planner::new(&cluster, PlannerConfig::default());
        let (outcome, _) = planner.place_exact(&ledger, &gang(9, 8, 8, None), &ExactConfig::default());
        assert!(
            matches!(outcome, ExactOutcome::Infeasible(Unplaced { ref reason, .. }) if !reason.is_empty()),
            "{outcome:?}"
        );
    }

    #[test]
    fn a_time_limit_gives_an_answer_with_its_bound_or_says_it_has_none() {
        let nodes = (0..300)
            .map(|i| {
                let mut spec = node(&format!("n{i:03}"), "V100-SXM2-16GB", 8, &[("rack", &format!("r{}", i / 10))]);
                spec.allocated = mask_indices(((i as u64 * 37) % 256) & 0b1001_0110);
                spec
            })
            .collect();
        let cluster =
            Cluster::build(ClusterSpec { name: "big".into(), levels: vec!["rack".into()], nodes }).expect("valid");
        let ledger = Ledger::new(&cluster);
        let mut planner = Planner::new(&cluster, PlannerConfig::default());
        let config =
            ExactConfig { candidates: CandidateHosts::All, time_limit: Duration::from_millis(1), ..Default::default() };
        match planner.place_exact(&ledger, &gang(6, 2, 2, None), &config).0 {
            ExactOutcome::Placed(placement) => {
                if let Some(bound) = placement.solver.bound {
                    assert!(bound + 1e-6 >= placement.solver.objective || placement.solver.note.is_some());
                }
                assert!(
                    placement.solver.note.is_some_and(|n| n.contains("time limit"))
                        || placement.solver.gap == Some(0.0)
                );
                assert_eq!(placement.members.len(), 6);
            }
            ExactOutcome::NoAnswer { reason } => assert!(reason.contains("time limit"), "{reason}"),
            ExactOutcome::Infeasible(unplaced) => panic!("feasible gang reported infeasible: {unplaced:?}"),
        }
    }

    fn named(mut gang: Gang, name: &str) -> Gang {
        gang.name = name.into();
        gang
    }

    #[test]
    fn a_joint_plan_places_what_one_by_one_strands() {
        // A TP-1 pod and a TP-4 pod of 4 GPUs each; one H100 and one L40S, 4 free GPUs each.
        // One by one, the TP-1 pod takes the better-linked H100 and the TP-4 pod, which
        // requires NVLink, finds none left. Jointly both fit.
        let cluster = Cluster::build(ClusterSpec {
            name: "t".into(),
            levels: vec!["rack".into()],
            nodes: vec![node("h100", "H100", 4, &[("rack", "r1")]), node("l40s", "L40S", 4, &[("rack", "r1")])],
        })
        .expect("valid");
        let gangs = vec![named(gang(1, 4, 1, None), "dp"), named(gang(1, 4, 4, Some(Scope::Nvlink)), "tp4")];
        let mut planner = Planner::new(&cluster, PlannerConfig::default());
        let greedy = planner.plan(&mut Ledger::new(&cluster), &gangs);
        assert_eq!(greedy.unplaced.iter().map(|u| u.gang.as_str()).collect::<Vec<_>>(), ["tp4"]);
        let mut ledger = Ledger::new(&cluster);
        let joint = planner.plan_joint(&mut ledger, &gangs, &ExactConfig::default()).expect("joint plan");
        assert!(joint.optimal);
        assert!(joint.plan.unplaced.is_empty(), "{:?}", joint.plan.unplaced);
        let tp4 = joint.plan.placements.iter().find(|p| p.gang == "tp4").expect("tp4 placed");
        assert_eq!(cluster.host(tp4.members[0].host).name, "h100");
        ledger.check().expect("ledger invariants");
    }

    #[test]
    fn joint_plans_never_place_fewer_gpus_than_greedy_and_keep_the_invariants() {
        let shapes = [(1u32, 1u32, 1u32), (1, 2, 2), (2, 2, 1), (1, 4, 4), (2, 4, 4), (3, 1, 1), (1, 8, 8)];
        for seed in 0..30u64 {
            let cluster = tiny_cluster(seed);
            let gangs: Vec<Gang> = (0..5)
                .map(|i| {
                    let (members, gpus, tp) = shapes[((seed * 7 + i * 3) % shapes.len() as u64) as usize];
                    named(gang(members, gpus, tp, None), &format!("g{i}"))
                })
                .collect();
            let mut planner = Planner::new(&cluster, PlannerConfig::default());
            let greedy = planner.plan(&mut Ledger::new(&cluster), &gangs);
            let mut ledger = Ledger::new(&cluster);
            let config = ExactConfig { time_limit: Duration::from_secs(30), ..Default::default() };
            let joint = planner.plan_joint(&mut ledger, &gangs, &config).expect("joint plan");
            ledger.check().expect("ledger invariants");
            assert_eq!(joint.plan.placements.len() + joint.plan.unplaced.len(), gangs.len());
            for placement in &joint.plan.placements {
                let gang = gangs.iter().find(|g| g.name == placement.gang).expect("gang");
                assert_eq!(placement.members.len(), gang.members as usize);
                assert!(placement.members.iter().all(|m| m.gpus.count_ones() == gang.gpus_per_member));
            }
            if joint.optimal {
                assert!(
                    joint.plan.gpus_placed() >= greedy.gpus_placed(),
                    "seed {seed}: joint {} < greedy {}",
                    joint.plan.gpus_placed(),
                    greedy.gpus_placed()
                );
            }
        }
    }
}
