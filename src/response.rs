//! [`StoredResponse`]: what is kept of a response, how it is replayed, and its compact binary
//! encoding for stores that keep bytes.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode, header};

use crate::store::{StoreError, StoreErrorKind};

/// The header added to every replayed response, with the value `true`.
pub const REPLAYED_HEADER: HeaderName = HeaderName::from_static("idempotent-replayed");

/// A response as kept in a store: status, end-to-end headers and body bytes.
///
/// Built by the layer from the handler's response with [`StoredResponse::capture_headers`]
/// rules: `Set-Cookie`, `Date`, `Content-Length` and hop-by-hop headers (RFC 9110 section 7.6.1:
/// `Connection` and every header it names, `Keep-Alive`, `Proxy-Connection`,
/// `Proxy-Authenticate`, `Proxy-Authorization`, `TE`, `Trailer`, `Transfer-Encoding`,
/// `Upgrade`) are never stored. Every other header is kept exactly, including repeated fields
/// (in order) and values that are not UTF-8.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    /// The status code.
    pub status: StatusCode,
    /// The end-to-end headers, as sent by the handler.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

const ENCODING_MAGIC: &[u8; 4] = b"TIR1";

impl StoredResponse {
    /// Keeps the storable headers of `headers` (see the type docs for what is dropped).
    pub fn capture_headers(headers: &HeaderMap) -> HeaderMap {
        let named_by_connection: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .collect();
        let mut kept = HeaderMap::with_capacity(headers.len());
        for (name, value) in headers {
            if is_never_stored(name) || named_by_connection.contains(name) {
                continue;
            }
            kept.append(name.clone(), value.clone());
        }
        kept
    }

    /// The response to send for a replay: the stored status, headers and body, with
    /// `Content-Length` set to the body's length (omitted for 1xx, 204 and 304) and
    /// `Idempotent-Replayed: true`.
    ///
    /// Headers that are never stored are left out here too, whatever the record holds (a
    /// record written by another program, or built by hand), so a replay never carries
    /// `Set-Cookie`, a stale `Content-Length` or a hop-by-hop header.
    pub fn to_replay<B: From<Bytes>>(&self) -> Response<B> {
        self.to_response(true)
    }

    /// The response as stored, marked as a replay or not.
    pub(crate) fn to_response<B: From<Bytes>>(&self, replayed: bool) -> Response<B> {
        let mut response = Response::new(B::from(self.body.clone()));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.reserve(self.headers.len() + 2);
        for (name, value) in &self.headers {
            if is_never_stored(name) {
                continue;
            }
            headers.append(name.clone(), value.clone());
        }
        if status_allows_content_length(self.status) {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(self.body.len()));
        }
        if replayed {
            headers.insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
        }
        response
    }

    /// Bytes this record occupies in a store: body, header names and values, plus a fixed
    /// overhead per header. Used for the in-memory store's byte bound.
    pub fn weight(&self) -> usize {
        self.body.len()
            + self
                .headers
                .iter()
                .map(|(n, v)| n.as_str().len() + v.len() + 16)
                .sum::<usize>()
    }

    /// Encodes the response as compact bytes: a 4-byte version tag, the status (u16), the header
    /// count (u32), each header as a u16-length-prefixed name and a u32-length-prefixed value,
    /// then the body with a u64 length prefix. All integers big-endian.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = BytesMut::with_capacity(self.weight() + 16);
        out.put_slice(ENCODING_MAGIC);
        out.put_u16(self.status.as_u16());
        out.put_u32(self.headers.len() as u32);
        for (name, value) in &self.headers {
            out.put_u16(name.as_str().len() as u16);
            out.put_slice(name.as_str().as_bytes());
            out.put_u32(value.len() as u32);
            out.put_slice(value.as_bytes());
        }
        out.put_u64(self.body.len() as u64);
        out.put_slice(&self.body);
        out.to_vec()
    }

    /// Decodes bytes written by [`encode`](Self::encode).
    ///
    /// Errors with [`StoreErrorKind::Corrupt`] on a wrong version tag, a truncated record, an
    /// invalid status, header name or header value, or trailing bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        let corrupt = || StoreError::new(StoreErrorKind::Corrupt, "stored response is corrupt");
        let mut buf = bytes;
        if buf.len() < 10 || &buf[..4] != ENCODING_MAGIC {
            return Err(corrupt());
        }
        buf.advance(4);
        let status = StatusCode::from_u16(buf.get_u16()).map_err(|_| corrupt())?;
        let count = buf.get_u32() as usize;
        let mut headers = HeaderMap::with_capacity(count.min(256));
        for _ in 0..count {
            if buf.remaining() < 2 {
                return Err(corrupt());
            }
            let len = buf.get_u16() as usize;
            if buf.remaining() < len + 4 {
                return Err(corrupt());
            }
            let name = HeaderName::from_bytes(&buf[..len]).map_err(|_| corrupt())?;
            buf.advance(len);
            let len = buf.get_u32() as usize;
            if buf.remaining() < len {
                return Err(corrupt());
            }
            let value = HeaderValue::from_bytes(&buf[..len]).map_err(|_| corrupt())?;
            buf.advance(len);
            headers.append(name, value);
        }
        if buf.remaining() < 8 {
            return Err(corrupt());
        }
        let len = buf.get_u64();
        if buf.remaining() as u64 != len {
            return Err(corrupt());
        }
        Ok(Self {
            status,
            headers,
            body: Bytes::copy_from_slice(buf),
        })
    }
}

