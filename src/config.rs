//! Configuration: every setting is an environment variable and a clap flag, parsed into typed values.
//!
//! Clap reads the raw strings (so `--help` lists every variable); [`Config::from_raw`] turns them into
//! typed values through small parsers whose errors name the variable, so a bad deployment fails at
//! start-up with exit status 2 and a message an operator can act on.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use http::Uri;

pub const ORIGIN_URL: &str = "ORIGIN_URL";
pub const LISTEN_ADDR: &str = "LISTEN_ADDR";
pub const ADMIN_ADDR: &str = "ADMIN_ADDR";
pub const CACHE_SIZE_MB: &str = "CACHE_SIZE_MB";
pub const CACHE_MAX_OBJECT_MB: &str = "CACHE_MAX_OBJECT_MB";
pub const CACHE_MAX_AGE: &str = "CACHE_MAX_AGE";
pub const CACHE_GRACE: &str = "CACHE_GRACE";
pub const CACHE_STALE_IF_ERROR: &str = "CACHE_STALE_IF_ERROR";
pub const CACHE_LOCK_TIMEOUT: &str = "CACHE_LOCK_TIMEOUT";
pub const ORIGIN_TIMEOUT: &str = "ORIGIN_TIMEOUT";
pub const SHUTDOWN_TIMEOUT: &str = "SHUTDOWN_TIMEOUT";
pub const TUNNEL_IDLE_TIMEOUT: &str = "TUNNEL_IDLE_TIMEOUT";
pub const CLIENT_HEADER_TIMEOUT: &str = "CLIENT_HEADER_TIMEOUT";
pub const ORIGIN_IDLE_TIMEOUT: &str = "ORIGIN_IDLE_TIMEOUT";
pub const ORIGIN_MAX_IDLE: &str = "ORIGIN_MAX_IDLE";
/// The largest ORIGIN_MAX_IDLE: more idle sockets than this would crowd the file descriptor limit.
const MAX_ORIGIN_IDLE: usize = 65_536;
pub const ORIGIN_MAX_CONNS: &str = "ORIGIN_MAX_CONNS";
/// The largest ORIGIN_MAX_CONNS (tokio's semaphore holds fewer than 2^61 permits; no origin takes
/// more connections than this from one instance anyway).
const MAX_ORIGIN_CONNS: usize = 1_000_000;
pub const WORKER_THREADS: &str = "WORKER_THREADS";
/// The most WORKER_THREADS: far past any machine's cores; more threads would only contend.
const MAX_WORKER_THREADS: usize = 1024;
pub const LOG_FORMAT: &str = "LOG_FORMAT";
pub const RUST_LOG: &str = "RUST_LOG";
pub const ADMIN_TOKEN: &str = "ADMIN_TOKEN";
pub const LOG_REDACT_KEYS: &str = "LOG_REDACT_KEYS";
pub const SURROGATE_HEADERS_VISIBLE: &str = "SURROGATE_HEADERS_VISIBLE";
pub const NORMALIZE_ACCEPT_ENCODING: &str = "NORMALIZE_ACCEPT_ENCODING";
pub const REDIS_URL: &str = "REDIS_URL";
pub const REDIS_ENABLED: &str = "REDIS_ENABLED";
pub const REDIS_ADDR: &str = "REDIS_ADDR";
pub const REDIS_PASSWORD: &str = "REDIS_PASSWORD";
pub const REDIS_DB: &str = "REDIS_DB";
pub const REDIS_KEY_PREFIX: &str = "REDIS_KEY_PREFIX";
pub const REDIS_TIMEOUT: &str = "REDIS_TIMEOUT";
pub const REDIS_POOL_SIZE: &str = "REDIS_POOL_SIZE";

