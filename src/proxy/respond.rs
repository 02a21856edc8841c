//! Building answers: from a stored entry (with `Age`, 304 for matching conditionals, 206 or 416 for
//! a byte range, no body for HEAD), from an origin response streamed through, and short text errors.

use std::time::SystemTime;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};

use super::body::ProxyBody;
use super::headers::{CACHE_STATUS, X_CACHE};
use crate::cache::policy::{byte_range, not_modified, preconditions_hold, RangeAnswer, Validators};
use crate::cache::{CacheStatus, Entry};

/// The RFC 9211 `Cache-Status` facts of one answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detail {
    Hit,
    /// Found in the shared Redis tier (and promoted into L1).
    HitL2,
    /// Answered from a fill another request led.
    Coalesced,
    StaleWhileRevalidate,
    /// Origin failed (status when it answered at all) and a stale copy was served.
    StaleIfError(Option<StatusCode>),
    /// A stored response was validated by a 304; `forced` when the request demanded it (no-cache).
    Revalidated {
        forced: bool,
    },
    Miss {
        stored: bool,
        fwd: Fwd,
    },
    Bypass,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fwd {
    UriMiss,
    VaryMiss,
    Stale,
    Request,
}

impl Detail {
    pub fn cache_status(self) -> CacheStatus {
        match self {
            Detail::Hit | Detail::Coalesced => CacheStatus::HitL1,
            Detail::HitL2 => CacheStatus::HitL2,
            Detail::StaleWhileRevalidate | Detail::StaleIfError(_) => CacheStatus::Stale,
            Detail::Revalidated { .. } => CacheStatus::Revalidated,
            Detail::Miss { .. } => CacheStatus::Miss,
            Detail::Bypass => CacheStatus::Bypass,
        }
    }

    fn header_value(self, ttl: Option<i64>) -> HeaderValue {
        let text = match self {
            Detail::Hit => return const { HeaderValue::from_static("strata; hit") },
            Detail::HitL2 => return const { HeaderValue::from_static("strata; hit; detail=l2") },
            Detail::Bypass => return const { HeaderValue::from_static("strata; fwd=bypass") },
            Detail::Coalesced => {
                return const { HeaderValue::from_static("strata; hit; detail=coalesced") }
            }
            Detail::StaleWhileRevalidate => format!(
                "strata; hit; ttl={}; detail=stale-while-revalidate",
                ttl.unwrap_or(0)
            ),
            Detail::StaleIfError(Some(status)) => format!(
                "strata; fwd=stale; fwd-status={}; ttl={}; detail=stale-if-error",
                status.as_u16(),
                ttl.unwrap_or(0)
            ),
            Detail::StaleIfError(None) => format!(
                "strata; fwd=stale; ttl={}; detail=stale-if-error",
                ttl.unwrap_or(0)
            ),
            Detail::Revalidated { forced: false } => {
                return const { HeaderValue::from_static("strata; fwd=stale; fwd-status=304") }
            }
            Detail::Revalidated { forced: true } => {
                return const { HeaderValue::from_static("strata; fwd=request; fwd-status=304") }
            }
            // Every forwarded answer carries one of these: static, not formatted per request.
            Detail::Miss { stored, fwd } => {
                return match (fwd, stored) {
                    (Fwd::UriMiss, false) => {
                        const { HeaderValue::from_static("strata; fwd=uri-miss") }
                    }
                    (Fwd::UriMiss, true) => {
                        const { HeaderValue::from_static("strata; fwd=uri-miss; stored") }
                    }
                    (Fwd::VaryMiss, false) => {
                        const { HeaderValue::from_static("strata; fwd=vary-miss") }
                    }
                    (Fwd::VaryMiss, true) => {
                        const { HeaderValue::from_static("strata; fwd=vary-miss; stored") }
                    }
                    (Fwd::Stale, false) => const { HeaderValue::from_static("strata; fwd=stale") },
                    (Fwd::Stale, true) => {
                        const { HeaderValue::from_static("strata; fwd=stale; stored") }
                    }
                    (Fwd::Request, false) => {
                        const { HeaderValue::from_static("strata; fwd=request") }
                    }
                    (Fwd::Request, true) => {
                        const { HeaderValue::from_static("strata; fwd=request; stored") }
                    }
                }
            }
        };
        HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static("strata"))
    }
}

