//! Gangs that run: some members bound, nothing reserved for the gang. A pod that names such
//! a gang (a member recreated after it left, or one more of a gang scaled out) joins it on its
//! own: one member's GPUs, inside the gang's required scope around the members that run, on
//! the nearest room to them (a host of theirs, then their smallest domain outward). Nothing
//! is reserved for members that do not exist.

use super::*;

/// What became of a pod joining its running gang ([`Book::hold_joining`]).
#[derive(Debug, Clone, PartialEq)]
pub(super) enum JoinOutcome {
    /// Its role takes no GPUs: nothing to hold.
    NoGpus,
    /// Its GPUs are held in the gang's joining reservation, its slot taken by it.
    Held(Joined),
    /// The gang runs (or has joining) its most members, `topoplace.io/gang-max-size` (why);
    /// nothing is held: it joins once one leaves.
    AtMaximum(String),
    /// It fits nowhere inside its scope near its members (why); nothing is held.
    Nowhere(String),
}

/// Where a joining member was placed, for its filter's answer.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Joined {
    pub host: HostId,
    pub gpus: GpuMask,
    /// The nearest region around the running members that had room, as the answer says it
    /// (`a node its members run on`, `its members' rack \`r1\``, `the cluster`).
    pub near: String,
}

impl Book {
    /// The hosts the bound members of gang `key` run on, one entry per member.
    pub fn running_hosts(&self, key: &str) -> Vec<HostId> {
        self.bound.values().filter(|b| b.gang.as_deref() == Some(key)).filter_map(|b| self.bound_host(b)).collect()
    }

    /// Removes pod `uid`'s slot from gang `key`'s joining reservation, its GPUs given back (the
    /// reservation ends with its last slot); the slot, if it had one.
    pub(super) fn drop_joining_slot(&mut self, key: &str, uid: &str) -> Option<Slot> {
        let reservation = self.gangs.get_mut(key).filter(|r| r.joining)?;
        let index = reservation.slots.iter().position(|s| s.pod.as_ref().is_some_and(|p| p.uid == uid))?;
        let slot = reservation.slots.remove(index);
        let rest = merge_by_host(reservation.slots.iter().filter(|s| !s.bound).map(|s| (s.host, s.gpus)));
        if rest.is_empty() {
            self.gangs.remove(key);
        }
        // One holder gives the slot's GPUs away: released whole, the rest taken again.
        if let Err(error) = self.ledger.release(&gang_holder(key)) {
            self.ledger_fault("taking a slot out of a joining reservation", error);
        }
        if !rest.is_empty() {
            if let Err(error) = self.ledger.reserve(&gang_holder(key), &rest) {
                self.ledger_fault("holding the rest of a joining reservation", error);
            }
        }
        Some(slot)
    }

    /// Whether gang `key` ran whole ([`Book::ran_whole`]) and nothing is reserved for it: a
    /// pod of it joins it. A gang with members bound that never ran whole (a Binding failed and
    /// its bound members are being deleted) is planned whole instead.
    pub(super) fn runs_unreserved(&self, key: &str) -> bool {
        !self.gangs.contains_key(key) && self.ran_whole(key)
    }

    /// Whether gang `key` is known to have run whole (see `running`) and a member of it is
    /// bound: a pending pod of it joins it rather than being taken for the rest of a gang
    /// half-bound (the secondary scheduler's repair).
    pub fn ran_whole(&self, key: &str) -> bool {
        self.running.contains_key(key) && self.bound.values().any(|b| b.gang.as_deref() == Some(key))
    }

    /// The pod watch saw pod `uid` of gang `key` bound (after [`Book::observe_bound`]), and its
    /// pods say the gang has `size` members that take GPUs: once that many are seen bound, it
    /// is known to have run whole (after a restart nothing else says so), and a pod of it that
    /// comes later joins it. O(log n) per call: the members seen are counted per gang.
    pub fn observe_gang_size(&mut self, key: &str, uid: &str, size: u32) {
        if self.running.contains_key(key) || self.gangs.contains_key(key) || !self.bound.contains_key(uid) {
            return;
        }
        let seen =
            self.seen_members.entry(key.to_string()).or_insert_with(|| (size, std::collections::BTreeSet::new()));
        seen.0 = size;
        seen.1.insert(uid.to_string());
        if seen.1.len() >= size as usize {
            self.seen_members.remove(key);
            self.running.insert(key.to_string(), None);
        }
    }

