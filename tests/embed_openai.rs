//! [`OpenAiEmbedder`], the circuit breaker and [`FailoverEmbedder`] against a local HTTP
//! server that speaks the OpenAI embeddings wire format and serves vectors computed by the
//! real all-MiniLM-L6-v2 model (so "remote" and local vectors are the same space).
//!
//! The server binds 127.0.0.1:0, records every request (arrival time, body, headers) and
//! answers from a script (status, headers, body) before falling back to real vectors, with
//! the `data` array shuffled so that only `index` tells which vector is whose.

mod common;
#[allow(dead_code)]
#[path = "support/openai_server.rs"]
mod openai_server;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use openai_server::{MODEL, request_inputs};
use rag_ingest::breaker::{BreakerConfig, BreakerState};
use rag_ingest::config::{ConfigError, PipelineConfig, RetryConfig};
use rag_ingest::embed::rate::RateLimits;
use rag_ingest::embed::{
    ApiKey, CandleEmbedder, EmbedError, Embedder, FailoverEmbedder, Fingerprint, OpenAiEmbedder,
    OpenAiOptions, Usage,
};
use rag_ingest::error::ErrorKind;
use rag_ingest::process::Failure;
use rag_ingest::{retry, setup};
use serde_json::{Value, json};

const SECRET: &str = "sk-test-RECOGNISABLE-0123456789-secret";

/// What the server does with one request.
#[derive(Clone, Debug)]
enum Answer {
    /// Real vectors (shuffled `data`), after `delay`.
    Vectors { delay: Duration },
    /// A fixed status, headers and body.
    Fixed {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: String,
    },
    /// Real vectors with each one cut to `dims` values.
    WrongDims(usize),
    /// Real vectors minus the last one.
    MissingOne,
    /// Real vectors with the first one's index repeated for the second.
    DuplicateIndex,
    /// A body with a bare `NaN` (what Python's `json.dumps` writes).
    NanLiteral,
    /// A number too large for f32 (infinity once read).
    Overflow,
}

fn fixed(status: u16, body: &str) -> Answer {
    Answer::Fixed {
        status,
        headers: Vec::new(),
        body: body.to_owned(),
    }
}

fn openai_error(status: u16, message: &str) -> Answer {
    fixed(
        status,
        &json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": null}})
            .to_string(),
    )
}

/// One recorded request.
#[derive(Clone, Debug)]
struct Seen {
    at: Instant,
    body: Value,
    authorization: Option<String>,
}

#[derive(Default)]
struct ServerState {
    script: Mutex<VecDeque<Answer>>,
    /// Served once the script is empty.
    default: Mutex<Option<Answer>>,
    seen: Mutex<Vec<Seen>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    /// The provider's rate limit: at most this many requests answered in any second; the
    /// others get 429 (0 = no limit).
    per_second: AtomicUsize,
    /// Arrival times of the requests answered under `per_second`.
    admitted: Mutex<VecDeque<Instant>>,
    /// Requests answered 429 by `per_second`.
    throttled: AtomicUsize,
}

struct Server {
    addr: SocketAddr,
    state: Arc<ServerState>,
}

impl Server {
    async fn start() -> Server {
        let state = Arc::new(ServerState::default());
        let app = Router::new()
            .route("/v1/embeddings", post(embeddings))
            .with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Server { addr, state }
    }

    fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Answers the next requests with `answers`, in order.
    fn script(&self, answers: impl IntoIterator<Item = Answer>) {
        self.state.script.lock().expect("lock").extend(answers);
    }

    /// Answers every request past the script with `answer` (real vectors when `None`).
    fn set_default(&self, answer: Option<Answer>) {
        *self.state.default.lock().expect("lock") = answer;
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().expect("lock").clone()
    }

    fn requests(&self) -> usize {
        self.state.seen.lock().expect("lock").len()
    }

    /// Answers 429 to any request beyond `n` in one second (a sliding window), as a
    /// provider's rate limit does.
    fn limit_per_second(&self, n: usize) {
        self.state.per_second.store(n, Ordering::SeqCst);
    }

    /// Requests answered 429 by [`Server::limit_per_second`].
    fn throttled(&self) -> usize {
        self.state.throttled.load(Ordering::SeqCst)
    }
}

/// Tokens of `text` for the real model, special tokens included.
fn token_count(text: &str) -> usize {
    common::embedder()
        .tokenizer()
        .encode(text, true)
        .expect("tokenize")
        .len()
}

async fn embeddings(
    State(state): State<Arc<ServerState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("bad json: {e}")).into_response(),
    };
    state.seen.lock().expect("lock").push(Seen {
        at: Instant::now(),
        body: body.clone(),
        authorization: headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    });
    let limit = state.per_second.load(Ordering::SeqCst);
    if limit > 0 {
        let now = Instant::now();
        let mut admitted = state.admitted.lock().expect("lock");
        while admitted
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
        {
            admitted.pop_front();
        }
        if admitted.len() >= limit {
            state.throttled.fetch_add(1, Ordering::SeqCst);
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, "1")],
                json!({"error": {"message": "Rate limit reached for requests"}}).to_string(),
            )
                .into_response();
        }
        admitted.push_back(now);
    }
    let answer = state.script.lock().expect("lock").pop_front();
    let answer = answer
        .or_else(|| state.default.lock().expect("lock").clone())
        .unwrap_or(Answer::Vectors {
            delay: Duration::ZERO,
        });
    let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    state.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let response = answer_with(answer, &body).await;
    state.in_flight.fetch_sub(1, Ordering::SeqCst);
    response
}

