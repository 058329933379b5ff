//! What both replays' command lines share: the output formats, the first seed, the
//! `--policy` list.

use clap::ValueEnum;

use crate::cli::CliError;

/// The FGD artifact's first seed (its runs use 42..=51).
pub const SEED_BASE_DEFAULT: u64 = 42;

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum ReplayFormat {
    Table,
    Csv,
    Json,
}

/// The report flags both replays take.
#[derive(Debug, Clone, clap::Args)]
pub struct ReportArgs {
    #[arg(short = 'o', long = "output", value_enum, default_value_t = ReplayFormat::Table)]
    pub output: ReplayFormat,
    /// Also write an SVG chart (pods: allocation against arrived load, one line per policy;
    /// jobs: utilisation over time and where gangs landed).
    #[arg(long, value_name = "FILE")]
    pub svg: Option<std::path::PathBuf>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
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
