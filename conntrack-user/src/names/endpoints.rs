//! Which network namespace on this host owns an address. On a container
//! host the dropped packets are forwarded between pod namespaces: the
//! namespace that drops them is the node's, and both ends live elsewhere.
//!
//! Every namespace is found (named ones and those only a process keeps
//! alive, as container runtimes leave them), and its interface addresses
//! are read inside it. A miss refreshes the map at most once per
//! [`REFRESH`], so a flood from a million spoofed sources costs one scan
//! per interval, not one per source.
use std::{
    collections::HashMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use crate::source::netns::{self, NetnsInfo};

/// Minimum time between two scans of every namespace's addresses.
const REFRESH: Duration = Duration::from_secs(5);
/// Bound on the addresses remembered; past it, the rest are not mapped.
const MAX_ADDRS: usize = 65536;

#[derive(Debug, Default)]
pub(crate) struct Endpoints {
    owners: HashMap<IpAddr, NetnsInfo>,
    scanned: Option<Instant>,
}

/// The addresses of the calling thread's network namespace (loopback
/// excluded: every namespace has it, so it names none).
fn addresses_here() -> Vec<IpAddr> {
    let Ok(ifaddrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    ifaddrs
        .filter_map(|i| {
            let a = i.address?;
            let ip: IpAddr = if let Some(v4) = a.as_sockaddr_in() {
                IpAddr::V4(v4.ip())
            } else {
                IpAddr::V6(a.as_sockaddr_in6()?.ip())
            };
            (!ip.is_loopback()).then_some(ip)
        })
        .collect()
}

impl Endpoints {
    /// The namespace whose interfaces carry `addr`, if one on this host does.
    pub(crate) fn namespace_of(&mut self, addr: IpAddr) -> Option<NetnsInfo> {
        if addr.is_loopback() || addr.is_unspecified() {
            return None;
        }
        if !self.owners.contains_key(&addr) && self.scanned.is_none_or(|t| t.elapsed() >= REFRESH) {
            self.scan();
        }
        self.owners.get(&addr).cloned()
    }

    fn scan(&mut self) {
        self.scanned = Some(Instant::now());
        let Ok(all) = netns::list() else {
            return;
        };
        let mut owners = HashMap::new();
        for ns in all {
            // A namespace that vanished meanwhile simply owns nothing now.
            let Ok(addrs) = netns::run_in(&ns, addresses_here) else {
                continue;
            };
            for a in addrs {
                if owners.len() >= MAX_ADDRS {
                    log::warn!(
                        "over {MAX_ADDRS} addresses on this host's namespaces; the rest are not mapped to theirs"
                    );
                    self.owners = owners;
                    return;
                }
                // The same address in two namespaces (overlapping pod
                // networks) names neither for sure: the first one keeps it.
                owners.entry(a).or_insert_with(|| ns.clone());
            }
        }
        self.owners = owners;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_and_unspecified_belong_to_nobody() {
        let mut e = Endpoints::default();
        assert_eq!(e.namespace_of("127.0.0.1".parse().unwrap()), None);
        assert_eq!(e.namespace_of("::".parse().unwrap()), None);
        assert!(
            e.scanned.is_none(),
            "no scan for addresses no namespace can own"
        );
    }

    #[test]
    fn root_finds_an_address_of_a_namespace_it_made() {
        use crate::source::netns::testutil::{can_run, run, TestNetns};
        if !can_run("root_finds_an_address_of_a_namespace_it_made", &["ip"]) {
            return;
        }
        let ns = TestNetns::new("ctw-endpoints");
        let ip = |args: &[&str]| {
            let mut a = vec!["ip", "netns", "exec", &ns.name, "ip"];
            a.extend_from_slice(args);
            run(&a);
        };
        ip(&["link", "add", "e0", "type", "veth", "peer", "name", "e1"]);
        ip(&["addr", "add", "198.19.77.1/32", "dev", "e0"]);
        ip(&["link", "set", "e0", "up"]);
        let mut e = Endpoints::default();
        let found = e
            .namespace_of("198.19.77.1".parse().unwrap())
            .map(|n| n.inum);
        assert_eq!(found, Some(ns.info.inum));
        // A second miss within the refresh interval does not scan again.
        let at = e.scanned;
        assert_eq!(e.namespace_of("198.19.77.2".parse().unwrap()), None);
        assert_eq!(e.scanned, at);
    }
}
