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

use std::collections::BTreeMap;

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
}

/// What one holder has: per host, a mask of GPUs.
pub type Holding = Vec<(HostId, GpuMask)>;

#[derive(Debug, Clone)]
pub struct Ledger {
    capacity: Vec<GpuMask>,
    used: Vec<GpuMask>,
    base: Vec<GpuMask>,
    host_names: Vec<String>,
    holders: BTreeMap<String, Holding>,
    /// Per host, how many GPUs the holders hold together: with `base`, the release-build
    /// check that no GPU is held twice (see [`Ledger::assert_host`]).
    held: Vec<u32>,
    /// Successful reserves and releases so far: watchers compare it to see a change.
    changes: u64,
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

impl Ledger {
    pub fn new(cluster: &Cluster) -> Self {
        Ledger {
            capacity: cluster.hosts.iter().map(|h| full_mask(h.gpu_count)).collect(),
            used: cluster.initially_used.clone(),
            base: cluster.initially_used.clone(),
            host_names: cluster.hosts.iter().map(|h| h.name.clone()).collect(),
            holders: BTreeMap::new(),
            held: vec![0; cluster.hosts.len()],
            changes: 0,
        }
    }

    /// The invariant of one host, cheap enough for every reserve and release in release
    /// builds: its used GPUs are exactly the base allocation plus what the holders hold, so
    /// the counts add up only if no GPU is held twice (a GPU held by two holders, or by a
    /// holder and the base allocation, is one used GPU counted twice). Panics when broken:
    /// the ledger itself is wrong, and nothing may be placed on top of it.
    fn assert_host(&self, host: HostId) {
        let h = host as usize;
        let used = self.used[h].count_ones();
        let expected = self.base[h].count_ones() + self.held[h];
        assert!(
            used == expected && self.used[h] & self.base[h] == self.base[h],
            "ledger invariant broken on host `{}`: {used} GPUs used, {expected} held with the base allocation",
            self.host_names[h]
        );
    }

    /// How many times the ledger has changed (reserve or release) since it was made.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    pub fn free(&self, host: HostId) -> GpuMask {
        self.capacity[host as usize] & !self.used[host as usize]
    }

    pub fn used(&self, host: HostId) -> GpuMask {
        self.used[host as usize]
    }

    pub fn free_gpus(&self) -> u64 {
        (0..self.capacity.len()).map(|h| u64::from(self.free(h as HostId).count_ones())).sum()
    }

    pub fn holding(&self, holder: &str) -> Option<&Holding> {
        self.holders.get(holder)
    }

    pub fn holders(&self) -> impl Iterator<Item = (&str, &Holding)> {
        self.holders.iter().map(|(name, holding)| (name.as_str(), holding))
    }

    fn held_by(&self, host: HostId, gpus: GpuMask) -> String {
        let mut owners: Vec<String> = self
            .holders
            .iter()
            .filter(|(_, holding)| holding.iter().any(|&(h, m)| h == host && m & gpus != 0))
            .map(|(name, _)| format!("`{name}`"))
            .collect();
        if self.base[host as usize] & gpus != 0 {
            owners.push("the cluster's pre-existing allocation".into());
        }
        owners.join(", ")
    }

    /// Holds every GPU of the request for `holder`, or nothing.
    pub fn reserve(&mut self, holder: &str, request: &[(HostId, GpuMask)]) -> Result<(), LedgerError> {
        let holder_name = || holder.to_string();
        if self.holders.contains_key(holder) {
            return Err(LedgerError::HolderExists { holder: holder_name() });
        }
        if request.iter().all(|&(_, mask)| mask == 0) {
            return Err(LedgerError::Empty { holder: holder_name() });
        }
        let mut merged: BTreeMap<HostId, GpuMask> = BTreeMap::new();
        for &(host, mask) in request {
            let Some(&capacity) = self.capacity.get(host as usize) else {
                return Err(LedgerError::UnknownHost { holder: holder_name(), host });
            };
            let name = || self.host_names[host as usize].clone();
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
            let taken = self.used[host as usize] & mask;
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
            self.used[host as usize] |= mask;
            self.held[host as usize] += mask.count_ones();
            self.assert_host(host);
        }
        self.holders.insert(holder.to_string(), merged.into_iter().filter(|&(_, m)| m != 0).collect());
        self.changes += 1;
        // The whole check is O(holders): debug builds only. `assert_host` above runs always.
        debug_assert!(self.check().is_ok(), "{:?}", self.check());
        Ok(())
    }

    /// Returns exactly the GPUs `holder` reserved.
    pub fn release(&mut self, holder: &str) -> Result<Holding, LedgerError> {
        let holding =
            self.holders.remove(holder).ok_or_else(|| LedgerError::UnknownHolder { holder: holder.to_string() })?;
        for &(host, mask) in &holding {
            assert_eq!(self.used[host as usize] & mask, mask, "ledger lost track of {holder}'s GPUs");
            self.used[host as usize] &= !mask;
            self.held[host as usize] -= mask.count_ones();
            self.assert_host(host);
        }
        self.changes += 1;
        // The whole check is O(holders): debug builds only. `assert_host` above runs always.
        debug_assert!(self.check().is_ok(), "{:?}", self.check());
        Ok(holding)
    }

    /// The invariants: holdings are pairwise disjoint and disjoint from the base
    /// allocation, and `used` is exactly their union.
    pub fn check(&self) -> Result<(), String> {
        let mut expected = self.base.clone();
        for (holder, holding) in &self.holders {
            for &(host, mask) in holding {
                let slot = &mut expected[host as usize];
                if *slot & mask != 0 {
                    return Err(format!(
                        "GPU(s) {:?} on {} held twice (by `{holder}` and another)",
                        mask_indices(*slot & mask),
                        self.host_names[host as usize]
                    ));
                }
                *slot |= mask;
            }
        }
        if expected != self.used {
            return Err("the used-GPU index disagrees with the holdings".into());
        }
        let mut held = vec![0u32; self.held.len()];
        for holding in self.holders.values() {
            for &(host, mask) in holding {
                held[host as usize] += mask.count_ones();
            }
        }
        if held != self.held {
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
    #[should_panic(expected = "ledger invariant broken on host `b`")]
    fn a_gpu_counted_used_without_a_holder_stops_the_next_reserve_in_release_builds_too() {
        let cluster = cluster();
        let mut ledger = Ledger::new(&cluster);
        let b = cluster.host_id("b").expect("b");
        // Corrupt the index the way a bug would: GPU 7 used, held by no one.
        ledger.used[b as usize] |= 1 << 7;
        let _ = ledger.reserve("g", &[(b, 0b1)]);
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
