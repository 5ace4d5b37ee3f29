//! One typed configuration, read from the environment once at start-up.
//!
//! Every variable has a default that suits a laptop with local PostgreSQL and Redis;
//! a value that does not parse stops the process with a message naming the variable.

use std::{collections::HashMap, net::SocketAddr, str::FromStr, time::Duration};

use crate::compare::CachePolicy;

/// What went wrong reading the environment; the message names the variable to fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {var}={value:?}: {expected}")]
pub struct ConfigError {
    pub var: &'static str,
    pub value: String,
    pub expected: String,
}

/// Inconsistency injected on purpose, for demos and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailureMode {
    /// Behave correctly.
    #[default]
    Off,
    /// After a PUT, write the pre-update value back to Redis FAILURE_DELAY_MS later.
    Delay,
    /// Skip the cache write on PUT.
    Drop,
    /// On a cache-aside miss, put back a value read before a concurrent write.
    StaleRead,
}

impl FromStr for FailureMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "off" | "" => Ok(Self::Off),
            "delay" => Ok(Self::Delay),
            "drop" => Ok(Self::Drop),
            "stale_read" => Ok(Self::StaleRead),
            _ => Err("one of off, delay, drop, stale_read".into()),
        }
    }
}

/// `on` or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct OnOff(bool);

impl FromStr for OnOff {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "on" => Ok(OnOff(true)),
            "off" => Ok(OnOff(false)),
            _ => Err("on or off".into()),
        }
    }
}

/// How the worker learns of changes made in PostgreSQL by anyone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChangeCapture {
    /// A logical replication slot (needs `wal_level = logical`).
    #[default]
    Logical,
    /// Triggers on the watched tables write each change to an outbox table in the same
    /// transaction and NOTIFY the reader: for a PostgreSQL without logical decoding.
    Outbox,
    /// No capture: the sweep finds changes made outside stalewatch's API.
    Off,
}

impl FromStr for ChangeCapture {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "logical" => Ok(Self::Logical),
            "outbox" => Ok(Self::Outbox),
            "off" => Ok(Self::Off),
            _ => Err("logical, outbox or off".into()),
        }
    }
}

/// Whether stalewatch rewrites diverged keys by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RepairPolicy {
    /// A monitor does not touch the cache unasked: only a refresh through the API does.
    #[default]
    Off,
    /// A key whose incident is confirmed is rewritten from PostgreSQL (versioned write).
    Confirmed,
}

impl FromStr for RepairPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "off" => Ok(Self::Off),
            "confirmed" => Ok(Self::Confirmed),
            _ => Err("off or confirmed".into()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            _ => Err("text or json".into()),
        }
    }
}

/// The whole configuration of both binaries. The README has a table of these variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub database_url: String,
    pub database_pool_size: usize,
    pub redis_url: String,
    /// Prepended to every Redis key stalewatch reads or writes, queues included.
    pub key_prefix: String,
    pub grace_period: Duration,
    /// Pause between sweep passes; zero disables the periodic sweep.
    pub sweep_interval: Duration,
    pub sweep_batch: usize,
    pub cache_ttl: Duration,
    pub cache_policy: CachePolicy,
    /// JSON fields left out of content comparison (dotted paths allowed).
    pub ignore_fields: Vec<String>,
    pub http_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub log_format: LogFormat,
    pub failure_mode: FailureMode,
    pub failure_delay: Duration,
    pub post_write_check: Duration,
    pub repair_policy: RepairPolicy,
    /// How often the worker confirms Detected incidents whose confirmation is overdue (a
    /// confirm job that was lost with its queue, or never pushed).
    pub confirm_backstop: Duration,
    /// Resolved and transient incidents older than this are deleted.
    pub incident_retention: Duration,
    /// Dead jobs (every attempt failed) are kept this long for people to look at.
    pub dead_job_retention: Duration,
    /// The file describing the watched entities; `None`: the built-in `items` entity.
    pub entities: Option<std::path::PathBuf>,
    /// Whether the worker subscribes to keyspace notifications of the watched keys.
    pub keyspace_notifications: bool,
    pub change_capture: ChangeCapture,
    /// How long a changed key waits before its check: time for the application's own cache
    /// write to land.
    pub change_settle: Duration,
    /// The logical replication slot and the publication stalewatch creates and reads.
    pub capture_slot: String,
    pub capture_publication: String,
}

