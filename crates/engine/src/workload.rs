//! Gangs: what one replica of a workload needs (members, GPUs per member, tensor and
//! pipeline parallelism, a per-GPU memory floor, topology constraints), and the sizing
//! math that turns a model (parameters, dtype, KV cache) into that memory floor.
//!
//! A replica may have *roles* (prefill and decode workers, a leader unlike its workers): each
//! role is a homogeneous [`Gang`] of its own shape, optionally cut into *slices* that must
//! each stay inside one domain, and the replica has a scope of its own over all its roles
//! ([`Replica`]). A gang without roles is a replica of one role.
//!
//! A gang's GPUs come in *units*: the smallest group of members that must share one
//! NVLink domain. When tensor parallelism fits inside a member (`tp <= gpus per member`)
//! a unit is one member; when it does not, a unit is the `tp / gpus` members of one
//! tensor-parallel group.

use thiserror::Error;

use crate::topology::{Cluster, DevicePool, Host, ProductId, HOST_GPUS_MAX};

/// Members of one gang; larger gangs are rejected at the boundary.
pub const GANG_MEMBERS_MAX: u32 = 4_096;
/// Replicas of one gang entry in a workload.
pub const GANG_REPLICAS_MAX: u32 = 10_000;
/// Replicas of a whole workload, every entry's together: a plan places them one after
/// another, each a search (a workload file of 300,000 entries with roles ran for minutes).
pub const WORKLOAD_REPLICAS_MAX: u64 = 20_000;
/// Bytes of a gang's name: a namespaced Kubernetes object name (63 + 1 + 253), and for a
/// role's own gang (`gang/role`) the role's name (1 + 63).
pub const GANG_NAME_BYTES_MAX: usize = 384;
/// Roles of one replica.
pub const REPLICA_ROLES_MAX: usize = 16;
/// Parts of one replica (a role, or each slice of a sliced role): the placement search makes
/// at least one planner call per part, within a budget of twice this.
pub const REPLICA_PARTS_MAX: u32 = 256;
/// Runtime overhead on top of weights and KV cache when a model is sized and the
/// workload does not say (CUDA context, activations, fragmentation of the allocator).
pub const RUNTIME_OVERHEAD_DEFAULT: f64 = 0.10;

/// Where a gang must (or would like to) stay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// All GPUs mutually reachable over NVLink: one host's NVLink domain or one clique.
    Nvlink,
    /// One host.
    Host,
    /// One domain of a topology level, by label key or short name (`rack`, `block`).
    Level(String),
}

impl Scope {
    pub fn parse(text: &str) -> Self {
        match text.trim() {
            "nvlink" => Scope::Nvlink,
            "host" | "node" | "kubernetes.io/hostname" => Scope::Host,
            other => Scope::Level(other.to_string()),
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::Nvlink => f.write_str("nvlink"),
            Scope::Host => f.write_str("host"),
            Scope::Level(level) => f.write_str(level),
        }
    }
}

/// A model to be sized into a per-GPU memory floor.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub parameters: u64,
    /// Bytes per parameter in eighths (bf16 = 16, fp4 = 4).
    pub dtype_eighths: u64,
    pub dtype: String,
    /// KV cache for the whole replica, bytes.
    pub kv_cache_bytes: u64,
    /// Fraction added for the runtime (0.10 = 10 %).
    pub overhead: f64,
}

impl ModelSpec {
    pub fn weight_bytes(&self) -> u64 {
        // Every parameter is resident, MoE experts included.
        (u128::from(self.parameters) * u128::from(self.dtype_eighths) / 8).min(u128::from(u64::MAX)) as u64
    }

