//! Each policy's choice on small clusters where the right answer is known by hand, the
//! protocol's arrival and binning rules, and determinism.

use super::*;

const CORES: u64 = 1000;

fn node(name: &str, cpu_cores: u64, gpus: u8, model: &str) -> TraceNode {
    TraceNode { name: name.into(), cpu_milli: cpu_cores * CORES, memory_mib: 1 << 20, gpus, model: model.into() }
}

fn pod(name: &str, cpu_cores: u64, num_gpu: u8, gpu_milli: u16) -> TracePod {
    TracePod {
        name: name.into(),
        cpu_milli: cpu_cores * CORES,
        memory_mib: 1024,
        num_gpu,
        gpu_milli,
        gpu_spec: Vec::new(),
    }
}

fn only_on(mut pod: TracePod, model: &str) -> TracePod {
    pod.gpu_spec = vec![model.into()];
    pod
}

/// Replays the pods in name order (p0, p1, ...) with the given node ranks.
fn replay(policy: Policy, nodes: Vec<TraceNode>, pods: Vec<TracePod>, node_rank: Vec<u32>) -> RunOutcome {
    let prepared = Prepared::new(&Trace { nodes, pods }).expect("valid trace");
    let arrivals = Arrivals { seed: 1, pods: (0..prepared.pod_count() as u32).collect(), node_rank };
    run(&prepared, &arrivals, policy, &mut |_| {}).expect("replay")
}

/// `count` pods of a class that arrive first (names h00, h01, ... sort before p0) and fit
/// nowhere (more memory than any node): they make the class popular in topoplace's demand,
/// which counts what was asked for, without taking capacity.
fn history(count: usize, cpu_cores: u64, gpu_milli: u16) -> Vec<TracePod> {
    (0..count)
        .map(|i| {
            let mut pod = pod(&format!("h{i:02}"), cpu_cores, 1, gpu_milli);
            pod.memory_mib = 4 << 20;
            pod
        })
        .collect()
}

fn nodes_of(outcome: &RunOutcome) -> Vec<Option<u32>> {
    outcome.placements.iter().map(|p| p.map(|p| p.node)).collect()
}

#[test]
fn bestfit_and_dotproduct_fill_the_fuller_node_against_the_rank() {
    // p0 needs 40 cores: only node b (index 1) has them. Rank favours a, yet the next
    // pod goes to the fuller b.
    let nodes = vec![node("a", 32, 8, "T4"), node("b", 64, 8, "T4")];
    let pods = vec![pod("p0", 40, 1, 1000), pod("p1", 4, 1, 1000)];
    for policy in [Policy::BestFit, Policy::DotProduct] {
        let outcome = replay(policy, nodes.clone(), pods.clone(), vec![0, 1]);
        assert_eq!(nodes_of(&outcome), vec![Some(1), Some(1)], "{policy}");
        // Whole GPUs are taken first-fit by index.
        assert_eq!(outcome.placements[1].map(|p| p.gpus), Some(0b10), "{policy}");
    }
    // With nothing to tell them apart, the rank decides.
    let twins = vec![node("a", 64, 8, "T4"), node("b", 64, 8, "T4")];
    for rank in [vec![1, 0], vec![0, 1]] {
        let winner = rank.iter().position(|&r| r == 0).map(|i| i as u32);
        let outcome = replay(Policy::BestFit, twins.clone(), vec![pod("p0", 4, 1, 1000)], rank);
        assert_eq!(nodes_of(&outcome), vec![winner]);
    }
}

#[test]
fn gpupacking_shares_a_used_gpu_before_opening_a_free_one() {
    // p0 (a 600 share, T4 only) lands on a; p1 (a 300 share) packs onto the same GPU of a
    // although the rank favours b, and takes the fullest GPU that fits.
    let nodes = vec![node("a", 64, 2, "T4"), node("b", 64, 2, "P100")];
    let pods = vec![only_on(pod("p0", 1, 1, 600), "T4"), pod("p1", 1, 1, 300)];
    let outcome = replay(Policy::GpuPacking, nodes, pods, vec![1, 0]);
    assert_eq!(
        outcome.placements,
        vec![Some(Placement { node: 0, gpus: 0b1 }), Some(Placement { node: 0, gpus: 0b1 })]
    );
}

