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
         udp-send ADDR:PORT N [SPREAD] | udp-flood ADDR:PORT MILLIS | tcp-syn ADDR:PORT N | \
         udp-sink ADDR:PORT | udp-stream ADDR:PORT N SPORT | \
         raw-flood ADDR:PORT N SRC/LEN [PPS]"
    );
    eprintln!(
        "       ctpeer bench-stream ADDR:PORT MILLIS [SPORT] | \
         bench-rotate ADDR:PORT MILLIS [NPORTS [NDST [SRC NSRC]]] | bench-sink ADDR:PORT N | \
         bench-fill ADDR:PORT N [SPREAD]"
    );
    eprintln!("       ctpeer udp-ask ADDR:PORT N | tcp-ask ADDR:PORT N");
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
        "bench-stream" => {
            // Benchmark traffic: 1-byte datagrams on one connected socket
            // (bound to source port SPORT, default any) for N milliseconds.
            // One flow, tracked from its first packet on.
            let sport: u16 = args
                .get(3)
                .map(|s| s.parse().unwrap_or_else(|_| usage()))
                .unwrap_or(0);
            bench_stream(addr, n as u64, sport);
        }
        "bench-rotate" => {
            // Benchmark traffic: 1-byte datagrams for N milliseconds, the
            // i-th to port PORT + i % NPORTS of address ADDR + (i / NPORTS)
            // % NDST: every datagram a new flow. With SRC NSRC, NSRC sockets
            // bound to SRC, SRC+1, ... take turns (many sources); otherwise
            // one socket. Counts EPERM (a locally generated table-full drop).
            let num = |i: usize, default: u32| -> u32 {
                args.get(i)
                    .map(|s| s.parse().unwrap_or_else(|_| usage()))
                    .unwrap_or(default)
            };
            let src = args
                .get(5)
                .map(|s| s.parse::<std::net::Ipv4Addr>().unwrap_or_else(|_| usage()));
            bench_rotate(addr, n as u64, num(3, 1), num(4, 1), src, num(6, 1));
        }
        "bench-sink" => {
            // Drains N sockets bound to 0.0.0.0:PORT .. PORT+N-1 with large
            // buffers, answering the first datagram each socket gets once
            // (so that flow sees a reply), until killed.
            bench_sink(addr, n.max(1));
        }
        "bench-fill" => {
            // Fills a table with N flows: one datagram from each source port
            // 1024, 1025, ... to each of SPREAD ports PORT .. PORT+SPREAD-1,
            // paced so the receiving backlog never overflows.
            let spread: u32 = args
                .get(3)
                .map(|s| s.parse().unwrap_or_else(|_| usage()))
                .unwrap_or(16)
                .max(1);
            bench_fill(addr, n as u64, spread);
        }
        "raw-flood" => {
            // N datagrams (0: until killed), each from its own source address
            // in SRC/LEN: a spoofed flood, every datagram a new flow from a
            // new source. Optional PPS paces it.
            let (base, len) = args
                .get(3)
                .and_then(|p| parse_prefix(p))
                .unwrap_or_else(|| usage());
            if base.is_ipv4() != addr.is_ipv4() {
                usage();
            }
            let pps: u64 = args
                .get(4)
                .map(|s| s.parse().unwrap_or_else(|_| usage()))
                .unwrap_or(0);
            raw_flood(addr, n as u64, base, len, pps);
        }
        "udp-sink" => {
            // Receives and discards, from a buffer large enough that a
            // burst never overflows it: a socket-buffer drop would be a
            // freed skb, which the test that counts program runs must not
            // provoke.
            let s = UdpSocket::bind(addr).expect("bind");
            let size: libc::c_int = 32 << 20;
            let rc = unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&s),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUFFORCE,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as u32,
                )
            };
            assert_eq!(rc, 0, "SO_RCVBUFFORCE: {}", std::io::Error::last_os_error());
            ready("udp-sink");
            let mut buf = [0u8; 2048];
            loop {
                let _ = s.recv(&mut buf);
            }
        }
        "udp-stream" => {
            // N datagrams of one flow: one socket, fixed source port SPORT,
            // so a second run continues the flow a first one created.
            let sport: u16 = args
                .get(3)
                .map(|s| s.parse().unwrap_or_else(|_| usage()))
                .unwrap_or_else(|| usage());
            let mut bind = any_port(&addr);
            bind.set_port(sport);
            let s = UdpSocket::bind(bind).expect("bind");
            s.connect(addr).expect("connect");
            let mut sent = 0;
            for i in 0..n {
                if i % 64 == 63 {
                    // Paced, so neither the veth backlog nor the receiver
                    // falls behind and drops.
                    std::thread::sleep(Duration::from_millis(1));
                }
                if s.send(b"ctwatch").is_ok() {
                    sent += 1;
                }
            }
            println!("sent {sent}");
        }
        "udp-ask" => {
            // A client as resolvers are: N requests, each from a socket of
            // its own, every socket kept open while it waits for its answer
            // (until killed).
            udp_ask(addr, n);
        }
        "tcp-ask" => {
            // A client as RPC clients are: N connects, each socket kept
            // while the kernel retries its SYN (until killed).
            tcp_ask(addr, n);
        }
        _ => usage(),
    }
}

