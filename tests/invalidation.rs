//! Invalidation across instances: a purge on one instance reaches the others' L1 through Redis
//! pub/sub (key, pattern, tags, soft), survives Redis outages and restarts, and is not undone by a
//! fill that was in flight when it arrived.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::admin::*;
use support::fleet::*;
use support::redis::RedisServer;
use support::*;
use tokio::sync::Notify;

const TOKEN: &str = "inval-s3cret-token";
/// Settings for every instance: ADMIN_TOKEN (the REDIS_TIMEOUT is the patient default; a loaded
/// 2-core box can stall one 50 ms call, and these tests assert what is applied, not how fast Redis
/// answers).
const ADMIN: &[(&str, &str)] = &[("ADMIN_TOKEN", TOKEN)];
/// How long another instance may take to apply a purge once the purge was answered.
const PROPAGATION_LIMIT: Duration = Duration::from_secs(2);

/// POST /purge on `proxy`; asserts 200 and returns the reply.
async fn purge(proxy: &TestProxy, body: Value) -> Value {
    purge_with(proxy, TOKEN, body).await
}

/// An origin answering `{path} v{n}` (n = the path's hit number) with `cache_control`, tagged
/// `grp` when the path starts with /tagged.
async fn versioned_origin(cache_control: &'static str) -> MockOrigin {
    MockOrigin::start(move |r| {
        let reply = Reply::ok(format!("{} v{}", r.path, r.hit)).cc(cache_control);
        if r.path.starts_with("/tagged") {
            reply.header("surrogate-key", "grp other")
        } else {
            reply
        }
    })
    .await
}

/// Fills `path` on A, then B takes it from L2 into its own L1.
async fn prime(a: &TestProxy, b: &TestProxy, path: &str) {
    let body = format!("{path} v1");
    expect(&sget(a, path).await, "MISS", &body);
    flush_l2(a).await;
    expect(&sget(b, path).await, "HIT-L2", &body);
    expect(&sget(b, path).await, "HIT-L1", &body);
}

