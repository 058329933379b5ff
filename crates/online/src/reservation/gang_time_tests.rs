//! Gangs over time through the extender's verbs: preemption judged for a whole gang, and pods
//! that join a gang while it runs (issue 19's failing inputs, and their kind).

use super::tests::{all_hosts, bind_single, cluster, filter_gang, filtered_node, kept, member, passing, single};
use super::*;

/// Binds every member of a gang planned by [`filter_gang`], Bindings succeeding.
fn bind_gang(book: &mut Book, members: &[PodDemand], nodes: &[String], now: u64) {
    let mut step = None;
    for (member, node) in members.iter().zip(nodes) {
        step = Some(book.bind_arrive(member, node, now).expect("arrive"));
    }
    let Some(BindStep::Bind { ticket, members: binds }) = step else { panic!("the last member binds the gang") };
    let outcomes: Vec<_> = binds.iter().map(|b| (b.pod.clone(), Ok(()))).collect();
    assert_eq!(book.bind_finished(&ticket, &outcomes, now), BindFinish::Bound);
}

/// Two 8-GPU hosts, each full with a low-priority 8-GPU pod bound through the extender.
fn two_full_hosts() -> Book {
    let mut book = Book::new(cluster(1, 2), BookConfig::default());
    for (index, name) in ["low-0", "low-1"].iter().enumerate() {
        let pod = single(name, 8);
        book.filter(&pod, &[index as HostId], 0).expect("filter");
        bind_single(&mut book, &pod, index as HostId, 0);
    }
    assert_eq!(book.ledger().free_gpus(), 0);
    book
}

fn candidate(host: HostId, victim: &str) -> PreemptCandidate {
    PreemptCandidate { host, victims: vec![format!("{victim}-uid")] }
}

/// Issue 19, input 1: a high-priority gang of 2 × 8 GPUs over two full hosts. kube-scheduler
/// proposes both hosts: both are kept, since evicting both lets the gang fit; one host alone
/// is not kept. Then kube-scheduler evicts on one node per member, the GPUs given back are
/// held for the gang (a single pod cannot take them), and once both victims left the members'
/// filters pass on the plan and the gang binds.
#[test]
fn a_two_host_gang_preempts_with_both_candidates_judged_together() {
    let mut book = two_full_hosts();
    let offered = all_hosts(&book);
    let high = [member("hi", 2, 0, 8), member("hi", 2, 1, 8)];
    let verdicts = book.filter(&high[0], &offered, 1).expect("filter");
    assert!(verdicts.iter().all(|v| matches!(v, NodeVerdict::Fail(_))), "resolvable by preemption: {verdicts:?}");

    let one = book.preempt(&high[0], &[candidate(0, "low-0")], 1).expect("preempt");
    assert_eq!(one.keep, vec![None], "one host's victims do not make room for two members");
    assert!(one.why.as_deref().is_some_and(|w| w.contains("does not fit even with the victims")), "{one:?}");
    assert!(book.nominations.is_empty());

    let both = [candidate(0, "low-0"), candidate(1, "low-1")];
    let answer = book.preempt(&high[0], &both, 2).expect("preempt");
    assert_eq!(answer.keep, vec![Some(vec!["low-0-uid".to_string()]), Some(vec!["low-1-uid".to_string()])]);
    assert_eq!(book.stats().gangs_nominated, 1);

    // kube-scheduler evicts on host 0 for member 0 and nominates it there.
    book.forget_pod("low-0-uid");
    assert_eq!(book.ledger().free_gpus(), 0, "host 0's GPUs are held for the gang");
    let intruder = single("intruder", 8);
    let verdicts = book.filter(&intruder, &offered, 3).expect("filter");
    assert!(verdicts.iter().all(|v| *v != NodeVerdict::Pass), "{verdicts:?}");
    // Member 1's filter waits, and its preempt keeps only the node still to clear.
    let verdicts = book.filter(&high[1], &offered, 3).expect("filter");
    assert!(
        verdicts.iter().all(|v| matches!(v, NodeVerdict::Fail(r) if r.contains("waits for its victims"))),
        "{verdicts:?}"
    );
    let second = book.preempt(&high[1], &[candidate(1, "low-1")], 3).expect("preempt");
    assert_eq!(kept(&second), vec![true]);
    let cleared = book.preempt(&high[1], &[candidate(0, "someone")], 3).expect("preempt");
    assert_eq!(kept(&cleared), vec![false], "host 0 is clear already");
    book.forget_pod("low-1-uid");

    let nodes: Vec<String> = high
        .iter()
        .map(|m| {
            let verdicts = book.filter(m, &offered, 4).expect("filter");
            let mut passing = passing(&book, &verdicts, &offered);
            assert_eq!(passing.len(), 1, "{verdicts:?}");
            passing.remove(0)
        })
        .collect();
    assert_ne!(nodes[0], nodes[1]);
    assert!(book.nominations.is_empty());
    bind_gang(&mut book, &high, &nodes, 5);
    assert!(book.is_bound("hi-0-uid") && book.is_bound("hi-1-uid"));
    book.check().expect("invariants");
}

