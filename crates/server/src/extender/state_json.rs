//! `GET /state`'s JSON: the book's [`Snapshot`] in the wire's one casing (camelCase, as the
//! Kubernetes API and this server's other JSON). The book's types carry no serde; the shape
//! of this document is decided here, at the edge.

use serde::Serialize;

use topoplace_online::reservation::{BookStats, PreemptionOutcome, Snapshot, VerdictState};

/// The whole document: nodes with free and held GPUs, reservations, counters.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StateJson {
    pub nodes: Vec<NodeJson>,
    pub gangs: Vec<GangJson>,
    /// Preemptions under way: plans waiting for their victims to leave.
    pub preemptions: Vec<PreemptionJson>,
    /// The latest preemption verdict of each unit that asked lately, newest first: what it
    /// evicts, or why it evicts nothing.
    pub preemption_verdicts: Vec<VerdictJson>,
    pub stats: StatsJson,
}

/// A preemption's plan held while its victims leave.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PreemptionJson {
    /// The gang's `NAMESPACE/NAME`, `join:NAMESPACE/NAME` for pods joining their running
    /// gang (the secondary scheduler's), or `pod:UID`.
    pub unit: String,
    /// `NAMESPACE/NAME` of the pod whose preemption made the plan.
    pub planned_by: String,
    pub nodes: Vec<String>,
    /// Nodes where victims have not left yet.
    pub waiting_on: Vec<String>,
    pub expires_in_ms: u64,
}

/// Why a unit did or did not preempt, the last time it tried.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VerdictJson {
    /// The gang's `NAMESPACE/NAME`, `join:NAMESPACE/NAME` for pods joining their running
    /// gang (the secondary scheduler's), or `pod:UID`.
    pub unit: String,
    /// `NAMESPACE/NAME` of the pod that asked.
    pub preemptor: String,
    pub age_ms: u64,
    pub preempted: bool,
    /// `nodes` and `victims` are kube-scheduler's candidates kept through the extender: it
    /// evicts on one of them per preempt call, and counts budgets itself.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub candidates: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub victims: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub budgets_broken: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
}

impl From<VerdictState> for VerdictJson {
    fn from(state: VerdictState) -> Self {
        let verdict = state.verdict;
        let mut json = VerdictJson {
            unit: verdict.unit,
            preemptor: verdict.preemptor.to_string(),
            age_ms: state.age_ms,
            preempted: false,
            candidates: false,
            nodes: Vec::new(),
            victims: Vec::new(),
            budgets_broken: Vec::new(),
            why: None,
        };
        match verdict.outcome {
            PreemptionOutcome::Preempted { nodes, victims, budgets_broken } => {
                (json.preempted, json.nodes, json.victims, json.budgets_broken) =
                    (true, nodes, victims, budgets_broken);
            }
            PreemptionOutcome::CandidatesKept { nodes, victims } => {
                (json.preempted, json.candidates, json.nodes, json.victims) = (true, true, nodes, victims);
            }
            PreemptionOutcome::Declined { why } => json.why = Some(why),
        }
        json
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeJson {
    pub name: String,
    /// The GPU product's name.
    pub product: String,
    /// The resource these devices are offered as: `nvidia.com/gpu`, or under the mixed MIG
    /// strategy `nvidia.com/mig-<profile>` (such a node is listed once per resource).
    pub resource: String,
    /// GPUs on the node.
    pub gpus: u8,
    /// Free GPU indices.
    pub free: Vec<u8>,
    pub held: Vec<HeldJson>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HeldJson {
    /// `gang:NAMESPACE/NAME` or `pod:UID`.
    pub holder: String,
    /// `NAMESPACE/NAME` of a bound pod.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    pub gpus: Vec<u8>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GangJson {
    /// `NAMESPACE/NAME`.
    pub gang: String,
    pub members: u32,
    /// Its Bindings are in flight.
    pub binding: bool,
    /// Milliseconds to the reservation's next deadline (a held bind's limit, its expiry, or
    /// its assembly limit).
    pub expires_in_ms: u64,
    pub slots: Vec<SlotJson>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SlotJson {
    /// The member's role, in a replica with roles.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    pub node: String,
    pub gpus: Vec<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The member's bind is held (or its Binding in flight).
    pub at_bind: bool,
    /// Bound ahead of the rest of its gang (a LeaderWorkerSet leader with exclusive
    /// placement); shown only when true.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub bound: bool,
}

/// The book's counters since the server started.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatsJson {
    pub gangs_reserved: u64,
    pub gangs_bound: u64,
    pub gangs_rolled_back: u64,
    pub gangs_expired: u64,
    pub bind_holds_lapsed: u64,
    pub pods_bound: u64,
    pub pods_assumed: u64,
    pub assumptions_lapsed: u64,
    pub ledger_faults: u64,
    pub gangs_nominated: u64,
    pub nominations_expired: u64,
    pub members_joined: u64,
}

impl From<&BookStats> for StatsJson {
    fn from(stats: &BookStats) -> Self {
        StatsJson {
            gangs_reserved: stats.gangs_reserved,
            gangs_bound: stats.gangs_bound,
            gangs_rolled_back: stats.gangs_rolled_back,
            gangs_expired: stats.gangs_expired,
            bind_holds_lapsed: stats.bind_holds_lapsed,
            pods_bound: stats.pods_bound,
            pods_assumed: stats.pods_assumed,
            assumptions_lapsed: stats.assumptions_lapsed,
            ledger_faults: stats.ledger_faults,
            gangs_nominated: stats.gangs_nominated,
            nominations_expired: stats.nominations_expired,
            members_joined: stats.members_joined,
        }
    }
}

impl From<Snapshot> for StateJson {
    fn from(snapshot: Snapshot) -> Self {
        StateJson {
            stats: StatsJson::from(&snapshot.stats),
            preemptions: snapshot
                .preemptions
                .into_iter()
                .map(|p| PreemptionJson {
                    unit: p.unit,
                    planned_by: p.planned_by,
                    nodes: p.nodes,
                    waiting_on: p.waiting_on,
                    expires_in_ms: p.expires_in_ms,
                })
                .collect(),
            preemption_verdicts: snapshot.verdicts.into_iter().map(VerdictJson::from).collect(),
            nodes: snapshot
                .nodes
                .into_iter()
                .map(|node| NodeJson {
                    name: node.name,
                    product: node.product,
                    resource: node.resource,
                    gpus: node.gpus,
                    free: node.free,
                    held: node
                        .held
                        .into_iter()
                        .map(|held| HeldJson { holder: held.holder, pod: held.pod, gpus: held.gpus })
                        .collect(),
                })
                .collect(),
            gangs: snapshot
                .gangs
                .into_iter()
                .map(|gang| GangJson {
                    gang: gang.gang,
                    members: gang.members,
                    binding: gang.binding,
                    expires_in_ms: gang.expires_in_ms,
                    slots: gang
                        .slots
                        .into_iter()
                        .map(|slot| SlotJson {
                            role: slot.role,
                            node: slot.node,
                            gpus: slot.gpus,
                            pod: slot.pod,
                            at_bind: slot.at_bind,
                            bound: slot.bound,
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}
