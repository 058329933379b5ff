//! The gRPC placement API over loopback with a real tonic client: every RPC, concurrent Plans
//! that must never double-book, reservations that expire, invalid requests, the book shared
//! with the extender in both directions, health and reflection, TLS, mutual TLS and reserve
//! tokens, and `topoplace plan --server`.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use futures::StreamExt;
use support::{pki, pod, post, schedule, static_extender, static_server};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity, ServerTlsConfig};
use tonic::Code;
use topoplace_server::assemble::ServerSetup;
use topoplace_server::grpc::pb::{self, placement_client::PlacementClient};
use topoplace_server::grpc::{GrpcConfig, ReserveTokens};

const CLUSTER: &str = "testdata/extender/cluster.yaml";
/// Guards the waits below so a broken server fails the test instead of hanging it.
const PATIENCE: Duration = Duration::from_secs(20);

async fn client(base: &str) -> PlacementClient<Channel> {
    PlacementClient::connect(base.to_string()).await.expect("connect")
}

fn gang(name: &str, members: u32, gpus: u32) -> pb::Gang {
    pb::Gang {
        namespace: "team".into(),
        name: name.into(),
        members,
        gpus_per_member: gpus,
        tensor_parallel: gpus,
        ..Default::default()
    }
}

fn plan(gangs: Vec<pb::Gang>, dry_run: bool) -> pb::PlanRequest {
    pb::PlanRequest { gangs, dry_run, ..Default::default() }
}

fn capacity(members: u32, gpus: u32) -> pb::CapacityRequest {
    pb::CapacityRequest { shape: Some(gang("", members, gpus)), by_level: String::new() }
}

async fn state(client: &mut PlacementClient<Channel>) -> pb::ClusterStateResponse {
    client.cluster_state(pb::ClusterStateRequest { summary_only: false }).await.expect("state").into_inner()
}

fn nodes_of(placement: &pb::GangPlacement) -> Vec<String> {
    placement.members.iter().map(|m| m.node.clone()).collect()
}

#[tokio::test]
async fn every_rpc_answers_from_the_live_view() {
    let (http, ext, _binder) = static_extender(CLUSTER, 30_000).await;
    let grpc = http.grpc.clone();
    let mut api = client(&grpc).await;

    let initial = state(&mut api).await;
    assert_eq!((initial.hosts, initial.gpus, initial.free_gpus), (10, 72, 72));
    assert_eq!(initial.host_states.len(), 10);
    assert!(initial.domains.iter().any(|d| d.domain == "s1/r1" && d.gpus == 32 && d.free_gpus == 32));
    let summary = api.cluster_state(pb::ClusterStateRequest { summary_only: true }).await.expect("state").into_inner();
    assert!(summary.host_states.is_empty() && summary.gpus == 72);

    // TP-8 slots: one per H100 host, none on the 4-GPU L40S hosts.
    let tp8 = api.capacity(capacity(1, 8)).await.expect("capacity").into_inner();
    assert_eq!(tp8.replicas, 8);
    assert_eq!(tp8.level, "network.topology.nvidia.com/leaf");
    let per_rack: Vec<(String, u64)> = tp8.domains.iter().map(|d| (d.domain.clone(), d.replicas)).collect();
    assert_eq!(per_rack, vec![("s1/r1".into(), 4), ("s1/r2".into(), 4), ("s2/r3".into(), 0)]);
    let tp4 = api
        .capacity(pb::CapacityRequest { shape: Some(gang("", 1, 4)), by_level: "spine".into() })
        .await
        .expect("capacity")
        .into_inner();
    // The L40S hosts have no NVLink: a TP-4 group runs over PCIe there, one per host.
    assert_eq!(tp4.replicas, 18);
    let per_spine: Vec<(String, u64)> = tp4.domains.iter().map(|d| (d.domain.clone(), d.replicas)).collect();
    assert_eq!(per_spine, vec![("s1".into(), 16), ("s2".into(), 2)]);
    // Asked for NVLink, they hold none, and say why.
    let nvlink_tp4 = pb::Gang { required_topology: "nvlink".into(), ..gang("", 1, 4) };
    let tp4 = api
        .capacity(pb::CapacityRequest { shape: Some(nvlink_tp4), by_level: "spine".into() })
        .await
        .expect("capacity")
        .into_inner();
    assert_eq!(tp4.replicas, 16);
    assert!(tp4.rejected_hosts.iter().any(|g| g.hosts == 2 && g.reason.contains("requires nvlink")), "{tp4:?}");
    let data_parallel = pb::Gang { tensor_parallel: 1, ..gang("", 1, 4) };
    let dp4 = api
        .capacity(pb::CapacityRequest { shape: Some(data_parallel), by_level: String::new() })
        .await
        .expect("capacity")
        .into_inner();
    assert_eq!(dp4.replicas, 18);

    // A dry run answers with concrete GPUs and holds nothing.
    let two_hosts = pb::Gang { required_topology: "leaf".into(), ..gang("llm", 2, 8) };
    let dry = api.plan(plan(vec![two_hosts.clone()], true)).await.expect("plan").into_inner();
    assert!(dry.placed && dry.reservation_id.is_empty());
    let placement = &dry.placements[0];
    assert_eq!((placement.namespace.as_str(), placement.name.as_str()), ("team", "llm"));
    assert_eq!(placement.members[0].gpus, (0..8).collect::<Vec<u32>>());
    assert_eq!(placement.solver.as_ref().map(|s| s.solver.as_str()), Some("greedy"));
    assert!(placement.score.as_ref().is_some_and(|s| s.total > 0.0));
    let racks: BTreeSet<&str> = placement.members.iter().map(|m| &m.node[..2]).collect();
    assert_eq!(racks.len(), 1, "required leaf keeps both members in one rack: {placement:?}");
    assert_eq!(state(&mut api).await.free_gpus, 72);

    // Reserving holds the GPUs until released.
    let held = api.plan(plan(vec![two_hosts.clone()], false)).await.expect("plan").into_inner();
    assert!(!held.reservation_id.is_empty());
    assert!(held.expires_in_ms > 290_000 && held.expires_in_ms <= 300_000, "{}", held.expires_in_ms);
    let now = state(&mut api).await;
    assert_eq!((now.free_gpus, now.reserved_gpus), (56, 16));
    assert_eq!(now.reservations[0].id, held.reservation_id);
    assert_eq!(now.reservations[0].gang, "team/llm");
    assert_eq!(api.capacity(capacity(1, 8)).await.expect("capacity").into_inner().replicas, 6);
    let again = api.plan(plan(vec![two_hosts], false)).await.expect_err("reserved twice");
    assert_eq!(again.code(), Code::AlreadyExists, "{again:?}");

    // Explain: a gang that cannot fit, with reasons; per-node verdicts.
    let reserved_node = held.placements[0].members[0].node.clone();
    let free_node = if reserved_node == "r1-0" || reserved_node == "r1-1" { "r2-3" } else { "r1-0" };
    let whole_host = pb::Gang { required_topology: "host".into(), ..gang("wide", 2, 8) };
    let no = api
        .explain(pb::ExplainRequest { gang: Some(whole_host), nodes: vec![reserved_node.clone(), free_node.into()] })
        .await
        .expect("explain")
        .into_inner();
    assert!(!no.fits && no.placement.is_none());
    assert!(no.reason.contains("host"), "{}", no.reason);
    assert!(no.rejected_hosts.iter().any(|g| g.reason.contains("L40S") && g.hosts == 2), "{:?}", no.rejected_hosts);
    assert_eq!(no.nodes.len(), 2);
    assert!(!no.nodes[0].fits && no.nodes[0].reason.contains("fewer free GPUs"), "{:?}", no.nodes[0]);
    assert!(no.nodes[1].fits && no.nodes[1].units == 1, "{:?}", no.nodes[1]);
    let yes = api
        .explain(pb::ExplainRequest { gang: Some(gang("one", 1, 8)), nodes: vec![] })
        .await
        .expect("explain")
        .into_inner();
    assert!(yes.fits && yes.placement.is_some() && !yes.candidates.is_empty());
    assert!(yes.candidates.iter().all(|c| c.score.is_some()));
    let unknown = api
        .explain(pb::ExplainRequest { gang: Some(gang("one", 1, 8)), nodes: vec!["nowhere-7".into()] })
        .await
        .expect_err("unknown node");
    assert_eq!(unknown.code(), Code::InvalidArgument);
    assert!(unknown.message().contains("nowhere-7"), "{}", unknown.message());

    // Release frees exactly what was held; a second release finds nothing.
    let released = api
        .release(pb::ReleaseRequest { reservation_id: held.reservation_id.clone() })
        .await
        .expect("release")
        .into_inner();
    assert_eq!((released.gangs, released.gpus_released), (vec!["team/llm".to_string()], 16));
    assert_eq!(state(&mut api).await.free_gpus, 72);
    let gone = api.release(pb::ReleaseRequest { reservation_id: held.reservation_id }).await.expect_err("released");
    assert_eq!(gone.code(), Code::NotFound);

    // The exact solver is there too.
    let exact = api
        .plan(pb::PlanRequest { solver: pb::Solver::Exact as i32, ..plan(vec![gang("x", 2, 8)], true) })
        .await
        .expect("plan")
        .into_inner();
    assert!(exact.placements[0].solver.as_ref().is_some_and(|s| s.solver.starts_with("exact")), "{exact:?}");
    ext.check().expect("book consistent");
    http.stop().await;
}

