//! The Kubernetes adapter: the translation of Pods and Nodes into the core's terms (`pod`,
//! `node`), the API-server [`Binder`] (pods/binding, delete, Events), and the watchers that
//! keep the extender's reservation book in step with the cluster (`run_view`).
//!
//! The view is built from two kube-rs reflectors. Node events rebuild the cluster model only
//! when a node's GPU facts or topology labels change (status heartbeats do not). Pod events
//! are applied one by one: a bound GPU pod holds its GPUs (`topoplace.io/gpus`, else the
//! lowest free ones), a deleted or finished one gives them back. After a relist (a dropped
//! watch), bound pods that are no longer listed are forgotten.

pub mod budget;
pub mod lease;
pub mod node;
pub mod scheduler;

use crate::pod;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Binding, Event, Node, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Status};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher::{self, watcher, Event as WatchEvent};
use kube::runtime::WatchStreamExt;
use kube::Client;
use thiserror::Error;
use tokio::sync::Notify;

use crate::binder::{Admission, BindError, Binder, Refusal, DEFAULT_SCHEDULER_NAME};
use crate::pod_group::PodGroups;
use crate::state::ServerState;
use topoplace_engine::topology::{Cluster, NodeSpec};
use topoplace_online::reservation::{Book, BookConfig, MemberBind, PodDemand, PodIdentity};

/// The longest the pod is read before its Binding ([`Binder::verify`]), a Binding's create
/// call is waited for, and then its read-back: together within the book's
/// `BINDING_BUDGET_MS` (15 s), so a gang's held binds are answered before kube-scheduler's
/// `httpTimeout`.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(3);
const BINDING_CALL_TIMEOUT: Duration = Duration::from_secs(8);
const READ_BACK_TIMEOUT: Duration = Duration::from_secs(4);
const _: () = assert!(
    VERIFY_TIMEOUT.as_millis() + BINDING_CALL_TIMEOUT.as_millis() + READ_BACK_TIMEOUT.as_millis()
        <= topoplace_online::reservation::BINDING_BUDGET_MS as u128
);

/// How long a pod bound by us may be missing from a relist before it is forgotten (its
/// watch event may still be on the way).
const BOUND_UNSEEN_GRACE_MS: u64 = 30_000;
/// Quiet time after a node change before the cluster model is rebuilt.
const REBUILD_DEBOUNCE_MS: u64 = 100;

#[derive(Debug, Error)]
pub enum KubeError {
    #[error("Kubernetes client configuration: {0}")]
    Config(String),
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
}

/// A client from a kubeconfig file, or the in-cluster / default configuration.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<Client, KubeError> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| KubeError::Config(format!("{}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| KubeError::Config(format!("{}: {e}", path.display())))?
        }
        None => kube::Config::infer().await.map_err(|e| KubeError::Config(e.to_string()))?,
    };
    Client::try_from(config).map_err(KubeError::Api)
}

/// Creates Bindings, deletes pods and records Events through the API server.
pub struct KubeBinder {
    client: Client,
    admission: Admission,
    /// The PodGroup objects of pods verified before their Binding.
    pod_groups: Arc<PodGroups>,
}

impl KubeBinder {
    /// A binder that admits the default [`Admission`].
    pub fn new(client: Client) -> Self {
        let pod_groups = Arc::new(PodGroups::new(client.clone()));
        KubeBinder::with_admission(client, Admission::default(), pod_groups)
    }

    /// A binder whose [`Binder::verify`] admits the pods `admission` says, reading PodGroups
    /// through `pod_groups` (the extender's own, so a pod's gang reads the same at filter and
    /// at bind).
    pub fn with_admission(client: Client, admission: Admission, pod_groups: Arc<PodGroups>) -> Self {
        KubeBinder { pod_groups, client, admission }
    }

