//! Pod and Node translation: the same bytes as a Pod (GPUs, gang labels, annotations, roles,
//! quantities of CPU and memory, priority, recorded GPUs) and as a Node (GPU Feature Discovery
//! and Topograph labels, allocatable, NVLink groups), built into a cluster when it reads.
#![no_main]
use libfuzzer_sys::fuzz_target;
use topoplace_server::kube::node;
use topoplace_server::pod;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = serde_json::from_slice::<k8s_openapi::api::core::v1::Pod>(data) {
        let _ = pod::identity(&p);
        let _ = pod::gpu_count(&p);
        let _ = pod::demand_sized(&p, None);
        let _ = pod::needs(&p);
        let _ = pod::requests(&p);
        let _ = pod::priority(&p);
        let _ = pod::recorded_gpus(&p);
        let _ = pod::gang_key_of(&p, "default");
        let _ = pod::pod_group_to_look_up(&p);
        let _ = pod::shown(&p);
    }
    if let Ok(n) = serde_json::from_slice::<k8s_openapi::api::core::v1::Node>(data) {
        let _ = node::facts(&n);
        if let Ok(Some(_)) = node::node_spec(&n) {
            let keys: Vec<String> = node::DEFAULT_LEVEL_KEYS.map(String::from).to_vec();
            let (spec, _skipped) = node::cluster_spec(std::slice::from_ref(&n), &keys);
            let _ = topoplace_engine::topology::Cluster::build(spec);
        }
    }
});