/// A preemption's plan whose victims never leave gives its held GPUs back at its time.
#[test]
fn a_nomination_whose_victims_stay_ends_at_its_ttl() {
    let mut book = two_full_hosts();
    let high = member("hi", 2, 0, 8);
    let answer = book.preempt(&high, &[candidate(0, "low-0"), candidate(1, "low-1")], 0).expect("preempt");
    assert_eq!(kept(&answer), vec![true, true]);
    book.forget_pod("low-0-uid");
    assert_eq!(book.ledger().free_gpus(), 0);
    let ttl = book.config().nomination_ttl_ms;
    assert_eq!(book.next_expiry_ms(), Some(ttl));
    book.expire(ttl);
    assert!(book.nominations.is_empty());
    assert_eq!(book.ledger().free_gpus(), 8, "host 0 free again");
    assert_eq!(book.stats().nominations_expired, 1);
    book.check().expect("invariants");
}

/// A preemption's plan whose victim terminates slowly (a grace period longer than the plan's
/// time) is kept while the pod watch sees it terminating, up to `NOMINATION_WAIT_MAX_MS`,
/// and becomes the gang's reservation once it has left; a victim that is not terminating (the
/// eviction never came) lets the plan end at its time, as before.
#[test]
fn a_nomination_waits_for_a_victim_that_is_still_terminating() {
    let mut book = two_full_hosts();
    let high = member("hi", 2, 0, 8);
    let answer = book.preempt(&high, &[candidate(0, "low-0"), candidate(1, "low-1")], 0).expect("preempt");
    assert_eq!(kept(&answer), vec![true, true]);
    book.forget_pod("low-0-uid");
    book.observe_terminating("low-1-uid");
    let ttl = book.config().nomination_ttl_ms;
    book.expire(ttl);
    assert!(book.nominations.contains_key("ns/hi"), "renewed while low-1 terminates");
    assert_eq!(book.ledger().free_gpus(), 0, "host 0 still held for the gang");
    book.expire(3 * ttl);
    assert!(book.nominations.contains_key("ns/hi"));
    book.forget_pod("low-1-uid");
    book.expire(3 * ttl + 1);
    assert!(book.nominations.is_empty() && book.is_reserved("ns/hi"), "the gang's reservation once it left");
    assert_eq!(book.stats().nominations_expired, 0);
    book.check().expect("invariants");

    // Past the limit, a victim that never finishes terminating no longer holds the plan.
    let mut book = two_full_hosts();
    book.preempt(&high, &[candidate(0, "low-0"), candidate(1, "low-1")], 0).expect("preempt");
    book.observe_terminating("low-1-uid");
    let mut now = 0;
    while book.nominations.contains_key("ns/hi") {
        now += ttl;
        book.expire(now);
        assert!(now <= NOMINATION_WAIT_MAX_MS + ttl, "renewed past its limit");
    }
    assert!(now > NOMINATION_WAIT_MAX_MS - ttl, "given up only near the limit: {now}");
    assert_eq!(book.stats().nominations_expired, 1);
    book.check().expect("invariants");
}

