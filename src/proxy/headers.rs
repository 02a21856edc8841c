//! Header rules of an intermediary: hop-by-hop fields removed both ways (RFC 9110 §7.6.1), `Via`,
//! `X-Forwarded-For/-Proto/-Host` added toward the origin, the client's `Host` kept.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Version;

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
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

fn via_for(version: Version) -> HeaderValue {
    HeaderValue::from_static(match version {
        Version::HTTP_09 => "0.9 strata",
        Version::HTTP_10 => "1.0 strata",
        Version::HTTP_2 => "2 strata",
        Version::HTTP_3 => "3 strata",
        _ => "1.1 strata",
    })
}

/// Turns a client's request headers into the headers sent to the origin.
pub fn to_origin(headers: &mut HeaderMap, version: Version, client_ip: IpAddr, host: &str) {
    strip_hop_by_hop(headers);
    headers.append(header::VIA, via_for(version));
    let client = client_ip.to_string();
    let forwarded_for = match headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .fold(String::new(), |mut list, v| {
            if !list.is_empty() {
                list.push_str(", ");
            }
            list.push_str(v);
            list
        }) {
        list if list.is_empty() => client,
        list => format!("{list}, {client}"),
    };
    if let Ok(value) = HeaderValue::from_str(&forwarded_for) {
        headers.insert(X_FORWARDED_FOR, value);
    }
    // A trusted load balancer in front of Strata knows the client's real scheme and host: keep its values.
    if !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    }
    if let Ok(host_value) = HeaderValue::from_str(host) {
        if !headers.contains_key(&X_FORWARDED_HOST) {
            headers.insert(X_FORWARDED_HOST, host_value.clone());
        }
        // HTTP/2 clients send `:authority` instead of Host; the origin always gets the client's host.
        if !headers.contains_key(header::HOST) {
            headers.insert(header::HOST, host_value);
        }
    }
}

/// Cleans an origin's response headers for the client.
pub fn to_client(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    headers.append(header::VIA, VIA_RESPONSE);
}

/// The request asks to switch protocols (WebSocket and friends): `Connection: upgrade` + `Upgrade`.
pub fn upgrade_requested(headers: &HeaderMap) -> Option<HeaderValue> {
    let upgrade = headers.get(header::UPGRADE)?;
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
