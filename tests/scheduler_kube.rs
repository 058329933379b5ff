//! `topoplace scheduler` against the in-process fake API server: pending pods watched through
//! the `spec.schedulerName=topoplace,spec.nodeName=` field selector, single pods against
//! taints, selectors, affinity and resources, gangs arriving in any order or incomplete, a
//! coscheduling PodGroup, a failing Binding undone, a watch dropped mid-gang, two gangs
//! competing for one gang's capacity, and a leader failing over in the middle of a gang.
//! After each, the API's final state is asserted: no half-bound gang, no GPU given twice.

mod support;

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};
use support::{eventually, free_gpus, scheduler_pod, serve_router, FakeApi, Replica, Running};
use topoplace_online::scheduler::SchedulerConfig;

const H100: &str = "NVIDIA-H100-80GB-HBM3";

fn test_config() -> SchedulerConfig {
    SchedulerConfig {
        gang_wait_timeout_ms: 1_000,
        backoff_initial_ms: 100,
        backoff_max_ms: 500,
        starvation_ms: 60_000,
        repair_grace_ms: 500,
        preemption: Default::default(),
    }
}

/// A GPU node as GPU Feature Discovery labels it; `edit` adds taints, conditions and such.
fn gpu_node(name: &str, rack: &str, edit: impl FnOnce(&mut Value)) -> Value {
    let mut node = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "uid": format!("node-{name}"), "labels": {
            "kubernetes.io/hostname": name,
            "nvidia.com/gpu.product": H100,
            "nvidia.com/gpu.count": "8",
            "network.topology.nvidia.com/spine": "s1",
            "network.topology.nvidia.com/leaf": rack,
        }},
        "spec": {},
        "status": {"allocatable": {"nvidia.com/gpu": "8", "cpu": "96", "memory": "1Ti", "pods": "110"},
                   "conditions": [{"type": "Ready", "status": "True"}]}
    });
    edit(&mut node);
    node
}

async fn api_with(nodes: Vec<Value>) -> (FakeApi, Running) {
    let api = FakeApi::new();
    for node in nodes {
        api.put_node(node);
    }
    let server = serve_router(api.router()).await;
    (api, server)
}

fn rack_nodes(racks: &[&str], per_rack: usize) -> Vec<Value> {
    racks.iter().flat_map(|rack| (0..per_rack).map(move |i| gpu_node(&format!("{rack}-{i}"), rack, |_| {}))).collect()
}

/// The end of a test: the replica's and the book's invariants, the API's final state.
async fn finish(api: &FakeApi, replica: Replica, server: Option<Running>) {
    replica.runtime.check().expect("scheduler invariants");
    replica.ext.check().expect("book invariants");
    assert_consistent(api);
    replica.kill();
    if let Some(server) = server {
        server.stop().await;
    }
}

fn condition(pod: &Value) -> Option<(String, String, String)> {
    pod["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == "PodScheduled").map(|c| {
        (
            c["status"].as_str().unwrap_or_default().to_string(),
            c["reason"].as_str().unwrap_or_default().to_string(),
            c["message"].as_str().unwrap_or_default().to_string(),
        )
    })
}