#[test]
fn gpuclustering_puts_pods_beside_their_own_kind() {
    // a runs a share pod, b a whole-GPU pod. Another whole-GPU pod joins b, another share
    // pod joins a, whatever the rank says.
    let nodes = vec![node("a", 64, 8, "T4"), node("b", 64, 8, "P100")];
    let pods = vec![
        only_on(pod("p0", 1, 1, 500), "T4"),
        only_on(pod("p1", 1, 1, 1000), "P100"),
        pod("p2", 1, 1, 1000),
        pod("p3", 1, 1, 200),
    ];
    let outcome = replay(Policy::GpuClustering, nodes.clone(), pods.clone(), vec![0, 1]);
    assert_eq!(nodes_of(&outcome), vec![Some(0), Some(1), Some(1), Some(0)]);
    let outcome = replay(Policy::GpuClustering, nodes, pods, vec![1, 0]);
    assert_eq!(nodes_of(&outcome), vec![Some(0), Some(1), Some(1), Some(0)]);
}

#[test]
fn fgd_fills_the_gpu_fragment_a_popular_share_leaves() {
    // p0 (a 700 share) needs more memory than b has, so it lands on a, leaving 300 on GPU 0.
    // The workload is mostly 300 shares: the next one fills GPU 0 of a exactly (the 300
    // left there is a fragment for the 700 class) rather than open GPU 1 of a or a GPU of
    // b, which the rank prefers.
    let mut small = node("b", 64, 2, "T4");
    small.memory_mib = 1024;
    let nodes = vec![node("a", 64, 2, "T4"), small];
    let mut big = pod("p0", 1, 1, 700);
    big.memory_mib = 4096;
    let pods = vec![big, pod("p1", 1, 1, 300), pod("p2", 1, 1, 300), pod("p3", 1, 1, 300)];
    let outcome = replay(Policy::Fgd, nodes, pods, vec![1, 0]);
    assert_eq!(outcome.placements[0], Some(Placement { node: 0, gpus: 0b1 }));
    assert_eq!(outcome.placements[1], Some(Placement { node: 0, gpus: 0b1 }));
}

#[test]
fn topoplace_counts_what_a_share_really_leaves_where_fgd_does_not() {
    // a (T4) has 800 left after p0 (T4 only, 200); b (P100) is whole. Half of what was
    // asked for so far is 500 shares (two arrived first and fit nowhere). A 300 share on a
    // leaves 500 (one more 500 share) and b keeps room for two; on b it leaves 700 and a 800: one 500 share each. FGD counts both GPUs as
    // usable by a 500 share either way and picks b (it also frees the T4-only class);
    // topoplace picks a, and then places every 500 share.
    let nodes = vec![node("a", 64, 1, "T4"), node("b", 64, 1, "P100")];
    let mut pods = history(2, 1, 500);
    pods.extend([
        only_on(pod("p0", 1, 1, 200), "T4"),
        pod("p1", 1, 1, 300),
        pod("p2", 1, 1, 500),
        pod("p3", 1, 1, 500),
        pod("p4", 1, 1, 500),
    ]);
    let fgd = replay(Policy::Fgd, nodes.clone(), pods.clone(), vec![0, 1]);
    let ours = replay(Policy::Topoplace, nodes, pods, vec![0, 1]);
    assert_eq!(nodes_of(&fgd)[2 + 1], Some(1));
    assert_eq!(nodes_of(&ours)[2 + 1], Some(0));
    assert_eq!((fgd.placed, ours.placed), (4, 5));
    assert!(ours.final_allocation_pct > fgd.final_allocation_pct);
}

