//! Leader election on a `coordination.k8s.io/v1` Lease, with client-go's semantics: the
//! holder renews every retry period; a candidate takes the Lease over once the record it
//! observed has not changed for the lease duration (measured on its own clock, so clock skew
//! between replicas does not matter); every write carries the resourceVersion it read, so two
//! candidates cannot both win (the loser gets 409). A leader that cannot renew within the
//! renew deadline steps down. On shutdown the leader hands the Lease back at once.
//!
//! kube-rs has no lease lock of its own; this is the small piece of client-go's
//! `leaderelection` that a scheduler needs.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use kube::Client;
use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica's identity (pod name and a random suffix, by default).
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

pub struct LeaderElector {
    api: Api<Lease>,
    config: LeaseConfig,
    /// The record last seen (holder, resourceVersion) and when it was first seen so.
    observed: Option<((String, String), Instant)>,
}

fn now_micro() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

impl LeaderElector {
    pub fn new(client: Client, config: LeaseConfig) -> Self {
        LeaderElector { api: Api::namespaced(client, &config.namespace), config, observed: None }
    }

    pub fn identity(&self) -> &str {
        &self.config.identity
    }

    /// One round: `Ok(true)` when this replica holds the Lease after it.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let duration_s = self.config.lease_duration.as_secs().clamp(1, i32::MAX as u64) as i32;
        let existing = match self.api.get(&self.config.name).await {
            Ok(lease) => lease,
            Err(kube::Error::Api(status)) if status.code == 404 => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.config.name.clone()),
                        namespace: Some(self.config.namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.config.identity.clone()),
                        lease_duration_seconds: Some(duration_s),
                        acquire_time: Some(now_micro()),
                        renew_time: Some(now_micro()),
                        lease_transitions: Some(0),
                        ..LeaseSpec::default()
                    }),
                };
                return match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
                    Err(error) => Err(error),
                };
            }
            Err(error) => return Err(error),
        };
        let spec = existing.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let record = (holder.clone(), existing.metadata.resource_version.clone().unwrap_or_default());
        let now = Instant::now();
        let observed_at = match &self.observed {
            Some((seen, at)) if *seen == record => *at,
            _ => {
                self.observed = Some((record, now));
                now
            }
        };
        let theirs = !holder.is_empty() && holder != self.config.identity;
        let their_duration = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(duration_s).max(1) as u64);
        if theirs && now.duration_since(observed_at) < their_duration {
            return Ok(false);
        }
        let mut lease = existing;
        let mut next = spec;
        if holder != self.config.identity {
            next.acquire_time = Some(now_micro());
            next.lease_transitions = Some(next.lease_transitions.unwrap_or(0) + 1);
            next.holder_identity = Some(self.config.identity.clone());
        }
        next.renew_time = Some(now_micro());
        next.lease_duration_seconds = Some(duration_s);
        lease.spec = Some(next);
        match self.api.replace(&self.config.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Hands the Lease back (holder cleared) so a standby takes over without waiting.
    pub async fn release(&mut self) {
        let Ok(mut lease) = self.api.get(&self.config.name).await else { return };
        let Some(spec) = lease.spec.as_mut() else { return };
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(now_micro());
        if let Err(error) = self.api.replace(&self.config.name, &PostParams::default(), &lease).await {
            tracing::warn!(%error, "handing the Lease back failed; the standby takes over when it expires");
        }
    }

    /// Campaigns and renews until `stop` turns true (then hands the Lease back) or the
    /// leadership is lost (an error: the caller must stop binding at once). Leadership is
    /// published on `leading`.
    pub async fn run(
        mut self,
        leading: tokio::sync::watch::Sender<bool>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), String> {
        let mut leader = false;
        let mut last_renew = Instant::now();
        loop {
            let held = match self.try_acquire_or_renew().await {
                Ok(held) => held,
                Err(error) => {
                    tracing::warn!(%error, lease = %self.config.name, "leader election round failed");
                    false
                }
            };
            let now = Instant::now();
            if held {
                last_renew = now;
                if !leader {
                    leader = true;
                    tracing::info!(identity = %self.config.identity, lease = %self.config.name, "became the leader");
                    let _ = leading.send(true);
                }
            } else if leader && now.duration_since(last_renew) >= self.config.renew_deadline {
                let _ = leading.send(false);
                return Err(format!(
                    "leadership of Lease {}/{} lost: not renewed within {:?}",
                    self.config.namespace, self.config.name, self.config.renew_deadline
                ));
            }
            let stopping = tokio::select! {
                _ = tokio::time::sleep(self.config.retry_period) => false,
                // A closed channel means nobody can ask any more: stop too.
                _ = stop.wait_for(|s| *s) => true,
            };
            if stopping {
                if leader {
                    let _ = leading.send(false);
                    self.release().await;
                }
                return Ok(());
            }
        }
    }
}