    /// [`Binder::verify`] without its time limit.
    async fn verify_pod(&self, member: &MemberBind, expected: Option<&PodDemand>) -> Result<(), Refusal> {
        let target = &member.pod;
        if let Some(allowed) = &self.admission.namespaces {
            if !allowed.contains(&target.namespace) {
                return Err(Refusal::NotThatPod(format!(
                    "namespace `{}` is not one this extender binds in (--namespaces: {})",
                    target.namespace,
                    allowed.iter().cloned().collect::<Vec<_>>().join(",")
                )));
            }
        }
        let not_that = |why: String| Err(Refusal::NotThatPod(why));
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &target.namespace);
        let current = match pods.get(&target.name).await {
            Ok(current) => current,
            Err(kube::Error::Api(status)) if status.code == 404 => {
                return not_that("the API server has no such pod".into());
            }
            Err(error) => return Err(Refusal::Unconfirmed(format!("reading the pod from the API server: {error}"))),
        };
        let uid = current.metadata.uid.as_deref().unwrap_or_default();
        if uid != target.uid {
            return not_that(format!("the API server's pod of that name has uid `{uid}`, not `{}`", target.uid));
        }
        if current.metadata.deletion_timestamp.is_some() {
            return not_that("the pod is being deleted".into());
        }
        let spec = current.spec.as_ref();
        if let Some(bound) = spec.and_then(|s| s.node_name.as_deref()).filter(|&n| n != member.node) {
            return Err(Refusal::BoundElsewhere { node: bound.to_string(), gpus: pod::recorded_gpus(&current) });
        }
        let scheduler = spec.and_then(|s| s.scheduler_name.as_deref()).unwrap_or(DEFAULT_SCHEDULER_NAME);
        if !self.admission.scheduler_names.contains(scheduler) {
            return not_that(format!(
                "the pod's spec.schedulerName is `{scheduler}`, not one this extender serves (--scheduler-names: {})",
                self.admission.scheduler_names.iter().cloned().collect::<Vec<_>>().join(",")
            ));
        }
        let Some(expected) = expected else {
            // Its filter's demand is no longer remembered: nothing to hold the pod to.
            return Err(Refusal::Unconfirmed(
                "topoplace no longer remembers this pod's filter; it is filtered again".into(),
            ));
        };
        let group = self
            .pod_groups
            .of_pod(&current)
            .await
            .map_err(|error| Refusal::Unconfirmed(format!("reading the pod's PodGroup: {error}")))?;
        let actual = match pod::demand_sized(&current, group.as_ref()) {
            Ok(actual) => actual,
            Err(error) => return not_that(format!("the API server's copy of the pod does not read: {error}")),
        };
        match pod::demand_difference(expected, &actual) {
            Some((field, claimed, real)) => {
                not_that(format!("the request says {field} {claimed}, but the API server's pod says {real}"))
            }
            None => Ok(()),
        }
    }
}

/// Where a pod read back after a Binding is bound.
enum BoundTo {
    /// On the planned node: the Binding took effect.
    Planned,
    Other(String),
    Nothing,
}

