//! The placement API's side of the book: planning gangs against the live view (a dry run, or
//! reserved until an expiry under one reservation id), releasing such a reservation,
//! explaining a gang, the capacity left for a shape, and the cluster state.
//!
//! A reservation made here is an ordinary gang reservation (ledger holder
//! `gang:{namespace}/{name}`) tagged with its id: the extender gives its GPUs to no one else,
//! and when pods of that gang arrive at filter they are placed on it, member by member.

use std::collections::{BTreeMap, BTreeSet};

use thiserror::Error;

use super::{at_bind, gang_holder, replica_slots, Book, Expired, GangReservation, Planned, Slot};
use topoplace_engine::ledger::mask_indices;
use topoplace_engine::placement::capacity::{CapacityReport, ReplicaCapacity};
use topoplace_engine::placement::replica::ReplicaPlacement;
use topoplace_engine::placement::{
    batch_order, replica_order, GangPlacement, PlaceRequest, Planner, PlannerConfig, SolverChoice, Unplaced,
};
use topoplace_engine::topology::{HostId, ProductId};
use topoplace_engine::workload::{Gang, Replica};

/// A gang as the API names it.
#[derive(Debug, Clone, PartialEq)]
pub struct GangRequest {
    /// `namespace/name`, the key its pods' gang labels give.
    pub key: String,
    /// The gang; its `name` is the key.
    pub gang: Gang,
    /// Only hosts of this product.
    pub product: Option<ProductId>,
}

/// A replica with roles as the API names it ([`Book::plan_replicas`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaRequest {
    /// `namespace/name`; the replica's `name` is the key.
    pub key: String,
    pub replica: Replica,
    /// Only hosts of this product.
    pub product: Option<ProductId>,
}

/// What [`Book::plan_replicas`] found: the replicas that fit (in request order) and those
/// that did not.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaPlanOutcome {
    pub placements: Vec<ReplicaPlacement>,
    pub unplaced: Vec<Unplaced>,
    /// How the batch was planned, when the solver asked for is not what ran.
    pub note: Option<String>,
    /// The reservation id and when it expires, when the placements are held.
    pub reservation: Option<(String, u64)>,
}

#[derive(Debug, Clone)]
pub struct PlanOptions {
    pub dry_run: bool,
    pub ttl_ms: u64,
    pub solver: SolverChoice,
    /// Reserve the gangs that fit even when some do not.
    pub allow_partial: bool,
    /// Who asked (the token's name), recorded on the reservation.
    pub owner: String,
    /// Explain the gangs that do not fit.
    pub explain: bool,
}

/// What the API recorded on a reservation it made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiReservation {
    pub id: String,
    pub owner: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PlanOutcome {
    /// The gangs that fit, in request order (held only when `reservation` is set).
    pub placements: Vec<GangPlacement>,
    pub unplaced: Vec<Unplaced>,
    /// The reservation id and when it expires.
    pub reservation: Option<(String, u64)>,
    /// How the request was planned, when it says something: the exact solver's time for the
    /// request ([`REQUEST_EXACT_TIME_MAX`]) spent before every gang was placed.
    pub note: Option<String>,
}

