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

use topoplace_online::reservation::BookConfig;
use topoplace_online::scheduler::SchedulerConfig;
use topoplace_server::assemble::{Listeners, SchedulerSetup, Server, ServerSetup, Source};
use topoplace_server::binder::MemoryBinder;
use topoplace_server::kube::lease::LeaseConfig;
use topoplace_server::kube::scheduler::SchedulerRuntime;
use topoplace_server::state::ServerState;

/// Polls `check` every 50 ms until it holds; panics naming `what` after 15 s. For tests
/// against servers whose book works on its own thread, where a paused tokio clock would
/// auto-advance while that thread works.
pub async fn eventually(what: &str, check: impl Fn() -> bool) {
    eventually_async(what, || {
        let holds = check();
        async move { holds }
    })
    .await
}

/// [`eventually`] with a check that awaits (an HTTP or gRPC call).
pub async fn eventually_async<F: std::future::Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    for _ in 0..300 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// The topology levels of the fake API's nodes.
pub const LEVELS: [&str; 2] = ["network.topology.nvidia.com/spine", "network.topology.nvidia.com/leaf"];

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

/// A whole server ([`Server::start`], as `topoplace serve` starts it) on loopback ports:
/// `base` is the extender's `http://127.0.0.1:PORT` (`https://localhost:PORT` with TLS), `grpc` the placement API's
/// (`https://localhost:PORT` with TLS).
pub struct Served {
    pub base: String,
    pub grpc: String,
    server: Server,
}

impl Served {
    /// A graceful stop (a signal).
    pub async fn stop(self) {
        let _ = self.server.stop().await;
    }

    /// A crash: every task ends at once; the Lease is not handed back.
    pub fn kill(self) {
        self.server.kill();
    }

    pub fn state(&self) -> &Arc<ServerState> {
        self.server.state()
    }

    pub fn scheduler(&self) -> Option<&Arc<SchedulerRuntime>> {
        self.server.scheduler()
    }
}

/// Starts a whole server over `source` on loopback ports.
pub async fn start_server(source: Source, setup: ServerSetup) -> Served {
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let http_port = http.local_addr().expect("local addr").port();
    let base = if setup.extender_tls.is_some() {
        format!("https://localhost:{http_port}")
    } else {
        format!("http://127.0.0.1:{http_port}")
    };
    let port = grpc.local_addr().expect("local addr").port();
    let grpc_base =
        if setup.grpc_tls.is_some() { format!("https://localhost:{port}") } else { format!("http://127.0.0.1:{port}") };
    let server = Server::start(source, setup, Listeners { http, grpc: Some(grpc) });
    Served { base, grpc: grpc_base, server }
}

/// A static-cluster server; `ttl_ms` is both the reservation's TTL and the longest a gang
/// member's bind is held.
pub async fn static_extender(cluster_file: &str, ttl_ms: u64) -> (Served, Arc<ServerState>, Arc<MemoryBinder>) {
    let config = BookConfig { reservation_ttl_ms: ttl_ms, bind_hold_ms: ttl_ms, ..BookConfig::default() };
    static_extender_with(cluster_file, config).await
}

/// A static-cluster server with the book configured by `config`.
pub async fn static_extender_with(
    cluster_file: &str,
    config: BookConfig,
) -> (Served, Arc<ServerState>, Arc<MemoryBinder>) {
    static_server(cluster_file, ServerSetup { book: config, ..ServerSetup::default() }).await
}

/// A static-cluster server set up by `setup` (the gRPC API's tokens and TLS, ...).
pub async fn static_server(cluster_file: &str, setup: ServerSetup) -> (Served, Arc<ServerState>, Arc<MemoryBinder>) {
    let text = std::fs::read_to_string(cluster_file).expect("cluster file");
    let cluster = topoplace_formats::files::cluster::load(cluster_file, &text).expect("valid cluster");
    let served = start_server(Source::Static(cluster), setup).await;
    let state = served.state().clone();
    let binder = served.server.memory_binder().expect("a static server binds in memory").clone();
    (served, state, binder)
}

