//! The command line: clap definitions, reading inputs, calling the core, rendering.
//! Errors are sorted into bad input (exit 2) and everything else (exit 1) here, once;
//! `main` only prints them.

pub mod output;
pub mod remote;
pub mod replay;
pub mod serve;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use thiserror::Error;

use topoplace_engine::ledger::Ledger;
use topoplace_engine::placement::exact::{Backend, ExactConfig, AUTO_VARIABLES_MAX};
use topoplace_engine::placement::{shapes_for, Planner, PlannerConfig, SolverChoice, Weights};
use topoplace_engine::topology::Cluster;
use topoplace_engine::workload::{size_model, Gang, ModelSpec, Workload, RUNTIME_OVERHEAD_DEFAULT};
use topoplace_formats::files::{self, FileError};

pub const DEMO_CLUSTER: &str = include_str!("../../testdata/clusters/demo.yaml");
pub const DEMO_WORKLOAD: &str = include_str!("../../testdata/workloads/demo.yaml");

#[derive(Debug, Parser)]
#[command(name = "topoplace", version, about = "Topology-aware gang placement of GPU workloads")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Plan a workload onto a cluster (the embedded demo when no files are given).
    Plan(PlanArgs),
    /// Replay real traces under placement policies: `pods` (the FGD paper's GPU-sharing
    /// protocol) or `jobs` (gangs in time on a topology).
    Replay(replay::ReplayArgs),
    /// Run the kube-scheduler extender (filter, prioritize, preempt, bind) over HTTP.
    Serve(serve::ServeArgs),
    /// Run the secondary scheduler for pods with `schedulerName: topoplace` (with the
    /// extender's HTTP endpoints and the gRPC API over the same ledger).
    Scheduler(serve::ServeArgs),
    /// Convert public cluster data into a cluster file (printed to stdout).
    Convert {
        #[command(subcommand)]
        source: ConvertSource,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConvertSource {
    /// Alibaba Lingjun 2023 `topo.csv` (ip,DSW,PSW,ASW): a three-tier Clos network.
    Lingjun {
        /// Path to topo.csv.
        path: PathBuf,
        /// GPU product of every host (the data names none).
        #[arg(long, default_value = "H800")]
        gpu_product: String,
        /// GPUs per host.
        #[arg(long, default_value_t = 8)]
        gpus_per_host: u8,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum OutputFormat {
    Table,
    Json,
    Yaml,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum SolverFlag {
    /// The fast heuristic planner.
    Greedy,
    /// The exact MILP over the greedy planner's candidates (greedy only where it gives no answer).
    Exact,
    /// Greedy, plus exact where the model is small enough; the better score wins.
    Auto,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// Cluster file (kind: Cluster); the embedded demo cluster when absent.
    #[arg(long)]
    pub cluster: Option<PathBuf>,
    /// Workload file (kind: Workload); the embedded demo workload when absent.
    #[arg(long)]
    pub workload: Option<PathBuf>,
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
    /// Per gang: rejected hosts and domains with reasons, the candidates, and the
    /// winner's score components against the runner-up.
    #[arg(long)]
    pub explain: bool,
    #[arg(long, value_enum, default_value_t = SolverFlag::Greedy)]
    pub solver: SolverFlag,
    /// MILP backend for exact and auto: microlp (always built) or highs (`--features highs`).
    #[arg(long, default_value = "microlp")]
    pub backend: String,
    /// Time limit of one exact solve, in milliseconds.
    #[arg(long, default_value_t = 2_000)]
    pub time_limit_ms: u64,
    /// Score weights, e.g. `locality=4,memory=2,fragmentation=2,connectivity=1`.
    #[arg(long)]
    pub weights: Option<String>,
    /// Instead of planning: which GPU products of the cluster hold this model, and with
    /// how many GPUs (parameter count, e.g. 405B).
    #[arg(long, value_name = "PARAMETERS")]
    pub size_model: Option<String>,
    /// Model dtype for --size-model.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// KV cache per replica for --size-model (e.g. 80Gi).
    #[arg(long, default_value = "0")]
    pub kv_cache: String,
    /// Runtime overhead for --size-model, as a fraction.
    #[arg(long, default_value_t = RUNTIME_OVERHEAD_DEFAULT)]
    pub overhead: f64,
    /// Plan against a running `topoplace serve` through its gRPC API instead of a cluster
    /// file: `http://HOST:PORT`, `https://HOST:PORT`, or `HOST:PORT`.
    #[arg(long, value_name = "ADDR", conflicts_with_all = ["cluster", "size_model", "weights"])]
    pub server: Option<String>,
    /// With --server: hold the placed GPUs as a reservation instead of a dry run.
    #[arg(long, requires = "server")]
    pub reserve: bool,
    /// With --reserve: hold the gangs that fit even when some do not (default: all or nothing).
    #[arg(long, requires = "reserve")]
    pub allow_partial: bool,
    /// With --reserve: seconds the reservation holds (default: the server's).
    #[arg(long, requires = "reserve")]
    pub ttl: Option<u32>,
    /// With --server: the namespace of the gangs (reservations are per namespace/name).
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// With --server: file holding the bearer token for reserving (default: $TOPOPLACE_TOKEN).
    #[arg(long, requires = "server")]
    pub token_file: Option<PathBuf>,
    /// With --server: PEM CA that signed the server's certificate (implies TLS).
    #[arg(long, requires = "server")]
    pub ca: Option<PathBuf>,
    /// With --server: client certificate for mutual TLS (PEM).
    #[arg(long, requires_all = ["server", "client_key"])]
    pub client_cert: Option<PathBuf>,
    /// PEM key of --client-cert.
    #[arg(long, requires = "client_cert")]
    pub client_key: Option<PathBuf>,
}

#[derive(Debug, Error)]
pub enum CliError {
    /// The user's input is wrong: exit 2.
    #[error("{0}")]
    Input(String),
    /// Anything else: exit 1.
    #[error("{0}")]
    Failed(String),
}

impl From<FileError> for CliError {
    fn from(error: FileError) -> Self {
        CliError::Input(error.to_string())
    }
}

impl CliError {
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Input(_) => 2,
            CliError::Failed(_) => 1,
        }
    }
}

pub fn run(cli: Cli, out: &mut dyn Write) -> Result<(), CliError> {
    match cli.command {
        Command::Plan(args) => plan(&args, out),
        Command::Replay(args) => replay::run(&args, out),
        Command::Serve(args) => serve::serve(&args),
        Command::Scheduler(mut args) => {
            args.scheduling.scheduler = true;
            serve::serve(&args)
        }
        Command::Convert { source: ConvertSource::Lingjun { path, gpu_product, gpus_per_host } } => {
            let text = files::read_input(&path)?;
            let spec =
                topoplace_formats::convert::lingjun(&path.display().to_string(), &text, &gpu_product, gpus_per_host)
                    .map_err(|e| CliError::Input(e.to_string()))?;
            // Build it once so a converter bug cannot print an unusable file.
            Cluster::build(spec.clone()).map_err(|e| CliError::Failed(format!("converted cluster is invalid: {e}")))?;
            let yaml = files::cluster::render(&spec).map_err(|e| CliError::Failed(e.to_string()))?;
            let header = format!(
                "# Generated by `topoplace convert lingjun {} --gpu-product {gpu_product} --gpus-per-host {gpus_per_host}`\n\
                 # from alibaba/alibaba-lingjun-dataset-2023 data/topo.csv (Apache-2.0). {} hosts.\n",
                path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
                spec.nodes.len()
            );
            write_all(out, &format!("{header}{yaml}"))
        }
    }
}

/// Runs `work` on every item on `threads` scoped workers (default: all cores), taking
/// items in order as workers free up; the results come back in item order.
fn parallel_map<T: Sync, R: Send>(
    items: &[T],
    threads: Option<usize>,
    work: impl Fn(&T) -> R + Sync,
) -> Result<Vec<R>, CliError> {
    let workers =
        threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).min(items.len()).max(1);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: std::sync::Mutex<Vec<Option<R>>> = std::sync::Mutex::new((0..items.len()).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(item) = items.get(index) else { break };
                let result = work(item);
                if let Ok(mut slots) = results.lock() {
                    slots[index] = Some(result);
                }
            });
        }
    });
    let slots = results.into_inner().map_err(|_| CliError::Failed("a worker thread panicked".into()))?;
    slots
        .into_iter()
        .map(|slot| slot.ok_or_else(|| CliError::Failed("a worker thread stopped before finishing its item".into())))
        .collect()
}

