//! The job replay's placement policies: topoplace's engine and the baselines that stand for
//! what peer schedulers ship, each to its definition:
//!
//! - `first-fit`: each pod on the first host, in node-name order, with room. Node names
//!   carry no topology (kube-scheduler's node list has no topology order either).
//! - `bestfit-nodes`: each pod on the host with the fewest free GPUs that holds it (ties:
//!   node name). Per pod, no topology.
//! - `kueue-tas`: Kueue's Topology Aware Scheduling with its `BestFit` algorithm and every
//!   job preferring the rack level. A domain's state is how many of the job's pods it
//!   holds. Start at the rack level: sort domains by state (descending, ties by label
//!   values), take the first domain with the lowest state that still holds all pods; when
//!   none does, go one level up. Then walk down level by level over the chosen domains'
//!   children, sorted the same way, taking whole children until the last, which is again the
//!   best fit for what remains. That is "smallest domain that fits, then most allocated".
//! - `volcano-hypernode`: Volcano's network-topology-aware scheduling with every job
//!   allowed up to the top tier. From tier 1 (racks) up, the first tier where some
//!   HyperNode holds the whole job; among those, the highest binpack score (GPU
//!   utilisation with the job in it; ties by name); inside it each pod on the node with
//!   the highest binpack score (most used GPUs; ties by name).
//! - `random`: each pod on a uniformly random host with room (seeded).
//! - `topoplace`: the placement engine ([`Planner`]) protecting the free shapes the demand
//!   asks for ([`Demand`]): the jobs waiting in the queue and the jobs that arrived so far,
//!   each arrival's weight halving every `demand_half_life_s` of replay clock. Never the
//!   jobs still to come.
//!
//! Baselines get one product pool at a time (a Kueue ResourceFlavor, a node selector); the
//! engine chooses the product itself and never mixes products within a gang. GPUs inside a
//! host: the lowest free indices for the baselines (every Lingjun host is an NVSwitch host,
//! where any set is as good), the engine's own choice for topoplace.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use rand::rngs::Xoshiro256PlusPlus;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;

use super::TraceJob;
use topoplace_engine::ledger::{Holding, Ledger};

/// Who holds GPUs in the job replay's ledger.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum JobHolder {
    /// A running job, by its trace id.
    Job(String),
    /// The free GPUs of a drained domain, by the drain's serial number (from 1).
    Drain(u32),
    /// The rack a waiting gang holds clear of later jobs, by the gang's trace id.
    Hold(String),
}

/// The job id, `drain#{serial}` or `hold#{id}`: how errors name a holder (never parsed back).
impl std::fmt::Display for JobHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobHolder::Job(id) => f.write_str(id),
            JobHolder::Drain(serial) => write!(f, "drain#{serial}"),
            JobHolder::Hold(id) => write!(f, "hold#{id}"),
        }
    }
}
use topoplace_engine::placement::{Demand, DemandKey, Planner, PlannerConfig};
use topoplace_engine::topology::{Cluster, GpuMask, HostId, ProductId};
use topoplace_engine::workload::Gang;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobPolicy {
    Topoplace,
    FirstFit,
    BestfitNodes,
    KueueTas,
    VolcanoHypernode,
    Random,
}

impl JobPolicy {
    pub const ALL: [JobPolicy; 6] = [
        JobPolicy::Topoplace,
        JobPolicy::KueueTas,
        JobPolicy::VolcanoHypernode,
        JobPolicy::BestfitNodes,
        JobPolicy::FirstFit,
        JobPolicy::Random,
    ];

    pub fn name(self) -> &'static str {
        match self {
            JobPolicy::Topoplace => "topoplace",
            JobPolicy::FirstFit => "first-fit",
            JobPolicy::BestfitNodes => "bestfit-nodes",
            JobPolicy::KueueTas => "kueue-tas",
            JobPolicy::VolcanoHypernode => "volcano-hypernode",
            JobPolicy::Random => "random",
        }
    }
}

