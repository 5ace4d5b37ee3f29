//! Both binaries as processes: the command line, start-up refusals and failures, and the
//! admin token over real HTTP. (The worker's binary is built by `cargo nextest run
//! --workspace`, as scripts/test runs it.)

use std::{
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use stalewatch_testkit::{bin_path, eventually, free_port, scaled, Proc, TestEnv, ADMIN_TOKEN};

const BINS: [&str; 2] = ["stalewatch-api", "stalewatch-worker"];

/// Runs `bin` to its end (a server that starts instead fails the test after 20 s), with
/// RUST_BACKTRACE set so that a backtrace, if one were printed, shows.
fn run(bin: &str, args: &[&str], env: &[(String, String)]) -> Output {
    let mut child = Command::new(bin_path(bin))
        .args(args)
        .env_remove("ADMIN_TOKEN")
        .env("RUST_BACKTRACE", "1")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + scaled(Duration::from_secs(20));
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{bin} {args:?} did not exit: it must not start serving");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// No service answers here.
fn nowhere() -> Vec<(String, String)> {
    let closed = free_port();
    vars(&[
        (
            "DATABASE_URL",
            &format!("postgres://app:pgsecret123@127.0.0.1:{closed}/none"),
        ),
        (
            "REDIS_URL",
            &format!("redis://:redissecret1@127.0.0.1:{closed}"),
        ),
    ])
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// One line on stderr, no backtrace, no password.
fn assert_one_line(what: &str, out: &Output) -> String {
    let err = stderr(out);
    assert_eq!(err.trim_end().lines().count(), 1, "{what}: {err:?}");
    assert!(err.contains("error"), "{what}: {err:?}");
    assert!(
        !err.contains("backtrace") && !err.contains("Stack"),
        "{what}: {err}"
    );
    for secret in ["pgsecret123", "redissecret1", ADMIN_TOKEN] {
        assert!(!err.contains(secret), "{what}: {secret} shown: {err}");
    }
    err
}

#[test]
fn help_and_version_need_no_service_and_list_every_setting() {
    for bin in BINS {
        let out = run(bin, &["--help"], &nowhere());
        assert!(out.status.success(), "{bin} --help: {}", stderr(&out));
        let help = String::from_utf8_lossy(&out.stdout);
        for expected in [
            "--database-url",
            "[env: DATABASE_URL]",
            "[default: postgres://postgres@127.0.0.1:5432/stalewatch]",
            "--admin-token",
            "[env: ADMIN_TOKEN]",
            "--metrics-addr",
            "[default: 127.0.0.1:8080]",
            "--version",
        ] {
            assert!(help.contains(expected), "{bin}: {expected} missing: {help}");
        }
        // The environment's values (secrets among them) are not printed.
        assert!(!help.contains("pgsecret123"), "{help}");

        let out = run(bin, &["--version"], &nowhere());
        assert!(out.status.success());
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("{bin} {}", env!("CARGO_PKG_VERSION"))
        );
    }
    let out = run("stalewatch-worker", &["--help"], &[]);
    let help = String::from_utf8_lossy(&out.stdout);
    for command in ["run", "migrate", "sweep", "entities"] {
        assert!(help.contains(&format!("  {command} ")), "{command}: {help}");
    }
    let out = run("stalewatch-worker", &["sweep", "--help"], &[]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("--once"));
    let out = run("stalewatch-worker", &["entities", "check", "--help"], &[]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("[FILE]"));
}

#[test]
fn usage_errors_are_one_line_and_exit_code_2() {
    /// Binary, arguments, extra environment, what the message must mention.
    type Case<'a> = (&'a str, &'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 8] = [
        (
            "stalewatch-worker",
            &["frobnicate"],
            &[],
            "usage: stalewatch-worker",
        ),
        ("stalewatch-worker", &["sweep"], &[], "--once"),
        (
            "stalewatch-worker",
            &["--no-such-flag"],
            &[],
            "--no-such-flag",
        ),
        (
            "stalewatch-worker",
            &["migrate", "--grace-period-ms", "soon"],
            &[],
            "GRACE_PERIOD_MS",
        ),
        ("stalewatch-api", &["serve"], &[], "usage: stalewatch-api"),
        (
            "stalewatch-api",
            &[],
            &[("HTTP_ADDR", "localhost")],
            "HTTP_ADDR",
        ),
        (
            "stalewatch-api",
            &[],
            &[("ADMIN_TOKEN", "short")],
            "ADMIN_TOKEN",
        ),
        // Unset: refused before anything connects.
        ("stalewatch-api", &[], &[], "ADMIN_TOKEN is not set"),
    ];
    for (bin, args, extra, mentions) in cases {
        let mut env = nowhere();
        env.extend(vars(extra));
        let out = run(bin, args, &env);
        let what = format!("{bin} {args:?} {extra:?}");
        assert_eq!(out.status.code(), Some(2), "{what}: {}", stderr(&out));
        let err = assert_one_line(&what, &out);
        assert!(err.contains(mentions), "{what}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn runtime_errors_are_one_line_exit_code_1_and_mask_passwords() {
    let env = TestEnv::new().await.unwrap();
    let token = vars(&[("ADMIN_TOKEN", ADMIN_TOKEN)]);
    // PostgreSQL unreachable, with a password in its URL.
    for (bin, args) in [
        ("stalewatch-api", &[][..]),
        ("stalewatch-worker", &["migrate"][..]),
    ] {
        let mut vars = nowhere();
        vars.extend(token.clone());
        let out = run(bin, args, &vars);
        let what = format!("{bin}, PostgreSQL unreachable");
        assert_eq!(out.status.code(), Some(1), "{what}: {}", stderr(&out));
        assert_one_line(&what, &out);
    }
    // PostgreSQL fine, Redis unreachable, with a password in its URL.
    let closed = free_port();
    let redis = format!("redis://:redissecret1@127.0.0.1:{closed}");
    for (bin, args) in [
        ("stalewatch-api", &[][..]),
        ("stalewatch-worker", &["sweep", "--once"][..]),
    ] {
        let mut vars = env.env_vars();
        vars.push(("REDIS_URL".into(), redis.clone()));
        let out = run(bin, args, &vars);
        let what = format!("{bin}, Redis unreachable");
        assert_eq!(out.status.code(), Some(1), "{what}: {}", stderr(&out));
        let err = assert_one_line(&what, &out);
        assert!(
            err.contains(&format!("redis://:***@127.0.0.1:{closed}")),
            "{what}: {err}"
        );
    }
}

/// The real binary: HTTP_ADDR takes a host name, the start-up log shows the configuration
/// with the token masked, and the refresh routes need the token.
#[tokio::test(flavor = "multi_thread")]
async fn the_api_binds_a_host_name_and_its_refresh_needs_the_token() {
    let env = TestEnv::new().await.unwrap();
    let port = free_port();
    let mut vars = env.env_vars();
    vars.push(("HTTP_ADDR".into(), format!("localhost:{port}")));
    let mut api = Proc::spawn(&bin_path("stalewatch-api"), &[], &vars);
    let url = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    eventually(Duration::from_secs(30), "the API to answer", || {
        let req = client.get(format!("{url}/healthz")).send();
        async move {
            req.await
                .ok()
                .filter(|r| r.status().is_success())
                .map(|_| ())
        }
    })
    .await;

    let refresh = format!("{url}/items/{}/refresh", uuid::Uuid::now_v7());
    let reply = client.post(&refresh).send().await.unwrap();
    assert_eq!(reply.status(), 401);
    let body: serde_json::Value = reply.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthorized", "{body}");
    let reply = client
        .post(&refresh)
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 404, "past the token: no such item");

    let log = api.output();
    assert!(log.contains("ADMIN_TOKEN=***"), "{log}");
    assert!(log.contains("HTTP_ADDR=localhost:"), "{log}");
    assert!(!log.contains(ADMIN_TOKEN), "the token is logged: {log}");
    assert!(api.terminate(Duration::from_secs(10)).is_some());
}

/// Two workers on one host, each with METRICS_ADDR port 0: both run, each on its own port.
#[tokio::test(flavor = "multi_thread")]
async fn two_workers_share_a_host_with_metrics_port_0() {
    let env = TestEnv::new().await.unwrap();
    let mut vars = env.env_vars();
    vars.push(("METRICS_ADDR".into(), "127.0.0.1:0".into()));
    vars.push(("SWEEP_INTERVAL_MS".into(), "0".into()));
    vars.push(("KEYSPACE_NOTIFICATIONS".into(), "off".into()));
    let mut workers = [
        Proc::spawn(&bin_path("stalewatch-worker"), &[], &vars),
        Proc::spawn(&bin_path("stalewatch-worker"), &[], &vars),
    ];
    for worker in &workers {
        eventually(Duration::from_secs(30), "a worker to start", || {
            let log = worker.output();
            async move { log.contains("stalewatch-worker started").then_some(()) }
        })
        .await;
        let log = worker.output();
        assert!(
            !log.contains("127.0.0.1:0]"),
            "the bound port is logged: {log}"
        );
    }
    for worker in &mut workers {
        let status = worker.terminate(Duration::from_secs(20));
        assert!(
            status.is_some_and(|s| s.success()),
            "{status:?}: {}",
            worker.output()
        );
    }
}
