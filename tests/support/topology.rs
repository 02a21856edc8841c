//! Real Redis topologies for the L2 tests, built from [`RedisServer`]s and real Sentinel processes:
//! a Sentinel group (master, replica, three sentinels) and a three-master Cluster.
//!
//! Every process is owned: dropping a topology kills its processes and removes their temp dirs
//! (sentinels first, so they cannot reconfigure servers that are going away). Only
//! std::process and polling against deadlines here; a topology that does not come up fails the
//! test with what the servers said.

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::redis::{await_pong, kill_and_wait, unique_dir, RedisServer};

/// How long a topology may take to become ready (replica in sync, sentinels agreeing, cluster ok).
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Free ports to try when another process takes the one picked first.
const PORT_ATTEMPTS: usize = 5;

// ---------------------------------------------------------------------------------------------
// Binaries (same rules as support::redis: PATH, else the unpack under target/test-deps/redis)

/// A command for `name` (`redis-server` or `redis-cli`), with stdin closed.
fn command(name: &str) -> Command {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    });
    let mut cmd = match on_path {
        Some(program) => Command::new(program),
        None => {
            let local = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-deps/redis");
            let program = local.join("usr/bin").join(name);
            assert!(
                program.is_file(),
                "{name} is needed by the L2 topology tests and is neither on PATH nor at {}: run \
                 `bash tests/run.sh` (it installs or unpacks Redis), or install Redis",
                program.display()
            );
            let mut cmd = Command::new(program);
            // The unpacked binaries need their shared libraries from the same unpack.
            let mut dirs: Vec<PathBuf> = std::fs::read_dir(local.join("usr/lib"))
                .map(|entries| {
                    entries
                        .filter_map(Result::ok)
                        .map(|e| e.path())
                        .filter(|p| p.is_dir())
                        .collect()
                })
                .unwrap_or_default();
            if let Some(existing) = std::env::var_os("LD_LIBRARY_PATH") {
                dirs.extend(std::env::split_paths(&existing));
            }
            let ld: OsString = std::env::join_paths(dirs).expect("LD_LIBRARY_PATH entries");
            cmd.env("LD_LIBRARY_PATH", ld);
            cmd
        }
    };
    cmd.stdin(Stdio::null());
    cmd
}

/// `redis-cli -h 127.0.0.1 -p PORT args...`: stdout trimmed, or Err with stderr when it failed.
fn try_cli(port: u16, args: &[&str]) -> Result<String, String> {
    let out = command("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .map_err(|e| format!("running redis-cli: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "redis-cli -p {port} {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Like [`try_cli`], failing the test when redis-cli fails.
fn cli(port: u16, args: &[&str]) -> String {
    try_cli(port, args).unwrap_or_else(|e| panic!("{e}"))
}

/// `name:value` lines of an INFO answer (or alternating name/value lines of a SENTINEL MASTER
/// answer) as a lookup.
fn field<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    if let Some(value) = lines
        .iter()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(':')))
    {
        return Some(value);
    }
    lines
        .iter()
        .position(|l| *l == name)
        .and_then(|at| lines.get(at + 1).copied())
}