impl KubeBinder {
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Creates the pod's Binding to `node`, with `topoplace.io/gpus` when it gets GPUs. A 409
    /// (already bound) is success only if the pod read back is the same pod (uid) bound to
    /// `node`. When the outcome is unknown (the request failed without an answer from the API
    /// server), the pod is read back the same way before anything is concluded.
    pub async fn bind_pod(&self, target: &PodIdentity, node: &str, gpus: Option<String>) -> Result<(), BindError> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &target.namespace);
        let binding = Binding {
            metadata: ObjectMeta {
                name: Some(target.name.clone()),
                namespace: Some(target.namespace.clone()),
                uid: Some(target.uid.clone()),
                annotations: gpus.map(|gpus| BTreeMap::from([(pod::GPUS_ANNOTATION.to_string(), gpus)])),
                ..ObjectMeta::default()
            },
            target: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(node.to_string()),
                ..ObjectReference::default()
            },
        };
        let params = PostParams::default();
        let create = pods.create_subresource::<_, Status>("binding", &target.name, &params, &binding);
        let created = match tokio::time::timeout(BINDING_CALL_TIMEOUT, create).await {
            Ok(created) => created,
            // No answer in time: like a dropped connection, settled by reading the pod back.
            Err(_) => {
                let reason = format!("no answer within {} s", BINDING_CALL_TIMEOUT.as_secs());
                return self.settle_unanswered(target, node, reason).await;
            }
        };
        match created {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 409 => match self.read_back_in_time(target, node).await? {
                BoundTo::Planned => Ok(()),
                BoundTo::Other(other) => Err(BindError::Conflict { node: other }),
                BoundTo::Nothing => {
                    Err(BindError::Api { message: "409 Conflict, yet the pod reads back unbound".into() })
                }
            },
            Err(kube::Error::Api(status)) if status.code == 404 => {
                Err(BindError::Gone { reason: format!("404 Not Found: {}", status.message) })
            }
            // 504 is the API server's StatusReasonTimeout: "the server was unable to return a
            // response in the time allotted, but may still be processing the request"
            // (k8s.io/apimachinery metav1): like no answer at all, the outcome is unknown.
            Err(kube::Error::Api(status)) if status.code != 504 => {
                Err(BindError::Api { message: format!("{} {}", status.code, status.message) })
            }
            // No answer: the Binding may have been made. Read the pod back to tell.
            Err(error) => self.settle_unanswered(target, node, error.to_string()).await,
        }
    }

    /// A Binding without a usable answer (`reason`): the pod read back tells whether it was
    /// made.
    async fn settle_unanswered(&self, target: &PodIdentity, node: &str, reason: String) -> Result<(), BindError> {
        match self.read_back_in_time(target, node).await {
            Ok(BoundTo::Planned) => Ok(()),
            Ok(BoundTo::Other(other)) => Err(BindError::Conflict { node: other }),
            // Not bound yet, but the request may still be in flight.
            Ok(BoundTo::Nothing) => Err(BindError::Unknown {
                reason: format!("{reason}; the pod reads back unbound, and the Binding may still land"),
            }),
            Err(BindError::Unknown { reason: read }) => {
                Err(BindError::Unknown { reason: format!("{reason}; and reading the pod back: {read}") })
            }
            Err(other) => Err(other),
        }
    }

    /// [`KubeBinder::read_back`] within `READ_BACK_TIMEOUT`, `Unknown` past it.
    async fn read_back_in_time(&self, target: &PodIdentity, node: &str) -> Result<BoundTo, BindError> {
        match tokio::time::timeout(READ_BACK_TIMEOUT, self.read_back(target, node)).await {
            Ok(read) => read,
            Err(_) => Err(BindError::Unknown {
                reason: format!("reading the pod back: no answer within {} s", READ_BACK_TIMEOUT.as_secs()),
            }),
        }
    }

    /// Where the pod the API server has under `target`'s name is bound: `Gone` when it does
    /// not exist or is another pod (another uid), `Unknown` when it cannot be read.
    async fn read_back(&self, target: &PodIdentity, node: &str) -> Result<BoundTo, BindError> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &target.namespace);
        let current = match pods.get(&target.name).await {
            Ok(current) => current,
            Err(kube::Error::Api(status)) if status.code == 404 => {
                return Err(BindError::Gone { reason: "deleted while its Binding was made".into() })
            }
            Err(error) => return Err(BindError::Unknown { reason: format!("reading the pod back: {error}") }),
        };
        if current.metadata.uid.as_deref() != Some(target.uid.as_str()) {
            return Err(BindError::Gone { reason: "the pod was replaced (another uid)".into() });
        }
        Ok(match current.spec.and_then(|s| s.node_name) {
            Some(bound) if bound == node => BoundTo::Planned,
            Some(bound) => BoundTo::Other(bound),
            None => BoundTo::Nothing,
        })
    }

    /// Records an Event of `kind` (`Normal` or `Warning`) on the pod; failures are logged.
    pub async fn record(&self, target: &PodIdentity, kind: &str, reason: &str, message: String) {
        let events: Api<Event> = Api::namespaced(self.client.clone(), &target.namespace);
        let event = Event {
            metadata: ObjectMeta { generate_name: Some(format!("{}.", target.name)), ..ObjectMeta::default() },
            involved_object: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(target.name.clone()),
                namespace: Some(target.namespace.clone()),
                uid: Some(target.uid.clone()),
                ..ObjectReference::default()
            },
            reason: Some(reason.to_string()),
            message: Some(message),
            type_: Some(kind.into()),
            reporting_component: Some("topoplace".into()),
            source: Some(k8s_openapi::api::core::v1::EventSource { component: Some("topoplace".into()), host: None }),
            count: Some(1),
            ..Event::default()
        };
        if let Err(error) = events.create(&PostParams::default(), &event).await {
            tracing::warn!(pod = %target, %error, "recording an Event failed");
        }
    }
}

