//! The extender over HTTP on a static cluster (`serve --cluster`), played as kube-scheduler
//! plays it: golden request/reply fixtures for every verb, gangs scheduled concurrently,
//! members that never arrive, and malformed input.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::{json, Value};
use support::{eventually_async, free_gpus, pod, post, schedule, static_extender, static_extender_with};
use topoplace_online::reservation::BookConfig;

const CLUSTER: &str = "testdata/extender/cluster.yaml";

fn fixture(name: &str) -> Value {
    let path = Path::new("testdata/extender").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Compares a reply with its golden file; `TOPOPLACE_BLESS=1` writes the file instead.
fn golden(name: &str, reply: &Value) {
    let path = Path::new("testdata/extender").join(name);
    if std::env::var("TOPOPLACE_BLESS").is_ok_and(|v| v == "1") {
        let text = serde_json::to_string_pretty(reply).expect("json") + "\n";
        std::fs::write(&path, text).expect("write golden");
        return;
    }
    assert_eq!(reply, &fixture(name), "reply differs from {}", path.display());
}

/// `GET /state`.
async fn state_of(client: &reqwest::Client, base: &str) -> Value {
    client.get(format!("{base}/state")).send().await.expect("state").json().await.expect("json")
}

fn node_names() -> Vec<String> {
    support::extender_node_names()
}

#[tokio::test]
async fn every_verb_matches_its_golden_fixture() {
    let (server, ext, binder) = static_extender(CLUSTER, 30_000).await;
    let client = reqwest::Client::new();
    let base = &server.base;

    let (status, reply) = post(&client, &format!("{base}/filter"), &fixture("filter-args-nodenames.json")).await;
    assert_eq!(status, 200);
    golden("filter-reply-nodenames.json", &reply);
    // The first member planned the whole gang: one rack, two whole H100 hosts.
    assert_eq!(reply["NodeNames"], json!(["r1-0"]));
    assert!(reply["FailedAndUnresolvableNodes"]["cpu-0"]
        .as_str()
        .is_some_and(|r| r.contains("not in topoplace's view")));

    let (status, reply) = post(&client, &format!("{base}/filter"), &fixture("filter-args-nodes.json")).await;
    assert_eq!(status, 200);
    golden("filter-reply-nodes.json", &reply);
    assert_eq!(reply["Nodes"]["items"][0]["metadata"]["name"], "r1-1", "nodeCacheCapable: false answers with Nodes");
    assert_eq!(reply["NodeNames"], Value::Null);

    let (status, reply) = post(&client, &format!("{base}/prioritize"), &fixture("prioritize-args.json")).await;
    assert_eq!(status, 200);
    golden("prioritize-reply.json", &reply);
    assert_eq!(reply, json!([{"Host": "r1-0", "Score": 0}, {"Host": "r1-1", "Score": 10}]));

    let first = client.post(format!("{base}/bind")).json(&fixture("bind-args-0.json")).send();
    let second = client.post(format!("{base}/bind")).json(&fixture("bind-args-1.json")).send();
    let (first, second) = tokio::join!(first, second);
    let first: Value = first.expect("bind 0").json().await.expect("json");
    let second: Value = second.expect("bind 1").json().await.expect("json");
    golden("bind-reply.json", &first);
    assert_eq!(first, json!({"Error": ""}));
    assert_eq!(second, json!({"Error": ""}));
    assert_eq!(binder.node_of("7c0c9b8e-0000-4000-8000-000000000000").as_deref(), Some("r1-0"));
    assert_eq!(binder.node_of("7c0c9b8e-0000-4000-8000-000000000001").as_deref(), Some("r1-1"));

    let (status, reply) = post(&client, &format!("{base}/preempt"), &fixture("preempt-args-meta.json")).await;
    assert_eq!(status, 200);
    golden("preempt-reply-meta.json", &reply);
    // r1-0's victim is half of a bound gang whose other half would stay: never proposed.
    // r2-2 has no victims: never handed back.
    let kept: Vec<&String> = reply["NodeNameToMetaVictims"].as_object().expect("map").keys().collect();
    assert_eq!(kept, vec!["r2-3"]);

    let (status, reply) = post(&client, &format!("{base}/preempt"), &fixture("preempt-args-victims.json")).await;
    assert_eq!(status, 200);
    golden("preempt-reply-victims.json", &reply);

    ext.check().expect("book invariants");
    server.stop().await;
}

/// Plays kube-scheduler for every member of several gangs at once and checks the outcome:
/// each gang bound whole to its plan, no GPU given twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_gangs_bind_whole_and_never_share_a_gpu() {
    let (server, ext, binder) = static_extender(CLUSTER, 30_000).await;
    let client = reqwest::Client::new();
    let nodes = node_names();
    // 2 x 8 + 3 x 8 + 2 x 4 + 4 x 2 + 2 x 8 = 72 GPUs of the 64 H100s and 8 L40S.
    let gangs = [("a", 2, 8), ("b", 3, 8), ("c", 2, 4), ("d", 4, 2), ("e", 2, 8)];
    let mut tasks = Vec::new();
    for (gang, size, gpus) in gangs {
        for member in 0..size {
            let client = client.clone();
            let base = server.base.clone();
            let nodes = nodes.clone();
            let uid = format!("{gang}-{member}-uid");
            let pod = pod("team", &format!("{gang}-{member}"), &uid, gpus, Some((gang, size)));
            tasks.push(tokio::spawn(async move { (gang, uid, schedule(&client, &base, &pod, &nodes).await) }));
        }
    }
    let mut outcome: BTreeMap<&str, Vec<Result<String, String>>> = BTreeMap::new();
    for task in tasks {
        let (gang, _, result) = task.await.expect("task");
        outcome.entry(gang).or_default().push(result);
    }
    let mut bound_gangs = 0;
    for (gang, results) in &outcome {
        let bound = results.iter().filter(|r| r.is_ok()).count();
        assert!(bound == 0 || bound == results.len(), "gang {gang} is partly bound: {results:?}");
        if bound == results.len() {
            bound_gangs += 1;
        }
    }
    assert!(bound_gangs >= 4, "72 GPUs of gangs on 72 GPUs; at least four gangs fit: {outcome:?}");
    let state = state_of(&client, &server.base).await;
    let mut seen: BTreeSet<(String, u64)> = BTreeSet::new();
    for node in state["nodes"].as_array().expect("nodes") {
        for held in node["held"].as_array().expect("held") {
            for gpu in held["gpus"].as_array().expect("gpus") {
                let key = (node["name"].as_str().unwrap_or_default().to_string(), gpu.as_u64().unwrap_or(99));
                assert!(seen.insert(key.clone()), "GPU {key:?} held twice");
            }
        }
    }
    for (gang, size, _) in gangs {
        let members_bound = (0..size).filter(|m| binder.node_of(&format!("{gang}-{m}-uid")).is_some()).count();
        assert!(members_bound == 0 || members_bound == size as usize, "gang {gang}: {members_bound} of {size} bound");
    }
    ext.check().expect("book invariants");
    server.stop().await;
}

