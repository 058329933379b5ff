//! Each policy's choice on small hand-built Clos topologies, the queue's timing to the
//! second, drains, and a seeded simulation whose starts are checked independently: no GPU
//! held by two jobs at once, nothing on a drained host after its drain.

use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};

use super::*;
use topoplace_engine::topology::full_mask;

/// A Lingjun-format topology (one core switch): `(ip, PSW, ASW)` rows, 8 H800 per host.
fn topo(rows: &[(&str, &str, &str)]) -> Cluster {
    let mut text = String::from("ip,DSW,PSW,ASW\n");
    for (ip, spine, leaf) in rows {
        text.push_str(&format!("{ip},G1,{spine},{leaf}\n"));
    }
    Cluster::build(topoplace_formats::convert::lingjun("topo.csv", &text, "H800", 8).expect("valid topology"))
        .expect("builds")
}

/// Racks P1/S1 (m1..m4), P1/S2 (x1, x2), P2/S1 (a1..a3): node-name order (a, m, x) is not
/// rack order.
fn three_racks() -> Cluster {
    topo(&[
        ("m1", "P1", "S1"),
        ("m2", "P1", "S1"),
        ("m3", "P1", "S1"),
        ("m4", "P1", "S1"),
        ("x1", "P1", "S2"),
        ("x2", "P1", "S2"),
        ("a1", "P2", "S1"),
        ("a2", "P2", "S1"),
        ("a3", "P2", "S1"),
    ])
}

fn job(id: &str, submit_s: u64, duration_s: u64, gpus: u32) -> TraceJob {
    TraceJob { id: id.into(), submit_s, duration_s, gpus }
}

fn use_gpus(cluster: &Cluster, ledger: &mut Ledger<JobHolder>, host: &str, gpus: u8) {
    let id = cluster.host_id(&format!("lj-{host}")).expect("host exists");
    ledger.reserve(&JobHolder::Job(format!("setup-{host}")), &[(id, full_mask(gpus))]).expect("setup reservation");
}

/// Where `policy` puts a job of `gpus` GPUs (whole hosts above 8), as sorted host names.
fn choose(cluster: &Cluster, ledger: &Ledger<JobHolder>, policy: JobPolicy, gpus: u32) -> Vec<String> {
    let jobs = [job("probe", 0, 1, gpus)];
    let mut placer = Placer::new(cluster, policy, &jobs, 8, 7, 3600);
    placer.arrived(0, 0);
    placer.refresh_demand(ledger, std::iter::once(0), 0);
    let (members, per_member) = if gpus <= 8 { (1, gpus) } else { (gpus / 8, 8) };
    let holding = placer.place(ledger, 0, members, per_member, None).expect("the job fits");
    assert_eq!(holding.len(), members as usize);
    for &(host, mask) in &holding {
        assert_eq!(mask.count_ones(), per_member);
        assert_eq!(mask & ledger.used(host), 0, "only free GPUs");
    }
    let mut names: Vec<String> = holding.iter().map(|&(h, _)| cluster.host(h).name.clone()).collect();
    names.sort();
    names
}

fn names(hosts: &[&str]) -> Vec<String> {
    hosts.iter().map(|h| format!("lj-{h}")).collect()
}

#[test]
fn first_fit_walks_node_names() {
    let cluster = three_racks();
    let mut ledger = Ledger::empty(&cluster);
    assert_eq!(choose(&cluster, &ledger, JobPolicy::FirstFit, 1), names(&["a1"]));
    assert_eq!(choose(&cluster, &ledger, JobPolicy::FirstFit, 16), names(&["a1", "a2"]));
    use_gpus(&cluster, &mut ledger, "a1", 6);
    assert_eq!(choose(&cluster, &ledger, JobPolicy::FirstFit, 2), names(&["a1"]));
    assert_eq!(choose(&cluster, &ledger, JobPolicy::FirstFit, 3), names(&["a2"]));
}

