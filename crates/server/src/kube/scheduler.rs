//! The secondary scheduler's Kubernetes side: watches pending pods with
//! `spec.schedulerName=<name>` (field selector), feeds them, every node and every bound pod's
//! requests into the core [`Scheduler`], runs its cycle while this replica leads, and carries
//! out the decisions: Bindings (all members of a gang concurrently, with
//! `topoplace.io/gpus`), deletes to undo a partial gang, `PodScheduled=False` conditions and
//! Events. GPUs are held in the extender's book, so `serve --scheduler` shares one ledger
//! between the extender, the gRPC API and this scheduler.
//!
//! Nothing is bound before the view has listed every node and every bound pod (the ledger is
//! rebuilt from their `topoplace.io/gpus` annotations) and before the Lease is held.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::watcher::{self, watcher, Event as WatchEvent};
use kube::runtime::WatchStreamExt;
use kube::Client;
use tokio::sync::Notify;

use super::{budget, node, KubeBinder, ViewHooks};
use crate::pod;
use crate::pod_group::PodGroups;
use crate::state::ServerState;
use topoplace_online::reservation::{PodIdentity, Ticket};
use topoplace_online::scheduler::{BindTicket, BoundPod, Decision, Finished, PendingPod, Scheduler, SchedulerConfig};

/// How often the queue is looked at when nothing wakes it (back-off expiries, timeouts).
const CYCLE_IDLE_MS: u64 = 200;

/// The running scheduler: shared by the watch tasks, the cycle loop and the bind tasks.
pub struct SchedulerRuntime {
    ext: Arc<ServerState>,
    core: Mutex<Scheduler>,
    binder: KubeBinder,
    wake: Notify,
    leading: tokio::sync::watch::Receiver<bool>,
    /// The PodGroup objects pods name, read once each.
    pod_groups: PodGroups,
    /// Pods whose spec could not be read, reported once.
    reported_invalid: Mutex<BTreeSet<String>>,
}

impl SchedulerRuntime {
    pub fn new(
        ext: Arc<ServerState>,
        client: Client,
        config: SchedulerConfig,
        leading: tokio::sync::watch::Receiver<bool>,
    ) -> Arc<Self> {
        let mut core = Scheduler::new(config);
        core.expect_budgets();
        Arc::new(SchedulerRuntime {
            ext,
            core: Mutex::new(core),
            pod_groups: PodGroups::new(client.clone()),
            binder: KubeBinder::new(client),
            wake: Notify::new(),
            leading,
            reported_invalid: Mutex::default(),
        })
    }

    fn core(&self) -> std::sync::MutexGuard<'_, Scheduler> {
        self.core.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Checks the core's invariants (tests).
    pub fn check(&self) -> Result<(), String> {
        self.core().check()
    }

    /// `status.disruptionsAllowed` of the PodDisruptionBudget `namespace/name` as the
    /// scheduler last saw it (what its preemption counts with), if it has seen it.
    pub fn disruptions_allowed(&self, key: &str) -> Option<i32> {
        self.core().budget(key).map(|b| b.disruptions_allowed)
    }

    pub fn pending_count(&self) -> usize {
        self.core().pending_count()
    }

    /// Watches pending pods of `scheduler_name` and runs the cycle loop, until the streams end.
    pub async fn run(self: Arc<Self>, client: Client, scheduler_name: String) {
        let budgets_task = self.clone().watch_budgets(client.clone());
        let watch_task = self.clone().watch_pending(client, scheduler_name);
        let cycle_task = self.clone().cycle_loop();
        tokio::join!(budgets_task, watch_task, cycle_task);
    }

    /// Watches every PodDisruptionBudget (`policy/v1`) for preemption; until the first list
    /// is in, nothing is preempted ([`Scheduler::expect_budgets`]).
    async fn watch_budgets(self: Arc<Self>, client: Client) {
        let api: Api<PodDisruptionBudget> = Api::all(client);
        let mut stream = watcher(api, watcher::Config::default()).default_backoff().boxed();
        let mut listing = Vec::new();
        while let Some(event) = stream.next().await {
            let event = match event {
                Ok(event) => event,
                Err(error) => {
                    tracing::warn!(%error, "PodDisruptionBudget watch (preemption waits for its list)");
                    continue;
                }
            };
            match event {
                WatchEvent::Apply(object) => {
                    if let Some(read) = budget::budget(&object) {
                        self.core().budget_applied(read);
                    }
                }
                WatchEvent::Delete(object) => {
                    if let Some(read) = budget::budget(&object) {
                        self.core().budget_deleted(&read.key());
                    }
                }
                WatchEvent::Init => listing.clear(),
                WatchEvent::InitApply(object) => listing.extend(budget::budget(&object)),
                WatchEvent::InitDone => self.core().budgets_listed(std::mem::take(&mut listing)),
            }
            self.wake.notify_one();
        }
    }