impl Binder for KubeBinder {
    fn verify<'a>(
        &'a self,
        member: &'a MemberBind,
        expected: Option<&'a PodDemand>,
    ) -> BoxFuture<'a, Result<(), Refusal>> {
        Box::pin(async move {
            match tokio::time::timeout(VERIFY_TIMEOUT, self.verify_pod(member, expected)).await {
                Ok(verdict) => verdict,
                Err(_) => Err(Refusal::Unconfirmed(format!(
                    "reading the pod from the API server: no answer within {} s",
                    VERIFY_TIMEOUT.as_secs()
                ))),
            }
        })
    }

    fn bind<'a>(&'a self, member: &'a MemberBind, gpus: String) -> BoxFuture<'a, Result<(), BindError>> {
        Box::pin(self.bind_pod(&member.pod, &member.node, Some(gpus)))
    }

    fn delete<'a>(&'a self, target: &'a PodIdentity) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let pods: Api<Pod> = Api::namespaced(self.client.clone(), &target.namespace);
            let params = DeleteParams {
                preconditions: Some(kube::api::Preconditions { uid: Some(target.uid.clone()), resource_version: None }),
                ..DeleteParams::default()
            };
            match pods.delete(&target.name, &params).await {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
                Err(error) => Err(error.to_string()),
            }
        })
    }

    fn event<'a>(&'a self, target: &'a PodIdentity, reason: &'a str, message: String) -> BoxFuture<'a, ()> {
        Box::pin(self.record(target, "Warning", reason, message))
    }

    fn retry<'a>(&'a self, target: &'a PodIdentity) -> BoxFuture<'a, Result<(), BindError>> {
        Box::pin(async move {
            let pods: Api<Pod> = Api::namespaced(self.client.clone(), &target.namespace);
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or_default();
            // The uid in the patch is a precondition: the API server refuses to change a
            // pod's uid, so the patch applies only to the pod that was planned (409 or 422
            // for a replacement of the same name; 404 once it is gone).
            let patch = serde_json::json!({
                "metadata": {
                    "uid": target.uid,
                    "annotations": { pod::GANG_RETRY_ANNOTATION: now_ms.to_string() },
                }
            });
            match pods.patch(&target.name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(status)) if status.code == 404 => {
                    Err(BindError::Gone { reason: format!("404 Not Found: {}", status.message) })
                }
                // A 409 or 422 may be the uid precondition (the name is another pod's now), or
                // a webhook or a limit refusing a live pod: only the pod read back tells.
                Err(kube::Error::Api(status)) if status.code == 409 || status.code == 422 => {
                    let refused = format!("{} {}", status.code, status.message);
                    match tokio::time::timeout(READ_BACK_TIMEOUT, pods.get(&target.name)).await {
                        Ok(Ok(current)) if current.metadata.uid.as_deref() == Some(target.uid.as_str()) => {
                            Err(BindError::Api { message: refused })
                        }
                        Ok(Ok(_)) => Err(BindError::Gone { reason: format!("the pod was replaced ({refused})") }),
                        Ok(Err(kube::Error::Api(status))) if status.code == 404 => {
                            Err(BindError::Gone { reason: format!("404 Not Found: {}", status.message) })
                        }
                        Ok(Err(error)) => Err(BindError::Unknown { reason: format!("{refused}; reading it: {error}") }),
                        Err(_) => Err(BindError::Unknown { reason: format!("{refused}; reading it timed out") }),
                    }
                }
                Err(kube::Error::Api(status)) => {
                    Err(BindError::Api { message: format!("{} {}", status.code, status.message) })
                }
                Err(error) => Err(BindError::Unknown { reason: error.to_string() }),
            }
        })
    }
}

/// A bound, running GPU pod as the book should hold it.
struct BoundGpuPod {
    identity: PodIdentity,
    node: String,
    /// The resource its GPUs came from.
    pool: topoplace_engine::topology::DevicePool,
    recorded: Option<Vec<u8>>,
    gpus: u32,
    gang: Option<String>,
    /// The gang's members that take GPUs, as the pod says it (its size, or for a replica with
    /// roles the members of its GPU roles).
    gang_size: Option<u32>,
    /// The gang's maximum as the pod states it (`topoplace.io/gang-max-size`).
    gang_max: Option<u32>,
}

