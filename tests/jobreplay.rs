//! The job replay on real data nobody here made: the ElasticFlow cluster02 job trace
//! (Microsoft) on the Lingjun Clos topology (Alibaba).

use topoplace_engine::topology::{Cluster, ClusterSpec};
use topoplace_replay::jobs::{simulate, JobPolicy, QueueMode, SimConfig};
use topoplace_replay::traces::elasticflow;

fn inputs() -> Option<(ClusterSpec, Vec<topoplace_replay::jobs::TraceJob>)> {
    let dir = topoplace_formats::convert::traces_dir();
    let (topology, jobs) = (dir.join("lingjun-2023/topo.csv"), dir.join("elasticflow/cluster02.csv"));
    if !topology.exists() || !jobs.exists() {
        assert!(std::env::var_os("CI").is_none(), "CI must have the shared traces at {}", dir.display());
        eprintln!("skipped: traces not found at {} (set TOPOPLACE_TRACES)", dir.display());
        return None;
    }
    let read = |path: &std::path::Path| std::fs::read_to_string(path).expect("readable trace");
    let spec = topoplace_formats::convert::lingjun("topo.csv", &read(&topology), "H800", 8).expect("topology converts");
    let jobs = elasticflow::parse_jobs("cluster02.csv", &read(&jobs)).expect("jobs parse");
    Some((spec, jobs))
}

#[test]
fn cluster02_on_lingjun_keeps_gangs_in_racks_only_with_topology_aware_policies() {
    let Some((spec, jobs)) = inputs() else { return };
    let cluster = Cluster::build(spec).expect("builds");
    assert_eq!((jobs.len(), cluster.hosts.len()), (5_778, 847));
    let as_recorded = SimConfig::default();
    for policy in JobPolicy::ALL {
        let outcome = simulate(&cluster, &jobs, policy, &as_recorded).expect("replays");
        assert_eq!((outcome.started, outcome.rejected, outcome.never_started), (5_778, 0, 0), "{policy}");
        assert_eq!(outcome.multi_host_jobs, 86, "{policy}: 16, 32 and 64-GPU jobs");
        let topology_aware = matches!(policy, JobPolicy::Topoplace | JobPolicy::KueueTas | JobPolicy::VolcanoHypernode);
        if topology_aware {
            // The trace as recorded uses about 1 % of this cluster: every gang finds a rack.
            assert_eq!(outcome.multi_host_in_one_rack, 86, "{policy}");
        } else {
            assert!(outcome.rack_share() < 0.1, "{policy}: {}", outcome.rack_share());
        }
    }
    // Compressed 800x the cluster saturates: queues form and gangs start to spread. Every
    // spread of a topology-aware policy is forced: the gang started the moment just enough
    // whole hosts were free, none of them in one rack. The blind policies spread by choice.
    for queue in [QueueMode::StrictFifo, QueueMode::BestEffortFifo] {
        let busy = SimConfig { load_factor: 800.0, queue, ..SimConfig::default() };
        for policy in JobPolicy::ALL {
            let outcome = simulate(&cluster, &jobs, policy, &busy).expect("replays");
            assert!(outcome.mean_queue_delay_s > 60.0, "{policy}: {}", outcome.mean_queue_delay_s);
            let spreads = outcome.multi_host_in_one_block + outcome.multi_host_across_blocks;
            if matches!(policy, JobPolicy::Topoplace | JobPolicy::KueueTas | JobPolicy::VolcanoHypernode) {
                assert!(outcome.rack_share() > 0.5 && spreads > 0, "{policy}: {}", outcome.rack_share());
                assert_eq!(outcome.multi_host_spans_avoidable, 0, "{policy} {queue:?}");
                assert_eq!(outcome.span_spare_hosts_mean, 0.0, "{policy} {queue:?}");
            } else {
                assert!(outcome.multi_host_spans_avoidable > 0, "{policy} {queue:?}");
                assert!(outcome.span_spare_hosts_mean > 0.0, "{policy} {queue:?}");
            }
        }
    }
}

#[test]
fn on_lingjun_with_two_products_the_engine_keeps_gangs_in_racks_that_flavor_order_misses() {
    let Some((mut spec, jobs)) = inputs() else { return };
    let products =
        ["H800", "H100"].map(|name| topoplace_engine::topology::product::lookup(name).expect("known product"));
    topoplace_replay::jobs::products_per_rack(&mut spec, &products).expect("products assigned");
    let mixed = Cluster::build(spec).expect("builds");
    let config = SimConfig { load_factor: 300.0, ..SimConfig::default() };
    let outcome = |policy| simulate(&mixed, &jobs, policy, &config).expect("replays");
    let engine = outcome(JobPolicy::Topoplace);
    assert_eq!((engine.multi_host_in_one_rack, engine.multi_host_spans_avoidable), (86, 0));
    for policy in [JobPolicy::KueueTas, JobPolicy::VolcanoHypernode] {
        let baseline = outcome(policy);
        // They take the first product that holds a gang anywhere, as a flavor list does.
        assert!(baseline.multi_host_in_one_rack < 86 && baseline.multi_host_spans_avoidable > 0, "{policy}");
        assert!(engine.mean_queue_delay_s <= baseline.mean_queue_delay_s, "{policy}");
    }
}
