//! `topoplace replay generate`: a job trace resampled from the visible ones to a chosen size
//! mix ([`topoplace_replay::jobs::generate`]), written as an ElasticFlow CSV that `replay jobs
//! --jobs` reads.

use std::path::PathBuf;

use clap::Args;

use crate::cli::{write_all, CliError};
use topoplace_formats::convert::traces_dir;
use topoplace_formats::files;
use topoplace_replay::jobs::generate::{generate, GenerateError, GenerateSpec, SizeMix};
use topoplace_replay::jobs::TraceJob;
use topoplace_replay::traces::elasticflow;

/// `topoplace replay generate`: a job trace of a chosen size mix, resampled from real ones.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// GPU counts and their weights, e.g. `1=78,2=7,4=8,8=7,16=0.02` (weights are
    /// normalised).
    #[arg(long)]
    pub mix: String,
    /// Jobs to generate.
    #[arg(long, default_value_t = 10_000)]
    pub count: usize,
    /// The seed of the draws: the same sources, mix, count and seed give the same trace.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Stretch or compress the arrivals so that this many GPUs are busy on average over the
    /// arrival span (the jobs' GPU-hours over its hours); default: the sources' pace.
    #[arg(long, value_name = "GPUS")]
    pub offered_gpus: Option<f64>,
    /// Job trace CSVs to resample (durations per GPU count, inter-arrival gaps); default: the
    /// shared elasticflow/cluster01.csv, cluster02.csv and cluster03.csv.
    #[arg(long, value_name = "CSV", value_delimiter = ',')]
    pub from: Vec<PathBuf>,
    /// Where to write the CSV (default: standard output).
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
}

pub fn run(args: &GenerateArgs, out: &mut dyn std::io::Write) -> Result<(), CliError> {
    let mix = SizeMix::parse(&args.mix).map_err(|e| CliError::Input(format!("--mix: {e}")))?;
    let from: Vec<PathBuf> = if args.from.is_empty() {
        ["cluster01.csv", "cluster02.csv", "cluster03.csv"]
            .iter()
            .map(|f| traces_dir().join("elasticflow").join(f))
            .collect()
    } else {
        args.from.clone()
    };
    let mut sources: Vec<Vec<TraceJob>> = Vec::with_capacity(from.len());
    for path in &from {
        sources.push(elasticflow::parse_jobs(&path.display().to_string(), &files::read_input(path)?)?);
    }
    let slices: Vec<&[TraceJob]> = sources.iter().map(Vec::as_slice).collect();
    let spec = GenerateSpec { count: args.count, seed: args.seed, offered_gpus: args.offered_gpus };
    let jobs = generate(&slices, &mix, spec).map_err(|e| {
        let flag = match e {
            GenerateError::JobCount { .. } => "--count",
            GenerateError::OfferedGpus(_) => "--offered-gpus",
            GenerateError::NoSources => "--from",
            GenerateError::MixEntry { .. } | GenerateError::Mix(_) => "--mix",
        };
        CliError::Input(format!("{flag}: {e}"))
    })?;
    let mut text = String::with_capacity(jobs.len() * 40);
    text.push_str("job_id,submission_time,duration,num_gpu\n");
    for job in &jobs {
        text.push_str(&format!("{},{},{},{}\n", job.id, job.submit_s, job.duration_s, job.gpus));
    }
    let gpu_hours: f64 = jobs.iter().map(|j| f64::from(j.gpus) * j.duration_s as f64 / 3600.0).sum();
    let span_h = jobs.last().map_or(0.0, |j| j.submit_s as f64 / 3600.0);
    let summary = format!(
        "generated {} jobs ({}) over {span_h:.0} h of arrivals, {gpu_hours:.0} GPU-hours, from {}",
        jobs.len(),
        mix.entries()
            .iter()
            .map(|&(gpus, _)| format!("{gpus} GPU: {}", jobs.iter().filter(|j| j.gpus == gpus).count()))
            .collect::<Vec<_>>()
            .join(", "),
        from.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    );
    write_trace(args.output.as_deref(), &text, &summary, out)
}

/// Writes a generated trace to `output` and the summary to `out`, or (no file) the trace to
/// `out` and the summary to standard error, so that piping the trace stays clean.
pub(super) fn write_trace(
    output: Option<&std::path::Path>,
    text: &str,
    summary: &str,
    out: &mut dyn std::io::Write,
) -> Result<(), CliError> {
    match output {
        Some(path) => {
            std::fs::write(path, text).map_err(|e| CliError::Failed(format!("{}: {e}", path.display())))?;
            write_all(out, &format!("{summary}; written to {}\n", path.display()))
        }
        None => {
            write_all(out, text)?;
            eprintln!("{summary}");
            Ok(())
        }
    }
}