/// `a.b.c.d/len` or `x:y::/len`, with at most 64 host bits.
fn parse_prefix(p: &str) -> Option<(std::net::IpAddr, u32)> {
    let (ip, len) = p.split_once('/')?;
    let ip: std::net::IpAddr = ip.parse().ok()?;
    let len: u32 = len.parse().ok()?;
    let bits = if ip.is_ipv4() { 32 } else { 128 };
    (len <= bits && bits - len <= 64).then_some((ip, len))
}

/// The `i`-th source of the prefix. Multiplying by an odd constant modulo
/// 2^hostbits is a bijection, so the first 2^hostbits sources are all
/// distinct, yet consecutive ones land far apart, as a botnet's would.
fn nth_source(base: std::net::IpAddr, len: u32, i: u64) -> std::net::IpAddr {
    use std::net::IpAddr;
    let total = if base.is_ipv4() { 32 } else { 128 };
    let host_bits = total - len;
    let mask = if host_bits == 64 {
        u64::MAX
    } else {
        (1u64 << host_bits) - 1
    };
    let host = (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) & mask) as u128;
    match base {
        IpAddr::V4(b) => {
            let net = u32::from(b) as u128 & !(mask as u128);
            IpAddr::V4(((net | host) as u32).into())
        }
        IpAddr::V6(b) => {
            let net = u128::from(b) & !(mask as u128);
            IpAddr::V6((net | host).into())
        }
    }
}

/// Ones' complement sum of 16-bit words, as the IP and UDP checksums use.
fn csum_add(mut sum: u32, bytes: &[u8]) -> u32 {
    for c in bytes.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    sum
}

