//! The book's side of the secondary scheduler: plans on the hosts its predicates allow, the
//! hosts a starving gang wants kept free, and the hold of a planned unit while its Bindings
//! are made.

use super::*;

impl Book {
    /// The secondary scheduler's plan for `gang` on the allowed hosts; nothing is held yet.
    pub fn plan_within(
        &mut self,
        gang: &Gang,
        allowed: &[bool],
    ) -> Result<topoplace_engine::placement::GangPlacement, topoplace_engine::placement::Unplaced> {
        self.with_planner(|planner, ledger| planner.place(ledger, PlaceRequest::new(gang).within(Some(allowed))))
    }

    /// The secondary scheduler's plan for a replica with roles on the allowed hosts, nothing
    /// held: per member that takes GPUs, role by role and in member order within a role, its
    /// role's index, host and GPUs. Errors say why it does not fit.
    pub fn plan_replica_within(&mut self, replica: &Replica, allowed: &[bool]) -> Result<Vec<RoleSlot>, String> {
        let (slots, _) = self.plan_slots(&Planned::Replica(Box::new(replica.clone())), allowed, None)?;
        Ok(slots.iter().map(|s| (s.role, s.host, s.gpus)).collect())
    }

    /// The node labels that say the domain of the replica's required level its planned hosts
    /// share: the host's label of every level down to that one (`spine` = `s1`, `leaf` =
    /// `r1`), since a leaf's name need only be unique within its spine. A node is inside the
    /// domain when it carries them all: where the replica's GPU-less pods must go too. `None`
    /// when the required scope is not a topology level, there are no hosts, or the host has
    /// no label of that level (the domain of unlabelled hosts has no label to match).
    pub fn region_labels(&self, replica: &Replica, hosts: &[HostId]) -> Option<Vec<(String, String)>> {
        let Some(Scope::Level(level)) = &replica.required else { return None };
        let index = self.cluster.level_index(level)?;
        let host = self.cluster.host(*hosts.first()?);
        host.labels.get(self.cluster.levels.get(index)?)?;
        let path = self.cluster.levels[..=index]
            .iter()
            .filter_map(|key| host.labels.get(key).map(|value| (key.clone(), value.clone())));
        Some(path.collect())
    }

    /// Whether `planned` would fit on the allowed hosts with every GPU free: a unit that would
    /// not can never be placed there, however long it waits, so it has no call on hosts kept
    /// free for it (the starvation guard would otherwise hold them for ever).
    pub fn fits_when_empty(&mut self, planned: &Planned, allowed: &[bool]) -> bool {
        let empty: Ledger<Holder> = Ledger::empty(&self.cluster);
        self.with_planner(|planner, _| match planned {
            Planned::Gang(gang) => planner.place(&empty, PlaceRequest::new(gang).within(Some(allowed))).is_ok(),
            Planned::Replica(replica) => {
                planner.place_replica(&empty, replica, &SolverChoice::Greedy, Some(allowed)).is_ok()
            }
        })
    }

    /// Of the allowed hosts, those on which `gang` could take GPUs if GPUs were freed there
    /// (its product, memory class and links fit): what a starving gang has first call on.
    pub fn hosts_wanted_by(&mut self, gang: &Gang, allowed: &[bool]) -> Vec<bool> {
        self.with_planner(|planner, ledger| {
            allowed
                .iter()
                .enumerate()
                .map(|(host, &ok)| {
                    ok && planner
                        .host_units(ledger, gang, host as HostId)
                        .err()
                        .is_none_or(|(reason, _)| reason.resolvable_by_freeing_gpus())
                })
                .collect()
        })
    }