/// Issue 19, input 2: a gang of 2 × 8 GPUs runs; a third pod of the same gang (a worker
/// recreated, or one more) joins it on the free host, alone, and nothing else is reserved:
/// with one host free and with two.
#[test]
fn a_pod_of_a_running_gang_joins_it_alone_on_a_free_host() {
    for hosts in [3usize, 4] {
        let mut book = Book::new(cluster(1, hosts), BookConfig::default());
        let offered = all_hosts(&book);
        let (members, nodes) = filter_gang(&mut book, "g", 2, &offered);
        bind_gang(&mut book, &members, &nodes, 1);
        let free_before = book.ledger().free_gpus();
        let third = member("g", 2, 2, 8);
        let verdicts = book.filter(&third, &offered, 2).expect("filter");
        let passing = passing(&book, &verdicts, &offered);
        assert_eq!(passing.len(), 1, "{hosts} hosts: {verdicts:?}");
        assert!(!nodes.contains(&passing[0]), "on a free host: {passing:?}");
        assert_eq!(book.ledger().free_gpus(), free_before - 8, "{hosts} hosts: its own 8 GPUs only");
        let BindStep::Bind { ticket, members: binds } = book.bind_arrive(&third, &passing[0], 3).expect("arrive")
        else {
            panic!("a joining pod binds at once");
        };
        assert_eq!(binds.len(), 1);
        let outcomes = vec![(third.pod.clone(), Ok(()))];
        assert_eq!(book.bind_finished(&ticket, &outcomes, 3), BindFinish::Bound);
        assert_eq!(book.running_hosts("ns/g").len(), 3);
        assert_eq!(book.stats().members_joined, 1);
        assert!(book.gangs.is_empty());
        book.check().expect("invariants");
    }
}

/// A joining member goes as near its gang as there is room: the rack its members run in
/// before another; inside a required rack or nowhere (saying why); and it describes the gang
/// as its members were bound, or is refused naming the field.
#[test]
fn a_joining_member_stays_near_its_gang_and_inside_its_scope() {
    let mut book = Book::new(cluster(2, 3), BookConfig::default());
    let offered = all_hosts(&book);
    let leaf = Scope::parse("network.topology.nvidia.com/leaf");
    let gang = |rank| PodDemand { required: Some(leaf.clone()), ..member("g", 2, rank, 8) };
    let members = [gang(0), gang(1)];
    let nodes: Vec<String> = members
        .iter()
        .map(|m| {
            let verdicts = book.filter(m, &offered, 0).expect("filter");
            passing(&book, &verdicts, &offered).remove(0)
        })
        .collect();
    bind_gang(&mut book, &members, &nodes, 1);
    let rack = |node: &str| node.split('-').next().unwrap_or_default().to_string();
    assert_eq!(rack(&nodes[0]), rack(&nodes[1]));
    let home = rack(&nodes[0]);
    let verdicts = book.filter(&gang(2), &offered, 2).expect("filter");
    let joined = passing(&book, &verdicts, &offered);
    assert_eq!(joined.len(), 1);
    assert_eq!(rack(&joined[0]), home, "the free host of its members' rack: {joined:?}");
    book.drop_reservation("ns/g");

    // The rest of the home rack taken: the required leaf has no room, and it says so.
    let third_home = book.cluster().hosts.iter().position(|h| rack(&h.name) == home && !nodes.contains(&h.name));
    let third_home = third_home.expect("a third host in the rack") as HostId;
    let filler = single("filler", 8);
    book.filter(&filler, &[third_home], 3).expect("filter");
    bind_single(&mut book, &filler, third_home, 3);
    let verdicts = book.filter(&gang(2), &offered, 4).expect("filter");
    assert!(
        verdicts.iter().all(|v| matches!(v, NodeVerdict::Fail(r) if r.contains("fits nowhere inside its scope"))),
        "{verdicts:?}"
    );
    // A member that leaves the required rack out describes another gang.
    let loose = member("g", 2, 2, 8);
    let refused = book.filter(&loose, &offered, 4);
    assert!(
        matches!(&refused, Err(BookError::GangShapeMismatch(m)) if m.field == "topoplace.io/topology-required"),
        "a member must describe its gang as it runs: {refused:?}"
    );
    assert_eq!(book.ledger().free_gpus(), 48 - 24, "nothing held by refusals");
    book.check().expect("invariants");
}