#[test]
fn bestfit_nodes_takes_the_host_with_the_fewest_free_gpus() {
    let cluster = three_racks();
    let mut ledger = Ledger::empty(&cluster);
    use_gpus(&cluster, &mut ledger, "m2", 6);
    use_gpus(&cluster, &mut ledger, "x1", 7);
    assert_eq!(choose(&cluster, &ledger, JobPolicy::BestfitNodes, 1), names(&["x1"]));
    assert_eq!(choose(&cluster, &ledger, JobPolicy::BestfitNodes, 2), names(&["m2"]));
    // Gangs take whole hosts: no topology, so the first names.
    assert_eq!(choose(&cluster, &ledger, JobPolicy::BestfitNodes, 16), names(&["a1", "a2"]));
}

#[test]
fn kueue_takes_the_smallest_domain_that_fits_then_goes_up_a_level() {
    let cluster = three_racks();
    let mut ledger = Ledger::empty(&cluster);
    use_gpus(&cluster, &mut ledger, "m1", 1);
    // Whole free hosts per rack: P1/S1 3, P1/S2 2, P2/S1 3.
    assert_eq!(choose(&cluster, &ledger, JobPolicy::KueueTas, 16), names(&["x1", "x2"]), "best fit: the 2-host rack");
    assert_eq!(
        choose(&cluster, &ledger, JobPolicy::KueueTas, 24),
        names(&["m2", "m3", "m4"]),
        "two racks hold 3; ties go to the first label values"
    );
    // No rack holds 5: block P1 (5) does; inside it, the roomiest rack whole, then the rest.
    assert_eq!(choose(&cluster, &ledger, JobPolicy::KueueTas, 40), names(&["m2", "m3", "m4", "x1", "x2"]));
    // A 1-GPU pod: the rack with the least free capacity first (P1/S2, 16 GPUs), then its
    // most allocated host, although m1 elsewhere has fewer free GPUs.
    assert_eq!(choose(&cluster, &ledger, JobPolicy::KueueTas, 1), names(&["x1"]));
}

#[test]
fn volcano_takes_the_lowest_tier_then_the_most_utilised_hypernode() {
    let cluster = three_racks();
    let mut ledger = Ledger::empty(&cluster);
    use_gpus(&cluster, &mut ledger, "m1", 1);
    // Utilisation with the gang in it: P1/S1 17/32, P1/S2 16/16, P2/S1 16/24.
    assert_eq!(choose(&cluster, &ledger, JobPolicy::VolcanoHypernode, 16), names(&["x1", "x2"]));
    // A 1-GPU pod: P1/S1 and P1/S2 tie at 2/32 = 1/16; the first by name, then the most used node.
    assert_eq!(choose(&cluster, &ledger, JobPolicy::VolcanoHypernode, 1), names(&["m1"]));
    // Four hosts fit no rack: tier 2, the block P1 (5 whole hosts).
    let four = choose(&cluster, &ledger, JobPolicy::VolcanoHypernode, 32);
    assert!(four.iter().all(|h| !h.starts_with("lj-a")), "{four:?}");
}

#[test]
fn topoplace_keeps_a_gang_in_one_rack_and_random_is_seeded() {
    let cluster = three_racks();
    let mut ledger = Ledger::empty(&cluster);
    use_gpus(&cluster, &mut ledger, "m1", 1);
    for gpus in [16, 24] {
        let hosts = choose(&cluster, &ledger, JobPolicy::Topoplace, gpus);
        let holding: Vec<(HostId, GpuMask)> =
            hosts.iter().map(|h| (cluster.host_id(h).expect("host"), full_mask(8))).collect();
        assert_eq!(spread(&cluster, &holding), Spread::OneRack, "{gpus} GPUs: {hosts:?}");
    }
    let first = choose(&cluster, &ledger, JobPolicy::Random, 24);
    assert_eq!(first, choose(&cluster, &ledger, JobPolicy::Random, 24), "same seed, same hosts");
    assert!(!first.contains(&"lj-m1".to_string()), "a gang member needs a whole free host");
}

