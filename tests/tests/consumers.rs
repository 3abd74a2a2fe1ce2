//! ctwatch's output as its real consumers read it:
//! - Debian's `prometheus` scrapes `ctwatch serve` every second during a
//!   flood and evaluates every query of deploy/grafana-dashboard.json, with
//!   the dashboard's variables substituted;
//! - `promtool check metrics` reads a real scrape;
//! - `kubernetes-validate` (PyPI) reads deploy/daemonset.yaml.
//!
//! Root, serial (`--test-threads=1`), host only: the VM suite runs just the
//! `host` and `kernel_probes` binaries (xtask's `test_binaries`). Under CI a
//! missing tool fails the test; elsewhere it is a printed skip.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use ctwatch_tests::*;

const MAX: u64 = 16;
const HOLD_PORT: u16 = 7400;
const PORT: u16 = 5353;

/// The series only the kernel-probe modes (fentry, kprobe) export: the
/// tracepoint mode sees no entry being created, evicted or clashing. Their
/// panels must say so, and on a tracepoint host their queries return
/// nothing; every other query of the dashboard must return data.
const KERNEL_PROBE_ONLY: &[&str] = &[
    "ctwatch_evictions_total",
    "ctwatch_clashes_total",
    "ctwatch_new_entries_by_total",
];

/// What Grafana puts in for its own variables: `$__rate_interval` is
/// max(4 × scrape interval, interval + scrape interval), one minute for a
/// data source left at the default 15 s scrape interval.
const GRAFANA_BUILTINS: &[(&str, &str)] = &[
    ("__rate_interval", "1m"),
    ("__interval", "15s"),
    ("__interval_ms", "15000"),
    ("__range", "5m"),
    ("__range_s", "300"),
    ("__range_ms", "300000"),
];

/// A test that cannot run fails instead of skipping: in CI (`CI=true`) and
/// wherever xtask demands it.
fn must_run() -> bool {
    matches!(std::env::var("CI").as_deref(), Ok("true" | "1"))
        || std::env::var_os("CTWATCH_REQUIRE_PRIVILEGED").is_some()
}

