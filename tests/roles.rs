//! Replicas with roles in the placement engine and the workload file: the failing inputs of
//! the issue "Replicas with roles" that the engine answers (a leader of another shape or
//! without GPUs, a constraint on one role only, two roles in one replica scope, slices),
//! the search going back over an earlier choice, and bad input named by file, line, role
//! and field. Of the Kubernetes ways in, only a LeaderWorkerSet whose leader takes no GPUs is
//! built (`topoplace.io/leader-gpus`, tested in `tests/extender.rs` and
//! `tests/scheduler_kube.rs`); the gRPC API's dry runs are tested in `tests/grpc.rs`.

use topoplace_engine::ledger::Ledger;
use topoplace_engine::placement::exact::{CandidateHosts, ExactConfig};
use topoplace_engine::placement::replica::ReplicaPlacement;
use topoplace_engine::placement::{Planner, PlannerConfig, SolverChoice};
use topoplace_engine::topology::Cluster;
use topoplace_engine::workload::{GangSpec, MemoryNeed, Replica, RoleSpec, Scope, Slicing, Workload};
use topoplace_formats::files;

/// A cluster of 8-GPU H100 hosts: `(name, block, rack, GPUs taken)` each.
fn h100s(hosts: &[(&str, &str, &str, u8)]) -> Cluster {
    let mut text = String::from(
        "apiVersion: topoplace.io/v1alpha1\nkind: Cluster\nmetadata: {name: t}\nspec:\n  levels: [block, rack]\n  nodes:\n",
    );
    for (name, block, rack, taken) in hosts {
        let allocated: Vec<String> = (0..*taken).map(|g| g.to_string()).collect();
        text.push_str(&format!(
            "  - name: {name}\n    labels: {{block: {block}, rack: {rack}}}\n    gpu: {{product: H100, count: 8}}\n    allocated: [{}]\n",
            allocated.join(",")
        ));
    }
    files::cluster::load("inline.yaml", &text).expect("valid inline cluster")
}

fn rack() -> Option<Scope> {
    Some(Scope::Level("rack".into()))
}

fn role(name: &str, members: u32, gpus: u32, tp: u32) -> RoleSpec {
    RoleSpec::shape(name, members, gpus, tp)
}

fn replica(spec: GangSpec) -> Replica {
    spec.validate().expect("a valid replica");
    spec.expand_replicas().remove(0)
}

fn place(cluster: &Cluster, replica: &Replica) -> Result<ReplicaPlacement, String> {
    place_by(cluster, replica, &SolverChoice::Greedy)
}

fn place_by(cluster: &Cluster, replica: &Replica, solver: &SolverChoice) -> Result<ReplicaPlacement, String> {
    let mut planner = Planner::new(cluster, PlannerConfig::default());
    planner.check_replica(replica).map_err(|e| e.to_string())?;
    planner.place_replica(&Ledger::new(cluster), replica, solver, None).map_err(|u| u.reason)
}

/// The search, and the exact model of the roles (every region modelled, so that its answer
/// is the model's own and not the search's fallback: the tests check which ran).
fn solvers() -> [SolverChoice; 2] {
    [
        SolverChoice::Greedy,
        SolverChoice::Exact(ExactConfig { candidates: CandidateHosts::All, ..ExactConfig::default() }),
    ]
}

/// The placement is the solver's own: the exact model's when the exact solver was asked.
fn ran(placement: &ReplicaPlacement, solver: &SolverChoice) {
    let expected = if matches!(solver, SolverChoice::Greedy) { "greedy" } else { "exact/microlp" };
    assert_eq!(placement.solver.solver, expected, "{placement:?}");
}

/// The nodes of one role, sorted and without repeats.
fn nodes_of(cluster: &Cluster, placement: &ReplicaPlacement, role: &str) -> Vec<String> {
    let mut nodes: Vec<String> = placement
        .parts
        .iter()
        .filter(|p| p.role == role)
        .flat_map(|p| &p.placement.members)
        .map(|m| cluster.host(m.host).name.clone())
        .collect();
    nodes.sort();
    nodes.dedup();
    nodes
}

