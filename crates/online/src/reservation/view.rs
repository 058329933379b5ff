//! The book's side of the cluster as the watches see it: a new cluster model, pods seen
//! bound (their GPUs held) or gone (given back), and a relist.

use super::*;
use topoplace_engine::topology::full_mask;

impl Book {
    /// Replaces the cluster view (nodes added, removed or relabelled). Bound pods and
    /// reservations are carried over by node name; a reservation that no longer fits is
    /// dropped and returned (its waiting members must be answered), a bound pod whose node
    /// is gone is forgotten, and one whose GPUs the node no longer has (the device plugin
    /// withdrew some) is held on as many of the node's lowest free GPUs ([`Book::held_on`]).
    pub fn replace_cluster(&mut self, cluster: Cluster) -> Vec<Expired> {
        let old = std::mem::replace(&mut self.cluster, cluster);
        self.earlier_changes += self.ledger.changes() + 1;
        self.ledger = Ledger::empty(&self.cluster);
        self.parts = None;
        let bound = std::mem::take(&mut self.bound);
        // Pods whose recorded GPUs the node still has first, so a pod moved to the lowest free
        // GPUs never takes what another pod's record names.
        let mut bound: Vec<(String, BoundPod)> = bound.into_iter().collect();
        bound.sort_by_key(|(uid, pod)| {
            let fits = self.bound_host(pod).is_some_and(|h| self.within_host(h, pod.recorded));
            (!fits, uid.clone())
        });
        for (uid, pod) in bound {
            let Some(host) = self.bound_host(&pod) else { continue };
            // A node shrunk below what its pods hold (every GPU of it in use, one withdrawn):
            // a pod the lowest free GPUs cannot hold is no longer counted (its next watch
            // event or a relist offers it again).
            let Some(gpus) = self.held_on(host, pod.recorded) else { continue };
            if self.ledger.reserve(&pod_holder(&uid), &[(host, gpus)]).is_ok() {
                self.bound.insert(uid, BoundPod { gpus, ..pod });
            }
        }
        let bound = &self.bound;
        self.stated_max.retain(|uid, _| bound.contains_key(uid));
        self.terminating.retain(|uid| bound.contains_key(uid));
        let singles = std::mem::take(&mut self.singles);
        for (uid, member) in singles {
            let Some(host) = self.cluster.same_host(old.host(member.host)) else { continue };
            if self.ledger.reserve(&pod_holder(&uid), &[(host, indices_mask(&member.gpus))]).is_ok() {
                self.singles.insert(uid, MemberBind { host, ..member });
            }
        }
        let mut dropped = Vec::new();
        let gangs = std::mem::take(&mut self.gangs);
        for (key, mut reservation) in gangs {
            let mut request = Vec::new();
            let mut moved = true;
            for slot in &mut reservation.slots {
                match self.cluster.same_host(old.host(slot.host)) {
                    Some(host) => {
                        slot.host = host;
                        // A member bound ahead of its gang holds its GPUs as a pod.
                        if !slot.bound {
                            request.push((host, slot.gpus));
                        }
                    }
                    None => moved = false,
                }
            }
            let merged = merge_by_host(request);
            if moved && self.ledger.reserve(&gang_holder(&key), &merged).is_ok() {
                self.gangs.insert(key, reservation);
            } else {
                self.undo_bound_ahead(&reservation);
                dropped.push(Expired::Reservation { gang: key, members_at_bind: at_bind(&reservation) });
            }
        }
        // Preemptions' plans, by node name: dropped when a node of theirs left, else what of
        // them is free is held again.
        let nominations = std::mem::take(&mut self.nominations);
        for (key, mut nomination) in nominations {
            let mut moved = true;
            for slot in &mut nomination.slots {
                match self.cluster.same_host(old.host(slot.host)) {
                    Some(host) => slot.host = host,
                    None => moved = false,
                }
            }
            if moved && !self.gangs.contains_key(&key) {
                self.nominations.insert(key.clone(), nomination);
                self.hold_nominated(&key);
            }
        }
        let known: Vec<String> = self.running.keys().chain(self.seen_members.keys()).cloned().collect();
        for key in known {
            self.prune_running(&key);
        }
        // Assumptions last (they are guesses about binds in flight): carried over by node
        // name where their GPUs are still free, dropped otherwise.
        let assumed = std::mem::take(&mut self.assumed);
        for (uid, assumption) in assumed {
            let Some(host) = self.cluster.same_host(old.host(assumption.host)) else { continue };
            if self.ledger.reserve(&Holder::Assumed(uid.clone()), &[(host, assumption.gpus)]).is_ok() {
                self.assumed.insert(uid, Assumption { host, ..assumption });
            }
        }
        dropped
    }