/// The pod as the book should hold it, or `None` (not bound, finished, or no GPUs).
fn bound_gpu_pod(pod: &Pod) -> Option<BoundGpuPod> {
    let node = pod.spec.as_ref()?.node_name.clone()?;
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded") | Some("Failed")) {
        return None;
    }
    let (gpus, pool) = pod::gpu_request(pod).ok()?;
    if gpus == 0 {
        return None;
    }
    let identity = pod::identity(pod).ok()?;
    let membership = pod::gang_of(pod, &identity.namespace).ok().flatten();
    // Only pods with GPUs are held in the book: a replica with roles counts those of its roles
    // that take GPUs.
    let gpu_members = pod::demand_sized(pod, None)
        .ok()
        .and_then(|d| d.replica().ok().flatten())
        .map(|(replica, _)| replica.roles.iter().filter(|r| r.gang.is_some()).map(|r| r.members).sum::<u32>());
    let gang_size = gpu_members.or(membership.as_ref().map(|g| g.size));
    let gang_max = membership.as_ref().and_then(|g| g.max);
    let gang = membership.map(|g| g.key);
    Some(BoundGpuPod { identity, node, pool, recorded: pod::recorded_gpus(pod), gpus, gang, gang_size, gang_max })
}

/// Pods that hold resources on a node: bound and not finished. A pod that finishes leaves
/// this selector, and its watch reports it deleted.
pub const BOUND_PODS_SELECTOR: &str = "spec.nodeName!=,status.phase!=Succeeded,status.phase!=Failed";

/// Who else wants the view's watch events (the secondary scheduler: every node, and the
/// resources of every bound pod). Called outside the book's lock.
pub trait ViewHooks: Send + Sync + 'static {
    fn nodes_listed(&self, nodes: &[Node]);
    fn node_applied(&self, node: &Node);
    fn node_deleted(&self, name: &str);
    fn bound_listed(&self, pods: &[Pod]);
    fn bound_applied(&self, pod: &Pod);
    fn bound_deleted(&self, pod: &Pod);
}

/// Watches nodes and pods and keeps the extender's book in step, until the streams end.
/// Sets the extender ready once both have listed and the first cluster model exists.
pub async fn run_view(client: Client, ext: Arc<ServerState>, level_keys: Vec<String>, config: BookConfig) {
    run_view_with(client, ext, level_keys, config, None).await
}

