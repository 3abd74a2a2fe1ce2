//! `ctwatch serve` as Prometheus sees it: root, serial
//! (`--test-threads=1`). Scrapes go through curl, a real HTTP client, and
//! the drop counts are checked against the kernel's own per-netns counter.
use std::{collections::BTreeMap, time::Duration};

use ctwatch_tests::*;

const HOLD_PORT: u16 = 7400;

/// GETs `path` at `addr` with curl, as a real client would: (HTTP status,
/// body). Where curl is missing, the harness's own request does the same.
fn get(addr: &str, path: &str) -> (u32, String) {
    curl(&[&format!("http://{addr}{path}")]).unwrap_or_else(|| {
        let answer = http_exchange(addr, "GET", path, SCRAPE_TIMEOUT);
        (answer.status, answer.body)
    })
}

#[test]
fn table_full_drops_match_the_kernel_counter() {
    require_env!();
    const MAX: usize = 16;
    const N: usize = 150;
    let lab = Lab::new("serve", false);
    let _max = MaxGuard::set(MAX as u64);
    let _held = lab.fill(MAX, HOLD_PORT);
    let listener = lab.srv.peer(&["udp-listen", "0.0.0.0:5353"]);
    let addr = free_loopback_addr();
    let before = lab.srv.kernel_drops();
    let w = start_serve(&lab.srv, &addr, &["--top", "5"]);
    assert!(
        w.banner.contains(&format!("serving http://{addr}/metrics")),
        "banner: {}",
        w.banner
    );
    // Zero lost events and zero evictions below say something only with
    // the programs attached.
    w.assert_attached(&mode());
    let ns = format!("netns=\"{}\"", lab.srv.inum());
    let name = format!("netns_name=\"{}\"", lab.srv.name);

    lab.cli
        .peer_run(&["udp-send", "198.18.0.1:5353", &N.to_string()]);
    let kernel = lab.srv.drops_since(before, N as u64) as f64;
    assert_eq!(kernel, N as f64, "kernel drop counter");

    // Wait for a refresh that has seen the whole flood: one that began
    // before its end can have the kernel's counter short of it.
    let mut text = String::new();
    poll_until(Duration::from_secs(15), || {
        let (code, body) = get(&addr, "/metrics");
        assert_eq!(code, 200, "{body}");
        text = body;
        metric_value(&text, "ctwatch_table_full_drops_total", &[&ns, &name]) == Some(kernel)
            && metric_value(&text, "ctwatch_nf_conntrack_stat_drop_total", &[&ns])
                == Some(lab.srv.kernel_drops() as f64)
    });
    assert_eq!(
        metric_value(&text, "ctwatch_table_full_drops_total", &[&ns, &name]),
        Some(kernel),
        "{text}"
    );
    assert_eq!(
        metric_value(
            &text,
            "ctwatch_table_full_drops_by_total",
            &["dimension=\"dst_port\"", "key=\"udp/5353\""]
        ),
        Some(kernel),
        "{text}"
    );
    assert_eq!(
        metric_value(
            &text,
            "ctwatch_table_full_drops_by_total",
            &["dimension=\"src_ip\"", "key=\"198.18.0.2\""]
        ),
        Some(kernel),
        "{text}"
    );
    // Inbound drops go to the port's listener.
    assert_eq!(
        metric_value(
            &text,
            "ctwatch_table_full_drops_by_total",
            &[
                "dimension=\"process\"",
                &format!("key=\"ctpeer[{}]\"", listener.pid)
            ]
        ),
        Some(kernel),
        "{text}"
    );
    // The kernel's own counters, as the kernel reports them.
    assert_eq!(
        metric_value(&text, "ctwatch_nf_conntrack_stat_drop_total", &[&ns]),
        Some(lab.srv.kernel_drops() as f64),
        "{text}"
    );
    assert_eq!(
        metric_value(&text, "ctwatch_nf_conntrack_entries", &[&ns]),
        Some(MAX as f64),
        "{text}"
    );
    assert_eq!(
        metric_value(&text, "ctwatch_nf_conntrack_entries_limit", &[&ns]),
        Some(MAX as f64),
        "{text}"
    );
    assert!(
        metric_value(&text, "ctwatch_nf_conntrack_buckets", &[&ns]).unwrap_or(0.0) > 0.0,
        "{text}"
    );
    // Culprits: the held TCP entries, by port and by source.
    assert_eq!(
        metric_value(
            &text,
            "ctwatch_entries_by",
            &["dimension=\"dst_port\"", "key=\"tcp/7400\""]
        ),
        Some(MAX as f64),
        "{text}"
    );
    assert_eq!(
        metric_value(&text, "ctwatch_lost_events_total", &[]),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        metric_value(&text, "ctwatch_info", &[&format!("mode=\"{}\"", mode())]),
        Some(1.0),
        "{text}"
    );

    // Only the kernel-probe modes see evictions; tracepoint mode must not
    // claim zero. The filled entries are assured: none could be evicted.
    let evictions = metric_value(&text, "ctwatch_evictions_total", &[]);
    if mode() == "tracepoint" {
        assert_eq!(evictions, None, "{text}");
    } else {
        assert_eq!(evictions, Some(0.0), "{text}");
    }

    let (code, _) = get(&addr, "/nope");
    assert_eq!(code, 404);
    let (code, body) = get(&addr, "/");
    assert_eq!(code, 200);
    assert!(body.contains("/metrics"), "{body}");

    let (code, _) = w.stop_with(libc::SIGTERM);
    assert_eq!(code, 0, "SIGTERM must stop serve cleanly");
}

