//! One typed configuration, read from the environment (or the command line) once at start-up.
//!
//! Every variable has a default that suits a laptop with local PostgreSQL and Redis;
//! a value that does not parse stops the process with a message naming the variable.
//!
//! [`SETTINGS`] is the one list of the variables, their defaults and their help: the
//! binaries' command lines are built from it ([`Settings`], a `clap::Args`: every variable is
//! also a flag, `DATABASE_URL` / `--database-url`), [`Config::from_lookup`] takes its
//! defaults from it, and a test holds the README's table to it.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::{SocketAddr, ToSocketAddrs},
    str::FromStr,
    time::Duration,
};

use crate::{compare::CachePolicy, redact};

/// How a setting's value is shown in the start-up log and in `--help`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shown {
    /// As it is.
    Plain,
    /// A URL: its password masked.
    Url,
    /// Not at all: `***` when set.
    Secret,
}

/// One configuration variable.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    /// The environment variable; the flag is its kebab-case spelling (`--database-url`).
    pub var: &'static str,
    /// The default, as the variable would spell it; `None`: no value (see `help`).
    pub default: Option<&'static str>,
    pub help: &'static str,
    pub shown: Shown,
}

impl Setting {
    /// `DATABASE_URL` -> `database-url`.
    pub fn flag(&self) -> String {
        self.var.to_ascii_lowercase().replace('_', "-")
    }
}

const fn setting(var: &'static str, default: &'static str, help: &'static str) -> Setting {
    Setting {
        var,
        default: Some(default),
        help,
        shown: Shown::Plain,
    }
}

/// Every variable of both binaries, in the README's order.
pub const SETTINGS: &[Setting] = &[
    Setting {
        shown: Shown::Url,
        ..setting(
            "DATABASE_URL",
            "postgres://postgres@127.0.0.1:5432/stalewatch",
            "PostgreSQL",
        )
    },
    Setting {
        default: None,
        ..setting(
            "DATABASE_CA_FILE",
            "",
            "PEM file of the CA that PostgreSQL's certificate must chain to (sslrootcert) [default: the system's roots]",
        )
    },
    setting("DATABASE_POOL_SIZE", "16", "connections per process"),
    Setting {
        shown: Shown::Url,
        ..setting(
            "REDIS_URL",
            "redis://127.0.0.1:6379",
            "stalewatch's own Redis: queues, leases, sweep rounds, the invalidation stream (needs persistence)",
        )
    },
    Setting {
        default: None,
        ..setting(
            "REDIS_CA_FILE",
            "",
            "PEM file of the CA that the certificate of a rediss:// Redis must chain to [default: the system's roots]",
        )
    },
    Setting {
        default: None,
        shown: Shown::Url,
        ..setting(
            "CACHE_REDIS_URL",
            "",
            "the application's cache, whose keys are read, checked, watched and (when asked) written [default: REDIS_URL]",
        )
    },
    setting(
        "CACHE_REDIS_CLUSTER",
        "false",
        "true: CACHE_REDIS_URL is a comma-separated list of seed nodes of a Redis Cluster",
    ),
    Setting {
        default: None,
        ..setting(
            "CACHE_REDIS_CA_FILE",
            "",
            "PEM file of the CA that a rediss:// CACHE_REDIS_URL's certificate must chain to [default: REDIS_CA_FILE]",
        )
    },
    setting(
        "KEY_PREFIX",
        "stalewatch:",
        "prefix of every Redis key, queues included",
    ),
    setting(
        "GRACE_PERIOD_MS",
        "2000",
        "time from detection to confirmation",
    ),
    setting(
        "SWEEP_INTERVAL_MS",
        "5000",
        "pause between sweep passes; 0 disables the sweep",
    ),
    setting("SWEEP_BATCH", "5000", "rows per sweep batch"),
    setting(
        "SWEEP_SHARDS",
        "8",
        "primary-key ranges per entity in a sweep round; workers sweep different ones at once",
    ),
    setting(
        "SWEEP_CONCURRENCY",
        "2",
        "shards of a round one worker sweeps at once, and the row ranges of `sweep --once`",
    ),
    setting(
        "SWEEP_LEASE_MS",
        "30000",
        "how long a dead worker's sweep shard waits before another worker takes it over",
    ),
    setting(
        "REBUILD_BATCH",
        "10000",
        "rebuild: rows read per page and keys written per Redis pipeline",
    ),
    setting(
        "REBUILD_LOCK_MS",
        "30000",
        "rebuild: expiry of an entity's rebuild lock, renewed every third of it while the rebuild runs",
    ),
    setting(
        "REBUILD_PAUSE_MS",
        "0",
        "rebuild: pause between batches, to leave a busy Redis room; 0: none",
    ),
    setting(
        "CACHE_TTL_SECS",
        "3600",
        "TTL of cached items (the demo API's, and of refreshed items)",
    ),
    setting(
        "CACHE_POLICY",
        "cache_aside",
        "the built-in items entity's policy: cache_aside or write_through (also dual_write)",
    ),
    Setting {
        default: None,
        ..setting(
            "IGNORE_FIELDS",
            "",
            "comma-separated fields (dotted paths allowed) the built-in items entity leaves out of comparison [default: none]",
        )
    },
    setting(
        "HTTP_ADDR",
        "127.0.0.1:8080",
        "API listen address: host:port, the host an IP address or a name",
    ),
    setting(
        "HTTP_CLIENT_TIMEOUT_MS",
        "10000",
        "API: how long a client may take to send a request's head, then its body, and how long an idle connection stays open",
    ),
    setting(
        "METRICS_ADDR",
        "127.0.0.1:9091",
        "worker /metrics and /healthz: host:port; port 0 takes a free port (logged)",
    ),
    setting("LOG_FORMAT", "text", "text or json"),
    setting(
        "FAILURE_MODE",
        "off",
        "failure injection: off, delay, drop or stale_read",
    ),
    setting("FAILURE_DELAY_MS", "2000", "delay of the injected failures"),
    setting(
        "POST_WRITE_CHECK_MS",
        "3000",
        "when the second check after a write runs",
    ),
    setting(
        "REPAIR_POLICY",
        "off",
        "off or confirmed: rewrite a key from PostgreSQL once its incident is confirmed",
    ),
    setting(
        "CONFIRM_BACKSTOP_MS",
        "5000",
        "how often the worker confirms Detected incidents whose confirmation is overdue",
    ),
    setting(
        "INCIDENT_RETENTION",
        "30d",
        "resolved and transient incidents older than this are deleted (30d, 12h, 90m, ...)",
    ),
    setting(
        "DEAD_JOB_RETENTION",
        "7d",
        "jobs that used up every attempt are removed after this",
    ),
    Setting {
        default: None,
        ..setting(
            "ENTITIES",
            "",
            "the TOML file describing the watched tables and keys [default: the built-in items file]",
        )
    },
    setting(
        "CHANGE_CAPTURE",
        "logical",
        "logical (a replication slot), outbox (triggers and an outbox table) or off",
    ),
    setting(
        "CHANGE_SETTLE_MS",
        "100",
        "how long a changed key waits before its check",
    ),
    setting(
        "CAPTURE_SLOT",
        "stalewatch",
        "the logical replication slot the worker creates and reads",
    ),
    setting(
        "CAPTURE_PUBLICATION",
        "stalewatch",
        "the publication of the watched tables the worker creates",
    ),
    setting(
        "INVALIDATION_CONSUMERS",
        "1",
        "invalidation consumers per worker (entities with on_change = \"invalidate\"); 0: none",
    ),
    setting(
        "INVALIDATION_CLAIM_IDLE_MS",
        "10000",
        "an invalidation left unacknowledged this long by its consumer is taken over by another",
    ),
    setting(
        "INGEST_CONSUMERS",
        "1",
        "ingest consumers per worker (entities with ingest = true); 0: none",
    ),
    setting(
        "INGEST_BATCH",
        "1000",
        "ingest: records read at once per stream, upserted in one statement and cached in one pipeline",
    ),
    setting(
        "INGEST_CLAIM_IDLE_MS",
        "10000",
        "an ingest record left unacknowledged this long by its consumer is taken over by another",
    ),
    setting(
        "WATERMARK_CHECK_MS",
        "1000",
        "how often the worker compares each ingesting entity's watermark with its table; 0: never",
    ),
    setting(
        "WATERMARK_MAX_LAG",
        "0",
        "how far a watermark may trail its table's highest version before the cache is behind: versions, or milliseconds for a timestamp version",
    ),
    setting(
        "WATERMARK_REBUILD",
        "off",
        "on or off: rebuild an entity once its cache_behind incident is confirmed",
    ),
    setting(
        "SLO_WINDOWS",
        crate::slo::DEFAULT_WINDOWS,
        "the consistency SLO's windows: each changed key is probed this long after its commit; off for none",
    ),
    setting(
        "KEYSPACE_NOTIFICATIONS",
        "on",
        "on or off: check a watched key within milliseconds of any write, delete or expiry",
    ),
    Setting {
        default: None,
        shown: Shown::Secret,
        ..setting(
            "ADMIN_TOKEN",
            "",
            "bearer token of the API's refresh routes (16+ characters), or `disabled` (demo only); the API refuses to start without it",
        )
    },
    setting(
        "READ_ACCESS",
        "open",
        "open or token: whether the API's incident, stats and rebuild-progress reads need ADMIN_TOKEN too",
    ),
    setting("RUST_LOG", "info", "log filter"),
];