fn events_for(api: &FakeApi, pod: &str, reason: &str) -> Vec<String> {
    api.events()
        .iter()
        .filter(|e| e["involvedObject"]["name"] == pod && e["reason"] == reason)
        .map(|e| e["message"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// The API's final state: no GPU of a node given twice, every gang bound whole or not at all.
fn assert_consistent(api: &FakeApi) {
    let mut given = BTreeSet::new();
    let mut gangs: BTreeMap<String, (usize, usize, usize)> = BTreeMap::new();
    for pod in api.pods() {
        let bound = pod["spec"]["nodeName"].as_str();
        if let (Some(node), Some(gpus)) = (bound, pod["metadata"]["annotations"]["topoplace.io/gpus"].as_str()) {
            // Indices count within the resource the pod asks for (a mixed MIG node's pools).
            let limits = pod["spec"]["containers"][0]["resources"]["limits"].as_object().cloned().unwrap_or_default();
            let pool = limits.keys().find(|k| k.starts_with("nvidia.com/")).cloned().unwrap_or_default();
            for gpu in gpus.split(',') {
                let device = (node.to_string(), pool.clone(), gpu.to_string());
                assert!(given.insert(device), "GPU {gpu} of {node} ({pool}) given twice");
            }
        }
        if let Some(gang) = pod["metadata"]["labels"]["topoplace.io/gang"].as_str() {
            let label =
                |key: &str| -> usize { pod["metadata"]["labels"][key].as_str().unwrap_or("0").parse().unwrap_or(0) };
            let size = label("topoplace.io/gang-size");
            // An elastic gang may run more than its size, up to its maximum.
            let max = label("topoplace.io/gang-max-size").max(size);
            let entry = gangs.entry(gang.to_string()).or_insert((0, size, max));
            entry.0 += usize::from(bound.is_some());
        }
    }
    for (gang, (bound, size, max)) in gangs {
        assert!(
            bound == 0 || (size..=max).contains(&bound),
            "gang {gang} is half-bound: {bound} of {size} (at most {max})"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_pods_meet_taints_selectors_affinity_and_resources() {
    let nodes = vec![
        gpu_node("tainted", "r1", |n| {
            n["spec"]["taints"] = json!([{"key": "dedicated", "value": "train", "effect": "NoSchedule"}])
        }),
        gpu_node("cordoned", "r1", |n| n["spec"]["unschedulable"] = json!(true)),
        gpu_node("down", "r1", |n| n["status"]["conditions"] = json!([{"type": "Ready", "status": "False"}])),
        gpu_node("small", "r1", |n| n["status"]["allocatable"]["cpu"] = json!("4")),
        gpu_node("zone-b", "r2", |n| n["metadata"]["labels"]["zone"] = json!("b")),
    ];
    let (api, server) = api_with(nodes).await;
    let replica = Replica::start(&server.base, None, test_config()).await;

    let mut tolerant = scheduler_pod("ml", "tolerant", 8, None, "1");
    tolerant["spec"]["tolerations"] =
        json!([{"key": "dedicated", "operator": "Equal", "value": "train", "effect": "NoSchedule"}]);
    tolerant["spec"]["nodeSelector"] = json!({"kubernetes.io/hostname": "tainted"});
    let mut selected = scheduler_pod("ml", "selected", 2, None, "1");
    selected["spec"]["nodeSelector"] = json!({"zone": "b"});
    let mut by_name = scheduler_pod("ml", "by-name", 1, None, "2");
    by_name["spec"]["affinity"] = json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["small"]}]}]}}});
    let mut not_in = scheduler_pod("ml", "not-in", 1, None, "1");
    not_in["spec"]["affinity"] = json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": "network.topology.nvidia.com/leaf", "operator": "NotIn", "values": ["r1"]},
            {"key": "zone", "operator": "Exists"}]}]}}});
    let hungry = scheduler_pod("ml", "hungry", 1, None, "200");
    let mut other_scheduler = scheduler_pod("ml", "not-ours", 1, None, "1");
    other_scheduler["spec"]["schedulerName"] = json!("default-scheduler");
    for pod in [tolerant, selected, by_name, not_in, hungry, other_scheduler] {
        api.add_pod(pod, None, None);
    }
    eventually("four pods bound", || api.bound_pods().len() == 4).await;
    assert_eq!(api.pod_node("ml", "tolerant").as_deref(), Some("tainted"));
    assert_eq!(api.pod_node("ml", "selected").as_deref(), Some("zone-b"));
    assert_eq!(api.pod_node("ml", "by-name").as_deref(), Some("small"));
    assert_eq!(api.pod_node("ml", "not-in").as_deref(), Some("zone-b"));
    assert_eq!(api.pod_node("ml", "not-ours"), None, "pods of other schedulers are left alone");
    eventually("hungry marked unschedulable", || {
        api.pod("ml", "hungry").and_then(|p| condition(&p)).is_some_and(|(status, _, _)| status == "False")
    })
    .await;
    let (_, reason, message) = api.pod("ml", "hungry").and_then(|p| condition(&p)).expect("condition");
    assert_eq!(reason, "Unschedulable");
    assert_eq!(
        message,
        "0/5 nodes are available: 1 node(s) had untolerated taint {dedicated: train}, \
         1 node(s) were not ready, 1 node(s) were unschedulable, 2 Insufficient cpu."
    );
    eventually("FailedScheduling event", || !events_for(&api, "hungry", "FailedScheduling").is_empty()).await;
    eventually("the Scheduled event with the GPUs", || {
        events_for(&api, "selected", "Scheduled")
            .iter()
            .any(|m| m.starts_with("Successfully assigned ml/selected to zone-b (GPUs "))
    })
    .await;
    assert_eq!(api.pod_annotation("ml", "tolerant", "topoplace.io/gpus").as_deref(), Some("0,1,2,3,4,5,6,7"));
    finish(&api, replica, Some(server)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gangs_in_any_order_incomplete_and_from_pod_groups_bind_whole() {
    let (api, server) = api_with(rack_nodes(&["r1", "r2", "r3", "r4"], 4)).await;
    let replica = Replica::start(&server.base, None, test_config()).await;
    // A 4-member gang arrives in reverse order with one member missing.
    for rank in [3, 2, 1] {
        api.add_pod(scheduler_pod("ml", &format!("g4-{rank}"), 8, Some(("g4", 4, rank)), "8"), None, None);
    }
    eventually("GangWaiting event", || !events_for(&api, "g4-3", "GangWaiting").is_empty()).await;
    eventually("GangIncomplete after the timeout", || {
        api.pod("ml", "g4-1").and_then(|p| condition(&p)).is_some_and(|(_, reason, _)| reason == "GangIncomplete")
    })
    .await;
    assert!(api.bound_pods().is_empty(), "nothing binds while a member is missing");
    api.add_pod(scheduler_pod("ml", "g4-0", 8, Some(("g4", 4, 0)), "8"), None, None);
    eventually("g4 bound", || api.bound_pods().len() == 4).await;
    let racks: BTreeSet<String> =
        api.bound_pods().iter().map(|(_, node, _)| node.split('-').next().unwrap_or_default().to_string()).collect();
    assert_eq!(racks.len(), 1, "a 4-host gang lands in one rack");

    // 16 members of 4 GPUs (8 hosts' worth), members shuffled.
    for rank in [5, 0, 15, 9, 2, 12, 7, 1, 14, 3, 10, 8, 4, 13, 6, 11] {
        api.add_pod(scheduler_pod("ml", &format!("g16-{rank}"), 4, Some(("g16", 16, rank)), "4"), None, None);
    }
    eventually("g16 bound", || api.bound_pods().len() == 20).await;

    // A coscheduling PodGroup whose pods do not carry a size: minMember is looked up.
    api.add_pod_group("ml", "pg", 2);
    for index in 0..2 {
        let mut pod = scheduler_pod("ml", &format!("pg-{index}"), 8, None, "1");
        pod["metadata"]["labels"]["scheduling.x-k8s.io/pod-group"] = json!("pg");
        api.add_pod(pod, None, None);
    }
    eventually("PodGroup members bound", || api.bound_pods().len() == 22).await;
    let gpus: BTreeMap<String, usize> =
        api.bound_pods().into_iter().map(|(name, _, gpus)| (name, gpus.map_or(0, |g| g.split(',').count()))).collect();
    assert_eq!(gpus.get("g16-0"), Some(&4));
    assert_eq!(gpus.get("pg-1"), Some(&8));

    // Upstream PodGroups (scheduling.k8s.io/v1beta1), named by spec.schedulingGroup: a gang
    // of minCount 2 whose topology key keeps it in one rack, and a basic one (no gang).
    api.add_upstream_pod_group("ml", "up", Some(2), Some("network.topology.nvidia.com/leaf"));
    api.add_upstream_pod_group("ml", "basic", None, None);
    let upstream = |name: &str, group: &str, gpus: u32| {
        let mut pod = scheduler_pod("ml", name, gpus, None, "1");
        pod["spec"]["schedulingGroup"] = json!({"podGroupName": group});
        pod
    };
    api.add_pod(upstream("up-0", "up", 4), None, None);
    // One member of two: nothing is bound until the second comes.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(api.pod_node("ml", "up-0"), None, "a gang of minCount 2 waits for its second pod");
    api.add_pod(upstream("up-1", "up", 4), None, None);
    api.add_pod(upstream("alone", "basic", 1), None, None);
    eventually("upstream PodGroup members bound", || api.bound_pods().len() == 25).await;
    let racks: BTreeSet<String> = ["up-0", "up-1"]
        .iter()
        .filter_map(|name| api.pod_node("ml", name))
        .map(|node| node.split('-').next().unwrap_or_default().to_string())
        .collect();
    assert_eq!(racks.len(), 1, "the PodGroup's topology key keeps both in one rack: {racks:?}");
    // A pod naming a PodGroup that does not exist is left unscheduled, the Event naming it.
    api.add_pod(upstream("lost", "missing", 8), None, None);
    eventually("the Event naming the PodGroup", || {
        events_for(&api, "lost", "FailedScheduling").iter().any(|m| m.contains("ml/missing"))
    })
    .await;
    assert_eq!(api.pod_node("ml", "lost"), None);
    // A PodGroup that is one child of a CompositePodGroup (alpha): left unscheduled, naming both.
    let mut child = api.upstream_pod_group("ml", "up").expect("up");
    child["metadata"]["name"] = json!("prefill");
    child["spec"]["parentCompositePodGroupName"] = json!("replica-0");
    api.put_upstream_pod_group("ml", "prefill", child);
    api.add_pod(upstream("p-0", "prefill", 8), None, None);
    eventually("the Event naming the CompositePodGroup", || {
        events_for(&api, "p-0", "FailedScheduling").iter().any(|m| m.contains("CompositePodGroup ml/replica-0"))
    })
    .await;
    assert_eq!(api.pod_node("ml", "p-0"), None);
    finish(&api, replica, Some(server)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_binding_undoes_the_gang_and_a_dropped_watch_loses_nothing() {
    let (api, server) = api_with(rack_nodes(&["r1"], 4)).await;
    let replica = Replica::start(&server.base, None, test_config()).await;
    api.faults.lock().expect("faults").fail_binding.insert("g-1".into());
    for rank in 0..3 {
        api.add_pod(scheduler_pod("ml", &format!("g-{rank}"), 8, Some(("g", 3, rank)), "1"), None, None);
    }
    eventually("the bound members deleted", || api.deletes().len() >= 2).await;
    let mut deleted = api.deletes();
    deleted.sort();
    assert_eq!(deleted[..2], ["g-0".to_string(), "g-2".to_string()]);
    eventually("the rollback Event", || !events_for(&api, "g-1", "GangBindRolledBack").is_empty()).await;
    assert_eq!(api.pod_node("ml", "g-1"), None);
    assert_consistent(&api);

    // The Binding recovers; the controller recreates the deleted members (new uids), one of
    // them while the watches are down.
    api.faults.lock().expect("faults").fail_binding.clear();
    let mut again = scheduler_pod("ml", "g-0", 8, Some(("g", 3, 0)), "1");
    again["metadata"]["uid"] = json!("g-0-second");
    api.add_pod(again, None, None);
    api.drop_watches();
    let mut again = scheduler_pod("ml", "g-2", 8, Some(("g", 3, 2)), "1");
    again["metadata"]["uid"] = json!("g-2-second");
    api.add_pod(again, None, None);
    eventually("the gang bound whole on retry", || api.bound_pods().len() == 3).await;
    finish(&api, replica, Some(server)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gangs_competing_for_one_gangs_capacity_do_not_deadlock() {
    let (api, server) = api_with(rack_nodes(&["r1"], 3)).await;
    let replica = Replica::start(&server.base, None, test_config()).await;
    for rank in 0..3 {
        api.add_pod(scheduler_pod("ml", &format!("a-{rank}"), 8, Some(("a", 3, rank)), "1"), None, None);
        api.add_pod(scheduler_pod("ml", &format!("b-{rank}"), 8, Some(("b", 3, rank)), "1"), None, None);
    }
    eventually("one gang bound", || api.bound_pods().len() == 3).await;
    let winner = api.bound_pods()[0].0[..1].to_string();
    let loser = if winner == "a" { "b" } else { "a" };
    eventually("the other marked unschedulable", || {
        api.pod("ml", &format!("{loser}-0")).and_then(|p| condition(&p)).is_some_and(|(s, _, _)| s == "False")
    })
    .await;
    let (_, _, message) = api.pod("ml", &format!("{loser}-0")).and_then(|p| condition(&p)).expect("condition");
    assert!(message.contains(&format!("gang `ml/{loser}` (24 GPUs) does not fit")), "{message}");
    // The winner finishes: the loser gets everything.
    for rank in 0..3 {
        api.delete_pod("ml", &format!("{winner}-{rank}"));
    }
    eventually("the other gang bound", || {
        api.bound_pods().iter().filter(|(name, _, _)| name.starts_with(loser)).count() == 3
    })
    .await;
    finish(&api, replica, Some(server)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_failover_in_the_middle_of_a_gang_repairs_it() {
    let (api, server) = api_with(rack_nodes(&["r1"], 4)).await;
    let first = Replica::start(&server.base, Some("first"), test_config()).await;
    eventually("first leads", || {
        api.lease("kube-system", "topoplace-scheduler").is_some_and(|l| l["spec"]["holderIdentity"] == "first")
    })
    .await;
    let second = Replica::start(&server.base, Some("second"), test_config()).await;
    // Two members' Bindings hang: the leader dies with the gang half-bound.
    api.faults.lock().expect("faults").hang_binding.extend(["g-2".to_string(), "g-3".to_string()]);
    for rank in 0..4 {
        api.add_pod(scheduler_pod("ml", &format!("g-{rank}"), 8, Some(("g", 4, rank)), "1"), None, None);
    }
    eventually("two members bound", || api.bound_pods().len() == 2).await;
    // Both hung Bindings have reached the server before the leader dies: one still on its way
    // could otherwise arrive after the fault is cleared and bind (the gang whole, no repair).
    eventually("two Bindings hanging", || api.faults.lock().expect("faults").hanging.len() == 2).await;
    first.kill();
    api.faults.lock().expect("faults").hang_binding.clear();
    eventually("second takes the Lease over", || {
        api.lease("kube-system", "topoplace-scheduler").is_some_and(|l| l["spec"]["holderIdentity"] == "second")
    })
    .await;
    // The new leader deletes the half-bound members; their controller recreates them.
    eventually("the bound members deleted", || api.deletes().len() == 2).await;
    for name in api.deletes() {
        let rank: u32 = name.trim_start_matches("g-").parse().expect("rank");
        let mut again = scheduler_pod("ml", &name, 8, Some(("g", 4, rank)), "1");
        again["metadata"]["uid"] = json!(format!("{name}-second"));
        api.add_pod(again, None, None);
    }
    eventually("the gang bound whole by the new leader", || api.bound_pods().len() == 4).await;
    eventually("the repair Events", || {
        events_for(&api, "g-0", "GangRepair").len() + events_for(&api, "g-1", "GangRepair").len() == 2
    })
    .await;
    // The hung Bindings of the dead leader keep the server's connections open: not stopped.
    finish(&api, second, None).await;
    drop(server);
}

/// Issue 18's first input in scheduler mode: a LeaderWorkerSet group of 3 with a CPU-only
/// leader and two 8-GPU workers, `topoplace.io/leader-gpus: "0"` on its pods. The leader is
/// placed by the predicates alone (it needs no GPUs), the workers as a gang of two, and the
/// third GPU host stays free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaderworkerset_with_a_gpu_less_leader_is_scheduled_without_waiting_for_it() {
    let (api, server) = api_with(rack_nodes(&["r1"], 3)).await;
    let replica = Replica::start(&server.base, None, test_config()).await;
    for (name, index, gpus) in [("lws-0", 0, 0), ("lws-0-1", 1, 8), ("lws-0-2", 2, 8)] {
        let mut pod = scheduler_pod("serving", name, gpus, None, "1");
        pod["metadata"]["labels"] = json!({
            "leaderworkerset.sigs.k8s.io/group-key": "abc123",
            "leaderworkerset.sigs.k8s.io/worker-index": index.to_string(),
        });
        pod["metadata"]["annotations"] =
            json!({"leaderworkerset.sigs.k8s.io/size": "3", "topoplace.io/leader-gpus": "0"});
        api.add_pod(pod, None, None);
    }
    eventually("leader and both workers bound", || api.bound_pods().len() == 3).await;
    let workers: BTreeSet<String> = api
        .bound_pods()
        .into_iter()
        .filter(|(name, _, _)| name != "lws-0")
        .map(|(_, node, gpus)| {
            assert_eq!(gpus.map(|g| g.split(',').count()), Some(8));
            node
        })
        .collect();
    assert_eq!(workers.len(), 2, "the two workers on two hosts");
    assert_consistent(&api);
    finish(&api, replica, Some(server)).await;
}

/// A pod of LeaderWorkerSet group `group` with exclusive placement on the leaf, at worker
/// index `index` (0 is the leader), asking 8 GPUs like every member of the group of 3.
fn exclusive_lws_pod(group: &str, index: u32) -> Value {
    let name = if index == 0 { format!("{group}-0") } else { format!("{group}-0-{index}") };
    let mut pod = scheduler_pod("serving", &name, 8, None, "1");
    pod["metadata"]["labels"] = json!({
        "leaderworkerset.sigs.k8s.io/group-key": group,
        "leaderworkerset.sigs.k8s.io/worker-index": index.to_string(),
    });
    pod["metadata"]["annotations"] = json!({"leaderworkerset.sigs.k8s.io/size": "3",
        "leaderworkerset.sigs.k8s.io/exclusive-topology": "network.topology.nvidia.com/leaf"});
    pod
}

/// LeaderWorkerSet exclusive placement with a leader that takes GPUs, in scheduler mode: LWS
/// creates the workers only once the leader is bound, with a node selector for the leader's
/// leaf (kubernetes-sigs/lws `pkg/controllers/pod_controller.go`). Two racks, r1 with one host
/// taken: the leader is bound alone in r2 (the rack with room for the group), its workers'
/// GPUs held; the workers, created then, bind on the held hosts of that rack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaderworkerset_with_exclusive_placement_binds_its_leader_first_then_its_workers() {
    let (api, server) = api_with(rack_nodes(&["r1", "r2"], 3)).await;
    api.add_pod(scheduler_pod("other", "busy", 8, None, "1"), Some("r1-0"), Some("0,1,2,3,4,5,6,7"));
    let replica = Replica::start(&server.base, None, test_config()).await;
    api.add_pod(exclusive_lws_pod("g1", 0), None, None);
    eventually("the leader bound alone", || api.pod_node("serving", "g1-0").is_some()).await;
    let leader_node = api.pod_node("serving", "g1-0").unwrap_or_default();
    assert!(leader_node.starts_with("r2-"), "the rack with room for the whole group: {leader_node}");
    let state = replica.ext.state_json();
    assert_eq!(free_gpus(&state), 48 - 8 - 24, "the workers' 16 GPUs are held for them: {state}");
    // The Event follows the Binding.
    eventually("the Scheduled Event saying the leader was bound ahead", || {
        events_for(&api, "g1-0", "Scheduled").iter().any(|m| m.contains("bound ahead of its workers"))
    })
    .await;
    // LWS now creates the workers, held to the leader's leaf by a node selector.
    for index in [2, 1] {
        let mut worker = exclusive_lws_pod("g1", index);
        worker["spec"]["nodeSelector"] = json!({"network.topology.nvidia.com/leaf": "r2"});
        api.add_pod(worker, None, None);
    }
    eventually("the workers bound", || api.bound_pods().len() == 4).await;
    let nodes: BTreeSet<String> =
        ["g1-0", "g1-0-1", "g1-0-2"].iter().filter_map(|name| api.pod_node("serving", name)).collect();
    assert_eq!(nodes.len(), 3, "three hosts: {nodes:?}");
    assert!(nodes.iter().all(|n| n.starts_with("r2-")), "one leaf: {nodes:?}");
    assert!(api.deletes().is_empty());
    finish(&api, replica, Some(server)).await;
}

/// The same group whose workers fail to bind, then one whose workers never come: with a 2 s
/// reservation. A worker's failed Binding deletes the worker that bound and the leader; a
/// leader whose workers never come is deleted once the held GPUs are given back. Each gets an
/// Event saying why (LWS recreates the group whole), and nothing stays held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaderworkerset_leader_whose_workers_fail_or_never_come_is_deleted() {
    let (api, server) = api_with(rack_nodes(&["r1"], 3)).await;
    let book = topoplace_online::reservation::BookConfig {
        reservation_ttl_ms: 2_000,
        ..topoplace_online::reservation::BookConfig::default()
    };
    let replica = Replica::start_with(&server.base, None, test_config(), book).await;
    api.faults.lock().expect("faults").fail_binding.insert("g3-0-2".into());
    api.add_pod(exclusive_lws_pod("g3", 0), None, None);
    eventually("the leader bound alone", || api.pod_node("serving", "g3-0").is_some()).await;
    for index in [1, 2] {
        let mut worker = exclusive_lws_pod("g3", index);
        worker["spec"]["nodeSelector"] = json!({"network.topology.nvidia.com/leaf": "r1"});
        api.add_pod(worker, None, None);
    }
    eventually("the leader and the bound worker deleted", || {
        let deleted = api.deletes();
        deleted.contains(&"g3-0".to_string()) && deleted.contains(&"g3-0-1".to_string())
    })
    .await;
    assert!(!events_for(&api, "g3-0", "GangBindRolledBack").is_empty(), "the leader is told why");
    assert_eq!(api.pod_node("serving", "g3-0-2"), None);
    eventually("every GPU free again", || free_gpus(&replica.ext.state_json()) == 24).await;
    api.faults.lock().expect("faults").fail_binding.clear();
    api.delete_pod("serving", "g3-0-2");

    api.add_pod(exclusive_lws_pod("g2", 0), None, None);
    eventually("the leader bound alone", || api.pod_node("serving", "g2-0").is_some()).await;
    assert_eq!(free_gpus(&replica.ext.state_json()), 0, "the workers' GPUs held");
    eventually("the leader deleted", || api.deletes().contains(&"g2-0".to_string())).await;
    eventually("the Event on the leader", || !events_for(&api, "g2-0", "GangBindRolledBack").is_empty()).await;
    eventually("every GPU free again", || free_gpus(&replica.ext.state_json()) == 24).await;
    finish(&api, replica, Some(server)).await;
}

/// Members of one gang that describe it differently are not placed; the condition names both
/// pods and the field, and nothing is held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gang_members_that_disagree_on_its_shape_are_refused_naming_both_pods() {
    let (api, server) = api_with(rack_nodes(&["r1"], 2)).await;
    let replica = Replica::start(&server.base, None, test_config()).await;
    for (rank, tp) in [(0, "8"), (1, "16")] {
        let mut pod = scheduler_pod("ml", &format!("d-{rank}"), 8, Some(("d", 2, rank)), "1");
        pod["metadata"]["annotations"] = json!({"topoplace.io/tensor-parallel": tp});
        api.add_pod(pod, None, None);
    }
    eventually("the disagreement reported", || {
        api.pod("ml", "d-0").and_then(|p| condition(&p)).is_some_and(|(status, _, message)| {
            status == "False" && message.contains("disagree on topoplace.io/tensor-parallel")
        })
    })
    .await;
    let (_, _, message) = api.pod("ml", "d-0").and_then(|p| condition(&p)).expect("condition");
    assert!(message.contains("ml/d-0 says 8, ml/d-1 says 16"), "{message}");
    // Disagreeing on the size is named too, whichever member says more.
    api.add_pod(scheduler_pod("ml", "s-0", 8, Some(("s", 3, 0)), "1"), None, None);
    api.add_pod(scheduler_pod("ml", "s-1", 8, Some(("s", 2, 1)), "1"), None, None);
    eventually("the size disagreement reported", || {
        api.pod("ml", "s-1").and_then(|p| condition(&p)).is_some_and(|(_, _, message)| {
            message.contains("disagree on the gang's size: ml/s-0 says 3, ml/s-1 says 2")
        })
    })
    .await;
    assert!(api.bound_pods().is_empty(), "nothing bound");
    finish(&api, replica, Some(server)).await;
}

/// Issue 18's second input in scheduler mode: a LeaderWorkerSet group whose leader asks 4
/// GPUs and whose two workers ask 8, all in one rack (`topoplace.io/roles` on every pod).
/// Rack r1 has 16 GPUs, too few for the replica's 20: all three pods are bound in r2, the
/// leader on 4 GPUs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaderworkerset_with_a_leader_of_another_shape_is_bound_whole_in_one_rack() {
    let mut nodes = rack_nodes(&["r1"], 2);
    nodes.extend(rack_nodes(&["r2"], 3));
    let (api, server) = api_with(nodes).await;
    let replica = Replica::start(&server.base, None, test_config()).await;
    let roles = r#"[{"name": "leader", "gpusPerMember": 4, "tensorParallel": 4},
                    {"name": "worker", "members": 2, "gpusPerMember": 8, "tensorParallel": 8}]"#;
    for (name, index, gpus) in [("lws-0-2", 2, 8), ("lws-0", 0, 4), ("lws-0-1", 1, 8)] {
        let mut pod = scheduler_pod("serving", name, gpus, None, "1");
        pod["metadata"]["labels"] = json!({
            "leaderworkerset.sigs.k8s.io/group-key": "abc123",
            "leaderworkerset.sigs.k8s.io/worker-index": index.to_string(),
        });
        pod["metadata"]["annotations"] = json!({
            "leaderworkerset.sigs.k8s.io/size": "3",
            "topoplace.io/roles": roles,
            "topoplace.io/topology-required": "leaf",
        });
        api.add_pod(pod, None, None);
    }
    eventually("the leader and both workers bound", || api.bound_pods().len() == 3).await;
    let placed: BTreeMap<String, (String, usize)> = api
        .bound_pods()
        .into_iter()
        .map(|(name, node, gpus)| (name, (node, gpus.map_or(0, |g| g.split(',').count()))))
        .collect();
    assert!(placed.values().all(|(node, _)| node.starts_with("r2-")), "one rack with room: {placed:?}");
    assert_eq!(placed["lws-0"].1, 4, "the leader's 4 GPUs: {placed:?}");
    assert_eq!((placed["lws-0-1"].1, placed["lws-0-2"].1), (8, 8));
    assert_ne!(placed["lws-0-1"].0, placed["lws-0-2"].0, "two workers on two hosts");
    finish(&api, replica, Some(server)).await;
}

/// LeaderWorkerSet subgroups with `subgroup-exclusive-topology` in scheduler mode: a group of
/// four 8-GPU pods in subgroups of two, each subgroup in a rack of its own, though one rack
/// holds the whole group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaderworkerset_subgroups_are_bound_a_rack_each() {
    let (api, server) = api_with(rack_nodes(&["r1", "r2"], 4)).await;
    let replica = Replica::start(&server.base, None, test_config()).await;
    for index in [3, 0, 2, 1] {
        let name = if index == 0 { "sg-0".to_string() } else { format!("sg-0-{index}") };
        let mut pod = scheduler_pod("serving", &name, 8, None, "1");
        pod["metadata"]["labels"] = json!({
            "leaderworkerset.sigs.k8s.io/group-key": "sg",
            "leaderworkerset.sigs.k8s.io/worker-index": index.to_string(),
        });
        pod["metadata"]["annotations"] = json!({
            "leaderworkerset.sigs.k8s.io/size": "4",
            "leaderworkerset.sigs.k8s.io/subgroup-size": "2",
            "leaderworkerset.sigs.k8s.io/subgroup-exclusive-topology": "network.topology.nvidia.com/leaf",
        });
        api.add_pod(pod, None, None);
    }
    eventually("the group bound", || api.bound_pods().len() == 4).await;
    let rack_of =
        |name: &str| api.pod_node("serving", name).map(|n| n.split('-').next().unwrap_or_default().to_string());
    assert_eq!(rack_of("sg-0"), rack_of("sg-0-1"), "subgroup 0");
    assert_eq!(rack_of("sg-0-2"), rack_of("sg-0-3"), "subgroup 1");
    assert_ne!(rack_of("sg-0"), rack_of("sg-0-2"), "a rack each");
    finish(&api, replica, Some(server)).await;
}

