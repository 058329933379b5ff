//! Time-driven replay of a job trace (gangs that arrive, wait, run and leave) on a cluster
//! topology, so that gang placement policies can be compared on the same arrivals. Pure and
//! deterministic for a trace, a cluster, a policy and a seed; file reading, threads and
//! charts live in the adapters.
//!
//! The model: a job of `g` GPUs is one pod of `g` GPUs when `g` fits one host, otherwise
//! `g / host GPUs` pods that each take a whole host and must all start at once (a gang).
//! Jobs arrive at their submission time (divided by the load factor), wait in one FIFO
//! queue until the whole gang fits, run for their duration and then release exactly their
//! GPUs. `StrictFifo` starts nothing past a head that does not fit; `BestEffortFifo`
//! (Kueue's queueing strategy of that name) lets later jobs that fit start, without a
//! reservation for the head. A drain takes a domain's hosts away at a time: the jobs
//! running there are stopped whole (every member, also those outside the domain),
//! requeued in arrival order and later restarted from the beginning.
//!
//! Whether a job fits does not depend on the policy (whole free hosts for a gang, a host
//! with enough free GPUs for a single pod), only where it goes does; so the policies differ
//! in what they leave behind. Every GPU change goes through the [`Ledger`], and after every
//! event free + running + drained GPUs must equal the cluster's GPUs.

pub mod generate;
pub mod policy;
#[cfg(test)]
mod tests;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};

use serde::Serialize;
use thiserror::Error;

pub use policy::{JobPolicy, Placer};
use topoplace_engine::ledger::{Holding, Ledger};

pub use policy::JobHolder;
use topoplace_engine::topology::{Cluster, ClusterSpec, GpuMask, HostId, ProductId};

/// Jobs of at least this many GPUs are the ones whose waiting is counted as stranded
/// capacity when as many GPUs are free.
pub const STRANDED_JOB_GPUS: u32 = 64;
/// How long a gang waits for a rack of its own under backfill (topoplace), by default: not
/// at all. Waiting buys rack locality with everybody's queueing delay (see docs/results/job-replay.md).
pub const RACK_WAIT_S_DEFAULT: u64 = 0;
/// Points of the utilisation-over-time curve.
pub const TIMELINE_POINTS: usize = 240;
const MS_PER_S: u64 = 1000;

/// A job of the trace: submitted at `submit_s`, runs `duration_s` on `gpus` GPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceJob {
    pub id: String,
    pub submit_s: u64,
    pub duration_s: u64,
    pub gpus: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum QueueMode {
    StrictFifo,
    BestEffortFifo,
}

impl QueueMode {
    /// The name on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            QueueMode::StrictFifo => "strict-fifo",
            QueueMode::BestEffortFifo => "best-effort-fifo",
        }
    }
}

/// Take a domain's (or one host's) GPUs away at a time of the replay clock.
#[derive(Debug, Clone, PartialEq)]
pub struct Drain {
    /// A domain path as the cluster names it (`G6/P10/S14`) or a host name.
    pub target: String,
    /// Seconds after the first arrival (replay clock, after load scaling).
    pub at_s: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Arrival times are divided by this (2.0: the same jobs arrive twice as fast).
    pub load_factor: f64,
    pub queue: QueueMode,
    pub drains: Vec<Drain>,
    /// Seeds the random policy.
    pub seed: u64,
    /// topoplace with `BestEffortFifo`: a gang that fits no single rack waits up to this
    /// long for one, with that rack held clear of later jobs; 0 places it at once.
    pub rack_wait_s: u64,
    /// topoplace: how fast the engine forgets what arrived
    /// ([`topoplace_engine::placement::Demand`]'s half-life, replay
    /// seconds).
    pub demand_half_life_s: u64,
}

/// [`SimConfig::demand_half_life_s`] unless told otherwise: an hour of replay clock.
pub const DEMAND_HALF_LIFE_S_DEFAULT: u64 = 3600;

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            load_factor: 1.0,
            queue: QueueMode::StrictFifo,
            drains: Vec::new(),
            seed: 42,
            rack_wait_s: RACK_WAIT_S_DEFAULT,
            demand_half_life_s: DEMAND_HALF_LIFE_S_DEFAULT,
        }
    }
}

#[derive(Debug, Error, PartialEq)]
pub enum JobReplayError {
    #[error("no jobs to replay")]
    NoJobs,
    #[error("the cluster has no hosts")]
    NoHosts,
    #[error(
        "every host must have the same GPU count (a gang member takes one whole host): \
         `{first}` has {first_gpus}, `{other}` has {other_gpus}"
    )]
    MixedHostSizes { first: String, first_gpus: u8, other: String, other_gpus: u8 },
    #[error("job `{job}` asks for {gpus} GPUs: above one host's {host_gpus}, a job must take whole hosts")]
    NotWholeHosts { job: String, gpus: u32, host_gpus: u8 },
    #[error("load factor {0} must be a finite number above 0")]
    LoadFactor(f64),
    #[error("drain `{target}`: no domain path or host of the cluster is called that (racks look like `{example}`)")]
    UnknownDrainTarget { target: String, example: String },
    #[error("products per rack: the list is empty")]
    NoProducts,
    #[error("internal error at t={at_s}s: {message}")]
    Internal { at_s: u64, message: String },
}

