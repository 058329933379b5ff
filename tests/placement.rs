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
fn tensor_parallelism_needs_nvlink() {
    let cluster = cluster_file("mixed-memory.yaml");
    let mut tp2 = gang("tp2", 1, 2, 2);
    tp2.memory_floor_mib = 42 * 1024;
    // L40S is the best memory fit but has no NVLink: the TP-2 group goes elsewhere.
    let placement = place(&cluster, &tp2).expect("fits");
    assert_ne!(placement.product.get().name, "L40S");
    let mut planner = Planner::new(&cluster, PlannerConfig { explain: true, ..Default::default() });
    let explained = planner.place(&Ledger::new(&cluster), &tp2).expect("fits").explanation.expect("explained");
    assert!(
        explained.rejected_hosts.iter().any(|g| g.reason.starts_with("L40S: no NVLink") && g.hosts == 2),
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
