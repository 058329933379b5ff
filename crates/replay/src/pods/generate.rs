//! A pod trace generator: an openb pod list resampled to a chosen share of GPU sharing, after
//! the FGD paper's `gpushare` variants (`openb_pod_list_gpushare40.csv` keeps the default
//! trace's CPU-only pods and draws its GPU pods again so that sharing pods ask for 40 % of
//! the GPU request). With 100 % every GPU pod asks for a share of one GPU; with 0 % none does.
//!
//! Each generated pod is a copy of a source pod (its CPU, memory, GPU count, share and
//! accepted models together, so the resources a real pod asked for stay together), renamed
//! `gen-pod-NNNNNN` in order. The CPU-only pods come at the source's rate, spread evenly,
//! and are the source's own in turn (at the source's pod count, exactly its CPU-only pods).
//! Every other slot is a GPU pod, drawn from the sharing pods with the probability that
//! makes their expected share of the GPU request the one asked for
//! (q = P * W / (P * W + (1 - P) * S), where S and W are the mean GPU request of the
//! source's sharing and whole-GPU pods), then uniformly within the pool. One seeded stream:
//! the same source, share, count and seed give the same trace. The share of the request
//! is met in expectation, not exactly; the generator reports the share it drew.

use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};
use thiserror::Error;

use super::TracePod;

/// Pods one call generates at most.
pub const GENERATED_PODS_MAX: usize = 1_000_000;