#[test]
fn top_k_stays_bounded_with_many_victim_ports() {
    require_env!();
    const MAX: usize = 16;
    let lab = Lab::new("servek", false);
    let _max = MaxGuard::set(MAX as u64);
    let _held = lab.fill(MAX, HOLD_PORT);
    let addr = free_loopback_addr();
    let w = start_serve(&lab.srv, &addr, &["--top", "5"]);
    // Twelve ports, one of them much busier: top 5 plus "other".
    lab.cli.peer_run(&["udp-send", "198.18.0.1:6000", "60"]);
    for p in 6001..6012 {
        lab.cli
            .peer_run(&["udp-send", &format!("198.18.0.1:{p}"), "3"]);
    }
    let total = 60.0 + 11.0 * 3.0;
    let mut text = String::new();
    poll_until(Duration::from_secs(15), || {
        text = get(&addr, "/metrics").1;
        let rows: f64 = text
            .lines()
            .filter(|l| l.starts_with("ctwatch_table_full_drops_by_total{dimension=\"dst_port\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        rows == total
    });
    let ports: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("ctwatch_table_full_drops_by_total{dimension=\"dst_port\""))
        .collect();
    assert_eq!(ports.len(), 6, "top 5 plus other:\n{text}");
    assert_eq!(
        metric_value(
            &text,
            "ctwatch_table_full_drops_by_total",
            &["dimension=\"dst_port\"", "key=\"udp/6000\""]
        ),
        Some(60.0),
        "{text}"
    );
    assert_eq!(
        metric_value(
            &text,
            "ctwatch_table_full_drops_by_total",
            &["dimension=\"dst_port\"", "key=\"other\""]
        ),
        Some(7.0 * 3.0),
        "{text}"
    );
    let (code, _) = w.stop();
    assert_eq!(code, 0);
}

/// Series the dashboard may query that only the kernel-probe modes export:
/// tracepoint mode cannot see evictions, clashes or entry creation, and
/// leaves them out rather than claim 0.
const KERNEL_PROBE_ONLY: &[&str] = &[
    "ctwatch_evictions_total",
    "ctwatch_clashes_total",
    "ctwatch_new_entries_by_total",
];

/// Labels Prometheus adds to every series it scrapes; no exporter writes them.
const TARGET_LABELS: &[&str] = &["instance", "job"];

/// One vector selector of a PromQL query: a metric name and the labels it
/// matches on, as (label, operator, value).
#[derive(Debug)]
struct Selector {
    name: String,
    matchers: Vec<(String, String, String)>,
}

/// Every vector selector in `expr`. Deliberately small and independent of
/// ctwatch's code: it knows strings, `[range]`, `$variables`, numbers,
/// function calls and the grouping keywords, and takes any other
/// identifier for a metric name.
fn selectors(expr: &str) -> Vec<Selector> {
    const KEYWORDS: &[&str] = &["and", "or", "unless", "bool", "offset"];
    // These are followed by a list of labels, not of selectors.
    const GROUPING: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    let c: Vec<char> = expr.chars().collect();
    let ident = |i: usize| c[i].is_ascii_alphanumeric() || c[i] == '_' || c[i] == ':';
    let skip_space = |mut i: usize| {
        while i < c.len() && c[i].is_whitespace() {
            i += 1;
        }
        i
    };
    let mut out = Vec::new();
    let mut i = 0;
    while i < c.len() {
        match c[i] {
            '"' | '\'' | '`' => i = string_end(&c, i),
            '[' => {
                i = c[i..]
                    .iter()
                    .position(|&x| x == ']')
                    .map_or(c.len(), |e| i + e + 1)
            }
            '$' if c.get(i + 1) == Some(&'{') => {
                i = c[i..]
                    .iter()
                    .position(|&x| x == '}')
                    .map_or(c.len(), |e| i + e + 1)
            }
            '$' => {
                i += 1;
                while i < c.len() && ident(i) {
                    i += 1;
                }
            }
            '{' => {
                // A selector without a name: `{__name__="..."}`.
                let (matchers, end) = label_matchers(&c, i);
                if let Some((_, _, name)) = matchers.iter().find(|m| m.0 == "__name__") {
                    out.push(Selector {
                        name: name.clone(),
                        matchers: matchers.clone(),
                    });
                }
                i = end;
            }
            x if x.is_ascii_digit() || x == '.' => {
                while i < c.len() && (ident(i) || c[i] == '.') {
                    i += 1;
                }
            }
            x if x.is_ascii_alphabetic() || x == '_' || x == ':' => {
                let start = i;
                while i < c.len() && ident(i) {
                    i += 1;
                }
                let word: String = c[start..i].iter().collect();
                let next = skip_space(i);
                // `sum by (key) (...)`: an aggregation, its grouping first.
                let next_word: String = c[next..]
                    .iter()
                    .take_while(|x| x.is_ascii_alphanumeric() || **x == '_')
                    .collect();
                let aggregation = matches!(next_word.as_str(), "by" | "without");
                if GROUPING.contains(&word.as_str()) {
                    if c.get(next) == Some(&'(') {
                        i = c[next..]
                            .iter()
                            .position(|&x| x == ')')
                            .map_or(c.len(), |e| next + e + 1);
                    }
                } else if KEYWORDS.contains(&word.as_str())
                    || aggregation
                    || c.get(next) == Some(&'(')
                {
                    // A keyword, or a function's name.
                } else if c.get(next) == Some(&'{') {
                    let (matchers, end) = label_matchers(&c, next);
                    out.push(Selector {
                        name: word,
                        matchers,
                    });
                    i = end;
                } else {
                    out.push(Selector {
                        name: word,
                        matchers: vec![],
                    });
                }
            }
            _ => i += 1,
        }
    }
    out
}

/// Index just past the string literal opening at `start`.
fn string_end(c: &[char], start: usize) -> usize {
    let quote = c[start];
    let mut i = start + 1;
    while i < c.len() && c[i] != quote {
        i += if c[i] == '\\' && quote != '`' { 2 } else { 1 };
    }
    (i + 1).min(c.len())
}

/// The text of a quoted string: PromQL and the exposition format both
/// escape `\`, the quote and newlines with a backslash; backticks are raw.
fn unescape(quoted: &[char]) -> String {
    let body = &quoted[1..];
    let inner = body.strip_suffix(&[quoted[0]]).unwrap_or(body);
    if quoted[0] == '`' {
        return inner.iter().collect();
    }
    let mut out = String::new();
    let mut chars = inner.iter();
    while let Some(&ch) = chars.next() {
        match (ch == '\\').then(|| chars.next()).flatten() {
            Some('n') => out.push('\n'),
            Some(&escaped) => out.push(escaped),
            None => out.push(ch),
        }
    }
    out
}

/// The matchers of the `{...}` opening at `start`, and the index past it.
fn label_matchers(c: &[char], start: usize) -> (Vec<(String, String, String)>, usize) {
    let mut out = Vec::new();
    let mut i = start + 1;
    loop {
        while i < c.len() && (c[i].is_whitespace() || c[i] == ',') {
            i += 1;
        }
        if i >= c.len() || c[i] == '}' {
            return (out, i + 1);
        }
        let label_start = i;
        while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '_') {
            i += 1;
        }
        let label: String = c[label_start..i].iter().collect();
        while i < c.len() && c[i].is_whitespace() {
            i += 1;
        }
        let op_start = i;
        while i < c.len() && matches!(c[i], '=' | '!' | '~') {
            i += 1;
        }
        let op: String = c[op_start..i].iter().collect();
        while i < c.len() && c[i].is_whitespace() {
            i += 1;
        }
        assert!(
            i < c.len() && matches!(c[i], '"' | '\'' | '`'),
            "no quoted value after {label}{op} in {}",
            c.iter().collect::<String>()
        );
        let end = string_end(c, i);
        out.push((label, op, unescape(&c[i..end])));
        i = end;
    }
}