    /// Bytes one GPU needs when the replica is split over `gpus` GPUs.
    pub fn per_gpu_bytes(&self, gpus: u64) -> u64 {
        let total = self.weight_bytes() as f64 + self.kv_cache_bytes as f64;
        (total / gpus.max(1) as f64 * (1.0 + self.overhead)).ceil() as u64
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum MemoryNeed {
    None,
    FloorMib(u64),
    Model(ModelSpec),
    /// Each member takes one MIG device of this profile (`2g.20gb`), of any GPU product, on
    /// nodes of the single MIG strategy (`topology::NodeSpec::mig_profile`). Members of one GPU
    /// without tensor parallelism only.
    MigProfile(String),
}

/// How a role's members are cut into slices, each of which must stay inside one domain
/// (Kueue's podset slices, KAI's subgroups with a topology of their own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slicing {
    /// Members per slice: divides the role's members and is a whole number of its
    /// tensor-parallel groups, so no group straddles two slices.
    pub members: u32,
    /// Where each slice must stay.
    pub scope: Scope,
    /// Each slice in a domain of `scope` of its own (a host of its own for `host`): no two
    /// slices of the role share one. LeaderWorkerSet's `subgroup-exclusive-topology` asks
    /// this of its subgroups (pod anti-affinity between subgroups, LWS
    /// `pkg/webhooks/pod_webhook.go`).
    pub exclusive: bool,
}

/// One role of a replica as a workload gives it (`spec.gangs[].roles[]`).
#[derive(Debug, Clone, PartialEq)]
pub struct RoleSpec {
    /// Unique within the replica (`leader`, `prefill`, `decode`).
    pub name: String,
    pub members: u32,
    /// 0: the role's pods take no GPUs (a launcher or router leader on a CPU node); the GPU
    /// planner leaves them to kube-scheduler and does not wait for them.
    pub gpus_per_member: u32,
    pub tensor_parallel: u32,
    pub pipeline_parallel: u32,
    pub memory: MemoryNeed,
    /// The role's own scope: all its members inside one such domain.
    pub required: Option<Scope>,
    pub preferred: Option<Scope>,
    pub slices: Option<Slicing>,
}

impl RoleSpec {
    /// A role of `members` pods with `gpus_per_member` GPUs and tensor parallelism
    /// `tensor_parallel`; no pipeline parallelism, memory floor, scope or slices.
    pub fn shape(name: &str, members: u32, gpus_per_member: u32, tensor_parallel: u32) -> Self {
        RoleSpec {
            name: name.to_string(),
            members,
            gpus_per_member,
            tensor_parallel,
            pipeline_parallel: 1,
            memory: MemoryNeed::None,
            required: None,
            preferred: None,
            slices: None,
        }
    }

    /// The role's members as one gang spec named `gang/role` (how errors name the role).
    fn as_gang_spec(&self, gang: &str) -> GangSpec {
        GangSpec {
            name: format!("{gang}/{}", self.name),
            replicas: 1,
            members: self.members,
            gpus_per_member: self.gpus_per_member,
            tensor_parallel: self.tensor_parallel,
            pipeline_parallel: self.pipeline_parallel,
            memory: self.memory.clone(),
            required: self.required.clone(),
            preferred: self.preferred.clone(),
            roles: Vec::new(),
            pool: None,
        }
    }

    fn validate(&self, gang: &str) -> Result<(), WorkloadError> {
        let role = || (gang.to_string(), self.name.clone());
        if self.name.trim().is_empty() {
            return Err(WorkloadError::EmptyRoleName { gang: gang.to_string() });
        }
        if !is_dns_label(&self.name) {
            let (gang, role) = role();
            return Err(WorkloadError::RoleName { gang, role });
        }
        if self.members == 0 {
            let (gang, role) = role();
            return Err(WorkloadError::RoleZero { gang, role, field: "members" });
        }
        if self.gpus_per_member == 0 {
            // A GPU-less role is counted, not placed: nothing about GPUs may be asked of it.
            let asks_gpu_things = self.tensor_parallel > 1
                || self.pipeline_parallel > 1
                || self.memory != MemoryNeed::None
                || self.slices.is_some()
                || self.required.is_some()
                || self.preferred.is_some();
            if asks_gpu_things {
                let (gang, role) = role();
                return Err(WorkloadError::GpuLessRole { gang, role });
            }
            return Ok(());
        }
        let spec = self.as_gang_spec(gang);
        spec.validate()?;
        if let Some(slicing) = &self.slices {
            let unit = spec.expand().remove(0).members_per_unit();
            check_slicing(gang, &self.name, self.members, unit, slicing, &self.required)?;
        }
        Ok(())
    }
}

/// Tensor parallelism and GPUs per member must divide one another (a TP group is whole
/// members, or a member holds whole TP groups).
fn check_tensor_parallel(gang: &str, tp: u32, gpus: u32) -> Result<(), WorkloadError> {
    if !tp.is_multiple_of(gpus) && !gpus.is_multiple_of(tp) {
        return Err(WorkloadError::TensorParallelShape { gang: gang.to_string(), tp, gpus });
    }
    Ok(())
}

/// The parts a role is searched as: one, or one per slice.
fn parts_of(members: u32, slices: Option<&Slicing>) -> u64 {
    slices.map_or(1, |s| u64::from(members / s.members.max(1)))
}

fn check_parts(gang: &str, parts: u64) -> Result<(), WorkloadError> {
    if parts > u64::from(REPLICA_PARTS_MAX) {
        return Err(WorkloadError::TooManyParts { gang: gang.to_string(), parts, max: REPLICA_PARTS_MAX });
    }
    Ok(())
}

/// Whether `name` is an RFC 1123 label (lowercase letters, digits and `-`, at most 63, starting
/// and ending with a letter or digit), as Kubernetes label values and names of roles are.
fn is_dns_label(name: &str) -> bool {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| alnum(c) || c == '-')
        && name.starts_with(alnum)
        && name.ends_with(alnum)
}

