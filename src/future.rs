//! [`ResponseFuture`]: the named future of the [`Idempotency`](crate::Idempotency) service.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use axum::body::Body;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::Response;
use pin_project_lite::pin_project;

use crate::{config::Config, outcome::Outcome, store::BoxError};

pin_project! {
    /// The response future of [`Idempotency`].
    pub struct ResponseFuture<F, E> {
        #[pin]
        kind: Kind<F, E>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, E> {
        Passthrough { #[pin] future: F, rerender: Option<Arc<Config>>, outcome: Option<Outcome> },
        Ready { response: Option<Response<Body>> },
        Covered { future: BoxFuture<'static, Result<Response<Body>, E>> },
    }
}

impl<F, E> ResponseFuture<F, E> {
    /// `rerender`: the layer's settings, when a rejection of the [`Lease`](crate::Lease)
    /// extractor in the response must be rendered again with them.
    pub(crate) fn passthrough(future: F, rerender: Option<Arc<Config>>) -> Self {
        Self {
            kind: Kind::Passthrough {
                future,
                rerender,
                outcome: None,
            },
        }
    }

    /// A covered request that runs unprotected (it has no key): its response is marked
    /// [`Outcome::Bypassed`].
    pub(crate) fn bypassed(future: F, rerender: Option<Arc<Config>>) -> Self {
        Self {
            kind: Kind::Passthrough {
                future,
                rerender,
                outcome: Some(Outcome::Bypassed),
            },
        }
    }

    pub(crate) fn ready(response: Response<Body>) -> Self {
        Self {
            kind: Kind::Ready {
                response: Some(response),
            },
        }
    }

    pub(crate) fn covered(future: BoxFuture<'static, Result<Response<Body>, E>>) -> Self {
        Self {
            kind: Kind::Covered { future },
        }
    }
}

impl<F, E> fmt::Debug for ResponseFuture<F, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Passthrough { .. } => "passthrough",
            Kind::Ready { .. } => "ready",
            Kind::Covered { .. } => "covered",
        };
        f.debug_struct("ResponseFuture")
            .field("kind", &kind)
            .finish()
    }
}

impl<F, B, E> Future for ResponseFuture<F, E>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Passthrough {
                future,
                rerender,
                outcome,
            } => future.poll(cx).map(|result| {
                result.map(|response| {
                    let response = response.map(Body::new);
                    let response = match rerender {
                        Some(config) => config.reject.rerender(response),
                        None => response,
                    };
                    match *outcome {
                        Some(outcome) => outcome.mark(response),
                        None => response,
                    }
                })
            }),
            KindProj::Ready { response } => {
                Poll::Ready(Ok(response.take().expect("polled after completion")))
            }
            KindProj::Covered { future } => future.as_mut().poll(cx),
        }
    }
}
