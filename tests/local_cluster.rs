//! deploy/local-cluster.sh: the compose topology as local processes (Redis master + replica, three
//! sentinels, an origin, two Strata instances). Traffic flows, a purge on one instance reaches the
//! other, and when the master is killed Sentinel fails over while Strata keeps answering with zero
//! failed requests and uses L2 on the new master.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use support::*;

const HOST: &str = "shared.test";

/// The running cluster; stopped (every process) on drop.
struct Cluster {
    dir: PathBuf,
    env: HashMap<String, String>,
}

impl Cluster {
    fn start() -> Cluster {
        let root = env!("CARGO_MANIFEST_DIR");
        let dir = std::env::temp_dir().join(format!(
            "strata-local-cluster-{}-{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos()
        ));
        let output = Command::new("bash")
            .arg(format!("{root}/deploy/local-cluster.sh"))
            .arg("start")
            .arg(&dir)
            .env("STRATA_BIN", env!("CARGO_BIN_EXE_strata"))
            .output()
            .expect("running deploy/local-cluster.sh");
        // Built before the assertion so that a failed start still stops what did start.
        let mut cluster = Cluster {
            dir: dir.clone(),
            env: HashMap::new(),
        };
        assert!(
            output.status.success(),
            "local-cluster.sh start failed: {}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        cluster.env = String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| line.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        cluster
    }

    fn var(&self, name: &str) -> &str {
        self.env
            .get(name)
            .unwrap_or_else(|| panic!("{name} missing from cluster.env"))
    }

    fn url(&self, instance: u8, path: &str) -> String {
        format!(
            "http://127.0.0.1:{}{path}",
            self.var(&format!("STRATA{instance}_PORT"))
        )
    }

    fn admin_url(&self, instance: u8, path: &str) -> String {
        format!(
            "http://127.0.0.1:{}{path}",
            self.var(&format!("STRATA{instance}_ADMIN_PORT"))
        )
    }

    /// redis-cli against one of the cluster's Redis servers (as the script finds it).
    fn redis(&self, port: &str, args: &[&str]) -> String {
        let root = env!("CARGO_MANIFEST_DIR");
        let local = format!("{root}/target/test-deps/redis/usr/bin/redis-cli");
        let cli = if std::path::Path::new(&local).exists() {
            local
        } else {
            "redis-cli".to_string()
        };
        let libs: Vec<String> = std::fs::read_dir(format!("{root}/target/test-deps/redis/usr/lib"))
            .map(|dirs| {
                dirs.filter_map(Result::ok)
                    .map(|d| d.path().display().to_string())
                    .filter(|p| p.ends_with("-linux-gnu"))
                    .collect()
            })
            .unwrap_or_default();
        let output = Command::new(cli)
            .args(["-p", port, "--no-auth-warning"])
            .args(args)
            .env("LD_LIBRARY_PATH", libs.join(":"))
            .output()
            .expect("running redis-cli");
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }

    fn master_port_per_sentinel(&self) -> String {
        let port = self.var("SENTINEL1_PORT").to_string();
        self.redis(&port, &["sentinel", "get-master-addr-by-name", "mymaster"])
            .lines()
            .last()
            .unwrap_or_default()
            .to_string()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let root = env!("CARGO_MANIFEST_DIR");
        let _ = Command::new("bash")
            .arg(format!("{root}/deploy/local-cluster.sh"))
            .arg("stop")
            .arg(&self.dir)
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn sget(url: &str) -> Resp {
    get(url, &[("host", HOST)]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_cluster_serves_purges_and_survives_a_master_failover() {
    let cluster = Cluster::start();
    let token = format!("Bearer {}", cluster.var("ADMIN_TOKEN"));

    // Traffic flows and the fleet shares L2.
    let r = sget(&cluster.url(1, "/shared")).await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (200, "MISS"));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = sget(&cluster.url(2, "/shared")).await;
        assert_eq!(r.status, 200);
        if r.x_cache() == "HIT-L2" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "instance 2 never found instance 1's fill in L2"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(sget(&cluster.url(2, "/shared")).await.x_cache(), "HIT-L1");

    // A purge on instance 1 reaches instance 2.
    let purged = request(
        "POST",
        &cluster.admin_url(1, "/purge"),
        &[("authorization", &token)],
        bytes::Bytes::from_static(br#"{"key":"shared.test/shared"}"#),
    )
    .await;
    assert_eq!(purged.status, 200, "{}", purged.text());
    assert!(
        purged.text().contains("\"broadcast\":true"),
        "{}",
        purged.text()
    );
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let r = sget(&cluster.url(2, "/shared")).await;
        if r.x_cache() != "HIT-L1" {
            assert_eq!(r.x_cache(), "MISS", "after the purge");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the purge never reached instance 2"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // Kill the master under traffic: Sentinel promotes the replica, nothing fails.
    let replica_port = cluster.var("REPLICA_PORT").to_string();
    let mut failed = Vec::new();
    let mut answered = 0;
    let kill = Command::new("kill")
        .args(["-KILL", cluster.var("MASTER_PID")])
        .status()
        .unwrap();
    assert!(kill.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut failed_over = false;
    let mut l2_on_new_master = false;
    for n in 0.. {
        let path = format!("/after-kill/{n}");
        for instance in [1, 2] {
            let r = sget(&cluster.url(instance, &path)).await;
            answered += 1;
            if r.status != 200 || r.text() != format!("origin says {path}\n") {
                failed.push((instance, path.clone(), r.status.as_u16()));
            }
            if failed_over && instance == 2 && r.x_cache() == "HIT-L2" {
                let key = format!("strata:e:{HOST}{path}");
                let exists = cluster.redis(
                    &replica_port,
                    &["-a", cluster.var("REDIS_PASSWORD"), "exists", &key],
                );
                l2_on_new_master = exists == "1";
            }
        }
        failed_over = failed_over || cluster.master_port_per_sentinel() == replica_port;
        if l2_on_new_master {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no L2 hit through the new master within 30 s (failed over: {failed_over}); failures: {failed:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        failed.is_empty(),
        "{} of {answered} requests failed: {failed:?}",
        failed.len()
    );
    println!("{answered} requests across the failover, none failed");

    // Readiness reflects a working store again.
    let ready = get(
        &cluster.admin_url(2, "/ready"),
        &[("authorization", &token)],
    )
    .await;
    assert_eq!(ready.status, 200);
    assert!(
        ready.text().contains("\"redis\":\"up\""),
        "{}",
        ready.text()
    );
}
