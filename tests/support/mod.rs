//! Test support: a static-cluster extender on a loopback port, and an in-process fake
//! Kubernetes API server that speaks the REST paths and JSON the kube adapter uses.
//!
//! The fake API keeps nodes and pods as JSON objects with resourceVersions, serves list and
//! watch (`?watch=true&resourceVersion=N`, newline-delimited watch events, from a full
//! history so any resourceVersion can be resumed), `pods/{name}/binding` (201 with a
//! Status, 409 when the pod is already bound, annotations merged into the pod), GET and
//! DELETE of a pod, and Events. Switches inject failures: Bindings that fail for chosen
//! pods, watches that drop, slow responses.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::{broadcast, oneshot};

use topoplace::extender::{self, Binder, Extender, ExtenderConfig, MemoryBinder};
use topoplace::reservation::{Book, BookConfig};

/// A running server and the switch that stops it.
pub struct Running {
    pub base: String,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = self.task.await;
    }
}

/// Serves `router` on a loopback port.
pub async fn serve_router(router: Router) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let base = format!("http://{}", listener.local_addr().expect("local addr"));
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await;
    });
    Running { base, stop: Some(stop), task }
}

/// An extender over a static cluster file, on a loopback port.
pub async fn static_extender(cluster_file: &str, ttl_ms: u64) -> (Running, Arc<Extender>, Arc<MemoryBinder>) {
    let text = std::fs::read_to_string(cluster_file).expect("cluster file");
    let cluster = topoplace::files::cluster::load(cluster_file, &text).expect("valid cluster");
    let binder = Arc::new(MemoryBinder::default());
    let dyn_binder: Arc<dyn Binder> = binder.clone();
    let config = BookConfig { reservation_ttl_ms: ttl_ms, ..BookConfig::default() };
    let ext = Extender::new(Some(Book::new(cluster, config)), dyn_binder, ExtenderConfig::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let base = format!("http://{}", listener.local_addr().expect("local addr"));
    let (stop, stopped) = oneshot::channel::<()>();
    let served = ext.clone();
    let task = tokio::spawn(async move {
        let _ = extender::serve(listener, served, async {
            let _ = stopped.await;
        })
        .await;
    });
    (Running { base, stop: Some(stop), task }, ext, binder)
}

/// A pod as kube-scheduler sends it: GPUs in the limits, gang labels when `gang` is given.
pub fn pod(namespace: &str, name: &str, uid: &str, gpus: u32, gang: Option<(&str, u32)>) -> Value {
    let mut labels = serde_json::Map::new();
    if let Some((gang, size)) = gang {
        labels.insert("topoplace.io/gang".into(), json!(gang));
        labels.insert("topoplace.io/gang-size".into(), json!(size.to_string()));
    }
    json!({
        "metadata": {"name": name, "namespace": namespace, "uid": uid, "labels": labels},
        "spec": {"containers": [{"name": "main", "resources": {"limits": {"nvidia.com/gpu": gpus.to_string()}}}]},
        "status": {"phase": "Pending"}
    })
}

pub async fn post(client: &reqwest::Client, url: &str, body: &Value) -> (u16, Value) {
    let reply = client.post(url).json(body).send().await.expect("request");
    let status = reply.status().as_u16();
    let text = reply.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// Plays kube-scheduler for one pod: filter over `nodes` (nodeCacheCapable), then bind to
/// the one node that passed. Returns the bind reply's `Error` (empty on success), or the
/// filter's reason when nothing passed.
pub async fn schedule(client: &reqwest::Client, base: &str, pod: &Value, nodes: &[String]) -> Result<String, String> {
    let (status, reply) = post(client, &format!("{base}/filter"), &json!({"Pod": pod, "NodeNames": nodes})).await;
    if status != 200 {
        return Err(format!("filter status {status}: {reply}"));
    }
    let passing: Vec<String> = reply["NodeNames"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect())
        .unwrap_or_default();
    let Some(node) = passing.first().cloned() else {
        return Err(format!("no node passed: {reply}"));
    };
    let meta = &pod["metadata"];
    let args = json!({"PodName": meta["name"], "PodNamespace": meta["namespace"], "PodUID": meta["uid"], "Node": node});
    let (status, reply) = post(client, &format!("{base}/bind"), &args).await;
    if status != 200 {
        return Err(format!("bind status {status}: {reply}"));
    }
    let error = reply["Error"].as_str().unwrap_or_default().to_string();
    if error.is_empty() {
        Ok(node)
    } else {
        Err(error)
    }
}

// ---------------------------------------------------------------------------------------
// The fake API server.

#[derive(Default)]
pub struct Faults {
    /// Pod names whose Binding answers 500.
    pub fail_binding: HashSet<String>,
    /// Delay before every response.
    pub delay: Option<Duration>,
}

struct ApiState {
    version: u64,
    nodes: BTreeMap<String, Value>,
    pods: BTreeMap<(String, String), Value>,
    /// (resourceVersion, resource, watch event).
    history: Vec<(u64, &'static str, Value)>,
    events: Vec<Value>,
    bindings: Vec<(String, String)>,
    deletes: Vec<String>,
}

#[derive(Clone)]
pub struct FakeApi {
    state: Arc<Mutex<ApiState>>,
    feed: broadcast::Sender<(u64, &'static str, Value)>,
    drop_watches: broadcast::Sender<()>,
    pub faults: Arc<Mutex<Faults>>,
}

impl FakeApi {
    pub fn new() -> Self {
        let (feed, _) = broadcast::channel(65_536);
        let (drop_watches, _) = broadcast::channel(16);
        FakeApi {
            state: Arc::new(Mutex::new(ApiState {
                version: 1,
                nodes: BTreeMap::new(),
                pods: BTreeMap::new(),
                history: Vec::new(),
                events: Vec::new(),
                bindings: Vec::new(),
                deletes: Vec::new(),
            })),
            feed,
            drop_watches,
            faults: Arc::default(),
        }
    }

    fn record(&self, state: &mut ApiState, resource: &'static str, kind: &str, mut object: Value) -> Value {
        state.version += 1;
        let version = state.version;
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        let event = json!({"type": kind, "object": object.clone()});
        state.history.push((version, resource, event.clone()));
        let _ = self.feed.send((version, resource, event));
        object
    }

    /// A GPU node with topology labels, as GPU Feature Discovery and Topograph label it.
    pub fn add_node(&self, name: &str, product: &str, gpus: u32, rack: &str) {
        let node = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "uid": format!("node-{name}"), "labels": {
                "kubernetes.io/hostname": name,
                "nvidia.com/gpu.product": product,
                "nvidia.com/gpu.count": gpus.to_string(),
                "network.topology.nvidia.com/spine": "s1",
                "network.topology.nvidia.com/leaf": rack,
            }},
            "status": {"allocatable": {"nvidia.com/gpu": gpus.to_string(), "cpu": "96", "pods": "110"},
                       "conditions": [{"type": "Ready", "status": "True"}]}
        });
        let mut state = self.state.lock().expect("api state");
        let object = self.record(&mut state, "nodes", "ADDED", node);
        state.nodes.insert(name.to_string(), object);
    }

    /// A pod (from [`pod`]); `node` makes it already bound there.
    pub fn add_pod(&self, mut object: Value, node: Option<&str>, gpus_annotation: Option<&str>) {
        object["apiVersion"] = json!("v1");
        object["kind"] = json!("Pod");
        if let Some(node) = node {
            object["spec"]["nodeName"] = json!(node);
            object["status"]["phase"] = json!("Running");
        }
        if let Some(gpus) = gpus_annotation {
            object["metadata"]["annotations"] = json!({"topoplace.io/gpus": gpus});
        }
        let key = (
            object["metadata"]["namespace"].as_str().unwrap_or("default").to_string(),
            object["metadata"]["name"].as_str().unwrap_or_default().to_string(),
        );
        let mut state = self.state.lock().expect("api state");
        let object = self.record(&mut state, "pods", "ADDED", object);
        state.pods.insert(key, object);
    }

    pub fn delete_pod(&self, namespace: &str, name: &str) {
        let mut state = self.state.lock().expect("api state");
        if let Some(object) = state.pods.remove(&(namespace.to_string(), name.to_string())) {
            self.record(&mut state, "pods", "DELETED", object);
        }
    }

    /// Ends every open watch stream (the watcher must relist or resume).
    pub fn drop_watches(&self) {
        let _ = self.drop_watches.send(());
    }

    pub fn pod_node(&self, namespace: &str, name: &str) -> Option<String> {
        let state = self.state.lock().expect("api state");
        state.pods.get(&(namespace.to_string(), name.to_string()))?["spec"]["nodeName"].as_str().map(String::from)
    }

    pub fn pod_annotation(&self, namespace: &str, name: &str, key: &str) -> Option<String> {
        let state = self.state.lock().expect("api state");
        state.pods.get(&(namespace.to_string(), name.to_string()))?["metadata"]["annotations"][key]
            .as_str()
            .map(String::from)
    }

    pub fn pod_exists(&self, namespace: &str, name: &str) -> bool {
        self.state.lock().expect("api state").pods.contains_key(&(namespace.to_string(), name.to_string()))
    }

    pub fn events(&self) -> Vec<Value> {
        self.state.lock().expect("api state").events.clone()
    }

    pub fn deletes(&self) -> Vec<String> {
        self.state.lock().expect("api state").deletes.clone()
    }

    /// Every bound pod with its node and `topoplace.io/gpus`.
    pub fn bound_pods(&self) -> Vec<(String, String, Option<String>)> {
        let state = self.state.lock().expect("api state");
        state
            .pods
            .values()
            .filter_map(|p| {
                let node = p["spec"]["nodeName"].as_str()?;
                Some((
                    p["metadata"]["name"].as_str().unwrap_or_default().to_string(),
                    node.to_string(),
                    p["metadata"]["annotations"]["topoplace.io/gpus"].as_str().map(String::from),
                ))
            })
            .collect()
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/api/v1/nodes", get(list_or_watch_nodes))
            .route("/api/v1/pods", get(list_or_watch_pods))
            .route("/api/v1/namespaces/{ns}/pods/{name}", get(get_pod).delete(delete_pod))
            .route("/api/v1/namespaces/{ns}/pods/{name}/binding", axum::routing::post(create_binding))
            .route("/api/v1/namespaces/{ns}/events", axum::routing::post(create_event))
            .with_state(self.clone())
    }

    async fn delay(&self) {
        let delay = self.faults.lock().expect("faults").delay;
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
    }
}

fn status(code: u16, reason: &str, message: String) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": if code < 300 { "Success" } else { "Failure" },
                      "message": message, "reason": reason, "code": code});
    (StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), axum::Json(body)).into_response()
}

