//! The reservation ledger: which GPU is held by whom. The one place where GPUs change
//! hands, so the one place that guarantees that no GPU is ever given twice and that a
//! gang is held whole or not at all.
//!
//! `reserve` checks the whole request before it changes anything; `release` returns
//! exactly what was reserved. GPUs the cluster description marks as allocated are held
//! by no gang and cannot be released.
//!
//! [`shares`] is the same contract for GPUs split into milli-GPU shares, with CPU and
//! memory per node (the GPU-sharing trace replay, and pods that ask for a fraction of a GPU).

pub mod shares;

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::fmt;

use thiserror::Error;

use crate::topology::{full_mask, Cluster, GpuMask, HostId};

#[derive(Debug, Error, PartialEq)]
pub enum LedgerError {
    #[error("`{holder}` already holds a reservation")]
    HolderExists { holder: String },
    #[error("`{holder}` holds no reservation")]
    UnknownHolder { holder: String },
    #[error("`{holder}`: host index {host} is not in the cluster")]
    UnknownHost { holder: String, host: HostId },
    #[error("`{holder}`: host `{host}` has no GPU(s) {gpus:?}")]
    NoSuchGpu { holder: String, host: String, gpus: Vec<u8> },
    #[error("`{holder}`: GPU(s) {gpus:?} on host `{host}` are already held by {by}")]
    AlreadyHeld { holder: String, host: String, gpus: Vec<u8>, by: String },
    #[error("`{holder}`: the request names GPU(s) {gpus:?} on host `{host}` twice")]
    RequestOverlaps { holder: String, host: String, gpus: Vec<u8> },
    #[error("`{holder}`: an empty reservation")]
    Empty { holder: String },
    /// The ledger's own record of a host does not add up (a bug): nothing is built on it.
    #[error(
        "`{holder}`: the ledger's record of host `{host}` does not add up (GPUs used that no holder \
         holds, or held twice); refusing to change it"
    )]
    Inconsistent { holder: String, host: String },
}

/// What one holder has: per host, a mask of GPUs.
pub type Holding = Vec<(HostId, GpuMask)>;

/// What may hold GPUs in a [`Ledger`]: each adapter names its own holders with a type (the
/// reservation book's gangs and pods, the job replay's jobs and drains; plain `String` gang
/// names in the offline planner). Ordered, so holders are listed in a fixed order;
/// `Display`, so errors can name them.
pub trait Holder: Ord + Clone + fmt::Debug + fmt::Display {}

impl<T: Ord + Clone + fmt::Debug + fmt::Display> Holder for T {}

/// Which GPUs are in use on every host, whoever holds them: all the placement engine reads
/// of a ledger, so the engine is the same code for every kind of holder.
#[derive(Debug, Clone)]
pub struct GpuUse {
    capacity: Vec<GpuMask>,
    used: Vec<GpuMask>,
    /// In use before any holder: the cluster's pre-existing allocation.
    base: Vec<GpuMask>,
    /// Per host, how many GPUs the holders hold together: with `base`, the release-build
    /// check that no GPU is held twice (see `Ledger::assert_host`).
    held: Vec<u32>,
    host_names: Vec<String>,
    /// Successful reserves and releases so far: watchers compare it to see a change.
    changes: u64,
}

impl GpuUse {
    /// A ledger over these GPUs in use, which it takes as its base allocation (held by none
    /// of its holders): for trial placements on a copy ([`Ledger::scratch`]).
    pub fn scratch<K: Holder>(&self) -> Ledger<K> {
        let mut gpus = self.clone();
        gpus.base = gpus.used.clone();
        gpus.held = vec![0; gpus.held.len()];
        Ledger { gpus, holders: BTreeMap::new() }
    }

    /// How many times the ledger has changed (reserve or release) since it was made.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// The GPUs of `host` that nobody holds.
    pub fn free(&self, host: HostId) -> GpuMask {
        self.capacity[host as usize] & !self.used[host as usize]
    }

    /// The GPUs of `host` that somebody holds (or the cluster file marks allocated).
    pub fn used(&self, host: HostId) -> GpuMask {
        self.used[host as usize]
    }

    /// Free GPUs over all hosts.
    pub fn free_gpus(&self) -> u64 {
        (0..self.capacity.len()).map(|h| u64::from(self.free(h as HostId).count_ones())).sum()
    }
}

impl AsRef<GpuUse> for GpuUse {
    fn as_ref(&self) -> &GpuUse {
        self
    }
}