#[tokio::test]
async fn invalid_requests_are_refused_with_invalid_argument_and_say_what_is_wrong() {
    let (http, ext, _binder) = static_extender(CLUSTER, 30_000).await;
    let grpc = http.grpc.clone();
    let mut api = client(&grpc).await;
    let cases: Vec<(pb::PlanRequest, &str)> = vec![
        (plan(vec![gang("zero", 1, 0)], false), "gpus_per_member must be at least 1"),
        (plan(vec![gang("none", 0, 8)], false), "members must be at least 1"),
        (plan(vec![pb::Gang { product: "TPU-v5".into(), ..gang("tpu", 1, 8) }], false), "product `TPU-v5` is unknown"),
        (plan(vec![gang("huge", 10, 8)], false), "needs 80 GPUs (10 members x 8), but the cluster has only 72"),
        (
            plan(vec![pb::Gang { product: "L40S".into(), ..gang("l40s", 3, 4) }], false),
            "needs 12 GPUs (3 members x 4), but the cluster has only 8 L40S GPUs",
        ),
        (
            plan(vec![pb::Gang { product: "H200".into(), ..gang("absent", 1, 8) }], false),
            "product `H200` is not in the cluster",
        ),
        (plan(vec![pb::Gang { required_topology: "zone".into(), ..gang("z", 1, 8) }], false), "`zone`"),
        (plan(vec![gang("", 1, 8)], false), "gangs[0]: name is required"),
        (plan(vec![pb::Gang { tensor_parallel: 3, ..gang("tp", 1, 8) }], false), "tensor_parallel 3"),
        (plan(vec![gang("dup", 1, 8), gang("dup", 1, 8)], false), "appears twice"),
        (plan(vec![], false), "no gangs"),
        (pb::PlanRequest { ttl_seconds: 100_000, ..plan(vec![gang("t", 1, 8)], false) }, "ttl_seconds"),
        (pb::PlanRequest { solver: 42, ..plan(vec![gang("s", 1, 8)], false) }, "solver 42"),
    ];
    for (request, expected) in cases {
        let error = api.plan(request.clone()).await.expect_err("invalid");
        assert_eq!(error.code(), Code::InvalidArgument, "{request:?}: {error:?}");
        assert!(error.message().contains(expected), "{request:?}: `{}` lacks `{expected}`", error.message());
    }
    // A named limit passed is RESOURCE_EXHAUSTED, naming the gang and the limit; nothing is held.
    let many = plan(vec![gang("few", 1, 1), pb::Gang { replicas: 1_024, ..gang("many", 1, 1) }], false);
    let error = api.plan(many).await.expect_err("over the limit");
    assert_eq!(error.code(), Code::ResourceExhausted, "{error:?}");
    assert!(
        error
            .message()
            .contains("gangs[1]: the request names 1025 or more gangs (replicas counted), over the limit of 1024"),
        "{}",
        error.message()
    );
    let no_shape = api.capacity(pb::CapacityRequest::default()).await.expect_err("no shape");
    assert_eq!((no_shape.code(), no_shape.message()), (Code::InvalidArgument, "shape is required"));
    let level = api
        .capacity(pb::CapacityRequest { by_level: "zone".into(), ..capacity(1, 8) })
        .await
        .expect_err("unknown level");
    assert!(level.code() == Code::InvalidArgument && level.message().contains("by_level `zone`"), "{level:?}");
    let release = api.release(pb::ReleaseRequest::default()).await.expect_err("no id");
    assert_eq!(release.code(), Code::InvalidArgument);
    assert_eq!(state(&mut api).await.free_gpus, 72, "nothing was reserved on the way");
    ext.check().expect("book consistent");
    http.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_plans_never_double_book() {
    let (http, ext, _binder) = static_extender(CLUSTER, 30_000).await;
    let grpc = http.grpc.clone();
    // 24 clients ask for 148 GPUs of a 72-GPU cluster at once.
    let calls = (0..24).map(|i| {
        let base = grpc.clone();
        tokio::spawn(async move {
            let mut api = client(&base).await;
            let shape = match i % 3 {
                0 => gang(&format!("c{i}"), 2, 8),
                1 => gang(&format!("c{i}"), 1, 8),
                _ => gang(&format!("c{i}"), 1, 4),
            };
            api.plan(plan(vec![shape], false)).await.map(|r| r.into_inner())
        })
    });
    let answers = futures::future::join_all(calls).await;
    let mut taken = BTreeSet::new();
    let mut reserved = 0u64;
    let mut ids = BTreeSet::new();
    for answer in answers {
        let response = answer.expect("task").expect("plan call");
        if response.reservation_id.is_empty() {
            assert!(!response.unplaced.is_empty(), "no reservation means the gang did not fit");
            continue;
        }
        assert!(ids.insert(response.reservation_id.clone()), "reservation ids are unique");
        for member in &response.placements[0].members {
            for gpu in &member.gpus {
                assert!(taken.insert((member.node.clone(), *gpu)), "GPU {gpu} of {} given twice", member.node);
                reserved += 1;
            }
        }
    }
    let mut api = client(&grpc).await;
    let now = state(&mut api).await;
    assert_eq!(now.reserved_gpus, reserved);
    assert_eq!(now.free_gpus, 72 - reserved);
    assert!(reserved >= 64, "the H100 hosts are filled: {reserved}");
    ext.check().expect("book consistent");
    http.stop().await;
}

async fn next_update(watch: &mut tonic::Streaming<pb::CapacityResponse>) -> pb::CapacityResponse {
    tokio::time::timeout(PATIENCE, watch.next()).await.expect("an update in time").expect("stream open").expect("ok")
}

#[tokio::test]
async fn reservations_expire_and_capacity_watchers_see_every_change() {
    let (http, _ext, _binder) = static_extender(CLUSTER, 30_000).await;
    let grpc = http.grpc.clone();
    let mut api = client(&grpc).await;
    let mut watch = api
        .watch_capacity(pb::WatchCapacityRequest { capacity: Some(capacity(1, 8)), min_interval_ms: 20 })
        .await
        .expect("watch")
        .into_inner();
    let first = next_update(&mut watch).await;
    assert_eq!(first.replicas, 8);

    let held = api
        .plan(pb::PlanRequest { ttl_seconds: 1, ..plan(vec![gang("brief", 2, 8)], false) })
        .await
        .expect("plan")
        .into_inner();
    assert!(held.expires_in_ms <= 1_000);
    let during = next_update(&mut watch).await;
    assert_eq!(during.replicas, 6);
    assert!(during.generation > first.generation);
    // The extender's sweeper releases it after a second; the watcher sees the capacity return.
    let after = next_update(&mut watch).await;
    assert_eq!(after.replicas, 8);
    let gone = api.release(pb::ReleaseRequest { reservation_id: held.reservation_id }).await.expect_err("expired");
    assert_eq!(gone.code(), Code::NotFound);
    assert_eq!(state(&mut api).await.free_gpus, 72);
    // A bad watch request fails the call itself.
    let bad = api
        .watch_capacity(pb::WatchCapacityRequest { capacity: Some(capacity(0, 8)), min_interval_ms: 0 })
        .await
        .expect_err("invalid shape");
    assert_eq!(bad.code(), Code::InvalidArgument);
    http.stop().await;
}

#[tokio::test]
async fn the_extender_and_the_api_share_one_ledger() {
    let (http, ext, binder) = static_extender(CLUSTER, 30_000).await;
    let grpc = http.grpc.clone();
    let mut api = client(&grpc).await;
    let web = reqwest::Client::new();
    let all_nodes: Vec<String> = state(&mut api).await.host_states.iter().map(|h| h.name.clone()).collect();

    // The API reserves a gang before its pods exist.
    let held = api
        .plan(plan(vec![pb::Gang { required_topology: "leaf".into(), ..gang("llm", 2, 8) }], false))
        .await
        .expect("plan")
        .into_inner();
    let reserved: BTreeSet<String> = nodes_of(&held.placements[0]).into_iter().collect();

    // kube-scheduler's filter for an unrelated 8-GPU pod keeps off the reserved hosts.
    let stranger = pod("other", "solo", "solo-uid", 8, None);
    let (_, reply) =
        post(&web, &format!("{}/filter", http.base), &serde_json::json!({"Pod": stranger, "NodeNames": all_nodes}))
            .await;
    let passing: BTreeSet<String> = reply["NodeNames"]
        .as_array()
        .expect("node names")
        .iter()
        .filter_map(|n| n.as_str().map(String::from))
        .collect();
    assert!(passing.is_disjoint(&reserved), "the extender offered reserved hosts: {passing:?} vs {reserved:?}");
    assert_eq!(passing.len(), 6, "the other H100 hosts pass: {passing:?}");

    // The gang's pods land on the reservation, then hold their GPUs as bound pods.
    let members = [
        pod("team", "llm-0", "llm-0-uid", 8, Some(("llm", 2))),
        pod("team", "llm-1", "llm-1-uid", 8, Some(("llm", 2))),
    ];
    let (a, b) = tokio::join!(
        schedule(&web, &http.base, &members[0], &all_nodes),
        schedule(&web, &http.base, &members[1], &all_nodes)
    );
    let bound: BTreeSet<String> = [a.expect("member 0 binds"), b.expect("member 1 binds")].into_iter().collect();
    assert_eq!(bound, reserved, "the members were placed on the API's reservation");
    assert!(binder.node_of("llm-0-uid").is_some_and(|node| reserved.contains(&node)), "bound through the binder");
    let now = state(&mut api).await;
    assert_eq!((now.reserved_gpus, now.bound_gpus), (0, 16));
    assert!(now.reservations.is_empty());

    // The other way round: a gang the extender reserved is in the API's view.
    let first = pod("team", "svc-0", "svc-0-uid", 8, Some(("svc", 2)));
    let (status, _) =
        post(&web, &format!("{}/filter", http.base), &serde_json::json!({"Pod": first, "NodeNames": all_nodes})).await;
    assert_eq!(status, 200);
    let now = state(&mut api).await;
    assert_eq!(now.reserved_gpus, 16);
    let extender_held = now.reservations.iter().find(|r| r.gang == "team/svc").expect("the extender's reservation");
    assert_eq!((extender_held.owner.as_str(), extender_held.id.as_str()), ("extender", ""));
    assert_eq!(api.capacity(capacity(1, 8)).await.expect("capacity").into_inner().replicas, 4);
    let clash = api.plan(plan(vec![gang("svc", 2, 8)], false)).await.expect_err("the extender holds it");
    assert_eq!(clash.code(), Code::AlreadyExists);
    ext.check().expect("book consistent");
    http.stop().await;
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let (http, _ext, _binder) = static_extender(CLUSTER, 30_000).await;
    let grpc = http.grpc.clone();
    let channel = Channel::from_shared(grpc.clone()).expect("address").connect().await.expect("connect");
    let mut health = HealthClient::new(channel.clone());
    let serving = tokio::time::timeout(PATIENCE, async {
        loop {
            let reply = health
                .check(HealthCheckRequest { service: "topoplace.v1.Placement".into() })
                .await
                .expect("health check")
                .into_inner();
            if reply.status == ServingStatus::Serving as i32 {
                return reply.status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("SERVING in time");
    assert_eq!(serving, ServingStatus::Serving as i32);

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies =
        reflection.server_reflection_info(futures::stream::iter(vec![request])).await.expect("reflection").into_inner();
    let reply = replies.message().await.expect("reply").expect("one reply");
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else { panic!("{reply:?}") };
    let names: BTreeSet<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains("topoplace.v1.Placement") && names.contains("grpc.health.v1.Health"), "{names:?}");
    http.stop().await;
}

async fn tls_client(
    base: &str,
    ca: &str,
    identity: Option<&(String, String)>,
) -> Result<PlacementClient<Channel>, String> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)).domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Channel::from_shared(base.to_string())
        .map_err(|e| e.to_string())?
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(PlacementClient::new(channel))
}

#[tokio::test]
async fn mutual_tls_admits_only_clients_of_the_ca_and_tokens_restrict_who_reserves() {
    let pki = pki();
    let tokens = ReserveTokens::parse(
        "# who may reserve\nsecret-token-for-alice-0001 alice\nsecret-token-for-bob-00001 bob\n",
        "tokens",
    )
    .expect("tokens");
    let config = GrpcConfig { reserve_tokens: Some(tokens), ..GrpcConfig::default() };
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(&pki.server.0, &pki.server.1))
        .client_ca_root(Certificate::from_pem(&pki.ca));
    let setup = ServerSetup { grpc: config, grpc_tls: Some(tls), ..ServerSetup::default() };
    let (http, _ext, _binder) = static_server(CLUSTER, setup).await;
    let grpc = http.grpc.clone();

    // Without a client certificate, or with one from another CA, no call gets through.
    for identity in [None, Some(&pki.stranger)] {
        let refused = match tls_client(&grpc, &pki.ca, identity).await {
            Err(_) => true,
            Ok(mut api) => api.cluster_state(pb::ClusterStateRequest { summary_only: true }).await.is_err(),
        };
        assert!(refused, "a client without a certificate of the CA was served");
    }
    let mut api = tls_client(&grpc, &pki.ca, Some(&pki.client)).await.expect("mutual TLS");
    assert_eq!(state(&mut api).await.gpus, 72);

    // Reading and dry runs are open; reserving needs a listed token.
    let dry = api.plan(plan(vec![gang("g", 1, 8)], true)).await.expect("dry run needs no token").into_inner();
    assert!(dry.placed);
    let missing = api.plan(plan(vec![gang("g", 1, 8)], false)).await.expect_err("no token");
    assert_eq!(missing.code(), Code::Unauthenticated);
    let mut wrong = tonic::Request::new(plan(vec![gang("g", 1, 8)], false));
    wrong.metadata_mut().insert("authorization", "Bearer secret-token-for-mallory".parse().expect("ascii"));
    assert_eq!(api.plan(wrong).await.expect_err("wrong token").code(), Code::PermissionDenied);
    let mut right = tonic::Request::new(plan(vec![gang("g", 1, 8)], false));
    right.metadata_mut().insert("authorization", "Bearer secret-token-for-alice-0001".parse().expect("ascii"));
    let held = api.plan(right).await.expect("alice may reserve").into_inner();
    let now = state(&mut api).await;
    assert_eq!(now.reservations[0].owner, "alice");
    assert_eq!(now.reserved_gpus, 8);
    let release = api.release(pb::ReleaseRequest { reservation_id: held.reservation_id.clone() }).await;
    assert_eq!(release.expect_err("release needs the token too").code(), Code::Unauthenticated);
    let mut as_bob = tonic::Request::new(pb::ReleaseRequest { reservation_id: held.reservation_id.clone() });
    as_bob.metadata_mut().insert("authorization", "Bearer secret-token-for-bob-00001".parse().expect("ascii"));
    let refused = api.release(as_bob).await.expect_err("bob may not release alice's reservation");
    assert!(refused.code() == Code::PermissionDenied && refused.message().contains("alice"), "{refused:?}");
    let mut as_alice = tonic::Request::new(pb::ReleaseRequest { reservation_id: held.reservation_id });
    as_alice.metadata_mut().insert("authorization", "Bearer secret-token-for-alice-0001".parse().expect("ascii"));
    assert_eq!(api.release(as_alice).await.expect("alice releases her own").into_inner().gpus_released, 8);
    http.stop().await;
}