#[tokio::test]
async fn a_member_that_never_arrives_releases_the_gang() {
    let (server, ext, binder) = static_extender(CLUSTER, 300).await;
    let client = reqwest::Client::new();
    let nodes = node_names();
    let lonely = pod("team", "g-0", "g-0-uid", 8, Some(("g", 2)));
    let error = schedule(&client, &server.base, &lonely, &nodes).await.expect_err("the gang never completes");
    assert!(error.contains("1 member(s) have not reached bind"), "the held bind is answered at its hold: {error}");
    assert_eq!(binder.node_of("g-0-uid"), None, "nothing bound");
    // The member keeps its slot for kube-scheduler's retry, one TTL longer; then it is freed.
    let state_url = format!("{}/state", server.base);
    let get_state =
        || async { client.get(&state_url).send().await.expect("state").json::<Value>().await.expect("json") };
    eventually_async("the reservation released", || async { get_state().await["gangs"] == json!([]) }).await;
    let state = get_state().await;
    assert_eq!(state["stats"]["bindHoldsLapsed"], 1);
    assert!(state["nodes"].as_array().expect("nodes").iter().all(|n| n["held"] == json!([])), "no GPU held");
    assert_eq!(state["stats"]["gangsExpired"], 1);
    ext.check().expect("book invariants");
    server.stop().await;
}

