//! Scopes: whose key is it. [`ScopeExtractor`] and the built-in extractors.
//!
//! Every record is keyed by scope as well as endpoint and idempotency key, so two callers who
//! happen to send the same key never see each other's responses. A request for which the
//! extractor finds no scope is rejected with 401 (or passed through unprotected, when the layer
//! is configured so); it never shares a bucket with other callers.

use std::{fmt, marker::PhantomData};

use bytes::Bytes;
use http::{header, request::Parts};
use sha2::{Digest, Sha256};

/// Who a key belongs to: an organization, an API credential, a tenant. Opaque bytes, used only
/// as an input to SHA-256 (never stored or logged as is).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Scope(Bytes);

impl Scope {
    /// A scope from any bytes or text (an organization id, say).
    pub fn new(value: impl Into<Bytes>) -> Self {
        Self(value.into())
    }

    /// The scope's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Scope(..)")
    }
}

/// SHA-256 of a request's [`Scope`], in the request extensions of every covered request that
/// has one, next to its validated [`IdempotencyKey`](crate::IdempotencyKey): a handler can log
/// whose key it is, or pass the key on to a downstream provider with idempotency keys of its
/// own, without ever seeing the raw scope (a credential, say).
///
/// It is SHA-256 over a fixed domain tag and the scope's bytes, so it equals no other digest
/// the crate computes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ScopeDigest(pub [u8; 32]);

impl ScopeDigest {
    pub(crate) fn of(scope: &Scope) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(b"tower-idempotency scope digest v1\0");
        hasher.update(scope.as_bytes());
        Self(hasher.finalize().into())
    }

    /// The digest as 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for ScopeDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ScopeDigest({})", self.to_hex())
    }
}

/// Finds the scope of a request from its head (method, URI, headers, extensions).
///
/// Runs after method, path and key have been checked and before the body is read.
/// Return `None` when the request carries no identifiable caller.
pub trait ScopeExtractor: Send + Sync + 'static {
    /// The scope of the request, or `None`.
    fn extract(&self, parts: &Parts) -> Option<Scope>;
}

/// The default extractor: the whole `Authorization` header value (for example
/// `Bearer sk_live_...`), hashed with SHA-256, so raw credentials never reach a store or a log.
///
/// No header, or more than one: no scope. Two different credentials of the same organization
/// are two scopes; when keys should be shared across an organization's credentials, use
/// [`ExtensionScope`] with the organization id that your auth layer resolves.
///
/// # Warning: short-lived tokens
/// Right for long-lived API keys. With tokens that change (OAuth access tokens, JWTs), a client
/// that refreshes its token between a request and its retry becomes another scope, and the
/// retry runs again. Scope such APIs by the account the token resolves to ([`ExtensionScope`])
/// or by a stable claim ([`scope_fn`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct AuthorizationScope;

impl ScopeExtractor for AuthorizationScope {
    fn extract(&self, parts: &Parts) -> Option<Scope> {
        let mut values = parts.headers.get_all(header::AUTHORIZATION).iter();
        let value = values.next()?;
        if values.next().is_some() || value.is_empty() {
            return None;
        }
        let digest = Sha256::new()
            .chain_update(b"tower-idempotency/authorization/v1\0")
            .chain_update(value.as_bytes())
            .finalize();
        Some(Scope(Bytes::copy_from_slice(&digest)))
    }
}

/// A scope from a typed value that an earlier layer (your authentication) put in the request
/// extensions, written with its `Display` form. For example an `OrgId(Uuid)`.
///
/// The value's absence means no scope. Add the auth layer *outside* the idempotency layer so
/// that it runs first.
pub struct ExtensionScope<T> {
    _marker: PhantomData<fn() -> T>,
}

impl<T> ExtensionScope<T> {
    /// An extractor reading `T` from the request extensions.
    pub fn new() -> Self {
        Self {
            _marker: PhantomData,
        }
    }
}