#[test]
fn topoplace_does_not_strand_gpus_behind_exhausted_cpu() {
    // What was asked for so far is mostly 500 shares needing 4 cores (four arrived first
    // and fit nowhere; the six below follow). a has 2 GPUs but 9 cores: CPU for
    // two of them, so half its GPU capacity is out of their reach. b has 2 GPUs and 64
    // cores. A light share (1 core) uses that stranded capacity on a under topoplace;
    // FGD sees both nodes as fully usable and follows the rank to b, after which only 5
    // of the 6 CPU-heavy shares fit.
    let nodes = vec![node("a", 9, 2, "T4"), node("b", 64, 2, "T4")];
    let mut pods = history(4, 4, 500);
    pods.push(pod("p0", 1, 1, 500));
    pods.extend((1..=6).map(|i| pod(&format!("p{i}"), 4, 1, 500)));
    let fgd = replay(Policy::Fgd, nodes.clone(), pods.clone(), vec![1, 0]);
    let ours = replay(Policy::Topoplace, nodes, pods, vec![1, 0]);
    assert_eq!((nodes_of(&fgd)[4], nodes_of(&ours)[4]), (Some(1), Some(0)));
    assert_eq!((fgd.placed, ours.placed), (6, 7));
}

#[test]
fn topoplace_never_reads_the_arrivals_to_come() {
    // The same arrivals, then either nothing or a flood of 700 shares. topoplace's first
    // placements are the same either way (its demand is what arrived so far); FGD reads the
    // whole trace before the first pod, and the flood changes where its 300 shares go.
    let nodes = vec![node("a", 64, 2, "T4"), node("b", 64, 2, "T4")];
    let mut pods = vec![pod("p0", 1, 1, 500), pod("p1", 1, 1, 300), pod("p2", 1, 1, 300), pod("p3", 1, 1, 200)];
    let prefix = pods.len();
    let run_prefix = |policy: Policy, pods: Vec<TracePod>| {
        let prepared = Prepared::new(&Trace { nodes: nodes.clone(), pods }).expect("valid trace");
        let arrivals = Arrivals { seed: 1, pods: (0..prefix as u32).collect(), node_rank: vec![1, 0] };
        run(&prepared, &arrivals, policy, &mut |_| {}).expect("replay")
    };
    let alone = (run_prefix(Policy::Topoplace, pods.clone()), run_prefix(Policy::Fgd, pods.clone()));
    pods.extend((0..40).map(|i| pod(&format!("z{i:02}"), 1, 1, 700)));
    let flooded = (run_prefix(Policy::Topoplace, pods.clone()), run_prefix(Policy::Fgd, pods));
    assert_eq!(alone.0.placements, flooded.0.placements);
    assert_ne!(alone.1.placements, flooded.1.placements, "the input must bite on a policy that reads the future");
}

#[test]
fn arrival_demand_counts_every_arrival_and_refreshes_at_powers_of_two() {
    let classes = vec![
        PodClass { cpu_milli: 1000, gpu_milli: 500, num_gpu: 1, gpu_spec: String::new(), models: ModelSet::ANY },
        PodClass { cpu_milli: 1000, gpu_milli: 1000, num_gpu: 1, gpu_spec: String::new(), models: ModelSet::ANY },
    ];
    let mut demand = policy::ArrivalDemand::new(classes.len());
    let refreshed: Vec<u64> =
        (1..=20u64).filter(|&n| demand.arrived(&classes, if n % 4 == 0 { 1 } else { 0 })).collect();
    assert_eq!(refreshed, vec![1, 2, 4, 8, 16]);
    // At 16 arrivals: 12 of class 0, 4 of class 1 (the four after 16 are not in yet).
    let weights: Vec<f64> = demand.weights.iter().map(|t| t.weight).collect();
    assert_eq!(weights, vec![0.75, 0.25]);
    // Refreshes go on doubling up to policy::DEMAND_REFRESH_LAST, then the weights stay.
    let later: Vec<u64> = (21..=5000u64).filter(|_| demand.arrived(&classes, 0)).collect();
    assert_eq!(later, vec![32, 64, 128, 256, 512, 1024]);
    assert_eq!(policy::DEMAND_REFRESH_LAST, 1024);
}

