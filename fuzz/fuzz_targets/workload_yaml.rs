//! The workload file reader: YAML text to gangs, checked against a cluster and planned by the
//! greedy planner, whose ledger must stay consistent.
#![no_main]
use libfuzzer_sys::fuzz_target;
use topoplace_engine::ledger::Ledger;
use topoplace_engine::placement::{Planner, PlannerConfig, SolverChoice};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(workload) = topoplace_formats::files::workload::parse("fuzz.yaml", text) else { return };
    let cluster = topoplace_fuzz::cluster();
    let replicas = workload.replicas();
    let mut planner = Planner::new(cluster, PlannerConfig::default());
    if replicas.iter().any(|replica| planner.check_replica(replica).is_err()) {
        return;
    }
    let mut ledger = Ledger::new(cluster);
    for replica in &replicas {
        if let Ok(placement) = planner.place_replica(&ledger, replica, &SolverChoice::Greedy, None) {
            // The planner chose free GPUs of this very ledger: holding them cannot fail.
            if let Err(error) = ledger.reserve(&replica.name, &placement.holding()) {
                panic!("replica `{}`: the ledger refused the planner's placement: {error}", replica.name);
            }
        }
    }
    if let Err(error) = ledger.check() {
        panic!("ledger inconsistent after planning: {error}");
    }
});
