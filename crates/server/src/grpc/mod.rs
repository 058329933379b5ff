//! The gRPC placement API (`topoplace.v1.Placement`, `proto/topoplace/v1/placement.proto`):
//! Plan, Release, Explain, Capacity, ClusterState and WatchCapacity, with the standard
//! health service and server reflection, optionally over TLS or mutual TLS.
//!
//! A thin adapter: it translates messages into the reservation book's terms and calls it
//! through the [`ServerState`] that owns the book, so the extender and this API share one
//! cluster view and one ledger. Requests are checked here for what needs no cluster (zero
//! GPUs, unknown product, bad TTL) and in the book for the rest; both answer
//! `INVALID_ARGUMENT` with a message naming the gang and field.
//!
//! Who may reserve: with a tokens file, Plan without `dry_run` and Release need
//! `authorization: Bearer TOKEN` metadata naming a listed token (the token's name becomes the
//! reservation's owner, and only that token may release it); reads stay open. Mutual TLS (`--grpc-client-ca`) restricts every call
//! to clients with a certificate from that CA.

pub mod convert;

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::sync::{mpsc, watch};
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

use crate::state::{BookWorkError, ServerState};
use convert::{
    capacity_response, explain_replica_response, explain_response, gang_requests, has_roles, plan_response,
    replica_capacity_response, replica_plan_response, replica_requests, solver_choice, state_response,
};
use topoplace_online::reservation::{Book, Expired, PlanOptions, RequestError};

/// The generated messages, client and server of `topoplace.v1`.
pub mod pb {
    tonic::include_proto!("topoplace.v1");

    /// The encoded descriptors of `placement.proto`, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/topoplace_v1_descriptor.bin"));
}

use pb::placement_server::{Placement, PlacementServer};

/// How long a Plan reservation holds when the request does not say.
pub const RESERVATION_TTL_S_DEFAULT: u32 = 300;
/// The longest reservation a request may ask for.
pub const RESERVATION_TTL_S_MAX: u32 = 86_400;
/// Gangs one request may name, counting every replica as a gang; more is
/// `INVALID_ARGUMENT`. A Plan is all or nothing over them, on the book's worker thread, so
/// this bounds how long one request holds the book.
pub const REQUEST_GANGS_MAX: usize = 1_024;

/// The most replicas with roles one Plan may name (replicas counted): each is a search of up
/// to [`topoplace_engine::placement::replica::REPLICA_SEARCH_STEPS_MAX`] planner calls on the
/// book's one worker, which the extender's verbs queue behind, and a dry run needs no token.
/// With `exact` or `auto`, the exact solver's time over the request is bounded too
/// ([`topoplace_online::reservation::REQUEST_EXACT_TIME_MAX`]).
pub const REQUEST_REPLICAS_WITH_ROLES_MAX: usize = 64;
/// WatchCapacity's update spacing when the request does not say.
const WATCH_INTERVAL_MS_DEFAULT: u32 = 500;
/// Updates buffered per watcher before the server waits for the client to read.
const WATCH_BUFFER: usize = 4;

/// The tokens allowed to reserve: one `TOKEN [NAME]` per line, `#` comments.
#[derive(Clone)]
pub struct ReserveTokens {
    tokens: Vec<(String, String)>,
}

impl std::fmt::Debug for ReserveTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secrets themselves.
        f.debug_struct("ReserveTokens").field("names", &self.tokens.iter().map(|t| &t.1).collect::<Vec<_>>()).finish()
    }
}

impl ReserveTokens {
    pub fn parse(text: &str, source: &str) -> Result<Self, String> {
        let mut tokens = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.split_whitespace();
            let token = words.next().unwrap_or_default().to_string();
            let name = words.next().map(str::to_string).unwrap_or_else(|| format!("token-{}", index + 1));
            if words.next().is_some() {
                return Err(format!("{source}:{}: expected `TOKEN [NAME]`, found more words", index + 1));
            }
            if token.len() < 16 {
                return Err(format!("{source}:{}: a token must have at least 16 characters", index + 1));
            }
            tokens.push((token, name));
        }
        if tokens.is_empty() {
            return Err(format!("{source}: no tokens (one `TOKEN [NAME]` per line)"));
        }
        Ok(ReserveTokens { tokens })
    }

    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// The name of the token the metadata carries, if it is listed.
    fn owner(&self, metadata: &tonic::metadata::MetadataMap) -> Result<String, Status> {
        let Some(value) = metadata.get("authorization") else {
            return Err(Status::unauthenticated(
                "reserving needs `authorization: Bearer TOKEN` metadata (this server restricts who may reserve)",
            ));
        };
        let presented = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("authorization metadata must be `Bearer TOKEN`"))?;
        // Compare against every token without stopping early, so timing says nothing.
        let mut found = None;
        for (token, name) in &self.tokens {
            if constant_time_eq(token.as_bytes(), presented.as_bytes()) {
                found = Some(name.clone());
            }
        }
        found.ok_or_else(|| Status::permission_denied("the token is not allowed to reserve"))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Debug, Clone)]
