//! The job replay on real data nobody here made: the ElasticFlow cluster02 job trace
//! (Microsoft) on the Lingjun Clos topology (Alibaba).

use topoplace::files::elasticflow;
use topoplace::jobreplay::{simulate, JobPolicy, QueueMode, SimConfig};
use topoplace::topology::Cluster;

fn inputs() -> Option<(Cluster, Vec<topoplace::jobreplay::TraceJob>)> {
    let dir = topoplace::convert::traces_dir();
    let (topology, jobs) = (dir.join("lingjun-2023/topo.csv"), dir.join("elasticflow/cluster02.csv"));
    if !topology.exists() || !jobs.exists() {
        assert!(std::env::var_os("CI").is_none(), "CI must have the shared traces at {}", dir.display());
        eprintln!("skipped: traces not found at {} (set TOPOPLACE_TRACES)", dir.display());
        return None;
    }
    let read = |path: &std::path::Path| std::fs::read_to_string(path).expect("readable trace");
    let spec = topoplace::convert::lingjun("topo.csv", &read(&topology), "H800", 8).expect("topology converts");
    let jobs = elasticflow::parse_jobs("cluster02.csv", &read(&jobs)).expect("jobs parse");
    Some((Cluster::build(spec).expect("builds"), jobs))
}

#[test]
fn cluster02_on_lingjun_keeps_gangs_in_racks_only_with_topology_aware_policies() {
    let Some((cluster, jobs)) = inputs() else { return };
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
    // Compressed 800x the cluster saturates: queues form and gangs start to spread.
    let busy = SimConfig { load_factor: 800.0, queue: QueueMode::StrictFifo, ..SimConfig::default() };
    let outcome = simulate(&cluster, &jobs, JobPolicy::Topoplace, &busy).expect("replays");
    assert!(outcome.mean_queue_delay_s > 60.0, "{}", outcome.mean_queue_delay_s);
    assert!(outcome.rack_share() > 0.5 && outcome.rack_share() < 1.0, "{}", outcome.rack_share());
}
