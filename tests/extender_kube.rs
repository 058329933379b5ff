//! The extender in Kubernetes mode against the in-process fake API server: the cluster view
//! from node and pod watches (and their resumption after a dropped watch), Bindings with the
//! `topoplace.io/gpus` annotation, a 409 on a pod already bound to the planned node, a Binding
//! whose answer was lost (read back, not undone), and the undo of a gang whose Binding partly
//! failed. The fake API's final state is asserted.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};
use support::{
    eventually_async as eventually, kube_server, kube_server_with, pod, post, ready, schedule, serve_router, FakeApi,
};
use topoplace_online::reservation::BookConfig;
use topoplace_server::assemble::ServerSetup;
use topoplace_server::binder::{BindError, Binder};
use topoplace_server::extender::ExtenderConfig;
use topoplace_server::kube::KubeBinder;

async fn get_json(client: &reqwest::Client, url: &str) -> Value {
    client.get(url).send().await.expect("get").json().await.expect("json")
}

/// Plays kube-scheduler for `objects` at once (their binds are held for each other): each
/// one's outcome, in order.
async fn schedule_together(
    http: &reqwest::Client,
    base: &str,
    nodes: &[String],
    objects: Vec<Value>,
) -> Vec<Result<String, String>> {
    let tasks: Vec<_> = objects
        .into_iter()
        .map(|object| {
            let (http, base, nodes) = (http.clone(), base.to_string(), nodes.to_vec());
            tokio::spawn(async move { schedule(&http, &base, &object, &nodes).await })
        })
        .collect();
    let mut outcomes = Vec::with_capacity(tasks.len());
    for task in tasks {
        outcomes.push(task.await.expect("task"));
    }
    outcomes
}

