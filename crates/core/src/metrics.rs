//! Prometheus metrics shared by both binaries. Names follow Prometheus conventions
//! (`_total` counters, base units); the README lists each one.

use prometheus::{
    core::Collector, proto::MetricType, Encoder, Histogram, HistogramOpts, HistogramVec,
    IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// All of stalewatch's metrics, registered in their own registry.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// Cache-aside reads by result: hit, miss, error.
    pub cache_requests: IntCounterVec,
    /// Incident state changes; from is "none" when an incident opens.
    pub transitions: IntCounterVec,
    /// Open incidents by state, recomputed from PostgreSQL so it is right after a restart.
    pub open_incidents: IntGaugeVec,
    /// Comparisons by source (write_check, confirm, sweep, cdc, manual) and verdict kind.
    pub checks: IntCounterVec,
    /// Time from detection to confirmation.
    pub time_to_confirm: Histogram,
    /// Time from detection to resolution (or transient closure), by final state.
    pub incident_duration: HistogramVec,
    /// Items compared by the sweep.
    pub sweep_items: IntCounterVec,
    /// Duration of complete sweep rounds, observed by the worker that completed each.
    pub sweep_duration: Histogram,
    /// Rows counted so far in the deployment's sweep round in progress (read from Redis).
    pub sweep_position: IntGauge,
    /// Jobs by type and outcome (ok, error, retried).
    pub jobs: IntCounterVec,
    /// apalis workers restarted after they stopped on an error, by queue.
    pub worker_restarts: IntCounterVec,
    /// Jobs waiting, by queue and kind (pending, scheduled).
    pub queue_depth: IntGaugeVec,
    /// Jobs that used up their attempts, by queue, until removed after their retention.
    pub dead_jobs: IntGaugeVec,
    /// Observations that arrived out of order and changed nothing, by reason.
    pub refused: IntCounterVec,
    /// Seconds since the deployment last completed a sweep pass (read from Redis, so every
    /// worker reports the same; counted from the worker's start until a first pass ends).
    pub sweep_age: IntGauge,
    /// Sweep rounds this process completed (it recorded the last shard's last page).
    pub sweep_rounds: IntCounter,
    /// When the deployment's sweep round in progress started (Unix seconds; 0: none is).
    pub sweep_round_started: IntGauge,
    /// The round in progress's shards, total and done: its coverage.
    pub sweep_round_shards: IntGaugeVec,
    /// Rows the last completed round counted, each once (read from Redis).
    pub sweep_last_round_items: IntGauge,
    /// Cache keys rewritten from PostgreSQL by REPAIR_POLICY or a refresh, by outcome.
    pub repairs: IntCounterVec,
    /// Closed incidents deleted after INCIDENT_RETENTION.
    pub incidents_deleted: IntCounter,
    /// Keyspace notifications of watched keys, by entity.
    pub notifications: IntCounterVec,
    /// Times the keyspace-notification stream ended or failed (events may have been missed).
    pub notify_gaps: IntCounter,
    /// Row changes of watched tables read from the replication slot, by entity.
    pub capture_changes: IntCounterVec,
    /// Keys whose check was queued by change capture, by entity.
    pub capture_keys: IntCounterVec,
    /// Changes whose key could not be derived from the stream (see docs/change-capture.md).
    pub capture_unmapped: IntCounterVec,
    /// Commit of a change to its check being queued (settle delay included).
    pub capture_delay: Histogram,
    /// Commit of a transaction to its reading from the slot: the part of `capture_delay` spent
    /// in PostgreSQL, the network and the reader's wake-up, so a slow server can be told from
    /// a slow reader.
    pub capture_read_delay: Histogram,
    /// WAL the slot holds back, in bytes (-1 when the slot does not exist).
    pub capture_retained_wal: IntGauge,
    /// Times the slot was found dropped, lost or re-created: changes may have been missed.
    pub capture_slot_lost: IntCounter,
    /// 1 while this process reads the slot.
    pub capture_active: IntGauge,
    /// Changed keys probed for the consistency SLO, by entity, window and result
    /// (consistent, inconsistent).
    pub slo_changes: IntCounterVec,
    /// Invalidation entries appended to the stream by the capture reader.
    pub invalidations_published: IntCounter,
    /// Keys deleted by invalidation consumers.
    pub keys_invalidated: IntCounter,
    /// Commit of a change to its keys' UNLINK.
    pub invalidation_delay: Histogram,
    /// Entries claimed from a consumer that left them pending.
    pub invalidations_reclaimed: IntCounter,
    /// Entries moved to the dead-letter stream.
    pub invalidations_dead: IntCounter,
    /// The invalidation stream's length and the group's pending entries (consumer lag).
    pub invalidation_stream_length: IntGauge,
    pub invalidations_pending: IntGauge,
    /// Pattern deletes (`SCAN MATCH` then `UNLINK`) of invalidation rules, and the keys they
    /// removed.
    pub invalidation_pattern_scans: IntCounter,
    pub invalidation_pattern_keys: IntCounter,
    /// Keys a rebuild wrote, by entity and outcome (written, skipped_newer, deleted,
    /// undecodable).
    pub rebuild_keys: IntCounterVec,
    /// A rebuild's progress, by entity: keys done, and the estimate of the total.
    pub rebuild_progress: IntGaugeVec,
    /// Ingest records written to both stores and acknowledged, by entity.
    pub ingest_records: IntCounterVec,
    /// Ingest batches by entity and outcome: written, or failed (left pending, retried).
    pub ingest_batches: IntCounterVec,
    /// Ingest records moved to the entity's dead-letter stream.
    pub ingest_dead: IntCounterVec,
    /// Ingest records claimed from a consumer that left them pending.
    pub ingest_reclaimed: IntCounterVec,
    /// Ingest streams' length and their group's unacknowledged records (consumer lag).
    pub ingest_stream_length: IntGaugeVec,
    pub ingest_pending: IntGaugeVec,
    /// How far each ingesting entity's watermark trails its table's highest version (-1: no
    /// watermark while the table has rows).
    pub watermark_lag: IntGaugeVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: Vec<f64>| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
                .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let plain_histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let seconds = vec![
            0.1, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0,
        ];
        let open_incidents = IntGaugeVec::new(
            Opts::new(
                "stalewatch_open_incidents",
                "Open incidents by entity and state",
            ),
            &["entity", "state"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(open_incidents.clone()))
            .expect("unique metric");
        let queue_depth = IntGaugeVec::new(
            Opts::new("stalewatch_queue_depth", "Jobs waiting, by queue and kind"),
            &["queue", "kind"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(queue_depth.clone()))
            .expect("unique metric");
        let plain_counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let dead_jobs = IntGaugeVec::new(
            Opts::new(
                "stalewatch_dead_jobs",
                "Jobs that used up their attempts, by queue",
            ),
            &["queue"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(dead_jobs.clone()))
            .expect("unique metric");
        let incidents_deleted = IntCounter::new(
            "stalewatch_incidents_deleted_total",
            "Closed incidents deleted after INCIDENT_RETENTION",
        )
        .expect("valid metric");
        registry
            .register(Box::new(incidents_deleted.clone()))
            .expect("unique metric");
        let notify_gaps = IntCounter::new(
            "stalewatch_notify_gaps_total",
            "Times the keyspace-notification stream ended or failed",
        )
        .expect("valid metric");
        registry
            .register(Box::new(notify_gaps.clone()))
            .expect("unique metric");
        let sweep_position = IntGauge::new(
            "stalewatch_sweep_position_items",
            "Rows counted so far in the deployment's sweep round in progress",
        )
        .expect("valid metric");
        registry
            .register(Box::new(sweep_position.clone()))
            .expect("unique metric");
        let capture_slot_lost = IntCounter::new(
            "stalewatch_capture_slot_lost_total",
            "Times the replication slot was found dropped, lost or re-created",
        )
        .expect("valid metric");
        registry
            .register(Box::new(capture_slot_lost.clone()))
            .expect("unique metric");
        let sweep_round_shards = IntGaugeVec::new(
            Opts::new(
                "stalewatch_sweep_round_shards",
                "Shards of the sweep round in progress, by state (total, done)",
            ),
            &["state"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(sweep_round_shards.clone()))
            .expect("unique metric");
        let gauges = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        Self {
            watermark_lag: gauges(
                "stalewatch_watermark_lag",
                "How far an entity's watermark trails its table's highest version (-1: none)",
                &["entity"],
            ),
            ingest_records: counter(
                "stalewatch_ingest_records_total",
                "Ingest records written to the table and the cache, then acknowledged",
                &["entity"],
            ),
            ingest_batches: counter(
                "stalewatch_ingest_batches_total",
                "Ingest batches by outcome: written, or failed (left pending and retried)",
                &["entity", "outcome"],
            ),
            ingest_dead: counter(
                "stalewatch_ingest_dead_total",
                "Ingest records moved to the dead-letter stream",
                &["entity"],
            ),
            ingest_reclaimed: counter(
                "stalewatch_ingest_reclaimed_total",
                "Ingest records claimed from a consumer that left them pending",
                &["entity"],
            ),
            ingest_stream_length: gauges(
                "stalewatch_ingest_stream_length",
                "Entries in an ingest stream",
                &["entity"],
            ),
            ingest_pending: gauges(
                "stalewatch_ingest_pending",
                "Ingest records read but not yet acknowledged",
                &["entity"],
            ),
            sweep_rounds: plain_counter(
                "stalewatch_sweep_rounds_total",
                "Sweep rounds this process completed",
            ),
            sweep_round_started: gauge(
                "stalewatch_sweep_round_started_seconds",
                "Unix time the sweep round in progress started; 0 when none is",
            ),
            sweep_round_shards,
            sweep_last_round_items: gauge(
                "stalewatch_sweep_last_round_items",
                "Rows the last completed sweep round counted",
            ),
            capture_changes: counter(
                "stalewatch_capture_changes_total",
                "Row changes of watched tables read from the replication slot",
                &["entity"],
            ),
            capture_keys: counter(
                "stalewatch_capture_keys_total",
                "Keys whose check was queued by change capture",
                &["entity"],
            ),
            capture_unmapped: counter(
                "stalewatch_capture_unmapped_total",
                "Changes whose cache key could not be derived from the stream",
                &["entity"],
            ),
            capture_delay: plain_histogram(
                "stalewatch_capture_delay_seconds",
                "Commit of a change to its check being queued, settle delay included",
                vec![
                    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.1025, 0.105,
                    0.1075, 0.11, 0.125, 0.15, 0.2, 0.5, 1.0, 2.5, 10.0,
                ],
            ),
            capture_read_delay: plain_histogram(
                "stalewatch_capture_read_delay_seconds",
                "Commit of a transaction to its reading from the replication slot",
                vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 1.0,
                    10.0,
                ],
            ),
            capture_retained_wal: gauge(
                "stalewatch_capture_retained_wal_bytes",
                "WAL the replication slot holds back (-1: no slot)",
            ),
            capture_active: gauge(
                "stalewatch_capture_active",
                "1 while this process reads the replication slot",
            ),
            capture_slot_lost,
            invalidations_published: plain_counter(
                "stalewatch_invalidations_published_total",
                "Invalidation entries appended to the stream",
            ),
            keys_invalidated: plain_counter(
                "stalewatch_keys_invalidated_total",
                "Keys deleted by invalidation consumers",
            ),
            invalidation_delay: plain_histogram(
                "stalewatch_invalidation_delay_seconds",
                "Commit of a change to its keys being deleted",
                // Fine around 10 ms, the latency the invalidation path is held to.
                vec![
                    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 10.0,
                ],
            ),
            invalidations_reclaimed: plain_counter(
                "stalewatch_invalidations_reclaimed_total",
                "Invalidation entries claimed from a consumer that left them pending",
            ),
            invalidations_dead: plain_counter(
                "stalewatch_invalidations_dead_total",
                "Invalidation entries moved to the dead-letter stream",
            ),
            invalidation_stream_length: gauge(
                "stalewatch_invalidation_stream_length",
                "Entries in the invalidation stream",
            ),
            invalidations_pending: gauge(
                "stalewatch_invalidations_pending",
                "Invalidation entries read but not yet acknowledged",
            ),
            invalidation_pattern_scans: plain_counter(
                "stalewatch_invalidation_pattern_scans_total",
                "Pattern deletes (SCAN MATCH, then UNLINK) done by invalidation consumers",
            ),
            invalidation_pattern_keys: plain_counter(
                "stalewatch_invalidation_pattern_keys_total",
                "Keys removed by pattern deletes of invalidation rules",
            ),
            rebuild_keys: counter(
                "stalewatch_rebuild_keys_total",
                "Keys written by rebuilds, by entity and outcome",
                &["entity", "outcome"],
            ),
            rebuild_progress: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "stalewatch_rebuild_progress_keys",
                        "A rebuild's keys done and estimated total, by entity",
                    ),
                    &["entity", "kind"],
                )
                .expect("valid metric");
                registry
                    .register(Box::new(g.clone()))
                    .expect("unique metric");
                g
            },
            slo_changes: counter(
                "stalewatch_slo_changes_total",
                "Changed keys probed a window after their change, by whether the cache agreed",
                &["entity", "window", "result"],
            ),
            cache_requests: counter(
                "stalewatch_cache_requests_total",
                "Cache-aside reads by result",
                &["result"],
            ),
            transitions: counter(
                "stalewatch_incident_transitions_total",
                "Incident state changes",
                &["entity", "from", "to"],
            ),
            checks: counter(
                "stalewatch_checks_total",
                "Comparisons of a DB row with its cached value",
                &["entity", "source", "verdict"],
            ),
            time_to_confirm: plain_histogram(
                "stalewatch_time_to_confirm_seconds",
                "Time from detection to confirmation",
                seconds.clone(),
            ),
            incident_duration: histogram(
                "stalewatch_incident_duration_seconds",
                "Time from detection to closure",
                &["state"],
                seconds.clone(),
            ),
            sweep_items: counter(
                "stalewatch_sweep_items_total",
                "Keys compared by the backup sweep",
                &["entity", "verdict"],
            ),
            sweep_duration: plain_histogram(
                "stalewatch_sweep_duration_seconds",
                "Duration of complete sweep rounds",
                seconds,
            ),
            jobs: counter(
                "stalewatch_jobs_total",
                "Background jobs by type and outcome",
                &["job", "outcome"],
            ),
            worker_restarts: counter(
                "stalewatch_worker_restarts_total",
                "apalis workers restarted after stopping on an error",
                &["queue"],
            ),
            refused: counter(
                "stalewatch_observations_refused_total",
                "Out-of-order observations that changed nothing",
                &["reason"],
            ),
            repairs: counter(
                "stalewatch_repairs_total",
                "Cache keys rewritten from PostgreSQL, by outcome",
                &["outcome"],
            ),
            sweep_age: gauge(
                "stalewatch_sweep_age_seconds",
                "Seconds since the last completed sweep pass of the deployment",
            ),
            notifications: counter(
                "stalewatch_notifications_total",
                "Keyspace notifications of watched keys",
                &["entity"],
            ),
            notify_gaps,
            open_incidents,
            queue_depth,
            dead_jobs,
            incidents_deleted,
            sweep_position,
            registry,
        }
    }

    /// The name of every series these metrics can export: a histogram's `_bucket`, `_sum` and
    /// `_count`, every other family's own name. [`render`](Self::render) cannot tell: a labelled
    /// family nobody has touched yet has no series, so the text output leaves it out.
    pub fn names(&self) -> Vec<String> {
        // Exhaustive on purpose: a new metric does not compile until it is listed here.
        let Metrics {
            registry: _,
            cache_requests,
            transitions,
            open_incidents,
            checks,
            time_to_confirm,
            incident_duration,
            sweep_items,
            sweep_duration,
            sweep_position,
            jobs,
            worker_restarts,
            queue_depth,
            dead_jobs,
            refused,
            sweep_age,
            sweep_rounds,
            sweep_round_started,
            sweep_round_shards,
            sweep_last_round_items,
            repairs,
            incidents_deleted,
            notifications,
            notify_gaps,
            capture_changes,
            capture_keys,
            capture_unmapped,
            capture_delay,
            capture_read_delay,
            capture_retained_wal,
            capture_slot_lost,
            capture_active,
            slo_changes,
            invalidations_published,
            keys_invalidated,
            invalidation_delay,
            invalidations_reclaimed,
            invalidations_dead,
            invalidation_stream_length,
            invalidations_pending,
            invalidation_pattern_scans,
            invalidation_pattern_keys,
            rebuild_keys,
            rebuild_progress,
            ingest_records,
            ingest_batches,
            ingest_dead,
            ingest_reclaimed,
            ingest_stream_length,
            ingest_pending,
            watermark_lag,
        } = self;
        let collectors: [&dyn Collector; 46] = [
            cache_requests,
            transitions,
            open_incidents,
            checks,
            time_to_confirm,
            incident_duration,
            sweep_items,
            sweep_duration,
            sweep_position,
            jobs,
            worker_restarts,
            queue_depth,
            dead_jobs,
            refused,
            sweep_age,
            repairs,
            incidents_deleted,
            notifications,
            notify_gaps,
            capture_changes,
            capture_keys,
            capture_unmapped,
            capture_delay,
            capture_read_delay,
            capture_retained_wal,
            capture_slot_lost,
            capture_active,
            slo_changes,
            invalidations_published,
            keys_invalidated,
            invalidation_delay,
            invalidations_reclaimed,
            invalidations_dead,
            invalidation_stream_length,
            invalidations_pending,
            invalidation_pattern_scans,
            invalidation_pattern_keys,
            rebuild_keys,
            rebuild_progress,
            ingest_records,
            ingest_batches,
            ingest_dead,
            ingest_reclaimed,
            ingest_stream_length,
            ingest_pending,
            watermark_lag,
        ];
        let rounds: [&dyn Collector; 4] = [
            sweep_rounds,
            sweep_round_started,
            sweep_round_shards,
            sweep_last_round_items,
        ];
        let mut names = Vec::new();
        for family in collectors.iter().chain(&rounds).flat_map(|c| c.collect()) {
            let name = family.name();
            if family.get_field_type() == MetricType::HISTOGRAM {
                names.extend(["_bucket", "_sum", "_count"].map(|s| format!("{name}{s}")));
            } else {
                names.push(name.to_string());
            }
        }
        names
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail on gathered metrics");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::new();
        m.cache_requests.with_label_values(&["hit"]).inc();
        m.transitions
            .with_label_values(&["item", "none", "detected"])
            .inc();
        let text = m.render();
        assert!(
            text.contains("stalewatch_cache_requests_total{result=\"hit\"} 1"),
            "{text}"
        );
        assert!(text.contains("# TYPE stalewatch_incident_transitions_total counter"));
    }

    #[test]
    fn names_include_untouched_labelled_families_and_histogram_series() {
        let m = Metrics::new();
        let names = m.names();
        let text = m.render();
        assert!(!text.contains("stalewatch_jobs_total"), "untouched: {text}");
        for name in [
            "stalewatch_jobs_total",
            "stalewatch_sweep_age_seconds",
            "stalewatch_incident_duration_seconds_bucket",
            "stalewatch_time_to_confirm_seconds_count",
        ] {
            assert!(names.iter().any(|n| n == name), "{name} missing: {names:?}");
        }
        let base = "stalewatch_time_to_confirm_seconds";
        assert!(!names.iter().any(|n| n == base), "{names:?}");
    }
}
