//! Messages of `topoplace.v1` to and from the core's types. Requests are checked here for
//! what needs no cluster: names, zero counts, the parallelism shape, the product name.

use tonic::Status;

use super::pb;
use topoplace_engine::ledger::mask_indices;
use topoplace_engine::placement::capacity::{CapacityReport, ReplicaCapacity};
use topoplace_engine::placement::exact::{ExactConfig, AUTO_VARIABLES_MAX};
use topoplace_engine::placement::replica::ReplicaPlacement;
use topoplace_engine::placement::{GangPlacement, RejectionGroup, ScoreComponents, SolverChoice, SolverInfo};
use topoplace_engine::topology::product::DeviceKind;
use topoplace_engine::topology::{product, Cluster, ProductId};
use topoplace_engine::workload::{GangSpec, MemoryNeed, RoleSpec, Scope, Slicing, WorkloadError};
use topoplace_online::reservation::{
    ClusterState, Explained, ExplainedReplica, GangRequest, NodeFit, PlanOutcome, PreemptionOutcome,
    ReplicaPlanOutcome, ReplicaRequest, VerdictState,
};

const DEFAULT_NAMESPACE: &str = "default";

/// The core's field names are those of the workload file; the API's are the proto's.
fn proto_field(field: &str) -> &str {
    match field {
        "gpusPerMember" => "gpus_per_member",
        "tensorParallel" => "tensor_parallel",
        "pipelineParallel" => "pipeline_parallel",
        other => other,
    }
}

fn workload_message(error: &WorkloadError) -> String {
    match error {
        WorkloadError::Zero { gang, field } => format!("gang `{gang}`: {} must be at least 1", proto_field(field)),
        WorkloadError::TooLarge { gang, field, value, max } => {
            format!("gang `{gang}`: {} is {value}, above the limit of {max}", proto_field(field))
        }
        WorkloadError::TensorParallelShape { gang, tp, gpus } => {
            format!("gang `{gang}`: tensor_parallel {tp} and gpus_per_member {gpus} must divide one another")
        }
        WorkloadError::ParallelismShape { gang, total, model_gpus } => format!(
            "gang `{gang}`: members x gpus_per_member = {total} GPUs is not a multiple of \
             tensor_parallel x pipeline_parallel = {model_gpus}"
        ),
        WorkloadError::GpuLessRole { gang, role } => format!(
            "gang `{gang}`: role `{role}` takes no GPUs (gpus_per_member 0), so it may not ask for \
             tensor_parallel, pipeline_parallel, min_gpu_memory_mib, mig_profile, a topology or slices"
        ),
        WorkloadError::SliceShape { gang, role, slice, members, unit } => format!(
            "gang `{gang}`: role `{role}`: slice_members {slice} must divide the role's {members} members \
             and be a multiple of its tensor-parallel group of {unit} members"
        ),
        WorkloadError::SlicedRoleScope { gang, role } => format!(
            "gang `{gang}`: role `{role}` has slices, so its required_topology must be a level \
             (leaf, rack, block) or empty, not host or nvlink"
        ),
        other => other.to_string(),
    }
}

fn scope(text: &str) -> Option<Scope> {
    let text = text.trim();
    (!text.is_empty()).then(|| Scope::parse(text))
}

/// The memory need of `min_gpu_memory_mib` and `mig_profile` (at most one of them set).
fn memory(mib: u64, mig_profile: &str) -> Result<MemoryNeed, String> {
    match (mib, mig_profile.trim()) {
        (0, "") => Ok(MemoryNeed::None),
        (mib, "") => Ok(MemoryNeed::FloorMib(mib)),
        (0, profile) => Ok(MemoryNeed::MigProfile(profile.to_string())),
        (_, _) => Err("give min_gpu_memory_mib or mig_profile, not both".into()),
    }
}

/// A gang's key (`namespace/name`) and product, checked.
fn key_and_product(gang: &pb::Gang, at: &impl Fn(String) -> Status) -> Result<(String, Option<ProductId>), Status> {
    if gang.name.trim().is_empty() {
        return Err(at("name is required".into()));
    }
    let namespace = if gang.namespace.is_empty() { DEFAULT_NAMESPACE } else { gang.namespace.as_str() };
    if namespace.contains('/') || gang.name.contains('/') {
        return Err(at("namespace and name must not contain `/`".into()));
    }
    let key = format!("{namespace}/{}", gang.name);
    let product = match gang.product.trim() {
        "" => None,
        name => Some(product::lookup(name).ok_or_else(|| {
            at(format!("gang `{key}`: product `{name}` is unknown (known: {})", product::known_names().join(", ")))
        })?),
    };
    Ok((key, product))
}

