//! The benchmark origin.
//!   /1k, /100k     1 KiB / 100 KiB, `Cache-Control: public, max-age=3600`
//!   /pass          1 KiB, `Cache-Control: no-store` (uncacheable)
//!   /cold?...      1 KiB, cacheable, answered after 100 ms (the stampede target)
//!   /_count?<path> how many requests the origin got for <path> (e.g. `/_count?/cold?n=x`), as text
//!   strata-origin 127.0.0.1:18000

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use strata_bench_servers::{body, listen_addr, response, serve, Scheduler};

#[derive(Default)]
struct Counts {
    small: AtomicU64,
    large: AtomicU64,
    pass: AtomicU64,
    cold: Mutex<HashMap<String, u64>>,
}

fn main() {
    let small = body(1024);
    let large = body(100 * 1024);
    let counts = Arc::new(Counts::default());
    serve(listen_addr(), Scheduler::MultiThread, move |request| {
        let counts = counts.clone();
        let (small, large) = (small.clone(), large.clone());
        async move {
            let uri = request.uri();
            match uri.path() {
                "/1k" => {
                    counts.small.fetch_add(1, Ordering::Relaxed);
                    response(200, "public, max-age=3600", small)
                }
                "/100k" => {
                    counts.large.fetch_add(1, Ordering::Relaxed);
                    response(200, "public, max-age=3600", large)
                }
                "/pass" => {
                    counts.pass.fetch_add(1, Ordering::Relaxed);
                    response(200, "no-store", small)
                }
                "/cold" => {
                    let key = uri
                        .path_and_query()
                        .map_or("/cold", |pq| pq.as_str())
                        .to_owned();
                    *counts.cold.lock().expect("lock").entry(key).or_default() += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    response(200, "public, max-age=3600", small)
                }
                "/_count" => {
                    let target = uri.query().unwrap_or("");
                    let n = match target {
                        "/1k" => counts.small.load(Ordering::Relaxed),
                        "/100k" => counts.large.load(Ordering::Relaxed),
                        "/pass" => counts.pass.load(Ordering::Relaxed),
                        other => *counts.cold.lock().expect("lock").get(other).unwrap_or(&0),
                    };
                    response(200, "no-store", Bytes::from(format!("{n}\n")))
                }
                _ => response(404, "no-store", Bytes::new()),
            }
        }
    });
}
