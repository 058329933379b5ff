//! `topoplace replay`: reads the trace CSVs, runs every (policy, seed) pair of the replay
//! on all cores with a progress bar, and renders the table, CSV, JSON and SVG chart.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use super::{parallel_map, write_all, CliError};
use topoplace_formats::convert::traces_dir;
use topoplace_formats::files;
use topoplace_replay::jobs::QueueMode;
use topoplace_replay::pods::{
    self, Arrivals, Policy, Prepared, RunOutcome, Trace, ARRIVED_PCT_MAX, LOAD_RATIO_DEFAULT,
};
use topoplace_replay::traces::openb;

/// The FGD artifact's first seed (its runs use 42..=51).
pub const SEED_BASE_DEFAULT: u64 = 42;
/// Arrived-load columns the table shows.
const TABLE_COLUMNS: [usize; 4] = [100, 110, 120, 130];

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum ReplayFormat {
    Table,
    Csv,
    Json,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum QueueFlag {
    /// Nothing starts past a head that does not fit.
    StrictFifo,
    /// Later jobs that fit start while the head waits (no reservation for the head).
    BestEffortFifo,
}

impl From<QueueFlag> for QueueMode {
    fn from(flag: QueueFlag) -> Self {
        match flag {
            QueueFlag::StrictFifo => QueueMode::StrictFifo,
            QueueFlag::BestEffortFifo => QueueMode::BestEffortFifo,
        }
    }
}

/// Two modes: the GPU-sharing trace (`--nodes`, `--pods`; FGD protocol, pods never leave)
/// and, with `--jobs`, a gang job trace replayed in time on a topology.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Node list CSV (sn,cpu_milli,memory_mib,gpu,model); default: the shared trace's
    /// openb_node_list_gpu_node.csv.
    #[arg(long, conflicts_with = "jobs")]
    pub nodes: Option<PathBuf>,
    /// Pod list CSV (name,cpu_milli,memory_mib,num_gpu,gpu_milli[,gpu_spec]); default: the
    /// shared trace's openb_pod_list_default.csv.
    #[arg(long, conflicts_with = "jobs")]
    pub pods: Option<PathBuf>,
    /// Policies, comma-separated (default: all). Pod mode: random, dotproduct,
    /// gpuclustering, gpupacking, bestfit, fgd, topoplace. Job mode: topoplace, kueue-tas,
    /// volcano-hypernode, bestfit-nodes, first-fit, random.
    #[arg(long, value_delimiter = ',')]
    pub policy: Vec<String>,
    /// Seeds per policy: SEED_BASE, SEED_BASE+1, ...
    #[arg(long, default_value_t = 10, conflicts_with = "jobs")]
    pub seeds: u64,
    /// First seed (job mode: the seed of the random policy).
    #[arg(long, default_value_t = SEED_BASE_DEFAULT)]
    pub seed_base: u64,
    /// Arrived GPU request to replay, as a multiple of the cluster's GPU capacity.
    #[arg(long, default_value_t = LOAD_RATIO_DEFAULT, conflicts_with = "jobs")]
    pub ratio: f64,
    /// Job mode: a job trace CSV (job_id,submission_time,duration,num_gpu), e.g. the shared
    /// elasticflow/cluster02.csv.
    #[arg(long, value_name = "CSV")]
    pub jobs: Option<PathBuf>,
    /// Job mode: Lingjun-format topology (ip,DSW,PSW,ASW); default: the shared
    /// lingjun-2023/topo.csv, 8 GPUs per host.
    #[arg(long, value_name = "CSV", requires = "jobs", conflicts_with = "cluster")]
    pub topology: Option<PathBuf>,
    /// Job mode: a cluster file (kind: Cluster) instead of a Lingjun topology.
    #[arg(long, value_name = "FILE", requires = "jobs")]
    pub cluster: Option<PathBuf>,
    /// Job mode: GPU product of the Lingjun hosts.
    #[arg(long, default_value = "H800", requires = "jobs")]
    pub gpu_product: String,
    /// Job mode: arrival times are divided by this (2: the same jobs arrive twice as fast).
    #[arg(long, default_value_t = 1.0, requires = "jobs")]
    pub load: f64,
    #[arg(long, value_enum, default_value_t = QueueFlag::StrictFifo, requires = "jobs")]
    pub queue: QueueFlag,
    /// Job mode, topoplace with best-effort-fifo: seconds a gang that fits no single rack
    /// waits for one, the rack held clear of later jobs meanwhile (0: place it at once).
    #[arg(long, value_name = "SECONDS", default_value_t = topoplace_replay::jobs::RACK_WAIT_S_DEFAULT, requires = "jobs")]
    pub rack_wait: u64,
    /// Job mode: take a rack, block or host out of service at a time, e.g.
    /// `G6/P10/S14@86400` (seconds after the first arrival); its jobs restart elsewhere.
    #[arg(long, value_name = "TARGET@SECONDS", requires = "jobs")]
    pub drain: Vec<String>,
    /// Job mode: GPU products given to racks in turn (a mixed cluster), e.g. `H800,A100-80GB`;
    /// baselines try them in this order.
    #[arg(long, value_delimiter = ',', requires = "jobs")]
    pub rack_products: Vec<String>,
    #[arg(short = 'o', long = "output", value_enum, default_value_t = ReplayFormat::Table)]
    pub output: ReplayFormat,
    /// Also write an SVG chart of allocation against arrived load, one line per policy.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

fn default_trace_file(name: &str) -> PathBuf {
    traces_dir().join("alibaba-gpu-v2023").join(name)
}

/// The `--policy` list in the order given, without repeats; every policy when empty.
pub fn chosen_policies<P>(names: &[String], all: &[P]) -> Result<Vec<P>, CliError>
where
    P: std::str::FromStr<Err = String> + Copy + PartialEq,
{
    if names.is_empty() {
        return Ok(all.to_vec());
    }
    let mut chosen = Vec::new();
    for name in names {
        let policy: P = name.trim().parse().map_err(|e| CliError::Input(format!("--policy: {e}")))?;
        if !chosen.contains(&policy) {
            chosen.push(policy);
        }
    }
    Ok(chosen)
}

pub fn replay(args: &ReplayArgs, out: &mut dyn std::io::Write) -> Result<(), CliError> {
    if let Some(jobs) = &args.jobs {
        return super::jobs::replay_jobs(args, jobs, out);
    }
    let policies = chosen_policies(&args.policy, &Policy::ALL)?;
    if args.seeds == 0 {
        return Err(CliError::Input("--seeds must be at least 1".into()));
    }
    if args.threads == Some(0) {
        return Err(CliError::Input("--threads must be at least 1".into()));
    }
    let nodes_path = args.nodes.clone().unwrap_or_else(|| default_trace_file("openb_node_list_gpu_node.csv"));
    let pods_path = args.pods.clone().unwrap_or_else(|| default_trace_file("openb_pod_list_default.csv"));
    let nodes_name = nodes_path.display().to_string();
    let pods_name = pods_path.display().to_string();
    let trace = Trace {
        nodes: openb::parse_nodes(&nodes_name, &files::read_input(&nodes_path)?)?,
        pods: openb::parse_pods(&pods_name, &files::read_input(&pods_path)?)?,
    };
    let prepared = Prepared::new(&trace).map_err(|e| CliError::Input(format!("{nodes_name}, {pods_name}: {e}")))?;
    let seeds: Vec<u64> = (0..args.seeds).map(|i| args.seed_base.saturating_add(i)).collect();
    let arrivals = seeds
        .iter()
        .map(|&seed| pods::arrivals(&prepared, seed, args.ratio))
        .collect::<Result<Vec<Arrivals>, _>>()
        .map_err(|e| CliError::Input(format!("--ratio: {e}")))?;
    let outcomes = run_all(&prepared, &arrivals, &policies, args.threads)?;
    let summary = Summary::new(&policies, &outcomes, &prepared, &pods_name, args.ratio);
    if let Some(path) = &args.svg {
        std::fs::write(path, super::svg::chart(&summary))
            .map_err(|e| CliError::Failed(format!("cannot write {}: {e}", path.display())))?;
    }
    let text = match args.output {
        ReplayFormat::Table => summary.table(),
        ReplayFormat::Csv => csv_rows(&outcomes),
        ReplayFormat::Json => {
            serde_json::to_string_pretty(&summary).map_err(|e| CliError::Failed(e.to_string()))? + "\n"
        }
    };
    write_all(out, &text)
}

/// Every (policy, seed) run, on `threads` workers; results in (policy, seed) order.
fn run_all(
    prepared: &Prepared,
    arrivals: &[Arrivals],
    policies: &[Policy],
    threads: Option<usize>,
) -> Result<Vec<RunOutcome>, CliError> {
    let jobs: Vec<(Policy, &Arrivals)> =
        policies.iter().flat_map(|&policy| arrivals.iter().map(move |a| (policy, a))).collect();
    let pods_total: u64 = jobs.iter().map(|(_, a)| a.pods.len() as u64).sum();
    let bar = if std::io::stderr().is_terminal() {
        let bar = ProgressBar::with_draw_target(Some(pods_total), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {percent:>3}% {msg}") {
            bar.set_style(style);
        }
        bar.set_message(format!("{} runs", jobs.len()));
        bar
    } else {
        ProgressBar::hidden()
    };
    let outcomes = parallel_map(&jobs, threads, |&(policy, arrivals)| {
        pods::run(prepared, arrivals, policy, &mut |pods| bar.inc(pods as u64))
    });
    bar.finish_and_clear();
    outcomes?.into_iter().map(|outcome| outcome.map_err(|e| CliError::Failed(e.to_string()))).collect()
}

fn csv_rows(outcomes: &[RunOutcome]) -> String {
    let mut text = String::from("policy,seed,arrived_pct,allocation_pct\n");
    for outcome in outcomes {
        for (arrived, cell) in outcome.curve.allocation_pct.iter().enumerate() {
            let value = cell.map(|v| format!("{v:.2}")).unwrap_or_default();
            text.push_str(&format!("{},{},{arrived},{value}\n", outcome.policy, outcome.seed));
        }
    }
    text
}

/// One policy across seeds.
#[derive(Debug, Serialize)]
pub struct PolicySummary {
    pub policy: String,
    /// Mean over seeds of the allocation percent at each arrived percent 0..=130 (None
    /// where no seed has a sample).
    pub mean_curve: Vec<Option<f64>>,
    /// Per seed, the allocation percent at 130 % arrived (the paper's figure of merit).
    pub at_130_per_seed: Vec<Option<f64>>,
    pub placed_mean: f64,
    pub attempted_mean: f64,
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub pods: String,
    pub nodes: usize,
    pub gpus: u64,
    pub ratio: f64,
    pub seeds: Vec<u64>,
    pub policies: Vec<PolicySummary>,
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, count) = values.fold((0.0, 0usize), |(s, c), v| (s + v, c + 1));
    (count > 0).then(|| sum / count as f64)
}

