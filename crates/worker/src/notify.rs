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

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use backon::Retryable;
use futures::StreamExt;
use stalewatch_core::incident::Source;
use tokio_util::sync::CancellationToken;

use crate::{handlers::Ctx, supervise};

/// Keyspace notification classes needed: K (keyspace channel), g (DEL, EXPIRE, RENAME...),
/// $ (strings), h (hashes), s (sets), x (expired), e (evicted).
const NEEDED_FLAGS: &str = "Kg$hsxe";

/// Events are collected this long, or up to `MAX_BATCH` keys, into one check per entity.
const WINDOW: Duration = Duration::from_millis(5);
const MAX_BATCH: usize = 1000;

/// How often a cluster's primaries are read again: a failover or a resharding changes which
/// nodes publish the watched keys' events, and the subscriptions follow within this.
const REDISCOVER: Duration = Duration::from_secs(1);

/// Subscribes until `shutdown`, re-subscribing after every gap.
pub async fn run(ctx: Ctx, shutdown: CancellationToken) {
    let once = || {
        let (ctx, shutdown) = (ctx.clone(), shutdown.clone());
        async move { listen(&ctx, &shutdown).await }
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

/// One subscription on every node that publishes the watched keys' events (the one Redis, or
/// every primary of a cluster): returns Ok at shutdown, an error when a node's stream ends or
/// fails, or when the cluster's primaries change (a failover, a resharding).
async fn listen(ctx: &Ctx, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let cache = ctx.checker.cache.connection();
    let nodes = cache.primaries(true).await?;
    let mut streams = Vec::with_capacity(nodes.len());
    let mut prefix = String::new();
    for (name, info) in &nodes {
        let db = info.redis_settings().db();
        prefix = format!("__keyspace@{db}__:");
        let client = stalewatch_core::tls::redis_client(info)?;
        enable(&client, name).await;
        let mut pubsub = client.get_async_pubsub().await?;
        for rows in ctx.checker.watched.sources() {
            pubsub
                .psubscribe(format!("{prefix}{}", rows.entity.key.pattern()))
                .await?;
        }
        // A stream that ends says so (`None`), so the end of one node's is not lost among
        // the others'.
        let name = name.clone();
        streams.push(
            pubsub
                .into_on_message()
                .map(Some)
                .chain(futures::stream::once(async { None }))
                .map(move |msg| (name.clone(), msg))
                .boxed(),
        );
    }
    let watched: BTreeSet<String> = nodes.into_iter().map(|(name, _)| name).collect();
    tracing::info!(nodes = watched.len(), "watching keyspace notifications");
    let mut events = futures::stream::select_all(streams);
    let mut rediscover = tokio::time::interval(REDISCOVER);
    rediscover.tick().await;
    let next = |msg: Option<(String, Option<redis::Msg>)>| match msg {
        Some((_, Some(msg))) => Ok(msg.get_channel_name().to_string()),
        Some((node, None)) if node.is_empty() => {
            Err(anyhow::anyhow!("the notification stream ended"))
        }
        Some((node, None)) => Err(anyhow::anyhow!("the notification stream of {node} ended")),
        None => Err(anyhow::anyhow!("every notification stream ended")),
    };
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = rediscover.tick(), if cache.is_cluster() => {
                let now: BTreeSet<String> =
                    cache.primaries(true).await?.into_iter().map(|(name, _)| name).collect();
                if now != watched {
                    anyhow::bail!("the cluster's primaries changed from {watched:?} to {now:?}");
                }
                continue;
            }
            msg = events.next() => next(msg)?,
        };
        let mut keys = vec![first];
        let deadline = tokio::time::Instant::now() + WINDOW;
        while keys.len() < MAX_BATCH {
            match tokio::time::timeout_at(deadline, events.next()).await {
                Ok(msg) => keys.push(next(msg)?),
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

/// Turns on the notification classes stalewatch needs on a node (`name`: its address in a
/// cluster, where the setting is each node's own), keeping any already on. A managed Redis may
/// refuse CONFIG SET: then it says what to set, and the sweep alone detects.
async fn enable(client: &redis::Client, name: &str) {
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
            tracing::info!(
                node = name,
                from = flags,
                to = merged,
                "enabled keyspace notifications"
            );
        }
        Ok::<(), redis::RedisError>(())
    }
    .await;
    if let Err(e) = result {
        tracing::warn!(node = name, error = %e, "could not enable keyspace notifications: set notify-keyspace-events to include {NEEDED_FLAGS} on this Redis; until then only the sweep sees writes by other clients");
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
