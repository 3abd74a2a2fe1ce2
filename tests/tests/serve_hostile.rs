//! `ctwatch serve` under hostile clients: root, serial
//! (`--test-threads=1`). A thousand connections that never send a request,
//! and more that trickle one header byte a second, must not keep a scrape
//! out; each connection is bounded, and so is what ctwatch holds for them.
use std::{
    io::{Read, Write},
    net::TcpStream,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use ctwatch_tests::*;

const IDLE: usize = 1000;
const TRICKLING: usize = 50;
/// Generous: the test checks that a scrape is answered at all.
const SCRAPE_WITHIN: Duration = Duration::from_secs(20);
/// ctwatch's own bound (views/http.rs), plus its listener and netlink.
const MAX_SOCKETS: usize = 512 + 16;

/// The client side holds over a thousand sockets, and ctwatch (which
/// inherits the limit) must not run out before its own bound does.
fn raise_open_files(want: u64) {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write one rlimit on this stack.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut l), 0);
        if l.rlim_cur < want {
            l.rlim_cur = want;
            l.rlim_max = l.rlim_max.max(want);
            assert_eq!(
                libc::setrlimit(libc::RLIMIT_NOFILE, &l),
                0,
                "raise RLIMIT_NOFILE to {want}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Sockets ctwatch holds open, from its fd table.
fn sockets_held_by(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("ctwatch's fd table")
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
        })
        .count()
}

/// Connections that send a scrape request one byte a second, from their
/// own thread, until dropped.
struct Tricklers {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Tricklers {
    fn start(addr: &str, n: usize) -> Self {
        let mut conns: Vec<TcpStream> = (0..n)
            .map(|_| TcpStream::connect(addr).expect("connect a trickler"))
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let request = b"GET /metrics HTTP/1.1\r\nHost: ctwatch\r\nX-Slow: ";
            for i in 0.. {
                if stopped.load(Ordering::Relaxed) {
                    return;
                }
                // Past the request line, the header never ends.
                let byte = request.get(i).copied().unwrap_or(b'z');
                for c in &mut conns {
                    // The server closes them in the end: that is the point.
                    let _ = c.write_all(&[byte]);
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        });
        Tricklers {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Tricklers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn a_scrape_gets_through_a_thousand_idle_and_trickling_connections() {
    require_env!();
    raise_open_files(8192);
    let ns = Netns::new("hostile");
    ns.enable_conntrack();
    let addr = free_loopback_addr();
    let w = start_serve(&ns, &addr, &[]);

    let idle: Vec<TcpStream> = (0..IDLE)
        .map(|i| TcpStream::connect(&addr).unwrap_or_else(|e| panic!("idle connection {i}: {e}")))
        .collect();
    let tricklers = Tricklers::start(&addr, TRICKLING);

    let t0 = Instant::now();
    let answer = http_exchange(&addr, "GET", "/metrics", SCRAPE_WITHIN);
    eprintln!(
        "scrape answered in {:?} past {IDLE} idle and {TRICKLING} trickling connections",
        t0.elapsed()
    );
    assert_eq!(answer.status, 200, "{answer:?}");
    let text = answer.body;
    assert!(
        text.contains(&format!("ctwatch_info{{mode=\"{}\"", mode())),
        "{text}"
    );
    let row = format!("ctwatch_nf_conntrack_entries{{netns=\"{}\"", ns.inum());
    assert!(text.contains(&row), "no {row} series:\n{text}");

    let answer = http_exchange(&addr, "POST", "/metrics", SCRAPE_WITHIN);
    assert_eq!(answer.status, 405, "{answer:?}");
    assert!(
        answer
            .head
            .to_ascii_lowercase()
            .contains("allow: get, head"),
        "{answer:?}"
    );
    let answer = http_exchange(&addr, "GET", "/nope", SCRAPE_WITHIN);
    assert_eq!(answer.status, 404, "{answer:?}");
    let answer = http_exchange(&addr, "HEAD", "/metrics", SCRAPE_WITHIN);
    assert_eq!(answer.status, 200, "{answer:?}");
    let answer = http_exchange(&addr, "GET", "/", SCRAPE_WITHIN);
    assert_eq!(answer.status, 200, "the liveness probe's path: {answer:?}");

    // Over a thousand clients, and ctwatch holds at most its bound.
    let held = sockets_held_by(w.pid);
    assert!(
        held <= MAX_SOCKETS,
        "ctwatch holds {held} sockets for {} clients",
        IDLE + TRICKLING
    );

    // Nor does an idle client keep its connection: the newest idle ones
    // (the oldest were closed for newer ones) end by the header timeout.
    let mut last = idle.into_iter().last().expect("an idle connection");
    last.set_read_timeout(Some(Duration::from_secs(15)))
        .expect("read timeout");
    let mut buf = [0u8; 64];
    match last.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("an idle connection is still open after 15 s: {other:?}"),
    }

    drop(tricklers);
    let (code, _) = w.stop_with(libc::SIGTERM);
    assert_eq!(code, 0, "serve stops cleanly after the flood");
}
