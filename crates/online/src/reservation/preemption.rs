//! kube-scheduler's preempt verb, for single pods and for gangs.
//!
//! kube-scheduler preempts for one pod at a time: it proposes candidate nodes, each with the
//! lower-priority pods it would evict there, evicts on the one node it picks and nominates
//! the pod to it (`pkg/scheduler/framework/plugins/defaultpreemption`, v1.20). A gang wider
//! than one host needs victims gone on several nodes, so the book judges a gang member's
//! candidates *together*: with the victims of every acceptable candidate gone, the whole gang
//! is planned, the candidates the plan needs are kept, and the plan is recorded as a
//! [`Nomination`]. The gang's other members then preempt on the plan's other nodes (their
//! preempt keeps only those), the GPUs the plan needs are held for it as the victims leave,
//! and once they are all free the nomination becomes the gang's reservation, so every
//! member's filter passes on its planned node.
//!
//! A victim never leaves part of another gang behind: a victim whose bound gang has other
//! members on the same node brings them along (they are added to that candidate's victims),
//! and a candidate whose victim's gang runs on another node too, or is still assembling, is
//! dropped, since kube-scheduler evicts on one node only.

use super::running::place_joining;
use super::*;

/// How long a preemption's plan ([`Nomination`]) waits for its victims to leave, in ms, from
/// the preempt call that made it. kube-scheduler evicts with the victims' own grace period,
/// 30 s unless their pods say otherwise (`terminationGracePeriodSeconds`); the members of the
/// gang preempt in turn, one per scheduling cycle and each after a back-off. Past this the
/// GPUs held for it are given back and the gang is planned afresh at its next filter.
pub const NOMINATION_TTL_MS_DEFAULT: u64 = 120_000;

/// How long a preemption's plan made through the extender is kept, in ms from when it was
/// made, while a victim of it is still terminating (the pod watch saw its deletion, and it is
/// still bound: a termination grace longer than [`BookConfig::nomination_ttl_ms`]): its time
/// is renewed at each expiry up to this. The secondary scheduler's limit is the same
/// (`PREEMPTION_WAIT_MAX_MS`).
pub const NOMINATION_WAIT_MAX_MS: u64 = 600_000;

/// A gang's plan made by preemption: its members' slots, on GPUs that preemption victims may
/// still hold. What of them is free is held by [`Holder::Nominated`]; when all of it is, the
/// nomination becomes the gang's reservation ([`Book::settle_nominations`]).
#[derive(Debug, Clone)]
pub(super) struct Nomination {
    pub planned: Planned,
    pub slots: Vec<Slot>,
    pub expires_at_ms: u64,
    pub planned_by: PodIdentity,
    pub leader_first: bool,
    /// The victims' uids kept for it through the extender (its members' preempt calls), and
    /// when it was made: it is renewed while one of them terminates, up to
    /// [`NOMINATION_WAIT_MAX_MS`] ([`Book::settle_nominations`]).
    pub victims: BTreeSet<String>,
    pub made_ms: u64,
}

/// How many units' preemption verdicts the book keeps for explaining them (`/state`, gRPC
/// `ClusterState`); the oldest go first.
pub const PREEMPTION_VERDICTS_MAX: usize = 128;

/// Why a unit did or did not preempt, the last time it tried: kept by the book for `/state`
/// and gRPC `ClusterState` ([`Book::record_preemption`]).
#[derive(Debug, Clone, PartialEq)]
pub struct PreemptionVerdict {
    /// The gang's key, or `pod:{uid}` for a single pod.
    pub unit: String,
    /// The pod that asked (the extender's preempt call, or the unit's first pod).
    pub preemptor: PodIdentity,
    /// When, in the book's ms.
    pub at_ms: u64,
    pub outcome: PreemptionOutcome,
}

/// What a preemption verdict was.
#[derive(Debug, Clone, PartialEq)]
pub enum PreemptionOutcome {
    /// Victims chosen on `nodes` (the secondary scheduler evicts them): the pods to evict
    /// (`namespace/name`), and the PodDisruptionBudgets the eviction breaks (`namespace/name`).
    Preempted { nodes: Vec<String>, victims: Vec<String>, budgets_broken: Vec<String> },
    /// kube-scheduler's preempt call through the extender: the candidate `nodes` kept and
    /// their victims (`namespace/name`, or a uid the book does not know). kube-scheduler
    /// evicts on one of them per call and counts PodDisruptionBudgets itself.
    CandidatesKept { nodes: Vec<String>, victims: Vec<String> },
    /// Nothing evicted, and why: no set of victims frees enough inside its scope, only pods
    /// of its priority or higher are bound, its policy is `Never`, ….
    Declined { why: String },
}

