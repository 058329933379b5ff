//! One whole server, assembled in one place: the state over a cluster (a static file, or the
//! Kubernetes watches), its expiry sweeper, the extender's HTTP verbs, the gRPC placement API,
//! and the secondary scheduler with its leader election. `topoplace serve`,
//! `topoplace scheduler`, the integration tests and the benchmarks all start it through
//! [`Server::start`], so what they run is what ships.

use std::sync::{Arc, Mutex};

use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::ServerTlsConfig;

use crate::binder::{Binder, MemoryBinder};
use crate::extender::{self, ExtenderConfig};
use crate::grpc::{self, GrpcConfig};
use crate::kube::lease::{LeaderElector, LeaseConfig};
use crate::kube::scheduler::SchedulerRuntime;
use crate::kube::{run_view_with, KubeBinder, ViewHooks};
use crate::pod_group::PodGroups;
use crate::state::ServerState;
use topoplace_engine::topology::Cluster;
use topoplace_online::reservation::{Book, BookConfig};
use topoplace_online::scheduler::SchedulerConfig;

/// How long a graceful stop waits for the leader election to hand its Lease back.
const ELECTOR_STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Where the server's cluster view comes from.
pub enum Source {
    /// `serve --cluster`: a fixed cluster; binds are kept in memory ([`MemoryBinder`]).
    Static(Cluster),
    /// A Kubernetes API server: the view from its node and pod watches, Bindings through it,
    /// and, with `scheduler`, the secondary scheduler.
    Kubernetes {
        client: kube::Client,
        /// Node label keys of the topology levels, outermost first.
        level_keys: Vec<String>,
        scheduler: Option<SchedulerSetup>,
    },
}

/// The secondary scheduler's part of a server.
pub struct SchedulerSetup {
    /// The `spec.schedulerName` it serves.
    pub name: String,
    pub config: SchedulerConfig,
    /// Leader election; `None` leads from the start (a single replica).
    pub lease: Option<LeaseConfig>,
}

/// What every server has, whatever its source.
#[derive(Default)]
pub struct ServerSetup {
    pub book: BookConfig,
    pub extender: ExtenderConfig,
    /// The gRPC placement API's configuration and TLS; served when a gRPC listener is given.
    pub grpc: GrpcConfig,
    pub grpc_tls: Option<ServerTlsConfig>,
    /// The extender over HTTPS with client certificates; plain HTTP when `None`
    /// (`serve --insecure-http`).
    pub extender_tls: Option<extender::tls::ExtenderTls>,
    /// Whose pods the extender binds, on an API server ([`crate::binder::Binder::verify`]).
    pub admission: crate::binder::Admission,
}

/// The sockets a server answers on; bound by the caller, so that a port in use is the
/// caller's error to report and tests can take port 0.
pub struct Listeners {
    /// The extender's verbs, `/healthz`, `/readyz`, `/metrics`, `/state` (HTTPS with
    /// [`ServerSetup::extender_tls`]).
    pub http: TcpListener,
    /// The gRPC placement API; `None` serves none.
    pub grpc: Option<TcpListener>,
}

/// Why a server stopped other than by being asked to.
#[derive(Debug, Error)]
pub enum ServeError {
    #[error("serving the extender: {0}")]
    Http(std::io::Error),
    #[error("serving the gRPC API: {0}")]
    Grpc(String),
    /// The scheduler lost its Lease (as kube-scheduler does, the process stops; the standby
    /// takes over).
    #[error("leader election: {0}")]
    LeadershipLost(String),
    #[error("a server task failed: {0}")]
    Task(String),
}

/// A running server. Dropping it leaves its tasks running; [`Server::stop`],
/// [`Server::wait`] or [`Server::kill`] end them.
pub struct Server {
    state: Arc<ServerState>,
    memory: Option<Arc<MemoryBinder>>,
    scheduler: Option<Arc<SchedulerRuntime>>,
    stop: Arc<watch::Sender<bool>>,
    lost: Arc<Mutex<Option<String>>>,
    serving: JoinHandle<Result<(), ServeError>>,
    background: Vec<JoinHandle<()>>,
    /// The leader election, given time to hand the Lease back on a graceful stop.
    elector: Option<JoinHandle<()>>,
}

