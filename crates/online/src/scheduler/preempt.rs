//! The secondary scheduler's preemption: a unit (a single pod, or a gang of one shape) that
//! does not fit evicts pods of lower priority, as few and as low as it can, whole gangs only.
//!
//! As kube-scheduler does (`pkg/scheduler/framework/plugins/defaultpreemption`): only pods of a
//! lower priority are victims, a pod with `preemptionPolicy: Never` never preempts, candidates
//! with lower-priority victims and fewer of them come first, and victims that are not needed
//! are reprieved, highest priority first. Unlike it, the whole unit is judged at once (a gang
//! on several nodes), a victim that is part of a gang takes its whole gang along (on every
//! node), and the plan is held: the GPUs its victims give back are kept for it
//! ([`Book::nominate`]) until all have, so nothing else takes them, and the unit binds on the
//! first cycle after they are all free. PodDisruptionBudgets count as kube-scheduler counts
//! them ([`super::budgets`]): nodes whose victims break fewer budgets come first, victims that
//! would break one are reprieved first, and a budget broken for want of any other way is named.

use super::*;

/// A set of pods evicted together: one pod, or every bound pod of a gang.
#[derive(Debug, Clone)]
struct VictimUnit {
    pods: Vec<PodIdentity>,
    /// The highest priority among its pods.
    priority: i32,
    nodes: BTreeSet<String>,
}

impl Scheduler {
    /// The key of `members`' unit in the book's nominations: its gang's key, or `pod:{uid}`.
    pub(super) fn nomination_key(members: &[PendingPod]) -> String {
        match &members[0].demand.gang {
            Some(gang) => gang.key.clone(),
            None => format!("pod:{}", members[0].demand.pod.uid),
        }
    }

