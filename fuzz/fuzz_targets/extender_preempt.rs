//! The extender's preempt body (`ExtenderPreemptionArgs`, JSON, either victims form) against a
//! book in which a gang and single pods are bound; the book's answer keeps its invariants.
#![no_main]
use libfuzzer_sys::fuzz_target;
use topoplace_online::reservation::{PodIdentity, PreemptCandidate};
use topoplace_server::extender::wire::ExtenderPreemptionArgs;

fn bound_book() -> topoplace_online::reservation::Book {
    let mut book = topoplace_fuzz::book();
    for (index, node) in ["r1-0", "r1-1", "r2-0", "l40s-0"].into_iter().enumerate() {
        let pod = PodIdentity { namespace: "batch".into(), name: format!("v{index}"), uid: format!("v{index}") };
        let gang = (index < 2).then(|| "batch/pair".to_string());
        if let Err(error) = book.observe_bound(pod, node, None, 4, gang) {
            panic!("the fixed bound pods: {error}");
        }
    }
    book
}

fuzz_target!(|data: &[u8]| {
    let Ok(args) = serde_json::from_slice::<ExtenderPreemptionArgs>(data) else { return };
    let Ok(demand) = topoplace_server::pod::demand_sized(&args.pod, None) else { return };
    let mut book = bound_book();
    let mut candidates = Vec::new();
    for (node, victims) in args.node_name_to_meta_victims.iter().flatten() {
        let Some(host) = book.cluster().host_id(node) else { continue };
        let victims = victims.pods.iter().flatten().map(|p| p.uid.clone()).collect();
        candidates.push(PreemptCandidate { host, victims });
    }
    for (node, victims) in args.node_name_to_victims.iter().flatten() {
        let Some(host) = book.cluster().host_id(node) else { continue };
        let victims = victims.pods.iter().flatten().map(|p| p.metadata.uid.clone().unwrap_or_default()).collect();
        candidates.push(PreemptCandidate { host, victims });
    }
    if demand.gpus > 0 {
        if let Some(answer) = topoplace_fuzz::settle(book.preempt(&demand, &candidates, 1_000)) {
            assert_eq!(answer.keep.len(), candidates.len(), "one answer per candidate");
        }
    }
    topoplace_fuzz::check(&book);
});