/// A role's slices: whole tensor-parallel units that divide the role, and a role whose own
/// scope is a level or none (slices of a role that must sit in one host or clique would have
/// nothing to choose).
fn check_slicing(
    gang: &str,
    role: &str,
    members: u32,
    unit: u32,
    slicing: &Slicing,
    own: &Option<Scope>,
) -> Result<(), WorkloadError> {
    if slicing.members == 0 || !members.is_multiple_of(slicing.members) || !slicing.members.is_multiple_of(unit.max(1))
    {
        return Err(WorkloadError::SliceShape {
            gang: gang.to_string(),
            role: role.to_string(),
            slice: slicing.members,
            members,
            unit,
        });
    }
    if matches!(own, Some(Scope::Host | Scope::Nvlink)) {
        return Err(WorkloadError::SlicedRoleScope { gang: gang.to_string(), role: role.to_string() });
    }
    if slicing.exclusive && slicing.scope == Scope::Nvlink {
        return Err(WorkloadError::RoleShape {
            gang: gang.to_string(),
            role: role.to_string(),
            what: "exclusive slices need a level or `host` scope, not `nvlink`".into(),
        });
    }
    Ok(())
}

/// One entry of a workload: `replicas` independent gangs of the same shape, given either by
/// the flat fields (one role) or by `roles`.
#[derive(Debug, Clone, PartialEq)]
pub struct GangSpec {
    pub name: String,
    pub replicas: u32,
    /// The flat fields below describe the gang when `roles` is empty, and are unused
    /// otherwise.
    pub members: u32,
    pub gpus_per_member: u32,
    pub tensor_parallel: u32,
    pub pipeline_parallel: u32,
    pub memory: MemoryNeed,
    /// With roles: the scope of the whole replica (all roles inside one such domain).
    pub required: Option<Scope>,
    pub preferred: Option<Scope>,
    /// The replica's roles; empty for a gang of one shape.
    pub roles: Vec<RoleSpec>,
    /// Only hosts whose devices are offered as this resource (every role's, with roles): a
    /// pod's devices come from the pool its resource names. `None` (files, gRPC): any pool.
    pub pool: Option<DevicePool>,
}

