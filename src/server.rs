//! Listeners and connections: HTTP/1.1 and HTTP/2 (h2c) on the traffic port, the admin port beside
//! it, and graceful shutdown (stop accepting, let in-flight requests finish up to `SHUTDOWN_TIMEOUT`).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};

use crate::admin;
use crate::proxy::Proxy;

/// How long start-up waits for Redis before serving degraded (L1 + origin).
const L2_STARTUP_PATIENCE: Duration = Duration::from_secs(2);

/// Serves traffic and admin until `shutdown` resolves, then drains in-flight requests.
pub async fn serve(
    proxy: Proxy,
    listener: TcpListener,
    admin_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Slowloris guard: a client has this long to send its request headers.
        .header_read_timeout(Duration::from_secs(30));
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    // Connections wait in the listen backlog meanwhile; a Redis that is down costs start-up this long.
    proxy.await_l2_startup(L2_STARTUP_PATIENCE).await;
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
                let service = service_fn(move |request: Request<Incoming>| proxy.answer(request, peer));
                let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                let connection = graceful.watch(connection.into_owned());
                tokio::spawn(async move {
                    if let Err(error) = connection.await {
                        tracing::debug!(%peer, error = %error, "connection ended with an error");
                    }
                });
            }
            accepted = admin_listener.accept() => {
                let Some((stream, _peer)) = accepted_or_pause(accepted).await else { continue };
                let proxy = proxy.clone();
                let service = service_fn(move |request: Request<Incoming>| {
                    let proxy = proxy.clone();
                    async move { Ok::<_, Infallible>(admin::handle(proxy, request).await) }
                });
                let connection = builder.serve_connection(TokioIo::new(stream), service);
                let connection = graceful.watch(connection.into_owned());
                tokio::spawn(async move {
                    let _ = connection.await;
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

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
