//! The stored form of L2 values: one versioned, compact binary encoding (serde + postcard), zstd
//! compressed when that actually saves space.
//!
//! Layout: `ST` (magic), a version byte, a flags byte, then the postcard payload (compressed when
//! flag bit 0 is set). Anything else — garbage, truncation, another version, a payload that inflates
//! past the limit — is [`CodecError`]: the caller treats it as a miss and deletes it. Never a panic.
//!
//! What is stored: status, the header list as received (repeated fields intact), body, the
//! precomputed freshness instants (wall-clock milliseconds, valid across instances), the stale rules,
//! and the Vary selection. Not stored: the request that produced the response (it may carry a
//! client's Authorization or Cookie).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;
use serde::{Deserialize, Serialize};

use super::entry::{Admission, Entry, STORED_MAP_ROOM};
use super::l1::{Slot, VaryRecord};
use super::policy::Lifetime;

const MAGIC: [u8; 2] = *b"ST";
/// 2: entries carry their surrogate keys.
const VERSION: u8 = 2;
/// Header fields (and Vary names) an entry read from Redis may have.
const MAX_STORED_FIELDS: usize = 4096;
const FLAG_ZSTD: u8 = 1;
/// Payloads smaller than this are not worth a compression attempt.
const COMPRESS_ABOVE: usize = 1024;
const ZSTD_LEVEL: i32 = 3;
/// Room for headers and bookkeeping above the largest body when bounding decompression.
const HEADER_ALLOWANCE: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("not a Strata entry (bad magic or too short)")]
    Magic,
    #[error("entry format version {0} is not understood")]
    Version(u8),
    #[error("entry payload is corrupt")]
    Payload,
    #[error("entry is larger than the configured limit")]
    TooLarge,
}

/// What [`encode`] writes ([`StoredRef`] reads it back).
#[derive(Serialize)]
enum Stored {
    Entry(StoredEntry),
    Vary { names: Vec<String>, nonce: u64 },
    Pass { until_ms: u64 },
}

#[derive(Serialize)]
struct StoredEntry {
    status: u16,
    headers: Vec<(String, Bytes)>,
    body: Bytes,
    response_time_ms: u64,
    fresh_until_ms: u64,
    stale_while_revalidate_until_ms: u64,
    stale_if_error_until_ms: u64,
    initial_age_ms: u64,
    never_stale: bool,
    honours_max_stale: bool,
    variant: Vec<(String, Vec<Bytes>)>,
    tags: Vec<String>,
}

/// [`Stored`] as decoding reads it: borrowed from the payload, so no field is allocated on its own
/// (an L2 hit used to allocate every header name and value twice).
#[derive(Deserialize)]
enum StoredRef<'a> {
    Entry(#[serde(borrow)] StoredEntryRef<'a>),
    Vary {
        #[serde(borrow)]
        names: Vec<&'a str>,
        nonce: u64,
    },
    Pass {
        until_ms: u64,
    },
}

/// [`StoredEntry`], borrowed; same fields in the same order (postcard encodes no names).
#[derive(Deserialize)]
struct StoredEntryRef<'a> {
    status: u16,
    #[serde(borrow)]
    headers: Vec<(&'a str, &'a [u8])>,
    body: &'a [u8],
    response_time_ms: u64,
    fresh_until_ms: u64,
    stale_while_revalidate_until_ms: u64,
    stale_if_error_until_ms: u64,
    initial_age_ms: u64,
    never_stale: bool,
    honours_max_stale: bool,
    #[serde(borrow)]
    variant: Vec<(&'a str, Vec<&'a [u8]>)>,
    tags: Vec<String>,
}

thread_local! {
    // A zstd context holds megabytes of tables: building one per call cost more than compressing a
    // small entry. One per thread, reused (the codec runs on runtime and blocking-pool threads).
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

fn compress(payload: &[u8]) -> Option<Vec<u8>> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.try_borrow_mut().ok()?;
        if slot.is_none() {
            *slot = zstd::bulk::Compressor::new(ZSTD_LEVEL).ok();
        }
        slot.as_mut()?.compress(payload).ok()
    })
}

