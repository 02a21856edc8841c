//! A stored response: immutable and shared (`Arc`), with its freshness instants computed once at
//! store time so a plain hit compares one instant instead of re-running the policy.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;

use super::policy::Lifetime;

/// Per-entry bookkeeping the weigher adds to the headers and body it counts.
const ENTRY_OVERHEAD: u64 = 256;

#[derive(Debug)]
pub struct Entry {
    pub status: StatusCode,
    /// Response headers as received (repeated fields intact), hop-by-hop fields removed,
    /// `Age` removed (it is recomputed on every answer) and `Content-Length` set to the body's.
    pub headers: HeaderMap,
    pub body: Bytes,
    pub response_time: SystemTime,
    pub lifetime: Lifetime,
    /// must-revalidate / proxy-revalidate / no-cache: never answered stale.
    pub never_stale: bool,
    /// A client's `max-stale` may be honoured (not for `s-maxage`, which implies proxy-revalidate).
    pub honours_max_stale: bool,
    pub etag: Option<HeaderValue>,
    pub last_modified: Option<SystemTime>,
    /// For a response with `Vary`: each selecting header and the values the request had.
    pub variant: Vec<(HeaderName, Vec<HeaderValue>)>,
    /// Surrogate keys (`Surrogate-Key`, `Cache-Tag`): what a tag purge matches.
    pub tags: Vec<String>,
    weight: u64,
}

/// What the RFC 9111 rules decided about a response that may be stored: computed once when its
/// headers arrive, turned into an [`Entry`] when its body is complete.
#[derive(Debug, Clone)]
pub struct Admission {
    pub lifetime: Lifetime,
    pub never_stale: bool,
    pub honours_max_stale: bool,
    pub variant: Vec<(HeaderName, Vec<HeaderValue>)>,
    pub tags: Vec<String>,
}

impl Entry {
    /// Builds an entry. Header values are copied: hyper hands them out as slices of a connection's
    /// read buffer, and a stored slice would keep that whole buffer alive, unweighed. The body is
    /// expected to be detached already (see [`detach_body`]).
    pub fn new(
        status: StatusCode,
        headers: &HeaderMap,
        body: Bytes,
        response_time: SystemTime,
        admission: Admission,
    ) -> Entry {
        let Admission {
            lifetime,
            never_stale,
            honours_max_stale,
            variant,
            tags,
        } = admission;
        let mut headers = detach_headers(headers);
        headers.remove(header::AGE);
        headers.remove(header::TRANSFER_ENCODING);
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        let etag = headers.get(header::ETAG).cloned();
        let last_modified = headers
            .get(header::LAST_MODIFIED)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| httpdate::parse_http_date(v).ok());
        let header_bytes: usize = headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum();
        let weight = ENTRY_OVERHEAD + header_bytes as u64 + body.len() as u64;
        Entry {
            status,
            headers,
            body,
            response_time,
            lifetime,
            never_stale,
            honours_max_stale,
            etag,
            last_modified,
            variant,
            tags,
            weight,
        }
    }

    /// Bytes this entry costs in L1 (headers + body + bookkeeping; the key is added by the tier).
    #[inline]
    pub fn weight(&self) -> u64 {
        self.weight
    }

    #[inline]
    pub fn is_fresh(&self, now: SystemTime) -> bool {
        now < self.lifetime.fresh_until
    }

    /// Inside the stale-while-revalidate window (directive or `CACHE_GRACE`).
    #[inline]
    pub fn may_serve_while_revalidating(&self, now: SystemTime) -> bool {
        !self.never_stale && now < self.lifetime.stale_while_revalidate_until
    }

    /// Inside the stale-if-error window (directive or `CACHE_STALE_IF_ERROR`).
    #[inline]
    pub fn may_serve_on_error(&self, now: SystemTime) -> bool {
        !self.never_stale && now < self.lifetime.stale_if_error_until
    }

    /// No tier needs it once it can be served in no way at all.
    pub fn useless_after(&self) -> SystemTime {
        self.lifetime
            .stale_while_revalidate_until
            .max(self.lifetime.stale_if_error_until)
    }

    /// The `Age` of this response now, in seconds (RFC 9111 §4.2.3).
    pub fn age(&self, now: SystemTime) -> u64 {
        let resident = now.duration_since(self.response_time).unwrap_or_default();
        self.lifetime.initial_age.saturating_add(resident).as_secs()
    }

    /// Seconds of freshness left (`Cache-Status` ttl); negative once stale.
    pub fn ttl_secs(&self, now: SystemTime) -> i64 {
        match self.lifetime.fresh_until.duration_since(now) {
            Ok(left) => i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
            Err(past) => -i64::try_from(past.duration().as_secs()).unwrap_or(i64::MAX),
        }
    }

    /// How long ago it stopped being fresh (zero while fresh).
    pub fn staleness(&self, now: SystemTime) -> Duration {
        now.duration_since(self.lifetime.fresh_until)
            .unwrap_or_default()
    }

    pub fn has_validators(&self) -> bool {
        self.etag.is_some() || self.headers.contains_key(header::LAST_MODIFIED)
    }

    /// A copy that is stale from `now` on, keeping its stale-while-revalidate and stale-if-error
    /// windows (soft purge: marked stale, not removed).
    pub fn expired_at(&self, now: SystemTime) -> Entry {
        let lifetime = &self.lifetime;
        let window = |until: SystemTime| {
            until
                .duration_since(lifetime.fresh_until)
                .unwrap_or_default()
        };
        let fresh_until = lifetime.fresh_until.min(now);
        Entry {
            status: self.status,
            headers: self.headers.clone(),
            body: self.body.clone(),
            response_time: self.response_time,
            lifetime: Lifetime {
                fresh_until,
                stale_while_revalidate_until: fresh_until
                    + window(lifetime.stale_while_revalidate_until),
                stale_if_error_until: fresh_until + window(lifetime.stale_if_error_until),
                initial_age: lifetime.initial_age,
            },
            never_stale: self.never_stale,
            honours_max_stale: self.honours_max_stale,
            etag: self.etag.clone(),
            last_modified: self.last_modified,
            variant: self.variant.clone(),
            tags: self.tags.clone(),
            weight: self.weight,
        }
    }

    /// Whether this variant was stored for a request with the same selecting headers as `request`.
    pub fn matches_variant(&self, request: &HeaderMap) -> bool {
        self.variant.iter().all(|(name, values)| {
            let presented = request.get_all(name);
            presented.iter().eq(values.iter())
        })
    }
}

/// A copy of `headers` that owns its values (see [`Entry::new`]).
pub fn detach_headers(headers: &HeaderMap) -> HeaderMap {
    let mut owned = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        owned.append(name.clone(), detach_value(value));
    }
    owned
}

/// A header value that owns its bytes.
pub fn detach_value(value: &HeaderValue) -> HeaderValue {
    let mut copy = HeaderValue::from_maybe_shared(Bytes::copy_from_slice(value.as_bytes()))
        .unwrap_or_else(|_| value.clone());
    copy.set_sensitive(value.is_sensitive());
    copy
}

/// One owned allocation for a body received as chunks that are slices of read buffers.
pub fn detach_body(chunks: Vec<Bytes>, size: usize) -> Bytes {
    let mut joined = bytes::BytesMut::with_capacity(size);
    for chunk in chunks {
        joined.extend_from_slice(&chunk);
    }
    joined.freeze()
}
