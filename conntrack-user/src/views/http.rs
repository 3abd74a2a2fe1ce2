//! The exporter's HTTP endpoint: `/metrics` answers with the latest
//! exposition, `/` (the DaemonSet's liveness probe) points to it.
//!
//! No client can keep a scrape out. Every connection is accepted: there is
//! no pool of slots that idle or slow clients could fill. Each one is
//! bounded instead: its request headers must be complete within
//! [`HEADER_TIMEOUT`] of it becoming ready for a request, which also ends
//! idle keep-alive connections; they may not exceed [`MAX_HEADER_BYTES`];
//! and it lives at most [`LIFETIME`]. At most [`MAX_CONNECTIONS`] are open
//! (fewer where the descriptor limit is low): a new one closes the oldest
//! that is not being answered, so a scrape always gets in and memory stays
//! bounded. Answers share one encoding of the exposition ([`Exposition`]),
//! so clients that ask and never read hold one copy between them.
use std::{
    collections::VecDeque,
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, PoisonError,
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    body::{Body, Frame, Incoming, SizeHint},
    header::{HeaderValue, ACCEPT, ALLOW, CONTENT_TYPE},
    server::conn::http1,
    service::service_fn,
    Method, Request, Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::{TcpListener, TcpStream},
    task::{AbortHandle, JoinSet},
    time::Instant,
};

use super::prometheus::{EncodeError, Format, Metrics};

#[derive(Debug, thiserror::Error)]
pub(crate) enum ServeError {
    #[error("cannot listen on {addr}: the address is already in use (another exporter or ctwatch serve?); pick another with --listen")]
    AddrInUse { addr: SocketAddr },
    #[error(
        "cannot listen on {addr}: no local interface has that address; pick another with --listen"
    )]
    AddrNotAvailable { addr: SocketAddr },
    #[error("cannot listen on {addr}: permission denied (ports below 1024 need CAP_NET_BIND_SERVICE); pick another with --listen")]
    PermissionDenied { addr: SocketAddr },
    #[error("cannot listen on {addr}: {reason}; pick another with --listen")]
    Bind { addr: SocketAddr, reason: String },
}

/// A request's headers must be complete this long after the connection is
/// ready for it (accepted, or done with the previous answer): Prometheus
/// and probes send theirs at once, and a keep-alive connection idle for
/// longer is closed (Prometheus opens a new one for its next scrape).
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Request line and headers; longer ones get 431. A scrape sends ~300 bytes.
const MAX_HEADER_BYTES: usize = 8 << 10;
/// hyper's read and write buffers per connection (8 KiB is its minimum).
const MAX_BUFFER_BYTES: usize = 16 << 10;
/// Past this a connection finishes the answer in flight and closes, so
/// keep-alive cannot hold one open forever.
const LIFETIME: Duration = Duration::from_secs(60);
/// How long that last answer may take before the connection is dropped.
const GRACE: Duration = Duration::from_secs(10);
/// Open connections; a new one beyond closes the oldest. Each costs at
/// most a few tens of KiB, so this bounds the endpoint to ~16 MiB.
const MAX_CONNECTIONS: usize = 512;
/// An encoding of the exposition answers every scrape that comes this soon
/// after it; samples change once per `--interval` anyway.
const REUSE_FOR: Duration = Duration::from_millis(500);

/// The exposition as sent: encoded at most once per [`REUSE_FOR`] and
/// format, under a lock, so a burst of scrapes costs one encoding and the
/// answers in flight share its bytes.
struct Exposition {
    metrics: Arc<Metrics>,
    latest: Mutex<Vec<(Format, Instant, Bytes)>>,
}

impl Exposition {
    fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            latest: Mutex::new(Vec::new()),
        }
    }

    fn get(&self, format: Format) -> Result<Bytes, EncodeError> {
        let mut latest = self.latest.lock().unwrap_or_else(PoisonError::into_inner);
        let fresh = latest
            .iter()
            .find(|(f, at, _)| *f == format && at.elapsed() < REUSE_FOR);
        if let Some((_, _, bytes)) = fresh {
            return Ok(bytes.clone());
        }
        let bytes = Bytes::from(self.metrics.encode(format)?);
        latest.retain(|(f, _, _)| *f != format);
        latest.push((format, Instant::now(), bytes.clone()));
        Ok(bytes)
    }
}

