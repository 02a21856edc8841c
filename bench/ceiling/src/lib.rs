//! Shared by the two helper binaries: the benchmark bodies and a server loop shaped like Strata's.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// A deterministic body of `len` bytes (same bytes from the origin and from the ceiling).
pub fn body(len: usize) -> Bytes {
    (0..len)
        .map(|i| b'a' + (i % 26) as u8)
        .collect::<Vec<u8>>()
        .into()
}

/// The listen address: first argument.
pub fn listen_addr() -> SocketAddr {
    let arg = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18000".into());
    arg.parse()
        .unwrap_or_else(|_| panic!("bad listen address {arg}"))
}

/// Which tokio scheduler a helper server runs.
#[derive(Clone, Copy)]
pub enum Scheduler {
    /// As Strata chooses with `WORKER_THREADS` unset: the current-thread scheduler when the process
    /// may use one CPU (pinned with `taskset`), else one worker per CPU. The ceilings use this, so
    /// that they stay the best this stack does on the core Strata gets.
    LikeStrata,
    /// The multi-threaded scheduler whatever the CPUs: the benchmark origin keeps the shape it had
    /// in earlier runs, so that "origin direct" means the same from run to run.
    MultiThread,
}

impl Scheduler {
    fn runtime(self) -> tokio::runtime::Runtime {
        let one_cpu = std::thread::available_parallelism().map_or(true, |n| n.get() == 1);
        let mut builder = match self {
            Scheduler::LikeStrata if one_cpu => tokio::runtime::Builder::new_current_thread(),
            _ => tokio::runtime::Builder::new_multi_thread(),
        };
        builder.enable_all().build().expect("runtime")
    }
}

/// Accept loop with the same hyper-util auto builder (HTTP/1.1 + h2c) and timers Strata uses.
pub fn serve<F, Fut, B>(addr: SocketAddr, scheduler: Scheduler, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    scheduler.runtime().block_on(async move {
        let listener = TcpListener::bind(addr).await.expect("bind");
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(30));
        builder.http2().timer(TokioTimer::new());
        loop {
            let Ok((stream, _peer)) = listener.accept().await else {
                continue;
            };
            // As Strata's accept loop does: responses leave at once, not after a delayed ACK.
            let _ = stream.set_nodelay(true);
            let handler = handler.clone();
            let service = service_fn(move |request: Request<Incoming>| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler(request).await) }
            });
            let connection = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .into_owned();
            tokio::spawn(async move {
                let _ = connection.await;
            });
        }
    });
}

pub fn response(status: u16, cache_control: &str, body: Bytes) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/octet-stream")
        .header("cache-control", cache_control)
        .body(Full::new(body))
        .expect("response")
}