/// Where a started multi-host job landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Spread {
    OneRack,
    OneBlock,
    Blocks,
}

/// One start of a job (a job stopped by a drain starts again later).
#[derive(Debug, Clone, PartialEq)]
pub struct JobStart {
    pub job: usize,
    pub at_ms: u64,
    /// When its GPUs were released: at completion, or at the drain that stopped it.
    pub end_ms: u64,
    pub holding: Holding,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobOutcome {
    pub policy: JobPolicy,
    pub queue: QueueMode,
    pub load_factor: f64,
    pub seed: u64,
    pub jobs: usize,
    /// Jobs larger than the whole cluster (of one product): never queued.
    pub rejected: usize,
    pub started: usize,
    /// Jobs still waiting when nothing runs and nothing arrives any more (after drains).
    pub never_started: usize,
    pub multi_host_jobs: usize,
    pub multi_host_in_one_rack: usize,
    /// In one aggregation block but over several racks.
    pub multi_host_in_one_block: usize,
    pub multi_host_across_blocks: usize,
    /// Multi-host jobs spread over racks although, at their start, one rack had enough
    /// whole free hosts of one product (a placement choice, not the queue's state).
    pub multi_host_spans_avoidable: usize,
    /// Over the multi-host jobs spread over racks: the mean count of whole free hosts of
    /// their product left over at their start. 0 means each started the moment just
    /// enough whole hosts were free anywhere, so no placement could have kept it in a rack.
    pub span_spare_hosts_mean: f64,
    pub mean_queue_delay_s: f64,
    pub p95_queue_delay_s: f64,
    /// Time-weighted share of the cluster's GPUs in use, first arrival to last completion.
    pub gpu_utilisation: f64,
    /// Hours in which a job of `STRANDED_JOB_GPUS` or more waited although at least its
    /// GPU count was free.
    pub stranded_64gpu_hours: f64,
    /// Starts undone by a drain (the job ran again from the beginning).
    pub drain_restarts: usize,
    pub makespan_s: f64,
    /// Mean utilisation in `TIMELINE_POINTS` equal slices of the makespan.
    pub timeline: Vec<f64>,
    #[serde(skip)]
    pub starts: Vec<JobStart>,
}

impl JobOutcome {
    pub fn rack_share(&self) -> f64 {
        if self.multi_host_jobs == 0 {
            0.0
        } else {
            self.multi_host_in_one_rack as f64 / self.multi_host_jobs as f64
        }
    }
}

/// Gives each rack (innermost domain, in domain order) a product from `products` in turn,
/// so a cluster of one product becomes a mixed one with whole racks of each.
pub fn products_per_rack(spec: &mut ClusterSpec, products: &[ProductId]) -> Result<(), JobReplayError> {
    if products.is_empty() {
        return Err(JobReplayError::NoProducts);
    }
    let rack_of = |labels: &BTreeMap<String, String>, name: &str| -> Vec<String> {
        spec.levels.iter().map(|key| labels.get(key).cloned().unwrap_or_else(|| format!("\0{name}"))).collect()
    };
    let mut racks: Vec<Vec<String>> = spec.nodes.iter().map(|n| rack_of(&n.labels, &n.name)).collect();
    racks.sort();
    racks.dedup();
    let assigned: Vec<ProductId> = spec
        .nodes
        .iter()
        .map(|n| {
            let rack = rack_of(&n.labels, &n.name);
            let index = racks.binary_search(&rack).unwrap_or(0);
            products[index % products.len()]
        })
        .collect();
    for (node, product) in spec.nodes.iter_mut().zip(assigned) {
        node.product = product;
    }
    Ok(())
}

/// A job as the replay runs it.
#[derive(Debug, Clone, Copy)]
struct Shape {
    members: u32,
    gpus_per_member: u32,
}

/// Free capacity per product pool: hosts by free GPU count, for an O(1) fit test.
struct FreeIndex {
    host_gpus: u8,
    pool_of_host: Vec<usize>,
    /// `[pool][free GPUs]` -> hosts.
    hosts_by_free: Vec<Vec<u32>>,
}

impl FreeIndex {
    fn new(cluster: &Cluster, ledger: &Ledger<JobHolder>, pools: &[ProductId], host_gpus: u8) -> Self {
        let pool_of_host: Vec<usize> =
            cluster.hosts.iter().map(|h| pools.iter().position(|&p| p == h.product).unwrap_or(0)).collect();
        let mut hosts_by_free = vec![vec![0u32; usize::from(host_gpus) + 1]; pools.len()];
        for (host, &pool) in pool_of_host.iter().enumerate() {
            hosts_by_free[pool][ledger.free(host as HostId).count_ones() as usize] += 1;
        }
        FreeIndex { host_gpus, pool_of_host, hosts_by_free }
    }

    fn update(&mut self, host: HostId, free_before: u32, free_after: u32) {
        let pool = self.pool_of_host[host as usize];
        self.hosts_by_free[pool][free_before as usize] -= 1;
        self.hosts_by_free[pool][free_after as usize] += 1;
    }

