//! Traffic peer for the integration tests. Runs inside a test namespace
//! (`ip netns exec NS ctpeer ...`) and prints one `ready` line when its
//! sockets are in place, so tests never sleep on a guess.
use std::{
    io::Write,
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

fn usage() -> ! {
    eprintln!(
        "usage: ctpeer udp-listen ADDR:PORT | tcp-listen ADDR:PORT | tcp-hold ADDR:PORT N | \
         udp-send ADDR:PORT N [SPREAD] | udp-flood ADDR:PORT MILLIS | tcp-syn ADDR:PORT N"
    );
    std::process::exit(2)
}

fn ready(msg: &str) {
    println!("ready {msg}");
    let _ = std::io::stdout().flush();
}

fn park() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cmd, addr) = match (args.first(), args.get(1)) {
        (Some(c), Some(a)) => (
            c.as_str(),
            a.parse::<SocketAddr>().unwrap_or_else(|_| usage()),
        ),
        _ => usage(),
    };
    let n: usize = args
        .get(2)
        .map(|s| s.parse().unwrap_or_else(|_| usage()))
        .unwrap_or(0);
    match cmd {
        "udp-listen" => {
            let _s = UdpSocket::bind(addr).expect("bind");
            ready("udp-listen");
            park();
        }
        "tcp-listen" => {
            let l = TcpListener::bind(addr).expect("bind");
            ready("tcp-listen");
            let mut held = Vec::new();
            for s in l.incoming().flatten() {
                held.push(s);
            }
            park();
        }
        "tcp-hold" => {
            let mut held = Vec::new();
            for _ in 0..n {
                held.push(
                    TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect"),
                );
            }
            ready(&format!("holding {}", held.len()));
            park();
        }
        "udp-send" => {
            // One socket per datagram: every datagram is a new flow. An
            // optional SPREAD cycles the destination port over PORT..PORT+SPREAD,
            // for more flows than one source has ephemeral ports.
            let spread: u16 = args
                .get(3)
                .map(|s| s.parse().unwrap_or_else(|_| usage()))
                .unwrap_or(1)
                .max(1);
            let (mut ok, mut eperm, mut other) = (0, 0, 0);
            let bind = any_port(&addr);
            for i in 0..n {
                if i % 256 == 255 {
                    // Let the receiving softirq keep up: a veth backlog
                    // overflow would drop datagrams before conntrack sees them.
                    std::thread::sleep(Duration::from_millis(1));
                }
                let s = UdpSocket::bind(bind).expect("bind");
                let mut to = addr;
                to.set_port(addr.port().wrapping_add((i % spread as usize) as u16));
                match s.send_to(b"ctwatch", to) {
                    Ok(_) => ok += 1,
                    Err(e) if e.raw_os_error() == Some(libc::EPERM) => eperm += 1,
                    Err(_) => other += 1,
                }
            }
            println!("sent {ok} eperm {eperm} other {other}");
        }
        "udp-flood" => {
            // One socket, as fast as it goes, for N milliseconds: with the
            // table full every datagram is a new flow and a table-full drop.
            let bind = any_port(&addr);
            let s = UdpSocket::bind(bind).expect("bind");
            let until = std::time::Instant::now() + Duration::from_millis(n as u64);
            let mut sent = 0u64;
            while std::time::Instant::now() < until {
                for _ in 0..256 {
                    let _ = s.send_to(b"ctwatch", addr);
                    sent += 1;
                }
            }
            println!("flood {sent}");
        }
        "tcp-syn" => {
            // Non-blocking connects, closed before the first retransmit
            // (1 s): exactly one SYN per flow.
            let mut socks = Vec::new();
            for _ in 0..n {
                let domain = if addr.is_ipv4() {
                    libc::AF_INET
                } else {
                    libc::AF_INET6
                };
                let fd =
                    unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0) };
                assert!(fd >= 0, "socket");
                let (sa, len) = sockaddr(&addr);
                unsafe { libc::connect(fd, (&sa as *const libc::sockaddr_storage).cast(), len) };
                socks.push(fd);
            }
            std::thread::sleep(Duration::from_millis(300));
            for fd in &socks {
                unsafe { libc::close(*fd) };
            }
            println!("syn {}", socks.len());
        }
        _ => usage(),
    }
}

/// The wildcard address of `to`'s family, any port: a fresh source port.
fn any_port(to: &SocketAddr) -> SocketAddr {
    if to.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    }
}

fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin) };
            (ss, std::mem::size_of::<libc::sockaddr_in>() as u32)
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as u16,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin6) };
            (ss, std::mem::size_of::<libc::sockaddr_in6>() as u32)
        }
    }
}
