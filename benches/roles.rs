//! Replicas with roles arriving one by one: topoplace's replica search and its exact model
//! (`--solver exact`: the default exact configuration, one MILP per candidate region over the
//! 8 tightest regions, 2 s per replica, greedy where it gives no answer) against an emulation
//! of upstream Kubernetes' PodGroup scheduling with topology (KEP-4671 gang scheduling and
//! KEP-5732 topology-aware workload scheduling, beta in 1.37), on the real Lingjun cluster
//! and on a generated mixed-product cluster.
//!
//! The emulation's rules (what upstream does, as its KEPs and docs describe it):
//! 1. A replica is one PodGroup whose topology key is the replica's required scope;
//!    candidate placements are the domains of that key (the whole cluster without one).
//! 2. In each candidate, the pods are scheduled one by one in a fixed order (roles as
//!    listed, members in order), each onto a feasible node by the pod-by-pod plugins:
//!    enough free GPUs and the GPU memory floor (a node affinity on GPU Feature Discovery's
//!    `nvidia.com/gpu.memory` label, as users write), the most-allocated node first
//!    (bin-packing, the usual GPU profile; the default profile spreads instead), ties to
//!    the first node; no backtracking. The GPUs inside a node are chosen NVLink-aware, as
//!    the NVIDIA device plugin's preferred allocation does.
//! 3. Of the candidates where every pod fits, the one with the highest GPU allocation ratio
//!    afterwards wins (NodeResourcesFit MostAllocated as a placement score).
//!    A replica is modelled as one PodGroup, which keeps its scope and its all-or-nothing
//!    placement; one PodGroup has one topology key, so a role's own scope and a slice's are
//!    not expressed, and when its placement breaks one that is counted. (One PodGroup per
//!    role or slice would express those but lose the replica's scope and its all-or-nothing
//!    placement across groups.) The shapes use level scopes only, the one kind the
//!    emulation reads.
//!
//! Both place the same seeded sequence of shapes drawn from public serving setups, from an
//! empty cluster, twice as many arrivals as the cluster holds: reported are the replicas
//! placed before the first failure, the replicas placed of all arrivals (a later, smaller
//! one may still fit), and what an independent checker finds broken in every placement
//! (role, slice and replica scopes, one GPU product per role, the memory floor, NVLink
//! inside each tensor-parallel member).
//!
//! `cargo bench --bench roles`

#[path = "support/allocator.rs"]
mod allocator;

use std::time::Instant;

use topoplace_engine::ledger::Ledger;
use topoplace_engine::placement::capacity::{REPLICA_CAPACITY_COUNT_MAX, REPLICA_CAPACITY_STEPS_MAX};
use topoplace_engine::placement::exact::ExactConfig;
use topoplace_engine::placement::replica::REPLICA_SEARCH_STEPS_MAX;
use topoplace_engine::placement::{HostVerdict, Planner, PlannerConfig, SolverChoice};
use topoplace_engine::topology::graph::nvlink_connected;
use topoplace_engine::topology::{product, Cluster, ClusterSpec, GpuMask, HostId, NodeSpec};
use topoplace_engine::workload::{GangSpec, MemoryNeed, Replica, RoleSpec, Scope, Slicing};
use topoplace_formats::files;

/// Arrivals per sequence, as a multiple of the cluster's GPUs over the mean replica's:
/// enough that the cluster is full well before the sequence ends.
const ARRIVALS_PER_CLUSTER_FILL: usize = 2;
const SEEDS: [u64; 3] = [1, 2, 3];

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn leaf() -> Option<Scope> {
    Some(Scope::Level("leaf".into()))
}

fn role(name: &str, members: u32, gpus: u32, tp: u32, floor_gib: u64) -> RoleSpec {
    RoleSpec {
        memory: if floor_gib > 0 { MemoryNeed::FloorMib(floor_gib * 1024) } else { MemoryNeed::None },
        ..RoleSpec::shape(name, members, gpus, tp)
    }
}

