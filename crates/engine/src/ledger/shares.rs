//! GPU sharing: a ledger of milli-GPU shares, CPU and memory per node, for pods that ask
//! for a fraction of one GPU (time-slicing or MPS style), one whole GPU, or several whole
//! GPUs. Like [`super::Ledger`] it is the one place where capacity changes hands: a
//! reservation is checked in full before anything changes, and a release returns exactly
//! what was reserved.
//!
//! A GPU holds 1000 milli-GPU. A request names the GPUs it takes (a mask) and the share it
//! takes on each of them; a whole-GPU request takes 1000 on every GPU it names.

use std::collections::BTreeMap;
use std::fmt::Display;

use thiserror::Error;

use super::mask_indices;
use crate::topology::GpuMask;

/// Milli-GPU in one whole GPU.
pub const GPU_MILLI: u16 = 1000;
/// GPUs a shared node may have (one `u64` mask, as in the whole-GPU ledger).
pub const SHARE_NODE_GPUS_MAX: u8 = 64;

/// What a node offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCapacity {
    pub name: String,
    pub cpu_milli: u64,
    pub memory_mib: u64,
    pub gpus: u8,
}

/// What one pod takes on one node: CPU, memory, and `gpu_milli` on each GPU of `gpus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShareRequest {
    pub cpu_milli: u64,
    pub memory_mib: u64,
    /// Share taken on each GPU named, 1..=1000; 0 when the pod takes no GPU.
    pub gpu_milli: u16,
}

/// A reservation: the node, the GPUs and the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShareGrant {
    pub node: u32,
    pub gpus: GpuMask,
    pub request: ShareRequest,
}

#[derive(Debug, Error, PartialEq)]
pub enum ShareError {
    #[error("`{holder}` already holds a reservation")]
    HolderExists { holder: String },
    #[error("`{holder}` holds no reservation")]
    UnknownHolder { holder: String },
    #[error("`{holder}`: node index {node} is not in the cluster")]
    UnknownNode { holder: String, node: u32 },
    #[error("`{holder}`: node `{node}` has no GPU(s) {gpus:?}")]
    NoSuchGpu { holder: String, node: String, gpus: Vec<u8> },
    #[error("`{holder}`: a share of {milli} milli-GPU is outside 1..=1000")]
    BadShare { holder: String, milli: u16 },
    #[error("`{holder}`: names GPU(s) but asks for no share of them, or asks for a share of no GPU")]
    ShareWithoutGpus { holder: String },
    #[error("`{holder}`: GPU {gpu} on node `{node}` has {left} milli-GPU left, {wanted} asked")]
    GpuFull { holder: String, node: String, gpu: u8, left: u16, wanted: u16 },
    #[error("`{holder}`: node `{node}` has {left} {resource} left, {wanted} asked")]
    NodeFull { holder: String, node: String, resource: &'static str, left: u64, wanted: u64 },
    #[error("node `{node}` has {gpus} GPUs; at most {SHARE_NODE_GPUS_MAX} are supported")]
    TooManyGpus { node: String, gpus: u8 },
}

/// Who holds what, with per-node remaining capacity kept in step.
#[derive(Debug, Clone)]
pub struct ShareLedger<H: Ord + Clone + Display> {
    nodes: Vec<NodeCapacity>,
    /// First entry of each node in `gpu_left`.
    gpu_offset: Vec<usize>,
    gpu_left: Vec<u16>,
    cpu_left: Vec<u64>,
    memory_left: Vec<u64>,
    holders: BTreeMap<H, ShareGrant>,
}

impl<H: Ord + Clone + Display> ShareLedger<H> {
    pub fn new(nodes: Vec<NodeCapacity>) -> Result<Self, ShareError> {
        let mut gpu_offset = Vec::with_capacity(nodes.len());
        let mut total = 0usize;
        for node in &nodes {
            if node.gpus > SHARE_NODE_GPUS_MAX {
                return Err(ShareError::TooManyGpus { node: node.name.clone(), gpus: node.gpus });
            }
            gpu_offset.push(total);
            total += usize::from(node.gpus);
        }
        Ok(ShareLedger {
            gpu_offset,
            gpu_left: vec![GPU_MILLI; total],
            cpu_left: nodes.iter().map(|n| n.cpu_milli).collect(),
            memory_left: nodes.iter().map(|n| n.memory_mib).collect(),
            nodes,
            holders: BTreeMap::new(),
        })
    }

    pub fn nodes(&self) -> &[NodeCapacity] {
        &self.nodes
    }

    /// Milli-GPU left on each GPU of `node`, by GPU index.
    pub fn gpu_left(&self, node: u32) -> &[u16] {
        let start = self.gpu_offset[node as usize];
        &self.gpu_left[start..start + usize::from(self.nodes[node as usize].gpus)]
    }

    pub fn cpu_left(&self, node: u32) -> u64 {
        self.cpu_left[node as usize]
    }

