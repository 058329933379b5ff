//! `topoplace serve`: the kube-scheduler extender over HTTP and the gRPC placement API on its
//! own port, both over one reservation book. With `--cluster FILE` it runs on a static
//! cluster file and records binds in memory (no Kubernetes needed); otherwise it watches
//! nodes and pods through a kubeconfig or the in-cluster configuration and binds through the
//! API server. Stops gracefully on SIGTERM or Ctrl-C: both servers stop taking connections
//! and finish what is in flight.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

use super::CliError;
use topoplace_online::reservation::{BookConfig, BIND_HOLD_MS_DEFAULT, RESERVATION_TTL_MS_DEFAULT};
use topoplace_server::assemble::{Listeners, SchedulerSetup, Server, ServerSetup, Source};
use topoplace_server::extender::{self, ExtenderConfig};
use topoplace_server::grpc::{self, GrpcConfig, ReserveTokens, TlsFiles};
use topoplace_server::kube as kube_adapter;

/// The most seconds `--reservation-ttl` and `--bind-hold` accept (one day).
pub const SERVE_SECONDS_MAX: u64 = 86_400;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address the extender listens on.
    #[arg(long, default_value = "0.0.0.0:8888")]
    pub listen: SocketAddr,
    /// Path prefix of the verbs (the path part of the extender's `urlPrefix`).
    #[arg(long, default_value = "")]
    pub prefix: String,
    /// Serve the extender over HTTPS with this PEM certificate (chain, leaf first): the one
    /// kube-scheduler's `tlsConfig.caFile` trusts. Needs --tls-key and --client-ca.
    #[arg(long, requires_all = ["tls_key", "client_ca"], conflicts_with = "insecure_http")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA that signs the client certificates allowed to call the verbs and read `/state`
    /// and `/metrics` (kube-scheduler's `tlsConfig.certFile`); a certificate it did not sign
    /// is refused at the handshake, a connection without one reaches only `/healthz` and
    /// `/readyz`.
    #[arg(long, requires = "tls_cert")]
    pub client_ca: Option<PathBuf>,
    /// Names (a subject common name or DNS subject alternative name) of the client
    /// certificates that may call the verbs, comma-separated: kube-scheduler's. Any other
    /// certificate of --client-ca reads only `/state` and `/metrics` (a Prometheus
    /// scraper's). Without it, every certificate of --client-ca may call the verbs.
    #[arg(long, value_delimiter = ',', requires = "client_ca")]
    pub verb_clients: Option<Vec<String>>,
    /// Serve the extender over plain HTTP with no authentication: anyone who reaches the port
    /// may call every verb and read `/state` and `/metrics`. For loopback tests and trusted
    /// networks only; without it, `serve` needs --tls-cert, --tls-key and --client-ca.
    #[arg(long)]
    pub insecure_http: bool,
    /// A cluster file to serve instead of a Kubernetes cluster (binds are kept in memory).
    #[arg(long, conflicts_with = "kubeconfig")]
    pub cluster: Option<PathBuf>,
    /// Kubeconfig to use (default: $KUBECONFIG or ~/.kube/config, then the in-cluster
    /// configuration, as kube-rs infers it).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Seconds a planned gang keeps its GPUs after its last sign of life (planned, a member
    /// filtered, a held bind answered) while no member's bind is held.
    #[arg(long, default_value_t = RESERVATION_TTL_MS_DEFAULT / 1000)]
    pub reservation_ttl: u64,
    /// Seconds a gang member's bind is held waiting for the rest of its gang. With the
    /// Bindings' own 15 s it must fit in kube-scheduler's `httpTimeout` for the extender
    /// (shipped: 60 s), or kube-scheduler hangs up on held binds first.
    #[arg(long, default_value_t = BIND_HOLD_MS_DEFAULT / 1000)]
    pub bind_hold: u64,
    /// Node label keys of the topology levels, outermost first.
    #[arg(long, value_delimiter = ',', default_values_t = kube_adapter::node::DEFAULT_LEVEL_KEYS.map(String::from))]
    pub levels: Vec<String>,
    /// Ceiling of a request body, bytes: a body may have 2 MiB plus 64 KiB per node in the
    /// view, at most this (a preempt body, whose victims may be whole pods, this); a larger
    /// one is refused with 413.
    #[arg(long, default_value_t = extender::BODY_BYTES_MAX_DEFAULT)]
    pub body_limit: usize,
    /// Filter, prioritize and preempt calls the extender works on at once, each; one more is
    /// answered 429.
    #[arg(long, default_value_t = extender::IN_FLIGHT_LIMITS_DEFAULT.verbs)]
    pub in_flight_limit: usize,
    /// Bind calls in flight at once (a gang member's bind is held until its gang is whole);
    /// one more is answered 429.
    #[arg(long, default_value_t = extender::IN_FLIGHT_LIMITS_DEFAULT.bind)]
    pub bind_in_flight_limit: usize,
    /// GPUs the reservations of one namespace's pods may hold for members not bound yet; a
    /// filter that would pass it holds nothing and is answered 429.
    #[arg(long, default_value_t = topoplace_online::reservation::NAMESPACE_UNBOUND_GPUS_MAX_DEFAULT)]
    pub namespace_unbound_gpus: u32,
    /// Address the gRPC placement API listens on.
    #[arg(long, default_value = "0.0.0.0:9090")]
    pub grpc_listen: SocketAddr,
    /// Do not serve the gRPC placement API.
    #[arg(long)]
    pub no_grpc: bool,
    /// `spec.schedulerName`s of the kube-scheduler profiles that call this extender: a bind
    /// for a pod of any other scheduler is refused (the API server's pod is read first).
    #[arg(long, value_delimiter = ',', default_values_t = ["default-scheduler".to_string(), "topoplace".to_string()])]
    pub scheduler_names: Vec<String>,
    /// Namespaces whose pods the extender serves (comma-separated): a filter for a pod of any
    /// other holds nothing and answers why, and a bind is refused; every namespace when not
    /// given.
    #[arg(long, value_delimiter = ',')]
    pub namespaces: Option<Vec<String>>,
    /// Seconds a Plan reservation holds when the request does not say.
    #[arg(long, default_value_t = grpc::RESERVATION_TTL_S_DEFAULT)]
    pub grpc_reservation_ttl: u32,
    /// Serve gRPC over TLS with this PEM certificate (chain); needs --grpc-tls-key.
    #[arg(long, requires = "grpc_tls_key")]
    pub grpc_tls_cert: Option<PathBuf>,
    /// PEM private key of --grpc-tls-cert.
    #[arg(long, requires = "grpc_tls_cert")]
    pub grpc_tls_key: Option<PathBuf>,
    /// Mutual TLS: only clients with a certificate signed by this PEM CA may call at all.
    #[arg(long, requires = "grpc_tls_cert")]
    pub grpc_client_ca: Option<PathBuf>,
    /// Only callers presenting one of these tokens (`TOKEN [NAME]` per line) may reserve or
    /// release; dry runs, Explain, Capacity and ClusterState stay open.
    #[arg(long)]
    pub grpc_reserve_tokens: Option<PathBuf>,
    #[command(flatten)]
    pub scheduling: SchedulingArgs,
}

