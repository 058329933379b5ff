//! A seeded study of preemption through the secondary scheduler's own core
//! ([`Scheduler`] and its [`Book`]), on a real topology (Lingjun's 847 hosts by default): two
//! priority classes, high-priority serving replicas of 8 to 32 GPUs (one to four 8-GPU
//! members, tensor-parallel 8, a replica of several members inside one leaf) over
//! low-priority batch work of 1 to 8 GPUs (single pods, and gangs of 2 × 4 GPUs), with faults
//! injected: Bindings that fail, victims that take long to terminate, nodes that go NotReady.
//! The same arrivals (same seed) run under topoplace's preemption
//! ([`PreemptionMode::WholeUnit`]) and under kube-scheduler's node-by-node preemption for
//! independent pods ([`PreemptionMode::NodeByNode`]), and the report gives the serving
//! replicas' queueing and the GPUs evicted per preemption.
//!
//! Checked on every step, as errors naming the step: the book's and the scheduler's
//! invariants, no GPU given twice, and (whole-unit mode) no gang ever half-evicted. The
//! report also counts how many cycles each replica that preempted took to start after its
//! last victim left ([`PreemptionReport::late_starts`]).
//!
//! Time is simulated (one cycle a second); nothing here reads a clock. Deterministic for a
//! topology, a seed and a configuration.

use std::collections::{BTreeMap, BTreeSet};

use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};
use thiserror::Error;
use topoplace_engine::topology::Cluster;
use topoplace_engine::workload::{MemoryNeed, Scope};
use topoplace_online::reservation::{Book, BookConfig, GangMembership, PodDemand, PodIdentity};
use topoplace_online::scheduler::predicates::{NodeFacts, PodNeeds, Resources};
use topoplace_online::scheduler::{
    BoundPod, Decision, Finished, PendingPod, PreemptionMode, Scheduler, SchedulerConfig,
};

/// The priority of serving replicas; batch work has 0.
pub const SERVING_PRIORITY: i32 = 1000;

/// What the study runs: its length, its load and its faults.
#[derive(Debug, Clone, PartialEq)]
pub struct PreemptionStudyConfig {
    pub seed: u64,
    /// Cycles to run, one per simulated second.
    pub steps: u64,
    /// Mean seconds between serving replicas.
    pub serving_every_s: f64,
    /// Batch jobs arriving per second, on average.
    pub batch_per_s: f64,
    /// A batch pod still pending after this long is given up by its user (seconds).
    pub batch_patience_s: u64,
    /// Chance that one Binding fails.
    pub binding_failure: f64,
    /// Chance that a victim takes 10 to 30 s to terminate instead of 1 to 3 s.
    pub slow_termination: f64,
    /// Chance per second that a node goes NotReady for a minute.
    pub node_flap: f64,
}

impl Default for PreemptionStudyConfig {
    fn default() -> Self {
        PreemptionStudyConfig {
            seed: 1,
            steps: 7_200,
            serving_every_s: 45.0,
            batch_per_s: 1.6,
            batch_patience_s: 900,
            binding_failure: 0.02,
            slow_termination: 0.1,
            node_flap: 0.01,
        }
    }
}

/// What one run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct PreemptionReport {
    pub mode: PreemptionMode,
    pub serving_arrived: usize,
    pub serving_started: usize,
    /// Serving replicas' queueing, arrival to the last member bound, over those started (s).
    pub queueing_p50_s: f64,
    pub queueing_p99_s: f64,
    pub queueing_max_s: f64,
    /// Every started replica's queueing, sorted (s): for pooling runs.
    pub queueing_s: Vec<f64>,
    /// Serving replicas still waiting at the end, and the longest such wait (s).
    pub serving_waiting: usize,
    pub waiting_max_s: f64,
    /// Preempt decisions, pods evicted and the GPUs they held (with, node by node, those of
    /// batch gang members lost because their partner was evicted).
    pub preemptions: usize,
    pub victims: usize,
    pub gpus_evicted: u64,
    /// Batch gangs of which some members were evicted while others kept running.
    pub gangs_half_evicted: usize,
    /// Replicas that preempted and started, and of those, how many started more than one
    /// cycle after their last victim left though none of their Bindings failed.
    pub preempted_started: usize,
    pub late_starts: usize,
    /// Mean share of the cluster's GPUs bound, over the run.
    pub gpu_utilisation: f64,
    pub batch_given_up: usize,
    pub binding_faults: usize,
}