impl fmt::Display for JobPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for JobPolicy {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        JobPolicy::ALL.into_iter().find(|p| p.name() == text).ok_or_else(|| {
            format!("unknown job policy `{text}` (expected one of {})", JobPolicy::ALL.map(JobPolicy::name).join(", "))
        })
    }
}

/// One run's policy with its state (the engine, the random stream, node-name order).
pub struct Placer<'c> {
    policy: JobPolicy,
    cluster: &'c Cluster,
    planner: Option<Planner<'c>>,
    demand: Demand,
    /// Each job's demand key, computed once (read only for jobs that have arrived).
    demand_keys: Vec<DemandKey>,
    jobs: Vec<(String, u32)>,
    host_gpus: u8,
    rng: Xoshiro256PlusPlus,
    by_name: Vec<HostId>,
    excluded: Vec<bool>,
}

impl<'c> Placer<'c> {
    /// `demand_half_life_s`: the engine's memory of arrivals ([`Demand`]), replay seconds.
    pub fn new(
        cluster: &'c Cluster,
        policy: JobPolicy,
        jobs: &[TraceJob],
        host_gpus: u8,
        seed: u64,
        demand_half_life_s: u64,
    ) -> Self {
        let planner = (policy == JobPolicy::Topoplace).then(|| Planner::new(cluster, PlannerConfig::default()));
        let mut by_name: Vec<HostId> = (0..cluster.hosts.len() as HostId).collect();
        by_name.sort_by(|&a, &b| cluster.host(a).name.cmp(&cluster.host(b).name));
        Placer {
            policy,
            cluster,
            planner,
            demand: Demand::new(demand_half_life_s),
            demand_keys: jobs.iter().map(|j| DemandKey::of(&gang_of(&j.id, j.gpus, host_gpus))).collect(),
            jobs: jobs.iter().map(|j| (j.id.clone(), j.gpus)).collect(),
            host_gpus,
            rng: Xoshiro256PlusPlus::seed_from_u64(seed),
            by_name,
            excluded: vec![false; cluster.hosts.len()],
        }
    }

    /// Job `job` arrived at `now_s` (replay seconds): the engine remembers what it asks for.
    pub fn arrived(&mut self, job: usize, now_s: u64) {
        if self.planner.is_some() {
            if let Some(&key) = self.demand_keys.get(job) {
                self.demand.record(key, now_s);
            }
        }
    }

    /// Before placing at `now_s`: the engine protects the shapes of the jobs `waiting` and of
    /// the recent arrivals ([`Demand::shapes`]), each weighed by how scarce its free slots are
    /// in `ledger` for the jobs waiting ([`Planner::weigh_by_scarcity`]).
    pub fn refresh_demand(&mut self, ledger: &Ledger<JobHolder>, waiting: impl Iterator<Item = usize>, now_s: u64) {
        let Some(planner) = self.planner.as_mut() else { return };
        let keys: Vec<DemandKey> = waiting.filter_map(|job| self.demand_keys.get(job).copied()).collect();
        let shapes = self.demand.shapes(&keys, now_s);
        let shapes = planner.weigh_by_scarcity(ledger, shapes, &keys);
        planner.set_shapes(shapes);
    }

    /// Hosts taken out of service (drained): no capacity any more, in any score.
    pub fn exclude(&mut self, hosts: &[HostId]) {
        for &host in hosts {
            if let Some(flag) = self.excluded.get_mut(host as usize) {
                *flag = true;
            }
        }
    }

