//! Injected inconsistencies for demos and tests (FAILURE_MODE). Each one makes a real
//! divergence that the tracker must find; none of them can crash the API.

use std::{collections::HashMap, sync::Arc, time::Duration};

use stalewatch_core::{cache::Cache, config::FailureMode};
use tokio::{sync::Mutex, task::AbortHandle};

/// Pending delayed overwrites by key, so a refresh (or a newer write) can cancel them.
#[derive(Clone)]
pub struct Injector {
    pub mode: FailureMode,
    pub delay: Duration,
    cache: Cache,
    ttl: Duration,
    pending: Arc<Mutex<HashMap<String, AbortHandle>>>,
}

impl Injector {
    pub fn new(mode: FailureMode, delay: Duration, cache: Cache, ttl: Duration) -> Self {
        Self {
            mode,
            delay,
            cache,
            ttl,
            pending: Arc::default(),
        }
    }

    /// FAILURE_MODE=delay: writes `old` back under `key` after the delay, as a slow writer
    /// would. Replaces any overwrite still pending for the key.
    pub async fn overwrite_later(&self, key: String, old: Vec<u8>) {
        let this = self.clone();
        let task_key = key.clone();
        let mut pending = self.pending.lock().await;
        let task = tokio::spawn(async move {
            tokio::time::sleep(this.delay).await;
            // Write while holding the lock: a concurrent `cancel` then waits for the write to
            // land, and the refresh that called it writes after us, never before.
            let mut pending = this.pending.lock().await;
            pending.remove(&task_key);
            match this.cache.set(&task_key, &old, this.ttl).await {
                Ok(()) => tracing::info!(key = %task_key, "injected stale overwrite"),
                Err(e) => tracing::warn!(key = %task_key, error = %e, "injected overwrite failed"),
            }
        });
        if let Some(previous) = pending.insert(key, task.abort_handle()) {
            previous.abort();
        }
    }

    /// Cancels the pending overwrite of `key`, if any. True when one was cancelled.
    pub async fn cancel(&self, key: &str) -> bool {
        match self.pending.lock().await.remove(key) {
            Some(handle) => {
                handle.abort();
                true
            }
            None => false,
        }
    }
}