impl PreemptionReport {
    /// GPUs evicted per preemption decision (0 without any).
    pub fn gpus_per_preemption(&self) -> f64 {
        if self.preemptions == 0 {
            0.0
        } else {
            self.gpus_evicted as f64 / self.preemptions as f64
        }
    }
}

#[derive(Debug, Error, PartialEq)]
pub enum StudyError {
    #[error("step {step}: {detail}")]
    Invariant { step: u64, detail: String },
}

#[derive(Debug, Clone)]
struct SimPod {
    pending: PendingPod,
    node: Option<String>,
    gpus: Vec<u8>,
    runs_for_s: u64,
    ends_at: u64,
    arrived: u64,
    /// Deleted by a preemption: it leaves at this second.
    leaving_at: Option<u64>,
}

/// One serving replica's course.
#[derive(Debug, Clone, Default)]
struct Replica {
    arrived: u64,
    started: Option<u64>,
    /// Victims of its preemptions still bound, and when the last one left.
    victims: BTreeSet<String>,
    victims_left_at: Option<u64>,
    preempted: bool,
    binding_failed: bool,
    late: bool,
}

/// Runs the study on `cluster` in `mode`.
pub fn run(
    cluster: Cluster,
    mode: PreemptionMode,
    config: &PreemptionStudyConfig,
) -> Result<PreemptionReport, StudyError> {
    Study::new(cluster, mode, config).run()
}

struct Study<'a> {
    config: &'a PreemptionStudyConfig,
    mode: PreemptionMode,
    /// Arrivals draw from their own stream, so both modes see the same ones.
    arrivals: Xoshiro256PlusPlus,
    /// Binding failures and termination times (they follow the decisions, so differ by mode).
    rng: Xoshiro256PlusPlus,
    /// Node flaps, from their own stream so that both modes see the same ones.
    flaps: Xoshiro256PlusPlus,
    /// Batch gangs part of which was evicted (node by node): a member left behind is lost
    /// with them, its GPUs counted as evicted.
    broken_gangs: BTreeSet<String>,
    book: Book,
    scheduler: Scheduler,
    facts: Vec<NodeFacts>,
    /// Nodes NotReady until this second.
    flapping: BTreeMap<usize, u64>,
    api: BTreeMap<String, SimPod>,
    replicas: BTreeMap<String, Replica>,
    next: u64,
    report: PreemptionReport,
    bound_gpu_seconds: u64,
}

impl<'a> Study<'a> {
    fn new(cluster: Cluster, mode: PreemptionMode, config: &'a PreemptionStudyConfig) -> Self {
        let facts: Vec<NodeFacts> = cluster
            .hosts
            .iter()
            .map(|h| NodeFacts {
                name: h.name.clone(),
                labels: h.labels.clone(),
                ready: true,
                unschedulable: false,
                taints: Vec::new(),
                allocatable: Resources::from([
                    ("cpu".to_string(), 192_000),
                    ("memory".to_string(), 2_000_000_000_000_000),
                    ("pods".to_string(), 110_000),
                ]),
            })
            .collect();
        let mut scheduler = Scheduler::new(SchedulerConfig { preemption: mode, ..SchedulerConfig::default() });
        scheduler.nodes_listed(facts.clone());
        let report = PreemptionReport {
            mode,
            serving_arrived: 0,
            serving_started: 0,
            queueing_p50_s: 0.0,
            queueing_p99_s: 0.0,
            queueing_max_s: 0.0,
            queueing_s: Vec::new(),
            serving_waiting: 0,
            waiting_max_s: 0.0,
            preemptions: 0,
            victims: 0,
            gpus_evicted: 0,
            gangs_half_evicted: 0,
            preempted_started: 0,
            late_starts: 0,
            gpu_utilisation: 0.0,
            batch_given_up: 0,
            binding_faults: 0,
        };
        Study {
            config,
            mode,
            arrivals: Xoshiro256PlusPlus::seed_from_u64(config.seed),
            rng: Xoshiro256PlusPlus::seed_from_u64(config.seed ^ 0x9e37_79b9_7f4a_7c15),
            flaps: Xoshiro256PlusPlus::seed_from_u64(config.seed ^ 0x5851_f42d_4c95_7f2d),
            broken_gangs: BTreeSet::new(),
            book: Book::new(cluster, BookConfig::default()),
            scheduler,
            facts,
            flapping: BTreeMap::new(),
            api: BTreeMap::new(),
            replicas: BTreeMap::new(),
            next: 0,
            report,
            bound_gpu_seconds: 0,
        }
    }