/// The secondary scheduler's options (`topoplace scheduler`, or `serve --scheduler`).
#[derive(Debug, Clone, Args)]
pub struct SchedulingArgs {
    /// Also run the secondary scheduler: place and bind pods whose `spec.schedulerName` is
    /// --scheduler-name.
    #[arg(long)]
    pub scheduler: bool,
    /// The `spec.schedulerName` this scheduler serves.
    #[arg(long, default_value = "topoplace")]
    pub scheduler_name: String,
    /// Seconds a gang may wait for missing members before it is reported incomplete.
    #[arg(long, default_value_t = 120)]
    pub gang_wait_timeout: u64,
    /// Seconds after which a waiting gang is starving: later work of no higher priority may
    /// no longer take the hosts it could use.
    #[arg(long, default_value_t = 60)]
    pub starvation_after: u64,
    /// Longest back-off between attempts, seconds (the first is 1 s, doubling).
    #[arg(long, default_value_t = 10)]
    pub backoff_max: u64,
    /// Run without a Lease (a single replica only).
    #[arg(long)]
    pub no_leader_elect: bool,
    /// The coordination.k8s.io/v1 Lease replicas compete for.
    #[arg(long, default_value = "topoplace-scheduler")]
    pub lease_name: String,
    /// Namespace of the Lease (default: $POD_NAMESPACE, else kube-system).
    #[arg(long)]
    pub lease_namespace: Option<String>,
    /// This replica's identity in the Lease (default: $POD_NAME or the host name, plus a
    /// random suffix).
    #[arg(long)]
    pub identity: Option<String>,
    /// Seconds a Lease holds without renewal before a standby takes over.
    #[arg(long, default_value_t = 15)]
    pub lease_duration: u64,
    /// Seconds the leader keeps trying to renew before it steps down (and exits).
    #[arg(long, default_value_t = 10)]
    pub renew_deadline: u64,
    /// Seconds between election rounds.
    #[arg(long, default_value_t = 2)]
    pub retry_period: u64,
}

