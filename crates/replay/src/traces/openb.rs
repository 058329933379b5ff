//! The CSV files of the Alibaba GPU-sharing trace (`openb_node_list_*.csv`,
//! `openb_pod_list_*.csv`, alibaba/clusterdata `cluster-trace-gpu-v2023`) into the
//! replay's [`Trace`] types. Columns are found by header name, so the five-column
//! `multigpu*` pod files read like the full ones. Every error names the file, the line and
//! the column.
//!
//! Pods are normalised as the FGD artifact's `pod_csv_to_yaml.py` does: `gpu_milli` is the
//! share of each GPU, kept when 1..=1000, 1000 when above, and the pod is CPU-only when it
//! is 0 or when `num_gpu` is 0; `gpu_spec` (`|`-separated models, empty or `nan` for any)
//! matters only for GPU pods.

use crate::pods::{TraceNode, TracePod};
use topoplace_engine::ledger::shares::GPU_MILLI;
use topoplace_formats::files::table::Table;
use topoplace_formats::files::FileError;

pub const NODE_COLUMNS: [&str; 5] = ["sn", "cpu_milli", "memory_mib", "gpu", "model"];
pub const POD_COLUMNS: [&str; 5] = ["name", "cpu_milli", "memory_mib", "num_gpu", "gpu_milli"];
const POD_SPEC_COLUMN: &str = "gpu_spec";

/// A node list: `sn,cpu_milli,memory_mib,gpu,model`.
pub fn parse_nodes(file: &str, text: &str) -> Result<Vec<TraceNode>, FileError> {
    let table = Table::read(file, text, &NODE_COLUMNS)?;
    let mut nodes = Vec::with_capacity(table.records.len());
    for (line, record) in &table.records {
        let name = table.name(*line, record, "sn")?;
        let gpus: u8 = table.number(*line, record, "gpu")?;
        let model = table.text(record, "model").unwrap_or("").to_string();
        if gpus > 0 && model.is_empty() {
            return Err(FileError::at_line(file, Some(*line), format!("node `{name}`: column `model` is empty")));
        }
        nodes.push(TraceNode {
            cpu_milli: table.number(*line, record, "cpu_milli")?,
            memory_mib: table.number(*line, record, "memory_mib")?,
            gpus,
            model,
            name,
        });
    }
    if nodes.is_empty() {
        return Err(FileError::new(file, "no nodes"));
    }
    Ok(nodes)
}

/// A pod list: `name,cpu_milli,memory_mib,num_gpu,gpu_milli[,gpu_spec,...]`.
pub fn parse_pods(file: &str, text: &str) -> Result<Vec<TracePod>, FileError> {
    let table = Table::read(file, text, &POD_COLUMNS)?;
    let mut pods = Vec::with_capacity(table.records.len());
    for (line, record) in &table.records {
        let name = table.name(*line, record, "name")?;
        let num_gpu: u8 = table.number(*line, record, "num_gpu")?;
        // Negative shares are read (and mean none), as the artifact reads them.
        let milli_text = table.text(record, "gpu_milli").unwrap_or("");
        let raw_milli: i64 = milli_text.parse().map_err(|_| {
            FileError::at_line(file, Some(*line), format!("column `gpu_milli`: `{milli_text}` is not a whole number"))
        })?;
        let gpu_milli = if num_gpu == 0 || raw_milli <= 0 { 0 } else { raw_milli.min(i64::from(GPU_MILLI)) as u16 };
        let spec = table.text(record, POD_SPEC_COLUMN).unwrap_or("");
        let gpu_spec = if gpu_milli == 0 || spec.is_empty() || spec.eq_ignore_ascii_case("nan") {
            Vec::new()
        } else {
            spec.split('|').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect()
        };
        pods.push(TracePod {
            cpu_milli: table.number(*line, record, "cpu_milli")?,
            memory_mib: table.number(*line, record, "memory_mib")?,
            num_gpu: if gpu_milli == 0 { 0 } else { num_gpu },
            gpu_milli,
            gpu_spec,
            name,
        });
    }
    if pods.is_empty() {
        return Err(FileError::new(file, "no pods"));
    }
    Ok(pods)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_are_normalised_as_the_artifact_does() {
        let text = "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec\n\
                    a,1000,512,1,460,\n\
                    b,2000,512,2,1500,V100M16|T4\n\
                    c,3000,0,0,500,T4\n\
                    d,4000,0,1,0,nan\n";
        let pods = parse_pods("p.csv", text).unwrap();
        let shape: Vec<(u8, u16, usize)> = pods.iter().map(|p| (p.num_gpu, p.gpu_milli, p.gpu_spec.len())).collect();
        assert_eq!(shape, vec![(1, 460, 0), (2, 1000, 2), (0, 0, 0), (0, 0, 0)]);
        assert_eq!(pods[1].gpu_spec, vec!["V100M16".to_string(), "T4".to_string()]);
    }

    #[test]
    fn five_column_pod_files_read() {
        let pods = parse_pods("p.csv", "name,cpu_milli,memory_mib,num_gpu,gpu_milli\nx,1,2,8,1000\n").unwrap();
        assert_eq!((pods[0].num_gpu, pods[0].gpu_milli), (8, 1000));
    }

    #[test]
    fn errors_name_file_line_and_column() {
        let error = parse_nodes("n.csv", "sn,cpu_milli,memory_mib,gpu,model\na,64000,1024,2,T4\nb,lots,1024,2,T4\n")
            .unwrap_err();
        assert_eq!(error.to_string(), "n.csv:3: column `cpu_milli`: `lots` is not a whole number >= 0");
        let error = parse_nodes("n.csv", "sn,cpu,memory_mib,gpu,model\n").unwrap_err();
        assert!(error.to_string().starts_with("n.csv:1: missing column `cpu_milli`"), "{error}");
        let error = parse_pods("p.csv", "name,cpu_milli,memory_mib,num_gpu,gpu_milli\nx,1,2,300,1000\n").unwrap_err();
        assert!(error.to_string().starts_with("p.csv:2: column `num_gpu`"), "{error}");
        let error = parse_nodes("n.csv", "sn,cpu_milli,memory_mib,gpu,model\na,1,1,2,\n").unwrap_err();
        assert!(error.to_string().contains("node `a`: column `model` is empty"), "{error}");
    }
}