/// Whether any gang of a request has roles (Plan then takes [`replica_requests`]).
pub fn has_roles(gangs: &[pb::Gang]) -> bool {
    gangs.iter().any(|g| !g.roles.is_empty())
}

/// `gangs[index]: message` as INVALID_ARGUMENT.
fn invalid_at(index: usize, message: String) -> Status {
    Status::invalid_argument(format!("gangs[{index}]: {message}"))
}

/// A request over one of the API's named limits: `RESOURCE_EXHAUSTED`, naming the gang
/// where the limit was passed and the limit; nothing is planned or held.
fn over_limit_at(index: usize, message: String) -> Status {
    Status::resource_exhausted(format!("gangs[{index}]: {message}"))
}

/// One role of a gang, its slices checked (the rest is checked with the gang's spec).
fn role_spec(role: &pb::Role) -> Result<RoleSpec, String> {
    let slices = match (role.slice_members, role.slice_required_topology.trim()) {
        (0, "") if role.slice_exclusive => return Err("slice_exclusive is set but the role has no slices".into()),
        (0, "") => None,
        (0, _) => return Err("slice_required_topology is set but slice_members is 0".into()),
        (_, "") => return Err("slice_members is set but slice_required_topology is empty".into()),
        (members, text) => Some(Slicing { members, scope: Scope::parse(text), exclusive: role.slice_exclusive }),
    };
    Ok(RoleSpec {
        name: role.name.clone(),
        members: role.members,
        gpus_per_member: role.gpus_per_member,
        tensor_parallel: role.tensor_parallel.max(1),
        pipeline_parallel: role.pipeline_parallel.max(1),
        memory: memory(role.min_gpu_memory_mib, &role.mig_profile)?,
        required: scope(&role.required_topology),
        preferred: scope(&role.preferred_topology),
        slices,
    })
}

/// One gang of a request, checked: its key, product and validated spec, with its roles when
/// it has them (the shape fields beside roles must then be 0).
fn gang_spec(index: usize, gang: &pb::Gang) -> Result<(String, Option<ProductId>, GangSpec), Status> {
    let at = |message: String| invalid_at(index, message);
    let (key, product) = key_and_product(gang, &at)?;
    let flat = GangSpec {
        name: key.clone(),
        replicas: gang.replicas.max(1),
        members: gang.members,
        gpus_per_member: gang.gpus_per_member,
        tensor_parallel: gang.tensor_parallel.max(1),
        pipeline_parallel: gang.pipeline_parallel.max(1),
        // With roles the memory belongs to each role (checked below).
        memory: match gang.roles.is_empty() {
            true => memory(gang.min_gpu_memory_mib, &gang.mig_profile).map_err(|e| at(format!("gang `{key}`: {e}")))?,
            false => MemoryNeed::None,
        },
        required: scope(&gang.required_topology),
        preferred: scope(&gang.preferred_topology),
        roles: Vec::new(),
        pool: None,
    };
    let spec = if gang.roles.is_empty() {
        flat
    } else {
        let shape = [
            ("members", u64::from(gang.members)),
            ("gpus_per_member", u64::from(gang.gpus_per_member)),
            ("tensor_parallel", u64::from(gang.tensor_parallel)),
            ("pipeline_parallel", u64::from(gang.pipeline_parallel)),
            ("min_gpu_memory_mib", gang.min_gpu_memory_mib),
        ];
        if !gang.mig_profile.trim().is_empty() {
            return Err(at(format!(
                "gang `{key}` has roles, so mig_profile belongs to each role and must be empty here"
            )));
        }
        if let Some((field, value)) = shape.iter().find(|(_, value)| *value != 0) {
            return Err(at(format!(
                "gang `{key}` has roles, so {field} belongs to each role and must be 0 here (it is {value})"
            )));
        }
        let roles = (gang.roles.iter().enumerate())
            .map(|(r, role)| role_spec(role).map_err(|message| at(format!("gang `{key}` roles[{r}]: {message}"))))
            .collect::<Result<Vec<_>, _>>()?;
        GangSpec {
            replicas: flat.replicas,
            required: flat.required,
            preferred: flat.preferred,
            ..GangSpec::with_roles(&key, roles)
        }
    };
    spec.validate().map_err(|e| at(workload_message(&e)))?;
    Ok((key, product, spec))
}

