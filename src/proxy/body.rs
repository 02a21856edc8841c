//! The one body type Strata sends both ways: empty, a stored `Bytes`, a streamed hyper body (with an
//! idle deadline when it comes from the origin), or a channel fed by a cache fill (whole, or one
//! byte range of it).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};

use super::origin::OriginBody;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a fill task sends its client: a chunk, `Ok(None)` for "complete", or the error that ended it.
/// A channel that closes without `Ok(None)` ends the body in an error, so a fill that stops early
/// (client stalled, task gone) never produces a truncated body that looks complete.
pub type ChannelItem = Result<Option<Bytes>, BoxError>;

/// When a client's request body last moved (a chunk, its end), so that the origin's deadline for
/// its answer counts from there: an upload that takes longer than `ORIGIN_TIMEOUT` but never stalls
/// that long is not an origin timeout (nginx's `proxy_send_timeout` works the same way).
#[derive(Debug)]
pub struct UploadProgress {
    started: std::time::Instant,
    /// Nanoseconds after `started`.
    last: AtomicU64,
}

impl UploadProgress {
    fn new() -> Arc<UploadProgress> {
        Arc::new(UploadProgress {
            started: std::time::Instant::now(),
            last: AtomicU64::new(0),
        })
    }

    fn touch(&self) {
        let nanos = u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last.store(nanos, Ordering::Relaxed);
    }

    /// The last time the body moved (its start, before any chunk).
    pub fn last(&self) -> std::time::Instant {
        self.started + Duration::from_nanos(self.last.load(Ordering::Relaxed))
    }
}

/// The fill behind a streamed answer stopped before the body was complete.
#[derive(Debug, thiserror::Error)]
#[error("response body ended before it was complete")]
pub struct Incomplete;

/// The origin went silent for longer than `ORIGIN_TIMEOUT` in the middle of a body.
#[derive(Debug, thiserror::Error)]
#[error("origin body idle for more than {0:?}")]
pub struct IdleTimeout(pub Duration);

