//! Capture: collecting the response body up to the cap, so that it can be stored.

use bytes::{Bytes, BytesMut};
use futures_util::{StreamExt, stream};
use http_body::Frame;
use http_body_util::{BodyExt, BodyStream, StreamBody};

use axum::body::Body;

use crate::store::BoxError;

pub(crate) const TOO_LARGE: &str = "response too large to store";

pub(crate) enum Captured {
    /// The whole body, within the cap.
    Complete(Bytes),
    /// A body to send as it is, with the reason it is not stored.
    NotStored(Body, &'static str),
}

/// Collects `body` up to `cap` bytes. Past the cap, with trailers, or on a body error, the
/// frames read so far are put back in front of the rest so the client still gets it all.
pub(crate) async fn capture<B>(body: B, cap: usize) -> Captured
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let mut body = Body::new(body);
    if http_body::Body::size_hint(&body).lower() > cap as u64 {
        return Captured::NotStored(body, TOO_LARGE);
    }
    let mut buf = BytesMut::new();
    let why = loop {
        match body.frame().await {
            None => return Captured::Complete(buf.freeze()),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) if buf.len() + data.len() <= cap => buf.extend_from_slice(&data),
                Ok(data) => {
                    let head = stream::iter([Ok(Frame::data(buf.freeze())), Ok(Frame::data(data))]);
                    let rest = head.chain(BodyStream::new(body));
                    return Captured::NotStored(Body::new(StreamBody::new(rest)), TOO_LARGE);
                }
                Err(trailers) => {
                    let frames = [Ok(Frame::data(buf.freeze())), Ok(trailers)];
                    break (frames, "response has trailers");
                }
            },
            Some(Err(error)) => {
                let frames = [Ok(Frame::data(buf.freeze())), Err(error)];
                break (frames, "response body failed");
            }
        }
    };
    let (frames, reason) = why;
    Captured::NotStored(Body::new(StreamBody::new(stream::iter(frames))), reason)
}
