//! Kubernetes Pods into the core's [`PodDemand`]: GPUs from the `nvidia.com/gpu` limits, the
//! gang from the labels of DESIGN.md (topoplace, coscheduling, LeaderWorkerSet, in that
//! order), memory and parallelism from `topoplace.io/*` annotations. Every error names the
//! pod and the field.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use thiserror::Error;

use crate::quantity;
use crate::reservation::{GangMembership, PodDemand, PodIdentity};
use crate::workload::{MemoryNeed, ModelSpec, Scope, GANG_MEMBERS_MAX, RUNTIME_OVERHEAD_DEFAULT};

pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// Where topoplace records the GPU indices it gave a pod (merged in by the Binding).
pub const GPUS_ANNOTATION: &str = "topoplace.io/gpus";

const GANG_LABEL: &str = "topoplace.io/gang";
const GANG_SIZE: &str = "topoplace.io/gang-size";
const RANK: &str = "topoplace.io/rank";
const POD_GROUP_LABEL: &str = "scheduling.x-k8s.io/pod-group";
const LWS_GROUP_LABEL: &str = "leaderworkerset.sigs.k8s.io/group-key";
const LWS_SIZE_ANNOTATION: &str = "leaderworkerset.sigs.k8s.io/size";
const LWS_INDEX_LABEL: &str = "leaderworkerset.sigs.k8s.io/worker-index";
const MIN_GPU_MEMORY: &str = "topoplace.io/min-gpu-memory";
const MODEL_PARAMS: &str = "topoplace.io/model-params";
const MODEL_DTYPE: &str = "topoplace.io/model-dtype";
const KV_CACHE: &str = "topoplace.io/kv-cache";
const TENSOR_PARALLEL: &str = "topoplace.io/tensor-parallel";
const PIPELINE_PARALLEL: &str = "topoplace.io/pipeline-parallel";
const TOPOLOGY_REQUIRED: &str = "topoplace.io/topology-required";
const TOPOLOGY_PREFERRED: &str = "topoplace.io/topology-preferred";

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

/// GPUs the pod asks for: the sum over its containers of `nvidia.com/gpu` (limits, else
/// requests), or the largest init container's if that is more, as kube-scheduler counts.
pub fn gpu_count(pod: &Pod) -> Result<u32, PodError> {
    let shown = shown(pod);
    let Some(spec) = &pod.spec else { return Ok(0) };
    let of = |container: &k8s_openapi::api::core::v1::Container, path: String| -> Result<u32, PodError> {
        let Some(resources) = &container.resources else { return Ok(0) };
        let quantity = resources
            .limits
            .as_ref()
            .and_then(|l| l.get(GPU_RESOURCE))
            .or_else(|| resources.requests.as_ref().and_then(|r| r.get(GPU_RESOURCE)));
        let Some(quantity) = quantity else { return Ok(0) };
        quantity.0.trim().parse::<u32>().map_err(|_| PodError::Invalid {
            pod: shown.clone(),
            field: path,
            value: quantity.0.clone(),
            detail: "GPUs are counted in whole devices".into(),
        })
    };
    let mut sum = 0u32;
    for (index, container) in spec.containers.iter().enumerate() {
        sum = sum.saturating_add(of(container, format!("spec.containers[{index}].resources.limits[{GPU_RESOURCE}]"))?);
    }
    let mut init_max = 0u32;
    for (index, container) in spec.init_containers.iter().flatten().enumerate() {
        init_max =
            init_max.max(of(container, format!("spec.initContainers[{index}].resources.limits[{GPU_RESOURCE}]"))?);
    }
    Ok(sum.max(init_max))
}

fn shown(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or("<no name>")
    )
}

fn number(pod: &str, field: String, value: &str, max: u32) -> Result<u32, PodError> {
    let invalid =
        |detail: String| PodError::Invalid { pod: pod.into(), field: field.clone(), value: value.into(), detail };
    let parsed: u32 = value.trim().parse().map_err(|_| invalid("not a whole number".into()))?;
    if parsed > max {
        return Err(invalid(format!("above the limit of {max}")));
    }
    Ok(parsed)
}

/// The gang a pod belongs to, if any (DESIGN.md's order: topoplace, coscheduling, LWS).
pub fn gang_of(pod: &Pod, namespace: &str) -> Result<Option<GangMembership>, PodError> {
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
    if let Some(name) = labels.get(GANG_LABEL) {
        let size = size_from(GANG_SIZE, either(GANG_SIZE))?;
        return Ok(Some(GangMembership { key: format!("{namespace}/{name}"), size, rank: rank_from(RANK)? }));
    }
    if let Some(group) = labels.get(POD_GROUP_LABEL) {
        // The PodGroup's minMember needs an API lookup the extender does not make; the size
        // must be on the pod.
        let size = size_from(GANG_SIZE, either(GANG_SIZE))?;
        return Ok(Some(GangMembership { key: format!("{namespace}/{group}"), size, rank: rank_from(RANK)? }));
    }
    if let Some(group) = labels.get(LWS_GROUP_LABEL) {
        let size = size_from(LWS_SIZE_ANNOTATION, annotations.get(LWS_SIZE_ANNOTATION))?;
        return Ok(Some(GangMembership {
            key: format!("{namespace}/lws-{group}"),
            size,
            rank: rank_from(LWS_INDEX_LABEL)?,
        }));
    }
    Ok(None)
}

/// Everything the core needs to place the pod.
pub fn demand(pod: &Pod) -> Result<PodDemand, PodError> {
    let identity = identity(pod)?;
    let shown = identity.to_string();
    let gpus = gpu_count(pod)?;
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
    Ok(PodDemand {
        gang: gang_of(pod, &identity.namespace)?,
        pod: identity,
        gpus,
        memory,
        tensor_parallel: parallel(TENSOR_PARALLEL)?,
        pipeline_parallel: parallel(PIPELINE_PARALLEL)?,
        required: annotation(TOPOLOGY_REQUIRED).map(Scope::parse),
        preferred: annotation(TOPOLOGY_PREFERRED).map(Scope::parse),
    })
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