    async fn watch_pending(self: Arc<Self>, client: Client, scheduler_name: String) {
        let api: Api<Pod> = Api::all(client.clone());
        let selector =
            format!("spec.schedulerName={scheduler_name},spec.nodeName=,status.phase!=Succeeded,status.phase!=Failed");
        let mut stream = watcher(api, watcher::Config::default().fields(&selector)).default_backoff().boxed();
        let mut listing: Vec<PendingPod> = Vec::new();
        while let Some(event) = stream.next().await {
            let event = match event {
                Ok(event) => event,
                Err(error) => {
                    tracing::warn!(%error, "pending pod watch");
                    continue;
                }
            };
            match event {
                WatchEvent::Apply(pod) => {
                    if let Some(pending) = self.pending_of(&pod).await {
                        self.core().pending_applied(pending);
                    }
                }
                WatchEvent::Delete(pod) => {
                    if let Some(uid) = pod.metadata.uid.as_deref() {
                        self.core().pending_deleted(uid);
                    }
                }
                WatchEvent::Init => listing.clear(),
                WatchEvent::InitApply(pod) => {
                    if let Some(pending) = self.pending_of(&pod).await {
                        listing.push(pending);
                    }
                }
                WatchEvent::InitDone => self.core().pending_listed(std::mem::take(&mut listing)),
            }
            self.wake.notify_one();
        }
    }

    /// The pod in the core's terms; a pod that cannot be read (or whose upstream PodGroup
    /// cannot be) gets an Event saying why.
    async fn pending_of(&self, pod: &Pod) -> Option<PendingPod> {
        let group = match self.pod_groups.of_pod(pod).await {
            Ok(group) => group,
            Err(error) => {
                self.report_unreadable(pod, error.to_string()).await;
                return None;
            }
        };
        let read = pod::demand_sized(pod, group.as_ref()).and_then(|demand| {
            Ok(PendingPod {
                needs: pod::needs(pod)?,
                priority: pod::priority(pod),
                never_preempts: pod::never_preempts(pod),
                labels: pod.metadata.labels.clone().unwrap_or_default(),
                demand,
            })
        });
        match read {
            Ok(pending) => Some(pending),
            Err(error) => {
                self.report_unreadable(pod, error.to_string()).await;
                None
            }
        }
    }

    /// Leaves a pod unscheduled with `PodScheduled=False` and an Event saying why, once per pod.
    async fn report_unreadable(&self, pod: &Pod, message: String) {
        let Ok(identity) = pod::identity(pod) else { return };
        let first = self.reported_invalid.lock().unwrap_or_else(|p| p.into_inner()).insert(identity.uid.clone());
        if first {
            tracing::warn!(error = %message, "pod left unscheduled");
            let decision = Decision::NotScheduled {
                pods: vec![identity],
                reason: topoplace_online::scheduler::REASON_UNSCHEDULABLE,
                message,
            };
            self.carry_out(decision).await;
        }
    }