/// The setting of `var`. Panics on a name missing from [`SETTINGS`]: a bug, caught by the
/// tests, which read every variable.
pub fn setting_of(var: &str) -> &'static Setting {
    setting_of_opt(var).unwrap_or_else(|| panic!("{var} is not in SETTINGS"))
}

fn setting_of_opt(var: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.var == var)
}

/// A value's rendering in the start-up log: the password of a URL and secrets masked.
pub fn shown(setting: &Setting, value: &str) -> String {
    match setting.shown {
        Shown::Plain => value.to_string(),
        Shown::Url => redact::url(value),
        Shown::Secret if value == "disabled" || value.is_empty() => value.to_string(),
        Shown::Secret => redact::MASK.to_string(),
    }
}

/// The variables as given, on the command line or in the environment: what the binaries'
/// command lines parse into (`#[command(flatten)]`), before [`Settings::config`] checks and
/// types them. clap does only the gathering (flag over environment, `--help` with every
/// default); the values are checked once, by [`Config::from_lookup`], so a bad one gets the
/// same message however it was given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    given: BTreeMap<&'static str, String>,
}

impl Settings {
    /// A value given for `var` (flag or environment), if any.
    pub fn get(&self, var: &str) -> Option<&str> {
        self.given.get(var).map(String::as_str)
    }

    /// The typed configuration.
    pub fn config(&self) -> Result<Config, ConfigError> {
        Config::from_lookup(|k| self.given.get(k).cloned())
    }