/// The book's answer to a preempt call.
#[derive(Debug, Clone, PartialEq)]
pub struct PreemptAnswer {
    /// Per candidate, in order: `None` to drop it, or the victims to evict there (the
    /// candidate's own, plus the rest of a victim's gang on that node).
    pub keep: Vec<Option<Vec<String>>>,
    /// Why nothing was kept, when nothing was.
    pub why: Option<String>,
}

impl PreemptAnswer {
    fn none(count: usize, why: String) -> Self {
        PreemptAnswer { keep: vec![None; count], why: Some(why) }
    }
}

impl Book {
    /// kube-scheduler's preempt for `demand` over its `candidates`. A single pod: each
    /// candidate kept where its eviction lets the pod fit on that node. A member with a
    /// planned slot: its planned node only (the GPUs are held; only kube-scheduler's own
    /// resources are short). A member of a gang that runs: where it would join. A member of a
    /// gang with a [`Nomination`]: the nomination's nodes whose victims have not left yet,
    /// where the proposed victims free what is planned. Any other gang member: the candidates
    /// judged together (see the module doc), and the plan recorded. Errors: the pod's own
    /// description does not read ([`BookError::Demand`], [`BookError::RoleMismatch`]).
    pub fn preempt(
        &mut self,
        demand: &PodDemand,
        candidates: &[PreemptCandidate],
        now_ms: u64,
    ) -> Result<PreemptAnswer, BookError> {
        let answer = self.preempt_answer(demand, candidates, now_ms);
        let unit = demand.gang.as_ref().map_or_else(|| format!("pod:{}", demand.pod.uid), |g| g.key.clone());
        let outcome = match &answer {
            Ok(answer) if answer.keep.iter().any(Option::is_some) => {
                let kept = || candidates.iter().zip(&answer.keep).filter_map(|(c, k)| Some((c, k.as_ref()?)));
                PreemptionOutcome::CandidatesKept {
                    nodes: kept().map(|(c, _)| self.cluster.host(c.host).name.clone()).collect(),
                    victims: kept()
                        .flat_map(|(_, victims)| victims.iter())
                        .map(|uid| self.bound.get(uid).map_or_else(|| uid.clone(), |b| b.pod.to_string()))
                        .collect(),
                }
            }
            Ok(answer) => PreemptionOutcome::Declined {
                why: answer.why.clone().unwrap_or_else(|| "no candidate was proposed".into()),
            },
            Err(error) => PreemptionOutcome::Declined { why: error.to_string() },
        };
        self.record_preemption(PreemptionVerdict { unit, preemptor: demand.pod.clone(), at_ms: now_ms, outcome });
        answer
    }

    /// Keeps `verdict` as its unit's latest (an earlier one of that unit is dropped). Past
    /// [`PREEMPTION_VERDICTS_MAX`] the oldest verdict that evicted nothing goes first, so a
    /// stream of units that cannot preempt does not push out the preemptions that happened.
    pub fn record_preemption(&mut self, verdict: PreemptionVerdict) {
        self.verdicts.retain(|v| v.unit != verdict.unit);
        while self.verdicts.len() >= PREEMPTION_VERDICTS_MAX {
            let declined = self.verdicts.iter().position(|v| matches!(v.outcome, PreemptionOutcome::Declined { .. }));
            self.verdicts.remove(declined.unwrap_or(0));
        }
        self.verdicts.push_back(verdict);
    }

    /// The latest preemption verdict of unit `unit` (a gang's key or `pod:{uid}`), if kept.
    pub fn preemption_verdict(&self, unit: &str) -> Option<&PreemptionVerdict> {
        self.verdicts.iter().find(|v| v.unit == unit)
    }

