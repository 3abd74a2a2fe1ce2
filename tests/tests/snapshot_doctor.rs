//! `ctwatch snapshot` and `ctwatch doctor`: root, serial
//! (`--test-threads=1`). Snapshot counts are checked against what
//! `conntrack -L` lists in the same namespace, and the doctor's evidence
//! against the kernel's own per-netns `drop` counter.
use std::{collections::BTreeMap, time::Duration};

use ctwatch_tests::*;

const HOLD_PORT: u16 = 7400;
const UDP_PORT: u16 = 5353;

/// One `conntrack -L` line, the parts the snapshot summarises.
struct Listed {
    proto: String,
    state: Option<String>,
    src: String,
    dport: String,
}

/// Parses `conntrack -L` output: `tcp 6 431999 ESTABLISHED src=.. dst=..
/// sport=.. dport=.. ...`; the first src=/dport= are the original
/// direction's.
fn conntrack_list(ns: &Netns) -> Vec<Listed> {
    ns.exec(&["conntrack", "-L"])
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let field = |k: &str| {
                f.iter()
                    .find_map(|x| x.strip_prefix(k))
                    .unwrap_or_else(|| panic!("no {k} in {l:?}"))
                    .to_string()
            };
            Listed {
                proto: f[0].to_string(),
                state: (f[0] == "tcp").then(|| f[3].to_string()),
                src: field("src="),
                dport: field("dport="),
            }
        })
        .collect()
}

fn counted<'a>(it: impl Iterator<Item = &'a str>) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for k in it {
        *m.entry(k.to_string()).or_default() += 1;
    }
    m
}

fn as_map(v: &Value) -> BTreeMap<String, u64> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .iter()
        .map(|(k, n)| (k.clone(), n.as_u64().expect("count")))
        .collect()
}

fn item(list: &Value, key: &str) -> Option<u64> {
    list.as_array()?
        .iter()
        .find(|i| i["key"] == key)
        .and_then(|i| i["count"].as_u64())
}

fn global_max() -> u64 {
    std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_max")
        .expect("nf_conntrack_max")
        .trim()
        .parse()
        .expect("a number")
}

fn json_once(args: &[&str]) -> Value {
    let (code, out, err) = ctwatch_once(args);
    assert_eq!(code, 0, "ctwatch {args:?} exited {code}: {err}");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("bad JSON ({e}): {out}"))
}