    /// The first pool (in the configured order) where the job fits.
    fn fitting_pool(&self, shape: Shape) -> Option<usize> {
        self.hosts_by_free.iter().position(|counts| fits(counts, self.host_gpus, shape))
    }
}

/// Whether a job fits hosts counted by free GPUs: whole free hosts for a gang, one host
/// with enough free GPUs for a single pod.
fn fits(hosts_by_free: &[u32], host_gpus: u8, shape: Shape) -> bool {
    if shape.members > 1 {
        hosts_by_free[usize::from(host_gpus)] >= shape.members
    } else {
        hosts_by_free[shape.gpus_per_member as usize..].iter().any(|&n| n > 0)
    }
}

fn shape_of(job: &TraceJob, host_gpus: u8) -> Result<Shape, JobReplayError> {
    let host = u32::from(host_gpus);
    if job.gpus <= host {
        return Ok(Shape { members: 1, gpus_per_member: job.gpus });
    }
    if !job.gpus.is_multiple_of(host) {
        return Err(JobReplayError::NotWholeHosts { job: job.id.clone(), gpus: job.gpus, host_gpus });
    }
    Ok(Shape { members: job.gpus / host, gpus_per_member: host })
}

/// The GPU count every host has.
pub fn uniform_host_gpus(cluster: &Cluster) -> Result<u8, JobReplayError> {
    let first = cluster.hosts.first().ok_or(JobReplayError::NoHosts)?;
    match cluster.hosts.iter().find(|h| h.gpu_count != first.gpu_count) {
        Some(other) => Err(JobReplayError::MixedHostSizes {
            first: first.name.clone(),
            first_gpus: first.gpu_count,
            other: other.name.clone(),
            other_gpus: other.gpu_count,
        }),
        None => Ok(first.gpu_count),
    }
}

/// Hosts a drain target names: a domain path at any level, or a host name.
fn drain_hosts(cluster: &Cluster, target: &str) -> Result<Vec<HostId>, JobReplayError> {
    let wanted = target.trim().trim_end_matches('/');
    for level in &cluster.domains {
        if let Some(domain) = level.iter().find(|d| d.path == wanted) {
            return Ok(domain.hosts.clone().collect());
        }
    }
    let hosts: Vec<HostId> = cluster.hosts_of(wanted).collect();
    if !hosts.is_empty() {
        return Ok(hosts);
    }
    let example = cluster.domains.last().and_then(|l| l.first()).map_or_else(String::new, |d| d.path.clone());
    Err(JobReplayError::UnknownDrainTarget { target: target.to_string(), example })
}

struct Running {
    start_index: usize,
    gpus: u64,
}

/// What a replay runs, checked: every job's shape and every drain's hosts (by time).
struct Checked {
    host_gpus: u8,
    shapes: Vec<Shape>,
    drains: Vec<(u64, Vec<HostId>)>,
}

fn check(cluster: &Cluster, jobs: &[TraceJob], config: &SimConfig) -> Result<Checked, JobReplayError> {
    if jobs.is_empty() {
        return Err(JobReplayError::NoJobs);
    }
    if !(config.load_factor.is_finite() && config.load_factor > 0.0) {
        return Err(JobReplayError::LoadFactor(config.load_factor));
    }
    let host_gpus = uniform_host_gpus(cluster)?;
    let shapes: Vec<Shape> = jobs.iter().map(|j| shape_of(j, host_gpus)).collect::<Result<_, _>>()?;
    let mut drains: Vec<(u64, Vec<HostId>)> = config
        .drains
        .iter()
        .map(|d| drain_hosts(cluster, &d.target).map(|hosts| (d.at_s.saturating_mul(MS_PER_S), hosts)))
        .collect::<Result<_, _>>()?;
    drains.sort_by_key(|(at, _)| *at);
    Ok(Checked { host_gpus, shapes, drains })
}

/// Checks a replay's inputs without running it (the errors [`simulate`] would give first).
pub fn validate(cluster: &Cluster, jobs: &[TraceJob], config: &SimConfig) -> Result<(), JobReplayError> {
    check(cluster, jobs, config).map(|_| ())
}

/// Replays `jobs` on `cluster` under one policy.
pub fn simulate(
    cluster: &Cluster,
    jobs: &[TraceJob],
    policy: JobPolicy,
    config: &SimConfig,
) -> Result<JobOutcome, JobReplayError> {
    let checked = check(cluster, jobs, config)?;
    let mut sim = Simulation::new(cluster, jobs, policy, config, checked);
    loop {
        sim.complete_due()?;
        sim.drain_due()?;
        sim.arrive_due();
        sim.start_fitting()?;
        let free = sim.check_conservation()?;
        if !sim.advance(free) {
            break;
        }
    }
    Ok(sim.finish())
}

/// One replay in progress: the clock, the ledger and the queue, and what the outcome counts.
/// Each event kind is a method ([`Simulation::complete_due`], [`Simulation::drain_due`],
/// [`Simulation::arrive_due`], [`Simulation::start_fitting`]), run in that order at every
/// instant something happens; [`Simulation::advance`] moves the clock to the next one.
struct Simulation<'a> {
    cluster: &'a Cluster,
    jobs: &'a [TraceJob],
    policy: JobPolicy,
    queue_mode: QueueMode,
    host_gpus: u8,
    shapes: Vec<Shape>,
    drains: Vec<(u64, Vec<HostId>)>,
    /// Arrivals on the replay clock (ms after the first submission), per job.
    arrival_ms: Vec<u64>,
    /// Jobs in arrival order.
    order: Vec<usize>,
    /// GPU products in the order hosts first show them (the baselines' pools).
    pools: Vec<ProductId>,
    total_gpus: u64,
    ledger: Ledger<JobHolder>,
    free_index: FreeIndex,
    /// Whole-host counts per pool of the empty cluster: what any job can ever fit.
    pool_capacity: Vec<Vec<u32>>,
    placer: Placer<'a>,
    outcome: JobOutcome,
    queue: VecDeque<usize>,
    /// (end time, index into `starts`) of every start, soonest first.
    events: BinaryHeap<Reverse<(u64, usize)>>,
    running: BTreeMap<usize, Running>,
    first_start: Vec<Option<u64>>,
    /// Waiting jobs of STRANDED_JOB_GPUS or more, by GPU count.
    waiting_large: BTreeMap<u32, usize>,
    used_gpus: u64,
    drained_gpus: u64,
    busy_ms_gpus: u128,
    stranded_ms: u64,
    /// Multi-host jobs that spread over racks, and the whole free hosts left at their starts.
    spans: u64,
    spare_hosts_sum: u64,
    /// (time, GPUs in use from then on), for the timeline.
    usage_steps: Vec<(u64, u64)>,
    next_arrival: usize,
    next_drain: usize,
    now: u64,
    drain_serial: u32,
    /// How long a gang that fits no single rack waits for one (topoplace with backfill only:
    /// under strict FIFO nothing passes a waiting head, so a hold would only idle GPUs).
    rack_wait_ms: u64,
    /// The rack each such gang waits for.
    waiting_for: std::collections::HashMap<usize, u32>,
}