    /// [`Book::preempt`] without recording its verdict.
    fn preempt_answer(
        &mut self,
        demand: &PodDemand,
        candidates: &[PreemptCandidate],
        now_ms: u64,
    ) -> Result<PreemptAnswer, BookError> {
        let count = candidates.len();
        let (shape, own) = match demand.replica()? {
            Some((replica, own)) if replica.roles[own].gang.is_none() => {
                return Ok(PreemptAnswer::none(count, "a role without GPUs frees nothing by evicting GPU pods".into()))
            }
            Some((replica, own)) => (Planned::Replica(Box::new(replica)), own),
            None => (Planned::Gang(demand.gang()?), 0),
        };
        self.settle_nominations(now_ms);
        // Each candidate's victims, with whole gangs, or why it is dropped.
        let whole: Vec<Result<Vec<String>, String>> =
            candidates.iter().map(|c| self.whole_gang_victims(c.host, &c.victims)).collect();
        let Some(membership) = demand.gang.clone() else {
            let Planned::Gang(gang) = &shape else { return Ok(PreemptAnswer::none(count, "no gang".into())) };
            let keep = self.keep_each(demand, candidates, &whole, |planner, trial, host| {
                matches!(planner.fit_hosts(trial, gang, &[host]).first(), Some(None))
            });
            return Ok(self.answer(keep, &whole, "the pod does not fit on any candidate with its victims gone"));
        };
        let key = membership.key.clone();
        let planned = self.slot_of(&key, &demand.pod.uid).and_then(|s| self.gangs.get(&key).map(|g| g.slots[s].host));
        if let Some(host) = planned {
            let keep = candidates
                .iter()
                .zip(&whole)
                .map(|(c, v)| (c.host == host).then(|| v.clone().ok()).flatten())
                .collect();
            let node = &self.cluster.host(host).name;
            return Ok(self.answer(keep, &whole, &format!("its GPUs are held on `{node}`, which is no candidate")));
        }
        if self.nominations.contains_key(&key) {
            let answer = self.preempt_nominated(&key, candidates, whole);
            if let Some(nomination) = self.nominations.get_mut(&key) {
                nomination.victims.extend(answer.keep.iter().flatten().flatten().cloned());
            }
            return Ok(answer);
        }
        if matches!(membership.order, BindOrder::LeaderFirst { leader: true }) && self.runs_unreserved(&key) {
            // A new leader waits for its old group to leave (its filter says so): no eviction.
            return Ok(PreemptAnswer::none(count, format!("gang `{key}`: its new leader waits for its old members")));
        }
        if self.runs_unreserved(&key) {
            let Some((one, scopes)) = self.joining_shape(demand, &membership, &shape, own)? else {
                return Ok(PreemptAnswer::none(count, "a role without GPUs frees nothing".into()));
            };
            if let Some(reason) = self.join_at_maximum(&membership, &demand.pod.uid) {
                // Evicting others makes no room under its own gang's maximum.
                return Ok(PreemptAnswer::none(count, reason));
            }
            let siblings = self.running_hosts(&key);
            let open = self.open_hosts();
            let keep = self.keep_each(demand, candidates, &whole, |planner, trial, host| {
                place_joining(planner, trial, &one, &scopes, &siblings, &open).is_ok_and(|j| j.host == host)
            });
            return Ok(self.answer(keep, &whole, "the member does not join its running gang on any candidate"));
        }
        if self.gangs.contains_key(&key) {
            // Reserved, and this pod has no slot: the gang is whole without it.
            return Ok(PreemptAnswer::none(count, format!("gang `{key}` is reserved and has no slot for this pod")));
        }
        Ok(self.preempt_together(demand, &key, shape, candidates, whole, now_ms))
    }

    /// Each candidate judged alone: kept (with its whole-gang victims) when `fits` says the
    /// pod goes to the candidate's host on a copy of the ledger with those victims gone.
    fn keep_each(
        &mut self,
        demand: &PodDemand,
        candidates: &[PreemptCandidate],
        whole: &[Result<Vec<String>, String>],
        fits: impl Fn(&mut Planner, &Ledger<Holder>, HostId) -> bool,
    ) -> Vec<Option<Vec<String>>> {
        candidates
            .iter()
            .zip(whole)
            .map(|(candidate, victims)| {
                let victims = victims.as_ref().ok()?;
                let trial = self.trial_without(victims, &demand.pod.uid);
                self.with_planner(|planner, _| fits(planner, &trial, candidate.host)).then(|| victims.clone())
            })
            .collect()
    }