#[test]
fn plan_server_plans_a_workload_file_through_the_api() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (http, ext, grpc) = runtime.block_on(async {
        let (http, ext, _binder) = static_extender(CLUSTER, 30_000).await;
        let grpc = http.grpc.clone();
        (http, ext, grpc)
    });
    let dir = std::env::temp_dir().join(format!("topoplace-plan-server-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let workload = dir.join("workload.yaml");
    std::fs::write(
        &workload,
        "apiVersion: topoplace.io/v1alpha1\nkind: Workload\nmetadata: {name: ci}\nspec:\n  gangs:\n  \
         - {name: big, members: 2, gpusPerMember: 8, tensorParallel: 8, topology: {required: leaf}}\n  \
         - {name: small, replicas: 2, gpusPerMember: 4, tensorParallel: 4}\n",
    )
    .expect("workload");
    let run = |extra: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_topoplace"))
            .args(["plan", "--server", &grpc, "--workload"])
            .arg(&workload)
            .args(extra)
            .output()
            .expect("run topoplace");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).to_string(),
            String::from_utf8_lossy(&output.stderr).to_string(),
        )
    };
    let (code, stdout, stderr) = run(&["-o", "json"]);
    assert_eq!(code, Some(0), "{stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).expect("json output");
    assert_eq!(json["placed"], true);
    let gangs: Vec<&str> =
        json["placements"].as_array().expect("placements").iter().filter_map(|p| p["gang"].as_str()).collect();
    assert_eq!(gangs, vec!["default/big", "default/small-0", "default/small-1"]);
    assert_eq!(json["reservationId"], serde_json::Value::Null);

    let (code, stdout, stderr) = run(&["--reserve", "--ttl", "120", "--namespace", "ci"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("reservation r1 held for 120 s") && stdout.contains("ci/big"), "{stdout}");
    let held = runtime.block_on(async {
        let mut api = client(&grpc).await;
        state(&mut api).await.reserved_gpus
    });
    assert_eq!(held, 24);
    let (code, _, stderr) = run(&["--reserve", "--namespace", "ci"]);
    assert_eq!(code, Some(2), "reserving the same gangs again is refused as bad input");
    assert!(stderr.contains("already reserved"), "{stderr}");
    let unreachable = std::process::Command::new(env!("CARGO_BIN_EXE_topoplace"))
        .args(["plan", "--server", "http://127.0.0.1:1"])
        .output()
        .expect("run topoplace");
    assert_eq!(unreachable.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unreachable.stderr).contains("cannot reach the placement API"));
    ext.check().expect("book consistent");
    runtime.block_on(async {
        http.stop().await;
    });
    let _ = std::fs::remove_dir_all(&dir);
}

