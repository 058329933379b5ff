//! `topoplace replay`: the two replays of real traces, each its own subcommand with its own
//! flags. `pods` ([`pods`]) is the FGD paper's GPU-sharing protocol, `jobs` ([`jobs`]) gangs
//! in time on a topology. The spellings from before the subcommands (`replay [--nodes ..]`
//! and `replay --jobs CSV ..`) are kept as aliases ([`LegacyArgs`]), refined into the same
//! argument types before anything runs.

mod common;
pub mod generate;
pub mod generate_pods;
pub mod jobs;
pub mod pods;
pub mod preemption;
mod svg;

use std::path::PathBuf;

use clap::{Args, Subcommand};

pub use common::{ReplayFormat, ReportArgs, SEED_BASE_DEFAULT};
use jobs::{JobsArgs, QueueFlag};
use pods::PodsArgs;
use topoplace_replay::pods::LOAD_RATIO_DEFAULT;

use crate::cli::CliError;

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ReplayArgs {
    #[command(subcommand)]
    pub kind: Option<ReplayKind>,
    /// The spelling before `pods` and `jobs`: with `--jobs`, a job replay, else a pod replay.
    #[command(flatten)]
    pub legacy: LegacyArgs,
}

#[derive(Debug, Subcommand)]
pub enum ReplayKind {
    /// The FGD paper's protocol on the Alibaba GPU-sharing trace: pods that ask for whole
    /// GPUs or a share of one arrive in a seeded order and never leave.
    Pods(PodsArgs),
    /// Gangs in time on a topology (the ElasticFlow trace on the Lingjun Clos network by
    /// default): jobs arrive, queue, run and leave, through topoplace or a baseline policy.
    Jobs(JobsArgs),
    /// Preemption with two priority classes through the secondary scheduler's core on a
    /// topology (Lingjun by default): topoplace's whole-unit preemption against
    /// kube-scheduler's node by node, on the same seeded arrivals with faults.
    Preemption(preemption::PreemptionArgs),
    /// A job trace resampled from the visible ones to a chosen size mix (GPU counts and
    /// weights), written as a CSV that `replay jobs --jobs` reads.
    Generate(generate::GenerateArgs),
    /// An openb pod list resampled to a chosen share of GPU sharing (the FGD paper's
    /// `gpushare` variants; 100 makes every GPU pod share a GPU), written as a CSV that
    /// `replay pods --pods` reads.
    GeneratePods(generate_pods::GeneratePodsArgs),
}

/// The flags of `topoplace replay` before the subcommands: both replays' flags in one
/// struct, the job replay's switched on by `--jobs`.
#[derive(Debug, Args)]
pub struct LegacyArgs {
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
    #[command(flatten)]
    pub report: ReportArgs,
}

impl LegacyArgs {
    /// The subcommand this spelling means, with its flags.
    fn refine(&self) -> ReplayKind {
        let a = self;
        match &a.jobs {
            Some(jobs) => ReplayKind::Jobs(JobsArgs {
                jobs: Some(jobs.clone()),
                topology: a.topology.clone(),
                cluster: a.cluster.clone(),
                gpu_product: a.gpu_product.clone(),
                policy: a.policy.clone(),
                seed_base: a.seed_base,
                load: a.load,
                queue: a.queue,
                rack_wait: a.rack_wait,
                demand_half_life: topoplace_replay::jobs::DEMAND_HALF_LIFE_S_DEFAULT,
                drain: a.drain.clone(),
                rack_products: a.rack_products.clone(),
                report: a.report.clone(),
            }),
            None => ReplayKind::Pods(PodsArgs {
                nodes: a.nodes.clone(),
                pods: a.pods.clone(),
                policy: a.policy.clone(),
                seeds: a.seeds,
                seed_base: a.seed_base,
                ratio: a.ratio,
                report: a.report.clone(),
            }),
        }
    }
}

/// Runs the replay the arguments name, writing the report to `out`.
pub fn run(args: &ReplayArgs, out: &mut dyn std::io::Write) -> Result<(), CliError> {
    match args.kind.as_ref() {
        Some(ReplayKind::Pods(pods)) => pods::run(pods, out),
        Some(ReplayKind::Jobs(jobs)) => jobs::run(jobs, out),
        Some(ReplayKind::Preemption(args)) => preemption::run(args, out),
        Some(ReplayKind::Generate(args)) => generate::run(args, out),
        Some(ReplayKind::GeneratePods(args)) => generate_pods::run(args, out),
        None => match args.legacy.refine() {
            ReplayKind::Pods(pods) => pods::run(&pods, out),
            ReplayKind::Jobs(jobs) => jobs::run(&jobs, out),
            ReplayKind::Preemption(args) => preemption::run(&args, out),
            ReplayKind::Generate(args) => generate::run(&args, out),
            ReplayKind::GeneratePods(args) => generate_pods::run(&args, out),
        },
    }
}