impl<T> Default for ExtensionScope<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Clone for ExtensionScope<T> {
    fn clone(&self) -> Self {
        Self::new()
    }
}

impl<T> fmt::Debug for ExtensionScope<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExtensionScope")
            .field("type", &std::any::type_name::<T>())
            .finish()
    }
}

impl<T> ScopeExtractor for ExtensionScope<T>
where
    T: fmt::Display + Send + Sync + 'static,
{
    fn extract(&self, parts: &Parts) -> Option<Scope> {
        parts
            .extensions
            .get::<T>()
            .map(|value| Scope::new(value.to_string()))
    }
}

/// A scope from a closure over the request head; see [`scope_fn`].
#[derive(Clone)]
pub struct ScopeFn<F>(F);

/// Makes a [`ScopeExtractor`] from a closure `Fn(&Parts) -> Option<Scope>`.
///
/// ```
/// use tower_idempotency::{IdempotencyLayer, Scope, scope_fn};
///
/// let layer = IdempotencyLayer::new().scope(scope_fn(|parts| {
///     parts.headers.get("x-tenant").map(|tenant| Scope::new(tenant.as_bytes().to_vec()))
/// }));
/// # let _ = layer;
/// ```
pub fn scope_fn<F>(f: F) -> ScopeFn<F>
where
    F: Fn(&Parts) -> Option<Scope> + Send + Sync + 'static,
{
    ScopeFn(f)
}

impl<F> fmt::Debug for ScopeFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ScopeFn(..)")
    }
}

impl<F> ScopeExtractor for ScopeFn<F>
where
    F: Fn(&Parts) -> Option<Scope> + Send + Sync + 'static,
{
    fn extract(&self, parts: &Parts) -> Option<Scope> {
        (self.0)(parts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn parts(auth: &[&str]) -> Parts {
        let mut builder = Request::builder();
        for value in auth {
            builder = builder.header(header::AUTHORIZATION, *value);
        }
        builder.body(()).unwrap().into_parts().0
    }

    #[test]
    fn authorization_scope_hashes_the_credential() {
        let scope = AuthorizationScope
            .extract(&parts(&["Bearer secret"]))
            .unwrap();
        assert_eq!(scope.as_bytes().len(), 32);
        assert!(
            !scope
                .as_bytes()
                .windows(b"secret".len())
                .any(|w| w == b"secret")
        );
        let other = AuthorizationScope
            .extract(&parts(&["Bearer other"]))
            .unwrap();
        assert_ne!(scope, other);
        assert!(AuthorizationScope.extract(&parts(&[])).is_none());
        assert!(AuthorizationScope.extract(&parts(&["a", "b"])).is_none());
    }

    #[test]
    fn extension_scope_reads_the_typed_value() {
        #[derive(Clone)]
        struct Org(u32);
        impl fmt::Display for Org {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "org-{}", self.0)
            }
        }
        let mut p = parts(&[]);
        assert!(ExtensionScope::<Org>::new().extract(&p).is_none());
        p.extensions.insert(Org(7));
        assert_eq!(
            ExtensionScope::<Org>::new().extract(&p),
            Some(Scope::new("org-7"))
        );
    }

    #[test]
    fn debug_output_names_the_type_and_never_the_scope() {
        let scope = Scope::new("secret-tenant");
        assert_eq!(format!("{scope:?}"), "Scope(..)");
        let digest = ScopeDigest([0xab; 32]);
        assert_eq!(
            format!("{digest:?}"),
            format!("ScopeDigest({})", "ab".repeat(32))
        );
        let extension = ExtensionScope::<String>::new();
        assert_eq!(
            format!("{extension:?}"),
            "ExtensionScope { type: \"alloc::string::String\" }"
        );
        let from_fn = scope_fn(|_| None);
        assert_eq!(format!("{from_fn:?}"), "ScopeFn(..)");
    }
}
