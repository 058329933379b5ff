//! Replicas with roles in the book (issue 18's failing inputs as the extender's verbs meet
//! them): the first pod of a replica plans and reserves every role whole, each pod takes a
//! slot of its own role, binds wait for every pod that takes GPUs, and pods that describe
//! the replica differently are refused with nothing held.

use std::collections::BTreeSet;

use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};

use super::tests::{passing, plan_options};
use super::*;
use topoplace_engine::testkit::node;
use topoplace_engine::topology::ClusterSpec;

const SPINE: &str = "network.topology.nvidia.com/spine";
const LEAF: &str = "network.topology.nvidia.com/leaf";

/// One spine of racks `r0, r1, ...` of 8-GPU H100 hosts, `hosts[r]` in rack `r`.
fn racks(hosts: &[usize]) -> Cluster {
    let mut nodes = Vec::new();
    for (rack, &count) in hosts.iter().enumerate() {
        for host in 0..count {
            let rack_name = format!("r{rack}");
            nodes.push(node(&format!("r{rack}-{host}"), "H100", 8, &[(SPINE, "s0"), (LEAF, rack_name.as_str())]));
        }
    }
    Cluster::build(ClusterSpec { name: "t".into(), levels: vec![SPINE.into(), LEAF.into()], nodes }).expect("cluster")
}

/// A pod of replica `gang` in role `role` (rank within the role), asking `gpus`.
fn pod(gang: &str, roles: &[RoleSpec], role: &str, rank: u32, gpus: u32) -> PodDemand {
    let size = roles.iter().map(|r| r.members).sum();
    PodDemand {
        pod: PodIdentity {
            namespace: "ns".into(),
            name: format!("{gang}-{role}-{rank}"),
            uid: format!("{gang}-{role}-{rank}-uid"),
        },
        gpus,
        memory: MemoryNeed::None,
        tensor_parallel: None,
        pipeline_parallel: None,
        required: None,
        preferred: None,
        gang: Some(GangMembership {
            key: format!("ns/{gang}"),
            size,
            max: None,
            rank: Some(rank),
            order: BindOrder::Together,
        }),
        roles: Some(RoleDemand { role: role.into(), roles: roles.to_vec() }),
        pool: Default::default(),
    }
}

fn required(role: RoleSpec, scope: &str) -> RoleSpec {
    RoleSpec { required: Some(Scope::parse(scope)), ..role }
}

fn offered(book: &Book) -> Vec<HostId> {
    (0..book.cluster().hosts.len() as HostId).collect()
}

/// The one node `demand`'s filter passes.
fn planned_node(book: &mut Book, demand: &PodDemand, now: u64) -> String {
    let offered = offered(book);
    let verdicts = book.filter(demand, &offered, now).expect("filter");
    let passing = passing(book, &verdicts, &offered);
    assert_eq!(passing.len(), 1, "{demand:?}: {verdicts:?}");
    passing[0].clone()
}

fn rack(node: &str) -> &str {
    node.split('-').next().unwrap_or(node)
}

#[test]
fn a_leader_of_another_shape_and_its_workers_are_one_replica_in_one_rack() {
    // Issue 18, input 2: leader 4 GPUs, two workers of 8, one rack asked; rack r0 has
    // 16 GPUs, too few for 20, so all three go to r1 and bind together.
    let mut book = Book::new(racks(&[2, 3]), BookConfig::default());
    let roles = vec![RoleSpec::shape("leader", 1, 4, 1), RoleSpec::shape("worker", 2, 8, 8)];
    let with_scope = |mut demand: PodDemand| {
        demand.required = Some(Scope::parse("leaf"));
        demand
    };
    let pods = [
        with_scope(pod("g", &roles, "worker", 1, 8)),
        with_scope(pod("g", &roles, "leader", 0, 4)),
        with_scope(pod("g", &roles, "worker", 0, 8)),
    ];
    let first = planned_node(&mut book, &pods[0], 0);
    assert_eq!(book.ledger().free_gpus(), 40 - 20, "every role reserved at the first pod's filter");
    let nodes: Vec<String> = pods.iter().map(|p| planned_node(&mut book, p, 1)).collect();
    assert_eq!(nodes[0], first, "a pod filtered again keeps its slot");
    assert!(nodes.iter().all(|n| rack(n) == "r1"), "{nodes:?}");
    assert_ne!(nodes[0], nodes[2], "two 8-GPU workers on two hosts");
    for (index, demand) in pods[..2].iter().enumerate() {
        assert!(matches!(book.bind_arrive(demand, &nodes[index], 2), Ok(BindStep::Wait { .. })));
    }
    let Ok(BindStep::Bind { ticket, members }) = book.bind_arrive(&pods[2], &nodes[2], 3) else {
        panic!("the last pod binds the replica");
    };
    assert_eq!(members.len(), 3);
    let leader = members.iter().find(|m| m.pod.name == "g-leader-0").expect("leader");
    assert_eq!(leader.gpus.len(), 4);
    let ok: Vec<_> = members.iter().map(|m| (m.pod.clone(), Ok(()))).collect();
    assert_eq!(book.bind_finished(&ticket, &ok, 4), BindFinish::Bound);
    assert_eq!(book.ledger().free_gpus(), 20);
    book.check().expect("invariants");
}

