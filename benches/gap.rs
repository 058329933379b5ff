//! How much the greedy planner gives away against the exact MILP, and what exact costs.
//!
//! Part 1 (quality): sequences of gangs whose GPU counts (1 to 64) are drawn from the real
//! ElasticFlow job trace (cluster02), placed on the real Lingjun Clos cluster with 30, 50
//! and 70 % of GPUs in use and on a generated mixed cluster (H100, DGX-1 cube-mesh,
//! H100 NVL pairs, L40S). At every step both solvers place the same gang against the same
//! state, exact over every eligible host; the state then advances by the exact placement. Reports the score gap (median,
//! worst), how often greedy fails where exact places, and solve times per backend.
//!
//! Part 2 (speed): one gang over 50, 200 and 1,000 candidate hosts, every host a
//! candidate, per backend.
//!
//! Run: `cargo bench --bench gap` (add `--features highs` for HiGHS). Reads the traces
//! from `../shared/traces` or `TOPOPLACE_TRACES`.

#[path = "support/allocator.rs"]
mod allocator;

use std::time::{Duration, Instant};

use topoplace_engine::ledger::Ledger;
use topoplace_engine::placement::exact::{Backend, CandidateHosts, ExactConfig, ExactOutcome};
use topoplace_engine::placement::{Planner, PlannerConfig};
use topoplace_engine::topology::{product, Cluster, ClusterSpec, HostId, NodeSpec};
use topoplace_engine::workload::{Gang, GangSpec};
use topoplace_formats::convert::traces_dir;

const STEPS_PER_INSTANCE: usize = 40;
const TIME_LIMIT: Duration = Duration::from_secs(5);

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// GPU counts of the jobs of ElasticFlow cluster02 (1 to 64).
fn trace_gpu_counts() -> Vec<u32> {
    let path = traces_dir().join("elasticflow/cluster02.csv");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e} (set TOPOPLACE_TRACES)", path.display()));
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    let column = reader.headers().expect("header").iter().position(|h| h == "num_gpu").expect("num_gpu column");
    reader
        .records()
        .filter_map(|r| r.ok()?.get(column)?.trim().parse::<u32>().ok())
        .filter(|&n| (1..=64).contains(&n))
        .collect()
}

/// A gang of `gpus` GPUs as a serving replica: one member up to 8 GPUs (TP = GPUs when a
/// power of two), else members of 8 GPUs with TP 8.
fn gang_of(name: String, gpus: u32, split: bool) -> Gang {
    let (members, per_member, tp) = if split && gpus >= 2 {
        // Data-parallel pods of 2 GPUs (TP 2): many small members to pack across hosts.
        (gpus / 2, 2, 2)
    } else if gpus <= 8 {
        (1, gpus, if gpus.is_power_of_two() { gpus } else { 1 })
    } else {
        (gpus.div_ceil(8), 8, 8)
    };
    GangSpec::shape(&name, members, per_member, tp).expand().remove(0)
}

fn lingjun() -> Cluster {
    let text = include_str!("../testdata/clusters/lingjun.yaml");
    topoplace_formats::files::cluster::load("lingjun.yaml", text).expect("lingjun cluster")
}

fn mixed(hosts: usize) -> Cluster {
    let kinds = [("H100", 8u8), ("V100-SXM2-16GB", 8), ("H100-NVL", 4), ("L40S", 4)];
    let nodes = (0..hosts)
        .map(|index| {
            let (name, count) = kinds[index % kinds.len()];
            NodeSpec {
                name: format!("m{index:04}"),
                labels: [("spine", format!("s{}", index / 32)), ("rack", format!("r{}", index / 8))]
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
                product: product::lookup(name).expect("known"),
                gpu_count: count,
                memory_mib: None,
                nvlink: None,
                clique: None,
                allocated: Vec::new(),
                mig_profile: None,
                sharing: None,
                pool: Default::default(),
            }
        })
        .collect();
    Cluster::build(ClusterSpec { name: "mixed".into(), levels: vec!["spine".into(), "rack".into()], nodes })
        .expect("valid")
}