/// Shapes from public serving and training setups.
fn shapes() -> Vec<GangSpec> {
    vec![
        // Disaggregated 70B (vLLM/SGLang P/D): two TP-4 prefill workers and a TP-8 decode
        // worker in one rack for the KV-cache transfer.
        GangSpec {
            required: leaf(),
            ..GangSpec::with_roles("pd-70b", vec![role("prefill", 2, 4, 4, 40), role("decode", 1, 8, 8, 40)])
        },
        // Disaggregated 405B across racks of one spine: each role inside a rack of its own.
        GangSpec {
            required: Some(Scope::Level("spine".into())),
            ..GangSpec::with_roles(
                "pd-405b",
                vec![
                    RoleSpec { required: leaf(), ..role("prefill", 2, 8, 8, 60) },
                    RoleSpec { required: leaf(), ..role("decode", 2, 8, 8, 60) },
                ],
            )
        },
        // LeaderWorkerSet: a 4-GPU leader unlike its three 8-GPU workers, one rack.
        GangSpec {
            required: leaf(),
            ..GangSpec::with_roles("lws", vec![role("leader", 1, 4, 4, 30), role("workers", 3, 8, 8, 30)])
        },
        // Data-parallel training in two-host slices, each slice inside a rack, one spine.
        GangSpec {
            required: Some(Scope::Level("spine".into())),
            ..GangSpec::with_roles(
                "train",
                vec![RoleSpec {
                    slices: Some(Slicing { members: 2, scope: Scope::Level("leaf".into()), exclusive: false }),
                    ..role("workers", 8, 8, 8, 0)
                }],
            )
        },
        // A small P/D pair of TP-2 workers in one rack.
        GangSpec {
            required: leaf(),
            ..GangSpec::with_roles("pd-small", vec![role("prefill", 1, 2, 2, 20), role("decode", 2, 2, 2, 20)])
        },
    ]
}

/// 4 spines x 4 racks x 8 hosts, one GPU product per rack in turn: H100, H200, A100 80 GB,
/// V100 32 GB (hybrid cube-mesh NVLink).
fn mixed_cluster() -> Cluster {
    let products = ["H100", "H200", "A100-SXM4-80GB", "V100-SXM2-32GB"];
    let mut nodes = Vec::new();
    for spine in 0..4 {
        for rack in 0..4 {
            let product = product::lookup(products[(spine + rack) % products.len()]).expect("known product");
            for host in 0..8 {
                nodes.push(NodeSpec {
                    name: format!("s{spine}-r{rack}-h{host}"),
                    labels: [
                        ("network.topology.nvidia.com/spine".to_string(), format!("s{spine}")),
                        ("network.topology.nvidia.com/leaf".to_string(), format!("s{spine}-r{rack}")),
                    ]
                    .into_iter()
                    .collect(),
                    product,
                    gpu_count: 8,
                    memory_mib: None,
                    nvlink: None,
                    clique: None,
                    allocated: Vec::new(),
                    mig_profile: None,
                    sharing: None,
                    pool: Default::default(),
                });
            }
        }
    }
    let levels = vec!["network.topology.nvidia.com/spine".into(), "network.topology.nvidia.com/leaf".into()];
    Cluster::build(ClusterSpec { name: "mixed".into(), levels, nodes }).expect("valid mixed cluster")
}

fn lingjun() -> Cluster {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/clusters/lingjun.yaml");
    let text = std::fs::read_to_string(path).expect("testdata/clusters/lingjun.yaml");
    files::cluster::load(path, &text).expect("valid Lingjun cluster")
}

/// One member's place: its role, its slice (by member order for the emulation), the host
/// and GPUs.
struct Placed {
    role: usize,
    slice: Option<u32>,
    host: HostId,
    gpus: GpuMask,
}

/// Whether `hosts` lie inside one domain of `scope` (one host; one host or one clique; one
/// domain of a level).
fn inside(cluster: &Cluster, hosts: &[HostId], scope: &Scope) -> bool {
    let Some(&first) = hosts.first() else { return true };
    match scope {
        Scope::Host => hosts.iter().all(|&h| h == first),
        Scope::Nvlink => {
            let clique = cluster.host(first).clique;
            hosts.iter().all(|&h| h == first)
                || (clique.is_some() && hosts.iter().all(|&h| cluster.host(h).clique == clique))
        }
        Scope::Level(level) => {
            let level = cluster.level_index(level).expect("the shapes name levels of both clusters");
            hosts.iter().all(|&h| cluster.host(h).domain_path[level] == cluster.host(first).domain_path[level])
        }
    }
}

