//! Wiring: connections, the apalis workers, the sweep, the upkeep and the metrics endpoint.

use std::{sync::Arc, time::Duration};

use actix_web::{get, web, App, HttpResponse, HttpServer};
use anyhow::Context;
use stalewatch_core::{
    cache::{self, Cache},
    check::Checker,
    config::{ChangeCapture, Config},
    db,
    entity::OnChange,
    jobs::{CheckJob, ConfirmJob, SloJob},
    keys::Keys,
    metrics::Metrics,
    queue,
    watch::Watched,
};
use tokio_util::sync::CancellationToken;

use crate::{
    backstop, capture, handlers, handlers::Ctx, ingest, invalidate, notify, outbox, supervise,
    sweep::Sweeper, upkeep::Upkeep, watermark,
};

pub async fn connect(config: &Config) -> anyhow::Result<Ctx> {
    let pool = db::pool(&config.database_url, config.database_pool_size)?;
    let keys = Keys::new(config.key_prefix.clone());
    // Two roles, one Redis unless CACHE_REDIS_URL says otherwise: the application's cache,
    // whose keys are watched, and stalewatch's own (queues, leases, rounds, streams).
    let cache_conn = cache::open(&config.cache_redis()?, cache::SHARED)
        .await
        .with_context(|| {
            format!(
                "connecting to the watched cache at {}",
                stalewatch_core::redact::url(config.cache_redis_url())
            )
        })?;
    let cache = Cache::new(cache_conn, keys.clone());
    let queue_conn = queue::connect(config.redis()?).await.with_context(|| {
        format!(
            "connecting to stalewatch's Redis at {}",
            stalewatch_core::redact::url(&config.redis_url)
        )
    })?;
    let watched = Watched::configured(config, &pool)
        .await
        .context("reading the watched entities (ENTITIES)")?;
    let checker = Checker::new(
        config,
        pool,
        cache,
        Metrics::new(),
        queue_conn.clone(),
        Arc::new(watched),
    );
    Ok(Ctx {
        checker,
        queue_conn,
        db_slots: Arc::new(tokio::sync::Semaphore::new(config.job_db_slots())),
        check_wake: Arc::new(tokio::sync::Notify::new()),
        slo_windows: config.slo_windows.clone(),
    })
}

pub fn sweeper(ctx: &Ctx, config: &Config) -> Sweeper {
    Sweeper {
        // Rounds, leases and the rest between passes are stalewatch's: its own Redis.
        conn: ctx.queue_conn.clone(),
        ctx: ctx.clone(),
        batch: config.sweep_batch,
        shards: config.sweep_shards,
        concurrency: config.sweep_concurrency,
        lease_ttl: config.sweep_lease,
        name: format!(
            "{}-{}",
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ),
    }
}

#[get("/metrics")]
async fn render_metrics(m: web::Data<Metrics>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(m.render())
}

#[get("/healthz")]
async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