#[test]
fn snapshot_matches_conntrack_list() {
    require_env!();
    // Small enough to fit a max another suite lowered to 16 meanwhile.
    const TCP: usize = 10;
    const UDP: usize = 5;
    let lab = Lab::new("snap", false);
    let _held = lab.fill(TCP, HOLD_PORT);
    let _listener = lab
        .srv
        .peer(&["udp-listen", &format!("0.0.0.0:{UDP_PORT}")]);
    lab.cli.peer_run(&[
        "udp-send",
        &format!("198.18.0.1:{UDP_PORT}"),
        &UDP.to_string(),
    ]);
    poll_until(Duration::from_secs(5), || {
        lab.srv.count() >= (TCP + UDP) as u64
    });

    // nf_conntrack_max is global and other suites lower it for a while:
    // compare it only when it held still around the snapshot.
    let max_before = global_max();
    let snap = json_once(&["snapshot", "--json", "--netns", &lab.srv.name]);
    let stable_max = (global_max() == max_before).then_some(max_before);
    // IPv6 is off in the lab, so the IPv4-only default of `conntrack -L`
    // sees everything.
    let listed = conntrack_list(&lab.srv);
    assert_eq!(listed.len(), TCP + UDP, "conntrack -L");

    let nets = snap["netns"].as_array().expect("netns list");
    assert_eq!(nets.len(), 1, "{snap}");
    let n = &nets[0];
    assert_eq!(n["inum"].as_u64(), Some(lab.srv.inum()));
    assert_eq!(n["name"], lab.srv.name.as_str());
    assert_eq!(n["count"].as_u64(), Some(listed.len() as u64), "{n}");
    if let Some(max) = stable_max {
        assert_eq!(n["max"].as_u64(), Some(max), "{n}");
        assert_eq!(snap["settings"]["max"].as_u64(), Some(max), "{snap}");
    }
    assert_eq!(
        as_map(&n["by_l3"]),
        BTreeMap::from([("ipv4".to_string(), listed.len() as u64)])
    );
    assert_eq!(
        as_map(&n["by_l4"]),
        counted(listed.iter().map(|l| l.proto.as_str())),
        "{n}"
    );
    assert_eq!(
        as_map(&n["tcp_states"]),
        counted(listed.iter().filter_map(|l| l.state.as_deref())),
        "{n}"
    );
    assert_eq!(n["top_src_ip"][0]["key"], "198.18.0.2", "{n}");
    assert_eq!(
        n["top_src_ip"][0]["count"].as_u64(),
        Some(listed.len() as u64)
    );
    let by_port = counted(
        listed
            .iter()
            .map(|l| format!("{}/{}", l.proto, l.dport))
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str),
    );
    assert_eq!(by_port.len(), 2, "{by_port:?}");
    for (key, count) in &by_port {
        assert_eq!(item(&n["top_dst_port"], key), Some(*count), "{key} in {n}");
    }
    assert_eq!(n["top_dst_port"][0]["key"], format!("tcp/{HOLD_PORT}"));
    assert_eq!(
        item(
            &n["top_src_dst_port"],
            &format!("198.18.0.2 tcp/{HOLD_PORT}")
        ),
        Some(TCP as u64)
    );
    assert!(listed.iter().all(|l| l.src == "198.18.0.2"));
    assert_eq!(n["assured"].as_u64(), Some(TCP as u64), "{n}");
    assert_eq!(n["unreplied"].as_u64(), Some(UDP as u64), "{n}");
    let s = &snap["settings"];
    assert!(s["max"].as_u64().unwrap_or(0) > 0, "{s}");
    assert!(s["buckets"].as_u64().unwrap_or(0) > 0, "{s}");
    assert!(
        s["timeouts"]["tcp_timeout_established"].as_u64().is_some(),
        "{s}"
    );

    // Unnarrowed, the lab is among the namespaces with entries; the client
    // side (no conntrack rules) holds none and is left out.
    let all = json_once(&["snapshot", "--json"]);
    let rows = all["netns"].as_array().expect("netns list");
    let row = rows
        .iter()
        .find(|r| r["inum"].as_u64() == Some(lab.srv.inum()))
        .unwrap_or_else(|| panic!("lab netns missing: {all}"));
    assert_eq!(row["count"], n["count"]);
    assert!(
        !rows
            .iter()
            .any(|r| r["inum"].as_u64() == Some(lab.cli.inum())),
        "{all}"
    );

    let (code, text, err) = ctwatch_once(&["snapshot", "--netns", &lab.srv.name]);
    assert_eq!(code, 0, "{err}");
    assert!(text.contains(&lab.srv.name), "{text}");
    assert!(text.contains(&format!("tcp/{HOLD_PORT}")), "{text}");
}

fn finding_for<'a>(doc: &'a Value, inum: u64, severity: &str) -> &'a Value {
    doc["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .find(|f| f["netns"].as_u64() == Some(inum) && f["severity"] == severity)
        .unwrap_or_else(|| panic!("no {severity} finding for netns {inum}: {doc}"))
}

fn remedies(f: &Value) -> Vec<String> {
    f["remedies"]
        .as_array()
        .expect("remedies")
        .iter()
        .map(|r| r.as_str().expect("string").to_string())
        .collect()
}

