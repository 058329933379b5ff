//! The node predicates a scheduler owes every pod, besides GPUs: node readiness and
//! cordoning, taints against tolerations, `nodeSelector` and required node affinity, and
//! resource requests (CPU, memory, ephemeral storage, extended resources, pod count) against
//! allocatable minus what the node's pods already request. Semantics follow kube-scheduler's
//! plugins (NodeUnschedulable, TaintToleration, NodeAffinity, NodeResourcesFit), and so do the
//! reason texts, so `kubectl describe pod` reads as users expect.
//!
//! Pure data in, verdicts out: the kube adapter translates Nodes and Pods into these types.

use std::collections::BTreeMap;

/// Resource amounts in thousandths of their unit (see [`topoplace_engine::quantity::parse_milli`]).
pub type Resources = BTreeMap<String, i64>;

/// The GPU resource: placed by the engine, so not part of [`PodNeeds::requests`].
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";

/// The resource whose requests count pods on a node (allocatable `pods`).
pub const PODS_RESOURCE: &str = "pods";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaintEffect {
    NoSchedule,
    PreferNoSchedule,
    NoExecute,
}

impl TaintEffect {
    pub fn parse(text: &str) -> Option<TaintEffect> {
        match text {
            "NoSchedule" => Some(TaintEffect::NoSchedule),
            "PreferNoSchedule" => Some(TaintEffect::PreferNoSchedule),
            "NoExecute" => Some(TaintEffect::NoExecute),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taint {
    pub key: String,
    pub value: String,
    pub effect: TaintEffect,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Toleration {
    /// Empty with `exists` tolerates every taint.
    pub key: String,
    /// `Exists` (any value) rather than `Equal`.
    pub exists: bool,
    pub value: String,
    /// `None` tolerates every effect.
    pub effect: Option<TaintEffect>,
}

impl Toleration {
    /// `v1.Toleration.ToleratesTaint`.
    pub fn tolerates(&self, taint: &Taint) -> bool {
        if self.effect.is_some_and(|effect| effect != taint.effect) {
            return false;
        }
        if !self.key.is_empty() && self.key != taint.key {
            return false;
        }
        self.exists || self.value == taint.value
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
    Gt,
    Lt,
}

impl SelectorOperator {
    pub fn parse(text: &str) -> Option<SelectorOperator> {
        match text {
            "In" => Some(SelectorOperator::In),
            "NotIn" => Some(SelectorOperator::NotIn),
            "Exists" => Some(SelectorOperator::Exists),
            "DoesNotExist" => Some(SelectorOperator::DoesNotExist),
            "Gt" => Some(SelectorOperator::Gt),
            "Lt" => Some(SelectorOperator::Lt),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectorRequirement {
    pub key: String,
    pub operator: SelectorOperator,
    pub values: Vec<String>,
}

impl SelectorRequirement {
    /// Against a label map (`matchExpressions`), or `{metadata.name: name}` (`matchFields`).
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            SelectorOperator::In => value.is_some_and(|v| self.values.contains(v)),
            SelectorOperator::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            SelectorOperator::Exists => value.is_some(),
            SelectorOperator::DoesNotExist => value.is_none(),
            SelectorOperator::Gt | SelectorOperator::Lt => {
                // Exactly one integer value, compared with the label's integer (the API
                // server validates the former; a label that is not an integer never matches).
                let (Some(label), [bound]) = (value.and_then(|v| v.parse::<i64>().ok()), self.values.as_slice()) else {
                    return false;
                };
                let Ok(bound) = bound.parse::<i64>() else { return false };
                if self.operator == SelectorOperator::Gt {
                    label > bound
                } else {
                    label < bound
                }
            }
        }
    }
}

/// One `nodeSelectorTerms` entry: all its requirements must hold.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SelectorTerm {
    pub match_expressions: Vec<SelectorRequirement>,
    pub match_fields: Vec<SelectorRequirement>,
}

impl SelectorTerm {
    fn matches(&self, node: &NodeFacts) -> bool {
        // An empty term selects nothing (`nodeaffinity.NodeSelector`).
        if self.match_expressions.is_empty() && self.match_fields.is_empty() {
            return false;
        }
        let fields = BTreeMap::from([("metadata.name".to_string(), node.name.clone())]);
        self.match_expressions.iter().all(|r| r.matches(&node.labels))
            && self.match_fields.iter().all(|r| r.matches(&fields))
    }
}

/// What the scheduler knows of a node, GPU or not.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeFacts {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// The `Ready` condition is `True`.
    pub ready: bool,
    /// `spec.unschedulable` (cordoned).
    pub unschedulable: bool,
    pub taints: Vec<Taint>,
    /// `status.allocatable`, including `pods`.
    pub allocatable: Resources,
}

/// What a pod asks of a node, besides GPUs.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PodNeeds {
    pub node_selector: BTreeMap<String, String>,
    /// `requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms` (any term may match);
    /// `None` when the pod has no required node affinity.
    pub affinity_terms: Option<Vec<SelectorTerm>>,
    pub tolerations: Vec<Toleration>,
    /// Effective requests (containers summed, init containers' maximum, overhead), without
    /// GPUs (placed by the engine) and without `pods` (one per pod, added here).
    pub requests: Resources,
}

/// Why a node cannot take a pod: the grouping key of the "0/N nodes are available" message.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Unfit {
    NotReady,
    Unschedulable,
    Taint { key: String, value: String },
    Selector,
    Insufficient(String),
    TooManyPods,
}

impl std::fmt::Display for Unfit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unfit::NotReady => write!(f, "node(s) were not ready"),
            Unfit::Unschedulable => write!(f, "node(s) were unschedulable"),
            Unfit::Taint { key, value } => write!(f, "node(s) had untolerated taint {{{key}: {value}}}"),
            Unfit::Selector => write!(f, "node(s) didn't match Pod's node affinity/selector"),
            Unfit::Insufficient(resource) => write!(f, "Insufficient {resource}"),
            Unfit::TooManyPods => write!(f, "Too many pods"),
        }
    }
}