/// Runs until SIGTERM or Ctrl-C, then lets in-flight jobs finish and returns.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let ctx = connect(&config).await?;
    let missing = ctx.checker.watched.ingest_grants_missing();
    if !missing.is_empty() && config.ingest_consumers > 0 {
        let reasons: Vec<String> = missing.iter().map(ToString::to_string).collect();
        anyhow::bail!(
            "{} (or INGEST_CONSUMERS=0 for a worker that does not ingest)",
            reasons.join("; ")
        );
    }
    let metrics = ctx.checker.metrics.clone();
    let shutdown = CancellationToken::new();
    // Before "started" is logged: a SIGTERM that comes after that line, before the tasks are
    // spawned, must stop the worker gently, not kill it with the signal's default action.
    let stop = stop_signal()?;

    let server = {
        let m = metrics.clone();
        HttpServer::new(move || {
            App::new()
                .app_data(web::Data::new(m.clone()))
                .service(render_metrics)
                .service(healthz)
        })
        .disable_signals()
        .bind(&config.metrics_addr)
        .with_context(|| {
            format!(
                "binding METRICS_ADDR={} (another worker on this host? METRICS_ADDR=127.0.0.1:0 takes a free port)",
                config.metrics_addr
            )
        })?
    };
    let addrs = server.addrs();
    let server = server.run();
    let server_handle = server.handle();
    tracing::info!(metrics = ?addrs, "stalewatch-worker started");

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(supervise::run::<CheckJob, _, _>(
        ctx.clone(),
        shutdown.clone(),
        handlers::check,
    ));
    tasks.spawn(supervise::run::<SloJob, _, _>(
        ctx.clone(),
        shutdown.clone(),
        handlers::slo,
    ));
    tasks.spawn(supervise::run::<ConfirmJob, _, _>(
        ctx.clone(),
        shutdown.clone(),
        handlers::confirm,
    ));
    tasks.spawn(backstop::run(
        ctx.clone(),
        config.confirm_backstop,
        shutdown.clone(),
    ));
    if config.keyspace_notifications {
        tasks.spawn(notify::run(ctx.clone(), shutdown.clone()));
    }
    match config.change_capture {
        ChangeCapture::Logical => {
            tasks.spawn(capture::run(ctx.clone(), config.clone(), shutdown.clone()));
        }
        ChangeCapture::Outbox => {
            tasks.spawn(outbox::run(ctx.clone(), config.clone(), shutdown.clone()));
        }
        ChangeCapture::Off => {
            tracing::info!(
                "CHANGE_CAPTURE=off: changes made outside stalewatch are seen by the sweep"
            )
        }
    }
    let invalidating = ctx
        .checker
        .watched
        .sources()
        .iter()
        .any(|rows| rows.entity.on_change == OnChange::Invalidate)
        || !ctx.checker.watched.rules().is_empty();
    if invalidating && config.invalidation_consumers > 0 {
        tasks.spawn(invalidate::run(
            ctx.clone(),
            config.redis()?,
            config.cache_redis()?,
            config.database_url.clone(),
            config.invalidation_consumers,
            config.invalidation_claim_idle,
            shutdown.clone(),
        ));
    }
    if !ctx.checker.watched.ingest_plans().is_empty() && config.ingest_consumers > 0 {
        tasks.spawn(ingest::run(
            ctx.clone(),
            config.redis()?,
            config.database_url.clone(),
            ingest::Settings {
                consumers: config.ingest_consumers,
                batch: config.ingest_batch,
                claim_idle: config.ingest_claim_idle,
            },
            shutdown.clone(),
        ));
    }
    if !config.watermark_check.is_zero() {
        tasks.spawn(watermark::run(
            ctx.clone(),
            config.clone(),
            shutdown.clone(),
        ));
    }
    if config.sweep_interval.is_zero() {
        tracing::info!("SWEEP_INTERVAL_MS=0: periodic sweep disabled");
    } else {
        tasks.spawn(sweeper(&ctx, &config).run(config.sweep_interval, shutdown.clone()));
    }
    tasks.spawn(
        Upkeep::new(
            &config,
            ctx.queue_conn.clone(),
            ctx.keys().clone(),
            ctx.checker.pool.clone(),
            metrics.clone(),
            ctx.checker
                .watched
                .names()
                .into_iter()
                .map(String::from)
                .collect(),
        )
        .run(shutdown.clone()),
    );
    let server_task = tokio::spawn(server);

    stop.await;
    tracing::info!("shutting down: finishing in-flight jobs");
    shutdown.cancel();
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(30), drain)
        .await
        .is_err()
    {
        tracing::warn!("in-flight work did not finish within 30 s; exiting anyway");
    }
    server_handle.stop(true).await;
    let _ = server_task.await;
    tracing::info!("stopped");
    Ok(())
}

/// SIGTERM or Ctrl-C, with both handlers installed now: a signal that comes before the
/// future is awaited is kept, not lost to the default action.
fn stop_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}