/// Every query the dashboard runs: each `expr` (panels and rows' nested
/// panels alike, found by walking the whole document) and the selector of
/// each query variable's `label_values(selector, label)`, with the label it
/// reads turned into a matcher that only asks for the label to exist.
fn dashboard_selectors() -> Vec<(String, Selector)> {
    fn walk<'a>(v: &'a Value, key: Option<&str>, out: &mut Vec<(&'a str, Option<&'a str>)>) {
        match v {
            Value::Object(m) => m.iter().for_each(|(k, v)| walk(v, Some(k), out)),
            Value::Array(a) => a.iter().for_each(|v| walk(v, key, out)),
            Value::String(q) if key == Some("expr") => out.push((q, None)),
            Value::String(q) if key == Some("query") => {
                if let Some(args) = q
                    .strip_prefix("label_values(")
                    .and_then(|a| a.strip_suffix(')'))
                {
                    let (sel, label) = args.rsplit_once(',').unwrap_or((args, ""));
                    out.push((sel, Some(label.trim())));
                }
            }
            _ => {}
        }
    }
    let doc = dashboard();
    let mut queries = Vec::new();
    walk(&doc, None, &mut queries);
    let mut out = Vec::new();
    for (query, label) in queries {
        let found = selectors(query);
        assert!(!found.is_empty(), "no series found in {query:?}");
        for mut sel in found {
            if let Some(label) = label.filter(|l| !l.is_empty()) {
                sel.matchers
                    .push((label.to_string(), "=~".into(), "$".into()));
            }
            out.push((query.to_string(), sel));
        }
    }
    out
}