#[test]
fn a_constraint_on_one_role_holds_in_any_arrival_order() {
    // Issue 18, input 3: one spine; rack r0 with 2 free hosts, r1 with 1; the workers (8
    // GPUs each) must share a rack, the leader (8 GPUs) has no constraint.
    let roles = vec![RoleSpec::shape("leader", 1, 8, 8), required(RoleSpec::shape("worker", 2, 8, 8), "leaf")];
    for first in ["leader", "worker"] {
        let mut book = Book::new(racks(&[2, 1]), BookConfig::default());
        let leader = pod("g", &roles, "leader", 0, 8);
        let workers = [pod("g", &roles, "worker", 0, 8), pod("g", &roles, "worker", 1, 8)];
        let order: Vec<&PodDemand> = if first == "leader" {
            vec![&leader, &workers[0], &workers[1]]
        } else {
            vec![&workers[1], &leader, &workers[0]]
        };
        for demand in order {
            planned_node(&mut book, demand, 0);
        }
        let worker_racks: BTreeSet<String> =
            workers.iter().map(|w| rack(&planned_node(&mut book, w, 1)).to_string()).collect();
        assert_eq!(worker_racks, BTreeSet::from(["r0".to_string()]), "{first} first");
        assert_eq!(rack(&planned_node(&mut book, &leader, 1)), "r1", "{first} first");
        book.check().expect("invariants");
    }
}

#[test]
fn two_roles_that_share_a_rack_take_the_rack_that_holds_both() {
    // Issue 18, input 4: racks of 3 and 2 free hosts; prefill 2 x 8 (TP 8) and decode
    // 1 x 4 (TP 4) in one rack: 20 GPUs, so only the rack of 3 holds the replica.
    let mut book = Book::new(racks(&[2, 3]), BookConfig::default());
    let roles = vec![RoleSpec::shape("prefill", 2, 8, 8), RoleSpec::shape("decode", 1, 4, 4)];
    let mut pods =
        vec![pod("pd", &roles, "decode", 0, 4), pod("pd", &roles, "prefill", 0, 8), pod("pd", &roles, "prefill", 1, 8)];
    for demand in &mut pods {
        demand.required = Some(Scope::parse("leaf"));
    }
    let nodes: Vec<String> = pods.iter().map(|p| planned_node(&mut book, p, 0)).collect();
    assert!(nodes.iter().all(|n| rack(n) == "r1"), "{nodes:?}");
    book.check().expect("invariants");
}

