//! The extender's filter body as kube-scheduler sends it (`ExtenderArgs`, JSON): decoded, its
//! node names read from `NodeNames` or a full `NodeList`, the pod translated (labels,
//! annotations, quantities), and filtered by a fresh book, whose invariants must hold after.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((demand, names)) = topoplace_fuzz::filter_body(data) else { return };
    let mut book = topoplace_fuzz::book();
    let ids: Vec<_> = names.iter().filter_map(|name| book.cluster().host_id(name)).collect();
    if demand.gpus > 0 {
        topoplace_fuzz::settle(book.filter(&demand, &ids, 1_000));
        topoplace_fuzz::check(&book);
        // The same pod filtered again, as kube-scheduler retries it.
        topoplace_fuzz::settle(book.filter(&demand, &ids, 2_000));
        topoplace_fuzz::check(&book);
    }
});