/// [`run_view`], also feeding `hooks`.
pub async fn run_view_with(
    client: Client,
    ext: Arc<ServerState>,
    level_keys: Vec<String>,
    config: BookConfig,
    hooks: Option<Arc<dyn ViewHooks>>,
) {
    let dirty = Arc::new(Notify::new());
    let node_specs: Arc<std::sync::Mutex<HashMap<String, ViewNode>>> = Arc::default();
    let nodes_synced = Arc::new(std::sync::atomic::AtomicBool::new(false));

    let node_task = {
        let dirty = dirty.clone();
        let node_specs = node_specs.clone();
        let nodes_synced = nodes_synced.clone();
        let hooks = hooks.clone();
        let api: Api<Node> = Api::all(client.clone());
        async move {
            let mut stream = watcher(api, watcher::Config::default()).default_backoff().boxed();
            let mut listing: Option<HashMap<String, ViewNode>> = None;
            let mut listed_nodes: Vec<Node> = Vec::new();
            while let Some(event) = stream.next().await {
                let event = match event {
                    Ok(event) => event,
                    Err(error) => {
                        tracing::warn!(%error, "node watch");
                        continue;
                    }
                };
                if let Some(hooks) = &hooks {
                    match &event {
                        WatchEvent::Apply(node) => hooks.node_applied(node),
                        WatchEvent::Delete(node) => {
                            hooks.node_deleted(node.metadata.name.as_deref().unwrap_or_default())
                        }
                        WatchEvent::Init => listed_nodes.clear(),
                        WatchEvent::InitApply(node) => listed_nodes.push(node.clone()),
                        WatchEvent::InitDone => hooks.nodes_listed(&std::mem::take(&mut listed_nodes)),
                    }
                }
                let mut specs = node_specs.lock().unwrap_or_else(|p| p.into_inner());
                let changed = match event {
                    WatchEvent::Apply(node) => apply_node(&mut specs, &node),
                    WatchEvent::Delete(node) => specs.remove(&node.metadata.name.unwrap_or_default()).is_some(),
                    WatchEvent::Init => {
                        listing = Some(HashMap::new());
                        false
                    }
                    WatchEvent::InitApply(node) => {
                        if let Some(listing) = listing.as_mut() {
                            apply_node(listing, &node);
                        }
                        false
                    }
                    WatchEvent::InitDone => {
                        if let Some(listed) = listing.take() {
                            *specs = listed;
                        }
                        nodes_synced.store(true, std::sync::atomic::Ordering::SeqCst);
                        true
                    }
                };
                drop(specs);
                if changed {
                    dirty.notify_one();
                }
            }
        }
    };

    let rebuild_task = {
        let ext = ext.clone();
        let config = config.clone();
        async move {
            // The nodes the book's cluster was last built from: a change of the closed set
            // alone (a node cordoned, or flapping Ready) needs no new cluster.
            let mut built: Option<Vec<NodeSpec>> = None;
            loop {
                dirty.notified().await;
                tokio::time::sleep(Duration::from_millis(REBUILD_DEBOUNCE_MS)).await;
                let viewed: Vec<ViewNode> =
                    node_specs.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
                let closed: std::collections::BTreeSet<String> =
                    viewed.iter().filter(|v| v.closed).flat_map(|v| v.specs.iter().map(|s| s.name.clone())).collect();
                let closed_pools: std::collections::BTreeSet<(String, topoplace_engine::topology::DevicePool)> = viewed
                    .iter()
                    .flat_map(|v| {
                        v.closed_pools.iter().filter_map(|p| Some((v.specs.first()?.name.clone(), p.clone())))
                    })
                    .collect();
                let mut nodes: Vec<NodeSpec> = viewed.into_iter().flat_map(|v| v.specs).collect();
                nodes.sort_by(|a, b| (&a.name, &a.pool).cmp(&(&b.name, &b.pool)));
                let levels =
                    level_keys.iter().filter(|k| nodes.iter().any(|n| n.labels.contains_key(*k))).cloned().collect();
                if built.as_ref() == Some(&nodes) {
                    ext.with_book(|book| {
                        if let Some(book) = book.as_mut() {
                            book.set_closed_nodes(closed);
                            book.set_closed_pools(closed_pools);
                        }
                        ((), Vec::new())
                    });
                    continue;
                }
                let spec =
                    topoplace_engine::topology::ClusterSpec { name: "kubernetes".into(), levels, nodes: nodes.clone() };
                if spec.nodes.is_empty() {
                    continue;
                }
                built = Some(nodes);
                match Cluster::build(spec) {
                    Ok(cluster) => ext.with_book(|book| {
                        let dropped = match book {
                            Some(book) => book.replace_cluster(cluster),
                            None => {
                                *book = Some(Book::new(cluster, config.clone()));
                                Vec::new()
                            }
                        };
                        if let Some(book) = book.as_mut() {
                            book.set_closed_nodes(closed);
                            book.set_closed_pools(closed_pools);
                        }
                        ((), dropped)
                    }),
                    Err(error) => tracing::error!(%error, "the nodes do not form a valid cluster model"),
                }
            }
        }
    };

    let pod_task = {
        let ext = ext.clone();
        let nodes_synced = nodes_synced.clone();
        let api: Api<Pod> = Api::all(client);
        async move {
            let selector = watcher::Config::default().fields(BOUND_PODS_SELECTOR);
            let mut stream = watcher(api, selector).default_backoff().boxed();
            let mut listed: Option<Vec<Pod>> = None;
            let mut synced = false;
            while let Some(event) = stream.next().await {
                let event = match event {
                    Ok(event) => event,
                    Err(error) => {
                        tracing::warn!(%error, "pod watch");
                        continue;
                    }
                };
                if let Some(hooks) = &hooks {
                    match &event {
                        WatchEvent::Apply(pod) => hooks.bound_applied(pod),
                        WatchEvent::Delete(pod) => hooks.bound_deleted(pod),
                        WatchEvent::InitDone => hooks.bound_listed(listed.as_deref().unwrap_or_default()),
                        _ => {}
                    }
                }
                match event {
                    WatchEvent::Apply(pod) => apply_pod(&ext, &pod),
                    WatchEvent::Delete(pod) => forget(&ext, &pod),
                    WatchEvent::Init => listed = Some(Vec::new()),
                    WatchEvent::InitApply(pod) => {
                        if let Some(listed) = listed.as_mut() {
                            listed.push(pod);
                        }
                    }
                    WatchEvent::InitDone => {
                        // The book may not exist yet (nodes still listing): wait for it so
                        // that no bound pod is missed before binding anything.
                        ext.book_installed().await;
                        let pods = listed.take().unwrap_or_default();
                        let present: HashSet<String> = pods.iter().filter_map(|p| p.metadata.uid.clone()).collect();
                        let now = ext.now_ms();
                        ext.update_book(|book| book.forget_unlisted(&present, now, BOUND_UNSEEN_GRACE_MS));
                        for pod in &pods {
                            apply_pod(&ext, pod);
                        }
                        if !synced && nodes_synced.load(std::sync::atomic::Ordering::SeqCst) {
                            synced = true;
                            ext.set_ready(true);
                        }
                    }
                }
            }
        }
    };

    tokio::join!(node_task, rebuild_task, pod_task);
}

