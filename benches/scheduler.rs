//! The secondary scheduler end to end against the in-process fake API server (the same one
//! the tests use): 1,000 8-GPU nodes, then a burst of pending pods; the clock runs from
//! creating the first pod until the API shows the last one bound. Every pod goes through the
//! pending-pod watch, the cycle, a Binding POST, the bound-pod watch and a `Scheduled` Event.
//! Client, scheduler and API server share this machine. A bounded load command rather than
//! criterion: the figure is a rate over thousands of pods, not a per-call latency.
//!
//! `cargo bench --bench scheduler`

#[path = "support/allocator.rs"]
mod allocator;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use topoplace_online::scheduler::SchedulerConfig;

#[path = "../tests/support/mod.rs"]
mod fake_api;
use fake_api::{scheduler_pod, serve_router, FakeApi, Replica};

const NODES: usize = 1_000;
const SINGLE_PODS: usize = 4_000;
const GANGS: usize = 100;
const GANG_MEMBERS: u32 = 8;

fn node(index: usize) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": format!("node-{index:04}"), "labels": {
            "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
            "nvidia.com/gpu.count": "8",
            "network.topology.nvidia.com/spine": format!("s{}", index / 64),
            "network.topology.nvidia.com/leaf": format!("r{}", index / 8),
        }},
        "spec": {},
        "status": {"allocatable": {"nvidia.com/gpu": "8", "cpu": "192", "memory": "2Ti", "pods": "110"},
                   "conditions": [{"type": "Ready", "status": "True"}]}
    })
}

/// Creates `pods`, waits until all are bound; returns pods bound per second.
async fn burst(label: &str, pods: Vec<Value>) -> f64 {
    let api = FakeApi::new();
    for index in 0..NODES {
        api.put_node(node(index));
    }
    let server = serve_router(api.router()).await;
    let replica = Replica::start(&server.base, None, SchedulerConfig::default()).await;
    while !replica.ext.is_ready() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let count = pods.len();
    let started = Instant::now();
    for pod in pods {
        api.add_pod(pod, None, None);
    }
    let deadline = started + Duration::from_secs(300);
    while api.bound_pods().len() < count {
        if Instant::now() > deadline {
            eprintln!("{label}: only {} of {count} bound after 300 s", api.bound_pods().len());
            std::process::exit(1);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    if let Err(error) = replica.runtime.check() {
        eprintln!("{label}: scheduler invariants broken: {error}");
        std::process::exit(1);
    }
    let rate = count as f64 / elapsed;
    println!("{label:<44} {count:>6} pods {elapsed:>7.2} s {rate:>9.0} pods/s");
    replica.kill();
    drop(server);
    rate
}

fn main() {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("runtime: {error}");
            std::process::exit(1);
        }
    };
    runtime.block_on(async {
        println!("{NODES} nodes x 8 GPUs, fake API server in process");
        let singles =
            (0..SINGLE_PODS).map(|i| scheduler_pod("bench", &format!("single-{i:05}"), 1, None, "2")).collect();
        burst("single 1-GPU pods", singles).await;
        let gangs = (0..GANGS)
            .flat_map(|g| {
                (0..GANG_MEMBERS).map(move |r| {
                    scheduler_pod(
                        "bench",
                        &format!("gang-{g:03}-{r}"),
                        8,
                        Some((&format!("gang-{g:03}"), GANG_MEMBERS, r)),
                        "2",
                    )
                })
            })
            .collect();
        burst(&format!("{GANGS} gangs of {GANG_MEMBERS} x 8-GPU members"), gangs).await;
    });
}
