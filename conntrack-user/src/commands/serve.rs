//! `ctwatch serve`: a Prometheus exporter of fill, drops and the top
//! culprits and victims, refreshed every `--interval` seconds.
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

use crate::{
    cli::{ServeArgs, Settings},
    error::Error,
    metrics::{Format, Metrics, Refresher, ServeError},
    watch::Watch,
};

/// Bounds of `--interval`: below, a refresh (netns walk, ctnetlink dumps)
/// could not finish before the next; above, tokio's timer would overflow.
const MIN_INTERVAL: f64 = 0.1;
const MAX_INTERVAL: f64 = 86_400.0;
/// Scrapes served at once; more wait for a slot.
const MAX_CONNECTIONS: usize = 32;
/// Ring-buffer records per second per CPU beyond the first of each key.
const STREAM_BUDGET: u32 = 64;
/// A client that has not sent its request headers by then is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

fn interval(secs: f64) -> Result<Duration, ServeError> {
    if !(MIN_INTERVAL..=MAX_INTERVAL).contains(&secs) {
        return Err(ServeError::Interval {
            min: MIN_INTERVAL,
            max: MAX_INTERVAL,
            got: secs,
        });
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Binds before anything is loaded, so a taken port fails fast and leaves
/// the kernel untouched.
async fn bind(addr: SocketAddr) -> Result<TcpListener, ServeError> {
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
async fn serve_http(listener: TcpListener, metrics: Arc<Metrics>) {
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

pub async fn run(settings: &Settings, args: &ServeArgs) -> Result<(), Error> {
    let period = interval(args.interval)?;
    let stop = super::stop_requested()?;
    tokio::pin!(stop);
    let listener = bind(args.listen).await?;
    let addr = listener.local_addr().unwrap_or(args.listen);
    // Records only name owners while they live (the first of each key is
    // always streamed); the counts come from the in-kernel maps, so a
    // flood costs the exporter nothing per packet.
    let mut w = Watch::start(settings, false, STREAM_BUDGET)?;
    let metrics = Arc::new(Metrics::new(w.loaded.mode, &w.loaded.release));
    let mut refresher = Refresher::start(&mut w, settings.top)?;
    // Series exist from the first scrape on.
    metrics.update(&refresher.sample(&mut w)?);
    let server = tokio::spawn(serve_http(listener, metrics.clone()));
    eprintln!(
        "{}; serving http://{addr}/metrics, refreshed every {}s (Ctrl-C to stop)",
        w.banner(),
        period.as_secs_f64()
    );

    let mut tick = tokio::time::interval(period);
    // A slow refresh (big dumps) delays the next one rather than bunching up.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut batch = Vec::new();
    let result = loop {
        tokio::select! {
            _ = &mut stop => break Ok(()),
            _ = tick.tick() => {
                w.source.drain_now(&mut batch);
                for ev in batch.drain(..) {
                    w.observe(&ev);
                }
                match refresher.sample(&mut w) {
                    Ok(s) => metrics.update(&s),
                    Err(e) => break Err(e),
                }
            }
            r = w.source.next_batch(&mut batch) => {
                if let Err(e) = r {
                    break Err(e.into());
                }
                for ev in batch.drain(..) {
                    // Name owners now, while their processes still exist.
                    w.observe(&ev);
                }
            }
        }
    };
    server.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_bounds() {
        assert_eq!(interval(1.0).unwrap(), Duration::from_secs(1));
        assert!(interval(1e-12).is_err(), "a zero period would spin");
        assert!(interval(1e30).is_err(), "the timer would overflow");
    }

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
