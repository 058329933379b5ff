//! The process's shared state, one per server: the reservation book and what must change
//! under the same lock (the extender's held binds and remembered pod demands), the watches
//! that publish its generation, readiness and next deadline, the clock, the [`Binder`], the
//! metrics, and the book's worker thread. The extender's HTTP verbs, the gRPC API, the
//! Kubernetes view and the secondary scheduler all act on the book through it.
//!
//! Concurrency: one `std::sync::Mutex` around the book. Work that plans (filter, prioritize,
//! preempt, bind, the gRPC API's plans and capacities, the scheduler's cycle) runs on one
//! dedicated thread fed by a bounded queue ([`ServerState::on_book`]), never on an async
//! worker, and a request finding the queue full is refused at once ([`BookWorkError`]).
//! Cheap bookkeeping (watch events, settling Bindings, expiry, `/state`, `/metrics`) takes
//! the lock where it is, and so may wait behind a long solve. No `.await` happens while the
//! lock is held.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::binder::Binder;
use crate::extender::metrics::Metrics;
use topoplace_online::reservation::{Book, Expired, PodDemand};

/// Requests that may wait for the book's worker at once (a queue of closures); one more is
/// refused with [`BookWorkError::Full`] (HTTP 503, gRPC `RESOURCE_EXHAUSTED`). kube-scheduler
/// calls the extender for one pod at a time per profile, so a full queue means many clients
/// or a book stalled on long solves.
pub const BOOK_QUEUE_MAX: usize = 256;

/// The jobs the gRPC API may have queued or running on the book at once (half the queue):
/// callers without a token (capacity, state, watches) cannot crowd kube-scheduler's verbs out.
/// One more is refused with [`BookWorkError::Full`].
pub const API_QUEUE_SHARE: usize = BOOK_QUEUE_MAX / 2;

/// Why [`ServerState::on_book`] gave no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BookWorkError {
    /// [`BOOK_QUEUE_MAX`] jobs are queued: refused at once, nothing was done.
    #[error("the reservation book has {BOOK_QUEUE_MAX} requests queued already; retry shortly")]
    Full,
    /// The worker thread is gone (it could not be started): nothing was done.
    #[error("the reservation book's worker is not running")]
    Stopped,
    /// The work panicked (a bug; logged): what it changed before is checked by `Book::check`.
    #[error("the reservation book's worker failed on this request (a bug; see the log)")]
    Failed,
}

pub(crate) type BindWaiter = oneshot::Sender<Result<(), String>>;

/// A unit of work for the book's thread.
type Job = Box<dyn FnOnce(&ServerState) + Send>;

/// The lock on [`Shared`]; on release it publishes the book's generation if it moved, and
/// whether a book exists if that changed.
pub(crate) struct SharedGuard<'a> {
    guard: MutexGuard<'a, Shared>,
    generation: &'a tokio::sync::watch::Sender<u64>,
    present: &'a tokio::sync::watch::Sender<bool>,
    expiry: &'a tokio::sync::watch::Sender<Option<u64>>,
    hosts: &'a AtomicUsize,
}

impl std::ops::Deref for SharedGuard<'_> {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.guard
    }
}

impl std::ops::DerefMut for SharedGuard<'_> {
    fn deref_mut(&mut self) -> &mut Shared {
        &mut self.guard
    }
}

impl Drop for SharedGuard<'_> {
    fn drop(&mut self) {
        if let Some(book) = &self.guard.book {
            let now = book.generation();
            self.generation.send_if_modified(|seen| std::mem::replace(seen, now) != now);
            let next = book.next_expiry_ms();
            self.expiry.send_if_modified(|seen| std::mem::replace(seen, next) != next);
            self.hosts.store(book.cluster().hosts.len(), Ordering::Relaxed);
        }
        let present = self.guard.book.is_some();
        self.present.send_if_modified(|seen| std::mem::replace(seen, present) != present);
    }
}

pub(crate) struct Shared {
    /// `None` until the first cluster view exists (kube mode before nodes synced).
    pub(crate) book: Option<Book>,
    /// Binds held for their gang, by gang key: (pod uid, the held call's answer).
    pub(crate) waiters: HashMap<String, Vec<(String, BindWaiter)>>,
    /// What each pod filtered asked for, by uid, until its bind (the bind verb carries only
    /// names); at most [`crate::extender::DEMANDS_REMEMBERED_MAX`], oldest first out.
    pub(crate) demands: HashMap<String, PodDemand>,
    pub(crate) demand_order: VecDeque<String>,
}

