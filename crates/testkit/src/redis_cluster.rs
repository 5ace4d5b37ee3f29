//! A Redis Cluster of the test's own: `redis-server --cluster-enabled yes` on private ports,
//! joined with `redis-cli --cluster create`, optionally a replica per primary, every server
//! killed (and its directory removed) when the value is dropped.

use std::{path::PathBuf, time::Duration};

use anyhow::{bail, Context, Result};

use crate::{eventually, wait_port, Proc};

/// One server of the cluster.
pub struct ClusterNode {
    pub port: u16,
    /// The primary (an index into [`RedisCluster::nodes`]) this one was made a replica of.
    pub replica_of: Option<usize>,
    proc: Option<Proc>,
}

impl ClusterNode {
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn is_running(&self) -> bool {
        self.proc.is_some()
    }
}

pub struct RedisCluster {
    pub nodes: Vec<ClusterNode>,
    dir: PathBuf,
}

/// A port that is free, as is its cluster bus port (+10,000): below 55,536, so the bus port
/// exists. Chosen at random in 20,000..55,536 and bound to check, so parallel tests rarely
/// collide (and a collision fails the server's start, which `start` reports).
fn free_cluster_port(taken: &[u16]) -> u16 {
    let bindable = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
    loop {
        let port = 20_000 + (rand_u32() % 35_536) as u16;
        if !taken.contains(&port) && bindable(port) && bindable(port + 10_000) {
            return port;
        }
    }
}

/// Random enough for a port: a fresh UUID's bits.
fn rand_u32() -> u32 {
    uuid::Uuid::new_v4().as_u128() as u32
}

async fn connect(port: u16) -> Result<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    Ok(client.get_multiplexed_async_connection().await?)
}

/// A node's `INFO replication` text; `None` while it does not answer.
async fn replication(conn: &mut redis::aio::MultiplexedConnection) -> Option<String> {
    redis::cmd("INFO")
        .arg("replication")
        .query_async(conn)
        .await
        .ok()
}

/// `CLUSTER INFO`/`INFO` text's value of `field`.
fn field<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