/// Raw settings as clap sees them: strings, validated by [`Config::from_raw`].
#[derive(Debug, Clone, Parser)]
#[command(name = "strata", version, about = "Strata: a caching reverse proxy")]
pub struct RawArgs {
    /// Origin base URL (http:// or https://, optionally with a path prefix).
    #[arg(long, env = ORIGIN_URL, value_name = ORIGIN_URL)]
    pub origin_url: String,
    /// Address for client traffic.
    #[arg(long, env = LISTEN_ADDR, value_name = LISTEN_ADDR, default_value = "0.0.0.0:8080")]
    pub listen_addr: String,
    /// Address of the admin listener (/health).
    #[arg(long, env = ADMIN_ADDR, value_name = ADMIN_ADDR, default_value = "127.0.0.1:9090")]
    pub admin_addr: String,
    /// In-RAM L1 size in MiB (key + headers + body are counted); 0 disables L1.
    #[arg(long, env = CACHE_SIZE_MB, value_name = CACHE_SIZE_MB, default_value = "256")]
    pub cache_size_mb: String,
    /// Largest body, in MiB, that is stored; larger responses stream through uncached.
    #[arg(long, env = CACHE_MAX_OBJECT_MB, value_name = CACHE_MAX_OBJECT_MB, default_value = "8")]
    pub cache_max_object_mb: String,
    /// Fallback freshness lifetime for responses that carry no freshness information (unset: none).
    #[arg(long, env = CACHE_MAX_AGE, value_name = CACHE_MAX_AGE)]
    pub cache_max_age: Option<String>,
    /// Proxy-wide stale-while-revalidate window.
    #[arg(long, env = CACHE_GRACE, value_name = CACHE_GRACE, default_value = "0s")]
    pub cache_grace: String,
    /// Proxy-wide stale-if-error window.
    #[arg(long, env = CACHE_STALE_IF_ERROR, value_name = CACHE_STALE_IF_ERROR, default_value = "0s")]
    pub cache_stale_if_error: String,
    /// Longest a request waits for another request's fill of the same key before fetching itself.
    #[arg(long, env = CACHE_LOCK_TIMEOUT, value_name = CACHE_LOCK_TIMEOUT, default_value = "5s")]
    pub cache_lock_timeout: String,
    /// Origin deadline: time to response headers, and longest silence while reading its body.
    #[arg(long, env = ORIGIN_TIMEOUT, value_name = ORIGIN_TIMEOUT, default_value = "30s")]
    pub origin_timeout: String,
    /// A kept-alive origin connection idle this long is closed rather than reused.
    #[arg(long, env = ORIGIN_IDLE_TIMEOUT, value_name = ORIGIN_IDLE_TIMEOUT, default_value = "55s")]
    pub origin_idle_timeout: String,
    /// Kept-alive origin connections held idle at most; 0 closes each after its response.
    #[arg(long, env = ORIGIN_MAX_IDLE, value_name = ORIGIN_MAX_IDLE, default_value = "1024")]
    pub origin_max_idle: String,
    /// Requests in flight to the origin at most (so connections open to it); the others wait up
    /// to ORIGIN_TIMEOUT for a turn, then get 503. 0: no limit.
    #[arg(long, env = ORIGIN_MAX_CONNS, value_name = ORIGIN_MAX_CONNS, default_value = "0")]
    pub origin_max_conns: String,
    /// How long in-flight requests may take to finish after SIGTERM/SIGINT.
    #[arg(long, env = SHUTDOWN_TIMEOUT, value_name = SHUTDOWN_TIMEOUT, default_value = "30s")]
    pub shutdown_timeout: String,
    /// A WebSocket (upgraded) connection with no bytes either way for this long is closed.
    #[arg(long, env = TUNNEL_IDLE_TIMEOUT, value_name = TUNNEL_IDLE_TIMEOUT, default_value = "300s")]
    pub tunnel_idle_timeout: String,
    /// A client connection has this long to send its first request's header after connecting,
    /// and (HTTP/1.1) each later one's after the previous response; else it is closed.
    #[arg(long, env = CLIENT_HEADER_TIMEOUT, value_name = CLIENT_HEADER_TIMEOUT, default_value = "30s")]
    pub client_header_timeout: String,
    /// Threads that serve requests; 0: one per CPU this process may use (affinity, cgroup quota).
    /// With one, the runtime runs everything on a single thread, without cross-thread handoffs.
    #[arg(long, env = WORKER_THREADS, value_name = WORKER_THREADS, default_value = "0")]
    pub worker_threads: String,
    /// Log line format: text or json.
    #[arg(long, env = LOG_FORMAT, value_name = LOG_FORMAT, default_value = "text")]
    pub log_format: String,
    /// Log filter (tracing-subscriber EnvFilter syntax), e.g. `info` or `strata=debug,info`.
    #[arg(long, env = RUST_LOG, value_name = RUST_LOG, default_value = "info")]
    pub rust_log: String,
    /// Bearer token for every admin route but /health (and the PURGE method). Unset: the admin
    /// listener must be on a loopback address.
    #[arg(long, env = ADMIN_TOKEN, value_name = ADMIN_TOKEN, hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Replace cache keys and paths in logs with a short hash.
    #[arg(long, env = LOG_REDACT_KEYS, value_name = LOG_REDACT_KEYS, default_value = "false")]
    pub log_redact_keys: String,
    /// Show the origin's Surrogate-Key / Cache-Tag headers to clients.
    #[arg(long, env = SURROGATE_HEADERS_VISIBLE, value_name = SURROGATE_HEADERS_VISIBLE, default_value = "false")]
    pub surrogate_headers_visible: String,
    /// Rewrite a GET's or HEAD's Accept-Encoding to its class (br, gzip, zstd it accepts) before
    /// lookup and towards the origin, so browsers share variants.
    #[arg(long, env = NORMALIZE_ACCEPT_ENCODING, value_name = NORMALIZE_ACCEPT_ENCODING, default_value = "true")]
    pub normalize_accept_encoding: String,
    /// Redis L2: redis://, rediss://, redis-sentinel://...?sentinelServiceName=..., redis-cluster://.
    /// Unset: L1 only (unless REDIS_ENABLED).
    #[arg(long, env = REDIS_URL, value_name = REDIS_URL, hide_env_values = true)]
    pub redis_url: Option<String>,
    /// Without REDIS_URL: use Redis at REDIS_ADDR (seed-compatible form).
    #[arg(long, env = REDIS_ENABLED, value_name = REDIS_ENABLED, default_value = "false")]
    pub redis_enabled: String,
    /// host:port of Redis when REDIS_ENABLED=true and REDIS_URL is unset.
    #[arg(long, env = REDIS_ADDR, value_name = REDIS_ADDR, default_value = "127.0.0.1:6379")]
    pub redis_addr: String,
    /// Password for REDIS_ADDR.
    #[arg(long, env = REDIS_PASSWORD, value_name = REDIS_PASSWORD, hide_env_values = true)]
    pub redis_password: Option<String>,
    /// Database number for REDIS_ADDR.
    #[arg(long, env = REDIS_DB, value_name = REDIS_DB, default_value = "0")]
    pub redis_db: String,
    /// Prefix of every Redis key Strata writes, so deployments can share a Redis.
    #[arg(long, env = REDIS_KEY_PREFIX, value_name = REDIS_KEY_PREFIX, default_value = "strata:")]
    pub redis_key_prefix: String,
    /// Deadline of every Redis call; past it the call counts as a miss.
    #[arg(long, env = REDIS_TIMEOUT, value_name = REDIS_TIMEOUT, default_value = "50ms")]
    pub redis_timeout: String,
    /// Connections to Redis.
    #[arg(long, env = REDIS_POOL_SIZE, value_name = REDIS_POOL_SIZE, default_value = "4")]
    pub redis_pool_size: String,
}