/// A bad request. Texts name the value at fault.
#[derive(Debug, Error, PartialEq)]
pub enum PodGenerateError {
    #[error("share of GPU request {0} is not a number in 0..=100")]
    SharePct(f64),
    #[error("pods: {count} is not in 1..={GENERATED_PODS_MAX}")]
    PodCount { count: usize },
    #[error("the source trace has no pods")]
    NoPods,
    #[error("the source trace has no {0} to draw from")]
    EmptyPool(&'static str),
    #[error("pod `{pod}`: a share below one GPU is only for a single-GPU pod (`replay pods` refuses it)")]
    BadPod { pod: String },
}

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ShareSpec {
    /// Percent of the GPU request (milli-GPU) that sharing pods (one GPU, a share below
    /// 1000) ask for, 0..=100.
    pub share_pct: f64,
    /// Pods to generate.
    pub count: usize,
    pub seed: u64,
}

/// The pods of `source` resampled to `spec` (see the module documentation).
///
/// # Errors
/// [`PodGenerateError::SharePct`] outside 0..=100 or not finite;
/// [`PodGenerateError::PodCount`] outside 1..=[`GENERATED_PODS_MAX`];
/// [`PodGenerateError::NoPods`] for an empty source; [`PodGenerateError::BadPod`] for a
/// source pod of several GPUs with a share below 1000; [`PodGenerateError::EmptyPool`] when the
/// source lacks the sharing pods (share above 0) or whole-GPU pods (share below 100) the
/// draw needs, or has only CPU-only pods.
pub fn resample_shares(source: &[TracePod], spec: ShareSpec) -> Result<Vec<TracePod>, PodGenerateError> {
    if !(spec.share_pct.is_finite() && (0.0..=100.0).contains(&spec.share_pct)) {
        return Err(PodGenerateError::SharePct(spec.share_pct));
    }
    if spec.count == 0 || spec.count > GENERATED_PODS_MAX {
        return Err(PodGenerateError::PodCount { count: spec.count });
    }
    if source.is_empty() {
        return Err(PodGenerateError::NoPods);
    }
    if let Some(pod) = source.iter().find(|p| p.num_gpu > 1 && p.gpu_milli > 0 && p.gpu_milli < 1000) {
        return Err(PodGenerateError::BadPod { pod: pod.name.clone() });
    }
    let cpu_only: Vec<&TracePod> = source.iter().filter(|p| p.gpu_request() == 0).collect();
    let shares: Vec<&TracePod> = source.iter().filter(|p| p.is_share()).collect();
    let whole: Vec<&TracePod> = source.iter().filter(|p| p.gpu_request() > 0 && !p.is_share()).collect();
    if shares.is_empty() && whole.is_empty() {
        return Err(PodGenerateError::EmptyPool("GPU pods"));
    }
    let share = spec.share_pct / 100.0;
    if share > 0.0 && shares.is_empty() {
        return Err(PodGenerateError::EmptyPool("sharing pods (one GPU, a share below 1000)"));
    }
    if share < 1.0 && whole.is_empty() {
        return Err(PodGenerateError::EmptyPool("whole-GPU pods"));
    }
    let mean = |pool: &[&TracePod]| {
        if pool.is_empty() {
            0.0
        } else {
            pool.iter().map(|p| p.gpu_request() as f64).sum::<f64>() / pool.len() as f64
        }
    };
    let (mean_share, mean_whole) = (mean(&shares), mean(&whole));
    let share_probability = match share {
        s if s <= 0.0 => 0.0,
        s if s >= 1.0 => 1.0,
        s => s * mean_whole / (s * mean_whole + (1.0 - s) * mean_share),
    };
    // Slot i is CPU-only when the running count of CPU-only slots, floor(i * c / n) for c
    // CPU-only pods of n, steps up: c of every n slots, evenly.
    let (cpu, all) = (cpu_only.len() as u128, source.len() as u128);
    let cpu_slots_before = |slot: u128| slot * cpu / all;
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(spec.seed);
    let mut pods = Vec::with_capacity(spec.count);
    for index in 0..spec.count {
        let slot = index as u128;
        let cpu_before = cpu_slots_before(slot);
        let mut pod = if cpu_slots_before(slot + 1) > cpu_before {
            // The source's CPU-only pods in turn: this is CPU-only slot number `cpu_before`.
            cpu_only[(cpu_before % cpu) as usize].clone()
        } else {
            let pool = if rng.random::<f64>() < share_probability { &shares } else { &whole };
            pool[rng.random_range(0..pool.len())].clone()
        };
        pod.name = format!("gen-pod-{index:06}");
        pods.push(pod);
    }
    Ok(pods)
}

/// Percent of the GPU request of `pods` that sharing pods ask for (0 when none asks for a
/// GPU).
pub fn share_of_request_pct(pods: &[TracePod]) -> f64 {
    let total: u64 = pods.iter().map(TracePod::gpu_request).sum();
    let shared: u64 = pods.iter().filter(|p| p.is_share()).map(TracePod::gpu_request).sum();
    if total == 0 {
        0.0
    } else {
        shared as f64 * 100.0 / total as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, cpu_milli: u64, num_gpu: u8, gpu_milli: u16) -> TracePod {
        TracePod { name: name.into(), cpu_milli, memory_mib: 1024, num_gpu, gpu_milli, gpu_spec: Vec::new() }
    }

    fn source() -> Vec<TracePod> {
        vec![
            pod("cpu", 8000, 0, 0),
            pod("half", 4000, 1, 500),
            pod("small", 2000, 1, 200),
            pod("one", 8000, 1, 1000),
            pod("eight", 64000, 8, 1000),
        ]
    }

    #[test]
    fn every_gpu_pod_shares_at_100_and_none_at_0() {
        let all = resample_shares(&source(), ShareSpec { share_pct: 100.0, count: 2000, seed: 1 }).unwrap();
        assert_eq!(all.len(), 2000);
        assert!(all.iter().all(|p| p.gpu_request() == 0 || (p.num_gpu == 1 && p.gpu_milli < 1000)));
        assert_eq!(share_of_request_pct(&all), 100.0);
        // The CPU-only fraction of the source (1 in 5) is kept exactly.
        assert_eq!(all.iter().filter(|p| p.gpu_request() == 0).count(), 400);
        // At the source's own pod count its CPU-only pods are copied once each.
        let same = resample_shares(&source(), ShareSpec { share_pct: 100.0, count: 5, seed: 1 }).unwrap();
        assert_eq!(same.iter().filter(|p| p.gpu_request() == 0).map(|p| p.cpu_milli).collect::<Vec<_>>(), [8000]);
        // Pods are copies: a 500 share keeps its 4 cores.
        assert!(all.iter().filter(|p| p.gpu_milli == 500).all(|p| p.cpu_milli == 4000));
        assert_eq!(all[7].name, "gen-pod-000007");
        let none = resample_shares(&source(), ShareSpec { share_pct: 0.0, count: 2000, seed: 1 }).unwrap();
        assert_eq!(share_of_request_pct(&none), 0.0);
        assert!(none.iter().any(|p| p.num_gpu == 8));
    }

    #[test]
    fn the_share_of_request_is_met_in_expectation() {
        for pct in [20.0, 40.0, 80.0] {
            let pods = resample_shares(&source(), ShareSpec { share_pct: pct, count: 100_000, seed: 3 }).unwrap();
            let drawn = share_of_request_pct(&pods);
            assert!((drawn - pct).abs() < 1.5, "asked {pct} %, drew {drawn:.2} %");
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_trace() {
        let spec = ShareSpec { share_pct: 40.0, count: 500, seed: 9 };
        assert_eq!(resample_shares(&source(), spec), resample_shares(&source(), spec));
        assert_ne!(resample_shares(&source(), spec), resample_shares(&source(), ShareSpec { seed: 10, ..spec }));
    }

    #[test]
    fn bad_requests_are_refused_naming_the_value() {
        let spec = ShareSpec { share_pct: 50.0, count: 10, seed: 1 };
        for pct in [-1.0, 100.5, f64::NAN, f64::INFINITY] {
            let error = resample_shares(&source(), ShareSpec { share_pct: pct, ..spec }).unwrap_err();
            assert!(matches!(error, PodGenerateError::SharePct(_)), "{pct}");
        }
        for count in [0, GENERATED_PODS_MAX + 1] {
            assert_eq!(
                resample_shares(&source(), ShareSpec { count, ..spec }),
                Err(PodGenerateError::PodCount { count })
            );
        }
        assert_eq!(resample_shares(&[], spec), Err(PodGenerateError::NoPods));
        let whole_only = vec![pod("one", 8000, 1, 1000)];
        assert!(matches!(resample_shares(&whole_only, spec), Err(PodGenerateError::EmptyPool(_))));
        assert!(resample_shares(&whole_only, ShareSpec { share_pct: 0.0, ..spec }).is_ok());
        let shares_only = vec![pod("half", 4000, 1, 500)];
        assert!(matches!(resample_shares(&shares_only, spec), Err(PodGenerateError::EmptyPool(_))));
        assert!(resample_shares(&shares_only, ShareSpec { share_pct: 100.0, ..spec }).is_ok());
        let split_share = vec![pod("one", 8000, 1, 1000), pod("bad", 8000, 2, 500)];
        assert_eq!(
            resample_shares(&split_share, ShareSpec { share_pct: 0.0, ..spec }),
            Err(PodGenerateError::BadPod { pod: "bad".into() })
        );
        let cpu_only = vec![pod("cpu", 8000, 0, 0)];
        assert!(matches!(
            resample_shares(&cpu_only, ShareSpec { share_pct: 0.0, ..spec }),
            Err(PodGenerateError::EmptyPool("GPU pods"))
        ));
    }
}
