//! A pod's PodGroup object, read through the API server: a coscheduling PodGroup's
//! `spec.minMember` (`scheduling.x-k8s.io/v1alpha1`, scheduler-plugins) or an upstream
//! PodGroup's gang `minCount` and topology key (`scheduling.k8s.io/v1beta1`, Kubernetes
//! 1.37). Both the secondary scheduler and the extender (when it runs against an API server)
//! size a pod's gang from it, so the pods need not repeat it in `topoplace.io/gang-size`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::scheduling::v1beta1::PodGroup as UpstreamPodGroup;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::Client;
use thiserror::Error;

use crate::pod::{self, PodGroupFacts, PodGroupRef};

/// PodGroups remembered at once; past it the cache starts again empty (a lookup is one GET).
pub const POD_GROUPS_REMEMBERED_MAX: usize = 100_000;

/// How long a PodGroup read is used before it is read again: a coscheduling PodGroup's
/// `minMember` may be edited, and a PodGroup deleted and made again under its name.
pub const POD_GROUP_KEPT: Duration = Duration::from_secs(30);

/// The longest one PodGroup GET may take (it runs inside kube-scheduler's filter call).
pub const POD_GROUP_LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a pod's PodGroup gave no facts. The text names the PodGroup and, for a bad value, the
/// field.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PodGroupError {
    /// The GET failed (not found, forbidden, unreachable).
    #[error("its PodGroup {namespace}/{name} ({api}) cannot be read: {reason}")]
    Unreadable {
        namespace: String,
        name: String,
        api: &'static str,
        reason: String,
        /// The API server answered 404.
        not_found: bool,
    },
    /// The object holds a value that is no gang size.
    #[error("its PodGroup {namespace}/{name}: spec.schedulingPolicy.gang.minCount is {value}, not a positive count")]
    BadMinCount { namespace: String, name: String, value: i32 },
    /// The PodGroup is one child of a CompositePodGroup (alpha in Kubernetes 1.37), whose
    /// all-or-nothing spans its other children: placing this PodGroup alone would break it.
    #[error(
        "its PodGroup {namespace}/{name} belongs to CompositePodGroup {namespace}/{composite} \
         (spec.parentCompositePodGroupName; scheduling.k8s.io/v1alpha3), which topoplace does not read: \
         give the replica's roles in topoplace.io/roles with the topoplace.io/gang labels instead"
    )]
    InComposite { namespace: String, name: String, composite: String },
}

/// The lookups, with what they found, each kept [`POD_GROUP_KEPT`]; a failed lookup is not
/// kept, so a PodGroup created after its pods is found on a later try.
pub struct PodGroups {
    client: Client,
    known: Mutex<HashMap<(String, PodGroupRef), (PodGroupFacts, Instant)>>,
}

impl PodGroups {
    pub fn new(client: Client) -> Self {
        PodGroups { client, known: Mutex::default() }
    }

    /// What the pod's PodGroup says, if the pod names one ([`pod::pod_group_to_look_up`]);
    /// `Ok(None)` for a pod without one, and for a coscheduling PodGroup that does not exist
    /// (the pod's own `topoplace.io/gang-size` then decides, and its absence is the pod's
    /// error). Any other failed read is an error naming the PodGroup and why (forbidden,
    /// timed out); so is an upstream PodGroup that does not exist: its pod's gang and scope
    /// are unknown without it.
    ///
    /// # Errors
    /// [`PodGroupError`] naming the PodGroup.
    pub async fn of_pod(&self, pod: &Pod) -> Result<Option<PodGroupFacts>, PodGroupError> {
        let Some(reference) = pod::pod_group_to_look_up(pod) else { return Ok(None) };
        let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
        match self.facts(namespace, &reference).await {
            Ok(facts) => Ok(Some(facts)),
            Err(PodGroupError::Unreadable { not_found: true, .. })
                if matches!(reference, PodGroupRef::Coscheduling(_)) =>
            {
                Ok(None)
            }
            Err(error) => Err(error),
        }
    }