/// The typed, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub origin: Uri,
    pub listen_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub cache_size_bytes: u64,
    pub max_object_bytes: u64,
    pub fallback_max_age: Option<Duration>,
    pub grace: Duration,
    pub stale_if_error: Duration,
    pub lock_timeout: Duration,
    pub origin_timeout: Duration,
    pub origin_idle_timeout: Duration,
    pub origin_max_idle: usize,
    /// `None`: no limit.
    pub origin_max_conns: Option<usize>,
    pub shutdown_timeout: Duration,
    pub tunnel_idle_timeout: Duration,
    pub client_header_timeout: Duration,
    /// `None`: one per CPU available to the process.
    pub worker_threads: Option<usize>,
    pub log_format: LogFormat,
    /// `None`: no L2.
    pub redis: Option<RedisConfig>,
    /// `None`: admin routes are open, which is allowed only on a loopback `ADMIN_ADDR`.
    pub admin_token: Option<AdminToken>,
    pub log_redact_keys: bool,
    pub surrogate_headers_visible: bool,
    pub normalize_accept_encoding: bool,
}

/// The admin bearer token; never printed.
#[derive(Clone)]
pub struct AdminToken(String);

impl AdminToken {
    /// A token for unit tests (the configuration builds real ones from `ADMIN_TOKEN`).
    #[cfg(test)]
    pub(crate) fn for_tests(token: &str) -> AdminToken {
        AdminToken(token.to_string())
    }