    /// A gang with nothing reserved: every acceptable candidate's victims gone at once, the
    /// whole gang planned; the candidates whose victims the plan needs are kept and the plan
    /// is recorded as the gang's [`Nomination`].
    fn preempt_together(
        &mut self,
        demand: &PodDemand,
        key: &str,
        shape: Planned,
        candidates: &[PreemptCandidate],
        whole: Vec<Result<Vec<String>, String>>,
        now_ms: u64,
    ) -> PreemptAnswer {
        let count = candidates.len();
        // The acceptable candidates, fewest victims first: the plan disturbs as few pods as it
        // can. The shortest prefix of them whose victims gone lets the gang fit is found by
        // bisection (more victims gone never makes it fit less), so a cluster of thousands
        // of candidates costs a dozen plans.
        let mut order: Vec<usize> = (0..count).filter(|&i| whole[i].is_ok()).collect();
        order.sort_by_key(|&i| (whole[i].as_ref().map_or(usize::MAX, Vec::len), candidates[i].host));
        if order.is_empty() {
            return self.answer(vec![None; count], &whole, "no candidate");
        }
        let open = self.open_hosts();
        let victims_of = |prefix: usize| -> Vec<String> {
            order[..prefix].iter().filter_map(|&i| whole[i].as_ref().ok()).flatten().cloned().collect()
        };
        let plan_with = |book: &mut Book, prefix: usize| -> Result<Vec<Slot>, String> {
            let trial = book.trial_without(&victims_of(prefix), &demand.pod.uid);
            book.with_planner(|planner, _| match &shape {
                Planned::Gang(gang) => planner
                    .place(&trial, PlaceRequest::new(gang).within(Some(&open)))
                    .map(|p| p.members.iter().map(|m| Slot::planned(m.host, m.gpus)).collect::<Vec<_>>())
                    .map_err(|unplaced| unplaced.reason),
                Planned::Replica(replica) => planner
                    .place_replica(&trial, replica, &SolverChoice::Greedy, Some(&open))
                    .map(|placement| replica_slots(replica, &placement))
                    .map_err(|unplaced| unplaced.reason),
            })
        };
        let slots = match plan_with(self, order.len()) {
            Ok(mut slots) => {
                let (mut low, mut high) = (0, order.len());
                // Invariant: the prefix `high` fits (its plan in `slots`); `low` is not known to.
                while low + 1 < high {
                    let mid = (low + high) / 2;
                    match plan_with(self, mid) {
                        Ok(fits) => (high, slots) = (mid, fits),
                        Err(_) => low = mid,
                    }
                }
                slots
            }
            Err(why) => {
                let reason = format!(
                    "gang `{key}` does not fit even with the victims of every candidate gone ({} pods on {} nodes): {why}",
                    victims_of(order.len()).len(),
                    order.len()
                );
                return self.answer(vec![None; count], &whole, &reason);
            }
        };
        // The nodes where the plan needs GPUs that are not free now: its victims'.
        let needs_victims = |host: HostId| {
            let free = self.ledger.free(host);
            slots.iter().any(|s| s.host == host && s.gpus & !free != 0)
        };
        let keep: Vec<Option<Vec<String>>> = candidates
            .iter()
            .zip(&whole)
            .map(|(c, v)| v.as_ref().ok().filter(|_| needs_victims(c.host)).cloned())
            .collect();
        if keep.iter().all(Option::is_none) {
            let reason = format!("gang `{key}`'s plan with the victims gone needs none of them");
            return self.answer(keep, &whole, &reason);
        }
        // A namespace past its GPUs for members not bound yet gets nobody evicted: the
        // nomination would hold its plan's GPUs and become its reservation.
        let asked = slots.iter().map(|slot| slot.gpus.count_ones()).sum();
        if let Err(error) = self.check_namespace_room(&demand.pod, asked) {
            return self.answer(vec![None; count], &whole, &error.to_string());
        }
        let nomination = Nomination {
            planned: shape,
            slots,
            expires_at_ms: now_ms.saturating_add(self.config.nomination_ttl_ms),
            planned_by: demand.pod.clone(),
            leader_first: matches!(demand.gang.as_ref().map(|m| m.order), Some(BindOrder::LeaderFirst { .. })),
            victims: keep.iter().flatten().flatten().cloned().collect(),
            made_ms: now_ms,
        };
        self.nominations.insert(key.to_string(), nomination);
        self.stats.gangs_nominated += 1;
        self.hold_nominated(key);
        PreemptAnswer { keep, why: None }
    }

    /// A member of a gang with a [`Nomination`]: the candidates on the nomination's nodes
    /// whose planned GPUs are not all held yet, where the proposed victims free them.
    fn preempt_nominated(
        &self,
        key: &str,
        candidates: &[PreemptCandidate],
        whole: Vec<Result<Vec<String>, String>>,
    ) -> PreemptAnswer {
        let Some(nomination) = self.nominations.get(key) else {
            return PreemptAnswer::none(candidates.len(), format!("gang `{key}` has no nomination"));
        };
        let holder = Holder::Nominated(key.to_string());
        let held = self.ledger.holding(&holder).cloned().unwrap_or_default();
        let keep = candidates
            .iter()
            .zip(&whole)
            .map(|(candidate, victims)| {
                let victims = victims.as_ref().ok()?;
                let host = candidate.host;
                let wanted = nomination.slots.iter().filter(|s| s.host == host).fold(0, |m, s| m | s.gpus);
                let ours = held.iter().filter(|&&(h, _)| h == host).fold(0, |m, &(_, g)| m | g);
                if wanted == 0 || wanted & !ours == 0 {
                    // Not a node of the plan, or all it needs there is held already.
                    return None;
                }
                let freed = victims
                    .iter()
                    .filter_map(|uid| self.bound.get(uid))
                    .filter(|b| self.bound_host(b) == Some(host))
                    .fold(0, |m, b| m | b.gpus);
                let assumed = victims
                    .iter()
                    .filter_map(|uid| self.assumed.get(uid))
                    .filter(|a| a.host == host)
                    .fold(0, |m, a| m | a.gpus);
                let available = self.ledger.free(host) | ours | freed | assumed;
                (wanted & !available == 0).then(|| victims.clone())
            })
            .collect();
        let nodes: Vec<&str> =
            self.nomination_pending(key).into_iter().map(|h| self.cluster.host(h).name.as_str()).collect();
        let reason = format!(
            "gang `{key}` is nominated by an earlier preemption; its victims must leave node(s) {} and no candidate's \
             victims free what it needs there",
            nodes.join(", ")
        );
        self.answer(keep, &whole, &reason)
    }