pub struct GrpcConfig {
    pub default_ttl_s: u32,
    /// `None`: anyone who can connect may reserve.
    pub reserve_tokens: Option<ReserveTokens>,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        GrpcConfig { default_ttl_s: RESERVATION_TTL_S_DEFAULT, reserve_tokens: None }
    }
}

/// PEM files for TLS; with `client_ca`, clients must present a certificate it signed.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub client_ca: Option<std::path::PathBuf>,
}

impl TlsFiles {
    pub fn server_config(&self) -> Result<ServerTlsConfig, String> {
        let read = |path: &Path| std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()));
        let identity = Identity::from_pem(read(&self.cert)?, read(&self.key)?);
        let mut config = ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.client_ca {
            config = config.client_ca_root(Certificate::from_pem(read(ca)?));
        }
        Ok(config)
    }
}

/// The `topoplace.v1.Placement` service over a shared book.
#[derive(Clone)]
pub struct PlacementService {
    ext: Arc<ServerState>,
    config: GrpcConfig,
    /// Turns true when the server shuts down, ending open WatchCapacity streams.
    closing: watch::Receiver<bool>,
}

fn request_error(error: RequestError) -> Status {
    match error {
        RequestError::Invalid(message) => Status::invalid_argument(message),
        error @ RequestError::AlreadyReserved { .. } => Status::already_exists(error.to_string()),
        error @ RequestError::UnknownReservation { .. } => Status::not_found(error.to_string()),
        error @ RequestError::Binding { .. } => Status::failed_precondition(error.to_string()),
        error @ RequestError::NotOwner { .. } => Status::permission_denied(error.to_string()),
    }
}

fn not_ready() -> Status {
    Status::unavailable("the cluster view is not synced yet; retry shortly")
}

impl PlacementService {
    pub fn new(ext: Arc<ServerState>, config: GrpcConfig, closing: watch::Receiver<bool>) -> Self {
        PlacementService { ext, config, closing }
    }

    /// Runs `work` on the book's worker thread, off the async workers (an exact solve may
    /// take its time limit); a full queue is `RESOURCE_EXHAUSTED`.
    async fn on_book<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Book, u64) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        self.on_book_dropping(move |book, now| (work(book, now), Vec::new())).await
    }

    /// [`PlacementService::on_book`] for work that drops reservations: binds held on them are
    /// answered.
    async fn on_book_dropping<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Book, u64) -> (Result<T, Status>, Vec<Expired>) + Send + 'static,
    ) -> Result<T, Status> {
        self.ext
            .on_book_api(move |state| {
                let now = state.now_ms();
                state.with_book(|book| match book {
                    Some(book) => work(book, now),
                    None => (Err(not_ready()), Vec::new()),
                })
            })
            .await
            .map_err(|busy| match busy {
                BookWorkError::Full => Status::resource_exhausted(busy.to_string()),
                BookWorkError::Stopped => Status::unavailable(busy.to_string()),
                BookWorkError::Failed => Status::internal(busy.to_string()),
            })?
    }

    fn owner_of<T>(&self, request: &Request<T>) -> Result<String, Status> {
        match &self.config.reserve_tokens {
            Some(tokens) => tokens.owner(request.metadata()),
            None => Ok(request.remote_addr().map_or_else(|| "anonymous".to_string(), |a| format!("client {a}"))),
        }
    }
}