    /// Compares a presented token in time independent of where it differs.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let expected = self.0.as_bytes();
        expected.len() == presented.len()
            && expected
                .iter()
                .zip(presented)
                .fold(0u8, |diff, (a, b)| diff | (a ^ b))
                == 0
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

/// The Redis L2 settings.
#[derive(Clone)]
pub struct RedisConfig {
    /// Where Redis is: one or more stores (comma-separated `REDIS_URL`), in priority order.
    pub stores: Vec<fred::types::config::Config>,
    pub key_prefix: String,
    pub timeout: Duration,
    pub pool_size: usize,
}

impl std::fmt::Debug for RedisConfig {
    // Store configs carry passwords: never print them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("stores", &self.stores.len())
            .field("key_prefix", &self.key_prefix)
            .field("timeout", &self.timeout)
            .field("pool_size", &self.pool_size)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// A setting that cannot be used; the message names the variable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid {var}={value:?}: {reason}")]
    Invalid {
        var: &'static str,
        value: String,
        reason: String,
    },
    #[error("{0}")]
    Args(String),
}

impl ConfigError {
    fn invalid(var: &'static str, value: &str, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            var,
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}

/// Every variable with its flag, so a map of variables can be fed to clap without the process env.
const FLAGS: &[(&str, &str)] = &[
    (ORIGIN_URL, "--origin-url"),
    (LISTEN_ADDR, "--listen-addr"),
    (ADMIN_ADDR, "--admin-addr"),
    (CACHE_SIZE_MB, "--cache-size-mb"),
    (CACHE_MAX_OBJECT_MB, "--cache-max-object-mb"),
    (CACHE_MAX_AGE, "--cache-max-age"),
    (CACHE_GRACE, "--cache-grace"),
    (CACHE_STALE_IF_ERROR, "--cache-stale-if-error"),
    (CACHE_LOCK_TIMEOUT, "--cache-lock-timeout"),
    (ORIGIN_TIMEOUT, "--origin-timeout"),
    (ORIGIN_IDLE_TIMEOUT, "--origin-idle-timeout"),
    (ORIGIN_MAX_IDLE, "--origin-max-idle"),
    (ORIGIN_MAX_CONNS, "--origin-max-conns"),
    (SHUTDOWN_TIMEOUT, "--shutdown-timeout"),
    (TUNNEL_IDLE_TIMEOUT, "--tunnel-idle-timeout"),
    (CLIENT_HEADER_TIMEOUT, "--client-header-timeout"),
    (WORKER_THREADS, "--worker-threads"),
    (LOG_FORMAT, "--log-format"),
    (RUST_LOG, "--rust-log"),
    (ADMIN_TOKEN, "--admin-token"),
    (LOG_REDACT_KEYS, "--log-redact-keys"),
    (SURROGATE_HEADERS_VISIBLE, "--surrogate-headers-visible"),
    (NORMALIZE_ACCEPT_ENCODING, "--normalize-accept-encoding"),
    (REDIS_URL, "--redis-url"),
    (REDIS_ENABLED, "--redis-enabled"),
    (REDIS_ADDR, "--redis-addr"),
    (REDIS_PASSWORD, "--redis-password"),
    (REDIS_DB, "--redis-db"),
    (REDIS_KEY_PREFIX, "--redis-key-prefix"),
    (REDIS_TIMEOUT, "--redis-timeout"),
    (REDIS_POOL_SIZE, "--redis-pool-size"),
];

impl Config {
    /// Builds a configuration from `(VARIABLE, value)` pairs, as if they were set in the environment.
    /// Tests use this instead of mutating the process environment.
    pub fn from_vars<I, K, V>(vars: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let mut args = vec!["strata".to_string()];
        for (name, value) in vars {
            let name = name.as_ref();
            let flag = FLAGS
                .iter()
                .find(|(var, _)| *var == name)
                .map(|(_, flag)| *flag)
                .ok_or_else(|| ConfigError::Args(format!("unknown variable {name}")))?;
            args.push(format!("{flag}={}", value.as_ref()));
        }
        let raw = RawArgs::try_parse_from(args).map_err(|e| ConfigError::Args(e.to_string()))?;
        Config::from_raw(raw)
    }

