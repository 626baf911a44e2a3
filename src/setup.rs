//! Builds a pipeline's components (model, chunker, store) from its configuration.

use std::sync::Arc;

use tokenizers::Tokenizer;

use crate::chunk::{ChunkError, Chunker};
use crate::config::{EmbedderConfig, EmbedderKind, PipelineConfig, StoreKind};
use crate::context::{ContextMode, Contextualizer};
use crate::embed::{
    AnyEmbedder, CandleEmbedder, EmbedError, Embedder, FailoverEmbedder, Fingerprint,
    OpenAiEmbedder, OpenAiOptions,
};
use crate::process::Pipeline;
use crate::shared::Redis;
use crate::shared::rate::SharedRateLimit;
use crate::sparse::SparseModel;
use crate::store::{
    BatchLimits, EdgeStore, QdrantOptions, QdrantStore, Store, StoreError, StoreFailure,
};

/// Why a component could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The model could not be loaded.
    #[error("embedder: {0}")]
    Embed(#[from] EmbedError),
    /// The chunking settings do not fit the model.
    #[error("chunking: {0}")]
    Chunk(#[from] ChunkError),
    /// The store could not be opened.
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

/// Builds the embedder `config.embedder` describes — a candle model, an OpenAI-compatible
/// provider, or either with its `[embedder.fallback]` — reading API keys from the process
/// environment.
///
/// # Errors
///
/// [`SetupError::Embed`]: a model cannot be loaded, an API key variable is unset, or the
/// fallback's fingerprint differs from the primary's ([`EmbedError::FingerprintMismatch`]
/// naming both; a candle model's fingerprint is only known once it is loaded, so this is
/// where that case is caught).
pub fn embedder(config: &PipelineConfig) -> Result<AnyEmbedder, SetupError> {
    embedder_with_env(config, &|name| std::env::var(name).ok())
}

/// Like [`embedder`], with environment lookups (API keys) answered by `env`.
///
/// # Errors
///
/// As [`embedder`].
pub fn embedder_with_env(
    config: &PipelineConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<AnyEmbedder, SetupError> {
    let primary = single_embedder(&config.embedder, env, shared_rate_limit(config)?)?;
    let Some(fallback) = &config.embedder.fallback else {
        return Ok(primary);
    };
    let fallback = single_embedder(fallback, env, None)?;
    // A fallback runs only while the primary fails: it does not keep a full pass's buffers.
    if let AnyEmbedder::Candle(candle) = &fallback {
        candle.release_buffers();
    }
    Ok(AnyEmbedder::Failover(Box::new(FailoverEmbedder::new(
        primary, fallback,
    )?)))
}

/// The Redis bucket of `embedder.rate_limit_shared`, when set.
///
/// Fails with [`EmbedError::Config`] if `[redis]` cannot be used (its URL is checked when
/// the config is loaded).
fn shared_rate_limit(config: &PipelineConfig) -> Result<Option<SharedRateLimit>, EmbedError> {
    if !config.embedder.rate_limit_shared {
        return Ok(None);
    }
    let redis = Redis::from_config(config)
        .map_err(|e| EmbedError::Config(format!("embedder.rate_limit_shared: {e}")))?
        .ok_or_else(|| EmbedError::Config("embedder.rate_limit_shared needs [redis]".into()))?;
    Ok(Some(SharedRateLimit::new(
        Arc::new(redis),
        config.embedder.max_requests_per_minute,
        config.embedder.max_tokens_per_minute,
    )))
}

/// One embedder table, ignoring its `fallback`; an openai one limited by `shared` (for
/// all workers together) when given.
fn single_embedder(
    config: &EmbedderConfig,
    env: &dyn Fn(&str) -> Option<String>,
    shared: Option<SharedRateLimit>,
) -> Result<AnyEmbedder, EmbedError> {
    match config.kind {
        EmbedderKind::Candle => Ok(AnyEmbedder::Candle(CandleEmbedder::load_with_precision(
            &config.model_dir,
            config.batch_size,
            config.precision,
        )?)),
        EmbedderKind::OpenAi => {
            let mut options = OpenAiOptions::from_config(config, env)?;
            options.shared_rate_limit = shared;
            Ok(AnyEmbedder::OpenAi(OpenAiEmbedder::new(options)?))
        }
    }
}

/// Builds the chunker for any embedder from [`embedder`], sized in its tokenizer's tokens.
///
/// # Errors
///
/// [`SetupError::Embed`] if the embedder has no tokenizer (a remote provider without
/// `embedder.tokenizer` and without a candle fallback), [`SetupError::Chunk`] if the
/// chunk sizes do not fit its `max_input_tokens`.
pub fn chunker_for(config: &PipelineConfig, embedder: &AnyEmbedder) -> Result<Chunker, SetupError> {
    let tokenizer = embedder.tokenizer().ok_or_else(|| {
        EmbedError::Config(
            "embedder.tokenizer is required to size chunks for a remote embedder without a candle fallback"
                .into(),
        )
    })?;
    Ok(Chunker::new(
        tokenizer.clone(),
        chunk_tokens(config),
        config.chunking.overlap,
        embedder.max_input_tokens(),
    )?)
}

/// What a collection for vectors of the embedder fingerprint `embedder` records: the dense
/// space and the keyword model ([`SparseModel::BM25`]); every collection rag-ingest creates
/// holds both.
pub fn collection_fingerprint(embedder: &Fingerprint) -> Fingerprint {
    embedder.clone().with_sparse(SparseModel::BM25.id())
}

/// Opens the embedded Edge store `config.store` names for vectors of `fingerprint`, with the
/// configured write caps. Blocks on disk I/O. Use [`open_vector_store`] to open whichever
/// store the config names (this one only handles `store.kind = "edge"`).
///
/// # Errors
///
/// [`SetupError::Store`]: the collection was built with another embedder
/// ([`StoreError::FingerprintMismatch`]), cannot be opened, or `store.kind` is not `edge`
/// ([`StoreError::Rejected`]).
pub fn open_store(
    config: &PipelineConfig,
    fingerprint: &Fingerprint,
) -> Result<EdgeStore, SetupError> {
    let fingerprint = collection_fingerprint(fingerprint);
    match config.store.kind {
        StoreKind::Edge => {
            Ok(
                EdgeStore::open(&config.store.path, &config.store.collection, &fingerprint)?
                    .with_batch_limits(BatchLimits::from(&config.store)),
            )
        }
        StoreKind::Qdrant => Err(StoreError::rejected(
            "store.kind = \"qdrant\" is opened with setup::open_vector_store (async), not \
             setup::open_store",
        )
        .into()),
    }
}

/// Opens the store `config.store` names (`edge` or `qdrant`) for vectors of `fingerprint`:
/// creates the collection if missing, checks the recorded embedder fingerprint.
///
/// # Errors
///
/// [`SetupError::Store`]: the collection was built with another embedder
/// ([`StoreError::FingerprintMismatch`], saying what differs), the store refuses the
/// configuration ([`StoreError::Rejected`]), or it cannot be reached or opened
/// ([`StoreError::Unavailable`]).
pub async fn open_vector_store(
    config: &PipelineConfig,
    fingerprint: &Fingerprint,
) -> Result<Store, SetupError> {
    match config.store.kind {
        StoreKind::Edge => {
            let collection = config.store.collection.clone();
            let config = config.clone();
            let fingerprint = fingerprint.clone();
            let store =
                on_blocking_pool(&collection, move || open_store(&config, &fingerprint)).await?;
            Ok(Store::Edge(store))
        }
        StoreKind::Qdrant => Ok(Store::from(
            QdrantStore::open(
                &QdrantOptions::from_config(&config.store),
                &config.store.collection,
                &collection_fingerprint(fingerprint),
            )
            .await?,
        )),
    }
}

/// Opens the existing collection `collection` of the store `config.store` names (its
/// `collection` setting aside) as it was created, without creating anything, and returns it
/// with the fingerprint it records: how `rag-ingest reindex` reads a collection of an older
/// layout.
///
/// # Errors
///
/// [`SetupError::Store`]: the collection does not exist or records no fingerprint
/// ([`StoreError::Rejected`]), or the store cannot be reached ([`StoreError::Unavailable`]).
pub async fn open_existing_store(
    config: &PipelineConfig,
    collection: &str,
) -> Result<(Store, Fingerprint), SetupError> {
    match config.store.kind {
        StoreKind::Edge => {
            let path = config.store.path.clone();
            let name = collection.to_owned();
            let limits = BatchLimits::from(&config.store);
            let opened = on_blocking_pool(collection, move || {
                let recorded = EdgeStore::recorded_fingerprint(&path, &name)?.ok_or_else(|| {
                    StoreError::rejected(format!(
                        "collection {name} does not exist in {} (no rag-ingest collection there)",
                        path.display()
                    ))
                })?;
                let store = EdgeStore::open(&path, &name, &recorded)?.with_batch_limits(limits);
                Ok::<_, StoreError>((Store::Edge(store), recorded))
            })
            .await?;
            Ok(opened)
        }
        StoreKind::Qdrant => {
            let (store, recorded) =
                QdrantStore::open_existing(&QdrantOptions::from_config(&config.store), collection)
                    .await?;
            Ok((Store::from(store), recorded))
        }
    }
}

/// Runs `open` (a blocking Qdrant Edge open of `collection`) on the blocking pool.
///
/// Fails with `open`'s error, or [`StoreError::Unavailable`] if the task panicked or was
/// cancelled.
async fn on_blocking_pool<T, E>(
    collection: &str,
    open: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, SetupError>
where
    T: Send + 'static,
    E: Into<SetupError> + Send + 'static,
{
    match tokio::task::spawn_blocking(open).await {
        Ok(result) => result.map_err(Into::into),
        Err(e) => Err(StoreError::Unavailable(StoreFailure::caused_by(
            "open",
            collection,
            format!("opening the edge store failed: {e}"),
            e,
        ))
        .into()),
    }
}

/// Like [`open_vector_store`], but while the store is unavailable (a Qdrant server starting,
/// restarting or loading its shards) keeps trying, with backoff from 200 ms to 5 s, until
/// `give_up` has passed; each failed try is logged. How a worker starts: it waits for its store
/// as it waits for its broker, instead of exiting while a server restarts.
///
/// # Errors
///
/// As [`open_vector_store`]: a permanent error at once, [`StoreError::Unavailable`] once
/// `give_up` has passed.
pub async fn open_vector_store_waiting(
    config: &PipelineConfig,
    fingerprint: &Fingerprint,
    give_up: std::time::Duration,
) -> Result<Store, SetupError> {
    use backon::Retryable;
    let started = std::time::Instant::now();
    let backoff = backon::ExponentialBuilder::new()
        .with_jitter()
        .with_min_delay(std::time::Duration::from_millis(200))
        .with_max_delay(std::time::Duration::from_secs(5))
        .without_max_times();
    (|| open_vector_store(config, fingerprint))
        .retry(backoff)
        .sleep(tokio::time::sleep)
        .when(|e| {
            matches!(e, SetupError::Store(e) if e.is_transient()) && started.elapsed() < give_up
        })
        .notify(|e, delay| {
            crate::telemetry::emit(crate::telemetry::events::StoreWaiting {
                error: e,
                retry_in: delay,
            });
        })
        .await
}

/// The write caps `config.store` sets (`max_batch_points`, `max_batch_bytes`); the same as
/// `BatchLimits::from(&config.store)`.
pub fn batch_limits(config: &PipelineConfig) -> BatchLimits {
    BatchLimits::from(&config.store)
}

/// The Qdrant server options `config.store` describes (the API key as resolved when the
/// config was loaded); the same as [`QdrantOptions::from_config`].
pub fn qdrant_options(config: &PipelineConfig) -> QdrantOptions {
    QdrantOptions::from_config(&config.store)
}

/// Builds the chunker for `embedder`'s tokenizer and `config.chunking` (chunks are
/// [`Contextualizer::budget_for`] tokens smaller than `chunking.max_tokens` when
/// `chunking.context` reserves room for a context).
pub fn chunker(config: &PipelineConfig, embedder: &CandleEmbedder) -> Result<Chunker, SetupError> {
    Ok(Chunker::new(
        embedder.tokenizer().clone(),
        chunk_tokens(config),
        config.chunking.overlap,
        embedder.max_input_tokens(),
    )?)
}

/// Builds the whole processing pipeline `config` describes, with the store it names; an
/// unavailable store is waited for up to `worker.reconnect_give_up_secs` (see
/// [`open_vector_store_waiting`]).
///
/// # Errors
///
/// [`SetupError`] if the model, the chunker or the store cannot be set up (see
/// [`open_vector_store`]).
pub async fn pipeline(config: &PipelineConfig) -> Result<Pipeline<AnyEmbedder, Store>, SetupError> {
    let embedder = embedder(config)?;
    let chunker = chunker_for(config, &embedder)?;
    let context = contextualizer(config, &embedder)?;
    let give_up = std::time::Duration::from_secs(config.worker.reconnect_give_up_secs);
    let store = open_vector_store_waiting(config, embedder.fingerprint(), give_up).await?;
    Ok(
        Pipeline::new(Arc::new(chunker), Arc::new(embedder), Arc::new(store))
            .with_context(context)
            .with_extract_limits(crate::extract::ExtractLimits::from_config(config)),
    )
}

/// Chunk size the chunker cuts to: `chunking.max_tokens` minus the tokens
/// `chunking.context` reserves for the context.
fn chunk_tokens(config: &PipelineConfig) -> usize {
    let chunking = &config.chunking;
    chunking
        .max_tokens
        .saturating_sub(Contextualizer::budget_for(
            chunking.context,
            chunking.max_tokens,
        ))
}

/// The contextualizer `chunking.context` asks for, counting in `embedder`'s tokens.
///
/// # Errors
///
/// [`SetupError::Embed`] if the embedder has no tokenizer (see [`chunker_for`]).
pub fn contextualizer(
    config: &PipelineConfig,
    embedder: &AnyEmbedder,
) -> Result<Contextualizer, SetupError> {
    if config.chunking.context == ContextMode::None {
        return Ok(Contextualizer::default());
    }
    let tokenizer = embedder.tokenizer().ok_or_else(|| {
        EmbedError::Config("embedder.tokenizer is required to size chunk contexts".into())
    })?;
    Ok(contextualizer_with(config, tokenizer))
}

/// The contextualizer `chunking.context` asks for, counting in `tokenizer`'s tokens (the
/// in-process model's: [`CandleEmbedder::tokenizer`]).
pub fn contextualizer_with(config: &PipelineConfig, tokenizer: &Tokenizer) -> Contextualizer {
    match config.chunking.context {
        ContextMode::None => Contextualizer::default(),
        mode => Contextualizer::new(mode, tokenizer, config.chunking.max_tokens),
    }
}