fn decompress(data: &[u8], limit: usize) -> Option<Vec<u8>> {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.try_borrow_mut().ok()?;
        if slot.is_none() {
            *slot = zstd::bulk::Decompressor::new().ok();
        }
        slot.as_mut()?.decompress(data, limit).ok()
    })
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn instant(ms: u64) -> SystemTime {
    UNIX_EPOCH
        .checked_add(Duration::from_millis(ms))
        .unwrap_or(UNIX_EPOCH)
}

fn value_bytes(value: &HeaderValue) -> Bytes {
    Bytes::copy_from_slice(value.as_bytes())
}

/// Encodes a slot for Redis.
pub fn encode(slot: &Slot) -> Vec<u8> {
    let stored = match slot {
        Slot::Pass(until) => Stored::Pass {
            until_ms: millis(*until),
        },
        Slot::Vary(record) => Stored::Vary {
            names: record.names.iter().map(|n| n.as_str().to_owned()).collect(),
            nonce: record.nonce,
        },
        Slot::Entry(entry) => Stored::Entry(StoredEntry {
            status: entry.status.as_u16(),
            headers: entry
                .headers
                .iter()
                .map(|(name, value)| (name.as_str().to_owned(), value_bytes(value)))
                .collect(),
            body: entry.body.clone(),
            response_time_ms: millis(entry.response_time),
            fresh_until_ms: millis(entry.lifetime.fresh_until),
            stale_while_revalidate_until_ms: millis(entry.lifetime.stale_while_revalidate_until),
            stale_if_error_until_ms: millis(entry.lifetime.stale_if_error_until),
            initial_age_ms: u64::try_from(entry.lifetime.initial_age.as_millis())
                .unwrap_or(u64::MAX),
            never_stale: entry.never_stale,
            honours_max_stale: entry.honours_max_stale,
            variant: entry
                .variant
                .iter()
                .map(|(name, values)| {
                    (
                        name.as_str().to_owned(),
                        values.iter().map(value_bytes).collect(),
                    )
                })
                .collect(),
            tags: entry.tags.clone(),
        }),
    };
    // Serialising plain data into a Vec cannot fail; an empty payload would decode as corrupt.
    let payload = postcard::to_allocvec(&stored).unwrap_or_default();
    let mut out = Vec::with_capacity(payload.len() + 4);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    if payload.len() > COMPRESS_ABOVE {
        if let Some(compressed) = compress(&payload) {
            if compressed.len() < payload.len() {
                out.push(FLAG_ZSTD);
                out.extend_from_slice(&compressed);
                return out;
            }
        }
    }
    out.push(0);
    out.extend_from_slice(&payload);
    out
}

