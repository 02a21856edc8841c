//! The deployment files, checked without Docker or a cluster: docker-compose.cache.yml, config/,
//! deploy/Dockerfile, deploy/kubernetes/*.yaml and deploy/systemd/strata.service.
//!
//! - every file they reference exists;
//! - every variable they set on Strata is one Strata reads (the `pub const NAME: &str = "NAME";`
//!   lines of src/config.rs, read at test time), and config/strata.env lists every one of them, with
//!   a comment and the default of src/config.rs;
//! - ports agree: LISTEN_ADDR/ADMIN_ADDR vs compose `ports` and health checks, Kubernetes
//!   containerPort vs probes vs Service targetPort, Dockerfile EXPOSE;
//! - the Redis topology, the shutdown budget and the memory sizing are consistent.
//!
//! No YAML crate: the files are kept regular (block style, `KEY: value` maps, two-space indents)
//! and read with the small line-based extractor below, which fails loudly when it finds nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------------
// Files

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let path = root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

const COMPOSE: &str = "docker-compose.cache.yml";
const DOCKERFILE: &str = "deploy/Dockerfile";
const STRATA_ENV: &str = "config/strata.env";
const K8S_CONFIGMAP: &str = "deploy/kubernetes/configmap.yaml";
const K8S_DEPLOYMENT: &str = "deploy/kubernetes/deployment.yaml";
const K8S_SECRET: &str = "deploy/kubernetes/secret.example.yaml";
const K8S_SERVICE: &str = "deploy/kubernetes/service.yaml";
const K8S_PDB: &str = "deploy/kubernetes/pdb.yaml";
const K8S_HPA: &str = "deploy/kubernetes/hpa.yaml";

/// After SHUTDOWN_TIMEOUT, Strata spends up to this long writing queued entries to Redis before it
/// exits (src/server.rs): every supervisor's stop timeout must cover it too.
const L2_FLUSH_SECS: u64 = 2;

/// Every deployment file whose references to repository files are checked.
const DEPLOY_FILES: &[&str] = &[
    COMPOSE,
    DOCKERFILE,
    STRATA_ENV,
    "config/redis.conf",
    "config/sentinel.conf",
    "deploy/compose/redis-entrypoint.sh",
    "deploy/systemd/strata.service",
    "deploy/kubernetes/README.md",
    K8S_CONFIGMAP,
    K8S_DEPLOYMENT,
    K8S_SECRET,
    K8S_SERVICE,
    K8S_PDB,
    K8S_HPA,
];

// ---------------------------------------------------------------------------------------------
// What Strata reads

/// The variables Strata reads: every `pub const NAME: &str = "NAME";` of src/config.rs, plus
/// RUST_LOG (read by the logging filter).
fn strata_vars() -> BTreeSet<String> {
    let source = read("src/config.rs");
    let mut vars = BTreeSet::new();
    for line in source.lines() {
        let Some(rest) = line.trim().strip_prefix("pub const ") else {
            continue;
        };
        let Some((name, value)) = rest.split_once(": &str = ") else {
            continue;
        };
        let value = value.trim_end_matches(';').trim_matches('"');
        if name == value {
            vars.insert(name.to_string());
        }
    }
    vars.insert("RUST_LOG".to_string());
    for expected in [
        "ORIGIN_URL",
        "LISTEN_ADDR",
        "ADMIN_ADDR",
        "ADMIN_TOKEN",
        "REDIS_URL",
    ] {
        assert!(
            vars.contains(expected),
            "the scan of src/config.rs found no {expected}: {vars:?}"
        );
    }
    assert!(vars.len() >= 20, "too few variables found: {vars:?}");
    vars
}

/// The clap defaults of src/config.rs: `env = NAME, ..., default_value = "X"` on one `#[arg]` line.
fn strata_defaults() -> BTreeMap<String, String> {
    let source = read("src/config.rs");
    let mut defaults = BTreeMap::new();
    for line in source.lines().map(str::trim) {
        if !line.starts_with("#[arg(") {
            continue;
        }
        let Some(env) = field(line, "env = ") else {
            continue;
        };
        if let Some(default) = field(line, "default_value = ") {
            defaults.insert(env.to_string(), default.trim_matches('"').to_string());
        }
    }
    assert!(
        defaults.get("LISTEN_ADDR").map(String::as_str) == Some("0.0.0.0:8080"),
        "the scan of src/config.rs found no LISTEN_ADDR default: {defaults:?}"
    );
    defaults
}

/// The value of `name` in `a = 1, name = value, b = 2)]`.
fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let start = line.find(name)? + name.len();
    let rest = &line[start..];
    let end = rest.find([',', ')']).unwrap_or(rest.len());
    Some(rest[..end].trim())
}

fn assert_strata_vars(source: &str, names: &[String]) {
    let known = strata_vars();
    let unknown: Vec<&String> = names.iter().filter(|n| !known.contains(*n)).collect();
    assert!(
        unknown.is_empty(),
        "{source} sets {unknown:?}, which Strata does not read (known: {known:?})"
    );
}

// ---------------------------------------------------------------------------------------------
// A line-based reader for the block-style YAML of these files

#[derive(Debug, Clone)]
struct Line {
    indent: usize,
    /// Without indentation and without a trailing comment.
    text: String,
    number: usize,
}