    /// The secondary scheduler's hold of a replica with roles: `pods[i]` gets `planned[i]`
    /// (role, host, GPUs: from [`Book::plan_replica_within`], or the slots of
    /// [`Book::reserved_replica`], whose reservation is then adopted), all held and in flight
    /// at once. Errors, with nothing changed: pods and plan of different lengths, a
    /// reservation under `key` that is not this plan (a gang of one shape, other slots) or is
    /// binding already, GPUs the ledger no longer has free. Finish with [`Book::bind_finished`].
    pub fn hold_replica_for_bind(
        &mut self,
        key: &str,
        replica: Replica,
        planned: &[RoleSlot],
        pods: &[PodIdentity],
        now_ms: u64,
    ) -> Result<(Ticket, Vec<MemberBind>), BookError> {
        if planned.len() != pods.len() {
            return Err(BookError::MemberCount { gang: key.into(), pods: pods.len(), members: planned.len() });
        }
        if let Some(existing) = self.gangs.get_mut(key) {
            // The placement API's reservation of this replica is adopted, slot for slot.
            if existing.binding {
                return Err(BookError::InFlight { gang: key.to_string() });
            }
            let adoptable = matches!(existing.planned, Planned::Replica(_)) && existing.adoptable();
            if !adoptable || existing.slots.len() != planned.len() {
                return Err(BookError::AlreadyPlanned { gang: key.to_string() });
            }
            let mut members = Vec::with_capacity(pods.len());
            let mut used = vec![false; existing.slots.len()];
            for (&(role, host, gpus), pod) in planned.iter().zip(pods) {
                let Some(index) = (0..existing.slots.len()).find(|&i| {
                    let slot = &existing.slots[i];
                    !used[i] && slot.role == role && slot.host == host && slot.gpus == gpus
                }) else {
                    return Err(BookError::AlreadyPlanned { gang: key.to_string() });
                };
                used[index] = true;
                members.push((index, pod.clone()));
            }
            existing.binding = true;
            existing.from_preemption = false;
            let cluster = &self.cluster;
            let binds =
                members.into_iter().map(|(index, pod)| existing.slots[index].take_at_bind(cluster, &pod)).collect();
            return Ok((Ticket::Gang(key.to_string()), binds));
        }
        let first = pods.first().map(|p| p.to_string()).unwrap_or_default();
        self.ledger
            .reserve(&gang_holder(key), &merge_by_host(planned.iter().map(|&(_, host, gpus)| (host, gpus))))
            .map_err(|source| BookError::Ledger { pod: first, source })?;
        let mut slots = Vec::with_capacity(pods.len());
        let mut members = Vec::with_capacity(pods.len());
        for (&(role, host, gpus), pod) in planned.iter().zip(pods) {
            let mut slot = Slot::of_role(role, host, gpus);
            members.push(slot.take_at_bind(&self.cluster, pod));
            slots.push(slot);
        }
        self.gangs.insert(
            key.to_string(),
            GangReservation {
                planned: Planned::Replica(Box::new(replica)),
                slots,
                expires_at_ms: now_ms,
                binding: true,
                origin: None,
                first_held_ms: None,
                planned_by: pods.first().cloned(),
                leader_first: false,
                joining: false,
                from_preemption: false,
            },
        );
        self.stats.gangs_reserved += 1;
        Ok((Ticket::Gang(key.to_string()), members))
    }

    /// A replica with roles reserved and not yet binding, through the placement API or by its
    /// own preemption (its victims gone): its roles, its slots (role, host, GPUs), role by
    /// role, and the placement API reservation's id (`None` for a preemption's).
    pub fn reserved_replica(&self, key: &str) -> Option<(Replica, Vec<RoleSlot>, Option<String>)> {
        let reservation = self.gangs.get(key).filter(|g| g.adoptable())?;
        let Planned::Replica(replica) = &reservation.planned else { return None };
        let slots = reservation.slots.iter().map(|s| (s.role, s.host, s.gpus)).collect();
        Some(((**replica).clone(), slots, reservation.origin.as_ref().map(|o| o.id.clone())))
    }

    /// The planned hosts of a gang reserved and not yet binding (through the placement API),
    /// in member order.
    pub fn reserved_hosts(&self, gang: &str) -> Option<Vec<HostId>> {
        let reservation = self.gangs.get(gang).filter(|g| !g.binding)?;
        Some(reservation.slots.iter().map(|s| s.host).collect())
    }

    /// How `gang` conflicts with the gang reserved under `key` in what a reserved gang's pods
    /// must agree on (its size, GPUs per member, no roles, a required topology they state),
    /// if it does: the field, `gang`'s value, the reservation's.
    pub fn reserved_shape_difference(&self, key: &str, gang: &Gang) -> Option<(&'static str, String, String)> {
        let reservation = self.gangs.get(key)?;
        reserved_conflict(&self.cluster, &Planned::Gang(gang.clone()), reservation)
    }

