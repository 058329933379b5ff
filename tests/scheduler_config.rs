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

/// The typed objects of kind `K` in a manifest file (k8s-openapi's types: a field of the wrong
/// type or shape fails here as it would at `kubectl apply`).
fn typed<K: serde::de::DeserializeOwned>(path: &str, kind: &str) -> Vec<K> {
    documents(path)
        .into_iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .map(|d| serde_yaml_ng::from_value(d).unwrap_or_else(|e| panic!("{path}: {kind}: {e}")))
        .collect()
}

fn deployment(path: &str, name: &str) -> k8s_openapi::api::apps::v1::Deployment {
    typed::<k8s_openapi::api::apps::v1::Deployment>(path, "Deployment")
        .into_iter()
        .find(|d| d.metadata.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("Deployment {name} in {path}"))
}

/// Whether `selector` (matchLabels and matchExpressions) selects `labels`.
fn selects(
    selector: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    labels: &std::collections::BTreeMap<String, String>,
) -> bool {
    let by_labels = selector.match_labels.iter().flatten().all(|(key, value)| labels.get(key) == Some(value));
    let by_expressions = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.clone().unwrap_or_default();
        match e.operator.as_str() {
            "In" => labels.get(&e.key).is_some_and(|v| values.contains(v)),
            "NotIn" => labels.get(&e.key).is_none_or(|v| !values.contains(v)),
            "Exists" => labels.contains_key(&e.key),
            "DoesNotExist" => !labels.contains_key(&e.key),
            other => panic!("unknown operator {other}"),
        }
    });
    by_labels && by_expressions
}

fn pod_labels(deployment: &k8s_openapi::api::apps::v1::Deployment) -> std::collections::BTreeMap<String, String> {
    let spec = &deployment.spec;
    let labels = spec.template.metadata.as_ref().and_then(|m| m.labels.clone()).unwrap_or_default();
    assert!(selects(&spec.selector, &labels), "the Deployment's selector selects its own pods");
    labels
}

/// A pod that may try to connect: its namespace and labels.
struct Source<'a> {
    namespace: &'a str,
    labels: std::collections::BTreeMap<String, String>,
}

fn source<'a>(namespace: &'a str, labels: &[(&str, &str)]) -> Source<'a> {
    Source { namespace, labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() }
}

/// Every port, in [`admitted_ports`]'s answer.
const EVERY_PORT: i32 = 0;

/// The ports `policy` (applied in namespace `own`) admits from `from`, with the semantics of
/// `networking.k8s.io/v1`: a rule without `from` admits every source, a rule without `ports`
/// every port ([`EVERY_PORT`]); a peer's `podSelector` alone means its own namespace, a
/// `namespaceSelector` alone every pod of the namespaces it selects (matched on the
/// `kubernetes.io/metadata.name` label the API server sets); an `ipBlock` is taken to admit
/// anyone.
fn admitted_ports(policy: &k8s_openapi::api::networking::v1::NetworkPolicy, own: &str, from: &Source<'_>) -> Vec<i32> {
    let namespace_labels: std::collections::BTreeMap<String, String> =
        [("kubernetes.io/metadata.name".to_string(), from.namespace.to_string())].into();
    let spec = policy.spec.as_ref().expect("spec");
    let mut ports = Vec::new();
    for rule in spec.ingress.iter().flatten() {
        let peers = rule.from.as_deref().unwrap_or_default();
        let admits = peers.is_empty()
            || peers.iter().any(|peer| {
                if peer.ip_block.is_some() {
                    return true;
                }
                let namespace_ok = match &peer.namespace_selector {
                    None => from.namespace == own,
                    Some(selector) => selects(selector, &namespace_labels),
                };
                let pod_ok = peer.pod_selector.as_ref().is_none_or(|s| selects(s, &from.labels));
                namespace_ok && pod_ok
            });
        if !admits {
            continue;
        }
        let rule_ports = rule.ports.as_deref().unwrap_or_default();
        if rule_ports.is_empty() {
            ports.push(EVERY_PORT);
        }
        for port in rule_ports {
            match &port.port {
                Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(number)) => ports.push(*number),
                None => ports.push(EVERY_PORT),
                other => panic!("policy {:?}: port {other:?} is not a number", policy.metadata.name),
            }
        }
    }
    ports.sort_unstable();
    ports.dedup();
    ports
}