async fn list_or_watch_nodes(State(api): State<FakeApi>, Query(query): Query<BTreeMap<String, String>>) -> Response {
    list_or_watch(api, "nodes", "NodeList", query).await
}

async fn list_or_watch_pods(State(api): State<FakeApi>, Query(query): Query<BTreeMap<String, String>>) -> Response {
    list_or_watch(api, "pods", "PodList", query).await
}

async fn list_or_watch(
    api: FakeApi,
    resource: &'static str,
    list_kind: &str,
    query: BTreeMap<String, String>,
) -> Response {
    api.delay().await;
    if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
        let from: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
        // Subscribe before reading the history so nothing falls between the two.
        let live = api.feed.subscribe();
        let dropped = api.drop_watches.subscribe();
        let backlog: Vec<(u64, Value)> = {
            let state = api.state.lock().expect("api state");
            state
                .history
                .iter()
                .filter(|(v, r, _)| *v > from && *r == resource)
                .map(|(v, _, e)| (*v, e.clone()))
                .collect()
        };
        let last = backlog.last().map_or(from, |(v, _)| *v);
        let head = futures::stream::iter(backlog.into_iter().map(|(_, e)| Ok::<Bytes, Infallible>(line(&e))));
        let tail = futures::stream::unfold((live, dropped, last), move |(mut live, mut dropped, last)| async move {
            loop {
                tokio::select! {
                    _ = dropped.recv() => return None,
                    next = live.recv() => match next {
                        Ok((version, r, event)) if r == resource && version > last => {
                            return Some((Ok::<Bytes, Infallible>(line(&event)), (live, dropped, version)));
                        }
                        Ok(_) => continue,
                        Err(_) => return None,
                    }
                }
            }
        });
        use futures::StreamExt;
        return Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(Body::from_stream(head.chain(tail)))
            .unwrap_or_else(|_| status(500, "InternalError", "watch".into()));
    }
    let state = api.state.lock().expect("api state");
    let items: Vec<Value> = match resource {
        "nodes" => state.nodes.values().cloned().collect(),
        _ => state.pods.values().cloned().collect(),
    };
    let body = json!({"apiVersion": "v1", "kind": list_kind, "metadata": {"resourceVersion": state.version.to_string()}, "items": items});
    axum::Json(body).into_response()
}

