//! The monitoring side against the real processes: a real Prometheus server (Debian's
//! `prometheus` package, which scripts/test installs) scrapes a running API and worker with the
//! repository's alerts loaded, and the Grafana dashboard and the alerts name only metrics the
//! code exports.

mod common;

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    time::Duration,
};

use common::{api, wait_http, worker, TempDir};
use serde_json::Value;
use stalewatch_core::metrics::Metrics;
use stalewatch_testkit::{eventually, free_port, Proc, TestEnv};

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

/// Debian's Prometheus server; missing means the tests did not run through scripts/test.
fn prometheus_bin() -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("prometheus"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "the prometheus server is not installed: run the tests through scripts/test, \
                 which installs it (Debian's prometheus package), or apt-get install prometheus"
            )
        })
}

/// The metric names of a /metrics page (the series' names, so a histogram's `_bucket` etc.).
async fn exported_names(url: &str) -> BTreeSet<String> {
    let text = reqwest::get(url)
        .await
        .and_then(|r| r.error_for_status())
        .unwrap_or_else(|e| panic!("{url}: {e}"))
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// The result vector of an instant query, or None while Prometheus cannot answer it.
async fn query(client: &reqwest::Client, base: &str, promql: &str) -> Option<Vec<Value>> {
    let body: Value = client
        .get(format!("{base}/api/v1/query"))
        .query(&[("query", promql)])
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    assert_eq!(body["status"], "success", "{promql}: {body}");
    body["data"]["result"].as_array().cloned()
}

/// Every `- alert: Name` of alerts.yml.
fn alert_names(rules: &str) -> BTreeSet<String> {
    rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(|n| n.trim().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_scrapes_api_and_worker_and_evaluates_the_rules() {
    let prometheus = prometheus_bin();
    let env = TestEnv::new().await.unwrap();
    let (_worker, worker_port) = worker(&env, &[]);
    let (_api, api_url) = api(&env, &[]);
    let worker_url = format!("http://127.0.0.1:{worker_port}");
    wait_http(&format!("{worker_url}/healthz")).await;
    wait_http(&format!("{api_url}/healthz")).await;

    let dir = TempDir::new("prometheus");
    let alerts = repo_file("deploy/prometheus/alerts.yml");
    let recording = dir.path().join("recording.yml");
    std::fs::write(
        &recording,
        "groups:\n  - name: e2e\n    rules:\n      - record: job:stalewatch_series:count\n        \
         expr: count by (job) ({__name__=~\"stalewatch_.+\"})\n",
    )
    .unwrap();
    let api_target = api_url.trim_start_matches("http://");
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - {alerts}\n  - {recording}\n\
         scrape_configs:\n\
         \x20 - job_name: stalewatch-api\n    static_configs:\n      - targets: [\"{api_target}\"]\n\
         \x20 - job_name: stalewatch-worker\n    static_configs:\n      - targets: [\"127.0.0.1:{worker_port}\"]\n",
        alerts = alerts.display(),
        recording = recording.display(),
    );
    let config_file = dir.path().join("prometheus.yml");
    std::fs::write(&config_file, &config).unwrap();

    let port = free_port();
    let _server = Proc::spawn(
        &prometheus,
        &[
            &format!("--config.file={}", config_file.display()),
            &format!("--storage.tsdb.path={}", dir.path().join("data").display()),
            &format!("--web.listen-address=127.0.0.1:{port}"),
        ],
        &[],
    );
    let base = format!("http://127.0.0.1:{port}");
    wait_http(&format!("{base}/-/ready")).await;
    let client = reqwest::Client::new();

    // Every metric each process exports now is in Prometheus, under that process's job.
    for (job, url) in [
        ("stalewatch-worker", &worker_url),
        ("stalewatch-api", &api_url),
    ] {
        let exported = exported_names(&format!("{url}/metrics")).await;
        assert!(
            exported.iter().any(|n| n.starts_with("stalewatch_")),
            "{job} exports no stalewatch metric: {exported:?}"
        );
        let promql =
            format!("count by (__name__) ({{__name__=~\"stalewatch_.+\", job=\"{job}\"}})");
        eventually(
            Duration::from_secs(30),
            &format!("Prometheus to hold every series {job} exports"),
            || {
                let (client, base, promql, exported) = (&client, &base, &promql, &exported);
                async move {
                    let got: BTreeSet<String> = query(client, base, promql)
                        .await?
                        .iter()
                        .filter_map(|s| s["metric"]["__name__"].as_str().map(str::to_string))
                        .collect();
                    exported
                        .iter()
                        .filter(|n| n.starts_with("stalewatch_"))
                        .all(|n| got.contains(n))
                        .then_some(())
                }
            },
        )
        .await;
        let up = query(&client, &base, &format!("up{{job=\"{job}\"}}"))
            .await
            .unwrap();
        assert_eq!(up.len(), 1, "{job}: {up:?}");
        assert_eq!(up[0]["value"][1], "1", "{job}: {up:?}");
    }

    // The recording rule ran over both jobs' series.
    eventually(
        Duration::from_secs(30),
        "the recording rule's output for both jobs",
        || async {
            let rows = query(&client, &base, "job:stalewatch_series:count").await?;
            let jobs: BTreeSet<&str> = rows
                .iter()
                .filter(|r| r["value"][1].as_str().and_then(|v| v.parse::<f64>().ok()) > Some(0.0))
                .filter_map(|r| r["metric"]["job"].as_str())
                .collect();
            (jobs == BTreeSet::from(["stalewatch-api", "stalewatch-worker"])).then_some(())
        },
    )
    .await;

    // Every alert of alerts.yml is loaded and evaluates without error on the real series
    // (a vector-matching mistake shows here as health "err", never in promtool's unit tests).
    let expected = alert_names(&std::fs::read_to_string(&alerts).unwrap());
    assert!(expected.len() >= 7, "alerts.yml: {expected:?}");
    eventually(
        Duration::from_secs(30),
        "every alert of alerts.yml evaluated with health ok",
        || async {
            let body: Value = client
                .get(format!("{base}/api/v1/rules"))
                .query(&[("type", "alert")])
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            let rules: Vec<&Value> = body["data"]["groups"]
                .as_array()?
                .iter()
                .flat_map(|g| g["rules"].as_array().into_iter().flatten())
                .collect();
            for r in &rules {
                assert_ne!(r["health"], "err", "rule failed: {r}");
            }
            let ok: BTreeSet<String> = rules
                .iter()
                .filter(|r| r["health"] == "ok")
                .filter_map(|r| r["name"].as_str().map(str::to_string))
                .collect();
            (ok == expected).then_some(())
        },
    )
    .await;
}

const PROMQL_WORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "offset",
    "bool",
    "inf",
    "nan",
    // Aggregations, which may take `by (...)` before their parenthesis.
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
];

/// The metric names a PromQL expression selects: label matchers, grouping label lists,
/// durations, strings, Grafana variables, functions and keywords taken out.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    // After `by`/`on`/... the parenthesised list holds label names, not metrics.
    let mut label_list_next = false;
    let skip_to = |i: usize, close: char| {
        chars[i..]
            .iter()
            .position(|&c| c == close)
            .map_or(chars.len(), |p| i + p + 1)
    };
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        if c != '(' {
            // `group_left` and friends may come without a list.
            label_list_next = false;
        }
        match c {
            '{' => i = skip_to(i + 1, '}'),
            '[' => i = skip_to(i + 1, ']'),
            '"' | '\'' | '`' => i = skip_to(i + 1, c),
            '(' if label_list_next => {
                i = skip_to(i + 1, ')');
                label_list_next = false;
            }
            '$' => {
                i += 1;
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut j = i;
                while j < chars.len() && chars[j].is_whitespace() {
                    j += 1;
                }
                let is_call = chars.get(j) == Some(&'(');
                if [
                    "by",
                    "without",
                    "on",
                    "ignoring",
                    "group_left",
                    "group_right",
                ]
                .contains(&word.as_str())
                {
                    label_list_next = true;
                } else if !is_call && !PROMQL_WORDS.contains(&word.to_lowercase().as_str()) {
                    names.insert(word);
                }
            }
            c if c.is_ascii_digit() || c == '.' => {
                // Numbers and durations such as 5m or 1e3.
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    names
}

fn dashboard_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", Value::String(e)) => out.push(e.clone()),
                    _ => dashboard_exprs(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| dashboard_exprs(v, out)),
        _ => {}
    }
}

/// The `expr:` values of a rules file: one line, or the indented block under `expr: |`.
fn rule_exprs(rules: &str) -> Vec<String> {
    let lines: Vec<&str> = rules.lines().collect();
    let mut out = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        let Some(rest) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let rest = rest.trim();
        if rest != "|" && rest != ">" {
            out.push(rest.to_string());
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let block: Vec<&str> = lines[n + 1..]
            .iter()
            .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
            .copied()
            .collect();
        out.push(block.join("\n"));
    }
    out
}

#[test]
fn metric_names_reads_selectors_only() {
    assert_eq!(
        metric_names(
            "histogram_quantile(0.99, sum by (le, state) (rate(a_bucket{x=\"y\"}[5m]))) \
             / on (job) group_left b offset 5m > bool 3 or absent(up{job=~\"$job\"} == 1)"
        ),
        BTreeSet::from(["a_bucket".into(), "b".into(), "up".into()])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_the_alerts_and_the_autoscaler_name_only_exported_metrics() {
    let env = TestEnv::new().await.unwrap();
    let (_worker, worker_port) = worker(&env, &[]);
    let (_api, api_url) = api(&env, &[]);
    let worker_url = format!("http://127.0.0.1:{worker_port}");
    wait_http(&format!("{worker_url}/healthz")).await;
    wait_http(&format!("{api_url}/healthz")).await;

    // What the running processes export, and what the code registers: a labelled family no
    // one has touched yet is registered but not in the text output, so the registry's list
    // completes it, after checking that it does hold everything the processes export.
    let registered: BTreeSet<String> = Metrics::new().names().into_iter().collect();
    let mut exported = BTreeSet::new();
    for url in [&worker_url, &api_url] {
        let names = exported_names(&format!("{url}/metrics")).await;
        let unknown: Vec<&String> = names.difference(&registered).collect();
        assert!(
            unknown.is_empty(),
            "{url}/metrics exports {unknown:?}, which Metrics::names() does not list"
        );
        exported.extend(names);
    }
    let mut known = registered;
    known.extend(exported);
    known.insert("up".into()); // added by Prometheus to every target

    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_file("deploy/grafana/dashboards/stalewatch.json")).unwrap(),
    )
    .unwrap();
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 5, "the dashboard's expressions: {exprs:?}");
    let rules = std::fs::read_to_string(repo_file("deploy/prometheus/alerts.yml")).unwrap();
    let rule_exprs = rule_exprs(&rules);
    assert_eq!(
        rule_exprs.len(),
        alert_names(&rules).len(),
        "{rule_exprs:?}"
    );

    // The autoscaler's Prometheus queries: one `query:` line each.
    let scaler =
        std::fs::read_to_string(repo_file("deploy/k8s/autoscaling/worker-scaledobject.yaml"))
            .unwrap();
    let queries: Vec<String> = scaler
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("query:"))
        .map(|q| q.trim().to_string())
        .collect();
    assert!(queries.len() >= 2, "the autoscaler's queries: {queries:?}");

    let mut wrong = Vec::new();
    for (from, expr) in exprs
        .iter()
        .map(|e| ("dashboard", e))
        .chain(rule_exprs.iter().map(|e| ("alerts.yml", e)))
        .chain(queries.iter().map(|e| ("worker-scaledobject.yaml", e)))
    {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{from}: no metric found in {expr}");
        for name in names.difference(&known) {
            wrong.push(format!("{from}: {name} in {expr}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "metrics the code does not export:\n{}",
        wrong.join("\n")
    );
}