#[test]
fn slices_of_a_role_each_stay_in_one_rack() {
    // Issue 18, input 5: racks of 3, 1 and 2 free hosts; 4 x 8 GPUs in slices of 2, each
    // slice inside one rack: 2 + 2 on the racks of 3 and 2, never 3 + 1.
    let mut book = Book::new(racks(&[3, 1, 2]), BookConfig::default());
    let sliced = RoleSpec {
        slices: Some(topoplace_engine::workload::Slicing { members: 2, scope: Scope::parse("leaf"), exclusive: false }),
        ..RoleSpec::shape("workers", 4, 8, 8)
    };
    let roles = vec![sliced];
    let pods: Vec<PodDemand> = (0..4).map(|rank| pod("job", &roles, "workers", rank, 8)).collect();
    let nodes: Vec<String> = pods.iter().map(|p| planned_node(&mut book, p, 0)).collect();
    let per_slice: Vec<&str> = nodes.iter().map(|n| rack(n)).collect();
    assert_eq!(per_slice[0], per_slice[1], "slice 0 in one rack: {nodes:?}");
    assert_eq!(per_slice[2], per_slice[3], "slice 1 in one rack: {nodes:?}");
    assert!(!per_slice.contains(&"r1"), "the rack of one host holds no slice: {nodes:?}");
    book.check().expect("invariants");
}

#[test]
fn pods_that_describe_the_replica_differently_are_refused_with_nothing_held() {
    let mut book = Book::new(racks(&[4]), BookConfig::default());
    let roles = vec![RoleSpec::shape("leader", 1, 4, 1), RoleSpec::shape("worker", 2, 8, 8)];
    planned_node(&mut book, &pod("g", &roles, "worker", 0, 8), 0);
    let free = book.ledger().free_gpus();

    let other = vec![RoleSpec::shape("leader", 1, 4, 1), RoleSpec::shape("worker", 2, 8, 4)];
    let Err(BookError::GangShapeMismatch(mismatch)) =
        book.filter(&pod("g", &other, "worker", 1, 8), &offered(&book), 1)
    else {
        panic!("a worker that says TP 4 is refused");
    };
    assert_eq!(mismatch.field, ROLES_FIELD);
    assert_eq!(mismatch.planned_by, "pod ns/g-worker-0");
    assert!(mismatch.ours.contains("TP 4") && mismatch.theirs.contains("TP 8"), "{mismatch:?}");

    // A pod of the same gang key without roles (a role pod meeting a gang the API reserved
    // without roles: `a_pod_with_roles_meets_a_gang_the_api_reserved_without_roles`).
    let mut plain = pod("g", &roles, "worker", 1, 8);
    plain.roles = None;
    let Err(BookError::GangShapeMismatch(mismatch)) = book.filter(&plain, &offered(&book), 1) else {
        panic!("a pod without roles cannot join a replica with roles");
    };
    assert_eq!((mismatch.field, mismatch.ours.as_str()), (ROLES_FIELD, "no roles"));

    // Its own GPUs are not its role's; its role is unknown; the size does not add up; a
    // rank past its role.
    let cases = [
        (pod("g", &roles, "worker", 1, 4), "asks for 4 nvidia.com/gpu, but its role `worker` has 8"),
        (pod("g", &roles, "router", 0, 0), "its role `router` is not one of the replica's roles (leader, worker)"),
        (
            PodDemand {
                gang: Some(GangMembership {
                    key: "ns/g".into(),
                    size: 4,
                    max: None,
                    rank: Some(1),
                    order: BindOrder::Together,
                }),
                ..pod("g", &roles, "worker", 1, 8)
            },
            "counts 4 pods, but its roles have 3 members together",
        ),
        (pod("g", &roles, "worker", 2, 8), "its rank 2 is past its role `worker`"),
    ];
    for (demand, expected) in cases {
        let error = book.filter(&demand, &offered(&book), 1).expect_err("refused").to_string();
        assert!(error.contains(expected) && error.contains("nothing is held"), "{error}");
    }
    // Roles that do not make a replica: a slice that does not divide its role.
    let bad_slice = vec![RoleSpec {
        slices: Some(topoplace_engine::workload::Slicing { members: 3, scope: Scope::parse("leaf"), exclusive: false }),
        ..RoleSpec::shape("w", 4, 8, 8)
    }];
    let error = book.filter(&pod("h", &bad_slice, "w", 0, 8), &offered(&book), 1).expect_err("refused").to_string();
    assert!(error.starts_with("pod ns/h-w-0:") && error.contains("slice"), "{error}");
    assert_eq!(book.ledger().free_gpus(), free, "nothing more held by any refused pod");
    book.check().expect("invariants");
}

