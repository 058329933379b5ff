//! Placement latency of one gang: a 2x8-GPU gang (TP 8, two hosts) on clusters of 100,
//! 1,000 and 5,000 8-GPU hosts with half of the GPUs in use, and on the 847-host Lingjun
//! Clos cluster (real topology) with half in use. Also a 1-GPU pod and a TP-4 pod at
//! 5,000 hosts, where every host is a candidate.
//!
//! Run: `cargo bench --bench plan`.

#[path = "support/allocator.rs"]
mod allocator;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use topoplace_engine::ledger::Ledger;
use topoplace_engine::placement::{Planner, PlannerConfig};
use topoplace_engine::topology::{product, Cluster, ClusterSpec, NodeSpec};
use topoplace_engine::workload::{Gang, GangSpec, MemoryNeed};

/// Deterministic pseudo-random numbers so every run benchmarks the same state.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `hosts` H100 hosts, 16 per rack, 16 racks per spine.
fn synthetic(hosts: usize) -> Cluster {
    let h100 = product::lookup("H100").expect("H100");
    let nodes = (0..hosts)
        .map(|index| NodeSpec {
            name: format!("h{index:05}"),
            labels: [("spine", format!("s{}", index / 256)), ("rack", format!("r{}", index / 16))]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            product: h100,
            gpu_count: 8,
            memory_mib: None,
            nvlink: None,
            clique: None,
            allocated: Vec::new(),
            mig_profile: None,
            sharing: None,
            pool: Default::default(),
        })
        .collect();
    Cluster::build(ClusterSpec {
        name: format!("synthetic-{hosts}"),
        levels: vec!["spine".into(), "rack".into()],
        nodes,
    })
    .expect("valid")
}

/// Half of all GPUs in use: per host 0, 2, 4, 6 or 8 random GPUs (mean 4).
fn half_used(cluster: &Cluster, seed: u64) -> Ledger {
    let mut ledger = Ledger::new(cluster);
    let mut state = seed;
    for host in 0..cluster.hosts.len() as u32 {
        let used = 2 * (splitmix(&mut state) % 5) as u32;
        let mut mask = 0u64;
        while mask.count_ones() < used {
            mask |= 1 << (splitmix(&mut state) % 8);
        }
        if mask != 0 {
            ledger.reserve(&format!("background-{host}"), &[(host, mask)]).expect("free");
        }
    }
    ledger
}

fn gang(members: u32, gpus: u32, tp: u32) -> Gang {
    GangSpec { memory: MemoryNeed::FloorMib(60 * 1024), ..GangSpec::shape("bench", members, gpus, tp) }
        .expand()
        .remove(0)
}

fn bench_plan(c: &mut Criterion) {
    let mut group = c.benchmark_group("place_2x8_gang_half_used");
    let two_by_eight = gang(2, 8, 8);
    for hosts in [100usize, 1_000, 5_000] {
        let cluster = synthetic(hosts);
        let ledger = half_used(&cluster, 7);
        let mut planner = Planner::new(&cluster, PlannerConfig::default());
        assert!(planner.place(&ledger, &two_by_eight).is_ok(), "the benchmark places a gang");
        group.bench_with_input(BenchmarkId::from_parameter(hosts), &hosts, |b, _| {
            b.iter(|| planner.place(&ledger, &two_by_eight))
        });
    }
    let lingjun_text = include_str!("../testdata/clusters/lingjun.yaml");
    let lingjun = topoplace_formats::files::cluster::load("lingjun.yaml", lingjun_text).expect("lingjun cluster");
    let ledger = half_used(&lingjun, 7);
    let mut planner = Planner::new(&lingjun, PlannerConfig::default());
    assert!(planner.place(&ledger, &two_by_eight).is_ok());
    group.bench_function("lingjun-847", |b| b.iter(|| planner.place(&ledger, &two_by_eight)));
    group.finish();

    let mut group = c.benchmark_group("place_single_host_gang_5000_half_used");
    let cluster = synthetic(5_000);
    let ledger = half_used(&cluster, 7);
    let mut planner = Planner::new(&cluster, PlannerConfig::default());
    for (name, small) in [("1gpu", gang(1, 1, 1)), ("tp4", gang(1, 4, 4))] {
        assert!(planner.place(&ledger, &small).is_ok());
        group.bench_function(name, |b| b.iter(|| planner.place(&ledger, &small)));
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(50).measurement_time(std::time::Duration::from_secs(3));
    targets = bench_plan
}
criterion_main!(benches);