fn two_hosts() -> Cluster {
    topo(&[("h1", "P1", "S1"), ("h2", "P1", "S1")])
}

#[test]
fn strict_fifo_holds_everything_behind_a_head_that_does_not_fit() {
    let cluster = two_hosts();
    let jobs = [job("j1", 1000, 100, 8), job("j2", 1010, 50, 16), job("j3", 1020, 10, 1)];
    let config = SimConfig { queue: QueueMode::StrictFifo, ..SimConfig::default() };
    let outcome = simulate(&cluster, &jobs, JobPolicy::FirstFit, &config).expect("runs");
    let start_of = |id: &str| {
        let index = jobs.iter().position(|j| j.id == id).expect("job");
        outcome.starts.iter().find(|s| s.job == index).map(|s| s.at_ms / 1000)
    };
    assert_eq!((start_of("j1"), start_of("j2"), start_of("j3")), (Some(0), Some(100), Some(150)));
    assert!((outcome.mean_queue_delay_s - (0.0 + 90.0 + 130.0) / 3.0).abs() < 1e-9);
    assert_eq!(outcome.p95_queue_delay_s, 130.0);
    // 8 GPUs for 100 s, 16 for 50 s, 1 for 10 s, of 16 GPUs over 160 s.
    assert!((outcome.gpu_utilisation - 1610.0 / (16.0 * 160.0)).abs() < 1e-12);
    assert_eq!(outcome.makespan_s, 160.0);
    assert_eq!((outcome.multi_host_jobs, outcome.multi_host_in_one_rack), (1, 1));
    let mean_timeline = outcome.timeline.iter().sum::<f64>() / outcome.timeline.len() as f64;
    assert!((mean_timeline - outcome.gpu_utilisation).abs() < 1e-9, "the timeline averages to the utilisation");

    let best_effort = SimConfig { queue: QueueMode::BestEffortFifo, ..SimConfig::default() };
    let outcome = simulate(&cluster, &jobs, JobPolicy::FirstFit, &best_effort).expect("runs");
    assert!((outcome.mean_queue_delay_s - 30.0).abs() < 1e-9, "j3 starts at once beside j1");

    let doubled = SimConfig { load_factor: 2.0, ..config };
    let outcome = simulate(&cluster, &jobs, JobPolicy::FirstFit, &doubled).expect("runs");
    assert!((outcome.mean_queue_delay_s - (0.0 + 95.0 + 140.0) / 3.0).abs() < 1e-9, "arrivals at half the times");
}

#[test]
fn a_big_job_waiting_while_its_gpus_are_free_but_scattered_is_stranded() {
    let rows: Vec<(String, &str, &str)> =
        (0..10).map(|i| (format!("h{i}"), "P1", if i < 5 { "S1" } else { "S2" })).collect();
    let rows: Vec<(&str, &str, &str)> = rows.iter().map(|(ip, p, s)| (ip.as_str(), *p, *s)).collect();
    let cluster = topo(&rows);
    // Three small jobs on three hosts leave 65 GPUs free but only 7 whole hosts.
    let jobs = [job("a", 0, 100, 4), job("b", 0, 200, 5), job("c", 0, 300, 6), job("big", 0, 10, 64)];
    let outcome = simulate(&cluster, &jobs, JobPolicy::FirstFit, &SimConfig::default()).expect("runs");
    assert!((outcome.stranded_64gpu_hours - 100.0 / 3600.0).abs() < 1e-12, "{}", outcome.stranded_64gpu_hours);
    assert_eq!(outcome.multi_host_across_blocks + outcome.multi_host_in_one_block, 1, "8 hosts span both racks");
}