impl<'a> Simulation<'a> {
    fn new(
        cluster: &'a Cluster,
        jobs: &'a [TraceJob],
        policy: JobPolicy,
        config: &SimConfig,
        checked: Checked,
    ) -> Self {
        let Checked { host_gpus, shapes, drains } = checked;
        let first_submit = jobs.iter().map(|j| j.submit_s).min().unwrap_or(0);
        let arrival_ms: Vec<u64> = jobs
            .iter()
            .map(|j| (((j.submit_s - first_submit) as f64) * MS_PER_S as f64 / config.load_factor).round() as u64)
            .collect();
        let mut order: Vec<usize> = (0..jobs.len()).collect();
        order.sort_by_key(|&i| (arrival_ms[i], i));
        let mut pools: Vec<ProductId> = Vec::new();
        for host in &cluster.hosts {
            if !pools.contains(&host.product) {
                pools.push(host.product);
            }
        }
        let ledger: Ledger<JobHolder> = Ledger::empty(cluster);
        let free_index = FreeIndex::new(cluster, &ledger, &pools, host_gpus);
        let pool_capacity = free_index.hosts_by_free.clone();
        let placer = Placer::new(cluster, policy, jobs, host_gpus, config.seed, config.demand_half_life_s);
        let levels = cluster.levels.len();
        let rack_wait_ms = if policy == JobPolicy::Topoplace && config.queue == QueueMode::BestEffortFifo && levels > 0
        {
            config.rack_wait_s.saturating_mul(MS_PER_S)
        } else {
            0
        };
        Simulation {
            cluster,
            jobs,
            policy,
            queue_mode: config.queue,
            host_gpus,
            shapes,
            drains,
            arrival_ms,
            order,
            pools,
            total_gpus: cluster.total_gpus(),
            ledger,
            free_index,
            pool_capacity,
            placer,
            outcome: JobOutcome {
                policy,
                queue: config.queue,
                load_factor: config.load_factor,
                seed: config.seed,
                jobs: jobs.len(),
                rejected: 0,
                started: 0,
                never_started: 0,
                multi_host_jobs: 0,
                multi_host_in_one_rack: 0,
                multi_host_in_one_block: 0,
                multi_host_across_blocks: 0,
                multi_host_spans_avoidable: 0,
                span_spare_hosts_mean: 0.0,
                mean_queue_delay_s: 0.0,
                p95_queue_delay_s: 0.0,
                gpu_utilisation: 0.0,
                stranded_64gpu_hours: 0.0,
                drain_restarts: 0,
                makespan_s: 0.0,
                timeline: Vec::new(),
                starts: Vec::new(),
            },
            queue: VecDeque::new(),
            events: BinaryHeap::new(),
            running: BTreeMap::new(),
            first_start: vec![None; jobs.len()],
            waiting_large: BTreeMap::new(),
            used_gpus: 0,
            drained_gpus: 0,
            busy_ms_gpus: 0,
            stranded_ms: 0,
            spans: 0,
            spare_hosts_sum: 0,
            usage_steps: vec![(0, 0)],
            next_arrival: 0,
            next_drain: 0,
            now: 0,
            drain_serial: 0,
            rack_wait_ms,
            waiting_for: std::collections::HashMap::new(),
        }
    }