fn role(name: &str, members: u32, gpus: u32, tp: u32) -> pb::Role {
    pb::Role { name: name.into(), members, gpus_per_member: gpus, tensor_parallel: tp, ..Default::default() }
}

fn with_roles(name: &str, required: &str, roles: Vec<pb::Role>) -> pb::Gang {
    pb::Gang {
        namespace: "team".into(),
        name: name.into(),
        required_topology: required.into(),
        roles,
        ..Default::default()
    }
}

#[tokio::test]
async fn replicas_with_roles_are_planned_as_a_dry_run_with_every_scope_met() {
    let (http, _ext, _binder) = static_extender(CLUSTER, 30_000).await;
    let mut api = client(&http.grpc).await;
    // Issue 18's second input: a 4-GPU leader and two 8-GPU workers, one rack; and a
    // disaggregated replica beside it: prefill 2 x 8, decode 1 x 4, a GPU-less router.
    let leader_workers = with_roles("lws", "leaf", vec![role("leader", 1, 4, 4), role("worker", 2, 8, 8)]);
    let disaggregated =
        with_roles("pd", "leaf", vec![role("prefill", 2, 8, 8), role("decode", 1, 4, 4), role("router", 1, 0, 0)]);
    let dry = api.plan(plan(vec![leader_workers.clone(), disaggregated], true)).await.expect("plan").into_inner();
    assert!(dry.placed && dry.reservation_id.is_empty() && dry.placements.is_empty(), "{dry:?}");
    assert_eq!(dry.replicas.len(), 2, "{dry:?}");
    let mut taken: BTreeSet<(String, u32)> = BTreeSet::new();
    for replica in &dry.replicas {
        assert_eq!(replica.namespace, "team");
        let racks: BTreeSet<String> = replica
            .parts
            .iter()
            .flat_map(|p| p.placement.iter().flat_map(|g| g.members.iter().map(|m| m.node[..2].to_string())))
            .collect();
        assert_eq!(racks.len(), 1, "replica {} in one rack: {replica:?}", replica.name);
        assert!(replica.region.contains("r1") || replica.region.contains("r2"), "{}", replica.region);
        for part in &replica.parts {
            let placement = part.placement.as_ref().expect("placement");
            assert_eq!(placement.name, replica.name, "a part answers with its replica's name");
            for member in &placement.members {
                for &gpu in &member.gpus {
                    assert!(taken.insert((member.node.clone(), gpu)), "GPU {gpu} of {} given twice", member.node);
                }
            }
        }
    }
    let lws = dry.replicas.iter().find(|r| r.name == "lws").expect("lws");
    let gpus_of = |role: &str| -> usize {
        lws.parts
            .iter()
            .filter(|p| p.role == role)
            .flat_map(|p| p.placement.iter().flat_map(|g| g.members.iter().map(|m| m.gpus.len())))
            .sum()
    };
    assert_eq!((gpus_of("leader"), gpus_of("worker")), (4, 16));
    let pd = dry.replicas.iter().find(|r| r.name == "pd").expect("pd");
    assert_eq!(pd.roles_without_gpus, vec!["router".to_string()]);
    assert_eq!(taken.len(), 20 + 20, "every GPU of both replicas, once");
    assert_eq!(state(&mut api).await.free_gpus, 72, "a dry run holds nothing");

    // Slices: 4 x 8 GPUs in slices of 2 members, each slice in one rack.
    let sliced = with_roles(
        "sliced",
        "spine",
        vec![pb::Role { slice_members: 2, slice_required_topology: "leaf".into(), ..role("worker", 4, 8, 8) }],
    );
    let answer = api.plan(plan(vec![sliced], true)).await.expect("plan").into_inner();
    let parts = &answer.replicas[0].parts;
    assert_eq!(parts.iter().map(|p| p.slice).collect::<Vec<_>>(), vec![Some(0), Some(1)]);
    for part in parts {
        let racks: BTreeSet<&str> =
            part.placement.iter().flat_map(|g| g.members.iter().map(|m| &m.node[..2])).collect();
        assert_eq!(racks.len(), 1, "a slice stays in one rack: {part:?}");
    }

    // A replica that cannot fit is unplaced with the reason: no rack holds all 44 GPUs; or,
    // inside a spine, the role whose own scope no rack meets is named.
    let too_wide = with_roles("wide", "leaf", vec![role("leader", 1, 4, 4), role("worker", 5, 8, 8)]);
    let answer = api.plan(plan(vec![too_wide], true)).await.expect("plan").into_inner();
    assert!(!answer.placed && answer.replicas.is_empty());
    assert_eq!(answer.unplaced[0].name, "wide");
    assert!(answer.unplaced[0].reason.contains("44 free GPUs"), "{}", answer.unplaced[0].reason);
    let workers_in_a_rack = with_roles(
        "wide",
        "spine",
        vec![role("leader", 1, 4, 4), pb::Role { required_topology: "leaf".into(), ..role("worker", 5, 8, 8) }],
    );
    let answer = api.plan(plan(vec![workers_in_a_rack], true)).await.expect("plan").into_inner();
    assert!(!answer.placed && answer.replicas.is_empty());
    assert!(answer.unplaced[0].reason.contains("worker"), "{}", answer.unplaced[0].reason);
    assert_eq!(state(&mut api).await.free_gpus, 72);
}