    /// Every variable with its effective value (given, else default), secrets masked, on one
    /// line: for the start-up log.
    pub fn effective(&self) -> String {
        SETTINGS
            .iter()
            .map(|s| {
                let value = self
                    .given
                    .get(s.var)
                    .map(String::as_str)
                    .filter(|v| !v.trim().is_empty())
                    .or(s.default)
                    .unwrap_or("");
                let value = shown(s, value);
                if value.is_empty() || value.contains(|c: char| c.is_whitespace() || c == '"') {
                    format!("{}={value:?}", s.var)
                } else {
                    format!("{}={value}", s.var)
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The secrets among the values (passwords in URLs, the admin token), to scrub from an
    /// error message before it is printed.
    pub fn secrets(&self) -> Vec<String> {
        SETTINGS
            .iter()
            .filter_map(|s| {
                let value = self.given.get(s.var)?;
                match s.shown {
                    Shown::Plain => None,
                    Shown::Url => redact::password_of(value),
                    Shown::Secret => (value != "disabled").then(|| value.clone()),
                }
            })
            .collect()
    }
}

impl clap::FromArgMatches for Settings {
    fn from_arg_matches(matches: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let mut settings = Settings::default();
        settings.update_from_arg_matches(matches)?;
        Ok(settings)
    }

    fn update_from_arg_matches(&mut self, matches: &clap::ArgMatches) -> Result<(), clap::Error> {
        for s in SETTINGS {
            // Defaults stay out: `from_lookup` applies them, from the same table.
            if matches.value_source(s.var) == Some(clap::parser::ValueSource::DefaultValue) {
                continue;
            }
            if let Some(value) = matches.get_one::<String>(s.var) {
                self.given.insert(s.var, value.clone());
            }
        }
        Ok(())
    }
}

impl clap::Args for Settings {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        cmd.args(SETTINGS.iter().map(|s| {
            let arg = clap::Arg::new(s.var)
                .long(s.flag())
                .env(s.var)
                .value_name("VALUE")
                .help(s.help)
                .global(true)
                .help_heading("Configuration (flag or environment variable)")
                // `--help` does not print the environment's values: some are secrets.
                .hide_env_values(true);
            match s.default {
                Some(default) => arg.default_value(default),
                None => arg,
            }
        }))
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

/// A listen address: `host:port`, the host an IP address (`[::1]` for IPv6) or a name,
/// resolved when binding (a name may give several addresses: all are bound).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenAddr {
    host: String,
    port: u16,
}

impl ListenAddr {
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl From<SocketAddr> for ListenAddr {
    fn from(addr: SocketAddr) -> Self {
        Self {
            host: addr.ip().to_string(),
            port: addr.port(),
        }
    }
}

impl FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let expected = || {
            "host:port, the host an IP address ([::1] for IPv6) or a name, the port 0 to 65535"
                .to_string()
        };
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(addr.into());
        }
        let (host, port) = s.rsplit_once(':').ok_or_else(expected)?;
        let port: u16 = port.parse().map_err(|_| expected())?;
        let name = !host.is_empty()
            && host.len() <= 253
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        if !name {
            return Err(expected());
        }
        Ok(Self {
            host: host.to_string(),
            port,
        })
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl ToSocketAddrs for ListenAddr {
    type Iter = std::vec::IntoIter<SocketAddr>;
    fn to_socket_addrs(&self) -> std::io::Result<Self::Iter> {
        (self.host.as_str(), self.port).to_socket_addrs()
    }
}

/// A value that is never shown: its `Debug` is `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(redact::MASK)
    }
}

/// Who may use the API's mutating routes (the refreshes).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AdminToken {
    /// Not configured: the API refuses to start, and the routes refuse every request.
    #[default]
    Unset,
    /// `ADMIN_TOKEN=disabled`: anyone who reaches the API may use them. For demos.
    Disabled,
    /// Requests must carry `Authorization: Bearer <token>`.
    Bearer(Secret),
}

/// Who may read the API's incidents, stats and rebuild progress (`READ_ACCESS`). Health,
/// readiness, metrics, the OpenAPI document and the demo's items routes stay open either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadAccess {
    /// Anyone who reaches the API.
    #[default]
    Open,
    /// Requests must carry the admin token, as the mutating routes do.
    Token,
}

impl FromStr for ReadAccess {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "open" => Ok(Self::Open),
            "token" => Ok(Self::Token),
            _ => Err("`open` or `token`".into()),
        }
    }
}

impl FromStr for AdminToken {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "disabled" {
            return Ok(Self::Disabled);
        }
        if s.len() >= 16 && s.bytes().all(|b| b.is_ascii_graphic()) {
            Ok(Self::Bearer(Secret::new(s)))
        } else {
            Err("`disabled`, or a token of at least 16 visible ASCII characters without spaces (e.g. from `openssl rand -hex 32`)".into())
        }
    }
}

/// What went wrong reading the environment; the message names the variable to fix.
#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub var: &'static str,
    /// Empty: the variable is not set and must be.
    pub value: String,
    pub expected: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (var, expected) = (self.var, &self.expected);
        let value = match setting_of_opt(var) {
            Some(s) if s.shown == Shown::Secret => redact::MASK.to_string(),
            Some(s) if s.shown == Shown::Url => redact::url(&self.value),
            _ => self.value.clone(),
        };
        if self.value.is_empty() {
            write!(f, "{var} is not set: expected {expected}")
        } else {
            write!(f, "invalid {var}={value:?}: {expected}")
        }
    }
}

impl std::error::Error for ConfigError {}

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

/// `true` or `false`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TrueFalse(bool);