    fn internal(&self, message: String) -> JobReplayError {
        JobReplayError::Internal { at_s: self.now / MS_PER_S, message }
    }

    fn job_holder(&self, job: usize) -> JobHolder {
        JobHolder::Job(self.jobs[job].id.clone())
    }

    fn reserve(&mut self, holder: &JobHolder, holding: &Holding) -> Result<(), JobReplayError> {
        reserve(&mut self.ledger, &mut self.free_index, holder, holding).map_err(|m| self.internal(m))
    }

    fn release(&mut self, holder: &JobHolder) -> Result<(), JobReplayError> {
        release(&mut self.ledger, &mut self.free_index, holder, self.now).map_err(|m| self.internal(m))
    }

    /// Stops a running job now: its GPUs come back and its start ends.
    fn stop(&mut self, job: usize) -> Result<bool, JobReplayError> {
        let Some(run) = self.running.remove(&job) else { return Ok(false) };
        self.release(&self.job_holder(job))?;
        self.used_gpus -= run.gpus;
        self.outcome.starts[run.start_index].end_ms = self.now;
        Ok(true)
    }

    /// Completions due now.
    fn complete_due(&mut self) -> Result<(), JobReplayError> {
        while let Some(&Reverse((at, start_index))) = self.events.peek() {
            if at > self.now {
                break;
            }
            self.events.pop();
            let job = self.outcome.starts[start_index].job;
            // A start undone by a drain has already been released.
            if self.running.get(&job).is_none_or(|r| r.start_index != start_index) {
                continue;
            }
            self.stop(job)?;
        }
        Ok(())
    }

    /// Drains due now: stop every job touching the hosts (they requeue in arrival order),
    /// then hold the hosts' free GPUs.
    fn drain_due(&mut self) -> Result<(), JobReplayError> {
        while self.next_drain < self.drains.len() && self.drains[self.next_drain].0 <= self.now {
            let hosts = self.drains[self.next_drain].1.clone();
            self.next_drain += 1;
            self.placer.exclude(&hosts);
            let hit: Vec<usize> = self
                .running
                .iter()
                .filter(|(_, r)| self.outcome.starts[r.start_index].holding.iter().any(|(h, _)| hosts.contains(h)))
                .map(|(&job, _)| job)
                .collect();
            for job in hit {
                if self.stop(job)? {
                    self.outcome.drain_restarts += 1;
                    requeue(&mut self.queue, job, &self.arrival_ms);
                    if self.jobs[job].gpus >= STRANDED_JOB_GPUS {
                        *self.waiting_large.entry(self.jobs[job].gpus).or_default() += 1;
                    }
                }
            }
            let holding: Holding =
                hosts.iter().map(|&h| (h, self.ledger.free(h))).filter(|&(_, free)| free != 0).collect();
            if !holding.is_empty() {
                self.drain_serial += 1;
                self.reserve(&JobHolder::Drain(self.drain_serial), &holding)?;
                self.drained_gpus += holding.iter().map(|&(_, m)| u64::from(m.count_ones())).sum::<u64>();
            }
        }
        Ok(())
    }

    /// Arrivals due now: queued, or rejected when no pool of the empty cluster could hold them.
    fn arrive_due(&mut self) {
        while self.next_arrival < self.order.len() && self.arrival_ms[self.order[self.next_arrival]] <= self.now {
            let job = self.order[self.next_arrival];
            self.next_arrival += 1;
            let shape = self.shapes[job];
            if !self.pool_capacity.iter().any(|counts| fits(counts, self.host_gpus, shape)) {
                self.outcome.rejected += 1;
                continue;
            }
            self.queue.push_back(job);
            self.placer.arrived(job, self.now / MS_PER_S);
            if self.jobs[job].gpus >= STRANDED_JOB_GPUS {
                *self.waiting_large.entry(self.jobs[job].gpus).or_default() += 1;
            }
        }
    }

    /// With rack waiting on: whether `job` keeps waiting for a rack now, and if so the hold
    /// it puts on the rack's hosts nearest to free (so later jobs go elsewhere meanwhile).
    fn rack_hold(&mut self, job: usize) -> Result<Option<Option<JobHolder>>, JobReplayError> {
        let shape = self.shapes[job];
        if self.rack_wait_ms == 0 || shape.members <= 1 || self.now - self.arrival_ms[job] >= self.rack_wait_ms {
            return Ok(None);
        }
        let current = self.waiting_for.get(&job).copied();
        let Some(rack) = rack_to_wait_for(self.cluster, &self.ledger, shape.members, current) else {
            return Ok(None);
        };
        self.waiting_for.insert(job, rack);
        if rack_holds(self.cluster, &self.ledger, rack, shape.members) {
            return Ok(None);
        }
        // Only the gang's own hosts: those of the rack nearest to free.
        let levels = self.cluster.levels.len();
        let mut nearest: Vec<HostId> = self.cluster.domains[levels - 1][rack as usize].hosts.clone().collect();
        nearest.sort_by_key(|&h| (self.ledger.used(h).count_ones(), h));
        let holding: Holding = nearest
            .into_iter()
            .take(shape.members as usize)
            .map(|h| (h, self.ledger.free(h)))
            .filter(|&(_, free)| free != 0)
            .collect();
        if holding.is_empty() {
            return Ok(Some(None));
        }
        let holder = JobHolder::Hold(self.jobs[job].id.clone());
        self.reserve(&holder, &holding)?;
        Ok(Some(Some(holder)))
    }

