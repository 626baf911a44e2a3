//! `rag-ingest doctor`: checks a pipeline's config, broker, model and store one by one and
//! says how to fix what fails.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use crate::config::PipelineConfig;
use crate::embed::Embedder;
use crate::queue::Topology;
use crate::setup;

/// The outcome of one check.
#[derive(Debug, Clone)]
pub struct Check {
    /// Short name: `config`, `broker`, `model`, `store`.
    pub name: &'static str,
    /// Whether it passed.
    pub ok: bool,
    /// What was found.
    pub detail: String,
    /// How to fix it (failed checks only).
    pub hint: Option<String>,
    /// What works but should be changed (passed checks only), e.g. a Qdrant server older
    /// than recommended.
    pub warning: Option<String>,
}

impl Check {
    fn pass(name: &'static str, detail: impl Into<String>) -> Self {
        Check {
            name,
            ok: true,
            detail: detail.into(),
            hint: None,
            warning: None,
        }
    }

    fn warn(mut self, warning: Option<String>) -> Self {
        self.warning = warning;
        self
    }

    fn fail(name: &'static str, detail: impl Into<String>, hint: impl Into<String>) -> Self {
        Check {
            name,
            ok: false,
            detail: detail.into(),
            hint: Some(hint.into()),
            warning: None,
        }
    }

    /// One line: `✓ name: detail` (followed by `    warning: …` on a second line when there
    /// is a warning) or `✗ name: detail` followed by `    fix: hint`.
    pub fn line(&self) -> String {
        match (&self.hint, &self.warning) {
            (None, None) => format!("✓ {}: {}", self.name, self.detail),
            (None, Some(w)) => format!("✓ {}: {}\n    warning: {w}", self.name, self.detail),
            (Some(h), _) => format!("✗ {}: {}\n    fix: {h}", self.name, self.detail),
        }
    }
}

/// How long one check may wait for the broker, the model or the store (beyond the broker's
/// own [`crate::queue::CONNECT_TIMEOUT`] per URL) before it fails as unanswered: `doctor`
/// always answers, even when a service accepts a connection and then goes silent.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs `check`, or fails the check `name` if it has not answered within `limit`.
async fn within(name: &'static str, limit: Duration, check: impl Future<Output = Check>) -> Check {
    match tokio::time::timeout(limit, check).await {
        Ok(done) => done,
        Err(_) => Check::fail(
            name,
            format!("no answer within {} s", limit.as_secs()),
            "the service accepted the request and then went silent: check its health and logs (RabbitMQ: rabbitmq-diagnostics status; Qdrant: its /readyz), then run doctor again",
        ),
    }
}

/// Runs every check for the pipeline file at `path`. Never fails and never waits forever:
/// each problem, including a check that does not answer within [`CHECK_TIMEOUT`], is a failed
/// [`Check`]. Checks that depend on a failed one are skipped.
pub async fn run(path: &Path) -> Vec<Check> {
    let mut checks = Vec::new();
    let config = match PipelineConfig::load(path) {
        Ok(c) => {
            checks.push(Check::pass(
                "config",
                format!("{} is valid", path.display()),
            ));
            c
        }
        Err(e) => {
            checks.push(Check::fail(
                "config",
                e.to_string(),
                "correct the named field (every field is documented in docs/configuration.md)",
            ));
            return checks;
        }
    };
    checks.push(broker(&config).await);
    let embedder = match setup::embedder(&config) {
        Ok(e) => e,
        Err(e) => {
            checks.push(Check::fail(
                "model",
                e.to_string(),
                "run scripts/fetch-model.sh, or point embedder.model_dir (or RAG_INGEST_MODEL_DIR) at a sentence-transformers model directory; for a remote provider set the variable named by embedder.api_key_env",
            ));
            return checks;
        }
    };
    checks.push(within("model", CHECK_TIMEOUT, model(&embedder)).await);
    checks.push(
        within(
            "store",
            CHECK_TIMEOUT,
            store(&config, embedder.fingerprint()),
        )
        .await,
    );
    checks
}

async fn broker(config: &PipelineConfig) -> Check {
    let url = config.redacted_amqp_url();
    let conn = match crate::queue::Endpoints::from_config(&config.broker)
        .connect(
            lapin::ConnectionProperties::default(),
            crate::queue::CONNECT_TIMEOUT,
        )
        .await
    {
        Ok((c, _)) => c,
        Err(e) => {
            return Check::fail(
                "broker",
                e.to_string(),
                "start RabbitMQ (scripts/ensure-rabbitmq.sh) or fix broker.url / RAG_INGEST_AMQP_URL (and broker.tls_ca_file for amqps://)",
            );
        }
    };
    let topology = Topology::new(config);
    let declared = async {
        let result = match conn.create_channel().await {
            Ok(ch) => {
                let declared = topology.declare(&conn, &ch).await;
                // Closed (and its close-ok awaited) before the connection: dropping it would
                // send its close concurrently with the connection's, a race in which the
                // client logs a connection error on every healthy run.
                if ch.status().connected() {
                    crate::queue::close_channel(&ch, "doctor").await;
                }
                declared.map_err(|e| e.to_string())
            }
            Err(e) => Err(e.to_string()),
        };
        crate::queue::close_connection(&conn, "doctor").await;
        match result {
            Ok(()) => Check::pass(
                "broker",
                format!("{url}: topology of {} is in place", topology.main_queue()),
            ),
            Err(e) => Check::fail(
                "broker",
                e,
                "see \"Queue topology\" in docs/messages.md for migrating queues declared with other arguments",
            ),
        }
    };
    within("broker", CHECK_TIMEOUT, declared).await
}