    /// [`Book::reserved_shape_difference`] for a replica with roles.
    pub fn reserved_replica_difference(&self, key: &str, replica: &Replica) -> Option<(&'static str, String, String)> {
        let reservation = self.gangs.get(key)?;
        reserved_conflict(&self.cluster, &Planned::Replica(Box::new(replica.clone())), reservation)
    }

    /// The secondary scheduler's hold: `pods` (in rank order, one per planned member) get
    /// `placement`'s members, held and in flight at once (the scheduler binds them all
    /// itself, nobody waits for bind calls). A gang reserved already (through the placement
    /// API) is adopted instead and `placement` is ignored. Finish with [`Book::bind_finished`].
    pub fn hold_for_bind(
        &mut self,
        gang_key: Option<&str>,
        gang: Gang,
        placement: &[(HostId, GpuMask)],
        pods: &[PodIdentity],
        now_ms: u64,
    ) -> Result<(Ticket, Vec<MemberBind>), BookError> {
        let first = pods.first().map(|p| p.to_string()).unwrap_or_default();
        let Some(key) = gang_key else {
            let (Some(pod), [(host, mask)]) = (pods.first(), placement) else {
                return Err(BookError::MemberCount { gang: first, pods: pods.len(), members: placement.len() });
            };
            // The extender's guess about the same pod, if both ever saw it, gives way.
            self.unassume(&pod.uid);
            self.ledger
                .reserve(&pod_holder(&pod.uid), &[(*host, *mask)])
                .map_err(|source| BookError::Ledger { pod: pod.to_string(), source })?;
            let member = MemberBind {
                pod: pod.clone(),
                host: *host,
                node: self.cluster.host(*host).name.clone(),
                gpus: mask_indices(*mask),
            };
            self.singles.insert(pod.uid.clone(), member.clone());
            return Ok((Ticket::Pod(pod.uid.clone()), vec![member]));
        };
        if !self.gangs.contains_key(key) {
            if placement.len() != pods.len() {
                return Err(BookError::MemberCount { gang: key.into(), pods: pods.len(), members: placement.len() });
            }
            self.ledger
                .reserve(&gang_holder(key), &merge_by_host(placement.iter().copied()))
                .map_err(|source| BookError::Ledger { pod: first.clone(), source })?;
            let slots = placement.iter().map(|&(host, gpus)| Slot::planned(host, gpus)).collect();
            self.gangs.insert(
                key.to_string(),
                GangReservation {
                    planned: Planned::Gang(gang),
                    slots,
                    expires_at_ms: now_ms,
                    binding: false,
                    origin: None,
                    first_held_ms: None,
                    planned_by: pods.first().cloned(),
                    leader_first: false,
                    joining: false,
                    from_preemption: false,
                },
            );
            self.stats.gangs_reserved += 1;
        }
        let cluster = &self.cluster;
        let Some(reservation) = self.gangs.get_mut(key) else {
            return Err(BookError::NotPlanned { pod: first });
        };
        if reservation.binding {
            return Err(BookError::InFlight { gang: key.into() });
        }
        if reservation.slots.len() != pods.len() {
            return Err(BookError::MemberCount {
                gang: key.into(),
                pods: pods.len(),
                members: reservation.slots.len(),
            });
        }
        reservation.binding = true;
        reservation.from_preemption = false;
        let mut members = Vec::with_capacity(pods.len());
        for (slot, pod) in reservation.slots.iter_mut().zip(pods) {
            members.push(slot.take_at_bind(cluster, pod));
        }
        Ok((Ticket::Gang(key.to_string()), members))
    }
    /// The secondary scheduler's hold of a [`BindOrder::LeaderFirst`] group at its leader,
    /// before any worker exists (LeaderWorkerSet creates them once the leader is bound). With
    /// `plan` (what was planned, and its slots: role, host, GPUs, role by role, each role in
    /// rank order) the whole group is held; with `None` the reservation the placement API made
    /// (or the group's preemption, [`Book::nominate`] with `leader_first`)
    /// under `key` is adopted. The leader takes slot `leader_slot` and only its Binding starts
    /// ([`Ticket::Leader`], settled by [`Book::bind_finished`]: once it is bound, the rest
    /// stays held for the workers for [`BookConfig::reservation_ttl_ms`], and a group whose
    /// workers do not bind in that time has its leader given up, [`Book::take_undo`]).
    /// Errors, with nothing changed: a reservation under `key` already (with `plan`), none made
    /// through the placement API or by preemption, or one binding (without), a slot that is out of range or
    /// bound, GPUs the ledger no longer has free.
    pub fn hold_leader_for_bind(
        &mut self,
        key: &str,
        plan: Option<(Planned, &[RoleSlot])>,
        leader: &PodIdentity,
        leader_slot: usize,
        now_ms: u64,
    ) -> Result<(Ticket, MemberBind), BookError> {
        let pod = leader.to_string();
        match plan {
            Some((planned, slots)) => {
                if self.gangs.contains_key(key) {
                    return Err(BookError::AlreadyPlanned { gang: key.to_string() });
                }
                if leader_slot >= slots.len() {
                    return Err(BookError::MemberCount {
                        gang: key.into(),
                        pods: leader_slot + 1,
                        members: slots.len(),
                    });
                }
                self.ledger
                    .reserve(&gang_holder(key), &merge_by_host(slots.iter().map(|&(_, host, gpus)| (host, gpus))))
                    .map_err(|source| BookError::Ledger { pod: pod.clone(), source })?;
                self.gangs.insert(
                    key.to_string(),
                    GangReservation {
                        planned,
                        slots: slots.iter().map(|&(role, host, gpus)| Slot::of_role(role, host, gpus)).collect(),
                        expires_at_ms: now_ms,
                        binding: false,
                        origin: None,
                        first_held_ms: None,
                        planned_by: Some(leader.clone()),
                        leader_first: true,
                        joining: false,
                        from_preemption: false,
                    },
                );
                self.stats.gangs_reserved += 1;
            }
            None => {
                let adoptable = self.gangs.get(key).is_some_and(GangReservation::adoptable);
                if !adoptable {
                    return Err(BookError::NotPlanned { pod });
                }
            }
        }
        let cluster = &self.cluster;
        let Some(reservation) = self.gangs.get_mut(key) else {
            return Err(BookError::NotPlanned { pod });
        };
        if reservation.slots.get(leader_slot).is_none_or(|s| s.bound) {
            return Err(BookError::MemberCount {
                gang: key.into(),
                pods: leader_slot + 1,
                members: reservation.slots.len(),
            });
        }
        reservation.leader_first = true;
        reservation.binding = true;
        // A preemption's plan, once adopted, is the group's reservation like any other: it
        // stays held for the workers after the leader is bound and is never given back as an
        // unused preemption.
        reservation.from_preemption = false;
        let member = reservation.slots[leader_slot].take_at_bind(cluster, leader);
        Ok((Ticket::Leader { gang: key.to_string(), uid: leader.uid.clone() }, member))
    }

