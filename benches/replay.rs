//! One replay run (one seed, the whole default Alibaba trace tuned to 130 % of GPU
//! capacity, about 10,800 pod arrivals on 1,213 nodes) per policy. The whole paper
//! protocol (7 policies x 10 seeds) is timed end to end by `topoplace replay pods`; see docs/results/fgd-replay.md.
//!
//! Run: `cargo bench --bench replay` (needs the shared traces, or `TOPOPLACE_TRACES`).

#[path = "support/allocator.rs"]
mod allocator;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use topoplace_replay::pods::{self, Policy, Prepared, Trace, LOAD_RATIO_DEFAULT};
use topoplace_replay::traces::openb;

fn bench_replay(c: &mut Criterion) {
    let dir = topoplace_formats::convert::traces_dir().join("alibaba-gpu-v2023");
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e} (set TOPOPLACE_TRACES)", path.display()))
    };
    let trace = Trace {
        nodes: openb::parse_nodes("nodes", &read("openb_node_list_gpu_node.csv")).expect("node list"),
        pods: openb::parse_pods("pods", &read("openb_pod_list_default.csv")).expect("pod list"),
    };
    let prepared = Prepared::new(&trace).expect("trace");
    let arrivals = pods::arrivals(&prepared, 42, LOAD_RATIO_DEFAULT).expect("arrivals");
    let mut group = c.benchmark_group("replay_default_seed42");
    group.sample_size(10);
    for policy in Policy::ALL {
        group.bench_with_input(BenchmarkId::from_parameter(policy), &policy, |b, &policy| {
            b.iter(|| pods::run(&prepared, &arrivals, policy, &mut |_| {}).expect("run"))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_replay);
criterion_main!(benches);
