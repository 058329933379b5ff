//! A hostile network and hostile input (issue 20): the extender over HTTPS refuses clients
//! without a certificate of its client CA; every limit a caller can reach answers with its
//! documented code (HTTP 413 or 429, gRPC `RESOURCE_EXHAUSTED` in `tests/grpc.rs`) and holds
//! nothing for the refused request.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::{free_gpus, kube_server_with, pki, pod, post, schedule, serve_router, static_server, FakeApi};
use topoplace_online::reservation::BookConfig;
use topoplace_server::assemble::ServerSetup;
use topoplace_server::extender::tls::ExtenderTls;
use topoplace_server::extender::{self, ExtenderConfig, InFlightLimits};

const CLUSTER: &str = "testdata/extender/cluster.yaml";

fn node_names() -> Vec<String> {
    support::extender_node_names()
}

/// An HTTPS client that trusts `ca` and presents `identity` (PEM certificate, PEM key).
fn https_client(ca: &str, identity: Option<&(String, String)>) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).expect("CA"))
        .timeout(Duration::from_secs(10));
    if let Some((cert, key)) = identity {
        let pem = format!("{cert}\n{key}");
        builder = builder.identity(reqwest::Identity::from_pem(pem.as_bytes()).expect("identity"));
    }
    builder.build().expect("client")
}

async fn get(client: &reqwest::Client, url: &str) -> Result<(u16, String), String> {
    let reply = client.get(url).send().await.map_err(|e| format!("{e:?}"))?;
    let status = reply.status().as_u16();
    Ok((status, reply.text().await.map_err(|e| e.to_string())?))
}

