//! The manifests in `scheduler-config/` agree with the extender: the KubeSchedulerConfiguration
//! names the verbs the server routes, keeps every node scored, waits long enough for a gang's
//! bind; the RBAC grants what the extender calls; the Deployment's arguments parse.

use clap::Parser;
use serde::Deserialize;
use serde_yaml_ng::Value;
use topoplace_online::reservation::BIND_HOLD_MS_DEFAULT;

fn documents(path: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{path}: {e}")))
        .collect()
}

fn seconds(text: &str) -> u64 {
    text.trim_end_matches('s').parse().unwrap_or_else(|_| panic!("duration {text}"))
}

#[test]
fn the_scheduler_configuration_matches_the_extender() {
    let config_map = &documents("scheduler-config/extender/kube-scheduler-config.yaml")[0];
    let text = config_map["data"]["config.yaml"].as_str().expect("config.yaml");
    let config: Value = serde_yaml_ng::from_str(text).expect("KubeSchedulerConfiguration");
    assert_eq!(config["kind"].as_str(), Some("KubeSchedulerConfiguration"));
    assert_eq!(config["apiVersion"].as_str(), Some("kubescheduler.config.k8s.io/v1"));
    assert_eq!(config["percentageOfNodesToScore"].as_u64(), Some(100));
    assert_eq!(config["leaderElection"]["resourceName"].as_str(), Some("topoplace-scheduler"));
    let extender = &config["extenders"][0];
    for (key, verb) in
        [("filterVerb", "filter"), ("prioritizeVerb", "prioritize"), ("preemptVerb", "preempt"), ("bindVerb", "bind")]
    {
        assert_eq!(extender[key].as_str(), Some(verb), "{key}");
    }
    assert_eq!(extender["nodeCacheCapable"].as_bool(), Some(true));
    assert_eq!(extender["managedResources"][0]["name"].as_str(), Some("nvidia.com/gpu"));

    let deployment = documents("scheduler-config/extender/deployment.yaml")
        .into_iter()
        .find(|d| {
            d["metadata"]["name"].as_str() == Some("topoplace-extender") && d["kind"].as_str() == Some("Deployment")
        })
        .expect("extender Deployment");
    let args: Vec<String> = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_sequence()
        .expect("args")
        .iter()
        .filter_map(|a| a.as_str().map(String::from))
        .collect();
    let cli = topoplace::cli::Cli::try_parse_from(std::iter::once("topoplace".to_string()).chain(args))
        .expect("the Deployment's arguments parse");
    let topoplace::cli::Command::Serve(serve) = cli.command else { panic!("serve") };
    let timeout = seconds(extender["httpTimeout"].as_str().expect("httpTimeout"));
    // kube-scheduler hangs up on an extender call after httpTimeout: a gang member's bind is
    // held at most --bind-hold, and then the gang's Bindings may take BINDING_BUDGET_MS, so
    // every held bind is answered while kube-scheduler still listens.
    // A few seconds more for a request that waited in the book's queue.
    let budget_s = topoplace_online::reservation::BINDING_BUDGET_MS / 1000;
    let queue_margin_s = 5;
    for (what, hold) in [("the shipped Deployment", serve.bind_hold), ("the default", BIND_HOLD_MS_DEFAULT / 1000)] {
        assert!(
            hold + budget_s + queue_margin_s <= timeout,
            "{what}: held bind ({hold}s) + Bindings ({budget_s}s) + queue ({queue_margin_s}s) must fit in httpTimeout ({timeout}s)"
        );
        assert!(hold >= 30, "{what}: a member up to 30 s late still binds with its gang at once");
    }
    let port = serve.listen.port().to_string();
    assert!(extender["urlPrefix"].as_str().is_some_and(|u| u.ends_with(&format!(":{port}"))), "urlPrefix port");
    // The gRPC placement API's port is the one the container and the Service expose.
    let container_port = |name: &str| {
        deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
            .as_sequence()
            .and_then(|ports| ports.iter().find(|p| p["name"].as_str() == Some(name)))
            .and_then(|p| p["containerPort"].as_u64())
    };
    assert!(!serve.no_grpc);
    assert_eq!(container_port("grpc"), Some(u64::from(serve.grpc_listen.port())));
    assert!(serve.grpc_reserve_tokens.is_some(), "the shipped Deployment restricts who may reserve");
    let service = documents("scheduler-config/extender/deployment.yaml")
        .into_iter()
        .find(|d| d["kind"].as_str() == Some("Service") && d["metadata"]["name"].as_str() == Some("topoplace-extender"))
        .expect("extender Service");
    assert!(service["spec"]["ports"]
        .as_sequence()
        .is_some_and(|ports| ports.iter().any(|p| p["targetPort"].as_str() == Some("grpc"))));
}

