//! Purges: what to take out of the cache (one key, a glob over keys, or surrogate keys), hard or soft
//! (marked stale, Fastly's semantics), and the log that keeps a fill which began before a matching
//! purge from storing its result after it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Purges remembered for the generation check; a fill older than the oldest of them is refused.
const LOG_CAPACITY: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Selector {
    /// One cache key (`host/path?query`), all its variants.
    Key(String),
    /// A glob over cache keys where `*` spans any characters, `/` included.
    Pattern(String),
    /// Entries carrying any of these surrogate keys.
    Tags(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Purge {
    pub selector: Selector,
    /// Mark stale instead of removing: stale-while-revalidate and stale-if-error still apply.
    pub soft: bool,
}

/// A purge request that cannot be applied; the message says why (answered with 400).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct PurgeError(pub String);

fn bad(message: &str) -> PurgeError {
    PurgeError(message.to_string())
}

impl Purge {
    /// Parses `{"key": ...}` | `{"pattern": ...}` | `{"tags": [...]}` with an optional `"soft": bool`.
    /// Anything else is refused as a whole: nothing is ever half-applied.
    pub fn from_json(body: &[u8]) -> Result<Purge, PurgeError> {
        let value: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| PurgeError(format!("malformed JSON: {e}")))?;
        let object = value.as_object().ok_or_else(|| {
            bad("expected a JSON object with one of \"key\", \"pattern\", \"tags\"")
        })?;
        if let Some(unknown) = object
            .keys()
            .find(|k| !matches!(k.as_str(), "key" | "pattern" | "tags" | "soft"))
        {
            return Err(PurgeError(format!("unknown field {unknown:?}")));
        }
        let soft = match object.get("soft") {
            None => false,
            Some(serde_json::Value::Bool(soft)) => *soft,
            Some(_) => return Err(bad("\"soft\" must be true or false")),
        };
        let selectors: Vec<&str> = ["key", "pattern", "tags"]
            .into_iter()
            .filter(|name| object.contains_key(*name))
            .collect();
        let selector = match selectors.as_slice() {
            [] => {
                return Err(bad(
                    "no selector: give one of \"key\", \"pattern\", \"tags\"",
                ))
            }
            ["key"] => Selector::Key(non_empty_string(object.get("key"), "key")?),
            ["pattern"] => Selector::Pattern(non_empty_string(object.get("pattern"), "pattern")?),
            ["tags"] => {
                let tags = object
                    .get("tags")
                    .and_then(serde_json::Value::as_array)
                    .ok_or_else(|| bad("\"tags\" must be a list of strings"))?;
                if tags.is_empty() {
                    return Err(bad("\"tags\" is empty"));
                }
                let tags = tags
                    .iter()
                    .map(|t| match t.as_str() {
                        Some(tag) if !tag.trim().is_empty() => Ok(tag.trim().to_string()),
                        _ => Err(bad("\"tags\" must be non-empty strings")),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Selector::Tags(tags)
            }
            several => {
                return Err(PurgeError(format!(
                    "several selectors ({}): give exactly one",
                    several.join(", ")
                )))
            }
        };
        Ok(Purge { selector, soft })
    }

    /// Whether an entry stored under `key` (the URL's primary key) with `tags` is concerned.
    pub fn matches(&self, key: &str, tags: &[String]) -> bool {
        match &self.selector {
            Selector::Key(purged) => purged == key,
            Selector::Pattern(pattern) => glob_match(pattern, key),
            Selector::Tags(purged) => purged.iter().any(|tag| tags.contains(tag)),
        }
    }
}

fn non_empty_string(value: Option<&serde_json::Value>, name: &str) -> Result<String, PurgeError> {
    match value.and_then(serde_json::Value::as_str) {
        Some(text) if !text.is_empty() => Ok(text.to_string()),
        Some(_) => Err(PurgeError(format!("\"{name}\" is empty"))),
        None => Err(PurgeError(format!("\"{name}\" must be a string"))),
    }
}

/// Glob match where `*` matches any run of characters (including `/`) and everything else is
/// literal. Linear-time two-pointer algorithm: no backtracking blow-up on hostile patterns.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((star_pi, star_ti)) = star {
            pi = star_pi + 1;
            ti = star_ti + 1;
            star = Some((star_pi, star_ti + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

/// Recent purges, numbered, so that a fill can ask "was I overtaken by a purge that concerns me?"
#[derive(Default)]
pub struct PurgeLog {
    generation: AtomicU64,
    // std Mutex: held for a push or a scan of at most LOG_CAPACITY items, never across an .await.
    recent: Mutex<VecDeque<(u64, Purge)>>,
}

impl PurgeLog {
    /// The generation a fill starting now remembers.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    pub fn record(&self, purge: &Purge) {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        if recent.len() == LOG_CAPACITY {
            recent.pop_front();
        }
        recent.push_back((generation, purge.clone()));
    }

    /// Whether a purge recorded after `since` concerns `key`/`tags`. A fill older than everything
    /// the log still remembers is treated as overtaken (refusing to store is always safe).
    pub fn overtaken(&self, since: u64, key: &str, tags: &[String]) -> bool {
        if self.generation() == since {
            return false;
        }
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        match recent.front() {
            Some((oldest, _)) if *oldest > since + 1 => true,
            _ => recent
                .iter()
                .filter(|(generation, _)| *generation > since)
                .any(|(_, purge)| purge.matches(key, tags)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_span_slashes() {
        assert!(glob_match(
            "api.example.com/users/*",
            "api.example.com/users/1/posts?x=1"
        ));
        assert!(glob_match("*/static/*", "cdn.test/static/app.js"));
        assert!(!glob_match("*/static/*", "cdn.test/staticx"));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b*c", "aXXbYY"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exactly"));
        assert!(glob_match("*", ""));
        // Hostile pattern stays linear.
        let text = "a".repeat(10_000);
        assert!(!glob_match("*a*a*a*a*a*a*a*a*b", &text));
    }

    #[test]
    fn bodies_are_validated_whole() {
        let ok = |body: &str| Purge::from_json(body.as_bytes());
        assert_eq!(
            ok(r#"{"key":"h/a","soft":true}"#),
            Ok(Purge {
                selector: Selector::Key("h/a".into()),
                soft: true
            })
        );
        assert_eq!(
            ok(r#"{"tags":["a"," b "]}"#).map(|p| p.selector),
            Ok(Selector::Tags(vec!["a".into(), "b".into()]))
        );
        for bad_body in [
            "{",
            "[]",
            "{}",
            r#"{"key":"a","pattern":"b"}"#,
            r#"{"pattern":""}"#,
            r#"{"key":""}"#,
            r#"{"tags":[]}"#,
            r#"{"tags":"a"}"#,
            r#"{"tags":[1]}"#,
            r#"{"key":1}"#,
            r#"{"key":"a","soft":"yes"}"#,
            r#"{"key":"a","extra":1}"#,
        ] {
            assert!(ok(bad_body).is_err(), "{bad_body}");
        }
    }

    #[test]
    fn log_finds_purges_that_overtook_a_fill() {
        let log = PurgeLog::default();
        let start = log.generation();
        assert!(!log.overtaken(start, "h/a", &[]));
        log.record(&Purge {
            selector: Selector::Pattern("h/x*".into()),
            soft: false,
        });
        assert!(!log.overtaken(start, "h/a", &[]));
        assert!(log.overtaken(start, "h/xyz", &[]));
        log.record(&Purge {
            selector: Selector::Tags(vec!["t".into()]),
            soft: false,
        });
        assert!(log.overtaken(start, "h/a", &["t".into()]));
        assert!(!log.overtaken(log.generation(), "h/a", &["t".into()]));
    }
}