    pub fn memory_left(&self, node: u32) -> u64 {
        self.memory_left[node as usize]
    }

    /// Milli-GPU held across the cluster, shares counted exactly.
    pub fn gpu_milli_used(&self) -> u64 {
        self.gpu_left.iter().map(|&left| u64::from(GPU_MILLI - left)).sum()
    }

    pub fn gpu_milli_capacity(&self) -> u64 {
        self.gpu_left.len() as u64 * u64::from(GPU_MILLI)
    }

    pub fn holding(&self, holder: &H) -> Option<&ShareGrant> {
        self.holders.get(holder)
    }

    pub fn holders(&self) -> impl Iterator<Item = (&H, &ShareGrant)> {
        self.holders.iter()
    }

    /// Holds `grant` for `holder`, or nothing.
    pub fn reserve(&mut self, holder: H, grant: ShareGrant) -> Result<(), ShareError> {
        let who = || holder.to_string();
        if self.holders.contains_key(&holder) {
            return Err(ShareError::HolderExists { holder: who() });
        }
        let Some(node) = self.nodes.get(grant.node as usize) else {
            return Err(ShareError::UnknownNode { holder: who(), node: grant.node });
        };
        let request = grant.request;
        if request.gpu_milli > GPU_MILLI {
            return Err(ShareError::BadShare { holder: who(), milli: request.gpu_milli });
        }
        if (request.gpu_milli == 0) != (grant.gpus == 0) {
            return Err(ShareError::ShareWithoutGpus { holder: who() });
        }
        let beyond = grant.gpus & !crate::topology::full_mask(node.gpus);
        if beyond != 0 {
            return Err(ShareError::NoSuchGpu { holder: who(), node: node.name.clone(), gpus: mask_indices(beyond) });
        }
        let full = |resource, left, wanted| ShareError::NodeFull {
            holder: who(),
            node: node.name.clone(),
            resource,
            left,
            wanted,
        };
        if request.cpu_milli > self.cpu_left(grant.node) {
            return Err(full("milli-CPU", self.cpu_left(grant.node), request.cpu_milli));
        }
        if request.memory_mib > self.memory_left(grant.node) {
            return Err(full("MiB of memory", self.memory_left(grant.node), request.memory_mib));
        }
        for gpu in mask_indices(grant.gpus) {
            let left = self.gpu_left(grant.node)[usize::from(gpu)];
            if left < request.gpu_milli {
                return Err(ShareError::GpuFull {
                    holder: who(),
                    node: node.name.clone(),
                    gpu,
                    left,
                    wanted: request.gpu_milli,
                });
            }
        }
        // Checked in full above; only now does anything change.
        self.apply(&grant, false);
        self.holders.insert(holder, grant);
        Ok(())
    }

    /// Returns exactly what `holder` reserved.
    pub fn release(&mut self, holder: &H) -> Result<ShareGrant, ShareError> {
        let grant =
            self.holders.remove(holder).ok_or_else(|| ShareError::UnknownHolder { holder: holder.to_string() })?;
        self.apply(&grant, true);
        Ok(grant)
    }

    fn apply(&mut self, grant: &ShareGrant, give_back: bool) {
        let node = grant.node as usize;
        let request = grant.request;
        let start = self.gpu_offset[node];
        for gpu in mask_indices(grant.gpus) {
            let slot = &mut self.gpu_left[start + usize::from(gpu)];
            *slot = if give_back { *slot + request.gpu_milli } else { *slot - request.gpu_milli };
        }
        if give_back {
            self.cpu_left[node] += request.cpu_milli;
            self.memory_left[node] += request.memory_mib;
        } else {
            self.cpu_left[node] -= request.cpu_milli;
            self.memory_left[node] -= request.memory_mib;
        }
    }

