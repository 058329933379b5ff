//! The book's side of kube-scheduler's extender verbs: filter (a gang planned and reserved
//! whole at its first member), prioritize, preempt, and bind (held until the gang is whole at
//! bind, then every Binding at once, settled by `bind_finished`).

use super::running::JoinOutcome;
use super::*;
use topoplace_engine::placement::{beats, PackKey};

impl Book {
    /// kube-scheduler's filter for one pod over the nodes it offers. For a gang member, the
    /// first call plans and reserves the whole gang; later calls answer from the plan. A
    /// single pod is filtered by fit (its own earlier assumption given back first); when one
    /// node alone passes, kube-scheduler will not prioritize, so the pod is assumed there.
    pub fn filter(
        &mut self,
        demand: &PodDemand,
        offered: &[HostId],
        now_ms: u64,
    ) -> Result<Vec<NodeVerdict>, BookError> {
        let mut replica = demand.replica()?;
        let own_role = replica.as_ref().map_or(0, |(_, own)| *own);
        self.lapse_assumptions(now_ms);
        if let Some(bound) = self.bound.get(&demand.pod.uid) {
            let node = bound.node.clone();
            return Ok(self.only_node(offered, &node, &format!("pod is already bound to `{node}`")));
        }
        if let Some((replica, own)) = &replica {
            if replica.roles[*own].gang.is_none() {
                // A GPU-less role takes nothing from the book and is not waited for.
                return Ok(vec![NodeVerdict::Pass; offered.len()]);
            }
        }
        let Some(membership) = demand.gang.clone() else {
            let gang = demand.gang()?;
            // A pod whose Binding is in flight is answered by fit and assumed nowhere.
            let in_flight = self.singles.contains_key(&demand.pod.uid);
            self.unassume(&demand.pod.uid);
            let fits = self.with_planner(|planner, ledger| planner.fit_hosts(ledger, &gang, offered));
            let verdicts: Vec<NodeVerdict> = fits.into_iter().map(verdict_of).collect();
            let mut passing = offered.iter().zip(&verdicts).filter(|(_, v)| matches!(v, NodeVerdict::Pass));
            if let (false, Some((&host, _)), None) = (in_flight, passing.next(), passing.next()) {
                self.assume_best(demand, &gang, &[host], now_ms);
            }
            return Ok(verdicts);
        };
        let key = membership.key.clone();
        if let Some(reservation) = self.gangs.get(&key) {
            // The replica read above, not read again.
            let ours = match &replica {
                Some((replica, _)) => Planned::Replica(Box::new(replica.clone())),
                None => Planned::Gang(demand.gang()?),
            };
            check_shape(&self.cluster, demand, &ours, reservation, &membership)?;
            let own_slot = self.slot_of(&key, &demand.pod.uid);
            let planned_off_offer = own_slot.is_some_and(|slot| !offered.contains(&reservation.slots[slot].host));
            // Another open slot of its role on an offered node (kube-scheduler nominated the
            // pod to one node of a preemption's plan, and offers it that one).
            let open_offered = reservation
                .slots
                .iter()
                .any(|s| s.role == own_role && s.pod.is_none() && !s.bound && offered.contains(&s.host));
            // A member bound ahead of the gang pins the plan too.
            let any_at_bind = reservation.binding || reservation.slots.iter().any(|s| s.at_bind || s.bound);
            match (own_slot, planned_off_offer) {
                (Some(slot), true) if open_offered && !reservation.slots[slot].at_bind => {
                    // It moves to the open slot on an offered node ([`Book::assign_slot`]).
                    if let Some(reservation) = self.gangs.get_mut(&key) {
                        reservation.slots[slot].pod = None;
                    }
                }
                (_, true) if !any_at_bind => {
                    // kube-scheduler no longer offers the planned node: plan the gang again.
                    self.drop_reservation(&key);
                }
                _ => {}
            }
        }
        if !self.gangs.contains_key(&key) && matches!(membership.order, BindOrder::LeaderFirst { .. }) {
            if let Some(reason) = self.give_up_orphan_leader(&key, membership.size) {
                return Ok(offered.iter().map(|_| NodeVerdict::Fail(reason.clone())).collect());
            }
        }
        // A preemption's plan for this gang becomes its reservation once its victims left.
        self.settle_nominations(now_ms);
        if !self.gangs.contains_key(&key) && self.nominations.contains_key(&key) {
            let pending: Vec<&str> =
                self.nomination_pending(&key).into_iter().map(|h| self.cluster.host(h).name.as_str()).collect();
            let reason = format!(
                "gang `{key}` is planned by a preemption and waits for its victims to leave node(s) {}",
                pending.join(", ")
            );
            return Ok(offered.iter().map(|_| NodeVerdict::Fail(reason.clone())).collect());
        }
        let joining = self.gangs.get(&key).is_some_and(|r| r.joining)
            && self.slot_of(&key, &demand.pod.uid).is_none()
            && !self.has_open_slot(&key, own_role);
        if joining && self.gangs.get(&key).is_some_and(|r| r.binding) {
            let reason = format!("gang `{key}`: members joining it are binding now; this pod joins after them");
            return Ok(offered.iter().map(|_| NodeVerdict::Fail(reason.clone())).collect());
        }
        let new_leader = matches!(membership.order, BindOrder::LeaderFirst { leader: true });
        if new_leader && self.runs_unreserved(&key) {
            // A LeaderWorkerSet recreating its group: the new leader waits for the old
            // members to leave, then the group is planned whole.
            let reason = format!(
                "gang `{key}`: members of its earlier group still run ({}); its new leader waits until they have left",
                self.running_hosts(&key).len()
            );
            return Ok(offered.iter().map(|_| NodeVerdict::Fail(reason.clone())).collect());
        }
        if self.runs_unreserved(&key) || joining {
            let ours = match replica.take() {
                Some((replica, _)) => Planned::Replica(Box::new(replica)),
                None => Planned::Gang(demand.gang()?),
            };
            return self.join_running(demand, &membership, ours, own_role, offered, now_ms);
        }
        if !self.gangs.contains_key(&key) {
            let cluster_hosts = self.cluster.hosts.len();
            let mut mask = vec![false; cluster_hosts];
            for &host in offered {
                if let Some(flag) = mask.get_mut(host as usize) {
                    *flag = true;
                }
            }
            let (planned, own_gang) = match replica.take() {
                Some((replica, own)) => {
                    let own_gang = replica.roles[own].gang.clone();
                    (Planned::Replica(Box::new(replica)), own_gang)
                }
                None => {
                    let gang = demand.gang()?;
                    (Planned::Gang(gang.clone()), Some(gang))
                }
            };
            // kube-scheduler offers the nodes where this pod fits, which says little about
            // the replica's other roles (a host with 4 GPUs free is not offered to an 8-GPU
            // worker, but suits a 4-GPU leader): a replica's other roles are planned over the
            // view's open nodes (not cordoned, Ready), this pod's role over its offer.
            let placed = match &planned {
                Planned::Replica(_) => self.plan_slots(&planned, &self.open_hosts(), Some((own_role, &mask))),
                Planned::Gang(_) => self.plan_slots(&planned, &mask, None),
            };
            let (slots, holding) = match placed {
                Ok(placed) => placed,
                Err(why) => {
                    let what = match &planned {
                        Planned::Gang(gang) => format!("gang `{key}` ({} GPUs)", gang.total_gpus()),
                        Planned::Replica(replica) => {
                            format!("replica `{key}` ({} GPUs in its roles)", replica.total_gpus())
                        }
                    };
                    let reason = format!("{what} does not fit: {why}");
                    // Hosts the pod's own shape can never use are unresolvable by preemption.
                    let per_host: Vec<_> = match &own_gang {
                        Some(gang) => self.with_planner(|planner, ledger| {
                            offered.iter().map(|&h| planner.host_units(ledger, gang, h).err()).collect()
                        }),
                        None => vec![None; offered.len()],
                    };
                    return Ok(per_host
                        .into_iter()
                        .map(|rejection| match rejection {
                            Some((r, text)) if !r.resolvable_by_freeing_gpus() => NodeVerdict::Unresolvable(text),
                            _ => NodeVerdict::Fail(reason.clone()),
                        })
                        .collect());
                }
            };
            let asked = holding.iter().map(|(_, gpus)| gpus.count_ones()).sum();
            self.check_namespace_room(&demand.pod, asked)?;
            self.ledger
                .reserve(&gang_holder(&key), &holding)
                .map_err(|source| BookError::Ledger { pod: demand.pod.to_string(), source })?;
            self.gangs.insert(
                key.clone(),
                GangReservation {
                    planned,
                    slots,
                    expires_at_ms: now_ms + self.config.reservation_ttl_ms,
                    binding: false,
                    origin: None,
                    first_held_ms: None,
                    planned_by: Some(demand.pod.clone()),
                    leader_first: matches!(membership.order, BindOrder::LeaderFirst { .. }),
                    joining: false,
                    from_preemption: false,
                },
            );
            self.stats.gangs_reserved += 1;
        }
        if matches!(membership.order, BindOrder::LeaderFirst { .. }) {
            // A reservation the placement API made binds this group's leader ahead too.
            if let Some(reservation) = self.gangs.get_mut(&key) {
                reservation.leader_first = true;
            }
        }
        let slot = match self.assign_slot(&key, demand, &membership, (own_role, offered), now_ms) {
            Err(BookError::GangFull { size, .. })
                if membership.max.is_none_or(|max| max > size)
                    && membership.order == BindOrder::Together
                    && demand.roles.is_none() =>
            {
                // One pod more than the gang starts with: it joins once the gang runs.
                let reason = format!(
                    "gang `{key}` starts with its {size} members, all planned; this pod joins it once they run (or \
                     takes the slot of a member that left, once that member's hold lapses)"
                );
                return Ok(offered.iter().map(|_| NodeVerdict::Fail(reason.clone())).collect());
            }
            slot => slot?,
        };
        let Some(reservation) = self.gangs.get(&key) else {
            return Err(BookError::NotPlanned { pod: demand.pod.to_string() });
        };
        let host = reservation.slots[slot].host;
        let node = self.cluster.host(host).name.clone();
        if !offered.contains(&host) {
            let reason = format!("gang `{key}` has this member planned on `{node}`, which was not offered");
            return Ok(offered.iter().map(|_| NodeVerdict::Fail(reason.clone())).collect());
        }
        Ok(self.only_node(offered, &node, &format!("gang `{key}` has this member planned on `{node}`")))
    }