/// Two racks of one block: `a1..a3` free in rack ra, `b1, b2` free in rack rb.
fn three_and_two() -> Cluster {
    h100s(&[
        ("a1", "k", "ra", 0),
        ("a2", "k", "ra", 0),
        ("a3", "k", "ra", 0),
        ("b1", "k", "rb", 0),
        ("b2", "k", "rb", 0),
    ])
}

#[test]
fn prefill_and_decode_share_the_rack_that_holds_both() {
    // Input 4: prefill 2 x 8 (TP 8) and decode 1 x 4 (TP 4) in one rack. As two gangs,
    // prefill took the tighter rack rb and decode the other; as one replica both go to ra.
    let cluster = three_and_two();
    let spec = GangSpec {
        required: rack(),
        ..GangSpec::with_roles("serve", vec![role("prefill", 2, 8, 8), role("decode", 1, 4, 4)])
    };
    let replica = replica(spec);
    for solver in solvers() {
        let placement = place_by(&cluster, &replica, &solver).expect("rack ra holds the replica");
        ran(&placement, &solver);
        assert_eq!(placement.region, "rack k/ra");
        assert_eq!(nodes_of(&cluster, &placement, "prefill").len(), 2);
        let all = nodes_of(&cluster, &placement, "prefill").into_iter().chain(nodes_of(&cluster, &placement, "decode"));
        assert!(all.into_iter().all(|n| n.starts_with('a')), "{placement:?}");
        assert_eq!(placement.gpus(), 20);
    }

    // The same shapes as two independent gangs, for contrast: prefill fills the tighter rack.
    let mut planner = Planner::new(&cluster, PlannerConfig::default());
    let prefill = GangSpec { required: rack(), ..GangSpec::shape("prefill", 2, 8, 8) }.expand().remove(0);
    let alone = planner.place(&Ledger::new(&cluster), &prefill).expect("fits");
    assert!(alone.members.iter().all(|m| cluster.host(m.host).name.starts_with('b')));
}

#[test]
fn slices_each_stay_in_a_rack_and_use_the_racks_that_fit_them() {
    // Input 5: racks with 3, 1 and 2 free hosts; 4 x 8 GPUs in slices of 2 members, each
    // slice in one rack: 2 + 2 on the racks with 3 and 2, never 3 + 1.
    let cluster = h100s(&[
        ("a1", "k", "ra", 0),
        ("a2", "k", "ra", 0),
        ("a3", "k", "ra", 0),
        ("b1", "k", "rb", 0),
        ("c1", "k", "rc", 0),
        ("c2", "k", "rc", 0),
    ]);
    let workers = RoleSpec {
        slices: Some(Slicing { members: 2, scope: Scope::Level("rack".into()), exclusive: false }),
        ..role("workers", 4, 8, 8)
    };
    let spec = GangSpec { required: Some(Scope::Level("block".into())), ..GangSpec::with_roles("job", vec![workers]) };
    let replica = replica(spec);
    for solver in solvers() {
        let placement = place_by(&cluster, &replica, &solver).expect("two racks hold a slice each");
        ran(&placement, &solver);
        assert_eq!(placement.parts.len(), 2);
        for part in &placement.parts {
            let racks: Vec<u32> = part.placement.members.iter().map(|m| cluster.host(m.host).domain_path[1]).collect();
            assert!(racks.windows(2).all(|w| w[0] == w[1]), "a slice inside one rack: {part:?}");
        }
        let nodes = nodes_of(&cluster, &placement, "workers");
        assert_eq!(nodes.iter().filter(|n| n.starts_with('a')).count(), 2, "{nodes:?}");
        assert_eq!(nodes.iter().filter(|n| n.starts_with('c')).count(), 2, "{nodes:?}");
        // Members are numbered within the role: slice 1 holds members 2 and 3.
        let mut members: Vec<u32> =
            placement.parts.iter().flat_map(|p| &p.placement.members).map(|m| m.member).collect();
        members.sort();
        assert_eq!(members, [0, 1, 2, 3]);
    }
}