    /// Starts what fits, in queue order (strict FIFO stops at a head that does not fit,
    /// best-effort passes it); the jobs starting at this instant are planned again together
    /// by the engine, then recorded.
    fn start_fitting(&mut self) -> Result<(), JobReplayError> {
        let mut starting: Vec<(usize, Holding)> = Vec::new();
        let mut holds: Vec<JobHolder> = Vec::new();
        if !self.queue.is_empty() {
            self.placer.refresh_demand(&self.ledger, self.queue.iter().copied(), self.now / MS_PER_S);
        }
        let mut index = 0;
        while index < self.queue.len() {
            let job = self.queue[index];
            let shape = self.shapes[job];
            if let Some(hold) = self.rack_hold(job)? {
                holds.extend(hold);
                index += 1;
                continue;
            }
            let Some(pool) = self.free_index.fitting_pool(shape) else {
                if self.queue_mode == QueueMode::StrictFifo {
                    break;
                }
                index += 1;
                continue;
            };
            let policy = self.policy;
            let pool_product = if policy == JobPolicy::Topoplace { None } else { Some(self.pools[pool]) };
            let holding =
                self.placer.place(&self.ledger, job, shape.members, shape.gpus_per_member, pool_product).ok_or_else(
                    || self.internal(format!("{policy} found no place for job `{}` that fits", self.jobs[job].id)),
                )?;
            check_shape(self.cluster, &holding, shape)
                .map_err(|m| self.internal(format!("{policy}, job `{}`: {m}", self.jobs[job].id)))?;
            self.reserve(&self.job_holder(job), &holding)?;
            starting.push((job, holding));
            self.queue.remove(index);
        }
        if starting.len() > 1 && self.placer.plans_batches() {
            self.replan_together(&mut starting)?;
        }
        // Room for each spreading gang, judged with everything starting now (and every
        // hold) in place, the gang's own hosts counted as free.
        let rooms: Vec<Option<SpanRoom>> = starting
            .iter()
            .map(|(job, holding)| {
                let spreads = self.shapes[*job].members > 1 && self.first_start[*job].is_none();
                (spreads && spread(self.cluster, holding) != Spread::OneRack)
                    .then(|| span_room(self.cluster, &self.ledger, holding))
            })
            .collect();
        for holder in holds {
            self.release(&holder)?;
        }
        for ((job, holding), room) in starting.into_iter().zip(rooms) {
            self.record_start(job, holding, room);
        }
        Ok(())
    }

    /// The jobs that start at this instant, planned again together by the engine (the same
    /// jobs start either way; FIFO decided which).
    fn replan_together(&mut self, starting: &mut [(usize, Holding)]) -> Result<(), JobReplayError> {
        for (job, _) in starting.iter() {
            self.release(&self.job_holder(*job))?;
        }
        let batch: Vec<usize> = starting.iter().map(|(job, _)| *job).collect();
        if let Some(holdings) = self.placer.replan_together(&self.ledger, &batch) {
            for ((job, holding), better) in starting.iter_mut().zip(holdings) {
                check_shape(self.cluster, &better, self.shapes[*job])
                    .map_err(|m| self.internal(format!("{}, job `{}`: {m}", self.policy, self.jobs[*job].id)))?;
                *holding = better;
            }
        }
        for (job, holding) in starting.iter() {
            self.reserve(&self.job_holder(*job), holding)?;
        }
        Ok(())
    }

    /// A job starts now on `holding` (already reserved): the counters, its start, its end event.
    fn record_start(&mut self, job: usize, holding: Holding, room: Option<SpanRoom>) {
        if let Some(room) = room {
            self.spare_hosts_sum += u64::from(room.spare_hosts);
            self.spans += 1;
            if room.rack_had_room {
                self.outcome.multi_host_spans_avoidable += 1;
            }
        }
        self.waiting_for.remove(&job);
        let shape = self.shapes[job];
        let gpus = u64::from(self.jobs[job].gpus);
        self.used_gpus += gpus;
        if self.first_start[job].is_none() {
            self.first_start[job] = Some(self.now);
            self.outcome.started += 1;
            if shape.members > 1 {
                self.outcome.multi_host_jobs += 1;
                match spread(self.cluster, &holding) {
                    Spread::OneRack => self.outcome.multi_host_in_one_rack += 1,
                    Spread::OneBlock => self.outcome.multi_host_in_one_block += 1,
                    Spread::Blocks => self.outcome.multi_host_across_blocks += 1,
                }
            }
        }
        if self.jobs[job].gpus >= STRANDED_JOB_GPUS {
            if let Some(count) = self.waiting_large.get_mut(&self.jobs[job].gpus) {
                *count -= 1;
                if *count == 0 {
                    self.waiting_large.remove(&self.jobs[job].gpus);
                }
            }
        }
        let start_index = self.outcome.starts.len();
        self.outcome.starts.push(JobStart { job, at_ms: self.now, end_ms: u64::MAX, holding });
        self.running.insert(job, Running { start_index, gpus });
        let end = self.now.saturating_add(self.jobs[job].duration_s.saturating_mul(MS_PER_S));
        self.events.push(Reverse((end, start_index)));
    }

