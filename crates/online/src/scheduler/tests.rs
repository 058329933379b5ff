//! The scheduler's decisions on small clusters (predicates, gang assembly, rollback,
//! competing gangs, priority, the starvation guard, repair), and a seeded simulation over the
//! Lingjun topology with faults, checked after every step.

use std::collections::{BTreeMap, BTreeSet};

use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};

use super::predicates::{Taint, TaintEffect, Toleration};
use super::*;
use crate::reservation::{BookConfig, GangMembership};
use topoplace_engine::testkit::node;
use topoplace_engine::topology::{Cluster, ClusterSpec};
use topoplace_engine::workload::MemoryNeed;

const LEAF: &str = "network.topology.nvidia.com/leaf";

fn book_of(racks: usize, hosts_per_rack: usize) -> Book {
    let mut nodes = Vec::new();
    for rack in 0..racks {
        for host in 0..hosts_per_rack {
            nodes.push(node(&format!("r{rack}-{host}"), "H100", 8, &[(LEAF, format!("r{rack}").as_str())]));
        }
    }
    let cluster = Cluster::build(ClusterSpec { name: "t".into(), levels: vec![LEAF.into()], nodes }).expect("cluster");
    Book::new(cluster, BookConfig::default())
}

fn facts_of(book: &Book) -> Vec<NodeFacts> {
    book.cluster()
        .hosts
        .iter()
        .map(|h| NodeFacts {
            name: h.name.clone(),
            labels: h.labels.clone(),
            ready: true,
            unschedulable: false,
            taints: Vec::new(),
            allocatable: Resources::from([
                ("cpu".to_string(), 96_000),
                ("memory".to_string(), 1_000_000_000_000_000),
                ("pods".to_string(), 110_000),
                ("nvidia.com/gpu".to_string(), 8_000),
            ]),
        })
        .collect()
}

fn scheduler_on(book: &Book) -> Scheduler {
    let mut scheduler = Scheduler::new(SchedulerConfig::default());
    scheduler.nodes_listed(facts_of(book));
    scheduler
}

fn pending(name: &str, gpus: u32, gang: Option<(&str, u32, u32)>, cpu_milli: i64) -> PendingPod {
    PendingPod {
        demand: PodDemand {
            pod: PodIdentity { namespace: "ns".into(), name: name.into(), uid: format!("{name}-uid") },
            gpus,
            memory: MemoryNeed::None,
            tensor_parallel: None,
            pipeline_parallel: None,
            required: None,
            preferred: None,
            gang: gang.map(|(g, size, rank)| GangMembership {
                key: format!("ns/{g}"),
                size,
                max: None,
                rank: Some(rank),
                order: Default::default(),
            }),
            roles: None,
            pool: Default::default(),
        },
        needs: PodNeeds { requests: Resources::from([("cpu".to_string(), cpu_milli)]), ..PodNeeds::default() },
        priority: 0,
        never_preempts: false,
        labels: Default::default(),
    }
}

fn gang(name: &str, size: u32, gpus: u32) -> Vec<PendingPod> {
    (0..size).map(|r| pending(&format!("{name}-{r}"), gpus, Some((name, size, r)), 1000)).collect()
}

/// Carries out Bind decisions with every Binding succeeding (or failing for `fail`), and
/// returns the other decisions.
fn run(
    scheduler: &mut Scheduler,
    book: &mut Book,
    now: u64,
    fail: &BTreeSet<String>,
) -> (Vec<BindMember>, Vec<Decision>) {
    let mut bound = Vec::new();
    let mut other = Vec::new();
    for decision in scheduler.cycle(Some(book), now) {
        match decision {
            Decision::Bind { ticket, members } => {
                let outcomes: Vec<_> = members
                    .iter()
                    .map(|m| {
                        let result = if fail.contains(&m.pod.name) { Err("injected".to_string()) } else { Ok(()) };
                        (m.pod.clone(), result)
                    })
                    .collect();
                match scheduler.finish(Some(book), &ticket, &outcomes, now) {
                    Finished::Bound { members } => bound.extend(members),
                    Finished::RolledBack { delete, .. } => {
                        for pod in delete {
                            scheduler.bound_deleted(&pod.uid);
                            book.forget_pod(&pod.uid);
                        }
                    }
                }
            }
            other_decision => other.push(other_decision),
        }
    }
    book.check().expect("book invariants");
    scheduler.check().expect("scheduler invariants");
    (bound, other)
}

fn messages(decisions: &[Decision]) -> Vec<String> {
    decisions
        .iter()
        .filter_map(|d| match d {
            Decision::NotScheduled { message, .. } | Decision::GangWaiting { message, .. } => Some(message.clone()),
            Decision::Repair { message, .. } | Decision::Preempt { message, .. } => Some(message.clone()),
            Decision::Bind { .. } | Decision::ClearNominated { .. } => None,
        })
        .collect()
}

#[test]
fn single_pods_meet_taints_selectors_and_resources() {
    let mut book = book_of(1, 3);
    let mut scheduler = scheduler_on(&book);
    let mut facts = facts_of(&book);
    facts[0].taints.push(Taint { key: "dedicated".into(), value: "train".into(), effect: TaintEffect::NoSchedule });
    facts[1].allocatable.insert("cpu".into(), 2000);
    scheduler.nodes_listed(facts);

    let mut hungry = pending("hungry", 1, None, 4000);
    hungry.needs.node_selector.insert("kubernetes.io/hostname".into(), "nowhere".into());
    scheduler.pending_applied(hungry);
    let (bound, other) = run(&mut scheduler, &mut book, 0, &BTreeSet::new());
    assert!(bound.is_empty());
    assert_eq!(
        messages(&other),
        vec!["0/3 nodes are available: 3 node(s) didn't match Pod's node affinity/selector.".to_string()]
    );

    let mut tolerant = pending("tolerant", 2, None, 4000);
    tolerant.needs.tolerations.push(Toleration {
        key: "dedicated".into(),
        exists: true,
        value: String::new(),
        effect: None,
    });
    tolerant.needs.node_selector.insert(LEAF.into(), "r0".into());
    scheduler.pending_applied(tolerant);
    let plain = pending("plain", 1, None, 4000);
    scheduler.pending_applied(plain);
    let (bound, _) = run(&mut scheduler, &mut book, 1, &BTreeSet::new());
    let placed: BTreeMap<String, String> = bound.iter().map(|m| (m.pod.name.clone(), m.node.clone())).collect();
    assert_eq!(placed.get("plain").map(String::as_str), Some("r0-2"), "r0-0 is tainted, r0-1 has 2 CPUs");
    assert!(placed.get("tolerant").is_some_and(|n| n == "r0-0" || n == "r0-2"));
    assert_eq!(scheduler.usage("r0-2").and_then(|u| u.get("cpu")).copied().unwrap_or(0) % 4000, 0);

    // A pod that asks for too much CPU everywhere: counted per reason.
    scheduler.pending_deleted("hungry-uid");
    scheduler.pending_applied(pending("greedy", 1, None, 200_000));
    let (_, other) = run(&mut scheduler, &mut book, 2, &BTreeSet::new());
    assert_eq!(
        messages(&other),
        vec!["0/3 nodes are available: 1 node(s) had untolerated taint {dedicated: train}, 2 Insufficient cpu."
            .to_string()]
    );
}

#[test]
fn gang_waits_for_every_member_then_binds_whole() {
    let mut book = book_of(2, 4);
    let mut scheduler = scheduler_on(&book);
    let members = gang("g", 4, 8);
    for member in members.iter().rev().take(3) {
        scheduler.pending_applied(member.clone());
    }
    let (bound, other) = run(&mut scheduler, &mut book, 0, &BTreeSet::new());
    assert!(bound.is_empty());
    assert_eq!(messages(&other), vec!["gang `ns/g`: 3 of 4 members exist; waiting for the rest before placing any"]);
    assert_eq!(book.ledger().free_gpus(), 64, "nothing is held while members are missing");
    let timeout = scheduler.config().gang_wait_timeout_ms;
    let (_, other) = run(&mut scheduler, &mut book, timeout, &BTreeSet::new());
    assert!(matches!(&other[..], [Decision::NotScheduled { reason: REASON_GANG_INCOMPLETE, .. }]), "{other:?}");

    scheduler.pending_applied(members[0].clone());
    let (bound, _) = run(&mut scheduler, &mut book, timeout + 1, &BTreeSet::new());
    assert_eq!(bound.len(), 4);
    let ranks: Vec<&str> = bound.iter().map(|m| m.pod.name.as_str()).collect();
    assert_eq!(ranks, ["g-0", "g-1", "g-2", "g-3"], "members bind in rank order");
    let racks: BTreeSet<&str> = bound.iter().map(|m| &m.node[..2]).collect();
    assert_eq!(racks.len(), 1, "a 4-host gang lands in one rack: {bound:?}");
    assert_eq!(book.ledger().free_gpus(), 32);
    assert_eq!(scheduler.pending_count(), 0);
}

#[test]
fn failed_binding_rolls_the_gang_back_and_retries_after_backoff() {
    let mut book = book_of(1, 4);
    let mut scheduler = scheduler_on(&book);
    for member in gang("g", 3, 8) {
        scheduler.pending_applied(member);
    }
    let fail = BTreeSet::from(["g-1".to_string()]);
    let mut deleted = Vec::new();
    for decision in scheduler.cycle(Some(&mut book), 0) {
        let Decision::Bind { ticket, members } = decision else { continue };
        let outcomes: Vec<_> = members
            .iter()
            .map(|m| (m.pod.clone(), if fail.contains(&m.pod.name) { Err("boom".to_string()) } else { Ok(()) }))
            .collect();
        match scheduler.finish(Some(&mut book), &ticket, &outcomes, 0) {
            Finished::RolledBack { delete, message, .. } => {
                assert!(message.contains("ns/g-1: boom"), "{message}");
                deleted = delete;
            }
            Finished::Bound { .. } => panic!("a failed member must roll the gang back"),
        }
    }
    let mut names: Vec<&str> = deleted.iter().map(|p| p.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["g-0", "g-2"], "the members that did bind are deleted");
    assert_eq!(book.ledger().free_gpus(), 32, "the reservation is released");
    book.check().expect("book");
    // The watch reports the deletions.
    for pod in &deleted {
        scheduler.bound_deleted(&pod.uid);
        book.forget_pod(&pod.uid);
    }
    // Their controller recreates the deleted members (new uids).
    for mut member in gang("g", 3, 8).into_iter().filter(|m| m.demand.pod.name != "g-1") {
        member.demand.pod.uid.push_str("-2");
        scheduler.pending_applied(member);
    }
    let (bound, _) = run(&mut scheduler, &mut book, 10, &BTreeSet::new());
    assert!(bound.is_empty(), "backing off");
    let retry_at = scheduler.config().backoff_initial_ms;
    let (bound, _) = run(&mut scheduler, &mut book, retry_at, &BTreeSet::new());
    assert_eq!(bound.len(), 3, "retried whole after the back-off");
}

#[test]
fn two_gangs_competing_for_one_gangs_capacity_never_hold_partly() {
    let mut book = book_of(1, 4);
    let mut scheduler = scheduler_on(&book);
    for member in gang("a", 3, 8).into_iter().chain(gang("b", 3, 8)) {
        scheduler.pending_applied(member);
    }
    let (bound, other) = run(&mut scheduler, &mut book, 0, &BTreeSet::new());
    let gangs: BTreeSet<&str> = bound.iter().map(|m| &m.pod.name[..1]).collect();
    assert_eq!(gangs, BTreeSet::from(["a"]), "the older (here: first by name) gang wins whole");
    assert_eq!(book.ledger().free_gpus(), 8, "the loser holds nothing");
    assert!(messages(&other)[0].contains("gang `ns/b` (24 GPUs) does not fit"), "{other:?}");
}

#[test]
fn a_cycle_tries_at_most_its_limit_and_the_next_goes_on_in_queue_order() {
    let mut book = book_of(8, 8);
    let mut scheduler = scheduler_on(&book);
    let extra = 10;
    for index in 0..CYCLE_ATTEMPTS_MAX + extra {
        let mut pod = pending(&format!("p{index:04}"), 1, None, 100);
        // The last ones queued first: priority orders the queue.
        pod.priority = i32::from(index >= CYCLE_ATTEMPTS_MAX);
        scheduler.pending_applied(pod);
    }
    let (bound, _) = run(&mut scheduler, &mut book, 0, &BTreeSet::new());
    assert_eq!(bound.len(), CYCLE_ATTEMPTS_MAX, "one cycle places at most its limit");
    assert!(scheduler.more_due(), "and says more is due");
    let first: BTreeSet<String> = bound.iter().map(|m| m.pod.name.clone()).collect();
    assert!(
        (CYCLE_ATTEMPTS_MAX..CYCLE_ATTEMPTS_MAX + extra).all(|i| first.contains(&format!("p{i:04}"))),
        "higher priority first"
    );
    let (rest, _) = run(&mut scheduler, &mut book, 1, &BTreeSet::new());
    assert_eq!(rest.len(), extra, "the next cycle goes on");
    assert!(!scheduler.more_due());
}

#[test]
fn higher_priority_goes_first() {
    let mut book = book_of(1, 2);
    let mut scheduler = scheduler_on(&book);
    let low = gang("low", 2, 8);
    let mut high = gang("high", 2, 8);
    for member in &mut high {
        member.priority = 1000;
    }
    for member in low.into_iter().chain(high) {
        scheduler.pending_applied(member);
    }
    let (bound, _) = run(&mut scheduler, &mut book, 0, &BTreeSet::new());
    assert!(bound.iter().all(|m| m.pod.name.starts_with("high")), "{bound:?}");
}

