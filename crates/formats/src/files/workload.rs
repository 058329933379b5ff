//! `kind: Workload`: `spec.gangs[]`, each `replicas` independent gangs of `members` pods
//! with `gpusPerMember` GPUs, tensor and pipeline parallelism, a memory floor given
//! directly (`minGpuMemory`) or sized from a `model`, and topology constraints. A gang may
//! instead list `roles[]` (prefill and decode, leader and workers), each with those fields,
//! a topology of its own and `slices: {members, required, exclusive}` (`exclusive`: each slice
//! in a domain of its own); the gang's `topology` is then
//! the scope of the whole replica.

use serde::Deserialize;

use super::{check_header, line_of_name, lines_naming, FileError, Metadata};
use topoplace_engine::quantity;
use topoplace_engine::workload::WorkloadError;
use topoplace_engine::workload::{
    GangSpec, MemoryNeed, ModelSpec, RoleSpec, Scope, Slicing, Workload, RUNTIME_OVERHEAD_DEFAULT,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WorkloadFile {
    #[allow(dead_code)]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    #[serde(default)]
    metadata: Metadata,
    spec: WorkloadFileSpec,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WorkloadFileSpec {
    gangs: Vec<GangEntry>,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct GangEntry {
    name: String,
    #[serde(default = "one")]
    replicas: u32,
    // The shape of a gang without roles (with roles, each role gives its own). Written out
    // here and in `RoleEntry` rather than flattened from one struct: serde does not combine
    // `flatten` with `deny_unknown_fields`, and a misspelt field must stay an error.
    #[serde(default)]
    members: Option<u32>,
    #[serde(default)]
    gpus_per_member: Option<u32>,
    #[serde(default)]
    tensor_parallel: Option<u32>,
    #[serde(default)]
    pipeline_parallel: Option<u32>,
    #[serde(default)]
    min_gpu_memory: Option<MemoryQuantity>,
    /// One MIG device of this profile per member (`2g.20gb`), instead of a memory need.
    #[serde(default)]
    mig: Option<String>,
    #[serde(default)]
    model: Option<ModelEntry>,
    #[serde(default)]
    topology: Option<TopologyEntry>,
    #[serde(default)]
    roles: Option<Vec<RoleEntry>>,
}

/// Members, GPUs, parallelism and memory: of a gang, or of one role.
#[derive(Debug, Default)]
struct ShapeEntry {
    members: Option<u32>,
    gpus_per_member: Option<u32>,
    tensor_parallel: Option<u32>,
    pipeline_parallel: Option<u32>,
    min_gpu_memory: Option<MemoryQuantity>,
    model: Option<ModelEntry>,
    mig: Option<String>,
}

impl ShapeEntry {
    fn is_empty(&self) -> bool {
        self.members.is_none()
            && self.gpus_per_member.is_none()
            && self.tensor_parallel.is_none()
            && self.pipeline_parallel.is_none()
            && self.min_gpu_memory.is_none()
            && self.model.is_none()
            && self.mig.is_none()
    }

    /// The memory need, or why the two ways of giving it clash.
    fn memory(&mut self) -> Result<MemoryNeed, String> {
        let mig = self.mig.take();
        Ok(match (self.min_gpu_memory.take(), self.model.take()) {
            (Some(_), Some(_)) => return Err("give either minGpuMemory or model, not both".into()),
            (Some(_), _) | (_, Some(_)) if mig.is_some() => {
                return Err("give one of minGpuMemory, model and mig".into())
            }
            (Some(MemoryQuantity(bytes)), None) => MemoryNeed::FloorMib(quantity::bytes_to_mib_ceil(bytes)),
            (None, Some(model)) => MemoryNeed::Model(ModelSpec {
                parameters: model.parameters.0,
                dtype_eighths: model.dtype.1,
                dtype: model.dtype.0,
                kv_cache_bytes: model.kv_cache.map_or(0, |q| q.0),
                overhead: model.overhead.unwrap_or(RUNTIME_OVERHEAD_DEFAULT),
            }),
            (None, None) => mig.map_or(MemoryNeed::None, MemoryNeed::MigProfile),
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RoleEntry {
    name: String,
    #[serde(default)]
    members: Option<u32>,
    gpus_per_member: u32,
    #[serde(default)]
    tensor_parallel: Option<u32>,
    #[serde(default)]
    pipeline_parallel: Option<u32>,
    #[serde(default)]
    min_gpu_memory: Option<MemoryQuantity>,
    /// One MIG device of this profile per member (`2g.20gb`), instead of a memory need.
    #[serde(default)]
    mig: Option<String>,
    #[serde(default)]
    model: Option<ModelEntry>,
    #[serde(default)]
    topology: Option<TopologyEntry>,
    #[serde(default)]
    slices: Option<SlicesEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SlicesEntry {
    members: u32,
    required: String,
    /// Each slice in a domain of its own.
    #[serde(default)]
    exclusive: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ModelEntry {
    parameters: ParameterCount,
    dtype: Dtype,
    #[serde(default)]
    kv_cache: Option<MemoryQuantity>,
    #[serde(default)]
    overhead: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TopologyEntry {
    #[serde(default)]
    required: Option<String>,
    #[serde(default)]
    preferred: Option<String>,
}

/// Bytes, checked while parsing so the error points at the value.
#[derive(Debug)]
struct MemoryQuantity(u64);

impl<'de> Deserialize<'de> for MemoryQuantity {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = scalar_text(deserializer)?;
        quantity::parse_bytes(&text).map(MemoryQuantity).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug)]
struct ParameterCount(u64);

impl<'de> Deserialize<'de> for ParameterCount {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = scalar_text(deserializer)?;
        quantity::parse_parameters(&text).map(ParameterCount).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug)]
struct Dtype(String, u64);

impl<'de> Deserialize<'de> for Dtype {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        quantity::dtype_bytes_eighths(&text).map(|eighths| Dtype(text, eighths)).map_err(serde::de::Error::custom)
    }
}

/// A scalar given as a string or a number (`80Gi`, `1024`, `7e9`).
fn scalar_text<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        Int(u64),
        Float(f64),
        Text(String),
    }
    Ok(match Scalar::deserialize(deserializer)? {
        Scalar::Int(value) => value.to_string(),
        Scalar::Float(value) => value.to_string(),
        Scalar::Text(text) => text,
    })
}

fn scopes(topology: Option<TopologyEntry>) -> (Option<Scope>, Option<Scope>) {
    match topology {
        Some(topology) => {
            (topology.required.as_deref().map(Scope::parse), topology.preferred.as_deref().map(Scope::parse))
        }
        None => (None, None),
    }
}

/// One `gangs[]` entry as a gang spec; an error is `(line, message)`.
fn gang_spec(mut entry: GangEntry, text: &str, line: Option<usize>) -> Result<GangSpec, (Option<usize>, String)> {
    let name = entry.name.clone();
    let gang_error = |message: String| (line, format!("gang `{name}`: {message}"));
    let (required, preferred) = scopes(entry.topology.take());
    let mut shape = ShapeEntry {
        members: entry.members,
        gpus_per_member: entry.gpus_per_member,
        tensor_parallel: entry.tensor_parallel,
        pipeline_parallel: entry.pipeline_parallel,
        min_gpu_memory: entry.min_gpu_memory.take(),
        model: entry.model.take(),
        mig: entry.mig.take(),
    };
    let Some(roles) = entry.roles.take() else {
        let memory = shape.memory().map_err(gang_error)?;
        return Ok(GangSpec {
            name: entry.name,
            replicas: entry.replicas,
            members: shape.members.unwrap_or(1),
            // A member on a MIG device has one GPU: `mig` alone says so.
            gpus_per_member: match (shape.gpus_per_member, &memory) {
                (Some(gpus), _) => gpus,
                (None, MemoryNeed::MigProfile(_)) => 1,
                (None, _) => return Err(gang_error("gpusPerMember is missing (or give roles)".into())),
            },
            tensor_parallel: shape.tensor_parallel.unwrap_or(1),
            pipeline_parallel: shape.pipeline_parallel.unwrap_or(1),
            memory,
            required,
            preferred,
            roles: Vec::new(),
            pool: None,
        });
    };
    if roles.is_empty() {
        return Err(gang_error("roles must list at least one role".into()));
    }
    if !shape.is_empty() {
        return Err(gang_error(
            "with roles, members, gpusPerMember, tensorParallel, pipelineParallel, minGpuMemory, model and mig \
             belong to each role, not to the gang"
                .into(),
        ));
    }
    let mut specs = Vec::with_capacity(roles.len());
    for role in roles {
        let role_line = lines_naming(text, &role.name, false).find(|&l| line.is_none_or(|g| l > g)).or(line);
        let role_name = role.name.clone();
        specs.push(
            role_spec(role).map_err(|message| (role_line, format!("gang `{name}`: role `{role_name}`: {message}")))?,
        );
    }
    Ok(GangSpec {
        replicas: entry.replicas,
        required,
        preferred,
        roles: specs,
        ..GangSpec::shape(&entry.name, 1, 1, 1)
    })
}

/// One `roles[]` entry as a role spec (defaults: 1 member, TP 1, PP 1); an error says why
/// its memory cannot be read.
fn role_spec(role: RoleEntry) -> Result<RoleSpec, String> {
    let mut shape =
        ShapeEntry { min_gpu_memory: role.min_gpu_memory, model: role.model, mig: role.mig, ..ShapeEntry::default() };
    let memory = shape.memory()?;
    let (required, preferred) = scopes(role.topology);
    Ok(RoleSpec {
        name: role.name,
        members: role.members.unwrap_or(1),
        gpus_per_member: role.gpus_per_member,
        tensor_parallel: role.tensor_parallel.unwrap_or(1),
        pipeline_parallel: role.pipeline_parallel.unwrap_or(1),
        memory,
        required,
        preferred,
        slices: role.slices.map(|s| Slicing {
            members: s.members,
            scope: Scope::parse(&s.required),
            exclusive: s.exclusive,
        }),
    })
}

/// The longest `topoplace.io/roles` value read, in bytes: 16 roles with every field fit in
/// well under it (Kubernetes allows 256 KiB for all of a pod's annotations together).
pub const ROLES_ANNOTATION_BYTES_MAX: usize = 16 * 1024;

/// A replica's roles as a pod's `topoplace.io/roles` annotation gives them: a list of the
/// workload file's `roles[]` entries, in JSON or YAML flow syntax (`[{name: leader,
/// gpusPerMember: 4}, {name: worker, members: 2, gpusPerMember: 8, tensorParallel: 8}]`),
/// with the same fields, defaults and checks. Whether the roles make a valid replica is
/// checked where they are used ([`topoplace_engine::workload::GangSpec::validate`]). Errors
/// name the entry and field (`[1].gpusPerMember: ...`), an unknown field, a value over
/// [`ROLES_ANNOTATION_BYTES_MAX`] or more than
/// [`topoplace_engine::workload::REPLICA_ROLES_MAX`] roles.
pub fn roles_annotation(text: &str) -> Result<Vec<RoleSpec>, String> {
    if text.len() > ROLES_ANNOTATION_BYTES_MAX {
        return Err(format!("{} bytes, above the limit of {ROLES_ANNOTATION_BYTES_MAX}", text.len()));
    }
    let deserializer = serde_yaml_ng::Deserializer::from_str(text);
    let entries: Vec<RoleEntry> = serde_path_to_error::deserialize(deserializer).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner().to_string();
        // The YAML error starts with its own, shorter path (`.[1]: `): the full one replaces it.
        let message = match inner.split_once(": ") {
            Some((own, rest)) if own.starts_with('.') => rest.to_string(),
            _ => inner,
        };
        if path == "." {
            message
        } else {
            format!("{path}: {message}")
        }
    })?;
    if entries.is_empty() {
        return Err("lists no role".into());
    }
    let max = topoplace_engine::workload::REPLICA_ROLES_MAX;
    if entries.len() > max {
        return Err(format!("lists {} roles, above the limit of {max}", entries.len()));
    }
    entries
        .into_iter()
        .map(|role| {
            let name = role.name.clone();
            role_spec(role).map_err(|message| format!("role `{name}`: {message}"))
        })
        .collect()
}

/// The line of the role an error names, after its gang's line; else the gang's line.
fn role_line(text: &str, gang_line: Option<usize>, error: &WorkloadError) -> Option<usize> {
    let role = match error {
        WorkloadError::DuplicateRole { role, .. } => {
            // The second occurrence is the mistake.
            return lines_naming(text, role, false).filter(|&l| gang_line.is_none_or(|g| l > g)).nth(1).or(gang_line);
        }
        WorkloadError::RoleZero { role, .. }
        | WorkloadError::GpuLessRole { role, .. }
        | WorkloadError::SliceShape { role, .. } => role.as_str(),
        // A role's own shape errors name the gang `gang/role`.
        WorkloadError::Zero { gang, .. }
        | WorkloadError::TooLarge { gang, .. }
        | WorkloadError::TensorParallelShape { gang, .. }
        | WorkloadError::ParallelismShape { gang, .. }
        | WorkloadError::Overhead { gang, .. }
        | WorkloadError::MigProfile { gang, .. }
        | WorkloadError::MigShape { gang, .. } => match gang.rsplit_once('/') {
            Some((_, role)) => role,
            None => return gang_line,
        },
        _ => return gang_line,
    };
    lines_naming(text, role, false).find(|&l| gang_line.is_none_or(|g| l > g)).or(gang_line)
}

/// Parses a workload file's text into a validated workload.
pub fn parse(file: &str, text: &str) -> Result<Workload, FileError> {
    check_header(file, text, "Workload")?;
    let parsed: WorkloadFile = super::from_yaml_str(file, text)?;
    let mut gangs = Vec::with_capacity(parsed.spec.gangs.len());
    for entry in parsed.spec.gangs {
        let line = line_of_name(text, &entry.name);
        let gang = gang_spec(entry, text, line).map_err(|(line, message)| FileError::at_line(file, line, message))?;
        gang.validate().map_err(|e| FileError::at_line(file, role_line(text, line, &e), e.to_string()))?;
        gangs.push(gang);
    }
    let workload = Workload { name: parsed.metadata.name, gangs };
    workload.validate().map_err(|e| {
        let line = match &e {
            // The second occurrence is the mistake.
            topoplace_engine::workload::WorkloadError::DuplicateGang { gang } => lines_naming(text, gang, false).nth(1),
            _ => None,
        };
        FileError::at_line(file, line, e.to_string())
    })?;
    Ok(workload)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "apiVersion: topoplace.io/v1alpha1\nkind: Workload\n";

    #[test]
    fn models_are_sized_and_defaults_apply() {
        let text = format!("{HEADER}spec:\n  gangs:\n  - name: llama\n    gpusPerMember: 8\n    tensorParallel: 8\n    model: {{parameters: 70B, dtype: bf16, kvCache: 40Gi}}\n    topology: {{preferred: rack}}\n");
        let workload = parse("w.yaml", &text).expect("valid");
        let gang = &workload.gangs[0];
        assert_eq!((gang.replicas, gang.members, gang.pipeline_parallel), (1, 1, 1));
        // (140 GB + 40 GiB) / 8 * 1.1, in MiB, rounded up.
        let bytes = ((140e9 + 40.0 * 1024f64.powi(3)) / 8.0 * 1.1f64).ceil() as u64;
        assert_eq!(gang.memory_floor_mib(), bytes.div_ceil(1024 * 1024));
        assert_eq!(gang.preferred, Some(Scope::Level("rack".into())));
    }

    #[test]
    fn roles_annotation_reads_the_file_syntax_and_names_what_is_wrong() {
        let roles = roles_annotation(
            r#"[{"name": "leader", "gpusPerMember": 4}, {"name": "worker", "members": 2, "gpusPerMember": 8, "tensorParallel": 8, "topology": {"required": "leaf"}}]"#,
        )
        .expect("JSON");
        assert_eq!(roles.len(), 2);
        assert_eq!((roles[0].members, roles[0].gpus_per_member, roles[0].tensor_parallel), (1, 4, 1));
        assert_eq!((roles[1].members, roles[1].gpus_per_member, roles[1].tensor_parallel), (2, 8, 8));
        assert_eq!(roles[1].required, Some(Scope::Level("leaf".into())));
        let flow = roles_annotation("[{name: a, members: 4, gpusPerMember: 4, slices: {members: 2, required: leaf}}]")
            .expect("YAML flow");
        assert_eq!(flow[0].slices.as_ref().map(|s| s.members), Some(2));

        let typo = roles_annotation(r#"[{"name": "a", "gpusPerMember": 1}, {"name": "b", "gpus": 8}]"#).unwrap_err();
        assert!(typo.starts_with("[1].gpus: unknown field `gpus`"), "{typo}");
        let memory = roles_annotation("[{name: a, gpusPerMember: 1, minGpuMemory: lots}]").unwrap_err();
        assert!(memory.starts_with("[0].minGpuMemory: `lots` is not a memory size"), "{memory}");
        assert_eq!(roles_annotation("[]").unwrap_err(), "lists no role");
        let many = format!("[{}]", vec!["{name: a, gpusPerMember: 1}"; 17].join(", "));
        assert!(roles_annotation(&many).unwrap_err().contains("17 roles, above the limit of 16"));
        let long = " ".repeat(ROLES_ANNOTATION_BYTES_MAX + 1);
        assert!(roles_annotation(&long).unwrap_err().contains("above the limit"));
        assert!(roles_annotation("{name: a}").is_err());
    }

    #[test]
    fn bad_values_name_line_field_and_gang() {
        let text = format!("{HEADER}spec:\n  gangs:\n  - name: a\n    gpusPerMember: 1\n  - name: b\n    gpusPerMember: 4\n    minGpuMemory: 80 gigs\n");
        let message = parse("w.yaml", &text).unwrap_err().to_string();
        // serde attributes a custom value error to the entry that holds it.
        assert!(message.starts_with("w.yaml:7:5: spec.gangs[1]"), "{message}");
        assert!(message.contains("`80 gigs` is not a memory size") && message.ends_with("(gang `b`)"), "{message}");

        let text = format!("{HEADER}spec:\n  gangs:\n  - name: a\n    gpusPerMember: 4\n    tensorParallel: 3\n");
        let message = parse("w.yaml", &text).unwrap_err().to_string();
        assert_eq!(message, "w.yaml:5: gang `a`: tensorParallel 3 and gpusPerMember 4 must divide one another");

        let text = format!("{HEADER}spec:\n  gangs:\n  - name: a\n    gpusPerMember: 4\n    minGpuMemory: 1Gi\n    model: {{parameters: 1B, dtype: fp8}}\n");
        assert!(parse("w.yaml", &text).unwrap_err().to_string().contains("either minGpuMemory or model"));

        let text =
            format!("{HEADER}spec:\n  gangs:\n  - name: a\n    gpusPerMember: 1\n  - name: a\n    gpusPerMember: 1\n");
        assert_eq!(
            parse("w.yaml", &text).unwrap_err().to_string(),
            "w.yaml:7: gang `a`: name appears twice in the workload"
        );
    }
}