pin_project_lite::pin_project! {
    #[project = ProxyBodyProj]
    pub enum ProxyBody {
        Empty,
        Full { data: Option<Bytes> },
        /// A client's request body on its way to the origin, and (unless it is empty) when it last
        /// moved.
        Client { #[pin] body: Incoming, progress: Option<Arc<UploadProgress>> },
        /// An origin's response body on its way to the client. The idle deadline is armed only
        /// when the body first makes the client wait, and moved on only after progress: a body
        /// that is already buffered (most small ones) never touches the timer wheel.
        Origin { #[pin] body: OriginBody, idle: Option<Pin<Box<Sleep>>>, progressed: bool, timeout: Duration },
        /// Chunks forwarded by a fill task that also stores them; with a window, only the bytes
        /// `skip..skip + take` of them (a byte range of a body being stored).
        Channel { rx: mpsc::Receiver<ChannelItem>, complete: bool, window: Option<Window> },
    }
}

impl ProxyBody {
    pub fn empty() -> Self {
        ProxyBody::Empty
    }

    pub fn full(data: Bytes) -> Self {
        ProxyBody::Full { data: Some(data) }
    }

    pub fn client(body: Incoming) -> Self {
        let progress = (!body.is_end_stream()).then(UploadProgress::new);
        ProxyBody::Client { body, progress }
    }

    /// For a client's request body: when it last moved (see [`UploadProgress`]).
    pub fn upload_progress(&self) -> Option<Arc<UploadProgress>> {
        match self {
            ProxyBody::Client { progress, .. } => progress.clone(),
            _ => None,
        }
    }

    pub fn origin(body: OriginBody, timeout: Duration) -> Self {
        ProxyBody::Origin {
            body,
            idle: None,
            progressed: false,
            timeout,
        }
    }

    pub fn channel(rx: mpsc::Receiver<ChannelItem>) -> Self {
        ProxyBody::Channel {
            rx,
            complete: false,
            window: None,
        }
    }

    /// The bytes `first..=last` of a fill's body (`last` inside it). The body ends once they are
    /// through; the fill goes on storing the rest.
    pub fn channel_range(rx: mpsc::Receiver<ChannelItem>, first: u64, last: u64) -> Self {
        ProxyBody::Channel {
            rx,
            complete: false,
            window: Some(Window {
                skip: first,
                take: last - first + 1,
            }),
        }
    }
}

/// What is left of a byte range: bytes still to pass over, then bytes still to deliver.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    skip: u64,
    take: u64,
}

impl Window {
    /// The part of the next `chunk` that falls inside the range (possibly empty).
    fn cut(&mut self, mut chunk: Bytes) -> Bytes {
        let len = chunk.len() as u64;
        if self.skip >= len {
            self.skip -= len;
            return Bytes::new();
        }
        let start = usize::try_from(self.skip).unwrap_or(usize::MAX);
        self.skip = 0;
        let _ = chunk.split_to(start);
        let keep = self.take.min(chunk.len() as u64);
        self.take -= keep;
        chunk.truncate(usize::try_from(keep).unwrap_or(usize::MAX));
        chunk
    }
}

impl From<&'static str> for ProxyBody {
    fn from(text: &'static str) -> Self {
        ProxyBody::full(Bytes::from_static(text.as_bytes()))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            ProxyBodyProj::Empty => Poll::Ready(None),
            ProxyBodyProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ProxyBodyProj::Client { body, progress } => {
                let polled = body.poll_frame(cx);
                if let (Some(progress), Poll::Ready(_)) = (progress, &polled) {
                    progress.touch();
                }
                polled.map_err(Into::into)
            }
            ProxyBodyProj::Origin {
                body,
                idle,
                progressed,
                timeout,
            } => match body.poll_frame(cx) {
                Poll::Ready(frame) => {
                    *progressed = true;
                    Poll::Ready(frame.map(|f| f.map_err(Into::into)))
                }
                Poll::Pending => {
                    let sleep = match idle {
                        Some(sleep) => {
                            if std::mem::take(progressed) {
                                sleep.as_mut().reset(Instant::now() + *timeout);
                            }
                            sleep
                        }
                        None => {
                            *progressed = false;
                            idle.insert(Box::pin(tokio::time::sleep(*timeout)))
                        }
                    };
                    match sleep.as_mut().poll(cx) {
                        Poll::Ready(()) => Poll::Ready(Some(Err(IdleTimeout(*timeout).into()))),
                        Poll::Pending => Poll::Pending,
                    }
                }
            },
            ProxyBodyProj::Channel {
                rx,
                complete,
                window,
            } => loop {
                if *complete || window.is_some_and(|w| w.take == 0) {
                    *complete = true;
                    return Poll::Ready(None);
                }
                return match rx.poll_recv(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Some(Ok(Some(data)))) => {
                        let data = match window {
                            Some(window) => window.cut(data),
                            None => data,
                        };
                        if data.is_empty() {
                            continue;
                        }
                        Poll::Ready(Some(Ok(Frame::data(data))))
                    }
                    Poll::Ready(Some(Ok(None))) => {
                        *complete = true;
                        // A window still open at the end: the body was shorter than declared.
                        match window {
                            Some(window) if window.take > 0 => {
                                Poll::Ready(Some(Err(Incomplete.into())))
                            }
                            _ => Poll::Ready(None),
                        }
                    }
                    Poll::Ready(Some(Err(error))) => {
                        *complete = true;
                        Poll::Ready(Some(Err(error)))
                    }
                    Poll::Ready(None) => {
                        *complete = true;
                        Poll::Ready(Some(Err(Incomplete.into())))
                    }
                };
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Empty => true,
            ProxyBody::Full { data } => data.is_none(),
            ProxyBody::Client { body, .. } => body.is_end_stream(),
            ProxyBody::Origin { body, .. } => body.is_end_stream(),
            ProxyBody::Channel {
                complete, window, ..
            } => *complete || window.is_some_and(|w| w.take == 0),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Empty => SizeHint::with_exact(0),
            ProxyBody::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ProxyBody::Client { body, .. } => body.size_hint(),
            ProxyBody::Origin { body, .. } => body.size_hint(),
            ProxyBody::Channel {
                window: Some(window),
                ..
            } => SizeHint::with_exact(window.take),
            ProxyBody::Channel { .. } => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    /// The window of a channel body, whatever the chunk boundaries: the bytes asked for, then the end.
    #[tokio::test]
    async fn a_channel_range_delivers_exactly_its_bytes() -> Result<(), BoxError> {
        let body: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        for chunk_len in [1, 7, 100, 1000] {
            for (first, last) in [(0, 0), (0, 999), (5, 5), (6, 993), (999, 999), (300, 699)] {
                let (tx, rx) = mpsc::channel(body.len());
                for chunk in body.chunks(chunk_len) {
                    tx.send(Ok(Some(Bytes::copy_from_slice(chunk)))).await?;
                }
                // The fill keeps going; the window must not wait for it.
                let range = ProxyBody::channel_range(rx, first, last);
                assert_eq!(range.size_hint().exact(), Some(last - first + 1));
                let got = range.collect().await?.to_bytes();
                assert_eq!(
                    &got[..],
                    &body[first as usize..=last as usize],
                    "chunks of {chunk_len}, bytes {first}-{last}"
                );
                drop(tx);
            }
        }
        Ok(())
    }
}