/// Adds `X-Cache` and `Cache-Status` to any answer.
pub fn mark(headers: &mut HeaderMap, detail: Detail, ttl: Option<i64>) {
    headers.insert(X_CACHE, x_cache_value(detail.cache_status()));
    // RFC 9211: each cache appends its own member; those of caches nearer the origin stay first.
    headers.append(CACHE_STATUS, detail.header_value(ttl));
}

/// The `X-Cache` value of a status. Constants: `from_static` outside a const context checks every
/// byte on each call.
fn x_cache_value(status: CacheStatus) -> HeaderValue {
    match status {
        CacheStatus::HitL1 => const { HeaderValue::from_static(CacheStatus::HitL1.as_str()) },
        CacheStatus::HitL2 => const { HeaderValue::from_static(CacheStatus::HitL2.as_str()) },
        CacheStatus::Miss => const { HeaderValue::from_static(CacheStatus::Miss.as_str()) },
        CacheStatus::Stale => const { HeaderValue::from_static(CacheStatus::Stale.as_str()) },
        CacheStatus::Revalidated => {
            const { HeaderValue::from_static(CacheStatus::Revalidated.as_str()) }
        }
        CacheStatus::Bypass => const { HeaderValue::from_static(CacheStatus::Bypass.as_str()) },
    }
}

/// Fields a 304 carries (RFC 9110 §15.4.5).
const NOT_MODIFIED_FIELDS: [header::HeaderName; 7] = [
    header::CACHE_CONTROL,
    header::CONTENT_LOCATION,
    header::DATE,
    header::ETAG,
    header::EXPIRES,
    header::VARY,
    header::LAST_MODIFIED,
];

/// An answer from a stored entry: 304 when the client's conditionals match, no body for HEAD.
pub fn from_entry(
    entry: &Entry,
    request: &HeaderMap,
    head: bool,
    now: SystemTime,
    detail: Detail,
) -> Response<ProxyBody> {
    // One pass over the request's field names (a handful, usually) instead of five hashed lookups.
    let (mut conditional, mut ranged, mut preconditioned) = (false, false, false);
    for name in request.keys() {
        conditional |= name == header::IF_NONE_MATCH || name == header::IF_MODIFIED_SINCE;
        ranged |= name == header::RANGE;
        preconditioned |= name == header::IF_MATCH || name == header::IF_UNMODIFIED_SINCE;
    }
    let (status, mut headers, body) = if preconditioned
        && entry.status == StatusCode::OK
        && !preconditions_hold(request, entry.etag.as_ref(), entry.last_modified)
    {
        // What the origin would answer: the client names another version than the stored one.
        let mut headers = HeaderMap::with_capacity(4);
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        (StatusCode::PRECONDITION_FAILED, headers, ProxyBody::empty())
    } else if conditional
        && entry.status == StatusCode::OK
        && not_modified(request, entry.etag.as_ref(), || entry.modified())
    {
        let mut headers = HeaderMap::with_capacity(NOT_MODIFIED_FIELDS.len() + 4);
        for name in NOT_MODIFIED_FIELDS {
            for value in entry.headers.get_all(&name) {
                headers.append(name.clone(), value.clone());
            }
        }
        (StatusCode::NOT_MODIFIED, headers, ProxyBody::empty())
    } else if head {
        (entry.status, entry.headers.clone(), ProxyBody::empty())
    } else {
        let range = if ranged && entry.status == StatusCode::OK {
            let validators = Validators {
                etag: entry.etag.as_ref(),
                last_modified: entry.last_modified,
                date: entry.date(),
            };
            byte_range(request, validators, entry.body.len() as u64)
        } else {
            RangeAnswer::Full
        };
        match range {
            // The stored map has index room for the fields added below (see `Entry::new`).
            RangeAnswer::Full => (
                entry.status,
                entry.headers.clone(),
                ProxyBody::full(entry.body.clone()),
            ),
            RangeAnswer::Part { first, last } => part(entry, first, last),
            RangeAnswer::Unsatisfiable => (
                StatusCode::RANGE_NOT_SATISFIABLE,
                unsatisfiable_range_fields(entry.body.len() as u64),
                ProxyBody::empty(),
            ),
        }
    };
    // One allocation for the value (`HeaderValue::from(u64)` makes two: a buffer, then its shrink).
    let mut age = itoa::Buffer::new();
    if let Ok(value) = HeaderValue::from_bytes(age.format(entry.age(now)).as_bytes()) {
        headers.insert(header::AGE, value);
    }
    headers.append(
        header::VIA,
        const { HeaderValue::from_static("1.1 strata") },
    );
    let ttl = match detail {
        Detail::StaleWhileRevalidate | Detail::StaleIfError(_) => Some(entry.ttl_secs(now)),
        _ => None,
    };
    mark(&mut headers, detail, ttl);
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// The framing of a 206 that carries bytes `first..=last` of a representation of `length` bytes:
/// `Content-Range` and the part's `Content-Length`.
pub fn describe_part(headers: &mut HeaderMap, first: u64, last: u64, length: u64) {
    if let Ok(value) = HeaderValue::try_from(format!("bytes {first}-{last}/{length}")) {
        headers.insert(header::CONTENT_RANGE, value);
    }
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(last - first + 1));
}