/// A pod of the replica `team/lws` of [`reserved_roles`]: `topoplace.io/roles` as the API
/// request gave them (the worker's TP given as `worker_tp`), its role and rank within it.
fn lws_role_pod(name: &str, role: &str, rank: u32, gpus: u32, worker_tp: u32) -> serde_json::Value {
    let mut member = pod("team", name, &format!("{name}-uid"), gpus, Some(("lws", 3)));
    member["metadata"]["labels"]["topoplace.io/role"] = serde_json::json!(role);
    member["metadata"]["labels"]["topoplace.io/rank"] = serde_json::json!(rank.to_string());
    let roles = format!(
        r#"[{{"name": "leader", "gpusPerMember": 4, "tensorParallel": 4}},
            {{"name": "worker", "members": 2, "gpusPerMember": 8, "tensorParallel": {worker_tp}}}]"#
    );
    member["metadata"]["annotations"] = serde_json::json!({"topoplace.io/roles": roles});
    member
}

/// A replica with roles reserved through `Plan` (not a dry run) is held under a reservation
/// id; its pods, whose roles agree with the request, are bound onto it through the
/// extender's verbs; a pod whose roles differ is refused naming the reservation; the same
/// key cannot be reserved twice; and a reservation released before its pods come frees it all.
#[tokio::test]
async fn a_replica_with_roles_reserved_through_the_api_is_claimed_by_its_pods() {
    let (http, ext, binder) = static_extender(CLUSTER, 30_000).await;
    let mut api = client(&http.grpc).await;
    let web = reqwest::Client::new();
    let all_nodes: Vec<String> = state(&mut api).await.host_states.iter().map(|h| h.name.clone()).collect();
    let good = with_roles("lws", "leaf", vec![role("leader", 1, 4, 4), role("worker", 2, 8, 8)]);
    let held = api.plan(plan(vec![good.clone()], false)).await.expect("reserving roles").into_inner();
    assert!(held.placed && !held.reservation_id.is_empty() && held.expires_in_ms > 0, "{held:?}");
    let reserved: BTreeSet<String> = held.replicas[0]
        .parts
        .iter()
        .flat_map(|p| p.placement.iter().flat_map(|g| g.members.iter().map(|m| m.node.clone())))
        .collect();
    assert_eq!(state(&mut api).await.reserved_gpus, 20);
    let again = api.plan(plan(vec![good.clone()], false)).await.expect_err("the same key twice");
    assert_eq!(again.code(), Code::AlreadyExists, "{again:?}");

    let differing = lws_role_pod("odd", "worker", 0, 8, 4);
    let (_, reply) =
        post(&web, &format!("{}/filter", http.base), &serde_json::json!({"Pod": differing, "NodeNames": all_nodes}))
            .await;
    let error = reply["Error"].as_str().unwrap_or_default();
    assert!(
        error.contains("topoplace.io/roles")
            && error.contains(&format!("placement API reservation `{}`", held.reservation_id)),
        "{error}"
    );
    let members = [
        lws_role_pod("lws-0", "leader", 0, 4, 8),
        lws_role_pod("lws-1", "worker", 0, 8, 8),
        lws_role_pod("lws-2", "worker", 1, 8, 8),
    ];
    let (a, b, c) = tokio::join!(
        schedule(&web, &http.base, &members[0], &all_nodes),
        schedule(&web, &http.base, &members[1], &all_nodes),
        schedule(&web, &http.base, &members[2], &all_nodes)
    );
    let bound: BTreeSet<String> =
        [a.expect("leader binds"), b.expect("worker 0 binds"), c.expect("worker 1 binds")].into_iter().collect();
    assert_eq!(bound, reserved, "the pods were placed on the API's reservation");
    assert!(binder.node_of("lws-0-uid").is_some());
    let now = state(&mut api).await;
    assert_eq!((now.reserved_gpus, now.bound_gpus), (0, 20));

    // Reserved and released before any pod comes: everything is free again.
    let other = with_roles("lws-b", "leaf", vec![role("leader", 1, 4, 4), role("worker", 2, 8, 8)]);
    let held = api.plan(plan(vec![other], false)).await.expect("reserving roles").into_inner();
    assert_eq!(state(&mut api).await.reserved_gpus, 20);
    let released = api
        .release(pb::ReleaseRequest { reservation_id: held.reservation_id.clone() })
        .await
        .expect("release")
        .into_inner();
    assert_eq!((released.gangs, released.gpus_released), (vec!["team/lws-b".to_string()], 20));
    assert_eq!(state(&mut api).await.reserved_gpus, 0);

    // A gang without roles reserved in the same request as one with roles is claimed by its
    // pods, which carry no roles.
    let mixed =
        vec![with_roles("lws-c", "leaf", vec![role("leader", 1, 4, 4), role("worker", 2, 8, 8)]), gang("solo", 1, 8)];
    let held = api.plan(plan(mixed, false)).await.expect("reserving both").into_inner();
    assert!(held.placed && !held.reservation_id.is_empty(), "{held:?}");
    let solo_node = held.replicas.iter().find(|r| r.name == "solo").expect("solo").parts[0]
        .placement
        .as_ref()
        .expect("placement")
        .members[0]
        .node
        .clone();
    let solo = pod("team", "solo-0", "solo-0-uid", 8, Some(("solo", 1)));
    assert_eq!(schedule(&web, &http.base, &solo, &all_nodes).await.expect("solo binds"), solo_node);
    ext.check().expect("book consistent");
    http.stop().await;
}