    /// The slots (role, host, GPUs) of a reservation that the placement API made under `key`,
    /// or a preemption's plan once its victims left, and that is not binding, role by role;
    /// `None` otherwise.
    pub fn reserved_slots(&self, key: &str) -> Option<Vec<RoleSlot>> {
        let reservation = self.gangs.get(key).filter(|g| g.adoptable())?;
        Some(reservation.slots.iter().map(|s| (s.role, s.host, s.gpus)).collect())
    }

    /// The members of `key`'s gang bound ahead of the rest while the rest's GPUs are held
    /// (a [`BindOrder::LeaderFirst`] leader), with their hosts; empty when there is none or
    /// no reservation.
    pub fn bound_ahead(&self, key: &str) -> Vec<(PodIdentity, HostId)> {
        let Some(reservation) = self.gangs.get(key) else { return Vec::new() };
        reservation.slots.iter().filter(|s| s.bound).filter_map(|s| Some((s.pod.clone()?, s.host))).collect()
    }

    /// Which open slots (those not bound ahead) of `key`'s reservation the members `pods`
    /// (role index, rank within the role, pod) take: a ranked pod its rank's slot of its role,
    /// the others the role's first open slot left; their indices in `pods`' order. Errors: no
    /// reservation with a member bound ahead, one binding, not one pod per open slot, a rank
    /// whose slot is bound ahead or named twice (a stale pod: a recreated leader seen before
    /// the old one left), a pod whose role has no open slot left.
    fn open_slot_indices(
        &self,
        key: &str,
        pods: &[(usize, Option<u32>, PodIdentity)],
    ) -> Result<Vec<usize>, BookError> {
        let reservation = self
            .gangs
            .get(key)
            .filter(|g| g.slots.iter().any(|s| s.bound))
            .ok_or_else(|| BookError::NotBoundAhead { gang: key.to_string() })?;
        if reservation.binding {
            return Err(BookError::InFlight { gang: key.to_string() });
        }
        let open = reservation.slots.iter().filter(|s| !s.bound).count();
        if open != pods.len() {
            return Err(BookError::MemberCount { gang: key.into(), pods: pods.len(), members: open });
        }
        let role_name = |role: usize| match &reservation.planned {
            Planned::Replica(replica) => replica.roles.get(role).map_or_else(|| role.to_string(), |r| r.name.clone()),
            Planned::Gang(_) => "member".to_string(),
        };
        let mut taken: Vec<bool> = reservation.slots.iter().map(|s| s.bound).collect();
        let mut chosen: Vec<Option<usize>> = vec![None; pods.len()];
        // Ranks first, so a pod without one does not take a slot a ranked pod names.
        for (pick, (role, rank, pod)) in chosen.iter_mut().zip(pods) {
            let Some(rank) = *rank else { continue };
            let index = (0..reservation.slots.len()).filter(|&i| reservation.slots[i].role == *role).nth(rank as usize);
            match index.filter(|&i| !taken[i]) {
                Some(index) => {
                    taken[index] = true;
                    *pick = Some(index);
                }
                None => {
                    return Err(BookError::RoleMismatch {
                        pod: pod.to_string(),
                        detail: format!(
                            "gang `{key}`: its rank {rank} in role `{}` is bound ahead already or named by another pod",
                            role_name(*role)
                        ),
                    })
                }
            }
        }
        for (pick, (role, _, pod)) in chosen.iter_mut().zip(pods) {
            if pick.is_none() {
                let index = (0..reservation.slots.len())
                    .find(|&i| !taken[i] && reservation.slots[i].role == *role)
                    .ok_or_else(|| BookError::NoOpenSlot {
                        pod: pod.to_string(),
                        gang: key.to_string(),
                        role: role_name(*role),
                    })?;
                taken[index] = true;
                *pick = Some(index);
            }
        }
        Ok(chosen.into_iter().flatten().collect())
    }