fn write_all(out: &mut dyn Write, text: &str) -> Result<(), CliError> {
    out.write_all(text.as_bytes()).map_err(|e| CliError::Failed(format!("cannot write output: {e}")))
}

/// Reads the cluster file, or the embedded demo. A product missing from the table is named
/// on stderr with what was assumed for it.
pub fn load_cluster(path: &Option<PathBuf>) -> Result<Cluster, CliError> {
    let cluster = match path {
        Some(path) => files::cluster::load(&path.display().to_string(), &files::read_input(path)?)?,
        None => files::cluster::load("<embedded demo cluster>", DEMO_CLUSTER)?,
    };
    // Shared replicas of a product the table lacks are named by that product.
    let mut unknown: Vec<_> =
        cluster.products().into_iter().map(|p| p.whole_gpu()).filter(|p| p.is_unknown()).collect();
    unknown.sort();
    unknown.dedup();
    for product in unknown {
        let hosts = cluster.hosts.iter().filter(|h| h.product.whole_gpu() == product).count();
        eprintln!(
            "warning: GPU product `{}` ({hosts} node(s)) is not in the product table: planned from its gpu.memory \
             with no NVLink assumed",
            product.get().name
        );
    }
    Ok(cluster)
}

pub fn load_workload(path: &Option<PathBuf>) -> Result<Workload, CliError> {
    match path {
        Some(path) => Ok(files::workload::parse(&path.display().to_string(), &files::read_input(path)?)?),
        None => Ok(files::workload::parse("<embedded demo workload>", DEMO_WORKLOAD)?),
    }
}

