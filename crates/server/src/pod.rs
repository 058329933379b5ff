//! Kubernetes Pods into the core's [`PodDemand`]: GPUs from the `nvidia.com/gpu` limits, the
//! gang from the labels of DESIGN.md (topoplace, coscheduling, LeaderWorkerSet, in that
//! order), memory and parallelism from `topoplace.io/*` annotations. Every error names the
//! pod and the field.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use thiserror::Error;

use topoplace_engine::quantity;
use topoplace_engine::topology::{product, DevicePool};
use topoplace_engine::workload::{
    GangSpec, MemoryNeed, ModelSpec, RoleSpec, Scope, Slicing, GANG_MEMBERS_MAX, RUNTIME_OVERHEAD_DEFAULT,
};
use topoplace_online::reservation::{BindOrder, GangMembership, PodDemand, PodIdentity, RoleDemand};
use topoplace_online::scheduler::predicates::{
    PodNeeds, Resources, SelectorOperator, SelectorRequirement, SelectorTerm, TaintEffect, Toleration, PODS_RESOURCE,
};

pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// Where topoplace records the GPU indices it gave a pod (merged in by the Binding).
pub const GPUS_ANNOTATION: &str = "topoplace.io/gpus";
/// Set (to the time in ms since the Unix epoch) on a gang member whose held bind lapsed,
/// when the rest of its gang is at bind: the update makes kube-scheduler retry it now.
pub const GANG_RETRY_ANNOTATION: &str = "topoplace.io/gang-retry";

const GANG_LABEL: &str = "topoplace.io/gang";
const GANG_SIZE: &str = "topoplace.io/gang-size";
/// An elastic gang's most members (label or annotation, at least its size): the gang starts
/// once its size (its minimum, like upstream's gang `minCount` or Volcano's `minMember`) fits,
/// and more of its pods join it while it runs, up to this many. Without it a gang that runs
/// takes any number of joining pods, up to [`GANG_MEMBERS_MAX`].
pub const GANG_MAX_SIZE: &str = "topoplace.io/gang-max-size";
const RANK: &str = "topoplace.io/rank";
const POD_GROUP_LABEL: &str = "scheduling.x-k8s.io/pod-group";
const LWS_GROUP_LABEL: &str = "leaderworkerset.sigs.k8s.io/group-key";
const LWS_SIZE_ANNOTATION: &str = "leaderworkerset.sigs.k8s.io/size";
const LWS_INDEX_LABEL: &str = "leaderworkerset.sigs.k8s.io/worker-index";
/// LeaderWorkerSet's exclusive placement (`ExclusiveKeyAnnotationKey` in
/// kubernetes-sigs/lws `api/leaderworkerset/v1`): on the group's pods (the controller copies it
/// to the workers' template); the LWS controller creates a group's workers only once its
/// leader is bound, with a node selector for the leader's domain of this key.
const LWS_EXCLUSIVE_TOPOLOGY: &str = "leaderworkerset.sigs.k8s.io/exclusive-topology";
/// LeaderWorkerSet's subgroups (`SubGroupSizeAnnotationKey`, `SubGroupExclusiveKeyAnnotationKey`
/// in kubernetes-sigs/lws `api/leaderworkerset/v1`): on every pod of a group whose
/// LeaderWorkerSet has a `subGroupPolicy`; with the exclusive key, each subgroup must sit in a
/// domain of that key of its own (pod affinity within a subgroup, anti-affinity between
/// subgroups, `pkg/webhooks/pod_webhook.go`).
const LWS_SUBGROUP_SIZE: &str = "leaderworkerset.sigs.k8s.io/subgroup-size";
const LWS_SUBGROUP_EXCLUSIVE: &str = "leaderworkerset.sigs.k8s.io/subgroup-exclusive-topology";
/// On a LeaderWorkerSet's pods (its `workerTemplate`, and `leaderTemplate` if it has one):
/// `"0"` says the group's leader (worker-index 0) takes no GPUs. kube-scheduler never sends
/// such a leader to the extender (`managedResources` names only `nvidia.com/gpu`), so without
/// this the gang would wait for a member that never comes. With it, the gang is the group's
/// workers only: `size - 1` members, ranked `worker-index - 1`; the leader is no member.
pub const LWS_LEADER_GPUS: &str = "topoplace.io/leader-gpus";
const MIN_GPU_MEMORY: &str = "topoplace.io/min-gpu-memory";
/// One MIG device of this profile (`2g.20gb`) per pod, of any GPU product, instead of a
/// memory need ([`MemoryNeed::MigProfile`]).
pub const MIG_PROFILE_ANNOTATION: &str = "topoplace.io/mig-profile";
/// The device plugin's resource for MIG devices of one profile under the mixed MIG strategy
/// (`nvidia.com/mig-2g.20gb`; GFD `internal/lm/mig-strategy.go`).
pub const MIG_RESOURCE_PREFIX: &str = "nvidia.com/mig-";
/// The device plugin's suffix to a shared resource under `renameByDefault`
/// (`nvidia.com/mig-1g.10gb.shared`): not planned here, left to kube-scheduler.
pub const SHARED_RESOURCE_SUFFIX: &str = ".shared";

/// Whether `name` is a resource whose devices topoplace places: `nvidia.com/gpu` or a MIG
/// profile's `nvidia.com/mig-<profile>` (not a renamed shared one).
pub fn is_placed_resource(name: &str) -> bool {
    name == GPU_RESOURCE || (name.starts_with(MIG_RESOURCE_PREFIX) && !name.ends_with(SHARED_RESOURCE_SUFFIX))
}
const MODEL_PARAMS: &str = "topoplace.io/model-params";
const MODEL_DTYPE: &str = "topoplace.io/model-dtype";
const KV_CACHE: &str = "topoplace.io/kv-cache";
const TENSOR_PARALLEL: &str = "topoplace.io/tensor-parallel";
const PIPELINE_PARALLEL: &str = "topoplace.io/pipeline-parallel";
const TOPOLOGY_REQUIRED: &str = "topoplace.io/topology-required";
const TOPOLOGY_PREFERRED: &str = "topoplace.io/topology-preferred";
/// On every pod of a replica with roles (each LeaderWorkerSet template, every role's pods):
/// the replica's roles, in the workload file's `roles[]` syntax as JSON or YAML flow
/// ([`topoplace_formats::files::workload::roles_annotation`]). The gang labels still say
/// which replica, and its size counts the pods of every role; `topoplace.io/topology-*`
/// are then the whole replica's scope, and parallelism and memory belong to each role.
pub const ROLES_ANNOTATION: &str = "topoplace.io/roles";
/// The pod's own role in `topoplace.io/roles` (label, or annotation). A LeaderWorkerSet pod
/// may leave it out: its roles are read in worker-index order (the first, of one member, is
/// the leader at index 0; the next role's members follow at 1, 2, ...).
pub const ROLE_LABEL: &str = "topoplace.io/role";

#[derive(Debug, Error, PartialEq)]
pub enum PodError {
    #[error("pod {pod}: {field} is missing")]
    Missing { pod: String, field: &'static str },
    #[error("pod {pod}: {field} is `{value}`: {detail}")]
    Invalid { pod: String, field: String, value: String, detail: String },
}

/// The pod's namespace/name/uid; `uid` is required because gangs track members by it.
pub fn identity(pod: &Pod) -> Result<PodIdentity, PodError> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let namespace = pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let shown = format!("{namespace}/{name}");
    if name.is_empty() {
        return Err(PodError::Missing { pod: shown, field: "metadata.name" });
    }
    let uid = pod.metadata.uid.clone().filter(|u| !u.is_empty());
    let Some(uid) = uid else { return Err(PodError::Missing { pod: shown, field: "metadata.uid" }) };
    Ok(PodIdentity { namespace, name, uid })
}

/// GPUs the pod asks for: [`gpu_request`]'s count.
pub fn gpu_count(pod: &Pod) -> Result<u32, PodError> {
    gpu_request(pod).map(|(count, _)| count)
}