/// Refuses a request whose gangs, replicas counted, pass [`super::REQUEST_GANGS_MAX`].
fn check_count(index: usize, so_far: usize, replicas: u32) -> Result<(), Status> {
    let total = so_far.saturating_add(replicas as usize);
    if total > super::REQUEST_GANGS_MAX {
        return Err(over_limit_at(
            index,
            format!(
                "the request names {total} or more gangs (replicas counted), over the limit of {}",
                super::REQUEST_GANGS_MAX
            ),
        ));
    }
    Ok(())
}

/// The gangs of a request, replicas expanded (`name-0`, `name-1`, ... when several). A gang
/// with roles is refused: only Plan takes them ([`replica_requests`]).
pub fn gang_requests(gangs: &[pb::Gang]) -> Result<Vec<GangRequest>, Status> {
    let mut requests = Vec::new();
    for (index, gang) in gangs.iter().enumerate() {
        if !gang.roles.is_empty() {
            let key = key_and_product(gang, &|message| invalid_at(index, message))?.0;
            return Err(invalid_at(
                index,
                format!("gang `{key}`: roles are accepted by Plan and Capacity only, not by this call"),
            ));
        }
        let (_, product, spec) = gang_spec(index, gang)?;
        check_count(index, requests.len(), spec.replicas)?;
        for expanded in spec.expand() {
            requests.push(GangRequest { key: expanded.name.clone(), gang: expanded, product });
        }
    }
    Ok(requests)
}

/// The replicas of a request with roles (a gang without roles is a replica of one role),
/// replicas expanded like [`gang_requests`]. Errors name the gang (`gangs[i]`) and field:
/// the shape fields set beside roles, a role's shape, its slices, the limits.
pub fn replica_requests(gangs: &[pb::Gang]) -> Result<Vec<ReplicaRequest>, Status> {
    let mut requests = Vec::new();
    let mut with_roles = 0usize;
    for (index, gang) in gangs.iter().enumerate() {
        let (key, product, spec) = gang_spec(index, gang)?;
        check_count(index, requests.len(), spec.replicas)?;
        if !spec.roles.is_empty() {
            with_roles = with_roles.saturating_add(spec.replicas as usize);
            if with_roles > super::REQUEST_REPLICAS_WITH_ROLES_MAX {
                return Err(over_limit_at(
                    index,
                    format!(
                        "gang `{key}`: the request has {with_roles} or more replicas with roles, over the limit of {} \
                         (each may take up to {} planner calls)",
                        super::REQUEST_REPLICAS_WITH_ROLES_MAX,
                        topoplace_engine::placement::replica::REPLICA_SEARCH_STEPS_MAX
                    ),
                ));
            }
        }
        for replica in spec.expand_replicas() {
            requests.push(ReplicaRequest { key: replica.name.clone(), replica, product });
        }
    }
    Ok(requests)
}

pub fn solver_choice(solver: i32) -> Result<SolverChoice, Status> {
    match pb::Solver::try_from(solver) {
        Ok(pb::Solver::Unspecified | pb::Solver::Greedy) => Ok(SolverChoice::Greedy),
        Ok(pb::Solver::Exact) => Ok(SolverChoice::Exact(ExactConfig::default())),
        Ok(pb::Solver::Auto) => {
            Ok(SolverChoice::Auto(ExactConfig { variables_max: Some(AUTO_VARIABLES_MAX), ..ExactConfig::default() }))
        }
        Err(_) => Err(Status::invalid_argument(format!("solver {solver} is not a Solver value"))),
    }
}

fn split_key(key: &str) -> (String, String) {
    match key.split_once('/') {
        Some((namespace, name)) => (namespace.to_string(), name.to_string()),
        None => (String::new(), key.to_string()),
    }
}

fn score(score: &ScoreComponents) -> pb::Score {
    pb::Score {
        total: score.total,
        locality: score.locality,
        memory: score.memory,
        fragmentation: score.fragmentation,
        connectivity: score.connectivity,
    }
}