    /// The invariants: no GPU, CPU or memory is given beyond its capacity, and what is
    /// left is exactly capacity minus the holdings.
    pub fn check(&self) -> Result<(), String> {
        let mut gpu_used = vec![0u32; self.gpu_left.len()];
        let mut cpu_used = vec![0u64; self.nodes.len()];
        let mut memory_used = vec![0u64; self.nodes.len()];
        for (holder, grant) in &self.holders {
            let node = grant.node as usize;
            cpu_used[node] += grant.request.cpu_milli;
            memory_used[node] += grant.request.memory_mib;
            for gpu in mask_indices(grant.gpus) {
                let slot = &mut gpu_used[self.gpu_offset[node] + usize::from(gpu)];
                *slot += u32::from(grant.request.gpu_milli);
                if *slot > u32::from(GPU_MILLI) {
                    return Err(format!(
                        "GPU {gpu} on `{}` is given {} milli-GPU (last by `{holder}`)",
                        self.nodes[node].name, slot
                    ));
                }
            }
        }
        for (index, node) in self.nodes.iter().enumerate() {
            if cpu_used[index] > node.cpu_milli || memory_used[index] > node.memory_mib {
                return Err(format!("node `{}` is given more CPU or memory than it has", node.name));
            }
            if self.cpu_left[index] != node.cpu_milli - cpu_used[index]
                || self.memory_left[index] != node.memory_mib - memory_used[index]
            {
                return Err(format!("node `{}`: CPU or memory left disagrees with the holdings", node.name));
            }
        }
        let expected: Vec<u16> = gpu_used.iter().map(|&used| GPU_MILLI - used as u16).collect();
        if expected != self.gpu_left {
            return Err("milli-GPU left disagrees with the holdings".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger() -> ShareLedger<String> {
        let node = |name: &str, gpus| NodeCapacity { name: name.into(), cpu_milli: 8000, memory_mib: 1024, gpus };
        ShareLedger::new(vec![node("a", 2), node("b", 8)]).expect("valid")
    }

    fn request(cpu: u64, gpu_milli: u16) -> ShareRequest {
        ShareRequest { cpu_milli: cpu, memory_mib: 0, gpu_milli }
    }

    #[test]
    fn shares_of_one_gpu_add_up_to_a_whole_and_no_more() {
        let mut ledger = ledger();
        ledger.reserve("p1".into(), ShareGrant { node: 0, gpus: 0b1, request: request(1000, 600) }).unwrap();
        ledger.reserve("p2".into(), ShareGrant { node: 0, gpus: 0b1, request: request(1000, 400) }).unwrap();
        let error = ledger.reserve("p3".into(), ShareGrant { node: 0, gpus: 0b1, request: request(0, 1) }).unwrap_err();
        assert!(matches!(error, ShareError::GpuFull { left: 0, wanted: 1, .. }), "{error}");
        assert_eq!(ledger.gpu_left(0), &[0, 1000]);
        assert_eq!(ledger.gpu_milli_used(), 1000);
        ledger.check().unwrap();
    }

    #[test]
    fn a_refused_request_changes_nothing() {
        let mut ledger = ledger();
        ledger.reserve("p1".into(), ShareGrant { node: 1, gpus: 0b10, request: request(0, 500) }).unwrap();
        let before = (ledger.gpu_left(1).to_vec(), ledger.cpu_left(1));
        // GPU 0 is free, GPU 1 has only 500 left: the whole request is refused.
        let error =
            ledger.reserve("p2".into(), ShareGrant { node: 1, gpus: 0b11, request: request(100, 1000) }).unwrap_err();
        assert!(matches!(error, ShareError::GpuFull { gpu: 1, .. }), "{error}");
        assert_eq!((ledger.gpu_left(1).to_vec(), ledger.cpu_left(1)), before);
        let error =
            ledger.reserve("p2".into(), ShareGrant { node: 1, gpus: 0, request: request(9000, 0) }).unwrap_err();
        assert!(error.to_string().contains("milli-CPU"), "{error}");
        assert!(ledger.holding(&"p2".to_string()).is_none());
        ledger.check().unwrap();
    }

    #[test]
    fn release_returns_exactly_what_was_reserved() {
        let mut ledger = ledger();
        let grant = ShareGrant {
            node: 1,
            gpus: 0b1111_0000,
            request: ShareRequest { cpu_milli: 4000, memory_mib: 512, gpu_milli: 1000 },
        };
        ledger.reserve("p".into(), grant).unwrap();
        assert_eq!(ledger.gpu_left(1), &[1000, 1000, 1000, 1000, 0, 0, 0, 0]);
        assert_eq!(ledger.release(&"p".to_string()).unwrap(), grant);
        assert_eq!(ledger.gpu_milli_used(), 0);
        assert_eq!((ledger.cpu_left(1), ledger.memory_left(1)), (8000, 1024));
        assert!(matches!(ledger.release(&"p".to_string()), Err(ShareError::UnknownHolder { .. })));
    }

    #[test]
    fn malformed_requests_are_refused() {
        let mut ledger = ledger();
        let bad = |gpus, gpu_milli| ShareGrant { node: 0, gpus, request: request(0, gpu_milli) };
        assert!(matches!(ledger.reserve("p".into(), bad(0b100, 10)), Err(ShareError::NoSuchGpu { .. })));
        assert!(matches!(ledger.reserve("p".into(), bad(0b1, 1001)), Err(ShareError::BadShare { .. })));
        assert!(matches!(ledger.reserve("p".into(), bad(0b1, 0)), Err(ShareError::ShareWithoutGpus { .. })));
        assert!(matches!(ledger.reserve("p".into(), bad(0, 10)), Err(ShareError::ShareWithoutGpus { .. })));
        let grant = ShareGrant { node: 9, gpus: 0, request: request(0, 0) };
        assert!(matches!(ledger.reserve("p".into(), grant), Err(ShareError::UnknownNode { .. })));
        assert_eq!(ledger.gpu_milli_used(), 0);
    }
}