#[test]
fn a_starving_gang_is_not_overtaken_by_a_stream_of_small_pods() {
    let mut book = book_of(1, 2);
    let mut scheduler = scheduler_on(&book);
    let mut now = 0;
    let mut next_small = 0;
    let mut running: Vec<(u64, String)> = Vec::new();
    // Two 1-GPU pods per host keep both hosts busy; each runs 20 s, new ones keep coming.
    for _ in 0..4 {
        scheduler.pending_applied(pending(&format!("s{next_small}"), 1, None, 100));
        next_small += 1;
    }
    let (bound, _) = run(&mut scheduler, &mut book, now, &BTreeSet::new());
    running.extend(bound.into_iter().map(|m| (now + 20_000, m.pod.uid)));
    for member in gang("big", 2, 8) {
        scheduler.pending_applied(member);
    }
    let mut big_bound_at = None;
    while now < 600_000 && big_bound_at.is_none() {
        now += 1000;
        // Finished small pods leave; a new one arrives every second.
        let (done, still): (Vec<_>, Vec<_>) = running.into_iter().partition(|(end, _)| *end <= now);
        running = still;
        for (_, uid) in done {
            scheduler.bound_deleted(&uid);
            book.forget_pod(&uid);
        }
        scheduler.pending_applied(pending(&format!("s{next_small}"), 1, None, 100));
        next_small += 1;
        let (bound, _) = run(&mut scheduler, &mut book, now, &BTreeSet::new());
        for member in bound {
            if member.pod.name.starts_with("big") {
                big_bound_at = Some(now);
            } else {
                running.push((now + 20_000, member.pod.uid));
            }
        }
    }
    let starvation = scheduler.config().starvation_ms;
    let bound_at = big_bound_at.expect("the 16-GPU gang is placed eventually");
    assert!(bound_at > 1000, "small pods fill the hosts first (backfill before starvation)");
    assert!(bound_at <= starvation + 40_000, "placed at {bound_at} ms: within the small pods' run time after starving");
}

/// A gang that cannot fit even on an empty cluster (three hosts in one leaf, leaves of two)
/// keeps none of the hosts once it starves: single pods go on being placed.
#[test]
fn a_gang_that_can_never_fit_holds_no_hosts_when_it_starves() {
    let mut book = book_of(2, 2);
    let mut scheduler = scheduler_on(&book);
    for mut member in gang("huge", 3, 8) {
        member.demand.required = Some(topoplace_engine::workload::Scope::parse("leaf"));
        scheduler.pending_applied(member);
    }
    let starvation = scheduler.config().starvation_ms;
    let mut placed = 0;
    for step in 0..20u64 {
        let now = step * starvation / 4;
        scheduler.pending_applied(pending(&format!("s{step}"), 1, None, 100));
        let (bound, other) = run(&mut scheduler, &mut book, now, &BTreeSet::new());
        placed += bound.len();
        let text = messages(&other).join(" | ");
        assert!(!text.contains("kept for a starving gang"), "step {step}: {text}");
    }
    assert_eq!(placed, 20, "every single pod placed while the gang starves");
}

#[test]
fn a_half_bound_gang_is_repaired_by_deleting_its_bound_members() {
    let mut book = book_of(1, 4);
    let mut scheduler = scheduler_on(&book);
    let members = gang("g", 4, 8);
    // A previous leader bound two members and died before the others.
    for member in &members[..2] {
        scheduler.bound_applied(BoundPod {
            pod: member.demand.pod.clone(),
            node: format!("r0-{}", member.demand.gang.as_ref().and_then(|g| g.rank).unwrap_or(0)),
            requests: member.needs.requests.clone(),
            gang: Some("ns/g".into()),
            priority: 0,
            labels: Default::default(),
        });
    }
    for member in &members[2..] {
        scheduler.pending_applied(member.clone());
    }
    let (_, other) = run(&mut scheduler, &mut book, 0, &BTreeSet::new());
    assert!(other.is_empty(), "the watches may disagree for a moment: no repair yet");
    let grace = scheduler.config().repair_grace_ms;
    let (_, other) = run(&mut scheduler, &mut book, grace, &BTreeSet::new());
    let Some(Decision::Repair { delete, .. }) = other.first() else { panic!("expected a repair: {other:?}") };
    let names: Vec<&str> = delete.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names.len(), 2);
    let (_, again) = run(&mut scheduler, &mut book, grace + 1, &BTreeSet::new());
    assert!(again.is_empty(), "a repair is asked once: {again:?}");
}

#[test]
fn pods_without_gpus_prefer_nodes_without_gpus() {
    let mut book = book_of(1, 2);
    let mut scheduler = scheduler_on(&book);
    let mut facts = facts_of(&book);
    let mut cpu_node = facts[0].clone();
    cpu_node.name = "cpu-0".into();
    cpu_node.allocatable.remove("nvidia.com/gpu");
    facts.push(cpu_node);
    scheduler.nodes_listed(facts);
    scheduler.pending_applied(pending("router", 0, None, 1000));
    let (bound, _) = run(&mut scheduler, &mut book, 0, &BTreeSet::new());
    assert_eq!(bound.iter().map(|m| m.node.as_str()).collect::<Vec<_>>(), ["cpu-0"]);
    assert!(bound[0].gpus.is_empty());
    // A GPU pod pinned to the CPU node: that node passes the predicates but has no GPUs.
    let mut pinned = pending("pinned", 1, None, 1000);
    pinned.needs.affinity_terms = Some(vec![predicates::SelectorTerm {
        match_expressions: Vec::new(),
        match_fields: vec![predicates::SelectorRequirement {
            key: "metadata.name".into(),
            operator: predicates::SelectorOperator::In,
            values: vec!["cpu-0".into()],
        }],
    }]);
    scheduler.pending_applied(pinned);
    let (_, other) = run(&mut scheduler, &mut book, 1, &BTreeSet::new());
    assert_eq!(
        messages(&other),
        ["0/3 nodes are available: 1 node(s) had no GPUs in topoplace's view, 2 node(s) didn't match Pod's node affinity/selector."]
    );
}

// ---- the simulation ---------------------------------------------------------------------

/// A pod in the simulated API server.
#[derive(Debug, Clone)]
struct SimPod {
    pending: PendingPod,
    node: Option<String>,
    gpus: Vec<u8>,
    ends_at: u64,
    /// The scheduler has seen it (a late member is created a step after its siblings).
    delivered: bool,
    /// A worker of a leader-first group: created only once its leader is bound (LWS).
    after_leader: bool,
}

fn lingjun_book() -> Book {
    let path = topoplace_formats::convert::traces_dir().join("lingjun-2023").join("topo.csv");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let spec = topoplace_formats::convert::lingjun("topo.csv", &text, "H800", 8).expect("valid topology");
    Book::new(Cluster::build(spec).expect("cluster"), BookConfig::default())
}

/// Hundreds of pods and gangs arriving and leaving over the 847-host Lingjun cluster, with
/// Bindings failing, watches relisting, nodes going NotReady and pods deleted. After every
/// step: the book's and the scheduler's invariants, no GPU given twice, no gang half-bound,
/// every bound pod placed on a node that was Ready, tolerated and had room when it was bound.
#[test]
fn simulation_over_lingjun_with_faults_keeps_every_invariant() {
    let (mut leader_groups_bound, mut leaders_given_up, mut leaders_deleted, mut rejoined) = (0, 0, 0, 0);
    let mut elastic_grown = 0;
    for seed in [1u64, 2] {
        let (bound, given_up, deleted, joined, grown) = simulate(seed);
        leader_groups_bound += bound;
        leaders_given_up += given_up;
        leaders_deleted += deleted;
        rejoined += joined;
        elastic_grown += grown;
    }
    assert!(elastic_grown > 5, "{elastic_grown} pods past an elastic gang's size joined it");
    assert!(rejoined > 5, "{rejoined} members of running gangs crashed, were recreated and joined them again");
    assert!(leaders_deleted > 0, "leaders bound ahead deleted by a user while their workers wait");
    assert!(leader_groups_bound > 5, "{leader_groups_bound} leader-first groups bound whole");
    assert!(leaders_given_up > 0, "leaders whose workers never came are given up");
}

fn simulate(seed: u64) -> (u64, u64, u64, u64, u64) {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let mut book = lingjun_book();
    let mut scheduler = scheduler_on(&book);
    let mut facts = facts_of(&book);
    // A tenth of the hosts are tainted for training; some pods tolerate it.
    for node in facts.iter_mut().step_by(10) {
        node.taints.push(Taint { key: "dedicated".into(), value: "train".into(), effect: TaintEffect::NoSchedule });
    }
    scheduler.nodes_listed(facts.clone());
    let facts_by_name: BTreeMap<String, usize> = facts.iter().enumerate().map(|(i, f)| (f.name.clone(), i)).collect();
    let mut api: BTreeMap<String, SimPod> = BTreeMap::new();
    let mut next = 0u64;
    let (mut binds, mut rollbacks, mut gangs_bound) = (0u64, 0u64, 0u64);
    let (mut leader_groups_bound, mut leaders_given_up, mut leaders_deleted) = (0u64, 0u64, 0u64);
    // Gangs that run with members crashed and recreated but not bound again yet, and how many.
    let mut crashed: BTreeMap<String, usize> = BTreeMap::new();
    let mut rejoined = 0u64;
    let mut elastic_grown = 0u64;
    let mut now = 0u64;
    for _step in 0..150 {
        now += 1000;
        // Arrivals: gangs of 2-16 members (8 GPUs each) and single pods, in any order.
        for _ in 0..rng.random_range(0..3u32) {
            next += 1;
            let ends_at = now + rng.random_range(5_000..60_000u64);
            let leader_first = rng.random_bool(0.25);
            let mut new_pods: Vec<PendingPod> = if rng.random_bool(0.4) {
                let size = rng.random_range(2..=16u32);
                // A fifth of the others are elastic: up to 4 more pods than their size, all
                // created at once; they join once the gang runs, as room frees.
                let max = (!leader_first && rng.random_bool(0.2)).then(|| size + rng.random_range(1..=4u32));
                (0..max.unwrap_or(size))
                    .map(|r| {
                        let mut pod = pending(&format!("g{next}-{r}"), 8, Some((&format!("g{next}"), size, r)), 4000);
                        if let Some(gang) = pod.demand.gang.as_mut() {
                            gang.max = max;
                        }
                        if let Some(gang) = pod.demand.gang.as_mut().filter(|_| leader_first) {
                            // LWS exclusive placement: the leader is bound first, in one leaf.
                            gang.order = BindOrder::LeaderFirst { leader: r == 0 };
                            pod.demand.required = Some(topoplace_engine::workload::Scope::parse("leaf"));
                        }
                        pod
                    })
                    .collect()
            } else {
                let gpus = [1u32, 2, 4, 8][rng.random_range(0..4usize)];
                vec![pending(&format!("p{next}"), gpus, None, rng.random_range(500..20_000i64))]
            };
            if rng.random_bool(0.2) {
                for pod in &mut new_pods {
                    pod.needs.tolerations.push(Toleration {
                        key: "dedicated".into(),
                        exists: true,
                        value: String::new(),
                        effect: None,
                    });
                    pod.priority = 100;
                }
            }
            // Members arrive in any order, some one step late; a leader-first group's workers
            // once their leader is bound, or (a tenth of such groups) never.
            let late = if new_pods.len() > 1 && rng.random_bool(0.3) { new_pods.pop() } else { None };
            let never = leader_first && rng.random_bool(0.1);
            let late_uid = late.as_ref().map(|p| p.demand.pod.uid.clone());
            for pod in new_pods.into_iter().chain(late) {
                let worker = is_leader_first_worker(&pod.demand);
                if worker && never {
                    continue;
                }
                let delivered = !worker && Some(&pod.demand.pod.uid) != late_uid.as_ref();
                let sim =
                    SimPod { pending: pod, node: None, gpus: Vec::new(), ends_at, delivered, after_leader: worker };
                if delivered {
                    scheduler.pending_applied(sim.pending.clone());
                }
                api.insert(sim.pending.demand.pod.uid.clone(), sim);
            }
        }
        // Late members show up a step later; a leader-first group's workers once it is bound.
        let leaders_bound: BTreeSet<String> = api
            .values()
            .filter(|p| p.node.is_some() && is_leader_first_leader(&p.pending.demand))
            .filter_map(|p| p.pending.demand.gang.as_ref().map(|g| g.key.clone()))
            .collect();
        for pod in api.values_mut().filter(|p| !p.delivered) {
            let gang = pod.pending.demand.gang.as_ref().map(|g| g.key.clone()).unwrap_or_default();
            if pod.after_leader && !leaders_bound.contains(&gang) {
                continue;
            }
            pod.delivered = true;
            scheduler.pending_applied(pod.pending.clone());
        }
        // Faults: a node flaps NotReady; a watch relists.
        if rng.random_bool(0.1) {
            let index = rng.random_range(0..facts.len());
            facts[index].ready = !facts[index].ready;
            scheduler.node_applied(facts[index].clone());
        }
        if rng.random_bool(0.1) {
            let pending_pods =
                api.values().filter(|p| p.node.is_none() && p.delivered).map(|p| p.pending.clone()).collect();
            scheduler.pending_listed(pending_pods);
            let bound_pods = api.values().filter_map(|p| Some(bound_of(p, p.node.as_ref()?))).collect();
            scheduler.bound_listed(bound_pods, now);
        }
        // Departures: finished pods (whole gangs finish together; a leader bound ahead stays
        // until its group is whole or given up).
        let finished: Vec<String> = api
            .iter()
            .filter(|(_, p)| p.node.is_some() && p.ends_at <= now)
            .filter(|(_, p)| p.pending.demand.gang.as_ref().is_none_or(|g| book.bound_ahead(&g.key).is_empty()))
            .map(|(uid, _)| uid.clone())
            .collect();
        let mut ended_gangs = BTreeSet::new();
        for uid in finished {
            if let Some(gang) = api.remove(&uid).and_then(|p| p.pending.demand.gang) {
                ended_gangs.insert(gang.key);
            }
            scheduler.bound_deleted(&uid);
            book.forget_pod(&uid);
        }
        // An elastic gang that ended takes its pods still waiting to join along.
        let waiting: Vec<String> = api
            .iter()
            .filter(|(_, p)| p.node.is_none())
            .filter(|(_, p)| {
                p.pending.demand.gang.as_ref().is_some_and(|g| g.max.is_some() && ended_gangs.contains(&g.key))
            })
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in waiting {
            api.remove(&uid);
            scheduler.pending_deleted(&uid);
        }
        // A gang that finished with a member recreated: its controller deletes that pod too.
        let running: BTreeSet<String> = api
            .values()
            .filter(|p| p.node.is_some())
            .filter_map(|p| Some(p.pending.demand.gang.as_ref()?.key.clone()))
            .collect();
        let ended: Vec<String> = crashed.keys().filter(|g| !running.contains(*g)).cloned().collect();
        for gang in ended {
            crashed.remove(&gang);
            let left: Vec<String> = api
                .iter()
                .filter(|(_, p)| p.pending.demand.gang.as_ref().is_some_and(|g| g.key == gang))
                .map(|(uid, _)| uid.clone())
                .collect();
            for uid in left {
                api.remove(&uid);
                scheduler.pending_deleted(&uid);
            }
        }
        // A member of a gang that runs whole crashes; its controller recreates it (a new uid).
        if rng.random_bool(0.3) {
            let mut whole: BTreeMap<String, (u32, Vec<String>)> = BTreeMap::new();
            for (uid, pod) in api.iter().filter(|(_, p)| p.node.is_some()) {
                let Some(gang) = &pod.pending.demand.gang else { continue };
                if matches!(gang.order, BindOrder::LeaderFirst { .. }) {
                    continue;
                }
                whole.entry(gang.key.clone()).or_insert((gang.size, Vec::new())).1.push(uid.clone());
            }
            let candidates: Vec<(String, String)> = whole
                .into_iter()
                .filter(|(gang, (size, bound))| bound.len() == *size as usize && !crashed.contains_key(gang))
                .map(|(gang, (_, bound))| (gang, bound[0].clone()))
                .collect();
            if let Some((gang, uid)) = candidates.get(rng.random_range(0..candidates.len().max(1))).cloned() {
                if let Some(mut pod) = api.remove(&uid) {
                    scheduler.bound_deleted(&uid);
                    book.forget_pod(&uid);
                    pod.pending.demand.pod.uid.push('c');
                    (pod.node, pod.delivered) = (None, true);
                    pod.gpus.clear();
                    scheduler.pending_applied(pod.pending.clone());
                    api.insert(pod.pending.demand.pod.uid.clone(), pod);
                    *crashed.entry(gang).or_insert(0) += 1;
                }
            }
        }
        // Reservations that ran out: a leader whose workers did not bind is given up, deleted
        // and recreated by its controller.
        book.expire(now);
        for victim in book.take_undo() {
            if let Some(pod) = api.remove(&victim.uid) {
                leaders_given_up += 1;
                scheduler.bound_deleted(&victim.uid);
                book.forget_pod(&victim.uid);
                recreate_group(&mut api, &mut scheduler, pod, now);
            }
        }
        // Now and then a user deletes a leader bound ahead while its workers are pending.
        if rng.random_bool(0.05) {
            let ahead: Vec<String> = api
                .iter()
                .filter(|(_, p)| p.node.is_some() && is_leader_first_leader(&p.pending.demand))
                .filter(|(_, p)| p.pending.demand.gang.as_ref().is_some_and(|g| !book.bound_ahead(&g.key).is_empty()))
                .map(|(uid, _)| uid.clone())
                .collect();
            if let Some(uid) = ahead.first() {
                if let Some(pod) = api.remove(uid) {
                    leaders_deleted += 1;
                    scheduler.bound_deleted(uid);
                    book.forget_pod(uid);
                    recreate_group(&mut api, &mut scheduler, pod, now);
                }
            }
        }
        // The scheduler's cycle, Bindings failing now and then.
        for decision in scheduler.cycle(Some(&mut book), now) {
            if let Decision::Repair { gang, .. } = &decision {
                assert!(
                    !crashed.contains_key(gang),
                    "seed {seed}: gang {gang} runs, yet its members were to be deleted"
                );
            }
            let Decision::Bind { ticket, members } = decision else { continue };
            let mut outcomes = Vec::new();
            for member in &members {
                let Some(pod) = api.get_mut(&member.pod.uid) else {
                    outcomes.push((member.pod.clone(), Err("404 pod not found".to_string())));
                    continue;
                };
                let node = &facts[facts_by_name[&member.node]];
                assert!(node.ready, "{} bound to NotReady {}", member.pod, member.node);
                assert!(
                    node.taints.is_empty() || !pod.pending.needs.tolerations.is_empty(),
                    "{} bound to tainted {}",
                    member.pod,
                    member.node
                );
                if rng.random_bool(0.03) {
                    outcomes.push((member.pod.clone(), Err("injected 500".to_string())));
                } else {
                    pod.node = Some(member.node.clone());
                    pod.gpus = member.gpus.clone();
                    outcomes.push((member.pod.clone(), Ok(())));
                }
            }
            binds += 1;
            match scheduler.finish(Some(&mut book), &ticket, &outcomes, now) {
                Finished::Bound { members } => {
                    if members.len() > 1 {
                        gangs_bound += 1;
                    }
                    let joined_elastic = members.iter().filter(|m| {
                        api.get(&m.pod.uid).and_then(|p| p.pending.demand.gang.as_ref()).is_some_and(|g| {
                            g.max.is_some() && g.rank.is_some_and(|r| r >= g.size) && !m.pod.uid.ends_with('c')
                        })
                    });
                    elastic_grown += joined_elastic.count() as u64;
                    if members
                        .first()
                        .is_some_and(|m| api.get(&m.pod.uid).is_some_and(|p| is_leader_first_worker(&p.pending.demand)))
                    {
                        leader_groups_bound += 1;
                    }
                    for member in members {
                        if let Some(pod) = api.get(&member.pod.uid) {
                            scheduler.bound_applied(bound_of(pod, &member.node));
                            let gang = pod.pending.demand.gang.as_ref().map(|g| g.key.clone()).unwrap_or_default();
                            if member.pod.uid.ends_with('c') {
                                if let Some(count) = crashed.get_mut(&gang) {
                                    rejoined += 1;
                                    *count -= 1;
                                    if *count == 0 {
                                        crashed.remove(&gang);
                                    }
                                }
                            }
                        }
                    }
                }
                Finished::RolledBack { delete, .. } => {
                    rollbacks += 1;
                    // Undo, then the controller recreates the deleted members (a leader-first
                    // group's leader with its workers, as LWS does).
                    for victim in delete {
                        if let Some(mut pod) = api.remove(&victim.uid) {
                            scheduler.bound_deleted(&victim.uid);
                            book.forget_pod(&victim.uid);
                            if is_leader_first_leader(&pod.pending.demand) {
                                leaders_given_up += 1;
                                recreate_group(&mut api, &mut scheduler, pod, now);
                                continue;
                            }
                            pod.pending.demand.pod.uid.push('r');
                            pod.node = None;
                            pod.gpus.clear();
                            scheduler.pending_applied(pod.pending.clone());
                            api.insert(pod.pending.demand.pod.uid.clone(), pod);
                        }
                    }
                }
            }
        }
        check_world(&book, &scheduler, &api, &facts, &crashed);
    }
    assert!(binds > 100, "seed {seed}: {binds} binds");
    assert!(rollbacks > 0, "seed {seed}: faults exercised rollback");
    assert!(gangs_bound > 10, "seed {seed}: {gangs_bound} gangs bound");
    (leader_groups_bound, leaders_given_up, leaders_deleted, rejoined, elastic_grown)
}