    async fn cycle_loop(self: Arc<Self>) {
        let mut leading = self.leading.clone();
        let mut publisher_alive = true;
        loop {
            let leadership_change = async {
                if publisher_alive {
                    leading.changed().await.is_err()
                } else {
                    std::future::pending().await
                }
            };
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(CYCLE_IDLE_MS)) => {}
                // Nobody publishes leadership any more (no election): it stays as it is.
                gone = leadership_change => publisher_alive = !gone,
            }
            if !*leading.borrow() || !self.ext.is_ready() {
                continue;
            }
            // On the book's worker thread: a cycle plans every gang it can.
            let runtime = self.clone();
            let cycle = self.ext.on_book(move |state| {
                let now = state.now_ms();
                let mut core = runtime.core();
                let decisions = state.with_book(|book| (core.cycle(book.as_mut(), now), Vec::new()));
                if core.more_due() {
                    // Stopped at its attempt limit: the next cycle starts right away, after
                    // whatever else queued for the book meanwhile.
                    runtime.wake.notify_one();
                }
                decisions
            });
            let decisions = match cycle.await {
                Ok(decisions) => decisions,
                Err(busy) => {
                    // The next wake-up or idle tick tries again.
                    tracing::warn!(%busy, "scheduling cycle skipped");
                    continue;
                }
            };
            for decision in decisions {
                let runtime = self.clone();
                tokio::spawn(async move { runtime.carry_out(decision).await });
            }
        }
    }

    async fn carry_out(&self, decision: Decision) {
        match decision {
            Decision::Bind { ticket, members } => {
                let outcomes = join_all(members.iter().map(|m| async move {
                    let gpus = (!m.gpus.is_empty()).then(|| pod::gpus_annotation(&m.gpus));
                    (
                        m.pod.clone(),
                        self.binder.bind_pod(&m.pod, &m.node, gpus).await.map_err(|error| error.to_string()),
                    )
                }))
                .await;
                let now = self.ext.now_ms();
                let finished = {
                    let mut core = self.core();
                    self.ext.with_book(|book| (core.finish(book.as_mut(), &ticket, &outcomes, now), Vec::new()))
                };
                self.wake.notify_one();
                match finished {
                    Finished::Bound { members } => {
                        let gang = match &ticket {
                            BindTicket::Book(Ticket::Leader { gang, .. }) => Some(format!(
                                ", leader of gang {gang}, bound ahead of its workers, whose GPUs are held"
                            )),
                            BindTicket::Book(ticket) => ticket.gang().map(|g| format!(", gang {g}")),
                            BindTicket::Plain(_) => None,
                        }
                        .unwrap_or_default();
                        join_all(members.iter().map(|m| {
                            let gpus = if m.gpus.is_empty() {
                                String::new()
                            } else {
                                format!(" (GPUs {})", pod::gpus_annotation(&m.gpus))
                            };
                            let message = format!("Successfully assigned {} to {}{gpus}{gang}", m.pod, m.node);
                            self.binder.record(&m.pod, "Normal", "Scheduled", message)
                        }))
                        .await;
                    }
                    Finished::RolledBack { delete, message, members } => {
                        tracing::warn!(%ticket, %message, "bind rolled back");
                        join_all(delete.iter().map(|pod| async move {
                            if let Err(error) = crate::binder::Binder::delete(&self.binder, pod).await {
                                tracing::warn!(%pod, %error, "undo: deleting a bound member failed");
                            }
                        }))
                        .await;
                        // Every member, and a leader bound ahead of them and deleted with them.
                        let told =
                            members.iter().chain(delete.iter().filter(|d| !members.iter().any(|m| m.uid == d.uid)));
                        join_all(
                            told.map(|pod| self.binder.record(pod, "Warning", "GangBindRolledBack", message.clone())),
                        )
                        .await;
                    }
                }
            }
            Decision::NotScheduled { pods, reason, message } => {
                let event_reason = if reason == topoplace_online::scheduler::REASON_UNSCHEDULABLE {
                    "FailedScheduling"
                } else {
                    reason
                };
                let message = &message;
                join_all(pods.iter().map(|pod| async move {
                    self.set_not_scheduled(pod, reason, message).await;
                    self.binder.record(pod, "Warning", event_reason, message.clone()).await;
                }))
                .await;
            }
            Decision::GangWaiting { pods, message } => {
                join_all(pods.iter().map(|pod| self.binder.record(pod, "Normal", "GangWaiting", message.clone())))
                    .await;
            }
            Decision::Preempt { pods, victims, nominated, message } => {
                self.preempt(&pods, &victims, &message).await;
                join_all(nominated.iter().map(|(pod, node)| self.set_nominated(pod, Some(node)))).await;
            }
            Decision::ClearNominated { pods } => {
                join_all(pods.iter().map(|pod| self.set_nominated(pod, None))).await;
            }
            Decision::Repair { gang, delete, message } => {
                if !self.still_half_bound(&delete).await {
                    tracing::info!(%gang, "repair skipped: the bound members are gone or were replaced");
                    return;
                }
                tracing::warn!(%gang, %message, "repairing a half-bound gang");
                let message = &message;
                join_all(delete.iter().map(|pod| async move {
                    self.binder.record(pod, "Warning", "GangRepair", message.clone()).await;
                    if let Err(error) = crate::binder::Binder::delete(&self.binder, pod).await {
                        tracing::warn!(%pod, %error, "repair: deleting a bound member failed");
                    }
                }))
                .await;
            }
        }
    }

    /// A preemption: every victim deleted (a delete with its uid as precondition: only that
    /// pod), with an Event on it and on the preemptor's pods, as kube-scheduler records them.
    async fn preempt(&self, pods: &[PodIdentity], victims: &[PodIdentity], message: &str) {
        tracing::info!(preemptor = %pods.first().map(ToString::to_string).unwrap_or_default(), %message, "preempting");
        let by = pods.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
        join_all(victims.iter().map(|victim| {
            let by = by.clone();
            async move {
                self.binder.record(victim, "Normal", "Preempted", format!("Preempted by {by}")).await;
                if let Err(error) = crate::binder::Binder::delete(&self.binder, victim).await {
                    tracing::warn!(%victim, %error, "preemption: deleting a victim failed");
                }
            }
        }))
        .await;
        join_all(pods.iter().map(|pod| self.binder.record(pod, "Normal", "Preempting", message.to_string()))).await;
    }

    /// A repair deletes only pods that are still the ones seen bound (same uid, still bound).
    async fn still_half_bound(&self, bound: &[PodIdentity]) -> bool {
        for pod in bound {
            let api: Api<Pod> = Api::namespaced(self.binder.client().clone(), &pod.namespace);
            match api.get(&pod.name).await {
                Ok(current)
                    if current.metadata.uid.as_deref() == Some(pod.uid.as_str())
                        && current.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some() => {}
                _ => return false,
            }
        }
        true
    }

    /// `status.nominatedNodeName` on a preemptor, as kube-scheduler sets it once it has
    /// preempted (`pkg/scheduler/scheduler.go`, `updatePod`): where the pod goes once its
    /// victims have left, for tools and other schedulers to see; `None` clears it (a null in
    /// a strategic merge patch deletes the field) when the preemption is given up. A patch of
    /// the status subresource carrying the pod's uid, so that the API server refuses it for
    /// another pod of that name; a failure is logged (the plan is held in the book regardless).
    async fn set_nominated(&self, target: &PodIdentity, node: Option<&String>) {
        let api: Api<Pod> = Api::namespaced(self.binder.client().clone(), &target.namespace);
        let patch = serde_json::json!({"metadata": {"uid": target.uid}, "status": {"nominatedNodeName": node}});
        if let Err(error) = api.patch_status(&target.name, &PatchParams::default(), &Patch::Strategic(&patch)).await {
            tracing::warn!(pod = %target, ?node, %error, "setting status.nominatedNodeName failed");
        }
    }

    /// `PodScheduled=False` through the status subresource (a strategic merge patch merges
    /// conditions by type, leaving the others alone), with the pod's uid as in
    /// [`SchedulerRuntime::set_nominated`].
    async fn set_not_scheduled(&self, target: &PodIdentity, reason: &str, message: &str) {
        let api: Api<Pod> = Api::namespaced(self.binder.client().clone(), &target.namespace);
        let patch = serde_json::json!({
            "metadata": {"uid": target.uid},
            "status": {"conditions": [{
                "type": "PodScheduled",
                "status": "False",
                "reason": reason,
                "message": message,
                "lastTransitionTime": k8s_openapi::jiff::Timestamp::now().to_string(),
            }]}
        });
        if let Err(error) = api.patch_status(&target.name, &PatchParams::default(), &Patch::Strategic(&patch)).await {
            tracing::warn!(pod = %target, %error, "setting PodScheduled=False failed");
        }
    }
}

