//! Cache keys: `{host}{path}?{query}` for a URL, plus a variant suffix for responses that `Vary`.

use std::fmt::Write as _;

use http::{HeaderMap, HeaderName, Uri};

/// The host a request is for: the `Host` header, or the URI authority (HTTP/2 `:authority`).
/// `None` when the request names no usable host (answered 400).
pub fn request_host<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> Option<&'a str> {
    let host = match uri.authority() {
        Some(authority) => authority.as_str(),
        None => headers.get(http::header::HOST)?.to_str().ok()?,
    };
    let valid = !host.is_empty()
        && host.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']' | b'_')
        });
    valid.then_some(host)
}

/// The primary key of a URL: host lowercased, then path and query as received.
pub fn cache_key(host: &str, uri: &Uri) -> String {
    let path_and_query = uri.path_and_query().map(|pq| pq.as_str()).unwrap_or("/");
    let mut key = String::with_capacity(host.len() + path_and_query.len());
    key.push_str(host);
    key.make_ascii_lowercase();
    if !path_and_query.starts_with('/') {
        key.push('/');
    }
    key.push_str(path_and_query);
    key
}

/// The URL's key of a storage key (a variant's key is the URL's key, a NUL, and the variant's part).
pub fn primary_key(storage_key: &str) -> &str {
    storage_key.split('\u{0}').next().unwrap_or(storage_key)
}

/// The key of one variant of a URL whose responses carry `Vary: names`: the request's selecting
/// values as [`selecting_value`] normalizes them, so requests that RFC 9111 says match share it.
///
/// `nonce` belongs to the URL's vary record; a new record (after a purge or a change of `Vary`) gets
/// a new nonce, so variants stored before it can never be found again, only evicted.
pub fn variant_key(primary: &str, nonce: u64, names: &[HeaderName], headers: &HeaderMap) -> String {
    let mut key = String::with_capacity(primary.len() + 32);
    key.push_str(primary);
    let _ = write!(key, "\u{0}{nonce:x}");
    for name in names {
        key.push('\u{0}');
        // An absent field and an empty one select differently (`Accept-Encoding:` asks for identity).
        if let Some(value) = selecting_value(name, headers) {
            key.push('=');
            key.push_str(&String::from_utf8_lossy(&value));
        }
    }
    key
}

/// Selecting fields whose members are tokens with an optional weight (`gzip;q=0.8`): no quoted
/// strings, no meaningful whitespace, case-insensitive (RFC 9110 §12.5.2–12.5.4).
const TOKEN_LISTS: [HeaderName; 3] = [
    http::header::ACCEPT_ENCODING,
    http::header::ACCEPT_LANGUAGE,
    http::header::ACCEPT_CHARSET,
];

/// A request's value of the selecting field `name` in the form `Vary` matching compares (RFC 9111
/// §4.1: requests match when one's fields become the other's by adding or removing whitespace where
/// the syntax allows it, combining field lines, or a normalization known to keep the meaning).
/// `None` when the field is absent.
///
/// Every field: its lines combined with `, `, each trimmed. `Accept-Encoding`, `Accept-Language`
/// and `Accept-Charset` further: members without whitespace or empty members, lowercased; and for
/// `Accept-Encoding`, whose members' order carries no preference (weights do), sorted. Other
/// fields keep their spelling: `Accept` may carry quoted strings, and unknown fields may be
/// case-sensitive.
pub fn selecting_value(name: &HeaderName, headers: &HeaderMap) -> Option<Vec<u8>> {
    let mut lines = headers.get_all(name).iter().peekable();
    lines.peek()?;
    let capacity = headers
        .get_all(name)
        .iter()
        .map(|line| line.len() + 2)
        .sum();
    // One buffer for the result: this runs on every hit of a URL whose responses vary.
    let mut value = Vec::with_capacity(capacity);
    if !TOKEN_LISTS.contains(name) {
        for (i, line) in lines.enumerate() {
            if i > 0 {
                value.extend_from_slice(b", ");
            }
            value.extend_from_slice(line.as_bytes().trim_ascii());
        }
        return Some(value);
    }
    for member in lines.flat_map(|line| line.as_bytes().split(|&b| b == b',')) {
        let before = value.len();
        if before > 0 {
            value.push(b',');
        }
        let start = value.len();
        value.extend(
            member
                .iter()
                .filter(|b| !matches!(b, b' ' | b'\t'))
                .map(u8::to_ascii_lowercase),
        );
        if value.len() == start {
            value.truncate(before);
        }
    }
    if name == http::header::ACCEPT_ENCODING {
        value = sorted_members(value);
    }
    Some(value)
}