/// The constraints a replica's placement breaks, counted by an independent reading.
fn violations(cluster: &Cluster, replica: &Replica, placed: &[Placed]) -> Vec<String> {
    let mut broken = Vec::new();
    if let Some(scope) = &replica.required {
        let hosts: Vec<HostId> = placed.iter().map(|p| p.host).collect();
        if !inside(cluster, &hosts, scope) {
            broken.push("replica scope".to_string());
        }
    }
    for (index, role) in replica.roles.iter().enumerate() {
        let Some(gang) = &role.gang else { continue };
        let members: Vec<&Placed> = placed.iter().filter(|p| p.role == index).collect();
        let hosts: Vec<HostId> = members.iter().map(|p| p.host).collect();
        if members.len() != gang.members as usize || members.iter().any(|p| p.gpus.count_ones() != gang.gpus_per_member)
        {
            broken.push(format!("{}: members or GPUs missing", role.name));
        }
        let products: std::collections::BTreeSet<_> = members.iter().map(|p| cluster.host(p.host).product).collect();
        if products.len() > 1 {
            broken.push(format!("{}: more than one GPU product", role.name));
        }
        if members.iter().any(|p| cluster.host(p.host).memory_mib < gang.memory_floor_mib) {
            broken.push(format!("{}: memory floor", role.name));
        }
        if let Some(scope) = &gang.required {
            if !inside(cluster, &hosts, scope) {
                broken.push(format!("{}: role scope", role.name));
            }
        }
        if let Some(slicing) = &role.slices {
            for slice in 0..role.members / slicing.members {
                let hosts: Vec<HostId> = members.iter().filter(|p| p.slice == Some(slice)).map(|p| p.host).collect();
                if hosts.len() != slicing.members as usize || !inside(cluster, &hosts, &slicing.scope) {
                    broken.push(format!("{}: slice {slice} scope", role.name));
                }
            }
        }
        // Whole-member tensor-parallel groups (every shape here): the member's GPUs must be
        // NVLink-connected.
        if gang.tensor_parallel == gang.gpus_per_member && gang.tensor_parallel > 1 {
            for member in &members {
                if !nvlink_connected(&cluster.host(member.host).links, member.gpus) {
                    broken.push(format!("{}: tensor-parallel group not NVLink-connected", role.name));
                }
            }
        }
    }
    broken
}

/// The emulation of upstream's PodGroup cycle with topology (the module doc's rules).
fn emulate(planner: &mut Planner, cluster: &Cluster, ledger: &Ledger, replica: &Replica) -> Option<Vec<Placed>> {
    let domains: Vec<Vec<HostId>> = match &replica.required {
        Some(Scope::Level(level)) => {
            let level = cluster.level_index(level).expect("known level");
            cluster.domains[level].iter().map(|d| d.hosts.clone().collect()).collect()
        }
        _ => vec![(0..cluster.hosts.len() as HostId).collect()],
    };
    let mut best: Option<(f64, Vec<Placed>)> = None;
    for hosts in domains {
        let mut trial: Ledger<usize> = ledger.scratch();
        let mut placed = Vec::new();
        let mut feasible = true;
        'pods: for (index, role) in replica.roles.iter().enumerate() {
            let Some(gang) = &role.gang else { continue };
            for member in 0..gang.members {
                // One pod: a gang of one member, its GPUs NVLink-aware inside the node.
                let pod = GangSpec {
                    memory: MemoryNeed::FloorMib(gang.memory_floor_mib),
                    ..GangSpec::shape("pod", 1, gang.gpus_per_member, gang.tensor_parallel.min(gang.gpus_per_member))
                }
                .expand()
                .remove(0);
                let verdicts = planner.score_hosts(&trial, &pod, &hosts);
                let choice = hosts
                    .iter()
                    .zip(verdicts)
                    .filter_map(|(&host, verdict)| match verdict {
                        HostVerdict::Fits { members, .. } => {
                            Some((trial.free(host).count_ones(), host, members[0].gpus))
                        }
                        HostVerdict::Rejected { .. } => None,
                    })
                    .min_by_key(|&(free, host, _)| (free, host));
                let Some((_, host, gpus)) = choice else {
                    feasible = false;
                    break 'pods;
                };
                let key = placed.len();
                trial.reserve(&key, &[(host, gpus)]).expect("free GPUs");
                let slice = role.slices.as_ref().map(|s| member / s.members);
                placed.push(Placed { role: index, slice, host, gpus });
            }
        }
        if !feasible {
            continue;
        }
        let capacity: u32 = hosts.iter().map(|&h| u32::from(cluster.host(h).gpu_count)).sum();
        let used: u32 = hosts.iter().map(|&h| trial.used(h).count_ones()).sum();
        let ratio = f64::from(used) / f64::from(capacity.max(1));
        if best.as_ref().is_none_or(|(top, _)| ratio > *top + 1e-12) {
            best = Some((ratio, placed));
        }
    }
    best.map(|(_, placed)| placed)
}

