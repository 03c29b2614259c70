//! A response body that must end by a deadline: the rest of a route's `timeout` once the headers came (Envoy's
//! route timeout covers the whole response). Past it, the body fails, and hyper ends the downstream
//! response early (HTTP/1.1: the connection closes; HTTP/2: the stream is reset).
use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

pub struct DeadlineBody<B> {
    inner: B,
    deadline: Pin<Box<Sleep>>,
}

impl<B> DeadlineBody<B> {
    pub fn new(inner: B, deadline: Instant) -> Self {
        DeadlineBody { inner, deadline: Box::pin(tokio::time::sleep_until(deadline)) }
    }
}

/// Why a body ended early.
#[derive(Debug, thiserror::Error)]
pub enum DeadlineError<E> {
    #[error("upstream response body past the route timeout")]
    Timeout,
    #[error(transparent)]
    Body(E),
}

impl<B> Body for DeadlineBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = DeadlineError<B::Error>;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(DeadlineError::Body)));
        }
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(DeadlineError::Timeout))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_body_slower_than_the_deadline_fails_a_quicker_one_passes() {
        let slow = futures::stream::once(async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"late")))
        });
        let deadline = Instant::now() + Duration::from_millis(500);
        let failed = DeadlineBody::new(StreamBody::new(Box::pin(slow)), deadline).collect().await;
        assert!(matches!(failed, Err(DeadlineError::Timeout)));
        let quick = http_body_util::Full::new(Bytes::from_static(b"on time"));
        let body = DeadlineBody::new(quick, Instant::now() + Duration::from_millis(500)).collect().await;
        assert_eq!(body.ok().map(|b| b.to_bytes()), Some(Bytes::from_static(b"on time")));
    }
}