/// The meaningful lines: no blank lines, no comment lines, no trailing `# ...` outside quotes.
/// Literal blocks (`key: |`) are kept: their lines are indented deeper than their key.
fn yaml_lines(source: &str) -> Vec<Line> {
    let mut lines = Vec::new();
    for (i, raw) in source.lines().enumerate() {
        let trimmed = raw.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed == "---" {
            continue;
        }
        assert!(
            !raw.starts_with('\t'),
            "line {}: tabs are not YAML indentation",
            i + 1
        );
        lines.push(Line {
            indent: raw.len() - trimmed.len(),
            text: strip_comment(trimmed).trim_end().to_string(),
            number: i + 1,
        });
    }
    lines
}

fn strip_comment(text: &str) -> &str {
    let (mut single, mut double) = (false, false);
    let bytes = text.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'\'' if !double => single = !single,
            b'"' if !single => double = !double,
            b'#' if !single && !double && i > 0 && bytes[i - 1] == b' ' => return &text[..i],
            _ => {}
        }
    }
    text
}

/// `key: value` → (key, value); `key:` → (key, "").
fn key_value(text: &str) -> Option<(&str, &str)> {
    let text = text.strip_prefix("- ").unwrap_or(text);
    let (key, value) = text.split_once(':')?;
    if key.is_empty() || key.contains(' ') || key.contains('"') {
        return None;
    }
    if !value.is_empty() && !value.starts_with(' ') {
        return None; // a scalar such as "127.0.0.1:9090:9090"
    }
    Some((key, value.trim()))
}

fn unquote(value: &str) -> &str {
    let v = value.trim();
    if v.len() >= 2
        && ((v.starts_with('"') && v.ends_with('"')) || (v.starts_with('\'') && v.ends_with('\'')))
    {
        &v[1..v.len() - 1]
    } else {
        v
    }
}

/// Where a line's key sits: a list item's key (`- name: x`) is one level deeper than its dash.
fn key_indent(line: &Line) -> usize {
    if line.text.starts_with("- ") {
        line.indent + 2
    } else {
        line.indent
    }
}

/// The lines nested under `key:` at the outermost level of `lines` (not deeper).
fn child_block(lines: &[Line], key: &str) -> Option<Vec<Line>> {
    let level = lines.iter().map(key_indent).min()?;
    let at = lines.iter().position(|l| {
        key_indent(l) == level && key_value(&l.text).is_some_and(|(k, _)| k == key)
    })?;
    let own = key_indent(&lines[at]);
    Some(
        lines[at + 1..]
            .iter()
            .take_while(|l| l.indent > own || (l.indent == own && l.text.starts_with("- ")))
            .cloned()
            .collect(),
    )
}

/// Follows `path` down from the top of `lines`; panics with `what` when a step is missing.
fn block(lines: &[Line], path: &[&str], what: &str) -> Vec<Line> {
    let mut current = lines.to_vec();
    for key in path {
        current = child_block(&current, key)
            .unwrap_or_else(|| panic!("{what}: no `{}` (looking for {path:?})", key));
    }
    current
}

/// The `key: value` pairs at the outermost indent of `lines` (a YAML mapping).
fn mapping(lines: &[Line]) -> Vec<(String, String)> {
    let Some(indent) = lines.iter().map(|l| l.indent).min() else {
        return Vec::new();
    };
    lines
        .iter()
        .filter(|l| l.indent == indent)
        .map(|l| {
            let (k, v) = key_value(&l.text)
                .unwrap_or_else(|| panic!("line {}: expected `KEY: value`: {}", l.number, l.text));
            (k.to_string(), unquote(v).to_string())
        })
        .collect()
}

/// The scalar items (`- value`) at the outermost indent of `lines` (a YAML sequence).
fn sequence(lines: &[Line]) -> Vec<String> {
    let Some(indent) = lines.iter().map(|l| l.indent).min() else {
        return Vec::new();
    };
    lines
        .iter()
        .filter(|l| l.indent == indent)
        .map(|l| {
            let item = l
                .text
                .strip_prefix("- ")
                .unwrap_or_else(|| panic!("line {}: expected `- item`: {}", l.number, l.text));
            unquote(item).to_string()
        })
        .collect()
}

/// The value of the first `key:` anywhere in `lines`.
fn scalar(lines: &[Line], key: &str) -> Option<String> {
    lines.iter().find_map(|l| {
        key_value(&l.text)
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| unquote(v).to_string())
    })
}

/// The top-level children of a mapping block, by name, each with its own lines.
fn children(lines: &[Line]) -> BTreeMap<String, Vec<Line>> {
    let mut out = BTreeMap::new();
    let Some(indent) = lines.iter().map(|l| l.indent).min() else {
        return out;
    };
    let mut current: Option<(String, Vec<Line>)> = None;
    for line in lines {
        if line.indent == indent {
            if let Some((name, body)) = current.take() {
                out.insert(name, body);
            }
            let (key, _) = key_value(&line.text)
                .unwrap_or_else(|| panic!("line {}: expected `name:`: {}", line.number, line.text));
            current = Some((key.to_string(), Vec::new()));
        } else if let Some((_, body)) = current.as_mut() {
            body.push(line.clone());
        }
    }
    if let Some((name, body)) = current {
        out.insert(name, body);
    }
    out
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("{addr:?} has no port"))
}

