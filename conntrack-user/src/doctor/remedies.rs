//! The exact commands a finding proposes: notrack rules placed on the hook
//! where they take effect, and the sysctls to raise or lower.
use super::*;
use crate::{aggregate::breakdown::endpoint, source::records};

/// Notrack rules scoped to exactly the port (or, failing that, the source)
/// that dominates new flows, refused flows or held entries; never a
/// blanket rule.
pub(crate) fn notrack_remedies(n: &NetnsMeasure) -> (Vec<String>, Vec<String>) {
    let held = n.held.as_ref().map(|h| Culprits {
        total: h.total,
        port: h.port.clone(),
        src: h.src.clone(),
        ..Default::default()
    });
    let sets: Vec<&Culprits> = [n.new_flows.as_ref(), n.refused.as_ref(), held.as_ref()]
        .into_iter()
        .flatten()
        .collect();
    if let Some(fwd) = sets.iter().find_map(|c| {
        c.service
            .as_ref()
            .filter(|v| v.forwarded && has_ports(v.proto) && dominates(v.count, c.total))
    }) {
        return forwarded_remedies(n, fwd);
    }
    let mut ports: Vec<PortShare> = Vec::new();
    for c in &sets {
        if let Some(p) = &c.port {
            if has_ports(p.proto) && dominates(p.count, c.total) {
                match ports
                    .iter_mut()
                    .find(|q| q.proto == p.proto && q.port == p.port)
                {
                    // A direction seen by a hook beats a dump's guess.
                    Some(q) if q.role == Role::Unknown => q.role = p.role,
                    Some(_) => {}
                    None => ports.push(p.clone()),
                }
            }
        }
    }
    let mut srcs: Vec<SrcShare> = Vec::new();
    if ports.is_empty() {
        for c in &sets {
            if let Some(s) = &c.src {
                if dominates(s.count, c.total) && !srcs.iter().any(|t| t.ip == s.ip) {
                    srcs.push(s.clone());
                }
            }
        }
    }
    if ports.is_empty() && srcs.is_empty() {
        return (vec![], vec![]);
    }
    let prefix = enter_prefix(n);
    let v6 = n.held.as_ref().is_some_and(|h| h.ipv6 > 0);
    let mut remedies = Vec::new();
    let mut unknown = false;
    for p in &ports {
        let proto = records::proto_name(p.proto);
        unknown |= p.role == Role::Unknown;
        // The flow's own packets match dport on the hook they arrive by;
        // its replies match sport on the other, or they make entries of
        // their own.
        let (fwd, back) = hooks(p.role);
        let rules = [
            (fwd, format!("{proto} dport {}", p.port)),
            (back, format!("{proto} sport {}", p.port)),
        ];
        remedies.push(nft_line(&prefix, &rules));
        let ipt = |bin: &str| {
            [(fwd, "--dport"), (back, "--sport")]
                .iter()
                .map(|(h, flag)| {
                    format!(
                        "{prefix}{bin} -t raw -A {} -p {proto} {flag} {} -j CT --notrack",
                        h.iptables(),
                        p.port
                    )
                })
                .collect::<Vec<_>>()
        };
        let mut lines = ipt("iptables");
        if v6 {
            lines.extend(ipt("ip6tables"));
        }
        remedies.push(lines.join(" && "));
    }
    for s in &srcs {
        unknown |= s.role == Role::Unknown;
        let fam = if s.ip.is_ipv4() { "ip" } else { "ip6" };
        let (fwd, back) = hooks(s.role);
        let rules = [
            (fwd, format!("{fam} saddr {}", s.ip)),
            (back, format!("{fam} daddr {}", s.ip)),
        ];
        remedies.push(nft_line(&prefix, &rules));
        let bin = if s.ip.is_ipv4() {
            "iptables"
        } else {
            "ip6tables"
        };
        remedies.push(format!(
            "{prefix}{bin} -t raw -A {} -s {ip} -j CT --notrack && {prefix}{bin} -t raw -A {} -d {ip} -j CT --notrack",
            fwd.iptables(),
            back.iptables(),
            ip = s.ip
        ));
    }
    let what = ports
        .iter()
        .map(port_name)
        .chain(srcs.iter().map(|s| s.ip.to_string()))
        .collect::<Vec<_>>()
        .join(", ");
    let mut caveats = vec![format!(
        "notrack takes {what} out of connection tracking: NAT (masquerade, DNAT, port forwarding) and stateful rules (ct state, conntrack-based policing) stop working for that traffic, so use it only where replies need no tracking; run one of the nft or iptables forms, not both"
    )];
    if unknown {
        caveats.push(
            "the direction was guessed from a dump: the rules assume the traffic arrives from outside; for traffic this host sends, swap the hooks (output for the dport rule, prerouting for the sport rule)"
                .into(),
        );
    }
    (remedies, caveats)
}

