//! Tracing set-up: `RUST_LOG` filters, `LOG_FORMAT` picks text or JSON lines; `LOG_REDACT_KEYS`
//! hashes cache keys and paths before they reach a log line.

use std::hash::{Hash, Hasher};

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

pub fn init(format: LogFormat, filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal; log collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true)
        .with_ansi(ansi);
    let result = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    if let Err(error) = result {
        eprintln!("strata: logging already initialised: {error}");
    }
}

/// A short, stable stand-in for a cache key or path (`h:` + 12 hex digits), so log lines about the
/// same URL still correlate without showing it. SipHash with fixed keys: stable across restarts of
/// one build.
pub fn redact(text: &str) -> String {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut hasher);
    format!("h:{:012x}", hasher.finish() & 0xffff_ffff_ffff)
}

/// `text` itself, or its [`redact`]ed form.
pub fn loggable(text: &str, redact_keys: bool) -> std::borrow::Cow<'_, str> {
    if redact_keys {
        std::borrow::Cow::Owned(redact(text))
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_is_short_stable_and_hides_the_text() {
        let a = redact("/users/42/secret");
        assert_eq!(a, redact("/users/42/secret"));
        assert_ne!(a, redact("/users/43/secret"));
        assert!(a.starts_with("h:") && a.len() == 14, "{a}");
        assert_eq!(loggable("/x", false), "/x");
    }
}
