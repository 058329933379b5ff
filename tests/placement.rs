//! Scenario tests of the placement engine: one per scoring rule and constraint, on the
//! clusters in `testdata/clusters/` or small inline ones. They live here, above the engine,
//! because they read the clusters through the YAML format of `topoplace-formats`.

use topoplace_engine::ledger::Ledger;
use topoplace_engine::placement::*;
use topoplace_engine::topology::graph::nvlink_connected;
use topoplace_engine::topology::{Cluster, HostId};
use topoplace_engine::workload::{Gang, GangSpec, Scope};
use topoplace_formats::files;

fn cluster_file(name: &str) -> Cluster {
    let path = format!("{}/testdata/clusters/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).expect("testdata cluster");
    files::cluster::load(&path, &text).expect("valid testdata cluster")
}

fn inline_cluster(body: &str) -> Cluster {
    let text = format!("apiVersion: topoplace.io/v1alpha1\nkind: Cluster\nmetadata: {{name: t}}\n{body}");
    files::cluster::load("inline.yaml", &text).expect("valid inline cluster")
}

fn gang(name: &str, members: u32, gpus: u32, tp: u32) -> Gang {
    GangSpec::shape(name, members, gpus, tp).expand().remove(0)
}

fn nodes_of(cluster: &Cluster, placement: &GangPlacement) -> Vec<String> {
    let mut nodes: Vec<String> = placement.members.iter().map(|m| cluster.host(m.host).name.clone()).collect();
    nodes.dedup();
    nodes
}

fn place(cluster: &Cluster, gang: &Gang) -> Result<GangPlacement, Unplaced> {
    let ledger = Ledger::new(cluster);
    Planner::new(cluster, PlannerConfig::default()).place(&ledger, gang)
}

#[test]
fn tp4_on_a_cube_mesh_host_takes_the_nvlinked_quad() {
    let cluster = inline_cluster(
        "spec:\n  nodes:\n  - name: dgx1\n    gpu: {product: V100-SXM2-16GB, count: 8}\n    allocated: [1]\n",
    );
    let placement = place(&cluster, &gang("tp4", 1, 4, 4)).expect("fits");
    assert_eq!(placement.members[0].gpus, 0xf0, "GPU 1 is taken, so 4-7 is the only fully linked quad");

    // On the busy DGX-1 of the testdata (0 and 5 taken) no quad is fully linked; the
    // engine still finds an NVLink-connected TP-4 group and says what it costs.
    let cluster = cluster_file("dgx1-v100.yaml");
    let mut ledger = Ledger::new(&cluster);
    let busy = cluster.host_id("dgx1-busy").expect("host");
    for host in 0..cluster.hosts.len() as HostId {
        if host != busy {
            ledger.reserve(&format!("filler-{host}"), &[(host, 0xff)]).expect("free");
        }
    }
    let mut planner = Planner::new(&cluster, PlannerConfig::default());
    let placement = planner.place(&ledger, &gang("tp4", 1, 4, 4)).expect("fits");
    let gpus = placement.members[0].gpus;
    assert_eq!(gpus & 0b0010_0001, 0);
    assert!(nvlink_connected(&cluster.host(busy).links, gpus), "{gpus:#b}");
    assert!(placement.score.connectivity < 0.75, "{:?}", placement.score);
}

#[test]
fn a_40gb_model_goes_to_l40s_not_h200() {
    let cluster = cluster_file("mixed-memory.yaml");
    let mut model = gang("m40", 1, 1, 1);
    model.memory_floor_mib = 42 * 1024;
    let placement = place(&cluster, &model).expect("fits");
    assert_eq!(placement.product.get().name, "L40S");
    assert_eq!(placement.runner_up.as_ref().map(|r| r.product.as_str()), Some("H100-SXM5"));
    // An 80 GB-class floor skips everything below it and takes the smallest that holds it.
    model.memory_floor_mib = 90 * 1024;
    assert_eq!(place(&cluster, &model).expect("fits").product.get().name, "H200");
    model.memory_floor_mib = 70 * 1024;
    assert_eq!(place(&cluster, &model).expect("fits").product.get().name, "H100-SXM5");
}

#[test]
fn a_4gpu_pod_goes_to_the_half_used_host_and_keeps_the_empty_host_whole() {
    let cluster = inline_cluster(
        "spec:\n  levels: [rack]\n  nodes:\n  - name: empty\n    labels: {rack: r1}\n    gpu: {product: H100, count: 8}\n  - name: half\n    labels: {rack: r1}\n    gpu: {product: H100, count: 8}\n    allocated: [0, 1, 2, 3]\n",
    );
    let placement = place(&cluster, &gang("pod4", 1, 4, 1)).expect("fits");
    assert_eq!(nodes_of(&cluster, &placement), ["half"]);
    assert_eq!(placement.members[0].gpus, 0xf0);
    let runner = placement.runner_up.expect("the empty host was a candidate");
    assert!(runner.score.fragmentation < placement.score.fragmentation);
}

#[test]
fn a_two_host_gang_with_required_rack_lands_in_one_rack_or_not_at_all() {
    let body = |r2_allocated: &str| {
        format!(
            "spec:\n  levels: [spine, rack]\n  nodes:\n  - name: a1\n    labels: {{spine: s, rack: r1}}\n    gpu: {{product: H100, count: 8}}\n  - name: a2\n    labels: {{spine: s, rack: r1}}\n    gpu: {{product: H100, count: 8}}\n    allocated: [0]\n  - name: b1\n    labels: {{spine: s, rack: r2}}\n    gpu: {{product: H100, count: 8}}\n  - name: b2\n    labels: {{spine: s, rack: r2}}\n    gpu: {{product: H100, count: 8}}\n{r2_allocated}"
        )
    };
    let mut gang = gang("two-hosts", 2, 8, 8);
    gang.required = Some(Scope::Level("rack".into()));

    let cluster = inline_cluster(&body(""));
    let placement = place(&cluster, &gang).expect("rack r2 has two free hosts");
    assert_eq!(nodes_of(&cluster, &placement), ["b1", "b2"]);
    assert_eq!(placement.scope, "rack s/r2");

    // With one GPU used in r2 as well, each rack has one free host: two racks could hold
    // the gang together, but the requirement says one rack, so nothing is placed.
    let cluster = inline_cluster(&body("    allocated: [3]\n"));
    let unplaced = place(&cluster, &gang).expect_err("no rack holds it");
    assert!(unplaced.reason.contains("inside one rack"), "{}", unplaced.reason);
    assert!(unplaced.reason.contains("holds 1"), "{}", unplaced.reason);

    // Without the requirement it spans the spine, and locality says so.
    gang.required = None;
    let placement = place(&cluster, &gang).expect("spans racks");
    assert_eq!(placement.scope, "spine s");
    assert!(placement.score.locality < 0.9);
}

#[test]
fn tensor_parallel_groups_larger_than_a_tray_stay_in_one_nvl72_clique() {
    let cluster = cluster_file("gb200-nvl72.yaml");
    // TP 8 over two 4-GPU members: one tensor-parallel group across two trays.
    let placement = place(&cluster, &gang("tp8", 2, 4, 8)).expect("fits");
    let cliques: Vec<_> = placement.members.iter().map(|m| cluster.host(m.host).clique).collect();
    assert!(cliques[0].is_some() && cliques.iter().all(|c| *c == cliques[0]));
    assert!(placement.scope.starts_with("nvlink clique"), "{}", placement.scope);

    // TP 8 on hosts of 8 GPUs without a clique is fine inside a host; on 4-GPU hosts
    // without a clique it is impossible and says why.
    let cluster = inline_cluster("spec:\n  nodes:\n  - name: l4\n    gpu: {product: H100, count: 4}\n  - name: l5\n    gpu: {product: H100, count: 4}\n");
    let unplaced = place(&cluster, &gang("tp8", 2, 4, 8)).expect_err("no clique");
    assert!(unplaced.reason.contains("no NVLink clique"), "{}", unplaced.reason);
}

/// Found by the property tests: a GB200 clique whose trays are not all in one rack (one tray
/// without rack labels is a domain of its own). A TP-8 pair with `required: rack` fits on the
/// two trays of rack r1, and capacity said one replica; the planner placed none, because the
/// rack's only way to hold it was a pool of the clique, counted as if one host held it.
#[test]
fn a_clique_reaching_past_the_required_rack_is_used_inside_the_rack() {
    let cluster = inline_cluster(
        "spec:\n  levels: [spine, rack]\n  nodes:\n  - name: t1\n    labels: {spine: s1, rack: r1}\n    gpu: {product: NVIDIA-GB200, count: 4, clique: c1}\n  - name: t2\n    labels: {spine: s1, rack: r1}\n    gpu: {product: NVIDIA-GB200, count: 4, clique: c1}\n  - name: t3\n    gpu: {product: NVIDIA-GB200, count: 4, clique: c1}\n",
    );
    let mut pair = gang("tp8", 2, 4, 8);
    pair.required = Some(Scope::Level("rack".into()));
    let placement = place(&cluster, &pair).expect("the two trays of rack r1 hold it");
    assert_eq!(nodes_of(&cluster, &placement), ["t1", "t2"]);
    let ledger = Ledger::new(&cluster);
    let capacity =
        Planner::new(&cluster, PlannerConfig::default()).capacity(&ledger, &pair, None, None).expect("capacity");
    assert_eq!(capacity.replicas, 1, "capacity and placement agree");
}

#[test]
fn tensor_parallelism_prefers_nvlink_and_requires_it_only_when_asked() {
    let cluster = cluster_file("mixed-memory.yaml");
    let mut tp2 = gang("tp2", 1, 2, 2);
    tp2.memory_floor_mib = 42 * 1024;
    // L40S is the best memory fit and has no NVLink: the TP-2 group runs over PCIe on one
    // socket, and the NVLinked H100 is the runner-up, ahead on connectivity.
    let mut planner = Planner::new(&cluster, PlannerConfig { explain: true, ..Default::default() });
    let placement = planner.place(&Ledger::new(&cluster), &tp2).expect("fits");
    assert_eq!(placement.product.get().name, "L40S");
    let host = cluster.host(placement.members[0].host);
    assert!(host.links.numa_masks.iter().any(|&socket| placement.members[0].gpus & !socket == 0), "one socket");
    let runner_up = placement.runner_up.as_ref().expect("runner-up");
    assert_eq!(runner_up.product, "H100-SXM5");
    assert!(runner_up.score.connectivity > placement.score.connectivity, "{runner_up:?} {:?}", placement.score);
    // Asked for NVLink, the L40S hosts are refused and say why.
    tp2.required = Some(Scope::Nvlink);
    let placement = planner.place(&Ledger::new(&cluster), &tp2).expect("fits");
    assert_eq!(placement.product.get().name, "H100-SXM5");
    let explained = placement.explanation.expect("explained");
    assert!(
        explained.rejected_hosts.iter().any(|g| g.reason.starts_with("L40S: NVLink cannot connect")
            && g.reason.ends_with("requires nvlink")
            && g.hosts == 2),
        "{explained:?}"
    );
}

#[test]
fn preferred_scope_is_scored_not_required() {
    let cluster = inline_cluster(
        "spec:\n  levels: [rack]\n  nodes:\n  - name: a\n    labels: {rack: r1}\n    gpu: {product: H100, count: 8}\n    allocated: [0,1,2,3,4,5]\n  - name: b\n    labels: {rack: r1}\n    gpu: {product: H100, count: 8}\n    allocated: [0,1,2,3,4,5]\n",
    );
    let mut spread = gang("spread", 2, 2, 1);
    spread.preferred = Some(Scope::Host);
    let placement = place(&cluster, &spread).expect("two hosts of one rack");
    assert_eq!(nodes_of(&cluster, &placement).len(), 2);
    assert!(placement.score.locality < 0.5, "the missed preference halves locality: {:?}", placement.score);
}

#[test]
fn unknown_levels_are_input_errors() {
    let cluster = cluster_file("demo.yaml");
    let mut bad = gang("bad", 1, 1, 1);
    bad.required = Some(Scope::Level("row".into()));
    let planner = Planner::new(&cluster, PlannerConfig::default());
    let error = planner.check_gang(&bad).unwrap_err().to_string();
    assert!(
        error.contains("topology.required is `row`") && error.contains("network.topology.nvidia.com/leaf"),
        "{error}"
    );
}

#[test]
fn a_batch_places_the_biggest_gang_first_and_explains_the_rest() {
    let cluster = inline_cluster(
        "spec:\n  levels: [rack]\n  nodeGroups:\n  - namePattern: \"h{index}\"\n    count: 2\n    labels: {rack: r1}\n    gpu: {product: H100, count: 8}\n",
    );
    // In file order the small gangs would take a GPU of each host and strand the 16-GPU gang.
    let gangs = vec![gang("small-a", 1, 1, 1), gang("small-b", 1, 1, 1), gang("big", 2, 8, 8)];
    let mut ledger = Ledger::new(&cluster);
    let plan = Planner::new(&cluster, PlannerConfig::default()).plan(&mut ledger, &gangs);
    assert_eq!(plan.placements.first().map(|p| p.gang.as_str()), Some("big"));
    assert_eq!(plan.unplaced.len(), 2);
    assert!(plan.unplaced.iter().all(|u| u.reason.contains("no host has room")), "{:?}", plan.unplaced);
    assert!(ledger.holding("small-a").is_none());
    ledger.check().expect("ledger invariants");
}

#[test]
fn planning_is_deterministic() {
    let cluster = cluster_file("demo.yaml");
    let workload = files::workload::parse("w", topoplace::cli::DEMO_WORKLOAD).expect("demo workload");
    let gangs = workload.expand();
    let run = || {
        let mut ledger = Ledger::new(&cluster);
        let plan = Planner::new(&cluster, PlannerConfig { shapes: shapes_for(&gangs), ..Default::default() })
            .plan(&mut ledger, &gangs);
        plan.placements.iter().map(|p| (p.gang.clone(), p.members.clone())).collect::<Vec<_>>()
    };
    assert_eq!(run(), run());
}

/// A cluster of 8-GPU H100 hosts in racks: `(name, rack, GPUs allocated)`.
fn racked(hosts: &[(&str, &str, u32)]) -> Cluster {
    let mut body = String::from("spec:\n  levels: [rack]\n  nodes:\n");
    for (name, rack, used) in hosts {
        let allocated: Vec<String> = (0..*used).map(|g| g.to_string()).collect();
        body.push_str(&format!(
            "  - name: {name}\n    labels: {{rack: {rack}}}\n    gpu: {{product: H100, count: 8}}\n    allocated: [{}]\n",
            allocated.join(", ")
        ));
    }
    inline_cluster(&body)
}

#[test]
fn equal_scores_go_to_the_fullest_host_not_the_lowest_index() {
    // The reported input: four 8-GPU hosts with 5, 2, 7 and 8 free GPUs. The three partly used
    // hosts score the same for a 1-GPU pod; the host with 2 free is the best fit. Every
    // order of the same hosts gives the same answer.
    let free = [5u32, 2, 7, 8];
    let orders = [[0, 1, 2, 3], [1, 0, 2, 3], [3, 2, 1, 0], [2, 3, 0, 1], [0, 2, 3, 1]];
    for order in orders {
        let hosts: Vec<(String, u32)> = order.iter().map(|&i| (format!("free{}", free[i]), 8 - free[i])).collect();
        let spec: Vec<(&str, &str, u32)> = hosts.iter().map(|(n, used)| (n.as_str(), "r1", *used)).collect();
        let cluster = racked(&spec);
        let placement = place(&cluster, &gang("pod1", 1, 1, 1)).expect("fits");
        assert_eq!(nodes_of(&cluster, &placement), ["free2"], "order {order:?}");
        let runner = placement.runner_up.expect("other hosts were candidates");
        assert!(
            (runner.score.total - placement.score.total).abs() < 1e-9,
            "the runner-up ties on score: the pack decided"
        );
    }
}

#[test]
fn equal_hosts_go_to_the_rack_with_fewer_empty_hosts() {
    // Two hosts with 2 free GPUs, one in a rack of three empty hosts, one in a rack of one
    // empty host and three with 7 free: the pod goes to the rack with fewer empty hosts,
    // whichever comes first, so the other keeps room for a multi-host replica (though the
    // second rack has more free GPUs in all, 31 against 26).
    for (first, second) in [("ra", "rb"), ("rb", "ra")] {
        let cluster = racked(&[
            ("a-part", first, 6),
            ("a-e1", first, 0),
            ("a-e2", first, 0),
            ("a-e3", first, 0),
            ("b-part", second, 6),
            ("b-e1", second, 0),
            ("b-7a", second, 1),
            ("b-7b", second, 1),
            ("b-7c", second, 1),
        ]);
        let placement = place(&cluster, &gang("pod1", 1, 1, 1)).expect("fits");
        assert_eq!(nodes_of(&cluster, &placement), ["b-part"], "racks {first}, {second}");
    }
}

#[test]
fn a_two_gpu_gang_spread_over_racks_fills_the_fuller_rack() {
    // Six 2-GPU pods, more than any host holds alone: both racks hold them, and the gang
    // goes to the rack whose hosts are all partly used, leaving the empty hosts whole.
    for (first, second) in [("ra", "rb"), ("rb", "ra")] {
        let mut spec: Vec<(String, &str, u32)> = Vec::new();
        for i in 0..4 {
            spec.push((format!("full-{i}"), first, 4));
        }
        for i in 0..4 {
            spec.push((format!("mixed-{i}"), second, if i < 2 { 4 } else { 0 }));
        }
        let hosts: Vec<(&str, &str, u32)> = spec.iter().map(|(n, r, u)| (n.as_str(), *r, *u)).collect();
        let cluster = racked(&hosts);
        let placement = place(&cluster, &gang("pods", 6, 2, 1)).expect("fits");
        let nodes = nodes_of(&cluster, &placement);
        assert!(nodes.iter().all(|n| n.starts_with("full-")), "racks {first}, {second}: {nodes:?}");
    }
}

proptest::proptest! {
    /// For a gang one host holds, `place` picks the host `score_hosts` ranks first: the top
    /// total, then the tightest pack, then the lowest index.
    #[test]
    fn place_picks_the_best_scored_then_tightest_host(
        used in proptest::collection::vec(0u32..=8, 3..10),
        racks in proptest::collection::vec(0u8..3, 10),
        gpus in proptest::sample::select(vec![1u32, 2, 4]),
    ) {
        let names: Vec<String> = (0..used.len()).map(|i| format!("h{i}")).collect();
        let rack_names = ["r0", "r1", "r2"];
        let spec: Vec<(&str, &str, u32)> =
            used.iter().enumerate().map(|(i, &u)| (names[i].as_str(), rack_names[racks[i] as usize], u)).collect();
        let cluster = racked(&spec);
        let ledger = Ledger::new(&cluster);
        let pod = gang("pod", 1, gpus, 1);
        let mut planner = Planner::new(&cluster, PlannerConfig::default());
        let hosts: Vec<HostId> = (0..cluster.hosts.len() as HostId).collect();
        let verdicts = planner.score_hosts(&ledger, &pod, &hosts);
        let mut best: Option<(f64, PackKey, HostId)> = None;
        for (&host, verdict) in hosts.iter().zip(&verdicts) {
            if let HostVerdict::Fits { score, pack, .. } = verdict {
                if best.is_none_or(|(total, best_pack, _)| beats(score.total, *pack, (total, best_pack))) {
                    best = Some((score.total, *pack, host));
                }
            }
        }
        let placed = planner.place(&ledger, &pod);
        match best {
            None => proptest::prop_assert!(placed.is_err()),
            Some((total, pack, _)) => {
                let placement = placed.expect("a host fits");
                let host = placement.members[0].host;
                proptest::prop_assert!((placement.score.total - total).abs() < 1e-9);
                let Some(HostVerdict::Fits { pack: chosen_pack, .. }) = verdicts.get(host as usize) else {
                    return Err(proptest::test_runner::TestCaseError::fail("placed on a host that does not fit"));
                };
                proptest::prop_assert_eq!(*chosen_pack, pack, "placed on {}", cluster.host(host).name);
            }
        }
    }
}

#[test]
fn shapes_keep_their_weight_only_while_scarce_for_the_gangs_waiting() {
    // Three racks of 8-GPU hosts: one empty host, and twelve hosts with 6 used (2 free).
    let mut spec: Vec<(String, &str, u32)> = vec![("empty".into(), "r0", 0)];
    for i in 0..12 {
        spec.push((format!("part-{i}"), ["r0", "r1", "r2"][i % 3], 6));
    }
    let hosts: Vec<(&str, &str, u32)> = spec.iter().map(|(n, r, u)| (n.as_str(), *r, *u)).collect();
    let cluster = racked(&hosts);
    let ledger = Ledger::new(&cluster);
    let mut planner = Planner::new(&cluster, PlannerConfig::default());
    let two = DemandKey::of(&gang("two", 1, 2, 2));
    let eight = DemandKey::of(&gang("eight", 1, 8, 8));
    let sixteen = DemandKey::of(&gang("sixteen", 2, 8, 8));
    assert_eq!(planner.free_slots(&ledger, FreeShape::Units(two.unit)), 12 + 4);
    assert_eq!(planner.free_slots(&ledger, FreeShape::Units(eight.unit)), 1);
    assert_eq!(planner.free_slots(&ledger, FreeShape::WholeHost), 1);
    assert_eq!(planner.free_slots(&ledger, FreeShape::RackRoom { hosts: 2 }), 0);
    let shapes = vec![
        WeightedShape { shape: FreeShape::Units(two.unit), weight: 1.0 },
        WeightedShape { shape: FreeShape::Units(eight.unit), weight: 1.0 },
        WeightedShape { shape: FreeShape::RackRoom { hosts: 2 }, weight: 1.0 },
        WeightedShape { shape: FreeShape::WholeHost, weight: 1.0 },
    ];
    let weighed = planner.weigh_by_scarcity(&ledger, shapes.clone(), &[two, two, eight, eight, sixteen]);
    let weights: Vec<f64> = weighed.iter().map(|s| s.weight).collect();
    // 2 of 16 two-GPU slots asked; 2 eight-GPU slots asked of 1; one rack room of none; whole
    // hosts: the 16-GPU gang asks 2 of 1. What the 2-GPU slots lose goes to single GPUs, a
    // shape that always scores 1, so it counts for less in the weighted mean.
    assert_eq!(weights, [2.0 / 16.0, 1.0, 1.0, 1.0, 14.0 / 16.0]);
    assert_eq!(planner.weigh_by_scarcity(&ledger, shapes.clone(), &[]), shapes, "nothing waiting: unscaled");
    let weighed = planner.weigh_by_scarcity(&ledger, shapes, &[two]);
    let weights: Vec<f64> = weighed.iter().map(|s| s.weight).collect();
    assert_eq!(
        weights,
        [1.0 / 16.0, 0.0, 0.0, 0.0, 3.0 - 1.0 / 16.0 + 1.0],
        "shapes nobody waiting asks for weigh nothing"
    );

    // The effect on a score: a 1-GPU pod on a host with 2 free breaks a 2-GPU slot. With the
    // full weights that costs fragmentation; with a plentiful 2-GPU supply almost nothing.
    let pod = gang("pod", 1, 1, 1);
    let part = cluster.host_id("part-0").expect("host");
    let fragmentation = |planner: &mut Planner, shapes: Vec<WeightedShape>| {
        planner.set_shapes(shapes);
        match planner.score_hosts(&ledger, &pod, &[part]).remove(0) {
            HostVerdict::Fits { score, .. } => score.fragmentation,
            HostVerdict::Rejected { text, .. } => panic!("part-0 fits: {text}"),
        }
    };
    let full = fragmentation(&mut planner, vec![WeightedShape { shape: FreeShape::Units(two.unit), weight: 1.0 }]);
    let scaled = fragmentation(&mut planner, weighed);
    assert!((full - 0.5).abs() < 1e-9, "a 2-GPU slot broken for one GPU used: {full}");
    assert!(scaled > 0.99, "scarcity took the 2-GPU slot's weight off: {scaled}");
}
