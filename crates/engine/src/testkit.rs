//! Builders for tests of this crate and of the crates above it (feature `testkit`), so a
//! test states its cluster in one line instead of spelling out every field.

use crate::topology::{product, NodeSpec};

/// A node of `count` GPUs of `product` (a GFD product name or alias) with `labels`, no
/// overrides and nothing allocated. Panics on an unknown product: tests only.
pub fn node(name: &str, product: &str, count: u8, labels: &[(&str, &str)]) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        product: product::lookup(product).expect("known product"),
        gpu_count: count,
        memory_mib: None,
        nvlink: None,
        clique: None,
        allocated: Vec::new(),
        mig_profile: None,
        sharing: None,
        pool: Default::default(),
    }
}