#[tokio::test]
async fn a_late_member_is_still_bound_with_its_gang() {
    let (server, _ext, binder) = static_extender(CLUSTER, 2_000).await;
    let client = reqwest::Client::new();
    let nodes = node_names();
    let early = pod("team", "h-0", "h-0-uid", 8, Some(("h", 2)));
    let late = pod("team", "h-1", "h-1-uid", 8, Some(("h", 2)));
    let first = {
        let (client, base, nodes) = (client.clone(), server.base.clone(), nodes.clone());
        tokio::spawn(async move { schedule(&client, &base, &early, &nodes).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(binder.node_of("h-0-uid"), None, "the first member waits for the second");
    let second = schedule(&client, &server.base, &late, &nodes).await.expect("second member binds");
    let first = first.await.expect("task").expect("first member binds");
    assert_ne!(first, second);
    assert!(binder.node_of("h-0-uid").is_some() && binder.node_of("h-1-uid").is_some());
    server.stop().await;
}

/// kube-scheduler v1.20 with a 30 s reservation bound a gang whose third member came 35 s late
/// only 115 s after its last member's creation: the held binds failed when the reservation expired. A held bind keeps
/// the reservation, so a member later than the TTL but within the hold binds the gang at once.
#[tokio::test]
async fn a_member_later_than_the_ttl_but_within_the_hold_binds_its_gang_at_once() {
    let config = BookConfig { reservation_ttl_ms: 100, bind_hold_ms: 20_000, ..BookConfig::default() };
    let (server, ext, binder) = static_extender_with(CLUSTER, config).await;
    let client = reqwest::Client::new();
    let nodes = node_names();
    let early: Vec<Value> =
        (0..2).map(|r| pod("team", &format!("l-{r}"), &format!("l-{r}-uid"), 8, Some(("l", 3)))).collect();
    let held: Vec<_> = early
        .into_iter()
        .map(|p| {
            let (client, base, nodes) = (client.clone(), server.base.clone(), nodes.clone());
            tokio::spawn(async move { schedule(&client, &base, &p, &nodes).await })
        })
        .collect();
    // Well past the 100 ms TTL, with both early members held at bind.
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    assert_eq!(binder.node_of("l-0-uid"), None, "the early members wait for the third");
    let late = pod("team", "l-2", "l-2-uid", 8, Some(("l", 3)));
    schedule(&client, &server.base, &late, &nodes).await.expect("the late member binds the gang");
    for member in held {
        member.await.expect("task").expect("an early member binds with it");
    }
    let state = state_of(&client, &server.base).await;
    assert_eq!(state["stats"]["gangsReserved"], 1, "planned once: {state}");
    assert_eq!(
        (state["stats"]["gangsExpired"].as_u64(), state["stats"]["bindHoldsLapsed"].as_u64()),
        (Some(0), Some(0))
    );
    assert_eq!(state["stats"]["gangsBound"], 1);
    ext.check().expect("book invariants");
    server.stop().await;
}

#[tokio::test]
async fn a_single_pod_is_filtered_by_fit_and_scored_by_the_engine() {
    let (server, _ext, binder) = static_extender(CLUSTER, 30_000).await;
    let client = reqwest::Client::new();
    let nodes = node_names();
    // Take 6 GPUs on r1-0 so it is the tightest fit for a 2-GPU pod.
    schedule(&client, &server.base, &pod("team", "six", "six-uid", 6, None), &["r1-0".into()]).await.expect("bind");
    let small = pod("team", "two", "two-uid", 2, None);
    let (_, filtered) =
        post(&client, &format!("{}/filter", server.base), &json!({"Pod": small, "NodeNames": nodes})).await;
    assert_eq!(filtered["NodeNames"].as_array().map(Vec::len), Some(10), "{filtered}");
    let big = pod("team", "eight", "eight-uid", 8, None);
    let (_, filtered) =
        post(&client, &format!("{}/filter", server.base), &json!({"Pod": big, "NodeNames": nodes})).await;
    assert!(filtered["FailedNodes"]["r1-0"].as_str().is_some_and(|r| r.contains("fewer free GPUs")), "{filtered}");
    assert!(filtered["FailedAndUnresolvableNodes"]["l40s-0"].is_string(), "4-GPU hosts never hold 8: {filtered}");
    let (_, scores) =
        post(&client, &format!("{}/prioritize", server.base), &json!({"Pod": small, "NodeNames": nodes})).await;
    let scores: BTreeMap<String, i64> = scores
        .as_array()
        .expect("array")
        .iter()
        .map(|h| (h["Host"].as_str().unwrap_or_default().to_string(), h["Score"].as_i64().unwrap_or(-1)))
        .collect();
    assert!(scores.values().all(|s| (0..=10).contains(s)), "{scores:?}");
    assert_eq!(scores["r1-0"], 10, "the partly used host is packed first: {scores:?}");
    assert!(scores["r2-0"] < 10, "{scores:?}");
    let node = schedule(&client, &server.base, &small, &["r1-0".into()]).await.expect("bind");
    assert_eq!(node, "r1-0");
    assert_eq!(binder.node_of("two-uid").as_deref(), Some("r1-0"));
    server.stop().await;
}

/// kube-scheduler without `nodeCacheCapable` sends whole Node objects and reads the passing
/// ones back: they come back exactly as sent, fields topoplace does not know included, and
/// `Nodes: {"items": null}` is an empty list, as Go decodes it.
#[tokio::test]
async fn a_full_node_list_comes_back_as_it_was_sent() {
    let (server, _ext, _binder) = static_extender(CLUSTER, 30_000).await;
    let client = reqwest::Client::new();
    let base = &server.base;
    let node = |name: &str| {
        json!({
            "metadata": {"name": name, "labels": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                         "managedFields": [{"manager": "kubelet", "fieldsV1": {"f:status": {}}}]},
            "spec": {"aFieldOfAFutureKubernetes": {"nested": [1, 2.5, "x", null]}},
            "status": {"allocatable": {"nvidia.com/gpu": "8"}, "images": [{"names": ["a"], "sizeBytes": 9}]}
        })
    };
    let items = vec![node("r1-0"), node("cpu-0"), node("r2-1")];
    let args = json!({"Pod": pod("t", "p", "u", 1, None), "Nodes": {"metadata": {}, "items": items}});
    let (status, reply) = post(&client, &format!("{base}/filter"), &args).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["Nodes"]["items"], json!([node("r1-0"), node("r2-1")]), "{reply}");
    assert_eq!(reply["Nodes"]["kind"], "NodeList");
    assert!(reply["FailedAndUnresolvableNodes"]["cpu-0"].is_string(), "{reply}");

    let (status, reply) = post(&client, &format!("{base}/prioritize"), &args).await;
    assert_eq!(status, 200, "{reply}");
    let hosts: Vec<&str> = reply.as_array().expect("array").iter().filter_map(|p| p["Host"].as_str()).collect();
    assert_eq!(hosts, ["r1-0", "cpu-0", "r2-1"]);

    let empty = json!({"Pod": pod("t", "p", "u", 1, None), "Nodes": {"items": null}});
    let (status, reply) = post(&client, &format!("{base}/filter"), &empty).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["Nodes"]["items"], json!([]));
    server.stop().await;
}

#[tokio::test]
async fn bad_input_is_refused_with_a_reason_and_reserves_nothing() {
    let (server, ext, _binder) = static_extender(CLUSTER, 30_000).await;
    let client = reqwest::Client::new();
    let base = &server.base;
    let nodes = node_names();

    let reply = client.post(format!("{base}/filter")).body("{not json").send().await.expect("send");
    assert_eq!(reply.status().as_u16(), 400);
    let body: Value = reply.json().await.expect("json body");
    assert!(body["Error"].as_str().is_some_and(|e| e.contains("filter: the body is not a valid request")), "{body}");

    let (status, body) = post(&client, &format!("{base}/filter"), &json!({"Pod": pod("t", "p", "u", 1, None)})).await;
    assert_eq!(status, 400);
    assert!(body["Error"].as_str().is_some_and(|e| e.contains("neither Nodes nor NodeNames")), "{body}");

    let (status, body) = post(&client, &format!("{base}/prioritize"), &json!({"Pod": 7, "NodeNames": []})).await;
    assert_eq!(status, 400, "{body}");

    // A full NodeList whose second item is not a Node, or has no name: 400 naming the item.
    let good = json!({"metadata": {"name": "r1-0"}});
    for (bad, says) in [
        (json!(3), "Nodes.items[1] is not a Node: invalid type: integer `3`"),
        (json!({"metadata": {"name": 5}}), "Nodes.items[1] is not a Node: invalid type: integer `5`"),
        (json!({"metadata": {"labels": {}}}), "Nodes.items[1].metadata.name is missing"),
    ] {
        for verb in ["filter", "prioritize"] {
            let args = json!({"Pod": pod("t", "p", "u", 1, None), "Nodes": {"items": [good, bad]}});
            let (status, body) = post(&client, &format!("{base}/{verb}"), &args).await;
            assert_eq!(status, 400, "{verb} {bad}: {body}");
            assert!(body["Error"].as_str().is_some_and(|e| e.contains(says)), "{verb} {bad}: {body}");
        }
    }

    let mut no_uid = pod("t", "p", "u", 1, None);
    no_uid["metadata"].as_object_mut().expect("meta").remove("uid");
    let (status, body) = post(&client, &format!("{base}/filter"), &json!({"Pod": no_uid, "NodeNames": nodes})).await;
    assert_eq!(status, 200);
    assert_eq!(body["Error"], "pod t/p: metadata.uid is missing");

    let mut half = pod("t", "p", "u", 1, None);
    half["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = json!("1.5");
    let (_, body) = post(&client, &format!("{base}/filter"), &json!({"Pod": half, "NodeNames": nodes})).await;
    assert!(body["Error"].as_str().is_some_and(|e| e.contains("whole devices")), "{body}");

    // Two members of one gang that disagree on its size: the second is refused.
    let (_, body) = post(
        &client,
        &format!("{base}/filter"),
        &json!({"Pod": pod("t", "m0", "m0", 8, Some(("g", 2))), "NodeNames": nodes}),
    )
    .await;
    assert_eq!(body["Error"], "");
    let (_, body) = post(
        &client,
        &format!("{base}/filter"),
        &json!({"Pod": pod("t", "m1", "m1", 8, Some(("g", 3))), "NodeNames": nodes}),
    )
    .await;
    assert!(
        body["Error"]
            .as_str()
            .is_some_and(|e| e.contains("disagrees on the gang's size: this pod says 3, but pod t/m0 said 2")),
        "{body}"
    );
    // ... and one that disagrees on tensor parallelism, naming both pods and the annotation.
    let mut other_tp = pod("t", "m2", "m2", 8, Some(("g", 2)));
    other_tp["metadata"]["annotations"] = json!({"topoplace.io/tensor-parallel": "16"});
    let (_, body) = post(&client, &format!("{base}/filter"), &json!({"Pod": other_tp, "NodeNames": nodes})).await;
    assert!(
        body["Error"].as_str().is_some_and(|e| e.contains(
            "pod t/m2: gang `t/g` disagrees on topoplace.io/tensor-parallel: this pod says 16, but pod t/m0 said 1"
        )),
        "{body}"
    );

    let (_, body) = post(
        &client,
        &format!("{base}/bind"),
        &json!({"PodName": "ghost", "PodNamespace": "t", "PodUID": "nope", "Node": "r1-0"}),
    )
    .await;
    assert!(body["Error"].as_str().is_some_and(|e| e.contains("not filtered by this extender")), "{body}");
    let (_, body) = post(
        &client,
        &format!("{base}/bind"),
        &json!({"PodName": "m0", "PodNamespace": "t", "PodUID": "m0", "Node": "l40s-0"}),
    )
    .await;
    assert!(body["Error"].as_str().is_some_and(|e| e.contains("planned on node")), "{body}");

    let huge = "x".repeat(extender_limit() + 1);
    let reply = client.post(format!("{base}/filter")).body(huge).send().await.expect("send");
    assert_eq!(reply.status().as_u16(), 413);

    // Only the one valid gang member reserved anything.
    let state = state_of(&client, base).await;
    assert_eq!(state["gangs"].as_array().map(Vec::len), Some(1));
    assert_eq!(state["gangs"][0]["gang"], "t/g");
    ext.check().expect("book invariants");
    server.stop().await;
}

/// The body limit of the test cluster's 10 nodes in view.
fn extender_limit() -> usize {
    topoplace_server::extender::body_limit(10, topoplace_server::extender::BODY_BYTES_MAX_DEFAULT)
}

#[tokio::test]
async fn health_readiness_and_metrics_are_served() {
    let (server, _ext, _binder) = static_extender(CLUSTER, 30_000).await;
    let client = reqwest::Client::new();
    for path in ["healthz", "readyz"] {
        let reply = client.get(format!("{}/{path}", server.base)).send().await.expect("get");
        assert_eq!(reply.status().as_u16(), 200, "{path}");
    }
    schedule(&client, &server.base, &pod("t", "one", "one", 1, None), &node_names()).await.expect("bind");
    let text = client.get(format!("{}/metrics", server.base)).send().await.expect("get").text().await.expect("text");
    assert!(text.contains("topoplace_extender_requests_total{verb=\"filter\",result=\"ok\"} 1"), "{text}");
    assert!(text.contains("topoplace_extender_requests_total{verb=\"bind\",result=\"ok\"} 1"), "{text}");
    assert!(text.contains("topoplace_extender_request_duration_seconds_count{verb=\"filter\"} 1"), "{text}");
    assert!(text.contains("topoplace_pods_bound_total 1"), "{text}");
    assert!(text.contains("topoplace_gpus_free{product=\"H100-SXM5\",memory_mib=\"81559\"} 63"), "{text}");
    server.stop().await;
}

/// A LeaderWorkerSet pod as LWS creates it: group key, worker index and group size.
fn lws_pod(name: &str, index: u32, size: u32, gpus: u32, leader_gpus: Option<&str>) -> Value {
    let mut pod = pod("serving", name, &format!("{name}-uid"), gpus, None);
    pod["metadata"]["labels"] = json!({
        "leaderworkerset.sigs.k8s.io/group-key": "abc123",
        "leaderworkerset.sigs.k8s.io/worker-index": index.to_string(),
    });
    let mut annotations = json!({"leaderworkerset.sigs.k8s.io/size": size.to_string()});
    if let Some(value) = leader_gpus {
        annotations["topoplace.io/leader-gpus"] = json!(value);
    }
    pod["metadata"]["annotations"] = annotations;
    pod
}

/// A pod of a LeaderWorkerSet group with exclusive placement on the leaf, all pods of 8 GPUs.
fn exclusive_lws_pod(group: &str, index: u32, size: u32) -> Value {
    let mut pod = lws_pod(&format!("{group}-{index}"), index, size, 8, None);
    pod["metadata"]["labels"]["leaderworkerset.sigs.k8s.io/group-key"] = json!(group);
    pod["metadata"]["annotations"]["leaderworkerset.sigs.k8s.io/exclusive-topology"] =
        json!("network.topology.nvidia.com/leaf");
    pod
}

/// LeaderWorkerSet's exclusive placement with a leader of the workers' shape: LWS creates
/// the workers only once the leader is bound, with a node selector for the leader's leaf. The
/// leader's filter holds the whole group in one leaf, its bind goes ahead at once, and the
/// workers, offered that leaf only, bind together on the hosts held for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exclusive_leaderworkerset_binds_its_leader_ahead_and_its_workers_in_the_leaders_leaf() {
    let (server, ext, binder) = static_extender(CLUSTER, 30_000).await;
    let client = reqwest::Client::new();
    let base = server.base.clone();
    let leader = exclusive_lws_pod("x", 0, 3);
    let bound =
        tokio::time::timeout(std::time::Duration::from_secs(10), schedule(&client, &base, &leader, &node_names()))
            .await
            .expect("the leader's bind does not wait for workers that do not exist yet");
    let leader_node = bound.expect("the leader is bound");
    let leaf = leader_node.split('-').next().unwrap_or_default().to_string();
    let state = state_of(&client, &base).await;
    let free = free_gpus(&state);
    assert_eq!(free, 72 - 24, "the workers' two hosts stay held: {state}");
    assert!(state.to_string().contains("\"bound\":true"), "the leader's slot is shown bound: {state}");

    // LWS creates the workers with a node selector for the leader's leaf.
    let in_leaf: Vec<String> = node_names().into_iter().filter(|n| n.starts_with(&format!("{leaf}-"))).collect();
    let mut tasks = Vec::new();
    for index in 1..3 {
        let (client, base, nodes) = (client.clone(), base.clone(), in_leaf.clone());
        let worker = exclusive_lws_pod("x", index, 3);
        tasks.push(tokio::spawn(async move { schedule(&client, &base, &worker, &nodes).await }));
    }
    let mut nodes = BTreeSet::from([leader_node.clone()]);
    for task in tasks {
        nodes.insert(task.await.expect("task").expect("each worker is bound"));
    }
    assert_eq!(nodes.len(), 3, "three pods on three hosts of one leaf: {nodes:?}");
    assert!(nodes.iter().all(|n| n.starts_with(&format!("{leaf}-"))), "{nodes:?}");
    for index in 0..3 {
        assert!(binder.node_of(&format!("x-{index}-uid")).is_some(), "x-{index} bound");
    }
    let state = state_of(&client, &base).await;
    assert_eq!(state["gangs"].as_array().map(Vec::len), Some(0), "{state}");

    // Pods that exist together (workers at bind while the leader's Binding is in flight, or
    // before the leader is filtered) are bound all the same, in one leaf.
    let mut tasks = Vec::new();
    for index in [2, 1, 0] {
        let (client, base) = (client.clone(), base.clone());
        let pod = exclusive_lws_pod("z", index, 3);
        tasks.push(tokio::spawn(async move { schedule(&client, &base, &pod, &node_names()).await }));
    }
    let mut nodes = BTreeSet::new();
    for task in tasks {
        nodes.insert(task.await.expect("task").expect("each pod is bound"));
    }
    let leaves: BTreeSet<&str> = nodes.iter().filter_map(|n| n.split('-').next()).collect();
    assert_eq!((nodes.len(), leaves.len()), (3, 1), "{nodes:?}");
    ext.check().expect("book invariants");
    server.stop().await;

    // Workers that never come: when the reservation ends, the leader bound ahead is deleted
    // (LWS recreates the group) and its GPUs are free again.
    let (server, ext, binder) = static_extender(CLUSTER, 300).await;
    let leader = exclusive_lws_pod("y", 0, 3);
    schedule(&client, &server.base, &leader, &node_names()).await.expect("the leader is bound");
    assert!(binder.node_of("y-0-uid").is_some());
    eventually_async("the leader given up", || {
        let binder = binder.clone();
        async move { binder.node_of("y-0-uid").is_none() }
    })
    .await;
    let events = binder.events();
    assert!(events.iter().any(|e| e.starts_with("serving/y-0: GangBindRolledBack")), "{events:?}");
    let state = state_of(&client, &server.base).await;
    let free = free_gpus(&state);
    assert_eq!(free, 72, "nothing of the group is held: {state}");
    ext.check().expect("book invariants");
    server.stop().await;
}

/// LeaderWorkerSet subgroups with `subgroup-exclusive-topology` on the leaf: a group of 4
/// 8-GPU pods in subgroups of 2, each subgroup in a rack of its own. One rack has room for the
/// whole group, but the subgroups are planned 2 + 2 on both racks, by worker index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusive_leaderworkerset_subgroups_take_a_rack_each() {
    let (server, ext, binder) = static_extender(CLUSTER, 30_000).await;
    let client = reqwest::Client::new();
    let mut tasks = Vec::new();
    for index in 0..4 {
        let (client, base) = (client.clone(), server.base.clone());
        let mut pod = lws_pod(&format!("sg-{index}"), index, 4, 8, None);
        pod["metadata"]["annotations"]["leaderworkerset.sigs.k8s.io/subgroup-size"] = json!("2");
        pod["metadata"]["annotations"]["leaderworkerset.sigs.k8s.io/subgroup-exclusive-topology"] =
            json!("network.topology.nvidia.com/leaf");
        tasks.push(tokio::spawn(async move { schedule(&client, &base, &pod, &node_names()).await }));
    }
    let mut nodes = Vec::new();
    for task in tasks {
        nodes.push(task.await.expect("task").expect("each pod is bound"));
    }
    let rack = |node: &str| node.split('-').next().unwrap_or_default().to_string();
    assert_eq!(rack(&nodes[0]), rack(&nodes[1]), "subgroup 0 (workers 0, 1) in one rack: {nodes:?}");
    assert_eq!(rack(&nodes[2]), rack(&nodes[3]), "subgroup 1 (workers 2, 3) in one rack: {nodes:?}");
    assert_ne!(rack(&nodes[0]), rack(&nodes[2]), "each subgroup in a rack of its own: {nodes:?}");
    assert!((0..4).all(|i| binder.node_of(&format!("sg-{i}-uid")).is_some()));
    ext.check().expect("book invariants");
    server.stop().await;
}

