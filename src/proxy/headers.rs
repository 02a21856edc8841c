//! Header rules of an intermediary: hop-by-hop fields removed both ways (RFC 9110 §7.6.1), `Via`,
//! `X-Forwarded-For/-Proto/-Host` added toward the origin, the keyed `Host` sent.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Version;

use crate::cache::policy::single_line;

/// Fields that describe one connection, never forwarded.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
pub const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

const VIA_RESPONSE: HeaderValue = HeaderValue::from_static("1.1 strata");

/// Removes hop-by-hop fields, including every field the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names is cheaper than seven hashed removals.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = connection_options(headers)
            .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// The field names the `Connection` header lists (its connection options), trimmed.
fn connection_options(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|name| !name.is_empty())
}

/// Removes the fields a request's `Connection` header names as soon as it arrives, before the cache
/// reads it. They never reach the origin (RFC 9110 §7.6.1); a cache that still selected a `Vary`
/// variant by one of them would store the origin's answer under a variant the origin never saw, so
/// `Accept-Language: fr` with `Connection: accept-language` could put the default page in place of
/// the French one for everybody. The hop-by-hop fields themselves stay for the upgrade check and
/// are removed toward the origin.
pub fn drop_connection_options(headers: &mut HeaderMap) {
    if !headers.contains_key(header::CONNECTION) {
        return;
    }
    let is_hop_by_hop = |name: &str| {
        HOP_BY_HOP
            .iter()
            .any(|h| h.as_str().eq_ignore_ascii_case(name))
    };
    // The usual `keep-alive`, `close` or `upgrade` name nothing else: nothing is allocated.
    let named: Vec<HeaderName> = connection_options(headers)
        .filter(|name| !is_hop_by_hop(name))
        .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
}

fn via_for(version: Version) -> HeaderValue {
    // Constants: `from_static` outside a const context checks every byte on each call.
    match version {
        Version::HTTP_09 => const { HeaderValue::from_static("0.9 strata") },
        Version::HTTP_10 => const { HeaderValue::from_static("1.0 strata") },
        Version::HTTP_2 => const { HeaderValue::from_static("2 strata") },
        Version::HTTP_3 => const { HeaderValue::from_static("3 strata") },
        _ => VIA_RESPONSE,
    }
}

/// Turns a client's request headers into the headers sent to the origin.
///
/// `host` is the host the cache key was built from; the origin always gets exactly that `Host`, so
/// what is stored under a key is what the origin answered for that key's host (an absolute-form
/// request line or an HTTP/2 `:authority` wins over a different `Host`, RFC 9112 §3.2.2).
pub fn to_origin(headers: &mut HeaderMap, version: Version, client_ip: IpAddr, host: &str) {
    strip_hop_by_hop(headers);
    // Strata answers `100-continue` to its client itself (hyper does, when the body is read).
    headers.remove(header::EXPECT);
    join_cookies(headers);
    headers.append(header::VIA, via_for(version));
    let client = client_ip.to_canonical();
    let previous: Vec<&str> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect(); // empty, the common case, allocates nothing
    let forwarded_for = if previous.is_empty() {
        forwarded_for_value(&client)
    } else {
        HeaderValue::from_str(&format!("{}, {client}", previous.join(", "))).ok()
    };
    if let Some(value) = forwarded_for {
        headers.insert(X_FORWARDED_FOR, value);
    }
    // A trusted load balancer in front of Strata knows the client's real scheme: keep its value.
    headers
        .entry(X_FORWARDED_PROTO)
        .or_insert(const { HeaderValue::from_static("http") });
    // Usually the client's own `Host` is exactly the keyed host: its value is shared, not copied.
    let host_value = match headers.get(header::HOST) {
        Some(value) if value.as_bytes() == host.as_bytes() => Some(value.clone()),
        _ => {
            let value = HeaderValue::from_str(host).ok();
            if let Some(value) = &value {
                headers.insert(header::HOST, value.clone());
            }
            value
        }
    };
    // Always the keyed host, never a value the request brought: origins build redirects and links
    // from this field, and an answer built for a client's `X-Forwarded-Host: evil.example` would
    // be stored under the key of the real host and served to everyone (load balancers such as
    // AWS's pass a client's value on). The same reason pins `Host`.
    if let Some(host_value) = host_value {
        headers.insert(X_FORWARDED_HOST, host_value);
    }
}

