//! `stalewatch-worker rebuild --entity NAME`: takes the entity's rebuild lock, keeps it
//! renewed while `stalewatch_core::rebuild` rewrites every key, shows the progress, and
//! releases the lock.

use std::{
    io::{IsTerminal, Write},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use stalewatch_core::{
    config::Config,
    rebuild::{self, Progress, Rebuild, Summary},
};

use crate::handlers::Ctx;

/// How often the progress is shown: redrawn on a terminal, a line in a log.
const TERMINAL_EVERY: Duration = Duration::from_millis(200);
const LOG_EVERY: Duration = Duration::from_secs(5);

/// Who a rebuild is, for whoever finds the lock taken: host, pid, start time.
fn holder() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    format!(
        "stalewatch-worker pid {} on {host} since {}",
        std::process::id(),
        chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ")
    )
}

/// Rebuilds `entity`, its progress on stderr; fails (with the holder) when another rebuild
/// of it runs.
pub async fn run(ctx: &Ctx, config: &Config, entity: &str) -> anyhow::Result<Summary> {
    let mut shown = Shown::new();
    let result = rebuild(ctx, config, entity, |p| shown.show(p)).await;
    shown.finish();
    result
}

/// [`run`] inside a running worker (`WATERMARK_REBUILD=on`): the progress goes to the log.
pub async fn run_logged(ctx: &Ctx, config: &Config, entity: &str) -> anyhow::Result<Summary> {
    let mut last = Instant::now();
    rebuild(ctx, config, entity, |p| {
        if last.elapsed() >= LOG_EVERY {
            last = Instant::now();
            tracing::info!(entity, progress = %p.line(), "rebuilding");
        }
    })
    .await
}

async fn rebuild(
    ctx: &Ctx,
    config: &Config,
    entity: &str,
    progress: impl FnMut(&Progress),
) -> anyhow::Result<Summary> {
    let checker = &ctx.checker;
    if checker.watched.source(entity).is_none() {
        anyhow::bail!(
            "no entity {entity:?} in the ENTITIES file (watched: {})",
            checker.watched.names().join(", ")
        );
    }
    // The lock is stalewatch's: its own Redis. The keys rebuilt are the cache's.
    let lease = rebuild::lock(
        &ctx.queue_conn,
        checker.cache.keys(),
        entity,
        config.rebuild_lock,
        &holder(),
    )
    .await?;
    let lease = Arc::new(lease);
    let lost = Arc::new(AtomicBool::new(false));
    let renewer = tokio::spawn(rebuild::keep_renewed(lease.clone(), lost.clone()));

    let redis = rebuild::connection(&config.cache_redis()?)
        .await
        .context("connecting to the watched cache for the rebuild")?;
    let job = Rebuild {
        checker,
        entity,
        batch: config.rebuild_batch,
        pause: config.rebuild_pause,
        redis,
    };
    let result = job.run(&|| lost.load(Ordering::Relaxed), progress).await;

    renewer.abort();
    let _ = renewer.await;
    if let Ok(lease) = Arc::try_unwrap(lease) {
        if let Err(e) = lease.release().await {
            tracing::warn!(error = %e, "could not release the rebuild lock; it expires by itself");
        }
    }
    Ok(result?)
}

/// The progress on stderr: a bar redrawn in place on a terminal, else a plain line now and
/// then (a log keeps every line).
struct Shown {
    terminal: bool,
    last: Option<Instant>,
    drawn: bool,
}

impl Shown {
    fn new() -> Shown {
        Shown {
            terminal: std::io::stderr().is_terminal(),
            last: None,
            drawn: false,
        }
    }

    fn show(&mut self, p: &Progress) {
        let every = if self.terminal {
            TERMINAL_EVERY
        } else {
            LOG_EVERY
        };
        if self.last.is_some_and(|at| at.elapsed() < every) {
            return;
        }
        self.last = Some(Instant::now());
        let mut err = std::io::stderr().lock();
        if self.terminal {
            let _ = write!(err, "\r\x1b[K{} {}", bar(p), p.line());
            self.drawn = true;
        } else {
            let _ = writeln!(err, "rebuild: {}", p.line());
        }
        let _ = err.flush();
    }

    fn finish(&mut self) {
        if self.drawn {
            eprintln!();
        }
    }
}

/// `[#########...........]`, 30 wide.
fn bar(p: &Progress) -> String {
    const WIDTH: u64 = 30;
    let filled = (p.done.min(p.estimated) * WIDTH)
        .checked_div(p.estimated)
        .unwrap_or(0) as usize;
    format!(
        "[{}{}]",
        "#".repeat(filled),
        ".".repeat(WIDTH as usize - filled)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_fills_with_the_progress_and_never_overflows() {
        let p = |done, estimated| Progress {
            done,
            estimated,
            elapsed: Duration::from_secs(1),
        };
        assert_eq!(bar(&p(0, 10)), format!("[{}]", ".".repeat(30)));
        assert_eq!(
            bar(&p(5, 10)),
            format!("[{}{}]", "#".repeat(15), ".".repeat(15))
        );
        assert_eq!(bar(&p(20, 10)), format!("[{}]", "#".repeat(30)));
        assert_eq!(bar(&p(3, 0)), format!("[{}]", ".".repeat(30)));
    }
}
