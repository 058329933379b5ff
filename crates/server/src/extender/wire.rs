//! The wire types of `k8s.io/kube-scheduler/extender/v1`, as kube-scheduler encodes and
//! decodes them. The Go structs carry no JSON tags, so every field is its Go name in
//! PascalCase; pointers and nil maps are `null`; unknown fields are ignored (newer
//! Kubernetes versions add some, and Go's decoder skips them too). Pods and nodes are
//! k8s-openapi's types, which accept the TypeMeta-less objects the scheduler sends.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::List;
use serde::{Deserialize, Serialize};

/// Filter and prioritize request (`ExtenderArgs`).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ExtenderArgs {
    #[serde(rename = "Pod")]
    pub pod: Pod,
    /// Set when the extender is not `nodeCacheCapable`.
    #[serde(rename = "Nodes", default)]
    pub nodes: Option<List<Node>>,
    /// Set when the extender is `nodeCacheCapable`.
    #[serde(rename = "NodeNames", default)]
    pub node_names: Option<Vec<String>>,
}

/// `FailedNodesMap`: node name to the reason.
pub type FailedNodesMap = BTreeMap<String, String>;

/// Filter reply (`ExtenderFilterResult`).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
pub struct ExtenderFilterResult {
    #[serde(rename = "Nodes")]
    pub nodes: Option<List<Node>>,
    #[serde(rename = "NodeNames")]
    pub node_names: Option<Vec<String>>,
    #[serde(rename = "FailedNodes", default, deserialize_with = "null_as_empty")]
    pub failed_nodes: FailedNodesMap,
    #[serde(rename = "FailedAndUnresolvableNodes", default, deserialize_with = "null_as_empty")]
    pub failed_and_unresolvable_nodes: FailedNodesMap,
    #[serde(rename = "Error", default, deserialize_with = "null_as_empty")]
    pub error: String,
}

/// Go encodes a nil map or an empty pointer as `null`; read it as empty.
fn null_as_empty<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// One entry of the prioritize reply (`HostPriority`); the reply is a bare array of them.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct HostPriority {
    #[serde(rename = "Host")]
    pub host: String,
    #[serde(rename = "Score")]
    pub score: i64,
}

/// Bind request (`ExtenderBindingArgs`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct ExtenderBindingArgs {
    #[serde(rename = "PodName")]
    pub pod_name: String,
    #[serde(rename = "PodNamespace")]
    pub pod_namespace: String,
    #[serde(rename = "PodUID")]
    pub pod_uid: String,
    #[serde(rename = "Node")]
    pub node: String,
}

/// Bind reply (`ExtenderBindingResult`): an empty `Error` is success.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct ExtenderBindingResult {
    #[serde(rename = "Error", default, deserialize_with = "null_as_empty")]
    pub error: String,
}

/// Preempt request (`ExtenderPreemptionArgs`).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ExtenderPreemptionArgs {
    #[serde(rename = "Pod")]
    pub pod: Pod,
    /// Set when the extender is not `nodeCacheCapable`.
    #[serde(rename = "NodeNameToVictims", default)]
    pub node_name_to_victims: Option<BTreeMap<String, Victims>>,
    /// Set when the extender is `nodeCacheCapable`.
    #[serde(rename = "NodeNameToMetaVictims", default)]
    pub node_name_to_meta_victims: Option<BTreeMap<String, MetaVictims>>,
}

/// `Victims`: full pods to evict on one node.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Victims {
    #[serde(rename = "Pods", default)]
    pub pods: Option<Vec<Pod>>,
    #[serde(rename = "NumPDBViolations", default)]
    pub num_pdb_violations: i64,
}

/// `MetaPod`: a victim by UID.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct MetaPod {
    #[serde(rename = "UID")]
    pub uid: String,
}

/// `MetaVictims`: victims by UID on one node.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct MetaVictims {
    #[serde(rename = "Pods", default)]
    pub pods: Option<Vec<MetaPod>>,
    #[serde(rename = "NumPDBViolations", default)]
    pub num_pdb_violations: i64,
}

/// Preempt reply (`ExtenderPreemptionResult`): always the meta form.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct ExtenderPreemptionResult {
    #[serde(rename = "NodeNameToMetaVictims")]
    pub node_name_to_meta_victims: Option<BTreeMap<String, MetaVictims>>,
}
