//! Rendering rejections with the layer's settings: its [`ProblemTypes`] and its rejection hook
//! ([`IdempotencyLayer::reject_with`](crate::IdempotencyLayer::reject_with)). Every response
//! the layer makes itself goes through [`Reject::render`].

use std::sync::Arc;

use axum::body::Body;
use http::{HeaderValue, Response, header};

use crate::{ProblemTypes, problem::Problem};

/// The application's renderer of rejections.
pub(crate) type RejectHook = Arc<dyn Fn(Problem) -> Response<Body> + Send + Sync>;

/// How the layer turns a [`Problem`] into a response.
#[derive(Clone, Default)]
pub(crate) struct Reject {
    pub(crate) types: ProblemTypes,
    pub(crate) hook: Option<RejectHook>,
}

impl Reject {
    /// The response for `problem`: the hook's, with `Retry-After` added when the problem has
    /// one and the hook set none; without a hook, problem details.
    pub(crate) fn render(&self, problem: Problem) -> Response<Body> {
        let problem = if self.types.is_default() {
            problem
        } else {
            let uri = self.types.configured(problem.kind);
            problem.with_type_uri(uri)
        };
        let Some(hook) = &self.hook else {
            return problem.into_response();
        };
        let retry_after = problem.retry_after_secs();
        let mut response = hook(problem);
        if let Some(secs) = retry_after
            && !response.headers().contains_key(header::RETRY_AFTER)
        {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }

    /// Whether rejections are rendered as [`Problem::into_response`] does (no hook, default
    /// `type` URIs).
    pub(crate) fn is_default(&self) -> bool {
        self.hook.is_none() && self.types.is_default()
    }

    /// `response` from the inner service, or, when it is a rejection made out of reach of the
    /// layer's settings (see [`Unrendered`]), that rejection rendered with them. Its other
    /// extensions are kept. Costs one lookup in the response's extensions otherwise.
    pub(crate) fn rerender(&self, mut response: Response<Body>) -> Response<Body> {
        let Some(Unrendered(problem)) = response.extensions_mut().remove::<Unrendered>() else {
            return response;
        };
        if self.is_default() {
            return response;
        }
        let extensions = std::mem::take(response.extensions_mut());
        let mut rendered = self.render(problem);
        rendered.extensions_mut().extend(extensions);
        rendered
    }
}

/// In the response extensions of a rejection made where the layer's settings are out of reach
/// (the [`Lease`](crate::Lease) extractor, `TransactionalError`): the problem, so that the
/// layer the response passes through renders it with its hook and `type` URIs.
#[derive(Clone)]
pub(crate) struct Unrendered(Problem);

impl Unrendered {
    /// Whether `response` is such a rejection, not yet rendered by a layer.
    pub(crate) fn is_in<B>(response: &Response<B>) -> bool {
        response.extensions().get::<Unrendered>().is_some()
    }

    /// `problem` as problem details (all there is without a layer), marked for the layer.
    pub(crate) fn response(problem: Problem) -> Response<Body> {
        let mut response: Response<Body> = problem.clone().into_response();
        response.extensions_mut().insert(Unrendered(problem));
        response
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::StatusCode;

    use super::*;
    use crate::problem::ProblemKind;

    fn teapot() -> Reject {
        Reject {
            types: ProblemTypes::default(),
            hook: Some(Arc::new(|problem: Problem| {
                let mut response = Response::new(Body::from(problem.detail));
                *response.status_mut() = StatusCode::IM_A_TEAPOT;
                response
            })),
        }
    }

    #[test]
    fn a_marked_rejection_is_rendered_again_and_keeps_its_other_extensions() {
        #[derive(Clone)]
        struct Other;
        let mut response = Unrendered::response(Problem::new(ProblemKind::InFlight, "lost"));
        response.extensions_mut().insert(Other);
        let response = teapot().rerender(response);
        assert_eq!(response.status(), StatusCode::IM_A_TEAPOT);
        assert!(response.extensions().get::<Other>().is_some());
        assert!(response.extensions().get::<Unrendered>().is_none());
    }

    #[test]
    fn an_unmarked_response_is_left_alone() {
        let response = teapot().rerender(Response::new(Body::empty()));
        assert_eq!(response.status(), StatusCode::OK);
    }

    #[test]
    fn retry_after_is_added_unless_the_hook_set_its_own() {
        let problem = || Problem::new(ProblemKind::InFlight, "busy").retry_after(Duration::ZERO);
        let response = teapot().render(problem());
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        let own = Reject {
            types: ProblemTypes::default(),
            hook: Some(Arc::new(|_| {
                let mut response = Response::new(Body::empty());
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("7"));
                response
            })),
        };
        assert_eq!(own.render(problem()).headers()[header::RETRY_AFTER], "7");
    }

    #[test]
    fn with_default_settings_a_marked_rejection_passes_untouched() {
        // Nothing to render differently: the response keeps what inner layers added to it.
        let mut response = Unrendered::response(Problem::new(ProblemKind::InFlight, "busy"));
        response
            .headers_mut()
            .insert("x-request-id", HeaderValue::from_static("r-1"));
        let response = Reject::default().rerender(response);
        assert_eq!(response.status(), StatusCode::CONFLICT);
        assert_eq!(response.headers()["x-request-id"], "r-1");
    }
}
