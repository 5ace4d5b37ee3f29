//! stalewatch-core: everything the API and the worker share.
//!
//! The pure parts (`incident`, `compare`, `keys`, `config`, `jobs`) take plain data in and
//! give plain data out and are tested exhaustively; I/O lives at the edges: `db`
//! (PostgreSQL), `cache` (Redis), `queue` (apalis-redis), and `check` and `track`, which
//! wire the pure parts to them.

pub mod cache;
pub mod capture;
pub mod check;
pub mod cli;
pub mod cluster;
pub mod column;
pub mod compare;
pub mod config;
pub mod db;
pub mod entity;
pub mod incident;
pub mod ingest;
pub mod invalidation;
pub mod jobs;
pub mod keys;
pub mod lease;
pub mod logging;
pub mod metrics;
pub mod pgoutput;
pub mod queue;
pub mod rebuild;
pub mod redact;
pub mod repair;
pub mod rows;
pub mod shards;
pub mod slo;
pub mod slots;
pub mod tls;
pub mod track;
pub mod watch;
pub mod watermark;