#[test]
fn random_spreads_over_feasible_nodes_and_is_repeatable() {
    let nodes = vec![node("a", 64, 8, "T4"), node("b", 64, 8, "T4"), node("c", 64, 8, "T4")];
    let pods: Vec<TracePod> = (0..8).map(|i| pod(&format!("p{i}"), 1, 1, 300)).collect();
    let first = replay(Policy::Random, nodes.clone(), pods.clone(), vec![0, 1, 2]);
    let again = replay(Policy::Random, nodes, pods, vec![0, 1, 2]);
    assert_eq!(first, again);
    let used: std::collections::BTreeSet<u32> = first.placements.iter().flatten().map(|p| p.node).collect();
    assert!(used.len() >= 2, "8 pods on one node out of 3: {used:?}");
}

#[test]
fn the_filter_checks_cpu_memory_model_and_gpu_room() {
    let nodes = vec![node("a", 8, 2, "T4")];
    let mut too_much_memory = pod("p1", 1, 1, 100);
    too_much_memory.memory_mib = 2 << 20;
    let pods = vec![
        pod("p0", 9, 0, 0),
        too_much_memory,
        only_on(pod("p2", 1, 1, 100), "V100M16"),
        pod("p3", 1, 3, 1000),
        pod("p4", 1, 2, 1000),
        pod("p5", 1, 1, 1),
    ];
    for policy in Policy::ALL {
        let outcome = replay(policy, nodes.clone(), pods.clone(), vec![0]);
        assert_eq!(nodes_of(&outcome), vec![None, None, None, None, Some(0), None], "{policy}");
    }
}

#[test]
fn shares_and_whole_gpus_are_counted_exactly() {
    let nodes = vec![node("a", 64, 4, "T4")];
    let pods = vec![pod("p0", 1, 1, 250), pod("p1", 1, 2, 1000), pod("p2", 1, 0, 0)];
    let outcome = replay(Policy::BestFit, nodes, pods, vec![0]);
    assert_eq!(outcome.placed, 3);
    // 250 + 2000 of 4000 milli-GPU.
    assert_eq!(outcome.final_allocation_pct, 56.25);
}

#[test]
fn arrivals_are_cut_or_repeated_to_the_target_load() {
    let nodes = vec![node("a", 64, 4, "T4")];
    let pods: Vec<TracePod> = (0..6).map(|i| pod(&format!("p{i}"), 1, 1, 1000)).collect();
    let prepared = Prepared::new(&Trace { nodes, pods }).unwrap();
    // 6 GPUs asked of 4: cut to 1.0 x 4000 (4 pods), or repeated to 3.0 x 4000 (12 pods).
    let cut = arrivals(&prepared, 7, 1.0).unwrap();
    assert_eq!(cut.pods.len(), 4);
    let repeated = arrivals(&prepared, 7, 3.0).unwrap();
    assert_eq!(repeated.pods.len(), 12);
    assert!(repeated.pods.iter().all(|&p| p < 6));
    let mut first_six = repeated.pods[..6].to_vec();
    first_six.sort_unstable();
    assert_eq!(first_six, (0..6).collect::<Vec<_>>(), "the whole trace, shuffled, comes first");
    assert_eq!(arrivals(&prepared, 7, 3.0).unwrap(), repeated, "same seed, same arrivals");
    assert_ne!(arrivals(&prepared, 8, 3.0).unwrap().pods, repeated.pods);
}

#[test]
fn a_bad_ratio_is_refused() {
    let prepared = Prepared::new(&Trace { nodes: vec![node("a", 1, 1, "T4")], pods: vec![pod("p", 1, 1, 1)] }).unwrap();
    for ratio in [0.0, -1.0, f64::INFINITY, f64::NAN] {
        assert!(matches!(arrivals(&prepared, 1, ratio), Err(ReplayError::BadRatio(_))), "{ratio}");
    }
}