    /// Nodes kube-scheduler offers no pod now (cordoned, or not Ready), by name, as the node
    /// watch sees them; replaces the previous set. A replica's roles other than the filtering
    /// pod's, which may use nodes that pod was not offered, are not planned on these, nor is
    /// anything the placement API plans or counts. A different set moves
    /// [`Book::generation`] on, so capacity watchers count again.
    pub fn set_closed_nodes(&mut self, names: std::collections::BTreeSet<String>) {
        if self.closed != names {
            self.closed = names;
            self.earlier_changes += 1;
        }
    }

    /// Device pools of nodes that offer none of their devices now (a MIG profile's allocatable
    /// at 0 on a node of the mixed strategy), by node name and pool: closed as
    /// [`Book::set_closed_nodes`] closes whole nodes; replaces the previous set.
    pub fn set_closed_pools(&mut self, pools: std::collections::BTreeSet<(String, DevicePool)>) {
        if self.closed_pools != pools {
            self.closed_pools = pools;
            self.earlier_changes += 1;
        }
    }

    /// Per host, whether it is open for planning (in neither [`Book::set_closed_nodes`]'s
    /// nor [`Book::set_closed_pools`]'s set).
    pub(crate) fn open_hosts(&self) -> Vec<bool> {
        self.cluster
            .hosts
            .iter()
            .map(|h| {
                !self.closed.contains(&h.name)
                    && (self.closed_pools.is_empty() || !self.closed_pools.contains(&(h.name.clone(), h.pool.clone())))
            })
            .collect()
    }

    /// A pod seen bound on `node` (by us earlier, by a restart's predecessor, or by another
    /// scheduler): its GPUs are held. `gpus` are the indices from `topoplace.io/gpus`, or
    /// `None` to take the lowest free ones for `count` GPUs.
    pub fn observe_bound(
        &mut self,
        pod: PodIdentity,
        node: &str,
        gpus: Option<&[u8]>,
        count: u32,
        gang: Option<String>,
    ) -> Result<(), BookError> {
        self.observe_bound_in(pod, node, &DevicePool::Gpu, gpus, count, gang)
    }