#[derive(Debug, Error, PartialEq)]
pub enum WorkloadError {
    #[error("gang `{gang}`: {field} must be at least 1")]
    Zero { gang: String, field: &'static str },
    #[error("gang `{gang}`: {field} is {value}, above the limit of {max}")]
    TooLarge { gang: String, field: &'static str, value: u64, max: u64 },
    #[error("gang `{gang}`: tensorParallel {tp} and gpusPerMember {gpus} must divide one another")]
    TensorParallelShape { gang: String, tp: u32, gpus: u32 },
    #[error(
        "gang `{gang}`: members x gpusPerMember = {total} GPUs is not a multiple of \
         tensorParallel x pipelineParallel = {model_gpus}"
    )]
    ParallelismShape { gang: String, total: u64, model_gpus: u64 },
    #[error("gang `{gang}`: name appears twice in the workload")]
    DuplicateGang { gang: String },
    #[error("gang `{gang}`: name must not be empty")]
    EmptyName { gang: String },
    #[error("gang `{shown}...`: name is {bytes} bytes, above the limit of {max}")]
    LongName { shown: String, bytes: usize, max: usize },
    #[error("the workload has {replicas} or more replicas in all, above the limit of {max}")]
    TooManyReplicas { replicas: u64, max: u64 },
    #[error("gang `{gang}`: model.overhead {overhead} must be between 0 and 10")]
    Overhead { gang: String, overhead: f64 },
    #[error(
        "gang `{gang}`: mig `{profile}` is not a MIG profile (like 2g.20gb; at most {} letters, digits, `.`, `+` \
         and `-`)",
        crate::topology::MIG_PROFILE_BYTES_MAX
    )]
    MigProfile { gang: String, profile: String },
    #[error(
        "gang `{gang}`: devices of nvidia.com/mig-{pool} are MIG devices of profile {pool}: the gang must ask for \
         that profile, and have no roles"
    )]
    MigPool { gang: String, pool: String },
    #[error(
        "gang `{gang}`: a member on a MIG device has one GPU and no tensor parallelism (gpusPerMember {gpus}, \
         tensorParallel {tensor_parallel})"
    )]
    MigShape { gang: String, gpus: u32, tensor_parallel: u32 },
    #[error("gang `{gang}`: a role's name must not be empty")]
    EmptyRoleName { gang: String },
    #[error("gang `{gang}`: role `{role}` appears twice")]
    DuplicateRole { gang: String, role: String },
    #[error("gang `{gang}`: role `{role}`: {field} must be at least 1")]
    RoleZero { gang: String, role: String, field: &'static str },
    #[error(
        "gang `{gang}`: role `{role}` takes no GPUs (gpusPerMember 0), so it may not ask for \
         tensorParallel, pipelineParallel, GPU memory (minGpuMemory, model, mig), a topology or slices"
    )]
    GpuLessRole { gang: String, role: String },
    #[error(
        "gang `{gang}`: role `{role}`: slices.members {slice} must divide the role's {members} \
         members and be a multiple of its tensor-parallel group of {unit} members"
    )]
    SliceShape { gang: String, role: String, slice: u32, members: u32, unit: u32 },
    #[error("gang `{gang}`: no role takes GPUs, so there is nothing to place")]
    NoGpuRole { gang: String },
    #[error(
        "gang `{gang}`: role name `{role}` must be a DNS label (lowercase letters, digits and '-', \
         at most 63 characters)"
    )]
    RoleName { gang: String, role: String },
    #[error(
        "gang `{gang}`: role `{role}` has slices, so its own topology.required must be a level \
         (leaf, rack, block) or absent, not host or nvlink"
    )]
    SlicedRoleScope { gang: String, role: String },
    #[error("gang `{gang}`: role `{role}`: {what}")]
    RoleShape { gang: String, role: String, what: String },
    #[error("gang `{gang}`: {parts} roles and slices, above the limit of {max}; use larger slices")]
    TooManyParts { gang: String, parts: u64, max: u32 },
    #[error("gang `{gang}`: {roles} roles, above the limit of {max}")]
    TooManyRoles { gang: String, roles: usize, max: usize },
}

/// One gang (one replica) as the placement engine sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Gang {
    pub name: String,
    /// The workload entry it came from.
    pub spec_name: String,
    pub members: u32,
    pub gpus_per_member: u32,
    pub tensor_parallel: u32,
    pub pipeline_parallel: u32,
    pub memory_floor_mib: u64,
    /// Only MIG devices of this profile ([`MemoryNeed::MigProfile`]).
    pub mig_profile: Option<String>,
    pub required: Option<Scope>,
    pub preferred: Option<Scope>,
    /// Only hosts of this device pool ([`GangSpec::pool`]); `None`: any.
    pub pool: Option<DevicePool>,
}

impl Gang {
    pub fn total_gpus(&self) -> u64 {
        u64::from(self.members) * u64::from(self.gpus_per_member)
    }

    /// Members in one unit (see the module doc).
    pub fn members_per_unit(&self) -> u32 {
        if self.tensor_parallel > self.gpus_per_member {
            self.tensor_parallel / self.gpus_per_member
        } else {
            1
        }
    }

    pub fn unit_gpus(&self) -> u32 {
        self.members_per_unit() * self.gpus_per_member
    }

    pub fn units(&self) -> u32 {
        self.members / self.members_per_unit()
    }
}

impl GangSpec {
    /// One replica of `members` pods with `gpus_per_member` GPUs and tensor parallelism
    /// `tensor_parallel`; no pipeline parallelism, memory floor or topology constraint.
    pub fn shape(name: &str, members: u32, gpus_per_member: u32, tensor_parallel: u32) -> Self {
        GangSpec {
            name: name.to_string(),
            replicas: 1,
            members,
            gpus_per_member,
            tensor_parallel,
            pipeline_parallel: 1,
            memory: MemoryNeed::None,
            required: None,
            preferred: None,
            roles: Vec::new(),
            pool: None,
        }
    }

    /// One replica of `roles`, with no replica scope.
    pub fn with_roles(name: &str, roles: Vec<RoleSpec>) -> Self {
        GangSpec { roles, ..GangSpec::shape(name, 1, 1, 1) }
    }