    /// Validates clap's raw strings.
    pub fn from_raw(raw: RawArgs) -> Result<Config, ConfigError> {
        let redis = parse_redis(&raw)?;
        let admin_addr = parse_addr(ADMIN_ADDR, &raw.admin_addr)?;
        // A token read from a file (a Kubernetes secret, `$(cat token)`) often ends in a newline,
        // which no HTTP header can carry: surrounding whitespace is dropped, and a token that still
        // could never be sent is refused rather than locking every admin route.
        let admin_token = match raw.admin_token.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(token) if !token.bytes().all(|b| b.is_ascii_graphic()) => {
                return Err(ConfigError::invalid(
                    ADMIN_TOKEN,
                    "<redacted>",
                    "may hold only visible ASCII characters (it is sent in an Authorization header)",
                ));
            }
            Some(token) => Some(AdminToken(token.to_string())),
        };
        tracing_subscriber::EnvFilter::try_new(&raw.rust_log)
            .map_err(|error| ConfigError::invalid(RUST_LOG, &raw.rust_log, error.to_string()))?;
        if admin_token.is_none() && !admin_addr.ip().is_loopback() {
            return Err(ConfigError::invalid(
                ADMIN_ADDR,
                &raw.admin_addr,
                "is not a loopback address and ADMIN_TOKEN is unset: anyone who reaches it could purge \
                 the cache; set ADMIN_TOKEN or bind ADMIN_ADDR to 127.0.0.1",
            ));
        }
        Ok(Config {
            redis,
            admin_token,
            log_redact_keys: parse_bool(LOG_REDACT_KEYS, &raw.log_redact_keys)?,
            surrogate_headers_visible: parse_bool(
                SURROGATE_HEADERS_VISIBLE,
                &raw.surrogate_headers_visible,
            )?,
            normalize_accept_encoding: parse_bool(
                NORMALIZE_ACCEPT_ENCODING,
                &raw.normalize_accept_encoding,
            )?,
            origin: parse_origin(&raw.origin_url)?,
            listen_addr: parse_addr(LISTEN_ADDR, &raw.listen_addr)?,
            admin_addr,
            cache_size_bytes: parse_megabytes(CACHE_SIZE_MB, &raw.cache_size_mb)?,
            max_object_bytes: match parse_megabytes(CACHE_MAX_OBJECT_MB, &raw.cache_max_object_mb)?
            {
                0 => {
                    return Err(ConfigError::invalid(
                        CACHE_MAX_OBJECT_MB,
                        &raw.cache_max_object_mb,
                        "must be at least 1",
                    ))
                }
                n => n,
            },
            fallback_max_age: raw
                .cache_max_age
                .as_deref()
                .map(|v| parse_duration(CACHE_MAX_AGE, v))
                .transpose()?
                .filter(|d| !d.is_zero()),
            grace: parse_duration(CACHE_GRACE, &raw.cache_grace)?,
            stale_if_error: parse_duration(CACHE_STALE_IF_ERROR, &raw.cache_stale_if_error)?,
            lock_timeout: parse_duration(CACHE_LOCK_TIMEOUT, &raw.cache_lock_timeout)?,
            origin_timeout: parse_positive_duration(ORIGIN_TIMEOUT, &raw.origin_timeout)?,
            origin_idle_timeout: parse_positive_duration(
                ORIGIN_IDLE_TIMEOUT,
                &raw.origin_idle_timeout,
            )?,
            origin_max_idle: raw
                .origin_max_idle
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|n| *n <= MAX_ORIGIN_IDLE)
                .ok_or_else(|| {
                    ConfigError::invalid(
                        ORIGIN_MAX_IDLE,
                        &raw.origin_max_idle,
                        format!("expected 0 to {MAX_ORIGIN_IDLE}"),
                    )
                })?,
            origin_max_conns: parse_count_or_zero(
                ORIGIN_MAX_CONNS,
                &raw.origin_max_conns,
                MAX_ORIGIN_CONNS,
                "no limit",
            )?,
            shutdown_timeout: parse_duration(SHUTDOWN_TIMEOUT, &raw.shutdown_timeout)?,
            tunnel_idle_timeout: parse_positive_duration(
                TUNNEL_IDLE_TIMEOUT,
                &raw.tunnel_idle_timeout,
            )?,
            client_header_timeout: parse_positive_duration(
                CLIENT_HEADER_TIMEOUT,
                &raw.client_header_timeout,
            )?,
            worker_threads: parse_count_or_zero(
                WORKER_THREADS,
                &raw.worker_threads,
                MAX_WORKER_THREADS,
                "one per CPU",
            )?,
            log_format: match raw.log_format.to_ascii_lowercase().as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                _ => {
                    return Err(ConfigError::invalid(
                        LOG_FORMAT,
                        &raw.log_format,
                        "expected text or json",
                    ))
                }
            },
        })
    }
}