async fn answer_with(answer: Answer, body: &Value) -> Response {
    let inputs = request_inputs(body);
    match answer {
        Answer::Fixed {
            status,
            headers,
            body,
        } => {
            let mut response = (
                StatusCode::from_u16(status).expect("status"),
                [(header::CONTENT_TYPE, "application/json")],
                body,
            )
                .into_response();
            for (name, value) in headers {
                response
                    .headers_mut()
                    .insert(name, HeaderValue::from_str(&value).expect("header"));
            }
            response
        }
        Answer::Vectors { delay } => {
            tokio::time::sleep(delay).await;
            let vectors = real_vectors(&inputs).await;
            json_response(wire(&inputs, vectors))
        }
        Answer::WrongDims(dims) => {
            let vectors = real_vectors(&inputs)
                .await
                .into_iter()
                .map(|v| v[..dims].to_vec())
                .collect();
            json_response(wire(&inputs, vectors))
        }
        Answer::MissingOne => {
            let mut value = wire(&inputs, real_vectors(&inputs).await);
            value["data"].as_array_mut().expect("data").pop();
            json_response(value)
        }
        Answer::DuplicateIndex => {
            let mut value = wire(&inputs, real_vectors(&inputs).await);
            let data = value["data"].as_array_mut().expect("data");
            let first = data[0]["index"].clone();
            data[1]["index"] = first;
            json_response(value)
        }
        Answer::NanLiteral => {
            let text = wire(&inputs, real_vectors(&inputs).await)
                .to_string()
                .replacen("[", "[NaN,", 2);
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                text,
            )
                .into_response()
        }
        Answer::Overflow => {
            let mut value = wire(&inputs, real_vectors(&inputs).await);
            value["data"][0]["embedding"][0] = json!(1e39);
            json_response(value)
        }
    }
}

async fn real_vectors(inputs: &[String]) -> Vec<Vec<f32>> {
    common::embedder()
        .embed(inputs.to_vec())
        .await
        .expect("the real model embeds")
}

/// The OpenAI response for `vectors`, `data` shuffled (reversed, then rotated by one).
fn wire(inputs: &[String], vectors: Vec<Vec<f32>>) -> Value {
    let mut data: Vec<Value> = vectors
        .into_iter()
        .enumerate()
        .map(|(i, v)| json!({"object": "embedding", "index": i, "embedding": v}))
        .collect();
    data.reverse();
    if !data.is_empty() {
        data.rotate_left(1);
    }
    let tokens: usize = inputs.iter().map(|t| token_count(t)).sum();
    json!({
        "object": "list",
        "data": data,
        "model": MODEL,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })
}

fn json_response(value: Value) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

fn fingerprint() -> Fingerprint {
    Fingerprint {
        model: MODEL.into(),
        dims: 384,
        pooling: "mean".into(),
        normalized: true,
        sparse: None,
    }
}

/// Options for `server` with fast retries and a key.
fn options(server: &Server) -> OpenAiOptions {
    let mut o = OpenAiOptions::new(server.base_url(), "all-minilm", fingerprint());
    o.api_key = Some(ApiKey::new(SECRET));
    o.max_input_tokens = 256;
    o.backoff_min = Duration::from_millis(10);
    o.backoff_max = Duration::from_millis(20);
    o.request_timeout = Duration::from_secs(20);
    o
}

fn remote(options: OpenAiOptions) -> OpenAiEmbedder {
    OpenAiEmbedder::new(options).expect("the embedder builds")
}

fn texts(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("Sentence number {i} is about topic {}.", i * 7 % 5))
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

fn local(texts: &[String]) -> Vec<Vec<f32>> {
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    common::embedder().embed_blocking(&refs).expect("local")
}

fn assert_same_vectors(got: &[Vec<f32>], expected: &[Vec<f32>]) {
    assert_eq!(got.len(), expected.len());
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        let c = cosine(g, e);
        assert!(c >= 0.9999, "vector {i}: cosine {c}");
    }
}

fn candle() -> CandleEmbedder {
    (*common::embedder()).clone()
}

#[tokio::test]
async fn batches_are_split_sent_concurrently_and_matched_by_index() {
    let server = Server::start().await;
    server.set_default(Some(Answer::Vectors {
        delay: Duration::from_millis(100),
    }));
    let mut o = options(&server);
    o.batch_size = 3;
    o.max_concurrent_requests = 2;
    o.dimensions = Some(384);
    let embedder = remote(o);
    let inputs = texts(8);

    let (vectors, usage) = embedder
        .embed_with_usage(inputs.clone())
        .await
        .expect("embeds");
    assert_same_vectors(&vectors, &local(&inputs));

    let seen = server.seen();
    assert_eq!(seen.len(), 3, "8 inputs in batches of 3");
    let mut sent: Vec<String> = Vec::new();
    let mut sizes: Vec<usize> = Vec::new();
    for s in &seen {
        assert_eq!(s.body["model"], "all-minilm");
        assert_eq!(s.body["encoding_format"], "float");
        assert_eq!(s.body["dimensions"], 384);
        assert_eq!(
            s.authorization.as_deref(),
            Some(format!("Bearer {SECRET}").as_str())
        );
        let input: Vec<String> = serde_json::from_value(s.body["input"].clone()).expect("input");
        sizes.push(input.len());
        sent.extend(input);
    }
    sizes.sort_unstable();
    assert_eq!(sizes, vec![2, 3, 3]);
    sent.sort();
    let mut expected = inputs.clone();
    expected.sort();
    assert_eq!(sent, expected, "every input sent exactly once");
    assert_eq!(
        server.state.max_in_flight.load(Ordering::SeqCst),
        2,
        "max_concurrent_requests bounds the requests in flight"
    );

    let tokens: u64 = inputs.iter().map(|t| token_count(t) as u64).sum();
    assert_eq!(
        usage,
        Usage {
            provider: format!("{}/v1/embeddings", server.base_url()),
            prompt_tokens: tokens,
            requests: 3,
        }
    );
    assert_eq!(embedder.tokens_used(), tokens);
    assert_eq!(embedder.requests_sent(), 3);
    assert!(embedder.embed(Vec::new()).await.expect("empty").is_empty());
    assert_eq!(server.requests(), 3, "an empty call sends nothing");
}