impl PlanOutcome {
    pub fn placed_all(&self) -> bool {
        self.unplaced.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Released {
    pub gangs: Vec<String>,
    pub gpus: u64,
    /// Members that were waiting at bind on a released gang: their binds must be answered.
    pub dropped: Vec<Expired>,
}

/// A request the API cannot act on. Nothing has changed when one is returned.
#[derive(Debug, Error, PartialEq)]
pub enum RequestError {
    #[error("{0}")]
    Invalid(String),
    #[error("gang `{gang}` is already reserved ({by}); release it first, or plan with dry_run")]
    AlreadyReserved { gang: String, by: String },
    #[error("reservation `{id}` does not exist (it expired, was released, or its gangs were bound)")]
    UnknownReservation { id: String },
    #[error("reservation `{id}`: its gangs are being bound and can no longer be released")]
    Binding { id: String },
    #[error("reservation `{id}` belongs to {owner}; only its owner may release it")]
    NotOwner { id: String, owner: String },
}

/// The exact solver's time over one request's gangs ([`Book::plan_gangs`]) or replicas with
/// roles ([`Book::plan_replicas`]): each gang or replica gets what is left of it, at most its
/// configured time limit, and the ones after it is spent are placed by the greedy search
/// alone, with a note naming this limit. The book's one worker, which the extender's verbs
/// queue behind, is then held by the solver for no longer than this, however many gangs a
/// request names.
pub const REQUEST_EXACT_TIME_MAX: std::time::Duration = std::time::Duration::from_secs(4);

/// One node's verdict for [`Book::explain`].
#[derive(Debug, Clone, PartialEq)]
pub struct NodeFit {
    pub node: String,
    pub units: u32,
    /// Why the node holds no unit of the gang.
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Explained {
    pub outcome: Result<GangPlacement, Unplaced>,
    pub nodes: Vec<NodeFit>,
}

/// [`Book::explain_replica`]'s answer: the replica's placement, or why it does not fit (the
/// reason names the role, and slice, that did not fit; the explanation is that part's); and
/// per node asked, one verdict per role that takes GPUs, in role order.
#[derive(Debug, Clone, PartialEq)]
pub struct ExplainedReplica {
    pub outcome: Result<ReplicaPlacement, Unplaced>,
    /// (role name, the node's verdict for one member of that role).
    pub nodes: Vec<(String, NodeFit)>,
}

/// The cluster as [`Book::cluster_state`] reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterState {
    pub cluster: String,
    pub levels: Vec<String>,
    pub gpus: u64,
    pub free_gpus: u64,
    pub reserved_gpus: u64,
    pub bound_gpus: u64,
    /// Per product: hosts, GPUs, free GPUs.
    pub products: Vec<(ProductId, u32, u64, u64)>,
    pub domains: Vec<DomainState>,
    pub hosts: Vec<HostState>,
    pub reservations: Vec<ReservationState>,
    /// Preemptions under way (plans waiting for their victims to leave).
    pub preemptions: Vec<super::PreemptionState>,
    /// The latest preemption verdict of each unit that asked lately, newest first.
    pub verdicts: Vec<super::VerdictState>,
    pub generation: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DomainState {
    pub level: String,
    pub path: String,
    pub hosts: u32,
    pub gpus: u64,
    pub free_gpus: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HostState {
    pub name: String,
    pub product: ProductId,
    pub gpus: u8,
    pub memory_mib: u64,
    pub free: Vec<u8>,
    pub domains: Vec<String>,
    pub clique: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ReservationState {
    pub origin: Option<ApiReservation>,
    pub gang: String,
    pub gpus: u64,
    pub expires_in_ms: u64,
    pub members_assigned: u32,
    pub members: u32,
}

/// A request names at least one gang, and each once.
fn check_keys<'a>(keys: impl Iterator<Item = &'a str>) -> Result<(), RequestError> {
    let mut seen = BTreeSet::new();
    for key in keys {
        if !seen.insert(key) {
            return Err(RequestError::Invalid(format!("gang `{key}` appears twice in the request")));
        }
    }
    if seen.is_empty() {
        return Err(RequestError::Invalid("the request names no gangs".into()));
    }
    Ok(())
}

impl Book {
    /// Hosts of `product` (all hosts when `None`), by host id.
    /// The hosts an API request may use: open ones ([`Book::set_closed_nodes`]) of `product`
    /// (any when `None`); `None` when that is every host.
    fn api_mask(&self, product: Option<ProductId>) -> Option<Vec<bool>> {
        let open = self.open_hosts();
        let mask: Vec<bool> = self
            .cluster
            .hosts
            .iter()
            .zip(&open)
            .map(|(h, &open)| open && product.is_none_or(|p| h.product == p))
            .collect();
        (mask.iter().any(|&m| !m)).then_some(mask)
    }

    /// Checks what can be checked without placing: the topology names, the product, and
    /// that the gang is not larger than every GPU of the cluster it may use.
    fn check_request(&mut self, request: &GangRequest) -> Result<(), RequestError> {
        self.with_planner(|planner, _| planner.check_gang(&request.gang))
            .map_err(|e| RequestError::Invalid(e.to_string()))?;
        let key = &request.key;
        self.check_product(key, request.product)?;
        self.check_usable(&format!("gang `{key}`"), &request.gang, request.product)
    }

    /// A product the request names must be in the cluster.
    fn check_product(&self, key: &str, product: Option<ProductId>) -> Result<(), RequestError> {
        let Some(product) = product else { return Ok(()) };
        if self.cluster.hosts.iter().any(|h| h.product == product) {
            return Ok(());
        }
        let present: Vec<&str> = self.cluster.products().iter().map(|p| p.get().name).collect();
        Err(RequestError::Invalid(format!(
            "gang `{key}`: product `{}` is not in the cluster (it has: {})",
            product.get().name,
            present.join(", ")
        )))
    }

    /// Devices of the cluster of `product` (any when `None`) that `gang` may take (any when
    /// `None`): at least its memory floor per device, MIG devices of the profile it asks for,
    /// and no MIG device or shared replica for members of several GPUs or tensor parallelism
    /// (the planner's own host filter, `Planner::host_slots`, without what is free).
    fn usable_gpus(&self, product: Option<ProductId>, gang: Option<&Gang>) -> u64 {
        self.cluster
            .hosts
            .iter()
            .filter(|h| product.is_none_or(|p| h.product == p))
            .filter(|h| {
                gang.is_none_or(|g| {
                    h.memory_mib >= g.memory_floor_mib
                        && g.pool.as_ref().is_none_or(|pool| *pool == h.pool)
                        && g.mig_profile
                            .as_deref()
                            .is_none_or(|want| h.mig_profile.as_deref().is_some_and(|p| p.eq_ignore_ascii_case(want)))
                        && (!h.partitioned() || (g.gpus_per_member == 1 && g.tensor_parallel == 1))
                })
            })
            .map(|h| u64::from(h.gpu_count))
            .sum()
    }

    /// A gang (or a role's members, `who` naming it) needs no more GPUs than the cluster has
    /// of the product and memory it may use, in all.
    fn check_usable(&self, who: &str, gang: &Gang, product: Option<ProductId>) -> Result<(), RequestError> {
        let usable = self.usable_gpus(product, Some(gang));
        let need = gang.total_gpus();
        if need <= usable {
            return Ok(());
        }
        let mut what = String::from("GPUs");
        if let Some(product) = product {
            what = format!("{} GPUs", product.get().name);
        }
        if gang.memory_floor_mib > 0 {
            what.push_str(&format!(" with at least {} MiB", gang.memory_floor_mib));
        }
        if let Some(profile) = &gang.mig_profile {
            what = match product {
                Some(product) => format!(
                    "devices of product {} that are MIG devices of profile {profile} (MIG devices are a product of \
                     their own, `<GPU>-MIG-<profile>`)",
                    product.get().name
                ),
                None => format!("MIG devices of profile {profile}"),
            };
        } else if (gang.gpus_per_member > 1 || gang.tensor_parallel > 1)
            && self.cluster.hosts.iter().any(|h| h.partitioned() && product.is_none_or(|p| h.product == p))
        {
            what.push_str(" (whole GPUs: not MIG devices or shared replicas)");
        }
        Err(RequestError::Invalid(format!(
            "{who}: needs {need} GPUs ({} members x {}), but the cluster has only {usable} {what} in all",
            gang.members, gang.gpus_per_member
        )))
    }

    /// Places `requests` against the free GPUs, the largest first. With `dry_run` nothing is
    /// held; otherwise the placed gangs are reserved under one new id until `ttl_ms` from
    /// `now_ms`, or (without `allow_partial`) nothing is when any gang does not fit. The
    /// exact solver has [`REQUEST_EXACT_TIME_MAX`] for the whole request.
    pub fn plan_gangs(
        &mut self,
        requests: &[GangRequest],
        options: &PlanOptions,
        now_ms: u64,
    ) -> Result<PlanOutcome, RequestError> {
        check_keys(requests.iter().map(|r| r.key.as_str()))?;
        for request in requests {
            self.check_request(request)?;
            if !options.dry_run {
                self.check_not_reserved(&request.key)?;
            }
        }
        let gangs: Vec<Gang> = requests.iter().map(|r| r.gang.clone()).collect();
        let masks: Vec<Option<Vec<bool>>> = requests.iter().map(|r| self.api_mask(r.product)).collect();
        let mut placed: Vec<(usize, GangPlacement)> = Vec::new();
        let mut unplaced = Vec::new();
        let explain_config = options.explain.then(|| PlannerConfig { explain: true, ..self.config.planner.clone() });
        let cluster = &self.cluster;
        let mut explaining = explain_config.map(|config| Planner::new(cluster, config));
        // The exact solver's time is shared by the request's gangs: past the budget, the rest
        // are placed by the greedy search alone.
        let started = std::time::Instant::now();
        let mut budget_spent = false;
        let solver = &options.solver;
        let mut place = |planner: &mut Planner, ledger: &mut topoplace_engine::ledger::Ledger<super::Holder>| {
            for index in batch_order(&gangs) {
                let gang = &gangs[index];
                let left = REQUEST_EXACT_TIME_MAX.saturating_sub(started.elapsed());
                budget_spent |= left.is_zero() && !matches!(solver, SolverChoice::Greedy);
                let this = solver.within_time(left);
                let request = PlaceRequest::new(gang).solver(&this).within(masks[index].as_deref());
                match planner.place(ledger, request) {
                    Ok(placement) => match ledger.reserve(&gang_holder(&requests[index].key), &placement.holding()) {
                        Ok(()) => placed.push((index, placement)),
                        Err(error) => unplaced.push(Unplaced {
                            gang: gang.name.clone(),
                            reason: format!("the ledger refused the placement: {error}"),
                            explanation: None,
                        }),
                    },
                    Err(why) => unplaced.push(why),
                }
            }
        };
        match explaining.as_mut() {
            Some(planner) => place(planner, &mut self.ledger),
            None => self.with_planner(place),
        }
        placed.sort_by_key(|(index, _)| *index);
        let note = budget_spent.then(|| {
            format!(
                "the exact solver's {} ms for the request (REQUEST_EXACT_TIME_MAX) were spent, so later gangs were \
                 placed by the greedy search",
                REQUEST_EXACT_TIME_MAX.as_millis()
            )
        });
        let keep = !options.dry_run && !placed.is_empty() && (unplaced.is_empty() || options.allow_partial);
        if !keep {
            for (index, _) in &placed {
                // Reserved just above under this holder.
                if let Err(error) = self.ledger.release(&gang_holder(&requests[*index].key)) {
                    self.ledger_fault("undoing a plan", error);
                }
            }
            return Ok(PlanOutcome {
                placements: placed.into_iter().map(|(_, p)| p).collect(),
                unplaced,
                reservation: None,
                note,
            });
        }
        self.api_reservations += 1;
        let id = format!("r{}", self.api_reservations);
        let expires_at_ms = now_ms.saturating_add(options.ttl_ms);
        let origin = ApiReservation { id: id.clone(), owner: options.owner.clone() };
        for (index, placement) in &placed {
            let request = &requests[*index];
            let slots = placement.members.iter().map(|m| Slot::planned(m.host, m.gpus)).collect();
            self.insert_api_reservation(
                &request.key,
                Planned::Gang(request.gang.clone()),
                slots,
                expires_at_ms,
                &origin,
            );
        }
        Ok(PlanOutcome {
            placements: placed.into_iter().map(|(_, p)| p).collect(),
            unplaced,
            reservation: Some((id, expires_at_ms)),
            note,
        })
    }

    /// Places replicas with roles against the free GPUs, the largest first, each seeing the
    /// ones placed before it. With `options.dry_run` nothing is held; otherwise the placed
    /// replicas are reserved under one new id until `options.ttl_ms` from `now_ms` (each a
    /// reservation of its roles that the replica's pods claim at filter, or the secondary
    /// scheduler binds), or (without `options.allow_partial`) nothing is when any replica
    /// does not fit. With `options.solver` exact, each replica is placed by the exact model of
    /// its roles where it answers (the search's placement otherwise, with a note), with auto by
    /// the better of the two; the exact solver has [`REQUEST_EXACT_TIME_MAX`] for the whole
    /// request. With `options.explain`, an unplaced replica carries the explanation of the
    /// part that did not fit. Errors: an empty request, a key twice, an unknown
    /// topology level or product, a replica larger than every usable GPU of the cluster
    /// ([`RequestError::Invalid`], naming the replica), a key reserved already
    /// ([`RequestError::AlreadyReserved`], unless a dry run).
    pub fn plan_replicas(
        &mut self,
        requests: &[ReplicaRequest],
        options: &PlanOptions,
        now_ms: u64,
    ) -> Result<ReplicaPlanOutcome, RequestError> {
        check_keys(requests.iter().map(|r| r.key.as_str()))?;
        for request in requests {
            self.check_replica_request(request)?;
            if !options.dry_run {
                self.check_not_reserved(&request.key)?;
            }
        }
        let solver = &options.solver;
        let masks: Vec<Option<Vec<bool>>> = requests.iter().map(|r| self.api_mask(r.product)).collect();
        let replicas: Vec<&Replica> = requests.iter().map(|r| &r.replica).collect();
        let order = replica_order(&replicas);
        let mut scratch: topoplace_engine::ledger::Ledger<String> = self.ledger.scratch();
        let mut placed: Vec<(usize, ReplicaPlacement)> = Vec::new();
        let mut unplaced = Vec::new();
        // The exact solver's time is shared by the request's replicas: past the budget, the
        // rest are placed by the search alone.
        let started = std::time::Instant::now();
        let mut budget_spent = false;
        let mut place_all = |planner: &mut Planner| {
            for &index in &order {
                let request = &requests[index];
                let left = REQUEST_EXACT_TIME_MAX.saturating_sub(started.elapsed());
                budget_spent |= left.is_zero() && !matches!(solver, SolverChoice::Greedy);
                let this = solver.within_time(left);
                match planner.place_replica(&scratch, &request.replica, &this, masks[index].as_deref()) {
                    Ok(placement) => match scratch.reserve(&request.key, &placement.holding()) {
                        Ok(()) => placed.push((index, placement)),
                        Err(error) => unplaced.push(Unplaced {
                            gang: request.key.clone(),
                            reason: format!("the ledger refused the placement: {error}"),
                            explanation: None,
                        }),
                    },
                    Err(why) => unplaced.push(why),
                }
            }
        };
        if options.explain {
            // An unplaced replica then carries the planner's explanation of the part that did
            // not fit (rejected hosts, domains, candidates).
            let config = PlannerConfig { explain: true, ..self.config.planner.clone() };
            place_all(&mut Planner::new(&self.cluster, config));
        } else {
            self.with_planner(|planner, _| place_all(planner));
        }
        placed.sort_by_key(|(index, _)| *index);
        let note = (!matches!(solver, SolverChoice::Greedy)).then(|| {
            let mut note = "replicas with roles are planned one by one, each by the exact model of its roles where it \
                            answers (not one joint model of the request)"
                .to_string();
            if budget_spent {
                note.push_str(&format!(
                    "; the exact solver's {} ms for the request were spent, so later replicas were placed by the search",
                    REQUEST_EXACT_TIME_MAX.as_millis()
                ));
            }
            note
        });
        let keep = !options.dry_run && !placed.is_empty() && (unplaced.is_empty() || options.allow_partial);
        let reservation = if keep { Some(self.reserve_replicas(requests, &placed, options, now_ms)?) } else { None };
        Ok(ReplicaPlanOutcome { placements: placed.into_iter().map(|(_, p)| p).collect(), unplaced, note, reservation })
    }

    /// Holds `placed` (request index, placement, found on a scratch copy of this ledger with
    /// nothing changed since) as reservations under one new id. A placement the ledger
    /// refuses is a ledger fault: what this call reserved is released and nothing is held.
    fn reserve_replicas(
        &mut self,
        requests: &[ReplicaRequest],
        placed: &[(usize, ReplicaPlacement)],
        options: &PlanOptions,
        now_ms: u64,
    ) -> Result<(String, u64), RequestError> {
        for (done, (index, placement)) in placed.iter().enumerate() {
            if let Err(error) = self.ledger.reserve(&gang_holder(&requests[*index].key), &placement.holding()) {
                let text = error.to_string();
                self.ledger_fault("reserving a planned replica", error);
                for (earlier, _) in &placed[..done] {
                    if let Err(error) = self.ledger.release(&gang_holder(&requests[*earlier].key)) {
                        self.ledger_fault("undoing a replica reservation", error);
                    }
                }
                return Err(RequestError::Invalid(format!(
                    "replica `{}`: the ledger refused its placement ({text}); nothing is held",
                    requests[*index].key
                )));
            }
        }
        self.api_reservations += 1;
        let id = format!("r{}", self.api_reservations);
        let expires_at_ms = now_ms.saturating_add(options.ttl_ms);
        let origin = ApiReservation { id: id.clone(), owner: options.owner.clone() };
        for (index, placement) in placed {
            let request = &requests[*index];
            // A gang without roles in the same request is reserved as the gang it is, so its
            // pods (which carry no roles) can claim it.
            let (planned, slots) = match (request.replica.as_single(), placement.parts.as_slice()) {
                (Some(gang), [part]) => {
                    let slots = part.placement.members.iter().map(|m| Slot::planned(m.host, m.gpus)).collect();
                    (Planned::Gang(gang.clone()), slots)
                }
                _ => (Planned::Replica(Box::new(request.replica.clone())), replica_slots(&request.replica, placement)),
            };
            self.insert_api_reservation(&request.key, planned, slots, expires_at_ms, &origin);
        }
        Ok((id, expires_at_ms))
    }

    /// Records a reservation the API made (its GPUs already held under the gang's holder).
    fn insert_api_reservation(
        &mut self,
        key: &str,
        planned: Planned,
        slots: Vec<Slot>,
        expires_at_ms: u64,
        origin: &ApiReservation,
    ) {
        let reservation = GangReservation {
            planned,
            slots,
            expires_at_ms,
            binding: false,
            origin: Some(origin.clone()),
            first_held_ms: None,
            planned_by: None,
            leader_first: false,
            joining: false,
            from_preemption: false,
        };
        self.gangs.insert(key.to_string(), reservation);
        self.stats.gangs_reserved += 1;
    }

    /// [`RequestError::AlreadyReserved`] when `key` has a reservation (the API's or the
    /// extender's).
    fn check_not_reserved(&self, key: &str) -> Result<(), RequestError> {
        if self.nominations.contains_key(key) {
            let by = "a preemption's plan, waiting for its victims to leave".to_string();
            return Err(RequestError::AlreadyReserved { gang: key.to_string(), by });
        }
        let Some(existing) = self.gangs.get(key) else { return Ok(()) };
        let by = match &existing.origin {
            Some(origin) => format!("reservation `{}` of {}", origin.id, origin.owner),
            None => "by a scheduler (the extender, or the secondary scheduler binding it), for its pods".into(),
        };
        Err(RequestError::AlreadyReserved { gang: key.to_string(), by })
    }

    /// [`Book::check_request`] for a replica: names and levels, the product, and its GPUs
    /// against every GPU it may use (each role's memory floor counted for that role).
    fn check_replica_request(&mut self, request: &ReplicaRequest) -> Result<(), RequestError> {
        let key = &request.key;
        self.with_planner(|planner, _| planner.check_replica(&request.replica))
            .map_err(|e| RequestError::Invalid(e.to_string()))?;
        self.check_product(key, request.product)?;
        let usable_all = self.usable_gpus(request.product, None);
        if request.replica.as_single().is_none() && request.replica.total_gpus() > usable_all {
            return Err(RequestError::Invalid(format!(
                "gang `{key}`: its roles need {} GPUs together, but the cluster has only {usable_all} usable GPUs in all",
                request.replica.total_gpus()
            )));
        }
        if let Some(gang) = request.replica.as_single() {
            return self.check_usable(&format!("gang `{key}`"), gang, request.product);
        }
        for role in &request.replica.roles {
            if let Some(gang) = &role.gang {
                self.check_usable(&format!("gang `{key}`: role `{}`", role.name), gang, request.product)?;
            }
        }
        Ok(())
    }

    /// Releases the gangs of reservation `id` that are not being bound. With `by`, only a
    /// reservation that `by` made.
    pub fn release_reservation(&mut self, id: &str, by: Option<&str>) -> Result<Released, RequestError> {
        let mut owner = None;
        let of_id: Vec<(String, bool)> = self
            .gangs
            .iter()
            .filter_map(|(key, g)| {
                let origin = g.origin.as_ref().filter(|o| o.id == id)?;
                owner = Some(origin.owner.clone());
                Some((key.clone(), g.binding))
            })
            .collect();
        let Some(owner) = owner else {
            return Err(RequestError::UnknownReservation { id: id.to_string() });
        };
        if by.is_some_and(|by| by != owner) {
            return Err(RequestError::NotOwner { id: id.to_string(), owner });
        }
        if of_id.iter().all(|(_, binding)| *binding) {
            return Err(RequestError::Binding { id: id.to_string() });
        }
        let mut released = Released { gangs: Vec::new(), gpus: 0, dropped: Vec::new() };
        for (key, binding) in of_id {
            if binding {
                continue;
            }
            if let Some(holding) = self.ledger.holding(&gang_holder(&key)) {
                released.gpus += holding.iter().map(|&(_, m)| u64::from(m.count_ones())).sum::<u64>();
            }
            if let Some(reservation) = self.end_reservation(&key) {
                released
                    .dropped
                    .push(Expired::Reservation { gang: key.clone(), members_at_bind: at_bind(&reservation) });
                released.gangs.push(key);
            }
        }
        Ok(released)
    }

    /// Why `request` does or does not fit now, with candidates and rejected hosts, and a
    /// verdict for each of `nodes`. Reserves nothing.
    pub fn explain(&mut self, request: &GangRequest, nodes: &[String]) -> Result<Explained, RequestError> {
        self.check_request(request)?;
        let hosts = self.node_ids(nodes, request.gang.mig_profile.as_deref())?;
        let config = PlannerConfig { explain: true, ..self.config.planner.clone() };
        let mut planner = Planner::new(&self.cluster, config);
        let mask = self.api_mask(request.product);
        let outcome = planner.place(&self.ledger, PlaceRequest::new(&request.gang).within(mask.as_deref()));
        let nodes = hosts.iter().map(|&host| self.node_fit(&mut planner, &request.gang, host)).collect();
        Ok(Explained { outcome, nodes })
    }

    /// [`Book::explain`] for a replica with roles: where Plan would place it now (greedy,
    /// nothing held) or why it does not fit, and for each node in `nodes` how many members of
    /// each GPU role it holds now, or why none. Errors as [`Book::plan_replicas`] gives them
    /// for the replica, and a node not in the cluster.
    pub fn explain_replica(
        &mut self,
        request: &ReplicaRequest,
        nodes: &[String],
    ) -> Result<ExplainedReplica, RequestError> {
        self.check_replica_request(request)?;
        let hosts = self.node_ids(nodes, None)?;
        let config = PlannerConfig { explain: true, ..self.config.planner.clone() };
        let mut planner = Planner::new(&self.cluster, config);
        let mask = self.api_mask(request.product);
        let outcome = planner.place_replica(&self.ledger, &request.replica, &SolverChoice::Greedy, mask.as_deref());
        let mut verdicts = Vec::new();
        for &host in &hosts {
            for role in &request.replica.roles {
                let Some(gang) = &role.gang else { continue };
                verdicts.push((role.name.clone(), self.node_fit(&mut planner, gang, host)));
            }
        }
        Ok(ExplainedReplica { outcome, nodes: verdicts })
    }

    /// The hosts of `nodes`, or an error naming the first node not in the cluster. Of a node
    /// with several hosts (the mixed MIG strategy's pools), the one of MIG devices of
    /// `mig_profile` when asked for, else its first.
    fn node_ids(&self, nodes: &[String], mig_profile: Option<&str>) -> Result<Vec<HostId>, RequestError> {
        nodes
            .iter()
            .map(|node| {
                let of_profile = |&host: &HostId| {
                    let theirs = self.cluster.host(host).mig_profile.as_deref();
                    mig_profile.is_some_and(|want| theirs.is_some_and(|p| p.eq_ignore_ascii_case(want)))
                };
                self.cluster
                    .hosts_of(node)
                    .find(of_profile)
                    .or_else(|| self.cluster.hosts_of(node).next())
                    .ok_or_else(|| RequestError::Invalid(format!("node `{node}` is not in the cluster")))
            })
            .collect()
    }

    /// One node's verdict for one member (or unit) of `gang`: how many it holds now, or why
    /// none (a closed node says so first).
    fn node_fit(&self, planner: &mut Planner, gang: &Gang, host: HostId) -> NodeFit {
        let node = self.cluster.host(host).name.clone();
        if self.closed.contains(&node) {
            let reason = Some("the node is cordoned or not Ready".to_string());
            return NodeFit { node, units: 0, reason };
        }
        match planner.host_units(&self.ledger, gang, host) {
            Ok(units) => NodeFit { node, units, reason: None },
            Err((_, text)) => NodeFit { node, units: 0, reason: Some(text) },
        }
    }

    /// How many more replicas of `request`'s shape fit now, broken down by `by_level` (a label
    /// key or short name; the innermost level when `None`).
    pub fn capacity(&mut self, request: &GangRequest, by_level: Option<&str>) -> Result<CapacityReport, RequestError> {
        let level = self.capacity_level(by_level)?;
        self.check_product(&request.key, request.product)?;
        let mask = self.api_mask(request.product);
        self.with_planner(|planner, ledger| planner.capacity(ledger, &request.gang, mask.as_deref(), level))
            .map_err(|e| RequestError::Invalid(e.to_string()))
    }

    /// [`Book::capacity`] for a replica with roles: counted by placing replicas one after
    /// another on a copy of the ledger ([`Planner::replica_capacity`]: a lower bound, capped).
    pub fn replica_capacity(
        &mut self,
        request: &ReplicaRequest,
        by_level: Option<&str>,
    ) -> Result<ReplicaCapacity, RequestError> {
        let level = self.capacity_level(by_level)?;
        self.check_product(&request.key, request.product)?;
        let mask = self.api_mask(request.product);
        self.with_planner(|planner, ledger| planner.replica_capacity(ledger, &request.replica, mask.as_deref(), level))
            .map_err(|e| RequestError::Invalid(e.to_string()))
    }

    /// The level a capacity answer is broken down by: `by_level` (a label key or short name),
    /// `None` for the innermost.
    fn capacity_level(&self, by_level: Option<&str>) -> Result<Option<usize>, RequestError> {
        let Some(name) = by_level else { return Ok(None) };
        self.cluster.level_index(name).map(Some).ok_or_else(|| {
            RequestError::Invalid(format!(
                "by_level `{name}` is not a level of this cluster (levels: {})",
                if self.cluster.levels.is_empty() { "none".to_string() } else { self.cluster.levels.join(", ") }
            ))
        })
    }

    /// Hosts, GPUs free and held, domains and reservations (`with_hosts`: the per-host list).
    pub fn cluster_state(&self, now_ms: u64, with_hosts: bool) -> ClusterState {
        let cluster = &self.cluster;
        let ledger = &self.ledger;
        let free_of = |h: usize| u64::from(ledger.free(h as HostId).count_ones());
        let held = |gangs: bool| -> u64 {
            ledger
                .holders()
                .filter(|(holder, _)| matches!(holder, super::Holder::Gang(_) | super::Holder::Nominated(_)) == gangs)
                .flat_map(|(_, holding)| holding.iter().map(|&(_, m)| u64::from(m.count_ones())))
                .sum()
        };
        let mut products: BTreeMap<ProductId, (u32, u64, u64)> = BTreeMap::new();
        for (index, host) in cluster.hosts.iter().enumerate() {
            let entry = products.entry(host.product).or_default();
            entry.0 += 1;
            entry.1 += u64::from(host.gpu_count);
            entry.2 += free_of(index);
        }
        let mut domains = Vec::new();
        for (level, level_domains) in cluster.domains.iter().enumerate() {
            for domain in level_domains {
                let range = domain.hosts.start as usize..domain.hosts.end as usize;
                domains.push(DomainState {
                    level: cluster.levels[level].clone(),
                    path: domain.path.clone(),
                    hosts: domain.hosts.len() as u32,
                    gpus: cluster.hosts[range.clone()].iter().map(|h| u64::from(h.gpu_count)).sum(),
                    free_gpus: range.map(free_of).sum(),
                });
            }
        }
        let hosts = if with_hosts {
            cluster
                .hosts
                .iter()
                .enumerate()
                .map(|(index, host)| HostState {
                    name: host.name.clone(),
                    product: host.product,
                    gpus: host.gpu_count,
                    memory_mib: host.memory_mib,
                    free: mask_indices(ledger.free(index as HostId)),
                    domains: host
                        .domain_path
                        .iter()
                        .enumerate()
                        .map(|(level, &d)| cluster.domains[level][d as usize].path.clone())
                        .collect(),
                    clique: host.clique.map(|c| cluster.cliques[c as usize].name.clone()),
                })
                .collect()
        } else {
            Vec::new()
        };
        let reservations = self
            .gangs
            .iter()
            .map(|(key, g)| ReservationState {
                origin: g.origin.clone(),
                gang: key.clone(),
                gpus: g.slots.iter().map(|s| u64::from(s.gpus.count_ones())).sum(),
                // The API's own expiry: a held bind's limit ends the hold, not the reservation.
                expires_in_ms: g.expires_at_ms.saturating_sub(now_ms),
                members_assigned: g.slots.iter().filter(|s| s.pod.is_some()).count() as u32,
                members: g.planned.members(),
            })
            .collect();
        ClusterState {
            cluster: cluster.name.clone(),
            levels: cluster.levels.clone(),
            gpus: cluster.total_gpus(),
            free_gpus: ledger.free_gpus(),
            reserved_gpus: held(true),
            bound_gpus: held(false),
            products: products.into_iter().map(|(p, (hosts, gpus, free))| (p, hosts, gpus, free)).collect(),
            domains,
            hosts,
            reservations,
            preemptions: self.preemption_states(now_ms),
            verdicts: self.verdict_states(now_ms),
            generation: self.generation(),
        }
    }
}
