//! What the load benchmarks share: the benchmark cluster and percentiles.

use std::time::Duration;

use topoplace_engine::topology::{product, Cluster, ClusterSpec, NodeSpec};

/// `hosts` 8-GPU H100 hosts, 8 to a rack and 64 to a spine; every third host has a few GPUs
/// taken already, as in a cluster in use.
pub fn cluster(hosts: usize) -> Cluster {
    let h100 = product::lookup("H100").expect("product");
    let nodes = (0..hosts)
        .map(|i| NodeSpec {
            name: format!("node-{i:05}"),
            labels: [
                ("network.topology.nvidia.com/spine".to_string(), format!("s{}", i / 64)),
                ("network.topology.nvidia.com/leaf".to_string(), format!("r{}", i / 8)),
            ]
            .into_iter()
            .collect(),
            product: h100,
            gpu_count: 8,
            memory_mib: None,
            nvlink: None,
            clique: None,
            // A used cluster: every third host has some GPUs taken.
            allocated: if i % 3 == 0 { (0..(i % 7) as u8).collect() } else { Vec::new() },
            mig_profile: None,
            sharing: None,
            pool: Default::default(),
        })
        .collect();
    Cluster::build(ClusterSpec {
        name: "bench".into(),
        levels: vec!["network.topology.nvidia.com/spine".into(), "network.topology.nvidia.com/leaf".into()],
        nodes,
    })
    .expect("cluster")
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Calls per second that `clients` concurrent loops of `call(client index, call index)` reach
/// in `seconds`.
pub async fn rate<F, Fut>(clients: usize, seconds: u64, call: F) -> f64
where
    F: Fn(u64, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let call = std::sync::Arc::new(call);
    let deadline = std::time::Instant::now() + Duration::from_secs(seconds);
    let mut workers = Vec::new();
    for client in 0..clients as u64 {
        let call = call.clone();
        workers.push(tokio::spawn(async move {
            let mut done = 0u64;
            while std::time::Instant::now() < deadline {
                call(client, done).await;
                done += 1;
            }
            done
        }));
    }
    let mut total = 0;
    for worker in workers {
        total += worker.await.expect("load worker");
    }
    total as f64 / seconds as f64
}