/// The GPU devices the pod asks for and the resource it asks them as: per resource
/// (`nvidia.com/gpu`, or under the mixed MIG strategy `nvidia.com/mig-<profile>`), the sum
/// over its containers (limits, else requests), or the largest init container's if that is
/// more, as kube-scheduler counts. `(0, Gpu)` for a pod without GPUs. Errors: a count that
/// is not a whole number, a `nvidia.com/mig-*` resource that names no MIG profile, and a pod
/// asking for devices of two resources (one pod's devices come from one pool).
pub fn gpu_request(pod: &Pod) -> Result<(u32, DevicePool), PodError> {
    let shown = shown(pod);
    let Some(spec) = &pod.spec else { return Ok((0, DevicePool::Gpu)) };
    // Per resource: the containers' sum and the init containers' largest.
    let mut totals: BTreeMap<DevicePool, (u32, u32)> = BTreeMap::new();
    let containers = spec.containers.iter().enumerate().map(|(i, c)| (format!("spec.containers[{i}]"), c, false));
    let inits =
        spec.init_containers.iter().flatten().enumerate().map(|(i, c)| (format!("spec.initContainers[{i}]"), c, true));
    for (path, container, init) in containers.chain(inits) {
        let Some(resources) = &container.resources else { continue };
        let mut named: BTreeMap<&String, (&str, &k8s_openapi::apimachinery::pkg::api::resource::Quantity)> =
            BTreeMap::new();
        named.extend(resources.requests.iter().flatten().map(|(k, v)| (k, ("requests", v))));
        named.extend(resources.limits.iter().flatten().map(|(k, v)| (k, ("limits", v))));
        for (name, (kind, quantity)) in named {
            let pool = if name == GPU_RESOURCE {
                DevicePool::Gpu
            } else if let Some(profile) = name.strip_prefix(MIG_RESOURCE_PREFIX).filter(|_| is_placed_resource(name)) {
                if !product::is_mig_profile(profile) {
                    return Err(PodError::Invalid {
                        pod: shown.clone(),
                        field: format!("{path}.resources.{kind}"),
                        value: name.clone(),
                        detail: format!("{MIG_RESOURCE_PREFIX}<profile> names no MIG profile (like 2g.20gb)"),
                    });
                }
                DevicePool::Mig(profile.to_string())
            } else {
                continue;
            };
            let count = quantity.0.trim().parse::<u32>().map_err(|_| PodError::Invalid {
                pod: shown.clone(),
                field: format!("{path}.resources.{kind}[{name}]"),
                value: quantity.0.clone(),
                detail: "GPUs are counted in whole devices".into(),
            })?;
            let total = totals.entry(pool).or_default();
            if init {
                total.1 = total.1.max(count);
            } else {
                total.0 = total.0.saturating_add(count);
            }
        }
    }
    let asked: Vec<(DevicePool, u32)> =
        totals.into_iter().map(|(pool, (sum, init))| (pool, sum.max(init))).filter(|&(_, n)| n > 0).collect();
    match asked.as_slice() {
        [] => Ok((0, DevicePool::Gpu)),
        [(pool, count)] => Ok((*count, pool.clone())),
        [(first, _), (second, _), ..] => Err(PodError::Invalid {
            pod: shown,
            field: "spec.containers[*].resources.limits".into(),
            value: format!("{first} and {second}"),
            detail: "a pod's GPU devices come from one resource: nvidia.com/gpu or one MIG profile's".into(),
        }),
    }
}

/// The pod as errors name it: `namespace/name`, whatever else is missing.
pub fn shown(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or("<no name>")
    )
}

fn number(pod: &str, field: String, value: &str, max: u32) -> Result<u32, PodError> {
    let invalid =
        |detail: String| PodError::Invalid { pod: pod.into(), field: field.clone(), value: value.into(), detail };
    // Read wide, so a number too large or negative is named as such.
    let parsed: i128 = value.trim().parse().map_err(|_| invalid("not a whole number".into()))?;
    if parsed < 0 {
        return Err(invalid("a count cannot be negative".into()));
    }
    if parsed > i128::from(max) {
        return Err(invalid(format!("above the limit of {max}")));
    }
    Ok(parsed as u32)
}

/// A PodGroup object a pod belongs to, which the caller looks up in the API server.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PodGroupRef {
    /// A scheduler-plugins coscheduling PodGroup (`scheduling.x-k8s.io/v1alpha1`, label
    /// `scheduling.x-k8s.io/pod-group`) whose pods do not carry the gang's size: its
    /// `spec.minMember` is.
    Coscheduling(String),
    /// Upstream Kubernetes' PodGroup (`scheduling.k8s.io/v1beta1`, Kubernetes 1.37), named
    /// by the pod's `spec.schedulingGroup.podGroupName`: its `spec.schedulingPolicy.gang.minCount`
    /// is the gang's size and `spec.schedulingConstraints.topology[0].key` its required scope
    /// (field names from k8s-openapi's `v1_37` `api::scheduling::v1beta1`, generated from the
    /// Kubernetes OpenAPI spec; `api::core::v1::PodSchedulingGroup`).
    Upstream(String),
}

/// What the caller read from a pod's PodGroup object ([`PodGroupRef`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodGroupFacts {
    /// The gang's size (`minMember`, or `gang.minCount`); `None` for an upstream PodGroup of
    /// the `basic` policy, whose pods are scheduled one by one (no gang).
    pub min_count: Option<u32>,
    /// An upstream PodGroup's topology key (a node label key): all its pods in one domain.
    pub topology_key: Option<String>,
}

/// The upstream PodGroup a pod names in `spec.schedulingGroup.podGroupName`, if any.
fn upstream_pod_group(pod: &Pod) -> Option<&str> {
    let name = pod.spec.as_ref()?.scheduling_group.as_ref()?.pod_group_name.as_deref()?;
    Some(name).filter(|n| !n.trim().is_empty())
}

/// The PodGroup object the caller must look up for this pod: a coscheduling PodGroup whose
/// pods do not carry the gang's size, or an upstream PodGroup when no label of topoplace,
/// coscheduling or LeaderWorkerSet names the gang first ([`gang_of`]'s order).
pub fn pod_group_to_look_up(pod: &Pod) -> Option<PodGroupRef> {
    let empty = BTreeMap::new();
    let labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
    if labels.contains_key(GANG_LABEL) {
        return None;
    }
    if let Some(group) = labels.get(POD_GROUP_LABEL) {
        let annotations = pod.metadata.annotations.as_ref();
        let sized = labels.contains_key(GANG_SIZE) || annotations.is_some_and(|a| a.contains_key(GANG_SIZE));
        return (!sized).then(|| PodGroupRef::Coscheduling(group.clone()));
    }
    if labels.contains_key(LWS_GROUP_LABEL) {
        return None;
    }
    upstream_pod_group(pod).map(|name| PodGroupRef::Upstream(name.to_string()))
}

/// The gang a pod belongs to, if any (DESIGN.md's order: topoplace, coscheduling, LWS,
/// then upstream's PodGroup).
pub fn gang_of(pod: &Pod, namespace: &str) -> Result<Option<GangMembership>, PodError> {
    gang_of_sized(pod, namespace, None)
}

