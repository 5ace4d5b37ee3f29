//! Change capture, the pure half: what a committed change means for the cache, and when to
//! check it.
//!
//! The worker reads committed changes of the watched tables from PostgreSQL (a logical
//! replication slot, decoded by [`crate::pgoutput`]). For each change, [`Router`] names the
//! cache keys of every entity on that table, from the old row and the new one (an update that
//! changes a templated column touches two keys). [`Settle`] holds each key back for the settle
//! delay, time for the application's own cache write to land, so that a check sees the cache
//! as the application left it; many changes to one key within the delay make one check. It
//! also says how far the slot may be acknowledged: never past a change whose check is not
//! queued yet, so a crash re-delivers it.

mod route;
mod settle;

pub use route::{Router, RuleHit, Touched, Unmapped};
pub use settle::{Commit, Due, Settle};
