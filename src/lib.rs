//! signalbox: verified, deduplicated customer signals from Slack, Pylon and signed webhooks.
//!
//! Flow: socket → verify (pure [`protocol`]) → durable inbox row ([`ingest`], [`store`]) → ack →
//! [`worker`] → signal + activity log. See ARCHITECTURE.md.

// These are developers' docs of an application, not a library's public API: they link to
// crate-private items, and CI builds them with `--document-private-items` so the links resolve.
#![allow(rustdoc::private_intra_doc_links)]

pub(crate) mod admin;
pub mod app;
pub mod cli;
pub mod clock;
pub mod config;
pub mod credentials;
pub mod crypto;
pub(crate) mod error;
pub mod http;
pub mod ids;
pub(crate) mod ingest;
pub(crate) mod metrics;
pub mod protocol;
pub mod sources;
pub mod state;
pub mod store;
pub mod worker;