fn bound_pod(pod: &Pod) -> Option<BoundPod> {
    let node = pod.spec.as_ref()?.node_name.clone()?;
    let identity = pod::identity(pod).ok()?;
    let requests = match pod::requests(pod) {
        Ok(requests) => requests,
        Err(error) => {
            tracing::warn!(%error, "a bound pod's requests could not be read; counted as none");
            Default::default()
        }
    };
    let gang = pod::gang_of(pod, &identity.namespace).ok().flatten().map(|g| g.key);
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    Some(BoundPod { pod: identity, node, requests, gang, priority: pod::priority(pod), labels })
}

impl ViewHooks for SchedulerRuntime {
    fn nodes_listed(&self, nodes: &[Node]) {
        self.core().nodes_listed(nodes.iter().map(node::facts).collect());
        self.wake.notify_one();
    }

    fn node_applied(&self, node: &Node) {
        self.core().node_applied(node::facts(node));
        self.wake.notify_one();
    }

    fn node_deleted(&self, name: &str) {
        self.core().node_deleted(name);
    }

    fn bound_listed(&self, pods: &[Pod]) {
        let now = self.ext.now_ms();
        self.core().bound_listed(pods.iter().filter_map(bound_pod).collect(), now);
        self.wake.notify_one();
    }

    fn bound_applied(&self, pod: &Pod) {
        if let Some(bound) = bound_pod(pod) {
            self.core().bound_applied(bound);
        }
    }

    fn bound_deleted(&self, pod: &Pod) {
        if let Some(uid) = pod.metadata.uid.as_deref() {
            self.core().bound_deleted(uid);
            self.wake.notify_one();
        }
    }
}