/// The process's shared state; shared by every request and task through an `Arc`.
pub struct ServerState {
    shared: Mutex<Shared>,
    /// The book's generation after the last lock section: capacity watchers wait on it.
    generation: tokio::sync::watch::Sender<u64>,
    /// Whether the book exists (the first cluster view is built): readiness waits on it.
    present: tokio::sync::watch::Sender<bool>,
    /// The next instant the book has expiry work (a held bind's limit, a reservation's
    /// expiry) after the last lock section: the expiry sweeper sleeps until it.
    expiry: tokio::sync::watch::Sender<Option<u64>>,
    pub(crate) binder: Arc<dyn Binder>,
    pub(crate) metrics: Metrics,
    epoch: tokio::time::Instant,
    ready: AtomicBool,
    /// The nodes in the book's cluster view after the last lock section (request body limits
    /// read it without the lock).
    hosts: AtomicUsize,
    /// The book's worker thread's queue.
    queue: SyncSender<Job>,
    /// The gRPC API's share of it ([`API_QUEUE_SHARE`]).
    api_lane: Arc<tokio::sync::Semaphore>,
}

impl ServerState {
    /// The state over `book` (`None` until a cluster view exists), binding through `binder`.
    /// Starts the book's worker thread, which ends when the last `Arc` is dropped.
    pub fn new(book: Option<Book>, binder: Arc<dyn Binder>) -> Arc<Self> {
        let ready = book.is_some();
        let book_hosts = book.as_ref().map_or(0, |book| book.cluster().hosts.len());
        let present = tokio::sync::watch::Sender::new(book.is_some());
        let expiry = tokio::sync::watch::Sender::new(book.as_ref().and_then(Book::next_expiry_ms));
        let (queue, jobs) = sync_channel::<Job>(BOOK_QUEUE_MAX);
        let state = Arc::new(ServerState {
            shared: Mutex::new(Shared {
                book,
                waiters: HashMap::new(),
                demands: HashMap::new(),
                demand_order: VecDeque::new(),
            }),
            generation: tokio::sync::watch::Sender::new(0),
            present,
            expiry,
            binder,
            metrics: Metrics::default(),
            epoch: tokio::time::Instant::now(),
            ready: AtomicBool::new(ready),
            hosts: AtomicUsize::new(book_hosts),
            queue,
            api_lane: Arc::new(tokio::sync::Semaphore::new(API_QUEUE_SHARE)),
        });
        let weak: Weak<ServerState> = Arc::downgrade(&state);
        let worker = std::thread::Builder::new().name("topoplace-book".into()).spawn(move || {
            // Ends when every sender is gone: the state was dropped.
            while let Ok(job) = jobs.recv() {
                let Some(state) = weak.upgrade() else { break };
                // A panic in one job (a bug) must not end the worker: the job's caller sees
                // its reply dropped, and the book's invariants are still checked.
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&state))).is_err() {
                    tracing::error!("a job on the reservation book panicked");
                }
            }
        });
        if let Err(error) = worker {
            // Without a worker every job is refused with `BookWorkError::Stopped`.
            tracing::error!(%error, "starting the reservation book's worker thread failed");
        }
        state
    }

    /// Runs `work` on the book's worker thread, after the work queued before it; the lock is
    /// taken inside `work` ([`ServerState::lock`]). Refused at once when
    /// [`BOOK_QUEUE_MAX`] jobs are queued.
    pub async fn on_book<T: Send + 'static>(
        &self,
        work: impl FnOnce(&ServerState) -> T + Send + 'static,
    ) -> Result<T, BookWorkError> {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move |state| {
            let _ = reply.send(work(state));
        });
        self.queue.try_send(job).map_err(|error| match error {
            TrySendError::Full(_) => BookWorkError::Full,
            TrySendError::Disconnected(_) => BookWorkError::Stopped,
        })?;
        answer.await.map_err(|_| BookWorkError::Failed)
    }

    /// Milliseconds since the state was made: the book's clock.
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis().min(u128::from(u64::MAX)) as u64
    }

    pub(crate) fn lock(&self) -> SharedGuard<'_> {
        // A panic while holding the lock would be a bug in the book; the state it guards is
        // still checked by `Book::check`, so keep serving rather than poisoning every request.
        SharedGuard {
            guard: self.shared.lock().unwrap_or_else(|poisoned| poisoned.into_inner()),
            generation: &self.generation,
            present: &self.present,
            expiry: &self.expiry,
            hosts: &self.hosts,
        }
    }

    /// The nodes in the cluster view (0 before it exists), as of the last lock section.
    pub fn hosts_in_view(&self) -> usize {
        self.hosts.load(Ordering::Relaxed)
    }

    /// The book's generation, updated whenever a lock section changed the cluster view or
    /// the ledger (whoever changed it: the extender, the watches, or the gRPC API).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Runs `work` on the book under the lock (the kube adapter feeds watch events this way).
    /// Reservations it drops (returned as [`Expired`]) have their waiting binds answered.
    pub fn with_book<T>(&self, work: impl FnOnce(&mut Option<Book>) -> (T, Vec<Expired>)) -> T {
        let mut shared = self.lock();
        let (out, dropped) = work(&mut shared.book);
        let waiters = take_waiters(&mut shared, &dropped);
        drop(shared);
        answer_dropped(waiters);
        out
    }

    /// Runs `work` on the book, if there is one, under the lock (watch events that drop no
    /// reservation).
    pub fn update_book(&self, work: impl FnOnce(&mut Book)) {
        if let Some(book) = self.lock().book.as_mut() {
            work(book);
        }
    }

    /// Returns once the cluster view exists (at once for a static cluster): awaited, never
    /// polled.
    pub async fn book_installed(&self) {
        let mut present = self.present.subscribe();
        // The sender lives as long as `self`, so the wait ends only when a book exists.
        let _ = present.wait_for(|present| *present).await;
    }

    /// Releases expired reservations and answers their waiting binds; deletes the pods the
    /// book gave up so that no replica stays half-placed ([`Book::take_undo`]: a
    /// LeaderWorkerSet leader bound ahead of workers that never bound), each with an Event.
    /// Called from the expiry task, on the runtime.
    pub fn sweep(&self) {
        let now = self.now_ms();
        let undo = self.with_book(|book| match book.as_mut() {
            Some(book) => {
                let expired = book.expire(now);
                (book.take_undo(), expired)
            }
            None => (Vec::new(), Vec::new()),
        });
        if undo.is_empty() {
            return;
        }
        let binder = self.binder.clone();
        tokio::spawn(async move {
            tracing::warn!(pods = ?undo, "deleting members bound ahead of their gangs, whose other members did not bind");
            crate::binder::undo(binder.as_ref(), &undo).await;
            let message = "this pod was bound ahead of its gang (LeaderWorkerSet exclusive placement), and the rest \
                           of the gang did not bind within its reservation: the pod is deleted so its controller \
                           recreates the group whole";
            futures::future::join_all(undo.iter().map(|pod| binder.event(pod, "GangBindRolledBack", message.into())))
                .await;
        });
    }

    /// `GET /state`.
    pub fn state_json(&self) -> serde_json::Value {
        let now = self.now_ms();
        let shared = self.lock();
        match &shared.book {
            Some(book) => serde_json::to_value(crate::extender::state_json::StateJson::from(book.snapshot(now)))
                .unwrap_or(serde_json::Value::Null),
            None => serde_json::json!({ "nodes": [], "gangs": [], "ready": false }),
        }
    }

    /// Checks the book's invariants (tests and the debug endpoint).
    pub fn check(&self) -> Result<(), String> {
        match &self.lock().book {
            Some(book) => book.check(),
            None => Ok(()),
        }
    }

    /// [`ServerState::on_book`] for the gRPC API: within its share of the queue
    /// ([`API_QUEUE_SHARE`]), refused at once beyond it.
    pub async fn on_book_api<T: Send + 'static>(
        &self,
        work: impl FnOnce(&ServerState) -> T + Send + 'static,
    ) -> Result<T, BookWorkError> {
        // The permit goes with the job: a caller that gives up (a cancelled call) still
        // counts against the share until its job has run.
        let permit = self.api_lane.clone().try_acquire_owned().map_err(|_| BookWorkError::Full)?;
        self.on_book(move |state| {
            let _permit = permit;
            work(state)
        })
        .await
    }

    /// Sleeps until the book's next deadline (a held bind's limit, a reservation's expiry),
    /// published by every lock section that moves it, and sweeps then: no wake-up while
    /// nothing is waiting, none for requests that change nothing about expiry. It holds the
    /// state, so it runs until its task is aborted; spawn it once per server.
    pub async fn run_expiry(self: Arc<Self>) {
        let mut deadlines = self.expiry.subscribe();
        // A deadline just swept is not waited for again until something is published (the
        // sweep moves it, unless the book disagrees; then only a change wakes the sweeper,
        // and any change, such as a new reservation, re-arms it).
        let mut swept: Option<u64> = None;
        loop {
            let next = *deadlines.borrow_and_update();
            let deadline = next.filter(|&at| Some(at) != swept).map(|at| self.epoch + Duration::from_millis(at));
            let expiry = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = expiry => {
                    swept = next;
                    self.sweep();
                }
                changed = deadlines.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    swept = None;
                }
            }
        }
    }
}