    /// The pod watch saw bound pod `uid` state its gang's maximum as `max`
    /// (`topoplace.io/gang-max-size`; `None`: it states none). Members that disagree on the
    /// maximum (a label changed while the gang runs) are held to the smallest any of them
    /// states ([`Book::join_at_maximum`]).
    pub fn observe_gang_max(&mut self, uid: &str, max: Option<u32>) {
        match max.filter(|_| self.bound.contains_key(uid)) {
            Some(max) => self.stated_max.insert(uid.to_string(), max),
            None => self.stated_max.remove(uid),
        };
    }

    /// The pod watch saw bound pod `uid` being deleted (`metadata.deletionTimestamp`: it
    /// terminates within its grace period). A preemption's plan waiting for it as a victim is
    /// kept meanwhile ([`Book::settle_nominations`]). Ignored for a pod not bound here.
    pub fn observe_terminating(&mut self, uid: &str) {
        if self.bound.contains_key(uid) {
            self.terminating.insert(uid.to_string());
        }
    }

    /// Why pod `uid` of the elastic gang `membership` may not join it now: the gang's
    /// members bound here and the other pods holding a joining slot already reach its maximum,
    /// the smallest that the pod (`membership.max`) and the gang's bound members
    /// ([`Book::observe_gang_max`]) state; `None` when it may join, or no maximum is stated.
    pub fn join_at_maximum(&self, membership: &GangMembership, uid: &str) -> Option<String> {
        self.join_at_maximum_with(membership, uid, 0)
    }

    /// [`Book::join_at_maximum`] with `planned` more pods counted as joining (a preemption's
    /// trial of several joiners).
    pub(super) fn join_at_maximum_with(
        &self,
        membership: &GangMembership,
        uid: &str,
        planned: usize,
    ) -> Option<String> {
        let key = &membership.key;
        let theirs = self
            .bound
            .values()
            .filter(|b| b.gang.as_deref() == Some(key.as_str()))
            .filter_map(|b| self.stated_max.get(&b.pod.uid).copied())
            .min();
        let max = match (membership.max, theirs) {
            (Some(ours), Some(theirs)) => ours.min(theirs),
            (ours, theirs) => ours.or(theirs)?,
        };
        let running =
            self.bound.values().filter(|b| b.gang.as_deref() == Some(key.as_str()) && b.pod.uid != uid).count();
        let joining = planned
            + self.gangs.get(key).filter(|r| r.joining).map_or(0, |r| {
                r.slots.iter().filter(|s| !s.bound && s.pod.as_ref().is_some_and(|p| p.uid != uid)).count()
            });
        (running + joining >= max as usize).then(|| {
            format!(
                "gang `{key}` runs {running} member(s) and has {joining} other(s) joining: its maximum is {max} \
                 (topoplace.io/gang-max-size); this pod joins once one leaves"
            )
        })
    }

    /// Forgets the shape of gang `key` when none of its members is bound any more.
    pub(in crate::reservation) fn prune_running(&mut self, key: &str) {
        if let Some(seen) = self.seen_members.get_mut(key) {
            let bound = &self.bound;
            seen.1.retain(|uid| bound.contains_key(uid));
            if seen.1.is_empty() {
                self.seen_members.remove(key);
            }
        }
        if self.running.contains_key(key) && !self.bound.values().any(|b| b.gang.as_deref() == Some(key)) {
            self.running.remove(key);
        }
    }