/// The GPUs held, by holder `H` (a type per adapter, see [`Holder`]; `String` by default).
#[derive(Debug, Clone)]
pub struct Ledger<H = String> {
    gpus: GpuUse,
    holders: BTreeMap<H, Holding>,
}

pub fn mask_indices(mask: GpuMask) -> Vec<u8> {
    (0..64u8).filter(|bit| mask & (1u64 << bit) != 0).collect()
}

/// The mask of GPU indices, the inverse of [`mask_indices`]; indices past 63 name no GPU of
/// any host and are left out.
pub fn indices_mask(indices: &[u8]) -> GpuMask {
    indices.iter().filter(|&&g| g < 64).fold(0, |mask, &g| mask | (1u64 << g))
}

/// Per host, the union of the masks: the holding that one reservation of them all makes.
pub fn merge_by_host(parts: impl IntoIterator<Item = (HostId, GpuMask)>) -> Holding {
    let mut holding: Holding = Vec::new();
    for (host, mask) in parts {
        match holding.iter_mut().find(|(h, _)| *h == host) {
            Some(entry) => entry.1 |= mask,
            None => holding.push((host, mask)),
        }
    }
    holding
}

/// The placement engine takes `&impl AsRef<GpuUse>`: a ledger of any holder, or its use.
impl<H> AsRef<GpuUse> for Ledger<H> {
    fn as_ref(&self) -> &GpuUse {
        &self.gpus
    }
}

impl Ledger {
    /// A ledger whose holders are gang names, as the offline planner reserves them; nothing
    /// held yet. Other holders: [`Ledger::empty`].
    pub fn new(cluster: &Cluster) -> Self {
        Ledger::empty(cluster)
    }
}

impl<H: Holder> Ledger<H> {
    /// A ledger of `cluster` holding nothing but the GPUs the cluster marks allocated.
    pub fn empty(cluster: &Cluster) -> Self {
        Ledger {
            gpus: GpuUse {
                capacity: cluster.hosts.iter().map(|h| full_mask(h.gpu_count)).collect(),
                used: cluster.initially_used.clone(),
                base: cluster.initially_used.clone(),
                held: vec![0; cluster.hosts.len()],
                host_names: cluster.hosts.iter().map(|h| h.name.clone()).collect(),
                changes: 0,
            },
            holders: BTreeMap::new(),
        }
    }

    /// A ledger of another kind of holder over the GPUs in use now, which it takes as its
    /// base allocation (held by none of its holders): for trial plans on a copy, such as a
    /// batch planned under gang names over the job replay's ledger.
    pub fn scratch<K: Holder>(&self) -> Ledger<K> {
        self.gpus.scratch()
    }

    /// The GPUs in use, without the holders: what the placement engine reads.
    pub fn gpus(&self) -> &GpuUse {
        &self.gpus
    }

    /// See [`GpuUse::changes`].
    pub fn changes(&self) -> u64 {
        self.gpus.changes
    }

    /// See [`GpuUse::free`].
    pub fn free(&self, host: HostId) -> GpuMask {
        self.gpus.free(host)
    }

    /// See [`GpuUse::used`].
    pub fn used(&self, host: HostId) -> GpuMask {
        self.gpus.used(host)
    }

    /// See [`GpuUse::free_gpus`].
    pub fn free_gpus(&self) -> u64 {
        self.gpus.free_gpus()
    }

