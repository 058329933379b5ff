//! The extender's prioritize body (`ExtenderArgs`, JSON): decoded and scored by a fresh book
//! after the same pod's filter; one score per offered node, invariants intact.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((demand, names)) = topoplace_fuzz::filter_body(data) else { return };
    if demand.gpus == 0 {
        return;
    }
    let mut book = topoplace_fuzz::book();
    let ids: Vec<_> = names.iter().filter_map(|name| book.cluster().host_id(name)).collect();
    topoplace_fuzz::settle(book.filter(&demand, &ids, 1_000));
    if let Some(scores) = topoplace_fuzz::settle(book.prioritize(&demand, &ids, 1_000)) {
        assert_eq!(scores.len(), ids.len(), "one score per offered node");
    }
    topoplace_fuzz::check(&book);
});
