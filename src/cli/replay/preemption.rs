//! `topoplace replay preemption`: the seeded preemption study
//! ([`topoplace_replay::preemption`]) under topoplace's whole-unit preemption and under
//! kube-scheduler's node-by-node preemption, on the same arrivals, one row per seed and mode
//! and a pooled row per mode.

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::Args;
use topoplace_engine::topology::Cluster;
use topoplace_formats::convert::traces_dir;
use topoplace_online::scheduler::PreemptionMode;
use topoplace_replay::preemption::{self, PreemptionReport, PreemptionStudyConfig};

use crate::cli::{parallel_map, write_all, CliError};

/// The most seeds one run takes (each is two simulations of `--steps` cycles).
pub const SEEDS_MAX: u64 = 64;
/// The most cycles one simulation runs (a day of simulated seconds).
pub const STEPS_MAX: u64 = 86_400;

#[derive(Debug, Args)]
pub struct PreemptionArgs {
    /// Lingjun-format topology (ip,DSW,PSW,ASW); default: the shared lingjun-2023/topo.csv,
    /// 8 H800 GPUs per host.
    #[arg(long, value_name = "CSV")]
    pub topology: Option<PathBuf>,
    /// Seeds: SEED_BASE, SEED_BASE+1, ... (at most 64).
    #[arg(long, default_value_t = 3)]
    pub seeds: u64,
    #[arg(long, default_value_t = 1)]
    pub seed_base: u64,
    /// Cycles per simulation, one per simulated second (at most 86,400).
    #[arg(long, default_value_t = PreemptionStudyConfig::default().steps)]
    pub steps: u64,
    /// Mean seconds between serving replicas (priority 1000, 8 to 32 GPUs).
    #[arg(long, default_value_t = PreemptionStudyConfig::default().serving_every_s)]
    pub serving_every: f64,
    /// Batch jobs (priority 0, 1 to 8 GPUs) arriving per second on average.
    #[arg(long, default_value_t = PreemptionStudyConfig::default().batch_per_s)]
    pub batch_per_second: f64,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

pub fn run(args: &PreemptionArgs, out: &mut dyn std::io::Write) -> Result<(), CliError> {
    if args.seeds == 0 || args.seeds > SEEDS_MAX {
        return Err(CliError::Input(format!("--seeds {}: between 1 and {SEEDS_MAX}", args.seeds)));
    }
    if args.steps == 0 || args.steps > STEPS_MAX {
        return Err(CliError::Input(format!("--steps {}: between 1 and {STEPS_MAX}", args.steps)));
    }
    if !(args.serving_every.is_finite() && args.serving_every >= 1.0) {
        return Err(CliError::Input(format!("--serving-every {}: at least 1 second", args.serving_every)));
    }
    if !(args.batch_per_second.is_finite() && (0.0..=100.0).contains(&args.batch_per_second)) {
        return Err(CliError::Input(format!("--batch-per-second {}: between 0 and 100", args.batch_per_second)));
    }
    if args.seed_base.checked_add(args.seeds).is_none() {
        return Err(CliError::Input(format!("--seed-base {}: too large for {} seeds", args.seed_base, args.seeds)));
    }
    let path = args.topology.clone().unwrap_or_else(|| traces_dir().join("lingjun-2023").join("topo.csv"));
    let file = path.display().to_string();
    let text = topoplace_formats::files::read_input(&path)?;
    let spec =
        topoplace_formats::convert::lingjun(&file, &text, "H800", 8).map_err(|e| CliError::Input(e.to_string()))?;
    let cluster = Cluster::build(spec).map_err(|e| CliError::Input(format!("{file}: {e}")))?;
    let modes = [PreemptionMode::WholeUnit, PreemptionMode::NodeByNode];
    let runs: Vec<(PreemptionMode, u64)> =
        modes.iter().flat_map(|&m| (0..args.seeds).map(move |s| (m, args.seed_base + s))).collect();
    let reports = parallel_map(&runs, args.threads, |&(mode, seed)| {
        let config = PreemptionStudyConfig {
            seed,
            steps: args.steps,
            serving_every_s: args.serving_every,
            batch_per_s: args.batch_per_second,
            ..PreemptionStudyConfig::default()
        };
        preemption::run(cluster.clone(), mode, &config)
    })?;
    let mut text = format!(
        "preemption study on {file}: {} hosts, {} cycles of 1 s, serving every {} s, {} batch jobs/s\n\n",
        cluster.hosts.len(),
        args.steps,
        args.serving_every,
        args.batch_per_second
    );
    let _ = writeln!(
        text,
        "{:<13} {:>5} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>7} {:>6} {:>6}",
        "policy",
        "seed",
        "serving",
        "started",
        "p50 s",
        "p99 s",
        "waiting",
        "preempt",
        "GPUs ev",
        "GPUs/pre",
        "halfgng",
        "late",
        "util"
    );
    let mut pooled: Vec<(PreemptionMode, Vec<f64>, u64, usize)> = Vec::new();
    for ((mode, seed), report) in runs.iter().zip(reports) {
        let report = report.map_err(|e| CliError::Failed(format!("{} seed {seed}: {e}", name(*mode))))?;
        let _ = writeln!(text, "{}", row(name(*mode), &seed.to_string(), &report));
        match pooled.iter_mut().find(|(m, ..)| m == mode) {
            Some(entry) => {
                entry.1.extend(report.queueing_s.iter().copied());
                entry.2 += report.gpus_evicted;
                entry.3 += report.preemptions;
            }
            None => pooled.push((*mode, report.queueing_s.clone(), report.gpus_evicted, report.preemptions)),
        }
    }
    text.push('\n');
    for (mode, mut waits, gpus, preemptions) in pooled {
        waits.sort_by(f64::total_cmp);
        let _ = writeln!(
            text,
            "{:<13} all seeds: serving queueing p50 {:.0} s, p99 {:.0} s over {} started; {} GPUs evicted in {} preemptions ({:.1} per preemption)",
            name(mode),
            preemption::percentile(&waits, 0.5),
            preemption::percentile(&waits, 0.99),
            waits.len(),
            gpus,
            preemptions,
            if preemptions == 0 { 0.0 } else { gpus as f64 / preemptions as f64 }
        );
    }
    write_all(out, &text)
}

fn name(mode: PreemptionMode) -> &'static str {
    match mode {
        PreemptionMode::WholeUnit => "topoplace",
        PreemptionMode::NodeByNode => "node-by-node",
    }
}

fn row(policy: &str, seed: &str, r: &PreemptionReport) -> String {
    format!(
        "{policy:<13} {seed:>5} {:>8} {:>8} {:>8.0} {:>8.0} {:>8} {:>8} {:>8} {:>9.1} {:>7} {:>6} {:>5.1}%",
        r.serving_arrived,
        r.serving_started,
        r.queueing_p50_s,
        r.queueing_p99_s,
        r.serving_waiting,
        r.preemptions,
        r.gpus_evicted,
        r.gpus_per_preemption(),
        r.gangs_half_evicted,
        r.late_starts,
        r.gpu_utilisation * 100.0
    )
}
