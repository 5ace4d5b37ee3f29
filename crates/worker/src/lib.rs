//! stalewatch-worker: apalis workers for check and confirm jobs, the backup sweep, and the
//! queue upkeep apalis-redis leaves to its users.

pub mod app;
pub mod backstop;
pub mod capture;
pub mod handlers;
pub mod hooks;
pub mod ingest;
pub mod invalidate;
pub mod notify;
pub mod outbox;
pub mod rebuild;
pub mod round;
pub mod stream;
pub mod supervise;
pub mod sweep;
pub mod upkeep;
pub mod watermark;