    pub fn validate(&self) -> Result<(), WorkloadError> {
        let gang = || self.name.clone();
        if self.name.trim().is_empty() {
            return Err(WorkloadError::EmptyName { gang: gang() });
        }
        if self.name.len() > GANG_NAME_BYTES_MAX {
            let shown: String = self.name.chars().take(40).collect();
            return Err(WorkloadError::LongName { shown, bytes: self.name.len(), max: GANG_NAME_BYTES_MAX });
        }
        if let Some(DevicePool::Mig(pool)) = &self.pool {
            let asked = match &self.memory {
                MemoryNeed::MigProfile(profile) if self.roles.is_empty() => profile.trim(),
                _ => "",
            };
            if !asked.eq_ignore_ascii_case(pool) {
                return Err(WorkloadError::MigPool { gang: gang(), pool: pool.clone() });
            }
        }
        if !self.roles.is_empty() {
            return self.validate_roles();
        }
        for (field, value) in [
            ("replicas", self.replicas),
            ("members", self.members),
            ("gpusPerMember", self.gpus_per_member),
            ("tensorParallel", self.tensor_parallel),
            ("pipelineParallel", self.pipeline_parallel),
        ] {
            if value == 0 {
                return Err(WorkloadError::Zero { gang: gang(), field });
            }
        }
        for (field, value, max) in [
            ("members", self.members, GANG_MEMBERS_MAX),
            ("replicas", self.replicas, GANG_REPLICAS_MAX),
            ("gpusPerMember", self.gpus_per_member, HOST_GPUS_MAX as u32),
        ] {
            if value > max {
                return Err(WorkloadError::TooLarge { gang: gang(), field, value: value.into(), max: max.into() });
            }
        }
        let (tp, gpus) = (self.tensor_parallel, self.gpus_per_member);
        check_tensor_parallel(&self.name, tp, gpus)?;
        let total = u64::from(self.members) * u64::from(gpus);
        let model_gpus = u64::from(tp) * u64::from(self.pipeline_parallel);
        if total % model_gpus != 0 {
            return Err(WorkloadError::ParallelismShape { gang: gang(), total, model_gpus });
        }
        if let MemoryNeed::Model(model) = &self.memory {
            if !(0.0..=10.0).contains(&model.overhead) || model.overhead.is_nan() {
                return Err(WorkloadError::Overhead { gang: gang(), overhead: model.overhead });
            }
        }
        if let MemoryNeed::MigProfile(profile) = &self.memory {
            if !crate::topology::product::is_mig_profile(profile.trim()) {
                return Err(WorkloadError::MigProfile { gang: gang(), profile: profile.clone() });
            }
            if gpus != 1 || tp != 1 {
                return Err(WorkloadError::MigShape { gang: gang(), gpus, tensor_parallel: tp });
            }
        }
        Ok(())
    }

    fn validate_roles(&self) -> Result<(), WorkloadError> {
        let gang = || self.name.clone();
        if self.replicas == 0 {
            return Err(WorkloadError::Zero { gang: gang(), field: "replicas" });
        }
        if self.replicas > GANG_REPLICAS_MAX {
            let (value, max) = (self.replicas.into(), GANG_REPLICAS_MAX.into());
            return Err(WorkloadError::TooLarge { gang: gang(), field: "replicas", value, max });
        }
        if self.roles.len() > REPLICA_ROLES_MAX {
            return Err(WorkloadError::TooManyRoles { gang: gang(), roles: self.roles.len(), max: REPLICA_ROLES_MAX });
        }
        let mut names = std::collections::BTreeSet::new();
        for role in &self.roles {
            role.validate(&self.name)?;
            if !names.insert(role.name.as_str()) {
                return Err(WorkloadError::DuplicateRole { gang: gang(), role: role.name.clone() });
            }
        }
        let members: u64 = self.roles.iter().map(|r| u64::from(r.members)).sum();
        if members > u64::from(GANG_MEMBERS_MAX) {
            let max = GANG_MEMBERS_MAX.into();
            return Err(WorkloadError::TooLarge {
                gang: gang(),
                field: "roles[].members (summed)",
                value: members,
                max,
            });
        }
        if self.roles.iter().all(|r| r.gpus_per_member == 0) {
            return Err(WorkloadError::NoGpuRole { gang: gang() });
        }
        let parts = self.roles.iter().map(|r| parts_of(r.members, r.slices.as_ref())).sum();
        check_parts(&self.name, parts)
    }

    /// Per-GPU memory floor in MiB: given, or derived from the model over TP x PP GPUs.
    pub fn memory_floor_mib(&self) -> u64 {
        match &self.memory {
            MemoryNeed::None | MemoryNeed::MigProfile(_) => 0,
            MemoryNeed::FloorMib(mib) => *mib,
            MemoryNeed::Model(model) => {
                let gpus = u64::from(self.tensor_parallel) * u64::from(self.pipeline_parallel);
                crate::quantity::bytes_to_mib_ceil(model.per_gpu_bytes(gpus))
            }
        }
    }