/// Issue 18's first input: a LeaderWorkerSet group of 3 whose leader takes no GPUs (never
/// sent to the extender) and two 8-GPU workers. With `topoplace.io/leader-gpus: "0"` the gang
/// is the two workers: both bound together on two hosts, the rest of the cluster free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaderworkerset_whose_leader_takes_no_gpus_binds_its_workers_whole() {
    let (server, ext, binder) = static_extender(CLUSTER, 30_000).await;
    let client = reqwest::Client::new();
    let nodes = node_names();
    let mut tasks = Vec::new();
    for index in 1..3 {
        let (client, base, nodes) = (client.clone(), server.base.clone(), nodes.clone());
        let worker = lws_pod(&format!("lws-0-{index}"), index, 3, 8, Some("0"));
        tasks.push(tokio::spawn(async move { schedule(&client, &base, &worker, &nodes).await }));
    }
    let mut bound = BTreeSet::new();
    for task in tasks {
        bound.insert(task.await.expect("task").expect("each worker is bound"));
    }
    assert_eq!(bound.len(), 2, "two workers on two hosts: {bound:?}");
    assert!(binder.node_of("lws-0-1-uid").is_some() && binder.node_of("lws-0-2-uid").is_some());
    let state = state_of(&client, &server.base).await;
    let free = free_gpus(&state);
    assert_eq!(free, 72 - 16, "only the workers' GPUs are held: {state}");

    // The leader, were it sent, is no gang member and passes as a GPU-less pod; one that asks
    // for GPUs contradicts the annotation; values other than 0 are refused, naming the field.
    let leader = lws_pod("lws-0", 0, 3, 0, Some("0"));
    let (status, reply) =
        post(&client, &format!("{}/filter", server.base), &json!({"Pod": leader, "NodeNames": nodes})).await;
    assert_eq!((status, reply["Error"].as_str().unwrap_or_default()), (200, ""), "{reply}");
    for (pod, expected) in [
        (lws_pod("lws-1", 0, 3, 8, Some("0")), "this pod is the group's leader (worker-index 0) and asks for 8 GPUs"),
        (lws_pod("lws-1-1", 1, 3, 8, Some("4")), "only \"0\" is understood"),
        (lws_pod("lws-2-1", 1, 1, 8, Some("0")), "no worker besides its leader"),
    ] {
        let (status, reply) =
            post(&client, &format!("{}/filter", server.base), &json!({"Pod": pod, "NodeNames": nodes})).await;
        let error = reply["Error"].as_str().unwrap_or_default();
        assert_eq!(status, 200);
        assert!(
            error.contains(expected) && error.contains("metadata.annotations[topoplace.io/leader-gpus]"),
            "{error}"
        );
    }
    ext.check().expect("book consistent");
    server.stop().await;
}