/// A LeaderWorkerSet group of a leader and one worker, bound whole: its worker leaves and
/// comes back; it joins the group, and the leader is not taken for an orphan and deleted.
#[test]
fn a_recreated_worker_of_a_running_leader_first_group_joins_it() {
    let mut book = Book::new(cluster(1, 3), BookConfig::default());
    let offered = all_hosts(&book);
    let lws = |rank| {
        let mut demand = super::tests::lws_member(2, rank);
        demand.required = None;
        demand
    };
    let leader = lws(0);
    let node = {
        let verdicts = book.filter(&leader, &offered, 0).expect("filter");
        passing(&book, &verdicts, &offered).remove(0)
    };
    let BindStep::Bind { ticket, .. } = book.bind_arrive(&leader, &node, 1).expect("arrive") else { panic!("binds") };
    assert_eq!(book.bind_finished(&ticket, &[(leader.pod.clone(), Ok(()))], 1), BindFinish::Bound);
    let worker = lws(1);
    let worker_node = {
        let verdicts = book.filter(&worker, &offered, 2).expect("filter");
        passing(&book, &verdicts, &offered).remove(0)
    };
    let BindStep::Bind { ticket, .. } = book.bind_arrive(&worker, &worker_node, 2).expect("arrive") else {
        panic!("the worker binds")
    };
    assert_eq!(book.bind_finished(&ticket, &[(worker.pod.clone(), Ok(()))], 2), BindFinish::Bound);
    assert!(book.gangs.is_empty());
    book.forget_pod(&worker.pod.uid);
    let again = PodDemand { pod: PodIdentity { uid: "lws-1-again".into(), ..worker.pod.clone() }, ..worker.clone() };
    let verdicts = book.filter(&again, &offered, 3).expect("filter");
    assert_eq!(passing(&book, &verdicts, &offered).len(), 1, "{verdicts:?}");
    assert!(book.take_undo().is_empty(), "the leader is kept");
    assert!(book.is_bound(&leader.pod.uid));
    book.check().expect("invariants");
}

/// Of the candidates kube-scheduler proposes, the gang's plan takes those with the fewest
/// victims: three full hosts, one with two 4-GPU pods and two with one 8-GPU pod each; a
/// 2 × 8 gang keeps the two hosts of one victim each.
#[test]
fn a_gang_preempts_where_the_fewest_pods_are_evicted() {
    let mut book = Book::new(cluster(1, 3), BookConfig::default());
    for (name, host, gpus) in [("a", 0, 4), ("b", 0, 4), ("c", 1, 8), ("d", 2, 8)] {
        let pod = single(name, gpus);
        book.filter(&pod, &[host], 0).expect("filter");
        bind_single(&mut book, &pod, host, 0);
    }
    assert_eq!(book.ledger().free_gpus(), 0);
    let candidates = [
        PreemptCandidate { host: 0, victims: vec!["a-uid".into(), "b-uid".into()] },
        candidate(1, "c"),
        candidate(2, "d"),
    ];
    let answer = book.preempt(&member("hi", 2, 0, 8), &candidates, 1).expect("preempt");
    assert_eq!(kept(&answer), vec![false, true, true], "{answer:?}");
    book.check().expect("invariants");
}

