//! The extender over HTTPS with client certificates, as kube-scheduler's extender `tlsConfig`
//! speaks it (`certFile` and `keyFile`: the client certificate kube-scheduler presents;
//! `caFile`: the CA it checks topoplace's certificate against; v1.20
//! `pkg/scheduler/core/extender.go` `makeTransport`, client-go's `TLSConfigFor`).
//!
//! Every connection is asked for a client certificate. One that is presented must chain to
//! `--client-ca`, or rustls ends the handshake. One that is not presented still connects, so
//! that the kubelet's HTTPS probes (which present none) reach `/healthz` and `/readyz`; every
//! other route answers such a connection 403 ([`ClientCert::Absent`], checked by the
//! router's guard in `extender::router`). The verbs, `/state` and `/metrics` are therefore
//! served to authenticated clients only.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

/// Longest a client may take over its TLS handshake before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a client may take to send a request's headers on an open connection (a client
/// that trickles headers holds a connection and a task; hyper closes it after this).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once, handshakes included; past it the server stops accepting until
/// one closes (the kernel's listen backlog holds the rest). kube-scheduler keeps a few
/// connections open per profile; each held gang member's bind may take one of its own.
pub const CONNECTIONS_MAX: usize = 8_192;

/// The PEM files of the extender's TLS (`serve --tls-cert`, `--tls-key`, `--client-ca`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtenderTlsFiles {
    /// The server's certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key of `cert` (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The CA certificates a client's certificate must chain to.
    pub client_ca: PathBuf,
}

/// Why the extender's TLS could not be set up; each names the file or the setting.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Whether a request's connection presented a client certificate (one that does not chain
/// to the client CA never gets this far: its handshake failed). Put in every request's
/// extensions by [`serve`]; a plain-HTTP server puts none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientCert {
    /// A certificate that chains to the client CA, with the names it carries: its subject's
    /// common names and its DNS subject alternative names (`serve --verb-clients` matches
    /// them).
    Verified(Arc<[String]>),
    /// None was presented (the kubelet's probes, or a client that is not allowed).
    Absent,
}

/// The subject common names and DNS subject alternative names of a DER certificate; none
/// when it does not parse (rustls has verified its chain already).
pub fn certificate_names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else { return Vec::new() };
    let mut names: Vec<String> =
        cert.subject().iter_common_name().filter_map(|cn| cn.as_str().ok().map(String::from)).collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                names.push((*dns).to_string());
            }
        }
    }
    names
}

/// A TLS acceptor that asks every client for a certificate and verifies any it is given.
#[derive(Clone)]
pub struct ExtenderTls {
    acceptor: TlsAcceptor,
}

impl std::fmt::Debug for ExtenderTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExtenderTls")
    }
}

fn file_error(path: &str, reason: String) -> TlsError {
    TlsError::File { path: path.to_string(), reason }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::File { path: path.display().to_string(), reason: error.to_string() })
}

impl ExtenderTls {
    /// Reads the three PEM files; errors name the file and what is wrong with it.
    pub fn load(files: &ExtenderTlsFiles) -> Result<Self, TlsError> {
        let (cert, key, ca) = (read(&files.cert)?, read(&files.key)?, read(&files.client_ca)?);
        Self::build(
            certificates(&cert).map_err(|reason| file_error(&files.cert.display().to_string(), reason))?,
            private_key(&key).map_err(|reason| file_error(&files.key.display().to_string(), reason))?,
            roots(&ca).map_err(|reason| file_error(&files.client_ca.display().to_string(), reason))?,
        )
    }

    /// The same from PEM text in memory (tests).
    pub fn from_pem(cert: &[u8], key: &[u8], client_ca: &[u8]) -> Result<Self, TlsError> {
        Self::build(
            certificates(cert).map_err(|reason| file_error("certificate", reason))?,
            private_key(key).map_err(|reason| file_error("key", reason))?,
            roots(client_ca).map_err(|reason| file_error("client CA", reason))?,
        )
    }

    fn build(
        certs: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: RootCertStore,
    ) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .allow_unauthenticated()
            .build()
            .map_err(|error| TlsError::Config(format!("the client CA: {error}")))?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|error| TlsError::Config(error.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .map_err(|error| TlsError::Config(format!("the certificate and key: {error}")))?;
        // The router speaks HTTP/1.1 only (kube-scheduler's client falls back to it).
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(ExtenderTls { acceptor: TlsAcceptor::from(Arc::new(config)) })
    }
}

fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| format!("not PEM certificates: {error}"))?;
    if certs.is_empty() {
        return Err("no CERTIFICATE block".into());
    }
    Ok(certs)
}

fn private_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|error| format!("no private key in PEM form: {error}"))
}

fn roots(pem: &[u8]) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    for cert in certificates(pem)? {
        store.add(cert).map_err(|error| format!("not a usable CA certificate: {error}"))?;
    }
    Ok(store)
}

/// Serves `router` over TLS on `listener` until `shutdown` resolves, then stops taking
/// connections and lets requests in flight finish. Each request carries its connection's
/// [`ClientCert`] in its extensions. A handshake that fails or takes longer than
/// [`HANDSHAKE_TIMEOUT`] drops its connection and is logged; it never stops the server.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: ExtenderTls,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let graceful = GracefulShutdown::new();
    let connections = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let place = tokio::select! {
            place = connections.clone().acquire_owned() => match place {
                Ok(place) => place,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!(%error, "accepting an extender connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let (acceptor, router, watcher) = (tls.acceptor.clone(), router.clone(), graceful.watcher());
        tokio::spawn(async move {
            let _place = place;
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => {
                    tracing::info!(%peer, %error, "extender: TLS handshake refused");
                    return;
                }
                Err(_) => {
                    tracing::info!(%peer, "extender: TLS handshake timed out");
                    return;
                }
            };
            let client = match stream.get_ref().1.peer_certificates().and_then(|certs| certs.first()) {
                Some(leaf) => ClientCert::Verified(certificate_names(leaf.as_ref()).into()),
                None => ClientCert::Absent,
            };
            let service = TowerToHyperService::new(router.layer(axum::Extension(client)));
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(error) = watcher.watch(connection).await {
                tracing::debug!(%peer, %error, "extender: connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}
