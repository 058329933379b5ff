//! The fragmentation measure of the FGD paper (ATC'23, "Beware of Fragmentation"): how
//! much of a node's free GPU capacity the typical pods of the workload cannot use.
//!
//! For each typical pod class m with popularity p_m, f_m(n) is the node's whole free GPU
//! capacity when m cannot run there at all (CPU-only class, wrong GPU model, too few GPUs
//! with room, too little CPU); otherwise it is the free capacity of the GPUs too small for
//! m's per-GPU share. F(n) = sum of p_m * f_m(n), in milli-GPU.

use std::collections::HashMap;

use super::{has_room, NodeView, PodClass};

/// Share of pods FGD's typical classes must cover (the artifact's 95 %).
pub const TYPICAL_COVERAGE: f64 = 0.95;

#[derive(Debug, Clone, PartialEq)]
pub struct TypicalPod {
    pub class: PodClass,
    /// Popularity p_m; the typical classes' weights sum to 1.
    pub weight: f64,
}

/// The most frequent classes covering `coverage` of `pods` (FGD: [`TYPICAL_COVERAGE`]),
/// with their popularity renormalised over the classes kept. Ties in count go to the
/// larger class (CPU, then share, then GPU count, then GPU-model list, all descending), as
/// in the artifact.
pub fn typical_pods<'a>(pods: impl IntoIterator<Item = &'a PodClass>, coverage: f64) -> Vec<TypicalPod> {
    let mut counts: HashMap<&PodClass, u64> = HashMap::new();
    let mut total = 0u64;
    for class in pods {
        *counts.entry(class).or_default() += 1;
        total += 1;
    }
    let mut ranked: Vec<(&PodClass, u64)> = counts.into_iter().collect();
    let key = |class: &PodClass| (class.cpu_milli, class.gpu_milli, class.num_gpu);
    ranked.sort_by(|(a, a_count), (b, b_count)| {
        b_count.cmp(a_count).then_with(|| key(b).cmp(&key(a))).then_with(|| b.gpu_spec.cmp(&a.gpu_spec))
    });
    let mut kept = Vec::new();
    let mut covered = 0u64;
    for (class, count) in ranked {
        if covered as f64 >= coverage * total as f64 {
            break;
        }
        covered += count;
        kept.push((class.clone(), count));
    }
    kept.into_iter().map(|(class, count)| TypicalPod { class, weight: count as f64 / covered as f64 }).collect()
}

/// f_m(n): the free milli-GPU of `node` that class `class` cannot use.
pub fn class_fragment(class: &PodClass, node: &NodeView<'_>) -> f64 {
    let free: u64 = node.gpu_left.iter().map(|&left| u64::from(left)).sum();
    if class.gpu_milli == 0 || !class.allows_model(node.model) || node.cpu_left < class.cpu_milli {
        return free as f64;
    }
    if !has_room(node.gpu_left, class) {
        return free as f64;
    }
    node.gpu_left.iter().filter(|&&left| left < class.gpu_milli).map(|&left| f64::from(left)).sum()
}

/// F(n) = sum over typical classes of p_m * f_m(n).
pub fn node_fragment(typical: &[TypicalPod], node: &NodeView<'_>) -> f64 {
    typical.iter().map(|t| t.weight * class_fragment(&t.class, node)).sum()
}

/// topoplace's f_m(n): the free milli-GPU of `node` left over once as many pods of a
/// share class as the node can take (by GPU room *and* by CPU) are placed. FGD counts a
/// GPU with 700 left as usable by a 500 share, and every roomy GPU as usable however
/// little CPU the node has; here only 500 of it is, and only as many shares as the CPU
/// left can run. Whole-GPU classes are counted as FGD counts them (capping them by CPU as
/// well measured worse on every trace; see docs/results/fgd-replay.md).
pub fn class_capacity_fragment(class: &PodClass, node: &NodeView<'_>) -> f64 {
    if !class.is_share() {
        return class_fragment(class, node);
    }
    let free: u64 = node.gpu_left.iter().map(|&left| u64::from(left)).sum();
    if !class.allows_model(node.model) {
        return free as f64;
    }
    let by_gpu: u64 = node.gpu_left.iter().map(|&left| u64::from(left / class.gpu_milli)).sum();
    let by_cpu = node.cpu_left.checked_div(class.cpu_milli).unwrap_or(u64::MAX);
    (free - by_gpu.min(by_cpu) * u64::from(class.gpu_milli)) as f64
}