#[test]
fn a_gpu_less_role_is_never_waited_for_and_holds_nothing() {
    // Issue 18, input 1 through roles: a CPU-only leader and two 8-GPU workers.
    let mut book = Book::new(racks(&[3]), BookConfig::default());
    let roles = vec![RoleSpec::shape("leader", 1, 0, 1), RoleSpec::shape("worker", 2, 8, 8)];
    let leader = pod("g", &roles, "leader", 0, 0);
    let verdicts = book.filter(&leader, &offered(&book), 0).expect("filter");
    assert!(verdicts.iter().all(|v| *v == NodeVerdict::Pass));
    assert_eq!(book.ledger().free_gpus(), 24, "the leader holds nothing");
    let workers = [pod("g", &roles, "worker", 0, 8), pod("g", &roles, "worker", 1, 8)];
    let nodes: Vec<String> = workers.iter().map(|w| planned_node(&mut book, w, 0)).collect();
    assert_eq!(book.ledger().free_gpus(), 8, "two workers reserved, the third host free");
    assert!(matches!(book.bind_arrive(&workers[0], &nodes[0], 1), Ok(BindStep::Wait { .. })));
    let Ok(BindStep::Bind { members, .. }) = book.bind_arrive(&workers[1], &nodes[1], 2) else {
        panic!("two workers are the whole replica at bind");
    };
    assert_eq!(members.len(), 2);
    // Evicting GPU pods frees nothing a GPU-less role needs.
    let candidate = PreemptCandidate { host: 0, victims: vec!["g-worker-0-uid".into()] };
    assert_eq!(super::tests::kept(&book.preempt(&leader, &[candidate], 2).expect("preempt")), vec![false]);
    book.check().expect("invariants");
}

#[test]
fn preemption_for_a_replica_judges_its_candidates_together() {
    // Two full hosts, each with a bound 8-GPU pod; a replica of a 4-GPU leader and an 8-GPU
    // worker (12 GPUs): evicting one pod is not enough for the replica; evicting both is, so
    // both candidates are kept, and the plan holds what the victims give back.
    let mut book = Book::new(racks(&[2]), BookConfig::default());
    for (index, node) in ["r0-0", "r0-1"].iter().enumerate() {
        let bound = PodIdentity { namespace: "ns".into(), name: format!("low-{index}"), uid: format!("low-{index}") };
        let gpus: Vec<u8> = (0..8).collect();
        book.observe_bound(bound, node, Some(&gpus), 8, None).expect("observed");
    }
    let roles = vec![RoleSpec::shape("leader", 1, 4, 4), RoleSpec::shape("worker", 1, 8, 8)];
    let worker = pod("g", &roles, "worker", 0, 8);
    let (h0, h1) = (book.cluster().host_id("r0-0").expect("host"), book.cluster().host_id("r0-1").expect("host"));
    let one = PreemptCandidate { host: h0, victims: vec!["low-0".into()] };
    let alone = book.preempt(&worker, std::slice::from_ref(&one), 0).expect("preempt");
    assert_eq!(alone.keep, vec![None]);
    assert!(alone.why.is_some_and(|why| why.contains("does not fit even with the victims")));
    assert!(book.nominations.is_empty(), "nothing recorded");
    let two = [one.clone(), PreemptCandidate { host: h1, victims: vec!["low-1".into()] }];
    let answer = book.preempt(&worker, &two, 0).expect("preempt");
    assert_eq!(super::tests::kept(&answer), vec![true, true], "{answer:?}");
    assert_eq!(book.ledger().free_gpus(), 0, "the victims still hold their GPUs");
    // The victims leave one after the other: what they give back is held for the replica.
    book.forget_pod("low-0");
    assert_eq!(book.ledger().free_gpus(), 8 - u64::from(book.nomination_needs(h0)), "held for the plan");
    book.forget_pod("low-1");
    let verdicts = book.filter(&worker, &offered(&book), 1).expect("filter");
    assert_eq!(verdicts.iter().filter(|v| **v == NodeVerdict::Pass).count(), 1, "{verdicts:?}");
    assert!(book.nominations.is_empty() && book.gangs.contains_key("ns/g"), "the plan is the reservation now");
    assert_eq!(book.ledger().free_gpus(), 4, "12 of 16 GPUs reserved");
    book.check().expect("invariants");
}