#[test]
fn a_drained_rack_stops_its_jobs_whole_and_they_restart_elsewhere() {
    let cluster = topo(&[("b1", "P1", "S1"), ("b2", "P1", "S1"), ("a1", "P1", "S2"), ("a2", "P1", "S2")]);
    let jobs = [job("gang", 0, 100, 16)];
    let config = SimConfig { drains: vec![Drain { target: "G1/P1/S2".into(), at_s: 50 }], ..SimConfig::default() };
    let outcome = simulate(&cluster, &jobs, JobPolicy::FirstFit, &config).expect("runs");
    assert_eq!(outcome.drain_restarts, 1);
    assert_eq!(outcome.starts.len(), 2);
    assert_eq!((outcome.starts[0].at_ms, outcome.starts[0].end_ms), (0, 50_000));
    assert_eq!((outcome.starts[1].at_ms, outcome.starts[1].end_ms), (50_000, 150_000));
    let rack_of = |start: &JobStart| cluster.host(start.holding[0].0).domain_path.clone();
    assert_ne!(rack_of(&outcome.starts[0]), rack_of(&outcome.starts[1]));
    assert_eq!(outcome.mean_queue_delay_s, 0.0, "delay counts to the first start");
    assert_eq!(outcome.makespan_s, 150.0);

    // Draining every host leaves the gang waiting for good.
    let all = SimConfig { drains: vec![Drain { target: "G1".into(), at_s: 50 }], ..SimConfig::default() };
    let outcome = simulate(&cluster, &[job("gang", 0, 100, 16), job("late", 60, 10, 1)], JobPolicy::FirstFit, &all)
        .expect("runs");
    assert_eq!((outcome.never_started, outcome.started), (2, 1));
}

#[test]
fn bad_inputs_are_named() {
    let cluster = two_hosts();
    let config = SimConfig::default();
    let error = simulate(&cluster, &[job("odd", 0, 1, 12)], JobPolicy::FirstFit, &config).unwrap_err();
    assert_eq!(error.to_string(), "job `odd` asks for 12 GPUs: above one host's 8, a job must take whole hosts");
    let error = simulate(&cluster, &[], JobPolicy::FirstFit, &config).unwrap_err();
    assert_eq!(error, JobReplayError::NoJobs);
    let zero = SimConfig { load_factor: 0.0, ..SimConfig::default() };
    assert_eq!(
        simulate(&cluster, &[job("a", 0, 1, 1)], JobPolicy::FirstFit, &zero).unwrap_err(),
        JobReplayError::LoadFactor(0.0)
    );
    let drain = SimConfig { drains: vec![Drain { target: "P9/S9".into(), at_s: 1 }], ..SimConfig::default() };
    let error = simulate(&cluster, &[job("a", 0, 1, 1)], JobPolicy::FirstFit, &drain).unwrap_err();
    assert!(error.to_string().contains("racks look like `G1/P1/S1`"), "{error}");
    // Larger than the whole cluster: rejected and counted, not an error.
    let outcome =
        simulate(&cluster, &[job("huge", 0, 1, 64), job("a", 0, 1, 1)], JobPolicy::FirstFit, &config).expect("runs");
    assert_eq!((outcome.rejected, outcome.started), (1, 1));
}

#[test]
fn products_per_rack_alternate_and_gangs_never_mix_them() {
    let mut text = String::from("ip,DSW,PSW,ASW\n");
    for rack in 0..4 {
        for host in 0..2 {
            text.push_str(&format!("r{rack}h{host},G1,P1,S{rack}\n"));
        }
    }
    let mut spec = topoplace_formats::convert::lingjun("topo.csv", &text, "H800", 8).expect("valid");
    let products = [
        topoplace_engine::topology::product::lookup("H800").expect("H800"),
        topoplace_engine::topology::product::lookup("A100-SXM4-80GB").expect("A100"),
    ];
    products_per_rack(&mut spec, &products).expect("assigned");
    let cluster = Cluster::build(spec).expect("builds");
    let per_rack: Vec<ProductId> =
        cluster.domains[2].iter().map(|rack| cluster.host(rack.hosts.start).product).collect();
    assert_eq!(per_rack, vec![products[0], products[1], products[0], products[1]]);
    let jobs: Vec<TraceJob> = (0..12).map(|i| job(&format!("g{i}"), i, 30, 24)).collect();
    for policy in JobPolicy::ALL {
        let outcome = simulate(&cluster, &jobs, policy, &SimConfig::default()).expect("runs");
        for start in &outcome.starts {
            let first = cluster.host(start.holding[0].0).product;
            assert!(start.holding.iter().all(|&(h, _)| cluster.host(h).product == first), "{policy} mixed products");
        }
    }
}