/// LeaderWorkerSet recreating a leader-first group whose leader was deleted: the workers that
/// are not bound go with it (they are the leader's dependents), and the group comes back with
/// new uids, the leader at once and the workers once it is bound again.
fn recreate_group(api: &mut BTreeMap<String, SimPod>, scheduler: &mut Scheduler, mut leader: SimPod, now: u64) {
    let gang = leader.pending.demand.gang.as_ref().map(|g| g.key.clone());
    let ends_at = now + 30_000;
    let workers: Vec<String> = api
        .iter()
        .filter(|(_, p)| p.node.is_none() && p.pending.demand.gang.as_ref().map(|g| &g.key) == gang.as_ref())
        .map(|(uid, _)| uid.clone())
        .collect();
    for uid in workers {
        if let Some(mut worker) = api.remove(&uid) {
            scheduler.pending_deleted(&uid);
            worker.pending.demand.pod.uid.push('u');
            (worker.delivered, worker.ends_at) = (false, ends_at);
            api.insert(worker.pending.demand.pod.uid.clone(), worker);
        }
    }
    leader.pending.demand.pod.uid.push('u');
    (leader.node, leader.ends_at, leader.delivered) = (None, ends_at, true);
    leader.gpus.clear();
    scheduler.pending_applied(leader.pending.clone());
    api.insert(leader.pending.demand.pod.uid.clone(), leader);
}