/// Ports of every `http://127.0.0.1:PORT` in `text`.
fn loopback_ports(text: &str) -> Vec<u16> {
    text.match_indices("http://127.0.0.1:")
        .map(|(i, m)| {
            let digits: String = text[i + m.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits
                .parse()
                .unwrap_or_else(|_| panic!("no port after {m} in {text}"))
        })
        .collect()
}

/// Seconds of a Strata duration as the deployment files write them (`30s`, `5m`, `45`).
fn seconds(value: &str) -> u64 {
    let v = value.trim();
    let (number, unit) = v.split_at(v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len()));
    let n: u64 = number
        .parse()
        .unwrap_or_else(|_| panic!("duration {value:?}"));
    match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        other => panic!("unexpected duration unit {other:?} in {value:?}"),
    }
}

/// Mebibytes of a Kubernetes quantity (`384Mi`, `1Gi`).
fn mebibytes(quantity: &str) -> u64 {
    if let Some(n) = quantity.strip_suffix("Mi") {
        n.parse()
            .unwrap_or_else(|_| panic!("quantity {quantity:?}"))
    } else if let Some(n) = quantity.strip_suffix("Gi") {
        n.parse::<u64>()
            .unwrap_or_else(|_| panic!("quantity {quantity:?}"))
            * 1024
    } else {
        panic!("memory quantity {quantity:?}: write it in Mi or Gi")
    }
}

// ---------------------------------------------------------------------------------------------
// The compose file

struct Compose {
    top: Vec<Line>,
    services: BTreeMap<String, Vec<Line>>,
}

fn compose() -> Compose {
    let top = yaml_lines(&read(COMPOSE));
    let services = children(&block(&top, &["services"], COMPOSE));
    assert!(!services.is_empty(), "{COMPOSE}: no services");
    Compose { top, services }
}

impl Compose {
    /// Services built from deploy/Dockerfile.
    fn strata(&self) -> Vec<(&String, &Vec<Line>)> {
        let strata: Vec<_> = self
            .services
            .iter()
            .filter(|(_, body)| scalar(body, "dockerfile").as_deref() == Some(DOCKERFILE))
            .collect();
        assert!(
            strata.len() >= 2,
            "{COMPOSE}: expected two Strata services built from {DOCKERFILE}, found {}",
            strata.len()
        );
        strata
    }

    fn env(name: &str, body: &[Line]) -> BTreeMap<String, String> {
        let env: BTreeMap<_, _> = mapping(&block(body, &["environment"], name))
            .into_iter()
            .collect();
        assert!(
            !env.is_empty(),
            "{COMPOSE}: {name} has an empty environment"
        );
        env
    }
}

#[test]
fn compose_files_exist_and_volumes_are_declared() {
    let compose = compose();
    assert!(
        !compose
            .top
            .iter()
            .any(|l| l.indent == 0 && l.text.starts_with("version:")),
        "{COMPOSE}: the `version:` key is obsolete"
    );
    let declared: BTreeSet<String> = children(&block(&compose.top, &["volumes"], COMPOSE))
        .into_keys()
        .collect();
    let mut used = BTreeSet::new();
    let mut bind_mounts = 0;
    for (name, body) in &compose.services {
        if let Some(build) = child_block(body, "build") {
            let context = scalar(&build, "context").unwrap_or_else(|| ".".into());
            let dockerfile = scalar(&build, "dockerfile").unwrap_or_else(|| "Dockerfile".into());
            let path = root().join(&context).join(&dockerfile);
            assert!(path.is_file(), "{name}: {} is missing", path.display());
        }
        let mut targets = BTreeSet::new();
        for volume in child_block(body, "volumes")
            .map(|b| sequence(&b))
            .unwrap_or_default()
        {
            let mut parts = volume.split(':');
            let source = parts.next().unwrap_or_default();
            let target = parts
                .next()
                .unwrap_or_else(|| panic!("{name}: volume {volume:?} has no target"));
            targets.insert(target.to_string());
            if let Some(rel) = source.strip_prefix("./") {
                assert!(
                    root().join(rel).exists(),
                    "{name}: bind mount source {source} does not exist"
                );
                bind_mounts += 1;
            } else {
                used.insert(source.to_string());
            }
        }
        // A script or config a command names must be mounted where the command looks for it.
        if let Some(command) = scalar(body, "command") {
            for path in command
                .split(['"', ',', '[', ']', ' '])
                .filter(|p| p.starts_with("/etc/strata/"))
            {
                assert!(
                    targets.contains(path),
                    "{name}: command uses {path}, which no volume mounts ({targets:?})"
                );
            }
        }
        assert!(
            child_block(body, "healthcheck").is_some(),
            "{COMPOSE}: service {name} has no healthcheck"
        );
    }
    assert!(
        bind_mounts >= 3,
        "{COMPOSE}: expected the config/ and deploy/compose/ bind mounts"
    );
    let undeclared: Vec<_> = used.difference(&declared).collect();
    assert!(
        undeclared.is_empty(),
        "{COMPOSE}: named volumes {undeclared:?} are not declared under `volumes:`"
    );
    for config in children(&block(&compose.top, &["configs"], COMPOSE)).values() {
        assert!(
            scalar(config, "content").is_some() || scalar(config, "file").is_some(),
            "{COMPOSE}: a config without content or file"
        );
    }
}