#[tokio::test]
async fn requests_stay_within_the_token_budget() {
    let server = Server::start().await;
    let inputs: Vec<String> = (0..12).map(|i| "word ".repeat(5 + (i * 13) % 40)).collect();
    let budget = 100;

    // With the model's tokenizer: exact counts, so each request holds as much as fits.
    let mut o = options(&server);
    o.batch_size = 64;
    o.max_request_tokens = Some(budget);
    o.tokenizer = Some(common::embedder().tokenizer().clone());
    let embedder = remote(o);
    let vectors = embedder.embed(inputs.clone()).await.expect("embeds");
    assert_same_vectors(&vectors, &local(&inputs));
    let exact = server.seen();
    for s in &exact {
        let input: Vec<String> = serde_json::from_value(s.body["input"].clone()).expect("input");
        let tokens: usize = input.iter().map(|t| token_count(t)).sum();
        assert!(
            tokens <= budget || input.len() == 1,
            "{tokens} tokens in one request"
        );
    }
    let total: usize = inputs.iter().map(|t| token_count(t)).sum();
    assert!(
        exact.len() >= total.div_ceil(budget),
        "{} requests",
        exact.len()
    );

    // Without a tokenizer the estimate (bytes + 4) is an upper bound: more, smaller requests.
    let mut o = options(&server);
    o.batch_size = 64;
    o.max_request_tokens = Some(budget);
    let embedder = remote(o);
    let vectors = embedder.embed(inputs.clone()).await.expect("embeds");
    assert_same_vectors(&vectors, &local(&inputs));
    let estimated = server.seen().len() - exact.len();
    assert!(
        estimated > exact.len(),
        "estimated split: {estimated} requests, exact: {}",
        exact.len()
    );
}

#[tokio::test]
async fn rate_limit_waits_for_retry_after() {
    let server = Server::start().await;
    server.script([Answer::Fixed {
        status: 429,
        headers: vec![("retry-after", "1".into())],
        body: json!({"error": {"message": "Rate limit reached for requests"}}).to_string(),
    }]);
    let embedder = remote(options(&server));
    let inputs = texts(2);
    let vectors = embedder
        .embed(inputs.clone())
        .await
        .expect("embeds after waiting");
    assert_same_vectors(&vectors, &local(&inputs));
    let seen = server.seen();
    assert_eq!(seen.len(), 2);
    let waited = seen[1].at - seen[0].at;
    assert!(
        waited >= Duration::from_secs(1),
        "the retry came {waited:?} after the 429"
    );
    assert!(waited < Duration::from_secs(3), "waited {waited:?}");
}

/// With `max_requests_per_minute` below the provider's rate, requests wait on the client
/// instead of being refused: no 429 at all, every text embedded, and (lower bound) the
/// requests took at least as long as the configured rate allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_side_limit_keeps_requests_under_the_provider_rate() {
    let server = Server::start().await;
    server.limit_per_second(10);
    let mut o = options(&server);
    o.batch_size = 1;
    o.max_concurrent_requests = 8;
    o.rate_limit_retries = 0;
    // 8 per second, under the provider's 10.
    o.rate_limits = RateLimits {
        requests_per_minute: 480,
        tokens_per_minute: 0,
    };
    let embedder = remote(o);
    let inputs = texts(32);
    let started = Instant::now();
    let vectors = embedder
        .embed(inputs.clone())
        .await
        .expect("no request is refused");
    let elapsed = started.elapsed();
    assert_same_vectors(&vectors, &local(&inputs));
    assert_eq!(server.throttled(), 0, "no 429s");
    assert_eq!(server.requests(), 32, "one request per text, none retried");
    assert!(
        elapsed >= Duration::from_millis(31 * 1000 / 8),
        "32 requests at 8 per second take at least 3.875 s: {elapsed:?}"
    );

    // The config fields reach the embedder's options.
    let config = parse(&openai_toml(
        &server.base_url(),
        MODEL,
        384,
        "tokenizer = \"{tokenizer}\"\nmax_requests_per_minute = 480\nmax_tokens_per_minute = 90000\n",
    ))
    .expect("valid");
    let from_config =
        OpenAiOptions::from_config(&config.embedder, &|_| None).expect("options build");
    assert_eq!(
        from_config.rate_limits,
        RateLimits {
            requests_per_minute: 480,
            tokens_per_minute: 90_000
        }
    );

    // Without the client-side limit the same load collects 429s from the provider.
    let mut o = options(&server);
    o.batch_size = 1;
    o.max_concurrent_requests = 8;
    o.rate_limit_retries = 0;
    let unlimited = remote(o);
    let refused = unlimited.embed(texts(32)).await;
    assert!(
        server.throttled() > 0,
        "the provider's limit is real: {refused:?}"
    );
}

#[tokio::test]
async fn rate_limit_retries_are_bounded_and_long_waits_are_left_to_the_worker() {
    let server = Server::start().await;
    server.set_default(Some(Answer::Fixed {
        status: 503,
        headers: Vec::new(),
        body: "overloaded".into(),
    }));
    let mut o = options(&server);
    o.rate_limit_retries = 2;
    let embedder = remote(o);
    let err = embedder.embed(texts(1)).await.expect_err("still 503");
    assert_eq!(err.kind(), ErrorKind::EmbedderUnavailable);
    assert!(err.to_string().contains("overloaded"), "{err}");
    assert_eq!(server.requests(), 3, "1 request + 2 retries, no more");

    // A Retry-After longer than max_retry_after is not slept on: the error carries it.
    server.set_default(Some(Answer::Fixed {
        status: 429,
        headers: vec![("retry-after", "120".into())],
        body: String::new(),
    }));
    let started = Instant::now();
    let err = embedder.embed(texts(1)).await.expect_err("429");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(err.retry_after(), Some(Duration::from_secs(120)));
    assert_eq!(server.requests(), 4);
}