/// Random role mixes on a random cluster: every replica is reserved with every role's and
/// the replica's scope met, or refused with nothing held; no GPU is held twice.
#[test]
fn random_role_mixes_meet_every_scope_or_hold_nothing() {
    let mut placed = 0;
    let mut refused = 0;
    for seed in 0..40u64 {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        let hosts: Vec<usize> = (0..rng.random_range(2..5usize)).map(|_| rng.random_range(1..5usize)).collect();
        let mut book = Book::new(racks(&hosts), BookConfig::default());
        for replica_index in 0..6 {
            let role_count = rng.random_range(1..4usize);
            let roles: Vec<RoleSpec> = (0..role_count)
                .map(|r| {
                    let gpus = [0, 1, 2, 4, 8][rng.random_range(0..5usize)];
                    let members = rng.random_range(1..4u32);
                    let mut role = RoleSpec::shape(&format!("role{r}"), members, gpus, gpus.max(1));
                    if gpus > 0 && rng.random_range(0..3u32) == 0 {
                        role.required = Some(Scope::parse("leaf"));
                    }
                    role
                })
                .collect();
            let name = format!("rep{replica_index}");
            let scoped = rng.random_range(0..3u32) == 0;
            let demands: Vec<PodDemand> = roles
                .iter()
                .flat_map(|role| {
                    (0..role.members).map(|rank| {
                        let mut demand = pod(&name, &roles, &role.name, rank, role.gpus_per_member);
                        demand.required = scoped.then(|| Scope::parse("leaf"));
                        demand
                    })
                })
                .filter(|d| d.gpus > 0)
                .collect();
            if demands.is_empty() {
                continue;
            }
            let before = book.ledger().free_gpus();
            let all = offered(&book);
            // kube-scheduler's offer to the first pod: most hosts (its role must stay on them).
            let first_offer: Vec<HostId> = all.iter().copied().filter(|_| rng.random_range(0..5u32) > 0).collect();
            let mut planned: Vec<(usize, String)> = Vec::new();
            let mut failed = false;
            for (index, demand) in demands.iter().enumerate() {
                let offered = if index == 0 { &first_offer } else { &all };
                let verdicts = book.filter(demand, offered, 0).expect("valid roles");
                match passing(&book, &verdicts, offered).as_slice() {
                    [node] => {
                        let role = roles.iter().position(|r| Some(&r.name) == demand.roles.as_ref().map(|d| &d.role));
                        planned.push((role.expect("role"), node.clone()));
                    }
                    [] => {
                        failed = true;
                        break;
                    }
                    more => panic!("seed {seed}: a role pod passes one node, not {more:?}"),
                }
            }
            book.check().expect("invariants");
            if failed {
                assert!(planned.is_empty(), "seed {seed}: the first pod decides for the whole replica");
                assert_eq!(book.ledger().free_gpus(), before, "seed {seed}: a replica that does not fit holds nothing");
                refused += 1;
                continue;
            }
            let total: u64 = demands.iter().map(|d| u64::from(d.gpus)).sum();
            assert_eq!(before - book.ledger().free_gpus(), total, "seed {seed}: the whole replica is held");
            if scoped {
                let all: BTreeSet<&str> = planned.iter().map(|(_, n)| rack(n)).collect();
                assert_eq!(all.len(), 1, "seed {seed}: the replica in one rack: {planned:?}");
            }
            for (index, role) in roles.iter().enumerate() {
                if role.required.is_some() {
                    let of_role: BTreeSet<&str> =
                        planned.iter().filter(|(r, _)| *r == index).map(|(_, n)| rack(n)).collect();
                    assert!(of_role.len() <= 1, "seed {seed}: role {} in one rack: {planned:?}", role.name);
                }
            }
            let first_role = demands[0].roles.as_ref().map(|d| d.role.clone());
            let first_role = roles.iter().position(|r| Some(&r.name) == first_role.as_ref()).expect("role");
            let offered_names: BTreeSet<String> =
                first_offer.iter().map(|&h| book.cluster().host(h).name.clone()).collect();
            for (role, node) in &planned {
                assert!(
                    *role != first_role || offered_names.contains(node),
                    "seed {seed}: the first pod's role stays on its offer: {node}"
                );
            }
            placed += 1;
        }
    }
    assert!(placed > 20 && refused > 5, "both outcomes are exercised: {placed} placed, {refused} refused");
}