    /// `keep` with `why` when nothing is kept: the first candidate's reason for not taking
    /// whole gangs if every candidate failed that way, else `fallback`.
    fn answer(
        &self,
        keep: Vec<Option<Vec<String>>>,
        whole: &[Result<Vec<String>, String>],
        fallback: &str,
    ) -> PreemptAnswer {
        let why = if keep.iter().any(Option::is_some) {
            None
        } else if !whole.is_empty() && whole.iter().all(|w| w.is_err()) {
            whole.iter().find_map(|w| w.as_ref().err().cloned())
        } else {
            Some(fallback.to_string())
        };
        PreemptAnswer { keep, why }
    }

    /// A copy of the ledger with `victims` gone: their pods' GPUs, their assumptions, and the
    /// preemptor's own assumption (it would use those GPUs) given back.
    fn trial_without(&self, victims: &[String], preemptor: &str) -> Ledger<Holder> {
        let mut trial = self.ledger.clone();
        for uid in victims {
            // A victim that holds nothing frees nothing.
            if self.bound.contains_key(uid) && trial.holding(&pod_holder(uid)).is_some() {
                let _ = trial.release(&pod_holder(uid));
            }
        }
        for uid in victims.iter().map(String::as_str).chain(std::iter::once(preemptor)) {
            let holder = Holder::Assumed(uid.to_string());
            if self.assumed.contains_key(uid) && trial.holding(&holder).is_some() {
                let _ = trial.release(&holder);
            }
        }
        // What other preemptions' plans wait for stays theirs, though its pods are victims
        // here too: two plans never count on the same GPUs.
        for (key, nomination) in &self.nominations {
            let request: Holding = merge_by_host(nomination.slots.iter().map(|s| (s.host, s.gpus)))
                .into_iter()
                .map(|(host, mask)| (host, mask & trial.free(host)))
                .filter(|&(_, mask)| mask != 0)
                .collect();
            if !request.is_empty() {
                let _ = trial.reserve(&Holder::Nominated(format!("{key} (pending)")), &request);
            }
        }
        trial
    }

    /// `victims` on `host` with whole gangs: a victim's bound gang's other members on `host`
    /// are added; `Err` (why) when one of its members runs on another node, or its gang is
    /// still reserved with a member bound ahead (part of it).
    fn whole_gang_victims(&self, host: HostId, victims: &[String]) -> Result<Vec<String>, String> {
        let mut all = victims.to_vec();
        let node = &self.cluster.host(host).name;
        for uid in victims {
            let Some(bound) = self.bound.get(uid) else { continue };
            let Some(gang) = &bound.gang else { continue };
            if self.gangs.contains_key(gang) {
                return Err(format!(
                    "victim {} is part of gang `{gang}`, which has a reservation still open (members bound ahead, or \
                     joining it): evicting it would leave part of that gang",
                    bound.pod
                ));
            }
            for (other, member) in self.bound.iter().filter(|(_, b)| b.gang.as_ref() == Some(gang)) {
                if member.node != *node {
                    return Err(format!(
                        "victim {} is part of gang `{gang}`, whose member {} runs on node `{}`: kube-scheduler evicts \
                         on one node, so that gang would be left in part",
                        bound.pod, member.pod, member.node
                    ));
                }
                if !all.contains(other) {
                    all.push(other.clone());
                }
            }
        }
        Ok(all)
    }

    /// Holds for each nomination what of its planned GPUs is free (what victims gave back
    /// since), under [`Holder::Nominated`]: so nothing else takes them while the rest leave.
    pub(super) fn hold_nominated_all(&mut self) {
        let keys: Vec<String> = self.nominations.keys().cloned().collect();
        for key in keys {
            self.hold_nominated(&key);
        }
    }