/// Binds before anything is loaded, so a taken port fails fast and leaves
/// the kernel untouched.
pub(crate) async fn bind(addr: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::AddrInUse => ServeError::AddrInUse { addr },
        std::io::ErrorKind::AddrNotAvailable => ServeError::AddrNotAvailable { addr },
        std::io::ErrorKind::PermissionDenied => ServeError::PermissionDenied { addr },
        _ => ServeError::Bind {
            addr,
            reason: e.to_string(),
        },
    })
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

const PLAIN: &str = "text/plain; charset=utf-8";

/// Routes one request: `/metrics` is the exposition, `/` points to it,
/// everything else is 404.
fn handle(req: &Request<Incoming>, exposition: &Exposition) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if path != "/metrics" && path != "/" {
        return respond(
            StatusCode::NOT_FOUND,
            PLAIN,
            "not found; metrics are at /metrics\n",
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = respond(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "only GET and HEAD\n");
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    if path == "/" {
        return respond(
            StatusCode::OK,
            PLAIN,
            "ctwatch exporter: metrics are at /metrics\n",
        );
    }
    let format = Format::from_accept(req.headers().get(ACCEPT).and_then(|v| v.to_str().ok()));
    match exposition.get(format) {
        Ok(text) => respond(StatusCode::OK, format.content_type(), text),
        Err(e) => respond(StatusCode::INTERNAL_SERVER_ERROR, PLAIN, format!("{e}\n")),
    }
}

/// Accepts scrapes until the task is aborted.
pub(crate) async fn serve_http(listener: TcpListener, metrics: Arc<Metrics>) {
    accept(listener, metrics, connection_cap()).await
}

async fn accept(listener: TcpListener, metrics: Arc<Metrics>, cap: usize) {
    let exposition = Arc::new(Exposition::new(metrics));
    let mut open = Connections::new(cap);
    loop {
        tokio::select! {
            Some(ended) = open.tasks.join_next_with_id() => {
                open.forget(match ended {
                    Ok((id, ())) => id,
                    Err(e) => e.id(),
                });
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => open.serve(stream, peer, exposition.clone()),
                Err(e) => {
                    log::debug!("accepting a scrape failed: {e}");
                    if out_of_descriptors(&e) {
                        open.free_a_descriptor().await;
                    }
                }
            },
        }
    }
}

/// At most [`MAX_CONNECTIONS`], and half the descriptors ctwatch may open:
/// the other half stays for its own reads of /proc, namespaces and netlink,
/// which a flood of clients must not starve.
fn connection_cap() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit, which lives on this stack.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return MAX_CONNECTIONS;
    }
    usize::try_from(limit.rlim_cur / 2)
        .unwrap_or(MAX_CONNECTIONS)
        .clamp(16, MAX_CONNECTIONS)
}

fn out_of_descriptors(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// The open connections, oldest first, each with the number of answers it
/// is writing right now.
struct Connections {
    tasks: JoinSet<()>,
    live: VecDeque<(AbortHandle, Arc<AtomicUsize>)>,
    cap: usize,
}

impl Connections {
    fn new(cap: usize) -> Self {
        Self {
            tasks: JoinSet::new(),
            live: VecDeque::new(),
            cap,
        }
    }

    fn serve(&mut self, stream: TcpStream, peer: SocketAddr, exposition: Arc<Exposition>) {
        if self.live.len() >= self.cap {
            self.evict();
        }
        let answering = Arc::new(AtomicUsize::new(0));
        let task = self
            .tasks
            .spawn(connection(stream, peer, exposition, answering.clone()));
        self.live.push_back((task, answering));
    }

    /// Closes the oldest connection that is not being answered (the oldest
    /// of all if every one is); false if none is open.
    fn evict(&mut self) -> bool {
        let idle = self
            .live
            .iter()
            .position(|(_, answering)| answering.load(Ordering::Relaxed) == 0);
        match self.live.remove(idle.unwrap_or(0)) {
            Some((task, _)) => {
                log::debug!("closing the oldest idle scrape connection for a new one");
                task.abort();
                true
            }
            None => false,
        }
    }

    fn forget(&mut self, id: tokio::task::Id) {
        self.live.retain(|(task, _)| task.id() != id);
    }

    /// Out of file descriptors: closes the oldest idle connection and waits
    /// until a connection has ended, its descriptor with it. With none to
    /// close, the descriptors are held elsewhere: back off, then retry.
    async fn free_a_descriptor(&mut self) {
        if !self.evict() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            return;
        }
        if let Some(ended) = self.tasks.join_next_with_id().await {
            self.forget(match ended {
                Ok((id, ())) => id,
                Err(e) => e.id(),
            });
        }
    }
}