#[test]
fn a_replica_is_planned_beyond_the_nodes_offered_to_its_first_pod() {
    // kube-scheduler offers an 8-GPU worker only the hosts with 8 GPUs free; the 4-GPU leader
    // still packs onto the host with 5 free that the worker was not offered.
    let mut book = Book::new(racks(&[4]), BookConfig::default());
    let single = PodIdentity { namespace: "ns".into(), name: "small".into(), uid: "small".into() };
    book.observe_bound(single, "r0-0", Some(&[0, 1, 2]), 3, None).expect("observed");
    let roles = vec![RoleSpec::shape("leader", 1, 4, 4), RoleSpec::shape("worker", 2, 8, 8)];
    let worker = pod("g", &roles, "worker", 0, 8);
    let worker_offer: Vec<HostId> =
        offered(&book).into_iter().filter(|&h| book.cluster().host(h).name != "r0-0").collect();
    let verdicts = book.filter(&worker, &worker_offer, 0).expect("filter");
    assert_eq!(verdicts.iter().filter(|v| **v == NodeVerdict::Pass).count(), 1);
    assert_eq!(planned_node(&mut book, &pod("g", &roles, "leader", 0, 4), 0), "r0-0", "the leader packs");

    // Only the pod's own role is held to its offer: with r0-2 and r0-3 offered to a worker,
    // both workers go there and the leader to a host the worker was not offered.
    let mut book = Book::new(racks(&[4]), BookConfig::default());
    let only: Vec<HostId> =
        offered(&book).into_iter().filter(|&h| book.cluster().host(h).name.as_str() >= "r0-2").collect();
    let verdicts = book.filter(&worker, &only, 0).expect("filter");
    assert_eq!(passing(&book, &verdicts, &only).len(), 1, "{verdicts:?}");
    let other = pod("g", &roles, "worker", 1, 8);
    let verdicts = book.filter(&other, &only, 0).expect("filter");
    assert_eq!(verdicts.iter().filter(|v| **v == NodeVerdict::Pass).count(), 1, "both workers on the offer");
    let leader = planned_node(&mut book, &pod("g", &roles, "leader", 0, 4), 0);
    assert!(leader == "r0-0" || leader == "r0-1", "{leader}");
    book.check().expect("invariants");
}

#[test]
fn a_replicas_other_roles_keep_off_closed_nodes_and_a_pod_that_changes_role_moves() {
    // The leader would pack beside the small pod on r0-0, but r0-0 is cordoned: it goes to
    // a fresh host; the workers, filtered on kube-scheduler's offer, are not affected.
    let mut book = Book::new(racks(&[4]), BookConfig::default());
    let small = PodIdentity { namespace: "ns".into(), name: "small".into(), uid: "small".into() };
    book.observe_bound(small, "r0-0", Some(&[0, 1, 2]), 3, None).expect("observed");
    book.set_closed_nodes(BTreeSet::from(["r0-0".to_string()]));
    let roles = vec![RoleSpec::shape("leader", 1, 4, 4), RoleSpec::shape("worker", 2, 8, 8)];
    let worker_offer: Vec<HostId> =
        offered(&book).into_iter().filter(|&h| book.cluster().host(h).name != "r0-0").collect();
    book.filter(&pod("g", &roles, "worker", 0, 8), &worker_offer, 0).expect("filter");
    let leader = planned_node(&mut book, &pod("g", &roles, "leader", 0, 4), 0);
    assert_ne!(leader, "r0-0", "a cordoned node takes no role");

    // Two 8-GPU roles: a pod filtered as `a` and then labelled `b` takes a slot of `b`.
    let mut book = Book::new(racks(&[4]), BookConfig::default());
    let roles = vec![RoleSpec::shape("a", 1, 8, 8), RoleSpec::shape("b", 1, 8, 8)];
    let as_a = pod("h", &roles, "a", 0, 8);
    let first = planned_node(&mut book, &as_a, 0);
    let mut as_b = as_a.clone();
    as_b.roles = Some(RoleDemand { role: "b".into(), roles: roles.clone() });
    let moved = planned_node(&mut book, &as_b, 1);
    assert_ne!(first, moved, "the pod now holds role b's slot");
    // Role a's slot is free again for another pod.
    let other = PodDemand {
        pod: PodIdentity { namespace: "ns".into(), name: "other".into(), uid: "other".into() },
        ..pod("h", &roles, "a", 0, 8)
    };
    assert_eq!(planned_node(&mut book, &other, 2), first);
    book.check().expect("invariants");
}