/// The held binds that `ended` answers, each with its answer.
pub(crate) fn take_waiters(shared: &mut Shared, ended: &[Expired]) -> Vec<(BindWaiter, String)> {
    let mut answers = Vec::new();
    for end in ended {
        let gang = end.gang();
        let Some(held) = shared.waiters.get_mut(gang) else { continue };
        let taken: Vec<(String, BindWaiter)> = match end {
            Expired::Reservation { .. } => std::mem::take(held),
            Expired::Hold { pod, .. } => {
                let (mine, rest) = std::mem::take(held).into_iter().partition(|(uid, _)| *uid == pod.uid);
                *held = rest;
                mine
            }
        };
        if held.is_empty() {
            shared.waiters.remove(gang);
        }
        let message = match end {
            Expired::Reservation { .. } => format!(
                "gang `{gang}`: its reservation ended before every member reached bind; its GPUs are released and \
                 the gang will be scheduled again"
            ),
            Expired::Hold { waiting_for, held_ms, .. } => format!(
                "gang `{gang}`: this bind was held {:.0} s and {waiting_for} member(s) have not reached bind; the pod \
                 keeps its place in the gang's plan and binds with the rest when kube-scheduler retries it",
                *held_ms as f64 / 1000.0
            ),
        };
        answers.extend(taken.into_iter().map(|(_, waiter)| (waiter, message.clone())));
    }
    answers
}