/// Whether the pod is a worker of a group that binds its leader first.
fn is_leader_first_worker(demand: &PodDemand) -> bool {
    demand.gang.as_ref().is_some_and(|g| g.order == BindOrder::LeaderFirst { leader: false })
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

fn check_world(
    book: &Book,
    scheduler: &Scheduler,
    api: &BTreeMap<String, SimPod>,
    facts: &[NodeFacts],
    crashed: &BTreeMap<String, usize>,
) {
    book.check().expect("book invariants");
    scheduler.check().expect("scheduler invariants");
    let mut given: BTreeSet<(String, u8)> = BTreeSet::new();
    let mut gangs: BTreeMap<String, (usize, u32, u32)> = BTreeMap::new();
    let mut cpu: BTreeMap<String, i64> = BTreeMap::new();
    for pod in api.values() {
        let Some(node) = &pod.node else { continue };
        for &gpu in &pod.gpus {
            assert!(given.insert((node.clone(), gpu)), "GPU {gpu} of {node} given twice");
        }
        *cpu.entry(node.clone()).or_insert(0) += pod.pending.needs.requests.get("cpu").copied().unwrap_or(0);
        if let Some(gang) = &pod.pending.demand.gang {
            gangs.entry(gang.key.clone()).or_insert((0, gang.size, gang.max.unwrap_or(gang.size))).0 += 1;
        }
    }
    for (gang, (bound, size, max)) in gangs {
        assert!(bound <= max as usize, "gang {gang} runs {bound} members, over its maximum {max}");
        if max > size {
            // An elastic gang runs at least its size (less only with members crashed).
            let away = crashed.get(&gang).copied().unwrap_or(0);
            assert!(bound + away >= size as usize, "elastic gang {gang} is half-bound: {bound} of {size}");
            continue;
        }
        // A leader bound ahead while the rest of its group's GPUs are held is the one exception.
        let ahead = book.bound_ahead(&gang).len();
        // So is a gang that runs with members crashed and not back yet.
        let away = crashed.get(&gang).copied().unwrap_or(0);
        assert!(
            bound == size as usize || (ahead > 0 && bound == ahead) || (away > 0 && bound + away == size as usize),
            "gang {gang} is half-bound: {bound} of {size}"
        );
    }
    for node in facts {
        assert!(cpu.get(&node.name).copied().unwrap_or(0) <= node.allocatable["cpu"], "{} over its CPU", node.name);
    }
}

/// A pod of replica `gang` with `roles`, in role `role` at `rank` within it, asking the
/// role's GPUs and 1 CPU; the replica must stay in one rack.
fn role_pod(gang: &str, roles: &[topoplace_engine::workload::RoleSpec], role: &str, rank: u32) -> PendingPod {
    let size = roles.iter().map(|r| r.members).sum();
    let gpus = roles.iter().find(|r| r.name == role).map_or(0, |r| r.gpus_per_member);
    let mut pod = pending(&format!("{gang}-{role}-{rank}"), gpus, Some((gang, size, rank)), 1000);
    pod.demand.required = Some(topoplace_engine::workload::Scope::parse("leaf"));
    pod.demand.roles = Some(crate::reservation::RoleDemand { role: role.into(), roles: roles.to_vec() });
    pod
}

/// A node without GPUs in rack `rack`.
fn cpu_node(name: &str, rack: &str) -> NodeFacts {
    NodeFacts {
        name: name.into(),
        labels: BTreeMap::from([(LEAF.to_string(), rack.to_string())]),
        ready: true,
        unschedulable: false,
        taints: Vec::new(),
        allocatable: Resources::from([
            ("cpu".to_string(), 32_000),
            ("memory".to_string(), 1_000_000_000_000),
            ("pods".to_string(), 110_000),
        ]),
    }
}

/// A bound pod without GPUs taking `cpu_milli` of `node`'s CPU (less room there).
fn occupy_cpu(scheduler: &mut Scheduler, node: &str, cpu_milli: i64) {
    let pod = PodIdentity { namespace: "ns".into(), name: format!("busy-{node}"), uid: format!("busy-{node}") };
    let requests = Resources::from([("cpu".to_string(), cpu_milli)]);
    scheduler.bound_applied(BoundPod {
        pod,
        node: node.into(),
        requests,
        gang: None,
        priority: 0,
        labels: Default::default(),
    });
}

/// A scheduler over `book`'s GPU hosts and a CPU node `cpu-{rack}` in each of `racks`.
fn scheduler_with_cpu_nodes(book: &Book, racks: &[&str]) -> Scheduler {
    let mut scheduler = scheduler_on(book);
    let mut facts = facts_of(book);
    facts.extend(racks.iter().map(|rack| cpu_node(&format!("cpu-{rack}"), rack)));
    scheduler.nodes_listed(facts);
    scheduler
}

#[test]
fn a_replica_with_a_cpu_leader_binds_whole_with_the_leader_in_the_workers_rack() {
    use topoplace_engine::workload::RoleSpec;
    // Racks r0 and r1 of three 8-GPU hosts, two of r0's full, and a CPU node in each rack; a
    // replica of a CPU-only leader, two 8-GPU workers and a 4-GPU draft model (20 GPUs) that
    // must share one rack: r1, leader included.
    let mut book = book_of(2, 3);
    let mut scheduler = scheduler_with_cpu_nodes(&book, &["r0", "r1"]);
    // Fill r0 but one host's worth of room: two 8-GPU single pods on r0-0 and r0-1.
    for (index, node) in ["r0-0", "r0-1"].iter().enumerate() {
        let pod = PodIdentity { namespace: "ns".into(), name: format!("busy-{index}"), uid: format!("busy-{index}") };
        let gpus: Vec<u8> = (0..8).collect();
        book.observe_bound(pod.clone(), node, Some(&gpus), 8, None).expect("observed");
        scheduler.bound_applied(BoundPod {
            pod,
            node: node.to_string(),
            requests: Resources::new(),
            gang: None,
            priority: 0,
            labels: Default::default(),
        });
    }
    let roles =
        vec![RoleSpec::shape("leader", 1, 0, 1), RoleSpec::shape("worker", 2, 8, 8), RoleSpec::shape("draft", 1, 4, 4)];
    let pods = [
        role_pod("rep", &roles, "worker", 1),
        role_pod("rep", &roles, "leader", 0),
        role_pod("rep", &roles, "draft", 0),
        role_pod("rep", &roles, "worker", 0),
    ];
    for pod in &pods[..3] {
        scheduler.pending_applied(pod.clone());
    }
    let (bound, other) = run(&mut scheduler, &mut book, 0, &BTreeSet::new());
    assert!(bound.is_empty(), "three of four pods: waiting");
    assert!(messages(&other)[0].contains("3 of 4 members exist"), "{other:?}");
    scheduler.pending_applied(pods[3].clone());
    let (bound, other) = run(&mut scheduler, &mut book, 1, &BTreeSet::new());
    assert!(other.is_empty(), "{other:?}");
    let placed: BTreeMap<String, (String, usize)> =
        bound.iter().map(|m| (m.pod.name.clone(), (m.node.clone(), m.gpus.len()))).collect();
    assert_eq!(placed.len(), 4, "{placed:?}");
    assert_eq!(placed["rep-leader-0"], ("cpu-r1".to_string(), 0), "the leader on the CPU node of the workers' rack");
    assert_eq!(placed["rep-draft-0"].1, 4);
    assert!(placed.values().all(|(node, _)| node.contains("r1")), "one rack: {placed:?}");
    assert_ne!(placed["rep-worker-0"].0, placed["rep-worker-1"].0);
    assert_eq!(book.ledger().free_gpus(), 48 - 16 - 20);
}

#[test]
fn a_replica_binding_that_fails_rolls_back_every_role_and_disagreeing_pods_hold_nothing() {
    use topoplace_engine::workload::RoleSpec;
    let mut book = book_of(1, 3);
    let mut scheduler = scheduler_with_cpu_nodes(&book, &["r0"]);
    let roles = vec![RoleSpec::shape("leader", 1, 0, 1), RoleSpec::shape("worker", 2, 8, 8)];
    for pod in [
        role_pod("rep", &roles, "leader", 0),
        role_pod("rep", &roles, "worker", 0),
        role_pod("rep", &roles, "worker", 1),
    ] {
        scheduler.pending_applied(pod);
    }
    // The leader's Binding fails: both workers, which bound, are to be deleted; nothing stays
    // held, and all three pods are pending again.
    let decisions = scheduler.cycle(Some(&mut book), 0);
    let [Decision::Bind { ticket, members }] = decisions.as_slice() else { panic!("one bind: {decisions:?}") };
    assert_eq!(members.len(), 3, "every role under one ticket");
    let outcomes: Vec<_> = members
        .iter()
        .map(|m| (m.pod.clone(), if m.pod.name == "rep-leader-0" { Err("injected".to_string()) } else { Ok(()) }))
        .collect();
    let Finished::RolledBack { delete, .. } = scheduler.finish(Some(&mut book), ticket, &outcomes, 0) else {
        panic!("a failed Binding rolls the replica back");
    };
    let deleted: BTreeSet<String> = delete.iter().map(|p| p.name.clone()).collect();
    assert_eq!(deleted, BTreeSet::from(["rep-worker-0".to_string(), "rep-worker-1".to_string()]));
    assert_eq!(book.ledger().free_gpus(), 24);
    assert_eq!(scheduler.pending_count(), 1, "the leader is pending again; the deleted workers come back new");
    book.check().expect("book invariants");
    scheduler.check().expect("scheduler invariants");

    // A worker whose roles say TP 4: refused, naming both pods and the field, nothing held.
    let mut scheduler = scheduler_on(&book);
    let other_roles = vec![RoleSpec::shape("leader", 1, 0, 1), RoleSpec::shape("worker", 2, 8, 4)];
    scheduler.pending_applied(role_pod("odd", &roles, "leader", 0));
    scheduler.pending_applied(role_pod("odd", &roles, "worker", 0));
    scheduler.pending_applied(role_pod("odd", &other_roles, "worker", 1));
    let (bound, other) = run(&mut scheduler, &mut book, 10, &BTreeSet::new());
    assert!(bound.is_empty());
    let message = messages(&other).join(" | ");
    assert!(
        message.contains("disagree on topoplace.io/roles")
            && message.contains("ns/odd-leader-0")
            && message.contains("ns/odd-worker-1"),
        "{message}"
    );
    // Two pods in a role of one member.
    let mut scheduler = scheduler_on(&book);
    let mut second_leader = role_pod("two", &roles, "leader", 0);
    second_leader.demand.pod = PodIdentity { namespace: "ns".into(), name: "two-leader-b".into(), uid: "b".into() };
    for pod in [role_pod("two", &roles, "leader", 0), second_leader, role_pod("two", &roles, "worker", 0)] {
        scheduler.pending_applied(pod);
    }
    let (_, other) = run(&mut scheduler, &mut book, 20, &BTreeSet::new());
    assert!(messages(&other).join(" ").contains("role `leader` has 1 members, but 2 of the gang's pods are in it"));
    assert_eq!(book.ledger().free_gpus(), 24, "nothing held by refused replicas");
}

#[test]
fn a_replica_reserved_through_the_api_is_bound_onto_its_reservation() {
    use crate::reservation::ReplicaRequest;
    use topoplace_engine::workload::{GangSpec, RoleSpec, Scope};
    let mut book = book_of(2, 3);
    let mut scheduler = scheduler_with_cpu_nodes(&book, &["r0", "r1"]);
    let roles =
        vec![RoleSpec::shape("leader", 1, 0, 1), RoleSpec::shape("worker", 2, 8, 8), RoleSpec::shape("draft", 1, 4, 4)];
    let spec =
        GangSpec { required: Some(Scope::parse("leaf")), roles: roles.clone(), ..GangSpec::shape("ns/rep", 1, 1, 1) };
    let replica = spec.expand_replicas().remove(0);
    let options = crate::reservation::tests::plan_options(false, 60_000);
    let request = ReplicaRequest { key: "ns/rep".into(), replica, product: None };
    let outcome = book.plan_replicas(std::slice::from_ref(&request), &options, 0).expect("plan");
    assert!(outcome.reservation.is_some());
    let reserved: BTreeSet<(String, String)> = outcome.placements[0]
        .parts
        .iter()
        .flat_map(|p| p.placement.members.iter().map(|m| (p.role.clone(), book.cluster().host(m.host).name.clone())))
        .collect();
    assert_eq!(book.ledger().free_gpus(), 48 - 20);

    // A pod whose roles differ: refused, the reservation kept.
    let mut scheduler_odd = scheduler_on(&book);
    let other =
        vec![RoleSpec::shape("leader", 1, 0, 1), RoleSpec::shape("worker", 2, 8, 4), RoleSpec::shape("draft", 1, 4, 4)];
    for pod in [
        role_pod("rep", &other, "leader", 0),
        role_pod("rep", &other, "worker", 0),
        role_pod("rep", &other, "worker", 1),
        role_pod("rep", &other, "draft", 0),
    ] {
        scheduler_odd.pending_applied(pod);
    }
    let (bound, decisions) = run(&mut scheduler_odd, &mut book, 1, &BTreeSet::new());
    assert!(bound.is_empty());
    let said = messages(&decisions).join(" ");
    assert!(said.contains("reserved through the placement API (reservation `r1`) with topoplace.io/roles"), "{said}");
    assert_eq!(book.ledger().free_gpus(), 48 - 20, "the reservation stands");

    // The pods need not repeat the reservation's topology: its domain holds the GPU-less
    // leader all the same, though the other rack's CPU node has more room.
    let reserved_rack = reserved.iter().next().map(|(_, node)| node[..2].to_string()).expect("a reserved node");
    occupy_cpu(&mut scheduler, &format!("cpu-{reserved_rack}"), 8_000);
    for mut pod in [
        role_pod("rep", &roles, "leader", 0),
        role_pod("rep", &roles, "worker", 0),
        role_pod("rep", &roles, "worker", 1),
        role_pod("rep", &roles, "draft", 0),
    ] {
        pod.demand.required = None;
        scheduler.pending_applied(pod);
    }
    let (bound, other) = run(&mut scheduler, &mut book, 2, &BTreeSet::new());
    assert!(other.is_empty(), "{other:?}");
    assert_eq!(bound.len(), 4);
    for member in bound.iter().filter(|m| !m.gpus.is_empty()) {
        let role = member.pod.name.split('-').nth(1).expect("role");
        assert!(reserved.iter().any(|(r, node)| r == role && *node == member.node), "{member:?} vs {reserved:?}");
    }
    let leader = bound.iter().find(|m| m.pod.name == "rep-leader-0").expect("leader");
    assert_eq!(leader.node, format!("cpu-{reserved_rack}"), "the GPU-less leader in the reserved rack");
    assert_eq!(book.ledger().free_gpus(), 48 - 20, "held by the bound pods now");
}

#[test]
fn a_gpu_less_pod_stays_in_the_replicas_leaf_of_its_own_spine() {
    use topoplace_engine::workload::RoleSpec;
    // Two spines, each with a leaf named `l0`: three GPU hosts under s0, one under s1, so a
    // replica of two 8-GPU workers in one leaf goes to s0/l0; its CPU-only leader must go to
    // the CPU node of s0/l0, though the one of s1/l0 has more room.
    const SPINE: &str = "network.topology.nvidia.com/spine";
    let mut nodes = Vec::new();
    for (spine, count) in [("s0", 3), ("s1", 1)] {
        for host in 0..count {
            nodes.push(node(&format!("{spine}-{host}"), "H100", 8, &[(SPINE, spine), (LEAF, "l0")]));
        }
    }
    let cluster = Cluster::build(ClusterSpec { name: "t".into(), levels: vec![SPINE.into(), LEAF.into()], nodes })
        .expect("cluster");
    let mut book = Book::new(cluster, BookConfig::default());
    let mut scheduler = scheduler_on(&book);
    let mut facts = facts_of(&book);
    for spine in ["s0", "s1"] {
        let mut cpu = cpu_node(&format!("cpu-{spine}"), "l0");
        cpu.labels.insert(SPINE.into(), spine.into());
        facts.push(cpu);
    }
    scheduler.nodes_listed(facts);
    occupy_cpu(&mut scheduler, "cpu-s0", 16_000);
    let roles = vec![RoleSpec::shape("leader", 1, 0, 1), RoleSpec::shape("worker", 2, 8, 8)];
    for pod in [
        role_pod("rep", &roles, "leader", 0),
        role_pod("rep", &roles, "worker", 0),
        role_pod("rep", &roles, "worker", 1),
    ] {
        scheduler.pending_applied(pod);
    }
    let (bound, other) = run(&mut scheduler, &mut book, 0, &BTreeSet::new());
    assert!(other.is_empty(), "{other:?}");
    let placed: BTreeMap<String, String> = bound.iter().map(|m| (m.pod.name.clone(), m.node.clone())).collect();
    assert!(placed["rep-worker-0"].starts_with("s0-") && placed["rep-worker-1"].starts_with("s0-"), "{placed:?}");
    assert_eq!(placed["rep-leader-0"], "cpu-s0", "{placed:?}");
}

#[test]
fn pods_that_state_a_scope_keep_their_gpu_less_pods_in_it_on_an_unscoped_reservation() {
    use crate::reservation::ReplicaRequest;
    use topoplace_engine::workload::{GangSpec, RoleSpec};
    let mut book = book_of(2, 3);
    let mut scheduler = scheduler_with_cpu_nodes(&book, &["r0", "r1"]);
    let roles = vec![RoleSpec::shape("leader", 1, 0, 1), RoleSpec::shape("worker", 2, 8, 8)];
    // Reserved through the API without a scope.
    let replica = GangSpec { roles: roles.clone(), ..GangSpec::shape("ns/rep", 1, 1, 1) }.expand_replicas().remove(0);
    let options = crate::reservation::tests::plan_options(false, 60_000);
    let request = ReplicaRequest { key: "ns/rep".into(), replica, product: None };
    let outcome = book.plan_replicas(std::slice::from_ref(&request), &options, 0).expect("plan");
    let racks: BTreeSet<String> = outcome.placements[0]
        .parts
        .iter()
        .flat_map(|p| p.placement.members.iter().map(|m| book.cluster().host(m.host).name[..2].to_string()))
        .collect();
    assert_eq!(racks.len(), 1, "the workers pack into one rack: {racks:?}");
    let rack = racks.into_iter().next().expect("rack");
    // The other rack's CPU node has more room; the pods say `leaf` (role_pod's scope), so
    // their GPU-less leader stays in the workers' rack.
    occupy_cpu(&mut scheduler, &format!("cpu-{rack}"), 8_000);
    for pod in [
        role_pod("rep", &roles, "leader", 0),
        role_pod("rep", &roles, "worker", 0),
        role_pod("rep", &roles, "worker", 1),
    ] {
        scheduler.pending_applied(pod);
    }
    let (bound, other) = run(&mut scheduler, &mut book, 1, &BTreeSet::new());
    assert!(other.is_empty(), "{other:?}");
    let leader = bound.iter().find(|m| m.pod.name == "rep-leader-0").expect("leader");
    assert_eq!(leader.node, format!("cpu-{rack}"));
}

/// A LeaderWorkerSet group with exclusive placement on `LEAF` whose leader (rank 0) takes
/// GPUs like its workers: bound leader first ([`BindOrder::LeaderFirst`]).
fn leader_first_group(name: &str, size: u32, gpus: u32) -> Vec<PendingPod> {
    (0..size)
        .map(|rank| {
            let mut pod = pending(&format!("{name}-{rank}"), gpus, Some((name, size, rank)), 1000);
            pod.demand.required = Some(topoplace_engine::workload::Scope::parse("leaf"));
            if let Some(gang) = pod.demand.gang.as_mut() {
                gang.order = BindOrder::LeaderFirst { leader: rank == 0 };
            }
            pod
        })
        .collect()
}

/// Runs one cycle and expects one Bind decision: its ticket and members.
fn one_bind(scheduler: &mut Scheduler, book: &mut Book, now: u64) -> (BindTicket, Vec<BindMember>) {
    let decisions = scheduler.cycle(Some(book), now);
    let binds: Vec<_> = decisions
        .into_iter()
        .filter_map(|d| match d {
            Decision::Bind { ticket, members } => Some((ticket, members)),
            _ => None,
        })
        .collect();
    let [bind] = <[_; 1]>::try_from(binds).unwrap_or_else(|binds| panic!("one bind: {binds:?}"));
    bind
}

fn outcomes_of(members: &[BindMember], fail: &[&str]) -> Vec<(PodIdentity, Result<(), String>)> {
    members
        .iter()
        .map(|m| (m.pod.clone(), if fail.contains(&m.pod.name.as_str()) { Err("injected".into()) } else { Ok(()) }))
        .collect()
}

#[test]
fn a_leader_first_group_binds_its_leader_alone_then_its_workers_on_the_held_hosts() {
    // Two racks of three 8-GPU hosts, one of r0's full: a group of 3 x 8 GPUs that must keep
    // to one rack goes to r1. The leader comes alone (LWS creates the workers once it is
    // bound), is bound alone, and the workers' GPUs stay held for them.
    let mut book = book_of(2, 3);
    let mut scheduler = scheduler_on(&book);
    let mut busy = pending("busy", 8, None, 1000);
    busy.demand.required = None;
    scheduler.pending_applied(busy);
    let (bound, _) = run(&mut scheduler, &mut book, 0, &BTreeSet::new());
    assert_eq!(bound.len(), 1);
    let mut group = leader_first_group("lws", 3, 8);
    let workers = group.split_off(1);
    scheduler.pending_applied(group.remove(0));
    let (ticket, members) = one_bind(&mut scheduler, &mut book, 10);
    assert!(matches!(&ticket, BindTicket::Book(Ticket::Leader { .. })), "{ticket}");
    assert_eq!(members.len(), 1, "the leader alone: {members:?}");
    let leader_node = members[0].node.clone();
    assert!(leader_node.starts_with("r1-"), "the rack with room for all three: {leader_node}");
    assert!(matches!(
        scheduler.finish(Some(&mut book), &ticket, &outcomes_of(&members, &[]), 10),
        Finished::Bound { .. }
    ));
    scheduler.bound_applied(BoundPod {
        pod: members[0].pod.clone(),
        node: leader_node.clone(),
        requests: Resources::new(),
        gang: Some("ns/lws".into()),
        priority: 0,
        labels: Default::default(),
    });
    assert_eq!(book.ledger().free_gpus(), 48 - 8 - 24, "the workers' 16 GPUs stay held");
    assert_eq!(book.bound_ahead("ns/lws").len(), 1);
    book.check().expect("book invariants");
    // Nothing more happens until the workers exist; one of two is not enough.
    scheduler.pending_applied(workers[0].clone());
    let (bound, other) = run(&mut scheduler, &mut book, 20, &BTreeSet::new());
    assert!(bound.is_empty());
    assert!(messages(&other).join(" ").contains("1 of 2 workers exist"), "{other:?}");
    scheduler.pending_applied(workers[1].clone());
    let (ticket, members) = one_bind(&mut scheduler, &mut book, 30);
    assert!(matches!(&ticket, BindTicket::Book(Ticket::Gang(_))), "{ticket}");
    assert_eq!(members.len(), 2);
    for member in &members {
        assert!(member.node.starts_with("r1-") && member.node != leader_node, "{member:?}");
        assert_eq!(member.gpus.len(), 8);
    }
    assert!(matches!(
        scheduler.finish(Some(&mut book), &ticket, &outcomes_of(&members, &[]), 30),
        Finished::Bound { .. }
    ));
    assert_eq!(book.ledger().free_gpus(), 48 - 32);
    assert!(book.bound_ahead("ns/lws").is_empty(), "the group is bound whole");
    assert_eq!(book.stats().gangs_bound, 1);
    book.check().expect("book invariants");
    scheduler.check().expect("scheduler invariants");
}

#[test]
fn a_leader_first_group_whose_workers_fail_or_never_come_gives_its_leader_up() {
    let mut book = book_of(1, 3);
    let mut scheduler = scheduler_on(&book);
    let mut group = leader_first_group("lws", 3, 8);
    let workers = group.split_off(1);
    let leader = group.remove(0);
    // The leader's own Binding fails: nothing stays held, and it is planned again at its retry.
    scheduler.pending_applied(leader.clone());
    let (ticket, members) = one_bind(&mut scheduler, &mut book, 0);
    let Finished::RolledBack { delete, .. } =
        scheduler.finish(Some(&mut book), &ticket, &outcomes_of(&members, &["lws-0"]), 0)
    else {
        panic!("the leader's Binding failed");
    };
    assert!(delete.is_empty());
    assert_eq!(book.ledger().free_gpus(), 24, "nothing held while the leader backs off");
    book.check().expect("book invariants");
    let (ticket, members) = one_bind(&mut scheduler, &mut book, 5_000);
    assert!(matches!(
        scheduler.finish(Some(&mut book), &ticket, &outcomes_of(&members, &[]), 5_000),
        Finished::Bound { .. }
    ));
    let leader_bound = BoundPod {
        pod: leader.demand.pod.clone(),
        node: members[0].node.clone(),
        requests: Resources::new(),
        gang: Some("ns/lws".into()),
        priority: 0,
        labels: Default::default(),
    };
    scheduler.bound_applied(leader_bound.clone());

    // A worker's Binding fails: the other worker, which bound, and the leader are deleted.
    for worker in &workers {
        scheduler.pending_applied(worker.clone());
    }
    let (ticket, members) = one_bind(&mut scheduler, &mut book, 6_000);
    let Finished::RolledBack { delete, .. } =
        scheduler.finish(Some(&mut book), &ticket, &outcomes_of(&members, &["lws-2"]), 6_000)
    else {
        panic!("a worker's Binding failed");
    };
    let deleted: BTreeSet<String> = delete.iter().map(|p| p.name.clone()).collect();
    assert_eq!(deleted, BTreeSet::from(["lws-0".to_string(), "lws-1".to_string()]), "the leader goes too");
    assert_eq!(book.ledger().free_gpus(), 24, "nothing held: the group is recreated whole");
    book.check().expect("book invariants");
    scheduler.check().expect("scheduler invariants");

    // Recreated: the leader is bound again, and its workers never come.
    let mut scheduler = scheduler_on(&book);
    scheduler.pending_applied(leader.clone());
    let (ticket, members) = one_bind(&mut scheduler, &mut book, 10_000);
    assert!(matches!(
        scheduler.finish(Some(&mut book), &ticket, &outcomes_of(&members, &[]), 10_000),
        Finished::Bound { .. }
    ));
    assert_eq!(book.ledger().free_gpus(), 0, "the leader's 8 GPUs and its workers' 16 held");
    let ttl = book.config().reservation_ttl_ms;
    assert!(book.expire(10_000 + ttl - 1).is_empty());
    assert!(book.take_undo().is_empty());
    assert_eq!(book.expire(10_000 + ttl).len(), 1, "the reservation ends");
    let undo: Vec<String> = book.take_undo().into_iter().map(|p| p.name).collect();
    assert_eq!(undo, ["lws-0"], "the leader is given up, to be deleted");
    assert_eq!(book.ledger().free_gpus(), 24);
    book.check().expect("book invariants");
}

#[test]
fn leader_first_workers_that_disagree_with_the_plan_or_miss_their_hosts_hold_nothing_more() {
    let mut book = book_of(1, 3);
    let mut scheduler = scheduler_on(&book);
    let mut group = leader_first_group("lws", 3, 8);
    let mut workers = group.split_off(1);
    scheduler.pending_applied(group.remove(0));
    let (ticket, members) = one_bind(&mut scheduler, &mut book, 0);
    scheduler.finish(Some(&mut book), &ticket, &outcomes_of(&members, &[]), 0);
    // A worker asking 4 GPUs: refused naming it and the field; the held slots stay as they were.
    workers[1].demand.gpus = 4;
    for worker in &workers {
        scheduler.pending_applied(worker.clone());
    }
    let (bound, other) = run(&mut scheduler, &mut book, 10, &BTreeSet::new());
    assert!(bound.is_empty());
    let message = messages(&other).join(" | ");
    assert!(message.contains("ns/lws-2 says nvidia.com/gpu per member 4"), "{message}");
    assert_eq!(book.ledger().free_gpus(), 0, "the leader's GPUs and its workers' held, no more");
    // Fixed, but a held host is now cordoned: refused naming the pod and the node.
    workers[1].demand.gpus = 8;
    scheduler.pending_applied(workers[1].clone());
    let open: Vec<_> =
        workers.iter().map(|w| (0, w.demand.gang.as_ref().and_then(|g| g.rank), w.demand.pod.clone())).collect();
    let slots = book.open_slots("ns/lws", &open).expect("open slots");
    let cordoned = book.cluster().host(slots[1].1).name.clone();
    let mut facts = facts_of(&book);
    facts.iter_mut().filter(|f| f.name == cordoned).for_each(|f| f.unschedulable = true);
    scheduler.nodes_listed(facts);
    let (bound, other) = run(&mut scheduler, &mut book, 20_000, &BTreeSet::new());
    assert!(bound.is_empty());
    let message = messages(&other).join(" | ");
    assert!(message.contains(&format!("ns/lws-2 cannot go to `{cordoned}`")), "{message}");
    book.check().expect("book invariants");
    scheduler.check().expect("scheduler invariants");
}

#[test]
fn a_leader_first_replica_with_roles_binds_its_leader_then_its_workers_in_its_rack() {
    use topoplace_engine::workload::RoleSpec;
    // A leader of 4 GPUs and two workers of 8 that must share a rack, on a rack of three hosts.
    let mut book = book_of(1, 3);
    let mut scheduler = scheduler_on(&book);
    let roles = vec![RoleSpec::shape("leader", 1, 4, 4), RoleSpec::shape("worker", 2, 8, 8)];
    let lws = |role: &str, rank: u32| {
        let mut pod = role_pod("rep", &roles, role, rank);
        if let Some(gang) = pod.demand.gang.as_mut() {
            gang.order = BindOrder::LeaderFirst { leader: role == "leader" };
        }
        pod
    };
    scheduler.pending_applied(lws("leader", 0));
    let (ticket, members) = one_bind(&mut scheduler, &mut book, 10);
    assert!(matches!(&ticket, BindTicket::Book(Ticket::Leader { .. })));
    assert_eq!((members.len(), members[0].gpus.len()), (1, 4));
    let leader_node = members[0].node.clone();
    scheduler.finish(Some(&mut book), &ticket, &outcomes_of(&members, &[]), 10);
    assert_eq!(book.ledger().free_gpus(), 24 - 20, "the workers' 16 GPUs held");
    scheduler.pending_applied(lws("worker", 1));
    scheduler.pending_applied(lws("worker", 0));
    let (ticket, members) = one_bind(&mut scheduler, &mut book, 20);
    assert_eq!(members.len(), 2);
    assert!(members.iter().all(|m| m.node != leader_node && m.gpus.len() == 8), "{members:?}");
    assert!(matches!(
        scheduler.finish(Some(&mut book), &ticket, &outcomes_of(&members, &[]), 20),
        Finished::Bound { .. }
    ));
    assert_eq!(book.ledger().free_gpus(), 24 - 20);
    assert!(book.bound_ahead("ns/rep").is_empty());
    book.check().expect("book invariants");
    scheduler.check().expect("scheduler invariants");
}

#[test]
fn a_leader_first_group_whose_workers_take_no_gpus_follows_its_leader_without_repair() {
    use topoplace_engine::workload::RoleSpec;
    // Only the leader takes GPUs: once it is bound nothing is held, and its GPU-less workers
    // are placed by the predicates inside its rack, not taken for a half-bound gang.
    let mut book = book_of(2, 2);
    let mut scheduler = scheduler_with_cpu_nodes(&book, &["r0", "r1"]);
    let roles = vec![RoleSpec::shape("leader", 1, 8, 8), RoleSpec::shape("worker", 2, 0, 1)];
    let lws = |role: &str, rank: u32| {
        let mut pod = role_pod("cpu", &roles, role, rank);
        if let Some(gang) = pod.demand.gang.as_mut() {
            gang.order = BindOrder::LeaderFirst { leader: role == "leader" };
        }
        pod
    };
    let leader = lws("leader", 0);
    scheduler.pending_applied(leader.clone());
    let (ticket, members) = one_bind(&mut scheduler, &mut book, 0);
    assert!(matches!(&ticket, BindTicket::Book(Ticket::Leader { .. })));
    scheduler.finish(Some(&mut book), &ticket, &outcomes_of(&members, &[]), 0);
    let leader_node = members[0].node.clone();
    scheduler.bound_applied(BoundPod {
        pod: leader.demand.pod.clone(),
        node: leader_node.clone(),
        requests: leader.needs.requests.clone(),
        gang: Some("ns/cpu".into()),
        priority: 0,
        labels: Default::default(),
    });
    scheduler.pending_applied(lws("worker", 0));
    scheduler.pending_applied(lws("worker", 1));
    let rack = &leader_node[..2];
    let (bound, other) = run(&mut scheduler, &mut book, 10_000, &BTreeSet::new());
    assert!(!other.iter().any(|d| matches!(d, Decision::Repair { .. })), "{other:?}");
    assert_eq!(bound.len(), 2, "{other:?}");
    assert!(bound.iter().all(|m| m.node == format!("cpu-{rack}") && m.gpus.is_empty()), "{bound:?}");
}

#[test]
fn a_leader_first_plan_whose_members_cannot_share_their_hosts_binds_no_leader() {
    // Three members of 4 GPUs asking 60 of a host's 96 CPUs on three 8-GPU hosts: the plan
    // packs two members onto one host by GPUs, where their CPUs do not fit. The leader's
    // requests stand in for the workers' it has not seen, so the leader is not bound (it would
    // be given up when its workers could not bind, and recreated into the same plan forever):
    // nothing is held, and the reason says why.
    let mut book = book_of(1, 3);
    let mut scheduler = scheduler_on(&book);
    let mut group = leader_first_group("wide", 3, 4);
    for pod in &mut group {
        pod.needs.requests.insert("cpu".into(), 60_000);
    }
    scheduler.pending_applied(group.remove(0));
    let (bound, other) = run(&mut scheduler, &mut book, 0, &BTreeSet::new());
    assert!(bound.is_empty(), "{bound:?}");
    let message = messages(&other).join(" | ");
    assert!(message.contains("Insufficient resources for the members planned together"), "{message}");
    assert_eq!(book.ledger().free_gpus(), 24, "nothing held");
    // With room for the leader and one worker per host by CPU, it is bound.
    let mut book = book_of(1, 3);
    let mut scheduler = scheduler_on(&book);
    let mut group = leader_first_group("fits", 3, 8);
    for pod in &mut group {
        pod.needs.requests.insert("cpu".into(), 60_000);
    }
    scheduler.pending_applied(group.remove(0));
    let (ticket, members) = one_bind(&mut scheduler, &mut book, 0);
    assert!(matches!(
        scheduler.finish(Some(&mut book), &ticket, &outcomes_of(&members, &[]), 0),
        Finished::Bound { .. }
    ));
}

#[test]
fn a_leader_first_worker_must_match_the_leaders_plan_and_a_new_leader_waits_for_the_old() {
    let mut book = book_of(1, 3);
    let mut scheduler = scheduler_on(&book);
    let mut group = leader_first_group("lws", 2, 8);
    let mut workers = group.split_off(1);
    let leader = group.remove(0);
    scheduler.pending_applied(leader.clone());
    let (ticket, members) = one_bind(&mut scheduler, &mut book, 0);
    scheduler.finish(Some(&mut book), &ticket, &outcomes_of(&members, &[]), 0);
    // A worker stating another tensor parallelism than the leader planned with: refused.
    workers[0].demand.tensor_parallel = Some(4);
    scheduler.pending_applied(workers[0].clone());
    let (bound, other) = run(&mut scheduler, &mut book, 10, &BTreeSet::new());
    assert!(bound.is_empty());
    let message = messages(&other).join(" | ");
    assert!(
        message.contains("ns/lws-1 says topoplace.io/tensor-parallel 4") && message.contains("planned with 1"),
        "{message}"
    );
    // The leader is being deleted and LWS already made a new one: the new leader does not take
    // the worker's slot; nothing binds until the old leader is gone.
    scheduler.pending_deleted(&workers[0].demand.pod.uid);
    let mut new_leader = leader.clone();
    new_leader.demand.pod.uid = "lws-0-second".into();
    scheduler.pending_applied(new_leader);
    let (bound, _) = run(&mut scheduler, &mut book, 20_000, &BTreeSet::new());
    assert!(bound.is_empty(), "{bound:?}");
    // A ranked worker whose rank's slot is the leader's: refused naming it.
    let mut stale = workers[0].clone();
    stale.demand.tensor_parallel = None;
    let error =
        book.open_slots("ns/lws", &[(0, Some(0), stale.demand.pod.clone())]).expect_err("rank 0 is bound ahead");
    assert!(error.to_string().contains("ns/lws-1") && error.to_string().contains("rank 0"), "{error}");
}

/// Issue 19, input 2, in scheduler mode: a gang of 2 × 8 runs; a member deleted and
/// recreated (a new uid) joins it in its members' rack, and one more pod of it (a scale-out)
/// joins too; the running members are never taken for a half-bound gang and deleted. After a
/// restart (a fresh book and scheduler that only observe the bound pods) the same holds,
/// since the pods bound number the gang's size.
#[test]
fn pods_of_a_running_gang_join_it_and_its_running_members_are_never_repaired() {
    let mut book = book_of(2, 3);
    let mut scheduler = scheduler_on(&book);
    for member in gang("g", 2, 8) {
        scheduler.pending_applied(member);
    }
    let (bound, _) = run(&mut scheduler, &mut book, 0, &BTreeSet::new());
    assert_eq!(bound.len(), 2);
    let survivor = bound.iter().find(|m| m.pod.name == "g-1").expect("g-1 bound").node.clone();
    scheduler.bound_deleted("g-0-uid");
    book.forget_pod("g-0-uid");

    let mut again = pending("g-0-again", 8, Some(("g", 2, 0)), 1000);
    again.demand.pod.uid = "g-0-again-uid".into();
    scheduler.pending_applied(again);
    let grace = scheduler.config().repair_grace_ms;
    let (bound, other) = run(&mut scheduler, &mut book, grace + 1, &BTreeSet::new());
    assert!(other.iter().all(|d| !matches!(d, Decision::Repair { .. })), "{other:?}");
    let [joined] = bound.as_slice() else { panic!("the recreated member binds alone: {bound:?} {other:?}") };
    assert_eq!(joined.node[..2], survivor[..2], "in its member's rack: {joined:?} vs {survivor}");
    assert_eq!(joined.gpus.len(), 8);

    scheduler.pending_applied(pending("g-2", 8, Some(("g", 2, 2)), 1000));
    let (bound, other) = run(&mut scheduler, &mut book, grace + 2, &BTreeSet::new());
    assert_eq!(bound.len(), 1, "one more joins: {other:?}");
    assert_eq!(book.ledger().free_gpus(), 48 - 24);
    assert_eq!(book.stats().members_joined, 2);

    // A restart: the bound pods are observed, none of their history is known.
    let placed: Vec<(PodIdentity, String)> = ["g-1", "g-0-again", "g-2"]
        .iter()
        .map(|name| {
            let node =
                scheduler.placed.values().find(|p| p.bound.pod.name == *name).expect("placed").bound.node.clone();
            let uid = format!("{name}-uid");
            (PodIdentity { namespace: "ns".into(), name: name.to_string(), uid }, node)
        })
        .collect();
    let mut book = book_of(2, 3);
    let mut scheduler = scheduler_on(&book);
    for (pod, node) in &placed {
        book.observe_bound(pod.clone(), node, None, 8, Some("ns/g".into())).expect("observed");
        book.observe_gang_size("ns/g", &pod.uid, 2);
        let requests = Resources::from([("cpu".to_string(), 1000)]);
        scheduler.bound_applied(BoundPod {
            pod: pod.clone(),
            node: node.clone(),
            requests,
            gang: Some("ns/g".into()),
            priority: 0,
            labels: Default::default(),
        });
    }
    scheduler.bound_deleted("g-2-uid");
    book.forget_pod("g-2-uid");
    let mut back = pending("g-2", 8, Some(("g", 2, 2)), 1000);
    back.demand.pod.uid = "g-2-back-uid".into();
    scheduler.pending_applied(back);
    let (bound, other) = run(&mut scheduler, &mut book, grace * 3, &BTreeSet::new());
    assert!(other.iter().all(|d| !matches!(d, Decision::Repair { .. })), "{other:?}");
    assert_eq!(bound.len(), 1, "{other:?}");
}

/// Binds `pod` on `node` through the scheduler's view and the book, as if bound earlier (by
/// anyone): what the watches would report.
fn already_bound(scheduler: &mut Scheduler, book: &mut Book, pod: &PendingPod, node: &str, gpus: u32) {
    let gang = pod.demand.gang.as_ref().map(|g| g.key.clone());
    book.observe_bound(pod.demand.pod.clone(), node, None, gpus, gang.clone()).expect("observed");
    scheduler.bound_applied(BoundPod {
        pod: pod.demand.pod.clone(),
        node: node.into(),
        requests: pod.needs.requests.clone(),
        gang,
        priority: pod.priority,
        labels: pod.labels.clone(),
    });
}

/// Issue 19, input 1, in scheduler mode: two 8-GPU hosts full with low-priority pods; a
/// high-priority gang of 2 × 8 evicts both (one host's victims would not do), holds the GPUs
/// they give back, and binds on the cycle after the last one left. A victim that is part of a
/// gang takes its whole gang along; a pod with `preemptionPolicy: Never`, or of equal
/// priority, evicts nothing.
#[test]
fn a_high_priority_gang_preempts_low_priority_pods_whole_and_binds_once_they_left() {
    let mut book = book_of(1, 3);
    let mut scheduler = scheduler_on(&book);
    // r0-0: one 8-GPU pod; r0-1: a gang of two 4-GPU pods; r0-2: a 4-GPU pod of priority 50.
    let single = pending("low", 8, None, 1000);
    already_bound(&mut scheduler, &mut book, &single, "r0-0", 8);
    for member in gang("pair", 2, 4) {
        already_bound(&mut scheduler, &mut book, &member, "r0-1", 4);
    }
    let mut middle = pending("middle", 4, None, 1000);
    middle.priority = 50;
    already_bound(&mut scheduler, &mut book, &middle, "r0-2", 4);
    assert_eq!(book.ledger().free_gpus(), 4);

    // Equal priority, or preemptionPolicy Never: nothing is evicted.
    let mut never = gang("never", 2, 8);
    for member in &mut never {
        (member.priority, member.never_preempts) = (100, true);
        scheduler.pending_applied(member.clone());
    }
    let (bound, other) = run(&mut scheduler, &mut book, 0, &BTreeSet::new());
    assert!(bound.is_empty() && !other.iter().any(|d| matches!(d, Decision::Preempt { .. })), "{other:?}");
    for member in &never {
        scheduler.pending_deleted(&member.demand.pod.uid);
    }
    // Of the priority of the pods bound (0): nothing to evict.
    let equal = pending("equal", 8, None, 1000);
    scheduler.pending_applied(equal.clone());
    let (bound, other) = run(&mut scheduler, &mut book, 500, &BTreeSet::new());
    assert!(bound.is_empty() && !other.iter().any(|d| matches!(d, Decision::Preempt { .. })), "{other:?}");
    scheduler.pending_deleted(&equal.demand.pod.uid);

    let mut high = gang("hi", 2, 8);
    for member in &mut high {
        member.priority = 100;
        scheduler.pending_applied(member.clone());
    }
    let (bound, other) = run(&mut scheduler, &mut book, 1_000, &BTreeSet::new());
    assert!(bound.is_empty());
    let Some(Decision::Preempt { pods, victims, nominated, message }) =
        other.iter().find(|d| matches!(d, Decision::Preempt { .. }))
    else {
        panic!("expected a preemption: {other:?}")
    };
    assert_eq!(pods.len(), 2);
    // Each member nominated to a node of the plan (status.nominatedNodeName), one per host.
    let nominated_nodes: BTreeSet<&str> = nominated.iter().map(|(_, node)| node.as_str()).collect();
    assert_eq!(nominated.len(), 2, "{nominated:?}");
    assert_eq!(nominated_nodes, BTreeSet::from(["r0-0", "r0-1"]), "{nominated:?}");
    let mut names: Vec<&str> = victims.iter().map(|v| v.name.as_str()).collect();
    names.sort();
    // The two hosts of priority-0 pods (the pair goes whole); the priority-50 pod is spared.
    assert_eq!(names, ["low", "pair-0", "pair-1"], "{message}");
    // Nothing more is evicted while the victims leave; their GPUs are held for the gang.
    let (_, again) = run(&mut scheduler, &mut book, 12_000, &BTreeSet::new());
    assert!(!again.iter().any(|d| matches!(d, Decision::Preempt { .. })), "{again:?}");
    for (index, victim) in victims.iter().enumerate() {
        scheduler.bound_deleted(&victim.uid);
        book.forget_pod(&victim.uid);
        let (bound, _) = run(&mut scheduler, &mut book, 13_000 + index as u64, &BTreeSet::new());
        if index + 1 < victims.len() {
            assert!(bound.is_empty(), "not before every victim left");
            assert_eq!(book.ledger().free_gpus(), 4, "what a victim gave back is held for the gang");
        } else {
            // The cycle right after the last one left, whatever the gang's back-off.
            let nodes: BTreeSet<&str> = bound.iter().map(|m| m.node.as_str()).collect();
            assert_eq!(nodes, BTreeSet::from(["r0-0", "r0-1"]), "{bound:?}");
        }
    }
    assert_eq!(book.stats().gangs_nominated, 1);
    book.check().expect("invariants");
}

/// A single pod of high priority preempts the fewest pods of the lowest priority that make
/// room: of a node with one priority-10 pod and one with two priority-0 pods, the latter.
#[test]
fn a_single_pod_preempts_the_lowest_priority_victims() {
    let mut book = book_of(1, 2);
    let mut scheduler = scheduler_on(&book);
    let mut ten = pending("ten", 8, None, 1000);
    ten.priority = 10;
    already_bound(&mut scheduler, &mut book, &ten, "r0-0", 8);
    for name in ["zero-a", "zero-b"] {
        already_bound(&mut scheduler, &mut book, &pending(name, 4, None, 1000), "r0-1", 4);
    }
    let mut urgent = pending("urgent", 8, None, 1000);
    urgent.priority = 100;
    scheduler.pending_applied(urgent);
    let (_, other) = run(&mut scheduler, &mut book, 0, &BTreeSet::new());
    let Some(Decision::Preempt { victims, .. }) = other.iter().find(|d| matches!(d, Decision::Preempt { .. })) else {
        panic!("expected a preemption: {other:?}")
    };
    let names: BTreeSet<&str> = victims.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, BTreeSet::from(["zero-a", "zero-b"]));
    for victim in victims.clone() {
        scheduler.bound_deleted(&victim.uid);
        book.forget_pod(&victim.uid);
    }
    let (bound, _) = run(&mut scheduler, &mut book, 11_000, &BTreeSet::new());
    assert_eq!(bound.len(), 1);
    assert_eq!(bound[0].node, "r0-1");
    book.check().expect("invariants");
}