/// About `share` of all GPUs in use; a host is either untouched or partly used, so whole
/// free hosts remain for multi-host gangs.
fn load(cluster: &Cluster, share: f64, seed: u64) -> Ledger {
    let mut ledger = Ledger::new(cluster);
    let mut state = seed;
    for host in 0..cluster.hosts.len() as HostId {
        let count = u32::from(cluster.host(host).gpu_count);
        let roll = (splitmix(&mut state) % 1000) as f64 / 1000.0;
        let used = if roll < share { ((splitmix(&mut state) % u64::from(count)) + 1) as u32 } else { 0 };
        let used = if roll < share * share { count } else { used };
        let mut mask = 0u64;
        while mask.count_ones() < used {
            mask |= 1 << (splitmix(&mut state) % u64::from(count));
        }
        if mask != 0 {
            ledger.reserve(&format!("load-{host}"), &[(host, mask)]).expect("free");
        }
    }
    ledger
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    values[((values.len() - 1) as f64 * p).round() as usize]
}

struct Tally {
    gaps: Vec<f64>,
    greedy_failed_exact_placed: usize,
    both_failed: usize,
    exact_no_answer: usize,
    compared: usize,
    greedy_ms: Vec<f64>,
    exact_ms: Vec<f64>,
}

fn quality(
    name: &str,
    cluster: &Cluster,
    ledger: &mut Ledger,
    sizes: &[u32],
    split: bool,
    seed: u64,
    backend: Backend,
) -> Tally {
    let mut planner = Planner::new(cluster, PlannerConfig::default());
    // Exact searches every eligible host, not only greedy's candidates: a global optimum.
    let config = ExactConfig {
        backend,
        time_limit: TIME_LIMIT,
        candidates: CandidateHosts::All,
        hosts_max: usize::MAX,
        variables_max: None,
    };
    let mut tally = Tally {
        gaps: Vec::new(),
        greedy_failed_exact_placed: 0,
        both_failed: 0,
        exact_no_answer: 0,
        compared: 0,
        greedy_ms: Vec::new(),
        exact_ms: Vec::new(),
    };
    let mut state = seed;
    for step in 0..STEPS_PER_INSTANCE {
        let gpus = sizes[(splitmix(&mut state) % sizes.len() as u64) as usize];
        let gang = gang_of(format!("{name}-{step}"), gpus, split);
        let started = Instant::now();
        let greedy = planner.place(ledger, &gang);
        tally.greedy_ms.push(started.elapsed().as_secs_f64() * 1e3);
        let (exact, stats) = planner.place_exact(ledger, &gang, &config);
        tally.exact_ms.push(stats.solve_time.as_secs_f64() * 1e3);
        let winner = match (&greedy, exact) {
            (Ok(greedy), ExactOutcome::Placed(exact)) => {
                let gap = (exact.score.total - greedy.score.total) / exact.score.total.abs().max(1e-9);
                tally.gaps.push(gap);
                tally.compared += 1;
                Some(*exact)
            }
            (Err(_), ExactOutcome::Placed(exact)) => {
                tally.greedy_failed_exact_placed += 1;
                Some(*exact)
            }
            (Err(_), ExactOutcome::Infeasible(_)) => {
                tally.both_failed += 1;
                None
            }
            (greedy, _) => {
                tally.exact_no_answer += 1;
                greedy.as_ref().ok().cloned()
            }
        };
        if let Some(placement) = winner {
            ledger.reserve(&gang.name, &placement.holding()).expect("valid placement");
        }
    }
    tally
}

