//! Converters from public cluster data to the cluster file format.
//!
//! `lingjun`: the Alibaba Lingjun 2023 topology (`topo.csv`: `ip,DSW,PSW,ASW`), a
//! three-tier Clos network. DSW is the core, PSW the aggregation (spine) switch, ASW the
//! top-of-rack switch; ASW names repeat under different PSWs, so a rack is the pair
//! (PSW, ASW), which the level path gives for free. The data names no GPU model; the
//! paper's hosts have 8 GPUs each, H800 by default.

use std::collections::BTreeMap;

use thiserror::Error;

use topoplace_engine::topology::{product, ClusterSpec, NodeSpec};

pub const LINGJUN_LEVELS: [&str; 3] =
    ["network.topology.nvidia.com/core", "network.topology.nvidia.com/spine", "network.topology.nvidia.com/leaf"];
/// Hex characters of the hashed host IP kept in node names (grown on a collision).
const NAME_HASH_CHARS: usize = 12;

/// Where the shared production traces are: `TOPOPLACE_TRACES`, else `../shared/traces`
/// beside the project root, three levels above this crate (they are never copied into the
/// repository).
pub fn traces_dir() -> std::path::PathBuf {
    match std::env::var_os("TOPOPLACE_TRACES") {
        Some(path) => path.into(),
        None => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/traces"),
    }
}

#[derive(Debug, Error, PartialEq)]
pub enum ConvertError {
    #[error("{file}: the header must be `ip,DSW,PSW,ASW`, found `{found}`")]
    Header { file: String, found: String },
    #[error("{file}:{line}: {message}")]
    Row { file: String, line: u64, message: String },
    #[error("{file}: {message}")]
    Csv { file: String, message: String },
    #[error("unknown GPU product `{0}`")]
    Product(String),
    #[error("{file}: no hosts")]
    Empty { file: String },
}

/// Reads `topo.csv` text into a cluster of `gpus_per_host` GPUs of `product` per host.
pub fn lingjun(file: &str, text: &str, product_name: &str, gpus_per_host: u8) -> Result<ClusterSpec, ConvertError> {
    let product = product::lookup(product_name).ok_or_else(|| ConvertError::Product(product_name.to_string()))?;
    let mut reader = csv::ReaderBuilder::new().has_headers(true).from_reader(text.as_bytes());
    let headers =
        reader.headers().map_err(|e| ConvertError::Csv { file: file.into(), message: e.to_string() })?.clone();
    let expected = ["ip", "DSW", "PSW", "ASW"];
    if headers.iter().map(str::trim).collect::<Vec<_>>() != expected {
        return Err(ConvertError::Header { file: file.into(), found: headers.iter().collect::<Vec<_>>().join(",") });
    }
    let mut rows: Vec<[String; 4]> = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| {
            let line = e.position().map_or(0, |p| p.line());
            ConvertError::Row { file: file.into(), line, message: e.to_string() }
        })?;
        let line = record.position().map_or(0, |p| p.line());
        let field = |index: usize| record.get(index).map(str::trim).unwrap_or("").to_string();
        let row = [field(0), field(1), field(2), field(3)];
        if let Some(empty) = row.iter().position(String::is_empty) {
            return Err(ConvertError::Row {
                file: file.into(),
                line,
                message: format!("column `{}` is empty", expected[empty]),
            });
        }
        if !row[0].chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(ConvertError::Row {
                file: file.into(),
                line,
                message: format!("ip `{}` is not a hash", row[0]),
            });
        }
        rows.push(row);
    }
    if rows.is_empty() {
        return Err(ConvertError::Empty { file: file.into() });
    }
    // The shortest prefix of the hash that keeps names unique.
    let mut chars = NAME_HASH_CHARS;
    loop {
        let mut seen = BTreeMap::new();
        let unique = rows.iter().all(|row| seen.insert(row[0].chars().take(chars).collect::<String>(), ()).is_none());
        if unique || chars >= 64 {
            break;
        }
        chars += 4;
    }
    // Rack by rack, so the rendered file groups each rack's hosts under one entry.
    rows.sort_by(|a, b| (&a[1], &a[2], &a[3], &a[0]).cmp(&(&b[1], &b[2], &b[3], &b[0])));
    let nodes = rows
        .into_iter()
        .map(|[ip, core, spine, leaf]| NodeSpec {
            name: format!("lj-{}", ip.to_ascii_lowercase().chars().take(chars).collect::<String>()),
            labels: [core, spine, leaf].into_iter().zip(LINGJUN_LEVELS).map(|(v, k)| (k.to_string(), v)).collect(),
            product,
            gpu_count: gpus_per_host,
            memory_mib: None,
            nvlink: None,
            clique: None,
            allocated: Vec::new(),
            mig_profile: None,
            sharing: None,
            pool: Default::default(),
        })
        .collect();
    Ok(ClusterSpec {
        name: "lingjun-2023".into(),
        levels: LINGJUN_LEVELS.iter().map(|s| s.to_string()).collect(),
        nodes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn racks_are_spine_and_leaf_pairs() {
        let text = "ip,DSW,PSW,ASW\naaaa1,G6,P10,S1\nbbbb2,G6,P12,S1\ncccc3,G6,P10,S1\n";
        let spec = lingjun("topo.csv", text, "H800", 8).expect("valid");
        let cluster = topoplace_engine::topology::Cluster::build(spec).expect("builds");
        assert_eq!(cluster.domains[2].len(), 2, "S1 under P10 and S1 under P12 are two racks");
        assert_eq!(cluster.domains[2][0].path, "G6/P10/S1");
        assert_eq!(cluster.domains[2][0].hosts.len(), 2);
    }

    #[test]
    fn bad_rows_are_located() {
        let error = lingjun("topo.csv", "ip,DSW,PSW,ASW\naaaa,G6,,S1\n", "H800", 8).unwrap_err();
        assert_eq!(error.to_string(), "topo.csv:2: column `PSW` is empty");
        let error = lingjun("topo.csv", "ip,DSW,PSW\na,b,c\n", "H800", 8).unwrap_err();
        assert!(matches!(error, ConvertError::Header { .. }));
        let error = lingjun("topo.csv", "ip,DSW,PSW,ASW\na,b,c\n", "H800", 8).unwrap_err();
        assert!(error.to_string().starts_with("topo.csv:2:"), "{error}");
    }
}