/// Per host, GPU masks over time from the starts: no GPU is held by two starts at once, and
/// no start holds a drained host at or after its drain.
fn check_starts(cluster: &Cluster, outcome: &JobOutcome, drained: &[(u64, Vec<HostId>)]) {
    for (index, a) in outcome.starts.iter().enumerate() {
        assert!(a.end_ms >= a.at_ms && a.end_ms != u64::MAX, "every start ends");
        for b in &outcome.starts[index + 1..] {
            if a.at_ms < b.end_ms && b.at_ms < a.end_ms {
                for &(ha, ma) in &a.holding {
                    for &(hb, mb) in &b.holding {
                        assert!(
                            ha != hb || ma & mb == 0,
                            "{}: a GPU of `{}` held twice",
                            outcome.policy,
                            cluster.host(ha).name
                        );
                    }
                }
            }
        }
        for (at, hosts) in drained {
            if a.end_ms > *at {
                assert!(
                    a.holding.iter().all(|(h, _)| !hosts.contains(h)),
                    "{}: a start on a drained host",
                    outcome.policy
                );
            }
        }
    }
}

#[test]
fn seeded_simulations_never_double_book_and_conserve_gpus() {
    // 4 racks of 4 hosts in two blocks; 400 jobs of the trace's sizes arriving fast.
    let rows: Vec<(String, String, String)> =
        (0..16).map(|i| (format!("h{i:02}"), format!("P{}", i / 8), format!("S{}", (i / 4) % 2))).collect();
    let rows: Vec<(&str, &str, &str)> = rows.iter().map(|(a, b, c)| (a.as_str(), b.as_str(), c.as_str())).collect();
    let cluster = topo(&rows);
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(11);
    let sizes = [1, 1, 1, 1, 2, 4, 8, 8, 16, 32];
    let jobs: Vec<TraceJob> = (0..400)
        .map(|i| job(&format!("j{i}"), i * 20, rng.random_range(10..2_000), sizes[rng.random_range(0..sizes.len())]))
        .collect();
    let drain_at = 3_000;
    let drained = vec![(drain_at * 1000, drain_hosts(&cluster, "G1/P0/S1").expect("rack"))];
    for queue in [QueueMode::StrictFifo, QueueMode::BestEffortFifo] {
        for policy in JobPolicy::ALL {
            let config = SimConfig {
                queue,
                drains: vec![Drain { target: "G1/P0/S1".into(), at_s: drain_at }],
                rack_wait_s: 600,
                ..SimConfig::default()
            };
            let outcome = simulate(&cluster, &jobs, policy, &config).expect("runs (GPUs conserved at every event)");
            assert_eq!(outcome.started + outcome.rejected + outcome.never_started, jobs.len());
            assert_eq!(outcome.never_started, 0, "{policy}: 12 hosts stay for jobs of at most 4 hosts");
            assert_eq!(
                outcome.multi_host_in_one_rack + outcome.multi_host_in_one_block + outcome.multi_host_across_blocks,
                outcome.multi_host_jobs
            );
            check_starts(&cluster, &outcome, &drained);
            let again = simulate(&cluster, &jobs, policy, &config).expect("runs");
            assert_eq!(again.starts, outcome.starts, "{policy}: deterministic");
        }
    }
}