impl FromStr for TrueFalse {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "true" => Ok(TrueFalse(true)),
            "false" => Ok(TrueFalse(false)),
            _ => Err("true or false".into()),
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
    /// `DATABASE_URL`, with `DATABASE_CA_FILE` in it as `sslrootcert` (`crate::tls`).
    pub database_url: String,
    pub database_pool_size: usize,
    /// stalewatch's own Redis: its queues, leases, sweep rounds and streams.
    pub redis_url: String,
    /// The CA of a `rediss://` Redis; `None`: the system's roots. See [`Config::redis`].
    pub redis_ca_file: Option<std::path::PathBuf>,
    /// The application's cache, whose keys are watched; `None`: `redis_url`. See
    /// [`Config::cache_redis`].
    pub cache_redis_url: Option<String>,
    /// Whether the cache is a Redis Cluster, `cache_redis_url` then its seed nodes.
    pub cache_redis_cluster: bool,
    /// The CA of a `rediss://` cache; `None`: `redis_ca_file`.
    pub cache_redis_ca_file: Option<std::path::PathBuf>,
    /// Prepended to every Redis key stalewatch reads or writes, queues included.
    pub key_prefix: String,
    pub grace_period: Duration,
    /// Pause between sweep passes; zero disables the periodic sweep.
    pub sweep_interval: Duration,
    pub sweep_batch: usize,
    /// Row ranges per entity in a sweep round (`crate::shards`).
    pub sweep_shards: usize,
    /// Shards of a round one worker sweeps at once, and the row ranges of `sweep --once`.
    pub sweep_concurrency: usize,
    /// A sweep shard's lease: renewed with every page, so it only has to outlast one page.
    pub sweep_lease: Duration,
    /// Rows per rebuild page, and keys per rebuild pipeline.
    pub rebuild_batch: usize,
    /// The rebuild lock's expiry; the rebuild renews it every third of it.
    pub rebuild_lock: Duration,
    /// Pause between rebuild batches.
    pub rebuild_pause: Duration,
    pub cache_ttl: Duration,
    pub cache_policy: CachePolicy,
    /// JSON fields left out of content comparison (dotted paths allowed).
    pub ignore_fields: Vec<String>,
    pub http_addr: ListenAddr,
    /// How long an API client may take to send a request's head, then its body (a body that
    /// stalls gets a 408), and how long an idle kept-alive connection stays open: a client
    /// that stops sending must not hold a connection.
    pub http_client_timeout: Duration,
    pub metrics_addr: ListenAddr,
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
    /// After how long each changed key is probed for the consistency SLO (`crate::slo`).
    pub slo_windows: Vec<Duration>,
    /// Invalidation stream consumers per worker process (`crate::invalidation`).
    pub invalidation_consumers: usize,
    /// How long an entry stays pending with its consumer before another claims it.
    pub invalidation_claim_idle: Duration,
    /// Ingest stream consumers per worker process (`crate::ingest`).
    pub ingest_consumers: usize,
    /// Records read from an ingest stream at once: one statement, one cache pipeline.
    pub ingest_batch: usize,
    /// How long an ingest record stays pending with its consumer before another claims it.
    pub ingest_claim_idle: Duration,
    /// How often the worker runs the watermark drift check (`crate::watermark`); zero: never.
    pub watermark_check: Duration,
    /// How far a watermark may trail: versions, or milliseconds for a timestamp version.
    pub watermark_max_lag: u64,
    /// Whether a confirmed `cache_behind` incident starts a rebuild of its entity.
    pub watermark_rebuild: bool,
    /// Who may use the API's mutating routes.
    pub admin_token: AdminToken,
    /// Whether the API's reads of incidents, stats and rebuild progress need the token too.
    pub read_access: ReadAccess,
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
        let config = Self {
            database_url: match env.raw("DATABASE_CA_FILE") {
                Some(ca) => crate::tls::with_root_cert(
                    &env.string("DATABASE_URL"),
                    std::path::Path::new(ca.trim()),
                ),
                None => env.string("DATABASE_URL"),
            },
            database_pool_size: env.positive("DATABASE_POOL_SIZE")?,
            redis_url: env.string("REDIS_URL"),
            redis_ca_file: env.raw("REDIS_CA_FILE").map(|f| f.trim().into()),
            cache_redis_url: env.raw("CACHE_REDIS_URL").map(|u| u.trim().to_string()),
            cache_redis_cluster: env.parse::<TrueFalse>("CACHE_REDIS_CLUSTER")?.0,
            cache_redis_ca_file: env.raw("CACHE_REDIS_CA_FILE").map(|f| f.trim().into()),
            key_prefix: env.string("KEY_PREFIX"),
            grace_period: env.millis("GRACE_PERIOD_MS")?,
            sweep_interval: env.millis("SWEEP_INTERVAL_MS")?,
            sweep_batch: env.positive("SWEEP_BATCH")?,
            sweep_shards: env.positive("SWEEP_SHARDS")?,
            sweep_concurrency: env.positive("SWEEP_CONCURRENCY")?,
            sweep_lease: Duration::from_millis(env.positive("SWEEP_LEASE_MS")? as u64),
            rebuild_batch: env.positive("REBUILD_BATCH")?,
            rebuild_lock: Duration::from_millis(env.positive("REBUILD_LOCK_MS")? as u64),
            rebuild_pause: env.millis("REBUILD_PAUSE_MS")?,
            cache_ttl: Duration::from_secs(env.positive("CACHE_TTL_SECS")? as u64),
            cache_policy: env.parse("CACHE_POLICY")?,
            ignore_fields: env
                .string("IGNORE_FIELDS")
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
            http_addr: env.parse("HTTP_ADDR")?,
            http_client_timeout: Duration::from_millis(
                env.positive("HTTP_CLIENT_TIMEOUT_MS")? as u64
            ),
            metrics_addr: env.parse("METRICS_ADDR")?,
            log_format: env.parse("LOG_FORMAT")?,
            failure_mode: env.parse("FAILURE_MODE")?,
            failure_delay: env.millis("FAILURE_DELAY_MS")?,
            post_write_check: env.millis("POST_WRITE_CHECK_MS")?,
            repair_policy: env.parse("REPAIR_POLICY")?,
            confirm_backstop: Duration::from_millis(env.positive("CONFIRM_BACKSTOP_MS")? as u64),
            incident_retention: env.duration("INCIDENT_RETENTION")?,
            dead_job_retention: env.duration("DEAD_JOB_RETENTION")?,
            entities: env.raw("ENTITIES").map(std::path::PathBuf::from),
            keyspace_notifications: env.parse::<OnOff>("KEYSPACE_NOTIFICATIONS")?.0,
            change_capture: env.parse("CHANGE_CAPTURE")?,
            change_settle: env.millis("CHANGE_SETTLE_MS")?,
            capture_slot: env.identifier("CAPTURE_SLOT")?,
            capture_publication: env.identifier("CAPTURE_PUBLICATION")?,
            slo_windows: env.windows("SLO_WINDOWS")?,
            invalidation_consumers: env.parse("INVALIDATION_CONSUMERS")?,
            invalidation_claim_idle: env.millis("INVALIDATION_CLAIM_IDLE_MS")?,
            ingest_consumers: env.parse("INGEST_CONSUMERS")?,
            ingest_batch: env.positive("INGEST_BATCH")?,
            ingest_claim_idle: env.millis("INGEST_CLAIM_IDLE_MS")?,
            watermark_check: env.millis("WATERMARK_CHECK_MS")?,
            watermark_max_lag: env.parse("WATERMARK_MAX_LAG")?,
            watermark_rebuild: env.parse::<OnOff>("WATERMARK_REBUILD")?.0,
            admin_token: match env.raw("ADMIN_TOKEN") {
                None => AdminToken::Unset,
                Some(_) => env.parse("ADMIN_TOKEN")?,
            },
            read_access: env.parse("READ_ACCESS")?,
        };
        // Each shard a worker sweeps at once holds a connection for its pages and takes a
        // second to record each: as many shards as connections would all wait for a second
        // one, and past half the pool the checks would queue behind the sweep.
        if config.sweep_concurrency * 2 > config.database_pool_size {
            return Err(ConfigError {
                var: "SWEEP_CONCURRENCY",
                value: config.sweep_concurrency.to_string(),
                expected: format!(
                    "at most half of DATABASE_POOL_SIZE ({}): each shard swept at once holds up \
                     to two database connections; raise DATABASE_POOL_SIZE or lower this",
                    config.database_pool_size
                ),
            });
        }
        Ok(config)
    }

    /// For a process that serves the mutating routes: ADMIN_TOKEN must be set, to a token
    /// or explicitly to `disabled`.
    pub fn require_admin_token(&self) -> Result<(), ConfigError> {
        match self.admin_token {
            AdminToken::Unset => Err(ConfigError {
                var: "ADMIN_TOKEN",
                value: String::new(),
                expected: "a token of at least 16 characters for the refresh routes (e.g. `openssl rand -hex 32`), or `disabled` to leave them open (demo only)".into(),
            }),
            AdminToken::Disabled if self.read_access == ReadAccess::Token => Err(ConfigError {
                var: "READ_ACCESS",
                value: "token".into(),
                expected: "`open`, or `token` with an ADMIN_TOKEN (not `disabled`) for the reads to need".into(),
            }),
            AdminToken::Disabled | AdminToken::Bearer(_) => Ok(()),
        }
    }

    /// The Redis to connect to: `REDIS_URL`, checked against `REDIS_CA_FILE` when it is a
    /// `rediss://` one.
    pub fn redis(&self) -> Result<redis::ConnectionInfo, crate::tls::TlsError> {
        crate::tls::redis(&self.redis_url, self.redis_ca_file.as_deref())
    }

    /// `CACHE_REDIS_URL`, else `REDIS_URL`: where the watched keys are.
    pub fn cache_redis_url(&self) -> &str {
        self.cache_redis_url.as_deref().unwrap_or(&self.redis_url)
    }

    /// The application's cache to connect to: [`Config::cache_redis_url`], one Redis or (with
    /// `CACHE_REDIS_CLUSTER=true`) a cluster's seed nodes, checked against
    /// `CACHE_REDIS_CA_FILE` (else `REDIS_CA_FILE`) when it is a `rediss://` one.
    pub fn cache_redis(&self) -> Result<crate::cache::Target, crate::tls::TlsError> {
        let (url_var, url) = match &self.cache_redis_url {
            Some(url) => ("CACHE_REDIS_URL", url.as_str()),
            None => ("REDIS_URL", self.redis_url.as_str()),
        };
        let (ca_var, ca) = match &self.cache_redis_ca_file {
            Some(ca) => ("CACHE_REDIS_CA_FILE", Some(ca.as_path())),
            None => ("REDIS_CA_FILE", self.redis_ca_file.as_deref()),
        };
        if self.cache_redis_cluster {
            crate::tls::redis_cluster((url_var, ca_var), url, ca).map(crate::cache::Target::Cluster)
        } else {
            crate::tls::redis_as((url_var, ca_var), url, ca).map(crate::cache::Target::Node)
        }
    }

    /// Whether the watched cache is another Redis than stalewatch's own.
    pub fn cache_is_separate(&self) -> bool {
        self.cache_redis_url() != self.redis_url
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
    /// Tied to the pool: a job holds one connection at a time; each shard the sweep is on may
    /// hold two (its pages and their recording, or a repair), the upkeep and the confirmation
    /// backstop one each, and the jobs share the rest. Jobs beyond it wait in the worker, not
    /// on the pool, where a wait past the pool's time-out would fail the job and burn a retry.
    pub fn job_db_slots(&self) -> usize {
        let reserved = 2 * self.sweep_concurrency + 2;
        self.database_pool_size.saturating_sub(reserved).max(1)
    }
}

