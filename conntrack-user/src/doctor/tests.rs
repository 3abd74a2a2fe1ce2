use super::*;

fn base() -> Measured {
    Measured {
        nf_conntrack: Some(Presence::BuiltIn),
        max: 65536,
        buckets: 65536,
        object_size: ObjectSize {
            bytes: 256,
            source: "/proc/slabinfo".into(),
        },
        timeouts: BTreeMap::from([
            ("tcp_timeout_time_wait".to_string(), 120),
            ("udp_timeout".to_string(), 30),
        ]),
        window: Some(Window {
            secs: 2.0,
            mode: Some("tracepoint".into()),
            sees_new_flows: false,
        }),
        netns: vec![],
        notes: vec![],
    }
}

fn ns(count: u64, max: u64) -> NetnsMeasure {
    NetnsMeasure {
        inum: 4026532246,
        name: Some("edge".into()),
        path: "/run/netns/edge".into(),
        is_init: false,
        count,
        max,
        peak: count,
        drops_window: Some(0),
        early_drop_window: Some(0),
        drops_total: Some(0),
        full_drops_seen: Some(0),
        ..Default::default()
    }
}

fn held_tcp(total: u64, port: u16) -> TableContents {
    TableContents {
        total,
        tcp_states: BTreeMap::from([("ESTABLISHED".to_string(), total)]),
        port: Some(PortShare {
            proto: 6,
            port,
            role: Role::Inbound,
            count: total,
        }),
        src: Some(SrcShare {
            ip: "198.18.0.2".parse().unwrap(),
            role: Role::Unknown,
            count: total,
        }),
        ..Default::default()
    }
}

#[test]
fn table_full_is_critical_with_a_max_remedy_and_its_memory() {
    let mut m = base();
    m.max = 16;
    let mut n = ns(16, 16);
    n.drops_window = Some(150);
    n.full_drops_seen = Some(150);
    m.netns.push(n);
    let f = diagnose(&m);
    assert_eq!(f[0].severity, Severity::Critical, "{f:#?}");
    assert_eq!(f[0].netns, Some(4026532246));
    assert!(f[0].title.contains("full"));
    assert_eq!(
        f[0].remedies[0],
        "sysctl -w net.netfilter.nf_conntrack_max=32"
    );
    assert_eq!(
        f[0].remedies[1],
        "echo 'net.netfilter.nf_conntrack_max = 32' > /etc/sysctl.d/90-conntrack.conf"
    );
    // 32 entries × 256 B.
    assert!(f[0].caveats[0].contains("8.0 KiB"), "{:?}", f[0].caveats);
    assert!(f[0].caveats[0].contains("256 B"));
    assert!(
        f[0].evidence.contains("150 table-full drops"),
        "{}",
        f[0].evidence
    );
    assert!(f.iter().all(|x| x.rule != "healthy"));
}

#[test]
fn suggested_max_doubles_the_peak_to_a_power_of_two() {
    assert_eq!(suggested_max(16), 32);
    assert_eq!(suggested_max(200_000), 524_288);
    assert_eq!(suggested_max(0), 1);
    assert_eq!(suggested_max(u64::MAX), MAX_SUGGESTED);
    // Raised at 85% fill: the answer is above today's max.
    let mut m = base();
    m.netns.push(ns(56_000, 65_536));
    let f = diagnose(&m);
    assert_eq!(f[0].severity, Severity::Warning);
    assert_eq!(
        f[0].remedies[0],
        "sysctl -w net.netfilter.nf_conntrack_max=131072"
    );
}

#[test]
fn unreadable_slab_falls_back_and_says_so() {
    let mut m = base();
    m.object_size = ObjectSize::default();
    m.max = 16;
    m.netns.push(ns(16, 16));
    let f = diagnose(&m);
    assert!(f[0].caveats[0].contains("320 B"), "{:?}", f[0].caveats);
    assert!(f[0].caveats[0].contains("guess"));
}

