//! The cluster as a petgraph graph: topology domains, hosts, CPU sockets, GPUs, NVSwitch
//! fabrics (per host, or one per multi-host clique), NICs, with typed links that carry a
//! bandwidth. It is the one description of how things are wired; the flat per-host link
//! matrices the placement engine reads are derived from it ([`TopologyGraph::derive_host_links`]).

use petgraph::graph::{NodeIndex, UnGraph};
use petgraph::visit::EdgeRef;

use super::{full_mask, Clique, Domain, Fabric, GpuMask, Host, HostId, HostLinks, NvlinkLayout};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Vertex {
    Domain {
        level: usize,
        index: u32,
    },
    Host(HostId),
    Socket {
        host: HostId,
        socket: u8,
    },
    Gpu {
        host: HostId,
        index: u8,
    },
    /// The NVSwitch fabric of one host, or of one NVLink group declared on it.
    NvSwitch {
        host: HostId,
        group: u8,
    },
    /// A multi-host NVLink domain (GB200 NVL72): one fabric shared by all its GPUs.
    Clique(u32),
    Nic {
        host: HostId,
        index: u8,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkKind {
    /// A domain contains a child domain, or a socket belongs to its host.
    Contains,
    /// A direct NVLink between two GPUs (bridge, cube-mesh link).
    NvLink,
    /// A GPU's port into an NVSwitch fabric.
    NvSwitchPort,
    /// GPU to its CPU socket.
    Pcie,
    /// Socket to socket (UPI / Infinity Fabric).
    CpuInterconnect,
    /// GPU to the NIC it shares a PCIe switch with.
    NicAffinity,
    /// NIC to its leaf (innermost-level) switch.
    Network,
    /// Switch to switch, one level up.
    Uplink,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    pub kind: LinkKind,
    /// Bidirectional GB/s; 0 where the link has no bandwidth of its own (containment).
    pub gbps: u32,
}

/// Network bandwidth of one NIC by GPU generation (GB/s, bidirectional):
/// 400 Gb/s NDR for Hopper and newer, 200 Gb/s HDR for Ampere, 100 Gb/s before.
fn nic_gbps(product: &super::GpuProduct) -> u32 {
    match product.pcie_gbps {
        128.. => 100,
        64.. => 50,
        _ => 25,
    }
}

#[derive(Debug, Clone)]
pub struct TopologyGraph {
    pub graph: UnGraph<Vertex, Link>,
    host_vertices: Vec<NodeIndex>,
    gpu_vertices: Vec<Vec<NodeIndex>>,
    socket_of_gpu: Vec<Vec<u8>>,
}

/// Direct NVLink counts of the DGX-1 (V100) hybrid cube-mesh, as `nvidia-smi topo -m`
/// shows it: each GPU has 6 links; quads 0-3 and 4-7 are fully connected.
const HYBRID_CUBE_MESH_LINKS: [(u8, u8, u32); 12] = [
    (0, 1, 1),
    (0, 2, 1),
    (0, 3, 2),
    (1, 2, 2),
    (1, 3, 1),
    (2, 3, 1),
    (4, 5, 1),
    (4, 6, 1),
    (4, 7, 2),
    (5, 6, 2),
    (5, 7, 1),
    (6, 7, 1),
];

/// A host's NVLink: GPUs on an NVSwitch fabric (the host's own, or the multi-host clique's),
/// on fabrics per group, in bridged pairs, or in a DGX-1 hybrid cube-mesh.
fn add_nvlink(
    graph: &mut UnGraph<Vertex, Link>,
    host_id: HostId,
    host: &Host,
    gpus: &[NodeIndex],
    clique_vertices: &[NodeIndex],
) {
    let product = host.product.get();
    let nvlink = product.nvlink_gbps;
    match &host.nvlink {
        NvlinkLayout::None => {}
        NvlinkLayout::All => {
            let fabric = match (product.fabric, host.clique) {
                (Fabric::MultiNodeNvlink, Some(clique)) => clique_vertices[clique as usize],
                _ => graph.add_node(Vertex::NvSwitch { host: host_id, group: 0 }),
            };
            for gpu in gpus {
                graph.add_edge(*gpu, fabric, Link { kind: LinkKind::NvSwitchPort, gbps: nvlink });
            }
        }
        NvlinkLayout::Groups(groups) => {
            for (group_index, group) in groups.iter().enumerate() {
                let fabric = graph.add_node(Vertex::NvSwitch { host: host_id, group: group_index as u8 });
                for &gpu in group {
                    graph.add_edge(gpus[usize::from(gpu)], fabric, Link { kind: LinkKind::NvSwitchPort, gbps: nvlink });
                }
            }
        }
        NvlinkLayout::Pairs => {
            for pair in gpus.chunks_exact(2) {
                graph.add_edge(pair[0], pair[1], Link { kind: LinkKind::NvLink, gbps: nvlink });
            }
        }
        NvlinkLayout::HybridCubeMesh => {
            let per_link = nvlink / 6;
            let cross = (0..4u8).map(|gpu| (gpu, gpu + 4, 2));
            // A product's default mesh on a host with fewer than 8 GPUs (a 4-GPU V100 host,
            // or GPUs the device plugin withdrew): the links among the GPUs it has.
            let present = |&(a, b, _): &(u8, u8, u32)| usize::from(a.max(b)) < gpus.len();
            for (a, b, links) in HYBRID_CUBE_MESH_LINKS.into_iter().chain(cross).filter(present) {
                graph.add_edge(
                    gpus[usize::from(a)],
                    gpus[usize::from(b)],
                    Link { kind: LinkKind::NvLink, gbps: per_link * links },
                );
            }
        }
    }
}

/// A host's NICs, each on the host's leaf domain (when it has one), and each GPU's affinity
/// to a NIC; returns the bandwidth of one NIC.
fn add_nics(
    graph: &mut UnGraph<Vertex, Link>,
    host_id: HostId,
    host: &Host,
    host_vertex: NodeIndex,
    gpus: &[NodeIndex],
    leaf: Option<NodeIndex>,
) -> u32 {
    let product = host.product.get();
    let nic_bandwidth = nic_gbps(product);
    for nic_index in 0..host.nic_count {
        let nic = graph.add_node(Vertex::Nic { host: host_id, index: nic_index });
        graph.add_edge(host_vertex, nic, Link { kind: LinkKind::Contains, gbps: 0 });
        if let Some(leaf) = leaf {
            graph.add_edge(nic, leaf, Link { kind: LinkKind::Network, gbps: nic_bandwidth });
        }
    }
    if host.nic_count > 0 {
        let nics: Vec<NodeIndex> =
            graph.neighbors(host_vertex).filter(|v| matches!(graph[*v], Vertex::Nic { .. })).collect();
        let mut nics = nics;
        nics.sort_by_key(|v| match graph[*v] {
            Vertex::Nic { index, .. } => index,
            _ => u8::MAX,
        });
        for (gpu_index, gpu) in gpus.iter().enumerate() {
            let nic = nics[gpu_index * nics.len() / gpus.len().max(1)];
            graph.add_edge(*gpu, nic, Link { kind: LinkKind::NicAffinity, gbps: product.pcie_gbps });
        }
    }
    nic_bandwidth
}

impl TopologyGraph {
    pub fn build(levels: &[String], domains: &[Vec<Domain>], hosts: &[Host], cliques: &[Clique]) -> Self {
        let mut graph = UnGraph::<Vertex, Link>::default();
        let domain_vertices: Vec<Vec<NodeIndex>> = domains
            .iter()
            .enumerate()
            .map(|(level, at_level)| {
                (0..at_level.len()).map(|index| graph.add_node(Vertex::Domain { level, index: index as u32 })).collect()
            })
            .collect();
        let clique_vertices: Vec<NodeIndex> =
            (0..cliques.len()).map(|index| graph.add_node(Vertex::Clique(index as u32))).collect();

        let mut host_vertices = Vec::with_capacity(hosts.len());
        let mut gpu_vertices = Vec::with_capacity(hosts.len());
        let mut socket_of_gpu = Vec::with_capacity(hosts.len());
        let mut uplink_gbps: Vec<Vec<u32>> = domains.iter().map(|d| vec![0; d.len()]).collect();
        for (host_index, host) in hosts.iter().enumerate() {
            let host_id = host_index as HostId;
            let product = host.product.get();
            let host_vertex = graph.add_node(Vertex::Host(host_id));
            host_vertices.push(host_vertex);

            let socket_count: u8 = if host.gpu_count >= 2 { 2 } else { 1 };
            let sockets: Vec<NodeIndex> = (0..socket_count)
                .map(|socket| {
                    let vertex = graph.add_node(Vertex::Socket { host: host_id, socket });
                    graph.add_edge(host_vertex, vertex, Link { kind: LinkKind::Contains, gbps: 0 });
                    vertex
                })
                .collect();
            if sockets.len() == 2 {
                graph.add_edge(
                    sockets[0],
                    sockets[1],
                    Link { kind: LinkKind::CpuInterconnect, gbps: product.pcie_gbps },
                );
            }

            let gpus: Vec<NodeIndex> =
                (0..host.gpu_count).map(|index| graph.add_node(Vertex::Gpu { host: host_id, index })).collect();
            let per_socket = host.gpu_count.div_ceil(socket_count);
            let sockets_of_gpus: Vec<u8> = (0..host.gpu_count).map(|gpu| gpu / per_socket).collect();
            for (gpu, &socket) in gpus.iter().zip(&sockets_of_gpus) {
                graph.add_edge(
                    *gpu,
                    sockets[usize::from(socket)],
                    Link { kind: LinkKind::Pcie, gbps: product.pcie_gbps },
                );
            }

            add_nvlink(&mut graph, host_id, host, &gpus, &clique_vertices);
            let leaf = host.domain_path.last().map(|&index| domain_vertices[levels.len() - 1][index as usize]);
            let nic_bandwidth = add_nics(&mut graph, host_id, host, host_vertex, &gpus, leaf);
            // A non-blocking fabric: each uplink carries what the hosts below it can send.
            for (level, &index) in host.domain_path.iter().enumerate() {
                uplink_gbps[level][index as usize] += nic_bandwidth * u32::from(host.nic_count);
            }

            gpu_vertices.push(gpus);
            socket_of_gpu.push(sockets_of_gpus);
        }
        for (level, at_level) in domains.iter().enumerate().skip(1) {
            for (index, domain) in at_level.iter().enumerate() {
                if let Some(parent) = domain.parent {
                    graph.add_edge(
                        domain_vertices[level - 1][parent as usize],
                        domain_vertices[level][index],
                        Link { kind: LinkKind::Uplink, gbps: uplink_gbps[level][index] },
                    );
                }
            }
        }
        TopologyGraph { graph, host_vertices, gpu_vertices, socket_of_gpu }
    }

    /// NVLink bandwidth between two GPUs: the sum of direct links, or through a shared
    /// NVSwitch fabric the smaller of the two ports; 0 when they share no NVLink.
    fn nvlink_between(&self, a: NodeIndex, b: NodeIndex) -> u32 {
        let mut direct = 0;
        let mut switched = 0;
        for edge in self.graph.edges(a) {
            let other = edge.target();
            match edge.weight().kind {
                LinkKind::NvLink if other == b => direct += edge.weight().gbps,
                LinkKind::NvSwitchPort => {
                    if let Some(port_b) = self.graph.find_edge(other, b) {
                        switched = switched.max(edge.weight().gbps.min(self.graph[port_b].gbps));
                    }
                }
                _ => {}
            }
        }
        direct.max(switched)
    }

    fn pcie_between(&self, host: HostId, a: u8, b: u8) -> u32 {
        let gpus = &self.gpu_vertices[host as usize];
        let port = |gpu: u8| {
            self.graph
                .edges(gpus[usize::from(gpu)])
                .find(|e| e.weight().kind == LinkKind::Pcie)
                .map_or(0, |e| e.weight().gbps)
        };
        let sockets = &self.socket_of_gpu[host as usize];
        let bandwidth = port(a).min(port(b));
        if sockets[usize::from(a)] == sockets[usize::from(b)] {
            bandwidth
        } else {
            // Crossing sockets halves what PCIe peer-to-peer gets in practice.
            bandwidth / 2
        }
    }

    /// The GPU x GPU bandwidth matrix and NVLink adjacency of one host.
    pub fn derive_host_links(&self, host: HostId, gpu_count: u8) -> HostLinks {
        let n = usize::from(gpu_count);
        let gpus = &self.gpu_vertices[host as usize];
        let mut bandwidth_gbps = vec![0u32; n * n];
        let mut nvlink_neighbors = vec![0u64; n];
        let mut nvlink_values = Vec::with_capacity(n * n);
        for a in 0..gpu_count {
            for b in (a + 1)..gpu_count {
                let nvlink = self.nvlink_between(gpus[usize::from(a)], gpus[usize::from(b)]);
                if nvlink > 0 {
                    nvlink_neighbors[usize::from(a)] |= 1 << b;
                    nvlink_neighbors[usize::from(b)] |= 1 << a;
                }
                nvlink_values.push(nvlink);
                let best = nvlink.max(self.pcie_between(host, a, b));
                bandwidth_gbps[usize::from(a) * n + usize::from(b)] = best;
                bandwidth_gbps[usize::from(b) * n + usize::from(a)] = best;
            }
        }
        let best_nvlink_gbps = nvlink_values.iter().copied().max().unwrap_or(0);
        let uniform_nvlink = nvlink_values.iter().all(|&v| v > 0 && v == best_nvlink_gbps);
        let mut numa_masks = Vec::new();
        for (gpu, &socket) in self.socket_of_gpu[host as usize].iter().enumerate() {
            if numa_masks.len() <= usize::from(socket) {
                numa_masks.resize(usize::from(socket) + 1, 0);
            }
            numa_masks[usize::from(socket)] |= 1 << gpu;
        }
        debug_assert_eq!(numa_masks.iter().fold(0, |m, s| m | s), full_mask(gpu_count));
        let largest_nvlink_group = largest_component(&nvlink_neighbors);
        HostLinks {
            bandwidth_gbps,
            nvlink_neighbors,
            uniform_nvlink,
            best_nvlink_gbps,
            largest_nvlink_group,
            numa_masks,
        }
    }

    pub fn host_vertex(&self, host: HostId) -> NodeIndex {
        self.host_vertices[host as usize]
    }

    pub fn gpu_vertex(&self, host: HostId, gpu: u8) -> NodeIndex {
        self.gpu_vertices[host as usize][usize::from(gpu)]
    }

    pub fn vertex_count(&self) -> usize {
        self.graph.node_count()
    }
}

/// Masks of GPUs that are all pairwise NVLinked, restricted to `free`; used to describe
/// the free shape of a host.
/// GPUs in the largest connected set of the NVLink adjacency `neighbors` (per GPU, the GPUs
/// it reaches); 1 when no GPU has a neighbour, 0 for a host without GPUs.
fn largest_component(neighbors: &[GpuMask]) -> u32 {
    let mut unvisited: GpuMask = if neighbors.len() >= 64 { GpuMask::MAX } else { (1 << neighbors.len()) - 1 };
    let mut largest = 0;
    while unvisited != 0 {
        // Flood fill over NVLink edges from the lowest GPU not reached yet.
        let mut reached = unvisited & unvisited.wrapping_neg();
        loop {
            let mut next = reached;
            let mut rest = reached;
            while rest != 0 {
                next |= neighbors[rest.trailing_zeros() as usize];
                rest &= rest - 1;
            }
            if next == reached {
                break;
            }
            reached = next;
        }
        largest = largest.max(reached.count_ones());
        unvisited &= !reached;
    }
    largest
}

pub fn nvlink_connected(links: &HostLinks, set: GpuMask) -> bool {
    // A set is connected when a flood fill over NVLink edges from its lowest GPU reaches all.
    if set == 0 {
        return true;
    }
    let mut reached = set & set.wrapping_neg();
    loop {
        let mut next = reached;
        let mut rest = reached;
        while rest != 0 {
            let gpu = rest.trailing_zeros() as usize;
            rest &= rest - 1;
            next |= links.nvlink_neighbors[gpu] & set;
        }
        if next == reached {
            return reached == set;
        }
        reached = next;
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Cluster, ClusterSpec, NvlinkLayout};
    use super::*;
    use crate::testkit::node;

    fn one_host(product: &str, count: u8, nvlink: Option<NvlinkLayout>) -> Cluster {
        let mut spec = node("h", product, count, &[("rack", "r1")]);
        spec.nvlink = nvlink;
        Cluster::build(ClusterSpec { name: "t".into(), levels: vec!["rack".into()], nodes: vec![spec] }).expect("valid")
    }

    #[test]
    fn nvswitch_hosts_are_uniform_all_to_all() {
        let cluster = one_host("H100", 8, None);
        let links = &cluster.hosts[0].links;
        assert!(links.uniform_nvlink);
        assert_eq!(links.best_nvlink_gbps, 900);
        assert_eq!(links.bandwidth(8, 0, 7), 900);
        assert_eq!(links.nvlink_neighbors[3], 0xff & !(1 << 3));
        assert_eq!(links.largest_nvlink_group, 8);
    }

    #[test]
    fn hybrid_cube_mesh_links_quads_and_cross_pairs_only() {
        let cluster = one_host("V100-SXM2-16GB", 8, None);
        let links = &cluster.hosts[0].links;
        assert!(!links.uniform_nvlink);
        assert_eq!(links.nvlink_neighbors[0], 0b0001_1110);
        assert_eq!(links.largest_nvlink_group, 8, "the quads are joined by the i <-> i+4 links");
        assert_eq!(links.bandwidth(8, 0, 3), 100);
        assert_eq!(links.bandwidth(8, 0, 1), 50);
        // 0 and 5 share no NVLink and sit on different sockets: half of PCIe gen3.
        assert_eq!(links.bandwidth(8, 0, 5), 16);
        assert!(nvlink_connected(links, 0b0000_1111));
        assert!(nvlink_connected(links, 0b0011_0011));
        assert!(!nvlink_connected(links, 0b0100_0001));
    }

    #[test]
    fn a_mesh_product_on_fewer_than_eight_gpus_keeps_the_links_it_has() {
        // A 4-GPU V100 host (and an 8-GPU one with GPUs withdrawn) once indexed past its GPUs.
        let cluster = one_host("V100-SXM2-32GB", 4, None);
        let links = &cluster.hosts[0].links;
        assert_eq!(links.nvlink_neighbors, vec![0b1110, 0b1101, 0b1011, 0b0111], "one fully linked quad");
        assert_eq!(links.largest_nvlink_group, 4);
    }

    #[test]
    fn pcie_hosts_have_no_nvlink_and_explicit_groups_do() {
        let cluster = one_host("L40S", 4, None);
        assert_eq!(cluster.hosts[0].links.best_nvlink_gbps, 0);
        assert!(!nvlink_connected(&cluster.hosts[0].links, 0b11));
        assert_eq!(cluster.hosts[0].links.largest_nvlink_group, 1);
        let cluster = one_host("A100-PCIE-40GB", 4, Some(NvlinkLayout::Groups(vec![vec![0, 1], vec![2, 3]])));
        let links = &cluster.hosts[0].links;
        assert_eq!(links.bandwidth(4, 0, 1), 600);
        assert_eq!(links.largest_nvlink_group, 2);
        // 1 and 2 are bridged to nobody and sit on different sockets.
        assert_eq!(links.bandwidth(4, 1, 2), 32);
    }

    #[test]
    fn clique_gpus_share_one_fabric_across_hosts() {
        let mut a = node("a", "GB200", 4, &[("rack", "r1")]);
        let mut b = node("b", "GB200", 4, &[("rack", "r1")]);
        a.clique = Some("c1".into());
        b.clique = Some("c1".into());
        let cluster = Cluster::build(ClusterSpec { name: "t".into(), levels: vec!["rack".into()], nodes: vec![a, b] })
            .expect("valid");
        let graph = &cluster.graph;
        let (ga, gb) = (graph.gpu_vertex(0, 0), graph.gpu_vertex(1, 3));
        assert_eq!(graph.nvlink_between(ga, gb), 1800);
        assert_eq!(cluster.cliques[0].hosts, vec![0, 1]);
    }
}