/// The roles of an LWS group of 3 for `topoplace.io/roles`: a 4-GPU leader at worker-index 0
/// and two 8-GPU workers (TP 8) after it.
const LEADER_AND_WORKERS: &str = r#"[{"name": "leader", "gpusPerMember": 4, "tensorParallel": 4},
  {"name": "worker", "members": 2, "gpusPerMember": 8, "tensorParallel": 8}]"#;

/// An LWS pod with `topoplace.io/roles` and the replica's scope.
fn lws_role_pod(name: &str, index: u32, size: u32, gpus: u32, roles: &str) -> Value {
    let mut pod = lws_pod(name, index, size, gpus, None);
    pod["metadata"]["annotations"]["topoplace.io/roles"] = json!(roles);
    pod["metadata"]["annotations"]["topoplace.io/topology-required"] = json!("leaf");
    pod
}

/// Issue 18's second input through the extender: an LWS group whose leader asks 4 GPUs and
/// whose two workers ask 8, all in one rack. Rack r1 keeps one free host (8 GPUs) once three
/// single pods fill it, so the 20-GPU replica must take r2; the three pods arrive at once, and
/// all three are bound together, the leader on 4 GPUs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaderworkerset_with_a_leader_of_another_shape_binds_as_one_replica_in_one_rack() {
    let (server, ext, binder) = static_extender(CLUSTER, 30_000).await;
    let client = reqwest::Client::new();
    let nodes = node_names();
    for index in 0..3 {
        let filler = pod("batch", &format!("filler-{index}"), &format!("filler-{index}-uid"), 8, None);
        let r1: Vec<String> = nodes.iter().filter(|n| n.starts_with("r1-")).cloned().collect();
        schedule(&client, &server.base, &filler, &r1).await.expect("filler bound");
    }
    let mut tasks = Vec::new();
    for (index, gpus) in [(0, 4), (1, 8), (2, 8)] {
        let (client, base, nodes) = (client.clone(), server.base.clone(), nodes.clone());
        let member = lws_role_pod(&format!("lws-0-{index}"), index, 3, gpus, LEADER_AND_WORKERS);
        tasks.push(tokio::spawn(async move { schedule(&client, &base, &member, &nodes).await }));
    }
    let mut placed = Vec::new();
    for task in tasks {
        placed.push(task.await.expect("task").expect("each pod of the replica is bound"));
    }
    assert!(placed.iter().all(|n| n.starts_with("r2-")), "one rack with room for 20 GPUs: {placed:?}");
    assert_ne!(placed[1], placed[2], "two 8-GPU workers on two hosts: {placed:?}");
    for index in 0..3 {
        assert!(binder.node_of(&format!("lws-0-{index}-uid")).is_some());
    }
    let state = state_of(&client, &server.base).await;
    let free = free_gpus(&state);
    assert_eq!(free, 72 - 24 - 20, "the fillers and the replica's 20 GPUs: {state}");
    ext.check().expect("book consistent");
    server.stop().await;
}

