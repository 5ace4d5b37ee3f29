//! The watched cache as a Redis Cluster (`CACHE_REDIS_CLUSTER=true`): redis-rs's cluster
//! client for single-key commands (it routes each by slot and follows MOVED and ASK), plus
//! what it does not do for us:
//!
//! - **Batches by node.** A batch of keys (a sweep page, a rebuild page) is split by the
//!   primary serving each key (`crate::slots`, from our own reading of `CLUSTER SLOTS`) and
//!   sent as one pipeline per primary, all primaries at once: a batch costs one round trip per
//!   node, not one per key or per slot. redis-rs refuses a pipeline whose keys span slots
//!   (CROSSSLOT), so it cannot do this itself; why not its own split of MGET: docs/redis.md.
//! - **Redirects inside a pipeline.** A pipeline's MOVED or ASK replies come back inline, and
//!   redis-rs follows none of them. A group that got one is sent again after our map is read
//!   anew (and one plain command for its key has made redis-rs rebuild its own map), up to
//!   [`ATTEMPTS`] times; a group of one command is finally sent alone, which redis-rs routes
//!   and redirects itself.
//! - **Per-node commands.** SCAN and keyspace notifications are node-local: the primaries come
//!   from the same map, each addressed by the slots it serves.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use futures::future::join_all;
use redis::{
    aio::ConnectionLike,
    cluster::ClusterClientBuilder,
    cluster_async::ClusterConnection,
    cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr},
    Cmd, ConnectionAddr, ConnectionInfo, RedisError, RedisResult, ServerErrorKind, Value,
};
use tokio::sync::RwLock;

use crate::slots::{self, Node, Topology};

/// Sends of a group that was answered with a redirect, before giving up on it.
pub const ATTEMPTS: usize = 3;

/// How long our reading of the slot map is trusted without a redirect telling otherwise.
const TOPOLOGY_TTL: Duration = Duration::from_secs(5);

/// Where a Redis Cluster is: its seed nodes, and the CA of a `rediss://` one.
#[derive(Debug, Clone)]
pub struct Seeds {
    pub nodes: Vec<ConnectionInfo>,
    /// PEM of the CA file (`CACHE_REDIS_CA_FILE`, else `REDIS_CA_FILE`).
    pub ca: Option<Vec<u8>>,
}

/// Timeouts of a connection to the watched cache.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    /// For one reply (of a pipeline: of the whole pipeline).
    pub response: Duration,
}

/// Commands about one key (or keys of its slot), sent together: one pipeline's worth for a
/// single node, or one part of a node's pipeline in a cluster.
#[derive(Debug, Clone)]
pub struct Keyed {
    pub key: String,
    pub commands: Vec<Cmd>,
}

impl Keyed {
    pub fn one(key: impl Into<String>, cmd: Cmd) -> Keyed {
        Keyed {
            key: key.into(),
            commands: vec![cmd],
        }
    }
}

/// A redirect, or a cluster not serving the slot right now: the reply of a command sent to
/// the node that no longer holds its key.
fn misrouted(value: &Value) -> bool {
    match value {
        Value::ServerError(e) => matches!(
            e.kind(),
            Some(
                ServerErrorKind::Moved
                    | ServerErrorKind::Ask
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::ReadOnly
            )
        ),
        // Inside MULTI the command was refused when queued: EXEC aborts.
        _ => false,
    }
}

fn aborted(value: &Value) -> bool {
    matches!(value, Value::ServerError(e) if e.kind() == Some(ServerErrorKind::ExecAbort))
}

struct Known {
    topology: Topology,
    read_at: Instant,
}

/// A connection to a Redis Cluster. Cheap to clone: clones share the connection and the map.
#[derive(Clone)]
pub struct ClusterCache {
    conn: ClusterConnection,
    /// The first seed, for each node's connection settings (user, password, TLS).
    seed: ConnectionInfo,
    known: Arc<RwLock<Option<Known>>>,
}