impl Summary {
    fn new(policies: &[Policy], outcomes: &[RunOutcome], prepared: &Prepared, pods: &str, ratio: f64) -> Self {
        let seeds: Vec<u64> = outcomes.iter().filter(|o| Some(&o.policy) == policies.first()).map(|o| o.seed).collect();
        let policies = policies
            .iter()
            .map(|&policy| {
                let runs: Vec<&RunOutcome> = outcomes.iter().filter(|o| o.policy == policy).collect();
                PolicySummary {
                    policy: policy.to_string(),
                    mean_curve: (0..=ARRIVED_PCT_MAX)
                        .map(|x| mean(runs.iter().filter_map(|r| r.curve.at(x))))
                        .collect(),
                    at_130_per_seed: runs.iter().map(|r| r.curve.at(ARRIVED_PCT_MAX)).collect(),
                    placed_mean: mean(runs.iter().map(|r| r.placed as f64)).unwrap_or(0.0),
                    attempted_mean: mean(runs.iter().map(|r| r.attempted as f64)).unwrap_or(0.0),
                }
            })
            .collect();
        Summary {
            pods: pods.to_string(),
            nodes: prepared.nodes.len(),
            gpus: prepared.gpu_capacity_milli / 1000,
            ratio,
            seeds,
            policies,
        }
    }