fn solver_info(info: &SolverInfo) -> pb::SolverInfo {
    pb::SolverInfo {
        solver: info.solver.clone(),
        objective: info.objective,
        bound: info.bound,
        gap: info.gap,
        note: info.note.clone().unwrap_or_default(),
    }
}

pub fn placement(cluster: &Cluster, placement: &GangPlacement) -> pb::GangPlacement {
    let (namespace, name) = split_key(&placement.gang);
    pb::GangPlacement {
        namespace,
        name,
        product: placement.product.get().name.to_string(),
        scope: placement.scope.clone(),
        members: placement
            .members
            .iter()
            .map(|m| pb::MemberPlacement {
                member: m.member,
                node: cluster.host(m.host).name.clone(),
                gpus: mask_indices(m.gpus).into_iter().map(u32::from).collect(),
            })
            .collect(),
        score: Some(score(&placement.score)),
        solver: Some(solver_info(&placement.solver)),
        candidates: placement.candidates.min(u32::MAX as usize) as u32,
    }
}

/// `reservation_id` and `expires_in_ms` of a Plan's answer: empty and 0 when nothing is held.
fn reservation_fields(reservation: &Option<(String, u64)>, now_ms: u64) -> (String, u64) {
    match reservation {
        Some((id, expires_at_ms)) => (id.clone(), expires_at_ms.saturating_sub(now_ms)),
        None => (String::new(), 0),
    }
}

pub fn plan_response(cluster: &Cluster, outcome: &PlanOutcome, now_ms: u64) -> pb::PlanResponse {
    let (reservation_id, expires_in_ms) = reservation_fields(&outcome.reservation, now_ms);
    pb::PlanResponse {
        placed: outcome.placed_all(),
        reservation_id,
        expires_in_ms,
        placements: outcome.placements.iter().map(|p| placement(cluster, p)).collect(),
        unplaced: outcome.unplaced.iter().map(unplaced).collect(),
        note: outcome.note.clone().unwrap_or_default(),
        replicas: Vec::new(),
    }
}

/// Plan's answer for a request with roles (the reservation's id and remaining time when its
/// replicas are held).
pub fn replica_plan_response(cluster: &Cluster, outcome: &ReplicaPlanOutcome, now_ms: u64) -> pb::PlanResponse {
    let (reservation_id, expires_in_ms) = reservation_fields(&outcome.reservation, now_ms);
    pb::PlanResponse {
        placed: outcome.unplaced.is_empty(),
        reservation_id,
        expires_in_ms,
        placements: Vec::new(),
        unplaced: outcome.unplaced.iter().map(unplaced).collect(),
        note: outcome.note.clone().unwrap_or_default(),
        replicas: outcome.placements.iter().map(|r| replica_placement(cluster, r)).collect(),
    }
}

fn replica_placement(cluster: &Cluster, replica: &ReplicaPlacement) -> pb::ReplicaPlacement {
    let (namespace, name) = split_key(&replica.replica);
    pb::ReplicaPlacement {
        namespace: namespace.clone(),
        name: name.clone(),
        region: replica.region.clone(),
        parts: replica
            .parts
            .iter()
            .map(|part| {
                // The part's gang is named `namespace/name/role`: answer with the replica's.
                let placement = pb::GangPlacement {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    ..placement(cluster, &part.placement)
                };
                // A gang without roles is a replica of one role named as the gang: no role.
                let role = if part.role == replica.replica { String::new() } else { part.role.clone() };
                pb::PartPlacement { role, slice: part.slice, placement: Some(placement) }
            })
            .collect(),
        roles_without_gpus: replica.gpu_less_roles.clone(),
        score: replica.score,
        search_steps: replica.steps,
        note: replica.note.clone().unwrap_or_default(),
        solver: Some(solver_info(&replica.solver)),
    }
}

fn unplaced(u: &topoplace_engine::placement::Unplaced) -> pb::Unplaced {
    let (namespace, name) = split_key(&u.gang);
    let explanation = u.explanation.clone().unwrap_or_default();
    pb::Unplaced {
        namespace,
        name,
        reason: u.reason.clone(),
        rejected_hosts: rejections(&explanation.rejected_hosts),
        domains: explanation.domains,
    }
}

fn rejections(groups: &[RejectionGroup]) -> Vec<pb::RejectionGroup> {
    groups
        .iter()
        .map(|g| pb::RejectionGroup {
            reason: g.reason.clone(),
            hosts: g.hosts.min(u32::MAX as usize) as u32,
            examples: g.examples.clone(),
        })
        .collect()
}

