//! A job trace generator: the visible job traces resampled to a chosen size mix, so a policy
//! can be stressed on mixes the visible clusters do not have (78 % 1-GPU jobs, say, where
//! ElasticFlow's cluster03 has 34 %).
//!
//! Each generated job draws its GPU count from the mix (weights, normalised), its duration
//! from the source jobs of that GPU count (the nearest count in the sources when none has it
//! exactly: the smaller of two equally near), and its gap to the previous arrival from the
//! sources' inter-arrival gaps (each source's own consecutive submissions), all with one
//! seeded stream: the same sources, mix, count and seed give the same trace. Arrivals are at
//! the sources' recorded pace, or stretched to an offered load: `offered_gpus` GPUs busy on
//! average over the arrival span (the jobs' GPU-seconds over the span). `replay jobs --load`
//! compresses either as it does any trace.

use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};
use thiserror::Error;

use super::TraceJob;

/// Jobs one call generates at most.
pub const GENERATED_JOBS_MAX: usize = 1_000_000;
/// Entries of a size mix at most.
pub const MIX_ENTRIES_MAX: usize = 64;
/// GPUs of one job at most (the job replay's own bound on a gang).
pub const JOB_GPUS_MAX: u32 = 4096;
/// The offered load's range, GPUs busy on average: past it the arrivals' scaling leaves the
/// range of whole seconds (or of any cluster).
pub const OFFERED_GPUS_MIN: f64 = 0.001;
pub const OFFERED_GPUS_MAX: f64 = 10_000_000.0;

/// A bad mix or request. Texts name the entry at fault.
#[derive(Debug, Error, PartialEq)]
pub enum GenerateError {
    #[error("mix entry `{entry}`: {why}")]
    MixEntry { entry: String, why: &'static str },
    #[error("mix: {0}")]
    Mix(&'static str),
    #[error("jobs: {count} is not in 1..={GENERATED_JOBS_MAX}")]
    JobCount { count: usize },
    #[error("the source traces hold no jobs")]
    NoSources,
    #[error("offered GPUs: {0} is not a number in 0.001..=10000000")]
    OfferedGpus(f64),
}

/// GPU counts with their weights, e.g. `1=78,2=7,4=8,8=7,16=0.02`: each count at most once,
/// weights finite and >= 0, at least one above 0.
#[derive(Debug, Clone, PartialEq)]
pub struct SizeMix {
    entries: Vec<(u32, f64)>,
}

impl SizeMix {
    /// Parses `GPUS=WEIGHT,...`.
    ///
    /// # Errors
    /// [`GenerateError::MixEntry`] naming the entry (not `GPUS=WEIGHT`, GPUs 0 or above
    /// [`JOB_GPUS_MAX`], a weight not a finite number >= 0, a count given twice);
    /// [`GenerateError::Mix`] for no entries, more than [`MIX_ENTRIES_MAX`], or all weights 0.
    pub fn parse(text: &str) -> Result<Self, GenerateError> {
        let mut entries: Vec<(u32, f64)> = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let bad = |why| GenerateError::MixEntry { entry: part.to_string(), why };
            if entries.len() == MIX_ENTRIES_MAX {
                return Err(GenerateError::Mix("more than 64 entries"));
            }
            let (gpus, weight) = part.split_once('=').ok_or_else(|| bad("not GPUS=WEIGHT"))?;
            let gpus: u32 = gpus.trim().parse().map_err(|_| bad("GPUS is not a whole number"))?;
            if gpus == 0 || gpus > JOB_GPUS_MAX {
                return Err(bad("GPUS must be in 1..=4096"));
            }
            let weight: f64 = weight
                .trim()
                .parse()
                .ok()
                .filter(|w: &f64| w.is_finite() && *w >= 0.0)
                .ok_or_else(|| bad("WEIGHT must be a number >= 0"))?;
            if entries.iter().any(|&(g, _)| g == gpus) {
                return Err(bad("this GPU count is already in the mix"));
            }
            entries.push((gpus, weight));
        }
        if entries.is_empty() {
            return Err(GenerateError::Mix("no entries (expected GPUS=WEIGHT,...)"));
        }
        if entries.iter().all(|&(_, w)| w == 0.0) {
            return Err(GenerateError::Mix("every weight is 0"));
        }
        if !entries.iter().map(|&(_, w)| w).sum::<f64>().is_finite() {
            return Err(GenerateError::Mix("the weights add up to more than a number can hold"));
        }
        Ok(SizeMix { entries })
    }

    /// (GPUs, weight) in the order given.
    pub fn entries(&self) -> &[(u32, f64)] {
        &self.entries
    }
}

/// What to generate: how many jobs, the seed, and optionally the offered load.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenerateSpec {
    /// Jobs, 1..=[`GENERATED_JOBS_MAX`].
    pub count: usize,
    pub seed: u64,
    /// GPUs busy on average over the arrival span (arrivals are stretched or compressed to
    /// it); `None` keeps the sources' pace.
    pub offered_gpus: Option<f64>,
}