fn plan(args: &PlanArgs, out: &mut dyn Write) -> Result<(), CliError> {
    if let Some(server) = &args.server {
        return remote::plan(args, server, out);
    }
    let cluster = load_cluster(&args.cluster)?;
    if let Some(parameters) = &args.size_model {
        let model = ModelSpec {
            parameters: topoplace_engine::quantity::parse_parameters(parameters)
                .map_err(|e| CliError::Input(format!("--size-model: {e}")))?,
            dtype_eighths: topoplace_engine::quantity::dtype_bytes_eighths(&args.dtype)
                .map_err(|e| CliError::Input(format!("--dtype: {e}")))?,
            dtype: args.dtype.clone(),
            kv_cache_bytes: topoplace_engine::quantity::parse_bytes(&args.kv_cache)
                .map_err(|e| CliError::Input(format!("--kv-cache: {e}")))?,
            overhead: args.overhead,
        };
        if !(0.0..=10.0).contains(&args.overhead) {
            return Err(CliError::Input(format!("--overhead {} must be between 0 and 10", args.overhead)));
        }
        let rows = size_model(&model, &cluster);
        return write_all(out, &output::render_sizing(&model, &rows, args.output)?);
    }
    let workload = load_workload(&args.workload)?;
    let weights = match &args.weights {
        Some(text) => Weights::parse(text).map_err(|e| CliError::Input(format!("--weights: {e}")))?,
        None => Weights::default(),
    };
    let replicas = workload.replicas();
    let gangs: Vec<Gang> = replicas.iter().flat_map(|r| r.gangs().cloned()).collect();
    let config = PlannerConfig { weights, shapes: shapes_for(&gangs), explain: args.explain };
    let mut planner = Planner::new(&cluster, config);
    for replica in &replicas {
        planner.check_replica(replica).map_err(|e| CliError::Input(format!("{}: {e}", workload_name(args))))?;
    }
    let backend = Backend::parse(&args.backend).map_err(|e| CliError::Input(format!("--backend: {e}")))?;
    let exact = ExactConfig {
        backend,
        time_limit: Duration::from_millis(args.time_limit_ms),
        variables_max: (args.solver == SolverFlag::Auto).then_some(AUTO_VARIABLES_MAX),
        ..ExactConfig::default()
    };
    let solver = match args.solver {
        SolverFlag::Greedy => SolverChoice::Greedy,
        SolverFlag::Exact => SolverChoice::Exact(exact),
        SolverFlag::Auto => SolverChoice::Auto(exact),
    };
    let mut ledger = Ledger::new(&cluster);
    let plan = planner.plan_replicas(&mut ledger, &replicas, &solver);
    ledger.check().map_err(|e| CliError::Failed(format!("internal error, ledger invariant broken: {e}")))?;
    let report = output::PlanReport::new(&cluster, &workload, &replicas, &plan, &ledger, &weights, args.solver);
    write_all(out, &output::render_plan(&report, args.output, args.explain)?)
}

fn workload_name(args: &PlanArgs) -> String {
    args.workload.as_ref().map_or("<embedded demo workload>".into(), |p| p.display().to_string())
}