/// Decodes a Redis value; `max_body` bounds what a compressed payload may inflate to.
pub fn decode(bytes: &[u8], max_body: u64) -> Result<Slot, CodecError> {
    if bytes.len() < 4 || bytes[..2] != MAGIC {
        return Err(CodecError::Magic);
    }
    if bytes[2] != VERSION {
        return Err(CodecError::Version(bytes[2]));
    }
    let flags = bytes[3];
    let body = &bytes[4..];
    let limit = usize::try_from(max_body)
        .unwrap_or(usize::MAX)
        .saturating_add(HEADER_ALLOWANCE);
    let inflated;
    let payload = if flags & FLAG_ZSTD != 0 {
        inflated = decompress(body, limit).ok_or(CodecError::TooLarge)?;
        &inflated[..]
    } else if flags == 0 {
        body
    } else {
        return Err(CodecError::Payload);
    };
    let stored: StoredRef<'_> = postcard::from_bytes(payload).map_err(|_| CodecError::Payload)?;
    match stored {
        StoredRef::Pass { until_ms } => Ok(Slot::Pass(instant(until_ms))),
        StoredRef::Vary { names, nonce } => {
            let names = names
                .iter()
                .map(|n| HeaderName::from_bytes(n.as_bytes()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| CodecError::Payload)?;
            Ok(Slot::Vary(std::sync::Arc::new(VaryRecord { names, nonce })))
        }
        StoredRef::Entry(e) => {
            if e.body.len() as u64 > max_body {
                return Err(CodecError::TooLarge);
            }
            // http's HeaderMap panics past ~24,000 fields; what Strata stores has at most what
            // the origin client accepts (about a hundred), so more is a value not written by us.
            if e.headers.len() > MAX_STORED_FIELDS || e.variant.len() > MAX_STORED_FIELDS {
                return Err(CodecError::Payload);
            }
            let status = StatusCode::from_u16(e.status).map_err(|_| CodecError::Payload)?;
            // The values in one buffer: one allocation, and an entry that owns exactly its bytes.
            let mut values =
                BytesMut::with_capacity(e.headers.iter().map(|(_, value)| value.len()).sum());
            for (_, value) in &e.headers {
                values.extend_from_slice(value);
            }
            let mut values = values.freeze();
            let mut headers = HeaderMap::with_capacity(e.headers.len() + STORED_MAP_ROOM);
            for (name, value) in &e.headers {
                let name =
                    HeaderName::from_bytes(name.as_bytes()).map_err(|_| CodecError::Payload)?;
                let value = HeaderValue::from_maybe_shared(values.split_to(value.len()))
                    .map_err(|_| CodecError::Payload)?;
                headers.append(name, value);
            }
            let mut variant = Vec::with_capacity(e.variant.len());
            for (name, values) in e.variant {
                let name =
                    HeaderName::from_bytes(name.as_bytes()).map_err(|_| CodecError::Payload)?;
                let values = values
                    .into_iter()
                    .map(HeaderValue::from_bytes)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|_| CodecError::Payload)?;
                variant.push((name, values));
            }
            let admission = Admission {
                lifetime: Lifetime {
                    fresh_until: instant(e.fresh_until_ms),
                    stale_while_revalidate_until: instant(e.stale_while_revalidate_until_ms),
                    stale_if_error_until: instant(e.stale_if_error_until_ms),
                    initial_age: Duration::from_millis(e.initial_age_ms),
                },
                never_stale: e.never_stale,
                honours_max_stale: e.honours_max_stale,
                variant,
                tags: e.tags,
            };
            let entry = Entry::from_stored(
                status,
                headers,
                Bytes::copy_from_slice(e.body),
                instant(e.response_time_ms),
                admission,
            );
            Ok(Slot::Entry(std::sync::Arc::new(entry)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn sample(body: Bytes) -> Slot {
        let mut headers = HeaderMap::new();
        headers.append("set-cookie", HeaderValue::from_static("a=1"));
        headers.append("set-cookie", HeaderValue::from_static("b=2"));
        headers.insert("etag", HeaderValue::from_static("\"v1\""));
        let now = SystemTime::now();
        let admission = Admission {
            lifetime: Lifetime {
                fresh_until: now + Duration::from_secs(60),
                stale_while_revalidate_until: now + Duration::from_secs(90),
                stale_if_error_until: now + Duration::from_secs(600),
                initial_age: Duration::from_secs(3),
            },
            never_stale: false,
            honours_max_stale: true,
            variant: vec![(
                http::header::ACCEPT_ENCODING,
                vec![HeaderValue::from_static("gzip")],
            )],
            tags: vec!["product-1".into(), "home".into()],
        };
        Slot::Entry(Arc::new(Entry::new(
            StatusCode::OK,
            &headers,
            body,
            now,
            admission,
        )))
    }

    fn entry(slot: Result<Slot, CodecError>) -> Arc<Entry> {
        match slot {
            Ok(Slot::Entry(entry)) => entry,
            other => panic!("not an entry: {:?}", other.err()),
        }
    }

    #[test]
    fn round_trip_keeps_repeated_headers_and_instants() {
        let original = sample(Bytes::from_static(b"hello"));
        let decoded = entry(decode(&encode(&original), 1024));
        let Slot::Entry(original) = original else {
            return;
        };
        assert_eq!(decoded.headers.get_all("set-cookie").iter().count(), 2);
        assert_eq!(decoded.body, original.body);
        assert_eq!(
            millis(decoded.lifetime.fresh_until),
            millis(original.lifetime.fresh_until)
        );
        assert_eq!(decoded.variant, original.variant);
        assert_eq!(decoded.tags, original.tags);
        assert_eq!(decoded.etag, original.etag);
    }

    #[test]
    fn large_repetitive_bodies_are_compressed() {
        let body = Bytes::from(vec![b'a'; 64 * 1024]);
        let encoded = encode(&sample(body.clone()));
        assert_eq!(encoded[3], FLAG_ZSTD);
        assert!(encoded.len() < 4096);
        assert_eq!(entry(decode(&encoded, 1024 * 1024)).body, body);
        // A bomb: the same payload may not inflate past the limit.
        assert_eq!(decode(&encoded, 1024).err(), Some(CodecError::TooLarge));
    }

    #[test]
    fn corrupt_values_are_errors_not_panics() {
        let good = encode(&sample(Bytes::from_static(b"hello")));
        assert_eq!(decode(b"garbage", 1024).err(), Some(CodecError::Magic));
        assert_eq!(decode(b"ST", 1024).err(), Some(CodecError::Magic));
        assert_eq!(
            decode(b"ST\x09\x00abc", 1024).err(),
            Some(CodecError::Version(9))
        );
        for cut in 4..good.len() {
            assert!(decode(&good[..cut], 1024).is_err(), "truncated at {cut}");
        }
        let mut flipped = good.clone();
        flipped[3] = 7;
        assert!(decode(&flipped, 1024).is_err());
    }

    /// A Redis value holding an entry with these header fields and the body `hello`, framed as
    /// [`encode`] frames it but built field by field, as something other than Strata could.
    fn written_elsewhere(headers: Vec<(String, Bytes)>) -> Vec<u8> {
        let stored = Stored::Entry(StoredEntry {
            status: 200,
            headers,
            body: Bytes::from_static(b"hello"),
            response_time_ms: 0,
            fresh_until_ms: 0,
            stale_while_revalidate_until_ms: 0,
            stale_if_error_until_ms: 0,
            initial_age_ms: 0,
            never_stale: false,
            honours_max_stale: false,
            variant: Vec::new(),
            tags: Vec::new(),
        });
        let mut value = MAGIC.to_vec();
        value.extend_from_slice(&[VERSION, 0]);
        value.extend(postcard::to_allocvec(&stored).unwrap_or_default());
        value
    }

    /// A value with more header fields than an HTTP map can hold is corrupt, not a panic.
    #[test]
    fn too_many_fields_are_corrupt() {
        let value = written_elsewhere(vec![("x-a".to_string(), Bytes::new()); 30_000]);
        assert_eq!(decode(&value, 1024).err(), Some(CodecError::Payload));
    }

    /// A value written by something else (or tampered with) cannot make an answer's framing lie.
    #[test]
    fn decoded_entries_are_framed_by_their_body() {
        let field =
            |name: &str, value: &'static [u8]| (name.to_string(), Bytes::from_static(value));
        let value = written_elsewhere(vec![
            field("content-length", b"999"),
            field("transfer-encoding", b"chunked"),
            field("age", b"77"),
            field("content-type", b"text/plain"),
        ]);
        let Ok(Slot::Entry(entry)) = decode(&value, 1024) else {
            panic!("not decoded as an entry");
        };
        assert_eq!(entry.headers[http::header::CONTENT_LENGTH], "5");
        assert_eq!(entry.headers[http::header::CONTENT_TYPE], "text/plain");
        assert!(entry.headers.get(http::header::TRANSFER_ENCODING).is_none());
        assert!(entry.headers.get(http::header::AGE).is_none());
        assert_eq!(entry.body, "hello");
    }
}
