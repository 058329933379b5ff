//! The secondary scheduler's preemption: a unit that does not fit (a single pod, a gang of
//! one shape, a replica with roles, a group bound leader first before its leader is bound,
//! pods without GPUs, or pods joining their running gang) evicts pods of lower priority, as
//! few and as low as it can, whole gangs only.
//!
//! As kube-scheduler does (`pkg/scheduler/framework/plugins/defaultpreemption`): only pods of a
//! lower priority are victims, a pod with `preemptionPolicy: Never` never preempts, candidates
//! with lower-priority victims and fewer of them come first, and victims that are not needed
//! are reprieved, highest priority first. Unlike it, the whole unit is judged at once (a gang
//! on several nodes), a victim that is part of a gang takes its whole gang along (on every
//! node), and the plan is held: the GPUs its victims give back are kept for it
//! ([`Book::nominate`]; pods without GPUs hold none) until all have, and the nominated pods'
//! CPU and memory count as used on their nodes for units of their priority or lower (as
//! kube-scheduler counts nominated pods), so nothing else takes them; the unit is tried on the
//! first cycle after they are all gone. PodDisruptionBudgets count as kube-scheduler counts
//! them ([`super::budgets`]): nodes with fewer victims that break a budget come first, victims
//! that would break one are reprieved first, and a budget the chosen victims still break is
//! named.

use super::*;