fn main() {
    // `cargo bench` passes `--bench`; any other argument is a name filter we ignore.
    let sizes = trace_gpu_counts();
    let multi_host = sizes.iter().filter(|&&n| n > 8).count();
    println!(
        "gang sizes: {} jobs of ElasticFlow cluster02 ({} over 8 GPUs), {} steps per instance, exact time limit {} ms",
        sizes.len(),
        multi_host,
        STEPS_PER_INSTANCE,
        TIME_LIMIT.as_millis()
    );
    // Oversample multi-host jobs so that every sequence has some: half the draws from them.
    let big: Vec<u32> = sizes.iter().copied().filter(|&n| n > 8).collect();
    let mut mix = sizes.clone();
    while mix.iter().filter(|&&n| n > 8).count() * 2 < mix.len() && !big.is_empty() {
        mix.extend_from_slice(&big);
    }

    println!("\n## Quality: greedy against exact at the same state");
    println!(
        "{:<26} {:>8} {:>9} {:>11} {:>10} {:>11} {:>9} {:>12} {:>12} {:>12}",
        "instance",
        "backend",
        "compared",
        "median gap",
        "worst gap",
        "greedy-only",
        "both",
        "exact none",
        "greedy p50",
        "exact p50"
    );
    println!(
        "{:<26} {:>8} {:>9} {:>11} {:>10} {:>11} {:>9} {:>12} {:>12} {:>12}",
        "", "", "", "", "", "fails", "fail", "answer", "ms", "ms"
    );
    let lingjun = lingjun();
    let mixed_64 = mixed(64);
    let mut all_gaps = Vec::new();
    let mut greedy_fails = 0;
    for backend in Backend::available() {
        for (name, cluster, share, split) in [
            ("lingjun 30% used", &lingjun, 0.3, false),
            ("lingjun 50% used", &lingjun, 0.5, false),
            ("lingjun 70% used", &lingjun, 0.7, false),
            ("mixed-64 30% used", &mixed_64, 0.3, false),
            ("mixed-64 50% used", &mixed_64, 0.5, false),
            ("mixed-64 70% used", &mixed_64, 0.7, false),
            ("mixed-64 30% 2-GPU pods", &mixed_64, 0.3, true),
            ("mixed-64 50% 2-GPU pods", &mixed_64, 0.5, true),
            ("lingjun 50% 2-GPU pods", &lingjun, 0.5, true),
        ] {
            let mut ledger = load(cluster, share, 11);
            let sizes: Vec<u32> = if split { mix.iter().copied().filter(|&n| n <= 16).collect() } else { mix.clone() };
            let mut tally = quality(name, cluster, &mut ledger, &sizes, split, 5, backend);
            greedy_fails += tally.greedy_failed_exact_placed;
            all_gaps.extend(tally.gaps.iter().copied());
            let median = percentile(&mut tally.gaps.clone(), 0.5);
            let worst = tally.gaps.iter().copied().fold(0.0, f64::max);
            println!(
                "{:<26} {:>8} {:>9} {:>10.3}% {:>9.3}% {:>11} {:>9} {:>12} {:>12.2} {:>12.1}",
                name,
                backend.name(),
                tally.compared,
                median * 100.0,
                worst * 100.0,
                tally.greedy_failed_exact_placed,
                tally.both_failed,
                tally.exact_no_answer,
                percentile(&mut tally.greedy_ms, 0.5),
                percentile(&mut tally.exact_ms, 0.5),
            );
        }
    }
    let median = percentile(&mut all_gaps.clone(), 0.5);
    let worst = all_gaps.iter().copied().fold(0.0, f64::max);
    println!(
        "all: {} compared, median gap {:.3}%, worst {:.3}%, greedy failed where exact placed: {}",
        all_gaps.len(),
        median * 100.0,
        worst * 100.0,
        greedy_fails
    );

    println!("\n## Speed: one gang, every host a candidate");
    println!("{:<10} {:<14} {:>8} {:>10} {:>12} {:>10}", "hosts", "gang", "backend", "variables", "solve ms", "status");
    for hosts in [50usize, 200, 1_000] {
        let cluster = mixed(hosts);
        let ledger = load(&cluster, 0.5, 3);
        for (label, gpus) in [("TP-4", 4u32), ("2x8 TP-8", 16)] {
            let gang = gang_of(format!("speed-{hosts}-{gpus}"), gpus, false);
            for backend in Backend::available() {
                let mut planner = Planner::new(&cluster, PlannerConfig::default());
                let config = ExactConfig {
                    backend,
                    time_limit: Duration::from_secs(30),
                    candidates: CandidateHosts::All,
                    hosts_max: usize::MAX,
                    variables_max: None,
                };
                let (outcome, stats) = planner.place_exact(&ledger, &gang, &config);
                let status = match &outcome {
                    ExactOutcome::Placed(p) => match p.solver.gap {
                        Some(gap) if gap > 1e-9 => format!("gap {:.2}%", gap * 100.0),
                        _ => "optimal".to_string(),
                    },
                    ExactOutcome::Infeasible(_) => "infeasible".into(),
                    ExactOutcome::NoAnswer { .. } => "no answer".into(),
                };
                println!(
                    "{:<10} {:<14} {:>8} {:>10} {:>12.1} {:>10}",
                    hosts,
                    label,
                    backend.name(),
                    stats.variables,
                    stats.solve_time.as_secs_f64() * 1e3,
                    status
                );
            }
        }
    }
}
