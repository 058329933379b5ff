//! What the fuzz targets share: a small cluster (the extender tests' two racks of H100 hosts and
//! two L40S hosts) and a fresh reservation book over it for each input, so that an input's
//! outcome does not depend on the inputs before it.

use std::sync::OnceLock;

use topoplace_engine::topology::Cluster;
use topoplace_online::reservation::{Book, BookConfig, BookError, PodDemand};
use topoplace_server::extender::wire::ExtenderArgs;

/// The cluster file of `tests/extender.rs`.
pub const CLUSTER_YAML: &str = include_str!("../../testdata/extender/cluster.yaml");

/// The cluster of [`CLUSTER_YAML`], built once.
pub fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        topoplace_formats::files::cluster::load("testdata/extender/cluster.yaml", CLUSTER_YAML)
            .unwrap_or_else(|error| panic!("the fuzz cluster is invalid: {error}"))
    })
}

/// A new book over [`cluster`].
pub fn book() -> Book {
    Book::new(cluster().clone(), BookConfig::default())
}

/// The value of a book call, `None` for the errors an input may rightly cause; a ledger error
/// (the book found its ledger disagreeing with it) panics: an invariant broke.
pub fn settle<T>(result: Result<T, BookError>) -> Option<T> {
    match result {
        Ok(value) => Some(value),
        Err(error @ BookError::Ledger { .. }) => panic!("the book's ledger refused a change: {error}"),
        Err(_) => None,
    }
}

/// Panics (a finding) when the book's invariants do not hold after an input.
pub fn check(book: &Book) {
    if let Err(error) = book.check() {
        panic!("book invariants broken: {error}");
    }
}

/// A filter or prioritize body as the extender reads it: the pod's demand and the offered node
/// names (`NodeNames`, or a full `NodeList`'s names); `None` where the extender answers 4xx or
/// the pod's error.
pub fn filter_body(data: &[u8]) -> Option<(PodDemand, Vec<String>)> {
    let args = serde_json::from_slice::<ExtenderArgs>(data).ok()?;
    let names = match (&args.nodes, &args.node_names) {
        (Some(list), _) => list.names().ok()?,
        (None, Some(names)) => names.clone(),
        (None, None) => return None,
    };
    let demand = topoplace_server::pod::demand_sized(&args.pod, None).ok()?;
    Some((demand, names))
}