/// The samples of an exposition: (name, labels) per line.
fn samples(text: &str) -> Vec<(String, BTreeMap<String, String>)> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let c: Vec<char> = line.chars().collect();
        let name_end = c
            .iter()
            .position(|&x| x == '{' || x == ' ')
            .unwrap_or(c.len());
        let name: String = c[..name_end].iter().collect();
        let mut labels = BTreeMap::new();
        if c.get(name_end) == Some(&'{') {
            for (label, _, value) in label_matchers(&c, name_end).0 {
                labels.insert(label, value);
            }
        }
        out.push((name, labels));
    }
    out
}

/// What in `wanted` a scrape does not show as `sees_entries` says it should.
fn unmet(
    wanted: &[(String, Selector)],
    scrape: &[(String, BTreeMap<String, String>)],
    sees_entries: bool,
) -> Vec<String> {
    let mut problems = Vec::new();
    for (query, sel) in wanted {
        let series: Vec<&BTreeMap<String, String>> = scrape
            .iter()
            .filter(|(name, _)| *name == sel.name)
            .map(|(_, labels)| labels)
            .collect();
        if !sees_entries && KERNEL_PROBE_ONLY.contains(&sel.name.as_str()) {
            if !series.is_empty() {
                problems.push(format!(
                    "{} is exported in {} mode: drop it from KERNEL_PROBE_ONLY",
                    sel.name,
                    mode()
                ));
            }
            continue;
        }
        if series.is_empty() {
            problems.push(format!("no {} series (queried by {query})", sel.name));
            continue;
        }
        for (label, op, value) in &sel.matchers {
            if TARGET_LABELS.contains(&label.as_str()) || op.starts_with('!') {
                continue;
            }
            // A literal `=` must match exactly; a variable or a regex (no
            // regex engine here) only needs the label to be there.
            let literal = op == "=" && !value.contains('$');
            let found = series.iter().any(|l| match l.get(label) {
                Some(v) => !literal || v == value,
                None => false,
            });
            if !found {
                problems.push(format!(
                    "no {} series with {label}{op}\"{value}\" (queried by {query})",
                    sel.name
                ));
            }
        }
    }
    problems
}

