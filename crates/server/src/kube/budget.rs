//! PodDisruptionBudgets (`policy/v1`) in the secondary scheduler's terms
//! ([`topoplace_online::scheduler::budgets`]).

use std::collections::BTreeSet;

use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use topoplace_online::scheduler::budgets::{DisruptionBudget, LabelSelector};
use topoplace_online::scheduler::predicates::{SelectorOperator, SelectorRequirement};

/// The budget as preemption reads it. A selector that cannot be read as a pod label selector
/// (an operator other than `In`, `NotIn`, `Exists`, `DoesNotExist`; `In` or `NotIn` without
/// values; `Exists` or `DoesNotExist` with values) matches nothing, as in kube-scheduler,
/// with a warning naming the budget and the field. `None` for an object without a name.
pub fn budget(object: &PodDisruptionBudget) -> Option<DisruptionBudget> {
    let name = object.metadata.name.clone()?;
    let namespace = object.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let selector = object.spec.as_ref().and_then(|s| s.selector.as_ref()).and_then(|selector| {
        let mut expressions = Vec::new();
        for (index, requirement) in selector.match_expressions.iter().flatten().enumerate() {
            let values = requirement.values.clone().unwrap_or_default();
            let operator = SelectorOperator::parse(&requirement.operator)
                .filter(|op| !matches!(op, SelectorOperator::Gt | SelectorOperator::Lt));
            let valid = match operator {
                Some(SelectorOperator::In | SelectorOperator::NotIn) => !values.is_empty(),
                Some(_) => values.is_empty(),
                None => false,
            };
            let Some(operator) = operator.filter(|_| valid) else {
                tracing::warn!(
                    budget = %format!("{namespace}/{name}"),
                    field = %format!("spec.selector.matchExpressions[{index}]"),
                    operator = %requirement.operator,
                    "a PodDisruptionBudget's selector cannot be read; it covers no pod"
                );
                return None;
            };
            expressions.push(SelectorRequirement { key: requirement.key.clone(), operator, values });
        }
        Some(LabelSelector {
            match_labels: selector.match_labels.clone().unwrap_or_default(),
            match_expressions: expressions,
        })
    });
    let status = object.status.as_ref();
    let disrupted_pods: BTreeSet<String> =
        status.and_then(|s| s.disrupted_pods.as_ref()).map(|pods| pods.keys().cloned().collect()).unwrap_or_default();
    Some(DisruptionBudget {
        namespace,
        name,
        selector,
        disruptions_allowed: status.and_then(|s| s.disruptions_allowed).unwrap_or(0),
        disrupted_pods,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(value: serde_json::Value) -> DisruptionBudget {
        budget(&serde_json::from_value(value).expect("pdb")).expect("named")
    }

    #[test]
    fn a_budget_reads_its_selector_allowance_and_disrupted_pods() {
        let pdb = read(serde_json::json!({
            "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": {"name": "web", "namespace": "serving"},
            "spec": {"minAvailable": 2, "selector": {"matchLabels": {"app": "web"},
                "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}]}},
            "status": {"disruptionsAllowed": 1, "currentHealthy": 3, "desiredHealthy": 2, "expectedPods": 3,
                "disruptedPods": {"web-0": "2026-12-02T06:00:00Z"}}
        }));
        assert_eq!(pdb.key(), "serving/web");
        assert_eq!(pdb.disruptions_allowed, 1);
        assert_eq!(pdb.disrupted_pods, BTreeSet::from(["web-0".to_string()]));
        let selector = pdb.selector.expect("selector");
        assert_eq!(selector.match_labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(selector.match_expressions.len(), 1);
        // No status yet: nothing allowed. An operator of node selectors only: covers nothing.
        let bad = read(serde_json::json!({
            "metadata": {"name": "x", "namespace": "n"},
            "spec": {"selector": {"matchExpressions": [{"key": "gpu", "operator": "Gt", "values": ["1"]}]}}
        }));
        assert_eq!((bad.disruptions_allowed, bad.selector), (0, None));
        let null = read(serde_json::json!({"metadata": {"name": "y", "namespace": "n"}, "spec": {}}));
        assert_eq!(null.selector, None);
    }
}
