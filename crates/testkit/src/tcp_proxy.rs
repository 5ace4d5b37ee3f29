//! A TCP proxy between a client under test and its server that can kill the connections
//! passing through it the way a failover or a NAT or load balancer dropping a flow does:
//! silently.
//!
//! Restarting a local server is not the same thing: the server closes its sockets on the way
//! down, the client's kernel hears about it at once, and a client that watches its sockets
//! knows those connections are dead before it uses them. After [`TcpProxy::reset_all`] the
//! client hears nothing: its connections look open and idle, and only the next thing it
//! sends on one is answered, with a reset (`ECONNRESET`), as a peer that no longer knows the
//! connection answers.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        tcp::{ReadHalf, WriteHalf},
        TcpListener, TcpStream,
    },
    sync::watch,
    task::JoinHandle,
};

/// Forwards every connection made to `127.0.0.1:port()` to `upstream`, until
/// [`reset_all`](Self::reset_all) kills those open at the time. Stops (closing everything)
/// when dropped.
pub struct TcpProxy {
    port: u16,
    /// Bumped by `reset_all`. Each connection watches it from the moment it was accepted, so
    /// only connections open at the time of a reset see it; dropping the sender (the proxy)
    /// tells them all to stop.
    resets: watch::Sender<u64>,
    forwarding: Arc<AtomicUsize>,
    accept: JoinHandle<()>,
}

impl TcpProxy {
    /// Listens on an ephemeral port of 127.0.0.1. Must be called within a tokio runtime.
    pub async fn start(upstream: SocketAddr) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("the proxy binds 127.0.0.1:0");
        let port = listener.local_addr().expect("the proxy's address").port();
        let (resets, _) = watch::channel(0u64);
        let forwarding = Arc::new(AtomicUsize::new(0));
        let accept = tokio::spawn({
            let resets = resets.clone();
            let forwarding = Arc::clone(&forwarding);
            async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        // Out of file descriptors, say: don't spin.
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        continue;
                    };
                    // Subscribed here, at accept: the connection sees the resets after this
                    // one, not those before it.
                    let reset = resets.subscribe();
                    let guard = Forwarding::new(&forwarding);
                    tokio::spawn(serve(client, upstream, reset, guard));
                }
            }
        });
        TcpProxy {
            port,
            resets,
            forwarding,
            accept,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// How many connections are being forwarded right now (not counting those a reset cut).
    pub fn forwarding(&self) -> usize {
        self.forwarding.load(Ordering::SeqCst)
    }

    /// Kills every connection open right now, without telling its client: the upstream side
    /// is closed, nothing more is forwarded either way, and the client side is held open and
    /// unread until the client sends something on it, which is answered with a reset (the
    /// socket is closed with `SO_LINGER` 0). Connections made afterwards are forwarded as
    /// usual.
    ///
    /// Takes effect at once: a byte read from either side after this call is never
    /// forwarded, even if the connection's task has not yet noticed the reset.
    pub fn reset_all(&self) {
        self.resets.send_modify(|n| *n += 1);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        // The connections' tasks end when `resets` (dropped with the proxy) closes.
        self.accept.abort();
    }
}

/// Counts a connection as forwarded for as long as it lives.
struct Forwarding(Arc<AtomicUsize>);

impl Forwarding {
    fn new(count: &Arc<AtomicUsize>) -> Forwarding {
        count.fetch_add(1, Ordering::SeqCst);
        Forwarding(Arc::clone(count))
    }
}

impl Drop for Forwarding {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How the forwarding of one connection ended.
enum End {
    /// Both sides closed (or failed) by themselves.
    Closed,
    /// `reset_all` was called.
    Reset,
    /// The proxy was dropped.
    Stopped,
}

async fn serve(
    mut client: TcpStream,
    upstream: SocketAddr,
    mut reset: watch::Receiver<u64>,
    forwarding: Forwarding,
) {
    // Failing to reach upstream closes the client's connection, as a refused one would.
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let end = {
        let (mut client_rx, mut client_tx) = client.split();
        let (mut server_rx, mut server_tx) = server.split();
        let (up_reset, down_reset) = (reset.clone(), reset.clone());
        let both_ways = async move {
            let (up, down) = tokio::join!(
                pump(&mut client_rx, &mut server_tx, up_reset),
                pump(&mut server_rx, &mut client_tx, down_reset),
            );
            match (up, down) {
                (End::Stopped, _) | (_, End::Stopped) => End::Stopped,
                (End::Reset, _) | (_, End::Reset) => End::Reset,
                (End::Closed, End::Closed) => End::Closed,
            }
        };
        // `pump` never forwards past a reset by itself; this stops idle connections too (and
        // closes their upstream side) as soon as the reset is sent.
        tokio::select! {
            biased;
            changed = reset.changed() => match changed {
                Ok(()) => End::Reset,
                Err(_) => End::Stopped,
            },
            end = both_ways => end,
        }
    };
    drop(server);
    drop(forwarding);
    if !matches!(end, End::Reset) {
        return;
    }
    // The black hole: the client still believes in the connection. Whatever it sends next is
    // answered with a reset, as by a host (a new primary, a NAT that forgot the flow) that
    // does not know this connection.
    let mut byte = [0u8; 1];
    tokio::select! {
        read = client.read(&mut byte) => {
            if matches!(read, Ok(n) if n > 0) {
                let _ = client.set_zero_linger();
            }
            // Otherwise the client closed (or reset) it itself; a plain close will do.
        }
        // Later resets change nothing here; only the proxy's end does.
        _ = async { while reset.changed().await.is_ok() {} } => {}
    }
}

/// Copies `from` to `to` until `from` ends (then shuts `to` down for writing) or a reset.
/// Checks for a reset between reading and writing, so nothing read after `reset_all` is ever
/// forwarded.
async fn pump(from: &mut ReadHalf<'_>, to: &mut WriteHalf<'_>, reset: watch::Receiver<u64>) -> End {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return End::Closed;
            }
            Ok(n) => n,
        };
        match reset.has_changed() {
            Ok(false) => {}
            Ok(true) => return End::Reset,
            Err(_) => return End::Stopped,
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return End::Closed;
        }
    }
}