#[test]
fn dominant_port_gets_a_notrack_rule_scoped_to_it_with_the_nat_warning() {
    let mut m = base();
    m.max = 16;
    let mut n = ns(16, 16);
    n.full_drops_seen = Some(150);
    n.refused = Some(Culprits {
        total: 150,
        port: Some(PortShare {
            proto: 17,
            port: 5353,
            role: Role::Inbound,
            count: 150,
        }),
        src: Some(SrcShare {
            ip: "198.18.0.2".parse().unwrap(),
            role: Role::Inbound,
            count: 150,
        }),
        ..Default::default()
    });
    m.netns.push(n);
    let f = &diagnose(&m)[0];
    let nft = f
        .remedies
        .iter()
        .find(|r| r.contains("nft"))
        .expect("an nft remedy");
    assert_eq!(
        nft,
        "ip netns exec edge nft 'add table inet ctwatch_notrack; \
         add chain inet ctwatch_notrack pre { type filter hook prerouting priority -300; }; \
         add chain inet ctwatch_notrack out { type filter hook output priority -300; }; \
         add rule inet ctwatch_notrack pre udp dport 5353 notrack; \
         add rule inet ctwatch_notrack out udp sport 5353 notrack'"
    );
    let ipt = f.remedies.iter().find(|r| r.contains("iptables")).unwrap();
    assert!(
        ipt.contains("iptables -t raw -A PREROUTING -p udp --dport 5353 -j CT --notrack"),
        "{ipt}"
    );
    assert!(ipt.contains("-A OUTPUT -p udp --sport 5353"), "{ipt}");
    // Scoped: every notrack rule names the port; none is a blanket rule.
    for r in f.remedies.iter().filter(|r| r.contains("notrack")) {
        for rule in r
            .split(';')
            .filter(|c| c.contains("notrack") && c.contains("add rule"))
        {
            assert!(rule.contains("5353"), "unscoped rule {rule}");
        }
    }
    // A dominant port makes a source rule unnecessary.
    assert!(!f.remedies.iter().any(|r| r.contains("saddr")));
    assert!(
        f.caveats
            .iter()
            .any(|c| c.contains("NAT") && c.contains("ct state")),
        "{:?}",
        f.caveats
    );
}

#[test]
fn locally_sent_flood_untracks_on_output_and_replies_on_prerouting() {
    let mut m = base();
    m.max = 16;
    let mut n = ns(16, 16);
    n.is_init = true;
    n.name = None;
    n.full_drops_seen = Some(40);
    n.refused = Some(Culprits {
        total: 40,
        port: Some(PortShare {
            proto: 17,
            port: 9999,
            role: Role::Local,
            count: 40,
        }),
        src: None,
        ..Default::default()
    });
    m.netns.push(n);
    let f = &diagnose(&m)[0];
    let nft = f.remedies.iter().find(|r| r.contains("nft")).unwrap();
    assert!(
        nft.starts_with("nft '"),
        "init netns needs no prefix: {nft}"
    );
    assert!(nft.contains("add rule inet ctwatch_notrack out udp dport 9999 notrack"));
    assert!(nft.contains("add rule inet ctwatch_notrack pre udp sport 9999 notrack"));
}

#[test]
fn no_dominant_port_falls_back_to_the_dominant_source() {
    let mut m = base();
    m.max = 100;
    let mut n = ns(100, 100);
    n.path = "/proc/4242/ns/net".into();
    n.name = None;
    n.held = Some(TableContents {
        total: 100,
        port: Some(PortShare {
            proto: 6,
            port: 80,
            role: Role::Inbound,
            count: 20,
        }),
        src: Some(SrcShare {
            ip: "2001:2::2".parse().unwrap(),
            role: Role::Unknown,
            count: 90,
        }),
        ..Default::default()
    });
    m.netns.push(n);
    let f = &diagnose(&m)[0];
    let nft = f.remedies.iter().find(|r| r.contains("nft")).unwrap();
    assert!(
        nft.starts_with("nsenter --net=/proc/4242/ns/net nft"),
        "{nft}"
    );
    assert!(nft.contains("pre ip6 saddr 2001:2::2 notrack"), "{nft}");
    assert!(nft.contains("out ip6 daddr 2001:2::2 notrack"), "{nft}");
    assert!(f
        .remedies
        .iter()
        .any(|r| r.contains("ip6tables -t raw -A PREROUTING -s 2001:2::2")));
    assert!(f.caveats.iter().any(|c| c.contains("guessed")));
}

#[test]
fn small_samples_do_not_dominate() {
    let mut m = base();
    m.max = 16;
    let mut n = ns(16, 16);
    n.refused = Some(Culprits {
        total: 3,
        port: Some(PortShare {
            proto: 17,
            port: 53,
            role: Role::Inbound,
            count: 3,
        }),
        src: None,
        ..Default::default()
    });
    m.netns.push(n);
    let f = &diagnose(&m)[0];
    assert!(
        !f.remedies.iter().any(|r| r.contains("notrack")),
        "{:?}",
        f.remedies
    );
}