    /// Tries preemption for a unit of `priority` that did not fit: a [`Decision::Preempt`]
    /// naming the victims (its plan already held in `book` as a nomination), or why not.
    pub(super) fn try_preempt(
        &mut self,
        book: &mut Book,
        members: &[PendingPod],
        (priority, held_back): (i32, Option<&[bool]>),
        now_ms: u64,
    ) -> Result<Decision, String> {
        let key = Self::nomination_key(members);
        if let Some(nodes) = book.nomination_waits_on(&key) {
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
        if members.iter().any(|m| m.demand.roles.is_some() || m.demand.gpus == 0 || leader_first(&m.demand)) {
            return Err(
                "preemption is not built yet for replicas with roles, leader-first groups and pods without GPUs".into(),
            );
        }
        if members[0].demand.gang.as_ref().is_some_and(|g| book.ran_whole(&g.key)) {
            return Err("preemption is not built yet for pods joining a gang that runs".into());
        }
        let gang = members[0].demand.gang().map_err(|e| e.to_string())?;
        for member in &members[1..] {
            let theirs = member.demand.gang().map_err(|e| e.to_string())?;
            if crate::reservation::gang_shape_difference(&gang, &theirs).is_some() {
                return Err("its members do not describe their gang alike".into());
            }
        }
        let planned = Planned::Gang(gang.clone());
        let units = self.victim_units(book, priority);
        if units.is_empty() {
            return Err(format!("no pod of a priority below {priority} can be evicted"));
        }
        // Nodes by their victims: fewest PodDisruptionBudgets broken first, then lowest
        // highest-priority, then fewest pods, then name.
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
            scheduler.fits_without(book, (&planned, held_back), members, &units, chosen)
        };
        let Some(mut slots) = fits(self, book, &chosen_of(order.len())) else {
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
                Some(fits) => (high, slots) = (mid, fits),
                None => low = mid,
            }
        }
        let mut chosen = chosen_of(high);
        // Reprieve what is not needed: victims that would break a budget first, then the
        // highest priority (then the largest).
        let breaking = self.violating(&units, &chosen).0;
        let mut reprieve: Vec<usize> = chosen.iter().copied().collect();
        reprieve.sort_by_key(|&u| {
            let priority = std::cmp::Reverse(units[u].priority);
            (!breaking.contains(&u), priority, std::cmp::Reverse(units[u].pods.len()), u)
        });
        for unit in reprieve {
            chosen.remove(&unit);
            match fits(self, book, &chosen) {
                Some(fits) => slots = fits,
                None => {
                    chosen.insert(unit);
                }
            }
        }
        let victims: Vec<PodIdentity> = chosen.iter().flat_map(|&u| units[u].pods.clone()).collect();
        if victims.is_empty() {
            // It fits without evicting anything: what kept it out was not room (hosts kept
            // for a starving unit ahead, a node predicate): no preemption.
            return Err("evicting pods would not make room it can use".into());
        }
        let nodes: BTreeSet<&str> = chosen.iter().flat_map(|&u| units[u].nodes.iter().map(String::as_str)).collect();
        book.nominate(&key, planned, &slots, members[0].demand.pod.clone(), now_ms).map_err(|e| e.to_string())?;
        self.preempting.insert(key.clone(), (now_ms, victims.iter().map(|v| v.uid.clone()).collect()));
        let names: Vec<String> = victims.iter().map(ToString::to_string).collect();
        let broken = self.violating(&units, &chosen).1;
        let budgets = match broken.is_empty() {
            true => String::new(),
            false => format!(
                "; no choice of victims keeps every PodDisruptionBudget, so this breaks {}",
                broken.iter().cloned().collect::<Vec<_>>().join(", ")
            ),
        };
        let message = format!(
            "preempting {} pod(s) of a priority below {priority} on node(s) {} ({}); the GPUs they give back are held \
             for {} until all have{budgets}",
            victims.len(),
            nodes.iter().copied().collect::<Vec<_>>().join(", "),
            names.join(", "),
            if members.len() > 1 { format!("gang `{key}`") } else { "this pod".to_string() }
        );
        Ok(Decision::Preempt { pods: members.iter().map(|m| m.demand.pod.clone()).collect(), victims, message })
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
    fn victim_units(&self, book: &Book, priority: i32) -> Vec<VictimUnit> {
        let in_flight: BTreeSet<&str> =
            self.in_flight.values().flat_map(|(_, members)| members.iter().map(|m| m.pod.uid.as_str())).collect();
        let taken: BTreeSet<&str> =
            self.preempting.values().flat_map(|(_, uids)| uids.iter().map(String::as_str)).collect();
        let mut units: BTreeMap<String, (VictimUnit, bool)> = BTreeMap::new();
        for placed in self.placed.values() {
            let bound = &placed.bound;
            let key = bound.gang.clone().unwrap_or_else(|| format!("pod:{}", bound.pod.uid));
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
    /// back on a copy), the node predicates and co-located fit checked: its slots, or `None`.
    fn fits_without(
        &mut self,
        book: &mut Book,
        (planned, held_back): (&Planned, Option<&[bool]>),
        members: &[PendingPod],
        units: &[VictimUnit],
        chosen: &BTreeSet<usize>,
    ) -> Option<Vec<RoleSlot>> {
        let victims: Vec<&PodIdentity> = chosen.iter().flat_map(|&u| units[u].pods.iter()).collect();
        let mut usage = self.usage.clone();
        for pod in &victims {
            if let Some(placed) = self.placed.get(&pod.uid) {
                predicates::add_usage(usage.entry(placed.bound.node.clone()).or_default(), &placed.bound.requests, -1);
            }
        }
        let saved = std::mem::replace(&mut self.usage, usage);
        let (allowed, _) = self.allowed_hosts(book, members, held_back);
        let uids: Vec<String> = victims.iter().map(|p| p.uid.clone()).collect();
        let slots = book.plan_without(planned, &uids, &allowed).ok();
        let fits = slots.filter(|slots| {
            let nodes: Vec<String> = slots.iter().map(|&(_, host, _)| book.cluster().host(host).name.clone()).collect();
            self.co_located_fit(members, &nodes).is_ok()
        });
        self.usage = saved;
        fits
    }
}

fn leader_first(demand: &PodDemand) -> bool {
    demand.gang.as_ref().is_some_and(|g| matches!(g.order, BindOrder::LeaderFirst { .. }))
}
