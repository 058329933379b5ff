//! Extender latency and throughput over loopback HTTP: filter and prioritize for a 1-GPU pod
//! on 1,000 and 5,000 8-GPU nodes, in both `nodeCacheCapable` modes (node names, or the full
//! NodeList kube-scheduler sends otherwise). A bounded load command rather than criterion,
//! because the targets are a p99 and a rate: 2,000 sequential requests per case give the
//! percentiles, then 4 concurrent clients for 3 seconds give requests per second.
//!
//! `cargo bench --bench extender`

#[path = "support/allocator.rs"]
mod allocator;

use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Value};
use topoplace_server::assemble::{Listeners, Server, ServerSetup, Source};

mod support;
use support::{cluster, percentile, rate};

const SEQUENTIAL: usize = 2_000;
const CONCURRENT_CLIENTS: usize = 4;
const LOAD_SECONDS: u64 = 3;

fn request(hosts: usize, node_objects: bool) -> Value {
    let pod = json!({
        "metadata": {"name": "bench", "namespace": "default", "uid": "bench-uid"},
        "spec": {"containers": [{"name": "c", "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}
    });
    let names: Vec<String> = (0..hosts).map(|i| format!("node-{i:05}")).collect();
    if node_objects {
        let items: Vec<Value> = names
            .iter()
            .map(|n| {
                json!({"metadata": {"name": n, "labels": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}},
                            "status": {"allocatable": {"nvidia.com/gpu": "8", "cpu": "96", "memory": "1Ti"}}})
            })
            .collect();
        json!({"Pod": pod, "Nodes": {"metadata": {}, "items": items}, "NodeNames": null})
    } else {
        json!({"Pod": pod, "Nodes": null, "NodeNames": names})
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    println!("| nodes | mode | verb | request bytes | p50 | p99 | requests/s ({CONCURRENT_CLIENTS} clients) |");
    println!("|---|---|---|---|---|---|---|");
    for hosts in [1_000, 5_000] {
        // The server as `topoplace serve --cluster` assembles it.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let listeners = Listeners { http: listener, grpc: None };
        let server = Server::start(Source::Static(cluster(hosts)), ServerSetup::default(), listeners);
        let client = reqwest::Client::new();
        for node_objects in [false, true] {
            let body = Arc::new(serde_json::to_vec(&request(hosts, node_objects)).expect("json"));
            for verb in ["filter", "prioritize"] {
                let url = format!("{base}/{verb}");
                let send = |client: reqwest::Client, url: String, body: Arc<Vec<u8>>| async move {
                    let reply = client
                        .post(url)
                        .header("content-type", "application/json")
                        .body(body.as_ref().clone())
                        .send()
                        .await
                        .expect("send");
                    assert!(reply.status().is_success());
                    reply.bytes().await.expect("body");
                };
                for _ in 0..50 {
                    send(client.clone(), url.clone(), body.clone()).await;
                }
                let mut latencies = Vec::with_capacity(SEQUENTIAL);
                for _ in 0..SEQUENTIAL {
                    let start = Instant::now();
                    send(client.clone(), url.clone(), body.clone()).await;
                    latencies.push(start.elapsed());
                }
                latencies.sort();
                let per_second = {
                    let (client, url, body) = (client.clone(), url.clone(), body.clone());
                    rate(CONCURRENT_CLIENTS, LOAD_SECONDS, move |_, _| send(client.clone(), url.clone(), body.clone()))
                        .await
                };
                println!(
                    "| {hosts} | {} | {verb} | {} | {:.3} ms | {:.3} ms | {:.0} |",
                    if node_objects { "Nodes (nodeCacheCapable: false)" } else { "NodeNames (nodeCacheCapable: true)" },
                    body.len(),
                    percentile(&latencies, 0.50).as_secs_f64() * 1e3,
                    percentile(&latencies, 0.99).as_secs_f64() * 1e3,
                    per_second
                );
            }
        }
        server.stop().await.expect("stopped");
    }
}