    /// The replica names of this entry: `name` (one replica) or `name-0`, `name-1`, ...
    fn replica_names(&self) -> impl Iterator<Item = String> + '_ {
        (0..self.replicas).map(
            |replica| {
                if self.replicas == 1 {
                    self.name.clone()
                } else {
                    format!("{}-{replica}", self.name)
                }
            },
        )
    }

    /// The independent replicas of this entry ([`GangSpec::expand`] for an entry without
    /// roles, each a replica of one role).
    pub fn expand_replicas(&self) -> Vec<Replica> {
        if self.roles.is_empty() {
            return self.expand().into_iter().map(Replica::of_gang).collect();
        }
        self.replica_names()
            .map(|name| Replica {
                roles: self
                    .roles
                    .iter()
                    .map(|role| Role {
                        name: role.name.clone(),
                        members: role.members,
                        gang: (role.gpus_per_member > 0).then(|| {
                            let mut gang = role.as_gang_spec(&name).expand().remove(0);
                            gang.spec_name = self.name.clone();
                            gang.pool = self.pool.clone();
                            gang
                        }),
                        slices: role.slices.clone(),
                    })
                    .collect(),
                name,
                spec_name: self.name.clone(),
                required: self.required.clone(),
                preferred: self.preferred.clone(),
            })
            .collect()
    }

    /// The independent gangs of an entry without roles, named `name` (one replica) or
    /// `name-0`, ...; an entry with roles has none ([`GangSpec::expand_replicas`]).
    pub fn expand(&self) -> Vec<Gang> {
        if !self.roles.is_empty() {
            return Vec::new();
        }
        let floor = self.memory_floor_mib();
        self.replica_names()
            .map(|name| Gang {
                name,
                spec_name: self.name.clone(),
                members: self.members,
                gpus_per_member: self.gpus_per_member,
                tensor_parallel: self.tensor_parallel,
                pipeline_parallel: self.pipeline_parallel,
                memory_floor_mib: floor,
                mig_profile: match &self.memory {
                    // Profiles are compared ignoring case (NVIDIA writes them lower case).
                    MemoryNeed::MigProfile(profile) => Some(profile.trim().to_ascii_lowercase()),
                    _ => None,
                },
                required: self.required.clone(),
                preferred: self.preferred.clone(),
                pool: self.pool.clone(),
            })
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Workload {
    pub name: String,
    pub gangs: Vec<GangSpec>,
}

impl Workload {
    pub fn validate(&self) -> Result<(), WorkloadError> {
        let mut names = std::collections::BTreeSet::new();
        let mut replicas = 0u64;
        for gang in &self.gangs {
            gang.validate()?;
            if !names.insert(gang.name.as_str()) {
                return Err(WorkloadError::DuplicateGang { gang: gang.name.clone() });
            }
            replicas += u64::from(gang.replicas);
            if replicas > WORKLOAD_REPLICAS_MAX {
                return Err(WorkloadError::TooManyReplicas { replicas, max: WORKLOAD_REPLICAS_MAX });
            }
        }
        Ok(())
    }

    /// The gangs of the entries without roles ([`GangSpec::expand`]).
    pub fn expand(&self) -> Vec<Gang> {
        self.gangs.iter().flat_map(GangSpec::expand).collect()
    }

    /// Every replica, with or without roles ([`GangSpec::expand_replicas`]).
    pub fn replicas(&self) -> Vec<Replica> {
        self.gangs.iter().flat_map(GangSpec::expand_replicas).collect()
    }

    /// Whether some entry has roles (and so needs [`Workload::replicas`]).
    pub fn has_roles(&self) -> bool {
        self.gangs.iter().any(|g| !g.roles.is_empty())
    }
}

/// One role of a replica as the planner sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Role {
    pub name: String,
    pub members: u32,
    /// The role's members as one homogeneous gang (named `replica/role`, or the replica's
    /// own name for a gang without roles); `None` when they take no GPUs.
    pub gang: Option<Gang>,
    pub slices: Option<Slicing>,
}

/// One replica: its roles are placed together, whole or not at all, every role inside its
/// own scope and all of them inside the replica's.
#[derive(Debug, Clone, PartialEq)]
pub struct Replica {
    pub name: String,
    /// The workload entry it came from.
    pub spec_name: String,
    pub roles: Vec<Role>,
    pub required: Option<Scope>,
    pub preferred: Option<Scope>,
}