/// The fields of a 416 for a representation of `length` bytes (RFC 9110 §15.5.17).
pub fn unsatisfiable_range_fields(length: u64) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(8);
    if let Ok(value) = HeaderValue::try_from(format!("bytes */{length}")) {
        headers.insert(header::CONTENT_RANGE, value);
    }
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    headers
}

/// `206 Partial Content`: bytes `first..=last` of the stored body, shared rather than copied.
fn part(entry: &Entry, first: u64, last: u64) -> (StatusCode, HeaderMap, ProxyBody) {
    let mut headers = entry.headers.clone();
    describe_part(&mut headers, first, last, entry.body.len() as u64);
    // `byte_range` keeps both positions inside the body; `Bytes::slice` would panic otherwise.
    let (first, last) = (
        usize::try_from(first).unwrap_or(usize::MAX),
        usize::try_from(last).unwrap_or(usize::MAX),
    );
    let body = if first <= last && last < entry.body.len() {
        entry.body.slice(first..=last)
    } else {
        bytes::Bytes::new()
    };
    (StatusCode::PARTIAL_CONTENT, headers, ProxyBody::full(body))
}

/// A short plain-text answer (errors and refusals).
pub fn text(status: StatusCode, message: &'static str, detail: Detail) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::from(message));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    mark(headers, detail, None);
    response
}

/// The methods Strata forwards as a matter of course, for `Allow`: other methods reach the origin
/// too (WebDAV's, for example); CONNECT and TRACE never do.
const ALLOWED_METHODS: &str = "GET, HEAD, OPTIONS, POST, PUT, PATCH, DELETE";

/// `405` for a method Strata never forwards, with the `Allow` that RFC 9110 §15.5.6 requires.
pub fn method_not_allowed(message: &'static str) -> Response<ProxyBody> {
    let mut response = text(StatusCode::METHOD_NOT_ALLOWED, message, Detail::Bypass);
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(ALLOWED_METHODS));
    response
}

/// The answer to `OPTIONS` with `Max-Forwards: 0`, which Strata gives as its final recipient
/// (RFC 9110 §9.3.7, §7.6.2).
pub fn options_here() -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::empty());
    let headers = response.headers_mut();
    headers.insert(header::ALLOW, HeaderValue::from_static(ALLOWED_METHODS));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    mark(headers, Detail::Bypass, None);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_answers_name_why_and_whether_they_were_stored() {
        let cases = [
            (Fwd::UriMiss, "uri-miss"),
            (Fwd::VaryMiss, "vary-miss"),
            (Fwd::Stale, "stale"),
            (Fwd::Request, "request"),
        ];
        for (fwd, name) in cases {
            for stored in [false, true] {
                let value = Detail::Miss { stored, fwd }.header_value(None);
                let expected =
                    format!("strata; fwd={name}{}", if stored { "; stored" } else { "" });
                assert_eq!(value.to_str().ok(), Some(expected.as_str()));
            }
        }
    }
}
