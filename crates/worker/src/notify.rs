//! Cache-side detection in real time: Redis keyspace notifications for the watched keys.
//!
//! Every write, delete, expiry or eviction of a key matching an entity's pattern publishes an
//! event; the worker checks the key within milliseconds, without waiting for the sweep. A
//! stale value put back by another client (a slow reader, a bad deploy, a script) is found
//! this way even though stalewatch never saw the write.
//!
//! Pub/sub is lossy: a subscriber that falls behind is dropped by Redis, a reconnect misses
//! what was published meanwhile, FLUSHDB publishes nothing, and events carry no sequence
//! number. So every end of the stream counts as a gap (`stalewatch_notify_gaps_total`) and the
//! sweep, which stays on, covers it. A write stalewatch makes itself (refresh, repair) costs
//! one check, never a loop; the rewrite is noted on its incident first, so whichever check
//! sees the key agree credits the refresh or repair.

use std::{collections::BTreeMap, time::Duration};

use backon::Retryable;
use futures::StreamExt;
use stalewatch_core::{config::Config, incident::Source};
use tokio_util::sync::CancellationToken;

use crate::{handlers::Ctx, supervise};

/// Keyspace notification classes needed: K (keyspace channel), g (DEL, EXPIRE, RENAME...),
/// $ (strings), h (hashes), s (sets), x (expired), e (evicted).
const NEEDED_FLAGS: &str = "Kg$hsxe";

/// Events are collected this long, or up to `MAX_BATCH` keys, into one check per entity.
const WINDOW: Duration = Duration::from_millis(5);
const MAX_BATCH: usize = 1000;

/// Subscribes until `shutdown`, re-subscribing after every gap.
pub async fn run(ctx: Ctx, config: Config, shutdown: CancellationToken) {
    let once = || {
        let (ctx, config, shutdown) = (ctx.clone(), config.clone(), shutdown.clone());
        async move { listen(&ctx, &config, &shutdown).await }
    };
    let result = once
        .retry(supervise::restart_backoff())
        .when(|_| !shutdown.is_cancelled())
        .notify(|e, after| {
            ctx.metrics().notify_gaps.inc();
            tracing::warn!(error = %e, ?after, "keyspace notifications lost; the sweep covers the gap, re-subscribing");
        })
        .await;
    if let Err(e) = result {
        tracing::debug!(error = %e, "keyspace notifications stopped during shutdown");
    }
}

/// One subscription: returns Ok at shutdown, an error when the stream ends or fails.
async fn listen(ctx: &Ctx, config: &Config, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let client = stalewatch_core::tls::redis_client(config.cache_redis()?)?;
    let db = client.get_connection_info().redis_settings().db();
    enable(&client).await;
    let mut pubsub = client.get_async_pubsub().await?;
    let prefix = format!("__keyspace@{db}__:");
    for rows in ctx.checker.watched.sources() {
        pubsub
            .psubscribe(format!("{prefix}{}", rows.entity.key.pattern()))
            .await?;
    }
    tracing::info!("watching keyspace notifications");
    let mut events = pubsub.on_message();
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            msg = events.next() => msg,
        };
        let Some(first) = first else {
            anyhow::bail!("the notification stream ended");
        };
        let mut keys = vec![first.get_channel_name().to_string()];
        let deadline = tokio::time::Instant::now() + WINDOW;
        while keys.len() < MAX_BATCH {
            match tokio::time::timeout_at(deadline, events.next()).await {
                Ok(Some(msg)) => keys.push(msg.get_channel_name().to_string()),
                Ok(None) => anyhow::bail!("the notification stream ended"),
                Err(_) => break,
            }
        }
        check(ctx, &prefix, keys).await;
    }
}

/// Checks the keys of a batch of events, one check per entity.
async fn check(ctx: &Ctx, prefix: &str, channels: Vec<String>) {
    let mut by_entity: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for channel in channels {
        let Some(key) = channel.strip_prefix(prefix) else {
            continue;
        };
        if let Some((rows, _)) = ctx.checker.watched.owner(key) {
            by_entity
                .entry(rows.entity.name.clone())
                .or_default()
                .push(key.to_string());
        }
    }
    for (entity, keys) in by_entity {
        ctx.metrics()
            .notifications
            .with_label_values(&[&entity])
            .inc_by(keys.len() as u64);
        let Ok(_slot) = ctx.db_slots.acquire().await else {
            return;
        };
        if let Err(e) = ctx
            .checker
            .check_keys(&entity, &keys, Source::Notification, None)
            .await
        {
            // The sweep will see these keys; nothing to retry here.
            tracing::warn!(error = %e, entity, keys = keys.len(), "check after a notification failed");
        }
    }
}

/// Turns on the notification classes stalewatch needs, keeping any already on. A managed
/// Redis may refuse CONFIG SET: then it says what to set, and the sweep alone detects.
async fn enable(client: &redis::Client) {
    let result = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        let current: Vec<String> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("notify-keyspace-events")
            .query_async(&mut conn)
            .await?;
        let flags = current.get(1).cloned().unwrap_or_default();
        let merged = merge_flags(&flags);
        if merged != flags {
            redis::cmd("CONFIG")
                .arg("SET")
                .arg("notify-keyspace-events")
                .arg(&merged)
                .query_async::<()>(&mut conn)
                .await?;
            tracing::info!(from = flags, to = merged, "enabled keyspace notifications");
        }
        Ok::<(), redis::RedisError>(())
    }
    .await;
    if let Err(e) = result {
        tracing::warn!(error = %e, "could not enable keyspace notifications: set notify-keyspace-events to include {NEEDED_FLAGS} on this Redis; until then only the sweep sees writes by other clients");
    }
}

/// `current` plus every flag of `NEEDED_FLAGS` it lacks. Redis prints `A` for the class alias
/// `g$lshzxetd`, which covers every class but `K`/`E` here.
fn merge_flags(current: &str) -> String {
    let mut flags = current.to_string();
    for f in NEEDED_FLAGS.chars() {
        let covered = flags.contains(f) || (f != 'K' && flags.contains('A'));
        if !covered {
            flags.push(f);
        }
    }
    flags
}

#[cfg(test)]
mod tests {
    use super::merge_flags;

    #[test]
    fn flags_are_added_without_dropping_any() {
        assert_eq!(merge_flags(""), "Kg$hsxe");
        assert_eq!(merge_flags("Ex"), "ExKg$hse");
        assert_eq!(merge_flags("AK"), "AK");
        assert_eq!(merge_flags("KA"), "KA");
        assert_eq!(merge_flags("Kg$hsxe"), "Kg$hsxe");
    }
}
