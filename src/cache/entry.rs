//! A stored response: immutable and shared (`Arc`), with its freshness instants computed once at
//! store time so a plain hit compares one instant instead of re-running the policy.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;

use super::key::selecting_value;
use super::policy::Lifetime;

/// What one heap allocation costs beyond its bytes (glibc's chunk header and rounding).
const ALLOCATION: usize = 16;
/// A header field in an `http::HeaderMap` beyond its name and value: hash, links, index slot.
const FIELD_BOOKKEEPING: usize = 40;
/// Fields every answer from an entry adds (`Age`, `Via`, `X-Cache`, `Cache-Status`): a stored map
/// has index room for them, so a hit's copy of it takes them without rebuilding its hash index.
const ANSWER_FIELDS: usize = 4;
/// Room a map being built into a stored one needs beyond its fields: `Content-Length`, and the
/// answer's fields.
pub const STORED_MAP_ROOM: usize = 1 + ANSWER_FIELDS;

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
    /// For a response with `Vary`: each selecting header and the request's value of it, normalized
    /// by [`selecting_value`] (no value: the request had no such field).
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
        let headers = stored_headers(headers, body.len());
        Entry::assemble(status, headers, body, response_time, admission)
    }

    /// When this response last changed, as a client's `If-Modified-Since` is compared with it:
    /// `Last-Modified`, else `Date`, else when it was received (RFC 9111 §4.3.2).
    pub fn modified(&self) -> SystemTime {
        self.last_modified
            .or_else(|| self.date())
            .unwrap_or(self.response_time)
    }

    /// The stored `Date`, when it is a valid HTTP date.
    pub fn date(&self) -> Option<SystemTime> {
        http_date(&self.headers, header::DATE)
    }

    /// This response with the header fields an origin's 304 updated (`headers`: RFC 9111 §4.3.4),
    /// to answer one request when the result is not stored again: received `now`, and fresh for
    /// no time (its `Age` is the 304's).
    pub fn revalidated_copy(&self, headers: &HeaderMap, now: SystemTime) -> Entry {
        let initial_age = headers
            .get(header::AGE)
            .and_then(|age| age.to_str().ok())
            .and_then(|age| age.trim().parse::<u64>().ok())
            .map_or(Duration::ZERO, Duration::from_secs);
        let admission = Admission {
            lifetime: Lifetime {
                fresh_until: now,
                stale_while_revalidate_until: now,
                stale_if_error_until: now,
                initial_age,
            },
            never_stale: true,
            honours_max_stale: false,
            variant: self.variant.clone(),
            tags: self.tags.clone(),
        };
        Entry::new(self.status, headers, self.body.clone(), now, admission)
    }

    /// An entry from header fields that were stored before (decoded from L2): no copy of the
    /// values, which the decoder already made into one buffer. `headers` should have room for
    /// [`STORED_MAP_ROOM`] more fields than it holds. The per-answer and framing fields are
    /// dropped and `Content-Length` set to the body's, so even a tampered value frames correctly.
    pub fn from_stored(
        status: StatusCode,
        mut headers: HeaderMap,
        body: Bytes,
        response_time: SystemTime,
        admission: Admission,
    ) -> Entry {
        if headers
            .keys()
            .any(|name| name == header::AGE || name == header::TRANSFER_ENCODING)
        {
            headers.remove(header::AGE);
            headers.remove(header::TRANSFER_ENCODING);
        }
        // Usually the stored length is the body's already: kept, not allocated again.
        let mut digits = itoa::Buffer::new();
        let length = digits.format(body.len());
        let stored_length = headers
            .get_all(header::CONTENT_LENGTH)
            .iter()
            .map(HeaderValue::as_bytes);
        if !stored_length.eq([length.as_bytes()]) {
            if let Ok(value) = HeaderValue::from_str(length) {
                headers.insert(header::CONTENT_LENGTH, value);
            }
        }
        // As in `stored_headers`: the clone keeps the index room, sizes the field list exactly.
        let headers = headers.clone();
        Entry::assemble(status, headers, body, response_time, admission)
    }

    fn assemble(
        status: StatusCode,
        headers: HeaderMap,
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
        let etag = headers.get(header::ETAG).cloned();
        let last_modified = http_date(&headers, header::LAST_MODIFIED);
        let variant_bytes: usize = variant
            .iter()
            .map(|(name, values)| {
                name.as_str().len()
                    + values
                        .iter()
                        .map(|v| v.len() + std::mem::size_of::<HeaderValue>() + ALLOCATION)
                        .sum::<usize>()
                    + std::mem::size_of::<(HeaderName, Vec<HeaderValue>)>()
            })
            .sum();
        let tag_bytes: usize = tags
            .iter()
            .map(|t| t.len() + std::mem::size_of::<String>() + ALLOCATION)
            .sum();
        // What the entry really holds on the heap, so CACHE_SIZE_MB bounds the resident size: with
        // small bodies the map and the bookkeeping weigh as much as the body.
        let weight = std::mem::size_of::<Entry>()
            + 2 * std::mem::size_of::<usize>()
            + ALLOCATION
            + header_footprint(&headers)
            + variant_bytes
            + tag_bytes
            + body.len()
            + ALLOCATION;
        let weight = weight as u64;
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

    /// Whether this variant was stored for a request whose selecting fields match `request`'s
    /// (compared as [`selecting_value`] normalizes them; a stored field with no value was absent).
    pub fn matches_variant(&self, request: &HeaderMap) -> bool {
        self.variant.iter().all(|(name, stored)| {
            match (selecting_value(name, request), stored.as_slice()) {
                (None, []) => true,
                (Some(presented), [stored]) => presented == stored.as_bytes(),
                _ => false,
            }
        })
    }
}