    /// Where job `job` (`members` pods of `gpus` GPUs) goes: one (host, GPUs) per member, or
    /// `None` when the policy finds no place. `pool` restricts a baseline to one product.
    pub fn place(
        &mut self,
        ledger: &Ledger<JobHolder>,
        job: usize,
        members: u32,
        gpus: u32,
        pool: Option<ProductId>,
    ) -> Option<Holding> {
        let view = View { cluster: self.cluster, ledger, pool, excluded: &self.excluded, gpus };
        match self.policy {
            JobPolicy::Topoplace => {
                let (id, total) = self.jobs.get(job)?;
                let gang = gang_of(id, *total, self.host_gpus);
                let placement = self.planner.as_mut()?.place(ledger, &gang).ok()?;
                Some(placement.members.iter().map(|m| (m.host, m.gpus)).collect())
            }
            JobPolicy::FirstFit => per_pod(&view, members, |taken| {
                self.by_name.iter().copied().find(|&h| view.holds(h) && !taken.contains(&h))
            }),
            JobPolicy::BestfitNodes => per_pod(&view, members, |taken| {
                self.by_name
                    .iter()
                    .copied()
                    .filter(|&h| view.holds(h) && !taken.contains(&h))
                    .min_by_key(|&h| view.free(h).count_ones())
            }),
            JobPolicy::Random => {
                let mut candidates: Vec<HostId> =
                    (0..self.cluster.hosts.len() as HostId).filter(|&h| view.holds(h)).collect();
                if candidates.len() < members as usize {
                    return None;
                }
                let (chosen, _) = candidates.partial_shuffle(&mut self.rng, members as usize);
                Some(chosen.iter().map(|&h| (h, lowest_free(view.free(h), gpus))).collect())
            }
            JobPolicy::KueueTas => kueue_best_fit(&view, members),
            JobPolicy::VolcanoHypernode => volcano_hypernode(&view, members),
        }
    }
}

impl Placer<'_> {
    /// Whether [`Placer::replan_together`] can improve on job-by-job placement.
    pub fn plans_batches(&self) -> bool {
        self.planner.is_some()
    }

    /// The engine's batch planning for jobs that start at the same instant: all of them
    /// placed together, largest first, against `ledger` (which holds none of them). `None`
    /// when the batch plan does not place every job (the caller keeps the job-by-job one).
    pub fn replan_together(&mut self, ledger: &Ledger<JobHolder>, jobs: &[usize]) -> Option<Vec<Holding>> {
        let host_gpus = self.host_gpus;
        let gangs: Vec<Gang> = jobs
            .iter()
            .map(|&j| self.jobs.get(j).map(|(id, gpus)| gang_of(id, *gpus, host_gpus)))
            .collect::<Option<_>>()?;
        let planner = self.planner.as_mut()?;
        // A scratch ledger of gang names over the GPUs in use now: the batch is planned there.
        let plan = planner.plan(&mut ledger.scratch(), &gangs);
        if !plan.unplaced.is_empty() {
            return None;
        }
        gangs
            .iter()
            .map(|gang| {
                let placement = plan.placements.iter().find(|p| p.gang == gang.name)?;
                Some(placement.members.iter().map(|m| (m.host, m.gpus)).collect())
            })
            .collect()
    }
}

/// A job as the engine sees it: a pod of `gpus` on one host, or whole-host members.
fn gang_of(id: &str, gpus: u32, host_gpus: u8) -> Gang {
    let host = u32::from(host_gpus).max(1);
    let (members, per_member) = if gpus <= host { (1, gpus) } else { (gpus.div_ceil(host), host) };
    Gang {
        name: id.to_string(),
        spec_name: id.to_string(),
        members,
        gpus_per_member: per_member,
        // The GPUs of one pod talk over NVLink (data-parallel all-reduce inside the host).
        tensor_parallel: per_member,
        pipeline_parallel: 1,
        memory_floor_mib: 0,
        mig_profile: None,
        required: None,
        preferred: None,
        pool: None,
    }
}

/// What the baselines read: free GPUs of the hosts of one pool, minus drained hosts.
struct View<'a> {
    cluster: &'a Cluster,
    ledger: &'a Ledger<JobHolder>,
    pool: Option<ProductId>,
    excluded: &'a [bool],
    /// GPUs per pod of the job being placed.
    gpus: u32,
}