impl Server {
    /// Starts every part of the server on the current tokio runtime and returns at once; the
    /// Kubernetes view fills in the background (`/readyz` answers 503 until it has).
    pub fn start(source: Source, setup: ServerSetup, listeners: Listeners) -> Server {
        let (stop, stopped) = watch::channel(false);
        let stop = Arc::new(stop);
        let lost: Arc<Mutex<Option<String>>> = Arc::default();
        let mut background = Vec::new();
        let mut elector = None;
        let (state, memory, scheduler, pod_groups) = match source {
            Source::Static(cluster) => {
                let memory = Arc::new(MemoryBinder::default());
                let binder: Arc<dyn Binder> = memory.clone();
                let state = ServerState::new(Some(Book::new(cluster, setup.book.clone())), binder);
                (state, Some(memory), None, None)
            }
            Source::Kubernetes { client, level_keys, scheduler } => {
                let pod_groups = Arc::new(PodGroups::new(client.clone()));
                let binder: Arc<dyn Binder> =
                    Arc::new(KubeBinder::with_admission(client.clone(), setup.admission.clone(), pod_groups.clone()));
                let state = ServerState::new(None, binder);
                let runtime = scheduler.map(|setup| {
                    let (runtime, tasks, election) =
                        start_scheduler(setup, client.clone(), &state, (&stop, &stopped), &lost);
                    background.extend(tasks);
                    elector = election;
                    runtime
                });
                let hooks = runtime.clone().map(|runtime| runtime as Arc<dyn ViewHooks>);
                let pod_groups = Some(pod_groups);
                background.push(tokio::spawn(run_view_with(
                    client,
                    state.clone(),
                    level_keys,
                    setup.book.clone(),
                    hooks,
                )));
                (state, None, runtime, pod_groups)
            }
        };
        background.push(tokio::spawn(state.clone().run_expiry()));
        let serving = {
            let state = state.clone();
            tokio::spawn(async move {
                // The namespaces whose pods a bind may take effect on are the ones the verbs serve.
                let extender_config =
                    ExtenderConfig { namespaces: setup.admission.namespaces.clone(), ..setup.extender };
                let http = extender::serve(
                    listeners.http,
                    state.clone(),
                    extender_config,
                    pod_groups,
                    setup.extender_tls,
                    stopped_signal(stopped.clone()),
                );
                let http = async { http.await.map_err(ServeError::Http) };
                let grpc = async {
                    match listeners.grpc {
                        Some(listener) => {
                            grpc::serve(listener, state, setup.grpc, setup.grpc_tls, stopped_signal(stopped))
                                .await
                                .map_err(ServeError::Grpc)
                        }
                        None => Ok(()),
                    }
                };
                tokio::try_join!(http, grpc).map(|_| ())
            })
        };
        Server { state, memory, scheduler, stop, lost, serving, background, elector }
    }

    /// The server's state: its book, clock and readiness.
    pub fn state(&self) -> &Arc<ServerState> {
        &self.state
    }

    /// The in-memory binder of a static server.
    pub fn memory_binder(&self) -> Option<&Arc<MemoryBinder>> {
        self.memory.as_ref()
    }

    /// The secondary scheduler, when it runs.
    pub fn scheduler(&self) -> Option<&Arc<SchedulerRuntime>> {
        self.scheduler.as_ref()
    }

    /// Sending `true` stops the server gracefully (what a signal does).
    pub fn stopper(&self) -> Arc<watch::Sender<bool>> {
        self.stop.clone()
    }

    /// Waits until the server stops (asked to, or its leadership lost), then ends its
    /// background tasks.
    pub async fn wait(self) -> Result<(), ServeError> {
        let served = match self.serving.await {
            Ok(served) => served,
            Err(error) => Err(ServeError::Task(error.to_string())),
        };
        // Serving may have ended on its own (an error): everything else stops with it.
        let _ = self.stop.send(true);
        if let Some(mut elector) = self.elector {
            // It sees the stop and hands the Lease back (renew deadline permitting).
            if tokio::time::timeout(ELECTOR_STOP_WAIT, &mut elector).await.is_err() {
                tracing::warn!("the leader election did not end in time");
                elector.abort();
            }
        }
        for task in &self.background {
            task.abort();
        }
        let lost = self.lost.lock().unwrap_or_else(|p| p.into_inner()).take();
        match lost {
            Some(reason) => Err(ServeError::LeadershipLost(reason)),
            None => served,
        }
    }

    /// Stops the server gracefully: no new connections, requests in flight finish.
    pub async fn stop(self) -> Result<(), ServeError> {
        let _ = self.stop.send(true);
        self.wait().await
    }

    /// A crash: the server's own tasks (the listeners, the view, the scheduler, the Lease,
    /// expiry) end at once and nothing is handed back (not even the Lease). Requests already
    /// accepted run on in their connections' tasks until they finish.
    pub fn kill(self) {
        self.serving.abort();
        for task in self.background.iter().chain(&self.elector) {
            task.abort();
        }
    }
}

/// Starts the scheduler runtime and, with a Lease, its leader election: the runtime, its
/// tasks, and the election's task. A lost leadership records why and stops the server.
fn start_scheduler(
    setup: SchedulerSetup,
    client: kube::Client,
    state: &Arc<ServerState>,
    (stop, stopped): (&Arc<watch::Sender<bool>>, &watch::Receiver<bool>),
    lost: &Arc<Mutex<Option<String>>>,
) -> (Arc<SchedulerRuntime>, Vec<JoinHandle<()>>, Option<JoinHandle<()>>) {
    let (leading_tx, leading_rx) = watch::channel(setup.lease.is_none());
    let runtime = SchedulerRuntime::new(state.clone(), client.clone(), setup.config, leading_rx);
    let tasks = vec![tokio::spawn(runtime.clone().run(client.clone(), setup.name.clone()))];
    tracing::info!(scheduler_name = %setup.name, leader_election = setup.lease.is_some(), "secondary scheduler started");
    let election = setup.lease.map(|lease| {
        let elector = LeaderElector::new(client, lease);
        let (stop, stopped, lost) = (stop.clone(), stopped.clone(), lost.clone());
        tokio::spawn(async move {
            if let Err(reason) = elector.run(leading_tx, stopped).await {
                tracing::error!(%reason, "stopping");
                *lost.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
                let _ = stop.send(true);
            }
        })
    });
    (runtime, tasks, election)
}

async fn stopped_signal(mut stopped: watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stop| *stop).await;
}