/// Low-priority single pods and gangs fill the cluster; high-priority gangs of 8-GPU members
/// arrive and preempt the way kube-scheduler does (every node with low pods a candidate, all
/// of them its victims; of the kept candidates, the first one's victims evicted, one member
/// per step), with faults: evictions that never happen (the plan must time out), members of
/// running gangs that crash and come back, low pods finishing. After every step: the book's
/// invariants (no GPU held twice), no low gang evicted in part, every high gang bound whole,
/// but for members away after a crash.
#[test]
fn a_seeded_simulation_of_gang_preemption_and_rejoining_keeps_every_gang_whole() {
    use rand::rngs::Xoshiro256PlusPlus;
    use rand::{RngExt, SeedableRng};
    let (mut preempted, mut high_bound, mut rejoined, mut lapsed) = (0u64, 0u64, 0u64, 0u64);
    for seed in 0..6u64 {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        let config = BookConfig { nomination_ttl_ms: 3_000, reservation_ttl_ms: 2_000, ..BookConfig::default() };
        let mut book = Book::new(cluster(4, 4), config);
        let offered = all_hosts(&book);
        let mut now = 0u64;
        let mut next = 0u32;
        // Low pods bound: uid -> (gang key if any, its size).
        let mut low: BTreeMap<String, Option<(String, u32)>> = BTreeMap::new();
        // High gangs: key -> members (demands) in rank order; `away`: members crashed, pending.
        let mut high: BTreeMap<String, Vec<PodDemand>> = BTreeMap::new();
        let mut away: BTreeMap<String, usize> = BTreeMap::new();
        for _ in 0..250 {
            now += 500;
            next += 1;
            match rng.random_range(0..10) {
                0..=4 => {
                    // Low work: a single pod, or a gang of two 4-GPU pods.
                    let members: Vec<PodDemand> = if rng.random_bool(0.7) {
                        vec![single(&format!("l{next}"), [1, 2, 4, 8][rng.random_range(0..4usize)])]
                    } else {
                        (0..2).map(|r| member(&format!("lg{next}"), 2, r, 4)).collect()
                    };
                    let nodes: Vec<Option<String>> = members
                        .iter()
                        .map(|m| {
                            let verdicts = book.filter(m, &offered, now).ok()?;
                            passing(&book, &verdicts, &offered).into_iter().next()
                        })
                        .collect();
                    if nodes.iter().all(Option::is_some) {
                        let mut last = None;
                        for (m, node) in members.iter().zip(&nodes) {
                            last = book.bind_arrive(m, node.as_deref().unwrap_or_default(), now).ok();
                        }
                        if let Some(BindStep::Bind { ticket, members: binds }) = last {
                            let ok: Vec<_> = binds.iter().map(|b| (b.pod.clone(), Ok(()))).collect();
                            if book.bind_finished(&ticket, &ok, now) == BindFinish::Bound {
                                for m in &members {
                                    low.insert(m.pod.uid.clone(), m.gang.as_ref().map(|g| (g.key.clone(), g.size)));
                                }
                            }
                        }
                    }
                }
                5 | 6 => {
                    if high.len() < 3 {
                        let size = rng.random_range(2..=3);
                        let key = format!("ns/h{next}");
                        let members = (0..size).map(|r| member(&format!("h{next}"), size, r, 8)).collect();
                        high.insert(key, members);
                    }
                }
                7 => {
                    // Low pods finish (a low gang whole).
                    if let Some(uid) = low.keys().nth(rng.random_range(0..low.len().max(1))).cloned() {
                        let gang = low.get(&uid).cloned().flatten();
                        let uids: Vec<String> = match &gang {
                            Some((key, _)) => low
                                .iter()
                                .filter(|(_, g)| g.as_ref().map(|g| &g.0) == Some(key))
                                .map(|(u, _)| u.clone())
                                .collect(),
                            None => vec![uid],
                        };
                        for uid in uids {
                            low.remove(&uid);
                            book.forget_pod(&uid);
                        }
                    }
                }
                _ => {
                    // A member of a high gang that runs crashes and is recreated.
                    let running: Vec<String> = high
                        .iter()
                        .filter(|(k, ms)| !away.contains_key(*k) && ms.iter().all(|m| book.is_bound(&m.pod.uid)))
                        .map(|(k, _)| k.clone())
                        .collect();
                    if let Some(key) = running.first() {
                        let members = high.get_mut(key).expect("gang");
                        book.forget_pod(&members[0].pod.uid);
                        members[0].pod.uid.push('c');
                        away.insert(key.clone(), 1);
                    }
                }
            }
            // The high gangs' pending members: filtered (kube-scheduler's retry), preempting
            // when nothing passes.
            let keys: Vec<String> = high.keys().cloned().collect();
            for key in keys {
                let members = high[&key].clone();
                let pending: Vec<&PodDemand> = members.iter().filter(|m| !book.is_bound(&m.pod.uid)).collect();
                if pending.is_empty() {
                    continue;
                }
                let mut nodes = Vec::new();
                for m in &pending {
                    let verdicts = book.filter(m, &offered, now).expect("filter");
                    nodes.push(passing(&book, &verdicts, &offered).into_iter().next());
                }
                if nodes.iter().all(Option::is_some) {
                    let mut last = None;
                    for (m, node) in pending.iter().zip(&nodes) {
                        last = book.bind_arrive(m, node.as_deref().unwrap_or_default(), now).ok();
                    }
                    if let Some(BindStep::Bind { ticket, members: binds }) = last {
                        let ok: Vec<_> = binds.iter().map(|b| (b.pod.clone(), Ok(()))).collect();
                        assert_eq!(book.bind_finished(&ticket, &ok, now), BindFinish::Bound, "seed {seed}");
                        if away.remove(&key).is_some() {
                            rejoined += 1;
                        } else {
                            high_bound += 1;
                        }
                    }
                    continue;
                }
                // Preempt for the first member that found nothing.
                let Some(at) = nodes.iter().position(Option::is_none) else { continue };
                let mut candidates = Vec::new();
                for host in 0..book.cluster().hosts.len() as HostId {
                    let node = book.cluster().host(host).name.clone();
                    let victims: Vec<String> = low
                        .keys()
                        .filter(|uid| book.bound.get(*uid).is_some_and(|b| b.node == node))
                        .cloned()
                        .collect();
                    if !victims.is_empty() {
                        candidates.push(PreemptCandidate { host, victims });
                    }
                }
                let answer = book.preempt(pending[at], &candidates, now).expect("preempt");
                let Some(victims) = answer.keep.iter().flatten().next().cloned() else { continue };
                if rng.random_bool(0.15) {
                    lapsed += 1; // kube-scheduler never gets to evict them
                    continue;
                }
                preempted += 1;
                for uid in victims {
                    assert!(low.remove(&uid).is_some(), "seed {seed}: victim {uid} is not low-priority work");
                    book.forget_pod(&uid);
                }
            }
            book.expire(now);
            book.check().unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            // No low gang evicted in part.
            let mut low_gangs: BTreeMap<String, (u32, usize)> = BTreeMap::new();
            for gang in low.values().flatten() {
                low_gangs.entry(gang.0.clone()).or_insert((gang.1, 0)).1 += 1;
            }
            for (gang, (size, bound)) in low_gangs {
                assert_eq!(bound, size as usize, "seed {seed}: low gang {gang} is left in part");
            }
            for (key, members) in &high {
                let bound = members.iter().filter(|m| book.is_bound(&m.pod.uid)).count();
                let missing = away.get(key).copied().unwrap_or(0);
                assert!(
                    bound == 0 || bound == members.len() || bound + missing == members.len(),
                    "seed {seed}: high gang {key} has {bound} of {} bound",
                    members.len()
                );
            }
            // High gangs bound whole leave after a while, making room.
            if rng.random_bool(0.1) {
                if let Some(key) = high.keys().find(|k| !away.contains_key(*k)).cloned() {
                    if high[&key].iter().all(|m| book.is_bound(&m.pod.uid)) {
                        for m in high.remove(&key).unwrap_or_default() {
                            book.forget_pod(&m.pod.uid);
                        }
                    }
                }
            }
        }
    }
    assert!(
        preempted > 10 && high_bound > 10 && rejoined > 3 && lapsed > 0,
        "{preempted} {high_bound} {rejoined} {lapsed}"
    );
}

