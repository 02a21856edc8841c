//! `Accept-Encoding` rewritten to one of a few classes before a GET or HEAD is looked up or sent to
//! the origin (`NORMALIZE_ACCEPT_ENCODING`), as Varnish does for gzip. Browsers spell their codings
//! in many ways (`gzip, deflate, br, zstd`, `br;q=1.0, gzip;q=0.8, *;q=0.1`, ...), and a response
//! that varies on `Accept-Encoding` would be stored once per spelling. The class is the set of
//! codings origins actually produce (br, gzip, zstd) that the client accepts; the origin is asked
//! with the class, so whatever it answers suits every client of that class.

use http::header::{HeaderMap, HeaderValue, ACCEPT_ENCODING};

/// Each subset of {br, gzip, zstd} as a field value, indexed by a bit mask: 1 br, 2 gzip, 4 zstd.
/// A client that accepts none of them gets `identity`, which every client accepts unless it says
/// otherwise (and those are left alone, see [`class_of`]).
static CLASSES: [HeaderValue; 8] = [
    HeaderValue::from_static("identity"),
    HeaderValue::from_static("br"),
    HeaderValue::from_static("gzip"),
    HeaderValue::from_static("br, gzip"),
    HeaderValue::from_static("zstd"),
    HeaderValue::from_static("br, zstd"),
    HeaderValue::from_static("gzip, zstd"),
    HeaderValue::from_static("br, gzip, zstd"),
];

const BR: usize = 0;
const GZIP: usize = 1;
const ZSTD: usize = 2;

/// Replaces the request's `Accept-Encoding` with its class, when it has one (see [`class_of`]).
pub fn normalize(headers: &mut HeaderMap) {
    if let Some(class) = class_of(headers) {
        // Already the class on one line: nothing to do. Otherwise `insert` replaces every line.
        if !headers.get_all(ACCEPT_ENCODING).iter().eq([class]) {
            headers.insert(ACCEPT_ENCODING, class.clone());
        }
    }
}

/// The class of a request's `Accept-Encoding` (RFC 9110 §12.5.3), or `None` to leave the field as it
/// is: when it is absent (any coding will do, and origins differ on what that gets), when the client
/// refuses `identity` (rare; the origin should see exactly what it can take), or when a weight is
/// malformed.
pub fn class_of(headers: &HeaderMap) -> Option<&'static HeaderValue> {
    let mut lines = headers.get_all(ACCEPT_ENCODING).iter().peekable();
    lines.peek()?;
    // Per known coding, and for `*` and `identity`: listed, and if so whether acceptable (q > 0).
    let mut known: [Option<bool>; 3] = [None; 3];
    let mut any = None;
    let mut identity = None;
    for member in lines.flat_map(|line| line.as_bytes().split(|&b| b == b',')) {
        let mut parts = member.split(|&b| b == b';');
        let coding = parts.next().unwrap_or_default().trim_ascii();
        if coding.is_empty() {
            continue;
        }
        let mut acceptable = true;
        for parameter in parts {
            let (name, value) = match parameter.iter().position(|&b| b == b'=') {
                Some(at) => (&parameter[..at], &parameter[at + 1..]),
                None => (parameter, &b""[..]),
            };
            if name.trim_ascii().eq_ignore_ascii_case(b"q") {
                acceptable = weight_is_positive(value.trim_ascii())?;
            }
        }
        let slot = if coding.eq_ignore_ascii_case(b"br") {
            &mut known[BR]
        } else if coding.eq_ignore_ascii_case(b"gzip") || coding.eq_ignore_ascii_case(b"x-gzip") {
            // RFC 9110 §8.4.1.3: `x-gzip` is `gzip`.
            &mut known[GZIP]
        } else if coding.eq_ignore_ascii_case(b"zstd") {
            &mut known[ZSTD]
        } else if coding == b"*" {
            &mut any
        } else if coding.eq_ignore_ascii_case(b"identity") {
            &mut identity
        } else {
            continue;
        };
        *slot = Some(acceptable);
    }
    if identity == Some(false) || (any == Some(false) && identity.is_none()) {
        return None;
    }
    let mask = known
        .iter()
        .enumerate()
        .filter(|(_, listed)| listed.unwrap_or(any == Some(true)))
        .fold(0, |mask, (bit, _)| mask | 1 << bit);
    CLASSES.get(mask)
}