    /// [`Book::open_slot_indices`] as slots (role, host, GPUs), nothing changed: where the
    /// rest of a group bound ahead goes.
    pub fn open_slots(
        &self,
        key: &str,
        pods: &[(usize, Option<u32>, PodIdentity)],
    ) -> Result<Vec<RoleSlot>, BookError> {
        let indices = self.open_slot_indices(key, pods)?;
        let slots = &self.gangs[key].slots;
        Ok(indices.into_iter().map(|i| (slots[i].role, slots[i].host, slots[i].gpus)).collect())
    }

    /// The secondary scheduler's hold of the rest of a group whose leader is bound ahead
    /// ([`Book::hold_leader_for_bind`]): `pods` (role index, rank, pod) take the open slots as
    /// [`Book::open_slots`] gives them and their Bindings start under [`Ticket::Gang`]; one
    /// that fails gives the leader up too ([`Book::bind_finished`] lists it to delete).
    /// Errors as [`Book::open_slots`], with nothing changed.
    pub fn hold_rest_for_bind(
        &mut self,
        key: &str,
        pods: &[(usize, Option<u32>, PodIdentity)],
    ) -> Result<(Ticket, Vec<MemberBind>), BookError> {
        let indices = self.open_slot_indices(key, pods)?;
        let cluster = &self.cluster;
        let Some(reservation) = self.gangs.get_mut(key) else {
            return Err(BookError::NotBoundAhead { gang: key.to_string() });
        };
        reservation.binding = true;
        let mut members = Vec::with_capacity(pods.len());
        for (index, (_, _, pod)) in indices.into_iter().zip(pods) {
            members.push(reservation.slots[index].take_at_bind(cluster, pod));
        }
        Ok((Ticket::Gang(key.to_string()), members))
    }