    /// Whether gang `key`'s reservation has a slot of role `role` that no pod holds.
    fn has_open_slot(&self, key: &str, role: usize) -> bool {
        self.gangs.get(key).is_some_and(|r| r.slots.iter().any(|s| s.role == role && s.pod.is_none() && !s.bound))
    }

    /// A pod of gang `key`, which runs: it joins on its own (see [`super::running`]), held
    /// as the gang's joining reservation (made, or grown by this pod's slot), and only that
    /// node passes; or every node fails saying why it fits nowhere near its members.
    fn join_running(
        &mut self,
        demand: &PodDemand,
        membership: &GangMembership,
        ours: Planned,
        own_role: usize,
        offered: &[HostId],
        now_ms: u64,
    ) -> Result<Vec<NodeVerdict>, BookError> {
        let mut within = vec![false; self.cluster.hosts.len()];
        for &host in offered {
            if let Some(flag) = within.get_mut(host as usize) {
                *flag = true;
            }
        }
        match self.hold_joining(demand, membership, ours, own_role, &within, now_ms)? {
            JoinOutcome::NoGpus => Ok(vec![NodeVerdict::Pass; offered.len()]),
            JoinOutcome::Nowhere(reason) | JoinOutcome::AtMaximum(reason) => {
                Ok(offered.iter().map(|_| NodeVerdict::Fail(reason.clone())).collect())
            }
            JoinOutcome::Held(joined) => {
                let node = self.cluster.host(joined.host).name.clone();
                let why = format!(
                    "gang `{}` runs; this member joins it on `{node}`, the nearest room to its members ({})",
                    membership.key, joined.near
                );
                Ok(self.only_node(offered, &node, &why))
            }
        }
    }