async fn model(embedder: &crate::embed::AnyEmbedder) -> Check {
    let fp = embedder.fingerprint().id();
    match embedder
        .embed(vec!["rag-ingest doctor checks the model.".to_string()])
        .await
    {
        Ok(v) if v.len() == 1 && v[0].len() == embedder.fingerprint().dims => {
            let precision = match embedder {
                crate::embed::AnyEmbedder::Candle(candle) => {
                    let choice = candle.precision();
                    format!(
                        " (precision {}, requested {}: {})",
                        choice.running.as_str(),
                        choice.requested.as_str(),
                        choice.reason
                    )
                }
                _ => String::new(),
            };
            Check::pass("model", format!("{fp} embedded a test sentence{precision}"))
        }
        Ok(v) => Check::fail(
            "model",
            format!(
                "{fp} returned {} vector(s) of {} dimension(s)",
                v.len(),
                v.first().map_or(0, Vec::len)
            ),
            "the model directory is inconsistent: fetch it again with scripts/fetch-model.sh",
        ),
        Err(e) => Check::fail(
            "model",
            e.to_string(),
            "check the model files and available memory",
        ),
    }
}

async fn store(config: &PipelineConfig, fingerprint: &crate::embed::Fingerprint) -> Check {
    match setup::open_vector_store(config, fingerprint).await {
        Ok(store) => {
            let (server, warning) = match &store {
                crate::store::Store::Qdrant(qdrant) => server_version(qdrant.server_version()),
                crate::store::Store::Edge(_) => (String::new(), None),
            };
            Check::pass(
                "store",
                format!(
                    "collection {} opens with embedder {}{server}",
                    config.store.collection,
                    fingerprint.id()
                ),
            )
            .warn(warning)
        }
        Err(e) => Check::fail(
            "store",
            e.to_string(),
            "a fingerprint mismatch needs another store.collection (or re-ingesting into a new one); a lock error means a worker holds the embedded store — stop it or check a running worker's /readyz instead; an unsupported Qdrant server needs an upgrade",
        ),
    }
}

/// The store check's words on a Qdrant server's `version`: a suffix for its detail, and a
/// warning when the version is older than recommended.
fn server_version(version: Option<&str>) -> (String, Option<String>) {
    use crate::store::{OUTDATED_SERVER_RISK, SAFE_SERVER_VERSION, ServerSupport};
    let Some(version) = version else {
        return (String::new(), None);
    };
    let warning = (ServerSupport::of(version) == ServerSupport::Outdated).then(|| {
        format!(
            "Qdrant {version} is older than {}.{}: {OUTDATED_SERVER_RISK}; upgrade it",
            SAFE_SERVER_VERSION.0, SAFE_SERVER_VERSION.1
        )
    });
    (format!(" on Qdrant server {version}"), warning)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_check_that_never_answers_fails_at_its_deadline() {
        let started = tokio::time::Instant::now();
        let check = within("store", Duration::from_secs(7), std::future::pending()).await;
        assert!(!check.ok);
        assert_eq!(check.name, "store");
        assert!(check.hint.is_some());
        assert!(check.detail.contains("7 s"), "{}", check.detail);
        assert_eq!(started.elapsed(), Duration::from_secs(7));
    }

    #[test]
    fn an_outdated_qdrant_server_passes_with_a_warning() {
        let (detail, warning) = server_version(Some("1.18.2"));
        assert!(detail.contains("1.18.2"), "{detail}");
        let check = Check::pass("store", detail).warn(warning);
        assert!(check.ok);
        assert!(check.warning.is_some());
        assert!(check.line().starts_with('✓'), "{}", check.line());
        assert_eq!(server_version(Some("1.19.0")).1, None);
        assert_eq!(server_version(Some("dev")).1, None);
        assert_eq!(server_version(None), (String::new(), None));
    }

    #[tokio::test]
    async fn a_check_that_answers_in_time_is_returned_as_it_is() {
        let check = within("model", CHECK_TIMEOUT, async {
            Check::pass("model", "fine")
        })
        .await;
        assert!(check.ok);
        assert_eq!(check.detail, "fine");
    }
}