#[test]
fn the_network_policies_admit_only_kube_scheduler_to_the_extender_and_select_the_deployments_pods() {
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    let manifests = "scheduler-config/extender/deployment.yaml";
    let extender = pod_labels(&deployment(manifests, "topoplace-extender"));
    let kube_scheduler = pod_labels(&deployment(manifests, "topoplace-scheduler"));
    let policies: Vec<NetworkPolicy> = typed("scheduler-config/extender/networkpolicy.yaml", "NetworkPolicy");
    let guarding: Vec<&NetworkPolicy> = policies
        .iter()
        .filter(|p| selects(&p.spec.as_ref().expect("spec").pod_selector.clone().unwrap_or_default(), &extender))
        .collect();
    assert_eq!(guarding.len(), 1, "one policy selects the extender's pods");
    let policy = guarding[0];
    assert_eq!(policy.spec.as_ref().and_then(|s| s.policy_types.clone()), Some(vec!["Ingress".to_string()]));
    let serve = serve_args(manifests);
    let (http, grpc) = (i32::from(serve.listen.port()), i32::from(serve.grpc_listen.port()));
    // kube-scheduler reaches the extender's port and nothing else; a pod of no given label
    // reaches nothing; a placement client of the topoplace namespace reaches gRPC only, one of
    // another namespace nothing; a scraper of the monitoring namespace the HTTPS port only.
    let ns = "topoplace";
    let kube_scheduler_pod = Source { namespace: ns, labels: kube_scheduler.clone() };
    assert_eq!(admitted_ports(policy, ns, &kube_scheduler_pod), vec![http]);
    let elsewhere = Source { namespace: "tenant", labels: kube_scheduler.clone() };
    assert_eq!(
        admitted_ports(policy, ns, &elsewhere),
        Vec::<i32>::new(),
        "kube-scheduler's labels in another namespace"
    );
    assert_eq!(admitted_ports(policy, ns, &source(ns, &[("app", "web")])), Vec::<i32>::new());
    let client = [("topoplace.io/placement-client", "true")];
    assert_eq!(admitted_ports(policy, ns, &source(ns, &client)), vec![grpc]);
    assert_eq!(admitted_ports(policy, ns, &source("tenant", &client)), Vec::<i32>::new());
    let scraper = [("topoplace.io/metrics-scraper", "true")];
    assert_eq!(admitted_ports(policy, ns, &source("monitoring", &scraper)), vec![http]);
    assert_eq!(admitted_ports(policy, ns, &source("tenant", &scraper)), Vec::<i32>::new());
    // The second kube-scheduler admits nobody (its probes come from its node).
    let own: Vec<&NetworkPolicy> = policies
        .iter()
        .filter(|p| selects(&p.spec.as_ref().expect("spec").pod_selector.clone().unwrap_or_default(), &kube_scheduler))
        .collect();
    assert_eq!(own.len(), 1);
    for from in [&kube_scheduler_pod, &source(ns, &client), &source("monitoring", &scraper)] {
        assert_eq!(admitted_ports(own[0], ns, from), Vec::<i32>::new());
    }

    // The model itself: an empty rule admits everyone to every port, a namespace selector alone
    // every pod of that namespace.
    let open: NetworkPolicy = serde_json::from_value(
        serde_json::json!({"metadata": {"name": "open"}, "spec": {"podSelector": {}, "ingress": [{}]}}),
    )
    .expect("policy");
    assert_eq!(admitted_ports(&open, ns, &source("tenant", &[])), vec![EVERY_PORT]);
    let by_namespace: NetworkPolicy = serde_json::from_value(serde_json::json!({"metadata": {"name": "ns"},
        "spec": {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector":
            {"matchLabels": {"kubernetes.io/metadata.name": "tenant"}}}], "ports": [{"port": 1}]}]}}))
    .expect("policy");
    assert_eq!(admitted_ports(&by_namespace, ns, &source("tenant", &[("any", "pod")])), vec![1]);
    assert_eq!(admitted_ports(&by_namespace, ns, &source(ns, &[])), Vec::<i32>::new());

    // `topoplace scheduler`: only scrapers, to its one port.
    let scheduler = pod_labels(&deployment("scheduler-config/scheduler/deployment.yaml", "topoplace-scheduler"));
    let policies: Vec<NetworkPolicy> = typed("scheduler-config/scheduler/networkpolicy.yaml", "NetworkPolicy");
    assert_eq!(policies.len(), 1);
    assert!(selects(&policies[0].spec.as_ref().expect("spec").pod_selector.clone().unwrap_or_default(), &scheduler));
    let itself = Source { namespace: ns, labels: scheduler };
    assert_eq!(admitted_ports(&policies[0], ns, &itself), Vec::<i32>::new());
    assert_eq!(admitted_ports(&policies[0], ns, &source("monitoring", &scraper)), vec![8888]);
    assert_eq!(admitted_ports(&policies[0], ns, &source("tenant", &scraper)), Vec::<i32>::new());
}

