//! Microbenchmarks of the hit path and the L2 codec: cache-key building, the fresh-hit decision,
//! the answer built from a stored entry, `Vary` variant selection, entry encode/decode with and without zstd, L1 lookups
//! from two threads, and a purge's scan of L1.
//!
//! `cargo bench --bench hot_path`. Absolute numbers depend on the machine; compare runs of one build
//! against another on the same machine.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http::{HeaderMap, HeaderValue, StatusCode, Uri};
use strata::cache::codec;
use strata::cache::entry::{Admission, Entry};
use strata::cache::key::{cache_key, request_host, selecting_value, variant_key};
use strata::cache::l1::{Slot, L1};
use strata::cache::policy::{needs_full_evaluation, Lifetime};
use strata::proxy::respond::{from_entry, Detail};

fn entry(body: Bytes) -> Arc<Entry> {
    entry_varying(body, Vec::new())
}

fn entry_varying(body: Bytes, variant: Vec<(http::HeaderName, Vec<HeaderValue>)>) -> Arc<Entry> {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    headers.insert(
        "cache-control",
        HeaderValue::from_static("public, max-age=3600"),
    );
    headers.insert("etag", HeaderValue::from_static("\"0123456789abcdef\""));
    headers.insert(
        "date",
        HeaderValue::from_static("Tue, 24 Nov 2026 10:00:00 GMT"),
    );
    let now = SystemTime::now();
    let admission = Admission {
        lifetime: Lifetime {
            fresh_until: now + Duration::from_secs(3600),
            stale_while_revalidate_until: now + Duration::from_secs(3660),
            stale_if_error_until: now + Duration::from_secs(7200),
            initial_age: Duration::ZERO,
        },
        never_stale: false,
        honours_max_stale: true,
        variant,
        tags: vec!["product-42".into()],
    };
    Arc::new(Entry::new(StatusCode::OK, &headers, body, now, admission))
}

fn key_building(c: &mut Criterion) {
    let uri: Uri = "/api/v1/products/42?color=red&size=m".parse().unwrap();
    let mut headers = HeaderMap::new();
    headers.insert("host", HeaderValue::from_static("Shop.Example.com"));
    headers.insert("accept", HeaderValue::from_static("application/json"));
    c.bench_function("cache_key: host + path + query", |b| {
        b.iter(|| {
            let host = request_host(black_box(&uri), black_box(&headers)).unwrap();
            black_box(cache_key(host, &uri))
        })
    });
}

fn fresh_hit_decision(c: &mut Criterion) {
    let entry = entry(Bytes::from_static(b"{}"));
    let mut plain = HeaderMap::new();
    plain.insert("host", HeaderValue::from_static("shop.example.com"));
    plain.insert("accept", HeaderValue::from_static("*/*"));
    c.bench_function("fresh-hit decision (plain request)", |b| {
        b.iter(|| {
            let now = SystemTime::now();
            black_box(!needs_full_evaluation(black_box(&plain)) && entry.is_fresh(now))
        })
    });
}

fn hit_answer(c: &mut Criterion) {
    let entry = entry(Bytes::from_static(b"{}"));
    let mut plain = HeaderMap::new();
    plain.insert("host", HeaderValue::from_static("shop.example.com"));
    plain.insert("accept", HeaderValue::from_static("*/*"));
    let now = SystemTime::now();
    c.bench_function("hit answer: response from a stored entry", |b| {
        b.iter(|| {
            black_box(from_entry(
                black_box(&entry),
                black_box(&plain),
                false,
                now,
                Detail::Hit,
            ))
        })
    });
}

fn vary_selection(c: &mut Criterion) {
    let mut request = HeaderMap::new();
    request.insert("host", HeaderValue::from_static("shop.example.com"));
    request.insert(
        "accept-encoding",
        HeaderValue::from_static("gzip, deflate, br, zstd"),
    );
    let names = [http::header::ACCEPT_ENCODING];
    let stored = selecting_value(&names[0], &request)
        .and_then(|value| HeaderValue::from_bytes(&value).ok())
        .unwrap();
    let entry = entry_varying(
        Bytes::from_static(b"{}"),
        vec![(names[0].clone(), vec![stored])],
    );
    c.bench_function(
        "Vary hit: variant key + match (browser Accept-Encoding)",
        |b| {
            b.iter(|| {
                let key = variant_key("shop.example.com/p/42", 7, &names, black_box(&request));
                black_box((key, entry.matches_variant(black_box(&request))))
            })
        },
    );
}

fn codec_round_trips(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec");
    for (name, body) in [
        (
            "1KiB incompressible",
            Bytes::from(
                (0..1024u32)
                    .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                    .collect::<Vec<_>>(),
            ),
        ),
        (
            "100KiB json-like (zstd)",
            Bytes::from("{\"id\":42,\"name\":\"widget\",\"tags\":[\"a\",\"b\"]},".repeat(2300)),
        ),
    ] {
        let slot = Slot::Entry(entry(body.clone()));
        let encoded = codec::encode(&slot);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function(format!("encode {name}"), |b| {
            b.iter(|| black_box(codec::encode(black_box(&slot))))
        });
        group.bench_function(format!("decode {name}"), |b| {
            b.iter(|| black_box(codec::decode(black_box(&encoded), 8 << 20).unwrap()))
        });
    }
    group.finish();
}

fn l1_get_from_two_threads(c: &mut Criterion) {
    let l1 = Arc::new(L1::new(256 << 20, 8 << 20));
    let keys: Vec<String> = (0..10_000)
        .map(|i| format!("shop.example.com/products/{i}"))
        .collect();
    for key in &keys {
        l1.insert(
            key.clone(),
            Slot::Entry(entry(Bytes::from_static(&[b'x'; 1024]))),
        );
    }
    let keys = Arc::new(keys);
    c.bench_function("L1 get, 2 threads, 10k hot keys (per pair of gets)", |b| {
        b.iter_custom(|iterations| {
            let started = std::time::Instant::now();
            let workers: Vec<_> = (0..2)
                .map(|t| {
                    let (l1, keys) = (l1.clone(), keys.clone());
                    std::thread::spawn(move || {
                        for i in 0..iterations as usize {
                            black_box(l1.get(&keys[(i * 7 + t) % keys.len()]));
                        }
                    })
                })
                .collect();
            for worker in workers {
                worker.join().unwrap();
            }
            started.elapsed()
        })
    });
}

/// A tag or pattern purge scans L1 in place; 200k entries, none of which match, so the scan is
/// measured again and again on the same contents.
fn l1_purge_scan(c: &mut Criterion) {
    let l1 = L1::new(1 << 30, 8 << 20);
    let shared = entry(Bytes::from_static(&[b'x'; 1024]));
    for i in 0..200_000 {
        l1.insert(
            format!("shop.example.com/products/{i}"),
            Slot::Entry(shared.clone()),
        );
    }
    let mut group = c.benchmark_group("L1 purge scan");
    group.sample_size(10);
    group.bench_function("200k entries, tag matches none", |b| {
        b.iter(|| {
            black_box(l1.remove_where(
                |_, slot| matches!(slot, Slot::Entry(e) if e.tags.iter().any(|t| t == "absent")),
            ))
        })
    });
    group.finish();
}

criterion_group!(
    benches,
    key_building,
    fresh_hit_decision,
    hit_answer,
    vary_selection,
    codec_round_trips,
    l1_get_from_two_threads,
    l1_purge_scan
);
criterion_main!(benches);