/// Pods whose roles cannot be read, or that contradict their roles, are refused with the pod
/// and the field named, and nothing is held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_with_roles_that_contradict_themselves_are_refused_naming_the_field() {
    let (server, ext, _binder) = static_extender(CLUSTER, 30_000).await;
    let client = reqwest::Client::new();
    let nodes = node_names();
    let mut no_gang = pod("serving", "loner", "loner-uid", 8, None);
    no_gang["metadata"]["annotations"] = json!({"topoplace.io/roles": LEADER_AND_WORKERS});
    let mut with_tp = lws_role_pod("tp-1", 1, 3, 8, LEADER_AND_WORKERS);
    with_tp["metadata"]["annotations"]["topoplace.io/tensor-parallel"] = json!("8");
    let mut both = lws_role_pod("both-1", 1, 3, 8, LEADER_AND_WORKERS);
    both["metadata"]["annotations"]["topoplace.io/leader-gpus"] = json!("0");
    let mut named = lws_role_pod("named-1", 1, 3, 8, LEADER_AND_WORKERS);
    named["metadata"]["labels"]["topoplace.io/role"] = json!("leader");
    let cases = [
        (no_gang, "metadata.annotations[topoplace.io/roles]", "a replica with roles is one gang"),
        (
            lws_role_pod("typo-1", 1, 3, 8, r#"[{"name": "w", "gpus": 8}]"#),
            "metadata.annotations[topoplace.io/roles]",
            "[0].gpus: unknown field `gpus`",
        ),
        (
            lws_role_pod("gpus-1", 1, 3, 4, LEADER_AND_WORKERS),
            "spec.containers[*].resources.limits[nvidia.com/gpu]",
            "its role `worker` has 8 GPUs per member",
        ),
        (
            lws_role_pod("size-1", 1, 4, 8, LEADER_AND_WORKERS),
            "metadata.annotations[leaderworkerset.sigs.k8s.io/size]",
            "its roles have 3 members together",
        ),
        (
            lws_role_pod("index-3", 3, 3, 8, LEADER_AND_WORKERS),
            "metadata.labels[leaderworkerset.sigs.k8s.io/worker-index]",
            "past the roles' 3 members",
        ),
        (with_tp, "metadata.annotations[topoplace.io/tensor-parallel]", "belong to each role"),
        (both, "metadata.annotations[topoplace.io/leader-gpus]", "not both"),
        (named, "metadata.labels[topoplace.io/role]", "worker-index 1 is role `worker`"),
    ];
    for (pod, field, expected) in cases {
        let name = pod["metadata"]["name"].as_str().unwrap_or_default().to_string();
        let (status, reply) =
            post(&client, &format!("{}/filter", server.base), &json!({"Pod": pod, "NodeNames": nodes})).await;
        let error = reply["Error"].as_str().unwrap_or_default();
        assert_eq!(status, 200);
        assert!(
            error.contains(&format!("pod serving/{name}")) && error.contains(field) && error.contains(expected),
            "{error}"
        );
    }
    // A worker whose roles differ from the plan its group already has: named with both pods.
    let worker = lws_role_pod("lws-5-1", 1, 3, 8, LEADER_AND_WORKERS);
    let (_, reply) =
        post(&client, &format!("{}/filter", server.base), &json!({"Pod": worker, "NodeNames": nodes})).await;
    assert_eq!(reply["Error"].as_str().unwrap_or_default(), "", "{reply}");
    let other = r#"[{"name": "leader", "gpusPerMember": 4, "tensorParallel": 4},
      {"name": "worker", "members": 2, "gpusPerMember": 8, "tensorParallel": 4}]"#;
    let differing = lws_role_pod("lws-5-2", 2, 3, 8, other);
    let (_, reply) =
        post(&client, &format!("{}/filter", server.base), &json!({"Pod": differing, "NodeNames": nodes})).await;
    let error = reply["Error"].as_str().unwrap_or_default();
    assert!(
        error.contains("pod serving/lws-5-2")
            && error.contains("topoplace.io/roles")
            && error.contains("serving/lws-5-1"),
        "{error}"
    );
    let state = state_of(&client, &server.base).await;
    let free = free_gpus(&state);
    assert_eq!(free, 72 - 20, "only the one valid replica is held: {state}");
    ext.check().expect("book consistent");
    server.stop().await;
}