impl Replica {
    /// A gang of one shape as a replica of one role (named after the gang).
    pub fn of_gang(gang: Gang) -> Self {
        Replica {
            name: gang.name.clone(),
            spec_name: gang.spec_name.clone(),
            roles: vec![Role { name: gang.name.clone(), members: gang.members, gang: Some(gang), slices: None }],
            required: None,
            preferred: None,
        }
    }

    /// The gang this replica is when it is a gang without roles ([`Replica::of_gang`]: one
    /// role named after the replica, without slices or replica scope): what
    /// [`crate::placement::Planner::place`] places as it always has, under the gang's name.
    pub fn as_single(&self) -> Option<&Gang> {
        match self.roles.as_slice() {
            [Role { gang: Some(gang), slices: None, .. }]
                if gang.name == self.name && self.required.is_none() && self.preferred.is_none() =>
            {
                Some(gang)
            }
            _ => None,
        }
    }

    /// The gangs of the roles that take GPUs.
    pub fn gangs(&self) -> impl Iterator<Item = &Gang> {
        self.roles.iter().filter_map(|r| r.gang.as_ref())
    }

    pub fn total_gpus(&self) -> u64 {
        self.gangs().map(Gang::total_gpus).sum()
    }

    /// Checks what the planner relies on, for a replica built directly rather than through
    /// a validated [`GangSpec`]: every role's gang has members of at least one GPU in whole
    /// tensor-parallel units, as many as the role counts; slices are whole units that divide
    /// the role; at most [`REPLICA_ROLES_MAX`] roles.
    pub fn check(&self) -> Result<(), WorkloadError> {
        let gang = || self.name.clone();
        if self.roles.len() > REPLICA_ROLES_MAX {
            return Err(WorkloadError::TooManyRoles { gang: gang(), roles: self.roles.len(), max: REPLICA_ROLES_MAX });
        }
        for role in &self.roles {
            let Some(shape) = &role.gang else { continue };
            let broken = |what: String| WorkloadError::RoleShape { gang: gang(), role: role.name.clone(), what };
            if shape.gpus_per_member == 0 || shape.tensor_parallel == 0 || shape.members == 0 {
                return Err(broken("members, gpusPerMember and tensorParallel must be at least 1".into()));
            }
            if shape.members != role.members {
                return Err(broken(format!("the role counts {} members, its gang {}", role.members, shape.members)));
            }
            check_tensor_parallel(&shape.name, shape.tensor_parallel, shape.gpus_per_member)?;
            if shape.members > GANG_MEMBERS_MAX || !shape.members.is_multiple_of(shape.members_per_unit()) {
                return Err(broken(format!(
                    "{} members are not whole tensor-parallel groups of {} (or above {GANG_MEMBERS_MAX})",
                    shape.members,
                    shape.members_per_unit()
                )));
            }
            if let Some(slicing) = &role.slices {
                check_slicing(
                    &self.name,
                    &role.name,
                    shape.members,
                    shape.members_per_unit(),
                    slicing,
                    &shape.required,
                )?;
            }
        }
        let parts = self.roles.iter().filter(|r| r.gang.is_some()).map(|r| parts_of(r.members, r.slices.as_ref()));
        check_parts(&self.name, parts.sum())
    }
}

/// How a model fits on one GPU product of a cluster.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct SizingRow {
    pub product: String,
    pub gpu_memory_mib: u64,
    pub gpus_per_host: u32,
    pub hosts_in_cluster: usize,
    /// The fewest GPUs whose memory holds weights, KV cache and overhead.
    pub min_gpus: u64,
    /// A practical layout: TP a power of two inside a host (over NVLink where the product has
    /// it, else PCIe), PP across hosts.
    pub tensor_parallel: u64,
    pub pipeline_parallel: u64,
    pub per_gpu_need_mib: u64,
    /// Replicas of that layout the whole product pool could hold if empty.
    pub replicas_if_empty: u64,
    pub note: String,
}

/// Sizes a model against every product of the cluster, on its whole GPUs (MIG devices take
/// one-GPU members only, so they hold no layout of several).
pub fn size_model(model: &ModelSpec, cluster: &Cluster) -> Vec<SizingRow> {
    let mut rows = Vec::new();
    for product in cluster.products() {
        let hosts: Vec<&Host> = cluster.hosts.iter().filter(|h| h.product == product && !h.partitioned()).collect();
        if !hosts.is_empty() {
            rows.push(size_on_product(model, &hosts, product));
        }
    }
    rows
}