impl SchedulingArgs {
    pub fn scheduler_config(&self) -> topoplace_online::scheduler::SchedulerConfig {
        topoplace_online::scheduler::SchedulerConfig {
            gang_wait_timeout_ms: self.gang_wait_timeout.saturating_mul(1000),
            starvation_ms: self.starvation_after.saturating_mul(1000),
            backoff_max_ms: self.backoff_max.max(1).saturating_mul(1000),
            ..topoplace_online::scheduler::SchedulerConfig::default()
        }
    }

    pub fn lease_config(&self) -> Result<Option<kube_adapter::lease::LeaseConfig>, CliError> {
        if self.no_leader_elect {
            return Ok(None);
        }
        if self.retry_period == 0
            || self.renew_deadline <= self.retry_period
            || self.lease_duration <= self.renew_deadline
        {
            return Err(CliError::Input(format!(
                "leader election needs --lease-duration ({}) > --renew-deadline ({}) > --retry-period ({}) > 0",
                self.lease_duration, self.renew_deadline, self.retry_period
            )));
        }
        let identity = match &self.identity {
            Some(identity) => identity.clone(),
            None => {
                let base = std::env::var("POD_NAME")
                    .or_else(|_| std::env::var("HOSTNAME"))
                    .unwrap_or_else(|_| "topoplace".into());
                let nanos =
                    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
                format!("{base}_{:08x}", nanos ^ std::process::id().rotate_left(16))
            }
        };
        Ok(Some(kube_adapter::lease::LeaseConfig {
            namespace: self
                .lease_namespace
                .clone()
                .or_else(|| std::env::var("POD_NAMESPACE").ok())
                .unwrap_or_else(|| "kube-system".into()),
            name: self.lease_name.clone(),
            identity,
            lease_duration: std::time::Duration::from_secs(self.lease_duration),
            renew_deadline: std::time::Duration::from_secs(self.renew_deadline),
            retry_period: std::time::Duration::from_secs(self.retry_period),
        }))
    }
}

pub fn serve(args: &ServeArgs) -> Result<(), CliError> {
    for (flag, seconds) in [("--reservation-ttl", args.reservation_ttl), ("--bind-hold", args.bind_hold)] {
        if seconds == 0 || seconds > SERVE_SECONDS_MAX {
            return Err(CliError::Input(format!(
                "{flag} must be between 1 and {SERVE_SECONDS_MAX} seconds, not {seconds}"
            )));
        }
    }
    for (flag, limit) in [
        ("--in-flight-limit", args.in_flight_limit),
        ("--bind-in-flight-limit", args.bind_in_flight_limit),
        ("--body-limit", args.body_limit),
    ] {
        if limit == 0 {
            return Err(CliError::Input(format!("{flag} must be at least 1")));
        }
    }
    if args.namespace_unbound_gpus == 0 {
        return Err(CliError::Input("--namespace-unbound-gpus must be at least 1".into()));
    }
    if args.grpc_reservation_ttl == 0 || args.grpc_reservation_ttl > grpc::RESERVATION_TTL_S_MAX {
        return Err(CliError::Input(format!(
            "--grpc-reservation-ttl must be between 1 and {} seconds",
            grpc::RESERVATION_TTL_S_MAX
        )));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Failed(format!("starting the async runtime: {e}")))?;
    runtime.block_on(serve_async(args))
}