/// LeaderWorkerSet's exclusive subgroups: each slice in a rack of its own. Two racks of four
/// free hosts: slices of two that may share go into one rack (the tightest after the first);
/// exclusive ones take a rack each. The exact solver does not model exclusivity: it answers
/// with the search's placement and says so, with no proof.
#[test]
fn exclusive_slices_each_take_a_domain_of_their_own() {
    let cluster = h100s(&[
        ("a1", "k", "ra", 0),
        ("a2", "k", "ra", 0),
        ("a3", "k", "ra", 0),
        ("a4", "k", "ra", 0),
        ("b1", "k", "rb", 0),
        ("b2", "k", "rb", 0),
        ("b3", "k", "rb", 0),
        ("b4", "k", "rb", 0),
    ]);
    let sliced = |exclusive| {
        let slices = Slicing { members: 2, scope: Scope::Level("rack".into()), exclusive };
        replica(GangSpec::with_roles("job", vec![RoleSpec { slices: Some(slices), ..role("workers", 4, 8, 8) }]))
    };
    let racks = |placement: &ReplicaPlacement| -> Vec<char> {
        let mut racks: Vec<char> =
            nodes_of(&cluster, placement, "workers").iter().filter_map(|n| n.chars().next()).collect();
        racks.dedup();
        racks
    };
    let shared = place(&cluster, &sliced(false)).expect("placed");
    assert_eq!(racks(&shared), ['a'], "slices that may share a rack pack into one");
    for solver in solvers() {
        let placement = place_by(&cluster, &sliced(true), &solver).expect("placed");
        assert_eq!(racks(&placement), ['a', 'b'], "{solver:?}");
        for part in &placement.parts {
            let slice_racks: Vec<char> =
                part.placement.members.iter().filter_map(|m| cluster.host(m.host).name.chars().next()).collect();
            assert!(slice_racks.windows(2).all(|w| w[0] == w[1]), "a slice inside one rack: {part:?}");
        }
        if !matches!(solver, SolverChoice::Greedy) {
            assert_eq!(placement.solver.solver, "greedy", "the exact model declined: {placement:?}");
        }
    }
    // A host scope: each slice on a host of its own (two 4-GPU slices would share a host).
    let hosts = replica(GangSpec::with_roles(
        "job",
        vec![RoleSpec {
            slices: Some(Slicing { members: 1, scope: Scope::Host, exclusive: true }),
            ..role("workers", 2, 4, 4)
        }],
    ));
    let placement = place(&cluster, &hosts).expect("placed");
    assert_eq!(nodes_of(&cluster, &placement, "workers").len(), 2, "{placement:?}");
    // Three exclusive slices on two racks do not fit, though the GPUs would; the reason says why.
    let three = replica(GangSpec::with_roles(
        "job",
        vec![RoleSpec {
            slices: Some(Slicing { members: 2, scope: Scope::Level("rack".into()), exclusive: true }),
            ..role("workers", 6, 8, 8)
        }],
    ));
    let reason = place(&cluster, &three).expect_err("three slices, two racks");
    assert!(reason.contains("exclusive"), "{reason}");
}

#[test]
fn a_constraint_on_one_role_holds_in_any_order_the_roles_are_given() {
    // Input 3: one spine; rack ra with 2 free hosts, rb with 1; an unconstrained leader and
    // two workers that must share a rack (8 GPUs each): the workers take ra, whichever
    // role is listed first.
    let cluster = h100s(&[("a1", "s", "ra", 0), ("a2", "s", "ra", 0), ("b1", "s", "rb", 0)]);
    let workers = RoleSpec { required: rack(), ..role("workers", 2, 8, 8) };
    for roles in [vec![role("leader", 1, 8, 8), workers.clone()], vec![workers.clone(), role("leader", 1, 8, 8)]] {
        for solver in solvers() {
            let placement =
                place_by(&cluster, &replica(GangSpec::with_roles("lws", roles.clone())), &solver).expect("fits");
            ran(&placement, &solver);
            assert_eq!(nodes_of(&cluster, &placement, "workers"), ["a1", "a2"]);
            assert_eq!(nodes_of(&cluster, &placement, "leader"), ["b1"]);
        }
    }
}

