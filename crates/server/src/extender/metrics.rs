//! Prometheus text exposition for `GET /metrics`: request counts and latency histograms per
//! verb (lock-free counters, so recording never contends with the request path), and gauges
//! read from the reservation book when scraped. Written here rather than pulled in from a
//! metrics crate: a dozen series in the text format need no registry.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use topoplace_online::reservation::Book;

/// Upper bounds of the latency buckets, seconds.
const BUCKETS_S: [f64; 12] = [0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 1.0, 10.0];

/// The extender's verbs, as the metrics label them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Filter,
    Prioritize,
    Preempt,
    Bind,
}

impl Verb {
    pub const ALL: [Verb; 4] = [Verb::Filter, Verb::Prioritize, Verb::Preempt, Verb::Bind];

    /// The verb's path segment and `verb` label.
    pub fn name(self) -> &'static str {
        match self {
            Verb::Filter => "filter",
            Verb::Prioritize => "prioritize",
            Verb::Preempt => "preempt",
            Verb::Bind => "bind",
        }
    }
}

#[derive(Default)]
struct VerbMetrics {
    ok: AtomicU64,
    errors: AtomicU64,
    buckets: [AtomicU64; BUCKETS_S.len()],
    sum_us: AtomicU64,
    count: AtomicU64,
}

#[derive(Default)]
pub struct Metrics {
    /// Indexed by the verb's position in [`Verb::ALL`] (its discriminant).
    verbs: [VerbMetrics; Verb::ALL.len()],
}

impl Metrics {
    /// Records one request of `verb`.
    pub fn record(&self, verb: Verb, elapsed: Duration, ok: bool) {
        let metrics = &self.verbs[verb as usize];
        if ok { &metrics.ok } else { &metrics.errors }.fetch_add(1, Ordering::Relaxed);
        let seconds = elapsed.as_secs_f64();
        for (bound, bucket) in BUCKETS_S.iter().zip(&metrics.buckets) {
            if seconds <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        metrics.sum_us.fetch_add(elapsed.as_micros().min(u128::from(u64::MAX)) as u64, Ordering::Relaxed);
        metrics.count.fetch_add(1, Ordering::Relaxed);
    }

    /// The exposition text; `book` is `None` before the cluster view exists.
    pub fn render(&self, book: Option<&Book>) -> String {
        let mut out = String::new();
        out.push_str("# HELP topoplace_extender_requests_total Extender requests by verb and result.\n");
        out.push_str("# TYPE topoplace_extender_requests_total counter\n");
        for (verb, metrics) in Verb::ALL.iter().map(|v| v.name()).zip(&self.verbs) {
            for (result, counter) in [("ok", &metrics.ok), ("error", &metrics.errors)] {
                let _ = writeln!(
                    out,
                    "topoplace_extender_requests_total{{verb=\"{verb}\",result=\"{result}\"}} {}",
                    counter.load(Ordering::Relaxed)
                );
            }
        }
        out.push_str("# HELP topoplace_extender_request_duration_seconds Extender request latency by verb.\n");
        out.push_str("# TYPE topoplace_extender_request_duration_seconds histogram\n");
        for (verb, metrics) in Verb::ALL.iter().map(|v| v.name()).zip(&self.verbs) {
            for (bound, bucket) in BUCKETS_S.iter().zip(&metrics.buckets) {
                let _ = writeln!(
                    out,
                    "topoplace_extender_request_duration_seconds_bucket{{verb=\"{verb}\",le=\"{bound}\"}} {}",
                    bucket.load(Ordering::Relaxed)
                );
            }
            let count = metrics.count.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "topoplace_extender_request_duration_seconds_bucket{{verb=\"{verb}\",le=\"+Inf\"}} {count}"
            );
            let _ = writeln!(
                out,
                "topoplace_extender_request_duration_seconds_sum{{verb=\"{verb}\"}} {}",
                metrics.sum_us.load(Ordering::Relaxed) as f64 / 1e6
            );
            let _ = writeln!(out, "topoplace_extender_request_duration_seconds_count{{verb=\"{verb}\"}} {count}");
        }
        let Some(book) = book else { return out };
        let stats = book.stats();
        series(
            &mut out,
            "topoplace_gangs_waiting",
            "Gangs reserved whose members have not all reached bind.",
            "gauge",
            book.gangs_waiting() as u64,
        );
        let counters = [
            ("topoplace_gangs_reserved_total", "Gangs planned and reserved.", stats.gangs_reserved),
            ("topoplace_gangs_bound_total", "Gangs with every member bound.", stats.gangs_bound),
            (
                "topoplace_gangs_rolled_back_total",
                "Gangs whose Bindings partly failed and were undone.",
                stats.gangs_rolled_back,
            ),
            (
                "topoplace_gangs_expired_total",
                "Reservations released because members did not reach bind in time.",
                stats.gangs_expired,
            ),
            (
                "topoplace_bind_holds_lapsed_total",
                "Gang members' binds answered unbound after the bind hold while the rest of the gang had not reached bind.",
                stats.bind_holds_lapsed,
            ),
            ("topoplace_pods_bound_total", "Pods bound by topoplace.", stats.pods_bound),
            (
                "topoplace_pods_assumed_total",
                "Assumptions made: a single pod held on the node topoplace chose, from its prioritize (or one-node filter) until its bind.",
                stats.pods_assumed,
            ),
            (
                "topoplace_assumptions_lapsed_total",
                "Assumed single pods whose bind was not seen within the assumption's time.",
                stats.assumptions_lapsed,
            ),
            (
                "topoplace_ledger_faults_total",
                "Ledger changes the book expected to succeed and that failed: a bug (the count is also in /state's stats).",
                stats.ledger_faults,
            ),
            (
                "topoplace_gangs_nominated_total",
                "Gang plans made by preemption, held for the gang as its victims leave.",
                stats.gangs_nominated,
            ),
            (
                "topoplace_nominations_expired_total",
                "Preemption plans given up because their victims had not all left in time.",
                stats.nominations_expired,
            ),
            (
                "topoplace_members_joined_total",
                "Pods that joined a gang already running (a member recreated, or one more).",
                stats.members_joined,
            ),
        ];
        for (name, help, value) in counters {
            series(&mut out, name, help, "counter", value);
        }
        let cluster = book.cluster();
        let mut free_by_class: std::collections::BTreeMap<(String, u64), u64> = std::collections::BTreeMap::new();
        for (index, host) in cluster.hosts.iter().enumerate() {
            let free = u64::from(book.ledger().free(index as u32).count_ones());
            *free_by_class.entry((host.product.get().name.to_string(), host.memory_mib)).or_default() += free;
        }
        out.push_str("# HELP topoplace_gpus_free Free devices (whole GPUs, MIG devices or shared replicas, as the product says) per product and memory class (MiB).\n");
        out.push_str("# TYPE topoplace_gpus_free gauge\n");
        for ((product, memory), free) in free_by_class {
            let _ = writeln!(out, "topoplace_gpus_free{{product=\"{product}\",memory_mib=\"{memory}\"}} {free}");
        }
        out
    }
}

/// One unlabelled series with its HELP and TYPE lines.
fn series(out: &mut String, name: &str, help: &str, kind: &str, value: u64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
}