/// Whether the `kind` named `name` in `path` grants `verb` on `resource`.
fn grants(path: &str, kind: &str, name: &str, resource: &str, verb: &str) -> bool {
    let role = documents(path)
        .into_iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("{kind} {name} in {path}"));
    role["rules"].as_sequence().expect("rules").iter().any(|rule| {
        let has =
            |key: &str, want: &str| rule[key].as_sequence().is_some_and(|s| s.iter().any(|v| v.as_str() == Some(want)));
        has("resources", resource) && has("verbs", verb)
    })
}

/// What both the extender and the scheduler call: watches, Bindings, undo deletes, Events.
const BINDING_CALLS: [(&str, &str); 8] = [
    ("nodes", "list"),
    ("nodes", "watch"),
    ("pods", "list"),
    ("pods", "watch"),
    ("pods", "get"),
    ("pods", "delete"),
    ("pods/binding", "create"),
    ("events", "create"),
];

#[test]
fn the_scheduler_role_grants_what_it_calls_and_its_deployment_parses() {
    let rbac = "scheduler-config/scheduler/rbac.yaml";
    for (resource, verb) in BINDING_CALLS.into_iter().chain([
        ("pods/status", "patch"),
        ("podgroups", "get"),
        ("poddisruptionbudgets", "list"),
        ("poddisruptionbudgets", "watch"),
    ]) {
        assert!(grants(rbac, "ClusterRole", "topoplace-scheduler", resource, verb), "{verb} {resource}");
    }
    for verb in ["get", "create", "update"] {
        assert!(grants(rbac, "Role", "topoplace-scheduler-lease", "leases", verb), "{verb} leases");
    }
    let deployment = documents("scheduler-config/scheduler/deployment.yaml")
        .into_iter()
        .find(|d| d["kind"].as_str() == Some("Deployment"))
        .expect("scheduler Deployment");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<String> =
        container["args"].as_sequence().expect("args").iter().filter_map(|a| a.as_str().map(String::from)).collect();
    let cli = topoplace::cli::Cli::try_parse_from(std::iter::once("topoplace".to_string()).chain(args))
        .expect("the Deployment's arguments parse");
    let topoplace::cli::Command::Scheduler(args) = cli.command else { panic!("scheduler") };
    let lease = args.scheduling.lease_config().expect("valid lease timing").expect("leader election on");
    assert_eq!(lease.name, "topoplace-scheduler");
    assert!(deployment["spec"]["replicas"].as_u64().is_some_and(|r| r >= 2), "a standby replica");
    let env: Vec<&str> =
        container["env"].as_sequence().expect("env").iter().filter_map(|e| e["name"].as_str()).collect();
    assert!(env.contains(&"POD_NAMESPACE"), "the Lease lives in the pod's namespace");
}

#[test]
fn the_extender_role_grants_what_it_calls() {
    let grants = |resource: &str, verb: &str| {
        grants("scheduler-config/extender/rbac.yaml", "ClusterRole", "topoplace-extender", resource, verb)
    };
    // patch pods: the `topoplace.io/gang-retry` update that asks kube-scheduler to retry a
    // gang member whose held bind lapsed.
    // get podgroups: a pod's gang from the PodGroup object it names.
    for (resource, verb) in BINDING_CALLS.into_iter().chain([("pods", "patch"), ("podgroups", "get")]) {
        assert!(grants(resource, verb), "{verb} {resource}");
    }
}