#[test]
fn a_leader_of_another_shape_is_one_replica_with_its_workers() {
    // Input 2: a leader of 4 GPUs and two workers of 8, in one rack. Rack rb (2 free hosts)
    // cannot hold 20 GPUs; rack ra can.
    let cluster = three_and_two();
    let spec = GangSpec {
        required: rack(),
        ..GangSpec::with_roles("lws", vec![role("leader", 1, 4, 4), role("workers", 2, 8, 8)])
    };
    let replica = replica(spec);
    for solver in solvers() {
        let placement = place_by(&cluster, &replica, &solver).expect("fits");
        ran(&placement, &solver);
        assert_eq!(nodes_of(&cluster, &placement, "workers").len(), 2);
        assert_eq!(nodes_of(&cluster, &placement, "leader").len(), 1);
        assert!(placement.region.ends_with("ra"), "{}", placement.region);
        // The leader does not share a host with a worker's full 8 GPUs: three hosts in all.
        assert_eq!(placement.gpus(), 20);
    }
}

#[test]
fn a_leader_without_gpus_is_not_waited_for_and_takes_nothing() {
    // Input 1: a CPU-only leader and two workers of 8 on three free hosts: the workers take
    // two hosts, the third stays free, and the leader is left to kube-scheduler.
    let cluster = h100s(&[("a1", "k", "ra", 0), ("a2", "k", "ra", 0), ("a3", "k", "ra", 0)]);
    let spec = GangSpec::with_roles("lws", vec![role("leader", 1, 0, 1), role("workers", 2, 8, 8)]);
    let replica = replica(spec);
    assert_eq!(replica.total_gpus(), 16);
    for solver in solvers() {
        let mut ledger = Ledger::new(&cluster);
        let mut planner = Planner::new(&cluster, PlannerConfig::default());
        let plan = planner.plan_replicas(&mut ledger, std::slice::from_ref(&replica), &solver);
        assert!(plan.unplaced.is_empty(), "{:?}", plan.unplaced);
        let placed = &plan.replicas[0];
        assert_eq!(placed.gpu_less_roles, ["leader"]);
        assert_eq!(placed.parts.len(), 1);
        assert_eq!(ledger.free_gpus(), 8, "one host stays free");
        assert_eq!(ledger.holding("lws").map(|h| h.len()), Some(2));
    }
}

#[test]
fn the_search_goes_back_when_a_later_slice_finds_no_room() {
    // Slices of 2 x 8 that must share a block (the role's scope) and each stay in a rack.
    // Block k1 has room for the whole role (32 GPUs) but only one rack that holds a slice;
    // it comes first (equally tight, lower index). The second slice finds no rack in k1, so
    // the search goes back and puts both slices in block k2.
    let cluster = h100s(&[
        ("a1", "k1", "ra", 0),
        ("a2", "k1", "ra", 0),
        ("b1", "k1", "rb", 0),
        ("c1", "k1", "rc", 0),
        ("d1", "k2", "rd", 0),
        ("d2", "k2", "rd", 0),
        ("e1", "k2", "re", 0),
        ("e2", "k2", "re", 0),
    ]);
    let workers = RoleSpec {
        required: Some(Scope::Level("block".into())),
        slices: Some(Slicing { members: 2, scope: Scope::Level("rack".into()), exclusive: false }),
        ..role("workers", 4, 8, 8)
    };
    let placement = place(&cluster, &replica(GangSpec::with_roles("job", vec![workers]))).expect("block k2 holds it");
    assert_eq!(nodes_of(&cluster, &placement, "workers"), ["d1", "d2", "e1", "e2"]);
    assert_eq!(placement.steps, 3, "a first slice in k1/ra, no rack for the second, then k2/rd and k2/re");
}

