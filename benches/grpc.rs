//! gRPC placement API latency and throughput over loopback on a 1,000-host (8,000-GPU)
//! cluster in use: Plan (dry runs of a TP-8 replica and of a 4-host rack-local gang, and a
//! reserve followed by its release), Capacity (TP-8 slots per rack, and rack-local 4-host
//! gangs), and a ClusterState summary. A bounded load command rather than criterion, because
//! the targets are a p99 and a rate: 2,000 sequential calls per case give the percentiles,
//! then 4 concurrent clients for 3 seconds give calls per second.
//!
//! `cargo bench --bench grpc`

mod support;

#[path = "support/allocator.rs"]
mod allocator;

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use support::{cluster, percentile, rate};
use tonic::transport::Channel;
use topoplace_server::assemble::{Listeners, Server, ServerSetup, Source};
use topoplace_server::grpc::pb::{self, placement_client::PlacementClient};

const HOSTS: usize = 1_000;
const SEQUENTIAL: usize = 2_000;
const CONCURRENT_CLIENTS: usize = 4;
const LOAD_SECONDS: u64 = 3;

fn gang(name: &str, members: u32, required: &str) -> pb::Gang {
    pb::Gang {
        namespace: "bench".into(),
        name: name.into(),
        members,
        gpus_per_member: 8,
        tensor_parallel: 8,
        required_topology: required.into(),
        ..Default::default()
    }
}

/// Times `call` sequentially, then under concurrent clients; one table row.
async fn measure<F, Fut>(label: &str, api: &PlacementClient<Channel>, call: F)
where
    F: Fn(PlacementClient<Channel>, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let call = Arc::new(call);
    for i in 0..50 {
        call(api.clone(), i).await;
    }
    let mut latencies = Vec::with_capacity(SEQUENTIAL);
    for i in 0..SEQUENTIAL as u64 {
        let start = Instant::now();
        call(api.clone(), i).await;
        latencies.push(start.elapsed());
    }
    latencies.sort();
    let shared = api.clone();
    let per_second = rate(CONCURRENT_CLIENTS, LOAD_SECONDS, move |client, index| {
        call(shared.clone(), (client + 1) * 1_000_000 + index)
    })
    .await;
    println!(
        "| {label} | {:.3} ms | {:.3} ms | {per_second:.0} |",
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // The server as `topoplace serve --cluster` assembles it.
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let listeners = Listeners { http, grpc: Some(listener) };
    let server = Server::start(Source::Static(cluster(HOSTS)), ServerSetup::default(), listeners);
    let api = PlacementClient::connect(base).await.expect("connect");

    println!("{HOSTS} hosts, {} GPUs; {CONCURRENT_CLIENTS} clients for the rate", HOSTS * 8);
    println!();
    println!("| call | p50 | p99 | calls/s |");
    println!("|---|---|---|---|");
    measure("Plan dry run, 1 x 8 GPUs (TP 8)", &api, |mut api, _| async move {
        let request = pb::PlanRequest { gangs: vec![gang("tp8", 1, "")], dry_run: true, ..Default::default() };
        assert!(api.plan(request).await.expect("plan").into_inner().placed);
    })
    .await;
    measure("Plan dry run, 4 x 8 GPUs in one rack", &api, |mut api, _| async move {
        let request = pb::PlanRequest { gangs: vec![gang("rack4", 4, "leaf")], dry_run: true, ..Default::default() };
        assert!(api.plan(request).await.expect("plan").into_inner().placed);
    })
    .await;
    measure("Plan reserve 2 x 8 GPUs + Release (a pair per call)", &api, |mut api, i| async move {
        let request = pb::PlanRequest { gangs: vec![gang(&format!("r{i}"), 2, "leaf")], ..Default::default() };
        let held = api.plan(request).await.expect("plan").into_inner();
        assert!(!held.reservation_id.is_empty());
        api.release(pb::ReleaseRequest { reservation_id: held.reservation_id }).await.expect("release");
    })
    .await;
    measure("Capacity, TP-8 slots per rack", &api, |mut api, _| async move {
        let request = pb::CapacityRequest { shape: Some(gang("", 1, "")), by_level: String::new() };
        assert!(api.capacity(request).await.expect("capacity").into_inner().replicas > 0);
    })
    .await;
    measure("Capacity, 4 x 8 GPUs in one rack", &api, |mut api, _| async move {
        let request = pb::CapacityRequest { shape: Some(gang("", 4, "leaf")), by_level: String::new() };
        assert!(api.capacity(request).await.expect("capacity").into_inner().replicas > 0);
    })
    .await;
    measure("ClusterState summary", &api, |mut api, _| async move {
        api.cluster_state(pb::ClusterStateRequest { summary_only: true }).await.expect("state");
    })
    .await;
    server.stop().await.expect("stopped");
}