/// Whether a weight (RFC 9110 §12.4.2: `0`, `0.5`, `1.000`, at most three decimals) is above zero;
/// `None` when it is not a weight.
fn weight_is_positive(weight: &[u8]) -> Option<bool> {
    let (unit, decimals) = match weight {
        [unit] => (*unit, &b""[..]),
        [unit, b'.', decimals @ ..] if decimals.len() <= 3 => (*unit, decimals),
        _ => return None,
    };
    if !decimals.iter().all(u8::is_ascii_digit) {
        return None;
    }
    match unit {
        b'0' => Some(decimals.iter().any(|&d| d != b'0')),
        b'1' if decimals.iter().all(|&d| d == b'0') => Some(true),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::policy::tests::headers;

    fn class(lines: &[&'static str]) -> Option<&'static str> {
        let fields: Vec<(&'static str, &'static str)> =
            lines.iter().map(|l| ("accept-encoding", *l)).collect();
        class_of(&headers(&fields)).and_then(|v| v.to_str().ok())
    }

    #[test]
    fn browsers_fall_into_a_few_classes() {
        // Chrome, Firefox, Safari, old Edge, curl --compressed, an HTTP library.
        assert_eq!(class(&["gzip, deflate, br, zstd"]), Some("br, gzip, zstd"));
        assert_eq!(
            class(&["zstd, br, gzip;q=0.9, deflate"]),
            Some("br, gzip, zstd")
        );
        assert_eq!(class(&["gzip, deflate, br"]), Some("br, gzip"));
        assert_eq!(
            class(&["br;q=1.0, gzip;q=0.8, *;q=0.1"]),
            Some("br, gzip, zstd")
        );
        assert_eq!(class(&["deflate, gzip"]), Some("gzip"));
        assert_eq!(class(&["gzip"]), Some("gzip"));
        assert_eq!(class(&["x-gzip"]), Some("gzip"));
        assert_eq!(class(&["GZIP ; Q=1", " BR"]), Some("br, gzip"));
    }

    #[test]
    fn weights_of_zero_exclude_a_coding() {
        assert_eq!(class(&["gzip;q=0, br"]), Some("br"));
        assert_eq!(class(&["gzip;q=0.000, br;q=0.001"]), Some("br"));
        assert_eq!(class(&["*, br;q=0"]), Some("gzip, zstd"));
        assert_eq!(class(&["gzip;q=0"]), Some("identity"));
    }

    #[test]
    fn nothing_known_is_identity() {
        assert_eq!(class(&[""]), Some("identity"));
        assert_eq!(class(&["identity"]), Some("identity"));
        assert_eq!(class(&["deflate, compress"]), Some("identity"));
        assert_eq!(class(&[",,"]), Some("identity"));
    }

    #[test]
    fn left_alone_when_absent_refusing_identity_or_malformed() {
        assert_eq!(class_of(&HeaderMap::new()), None);
        assert_eq!(class(&["gzip, identity;q=0"]), None);
        assert_eq!(class(&["gzip, *;q=0"]), None);
        assert_eq!(class(&["gzip;q=high"]), None);
        assert_eq!(class(&["gzip;q=1.5"]), None);
        assert_eq!(class(&["gzip;q=0.1234"]), None);
        // `*;q=0` with identity explicitly allowed still leaves identity.
        assert_eq!(class(&["gzip, identity, *;q=0"]), Some("gzip"));
    }

    #[test]
    fn normalize_rewrites_to_one_line_and_leaves_absent_alone() {
        let mut two_lines = headers(&[("accept-encoding", "gzip"), ("accept-encoding", "br")]);
        normalize(&mut two_lines);
        let values: Vec<_> = two_lines.get_all(ACCEPT_ENCODING).iter().collect();
        assert_eq!(values, ["br, gzip"]);

        // A first line that already spells the class does not keep the lines after it.
        let mut class_first =
            headers(&[("accept-encoding", "br, gzip"), ("accept-encoding", "gzip")]);
        normalize(&mut class_first);
        let values: Vec<_> = class_first.get_all(ACCEPT_ENCODING).iter().collect();
        assert_eq!(values, ["br, gzip"]);

        let mut none = headers(&[("accept", "*/*")]);
        normalize(&mut none);
        assert!(!none.contains_key(ACCEPT_ENCODING));
    }
}