#[test]
fn doctor_names_full_table_and_flooding_port() {
    require_env!();
    const MAX: usize = 16;
    const N: usize = 150;
    let lab = Lab::new("doctor", false);
    let _max = MaxGuard::set(MAX as u64);
    let _held = lab.fill(MAX, HOLD_PORT);
    let _listener = lab
        .srv
        .peer(&["udp-listen", &format!("0.0.0.0:{UDP_PORT}")]);
    let inum = lab.srv.inum();

    // Settings and counters alone already show a full table (no eBPF).
    let quick = json_once(&["doctor", "--json", "--watch", "0", "--netns", &lab.srv.name]);
    let f = finding_for(&quick, inum, "critical");
    assert!(
        remedies(f)
            .iter()
            .any(|r| r.starts_with("sysctl -w net.netfilter.nf_conntrack_max=")),
        "{f}"
    );
    assert_eq!(
        quick["findings"][0]["severity"], "critical",
        "ranked first: {quick}"
    );
    // Unnarrowed, every namespace is judged and the lab is among them
    // (other suites' namespaces may come and go meanwhile).
    let everyone = json_once(&["doctor", "--json", "--watch", "0"]);
    finding_for(&everyone, inum, "critical");

    let before = lab.srv.kernel_drops();
    let w = Ctwatch::start(&[
        "doctor",
        "--json",
        "--watch",
        "2",
        "--mode",
        &mode(),
        "--netns",
        &lab.srv.name,
    ]);
    assert!(
        w.banner.contains(&format!("{} mode", mode())),
        "banner: {}",
        w.banner
    );
    lab.cli.peer_run(&[
        "udp-send",
        &format!("198.18.0.1:{UDP_PORT}"),
        &N.to_string(),
    ]);
    let kernel = lab.srv.drops_since(before, N as u64);
    assert_eq!(kernel, N as u64, "kernel drop counter");
    // The window runs out rather than being cut short: the doctor ends
    // by itself.
    let doc = json_document(w.wait_exit(Duration::from_secs(30)));

    let f = finding_for(&doc, inum, "critical");
    assert_eq!(doc["findings"][0]["severity"], "critical", "{doc}");
    let r = remedies(f);
    let max_cmd = r
        .iter()
        .find(|c| c.starts_with("sysctl -w net.netfilter.nf_conntrack_max="))
        .unwrap_or_else(|| panic!("no max remedy: {f}"));
    let suggested: u64 = max_cmd.rsplit('=').next().unwrap().parse().unwrap();
    assert!(
        suggested >= 2 * MAX as u64 && suggested.is_power_of_two(),
        "{max_cmd}"
    );
    assert!(
        r.iter()
            .any(|c| c.contains("nf_conntrack_max = ") && c.contains("/etc/sysctl.d/")),
        "persistent form: {f}"
    );
    let notrack = r
        .iter()
        .find(|c| c.contains("nft") && c.contains(&format!("udp dport {UDP_PORT} notrack")))
        .unwrap_or_else(|| panic!("no notrack rule for udp/{UDP_PORT}: {f}"));
    assert!(
        notrack.starts_with(&format!("ip netns exec {} nft", lab.srv.name)),
        "{notrack}"
    );
    assert!(
        r.iter()
            .any(|c| c.contains(&format!("-p udp --dport {UDP_PORT} -j CT --notrack"))),
        "iptables form: {f}"
    );
    let caveats = f["caveats"].to_string();
    assert!(caveats.contains("NAT"), "{caveats}");
    let evidence = f["evidence"].as_str().unwrap();
    assert!(
        evidence.contains(&format!("kernel drop counter +{kernel}")),
        "{evidence}"
    );
    assert!(
        evidence.contains(&format!("ctwatch saw {kernel} table-full drops")),
        "{evidence}"
    );
    assert!(evidence.contains(&format!("udp/{UDP_PORT}")), "{evidence}");
    assert_eq!(doc["window"]["mode"], mode(), "{doc}");
    let measured = netns_row(&doc, inum);
    assert_eq!(measured["drops_window"], kernel, "{measured}");
    assert_eq!(measured["full_drops_seen"], kernel, "{measured}");
    assert_eq!(measured["refused"]["port"]["port"], UDP_PORT, "{measured}");
    assert_eq!(measured["refused"]["port"]["role"], "inbound", "{measured}");

    // The suggested rule is valid nft and takes the port out of tracking.
    lab.srv.exec(&[
        "sh",
        "-c",
        notrack
            .strip_prefix(&format!("ip netns exec {} ", lab.srv.name))
            .unwrap(),
    ]);
    let before = lab.srv.kernel_drops();
    let delivered = lab.srv.snmp("Ip", "InDelivers");
    lab.cli
        .peer_run(&["udp-send", &format!("198.18.0.1:{UDP_PORT}"), "20"]);
    // No drop is only news once the datagrams got past every hook and were
    // delivered. (Udp InDatagrams would wait for the listener to read.)
    assert!(
        poll_until(Duration::from_secs(10), || {
            lab.srv.snmp("Ip", "InDelivers") - delivered >= 20
        }),
        "{} of 20 datagrams were delivered",
        lab.srv.snmp("Ip", "InDelivers") - delivered
    );
    assert_eq!(
        lab.srv.kernel_drops(),
        before,
        "notrack rule did not spare udp/{UDP_PORT}"
    );
}