/// Asserts a 429 with `Retry-After: 1` whose `Error` contains `says`.
async fn assert_over_limit(reply: reqwest::Response, says: &str) {
    assert_eq!(reply.status().as_u16(), 429);
    assert_eq!(reply.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
    let body: Value = reply.json().await.expect("json");
    assert!(body["Error"].as_str().is_some_and(|e| e.contains(says)), "{body}");
}

/// A server with the in-flight limits `in_flight` on a fake API of two 8-GPU nodes (`api`,
/// with what the test added), its view synced: the API's server, the server, its nodes.
async fn kube_server_limited(
    api: &FakeApi,
    in_flight: InFlightLimits,
) -> (support::Running, support::Served, Vec<String>) {
    let nodes: Vec<String> = (0..2).map(|index| format!("r1-{index}")).collect();
    for node in &nodes {
        api.add_node(node, "NVIDIA-H100-80GB-HBM3", 8, "r1");
    }
    let api_server = serve_router(api.router()).await;
    let config = ExtenderConfig { in_flight, ..ExtenderConfig::default() };
    let server =
        kube_server_with(&api_server.base, ServerSetup { extender: config, ..ServerSetup::default() }, None).await;
    server.state().book_installed().await;
    (api_server, server, nodes)
}

#[tokio::test]
async fn over_https_only_clients_with_a_certificate_of_the_client_ca_reach_the_verbs_and_the_state() {
    let pki = pki();
    let tls = ExtenderTls::from_pem(pki.server.0.as_bytes(), pki.server.1.as_bytes(), pki.ca.as_bytes()).expect("tls");
    let (server, ext, binder) =
        static_server(CLUSTER, ServerSetup { extender_tls: Some(tls), ..ServerSetup::default() }).await;
    let base = server.base.clone();
    assert!(base.starts_with("https://"), "{base}");
    let nodes = node_names();

    // kube-scheduler with its client certificate: every verb and /state work.
    let trusted = https_client(&pki.ca, Some(&pki.client));
    let (status, state) = get(&trusted, &format!("{base}/state")).await.expect("state");
    assert_eq!(status, 200, "{state}");
    let before = free_gpus(&serde_json::from_str(&state).expect("json"));
    let node = schedule(&trusted, &base, &pod("t", "real", "real-uid", 1, None), &nodes).await.expect("bound");
    assert_eq!(binder.node_of("real-uid"), Some(node));
    let (status, state) = get(&trusted, &format!("{base}/state")).await.expect("state");
    assert_eq!(status, 200, "{state}");
    let state: Value = serde_json::from_str(&state).expect("json");
    assert_eq!(free_gpus(&state), before - 1);
    let (status, metrics) = get(&trusted, &format!("{base}/metrics")).await.expect("metrics");
    assert_eq!(status, 200);
    assert!(metrics.contains("topoplace_extender_requests_total"), "{metrics}");

    // No certificate: the probes answer (the kubelet's present none), nothing else does.
    let anonymous = https_client(&pki.ca, None);
    for probe in ["healthz", "readyz"] {
        assert_eq!(get(&anonymous, &format!("{base}/{probe}")).await.expect(probe).0, 200, "{probe}");
    }
    for path in ["state", "metrics"] {
        let (status, body) = get(&anonymous, &format!("{base}/{path}")).await.expect(path);
        assert_eq!(status, 403, "{path}: {body}");
        assert!(body.contains("a client certificate signed by the extender's client CA"), "{path}: {body}");
    }
    let forged = json!({"Pod": pod("t", "forged", "forged-uid", 8, Some(("g", 2))), "NodeNames": nodes});
    let (status, body) = post(&anonymous, &format!("{base}/filter"), &forged).await;
    assert_eq!(status, 403, "{body}");
    assert!(body["Error"].as_str().is_some_and(|e| e.contains("/filter: a client certificate")), "{body}");
    let bind = json!({"PodName": "real", "PodNamespace": "t", "PodUID": "real-uid", "Node": "r1-0"});
    assert_eq!(post(&anonymous, &format!("{base}/bind"), &bind).await.0, 403);

    // A certificate another CA signed: the handshake is refused, nothing is answered.
    let stranger = https_client(&pki.ca, Some(&pki.stranger));
    let refused = stranger.post(format!("{base}/filter")).json(&forged).send().await;
    assert!(refused.is_err(), "a stranger's certificate was accepted: {refused:?}");
    assert!(get(&stranger, &format!("{base}/healthz")).await.is_err(), "a stranger's certificate reached a probe");
    // Plain HTTP on the HTTPS port gets no answer from the verbs.
    let plain = reqwest::Client::new();
    let port = base.rsplit(':').next().expect("port");
    let spoken = plain.post(format!("http://127.0.0.1:{port}/filter")).json(&forged).send().await;
    assert!(spoken.as_ref().map_or(true, |r| !r.status().is_success()), "{spoken:?}");
    // A client that does not trust topoplace's certificate (another CA) does not talk to it.
    let wary = https_client(&pki.stranger.0, Some(&pki.client));
    assert!(get(&wary, &format!("{base}/healthz")).await.is_err());

    // None of the refused requests held a GPU.
    let (_, state) = get(&trusted, &format!("{base}/state")).await.expect("state");
    let state: Value = serde_json::from_str(&state).expect("json");
    assert_eq!(free_gpus(&state), before - 1);
    assert_eq!(state["gangs"].as_array().map(Vec::len), Some(0), "{state}");
    ext.check().expect("book invariants");
    server.stop().await;
}

#[tokio::test]
async fn with_verb_clients_other_certificates_of_the_ca_read_the_metrics_but_call_no_verb() {
    let pki = pki();
    let tls = ExtenderTls::from_pem(pki.server.0.as_bytes(), pki.server.1.as_bytes(), pki.ca.as_bytes()).expect("tls");
    let extender = ExtenderConfig { verb_clients: Some(["ci-job".to_string()].into()), ..ExtenderConfig::default() };
    let setup = ServerSetup { extender_tls: Some(tls), extender, ..ServerSetup::default() };
    let (server, _ext, _binder) = static_server(CLUSTER, setup).await;
    let (base, nodes) = (server.base.clone(), node_names());
    let args = json!({"Pod": pod("t", "p", "p-uid", 1, None), "NodeNames": nodes});
    // The scraper's certificate: /metrics and /state, no verb.
    let scraper = https_client(&pki.ca, Some(&pki.scraper));
    for path in ["metrics", "state"] {
        assert_eq!(get(&scraper, &format!("{base}/{path}")).await.expect(path).0, 200, "{path}");
    }
    let (status, body) = post(&scraper, &format!("{base}/filter"), &args).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["Error"].as_str().is_some_and(
            |e| e.contains("\"prometheus\"]") && e.contains("only ci-job may call the verbs (--verb-clients)")
        ),
        "{body}"
    );
    // kube-scheduler's certificate (named ci-job here): the verbs.
    let trusted = https_client(&pki.ca, Some(&pki.client));
    let (status, body) = post(&trusted, &format!("{base}/filter"), &args).await;
    assert_eq!((status, &body["Error"]), (200, &json!("")), "{body}");
    server.stop().await;
}