fn node_verdict(role: String, n: NodeFit) -> pb::NodeVerdict {
    pb::NodeVerdict {
        node: n.node,
        fits: n.reason.is_none(),
        units: n.units,
        reason: n.reason.unwrap_or_default(),
        role,
    }
}

pub fn explain_response(cluster: &Cluster, explained: Explained) -> pb::ExplainResponse {
    let nodes = explained.nodes.into_iter().map(|n| node_verdict(String::new(), n)).collect();
    let (fits, placed, reason, explanation) = match explained.outcome {
        Ok(mut placed) => {
            let explanation = placed.explanation.take();
            (true, Some(placement(cluster, &placed)), String::new(), explanation)
        }
        Err(unplaced) => (false, None, unplaced.reason, unplaced.explanation),
    };
    explanation_response(fits, reason, explanation, nodes, placed, None)
}

/// [`explain_response`] for a replica with roles: its placement in `replica`, or the reason
/// naming the role that did not fit with that part's explanation; node verdicts per role.
pub fn explain_replica_response(cluster: &Cluster, explained: ExplainedReplica) -> pb::ExplainResponse {
    let nodes = explained.nodes.into_iter().map(|(role, n)| node_verdict(role, n)).collect();
    match explained.outcome {
        Ok(placed) => {
            let replica = replica_placement(cluster, &placed);
            explanation_response(true, String::new(), None, nodes, None, Some(replica))
        }
        Err(unplaced) => explanation_response(false, unplaced.reason, unplaced.explanation, nodes, None, None),
    }
}

fn explanation_response(
    fits: bool,
    reason: String,
    explanation: Option<topoplace_engine::placement::Explanation>,
    nodes: Vec<pb::NodeVerdict>,
    placement: Option<pb::GangPlacement>,
    replica: Option<pb::ReplicaPlacement>,
) -> pb::ExplainResponse {
    let explanation = explanation.unwrap_or_default();
    pb::ExplainResponse {
        fits,
        placement,
        replica,
        reason,
        rejected_hosts: rejections(&explanation.rejected_hosts),
        domains: explanation.domains,
        candidates: explanation
            .candidates
            .iter()
            .map(|c| pb::Candidate {
                scope: c.scope.clone(),
                product: c.product.clone(),
                hosts: c.hosts.clone(),
                score: Some(score(&c.score)),
                equivalent_hosts: c.equivalent_hosts.min(u32::MAX as usize) as u32,
            })
            .collect(),
        nodes,
    }
}

/// What one device of `product` is, on the wire.
fn device_kind(product: ProductId) -> pb::DeviceKind {
    match product.get().parent {
        None => pb::DeviceKind::WholeGpu,
        Some((_, DeviceKind::MigDevice)) => pb::DeviceKind::MigDevice,
        Some((_, DeviceKind::SharedReplica)) => pb::DeviceKind::SharedReplica,
    }
}

/// The whole GPUs' product of MIG devices or shared replicas; empty for whole GPUs.
fn whole_gpu_product(product: ProductId) -> String {
    product.get().parent.map(|(parent, _)| parent.get().name.to_string()).unwrap_or_default()
}

pub fn capacity_response(cluster: &Cluster, report: &CapacityReport, generation: u64) -> pb::CapacityResponse {
    pb::CapacityResponse {
        replicas: report.replicas,
        products: report
            .products
            .iter()
            .map(|p| pb::ProductCapacity {
                product: p.product.get().name.to_string(),
                replicas: p.replicas,
                hosts: p.hosts,
                gpus: p.gpus,
                free_gpus: p.free_gpus,
                device_kind: device_kind(p.product) as i32,
                whole_gpu_product: whole_gpu_product(p.product),
            })
            .collect(),
        domains: report
            .domains
            .iter()
            .filter_map(|d| {
                let level = report.level?;
                Some(pb::DomainCapacity {
                    domain: cluster.domains[level][d.domain as usize].path.clone(),
                    product: d.product.get().name.to_string(),
                    replicas: d.replicas,
                    free_gpus: d.free_gpus,
                })
            })
            .collect(),
        rejected_hosts: rejections(&report.rejected),
        generation,
        level: report.level.map(|l| cluster.levels[l].clone()).unwrap_or_default(),
        lower_bound: false,
    }
}

