//! A response body: whole (http-body-util's `Full`), or frames relayed as a stream produces them
//! (`StreamBody` over any stream of bytes, such as the relay's channel). One type, so the same
//! handler serves Lambda's buffered and streaming modes.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full, StreamBody};
use serde::Serialize;

type Frames = BoxStream<'static, Result<Frame<Bytes>, Infallible>>;

pub enum Reply {
    Full(Full<Bytes>),
    Stream(StreamBody<Frames>),
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reply::Full(body) => f.debug_tuple("Full").field(body).finish(),
            Reply::Stream(_) => f.write_str("Stream"),
        }
    }
}

impl Reply {
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        Self::Full(Full::new(bytes.into()))
    }

    /// A body of JSON. Serialising the plain structures this crate sends cannot fail; an empty
    /// object is the safe fallback should it ever.
    pub fn json(value: &impl Serialize) -> Self {
        Self::full(serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec()))
    }

    /// A body that ends when `frames` does.
    pub fn stream(frames: impl Stream<Item = Bytes> + Send + 'static) -> Self {
        Self::Stream(StreamBody::new(frames.map(|b| Ok(Frame::data(b))).boxed()))
    }

    /// The whole body, waiting for a stream to end.
    pub async fn collect(self) -> Bytes {
        match BodyExt::collect(self).await {
            Ok(collected) => collected.to_bytes(),
            Err(never) => match never {},
        }
    }
}

impl Body for Reply {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Reply::Full(body) => Pin::new(body).poll_frame(cx),
            Reply::Stream(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Reply::Full(body) => body.is_end_stream(),
            Reply::Stream(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Reply::Full(body) => Body::size_hint(body),
            Reply::Stream(body) => Body::size_hint(body),
        }
    }
}
