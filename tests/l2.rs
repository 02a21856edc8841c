//! Redis L2: instances sharing one real redis-server (entries, TTLs, key prefix, durability,
//! cross-instance coalescing and refresh, Vary), and Redis as an accelerator that never fails a
//! request (killed under load, unreachable at start-up, corrupt entries).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::fleet::*;
use support::redis::RedisServer;
use support::*;
use tokio::sync::Notify;

fn pttl(redis: &RedisServer, key: &str) -> i64 {
    let out = redis.cli(&["pttl", key]);
    out.parse()
        .unwrap_or_else(|_| panic!("PTTL {key}: {out:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_instance_hits_l2_then_l1() {
    let redis = RedisServer::start();
    let body = pattern(100 * 1024);
    let origin = {
        let body = body.clone();
        MockOrigin::start(move |_| {
            Reply::ok(body.clone())
                .cc("max-age=60")
                .header("x-multi", "one")
                .header("x-multi", "two")
        })
        .await
    };
    let a = instance(&origin, &redis, &[]).await;
    let b = instance(&origin, &redis, &[]).await;

    let r = sget(&a, "/shared").await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (200, "MISS"));
    assert!(r.body == body);
    flush_l2(&a).await;
    assert!(a.stats().l2_writes >= 1, "{:?}", a.stats());

    let key = entry_key("/shared");
    assert_eq!(
        redis.cli(&["exists", &key]),
        "1",
        "keys: {:?}",
        redis.keys()
    );
    assert_eq!(
        redis.cli(&["getrange", &key, "0", "1"]),
        "ST",
        "entry format"
    );

    // B's clock runs 10 s ahead: the Age of the L2 copy counts from A's fill, not from B's read.
    b.advance(secs(10));
    let r = sget(&b, "/shared").await;
    assert_eq!(
        (r.status.as_u16(), r.x_cache()),
        (200, "HIT-L2"),
        "{:?}",
        r.headers
    );
    assert!(r.body == body, "L2 copy has a different body");
    assert!(
        r.cache_status().starts_with("strata; "),
        "Cache-Status {:?}",
        r.cache_status()
    );
    assert!((10..60).contains(&r.age()), "Age {}", r.age());
    assert_eq!(r.header("cache-control"), Some("max-age=60"));
    assert_eq!(r.all("x-multi"), ["one", "two"], "repeated headers");

    let r = sget(&b, "/shared").await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (200, "HIT-L1"));
    assert!(r.body == body);
    assert_eq!(origin.hits("/shared"), 1);
    assert!(b.stats().l2_hits >= 1, "{:?}", b.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l2_ttl_is_the_whole_servable_lifetime() {
    let redis = RedisServer::start();
    let origin = MockOrigin::start(|r| match r.path.as_str() {
        "/ttl-plain" => Reply::ok("plain").cc("max-age=60"),
        "/ttl-directives" => {
            Reply::ok("directives").cc("max-age=30, stale-while-revalidate=20, stale-if-error=40")
        }
        _ => Reply::ok("config").cc("max-age=10"),
    })
    .await;
    let a = instance(&origin, &redis, &[]).await;
    let b = instance(
        &origin,
        &redis,
        &[("CACHE_GRACE", "15s"), ("CACHE_STALE_IF_ERROR", "25s")],
    )
    .await;
    expect(&sget(&a, "/ttl-plain").await, "MISS", "plain");
    expect(&sget(&a, "/ttl-directives").await, "MISS", "directives");
    expect(&sget(&b, "/ttl-config").await, "MISS", "config");
    flush_l2(&a).await;
    flush_l2(&b).await;

    // Fresh only: 60 s.
    let ttl = pttl(&redis, &entry_key("/ttl-plain"));
    assert!((55_000..=60_000).contains(&ttl), "max-age=60: PTTL {ttl}");
    // Servable until 30 s fresh + 40 s stale-if-error at least, and never past 30 + 20 + 40.
    let ttl = pttl(&redis, &entry_key("/ttl-directives"));
    assert!(
        (65_000..=90_000).contains(&ttl),
        "max-age=30, swr=20, sie=40: PTTL {ttl}"
    );
    // Same with the proxy-wide windows: 10 s fresh + 25 s stale-if-error .. 10 + 15 + 25.
    let ttl = pttl(&redis, &entry_key("/ttl-config"));
    assert!(
        (30_000..=50_000).contains(&ttl),
        "max-age=10, CACHE_GRACE=15s, CACHE_STALE_IF_ERROR=25s: PTTL {ttl}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_prefix_is_honoured() {
    let redis = RedisServer::start();
    let origin = MockOrigin::fixed("prefixed", "max-age=60").await;
    let a = instance(&origin, &redis, &[("REDIS_KEY_PREFIX", "custom:")]).await;
    expect(&sget(&a, "/prefixed").await, "MISS", "prefixed");
    flush_l2(&a).await;

    let keys = redis.keys();
    assert!(
        keys.contains(&format!("custom:e:{HOST}/prefixed")),
        "keys: {keys:?}"
    );
    assert!(
        keys.iter().all(|k| k.starts_with("custom:")),
        "a key outside the prefix: {keys:?}"
    );

    let b = instance(&origin, &redis, &[("REDIS_KEY_PREFIX", "custom:")]).await;
    expect(&sget(&b, "/prefixed").await, "HIT-L2", "prefixed");
    // Another prefix is another cache.
    let c = instance(&origin, &redis, &[]).await;
    expect(&sget(&c, "/prefixed").await, "MISS", "prefixed");
    assert_eq!(origin.hits("/prefixed"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_outlive_instances_and_redis_restarts() {
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let origin =
        MockOrigin::start(|r| Reply::ok(format!("body of {}", r.path)).cc("max-age=300")).await;

    let a = instance(&origin, &redis, &[]).await;
    expect(&sget(&a, "/durable").await, "MISS", "body of /durable");
    flush_l2(&a).await;
    a.shutdown().await.unwrap();

    // A restarted instance (fresh L1) answers from L2.
    let b = instance(&origin, &redis, &[]).await;
    expect(&sget(&b, "/durable").await, "HIT-L2", "body of /durable");

    // An instance connected before Redis restarts finds it again once Redis is back.
    let c = instance(&origin, &redis, &[]).await;
    redis.kill();
    redis.restart();
    assert_eq!(
        redis.cli(&["exists", &entry_key("/durable")]),
        "1",
        "the AOF kept the entry"
    );
    let deadline = Instant::now() + secs(10);
    for n in 0.. {
        let path = format!("/probe-{n}");
        let r = sget(&b, &path).await;
        assert_eq!(r.status, 200, "{path} on B");
        flush_l2(&b).await;
        let r = sget(&c, &path).await;
        assert_eq!(r.status, 200, "{path} on C");
        if r.x_cache() == "HIT-L2" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "C never used L2 again after the Redis restart: {:?}",
            c.stats()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    expect(&sget(&c, "/durable").await, "HIT-L2", "body of /durable");
    assert_eq!(origin.hits("/durable"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_requests_over_two_instances_reach_the_origin_once() {
    let redis = RedisServer::start();
    let body = pattern(32 * 1024);
    let origin = {
        let body = body.clone();
        MockOrigin::start(move |_| {
            Reply::ok(body.clone())
                .cc("max-age=60")
                .delay(Duration::from_millis(300))
        })
        .await
    };
    let a = instance(&origin, &redis, &[]).await;
    let b = instance(&origin, &redis, &[]).await;
    let urls: [Arc<str>; 2] = [a.url("/cold").into(), b.url("/cold").into()];

    let tasks: Vec<_> = (0..60)
        .map(|i| {
            let url = urls[i % 2].clone();
            tokio::spawn(async move { get(&url, &[("host", HOST)]).await })
        })
        .collect();
    let mut misses = 0;
    let mut labels = Vec::new();
    for t in tasks {
        let r = within("concurrent GET", secs(20), t).await.unwrap();
        assert_eq!(r.status, 200);
        assert!(r.body == body, "a client got a different body");
        match r.x_cache() {
            "MISS" => misses += 1,
            "HIT-L1" | "HIT-L2" => {}
            other => panic!("unexpected X-Cache {other:?}"),
        }
        labels.push(r.x_cache().to_string());
    }
    assert_eq!(
        origin.hits("/cold"),
        1,
        "the fleet must reach the origin once; X-Cache: {labels:?}"
    );
    assert_eq!(misses, 1, "one request fetched; X-Cache: {labels:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_key_is_refreshed_once_for_the_fleet() {
    let redis = RedisServer::start();
    let origin = MockOrigin::start(|r| {
        if r.hit == 1 {
            Reply::ok("v1").cc("max-age=1, stale-while-revalidate=60")
        } else {
            // Long-lived, so the refreshed copy cannot itself go stale while the test polls.
            Reply::ok("v2")
                .cc("max-age=300, stale-while-revalidate=60")
                .delay(Duration::from_millis(300))
        }
    })
    .await;
    let a = instance(&origin, &redis, &[]).await;
    let b = instance(&origin, &redis, &[]).await;
    expect(&sget(&a, "/swr").await, "MISS", "v1");
    flush_l2(&a).await;
    expect(&sget(&b, "/swr").await, "HIT-L2", "v1");
    expect(&sget(&b, "/swr").await, "HIT-L1", "v1");

    a.advance(secs(5));
    b.advance(secs(5));
    let urls: [Arc<str>; 2] = [a.url("/swr").into(), b.url("/swr").into()];
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let url = urls[i % 2].clone();
            tokio::spawn(async move {
                let started = Instant::now();
                (get(&url, &[("host", HOST)]).await, started.elapsed())
            })
        })
        .collect();
    for t in tasks {
        let (r, took) = within("stale GET", secs(10), t).await.unwrap();
        expect(&r, "STALE", "v1");
        assert!(took < secs(1), "stale answer took {took:?}");
    }

    origin.wait_hits("/swr", 2).await;
    // Both instances end up with the refreshed copy; neither fetches it a second time.
    for (name, proxy) in [("A", &a), ("B", &b)] {
        let deadline = Instant::now() + secs(10);
        loop {
            let r = sget(proxy, "/swr").await;
            assert_eq!(r.status, 200, "{name}");
            if r.text() == "v2" {
                assert!(
                    matches!(r.x_cache(), "HIT-L1" | "HIT-L2"),
                    "{name}: refreshed copy answered {:?}",
                    r.x_cache()
                );
                break;
            }
            expect(&r, "STALE", "v1");
            assert!(
                Instant::now() < deadline,
                "{name} never got the refreshed copy"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(
        origin.hits("/swr"),
        2,
        "origin requests: the first fill and one refresh for both instances"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_under_load_fails_no_request() {
    let mut redis = RedisServer::start();
    let origin =
        MockOrigin::start(|r| Reply::ok(format!("body of {}", r.path)).cc("max-age=300")).await;
    // Production settings: the default REDIS_TIMEOUT.
    let a = Arc::new(TestProxy::start(&origin.url(), &[("REDIS_URL", &redis.url())]).await);
    let b = Arc::new(TestProxy::start(&origin.url(), &[("REDIS_URL", &redis.url())]).await);
    for i in 0..20 {
        let r = sget(&a, &format!("/warm/{i}")).await;
        assert_eq!(r.status, 200);
    }
    flush_l2(&a).await;

    const WORKERS: usize = 6;
    const PER_WORKER: usize = 50;
    let done = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (a, b) = (a.clone(), b.clone());
            let (done, failures) = (done.clone(), failures.clone());
            tokio::spawn(async move {
                for k in 0..PER_WORKER {
                    let j = w * PER_WORKER + k;
                    let proxy = if j % 2 == 0 { &a } else { &b };
                    let path = if j % 3 == 0 {
                        format!("/warm/{}", j % 20)
                    } else {
                        format!("/new/{j}")
                    };
                    let r = sget(proxy, &path).await;
                    if r.status != 200 || r.text() != format!("body of {path}") {
                        failures.lock().unwrap().push(format!(
                            "{path}: {} {:?} {:?}",
                            r.status,
                            r.x_cache(),
                            r.text()
                        ));
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();

    wait_until_for("100 requests answered", secs(30), || {
        done.load(Ordering::SeqCst) >= 100
    })
    .await;
    redis.kill();
    let killed_at = done.load(Ordering::SeqCst);
    for w in workers {
        within("load to finish", secs(60), w).await.unwrap();
    }
    assert!(
        killed_at + 100 <= WORKERS * PER_WORKER,
        "Redis was killed at request {killed_at}: fewer than 100 requests ran against a dead Redis"
    );
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} failed requests after Redis died (at request {killed_at}): {failures:?}",
        failures.len()
    );

    // Back on the same port: a key filled on A is soon answered by B from L2.
    redis.restart();
    let deadline = Instant::now() + secs(10);
    for n in 0.. {
        let path = format!("/after-restart/{n}");
        assert_eq!(sget(&a, &path).await.status, 200);
        flush_l2(&a).await;
        let r = sget(&b, &path).await;
        assert_eq!(r.status, 200);
        if r.x_cache() == "HIT-L2" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "L2 not used again within 10 s of the Redis restart: A {:?}, B {:?}",
            a.stats(),
            b.stats()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_redis_at_start_up_does_not_stop_the_proxy() {
    let origin =
        MockOrigin::start(|r| Reply::ok(format!("body of {}", r.path)).cc("max-age=60")).await;
    let refused = format!("redis://{}", free_addr());
    let started = Instant::now();
    let proxy = TestProxy::start(&origin.url(), &[("REDIS_URL", &refused)]).await;
    assert!(
        started.elapsed() < secs(5),
        "start-up took {:?}",
        started.elapsed()
    );

    expect(&sget(&proxy, "/up").await, "MISS", "body of /up");
    expect(&sget(&proxy, "/up").await, "HIT-L1", "body of /up");
    for i in 0..5 {
        let path = format!("/more/{i}");
        expect(
            &sget(&proxy, &path).await,
            "MISS",
            &format!("body of {path}"),
        );
    }
    flush_l2(&proxy).await;
    wait_until("L2 errors or breaker open counted", || {
        let s = proxy.stats();
        s.l2_errors + s.l2_breaker_open > 0
    })
    .await;
    assert_eq!(proxy.stats().l2_hits, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_entry_is_a_miss_and_is_replaced() {
    let redis = RedisServer::start();
    let origin = MockOrigin::fixed("good", "max-age=60").await;
    let a = instance(&origin, &redis, &[]).await;
    expect(&sget(&a, "/corrupt").await, "MISS", "good");
    flush_l2(&a).await;
    let key = entry_key("/corrupt");
    assert_eq!(redis.cli(&["set", &key, "garbage"]), "OK");

    let b = instance(&origin, &redis, &[]).await;
    expect(&sget(&b, "/corrupt").await, "MISS", "good");
    assert_eq!(origin.hits("/corrupt"), 2);
    assert!(b.stats().l2_corrupt >= 1, "{:?}", b.stats());
    flush_l2(&b).await;
    assert_ne!(
        redis.cli(&["get", &key]),
        "garbage",
        "the corrupt value is still there"
    );

    // The refill replaced it with a good entry.
    let c = instance(&origin, &redis, &[]).await;
    expect(&sget(&c, "/corrupt").await, "HIT-L2", "good");
    assert_eq!(origin.hits("/corrupt"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_and_unknown_version_entries_are_misses() {
    let redis = RedisServer::start();
    let body = pattern(64 * 1024);
    let origin = {
        let body = body.clone();
        MockOrigin::start(move |_| Reply::ok(body.clone()).cc("max-age=60")).await
    };
    let a = instance(&origin, &redis, &[]).await;
    let damages: [(&str, &str); 3] = [
        // Only the magic, no version byte.
        ("/only-magic", "redis.call('SET', KEYS[1], 'ST'); return 1"),
        // A real entry cut in half.
        (
            "/truncated",
            "local v = redis.call('GET', KEYS[1]); \
             redis.call('SET', KEYS[1], string.sub(v, 1, math.floor(#v / 2))); return #v",
        ),
        // A real entry from a version this build does not know.
        (
            "/future-version",
            "local v = redis.call('GET', KEYS[1]); \
             redis.call('SET', KEYS[1], 'ST' .. string.char(255) .. string.sub(v, 4)); return #v",
        ),
    ];
    for (path, _) in &damages {
        let r = sget(&a, path).await;
        assert_eq!((r.status.as_u16(), r.x_cache()), (200, "MISS"), "{path}");
    }
    flush_l2(&a).await;
    for (path, script) in &damages {
        let out = redis.cli(&["eval", script, "1", &entry_key(path)]);
        assert!(
            out.parse::<i64>().is_ok_and(|n| n > 0),
            "damaging {path}: {out:?}"
        );
    }

    let b = instance(&origin, &redis, &[]).await;
    for (path, _) in &damages {
        let r = sget(&b, path).await;
        assert_eq!(
            (r.status.as_u16(), r.x_cache()),
            (200, "MISS"),
            "{path}: {:?}",
            r.headers
        );
        assert!(r.body == body, "{path}: wrong body");
        assert_eq!(origin.hits(path), 2, "{path}");
    }
    assert!(b.stats().l2_corrupt >= 3, "{:?}", b.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vary_variants_are_shared_across_instances() {
    let redis = RedisServer::start();
    let origin = MockOrigin::start(|r| {
        let ae = r.header("accept-encoding").unwrap_or("none").to_string();
        Reply::ok(format!("body-{ae}"))
            .cc("max-age=60")
            .header("vary", "Accept-Encoding")
    })
    .await;
    let a = instance(&origin, &redis, &[]).await;
    let b = instance(&origin, &redis, &[]).await;
    let gzip = [("accept-encoding", "gzip")];
    let identity = [("accept-encoding", "identity")];

    expect(&sget_with(&a, "/vary", &gzip).await, "MISS", "body-gzip");
    flush_l2(&a).await;
    expect(&sget_with(&b, "/vary", &gzip).await, "HIT-L2", "body-gzip");
    expect(
        &sget_with(&b, "/vary", &identity).await,
        "MISS",
        "body-identity",
    );
    expect(&sget_with(&b, "/vary", &gzip).await, "HIT-L1", "body-gzip");
    flush_l2(&b).await;
    // B's variant reaches A too.
    expect(
        &sget_with(&a, "/vary", &identity).await,
        "HIT-L2",
        "body-identity",
    );
    expect(&sget_with(&a, "/vary", &gzip).await, "HIT-L1", "body-gzip");
    assert_eq!(origin.hits("/vary"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_enabled_and_addr_work_like_redis_url() {
    let redis = RedisServer::start();
    let origin = MockOrigin::fixed("seed style", "max-age=60").await;
    let addr = redis.addr();
    let a = TestProxy::start(
        &origin.url(),
        &[
            ("REDIS_ENABLED", "true"),
            ("REDIS_ADDR", &addr),
            ("REDIS_TIMEOUT", PATIENT_REDIS_TIMEOUT),
        ],
    )
    .await;
    expect(&sget(&a, "/seed").await, "MISS", "seed style");
    flush_l2(&a).await;
    assert_eq!(redis.cli(&["exists", &entry_key("/seed")]), "1");

    let b = instance(&origin, &redis, &[]).await;
    expect(&sget(&b, "/seed").await, "HIT-L2", "seed style");
    assert_eq!(origin.hits("/seed"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_and_database_from_url_and_from_variables() {
    let redis = RedisServer::start_with(&["--requirepass", "s3cret"]);
    let origin = MockOrigin::fixed("private redis", "max-age=60").await;
    let url = format!("redis://:s3cret@127.0.0.1:{}/2", redis.port);
    let a = TestProxy::start(
        &origin.url(),
        &[
            ("REDIS_URL", &url),
            ("REDIS_TIMEOUT", PATIENT_REDIS_TIMEOUT),
        ],
    )
    .await;
    expect(&sget(&a, "/db2").await, "MISS", "private redis");
    flush_l2(&a).await;
    let key = entry_key("/db2");
    assert_eq!(
        redis.cli(&["-n", "2", "exists", &key]),
        "1",
        "in db 2; db 0 keys: {:?}; A: {:?}",
        redis.keys(),
        a.stats()
    );
    assert_eq!(redis.cli(&["-n", "0", "exists", &key]), "0", "not in db 0");

    let addr = redis.addr();
    let b = TestProxy::start(
        &origin.url(),
        &[
            ("REDIS_ENABLED", "true"),
            ("REDIS_ADDR", &addr),
            ("REDIS_PASSWORD", "s3cret"),
            ("REDIS_DB", "2"),
            ("REDIS_TIMEOUT", PATIENT_REDIS_TIMEOUT),
        ],
    )
    .await;
    expect(&sget(&b, "/db2").await, "HIT-L2", "private redis");

    // Without the password Redis refuses every command: still no failed request.
    let c = instance(&origin, &redis, &[]).await;
    expect(&sget(&c, "/db2").await, "MISS", "private redis");
    assert_eq!(origin.hits("/db2"), 2);
}

/// How many times Redis ran `command` (from INFO commandstats).
fn command_calls(redis: &RedisServer, command: &str) -> u64 {
    let stats = redis.cli(&["info", "commandstats"]);
    let prefix = format!("cmdstat_{command}:calls=");
    stats
        .lines()
        .find_map(|line| line.trim().strip_prefix(prefix.as_str()))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |calls| calls.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncacheable_urls_skip_redis_after_the_first_answer() {
    let redis = RedisServer::start();
    let origin = MockOrigin::fixed("never stored", "no-store").await;
    let proxy = instance(&origin, &redis, &[]).await;
    let calls = |redis: &RedisServer| {
        ["get", "set", "eval", "exists"].map(|command| command_calls(redis, command))
    };
    let before = calls(&redis);
    expect(&sget(&proxy, "/api").await, "MISS", "never stored");
    let after_first = calls(&redis);
    assert!(
        after_first[1] > before[1],
        "the first miss takes the fleet lock"
    );
    for _ in 0..9 {
        expect(&sget(&proxy, "/api").await, "MISS", "never stored");
    }
    assert_eq!(
        origin.hits("/api"),
        10,
        "uncacheable answers always come from the origin"
    );
    // The first answer's no-store marks the URL (hit-for-miss): the next ones go straight to the
    // origin instead of paying L2 lookups and lock round trips for nothing.
    assert_eq!(
        calls(&redis),
        after_first,
        "Redis commands after the first answer"
    );
}

/// Under `Vary: Cookie`, a signed-in user's `private` answer marks only that user's variant: the
/// next signed-in request goes straight to the origin (no Redis round trips), and the stored
/// anonymous variant stays a hit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uncacheable_variant_is_passed_alone() {
    let redis = RedisServer::start();
    let origin = MockOrigin::varying_on_cookie().await;
    let proxy = instance(&origin, &redis, &[]).await;
    let signed_in = [("cookie", "session=42")];
    let calls = |redis: &RedisServer| {
        ["get", "set", "eval", "exists"].map(|command| command_calls(redis, command))
    };

    expect(&sget(&proxy, "/home").await, "MISS", "everyone's");
    expect(
        &sget_with(&proxy, "/home", &signed_in).await,
        "MISS",
        "yours",
    );
    flush_l2(&proxy).await;
    let after_first = calls(&redis);
    for _ in 0..3 {
        expect(
            &sget_with(&proxy, "/home", &signed_in).await,
            "MISS",
            "yours",
        );
        expect(&sget(&proxy, "/home").await, "HIT-L1", "everyone's");
    }
    assert_eq!(
        calls(&redis),
        after_first,
        "Redis commands after the signed-in variant was marked"
    );
    assert_eq!(origin.hits("/home"), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_that_comes_up_after_start_up_is_used() {
    let mut redis = RedisServer::start();
    redis.kill();
    let origin =
        MockOrigin::start(|r| Reply::ok(format!("body of {}", r.path)).cc("max-age=60")).await;
    // Redis is down while both instances start: they serve degraded.
    let a = instance(&origin, &redis, &[]).await;
    let b = instance(&origin, &redis, &[]).await;
    expect(&sget(&a, "/early").await, "MISS", "body of /early");

    redis.restart();
    let deadline = Instant::now() + secs(15);
    for n in 0.. {
        let path = format!("/late-{n}");
        expect(&sget(&a, &path).await, "MISS", &format!("body of {path}"));
        flush_l2(&a).await;
        let r = sget(&b, &path).await;
        assert_eq!(r.status, 200);
        if r.x_cache() == "HIT-L2" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "L2 never used after Redis came up: A {:?} B {:?}",
            a.stats(),
            b.stats()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An instance whose fill turns out too big to store lets go of the fleet-wide lock at once: the
/// other instances waiting on it fetch for themselves while the first stream still runs, instead of
/// waiting for its end or for CACHE_LOCK_TIMEOUT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_too_big_to_store_releases_the_fleet_lock_at_once() {
    let redis = RedisServer::start();
    let first = pattern(1536 * 1024);
    let gates = [
        Arc::new(tokio::sync::Notify::new()),
        Arc::new(tokio::sync::Notify::new()),
    ];
    let origin = {
        let (first, gates) = (first.clone(), gates.clone());
        MockOrigin::start(move |req| {
            // Each fetch streams 1.5 MiB, then waits for its own gate before the last bytes.
            let gate = gates[(req.hit - 1).min(1)].clone();
            Reply::gated(first.clone(), gate, "end").cc("max-age=60")
        })
        .await
    };
    let settings = [("CACHE_MAX_OBJECT_MB", "1"), ("CACHE_LOCK_TIMEOUT", "30s")];
    let a = instance(&origin, &redis, &settings).await;
    let b = instance(&origin, &redis, &settings).await;

    let url = a.url("/big");
    let from_a = tokio::spawn(async move { get(&url, &[("host", HOST)]).await });
    origin.wait_hits("/big", 1).await;
    let url = b.url("/big");
    let from_b = tokio::spawn(async move { get(&url, &[("host", HOST)]).await });
    // B reaches the origin while A's stream is still held at its gate.
    origin.wait_hits("/big", 2).await;
    assert_eq!(origin.hits("/big"), 2);

    for gate in &gates {
        gate.notify_one();
    }
    for (name, task) in [("A", from_a), ("B", from_b)] {
        let r = within("the gated GET", secs(20), task).await.unwrap();
        assert_eq!(r.status, 200, "{name}");
        assert_eq!(r.body.len(), first.len() + 3, "{name}: the whole body");
        assert_eq!(r.x_cache(), "MISS", "{name}");
    }
}

/// A leader whose answer cannot be stored, and which then asks the origin again for its client's
/// byte range, lets go of the fleet-wide lock before that second request: the other instances
/// fetch for themselves meanwhile instead of waiting (up to CACHE_LOCK_TIMEOUT) for a fill that
/// will store nothing. The origin takes 5 s over the second request's head; B's answer must come
/// while A still waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_asking_again_for_its_range_releases_the_fleet_lock_first() {
    let redis = RedisServer::start();
    let origin = MockOrigin::start(move |req| match req.hit {
        1 => Reply::ok("whole").cc("no-store"),
        2 => Reply::ok("ranged")
            .cc("no-store")
            .delay(Duration::from_secs(5)),
        _ => Reply::ok("for b").cc("no-store"),
    })
    .await;
    let settings = [("CACHE_LOCK_TIMEOUT", "30s")];
    let a = instance(&origin, &redis, &settings).await;
    let b = instance(&origin, &redis, &settings).await;

    let url = a.url("/ranged");
    let from_a =
        tokio::spawn(async move { get(&url, &[("host", HOST), ("range", "bytes=0-1")]).await });
    // A's second request, for the range, is at the origin.
    origin.wait_hits("/ranged", 2).await;
    let from_b = sget(&b, "/ranged").await;
    assert_eq!(
        (from_b.status.as_u16(), from_b.text()),
        (200, "for b".to_string())
    );
    assert!(!from_a.is_finished(), "B waited for A's second request");

    let r = within("A's ranged GET", secs(20), from_a).await.unwrap();
    assert_eq!((r.status.as_u16(), r.text()), (200, "ranged".to_string()));
    assert_eq!(origin.hits("/ranged"), 3);
}

/// A fill older than CACHE_LOCK_TIMEOUT that a newer fill of its key superseded keeps its older
/// answer out of Redis: another instance gets the newer one from L2 after both finished. A has
/// no L1 here, where nothing else would weigh the two answers. (The 1.2 s pause is the condition
/// under test: the first fill's age passing the timeout, and with it the fleet lock's TTL.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_superseded_slow_fill_does_not_replace_the_newer_copy_in_redis() {
    let redis = RedisServer::start();
    let gate = Arc::new(Notify::new());
    let origin = {
        let gate = gate.clone();
        MockOrigin::start(move |r| {
            if r.hit == 1 {
                Reply::gated("held ", gate.clone(), "body").cc("max-age=60")
            } else {
                Reply::ok("fresh").cc("max-age=60")
            }
        })
        .await
    };
    let a = instance(
        &origin,
        &redis,
        &[("CACHE_LOCK_TIMEOUT", "1s"), ("CACHE_SIZE_MB", "0")],
    )
    .await;
    let b = instance(&origin, &redis, &[]).await;
    let url = a.url("/superseded");
    let first = tokio::spawn(async move { get(&url, &[("host", HOST)]).await });
    origin.wait_hits("/superseded", 1).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;

    expect(&sget(&a, "/superseded").await, "MISS", "fresh");
    gate.notify_one();
    let first = within("the held fill", secs(10), first).await.unwrap();
    assert_eq!(first.text(), "held body");
    flush_l2(&a).await;

    expect(&sget(&b, "/superseded").await, "HIT-L2", "fresh");
}

/// The scripts that take a write back and rewrite a soft-purged entry act only on the value that
/// was read (its SHA-1): a copy stored in between, by any instance, is left as it is; a rewrite
/// keeps the entry's TTL.
#[tokio::test]
async fn digest_scripts_touch_only_the_value_they_read() {
    use strata::cache::l2::{DELETE_IF_DIGEST_SCRIPT, SET_IF_DIGEST_SCRIPT};
    let redis = RedisServer::start();
    let sha1 = |value: &str| sha1_smol::Sha1::from(value).digest().to_string();
    assert_eq!(redis.cli(&["set", "k", "read", "ex", "300"]), "OK");

    let set_if = |digest: &str, value: &str| {
        redis.cli(&["eval", SET_IF_DIGEST_SCRIPT, "1", "k", digest, value])
    };
    assert_eq!(set_if(&sha1("other"), "stale"), "0");
    assert_eq!(redis.cli(&["get", "k"]), "read");
    assert_eq!(set_if(&sha1("read"), "stale"), "1");
    assert_eq!(redis.cli(&["get", "k"]), "stale");
    let ttl: u64 = redis.cli(&["ttl", "k"]).parse().unwrap();
    assert!((290..=300).contains(&ttl), "TTL {ttl} after the rewrite");

    let delete_if = |digest: &str| redis.cli(&["eval", DELETE_IF_DIGEST_SCRIPT, "1", "k", digest]);
    assert_eq!(delete_if(&sha1("read")), "0");
    assert_eq!(redis.cli(&["get", "k"]), "stale");
    assert_eq!(delete_if(&sha1("stale")), "1");
    assert_eq!(redis.cli(&["exists", "k"]), "0");
    assert_eq!(set_if(&sha1("stale"), "again"), "0", "nothing to rewrite");
    assert_eq!(redis.cli(&["exists", "k"]), "0");
}

/// A request's own `max-age` and `min-fresh` bound how old an L2 copy it takes (RFC 9111
/// §5.2.1.1, §5.2.1.3): B reads copies A stored 30 s before (Age 30, 70 s of freshness left).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_max_age_and_min_fresh_bound_the_l2_copy_served() {
    let redis = RedisServer::start();
    let origin = MockOrigin::start(|r| Reply::ok(format!("v{}", r.hit)).cc("max-age=100")).await;
    let a = instance(&origin, &redis, &[]).await;
    for path in ["/aged/ok", "/aged/max-age", "/aged/min-fresh"] {
        expect(&sget(&a, path).await, "MISS", "v1");
    }
    flush_l2(&a).await;
    let b = instance(&origin, &redis, &[]).await;
    b.advance(secs(30));

    let r = sget_with(
        &b,
        "/aged/ok",
        &[("cache-control", "max-age=60, min-fresh=60")],
    )
    .await;
    expect(&r, "HIT-L2", "v1");
    assert!((30..40).contains(&r.age()), "Age {}", r.age());
    let r = sget_with(&b, "/aged/max-age", &[("cache-control", "max-age=10")]).await;
    expect(&r, "MISS", "v2");
    let r = sget_with(&b, "/aged/min-fresh", &[("cache-control", "min-fresh=80")]).await;
    expect(&r, "MISS", "v2");
    assert_eq!(origin.hits("/aged/ok"), 1);
    assert_eq!(origin.hits("/aged/max-age"), 2);
    assert_eq!(origin.hits("/aged/min-fresh"), 2);
}

/// A request with `no-cache` that waits for a concurrent request's fill does not take the copy
/// that request found in Redis: it asks the origin itself. A's fill holds the fleet-wide lock (its
/// origin answer is held back), so B's plain request leads on B by waiting for A's result in
/// Redis, and B's `no-cache` request follows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_no_cache_follower_does_not_take_the_leaders_l2_copy() {
    let redis = RedisServer::start();
    let gate = Arc::new(Notify::new());
    let origin = MockOrigin::first_answer_held(&gate, |reply| reply.cc("max-age=100")).await;
    let a = instance(&origin, &redis, &[]).await;
    let b = instance(&origin, &redis, &[]).await;
    let get_on = |proxy: &TestProxy, headers: &'static [(&'static str, &'static str)]| {
        let url = proxy.url("/reload");
        tokio::spawn(async move { get(&url, headers).await })
    };

    let on_a = get_on(&a, &[("host", HOST)]);
    origin.wait_hits("/reload", 1).await;
    let plain = get_on(&b, &[("host", HOST)]);
    wait_until("B's plain request leads", || b.stats().fills_in_flight == 1).await;
    let reload = get_on(&b, &[("host", HOST), ("cache-control", "no-cache")]);
    wait_until("B's no-cache request follows it", || {
        b.stats().coalesce_waiting == 1
    })
    .await;
    gate.notify_one();

    let on_a = within("A's answer", secs(10), on_a).await.unwrap();
    expect(&on_a, "MISS", "v1 body");
    let plain = within("B's leader", secs(10), plain).await.unwrap();
    expect(&plain, "HIT-L2", "v1 body");
    let reload = within("B's follower", secs(10), reload).await.unwrap();
    assert_eq!(
        reload.text(),
        "v2 body",
        "the no-cache request got {:?}",
        reload.headers
    );
    assert_eq!(origin.hits("/reload"), 2);
}

/// A request with `no-cache` that finds another instance filling the key (its fleet-wide lock
/// held) does not take that instance's result if the origin produced it before the request came:
/// it asks the origin itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_no_cache_leader_does_not_take_an_older_fleet_fill() {
    let redis = RedisServer::start();
    let gate = Arc::new(Notify::new());
    let origin = MockOrigin::first_answer_held(&gate, |reply| reply.cc("max-age=100")).await;
    let a = instance(&origin, &redis, &[]).await;
    let b = instance(&origin, &redis, &[]).await;
    let on_a = {
        let url = a.url("/fleet-reload");
        tokio::spawn(async move { get(&url, &[("host", HOST)]).await })
    };
    // A's answer has begun (its copy dates from now); A holds the fill lock until its body ends.
    origin.wait_hits("/fleet-reload", 1).await;
    let reload = {
        let url = b.url("/fleet-reload");
        tokio::spawn(
            async move { get(&url, &[("host", HOST), ("cache-control", "no-cache")]).await },
        )
    };
    wait_until("B's no-cache request leads on B", || {
        b.stats().fills_in_flight == 1
    })
    .await;
    gate.notify_one();

    let on_a = within("A's answer", secs(10), on_a).await.unwrap();
    expect(&on_a, "MISS", "v1 body");
    let reload = within("B's answer", secs(10), reload).await.unwrap();
    assert_eq!(
        reload.text(),
        "v2 body",
        "the no-cache request got {:?}",
        reload.headers
    );
}

/// An instance that has not seen a varying URL yet learns its vary record from Redis even when
/// the request's own variant is not there, so a signed-in user's `private` answer marks only that
/// variant: the anonymous variant another instance stored is still a hit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uncacheable_variant_on_a_fresh_instance_leaves_the_stored_ones_reachable() {
    let redis = RedisServer::start();
    let origin = MockOrigin::varying_on_cookie().await;
    let a = instance(&origin, &redis, &[]).await;
    expect(&sget(&a, "/front").await, "MISS", "everyone's");
    flush_l2(&a).await;

    let b = instance(&origin, &redis, &[]).await;
    let signed_in = [("cookie", "session=7")];
    expect(&sget_with(&b, "/front", &signed_in).await, "MISS", "yours");
    expect(&sget(&b, "/front").await, "HIT-L2", "everyone's");
    expect(&sget(&b, "/front").await, "HIT-L1", "everyone's");
    assert_eq!(origin.hits("/front"), 2);
}