/// A gang whose Binding failed in part never ran whole: while its bound member is being
/// deleted (the pod watch may still show it bound), a retried member plans the whole gang
/// again rather than joining it alone.
#[test]
fn a_gang_that_never_ran_whole_is_planned_whole_not_joined() {
    let mut book = Book::new(cluster(1, 4), BookConfig::default());
    let offered = all_hosts(&book);
    let (members, nodes) = filter_gang(&mut book, "g", 2, &offered);
    book.bind_arrive(&members[0], &nodes[0], 1).expect("arrive");
    let Ok(BindStep::Bind { ticket, members: binds }) = book.bind_arrive(&members[1], &nodes[1], 1) else {
        panic!("binds")
    };
    let outcomes: Vec<_> =
        binds.iter().map(|b| (b.pod.clone(), if b.pod.name == "g-1" { Err("500".into()) } else { Ok(()) })).collect();
    assert!(matches!(book.bind_finished(&ticket, &outcomes, 2), BindFinish::RolledBack { .. }));
    // The watch still shows g-0 bound while its deletion goes through.
    book.observe_bound(members[0].pod.clone(), &nodes[0], None, 8, Some("ns/g".into())).expect("observed");
    book.observe_gang_size("ns/g", &members[0].pod.uid, 2);
    book.filter(&members[1], &offered, 3).expect("filter");
    assert_eq!(book.stats().members_joined, 0, "no join");
    assert_eq!(book.gangs["ns/g"].slots.len(), 2, "the whole gang is planned");
    book.check().expect("invariants");
}

/// After a preemption settles, each member takes the slot on the node kube-scheduler offers
/// it (the node it was nominated to), whatever the plan's order.
#[test]
fn members_take_the_slots_on_the_nodes_they_are_offered_after_a_preemption() {
    let mut book = two_full_hosts();
    let high = [member("hi", 2, 0, 8), member("hi", 2, 1, 8)];
    let answer = book.preempt(&high[0], &[candidate(0, "low-0"), candidate(1, "low-1")], 1).expect("preempt");
    assert_eq!(kept(&answer), vec![true, true]);
    book.forget_pod("low-0-uid");
    book.forget_pod("low-1-uid");
    // Rank 0 is offered host 1 only, rank 1 host 0 only.
    for (member, host) in [(&high[0], 1), (&high[1], 0)] {
        let verdicts = book.filter(member, &[host], 2).expect("filter");
        assert_eq!(verdicts, vec![NodeVerdict::Pass], "{}", member.pod);
    }
    bind_gang(&mut book, &high, &["r0-1".to_string(), "r0-0".to_string()], 3);
    assert!(book.is_bound("hi-0-uid") && book.is_bound("hi-1-uid"));
    book.check().expect("invariants");
}