/// The first field in which two demands of one pod differ: its name, `a`'s value, `b`'s (the
/// request's and the API server's, at bind); `None` when they agree.
pub fn demand_difference(a: &PodDemand, b: &PodDemand) -> Option<(&'static str, String, String)> {
    let gang = |d: &PodDemand| {
        d.gang.as_ref().map_or_else(
            || "no gang".to_string(),
            |g| format!("gang `{}` of {} (rank {:?}, {:?})", g.key, g.size, g.rank, g.order),
        )
    };
    let fields: [(&'static str, String, String); 9] = [
        ("the pod", a.pod.to_string(), b.pod.to_string()),
        ("its GPU resource", a.pool.to_string(), b.pool.to_string()),
        ("nvidia.com/gpu", a.gpus.to_string(), b.gpus.to_string()),
        ("its gang", gang(a), gang(b)),
        ("its memory floor", format!("{:?}", a.memory), format!("{:?}", b.memory)),
        (
            "its parallelism",
            format!("{:?}/{:?}", a.tensor_parallel, a.pipeline_parallel),
            format!("{:?}/{:?}", b.tensor_parallel, b.pipeline_parallel),
        ),
        ("its required topology", format!("{:?}", a.required), format!("{:?}", b.required)),
        ("its preferred topology", format!("{:?}", a.preferred), format!("{:?}", b.preferred)),
        ("its roles", format!("{:?}", a.roles), format!("{:?}", b.roles)),
    ];
    fields.into_iter().find(|(_, x, y)| x != y)
}

/// The key (`namespace/name`) of the gang the pod's labels put it in, by the same precedence as
/// [`gang_of`], without reading its size: what a bind is checked against
/// ([`crate::binder::Binder::verify`]), for pods whose size lives in a PodGroup object too.
pub fn gang_key_of(pod: &Pod, namespace: &str) -> Option<String> {
    let label = |key: &str| pod.metadata.labels.as_ref().and_then(|labels| labels.get(key));
    if let Some(name) = label(GANG_LABEL).or_else(|| label(POD_GROUP_LABEL)) {
        return Some(format!("{namespace}/{name}"));
    }
    if let Some(group) = label(LWS_GROUP_LABEL) {
        return Some(format!("{namespace}/lws-{group}"));
    }
    upstream_pod_group(pod).map(|name| format!("{namespace}/{name}"))
}

/// [`gang_of`], with what the caller read from the pod's PodGroup object, if it looked one up
/// ([`pod_group_to_look_up`]). Without it, a pod of an upstream PodGroup or of a coscheduling
/// one must carry `topoplace.io/gang-size` (a server reading an API server looks the object
/// up: [`crate::pod_group::PodGroups`]).
pub fn gang_of_sized(
    pod: &Pod,
    namespace: &str,
    pod_group: Option<&PodGroupFacts>,
) -> Result<Option<GangMembership>, PodError> {
    let shown = shown(pod);
    let empty = BTreeMap::new();
    let labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
    let annotations = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    let either = |key: &str| labels.get(key).or_else(|| annotations.get(key));
    let size_from = |key: &'static str, value: Option<&String>| -> Result<u32, PodError> {
        let Some(value) = value else {
            return Err(PodError::Missing { pod: shown.clone(), field: key });
        };
        let size = number(&shown, key.to_string(), value, GANG_MEMBERS_MAX)?;
        if size == 0 {
            return Err(PodError::Invalid {
                pod: shown.clone(),
                field: key.into(),
                value: value.clone(),
                detail: "a gang has at least one member".into(),
            });
        }
        Ok(size)
    };
    let rank_from = |key: &str| -> Result<Option<u32>, PodError> {
        either(key).map(|v| number(&shown, key.to_string(), v, GANG_MEMBERS_MAX)).transpose()
    };
    // An elastic gang's maximum: at least its size, and only for a gang of one shape.
    let max_for = |size: u32| -> Result<Option<u32>, PodError> {
        let Some(value) = either(GANG_MAX_SIZE) else { return Ok(None) };
        let max = number(&shown, GANG_MAX_SIZE.to_string(), value, GANG_MEMBERS_MAX)?;
        let invalid = |detail: String| PodError::Invalid {
            pod: shown.clone(),
            field: GANG_MAX_SIZE.into(),
            value: value.clone(),
            detail,
        };
        if max < size {
            return Err(invalid(format!("below the gang's size {size}, which is its least number of members")));
        }
        if annotations.contains_key(ROLES_ANNOTATION) {
            return Err(invalid(format!(
                "a replica with roles ({ROLES_ANNOTATION}) has a fixed number of members per role; only a gang of one \
                 shape is elastic"
            )));
        }
        Ok(Some(max))
    };
    if let Some(name) = labels.get(GANG_LABEL) {
        let size = size_from(GANG_SIZE, either(GANG_SIZE))?;
        return Ok(Some(GangMembership {
            key: format!("{namespace}/{name}"),
            size,
            max: max_for(size)?,
            rank: rank_from(RANK)?,
            order: BindOrder::Together,
        }));
    }
    if let Some(group) = labels.get(POD_GROUP_LABEL) {
        // The PodGroup's minMember needs an API lookup, which a server on an API server makes
        // (a static `serve --cluster` cannot: there the size must be on the pod).
        let size = match (either(GANG_SIZE), pod_group.and_then(|g| g.min_count)) {
            (None, Some(min_member)) if min_member > 0 => min_member,
            (value, _) => size_from(GANG_SIZE, value)?,
        };
        return Ok(Some(GangMembership {
            key: format!("{namespace}/{group}"),
            size,
            max: max_for(size)?,
            rank: rank_from(RANK)?,
            order: BindOrder::Together,
        }));
    }
    if let Some(group) = labels.get(LWS_GROUP_LABEL) {
        let size = size_from(LWS_SIZE_ANNOTATION, annotations.get(LWS_SIZE_ANNOTATION))?;
        let rank = rank_from(LWS_INDEX_LABEL)?;
        let key = format!("{namespace}/lws-{group}");
        if let Some(value) = either(GANG_MAX_SIZE) {
            return Err(PodError::Invalid {
                pod: shown.clone(),
                field: GANG_MAX_SIZE.into(),
                value: value.clone(),
                detail: "a LeaderWorkerSet group has a fixed size (leaderworkerset.sigs.k8s.io/size); scale the \
                         LeaderWorkerSet's replicas instead"
                    .into(),
            });
        }
        let Some(leader) = annotations.get(LWS_LEADER_GPUS) else {
            // With roles, the rank stays the worker index: `demand` reads it within a role.
            // A group's size is fixed: pods past it are refused, not joined.
            return Ok(Some(GangMembership { key, size, max: Some(size), rank, order: BindOrder::Together }));
        };
        if annotations.contains_key(ROLES_ANNOTATION) {
            return Err(PodError::Invalid {
                pod: shown.clone(),
                field: format!("metadata.annotations[{LWS_LEADER_GPUS}]"),
                value: leader.clone(),
                detail: format!("give the leader's shape in {ROLES_ANNOTATION} instead (a role of 0 GPUs), not both"),
            });
        }
        let field = format!("metadata.annotations[{LWS_LEADER_GPUS}]");
        let invalid = |detail: &str| PodError::Invalid {
            pod: shown.clone(),
            field: field.clone(),
            value: leader.clone(),
            detail: detail.into(),
        };
        if number(&shown, field.clone(), leader, GANG_MEMBERS_MAX)? != 0 {
            return Err(invalid(
                "only \"0\" is understood (a leader without GPUs); a leader with the workers' shape needs no \
                 annotation, and one of another shape is a replica with roles: give both roles in \
                 topoplace.io/roles instead",
            ));
        }
        if size < 2 {
            return Err(invalid("the group has no worker besides its leader, so there is nothing to place"));
        }
        return Ok(match rank {
            // The leader itself: not a member (it takes no GPUs and is left to kube-scheduler).
            Some(0) => match gpu_count(pod)? {
                0 => None,
                gpus => {
                    return Err(invalid(&format!(
                        "this pod is the group's leader (worker-index 0) and asks for {gpus} GPUs"
                    )))
                }
            },
            rank => Some(GangMembership {
                key,
                size: size - 1,
                max: Some(size - 1),
                rank: rank.map(|r| r - 1),
                order: BindOrder::Together,
            }),
        });
    }
    if let Some(name) = upstream_pod_group(pod) {
        let key = format!("{namespace}/{name}");
        let size = match (either(GANG_SIZE), pod_group) {
            // A basic PodGroup: its pods are scheduled one by one.
            (None, Some(PodGroupFacts { min_count: None, .. })) => return Ok(None),
            (None, Some(PodGroupFacts { min_count: Some(count), .. })) if *count > 0 => *count,
            (value, _) => size_from(GANG_SIZE, value)?,
        };
        return Ok(Some(GangMembership {
            key,
            size,
            max: max_for(size)?,
            rank: rank_from(RANK)?,
            order: BindOrder::Together,
        }));
    }
    Ok(None)
}

/// Topology keys a pod's gang must stay inside, from objects and annotations other than
/// topoplace's own.
#[derive(Clone, Copy)]
struct ScopeKeys<'a> {
    /// Its upstream PodGroup's `spec.schedulingConstraints.topology[0].key`.
    pod_group: Option<&'a str>,
    /// LeaderWorkerSet's `leaderworkerset.sigs.k8s.io/exclusive-topology`.
    lws_exclusive: Option<&'a str>,
}

/// The pod's required scope: `topoplace.io/topology-required`, its upstream PodGroup's
/// topology key, or its LeaderWorkerSet's exclusive topology key. Two given and different is
/// an error naming both.
fn required_scope(shown: &str, annotation: Option<&str>, keys: ScopeKeys<'_>) -> Result<Option<Scope>, PodError> {
    fn trimmed(key: Option<&str>) -> Option<&str> {
        key.map(str::trim).filter(|k| !k.is_empty())
    }
    let mut given: Vec<(String, &str)> = Vec::new();
    if let Some(own) = trimmed(annotation) {
        given.push((format!("metadata.annotations[{TOPOLOGY_REQUIRED}]"), own));
    }
    if let Some(key) = trimmed(keys.pod_group) {
        given.push(("its PodGroup's spec.schedulingConstraints.topology[0].key".into(), key));
    }
    if let Some(key) = trimmed(keys.lws_exclusive) {
        given.push((format!("metadata.annotations[{LWS_EXCLUSIVE_TOPOLOGY}]"), key));
    }
    let Some((first_field, first)) = given.first().cloned() else { return Ok(None) };
    if let Some((field, other)) = given.iter().skip(1).find(|(_, key)| Scope::parse(key) != Scope::parse(first)) {
        return Err(PodError::Invalid {
            pod: shown.to_string(),
            field: first_field,
            value: first.to_string(),
            detail: format!("{field} is `{other}`; give one scope, or the same"),
        });
    }
    Ok(Some(Scope::parse(first)))
}