#[tokio::test]
async fn roles_with_a_bad_shape_are_refused_naming_the_field() {
    let (http, _ext, _binder) = static_extender(CLUSTER, 30_000).await;
    let mut api = client(&http.grpc).await;
    let good = with_roles("lws", "leaf", vec![role("leader", 1, 4, 4), role("worker", 2, 8, 8)]);
    let cases = [
        (pb::Gang { members: 3, ..good.clone() }, "members belongs to each role and must be 0 here (it is 3)"),
        (
            with_roles("z", "", vec![pb::Role { slice_members: 2, ..role("worker", 4, 8, 8) }]),
            "roles[0]: slice_members is set but slice_required_topology is empty",
        ),
        (
            with_roles("z", "", vec![pb::Role { slice_exclusive: true, ..role("worker", 4, 8, 8) }]),
            "roles[0]: slice_exclusive is set but the role has no slices",
        ),
        (with_roles("z", "", vec![role("worker", 0, 8, 8)]), "role `worker`: members must be at least 1"),
        (with_roles("z", "", vec![role("a", 1, 8, 8), role("a", 1, 8, 8)]), "role `a` appears twice"),
        (with_roles("z", "", vec![role("router", 1, 0, 0)]), "gang `team/z`: no role takes GPUs"),
        (with_roles("z", "row", vec![role("worker", 1, 8, 8)]), "`row`"),
        (with_roles("z", "", vec![role("worker", 20, 8, 8)]), "72 usable GPUs"),
        (
            with_roles("z", "", vec![pb::Role { min_gpu_memory_mib: 200_000, ..role("worker", 1, 8, 8) }]),
            "gang `team/z`: role `worker`: needs 8 GPUs (1 members x 8), but the cluster has only 0 GPUs with at least 200000 MiB",
        ),
    ];
    for (gang, expected) in cases {
        let error = api.plan(plan(vec![gang.clone()], true)).await.expect_err("refused");
        assert_eq!(error.code(), Code::InvalidArgument, "{gang:?}: {error:?}");
        assert!(error.message().contains(expected), "{gang:?}: `{}` lacks `{expected}`", error.message());
    }
    // Explain checks a shape with roles as Plan does.
    let explain = api
        .explain(pb::ExplainRequest { gang: Some(pb::Gang { members: 3, ..good.clone() }), nodes: Vec::new() })
        .await
        .expect_err("explain");
    assert_eq!(explain.code(), Code::InvalidArgument);
    assert!(explain.message().contains("members belongs to each role"), "{}", explain.message());
    // Capacity counts replicas with roles: 20 GPUs in one rack, one per H100 rack.
    let capacity = api
        .capacity(pb::CapacityRequest { shape: Some(good.clone()), by_level: String::new() })
        .await
        .expect("capacity")
        .into_inner();
    assert_eq!((capacity.replicas, capacity.lower_bound), (2, false), "{capacity:?}");
    let per_rack: Vec<(String, u64)> = capacity.domains.iter().map(|d| (d.domain.clone(), d.replicas)).collect();
    assert_eq!(per_rack.iter().map(|(_, r)| r).sum::<u64>(), 2, "{per_rack:?}");
    assert!(per_rack.iter().all(|(_, r)| *r <= 1), "{per_rack:?}");
    let bad_level = api
        .capacity(pb::CapacityRequest { shape: Some(good.clone()), by_level: "row".into() })
        .await
        .expect_err("an unknown level");
    assert_eq!(bad_level.code(), Code::InvalidArgument);
    // Plan with roles: at most 64 replicas with roles (each a bounded search).
    let many = api.plan(plan(vec![pb::Gang { replicas: 65, ..good.clone() }], true)).await.expect_err("65 replicas");
    assert_eq!(many.code(), Code::ResourceExhausted);
    assert!(many.message().contains("65 or more replicas with roles, over the limit of 64"), "{}", many.message());
    // The exact solver models the roles; the answer says what ran.
    let exact = api
        .plan(pb::PlanRequest {
            gangs: vec![good],
            dry_run: true,
            solver: pb::Solver::Exact as i32,
            ..Default::default()
        })
        .await
        .expect("plan")
        .into_inner();
    assert!(exact.placed && exact.note.contains("exact model of its roles"), "{exact:?}");
    let solvers: Vec<&str> = exact.replicas[0]
        .parts
        .iter()
        .map(|part| part.placement.as_ref().and_then(|p| p.solver.as_ref()).map_or("", |s| s.solver.as_str()))
        .collect();
    assert!(!solvers.is_empty() && solvers.iter().all(|s| s.starts_with("exact/")), "{solvers:?}");
    let whole = exact.replicas[0].solver.as_ref().expect("the replica's solver");
    assert!(whole.solver.starts_with("exact/") && whole.gap.is_some(), "{whole:?}");
    assert_eq!(state(&mut api).await.free_gpus, 72, "nothing held by any refusal");
}