    /// The one-member shape a pod of a running gang joins with, and the scopes that hold it
    /// around the members that run (the gang's, or the replica's and its role's). `None` for a
    /// GPU-less role. Errors: the pod describes the gang otherwise than it was bound
    /// ([`BookError::GangShapeMismatch`]), or more than [`GANG_MEMBERS_MAX`] would run.
    pub(super) fn joining_shape(
        &self,
        demand: &PodDemand,
        membership: &GangMembership,
        ours: &Planned,
        own_role: usize,
    ) -> Result<Option<(Gang, Vec<Scope>)>, BookError> {
        if let Some(Some(remembered)) = self.running.get(&membership.key) {
            if let Some((field, mine, theirs)) = planned_difference(ours, remembered) {
                return Err(BookError::GangShapeMismatch(Box::new(ShapeMismatch {
                    pod: demand.pod.to_string(),
                    gang: membership.key.clone(),
                    planned_by: "its members that run".into(),
                    field,
                    ours: mine,
                    theirs,
                })));
            }
        }
        let running = self.running_hosts(&membership.key).len();
        if running >= GANG_MEMBERS_MAX as usize {
            return Err(BookError::RoleMismatch {
                pod: demand.pod.to_string(),
                detail: format!(
                    "gang `{}` already runs {running} members, the most a gang may have ({GANG_MEMBERS_MAX})",
                    membership.key
                ),
            });
        }
        let (gang, scopes) = match ours {
            Planned::Gang(gang) => (gang.clone(), gang.required.iter().cloned().collect::<Vec<_>>()),
            Planned::Replica(replica) => {
                let Some(gang) = replica.roles.get(own_role).and_then(|r| r.gang.clone()) else { return Ok(None) };
                let scopes = replica.required.iter().chain(gang.required.iter()).cloned().collect();
                (gang, scopes)
            }
        };
        let mut scopes = scopes;
        if gang.tensor_parallel > gang.gpus_per_member {
            // Its tensor-parallel group spans members: it joins theirs on their host (over
            // NVLink, or PCIe where the host has none) or in their NVLink clique.
            scopes.push(Scope::Nvlink);
        }
        let one = Gang {
            members: 1,
            tensor_parallel: gang.tensor_parallel.min(gang.gpus_per_member),
            pipeline_parallel: 1,
            required: None,
            preferred: None,
            ..gang
        };
        Ok(Some((one, scopes)))
    }
}

impl Book {
    /// A pod of gang `key`, which runs (see the module doc), joins it on its own within
    /// `within`: its GPUs are held as the gang's joining reservation (made, or grown by this
    /// pod's slot, its TTL renewed). Errors: the pod describes the gang otherwise than it
    /// runs, or its GPUs could not be held (a ledger fault; nothing changed).
    pub(super) fn hold_joining(
        &mut self,
        demand: &PodDemand,
        membership: &GangMembership,
        ours: Planned,
        own_role: usize,
        within: &[bool],
        now_ms: u64,
    ) -> Result<JoinOutcome, BookError> {
        let key = membership.key.clone();
        if self.gangs.get(&key).is_some_and(|r| !r.joining || r.binding) {
            // Only a joining reservation not binding grows; any other is the gang's own.
            return Err(BookError::AlreadyPlanned { gang: key });
        }
        let Some((one, scopes)) = self.joining_shape(demand, membership, &ours, own_role)? else {
            return Ok(JoinOutcome::NoGpus);
        };
        if let Some(reason) = self.join_at_maximum(membership, &demand.pod.uid) {
            return Ok(JoinOutcome::AtMaximum(reason));
        }
        let siblings = self.running_hosts(&key);
        let joined =
            self.with_planner(|planner, ledger| place_joining(planner, ledger, &one, &scopes, &siblings, within));
        let joined = match joined {
            Ok(joined) => joined,
            Err(why) => {
                return Ok(JoinOutcome::Nowhere(format!(
                    "gang `{key}` runs {} member(s); this pod joins them on its own ({} GPUs, nothing else held) but \
                     fits nowhere inside its scope near them: {why}",
                    siblings.len(),
                    one.gpus_per_member
                )));
            }
        };
        self.check_namespace_room(&demand.pod, joined.gpus.count_ones())?;
        // The GPUs come from the planner on this ledger; a joining reservation that grows is
        // held again whole, as it was if that fails.
        let holder = gang_holder(&key);
        let pod = demand.pod.to_string();
        let earlier = match self.gangs.contains_key(&key) {
            true => {
                Some(self.ledger.release(&holder).map_err(|source| BookError::Ledger { pod: pod.clone(), source })?)
            }
            false => None,
        };
        let mut holding = earlier.clone().unwrap_or_default();
        holding.push((joined.host, joined.gpus));
        if let Err(source) = self.ledger.reserve(&holder, &merge_by_host(holding)) {
            if let Some(earlier) = earlier {
                if let Err(error) = self.ledger.reserve(&holder, &earlier) {
                    self.ledger_fault("holding a joining reservation again", error);
                }
            }
            return Err(BookError::Ledger { pod, source });
        }
        let ttl = self.config.reservation_ttl_ms;
        let mut slot = Slot::of_role(own_role, joined.host, joined.gpus);
        slot.pod = Some(demand.pod.clone());
        match self.gangs.get_mut(&key) {
            Some(reservation) => {
                reservation.slots.push(slot);
                reservation.expires_at_ms = reservation.expires_at_ms.max(now_ms.saturating_add(ttl));
            }
            None => {
                self.gangs.insert(
                    key,
                    GangReservation {
                        planned: ours,
                        slots: vec![slot],
                        expires_at_ms: now_ms.saturating_add(ttl),
                        binding: false,
                        origin: None,
                        first_held_ms: None,
                        planned_by: Some(demand.pod.clone()),
                        leader_first: false,
                        joining: true,
                        from_preemption: false,
                    },
                );
            }
        }
        Ok(JoinOutcome::Held(joined))
    }
}

