//! Property tests and a deterministic simulation over random clusters and gangs.
//!
//! The invariants are checked by code independent of the engine's own bookkeeping: a
//! shadow map of which gang holds which GPU, and a re-derivation of every constraint
//! (member count and size, memory floor, one product, NVLink for tensor-parallel groups,
//! required scopes) from the placement alone.

use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;
use std::time::Duration;
use topoplace_engine::ledger::{mask_indices, Ledger};

use topoplace_engine::placement::exact::{CandidateHosts, ExactConfig, ExactOutcome};
use topoplace_engine::placement::gpus::{GpuChooser, UnitShape};
use topoplace_engine::placement::{GangPlacement, Planner, PlannerConfig, SolverChoice};
use topoplace_engine::topology::graph::nvlink_connected;
use topoplace_engine::topology::{
    product, Cluster, ClusterSpec, GpuSharing, HostId, NodeSpec, NvlinkLayout, SharingStrategy,
};
use topoplace_engine::workload::{Gang, GangSpec, MemoryNeed, Replica, Role, Scope, Slicing};

/// (product, GPUs per host, NVLink override or `mig`: the GPUs are MIG 3g.20gb devices)
const HOST_KINDS: &[(&str, u8, Option<&str>)] = &[
    ("H100", 8, None),
    ("V100-SXM2-16GB", 8, None),
    ("H100-NVL", 4, None),
    ("L40S", 4, None),
    ("GB200", 4, None),
    ("A100-PCIE-40GB", 4, Some("groups")),
    ("H200", 8, None),
    ("A100-SXM4-40GB", 14, Some("mig")),
    ("A100-SXM4-40GB", 8, None),
    ("L4", 2, Some("shared")),
];

#[derive(Debug, Clone)]
struct HostDraw {
    kind: usize,
    rack: u8,
    spine: u8,
    labelled: bool,
    allocated: u64,
}

fn host_draw() -> impl Strategy<Value = HostDraw> {
    (0..HOST_KINDS.len(), 0u8..4, 0u8..2, prop::bool::weighted(0.9), any::<u64>())
        .prop_map(|(kind, rack, spine, labelled, allocated)| HostDraw { kind, rack, spine, labelled, allocated })
}

fn build_cluster(draws: &[HostDraw]) -> Cluster {
    let nodes = draws
        .iter()
        .enumerate()
        .map(|(index, draw)| {
            let (name, count, nvlink) = HOST_KINDS[draw.kind];
            let mut labels = BTreeMap::new();
            if draw.labelled {
                labels.insert("spine".to_string(), format!("s{}", draw.spine));
                labels.insert("rack".to_string(), format!("r{}", draw.rack));
            }
            // A shared GPU is offered as 4 devices.
            let shared = nvlink == Some("shared");
            let full = (1u64 << (count * if shared { 4 } else { 1 })) - 1;
            // Keep about half the hosts fully free so that multi-host gangs have room.
            let allocated = if draw.allocated % 2 == 0 { 0 } else { (draw.allocated >> 8) & full };
            NodeSpec {
                name: format!("n{index}"),
                labels,
                product: match nvlink {
                    Some("mig") => product::register_mig(product::lookup(name).expect("known"), "3g.20gb", 19_968)
                        .expect("MIG devices"),
                    Some("shared") => {
                        product::register_shared(product::lookup(name).expect("known")).expect("replicas")
                    }
                    _ => product::lookup(name).expect("known"),
                },
                gpu_count: count,
                memory_mib: (nvlink == Some("mig")).then_some(19_968),
                nvlink: (nvlink == Some("groups")).then(|| NvlinkLayout::Groups(vec![vec![0, 1], vec![2, 3]])),
                clique: (name == "GB200").then(|| format!("clique-{}-{}", draw.spine, draw.rack)),
                allocated: mask_indices(allocated),
                mig_profile: (nvlink == Some("mig")).then(|| "3g.20gb".to_string()),
                sharing: shared.then_some(GpuSharing { strategy: SharingStrategy::TimeSlicing, replicas: 4 }),
                pool: Default::default(),
            }
        })
        .collect();
    Cluster::build(ClusterSpec { name: "random".into(), levels: vec!["spine".into(), "rack".into()], nodes })
        .expect("valid random cluster")
}