struct Env<'a, F>(&'a F);

impl<F: Fn(&str) -> Option<String>> Env<'_, F> {
    fn raw(&self, var: &str) -> Option<String> {
        (self.0)(var).filter(|v| !v.trim().is_empty())
    }

    /// The value given, else the default of [`SETTINGS`] (empty when it has none).
    fn string(&self, var: &str) -> String {
        self.raw(var)
            .unwrap_or_else(|| setting_of(var).default.unwrap_or("").to_string())
    }

    /// A typed value: the value given, else the table's default, parsed the same way.
    fn parse<T: FromStr>(&self, var: &'static str) -> Result<T, ConfigError>
    where
        T::Err: std::fmt::Display,
    {
        let value = self.string(var);
        value.trim().parse().map_err(|e: T::Err| ConfigError {
            var,
            value,
            expected: e.to_string(),
        })
    }

    fn positive(&self, var: &'static str) -> Result<usize, ConfigError> {
        let value = self.string(var);
        match value.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(ConfigError {
                var,
                value,
                expected: "a whole number greater than 0".into(),
            }),
        }
    }

    /// A duration with a unit, as in `30d`, `12h`, `90s` or `1h 30m`.
    fn duration(&self, var: &'static str) -> Result<Duration, ConfigError> {
        let value = self.string(var);
        humantime::parse_duration(value.trim()).map_err(|_| ConfigError {
            var,
            value,
            expected: "a duration with a unit, such as 30d, 12h or 90s".into(),
        })
    }

    fn windows(&self, var: &'static str) -> Result<Vec<Duration>, ConfigError> {
        let value = self.string(var);
        crate::slo::parse_windows(&value).map_err(|expected| ConfigError {
            var,
            value,
            expected,
        })
    }

    /// A replication slot or publication name: PostgreSQL allows lower-case letters, digits
    /// and underscores in slot names, so both are held to that.
    fn identifier(&self, var: &'static str) -> Result<String, ConfigError> {
        let value = self.string(var);
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

    fn millis(&self, var: &'static str) -> Result<Duration, ConfigError> {
        let value = self.string(var);
        let ms: u64 = value.trim().parse().map_err(|_| ConfigError {
            var,
            value: value.clone(),
            expected: "a whole number of milliseconds".into(),
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
        assert_eq!(c.sweep_batch, 5000);
        assert_eq!(c.http_client_timeout, Duration::from_secs(10));
        assert_eq!(c.sweep_shards, 8);
        assert_eq!(c.sweep_concurrency, 2);
        assert_eq!(c.sweep_lease, Duration::from_secs(30));
        assert_eq!(c.failure_mode, FailureMode::Off);
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.post_write_check, Duration::from_millis(3000));
        assert_eq!(c.cache_policy, CachePolicy::CacheAside);
        assert!(c.ignore_fields.is_empty());
        assert_eq!(c.repair_policy, RepairPolicy::Off);
        assert_eq!(c.confirm_backstop, Duration::from_secs(5));
        assert_eq!(c.incident_retention, Duration::from_secs(30 * 86_400));
        assert_eq!(c.dead_job_retention, Duration::from_secs(7 * 86_400));
        // 16, less two for each of the two shards and one each for the upkeep and backstop.
        assert_eq!(c.job_db_slots(), 10);
        assert_eq!(c.change_capture, ChangeCapture::Logical);
        assert_eq!(c.change_settle, Duration::from_millis(100));
        assert_eq!(c.capture_slot, "stalewatch");
        assert_eq!(c.slo_windows.len(), 3);
        assert_eq!(c.capture_publication, "stalewatch");
        assert_eq!(c.ingest_consumers, 1);
        assert_eq!(c.ingest_batch, 1000);
        assert_eq!(c.ingest_claim_idle, Duration::from_secs(10));
        assert_eq!(c.watermark_check, Duration::from_secs(1));
        assert_eq!(c.watermark_max_lag, 0);
        assert!(!c.watermark_rebuild);
    }

    #[test]
    fn the_ca_files_are_read() {
        let c = with(&[]).unwrap();
        assert_eq!(c.redis_ca_file, None);
        assert_eq!(
            c.database_url,
            "postgres://postgres@127.0.0.1:5432/stalewatch"
        );
        let c = with(&[
            ("DATABASE_URL", "postgres://db/x?sslmode=verify-full"),
            ("DATABASE_CA_FILE", "/etc/pg-ca.pem"),
            ("REDIS_CA_FILE", "/etc/redis-ca.pem"),
        ])
        .unwrap();
        assert_eq!(
            c.database_url,
            "postgres://db/x?sslmode=verify-full&sslrootcert=/etc/pg-ca.pem"
        );
        assert_eq!(c.redis_ca_file, Some("/etc/redis-ca.pem".into()));
    }

    #[test]
    fn the_watched_cache_defaults_to_stalewatchs_own_redis() {
        let c = with(&[("REDIS_URL", "redis://own:6379")]).unwrap();
        assert_eq!(c.cache_redis_url(), "redis://own:6379");
        assert!(!c.cache_is_separate());
        let c = with(&[
            ("REDIS_URL", "redis://own:6379"),
            ("CACHE_REDIS_URL", " redis://app-cache:6380 "),
        ])
        .unwrap();
        assert_eq!(c.cache_redis_url(), "redis://app-cache:6380");
        assert!(c.cache_is_separate());
        // The cache's CA: its own file, else REDIS_CA_FILE; errors name the variable used.
        let c = with(&[
            ("CACHE_REDIS_URL", "rediss://cache:6380"),
            ("REDIS_CA_FILE", "/nonexistent/own-ca.pem"),
        ])
        .unwrap();
        let e = c.cache_redis().unwrap_err().to_string();
        assert!(
            e.contains("REDIS_CA_FILE") && e.contains("own-ca.pem"),
            "{e}"
        );
        let c = with(&[
            ("CACHE_REDIS_URL", "rediss://cache:6380"),
            ("REDIS_CA_FILE", "/nonexistent/own-ca.pem"),
            ("CACHE_REDIS_CA_FILE", "/nonexistent/cache-ca.pem"),
        ])
        .unwrap();
        let e = c.cache_redis().unwrap_err().to_string();
        assert!(
            e.contains("CACHE_REDIS_CA_FILE") && e.contains("cache-ca.pem"),
            "{e}"
        );
        let e = with(&[("CACHE_REDIS_URL", "http://nope")])
            .unwrap()
            .cache_redis()
            .unwrap_err()
            .to_string();
        assert!(e.contains("CACHE_REDIS_URL"), "{e}");
    }

    #[test]
    fn a_cluster_cache_is_a_list_of_seed_nodes() {
        let c = with(&[]).unwrap();
        assert!(!c.cache_redis_cluster);
        assert!(matches!(c.cache_redis(), Ok(crate::cache::Target::Node(_))));
        let c = with(&[
            ("CACHE_REDIS_CLUSTER", "true"),
            (
                "CACHE_REDIS_URL",
                "redis://10.0.0.1:7000, redis://10.0.0.2:7001,",
            ),
        ])
        .unwrap();
        match c.cache_redis() {
            Ok(crate::cache::Target::Cluster(seeds)) => {
                assert_eq!(seeds.nodes.len(), 2);
                assert_eq!(seeds.ca, None);
            }
            other => panic!("{other:?}"),
        }
        let e = with(&[("CACHE_REDIS_CLUSTER", "true"), ("CACHE_REDIS_URL", " , ")])
            .unwrap()
            .cache_redis()
            .unwrap_err()
            .to_string();
        // An empty value means the default (REDIS_URL), which is one seed; a list of nothing
        // but commas is no seed at all.
        assert!(e.contains("no seed node"), "{e}");
        let e = with(&[("CACHE_REDIS_CLUSTER", "yes")]).unwrap_err();
        assert_eq!(e.var, "CACHE_REDIS_CLUSTER");
        assert!(e.to_string().contains("true or false"), "{e}");
        // A rediss:// seed reads the CA file, named in the error when it is missing.
        let e = with(&[
            ("CACHE_REDIS_CLUSTER", "true"),
            ("CACHE_REDIS_URL", "rediss://10.0.0.1:7000"),
            ("CACHE_REDIS_CA_FILE", "/nonexistent/cluster-ca.pem"),
        ])
        .unwrap()
        .cache_redis()
        .unwrap_err()
        .to_string();
        assert!(e.contains("CACHE_REDIS_CA_FILE"), "{e}");
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
    fn sweep_concurrency_must_leave_each_shard_two_connections() {
        let err = with(&[("SWEEP_CONCURRENCY", "9"), ("DATABASE_POOL_SIZE", "16")]).unwrap_err();
        assert_eq!(err.var, "SWEEP_CONCURRENCY");
        assert!(err.to_string().contains("DATABASE_POOL_SIZE (16)"), "{err}");
        let ok = with(&[("SWEEP_CONCURRENCY", "8"), ("DATABASE_POOL_SIZE", "16")]).unwrap();
        assert_eq!(ok.sweep_concurrency, 8);
    }

    #[test]
    fn a_bad_value_names_the_variable() {
        for (var, value) in [
            ("GRACE_PERIOD_MS", "2s"),
            ("SWEEP_BATCH", "0"),
            ("SWEEP_BATCH", "-3"),
            ("SWEEP_SHARDS", "0"),
            ("SWEEP_CONCURRENCY", "0"),
            ("SWEEP_LEASE_MS", "0"),
            ("FAILURE_MODE", "sometimes"),
            ("HTTP_ADDR", "localhost"),
            ("LOG_FORMAT", "xml"),
            ("REPAIR_POLICY", "always"),
            ("INCIDENT_RETENTION", "30"),
            ("CONFIRM_BACKSTOP_MS", "0"),
            ("CHANGE_CAPTURE", "trigger"),
            ("CAPTURE_SLOT", "My-Slot"),
            ("CHANGE_SETTLE_MS", "fast"),
            ("SLO_WINDOWS", "1s,later"),
            ("METRICS_ADDR", "host name:80"),
            ("HTTP_ADDR", "::1:8080"),
            ("HTTP_ADDR", "localhost:65536"),
            ("ADMIN_TOKEN", "short"),
            ("ADMIN_TOKEN", "sixteen chars with spaces"),
        ] {
            let err = with(&[(var, value)]).unwrap_err();
            assert_eq!(err.var, var);
            assert!(err.to_string().contains(var), "{err}");
        }
    }

    #[test]
    fn every_default_of_the_table_parses_and_reads_as_documented() {
        let c = Config::default();
        assert_eq!(
            c.http_addr.to_string(),
            setting_of("HTTP_ADDR").default.unwrap()
        );
        assert_eq!(
            c.metrics_addr.to_string(),
            setting_of("METRICS_ADDR").default.unwrap()
        );
        assert_eq!(c.database_url, setting_of("DATABASE_URL").default.unwrap());
        assert_eq!(c.admin_token, AdminToken::Unset);
        assert!(c.require_admin_token().is_err());
        assert_eq!(c.entities, None);
        assert!(c.keyspace_notifications);
        for s in SETTINGS {
            assert!(
                s.var.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'),
                "{}",
                s.var
            );
        }
    }

    #[test]
    fn listen_addresses_take_names_and_port_zero() {
        for (value, host, port) in [
            ("localhost:8080", "localhost", 8080),
            ("127.0.0.1:0", "127.0.0.1", 0),
            ("[::1]:9091", "::1", 9091),
            ("0.0.0.0:9000", "0.0.0.0", 9000),
            ("api.internal.example:443", "api.internal.example", 443),
        ] {
            let c = with(&[("HTTP_ADDR", value), ("METRICS_ADDR", value)]).unwrap();
            assert_eq!((c.http_addr.host(), c.http_addr.port()), (host, port));
            assert_eq!(c.metrics_addr.to_string(), value);
        }
        let resolved: Vec<SocketAddr> = "localhost:0"
            .parse::<ListenAddr>()
            .unwrap()
            .to_socket_addrs()
            .unwrap()
            .collect();
        assert!(
            resolved.iter().all(|a| a.ip().is_loopback()),
            "{resolved:?}"
        );
    }

    #[test]
    fn the_admin_token_is_a_token_or_disabled_and_never_shown() {
        let c = with(&[("ADMIN_TOKEN", "disabled")]).unwrap();
        assert_eq!(c.admin_token, AdminToken::Disabled);
        assert!(c.require_admin_token().is_ok());
        let token = "0123456789abcdef0123";
        let c = with(&[("ADMIN_TOKEN", token)]).unwrap();
        assert_eq!(c.admin_token, AdminToken::Bearer(Secret::new(token)));
        assert!(c.require_admin_token().is_ok());
        assert!(!format!("{c:?}").contains(token));
        let err = with(&[("ADMIN_TOKEN", "short secret")]).unwrap_err();
        assert_eq!(err.var, "ADMIN_TOKEN");
        assert!(!err.to_string().contains("short secret"), "{err}");
        let err = with(&[]).unwrap().require_admin_token().unwrap_err();
        assert!(err.to_string().contains("ADMIN_TOKEN"), "{err}");
    }

    fn parse_cli(args: &[&str]) -> Result<Settings, clap::Error> {
        use clap::{Args, FromArgMatches};
        let cmd = Settings::augment_args(clap::Command::new("t"));
        let matches = cmd.try_get_matches_from(std::iter::once("t").chain(args.iter().copied()))?;
        Settings::from_arg_matches(&matches)
    }

    #[test]
    fn every_variable_is_a_flag_whose_value_is_checked_like_the_variable() {
        let settings = parse_cli(&[
            "--grace-period-ms",
            "250",
            "--http-addr",
            "localhost:9000",
            "--database-url",
            "postgres://app:hunter22@db/x",
            "--admin-token",
            "0123456789abcdef0123",
        ])
        .unwrap();
        let c = settings.config().unwrap();
        assert_eq!(c.grace_period, Duration::from_millis(250));
        assert_eq!(c.http_addr.host(), "localhost");
        let line = settings.effective();
        assert!(line.contains("GRACE_PERIOD_MS=250"), "{line}");
        assert!(
            line.contains("DATABASE_URL=postgres://app:***@db/x"),
            "{line}"
        );
        assert!(line.contains("ADMIN_TOKEN=***"), "{line}");
        assert!(line.contains("SWEEP_BATCH=5000"), "defaults shown: {line}");
        assert!(!line.contains("hunter22") && !line.contains("0123456789abcdef"));
        let secrets = settings.secrets();
        assert!(secrets.contains(&"hunter22".to_string()), "{secrets:?}");

        let bad = parse_cli(&["--grace-period-ms", "soon"]).unwrap().config();
        assert_eq!(bad.unwrap_err().var, "GRACE_PERIOD_MS");
        assert!(parse_cli(&["--no-such-flag", "1"]).is_err());

        // Every setting has a flag, and --help shows each default.
        use clap::Args;
        let mut cmd = Settings::augment_args(clap::Command::new("t"));
        let help = cmd.render_long_help().to_string();
        for s in SETTINGS {
            assert!(help.contains(&format!("--{}", s.flag())), "{}", s.var);
            assert!(help.contains(&format!("env: {}", s.var)), "{}", s.var);
            if let Some(default) = s.default {
                assert!(help.contains(&format!("default: {default}")), "{}", s.var);
            }
        }
    }

    /// The README's configuration table lists exactly these variables, with these defaults.
    #[test]
    fn the_readme_table_matches_the_settings() {
        let readme = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"));
        let section = readme
            .split("\n## Configuration\n")
            .nth(1)
            .expect("a Configuration section");
        let section = section.split("\n## ").next().unwrap();
        let rows: Vec<(String, Option<String>)> = section
            .lines()
            .filter(|l| l.starts_with("| `"))
            .map(|l| {
                let cells: Vec<&str> = l.split(" | ").collect();
                let var = cells[0]
                    .trim_start_matches("| ")
                    .trim_matches('`')
                    .to_string();
                let default = cells[1].trim();
                let code = default.len() > 1
                    && default.starts_with('`')
                    && default.ends_with('`')
                    && default.matches('`').count() == 2;
                (var, code.then(|| default.trim_matches('`').to_string()))
            })
            .collect();
        let expected: Vec<(String, Option<String>)> = SETTINGS
            .iter()
            .map(|s| (s.var.to_string(), s.default.map(String::from)))
            .collect();
        assert_eq!(rows, expected);
    }
}
