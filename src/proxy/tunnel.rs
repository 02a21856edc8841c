//! Upgraded connections (WebSocket): the client's and the origin's connections spliced together,
//! closed once nothing has moved either way for `TUNNEL_IDLE_TIMEOUT`.
//!
//! Without a limit, a tunnel whose peer vanished without a FIN (a phone that lost its network, a
//! load balancer that dropped the flow) holds two sockets until the process ends; nginx
//! (`proxy_read_timeout`) and Varnish (`pipe_timeout`) bound the same thing.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// How a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Both directions were closed by their senders; the bytes carried each way.
    Closed { to_origin: u64, to_client: u64 },
    /// Nothing arrived from either side for the idle timeout; both connections were dropped.
    Idle,
}

/// Copies bytes both ways between `client` and `origin` until both directions are closed, one side
/// fails, or neither side sends anything for `idle`. Dropping the connections on return closes
/// them.
pub async fn splice<C, O>(client: C, origin: O, idle: Duration) -> io::Result<Ended>
where
    C: AsyncRead + AsyncWrite + Unpin,
    O: AsyncRead + AsyncWrite + Unpin,
{
    let opened = Instant::now();
    // When bytes last arrived, as nanoseconds since `opened`: an atomic because both wrapped
    // connections note into it while the idle check reads it.
    let last_arrival = AtomicU64::new(0);
    let mut client = Watched {
        io: client,
        opened,
        last_arrival: &last_arrival,
    };
    let mut origin = Watched {
        io: origin,
        opened,
        last_arrival: &last_arrival,
    };
    let copy = tokio::io::copy_bidirectional(&mut client, &mut origin);
    tokio::pin!(copy);
    let mut check_at = opened + idle;
    loop {
        tokio::select! {
            carried = &mut copy => {
                let (to_origin, to_client) = carried?;
                return Ok(Ended::Closed { to_origin, to_client });
            }
            () = tokio::time::sleep_until(check_at) => {
                // One timer per tunnel, moved on when it fires rather than reset per read.
                let quiet_until = opened
                    + Duration::from_nanos(last_arrival.load(Ordering::Relaxed))
                    + idle;
                if quiet_until <= Instant::now() {
                    return Ok(Ended::Idle);
                }
                check_at = quiet_until;
            }
        }
    }
}

/// A connection that notes when bytes arrive on it.
struct Watched<'a, T> {
    io: T,
    opened: Instant,
    last_arrival: &'a AtomicU64,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let since_open = u64::try_from(self.opened.elapsed().as_nanos()).unwrap_or(u64::MAX);
            self.last_arrival.store(since_open, Ordering::Relaxed);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;

    const IDLE: Duration = Duration::from_secs(60);

    /// A tunnel between two in-memory connections: returns the client's and the origin's far ends
    /// and the running splice.
    fn tunnel() -> (
        DuplexStream,
        DuplexStream,
        tokio::task::JoinHandle<io::Result<Ended>>,
    ) {
        let (client_far, client_near) = tokio::io::duplex(1024);
        let (origin_near, origin_far) = tokio::io::duplex(1024);
        let splice = tokio::spawn(splice(client_near, origin_near, IDLE));
        (client_far, origin_far, splice)
    }

    #[tokio::test(start_paused = true)]
    async fn traffic_keeps_a_tunnel_open_past_the_idle_timeout() -> io::Result<()> {
        let (mut client, mut origin, splice) = tunnel();
        let started = Instant::now();
        let mut byte = [0u8; 1];
        // Ten exchanges, each after two thirds of the timeout: five timeouts in all.
        for round in 0..10u8 {
            tokio::time::sleep(IDLE * 2 / 3).await;
            if round % 2 == 0 {
                client.write_all(&[round]).await?;
                origin.read_exact(&mut byte).await?;
            } else {
                origin.write_all(&[round]).await?;
                client.read_exact(&mut byte).await?;
            }
            assert_eq!(byte[0], round);
        }
        assert!(started.elapsed() > IDLE * 5);
        assert!(!splice.is_finished(), "the tunnel closed while in use");
        drop((client, origin));
        assert!(matches!(splice.await?, Ok(Ended::Closed { .. })));
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_tunnel_is_closed_after_the_idle_timeout() -> io::Result<()> {
        let (mut client, mut origin, splice) = tunnel();
        tokio::time::sleep(IDLE / 2).await;
        client.write_all(b"last words").await?;
        let mut heard = [0u8; 10];
        origin.read_exact(&mut heard).await?;
        let last_traffic = Instant::now();

        assert_eq!(splice.await?.ok(), Some(Ended::Idle));
        // The timer wheel counts in milliseconds: the deadline may round up by one.
        let quiet_for = last_traffic.elapsed();
        assert!(
            quiet_for >= IDLE && quiet_for <= IDLE + Duration::from_millis(2),
            "{quiet_for:?}"
        );
        // Both far ends see the connection closed.
        assert_eq!(client.read(&mut heard).await?, 0);
        assert_eq!(origin.read(&mut heard).await?, 0);
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn closing_both_directions_ends_the_tunnel_with_its_byte_counts() -> io::Result<()> {
        let (mut client, mut origin, splice) = tunnel();
        client.write_all(b"ping").await?;
        client.shutdown().await?;
        let mut received = Vec::new();
        origin.read_to_end(&mut received).await?;
        assert_eq!(received, b"ping");
        origin.write_all(b"pong!").await?;
        origin.shutdown().await?;
        let mut received = Vec::new();
        client.read_to_end(&mut received).await?;
        assert_eq!(received, b"pong!");
        assert_eq!(
            splice.await?.ok(),
            Some(Ended::Closed {
                to_origin: 4,
                to_client: 5
            })
        );
        Ok(())
    }
}
