//! The one body type Strata sends both ways: empty, a stored `Bytes`, a streamed hyper body (with an
//! idle deadline when it comes from the origin), or a channel fed by a cache fill.

use std::future::Future;
use std::pin::Pin;
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
        /// A client's request body on its way to the origin.
        Client { #[pin] body: Incoming },
        /// An origin's response body on its way to the client. The idle deadline is armed only
        /// when the body first makes the client wait, and moved on only after progress: a body
        /// that is already buffered (most small ones) never touches the timer wheel.
        Origin { #[pin] body: OriginBody, idle: Option<Pin<Box<Sleep>>>, progressed: bool, timeout: Duration },
        /// Chunks forwarded by a fill task that also stores them.
        Channel { rx: mpsc::Receiver<ChannelItem>, complete: bool },
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
        ProxyBody::Client { body }
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
        }
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
            ProxyBodyProj::Client { body } => body.poll_frame(cx).map_err(Into::into),
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
            ProxyBodyProj::Channel { rx, complete } => {
                if *complete {
                    return Poll::Ready(None);
                }
                match rx.poll_recv(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Some(Ok(Some(data)))) => Poll::Ready(Some(Ok(Frame::data(data)))),
                    Poll::Ready(Some(Ok(None))) => {
                        *complete = true;
                        Poll::Ready(None)
                    }
                    Poll::Ready(Some(Err(error))) => {
                        *complete = true;
                        Poll::Ready(Some(Err(error)))
                    }
                    Poll::Ready(None) => {
                        *complete = true;
                        Poll::Ready(Some(Err(Incomplete.into())))
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Empty => true,
            ProxyBody::Full { data } => data.is_none(),
            ProxyBody::Client { body } => body.is_end_stream(),
            ProxyBody::Origin { body, .. } => body.is_end_stream(),
            ProxyBody::Channel { complete, .. } => *complete,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Empty => SizeHint::with_exact(0),
            ProxyBody::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ProxyBody::Client { body } => body.size_hint(),
            ProxyBody::Origin { body, .. } => body.size_hint(),
            ProxyBody::Channel { .. } => SizeHint::default(),
        }
    }
}