#[test]
fn the_selector_parser_reads_promql() {
    let found = selectors(
        r#"topk($topk, sum by (key) (rate(a_total{x="1",y=~"$v"}[$__rate_interval]))) / on(z) b + 2 * c{}"#,
    );
    let names: Vec<&str> = found.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["a_total", "b", "c"]);
    assert_eq!(
        found[0].matchers,
        [
            ("x".to_string(), "=".to_string(), "1".to_string()),
            ("y".to_string(), "=~".to_string(), "$v".to_string())
        ]
    );
    let scraped = samples("# HELP a x\na_total{x=\"1\",y=\"q\\\"r\"} 3\nb 1\n");
    assert_eq!(scraped.len(), 2);
    assert_eq!(scraped[0].1["y"], "q\"r");
}

/// Every series the Grafana dashboard queries, with the labels it filters
/// on, is in a real scrape: a renamed metric or label fails here instead of
/// leaving a panel empty.
#[test]
fn dashboard_queries_only_series_that_serve_exports() {
    require_env!();
    const MAX: usize = 16;
    const N: usize = 40;
    let wanted = dashboard_selectors();
    for name in KERNEL_PROBE_ONLY {
        assert!(
            wanted.iter().any(|(_, s)| s.name == *name),
            "{name} is listed as kernel-probe only but the dashboard does not query it"
        );
    }
    let lab = Lab::new("servedash", false);
    let _max = MaxGuard::set(MAX as u64);
    let addr = free_loopback_addr();
    // Started before the table fills, so the kernel-probe modes see the
    // entries being created, by whom.
    let w = start_serve(&lab.srv, &addr, &["--top", "5"]);
    w.assert_attached(&mode());
    let _held = lab.fill(MAX, HOLD_PORT);
    let _listener = lab.srv.peer(&["udp-listen", "0.0.0.0:5353"]);
    let before = lab.srv.kernel_drops();
    lab.cli
        .peer_run(&["udp-send", "198.18.0.1:5353", &N.to_string()]);
    lab.srv.drops_since(before, N as u64);

    let sees_entries = mode() != "tracepoint";
    // Refreshes come every second: wait for one that has it all.
    scrape_until(&addr, Duration::from_secs(15), |text| {
        unmet(&wanted, &samples(text), sees_entries)
    });
    let (code, _) = w.stop();
    assert_eq!(code, 0);
}

#[test]
fn a_taken_port_is_a_one_line_error() {
    require_env!();
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = held.local_addr().expect("addr").to_string();
    let (code, _out, err) = ctwatch_once(&["serve", "--listen", &addr, "--mode", &mode()]);
    assert_ne!(code, 0, "{err}");
    let err = err.trim();
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains(&addr), "names the address: {err}");
    assert!(err.contains("--listen"), "says what to do: {err}");
}