struct Outcome {
    /// Replicas placed before the first failure.
    placed: usize,
    /// GPUs placed before the first failure.
    gpus: u64,
    /// Replicas placed over the whole sequence (later arrivals that fit are placed).
    placed_all: usize,
    arrivals: usize,
    violations: usize,
    violating_replicas: usize,
    /// Broken constraints by kind (`shape: what`).
    kinds: std::collections::BTreeMap<String, usize>,
    first_failure: Option<String>,
    millis: u128,
    /// Replicas the exact model placed (the rest of the exact run's, greedily).
    exact_answers: usize,
}

/// Who places the replicas.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Placer {
    Greedy,
    Exact,
    Upstream,
}

impl Placer {
    fn name(self) -> &'static str {
        match self {
            Placer::Greedy => "topoplace (greedy + backtracking)",
            Placer::Exact => "topoplace (exact, microlp)",
            Placer::Upstream => "upstream 1.37 emulation",
        }
    }
}

fn run(cluster: &Cluster, seed: u64, placer: Placer) -> Outcome {
    let shapes = shapes();
    let mut ledger = Ledger::new(cluster);
    let mut planner = Planner::new(cluster, PlannerConfig::default());
    let mut state = seed;
    let mean_gpus = shapes.iter().map(|s| s.expand_replicas()[0].total_gpus()).sum::<u64>() / shapes.len() as u64;
    let arrivals = ARRIVALS_PER_CLUSTER_FILL * (cluster.total_gpus() / mean_gpus.max(1)) as usize;
    let mut outcome = Outcome {
        placed: 0,
        gpus: 0,
        placed_all: 0,
        arrivals,
        violations: 0,
        violating_replicas: 0,
        kinds: std::collections::BTreeMap::new(),
        first_failure: None,
        millis: 0,
        exact_answers: 0,
    };
    let start = Instant::now();
    for arrival in 0..arrivals {
        let shape = &shapes[(splitmix(&mut state) % shapes.len() as u64) as usize];
        let mut replica = shape.expand_replicas().remove(0);
        replica.name = format!("{}-{arrival}", shape.name);
        let solver = match placer {
            Placer::Exact => SolverChoice::Exact(ExactConfig::default()),
            _ => SolverChoice::Greedy,
        };
        let placed: Option<Vec<Placed>> = if placer != Placer::Upstream {
            planner.place_replica(&ledger, &replica, &solver, None).ok().map(|p| {
                if p.solver.solver.starts_with("exact") {
                    outcome.exact_answers += 1;
                }
                p.parts
                    .iter()
                    .flat_map(|part| {
                        let role = replica.roles.iter().position(|r| r.name == part.role).expect("role");
                        part.placement.members.iter().map(move |m| Placed {
                            role,
                            slice: part.slice,
                            host: m.host,
                            gpus: m.gpus,
                        })
                    })
                    .collect()
            })
        } else {
            emulate(&mut planner, cluster, &ledger, &replica)
        };
        let Some(placed) = placed else {
            if outcome.first_failure.is_none() {
                outcome.first_failure = Some(replica.name.clone());
            }
            continue;
        };
        let broken = violations(cluster, &replica, &placed);
        outcome.violations += broken.len();
        outcome.violating_replicas += usize::from(!broken.is_empty());
        for kind in broken {
            *outcome.kinds.entry(format!("{}: {kind}", shape.name)).or_insert(0) += 1;
        }
        let holding: Vec<(HostId, GpuMask)> = placed.iter().map(|p| (p.host, p.gpus)).collect();
        let holding = topoplace_engine::ledger::merge_by_host(holding);
        ledger.reserve(&replica.name, &holding).expect("a placement on free GPUs");
        outcome.placed_all += 1;
        if outcome.first_failure.is_none() {
            outcome.placed += 1;
            outcome.gpus += placed.iter().map(|p| u64::from(p.gpus.count_ones())).sum::<u64>();
        }
    }
    outcome.millis = start.elapsed().as_millis();
    outcome
}