    /// GPUs are conserved at every event: free + running + drained = the cluster's GPUs.
    /// Returns the free GPUs.
    fn check_conservation(&mut self) -> Result<u64, JobReplayError> {
        let free = self.ledger.free_gpus();
        let (used, drained, total) = (self.used_gpus, self.drained_gpus, self.total_gpus);
        if free + used + drained != total {
            return Err(self.internal(format!("{free} free + {used} running + {drained} drained != {total} GPUs")));
        }
        if self.usage_steps.last().is_some_and(|&(_, in_use)| in_use != used) {
            self.usage_steps.push((self.now, used));
        }
        Ok(free)
    }

    /// Moves the clock to the next completion, arrival or drain, accounting busy and
    /// stranded time on the way (`free`: the free GPUs until then); `false` when nothing is
    /// left to happen.
    fn advance(&mut self, free: u64) -> bool {
        let next = [
            self.events.peek().map(|Reverse((at, _))| *at),
            self.order.get(self.next_arrival).map(|&j| self.arrival_ms[j]),
            self.drains.get(self.next_drain).map(|(at, _)| *at),
        ]
        .into_iter()
        .flatten()
        .min();
        let Some(next) = next else { return false };
        let span = next - self.now;
        self.busy_ms_gpus += u128::from(span) * u128::from(self.used_gpus);
        if self.waiting_large.keys().next().is_some_and(|&gpus| u64::from(gpus) <= free) {
            self.stranded_ms += span;
        }
        self.now = next;
        true
    }

    /// The outcome: delays, makespan, utilisation, stranded hours, the timeline.
    fn finish(self) -> JobOutcome {
        let Simulation { mut outcome, queue, jobs, first_start, arrival_ms, now, total_gpus, .. } = self;
        outcome.never_started = queue.len();
        let mut delays: Vec<u64> =
            (0..jobs.len()).filter_map(|j| first_start[j].map(|start| start - arrival_ms[j])).collect();
        delays.sort_unstable();
        if !delays.is_empty() {
            outcome.mean_queue_delay_s = delays.iter().map(|&d| d as f64).sum::<f64>() / delays.len() as f64 / 1000.0;
            let rank = (delays.len() * 95).div_ceil(100).max(1) - 1;
            outcome.p95_queue_delay_s = delays[rank] as f64 / 1000.0;
        }
        outcome.makespan_s = now as f64 / 1000.0;
        if now > 0 && total_gpus > 0 {
            outcome.gpu_utilisation = self.busy_ms_gpus as f64 / (now as f64 * total_gpus as f64);
        }
        outcome.stranded_64gpu_hours = self.stranded_ms as f64 / 3_600_000.0;
        if self.spans > 0 {
            outcome.span_spare_hosts_mean = self.spare_hosts_sum as f64 / self.spans as f64;
        }
        outcome.timeline = timeline(&self.usage_steps, now, total_gpus);
        outcome
    }
}

/// The room a gang that spread over racks had at its start.
struct SpanRoom {
    /// One rack had as many whole free hosts of one product as the gang has members.
    rack_had_room: bool,
    /// Whole free hosts of the gang's product beyond its members, in the whole cluster.
    spare_hosts: u32,
}

/// Room for `holding` (already reserved in `ledger`), counting hosts that are whole free or
/// the gang's own (a drained host is held whole by its drain, so never free). Any product
/// counts for a rack (the jobs name none).
fn span_room(cluster: &Cluster, ledger: &Ledger<JobHolder>, holding: &Holding) -> SpanRoom {
    let available = |host: HostId| {
        ledger.used(host) == 0 || holding.iter().any(|&(own, mask)| own == host && ledger.used(host) == mask)
    };
    let members = holding.len();
    let racks = cluster.domains.last().map_or(&[][..], Vec::as_slice);
    let rack_had_room = racks.iter().any(|rack| {
        let mut per_product: Vec<(ProductId, usize)> = Vec::new();
        for host in rack.hosts.clone().filter(|&h| available(h)) {
            let product = cluster.host(host).product;
            match per_product.iter_mut().find(|(p, _)| *p == product) {
                Some((_, count)) => *count += 1,
                None => per_product.push((product, 1)),
            }
        }
        per_product.iter().any(|&(_, count)| count >= members)
    });
    let product = holding.first().map(|&(h, _)| cluster.host(h).product);
    let whole = (0..cluster.hosts.len() as HostId)
        .filter(|&h| Some(cluster.host(h).product) == product && available(h))
        .count();
    SpanRoom { rack_had_room, spare_hosts: whole.saturating_sub(members) as u32 }
}

/// Whether a rack has `members` whole free hosts.
fn rack_holds(cluster: &Cluster, ledger: &Ledger<JobHolder>, rack: u32, members: u32) -> bool {
    let Some(domain) = cluster.domains.last().and_then(|level| level.get(rack as usize)) else { return false };
    domain.hosts.clone().filter(|&h| ledger.used(h) == 0 && ledger.free(h) != 0).count() >= members as usize
}