/// A field's value as an HTTP date (`Date`, `Last-Modified`); `None` when absent or not a date.
fn http_date(headers: &HeaderMap, name: HeaderName) -> Option<SystemTime> {
    headers
        .get(name)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| httpdate::parse_http_date(value).ok())
}

/// The stored copy of a response's headers: `Age` (recomputed on every answer) and
/// `Transfer-Encoding` dropped, `Content-Length` set to the body's, every value copied into one
/// shared buffer (hyper's values are slices of a connection's read buffer, which a stored slice
/// would keep alive, unweighed; one buffer is one allocation where a copy per value would be ten).
/// Fields an entry keeps: `Age` is recomputed on every answer, and the framing is the stored body's.
fn kept(name: &HeaderName) -> bool {
    name != header::AGE && name != header::TRANSFER_ENCODING && name != header::CONTENT_LENGTH
}

fn stored_headers(headers: &HeaderMap, body_len: usize) -> HeaderMap {
    let mut buffer = bytes::BytesMut::with_capacity(
        headers
            .iter()
            .filter(|(name, _)| kept(name))
            .map(|(_, value)| value.len())
            .sum(),
    );
    for (_, value) in headers.iter().filter(|(name, _)| kept(name)) {
        buffer.extend_from_slice(value.as_bytes());
    }
    let mut buffer = buffer.freeze();
    let mut stored = HeaderMap::with_capacity(headers.len() + STORED_MAP_ROOM);
    for (name, value) in headers.iter().filter(|(name, _)| kept(name)) {
        let bytes = buffer.split_to(value.len());
        let mut copy =
            HeaderValue::from_maybe_shared(bytes).unwrap_or_else(|_| detach_value(value));
        copy.set_sensitive(value.is_sensitive());
        stored.append(name.clone(), copy);
    }
    stored.insert(header::CONTENT_LENGTH, HeaderValue::from(body_len));
    // A clone keeps the hash index's room but sizes the list of fields exactly: room in the index
    // spares every hit's copy a rehash, room in the list would cost memory in every entry.
    stored.clone()
}

