//! Listeners and connections: HTTP/1.1 and HTTP/2 (h2c) on the traffic port, the admin port beside
//! it, and graceful shutdown (stop accepting, let in-flight requests finish up to `SHUTDOWN_TIMEOUT`).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use crate::admin;
use crate::proxy::Proxy;

/// How often an HTTP/2 client connection is PINGed, and how long the answer may take before the
/// connection is closed as dead.
const H2_PING_INTERVAL: Duration = Duration::from_secs(20);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// The largest request head (request line and header fields) a client may send, on both
/// protocols; past it, 431. nginx allows 32 KiB by default. hyper's own limits differed by
/// protocol: about 400 KiB on HTTP/1.1 (that much memory per connection while a head trickles
/// in), 16 KiB on HTTP/2 (refusing heads an HTTP/1.1 client could send).
const MAX_REQUEST_HEAD: usize = 64 * 1024;

/// How long start-up waits for Redis before serving degraded (L1 + origin).
const L2_STARTUP_PATIENCE: Duration = Duration::from_secs(2);

/// Serves traffic and admin until `shutdown` resolves, then drains in-flight requests.
pub async fn serve(
    proxy: Proxy,
    listener: TcpListener,
    admin_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let header_timeout = proxy.config().client_header_timeout;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Slowloris guard: a client has this long to send each request's header; it also closes
        // an idle keep-alive connection (the timer runs from the previous response).
        .header_read_timeout(header_timeout)
        // Also the read buffer's limit: a body is read in chunks of at most this much.
        .max_buf_size(MAX_REQUEST_HEAD);
    builder
        .http2()
        .timer(TokioTimer::new())
        // A peer that vanished (a dropped NAT entry, a powered-off device) answers no PING: its
        // connection is closed instead of holding a socket for the process's life.
        .keep_alive_interval(Some(H2_PING_INTERVAL))
        .keep_alive_timeout(H2_PING_TIMEOUT)
        .max_header_list_size(MAX_REQUEST_HEAD as u32);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    // Connections wait in the listen backlog meanwhile; a Redis that is down costs start-up this
    // long, and a stop asked for meanwhile is a stop.
    tokio::select! {
        () = proxy.await_l2_startup(L2_STARTUP_PATIENCE) => {}
        () = &mut shutdown => {
            tracing::info!("stopped while starting up");
            return Ok(());
        }
    }
    tracing::info!(
        listen = %listener.local_addr()?,
        admin = %admin_listener.local_addr()?,
        origin = %proxy.config().origin,
        "strata serving"
    );
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Some((stream, peer)) = accepted_or_pause(accepted).await else { continue };
                let proxy = proxy.clone();
                let first_request = Arc::new(Notify::new());
                let requested = first_request.clone();
                let service = service_fn(move |request: Request<Incoming>| {
                    requested.notify_one();
                    proxy.answer(request, peer)
                });
                let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                let connection = graceful.watch(connection.into_owned());
                tokio::spawn(async move {
                    match until_first_request(connection, &first_request, header_timeout).await {
                        Some(Err(error)) => {
                            tracing::debug!(%peer, error = %error, "connection ended with an error");
                        }
                        Some(Ok(())) => {}
                        None => tracing::debug!(%peer, "closed: no request within CLIENT_HEADER_TIMEOUT"),
                    }
                });
            }
            accepted = admin_listener.accept() => {
                let Some((stream, _peer)) = accepted_or_pause(accepted).await else { continue };
                let proxy = proxy.clone();
                let first_request = Arc::new(Notify::new());
                let requested = first_request.clone();
                let service = service_fn(move |request: Request<Incoming>| {
                    requested.notify_one();
                    let proxy = proxy.clone();
                    async move { Ok::<_, Infallible>(admin::handle(proxy, request).await) }
                });
                let connection = builder.serve_connection(TokioIo::new(stream), service);
                let connection = graceful.watch(connection.into_owned());
                tokio::spawn(async move {
                    let _ = until_first_request(connection, &first_request, header_timeout).await;
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    drop(admin_listener);
    let grace = proxy.config().shutdown_timeout;
    tracing::info!(
        ?grace,
        "shutting down: no new connections, draining in-flight requests"
    );
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections drained"),
        () = tokio::time::sleep(grace) => tracing::warn!("SHUTDOWN_TIMEOUT passed; closing remaining connections"),
    }
    // Queued L2 writes are worth a moment: the next instance starts warm from them.
    let _ = tokio::time::timeout(L2_STARTUP_PATIENCE, proxy.flush_l2()).await;
    Ok(())
}

/// Drives `connection`, dropping it (which closes the socket) if no request has arrived within
/// `limit` of accepting it; `None` then.
///
/// hyper's header timeout starts only once the protocol is known: a connection that sends nothing,
/// stops inside the HTTP/2 preface, or opens HTTP/2 and never sends a request would otherwise hold
/// a socket forever, and a few thousand of them exhaust the file descriptors.
async fn until_first_request<C: Future>(
    connection: C,
    first_request: &Notify,
    limit: Duration,
) -> Option<C::Output> {
    let deadline = async {
        if tokio::time::timeout(limit, first_request.notified())
            .await
            .is_ok()
        {
            // A request came: from here on hyper's own timers govern the connection.
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        output = connection => Some(output),
        () = deadline => None,
    }
}

/// An accept error (out of file descriptors, a connection reset before accept) must not end the
/// server: log it and pause briefly so a persistent condition does not spin the loop.
async fn accepted_or_pause(
    accepted: std::io::Result<(TcpStream, SocketAddr)>,
) -> Option<(TcpStream, SocketAddr)> {
    match accepted {
        Ok((stream, peer)) => {
            let _ = stream.set_nodelay(true);
            Some((stream, peer))
        }
        Err(error) => {
            tracing::warn!(%error, "accept failed");
            tokio::time::sleep(Duration::from_millis(50)).await;
            None
        }
    }
}

/// Counts the SIGTERMs and SIGINTs (Ctrl-C) received from this call on: the first asks for a
/// graceful stop, a second for an immediate one.
///
/// The handlers are installed by the call itself, not when something first waits: from then on
/// these signals stop Strata instead of killing it (start-up waits for Redis before it polls
/// anything). One listener per signal for the process's life, so a second signal that follows the
/// first closely is counted too. Must be called inside the runtime.
pub fn stop_signals() -> tokio::sync::watch::Receiver<u64> {
    let (count, received) = tokio::sync::watch::channel(0u64);
    let signals = installed_signals();
    tokio::spawn(async move {
        let mut signals = signals;
        loop {
            next_signal(&mut signals).await;
            count.send_modify(|n| *n += 1);
        }
    });
    received
}

/// Resolves once `signals` has counted `n` signals.
pub async fn signalled(mut signals: tokio::sync::watch::Receiver<u64>, n: u64) {
    if signals.wait_for(|count| *count >= n).await.is_err() {
        // The counting task is gone (the runtime is shutting down): no signal will come.
        std::future::pending::<()>().await;
    }
}

#[cfg(unix)]
type Signals = [Option<tokio::signal::unix::Signal>; 2];

#[cfg(unix)]
fn installed_signals() -> Signals {
    use tokio::signal::unix::{signal, SignalKind};
    let install = |kind: SignalKind, name: &str| match signal(kind) {
        Ok(signal) => Some(signal),
        Err(error) => {
            tracing::error!(%error, "cannot listen for {name}");
            None
        }
    };
    [
        install(SignalKind::terminate(), "SIGTERM"),
        install(SignalKind::interrupt(), "SIGINT"),
    ]
}

#[cfg(unix)]
async fn next_signal(signals: &mut Signals) {
    let [terminate, interrupt] = signals;
    tokio::select! {
        () = next_of(terminate) => {},
        () = next_of(interrupt) => {},
    }
}

/// The next delivery of one signal; never, if it could not be listened for.
#[cfg(unix)]
async fn next_of(signal: &mut Option<tokio::signal::unix::Signal>) {
    let received = match signal {
        Some(signal) => signal.recv().await,
        None => None,
    };
    if received.is_none() {
        std::future::pending::<()>().await;
    }
}

#[cfg(not(unix))]
type Signals = ();

#[cfg(not(unix))]
fn installed_signals() -> Signals {}

#[cfg(not(unix))]
async fn next_signal(_: &mut Signals) {
    if let Err(error) = tokio::signal::ctrl_c().await {
        tracing::error!(%error, "cannot listen for Ctrl-C");
        std::future::pending::<()>().await;
    }
}