fn which(tool: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .chain(["/usr/sbin".into(), "/usr/bin".into()])
        .map(|d| d.join(tool))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// The path of `tool`, or returns from the test (a failure under CI).
macro_rules! require_tool {
    ($tool:expr) => {
        match which($tool) {
            Some(path) => path,
            None => {
                let why = format!(
                    "`{}` is not installed (cargo xtask setup installs it)",
                    $tool
                );
                if must_run() {
                    panic!("{why}; under CI a test that cannot run fails");
                }
                eprintln!("SKIP {}: {why}", module_path!());
                return;
            }
        }
    };
}

/// A table filled to `MAX` with a listener on `PORT`: the scene of a flood.
fn full_lab(tag: &str) -> (Lab, MaxGuard, (Peer, Peer), Peer) {
    let lab = Lab::new(tag, false);
    let max = MaxGuard::set(MAX);
    let held = lab.fill(MAX as usize, HOLD_PORT);
    let listener = lab.srv.peer(&["udp-listen", &format!("0.0.0.0:{PORT}")]);
    (lab, max, held, listener)
}

/// Debian's Prometheus server on a free loopback port, with its own config
/// and storage in a temporary directory, removed on drop.
struct Prometheus {
    child: Child,
    dir: PathBuf,
    url: String,
}

impl Prometheus {
    fn start(bin: &Path, target: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("ctwatch-prometheus-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data")).expect("prometheus dir");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: ctwatch\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("prometheus.yml");
        let listen = free_loopback_addr();
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("log");
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={listen}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn prometheus");
        let p = Prometheus {
            child,
            dir,
            url: format!("http://{listen}"),
        };
        let ready = poll_until(Duration::from_secs(30), || {
            curl(&[&format!("{}/-/ready", p.url)]).expect("curl").0 == 200
        });
        assert!(ready, "prometheus never got ready:\n{}", p.log());
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// GETs an API path with URL-encoded parameters; the `data` member of
    /// a successful answer. A refused query fails the test at once.
    fn api(&self, path: &str, params: &[(&str, &str)]) -> Value {
        let mut args = vec!["--get".to_string()];
        for (k, v) in params {
            args.push("--data-urlencode".into());
            args.push(format!("{k}={v}"));
        }
        args.push(format!("{}{path}", self.url));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, body) = curl(&args).expect("curl");
        let v: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{path} {params:?}: HTTP {code}, not JSON ({e}): {body}"));
        assert_eq!(v["status"], "success", "{path} {params:?}: {body}");
        v["data"].clone()
    }

    /// The result vector of an instant query at the newest data.
    fn query(&self, expr: &str) -> Vec<Value> {
        let data = self.api("/api/v1/query", &[("query", expr)]);
        data["result"].as_array().cloned().unwrap_or_default()
    }

    /// The value of a query that selects one series, if it does.
    fn scalar(&self, expr: &str) -> Option<f64> {
        match self.query(expr).as_slice() {
            [one] => one["value"][1].as_str()?.parse().ok(),
            _ => None,
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Puts each variable's value in for `$name`, `${name}` and `[[name]]`,
/// longest names first so that `$__range` leaves `$__range_ms` alone.
fn substitute(expr: &str, vars: &[(String, String)]) -> String {
    let mut vars: Vec<&(String, String)> = vars.iter().collect();
    vars.sort_by_key(|(name, _)| std::cmp::Reverse(name.len()));
    let mut out = expr.to_string();
    for (name, value) in vars {
        for form in [
            format!("${{{name}}}"),
            format!("[[{name}]]"),
            format!("${name}"),
        ] {
            out = out.replace(&form, value);
        }
    }
    out
}

/// A value as Grafana writes a multi-value variable into a PromQL regex
/// matcher: regex metacharacters escaped, the backslash doubled for the
/// PromQL string.
fn regex_escaped(value: &str) -> String {
    let mut out = String::new();
    for c in value.chars() {
        if "\\^$.|?*+()[]{}".contains(c) {
            out.push_str("\\\\");
        }
        out.push(c);
    }
    out
}

/// The dashboard's variables with the values a user watching this test's
/// namespace would pick. Query variables are resolved through Prometheus
/// (`label_values`), so each one's own query is checked to offer the value.
fn variables(
    d: &Value,
    prom: &Prometheus,
    wanted: &BTreeMap<&str, String>,
) -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = GRAFANA_BUILTINS
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for var in d["templating"]["list"].as_array().expect("templating.list") {
        let name = var["name"].as_str().expect("variable name").to_string();
        let escape = var["multi"] == true || var["includeAll"] == true;
        let value = match var["type"].as_str().unwrap_or_default() {
            // Picked in Grafana's UI; never part of an expression.
            "datasource" => continue,
            "custom" => var["current"]["value"]
                .as_str()
                .or(var["options"][0]["value"].as_str())
                .unwrap_or_else(|| panic!("custom variable {name} has no value"))
                .to_string(),
            "constant" | "textbox" => var["query"].as_str().unwrap_or_default().to_string(),
            "query" => {
                let def = var["definition"]
                    .as_str()
                    .or(var["query"]["query"].as_str())
                    .or(var["query"].as_str())
                    .unwrap_or_else(|| panic!("query variable {name} has no query"));
                let inner = def
                    .strip_prefix("label_values(")
                    .and_then(|r| r.strip_suffix(')'))
                    .unwrap_or_else(|| {
                        panic!("variable {name}: only label_values() is understood: {def}")
                    });
                let (selector, label) = inner.rsplit_once(',').unwrap_or_else(|| {
                    panic!("variable {name}: label_values(SELECTOR, LABEL) expected: {def}")
                });
                let (selector, label) = (substitute(selector.trim(), &vars), label.trim());
                let want = wanted.get(label).unwrap_or_else(|| {
                    panic!("variable {name} lists label {label}: give the test a value for it")
                });
                let path = format!("/api/v1/label/{label}/values");
                let offered = poll_until(Duration::from_secs(30), || {
                    let values = prom.api(&path, &[("match[]", &selector)]);
                    values
                        .as_array()
                        .is_some_and(|vs| vs.iter().any(|v| v.as_str() == Some(want)))
                });
                assert!(
                    offered,
                    "variable {name} ({def} as {selector}) never offered {want}"
                );
                want.clone()
            }
            other => panic!("variable {name} has type {other}: teach this test to fill it in"),
        };
        let value = if escape { regex_escaped(&value) } else { value };
        vars.push((name, value));
    }
    vars
}

#[test]
fn prometheus_evaluates_every_dashboard_query_during_a_flood() {
    require_env!();
    let prometheus = require_tool!("prometheus");
    let _curl = require_tool!("curl");
    let (lab, _max, _held, _listener) = full_lab("prom");
    let before = lab.srv.kernel_drops();
    let listen = free_loopback_addr();
    let w = start_serve(&lab.srv, &listen, &["--top", "5"]);
    let prom = Prometheus::start(&prometheus, &listen);
    let up = poll_until(Duration::from_secs(30), || {
        prom.scalar("up{job=\"ctwatch\"}") == Some(1.0)
    });
    assert!(up, "prometheus never scraped ctwatch:\n{}", prom.log());

    // Spoofed sources over a /17 at a steady rate, until dropped: every
    // victim list has more keys than the top K, so `other` has data too.
    let flood = lab.cli.peer(&[
        "raw-flood",
        &format!("198.18.0.1:{PORT}"),
        "0",
        "198.18.128.0/17",
        "2000",
    ]);

    let d = dashboard();
    let wanted = BTreeMap::from([
        ("instance", listen.clone()),
        ("netns_name", lab.srv.name.clone()),
        ("netns", lab.srv.inum().to_string()),
    ]);
    let vars = variables(&d, &prom, &wanted);

    let mut probe_only_seen = Vec::new();
    let mut pending = Vec::new();
    let mut probe_only = Vec::new();
    for p in dashboard_panels(&d) {
        let title = p["title"].as_str().unwrap_or_default();
        let said = format!("{title} {}", p["description"].as_str().unwrap_or_default());
        for t in p["targets"].as_array().into_iter().flatten() {
            let Some(raw) = t["expr"].as_str() else {
                continue;
            };
            let expr = substitute(raw, &vars);
            assert!(
                !expr.contains('$'),
                "unresolved variable in {expr:?} ({title})"
            );
            // Evaluated once now: a query Prometheus refuses fails here.
            prom.query(&expr);
            let needs: Vec<&str> = KERNEL_PROBE_ONLY
                .iter()
                .copied()
                .filter(|s| expr.contains(s))
                .collect();
            if needs.is_empty() {
                pending.push((title.to_string(), expr));
            } else {
                assert!(
                    said.to_lowercase().contains("kprobe"),
                    "panel {title:?} shows {needs:?} but does not say it needs a kernel-probe mode: {said}"
                );
                probe_only_seen.extend(needs);
                probe_only.push((title.to_string(), expr));
            }
        }
    }
    for s in KERNEL_PROBE_ONLY {
        assert!(
            probe_only_seen.contains(s),
            "{s} is listed as kernel-probe only but no panel shows it"
        );
    }
    assert!(!pending.is_empty(), "no queries in the dashboard");
    eprintln!(
        "dashboard: {} queries to answer, {} kernel-probe only; variables {vars:?}",
        pending.len(),
        probe_only.len()
    );

    let all_answered = poll_until(Duration::from_secs(60), || {
        pending.retain(|(_, expr)| prom.query(expr).is_empty());
        pending.is_empty()
    });
    assert!(
        all_answered,
        "dashboard queries without data after 60 s: {pending:#?}\nscrape:\n{}",
        curl(&[&format!("http://{listen}/metrics")])
            .expect("curl")
            .1
    );
    if mode() == "tracepoint" {
        // Prometheus has scraped for a while by now: absent means absent.
        for (title, expr) in &probe_only {
            let r = prom.query(expr);
            assert!(
                r.is_empty(),
                "{title}: {expr} has data in tracepoint mode: {r:?}"
            );
        }
    }

    // What Prometheus stored matches the kernel's own counters.
    drop(flood);
    let ns = format!("netns=\"{}\"", lab.srv.inum());
    let agree = poll_until(Duration::from_secs(30), || {
        let kernel = lab.srv.kernel_drops();
        prom.scalar(&format!("ctwatch_nf_conntrack_stat_drop_total{{{ns}}}")) == Some(kernel as f64)
            && prom.scalar(&format!("ctwatch_table_full_drops_total{{{ns}}}"))
                == Some((kernel - before) as f64)
    });
    let kernel = lab.srv.kernel_drops();
    assert!(kernel > before, "the flood dropped nothing");
    assert!(
        agree,
        "kernel drop counter {kernel} ({} since serve started), prometheus: stat {:?}, table-full {:?}",
        kernel - before,
        prom.scalar(&format!("ctwatch_nf_conntrack_stat_drop_total{{{ns}}}")),
        prom.scalar(&format!("ctwatch_table_full_drops_total{{{ns}}}"))
    );
    assert_eq!(
        prom.scalar(&format!("ctwatch_nf_conntrack_entries{{{ns}}}")),
        Some(lab.srv.count() as f64)
    );
    assert_eq!(
        prom.scalar(&format!("ctwatch_nf_conntrack_entries_limit{{{ns}}}")),
        Some(MAX as f64)
    );
    let (code, _) = w.stop_with(libc::SIGTERM);
    assert_eq!(code, 0);
}

#[test]
fn promtool_finds_nothing_to_fix_in_a_real_scrape() {
    require_env!();
    let promtool = require_tool!("promtool");
    let _curl = require_tool!("curl");
    let (lab, _max, _held, _listener) = full_lab("promtool");
    let listen = free_loopback_addr();
    let w = start_serve(&lab.srv, &listen, &["--top", "3"]);
    // More sources than the top K, so every family has series, `other` too.
    lab.cli.peer_run(&[
        "raw-flood",
        &format!("198.18.0.1:{PORT}"),
        "200",
        "198.18.128.0/17",
    ]);
    let url = format!("http://{listen}/metrics");
    let mut scrape = String::new();
    let full = poll_until(Duration::from_secs(15), || {
        scrape = curl(&[&url]).expect("curl").1;
        scrape.contains("ctwatch_table_full_drops_by_total{dimension=\"src_ip\",key=\"other\"")
            && scrape.contains("ctwatch_entries_by{")
    });
    assert!(full, "no full scrape within 15 s:\n{scrape}");

    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), scrape.as_bytes())
        .expect("promtool stdin");
    let out = child.wait_with_output().expect("promtool");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics ({}): {said}\nscrape:\n{scrape}",
        out.status
    );
    let (code, _) = w.stop();
    assert_eq!(code, 0);
}

#[test]
fn daemonset_passes_kubernetes_validate() {
    let validate = require_tool!("kubernetes-validate");
    let path = deploy_path("daemonset.yaml");
    let documents = deploy_manifests().len();
    // --strict: an unknown field (a typo) is an error, not ignored.
    let out = Command::new(validate)
        .arg("--strict")
        .arg(&path)
        .output()
        .expect("kubernetes-validate");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    // It only warns, and exits 0, for a kind it has no schema for.
    assert!(
        !said
            .lines()
            .any(|l| l.starts_with("WARN") || l.starts_with("ERROR")),
        "{said}"
    );
    let passed = said
        .lines()
        .filter(|l| l.contains(" passed for resource "))
        .count();
    assert_eq!(passed, documents, "every document validated: {said}");
}
