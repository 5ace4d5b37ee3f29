//! Coalesces post-write checks. Every write asks for its item to be checked now and again after
//! POST_WRITE_CHECK_MS; the ids written within a few milliseconds travel together in one pair
//! of jobs, so heavy write traffic makes a few big jobs rather than one per write.

use std::{collections::BTreeSet, time::Duration};

use chrono::Utc;
use redis::aio::ConnectionManager;
use stalewatch_core::{
    incident::Source,
    jobs::{CheckJob, Job},
    keys::Keys,
    metrics::Metrics,
    queue,
};
use tokio::sync::mpsc;
use uuid::Uuid;

/// How long the first id of a batch waits for company.
const WINDOW: Duration = Duration::from_millis(5);
/// The most ids in one job.
const MAX_BATCH: usize = 1000;

/// The writers' end: cheap to clone, never blocks a request.
#[derive(Clone)]
pub struct CheckQueue {
    tx: mpsc::Sender<Uuid>,
    metrics: Metrics,
}

impl CheckQueue {
    /// Starts the background task that pushes the batches.
    pub fn start(conn: ConnectionManager, keys: Keys, metrics: Metrics, delay: Duration) -> Self {
        let (tx, rx) = mpsc::channel(100_000);
        tokio::spawn(run(rx, conn, keys, metrics.clone(), delay));
        Self { tx, metrics }
    }

    /// Asks for `id` to be checked. When the queue is full (Redis down for long), the check is
    /// dropped and counted: the backup sweep will still compare the item.
    pub fn request(&self, id: Uuid) {
        if self.tx.try_send(id).is_err() {
            self.metrics
                .jobs
                .with_label_values(&[CheckJob::NAME, "dropped"])
                .inc();
        }
    }
}

async fn run(
    mut rx: mpsc::Receiver<Uuid>,
    mut conn: ConnectionManager,
    keys: Keys,
    metrics: Metrics,
    delay: Duration,
) {
    while let Some(first) = rx.recv().await {
        let mut ids = BTreeSet::from([first]);
        let deadline = tokio::time::Instant::now() + WINDOW;
        while ids.len() < MAX_BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(id)) => {
                    ids.insert(id);
                }
                Ok(None) | Err(_) => break,
            }
        }
        let ids: Vec<Uuid> = ids.into_iter().collect();
        let later = Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default();
        let job = CheckJob::for_items(&keys, &ids, Source::WriteCheck);
        // The later check is rounded up to a whole second: apalis schedules in seconds and a
        // post-write check that runs early would only see the write still in flight.
        let later = later + chrono::Duration::seconds(1);
        let jobs = vec![(job.clone(), None), (job, Some(later))];
        match queue::push(&mut conn, &keys, jobs).await {
            Ok(()) => metrics
                .jobs
                .with_label_values(&[CheckJob::NAME, "pushed"])
                .inc_by(2),
            Err(e) => {
                metrics
                    .jobs
                    .with_label_values(&[CheckJob::NAME, "push_error"])
                    .inc();
                tracing::warn!(error = %e, "could not enqueue checks; the sweep will catch up");
            }
        }
    }
}