#[test]
fn time_wait_heavy_table_gets_a_timeout_remedy() {
    let mut m = base();
    let mut n = ns(40_000, 65_536);
    let mut h = held_tcp(40_000, 443);
    h.tcp_states = BTreeMap::from([
        ("TIME_WAIT".to_string(), 30_000),
        ("ESTABLISHED".to_string(), 10_000),
    ]);
    n.held = Some(h);
    n.timeouts = BTreeMap::from([("tcp_timeout_time_wait".to_string(), 120)]);
    m.netns.push(n);
    let f = diagnose(&m);
    assert_eq!(f.len(), 1, "{f:#?}");
    assert_eq!(f[0].severity, Severity::Warning);
    assert_eq!(f[0].rule, "timeouts");
    assert_eq!(
        f[0].remedies[0],
        "ip netns exec edge sysctl -w net.netfilter.nf_conntrack_tcp_timeout_time_wait=30"
    );
    assert!(f[0].evidence.contains("75%"), "{}", f[0].evidence);
    assert!(f[0].evidence.contains("120 s"), "{}", f[0].evidence);
}

#[test]
fn unanswered_udp_gets_the_udp_timeout_and_init_gets_a_persistent_form() {
    let mut m = base();
    let mut n = ns(40_000, 65_536);
    n.is_init = true;
    n.name = None;
    n.held = Some(TableContents {
        total: 40_000,
        udp: 39_000,
        udp_unreplied: 38_000,
        ..Default::default()
    });
    m.netns.push(n);
    let f = diagnose(&m);
    let t = f
        .iter()
        .find(|x| x.rule == "timeouts")
        .expect("timeout finding");
    assert_eq!(
        t.remedies[0],
        "sysctl -w net.netfilter.nf_conntrack_udp_timeout=10"
    );
    assert!(t.remedies[1].contains("/etc/sysctl.d/"));
}

#[test]
fn already_short_timeouts_are_left_alone() {
    let mut m = base();
    let mut n = ns(40_000, 65_536);
    let mut h = held_tcp(40_000, 443);
    h.tcp_states = BTreeMap::from([("TIME_WAIT".to_string(), 40_000)]);
    n.held = Some(h);
    n.timeouts = BTreeMap::from([("tcp_timeout_time_wait".to_string(), 10)]);
    m.netns.push(n);
    assert!(diagnose(&m).iter().all(|f| f.rule != "timeouts"));
}

#[test]
fn healthy_host_gets_one_info_finding_with_numbers() {
    let mut m = base();
    let mut n = ns(1200, 262_144);
    n.held = Some(held_tcp(1200, 443));
    m.netns.push(n);
    m.max = 262_144;
    m.buckets = 262_144;
    let f = diagnose(&m);
    assert_eq!(f.len(), 1, "{f:#?}");
    assert_eq!(f[0].severity, Severity::Info);
    assert!(f[0].evidence.contains("1200/262144"), "{}", f[0].evidence);
    assert!(f[0].remedies.is_empty());
    let v = serde_json::to_value(&f[0]).unwrap();
    assert_eq!(v["severity"], "info");
    assert!(v["remedies"].as_array().unwrap().is_empty());
}

#[test]
fn long_chains_suggest_a_hashsize_from_the_init_netns() {
    let mut m = base();
    m.max = 1_048_576;
    m.buckets = 16_384;
    m.nf_conntrack = Some(Presence::Module);
    m.netns.push(ns(1000, 1_048_576));
    let f = diagnose(&m);
    let b = f.iter().find(|x| x.rule == "hash-buckets").unwrap();
    assert_eq!(
        b.remedies[0],
        "echo 262144 > /sys/module/nf_conntrack/parameters/hashsize"
    );
    assert!(b.remedies[1].contains("options nf_conntrack hashsize=262144"));
    assert!(b.caveats[0].contains("initial network namespace only"));
}

#[test]
fn raising_max_past_the_buckets_also_suggests_hashsize() {
    let mut m = base();
    m.max = 65_536;
    m.buckets = 16_384;
    m.netns.push(ns(65_536, 65_536));
    let f = diagnose(&m);
    assert_eq!(f[0].severity, Severity::Critical);
    let b = f.iter().find(|x| x.rule == "hash-buckets").unwrap();
    // Suggested max 131072 → 32768 buckets.
    assert_eq!(
        b.remedies[0],
        "echo 32768 > /sys/module/nf_conntrack/parameters/hashsize"
    );
    assert!(b.remedies[1].contains("nf_conntrack_buckets = 32768"));
}

#[test]
fn findings_are_ranked_critical_first() {
    let mut m = base();
    m.max = 65_536;
    let mut a = ns(40_000, 65_536);
    let mut h = held_tcp(40_000, 443);
    h.tcp_states = BTreeMap::from([("TIME_WAIT".to_string(), 40_000)]);
    a.held = Some(h);
    a.timeouts = BTreeMap::from([("tcp_timeout_time_wait".to_string(), 120)]);
    let mut b = ns(65_536, 65_536);
    b.inum = 4026532999;
    m.netns = vec![a, b];
    let f = diagnose(&m);
    let sev: Vec<Severity> = f.iter().map(|x| x.severity).collect();
    let mut sorted = sev.clone();
    sorted.sort();
    assert_eq!(sev, sorted);
    assert_eq!(f[0].severity, Severity::Critical);
    assert_eq!(f[0].netns, Some(4026532999));
}