fn serve_args(path: &str) -> topoplace::cli::serve::ServeArgs {
    let name = if path.contains("/scheduler/") { "topoplace-scheduler" } else { "topoplace-extender" };
    let deployment = deployment(path, name);
    let container = &deployment.spec.template.spec.expect("pod spec").containers[0];
    let args = container.args.clone().expect("args");
    let cli = topoplace::cli::Cli::try_parse_from(std::iter::once("topoplace".to_string()).chain(args))
        .expect("the Deployment's arguments parse");
    match cli.command {
        topoplace::cli::Command::Serve(args) | topoplace::cli::Command::Scheduler(args) => args,
        _ => panic!("{path}: serve or scheduler"),
    }
}

/// The directory a container mounts `volume` at, and the Secret that volume is.
fn secret_mount(deployment: &k8s_openapi::api::apps::v1::Deployment, container: usize, path: &str) -> String {
    let pod = deployment.spec.template.spec.as_ref().expect("pod spec");
    let mount = pod.containers[container]
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| std::path::Path::new(path).starts_with(&m.mount_path))
        .unwrap_or_else(|| panic!("{path} is in no volume the container mounts"));
    let volume = pod.volumes.iter().flatten().find(|v| v.name == mount.name).expect("the mounted volume");
    volume.secret.as_ref().and_then(|s| s.secret_name.clone()).unwrap_or_else(|| panic!("{path}: not a Secret"))
}

#[test]
fn the_shipped_extender_speaks_https_with_client_certificates_both_ways() {
    let manifests = "scheduler-config/extender/deployment.yaml";
    // topoplace: HTTPS with a client CA, never --insecure-http; its files come from a Secret.
    let serve = serve_args(manifests);
    assert!(!serve.insecure_http);
    // Only kube-scheduler's certificate (its subject in scheduler-config/README.md) calls verbs.
    assert_eq!(serve.verb_clients, Some(vec!["topoplace-kube-scheduler".to_string()]));
    let readme = std::fs::read_to_string("scheduler-config/README.md").expect("README");
    assert!(readme.contains("-subj \"/CN=topoplace-kube-scheduler\""), "the README's client certificate is that name");
    let extender = deployment(manifests, "topoplace-extender");
    for file in [&serve.tls_cert, &serve.tls_key, &serve.client_ca] {
        let file = file.as_ref().expect("--tls-cert, --tls-key and --client-ca").display().to_string();
        assert_eq!(secret_mount(&extender, 0, &file), "topoplace-extender-tls", "{file}");
    }
    // The probes speak HTTPS (they present no certificate: /healthz and /readyz are open).
    let container = &extender.spec.template.spec.as_ref().expect("pod").containers[0];
    for probe in [&container.liveness_probe, &container.readiness_probe] {
        let get = probe.as_ref().and_then(|p| p.http_get.as_ref()).expect("httpGet probe");
        assert_eq!(get.scheme.as_deref(), Some("HTTPS"), "{:?}", get.path);
        assert!(matches!(get.path.as_deref(), Some("/healthz" | "/readyz")));
    }
    // kube-scheduler: https urlPrefix, enableHTTPS, its certificate, key and CA mounted.
    let config_map = &documents("scheduler-config/extender/kube-scheduler-config.yaml")[0];
    let config: Value =
        serde_yaml_ng::from_str(config_map["data"]["config.yaml"].as_str().expect("config")).expect("yaml");
    let entry = &config["extenders"][0];
    assert!(entry["urlPrefix"].as_str().is_some_and(|u| u.starts_with("https://")));
    assert_eq!(entry["enableHTTPS"].as_bool(), Some(true));
    let kube_scheduler = deployment(manifests, "topoplace-scheduler");
    for key in ["certFile", "keyFile", "caFile"] {
        let file = entry["tlsConfig"][key].as_str().unwrap_or_else(|| panic!("tlsConfig.{key}"));
        assert_eq!(secret_mount(&kube_scheduler, 0, file), "topoplace-kube-scheduler-client", "{key}");
    }
    assert_ne!(
        entry["tlsConfig"]["insecure"].as_bool(),
        Some(true),
        "kube-scheduler checks the extender's certificate"
    );

    // `topoplace scheduler` serves its port the same way.
    let scheduler = serve_args("scheduler-config/scheduler/deployment.yaml");
    assert!(!scheduler.insecure_http && scheduler.tls_cert.is_some() && scheduler.client_ca.is_some());
}