impl RedisCluster {
    /// `primaries` primaries sharing the 16,384 slots, each with `replicas` replicas, every
    /// node agreeing the cluster is up and every replica in sync before this returns.
    pub async fn start(primaries: usize, replicas: usize) -> Result<RedisCluster> {
        let dir = std::env::temp_dir().join(format!("sw-cluster-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir)?;
        let mut cluster = RedisCluster {
            nodes: Vec::new(),
            dir,
        };
        let total = primaries * (1 + replicas);
        let mut ports = Vec::new();
        for i in 0..total {
            let port = free_cluster_port(&ports);
            ports.push(port);
            let replica_of = (i >= primaries).then(|| (i - primaries) % primaries);
            let port_arg = port.to_string();
            let config = cluster.dir.join(format!("nodes-{port}.conf"));
            let args = [
                "--port",
                &port_arg,
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                config.to_str().unwrap(),
                "--cluster-node-timeout",
                "2000",
                "--dir",
                cluster.dir.to_str().unwrap(),
                "--save",
                "",
                "--appendonly",
                "no",
                // A replica's first sync starts at once, not 5 s later.
                "--repl-diskless-sync-delay",
                "0",
            ];
            let proc = Proc::spawn(std::path::Path::new("redis-server"), &args, &[]);
            cluster.nodes.push(ClusterNode {
                port,
                replica_of,
                proc: Some(proc),
            });
        }
        for node in &cluster.nodes {
            wait_port(node.port).await;
        }
        let mut create = std::process::Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for node in &cluster.nodes[..primaries] {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        let out = create
            .arg("--cluster-yes")
            .output()
            .context("running redis-cli --cluster create")?;
        if !out.status.success() {
            bail!(
                "redis-cli --cluster create failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // Replicas: each meets its primary and replicates it.
        for i in primaries..total {
            let primary = cluster.nodes[cluster.nodes[i].replica_of.unwrap()].port;
            let id = cluster.node_id(primary).await?;
            let mut conn = connect(cluster.nodes[i].port).await?;
            redis::cmd("CLUSTER")
                .arg("MEET")
                .arg("127.0.0.1")
                .arg(primary)
                .query_async::<()>(&mut conn)
                .await?;
            eventually(
                Duration::from_secs(20),
                "a replica to learn its primary",
                || {
                    let (mut conn, id) = (conn.clone(), id.clone());
                    async move {
                        redis::cmd("CLUSTER")
                            .arg("REPLICATE")
                            .arg(&id)
                            .query_async::<()>(&mut conn)
                            .await
                            .ok()
                    }
                },
            )
            .await;
        }
        cluster.wait_ok().await;
        for node in &cluster.nodes[primaries..] {
            let conn = connect(node.port).await?;
            eventually(Duration::from_secs(30), "a replica in sync", || {
                let mut conn = conn.clone();
                async move {
                    let info = replication(&mut conn).await?;
                    (field(&info, "master_link_status") == Some("up")).then_some(())
                }
            })
            .await;
        }
        Ok(cluster)
    }

    /// Seed node URLs, comma-separated: CACHE_REDIS_URL with CACHE_REDIS_CLUSTER=true.
    pub fn seeds(&self) -> String {
        self.nodes
            .iter()
            .filter(|n| n.replica_of.is_none())
            .map(ClusterNode::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The node id of the server on `port` (`CLUSTER MYID`).
    pub async fn node_id(&self, port: u16) -> Result<String> {
        let mut conn = connect(port).await?;
        Ok(redis::cmd("CLUSTER")
            .arg("MYID")
            .query_async(&mut conn)
            .await?)
    }

    /// Waits until every running node says `cluster_state:ok` and they all agree on who
    /// serves every slot.
    pub async fn wait_ok(&self) {
        let ports: Vec<u16> = self
            .nodes
            .iter()
            .filter(|n| n.is_running())
            .map(|n| n.port)
            .collect();
        eventually(Duration::from_secs(30), "the cluster to be ok", || {
            let ports = ports.clone();
            async move {
                let mut maps = Vec::new();
                for port in ports {
                    let mut conn = connect(port).await.ok()?;
                    let info: String = redis::cmd("CLUSTER")
                        .arg("INFO")
                        .query_async(&mut conn)
                        .await
                        .ok()?;
                    if field(&info, "cluster_state") != Some("ok") {
                        return None;
                    }
                    let slots: redis::Value = redis::cmd("CLUSTER")
                        .arg("SLOTS")
                        .query_async(&mut conn)
                        .await
                        .ok()?;
                    let map =
                        stalewatch_core::slots::Topology::from_cluster_slots(&slots, "127.0.0.1")
                            .ok()?;
                    if !map.is_complete() {
                        return None;
                    }
                    maps.push(map.primaries());
                }
                maps.windows(2).all(|w| w[0] == w[1]).then_some(())
            }
        })
        .await
    }

    /// Which primary serves each slot, as the first running node says.
    pub async fn topology(&self) -> Result<stalewatch_core::slots::Topology> {
        let node = self
            .nodes
            .iter()
            .find(|n| n.is_running())
            .context("no node running")?;
        let mut conn = connect(node.port).await?;
        let slots: redis::Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut conn)
            .await?;
        stalewatch_core::slots::Topology::from_cluster_slots(&slots, "127.0.0.1")
            .map_err(anyhow::Error::msg)
    }

    /// The node on `port`'s index.
    pub fn index(&self, port: u16) -> Option<usize> {
        self.nodes.iter().position(|n| n.port == port)
    }

    /// Waits until every primary's replicas have applied all of its writes so far (their
    /// replication offsets equal), so a failover loses none of them. (Not `WAIT`: it only
    /// counts the writes of the connection it is sent on.)
    pub async fn replicate(&self) -> Result<()> {
        for (i, node) in self.nodes.iter().enumerate() {
            if !node.is_running() || !self.nodes.iter().any(|n| n.replica_of == Some(i)) {
                continue;
            }
            let conn = connect(node.port).await?;
            eventually(Duration::from_secs(30), "the replicas to catch up", || {
                let mut conn = conn.clone();
                async move {
                    let info = replication(&mut conn).await?;
                    let offset = field(&info, "master_repl_offset")?;
                    let replicas: Vec<&str> = info
                        .lines()
                        .filter(|l| l.starts_with("slave") && l.contains("offset="))
                        .collect();
                    let caught_up = !replicas.is_empty()
                        && replicas.iter().all(|l| {
                            l.split(',').any(|kv| kv == format!("offset={offset}"))
                                && l.contains("state=online")
                        });
                    caught_up.then_some(())
                }
            })
            .await;
        }
        Ok(())
    }

    /// Kills node `i` with SIGKILL, as a crash.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut proc) = self.nodes[i].proc.take() {
            proc.kill9();
        }
    }

    /// Makes replica `i` its primary's successor at once (`CLUSTER FAILOVER TAKEOVER`: no
    /// agreement asked of the other primaries, so it works with the primary dead), then waits
    /// until every running node agrees.
    pub async fn take_over(&self, i: usize) -> Result<()> {
        let mut conn = connect(self.nodes[i].port).await?;
        redis::cmd("CLUSTER")
            .arg("FAILOVER")
            .arg("TAKEOVER")
            .query_async::<()>(&mut conn)
            .await?;
        eventually(Duration::from_secs(30), "the replica to take over", || {
            let mut conn = conn.clone();
            async move {
                let info = replication(&mut conn).await?;
                (field(&info, "role") == Some("master")).then_some(())
            }
        })
        .await;
        self.wait_ok().await;
        Ok(())
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.proc.take();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
