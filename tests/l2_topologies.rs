//! Redis L2 on real topologies: a failover list of two stores (down the list when the first dies,
//! back up when it returns), a Sentinel group through a forced failover, and a three-master
//! Cluster (entries spread over slots, the cross-instance fill lock without CROSSSLOT).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use support::fleet::*;
use support::redis::RedisServer;
use support::topology::{Cluster, SentinelGroup};
use support::*;

/// REDIS_TIMEOUT for these tests: they assert where entries are, so a call stalled for a moment on
/// a loaded 2-core box (several Redis processes per test) must not turn a HIT-L2 into a MISS. A
/// dead store still fails at once (connection refused), so this does not slow any failover down.
const TOPOLOGY_REDIS_TIMEOUT: &str = "500ms";

/// An origin answering `body of {path}`, fresh for 5 minutes.
async fn path_origin() -> MockOrigin {
    MockOrigin::start(|r| Reply::ok(format!("body of {}", r.path)).cc("max-age=300")).await
}

/// POST /purge with `body` on `proxy` (no admin token in these tests); asserts 200 and returns
/// the reply.
async fn purge_on(proxy: &TestProxy, body: &str) -> serde_json::Value {
    let purged = request(
        "POST",
        &proxy.admin_url("/purge"),
        &[("content-type", "application/json")],
        body.to_string(),
    )
    .await;
    assert_eq!(purged.status, 200, "{}", purged.text());
    serde_json::from_str(&purged.text()).unwrap()
}

/// Every answer seen while a topology changes: anything but `200 body of {path}` is a failure.
#[derive(Default)]
struct Answers {
    total: usize,
    failures: Vec<String>,
    labels: Vec<String>,
}

impl Answers {
    /// GET `path` on `proxy` (named `who`), records the answer and returns it.
    async fn get(&mut self, who: &str, proxy: &TestProxy, path: &str) -> Resp {
        let r = sget(proxy, path).await;
        self.total += 1;
        self.labels.push(format!("{who}{path}={}", r.x_cache()));
        if r.status != 200 || r.text() != format!("body of {path}") {
            self.failures.push(format!(
                "{who} {path}: {} {:?} {:?}",
                r.status,
                r.x_cache(),
                r.text()
            ));
        }
        r
    }

    /// The last `n` X-Cache labels, for failure messages.
    fn recent(&self, n: usize) -> &[String] {
        &self.labels[self.labels.len().saturating_sub(n)..]
    }