/// `list` (members joined by commas) with its members in byte order.
fn sorted_members(list: Vec<u8>) -> Vec<u8> {
    let mut members: Vec<&[u8]> = list.split(|&b| b == b',').collect();
    if members.is_sorted() {
        drop(members);
        return list;
    }
    members.sort_unstable();
    members.join(&b',')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::policy::tests::headers;

    #[test]
    fn key_lowercases_host_and_keeps_query() {
        let uri: Uri = "/Users/1?b=2&a=1".parse().unwrap_or_default();
        assert_eq!(
            cache_key("API.Example.com", &uri),
            "api.example.com/Users/1?b=2&a=1"
        );
    }

    #[test]
    fn host_comes_from_authority_or_header() {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::HOST,
            http::HeaderValue::from_static("a.test:8080"),
        );
        let uri: Uri = "/x".parse().unwrap_or_default();
        assert_eq!(request_host(&uri, &headers), Some("a.test:8080"));
        let absolute: Uri = "http://b.test/x".parse().unwrap_or_default();
        assert_eq!(request_host(&absolute, &headers), Some("b.test"));
        headers.insert(
            http::header::HOST,
            http::HeaderValue::from_static("bad host"),
        );
        assert_eq!(request_host(&uri, &headers), None);
    }

    #[test]
    fn variants_differ_by_selecting_headers() {
        let names = [http::header::ACCEPT_ENCODING];
        let mut gzip = HeaderMap::new();
        gzip.insert(
            http::header::ACCEPT_ENCODING,
            http::HeaderValue::from_static("gzip"),
        );
        let plain = HeaderMap::new();
        assert_ne!(
            variant_key("k", 1, &names, &gzip),
            variant_key("k", 1, &names, &plain)
        );
        assert_ne!(
            variant_key("k", 1, &names, &gzip),
            variant_key("k", 2, &names, &gzip)
        );
    }

    fn selected(name: HeaderName, pairs: &[(&'static str, &'static str)]) -> Option<String> {
        selecting_value(&name, &headers(pairs)).map(|v| String::from_utf8_lossy(&v).into_owned())
    }

    #[test]
    fn selecting_values_are_normalized_as_rfc_9111_allows() {
        use http::header::{ACCEPT, ACCEPT_ENCODING, ACCEPT_LANGUAGE, USER_AGENT};
        assert_eq!(selected(ACCEPT_ENCODING, &[]), None);
        assert_eq!(
            selected(ACCEPT_ENCODING, &[("accept-encoding", "")]),
            Some(String::new())
        );
        // Codings: whitespace, empty members, case and order do not matter; weights stay.
        assert_eq!(
            selected(
                ACCEPT_ENCODING,
                &[
                    ("accept-encoding", " br ,GZip; q=0.8,"),
                    ("accept-encoding", "zstd")
                ]
            ),
            Some("br,gzip;q=0.8,zstd".into())
        );
        // Languages: case and whitespace only; their order is kept.
        assert_eq!(
            selected(
                ACCEPT_LANGUAGE,
                &[("accept-language", "fr-CH, fr;q=0.9, EN;q=0.8")]
            ),
            Some("fr-ch,fr;q=0.9,en;q=0.8".into())
        );
        // Other fields: lines combined and trimmed, spelling kept (quoted strings, case).
        assert_eq!(
            selected(
                ACCEPT,
                &[("accept", "text/html; a=\"X, Y\" "), ("accept", " */*")]
            ),
            Some("text/html; a=\"X, Y\", */*".into())
        );
        assert_eq!(
            selected(USER_AGENT, &[("user-agent", "Mozilla/5.0 (X11; Linux)")]),
            Some("Mozilla/5.0 (X11; Linux)".into())
        );
    }

    #[test]
    fn variant_keys_follow_the_normalized_values() {
        let names = [http::header::ACCEPT_ENCODING];
        let key =
            |pairs: &[(&'static str, &'static str)]| variant_key("k", 1, &names, &headers(pairs));
        assert_eq!(
            key(&[("accept-encoding", "gzip, br")]),
            key(&[("accept-encoding", "BR"), ("accept-encoding", "gzip")])
        );
        assert_ne!(key(&[]), key(&[("accept-encoding", "")]));
    }
}