    fn run(mut self) -> Result<PreemptionReport, StudyError> {
        for step in 0..self.config.steps {
            self.arrive(step);
            self.leave(step);
            self.faults(step);
            self.cycle(step)?;
            self.check(step)?;
            self.bound_gpu_seconds +=
                self.api.values().filter(|p| p.node.is_some()).map(|p| p.gpus.len() as u64).sum::<u64>();
        }
        Ok(self.finish())
    }

    fn pod(&mut self, name: String, gpus: u32, gang: Option<GangMembership>, priority: i32) -> PendingPod {
        self.next += 1;
        let uid = format!("{name}-{}", self.next);
        let namespace = if priority >= SERVING_PRIORITY { "serving" } else { "batch" };
        PendingPod {
            demand: PodDemand {
                pod: PodIdentity { namespace: namespace.into(), name, uid },
                gpus,
                memory: MemoryNeed::None,
                tensor_parallel: None,
                pipeline_parallel: None,
                required: None,
                preferred: None,
                gang,
                roles: None,
                pool: Default::default(),
            },
            needs: PodNeeds { requests: Resources::from([("cpu".to_string(), 1_000)]), ..PodNeeds::default() },
            priority,
            never_preempts: false,
            labels: BTreeMap::new(),
        }
    }

    fn add(&mut self, pending: PendingPod, runs_for_s: u64, step: u64) {
        self.scheduler.pending_applied(pending.clone());
        let uid = pending.demand.pod.uid.clone();
        let pod = SimPod {
            pending,
            node: None,
            gpus: Vec::new(),
            runs_for_s,
            ends_at: u64::MAX,
            arrived: step,
            leaving_at: None,
        };
        self.api.insert(uid, pod);
    }

    fn arrive(&mut self, step: u64) {
        if self.arrivals.random_bool((1.0 / self.config.serving_every_s).clamp(0.0, 1.0)) {
            let members = self.arrivals.random_range(1..=4u32);
            let key = format!("serving/r{step}");
            let runs_for = self.arrivals.random_range(1_800..5_400u64);
            for rank in 0..members {
                let gang = GangMembership {
                    key: key.clone(),
                    size: members,
                    max: None,
                    rank: Some(rank),
                    order: Default::default(),
                };
                let mut pod = self.pod(format!("r{step}-{rank}"), 8, Some(gang), SERVING_PRIORITY);
                pod.demand.tensor_parallel = Some(8);
                if members > 1 {
                    pod.demand.required = Some(Scope::parse("leaf"));
                }
                self.add(pod, runs_for, step);
            }
            self.replicas.insert(key, Replica { arrived: step, ..Replica::default() });
            self.report.serving_arrived += 1;
        }
        let rate = self.config.batch_per_s.max(0.0);
        let jobs = rate.floor() as u32 + u32::from(self.arrivals.random_bool(rate.fract()));
        for _ in 0..jobs {
            let runs_for = self.arrivals.random_range(600..2_400u64);
            if self.arrivals.random_bool(0.25) {
                let key = format!("batch/g{}", self.next);
                for rank in 0..2 {
                    let gang = GangMembership {
                        key: key.clone(),
                        size: 2,
                        max: None,
                        rank: Some(rank),
                        order: Default::default(),
                    };
                    let pod = self.pod(format!("g{}-{rank}", self.next), 4, Some(gang), 0);
                    self.add(pod, runs_for, step);
                }
            } else {
                let gpus = [1u32, 1, 2, 4, 8][self.arrivals.random_range(0..5usize)];
                let pod = self.pod(format!("b{}", self.next), gpus, None, 0);
                self.add(pod, runs_for, step);
            }
        }
    }