/// Capacity's answer for a shape with roles: replicas over all hosts and per domain, no
/// per-product split (roles may mix products).
pub fn replica_capacity_response(cluster: &Cluster, report: &ReplicaCapacity, generation: u64) -> pb::CapacityResponse {
    pb::CapacityResponse {
        replicas: report.replicas,
        products: Vec::new(),
        domains: report
            .domains
            .iter()
            .filter_map(|&(domain, replicas, free_gpus)| {
                let level = report.level?;
                Some(pb::DomainCapacity {
                    domain: cluster.domains[level][domain as usize].path.clone(),
                    product: String::new(),
                    replicas,
                    free_gpus,
                })
            })
            .collect(),
        rejected_hosts: Vec::new(),
        generation,
        level: report.level.map(|l| cluster.levels[l].clone()).unwrap_or_default(),
        lower_bound: report.capped,
    }
}

pub fn state_response(state: &ClusterState) -> pb::ClusterStateResponse {
    pb::ClusterStateResponse {
        cluster: state.cluster.clone(),
        levels: state.levels.clone(),
        hosts: state.products.iter().map(|p| p.1).sum(),
        gpus: state.gpus,
        free_gpus: state.free_gpus,
        reserved_gpus: state.reserved_gpus,
        bound_gpus: state.bound_gpus,
        products: state
            .products
            .iter()
            .map(|&(product, hosts, gpus, free_gpus)| pb::ProductCapacity {
                product: product.get().name.to_string(),
                replicas: 0,
                hosts,
                gpus,
                free_gpus,
                device_kind: device_kind(product) as i32,
                whole_gpu_product: whole_gpu_product(product),
            })
            .collect(),
        domains: state
            .domains
            .iter()
            .map(|d| pb::DomainState {
                level: d.level.clone(),
                domain: d.path.clone(),
                hosts: d.hosts,
                gpus: d.gpus,
                free_gpus: d.free_gpus,
            })
            .collect(),
        host_states: state
            .hosts
            .iter()
            .map(|h| pb::HostState {
                name: h.name.clone(),
                product: h.product.get().name.to_string(),
                gpus: u32::from(h.gpus),
                gpu_memory_mib: h.memory_mib,
                free_gpus: h.free.iter().map(|&g| u32::from(g)).collect(),
                domains: h.domains.clone(),
                clique: h.clique.clone().unwrap_or_default(),
            })
            .collect(),
        reservations: state
            .reservations
            .iter()
            .map(|r| pb::Reservation {
                id: r.origin.as_ref().map(|o| o.id.clone()).unwrap_or_default(),
                owner: r.origin.as_ref().map_or_else(|| "extender".to_string(), |o| o.owner.clone()),
                gang: r.gang.clone(),
                gpus: r.gpus,
                expires_in_ms: r.expires_in_ms,
                members_assigned: r.members_assigned,
                members: r.members,
            })
            .collect(),
        generation: state.generation,
        preemptions: state
            .preemptions
            .iter()
            .map(|p| pb::Preemption {
                unit: p.unit.clone(),
                planned_by: p.planned_by.clone(),
                nodes: p.nodes.clone(),
                waiting_on: p.waiting_on.clone(),
                expires_in_ms: p.expires_in_ms,
            })
            .collect(),
        preemption_verdicts: state.verdicts.iter().map(verdict_message).collect(),
    }
}

/// A kept preemption verdict as the API shows it.
fn verdict_message(state: &VerdictState) -> pb::PreemptionVerdict {
    let verdict = &state.verdict;
    let mut message = pb::PreemptionVerdict {
        unit: verdict.unit.clone(),
        preemptor: verdict.preemptor.to_string(),
        age_ms: state.age_ms,
        ..Default::default()
    };
    match &verdict.outcome {
        PreemptionOutcome::Preempted { nodes, victims, budgets_broken } => {
            message.preempted = true;
            message.nodes = nodes.clone();
            message.victims = victims.clone();
            message.budgets_broken = budgets_broken.clone();
        }
        PreemptionOutcome::CandidatesKept { nodes, victims } => {
            (message.preempted, message.candidates) = (true, true);
            message.nodes = nodes.clone();
            message.victims = victims.clone();
        }
        PreemptionOutcome::Declined { why } => message.why = why.clone(),
    }
    message
}