#[test]
fn an_unplaced_replica_names_the_role_that_did_not_fit_and_holds_nothing() {
    let cluster = three_and_two();
    // 3 x 8 prefill and 2 x 8 decode in one rack: rack ra holds prefill, then nothing for decode.
    let spec = GangSpec {
        required: rack(),
        ..GangSpec::with_roles("serve", vec![role("prefill", 3, 8, 8), role("decode", 2, 8, 8)])
    };
    let reason = place(&cluster, &replica(spec.clone())).unwrap_err();
    assert!(reason.contains("no rack has the 40 free GPUs"), "{reason}");

    let spec = GangSpec {
        required: rack(),
        ..GangSpec::with_roles("serve", vec![role("prefill", 2, 8, 8), role("decode", 1, 8, 8)])
    };
    // Rack ra has 24 GPUs free, but 8 of them are halves of two hosts: prefill takes the
    // whole hosts and decode (8 GPUs, TP 8) finds no host; rack rb has only 16.
    let taken = h100s(&[
        ("a1", "k", "ra", 0),
        ("a2", "k", "ra", 0),
        ("a3", "k", "ra", 4),
        ("a4", "k", "ra", 4),
        ("b1", "k", "rb", 0),
        ("b2", "k", "rb", 0),
    ]);
    let replica = replica(spec);
    let reason = place(&taken, &replica).unwrap_err();
    assert!(reason.contains("in rack k/ra, role `decode` did not fit after role `prefill`"), "{reason}");
    // With `explain`, the failing role's explanation comes along: the half-used hosts of the
    // rack, the full ones taken by prefill, and the other rack outside the region.
    let mut explaining = Planner::new(&taken, PlannerConfig { explain: true, ..PlannerConfig::default() });
    let unplaced = explaining.place_replica(&Ledger::new(&taken), &replica, &SolverChoice::Greedy, None).unwrap_err();
    let explanation = unplaced.explanation.expect("explained");
    let outside = explanation.rejected_hosts.iter().find(|g| g.reason == "outside the region searched");
    assert_eq!(outside.map(|g| g.hosts), Some(2), "{explanation:?}");
    let mut ledger = Ledger::new(&taken);
    let plan = Planner::new(&taken, PlannerConfig::default()).plan_replicas(
        &mut ledger,
        std::slice::from_ref(&replica),
        &SolverChoice::Greedy,
    );
    assert_eq!(plan.unplaced.len(), 1);
    assert!(ledger.holding("serve").is_none());
    assert_eq!(ledger.free_gpus(), 40, "nothing held");
    assert_eq!(plan.unplaced[0].gang, "serve");
}

#[test]
fn a_replica_of_one_role_plans_exactly_as_its_gang() {
    let cluster = three_and_two();
    let spec = GangSpec { required: rack(), ..GangSpec::shape("tp8", 2, 8, 8) };
    let replicas = spec.expand_replicas();
    assert!(replicas[0].as_single().is_some());
    let (mut a, mut b) = (Ledger::new(&cluster), Ledger::new(&cluster));
    let mut planner = Planner::new(&cluster, PlannerConfig::default());
    let by_replica = planner.plan_replicas(&mut a, &replicas, &SolverChoice::Greedy);
    let by_gang = planner.plan(&mut b, &spec.expand());
    assert_eq!(by_replica.placements, by_gang.placements);
    assert!(by_replica.replicas.is_empty());
}

const HEADER: &str = "apiVersion: topoplace.io/v1alpha1\nkind: Workload\nmetadata: {name: w}\n";

fn parse(body: &str) -> Result<Workload, String> {
    files::workload::parse("w.yaml", &format!("{HEADER}{body}")).map_err(|e| e.to_string())
}

#[test]
fn roles_and_slices_are_read_from_the_workload_file() {
    let workload = parse(
        "spec:\n  gangs:\n  - name: serve\n    replicas: 2\n    topology: {required: rack}\n    roles:\n    - name: prefill\n      members: 2\n      gpusPerMember: 8\n      tensorParallel: 8\n      minGpuMemory: 60Gi\n    - name: decode\n      gpusPerMember: 4\n      tensorParallel: 4\n      slices: {members: 1, required: rack}\n    - name: router\n      gpusPerMember: 0\n",
    )
    .expect("valid");
    assert!(workload.has_roles());
    assert!(workload.expand().is_empty(), "a gang with roles is not a gang of one shape");
    let replicas = workload.replicas();
    assert_eq!(replicas.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["serve-0", "serve-1"]);
    let serve = &replicas[0];
    assert_eq!(serve.required, rack());
    assert_eq!(serve.roles.len(), 3);
    let prefill = serve.roles[0].gang.as_ref().expect("takes GPUs");
    assert_eq!((prefill.name.as_str(), prefill.members, prefill.memory_floor_mib), ("serve-0/prefill", 2, 60 * 1024));
    assert_eq!(
        serve.roles[1].slices,
        Some(Slicing { members: 1, scope: Scope::Level("rack".into()), exclusive: false })
    );
    assert!(serve.roles[2].gang.is_none(), "the router takes no GPUs");
    assert_eq!(serve.total_gpus(), 20);
}