async fn serve_async(args: &ServeArgs) -> Result<(), CliError> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    let book_config = BookConfig {
        reservation_ttl_ms: args.reservation_ttl * 1000,
        bind_hold_ms: args.bind_hold * 1000,
        namespace_unbound_gpus_max: args.namespace_unbound_gpus,
        ..BookConfig::default()
    };
    let config = ExtenderConfig {
        prefix: args.prefix.clone(),
        body_bytes_max: args.body_limit,
        in_flight: extender::InFlightLimits { verbs: args.in_flight_limit, bind: args.bind_in_flight_limit },
        verb_clients: args
            .verb_clients
            .as_ref()
            .map(|names| names.iter().map(|n| n.trim().to_string()).filter(|n| !n.is_empty()).collect()),
        ..ExtenderConfig::default()
    };
    if config.verb_clients.as_ref().is_some_and(|names| names.is_empty()) {
        return Err(CliError::Input("--verb-clients: give at least one certificate name".into()));
    }
    let grpc_config = GrpcConfig {
        default_ttl_s: args.grpc_reservation_ttl,
        reserve_tokens: match &args.grpc_reserve_tokens {
            Some(path) => {
                Some(ReserveTokens::load(path).map_err(|e| CliError::Input(format!("--grpc-reserve-tokens {e}")))?)
            }
            None => None,
        },
    };
    let grpc_tls = match (&args.grpc_tls_cert, &args.grpc_tls_key) {
        (Some(cert), Some(key)) => Some(
            TlsFiles { cert: cert.clone(), key: key.clone(), client_ca: args.grpc_client_ca.clone() }
                .server_config()
                .map_err(|e| CliError::Input(format!("gRPC TLS: {e}")))?,
        ),
        _ => None,
    };
    let extender_tls = match (&args.tls_cert, &args.tls_key, &args.client_ca) {
        (Some(cert), Some(key), Some(client_ca)) => Some(
            extender::tls::ExtenderTls::load(&extender::tls::ExtenderTlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: client_ca.clone(),
            })
            .map_err(|e| CliError::Input(format!("extender TLS: {e}")))?,
        ),
        _ if args.insecure_http => None,
        _ => {
            return Err(CliError::Input(
                "the extender serves HTTPS with client certificates: give --tls-cert, --tls-key and --client-ca \
                 (scheduler-config/README.md shows how to make them), or --insecure-http for plain HTTP with no \
                 authentication"
                    .into(),
            ))
        }
    };
    if args.scheduling.scheduler && args.cluster.is_some() {
        return Err(CliError::Input("the scheduler binds through Kubernetes: it cannot run with --cluster".into()));
    }
    let http = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| CliError::Input(format!("--listen {}: {e}", args.listen)))?;
    let grpc = if args.no_grpc {
        None
    } else {
        Some(
            tokio::net::TcpListener::bind(args.grpc_listen)
                .await
                .map_err(|e| CliError::Input(format!("--grpc-listen {}: {e}", args.grpc_listen)))?,
        )
    };
    let source = match &args.cluster {
        Some(path) => {
            let cluster = super::load_cluster(&Some(path.clone()))?;
            tracing::info!(hosts = cluster.hosts.len(), file = %path.display(), "serving a static cluster");
            Source::Static(cluster)
        }
        None => {
            let client =
                kube_adapter::client(args.kubeconfig.as_deref()).await.map_err(|e| CliError::Input(e.to_string()))?;
            let scheduler = if args.scheduling.scheduler {
                Some(SchedulerSetup {
                    name: args.scheduling.scheduler_name.clone(),
                    config: args.scheduling.scheduler_config(),
                    lease: args.scheduling.lease_config()?,
                })
            } else {
                None
            };
            Source::Kubernetes { client, level_keys: args.levels.clone(), scheduler }
        }
    };
    let admission = topoplace_server::binder::Admission {
        scheduler_names: args.scheduler_names.iter().map(|n| n.trim().to_string()).filter(|n| !n.is_empty()).collect(),
        namespaces: args
            .namespaces
            .as_ref()
            .map(|names| names.iter().map(|n| n.trim().to_string()).filter(|n| !n.is_empty()).collect()),
    };
    if admission.namespaces.as_ref().is_some_and(|names| names.is_empty()) {
        return Err(CliError::Input(
            "--namespaces: give at least one namespace, or leave the flag out for every namespace".into(),
        ));
    }
    if admission.scheduler_names.is_empty() {
        return Err(CliError::Input("--scheduler-names: give at least one scheduler name".into()));
    }
    let https = extender_tls.is_some();
    let setup =
        ServerSetup { book: book_config, extender: config, grpc: grpc_config, grpc_tls, extender_tls, admission };
    let grpc_tls_on = setup.grpc_tls.is_some();
    let serving_grpc = grpc.is_some();
    let server = Server::start(source, setup, Listeners { http, grpc });
    tracing::info!(listen = %args.listen, prefix = %args.prefix, https, "extender listening");
    if serving_grpc {
        tracing::info!(listen = %args.grpc_listen, tls = grpc_tls_on, "gRPC placement API listening");
    }
    // One signal (or a lost leadership) stops everything.
    let stop = server.stopper();
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop.send(true);
    });
    server.wait().await.map_err(|e| CliError::Failed(e.to_string()))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down: no new connections, requests in flight finish");
}