/// The client's address as a header value, formatted without an intermediate `String`. IPv4, the
/// common case, is written octet by octet: `fmt` machinery cost a passed request 1,000 instructions.
fn forwarded_for_value(client: &IpAddr) -> Option<HeaderValue> {
    let mut buffer = [0u8; 48]; // the longest IPv6 text form is 45 bytes
    let written = match client {
        IpAddr::V4(v4) => {
            let mut written = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    buffer[written] = b'.';
                    written += 1;
                }
                let mut digits = itoa::Buffer::new();
                let digits = digits.format(octet).as_bytes();
                buffer[written..written + digits.len()].copy_from_slice(digits);
                written += digits.len();
            }
            written
        }
        IpAddr::V6(v6) => {
            use std::io::Write;
            let mut cursor = std::io::Cursor::new(&mut buffer[..]);
            write!(cursor, "{v6}").ok()?;
            usize::try_from(cursor.position()).ok()?
        }
    };
    HeaderValue::from_bytes(&buffer[..written]).ok()
}

/// HTTP/2 clients may split `Cookie` into several fields; an HTTP/1.1 origin expects one, joined
/// with "; " (RFC 9113 §8.2.3).
fn join_cookies(headers: &mut HeaderMap) {
    let mut cookies = headers.get_all(header::COOKIE).iter();
    if cookies.next().is_none() || cookies.next().is_none() {
        return;
    }
    let joined: Vec<&[u8]> = headers
        .get_all(header::COOKIE)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect();
    if let Ok(value) = HeaderValue::from_bytes(&joined.join(&b"; "[..])) {
        headers.insert(header::COOKIE, value);
    }
}

