//! The API in-process while its Redis or PostgreSQL restarts under it. Each test has servers
//! of its own (testkit's `redis_server` and `PgServer`), so the restarts disturb no other test.
//!
//! A restart is routine (an upgrade, a failover, a crashed server brought back by its
//! supervisor): once the server is back, the very first request must succeed. A connection
//! that died with the old server is the API's problem to notice and replace, not the
//! client's to retry.

use std::{rc::Rc, time::Duration};

use actix_web::{
    http::StatusCode,
    test::{self, TestRequest},
    web::Bytes,
    App,
};
use diesel_async::RunQueryDsl;
use futures::future::LocalBoxFuture;
use serde_json::{json, Value};
use stalewatch_api::state::AppState;
use stalewatch_core::config::Config;
use stalewatch_testkit::{free_port, redis_server, scaled, PgServer, TcpProxy, TestEnv};
use uuid::Uuid;

/// How long one request may take before the test calls it hung (scaled).
const REQUEST_DEADLINE: Duration = Duration::from_secs(30);

// ---- harness ------------------------------------------------------------------------------

struct Reply {
    status: StatusCode,
    body: Bytes,
}

impl Reply {
    fn expect(&self, status: StatusCode, what: &str) -> Value {
        assert_eq!(
            self.status,
            status,
            "{what}: body {:?}",
            String::from_utf8_lossy(&self.body)
        );
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{what}: not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// The app under test, behind a closure because the actix test service's type is
/// unnameable.
struct Api {
    state: AppState,
    call: Box<dyn Fn(TestRequest) -> LocalBoxFuture<'static, Reply>>,
}

impl Api {
    async fn start(config: Config) -> Api {
        let state = AppState::connect(config).await.expect("AppState::connect");
        let app = Rc::new(
            test::init_service(App::new().configure(stalewatch_api::configure(state.clone())))
                .await,
        );
        let call = Box::new(move |req: TestRequest| -> LocalBoxFuture<'static, Reply> {
            let app = Rc::clone(&app);
            Box::pin(async move {
                let resp = test::call_service(&*app, req.to_request()).await;
                let status = resp.status();
                let body = test::read_body(resp).await;
                Reply { status, body }
            })
        });
        Api { state, call }
    }

    /// Sends `req`; a request that hangs fails the test instead of hanging it.
    async fn send(&self, what: &str, req: TestRequest) -> Reply {
        tokio::time::timeout(scaled(REQUEST_DEADLINE), (self.call)(req))
            .await
            .unwrap_or_else(|_| panic!("{what}: no answer in {:?}", scaled(REQUEST_DEADLINE)))
    }

    async fn get(&self, uri: &str) -> Reply {
        self.send(&format!("GET {uri}"), TestRequest::get().uri(uri))
            .await
    }

    /// A POST to a mutating route (a refresh), with the admin token.
    async fn post(&self, uri: &str) -> Reply {
        let req = TestRequest::post().uri(uri).insert_header((
            actix_web::http::header::AUTHORIZATION,
            format!("Bearer {}", stalewatch_testkit::ADMIN_TOKEN),
        ));
        self.send(&format!("POST {uri}"), req).await
    }

    /// Creates an item; returns its id.
    async fn create(&self, name: &str) -> Uuid {
        let item = self
            .send(
                "POST /items",
                TestRequest::post()
                    .uri("/items")
                    .set_json(json!({ "name": name, "value": { "n": 1 } })),
            )
            .await
            .expect(StatusCode::CREATED, "POST /items");
        item["id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no UUID id in {item}"))
    }

    /// GET /items/{id} with its cache key deleted first, so the answer has to come from
    /// PostgreSQL.
    async fn get_from_db(&self, id: Uuid, what: &str) {
        let key = self.state.cache.keys().item(&id);
        self.state.cache.delete(&key).await.expect("redis DEL");
        let body = self
            .get(&format!("/items/{id}"))
            .await
            .expect(StatusCode::OK, what);
        assert_eq!(body["source"], "db", "{what}: {body}");
    }
}

// ---- tests --------------------------------------------------------------------------------

#[actix_web::test]
async fn refresh_succeeds_on_the_first_try_after_a_redis_restart() {
    let port = free_port();
    let mut redis = redis_server(port).await;
    let env = TestEnv::with_redis(&format!("redis://127.0.0.1:{port}"))
        .await
        .unwrap();
    let api = Api::start(env.config()).await;
    let id = api.create("survives a Redis restart").await;
    let refresh = format!("/items/{id}/refresh");
    api.post(&refresh)
        .await
        .expect(StatusCode::OK, "refresh before the restart");

    // A crash and a supervisor bringing Redis back on the same port, empty (no persistence).
    redis.kill9();
    let _restarted = redis_server(port).await;

    let body = api
        .post(&refresh)
        .await
        .expect(StatusCode::OK, "the first refresh after the Redis restart");
    assert_eq!(body["refreshed"], true, "{body}");
}