/// Issue 19 through the secondary scheduler against the fake API server. Input 1: two nodes
/// full with low-priority pods; a gang of 2 × 8 of priority 1000 preempts both (deleted by
/// the scheduler, each with its uid as a precondition, a `Preempted` Event on each), holds the
/// GPUs they give back and binds once both have left. Input 2: a member of the running gang
/// deleted and recreated joins it again; the member that ran on is never deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_high_priority_gang_preempts_and_a_recreated_member_joins_it_again() {
    let (api, server) = api_with(rack_nodes(&["r1"], 2)).await;
    for (index, node) in ["r1-0", "r1-1"].iter().enumerate() {
        api.add_pod(scheduler_pod("batch", &format!("low-{index}"), 8, None, "1"), Some(node), Some("0,1,2,3,4,5,6,7"));
    }
    let replica = Replica::start(&server.base, None, test_config()).await;
    for rank in 0..2 {
        let mut pod = scheduler_pod("ml", &format!("hi-{rank}"), 8, Some(("hi", 2, rank)), "1");
        pod["spec"]["priority"] = json!(1000);
        api.add_pod(pod, None, None);
    }
    eventually("both low-priority pods evicted", || api.deletes().len() >= 2).await;
    let mut deleted = api.deletes();
    deleted.sort();
    assert_eq!(deleted, ["low-0", "low-1"]);
    eventually("a Preempted Event on each victim", || {
        ["low-0", "low-1"].iter().all(|name| !events_for(&api, name, "Preempted").is_empty())
    })
    .await;
    // Each member nominated to its node of the plan, as kube-scheduler nominates a preemptor.
    eventually("status.nominatedNodeName on each member", || {
        let nominated: BTreeSet<String> = ["hi-0", "hi-1"]
            .iter()
            .filter_map(|name| api.pod("ml", name)?["status"]["nominatedNodeName"].as_str().map(String::from))
            .collect();
        nominated == BTreeSet::from(["r1-0".to_string(), "r1-1".to_string()])
    })
    .await;
    eventually("the gang bound on the GPUs its victims gave back", || {
        api.pod_node("ml", "hi-0").is_some() && api.pod_node("ml", "hi-1").is_some()
    })
    .await;
    for name in ["hi-0", "hi-1"] {
        let pod = api.pod("ml", name).unwrap_or_default();
        assert_eq!(pod["status"]["nominatedNodeName"], pod["spec"]["nodeName"], "bound where nominated: {name}");
    }

    api.delete_pod("ml", "hi-0");
    let mut again = scheduler_pod("ml", "hi-0", 8, Some(("hi", 2, 0)), "1");
    again["metadata"]["uid"] = json!("hi-0-second");
    again["spec"]["priority"] = json!(1000);
    api.add_pod(again, None, None);
    eventually("the recreated member joined its gang", || api.pod_node("ml", "hi-0").is_some()).await;
    assert!(
        !api.deletes().contains(&"hi-1".to_string()),
        "the member that ran on was never taken for a half-bound gang"
    );
    finish(&api, replica, Some(server)).await;
}

