//! `topoplace plan --server ADDR`: the workload planned by a running `topoplace serve`
//! through its gRPC API (a dry run unless `--reserve`), rendered like a local plan.

use std::io::Write;
use std::path::PathBuf;

use serde_json::{json, Value};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use super::{load_workload, write_all, CliError, OutputFormat, PlanArgs, SolverFlag};
use topoplace_engine::placement::SolverInfo;
use topoplace_engine::workload::{GangSpec, MemoryNeed, Scope, Workload};
use topoplace_server::grpc::pb;
use topoplace_server::grpc::pb::placement_client::PlacementClient;

/// Environment variable holding the bearer token, when `--token-file` is not given.
pub const TOKEN_ENV: &str = "TOPOPLACE_TOKEN";

/// Connection settings of a gRPC client of `topoplace serve`.
#[derive(Debug, Clone, Default)]
pub struct Connection {
    /// `http://host:port`, `https://host:port`, or `host:port` (plain).
    pub server: String,
    pub ca: Option<PathBuf>,
    pub client_identity: Option<(PathBuf, PathBuf)>,
    pub token: Option<String>,
}

impl Connection {
    pub async fn connect(&self) -> Result<PlacementClient<Channel>, CliError> {
        let address = if self.server.contains("://") { self.server.clone() } else { format!("http://{}", self.server) };
        let mut endpoint = Channel::from_shared(address.clone())
            .map_err(|e| CliError::Input(format!("--server `{}`: {e}", self.server)))?;
        if address.starts_with("https://") || self.ca.is_some() {
            let read =
                |path: &PathBuf| std::fs::read(path).map_err(|e| CliError::Input(format!("{}: {e}", path.display())));
            let mut tls = ClientTlsConfig::new();
            if let Some(ca) = &self.ca {
                tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
            }
            if let Some((cert, key)) = &self.client_identity {
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            endpoint = endpoint.tls_config(tls).map_err(|e| CliError::Input(format!("TLS: {e}")))?;
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| CliError::Failed(format!("cannot reach the placement API at {address}: {e}")))?;
        Ok(PlacementClient::new(channel))
    }

    /// `request` with the bearer token attached, when there is one.
    pub fn request<T>(&self, body: T) -> Result<tonic::Request<T>, CliError> {
        let mut request = tonic::Request::new(body);
        if let Some(token) = &self.token {
            let value = format!("Bearer {token}")
                .parse()
                .map_err(|_| CliError::Input("the token has characters not allowed in gRPC metadata".into()))?;
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

fn status_error(what: &str, status: tonic::Status) -> CliError {
    let message = format!("{what}: {} ({:?})", status.message(), status.code());
    match status.code() {
        tonic::Code::InvalidArgument
        | tonic::Code::AlreadyExists
        | tonic::Code::NotFound
        | tonic::Code::PermissionDenied
        | tonic::Code::Unauthenticated => CliError::Input(message),
        _ => CliError::Failed(message),
    }
}

fn scope_text(scope: &Option<Scope>) -> String {
    scope.as_ref().map(ToString::to_string).unwrap_or_default()
}

/// The workload's gangs as API messages for a request with roles: a gang with roles is one
/// message (the server expands its replicas as a local plan names them), each role with its
/// memory floor as sized here; a gang without roles is one message per replica, as in
/// [`workload_gangs`].
pub fn workload_gangs_with_roles(workload: &Workload, namespace: &str) -> Vec<pb::Gang> {
    let mut gangs = Vec::new();
    for spec in &workload.gangs {
        if spec.roles.is_empty() {
            let flat = Workload { gangs: vec![spec.clone()], ..workload.clone() };
            gangs.extend(workload_gangs(&flat, namespace));
            continue;
        }
        // Floors are sized per role (a model to size becomes MiB), the same in every replica.
        let floors: Vec<u64> = GangSpec { replicas: 1, ..spec.clone() }
            .expand_replicas()
            .first()
            .map(|replica| {
                replica.roles.iter().map(|role| role.gang.as_ref().map_or(0, |g| g.memory_floor_mib)).collect()
            })
            .unwrap_or_default();
        let roles = spec
            .roles
            .iter()
            .enumerate()
            .map(|(index, role)| pb::Role {
                name: role.name.clone(),
                members: role.members,
                gpus_per_member: role.gpus_per_member,
                tensor_parallel: role.tensor_parallel,
                pipeline_parallel: role.pipeline_parallel,
                min_gpu_memory_mib: floors.get(index).copied().unwrap_or(0),
                required_topology: scope_text(&role.required),
                preferred_topology: scope_text(&role.preferred),
                slice_members: role.slices.as_ref().map_or(0, |s| s.members),
                slice_required_topology: role.slices.as_ref().map(|s| s.scope.to_string()).unwrap_or_default(),
                slice_exclusive: role.slices.as_ref().is_some_and(|s| s.exclusive),
                mig_profile: match &role.memory {
                    MemoryNeed::MigProfile(profile) => profile.clone(),
                    _ => String::new(),
                },
            })
            .collect();
        gangs.push(pb::Gang {
            namespace: namespace.to_string(),
            name: spec.name.clone(),
            replicas: spec.replicas,
            required_topology: scope_text(&spec.required),
            preferred_topology: scope_text(&spec.preferred),
            roles,
            ..Default::default()
        });
    }
    gangs
}

/// The workload's gangs as API messages, one per replica (named as a local plan names them).
pub fn workload_gangs(workload: &Workload, namespace: &str) -> Vec<pb::Gang> {
    workload
        .expand()
        .into_iter()
        .map(|gang| pb::Gang {
            namespace: namespace.to_string(),
            name: gang.name.clone(),
            members: gang.members,
            gpus_per_member: gang.gpus_per_member,
            tensor_parallel: gang.tensor_parallel,
            pipeline_parallel: gang.pipeline_parallel,
            min_gpu_memory_mib: gang.memory_floor_mib,
            product: String::new(),
            required_topology: scope_text(&gang.required),
            preferred_topology: scope_text(&gang.preferred),
            replicas: 1,
            roles: Vec::new(),
            mig_profile: gang.mig_profile.clone().unwrap_or_default(),
        })
        .collect()
}

fn connection(args: &PlanArgs, server: &str) -> Result<Connection, CliError> {
    let token = match &args.token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| CliError::Input(format!("--token-file {}: {e}", path.display())))?
                .trim()
                .to_string(),
        ),
        None => std::env::var(TOKEN_ENV).ok().filter(|t| !t.is_empty()),
    };
    Ok(Connection {
        server: server.to_string(),
        ca: args.ca.clone(),
        client_identity: args.client_cert.clone().zip(args.client_key.clone()),
        token,
    })
}

pub fn plan(args: &PlanArgs, server: &str, out: &mut dyn Write) -> Result<(), CliError> {
    let workload = load_workload(&args.workload)?;
    workload.validate().map_err(|e| CliError::Input(e.to_string()))?;
    let with_roles = workload.gangs.iter().find(|g| !g.roles.is_empty());
    let connection = connection(args, server)?;
    let gangs = match with_roles {
        Some(_) => workload_gangs_with_roles(&workload, &args.namespace),
        None => workload_gangs(&workload, &args.namespace),
    };
    let request = pb::PlanRequest {
        gangs: gangs.clone(),
        dry_run: !args.reserve,
        ttl_seconds: args.ttl.unwrap_or(0),
        solver: match args.solver {
            SolverFlag::Greedy => pb::Solver::Greedy,
            SolverFlag::Exact => pb::Solver::Exact,
            SolverFlag::Auto => pb::Solver::Auto,
        } as i32,
        allow_partial: args.allow_partial,
        explain: args.explain,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Failed(format!("starting the async runtime: {e}")))?;
    let response = runtime.block_on(async {
        let mut client = connection.connect().await?;
        let response = client
            .plan(connection.request(request)?)
            .await
            .map_err(|status| status_error("Plan", status))?
            .into_inner();
        Ok::<_, CliError>(response)
    })?;
    let value = response_json(server, &response);
    let text = match args.output {
        OutputFormat::Json => serde_json::to_string_pretty(&value).map(|t| t + "\n").map_err(|e| e.to_string()),
        OutputFormat::Yaml => serde_yaml_ng::to_string(&value).map_err(|e| e.to_string()),
        OutputFormat::Table => Ok(table(server, &response, args.reserve)),
    }
    .map_err(|e| CliError::Failed(format!("rendering the plan: {e}")))?;
    write_all(out, &text)
}

fn gpus_text(gpus: &[u32]) -> String {
    gpus.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

fn table(server: &str, response: &pb::PlanResponse, reserve: bool) -> String {
    let mut text = String::new();
    let held = if !reserve {
        "dry run, nothing held".to_string()
    } else if response.reservation_id.is_empty() {
        "nothing held: not every gang fits (--allow-partial holds those that do)".to_string()
    } else {
        format!("reservation {} held for {} s", response.reservation_id, response.expires_in_ms.div_ceil(1000))
    };
    let placed = response.placements.len() + response.replicas.len();
    text.push_str(&format!(
        "plan by {server}: {placed} of {} gangs placed ({held})\n\n",
        placed + response.unplaced.len()
    ));
    text.push_str(&format!("{:<28} {:<16} {:<28} {:>6}  members (node: GPUs)\n", "GANG", "PRODUCT", "SCOPE", "SCORE"));
    for placement in &response.placements {
        let members: Vec<String> =
            placement.members.iter().map(|m| format!("{}: {}", m.node, gpus_text(&m.gpus))).collect();
        text.push_str(&format!(
            "{:<28} {:<16} {:<28} {:>6.3}  {}\n",
            format!("{}/{}", placement.namespace, placement.name),
            placement.product,
            placement.scope,
            placement.score.as_ref().map_or(0.0, |s| s.total),
            members.join("; ")
        ));
    }
    for replica in &response.replicas {
        for part in &replica.parts {
            let Some(placement) = &part.placement else { continue };
            let members: Vec<String> =
                placement.members.iter().map(|m| format!("{}: {}", m.node, gpus_text(&m.gpus))).collect();
            let slice = part.slice.map(|s| format!("[{s}]")).unwrap_or_default();
            text.push_str(&format!(
                "{:<28} {:<16} {:<28} {:>6.3}  {}\n",
                match part.role.as_str() {
                    "" => format!("{}/{}", replica.namespace, replica.name),
                    role => format!("{}/{}/{role}{slice}", replica.namespace, replica.name),
                },
                placement.product,
                placement.scope,
                placement.score.as_ref().map_or(0.0, |s| s.total),
                members.join("; ")
            ));
        }
    }
    if !response.replicas.is_empty() {
        text.push_str("\nreplicas with roles:\n");
        for replica in &response.replicas {
            text.push_str(&format!(
                "  {}/{}: in {}, score {:.3}, {} search step(s), {}",
                replica.namespace,
                replica.name,
                replica.region,
                replica.score,
                replica.search_steps,
                // An older server sends no solver: say nothing rather than guess.
                replica.solver.as_ref().map_or_else(|| "solver not given".to_string(), remote_solver_cell)
            ));
            if !replica.roles_without_gpus.is_empty() {
                text.push_str(&format!(
                    "; left to kube-scheduler (no GPUs): {}",
                    replica.roles_without_gpus.join(", ")
                ));
            }
            if !replica.note.is_empty() {
                text.push_str(&format!("; {}", replica.note));
            }
            text.push('\n');
        }
    }
    if !response.note.is_empty() {
        text.push_str(&format!("\nnote: {}\n", response.note));
    }
    if !response.unplaced.is_empty() {
        text.push_str("\nunplaced:\n");
        for unplaced in &response.unplaced {
            text.push_str(&format!("  {}/{}: {}\n", unplaced.namespace, unplaced.name, unplaced.reason));
            for group in &unplaced.rejected_hosts {
                text.push_str(&format!(
                    "    {} host(s): {} (e.g. {})\n",
                    group.hosts,
                    group.reason,
                    group.examples.join(", ")
                ));
            }
            for domain in &unplaced.domains {
                text.push_str(&format!("    {domain}\n"));
            }
        }
    }
    text
}

/// A replica's solver as the local table shows it ([`super::output::replica_solver_cell`]).
fn remote_solver_cell(info: &pb::SolverInfo) -> String {
    super::output::replica_solver_cell(&SolverInfo {
        solver: info.solver.clone(),
        objective: info.objective,
        bound: info.bound,
        gap: info.gap,
        note: (!info.note.is_empty()).then(|| info.note.clone()),
    })
}

fn response_json(server: &str, response: &pb::PlanResponse) -> Value {
    json!({
        "server": server,
        "placed": response.placed,
        "reservationId": (!response.reservation_id.is_empty()).then_some(&response.reservation_id),
        "expiresInMs": (!response.reservation_id.is_empty()).then_some(response.expires_in_ms),
        "placements": response.placements.iter().map(|p| json!({
            "gang": format!("{}/{}", p.namespace, p.name),
            "product": p.product,
            "scope": p.scope,
            "score": p.score.as_ref().map(|s| json!({
                "total": s.total, "locality": s.locality, "memory": s.memory,
                "fragmentation": s.fragmentation, "connectivity": s.connectivity,
            })),
            "solver": p.solver.as_ref().map(|s| s.solver.clone()),
            "members": p.members.iter().map(|m| json!({"member": m.member, "node": m.node, "gpus": m.gpus})).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "replicas": response.replicas.iter().map(|r| json!({
            "gang": format!("{}/{}", r.namespace, r.name),
            "region": r.region,
            "score": r.score,
            "searchSteps": r.search_steps,
            "solver": r.solver.as_ref().map(|s| json!({
                "solver": s.solver, "objective": s.objective, "bound": s.bound, "gap": s.gap,
                "note": (!s.note.is_empty()).then_some(&s.note),
            })),
            "rolesWithoutGpus": r.roles_without_gpus,
            "note": (!r.note.is_empty()).then_some(&r.note),
            "parts": r.parts.iter().map(|part| json!({
                "role": part.role,
                "slice": part.slice,
                "product": part.placement.as_ref().map(|p| p.product.clone()),
                "scope": part.placement.as_ref().map(|p| p.scope.clone()),
                "members": part.placement.iter().flat_map(|p| p.members.iter()).map(|m| json!({"member": m.member, "node": m.node, "gpus": m.gpus})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "note": (!response.note.is_empty()).then_some(&response.note),
        "unplaced": response.unplaced.iter().map(|u| {
            let rejected: Vec<Value> = u
                .rejected_hosts
                .iter()
                .map(|g| json!({"reason": g.reason, "hosts": g.hosts, "examples": g.examples}))
                .collect();
            json!({
                "gang": format!("{}/{}", u.namespace, u.name),
                "reason": u.reason,
                "rejectedHosts": rejected,
                "domains": u.domains,
            })
        }).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `plan --server` sends for the repository's roles workload is what a local plan
    /// places: every role's memory floor sized from its model as the local expansion sizes
    /// it, slices and scopes as written, replicas counted by the server.
    #[test]
    fn roles_are_sent_as_the_local_plan_reads_them() {
        let path = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/workloads/roles.yaml"));
        let workload = load_workload(&Some(path)).expect("roles workload");
        let gangs = workload_gangs_with_roles(&workload, "ns");
        assert_eq!(gangs.len(), workload.gangs.len(), "one message per gang with roles");
        let mut floors_seen = 0;
        for (spec, sent) in workload.gangs.iter().zip(&gangs) {
            assert_eq!((sent.namespace.as_str(), sent.name.as_str()), ("ns", spec.name.as_str()));
            assert_eq!(sent.replicas, spec.replicas);
            assert_eq!((sent.members, sent.gpus_per_member, sent.min_gpu_memory_mib), (0, 0, 0));
            let replica = spec.expand_replicas().remove(0);
            for (role, message) in replica.roles.iter().zip(&sent.roles) {
                assert_eq!(message.name, role.name);
                let floor = role.gang.as_ref().map_or(0, |g| g.memory_floor_mib);
                assert_eq!(message.min_gpu_memory_mib, floor, "{}/{}", spec.name, role.name);
                floors_seen += usize::from(floor > 0);
                assert_eq!(message.slice_members, role.slices.as_ref().map_or(0, |s| s.members));
                assert_eq!(message.slice_exclusive, role.slices.as_ref().is_some_and(|s| s.exclusive));
            }
        }
        assert!(floors_seen >= 3, "the file's model-sized roles carry their floors");
    }
}