/// What preempts, as its plans are tried with victims gone.
enum Preemptor<'a> {
    /// A single pod or a gang of one shape: `members[i]` takes slot `i` of `planned`.
    Gang { planned: Planned, members: &'a [PendingPod] },
    /// A replica with roles (`topoplace.io/roles`), GPU-less roles included.
    Replica { planned: Planned, key: &'a UnitKey, gang_key: String, parts: ReplicaParts<'a>, members: &'a [PendingPod] },
    /// A group bound leader first ([`BindOrder::LeaderFirst`]) before its leader is bound:
    /// the whole group is planned where the leader passes the predicates, the leader's
    /// requests standing in for its workers' (they do not exist yet); the leader takes the
    /// `rank`-th slot of role `role` (or the role's first).
    LeaderFirst { planned: Planned, leader: &'a PendingPod, role: usize, rank: usize },
    /// Pods that take no GPUs: CPU, memory and the node predicates only.
    GpuLess { members: &'a [PendingPod] },
    /// Pods joining their gang while it runs (members recreated, or more of an elastic
    /// gang): each where it would join (inside the gang's scope, nearest its members).
    Join { members: &'a [PendingPod] },
}

impl Preemptor<'_> {
    /// What is planned, for the nomination's record: `None` for GPU-less pods (nothing held)
    /// and joiners (their plan's shape comes with the trial).
    fn planned(&self) -> Option<&Planned> {
        match self {
            Preemptor::Gang { planned, .. }
            | Preemptor::Replica { planned, .. }
            | Preemptor::LeaderFirst { planned, .. } => Some(planned),
            Preemptor::GpuLess { .. } | Preemptor::Join { .. } => None,
        }
    }
}

/// A plan found with some victims gone: the GPU slots to hold (role, host, GPUs; none for
/// GPU-less pods) and the node each preemptor pod is nominated to (`status.nominatedNodeName`).
#[derive(Debug, Clone)]
struct Trial {
    slots: Vec<RoleSlot>,
    nominated: Vec<(PodIdentity, String)>,
    /// The shape held for joiners ([`Book::plan_joins_without`]).
    joining: Option<Planned>,
}

/// A set of pods evicted together: one pod, or every bound pod of a gang.
#[derive(Debug, Clone)]
struct VictimUnit {
    pods: Vec<PodIdentity>,
    /// The highest priority among its pods.
    priority: i32,
    nodes: BTreeSet<String>,
}

impl Scheduler {
    /// The key of `members`' unit in the book's nominations: its gang's key, `join:{key}` for
    /// pods joining their gang while it runs (the gang's own key is its joining reservation's),
    /// or `pod:{uid}`.
    pub(super) fn nomination_key(book: &Book, members: &[PendingPod]) -> String {
        match &members[0].demand.gang {
            Some(gang) if book.ran_whole(&gang.key) => format!("join:{}", gang.key),
            Some(gang) => gang.key.clone(),
            None => format!("pod:{}", members[0].demand.pod.uid),
        }
    }

    /// Tries preemption for a unit of `priority` that did not fit: a [`Decision::Preempt`]
    /// naming the victims (its GPU plan already held in `book` as a nomination, unless it takes
    /// no GPUs), or why not.
    pub(super) fn try_preempt(
        &mut self,
        book: &mut Book,
        (key, members): (&UnitKey, &[PendingPod]),
        (priority, held_back): (i32, Option<&[bool]>),
        now_ms: u64,
    ) -> Result<Decision, String> {
        let nomination = Self::nomination_key(book, members);
        if let Some(nodes) = book.nomination_waits_on(&nomination) {
            return Err(format!("it preempted and waits for its victims to leave node(s) {}", nodes.join(", ")));
        }
        if members.iter().any(|m| m.never_preempts) {
            return Err("its preemptionPolicy is Never".into());
        }
        if self.budgets_awaited {
            return Err("the PodDisruptionBudgets are not listed yet (the scheduler needs list and watch on \
                 poddisruptionbudgets.policy): nothing is preempted before they are"
                .into());
        }
        if let Some(gang) = members[0].demand.gang.as_ref() {
            if !book.bound_ahead(&gang.key).is_empty() {
                return Err("its leader is bound with its workers' GPUs held: the workers bind there".into());
            }
        }
        let preemptor = self.preemptor(book, key, members)?;
        let node_by_node = self.config.preemption == PreemptionMode::NodeByNode;
        let units = self.victim_units(book, priority, node_by_node);
        if units.is_empty() {
            return Err(format!("no pod of a priority below {priority} can be evicted"));
        }
        if node_by_node {
            let Preemptor::Gang { planned: Planned::Gang(gang), .. } = &preemptor else {
                return Err("node-by-node preemption (the study's baseline) is for pods and gangs of one shape".into());
            };
            return self.preempt_node_by_node(book, members, gang, &units, (priority, held_back), now_ms);
        }
        // Nodes by their victims: fewest victims that break a PodDisruptionBudget first, then
        // lowest highest-priority, then fewest pods, then name.
        let mut by_node: BTreeMap<&str, (i32, usize, Vec<usize>)> = BTreeMap::new();
        for (index, unit) in units.iter().enumerate() {
            for node in &unit.nodes {
                let entry = by_node.entry(node.as_str()).or_insert((i32::MIN, 0, Vec::new()));
                entry.0 = entry.0.max(unit.priority);
                entry.1 += unit.pods.len();
                entry.2.push(index);
            }
        }
        let mut order: Vec<(&str, i32, usize, Vec<usize>, usize)> = by_node
            .into_iter()
            .map(|(node, (p, n, on_node))| {
                let broken = self.violating(&units, &on_node.iter().copied().collect()).0.len();
                (node, p, n, on_node, broken)
            })
            .collect();
        order.sort_by(|a, b| (a.4, a.1, a.2, a.0).cmp(&(b.4, b.1, b.2, b.0)));
        let chosen_of =
            |prefix: usize| -> BTreeSet<usize> { order[..prefix].iter().flat_map(|o| o.3.clone()).collect() };
        let fits = |scheduler: &mut Self, book: &mut Book, chosen: &BTreeSet<usize>| {
            scheduler.fits_without(book, (&preemptor, held_back), &units, chosen)
        };
        let Some(mut trial) = fits(self, book, &chosen_of(order.len())) else {
            return Err(format!(
                "it does not fit even with every pod of a priority below {priority} gone ({} pods)",
                units.iter().map(|u| u.pods.len()).sum::<usize>()
            ));
        };
        // The shortest run of nodes, in that order, whose victims gone let it fit.
        let (mut low, mut high) = (0, order.len());
        while low + 1 < high {
            let mid = (low + high) / 2;
            match fits(self, book, &chosen_of(mid)) {
                Some(fits) => (high, trial) = (mid, fits),
                None => low = mid,
            }
        }
        let mut chosen = chosen_of(high);
        self.reprieve(book, &units, (&mut chosen, &mut trial), fits);
        let victims: Vec<PodIdentity> = chosen.iter().flat_map(|&u| units[u].pods.clone()).collect();
        if victims.is_empty() {
            // It fits without evicting anything: what kept it out was not room (hosts kept
            // for a starving unit ahead, a node predicate): no preemption.
            return Err("evicting pods would not make room it can use".into());
        }
        let nodes: BTreeSet<&str> = chosen.iter().flat_map(|&u| units[u].nodes.iter().map(String::as_str)).collect();
        if let Some(planned) = preemptor.planned().or(trial.joining.as_ref()) {
            let leader_first = matches!(preemptor, Preemptor::LeaderFirst { .. });
            book.nominate(
                &nomination,
                (planned.clone(), &trial.slots),
                members[0].demand.pod.clone(),
                leader_first,
                now_ms,
            )
            .map_err(|e| e.to_string())?;
        }
        let names: Vec<String> = victims.iter().map(ToString::to_string).collect();
        let broken = self.violating(&units, &chosen).1;
        let in_book = preemptor.planned().is_some() || trial.joining.is_some();
        let budgets_broken = broken.iter().cloned().collect();
        self.record_preempting(
            book,
            (&nomination, members),
            (&victims, &trial.nominated),
            (budgets_broken, priority, in_book, now_ms),
        );
        let budgets = match broken.is_empty() {
            true => String::new(),
            false => format!(
                "; this breaks PodDisruptionBudget(s) {} (budgets are kept where the choice of victims allows, best \
                 effort as in kube-scheduler)",
                broken.iter().cloned().collect::<Vec<_>>().join(", ")
            ),
        };
        let held = match &preemptor {
            Preemptor::GpuLess { .. } => "it goes there once they have left".to_string(),
            Preemptor::Join { .. } => format!(
                "the GPUs they give back are held for {} joining gang `{}` until all have",
                if members.len() > 1 { "the pods" } else { "this pod" },
                members[0].demand.gang.as_ref().map_or("", |g| g.key.as_str())
            ),
            _ => format!(
                "the GPUs they give back are held for {} until all have",
                if members.len() > 1 || matches!(preemptor, Preemptor::LeaderFirst { .. }) {
                    format!("gang `{nomination}`")
                } else {
                    "this pod".to_string()
                }
            ),
        };
        let message = format!(
            "preempting {} pod(s) of a priority below {priority} on node(s) {} ({}); {held}{budgets}",
            victims.len(),
            nodes.iter().copied().collect::<Vec<_>>().join(", "),
            names.join(", "),
        );
        Ok(Decision::Preempt {
            pods: members.iter().map(|m| m.demand.pod.clone()).collect(),
            victims,
            nominated: trial.nominated,
            message,
        })
    }

    /// What `members` (one unit of the queue) are as a preemptor, checked as placing them
    /// checks them; errors name the pod and the field.
    fn preemptor<'a>(&self, book: &Book, key: &'a UnitKey, members: &'a [PendingPod]) -> Result<Preemptor<'a>, String> {
        if members[0].demand.gang.as_ref().is_some_and(|g| book.ran_whole(&g.key)) {
            if members.iter().all(|m| m.demand.gpus == 0) {
                return Ok(Preemptor::GpuLess { members });
            }
            return Ok(Preemptor::Join { members });
        }
        if members.iter().any(|m| leader_first(&m.demand)) {
            // The leader preempts for its whole group (the workers, if they exist already,
            // bind on what it holds once it is bound).
            let Some(leader) = members.iter().find(|m| is_leader_first_leader(&m.demand)) else {
                return Err(
                    "its workers wait for their leader: a group bound leader first preempts for its leader".into()
                );
            };
            let shape = leader.demand.replica().map_err(|e| e.to_string())?;
            let (planned, role) = match shape {
                Some((replica, own)) => (Planned::Replica(Box::new(replica)), own),
                None => (Planned::Gang(leader.demand.gang().map_err(|e| e.to_string())?), 0),
            };
            let rank = leader.demand.gang.as_ref().and_then(|g| g.rank).unwrap_or(0) as usize;
            return Ok(Preemptor::LeaderFirst { planned, leader, role, rank });
        }
        if members.iter().any(|m| m.demand.roles.is_some()) {
            let parts = replica_members(key, members)?;
            let planned = Planned::Replica(Box::new(parts.replica.clone()));
            let gang_key = key.gang().unwrap_or_default().to_string();
            return Ok(Preemptor::Replica { planned, key, gang_key, parts, members });
        }
        let gpus = members[0].demand.gpus;
        if members.iter().any(|m| m.demand.gpus != gpus) {
            return Err("its members do not ask the same number of GPUs".into());
        }
        if gpus == 0 {
            return Ok(Preemptor::GpuLess { members });
        }
        let gang = members[0].demand.gang().map_err(|e| e.to_string())?;
        for member in &members[1..] {
            let theirs = member.demand.gang().map_err(|e| e.to_string())?;
            if crate::reservation::gang_shape_difference(&gang, &theirs).is_some() {
                return Err("its members do not describe their gang alike".into());
            }
        }
        Ok(Preemptor::Gang { planned: Planned::Gang(gang), members })
    }

    /// Gives back what `chosen` need not evict, as kube-scheduler reprieves: victims that would
    /// break a budget first, then the highest priority, then the largest; each one kept out
    /// when `fits` still finds the unit a plan without it (`trial` then becomes that).
    fn reprieve(
        &mut self,
        book: &mut Book,
        units: &[VictimUnit],
        (chosen, trial): (&mut BTreeSet<usize>, &mut Trial),
        fits: impl Fn(&mut Self, &mut Book, &BTreeSet<usize>) -> Option<Trial>,
    ) {
        let breaking = self.violating(units, chosen).0;
        let mut order: Vec<usize> = chosen.iter().copied().collect();
        order.sort_by_key(|&u| {
            let priority = std::cmp::Reverse(units[u].priority);
            (!breaking.contains(&u), priority, std::cmp::Reverse(units[u].pods.len()), u)
        });
        for unit in order {
            chosen.remove(&unit);
            match fits(self, book, chosen) {
                Some(fit) => *trial = fit,
                None => {
                    chosen.insert(unit);
                }
            }
        }
    }

    /// The victim units of `chosen` that would break a PodDisruptionBudget if all of `chosen`
    /// were evicted (their pods judged most important first, as kube-scheduler does), and the
    /// budgets broken.
    fn violating(&self, units: &[VictimUnit], chosen: &BTreeSet<usize>) -> (BTreeSet<usize>, BTreeSet<String>) {
        if self.budgets.is_empty() {
            return (BTreeSet::new(), BTreeSet::new());
        }
        let mut pods: Vec<(usize, &BoundPod)> = chosen
            .iter()
            .flat_map(|&u| units[u].pods.iter().filter_map(move |p| Some((u, &self.placed.get(&p.uid)?.bound))))
            .collect();
        pods.sort_by(|(_, a), (_, b)| b.priority.cmp(&a.priority).then(a.pod.uid.cmp(&b.pod.uid)));
        let bound: Vec<&BoundPod> = pods.iter().map(|(_, p)| *p).collect();
        let (flags, broken) = super::budgets::violations(self.budgets.values(), &bound);
        let units = pods.iter().zip(flags).filter(|(_, f)| *f).map(|((u, _), _)| *u).collect();
        (units, broken)
    }

    /// The bound pods of a priority below `priority`, as units evicted together (a gang whole,
    /// on every node). No victim: a gang with a member of `priority` or more, a Binding in
    /// flight, a reservation open in the book (members bound ahead, joining, or binding
    /// through the extender), or a pod another preemption already evicts.
    /// With `per_pod` (node by node, as kube-scheduler), every pod is a unit of its own.
    fn victim_units(&self, book: &Book, priority: i32, per_pod: bool) -> Vec<VictimUnit> {
        let in_flight: BTreeSet<&str> =
            self.in_flight.values().flat_map(|(_, members)| members.iter().map(|m| m.pod.uid.as_str())).collect();
        let taken: BTreeSet<&str> =
            self.preempting.values().flat_map(|p| p.victims.iter().map(String::as_str)).collect();
        let mut units: BTreeMap<String, (VictimUnit, bool)> = BTreeMap::new();
        for placed in self.placed.values() {
            let bound = &placed.bound;
            let key = match &bound.gang {
                Some(gang) if !per_pod => gang.clone(),
                _ => format!("pod:{}", bound.pod.uid),
            };
            let (unit, spared) = units.entry(key).or_insert_with(|| {
                (VictimUnit { pods: Vec::new(), priority: i32::MIN, nodes: BTreeSet::new() }, false)
            });
            unit.pods.push(bound.pod.clone());
            unit.priority = unit.priority.max(bound.priority);
            unit.nodes.insert(bound.node.clone());
            let uid = bound.pod.uid.as_str();
            let reserved = bound.gang.as_deref().is_some_and(|g| book.is_reserved(g));
            *spared |= in_flight.contains(uid) || taken.contains(uid) || reserved || bound.priority >= priority;
        }
        units.into_values().filter(|(_, spared)| !spared).map(|(unit, _)| unit).collect()
    }

    /// The unit's plan with the victim units `chosen` gone (their CPU, memory and GPUs given
    /// back on a copy), the node predicates and co-located fit checked, or `None`.
    fn fits_without(
        &mut self,
        book: &mut Book,
        (preemptor, held_back): (&Preemptor<'_>, Option<&[bool]>),
        units: &[VictimUnit],
        chosen: &BTreeSet<usize>,
    ) -> Option<Trial> {
        let victims: Vec<&PodIdentity> = chosen.iter().flat_map(|&u| units[u].pods.iter()).collect();
        // The victims' requests given back on their nodes only, as they were afterwards.
        let mut saved: BTreeMap<String, Option<Resources>> = BTreeMap::new();
        for pod in &victims {
            if let Some(placed) = self.placed.get(&pod.uid) {
                let node = &placed.bound.node;
                saved.entry(node.clone()).or_insert_with(|| self.usage.get(node).cloned());
                predicates::add_usage(self.usage.entry(node.clone()).or_default(), &placed.bound.requests, -1);
            }
        }
        let uids: Vec<String> = victims.iter().map(|p| p.uid.clone()).collect();
        let trial = self.trial(book, (preemptor, held_back), &uids);
        for (node, usage) in saved {
            match usage {
                Some(usage) => self.usage.insert(node, usage),
                None => self.usage.remove(&node),
            };
        }
        trial
    }

    /// [`Scheduler::fits_without`] once the victims' usage is given back: the preemptor
    /// planned without the GPUs of the pods `victims` (uids).
    fn trial(
        &self,
        book: &mut Book,
        (preemptor, held_back): (&Preemptor<'_>, Option<&[bool]>),
        victims: &[String],
    ) -> Option<Trial> {
        let host_name = |book: &Book, host: HostId| book.cluster().host(host).name.clone();
        match preemptor {
            Preemptor::Gang { planned, members } => {
                let allowed = self.allowed_mask(book, members, held_back);
                let slots = book.plan_without(planned, victims, &allowed).ok()?;
                let nodes: Vec<String> = slots.iter().map(|&(_, host, _)| host_name(book, host)).collect();
                self.co_located_fit(members, &nodes).ok()?;
                let nominated = members.iter().map(|m| m.demand.pod.clone()).zip(nodes).collect();
                Some(Trial { slots, nominated, joining: None })
            }
            Preemptor::Replica { planned, key, gang_key, parts, members } => {
                let gpu_pods: Vec<PendingPod> = parts.gpu_members.iter().map(|(_, m)| (*m).clone()).collect();
                let allowed = self.allowed_mask(book, &gpu_pods, held_back);
                let slots = book.plan_without(planned, victims, &allowed).ok()?;
                let unit = ReplicaUnit {
                    key,
                    gang_key,
                    replica: &parts.replica,
                    gpu_members: parts.gpu_members.clone(),
                    gpu_less: parts.gpu_less.clone(),
                    members,
                };
                let matched = self.match_replica_plan(book, &unit, &slots).ok()?.ok()?;
                let mut nominated: Vec<(PodIdentity, String)> =
                    matched.order.iter().map(|m| m.demand.pod.clone()).zip(matched.nodes).collect();
                nominated.extend(matched.plain);
                Some(Trial { slots, nominated, joining: None })
            }
            Preemptor::LeaderFirst { planned, leader, role, rank } => {
                let alone = std::slice::from_ref(*leader);
                let allowed = self.allowed_mask(book, alone, held_back);
                let slots = book.plan_without(planned, victims, &allowed).ok()?;
                let nodes: Vec<String> = slots.iter().map(|&(_, host, _)| host_name(book, host)).collect();
                // The workers do not exist yet: the leader's requests stand in for theirs.
                self.co_located_fit(&vec![(*leader).clone(); slots.len()], &nodes).ok()?;
                let of_role = || slots.iter().enumerate().filter(|(_, s)| s.0 == *role).map(|(i, _)| i);
                let index = of_role().nth(*rank).or_else(|| of_role().next())?;
                let nominated = vec![(leader.demand.pod.clone(), nodes[index].clone())];
                Some(Trial { slots, nominated, joining: None })
            }
            Preemptor::Join { members } => {
                // The GPU joiners' predicates (each joins on its own; GPU-less ones take none).
                let with_gpus: Vec<PendingPod> = members.iter().filter(|m| m.demand.gpus > 0).cloned().collect();
                let allowed = self.allowed_mask(book, &with_gpus, held_back);
                let demands: Vec<&PodDemand> = with_gpus.iter().map(|m| &m.demand).collect();
                let (shape, placed) = book.plan_joins_without(&demands, victims, &allowed).ok()?;
                // Each joiner placed with its own node (a prefix of them, in order).
                let mut pods = Vec::with_capacity(placed.len());
                let mut nodes = Vec::with_capacity(placed.len());
                for (uid, slot) in &placed {
                    pods.push(with_gpus.iter().find(|m| &m.demand.pod.uid == uid)?.clone());
                    nodes.push(host_name(book, slot.1));
                }
                self.co_located_fit(&pods, &nodes).ok()?;
                let nominated = pods.iter().map(|m| m.demand.pod.clone()).zip(nodes).collect();
                let slots = placed.into_iter().map(|(_, slot)| slot).collect();
                Some(Trial { slots, nominated, joining: Some(shape) })
            }
            Preemptor::GpuLess { members } => {
                // Pods joining a replica that runs stay inside its required domain, as they join.
                let gang = members[0].demand.gang.as_ref().map(|g| g.key.as_str());
                let replica = members[0].demand.replica().ok().flatten().map(|(replica, _)| replica);
                let region = match (gang, replica) {
                    (Some(gang), Some(replica)) if book.ran_whole(gang) => {
                        book.region_labels(&replica, &book.running_hosts(gang))
                    }
                    _ => None,
                };
                let mut scratch: HashMap<String, Resources> = HashMap::new();
                let mut nominated = Vec::with_capacity(members.len());
                for member in members.iter() {
                    let node = self.node_without_gpus(member, &mut scratch, region.as_deref()).ok()?;
                    nominated.push((member.demand.pod.clone(), node));
                }
                Some(Trial { slots: Vec::new(), nominated, joining: None })
            }
        }
    }
}

impl Scheduler {
    /// The GPU hosts where every member passes the node predicates, those `held_back` left
    /// out without being judged: [`Scheduler::allowed_hosts`]'s mask, without its reasons.
    fn allowed_mask(&self, book: &Book, members: &[PendingPod], held_back: Option<&[bool]>) -> Vec<bool> {
        let empty = Resources::new();
        book.cluster()
            .hosts
            .iter()
            .enumerate()
            .map(|(h, host)| {
                if held_back.is_some_and(|held| held.get(h).copied().unwrap_or(false)) {
                    return false;
                }
                let Some(node) = self.nodes.get(&host.name) else { return false };
                let used = self.usage.get(&host.name).unwrap_or(&empty);
                members.iter().all(|m| predicates::check(node, used, &m.needs).is_ok())
            })
            .collect()
    }

    /// [`PreemptionMode::NodeByNode`]: kube-scheduler's default preemption for each member on
    /// its own, in turn (`SelectVictimsOnNode`, `pickOneNodeForPreemption`): the member alone,
    /// without the unit's scope, on each node not chosen for an earlier member, with all that
    /// node's remaining lower-priority pods gone; victims reprieved (budget-breaking first,
    /// then highest priority) while it still fits; the node with the fewest victims breaking a budget,
    /// then the lowest highest victim priority, the lowest priority sum, the fewest victims. A
    /// member that fits on a node of its own without evicting anything evicts nothing.
    /// The victims of all members are evicted and their GPUs held as they leave; once all
    /// have, the unit is planned afresh ([`Scheduler::try_place`]).
    fn preempt_node_by_node(
        &mut self,
        book: &mut Book,
        members: &[PendingPod],
        gang: &topoplace_engine::workload::Gang,
        units: &[VictimUnit],
        (priority, held_back): (i32, Option<&[bool]>),
        now_ms: u64,
    ) -> Result<Decision, String> {
        let key = Self::nomination_key(book, members);
        let one = topoplace_engine::workload::Gang {
            members: 1,
            tensor_parallel: gang.tensor_parallel.min(gang.gpus_per_member),
            pipeline_parallel: 1,
            required: None,
            preferred: None,
            ..gang.clone()
        };
        let planned_one = Planned::Gang(one);
        let hosts = book.cluster().hosts.len();
        let mut on_node: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (index, unit) in units.iter().enumerate() {
            for node in &unit.nodes {
                on_node.entry(node.clone()).or_default().push(index);
            }
        }
        let mut chosen: BTreeSet<usize> = BTreeSet::new();
        let mut slots: Vec<RoleSlot> = Vec::new();
        let mut used: BTreeSet<HostId> = BTreeSet::new();
        for member in members {
            // A member that fits on a node of its own as things are evicts nothing.
            let elsewhere: Vec<bool> =
                (0..hosts).map(|h| used.contains(&(h as HostId)) || held_back.is_some_and(|held| held[h])).collect();
            let alone = Preemptor::Gang { planned: planned_one.clone(), members: std::slice::from_ref(member) };
            if let Some(slot) = self
                .fits_without(book, (&alone, Some(&elsewhere)), units, &chosen)
                .and_then(|fit| fit.slots.first().copied())
            {
                used.insert(slot.1);
                slots.push(slot);
                continue;
            }
            type Best = ((usize, i32, i64, usize, String), BTreeSet<usize>, RoleSlot);
            let mut best: Option<Best> = None;
            for (node, node_units) in &on_node {
                let Some(host) = book.cluster().host_in(node, &member.demand.pool) else { continue };
                if used.contains(&host) {
                    continue;
                }
                let only_here: Vec<bool> =
                    (0..hosts).map(|h| h != host as usize || held_back.is_some_and(|held| held[h])).collect();
                let try_fit = |scheduler: &mut Self, book: &mut Book, mine: &BTreeSet<usize>| {
                    let all: BTreeSet<usize> = chosen.union(mine).copied().collect();
                    scheduler.fits_without(book, (&alone, Some(&only_here)), units, &all)
                };
                let mut mine: BTreeSet<usize> = node_units.iter().copied().filter(|u| !chosen.contains(u)).collect();
                if mine.is_empty() {
                    continue;
                }
                let Some(mut fit) = try_fit(self, book, &mine) else { continue };
                self.reprieve(book, units, (&mut mine, &mut fit), try_fit);
                let Some(slot) = fit.slots.first().copied().filter(|_| !mine.is_empty()) else { continue };
                let rank = (
                    self.violating(units, &mine).0.len(),
                    mine.iter().map(|&u| units[u].priority).max().unwrap_or(i32::MIN),
                    // kube-scheduler's sum, each priority shifted by MaxInt32 + 1 so that
                    // negative ones count.
                    mine.iter().map(|&u| i64::from(units[u].priority) + i64::from(i32::MAX) + 1).sum::<i64>(),
                    mine.iter().map(|&u| units[u].pods.len()).sum::<usize>(),
                    node.clone(),
                );
                if best.as_ref().is_none_or(|(r, _, _)| rank < *r) {
                    best = Some((rank, mine, slot));
                }
            }
            let Some((_, mine, slot)) = best else {
                return Err(format!(
                    "{}: no node where evicting pods of a priority below {priority} lets it fit on its own",
                    member.demand.pod
                ));
            };
            used.insert(slot.1);
            chosen.extend(mine);
            slots.push(slot);
        }
        let victims: Vec<PodIdentity> = chosen.iter().flat_map(|&u| units[u].pods.clone()).collect();
        if victims.is_empty() {
            return Err("every member fits on a node of its own: node-by-node preemption evicts nothing for it".into());
        }
        let nodes: BTreeSet<&str> = chosen.iter().flat_map(|&u| units[u].nodes.iter().map(String::as_str)).collect();
        let planned = Planned::Gang(topoplace_engine::workload::Gang {
            members: members.len() as u32,
            required: None,
            preferred: None,
            ..gang.clone()
        });
        book.nominate(&key, (planned, &slots), members[0].demand.pod.clone(), false, now_ms)
            .map_err(|e| e.to_string())?;
        let nominated: Vec<(PodIdentity, String)> = members
            .iter()
            .zip(&slots)
            .map(|(m, &(_, host, _))| (m.demand.pod.clone(), book.cluster().host(host).name.clone()))
            .collect();
        let budgets_broken = self.violating(units, &chosen).1.into_iter().collect();
        self.record_preempting(book, (&key, members), (&victims, &nominated), (budgets_broken, priority, true, now_ms));
        let message = format!(
            "preempting {} pod(s) of a priority below {priority} node by node, on node(s) {}",
            victims.len(),
            nodes.iter().copied().collect::<Vec<_>>().join(", ")
        );
        Ok(Decision::Preempt {
            pods: members.iter().map(|m| m.demand.pod.clone()).collect(),
            victims,
            nominated,
            message,
        })
    }
}

impl Scheduler {
    /// Records the preemption just decided for `members` under nomination key `key`: under
    /// way (its victims, whether its plan is in the book, each nominated pod's requests held
    /// on its node) and its verdict (the victims and their nodes, the budgets it breaks).
    fn record_preempting(
        &mut self,
        book: &mut Book,
        (key, members): (&str, &[PendingPod]),
        (victims, nominated): (&[PodIdentity], &[(PodIdentity, String)]),
        (budgets_broken, priority, in_book, now_ms): (Vec<String>, i32, bool, u64),
    ) {
        let preempting = Preempting {
            since_ms: now_ms,
            victims: victims.iter().map(|v| v.uid.clone()).collect(),
            priority,
            holds: nominated_holds(members, nominated),
            nominated: nominated.iter().map(|(pod, _)| pod.clone()).collect(),
            in_book,
        };
        self.preempting.insert(key.to_string(), preempting);
        let nodes: BTreeSet<String> =
            victims.iter().filter_map(|v| Some(self.placed.get(&v.uid)?.bound.node.clone())).collect();
        let outcome = PreemptionOutcome::Preempted {
            nodes: nodes.into_iter().collect(),
            victims: victims.iter().map(ToString::to_string).collect(),
            budgets_broken,
        };
        let preemptor = members[0].demand.pod.clone();
        book.record_preemption(PreemptionVerdict { unit: key.to_string(), preemptor, at_ms: now_ms, outcome });
    }
}

/// Each nominated pod's requests on its node, for [`Preempting::holds`].
fn nominated_holds(members: &[PendingPod], nominated: &[(PodIdentity, String)]) -> Vec<(String, Resources)> {
    nominated
        .iter()
        .filter_map(|(pod, node)| {
            let member = members.iter().find(|m| m.demand.pod.uid == pod.uid)?;
            Some((node.clone(), member.needs.requests.clone()))
        })
        .collect()
}

fn leader_first(demand: &PodDemand) -> bool {
    demand.gang.as_ref().is_some_and(|g| matches!(g.order, BindOrder::LeaderFirst { .. }))
}
