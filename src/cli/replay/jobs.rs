//! `topoplace replay jobs`: a job trace (ElasticFlow CSV) replayed in time on a cluster
//! (the Lingjun topology by default), every policy on its own worker thread, rendered as a
//! table, CSV or JSON and an SVG chart.

use std::path::PathBuf;

use serde::Serialize;

use clap::{Args, ValueEnum};

use super::common::{chosen_policies, ReplayFormat, ReportArgs, SEED_BASE_DEFAULT};
use super::svg::{escape, BOTTOM, HEIGHT, LEFT_PANEL_X, PANEL_WIDTH, RIGHT_PANEL_X, TOP, WIDTH};
use crate::cli::{parallel_map, write_all, CliError};
use topoplace_engine::topology::{product, Cluster};
use topoplace_formats::convert::traces_dir;
use topoplace_formats::files;
use topoplace_replay::jobs::{Drain, JobOutcome, JobPolicy, QueueMode, SimConfig};
use topoplace_replay::traces::elasticflow;

fn default_jobs_topology() -> PathBuf {
    traces_dir().join("lingjun-2023").join("topo.csv")
}

fn default_jobs_trace() -> PathBuf {
    traces_dir().join("elasticflow").join("cluster02.csv")
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

/// `topoplace replay jobs`: gangs in time on a topology (arrive, queue, run, leave).
#[derive(Debug, Args)]
pub struct JobsArgs {
    /// A job trace CSV (job_id,submission_time,duration,num_gpu); default: the shared
    /// elasticflow/cluster02.csv.
    #[arg(long, value_name = "CSV")]
    pub jobs: Option<PathBuf>,
    /// Lingjun-format topology (ip,DSW,PSW,ASW); default: the shared lingjun-2023/topo.csv,
    /// 8 GPUs per host.
    #[arg(long, value_name = "CSV", conflicts_with = "cluster")]
    pub topology: Option<PathBuf>,
    /// A cluster file (kind: Cluster) instead of a Lingjun topology.
    #[arg(long, value_name = "FILE")]
    pub cluster: Option<PathBuf>,
    /// GPU product of the Lingjun hosts.
    #[arg(long, default_value = "H800")]
    pub gpu_product: String,
    /// Policies, comma-separated (default: all): topoplace, kueue-tas, volcano-hypernode,
    /// bestfit-nodes, first-fit, random.
    #[arg(long, value_delimiter = ',')]
    pub policy: Vec<String>,
    /// The seed of the random policy.
    #[arg(long, default_value_t = SEED_BASE_DEFAULT)]
    pub seed_base: u64,
    /// Arrival times are divided by this (2: the same jobs arrive twice as fast).
    #[arg(long, default_value_t = 1.0)]
    pub load: f64,
    #[arg(long, value_enum, default_value_t = QueueFlag::StrictFifo)]
    pub queue: QueueFlag,
    /// topoplace with best-effort-fifo: seconds a gang that fits no single rack waits for
    /// one, the rack held clear of later jobs meanwhile (0: place it at once).
    #[arg(long, value_name = "SECONDS", default_value_t = topoplace_replay::jobs::RACK_WAIT_S_DEFAULT)]
    pub rack_wait: u64,
    /// topoplace: the half-life, in replay seconds, of the engine's memory of arrivals (the
    /// demand whose free shapes it protects, with the jobs waiting).
    #[arg(long, value_name = "SECONDS", default_value_t = topoplace_replay::jobs::DEMAND_HALF_LIFE_S_DEFAULT)]
    pub demand_half_life: u64,
    /// Take a rack, block or host out of service at a time, e.g. `G6/P10/S14@86400` (seconds
    /// after the first arrival); its jobs restart elsewhere.
    #[arg(long, value_name = "TARGET@SECONDS")]
    pub drain: Vec<String>,
    /// GPU products given to racks in turn (a mixed cluster), e.g. `H800,A100-80GB`;
    /// baselines try them in this order.
    #[arg(long, value_delimiter = ',')]
    pub rack_products: Vec<String>,
    #[command(flatten)]
    pub report: ReportArgs,
}

/// `RACK@SECONDS`.
fn parse_drain(text: &str) -> Result<Drain, CliError> {
    let (target, at) = text
        .rsplit_once('@')
        .ok_or_else(|| CliError::Input(format!("--drain `{text}`: expected TARGET@SECONDS, e.g. G6/P10/S14@86400")))?;
    let at_s = at.trim().parse().map_err(|_| {
        CliError::Input(format!("--drain `{text}`: `{at}` is not a whole number of seconds after the first arrival"))
    })?;
    if target.trim().is_empty() {
        return Err(CliError::Input(format!("--drain `{text}`: no rack, block or host named before `@`")));
    }
    Ok(Drain { target: target.trim().to_string(), at_s })
}

fn load_cluster(args: &JobsArgs) -> Result<(Cluster, String), CliError> {
    let (file, mut spec) = match &args.cluster {
        Some(path) => {
            let file = path.display().to_string();
            (file.clone(), files::cluster::parse(&file, &files::read_input(path)?)?)
        }
        None => {
            let path = args.topology.clone().unwrap_or_else(default_jobs_topology);
            let file = path.display().to_string();
            let text = files::read_input(&path)?;
            let spec = topoplace_formats::convert::lingjun(&file, &text, &args.gpu_product, 8)
                .map_err(|e| CliError::Input(e.to_string()))?;
            (file, spec)
        }
    };
    if !args.rack_products.is_empty() {
        let products = args
            .rack_products
            .iter()
            .map(|name| {
                product::lookup(name.trim())
                    .ok_or_else(|| CliError::Input(format!("--rack-products: unknown GPU product `{name}`")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        topoplace_replay::jobs::products_per_rack(&mut spec, &products).map_err(|e| CliError::Input(e.to_string()))?;
    }
    let cluster = Cluster::build(spec).map_err(|e| CliError::Input(format!("{file}: {e}")))?;
    Ok((cluster, file))
}

pub fn run(args: &JobsArgs, out: &mut dyn std::io::Write) -> Result<(), CliError> {
    let jobs_path = &args.jobs.clone().unwrap_or_else(default_jobs_trace);
    let policies = chosen_policies(&args.policy, &JobPolicy::ALL)?;
    if args.report.threads == Some(0) {
        return Err(CliError::Input("--threads must be at least 1".into()));
    }
    let jobs_file = jobs_path.display().to_string();
    let jobs = elasticflow::parse_jobs(&jobs_file, &files::read_input(jobs_path)?)?;
    let (cluster, cluster_file) = load_cluster(args)?;
    let config = SimConfig {
        load_factor: args.load,
        queue: args.queue.into(),
        drains: args.drain.iter().map(|d| parse_drain(d)).collect::<Result<_, _>>()?,
        seed: args.seed_base,
        rack_wait_s: args.rack_wait,
        demand_half_life_s: args.demand_half_life,
    };
    // Input problems (host sizes, job shapes, drain targets) are the same for every
    // policy: check them once so they are reported as bad input, not as a failed run.
    topoplace_replay::jobs::validate(&cluster, &jobs, &config)
        .map_err(|e| CliError::Input(format!("{jobs_file}: {e}")))?;
    let results = parallel_map(&policies, args.report.threads, |&policy| {
        topoplace_replay::jobs::simulate(&cluster, &jobs, policy, &config)
    })?
    .into_iter()
    .map(|r| r.map_err(|e| CliError::Failed(e.to_string())))
    .collect::<Result<Vec<JobOutcome>, _>>()?;
    let report = JobReport::new(&jobs_file, &cluster_file, &cluster, &config, results);
    if let Some(path) = &args.report.svg {
        std::fs::write(path, jobs_chart(&report))
            .map_err(|e| CliError::Failed(format!("cannot write {}: {e}", path.display())))?;
    }
    let text = match args.report.output {
        ReplayFormat::Table => report.table(),
        ReplayFormat::Csv => report.csv(),
        ReplayFormat::Json => {
            serde_json::to_string_pretty(&report).map_err(|e| CliError::Failed(e.to_string()))? + "\n"
        }
    };
    write_all(out, &text)
}

#[derive(Debug, Serialize)]
pub struct JobReport {
    pub jobs_file: String,
    pub cluster: String,
    pub hosts: usize,
    pub gpus: u64,
    pub racks: usize,
    pub blocks: usize,
    pub load_factor: f64,
    pub queue: topoplace_replay::jobs::QueueMode,
    pub drains: Vec<String>,
    pub seed: u64,
    pub results: Vec<JobOutcome>,
}

impl JobReport {
    fn new(
        jobs_file: &str,
        cluster_file: &str,
        cluster: &Cluster,
        config: &SimConfig,
        results: Vec<JobOutcome>,
    ) -> Self {
        let levels = cluster.domains.len();
        JobReport {
            jobs_file: jobs_file.to_string(),
            cluster: cluster_file.to_string(),
            hosts: cluster.hosts.len(),
            gpus: cluster.total_gpus(),
            racks: cluster.domains.last().map_or(0, Vec::len),
            blocks: if levels >= 2 { cluster.domains[levels - 2].len() } else { 1 },
            load_factor: config.load_factor,
            queue: config.queue,
            drains: config.drains.iter().map(|d| format!("{}@{}", d.target, d.at_s)).collect(),
            seed: config.seed,
            results,
        }
    }

    fn table(&self) -> String {
        let mut text = format!(
            "{}: {} jobs on {} ({} hosts, {} GPUs, {} racks, {} blocks), load x{}, {} queue\n",
            self.jobs_file,
            self.results.first().map_or(0, |r| r.jobs),
            self.cluster,
            self.hosts,
            self.gpus,
            self.racks,
            self.blocks,
            self.load_factor,
            self.queue.name()
        );
        text.push_str(&format!(
            "{:<18}{:>11}{:>10}{:>10}{:>10}{:>11}{:>13}{:>12}{:>10}{:>13}\n",
            "policy",
            "multi-host",
            "one rack",
            "one block",
            "blocks",
            "avoidable",
            "mean wait s",
            "p95 wait s",
            "GPU util",
            "stranded h"
        ));
        for r in &self.results {
            let pct = |n: usize| {
                if r.multi_host_jobs == 0 {
                    "-".to_string()
                } else {
                    format!("{:.1}%", 100.0 * n as f64 / r.multi_host_jobs as f64)
                }
            };
            text.push_str(&format!(
                "{:<18}{:>11}{:>10}{:>10}{:>10}{:>11}{:>13.0}{:>12.0}{:>9.1}%{:>13.1}\n",
                r.policy.name(),
                r.multi_host_jobs,
                pct(r.multi_host_in_one_rack),
                pct(r.multi_host_in_one_block),
                pct(r.multi_host_across_blocks),
                r.multi_host_spans_avoidable,
                r.mean_queue_delay_s,
                r.p95_queue_delay_s,
                100.0 * r.gpu_utilisation,
                r.stranded_64gpu_hours
            ));
        }
        if self.results.iter().any(|r| r.multi_host_jobs > 0) {
            let spare: Vec<String> =
                self.results.iter().map(|r| format!("{} {:.1}", r.policy, r.span_spare_hosts_mean)).collect();
            text.push_str(&format!(
                "avoidable: spread over racks although one rack had room at the start; the other spreads were \
                 forced. Whole free hosts to spare at those starts, mean: {}\n",
                spare.join(", ")
            ));
        }
        let notes: Vec<String> = self
            .results
            .iter()
            .filter(|r| r.rejected + r.never_started + r.drain_restarts > 0)
            .map(|r| {
                format!(
                    "{}: {} rejected (larger than the cluster), {} never started, {} restarted after a drain",
                    r.policy, r.rejected, r.never_started, r.drain_restarts
                )
            })
            .collect();
        for note in notes {
            text.push_str(&note);
            text.push('\n');
        }
        text
    }

    fn csv(&self) -> String {
        let mut text = String::from(
            "policy,jobs,started,multi_host_jobs,multi_host_in_one_rack,multi_host_in_one_block,\
             multi_host_across_blocks,mean_queue_delay_s,p95_queue_delay_s,gpu_utilisation,stranded_64gpu_hours,\
             drain_restarts,never_started,rejected,multi_host_spans_avoidable,span_spare_hosts_mean\n",
        );
        for r in &self.results {
            text.push_str(&format!(
                "{},{},{},{},{},{},{},{:.1},{:.1},{:.4},{:.2},{},{},{},{},{:.2}\n",
                r.policy,
                r.jobs,
                r.started,
                r.multi_host_jobs,
                r.multi_host_in_one_rack,
                r.multi_host_in_one_block,
                r.multi_host_across_blocks,
                r.mean_queue_delay_s,
                r.p95_queue_delay_s,
                r.gpu_utilisation,
                r.stranded_64gpu_hours,
                r.drain_restarts,
                r.never_started,
                r.rejected,
                r.multi_host_spans_avoidable,
                r.span_spare_hosts_mean
            ));
        }
        text
    }
}

// ---- the chart

const SPREAD_COLOURS: [&str; 3] = ["#2ca02c", "#ff7f0e", "#d62728"];
/// Per policy in the job chart: none of them a spread colour.
const POLICY_COLOURS: [&str; 6] = ["#1f77b4", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf"];

/// The job replay: GPU utilisation over time per policy (left) and where each policy put
/// its multi-host jobs (right), with the mean queueing delay beside each bar.
fn jobs_chart(report: &JobReport) -> String {
    let plot_h = HEIGHT - TOP - BOTTOM;
    let bottom = HEIGHT - BOTTOM;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{LEFT_PANEL_X}\" y=\"22\" font-size=\"13\">{}: {} hosts, {} GPUs, load x{}, {}</text>\n",
        escape(report.jobs_file.rsplit('/').next().unwrap_or(&report.jobs_file)),
        report.hosts,
        report.gpus,
        report.load_factor,
        report.queue.name()
    );
    // Left: utilisation (%) against replay hours.
    let hours = report.results.iter().map(|r| r.makespan_s / 3600.0).fold(0.0, f64::max).max(1e-9);
    let peak = report.results.iter().flat_map(|r| r.timeline.iter().copied()).fold(0.0, f64::max);
    let y_max = ((peak * 100.0 / 10.0).ceil() * 10.0).clamp(10.0, 100.0);
    let x = |h: f64| LEFT_PANEL_X + h / hours * PANEL_WIDTH;
    let y = |pct: f64| TOP + (1.0 - pct / y_max) * plot_h;
    for step in 0..=5 {
        let pct = y_max * f64::from(step) / 5.0;
        let hour = hours * f64::from(step) / 5.0;
        svg.push_str(&format!(
            "<line x1=\"{LEFT_PANEL_X}\" y1=\"{py:.1}\" x2=\"{:.1}\" y2=\"{py:.1}\" stroke=\"#e6e6e6\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{pct:.0}</text>\
             <text x=\"{px:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{hour:.1}</text>\n",
            LEFT_PANEL_X + PANEL_WIDTH,
            LEFT_PANEL_X - 6.0,
            y(pct) + 4.0,
            bottom + 16.0,
            py = y(pct),
            px = x(hour),
        ));
    }
    for (index, result) in report.results.iter().enumerate() {
        let slice = result.makespan_s / 3600.0 / result.timeline.len().max(1) as f64;
        let points: Vec<String> = result
            .timeline
            .iter()
            .enumerate()
            .map(|(i, u)| format!("{:.1},{:.1}", x((i as f64 + 0.5) * slice), y(u * 100.0)))
            .collect();
        svg.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.4\" points=\"{}\"/>\n",
            POLICY_COLOURS[index % POLICY_COLOURS.len()],
            points.join(" ")
        ));
    }
    svg.push_str(&format!(
        "<rect x=\"{LEFT_PANEL_X}\" y=\"{TOP}\" width=\"{PANEL_WIDTH}\" height=\"{plot_h:.1}\" fill=\"none\" stroke=\"#333\"/>\n\
         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">hours of replay; GPU utilisation (%)</text>\n",
        LEFT_PANEL_X + PANEL_WIDTH / 2.0,
        HEIGHT - 14.0
    ));
    // Right: one bar per policy, split by where its multi-host jobs landed.
    let row_h = plot_h / report.results.len().max(1) as f64;
    let bar_w = PANEL_WIDTH - 60.0;
    for (index, result) in report.results.iter().enumerate() {
        let top = TOP + row_h * index as f64 + row_h * 0.2;
        let colour = POLICY_COLOURS[index % POLICY_COLOURS.len()];
        svg.push_str(&format!(
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"10\" height=\"10\" fill=\"{colour}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\">{} (mean wait {:.0} s)</text>\n",
            RIGHT_PANEL_X,
            top - 11.0,
            RIGHT_PANEL_X + 14.0,
            top - 2.0,
            escape(result.policy.name()),
            result.mean_queue_delay_s
        ));
        let total = result.multi_host_jobs.max(1) as f64;
        let mut left = RIGHT_PANEL_X;
        for (part, count) in
            [result.multi_host_in_one_rack, result.multi_host_in_one_block, result.multi_host_across_blocks]
                .into_iter()
                .enumerate()
        {
            let width = bar_w * count as f64 / total;
            svg.push_str(&format!(
                "<rect x=\"{left:.1}\" y=\"{top:.1}\" width=\"{width:.1}\" height=\"{:.1}\" fill=\"{}\"/>\n",
                row_h * 0.45,
                SPREAD_COLOURS[part]
            ));
            left += width;
        }
        svg.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\">{:.1}%</text>\n",
            RIGHT_PANEL_X + bar_w + 6.0,
            top + row_h * 0.3,
            100.0 * result.rack_share()
        ));
    }
    for (part, label) in ["in one rack", "one block, several racks", "across blocks"].iter().enumerate() {
        let lx = RIGHT_PANEL_X + [0.0, 110.0, 290.0][part];
        svg.push_str(&format!(
            "<rect x=\"{lx:.1}\" y=\"{:.1}\" width=\"10\" height=\"10\" fill=\"{}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\">{label}</text>\n",
            HEIGHT - 24.0,
            SPREAD_COLOURS[part],
            lx + 14.0,
            HEIGHT - 15.0
        ));
    }
    svg.push_str(&format!(
        "<text x=\"{RIGHT_PANEL_X}\" y=\"{:.1}\" fill=\"#555\">multi-host jobs: share in one rack</text>\n</svg>\n",
        TOP - 22.0
    ));
    svg
}