/// A GPU node of the view: its spec, and whether kube-scheduler offers it no pod now
/// (cordoned or not Ready: [`topoplace_online::reservation::Book::set_closed_nodes`]).
#[derive(Debug, Clone, PartialEq)]
struct ViewNode {
    /// One per device pool (several under the mixed MIG strategy).
    specs: Vec<NodeSpec>,
    closed: bool,
    /// Pools of it that offer nothing now ([`node::GpuNode::closed_pools`]).
    closed_pools: Vec<topoplace_engine::topology::DevicePool>,
}

fn apply_node(specs: &mut HashMap<String, ViewNode>, node: &Node) -> bool {
    let name = node.metadata.name.clone().unwrap_or_default();
    match node::node_spec(node) {
        Ok(Some(gpu_node)) => {
            let facts = node::facts(node);
            let closed = !facts.ready || facts.unschedulable || gpu_node.offers_none;
            let viewed = ViewNode { specs: gpu_node.specs(), closed, closed_pools: gpu_node.closed_pools.clone() };
            let warnings = gpu_node.warnings;
            let changed = specs.insert(name.clone(), viewed.clone()).as_ref() != Some(&viewed);
            if changed {
                for warning in &warnings {
                    tracing::warn!(node = %name, %warning, "GPU node planned with an assumption");
                }
            }
            changed
        }
        Ok(None) => specs.remove(&name).is_some(),
        Err(reason) => {
            tracing::warn!(node = %name, %reason, "GPU node left out of the view");
            specs.remove(&name).is_some()
        }
    }
}

/// A pod that left (deleted or finished): its GPUs come back.
fn forget(ext: &ServerState, pod: &Pod) {
    let Some(uid) = pod.metadata.uid.as_deref() else { return };
    ext.with_book(|book| ((), book.as_mut().map(|b| b.forget_pod(uid)).unwrap_or_default()));
}

fn apply_pod(ext: &ServerState, pod: &Pod) {
    let Some(BoundGpuPod { identity, node, pool, recorded, gpus, gang, gang_size, gang_max }) = bound_gpu_pod(pod)
    else {
        // Finished, or not bound yet: a finished pod's GPUs come back.
        let finished =
            pod.status.as_ref().and_then(|s| s.phase.as_deref()).is_some_and(|p| p == "Succeeded" || p == "Failed");
        if finished {
            forget(ext, pod);
        }
        return;
    };
    let terminating = pod.metadata.deletion_timestamp.is_some();
    ext.update_book(|book| {
        let uid = identity.uid.clone();
        if let Err(error) = book.observe_bound_in(identity, &node, &pool, recorded.as_deref(), gpus, gang.clone()) {
            tracing::warn!(%error, "a bound pod's GPUs could not be accounted");
        }
        book.observe_gang_max(&uid, gang_max);
        if terminating {
            book.observe_terminating(&uid);
        }
        if let (Some(gang), Some(size)) = (gang, gang_size) {
            book.observe_gang_size(&gang, &uid, size);
        }
    });
}