/// Everything the core needs to place the pod, with what the caller read from the pod's PodGroup object
/// ([`pod_group_to_look_up`]): a coscheduling PodGroup's `minMember`, an upstream PodGroup's
/// `minCount` and topology key.
pub fn demand_sized(pod: &Pod, pod_group: Option<&PodGroupFacts>) -> Result<PodDemand, PodError> {
    let identity = identity(pod)?;
    let shown = identity.to_string();
    let (gpus, pool) = gpu_request(pod)?;
    let empty = BTreeMap::new();
    let annotations = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    let annotation = |key: &str| annotations.get(key).map(|v| v.trim()).filter(|v| !v.is_empty());
    let invalid = |field: &str, value: &str, detail: String| PodError::Invalid {
        pod: shown.clone(),
        field: format!("metadata.annotations[{field}]"),
        value: value.into(),
        detail,
    };
    let memory = match (annotation(MIN_GPU_MEMORY), annotation(MODEL_PARAMS)) {
        // MIG devices of the mixed strategy: the resource names the profile, and says all
        // there is of the memory.
        _ if pool != DevicePool::Gpu => {
            let profile = pool.mig_profile().unwrap_or_default();
            let other = [MIG_PROFILE_ANNOTATION, MIN_GPU_MEMORY, MODEL_PARAMS]
                .into_iter()
                .filter_map(|key| annotation(key).map(|value| (key, value)))
                .find(|&(key, value)| key != MIG_PROFILE_ANNOTATION || !value.eq_ignore_ascii_case(profile));
            if let Some((key, value)) = other {
                return Err(invalid(
                    key,
                    value,
                    format!("the pod asks for {pool}, whose devices are MIG devices of {profile}: leave it out"),
                ));
            }
            MemoryNeed::MigProfile(profile.to_string())
        }
        (Some(_), _) | (_, Some(_)) if annotation(MIG_PROFILE_ANNOTATION).is_some() => {
            let profile = annotation(MIG_PROFILE_ANNOTATION).unwrap_or_default();
            return Err(invalid(
                MIG_PROFILE_ANNOTATION,
                profile,
                format!("give one of {MIG_PROFILE_ANNOTATION}, {MIN_GPU_MEMORY} and {MODEL_PARAMS}"),
            ));
        }
        (None, None) if annotation(MIG_PROFILE_ANNOTATION).is_some() => {
            MemoryNeed::MigProfile(annotation(MIG_PROFILE_ANNOTATION).unwrap_or_default().to_string())
        }
        (Some(floor), _) => MemoryNeed::FloorMib(quantity::bytes_to_mib_ceil(
            quantity::parse_bytes(floor).map_err(|e| invalid(MIN_GPU_MEMORY, floor, e.to_string()))?,
        )),
        (None, Some(params)) => {
            let parameters =
                quantity::parse_parameters(params).map_err(|e| invalid(MODEL_PARAMS, params, e.to_string()))?;
            let dtype = annotation(MODEL_DTYPE).unwrap_or("bf16");
            let dtype_eighths =
                quantity::dtype_bytes_eighths(dtype).map_err(|e| invalid(MODEL_DTYPE, dtype, e.to_string()))?;
            let kv_cache_bytes = match annotation(KV_CACHE) {
                Some(kv) => quantity::parse_bytes(kv).map_err(|e| invalid(KV_CACHE, kv, e.to_string()))?,
                None => 0,
            };
            MemoryNeed::Model(ModelSpec {
                parameters,
                dtype_eighths,
                dtype: dtype.to_string(),
                kv_cache_bytes,
                overhead: RUNTIME_OVERHEAD_DEFAULT,
            })
        }
        (None, None) => MemoryNeed::None,
    };
    let parallel = |key: &str| -> Result<Option<u32>, PodError> {
        annotation(key).map(|v| number(&shown, format!("metadata.annotations[{key}]"), v, 1 << 20)).transpose()
    };
    let mut gang = gang_of_sized(pod, &identity.namespace, pod_group)?;
    let empty_labels = BTreeMap::new();
    let labels = pod.metadata.labels.as_ref().unwrap_or(&empty_labels);
    let lws_leader = labels.contains_key(LWS_GROUP_LABEL) && labels.get(LWS_INDEX_LABEL).is_some_and(|i| i == "0");
    let roles = match annotation(ROLES_ANNOTATION) {
        None => {
            let named = match labels.get(ROLE_LABEL) {
                Some(role) => Some((role, "labels")),
                None => annotations.get(ROLE_LABEL).map(|role| (role, "annotations")),
            };
            if let Some((role, kind)) = named {
                return Err(PodError::Invalid {
                    pod: shown.clone(),
                    field: format!("metadata.{kind}[{ROLE_LABEL}]"),
                    value: role.clone(),
                    detail: format!("a role needs the replica's roles in the annotation {ROLES_ANNOTATION}"),
                });
            }
            None
        }
        Some(text) => Some(role_of(pod, &shown, text, gpus, gang.as_mut())?),
    };
    // LeaderWorkerSet's exclusive placement with a leader that takes GPUs: the leader bound
    // ahead of its workers (LWS creates them only once the leader is bound), the whole group
    // in one domain of the key (the leader's plan holds the workers' hosts; LWS then pins the
    // workers there by a node selector). With a GPU-less leader the node selector alone keeps
    // the workers there, so the key is not a scope of topoplace's: a key that is not one of
    // the view's level keys keeps working as before.
    let exclusive = annotation(LWS_EXCLUSIVE_TOPOLOGY).filter(|_| labels.contains_key(LWS_GROUP_LABEL));
    let mut leader_first_key = None;
    if let (Some(key), Some(membership)) = (exclusive, gang.as_mut()) {
        let leader_takes_gpus = match &roles {
            Some(own) => own.roles.first().is_some_and(|leader| leader.gpus_per_member > 0),
            // `leader-gpus: "0"` leaves the leader out of the gang; otherwise it has the
            // workers' shape.
            None => !annotations.contains_key(LWS_LEADER_GPUS),
        };
        if leader_takes_gpus {
            membership.order = BindOrder::LeaderFirst { leader: lws_leader };
            leader_first_key = Some(key);
        }
    }
    let scope_keys =
        ScopeKeys { pod_group: pod_group.and_then(|g| g.topology_key.as_deref()), lws_exclusive: leader_first_key };
    let tensor_parallel = parallel(TENSOR_PARALLEL)?;
    let pipeline_parallel = parallel(PIPELINE_PARALLEL)?;
    let roles = match annotation(LWS_SUBGROUP_EXCLUSIVE).filter(|_| labels.contains_key(LWS_GROUP_LABEL)) {
        None => roles,
        Some(key) => {
            let shape = (gpus, tensor_parallel, pipeline_parallel, &memory);
            lws_subgroups(&shown, annotations, key, roles, gang.as_ref(), shape)?
        }
    };
    Ok(PodDemand {
        gang,
        pod: identity,
        gpus,
        memory,
        tensor_parallel,
        pipeline_parallel,
        required: required_scope(&shown, annotation(TOPOLOGY_REQUIRED), scope_keys)?,
        preferred: annotation(TOPOLOGY_PREFERRED).map(Scope::parse),
        roles,
        pool,
    })
}

/// The replica a LeaderWorkerSet group with exclusive subgroups makes
/// (`leaderworkerset.sigs.k8s.io/subgroup-exclusive-topology: <key>`): the gang's members as
/// one role whose slices are the subgroups, each in a domain of the key of its own
/// ([`Slicing::exclusive`]). LWS numbers subgroups by worker index: `(index - 1) / size` when
/// `size - 1` divides by the subgroup size (the leader an extra pod of subgroup 0, or in none),
/// else `index / size` (`getSubGroupIndex` in `pkg/webhooks/pod_webhook.go`). Equal slices by
/// rank match them when the gang's members are exactly the subgrouped pods: a leader with the
/// workers' shape and a size that divides by the subgroup size, or a leader without GPUs
/// (`topoplace.io/leader-gpus: "0"`) and a size less one that does. Other layouts, and
/// `topoplace.io/roles` without slices, are errors naming the field. `shape` is the pod's GPUs,
/// tensor and pipeline parallelism and memory. With `topoplace.io/roles` that has slices, the
/// roles stand as given.
fn lws_subgroups(
    shown: &str,
    annotations: &BTreeMap<String, String>,
    key: &str,
    roles: Option<RoleDemand>,
    gang: Option<&GangMembership>,
    shape: (u32, Option<u32>, Option<u32>, &MemoryNeed),
) -> Result<Option<RoleDemand>, PodError> {
    let invalid = |field: &str, value: &str, detail: String| PodError::Invalid {
        pod: shown.to_string(),
        field: format!("metadata.annotations[{field}]"),
        value: value.to_string(),
        detail,
    };
    let Some(text) = annotations.get(LWS_SUBGROUP_SIZE).map(|v| v.trim()) else {
        return Err(PodError::Missing {
            pod: shown.to_string(),
            field: "metadata.annotations[leaderworkerset.sigs.k8s.io/subgroup-size]",
        });
    };
    let field = format!("metadata.annotations[{LWS_SUBGROUP_SIZE}]");
    let subgroup = number(shown, field, text, GANG_MEMBERS_MAX)?;
    if subgroup == 0 {
        return Err(invalid(LWS_SUBGROUP_SIZE, text, "a subgroup has at least one pod".into()));
    }
    if let Some(given) = roles {
        let scope = Scope::parse(key);
        let matching = |s: &Slicing| s.exclusive && s.scope == scope && s.members == subgroup;
        if given.roles.iter().any(|r| r.slices.as_ref().is_some_and(matching)) {
            return Ok(Some(given));
        }
        return Err(invalid(
            LWS_SUBGROUP_EXCLUSIVE,
            key,
            format!(
                "with {ROLES_ANNOTATION}, give the subgroups as a role's slices: \
                 {{members: {subgroup}, required: {key}, exclusive: true}}"
            ),
        ));
    }
    let Some(gang) = gang else { return Ok(None) };
    let leader_in_gang = !annotations.contains_key(LWS_LEADER_GPUS);
    let group = if leader_in_gang { gang.size } else { gang.size.saturating_add(1) };
    let leader_extra = (group - 1) % subgroup == 0;
    // One subgroup of the whole group: its GPU pods are one slice, whoever the leader is.
    let one_subgroup = subgroup == group;
    let slice = if one_subgroup { gang.size } else { subgroup };
    let equal = one_subgroup || if leader_in_gang { subgroup == 1 || !leader_extra } else { leader_extra };
    if !equal || gang.size % slice != 0 {
        let detail = if leader_in_gang && leader_extra {
            format!(
                "a group of {group} pods in subgroups of {subgroup} puts its leader as an extra pod in the first \
                 subgroup, so the subgroups are not equal and topoplace cannot place them as slices: give the leader \
                 no GPUs (topoplace.io/leader-gpus: \"0\"), or a size that divides by the subgroup size"
            )
        } else if leader_in_gang {
            format!("a group of {group} pods does not divide into subgroups of {subgroup}")
        } else {
            format!(
                "a group of {group} pods in subgroups of {subgroup} counts its leader (which takes no GPUs) in the \
                 first subgroup, so the GPU pods' subgroups are not equal: make the size less one divide by the \
                 subgroup size"
            )
        };
        return Err(invalid(LWS_SUBGROUP_SIZE, text, detail));
    }
    let (gpus, tensor_parallel, pipeline_parallel, memory) = shape;
    let role = RoleSpec {
        memory: memory.clone(),
        pipeline_parallel: pipeline_parallel.unwrap_or(1),
        slices: Some(Slicing { members: slice, scope: Scope::parse(key), exclusive: true }),
        ..RoleSpec::shape(LWS_SUBGROUP_ROLE, gang.size, gpus, tensor_parallel.unwrap_or(1))
    };
    GangSpec::with_roles(&gang.key, vec![role.clone()])
        .validate()
        .map_err(|e| invalid(LWS_SUBGROUP_SIZE, text, e.to_string()))?;
    Ok(Some(RoleDemand { role: LWS_SUBGROUP_ROLE.into(), roles: vec![role] }))
}

