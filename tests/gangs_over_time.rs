//! Gangs over time through the extender in Kubernetes mode, against the in-process fake API
//! server: a gang wider than one node preempts (its candidates judged together, the GPUs its
//! victims give back held for it as the pod watch sees them leave, its reservation made once
//! all are free), and a pod of a gang that runs joins it alone.

mod support;

use serde_json::{json, Value};
use support::{
    eventually_async as eventually, free_gpus, kube_server, pod, post, ready, schedule, serve_router, FakeApi, Running,
    Served,
};
use topoplace_online::reservation::BookConfig;
use topoplace_server::grpc::pb::{self, placement_client::PlacementClient};

async fn state(http: &reqwest::Client, base: &str) -> Value {
    http.get(format!("{base}/state")).send().await.expect("get").json().await.expect("json")
}

/// The nodes a filter reply passes.
fn passing(reply: &Value) -> Vec<String> {
    reply["NodeNames"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect())
        .unwrap_or_default()
}

/// A preempt request in the nodeCacheCapable form: per node, the victims' uids.
fn preempt_args(pod: &Value, victims: &[(&str, &str)]) -> Value {
    let map: serde_json::Map<String, Value> = victims
        .iter()
        .map(|(node, uid)| (node.to_string(), json!({"Pods": [{"UID": uid}], "NumPDBViolations": 0})))
        .collect();
    json!({"Pod": pod, "NodeNameToMetaVictims": map})
}