/// An elastic gang (`topoplace.io/gang-max-size`) through the adapter: four pods of a gang of
/// size 2 and at most 3 on three free nodes. Two bind together, the third joins them, the
/// fourth stays pending with a condition naming the maximum; once a member is deleted, the
/// fourth joins in its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_elastic_gang_starts_at_its_size_and_grows_to_its_maximum() {
    let (api, server) = api_with(rack_nodes(&["r1"], 4)).await;
    let replica = Replica::start(&server.base, None, test_config()).await;
    for rank in 0..4 {
        let mut pod = scheduler_pod("ml", &format!("e-{rank}"), 8, Some(("e", 2, rank)), "1");
        pod["metadata"]["labels"]["topoplace.io/gang-max-size"] = json!("3");
        api.add_pod(pod, None, None);
    }
    let bound = |api: &FakeApi| (0..4).filter(|r| api.pod_node("ml", &format!("e-{r}")).is_some()).count();
    eventually("three members bound", || bound(&api) == 3).await;
    eventually("the fourth told it waits at the maximum", || {
        condition(&api.pod("ml", "e-3").unwrap_or_default()).is_some_and(|(_, _, m)| m.contains("its maximum is 3"))
    })
    .await;
    assert_eq!(bound(&api), 3);
    assert!(api.pod_node("ml", "e-3").is_none(), "ranks go first: {:?}", api.pod_node("ml", "e-3"));
    api.delete_pod("ml", "e-0");
    eventually("the fourth joined in its place", || api.pod_node("ml", "e-3").is_some()).await;
    assert!(api.deletes().is_empty(), "nothing deleted by the scheduler: {:?}", api.deletes());
    finish(&api, replica, Some(server)).await;
}