pub(crate) fn answer_dropped(answers: Vec<(BindWaiter, String)>) {
    for (waiter, message) in answers {
        let _ = waiter.send(Err(message));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::binder::MemoryBinder;
    use futures::FutureExt;

    fn state() -> Arc<ServerState> {
        ServerState::new(None, Arc::new(MemoryBinder::default()))
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once_and_drains_in_order() {
        let state = state();
        let (entered_tx, entered) = std::sync::mpsc::channel();
        let (gate, gate_rx) = std::sync::mpsc::channel::<()>();
        // The worker runs one job that waits at a gate: everything after it queues.
        let blocker = state.on_book(move |_| {
            let _ = entered_tx.send(());
            let _ = gate_rx.recv();
        });
        assert!(blocker.now_or_never().is_none(), "queued, not answered");
        entered.recv().expect("the worker runs the blocking job");
        let order = Arc::new(Mutex::new(Vec::new()));
        for index in 0..BOOK_QUEUE_MAX {
            let order = order.clone();
            let queued = state.on_book(move |_| order.lock().expect("order").push(index));
            assert!(queued.now_or_never().is_none(), "job {index} is queued");
        }
        let refused = state.on_book(|_| ()).now_or_never();
        assert_eq!(refused, Some(Err(BookWorkError::Full)), "one more than the queue holds is refused at once");
        gate.send(()).expect("open the gate");
        // The queue drains (the worker runs what was queued) and then takes work again.
        for _ in 0..1_000 {
            if order.lock().expect("order").len() == BOOK_QUEUE_MAX {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        state.on_book(|_| ()).await.expect("the queue takes work again");
        let order = order.lock().expect("order").clone();
        assert_eq!(order, (0..BOOK_QUEUE_MAX).collect::<Vec<_>>(), "in the order queued");
    }

    #[tokio::test]
    async fn the_grpc_api_gets_half_the_queue_and_the_extender_the_rest() {
        let state = state();
        let (entered_tx, entered) = std::sync::mpsc::channel();
        let (gate, gate_rx) = std::sync::mpsc::channel::<()>();
        let mut blocker = Box::pin(state.on_book(move |_| {
            let _ = entered_tx.send(());
            let _ = gate_rx.recv();
        }));
        assert!(futures::poll!(&mut blocker).is_pending());
        entered.recv().expect("the worker runs the blocking job");
        let mut api_jobs = Vec::new();
        for _ in 0..API_QUEUE_SHARE {
            let mut job = Box::pin(state.on_book_api(|_| ()));
            assert!(futures::poll!(&mut job).is_pending(), "within the API's share");
            api_jobs.push(job);
        }
        assert_eq!(state.on_book_api(|_| ()).now_or_never(), Some(Err(BookWorkError::Full)), "over its share");
        let mut verb = Box::pin(state.on_book(|_| 1));
        assert!(futures::poll!(&mut verb).is_pending(), "the extender's verbs still find room");
        gate.send(()).expect("open the gate");
        for job in api_jobs {
            job.await.expect("answered");
        }
        assert_eq!(verb.await, Ok(1));
        assert_eq!(state.on_book_api(|_| 2).await, Ok(2), "the share is free again");
    }

    #[tokio::test]
    async fn a_job_that_panics_does_not_stop_the_worker() {
        let state = state();
        let failed = state.on_book(|_| -> u32 { panic!("a bug in one job") }).await;
        assert_eq!(failed, Err(BookWorkError::Failed), "its caller is told");
        assert_eq!(state.on_book(|_| 7).await, Ok(7), "the next job runs");
    }

    #[test]
    fn the_worker_does_not_keep_the_state_alive() {
        let state = state();
        let weak = Arc::downgrade(&state);
        drop(state);
        assert!(weak.upgrade().is_none(), "the worker holds no strong reference");
    }
}