fn line(event: &Value) -> Bytes {
    let mut text = event.to_string();
    text.push('\n');
    Bytes::from(text)
}

async fn get_pod(State(api): State<FakeApi>, Path((ns, name)): Path<(String, String)>) -> Response {
    api.delay().await;
    let state = api.state.lock().expect("api state");
    match state.pods.get(&(ns.clone(), name.clone())) {
        Some(pod) => axum::Json(pod.clone()).into_response(),
        None => status(404, "NotFound", format!("pods \"{name}\" not found")),
    }
}

async fn delete_pod(State(api): State<FakeApi>, Path((ns, name)): Path<(String, String)>) -> Response {
    api.delay().await;
    let mut state = api.state.lock().expect("api state");
    match state.pods.remove(&(ns.clone(), name.clone())) {
        Some(pod) => {
            state.deletes.push(name);
            let object = api.record(&mut state, "pods", "DELETED", pod);
            axum::Json(object).into_response()
        }
        None => status(404, "NotFound", format!("pods \"{name}\" not found")),
    }
}

async fn create_binding(
    State(api): State<FakeApi>,
    Path((ns, name)): Path<(String, String)>,
    axum::Json(binding): axum::Json<Value>,
) -> Response {
    api.delay().await;
    if api.faults.lock().expect("faults").fail_binding.contains(&name) {
        return status(500, "InternalError", format!("injected failure binding {name}"));
    }
    let node = binding["target"]["name"].as_str().unwrap_or_default().to_string();
    if binding["target"]["kind"] != "Node" || node.is_empty() {
        return status(400, "BadRequest", "binding target must be a Node with a name".into());
    }
    let mut state = api.state.lock().expect("api state");
    let Some(mut pod) = state.pods.get(&(ns.clone(), name.clone())).cloned() else {
        return status(404, "NotFound", format!("pods \"{name}\" not found"));
    };
    if let Some(uid) = binding["metadata"]["uid"].as_str() {
        if pod["metadata"]["uid"].as_str() != Some(uid) {
            return status(409, "Conflict", format!("Precondition failed: UID in precondition: {uid}"));
        }
    }
    if let Some(current) = pod["spec"]["nodeName"].as_str() {
        return status(409, "Conflict", format!("pod {name} is already assigned to node \"{current}\""));
    }
    pod["spec"]["nodeName"] = json!(node);
    if let Some(annotations) = binding["metadata"]["annotations"].as_object() {
        for (key, value) in annotations {
            pod["metadata"]["annotations"][key] = value.clone();
        }
    }
    state.bindings.push((name.clone(), node));
    let object = api.record(&mut state, "pods", "MODIFIED", pod);
    state.pods.insert((ns, name), object);
    status(201, "", String::new())
}

async fn create_event(State(api): State<FakeApi>, axum::Json(mut event): axum::Json<Value>) -> Response {
    let mut state = api.state.lock().expect("api state");
    let count = state.events.len();
    event["metadata"]["name"] = json!(format!("event-{count}"));
    state.events.push(event.clone());
    (StatusCode::CREATED, axum::Json(event)).into_response()
}

/// The gRPC placement API over `ext`'s book on a loopback port; `base` is `http://127.0.0.1:PORT`
/// (`https://localhost:PORT` with TLS).
pub async fn grpc_server(
    ext: Arc<Extender>,
    config: topoplace::grpc::GrpcConfig,
    tls: Option<tonic::transport::ServerTlsConfig>,
) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let port = listener.local_addr().expect("local addr").port();
    let base = if tls.is_some() { format!("https://localhost:{port}") } else { format!("http://127.0.0.1:{port}") };
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let _ = topoplace::grpc::serve(listener, ext, config, tls, async {
            let _ = stopped.await;
        })
        .await;
    });
    Running { base, stop: Some(stop), task }
}