/// Two preemptions never count on the same GPUs: the victims a first gang's plan waits for
/// are not freed for a second one's.
#[test]
fn two_preemptions_never_plan_on_the_same_victims() {
    let mut book = two_full_hosts();
    let first = book.preempt(&member("a", 2, 0, 8), &[candidate(0, "low-0"), candidate(1, "low-1")], 1);
    assert_eq!(kept(&first.expect("preempt")), vec![true, true]);
    let second = book.preempt(&member("b", 1, 0, 8), &[candidate(0, "low-0")], 1).expect("preempt");
    assert_eq!(second.keep, vec![None], "{second:?}");
    book.check().expect("invariants");
}

/// A LeaderWorkerSet recreating its group: the new leader waits for the old members to leave
/// instead of joining them.
#[test]
fn a_new_leader_of_a_running_group_waits_for_the_old_members() {
    let mut book = Book::new(cluster(1, 3), BookConfig::default());
    let offered = all_hosts(&book);
    let lws = |rank| PodDemand { required: None, ..super::tests::lws_member(2, rank) };
    let (leader, worker) = (lws(0), lws(1));
    let verdicts = book.filter(&leader, &offered, 0).expect("filter");
    let node = passing(&book, &verdicts, &offered).remove(0);
    let BindStep::Bind { ticket, .. } = book.bind_arrive(&leader, &node, 1).expect("arrive") else { panic!("binds") };
    book.bind_finished(&ticket, &[(leader.pod.clone(), Ok(()))], 1);
    let verdicts = book.filter(&worker, &offered, 2).expect("filter");
    let worker_node = passing(&book, &verdicts, &offered).remove(0);
    let BindStep::Bind { ticket, .. } = book.bind_arrive(&worker, &worker_node, 2).expect("arrive") else {
        panic!("binds")
    };
    book.bind_finished(&ticket, &[(worker.pod.clone(), Ok(()))], 2);
    book.forget_pod(&leader.pod.uid);
    let new_leader = PodDemand { pod: PodIdentity { uid: "lws-0-new".into(), ..leader.pod.clone() }, ..leader.clone() };
    let verdicts = book.filter(&new_leader, &offered, 3).expect("filter");
    assert!(
        verdicts.iter().all(|v| matches!(v, NodeVerdict::Fail(r) if r.contains("waits until they have left"))),
        "{verdicts:?}"
    );
    book.forget_pod(&worker.pod.uid);
    let verdicts = book.filter(&new_leader, &offered, 4).expect("filter");
    assert_eq!(passing(&book, &verdicts, &offered).len(), 1, "planned whole once they left");
    book.check().expect("invariants");
}

/// A member of an elastic gang: size (its minimum) 2, at most `max` members.
fn elastic(rank: u32, max: u32) -> PodDemand {
    let mut pod = member("e", 2, rank, 8);
    if let Some(gang) = pod.gang.as_mut() {
        gang.max = Some(max);
    }
    pod
}

/// Binds one pod that joins its running gang on `node`.
fn bind_joiner(book: &mut Book, pod: &PodDemand, node: &str, now: u64) {
    let BindStep::Bind { ticket, members } = book.bind_arrive(pod, node, now).expect("arrive") else {
        panic!("a joining pod binds at once");
    };
    let outcomes: Vec<_> = members.iter().map(|b| (b.pod.clone(), Ok(()))).collect();
    assert_eq!(book.bind_finished(&ticket, &outcomes, now), BindFinish::Bound);
}