    /// A [`BindOrder::LeaderFirst`] gang about to be planned afresh while one of its members
    /// is bound alone: a leader bound ahead whose reservation is gone (topoplace restarted,
    /// or the cluster view dropped it). Nothing is held for its workers any more, so the
    /// leader is given up (queued for deletion, [`Book::take_undo`]) and the group is
    /// recreated whole; the reason for the filter, or `None` when there is no such member.
    fn give_up_orphan_leader(&mut self, key: &str, size: u32) -> Option<String> {
        let bound: Vec<PodIdentity> =
            self.bound.values().filter(|b| b.gang.as_deref() == Some(key)).map(|b| b.pod.clone()).collect();
        let [leader] = bound.as_slice() else { return None };
        if size < 2 || self.running.contains_key(key) {
            // Bound whole once: a member that left comes back and joins it.
            return None;
        }
        let leader = leader.clone();
        self.give_up_bound(&leader);
        self.undo.push(leader.clone());
        Some(format!(
            "gang `{key}`: its leader {leader} is bound but nothing is held for its workers any more (topoplace \
             restarted, or the reservation ended); the leader is deleted so the group is recreated whole"
        ))
    }

    fn only_node(&self, offered: &[HostId], node: &str, why: &str) -> Vec<NodeVerdict> {
        offered
            .iter()
            .map(|&h| {
                if self.cluster.host(h).name == node {
                    NodeVerdict::Pass
                } else {
                    NodeVerdict::Unresolvable(why.to_string())
                }
            })
            .collect()
    }

    pub(super) fn slot_of(&self, key: &str, uid: &str) -> Option<usize> {
        self.gangs.get(key)?.slots.iter().position(|s| s.pod.as_ref().is_some_and(|p| p.uid == uid))
    }

    /// Plans `planned` on the hosts of `mask` against the free GPUs, holding nothing: the
    /// slots of its members (a replica's role by role, each in rank order) and the GPUs to
    /// reserve per host; or why it does not fit. `role_mask` restricts one role of a replica
    /// further (role index, hosts).
    pub(super) fn plan_slots(
        &mut self,
        planned: &Planned,
        mask: &[bool],
        role_mask: Option<(usize, &[bool])>,
    ) -> Result<(Vec<Slot>, Holding), String> {
        self.with_planner(|planner, ledger| match planned {
            Planned::Gang(gang) => planner
                .place(&*ledger, PlaceRequest::new(gang).within(Some(mask)))
                .map(|p| (p.members.iter().map(|m| Slot::planned(m.host, m.gpus)).collect(), p.holding()))
                .map_err(|unplaced| unplaced.reason),
            Planned::Replica(replica) => planner
                .place_replica_offered(&*ledger, replica, &SolverChoice::Greedy, Some(mask), role_mask)
                .map(|placement| (replica_slots(replica, &placement), placement.holding()))
                .map_err(|unplaced| unplaced.reason),
        })
    }