    /// What `holder` holds, if anything.
    pub fn holding<Q>(&self, holder: &Q) -> Option<&Holding>
    where
        H: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.holders.get(holder)
    }

    /// Every holder and its holding, in the holders' order.
    pub fn holders(&self) -> impl Iterator<Item = (&H, &Holding)> {
        self.holders.iter()
    }

    /// The invariant of one host, cheap enough for every reserve and release in release
    /// builds: its used GPUs are exactly the base allocation plus what the holders hold, so
    /// the counts add up only if no GPU is held twice (a GPU held by two holders, or by a
    /// holder and the base allocation, is one used GPU counted twice). A host that fails it
    /// is refused ([`LedgerError::Inconsistent`]) by every reserve and release that touches
    /// it: the ledger itself is wrong there, and nothing may be placed on top of it.
    fn host_adds_up(&self, host: HostId) -> bool {
        let g = &self.gpus;
        let h = host as usize;
        g.used[h].count_ones() == g.base[h].count_ones() + g.held[h] && g.used[h] & g.base[h] == g.base[h]
    }

    fn inconsistent(&self, holder: String, host: HostId) -> LedgerError {
        LedgerError::Inconsistent { holder, host: self.gpus.host_names[host as usize].clone() }
    }

    fn held_by(&self, host: HostId, gpus: GpuMask) -> String {
        let mut owners: Vec<String> = self
            .holders
            .iter()
            .filter(|(_, holding)| holding.iter().any(|&(h, m)| h == host && m & gpus != 0))
            .map(|(name, _)| format!("`{name}`"))
            .collect();
        if self.gpus.base[host as usize] & gpus != 0 {
            owners.push("the cluster's pre-existing allocation".into());
        }
        owners.join(", ")
    }

    /// Holds every GPU of the request for `holder`, or nothing.
    pub fn reserve<Q>(&mut self, holder: &Q, request: &[(HostId, GpuMask)]) -> Result<(), LedgerError>
    where
        H: Borrow<Q>,
        Q: Ord + ToOwned<Owned = H> + fmt::Display + ?Sized,
    {
        let holder_name = || holder.to_string();
        if self.holders.contains_key(holder) {
            return Err(LedgerError::HolderExists { holder: holder_name() });
        }
        if request.iter().all(|&(_, mask)| mask == 0) {
            return Err(LedgerError::Empty { holder: holder_name() });
        }
        let mut merged: BTreeMap<HostId, GpuMask> = BTreeMap::new();
        for &(host, mask) in request {
            let Some(&capacity) = self.gpus.capacity.get(host as usize) else {
                return Err(LedgerError::UnknownHost { holder: holder_name(), host });
            };
            let name = || self.gpus.host_names[host as usize].clone();
            if mask & !capacity != 0 {
                return Err(LedgerError::NoSuchGpu {
                    holder: holder_name(),
                    host: name(),
                    gpus: mask_indices(mask & !capacity),
                });
            }
            let entry = merged.entry(host).or_insert(0);
            if *entry & mask != 0 {
                return Err(LedgerError::RequestOverlaps {
                    holder: holder_name(),
                    host: name(),
                    gpus: mask_indices(*entry & mask),
                });
            }
            *entry |= mask;
            if !self.host_adds_up(host) {
                return Err(self.inconsistent(holder_name(), host));
            }
            let taken = self.gpus.used[host as usize] & mask;
            if taken != 0 {
                return Err(LedgerError::AlreadyHeld {
                    holder: holder_name(),
                    host: name(),
                    gpus: mask_indices(taken),
                    by: self.held_by(host, taken),
                });
            }
        }
        // Checked in full above; only now does anything change.
        for (&host, &mask) in &merged {
            self.gpus.used[host as usize] |= mask;
            self.gpus.held[host as usize] += mask.count_ones();
            debug_assert!(self.host_adds_up(host));
        }
        self.holders.insert(holder.to_owned(), merged.into_iter().filter(|&(_, m)| m != 0).collect());
        self.gpus.changes += 1;
        // The whole check is O(holders): debug builds only. `host_adds_up` runs always.
        debug_assert!(self.check().is_ok(), "{:?}", self.check());
        Ok(())
    }

    /// Returns exactly the GPUs `holder` reserved.
    pub fn release<Q>(&mut self, holder: &Q) -> Result<Holding, LedgerError>
    where
        H: Borrow<Q>,
        Q: Ord + fmt::Display + ?Sized,
    {
        let holding =
            self.holders.get(holder).ok_or_else(|| LedgerError::UnknownHolder { holder: holder.to_string() })?;
        // Checked in full before anything changes, like `reserve`.
        for &(host, mask) in holding {
            let h = host as usize;
            if self.gpus.used[h] & mask != mask || self.gpus.held[h] < mask.count_ones() || !self.host_adds_up(host) {
                return Err(self.inconsistent(holder.to_string(), host));
            }
        }
        let holding = self.holders.remove(holder).unwrap_or_default();
        for &(host, mask) in &holding {
            let h = host as usize;
            self.gpus.used[h] &= !mask;
            self.gpus.held[h] -= mask.count_ones();
            debug_assert!(self.host_adds_up(host));
        }
        self.gpus.changes += 1;
        // The whole check is O(holders): debug builds only. `host_adds_up` runs always.
        debug_assert!(self.check().is_ok(), "{:?}", self.check());
        Ok(holding)
    }

    /// The invariants: holdings are pairwise disjoint and disjoint from the base
    /// allocation, `used` is exactly their union, and the per-host held counts add up.
    pub fn check(&self) -> Result<(), String> {
        let g = &self.gpus;
        let mut expected = g.base.clone();
        let mut held = vec![0u32; g.held.len()];
        for (holder, holding) in &self.holders {
            for &(host, mask) in holding {
                let slot = &mut expected[host as usize];
                if *slot & mask != 0 {
                    return Err(format!(
                        "GPU(s) {:?} on {} held twice (by `{holder}` and another)",
                        mask_indices(*slot & mask),
                        g.host_names[host as usize]
                    ));
                }
                *slot |= mask;
                held[host as usize] += mask.count_ones();
            }
        }
        if expected != g.used {
            return Err("the used-GPU index disagrees with the holdings".into());
        }
        if held != g.held {
            return Err("the per-host count of held GPUs disagrees with the holdings".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::node;
    use crate::topology::ClusterSpec;

    fn cluster() -> Cluster {
        let mut a = node("a", "H100", 8, &[]);
        a.allocated = vec![0];
        Cluster::build(ClusterSpec { nodes: vec![a, node("b", "H100", 8, &[])], ..Default::default() }).expect("valid")
    }

    #[test]
    fn a_host_whose_record_does_not_add_up_is_refused_in_release_builds_too() {
        let cluster = cluster();
        let mut ledger = Ledger::new(&cluster);
        let (a, b) = (cluster.host_id("a").expect("a"), cluster.host_id("b").expect("b"));
        ledger.reserve("held", &[(b, 0b10)]).expect("reserve");
        // Corrupt the index the way a bug would: GPU 7 used, held by no one.
        ledger.gpus.used[b as usize] |= 1 << 7;
        let refused = ledger.reserve("g", &[(a, 0b10), (b, 0b1)]).unwrap_err();
        assert!(matches!(&refused, LedgerError::Inconsistent { host, .. } if host == "b"), "{refused}");
        assert!(ledger.holding("g").is_none() && ledger.free(a) & 0b10 != 0, "nothing changed");
        let refused = ledger.release("held").unwrap_err();
        assert!(matches!(refused, LedgerError::Inconsistent { .. }), "{refused}");
        assert!(ledger.holding("held").is_some(), "the holder stays until its host adds up");
        assert!(ledger.check().is_err());
    }

    #[test]
    fn reserve_is_all_or_nothing() {
        let cluster = cluster();
        let mut ledger = Ledger::new(&cluster);
        let a = cluster.host_id("a").unwrap();
        let b = cluster.host_id("b").unwrap();
        ledger.reserve("g1", &[(b, 0b11)]).unwrap();
        // The second part collides; the first part must not stay held.
        let error = ledger.reserve("g2", &[(a, 0b110), (b, 0b10)]).unwrap_err();
        assert!(matches!(error, LedgerError::AlreadyHeld { ref by, .. } if by == "`g1`"), "{error}");
        assert_eq!(ledger.free(a), 0xfe);
        assert!(ledger.holding("g2").is_none());
        // The pre-existing allocation is nobody's to take.
        let error = ledger.reserve("g3", &[(a, 0b1)]).unwrap_err();
        assert!(error.to_string().contains("pre-existing"), "{error}");
        ledger.check().unwrap();
    }

    #[test]
    fn release_returns_exactly_what_was_reserved() {
        let cluster = cluster();
        let mut ledger = Ledger::new(&cluster);
        let before: Vec<_> = (0..2).map(|h| ledger.free(h)).collect();
        ledger.reserve("g", &[(0, 0b1100), (1, 0xff)]).unwrap();
        assert_eq!(ledger.release("g").unwrap(), vec![(0, 0b1100), (1, 0xff)]);
        assert_eq!((0..2).map(|h| ledger.free(h)).collect::<Vec<_>>(), before);
        assert_eq!(ledger.release("g"), Err(LedgerError::UnknownHolder { holder: "g".into() }));
    }

    #[test]
    fn requests_naming_missing_or_repeated_gpus_are_refused() {
        let cluster = cluster();
        let mut ledger = Ledger::new(&cluster);
        assert!(matches!(ledger.reserve("g", &[(1, 1 << 9)]), Err(LedgerError::NoSuchGpu { .. })));
        assert!(matches!(ledger.reserve("g", &[(1, 0b1), (1, 0b11)]), Err(LedgerError::RequestOverlaps { .. })));
        assert!(matches!(ledger.reserve("g", &[(7, 0b1)]), Err(LedgerError::UnknownHost { .. })));
        assert_eq!(ledger.free_gpus(), 15);
    }
}