fn main() {
    println!("Replicas with roles placed one by one until the first failure (search budget {REPLICA_SEARCH_STEPS_MAX} planner calls per replica).\n");
    println!(
        "| cluster | seed | placer | replicas before the first failure | GPUs then | first failure | replicas placed of all arrivals | of them breaking a constraint | constraints broken | placed and breaking nothing | ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut kinds = Vec::new();
    for (name, cluster) in [("Lingjun (847 x H800)", lingjun()), ("mixed (128 hosts, 4 products)", mixed_cluster())] {
        for seed in SEEDS {
            for placer in [Placer::Greedy, Placer::Exact, Placer::Upstream] {
                let o = run(&cluster, seed, placer);
                let placer = match placer {
                    Placer::Exact => format!("{} ({} by the model)", placer.name(), o.exact_answers),
                    _ => placer.name().to_string(),
                };
                println!(
                    "| {name} | {seed} | {placer} | {} | {} of {} | {} | {} of {} | {} | {} | {} | {} |",
                    o.placed,
                    o.gpus,
                    cluster.total_gpus(),
                    o.first_failure.as_deref().unwrap_or("-"),
                    o.placed_all,
                    o.arrivals,
                    o.violating_replicas,
                    o.violations,
                    o.placed_all - o.violating_replicas,
                    o.millis
                );
                for (kind, count) in &o.kinds {
                    kinds.push(format!("| {name} | {seed} | {placer} | {kind} | {count} |"));
                }
            }
        }
    }
    println!("\nWhat was broken:\n\n| cluster | seed | placer | shape: what | times |\n|---|---|---|---|---|");
    for line in kinds {
        println!("{line}");
    }
    capacity_table();
}

/// Capacity of each shape on an empty cluster ([`Planner::replica_capacity`]: replicas placed
/// one after another, over the cluster and inside each rack), with its cost.
fn capacity_table() {
    println!(
        "\nCapacity of a shape with roles on the empty cluster (Planner::replica_capacity, per rack; at most {REPLICA_CAPACITY_COUNT_MAX} replicas per count, {REPLICA_CAPACITY_STEPS_MAX} planner calls per answer).\n"
    );
    println!("| cluster | shape | replicas | racks holding one or more | lower bound | planner calls | ms |");
    println!("|---|---|---|---|---|---|---|");
    for (name, cluster) in [("Lingjun (847 x H800)", lingjun()), ("mixed (128 hosts, 4 products)", mixed_cluster())] {
        let ledger: Ledger<u64> = Ledger::empty(&cluster);
        let mut planner = Planner::new(&cluster, PlannerConfig::default());
        let leaf_level = cluster.level_index("leaf");
        for spec in shapes() {
            let replica = spec.expand_replicas().remove(0);
            let start = Instant::now();
            let report = planner.replica_capacity(&ledger, &replica, None, leaf_level).expect("capacity");
            let millis = start.elapsed().as_millis();
            let racks = report.domains.iter().filter(|d| d.1 > 0).count();
            println!(
                "| {name} | {} | {} | {racks} of {} | {} | {} | {millis} |",
                spec.name,
                report.replicas,
                report.domains.len(),
                if report.capped { "yes" } else { "no" },
                report.steps
            );
        }
    }
}