/// A count from 1 to `max`, or 0 (`None`), which stands for `zero_means` (said in the error).
fn parse_count_or_zero(
    var: &'static str,
    value: &str,
    max: usize,
    zero_means: &str,
) -> Result<Option<usize>, ConfigError> {
    match value.trim().parse::<usize>() {
        Ok(0) => Ok(None),
        Ok(n) if n <= max => Ok(Some(n)),
        _ => Err(ConfigError::invalid(
            var,
            value,
            format!("expected 0 ({zero_means}) to {max}"),
        )),
    }
}

fn parse_bool(var: &'static str, value: &str) -> Result<bool, ConfigError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" | "" => Ok(false),
        _ => Err(ConfigError::invalid(var, value, "expected true or false")),
    }
}

/// `REDIS_URL` (one or more comma-separated stores), else the seed-compatible `REDIS_ENABLED` +
/// `REDIS_ADDR`/`REDIS_PASSWORD`/`REDIS_DB`, else no L2.
fn parse_redis(raw: &RawArgs) -> Result<Option<RedisConfig>, ConfigError> {
    let stores = if let Some(urls) = raw.redis_url.as_deref().filter(|u| !u.trim().is_empty()) {
        urls.split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .map(|url| {
                const SCHEMES: [&str; 6] = [
                    "redis",
                    "rediss",
                    "redis-sentinel",
                    "rediss-sentinel",
                    "redis-cluster",
                    "rediss-cluster",
                ];
                let scheme = url.split_once("://").map_or("", |(scheme, _)| scheme);
                if !SCHEMES.contains(&scheme) {
                    return Err(ConfigError::invalid(
                        REDIS_URL,
                        "<redacted>",
                        format!("scheme {scheme:?} is not one of {}", SCHEMES.join(", ")),
                    ));
                }
                fred::types::config::Config::from_url(url).map_err(|e| {
                    // The message must not echo a password: name the scheme, not the URL.
                    let scheme = url.split("://").next().unwrap_or("");
                    ConfigError::invalid(
                        REDIS_URL,
                        "<redacted>",
                        format!("not a Redis URL (scheme {scheme:?}): {}", e.details()),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?
    } else if parse_bool(REDIS_ENABLED, &raw.redis_enabled)? {
        let (host, port) = raw
            .redis_addr
            .rsplit_once(':')
            .and_then(|(host, port)| {
                Some((host.trim_matches(['[', ']']), port.parse::<u16>().ok()?))
            })
            .filter(|(host, _)| !host.is_empty())
            .ok_or_else(|| {
                ConfigError::invalid(REDIS_ADDR, &raw.redis_addr, "expected host:port")
            })?;
        let database = raw.redis_db.trim().parse::<u8>().map_err(|_| {
            ConfigError::invalid(REDIS_DB, &raw.redis_db, "expected a database number 0-255")
        })?;
        vec![fred::types::config::Config {
            server: fred::types::config::ServerConfig::new_centralized(host, port),
            password: raw.redis_password.clone().filter(|p| !p.is_empty()),
            database: Some(database),
            ..Default::default()
        }]
    } else {
        return Ok(None);
    };
    if stores.is_empty() {
        return Err(ConfigError::invalid(REDIS_URL, "", "no store given"));
    }
    let pool_size = raw
        .redis_pool_size
        .trim()
        .parse::<usize>()
        .ok()
        .filter(|n| (1..=64).contains(n))
        .ok_or_else(|| {
            ConfigError::invalid(REDIS_POOL_SIZE, &raw.redis_pool_size, "expected 1 to 64")
        })?;
    Ok(Some(RedisConfig {
        stores,
        key_prefix: raw.redis_key_prefix.clone(),
        timeout: parse_positive_duration(REDIS_TIMEOUT, &raw.redis_timeout)?,
        pool_size,
    }))
}

fn parse_origin(value: &str) -> Result<Uri, ConfigError> {
    let uri: Uri = value
        .parse()
        .map_err(|e| ConfigError::invalid(ORIGIN_URL, value, format!("not a URL: {e}")))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => {
            return Err(ConfigError::invalid(
                ORIGIN_URL,
                value,
                "scheme must be http or https",
            ))
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(ConfigError::invalid(ORIGIN_URL, value, "no host"));
    }
    if uri.query().is_some() {
        return Err(ConfigError::invalid(
            ORIGIN_URL,
            value,
            "must not carry a query string",
        ));
    }
    Ok(uri)
}

fn parse_addr(var: &'static str, value: &str) -> Result<SocketAddr, ConfigError> {
    value
        .parse()
        .map_err(|_| ConfigError::invalid(var, value, "expected IP:PORT, e.g. 0.0.0.0:8080"))
}

fn parse_megabytes(var: &'static str, value: &str) -> Result<u64, ConfigError> {
    let mb: u64 = value
        .trim()
        .parse()
        .map_err(|_| ConfigError::invalid(var, value, "expected a whole number of MiB"))?;
    mb.checked_mul(1024 * 1024)
        .ok_or_else(|| ConfigError::invalid(var, value, "too large"))
}

/// Durations read `250ms`, `30s`, `5m`, `1h` (and combinations such as `1m30s`); a bare number is seconds.
pub fn parse_duration(var: &'static str, value: &str) -> Result<Duration, ConfigError> {
    let value_trimmed = value.trim();
    let parsed = match value_trimmed.parse::<u64>() {
        Ok(secs) => Ok(Duration::from_secs(secs)),
        Err(_) => humantime::parse_duration(value_trimmed),
    };
    let duration = parsed.map_err(|e| {
        ConfigError::invalid(
            var,
            value,
            format!("expected a duration like 250ms, 30s, 5m, 1h ({e})"),
        )
    })?;
    if duration > MAX_DURATION {
        return Err(ConfigError::invalid(var, value, "longer than 10 years"));
    }
    Ok(duration)
}

/// Longer settings are surely mistakes, and would overflow deadline arithmetic.
const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

fn parse_positive_duration(var: &'static str, value: &str) -> Result<Duration, ConfigError> {
    let d = parse_duration(var, value)?;
    if d.is_zero() {
        return Err(ConfigError::invalid(
            var,
            value,
            "must be greater than zero",
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_an_operator_writes_them() {
        let d = |v| parse_duration(CACHE_GRACE, v).ok();
        assert_eq!(d("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(d("30s"), Some(Duration::from_secs(30)));
        assert_eq!(d("5m"), Some(Duration::from_secs(300)));
        assert_eq!(d("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(d("45"), Some(Duration::from_secs(45)));
        assert_eq!(d("soon"), None);
        assert_eq!(d("1000000y"), None);
    }

    #[test]
    fn errors_name_the_variable() {
        let err = Config::from_vars([("ORIGIN_URL", "http://o"), ("CACHE_SIZE_MB", "abc")])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("CACHE_SIZE_MB"), "{err}");
        let err = Config::from_vars([("ORIGIN_URL", "ftp://x")])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("ORIGIN_URL"), "{err}");
    }

    #[test]
    fn open_admin_must_be_on_loopback() {
        let err = Config::from_vars([("ORIGIN_URL", "http://o"), ("ADMIN_ADDR", "0.0.0.0:9090")])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("ADMIN_ADDR") && err.contains("ADMIN_TOKEN"),
            "{err}"
        );
        let ok = Config::from_vars([
            ("ORIGIN_URL", "http://o"),
            ("ADMIN_ADDR", "0.0.0.0:9090"),
            ("ADMIN_TOKEN", "s3cret"),
        ]);
        let token = ok.ok().and_then(|c| c.admin_token);
        assert!(token.as_ref().is_some_and(|t| t.matches(b"s3cret")));
        assert!(token
            .as_ref()
            .is_some_and(|t| !t.matches(b"s3cre7") && !t.matches(b"s3cret ")));
        assert_eq!(format!("{token:?}"), "Some(AdminToken(<redacted>))");
    }

    #[test]
    fn admin_token_is_trimmed_and_must_be_sendable() {
        let token = Config::from_vars([("ORIGIN_URL", "http://o"), ("ADMIN_TOKEN", " s3cret\n")])
            .ok()
            .and_then(|c| c.admin_token);
        assert!(token.as_ref().is_some_and(|t| t.matches(b"s3cret")));
        let err = Config::from_vars([("ORIGIN_URL", "http://o"), ("ADMIN_TOKEN", "s3 cret")])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("ADMIN_TOKEN") && !err.contains("s3"), "{err}");
    }

    #[test]
    fn redis_settings() {
        let c = Config::from_vars([
            ("ORIGIN_URL", "http://o"),
            ("REDIS_URL", "redis://127.0.0.1:7000/2"),
        ]);
        let redis = c.ok().and_then(|c| c.redis);
        assert_eq!(redis.as_ref().map(|r| r.stores.len()), Some(1));
        assert_eq!(
            redis.as_ref().map(|r| r.key_prefix.as_str()),
            Some("strata:")
        );
        assert_eq!(redis.map(|r| r.timeout), Some(Duration::from_millis(50)));
        let c = Config::from_vars([
            ("ORIGIN_URL", "http://o"),
            ("REDIS_ENABLED", "true"),
            ("REDIS_ADDR", "cache:6380"),
        ]);
        assert!(c.is_ok_and(|c| c.redis.is_some()));
        let err = Config::from_vars([("ORIGIN_URL", "http://o"), ("REDIS_URL", "ftp://x")])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("REDIS_URL"), "{err}");
        let none = Config::from_vars([("ORIGIN_URL", "http://o")]);
        assert!(none.is_ok_and(|c| c.redis.is_none()));
    }

    #[test]
    fn defaults_apply() {
        let c = Config::from_vars([("ORIGIN_URL", "https://example.com/base")]);
        let c = match c {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(c.cache_size_bytes, 256 * 1024 * 1024);
        assert_eq!(c.max_object_bytes, 8 * 1024 * 1024);
        assert_eq!(c.lock_timeout, Duration::from_secs(5));
        assert_eq!(c.origin_timeout, Duration::from_secs(30));
        assert_eq!(c.origin_idle_timeout, Duration::from_secs(55));
        assert_eq!(c.origin_max_idle, 1024);
        assert_eq!(c.origin_max_conns, None);
        assert_eq!(c.tunnel_idle_timeout, Duration::from_secs(300));
        assert_eq!(c.fallback_max_age, None);
        assert_eq!(c.listen_addr.to_string(), "0.0.0.0:8080");
        assert_eq!(c.admin_addr.to_string(), "127.0.0.1:9090");
    }
}