/// A preemptor deleted while its victims leave holds nothing once they have: its plan is
/// dropped at the next cycle, and what the victims give back is free for anyone.
#[test]
fn a_preemptor_deleted_while_its_victims_leave_holds_nothing() {
    let mut book = book_of(1, 1);
    let mut scheduler = scheduler_on(&book);
    already_bound(&mut scheduler, &mut book, &pending("low", 8, None, 1000), "r0-0", 8);
    let mut urgent = pending("urgent", 8, None, 1000);
    urgent.priority = 100;
    scheduler.pending_applied(urgent.clone());
    let (_, other) = run(&mut scheduler, &mut book, 0, &BTreeSet::new());
    assert!(other.iter().any(|d| matches!(d, Decision::Preempt { .. })), "{other:?}");
    scheduler.pending_deleted(&urgent.demand.pod.uid);
    run(&mut scheduler, &mut book, 1_000, &BTreeSet::new());
    scheduler.bound_deleted("low-uid");
    book.forget_pod("low-uid");
    run(&mut scheduler, &mut book, 2_000, &BTreeSet::new());
    assert_eq!(book.ledger().free_gpus(), 8, "nothing held for a pod that is gone");
    assert_eq!(book.snapshot(2_000).gangs.len(), 0);
}

/// A victim that never leaves (its deletion failed): the plan is kept, renewed, for
/// `PREEMPTION_WAIT_MAX_MS`, with no second eviction meanwhile; then it is given up and the
/// unit preempts afresh (the deletion is tried again).
#[test]
fn a_preemption_whose_victim_never_leaves_is_given_up_at_its_limit_and_tried_again() {
    let mut book = book_of(1, 1);
    let mut scheduler = scheduler_on(&book);
    already_bound(&mut scheduler, &mut book, &pending("stuck", 8, None, 1000), "r0-0", 8);
    let mut urgent = pending("urgent", 8, None, 1000);
    urgent.priority = 100;
    scheduler.pending_applied(urgent);
    let preempts = |decisions: &[Decision]| decisions.iter().filter(|d| matches!(d, Decision::Preempt { .. })).count();
    let (_, other) = run(&mut scheduler, &mut book, 0, &BTreeSet::new());
    assert_eq!(preempts(&other), 1);
    let ttl = book.config().nomination_ttl_ms;
    let mut now = 0;
    while now + ttl < PREEMPTION_WAIT_MAX_MS {
        now += ttl / 2;
        let (_, other) = run(&mut scheduler, &mut book, now, &BTreeSet::new());
        assert_eq!(preempts(&other), 0, "at {now} ms: no second eviction while the first is under way");
        assert!(book.nomination_waits_on("pod:urgent-uid").is_some(), "at {now} ms: the plan is renewed");
    }
    let (_, other) = run(&mut scheduler, &mut book, PREEMPTION_WAIT_MAX_MS + 20_000, &BTreeSet::new());
    assert_eq!(preempts(&other), 1, "given up, then tried afresh: {other:?}");
    // Nominated again in the same cycle: its nomination is not cleared (the adapter would
    // race the new one).
    assert!(!other.iter().any(|d| matches!(d, Decision::ClearNominated { .. })), "{other:?}");
    book.check().expect("invariants");
}