fn free_of(state: &Value, node: &str) -> Vec<u64> {
    state["nodes"]
        .as_array()
        .and_then(|nodes| nodes.iter().find(|n| n["name"] == node))
        .and_then(|n| n["free"].as_array())
        .map(|free| free.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_mode_binds_gangs_whole_and_undoes_partial_binds() {
    let api = FakeApi::new();
    for rack in ["r1", "r2"] {
        for index in 0..4 {
            api.add_node(&format!("{rack}-{index}"), "NVIDIA-H100-80GB-HBM3", 8, rack);
        }
    }
    // Bound before topoplace started, with its GPUs recorded.
    api.add_pod(pod("batch", "old", "old-uid", 4, None), Some("r1-0"), Some("0,1,2,3"));
    let api_server = serve_router(api.router()).await;

    let book_config = BookConfig { reservation_ttl_ms: 5_000, ..BookConfig::default() };
    let server = kube_server(&api_server.base, book_config, None).await;
    let (base, ext) = (server.base.clone(), server.state().clone());
    let http = reqwest::Client::new();

    ready(&http, &base).await;
    let state = get_json(&http, &format!("{base}/state")).await;
    assert_eq!(free_of(&state, "r1-0"), vec![4, 5, 6, 7], "the pre-bound pod's recorded GPUs are held");
    let nodes: Vec<String> = state["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| n["name"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(nodes.len(), 8);

    // A gang of three whole hosts, members scheduled concurrently, the API answering slowly.
    api.faults.lock().expect("faults").delay = Some(Duration::from_millis(40));
    let mut tasks = Vec::new();
    for member in 0..3 {
        let object = pod("ml", &format!("g-{member}"), &format!("g-{member}-uid"), 8, Some(("g", 3)));
        api.add_pod(object.clone(), None, None);
        let (http, base, nodes) = (http.clone(), base.clone(), nodes.clone());
        tasks.push(tokio::spawn(async move { schedule(&http, &base, &object, &nodes).await }));
    }
    let mut gang_nodes = BTreeSet::new();
    for task in tasks {
        gang_nodes.insert(task.await.expect("task").expect("member bound"));
    }
    assert_eq!(gang_nodes.len(), 3, "three different hosts");
    for member in 0..3 {
        let name = format!("g-{member}");
        assert!(api.pod_node("ml", &name).is_some_and(|n| gang_nodes.contains(&n)), "{name} bound in the API");
        assert_eq!(api.pod_annotation("ml", &name, "topoplace.io/gpus").as_deref(), Some("0,1,2,3,4,5,6,7"));
    }

    api.faults.lock().expect("faults").delay = None;

    // A gang whose second Binding fails: the first member is deleted again, nothing held.
    api.faults.lock().expect("faults").fail_binding.insert("f-1".into());
    let mut tasks = Vec::new();
    for member in 0..2 {
        let object = pod("ml", &format!("f-{member}"), &format!("f-{member}-uid"), 8, Some(("f", 2)));
        api.add_pod(object.clone(), None, None);
        let (http, base, nodes) = (http.clone(), base.clone(), nodes.clone());
        tasks.push(tokio::spawn(async move { schedule(&http, &base, &object, &nodes).await }));
    }
    for task in tasks {
        let error = task.await.expect("task").expect_err("the gang is rolled back");
        assert!(error.contains("not every member could be bound"), "{error}");
    }
    assert!(!api.pod_exists("ml", "f-0"), "the member that did bind was deleted so its controller recreates it");
    assert_eq!(api.pod_node("ml", "f-1"), None);
    assert!(api.deletes().contains(&"f-0".to_string()));
    assert!(api.events().iter().any(|e| e["reason"] == "GangBindRolledBack" && e["involvedObject"]["name"] == "f-1"));
    let state = get_json(&http, &format!("{base}/state")).await;
    assert_eq!(state["stats"]["gangsRolledBack"], 1);
    assert!(state["nodes"].as_array().expect("nodes").iter().all(|n| n["held"]
        .as_array()
        .expect("held")
        .iter()
        .all(|h| !h["holder"].as_str().unwrap_or_default().contains("/f"))));

    // A gang whose second Binding is made but answered 504 (outcome unknown): the pod is read
    // back, found bound to its planned node, and the gang is bound; nothing is deleted.
    api.faults.lock().expect("faults").lose_binding_answer.insert("u-1".into());
    let mut tasks = Vec::new();
    for member in 0..2 {
        let object = pod("ml", &format!("u-{member}"), &format!("u-{member}-uid"), 8, Some(("u", 2)));
        api.add_pod(object.clone(), None, None);
        let (http, base, nodes) = (http.clone(), base.clone(), nodes.clone());
        tasks.push(tokio::spawn(async move { schedule(&http, &base, &object, &nodes).await }));
    }
    let mut unknown_nodes = BTreeSet::new();
    for task in tasks {
        unknown_nodes.insert(task.await.expect("task").expect("bound once read back"));
    }
    assert_eq!(unknown_nodes.len(), 2);
    for name in ["u-0", "u-1"] {
        assert!(api.pod_node("ml", name).is_some_and(|n| unknown_nodes.contains(&n)), "{name} bound in the API");
        assert!(!api.deletes().contains(&name.to_string()), "{name} was not deleted on a guess");
    }
    api.faults.lock().expect("faults").lose_binding_answer.clear();
    let state = get_json(&http, &format!("{base}/state")).await;
    assert_eq!(state["stats"]["gangsRolledBack"], 1, "only the earlier gang was rolled back");

    // A pod already bound to its planned node (a retried bind): 409, read back, success.
    let solo = pod("ml", "solo", "solo-uid", 2, None);
    api.add_pod(solo.clone(), None, None);
    let (_, filtered) = post(&http, &format!("{base}/filter"), &json!({"Pod": solo, "NodeNames": ["r2-3"]})).await;
    assert_eq!(filtered["NodeNames"], json!(["r2-3"]));
    let (status, _) = post(
        &http,
        &format!("{}/api/v1/namespaces/ml/pods/solo/binding", api_server.base),
        &json!({"metadata": {"name": "solo"}, "target": {"apiVersion": "v1", "kind": "Node", "name": "r2-3"}}),
    )
    .await;
    assert_eq!(status, 201, "the fake API binds");
    let (_, reply) = post(
        &http,
        &format!("{base}/bind"),
        &json!({"PodName": "solo", "PodNamespace": "ml", "PodUID": "solo-uid", "Node": "r2-3"}),
    )
    .await;
    assert_eq!(reply, json!({"Error": ""}), "409 on the planned node is success");

    // The watch drops; meanwhile the old pod finishes. The view catches up.
    api.drop_watches();
    api.delete_pod("batch", "old");
    {
        let (http, base) = (http.clone(), base.clone());
        eventually("r1-0 fully free after the old pod is deleted", move || {
            let (http, base) = (http.clone(), base.clone());
            Box::pin(async move { free_of(&get_json(&http, &format!("{base}/state")).await, "r1-0").len() == 8 })
        })
        .await;
    }

    // No GPU is given twice in the API's final state.
    let mut seen = BTreeSet::new();
    for (pod, node, gpus) in api.bound_pods() {
        for gpu in gpus.unwrap_or_default().split(',').filter(|g| !g.is_empty()) {
            assert!(seen.insert((node.clone(), gpu.to_string())), "{pod}: GPU {gpu} on {node} given twice");
        }
    }
    ext.check().expect("book invariants");
    server.stop().await;
    api_server.stop().await;
}

/// A gang member whose held bind lapsed waits in kube-scheduler's queue (before 1.28, until
/// its 60 s flush). When the rest of its gang is at bind, the extender updates the pod (only
/// that pod: its uid is in the patch), which makes kube-scheduler retry it at once; the retry
/// binds the gang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_hold_lapsed_is_asked_back_when_the_rest_of_its_gang_is_at_bind() {
    let api = FakeApi::new();
    for index in 0..4 {
        api.add_node(&format!("r1-{index}"), "NVIDIA-H100-80GB-HBM3", 8, "r1");
    }
    let api_server = serve_router(api.router()).await;
    // A hold long enough for the test to play kube-scheduler's retry on a loaded machine, and
    // the retry asked for sooner than kube-scheduler needs (the test assumes nothing).
    let setup = ServerSetup {
        book: BookConfig { reservation_ttl_ms: 10_000, bind_hold_ms: 1_500, ..BookConfig::default() },
        extender: ExtenderConfig { gang_retry_after: Duration::from_millis(50), ..ExtenderConfig::default() },
        ..ServerSetup::default()
    };
    let server = kube_server_with(&api_server.base, setup, None).await;
    let (base, ext) = (server.base.clone(), server.state().clone());
    let client = kube::Client::try_from(kube::Config::new(api_server.base.parse().expect("uri"))).expect("client");
    let kube_binder = KubeBinder::new(client);
    let http = reqwest::Client::new();
    ext.book_installed().await;
    let nodes: Vec<String> = (0..4).map(|i| format!("r1-{i}")).collect();

    let early = pod("ml", "w-0", "w-0-uid", 8, Some(("w", 2)));
    api.add_pod(early.clone(), None, None);
    let error = schedule(&http, &base, &early, &nodes).await.expect_err("held, then answered at the hold");
    assert!(error.contains("have not reached bind"), "{error}");
    assert!(api.patches().is_empty(), "nothing to ask while the other member has not reached bind");

    let late = pod("ml", "w-1", "w-1-uid", 8, Some(("w", 2)));
    api.add_pod(late.clone(), None, None);
    let held = {
        let (http, base, nodes) = (http.clone(), base.clone(), nodes.clone());
        tokio::spawn(async move { schedule(&http, &base, &late, &nodes).await })
    };
    {
        let api = api.clone();
        eventually("the lapsed member is asked back", move || {
            let api = api.clone();
            Box::pin(async move { api.pod_annotation("ml", "w-0", "topoplace.io/gang-retry").is_some() })
        })
        .await;
    }
    assert_eq!(api.patches(), vec!["w-0".to_string()], "only the lapsed member is updated");
    // kube-scheduler's retry of the updated pod binds the gang.
    let first = schedule(&http, &base, &early, &nodes).await.expect("the retry binds the gang");
    let second = held.await.expect("task").expect("the held member binds with it");
    assert_ne!(first, second);
    assert_eq!(api.pod_node("ml", "w-0"), Some(first));
    assert_eq!(api.pod_node("ml", "w-1"), Some(second));

    // A lapsed member deleted while parked (the pod watch sees bound pods only): asking it
    // back meets 404, and its slot is freed for a replacement.
    let parked = pod("ml", "x-0", "x-0-uid", 8, Some(("x", 2)));
    api.add_pod(parked.clone(), None, None);
    schedule(&http, &base, &parked, &nodes).await.expect_err("held, then answered at the hold");
    api.delete_pod("ml", "x-0");
    let other = pod("ml", "x-1", "x-1-uid", 8, Some(("x", 2)));
    api.add_pod(other.clone(), None, None);
    let held = {
        let (http, base, nodes) = (http.clone(), base.clone(), nodes.clone());
        tokio::spawn(async move { schedule(&http, &base, &other, &nodes).await })
    };
    {
        let (http, base) = (http.clone(), base.clone());
        eventually("the deleted member's slot freed", move || {
            let (http, base) = (http.clone(), base.clone());
            Box::pin(async move {
                let state = get_json(&http, &format!("{base}/state")).await;
                let slots = state["gangs"]
                    .as_array()
                    .and_then(|g| g.iter().find(|g| g["gang"] == "ml/x"))
                    .map(|g| g["slots"].clone());
                slots.is_some_and(|slots| !slots.to_string().contains("\"ml/x-0\""))
            })
        })
        .await;
    }
    let replacement = pod("ml", "x-2", "x-2-uid", 8, Some(("x", 2)));
    api.add_pod(replacement.clone(), None, None);
    schedule(&http, &base, &replacement, &nodes).await.expect("the replacement binds the gang");
    held.await.expect("task").expect("the held member binds with it");

    // The patch carries the uid: a pod of that name with another uid is never touched.
    let stranger = topoplace_online::reservation::PodIdentity {
        namespace: "ml".into(),
        name: "w-0".into(),
        uid: "another-uid".into(),
    };
    let refused = kube_binder.retry(&stranger).await.expect_err("another pod under the same name");
    assert!(
        matches!(&refused, BindError::Gone { reason } if reason.contains("Precondition failed")),
        "another uid is the pod gone, with the API server's words: {refused:?}"
    );
    assert_eq!(api.patches(), vec!["w-0".to_string()], "nothing patched but the first lapsed member");

    ext.check().expect("book invariants");
    server.stop().await;
    api_server.stop().await;
}

/// Pods that name their PodGroup object and carry no `topoplace.io/gang-size`: the extender
/// on an API server reads the object (as the secondary scheduler does) and sizes the gang from
/// it. An upstream PodGroup (`scheduling.k8s.io/v1beta1`, `spec.schedulingGroup`) gives
/// `minCount` and a topology key that keeps the gang in one rack; a coscheduling PodGroup
/// gives `minMember`; a PodGroup that does not exist is an error naming it, with nothing held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gangs_are_sized_from_the_pod_group_objects_their_pods_name() {
    let api = FakeApi::new();
    // Rack r1: one free host of three; rack r2: two free hosts.
    for index in 0..3 {
        api.add_node(&format!("r1-{index}"), "NVIDIA-H100-80GB-HBM3", 8, "r1");
    }
    for index in 0..2 {
        api.add_node(&format!("r2-{index}"), "NVIDIA-H100-80GB-HBM3", 8, "r2");
    }
    api.add_pod(pod("batch", "a", "a-uid", 8, None), Some("r1-1"), Some("0,1,2,3,4,5,6,7"));
    api.add_pod(pod("batch", "b", "b-uid", 8, None), Some("r1-2"), Some("0,1,2,3,4,5,6,7"));
    api.add_upstream_pod_group("ml", "up", Some(2), Some("network.topology.nvidia.com/leaf"));
    api.add_pod_group("ml", "cosched", 2);
    let api_server = serve_router(api.router()).await;
    let server =
        kube_server(&api_server.base, BookConfig { reservation_ttl_ms: 10_000, ..BookConfig::default() }, None).await;
    let (base, ext) = (server.base.clone(), server.state().clone());
    ext.book_installed().await;
    let http = reqwest::Client::new();
    let nodes: Vec<String> = ["r1-0", "r1-1", "r1-2", "r2-0", "r2-1"].map(String::from).to_vec();
    let upstream = |name: &str, group: &str| {
        let mut pod = pod("ml", name, &format!("{name}-uid"), 8, None);
        pod["spec"]["schedulingGroup"] = json!({"podGroupName": group});
        pod
    };

    // The first member is filtered to the rack where the whole gang fits.
    let first = upstream("up-0", "up");
    api.add_pod(first.clone(), None, None);
    let (status, reply) = post(&http, &format!("{base}/filter"), &json!({"Pod": first, "NodeNames": nodes})).await;
    assert_eq!(status, 200);
    assert_eq!(reply["Error"], "", "{reply}");
    let passing = reply["NodeNames"].as_array().cloned().unwrap_or_default();
    assert!(!passing.is_empty() && passing.iter().all(|n| n.as_str().is_some_and(|n| n.starts_with("r2-"))), "{reply}");
    let state = get_json(&http, &format!("{base}/state")).await;
    let gang = state["gangs"].as_array().and_then(|g| g.iter().find(|g| g["gang"] == "ml/up")).cloned();
    assert!(gang.is_some_and(|g| g["slots"].as_array().map(Vec::len) == Some(2)), "{state}");
    let second = upstream("up-1", "up");
    api.add_pod(second.clone(), None, None);
    let bound = {
        let (http, base, nodes) = (http.clone(), base.clone(), nodes.clone());
        tokio::spawn(async move { schedule(&http, &base, &first, &nodes).await })
    };
    schedule(&http, &base, &second, &nodes).await.expect("the second member binds the gang");
    bound.await.expect("task").expect("the first member binds with it");
    let racks: BTreeSet<String> = ["up-0", "up-1"]
        .iter()
        .filter_map(|name| api.pod_node("ml", name))
        .map(|node| node.split('-').next().unwrap_or_default().to_string())
        .collect();
    assert_eq!(racks, BTreeSet::from(["r2".to_string()]), "minCount 2 in one rack of the topology key");

    // A pod naming a PodGroup that does not exist: refused, naming it; nothing held.
    let lost = upstream("lost", "missing");
    api.add_pod(lost.clone(), None, None);
    let (_, reply) = post(&http, &format!("{base}/filter"), &json!({"Pod": lost, "NodeNames": nodes})).await;
    let error = reply["Error"].as_str().unwrap_or_default();
    assert!(error.starts_with("pod ml/lost: its PodGroup ml/missing (scheduling.k8s.io/v1beta1"), "{reply}");
    let state = get_json(&http, &format!("{base}/state")).await;
    assert!(!state.to_string().contains("lost-uid"), "nothing held for it: {state}");

    // A PodGroup that is one child of a CompositePodGroup (alpha): refused, naming both.
    let mut child = api.upstream_pod_group("ml", "up").expect("up");
    child["metadata"]["name"] = json!("prefill");
    child["spec"]["parentCompositePodGroupName"] = json!("replica-0");
    api.put_upstream_pod_group("ml", "prefill", child);
    let part = upstream("p-0", "prefill");
    api.add_pod(part.clone(), None, None);
    let (_, reply) = post(&http, &format!("{base}/filter"), &json!({"Pod": part, "NodeNames": nodes})).await;
    let error = reply["Error"].as_str().unwrap_or_default();
    assert!(
        error.contains(
            "PodGroup ml/prefill belongs to CompositePodGroup ml/replica-0 (spec.parentCompositePodGroupName"
        ),
        "{reply}"
    );

    // A coscheduling PodGroup (scheduling.x-k8s.io label) of minMember 2, one free host left
    // (r1-0): the gang of two 8-GPU pods does not fit, and is refused as a whole.
    let mut cosched = pod("ml", "c-0", "c-0-uid", 8, None);
    cosched["metadata"]["labels"] = json!({"scheduling.x-k8s.io/pod-group": "cosched"});
    api.add_pod(cosched.clone(), None, None);
    let (_, reply) = post(&http, &format!("{base}/filter"), &json!({"Pod": cosched, "NodeNames": nodes})).await;
    assert_eq!(reply["NodeNames"], json!([]), "{reply}");
    assert!(reply.to_string().contains("needs 2 member(s) of 8 GPU(s)"), "sized by minMember: {reply}");
    ext.check().expect("book invariants");
    server.stop().await;
}

/// Issue 20: nothing is bound or deleted on an extender request's word alone. A forged gang
/// naming one real pending pod and one invented pod binds neither and deletes nothing; a bind
/// naming a real pod with another uid, a pod of another scheduler, a pod of a namespace the
/// extender does not serve, or a real pod of another gang is refused, naming why. The API's
/// final state shows no Binding and no delete, and every GPU is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_binds_bind_nothing_and_delete_nothing() {
    let api = FakeApi::new();
    for index in 0..4 {
        api.add_node(&format!("r1-{index}"), "NVIDIA-H100-80GB-HBM3", 8, "r1");
    }
    let api_server = serve_router(api.router()).await;
    let admission = topoplace_server::binder::Admission {
        namespaces: Some(["ml".to_string()].into()),
        ..topoplace_server::binder::Admission::default()
    };
    // Refused binds keep their gang's reservation for the real pods' retry: 3 s here.
    let book = BookConfig { reservation_ttl_ms: 3_000, ..BookConfig::default() };
    let setup = ServerSetup { admission, book, ..ServerSetup::default() };
    let server = kube_server_with(&api_server.base, setup, None).await;
    let (base, ext) = (server.base.clone(), server.state().clone());
    let http = reqwest::Client::new();
    ready(&http, &base).await;
    let nodes: Vec<String> = (0..4).map(|i| format!("r1-{i}")).collect();

    // A real pending member and an invented one, scheduled together.
    let real = pod("ml", "real", "real-uid", 8, Some(("g", 2)));
    api.add_pod(real.clone(), None, None);
    let ghost = pod("ml", "ghost", "ghost-uid", 8, Some(("g", 2)));
    for outcome in schedule_together(&http, &base, &nodes, vec![real, ghost]).await {
        let error = outcome.expect_err("nothing bound");
        assert!(error.contains("ml/ghost") && error.contains("not bound"), "{error}");
    }

    // One pod at a time: each refused, naming what differs.
    let mut other_uid = pod("ml", "solo", "forged-uid", 2, None);
    api.add_pod(pod("ml", "solo", "solo-uid", 2, None), None, None);
    let mut volcano = pod("ml", "volcano", "volcano-uid", 2, None);
    volcano["spec"]["schedulerName"] = json!("volcano");
    api.add_pod(volcano.clone(), None, None);
    let outside = pod("other", "outside", "outside-uid", 2, None);
    api.add_pod(outside.clone(), None, None);
    // A real pod of gang h, described in the request as a member of a gang of one, g1.
    api.add_pod(pod("ml", "h-0", "h-0-uid", 8, Some(("h", 1))), None, None);
    let claimed = pod("ml", "h-0", "h-0-uid", 8, Some(("g1", 1)));
    // A real pending 2-GPU pod described as asking 1 GPU.
    api.add_pod(pod("ml", "two", "two-uid", 2, None), None, None);
    let smaller = pod("ml", "two", "two-uid", 1, None);
    other_uid["metadata"]["labels"] = json!({});
    for (object, expected) in [
        (other_uid, "has uid `solo-uid`, not `forged-uid`"),
        (volcano, "spec.schedulerName is `volcano`"),
        // Refused at its filter already: nothing is planned for it.
        (outside, "namespace `other` is not one this extender serves (--namespaces)"),
        (claimed, "the API server's pod says gang `ml/h` of 1"),
        (smaller, "the request says nvidia.com/gpu 1, but the API server's pod says 2"),
    ] {
        let error = schedule(&http, &base, &object, &nodes).await.expect_err("refused");
        assert!(error.contains(expected), "{error}");
    }
    {
        let (http, base) = (http.clone(), base.clone());
        eventually("the refused gangs' reservations expire", move || {
            let (http, base) = (http.clone(), base.clone());
            Box::pin(async move { support::free_gpus(&get_json(&http, &format!("{base}/state")).await) == 32 })
        })
        .await;
    }
    // A pod filtered while pending, then bound elsewhere by someone else before its bind.
    let elsewhere = pod("ml", "elsewhere", "elsewhere-uid", 2, None);
    api.add_pod(elsewhere.clone(), None, None);
    let (_, filtered) = post(&http, &format!("{base}/filter"), &json!({"Pod": elsewhere, "NodeNames": nodes})).await;
    let planned = filtered["NodeNames"][0].as_str().unwrap_or_default().to_string();
    let other = nodes.iter().find(|n| **n != planned).cloned().unwrap_or_default();
    let (status, _) = post(
        &http,
        &format!("{}/api/v1/namespaces/ml/pods/elsewhere/binding", api_server.base),
        &json!({"metadata": {"name": "elsewhere"}, "target": {"apiVersion": "v1", "kind": "Node", "name": other}}),
    )
    .await;
    assert_eq!(status, 201);
    let (_, reply) = post(
        &http,
        &format!("{base}/bind"),
        &json!({"PodName": "elsewhere", "PodNamespace": "ml", "PodUID": "elsewhere-uid", "Node": planned}),
    )
    .await;
    // Refused by the API server's answer, or earlier when the pod watch already showed it bound.
    let error = reply["Error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&format!("already bound to `{other}`")) || error.contains(&format!("planned on node `{other}`")),
        "{reply}"
    );
    assert_eq!(api.pod_node("ml", "elsewhere"), Some(other));
    let made: Vec<(String, String)> = api.bindings().into_iter().filter(|(pod, _)| pod != "elsewhere").collect();

    // A delete is conditional on the uid: a pod of that name but another uid stays.
    let client = kube::Client::try_from(kube::Config::new(api_server.base.parse().expect("uri"))).expect("client");
    let stale = topoplace_online::reservation::PodIdentity {
        namespace: "ml".into(),
        name: "solo".into(),
        uid: "an-earlier-solo".into(),
    };
    let error = KubeBinder::new(client).delete(&stale).await.expect_err("another uid");
    assert!(error.contains("Precondition failed"), "{error}");
    assert!(api.pod_exists("ml", "solo"));

    assert!(made.is_empty(), "no Binding made by topoplace: {made:?}");
    assert!(api.deletes().is_empty(), "nothing deleted: {:?}", api.deletes());
    let state = get_json(&http, &format!("{base}/state")).await;
    assert_eq!(support::free_gpus(&state), 32 - 2, "the pod bound elsewhere counted where it is: {state}");

    // A LeaderWorkerSet group bound leader first: an invented worker refused at bind must not
    // cost the real leader its place. The leader stays bound, its workers' GPUs stay held, the
    // invented pod's slot goes to the real worker, and the group is bound whole.
    let lws = |index: u32| {
        let name = if index == 0 { "lws-0".to_string() } else { format!("lws-0-{index}") };
        let mut object = pod("ml", &name, &format!("{name}-uid"), 8, None);
        object["metadata"]["labels"] = json!({"leaderworkerset.sigs.k8s.io/group-key": "grp",
            "leaderworkerset.sigs.k8s.io/worker-index": index.to_string()});
        object["metadata"]["annotations"] = json!({"leaderworkerset.sigs.k8s.io/size": "3",
            "leaderworkerset.sigs.k8s.io/exclusive-topology": "network.topology.nvidia.com/leaf"});
        object
    };
    api.delete_pod("ml", "elsewhere");
    api.add_pod(lws(0), None, None);
    schedule(&http, &base, &lws(0), &nodes).await.expect("the leader bound ahead");
    api.add_pod(lws(2), None, None);
    for outcome in schedule_together(&http, &base, &nodes, vec![lws(1), lws(2)]).await {
        let error = outcome.expect_err("refused");
        assert!(error.contains("ml/lws-0-1"), "{error}");
    }
    assert!(api.pod_node("ml", "lws-0").is_some(), "the leader stays bound");
    assert!(api.deletes().iter().all(|d| d != "lws-0"), "the leader is not deleted: {:?}", api.deletes());
    let state = get_json(&http, &format!("{base}/state")).await;
    assert_eq!(support::free_gpus(&state), 32 - 8 - 16, "the workers' GPUs stay held: {state}");
    api.add_pod(lws(1), None, None);
    for outcome in schedule_together(&http, &base, &nodes, vec![lws(1), lws(2)]).await {
        outcome.expect("the real workers bound");
    }
    assert!(api.deletes().is_empty(), "nothing deleted by topoplace: {:?}", api.deletes());
    let lws_nodes: BTreeSet<String> =
        ["lws-0", "lws-0-1", "lws-0-2"].iter().filter_map(|name| api.pod_node("ml", name)).collect();
    assert_eq!(lws_nodes.len(), 3, "the group bound whole on three hosts: {lws_nodes:?}");
    ext.check().expect("book invariants");
    server.stop().await;
    api_server.stop().await;
}