#[test]
fn curve_bins_round_like_the_artifact_and_fill_gaps_from_neighbours() {
    let mut bins = CurveBins::new(1000);
    // 2.5 % arrived rounds half to even: bin 2. 3.5 % rounds to bin 4.
    bins.record(25, 10);
    bins.record(35, 30);
    bins.record(50, 40);
    let curve = bins.finish();
    assert_eq!(curve.at(2), Some(1.0));
    assert_eq!(curve.at(4), Some(3.0));
    assert_eq!(curve.at(5), Some(4.0));
    // Bin 3 is empty: the mean of bins 2 and 4.
    assert_eq!(curve.at(3), Some(2.0));
    assert_eq!(curve.at(0), None);
    assert_eq!(curve.at(7), None);
    assert_eq!(curve.allocation_pct.len(), ARRIVED_PCT_MAX + 1);
}

#[test]
fn bad_traces_are_refused_with_the_pod_or_node_named() {
    let nodes = vec![node("a", 1, 1, "T4")];
    let error = Prepared::new(&Trace { nodes: nodes.clone(), pods: vec![pod("x", 1, 2, 500)] }).unwrap_err();
    assert!(error.to_string().starts_with("pod `x`:"), "{error}");
    let error = Prepared::new(&Trace { nodes: vec![node("a", 1, 17, "T4")], pods: vec![pod("x", 1, 1, 1)] });
    assert!(matches!(error, Err(ReplayError::TooManyGpus { .. })));
    let error =
        Prepared::new(&Trace { nodes: vec![nodes[0].clone(), nodes[0].clone()], pods: vec![pod("x", 1, 1, 1)] });
    assert_eq!(error.unwrap_err(), ReplayError::DuplicateNode { name: "a".into() });
    assert_eq!(Prepared::new(&Trace { nodes: nodes.clone(), pods: Vec::new() }).unwrap_err(), ReplayError::NoPods);
    let prepared = Prepared::new(&Trace { nodes, pods: vec![pod("x", 1, 1, 1)] }).unwrap();
    for arrivals in [
        Arrivals { seed: 0, pods: vec![0], node_rank: vec![] },
        Arrivals { seed: 0, pods: vec![1], node_rank: vec![0] },
    ] {
        assert!(matches!(run(&prepared, &arrivals, Policy::Fgd, &mut |_| {}), Err(ReplayError::BadArrivals(_))));
    }
}

#[test]
fn a_run_is_deterministic_for_a_seed() {
    let nodes: Vec<TraceNode> = (0..12)
        .map(|i| node(&format!("n{i:02}"), 32 + 8 * (i % 3), 2 + 2 * (i % 2) as u8, ["T4", "P100"][(i % 2) as usize]))
        .collect();
    let pods: Vec<TracePod> = (0..60)
        .map(|i| {
            pod(
                &format!("p{i:02}"),
                1 + (i % 7),
                [0, 1, 1, 1, 2, 4][(i % 6) as usize],
                [1000, 450, 300, 1000][(i % 4) as usize],
            )
        })
        .map(|mut p| {
            if p.num_gpu == 0 {
                p.gpu_milli = 0;
            } else if p.num_gpu > 1 {
                p.gpu_milli = 1000;
            }
            p
        })
        .collect();
    let prepared = Prepared::new(&Trace { nodes, pods }).unwrap();
    for policy in Policy::ALL {
        let arrivals_a = arrivals(&prepared, 42, LOAD_RATIO_DEFAULT).unwrap();
        let first = run(&prepared, &arrivals_a, policy, &mut |_| {}).unwrap();
        let second =
            run(&prepared, &arrivals(&prepared, 42, LOAD_RATIO_DEFAULT).unwrap(), policy, &mut |_| {}).unwrap();
        assert_eq!(first, second, "{policy}");
        assert!(
            first.placed > 0 && first.placed < first.attempted,
            "{policy}: {} of {}",
            first.placed,
            first.attempted
        );
    }
}
