//! Rendering of plans and sizing answers: a readable table, or JSON/YAML with a stable
//! contract (`placements[].gang`, `placements[].members[] {member, node, gpus}`,
//! `unplaced[] {gang, reason}`; other fields may grow).

use std::fmt::Write as _;

use serde::Serialize;

use super::SolverFlag;
use super::{CliError, OutputFormat};
use topoplace_engine::ledger::{mask_indices, Ledger};
use topoplace_engine::placement::{
    BatchPlan, CandidateSummary, Explanation, GangPlacement, ScoreComponents, SolverInfo, Weights,
};
use topoplace_engine::quantity::format_gib;
use topoplace_engine::topology::Cluster;
use topoplace_engine::workload::{ModelSpec, Replica, SizingRow, Workload};

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanReport {
    pub cluster: String,
    pub workload: String,
    pub solver: String,
    pub weights: Weights,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_note: Option<String>,
    pub placements: Vec<PlacementOut>,
    /// Replicas with roles, one entry each (their parts are rows of `placements`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<ReplicaOut>,
    pub unplaced: Vec<UnplacedOut>,
    pub summary: Summary,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaOut {
    pub gang: String,
    pub region: String,
    /// The parts' scores weighted by their GPUs.
    pub score: f64,
    /// Planner calls the search made.
    pub search_steps: u32,
    /// Roles whose pods take no GPUs: left to kube-scheduler, not waited for.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub roles_without_gpus: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Whose placement it is: the search's (`greedy`), or the exact model's with its
    /// objective, bound and gap over the regions modelled.
    pub solver: SolverInfo,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlacementOut {
    pub gang: String,
    /// For a replica with roles: the role this row places, and the slice of a sliced role.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slice: Option<u32>,
    /// For a replica with roles: the domain that holds all of it (`rack r1`, `cluster`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    pub product: String,
    pub scope: String,
    pub memory_floor_mib: u64,
    pub members: Vec<MemberOut>,
    pub score: ScoreComponents,
    pub candidates: usize,
    pub solver: SolverInfo,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runner_up: Option<CandidateSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub explanation: Option<Explanation>,
}

#[derive(Debug, Serialize)]
pub struct MemberOut {
    pub member: u32,
    pub node: String,
    pub gpus: Vec<u8>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UnplacedOut {
    pub gang: String,
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub explanation: Option<Explanation>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub gangs: usize,
    pub placed: usize,
    pub gpus_requested: u64,
    pub gpus_placed: u64,
    pub cluster_gpus: u64,
    pub gpus_free_after: u64,
}

impl PlanReport {
    pub fn new(
        cluster: &Cluster,
        workload: &Workload,
        replicas: &[Replica],
        plan: &BatchPlan,
        ledger: &Ledger,
        weights: &Weights,
        solver: SolverFlag,
    ) -> Self {
        let floor_of = |name: &str| {
            replicas.iter().flat_map(Replica::gangs).find(|g| g.name == name).map_or(0, |g| g.memory_floor_mib)
        };
        let row = |gang: String, p: &GangPlacement| PlacementOut {
            gang,
            role: None,
            slice: None,
            region: None,
            product: p.product.get().name.to_string(),
            scope: p.scope.clone(),
            memory_floor_mib: floor_of(&p.gang),
            members: p
                .members
                .iter()
                .map(|m| MemberOut {
                    member: m.member,
                    node: cluster.host(m.host).name.clone(),
                    gpus: mask_indices(m.gpus),
                })
                .collect(),
            score: p.score,
            candidates: p.candidates,
            solver: p.solver.clone(),
            runner_up: p.runner_up.clone(),
            explanation: p.explanation.clone(),
        };
        let mut placements: Vec<PlacementOut> = plan.placements.iter().map(|p| row(p.gang.clone(), p)).collect();
        for replica in &plan.replicas {
            for part in &replica.parts {
                let mut out = row(replica.replica.clone(), &part.placement);
                out.role = Some(part.role.clone());
                out.slice = part.slice;
                out.region = Some(replica.region.clone());
                placements.push(out);
            }
        }
        let gpus_placed = placements.iter().map(|p| p.members.iter().map(|m| m.gpus.len() as u64).sum::<u64>()).sum();
        PlanReport {
            cluster: cluster.name.clone(),
            workload: workload.name.clone(),
            solver: format!("{solver:?}").to_lowercase(),
            weights: *weights,
            batch_note: plan.note.clone(),
            placements,
            replicas: plan
                .replicas
                .iter()
                .map(|r| ReplicaOut {
                    gang: r.replica.clone(),
                    region: r.region.clone(),
                    score: r.score,
                    search_steps: r.steps,
                    roles_without_gpus: r.gpu_less_roles.clone(),
                    note: r.note.clone(),
                    solver: r.solver.clone(),
                })
                .collect(),
            unplaced: plan
                .unplaced
                .iter()
                .map(|u| UnplacedOut {
                    gang: u.gang.clone(),
                    reason: u.reason.clone(),
                    explanation: u.explanation.clone(),
                })
                .collect(),
            summary: Summary {
                gangs: replicas.len(),
                placed: plan.placements.len() + plan.replicas.len(),
                gpus_requested: replicas.iter().map(Replica::total_gpus).sum(),
                gpus_placed,
                cluster_gpus: cluster.total_gpus(),
                gpus_free_after: ledger.free_gpus(),
            },
        }
    }
}

fn serialize<T: Serialize>(value: &T, format: OutputFormat) -> Result<String, CliError> {
    match format {
        OutputFormat::Json => {
            serde_json::to_string_pretty(value).map(|s| s + "\n").map_err(|e| CliError::Failed(e.to_string()))
        }
        OutputFormat::Yaml => serde_yaml_ng::to_string(value).map_err(|e| CliError::Failed(e.to_string())),
        OutputFormat::Table => Err(CliError::Failed("table is not a serialization".into())),
    }
}

fn gpu_list(gpus: &[u8]) -> String {
    gpus.iter().map(u8::to_string).collect::<Vec<_>>().join(",")
}

/// A replica's solver: `greedy`, or the exact model's objective and gap. The model scores
/// each part against the GPUs free before the replica, so its objective can differ from the
/// replica's score, which scores the parts one after another.
pub(crate) fn replica_solver_cell(info: &SolverInfo) -> String {
    match info.gap {
        _ if info.solver == "greedy" => info.solver.clone(),
        Some(gap) => format!("{} (model objective {:.3}, gap {:.2}%)", info.solver, info.objective, gap * 100.0),
        None => format!("{} (model objective {:.3}, no bound)", info.solver, info.objective),
    }
}

fn solver_cell(info: &SolverInfo) -> String {
    match info.gap {
        Some(gap) => format!("{} gap {:.2}%", info.solver, gap * 100.0),
        None => info.solver.clone(),
    }
}

fn score_line(score: &ScoreComponents) -> String {
    format!(
        "total {:.3} = locality {:.2}, memory {:.2}, fragmentation {:.2}, connectivity {:.2}",
        score.total, score.locality, score.memory, score.fragmentation, score.connectivity
    )
}

pub fn render_plan(report: &PlanReport, format: OutputFormat, explain: bool) -> Result<String, CliError> {
    if format != OutputFormat::Table {
        return serialize(report, format);
    }
    let mut text = String::new();
    let _ = writeln!(
        text,
        "cluster {} ({} GPUs), workload {}: {} of {} gangs placed, {} of {} GPUs requested; {} GPUs free after",
        report.cluster,
        report.summary.cluster_gpus,
        report.workload,
        report.summary.placed,
        report.summary.gangs,
        report.summary.gpus_placed,
        report.summary.gpus_requested,
        report.summary.gpus_free_after
    );
    if let Some(note) = &report.batch_note {
        let _ = writeln!(text, "{note}");
    }
    let _ = writeln!(text);
    let rows: Vec<[String; 7]> = report
        .placements
        .iter()
        .map(|p| {
            let members =
                p.members.iter().map(|m| format!("{}:{}", m.node, gpu_list(&m.gpus))).collect::<Vec<_>>().join(" ");
            let gang = match (&p.role, p.slice) {
                (Some(role), Some(slice)) => format!("{}/{role}[{slice}]", p.gang),
                (Some(role), None) => format!("{}/{role}", p.gang),
                _ => p.gang.clone(),
            };
            let scope = match &p.region {
                Some(region) if *region != p.scope && region != "cluster" => format!("{} in {region}", p.scope),
                _ => p.scope.clone(),
            };
            [
                gang,
                p.product.clone(),
                scope,
                if p.memory_floor_mib > 0 { format_gib(p.memory_floor_mib) } else { "-".into() },
                format!("{:.2}", p.score.total),
                solver_cell(&p.solver),
                members,
            ]
        })
        .collect();
    let header = ["GANG", "PRODUCT", "SCOPE", "FLOOR/GPU", "SCORE", "SOLVER", "MEMBERS (node:gpus)"];
    // Columns are as wide as their widest cell up to a cap: a longer cell (a node's name is
    // the caller's) runs over, instead of widening every row.
    const COLUMN_WIDTH_MAX: usize = 80;
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len().min(COLUMN_WIDTH_MAX));
        }
    }
    let line = |cells: [&str; 7]| {
        let mut out = String::new();
        for (index, cell) in cells.iter().enumerate() {
            out.push_str(cell);
            if index + 1 < cells.len() {
                // Padded by hand: a format width is at most u16::MAX, and names come from
                // the caller's files.
                let pad = widths[index].saturating_sub(cell.len()) + 2;
                out.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.trim_end().to_string() + "\n"
    };
    text.push_str(&line(header));
    for (row, placement) in rows.iter().zip(&report.placements) {
        text.push_str(&line([&row[0], &row[1], &row[2], &row[3], &row[4], &row[5], &row[6]]));
        if let Some(note) = &placement.solver.note {
            let _ = writeln!(text, "    solver note: {note}");
        }
        if explain {
            let _ = writeln!(text, "    winner:    {}", score_line(&placement.score));
            match &placement.runner_up {
                Some(runner) => {
                    let _ = writeln!(
                        text,
                        "    runner-up: {} on {} ({}): {}{}",
                        runner.scope,
                        runner.hosts.join(","),
                        runner.product,
                        score_line(&runner.score),
                        if (runner.score.total - placement.score.total).abs() <= 1e-9 {
                            format!(" (equal total: ties go to the tighter pack, then the candidate order; the runner-up {})", pack_text(&runner.pack))
                        } else {
                            String::new()
                        }
                    );
                }
                None => {
                    let _ = writeln!(text, "    runner-up: none ({} candidate)", placement.candidates);
                }
            }
            if let Some(explanation) = &placement.explanation {
                explain_lines(&mut text, explanation);
            }
        }
    }
    if !report.replicas.is_empty() {
        let _ = writeln!(text, "\nREPLICAS WITH ROLES");
        for replica in &report.replicas {
            let _ = write!(
                text,
                "  {}: in {}, score {:.2}, {} planner call(s), {}",
                replica.gang,
                replica.region,
                replica.score,
                replica.search_steps,
                replica_solver_cell(&replica.solver)
            );
            if !replica.roles_without_gpus.is_empty() {
                let _ = write!(text, "; left to kube-scheduler (no GPUs): {}", replica.roles_without_gpus.join(", "));
            }
            if let Some(note) = &replica.note {
                let _ = write!(text, "; {note}");
            }
            let _ = writeln!(text);
        }
    }
    if !report.unplaced.is_empty() {
        let _ = writeln!(text, "\nNOT PLACED");
        for unplaced in &report.unplaced {
            let _ = writeln!(text, "  {}: {}", unplaced.gang, unplaced.reason);
            if explain {
                if let Some(explanation) = &unplaced.explanation {
                    explain_lines(&mut text, explanation);
                }
            }
        }
    }
    Ok(text)
}

/// A candidate's [`PackKey`] for the explanation.
fn pack_text(pack: &topoplace_engine::placement::PackKey) -> String {
    format!(
        "leaves {} GPU(s) free on its hosts, {} whole host(s) in its racks",
        pack.free_left, pack.domain_whole_hosts
    )
}

fn explain_lines(text: &mut String, explanation: &Explanation) {
    for group in &explanation.rejected_hosts {
        let _ = writeln!(
            text,
            "    rejected {} host(s): {} (e.g. {})",
            group.hosts,
            group.reason,
            group.examples.join(", ")
        );
    }
    for domain in &explanation.domains {
        let _ = writeln!(text, "    domains: {domain}");
    }
    for (rank, candidate) in explanation.candidates.iter().enumerate() {
        let equivalent = if candidate.equivalent_hosts > 0 {
            format!(" (+{} equivalent hosts)", candidate.equivalent_hosts)
        } else {
            String::new()
        };
        let _ = writeln!(
            text,
            "    #{} {}{equivalent}: {}; {}",
            rank + 1,
            candidate.scope,
            score_line(&candidate.score),
            pack_text(&candidate.pack)
        );
    }
}

pub fn render_sizing(model: &ModelSpec, rows: &[SizingRow], format: OutputFormat) -> Result<String, CliError> {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct SizingReport<'a> {
        parameters: u64,
        dtype: &'a str,
        weight_bytes: u64,
        kv_cache_bytes: u64,
        overhead: f64,
        products: &'a [SizingRow],
    }
    if format != OutputFormat::Table {
        return serialize(
            &SizingReport {
                parameters: model.parameters,
                dtype: &model.dtype,
                weight_bytes: model.weight_bytes(),
                kv_cache_bytes: model.kv_cache_bytes,
                overhead: model.overhead,
                products: rows,
            },
            format,
        );
    }
    let mut text = String::new();
    let _ = writeln!(
        text,
        "model: {:.1}B parameters in {} = {:.1} GB of weights, {:.1} GB KV cache, {:.0} % runtime overhead\n",
        model.parameters as f64 / 1e9,
        model.dtype,
        model.weight_bytes() as f64 / 1e9,
        model.kv_cache_bytes as f64 / 1e9,
        model.overhead * 100.0
    );
    let _ = writeln!(
        text,
        "{:<16} {:>10} {:>8} {:>5} {:>8} {:>12} {:>8}  NOTE",
        "PRODUCT", "GPU MEM", "MIN GPUS", "TP", "PP", "NEED/GPU", "REPLICAS"
    );
    for row in rows {
        let _ = writeln!(
            text,
            "{:<16} {:>10} {:>8} {:>5} {:>8} {:>12} {:>8}  {}",
            row.product,
            format_gib(row.gpu_memory_mib),
            row.min_gpus,
            row.tensor_parallel,
            row.pipeline_parallel,
            format_gib(row.per_gpu_need_mib),
            row.replicas_if_empty,
            row.note
        );
    }
    Ok(text)
}
