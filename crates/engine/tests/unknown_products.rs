//! The bound on products missing from the table, in a process of its own: the registry is
//! process-wide and append-only, so this test must not share it with others.

use topoplace_engine::topology::product::{self, UnknownProductError, UNKNOWN_PRODUCTS_MAX};

#[test]
fn unknown_products_stop_at_their_limit_and_known_ones_never_count() {
    let ids: Vec<_> = (0..UNKNOWN_PRODUCTS_MAX)
        .map(|index| {
            product::register_unknown(&format!("NVIDIA-Limit-Test-{index:02}"), 1024).expect("under the limit")
        })
        .collect();
    assert!(ids.iter().all(|id| id.is_unknown()));
    assert_eq!(
        product::register_unknown("NVIDIA-Limit-Test-Over", 1024),
        Err(UnknownProductError::TooMany { name: "NVIDIA-Limit-Test-Over".into() })
    );
    // Products met before, and the table's, still resolve at the limit.
    assert_eq!(product::register_unknown("nvidia limit test 07", 1), Ok(ids[7]));
    assert!(product::register_unknown("NVIDIA-H100-80GB-HBM3", 1).is_ok_and(|id| !id.is_unknown()));
    assert_eq!(product::lookup("NVIDIA-Limit-Test-Over"), None);
}