/// The one role of a replica made from a LeaderWorkerSet group's exclusive subgroups.
const LWS_SUBGROUP_ROLE: &str = "subgrouped";

/// The longest part of an annotation's value an error repeats.
const VALUE_SHOWN_MAX: usize = 120;

/// The pod's role in the replica its `topoplace.io/roles` annotation (`text`) describes; its
/// gang's rank becomes its rank within that role. Errors name the pod and the field: roles
/// that do not parse, no gang, pod-level parallelism or memory beside roles, an unknown or
/// missing own role, a gang size that is not the roles' members together, a GPU count that
/// is not its role's.
fn role_of(
    pod: &Pod,
    shown: &str,
    text: &str,
    gpus: u32,
    gang: Option<&mut GangMembership>,
) -> Result<RoleDemand, PodError> {
    let empty = BTreeMap::new();
    let labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
    let annotations = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    let mut value: String = text.chars().take(VALUE_SHOWN_MAX).collect();
    if value.len() < text.len() {
        value.push_str("...");
    }
    let invalid = |field: String, value: String, detail: String| PodError::Invalid {
        pod: shown.to_string(),
        field,
        value,
        detail,
    };
    let roles_field = format!("metadata.annotations[{ROLES_ANNOTATION}]");
    let roles = topoplace_formats::files::workload::roles_annotation(text)
        .map_err(|detail| invalid(roles_field.clone(), value.clone(), detail))?;
    let Some(gang) = gang else {
        return Err(invalid(
            roles_field.clone(),
            value.clone(),
            "a replica with roles is one gang: label its pods with topoplace.io/gang (and its size), a \
             coscheduling pod-group, or run them as a LeaderWorkerSet"
                .into(),
        ));
    };
    // The roles make a replica (names, counts, parallelism, slices), named here with the field.
    GangSpec::with_roles(&gang.key, roles.clone())
        .validate()
        .map_err(|e| invalid(roles_field.clone(), value.clone(), e.to_string()))?;
    for key in [TENSOR_PARALLEL, PIPELINE_PARALLEL, MIN_GPU_MEMORY, MODEL_PARAMS, MIG_PROFILE_ANNOTATION] {
        if let Some(found) = annotations.get(key) {
            return Err(invalid(
                format!("metadata.annotations[{key}]"),
                found.clone(),
                format!("with {ROLES_ANNOTATION}, parallelism and memory belong to each role there"),
            ));
        }
    }
    // Summed wide: a role's member count is the caller's (bounded when the roles are checked).
    let members: u64 = roles.iter().map(|r| u64::from(r.members)).sum();
    let (size_field, lws) = if labels.contains_key(GANG_LABEL) {
        (GANG_SIZE.to_string(), false)
    } else if labels.contains_key(POD_GROUP_LABEL) {
        (format!("{GANG_SIZE} (or the PodGroup's minMember)"), false)
    } else {
        (format!("metadata.annotations[{LWS_SIZE_ANNOTATION}]"), true)
    };
    if members != u64::from(gang.size) {
        return Err(invalid(
            size_field,
            gang.size.to_string(),
            format!("the gang's size must count the pods of every role: its roles have {members} members together"),
        ));
    }
    let (named, role_field) = match labels.get(ROLE_LABEL) {
        Some(name) => (Some(name), format!("metadata.labels[{ROLE_LABEL}]")),
        None => (annotations.get(ROLE_LABEL), format!("metadata.annotations[{ROLE_LABEL}]")),
    };
    let names = || roles.iter().map(|r| r.name.as_str()).collect::<Vec<_>>().join(", ");
    let (own, rank) = match (named, lws) {
        (Some(name), false) => {
            let Some(own) = roles.iter().position(|r| &r.name == name) else {
                return Err(invalid(role_field, name.clone(), format!("not one of the roles ({})", names())));
            };
            (own, gang.rank)
        }
        (named, true) => {
            // Roles in worker-index order: role k holds the indices after those before it.
            let Some(index) = gang.rank else {
                return Err(PodError::Missing {
                    pod: shown.to_string(),
                    field: "metadata.labels[leaderworkerset.sigs.k8s.io/worker-index]",
                });
            };
            let mut start = 0u64;
            let mut found = None;
            for (position, role) in roles.iter().enumerate() {
                if u64::from(index) < start + u64::from(role.members) {
                    // Below `index`, so it fits a u32.
                    found = Some((position, index - start as u32));
                    break;
                }
                start += u64::from(role.members);
            }
            let Some((own, rank)) = found else {
                return Err(invalid(
                    format!("metadata.labels[{LWS_INDEX_LABEL}]"),
                    index.to_string(),
                    format!("past the roles' {members} members"),
                ));
            };
            if let Some(name) = named.filter(|name| **name != roles[own].name) {
                return Err(invalid(
                    role_field,
                    name.clone(),
                    format!(
                        "worker-index {index} is role `{}` in {ROLES_ANNOTATION} (roles are read in worker-index order)",
                        roles[own].name
                    ),
                ));
            }
            (own, Some(rank))
        }
        (None, false) => {
            return Err(PodError::Missing { pod: shown.to_string(), field: "metadata.labels[topoplace.io/role]" })
        }
    };
    if roles[own].gpus_per_member != gpus {
        return Err(invalid(
            format!("spec.containers[*].resources.limits[{GPU_RESOURCE}]"),
            gpus.to_string(),
            format!("its role `{}` has {} GPUs per member", roles[own].name, roles[own].gpus_per_member),
        ));
    }
    if let Some(rank) = rank.filter(|&r| r >= roles[own].members) {
        return Err(invalid(
            format!("metadata.labels[{RANK}]"),
            rank.to_string(),
            format!("its role `{}` has {} members (ranks count within a role)", roles[own].name, roles[own].members),
        ));
    }
    gang.rank = rank;
    Ok(RoleDemand { role: roles[own].name.clone(), roles })
}

/// GPU indices from `topoplace.io/gpus` (`"0,1,2,3"`), if the pod has a valid one.
pub fn recorded_gpus(pod: &Pod) -> Option<Vec<u8>> {
    let text = pod.metadata.annotations.as_ref()?.get(GPUS_ANNOTATION)?;
    text.split(',').map(|part| part.trim().parse::<u8>().ok().filter(|&g| g < 64)).collect()
}

/// The `topoplace.io/gpus` value for a set of indices.
pub fn gpus_annotation(gpus: &[u8]) -> String {
    gpus.iter().map(u8::to_string).collect::<Vec<_>>().join(",")
}

/// What the pod asks of a node besides GPUs: selector, required node affinity, tolerations
/// and effective resource requests, as kube-scheduler computes them.
pub fn needs(pod: &Pod) -> Result<PodNeeds, PodError> {
    let shown = shown(pod);
    let Some(spec) = &pod.spec else { return Ok(PodNeeds::default()) };
    let invalid = |field: String, value: &str, detail: &str| PodError::Invalid {
        pod: shown.clone(),
        field,
        value: value.to_string(),
        detail: detail.to_string(),
    };
    let mut tolerations = Vec::new();
    for (index, toleration) in spec.tolerations.iter().flatten().enumerate() {
        let exists = match toleration.operator.as_deref() {
            None | Some("") | Some("Equal") => false,
            Some("Exists") => true,
            Some(other) => {
                return Err(invalid(format!("spec.tolerations[{index}].operator"), other, "expected Equal or Exists"))
            }
        };
        let effect = match toleration.effect.as_deref() {
            None | Some("") => None,
            Some(text) => Some(TaintEffect::parse(text).ok_or_else(|| {
                invalid(
                    format!("spec.tolerations[{index}].effect"),
                    text,
                    "expected NoSchedule, PreferNoSchedule or NoExecute",
                )
            })?),
        };
        tolerations.push(Toleration {
            key: toleration.key.clone().unwrap_or_default(),
            exists,
            value: toleration.value.clone().unwrap_or_default(),
            effect,
        });
    }
    let required = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| n.required_during_scheduling_ignored_during_execution.as_ref());
    let affinity_terms = match required {
        None => None,
        Some(selector) => {
            let mut terms = Vec::new();
            for (t, term) in selector.node_selector_terms.iter().enumerate() {
                let field = |kind: &str, r: usize| {
                    format!("spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[{t}].{kind}[{r}].operator")
                };
                let convert = |kind: &str,
                               requirements: &Option<Vec<k8s_openapi::api::core::v1::NodeSelectorRequirement>>|
                 -> Result<Vec<SelectorRequirement>, PodError> {
                    requirements
                        .iter()
                        .flatten()
                        .enumerate()
                        .map(|(r, req)| {
                            let operator = SelectorOperator::parse(&req.operator).ok_or_else(|| {
                                invalid(
                                    field(kind, r),
                                    &req.operator,
                                    "expected In, NotIn, Exists, DoesNotExist, Gt or Lt",
                                )
                            })?;
                            Ok(SelectorRequirement {
                                key: req.key.clone(),
                                operator,
                                values: req.values.clone().unwrap_or_default(),
                            })
                        })
                        .collect()
                };
                terms.push(SelectorTerm {
                    match_expressions: convert("matchExpressions", &term.match_expressions)?,
                    match_fields: convert("matchFields", &term.match_fields)?,
                });
            }
            Some(terms)
        }
    };
    Ok(PodNeeds {
        node_selector: spec.node_selector.clone().unwrap_or_default(),
        affinity_terms,
        tolerations,
        requests: requests(pod)?,
    })
}