    /// Pod `uid` gone from the API at second `step`, as the watches report it.
    fn remove(&mut self, uid: &str, step: u64) -> Option<SimPod> {
        let pod = self.api.remove(uid)?;
        if pod.node.is_some() {
            self.scheduler.bound_deleted(uid);
            self.book.forget_pod(uid);
        } else {
            self.scheduler.pending_deleted(uid);
        }
        for replica in self.replicas.values_mut() {
            if replica.victims.remove(uid) && replica.victims.is_empty() {
                replica.victims_left_at = Some(step);
            }
        }
        Some(pod)
    }

    fn leave(&mut self, step: u64) {
        let gone: Vec<(String, bool)> = self
            .api
            .iter()
            .filter_map(|(uid, p)| {
                let evicted = p.leaving_at.is_some_and(|at| at <= step);
                let finished = p.node.is_some() && p.ends_at <= step;
                let given_up = p.node.is_none()
                    && p.pending.priority < SERVING_PRIORITY
                    && step.saturating_sub(p.arrived) >= self.config.batch_patience_s;
                (evicted || finished || given_up).then(|| (uid.clone(), given_up))
            })
            .collect();
        for (uid, given_up) in gone {
            self.report.batch_given_up += usize::from(given_up);
            self.remove(&uid, step);
        }
        // A batch gang whose other member is gone is given up by its job (it cannot go on).
        let mut members: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (uid, pod) in &self.api {
            if let Some(gang) = pod.pending.demand.gang.as_ref().filter(|g| g.key.starts_with("batch/")) {
                members.entry(gang.key.clone()).or_default().push(uid.clone());
            }
        }
        for (gang, uids) in members.into_iter().filter(|(_, uids)| uids.len() == 1) {
            if let Some(pod) = self.remove(&uids[0], step) {
                if self.broken_gangs.remove(&gang) && pod.leaving_at.is_none() {
                    self.report.gpus_evicted += pod.gpus.len() as u64;
                }
            }
        }
    }

    fn faults(&mut self, step: u64) {
        let back: Vec<usize> = self.flapping.iter().filter(|(_, &until)| until <= step).map(|(&n, _)| n).collect();
        for index in back {
            self.flapping.remove(&index);
            self.facts[index].ready = true;
            self.scheduler.node_applied(self.facts[index].clone());
        }
        if self.flaps.random_bool(self.config.node_flap.clamp(0.0, 1.0)) {
            let index = self.flaps.random_range(0..self.facts.len());
            self.facts[index].ready = false;
            self.flapping.insert(index, step + 60);
            self.scheduler.node_applied(self.facts[index].clone());
        }
    }

    fn cycle(&mut self, step: u64) -> Result<(), StudyError> {
        for decision in self.scheduler.cycle(Some(&mut self.book), step * 1_000) {
            match decision {
                Decision::Bind { ticket, members } => {
                    let mut outcomes = Vec::with_capacity(members.len());
                    for member in &members {
                        if self.rng.random_bool(self.config.binding_failure.clamp(0.0, 1.0)) {
                            self.report.binding_faults += 1;
                            outcomes.push((member.pod.clone(), Err("injected 500".to_string())));
                            if let Some(gang) = self.gang_of(&member.pod.uid) {
                                if let Some(replica) = self.replicas.get_mut(&gang) {
                                    replica.binding_failed = true;
                                }
                            }
                        } else {
                            if let Some(pod) = self.api.get_mut(&member.pod.uid) {
                                pod.node = Some(member.node.clone());
                                pod.gpus = member.gpus.clone();
                                pod.ends_at = step + pod.runs_for_s;
                            }
                            outcomes.push((member.pod.clone(), Ok(())));
                        }
                    }
                    match self.scheduler.finish(Some(&mut self.book), &ticket, &outcomes, step * 1_000) {
                        Finished::Bound { members } => {
                            for member in &members {
                                if let Some(pod) = self.api.get(&member.pod.uid) {
                                    self.scheduler.bound_applied(bound_of(pod, &member.node));
                                }
                            }
                            self.started(&members.iter().map(|m| m.pod.uid.clone()).collect::<Vec<_>>(), step);
                        }
                        Finished::RolledBack { delete, .. } => {
                            for victim in delete {
                                self.recreate(&victim.uid, 'r', step);
                            }
                        }
                    }
                }
                Decision::Preempt { pods, victims, .. } => self.preempted(&pods, &victims, step)?,
                Decision::Repair { delete, .. } => {
                    for pod in delete {
                        self.recreate(&pod.uid, 'x', step);
                    }
                }
                Decision::NotScheduled { .. } | Decision::GangWaiting { .. } | Decision::ClearNominated { .. } => {}
            }
        }
        Ok(())
    }