    /// The member's slot in its gang's plan: kept if it has one, by rank (within its role
    /// `role`, 0 for a gang of one shape) if it says one and that slot's node is offered, else
    /// the role's first free slot on an offered node, else by rank, else the first free one. A
    /// new member refreshes the reservation's expiry.
    fn assign_slot(
        &mut self,
        key: &str,
        demand: &PodDemand,
        membership: &GangMembership,
        (role, offered): (usize, &[HostId]),
        now_ms: u64,
    ) -> Result<usize, BookError> {
        let ttl = self.config.reservation_ttl_ms;
        if let Some(slot) = self.slot_of(key, &demand.pod.uid) {
            if let Some(reservation) = self.gangs.get_mut(key).filter(|r| r.slots[slot].role != role) {
                // The pod says another role than when it took its slot (its role label was
                // changed): it gives the slot up, unless its bind is open.
                if reservation.slots[slot].at_bind {
                    return Err(BookError::RoleMismatch {
                        pod: demand.pod.to_string(),
                        detail: "it changed its role while its bind is held".into(),
                    });
                }
                reservation.slots[slot].pod = None;
                return self.assign_slot(key, demand, membership, (role, offered), now_ms);
            }
            // A member filtered again (kube-scheduler's retry) is a sign of life too.
            if let Some(reservation) = self.gangs.get_mut(key) {
                reservation.expires_at_ms = reservation.expires_at_ms.max(now_ms.saturating_add(ttl));
            }
            return Ok(slot);
        }
        let Some(reservation) = self.gangs.get_mut(key) else {
            return Err(BookError::NotPlanned { pod: demand.pod.to_string() });
        };
        let of_role: Vec<usize> = (0..reservation.slots.len()).filter(|&i| reservation.slots[i].role == role).collect();
        let by_rank = membership.rank.and_then(|r| of_role.get(r as usize).copied()).filter(|&i| {
            let slot = &reservation.slots[i];
            !slot.bound && (slot.pod.is_none() || !slot.at_bind)
        });
        // Without a free slot, a newcomer without a rank takes one whose pod's hold lapsed:
        // the pod watch sees bound pods only, so a parked member deleted and replaced still
        // holds its slot.
        let is_free = |i: usize| reservation.slots[i].pod.is_none() && !reservation.slots[i].bound;
        let offered_free =
            of_role.iter().copied().find(|&i| is_free(i) && offered.contains(&reservation.slots[i].host));
        let by_rank_offered = by_rank.filter(|&i| offered.contains(&reservation.slots[i].host));
        let free = of_role.iter().copied().find(|&i| is_free(i));
        let lapsed = membership
            .rank
            .is_none()
            .then(|| of_role.iter().copied().find(|&i| reservation.slots[i].lapsed && !reservation.slots[i].bound))
            .flatten();
        let Some(slot) = by_rank_offered.or(offered_free).or(by_rank).or(free).or(lapsed) else {
            return Err(BookError::GangFull {
                pod: demand.pod.to_string(),
                gang: key.to_string(),
                size: reservation.planned.members(),
            });
        };
        // A rank taken by another pod that has not reached bind belongs to a pod that was
        // replaced (same rank, new uid): the newcomer takes it.
        reservation.slots[slot].pod = Some(demand.pod.clone());
        reservation.slots[slot].at_bind = false;
        reservation.slots[slot].lapsed = false;
        // A reservation made through the API may hold longer than the extender's TTL.
        reservation.expires_at_ms = reservation.expires_at_ms.max(now_ms.saturating_add(ttl));
        Ok(slot)
    }

    /// Scores 0..=10 per offered node (kube-scheduler's prioritize; `extenderv1.MaxExtenderPriority`
    /// is 10). A gang member's planned node gets 10 and the rest 0. For a single pod the book
    /// chooses one node, the engine's best (ties: the tighter [`PackKey`], then the lowest host id), gives it 10 and assumes
    /// the pod there ([`Holder::Assumed`]); every other fitting node is scaled from the
    /// engine's score (the worst 0) and capped at 9, so kube-scheduler, whose own scores tie
    /// between like nodes, follows the choice; nodes the pod does not fit get 0. A pod bound
    /// already gets 10 on its node only.
    pub fn prioritize(&mut self, demand: &PodDemand, offered: &[HostId], now_ms: u64) -> Result<Vec<i64>, BookError> {
        self.lapse_assumptions(now_ms);
        let planned = match &demand.gang {
            Some(membership) => {
                let slot = self.slot_of(&membership.key, &demand.pod.uid);
                slot.and_then(|s| self.gangs.get(&membership.key).map(|g| g.slots[s].host))
            }
            // Bound, or its Binding in flight: the node the book holds its GPUs on.
            None => self
                .bound
                .get(&demand.pod.uid)
                .and_then(|b| self.bound_host(b))
                .or_else(|| self.singles.get(&demand.pod.uid).map(|s| s.host)),
        };
        if demand.gang.is_some() || planned.is_some() {
            return Ok(offered.iter().map(|&h| if Some(h) == planned { 10 } else { 0 }).collect());
        }
        let gang = demand.gang()?;
        let (totals, chosen) = self.assume_best(demand, &gang, offered, now_ms);
        let best = totals.iter().flatten().copied().fold(f64::NEG_INFINITY, f64::max);
        let worst = totals.iter().flatten().copied().fold(f64::INFINITY, f64::min);
        Ok(totals
            .iter()
            .enumerate()
            .map(|(index, total)| match total {
                None => 0,
                Some(_) if Some(index) == chosen => 10,
                Some(_) if best - worst < 1e-12 => 9,
                Some(t) => (((t - worst) / (best - worst) * 10.0).round() as i64).min(9),
            })
            .collect())
    }