fn is_never_stored(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "set-cookie"
            | "date"
            | "content-length"
            | "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "idempotent-replayed"
    )
}

fn status_allows_content_length(status: StatusCode) -> bool {
    !(status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StoredResponse {
        let mut headers = HeaderMap::new();
        headers.append("x-multi", HeaderValue::from_static("one"));
        headers.append("x-multi", HeaderValue::from_static("two"));
        headers.append(
            "x-binary",
            HeaderValue::from_bytes(&[0x80, 0xff, b'a']).unwrap(),
        );
        StoredResponse {
            status: StatusCode::CREATED,
            headers,
            body: Bytes::from_static(&[0, 1, 2, 255]),
        }
    }

    #[test]
    fn encoding_round_trips_exactly() {
        let original = sample();
        let decoded = StoredResponse::decode(&original.encode()).unwrap();
        assert_eq!(decoded, original);
        let multi: Vec<_> = decoded.headers.get_all("x-multi").iter().collect();
        assert_eq!(multi, ["one", "two"]);
    }

    #[test]
    fn truncated_or_extended_records_are_corrupt() {
        let bytes = sample().encode();
        for cut in 0..bytes.len() {
            assert!(
                StoredResponse::decode(&bytes[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(StoredResponse::decode(&longer).is_err());
    }

    #[test]
    fn never_stored_headers_are_dropped() {
        let mut headers = HeaderMap::new();
        headers.insert(header::SET_COOKIE, HeaderValue::from_static("s=1"));
        headers.insert(header::DATE, HeaderValue::from_static("now"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("close, x-hop"));
        headers.insert("x-hop", HeaderValue::from_static("1"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert(header::LOCATION, HeaderValue::from_static("/calls/1"));
        let kept = StoredResponse::capture_headers(&headers);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[header::LOCATION], "/calls/1");
    }

    #[test]
    fn replay_sets_content_length_and_marker() {
        let replay: Response<Bytes> = sample().to_replay();
        assert_eq!(replay.headers()[header::CONTENT_LENGTH], "4");
        assert_eq!(replay.headers()[REPLAYED_HEADER], "true");
        let no_content = StoredResponse {
            status: StatusCode::NO_CONTENT,
            headers: HeaderMap::new(),
            body: Bytes::new(),
        };
        let replay: Response<Bytes> = no_content.to_replay();
        assert!(replay.headers().get(header::CONTENT_LENGTH).is_none());
    }

    #[test]
    fn weight_is_the_body_plus_each_header_and_16_bytes_a_header() {
        let mut headers = HeaderMap::new();
        headers.insert("x-abc", HeaderValue::from_static("12"));
        headers.append("x-abc", HeaderValue::from_static("345"));
        let response = StoredResponse {
            status: StatusCode::CREATED,
            headers,
            body: Bytes::from_static(b"hello"),
        };
        // 5 for the body, (5 + 2 + 16) and (5 + 3 + 16) for the two values.
        assert_eq!(response.weight(), 5 + 23 + 24);
    }
}