/// Places one joining member of shape `one` on `ledger`, within `within` and inside every
/// scope of `scopes` around the members that run on `siblings`: on a host they run on if one
/// has room, else in their smallest domain with room, level by level outward, else (no
/// scope) anywhere. Errors: why it fits nowhere inside the scopes.
pub(super) fn place_joining(
    planner: &mut Planner,
    ledger: &Ledger<Holder>,
    one: &Gang,
    scopes: &[Scope],
    siblings: &[HostId],
    within: &[bool],
) -> Result<Joined, String> {
    let cluster = planner.cluster();
    let hosts = cluster.hosts.len();
    let Some(&first) = siblings.first() else { return Err("none of its members runs".into()) };
    // The scopes, as hosts: each scope's domain that holds the first member that runs.
    let mut inside: Vec<bool> = (0..hosts).map(|h| within.get(h).copied().unwrap_or(false)).collect();
    let mut bounded = false;
    for scope in scopes {
        bounded = true;
        let anchor = cluster.host(first);
        for (h, flag) in inside.iter_mut().enumerate() {
            let host = cluster.host(h as HostId);
            let same = match scope {
                Scope::Host => h as HostId == first,
                Scope::Nvlink => match anchor.clique {
                    Some(clique) => host.clique == Some(clique),
                    None => h as HostId == first,
                },
                Scope::Level(name) => match cluster.level_index(name) {
                    Some(level) => host.domain_path[level] == anchor.domain_path[level],
                    None => false,
                },
            };
            *flag &= same;
        }
    }
    // The regions, nearest first: the members' hosts, then per level (innermost first) the
    // domain holding most of them, then everything inside the scopes.
    let mut regions: Vec<(Vec<bool>, String)> = Vec::new();
    let on_sibling: Vec<bool> = (0..hosts).map(|h| inside[h] && siblings.contains(&(h as HostId))).collect();
    regions.push((on_sibling, "a node its members run on".into()));
    for level in (0..cluster.levels.len()).rev() {
        let mut counts: BTreeMap<u32, usize> = BTreeMap::new();
        for &s in siblings {
            *counts.entry(cluster.host(s).domain_path[level]).or_default() += 1;
        }
        let Some((&domain, _)) = counts.iter().max_by_key(|&(d, n)| (*n, std::cmp::Reverse(*d))) else { continue };
        let mask: Vec<bool> =
            (0..hosts).map(|h| inside[h] && cluster.host(h as HostId).domain_path[level] == domain).collect();
        let path = &cluster.domains[level][domain as usize].path;
        regions.push((mask, format!("its members' {} `{path}`", cluster.levels[level])));
    }
    if !bounded {
        regions.push((inside.clone(), "the cluster".into()));
    } else {
        regions.push((inside.clone(), "its required scope".into()));
    }
    let mut last_reason = String::from("no node inside its scope was offered");
    let mut tried: Vec<bool> = vec![false; hosts];
    for (mask, near) in regions {
        if mask == tried || !mask.iter().any(|&m| m) {
            continue;
        }
        match planner.place(ledger, PlaceRequest::new(one).within(Some(&mask))) {
            Ok(placement) => {
                let Some(member) = placement.members.first() else { continue };
                return Ok(Joined { host: member.host, gpus: member.gpus, near });
            }
            Err(unplaced) => last_reason = unplaced.reason,
        }
        tried = mask;
    }
    Err(last_reason)
}