fn make_gang(members: u32, gpus: u32, tp_choice: u32, scope_choice: u32, floor_choice: usize) -> Gang {
    let tp = match tp_choice {
        0 => 1,
        1 => gpus,
        2 => gpus * 2,
        _ => (gpus / 2).max(1),
    };
    let members = if tp > gpus { members.max(1) * (tp / gpus) } else { members };
    let required = match scope_choice {
        0 => None,
        1 => Some(Scope::Host),
        2 => Some(Scope::Nvlink),
        _ => Some(Scope::Level("rack".into())),
    };
    let floor = [0, 20 * 1024, 42 * 1024, 100 * 1024][floor_choice];
    let spec = GangSpec {
        memory: if floor > 0 { MemoryNeed::FloorMib(floor) } else { MemoryNeed::None },
        required,
        ..GangSpec::shape("g", members, gpus, tp)
    };
    spec.validate().expect("generated gangs are valid");
    spec.expand().remove(0)
}

fn gang_draw() -> impl Strategy<Value = Gang> {
    (1u32..5, prop::sample::select(vec![1u32, 2, 4, 8]), 0u32..4, 0u32..4, 0usize..4)
        .prop_map(|(members, gpus, tp, scope, floor)| make_gang(members, gpus, tp, scope, floor))
}