/// Whether `node` can take a pod with `needs`, given what the node's pods already request.
/// The first failing predicate is returned, in kube-scheduler's plugin order.
pub fn check(node: &NodeFacts, used: &Resources, needs: &PodNeeds) -> Result<(), Unfit> {
    if !node.ready {
        return Err(Unfit::NotReady);
    }
    if node.unschedulable && !tolerates_unschedulable(&needs.tolerations) {
        return Err(Unfit::Unschedulable);
    }
    if !needs.node_selector.iter().all(|(k, v)| node.labels.get(k) == Some(v)) {
        return Err(Unfit::Selector);
    }
    if let Some(terms) = &needs.affinity_terms {
        if !terms.iter().any(|term| term.matches(node)) {
            return Err(Unfit::Selector);
        }
    }
    for taint in &node.taints {
        if taint.effect == TaintEffect::PreferNoSchedule {
            continue;
        }
        if !needs.tolerations.iter().any(|t| t.tolerates(taint)) {
            return Err(Unfit::Taint { key: taint.key.clone(), value: taint.value.clone() });
        }
    }
    fits_resources(node, used, &needs.requests)
}

/// Requests against allocatable minus `used`; one pod slot is always needed.
pub fn fits_resources(node: &NodeFacts, used: &Resources, requests: &Resources) -> Result<(), Unfit> {
    let pods_allowed = node.allocatable.get(PODS_RESOURCE).copied().unwrap_or(0);
    let pods_used = used.get(PODS_RESOURCE).copied().unwrap_or(0);
    if pods_used + 1000 > pods_allowed {
        return Err(Unfit::TooManyPods);
    }
    for (resource, &amount) in requests {
        if amount <= 0 || resource == PODS_RESOURCE {
            continue;
        }
        let allocatable = node.allocatable.get(resource).copied().unwrap_or(0);
        let in_use = used.get(resource).copied().unwrap_or(0);
        if in_use.saturating_add(amount) > allocatable {
            return Err(Unfit::Insufficient(resource.clone()));
        }
    }
    Ok(())
}