type CapacityStream = Pin<Box<dyn Stream<Item = Result<pb::CapacityResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Placement for PlacementService {
    async fn plan(&self, request: Request<pb::PlanRequest>) -> Result<Response<pb::PlanResponse>, Status> {
        let owner = if request.get_ref().dry_run { String::new() } else { self.owner_of(&request)? };
        let body = request.into_inner();
        let ttl_s = match body.ttl_seconds {
            0 => self.config.default_ttl_s,
            ttl if ttl > RESERVATION_TTL_S_MAX => {
                return Err(Status::invalid_argument(format!(
                    "ttl_seconds is {ttl}, above the limit of {RESERVATION_TTL_S_MAX}"
                )))
            }
            ttl => ttl,
        };
        let solver = solver_choice(body.solver)?;
        let options = PlanOptions {
            dry_run: body.dry_run,
            ttl_ms: u64::from(ttl_s) * 1000,
            solver,
            allow_partial: body.allow_partial,
            owner,
            explain: body.explain,
        };
        if has_roles(&body.gangs) {
            let requests = replica_requests(&body.gangs)?;
            let response = self
                .on_book(move |book, now| {
                    let outcome = book.plan_replicas(&requests, &options, now).map_err(request_error)?;
                    Ok(replica_plan_response(book.cluster(), &outcome, now))
                })
                .await?;
            if !response.reservation_id.is_empty() {
                tracing::info!(reservation = %response.reservation_id, replicas = response.replicas.len(), "reserved through the API");
            }
            return Ok(Response::new(response));
        }
        let requests = gang_requests(&body.gangs)?;
        let response = self
            .on_book(move |book, now| {
                let outcome = book.plan_gangs(&requests, &options, now).map_err(request_error)?;
                Ok(plan_response(book.cluster(), &outcome, now))
            })
            .await?;
        if !response.reservation_id.is_empty() {
            tracing::info!(reservation = %response.reservation_id, gangs = response.placements.len(), "reserved through the API");
        }
        Ok(Response::new(response))
    }

    async fn release(&self, request: Request<pb::ReleaseRequest>) -> Result<Response<pb::ReleaseResponse>, Status> {
        // With tokens, a reservation is released by the token that made it.
        let by = match self.config.reserve_tokens {
            Some(_) => Some(self.owner_of(&request)?),
            None => None,
        };
        let id = request.into_inner().reservation_id;
        if id.is_empty() {
            return Err(Status::invalid_argument("reservation_id is required"));
        }
        let released = self
            .on_book_dropping(move |book, _| match book.release_reservation(&id, by.as_deref()) {
                Ok(released) => {
                    let dropped = released.dropped.clone();
                    (Ok(released), dropped)
                }
                Err(error) => (Err(request_error(error)), Vec::new()),
            })
            .await?;
        Ok(Response::new(pb::ReleaseResponse { gangs: released.gangs, gpus_released: released.gpus }))
    }

    async fn explain(&self, request: Request<pb::ExplainRequest>) -> Result<Response<pb::ExplainResponse>, Status> {
        let body = request.into_inner();
        let gang = body.gang.ok_or_else(|| Status::invalid_argument("gang is required"))?;
        let nodes = body.nodes;
        if has_roles(std::slice::from_ref(&gang)) {
            let mut requests = replica_requests(std::slice::from_ref(&gang))?;
            if requests.len() != 1 {
                return Err(Status::invalid_argument("Explain takes one replica: leave gang.replicas at 0 or 1"));
            }
            let request = requests.remove(0);
            let response = self
                .on_book(move |book, _| {
                    let explained = book.explain_replica(&request, &nodes).map_err(request_error)?;
                    Ok(explain_replica_response(book.cluster(), explained))
                })
                .await?;
            return Ok(Response::new(response));
        }
        let mut requests = gang_requests(std::slice::from_ref(&gang))?;
        if requests.len() != 1 {
            return Err(Status::invalid_argument("Explain takes one replica: leave gang.replicas at 0 or 1"));
        }
        let request = requests.remove(0);
        let response = self
            .on_book(move |book, _| {
                let explained = book.explain(&request, &nodes).map_err(request_error)?;
                Ok(explain_response(book.cluster(), explained))
            })
            .await?;
        Ok(Response::new(response))
    }

    async fn capacity(&self, request: Request<pb::CapacityRequest>) -> Result<Response<pb::CapacityResponse>, Status> {
        let body = request.into_inner();
        let response = self.capacity_now(body).await?;
        Ok(Response::new(response))
    }

    async fn cluster_state(
        &self,
        request: Request<pb::ClusterStateRequest>,
    ) -> Result<Response<pb::ClusterStateResponse>, Status> {
        let with_hosts = !request.into_inner().summary_only;
        let response = self.on_book(move |book, now| Ok(state_response(&book.cluster_state(now, with_hosts)))).await?;
        Ok(Response::new(response))
    }

    type WatchCapacityStream = CapacityStream;

    async fn watch_capacity(
        &self,
        request: Request<pb::WatchCapacityRequest>,
    ) -> Result<Response<Self::WatchCapacityStream>, Status> {
        let body = request.into_inner();
        let capacity = body.capacity.ok_or_else(|| Status::invalid_argument("capacity is required"))?;
        let interval = Duration::from_millis(u64::from(match body.min_interval_ms {
            0 => WATCH_INTERVAL_MS_DEFAULT,
            ms => ms,
        }));
        // The first answer checks the request, so a bad one fails the call itself.
        let first = self.capacity_now(capacity.clone()).await?;
        let (sender, receiver) = mpsc::channel(WATCH_BUFFER);
        let service = self.clone();
        tokio::spawn(async move {
            let mut changes = service.ext.subscribe();
            let mut closing = service.closing.clone();
            let mut last = first.clone();
            if sender.send(Ok(first)).await.is_err() {
                return;
            }
            loop {
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() { return },
                    _ = closing.wait_for(|closing| *closing) => return,
                    _ = sender.closed() => return,
                }
                tokio::time::sleep(interval).await;
                changes.mark_unchanged();
                let next = match service.capacity_now(capacity.clone()).await {
                    Ok(next) => next,
                    Err(status) => {
                        let _ = sender.send(Err(status)).await;
                        return;
                    }
                };
                let unchanged = pb::CapacityResponse { generation: last.generation, ..next.clone() } == last;
                if unchanged {
                    continue;
                }
                last = next.clone();
                if sender.send(Ok(next)).await.is_err() {
                    return;
                }
            }
        });
        let stream = futures::stream::unfold(receiver, |mut receiver| async move {
            receiver.recv().await.map(|item| (item, receiver))
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

impl PlacementService {
    async fn capacity_now(&self, body: pb::CapacityRequest) -> Result<pb::CapacityResponse, Status> {
        let shape = body.shape.ok_or_else(|| Status::invalid_argument("shape is required"))?;
        let shape = pb::Gang {
            name: if shape.name.is_empty() { "capacity".into() } else { shape.name.clone() },
            replicas: 1,
            ..shape
        };
        let by_level = (!body.by_level.is_empty()).then_some(body.by_level);
        if has_roles(std::slice::from_ref(&shape)) {
            let request = replica_requests(std::slice::from_ref(&shape))?.remove(0);
            return self
                .on_book(move |book, _| {
                    let report = book.replica_capacity(&request, by_level.as_deref()).map_err(request_error)?;
                    Ok(replica_capacity_response(book.cluster(), &report, book.generation()))
                })
                .await;
        }
        let request = gang_requests(std::slice::from_ref(&shape))?.remove(0);
        self.on_book(move |book, _| {
            let report = book.capacity(&request, by_level.as_deref()).map_err(request_error)?;
            Ok(capacity_response(book.cluster(), &report, book.generation()))
        })
        .await
    }
}

/// Serves the placement API, health and reflection on `listener` until `shutdown` resolves;
/// open WatchCapacity streams end then, and calls in flight finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    ext: Arc<ServerState>,
    config: GrpcConfig,
    tls: Option<ServerTlsConfig>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let (closing_sender, closing) = watch::channel(false);
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_not_serving::<PlacementServer<PlacementService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| format!("building the reflection service: {e}"))?;
    let ready_ext = ext.clone();
    let ready_health = health.clone();
    let readiness = tokio::spawn(async move {
        // The service is SERVING once the cluster view exists (at once for a static file).
        ready_ext.book_installed().await;
        ready_health.set_serving::<PlacementServer<PlacementService>>().await;
    });
    let service = PlacementService::new(ext, config, closing);
    let mut builder = Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).map_err(|e| format!("TLS configuration: {e}"))?;
    }
    // Replies of a few kilobytes would otherwise wait out the peer's delayed ACK (40 ms).
    let incoming = futures::StreamExt::map(tokio_stream::wrappers::TcpListenerStream::new(listener), |accepted| {
        accepted.and_then(|stream| stream.set_nodelay(true).map(|()| stream))
    });
    let result = builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(PlacementServer::new(service))
        .serve_with_incoming_shutdown(incoming, async move {
            shutdown.await;
            health.set_not_serving::<PlacementServer<PlacementService>>().await;
            let _ = closing_sender.send(true);
        })
        .await
        .map_err(|e| format!("serving gRPC: {e}"));
    readiness.abort();
    result
}