#[actix_web::test]
async fn reads_succeed_on_the_first_try_after_a_postgres_restart() {
    const POOL_SIZE: usize = 4;
    let pg = PgServer::start(free_port()).await;
    let database_url = pg.create_database("stalewatch").await.unwrap();
    // A Redis of its own too: nothing to clean up from the shared one afterwards.
    let redis_port = free_port();
    let _redis = redis_server(redis_port).await;
    let api = Api::start(Config {
        database_url,
        database_pool_size: POOL_SIZE,
        redis_url: format!("redis://127.0.0.1:{redis_port}"),
        key_prefix: "sw_test:restarts:".into(),
        admin_token: stalewatch_core::config::AdminToken::Disabled,
        ..Config::default()
    })
    .await;
    let id = api.create("survives a PostgreSQL restart").await;
    for i in 0..3 {
        api.get_from_db(id, &format!("read {i} before the restart"))
            .await;
    }
    // Sequential requests reuse one connection; make every pooled connection exist, so each
    // one the restart kills is in the pool waiting to be handed out.
    {
        let mut held = Vec::with_capacity(POOL_SIZE);
        for _ in 0..POOL_SIZE {
            let mut conn = api.state.pool.get().await.expect("a pooled connection");
            diesel::sql_query("SELECT 1")
                .execute(&mut conn)
                .await
                .expect("SELECT 1");
            held.push(conn);
        }
    }
    assert_eq!(api.state.pool.status().size, POOL_SIZE);

    // The server closes every session on its way down, so a client that watches its sockets
    // can tell the pooled connections are dead before using them. A connection that dies
    // silently (a failover behind a moved address) is not covered here.
    pg.restart().await;

    // More reads than pooled connections: every dead one gets its turn.
    for i in 0..=10 {
        api.get_from_db(id, &format!("read {i} after the PostgreSQL restart"))
            .await;
    }
}

/// `url` with its host and port replaced by 127.0.0.1:`port`, and the address they named.
async fn through_proxy(url: &str, port: u16) -> (std::net::SocketAddr, String) {
    let start = url.find("://").map(|i| i + 3).expect("a URL with a scheme");
    let end = url[start..].find('/').map_or(url.len(), |i| start + i);
    let authority = &url[start..end];
    let host_start = authority.rfind('@').map_or(0, |i| i + 1);
    let host_port = &authority[host_start..];
    let host_port = if host_port.ends_with(']') || !host_port.contains(':') {
        format!("{host_port}:5432")
    } else {
        host_port.to_string()
    };
    let upstream = tokio::net::lookup_host(host_port.as_str())
        .await
        .ok()
        .and_then(|mut addrs| addrs.next())
        .unwrap_or_else(|| panic!("{host_port} (from {url}) does not resolve"));
    let rewritten = format!(
        "{}{}127.0.0.1:{port}{}",
        &url[..start],
        &authority[..host_start],
        &url[end..]
    );
    (upstream, rewritten)
}

/// A connection can also die without its client hearing of it: a failover behind an address
/// that moved, a NAT or load balancer forgetting an idle flow. Nothing tells the client, so
/// the connection waits in the pool looking healthy, and the next query on it fails with a
/// reset. The pool tests connections that sat idle (`SELECT 1` past `VERIFY_AFTER_IDLE`), and
/// `db::idempotent` retries a read that met a dead busy one; between them no read fails.
#[actix_web::test]
async fn a_connection_that_died_silently_costs_no_failed_read() {
    const POOL_SIZE: usize = 4;
    let env = TestEnv::new().await.unwrap();
    let (upstream, _) = through_proxy(&env.database_url, 0).await;
    let proxy = TcpProxy::start(upstream).await;
    let (_, database_url) = through_proxy(&env.database_url, proxy.port()).await;
    let api = Api::start(Config {
        database_url,
        database_pool_size: POOL_SIZE,
        ..env.config()
    })
    .await;

    // Warm the pool: concurrent reads of PostgreSQL, one item each (a read fills the cache,
    // so reads of a shared item would race each other's cache deletes).
    let mut ids = Vec::with_capacity(POOL_SIZE);
    for i in 0..POOL_SIZE {
        ids.push(api.create(&format!("survives a silent death {i}")).await);
    }
    futures::future::join_all(ids.iter().enumerate().map(|(i, id)| {
        let api = &api;
        async move {
            api.get_from_db(*id, &format!("concurrent read {i} before the reset"))
                .await
        }
    }))
    .await;
    // Concurrency on one thread need not have opened every connection; make sure each one
    // the reset kills is in the pool waiting to be handed out.
    {
        let mut held = Vec::with_capacity(POOL_SIZE);
        for _ in 0..POOL_SIZE {
            let mut conn = api.state.pool.get().await.expect("a pooled connection");
            diesel::sql_query("SELECT 1")
                .execute(&mut conn)
                .await
                .expect("SELECT 1");
            held.push(conn);
        }
    }
    assert_eq!(api.state.pool.status().size, POOL_SIZE);
    assert_eq!(
        proxy.forwarding(),
        POOL_SIZE,
        "every pooled connection goes through the proxy"
    );

    // (a) Busy connections, just used: no idle test runs, so the read meets a dead one and
    // `idempotent` has to retry it.
    proxy.reset_all();
    api.get_from_db(ids[0], "the first read after the connections died silently")
        .await;

    // (b) Idle connections: past VERIFY_AFTER_IDLE (1 s), every connection is tested before
    // it is handed out. A bare sleep, unscaled: it only has to outlast a fixed threshold, and
    // a slow machine can only make it longer.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    proxy.reset_all();
    // More reads than pooled connections: every dead one gets its turn.
    for i in 0..=2 * POOL_SIZE {
        api.get_from_db(
            ids[i % POOL_SIZE],
            &format!("read {i} after idle connections died silently"),
        )
        .await;
    }
}