    /// Scores a single pod on `offered` (its own assumption given back first) and assumes it
    /// on the best fitting node: the highest total, then the tighter pack ([`PackKey`]), then
    /// the lowest host id. Returns each offered node's
    /// engine total (`None`: does not fit) and the index of the chosen one.
    fn assume_best(
        &mut self,
        demand: &PodDemand,
        gang: &Gang,
        offered: &[HostId],
        now_ms: u64,
    ) -> (Vec<Option<f64>>, Option<usize>) {
        self.unassume(&demand.pod.uid);
        let verdicts = self.with_planner(|planner, ledger| planner.score_hosts(ledger, gang, offered));
        let mut chosen: Option<(usize, f64, PackKey, GpuMask)> = None;
        let mut totals = Vec::with_capacity(verdicts.len());
        for (index, verdict) in verdicts.into_iter().enumerate() {
            let HostVerdict::Fits { score, members, pack } = verdict else {
                totals.push(None);
                continue;
            };
            totals.push(Some(score.total));
            let better = match chosen {
                None => true,
                Some((at, total, best_pack, _)) => {
                    beats(score.total, pack, (total, best_pack))
                        || (!beats(total, best_pack, (score.total, pack)) && offered[index] < offered[at])
                }
            };
            if better {
                chosen = Some((index, score.total, pack, members.iter().fold(0, |m, p| m | p.gpus)));
            }
        }
        if let Some((index, _, _, gpus)) = chosen {
            self.assume(&demand.pod, offered[index], gpus, now_ms);
        }
        (totals, chosen.map(|(index, ..)| index))
    }

    /// A pod reached bind for `node`. A single pod gets its GPUs chosen and reserved now; a
    /// gang member is marked arrived, and the last one to arrive gets every member to bind.
    pub fn bind_arrive(&mut self, demand: &PodDemand, node: &str, now_ms: u64) -> Result<BindStep, BookError> {
        let pod = demand.pod.to_string();
        let Some(host) = self.cluster.host_in(node, &demand.pool) else {
            return Err(BookError::UnknownNode { pod, node: node.to_string() });
        };
        if let Some(bound) = self.bound.get(&demand.pod.uid) {
            // Bound already (a retried bind, or its Binding raced our bookkeeping): the
            // Binding will meet a 409 and succeed only on the same node.
            if bound.node != node {
                return Err(BookError::WrongNode { pod, planned: bound.node.clone(), asked: node.to_string() });
            }
            let member =
                MemberBind { pod: demand.pod.clone(), host, node: node.to_string(), gpus: mask_indices(bound.gpus) };
            return Ok(BindStep::Bind { ticket: Ticket::Bound(demand.pod.uid.clone()), members: vec![member] });
        }
        let Some(membership) = demand.gang.clone() else {
            let uid = demand.pod.uid.clone();
            if let Some(single) = self.singles.get(&uid) {
                return Ok(BindStep::Bind { ticket: Ticket::Pod(uid), members: vec![single.clone()] });
            }
            let gang = demand.gang()?;
            // The assumption has done its work: the bind says the node (the GPUs on it are
            // chosen again below, and come out the same when it is the assumed node).
            self.unassume(&uid);
            let verdict = self.with_planner(|planner, ledger| planner.score_hosts(ledger, &gang, &[host]));
            let members = match verdict.into_iter().next() {
                Some(HostVerdict::Fits { members, .. }) => members,
                Some(HostVerdict::Rejected { text, .. }) => {
                    return Err(BookError::NoRoomAtBind { pod, node: node.to_string(), reason: text })
                }
                None => return Err(BookError::UnknownNode { pod, node: node.to_string() }),
            };
            let mask = members.iter().fold(0, |m, p| m | p.gpus);
            self.ledger
                .reserve(&pod_holder(&uid), &[(host, mask)])
                .map_err(|source| BookError::Ledger { pod, source })?;
            let member = MemberBind { pod: demand.pod.clone(), host, node: node.to_string(), gpus: mask_indices(mask) };
            self.singles.insert(uid.clone(), member.clone());
            return Ok(BindStep::Bind { ticket: Ticket::Pod(uid), members: vec![member] });
        };
        let key = membership.key;
        let Some(slot) = self.slot_of(&key, &demand.pod.uid) else {
            return Err(BookError::NotPlanned { pod });
        };
        let (ttl, hold) = (self.config.reservation_ttl_ms, self.config.bind_hold_ms);
        let cluster = &self.cluster;
        let Some(reservation) = self.gangs.get_mut(&key) else {
            return Err(BookError::NotPlanned { pod });
        };
        let planned = &cluster.host(reservation.slots[slot].host).name;
        if planned != node {
            return Err(BookError::WrongNode { pod, planned: planned.clone(), asked: node.to_string() });
        }
        let leader_ahead = reservation.leader_first
            && matches!(membership.order, BindOrder::LeaderFirst { leader: true })
            && !reservation.slots[slot].bound;
        if leader_ahead {
            // The leader binds alone; its workers do not exist until it is bound.
            if reservation.binding {
                return Err(BookError::InFlight { gang: key });
            }
            reservation.binding = true;
            let at = &mut reservation.slots[slot];
            at.at_bind = true;
            let member = MemberBind {
                pod: demand.pod.clone(),
                host: at.host,
                node: node.to_string(),
                gpus: mask_indices(at.gpus),
            };
            return Ok(BindStep::Bind {
                ticket: Ticket::Leader { gang: key, uid: demand.pod.uid.clone() },
                members: vec![member],
            });
        }
        if reservation.joining {
            // A pod joining a gang that runs binds on its own: it waits for nobody, and a
            // joiner deleted before its bind holds up no other.
            if reservation.slots[slot].at_bind {
                return Err(BookError::InFlight { gang: key });
            }
            let at = &mut reservation.slots[slot];
            // In flight: never answered at a hold, and the reservation does not expire under it.
            (at.at_bind, at.lapsed, at.held_until_ms) = (true, false, u64::MAX);
            let member = at.binding_of(cluster, demand.pod.clone());
            return Ok(BindStep::Bind {
                ticket: Ticket::Joined { gang: key, uid: demand.pod.uid.clone() },
                members: vec![member],
            });
        }
        let arrived = !reservation.slots[slot].at_bind;
        if arrived {
            let slot = &mut reservation.slots[slot];
            (slot.at_bind, slot.lapsed, slot.held_until_ms) = (true, false, now_ms.saturating_add(hold));
            reservation.expires_at_ms = reservation.expires_at_ms.max(now_ms.saturating_add(ttl));
            reservation.first_held_ms.get_or_insert(now_ms);
        }
        if reservation.binding || !reservation.slots.iter().all(|s| s.at_bind || s.bound) {
            let only_lapsed_missing =
                reservation.slots.iter().all(|s| s.at_bind || s.bound || (s.lapsed && s.pod.is_some()));
            let retry_now = if arrived && !reservation.binding && only_lapsed_missing {
                reservation.slots.iter().filter(|s| s.lapsed).filter_map(|s| s.pod.clone()).collect()
            } else {
                Vec::new()
            };
            return Ok(BindStep::Wait { gang: key, retry_now });
        }
        let members = start_binding(cluster, reservation);
        Ok(BindStep::Bind { ticket: Ticket::Gang(key), members })
    }