impl View<'_> {
    fn in_pool(&self, host: HostId) -> bool {
        !self.excluded[host as usize] && self.pool.is_none_or(|p| self.cluster.host(host).product == p)
    }

    fn free(&self, host: HostId) -> GpuMask {
        if self.in_pool(host) {
            self.ledger.free(host)
        } else {
            0
        }
    }

    fn holds(&self, host: HostId) -> bool {
        self.free(host).count_ones() >= self.gpus
    }

    /// Pods of the job a host holds (Kueue's leaf state).
    fn pods(&self, host: HostId) -> u32 {
        self.free(host).count_ones() / self.gpus.max(1)
    }

    /// GPUs of the pool in a host range, and how many of them are free.
    fn gpu_counts(&self, hosts: Range<u32>) -> (u32, u32) {
        hosts.filter(|&h| self.in_pool(h)).fold((0, 0), |(capacity, free), h| {
            (capacity + u32::from(self.cluster.host(h).gpu_count), free + self.ledger.free(h).count_ones())
        })
    }
}

/// The `count` lowest free GPUs.
fn lowest_free(free: GpuMask, count: u32) -> GpuMask {
    let mut mask = 0;
    let mut left = free;
    for _ in 0..count {
        let lowest = left & left.wrapping_neg();
        mask |= lowest;
        left &= !lowest;
    }
    mask
}

/// Places pods one at a time with `choose` (given the hosts already taken by this job).
fn per_pod(view: &View<'_>, members: u32, mut choose: impl FnMut(&[HostId]) -> Option<HostId>) -> Option<Holding> {
    let mut taken: Vec<HostId> = Vec::with_capacity(members as usize);
    for _ in 0..members {
        taken.push(choose(&taken)?);
    }
    Some(taken.into_iter().map(|h| (h, lowest_free(view.free(h), view.gpus))).collect())
}

/// The levels Kueue sees: the cluster's, then one domain per host.
struct Levels<'a> {
    cluster: &'a Cluster,
}

impl Levels<'_> {
    fn host_level(&self) -> usize {
        self.cluster.levels.len()
    }

    fn len(&self, level: usize) -> usize {
        if level < self.host_level() {
            self.cluster.domains[level].len()
        } else {
            self.cluster.hosts.len()
        }
    }

    fn hosts(&self, level: usize, index: u32) -> Range<u32> {
        if level < self.host_level() {
            self.cluster.domains[level][index as usize].hosts.clone()
        } else {
            index..index + 1
        }
    }

    /// Children one level down (hosts below the innermost level).
    fn children(&self, level: usize, index: u32) -> Range<u32> {
        if level + 1 < self.host_level() {
            self.cluster.domains[level][index as usize].children.clone()
        } else {
            self.hosts(level, index)
        }
    }
}

/// Kueue's `findBestFitDomainIdx`: in a list sorted by state descending, the first domain
/// with the lowest state that still holds `count`; index 0 when none does.
fn best_fit_index(states: &[u32], count: u32) -> usize {
    let mut best = 0;
    for (index, &state) in states.iter().enumerate() {
        if state >= count && state != states[best] {
            best = index;
        }
    }
    best
}

/// Kueue's `updateCountsToMinimum`: whole domains from the front, the last one best fit.
fn counts_to_minimum(sorted: &[(u32, u32)], count: u32) -> Option<Vec<(u32, u32)>> {
    let states: Vec<u32> = sorted.iter().map(|&(_, state)| state).collect();
    let mut chosen = Vec::new();
    let mut remaining = count;
    for index in 0..sorted.len() {
        let (mut domain, mut state) = sorted[index];
        if state >= remaining {
            let best = index + best_fit_index(&states[index..], remaining);
            (domain, state) = sorted[best];
        }
        if state >= remaining {
            chosen.push((domain, remaining));
            return Some(chosen);
        }
        remaining -= state;
        chosen.push((domain, state));
    }
    None
}