    fn table(&self) -> String {
        let mut text = format!(
            "{}: {} nodes, {} GPUs, arrivals to {:.0}% of GPU capacity, seeds {}\n\
             GPU allocation (% of capacity, mean over seeds) at arrived load:\n",
            self.pods,
            self.nodes,
            self.gpus,
            self.ratio * 100.0,
            match (self.seeds.first(), self.seeds.last()) {
                (Some(first), Some(last)) if first != last => format!("{first}..={last}"),
                (Some(first), _) => first.to_string(),
                _ => "none".into(),
            }
        );
        let cell = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
        text.push_str(&format!("{:<14}", "policy"));
        for column in TABLE_COLUMNS {
            text.push_str(&format!("{:>9}", format!("{column}%")));
        }
        text.push_str(&format!("{:>17}{:>14}\n", "130% min..max", "pods placed"));
        for policy in &self.policies {
            text.push_str(&format!("{:<14}", policy.policy));
            for column in TABLE_COLUMNS {
                text.push_str(&format!("{:>9}", cell(policy.mean_curve.get(column).copied().flatten())));
            }
            let seeds: Vec<f64> = policy.at_130_per_seed.iter().flatten().copied().collect();
            let range = match (seeds.iter().copied().reduce(f64::min), seeds.iter().copied().reduce(f64::max)) {
                (Some(lo), Some(hi)) => format!("{lo:.2}..{hi:.2}"),
                _ => "-".into(),
            };
            text.push_str(&format!(
                "{range:>17}{:>14}\n",
                format!("{:.0}/{:.0}", policy.placed_mean, policy.attempted_mean)
            ));
        }
        text
    }
}