#[test]
fn bad_roles_name_the_line_the_role_and_the_field() {
    let gang = "spec:\n  gangs:\n  - name: serve\n    roles:\n";
    let cases = [
        // A role of 0 members.
        ("    - name: decode\n      members: 0\n      gpusPerMember: 4\n", "w.yaml:8:", "role `decode`: members must be at least 1"),
        // A slice that does not divide its role.
        (
            "    - name: workers\n      members: 3\n      gpusPerMember: 8\n      slices: {members: 2, required: rack}\n",
            "w.yaml:8:",
            "slices.members 2 must divide the role's 3 members",
        ),
        // A slice that would cut a tensor-parallel group of 2 members.
        (
            "    - name: workers\n      members: 4\n      gpusPerMember: 4\n      tensorParallel: 8\n      slices: {members: 1, required: rack}\n",
            "w.yaml:8:",
            "tensor-parallel group of 2 members",
        ),
        // A role without GPUs that asks for a topology.
        (
            "    - name: router\n      gpusPerMember: 0\n      topology: {required: rack}\n",
            "w.yaml:8:",
            "role `router` takes no GPUs",
        ),
        // The same role twice: the second is named.
        (
            "    - name: w\n      gpusPerMember: 1\n    - name: w\n      gpusPerMember: 2\n",
            "w.yaml:10:",
            "role `w` appears twice",
        ),
        // A role's own shape error names gang/role.
        (
            "    - name: decode\n      gpusPerMember: 4\n      tensorParallel: 3\n",
            "w.yaml:8:",
            "gang `serve/decode`: tensorParallel 3 and gpusPerMember 4",
        ),
        // Only GPU-less roles.
        ("    - name: router\n      gpusPerMember: 0\n", "w.yaml:6:", "no role takes GPUs"),
    ];
    for (roles, at, says) in cases {
        let message = parse(&format!("{gang}{roles}")).unwrap_err();
        assert!(message.starts_with(at) && message.contains(says), "{roles}\n=> {message}");
    }
    // The gang's flat shape and roles together are refused, naming the gang.
    let message = parse(
        "spec:\n  gangs:\n  - name: serve\n    gpusPerMember: 8\n    roles:\n    - name: a\n      gpusPerMember: 8\n",
    )
    .unwrap_err();
    assert!(message.contains("gang `serve`: with roles, members, gpusPerMember"), "{message}");
    // An unknown field of a role is named.
    let message = parse(&format!("{gang}    - name: a\n      gpusPerMember: 8\n      tp: 8\n")).unwrap_err();
    assert!(message.contains("unknown field `tp`"), "{message}");
}

#[test]
fn a_slice_wider_than_its_role_is_an_input_error() {
    let cluster = three_and_two();
    let workers = RoleSpec {
        required: rack(),
        slices: Some(Slicing { members: 1, scope: Scope::Level("block".into()), exclusive: false }),
        ..role("workers", 2, 8, 8)
    };
    let replica = replica(GangSpec::with_roles("job", vec![workers]));
    let mut planner = Planner::new(&cluster, PlannerConfig::default());
    let error = planner.check_replica(&replica).unwrap_err().to_string();
    assert!(error.contains("slices.required `block` is wider than the role's own topology.required `rack`"), "{error}");
    let reason = planner.place_replica(&Ledger::new(&cluster), &replica, &SolverChoice::Greedy, None).unwrap_err();
    assert!(reason.reason.contains("is wider than"), "{}", reason.reason);
}

#[test]
fn a_replica_of_more_parts_than_the_search_can_try_is_refused() {
    let many = RoleSpec {
        slices: Some(Slicing { members: 1, scope: Scope::Host, exclusive: false }),
        ..role("workers", 300, 1, 1)
    };
    let error = GangSpec::with_roles("wide", vec![many]).validate().unwrap_err().to_string();
    assert!(error.contains("300 roles and slices, above the limit of 256"), "{error}");
}