    /// After a [`Ticket::Leader`] was bound: when every other member is already at bind
    /// (they reached it while the leader's Binding was in flight, and wait), their Bindings
    /// to create now; `None` while some have not reached bind (the last to arrive binds them).
    pub fn bind_rest(&mut self, key: &str) -> Option<(Ticket, Vec<MemberBind>)> {
        let cluster = &self.cluster;
        let reservation = self.gangs.get_mut(key)?;
        let rest_at_bind = reservation.slots.iter().all(|s| s.at_bind || s.bound);
        if reservation.binding || !rest_at_bind || reservation.slots.iter().all(|s| s.bound) {
            return None;
        }
        let members = start_binding(cluster, reservation);
        Some((Ticket::Gang(key.to_string()), members))
    }

    /// The outcome of a ticket's Bindings: `Ok` per pod bound (or already bound to the
    /// planned node), `Err(reason)` per pod that was not.
    pub fn bind_finished(
        &mut self,
        ticket: &Ticket,
        outcomes: &[(PodIdentity, Result<(), String>)],
        now_ms: u64,
    ) -> BindFinish {
        let failures: Vec<String> =
            outcomes.iter().filter_map(|(pod, r)| r.as_ref().err().map(|e| format!("{pod}: {e}"))).collect();
        // The shape of a gang bound whole, remembered while it runs.
        let mut planned: Option<Planned> = None;
        let mut joined = false;
        let members: Vec<(PodIdentity, HostId, GpuMask, Option<String>)> = match ticket {
            Ticket::Bound(_) => {
                return if failures.is_empty() {
                    BindFinish::Bound
                } else {
                    BindFinish::RolledBack { delete: Vec::new(), failures }
                };
            }
            Ticket::Leader { gang, uid } => return self.leader_bound(gang, uid, outcomes, failures, now_ms),
            Ticket::Joined { gang, uid } => return self.joined_bound(gang, uid, failures, now_ms),
            Ticket::Gang(key) => {
                let Some(reservation) = self.drop_reservation(key) else {
                    return BindFinish::RolledBack { delete: Vec::new(), failures };
                };
                if !failures.is_empty() {
                    // The members bound ahead (a LeaderWorkerSet leader) go with the rest.
                    let ahead = self.give_up_bound_ahead(&reservation);
                    self.stats.gangs_rolled_back += 1;
                    let delete = bound_of(outcomes).chain(ahead).collect();
                    return BindFinish::RolledBack { delete, failures };
                }
                planned = Some(reservation.planned.clone());
                joined = reservation.joining;
                reservation
                    .slots
                    .iter()
                    .filter(|s| !s.bound)
                    .filter_map(|s| Some((s.pod.clone()?, s.host, s.gpus, Some(key.to_string()))))
                    .collect()
            }
            Ticket::Pod(uid) => {
                let Some(single) = self.singles.remove(uid) else {
                    return BindFinish::RolledBack { delete: Vec::new(), failures };
                };
                if let Err(error) = self.ledger.release(&pod_holder(uid)) {
                    self.ledger_fault("settling a single pod's Binding", error);
                }
                let mask = indices_mask(&single.gpus);
                vec![(single.pod, single.host, mask, None)]
            }
        };
        if !failures.is_empty() {
            if ticket.gang().is_some() {
                self.stats.gangs_rolled_back += 1;
            }
            let delete = bound_of(outcomes).collect();
            return BindFinish::RolledBack { delete, failures };
        }
        for (pod, host, gpus, gang) in members {
            // The GPUs were just released from the ticket's holder, so this succeeds.
            if let Err(error) = self.ledger.reserve(&pod_holder(&pod.uid), &[(host, gpus)]) {
                self.ledger_fault("holding a bound pod's GPUs", error);
            }
            let (node, pool) = (self.cluster.host(host).name.clone(), self.cluster.host(host).pool.clone());
            self.bound
                .insert(pod.uid.clone(), BoundPod { pod, node, pool, gpus, recorded: gpus, gang, bound_at_ms: now_ms });
            self.stats.pods_bound += 1;
            self.stats.members_joined += u64::from(joined);
        }
        if let Ticket::Gang(key) = ticket {
            self.stats.gangs_bound += 1;
            match (planned, self.running.get_mut(key)) {
                // A joining reservation's shape is the one its gang ran with already.
                (Some(_), Some(Some(_))) if joined => {}
                (Some(planned), _) => {
                    self.running.insert(key.clone(), Some(planned));
                }
                (None, _) => {}
            }
        }
        BindFinish::Bound
    }