/// Polls `path` on B until it is no longer an L1 hit (bounded by `limit`); returns that answer and
/// how long it took from `since`.
async fn wait_not_hit(
    b: &TestProxy,
    path: &str,
    since: Instant,
    limit: Duration,
) -> (Resp, Duration) {
    let deadline = since + limit;
    loop {
        let r = sget(b, path).await;
        assert_eq!(r.status, 200, "{path} on B");
        if r.x_cache() != "HIT-L1" {
            return (r, since.elapsed());
        }
        assert!(
            Instant::now() < deadline,
            "{path}: B still answers HIT-L1 {limit:?} after the purge; B {:?}",
            b.stats()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Asserts B misses `path` (origin asked again) within PROPAGATION_LIMIT of `since`.
async fn b_misses(b: &TestProxy, origin: &MockOrigin, path: &str, since: Instant) -> Duration {
    let before = origin.hits(path);
    let (r, took) = wait_not_hit(b, path, since, PROPAGATION_LIMIT).await;
    assert_eq!(
        r.x_cache(),
        "MISS",
        "{path} on B after the purge: {:?}",
        r.headers
    );
    assert_eq!(
        origin.hits(path),
        before + 1,
        "{path}: origin not asked again"
    );
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_purge_on_a_reaches_b() {
    let redis = RedisServer::start();
    let origin = versioned_origin("max-age=300").await;
    let a = instance(&origin, &redis, ADMIN).await;
    let b = instance(&origin, &redis, ADMIN).await;
    prime(&a, &b, "/inv/key").await;
    prime(&a, &b, "/inv/untouched").await;
    let (sent, received, applied) = {
        let (sa, sb) = (a.stats(), b.stats());
        (
            sa.invalidations_sent,
            sb.invalidations_received,
            sb.invalidations_applied,
        )
    };

    let v = purge(&a, json!({"key": "shared.test/inv/key"})).await;
    let answered = Instant::now();
    assert_eq!(v["broadcast"], true, "{v}");
    assert_eq!(v["l1_removed"], 1, "{v}");
    assert!(v["l2_removed"].as_u64().unwrap() >= 1, "{v}");
    let took = b_misses(&b, &origin, "/inv/key", answered).await;
    println!("key purge: B missed {took:?} after A answered");
    let r = sget(&b, "/inv/untouched").await;
    expect(&r, "HIT-L1", "/inv/untouched v1");

    wait_until("A counts the sent invalidation", || {
        a.stats().invalidations_sent > sent
    })
    .await;
    wait_until("B counts the received and applied invalidation", || {
        let s = b.stats();
        s.invalidations_received > received && s.invalidations_applied > applied
    })
    .await;
    assert!(a.stats().purges >= 1, "{:?}", a.stats());

    // The same counters on B's /metrics.
    let auth = bearer(TOKEN);
    let metrics = get(&b.admin_url("/metrics"), &[("authorization", &auth)]).await;
    assert_eq!(metrics.status, 200);
    let text = metrics.text();
    for family in [
        "strata_invalidations_received_total",
        "strata_invalidations_applied_total",
    ] {
        let value = text
            .lines()
            .find_map(|l| l.strip_prefix(family)?.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {family} sample in:\n{text}"));
        assert!(value >= 1.0, "{family} {value}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pattern_purge_on_a_reaches_b() {
    let redis = RedisServer::start();
    let origin = versioned_origin("max-age=300").await;
    let a = instance(&origin, &redis, ADMIN).await;
    let b = instance(&origin, &redis, ADMIN).await;
    for path in ["/inv/p/1", "/inv/p/2/deep", "/inv/keep"] {
        prime(&a, &b, path).await;
    }

    let v = purge(&a, json!({"pattern": "shared.test/inv/p/*"})).await;
    let answered = Instant::now();
    assert_eq!(v["broadcast"], true, "{v}");
    assert_eq!(v["l1_removed"], 2, "{v}");
    for path in ["/inv/p/1", "/inv/p/2/deep"] {
        let took = b_misses(&b, &origin, path, answered).await;
        println!("pattern purge: B missed {path} {took:?} after A answered");
    }
    expect(&sget(&b, "/inv/keep").await, "HIT-L1", "/inv/keep v1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_purge_on_a_reaches_b() {
    let redis = RedisServer::start();
    let origin = versioned_origin("max-age=300").await;
    let a = instance(&origin, &redis, ADMIN).await;
    let b = instance(&origin, &redis, ADMIN).await;
    for path in ["/tagged/1", "/tagged/2", "/plain"] {
        prime(&a, &b, path).await;
    }

    // B's copies came from L2: their tags must have travelled with them.
    let v = purge(&a, json!({"tags": ["grp"]})).await;
    let answered = Instant::now();
    assert_eq!(v["broadcast"], true, "{v}");
    assert_eq!(v["l1_removed"], 2, "{v}");
    for path in ["/tagged/1", "/tagged/2"] {
        let took = b_misses(&b, &origin, path, answered).await;
        println!("tag purge: B missed {path} {took:?} after A answered");
    }
    expect(&sget(&b, "/plain").await, "HIT-L1", "/plain v1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_purge_on_a_makes_b_serve_stale() {
    let redis = RedisServer::start();
    let origin = versioned_origin("max-age=300, stale-while-revalidate=60").await;
    let a = instance(&origin, &redis, ADMIN).await;
    let b = instance(&origin, &redis, ADMIN).await;
    prime(&a, &b, "/inv/soft").await;

    let v = purge(&a, json!({"key": "shared.test/inv/soft", "soft": true})).await;
    let answered = Instant::now();
    assert_eq!(v["broadcast"], true, "{v}");
    // The L2 copy was marked stale in place (read, rewritten while unchanged), not removed.
    assert_eq!(
        (v["l2_removed"].as_u64(), v["l2_pending"].as_bool()),
        (Some(1), Some(false)),
        "{v}"
    );
    let (r, took) = wait_not_hit(&b, "/inv/soft", answered, PROPAGATION_LIMIT).await;
    expect(&r, "STALE", "/inv/soft v1");
    println!("soft purge: B served STALE {took:?} after A answered");

    // B's stale answer triggered a refresh; the refreshed copy is served afterwards.
    origin.wait_hits("/inv/soft", 2).await;
    let deadline = Instant::now() + secs(10);
    loop {
        let r = sget(&b, "/inv/soft").await;
        if r.text() == "/inv/soft v2" {
            assert!(
                matches!(r.x_cache(), "HIT-L1" | "HIT-L2"),
                "refreshed copy: {:?}",
                r.headers
            );
            break;
        }
        expect(&r, "STALE", "/inv/soft v1");
        assert!(Instant::now() < deadline, "B never got the refreshed copy");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(origin.hits("/inv/soft"), 2, "one refresh");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_while_redis_is_down_reaches_b_when_it_returns() {
    // Persistent Redis: the L2 copy outlives the outage, so the deferred purge must reach L2 too.
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let origin = versioned_origin("max-age=300").await;
    let a = instance(&origin, &redis, ADMIN).await;
    let b = instance(&origin, &redis, ADMIN).await;
    prime(&a, &b, "/inv/down").await;
    let sent_before = a.stats().invalidations_sent;
    let received_before = b.stats().invalidations_received;

    redis.kill();
    let v = purge(&a, json!({"key": "shared.test/inv/down"})).await;
    assert_eq!(v["broadcast"], false, "Redis is down: {v}");
    assert_eq!(v["l1_removed"], 1, "{v}");
    // Applied on A at once.
    expect(&sget(&a, "/inv/down").await, "MISS", "/inv/down v2");
    // B cannot know yet.
    expect(&sget(&b, "/inv/down").await, "HIT-L1", "/inv/down v1");

    redis.restart();
    let restarted = Instant::now();
    assert_eq!(
        redis.cli(&["exists", "strata:e:shared.test/inv/down"]),
        "1",
        "the AOF kept the pre-purge L2 copy"
    );
    wait_until_for("A publishes the deferred purge", secs(20), || {
        a.stats().invalidations_sent > sent_before
    })
    .await;
    let published = restarted.elapsed();
    // B drops the purged copy and does not take it back from L2.
    let deadline = restarted + secs(20);
    loop {
        let r = sget(&b, "/inv/down").await;
        assert_eq!(r.status, 200);
        if r.text() != "/inv/down v1" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B still serves the purged copy ({}) 20 s after Redis returned; B {:?}",
            r.x_cache(),
            b.stats()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!(
        "deferred purge: published {published:?} and B dropped its copy {:?} after Redis restarted",
        restarted.elapsed()
    );
    // Whether B dropped it through the deferred message or through the L1 flush it does when it
    // resubscribes depends on which came first (pub/sub is at-most-once); either is correct.
    println!(
        "B received {} invalidation(s) since the purge",
        b.stats().invalidations_received - received_before
    );
    for _ in 0..3 {
        let r = sget(&b, "/inv/down").await;
        assert_ne!(r.text(), "/inv/down v1", "B went back to the purged copy");
    }
    // Nor does a fresh instance find it in L2.
    let d = instance(&origin, &redis, ADMIN).await;
    let r = sget(&d, "/inv/down").await;
    assert_ne!(
        r.text(),
        "/inv/down v1",
        "the purged copy is back in L2: {:?}",
        r.headers
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_after_a_redis_restart_reaches_b() {
    let mut redis = RedisServer::start();
    let origin = versioned_origin("max-age=300").await;
    let a = instance(&origin, &redis, ADMIN).await;
    let b = instance(&origin, &redis, ADMIN).await;

    // The counter may already count the first subscription: wait for it to move.
    let (subs_a, subs_b) = (a.stats().pubsub_reconnects, b.stats().pubsub_reconnects);
    redis.kill();
    redis.restart();
    // Both subscribers reconnect.
    wait_until_for("both instances resubscribed", secs(15), || {
        a.stats().pubsub_reconnects > subs_a && b.stats().pubsub_reconnects > subs_b
    })
    .await;
    // A's L2 works again: a fill on A is soon an L2 hit on B.
    let deadline = Instant::now() + secs(15);
    for n in 0.. {
        let path = format!("/inv/probe-{n}");
        assert_eq!(sget(&a, &path).await.status, 200);
        flush_l2(&a).await;
        if sget(&b, &path).await.x_cache() == "HIT-L2" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "L2 not used again after the restart: A {:?} B {:?}",
            a.stats(),
            b.stats()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // B stores its own copy in L1: from L2, or (should one of its pooled connections still be
    // reconnecting) from the origin. Either way the purge on A must remove it.
    expect(
        &sget(&a, "/inv/after-restart").await,
        "MISS",
        "/inv/after-restart v1",
    );
    flush_l2(&a).await;
    let r = sget(&b, "/inv/after-restart").await;
    assert!(
        matches!(r.x_cache(), "HIT-L2" | "MISS"),
        "B: {:?}",
        r.headers
    );
    if r.x_cache() == "MISS" {
        println!("B missed L2 right after the restart: {:?}", b.stats());
    }
    assert_eq!(sget(&b, "/inv/after-restart").await.x_cache(), "HIT-L1");
    let v = purge(&a, json!({"key": "shared.test/inv/after-restart"})).await;
    let answered = Instant::now();
    assert_eq!(v["broadcast"], true, "{v}");
    let took = b_misses(&b, &origin, "/inv/after-restart", answered).await;
    println!("purge after a Redis restart: B missed {took:?} after A answered");
}

/// An origin whose /slow answers after 1 s; bodies are `v{n}`.
async fn slow_origin() -> MockOrigin {
    MockOrigin::start(|r| {
        let reply = Reply::ok(format!("v{}", r.hit)).cc("max-age=300");
        if r.path == "/slow" {
            reply.delay(secs(1))
        } else {
            reply
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_during_an_in_flight_fill_is_not_undone() {
    let redis = RedisServer::start();
    let origin = slow_origin().await;
    let a = instance(&origin, &redis, ADMIN).await;
    let b = instance(&origin, &redis, ADMIN).await;

    let url = a.url("/slow");
    let fill = tokio::spawn(async move { get(&url, &[("host", HOST)]).await });
    origin.wait_hits("/slow", 1).await;
    assert!(!fill.is_finished(), "the origin delays its answer by 1 s");
    purge(&a, json!({"key": "shared.test/slow"})).await;
    assert!(
        !fill.is_finished(),
        "the purge must arrive while the fill is in flight"
    );
    let r = within("the in-flight GET", secs(10), fill).await.unwrap();
    expect(&r, "MISS", "v1");

    let r = sget(&a, "/slow").await;
    expect(&r, "MISS", "v2");
    assert_eq!(origin.hits("/slow"), 2);
    flush_l2(&a).await;
    // Neither A's L1 nor L2 holds the pre-purge copy.
    let r = sget(&b, "/slow").await;
    assert_eq!(r.text(), "v2", "B: {:?}", r.headers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_from_b_during_a_fill_on_a_is_not_undone() {
    let redis = RedisServer::start();
    let origin = slow_origin().await;
    let a = instance(&origin, &redis, ADMIN).await;
    let b = instance(&origin, &redis, ADMIN).await;

    let url = a.url("/slow");
    let fill = tokio::spawn(async move { get(&url, &[("host", HOST)]).await });
    origin.wait_hits("/slow", 1).await;
    let v = purge(&b, json!({"key": "shared.test/slow"})).await;
    assert_eq!(v["broadcast"], true, "{v}");
    assert!(
        !fill.is_finished(),
        "the purge must arrive while the fill is in flight"
    );
    let r = within("the in-flight GET", secs(10), fill).await.unwrap();
    expect(&r, "MISS", "v1");

    let r = sget(&a, "/slow").await;
    expect(&r, "MISS", "v2");
    assert_eq!(origin.hits("/slow"), 2);
}

/// An instance that served from L1 before its invalidation subscriber first connected (Redis late
/// at start-up) may have missed purges meanwhile: it flushes L1 once the subscriber is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l1_filled_before_the_first_subscription_is_flushed() {
    let mut redis = RedisServer::start();
    redis.kill();
    let origin = versioned_origin("max-age=300").await;
    let b = instance(&origin, &redis, ADMIN).await;
    expect(&sget(&b, "/inv/early").await, "MISS", "/inv/early v1");
    expect(&sget(&b, "/inv/early").await, "HIT-L1", "/inv/early v1");

    redis.restart();
    wait_until_for("B subscribed", secs(15), || {
        b.stats().pubsub_reconnects >= 1
    })
    .await;
    let r = sget(&b, "/inv/early").await;
    assert_ne!(
        r.x_cache(),
        "HIT-L1",
        "L1 kept across the first subscription: {:?}",
        b.stats()
    );
    assert_eq!(
        origin.hits("/inv/early"),
        2,
        "refetched (nothing was in L2)"
    );
}

/// A sequence counter that starts over (its key evicted or deleted) cannot show what was missed:
/// an instance seeing a number not above the last one flushes L1, as it does for a gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_invalidation_sequence_flushes_l1() {
    let redis = RedisServer::start();
    let origin = versioned_origin("max-age=300").await;
    let a = instance(&origin, &redis, ADMIN).await;
    let b = instance(&origin, &redis, ADMIN).await;
    wait_until_for("both subscribed", secs(15), || {
        a.stats().pubsub_reconnects >= 1 && b.stats().pubsub_reconnects >= 1
    })
    .await;
    // A few purges move the counter on; B applies them.
    for n in 0..3 {
        purge(&a, json!({"key": format!("shared.test/inv/other-{n}")})).await;
    }
    wait_until("B received three purges", || {
        b.stats().invalidations_received >= 3
    })
    .await;
    prime(&a, &b, "/inv/kept").await;

    // The counter's key goes (maxmemory eviction, a FLUSHDB): the next purge is number 1 again.
    assert_eq!(redis.cli(&["del", "strata:invalidate:seq"]), "1");
    purge(&a, json!({"key": "shared.test/inv/unrelated"})).await;
    wait_until("B received the fourth purge", || {
        b.stats().invalidations_received >= 4
    })
    .await;
    let r = sget(&b, "/inv/kept").await;
    assert_eq!(
        r.x_cache(),
        "HIT-L2",
        "B's L1 was flushed, L2 still has it: {:?}",
        r.headers
    );
}

/// A message numbered u64::MAX (published by anyone who may PUBLISH on the channel) is read like
/// any other: the next real number looks like a restart (L1 flushed), and B keeps hearing purges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_last_sequence_number_does_not_stop_an_instance_listening() {
    let redis = RedisServer::start();
    let origin = versioned_origin("max-age=300").await;
    let a = instance(&origin, &redis, ADMIN).await;
    let b = instance(&origin, &redis, ADMIN).await;
    wait_until_for("both subscribed", secs(15), || {
        a.stats().pubsub_reconnects >= 1 && b.stats().pubsub_reconnects >= 1
    })
    .await;
    let forged = format!(
        "{} {}",
        u64::MAX,
        json!({"from": "forged", "purge": {"selector": {"Key": "shared.test/inv/none"}, "soft": false}})
    );
    assert_eq!(redis.cli(&["publish", "strata:invalidate", &forged]), "2");
    wait_until("B received the forged purge", || {
        b.stats().invalidations_received >= 1
    })
    .await;
    prime(&a, &b, "/inv/after").await;

    purge(&a, json!({"key": "shared.test/inv/after"})).await;
    b_misses(&b, &origin, "/inv/after", Instant::now()).await;
}

/// A burst of purges (2,000 published at once, as a fleet's write requests can) is heard in full:
/// the subscriber does not fall behind its backlog and flush L1, which would empty every instance's
/// L1 at the same moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_purges_does_not_flush_l1() {
    let redis = RedisServer::start();
    let origin = versioned_origin("max-age=300").await;
    let a = instance(&origin, &redis, ADMIN).await;
    let b = instance(&origin, &redis, ADMIN).await;
    prime(&a, &b, "/inv/kept").await;
    let received = b.stats().invalidations_received;

    // Numbered the way instances number theirs, all in one script: Redis sends them back to back.
    let burst = "for i = 1, 2000 do \
        local seq = redis.call('incr', KEYS[1]); \
        redis.call('publish', ARGV[1], seq .. ' ' .. string.format(ARGV[2], i)) end";
    let message =
        r#"{"from":"burst","purge":{"selector":{"Key":"shared.test/inv/burst-%d"},"soft":false}}"#;
    redis.cli(&[
        "eval",
        burst,
        "1",
        "strata:invalidate:seq",
        "strata:invalidate",
        message,
    ]);
    wait_until_for("B heard the whole burst", secs(20), || {
        b.stats().invalidations_received >= received + 2000
    })
    .await;
    expect(&sget(&b, "/inv/kept").await, "HIT-L1", "/inv/kept v1");
}

/// A successful POST through A invalidates the URL on every instance: A deletes it from L2 before
/// it tells the others, so B, once told, fetches the new version instead of the old one from L2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsafe_method_on_a_invalidates_b() {
    let redis = RedisServer::start();
    let origin = versioned_origin("max-age=300").await;
    let a = instance(&origin, &redis, ADMIN).await;
    let b = instance(&origin, &redis, ADMIN).await;
    prime(&a, &b, "/inv/item").await;

    let before = b.stats().invalidations_received;
    let r = request(
        "POST",
        &a.url("/inv/item"),
        &[("host", HOST)],
        bytes::Bytes::from_static(b"change"),
    )
    .await;
    assert_eq!(r.status, 200);
    wait_until("B told of the invalidation", || {
        b.stats().invalidations_received > before
    })
    .await;
    // The origin's hits for the path: A's fill (1), the POST (2), now B's fetch (3).
    expect(&sget(&b, "/inv/item").await, "MISS", "/inv/item v3");
}

/// An L2 read that Redis answers after a purge was made (it was sent before the purge's delete)
/// must not put the purged copy back: not into L1, not to the client that asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_l2_read_overtaken_by_a_purge_is_not_kept() {
    let redis = RedisServer::start();
    let origin = versioned_origin("max-age=300").await;
    let a = instance(&origin, &redis, ADMIN).await;
    let b = instance(&origin, &redis, ADMIN).await;
    expect(&sget(&a, "/inv/raced").await, "MISS", "/inv/raced v1");
    flush_l2(&a).await;

    // Redis holds every command for a second: B's L2 read goes out first, then the purge on B
    // (logged at once; its delete waits behind the read).
    assert_eq!(redis.cli(&["client", "pause", "1000", "ALL"]), "OK");
    let path_b = b.url("/inv/raced");
    let read = tokio::spawn(async move { get(&path_b, &[("host", HOST)]).await });
    // No signal exists while Redis is paused; the order only decides whether the race happens.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let purges = b.stats().purges;
    let admin = b.admin_url("/purge");
    let purging = tokio::spawn(async move {
        request(
            "POST",
            &admin,
            &[("authorization", &format!("Bearer {TOKEN}"))],
            bytes::Bytes::from(json!({"key": "shared.test/inv/raced"}).to_string()),
        )
        .await
    });
    wait_until("the purge logged on B", || b.stats().purges > purges).await;
    let raced = within("the racing read", secs(10), read).await.unwrap();
    assert_eq!(
        within("the purge", secs(10), purging).await.unwrap().status,
        200
    );
    assert_ne!(
        raced.text(),
        "/inv/raced v1",
        "served the purged copy: {:?}",
        raced.headers
    );

    let after = sget(&b, "/inv/raced").await;
    assert_ne!(
        after.text(),
        "/inv/raced v1",
        "the purged copy is back: {:?}",
        after.headers
    );
}

/// A purge that a store refuses (here: UNLINK denied by an ACL) while publishing works is answered
/// `"l2_pending": true`. Meanwhile another instance can take the old copy from L2 into its L1; when
/// the store takes the purge again, it is done there and published once more, so that copy goes too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_a_store_missed_is_done_there_and_published_again() {
    let redis = RedisServer::start();
    let origin = versioned_origin("max-age=300").await;
    let a = instance(&origin, &redis, ADMIN).await;
    let b = instance(&origin, &redis, ADMIN).await;
    expect(&sget(&a, "/inv/missed").await, "MISS", "/inv/missed v1");
    flush_l2(&a).await;
    let key = "strata:e:shared.test/inv/missed";

    assert_eq!(redis.cli(&["acl", "setuser", "default", "-unlink"]), "OK");
    let v = purge(&a, json!({"key": "shared.test/inv/missed"})).await;
    assert_eq!(
        (&v["l2_pending"], &v["broadcast"], &v["l2_removed"]),
        (&json!(true), &json!(true), &json!(0)),
        "{v}"
    );
    assert_eq!(a.stats().l2_purges_unfinished, 1, "{:?}", a.stats());
    assert_eq!(redis.cli(&["exists", key]), "1", "the store kept its copy");
    wait_until("B applies the purge", || {
        b.stats().invalidations_applied >= 1
    })
    .await;
    // The copy the store kept is still served: B takes it into its L1.
    expect(&sget(&b, "/inv/missed").await, "HIT-L2", "/inv/missed v1");
    expect(&sget(&b, "/inv/missed").await, "HIT-L1", "/inv/missed v1");

    assert_eq!(redis.cli(&["acl", "setuser", "default", "+unlink"]), "OK");
    wait_until("A finishes the purge on the store", || {
        a.stats().l2_purges_unfinished == 0
    })
    .await;
    assert_eq!(redis.cli(&["exists", key]), "0", "the store's copy is gone");
    wait_until("B applies the purge published again", || {
        b.stats().invalidations_applied >= 2
    })
    .await;
    expect(&sget(&b, "/inv/missed").await, "MISS", "/inv/missed v2");
    expect(&sget(&a, "/inv/missed").await, "HIT-L2", "/inv/missed v2");
}

/// The number of clients Redis holds back (`CLIENT PAUSE` postpones their commands).
fn blocked_clients(redis: &RedisServer) -> u64 {
    redis
        .cli(&["info", "clients"])
        .lines()
        .find_map(|line| line.strip_prefix("blocked_clients:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// B fetched the old response before A's purge, and its writes reached Redis just after A's
/// deletion, before B heard of the purge (Redis's `CLIENT PAUSE WRITE` holds the commands back, then
/// runs them in arrival order). Hearing of the purge, B recognises what it wrote and deletes it, so
/// nobody serves the purged response from L2. With `vary`, what B writes is the URL's vary record
/// and one variant: the record alone would make every variant stored before the purge reachable
/// again.
async fn late_write_is_taken_back(vary: bool) {
    let redis = RedisServer::start();
    let gate = Arc::new(Notify::new());
    let origin = {
        let gate = gate.clone();
        MockOrigin::start(move |r| {
            let reply = if r.hit == 1 {
                Reply::gated("old", gate.clone(), " body")
            } else {
                Reply::ok("new body")
            };
            let reply = reply.cc("max-age=300");
            if vary {
                reply.header("vary", "accept-language")
            } else {
                reply
            }
        })
        .await
    };
    let a = instance(&origin, &redis, ADMIN).await;
    let b = instance(&origin, &redis, ADMIN).await;

    // B leads the fill (its fleet lock is taken) and waits for the rest of the old body.
    let url = b.url("/inv/late");
    let b_request = tokio::spawn(async move { get(&url, &[("host", HOST)]).await });
    wait_until("the origin has B's request", || {
        origin.hits("/inv/late") == 1
    })
    .await;

    assert_eq!(redis.cli(&["client", "pause", "10000", "write"]), "OK");
    let purging = purge(&a, json!({"key": "shared.test/inv/late"}));
    let racing = async {
        wait_until("A's UNLINK waits in Redis", || blocked_clients(&redis) == 1).await;
        gate.notify_one();
        wait_until("B's first SET waits behind it", || {
            blocked_clients(&redis) == 2
        })
        .await;
        assert_eq!(redis.cli(&["client", "unpause"]), "OK");
    };
    let (reply, ()) = tokio::join!(purging, racing);
    assert_eq!(reply["broadcast"], json!(true), "{reply}");
    expect(&b_request.await.unwrap(), "MISS", "old body");

    let written = if vary { 2 } else { 1 };
    wait_until("B takes its writes back", || {
        b.stats().l2_writes_overtaken >= written
    })
    .await;
    let left: Vec<String> = redis
        .keys()
        .into_iter()
        .filter(|k| k.starts_with(&entry_key("/inv/late")))
        .collect();
    assert!(left.is_empty(), "L2 still holds {left:?}");
    expect(&sget(&a, "/inv/late").await, "MISS", "new body");
    assert_eq!(origin.hits("/inv/late"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_lands_after_another_instances_purge_is_taken_back() {
    late_write_is_taken_back(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vary_record_that_lands_after_another_instances_purge_is_taken_back() {
    late_write_is_taken_back(true).await;
}

/// An instance listens for invalidations before it serves (start-up waits for its subscription,
/// as it waits for Redis): served earlier, its L1 would be flushed when the subscription came, and
/// the L2 reads under way then discarded. Redis refuses B's first SUBSCRIBE here (an ACL), so B's
/// subscription comes late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_listens_for_invalidations_before_it_serves() {
    let redis = RedisServer::start();
    let origin = versioned_origin("max-age=300").await;
    let a = instance(&origin, &redis, ADMIN).await;
    expect(&sget(&a, "/inv/early").await, "MISS", "/inv/early v1");
    flush_l2(&a).await;

    assert_eq!(
        redis.cli(&["acl", "setuser", "default", "-subscribe"]),
        "OK"
    );
    let b = instance(&origin, &redis, ADMIN).await;
    let url = b.url("/inv/early");
    let first = tokio::spawn(async move { get(&url, &[("host", HOST)]).await });
    wait_until("Redis refuses B's SUBSCRIBE", || {
        redis.cli(&["acl", "log"]).contains("subscribe")
    })
    .await;
    assert_eq!(
        redis.cli(&["acl", "setuser", "default", "+subscribe"]),
        "OK"
    );
    expect(&first.await.unwrap(), "HIT-L2", "/inv/early v1");
    wait_until("B listens", || b.stats().pubsub_reconnects >= 1).await;
    // Answered after B listened, the first request's copy was not flushed.
    expect(&sget(&b, "/inv/early").await, "HIT-L1", "/inv/early v1");
    // And B does listen (fred reports the refused SUBSCRIBE as done: B checks and tries again).
    purge(&a, json!({"key": "shared.test/inv/early"})).await;
    wait_until("B applies A's purge", || {
        b.stats().invalidations_applied >= 1
    })
    .await;
    expect(&sget(&b, "/inv/early").await, "MISS", "/inv/early v2");
}

/// A hard tag purge reads the tag's set page by page (SSCAN, 1,000 names a page) and forgets the
/// names it purged, so the set goes once emptied; a soft one leaves the set, whose entries stay
/// (stale) and may be purged again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_purge_pages_through_a_large_tag() {
    let redis = RedisServer::start();
    let origin = MockOrigin::start(|r| {
        Reply::ok(format!("v{}", r.hit))
            .cc("max-age=300")
            .header("surrogate-key", "big")
    })
    .await;
    let a = instance(&origin, &redis, ADMIN).await;
    for path in ["/big/1", "/big/2"] {
        expect(&sget(&a, path).await, "MISS", "v1");
    }
    flush_l2(&a).await;
    // 2,500 more names in the index (entries purged by hand since, say): three pages.
    let set = "strata:tz:big";
    let names: Vec<String> = (0..2500).map(|i| format!("{HOST}/gone/{i}")).collect();
    let mut zadd = vec!["zadd", set];
    for name in &names {
        zadd.extend(["1e15", name.as_str()]);
    }
    assert_eq!(redis.cli(&zadd), "2500");
    assert_eq!(redis.cli(&["zcard", set]), "2502");

    let soft = purge(&a, json!({"tags": ["big"], "soft": true})).await;
    assert_eq!(soft["l2_removed"], 2, "{soft}");
    assert_eq!(
        redis.cli(&["zcard", set]),
        "2502",
        "a soft purge keeps the set"
    );

    let hard = purge(&a, json!({"tags": ["big"]})).await;
    assert_eq!(hard["l2_removed"], 2, "{hard}");
    assert_eq!(
        redis.cli(&["exists", set]),
        "0",
        "every page was read and forgotten"
    );
    for path in ["/big/1", "/big/2"] {
        assert_eq!(redis.cli(&["exists", &entry_key(path)]), "0", "{path}");
        expect(&sget(&a, path).await, "MISS", "v2");
    }
    flush_l2(&a).await;
    assert_eq!(
        redis.cli(&["zcard", set]),
        "2",
        "refilled entries are indexed again"
    );
}

/// A tag's index forgets the names of entries that expired as new names come: URLs that differ
/// only in their query (a crawler, a cache-buster) no longer grow it in Redis for as long as the
/// tag is written, and a purge does not page through them. A name stays a minute past its entry's
/// expiry, for instances whose clocks differ.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_index_drops_the_names_of_expired_entries() {
    let redis = RedisServer::start();
    let origin = MockOrigin::start(|_| {
        Reply::ok("tagged")
            .cc("max-age=300")
            .header("surrogate-key", "crawled")
    })
    .await;
    let a = instance(&origin, &redis, ADMIN).await;
    let index = "strata:tz:crawled";
    expect(&sget(&a, "/first").await, "MISS", "tagged");
    flush_l2(&a).await;
    // Names whose entries expired long ago (crawled URLs), and one that expired 30 s ago.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let recent = (now_ms - 30_000).to_string();
    let mut zadd = vec!["zadd", index, &recent, "shared.test/recent"];
    let names: Vec<String> = (0..1000).map(|n| format!("shared.test/q?n={n}")).collect();
    for name in &names {
        zadd.extend(["1000", name.as_str()]);
    }
    assert_eq!(redis.cli(&zadd), "1001");

    expect(&sget(&a, "/second").await, "MISS", "tagged");
    flush_l2(&a).await;
    assert_eq!(
        redis.cli(&["zrange", index, "0", "-1"]),
        "shared.test/recent\nshared.test/first\nshared.test/second"
    );
    assert!(
        redis.cli(&["pttl", index]).parse::<i64>().unwrap() > 0,
        "the index still expires"
    );
}

/// An index written by an earlier version (a plain set under `t:`) is still purged: entries it
/// names go, and so does the set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_purge_also_reads_an_earlier_versions_set() {
    let redis = RedisServer::start();
    let origin = versioned_origin("max-age=300").await;
    let a = instance(&origin, &redis, ADMIN).await;
    expect(&sget(&a, "/tagged/old").await, "MISS", "/tagged/old v1");
    expect(&sget(&a, "/tagged/new").await, "MISS", "/tagged/new v1");
    flush_l2(&a).await;
    // As the earlier version left it: the name in a plain set, not in the sorted one.
    let name = "shared.test/tagged/old";
    assert_eq!(redis.cli(&["zrem", "strata:tz:grp", name]), "1");
    assert_eq!(redis.cli(&["sadd", "strata:t:grp", name]), "1");

    let v = purge(&a, json!({"tags": ["grp"]})).await;
    assert_eq!(v["l2_removed"], 2, "{v}");
    for path in ["/tagged/old", "/tagged/new"] {
        assert_eq!(redis.cli(&["exists", &entry_key(path)]), "0", "{path}");
    }
    assert_eq!(redis.cli(&["exists", "strata:t:grp"]), "0");
    assert_eq!(redis.cli(&["exists", "strata:tz:grp"]), "0");
}

/// A fill's SET that times out may still land in Redis; its tags are indexed all the same, so a
/// tag purge finds it (it used to be indexed only after a SET that answered in time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_whose_set_timed_out_is_still_found_by_a_tag_purge() {
    let redis = RedisServer::start();
    let origin = versioned_origin("max-age=300").await;
    let a = instance(
        &origin,
        &redis,
        &[("ADMIN_TOKEN", TOKEN), ("REDIS_TIMEOUT", "200ms")],
    )
    .await;

    // Writes wait in Redis past REDIS_TIMEOUT: the fill lock, the entry's SET and then its tag
    // SADD time out here, and land when Redis takes writes again.
    assert_eq!(redis.cli(&["client", "pause", "10000", "write"]), "OK");
    expect(&sget(&a, "/tagged/late").await, "MISS", "/tagged/late v1");
    wait_until("the lock, the SET and the SADD timed out here", || {
        a.stats().l2_timeouts >= 3
    })
    .await;
    assert_eq!(redis.cli(&["client", "unpause"]), "OK");
    flush_l2(&a).await;
    let entry = "strata:e:shared.test/tagged/late";
    wait_until("the SET landed", || redis.cli(&["exists", entry]) == "1").await;
    wait_until("its name is in the tag's index", || {
        !redis
            .cli(&["zscore", "strata:tz:grp", "shared.test/tagged/late"])
            .is_empty()
    })
    .await;

    let v = purge(&a, json!({"tags": ["grp"]})).await;
    assert_eq!(v["l2_removed"], 1, "{v}");
    assert_eq!(redis.cli(&["exists", entry]), "0");
}

/// A POST's invalidation (RFC 9111 §4.4) goes to Redis and the fleet off the response path;
/// `flush_l2`, which a clean shutdown awaits, waits for it (the shutdown used to cut it off).
/// Redis holds writes for half a second, so the invalidation is still under way when the POST
/// has been answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_l2_waits_for_an_unsafe_methods_invalidation() {
    let redis = RedisServer::start();
    let origin = versioned_origin("max-age=300").await;
    let a = instance(&origin, &redis, ADMIN).await;
    expect(&sget(&a, "/inv/posted").await, "MISS", "/inv/posted v1");
    flush_l2(&a).await;
    let entry = "strata:e:shared.test/inv/posted";
    assert_eq!(redis.cli(&["exists", entry]), "1");

    assert_eq!(redis.cli(&["client", "pause", "500", "write"]), "OK");
    let r = request(
        "POST",
        &a.url("/inv/posted"),
        &[("host", HOST)],
        bytes::Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.text());
    flush_l2(&a).await;
    assert_eq!(
        redis.cli(&["exists", entry]),
        "0",
        "flush_l2 returned before the invalidation"
    );
}