/// Settles an origin response's framing before anything else reads it. hyper's client read a
/// response with `Transfer-Encoding: chunked` as chunked but leaves a `Content-Length` beside it,
/// which describes nothing, and once `Transfer-Encoding` (hop-by-hop) is dropped would frame the
/// client's copy: a body cut short that looks whole, or a length the cache disagrees with. It is
/// removed (RFC 9112 §6.3). Any other transfer coding (`gzip, chunked`, or one read until close)
/// leaves the body coded in a way no client is told of once the field is gone: an error, as
/// nginx's "upstream sent unknown Transfer-Encoding".
pub fn settle_response_framing(headers: &mut HeaderMap) -> Result<(), String> {
    if !headers.contains_key(header::TRANSFER_ENCODING) {
        return Ok(());
    }
    let mut codings = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|line| line.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|coding| !coding.is_empty());
    match (codings.next(), codings.next()) {
        (Some(coding), None) if coding.eq_ignore_ascii_case(b"chunked") => {
            headers.remove(header::CONTENT_LENGTH);
            Ok(())
        }
        _ => Err(format!(
            "the origin sent Transfer-Encoding {:?}, which cannot be forwarded",
            headers
                .get_all(header::TRANSFER_ENCODING)
                .iter()
                .map(|line| String::from_utf8_lossy(line.as_bytes()))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// `Max-Forwards` of a request Strata is about to forward (RFC 9110 §7.6.2): its value, lowered by
/// one in `headers` when above zero. `None` (and left as it is) when absent or not one number.
pub fn take_a_forward(headers: &mut HeaderMap) -> Option<u64> {
    let line = single_line(headers, header::MAX_FORWARDS)?;
    let text = line.to_str().ok()?.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // All digits: a value too large for u64 is as good as unlimited.
    let hops = text.parse::<u64>().unwrap_or(u64::MAX);
    if hops > 0 {
        headers.insert(header::MAX_FORWARDS, HeaderValue::from(hops - 1));
    }
    Some(hops)
}

/// Cleans an origin's response headers for the client.
pub fn to_client(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    headers.append(header::VIA, VIA_RESPONSE);
}

/// The request asks to switch to WebSocket (`Connection: upgrade` + `Upgrade: websocket`). Other
/// upgrades (`h2c`, `TLS/1.0`) are not tunnelled: `Upgrade` is hop-by-hop and is simply dropped.
pub fn upgrade_requested(headers: &HeaderMap) -> Option<HeaderValue> {
    let upgrade = headers.get(header::UPGRADE)?;
    let websocket = upgrade.to_str().is_ok_and(|v| {
        v.split(',')
            .any(|p| p.trim().eq_ignore_ascii_case("websocket"))
    });
    if !websocket {
        return None;
    }
    let connection_says_upgrade = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    connection_says_upgrade.then(|| upgrade.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_forwards_is_lowered_by_one_hop() {
        let forwarded = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::MAX_FORWARDS, HeaderValue::from_static(value));
            let hops = take_a_forward(&mut headers);
            (
                hops,
                headers[header::MAX_FORWARDS]
                    .to_str()
                    .map(str::to_owned)
                    .ok(),
            )
        };
        assert_eq!(forwarded("3"), (Some(3), Some("2".into())));
        assert_eq!(forwarded(" 1 "), (Some(1), Some("0".into())));
        assert_eq!(forwarded("0"), (Some(0), Some("0".into())));
        let huge = "99999999999999999999999";
        assert_eq!(
            forwarded(huge),
            (Some(u64::MAX), Some((u64::MAX - 1).to_string()))
        );
        for invalid in ["", "-1", "two", "1, 2"] {
            assert_eq!(
                forwarded(invalid),
                (None, Some(invalid.into())),
                "{invalid:?}"
            );
        }
        let mut twice = HeaderMap::new();
        twice.append(header::MAX_FORWARDS, HeaderValue::from_static("0"));
        twice.append(header::MAX_FORWARDS, HeaderValue::from_static("0"));
        assert_eq!(take_a_forward(&mut twice), None);
        assert_eq!(take_a_forward(&mut HeaderMap::new()), None);
    }

    #[test]
    fn forwarded_for_is_the_address_as_displayed() {
        for text in [
            "0.0.0.0",
            "1.2.3.4",
            "10.0.200.9",
            "127.0.0.1",
            "255.255.255.255",
            "::1",
            "2001:db8::ff00:42:8329",
        ] {
            let address: IpAddr = text.parse().unwrap_or(IpAddr::from([9, 9, 9, 9]));
            let value = forwarded_for_value(&address);
            assert_eq!(
                value.as_ref().map(HeaderValue::as_bytes),
                Some(text.as_bytes())
            );
        }
    }

    #[test]
    fn connection_named_fields_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn origin_gets_the_keyed_host_and_one_cookie_field() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("evil.test"));
        h.append(header::COOKIE, HeaderValue::from_static("a=1"));
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        h.insert(header::EXPECT, HeaderValue::from_static("100-continue"));
        to_origin(
            &mut h,
            Version::HTTP_2,
            IpAddr::from([127, 0, 0, 1]),
            "victim.test",
        );
        assert_eq!(
            h.get(header::HOST),
            Some(&HeaderValue::from_static("victim.test"))
        );
        assert_eq!(h.get_all(header::COOKIE).iter().count(), 1);
        assert_eq!(
            h.get(header::COOKIE),
            Some(&HeaderValue::from_static("a=1; b=2"))
        );
        assert!(!h.contains_key(header::EXPECT));
    }

    #[test]
    fn only_websocket_upgrades_are_tunnelled() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("Upgrade, HTTP2-Settings"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        assert!(upgrade_requested(&h).is_none());
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(upgrade_requested(&h).is_some());
    }

    #[test]
    fn forwarded_fields_for_a_plain_request() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("a.test"));
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        to_origin(
            &mut h,
            Version::HTTP_11,
            IpAddr::from([0, 0, 0, 0, 0, 0xffff, 0x0a00, 0x0001]),
            "a.test",
        );
        assert_eq!(
            h.get(X_FORWARDED_FOR),
            Some(&HeaderValue::from_static("10.0.0.1"))
        );
        assert_eq!(
            h.get(X_FORWARDED_PROTO),
            Some(&HeaderValue::from_static("https"))
        );
        assert_eq!(
            h.get(X_FORWARDED_HOST),
            Some(&HeaderValue::from_static("a.test"))
        );
        assert_eq!(h.get_all(header::HOST).iter().count(), 1);
        let mut v6 = HeaderMap::new();
        let longest: IpAddr = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
            .parse()
            .unwrap_or(IpAddr::from([0; 16]));
        to_origin(&mut v6, Version::HTTP_11, longest, "a.test");
        assert_eq!(
            v6.get(X_FORWARDED_FOR),
            Some(&HeaderValue::from_static(
                "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
            ))
        );
        assert_eq!(
            v6.get(header::HOST),
            Some(&HeaderValue::from_static("a.test"))
        );
    }

    #[test]
    fn forwarded_for_is_appended() {
        let mut h = HeaderMap::new();
        h.insert(X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.1"));
        to_origin(
            &mut h,
            Version::HTTP_11,
            IpAddr::from([127, 0, 0, 1]),
            "a.test",
        );
        assert_eq!(
            h.get(X_FORWARDED_FOR),
            Some(&HeaderValue::from_static("10.0.0.1, 127.0.0.1"))
        );
        assert_eq!(
            h.get(header::HOST),
            Some(&HeaderValue::from_static("a.test"))
        );
        assert_eq!(
            h.get(header::VIA),
            Some(&HeaderValue::from_static("1.1 strata"))
        );
    }
}