#[test]
fn compose_strata_env_and_ports_agree() {
    let compose = compose();
    let defaults = strata_defaults();
    let mut traffic_host_ports = BTreeSet::new();
    for (name, body) in compose.strata() {
        let env = Compose::env(name, body);
        assert_strata_vars(
            &format!("{COMPOSE} service {name}"),
            &env.keys().cloned().collect::<Vec<_>>(),
        );
        assert!(env.contains_key("ORIGIN_URL"), "{name}: no ORIGIN_URL");
        let listen = env.get("LISTEN_ADDR").unwrap_or(&defaults["LISTEN_ADDR"]);
        let admin = env.get("ADMIN_ADDR").unwrap_or(&defaults["ADMIN_ADDR"]);
        if !admin.starts_with("127.") {
            assert!(
                env.get("ADMIN_TOKEN").is_some_and(|t| t.contains(":?")),
                "{name}: a non-loopback ADMIN_ADDR needs ADMIN_TOKEN, required from the environment"
            );
        }
        let (listen_port, admin_port) = (port_of(listen), port_of(admin));

        let ports = sequence(&block(body, &["ports"], name));
        let mut published = BTreeMap::new();
        for mapping in &ports {
            let parts: Vec<&str> = mapping.split(':').collect();
            let container: u16 = parts[parts.len() - 1]
                .parse()
                .unwrap_or_else(|_| panic!("{name}: port mapping {mapping:?}"));
            assert!(
                container == listen_port || container == admin_port,
                "{name}: publishes container port {container}, which is neither LISTEN_ADDR \
                 ({listen_port}) nor ADMIN_ADDR ({admin_port})"
            );
            if container == admin_port {
                assert!(
                    parts.len() == 3 && parts[0] == "127.0.0.1",
                    "{name}: the admin port must be published on 127.0.0.1 only: {mapping:?}"
                );
            } else {
                assert!(
                    traffic_host_ports.insert(parts[parts.len() - 2].to_string()),
                    "{name}: host port of {mapping:?} is already used by another instance"
                );
            }
            published.insert(container, mapping.clone());
        }
        assert!(
            published.contains_key(&listen_port),
            "{name}: the traffic port {listen_port} is not published"
        );

        let health = block(body, &["healthcheck"], name);
        let test = scalar(&health, "test").unwrap_or_default();
        let health_ports = loopback_ports(&test);
        assert!(
            !health_ports.is_empty() && health_ports.iter().all(|p| *p == admin_port),
            "{name}: the healthcheck ({test}) must call the admin port {admin_port}"
        );
        assert!(test.contains("/health"), "{name}: healthcheck {test}");

        let grace = scalar(body, "stop_grace_period")
            .unwrap_or_else(|| panic!("{name}: no stop_grace_period"));
        let shutdown = env
            .get("SHUTDOWN_TIMEOUT")
            .unwrap_or(&defaults["SHUTDOWN_TIMEOUT"]);
        assert!(
            seconds(&grace) >= seconds(shutdown) + L2_FLUSH_SECS,
            "{name}: stop_grace_period {grace} must cover SHUTDOWN_TIMEOUT {shutdown} + {L2_FLUSH_SECS}s of L2 flush"
        );
    }
}