/// topoplace's F(n): sum over the classes of `workload` (every class among the arrivals up
/// to the last refresh of topoplace's demand, not only the most frequent) of p_m * f_m(n)
/// with [`class_capacity_fragment`].
pub fn node_capacity_fragment(workload: &[TypicalPod], node: &NodeView<'_>) -> f64 {
    workload.iter().map(|t| t.weight * class_capacity_fragment(&t.class, node)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pods::ModelSet;

    fn class(cpu_milli: u64, gpu_milli: u16, num_gpu: u8) -> PodClass {
        PodClass { cpu_milli, gpu_milli, num_gpu, gpu_spec: String::new(), models: ModelSet::ANY }
    }

    fn node(cpu_left: u64, gpu_left: &[u16]) -> NodeView<'_> {
        NodeView { model: 0, cpu_left, gpu_left }
    }

    #[test]
    fn fragment_by_hand() {
        // Free: 1000 + 300 + 0 + 700 = 2000 milli-GPU.
        let lefts = [1000, 300, 0, 700];
        let n = node(8000, &lefts);
        // A half-GPU pod fits the GPUs with 1000 and 700; the 300 (and the empty GPU) is fragment.
        assert_eq!(class_fragment(&class(1000, 500, 1), &n), 300.0);
        // A whole-GPU pod fits only GPU 0; 300 + 700 are fragment.
        assert_eq!(class_fragment(&class(1000, 1000, 1), &n), 1000.0);
        // Two whole GPUs do not fit: everything free is fragment.
        assert_eq!(class_fragment(&class(1000, 1000, 2), &n), 2000.0);
        // Too little CPU: everything is fragment; so for a CPU-only pod.
        assert_eq!(class_fragment(&class(9000, 100, 1), &n), 2000.0);
        assert_eq!(class_fragment(&class(1000, 0, 0), &n), 2000.0);
        // A pod limited to another GPU model cannot use any of it.
        let other_model = PodClass { models: ModelSet::of(1), ..class(0, 100, 1) };
        assert_eq!(class_fragment(&other_model, &n), 2000.0);

        // What a 500 share really leaves: 3 of them fit (1000 -> two, 700 -> one), so 500 of
        // the 2000 free is out of reach, not 300; with CPU for only two, 1000 is.
        assert_eq!(class_capacity_fragment(&class(1000, 500, 1), &n), 500.0);
        assert_eq!(class_capacity_fragment(&class(4000, 500, 1), &n), 1000.0);
        assert_eq!(class_capacity_fragment(&class(9000, 500, 1), &n), 2000.0);
        assert_eq!(class_capacity_fragment(&other_model, &n), 2000.0);
        // Whole-GPU classes count as in FGD.
        assert_eq!(class_capacity_fragment(&class(1000, 1000, 1), &n), 1000.0);
        assert_eq!(class_capacity_fragment(&class(1000, 1000, 2), &n), 2000.0);

        let typical = [
            TypicalPod { class: class(1000, 500, 1), weight: 0.5 },
            TypicalPod { class: class(1000, 1000, 1), weight: 0.25 },
            TypicalPod { class: class(0, 0, 0), weight: 0.25 },
        ];
        assert_eq!(node_fragment(&typical, &n), 0.5 * 300.0 + 0.25 * 1000.0 + 0.25 * 2000.0);
        assert_eq!(node_capacity_fragment(&typical, &n), 0.5 * 500.0 + 0.25 * 1000.0 + 0.25 * 2000.0);
    }

    #[test]
    fn typical_classes_cover_95_percent_most_frequent_first() {
        let a = class(1000, 500, 1);
        let b = class(2000, 1000, 1);
        let c = class(4000, 0, 0);
        let mut pods = vec![a.clone(); 70];
        pods.extend(vec![b.clone(); 26]);
        pods.extend(vec![c.clone(); 4]);
        let typical = typical_pods(&pods, TYPICAL_COVERAGE);
        // 70 + 26 = 96 >= 95: c is dropped, the rest renormalised.
        assert_eq!(typical.len(), 2);
        assert_eq!(typical[0].class, a);
        assert!((typical[0].weight - 70.0 / 96.0).abs() < 1e-12);
        assert!((typical[1].weight - 26.0 / 96.0).abs() < 1e-12);
        // Equal counts: the larger class comes first.
        let typical = typical_pods(&[a.clone(), b.clone()], TYPICAL_COVERAGE);
        assert_eq!(typical_pods(&pods, 1.0).len(), 3);
        assert_eq!(typical[0].class, b);
    }
}