#[tokio::test]
async fn a_body_over_the_limit_derived_from_the_cluster_is_413_and_holds_nothing() {
    let (server, ext, _binder) = static_server(CLUSTER, ServerSetup::default()).await;
    let client = reqwest::Client::new();
    let hosts = ext.hosts_in_view();
    assert_eq!(hosts, 10);
    let limit = extender::body_limit(hosts, extender::BODY_BYTES_MAX_DEFAULT);
    assert_eq!(limit, extender::BODY_BYTES_BASE + 10 * extender::BODY_BYTES_PER_NODE);
    assert!(limit < extender::BODY_BYTES_MAX_DEFAULT / 16, "the limit follows the cluster, not the ceiling");
    // A valid request padded to one byte over the limit: refused before it is read whole.
    let mut args = json!({"Pod": pod("t", "big", "big-uid", 8, Some(("big", 2))), "NodeNames": node_names()});
    let unpadded = serde_json::to_vec(&args).expect("json").len();
    args["Pod"]["metadata"]["annotations"] =
        json!({"pad": "x".repeat(limit + 1 - unpadded - r#","annotations":{"pad":""}"#.len())});
    let body = serde_json::to_vec(&args).expect("json");
    assert_eq!(body.len(), limit + 1);
    let reply = client.post(format!("{}/filter", server.base)).body(body).send().await.expect("send");
    assert_eq!(reply.status().as_u16(), 413);
    let error: Value = reply.json().await.expect("json");
    let expected = format!("filter: request body is over the limit of {limit} bytes");
    assert!(error["Error"].as_str().is_some_and(|e| e.contains(&expected) && e.contains("10 nodes")), "{error}");
    // The same request at the limit is read and planned.
    args["Pod"]["metadata"]["annotations"]["pad"] =
        json!("x".repeat(limit - unpadded - r#","annotations":{"pad":""}"#.len()));
    let (status, reply) = post(&client, &format!("{}/filter", server.base), &args).await;
    assert_eq!((status, &reply["Error"]), (200, &json!("")), "{reply}");
    let state: Value =
        client.get(format!("{}/state", server.base)).send().await.expect("state").json().await.expect("json");
    assert_eq!(state["gangs"].as_array().map(Vec::len), Some(1), "only the request within the limit holds GPUs");
    server.stop().await;
}

#[tokio::test]
async fn a_namespace_past_its_unbound_gpus_is_429_and_holds_nothing_more() {
    let book = BookConfig { namespace_unbound_gpus_max: 16, ..BookConfig::default() };
    let (server, ext, _binder) = static_server(CLUSTER, ServerSetup { book, ..ServerSetup::default() }).await;
    let (client, base, nodes) = (reqwest::Client::new(), server.base.clone(), node_names());
    let filter = |namespace: &str, gang: &str, member: u32, size: u32| {
        json!({"Pod": pod(namespace, &format!("{gang}-{member}"), &format!("{namespace}-{gang}-{member}"), 8,
            Some((gang, size))), "NodeNames": nodes})
    };
    let url = format!("{base}/filter");
    let (status, reply) = post(&client, &url, &filter("t", "a", 0, 2)).await;
    assert_eq!((status, &reply["Error"]), (200, &json!("")), "{reply}");
    assert_eq!(ext.with_book(|book| (book.as_ref().map(|b| b.unbound_gpus_in("t")), Vec::new())), Some(16));
    let free = free_gpus(&client.get(format!("{base}/state")).send().await.expect("state").json().await.expect("json"));

    // A second gang of the same namespace would hold 24: refused, naming the limit.
    let reply = client.post(&url).json(&filter("t", "b", 0, 1)).send().await.expect("send");
    assert_over_limit(
        reply,
        "namespace `t` holds 16 GPUs in reservations for members not bound yet; this pod's plan asks 8 more, over \
         the limit of 16 per namespace (--namespace-unbound-gpus)",
    )
    .await;
    let state: Value = client.get(format!("{base}/state")).send().await.expect("state").json().await.expect("json");
    assert_eq!(free_gpus(&state), free, "the refused gang holds nothing");
    assert!(state["gangs"].as_array().is_some_and(|g| g.iter().all(|g| g["gang"] != "t/b")), "{state}");

    // Another namespace has its own room.
    let (status, reply) = post(&client, &url, &filter("u", "c", 0, 1)).await;
    assert_eq!((status, &reply["Error"]), (200, &json!("")), "{reply}");

    // Once gang a is bound, its GPUs are no longer unbound: t may plan again.
    let outcomes = futures::future::join_all((0..2).map(|member| {
        let (client, base, nodes) = (client.clone(), base.clone(), nodes.clone());
        async move {
            let pod = pod("t", &format!("a-{member}"), &format!("t-a-{member}"), 8, Some(("a", 2)));
            schedule(&client, &base, &pod, &nodes).await
        }
    }))
    .await;
    assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
    assert_eq!(ext.with_book(|book| (book.as_ref().map(|b| b.unbound_gpus_in("t")), Vec::new())), Some(0));
    let (status, reply) = post(&client, &url, &filter("t", "b", 0, 1)).await;
    assert_eq!((status, &reply["Error"]), (200, &json!("")), "{reply}");
    ext.check().expect("book invariants");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binds_held_for_their_gang_leave_the_bind_limit_to_binds_at_work() {
    // A gang of three with room for two binds at work: the two held for the third give their
    // places back, so the third is admitted and the gang binds whole.
    let config = ExtenderConfig { in_flight: InFlightLimits { verbs: 32, bind: 2 }, ..ExtenderConfig::default() };
    let (server, ext, binder) =
        static_server(CLUSTER, ServerSetup { extender: config, ..ServerSetup::default() }).await;
    let (client, base, nodes) = (reqwest::Client::new(), server.base.clone(), node_names());
    let member = |index: u32| pod("t", &format!("m-{index}"), &format!("m-{index}-uid"), 8, Some(("g", 3)));
    let mut planned = Vec::new();
    for index in 0..3 {
        let args = json!({"Pod": member(index), "NodeNames": nodes});
        let (status, reply) = post(&client, &format!("{base}/filter"), &args).await;
        assert_eq!((status, &reply["Error"]), (200, &json!("")), "{reply}");
        planned.push(reply["NodeNames"][0].as_str().expect("a node").to_string());
    }
    let bind = |index: usize| json!({"PodName": format!("m-{index}"), "PodNamespace": "t", "PodUID": format!("m-{index}-uid"), "Node": planned[index]});
    let held: Vec<_> = (0..2)
        .map(|index| {
            let (client, url, args) = (client.clone(), format!("{base}/bind"), bind(index));
            tokio::spawn(async move { post(&client, &url, &args).await })
        })
        .collect();
    let at_bind = |state: &Value| {
        state["gangs"][0]["slots"].as_array().map_or(0, |slots| slots.iter().filter(|s| s["atBind"] == true).count())
    };
    support::eventually_async("two members held at bind", || {
        let (client, base) = (client.clone(), base.clone());
        async move {
            let state: Value =
                client.get(format!("{base}/state")).send().await.expect("state").json().await.expect("json");
            at_bind(&state) == 2
        }
    })
    .await;
    let (status, reply) = post(&client, &format!("{base}/bind"), &bind(2)).await;
    assert_eq!((status, &reply["Error"]), (200, &json!("")), "the third member is admitted: {reply}");
    for task in held {
        let (status, reply) = task.await.expect("task");
        assert_eq!((status, &reply["Error"]), (200, &json!("")), "{reply}");
    }
    assert!((0..3).all(|index| binder.node_of(&format!("m-{index}-uid")).is_some()));
    ext.check().expect("book invariants");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binds_past_the_in_flight_limit_are_429_and_bind_nothing() {
    let api = FakeApi::new();
    for name in ["a", "b"] {
        api.add_pod(pod("ml", name, &format!("{name}-uid"), 8, None), None, None);
    }
    let (api_server, server, nodes) = kube_server_limited(&api, InFlightLimits { verbs: 32, bind: 1 }).await;
    let (client, base) = (reqwest::Client::new(), server.base.clone());
    let mut planned = Vec::new();
    for name in ["a", "b"] {
        let args = json!({"Pod": pod("ml", name, &format!("{name}-uid"), 8, None), "NodeNames": nodes});
        let (status, reply) = post(&client, &format!("{base}/filter"), &args).await;
        assert_eq!((status, &reply["Error"]), (200, &json!("")), "{reply}");
        planned.push(reply["NodeNames"][0].as_str().expect("a node").to_string());
    }
    let bind = |name: &str, node: &str| json!({"PodName": name, "PodNamespace": "ml", "PodUID": format!("{name}-uid"), "Node": node});
    // a's bind reads its pod from an API server that answers after 5 s (past the 3 s of
    // verification): it is at work meanwhile.
    api.faults.lock().expect("faults").delay = Some(Duration::from_secs(5));
    let first = {
        let (client, url, args) = (client.clone(), format!("{base}/bind"), bind("a", &planned[0]));
        tokio::spawn(async move { post(&client, &url, &args).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let reply = client.post(format!("{base}/bind")).json(&bind("b", &planned[1])).send().await.expect("send");
    assert_over_limit(reply, "bind: 1 requests are in flight already, the limit (--bind-in-flight-limit)").await;
    let (status, reply) = first.await.expect("task");
    assert_eq!(status, 200);
    assert!(reply["Error"].as_str().is_some_and(|e| e.contains("not bound")), "{reply}");
    // Neither was bound: the refused one was not even looked at.
    api.faults.lock().expect("faults").delay = None;
    assert!(api.bindings().is_empty(), "{:?}", api.bindings());
    server.stop().await;
    api_server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_past_the_in_flight_limit_are_429_and_hold_nothing() {
    let api = FakeApi::new();
    api.add_upstream_pod_group("ml", "slow", Some(1), None);
    let (api_server, server, nodes) = kube_server_limited(&api, InFlightLimits { verbs: 1, bind: 8 }).await;
    let (client, base, ext) = (reqwest::Client::new(), server.base.clone(), server.state().clone());
    // The first filter reads its PodGroup from an API server that does not answer within the
    // lookup's 2 s: it holds its place among the filters in flight meanwhile.
    api.faults.lock().expect("faults").delay = Some(Duration::from_secs(5));
    let mut slow = pod("ml", "slow-0", "slow-0-uid", 8, None);
    slow["spec"]["schedulingGroup"] = json!({"podGroupName": "slow"});
    let first = {
        let (client, url, args) = (client.clone(), format!("{base}/filter"), json!({"Pod": slow, "NodeNames": nodes}));
        tokio::spawn(async move { post(&client, &url, &args).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let other = json!({"Pod": pod("ml", "other", "other-uid", 8, Some(("other", 1))), "NodeNames": nodes});
    let reply = client.post(format!("{base}/filter")).json(&other).send().await.expect("send");
    assert_over_limit(reply, "filter: 1 requests are in flight already, the limit (--in-flight-limit)").await;
    let (status, reply) = first.await.expect("task");
    assert_eq!(status, 200);
    assert!(reply["Error"].as_str().is_some_and(|e| e.contains("PodGroup ml/slow")), "{reply}");
    // Neither held anything; once the first is answered, the refused filter passes and holds.
    assert_eq!(ext.with_book(|book| (book.as_ref().map(|b| b.unbound_gpus_in("ml")), Vec::new())), Some(0));
    api.faults.lock().expect("faults").delay = None;
    let (status, reply) = post(&client, &format!("{base}/filter"), &other).await;
    assert_eq!((status, &reply["Error"]), (200, &json!("")), "{reply}");
    assert_eq!(ext.with_book(|book| (book.as_ref().map(|b| b.unbound_gpus_in("ml")), Vec::new())), Some(8));
    server.stop().await;
    api_server.stop().await;
}

#[tokio::test]
async fn pods_of_namespaces_outside_the_served_set_are_refused_at_filter_and_hold_nothing() {
    let admission = topoplace_server::binder::Admission {
        namespaces: Some(["ml".to_string()].into()),
        ..topoplace_server::binder::Admission::default()
    };
    let (server, ext, _binder) = static_server(CLUSTER, ServerSetup { admission, ..ServerSetup::default() }).await;
    let (client, base, nodes) = (reqwest::Client::new(), server.base.clone(), node_names());
    let outside = json!({"Pod": pod("other", "p", "p-uid", 8, Some(("g", 2))), "NodeNames": nodes});
    let (status, reply) = post(&client, &format!("{base}/filter"), &outside).await;
    assert_eq!(status, 200);
    assert_eq!(reply["Error"], "pod other/p: namespace `other` is not one this extender serves (--namespaces)");
    assert_eq!(reply["NodeNames"], Value::Null);
    for verb in ["prioritize", "preempt"] {
        let args = match verb {
            "prioritize" => outside.clone(),
            _ => json!({"Pod": outside["Pod"], "NodeNameToMetaVictims": {}}),
        };
        let (status, reply) = post(&client, &format!("{base}/{verb}"), &args).await;
        assert_eq!(status, 403, "{verb}: {reply}");
    }
    assert_eq!(ext.with_book(|book| (book.as_ref().map(|b| b.unbound_gpus_in("other")), Vec::new())), Some(0));
    // A pod of the served namespace is planned.
    let inside = json!({"Pod": pod("ml", "q", "q-uid", 8, Some(("g", 2))), "NodeNames": nodes});
    let (status, reply) = post(&client, &format!("{base}/filter"), &inside).await;
    assert_eq!((status, &reply["Error"]), (200, &json!("")), "{reply}");
    assert_eq!(ext.with_book(|book| (book.as_ref().map(|b| b.unbound_gpus_in("ml")), Vec::new())), Some(16));
    server.stop().await;
}
