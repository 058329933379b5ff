//! The wire types of `k8s.io/kube-scheduler/extender/v1`, as kube-scheduler encodes and
//! decodes them. The Go structs carry no JSON tags, so every field is its Go name in
//! PascalCase; pointers and nil maps are `null`; unknown fields are ignored (newer
//! Kubernetes versions add some, and Go's decoder skips them too). Pods are k8s-openapi's
//! types, which accept the TypeMeta-less objects the scheduler sends; the nodes of a full
//! NodeList are kept as the bytes the scheduler sent ([`NodeList`]).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

/// Filter and prioritize request (`ExtenderArgs`).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ExtenderArgs {
    #[serde(rename = "Pod")]
    pub pod: Pod,
    /// Set when the extender is not `nodeCacheCapable`.
    #[serde(rename = "Nodes", default)]
    pub nodes: Option<NodeList>,
    /// Set when the extender is `nodeCacheCapable`.
    #[serde(rename = "NodeNames", default)]
    pub node_names: Option<Vec<String>>,
}

/// A `v1.NodeList` whose items are kept as the JSON kube-scheduler sent, one raw object per
/// node. The extender reads only each node's `metadata.name` ([`NodeList::names`]) and hands
/// the passing items back byte for byte in the filter reply, so a Node is never decoded into
/// typed fields (most of a full-NodeList request's cost) and nothing a newer Kubernetes adds
/// to a Node is lost on the way back. Encoded as `{"apiVersion":"v1","kind":"NodeList",
/// "metadata":{},"items":[...]}`; `items: null` or missing reads as empty, as in Go.
#[derive(Debug, Clone, Default)]
pub struct NodeList {
    /// The nodes, in the request's order.
    pub items: Vec<Box<RawValue>>,
}

/// A bad item of a request's NodeList: its index and what is wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NodeListError {
    /// The item is not an object with an optional `metadata.name` string.
    #[error("Nodes.items[{index}] is not a Node: {reason}")]
    NotANode { index: usize, reason: String },
    /// The item has no `metadata.name`.
    #[error("Nodes.items[{index}].metadata.name is missing")]
    NoName { index: usize },
}

impl NodeList {
    /// Each item's `metadata.name`, in order; reads nothing else of the node.
    ///
    /// # Errors
    /// [`NodeListError`] naming the first item that is not a Node or has no name.
    pub fn names(&self) -> Result<Vec<String>, NodeListError> {
        #[derive(Deserialize)]
        struct Named {
            #[serde(default)]
            metadata: Option<Metadata>,
        }
        #[derive(Deserialize)]
        struct Metadata {
            #[serde(default)]
            name: Option<String>,
        }
        self.items
            .iter()
            .enumerate()
            .map(|(index, item)| {
                let named: Named = serde_json::from_str(item.get())
                    .map_err(|error| NodeListError::NotANode { index, reason: error.to_string() })?;
                named.metadata.and_then(|m| m.name).ok_or(NodeListError::NoName { index })
            })
            .collect()
    }
}

/// Two lists are equal when their items are the same bytes.
impl PartialEq for NodeList {
    fn eq(&self, other: &Self) -> bool {
        self.items.iter().map(|item| item.get()).eq(other.items.iter().map(|item| item.get()))
    }
}

impl Serialize for NodeList {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(4))?;
        map.serialize_entry("apiVersion", "v1")?;
        map.serialize_entry("kind", "NodeList")?;
        map.serialize_entry("metadata", &BTreeMap::<String, String>::new())?;
        map.serialize_entry("items", &self.items)?;
        map.end()
    }
}

impl<'de> Deserialize<'de> for NodeList {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Wire {
            #[serde(default)]
            items: Option<Vec<Box<RawValue>>>,
        }
        let wire = Wire::deserialize(deserializer)?;
        Ok(NodeList { items: wire.items.unwrap_or_default() })
    }
}

/// `FailedNodesMap`: node name to the reason.
pub type FailedNodesMap = BTreeMap<String, String>;

/// Filter reply (`ExtenderFilterResult`).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
pub struct ExtenderFilterResult {
    #[serde(rename = "Nodes")]
    pub nodes: Option<NodeList>,
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