/// Serves one connection within the bounds the module describes.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    exposition: Arc<Exposition>,
    answering: Arc<AtomicUsize>,
) {
    let svc = service_fn(move |req: Request<Incoming>| {
        let r = handle(&req, &exposition).map(|body| Answer {
            body,
            _answering: Answering::start(&answering),
        });
        async move { Ok::<_, Infallible>(r) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_header_size(MAX_HEADER_BYTES)
        .max_buf_size(MAX_BUFFER_BYTES)
        .serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    let ended = match tokio::time::timeout(LIFETIME, conn.as_mut()).await {
        Ok(ended) => ended,
        Err(_) => {
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(GRACE, conn).await {
                Ok(ended) => ended,
                Err(_) => return,
            }
        }
    };
    if let Err(e) = ended {
        log::debug!("scrape from {peer}: {e}");
    }
}

/// Counts one answer being written on its connection, until hyper is done
/// with its body: eviction spares connections in that state.
struct Answering(Arc<AtomicUsize>);

impl Answering {
    fn start(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Answering(count.clone())
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its connection marked as answering.
struct Answer {
    body: Full<Bytes>,
    _answering: Answering,
}

impl Body for Answer {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn a_taken_port_is_one_line_naming_the_address() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = held.local_addr().unwrap();
        let e = bind(addr).await.unwrap_err().to_string();
        assert!(e.contains(&addr.to_string()), "{e}");
        assert!(e.contains("--listen"), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }

    async fn start(cap: usize) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::new(None, "6.18.0"));
        tokio::spawn(accept(listener, metrics, cap));
        addr
    }

    /// Sends `request` as is and reads until the server closes.
    async fn exchange(addr: SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        String::from_utf8_lossy(&out).into_owned()
    }

    fn request(method: &str, path: &str) -> String {
        format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    }

    fn status(response: &str) -> &str {
        response.split(' ').nth(1).unwrap_or_default()
    }

    /// Reads until the server closes; an error (a reset) counts as closed.
    async fn closed(s: &mut TcpStream) {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = s.read(&mut buf).await {
            let _ = n;
        }
    }

    #[tokio::test]
    async fn only_get_and_head_on_metrics_and_root() {
        let addr = start(MAX_CONNECTIONS).await;
        let r = exchange(addr, &request("GET", "/metrics")).await;
        assert_eq!(status(&r), "200", "{r}");
        assert!(r.contains("ctwatch_info"), "{r}");
        let r = exchange(addr, &request("HEAD", "/metrics")).await;
        assert_eq!(status(&r), "200", "{r}");
        assert!(r.ends_with("\r\n\r\n"), "HEAD has no body: {r}");
        let r = exchange(addr, &request("GET", "/")).await;
        assert_eq!(status(&r), "200", "{r}");
        assert!(r.contains("/metrics"), "{r}");
        for (method, path) in [("POST", "/metrics"), ("PUT", "/"), ("DELETE", "/metrics")] {
            let r = exchange(addr, &request(method, path)).await;
            assert_eq!(status(&r), "405", "{method} {path}: {r}");
            assert!(r.to_ascii_lowercase().contains("allow: get, head"), "{r}");
        }
        for path in ["/nope", "/metrics/", "/metricsx"] {
            let r = exchange(addr, &request("GET", path)).await;
            assert_eq!(status(&r), "404", "{path}: {r}");
        }
    }

    #[tokio::test]
    async fn headers_over_the_cap_get_431() {
        let addr = start(MAX_CONNECTIONS).await;
        let big = "a".repeat(MAX_HEADER_BYTES);
        let r = exchange(
            addr,
            &format!("GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n"),
        )
        .await;
        assert_eq!(status(&r), "431", "{r}");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_and_trickling_clients_are_cut_after_the_header_timeout() {
        let addr = start(MAX_CONNECTIONS).await;
        let t0 = tokio::time::Instant::now();
        let mut idle = TcpStream::connect(addr).await.unwrap();
        let mut trickle = TcpStream::connect(addr).await.unwrap();
        let trickling = async {
            for b in b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" {
                if trickle.write_all(&[*b]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            closed(&mut trickle).await;
            t0.elapsed()
        };
        let idling = async {
            closed(&mut idle).await;
            t0.elapsed()
        };
        let (trickled, idled) = tokio::join!(trickling, idling);
        for took in [trickled, idled] {
            assert!(took >= HEADER_TIMEOUT, "{took:?}");
            assert!(took < HEADER_TIMEOUT + Duration::from_secs(2), "{took:?}");
        }

        // Keep-alive: idle after an answer, the same bound applies.
        let mut kept = TcpStream::connect(addr).await.unwrap();
        kept.write_all(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 1024];
        let n = kept.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        let t1 = tokio::time::Instant::now();
        closed(&mut kept).await;
        let took = t1.elapsed();
        assert!(took >= HEADER_TIMEOUT && took < HEADER_TIMEOUT + Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_keep_alive_connection_ends_after_its_lifetime() {
        let addr = start(MAX_CONNECTIONS).await;
        let t0 = tokio::time::Instant::now();
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 1024];
        let mut answers = 0;
        loop {
            if s.write_all(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .is_err()
            {
                break;
            }
            match s.read(&mut buf).await {
                Ok(n) if n > 0 => answers += 1,
                _ => break,
            }
            // Within the header timeout, so only the lifetime can end it.
            tokio::time::sleep(HEADER_TIMEOUT / 2).await;
        }
        let took = t0.elapsed();
        assert!(answers > 10, "{answers}");
        assert!(
            took >= LIFETIME && took < LIFETIME + HEADER_TIMEOUT,
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn a_new_connection_closes_the_oldest_idle_one() {
        const CAP: usize = 4;
        let addr = start(CAP).await;
        let mut idle = Vec::new();
        for _ in 0..3 * CAP {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        let r = exchange(addr, &request("GET", "/metrics")).await;
        assert_eq!(status(&r), "200", "{r}");
        // The oldest were closed at once, long before the header timeout.
        let evicted = idle.len() + 1 - CAP;
        for s in &mut idle[..evicted] {
            tokio::time::timeout(HEADER_TIMEOUT / 2, closed(s))
                .await
                .expect("an evicted connection is closed at once");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn scrapes_share_one_encoding_until_it_is_stale() {
        let e = Exposition::new(Arc::new(Metrics::new(None, "6.18.0")));
        let first = e.get(Format::Prometheus).unwrap();
        let again = e.get(Format::Prometheus).unwrap();
        assert_eq!(first.as_ptr(), again.as_ptr(), "the same bytes, not a copy");
        let open = e.get(Format::OpenMetrics).unwrap();
        assert_ne!(open, first, "each format has its own");
        tokio::time::advance(REUSE_FOR).await;
        let later = e.get(Format::Prometheus).unwrap();
        assert_ne!(later.as_ptr(), first.as_ptr(), "encoded anew");
    }

    #[tokio::test]
    async fn eviction_spares_connections_being_answered() {
        let mut open = Connections::new(2);
        for answering in [1, 0, 0] {
            let task = open.tasks.spawn(std::future::pending());
            open.live
                .push_back((task, Arc::new(AtomicUsize::new(answering))));
        }
        let ids = |open: &Connections| -> Vec<tokio::task::Id> {
            open.live.iter().map(|(t, _)| t.id()).collect()
        };
        let before = ids(&open);
        assert!(open.evict());
        assert_eq!(ids(&open), [before[0], before[2]]);
        assert!(open.evict());
        assert_eq!(ids(&open), [before[0]]);
        // Only busy ones left: the oldest goes all the same.
        assert!(open.evict());
        assert!(!open.evict());
    }
}