/// PodDisruptionBudgets read from the API (`policy/v1`, list and watch): a high-priority pod
/// on two full nodes evicts the pod that no budget protects, though the other node comes first
/// by name; once the budget allows a disruption (the controller updated its status), the next
/// preemption takes the web pod without breaking it (its Event names no broken budget), and a
/// third, with the budget at 0 again and nothing else to evict, breaks it and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preemption_spares_a_pod_whose_budget_allows_no_disruption() {
    let (api, server) = api_with(rack_nodes(&["r1"], 2)).await;
    let mut web = scheduler_pod("shop", "web-0", 8, None, "1");
    web["metadata"]["labels"] = json!({"app": "web"});
    api.add_pod(web, Some("r1-0"), Some("0,1,2,3,4,5,6,7"));
    api.add_pod(scheduler_pod("batch", "low-0", 8, None, "1"), Some("r1-1"), Some("0,1,2,3,4,5,6,7"));
    let budget = |allowed: i32| {
        json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": {"name": "web", "namespace": "shop", "uid": "pdb-web"},
            "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "web"}}},
            "status": {"disruptionsAllowed": allowed, "currentHealthy": 1, "desiredHealthy": 1, "expectedPods": 1}})
    };
    api.put_budget(budget(0));
    let replica = Replica::start(&server.base, None, test_config()).await;
    eventually("the scheduler listed the budget", || replica.runtime.disruptions_allowed("shop/web") == Some(0)).await;
    let mut urgent = scheduler_pod("ml", "urgent-0", 8, None, "1");
    urgent["spec"]["priority"] = json!(1000);
    api.add_pod(urgent, None, None);
    eventually("the unprotected pod evicted", || !api.deletes().is_empty()).await;
    eventually("the urgent pod bound where it was", || api.pod_node("ml", "urgent-0").is_some()).await;
    assert_eq!(api.deletes(), ["low-0"]);
    assert_eq!(api.pod_node("ml", "urgent-0").as_deref(), Some("r1-1"));

    api.put_budget(budget(1));
    eventually("the scheduler saw the budget allow one", || replica.runtime.disruptions_allowed("shop/web") == Some(1))
        .await;
    let mut second = scheduler_pod("ml", "urgent-1", 8, None, "1");
    second["spec"]["priority"] = json!(1000);
    api.add_pod(second, None, None);
    eventually("the web pod evicted once its budget allows it", || api.deletes().len() == 2).await;
    assert_eq!(api.deletes(), ["low-0", "web-0"]);
    eventually("the Preempting Event", || !events_for(&api, "urgent-1", "Preempting").is_empty()).await;
    let said = events_for(&api, "urgent-1", "Preempting").join(" | ");
    assert!(said.contains("web-0") && !said.contains("PodDisruptionBudget"), "{said}");

    eventually("urgent-1 bound", || api.pod_node("ml", "urgent-1").is_some()).await;
    let mut guarded = scheduler_pod("shop", "web-1", 8, None, "1");
    guarded["metadata"]["labels"] = json!({"app": "web"});
    api.delete_pod("ml", "urgent-0");
    api.add_pod(guarded, Some("r1-1"), Some("0,1,2,3,4,5,6,7"));
    api.put_budget(budget(0));
    eventually("the scheduler saw the budget allow none", || {
        replica.runtime.disruptions_allowed("shop/web") == Some(0)
    })
    .await;
    let mut third = scheduler_pod("ml", "urgent-2", 8, None, "1");
    third["spec"]["priority"] = json!(1000);
    api.add_pod(third, None, None);
    eventually("the guarded pod evicted, best effort", || api.deletes().len() == 3).await;
    eventually("its Event names the budget", || {
        events_for(&api, "urgent-2", "Preempting").iter().any(|m| m.contains("breaks PodDisruptionBudget(s) shop/web"))
    })
    .await;
    finish(&api, replica, Some(server)).await;
}