    /// Pod `uid` deleted by the scheduler (a gang undone or repaired) and recreated by its
    /// controller as a pending pod (its uid with `mark` added).
    fn recreate(&mut self, uid: &str, mark: char, step: u64) {
        if let Some(mut pod) = self.remove(uid, step) {
            pod.pending.demand.pod.uid.push(mark);
            (pod.node, pod.ends_at) = (None, u64::MAX);
            pod.gpus.clear();
            self.scheduler.pending_applied(pod.pending.clone());
            self.api.insert(pod.pending.demand.pod.uid.clone(), pod);
        }
    }

    fn gang_of(&self, uid: &str) -> Option<String> {
        self.api.get(uid)?.pending.demand.gang.as_ref().map(|g| g.key.clone())
    }

    fn started(&mut self, uids: &[String], step: u64) {
        let Some(key) = uids.first().and_then(|uid| self.gang_of(uid)) else { return };
        let bound = self
            .api
            .values()
            .filter(|p| p.node.is_some() && p.pending.demand.gang.as_ref().is_some_and(|g| g.key == key))
            .count();
        let Some(replica) = self.replicas.get_mut(&key) else { return };
        let size = self.api.values().filter(|p| p.pending.demand.gang.as_ref().is_some_and(|g| g.key == key)).count();
        if replica.started.is_some() || bound < size {
            return;
        }
        replica.started = Some(step);
        if replica.preempted && !replica.binding_failed {
            if let Some(left) = replica.victims_left_at {
                replica.late = step > left + 1;
            }
        }
    }

    fn preempted(&mut self, pods: &[PodIdentity], victims: &[PodIdentity], step: u64) -> Result<(), StudyError> {
        self.report.preemptions += 1;
        let victim_uids: BTreeSet<&str> = victims.iter().map(|v| v.uid.as_str()).collect();
        let mut touched: BTreeSet<String> = BTreeSet::new();
        for victim in victims {
            let Some(pod) = self.api.get_mut(&victim.uid) else { continue };
            if pod.leaving_at.is_some() {
                return Err(StudyError::Invariant { step, detail: format!("{} evicted twice", victim.uid) });
            }
            let slow = self.rng.random_bool(self.config.slow_termination.clamp(0.0, 1.0));
            let grace = if slow { self.rng.random_range(10..=30u64) } else { self.rng.random_range(1..=3u64) };
            pod.leaving_at = Some(step + grace);
            self.report.victims += 1;
            self.report.gpus_evicted += pod.gpus.len() as u64;
            if let Some(gang) = &pod.pending.demand.gang {
                touched.insert(gang.key.clone());
            }
        }
        for gang in touched {
            let running_rest = self.api.iter().any(|(uid, p)| {
                p.node.is_some()
                    && !victim_uids.contains(uid.as_str())
                    && p.pending.demand.gang.as_ref().is_some_and(|g| g.key == gang)
            });
            if running_rest {
                self.report.gangs_half_evicted += 1;
                self.broken_gangs.insert(gang.clone());
                if self.mode == PreemptionMode::WholeUnit {
                    return Err(StudyError::Invariant { step, detail: format!("gang {gang} half-evicted") });
                }
            }
        }
        if let Some(key) = pods.first().and_then(|p| self.gang_of(&p.uid)) {
            if let Some(replica) = self.replicas.get_mut(&key) {
                replica.preempted = true;
                replica.victims.extend(victims.iter().map(|v| v.uid.clone()));
                replica.victims_left_at = None;
            }
        }
        Ok(())
    }

