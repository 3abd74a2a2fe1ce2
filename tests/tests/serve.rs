//! `ctwatch serve` as Prometheus sees it: root, serial
//! (`--test-threads=1`). Scrapes go through curl, a real HTTP client, and
//! the drop counts are checked against the kernel's own per-netns counter.
use std::{
    process::Command,
    time::{Duration, Instant},
};

use ctwatch_tests::*;

const HOLD_PORT: u16 = 7400;

/// A loopback port nobody listens on right now.
fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").to_string()
}

/// GETs `url` with curl: (HTTP status, body). Where curl is missing (the
/// VMs' busybox userland), a plain HTTP/1.0 request does the same.
fn get(url: &str) -> (u32, String) {
    let out = match Command::new("curl")
        .args(["-s", "--max-time", "5", "-w", "\n%{http_code}", url])
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return get_raw(url),
        Err(e) => panic!("curl: {e}"),
    };
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn get_raw(url: &str) -> (u32, String) {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect("http URL");
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut s = std::net::TcpStream::connect(host).unwrap_or_else(|e| panic!("{host}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").expect("request");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("response");
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, body.to_string())
}

/// Value of the first sample of `name` whose labels contain every one of
/// `labels` (each written as in the exposition: `key="value"`).
fn value(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn serve(ns: &Netns, addr: &str) -> Ctwatch {
    Ctwatch::start(&[
        "serve",
        "--listen",
        addr,
        "--interval",
        "1",
        "--mode",
        &mode(),
        "--netns",
        &ns.name,
        "--top",
        "5",
    ])
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
    let addr = free_addr();
    let before = lab.srv.kernel_drops();
    let w = serve(&lab.srv, &addr);
    assert!(
        w.banner.contains(&format!("serving http://{addr}/metrics")),
        "banner: {}",
        w.banner
    );
    let url = format!("http://{addr}/metrics");
    let ns = format!("netns=\"{}\"", lab.srv.inum());
    let name = format!("netns_name=\"{}\"", lab.srv.name);

    lab.cli
        .peer_run(&["udp-send", "198.18.0.1:5353", &N.to_string()]);
    let kernel = (lab.srv.kernel_drops() - before) as f64;
    assert_eq!(kernel, N as f64, "kernel drop counter");

    // Wait for a refresh that has seen the whole flood.
    let deadline = Instant::now() + Duration::from_secs(15);
    let text = loop {
        let (code, text) = get(&url);
        assert_eq!(code, 200, "{text}");
        let seen = value(&text, "ctwatch_table_full_drops_total", &[&ns, &name]);
        if seen == Some(kernel) || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(
        value(&text, "ctwatch_table_full_drops_total", &[&ns, &name]),
        Some(kernel),
        "{text}"
    );
    assert_eq!(
        value(
            &text,
            "ctwatch_table_full_drops_by_total",
            &["dimension=\"dst_port\"", "key=\"udp/5353\""]
        ),
        Some(kernel),
        "{text}"
    );
    assert_eq!(
        value(
            &text,
            "ctwatch_table_full_drops_by_total",
            &["dimension=\"src_ip\"", "key=\"198.18.0.2\""]
        ),
        Some(kernel),
        "{text}"
    );
    // Inbound drops go to the port's listener.
    assert_eq!(
        value(
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
        value(&text, "ctwatch_nf_conntrack_stat_drop_total", &[&ns]),
        Some(lab.srv.kernel_drops() as f64),
        "{text}"
    );
    assert_eq!(
        value(&text, "ctwatch_nf_conntrack_entries", &[&ns]),
        Some(MAX as f64),
        "{text}"
    );
    assert_eq!(
        value(&text, "ctwatch_nf_conntrack_entries_limit", &[&ns]),
        Some(MAX as f64),
        "{text}"
    );
    assert!(
        value(&text, "ctwatch_nf_conntrack_buckets", &[&ns]).unwrap_or(0.0) > 0.0,
        "{text}"
    );
    // Culprits: the held TCP entries, by port and by source.
    assert_eq!(
        value(
            &text,
            "ctwatch_entries_by",
            &["dimension=\"dst_port\"", "key=\"tcp/7400\""]
        ),
        Some(MAX as f64),
        "{text}"
    );
    assert_eq!(
        value(&text, "ctwatch_lost_events_total", &[]),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "ctwatch_info", &[&format!("mode=\"{}\"", mode())]),
        Some(1.0),
        "{text}"
    );

    // Only the kernel-probe modes see evictions; tracepoint mode must not
    // claim zero. The filled entries are assured: none could be evicted.
    let evictions = value(&text, "ctwatch_evictions_total", &[]);
    if mode() == "tracepoint" {
        assert_eq!(evictions, None, "{text}");
    } else {
        assert_eq!(evictions, Some(0.0), "{text}");
    }

    let (code, _) = get(&format!("http://{addr}/nope"));
    assert_eq!(code, 404);
    let (code, body) = get(&format!("http://{addr}/"));
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
    let addr = free_addr();
    let w = serve(&lab.srv, &addr);
    // Twelve ports, one of them much busier: top 5 plus "other".
    lab.cli.peer_run(&["udp-send", "198.18.0.1:6000", "60"]);
    for p in 6001..6012 {
        lab.cli
            .peer_run(&["udp-send", &format!("198.18.0.1:{p}"), "3"]);
    }
    let total = 60.0 + 11.0 * 3.0;
    let url = format!("http://{addr}/metrics");
    let deadline = Instant::now() + Duration::from_secs(15);
    let text = loop {
        let (_, text) = get(&url);
        let rows: f64 = text
            .lines()
            .filter(|l| l.starts_with("ctwatch_table_full_drops_by_total{dimension=\"dst_port\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        if rows == total || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let ports: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("ctwatch_table_full_drops_by_total{dimension=\"dst_port\""))
        .collect();
    assert_eq!(ports.len(), 6, "top 5 plus other:\n{text}");
    assert_eq!(
        value(
            &text,
            "ctwatch_table_full_drops_by_total",
            &["dimension=\"dst_port\"", "key=\"udp/6000\""]
        ),
        Some(60.0),
        "{text}"
    );
    assert_eq!(
        value(
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