#[test]
fn a_pod_with_roles_meets_a_gang_the_api_reserved_without_roles() {
    let mut book = Book::new(racks(&[4]), BookConfig::default());
    let options = plan_options(false, 60_000);
    let gang = topoplace_engine::workload::GangSpec::shape("ns/g", 3, 8, 8).expand().remove(0);
    let request = GangRequest { key: "ns/g".into(), gang, product: None };
    book.plan_gangs(&[request], &options, 0).expect("reserved");
    let free = book.ledger().free_gpus();
    let roles = vec![RoleSpec::shape("leader", 1, 8, 8), RoleSpec::shape("worker", 2, 8, 8)];
    let Err(BookError::GangShapeMismatch(mismatch)) =
        book.filter(&pod("g", &roles, "worker", 0, 8), &offered(&book), 1)
    else {
        panic!("a role pod cannot claim a reservation of one shape");
    };
    assert_eq!((mismatch.field, mismatch.theirs.as_str()), (ROLES_FIELD, "no roles"));
    assert_eq!(mismatch.planned_by, "placement API reservation `r1`");
    assert_eq!(book.ledger().free_gpus(), free);
    book.check().expect("invariants");
}

#[test]
fn api_plans_and_capacity_keep_off_closed_nodes() {
    let mut book = Book::new(racks(&[2, 2]), BookConfig::default());
    let generation = book.generation();
    book.set_closed_nodes(BTreeSet::from(["r0-0".to_string(), "r0-1".to_string()]));
    assert!(book.generation() > generation, "capacity watchers see a cordon");
    let generation = book.generation();
    book.set_closed_nodes(BTreeSet::from(["r0-0".to_string(), "r0-1".to_string()]));
    assert_eq!(book.generation(), generation, "the same set changes nothing");
    let options = PlanOptions { allow_partial: true, ..plan_options(true, 60_000) };
    let gang = |key: &str| GangRequest {
        key: key.into(),
        gang: topoplace_engine::workload::GangSpec::shape(key, 1, 8, 8).expand().remove(0),
        product: None,
    };
    let outcome = book.plan_gangs(&[gang("ns/a"), gang("ns/b"), gang("ns/c")], &options, 0).expect("plan");
    assert_eq!((outcome.placements.len(), outcome.unplaced.len()), (2, 1), "only r1's two hosts are open");
    assert_eq!(book.capacity(&gang("ns/a"), None).expect("capacity").replicas, 2);
    let explained = book.explain(&gang("ns/a"), &["r0-0".to_string(), "r1-0".to_string()]).expect("explain");
    assert_eq!(explained.nodes[0].reason.as_deref(), Some("the node is cordoned or not Ready"));
    assert_eq!((explained.nodes[1].units, explained.nodes[1].reason.is_none()), (1, true));
    let roles = vec![RoleSpec::shape("leader", 1, 4, 4), RoleSpec::shape("worker", 1, 8, 8)];
    let replica = topoplace_engine::workload::GangSpec::with_roles("ns/r", roles).expand_replicas().remove(0);
    let request = ReplicaRequest { key: "ns/r".into(), replica, product: None };
    let capacity = book.replica_capacity(&request, None).expect("capacity");
    assert_eq!(capacity.replicas, 1, "12 GPUs each: one fits the 16 open GPUs");
    let per_rack: Vec<u64> = capacity.domains.iter().map(|&(_, replicas, _)| replicas).collect();
    assert_eq!(per_rack, vec![0, 1]);
}