/// Heap bytes of a stored header map: its fields, its index, the shared buffer of values.
fn header_footprint(headers: &HeaderMap) -> usize {
    let per_field =
        std::mem::size_of::<HeaderName>() + std::mem::size_of::<HeaderValue>() + FIELD_BOOKKEEPING;
    let fields: usize = headers
        .iter()
        .map(|(name, value)| per_field + name.as_str().len() + value.len())
        .sum();
    // The index holds 4-byte positions for 4/3 of the usable capacity.
    let index = headers.capacity() * 16 / 3;
    fields + index + 4 * ALLOCATION
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

#[cfg(test)]
mod tests {
    use super::*;

    fn admission() -> Admission {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        Admission {
            lifetime: Lifetime {
                fresh_until: now,
                stale_while_revalidate_until: now,
                stale_if_error_until: now,
                initial_age: Duration::ZERO,
            },
            never_stale: false,
            honours_max_stale: false,
            variant: Vec::new(),
            tags: Vec::new(),
        }
    }

    /// Headers whose values are slices of one "read buffer", as hyper hands them out.
    fn received(fields: &[(&'static str, &str)]) -> (HeaderMap, Bytes) {
        let joined: String = fields.iter().map(|(_, v)| *v).collect();
        let buffer = Bytes::from(joined);
        let mut headers = HeaderMap::new();
        let mut at = 0;
        for (name, value) in fields {
            let slice = buffer.slice(at..at + value.len());
            at += value.len();
            let value = HeaderValue::from_maybe_shared(slice)
                .unwrap_or_else(|_| HeaderValue::from_static("invalid"));
            headers.append(*name, value);
        }
        (headers, buffer)
    }

    #[test]
    fn stored_headers_own_their_bytes_and_drop_per_answer_fields() {
        let (headers, buffer) = received(&[
            ("content-type", "text/plain"),
            ("age", "12"),
            ("transfer-encoding", "chunked"),
            ("set-cookie", "a=1"),
            ("set-cookie", "b=2"),
            ("content-length", "999"),
        ]);
        let entry = Entry::new(
            StatusCode::OK,
            &headers,
            Bytes::from_static(b"hello"),
            SystemTime::UNIX_EPOCH,
            admission(),
        );
        let read_buffer = buffer.as_ptr_range();
        for (name, value) in &entry.headers {
            assert!(
                !read_buffer.contains(&value.as_bytes().as_ptr()),
                "{name} still points into the read buffer"
            );
        }
        assert!(entry.headers.get(header::AGE).is_none());
        assert!(entry.headers.get(header::TRANSFER_ENCODING).is_none());
        assert_eq!(entry.headers[header::CONTENT_LENGTH], "5");
        assert_eq!(entry.headers[header::CONTENT_TYPE], "text/plain");
        let cookies: Vec<_> = entry.headers.get_all(header::SET_COOKIE).iter().collect();
        assert_eq!(cookies, ["a=1", "b=2"], "repeated fields keep their order");
    }

    #[test]
    fn weight_counts_the_header_map_not_just_its_bytes() {
        let body = Bytes::from(vec![0u8; 1024]);
        let (few, _) = received(&[("content-type", "text/plain")]);
        let (many, _) = received(&[
            ("content-type", "text/plain"),
            ("x-a", "1"),
            ("x-b", "2"),
            ("x-c", "3"),
            ("x-d", "4"),
        ]);
        let small = Entry::new(
            StatusCode::OK,
            &few,
            body.clone(),
            SystemTime::UNIX_EPOCH,
            admission(),
        );
        let large = Entry::new(
            StatusCode::OK,
            &many,
            body,
            SystemTime::UNIX_EPOCH,
            admission(),
        );
        let per_field = (large.weight() - small.weight()) / 4;
        assert!(
            per_field as usize
                >= std::mem::size_of::<HeaderName>() + std::mem::size_of::<HeaderValue>(),
            "a field in the map weighs {per_field} bytes"
        );
        assert!(small.weight() as usize > 1024 + std::mem::size_of::<Entry>());
    }
}
