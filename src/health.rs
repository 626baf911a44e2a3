//! The operations endpoint: Prometheus metrics on `/metrics`, liveness on `/healthz` and
//! readiness on `/readyz` (200 when every check passes, 503 with a JSON body naming the
//! failing checks otherwise).
//!
//! Readiness checks: `broker` (the worker holds a live connection), `consumer` (the worker
//! has a consumer on its queue: not while it reconnects, nor while it has cancelled its
//! consumer because a circuit breaker is open), `model` (the embedder is loaded), `store` (a live probe of the vector store), `breakers` (no circuit breaker is
//! open).

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;

/// A live check run on every `/readyz` request; `Err` carries the reason.
pub type Probe =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// The `/readyz` store check: a live count of the points of tenant `readyz-probe`, which
/// shows that `store` answers without reading a real tenant's data. Fails with the store's
/// error text.
pub fn store_probe<S: crate::store::VectorStore + 'static>(store: Arc<S>) -> Probe {
    Arc::new(move || {
        let store = Arc::clone(&store);
        Box::pin(async move {
            let probe = crate::tenant::TenantId::new("readyz-probe").map_err(|e| e.to_string())?;
            store
                .count(&probe, None)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    })
}

/// Shared readiness state, updated by the worker and read by `/readyz`.
#[derive(Default)]
pub struct Health {
    broker_connected: AtomicBool,
    consuming: AtomicBool,
    model_loaded: AtomicBool,
    open_breakers: std::sync::Mutex<BTreeMap<String, bool>>,
    store_probe: std::sync::Mutex<Option<Probe>>,
}

impl Health {
    /// A fresh state: nothing connected, nothing loaded, no store probe.
    pub fn new() -> Arc<Self> {
        Arc::new(Health::default())
    }

    /// Records whether the worker holds a live broker connection.
    pub fn set_broker_connected(&self, connected: bool) {
        self.broker_connected.store(connected, Ordering::Relaxed);
    }

    /// Records whether the worker has a consumer on its queue.
    pub fn set_consuming(&self, consuming: bool) {
        self.consuming.store(consuming, Ordering::Relaxed);
    }

    /// Records whether the embedding model is loaded.
    pub fn set_model_loaded(&self, loaded: bool) {
        self.model_loaded.store(loaded, Ordering::Relaxed);
    }

    /// Records whether breaker `name` is open.
    pub fn set_breaker_open(&self, name: &str, open: bool) {
        let mut map = self.open_breakers.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(name.to_string(), open);
    }

    /// Sets the live store check run by `/readyz`.
    pub fn set_store_probe(&self, probe: Probe) {
        *self.store_probe.lock().unwrap_or_else(|p| p.into_inner()) = Some(probe);
    }

    /// Runs every check; `Ok` per check name or the reason it failed.
    pub async fn check(&self) -> BTreeMap<&'static str, Result<(), String>> {
        let mut out = BTreeMap::new();
        out.insert(
            "broker",
            if self.broker_connected.load(Ordering::Relaxed) {
                Ok(())
            } else {
                Err("not connected to RabbitMQ".to_string())
            },
        );
        out.insert(
            "consumer",
            if self.consuming.load(Ordering::Relaxed) {
                Ok(())
            } else {
                Err("no consumer on the queue (reconnecting, or paused while a circuit breaker is open)".to_string())
            },
        );
        out.insert(
            "model",
            if self.model_loaded.load(Ordering::Relaxed) {
                Ok(())
            } else {
                Err("embedding model not loaded".to_string())
            },
        );
        let probe = self
            .store_probe
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let store = match probe {
            None => Err("no store opened".to_string()),
            Some(probe) => match tokio::time::timeout(Duration::from_secs(5), probe()).await {
                Ok(result) => result,
                Err(_) => Err("store probe timed out after 5 s".to_string()),
            },
        };
        out.insert("store", store);
        let open: Vec<String> = self
            .open_breakers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, open)| **open)
            .map(|(name, _)| name.clone())
            .collect();
        out.insert(
            "breakers",
            if open.is_empty() {
                Ok(())
            } else {
                Err(format!("open: {}", open.join(", ")))
            },
        );
        out
    }
}

#[derive(Serialize)]
struct CheckBody {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Serialize)]
struct ReadyBody {
    status: &'static str,
    checks: BTreeMap<&'static str, CheckBody>,
}

#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
    metrics: PrometheusHandle,
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    state.metrics.run_upkeep();
    (
        [("content-type", "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

async fn healthz() -> impl IntoResponse {
    Json(serde_json::json!({"status": "alive"}))
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let checks = state.health.check().await;
    let ready = checks.values().all(Result::is_ok);
    let body = ReadyBody {
        status: if ready { "ready" } else { "not_ready" },
        checks: checks
            .into_iter()
            .map(|(name, r)| {
                (
                    name,
                    CheckBody {
                        ok: r.is_ok(),
                        error: r.err(),
                    },
                )
            })
            .collect(),
    };
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body))
}

/// Binds `addr` and serves `/metrics`, `/healthz` and `/readyz` in a background task until
/// the runtime stops. Returns the bound address (useful with port 0).
///
/// Fails with the I/O error if the address cannot be bound.
pub async fn serve(
    addr: SocketAddr,
    health: Arc<Health>,
    metrics: PrometheusHandle,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(self::metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState { health, metrics });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            crate::telemetry::emit(crate::telemetry::events::MetricsServerStopped { error: &e });
        }
    });
    Ok(bound)
}