    /// One PodGroup's facts, from the cache or one GET.
    ///
    /// # Errors
    /// [`PodGroupError`] naming the PodGroup.
    pub async fn facts(&self, namespace: &str, reference: &PodGroupRef) -> Result<PodGroupFacts, PodGroupError> {
        let key = (namespace.to_string(), reference.clone());
        if let Some((known, at)) = self.lock().get(&key) {
            if at.elapsed() < POD_GROUP_KEPT {
                return Ok(known.clone());
            }
        }
        let unreadable = |name: &str, api: &'static str, error: Result<kube::Error, tokio::time::error::Elapsed>| {
            let (reason, not_found) = match error {
                Ok(kube::Error::Api(response)) => (response.to_string(), response.code == 404),
                Ok(error) => (error.to_string(), false),
                Err(_) => (format!("no answer within {} s", POD_GROUP_LOOKUP_TIMEOUT.as_secs()), false),
            };
            PodGroupError::Unreadable { namespace: namespace.into(), name: name.into(), api, reason, not_found }
        };
        let facts = match reference {
            PodGroupRef::Coscheduling(name) => {
                let resource = ApiResource::from_gvk_with_plural(
                    &GroupVersionKind::gvk("scheduling.x-k8s.io", "v1alpha1", "PodGroup"),
                    "podgroups",
                );
                let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), namespace, &resource);
                const API: &str = "scheduling.x-k8s.io/v1alpha1";
                let object = match tokio::time::timeout(POD_GROUP_LOOKUP_TIMEOUT, api.get(name)).await {
                    Ok(Ok(object)) => object,
                    Ok(Err(error)) => return Err(unreadable(name, API, Ok(error))),
                    Err(elapsed) => return Err(unreadable(name, API, Err(elapsed))),
                };
                let min_count = object.data["spec"]["minMember"].as_u64().and_then(|m| u32::try_from(m).ok());
                PodGroupFacts { min_count, topology_key: None }
            }
            PodGroupRef::Upstream(name) => {
                let api: Api<UpstreamPodGroup> = Api::namespaced(self.client.clone(), namespace);
                const API: &str = "scheduling.k8s.io/v1beta1, spec.schedulingGroup.podGroupName";
                let group = match tokio::time::timeout(POD_GROUP_LOOKUP_TIMEOUT, api.get(name)).await {
                    Ok(Ok(group)) => group,
                    Ok(Err(error)) => return Err(unreadable(name, API, Ok(error))),
                    Err(elapsed) => return Err(unreadable(name, API, Err(elapsed))),
                };
                upstream_facts(namespace, name, &group)?
            }
        };
        let mut known = self.lock();
        if known.len() >= POD_GROUPS_REMEMBERED_MAX {
            known.clear();
        }
        known.insert(key, (facts.clone(), Instant::now()));
        Ok(facts)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, PodGroupRef), (PodGroupFacts, Instant)>> {
        self.known.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// An upstream PodGroup (`scheduling.k8s.io/v1beta1`) as the pod's gang: the `gang` policy's
/// `minCount` (a `basic` policy is no gang) and the first topology constraint's key. The
/// Workload the PodGroup was made from is not read: its controller copies the template's
/// policy and constraints into the PodGroup (`PodGroupSpec`'s field docs in kubernetes/api).
fn upstream_facts(namespace: &str, name: &str, group: &UpstreamPodGroup) -> Result<PodGroupFacts, PodGroupError> {
    let spec = &group.spec;
    if let Some(composite) = spec.parent_composite_pod_group_name.as_ref().filter(|c| !c.is_empty()) {
        return Err(PodGroupError::InComposite {
            namespace: namespace.into(),
            name: name.into(),
            composite: composite.clone(),
        });
    }
    let min_count = match &spec.scheduling_policy.gang {
        Some(gang) => match u32::try_from(gang.min_count) {
            Ok(count) if count > 0 => Some(count),
            _ => {
                return Err(PodGroupError::BadMinCount {
                    namespace: namespace.into(),
                    name: name.into(),
                    value: gang.min_count,
                })
            }
        },
        None => None,
    };
    let topology_key = spec
        .scheduling_constraints
        .as_ref()
        .and_then(|c| c.topology.as_ref())
        .and_then(|t| t.first())
        .map(|t| t.key.clone());
    Ok(PodGroupFacts { min_count, topology_key })
}