#[test]
fn an_unknown_slice_scope_is_an_input_error_naming_the_role() {
    let cluster = three_and_two();
    let workers = RoleSpec {
        slices: Some(Slicing { members: 1, scope: Scope::Level("row".into()), exclusive: false }),
        ..role("workers", 2, 8, 8)
    };
    let replica = replica(GangSpec::with_roles("job", vec![workers]));
    let error = Planner::new(&cluster, PlannerConfig::default()).check_replica(&replica).unwrap_err().to_string();
    assert!(error.contains("gang `job/workers`: slices.required is `row`"), "{error}");
}

#[test]
fn the_first_slice_goes_where_the_whole_role_has_room() {
    // A role of four one-host slices that must share a rack: rack ra has the tightest free
    // hosts but only three of them, rack rb has four. The first slice must not settle in ra.
    let cluster = h100s(&[
        ("a1", "k", "ra", 0),
        ("a2", "k", "ra", 0),
        ("a3", "k", "ra", 0),
        ("b1", "k", "rb", 0),
        ("b2", "k", "rb", 0),
        ("b3", "k", "rb", 0),
        ("b4", "k", "rb", 0),
    ]);
    let workers = RoleSpec {
        required: rack(),
        slices: Some(Slicing { members: 1, scope: Scope::Host, exclusive: false }),
        ..role("workers", 4, 8, 8)
    };
    let placement = place(&cluster, &replica(GangSpec::with_roles("job", vec![workers]))).expect("rack rb holds it");
    assert_eq!(nodes_of(&cluster, &placement, "workers"), ["b1", "b2", "b3", "b4"]);
}

#[test]
fn the_first_slice_tries_another_gpu_product_when_the_rest_find_none() {
    // One rack: an H100 host (the tighter memory class, the planner's first choice for a
    // slice) and two H200 hosts. Slices of one host each must share the product, so the
    // role takes the two H200s.
    let text = "apiVersion: topoplace.io/v1alpha1\nkind: Cluster\nmetadata: {name: t}\nspec:\n  levels: [rack]\n  nodes:\n  - name: h100\n    labels: {rack: r}\n    gpu: {product: H100, count: 8}\n  - name: h200-a\n    labels: {rack: r}\n    gpu: {product: H200, count: 8}\n  - name: h200-b\n    labels: {rack: r}\n    gpu: {product: H200, count: 8}\n";
    let cluster = files::cluster::load("inline.yaml", text).expect("valid");
    let workers = RoleSpec {
        slices: Some(Slicing { members: 1, scope: Scope::Host, exclusive: false }),
        ..role("workers", 2, 8, 8)
    };
    let placement = place(&cluster, &replica(GangSpec::with_roles("job", vec![workers]))).expect("the H200s hold it");
    assert_eq!(nodes_of(&cluster, &placement, "workers"), ["h200-a", "h200-b"]);
    // Without slices the role is one gang, which never mixes products either.
    let whole = place(&cluster, &replica(GangSpec::with_roles("job", vec![role("workers", 2, 8, 8)]))).expect("fits");
    assert_eq!(nodes_of(&cluster, &whole, "workers"), ["h200-a", "h200-b"]);
}