/// An elastic gang (size 2, at most 3) whose three pods come at once, on four free hosts:
/// it starts with two (the third waits, told why, nothing held for it), the third joins once
/// the two run, a fourth is held off at the maximum (no preemption for it either), and joins
/// once a member has left.
#[test]
fn an_elastic_gang_starts_at_its_size_and_grows_to_its_maximum() {
    let mut book = Book::new(cluster(1, 4), BookConfig::default());
    let offered = all_hosts(&book);
    let pods: Vec<PodDemand> = (0..4).map(|rank| elastic(rank, 3)).collect();
    let first = filtered_node(&mut book, &pods[0], &offered, 0);
    let second = filtered_node(&mut book, &pods[1], &offered, 0);
    assert_eq!(book.ledger().free_gpus(), 32 - 16, "the gang starts with its size");
    let verdicts = book.filter(&pods[2], &offered, 0).expect("filter");
    assert!(
        verdicts.iter().all(|v| matches!(v, NodeVerdict::Fail(r) if r.contains("starts with its 2 members"))),
        "{verdicts:?}"
    );
    assert_eq!(book.ledger().free_gpus(), 16, "nothing held for the third");
    bind_gang(&mut book, &pods[..2], &[first.clone(), second.clone()], 1);

    let third = filtered_node(&mut book, &pods[2], &offered, 2);
    assert!(![&first, &second].contains(&&third));
    bind_joiner(&mut book, &pods[2], &third, 2);
    assert_eq!(book.running_hosts("ns/e").len(), 3);

    let verdicts = book.filter(&pods[3], &offered, 3).expect("filter");
    assert!(
        verdicts.iter().all(|v| matches!(v, NodeVerdict::Fail(r) if r.contains("its maximum is 3"))),
        "{verdicts:?}"
    );
    assert_eq!(book.ledger().free_gpus(), 8, "nothing held at the maximum");
    let answer = book.preempt(&pods[3], &[candidate(0, "e-0")], 3).expect("preempt");
    assert_eq!(kept(&answer), vec![false]);
    assert!(answer.why.as_deref().is_some_and(|w| w.contains("maximum")), "{answer:?}");

    book.forget_pod("e-0-uid");
    let fourth = filtered_node(&mut book, &pods[3], &offered, 4);
    bind_joiner(&mut book, &pods[3], &fourth, 4);
    assert_eq!(book.running_hosts("ns/e").len(), 3);
    book.check().expect("invariants");
}

/// The maximum counts pods holding a joining slot too: two pods joining at once when one
/// place is left under the maximum, one is held and the other told why.
#[test]
fn pods_joining_at_once_stop_at_the_maximum() {
    let mut book = Book::new(cluster(1, 5), BookConfig::default());
    let offered = all_hosts(&book);
    let pods: Vec<PodDemand> = (0..4).map(|rank| elastic(rank, 3)).collect();
    let nodes: Vec<String> = pods[..2].iter().map(|p| filtered_node(&mut book, p, &offered, 0)).collect();
    bind_gang(&mut book, &pods[..2], &nodes, 1);
    filtered_node(&mut book, &pods[2], &offered, 2);
    let verdicts = book.filter(&pods[3], &offered, 2).expect("filter");
    assert!(
        verdicts.iter().all(|v| matches!(v, NodeVerdict::Fail(r) if r.contains("1 other(s) joining"))),
        "{verdicts:?}"
    );
    assert_eq!(book.ledger().free_gpus(), 40 - 24);
    book.check().expect("invariants");
}

/// Members that disagree on the maximum (the label changed while the gang runs): the
/// smallest any of them states counts. Two members run stating at most 3; a pod stating at
/// most 5 joins as the third, and a fourth stating 5 is held off at 3. Without the members'
/// own statement (not observed), the joiner's 5 would count.
#[test]
fn the_smallest_maximum_that_a_gangs_pods_state_counts() {
    let mut book = Book::new(cluster(1, 5), BookConfig::default());
    let offered = all_hosts(&book);
    let running: Vec<PodDemand> = (0..2).map(|rank| elastic(rank, 3)).collect();
    let nodes: Vec<String> = running.iter().map(|p| filtered_node(&mut book, p, &offered, 0)).collect();
    bind_gang(&mut book, &running, &nodes, 1);
    for pod in &running {
        book.observe_gang_max(&pod.pod.uid, Some(3));
    }
    let larger: Vec<PodDemand> = (2..4).map(|rank| elastic(rank, 5)).collect();
    let third = filtered_node(&mut book, &larger[0], &offered, 2);
    bind_joiner(&mut book, &larger[0], &third, 2);
    book.observe_gang_max(&larger[0].pod.uid, Some(5));
    let verdicts = book.filter(&larger[1], &offered, 3).expect("filter");
    assert!(
        verdicts.iter().all(|v| matches!(v, NodeVerdict::Fail(r) if r.contains("its maximum is 3"))),
        "{verdicts:?}"
    );
    // Once the members stating 3 have left, the gang's pods state 5.
    for pod in &running {
        book.forget_pod(&pod.pod.uid);
    }
    filtered_node(&mut book, &larger[1], &offered, 4);
    book.check().expect("invariants");
}