/// The rack a waiting gang of `members` whole hosts should wait for: the one it already
/// waits for while that can still hold it, else the rack with the most whole free hosts
/// (then the fewest GPUs in use, then the first) among racks with enough hosts and no hold.
fn rack_to_wait_for(cluster: &Cluster, ledger: &Ledger<JobHolder>, members: u32, current: Option<u32>) -> Option<u32> {
    let racks = cluster.domains.last()?;
    let usable = |rack: &topoplace_engine::topology::Domain| {
        rack.hosts.len() >= members as usize && rack.hosts.clone().any(|h| ledger.free(h) != 0)
    };
    if let Some(rack) = current.filter(|&r| racks.get(r as usize).is_some_and(usable)) {
        return Some(rack);
    }
    racks
        .iter()
        .enumerate()
        .filter(|(_, rack)| usable(rack))
        .map(|(index, rack)| {
            let whole = rack.hosts.clone().filter(|&h| ledger.used(h) == 0).count();
            let used: u32 = rack.hosts.clone().map(|h| ledger.used(h).count_ones()).sum();
            (std::cmp::Reverse(whole), used, index as u32)
        })
        .min()
        .map(|(_, _, index)| index)
}

/// Puts a stopped job back in arrival order, ahead of later arrivals.
fn requeue(queue: &mut VecDeque<usize>, job: usize, arrival_ms: &[u64]) {
    let key = (arrival_ms[job], job);
    let at = queue.iter().position(|&other| (arrival_ms[other], other) > key).unwrap_or(queue.len());
    queue.insert(at, job);
}

fn reserve(
    ledger: &mut Ledger<JobHolder>,
    index: &mut FreeIndex,
    holder: &JobHolder,
    holding: &Holding,
) -> Result<(), String> {
    let before: Vec<u32> = holding.iter().map(|&(h, _)| ledger.free(h).count_ones()).collect();
    ledger.reserve(holder, holding).map_err(|e| e.to_string())?;
    for (&(host, _), before) in holding.iter().zip(before) {
        index.update(host, before, ledger.free(host).count_ones());
    }
    Ok(())
}

fn release(ledger: &mut Ledger<JobHolder>, index: &mut FreeIndex, holder: &JobHolder, now: u64) -> Result<(), String> {
    let holding = ledger.holding(holder).cloned().ok_or_else(|| format!("`{holder}` holds nothing at {now} ms"))?;
    let before: Vec<u32> = holding.iter().map(|&(h, _)| ledger.free(h).count_ones()).collect();
    ledger.release(holder).map_err(|e| e.to_string())?;
    for (&(host, _), before) in holding.iter().zip(before) {
        index.update(host, before, ledger.free(host).count_ones());
    }
    Ok(())
}

/// A placement must be exactly the job: one entry per member, each on its own host for a
/// gang, with the member's GPU count.
fn check_shape(cluster: &Cluster, holding: &Holding, shape: Shape) -> Result<(), String> {
    if holding.len() != shape.members as usize {
        return Err(format!("{} host(s) for {} member(s)", holding.len(), shape.members));
    }
    for (index, &(host, mask)) in holding.iter().enumerate() {
        if mask.count_ones() != shape.gpus_per_member {
            return Err(format!(
                "{} GPUs on `{}` for a member of {}",
                mask.count_ones(),
                cluster.host(host).name,
                shape.gpus_per_member
            ));
        }
        if holding[..index].iter().any(|&(other, _)| other == host) {
            return Err(format!("two members on `{}`", cluster.host(host).name));
        }
    }
    Ok(())
}

/// Whether hosts share the innermost domain (rack), the one above it (block), or neither.
pub fn spread(cluster: &Cluster, holding: &[(HostId, GpuMask)]) -> Spread {
    let levels = cluster.levels.len();
    let shared = holding.iter().skip(1).map(|&(h, _)| cluster.shared_levels(holding[0].0, h)).min().unwrap_or(levels);
    // Without a level above the racks, the whole cluster is the one block.
    if shared >= levels {
        Spread::OneRack
    } else if shared + 1 >= levels {
        Spread::OneBlock
    } else {
        Spread::Blocks
    }
}

/// Mean utilisation in equal slices of `[0, end)` from the usage step function.
fn timeline(steps: &[(u64, u64)], end: u64, total_gpus: u64) -> Vec<f64> {
    if end == 0 || total_gpus == 0 {
        return Vec::new();
    }
    let slice = end as f64 / TIMELINE_POINTS as f64;
    let mut points = vec![0.0; TIMELINE_POINTS];
    for (index, &(at, used)) in steps.iter().enumerate() {
        let until = steps.get(index + 1).map_or(end, |&(next, _)| next);
        let (mut from, to) = (at as f64, until as f64);
        while from < to {
            let bin = ((from / slice) as usize).min(TIMELINE_POINTS - 1);
            let bin_end = ((bin + 1) as f64 * slice).min(to);
            let bin_end = if bin_end <= from { to } else { bin_end };
            points[bin] += (bin_end - from) * used as f64;
            from = bin_end;
        }
    }
    points.iter().map(|gpu_ms| gpu_ms / (slice * total_gpus as f64)).collect()
}