/// Issue 19, input 1, in extender mode over the fake API: two full nodes, a 2 × 8 gang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_node_gang_preempts_and_binds_once_its_victims_left() {
    let api = FakeApi::new();
    for node in ["r1-0", "r1-1"] {
        api.add_node(node, "NVIDIA-H100-80GB-HBM3", 8, "r1");
    }
    api.add_pod(pod("batch", "low-0", "low-0-uid", 8, None), Some("r1-0"), Some("0,1,2,3,4,5,6,7"));
    api.add_pod(pod("batch", "low-1", "low-1-uid", 8, None), Some("r1-1"), Some("0,1,2,3,4,5,6,7"));
    let api_server = serve_router(api.router()).await;
    let server = kube_server(&api_server.base, BookConfig::default(), None).await;
    let base = server.base.clone();
    let http = reqwest::Client::new();
    ready(&http, &base).await;
    let nodes = vec!["r1-0".to_string(), "r1-1".to_string()];

    let high: Vec<Value> =
        (0..2).map(|r| pod("ml", &format!("hi-{r}"), &format!("hi-{r}-uid"), 8, Some(("hi", 2)))).collect();
    for object in &high {
        api.add_pod(object.clone(), None, None);
    }
    let (_, filtered) = post(&http, &format!("{base}/filter"), &json!({"Pod": high[0], "NodeNames": nodes})).await;
    assert!(passing(&filtered).is_empty(), "{filtered}");

    let (status, one) =
        post(&http, &format!("{base}/preempt"), &preempt_args(&high[0], &[("r1-0", "low-0-uid")])).await;
    assert_eq!(status, 200);
    assert_eq!(one, json!({"NodeNameToMetaVictims": {}}), "one node's victims do not make room for the gang");
    // Why not, in /state: the gang's latest preemption verdict.
    let said = state(&http, &base).await;
    let verdict = &said["preemptionVerdicts"][0];
    assert_eq!(
        (&verdict["unit"], &verdict["preemptor"], &verdict["preempted"]),
        (&json!("ml/hi"), &json!("ml/hi-0"), &json!(false)),
        "{said}"
    );
    assert!(verdict["why"].as_str().is_some_and(|why| !why.is_empty()), "{verdict}");
    let both = preempt_args(&high[0], &[("r1-0", "low-0-uid"), ("r1-1", "low-1-uid")]);
    let (_, kept) = post(&http, &format!("{base}/preempt"), &both).await;
    assert_eq!(
        kept,
        json!({"NodeNameToMetaVictims": {
            "r1-0": {"Pods": [{"UID": "low-0-uid"}], "NumPDBViolations": 0},
            "r1-1": {"Pods": [{"UID": "low-1-uid"}], "NumPDBViolations": 0}
        }})
    );
    // The verdict replaced by the new one, and the plan under way, waiting on both nodes.
    let said = state(&http, &base).await;
    assert_eq!(said["preemptionVerdicts"].as_array().map(Vec::len), Some(1), "one per unit: {said}");
    let verdict = &said["preemptionVerdicts"][0];
    assert_eq!((&verdict["preempted"], &verdict["candidates"]), (&json!(true), &json!(true)), "{verdict}");
    assert_eq!(verdict["nodes"], json!(["r1-0", "r1-1"]));
    assert_eq!(verdict["victims"], json!(["batch/low-0", "batch/low-1"]));
    let under_way = &said["preemptions"][0];
    assert_eq!((&under_way["unit"], &under_way["plannedBy"]), (&json!("ml/hi"), &json!("ml/hi-0")), "{said}");
    assert_eq!(under_way["waitingOn"], json!(["r1-0", "r1-1"]));
    // The same through gRPC ClusterState.
    let mut grpc = PlacementClient::connect(server.grpc.clone()).await.expect("connect");
    let cluster = grpc.cluster_state(pb::ClusterStateRequest { summary_only: true }).await.expect("state").into_inner();
    let verdict = cluster.preemption_verdicts.first().cloned().unwrap_or_default();
    assert_eq!((verdict.unit.as_str(), verdict.preempted, verdict.candidates), ("ml/hi", true, true), "{verdict:?}");
    assert_eq!(verdict.victims, ["batch/low-0", "batch/low-1"]);
    let under_way = cluster.preemptions.first().cloned().unwrap_or_default();
    assert_eq!((under_way.planned_by.as_str(), under_way.waiting_on.len()), ("ml/hi-0", 2), "{under_way:?}");

    // kube-scheduler evicts on r1-0; the pod watch sees it leave, and its GPUs are held.
    api.delete_pod("batch", "low-0");
    {
        let (http, base) = (http.clone(), base.clone());
        eventually("r1-0 held for the gang", move || {
            let (http, base) = (http.clone(), base.clone());
            Box::pin(async move {
                let state = state(&http, &base).await;
                state["nodes"][0]["held"].as_array().is_some_and(|held| {
                    held.iter()
                        .any(|h| h["holder"] == "nominated:ml/hi" && h["gpus"].as_array().map(Vec::len) == Some(8))
                })
            })
        })
        .await;
    }
    let intruder = pod("batch", "intruder", "intruder-uid", 8, None);
    api.add_pod(intruder.clone(), None, None);
    let (_, filtered) = post(&http, &format!("{base}/filter"), &json!({"Pod": intruder, "NodeNames": nodes})).await;
    assert!(passing(&filtered).is_empty(), "the freed node is held for the gang: {filtered}");
    let (_, second) = post(&http, &format!("{base}/preempt"), &preempt_args(&high[1], &[("r1-1", "low-1-uid")])).await;
    assert_eq!(second["NodeNameToMetaVictims"].as_object().map(|m| m.len()), Some(1), "{second}");

    api.delete_pod("batch", "low-1");
    {
        let (http, base) = (http.clone(), base.clone());
        eventually("both nodes held for the gang", move || {
            let (http, base) = (http.clone(), base.clone());
            Box::pin(async move { free_gpus(&state(&http, &base).await) == 0 })
        })
        .await;
    }
    // Both members now pass on their planned nodes and bind together.
    let tasks: Vec<_> = high
        .iter()
        .map(|object| {
            let (http, base, nodes, object) = (http.clone(), base.clone(), nodes.clone(), object.clone());
            tokio::spawn(async move {
                // kube-scheduler retries a member until its filter passes.
                for _ in 0..50 {
                    match schedule(&http, &base, &object, &nodes).await {
                        Ok(node) => return Ok(node),
                        Err(error) if error.contains("waits for its victims") => {
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await
                        }
                        Err(error) => return Err(error),
                    }
                }
                Err("never passed".to_string())
            })
        })
        .collect();
    let mut bound = Vec::new();
    for task in tasks {
        bound.push(task.await.expect("task").expect("member bound"));
    }
    bound.sort();
    assert_eq!(bound, nodes, "one member per node");
    assert!(api.pod_node("ml", "hi-0").is_some());
    assert_eq!(api.pod_node("ml", "intruder"), None);
    let state = state(&http, &base).await;
    assert_eq!(state["stats"]["gangsNominated"], 1);
    assert!(api.deletes().is_empty(), "the extender deleted nothing; kube-scheduler evicts");
    server.state().check().expect("book invariants");
    server.stop().await;
    api_server.stop().await;
}

/// Four free 8-GPU nodes in rack `r1` behind the fake API, and the extender on it, ready.
async fn four_free_nodes() -> (FakeApi, Running, Served, Vec<String>) {
    let api = FakeApi::new();
    let nodes: Vec<String> = (0..4).map(|i| format!("r1-{i}")).collect();
    for node in &nodes {
        api.add_node(node, "NVIDIA-H100-80GB-HBM3", 8, "r1");
    }
    let api_server = serve_router(api.router()).await;
    let server = kube_server(&api_server.base, BookConfig::default(), None).await;
    ready(&reqwest::Client::new(), &server.base).await;
    (api, api_server, server, nodes)
}