fn kueue_best_fit(view: &View<'_>, count: u32) -> Option<Holding> {
    let levels = Levels { cluster: view.cluster };
    let mut prefix = Vec::with_capacity(view.cluster.hosts.len() + 1);
    prefix.push(0u32);
    for host in 0..view.cluster.hosts.len() as HostId {
        prefix.push(prefix.last().copied().unwrap_or(0) + view.pods(host));
    }
    let state = |level: usize, index: u32| {
        let hosts = levels.hosts(level, index);
        prefix[hosts.end as usize] - prefix[hosts.start as usize]
    };
    // Sorted by state descending; domain indices are in label-value order, Kueue's tie-break.
    let sorted = |level: usize, domains: &mut dyn Iterator<Item = u32>| {
        let mut list: Vec<(u32, u32)> = domains.map(|d| (d, state(level, d))).collect();
        list.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        list
    };

    // Phase 2a: from the preferred (rack) level up, the first level where one domain fits.
    let mut level = levels.host_level().saturating_sub(1);
    let mut chosen = loop {
        let list = sorted(level, &mut (0..levels.len(level) as u32));
        let top = *list.first()?;
        if top.1 >= count {
            let states: Vec<u32> = list.iter().map(|&(_, s)| s).collect();
            break vec![list[best_fit_index(&states, count)]];
        }
        if level > 0 {
            level -= 1;
            continue;
        }
        break list;
    };
    chosen = counts_to_minimum(&chosen, count)?;
    // Phase 2b: down to the hosts.
    while level < levels.host_level() {
        let parent_level = level;
        let mut children = chosen.iter().flat_map(|&(d, _)| levels.children(parent_level, d));
        level += 1;
        chosen = counts_to_minimum(&sorted(level, &mut children), count)?;
    }
    let mut holding = Holding::new();
    for (host, pods) in chosen {
        let gpus = lowest_free(view.free(host), pods * view.gpus);
        holding.extend(split_pods(gpus, pods, view.gpus).into_iter().map(|mask| (host, mask)));
    }
    Some(holding)
}

/// Splits a host's GPUs for several pods into one mask per pod.
fn split_pods(mut gpus: GpuMask, pods: u32, per_pod: u32) -> Vec<GpuMask> {
    (0..pods)
        .map(|_| {
            let mask = lowest_free(gpus, per_pod);
            gpus &= !mask;
            mask
        })
        .collect()
}

fn volcano_hypernode(view: &View<'_>, members: u32) -> Option<Holding> {
    let cluster = view.cluster;
    let levels = Levels { cluster };
    let job_gpus = members * view.gpus;
    let fits = |hosts: Range<u32>| hosts.filter(|&h| view.holds(h)).count() >= members as usize;
    // Tier 1 is the innermost level; above the outermost level, the whole cluster.
    let mut tiers: Vec<Vec<Range<u32>>> = (0..levels.host_level())
        .rev()
        .map(|level| (0..levels.len(level) as u32).map(|d| levels.hosts(level, d)).collect())
        .collect();
    tiers.push(std::iter::once(0..cluster.hosts.len() as u32).collect());
    for tier in tiers {
        let best = tier
            .into_iter()
            .filter(|hosts| fits(hosts.clone()))
            .map(|hosts| {
                let (capacity, free) = view.gpu_counts(hosts.clone());
                let used_with_job = f64::from(capacity - free + job_gpus);
                (used_with_job / f64::from(capacity.max(1)), hosts)
            })
            // Highest score; the earlier domain (by name) on ties.
            .fold(None::<(f64, Range<u32>)>, |best, (score, hosts)| match best {
                Some((top, _)) if top >= score => best,
                _ => Some((score, hosts)),
            });
        if let Some((_, hosts)) = best {
            return per_pod(view, members, |taken| {
                hosts
                    .clone()
                    .filter(|&h| view.holds(h) && !taken.contains(&h))
                    .min_by_key(|&h| view.free(h).count_ones())
            });
        }
    }
    None
}