    /// How pods describing `key`'s gang as `ours` differ from its reservation, if they do: in
    /// every field when a pod's plan made it (the secondary scheduler's own, or the
    /// extender's), in what a reserved gang's pods must agree on when the placement API made
    /// it ([`Book::reserved_shape_difference`]). The field, `ours`' value, the reservation's.
    pub fn group_shape_difference(&self, key: &str, ours: &Planned) -> Option<(&'static str, String, String)> {
        let reservation = self.gangs.get(key)?;
        match reservation.planned_by {
            Some(_) => planned_difference(ours, &reservation.planned),
            None => reserved_conflict(&self.cluster, ours, reservation),
        }
    }

    /// Drops `key`'s reservation when the secondary scheduler made it and no member is bound
    /// ahead (a leader whose Binding failed: the scheduler plans afresh at its retry); whether
    /// it did.
    pub fn drop_unbound_reservation(&mut self, key: &str) -> bool {
        let ours =
            self.gangs.get(key).is_some_and(|g| g.origin.is_none() && !g.binding && !g.slots.iter().any(|s| s.bound));
        ours && self.drop_reservation(key).is_some()
    }
}

/// The secondary scheduler's side of pods joining a gang that runs ([`super::running`]).
impl Book {
    /// Holds one pending pod of a gang that runs ([`Book::ran_whole`]) on the hosts of
    /// `allowed` (where it passes the node predicates), in the gang's joining reservation:
    /// `Ok(Some((host, GPUs)))`, `Ok(None)` for a pod of a role without GPUs (nothing held),
    /// or why it fits nowhere inside its scope near its members (nothing held for it).
    pub fn hold_joining_pod(
        &mut self,
        demand: &PodDemand,
        allowed: &[bool],
        now_ms: u64,
    ) -> Result<Option<(HostId, GpuMask)>, String> {
        let Some(membership) = demand.gang.clone() else {
            return Err(format!("pod {} belongs to no gang", demand.pod));
        };
        let (ours, own_role) = match demand.replica().map_err(|e| e.to_string())? {
            Some((replica, own)) => (Planned::Replica(Box::new(replica)), own),
            None => (Planned::Gang(demand.gang().map_err(|e| e.to_string())?), 0),
        };
        match self.hold_joining(demand, &membership, ours, own_role, allowed, now_ms).map_err(|e| e.to_string())? {
            super::running::JoinOutcome::NoGpus => Ok(None),
            super::running::JoinOutcome::Held(joined) => Ok(Some((joined.host, joined.gpus))),
            super::running::JoinOutcome::Nowhere(reason) | super::running::JoinOutcome::AtMaximum(reason) => {
                Err(reason)
            }
        }
    }

    /// Starts the Bindings of gang `key`'s joining reservation: every slot taken at bind, one
    /// [`Ticket::Gang`] (settled by [`Book::bind_finished`]). Errors: no joining reservation
    /// not already binding, or a slot without its pod.
    pub fn bind_joining(&mut self, key: &str) -> Result<(Ticket, Vec<MemberBind>), BookError> {
        let cluster = &self.cluster;
        let Some(reservation) = self.gangs.get_mut(key).filter(|r| r.joining && !r.binding) else {
            return Err(BookError::NotPlanned { pod: format!("the pods joining gang `{key}`") });
        };
        if reservation.slots.iter().any(|s| s.pod.is_none()) {
            return Err(BookError::NotPlanned { pod: format!("a pod joining gang `{key}`") });
        }
        Ok((Ticket::Gang(key.to_string()), start_binding_joining(cluster, reservation)))
    }

    /// Drops gang `key`'s joining reservation if it is not binding (a joining attempt that
    /// did not go through holds nothing); whether one was dropped.
    pub fn drop_joining(&mut self, key: &str) -> bool {
        if self.gangs.get(key).is_some_and(|r| r.joining && !r.binding) {
            return self.drop_reservation(key).is_some();
        }
        false
    }
}

/// Marks a joining reservation binding and takes every slot at bind by its pod.
fn start_binding_joining(cluster: &Cluster, reservation: &mut GangReservation) -> Vec<MemberBind> {
    reservation.binding = true;
    let mut members = Vec::with_capacity(reservation.slots.len());
    for slot in &mut reservation.slots {
        if let Some(pod) = slot.pod.clone() {
            members.push(slot.take_at_bind(cluster, &pod));
        }
    }
    members
}