#[test]
fn compose_redis_topology_is_consistent() {
    let compose = compose();
    let sentinel_conf = read("config/sentinel.conf");
    let redis_conf = read("config/redis.conf");
    let conf_value = |conf: &str, directive: &str| -> String {
        conf.lines()
            .find_map(|l| l.strip_prefix(directive).map(str::trim))
            .unwrap_or_else(|| panic!("no `{directive}` in the config"))
            .to_string()
    };

    // sentinel monitor <name> <host> <port> <quorum>
    let monitor = conf_value(&sentinel_conf, "sentinel monitor ");
    let monitor: Vec<&str> = monitor.split_whitespace().collect();
    let [service, master, master_port, quorum] = monitor[..] else {
        panic!("config/sentinel.conf: sentinel monitor {monitor:?}");
    };
    assert_eq!(quorum, "2", "quorum");
    assert!(
        compose.services.contains_key(master),
        "{COMPOSE}: sentinel.conf monitors {master}, which is not a service"
    );
    assert_eq!(master_port, conf_value(&redis_conf, "port "));
    let sentinel_port = conf_value(&sentinel_conf, "port ");
    for directive in [
        "sentinel resolve-hostnames yes",
        "sentinel announce-hostnames yes",
        "sentinel down-after-milliseconds mymaster 5000",
        "sentinel failover-timeout mymaster 10000",
        "sentinel parallel-syncs mymaster 1",
        "sentinel auth-pass mymaster ",
        "requirepass ",
    ] {
        assert!(
            sentinel_conf.lines().any(|l| l.starts_with(directive)),
            "config/sentinel.conf lacks `{directive}`"
        );
    }
    for directive in [
        "requirepass ",
        "masterauth ",
        "appendonly yes",
        "appendfsync everysec",
        "save ",
        "maxmemory ",
        "maxmemory-policy allkeys-lru",
    ] {
        assert!(
            redis_conf.lines().any(|l| l.starts_with(directive)),
            "config/redis.conf lacks `{directive}`"
        );
    }

    let sentinels: Vec<&String> = compose
        .services
        .iter()
        .filter(|(_, body)| scalar(body, "command").is_some_and(|c| c.contains("\"sentinel\"")))
        .map(|(name, _)| name)
        .collect();
    assert_eq!(sentinels.len(), 3, "three sentinels: {sentinels:?}");
    for name in &sentinels {
        let body = &compose.services[*name];
        let test = scalar(&block(body, &["healthcheck"], name), "test").unwrap_or_default();
        assert!(
            test.contains(&format!("-p {sentinel_port} ping")),
            "{name}: healthcheck {test} must ping the sentinel port {sentinel_port}"
        );
        let volumes = sequence(&block(body, &["volumes"], name));
        assert!(
            volumes
                .iter()
                .any(|v| v.starts_with("./config/sentinel.conf:") && v.ends_with(":ro")),
            "{name}: mounts config/sentinel.conf read-only as a template: {volumes:?}"
        );
    }
    let own_data: BTreeSet<&String> = sentinels
        .iter()
        .filter_map(|name| {
            sequence(&block(&compose.services[*name], &["volumes"], name))
                .into_iter()
                .find(|v| v.ends_with(":/data"))
                .map(|_| *name)
        })
        .collect();
    assert_eq!(
        own_data.len(),
        3,
        "every sentinel needs its own writable /data"
    );
    assert!(
        compose.services.keys().any(|n| n.contains("replica")),
        "{COMPOSE}: no Redis replica"
    );

    for (name, body) in compose.strata() {
        let env = Compose::env(name, body);
        let url = env
            .get("REDIS_URL")
            .unwrap_or_else(|| panic!("{name}: no REDIS_URL"));
        assert!(
            url.starts_with("redis-sentinel://:${REDIS_PASSWORD"),
            "{name}: REDIS_URL must carry the password in its userinfo: {url}"
        );
        assert!(
            url.contains(&format!("sentinelServiceName={service}")),
            "{name}: REDIS_URL must name the service {service}: {url}"
        );
        for sentinel in &sentinels {
            assert!(
                url.contains(&format!("{sentinel}:{sentinel_port}")),
                "{name}: REDIS_URL does not list {sentinel}:{sentinel_port}: {url}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// config/strata.env

#[test]
fn strata_env_lists_every_variable_with_comment_and_default() {
    let text = read(STRATA_ENV);
    let known = strata_vars();
    let defaults = strata_defaults();
    let lines: Vec<&str> = text.lines().collect();
    let mut listed = BTreeMap::new();
    let is_var_line = |line: &str| -> Option<(bool, String, String)> {
        let (commented, rest) = match line.strip_prefix('#') {
            Some(rest) => (true, rest),
            None => (false, line),
        };
        let (name, value) = rest.split_once('=')?;
        let valid = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
        valid.then(|| (commented, name.to_string(), value.to_string()))
    };
    for (i, line) in lines.iter().enumerate() {
        let Some((commented, name, value)) = is_var_line(line) else {
            assert!(
                line.is_empty() || line.starts_with('#'),
                "{STRATA_ENV} line {}: neither a VAR=value, a comment nor blank: {line}",
                i + 1
            );
            continue;
        };
        assert!(
            listed
                .insert(name.clone(), (commented, value.clone()))
                .is_none(),
            "{STRATA_ENV}: {name} is listed twice"
        );
        // Walk up over neighbouring variable lines to the comment that explains them.
        let explained = lines[..i]
            .iter()
            .rev()
            .find(|l| is_var_line(l).is_none())
            .is_some_and(|l| l.starts_with("# "));
        assert!(explained, "{STRATA_ENV}: {name} has no comment above it");
        if let Some(default) = defaults.get(&name) {
            assert!(
                commented && value == *default,
                "{STRATA_ENV}: {name} should read `#{name}={default}` (the default of \
                 src/config.rs), not `{line}`"
            );
        }
    }
    let names: Vec<String> = listed.keys().cloned().collect();
    assert_strata_vars(STRATA_ENV, &names);
    let missing: Vec<&String> = known.iter().filter(|v| !listed.contains_key(*v)).collect();
    assert!(missing.is_empty(), "{STRATA_ENV} does not list {missing:?}");
    assert!(
        listed
            .get("ORIGIN_URL")
            .is_some_and(|(commented, _)| !commented),
        "{STRATA_ENV}: ORIGIN_URL is required and must be set, not commented"
    );
}

// ---------------------------------------------------------------------------------------------
// Dockerfile

#[test]
fn dockerfile_exposes_and_checks_the_default_ports() {
    let text = read(DOCKERFILE);
    let defaults = strata_defaults();
    let mut env = BTreeMap::new();
    let mut exposed = BTreeSet::new();
    let mut in_env = false;
    for line in text.lines() {
        let line = line.trim();
        let continued = in_env;
        in_env = (continued || line.starts_with("ENV ")) && line.ends_with('\\');
        let words: Vec<&str> = if let Some(rest) = line.strip_prefix("ENV ") {
            rest.split_whitespace().collect()
        } else if continued {
            line.split_whitespace().collect()
        } else {
            if let Some(rest) = line.strip_prefix("EXPOSE ") {
                exposed.extend(rest.split_whitespace().map(|p| {
                    p.trim_end_matches("/tcp")
                        .parse::<u16>()
                        .unwrap_or_else(|_| panic!("EXPOSE {p}"))
                }));
            }
            continue;
        };
        for word in words.iter().filter(|w| **w != "\\") {
            let (name, value) = word
                .split_once('=')
                .unwrap_or_else(|| panic!("{DOCKERFILE}: ENV {word}: write NAME=value"));
            env.insert(name.to_string(), value.to_string());
        }
    }
    assert_strata_vars(DOCKERFILE, &env.keys().cloned().collect::<Vec<_>>());
    let listen = port_of(env.get("LISTEN_ADDR").unwrap_or(&defaults["LISTEN_ADDR"]));
    let admin = port_of(env.get("ADMIN_ADDR").unwrap_or(&defaults["ADMIN_ADDR"]));
    assert!(
        exposed.contains(&listen) && exposed.contains(&admin),
        "{DOCKERFILE}: EXPOSE {exposed:?} must include {listen} and {admin}"
    );
    let health = text
        .lines()
        .skip_while(|l| !l.starts_with("HEALTHCHECK"))
        .take(2)
        .collect::<String>();
    assert_eq!(
        loopback_ports(&health),
        vec![admin],
        "{DOCKERFILE}: HEALTHCHECK must call /health on the admin port: {health}"
    );
    assert!(health.contains("/health"));
    assert!(
        text.contains("USER 10001:10001"),
        "{DOCKERFILE}: non-root numeric USER"
    );
}

// ---------------------------------------------------------------------------------------------
// Kubernetes

fn k8s(rel: &str) -> Vec<Line> {
    let lines = yaml_lines(&read(rel));
    assert!(!lines.is_empty(), "{rel} is empty");
    lines
}

/// The container ports of the Deployment by name.
fn container_ports(container: &[Line]) -> BTreeMap<String, u16> {
    let ports = block(container, &["ports"], K8S_DEPLOYMENT);
    let mut out = BTreeMap::new();
    let mut name = None;
    for line in &ports {
        if let Some((k, v)) = key_value(&line.text) {
            match k {
                "name" => name = Some(unquote(v).to_string()),
                "containerPort" => {
                    let port = v.parse().unwrap_or_else(|_| panic!("containerPort {v}"));
                    let n = name.take().unwrap_or_else(|| {
                        panic!("{K8S_DEPLOYMENT} line {}: unnamed port", line.number)
                    });
                    out.insert(n, port);
                }
                _ => {}
            }
        }
    }
    out
}

fn resolve_port(value: &str, ports: &BTreeMap<String, u16>, what: &str) -> u16 {
    value.parse().unwrap_or_else(|_| {
        *ports
            .get(value)
            .unwrap_or_else(|| panic!("{what}: port {value:?} is not a container port {ports:?}"))
    })
}

#[test]
fn kubernetes_env_comes_from_variables_strata_reads() {
    let configmap = k8s(K8S_CONFIGMAP);
    let data = mapping(&block(&configmap, &["data"], K8S_CONFIGMAP));
    assert_strata_vars(
        K8S_CONFIGMAP,
        &data.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
    );
    let data: BTreeMap<_, _> = data.into_iter().collect();
    for secret in ["ADMIN_TOKEN", "REDIS_URL", "REDIS_PASSWORD"] {
        assert!(
            !data.contains_key(secret),
            "{K8S_CONFIGMAP}: {secret} belongs in the Secret"
        );
    }

    let deployment = k8s(K8S_DEPLOYMENT);
    let container = block(
        &deployment,
        &["spec", "template", "spec", "containers"],
        K8S_DEPLOYMENT,
    );
    let env = block(&container, &["env"], K8S_DEPLOYMENT);
    let indent = env.iter().map(|l| l.indent).min().unwrap_or(0);
    let env_names: Vec<String> = env
        .iter()
        .filter(|l| l.indent == indent)
        .map(|l| {
            l.text
                .strip_prefix("- name: ")
                .unwrap_or_else(|| panic!("{K8S_DEPLOYMENT} line {}: {}", l.number, l.text))
                .to_string()
        })
        .collect();
    assert_strata_vars(K8S_DEPLOYMENT, &env_names);
    assert!(env_names.contains(&"ADMIN_TOKEN".to_string()));

    // The ConfigMap and Secret the Deployment names are the ones in this directory, and every
    // Secret key it reads is in the example.
    let configmap_name = scalar(&block(&configmap, &["metadata"], K8S_CONFIGMAP), "name");
    assert_eq!(
        scalar(
            &block(&container, &["envFrom", "configMapRef"], K8S_DEPLOYMENT),
            "name"
        ),
        configmap_name
    );
    let secret = k8s(K8S_SECRET);
    let secret_name = scalar(&block(&secret, &["metadata"], K8S_SECRET), "name");
    let secret_text = read(K8S_SECRET);
    let mut secret_keys: Vec<String> = mapping(&block(&secret, &["stringData"], K8S_SECRET))
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    // Commented keys (`#REDIS_PASSWORD: ...`) document alternatives: they must be real too.
    secret_keys.extend(secret_text.lines().filter_map(|l| {
        let rest = l.trim().strip_prefix('#')?;
        let (key, _) = rest.split_once(": ")?;
        key.chars()
            .all(|c| c.is_ascii_uppercase() || c == '_')
            .then(|| key.to_string())
    }));
    assert_strata_vars(K8S_SECRET, &secret_keys);
    assert!(
        secret_text.contains("REPLACE-ME"),
        "{K8S_SECRET}: values must be obvious placeholders"
    );
    let mut refs = 0;
    for (i, line) in env.iter().enumerate() {
        if line.text != "secretKeyRef:" {
            continue;
        }
        let reference: Vec<Line> = env[i + 1..]
            .iter()
            .take_while(|l| l.indent > line.indent)
            .cloned()
            .collect();
        assert_eq!(scalar(&reference, "name"), secret_name, "secretKeyRef name");
        let key = scalar(&reference, "key").unwrap_or_default();
        assert!(
            secret_keys.contains(&key),
            "{K8S_DEPLOYMENT} reads Secret key {key}, which {K8S_SECRET} does not show"
        );
        refs += 1;
    }
    assert!(refs >= 2, "ADMIN_TOKEN and REDIS_URL come from the Secret");

    if !data["ADMIN_ADDR"].starts_with("127.") {
        assert!(
            env_names.contains(&"ADMIN_TOKEN".to_string()),
            "a non-loopback ADMIN_ADDR needs ADMIN_TOKEN"
        );
    }
}

#[test]
fn kubernetes_ports_probes_and_budgets_agree() {
    let data: BTreeMap<_, _> = mapping(&block(&k8s(K8S_CONFIGMAP), &["data"], K8S_CONFIGMAP))
        .into_iter()
        .collect();
    let listen = port_of(&data["LISTEN_ADDR"]);
    let admin = port_of(&data["ADMIN_ADDR"]);

    let deployment = k8s(K8S_DEPLOYMENT);
    let pod = block(&deployment, &["spec", "template", "spec"], K8S_DEPLOYMENT);
    let container = block(&pod, &["containers"], K8S_DEPLOYMENT);
    let ports = container_ports(&container);
    assert_eq!(
        ports.get("http"),
        Some(&listen),
        "containerPort http vs LISTEN_ADDR"
    );
    assert_eq!(
        ports.get("admin"),
        Some(&admin),
        "containerPort admin vs ADMIN_ADDR"
    );

    let liveness = block(&container, &["livenessProbe", "httpGet"], K8S_DEPLOYMENT);
    assert_eq!(scalar(&liveness, "path").as_deref(), Some("/health"));
    let port = scalar(&liveness, "port").unwrap_or_default();
    assert_eq!(resolve_port(&port, &ports, "livenessProbe"), admin);
    let readiness: String = block(&container, &["readinessProbe"], K8S_DEPLOYMENT)
        .iter()
        .map(|l| l.text.clone())
        .collect();
    assert!(
        readiness.contains(&format!("http://127.0.0.1:{admin}/ready"))
            && readiness.contains("$ADMIN_TOKEN"),
        "readinessProbe must call /ready on the admin port with the token: {readiness}"
    );

    let service = k8s(K8S_SERVICE);
    let service_ports = block(&service, &["spec", "ports"], K8S_SERVICE);
    let targets: BTreeMap<String, u16> = children_of_list(&service_ports)
        .iter()
        .map(|item| {
            let name = scalar(item, "name").unwrap_or_default();
            let target = scalar(item, "targetPort").unwrap_or_default();
            (name, resolve_port(&target, &ports, K8S_SERVICE))
        })
        .collect();
    assert_eq!(
        targets.get("http"),
        Some(&listen),
        "Service http → LISTEN_ADDR"
    );
    assert_eq!(
        targets.get("admin"),
        Some(&admin),
        "Service admin → ADMIN_ADDR"
    );
    assert_eq!(
        scalar(&service, "type").as_deref(),
        Some("ClusterIP"),
        "the admin port must stay cluster-internal"
    );

    // Shutdown: preStop sleep + SHUTDOWN_TIMEOUT < terminationGracePeriodSeconds.
    let grace: u64 = scalar(&pod, "terminationGracePeriodSeconds")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{K8S_DEPLOYMENT}: terminationGracePeriodSeconds"));
    let pre_stop: String = block(&container, &["lifecycle", "preStop"], K8S_DEPLOYMENT)
        .iter()
        .map(|l| l.text.clone())
        .collect();
    let sleep: u64 = pre_stop
        .split(|c: char| !c.is_ascii_digit())
        .find(|s| !s.is_empty())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("preStop sleep: {pre_stop}"));
    let shutdown = seconds(&data["SHUTDOWN_TIMEOUT"]);
    assert!(
        grace > sleep + shutdown + L2_FLUSH_SECS,
        "terminationGracePeriodSeconds {grace} must exceed preStop {sleep} + SHUTDOWN_TIMEOUT {shutdown} + {L2_FLUSH_SECS}s of L2 flush"
    );

    // Memory request = CACHE_SIZE_MB * 1.25 + 64Mi; the limit is not below it.
    let cache_mb: u64 = data["CACHE_SIZE_MB"].parse().unwrap_or(0);
    let requests = block(&container, &["resources", "requests"], K8S_DEPLOYMENT);
    let limits = block(&container, &["resources", "limits"], K8S_DEPLOYMENT);
    let request = mebibytes(&scalar(&requests, "memory").unwrap_or_default());
    let limit = mebibytes(&scalar(&limits, "memory").unwrap_or_default());
    assert_eq!(
        request,
        cache_mb * 5 / 4 + 64,
        "memory request must be CACHE_SIZE_MB * 1.25 + 64Mi (CACHE_SIZE_MB={cache_mb})"
    );
    assert!(
        limit >= request,
        "memory limit {limit}Mi < request {request}Mi"
    );
    assert!(
        scalar(&requests, "cpu").is_some(),
        "the HPA needs a CPU request"
    );

    // Hardening.
    for (key, value) in [
        ("runAsNonRoot", "true"),
        ("readOnlyRootFilesystem", "true"),
        ("allowPrivilegeEscalation", "false"),
        ("type", "RuntimeDefault"),
    ] {
        assert_eq!(
            scalar(&container, key).as_deref(),
            Some(value),
            "{K8S_DEPLOYMENT}: container securityContext {key}"
        );
    }
    let caps: String = block(
        &container,
        &["securityContext", "capabilities"],
        K8S_DEPLOYMENT,
    )
    .iter()
    .map(|l| l.text.clone())
    .collect();
    assert!(caps.contains("ALL"), "capabilities: drop ALL");

    // PDB and HPA target this Deployment.
    let name = scalar(&block(&deployment, &["metadata"], K8S_DEPLOYMENT), "name");
    let selector = mapping(&block(
        &deployment,
        &["spec", "selector", "matchLabels"],
        K8S_DEPLOYMENT,
    ));
    let pdb = k8s(K8S_PDB);
    assert_eq!(scalar(&pdb, "minAvailable").as_deref(), Some("1"));
    assert_eq!(
        mapping(&block(&pdb, &["spec", "selector", "matchLabels"], K8S_PDB)),
        selector
    );
    let hpa = k8s(K8S_HPA);
    assert_eq!(
        scalar(&hpa, "apiVersion").as_deref(),
        Some("autoscaling/v2")
    );
    assert_eq!(
        scalar(&block(&hpa, &["spec", "scaleTargetRef"], K8S_HPA), "name"),
        name
    );
    assert_eq!(scalar(&hpa, "minReplicas").as_deref(), Some("2"));
    assert_eq!(scalar(&hpa, "maxReplicas").as_deref(), Some("10"));
    assert_eq!(scalar(&hpa, "averageUtilization").as_deref(), Some("70"));
    assert_eq!(
        scalar(&block(&deployment, &["spec"], K8S_DEPLOYMENT), "replicas").as_deref(),
        Some("2")
    );
}

/// The items of a YAML sequence of mappings (`- a: 1` + following deeper lines).
fn children_of_list(lines: &[Line]) -> Vec<Vec<Line>> {
    let Some(indent) = lines.iter().map(|l| l.indent).min() else {
        return Vec::new();
    };
    let mut items: Vec<Vec<Line>> = Vec::new();
    for line in lines {
        if line.indent == indent && line.text.starts_with("- ") {
            let mut first = line.clone();
            first.text = first.text[2..].to_string();
            first.indent += 2;
            items.push(vec![first]);
        } else if let Some(item) = items.last_mut() {
            item.push(line.clone());
        }
    }
    items
}

// ---------------------------------------------------------------------------------------------
// References and the systemd unit

/// Repository paths (`config/…`, `deploy/…`, `src/…`, `tests/…`) named anywhere in the deployment
/// files, comments included, must exist.
#[test]
fn every_referenced_repository_file_exists() {
    let mut checked = 0;
    for file in DEPLOY_FILES {
        let text = read(file);
        for token in text.split(|c: char| {
            c.is_whitespace() || matches!(c, '"' | '\'' | '`' | '(' | ')' | '[' | ']' | ',' | ':')
        }) {
            let token = token.strip_prefix("./").unwrap_or(token);
            let token = token.trim_end_matches(['.', ';']);
            if token.contains('*') {
                continue; // a glob such as config/*.conf
            }
            if !["config/", "deploy/", "src/", "tests/"]
                .iter()
                .any(|p| token.starts_with(p))
            {
                continue;
            }
            assert!(
                root().join(token).exists(),
                "{file} names {token}, which does not exist"
            );
            checked += 1;
        }
    }
    assert!(checked >= 10, "only {checked} references found");
    assert!(Path::new(&root().join("deploy/compose/redis-entrypoint.sh")).is_file());
}

#[test]
fn systemd_unit_reads_strata_env_and_outlasts_the_drain() {
    let unit = read("deploy/systemd/strata.service");
    let value = |key: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("strata.service: no {key}"))
            .to_string()
    };
    assert_eq!(value("EnvironmentFile="), "/etc/strata/strata.env");
    let stop = seconds(&value("TimeoutStopSec="));
    let shutdown = seconds(&strata_defaults()["SHUTDOWN_TIMEOUT"]);
    assert!(
        stop >= shutdown + L2_FLUSH_SECS,
        "TimeoutStopSec={stop} must cover SHUTDOWN_TIMEOUT {shutdown} + {L2_FLUSH_SECS}s of L2 flush"
    );
    for hardening in [
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "CapabilityBoundingSet=",
    ] {
        assert!(unit.lines().any(|l| l == hardening), "missing {hardening}");
    }
}