    /// [`Book::hold_nominated_all`] for one nomination.
    pub(super) fn hold_nominated(&mut self, key: &str) {
        let Some(nomination) = self.nominations.get(key) else { return };
        let holder = Holder::Nominated(key.to_string());
        let wanted = merge_by_host(nomination.slots.iter().map(|s| (s.host, s.gpus)));
        let held = self.ledger.holding(&holder).cloned().unwrap_or_default();
        let ours = |host: HostId| held.iter().filter(|&&(h, _)| h == host).fold(0, |m, &(_, g)| m | g);
        let request: Holding = wanted
            .iter()
            .map(|&(host, mask)| (host, mask & (self.ledger.free(host) | ours(host))))
            .filter(|&(_, mask)| mask != 0)
            .collect();
        if request == held {
            return;
        }
        if !held.is_empty() {
            if let Err(error) = self.ledger.release(&holder) {
                self.ledger_fault("growing a nomination's held GPUs", error);
                return;
            }
        }
        if !request.is_empty() {
            if let Err(error) = self.ledger.reserve(&holder, &request) {
                self.ledger_fault("holding a nomination's free GPUs", error);
            }
        }
    }

    /// The hosts of gang `key`'s nomination where some planned GPU is not held for it yet.
    pub(super) fn nomination_pending(&self, key: &str) -> Vec<HostId> {
        let Some(nomination) = self.nominations.get(key) else { return Vec::new() };
        let held = self.ledger.holding(&Holder::Nominated(key.to_string())).cloned().unwrap_or_default();
        let mut pending: Vec<HostId> = merge_by_host(nomination.slots.iter().map(|s| (s.host, s.gpus)))
            .into_iter()
            .filter(|&(host, mask)| {
                let ours = held.iter().filter(|&&(h, _)| h == host).fold(0, |m, &(_, g)| m | g);
                mask & !ours != 0
            })
            .map(|(host, _)| host)
            .collect();
        pending.dedup();
        pending
    }

    /// Ends nominations whose time ran out (their held GPUs given back) and turns those whose
    /// GPUs are all held into their gang's reservation (a fresh
    /// [`BookConfig::reservation_ttl_ms`]), so the members' filters pass on the plan.
    pub(super) fn settle_nominations(&mut self, now_ms: u64) {
        self.hold_nominated_all();
        let keys: Vec<String> = self.nominations.keys().cloned().collect();
        for key in keys {
            let complete = self.nomination_pending(&key).is_empty();
            let due = self.nominations.get(&key).is_some_and(|n| n.expires_at_ms <= now_ms);
            if !complete && !due {
                continue;
            }
            let ttl = self.config.nomination_ttl_ms;
            let (bound, terminating) = (&self.bound, &self.terminating);
            if let Some(nomination) = self.nominations.get_mut(&key).filter(|_| !complete) {
                let leaving = nomination.victims.iter().any(|v| terminating.contains(v) && bound.contains_key(v));
                if leaving && now_ms < nomination.made_ms.saturating_add(NOMINATION_WAIT_MAX_MS) {
                    // A victim is still terminating (a long grace period): keep waiting for it.
                    nomination.expires_at_ms = now_ms.saturating_add(ttl);
                    continue;
                }
            }
            let Some(nomination) = self.drop_nomination(&key) else { continue };
            if !complete {
                self.stats.nominations_expired += 1;
                continue;
            }
            if self.gangs.contains_key(&key) {
                continue;
            }
            let holding = merge_by_host(nomination.slots.iter().map(|s| (s.host, s.gpus)));
            if let Err(error) = self.ledger.reserve(&gang_holder(&key), &holding) {
                self.ledger_fault("turning a nomination into its gang's reservation", error);
                continue;
            }
            self.gangs.insert(
                key,
                GangReservation {
                    planned: nomination.planned,
                    slots: nomination.slots,
                    expires_at_ms: now_ms.saturating_add(self.config.reservation_ttl_ms),
                    binding: false,
                    origin: None,
                    first_held_ms: None,
                    planned_by: Some(nomination.planned_by),
                    leader_first: nomination.leader_first,
                    joining: false,
                    from_preemption: true,
                },
            );
            self.stats.gangs_reserved += 1;
        }
    }

    /// The GPUs the nominations plan on `host`, held or not (for tests).
    #[cfg(test)]
    pub(super) fn nomination_needs(&self, host: HostId) -> u32 {
        self.nominations
            .values()
            .flat_map(|n| n.slots.iter())
            .filter(|s| s.host == host)
            .map(|s| s.gpus.count_ones())
            .sum()
    }