#[test]
fn drops_without_a_full_table_are_flagged_for_investigation() {
    let mut m = base();
    let mut n = ns(100, 65_536);
    n.drops_window = Some(7);
    m.netns.push(n);
    let f = diagnose(&m);
    assert_eq!(f[0].rule, "conntrack-drops");
    assert!(f[0].remedies[0].contains("ctwatch drops --netns edge"));
}

#[test]
fn absent_conntrack_is_one_info_finding() {
    let m = Measured {
        nf_conntrack: Some(Presence::Absent),
        ..Default::default()
    };
    let f = diagnose(&m);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].severity, Severity::Info);
}

#[test]
fn slabinfo_objsize_of_nf_conntrack_only() {
    let text = "slabinfo - version: 2.1\n\
# name            <active_objs> <num_objs> <objsize> <objperslab> <pagesperslab> : tunables <limit> <batchcount> <sharedfactor> : slabdata <active_slabs> <num_slabs> <sharedavail>\n\
nf_conntrack_expect      0      0    232   17    1 : tunables    0    0    0 : slabdata      0      0      0\n\
nf_conntrack         112    176    256   16    1 : tunables    0    0    0 : slabdata     11     11      0\n";
    assert_eq!(parse_slabinfo(text), Some(256));
    let old = "nf_conntrack_ffff8800b6e5c000    96    96    312   26    2 : tunables 0 0 0 : slabdata 4 4 0\n";
    assert_eq!(parse_slabinfo(old), Some(312));
    assert_eq!(parse_slabinfo("nf_conntrack_expect 0 0 232 17 1\n"), None);
    assert_eq!(parse_slabinfo("nf_conntrack 1 2\n"), None);
    assert_eq!(parse_slabinfo(""), None);
}

#[test]
fn flow_tally_picks_the_leading_port_and_its_direction() {
    let mut t = FlowTally::default();
    let a: IpAddr = "198.18.0.2".parse().unwrap();
    t.add(17, 5353, a, Role::Inbound, 100);
    t.add(17, 5353, a, Role::Unknown, 5);
    t.add(6, 80, "198.18.0.3".parse().unwrap(), Role::Local, 20);
    // ICMP's type/code is no port.
    t.add(1, 0x0800, a, Role::Inbound, 3);
    let c = t.culprits();
    assert_eq!(c.total, 128);
    let p = c.port.unwrap();
    assert_eq!(
        (p.proto, p.port, p.role, p.count),
        (17, 5353, Role::Inbound, 105)
    );
    assert_eq!(c.src.unwrap().count, 108);
    assert!(t
        .ports
        .iter()
        .any(|(k, _)| *k == PortKey { proto: 1, port: 0 }));
}

#[test]
fn forwarded_service_is_untracked_where_it_is_forwarded_before_nat() {
    let mut m = base();
    m.max = 16;
    let mut n = ns(16, 16);
    n.full_drops_seen = Some(200);
    n.drops_window = Some(200);
    n.refused = Some(Culprits {
        total: 200,
        port: Some(PortShare {
            proto: 17,
            port: 8053,
            role: Role::Inbound,
            count: 200,
        }),
        service: Some(ServiceShare {
            proto: 17,
            addr: "198.18.10.1".parse().unwrap(),
            port: 8053,
            backend: Some(("198.18.20.2".parse().unwrap(), 53)),
            forwarded: true,
            count: 200,
        }),
        pod: Some(PodShare {
            name: "pod default/dns-client".into(),
            count: 200,
        }),
        ..Default::default()
    });
    m.netns.push(n);
    let f = &diagnose(&m)[0];
    let nft = f.remedies.iter().find(|r| r.contains("nft")).unwrap();
    // Both directions cross the forwarding namespace's prerouting hook.
    assert!(
        nft.contains("pre ip daddr 198.18.10.1 udp dport 8053 notrack"),
        "{nft}"
    );
    assert!(
        nft.contains("pre ip saddr 198.18.20.2 udp sport 53 notrack"),
        "{nft}"
    );
    assert!(!nft.contains("add rule inet ctwatch_notrack out"), "{nft}");
    assert!(
        f.caveats
            .iter()
            .any(|c| c.contains("translated to 198.18.20.2:53")),
        "the NAT caveat: {:?}",
        f.caveats
    );
    assert!(
        f.evidence.contains("pod default/dns-client"),
        "{}",
        f.evidence
    );
    assert!(f.evidence.contains("forwarded"), "{}", f.evidence);
}