/// Issue 22, GFD's mixed MIG strategy through the extender: a pod asking for
/// `nvidia.com/mig-1g.10gb` passes only a node with such devices free and is bound with an
/// index among them; a pod asking for `nvidia.com/gpu` takes the same node's whole GPUs, whose
/// indices are counted apart; `/state` lists the node once per resource.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_extender_serves_a_mixed_mig_node_per_resource() {
    let api = FakeApi::new();
    api.add_node("h100-0", "NVIDIA-H100-80GB-HBM3", 8, "r1");
    api.put_node(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "a100-mixed", "uid": "node-a100-mixed", "labels": {
            "kubernetes.io/hostname": "a100-mixed",
            "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB",
            "nvidia.com/gpu.count": "2",
            "nvidia.com/mig.strategy": "mixed",
            "nvidia.com/mig-1g.10gb.count": "2",
            "nvidia.com/mig-1g.10gb.memory": "9856",
            "network.topology.nvidia.com/spine": "s1",
            "network.topology.nvidia.com/leaf": "r1",
        }},
        "status": {"allocatable": {"nvidia.com/gpu": "1", "nvidia.com/mig-1g.10gb": "2", "cpu": "96", "pods": "110"},
                   "conditions": [{"type": "Ready", "status": "True"}]}
    }));
    let api_server = serve_router(api.router()).await;
    let server = kube_server(&api_server.base, BookConfig::default(), None).await;
    let base = server.base.clone();
    let http = reqwest::Client::new();
    ready(&http, &base).await;
    let state = get_json(&http, &format!("{base}/state")).await;
    let mut listed: Vec<(String, String, u64)> = state["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| {
            let text = |k: &str| n[k].as_str().unwrap_or_default().to_string();
            (text("name"), text("resource"), n["gpus"].as_u64().unwrap_or_default())
        })
        .collect();
    listed.sort();
    assert_eq!(
        listed,
        [
            ("a100-mixed".into(), "nvidia.com/gpu".into(), 1),
            ("a100-mixed".into(), "nvidia.com/mig-1g.10gb".into(), 2),
            ("h100-0".into(), "nvidia.com/gpu".into(), 8),
        ]
    );
    let nodes = vec!["h100-0".to_string(), "a100-mixed".to_string()];
    let mig_pod = |name: &str| {
        let mut object = pod("ml", name, &format!("{name}-uid"), 0, None);
        object["spec"]["containers"][0]["resources"]["limits"] = json!({"nvidia.com/mig-1g.10gb": "1"});
        object
    };
    for name in ["slice-0", "slice-1"] {
        let object = mig_pod(name);
        api.add_pod(object.clone(), None, None);
        assert_eq!(schedule(&http, &base, &object, &nodes).await.as_deref(), Ok("a100-mixed"));
    }
    let mut devices: Vec<String> =
        ["slice-0", "slice-1"].iter().filter_map(|name| api.pod_annotation("ml", name, "topoplace.io/gpus")).collect();
    devices.sort();
    assert_eq!(devices, ["0", "1"]);
    // No 1g.10gb device is left: the third is refused, naming the resource on the other node.
    let third = mig_pod("slice-2");
    api.add_pod(third.clone(), None, None);
    let error = schedule(&http, &base, &third, &nodes).await.expect_err("no device left");
    assert!(error.contains("node offers no nvidia.com/mig-1g.10gb devices"), "h100-0: {error}");
    assert!(error.contains("a100-mixed") && error.contains("fewer free GPUs"), "a100-mixed is full: {error}");
    // The whole GPU of the same node is its own pool: index 0 again.
    let whole = pod("ml", "whole", "whole-uid", 1, None);
    api.add_pod(whole.clone(), None, None);
    let bound = schedule(&http, &base, &whole, &["a100-mixed".to_string()]).await;
    assert_eq!(bound.as_deref(), Ok("a100-mixed"));
    assert_eq!(api.pod_annotation("ml", "whole", "topoplace.io/gpus").as_deref(), Some("0"));
    server.stop().await;
    api_server.stop().await;
}
