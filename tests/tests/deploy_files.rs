//! The fleet files in deploy/ parse and say what the exporter needs. No
//! privileges: these run everywhere, `cargo test -p ctwatch-tests` included.
use ctwatch_tests::{dashboard, dashboard_panels, deploy_daemonset, deploy_manifests};
use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

fn strings(v: &Yaml) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn daemonset_runs_serve_on_every_node_with_host_views() {
    let ds = deploy_daemonset();
    assert_eq!(ds["apiVersion"], "apps/v1");
    let spec = &ds["spec"]["template"]["spec"];
    assert_eq!(spec["hostPID"], true, "hostPID");
    assert_eq!(spec["hostNetwork"], true, "hostNetwork");
    let tolerations = spec["tolerations"].as_sequence().expect("tolerations");
    assert!(
        tolerations
            .iter()
            .any(|t| t["operator"] == "Exists" && t.get("key").is_none()),
        "a toleration for every taint: {tolerations:?}"
    );
    let selector = &ds["spec"]["selector"]["matchLabels"];
    let labels = &ds["spec"]["template"]["metadata"]["labels"];
    for (k, v) in selector.as_mapping().expect("matchLabels") {
        assert_eq!(&labels[k], v, "the selector matches the pod labels");
    }

    let c = &spec["containers"][0];
    let image = c["image"].as_str().expect("image");
    assert_eq!(
        image, "ghcr.io/OWNER/ctwatch:VERSION",
        "the documented placeholder"
    );
    let args = strings(&c["args"]);
    assert_eq!(args.first().map(String::as_str), Some("serve"), "{args:?}");
    let listen = args.iter().position(|a| a == "--listen").expect("--listen");
    assert_eq!(args[listen + 1], "0.0.0.0:9465");

    let caps = strings(&c["securityContext"]["capabilities"]["add"]);
    for cap in ["BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN"] {
        assert!(
            caps.iter().any(|c| c == cap),
            "capability {cap} missing: {caps:?}"
        );
    }
    assert_ne!(
        c["securityContext"]["privileged"], true,
        "capabilities, not privileged"
    );

    for kind in ["requests", "limits"] {
        for res in ["cpu", "memory"] {
            assert!(
                c["resources"][kind][res].as_str().is_some(),
                "resources.{kind}.{res} missing"
            );
        }
    }
}

#[test]
fn daemonset_mounts_what_ctwatch_reads() {
    let ds = deploy_daemonset();
    let spec = &ds["spec"]["template"]["spec"];
    let volumes = spec["volumes"].as_sequence().expect("volumes");
    let mounts = spec["containers"][0]["volumeMounts"]
        .as_sequence()
        .expect("volumeMounts");
    for host in ["/sys/kernel/btf", "/sys/fs/bpf", "/proc", "/run/netns"] {
        let vol = volumes
            .iter()
            .find(|v| v["hostPath"]["path"] == host)
            .unwrap_or_else(|| panic!("no hostPath volume for {host}"));
        assert!(
            mounts.iter().any(|m| m["name"] == vol["name"]),
            "volume for {host} is not mounted"
        );
    }
}

#[test]
fn daemonset_is_scraped_where_it_listens() {
    let ds = deploy_daemonset();
    let ann = &ds["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(ann["prometheus.io/scrape"], "true");
    assert_eq!(ann["prometheus.io/port"], "9465");
    assert_eq!(ann["prometheus.io/path"], "/metrics");
    let port = &ds["spec"]["template"]["spec"]["containers"][0]["ports"][0];
    assert_eq!(port["containerPort"], 9465);
}

#[test]
fn daemonset_namespace_is_created_first() {
    let docs = deploy_manifests();
    let ds_ns = deploy_daemonset()["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default")
        .to_string();
    if ds_ns != "kube-system" && ds_ns != "default" {
        let pos_ns = docs
            .iter()
            .position(|d| d["kind"] == "Namespace" && d["metadata"]["name"] == ds_ns.as_str());
        let pos_ds = docs.iter().position(|d| d["kind"] == "DaemonSet");
        assert!(
            pos_ns.is_some() && pos_ns < pos_ds,
            "Namespace {ds_ns} must come before the DaemonSet"
        );
    }
}

fn exprs(p: &Json) -> Vec<&str> {
    p["targets"]
        .as_array()
        .map(|t| t.iter().filter_map(|t| t["expr"].as_str()).collect())
        .unwrap_or_default()
}

/// The panels a fleet needs are there. Whether every series they query
/// exists is checked against a real scrape, in serve.rs.
#[test]
fn dashboard_panels_use_the_exported_series() {
    let d = dashboard();
    assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()));
    let all = dashboard_panels(&d);
    let mut ids: Vec<u64> = all.iter().filter_map(|p| p["id"].as_u64()).collect();
    let n = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), n, "panel ids are unique");
    for p in &all {
        let g = &p["gridPos"];
        assert!(
            g["w"].as_u64().is_some() && g["h"].as_u64().is_some(),
            "gridPos of {}",
            p["title"]
        );
    }
    let has = |f: &dyn Fn(&str) -> bool| all.iter().any(|p| exprs(p).into_iter().any(f));
    // Table fill: entries over limit.
    assert!(has(&|e| e.contains("ctwatch_nf_conntrack_entries")
        && e.contains("ctwatch_nf_conntrack_entries_limit")));
    // Drops/s: the kernel's counter and ctwatch's table-full count.
    assert!(has(
        &|e| e.contains("rate(ctwatch_nf_conntrack_stat_drop_total")
    ));
    assert!(has(&|e| e.contains("rate(ctwatch_table_full_drops_total")));
    // Culprits and victims.
    for dim in ["dst_port", "src_ip", "process"] {
        assert!(
            has(&|e| e.contains("ctwatch_entries_by{")
                && e.contains(&format!("dimension=\"{dim}\""))),
            "culprits by {dim}"
        );
        assert!(
            has(&|e| e.contains("ctwatch_table_full_drops_by_total{")
                && e.contains(&format!("dimension=\"{dim}\""))),
            "victims by {dim}"
        );
    }
    assert!(has(&|e| e.contains("ctwatch_lost_events_total")));
}
