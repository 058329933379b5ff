//! The gRPC request conversion: protobuf bytes decoded as a PlanRequest (the first byte even)
//! or a CapacityRequest (odd), converted as the server converts them, and a Plan run as a
//! greedy dry run on a fresh book (nothing held after it).
#![no_main]
use libfuzzer_sys::fuzz_target;
use prost::Message;
use topoplace_engine::placement::SolverChoice;
use topoplace_online::reservation::PlanOptions;
use topoplace_server::grpc::{convert, pb};

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else { return };
    let options = || PlanOptions {
        dry_run: true,
        ttl_ms: 1_000,
        solver: SolverChoice::Greedy,
        allow_partial: true,
        owner: String::new(),
        explain: false,
    };
    if which % 2 == 0 {
        let Ok(request) = pb::PlanRequest::decode(rest) else { return };
        let _ = convert::solver_choice(request.solver);
        let mut book = topoplace_fuzz::book();
        if convert::has_roles(&request.gangs) {
            if let Ok(requests) = convert::replica_requests(&request.gangs) {
                let _ = book.plan_replicas(&requests, &options(), 0);
            }
        } else if let Ok(requests) = convert::gang_requests(&request.gangs) {
            let _ = book.plan_gangs(&requests, &options(), 0);
        }
        topoplace_fuzz::check(&book);
    } else {
        let Ok(request) = pb::CapacityRequest::decode(rest) else { return };
        if let Some(shape) = request.shape {
            let gangs = vec![shape];
            let _ = convert::gang_requests(&gangs);
            let _ = convert::replica_requests(&gangs);
        }
    }
});