#[tokio::test]
async fn explain_with_roles_answers_the_replica_or_the_role_that_did_not_fit() {
    let (http, _ext, _binder) = static_extender(CLUSTER, 30_000).await;
    let mut api = client(&http.grpc).await;
    // It fits: the replica's placement, and per node asked one verdict per GPU role.
    let good =
        with_roles("lws", "leaf", vec![role("router", 1, 0, 0), role("leader", 1, 4, 4), role("worker", 2, 8, 8)]);
    let nodes = vec!["r1-0".to_string(), "l40s-0".to_string()];
    let explained = api.explain(pb::ExplainRequest { gang: Some(good), nodes }).await.expect("explain").into_inner();
    assert!(explained.fits && explained.placement.is_none() && explained.reason.is_empty(), "{explained:?}");
    let replica = explained.replica.as_ref().expect("the replica's placement");
    assert_eq!(replica.roles_without_gpus, ["router"]);
    let roles: Vec<&str> = replica.parts.iter().map(|p| p.role.as_str()).collect();
    assert!(roles.contains(&"leader") && roles.contains(&"worker"), "{roles:?}");
    let verdicts: Vec<(&str, &str, bool, u32)> =
        explained.nodes.iter().map(|v| (v.node.as_str(), v.role.as_str(), v.fits, v.units)).collect();
    assert_eq!(&verdicts[..2], [("r1-0", "leader", true, 2), ("r1-0", "worker", true, 1)], "{verdicts:?}");
    // An L40S host has 4 GPUs: no worker of 8 fits there, and the verdict says why.
    let l40s_worker = explained.nodes.iter().find(|v| v.node == "l40s-0" && v.role == "worker").expect("verdict");
    assert!(!l40s_worker.fits && !l40s_worker.reason.is_empty(), "{l40s_worker:?}");
    assert_eq!(explained.nodes.len(), 4, "two nodes x two GPU roles");

    // It does not fit: two workers of 8 GPUs that must share one host. The reason names the
    // role; the explanation is that role's, and Plan with explain gives it too.
    let one_host = pb::Role { required_topology: "host".into(), ..role("worker", 2, 8, 8) };
    let tight = with_roles("tight", "", vec![role("leader", 1, 4, 4), one_host]);
    let explained = api
        .explain(pb::ExplainRequest { gang: Some(tight.clone()), nodes: Vec::new() })
        .await
        .expect("explain")
        .into_inner();
    assert!(!explained.fits && explained.replica.is_none(), "{explained:?}");
    assert!(explained.reason.contains("role `worker`"), "{}", explained.reason);
    assert!(!explained.rejected_hosts.is_empty() || !explained.domains.is_empty(), "{explained:?}");
    let planned = api
        .plan(pb::PlanRequest { gangs: vec![tight], dry_run: true, explain: true, ..Default::default() })
        .await
        .expect("plan with explain")
        .into_inner();
    assert!(!planned.placed, "{planned:?}");
    let unplaced = &planned.unplaced[0];
    assert!(unplaced.reason.contains("role `worker`"), "{}", unplaced.reason);
    assert!(!unplaced.rejected_hosts.is_empty() || !unplaced.domains.is_empty(), "{unplaced:?}");
    // Explain takes one replica, and only nodes of the cluster.
    let two = with_roles("two", "", vec![role("worker", 1, 8, 8), role("leader", 1, 4, 4)]);
    let error = api
        .explain(pb::ExplainRequest { gang: Some(pb::Gang { replicas: 2, ..two.clone() }), nodes: Vec::new() })
        .await
        .expect_err("two replicas");
    assert_eq!(error.code(), Code::InvalidArgument);
    let error = api
        .explain(pb::ExplainRequest { gang: Some(two), nodes: vec!["nowhere".into()] })
        .await
        .expect_err("an unknown node");
    assert!(error.message().contains("node `nowhere` is not in the cluster"), "{}", error.message());
    assert_eq!(state(&mut api).await.free_gpus, 72, "explaining holds nothing");
    http.stop().await;
}