    fn check(&self, step: u64) -> Result<(), StudyError> {
        let fail = |detail: String| StudyError::Invariant { step, detail };
        self.book.check().map_err(|e| fail(format!("book: {e}")))?;
        self.scheduler.check().map_err(|e| fail(format!("scheduler: {e}")))?;
        let mut given: BTreeSet<(&str, u8)> = BTreeSet::new();
        for pod in self.api.values() {
            let Some(node) = &pod.node else { continue };
            for &gpu in &pod.gpus {
                if !given.insert((node.as_str(), gpu)) {
                    return Err(fail(format!("GPU {gpu} of {node} given twice")));
                }
            }
        }
        Ok(())
    }

    fn finish(mut self) -> PreemptionReport {
        let end = self.config.steps;
        let mut waits: Vec<f64> = Vec::new();
        for replica in self.replicas.values() {
            match replica.started {
                Some(at) => {
                    waits.push((at - replica.arrived) as f64);
                    if replica.preempted {
                        self.report.preempted_started += 1;
                        self.report.late_starts += usize::from(replica.late);
                    }
                }
                None => {
                    self.report.serving_waiting += 1;
                    self.report.waiting_max_s = self.report.waiting_max_s.max((end - replica.arrived) as f64);
                }
            }
        }
        waits.sort_by(f64::total_cmp);
        self.report.serving_started = waits.len();
        self.report.queueing_p50_s = percentile(&waits, 0.50);
        self.report.queueing_p99_s = percentile(&waits, 0.99);
        self.report.queueing_max_s = waits.last().copied().unwrap_or(0.0);
        self.report.queueing_s = waits;
        let capacity = self.facts.len() as f64 * 8.0 * end.max(1) as f64;
        self.report.gpu_utilisation = self.bound_gpu_seconds as f64 / capacity;
        self.report
    }
}

fn bound_of(pod: &SimPod, node: &str) -> BoundPod {
    BoundPod {
        pod: pod.pending.demand.pod.clone(),
        node: node.to_string(),
        requests: pod.pending.needs.requests.clone(),
        gang: pod.pending.demand.gang.as_ref().map(|g| g.key.clone()),
        priority: pod.pending.priority,
        labels: pod.pending.labels.clone(),
    }
}

/// The nearest-rank percentile `q` of sorted `values` (0 when empty).
pub fn percentile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Lingjun-shaped cluster of `leaves` leaves of 8 hosts (8 H800 each), 4 leaves a spine.
    fn cluster(leaves: usize) -> Cluster {
        let mut text = String::from("ip,DSW,PSW,ASW\n");
        for leaf in 0..leaves {
            for host in 0..8 {
                text.push_str(&format!("{:02x}{:02x},G1,P{},S{leaf}\n", leaf, host, leaf / 4));
            }
        }
        let spec = topoplace_formats::convert::lingjun("topo.csv", &text, "H800", 8).expect("topology");
        Cluster::build(spec).expect("cluster")
    }

    /// Both modes on the same arrivals over a full 16-leaf cluster, with faults: no invariant
    /// breaks (no GPU given twice, the book's and the scheduler's own checks on every step);
    /// topoplace never half-evicts a gang and starts every replica that preempted within one
    /// cycle of its last victim leaving (unless its own Binding failed); both preempt.
    #[test]
    fn both_modes_keep_every_invariant_and_topoplace_starts_within_a_cycle_of_its_victims() {
        let config = PreemptionStudyConfig {
            seed: 7,
            steps: 1_500,
            serving_every_s: 40.0,
            batch_per_s: 0.3,
            ..PreemptionStudyConfig::default()
        };
        let whole = run(cluster(16), PreemptionMode::WholeUnit, &config).expect("whole-unit study");
        let baseline = run(cluster(16), PreemptionMode::NodeByNode, &config).expect("node-by-node study");
        assert_eq!(whole.serving_arrived, baseline.serving_arrived, "the same arrivals");
        assert!(whole.preemptions > 0 && baseline.preemptions > 0, "{whole:?}\n{baseline:?}");
        assert!(whole.preempted_started > 0, "{whole:?}");
        assert_eq!(whole.late_starts, 0, "{whole:?}");
        assert!(whole.gpu_utilisation > 0.5, "the cluster is full enough to preempt: {whole:?}");
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!((percentile(&values, 0.5), percentile(&values, 0.99), percentile(&[], 0.5)), (50.0, 99.0, 0.0));
        assert_eq!(percentile(&[3.0], 0.99), 3.0);
    }
}