impl Default for Config {
    fn default() -> Self {
        Self::from_lookup(|_| None).expect("defaults parse")
    }
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        let vars: HashMap<String, String> = std::env::vars().collect();
        Self::from_lookup(|k| vars.get(k).cloned())
    }

    /// Reads from any lookup, so tests can pass a map instead of mutating the process env.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let env = Env(&get);
        Ok(Self {
            database_url: env.string(
                "DATABASE_URL",
                "postgres://postgres@127.0.0.1:5432/stalewatch",
            ),
            database_pool_size: env.positive("DATABASE_POOL_SIZE", 16)?,
            redis_url: env.string("REDIS_URL", "redis://127.0.0.1:6379"),
            key_prefix: env.string("KEY_PREFIX", "stalewatch:"),
            grace_period: env.millis("GRACE_PERIOD_MS", 2000)?,
            sweep_interval: env.millis("SWEEP_INTERVAL_MS", 5000)?,
            sweep_batch: env.positive("SWEEP_BATCH", 1000)?,
            cache_ttl: Duration::from_secs(env.positive("CACHE_TTL_SECS", 3600)? as u64),
            cache_policy: env.parse("CACHE_POLICY", CachePolicy::CacheAside)?,
            ignore_fields: env
                .string("IGNORE_FIELDS", "")
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
            http_addr: env.parse("HTTP_ADDR", SocketAddr::from(([127, 0, 0, 1], 8080)))?,
            metrics_addr: env.parse("METRICS_ADDR", SocketAddr::from(([127, 0, 0, 1], 9091)))?,
            log_format: env.parse("LOG_FORMAT", LogFormat::Text)?,
            failure_mode: env.parse("FAILURE_MODE", FailureMode::Off)?,
            failure_delay: env.millis("FAILURE_DELAY_MS", 2000)?,
            post_write_check: env.millis("POST_WRITE_CHECK_MS", 3000)?,
            repair_policy: env.parse("REPAIR_POLICY", RepairPolicy::Off)?,
            confirm_backstop: Duration::from_millis(
                env.positive("CONFIRM_BACKSTOP_MS", 5000)? as u64
            ),
            incident_retention: env.duration("INCIDENT_RETENTION", "30d")?,
            dead_job_retention: env.duration("DEAD_JOB_RETENTION", "7d")?,
            entities: env.raw("ENTITIES").map(std::path::PathBuf::from),
            keyspace_notifications: env.parse("KEYSPACE_NOTIFICATIONS", OnOff(true))?.0,
            change_capture: env.parse("CHANGE_CAPTURE", ChangeCapture::Logical)?,
            change_settle: env.millis("CHANGE_SETTLE_MS", 100)?,
            capture_slot: env.identifier("CAPTURE_SLOT", "stalewatch")?,
            capture_publication: env.identifier("CAPTURE_PUBLICATION", "stalewatch")?,
        })
    }

    /// The text of the entities file: `ENTITIES`, or the built-in one.
    pub fn entities_text(&self) -> Result<String, ConfigError> {
        match &self.entities {
            None => Ok(crate::entity::BUILTIN.to_string()),
            Some(path) => std::fs::read_to_string(path).map_err(|e| ConfigError {
                var: "ENTITIES",
                value: path.display().to_string(),
                expected: format!("a readable TOML file ({e})"),
            }),
        }
    }

    /// The `${VAR}`s an entities file may use.
    pub fn entity_vars(&self) -> impl Fn(&str) -> Option<String> + '_ {
        move |var| match var {
            "KEY_PREFIX" => Some(self.key_prefix.clone()),
            "CACHE_POLICY" => Some(self.cache_policy.to_string()),
            "CACHE_TTL_SECS" => Some(self.cache_ttl.as_secs().to_string()),
            _ => None,
        }
    }

    /// How many jobs of a worker process may use PostgreSQL at once, both queues together.
    /// Tied to the pool: a job holds one connection at a time; the sweep may hold two (its
    /// page and a repair), the upkeep and the confirmation backstop one each, and the jobs
    /// share the rest. Jobs beyond it wait in the worker, not on the pool, where a wait past
    /// the pool's time-out would fail the job and burn a retry.
    pub fn job_db_slots(&self) -> usize {
        self.database_pool_size.saturating_sub(4).max(1)
    }
}

struct Env<'a, F>(&'a F);