/// Forwarded flows cross this namespace (a node between pods, a router)
/// in both directions through its prerouting hook, before NAT: the
/// notrack rule matches the destination as it was addressed, and the
/// replies by where they come from (the backend, after a translation).
fn forwarded_remedies(n: &NetnsMeasure, v: &ServiceShare) -> (Vec<String>, Vec<String>) {
    let prefix = enter_prefix(n);
    let proto = records::proto_name(v.proto);
    let fam = |a: IpAddr| if a.is_ipv4() { "ip" } else { "ip6" };
    let (raddr, rport) = v.backend.unwrap_or((v.addr, v.port));
    let rules = [
        (
            Hook::Pre,
            format!("{} daddr {} {proto} dport {}", fam(v.addr), v.addr, v.port),
        ),
        (
            Hook::Pre,
            format!("{} saddr {raddr} {proto} sport {rport}", fam(raddr)),
        ),
    ];
    let bin = |a: IpAddr| if a.is_ipv4() { "iptables" } else { "ip6tables" };
    let remedies = vec![
        nft_line(&prefix, &rules),
        format!(
            "{prefix}{} -t raw -A PREROUTING -p {proto} -d {} --dport {} -j CT --notrack && {prefix}{} -t raw -A PREROUTING -p {proto} -s {raddr} --sport {rport} -j CT --notrack",
            bin(v.addr),
            v.addr,
            v.port,
            bin(raddr),
        ),
    ];
    let nat = match v.backend {
        Some((a, p)) => format!(
            "; here {} is translated to {}, and untracked packets are not translated: the service stops answering through that address, so point its clients at {} or keep tracking it and raise the table size instead",
            endpoint(v.addr, v.port),
            endpoint(a, p),
            endpoint(a, p)
        ),
        None => String::new(),
    };
    let caveats = vec![format!(
        "notrack takes {proto}/{} out of connection tracking in this namespace, which only forwards it: NAT (masquerade, DNAT, port forwarding) and stateful rules (ct state, conntrack-based policing) stop working for that traffic{nat}; run one of the nft or iptables forms, not both",
        endpoint(v.addr, v.port)
    )];
    (remedies, caveats)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Hook {
    Pre,
    Out,
}

impl Hook {
    fn chain(self) -> &'static str {
        match self {
            Hook::Pre => "pre",
            Hook::Out => "out",
        }
    }
    fn nft(self) -> &'static str {
        match self {
            Hook::Pre => "prerouting",
            Hook::Out => "output",
        }
    }
    fn iptables(self) -> &'static str {
        match self {
            Hook::Pre => "PREROUTING",
            Hook::Out => "OUTPUT",
        }
    }
}

/// (hook of the flow's first packet, hook of its replies).
pub(super) fn hooks(role: Role) -> (Hook, Hook) {
    match role {
        Role::Local => (Hook::Out, Hook::Pre),
        Role::Inbound | Role::Unknown => (Hook::Pre, Hook::Out),
    }
}

/// One nft invocation, applied atomically: table, both raw-priority chains
/// (before conntrack at -200), and the rules.
pub(super) fn nft_line(prefix: &str, rules: &[(Hook, String)]) -> String {
    let t = NOTRACK_TABLE;
    let mut cmds = vec![format!("add table inet {t}")];
    for h in [Hook::Pre, Hook::Out] {
        cmds.push(format!(
            "add chain inet {t} {} {{ type filter hook {} priority -300; }}",
            h.chain(),
            h.nft()
        ));
    }
    for (h, m) in rules {
        cmds.push(format!("add rule inet {t} {} {m} notrack", h.chain()));
    }
    format!("{prefix}nft '{}'", cmds.join("; "))
}