/// Jobs resampled from `sources` (one slice per trace, any order) to `mix`, ids
/// `gen-{seed}-{n}` from 1, the first arriving at 0 s.
///
/// # Errors
/// [`GenerateError::JobCount`] outside 1..=[`GENERATED_JOBS_MAX`];
/// [`GenerateError::OfferedGpus`] for a load not finite and > 0;
/// [`GenerateError::NoSources`] when the sources hold no job.
pub fn generate(sources: &[&[TraceJob]], mix: &SizeMix, spec: GenerateSpec) -> Result<Vec<TraceJob>, GenerateError> {
    let GenerateSpec { count, seed, offered_gpus } = spec;
    if count == 0 || count > GENERATED_JOBS_MAX {
        return Err(GenerateError::JobCount { count });
    }
    if let Some(gpus) = offered_gpus {
        if !(gpus.is_finite() && (OFFERED_GPUS_MIN..=OFFERED_GPUS_MAX).contains(&gpus)) {
            return Err(GenerateError::OfferedGpus(gpus));
        }
    }
    // Durations by GPU count, and the inter-arrival gaps of every source.
    let mut durations: Vec<(u32, Vec<u64>)> = Vec::new();
    let mut gaps: Vec<u64> = Vec::new();
    for source in sources {
        let mut submits: Vec<u64> = source.iter().map(|j| j.submit_s).collect();
        submits.sort_unstable();
        gaps.extend(submits.windows(2).map(|w| w[1] - w[0]));
        for job in *source {
            match durations.iter_mut().find(|(g, _)| *g == job.gpus) {
                Some((_, list)) => list.push(job.duration_s),
                None => durations.push((job.gpus, vec![job.duration_s])),
            }
        }
    }
    if durations.is_empty() {
        return Err(GenerateError::NoSources);
    }
    if gaps.is_empty() {
        gaps.push(0);
    }
    // Each mix entry's durations: its own GPU count's, or the nearest count's.
    let pools: Vec<(u32, f64, &[u64])> = mix
        .entries
        .iter()
        .map(|&(gpus, weight)| {
            let nearest = durations
                .iter()
                .min_by_key(|(g, _)| (g.abs_diff(gpus), *g))
                .map(|(_, list)| list.as_slice())
                .unwrap_or(&[]);
            (gpus, weight, nearest)
        })
        .collect();
    let total_weight: f64 = pools.iter().map(|p| p.1).sum();
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let mut jobs = Vec::with_capacity(count);
    let mut at = 0u64;
    for n in 1..=count {
        if n > 1 {
            at = at.saturating_add(gaps[rng.random_range(0..gaps.len())]);
        }
        let mut pick = rng.random_range(0.0..total_weight);
        let mut chosen = pools.len() - 1;
        for (index, pool) in pools.iter().enumerate() {
            if pool.1 > 0.0 && pick < pool.1 {
                chosen = index;
                break;
            }
            pick -= pool.1;
        }
        // Rounding can leave `pick` past the last entry: the last with weight takes it.
        if pools[chosen].1 == 0.0 {
            chosen = pools.iter().rposition(|p| p.1 > 0.0).unwrap_or(chosen);
        }
        let (gpus, _, durations) = pools[chosen];
        let duration_s = durations[rng.random_range(0..durations.len())];
        jobs.push(TraceJob { id: format!("gen-{seed}-{n}"), submit_s: at, duration_s, gpus });
    }
    if let (Some(offered), Some(last)) = (offered_gpus, jobs.last().map(|j| j.submit_s)) {
        let gpu_s: f64 = jobs.iter().map(|j| f64::from(j.gpus) * j.duration_s as f64).sum();
        if last > 0 {
            let factor = gpu_s / offered / last as f64;
            for job in &mut jobs {
                job.submit_s = (job.submit_s as f64 * factor).round() as u64;
            }
        }
    }
    Ok(jobs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str, submit_s: u64, duration_s: u64, gpus: u32) -> TraceJob {
        TraceJob { id: id.into(), submit_s, duration_s, gpus }
    }

    #[test]
    fn mix_errors_name_the_entry() {
        let err = |text: &str| SizeMix::parse(text).unwrap_err().to_string();
        assert_eq!(err("1=78,2"), "mix entry `2`: not GPUS=WEIGHT");
        assert_eq!(err("0=1"), "mix entry `0=1`: GPUS must be in 1..=4096");
        assert_eq!(err("x=1"), "mix entry `x=1`: GPUS is not a whole number");
        assert_eq!(err("1=-1"), "mix entry `1=-1`: WEIGHT must be a number >= 0");
        assert_eq!(err("1=NaN"), "mix entry `1=NaN`: WEIGHT must be a number >= 0");
        assert_eq!(err("1=1,1=2"), "mix entry `1=2`: this GPU count is already in the mix");
        assert_eq!(err(""), "mix: no entries (expected GPUS=WEIGHT,...)");
        assert_eq!(err("1=0,8=0"), "mix: every weight is 0");
        assert_eq!(err("1=1e308,2=1e308"), "mix: the weights add up to more than a number can hold");
        let many: Vec<String> = (1..=65).map(|g| format!("{g}=1")).collect();
        assert_eq!(err(&many.join(",")), "mix: more than 64 entries");
        assert_eq!(SizeMix::parse(" 1=78, 8=7 ").unwrap().entries(), &[(1, 78.0), (8, 7.0)]);
    }

    #[test]
    fn jobs_follow_the_mix_with_durations_and_gaps_from_the_sources() {
        // Source A: 1-GPU jobs run 10 s, 8-GPU jobs 800 s, arrivals 5 s apart; source B: 64-GPU
        // jobs of 6,400 s arriving 7 s apart.
        let a: Vec<TraceJob> = (0..40)
            .map(|i| job(&format!("a{i}"), 5 * i, if i % 2 == 0 { 10 } else { 800 }, if i % 2 == 0 { 1 } else { 8 }))
            .collect();
        let b: Vec<TraceJob> = (0..3).map(|i| job(&format!("b{i}"), 100 + 7 * i, 6400, 64)).collect();
        let mix = SizeMix::parse("1=78,2=7,8=15,16=0").unwrap();
        let spec = GenerateSpec { count: 20_000, seed: 3, offered_gpus: None };
        let jobs = generate(&[&a, &b], &mix, spec).unwrap();
        assert_eq!(jobs.len(), 20_000);
        assert_eq!((jobs[0].id.as_str(), jobs[0].submit_s), ("gen-3-1", 0));
        let share = |gpus| jobs.iter().filter(|j| j.gpus == gpus).count() as f64 / 20_000.0;
        assert!((share(1) - 0.78).abs() < 0.015, "1-GPU share {}", share(1));
        assert!((share(2) - 0.07).abs() < 0.01, "2-GPU share {}", share(2));
        assert!((share(8) - 0.15).abs() < 0.015, "8-GPU share {}", share(8));
        assert_eq!(share(16), 0.0, "a weight of 0 is never drawn");
        for j in &jobs {
            // 2 GPUs: none in the sources, the nearest count (1) lends its durations.
            let expected = match j.gpus {
                1 | 2 => 10,
                8 => 800,
                other => panic!("{other} GPUs drawn"),
            };
            assert_eq!(j.duration_s, expected, "{j:?}");
        }
        let gaps: std::collections::BTreeSet<u64> = jobs.windows(2).map(|w| w[1].submit_s - w[0].submit_s).collect();
        assert_eq!(gaps.into_iter().collect::<Vec<_>>(), vec![5, 7], "gaps come from each source's own arrivals");
        assert_eq!(generate(&[&a, &b], &mix, spec).unwrap(), jobs, "the same seed, the same trace");
        assert_ne!(generate(&[&a, &b], &mix, GenerateSpec { seed: 4, ..spec }).unwrap(), jobs);

        // Stretched to an offered load of 50 GPUs: GPU-seconds over the span is 50, the jobs
        // and their order unchanged.
        let loaded = generate(&[&a, &b], &mix, GenerateSpec { offered_gpus: Some(50.0), ..spec }).unwrap();
        let gpu_s: f64 = loaded.iter().map(|j| f64::from(j.gpus) * j.duration_s as f64).sum();
        let span = loaded.last().unwrap().submit_s as f64;
        assert!((gpu_s / span - 50.0).abs() < 0.01, "offered {}", gpu_s / span);
        assert!(loaded.iter().zip(&jobs).all(|(l, j)| (l.gpus, l.duration_s) == (j.gpus, j.duration_s)));
    }

    #[test]
    fn bad_requests_are_refused() {
        let a = [job("a", 0, 1, 1)];
        let mix = SizeMix::parse("1=1").unwrap();
        let spec = |count| GenerateSpec { count, seed: 1, offered_gpus: None };
        assert_eq!(generate(&[&a], &mix, spec(0)), Err(GenerateError::JobCount { count: 0 }));
        assert_eq!(
            generate(&[&a], &mix, spec(GENERATED_JOBS_MAX + 1)),
            Err(GenerateError::JobCount { count: GENERATED_JOBS_MAX + 1 })
        );
        assert_eq!(generate(&[&[]], &mix, spec(5)), Err(GenerateError::NoSources));
        for bad in [0.0, -1.0, 1e-300, 1e8, f64::NAN, f64::INFINITY] {
            let error = generate(&[&a], &mix, GenerateSpec { offered_gpus: Some(bad), ..spec(5) }).unwrap_err();
            assert!(matches!(error, GenerateError::OfferedGpus(_)), "{bad}: {error}");
        }
        // One job in the sources: no gap to resample, every job arrives at 0 (at any load).
        assert!(generate(&[&a], &mix, spec(5)).unwrap().iter().all(|j| j.submit_s == 0));
        let loaded = generate(&[&a], &mix, GenerateSpec { offered_gpus: Some(3.0), ..spec(5) }).unwrap();
        assert!(loaded.iter().all(|j| j.submit_s == 0));
    }
}
