//! The extender's bind body (`ExtenderBindingArgs`, JSON) for a gang whose members were
//! filtered: the member named by the body arrives at the node it names, and when the gang is
//! whole its Bindings succeed; the book's invariants hold at every step.
#![no_main]
use libfuzzer_sys::fuzz_target;
use topoplace_online::reservation::{BindFinish, BindStep};
use topoplace_server::extender::wire::ExtenderBindingArgs;

fn member(index: u32) -> k8s_openapi::api::core::v1::Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("m{index}"), "namespace": "t", "uid": format!("m{index}"),
            "labels": {"topoplace.io/gang": "g", "topoplace.io/gang-size": "2"}},
        "spec": {"containers": [{"name": "main", "resources": {"limits": {"nvidia.com/gpu": "8"}}}]}
    }))
    .unwrap_or_else(|error| panic!("the fixed member: {error}"))
}

fuzz_target!(|data: &[u8]| {
    let Ok(args) = serde_json::from_slice::<ExtenderBindingArgs>(data) else { return };
    let mut book = topoplace_fuzz::book();
    let everywhere: Vec<_> = (0..book.cluster().hosts.len() as u32).collect();
    let mut demands = Vec::new();
    for index in 0..2 {
        let Ok(demand) = topoplace_server::pod::demand_sized(&member(index), None) else { return };
        topoplace_fuzz::settle(book.filter(&demand, &everywhere, 1_000));
        demands.push(demand);
    }
    topoplace_fuzz::check(&book);
    // The body names a member by uid (as the extender looks its demand up), any node.
    let Some(demand) = demands.iter().find(|d| d.pod.uid == args.pod_uid) else { return };
    let first = topoplace_fuzz::settle(book.bind_arrive(demand, &args.node, 2_000));
    topoplace_fuzz::check(&book);
    if first.is_some() {
        let other = demands.iter().find(|d| d.pod.uid != args.pod_uid).expect("two members");
        let node = book.cluster().hosts.first().map(|h| h.name.clone()).unwrap_or_default();
        if let Some(BindStep::Bind { ticket, members }) = topoplace_fuzz::settle(book.bind_arrive(other, &node, 3_000))
        {
            let outcomes: Vec<_> = members.iter().map(|m| (m.pod.clone(), Ok(()))).collect();
            let finish = book.bind_finished(&ticket, &outcomes, 4_000);
            assert_eq!(finish, BindFinish::Bound, "every Binding succeeded");
        }
        topoplace_fuzz::check(&book);
    }
});
