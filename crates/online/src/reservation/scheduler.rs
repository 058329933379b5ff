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

    /// The planned hosts of a gang reserved and not yet binding (through the placement API),
    /// in member order.
    pub fn reserved_hosts(&self, gang: &str) -> Option<Vec<HostId>> {
        let reservation = self.gangs.get(gang).filter(|g| !g.binding)?;
        Some(reservation.slots.iter().map(|s| s.host).collect())
    }

    /// How `gang` differs from the gang reserved under `key` in what a reserved gang's pods must
    /// agree on (its size, GPUs per member), if it does: the field, `gang`'s value, the
    /// reservation's.
    pub fn reserved_shape_difference(&self, key: &str, gang: &Gang) -> Option<(&'static str, String, String)> {
        let reservation = self.gangs.get(key)?;
        gang_shape_difference(gang, &reservation.gang).filter(|(field, _, _)| RESERVED_FIELDS.contains(field))
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
                    gang,
                    slots,
                    expires_at_ms: now_ms,
                    binding: false,
                    origin: None,
                    first_held_ms: None,
                    planned_by: pods.first().cloned(),
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
        let mut members = Vec::with_capacity(pods.len());
        for (slot, pod) in reservation.slots.iter_mut().zip(pods) {
            slot.pod = Some(pod.clone());
            slot.at_bind = true;
            members.push(MemberBind {
                pod: pod.clone(),
                host: slot.host,
                node: cluster.host(slot.host).name.clone(),
                gpus: mask_indices(slot.gpus),
            });
        }
        Ok((Ticket::Gang(key.to_string()), members))
    }
}