/// Issue 22's node facts in the secondary scheduler: a TP-2 pod on L40S nodes (no NVLink) is
/// bound on one socket; a GPU the device plugin withdrew (allocatable 7 of 8) is never given;
/// a node of a product the table lacks is planned from its memory label; a 7B model goes to a
/// MIG 2g.20gb device, and a TP-2 pod never does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pcie_tensor_parallelism_withdrawn_gpus_and_unknown_products() {
    let node = |name: &str, product: &str, count: &str, allocatable: &str, memory: Option<&str>| {
        gpu_node(name, "r1", |n| {
            n["metadata"]["labels"]["nvidia.com/gpu.product"] = json!(product);
            n["metadata"]["labels"]["nvidia.com/gpu.count"] = json!(count);
            if let Some(memory) = memory {
                n["metadata"]["labels"]["nvidia.com/gpu.memory"] = json!(memory);
            }
            n["status"]["allocatable"]["nvidia.com/gpu"] = json!(allocatable);
        })
    };
    let nodes = vec![
        node("l40s-0", "NVIDIA-L40S", "8", "7", None),
        node("l40s-1", "NVIDIA-L40S", "8", "8", None),
        node("new-0", "NVIDIA-RTX-PRO-6000-Kube-Test", "4", "4", Some("97887")),
        node("mig-0", "NVIDIA-H100-80GB-HBM3-MIG-2g.20gb", "24", "24", Some("19968")),
    ];
    let (api, server) = api_with(nodes).await;
    let replica = Replica::start(&server.base, None, test_config()).await;
    let on = |mut pod: Value, node: &str| {
        pod["spec"]["nodeSelector"] = json!({"kubernetes.io/hostname": node});
        pod
    };
    // GPUs 0-2 of l40s-1 are taken: the lowest free pair (3, 4) spans the sockets.
    api.add_pod(scheduler_pod("ml", "busy", 3, None, "1"), Some("l40s-1"), Some("0,1,2"));
    let mut tp2 = scheduler_pod("ml", "tp2", 2, None, "1");
    tp2["metadata"]["annotations"] =
        json!({"topoplace.io/tensor-parallel": "2", "topoplace.io/min-gpu-memory": "40Gi"});
    api.add_pod(on(tp2, "l40s-1"), None, None);
    let mut big = scheduler_pod("ml", "big", 1, None, "1");
    big["metadata"]["annotations"] = json!({"topoplace.io/min-gpu-memory": "90Gi"});
    api.add_pod(big, None, None);
    for index in 0..8 {
        api.add_pod(on(scheduler_pod("ml", &format!("fill-{index}"), 1, None, "1"), "l40s-0"), None, None);
    }
    let mut small = scheduler_pod("ml", "llama-7b", 1, None, "1");
    small["metadata"]["annotations"] = json!({"topoplace.io/model-params": "7B", "topoplace.io/model-dtype": "bf16"});
    api.add_pod(small, None, None);
    let mut sliced_tp2 = scheduler_pod("ml", "sliced-tp2", 2, None, "1");
    sliced_tp2["metadata"]["annotations"] = json!({"topoplace.io/tensor-parallel": "2"});
    api.add_pod(on(sliced_tp2, "mig-0"), None, None);

    eventually("busy, tp2, big, llama-7b and seven fill pods bound", || api.bound_pods().len() == 11).await;
    assert_eq!(api.pod_node("ml", "tp2").as_deref(), Some("l40s-1"));
    let gpus = api.pod_annotation("ml", "tp2", "topoplace.io/gpus").expect("GPUs recorded");
    assert_eq!(gpus, "4,5", "one socket, not the lowest free pair");
    assert_eq!(api.pod_node("ml", "llama-7b").as_deref(), Some("mig-0"), "the MIG device fits it best");
    assert_eq!(api.pod_node("ml", "big").as_deref(), Some("new-0"), "planned from its memory label");
    let fill_bound = (0..8).filter(|i| api.pod_node("ml", &format!("fill-{i}")).is_some()).count();
    assert_eq!(fill_bound, 7, "the withdrawn GPU is never given");
    for index in 0..8 {
        if let Some(gpus) = api.pod_annotation("ml", &format!("fill-{index}"), "topoplace.io/gpus") {
            assert!(gpus.parse::<u8>().is_ok_and(|g| g < 7), "fill-{index} got GPU {gpus}");
        }
    }
    eventually("the TP-2 pod on the MIG node marked unschedulable", || {
        api.pod("ml", "sliced-tp2").and_then(|p| condition(&p)).is_some_and(|(status, _, _)| status == "False")
    })
    .await;
    assert_eq!(api.pod_node("ml", "sliced-tp2"), None);
    let (_, _, message) = api.pod("ml", "sliced-tp2").and_then(|p| condition(&p)).expect("condition");
    assert!(message.contains("MIG slices"), "{message}");
    finish(&api, replica, Some(server)).await;
}