#[test]
fn a_spread_is_avoidable_only_when_one_rack_had_room_at_its_start() {
    let cluster = three_racks();
    let config = SimConfig::default();
    // Two whole-host jobs fill a1 and a2; the 2-host gang comes a second later.
    let jobs = [job("s1", 0, 100, 8), job("s2", 0, 100, 8), job("gang", 1, 100, 16)];
    let blind = simulate(&cluster, &jobs, JobPolicy::FirstFit, &config).expect("replays");
    // First fit takes a3 and m1, though rack P1/S1 had four whole free hosts.
    assert_eq!((blind.multi_host_in_one_rack, blind.multi_host_spans_avoidable), (0, 1));
    // Whole free hosts at the start: a3, m1..m4, x1, x2; two of them are the gang's.
    assert_eq!(blind.span_spare_hosts_mean, 5.0);
    let aware = simulate(&cluster, &jobs, JobPolicy::Topoplace, &config).expect("replays");
    assert_eq!((aware.multi_host_in_one_rack, aware.multi_host_spans_avoidable), (1, 0));
    assert_eq!(aware.span_spare_hosts_mean, 0.0, "no spread, nothing to average");

    // Three hosts never fit a rack of two: the spread is forced, with one host to spare.
    let two_by_two = topo(&[("h1", "P1", "S1"), ("h2", "P1", "S1"), ("h3", "P1", "S2"), ("h4", "P1", "S2")]);
    for policy in [JobPolicy::Topoplace, JobPolicy::KueueTas, JobPolicy::VolcanoHypernode] {
        let outcome = simulate(&two_by_two, &[job("wide", 0, 10, 24)], policy, &config).expect("replays");
        assert_eq!((outcome.multi_host_in_one_block, outcome.multi_host_spans_avoidable), (1, 0), "{policy}");
        assert_eq!(outcome.span_spare_hosts_mean, 1.0, "{policy}");
    }
}

#[test]
fn a_rack_of_another_product_with_room_makes_a_spread_avoidable() {
    // Racks in label order get H800, H100, H800: P1/S1 = m1, m2; P1/S2 = x1..x3; P2/S1 = a1, a2.
    let mut text = String::from("ip,DSW,PSW,ASW\n");
    for (ip, spine, leaf) in
        [("m1", "P1", "S1"), ("m2", "P1", "S1"), ("x1", "P1", "S2"), ("x2", "P1", "S2"), ("x3", "P1", "S2")]
            .into_iter()
            .chain([("a1", "P2", "S1"), ("a2", "P2", "S1")])
    {
        text.push_str(&format!("{ip},G1,{spine},{leaf}\n"));
    }
    let mut spec = topoplace_formats::convert::lingjun("topo.csv", &text, "H800", 8).expect("valid topology");
    let products: Vec<ProductId> = ["H800", "H100"]
        .iter()
        .map(|name| topoplace_engine::topology::product::lookup(name).expect("known product"))
        .collect();
    products_per_rack(&mut spec, &products).expect("products assigned");
    let cluster = Cluster::build(spec).expect("builds");
    let jobs = [job("wide", 0, 100, 24)];
    // Kueue takes the first flavor that holds the job (H800: two racks of two) and spreads,
    // while the H100 rack had three whole free hosts.
    let kueue = simulate(&cluster, &jobs, JobPolicy::KueueTas, &SimConfig::default()).expect("replays");
    assert_eq!((kueue.multi_host_in_one_rack, kueue.multi_host_spans_avoidable), (0, 1));
    assert_eq!(kueue.span_spare_hosts_mean, 1.0, "four H800 hosts, three taken");
    let engine = simulate(&cluster, &jobs, JobPolicy::Topoplace, &SimConfig::default()).expect("replays");
    assert_eq!((engine.multi_host_in_one_rack, engine.multi_host_spans_avoidable), (1, 0));
    assert_eq!(cluster.host(engine.starts[0].holding[0].0).product, products[1], "the H100 rack");
}