impl ClusterCache {
    pub async fn connect(seeds: &Seeds, timeouts: Timeouts) -> RedisResult<ClusterCache> {
        crate::tls::install_crypto_provider();
        let seed = seeds.nodes.first().cloned().ok_or_else(|| {
            RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "no seed node in CACHE_REDIS_URL",
            ))
        })?;
        let mut builder = ClusterClientBuilder::new(seeds.nodes.clone())
            .connection_timeout(timeouts.connect)
            .response_timeout(timeouts.response)
            .retries(3)
            .min_retry_wait(50)
            .max_retry_wait(500);
        if let Some(pem) = &seeds.ca {
            builder = builder.certs(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.clone()),
            });
        }
        let conn = builder.build()?.get_async_connection().await?;
        let cache = ClusterCache {
            conn,
            seed,
            known: Arc::default(),
        };
        cache.topology(true).await?;
        Ok(cache)
    }

    /// The shared connection, for single-key commands (routed by redis-rs).
    pub fn connection(&self) -> ClusterConnection {
        self.conn.clone()
    }

    /// Which primary serves each slot: our last reading of `CLUSTER SLOTS` while it is
    /// younger than [`TOPOLOGY_TTL`] and `fresh` is not asked for, else a new one.
    pub async fn topology(&self, fresh: bool) -> RedisResult<Topology> {
        if !fresh {
            if let Some(known) = self.known.read().await.as_ref() {
                if known.read_at.elapsed() < TOPOLOGY_TTL {
                    return Ok(known.topology.clone());
                }
            }
        }
        let reply = self
            .conn
            .clone()
            .route_command(
                redis::cmd("CLUSTER").arg("SLOTS").clone(),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
            )
            .await?;
        let host = match self.seed.addr() {
            ConnectionAddr::Tcp(host, _) | ConnectionAddr::TcpTls { host, .. } => host.clone(),
            _ => String::new(),
        };
        let topology = Topology::from_cluster_slots(&reply, &host).map_err(|e| {
            RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "unreadable CLUSTER SLOTS",
                e,
            ))
        })?;
        *self.known.write().await = Some(Known {
            topology: topology.clone(),
            read_at: Instant::now(),
        });
        Ok(topology)
    }

    /// How to connect to `node` by itself (pub/sub): the seed's user, password and TLS.
    pub fn node_info(&self, node: &Node) -> ConnectionInfo {
        let addr = match self.seed.addr() {
            ConnectionAddr::TcpTls {
                insecure,
                tls_params,
                ..
            } => ConnectionAddr::TcpTls {
                host: node.host.clone(),
                port: node.port,
                insecure: *insecure,
                tls_params: tls_params.clone(),
            },
            _ => ConnectionAddr::Tcp(node.host.clone(), node.port),
        };
        self.seed.clone().set_addr(addr)
    }

    /// Sends `cmd` to `node` itself: for commands without a key (SCAN), which any node would
    /// answer about its own keys, so routing by slot could silently ask another one (redis-rs
    /// falls back to another connection while a node is down).
    pub async fn on_node<T: redis::FromRedisValue>(
        &self,
        node: &Node,
        cmd: &Cmd,
    ) -> RedisResult<T> {
        let value = self
            .conn
            .clone()
            .route_command(
                cmd.clone(),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: node.host.clone(),
                    port: node.port,
                }),
            )
            .await?;
        Ok(redis::from_redis_value(value)?)
    }

    /// Sends every group's commands, one pipeline per primary (all at once), and returns each
    /// group's replies, errors inline (`Value::ServerError`). See the module documentation for
    /// redirects.
    pub async fn grouped(&self, groups: &[Keyed]) -> RedisResult<Vec<Vec<Value>>> {
        let mut replies: Vec<Option<Vec<Value>>> = vec![None; groups.len()];
        let mut pending: Vec<usize> = (0..groups.len()).collect();
        for attempt in 0..ATTEMPTS {
            if pending.is_empty() {
                break;
            }
            let topology = self.topology(attempt > 0).await?;
            let by_node = topology.group(pending.iter().map(|&i| groups[i].key.as_bytes()));
            let sends = by_node.into_iter().map(|(node, idx)| {
                let members: Vec<usize> = idx.into_iter().map(|j| pending[j]).collect();
                self.send_node(node.is_some(), groups, members)
            });
            let mut still = Vec::new();
            for sent in join_all(sends).await {
                for (i, answer) in sent? {
                    if answer.iter().any(|v| misrouted(v) || aborted(v)) {
                        still.push(i);
                    }
                    replies[i] = Some(answer);
                }
            }
            still.sort_unstable();
            if !still.is_empty() {
                // One plain command per moved key's slot makes redis-rs follow the redirect
                // and rebuild its own map, which routes the next pipelines.
                let mut probed = std::collections::BTreeSet::new();
                for &i in &still {
                    if probed.insert(slots::slot(groups[i].key.as_bytes())) {
                        let _ = self
                            .conn
                            .clone()
                            .req_packed_command(redis::cmd("EXISTS").arg(&groups[i].key))
                            .await;
                    }
                }
                tracing::debug!(
                    groups = still.len(),
                    attempt,
                    "cluster replies redirected; reading the slot map again"
                );
            }
            pending = still;
        }
        // Single commands left: sent alone, redis-rs follows their redirects.
        for i in pending {
            if let [cmd] = groups[i].commands.as_slice() {
                let value = match self.conn.clone().req_packed_command(cmd).await {
                    Ok(v) => v,
                    // A server's refusal stays this group's inline reply, as in a pipeline.
                    Err(e) => Value::ServerError(redis::ServerError::try_from(e)?),
                };
                replies[i] = Some(vec![value]);
            }
        }
        Ok(replies.into_iter().map(Option::unwrap_or_default).collect())
    }

    /// One pipeline of the groups `members` (all served by one primary when `known`), sent to
    /// the primary of the first one's slot; each group's replies.
    async fn send_node(
        &self,
        known: bool,
        groups: &[Keyed],
        members: Vec<usize>,
    ) -> RedisResult<Vec<(usize, Vec<Value>)>> {
        if !known {
            // No primary serves the slot in our map: each group on its own, by slot.
            let mut out = Vec::with_capacity(members.len());
            for i in members {
                let mut pipe = redis::pipe();
                for cmd in &groups[i].commands {
                    pipe.add_command(cmd.clone());
                }
                let n = groups[i].commands.len();
                let slot = slots::slot(groups[i].key.as_bytes());
                out.push((i, self.route(pipe, n, slot).await?));
            }
            return Ok(out);
        }
        let mut pipe = redis::pipe();
        let mut total = 0;
        for &i in &members {
            for cmd in &groups[i].commands {
                pipe.add_command(cmd.clone());
            }
            total += groups[i].commands.len();
        }
        let slot = slots::slot(groups[members[0]].key.as_bytes());
        let mut values = self.route(pipe, total, slot).await?.into_iter();
        Ok(members
            .into_iter()
            .map(|i| (i, values.by_ref().take(groups[i].commands.len()).collect()))
            .collect())
    }

    async fn route(&self, pipe: redis::Pipeline, n: usize, slot: u16) -> RedisResult<Vec<Value>> {
        let values = self
            .conn
            .clone()
            .route_pipeline(
                pipe,
                0,
                n,
                SingleNodeRoutingInfo::SpecificNode(Route::new(slot, SlotAddr::Master)),
            )
            .await?;
        // A reply short of the commands sent would shift every later group's replies.
        if values.len() != n {
            return Err(RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "a pipeline answered with another number of replies than commands",
                format!("{} for {n}", values.len()),
            )));
        }
        Ok(values)
    }
}
