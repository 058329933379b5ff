//! `topoplace replay pods`: reads the trace CSVs, runs every (policy, seed) pair of the
//! replay on all cores with a progress bar, and renders the table, CSV, JSON and SVG chart.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use super::common::{chosen_policies, ReplayFormat, ReportArgs, SEED_BASE_DEFAULT};
use super::svg::{escape, BOTTOM, HEIGHT, LEFT_PANEL_X, LEGEND_X, PANEL_WIDTH, RIGHT_PANEL_X, TOP, WIDTH};
use crate::cli::{parallel_map, write_all, CliError};
use topoplace_formats::convert::traces_dir;
use topoplace_formats::files;
use topoplace_replay::pods::{
    self, Arrivals, Policy, Prepared, RunOutcome, Trace, ARRIVED_PCT_MAX, LOAD_RATIO_DEFAULT,
};
use topoplace_replay::traces::openb;

/// Arrived-load columns the table shows.
const TABLE_COLUMNS: [usize; 4] = [100, 110, 120, 130];

/// `topoplace replay pods`: the FGD paper's protocol on the Alibaba GPU-sharing trace (pods
/// that ask for whole GPUs or a share of one arrive in a seeded order and never leave).
#[derive(Debug, Args)]
pub struct PodsArgs {
    /// Node list CSV (sn,cpu_milli,memory_mib,gpu,model); default: the shared trace's
    /// openb_node_list_gpu_node.csv.
    #[arg(long)]
    pub nodes: Option<PathBuf>,
    /// Pod list CSV (name,cpu_milli,memory_mib,num_gpu,gpu_milli[,gpu_spec]); default: the
    /// shared trace's openb_pod_list_default.csv.
    #[arg(long)]
    pub pods: Option<PathBuf>,
    /// Policies, comma-separated (default: all): random, dotproduct, gpuclustering,
    /// gpupacking, bestfit, fgd, topoplace.
    #[arg(long, value_delimiter = ',')]
    pub policy: Vec<String>,
    /// Seeds per policy: SEED_BASE, SEED_BASE+1, ...
    #[arg(long, default_value_t = 10)]
    pub seeds: u64,
    /// First seed.
    #[arg(long, default_value_t = SEED_BASE_DEFAULT)]
    pub seed_base: u64,
    /// Arrived GPU request to replay, as a multiple of the cluster's GPU capacity.
    #[arg(long, default_value_t = LOAD_RATIO_DEFAULT)]
    pub ratio: f64,
    #[command(flatten)]
    pub report: ReportArgs,
}

fn default_trace_file(name: &str) -> PathBuf {
    traces_dir().join("alibaba-gpu-v2023").join(name)
}