/// Re-derives every constraint of a placed gang from the placement alone.
fn check_constraints(cluster: &Cluster, free_before: &[u64], gang: &Gang, placement: &GangPlacement) {
    let mut chooser = GpuChooser::default();
    assert_eq!(placement.members.len(), gang.members as usize, "{}: every member placed", gang.name);
    let product = cluster.host(placement.members[0].host).product;
    let mut seen: HashMap<HostId, u64> = HashMap::new();
    for member in &placement.members {
        let host = cluster.host(member.host);
        assert_eq!(member.gpus.count_ones(), gang.gpus_per_member, "member GPU count");
        assert_eq!(host.product, product, "one product per gang");
        assert!(host.memory_mib >= gang.memory_floor_mib, "memory floor");
        if host.partitioned() {
            assert!(
                gang.gpus_per_member == 1 && gang.tensor_parallel == 1,
                "MIG devices and shared replicas take one-GPU members only"
            );
        }
        assert_eq!(member.gpus & !free_before[member.host as usize], 0, "GPUs were free");
        let used = seen.entry(member.host).or_insert(0);
        assert_eq!(*used & member.gpus, 0, "a GPU given to two members");
        *used |= member.gpus;
        if gang.tensor_parallel >= 2 && gang.tensor_parallel <= gang.gpus_per_member {
            // NVLink holds every TP group wherever the host's NVLink can hold one of that
            // size; elsewhere the group runs over PCIe, unless the gang requires NVLink.
            if gang.tensor_parallel <= host.links.largest_nvlink_group {
                let groups = chooser.unit_count(
                    host,
                    member.gpus,
                    UnitShape { unit_gpus: gang.tensor_parallel, atom: gang.tensor_parallel },
                );
                assert!(
                    groups >= gang.gpus_per_member / gang.tensor_parallel,
                    "TP groups NVLink-connected inside a member"
                );
            } else {
                assert_ne!(gang.required, Some(Scope::Nvlink), "a gang requiring NVLink on a host without it");
            }
        }
    }
    if gang.tensor_parallel > gang.gpus_per_member {
        for unit in placement.members.chunks(gang.members_per_unit() as usize) {
            let first = unit[0].host;
            if unit.iter().all(|m| m.host == first) {
                let union = unit.iter().fold(0, |m, x| m | x.gpus);
                if union.count_ones() <= cluster.host(first).links.largest_nvlink_group {
                    assert!(nvlink_connected(&cluster.host(first).links, union), "TP group NVLink-connected");
                } else {
                    assert_ne!(gang.required, Some(Scope::Nvlink), "a gang requiring NVLink on a host without it");
                }
            } else {
                let clique = cluster.host(first).clique;
                assert!(
                    clique.is_some() && unit.iter().all(|m| cluster.host(m.host).clique == clique),
                    "TP group across hosts only inside a clique"
                );
            }
        }
    }
    let hosts: Vec<HostId> = seen.keys().copied().collect();
    match &gang.required {
        Some(Scope::Host) => assert_eq!(hosts.len(), 1, "required host"),
        Some(Scope::Nvlink) => {
            if hosts.len() == 1 {
                assert!(
                    nvlink_connected(&cluster.host(hosts[0]).links, seen[&hosts[0]]),
                    "required nvlink on one host"
                );
            } else {
                let clique = cluster.host(hosts[0]).clique;
                assert!(
                    clique.is_some() && hosts.iter().all(|&h| cluster.host(h).clique == clique),
                    "required nvlink across hosts"
                );
            }
        }
        Some(Scope::Level(_)) => {
            let rack = cluster.host(hosts[0]).domain_path[1];
            assert!(hosts.iter().all(|&h| cluster.host(h).domain_path[1] == rack), "required rack");
        }
        None => {}
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn batches_honour_every_constraint_and_never_double_book(
        draws in prop::collection::vec(host_draw(), 1..24),
        gangs in prop::collection::vec(gang_draw(), 1..12),
    ) {
        let cluster = build_cluster(&draws);
        let gangs: Vec<Gang> = gangs.into_iter().enumerate().map(|(i, mut g)| { g.name = format!("g{i}"); g }).collect();
        let mut ledger = Ledger::new(&cluster);
        let initial: Vec<u64> = (0..cluster.hosts.len() as HostId).map(|h| ledger.free(h)).collect();
        let mut planner = Planner::new(&cluster, PlannerConfig::default());
        let mut shadow: HashMap<(HostId, u8), String> = HashMap::new();
        for gang in &gangs {
            let free_before: Vec<u64> = (0..cluster.hosts.len() as HostId).map(|h| ledger.free(h)).collect();
            match planner.place(&ledger, gang) {
                Ok(placement) => {
                    check_constraints(&cluster, &free_before, gang, &placement);
                    ledger.reserve(&gang.name, &placement.holding()).expect("the ledger accepts a valid placement");
                    for member in &placement.members {
                        for gpu in mask_indices(member.gpus) {
                            let previous = shadow.insert((member.host, gpu), gang.name.clone());
                            prop_assert!(previous.is_none(), "GPU {gpu} of host {} given twice", member.host);
                        }
                    }
                }
                Err(unplaced) => {
                    prop_assert!(ledger.holding(&gang.name).is_none(), "an unplaced gang holds nothing");
                    prop_assert!(!unplaced.reason.is_empty());
                    let free_after: Vec<u64> = (0..cluster.hosts.len() as HostId).map(|h| ledger.free(h)).collect();
                    prop_assert_eq!(&free_after, &free_before, "a failed placement changes nothing");
                }
            }
            ledger.check().map_err(TestCaseError::fail)?;
        }
        // Every gang that holds GPUs is released; one that was not placed holds nothing.
        for gang in &gangs {
            if ledger.holding(&gang.name).is_some() {
                ledger.release(&gang.name).map_err(|e| TestCaseError::fail(e.to_string()))?;
            }
        }
        let after: Vec<u64> = (0..cluster.hosts.len() as HostId).map(|h| ledger.free(h)).collect();
        prop_assert_eq!(after, initial, "releasing everything returns exactly what was taken");
    }

    #[test]
    fn exact_placements_honour_every_constraint_too(
        draws in prop::collection::vec(host_draw(), 1..10),
        gangs in prop::collection::vec(gang_draw(), 1..4),
    ) {
        let cluster = build_cluster(&draws);
        let mut ledger = Ledger::new(&cluster);
        let mut planner = Planner::new(&cluster, PlannerConfig::default());
        let config = ExactConfig { candidates: CandidateHosts::All, time_limit: Duration::from_secs(20), ..ExactConfig::default() };
        for (index, mut gang) in gangs.into_iter().enumerate() {
            gang.name = format!("g{index}");
            let free_before: Vec<u64> = (0..cluster.hosts.len() as HostId).map(|h| ledger.free(h)).collect();
            let greedy = planner.place(&ledger, &gang);
            match planner.place_exact(&ledger, &gang, &config).0 {
                ExactOutcome::Placed(placement) => {
                    check_constraints(&cluster, &free_before, &gang, &placement);
                    if let Ok(greedy) = greedy {
                        prop_assert!(greedy.score.total <= placement.score.total + 1e-6, "greedy above the exact optimum");
                    }
                    ledger.reserve(&gang.name, &placement.holding()).map_err(|e| TestCaseError::fail(e.to_string()))?;
                }
                ExactOutcome::Infeasible(_) => prop_assert!(greedy.is_err(), "exact proved infeasible what greedy placed"),
                ExactOutcome::NoAnswer { reason } => {
                    // Gangs whose TP groups span GB200 trays are greedy-only.
                    prop_assert!(reason.contains("greedy solver only"), "{}", reason);
                }
            }
            ledger.check().map_err(TestCaseError::fail)?;
        }
    }

    #[test]
    fn capacity_is_how_many_replicas_placing_one_after_another_reaches(
        draws in prop::collection::vec(host_draw(), 1..16),
        gang in gang_draw(),
    ) {
        let cluster = build_cluster(&draws);
        let mut ledger = Ledger::new(&cluster);
        let mut planner = Planner::new(&cluster, PlannerConfig::default());
        let report = planner.capacity(&ledger, &gang, None, None).expect("the gang's levels exist");
        let mut placed = 0u64;
        while placed <= report.replicas {
            let replica = Gang { name: format!("replica-{placed}"), ..gang.clone() };
            let Ok(placement) = planner.place(&ledger, &replica) else { break };
            ledger.reserve(&replica.name, &placement.holding()).expect("the ledger accepts a valid placement");
            placed += 1;
        }
        if gang.required == Some(Scope::Nvlink) {
            // Capacity counts disjoint NVLink-connected sets (a packing); placing one replica
            // after another may pick a set that leaves fewer (V100 hybrid cube-mesh).
            prop_assert!(placed <= report.replicas, "placed {} above capacity {:?}", placed, report);
        } else {
            prop_assert_eq!(placed, report.replicas, "capacity {:?}", report);
        }
        prop_assert_eq!(report.products.iter().map(|p| p.replicas).sum::<u64>(), report.replicas);
        // Replicas inside disjoint racks can all exist at once.
        prop_assert!(report.domains.iter().map(|d| d.replicas).sum::<u64>() <= report.replicas);
        if placed == report.replicas {
            let after = planner.capacity(&ledger, &gang, None, None).expect("levels");
            prop_assert_eq!(after.replicas, 0, "nothing fits once capacity is used up");
        }
    }

    #[test]
    fn a_single_host_gang_is_placed_whenever_some_host_can_hold_it(
        draws in prop::collection::vec(host_draw(), 1..16),
        gpus in prop::sample::select(vec![1u32, 2, 4]),
    ) {
        // Completeness for the simplest case, checked by brute force over hosts.
        let cluster = build_cluster(&draws);
        let ledger = Ledger::new(&cluster);
        let gang = make_gang(1, gpus, 0, 0, 0);
        // A MIG or shared host takes members of one GPU only.
        let fits_somewhere = (0..cluster.hosts.len() as HostId).any(|h| {
            ledger.free(h).count_ones() >= gpus && (gpus == 1 || !cluster.host(h).partitioned())
        });
        let placed = Planner::new(&cluster, PlannerConfig::default()).place(&ledger, &gang);
        prop_assert_eq!(placed.is_ok(), fits_somewhere);
    }
}

/// A replica of random roles: `(gang, slice units per slice or 0, GPU-less, exclusive
/// slices)` per role and a replica scope (0 none, 1 rack, 2 spine).
fn replica_draw() -> impl Strategy<Value = (Vec<(Gang, u32, bool, bool)>, u32)> {
    (prop::collection::vec((gang_draw(), 0u32..3, prop::bool::weighted(0.15), prop::bool::ANY), 1..4), 0u32..3)
}

fn make_replica(name: &str, roles: Vec<(Gang, u32, bool, bool)>, scope: u32) -> Replica {
    let level = |scope: u32| match scope {
        1 => Some(Scope::Level("rack".into())),
        2 => Some(Scope::Level("spine".into())),
        _ => None,
    };
    let roles = roles
        .into_iter()
        .enumerate()
        .map(|(index, (mut gang, slice_units, gpu_less, exclusive))| {
            let role = format!("role{index}");
            gang.name = format!("{name}/{role}");
            if gpu_less {
                return Role { name: role, members: 1, gang: None, slices: None };
            }
            // Slices of whole units that divide the role, only where the role's own scope
            // is a level or none (`Replica::check` refuses a sliced role inside one host or
            // clique).
            let units = gang.units();
            let slices = (slice_units > 0
                && units % slice_units == 0
                && units > slice_units
                && matches!(gang.required, None | Some(Scope::Level(_))))
            .then(|| Slicing {
                members: slice_units * gang.members_per_unit(),
                scope: Scope::Level("rack".into()),
                exclusive,
            });
            Role { name: role, members: gang.members, gang: Some(gang), slices }
        })
        .collect();
    Replica { name: name.into(), spec_name: name.into(), roles, required: level(scope), preferred: None }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn replicas_with_roles_meet_every_scope_or_hold_nothing(
        draws in prop::collection::vec(host_draw(), 1..24),
        replicas in prop::collection::vec(replica_draw(), 1..5),
        exact in prop::bool::weighted(0.3),
    ) {
        let cluster = build_cluster(&draws);
        let replicas: Vec<Replica> =
            replicas.into_iter().enumerate().map(|(i, (roles, scope))| make_replica(&format!("r{i}"), roles, scope)).collect();
        let mut ledger = Ledger::new(&cluster);
        let mut planner = Planner::new(&cluster, PlannerConfig::default());
        let mut shadow: HashMap<(HostId, u8), String> = HashMap::new();
        // The exact model of a replica keeps the same promises as the search.
        let solver = if exact {
            SolverChoice::Exact(ExactConfig { candidates: CandidateHosts::All, ..ExactConfig::default() })
        } else {
            SolverChoice::Greedy
        };
        for replica in &replicas {
            let free_before: Vec<u64> = (0..cluster.hosts.len() as HostId).map(|h| ledger.free(h)).collect();
            match planner.place_replica(&ledger, replica, &solver, None) {
                Ok(placed) => {
                    // A proof of "nothing fits" that the search contradicts is a model bug.
                    prop_assert!(
                        !placed.note.as_deref().is_some_and(|n| n.contains("although the greedy search did")),
                        "{:?}", placed.note
                    );
                    let mut hosts: Vec<HostId> = Vec::new();
                    for role in &replica.roles {
                        let parts: Vec<_> = placed.parts.iter().filter(|p| p.role == role.name).collect();
                        let Some(gang) = &role.gang else {
                            prop_assert!(parts.is_empty() && placed.gpu_less_roles.contains(&role.name));
                            continue;
                        };
                        let mut role_hosts = Vec::new();
                        for part in &parts {
                            // Each part meets its own shape and scope: a slice is a gang of
                            // the slice's members inside the slice's scope.
                            let part_gang = match &role.slices {
                                Some(slicing) => Gang { members: slicing.members, required: Some(slicing.scope.clone()), ..gang.clone() },
                                None => gang.clone(),
                            };
                            check_constraints(&cluster, &free_before, &part_gang, &part.placement);
                            role_hosts.extend(part.placement.members.iter().map(|m| m.host));
                        }
                        if role.slices.as_ref().is_some_and(|s| s.exclusive) {
                            let mut racks: Vec<u32> = parts
                                .iter()
                                .filter_map(|p| p.placement.members.first())
                                .map(|m| cluster.host(m.host).domain_path[1])
                                .collect();
                            let count = racks.len();
                            racks.sort_unstable();
                            racks.dedup();
                            prop_assert_eq!(racks.len(), count, "exclusive slices each in a rack of its own");
                        }
                        let product = cluster.host(role_hosts[0]).product;
                        prop_assert!(role_hosts.iter().all(|&h| cluster.host(h).product == product), "one product per role");
                        let members: u32 = parts.iter().map(|p| p.placement.members.len() as u32).sum();
                        prop_assert_eq!(members, gang.members, "every member of {} placed", &gang.name);
                        if role.slices.is_some() && gang.required == Some(Scope::Level("rack".into())) {
                            let rack = cluster.host(role_hosts[0]).domain_path[1];
                            prop_assert!(role_hosts.iter().all(|&h| cluster.host(h).domain_path[1] == rack), "a sliced role's own rack");
                        }
                        hosts.extend(role_hosts);
                    }
                    let level = match &replica.required {
                        Some(Scope::Level(level)) if level == "rack" => Some(1),
                        Some(Scope::Level(_)) => Some(0),
                        _ => None,
                    };
                    if let Some(level) = level {
                        let domain = cluster.host(hosts[0]).domain_path[level];
                        prop_assert!(hosts.iter().all(|&h| cluster.host(h).domain_path[level] == domain), "the replica's scope");
                    }
                    ledger.reserve(&replica.name, &placed.holding()).map_err(|e| TestCaseError::fail(e.to_string()))?;
                    for member in placed.parts.iter().flat_map(|p| &p.placement.members) {
                        for gpu in mask_indices(member.gpus) {
                            let previous = shadow.insert((member.host, gpu), replica.name.clone());
                            prop_assert!(previous.is_none(), "GPU {} of host {} given twice", gpu, member.host);
                        }
                    }
                }
                Err(unplaced) => {
                    prop_assert!(ledger.holding(&replica.name).is_none(), "an unplaced replica holds nothing");
                    prop_assert!(!unplaced.reason.is_empty());
                    let free_after: Vec<u64> = (0..cluster.hosts.len() as HostId).map(|h| ledger.free(h)).collect();
                    prop_assert_eq!(&free_after, &free_before, "a failed placement changes nothing");
                }
            }
            ledger.check().map_err(TestCaseError::fail)?;
        }
    }
}

/// A small, seeded generator so the simulation replays exactly.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[test]
fn simulation_of_gangs_arriving_and_leaving_keeps_every_invariant() {
    for seed in 0..8u64 {
        let mut rng = SplitMix(seed);
        let draws: Vec<HostDraw> = (0..40)
            .map(|_| HostDraw {
                kind: rng.below(HOST_KINDS.len() as u64) as usize,
                rack: rng.below(5) as u8,
                spine: rng.below(2) as u8,
                labelled: true,
                allocated: 0,
            })
            .collect();
        let cluster = build_cluster(&draws);
        let mut ledger = Ledger::new(&cluster);
        let mut planner = Planner::new(&cluster, PlannerConfig::default());
        let mut running: Vec<(String, Vec<(HostId, u64)>)> = Vec::new();
        let mut shadow: HashMap<(HostId, u8), String> = HashMap::new();
        let (mut placed, mut refused) = (0, 0);
        for step in 0..400 {
            if running.is_empty() || rng.below(3) != 0 {
                let gpus = [1, 2, 4, 8][rng.below(4) as usize];
                let mut gang = make_gang(
                    1 + rng.below(4) as u32,
                    gpus,
                    rng.below(4) as u32,
                    rng.below(4) as u32,
                    rng.below(4) as usize,
                );
                gang.name = format!("s{seed}-g{step}");
                let free_before: Vec<u64> = (0..cluster.hosts.len() as HostId).map(|h| ledger.free(h)).collect();
                match planner.place(&ledger, &gang) {
                    Ok(placement) => {
                        check_constraints(&cluster, &free_before, &gang, &placement);
                        let holding = placement.holding();
                        ledger.reserve(&gang.name, &holding).expect("reserve");
                        for &(host, mask) in &holding {
                            for gpu in mask_indices(mask) {
                                assert!(
                                    shadow.insert((host, gpu), gang.name.clone()).is_none(),
                                    "double booking at step {step}"
                                );
                            }
                        }
                        running.push((gang.name.clone(), holding));
                        placed += 1;
                    }
                    Err(_) => refused += 1,
                }
            } else {
                let index = rng.below(running.len() as u64) as usize;
                let (name, holding) = running.swap_remove(index);
                let mut expected = holding.clone();
                expected.sort_unstable();
                assert_eq!(
                    ledger.release(&name).expect("release"),
                    expected,
                    "release returns exactly the reservation"
                );
                for &(host, mask) in &holding {
                    for gpu in mask_indices(mask) {
                        assert_eq!(shadow.remove(&(host, gpu)).as_deref(), Some(name.as_str()));
                    }
                }
            }
            ledger.check().expect("ledger invariants");
            for host in 0..cluster.hosts.len() as HostId {
                let shadow_used = shadow.keys().filter(|(h, _)| *h == host).fold(0u64, |m, (_, g)| m | (1 << g));
                assert_eq!(
                    shadow_used | cluster.initially_used[host as usize],
                    ledger.used(host),
                    "ledger agrees with the shadow at step {step}"
                );
            }
        }
        assert!(
            placed > 50 && refused > 0,
            "seed {seed}: the simulation exercised both outcomes ({placed} placed, {refused} refused)"
        );
    }
}

/// One step of a GPU-sharing simulation: reserve (node, GPU mask bits, share, CPU) or
/// release the holder at an index.
#[derive(Debug, Clone)]
enum ShareStep {
    Reserve { node: u32, gpus: u64, milli: u16, cpu: u64 },
    Release { holder: usize },
}

fn share_step() -> impl Strategy<Value = ShareStep> {
    prop_oneof![
        3 => (0u32..5, 0u64..16, prop_oneof![Just(1000u16), 1u16..1000, Just(0u16)], 0u64..6000)
            .prop_map(|(node, gpus, milli, cpu)| ShareStep::Reserve { node, gpus, milli, cpu }),
        1 => (0usize..64).prop_map(|holder| ShareStep::Release { holder }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// Random reservations and releases of GPU shares against a shadow model: a GPU never
    /// holds more than 1000 milli-GPU, a refused request changes nothing, a release
    /// returns exactly what was reserved, and the ledger's own check agrees throughout.
    #[test]
    fn gpu_shares_are_never_overcommitted(steps in proptest::collection::vec(share_step(), 1..120)) {
        use topoplace_engine::ledger::shares::{NodeCapacity, ShareGrant, ShareLedger, ShareRequest};
        let capacity: Vec<NodeCapacity> = (0..4)
            .map(|i| NodeCapacity { name: format!("n{i}"), cpu_milli: 16_000, memory_mib: 1 << 16, gpus: 2 + 2 * (i % 2) as u8 })
            .collect();
        let mut ledger: ShareLedger<usize> = ShareLedger::new(capacity.clone()).expect("valid nodes");
        let mut shadow_gpu: HashMap<(u32, u8), u32> = HashMap::new();
        let mut shadow_cpu = [0u64; 4];
        let mut held: Vec<(usize, ShareGrant)> = Vec::new();
        for (step_index, step) in steps.into_iter().enumerate() {
            match step {
                ShareStep::Reserve { node, gpus, milli, cpu } => {
                    let grant = ShareGrant { node, gpus, request: ShareRequest { cpu_milli: cpu, memory_mib: 0, gpu_milli: milli } };
                    let before: Vec<Vec<u16>> = (0..4).map(|n| ledger.gpu_left(n).to_vec()).collect();
                    let result = ledger.reserve(step_index, grant);
                    let fits = (node as usize) < capacity.len()
                        && (milli == 0) == (gpus == 0)
                        && gpus >> capacity[node as usize].gpus == 0
                        && shadow_cpu[node as usize] + cpu <= 16_000
                        && mask_indices(gpus).iter().all(|&g| shadow_gpu.get(&(node, g)).copied().unwrap_or(0) + u32::from(milli) <= 1000);
                    prop_assert_eq!(result.is_ok(), fits, "{:?}", result);
                    if fits {
                        for g in mask_indices(gpus) {
                            *shadow_gpu.entry((node, g)).or_default() += u32::from(milli);
                        }
                        shadow_cpu[node as usize] += cpu;
                        held.push((step_index, grant));
                    } else {
                        let after: Vec<Vec<u16>> = (0..4).map(|n| ledger.gpu_left(n).to_vec()).collect();
                        prop_assert_eq!(before, after, "a refused request changed the ledger");
                    }
                }
                ShareStep::Release { holder } => {
                    if held.is_empty() {
                        continue;
                    }
                    let (name, grant) = held.remove(holder % held.len());
                    prop_assert_eq!(ledger.release(&name), Ok(grant));
                    for g in mask_indices(grant.gpus) {
                        *shadow_gpu.entry((grant.node, g)).or_default() -= u32::from(grant.request.gpu_milli);
                    }
                    shadow_cpu[grant.node as usize] -= grant.request.cpu_milli;
                }
            }
            prop_assert_eq!(ledger.check(), Ok(()));
            for node in 0..4u32 {
                for (g, &left) in ledger.gpu_left(node).iter().enumerate() {
                    let used = shadow_gpu.get(&(node, g as u8)).copied().unwrap_or(0);
                    prop_assert_eq!(u32::from(left) + used, 1000);
                }
                prop_assert_eq!(ledger.cpu_left(node) + shadow_cpu[node as usize], 16_000);
            }
        }
    }
}