/// Issue 19, input 2, in extender mode over the fake API: a gang of 2 × 8 runs on two of four
/// nodes; a third pod of it joins alone (8 GPUs held, not 16), binds, and a member deleted
/// and recreated (a new uid) comes back the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_of_a_running_gang_joins_it_alone() {
    let (api, api_server, server, nodes) = four_free_nodes().await;
    let base = server.base.clone();
    let http = reqwest::Client::new();

    let members: Vec<Value> =
        (0..2).map(|r| pod("ml", &format!("g-{r}"), &format!("g-{r}-uid"), 8, Some(("g", 2)))).collect();
    let tasks: Vec<_> = members
        .iter()
        .map(|object| {
            api.add_pod(object.clone(), None, None);
            let (http, base, nodes, object) = (http.clone(), base.clone(), nodes.clone(), object.clone());
            tokio::spawn(async move { schedule(&http, &base, &object, &nodes).await })
        })
        .collect();
    for task in tasks {
        task.await.expect("task").expect("member bound");
    }
    let third = pod("ml", "g-2", "g-2-uid", 8, Some(("g", 2)));
    api.add_pod(third.clone(), None, None);
    let (_, filtered) = post(&http, &format!("{base}/filter"), &json!({"Pod": third, "NodeNames": nodes})).await;
    let joined = passing(&filtered);
    assert_eq!(joined.len(), 1, "{filtered}");
    assert_eq!(free_gpus(&state(&http, &base).await), 8, "its own 8 GPUs held, nothing more");
    let node = schedule(&http, &base, &third, &nodes).await.expect("joined");
    assert_eq!(node, joined[0]);
    assert_eq!(api.pod_node("ml", "g-2").as_deref(), Some(node.as_str()));

    // g-0 is deleted and recreated by its controller (a new uid): it joins again.
    let old_node = api.pod_node("ml", "g-0").expect("bound");
    api.delete_pod("ml", "g-0");
    {
        let (http, base) = (http.clone(), base.clone());
        eventually("g-0's GPUs given back", move || {
            let (http, base) = (http.clone(), base.clone());
            Box::pin(async move { free_gpus(&state(&http, &base).await) == 16 })
        })
        .await;
    }
    let again = pod("ml", "g-0", "g-0-again-uid", 8, Some(("g", 2)));
    api.add_pod(again.clone(), None, None);
    let back = schedule(&http, &base, &again, &nodes).await.expect("came back");
    assert!(nodes.contains(&back), "{back} (was {old_node})");
    let state = state(&http, &base).await;
    assert_eq!(state["stats"]["membersJoined"], 2);
    assert_eq!(free_gpus(&state), 8);
    assert!(api.deletes().is_empty());
    server.state().check().expect("book invariants");
    server.stop().await;
    api_server.stop().await;
}

/// An elastic gang (size 2, `topoplace.io/gang-max-size` 3) through the extender over the fake
/// API: a third pod filtered before the gang runs is told it joins later (nothing held for
/// it), joins once the two are bound, and a fourth is refused at the maximum with its
/// preempt keeping no candidate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_elastic_gang_grows_to_its_maximum_and_no_further() {
    let (api, api_server, server, nodes) = four_free_nodes().await;
    let base = server.base.clone();
    let http = reqwest::Client::new();
    let pods: Vec<Value> = (0..4)
        .map(|r| {
            let mut object = pod("ml", &format!("e-{r}"), &format!("e-{r}-uid"), 8, Some(("e", 2)));
            object["metadata"]["labels"]["topoplace.io/gang-max-size"] = json!("3");
            api.add_pod(object.clone(), None, None);
            object
        })
        .collect();
    for object in &pods[..2] {
        let (_, first) = post(&http, &format!("{base}/filter"), &json!({"Pod": object, "NodeNames": nodes})).await;
        assert_eq!(passing(&first).len(), 1, "{first}");
    }
    let (_, extra) = post(&http, &format!("{base}/filter"), &json!({"Pod": pods[2], "NodeNames": nodes})).await;
    assert!(passing(&extra).is_empty(), "{extra}");
    assert!(extra.to_string().contains("joins it once they run"), "{extra}");
    assert_eq!(free_gpus(&state(&http, &base).await), 16, "the gang's two members held, nothing for the third");
    let tasks: Vec<_> = pods[..2]
        .iter()
        .map(|object| {
            let (http, base, nodes, object) = (http.clone(), base.clone(), nodes.clone(), object.clone());
            tokio::spawn(async move { schedule(&http, &base, &object, &nodes).await })
        })
        .collect();
    for task in tasks {
        task.await.expect("task").expect("member bound");
    }
    schedule(&http, &base, &pods[2], &nodes).await.expect("the third joins");
    let (_, full) = post(&http, &format!("{base}/filter"), &json!({"Pod": pods[3], "NodeNames": nodes})).await;
    assert!(passing(&full).is_empty() && full.to_string().contains("its maximum is 3"), "{full}");
    let busy = api.pod_node("ml", "e-0").expect("bound");
    let (status, answer) =
        post(&http, &format!("{base}/preempt"), &preempt_args(&pods[3], &[(busy.as_str(), "e-0-uid")])).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["NodeNameToMetaVictims"], json!({}), "{answer}");
    assert_eq!(free_gpus(&state(&http, &base).await), 8);
    assert!(api.deletes().is_empty());
    server.state().check().expect("book invariants");
    server.stop().await;
    api_server.stop().await;
}
