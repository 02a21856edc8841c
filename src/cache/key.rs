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

/// The key of one variant of a URL whose responses carry `Vary: names`.
///
/// `nonce` belongs to the URL's vary record; a new record (after a purge or a change of `Vary`) gets
/// a new nonce, so variants stored before it can never be found again, only evicted.
pub fn variant_key(primary: &str, nonce: u64, names: &[HeaderName], headers: &HeaderMap) -> String {
    let mut key = String::with_capacity(primary.len() + 32);
    key.push_str(primary);
    let _ = write!(key, "\u{0}{nonce:x}");
    for name in names {
        key.push('\u{0}');
        for (i, value) in headers.get_all(name).iter().enumerate() {
            if i > 0 {
                key.push(',');
            }
            key.push_str(&String::from_utf8_lossy(value.as_bytes()));
        }
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