    /// A ticket none of whose Bindings was made because the adapter could not confirm a
    /// member with the API server (an extender request names its pods by its body alone): the
    /// reservation is kept as it was before the bind (not binding, no member at bind, a member
    /// bound ahead kept: a refusal is no failed Binding, so it gives nobody up), so the
    /// members bind again when kube-scheduler retries them; the slots of `not_those` (uids the
    /// API server says are not the pods described) are freed for the real pods, and the
    /// reservation lives [`BookConfig::reservation_ttl_ms`] more. A single pod's GPUs chosen
    /// at bind are released.
    pub fn bind_refused(&mut self, ticket: &Ticket, not_those: &[String], now_ms: u64) {
        let ttl = self.config.reservation_ttl_ms;
        match ticket {
            Ticket::Gang(key) | Ticket::Leader { gang: key, .. } => {
                let Some(reservation) = self.gangs.get_mut(key) else { return };
                reservation.binding = false;
                reservation.expires_at_ms = reservation.expires_at_ms.max(now_ms.saturating_add(ttl));
                // A leader's ticket is the leader alone: workers already at bind stay there,
                // to be bound after it ([`Book::bind_rest`]).
                let leader = match ticket {
                    Ticket::Leader { uid, .. } => Some(uid.as_str()),
                    _ => None,
                };
                let in_ticket = |slot: &Slot| leader.is_none_or(|uid| slot.pod.as_ref().is_some_and(|p| p.uid == uid));
                for slot in reservation.slots.iter_mut().filter(|s| !s.bound && in_ticket(s)) {
                    (slot.at_bind, slot.lapsed) = (false, false);
                    if slot.pod.as_ref().is_some_and(|p| not_those.contains(&p.uid)) {
                        slot.pod = None;
                    }
                }
            }
            Ticket::Joined { gang, uid } => {
                if let Some(reservation) = self.gangs.get_mut(gang) {
                    let ttl = self.config.reservation_ttl_ms;
                    reservation.expires_at_ms = reservation.expires_at_ms.max(now_ms.saturating_add(ttl));
                    for slot in reservation.slots.iter_mut().filter(|s| s.pod.as_ref().is_some_and(|p| &p.uid == uid)) {
                        (slot.at_bind, slot.lapsed) = (false, false);
                        if not_those.contains(uid) {
                            slot.pod = None;
                        }
                    }
                }
            }
            Ticket::Pod(uid) => {
                if self.singles.remove(uid).is_some() {
                    if let Err(error) = self.ledger.release(&pod_holder(uid)) {
                        self.ledger_fault("releasing a refused single pod's GPUs", error);
                    }
                }
            }
            Ticket::Bound(_) => {}
        }
    }