/// Issue 22: a time-sliced GPU (GFD's labels, the device plugin's replicas as
/// `nvidia.com/gpu`) of 4 replicas, one already used by a pod bound before: the scheduler binds
/// three more one-replica pods and refuses the fifth, and never a tensor-parallel pair.
#[tokio::test]
async fn a_time_sliced_gpu_takes_one_pod_per_replica_and_no_more() {
    let shared = gpu_node("t4-ts", "r1", |n| {
        n["metadata"]["labels"]["nvidia.com/gpu.product"] = json!("Tesla-T4-SHARED");
        n["metadata"]["labels"]["nvidia.com/gpu.count"] = json!("1");
        n["metadata"]["labels"]["nvidia.com/gpu.replicas"] = json!("4");
        n["metadata"]["labels"]["nvidia.com/gpu.sharing-strategy"] = json!("time-slicing");
        n["status"]["allocatable"]["nvidia.com/gpu"] = json!("4");
    });
    let (api, server) = api_with(vec![shared]).await;
    let replica = Replica::start(&server.base, None, test_config()).await;
    api.add_pod(scheduler_pod("ml", "before", 1, None, "1"), Some("t4-ts"), None);
    for index in 0..4 {
        api.add_pod(scheduler_pod("ml", &format!("notebook-{index}"), 1, None, "1"), None, None);
    }
    let mut pair = scheduler_pod("ml", "pair", 2, None, "1");
    pair["metadata"]["annotations"] = json!({"topoplace.io/tensor-parallel": "2"});
    api.add_pod(pair, None, None);
    eventually("the pod bound before and three notebooks", || api.bound_pods().len() == 4).await;
    let waiting: Vec<String> =
        (0..4).map(|i| format!("notebook-{i}")).filter(|name| api.pod_node("ml", name).is_none()).collect();
    assert_eq!(waiting.len(), 1, "one replica each, the fifth refused: {waiting:?}");
    let mut replicas: Vec<String> =
        (0..4).filter_map(|i| api.pod_annotation("ml", &format!("notebook-{i}"), "topoplace.io/gpus")).collect();
    replicas.sort();
    replicas.dedup();
    assert_eq!(replicas.len(), 3, "three distinct replicas: {replicas:?}");
    eventually("the fifth and the pair marked unschedulable", || {
        [waiting[0].as_str(), "pair"]
            .iter()
            .all(|name| api.pod("ml", name).and_then(|p| condition(&p)).is_some_and(|(status, _, _)| status == "False"))
    })
    .await;
    let (_, _, message) = api.pod("ml", "pair").and_then(|p| condition(&p)).expect("condition");
    assert!(message.contains("shared replicas"), "{message}");
    finish(&api, replica, Some(server)).await;
}