fn size_on_product(model: &ModelSpec, hosts: &[&Host], product: ProductId) -> SizingRow {
    let memory = hosts.iter().map(|h| h.memory_mib).min().unwrap_or(product.get().memory_mib);
    let gpus_per_host = hosts.iter().map(|h| u32::from(h.gpu_count)).max().unwrap_or(1);
    let total_gpus: u64 = hosts.iter().map(|h| u64::from(h.gpu_count)).sum();
    let bytes_total = (model.weight_bytes() as f64 + model.kv_cache_bytes as f64) * (1.0 + model.overhead);
    let memory_bytes = memory as f64 * 1024.0 * 1024.0;
    let min_gpus = (bytes_total / memory_bytes).ceil().max(1.0) as u64;
    let host_gpus = u64::from(gpus_per_host);
    let has_nvlink = product.get().nvlink_gbps > 0;
    // TP a power of two inside a host (over PCIe where the product has no NVLink, as vLLM runs
    // it), PP across hosts.
    let tp_max = 1u64 << (63 - host_gpus.max(1).leading_zeros());
    let (tp, pp) = if min_gpus.next_power_of_two() <= tp_max {
        (min_gpus.next_power_of_two(), 1)
    } else {
        (tp_max, min_gpus.div_ceil(tp_max))
    };
    let gpus = tp * pp;
    let per_gpu = crate::quantity::bytes_to_mib_ceil(model.per_gpu_bytes(gpus));
    let mut notes = Vec::new();
    if tp > 1 && !has_nvlink {
        notes.push(format!("{} has no NVLink: tensor parallelism over PCIe", product.get().name));
    }
    if pp > 1 {
        notes.push(format!("spans {} hosts per replica", gpus.div_ceil(host_gpus)));
    }
    let note = notes.join("; ");
    SizingRow {
        product: product.get().name.to_string(),
        gpu_memory_mib: memory,
        gpus_per_host,
        hosts_in_cluster: hosts.len(),
        min_gpus,
        tensor_parallel: tp,
        pipeline_parallel: pp,
        per_gpu_need_mib: per_gpu,
        replicas_if_empty: total_gpus / gpus.max(1),
        note,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(members: u32, gpus: u32, tp: u32, pp: u32) -> GangSpec {
        GangSpec { pipeline_parallel: pp, ..GangSpec::shape("g", members, gpus, tp) }
    }

    #[test]
    fn sizing_follows_the_design_math() {
        // 1T parameters in bf16 are 2 TB of weights: 25 GPUs of 80 GB before overhead.
        let model = ModelSpec {
            parameters: 1_000_000_000_000,
            dtype_eighths: 16,
            dtype: "bf16".into(),
            kv_cache_bytes: 0,
            overhead: 0.0,
        };
        assert_eq!(model.weight_bytes(), 2_000_000_000_000);
        assert_eq!(model.per_gpu_bytes(25), 80_000_000_000);
        let mut gang = spec(4, 8, 8, 4);
        gang.memory = MemoryNeed::Model(ModelSpec { overhead: 0.1, kv_cache_bytes: 200_000_000_000, ..model });
        // (2 TB + 200 GB) / 32 GPUs * 1.1 = 75.625 GB = 72,121 MiB (rounded up).
        assert_eq!(gang.memory_floor_mib(), 75_625_000_000u64.div_ceil(1024 * 1024));
    }

    #[test]
    fn units_group_members_that_share_a_tensor_parallel_group() {
        let gang = &spec(4, 2, 8, 1).expand()[0];
        assert_eq!((gang.members_per_unit(), gang.unit_gpus(), gang.units()), (4, 8, 1));
        let gang = &spec(2, 8, 4, 1).expand()[0];
        assert_eq!((gang.members_per_unit(), gang.unit_gpus(), gang.units()), (1, 8, 2));
    }

    #[test]
    fn shapes_that_cannot_be_split_are_rejected_with_the_gang_named() {
        assert_eq!(
            spec(1, 4, 3, 1).validate(),
            Err(WorkloadError::TensorParallelShape { gang: "g".into(), tp: 3, gpus: 4 })
        );
        assert!(matches!(spec(3, 1, 2, 1).validate(), Err(WorkloadError::ParallelismShape { .. })));
        assert!(matches!(spec(0, 1, 1, 1).validate(), Err(WorkloadError::Zero { field: "members", .. })));
        assert!(spec(2, 8, 8, 2).validate().is_ok());
    }

    #[test]
    fn replicas_expand_to_independent_named_gangs() {
        let mut entry = spec(2, 8, 8, 2);
        entry.replicas = 3;
        let names: Vec<_> = entry.expand().into_iter().map(|g| g.name).collect();
        assert_eq!(names, ["g-0", "g-1", "g-2"]);
    }
}
