//! Runs an apalis worker and restarts it when it dies.
//!
//! apalis-redis 1.0 ends a worker on any Redis error (a restart, a pause longer than the
//! response timeout), so a long-lived process has to bring its workers back by itself. Each
//! incarnation gets a fresh name: re-registering a name refreshes too soon after the last
//! heartbeat is refused (docs/apalis-redis.md).

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use apalis::prelude::{
    BackendExt, BoxDynError, Data, PollSnapshot, PollStrategy, WorkerBuilder, WorkerBuilderExt,
};
use apalis_redis::RedisStorage;
use backon::{ExponentialBuilder, Retryable};
use stalewatch_core::{jobs::Job, queue};
use tokio::sync::{futures::OwnedNotified, Notify};
use tokio_util::sync::CancellationToken;

use crate::handlers::Ctx;

/// How often an idle worker looks for due jobs.
const POLL_EVERY: Duration = Duration::from_millis(100);
/// Jobs fetched per poll.
const FETCH_BATCH: usize = 64;

/// Wakes the worker every `interval`, re-arming its timer each time it fires.
///
/// apalis's own interval strategy builds the next timer without polling it, so nothing
/// registers a wake-up; the worker then sleeps until its heartbeat (seen: stalls of up to
/// 30 s). Polling the new timer at once registers the wake-up.
///
/// `wake` fetches at once: the process queued jobs itself and knows they are there.
struct Every {
    interval: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
    wake: Arc<Notify>,
    woken: Pin<Box<OwnedNotified>>,
}

impl Every {
    fn new(interval: Duration, wake: Arc<Notify>) -> Self {
        Self {
            interval,
            sleep: Box::pin(tokio::time::sleep(interval)),
            woken: Box::pin(wake.clone().notified_owned()),
            wake,
        }
    }
}

impl PollStrategy for Every {
    fn poll_drive(&mut self, cx: &mut Context<'_>, _: &PollSnapshot) -> Poll<Option<()>> {
        if self.woken.as_mut().poll(cx).is_ready() {
            self.woken = Box::pin(self.wake.clone().notified_owned());
            let _ = self.woken.as_mut().poll(cx);
            return Poll::Ready(Some(()));
        }
        if self.sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.sleep
            .as_mut()
            .reset(tokio::time::Instant::now() + self.interval);
        let _ = self.sleep.as_mut().poll(cx);
        Poll::Ready(Some(()))
    }
}

/// The wake-up of `J`'s queue: only the check queue is fed by this process (change capture).
fn wake_of<J: Job>(ctx: &Ctx) -> Arc<Notify> {
    if J::QUEUE == stalewatch_core::jobs::CheckJob::QUEUE {
        ctx.check_wake.clone()
    } else {
        Arc::new(Notify::new())
    }
}

/// How a long-lived task that lost its connection comes back: quickly at first, then every
/// few seconds at most, forever, with jitter so many workers don't reconnect in step.
pub fn restart_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(5))
        .without_max_times()
        .with_jitter()
}

/// A name no other incarnation of any worker has used.
fn fresh_name(queue: &str) -> String {
    format!(
        "{queue}-{}-{}",
        std::process::id(),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// Runs workers for `J` until `shutdown`, restarting them with backoff when they die. At most
/// one fetch's worth of jobs is in flight at once; how many of those use PostgreSQL at once
/// is `Ctx::db_slots`.
pub async fn run<J, F, Fut>(ctx: Ctx, shutdown: CancellationToken, handler: F)
where
    J: Job,
    F: Fn(J, Data<Ctx>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), BoxDynError>> + Send + 'static,
{
    let once = || {
        let (ctx, shutdown, handler) = (ctx.clone(), shutdown.clone(), handler.clone());
        async move {
            let conn = ctx.queue_conn.clone();
            let config = queue::config::<J>(ctx.keys(), FETCH_BATCH);
            // A backlog larger than apalis's fetch can promote in one go would wedge it.
            queue::promote_due(&mut conn.clone(), &config).await?;
            let storage = RedisStorage::<J>::new(conn)
                .with_config(config)
                .poll_with_strategy(Every::new(POLL_EVERY, wake_of::<J>(&ctx)));
            let name = fresh_name(J::QUEUE);
            tracing::info!(worker = %name, "worker started");
            let stop = shutdown.clone();
            let signal = async move {
                stop.cancelled().await;
                Ok::<(), std::io::Error>(())
            };
            let (mut registry, ns, own) = (
                ctx.queue_conn.clone(),
                ctx.keys().queue(J::QUEUE),
                name.clone(),
            );
            let ran = WorkerBuilder::new(name)
                .backend(storage)
                .data(ctx)
                .concurrency(FETCH_BATCH)
                .build(handler)
                .run_until(signal)
                .await;
            // This incarnation's name is never used again: its registration would stay.
            if let Err(e) = queue::forget_worker(&mut registry, &ns, &own).await {
                tracing::debug!(worker = %own, error = %e, "worker registration left in Redis; upkeep removes it later");
            }
            ran?;
            if !shutdown.is_cancelled() {
                // The backend's stream ended on an error it swallowed: start over.
                anyhow::bail!("worker ended by itself");
            }
            anyhow::Ok(())
        }
    };
    let result = once
        .retry(restart_backoff())
        .when(|_| !shutdown.is_cancelled())
        .notify(|e, after| {
            ctx.metrics()
                .worker_restarts
                .with_label_values(&[J::QUEUE])
                .inc();
            tracing::warn!(queue = J::QUEUE, error = %e, ?after, "worker stopped; restarting");
        })
        .await;
    if let Err(e) = result {
        tracing::warn!(queue = J::QUEUE, error = %e, "worker stopped during shutdown");
    }
}