    /// Removes gang `key`'s nomination and gives back what it held.
    pub(super) fn drop_nomination(&mut self, key: &str) -> Option<Nomination> {
        let nomination = self.nominations.remove(key)?;
        let holder = Holder::Nominated(key.to_string());
        if self.ledger.holding(&holder).is_some() {
            if let Err(error) = self.ledger.release(&holder) {
                self.ledger_fault("ending a nomination", error);
            }
        }
        Some(nomination)
    }
}

/// The secondary scheduler's side of preemption: it chooses the victims itself and deletes
/// them; the book tries plans with victims gone and keeps the chosen one as a [`Nomination`].
impl Book {
    /// `planned` placed on the hosts of `allowed` against a copy of the ledger from which the
    /// GPUs of `victims` (uids of bound pods; others free nothing) are given back: its slots
    /// (role, host, GPUs; a gang's in member order), or why it does not fit. Holds nothing.
    pub fn plan_without(
        &mut self,
        planned: &Planned,
        victims: &[String],
        allowed: &[bool],
    ) -> Result<Vec<RoleSlot>, String> {
        let trial = self.trial_without(victims, "");
        self.with_planner(|planner, _| match planned {
            Planned::Gang(gang) => planner
                .place(&trial, PlaceRequest::new(gang).within(Some(allowed)))
                .map(|p| p.members.iter().map(|m| (0, m.host, m.gpus)).collect())
                .map_err(|unplaced| unplaced.reason),
            Planned::Replica(replica) => planner
                .place_replica(&trial, replica, &SolverChoice::Greedy, Some(allowed))
                .map(|placement| replica_slots(replica, &placement).iter().map(|s| (s.role, s.host, s.gpus)).collect())
                .map_err(|unplaced| unplaced.reason),
        })
    }

    /// Pods joining their running gang (`demands`, in order) placed as they join
    /// ([`Book::hold_joining_pod`]: inside the gang's scope, nearest its members) on the
    /// hosts of `allowed`, against a copy of the ledger without the GPUs of `victims` (uids of
    /// bound pods), each after the ones before it, as many as fit in order, up to the gang's
    /// maximum ([`Book::join_at_maximum`], the ones before counted): the shape of the plan
    /// (one member per joiner placed, of the first one's shape, for the nomination's record)
    /// and, per joiner placed, its uid and slot (role 0, host, GPUs). Pods without GPUs are
    /// skipped (they hold no GPUs). Holds nothing. Errors: why the first one does not join
    /// (no room in its scope, the maximum, a shape unlike the gang's, a role without GPUs).
    pub fn plan_joins_without(
        &mut self,
        demands: &[&PodDemand],
        victims: &[String],
        allowed: &[bool],
    ) -> Result<(Planned, Vec<(String, RoleSlot)>), String> {
        let mut trial = self.trial_without(victims, "");
        let mut placed: Vec<(String, RoleSlot)> = Vec::with_capacity(demands.len());
        let mut shape: Option<Gang> = None;
        let mut first_failure: Option<String> = None;
        for demand in demands.iter().filter(|d| d.gpus > 0) {
            let outcome = self.plan_one_join(demand, &mut trial, allowed, placed.len());
            match outcome {
                Ok((one, slot)) => {
                    placed.push((demand.pod.uid.clone(), slot));
                    shape.get_or_insert(one);
                }
                Err(why) => {
                    first_failure.get_or_insert(why);
                    break;
                }
            }
        }
        let Some(mut shape) = shape else {
            return Err(first_failure.unwrap_or_else(|| "its pods take no GPUs".into()));
        };
        shape.members = placed.len() as u32;
        Ok((Planned::Gang(shape), placed))
    }

    /// One joiner of [`Book::plan_joins_without`] on `trial` (where `before` joiners are
    /// placed already): its one-member shape and slot, taken on `trial`.
    fn plan_one_join(
        &mut self,
        demand: &PodDemand,
        trial: &mut Ledger<Holder>,
        allowed: &[bool],
        before: usize,
    ) -> Result<(Gang, RoleSlot), String> {
        let Some(membership) = demand.gang.clone() else {
            return Err(format!("pod {} belongs to no gang", demand.pod));
        };
        let (ours, own) = match demand.replica().map_err(|e| e.to_string())? {
            Some((replica, own)) => (Planned::Replica(Box::new(replica)), own),
            None => (Planned::Gang(demand.gang().map_err(|e| e.to_string())?), 0),
        };
        let Some((one, scopes)) = self.joining_shape(demand, &membership, &ours, own).map_err(|e| e.to_string())?
        else {
            return Err(format!("pod {} asks GPUs in a role without GPUs", demand.pod));
        };
        if let Some(reason) = self.join_at_maximum_with(&membership, &demand.pod.uid, before) {
            return Err(reason);
        }
        let siblings = self.running_hosts(&membership.key);
        let joined =
            self.with_planner(|planner, _| place_joining(planner, trial, &one, &scopes, &siblings, allowed))?;
        let holder = Holder::Nominated(format!("joining trial {before}"));
        if trial.reserve(&holder, &[(joined.host, joined.gpus)]).is_err() {
            return Err("the join trial found GPUs that are not free".into());
        }
        Ok((one, (0, joined.host, joined.gpus)))
    }