/// Effective requests: containers (plus sidecar init containers) summed, against the peak
/// of each ordinary init container with the sidecars started before it, plus the pod's
/// overhead. A resource with a limit and no request is requested at its limit (the API
/// server's defaulting). GPUs and `pods` are left out.
pub fn requests(pod: &Pod) -> Result<Resources, PodError> {
    let shown = shown(pod);
    let Some(spec) = &pod.spec else { return Ok(Resources::new()) };
    let of = |container: &k8s_openapi::api::core::v1::Container, path: &str| -> Result<Resources, PodError> {
        let mut out = Resources::new();
        let Some(resources) = &container.resources else { return Ok(out) };
        let mut named: BTreeMap<&String, &k8s_openapi::apimachinery::pkg::api::resource::Quantity> = BTreeMap::new();
        named.extend(resources.limits.iter().flatten());
        named.extend(resources.requests.iter().flatten());
        for (name, quantity) in named {
            if is_placed_resource(name) || name == PODS_RESOURCE {
                continue;
            }
            let milli = quantity::parse_milli(&quantity.0).map_err(|e| PodError::Invalid {
                pod: shown.clone(),
                field: format!("{path}.resources.requests[{name}]"),
                value: quantity.0.clone(),
                detail: e.to_string(),
            })?;
            out.insert(name.clone(), milli);
        }
        Ok(out)
    };
    let add = |into: &mut Resources, more: &Resources| {
        for (name, amount) in more {
            *into.entry(name.clone()).or_insert(0) += amount;
        }
    };
    let mut total = Resources::new();
    for (index, container) in spec.containers.iter().enumerate() {
        add(&mut total, &of(container, &format!("spec.containers[{index}]"))?);
    }
    let mut sidecars = Resources::new();
    let mut init_peak = Resources::new();
    for (index, container) in spec.init_containers.iter().flatten().enumerate() {
        let own = of(container, &format!("spec.initContainers[{index}]"))?;
        if container.restart_policy.as_deref() == Some("Always") {
            add(&mut sidecars, &own);
            continue;
        }
        let mut peak = sidecars.clone();
        add(&mut peak, &own);
        for (name, amount) in peak {
            let entry = init_peak.entry(name).or_insert(0);
            *entry = (*entry).max(amount);
        }
    }
    add(&mut total, &sidecars);
    for (name, amount) in init_peak {
        let entry = total.entry(name).or_insert(0);
        *entry = (*entry).max(amount);
    }
    for (name, quantity) in spec.overhead.iter().flatten() {
        let milli = quantity::parse_milli(&quantity.0).map_err(|e| PodError::Invalid {
            pod: shown.clone(),
            field: format!("spec.overhead[{name}]"),
            value: quantity.0.clone(),
            detail: e.to_string(),
        })?;
        *total.entry(name.clone()).or_insert(0) += milli;
    }
    total.retain(|_, amount| *amount > 0);
    Ok(total)
}

/// `spec.priority` (admission resolves it from the PriorityClass), 0 when unset.
pub fn priority(pod: &Pod) -> i32 {
    pod.spec.as_ref().and_then(|s| s.priority).unwrap_or(0)
}