#[tokio::test]
async fn server_errors_are_retried_by_the_worker_retry_policy() {
    let server = Server::start().await;
    let embedder = remote(options(&server));

    // The embedder itself does not retry a 500: one request, a transient error.
    server.script([openai_error(500, "The server had an error")]);
    let err = embedder.embed(texts(1)).await.expect_err("500");
    assert_eq!(err.kind(), ErrorKind::EmbedderUnavailable);
    assert!(err.to_string().contains("The server had an error"), "{err}");
    assert_eq!(server.requests(), 1);

    // The worker's in-process retry (retry::with_retries) gets through two more.
    server.script([
        openai_error(500, "The server had an error"),
        fixed(502, "<html>bad gateway</html>"),
    ]);
    let config = RetryConfig {
        in_process_retries: 3,
        backoff_min_ms: 10,
        backoff_max_ms: 20,
        ..RetryConfig::default()
    };
    let inputs = texts(3);
    let mut retries = Vec::new();
    let vectors = retry::with_retries(
        &config,
        || async { embedder.embed(inputs.clone()).await.map_err(Failure::from) },
        |failure, _| retries.push(failure.kind),
    )
    .await
    .expect("succeeds on the third request");
    assert_same_vectors(&vectors, &local(&inputs));
    assert_eq!(retries, vec![ErrorKind::EmbedderUnavailable; 2]);
    assert_eq!(server.requests(), 4, "1 + 3 requests");
    assert_eq!(embedder.circuit_breaker().state(), BreakerState::Closed);
}

#[tokio::test]
async fn unauthorized_is_permanent_carries_the_message_and_is_sent_once() {
    let server = Server::start().await;
    server.set_default(Some(openai_error(
        401,
        &format!(
            "Incorrect API key provided: {SECRET}. You can find your API key at the dashboard."
        ),
    )));
    let embedder = remote(options(&server));
    let config = RetryConfig {
        in_process_retries: 3,
        backoff_min_ms: 10,
        backoff_max_ms: 20,
        ..RetryConfig::default()
    };
    let failure = retry::with_retries(
        &config,
        || async { embedder.embed(texts(2)).await.map_err(Failure::from) },
        |_, _| {},
    )
    .await
    .expect_err("401");
    assert_eq!(failure.kind, ErrorKind::EmbedderAuth);
    assert_eq!(failure.kind.as_str(), "embedder_auth");
    assert!(!failure.kind.is_transient());
    assert!(
        failure.reason.contains("Incorrect API key provided"),
        "{}",
        failure.reason
    );
    assert!(!failure.reason.contains(SECRET), "{}", failure.reason);
    assert_eq!(server.requests(), 1, "no retry storm");

    server.set_default(Some(openai_error(
        403,
        "You are not allowed to use this model",
    )));
    let err = embedder.embed(texts(1)).await.expect_err("403");
    assert!(
        matches!(err, EmbedError::Auth { status: 403, .. }),
        "{err:?}"
    );
    assert_eq!(server.requests(), 2);
}

#[tokio::test]
async fn client_errors_are_rejections_with_the_provider_message() {
    let server = Server::start().await;
    let embedder = remote(options(&server));
    for (status, answer, needle) in [
        (
            400,
            openai_error(400, "This model's maximum context length is 8192 tokens"),
            "maximum context length",
        ),
        (
            404,
            openai_error(404, "The model `nope` does not exist"),
            "does not exist",
        ),
        (
            422,
            fixed(
                422,
                r#"{"error":"Input validation error: inputs too long","error_type":"Validation"}"#,
            ),
            "Input validation error",
        ),
    ] {
        server.script([answer]);
        let before = server.requests();
        let err = embedder.embed(texts(1)).await.expect_err("4xx");
        assert_eq!(err.kind(), ErrorKind::EmbedderRejected, "{err}");
        assert!(
            matches!(&err, EmbedError::Rejected { status: s, message, .. } if *s == status && message.contains(needle)),
            "{err:?}"
        );
        assert_eq!(server.requests(), before + 1);
    }
    // A very long error body is cut to about 500 characters.
    server.script([fixed(400, &"x".repeat(5000))]);
    let err = embedder.embed(texts(1)).await.expect_err("400");
    assert!(
        err.to_string().len() < 700,
        "{} chars",
        err.to_string().len()
    );
}