/// A preemption given up without a new one: its victim left, but the node was cordoned
/// meanwhile, so the pod does not fit what it freed. The hold is given back, the pod's
/// `status.nominatedNodeName` is cleared, and its verdict says why.
#[test]
fn a_preemption_given_up_clears_the_nomination_and_says_why() {
    let mut book = book_of(1, 1);
    let mut scheduler = scheduler_on(&book);
    already_bound(&mut scheduler, &mut book, &pending("low", 8, None, 1000), "r0-0", 8);
    let mut urgent = pending("urgent", 8, None, 1000);
    urgent.priority = 100;
    scheduler.pending_applied(urgent);
    let (_, other) = run(&mut scheduler, &mut book, 0, &BTreeSet::new());
    let (_, victims, nominated, _) = preemption_of(&other);
    assert_eq!(nominated.get("urgent").map(String::as_str), Some("r0-0"));
    let mut cordoned = facts_of(&book).remove(0);
    cordoned.unschedulable = true;
    scheduler.node_applied(cordoned);
    victims_leave(&mut scheduler, &mut book, &victims);
    let (bound, other) = run(&mut scheduler, &mut book, 1_000, &BTreeSet::new());
    assert!(bound.is_empty());
    let cleared: Vec<&str> = other
        .iter()
        .filter_map(|d| match d {
            Decision::ClearNominated { pods } => Some(pods.iter().map(|p| p.name.as_str())),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(cleared, ["urgent"], "{other:?}");
    assert!(!other.iter().any(|d| matches!(d, Decision::Preempt { .. })), "{other:?}");
    let verdict = book.preemption_verdict("pod:urgent-uid").map(|v| v.outcome.clone());
    assert!(matches!(&verdict, Some(PreemptionOutcome::Declined { why }) if why.contains("given up")), "{verdict:?}");
    assert_eq!(book.ledger().free_gpus(), 8, "nothing held for it any more");
    book.check().expect("invariants");
    scheduler.check().expect("scheduler invariants");
}

/// A pod of an elastic gang (size 2, at most `max`).
fn elastic_pod(rank: u32, max: Option<u32>) -> PendingPod {
    let mut pod = pending(&format!("e-{rank}"), 8, Some(("e", 2, rank)), 1000);
    if let Some(gang) = pod.demand.gang.as_mut() {
        gang.max = max;
    }
    pod
}

/// An elastic gang of size 2 and at most 4 whose four pods are pending at once on three free
/// hosts: it starts with e-0 and e-1 together (e-2 and e-3 told they join later), e-2 joins
/// on the next cycle, e-3 waits for room and joins as soon as a host frees, a fifth pod waits
/// at the maximum, told so; and a gang whose extra pods exceed an explicit maximum equal to
/// its size is refused as before.
#[test]
fn an_elastic_gang_starts_with_its_size_and_grows_to_its_maximum_as_room_frees() {
    let mut book = book_of(1, 4);
    let mut scheduler = scheduler_on(&book);
    let blocker = pending("blocker", 8, None, 1000);
    already_bound(&mut scheduler, &mut book, &blocker, "r0-3", 8);
    for rank in 0..4 {
        scheduler.pending_applied(elastic_pod(rank, Some(4)));
    }
    let (bound, other) = run(&mut scheduler, &mut book, 0, &BTreeSet::new());
    let mut names: Vec<&str> = bound.iter().map(|m| m.pod.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["e-0", "e-1"], "{other:?}");
    let waiting = messages(&other).join(" | ");
    assert!(waiting.contains("it starts with 2 of them") && waiting.contains("up to its maximum of 4"), "{waiting}");

    let (bound, other) = run(&mut scheduler, &mut book, 1, &BTreeSet::new());
    assert_eq!(bound.iter().map(|m| m.pod.name.as_str()).collect::<Vec<_>>(), ["e-2"], "{other:?}");
    assert_eq!(book.ledger().free_gpus(), 0);
    let (bound, other) = run(&mut scheduler, &mut book, 2_000, &BTreeSet::new());
    assert!(bound.is_empty());
    let text = messages(&other).join(" | ");
    assert!(text.contains("e-3 joining gang `ns/e`"), "{text}");

    scheduler.bound_deleted("blocker-uid");
    book.forget_pod("blocker-uid");
    let (bound, other) = run(&mut scheduler, &mut book, 3_000, &BTreeSet::new());
    assert_eq!(bound.iter().map(|m| (m.pod.name.as_str(), m.node.as_str())).collect::<Vec<_>>(), [("e-3", "r0-3")]);
    assert!(other.iter().all(|d| !matches!(d, Decision::Repair { .. })), "{other:?}");

    scheduler.pending_applied(elastic_pod(4, Some(4)));
    let (bound, other) = run(&mut scheduler, &mut book, 4_000, &BTreeSet::new());
    assert!(bound.is_empty());
    let text = messages(&other).join(" | ");
    assert!(text.contains("its maximum is 4"), "{text}");
    assert_eq!(book.stats().members_joined, 2);

    // A maximum equal to the size: no pod beyond it.
    let mut fixed = book_of(1, 4);
    let mut scheduler = scheduler_on(&fixed);
    for rank in 0..3 {
        let mut pod = elastic_pod(rank, Some(2));
        pod.demand.pod.name = format!("f-{rank}");
        pod.demand.pod.uid = format!("f-{rank}-uid");
        pod.demand.gang.as_mut().expect("gang").key = "ns/f".into();
        scheduler.pending_applied(pod);
    }
    let (bound, other) = run(&mut scheduler, &mut fixed, 0, &BTreeSet::new());
    assert!(bound.is_empty());
    let text = messages(&other).join(" | ");
    assert!(text.contains("so is its maximum"), "{text}");
}

/// A gang without a maximum that gets a whole gang's worth more pods while its members run:
/// they are taken for the gang recreated whole and wait for the old members to leave, but
/// not forever: once the gang wait has passed (counted from when the whole gang's worth
/// appeared) with the old members still running, they join it (a scale-out by exactly its
/// size does not stall), together or not at all: with room for one only, none binds.
#[test]
fn a_scale_out_by_a_whole_gang_joins_together_after_the_gang_wait() {
    let mut book = book_of(1, 4);
    let mut scheduler = scheduler_on(&book);
    for rank in 0..2 {
        scheduler.pending_applied(elastic_pod(rank, None));
    }
    let (bound, _) = run(&mut scheduler, &mut book, 0, &BTreeSet::new());
    assert_eq!(bound.len(), 2);
    let block = |scheduler: &mut Scheduler, book: &mut Book, name: &str, node: &str| {
        already_bound(scheduler, book, &pending(name, 8, None, 1000), node, 8);
    };
    let unblock = |scheduler: &mut Scheduler, book: &mut Book, name: &str| {
        scheduler.bound_deleted(&format!("{name}-uid"));
        book.forget_pod(&format!("{name}-uid"));
    };
    block(&mut scheduler, &mut book, "b1", "r0-2");
    block(&mut scheduler, &mut book, "b2", "r0-3");
    // One more pod, with no room: it waits alone for a long time.
    scheduler.pending_applied(elastic_pod(2, None));
    run(&mut scheduler, &mut book, 1_000, &BTreeSet::new());
    let late = 100_000;
    scheduler.pending_applied(elastic_pod(3, None));
    let (bound, other) = run(&mut scheduler, &mut book, late, &BTreeSet::new());
    assert!(bound.is_empty());
    let text = messages(&other).join(" | ");
    assert!(text.contains("a whole gang's worth"), "{text}");
    unblock(&mut scheduler, &mut book, "b1");
    unblock(&mut scheduler, &mut book, "b2");
    let wait = scheduler.config().gang_wait_timeout_ms;
    let (bound, _) = run(&mut scheduler, &mut book, late + wait / 2, &BTreeSet::new());
    assert!(bound.is_empty(), "the wait counts from when the whole gang's worth appeared: {bound:?}");
    block(&mut scheduler, &mut book, "b3", "r0-3");
    let (bound, other) = run(&mut scheduler, &mut book, late + wait + 1, &BTreeSet::new());
    assert!(bound.is_empty(), "room for one of the two: {bound:?}");
    let text = messages(&other).join(" | ");
    assert!(text.contains("join it together or not at all"), "{text}");
    unblock(&mut scheduler, &mut book, "b3");
    let (bound, other) = run(&mut scheduler, &mut book, late + wait + 20_000, &BTreeSet::new());
    let mut names: Vec<&str> = bound.iter().map(|m| m.pod.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["e-2", "e-3"], "{other:?}");
    assert_eq!(book.ledger().free_gpus(), 0);
    assert_eq!(book.stats().members_joined, 2);
}

/// A budget over pods labelled `app=web` in `ns`, with `allowed` disruptions left.
fn web_budget(allowed: i32) -> super::budgets::DisruptionBudget {
    super::budgets::DisruptionBudget {
        namespace: "ns".into(),
        name: "web".into(),
        selector: Some(super::budgets::LabelSelector {
            match_labels: BTreeMap::from([("app".to_string(), "web".to_string())]),
            match_expressions: Vec::new(),
        }),
        disruptions_allowed: allowed,
        disrupted_pods: BTreeSet::new(),
    }
}

/// The victims' names of the preemption among `decisions`, and its message.
fn preempted(decisions: &[Decision]) -> (BTreeSet<String>, String) {
    let Some(Decision::Preempt { victims, message, .. }) =
        decisions.iter().find(|d| matches!(d, Decision::Preempt { .. }))
    else {
        panic!("expected a preemption: {decisions:?}")
    };
    (victims.iter().map(|v| v.name.clone()).collect(), message.clone())
}

/// Two full nodes: `web-0` (app=web) on r0-0, `batch-0` on r0-1, both of priority 0.
fn web_and_batch() -> (Book, Scheduler) {
    let mut book = book_of(1, 2);
    let mut scheduler = scheduler_on(&book);
    let mut web = pending("web-0", 8, None, 1000);
    web.labels = BTreeMap::from([("app".to_string(), "web".to_string())]);
    already_bound(&mut scheduler, &mut book, &web, "r0-0", 8);
    already_bound(&mut scheduler, &mut book, &pending("batch-0", 8, None, 1000), "r0-1", 8);
    (book, scheduler)
}

fn urgent(name: &str, gang: Option<(&str, u32, u32)>) -> PendingPod {
    let mut pod = pending(name, 8, gang, 1000);
    pod.priority = 100;
    pod
}

/// PodDisruptionBudgets as kube-scheduler counts them: the node whose victims break no budget
/// is chosen (though r0-0 comes first by name), a pod named in the budget's disruptedPods or a
/// budget with a disruption left breaks nothing, and when every way breaks one the unit still
/// preempts (best effort, as kube-scheduler) and says which budget it breaks. Until the
/// adapter has listed the budgets, nothing is preempted.
#[test]
fn preemption_spares_pods_whose_budget_allows_no_disruption_when_it_can() {
    let (mut book, mut scheduler) = web_and_batch();
    scheduler.budgets_listed(vec![web_budget(0)]);
    scheduler.pending_applied(urgent("urgent", None));
    let (_, other) = run(&mut scheduler, &mut book, 0, &BTreeSet::new());
    let (victims, message) = preempted(&other);
    assert_eq!(victims, BTreeSet::from(["batch-0".to_string()]), "{message}");
    assert!(!message.contains("PodDisruptionBudget"), "{message}");

    // Without the budget (or with one left, or web-0 already disrupted), the first node by name.
    let mut disrupted = web_budget(0);
    disrupted.disrupted_pods.insert("web-0".into());
    for budgets in [Vec::new(), vec![web_budget(1)], vec![disrupted]] {
        let (mut book, mut scheduler) = web_and_batch();
        scheduler.budgets_listed(budgets);
        scheduler.pending_applied(urgent("urgent", None));
        let (_, other) = run(&mut scheduler, &mut book, 0, &BTreeSet::new());
        let (victims, message) = preempted(&other);
        assert_eq!(victims, BTreeSet::from(["web-0".to_string()]), "{message}");
    }

    // A gang of two needs both nodes: the budget is broken, and said so.
    let (mut book, mut scheduler) = web_and_batch();
    scheduler.budgets_listed(vec![web_budget(0)]);
    for rank in 0..2 {
        scheduler.pending_applied(urgent(&format!("hi-{rank}"), Some(("hi", 2, rank))));
    }
    let (_, other) = run(&mut scheduler, &mut book, 0, &BTreeSet::new());
    let (victims, message) = preempted(&other);
    assert_eq!(victims.len(), 2);
    assert!(message.contains("this breaks PodDisruptionBudget(s) ns/web"), "{message}");

    // Budgets awaited: no preemption until they are listed.
    let (mut book, mut scheduler) = web_and_batch();
    scheduler.expect_budgets();
    scheduler.pending_applied(urgent("urgent", None));
    let (_, other) = run(&mut scheduler, &mut book, 0, &BTreeSet::new());
    assert!(other.iter().all(|d| !matches!(d, Decision::Preempt { .. })), "{other:?}");
    let text = messages(&other).join(" | ");
    assert!(text.contains("PodDisruptionBudgets are not listed yet"), "{text}");
    scheduler.budgets_listed(Vec::new());
    let (_, other) = run(&mut scheduler, &mut book, 20_000, &BTreeSet::new());
    assert_eq!(preempted(&other).0.len(), 1);
}

/// The preemption decision among `decisions`: (preemptors, victims' names sorted, nominated
/// pod name -> node, message).
fn preemption_of(decisions: &[Decision]) -> (Vec<PodIdentity>, Vec<String>, BTreeMap<String, String>, String) {
    let Some(Decision::Preempt { pods, victims, nominated, message }) =
        decisions.iter().find(|d| matches!(d, Decision::Preempt { .. }))
    else {
        panic!("expected a preemption: {decisions:?}")
    };
    let mut names: Vec<String> = victims.iter().map(|v| v.name.clone()).collect();
    names.sort();
    let nominated = nominated.iter().map(|(pod, node)| (pod.name.clone(), node.clone())).collect();
    (pods.clone(), names, nominated, message.clone())
}

/// Lets `victims` (names, uid `{name}-uid`) leave, as their deletion is seen.
fn victims_leave(scheduler: &mut Scheduler, book: &mut Book, victims: &[String]) {
    for name in victims {
        let uid = format!("{name}-uid");
        scheduler.bound_deleted(&uid);
        book.forget_pod(&uid);
    }
}

/// Issue 19, secondary-scheduler preemption for a replica with roles: a CPU-only leader and
/// two 8-GPU workers that must share one rack. Rack r0 is full of priority-0 pods, rack r1
/// of priority-50 pods: the replica (priority 100) evicts r0's two pods only, each pod is
/// nominated (workers to r0's hosts, the leader to r0's CPU node), nothing binds while a
/// victim remains, and the replica binds whole in r0 once they left.
#[test]
fn a_replica_with_roles_preempts_a_rack_of_the_lowest_priority_and_binds_there_whole() {
    use topoplace_engine::workload::RoleSpec;
    let mut book = book_of(2, 2);
    let mut scheduler = scheduler_with_cpu_nodes(&book, &["r0", "r1"]);
    for (name, node, priority) in
        [("low-a", "r0-0", 0), ("low-b", "r0-1", 0), ("mid-a", "r1-0", 50), ("mid-b", "r1-1", 50)]
    {
        let mut pod = pending(name, 8, None, 1000);
        pod.priority = priority;
        already_bound(&mut scheduler, &mut book, &pod, node, 8);
    }
    let roles = vec![RoleSpec::shape("leader", 1, 0, 1), RoleSpec::shape("worker", 2, 8, 8)];
    let pods = [
        role_pod("rep", &roles, "leader", 0),
        role_pod("rep", &roles, "worker", 0),
        role_pod("rep", &roles, "worker", 1),
    ];
    for pod in &pods {
        let mut pod = pod.clone();
        pod.priority = 100;
        scheduler.pending_applied(pod);
    }
    let (bound, other) = run(&mut scheduler, &mut book, 0, &BTreeSet::new());
    assert!(bound.is_empty(), "{bound:?}");
    let (preemptors, victims, nominated, message) = preemption_of(&other);
    assert_eq!(preemptors.len(), 3, "every pod of the replica preempts: {preemptors:?}");
    assert_eq!(victims, ["low-a", "low-b"], "{message}");
    assert_eq!(nominated.get("rep-leader-0").map(String::as_str), Some("cpu-r0"), "{nominated:?}");
    let workers: BTreeSet<&str> =
        ["rep-worker-0", "rep-worker-1"].iter().filter_map(|w| nominated.get(*w).map(String::as_str)).collect();
    assert_eq!(workers, BTreeSet::from(["r0-0", "r0-1"]), "{nominated:?}");
    assert!(message.contains("held for gang `ns/rep`"), "{message}");
    let under_way = book.snapshot(0).preemptions;
    assert_eq!(under_way.len(), 1, "{under_way:?}");
    assert_eq!((under_way[0].unit.as_str(), under_way[0].waiting_on.len()), ("ns/rep", 2), "{under_way:?}");
    // One victim leaves: nothing binds, nothing more is evicted, its GPUs are held.
    victims_leave(&mut scheduler, &mut book, &victims[..1]);
    let (bound, other) = run(&mut scheduler, &mut book, 1_000, &BTreeSet::new());
    assert!(bound.is_empty() && !other.iter().any(|d| matches!(d, Decision::Preempt { .. })), "{other:?}");
    assert_eq!(book.ledger().free_gpus(), 0, "what the victim gave back is held for the replica");
    victims_leave(&mut scheduler, &mut book, &victims[1..]);
    let (bound, other) = run(&mut scheduler, &mut book, 2_000, &BTreeSet::new());
    let placed: BTreeMap<String, String> = bound.iter().map(|m| (m.pod.name.clone(), m.node.clone())).collect();
    assert_eq!(placed.len(), 3, "bound whole on the cycle after the last victim left: {other:?}");
    assert_eq!(placed["rep-leader-0"], "cpu-r0");
    assert_eq!(placed.values().filter(|n| n.starts_with("r0-")).count(), 2, "{placed:?}");
    assert_eq!(book.stats().gangs_nominated, 1);
    assert!(!book.is_reserved("ns/rep"), "the preemption's reservation was taken up whole");
}

/// Issue 19, secondary-scheduler preemption for a group bound leader first (LeaderWorkerSet
/// exclusive placement with a GPU leader): only its leader exists. The whole group is
/// planned with victims gone, the leader nominated; once they left, the leader is bound
/// alone on the preemption's plan and its workers' GPUs stay held, and the workers LWS then
/// creates bind on them.
#[test]
fn a_leader_first_group_preempts_for_its_whole_group_and_its_workers_bind_on_the_held_hosts() {
    let mut book = book_of(1, 3);
    let mut scheduler = scheduler_on(&book);
    for (index, node) in ["r0-0", "r0-1", "r0-2"].iter().enumerate() {
        already_bound(&mut scheduler, &mut book, &pending(&format!("low-{index}"), 8, None, 1000), node, 8);
    }
    let mut group = leader_first_group("lws", 3, 8);
    for pod in &mut group {
        pod.priority = 100;
    }
    let workers = group.split_off(1);
    scheduler.pending_applied(group[0].clone());
    let (bound, other) = run(&mut scheduler, &mut book, 0, &BTreeSet::new());
    assert!(bound.is_empty());
    let (preemptors, victims, nominated, message) = preemption_of(&other);
    assert_eq!(preemptors.len(), 1, "the leader alone exists");
    assert_eq!(victims, ["low-0", "low-1", "low-2"], "room for the whole group: {message}");
    assert_eq!(nominated.len(), 1, "{nominated:?}");
    victims_leave(&mut scheduler, &mut book, &victims);
    let (ticket, members) = one_bind(&mut scheduler, &mut book, 1_000);
    assert!(matches!(&ticket, BindTicket::Book(Ticket::Leader { .. })), "{ticket}");
    assert_eq!(members.len(), 1);
    assert_eq!(Some(&members[0].node), nominated.get("lws-0"), "the leader goes where it was nominated");
    assert!(matches!(
        scheduler.finish(Some(&mut book), &ticket, &outcomes_of(&members, &[]), 1_000),
        Finished::Bound { .. }
    ));
    scheduler.bound_applied(BoundPod {
        pod: members[0].pod.clone(),
        node: members[0].node.clone(),
        requests: Resources::new(),
        gang: Some("ns/lws".into()),
        priority: 100,
        labels: Default::default(),
    });
    assert_eq!(book.ledger().free_gpus(), 0, "the workers' 16 GPUs stay held after the leader bound");
    for worker in &workers {
        scheduler.pending_applied(worker.clone());
    }
    let (bound, other) = run(&mut scheduler, &mut book, 2_000, &BTreeSet::new());
    assert_eq!(bound.len(), 2, "{other:?}");
    assert!(bound.iter().all(|m| m.node != members[0].node), "{bound:?}");
    assert!(!other.iter().any(|d| matches!(d, Decision::Preempt { .. })), "{other:?}");
    book.check().expect("book invariants");
}

/// Issue 19, secondary-scheduler preemption for a pod without GPUs: its CPU is what is short.
/// The CPU node holds two priority-0 pods of 15 CPUs, the GPU host a priority-10 pod, each
/// node leaving too little CPU: a priority-100 pod of 20 CPUs evicts the two priority-0 pods
/// only and is nominated to their node. When one has left, a priority-0 pod that would fit
/// in what it freed finds it counted as the nominated pod's (kube-scheduler's nominated
/// pods) and waits; once both have left the preemptor binds there. A pod of equal priority
/// evicts nothing.
#[test]
fn a_pod_without_gpus_preempts_for_cpu_the_lowest_priority_pods() {
    let mut book = book_of(1, 1);
    let mut scheduler = scheduler_with_cpu_nodes(&book, &["r0"]);
    let hogs = [("hog-a", "cpu-r0", 15_000, 0), ("hog-b", "cpu-r0", 15_000, 0), ("gpu-host-hog", "r0-0", 95_000, 10)];
    for (name, node, cpu, priority) in hogs {
        let mut pod = pending(name, 0, None, cpu);
        pod.priority = priority;
        scheduler.bound_applied(BoundPod {
            pod: pod.demand.pod.clone(),
            node: node.into(),
            requests: pod.needs.requests.clone(),
            gang: None,
            priority,
            labels: Default::default(),
        });
    }
    let mut equal = pending("equal", 0, None, 20_000);
    equal.priority = 0;
    scheduler.pending_applied(equal.clone());
    let (bound, other) = run(&mut scheduler, &mut book, 0, &BTreeSet::new());
    assert!(bound.is_empty() && !other.iter().any(|d| matches!(d, Decision::Preempt { .. })), "{other:?}");
    // Why not, kept for /state and ClusterState.
    let verdict = book.preemption_verdict("pod:equal-uid").map(|v| v.outcome.clone());
    assert_eq!(
        verdict,
        Some(PreemptionOutcome::Declined { why: "every pod bound is of its priority (0) or higher".into() })
    );
    scheduler.pending_deleted(&equal.demand.pod.uid);
    let mut urgent = pending("urgent", 0, None, 20_000);
    urgent.priority = 100;
    scheduler.pending_applied(urgent);
    let (bound, other) = run(&mut scheduler, &mut book, 1_000, &BTreeSet::new());
    assert!(bound.is_empty());
    let (_, victims, nominated, message) = preemption_of(&other);
    assert_eq!(victims, ["hog-a", "hog-b"], "{message}");
    assert_eq!(nominated.get("urgent").map(String::as_str), Some("cpu-r0"));
    assert!(message.contains("it goes there once they have left"), "{message}");
    let verdict = book.preemption_verdict("pod:urgent-uid").map(|v| v.outcome.clone());
    assert_eq!(
        verdict,
        Some(PreemptionOutcome::Preempted {
            nodes: vec!["cpu-r0".into()],
            victims: vec!["ns/hog-a".into(), "ns/hog-b".into()],
            budgets_broken: Vec::new()
        })
    );
    // Tried again past its longest back-off while the victims are still bound: it waits,
    // evicting nothing more.
    let (bound, other) = run(&mut scheduler, &mut book, 12_000, &BTreeSet::new());
    assert!(bound.is_empty() && !other.iter().any(|d| matches!(d, Decision::Preempt { .. })), "waits: {other:?}");
    assert!(messages(&other).iter().any(|m| m.contains("waits for its victims")), "{other:?}");
    // One victim leaves: 17 CPUs free, enough for a 16-CPU pod of priority 0 were it not
    // for the nominated pod's 20.
    victims_leave(&mut scheduler, &mut book, &victims[..1]);
    scheduler.pending_applied(pending("sneak", 0, None, 16_000));
    let (bound, other) = run(&mut scheduler, &mut book, 12_500, &BTreeSet::new());
    assert!(bound.is_empty(), "the nominated pod's CPU is not taken: {bound:?} {other:?}");
    assert!(messages(&other).iter().any(|m| m.contains("Insufficient cpu")), "the sneak is told why: {other:?}");
    victims_leave(&mut scheduler, &mut book, &victims[1..]);
    // The cycle right after the last one left, whatever its back-off.
    let (bound, other) = run(&mut scheduler, &mut book, 12_600, &BTreeSet::new());
    assert_eq!(bound.iter().map(|m| m.pod.name.as_str()).collect::<Vec<_>>(), ["urgent"], "{other:?}");
    assert_eq!(bound[0].node, "cpu-r0");
    scheduler.check().expect("usage is the placed pods' only once the nominated pod is bound");
}

/// Issue 19, a member that comes back to a gang that runs, when a pod of a lower priority
/// took its place: a high-priority gang of 2 × 8 that must keep to one rack runs in r0; its
/// member crashes and a priority-0 pod takes the freed host; the recreated member evicts that
/// pod only (not the priority-0 pods of the other rack, outside its gang's scope), is
/// nominated to its node, and joins its gang there once it left.
#[test]
fn a_recreated_member_preempts_inside_its_running_gangs_scope_and_joins_it() {
    let mut book = book_of(2, 2);
    let mut scheduler = scheduler_on(&book);
    // r0 taken first, so the gang runs in r1 and r0's pods come first by name among the
    // candidates: only its scope keeps them.
    for node in ["r0-0", "r0-1"] {
        already_bound(&mut scheduler, &mut book, &pending(&format!("other-{node}"), 8, None, 1000), node, 8);
    }
    let leaf = |mut pod: PendingPod| {
        pod.demand.required = Some(topoplace_engine::workload::Scope::parse("leaf"));
        pod.priority = 100;
        pod
    };
    for member in gang("hi", 2, 8) {
        scheduler.pending_applied(leaf(member));
    }
    let (bound, _) = run(&mut scheduler, &mut book, 0, &BTreeSet::new());
    assert_eq!(bound.len(), 2);
    assert!(bound.iter().all(|m| m.node.starts_with("r1-")), "{bound:?}");
    let lost = bound.iter().find(|m| m.pod.name == "hi-0").expect("hi-0 bound").node.clone();
    scheduler.bound_deleted("hi-0-uid");
    book.forget_pod("hi-0-uid");
    already_bound(&mut scheduler, &mut book, &pending("grab", 8, None, 1000), &lost, 8);
    assert_eq!(book.ledger().free_gpus(), 0);

    let mut again = leaf(pending("hi-0-again", 8, Some(("hi", 2, 0)), 1000));
    again.demand.pod.uid = "hi-0-again-uid".into();
    scheduler.pending_applied(again);
    let grace = scheduler.config().repair_grace_ms;
    let (bound, other) = run(&mut scheduler, &mut book, grace + 1, &BTreeSet::new());
    assert!(bound.is_empty());
    let (_, victims, nominated, message) = preemption_of(&other);
    assert_eq!(victims, ["grab"], "inside its gang's rack only: {message}");
    assert_eq!(nominated.get("hi-0-again"), Some(&lost), "{nominated:?}");
    assert!(message.contains("held for this pod joining gang `ns/hi`"), "{message}");
    assert!(other.iter().all(|d| !matches!(d, Decision::Repair { .. })), "{other:?}");
    victims_leave(&mut scheduler, &mut book, &victims);
    let (bound, other) = run(&mut scheduler, &mut book, grace + 2, &BTreeSet::new());
    let [joined] = bound.as_slice() else { panic!("the member joins: {bound:?} {other:?}") };
    assert_eq!(joined.node, lost);
    assert_eq!(book.stats().members_joined, 1);
    assert!(!book.is_reserved("join:ns/hi") && !book.is_reserved("ns/hi"), "nothing left held");
}