#[test]
fn a_role_goes_to_another_gpu_product_when_a_later_role_needs_the_first() {
    // Found in a trial: a rack of a half-used H200 and a half-used H100, and an L40S
    // elsewhere. Role `a` (4 GPUs, TP 4) is the planner's to place first; role `b` (4 x 1
    // GPU) needs 100 GiB per GPU, which only the H200 has. `a` must therefore take the H100.
    // The search used to take the planner's one choice for `a` (the H200) and then report
    // that no region holds every role.
    let text = "apiVersion: topoplace.io/v1alpha1\nkind: Cluster\nmetadata: {name: c5}\nspec:\n  levels: [leaf]\n  nodes:\n  - name: h200-a\n    labels: {leaf: r1}\n    gpu: {product: H200, count: 8}\n    allocated: [0,1,2,3]\n  - name: h100-a\n    labels: {leaf: r1}\n    gpu: {product: H100-SXM5, count: 8}\n    allocated: [0,1,2,3]\n  - name: l40s-a\n    labels: {leaf: r2}\n    gpu: {product: L40S, count: 4}\n";
    let cluster = files::cluster::load("inline.yaml", text).expect("valid");
    let b = RoleSpec { memory: MemoryNeed::FloorMib(100 * 1024), ..role("b", 4, 1, 1) };
    let spec = GangSpec {
        required: Some(Scope::Level("leaf".into())),
        ..GangSpec::with_roles("trap", vec![role("a", 1, 4, 4), b])
    };
    let replica = replica(spec);
    for solver in solvers() {
        let placement = place_by(&cluster, &replica, &solver).expect("a on the H100, b on the H200");
        ran(&placement, &solver);
        // The search went back: `a` on the H200 (the planner's choice), `b` nowhere, then
        // `a` on the H100 and `b` on the H200.
        assert_eq!(placement.steps, 4, "{placement:?}");
        assert_eq!(nodes_of(&cluster, &placement, "a"), ["h100-a"], "{placement:?}");
        assert_eq!(nodes_of(&cluster, &placement, "b"), ["h200-a"], "{placement:?}");
    }
}

#[test]
fn a_replica_built_directly_is_checked_before_it_is_searched() {
    let cluster = three_and_two();
    let good = replica(GangSpec::with_roles("job", vec![role("workers", 2, 8, 8)]));
    let mut planner = Planner::new(&cluster, PlannerConfig::default());
    let ledger = Ledger::new(&cluster);
    let cases: Vec<(Replica, &str)> = vec![
        {
            let mut bad = good.clone();
            bad.roles[0].slices = Some(Slicing { members: 0, scope: Scope::Host, exclusive: false });
            (bad, "slices.members 0 must divide")
        },
        {
            let mut bad = good.clone();
            bad.roles[0].slices = Some(Slicing { members: 1, scope: Scope::Host, exclusive: false });
            if let Some(gang) = bad.roles[0].gang.as_mut() {
                gang.required = Some(Scope::Host);
            }
            (bad, "role `workers` has slices, so its own topology.required must be a level")
        },
        {
            let mut bad = good.clone();
            if let Some(gang) = bad.roles[0].gang.as_mut() {
                gang.gpus_per_member = 0;
            }
            (bad, "gpusPerMember and tensorParallel must be at least 1")
        },
        {
            let mut bad = good.clone();
            bad.roles[0].members = 3;
            (bad, "the role counts 3 members, its gang 2")
        },
    ];
    for (bad, says) in cases {
        let reason = planner.place_replica(&ledger, &bad, &SolverChoice::Greedy, None).unwrap_err().reason;
        assert!(reason.contains(says), "{says}\n=> {reason}");
    }
    // In a batch, the bad one is unplaced with its reason and the rest are planned.
    let mut bad = good.clone();
    bad.name = "bad".into();
    if let Some(gang) = bad.roles[0].gang.as_mut() {
        gang.gpus_per_member = 0;
    }
    let mut ledger = Ledger::new(&cluster);
    let plan = planner.plan_replicas(&mut ledger, &[bad, good], &SolverChoice::Greedy);
    assert_eq!(plan.unplaced.iter().map(|u| u.gang.as_str()).collect::<Vec<_>>(), ["bad"]);
    assert_eq!(plan.replicas.len(), 1, "a replica of one role is still a replica with roles");
    assert!(ledger.holding("bad").is_none() && ledger.holding("job").is_some());
}

#[test]
fn role_names_and_empty_role_lists_are_refused() {
    let gang = "spec:\n  gangs:\n  - name: serve\n";
    for (roles, says) in [
        ("    roles: []\n", "gang `serve`: roles must list at least one role"),
        ("    roles:\n    - name: Pre/fill\n      gpusPerMember: 8\n", "role name `Pre/fill` must be a DNS label"),
        (
            "    roles:\n    - name: w\n      gpusPerMember: 8\n      topology: {required: host}\n      slices: {members: 1, required: host}\n",
            "role `w` has slices, so its own topology.required must be a level",
        ),
    ] {
        let message = parse(&format!("{gang}{roles}")).unwrap_err();
        assert!(message.contains(says), "{roles}\n=> {message}");
    }
}