/// Polls `check` every 50 ms until it returns Ok; panics with the last Err after `limit`.
fn poll(what: &str, limit: Duration, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + limit;
    loop {
        let last = match check() {
            Ok(()) => return,
            Err(e) => e,
        };
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}; last state: {last}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A free local port other than Redis' defaults (bound, then released).
fn free_port() -> u16 {
    loop {
        let port = super::free_addr().port();
        if port != 6379 && port != 26379 {
            return port;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sentinel

/// One `redis-server <conf> --sentinel` process with its own directory and config file (Sentinel
/// rewrites its config, so each needs a file of its own).
pub struct SentinelProcess {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl SentinelProcess {
    /// Starts a sentinel monitoring `service` at 127.0.0.1:`master_port` (quorum 2, down after
    /// 1 s, failover timeout 3 s) and waits for PONG.
    fn start(service: &str, master_port: u16) -> SentinelProcess {
        let dir = unique_dir("sentinel");
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let mut sentinel = SentinelProcess {
            port: 0,
            dir,
            child: None,
        };
        let mut last_error = String::new();
        for _ in 0..PORT_ATTEMPTS {
            sentinel.port = free_port();
            match sentinel.spawn_and_wait(service, master_port) {
                Ok(()) => return sentinel,
                Err(e) => last_error = e,
            }
        }
        panic!("sentinel did not start after {PORT_ATTEMPTS} attempts: {last_error}");
    }

    fn spawn_and_wait(&mut self, service: &str, master_port: u16) -> Result<(), String> {
        let conf = self.dir.join("sentinel.conf");
        let dir = self.dir.display();
        std::fs::write(
            &conf,
            format!(
                "port {port}\n\
                 bind 127.0.0.1\n\
                 daemonize no\n\
                 logfile {dir}/sentinel.log\n\
                 dir {dir}\n\
                 sentinel monitor {service} 127.0.0.1 {master_port} 2\n\
                 sentinel down-after-milliseconds {service} 1000\n\
                 sentinel failover-timeout {service} 3000\n\
                 sentinel parallel-syncs {service} 1\n",
                port = self.port
            ),
        )
        .map_err(|e| format!("writing {}: {e}", conf.display()))?;
        let child = command("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                File::create(self.dir.join("stderr.log")).map_err(|e| e.to_string())?,
            ))
            .spawn()
            .unwrap_or_else(|e| panic!("spawning redis-server --sentinel: {e}"));
        let port = self.port;
        let child = await_pong("sentinel", port, &self.dir, "sentinel.log", child, || {
            try_cli(port, &["ping"]).is_ok_and(|out| out == "PONG")
        })?;
        self.child = Some(child);
        Ok(())
    }

    /// Runs redis-cli against this sentinel; stdout trimmed.
    pub fn cli(&self, args: &[&str]) -> String {
        cli(self.port, args)
    }

    fn reap(&mut self) {
        kill_and_wait(&mut self.child);
    }
}

impl Drop for SentinelProcess {
    fn drop(&mut self) {
        self.reap();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A master, one replica of it and three sentinels monitoring it as [`SentinelGroup::SERVICE`].
pub struct SentinelGroup {
    /// Dropped first (see Drop), so no sentinel acts on servers being torn down.
    pub sentinels: Vec<SentinelProcess>,
    /// The master at start-up (a replica after a failover).
    pub master: RedisServer,
    /// The replica at start-up (the master after a failover).
    pub replica: RedisServer,
}

impl SentinelGroup {
    pub const SERVICE: &'static str = "mymaster";

    /// Starts the servers, waits until the replica is in sync, starts three sentinels and waits
    /// until each reports the master and knows the replica and the other two sentinels.
    pub fn start() -> SentinelGroup {
        // A diskless full sync would wait 5 s (repl-diskless-sync-delay) for more replicas.
        let master = RedisServer::start_with(&["--repl-diskless-sync-delay", "0"]);
        let master_port = master.port.to_string();
        let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &master_port]);
        poll("the replica to be in sync", READY_TIMEOUT, || {
            let on_master = master.cli(&["info", "replication"]);
            let on_replica = replica.cli(&["info", "replication"]);
            let synced = field(&on_master, "connected_slaves") == Some("1")
                && field(&on_master, "slave0").is_some_and(|s| s.contains("state=online"))
                && field(&on_replica, "master_link_status") == Some("up");
            if synced {
                Ok(())
            } else {
                Err(format!("master:\n{on_master}\nreplica:\n{on_replica}"))
            }
        });

        let sentinels: Vec<SentinelProcess> = (0..3)
            .map(|_| SentinelProcess::start(Self::SERVICE, master.port))
            .collect();
        let group = SentinelGroup {
            sentinels,
            master,
            replica,
        };
        poll(
            "three sentinels agreeing on the master and knowing the replica",
            READY_TIMEOUT,
            || {
                for sentinel in &group.sentinels {
                    let reported = group.master_port_from(sentinel);
                    if reported != Some(group.master.port) {
                        return Err(format!(
                            "sentinel {} reports master port {reported:?}, want {}",
                            sentinel.port, group.master.port
                        ));
                    }
                    let state = try_cli(sentinel.port, &["sentinel", "master", Self::SERVICE])?;
                    let ready = field(&state, "num-slaves") == Some("1")
                        && field(&state, "num-other-sentinels") == Some("2")
                        && field(&state, "flags") == Some("master");
                    if !ready {
                        return Err(format!("sentinel {}:\n{state}", sentinel.port));
                    }
                }
                Ok(())
            },
        );
        group
    }

    /// `redis-sentinel://127.0.0.1:S1?sentinelServiceName=mymaster&node=127.0.0.1:S2&node=...`
    /// (fred's syntax: the host and every `node` are sentinels).
    pub fn url(&self) -> String {
        let mut url = format!(
            "redis-sentinel://127.0.0.1:{}?sentinelServiceName={}",
            self.sentinels[0].port,
            Self::SERVICE
        );
        for sentinel in &self.sentinels[1..] {
            url.push_str(&format!("&node=127.0.0.1:{}", sentinel.port));
        }
        url
    }

    fn master_port_from(&self, sentinel: &SentinelProcess) -> Option<u16> {
        let out = try_cli(
            sentinel.port,
            &["sentinel", "get-master-addr-by-name", Self::SERVICE],
        )
        .ok()?;
        let mut lines = out.lines().map(str::trim);
        match (lines.next(), lines.next()) {
            (Some("127.0.0.1"), Some(port)) => port.parse().ok(),
            _ => None,
        }
    }

    /// The master port the first sentinel reports now (None if it cannot say).
    pub fn master_port(&self) -> Option<u16> {
        self.master_port_from(&self.sentinels[0])
    }

    /// Asks the first sentinel for a forced failover (`SENTINEL FAILOVER`), retrying while it
    /// answers that no replica is suitable yet or a failover is in progress. Returns once the
    /// sentinel accepted; the switch itself is observed with [`SentinelGroup::master_port`].
    pub fn failover(&self) {
        let sentinel = &self.sentinels[0];
        poll("SENTINEL FAILOVER to be accepted", READY_TIMEOUT, || {
            let out = try_cli(sentinel.port, &["sentinel", "failover", Self::SERVICE])?;
            if out == "OK" {
                Ok(())
            } else {
                Err(out)
            }
        });
    }
}

impl Drop for SentinelGroup {
    fn drop(&mut self) {
        // Sentinels first; the servers (and their dirs) go with the fields afterwards.
        self.sentinels.clear();
    }
}

// ---------------------------------------------------------------------------------------------
// Cluster

/// Three cluster-enabled masters sharing the 16384 slots (no replicas).
pub struct Cluster {
    pub nodes: Vec<RedisServer>,
}

impl Cluster {
    /// Starts three nodes, joins them with `redis-cli --cluster create` and waits until every node
    /// reports `cluster_state:ok`.
    pub fn start() -> Cluster {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                // An explicit bus port: the default (port + 10000) does not exist for ports above
                // 55535, which the kernel hands out as free ports.
                let bus_port = free_port().to_string();
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                    "--cluster-port",
                    &bus_port,
                ])
            })
            .collect();
        let addrs: Vec<String> = nodes.iter().map(RedisServer::addr).collect();
        let mut args = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        let out = cli(nodes[0].port, &args);
        assert!(
            out.contains("All 16384 slots covered"),
            "redis-cli --cluster create: {out}"
        );
        let cluster = Cluster { nodes };
        poll("cluster_state:ok on every node", READY_TIMEOUT, || {
            for node in &cluster.nodes {
                let info = node.cli(&["cluster", "info"]);
                if field(&info, "cluster_state") != Some("ok")
                    || field(&info, "cluster_known_nodes") != Some("3")
                {
                    return Err(format!("node {}:\n{info}", node.port));
                }
            }
            Ok(())
        });
        cluster
    }

    /// `redis-cluster://127.0.0.1:P1?node=127.0.0.1:P2&node=127.0.0.1:P3`
    pub fn url(&self) -> String {
        let mut url = format!("redis-cluster://{}", self.nodes[0].addr());
        for (i, node) in self.nodes[1..].iter().enumerate() {
            url.push(if i == 0 { '?' } else { '&' });
            url.push_str(&format!("node={}", node.addr()));
        }
        url
    }

    /// Runs `redis-cli -c` (following MOVED redirects) from the first node; stdout trimmed.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut all = vec!["-c"];
        all.extend_from_slice(args);
        self.nodes[0].cli(&all)
    }

    /// Whether `key` exists in the cluster (wherever its slot lives).
    pub fn exists(&self, key: &str) -> bool {
        self.cli(&["exists", key]) == "1"
    }

    /// The keys each node holds, in node order.
    pub fn keys_per_node(&self) -> Vec<Vec<String>> {
        self.nodes.iter().map(RedisServer::keys).collect()
    }
}
