//! The API binary over raw TCP, as a misbehaving client sees it: bodies that stall, heads
//! that never end, malformed requests, oversized URLs. Each must cost the server a connection
//! for no longer than `HTTP_CLIENT_TIMEOUT_MS`, and none may write an ERROR log line (any
//! client can send them at will).

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use serde_json::Value;
use stalewatch_testkit::{bin_path, eventually, free_port, scaled, Proc, TestEnv};

/// The API's client time-out in these tests (actix's timers are coarse: the tests expect
/// closures after half of it at the earliest).
const CLIENT_TIMEOUT_MS: u64 = 500;

/// How long a connection may stay open after its client stopped sending, before the test
/// calls it held (scaled): the time-out, actix's one-second disconnect time-out, slack.
const CLOSED_WITHIN: Duration = Duration::from_secs(5);

/// Stalled connections opened at once: each must be cut off, not only the first.
const STALLED: usize = 40;

struct Api {
    proc: Proc,
    port: u16,
}

impl Api {
    async fn start(env: &TestEnv) -> Api {
        let port = free_port();
        let mut vars = env.env_vars();
        vars.push(("HTTP_ADDR".into(), format!("127.0.0.1:{port}")));
        vars.push((
            "HTTP_CLIENT_TIMEOUT_MS".into(),
            CLIENT_TIMEOUT_MS.to_string(),
        ));
        vars.push(("LOG_FORMAT".into(), "json".into()));
        let proc = Proc::spawn(&bin_path("stalewatch-api"), &[], &vars);
        let api = Api { proc, port };
        eventually(Duration::from_secs(30), "the API to answer", || {
            let ok = api
                .exchange(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                .ok()
                .is_some_and(|r| r.status == 200);
            async move { ok.then_some(()) }
        })
        .await;
        api
    }

    /// Sends `bytes` and reads until the server closes the connection (an error if it has
    /// not closed it after [`CLOSED_WITHIN`]).
    fn exchange(&self, bytes: &[u8]) -> std::io::Result<Reply> {
        let started = Instant::now();
        let mut conn = TcpStream::connect(("127.0.0.1", self.port))?;
        conn.set_read_timeout(Some(scaled(CLOSED_WITHIN)))?;
        conn.write_all(bytes)?;
        let mut raw = Vec::new();
        match conn.read_to_end(&mut raw) {
            Ok(_) => {}
            // A reset after the answer is a close too.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!(
                        "still open after {:?} ({e}); read so far: {:?}",
                        started.elapsed(),
                        String::from_utf8_lossy(&raw)
                    ),
                ))
            }
        }
        Ok(Reply::parse(&raw, started.elapsed()))
    }

    /// The log lines the process wrote, as JSON.
    fn log(&self) -> Vec<Value> {
        self.proc
            .output()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

#[derive(Debug)]
struct Reply {
    status: u16,
    head: String,
    body: String,
    took: Duration,
}

impl Reply {
    fn parse(raw: &[u8], took: Duration) -> Reply {
        let text = String::from_utf8_lossy(raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        Reply {
            status,
            head: head.to_ascii_lowercase(),
            body: body.to_string(),
            took,
        }
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }
}

/// Headers that declare a 100-byte body, and 11 bytes of it.
fn stalled(method_path: &str) -> Vec<u8> {
    format!(
        "{method_path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
         Content-Length: 100\r\n\r\n{{\"name\":\"a\""
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread")]
async fn stalled_bodies_slow_heads_and_idle_connections_are_cut_off() {
    let env = TestEnv::new().await.unwrap();
    let api = Api::start(&env).await;
    let refresh = format!("POST /items/{}/refresh", uuid::Uuid::now_v7());
    let requests: Vec<(&str, Vec<u8>)> = (0..STALLED)
        .map(|i| match i % 4 {
            // A handler that reads the body: it gets the time-out, as a 408 in JSON.
            0 => ("stalled POST /items", stalled("POST /items")),
            1 => (
                "stalled PUT",
                stalled(&format!("PUT /items/{}", uuid::Uuid::now_v7())),
            ),
            // Handlers that read no body answer; the connection closes behind them.
            2 => ("stalled refresh", stalled(&refresh)),
            // A head that never ends: actix's own 408.
            _ => (
                "slow head",
                b"GET /healthz HTTP/1.1\r\nHost: t\r\n".to_vec(),
            ),
        })
        .collect();
    let replies: Vec<(&str, std::io::Result<Reply>)> = std::thread::scope(|s| {
        let handles: Vec<_> = requests
            .iter()
            .map(|(what, bytes)| (*what, s.spawn(|| api.exchange(bytes))))
            .collect();
        handles
            .into_iter()
            .map(|(what, h)| (what, h.join().unwrap()))
            .collect()
    });
    for (what, reply) in replies {
        let reply = reply.unwrap_or_else(|e| panic!("{what}: the connection is held: {e}"));
        match what {
            "stalled POST /items" | "stalled PUT" => {
                assert_eq!(reply.status, 408, "{what}: {reply:?}");
                assert_eq!(reply.json()["error"]["code"], "request_timeout", "{what}");
                assert!(
                    reply.head.contains("connection: close"),
                    "{what}: {reply:?}"
                );
                assert!(
                    reply.took >= Duration::from_millis(CLIENT_TIMEOUT_MS / 2),
                    "{what}: answered before the time-out: {reply:?}"
                );
            }
            "stalled refresh" => {
                // Refused (no token) without waiting for the body, which it does not read.
                assert_eq!(reply.status, 401, "{what}: {reply:?}");
                assert_eq!(reply.json()["error"]["code"], "unauthorized", "{what}");
            }
            _ => assert_eq!(reply.status, 408, "{what}: {reply:?}"),
        }
    }

    // A kept-alive connection that goes idle after a complete request is closed too.
    let reply = api
        .exchange(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .expect("an idle kept-alive connection is closed");
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(
        reply.took >= Duration::from_millis(CLIENT_TIMEOUT_MS / 2),
        "closed before the keep-alive time: {reply:?}"
    );

    // The server still serves.
    let reply = api
        .exchange(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn client_faults_answer_in_json_where_actix_lets_us_and_never_log_at_error() {
    let env = TestEnv::new().await.unwrap();
    let api = Api::start(&env).await;

    // Rejected by actix's HTTP/1 parser before any application code runs: it writes these
    // responses itself, with empty bodies, and closes the connection.
    let parser_faults: [(&str, Vec<u8>); 3] = [
        ("malformed request line", b"GARBAGE\r\n\r\n".to_vec()),
        (
            "100 KB URI",
            format!("GET /{} HTTP/1.1\r\nHost: t\r\n\r\n", "a".repeat(100_000)).into_bytes(),
        ),
        (
            "bad Content-Length",
            b"POST /items HTTP/1.1\r\nHost: t\r\nContent-Length: abc\r\n\r\n".to_vec(),
        ),
    ];
    for (what, bytes) in &parser_faults {
        let reply = api.exchange(bytes).unwrap();
        assert_eq!(reply.status, 400, "{what}: {reply:?}");
    }

    // What reaches the application answers in JSON.
    let long = "a".repeat(20_000);
    let reply = api
        .exchange(
            format!("GET /{long} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .unwrap();
    assert_eq!(reply.status, 404, "{reply:?}");
    let message = reply.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.len() < 400,
        "the 20 KB path is echoed whole: {message}"
    );
    let reply = api
        .exchange(
            b"POST /items HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
              Transfer-Encoding: chunked\r\n\r\nzz\r\n",
        )
        .unwrap();
    assert_eq!(reply.status, 400, "{reply:?}");
    assert_eq!(reply.json()["error"]["code"], "bad_request");
    let reply = api.exchange(&stalled("POST /items")).unwrap();
    assert_eq!(reply.status, 408, "{reply:?}");
    let reply = api
        .exchange(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
        .unwrap();
    assert_eq!(reply.status, 408, "{reply:?}");

    // Each parser fault is logged once, at WARN, with the error as a field.
    let faults = parser_faults.len();
    let warned = eventually(
        Duration::from_secs(10),
        "the client faults to be logged",
        || {
            let warned: Vec<Value> = api
                .log()
                .into_iter()
                .filter(|l| l["message"] == "HTTP connection closed on a client error")
                .collect();
            async move { (warned.len() >= faults).then_some(warned) }
        },
    )
    .await;
    for line in &warned {
        assert_eq!(line["level"], "WARN", "{line}");
        assert!(
            line["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{line}"
        );
    }
    let errors: Vec<Value> = api
        .log()
        .into_iter()
        .filter(|l| l["level"] == "ERROR")
        .collect();
    assert!(errors.is_empty(), "a client wrote ERROR lines: {errors:?}");
}
