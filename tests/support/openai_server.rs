//! An OpenAI-compatible `/v1/embeddings` endpoint for tests: it answers 503 while "down" and
//! the real all-MiniLM-L6-v2 vectors (computed in the test process) while up, in the exact
//! OpenAI wire format; with a rate limit ([`Embedder503::limit_per_second`]) it answers 429
//! to the requests above it, as a provider does.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use rag_ingest::embed::Embedder;
use serde_json::{Value, json};

/// The model name the server reports (the fingerprint's model).
pub const MODEL: &str = "sentence-transformers/all-MiniLM-L6-v2";

/// The texts of an OpenAI embeddings request body (`input`, an array of strings); empty if
/// it has none.
pub fn request_inputs(body: &Value) -> Vec<String> {
    body["input"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// An OpenAI-compatible embeddings endpoint that is down (503) or up (real vectors).
pub struct Embedder503 {
    /// Where it listens.
    pub addr: SocketAddr,
    down: Arc<AtomicBool>,
    /// Requests answered so far (up or down).
    pub requests: Arc<AtomicUsize>,
    limit: Arc<RateLimit>,
}

/// A provider's rate limit: at most `per_second` requests answered in any one second (a
/// sliding window); the others get 429 with `Retry-After: 1`.
#[derive(Default)]
struct RateLimit {
    /// 0 = no limit.
    per_second: AtomicUsize,
    /// Arrival times of the requests answered within the limit, in the last second.
    admitted: Mutex<VecDeque<Instant>>,
    /// Arrival time of every request answered with vectors.
    served: Mutex<Vec<Instant>>,
    /// Requests answered 429.
    throttled: AtomicUsize,
}

impl RateLimit {
    /// Whether a request arriving now is within the limit (and counts it if so).
    fn admit(&self) -> bool {
        let limit = self.per_second.load(Ordering::SeqCst);
        let now = Instant::now();
        if limit > 0 {
            let mut admitted = self.admitted.lock().unwrap_or_else(PoisonError::into_inner);
            while admitted
                .front()
                .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
            {
                admitted.pop_front();
            }
            if admitted.len() >= limit {
                self.throttled.fetch_add(1, Ordering::SeqCst);
                return false;
            }
            admitted.push_back(now);
        }
        self.served
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(now);
        true
    }
}

#[derive(Clone)]
struct ServerState {
    down: Arc<AtomicBool>,
    requests: Arc<AtomicUsize>,
    limit: Arc<RateLimit>,
}

async fn embeddings(State(state): State<ServerState>, body: Bytes) -> Response {
    state.requests.fetch_add(1, Ordering::SeqCst);
    if !state.limit.admit() {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, "1")],
            json!({"error": {"message": "Rate limit reached for requests", "type": "requests"}})
                .to_string(),
        )
            .into_response();
    }
    if state.down.load(Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "application/json")],
            json!({"error": {"message": "model is loading", "type": "server_error"}}).to_string(),
        )
            .into_response();
    }
    let body: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    let inputs = request_inputs(&body);
    let vectors = crate::common::embedder()
        .embed(inputs)
        .await
        .expect("the real model embeds");
    let data: Vec<Value> = vectors
        .into_iter()
        .enumerate()
        .map(|(i, v)| json!({"object": "embedding", "index": i, "embedding": v}))
        .collect();
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        json!({"object": "list", "data": data, "model": MODEL,
               "usage": {"prompt_tokens": 1, "total_tokens": 1}})
        .to_string(),
    )
        .into_response()
}

impl Embedder503 {
    /// Starts a server on a free loopback port, down (503) or up.
    pub async fn start(down: bool) -> Self {
        let state = ServerState {
            down: Arc::new(AtomicBool::new(down)),
            requests: Arc::new(AtomicUsize::new(0)),
            limit: Arc::new(RateLimit::default()),
        };
        let app = Router::new()
            .route("/v1/embeddings", post(embeddings))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Embedder503 {
            addr,
            down: state.down,
            requests: state.requests,
            limit: state.limit,
        }
    }

    /// Answers 429 to any request beyond `n` in one second (a sliding window), as a
    /// provider's rate limit does (0: no limit).
    #[allow(dead_code)]
    pub fn limit_per_second(&self, n: usize) {
        self.limit.per_second.store(n, Ordering::SeqCst);
    }

    /// Requests answered 429 by the rate limit.
    #[allow(dead_code)]
    pub fn throttled(&self) -> usize {
        self.limit.throttled.load(Ordering::SeqCst)
    }

    /// Arrival times of the requests answered with vectors, in order.
    #[allow(dead_code)]
    pub fn served(&self) -> Vec<Instant> {
        self.limit
            .served
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Takes the server down (503) or brings it back.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }
}
