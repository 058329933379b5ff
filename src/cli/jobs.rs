//! `topoplace replay --jobs`: a job trace (ElasticFlow CSV) replayed in time on a cluster
//! (the Lingjun topology by default), every policy on its own worker thread, rendered as a
//! table, CSV or JSON and an SVG chart.

use std::path::PathBuf;

use serde::Serialize;

use super::replay::{chosen_policies, ReplayArgs, ReplayFormat};
use super::{parallel_map, write_all, CliError};
use topoplace_engine::topology::{product, Cluster};
use topoplace_formats::convert::traces_dir;
use topoplace_formats::files;
use topoplace_replay::jobs::{Drain, JobOutcome, JobPolicy, SimConfig};
use topoplace_replay::traces::elasticflow;

fn default_jobs_topology() -> PathBuf {
    traces_dir().join("lingjun-2023").join("topo.csv")
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

fn load_cluster(args: &ReplayArgs) -> Result<(Cluster, String), CliError> {
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

pub fn replay_jobs(
    args: &ReplayArgs,
    jobs_path: &std::path::Path,
    out: &mut dyn std::io::Write,
) -> Result<(), CliError> {
    let policies = chosen_policies(&args.policy, &JobPolicy::ALL)?;
    if args.threads == Some(0) {
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
    };
    // Input problems (host sizes, job shapes, drain targets) are the same for every
    // policy: check them once so they are reported as bad input, not as a failed run.
    topoplace_replay::jobs::validate(&cluster, &jobs, &config)
        .map_err(|e| CliError::Input(format!("{jobs_file}: {e}")))?;
    let results = parallel_map(&policies, args.threads, |&policy| {
        topoplace_replay::jobs::simulate(&cluster, &jobs, policy, &config)
    })?
    .into_iter()
    .map(|r| r.map_err(|e| CliError::Failed(e.to_string())))
    .collect::<Result<Vec<JobOutcome>, _>>()?;
    let report = JobReport::new(&jobs_file, &cluster_file, &cluster, &config, results);
    if let Some(path) = &args.svg {
        std::fs::write(path, super::svg::jobs_chart(&report))
            .map_err(|e| CliError::Failed(format!("cannot write {}: {e}", path.display())))?;
    }
    let text = match args.output {
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