    /// [`Book::observe_bound`] for a pod whose devices came from `pool` (a MIG profile's
    /// `nvidia.com/mig-<profile>` on a node of the mixed strategy): `gpus` index that pool's
    /// devices.
    pub fn observe_bound_in(
        &mut self,
        pod: PodIdentity,
        node: &str,
        pool: &DevicePool,
        gpus: Option<&[u8]>,
        count: u32,
        gang: Option<String>,
    ) -> Result<(), BookError> {
        if self.bound.contains_key(&pod.uid) || count == 0 || self.in_flight(&pod.uid) {
            // In flight: `bind_finished` records it with the GPUs it was given.
            return Ok(());
        }
        // Bound by kube-scheduler itself (no bind verb): the guess gives way to the fact.
        self.unassume(&pod.uid);
        let Some(host) = self.cluster.host_in(node, pool) else {
            return Err(BookError::UnknownNode { pod: pod.to_string(), node: node.to_string() });
        };
        // Pods moved off withdrawn GPUs (`held_on`) may sit on what this pod's record names
        // (pods seen in another order after a restart): they step aside, and are held again
        // on other free GPUs once this one is.
        let aside = match gpus.map(indices_mask) {
            Some(recorded) if self.within_host(host, recorded) => self.step_aside(host, recorded),
            _ => Vec::new(),
        };
        let mask = match gpus {
            Some(indices) => match self.held_on(host, indices_mask(indices)) {
                Some(mask) => mask,
                None => {
                    self.hold_again(host, aside);
                    return Err(BookError::NoRoomAtBind {
                        pod: pod.to_string(),
                        node: node.to_string(),
                        reason: format!(
                            "GPUs {indices:?} recorded, the node has {} now",
                            self.cluster.host(host).gpu_count
                        ),
                    });
                }
            },
            None => {
                let free = self.ledger.free(host);
                let mut mask = 0u64;
                for index in mask_indices(free).into_iter().take(count as usize) {
                    mask |= 1u64 << index;
                }
                if mask.count_ones() < count {
                    return Err(BookError::NoRoomAtBind {
                        pod: pod.to_string(),
                        node: node.to_string(),
                        reason: format!("{count} GPUs counted but {} free", free.count_ones()),
                    });
                }
                mask
            }
        };
        let reserved = self
            .ledger
            .reserve(&pod_holder(&pod.uid), &[(host, mask)])
            .map_err(|source| BookError::Ledger { pod: pod.to_string(), source });
        if reserved.is_ok() {
            let recorded = gpus.map_or(mask, indices_mask);
            self.bound.insert(
                pod.uid.clone(),
                BoundPod {
                    pod,
                    node: node.to_string(),
                    pool: pool.clone(),
                    gpus: mask,
                    recorded,
                    gang,
                    bound_at_ms: 0,
                },
            );
        }
        self.hold_again(host, aside);
        reserved
    }

    /// Releases the pods on `host` that were moved off withdrawn GPUs and now hold some of
    /// `wanted`; returns them, to be held again with [`Book::hold_again`].
    fn step_aside(&mut self, host: HostId, wanted: GpuMask) -> Vec<String> {
        let moved: Vec<String> = self
            .bound
            .iter()
            .filter(|(_, b)| self.bound_host(b) == Some(host) && b.gpus != b.recorded && b.gpus & wanted != 0)
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in &moved {
            if let Err(error) = self.ledger.release(&pod_holder(uid)) {
                self.ledger_fault("moving a pod off GPUs another pod's record names", error);
            }
        }
        moved
    }

    /// Holds the pods [`Book::step_aside`] released again, on the GPUs [`Book::held_on`] gives
    /// them now; one the node has no room for any more is no longer counted.
    fn hold_again(&mut self, host: HostId, uids: Vec<String>) {
        for uid in uids {
            let Some(recorded) = self.bound.get(&uid).map(|b| b.recorded) else { continue };
            let held = self
                .held_on(host, recorded)
                .filter(|&gpus| self.ledger.reserve(&pod_holder(&uid), &[(host, gpus)]).is_ok());
            match held {
                Some(gpus) => {
                    if let Some(bound) = self.bound.get_mut(&uid) {
                        bound.gpus = gpus;
                    }
                }
                None => {
                    self.bound.remove(&uid);
                }
            }
        }
    }

    /// The host a bound pod is held on: its node's host of its pool.
    pub(super) fn bound_host(&self, pod: &BoundPod) -> Option<HostId> {
        self.cluster.host_in(&pod.node, &pod.pool)
    }

    fn within_host(&self, host: HostId, mask: GpuMask) -> bool {
        mask & !full_mask(self.cluster.host(host).gpu_count) == 0
    }

    /// The GPUs a bound pod holds on `host`: `recorded` when the host has every one of them;
    /// otherwise (the host has fewer GPUs than when the pod was bound: the device plugin
    /// withdrew some, and which ones the pod really runs on is not known here) as many of the
    /// host's lowest free GPUs, so the pod is still counted; `None` when not that many are
    /// free.
    pub(super) fn held_on(&self, host: HostId, recorded: GpuMask) -> Option<GpuMask> {
        if self.within_host(host, recorded) {
            return Some(recorded);
        }
        let count = recorded.count_ones() as usize;
        let free = mask_indices(self.ledger.free(host));
        (free.len() >= count).then(|| free[..count].iter().fold(0, |mask, &gpu| mask | (1u64 << gpu)))
    }