    /// The outcome of a [`Ticket::Joined`]: the pod's slot leaves the joining reservation
    /// (which ends with its last slot); bound, its GPUs are held as its pod's; not bound, they
    /// are given back (kube-scheduler retries it, and it joins afresh).
    fn joined_bound(&mut self, key: &str, uid: &str, mut failures: Vec<String>, now_ms: u64) -> BindFinish {
        let Some(slot) = self.drop_joining_slot(key, uid) else {
            // The pod left while its Binding was in flight (its slot went with it).
            failures.push(format!("gang `{key}`: pod {uid} left while joining"));
            return BindFinish::RolledBack { delete: Vec::new(), failures };
        };
        if !failures.is_empty() {
            return BindFinish::RolledBack { delete: Vec::new(), failures };
        }
        let Some(pod) = slot.pod else { return BindFinish::Bound };
        if let Err(error) = self.ledger.reserve(&pod_holder(uid), &[(slot.host, slot.gpus)]) {
            self.ledger_fault("holding a joined pod's GPUs as its pod's", error);
        }
        let node = self.cluster.host(slot.host).name.clone();
        self.bound.insert(
            uid.to_string(),
            BoundPod {
                pod,
                node,
                pool: self.cluster.host(slot.host).pool.clone(),
                gpus: slot.gpus,
                recorded: slot.gpus,
                gang: Some(key.to_string()),
                bound_at_ms: now_ms,
            },
        );
        self.stats.pods_bound += 1;
        self.stats.members_joined += 1;
        BindFinish::Bound
    }

    /// The outcome of a [`Ticket::Leader`]: bound, the leader's GPUs move from the gang's
    /// holder to its pod's and the rest stay held for the workers (a fresh TTL and rounds of
    /// holds: LWS creates them now); not bound, the reservation stays as it was and the
    /// leader's retry binds it again.
    fn leader_bound(
        &mut self,
        key: &str,
        uid: &str,
        outcomes: &[(PodIdentity, Result<(), String>)],
        failures: Vec<String>,
        now_ms: u64,
    ) -> BindFinish {
        let ttl = self.config.reservation_ttl_ms;
        let Some(reservation) = self.gangs.get_mut(key) else {
            if failures.is_empty() {
                // Bound, but its reservation ended meanwhile (the cluster view changed): no
                // workers' GPUs are held for it, so it is given up, not left alone.
                let failures = vec![format!("gang `{key}`: its reservation ended while its leader was binding")];
                let delete = bound_of(outcomes).collect();
                return BindFinish::RolledBack { delete, failures };
            }
            return BindFinish::RolledBack { delete: Vec::new(), failures };
        };
        reservation.binding = false;
        let Some(slot) = reservation.slots.iter().position(|s| s.pod.as_ref().is_some_and(|p| p.uid == uid)) else {
            return BindFinish::RolledBack { delete: Vec::new(), failures };
        };
        reservation.slots[slot].at_bind = false;
        if !failures.is_empty() {
            return BindFinish::RolledBack { delete: Vec::new(), failures };
        }
        reservation.slots[slot].bound = true;
        reservation.expires_at_ms = reservation.expires_at_ms.max(now_ms.saturating_add(ttl));
        // The workers must be whole at bind within the rounds of holds from now.
        reservation.first_held_ms = Some(now_ms);
        let at = reservation.slots[slot].clone();
        let rest = merge_by_host(reservation.slots.iter().filter(|s| !s.bound).map(|s| (s.host, s.gpus)));
        let Some(pod) = at.pod else { return BindFinish::Bound };
        // One holder gives the leader's GPUs to another: released whole, taken again in two.
        if let Err(error) = self.ledger.release(&gang_holder(key)) {
            self.ledger_fault("moving a leader's GPUs out of its gang's reservation", error);
        }
        if let Err(error) = self.ledger.reserve(&pod_holder(uid), &[(at.host, at.gpus)]) {
            self.ledger_fault("holding a leader's GPUs as its pod's", error);
        }
        if rest.is_empty() {
            // A group of the leader alone: bound whole.
            if let Some(reservation) = self.gangs.remove(key) {
                self.running.insert(key.to_string(), Some(reservation.planned));
            }
            self.stats.gangs_bound += 1;
        } else if let Err(error) = self.ledger.reserve(&gang_holder(key), &rest) {
            self.ledger_fault("holding a gang's GPUs for its workers", error);
        }
        let node = self.cluster.host(at.host).name.clone();
        let pool = self.cluster.host(at.host).pool.clone();
        self.bound.insert(
            uid.to_string(),
            BoundPod {
                pod,
                node,
                pool,
                gpus: at.gpus,
                recorded: at.gpus,
                gang: Some(key.to_string()),
                bound_at_ms: now_ms,
            },
        );
        self.stats.pods_bound += 1;
        BindFinish::Bound
    }
}

/// The pods whose Bindings succeeded.
fn bound_of(outcomes: &[(PodIdentity, Result<(), String>)]) -> impl Iterator<Item = PodIdentity> + '_ {
    outcomes.iter().filter(|(_, r)| r.is_ok()).map(|(pod, _)| pod.clone())
}

/// Marks `reservation` binding and lists the Bindings of its members not bound yet.
fn start_binding(cluster: &Cluster, reservation: &mut GangReservation) -> Vec<MemberBind> {
    reservation.binding = true;
    reservation.slots.iter().filter(|s| !s.bound).filter_map(|s| Some(s.binding_of(cluster, s.pod.clone()?))).collect()
}