#[tokio::test]
async fn malformed_answers_are_errors_and_nothing_is_returned() {
    let server = Server::start().await;
    let mut o = options(&server);
    o.breaker.failure_threshold = 100;
    let embedder = remote(o);
    let cases = [
        (Answer::WrongDims(383), ErrorKind::DimensionMismatch, "383"),
        (
            Answer::MissingOne,
            ErrorKind::EmbedderUnavailable,
            "2 embeddings for 3 inputs",
        ),
        (
            Answer::DuplicateIndex,
            ErrorKind::EmbedderUnavailable,
            "appears twice",
        ),
        (
            Answer::NanLiteral,
            ErrorKind::EmbedderUnavailable,
            "not an embeddings response",
        ),
        (
            Answer::Overflow,
            ErrorKind::EmbedderUnavailable,
            "NaN or infinite",
        ),
        (
            fixed(200, "<html>proxy login</html>"),
            ErrorKind::EmbedderUnavailable,
            "proxy login",
        ),
        (
            fixed(200, r#"{"data":"nope"}"#),
            ErrorKind::EmbedderUnavailable,
            "not an embeddings response",
        ),
    ];
    for (answer, kind, needle) in cases {
        server.script([answer.clone()]);
        let before = server.requests();
        let err = embedder.embed(texts(3)).await.expect_err("malformed");
        assert_eq!(err.kind(), kind, "{answer:?}: {err}");
        assert!(err.to_string().contains(needle), "{answer:?}: {err}");
        assert_eq!(
            server.requests(),
            before + 1,
            "{answer:?}: not retried inside"
        );
    }
    // A malformed answer is a transient failure for the breaker; a dimension mismatch (the
    // provider answered, with another model) is not.
    assert_eq!(embedder.circuit_breaker().consecutive_failures(), 6);
    assert_eq!(
        embedder.tokens_used(),
        0,
        "nothing from a malformed answer is counted"
    );
}

#[tokio::test]
async fn the_api_key_never_leaks() {
    let server = Server::start().await;
    let options = options(&server);
    assert!(!format!("{options:?}").contains(SECRET));
    let embedder = remote(options.clone());
    assert!(!format!("{embedder:?}").contains(SECRET));
    assert!(format!("{embedder:?}").contains("***"));

    let echo = format!("key {SECRET} is wrong");
    let mut errors: Vec<EmbedError> = Vec::new();
    for answer in [
        openai_error(401, &echo),
        openai_error(400, &echo),
        fixed(500, &echo),
        fixed(503, &format!(r#"{{"error":"{echo}"}}"#)),
        fixed(200, &echo),
    ] {
        server.set_default(Some(answer));
        errors.push(embedder.embed(texts(1)).await.expect_err("error"));
    }
    server.set_default(None);
    // Nothing listens on port 9 (discard): a connection error.
    let mut o = options.clone();
    o.base_url = "http://127.0.0.1:9".into();
    errors.push(remote(o).embed(texts(1)).await.expect_err("refused"));
    // A key that cannot be a header value.
    let mut o = options;
    o.api_key = Some(ApiKey::new(format!("{SECRET}\n")));
    errors.push(OpenAiEmbedder::new(o).expect_err("bad header"));

    for e in &errors {
        let shown = format!("{e} {e:?}");
        assert!(!shown.contains(SECRET), "the key leaked: {shown}");
    }
    assert!(
        errors[0].to_string().contains("key *** is wrong"),
        "{}",
        errors[0]
    );

    // A missing key variable is named, never a value.
    let toml = openai_toml(
        &server.base_url(),
        MODEL,
        384,
        "api_key_env = \"TEST_OPENAI_KEY\"\ntokenizer = \"{tokenizer}\"\n",
    );
    let config = parse(&toml).expect("valid config");
    let err = setup::embedder_with_env(&config, &|_| None).expect_err("no key");
    assert!(err.to_string().contains("TEST_OPENAI_KEY"), "{err}");
    let built = setup::embedder_with_env(&config, &|name| {
        (name == "TEST_OPENAI_KEY").then(|| SECRET.to_owned())
    })
    .expect("builds with the key");
    assert!(!format!("{built:?}").contains(SECRET));
}

#[tokio::test]
async fn breaker_opens_fails_fast_then_a_probe_closes_it() {
    let server = Server::start().await;
    let mut o = options(&server);
    o.rate_limit_retries = 0;
    o.batch_size = 1;
    o.breaker = BreakerConfig {
        failure_threshold: 3,
        open_for: Duration::from_millis(400),
    };
    let embedder = remote(o);
    let breaker = embedder.circuit_breaker();
    let mut states = breaker.subscribe();

    server.set_default(Some(fixed(500, "down")));
    for i in 0..3 {
        let err = embedder.embed(texts(1)).await.expect_err("500");
        assert!(
            matches!(err, EmbedError::Unavailable { .. }),
            "{i}: {err:?}"
        );
    }
    assert_eq!(breaker.state(), BreakerState::Open);
    assert_eq!(*states.borrow_and_update(), BreakerState::Open);
    assert_eq!(server.requests(), 3);

    // Open: calls fail fast, nothing reaches the server.
    for _ in 0..5 {
        let err = embedder.embed(texts(1)).await.expect_err("open");
        assert!(matches!(err, EmbedError::CircuitOpen { .. }), "{err:?}");
        assert_eq!(err.kind(), ErrorKind::EmbedderUnavailable);
        assert!(
            err.retry_after()
                .is_some_and(|d| d <= Duration::from_millis(400))
        );
    }
    assert_eq!(server.requests(), 3, "no request while open");
    assert_eq!(
        embedder.breaker().map(|b| b.state()),
        Some(BreakerState::Open)
    );

    // After the interval a probe goes through; the server is back, so the breaker closes.
    // The call needs 3 requests (batch_size 1): the probe goes first and alone, the other
    // two follow once it closed the breaker.
    server.set_default(None);
    tokio::time::timeout(Duration::from_secs(2), breaker.ready())
        .await
        .expect("ready once the probe is due");
    let inputs = texts(3);
    let vectors = embedder
        .embed(inputs.clone())
        .await
        .expect("probe succeeds");
    assert_same_vectors(&vectors, &local(&inputs));
    assert_eq!(server.requests(), 6);
    assert_eq!(breaker.state(), BreakerState::Closed);
    assert_eq!(*states.borrow_and_update(), BreakerState::Closed);

    // A failed probe re-opens it at once.
    server.set_default(Some(fixed(500, "down")));
    for _ in 0..3 {
        let _ = embedder.embed(texts(1)).await;
    }
    assert_eq!(breaker.state(), BreakerState::Open);
    tokio::time::sleep(Duration::from_millis(450)).await;
    let _ = embedder.embed(texts(1)).await.expect_err("probe fails");
    assert_eq!(breaker.state(), BreakerState::Open);
    assert_eq!(server.requests(), 6 + 3 + 1);

    // Permanent errors are signs of life: they do not open the breaker.
    server.set_default(None);
    tokio::time::sleep(Duration::from_millis(450)).await;
    embedder.embed(texts(1)).await.expect("probe succeeds");
    server.set_default(Some(openai_error(400, "bad input")));
    for _ in 0..5 {
        let _ = embedder.embed(texts(1)).await;
    }
    assert_eq!(breaker.state(), BreakerState::Closed);
}

#[tokio::test]
async fn failover_answers_from_the_local_model_in_the_same_space() {
    let server = Server::start().await;
    let inputs = texts(5);
    let mut o = options(&server);
    o.rate_limit_retries = 0;
    o.breaker = BreakerConfig {
        failure_threshold: 2,
        open_for: Duration::from_secs(60),
    };
    let failover = FailoverEmbedder::new(remote(o), candle()).expect("same fingerprint");
    assert_eq!(failover.fingerprint(), &fingerprint());
    assert_eq!(failover.max_input_tokens(), 256);
    assert!(
        failover.breaker().is_none(),
        "a local fallback never pauses the worker"
    );

    // Primary up: the remote answers.
    let (from_remote, usage) = failover
        .embed_with_usage(inputs.clone())
        .await
        .expect("remote");
    assert_ne!(usage.provider, Usage::LOCAL);
    assert!(usage.prompt_tokens > 0);
    assert_eq!(server.requests(), 1);

    // Primary down (503): the local model answers, vectors match the remote's.
    server.set_default(Some(openai_error(
        503,
        "The engine is currently overloaded",
    )));
    for round in 0..4 {
        let (from_local, usage) = failover
            .embed_with_usage(inputs.clone())
            .await
            .expect("fallback answers");
        assert_eq!(usage, Usage::local(), "round {round}");
        for (i, (l, r)) in from_local.iter().zip(&from_remote).enumerate() {
            let c = cosine(l, r);
            assert!(c >= 0.999, "round {round}, vector {i}: cosine {c}");
        }
    }
    assert_eq!(failover.fallback_calls(), 4);
    assert_eq!(
        server.requests(),
        3,
        "two failures open the primary's breaker; later calls do not reach it"
    );
    assert_eq!(
        failover.primary().circuit_breaker().state(),
        BreakerState::Open
    );

    // A rejected input is not sent to the fallback: the fallback would not know better.
    let failover = FailoverEmbedder::new(remote(options(&server)), candle()).expect("same");
    server.set_default(Some(openai_error(400, "input is too long")));
    let err = failover.embed(inputs.clone()).await.expect_err("rejected");
    assert_eq!(err.kind(), ErrorKind::EmbedderRejected);
    assert_eq!(failover.fallback_calls(), 0);
}

#[tokio::test]
async fn a_fallback_of_another_space_is_rejected_naming_both() {
    let server = Server::start().await;
    let expected_local = "sentence-transformers/all-MiniLM-L6-v2|384|mean|l2";

    // Another dimension.
    let mut o = options(&server);
    o.fingerprint.dims = 768;
    let err = FailoverEmbedder::new(remote(o), candle()).expect_err("768 vs 384");
    assert_eq!(err.kind(), ErrorKind::DimensionMismatch);
    let shown = err.to_string();
    assert!(
        shown.contains("sentence-transformers/all-MiniLM-L6-v2|768|mean|l2"),
        "{shown}"
    );
    assert!(shown.contains(expected_local), "{shown}");

    // Another model name, same dimension.
    let mut o = options(&server);
    o.fingerprint.model = "BAAI/bge-small-en-v1.5".into();
    let err = FailoverEmbedder::new(candle(), remote(o)).expect_err("other model");
    let shown = err.to_string();
    assert!(
        shown.contains("BAAI/bge-small-en-v1.5|384|mean|l2"),
        "{shown}"
    );
    assert!(shown.contains(expected_local), "{shown}");

    // Config: two remote fingerprints are compared when the file is loaded.
    let fallback = format!(
        "tokenizer = \"{{tokenizer}}\"\n[embedder.fallback]\nkind = \"openai\"\nbatch_size = 8\nbase_url = \"{}\"\nmodel = \"m\"\nfingerprint_model = \"{MODEL}\"\ndims = 768\npooling = \"mean\"\nnormalized = true\n",
        server.base_url()
    );
    let err = parse(&openai_toml(&server.base_url(), MODEL, 384, &fallback)).expect_err("mismatch");
    let shown = err.to_string();
    assert!(
        matches!(&err, ConfigError::Field { field, .. } if field == "embedder.fallback"),
        "{shown}"
    );
    assert!(shown.contains(&format!("{MODEL}|768|mean|l2")), "{shown}");
    assert!(shown.contains(expected_local), "{shown}");

    // Config: a candle fallback's fingerprint is known once loaded, so setup rejects it.
    let fallback = format!(
        "[embedder.fallback]\nkind = \"candle\"\nmodel_dir = \"{}\"\nbatch_size = 8\n",
        common::model_dir().display()
    );
    let config = parse(&openai_toml(
        &server.base_url(),
        "BAAI/bge-small-en-v1.5",
        384,
        &fallback,
    ))
    .expect("valid on its own");
    let err = setup::embedder_with_env(&config, &|_| None).expect_err("mismatch");
    let shown = err.to_string();
    assert!(
        shown.contains("BAAI/bge-small-en-v1.5|384|mean|l2"),
        "{shown}"
    );
    assert!(shown.contains(expected_local), "{shown}");

    // The matching pair builds, and its chunker uses the local model's tokenizer.
    let config = parse(&openai_toml(&server.base_url(), MODEL, 384, &fallback)).expect("valid");
    let embedder = setup::embedder_with_env(&config, &|_| None).expect("same space");
    assert_eq!(embedder.fingerprint().id(), expected_local);
    let chunker = setup::chunker_for(&config, &embedder).expect("chunker");
    assert!(
        !chunker
            .split("Hello world.", rag_ingest::chunk::ChunkFormat::Text)
            .is_empty()
    );
    let inputs = texts(3);
    assert_same_vectors(
        &embedder.embed(inputs.clone()).await.expect("remote"),
        &local(&inputs),
    );
    assert!(server.requests() >= 1);
}

#[test]
fn openai_config_fields_are_validated_by_name() {
    let base = openai_toml(
        "http://127.0.0.1:1",
        MODEL,
        384,
        "tokenizer = \"{tokenizer}\"\n",
    );
    let config = parse(&base).expect("valid");
    assert_eq!(
        config.embedder.tokenizer.as_deref(),
        Some(common::model_dir().join("tokenizer.json").as_path())
    );
    let cases = [
        (
            "base_url = \"http://127.0.0.1:1\"",
            "base_url = \"ftp://x\"",
            "embedder.base_url",
        ),
        ("model = \"all-minilm\"", "", "embedder.model"),
        ("dims = 384", "", "embedder.dims"),
        (
            "dims = 384",
            "dims = 384\ndimensions = 256",
            "embedder.dimensions",
        ),
        ("pooling = \"mean\"", "", "embedder.pooling"),
        ("normalized = true", "", "embedder.normalized"),
        (
            "dims = 384",
            "dims = 384\napi_key_env = \"sk-abc\"",
            "embedder.api_key_env",
        ),
        (
            "dims = 384",
            "dims = 384\nmax_request_tokens = 100",
            "embedder.max_request_tokens",
        ),
        (
            "dims = 384",
            "dims = 384\nbreaker_failures = 0",
            "embedder.breaker_failures",
        ),
        (
            "dims = 384",
            "dims = 384\nmax_concurrent_requests = 0",
            "embedder.max_concurrent_requests",
        ),
        ("tokenizer = ", "# tokenizer = ", "embedder.tokenizer"),
    ];
    for (from, to, field) in cases {
        let text = base.replace(from, to);
        match parse(&text) {
            Err(ConfigError::Field { field: f, .. }) => assert_eq!(f, field, "{from} -> {to}"),
            other => panic!("{from} -> {to}: expected a field error, got {other:?}"),
        }
    }
    // Remote-only fields are refused for candle.
    let candle = format!(
        "name = \"t\"\n[broker]\nurl = \"amqp://g:g@127.0.0.1:5672/%2f\"\nprefetch = 8\n[tenants]\nallowed = [\"acme\"]\n[chunking]\nmax_tokens = 64\noverlap = 8\n[embedder]\nkind = \"candle\"\nmodel_dir = \"{}\"\nbatch_size = 8\ndims = 384\n[store]\nkind = \"edge\"\npath = \"data\"\ncollection = \"c\"\n[limits]\nmax_document_bytes = 1000\n",
        common::model_dir().display()
    );
    match parse(&candle) {
        Err(ConfigError::Field { field, .. }) => assert_eq!(field, "embedder.dims"),
        other => panic!("expected a field error, got {other:?}"),
    }
}

/// A pipeline file with an openai `[embedder]`; `extra` is appended to that table
/// (`{tokenizer}` is replaced by the real model's tokenizer.json).
fn openai_toml(base_url: &str, fingerprint_model: &str, dims: usize, extra: &str) -> String {
    let extra = extra.replace(
        "{tokenizer}",
        &common::model_dir()
            .join("tokenizer.json")
            .display()
            .to_string(),
    );
    format!(
        r#"name = "t"
[broker]
url = "amqp://guest:guest@127.0.0.1:5672/%2f"
prefetch = 8
[tenants]
allowed = ["acme"]
[chunking]
max_tokens = 64
overlap = 8
[store]
kind = "edge"
path = "data"
collection = "c"
[limits]
max_document_bytes = 1000
[embedder]
kind = "openai"
batch_size = 8
base_url = "{base_url}"
model = "all-minilm"
fingerprint_model = "{fingerprint_model}"
dims = {dims}
pooling = "mean"
normalized = true
max_input_tokens = 256
{extra}"#
    )
}

fn parse(text: &str) -> Result<PipelineConfig, ConfigError> {
    PipelineConfig::from_toml_str(text, Path::new("test.toml"), Path::new("/base"), |_| None)
}

/// Provider down during a run through the real broker: the breaker opens, the worker stops
/// taking messages (they stay queued, none is dead-lettered, no attempt is burned), and once
/// the provider is back everything is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_outage_through_the_broker_pauses_the_worker_and_loses_nothing() {
    use rag_ingest::queue::{RunOptions, Submitter, Topology, Worker};
    use rag_ingest::store::VectorStore;

    let server = Server::start().await;
    server.set_default(Some(openai_error(503, "model is loading")));
    let mut o = options(&server);
    o.rate_limit_retries = 0;
    o.breaker = BreakerConfig {
        failure_threshold: 2,
        open_for: Duration::from_millis(500),
    };
    let remote = Arc::new(remote(o));
    let t = common::TestPipeline::new(
        "outage",
        "[retry]\nmax_attempts = 3\nin_process_retries = 1\nbackoff_min_ms = 5\nbackoff_max_ms = 10\ndelays_ms = [100]",
    );
    let chunker = setup::chunker(&t.config, &common::embedder()).expect("chunker");
    let store = Arc::new(setup::open_store(&t.config, &fingerprint()).expect("store opens"));
    let pipeline = rag_ingest::process::Pipeline::new(
        Arc::new(chunker),
        Arc::clone(&remote),
        Arc::clone(&store),
    );
    let docs = common::short_docs("acme", "outage", 5);
    let submitter = Submitter::connect(&t.config)
        .await
        .expect("RabbitMQ must be running");
    assert!(
        submitter
            .submit_all(&docs, |_, _| {})
            .await
            .iter()
            .all(Result::is_ok)
    );
    submitter.close().await;

    let worker = Worker::new(t.config.clone(), pipeline);
    let run = tokio::spawn(async move {
        worker
            .run(
                RunOptions {
                    exit_when_idle: true,
                    idle_grace: Duration::from_millis(300),
                },
                std::future::pending(),
            )
            .await
    });

    common::eventually(Duration::from_secs(30), "the breaker to open", || async {
        remote.circuit_breaker().state() == BreakerState::Open
    })
    .await;
    // While the provider is down, nothing reaches the DLQ and nothing is stored.
    let topology = Topology::new(&t.config);
    let outage_requests = server.requests();
    for _ in 0..3 {
        assert_eq!(
            common::queue_len(&topology.dlq()).await,
            0,
            "nothing dead-lettered during the outage"
        );
        assert_eq!(store.count(&docs[0].tenant, None).await.expect("count"), 0);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        server.requests() <= outage_requests + 6,
        "an open breaker sends only probes, not a storm: {} → {}",
        outage_requests,
        server.requests()
    );

    // The provider is back: everything is stored, still nothing dead-lettered.
    server.set_default(None);
    let report = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the worker drains after the outage")
        .expect("worker task")
        .expect("worker ran");
    assert_eq!(report.stored as usize, docs.len(), "{report:?}");
    assert_eq!(report.dead_lettered, 0, "{report:?}");
    assert_eq!(common::queue_len(&topology.dlq()).await, 0);
    for doc in &docs {
        assert!(
            store
                .first_chunk(&doc.tenant, &doc.document_id)
                .await
                .expect("read")
                .is_some(),
            "{} stored",
            doc.document_id
        );
    }
    t.delete_queues().await;
}

/// Runs `docs` through a worker whose embedder is `remote`, until the queues are drained.
async fn drain_with_remote(
    test: &str,
    remote: Arc<OpenAiEmbedder>,
    docs: &[rag_ingest::message::Document],
) -> (
    common::TestPipeline,
    rag_ingest::queue::WorkerReport,
    Arc<rag_ingest::store::EdgeStore>,
) {
    use rag_ingest::queue::Submitter;
    let t = common::TestPipeline::new(
        test,
        "[retry]\nmax_attempts = 2\nin_process_retries = 1\nbackoff_min_ms = 5\nbackoff_max_ms = 10\ndelays_ms = [100]",
    );
    let chunker = setup::chunker(&t.config, &common::embedder()).expect("chunker");
    let store = Arc::new(setup::open_store(&t.config, &fingerprint()).expect("store opens"));
    let pipeline =
        rag_ingest::process::Pipeline::new(Arc::new(chunker), remote, Arc::clone(&store));
    let submitter = Submitter::connect(&t.config)
        .await
        .expect("RabbitMQ must be running");
    assert!(
        submitter
            .submit_all(docs, |_, _| {})
            .await
            .iter()
            .all(Result::is_ok)
    );
    submitter.close().await;
    let (timeout, grace) = (Duration::from_secs(120), Duration::from_millis(300));
    let report = common::drain(&t.config, pipeline, timeout, grace).await;
    (t, report, store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthorized_provider_dead_letters_with_embedder_auth_and_no_retry_storm() {
    use rag_ingest::queue::{DlqFilter, inspect_dlq};
    use rag_ingest::store::VectorStore;
    let server = Server::start().await;
    server.set_default(Some(openai_error(401, "Incorrect API key provided")));
    let remote = Arc::new(remote(options(&server)));
    let docs = common::short_docs("acme", "auth", 2);
    let (t, report, store) = drain_with_remote("auth", remote, &docs).await;
    assert_eq!(report.dead_lettered, 2, "{report:?}");
    assert_eq!(report.retried, 0, "permanent: no delayed retry");
    assert_eq!(
        server.requests(),
        2,
        "one request per message, no retry storm"
    );
    let (_, entries) = inspect_dlq(&t.config, &DlqFilter::default())
        .await
        .expect("dlq");
    assert_eq!(entries.len(), 2);
    for e in &entries {
        assert_eq!(e.kind, "embedder_auth");
        let reason = e.error.as_deref().unwrap_or_default();
        assert!(reason.contains("Incorrect API key provided"), "{reason}");
        assert!(!reason.contains(SECRET));
    }
    assert_eq!(store.count(&docs[0].tenant, None).await.expect("count"), 0);
    t.delete_queues().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_dimension_dead_letters_with_dimension_mismatch_and_stores_nothing() {
    use rag_ingest::queue::{DlqFilter, inspect_dlq};
    use rag_ingest::store::VectorStore;
    let server = Server::start().await;
    server.set_default(Some(Answer::WrongDims(100)));
    let remote = Arc::new(remote(options(&server)));
    let docs = common::short_docs("acme", "dims", 1);
    let (t, report, store) = drain_with_remote("dims", remote, &docs).await;
    assert_eq!(report.dead_lettered, 1, "{report:?}");
    let (_, entries) = inspect_dlq(&t.config, &DlqFilter::default())
        .await
        .expect("dlq");
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].kind, "dimension_mismatch");
    assert_eq!(store.count(&docs[0].tenant, None).await.expect("count"), 0);
    t.delete_queues().await;
}
