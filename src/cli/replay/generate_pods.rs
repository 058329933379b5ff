//! `topoplace replay generate-pods`: an openb pod list resampled to a chosen share of GPU
//! sharing ([`topoplace_replay::pods::generate`]), written as a CSV that `replay pods --pods`
//! reads.

use std::path::PathBuf;

use clap::Args;

use super::generate::write_trace;
use crate::cli::CliError;
use topoplace_formats::convert::traces_dir;
use topoplace_formats::files;
use topoplace_replay::pods::generate::{resample_shares, share_of_request_pct, PodGenerateError, ShareSpec};
use topoplace_replay::traces::openb;

/// `topoplace replay generate-pods`: a pod list with a chosen share of GPU sharing.
#[derive(Debug, Args)]
pub struct GeneratePodsArgs {
    /// Percent of the GPU request that pods sharing one GPU ask for, 0..=100 (100: every
    /// GPU pod shares a GPU; the FGD paper's `gpushare40` is 40).
    #[arg(long, value_name = "PCT")]
    pub share_pct: f64,
    /// Pods to generate (default: as many as the source has).
    #[arg(long)]
    pub count: Option<usize>,
    /// The seed of the draws: the same source, share, count and seed give the same trace.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Pod list CSV to resample; default: the shared trace's openb_pod_list_default.csv.
    #[arg(long, value_name = "CSV")]
    pub from: Option<PathBuf>,
    /// Where to write the CSV (default: standard output).
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
}

pub fn run(args: &GeneratePodsArgs, out: &mut dyn std::io::Write) -> Result<(), CliError> {
    let from =
        args.from.clone().unwrap_or_else(|| traces_dir().join("alibaba-gpu-v2023").join("openb_pod_list_default.csv"));
    let source = openb::parse_pods(&from.display().to_string(), &files::read_input(&from)?)?;
    let spec = ShareSpec { share_pct: args.share_pct, count: args.count.unwrap_or(source.len()), seed: args.seed };
    let pods = resample_shares(&source, spec).map_err(|e| {
        let flag = match e {
            PodGenerateError::SharePct(_) => "--share-pct",
            PodGenerateError::PodCount { .. } if args.count.is_none() => "--count (default: the source's pod count)",
            PodGenerateError::PodCount { .. } => "--count",
            PodGenerateError::NoPods | PodGenerateError::EmptyPool(_) | PodGenerateError::BadPod { .. } => "--from",
        };
        CliError::Input(format!("{flag}: {e}"))
    })?;
    // Through the csv crate, so that a field with a comma or a quote is quoted as the reader
    // expects.
    let mut writer = csv::Writer::from_writer(Vec::with_capacity(pods.len() * 48));
    let write_error = |e: csv::Error| CliError::Failed(format!("cannot write the pod list: {e}"));
    writer
        .write_record(["name", "cpu_milli", "memory_mib", "num_gpu", "gpu_milli", "gpu_spec"])
        .map_err(write_error)?;
    for pod in &pods {
        writer
            .write_record([
                pod.name.clone(),
                pod.cpu_milli.to_string(),
                pod.memory_mib.to_string(),
                pod.num_gpu.to_string(),
                pod.gpu_milli.to_string(),
                pod.gpu_spec.join("|"),
            ])
            .map_err(write_error)?;
    }
    let bytes = writer.into_inner().map_err(|e| CliError::Failed(format!("cannot write the pod list: {e}")))?;
    let text = String::from_utf8(bytes).map_err(|e| CliError::Failed(format!("cannot write the pod list: {e}")))?;
    let gpu_pods = pods.iter().filter(|p| p.gpu_request() > 0).count();
    let summary = format!(
        "generated {} pods ({gpu_pods} with GPUs; sharing pods ask for {:.1} % of the GPU request) from {}",
        pods.len(),
        share_of_request_pct(&pods),
        from.display()
    );
    write_trace(args.output.as_deref(), &text, &summary, out)
}