/// Whether the pod's `spec.preemptionPolicy` is `Never` (it waits rather than evicts; the
/// default, `PreemptLowerPriority`, preempts).
pub fn never_preempts(pod: &Pod) -> bool {
    pod.spec.as_ref().and_then(|s| s.preemption_policy.as_deref()) == Some("Never")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pod's demand without a PodGroup object.
    fn demand(pod: &Pod) -> Result<PodDemand, PodError> {
        demand_sized(pod, None)
    }

    /// The labels LWS gives a pod of group `k` with this worker index.
    fn lws_labels(index: &str) -> serde_json::Value {
        serde_json::json!({"leaderworkerset.sigs.k8s.io/group-key": "k", "leaderworkerset.sigs.k8s.io/worker-index": index})
    }

    fn pod_with(labels: serde_json::Value, annotations: serde_json::Value, gpus: u32) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u", "labels": labels, "annotations": annotations},
            "spec": {"containers": [{"name": "main", "resources": {"limits": {"nvidia.com/gpu": gpus.to_string()}}}]}
        }))
        .expect("pod")
    }

    /// A pod naming the upstream PodGroup `group` in `spec.schedulingGroup.podGroupName`.
    fn upstream_pod(group: &str, labels: serde_json::Value, annotations: serde_json::Value) -> Pod {
        let mut pod = pod_with(labels, annotations, 8);
        pod.spec.as_mut().expect("spec").scheduling_group =
            Some(k8s_openapi::api::core::v1::PodSchedulingGroup { pod_group_name: Some(group.into()) });
        pod
    }

    #[test]
    fn a_mig_profile_annotation_is_the_pods_memory_need() {
        let none = serde_json::json!({});
        let pod = pod_with(none.clone(), serde_json::json!({MIG_PROFILE_ANNOTATION: " 2g.20gb "}), 1);
        let read = demand(&pod).expect("demand");
        assert_eq!(read.memory, MemoryNeed::MigProfile("2g.20gb".into()));
        let both = serde_json::json!({MIG_PROFILE_ANNOTATION: "2g.20gb", MIN_GPU_MEMORY: "16Gi"});
        let error = demand(&pod_with(none.clone(), both, 1)).unwrap_err().to_string();
        assert!(error.contains("topoplace.io/mig-profile") && error.contains("give one of"), "{error}");
        // The shape is checked with the gang: a pod of two GPUs on one MIG device is refused.
        let wide = demand(&pod_with(none, serde_json::json!({MIG_PROFILE_ANNOTATION: "2g.20gb"}), 2)).expect("read");
        let error = wide.gang().unwrap_err().to_string();
        assert!(error.contains("a member on a MIG device has one GPU"), "{error}");
    }

    /// Under the mixed MIG strategy a pod asks for `nvidia.com/mig-<profile>`: that is its
    /// pool and its memory need; two resources, a name that is no profile, or another memory
    /// need beside it are refused, naming the field.
    #[test]
    fn a_mig_resource_is_the_pods_pool_and_profile() {
        let with_limits = |limits: serde_json::Value, annotations: serde_json::Value| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "p", "namespace": "ns", "uid": "u", "annotations": annotations},
                "spec": {"containers": [{"name": "main", "resources": {"limits": limits}}],
                         "initContainers": [{"name": "init", "resources": {"requests": {"nvidia.com/mig-2g.20gb": "1"}}}]}
            }))
            .expect("pod")
        };
        let none = serde_json::json!({});
        let pod = with_limits(serde_json::json!({"nvidia.com/mig-2g.20gb": "1", "cpu": "2"}), none.clone());
        let read = demand(&pod).expect("demand");
        assert_eq!((read.gpus, &read.pool), (1, &DevicePool::Mig("2g.20gb".into())));
        assert_eq!(read.memory, MemoryNeed::MigProfile("2g.20gb".into()));
        assert_eq!(read.gang().expect("gang").pool, Some(DevicePool::Mig("2g.20gb".into())));
        assert!(!requests(&pod).expect("requests").contains_key("nvidia.com/mig-2g.20gb"), "placed by the engine");
        let same = serde_json::json!({MIG_PROFILE_ANNOTATION: "2g.20gb"});
        assert!(demand(&with_limits(serde_json::json!({"nvidia.com/mig-2g.20gb": "1"}), same)).is_ok());
        for (limits, annotations, expected) in [
            (
                serde_json::json!({"nvidia.com/mig-2g.20gb": "1", "nvidia.com/gpu": "1"}),
                none.clone(),
                "nvidia.com/gpu and nvidia.com/mig-2g.20gb",
            ),
            (serde_json::json!({"nvidia.com/mig-": "1"}), none.clone(), "names no MIG profile"),
            (
                serde_json::json!({"nvidia.com/mig-2g.20gb": "1"}),
                serde_json::json!({MIN_GPU_MEMORY: "16Gi"}),
                "MIG devices of 2g.20gb: leave it out",
            ),
            (
                serde_json::json!({"nvidia.com/mig-2g.20gb": "1"}),
                serde_json::json!({MIG_PROFILE_ANNOTATION: "1g.10gb"}),
                "topoplace.io/mig-profile",
            ),
        ] {
            let error = demand(&with_limits(limits.clone(), annotations)).unwrap_err().to_string();
            assert!(error.contains(expected), "{limits}: {error}");
        }
        // A renamed shared resource (`renameByDefault`) is not placed here.
        let renamed = with_limits(serde_json::json!({"nvidia.com/mig-1g.10gb.shared": "1"}), none.clone());
        assert_eq!(gpu_request(&renamed).expect("read"), (1, DevicePool::Mig("2g.20gb".into())), "only the init's");
        assert!(requests(&renamed).expect("requests").contains_key("nvidia.com/mig-1g.10gb.shared"));
        // The init container's request counts as kube-scheduler counts it: the larger.
        let pod = with_limits(serde_json::json!({"cpu": "1"}), none);
        assert_eq!(gpu_request(&pod).expect("read"), (1, DevicePool::Mig("2g.20gb".into())));
    }

    #[test]
    fn the_gang_key_alone_agrees_with_the_gang_read_whole() {
        let size = serde_json::json!({"topoplace.io/gang-size": "2"});
        let pods = [
            pod_with(serde_json::json!({"topoplace.io/gang": "g"}), size.clone(), 8),
            pod_with(serde_json::json!({"scheduling.x-k8s.io/pod-group": "pg"}), size.clone(), 8),
            pod_with(lws_labels("1"), serde_json::json!({"leaderworkerset.sigs.k8s.io/size": "3"}), 8),
            upstream_pod("up", serde_json::json!({}), size),
            pod_with(serde_json::json!({}), serde_json::json!({}), 8),
        ];
        for pod in &pods {
            let whole = gang_of(pod, "ns").expect("readable").map(|g| g.key);
            assert_eq!(gang_key_of(pod, "ns"), whole, "{:?}", pod.metadata.labels);
        }
        // Without the size (a PodGroup object holds it), the key is still known.
        let bare = upstream_pod("up", serde_json::json!({}), serde_json::json!({}));
        assert!(gang_of(&bare, "ns").is_err());
        assert_eq!(gang_key_of(&bare, "ns").as_deref(), Some("ns/up"));
    }

    #[test]
    fn an_upstream_pod_group_gives_the_gang_its_size_and_scope() {
        let none = serde_json::json!({});
        let pod = upstream_pod("train", none.clone(), none.clone());
        assert_eq!(pod_group_to_look_up(&pod), Some(PodGroupRef::Upstream("train".into())));
        let leaf = "network.topology.nvidia.com/leaf";
        let gang = PodGroupFacts { min_count: Some(4), topology_key: Some(leaf.into()) };
        let read = demand_sized(&pod, Some(&gang)).expect("demand");
        assert_eq!(read.gang.as_ref().map(|g| (g.key.as_str(), g.size, g.rank)), Some(("ns/train", 4, None)));
        assert_eq!(read.required, Some(Scope::Level(leaf.into())));
        // The basic policy is no gang: the pod is placed alone.
        let basic = PodGroupFacts { min_count: None, topology_key: None };
        assert_eq!(demand_sized(&pod, Some(&basic)).expect("demand").gang, None);
        // Without the lookup (the extender), the size must be on the pod, and the error says so.
        assert_eq!(
            demand(&pod).unwrap_err(),
            PodError::Missing { pod: "ns/p".into(), field: "topoplace.io/gang-size" }
        );
        let sized = upstream_pod("train", serde_json::json!({"topoplace.io/gang-size": "2"}), none.clone());
        assert_eq!(demand(&sized).expect("demand").gang.map(|g| g.size), Some(2));
        // A scope of the pod's own that is not the PodGroup's is refused, naming both.
        let own = upstream_pod("train", none.clone(), serde_json::json!({"topoplace.io/topology-required": "spine"}));
        let error = demand_sized(&own, Some(&gang)).unwrap_err().to_string();
        assert!(error.contains("topology-required") && error.contains(leaf), "{error}");
        // The labels of topoplace, coscheduling and LeaderWorkerSet come first.
        let labelled = upstream_pod(
            "train",
            serde_json::json!({"topoplace.io/gang": "g", "topoplace.io/gang-size": "2"}),
            none.clone(),
        );
        assert_eq!(pod_group_to_look_up(&labelled), None);
        assert_eq!(demand(&labelled).expect("demand").gang.map(|g| g.key), Some("ns/g".into()));
        let cosched = upstream_pod("train", serde_json::json!({"scheduling.x-k8s.io/pod-group": "pg"}), none);
        assert_eq!(pod_group_to_look_up(&cosched), Some(PodGroupRef::Coscheduling("pg".into())));
    }

    #[test]
    fn an_elastic_gang_reads_its_maximum_and_refuses_one_that_cannot_be() {
        let labels = |max: &str| serde_json::json!({"topoplace.io/gang": "g", "topoplace.io/gang-size": "2", GANG_MAX_SIZE: max});
        let read = demand(&pod_with(labels("6"), serde_json::json!({}), 8)).expect("demand");
        assert_eq!(read.gang.as_ref().map(|g| (g.size, g.max)), Some((2, Some(6))));
        // On a coscheduling PodGroup's pods too, as an annotation.
        let cosched = pod_with(
            serde_json::json!({"scheduling.x-k8s.io/pod-group": "pg"}),
            serde_json::json!({GANG_MAX_SIZE: "3"}),
            8,
        );
        let facts = PodGroupFacts { min_count: Some(2), topology_key: None };
        assert_eq!(
            demand_sized(&cosched, Some(&facts)).expect("demand").gang.map(|g| (g.size, g.max)),
            Some((2, Some(3)))
        );
        // Without it, no maximum.
        let plain = serde_json::json!({"topoplace.io/gang": "g", "topoplace.io/gang-size": "2"});
        assert_eq!(demand(&pod_with(plain, serde_json::json!({}), 8)).expect("demand").gang.and_then(|g| g.max), None);
        for (max, expected) in [("1", "below the gang's size 2"), ("x", GANG_MAX_SIZE), ("5000", "above the limit")] {
            let error = demand(&pod_with(labels(max), serde_json::json!({}), 8)).unwrap_err().to_string();
            assert!(error.contains(expected) && error.contains(GANG_MAX_SIZE), "{max}: {error}");
        }
        let error =
            demand(&pod_with(labels("4"), serde_json::json!({ROLES_ANNOTATION: ROLES}), 8)).unwrap_err().to_string();
        assert!(error.contains("fixed number of members per role"), "{error}");
        // A LeaderWorkerSet group's size is fixed: its maximum is its size.
        let sized = serde_json::json!({"leaderworkerset.sigs.k8s.io/size": "3"});
        let read = demand(&pod_with(lws_labels("1"), sized, 8)).expect("demand");
        assert_eq!(read.gang.map(|g| (g.size, g.max)), Some((3, Some(3))));
        let lws = serde_json::json!({"leaderworkerset.sigs.k8s.io/size": "3", GANG_MAX_SIZE: "4"});
        let error = demand(&pod_with(lws_labels("1"), lws, 8)).unwrap_err().to_string();
        assert!(error.contains("fixed size") && error.contains(GANG_MAX_SIZE), "{error}");
    }

    const ROLES: &str = r#"[{"name": "leader", "gpusPerMember": 4}, {"name": "worker", "members": 2, "gpusPerMember": 8, "tensorParallel": 8}]"#;

    #[test]
    fn a_role_label_names_the_role_and_the_rank_counts_within_it() {
        let labels = serde_json::json!({"topoplace.io/gang": "g", "topoplace.io/gang-size": "3",
            "topoplace.io/role": "worker", "topoplace.io/rank": "1"});
        let demand = demand(&pod_with(labels, serde_json::json!({ROLES_ANNOTATION: ROLES}), 8)).expect("demand");
        let roles = demand.roles.as_ref().expect("roles");
        assert_eq!((roles.role.as_str(), roles.roles.len()), ("worker", 2));
        assert_eq!(demand.gang.as_ref().map(|g| (g.key.as_str(), g.size, g.rank)), Some(("ns/g", 3, Some(1))));
        assert!(demand.replica().expect("replica").is_some_and(|(_, own)| own == 1));

        let missing = serde_json::json!({"topoplace.io/gang": "g", "topoplace.io/gang-size": "3"});
        let error =
            demand_sized(&pod_with(missing, serde_json::json!({ROLES_ANNOTATION: ROLES}), 8), None).unwrap_err();
        assert_eq!(error, PodError::Missing { pod: "ns/p".into(), field: "metadata.labels[topoplace.io/role]" });
    }

    #[test]
    fn member_counts_past_any_gang_are_refused_not_overflowed_and_a_role_needs_roles() {
        let huge = r#"[{"name": "a", "members": 4294967295, "gpusPerMember": 1}, {"name": "b", "gpusPerMember": 1}]"#;
        for labels in [
            serde_json::json!({"topoplace.io/gang": "g", "topoplace.io/gang-size": "1", "topoplace.io/role": "a"}),
            lws_labels("1"),
        ] {
            let annotations = serde_json::json!({"leaderworkerset.sigs.k8s.io/size": "1", ROLES_ANNOTATION: huge});
            let error = demand(&pod_with(labels, annotations, 1)).unwrap_err().to_string();
            assert!(error.contains("members is 4294967295, above the limit of 4096"), "{error}");
            assert!(error.contains("metadata.annotations[topoplace.io/roles]"), "{error}");
        }
        // A count too large or negative is named as such, not as "not a whole number".
        for (index, expected) in [("99999999999", "above the limit"), ("-1", "cannot be negative")] {
            let labels = lws_labels(index);
            let annotations = serde_json::json!({"leaderworkerset.sigs.k8s.io/size": "3"});
            let error = demand(&pod_with(labels, annotations, 8)).unwrap_err().to_string();
            assert!(error.contains(expected), "{error}");
        }
        // A role label without the replica's roles plans nothing as a gang of one shape.
        let labels = serde_json::json!({"topoplace.io/gang": "g", "topoplace.io/gang-size": "3",
            "topoplace.io/role": "worker"});
        let error = demand(&pod_with(labels, serde_json::json!({}), 8)).unwrap_err().to_string();
        assert!(error.contains("metadata.labels[topoplace.io/role]") && error.contains(ROLES_ANNOTATION), "{error}");
    }

    #[test]
    fn an_exclusive_leaderworkerset_keeps_its_group_in_one_domain_and_binds_a_gpu_leader_first() {
        let labels = lws_labels;
        let leaf = "network.topology.nvidia.com/leaf";
        let exclusive = serde_json::json!({"leaderworkerset.sigs.k8s.io/size": "3", LWS_EXCLUSIVE_TOPOLOGY: leaf});
        let order = |d: &PodDemand| d.gang.as_ref().map(|g| g.order);
        // A leader of the workers' shape binds ahead of them; all keep to one leaf.
        let leader = demand(&pod_with(labels("0"), exclusive.clone(), 8)).expect("leader");
        assert_eq!(order(&leader), Some(BindOrder::LeaderFirst { leader: true }));
        assert_eq!(leader.required, Some(Scope::parse(leaf)));
        let worker = demand(&pod_with(labels("2"), exclusive.clone(), 8)).expect("worker");
        assert_eq!(order(&worker), Some(BindOrder::LeaderFirst { leader: false }));
        assert_eq!(worker.gang.as_ref().map(|g| (g.size, g.rank)), Some((3, Some(2))));
        // A leader without GPUs is no member: its workers bind together.
        let mut gpu_less = exclusive.clone();
        gpu_less[LWS_LEADER_GPUS] = serde_json::json!("0");
        assert_eq!(demand(&pod_with(labels("0"), gpu_less.clone(), 0)).expect("leader").gang, None);
        let worker = demand(&pod_with(labels("1"), gpu_less, 8)).expect("worker");
        assert_eq!(order(&worker), Some(BindOrder::Together));
        assert_eq!(worker.required, None, "LWS's node selector keeps these workers in the leader's domain");
        // With roles, the first role's GPUs decide.
        for (leader_gpus, expected) in [(4, BindOrder::LeaderFirst { leader: false }), (0, BindOrder::Together)] {
            let mut with_roles = exclusive.clone();
            with_roles[ROLES_ANNOTATION] = serde_json::json!(format!(
                "[{{name: leader, members: 1, gpusPerMember: {leader_gpus}}}, {{name: worker, members: 2, gpusPerMember: 8}}]"
            ));
            let worker = demand(&pod_with(labels("1"), with_roles, 8)).expect("worker");
            assert_eq!(order(&worker), Some(expected), "leader of {leader_gpus} GPUs");
        }
        // Another scope beside the exclusive key is an error naming both.
        let mut both = exclusive;
        both[TOPOLOGY_REQUIRED] = serde_json::json!("network.topology.nvidia.com/spine");
        let error = demand(&pod_with(labels("1"), both, 8)).unwrap_err().to_string();
        assert!(
            error.contains(TOPOLOGY_REQUIRED) && error.contains(LWS_EXCLUSIVE_TOPOLOGY) && error.contains(leaf),
            "{error}"
        );
    }

    #[test]
    fn exclusive_leaderworkerset_subgroups_are_a_role_of_exclusive_slices() {
        let labels = lws_labels;
        let leaf = "network.topology.nvidia.com/leaf";
        let with = |size: &str, subgroup: &str| {
            serde_json::json!({"leaderworkerset.sigs.k8s.io/size": size, LWS_SUBGROUP_SIZE: subgroup,
                LWS_SUBGROUP_EXCLUSIVE: leaf, TENSOR_PARALLEL: "8"})
        };
        // A leader of the workers' shape, 4 pods in subgroups of 2: slices by worker index.
        let pod = demand(&pod_with(labels("3"), with("4", "2"), 8)).expect("subgrouped");
        let roles = pod.roles.expect("a replica of one role");
        assert_eq!(roles.roles.len(), 1);
        let slicing = roles.roles[0].slices.clone().expect("slices");
        assert_eq!(slicing, Slicing { members: 2, scope: Scope::parse(leaf), exclusive: true });
        assert_eq!((roles.roles[0].members, roles.roles[0].tensor_parallel), (4, 8));
        assert_eq!(pod.gang.as_ref().and_then(|g| g.rank), Some(3), "worker 3 is in slice 1");
        // A leader without GPUs, 5 pods in subgroups of 2: the 4 workers, ranked index - 1.
        let mut gpu_less = with("5", "2");
        gpu_less[LWS_LEADER_GPUS] = serde_json::json!("0");
        let pod = demand(&pod_with(labels("1"), gpu_less, 8)).expect("subgrouped");
        assert_eq!(pod.roles.map(|r| r.roles[0].members), Some(4));
        assert_eq!(pod.gang.as_ref().and_then(|g| g.rank), Some(0));
        // One subgroup of the whole group, GPU-less leader: the 3 workers are one slice.
        let mut one = with("4", "4");
        one[LWS_LEADER_GPUS] = serde_json::json!("0");
        let pod = demand(&pod_with(labels("2"), one, 8)).expect("one subgroup");
        assert_eq!(pod.roles.and_then(|r| r.roles[0].slices.clone()).map(|s| s.members), Some(3));
        // A GPU leader as the extra pod of subgroup 0: unequal subgroups, an error naming the field.
        let error = demand(&pod_with(labels("1"), with("5", "2"), 8)).unwrap_err().to_string();
        assert!(error.contains(LWS_SUBGROUP_SIZE) && error.contains("extra pod"), "{error}");
        // The key without a subgroup size; a subgroup of 0.
        let mut no_size = with("4", "2");
        no_size.as_object_mut().expect("map").remove(LWS_SUBGROUP_SIZE);
        let error = demand(&pod_with(labels("1"), no_size, 8)).unwrap_err().to_string();
        assert!(error.contains(LWS_SUBGROUP_SIZE), "{error}");
        let error = demand(&pod_with(labels("1"), with("4", "0"), 8)).unwrap_err().to_string();
        assert!(error.contains("at least one pod"), "{error}");
        // Roles without slices beside the key; roles with exclusive slices stand as given.
        let mut roles_without = with("4", "2");
        roles_without.as_object_mut().expect("map").remove(TENSOR_PARALLEL);
        roles_without[ROLES_ANNOTATION] = serde_json::json!("[{name: w, members: 4, gpusPerMember: 8}]");
        let error = demand(&pod_with(labels("1"), roles_without.clone(), 8)).unwrap_err().to_string();
        assert!(error.contains(LWS_SUBGROUP_EXCLUSIVE) && error.contains("exclusive: true"), "{error}");
        roles_without[ROLES_ANNOTATION] = serde_json::json!(format!(
            "[{{name: w, members: 4, gpusPerMember: 8, slices: {{members: 2, required: {leaf}}}}}]"
        ));
        let error = demand(&pod_with(labels("1"), roles_without.clone(), 8)).unwrap_err().to_string();
        assert!(error.contains("exclusive: true"), "slices that are not exclusive do not say the subgroups: {error}");
        roles_without[ROLES_ANNOTATION] = serde_json::json!(format!(
            "[{{name: w, members: 4, gpusPerMember: 8, slices: {{members: 2, required: {leaf}, exclusive: true}}}}]"
        ));
        let pod = demand(&pod_with(labels("1"), roles_without, 8)).expect("roles with slices");
        assert_eq!(pod.roles.and_then(|r| r.roles[0].slices.clone()).map(|s| s.exclusive), Some(true));
    }

    #[test]
    fn leaderworkerset_pods_take_their_roles_in_worker_index_order() {
        for (index, gpus, role, rank) in [("0", 4, "leader", 0), ("1", 8, "worker", 0), ("2", 8, "worker", 1)] {
            let labels = lws_labels(index);
            let annotations = serde_json::json!({"leaderworkerset.sigs.k8s.io/size": "3", ROLES_ANNOTATION: ROLES});
            let demand = demand(&pod_with(labels, annotations, gpus)).expect("demand");
            assert_eq!(demand.roles.as_ref().map(|r| r.role.as_str()), Some(role), "index {index}");
            assert_eq!(demand.gang.as_ref().and_then(|g| g.rank), Some(rank), "index {index}");
            assert_eq!(demand.gang.as_ref().map(|g| g.size), Some(3), "the size counts the leader");
        }
    }
}