fn csum_fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// One UDP datagram with its IP header, as a raw socket with IP_HDRINCL
/// (IPV6_HDRINCL) sends it: the kernel neither checks nor rewrites the
/// source address.
fn spoofed_datagram(src: std::net::IpAddr, dst: &SocketAddr, sport: u16) -> Vec<u8> {
    use std::net::IpAddr;
    const PAYLOAD: &[u8] = b"ctwatch";
    let udp_len = (8 + PAYLOAD.len()) as u16;
    let mut udp = Vec::with_capacity(udp_len as usize);
    udp.extend_from_slice(&sport.to_be_bytes());
    udp.extend_from_slice(&dst.port().to_be_bytes());
    udp.extend_from_slice(&udp_len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(PAYLOAD);
    let (s, d): (Vec<u8>, Vec<u8>) = match (src, dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => (s.octets().into(), d.octets().into()),
        (IpAddr::V6(s), IpAddr::V6(d)) => (s.octets().into(), d.octets().into()),
        _ => usage(),
    };
    // The pseudo-header's fields sum the same in both families' layouts.
    let pseudo = csum_add(csum_add(csum_add(0, &s), &d), &[0, 17]);
    let mut sum = csum_fold(csum_add(csum_add(pseudo, &udp_len.to_be_bytes()), &udp));
    if sum == 0 {
        // Zero means "no checksum" on the wire.
        sum = 0xffff;
    }
    udp[6..8].copy_from_slice(&sum.to_be_bytes());
    let mut pkt = Vec::with_capacity(40 + udp.len());
    if src.is_ipv4() {
        let total = (20 + udp.len()) as u16;
        pkt.extend_from_slice(&[0x45, 0]);
        pkt.extend_from_slice(&total.to_be_bytes());
        pkt.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
        pkt.extend_from_slice(&s);
        pkt.extend_from_slice(&d);
        let hsum = csum_fold(csum_add(0, &pkt));
        pkt[10..12].copy_from_slice(&hsum.to_be_bytes());
    } else {
        pkt.extend_from_slice(&[0x60, 0, 0, 0]);
        pkt.extend_from_slice(&(udp.len() as u16).to_be_bytes());
        pkt.extend_from_slice(&[17, 64]);
        pkt.extend_from_slice(&s);
        pkt.extend_from_slice(&d);
    }
    pkt.extend_from_slice(&udp);
    pkt
}

fn raw_flood(to: SocketAddr, n: u64, base: std::net::IpAddr, len: u32, pps: u64) {
    let (domain, level, opt) = if to.is_ipv4() {
        (libc::AF_INET, libc::IPPROTO_IP, libc::IP_HDRINCL)
    } else {
        (libc::AF_INET6, libc::IPPROTO_IPV6, libc::IPV6_HDRINCL)
    };
    let fd = unsafe { libc::socket(domain, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
    let one: libc::c_int = 1;
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    assert_eq!(rc, 0, "HDRINCL: {}", std::io::Error::last_os_error());
    // A raw socket takes no port: the destination's must be 0.
    let mut dst = to;
    dst.set_port(0);
    let (sa, salen) = sockaddr(&dst);
    ready("raw-flood");
    let start = std::time::Instant::now();
    let (mut sent, mut errors) = (0u64, 0u64);
    let mut i = 0u64;
    while n == 0 || i < n {
        if pps > 0 && i.is_multiple_of(64) {
            let due = Duration::from_secs_f64(i as f64 / pps as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        let src = nth_source(base, len, i);
        let pkt = spoofed_datagram(src, &to, 40000 + (i % 20000) as u16);
        let rc = unsafe {
            libc::sendto(
                fd,
                pkt.as_ptr().cast(),
                pkt.len(),
                0,
                (&sa as *const libc::sockaddr_storage).cast(),
                salen,
            )
        };
        if rc == pkt.len() as isize {
            sent += 1;
        } else {
            errors += 1;
        }
        i += 1;
    }
    println!(
        "raw-sent {sent} errors {errors} in {:.3}s",
        start.elapsed().as_secs_f64()
    );
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

/// Counts one send: sent, EPERM (a local table-full drop), other errors.
fn bench_tally(res: std::io::Result<usize>, tally: &mut [u64; 3]) {
    match res {
        Ok(_) => tally[0] += 1,
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => tally[1] += 1,
        Err(_) => tally[2] += 1,
    }
}

/// `KIND sent OK eperm E other O secs T`: what `cargo xtask bench` parses.
fn bench_print(kind: &str, tally: [u64; 3], start: std::time::Instant) {
    println!(
        "{kind} sent {} eperm {} other {} secs {:.6}",
        tally[0],
        tally[1],
        tally[2],
        start.elapsed().as_secs_f64()
    );
}

fn bench_stream(to: SocketAddr, millis: u64, sport: u16) {
    let mut bind = any_port(&to);
    bind.set_port(sport);
    let s = UdpSocket::bind(bind).expect("bind");
    s.connect(to).expect("connect");
    let start = std::time::Instant::now();
    let until = start + Duration::from_millis(millis);
    let mut tally = [0u64; 3];
    let mut i = 0u64;
    // The clock is read once per 256 datagrams.
    while i & 255 != 0 || std::time::Instant::now() < until {
        bench_tally(s.send(b"x"), &mut tally);
        i += 1;
    }
    bench_print("stream", tally, start);
}

fn bench_rotate(
    to: SocketAddr,
    millis: u64,
    nports: u32,
    ndst: u32,
    src: Option<std::net::Ipv4Addr>,
    nsrc: u32,
) {
    let SocketAddr::V4(to) = to else { usage() };
    let nports = u64::from(nports.clamp(1, 65536 - u32::from(to.port())));
    let ndst = u64::from(ndst.max(1));
    let socks: Vec<UdpSocket> = (0..nsrc.max(1))
        .map(|k| {
            let ip = src.map_or(std::net::Ipv4Addr::UNSPECIFIED, |s| {
                (u32::from(s) + k).into()
            });
            UdpSocket::bind((ip, 0)).expect("bind")
        })
        .collect();
    let base = u32::from(*to.ip());
    let start = std::time::Instant::now();
    let until = start + Duration::from_millis(millis);
    let mut tally = [0u64; 3];
    let mut i = 0u64;
    // The clock is read once per 256 datagrams.
    while i & 255 != 0 || std::time::Instant::now() < until {
        let port = to.port() + (i % nports) as u16;
        let host = base.wrapping_add(((i / nports) % ndst) as u32);
        let dst = std::net::SocketAddrV4::new(host.into(), port);
        let s = &socks[(i % socks.len() as u64) as usize];
        bench_tally(s.send_to(b"x", dst), &mut tally);
        i += 1;
    }
    bench_print("rotate", tally, start);
}

fn bench_sink(first: SocketAddr, n: usize) {
    use std::os::fd::AsRawFd;
    let socks: Vec<UdpSocket> = (0..n)
        .map(|k| {
            let mut a = any_port(&first);
            a.set_port(first.port() + k as u16);
            let s = UdpSocket::bind(a).expect("bind");
            let size: libc::c_int = 64 << 20;
            unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUFFORCE,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as u32,
                )
            };
            s.set_nonblocking(true).expect("nonblocking");
            s
        })
        .collect();
    let mut answered = vec![false; n];
    let mut pfds: Vec<libc::pollfd> = socks
        .iter()
        .map(|s| libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    ready("bench-sink");
    // recvmmsg: up to 256 datagrams per call, so the sink keeps up with a
    // sender that pays for the whole path.
    const BATCH: usize = 256;
    let mut bufs = vec![[0u8; 64]; BATCH];
    let mut iovs: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = iovs
        .iter_mut()
        .map(|iov| {
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    let mut buf = [0u8; 2048];
    loop {
        unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, -1) };
        for (k, s) in socks.iter().enumerate() {
            if pfds[k].revents == 0 {
                continue;
            }
            if !answered[k] {
                if let Ok((_, from)) = s.recv_from(&mut buf) {
                    answered[k] = true;
                    let _ = s.send_to(b"y", from);
                }
            }
            while unsafe {
                libc::recvmmsg(
                    s.as_raw_fd(),
                    msgs.as_mut_ptr(),
                    BATCH as u32,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            } > 0
            {}
        }
    }
}

fn bench_fill(to: SocketAddr, n: u64, spread: u32) {
    let mut sent = 0u64;
    let mut sport = 1024u32;
    while sent < n && sport <= 65535 {
        let mut bind = any_port(&to);
        bind.set_port(sport as u16);
        sport += 1;
        let Ok(s) = UdpSocket::bind(bind) else {
            continue;
        };
        for k in 0..spread {
            if sent >= n {
                break;
            }
            let mut dst = to;
            dst.set_port(to.port().wrapping_add(k as u16));
            let _ = s.send_to(b"x", dst);
            sent += 1;
            if sent & 255 == 0 {
                // Let the receiving softirq keep up, as udp-send does.
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    println!("filled {sent} sources {}", sport - 1024);
}

/// Waits on `fds` for what `events` asks, forever, taking whatever arrives.
fn wait_on(fds: &[libc::c_int], events: libc::c_short) -> ! {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events,
            revents: 0,
        })
        .collect();
    let mut buf = [0u8; 2048];
    loop {
        unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, -1) };
        for p in &mut pfds {
            if p.revents & libc::POLLIN != 0 {
                let _ = unsafe { libc::recv(p.fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            }
            if p.revents != 0 {
                // Answered, connected or failed: stop polling this one (a
                // negative fd is skipped, errors included), but keep it
                // open, as a client busy with its reply would.
                p.fd = -1;
            }
        }
    }
}

fn udp_ask(to: SocketAddr, n: usize) -> ! {
    use std::os::fd::AsRawFd;
    let mut socks = Vec::with_capacity(n);
    let mut tally = [0u64; 3];
    for i in 0..n {
        if i % 256 == 255 {
            // Paced as udp-send is, so no backlog overflows.
            std::thread::sleep(Duration::from_millis(1));
        }
        let s = UdpSocket::bind(any_port(&to)).expect("bind");
        bench_tally(s.send_to(b"ctwatch", to), &mut tally);
        socks.push(s);
    }
    ready(&format!(
        "asked {} eperm {} other {}",
        tally[0], tally[1], tally[2]
    ));
    let fds: Vec<libc::c_int> = socks.iter().map(|s| s.as_raw_fd()).collect();
    wait_on(&fds, libc::POLLIN)
}

fn tcp_ask(to: SocketAddr, n: usize) -> ! {
    let domain = if to.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let (sa, len) = sockaddr(&to);
    let fds: Vec<libc::c_int> = (0..n)
        .map(|_| {
            let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0) };
            assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
            unsafe { libc::connect(fd, (&sa as *const libc::sockaddr_storage).cast(), len) };
            fd
        })
        .collect();
    ready(&format!("connecting {}", fds.len()));
    wait_on(&fds, libc::POLLOUT)
}
