//! The exporter's HTTP endpoint: `/metrics` answers with the latest
//! exposition, `/` (the DaemonSet's liveness probe) points to it.
use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    body::Incoming,
    header::{HeaderValue, ACCEPT, ALLOW, CONTENT_TYPE},
    server::conn::http1,
    service::service_fn,
    Method, Request, Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore};

use super::prometheus::{Format, Metrics};

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

/// Scrapes served at once; more wait for a slot.
const MAX_CONNECTIONS: usize = 32;
/// A client that has not sent its request headers by then is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

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
fn handle(req: &Request<Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
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
    match metrics.encode(format) {
        Ok(text) => respond(StatusCode::OK, format.content_type(), text),
        Err(e) => respond(StatusCode::INTERNAL_SERVER_ERROR, PLAIN, format!("{e}\n")),
    }
}

/// Accepts scrapes until the task is aborted.
pub(crate) async fn serve_http(listener: TcpListener, metrics: Arc<Metrics>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors and the like: pass, and retry.
                log::warn!("accepting a scrape failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = service_fn(move |req: Request<Incoming>| {
                let r = handle(&req, &metrics);
                async move { Ok::<_, Infallible>(r) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                log::debug!("scrape from {peer}: {e}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
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
}
