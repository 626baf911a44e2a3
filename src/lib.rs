//! rag-ingest: a queue-driven ingestion worker for retrieval-augmented generation.
#![warn(missing_docs)]

pub mod breaker;
pub mod chunk;
pub mod config;
pub mod context;
pub mod doctor;
pub mod embed;
pub mod error;
pub mod extract;
pub mod fingerprint;
pub mod health;
pub mod lane;
pub mod language;
pub mod message;
pub mod meter;
pub mod process;
pub mod queue;
pub mod reindex;
pub mod retry;
pub mod search;
pub mod secret;
pub mod setup;
pub mod shared;
pub mod sparse;
pub mod store;
pub mod telemetry;
pub mod tenant;
pub mod validate;

/// The README's code blocks, compiled by `cargo test --doc` so its library example keeps
/// matching the API. Exists only while doc tests are collected.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