impl<F: Fn(&str) -> Option<String>> Env<'_, F> {
    fn raw(&self, var: &str) -> Option<String> {
        (self.0)(var).filter(|v| !v.trim().is_empty())
    }

    fn string(&self, var: &str, default: &str) -> String {
        self.raw(var).unwrap_or_else(|| default.to_string())
    }

    fn parse<T: FromStr>(&self, var: &'static str, default: T) -> Result<T, ConfigError>
    where
        T::Err: std::fmt::Display,
    {
        match self.raw(var) {
            None => Ok(default),
            Some(value) => value.trim().parse().map_err(|e: T::Err| ConfigError {
                var,
                value,
                expected: e.to_string(),
            }),
        }
    }

    fn positive(&self, var: &'static str, default: usize) -> Result<usize, ConfigError> {
        let n: usize = self.parse(var, default).map_err(|e| ConfigError {
            expected: "a whole number greater than 0".into(),
            ..e
        })?;
        if n == 0 {
            return Err(ConfigError {
                var,
                value: "0".into(),
                expected: "a whole number greater than 0".into(),
            });
        }
        Ok(n)
    }

    /// A duration with a unit, as in `30d`, `12h`, `90s` or `1h 30m`.
    fn duration(&self, var: &'static str, default: &str) -> Result<Duration, ConfigError> {
        let value = self.string(var, default);
        humantime::parse_duration(value.trim()).map_err(|_| ConfigError {
            var,
            value,
            expected: "a duration with a unit, such as 30d, 12h or 90s".into(),
        })
    }

    /// A replication slot or publication name: PostgreSQL allows lower-case letters, digits
    /// and underscores in slot names, so both are held to that.
    fn identifier(&self, var: &'static str, default: &str) -> Result<String, ConfigError> {
        let value = self.string(var, default);
        let ok = !value.is_empty()
            && value.len() <= 63
            && value
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if ok {
            Ok(value)
        } else {
            Err(ConfigError {
                var,
                value,
                expected: "1 to 63 lower-case letters, digits or underscores".into(),
            })
        }
    }

    fn millis(&self, var: &'static str, default: u64) -> Result<Duration, ConfigError> {
        let ms: u64 = self.parse(var, default).map_err(|e| ConfigError {
            expected: "a whole number of milliseconds".into(),
            ..e
        })?;
        Ok(Duration::from_millis(ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_match_the_readme() {
        let c = with(&[]).unwrap();
        assert_eq!(c.grace_period, Duration::from_millis(2000));
        assert_eq!(c.sweep_interval, Duration::from_millis(5000));
        assert_eq!(c.sweep_batch, 1000);
        assert_eq!(c.failure_mode, FailureMode::Off);
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.post_write_check, Duration::from_millis(3000));
        assert_eq!(c.cache_policy, CachePolicy::CacheAside);
        assert!(c.ignore_fields.is_empty());
        assert_eq!(c.repair_policy, RepairPolicy::Off);
        assert_eq!(c.confirm_backstop, Duration::from_secs(5));
        assert_eq!(c.incident_retention, Duration::from_secs(30 * 86_400));
        assert_eq!(c.dead_job_retention, Duration::from_secs(7 * 86_400));
        assert_eq!(c.job_db_slots(), 12);
        assert_eq!(c.change_capture, ChangeCapture::Logical);
        assert_eq!(c.change_settle, Duration::from_millis(100));
        assert_eq!(c.capture_slot, "stalewatch");
        assert_eq!(c.capture_publication, "stalewatch");
    }

    #[test]
    fn durations_and_policies_are_read() {
        let c = with(&[
            ("INCIDENT_RETENTION", "12h"),
            ("REPAIR_POLICY", "confirmed"),
            ("DATABASE_POOL_SIZE", "4"),
        ])
        .unwrap();
        assert_eq!(c.incident_retention, Duration::from_secs(12 * 3600));
        assert_eq!(c.repair_policy, RepairPolicy::Confirmed);
        assert_eq!(c.job_db_slots(), 1);
    }

    #[test]
    fn values_are_read() {
        let c = with(&[
            ("GRACE_PERIOD_MS", "250"),
            ("FAILURE_MODE", "delay"),
            ("LOG_FORMAT", "json"),
            ("IGNORE_FIELDS", "updated_at, meta.etag"),
            ("HTTP_ADDR", "0.0.0.0:9000"),
            ("CACHE_POLICY", "write_through"),
        ])
        .unwrap();
        assert_eq!(c.grace_period, Duration::from_millis(250));
        assert_eq!(c.failure_mode, FailureMode::Delay);
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.ignore_fields, vec!["updated_at", "meta.etag"]);
        assert_eq!(c.http_addr.port(), 9000);
        assert_eq!(c.cache_policy, CachePolicy::WriteThrough);
    }

    #[test]
    fn a_bad_value_names_the_variable() {
        for (var, value) in [
            ("GRACE_PERIOD_MS", "2s"),
            ("SWEEP_BATCH", "0"),
            ("SWEEP_BATCH", "-3"),
            ("FAILURE_MODE", "sometimes"),
            ("HTTP_ADDR", "localhost"),
            ("LOG_FORMAT", "xml"),
            ("REPAIR_POLICY", "always"),
            ("INCIDENT_RETENTION", "30"),
            ("CONFIRM_BACKSTOP_MS", "0"),
            ("CHANGE_CAPTURE", "trigger"),
            ("CAPTURE_SLOT", "My-Slot"),
            ("CHANGE_SETTLE_MS", "fast"),
        ] {
            let err = with(&[(var, value)]).unwrap_err();
            assert_eq!(err.var, var);
            assert!(err.to_string().contains(var), "{err}");
        }
    }
}