/// GFD's mixed MIG strategy: one A100 node offers 2 whole GPUs as `nvidia.com/gpu` and 3
/// MIG devices of 1g.10gb as `nvidia.com/mig-1g.10gb` (one already taken by a pod bound
/// before). Pods asking for the MIG resource take the MIG devices, one each, and the third is
/// refused; a TP-2 pod asking for `nvidia.com/gpu` takes the whole GPUs of the same node.
#[tokio::test]
async fn a_mixed_mig_node_serves_mig_devices_and_whole_gpus_from_their_own_pools() {
    let mixed = gpu_node("a100-mixed", "r1", |n| {
        let labels = &mut n["metadata"]["labels"];
        labels["nvidia.com/gpu.product"] = json!("NVIDIA-A100-SXM4-80GB");
        labels["nvidia.com/gpu.count"] = json!("4");
        labels["nvidia.com/mig.strategy"] = json!("mixed");
        labels["nvidia.com/mig-1g.10gb.count"] = json!("3");
        labels["nvidia.com/mig-1g.10gb.memory"] = json!("9856");
        labels["nvidia.com/mig-1g.10gb.product"] = json!("NVIDIA-A100-SXM4-80GB-MIG-1g.10gb");
        n["status"]["allocatable"]["nvidia.com/gpu"] = json!("2");
        n["status"]["allocatable"]["nvidia.com/mig-1g.10gb"] = json!("3");
    });
    let (api, server) = api_with(vec![mixed]).await;
    let replica = Replica::start(&server.base, None, test_config()).await;
    let mig_pod = |name: &str| {
        let mut pod = scheduler_pod("ml", name, 0, None, "1");
        pod["spec"]["containers"][0]["resources"]["limits"] = json!({"nvidia.com/mig-1g.10gb": "1", "cpu": "1"});
        pod
    };
    api.add_pod(mig_pod("before"), Some("a100-mixed"), None);
    for name in ["slice-0", "slice-1", "slice-2"] {
        api.add_pod(mig_pod(name), None, None);
    }
    let mut pair = scheduler_pod("ml", "pair", 2, None, "1");
    pair["metadata"]["annotations"] = json!({"topoplace.io/tensor-parallel": "2"});
    api.add_pod(pair, None, None);
    // The pod bound before, two slices and the pair.
    eventually("two slices and the pair bound", || api.bound_pods().len() == 4).await;
    assert_eq!(api.pod_node("ml", "pair").as_deref(), Some("a100-mixed"));
    assert_eq!(api.pod_annotation("ml", "pair", "topoplace.io/gpus").as_deref(), Some("0,1"));
    let slices = ["slice-0", "slice-1", "slice-2"];
    let waiting: Vec<&str> = slices.iter().copied().filter(|name| api.pod_node("ml", name).is_none()).collect();
    assert_eq!(waiting.len(), 1, "three MIG devices, one taken before: {waiting:?}");
    let mut devices: Vec<String> =
        slices.iter().filter_map(|name| api.pod_annotation("ml", name, "topoplace.io/gpus")).collect();
    devices.sort();
    // The pod bound before holds device 0 (the lowest free, with no record).
    assert_eq!(devices, ["1", "2"], "the other two MIG devices");
    eventually("the third slice marked unschedulable", || {
        api.pod("ml", waiting[0]).and_then(|p| condition(&p)).is_some_and(|(status, _, _)| status == "False")
    })
    .await;
    finish(&api, replica, Some(server)).await;
}
