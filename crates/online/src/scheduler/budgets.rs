//! PodDisruptionBudgets as the secondary scheduler's preemption reads them, with the rules of
//! kube-scheduler's default preemption (`pkg/scheduler/framework/plugins/defaultpreemption`,
//! `filterPodsWithPDBViolation`): a budget covers the pods of its namespace that its selector
//! matches (a null or empty selector, or one that cannot be read, matches nothing there; a pod
//! without labels matches none); a pod named in its `status.disruptedPods` is already being
//! disrupted and is not counted; otherwise each victim uses one of `status.disruptionsAllowed`
//! of every budget that covers it, and violates the budgets it takes below zero.
//! Budgets are respected as kube-scheduler respects them: best effort. Candidates with fewer
//! victims that break a budget come first, victims that would break one are reprieved first,
//! and a unit whose chosen victims still break a budget preempts anyway, naming the budgets.

use std::collections::{BTreeMap, BTreeSet};

use super::predicates::SelectorRequirement;
use super::BoundPod;

/// A label selector over pods (`metav1.LabelSelector`): every `matchLabels` pair and every
/// requirement must hold. Its operators are `In`, `NotIn`, `Exists`, `DoesNotExist`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LabelSelector {
    pub match_labels: BTreeMap<String, String>,
    pub match_expressions: Vec<SelectorRequirement>,
}

impl LabelSelector {
    /// Whether it states nothing (kube-scheduler's preemption takes that as matching nothing).
    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }

    /// Whether `labels` satisfy it.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }
}

/// One PodDisruptionBudget (`policy/v1`), as far as preemption needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DisruptionBudget {
    pub namespace: String,
    pub name: String,
    /// `spec.selector`; `None` when null or unreadable (it matches nothing).
    pub selector: Option<LabelSelector>,
    /// `status.disruptionsAllowed`, as the disruption controller last wrote it.
    pub disruptions_allowed: i32,
    /// The pod names in `status.disruptedPods`: disruptions under way, not counted again.
    pub disrupted_pods: BTreeSet<String>,
}

impl DisruptionBudget {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    fn covers(&self, pod: &BoundPod) -> bool {
        pod.pod.namespace == self.namespace
            && !pod.labels.is_empty()
            && self.selector.as_ref().is_some_and(|s| !s.is_empty() && s.matches(&pod.labels))
            && !self.disrupted_pods.contains(&pod.pod.name)
    }
}

/// Which of `victims` violate a budget if all of them are evicted, judged in the order given
/// (kube-scheduler passes the most important first, so they use the allowance first), and the
/// keys of the budgets broken.
pub fn violations<'a>(
    budgets: impl IntoIterator<Item = &'a DisruptionBudget> + Clone,
    victims: &[&BoundPod],
) -> (Vec<bool>, BTreeSet<String>) {
    let mut allowed: BTreeMap<String, i32> =
        budgets.clone().into_iter().map(|b| (b.key(), b.disruptions_allowed)).collect();
    let mut broken = BTreeSet::new();
    let flags = victims
        .iter()
        .map(|pod| {
            let mut violates = false;
            for budget in budgets.clone().into_iter().filter(|b| b.covers(pod)) {
                let left = allowed.entry(budget.key()).or_insert(0);
                *left = left.saturating_sub(1);
                if *left < 0 {
                    broken.insert(budget.key());
                    violates = true;
                }
            }
            violates
        })
        .collect();
    (flags, broken)
}