    fn in_flight(&self, uid: &str) -> bool {
        self.singles.contains_key(uid)
            || self.gangs.values().any(|g| {
                // A joining pod's Binding is in flight while its slot is at bind.
                (g.binding || g.joining)
                    && g.slots.iter().any(|s| (g.binding || s.at_bind) && s.pod.as_ref().is_some_and(|p| p.uid == uid))
            })
    }

    /// A pod was deleted (or finished): its GPUs come back, and if it held a slot in a
    /// reservation not yet binding, the slot is free for its replacement. A member bound
    /// ahead of its gang ([`BindOrder::LeaderFirst`]) that leaves ends its gang's reservation
    /// (its controller recreates the group): returned, so the adapter answers the held binds.
    pub fn forget_pod(&mut self, uid: &str) -> Vec<Expired> {
        self.unassume(uid);
        let ahead: Vec<String> = self
            .gangs
            .iter()
            .filter(|(_, g)| {
                !g.binding && g.slots.iter().any(|s| s.bound && s.pod.as_ref().is_some_and(|p| p.uid == uid))
            })
            .map(|(key, _)| key.clone())
            .collect();
        let mut ended = Vec::new();
        for key in ahead {
            if let Some(reservation) = self.drop_reservation(&key) {
                self.stats.gangs_expired += 1;
                ended.push(Expired::Reservation { gang: key, members_at_bind: at_bind(&reservation) });
            }
        }
        // A bound pod holds its GPUs, except one whose node left the view while its Binding
        // was in flight (`bind_finished` records it without a host to hold on).
        let gone = self.bound.remove(uid);
        self.stated_max.remove(uid);
        self.terminating.remove(uid);
        if gone.is_some() && self.ledger.holding(&pod_holder(uid)).is_some() {
            if let Err(error) = self.ledger.release(&pod_holder(uid)) {
                self.ledger_fault("forgetting a bound pod", error);
            }
        }
        if let Some(gang) = gone.and_then(|b| b.gang) {
            self.prune_running(&gang);
        }
        // What it gave back may be what a preemption's plan waits for.
        self.hold_nominated_all();
        // A pod joining a gang that left: its slot goes, and its GPUs with it.
        let joining: Vec<String> = self
            .gangs
            .iter()
            .filter(|(_, g)| g.joining && g.slots.iter().any(|s| s.pod.as_ref().is_some_and(|p| p.uid == uid)))
            .map(|(key, _)| key.clone())
            .collect();
        for key in joining {
            self.drop_joining_slot(&key, uid);
        }
        for reservation in self.gangs.values_mut().filter(|g| !g.binding) {
            for slot in &mut reservation.slots {
                if slot.pod.as_ref().is_some_and(|p| p.uid == uid) {
                    (slot.pod, slot.at_bind, slot.lapsed) = (None, false, false);
                }
            }
        }
        ended
    }

    /// After a relist: bound pods not in `present` are gone, except those topoplace bound
    /// less than `grace_ms` ago (their watch events may not have arrived yet).
    pub fn forget_unlisted(&mut self, present: &std::collections::HashSet<String>, now_ms: u64, grace_ms: u64) {
        let gone: Vec<String> = self
            .bound
            .iter()
            .filter(|(uid, pod)| {
                !present.contains(*uid) && (pod.bound_at_ms == 0 || pod.bound_at_ms + grace_ms <= now_ms)
            })
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in gone {
            // Held binds of a reservation this ends lapse at their hold.
            self.forget_pod(&uid);
        }
    }

    /// Whether a bound pod is known (for tests and the adapters' resync).
    pub fn is_bound(&self, uid: &str) -> bool {
        self.bound.contains_key(uid)
    }
}