/// A server on the fake API at `api_base`, with the secondary scheduler when `scheduler` is
/// given.
pub async fn kube_server(api_base: &str, book: BookConfig, scheduler: Option<SchedulerSetup>) -> Served {
    kube_server_with(api_base, ServerSetup { book, ..ServerSetup::default() }, scheduler).await
}

/// [`kube_server`] set up by `setup`.
pub async fn kube_server_with(api_base: &str, setup: ServerSetup, scheduler: Option<SchedulerSetup>) -> Served {
    let client = kube::Client::try_from(kube::Config::new(api_base.parse().expect("uri"))).expect("client");
    let source = Source::Kubernetes { client, level_keys: LEVELS.map(String::from).to_vec(), scheduler };
    start_server(source, setup).await
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

/// A pending pod for topoplace's scheduler: GPUs, CPU and memory in its limits, gang labels
/// (name, size, rank) when given; the uid is `{name}-uid`.
pub fn scheduler_pod(namespace: &str, name: &str, gpus: u32, gang: Option<(&str, u32, u32)>, cpu: &str) -> Value {
    let mut labels = serde_json::Map::new();
    if let Some((gang, size, rank)) = gang {
        labels.insert("topoplace.io/gang".into(), json!(gang));
        labels.insert("topoplace.io/gang-size".into(), json!(size.to_string()));
        labels.insert("topoplace.io/rank".into(), json!(rank.to_string()));
    }
    json!({
        "metadata": {"name": name, "namespace": namespace, "uid": format!("{name}-uid"), "labels": labels},
        "spec": {"schedulerName": "topoplace", "containers": [{"name": "main", "resources": {
            "limits": {"nvidia.com/gpu": gpus.to_string(), "cpu": cpu, "memory": "8Gi"}}}]},
        "status": {"phase": "Pending"}
    })
}

/// Waits until the server at `base` answers `/readyz` with 200 (its view has listed nodes and
/// pods).
pub async fn ready(http: &reqwest::Client, base: &str) {
    let (http, base) = (http.clone(), base.to_string());
    eventually_async("readyz", move || {
        let (http, base) = (http.clone(), base.clone());
        Box::pin(async move { http.get(format!("{base}/readyz")).send().await.is_ok_and(|r| r.status() == 200) })
    })
    .await;
}

/// Free GPUs over every node of a `/state` reply.
pub fn free_gpus(state: &Value) -> u64 {
    state["nodes"].as_array().expect("nodes").iter().map(|n| n["free"].as_array().map_or(0, Vec::len) as u64).sum()
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
// A secondary-scheduler replica against the fake API.

/// One scheduler replica: a whole server with the secondary scheduler on, and (optionally)
/// its leader election.
pub struct Replica {
    pub ext: Arc<ServerState>,
    pub runtime: Arc<SchedulerRuntime>,
    served: Served,
}

impl Replica {
    /// Starts a replica against the API at `base`; with `identity` it campaigns for the
    /// Lease `kube-system/topoplace-scheduler` (2 s lease), else it leads from the start.
    pub async fn start(base: &str, identity: Option<&str>, config: SchedulerConfig) -> Replica {
        Replica::start_with(base, identity, config, BookConfig::default()).await
    }

    /// [`Replica::start`] with the book configured by `book` (a short reservation TTL).
    pub async fn start_with(base: &str, identity: Option<&str>, config: SchedulerConfig, book: BookConfig) -> Replica {
        let lease = identity.map(|identity| LeaseConfig {
            namespace: "kube-system".into(),
            name: "topoplace-scheduler".into(),
            identity: identity.into(),
            lease_duration: Duration::from_millis(2_000),
            renew_deadline: Duration::from_millis(1_500),
            retry_period: Duration::from_millis(200),
        });
        let scheduler = SchedulerSetup { name: "topoplace".into(), config, lease };
        let served = kube_server(base, book, Some(scheduler)).await;
        let ext = served.state().clone();
        let runtime = served.scheduler().expect("the scheduler runs").clone();
        Replica { ext, runtime, served }
    }

    /// A crash: every task stops at once; the Lease is not handed back.
    pub fn kill(self) {
        self.served.kill();
    }
}

// ---------------------------------------------------------------------------------------
// The fake API server.

#[derive(Default)]
pub struct Faults {
    /// Pod names whose Binding answers 500.
    pub fail_binding: HashSet<String>,
    /// Pod names whose Binding never answers (a scheduler dying mid-gang).
    pub hang_binding: HashSet<String>,
    /// Pod names whose Binding is hanging now (arrived and held by `hang_binding`).
    pub hanging: HashSet<String>,
    /// Pod names whose Binding is made but whose answer is cut off mid-body (as when the
    /// connection drops during the response): the caller cannot tell whether it took effect.
    /// (A 504 would not do: kube-rs retries it, and the retry meets a 409.)
    pub lose_binding_answer: HashSet<String>,
    /// Delay before every response.
    pub delay: Option<Duration>,
}

/// (resourceVersion, resource, watch event, the object before the change).
type Change = (u64, &'static str, Value, Option<Value>);

struct ApiState {
    version: u64,
    nodes: BTreeMap<String, Value>,
    pods: BTreeMap<(String, String), Value>,
    leases: BTreeMap<(String, String), Value>,
    pod_groups: BTreeMap<(String, String), Value>,
    /// PodDisruptionBudgets (`policy/v1`).
    budgets: BTreeMap<(String, String), Value>,
    /// Upstream PodGroups (`scheduling.k8s.io/v1beta1`).
    upstream_pod_groups: BTreeMap<(String, String), Value>,
    history: Vec<Change>,
    events: Vec<Value>,
    bindings: Vec<(String, String)>,
    deletes: Vec<String>,
    /// Names of pods patched through `PATCH pods/{name}`, in order.
    patches: Vec<String>,
}

#[derive(Clone)]
pub struct FakeApi {
    state: Arc<Mutex<ApiState>>,
    feed: broadcast::Sender<Change>,
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
                leases: BTreeMap::new(),
                pod_groups: BTreeMap::new(),
                budgets: BTreeMap::new(),
                upstream_pod_groups: BTreeMap::new(),
                history: Vec::new(),
                events: Vec::new(),
                bindings: Vec::new(),
                deletes: Vec::new(),
                patches: Vec::new(),
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
        let before = match resource {
            "pods" => state
                .pods
                .get(&(
                    object["metadata"]["namespace"].as_str().unwrap_or("default").to_string(),
                    object["metadata"]["name"].as_str().unwrap_or_default().to_string(),
                ))
                .cloned(),
            "poddisruptionbudgets" => state
                .budgets
                .get(&(
                    object["metadata"]["namespace"].as_str().unwrap_or("default").to_string(),
                    object["metadata"]["name"].as_str().unwrap_or_default().to_string(),
                ))
                .cloned(),
            _ => state.nodes.get(object["metadata"]["name"].as_str().unwrap_or_default()).cloned(),
        };
        let before = if kind == "ADDED" { None } else { before.or_else(|| Some(object.clone())) };
        let event = json!({"type": kind, "object": object.clone()});
        state.history.push((version, resource, event.clone(), before.clone()));
        let _ = self.feed.send((version, resource, event, before));
        object
    }

    /// Any node object (taints, cordons, conditions, allocatable as the test needs them).
    pub fn put_node(&self, node: Value) {
        let mut state = self.state.lock().expect("api state");
        let name = node["metadata"]["name"].as_str().unwrap_or_default().to_string();
        let kind = if state.nodes.contains_key(&name) { "MODIFIED" } else { "ADDED" };
        let object = self.record(&mut state, "nodes", kind, node);
        state.nodes.insert(name, object);
    }

    pub fn node(&self, name: &str) -> Option<Value> {
        self.state.lock().expect("api state").nodes.get(name).cloned()
    }

    /// A PodDisruptionBudget (`policy/v1`) as given, added or replaced (watchers see it).
    pub fn put_budget(&self, budget: Value) {
        let mut state = self.state.lock().expect("api state");
        let key = (
            budget["metadata"]["namespace"].as_str().unwrap_or("default").to_string(),
            budget["metadata"]["name"].as_str().unwrap_or_default().to_string(),
        );
        let kind = if state.budgets.contains_key(&key) { "MODIFIED" } else { "ADDED" };
        let object = self.record(&mut state, "poddisruptionbudgets", kind, budget);
        state.budgets.insert(key, object);
    }

    /// A scheduler-plugins PodGroup with its `minMember`.
    pub fn add_pod_group(&self, namespace: &str, name: &str, min_member: u32) {
        let group = json!({"apiVersion": "scheduling.x-k8s.io/v1alpha1", "kind": "PodGroup",
            "metadata": {"name": name, "namespace": namespace}, "spec": {"minMember": min_member}});
        self.state.lock().expect("api state").pod_groups.insert((namespace.into(), name.into()), group);
    }

    /// An upstream PodGroup (`scheduling.k8s.io/v1beta1`, Kubernetes 1.37): the `gang` policy
    /// with `minCount`, or the `basic` policy for `None`; a topology constraint when given.
    pub fn add_upstream_pod_group(&self, namespace: &str, name: &str, min_count: Option<u32>, topology: Option<&str>) {
        let policy = match min_count {
            Some(count) => json!({"gang": {"minCount": count}}),
            None => json!({"basic": {}}),
        };
        let mut group = json!({"apiVersion": "scheduling.k8s.io/v1beta1", "kind": "PodGroup",
            "metadata": {"name": name, "namespace": namespace, "uid": format!("{name}-uid"), "resourceVersion": "1"},
            "spec": {"schedulingPolicy": policy}});
        if let Some(key) = topology {
            group["spec"]["schedulingConstraints"] = json!({"topology": [{"key": key}]});
        }
        self.put_upstream_pod_group(namespace, name, group);
    }

    /// An upstream PodGroup object as given.
    pub fn put_upstream_pod_group(&self, namespace: &str, name: &str, group: Value) {
        self.state.lock().expect("api state").upstream_pod_groups.insert((namespace.into(), name.into()), group);
    }

    pub fn upstream_pod_group(&self, namespace: &str, name: &str) -> Option<Value> {
        self.state.lock().expect("api state").upstream_pod_groups.get(&(namespace.into(), name.into())).cloned()
    }

    pub fn lease(&self, namespace: &str, name: &str) -> Option<Value> {
        self.state.lock().expect("api state").leases.get(&(namespace.to_string(), name.to_string())).cloned()
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<Value> {
        self.state.lock().expect("api state").pods.get(&(namespace.to_string(), name.to_string())).cloned()
    }

    pub fn pods(&self) -> Vec<Value> {
        self.state.lock().expect("api state").pods.values().cloned().collect()
    }

    pub fn bindings(&self) -> Vec<(String, String)> {
        self.state.lock().expect("api state").bindings.clone()
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

    /// Names of the pods patched (labels, annotations), in order.
    pub fn patches(&self) -> Vec<String> {
        self.state.lock().expect("api state").patches.clone()
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
            .route("/apis/policy/v1/poddisruptionbudgets", get(list_or_watch_budgets))
            .route("/api/v1/namespaces/{ns}/pods/{name}", get(get_pod).delete(delete_pod).patch(patch_pod))
            .route("/api/v1/namespaces/{ns}/pods/{name}/status", axum::routing::patch(patch_pod_status))
            .route("/apis/coordination.k8s.io/v1/namespaces/{ns}/leases", axum::routing::post(create_lease))
            .route("/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{name}", get(get_lease).put(replace_lease))
            .route("/apis/scheduling.x-k8s.io/v1alpha1/namespaces/{ns}/podgroups/{name}", get(get_pod_group))
            .route("/apis/scheduling.k8s.io/v1beta1/namespaces/{ns}/podgroups/{name}", get(get_upstream_pod_group))
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

async fn list_or_watch_budgets(State(api): State<FakeApi>, Query(query): Query<BTreeMap<String, String>>) -> Response {
    list_or_watch(api, "poddisruptionbudgets", "PodDisruptionBudgetList", query).await
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
    let selector = FieldSelector::parse(query.get("fieldSelector").map(String::as_str).unwrap_or(""));
    if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
        let from: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
        // Subscribe before reading the history so nothing falls between the two.
        let live = api.feed.subscribe();
        let dropped = api.drop_watches.subscribe();
        let (backlog, last): (Vec<Value>, u64) = {
            let state = api.state.lock().expect("api state");
            let changes: Vec<&Change> =
                state.history.iter().filter(|(v, r, _, _)| *v > from && *r == resource).collect();
            let last = changes.last().map_or(from, |(v, _, _, _)| *v);
            (changes.into_iter().filter_map(|(_, _, e, before)| selector.seen(e, before.as_ref())).collect(), last)
        };
        let head = futures::stream::iter(backlog.into_iter().map(|e| Ok::<Bytes, Infallible>(line(&e))));
        let tail = futures::stream::unfold(
            (live, dropped, last, selector),
            move |(mut live, mut dropped, last, selector)| async move {
                loop {
                    tokio::select! {
                        _ = dropped.recv() => return None,
                        next = live.recv() => match next {
                            Ok((version, r, event, before)) if r == resource && version > last => {
                                if let Some(event) = selector.seen(&event, before.as_ref()) {
                                    return Some((Ok::<Bytes, Infallible>(line(&event)), (live, dropped, version, selector)));
                                }
                            }
                            Ok(_) => continue,
                            Err(_) => return None,
                        }
                    }
                }
            },
        );
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
        "poddisruptionbudgets" => state.budgets.values().cloned().collect(),
        _ => state.pods.values().filter(|p| selector.matches(p)).cloned().collect(),
    };
    let api_version = if resource == "poddisruptionbudgets" { "policy/v1" } else { "v1" };
    let body = json!({"apiVersion": api_version, "kind": list_kind, "metadata": {"resourceVersion": state.version.to_string()}, "items": items});
    axum::Json(body).into_response()
}

/// A field selector (`a=b,c!=d`) over the fields the API server supports for pods.
#[derive(Clone, Default)]
struct FieldSelector {
    terms: Vec<(String, bool, String)>,
}

impl FieldSelector {
    fn parse(text: &str) -> Self {
        let terms = text
            .split(',')
            .filter(|t| !t.is_empty())
            .filter_map(|term| {
                if let Some((key, value)) = term.split_once("!=") {
                    Some((key.to_string(), false, value.to_string()))
                } else {
                    let (key, value) = term.split_once("==").or_else(|| term.split_once('='))?;
                    Some((key.to_string(), true, value.to_string()))
                }
            })
            .collect();
        FieldSelector { terms }
    }

    fn matches(&self, object: &Value) -> bool {
        self.terms.iter().all(|(key, equal, value)| {
            let mut field = object;
            for part in key.split('.') {
                field = &field[part];
            }
            let actual = match field {
                Value::String(text) => text.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            };
            (actual == *value) == *equal
        })
    }

    /// The watch event as a watcher with this selector sees it: an object entering the
    /// selection is ADDED, one leaving it DELETED (as the API server's watch cache does).
    fn seen(&self, event: &Value, before: Option<&Value>) -> Option<Value> {
        let kind = event["type"].as_str().unwrap_or_default();
        let now = self.matches(&event["object"]);
        let was = before.is_some_and(|b| self.matches(b));
        let seen_kind = match kind {
            "ADDED" => now.then_some("ADDED"),
            "DELETED" => was.then_some("DELETED"),
            _ => match (was, now) {
                (true, true) => Some("MODIFIED"),
                (false, true) => Some("ADDED"),
                (true, false) => Some("DELETED"),
                (false, false) => None,
            },
        }?;
        Some(json!({"type": seen_kind, "object": event["object"].clone()}))
    }
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

/// `DELETE pods/{name}` with the API server's `DeleteOptions.preconditions` (uid,
/// resourceVersion): a pod that does not meet them is kept and the answer is 409.
async fn delete_pod(State(api): State<FakeApi>, Path((ns, name)): Path<(String, String)>, body: Bytes) -> Response {
    api.delay().await;
    let options: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let mut state = api.state.lock().expect("api state");
    if let Some(pod) = state.pods.get(&(ns.clone(), name.clone())) {
        for field in ["uid", "resourceVersion"] {
            let wanted = options["preconditions"][field].as_str();
            let actual = pod["metadata"][field].as_str().unwrap_or_default();
            if let Some(wanted) = wanted.filter(|w| *w != actual) {
                return status(
                    409,
                    "Conflict",
                    format!("Precondition failed: {field} in precondition: {wanted}, {field} in object meta: {actual}"),
                );
            }
        }
    }
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
    let hang = {
        let mut faults = api.faults.lock().expect("faults");
        let hang = faults.hang_binding.contains(&name);
        if hang {
            faults.hanging.insert(name.clone());
        }
        hang
    };
    if hang {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
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
    // The API server marks the pod scheduled as it binds it.
    set_condition(&mut pod, json!({"type": "PodScheduled", "status": "True"}));
    if let Some(annotations) = binding["metadata"]["annotations"].as_object() {
        for (key, value) in annotations {
            pod["metadata"]["annotations"][key] = value.clone();
        }
    }
    state.bindings.push((name.clone(), node));
    let object = api.record(&mut state, "pods", "MODIFIED", pod);
    state.pods.insert((ns, name.clone()), object);
    if api.faults.lock().expect("faults").lose_binding_answer.contains(&name) {
        return (
            axum::http::StatusCode::CREATED,
            [("content-type", "application/json")],
            "{\"kind\":\"Status\",\"apiV",
        )
            .into_response();
    }
    status(201, "", String::new())
}

fn set_condition(pod: &mut Value, condition: Value) {
    if !pod["status"]["conditions"].is_array() {
        pod["status"]["conditions"] = json!([]);
    }
    if let Some(conditions) = pod["status"]["conditions"].as_array_mut() {
        conditions.retain(|c| c["type"] != condition["type"]);
        conditions.push(condition);
    }
}

/// A patch's body as JSON, when its content type is `media_type`; else the API server's 415
/// or 400.
fn patch_body(headers: &axum::http::HeaderMap, body: &Bytes, media_type: &str) -> Result<Value, Box<Response>> {
    let typed = headers.get("content-type").and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with(media_type));
    if !typed {
        return Err(Box::new(status(415, "UnsupportedMediaType", format!("this fake takes only {media_type} here"))));
    }
    serde_json::from_slice::<Value>(body).map_err(|_| Box::new(status(400, "BadRequest", "patch is not JSON".into())))
}

/// A JSON merge patch (RFC 7386) of a pod's labels and annotations, the only fields the code
/// under test patches. A `metadata.uid` in the patch that is not the pod's is refused with 409,
/// as the API server refuses it (uid is immutable; its storage layer reports "Precondition
/// failed: UID in precondition").
async fn patch_pod(
    State(api): State<FakeApi>,
    Path((ns, name)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    api.delay().await;
    let patch = match patch_body(&headers, &body, "application/merge-patch+json") {
        Ok(patch) => patch,
        Err(refused) => return *refused,
    };
    let mut state = api.state.lock().expect("api state");
    let Some(mut pod) = state.pods.get(&(ns.clone(), name.clone())).cloned() else {
        return status(404, "NotFound", format!("pods \"{name}\" not found"));
    };
    if let Some(uid) = patch["metadata"]["uid"].as_str() {
        if pod["metadata"]["uid"].as_str() != Some(uid) {
            return status(
                409,
                "Conflict",
                format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    pod["metadata"]["uid"]
                ),
            );
        }
    }
    for field in ["labels", "annotations"] {
        for (key, value) in patch["metadata"][field].as_object().into_iter().flatten() {
            if value.is_null() {
                if let Some(map) = pod["metadata"][field].as_object_mut() {
                    map.remove(key);
                }
            } else {
                pod["metadata"][field][key] = value.clone();
            }
        }
    }
    state.patches.push(name.clone());
    let object = api.record(&mut state, "pods", "MODIFIED", pod);
    state.pods.insert((ns, name), object.clone());
    axum::Json(object).into_response()
}

/// A strategic merge patch of the status: conditions merge by type, other fields replace.
async fn patch_pod_status(
    State(api): State<FakeApi>,
    Path((ns, name)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    api.delay().await;
    let patch = match patch_body(&headers, &body, "application/strategic-merge-patch+json") {
        Ok(patch) => patch,
        Err(refused) => return *refused,
    };
    let mut state = api.state.lock().expect("api state");
    let Some(mut pod) = state.pods.get(&(ns.clone(), name.clone())).cloned() else {
        return status(404, "NotFound", format!("pods \"{name}\" not found"));
    };
    // A uid in the patch is a precondition (the API server's storage refuses an update whose
    // object meta names another uid).
    if let Some(uid) = patch["metadata"]["uid"].as_str() {
        if pod["metadata"]["uid"].as_str() != Some(uid) {
            let theirs = pod["metadata"]["uid"].as_str().unwrap_or_default();
            return status(
                409,
                "Conflict",
                format!("Precondition failed: UID in precondition: {uid}, UID in object meta: {theirs}"),
            );
        }
    }
    if let Some(fields) = patch["status"].as_object() {
        for (key, value) in fields {
            if key == "conditions" {
                for condition in value.as_array().into_iter().flatten() {
                    set_condition(&mut pod, condition.clone());
                }
            } else {
                pod["status"][key] = value.clone();
            }
        }
    }
    let object = api.record(&mut state, "pods", "MODIFIED", pod);
    state.pods.insert((ns, name), object.clone());
    axum::Json(object).into_response()
}

async fn get_lease(State(api): State<FakeApi>, Path((ns, name)): Path<(String, String)>) -> Response {
    api.delay().await;
    let state = api.state.lock().expect("api state");
    match state.leases.get(&(ns, name.clone())) {
        Some(lease) => axum::Json(lease.clone()).into_response(),
        None => status(404, "NotFound", format!("leases.coordination.k8s.io \"{name}\" not found")),
    }
}

async fn create_lease(
    State(api): State<FakeApi>,
    Path(ns): Path<String>,
    axum::Json(mut lease): axum::Json<Value>,
) -> Response {
    api.delay().await;
    let mut state = api.state.lock().expect("api state");
    let name = lease["metadata"]["name"].as_str().unwrap_or_default().to_string();
    if state.leases.contains_key(&(ns.clone(), name.clone())) {
        return status(409, "AlreadyExists", format!("leases.coordination.k8s.io \"{name}\" already exists"));
    }
    state.version += 1;
    lease["metadata"]["resourceVersion"] = json!(state.version.to_string());
    lease["metadata"]["namespace"] = json!(ns);
    state.leases.insert((ns, name), lease.clone());
    (StatusCode::CREATED, axum::Json(lease)).into_response()
}

/// PUT with optimistic concurrency: the resourceVersion must be the stored one.
async fn replace_lease(
    State(api): State<FakeApi>,
    Path((ns, name)): Path<(String, String)>,
    axum::Json(mut lease): axum::Json<Value>,
) -> Response {
    api.delay().await;
    let mut state = api.state.lock().expect("api state");
    let Some(current) = state.leases.get(&(ns.clone(), name.clone())) else {
        return status(404, "NotFound", format!("leases.coordination.k8s.io \"{name}\" not found"));
    };
    if lease["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
        return status(
            409,
            "Conflict",
            "the object has been modified; please apply your changes to the latest version".into(),
        );
    }
    state.version += 1;
    lease["metadata"]["resourceVersion"] = json!(state.version.to_string());
    state.leases.insert((ns, name), lease.clone());
    axum::Json(lease).into_response()
}

async fn get_pod_group(State(api): State<FakeApi>, Path((ns, name)): Path<(String, String)>) -> Response {
    api.delay().await;
    let state = api.state.lock().expect("api state");
    match state.pod_groups.get(&(ns, name.clone())) {
        Some(group) => axum::Json(group.clone()).into_response(),
        None => status(404, "NotFound", format!("podgroups.scheduling.x-k8s.io \"{name}\" not found")),
    }
}

async fn get_upstream_pod_group(State(api): State<FakeApi>, Path((ns, name)): Path<(String, String)>) -> Response {
    api.delay().await;
    let state = api.state.lock().expect("api state");
    match state.upstream_pod_groups.get(&(ns, name.clone())) {
        Some(group) => axum::Json(group.clone()).into_response(),
        None => status(404, "NotFound", format!("podgroups.scheduling.k8s.io \"{name}\" not found")),
    }
}

async fn create_event(State(api): State<FakeApi>, axum::Json(mut event): axum::Json<Value>) -> Response {
    let mut state = api.state.lock().expect("api state");
    let count = state.events.len();
    event["metadata"]["name"] = json!(format!("event-{count}"));
    state.events.push(event.clone());
    (StatusCode::CREATED, axum::Json(event)).into_response()
}

/// Certificates made at test time: a CA, a server certificate for `localhost` and a client
/// certificate it signed, and a client certificate another CA signed. Each pair is (PEM
/// certificate, PEM key).
pub struct Pki {
    pub ca: String,
    pub server: (String, String),
    pub client: (String, String),
    /// Another client certificate of the same CA, named `prometheus`.
    pub scraper: (String, String),
    pub stranger: (String, String),
}

/// A fresh [`Pki`].
pub fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let authority = |name: &str| {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).expect("CA");
        (cert.pem(), Issuer::new(params, key))
    };
    let leaf = |name: &str, issuer: &Issuer<'_, KeyPair>| {
        let key = KeyPair::generate().expect("key");
        let cert =
            CertificateParams::new(vec![name.to_string()]).expect("params").signed_by(&key, issuer).expect("sign");
        (cert.pem(), key.serialize_pem())
    };
    let (ca, issuer) = authority("topoplace test CA");
    let (_, other_issuer) = authority("someone else's CA");
    Pki {
        ca,
        server: leaf("localhost", &issuer),
        client: leaf("ci-job", &issuer),
        scraper: leaf("prometheus", &issuer),
        stranger: leaf("ci-job", &other_issuer),
    }
}

/// The GPU nodes of `testdata/extender/cluster.yaml`, as kube-scheduler offers them.
pub fn extender_node_names() -> Vec<String> {
    (0..4)
        .map(|i| format!("r1-{i}"))
        .chain((0..4).map(|i| format!("r2-{i}")))
        .chain(["l40s-0".into(), "l40s-1".into()])
        .collect()
}