#[test]
fn plan_server_sends_roles_and_prints_each_roles_placement() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (http, ext, grpc) = runtime.block_on(async {
        let (http, ext, _binder) = static_extender(CLUSTER, 30_000).await;
        let grpc = http.grpc.clone();
        (http, ext, grpc)
    });
    let dir = std::env::temp_dir().join(format!("topoplace-plan-roles-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let workload = dir.join("workload.yaml");
    std::fs::write(
        &workload,
        "apiVersion: topoplace.io/v1alpha1\nkind: Workload\nmetadata: {name: ci}\nspec:\n  gangs:\n  \
         - name: lws\n    replicas: 2\n    topology: {required: leaf}\n    roles:\n    \
         - {name: leader, members: 1, gpusPerMember: 4, tensorParallel: 4}\n    \
         - {name: worker, members: 2, gpusPerMember: 8, tensorParallel: 8}\n  \
         - {name: small, gpusPerMember: 4, tensorParallel: 4}\n",
    )
    .expect("workload");
    let run = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_topoplace"))
            .args(["plan", "--server", &grpc, "--workload"])
            .arg(&workload)
            .args(extra)
            .output()
            .expect("run topoplace")
    };
    let output = run(&["-o", "json"]);
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json output");
    assert_eq!(json["placed"], true, "{json}");
    let replicas = json["replicas"].as_array().expect("replicas");
    let names: Vec<&str> = replicas.iter().filter_map(|r| r["gang"].as_str()).collect();
    assert_eq!(names, vec!["default/lws-0", "default/lws-1", "default/small"], "{json}");
    for replica in &replicas[..2] {
        let roles: BTreeSet<&str> =
            replica["parts"].as_array().expect("parts").iter().filter_map(|p| p["role"].as_str()).collect();
        assert_eq!(roles, BTreeSet::from(["leader", "worker"]), "{replica}");
        let racks: BTreeSet<String> = replica["parts"]
            .as_array()
            .expect("parts")
            .iter()
            .flat_map(|p| p["members"].as_array().cloned().unwrap_or_default())
            .filter_map(|m| m["node"].as_str().map(|n| n[..2].to_string()))
            .collect();
        assert_eq!(racks.len(), 1, "one rack per replica: {replica}");
    }
    let table = run(&[]);
    let table = String::from_utf8_lossy(&table.stdout).to_string();
    assert!(table.contains("3 of 3 gangs placed (dry run, nothing held)"), "{table}");
    assert!(table.contains("default/lws-0/worker") && table.contains("default/lws-1/leader"), "{table}");
    assert!(table.contains("default/small ") && !table.contains("default/small/"), "{table}");
    assert_eq!(replicas[2]["parts"][0]["role"], "", "a gang without roles has no role");
    // The repository's roles workload (memory floors sized from models, slices, a GPU-less
    // leader): the server's dry run places every role on the same nodes and GPUs as a local
    // `plan` of the same file on the same cluster.
    let roles_file = format!("{}/testdata/workloads/roles.yaml", env!("CARGO_MANIFEST_DIR"));
    let cluster_file = format!("{}/{CLUSTER}", env!("CARGO_MANIFEST_DIR"));
    let rows = |json: &serde_json::Value, key: &str, prefix: &str| -> BTreeSet<String> {
        json[key]
            .as_array()
            .expect("rows")
            .iter()
            .flat_map(|row| {
                let gang = row["gang"].as_str().unwrap_or_default().trim_start_matches(prefix).to_string();
                let parts = row.get("parts").and_then(|p| p.as_array().cloned()).unwrap_or_else(|| vec![row.clone()]);
                parts.into_iter().map(move |part| {
                    let members: Vec<String> = part["members"]
                        .as_array()
                        .expect("members")
                        .iter()
                        .map(|m| format!("{}:{}", m["node"].as_str().unwrap_or_default(), m["gpus"]))
                        .collect();
                    format!(
                        "{gang}/{}[{}] {}",
                        part["role"].as_str().unwrap_or_default(),
                        part["slice"],
                        members.join(" ")
                    )
                })
            })
            .collect()
    };
    let local = std::process::Command::new(env!("CARGO_BIN_EXE_topoplace"))
        .args(["plan", "--cluster", &cluster_file, "--workload", &roles_file, "-o", "json"])
        .output()
        .expect("run topoplace");
    let local: serde_json::Value = serde_json::from_slice(&local.stdout).expect("local json");
    let remote = std::process::Command::new(env!("CARGO_BIN_EXE_topoplace"))
        .args(["plan", "--server", &grpc, "--workload", &roles_file, "-o", "json"])
        .output()
        .expect("run topoplace");
    assert_eq!(remote.status.code(), Some(0), "{}", String::from_utf8_lossy(&remote.stderr));
    let remote: serde_json::Value = serde_json::from_slice(&remote.stdout).expect("remote json");
    let local_rows = rows(&local, "placements", "");
    assert!(local_rows.len() >= 4, "{local_rows:?}");
    assert_eq!(rows(&remote, "replicas", "default/"), local_rows);

    // --explain with roles: the same placements (an unplaced replica would carry its reason).
    let explained = run(&["--explain"]);
    assert_eq!(explained.status.code(), Some(0), "{}", String::from_utf8_lossy(&explained.stderr));
    let table = String::from_utf8_lossy(&explained.stdout);
    assert!(table.contains("replicas with roles:") && !table.contains("unplaced:"), "{table}");
    let reserved = run(&["--reserve", "-o", "json"]);
    assert_eq!(reserved.status.code(), Some(0), "{}", String::from_utf8_lossy(&reserved.stderr));
    let reserved: serde_json::Value = serde_json::from_slice(&reserved.stdout).expect("reserve json");
    assert!(reserved["reservationId"].as_str().is_some_and(|id| !id.is_empty()), "{reserved}");
    ext.check().expect("book consistent");
    runtime.block_on(async {
        http.stop().await;
    });
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 22: capacity per shared replica and per MIG profile, with what a device is; Plan
/// gives each replica of a time-sliced GPU once and refuses the fifth.
#[tokio::test]
async fn capacity_is_answered_per_shared_replica_and_per_mig_profile() {
    let dir = std::env::temp_dir().join(format!("topoplace-grpc-shared-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("cluster.yaml");
    std::fs::write(
        &file,
        "apiVersion: topoplace.io/v1alpha1\nkind: Cluster\nmetadata: {name: shared}\nspec:\n  nodes:\n  - name: t4-shared\n    gpu: {product: Tesla-T4, count: 1, replicas: 4, sharing: mps}\n  - name: a100-mig\n    gpu: {product: A100-SXM4-40GB, count: 7, mig: 1g.5gb, memory: 4864}\n  - name: l4\n    gpu: {product: L4, count: 2}\n",
    )
    .expect("cluster file");
    let (http, _ext, _binder) = static_extender(file.to_str().expect("utf-8"), 30_000).await;
    let mut api = client(&http.grpc).await;
    let one = api.capacity(capacity(1, 1)).await.expect("capacity").into_inner();
    let by_product: Vec<(String, u64, u64, i32, String)> = one
        .products
        .iter()
        .map(|p| (p.product.clone(), p.replicas, p.gpus, p.device_kind, p.whole_gpu_product.clone()))
        .collect();
    assert_eq!(
        by_product,
        [
            ("L4".to_string(), 2, 2, pb::DeviceKind::WholeGpu as i32, String::new()),
            (
                "A100-SXM4-40GB-MIG-1g.5gb".to_string(),
                7,
                7,
                pb::DeviceKind::MigDevice as i32,
                "A100-SXM4-40GB".to_string()
            ),
            ("T4-SHARED".to_string(), 4, 4, pb::DeviceKind::SharedReplica as i32, "T4".to_string()),
        ],
        "{one:?}"
    );
    // A member of two GPUs: whole GPUs only, and the reason for the rest.
    let two = api.capacity(capacity(1, 2)).await.expect("capacity").into_inner();
    assert_eq!(two.replicas, 1, "{two:?}");
    assert!(two.rejected_hosts.iter().any(|g| g.reason.contains("shared replicas")), "{two:?}");
    assert!(two.rejected_hosts.iter().any(|g| g.reason.contains("MIG slices")), "{two:?}");
    // Pinned to the replicas, a member of two GPUs can never fit: refused up front.
    let wide = pb::Gang { product: "T4-SHARED".into(), ..gang("wide-shared", 1, 2) };
    let refused = api.plan(plan(vec![wide], true)).await.expect_err("two replicas are no TP pair");
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("has only 0 T4-SHARED GPUs") && refused.message().contains("whole GPUs"),
        "{}",
        refused.message()
    );
    // Five one-replica gangs pinned to the shared GPU: four reserved, each its own replica.
    let pinned = pb::Gang { product: "Tesla-T4-SHARED".into(), replicas: 5, ..gang("notebook", 1, 1) };
    let request = pb::PlanRequest { allow_partial: true, ..plan(vec![pinned], false) };
    let planned = api.plan(request).await.expect("plan").into_inner();
    assert_eq!((planned.placements.len(), planned.unplaced.len()), (4, 1), "{planned:?}");
    assert!(!planned.reservation_id.is_empty(), "the four that fit are reserved");
    let mut replicas: Vec<u32> = planned.placements.iter().flat_map(|p| p.members[0].gpus.clone()).collect();
    replicas.sort_unstable();
    assert_eq!(replicas, [0, 1, 2, 3]);
    let after = api.capacity(capacity(1, 1)).await.expect("capacity").into_inner();
    let shared = after.products.iter().find(|p| p.product == "T4-SHARED").expect("T4-SHARED");
    assert_eq!((shared.replicas, shared.free_gpus), (0, 0), "{after:?}");
    // A MIG profile asked for: its devices only, of any GPU product.
    let mig = |profile: &str| pb::Gang { mig_profile: profile.into(), ..gang("small", 1, 1) };
    let one_g = api
        .capacity(pb::CapacityRequest { shape: Some(mig("1g.5gb")), by_level: String::new() })
        .await
        .expect("capacity")
        .into_inner();
    assert_eq!(one_g.replicas, 7, "{one_g:?}");
    assert!(one_g.rejected_hosts.iter().any(|g| g.reason.contains("not MIG devices of profile 1g.5gb")), "{one_g:?}");
    // No device of the profile anywhere: refused as a request that can never fit.
    let none = api.plan(plan(vec![mig("2g.10gb")], true)).await.expect_err("no such devices");
    assert_eq!(none.code(), Code::InvalidArgument);
    assert!(none.message().contains("has only 0 MIG devices of profile 2g.10gb in all"), "{}", none.message());
    let both = pb::Gang { min_gpu_memory_mib: 4096, ..mig("1g.5gb") };
    let refused = api.plan(plan(vec![both], true)).await.expect_err("both needs");
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("give min_gpu_memory_mib or mig_profile, not both"), "{}", refused.message());
    let wide = pb::Gang { mig_profile: "1g.5gb".into(), ..gang("wide", 1, 2) };
    let refused = api.plan(plan(vec![wide], true)).await.expect_err("two GPUs on a MIG device");
    assert!(refused.message().contains("a member on a MIG device has one GPU"), "{}", refused.message());
}