pub fn run(args: &PodsArgs, out: &mut dyn std::io::Write) -> Result<(), CliError> {
    let policies = chosen_policies(&args.policy, &Policy::ALL)?;
    if args.seeds == 0 {
        return Err(CliError::Input("--seeds must be at least 1".into()));
    }
    if args.report.threads == Some(0) {
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
    let outcomes = run_all(&prepared, &arrivals, &policies, args.report.threads)?;
    let summary = Summary::new(&policies, &outcomes, &prepared, &pods_name, args.ratio);
    if let Some(path) = &args.report.svg {
        std::fs::write(path, chart(&summary))
            .map_err(|e| CliError::Failed(format!("cannot write {}: {e}", path.display())))?;
    }
    let text = match args.report.output {
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

// ---- the chart: GPU allocation against arrived load, one line per policy (the mean over
// seeds), the whole run on the left and the saturated end zoomed on the right.

/// Where the zoomed panel starts, in arrived percent.
const ZOOM_FROM: usize = 80;
const COLOURS: [&str; 8] = ["#7f7f7f", "#9467bd", "#8c564b", "#e377c2", "#1f77b4", "#ff7f0e", "#d62728", "#2ca02c"];

/// A plot area and the data ranges it shows.
struct Panel {
    left: f64,
    x_range: (f64, f64),
    y_range: (f64, f64),
    x_step: usize,
    y_step: f64,
}

impl Panel {
    fn x(&self, arrived: f64) -> f64 {
        self.left + (arrived - self.x_range.0) / (self.x_range.1 - self.x_range.0) * PANEL_WIDTH
    }

    fn y(&self, allocation: f64) -> f64 {
        let plot_h = HEIGHT - TOP - BOTTOM;
        TOP + (1.0 - (allocation - self.y_range.0) / (self.y_range.1 - self.y_range.0)) * plot_h
    }

    fn draw(&self, svg: &mut String, summary: &Summary) {
        let bottom = HEIGHT - BOTTOM;
        for tick in (self.x_range.0 as usize..=self.x_range.1 as usize).step_by(self.x_step) {
            let px = self.x(tick as f64);
            svg.push_str(&format!(
                "<line x1=\"{px:.1}\" y1=\"{TOP}\" x2=\"{px:.1}\" y2=\"{bottom:.1}\" stroke=\"#e6e6e6\"/>\
                 <text x=\"{px:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{tick}</text>\n",
                bottom + 16.0
            ));
        }
        let mut tick = self.y_range.0;
        while tick <= self.y_range.1 + 1e-9 {
            let py = self.y(tick);
            svg.push_str(&format!(
                "<line x1=\"{:.1}\" y1=\"{py:.1}\" x2=\"{:.1}\" y2=\"{py:.1}\" stroke=\"#e6e6e6\"/>\
                 <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{tick}</text>\n",
                self.left,
                self.left + PANEL_WIDTH,
                self.left - 6.0,
                py + 4.0
            ));
            tick += self.y_step;
        }
        for (index, policy) in summary.policies.iter().enumerate() {
            let points: Vec<String> = policy
                .mean_curve
                .iter()
                .enumerate()
                .filter(|&(arrived, _)| arrived as f64 >= self.x_range.0)
                .filter_map(|(arrived, value)| {
                    value.map(|v| format!("{:.1},{:.1}", self.x(arrived as f64), self.y(v.max(self.y_range.0))))
                })
                .collect();
            svg.push_str(&format!(
                "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.6\" points=\"{}\"/>\n",
                COLOURS[index % COLOURS.len()],
                points.join(" ")
            ));
        }
        svg.push_str(&format!(
            "<rect x=\"{}\" y=\"{TOP}\" width=\"{PANEL_WIDTH}\" height=\"{:.1}\" fill=\"none\" stroke=\"#333\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">arrived GPU request (% of capacity)</text>\n",
            self.left,
            HEIGHT - TOP - BOTTOM,
            self.left + PANEL_WIDTH / 2.0,
            HEIGHT - 14.0
        ));
    }
}

/// The zoomed panel's allocation range: whole points around the curves past `ZOOM_FROM`.
fn zoom_range(summary: &Summary) -> (f64, f64) {
    let values: Vec<f64> =
        summary.policies.iter().flat_map(|p| p.mean_curve.iter().skip(ZOOM_FROM).flatten().copied()).collect();
    let low = values.iter().copied().fold(f64::INFINITY, f64::min);
    let high = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !low.is_finite() || !high.is_finite() {
        return (0.0, 100.0);
    }
    ((low - 1.0).floor().max(0.0), (high + 1.0).ceil().min(100.0))
}

fn chart(summary: &Summary) -> String {
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{LEFT_PANEL_X}\" y=\"22\" font-size=\"14\">GPU allocation (% of capacity) vs arrived load: {} \
         ({} nodes, {} GPUs, mean of {} seeds)</text>\n\
         <text x=\"{RIGHT_PANEL_X}\" y=\"{:.1}\" fill=\"#555\">zoomed: from {ZOOM_FROM}% arrived</text>\n",
        escape(summary.pods.rsplit('/').next().unwrap_or(&summary.pods)),
        summary.nodes,
        summary.gpus,
        summary.seeds.len(),
        TOP - 4.0
    );
    let whole = Panel {
        left: LEFT_PANEL_X,
        x_range: (0.0, ARRIVED_PCT_MAX as f64),
        y_range: (0.0, 100.0),
        x_step: 20,
        y_step: 10.0,
    };
    let (low, high) = zoom_range(summary);
    let zoomed = Panel {
        left: RIGHT_PANEL_X,
        x_range: (ZOOM_FROM as f64, ARRIVED_PCT_MAX as f64),
        y_range: (low, high),
        x_step: 10,
        y_step: ((high - low) / 10.0).ceil().max(1.0),
    };
    whole.draw(&mut svg, summary);
    zoomed.draw(&mut svg, summary);
    for (index, policy) in summary.policies.iter().enumerate() {
        let colour = COLOURS[index % COLOURS.len()];
        let label_y = TOP + 14.0 + 20.0 * index as f64;
        let last = policy.mean_curve.last().copied().flatten().map_or("-".to_string(), |v| format!("{v:.2}%"));
        svg.push_str(&format!(
            "<line x1=\"{LEGEND_X}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"{colour}\" stroke-width=\"3\"/>\
             <text x=\"{:.1}\" y=\"{label_y:.1}\">{} {last}</text>\n",
            label_y - 4.0,
            LEGEND_X + 20.0,
            label_y - 4.0,
            LEGEND_X + 26.0,
            escape(&policy.policy)
        ));
    }
    svg.push_str("</svg>\n");
    svg
}
