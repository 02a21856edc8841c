//! The ceiling: answers /1k and /100k with the benchmark bodies straight from memory (`Bytes`
//! clones, no copy), on the same hyper/hyper-util/tokio server setup as Strata. Nothing a caching
//! proxy built on this stack can do is cheaper.
//!   strata-ceiling 127.0.0.1:18003

use std::sync::Arc;

use strata_bench_servers::{body, listen_addr, response, serve, Scheduler};

fn main() {
    let small = body(1024);
    let large = body(100 * 1024);
    let bodies = Arc::new((small, large));
    serve(listen_addr(), Scheduler::LikeStrata, move |request| {
        let bodies = bodies.clone();
        async move {
            match request.uri().path() {
                "/1k" => response(200, "public, max-age=3600", bodies.0.clone()),
                "/100k" => response(200, "public, max-age=3600", bodies.1.clone()),
                _ => response(404, "no-store", bytes::Bytes::new()),
            }
        }
    });
}