/// A cordoned node admits pods tolerating `node.kubernetes.io/unschedulable:NoSchedule`.
fn tolerates_unschedulable(tolerations: &[Toleration]) -> bool {
    let taint =
        Taint { key: "node.kubernetes.io/unschedulable".into(), value: String::new(), effect: TaintEffect::NoSchedule };
    tolerations.iter().any(|t| t.tolerates(&taint))
}

/// Adds a pod's requests (and its pod slot) to a node's usage, or takes them away.
pub fn add_usage(used: &mut Resources, requests: &Resources, sign: i64) {
    for (resource, &amount) in requests {
        *used.entry(resource.clone()).or_insert(0) += sign * amount;
    }
    *used.entry(PODS_RESOURCE.to_string()).or_insert(0) += sign * 1000;
    used.retain(|_, amount| *amount != 0);
}

/// kube-scheduler's summary: `0/N nodes are available: 3 Insufficient cpu, 2 node(s) ...`,
/// reasons with their node counts, sorted by text.
pub fn summary(total_nodes: usize, reasons: &BTreeMap<String, usize>) -> String {
    let mut parts: Vec<String> = reasons.iter().map(|(reason, count)| format!("{count} {reason}")).collect();
    parts.sort();
    format!("0/{total_nodes} nodes are available: {}.", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> NodeFacts {
        NodeFacts {
            name: name.into(),
            labels: BTreeMap::from([("zone".to_string(), "a".to_string()), ("gen".to_string(), "9".to_string())]),
            ready: true,
            unschedulable: false,
            taints: Vec::new(),
            allocatable: Resources::from([("cpu".to_string(), 4000), ("pods".to_string(), 2000)]),
        }
    }

    fn requirement(key: &str, operator: SelectorOperator, values: &[&str]) -> SelectorRequirement {
        SelectorRequirement { key: key.into(), operator, values: values.iter().map(|v| v.to_string()).collect() }
    }

    fn with_term(expressions: Vec<SelectorRequirement>) -> PodNeeds {
        PodNeeds {
            affinity_terms: Some(vec![SelectorTerm { match_expressions: expressions, match_fields: Vec::new() }]),
            ..PodNeeds::default()
        }
    }

    #[test]
    fn readiness_cordon_and_taints() {
        let used = Resources::new();
        let mut down = node("n");
        down.ready = false;
        assert_eq!(check(&down, &used, &PodNeeds::default()), Err(Unfit::NotReady));
        let mut cordoned = node("n");
        cordoned.unschedulable = true;
        assert_eq!(check(&cordoned, &used, &PodNeeds::default()), Err(Unfit::Unschedulable));
        let tolerate_all = Toleration { key: String::new(), exists: true, value: String::new(), effect: None };
        let needs = PodNeeds { tolerations: vec![tolerate_all.clone()], ..PodNeeds::default() };
        assert_eq!(check(&cordoned, &used, &needs), Ok(()), "tolerating everything admits a cordoned node");

        let mut tainted = node("n");
        tainted.taints = vec![
            Taint { key: "soft".into(), value: "x".into(), effect: TaintEffect::PreferNoSchedule },
            Taint { key: "gpu".into(), value: "h100".into(), effect: TaintEffect::NoSchedule },
        ];
        assert_eq!(
            check(&tainted, &used, &PodNeeds::default()),
            Err(Unfit::Taint { key: "gpu".into(), value: "h100".into() })
        );
        let equal = |value: &str, effect| Toleration { key: "gpu".into(), exists: false, value: value.into(), effect };
        for (toleration, admits) in [
            (equal("h100", Some(TaintEffect::NoSchedule)), true),
            (equal("h100", None), true),
            (equal("a100", None), false),
            (equal("h100", Some(TaintEffect::NoExecute)), false),
            (Toleration { key: "gpu".into(), exists: true, value: String::new(), effect: None }, true),
            (Toleration { key: "other".into(), exists: true, value: String::new(), effect: None }, false),
            (tolerate_all, true),
        ] {
            let needs = PodNeeds { tolerations: vec![toleration.clone()], ..PodNeeds::default() };
            assert_eq!(check(&tainted, &used, &needs).is_ok(), admits, "{toleration:?}");
        }
        tainted.taints[1].effect = TaintEffect::NoExecute;
        assert!(check(&tainted, &used, &PodNeeds::default()).is_err(), "NoExecute blocks scheduling too");
    }

    #[test]
    fn selectors_and_every_affinity_operator() {
        let used = Resources::new();
        let n = node("n1");
        let selector = |k: &str, v: &str| PodNeeds {
            node_selector: BTreeMap::from([(k.to_string(), v.to_string())]),
            ..PodNeeds::default()
        };
        assert_eq!(check(&n, &used, &selector("zone", "a")), Ok(()));
        assert_eq!(check(&n, &used, &selector("zone", "b")), Err(Unfit::Selector));
        use SelectorOperator::*;
        for (req, admits) in [
            (requirement("zone", In, &["a", "b"]), true),
            (requirement("zone", In, &["b"]), false),
            (requirement("zone", NotIn, &["b"]), true),
            (requirement("missing", NotIn, &["b"]), true),
            (requirement("zone", NotIn, &["a"]), false),
            (requirement("zone", Exists, &[]), true),
            (requirement("missing", Exists, &[]), false),
            (requirement("missing", DoesNotExist, &[]), true),
            (requirement("zone", DoesNotExist, &[]), false),
            (requirement("gen", Gt, &["8"]), true),
            (requirement("gen", Gt, &["9"]), false),
            (requirement("gen", Lt, &["10"]), true),
            (requirement("zone", Lt, &["10"]), false),
        ] {
            assert_eq!(check(&n, &used, &with_term(vec![req.clone()])).is_ok(), admits, "{req:?}");
        }
        // Terms are ORed, requirements inside a term ANDed, an empty term matches nothing.
        let terms = PodNeeds {
            affinity_terms: Some(vec![
                SelectorTerm::default(),
                SelectorTerm {
                    match_expressions: vec![requirement("zone", In, &["a"])],
                    match_fields: vec![requirement("metadata.name", In, &["n1"])],
                },
            ]),
            ..PodNeeds::default()
        };
        assert_eq!(check(&n, &used, &terms), Ok(()));
        assert_eq!(check(&node("n2"), &used, &terms), Err(Unfit::Selector), "matchFields on metadata.name");
    }

    #[test]
    fn resources_against_allocatable_minus_used() {
        let n = node("n");
        let needs =
            |cpu: i64| PodNeeds { requests: Resources::from([("cpu".to_string(), cpu)]), ..PodNeeds::default() };
        let mut used = Resources::new();
        assert_eq!(check(&n, &used, &needs(4000)), Ok(()));
        add_usage(&mut used, &Resources::from([("cpu".to_string(), 1500)]), 1);
        assert_eq!(check(&n, &used, &needs(3000)), Err(Unfit::Insufficient("cpu".into())));
        assert_eq!(check(&n, &used, &needs(2500)), Ok(()));
        let extended =
            PodNeeds { requests: Resources::from([("example.com/fpga".to_string(), 1000)]), ..PodNeeds::default() };
        assert_eq!(check(&n, &used, &extended), Err(Unfit::Insufficient("example.com/fpga".into())));
        add_usage(&mut used, &Resources::new(), 1);
        assert_eq!(check(&n, &used, &needs(0)), Err(Unfit::TooManyPods), "2 pods allowed, 2 there");
        add_usage(&mut used, &Resources::new(), -1);
        add_usage(&mut used, &Resources::from([("cpu".to_string(), 1500)]), -1);
        assert_eq!(used, Resources::new(), "usage returns to nothing");
    }

    #[test]
    fn summary_reads_like_kube_scheduler() {
        let reasons = BTreeMap::from([
            (Unfit::Insufficient("cpu".into()).to_string(), 3),
            (Unfit::Taint { key: "gpu".into(), value: "x".into() }.to_string(), 2),
        ]);
        assert_eq!(
            summary(5, &reasons),
            "0/5 nodes are available: 2 node(s) had untolerated taint {gpu: x}, 3 Insufficient cpu."
        );
    }
}