    #[track_caller]
    fn assert_all_ok(&self, during: &str) {
        assert!(
            self.failures.is_empty(),
            "{} of {} answers failed {during}: {:?}",
            self.failures.len(),
            self.total,
            self.failures
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_list_moves_down_when_the_first_store_dies_and_back_when_it_returns() {
    let mut r1 = RedisServer::start();
    let r2 = RedisServer::start();
    let origin = path_origin().await;
    let url = format!("{},{}", r1.url(), r2.url());
    let a = instance_at(&origin, &url, TOPOLOGY_REDIS_TIMEOUT, &[]).await;
    let b = instance_at(&origin, &url, TOPOLOGY_REDIS_TIMEOUT, &[]).await;

    // Both healthy: the first store serves reads and writes, the second is untouched.
    expect(&sget(&a, "/k1").await, "MISS", "body of /k1");
    flush_l2(&a).await;
    expect(&sget(&b, "/k1").await, "HIT-L2", "body of /k1");
    assert_eq!(r1.cli(&["exists", &entry_key("/k1")]), "1", "in R1");
    assert_eq!(
        r2.cli(&["exists", &entry_key("/k1")]),
        "0",
        "R2 written while R1 was healthy; R2 keys: {:?}",
        r2.keys()
    );

    // R1 dies: both instances move to R2 (a key filled on A is found by B there).
    r1.kill();
    let mut answers = Answers::default();
    let deadline = Instant::now() + secs(15);
    let mut n = 0;
    let on_r2 = loop {
        n += 1;
        let path = format!("/after-kill/{n}");
        answers.get("A", &a, &path).await;
        flush_l2(&a).await;
        if answers.get("B", &b, &path).await.x_cache() == "HIT-L2" {
            break path;
        }
        assert!(
            Instant::now() < deadline,
            "A and B did not share R2 within 15 s of R1's death; recent: {:?}; A {:?}; B {:?}",
            answers.recent(10),
            a.stats(),
            b.stats()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    answers.assert_all_ok("while R1 was down");
    assert_eq!(
        r2.cli(&["exists", &entry_key(&on_r2)]),
        "1",
        "B's HIT-L2 for {on_r2} must come from R2; R2 keys: {:?}",
        r2.keys()
    );

    // R1 back on its port (empty): both instances return to the first store.
    r1.restart();
    let deadline = Instant::now() + secs(15);
    let mut n = 0;
    let back = loop {
        n += 1;
        let path = format!("/after-restart/{n}");
        answers.get("A", &a, &path).await;
        flush_l2(&a).await;
        if r1.cli(&["exists", &entry_key(&path)]) == "1"
            && answers.get("B", &b, &path).await.x_cache() == "HIT-L2"
        {
            break path;
        }
        assert!(
            Instant::now() < deadline,
            "A and B did not return to R1 within 15 s of its restart; R1 keys: {:?}; \
                 recent: {:?}; A {:?}; B {:?}",
            r1.keys(),
            answers.recent(10),
            a.stats(),
            b.stats()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    answers.assert_all_ok("around R1's restart");
    assert_eq!(
        r2.cli(&["exists", &entry_key(&back)]),
        "0",
        "{back} was written to R2 although R1 was back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_is_followed_to_the_new_master() {
    let group = SentinelGroup::start();
    let origin = path_origin().await;
    let url = group.url();
    let a = instance_at(&origin, &url, TOPOLOGY_REDIS_TIMEOUT, &[]).await;
    let b = instance_at(&origin, &url, TOPOLOGY_REDIS_TIMEOUT, &[]).await;
    let mut answers = Answers::default();

    answers.get("A", &a, "/before").await;
    flush_l2(&a).await;
    let r = answers.get("B", &b, "/before").await;
    assert_eq!(
        r.x_cache(),
        "HIT-L2",
        "B through Sentinel; A {:?}; B {:?}",
        a.stats(),
        b.stats()
    );
    assert_eq!(
        group.master.cli(&["exists", &entry_key("/before")]),
        "1",
        "the entry is on the master the sentinels named"
    );

    // Both instances listen for the switch on every sentinel before it happens.
    for sentinel in &group.sentinels {
        wait_until_for(
            "both instances subscribed to +switch-master",
            secs(10),
            || {
                let clients = sentinel.cli(&["client", "list"]);
                clients
                    .lines()
                    .filter(|line| line.contains(" sub=1 "))
                    .count()
                    >= 2
            },
        )
        .await;
    }

    // Forced failover: the replica becomes the master.
    group.failover();
    let deadline = Instant::now() + secs(15);
    while group.master_port() != Some(group.replica.port) {
        assert!(
            Instant::now() < deadline,
            "the sentinel still names {:?}, not the replica's port {}, 15 s after SENTINEL FAILOVER",
            group.master_port(),
            group.replica.port
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Strata follows: a key filled on A after the switch is found by B, and it is on the new
    // master (the old master would not have it: it stopped replicating from it). On the sentinels'
    // `+switch-master` announcement, within a second here; without it, only once the sentinels
    // demote the old master and close its clients' connections, about 10 s after the switch.
    let deadline = Instant::now() + secs(5);
    let mut n = 0;
    let followed = loop {
        n += 1;
        let path = format!("/after-failover/{n}");
        answers.get("A", &a, &path).await;
        flush_l2(&a).await;
        let hit = answers.get("B", &b, &path).await.x_cache() == "HIT-L2";
        if hit && group.replica.cli(&["exists", &entry_key(&path)]) == "1" {
            break path;
        }
        assert!(
            Instant::now() < deadline,
            "no HIT-L2 from the new master within 5 s of the failover; new master keys: \
                 {:?}; recent: {:?}; A {:?}; B {:?}",
            group.replica.keys(),
            answers.recent(10),
            a.stats(),
            b.stats()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    answers.assert_all_ok("through the Sentinel failover");
    // Three sentinels announce the switch; each instance moves once.
    for (name, instance) in [("A", &a), ("B", &b)] {
        assert_eq!(
            instance.stats().l2_failovers_followed,
            1,
            "{name}: {:?}",
            instance.stats()
        );
    }
    let role = group.replica.cli(&["role"]);
    assert!(
        role.starts_with("master"),
        "{followed}: the replica's ROLE after the failover: {role:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_spreads_entries_and_locks_without_crossslot() {
    let cluster = Cluster::start();
    let origin = MockOrigin::start(|r| {
        let reply = Reply::ok(format!("body of {}", r.path)).cc("max-age=300");
        if r.path.starts_with("/tagged/") {
            return reply.header("surrogate-key", "cluster-tag");
        }
        if r.path == "/cold" {
            // Long enough for the concurrent requests to overlap the fill.
            reply.delay(Duration::from_millis(300))
        } else {
            reply
        }
    })
    .await;
    let url = cluster.url();
    let a = instance_at(&origin, &url, TOPOLOGY_REDIS_TIMEOUT, &[]).await;
    let b = instance_at(&origin, &url, TOPOLOGY_REDIS_TIMEOUT, &[]).await;

    // 30 keys over the slots: all filled by A, all found by B.
    let paths: Vec<String> = (0..30).map(|i| format!("/spread/{i}")).collect();
    for path in &paths {
        expect(&sget(&a, path).await, "MISS", &format!("body of {path}"));
    }
    flush_l2(&a).await;
    for path in &paths {
        let r = sget(&b, path).await;
        assert_eq!(
            (r.status.as_u16(), r.x_cache(), r.text()),
            (200, "HIT-L2", format!("body of {path}")),
            "B {path}; A {:?}; B {:?}",
            a.stats(),
            b.stats()
        );
    }
    let per_node = cluster.keys_per_node();
    let entries: Vec<usize> = per_node
        .iter()
        .map(|keys| keys.iter().filter(|k| k.starts_with("strata:e:")).count())
        .collect();
    assert_eq!(
        entries.iter().sum::<usize>(),
        30,
        "entries per node: {entries:?}; keys: {per_node:?}"
    );
    assert!(
        entries.iter().filter(|&&n| n > 0).count() >= 2,
        "30 keys should spread over the masters: {entries:?}"
    );
    for path in &paths {
        assert_eq!(origin.hits(path), 1, "{path}");
    }

    // The cross-instance fill lock works on a cluster: 20 concurrent requests, one origin fetch.
    let urls: [Arc<str>; 2] = [a.url("/cold").into(), b.url("/cold").into()];
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let url = urls[i % 2].clone();
            tokio::spawn(async move { get(&url, &[("host", HOST)]).await })
        })
        .collect();
    let mut labels = Vec::new();
    for t in tasks {
        let r = within("concurrent GET", secs(20), t).await.unwrap();
        assert_eq!(
            (r.status.as_u16(), r.text().as_str()),
            (200, "body of /cold")
        );
        labels.push(r.x_cache().to_string());
    }
    assert_eq!(
        origin.hits("/cold"),
        1,
        "the fleet must reach the origin once; X-Cache: {labels:?}; A {:?}; B {:?}",
        a.stats(),
        b.stats()
    );
    assert_eq!(
        labels.iter().filter(|l| *l == "MISS").count(),
        1,
        "one request fetched; X-Cache: {labels:?}"
    );
    assert!(
        labels
            .iter()
            .all(|l| matches!(l.as_str(), "MISS" | "HIT-L1" | "HIT-L2")),
        "X-Cache: {labels:?}"
    );
    flush_l2(&a).await;
    flush_l2(&b).await;
    assert!(cluster.exists(&entry_key("/cold")), "the /cold entry");
    // A CROSSSLOT (or any other) error would count here.
    assert_eq!(
        (a.stats().l2_errors, b.stats().l2_errors),
        (0, 0),
        "A {:?}; B {:?}",
        a.stats(),
        b.stats()
    );

    // A pattern purge reaches every master: SCAN on each, the UNLINKs of a page in one pipeline
    // that the client routes key by key.
    let reply = purge_on(&a, r#"{"pattern": "*/spread/*"}"#).await;
    assert_eq!(
        (&reply["l2_removed"], &reply["l2_pending"]),
        (&serde_json::json!(30), &serde_json::json!(false)),
        "{reply}"
    );
    let left: Vec<String> = cluster
        .keys_per_node()
        .concat()
        .into_iter()
        .filter(|k| k.contains("/spread/"))
        .collect();
    assert!(left.is_empty(), "left after the purge: {left:?}");
    assert!(cluster.exists(&entry_key("/cold")), "/cold is not matched");
    assert_eq!(a.stats().l2_errors, 0, "A {:?}", a.stats());

    // A tag purge on a cluster: the tag's index is read page by page on its node (ZSCAN), its
    // entries are unlinked on theirs, and the index forgets them (ZREM, then PTTL key by key).
    let tagged: Vec<String> = (0..10).map(|i| format!("/tagged/{i}")).collect();
    for path in &tagged {
        expect(&sget(&a, path).await, "MISS", &format!("body of {path}"));
    }
    flush_l2(&a).await;
    let set = "strata:tz:cluster-tag";
    assert!(cluster.exists(set), "the tag's set");
    let reply = purge_on(&a, r#"{"tags": ["cluster-tag"]}"#).await;
    assert_eq!(
        (&reply["l2_removed"], &reply["l2_pending"]),
        (&serde_json::json!(10), &serde_json::json!(false)),
        "{reply}"
    );
    for path in &tagged {
        assert!(
            !cluster.exists(&entry_key(path)),
            "{path} left after the tag purge"
        );
    }
    assert!(!cluster.exists(set), "the emptied set is gone");
    assert_eq!(a.stats().l2_errors, 0, "A {:?}", a.stats());
}