    /// Records the secondary scheduler's preemption plan for the unit `key` (a gang's key, or
    /// `pod:{uid}` for a single pod): its `slots` (role, host, GPUs) are held as its victims
    /// leave ([`Holder::Nominated`]) and become its reservation once all are free
    /// ([`Book::settle`]). With `leader_first` the unit is a group whose leader binds ahead of
    /// its workers ([`Book::hold_leader_for_bind`] then adopts the reservation). An earlier
    /// nomination under `key` is replaced. Errors: `key` is reserved already.
    pub fn nominate(
        &mut self,
        key: &str,
        (planned, slots): (Planned, &[RoleSlot]),
        planned_by: PodIdentity,
        leader_first: bool,
        now_ms: u64,
    ) -> Result<(), BookError> {
        if self.gangs.contains_key(key) {
            return Err(BookError::AlreadyPlanned { gang: key.to_string() });
        }
        self.drop_nomination(key);
        let nomination = Nomination {
            planned,
            slots: slots.iter().map(|&(role, host, gpus)| Slot::of_role(role, host, gpus)).collect(),
            expires_at_ms: now_ms.saturating_add(self.config.nomination_ttl_ms),
            planned_by,
            leader_first,
            victims: BTreeSet::new(),
            made_ms: now_ms,
        };
        self.nominations.insert(key.to_string(), nomination);
        self.stats.gangs_nominated += 1;
        self.hold_nominated(key);
        Ok(())
    }

    /// The nodes where unit `key`'s nomination still waits for victims to leave, or `None`
    /// when it has none.
    pub fn nomination_waits_on(&self, key: &str) -> Option<Vec<String>> {
        self.nominations.get(key)?;
        Some(self.nomination_pending(key).into_iter().map(|h| self.cluster.host(h).name.clone()).collect())
    }

    /// Ends the nominations whose time ran out and turns complete ones into reservations (the
    /// extender's verbs and [`Book::expire`] do it too; the secondary scheduler does it at the
    /// start of each cycle).
    pub fn settle(&mut self, now_ms: u64) {
        self.settle_nominations(now_ms);
    }

    /// Whether unit `key`'s preemption has settled: its nomination became a reservation that
    /// no pod has taken up yet (the unit should be tried now).
    pub fn preemption_settled(&self, key: &str) -> bool {
        self.gangs.get(key).is_some_and(|r| r.from_preemption && !r.binding)
    }

    /// Ends unit `key`'s preemption: its nomination and a reservation made from it that is not
    /// binding are dropped, their GPUs given back (its pods are gone, or it was placed).
    pub fn cancel_preemption(&mut self, key: &str) {
        self.drop_nomination(key);
        if self.gangs.get(key).is_some_and(|r| r.from_preemption && !r.binding) {
            self.drop_reservation(key);
        }
    }

    /// Keeps unit `key`'s nomination another [`BookConfig::nomination_ttl_ms`] from now: its
    /// victims are still leaving (a termination grace longer than the TTL).
    pub fn renew_nomination(&mut self, key: &str, now_ms: u64) {
        let ttl = self.config.nomination_ttl_ms;
        if let Some(nomination) = self.nominations.get_mut(key) {
            nomination.expires_at_ms = nomination.expires_at_ms.max(now_ms.saturating_add(ttl));
        }
    }

    /// Whether anything is reserved under `key` (a gang's reservation of any kind).
    pub fn is_reserved(&self, key: &str) -> bool {
        self.gangs.contains_key(key)
    }

    /// A single pod's preemption reservation (`pod:{uid}`, from a settled nomination), given
    /// back so that the pod is planned on the GPUs it freed; whether there was one.
    pub fn release_single_nomination(&mut self, key: &str) -> bool {
        if self.gangs.get(key).is_some_and(|r| !r.binding && r.from_preemption) {
            return self.drop_reservation(key).is_some();
        }
        false
    }
}
