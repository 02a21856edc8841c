//! RFC 9111 rules for a shared cache: what may be stored, for how long, when it may be served stale,
//! and how a request's own directives and conditionals are honoured.
//!
//! http-cache-semantics decides storability and the freshness lifetime (s-maxage > max-age > Expires >
//! heuristic). It does not know stale-while-revalidate / stale-if-error, collapses repeated headers and
//! formats dates wrongly for HTTP, so those parts are ours.

use std::time::{Duration, SystemTime};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{request, Response, StatusCode};
use http_cache_semantics::{CacheOptions, CachePolicy};

use super::entry::Admission;
use super::key::selecting_value;
use crate::config::Config;

/// Iterates the directives of every `Cache-Control` (or `Pragma`) value: `(name lowercased, value)`.
pub fn directives<'a>(
    values: impl IntoIterator<Item = &'a HeaderValue> + 'a,
) -> impl Iterator<Item = (String, Option<&'a str>)> + 'a {
    values
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|part| {
            let part = part.trim();
            if part.is_empty() {
                return None;
            }
            let mut kv = part.splitn(2, '=');
            let name = kv.next()?.trim().to_ascii_lowercase();
            let value = kv.next().map(|v| v.trim().trim_matches('"'));
            Some((name, value))
        })
}

/// Delta-seconds larger than this are taken as this (RFC 9111 §1.2.2: 2^31), which also keeps all
/// time arithmetic far from overflow.
pub const MAX_DELTA_SECONDS: u64 = 1 << 31;

fn seconds(value: Option<&str>) -> Option<u64> {
    let digits = value?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // A valid but huge number (even past u64) is "very long", not invalid.
    Some(
        digits
            .parse::<u64>()
            .map_or(MAX_DELTA_SECONDS, |n| n.min(MAX_DELTA_SECONDS)),
    )
}

/// `now + delta`, with `delta` capped at [`MAX_DELTA_SECONDS`]; never panics.
pub fn later(now: SystemTime, delta: Duration) -> SystemTime {
    let delta = delta.min(Duration::from_secs(MAX_DELTA_SECONDS));
    now.checked_add(delta).unwrap_or(now)
}

/// `Pragma: no-cache` counts as `Cache-Control: no-cache` only when there is no `Cache-Control`
/// (RFC 9111 §5.4).
fn pragma_no_cache(headers: &HeaderMap) -> bool {
    !headers.contains_key(header::CACHE_CONTROL)
        && directives(headers.get_all(header::PRAGMA)).any(|(name, _)| name == "no-cache")
}

/// The response directives the proxy needs beyond what http-cache-semantics computes.
#[derive(Debug, Default, Clone)]
pub struct ResponseDirectives {
    pub public: bool,
    pub no_cache: bool,
    pub must_revalidate: bool,
    pub proxy_revalidate: bool,
    pub s_maxage: bool,
    pub max_age: bool,
    pub stale_while_revalidate: Option<u64>,
    pub stale_if_error: Option<u64>,
    /// A freshness directive appears twice with different values: RFC 9111 §4.2.1 says treat the
    /// response as stale, so it must never be served stale either.
    pub conflicting: bool,
}

impl ResponseDirectives {
    pub fn parse(headers: &HeaderMap) -> Self {
        let mut d = ResponseDirectives::default();
        let mut seen: Vec<(String, Option<&str>)> = Vec::new();
        for (name, value) in directives(headers.get_all(header::CACHE_CONTROL)) {
            if matches!(name.as_str(), "max-age" | "s-maxage") {
                if seen.iter().any(|(n, v)| *n == name && *v != value) {
                    d.conflicting = true;
                }
                seen.push((name.clone(), value));
            }
            match name.as_str() {
                "public" => d.public = true,
                // A qualified no-cache="field" is treated as unqualified: always correct, RFC 9111 §5.2.2.4.
                "no-cache" => d.no_cache = true,
                "must-revalidate" => d.must_revalidate = true,
                "proxy-revalidate" => d.proxy_revalidate = true,
                "s-maxage" => d.s_maxage = true,
                "max-age" => d.max_age = true,
                "stale-while-revalidate" => d.stale_while_revalidate = seconds(value),
                "stale-if-error" => d.stale_if_error = seconds(value),
                _ => {}
            }
        }
        d.no_cache |= pragma_no_cache(headers);
        d
    }

    /// must-revalidate, proxy-revalidate and no-cache forbid serving the response stale.
    pub fn forbids_stale(&self) -> bool {
        self.must_revalidate || self.proxy_revalidate || self.no_cache || self.conflicting
    }
}

/// When a stored response stops being fresh, and how long after that it may still be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetime {
    pub fresh_until: SystemTime,
    pub stale_while_revalidate_until: SystemTime,
    pub stale_if_error_until: SystemTime,
    /// The `Age` the response already had when received.
    pub initial_age: Duration,
}

/// Why a response is not stored (for logs and `Cache-Status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotStorable {
    Policy,
    SetCookie,
    VaryStar,
    NeverReusable,
}

pub fn cache_options() -> CacheOptions {
    CacheOptions {
        shared: true,
        ..CacheOptions::default()
    }
}

/// Decides whether a response may be stored and computes its instants.
///
/// `policy` was built from the request and response; `now` is the response time.
pub fn assess(
    policy: &CachePolicy,
    response_headers: &HeaderMap,
    now: SystemTime,
    config: &Config,
) -> Result<Lifetime, NotStorable> {
    if !policy.is_storable() {
        return Err(NotStorable::Policy);
    }
    let d = ResponseDirectives::parse(response_headers);
    // A shared cache that replays one user's Set-Cookie to another leaks sessions: store such
    // responses only when the origin says `public` (as Varnish and http-cache-semantics do).
    if response_headers.contains_key(header::SET_COOKIE) && !d.public {
        return Err(NotStorable::SetCookie);
    }
    vary_names(response_headers)?;
    let explicit = d.s_maxage || d.max_age || response_headers.contains_key(header::EXPIRES);
    let mut ttl = policy.time_to_live(now);
    let initial_age = policy.age(now).min(Duration::from_secs(MAX_DELTA_SECONDS));
    if ttl.is_zero() && !explicit && !d.no_cache {
        if let Some(fallback) = config.fallback_max_age {
            ttl = fallback.saturating_sub(initial_age);
        }
    }
    let has_validators = response_headers.contains_key(header::ETAG)
        || response_headers.contains_key(header::LAST_MODIFIED);
    if ttl.is_zero() && !has_validators {
        return Err(NotStorable::NeverReusable);
    }
    let (swr, sie) = if d.forbids_stale() {
        (Duration::ZERO, Duration::ZERO)
    } else {
        let swr = Duration::from_secs(d.stale_while_revalidate.unwrap_or(0));
        let sie = Duration::from_secs(d.stale_if_error.unwrap_or(0));
        // s-maxage carries proxy-revalidate semantics (RFC 9111 §5.2.2.10): only the origin's own
        // stale-* directives may loosen it, never the proxy-wide windows.
        if d.s_maxage {
            (swr, sie)
        } else {
            (swr.max(config.grace), sie.max(config.stale_if_error))
        }
    };
    let fresh_until = later(now, ttl);
    Ok(Lifetime {
        fresh_until,
        stale_while_revalidate_until: later(fresh_until, swr),
        stale_if_error_until: later(fresh_until, sie),
        initial_age,
    })
}

/// Decides whether a response to `request` (a GET as the cache sees it: path, client headers and
/// `Host`) may be stored; if so, everything an [`super::Entry`] needs besides its body.
pub fn admit(
    request: &request::Parts,
    status: StatusCode,
    headers: &HeaderMap,
    now: SystemTime,
    config: &Config,
) -> Result<Admission, NotStorable> {
    let (mut response, ()) = Response::new(()).into_parts();
    response.status = status;
    response.headers = headers.clone();
    normalize_for_policy(&mut response.headers);
    let policy = CachePolicy::new_options(request, &response, now, cache_options());
    let lifetime = assess(&policy, headers, now, config)?;
    let directives = ResponseDirectives::parse(headers);
    let never_stale = directives.forbids_stale();
    let variant = vary_names(headers)?
        .into_iter()
        .map(|name| {
            // Normalizing a valid field value (whitespace, case, commas) keeps it valid.
            let value = selecting_value(&name, &request.headers)
                .and_then(|value| HeaderValue::from_bytes(&value).ok());
            (name, value.into_iter().collect())
        })
        .collect();
    Ok(Admission {
        lifetime,
        never_stale,
        honours_max_stale: !never_stale && !directives.s_maxage,
        variant,
        tags: surrogate_keys(headers),
    })
}

pub const SURROGATE_KEY: HeaderName = HeaderName::from_static("surrogate-key");
pub const CACHE_TAG: HeaderName = HeaderName::from_static("cache-tag");

/// The response's surrogate keys: `Surrogate-Key` (space-separated, Fastly) and `Cache-Tag`
/// (comma-separated, Cloudflare), deduplicated.
pub fn surrogate_keys(headers: &HeaderMap) -> Vec<String> {
    let mut tags: Vec<String> = Vec::new();
    let space = headers
        .get_all(SURROGATE_KEY)
        .iter()
        .flat_map(|v| v.to_str().ok().into_iter().flat_map(str::split_whitespace));
    let comma = headers
        .get_all(CACHE_TAG)
        .iter()
        .flat_map(|v| v.to_str().ok().into_iter().flat_map(|v| v.split(',')));
    for tag in space.chain(comma).map(str::trim).filter(|t| !t.is_empty()) {
        if !tags.iter().any(|known| known == tag) {
            tags.push(tag.to_owned());
        }
    }
    tags
}

/// Rewrites `Cache-Control` where http-cache-semantics departs from RFC 9111 (only when needed):
/// - directive names are lowercased: the crate compares them as sent, so `Private` or `No-Store`
///   would be stored and shared (§5.2: names are compared case-insensitively);
/// - a directive given again is dropped (the first counts, §4.2.1): the crate answers a repeat with
///   another value by adding `must-revalidate`, which makes a response to a request with
///   `Authorization` storable (§3.5). `ResponseDirectives::conflicting` keeps such a response from
///   being served stale;
/// - `proxy-revalidate` is dropped: the crate makes such a response never fresh for a shared cache,
///   while §5.2.2.8 only forbids serving it stale (`never_stale` takes care of that);
/// - an over-large `max-age`/`s-maxage` becomes 2^31: the crate reads it as 0, §1.2.2 says 2^31.
fn normalize_for_policy(headers: &mut HeaderMap) {
    let oversized = |name: &str, value: Option<&str>| {
        matches!(name, "max-age" | "s-maxage")
            && value.is_some_and(|v| {
                !v.is_empty()
                    && v.bytes().all(|b| b.is_ascii_digit())
                    && v.parse::<u64>().map_or(true, |n| n > MAX_DELTA_SECONDS)
            })
    };
    let mut named: Vec<String> = Vec::new();
    let mut parts: Vec<String> = Vec::new();
    for (name, value) in directives(headers.get_all(header::CACHE_CONTROL)) {
        if name == "proxy-revalidate" || named.contains(&name) {
            continue;
        }
        parts.push(match value {
            _ if oversized(&name, value) => format!("{name}={MAX_DELTA_SECONDS}"),
            Some(value) => format!("{name}={value}"),
            None => name.clone(),
        });
        named.push(name);
    }
    let canonical = parts.join(", ");
    let as_sent: Vec<&str> = headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    if canonical == as_sent.join(", ") {
        return;
    }
    headers.remove(header::CACHE_CONTROL);
    if let Ok(value) = HeaderValue::from_str(&canonical) {
        headers.insert(header::CACHE_CONTROL, value);
    }
}

/// The header names a response varies on, lowercased; `Err` for `Vary: *` (or an unreadable
/// `Vary`), which never matches a later request.
pub fn vary_names(headers: &HeaderMap) -> Result<Vec<HeaderName>, NotStorable> {
    let mut names = Vec::new();
    for value in headers.get_all(header::VARY) {
        let Ok(value) = value.to_str() else {
            return Err(NotStorable::VaryStar);
        };
        for name in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if name == "*" {
                return Err(NotStorable::VaryStar);
            }
            let name = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
                .map_err(|_| NotStorable::VaryStar)?;
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    Ok(names)
}

/// A request's own cache directives (`Cache-Control`, or `Pragma: no-cache` without it).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RequestDirectives {
    pub no_cache: bool,
    pub no_store: bool,
    pub only_if_cached: bool,
    pub max_age: Option<u64>,
    pub min_fresh: Option<u64>,
    /// `Some(None)`: any staleness accepted; `Some(Some(n))`: up to n seconds.
    pub max_stale: Option<Option<u64>>,
}

impl RequestDirectives {
    pub fn parse(headers: &HeaderMap) -> Self {
        let mut d = RequestDirectives::default();
        for (name, value) in directives(headers.get_all(header::CACHE_CONTROL)) {
            match name.as_str() {
                "no-cache" => d.no_cache = true,
                "no-store" => d.no_store = true,
                "only-if-cached" => d.only_if_cached = true,
                "max-age" => d.max_age = seconds(value).or(Some(0)),
                "min-fresh" => d.min_fresh = seconds(value),
                "max-stale" => d.max_stale = Some(seconds(value)),
                _ => {}
            }
        }
        d.no_cache |= pragma_no_cache(headers);
        d
    }
}

/// The response itself says it must not be kept by a shared cache (`no-store`, `private`).
pub fn forbids_storing(headers: &HeaderMap) -> bool {
    directives(headers.get_all(header::CACHE_CONTROL))
        .any(|(name, _)| name == "no-store" || name == "private")
}

/// Request fields of a client's own conditional or partial request: they shape the answer to that
/// client, never what a fill asks the origin for.
pub const CONDITIONAL_REQUEST_FIELDS: [header::HeaderName; 6] = [
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_MATCH,
    header::IF_UNMODIFIED_SINCE,
    header::IF_RANGE,
    header::RANGE,
];

/// True when a request carries anything that needs more than the plain fresh-hit check.
///
/// One pass over the request's field names (for well-known names a comparison of two small
/// integers) instead of eight hashed lookups: this runs on every hit.
#[inline]
pub fn needs_full_evaluation(headers: &HeaderMap) -> bool {
    headers.keys().any(|name| {
        name == header::CACHE_CONTROL
            || name == header::PRAGMA
            || CONDITIONAL_REQUEST_FIELDS.contains(name)
    })
}

/// Weak comparison of entity tags (RFC 9110 §8.8.3.2): `W/"a"` matches `"a"`.
fn etag_weak_eq(a: &str, b: &str) -> bool {
    a.trim().trim_start_matches("W/") == b.trim().trim_start_matches("W/")
}

/// Strong comparison of entity tags (RFC 9110 §8.8.3.2): a weak tag never matches.
fn etag_strong_eq(candidate: &str, etag: Option<&HeaderValue>) -> bool {
    !candidate.starts_with("W/") && etag.is_some_and(|etag| etag.as_bytes() == candidate.as_bytes())
}

/// The one line of a request field defined as a single value (`Range`, `If-Range`, the dates of
/// conditional requests, `Max-Forwards`); `None` when it is absent or sent on several lines, which
/// makes it invalid (RFC 9110 §5.3): the field is then ignored.
pub(crate) fn single_line(request: &HeaderMap, name: header::HeaderName) -> Option<&HeaderValue> {
    let mut lines = request.get_all(name).iter();
    match (lines.next(), lines.next()) {
        (Some(line), None) => Some(line),
        _ => None,
    }
}

/// The date of a request field that holds one (`If-Modified-Since`, `If-Unmodified-Since`);
/// `None` when it is absent, sent on several lines or not a valid date, which all mean the field is
/// ignored (RFC 9110 §13.1.3, §13.1.4).
fn single_date(request: &HeaderMap, name: header::HeaderName) -> Option<SystemTime> {
    single_line(request, name)?
        .to_str()
        .ok()
        .and_then(|date| httpdate::parse_http_date(date).ok())
}

/// The members of an entity-tag list (`If-Match`, `If-None-Match`): `*`, `"x"` or `W/"x"`, each as
/// written. Split at the commas between members, not inside quotes: `"a,b"` is one tag (a comma is
/// a valid `etagc`, RFC 9110 §8.8.3). A member that is not quoted runs to the next comma.
fn entity_tags(list: &str) -> impl Iterator<Item = &str> {
    let mut rest = list;
    std::iter::from_fn(move || {
        rest = rest.trim_start_matches(|c: char| c == ',' || c.is_ascii_whitespace());
        if rest.is_empty() {
            return None;
        }
        let opening = if rest.starts_with("W/\"") {
            3
        } else if rest.starts_with('"') {
            1
        } else {
            0
        };
        let end = match opening {
            0 => rest.find(',').unwrap_or(rest.len()),
            _ => rest[opening..]
                .find('"')
                .map_or(rest.len(), |close| opening + close + 1),
        };
        let (member, after) = rest.split_at(end);
        rest = after;
        Some(member.trim_end())
    })
}

/// Does `If-None-Match` list the stored response's entity tag, or `*` (any stored representation)?
pub fn if_none_match_matches(if_none_match: &HeaderMap, etag: Option<&HeaderValue>) -> bool {
    let etag = etag.and_then(|e| e.to_str().ok());
    if_none_match
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(entity_tags)
        .any(|candidate| candidate == "*" || etag.is_some_and(|etag| etag_weak_eq(candidate, etag)))
}

/// Whether a client's `If-Match` / `If-Unmodified-Since` hold for a stored response (RFC 9110
/// §13.2.2 steps 1 and 2), so that a client that must not get another version than the one it
/// names (resuming a download, `Range` with `If-Match`) gets `412` instead of another version's
/// bytes. `If-Match` holds when `*` or a strongly equal tag is among its members;
/// `If-Unmodified-Since` (looked at only without `If-Match`) when the response has not changed
/// since, and it is ignored when the response has no `Last-Modified` or the field is not one
/// valid date (§13.1.4).
pub fn preconditions_hold(
    request: &HeaderMap,
    etag: Option<&HeaderValue>,
    last_modified: Option<SystemTime>,
) -> bool {
    if request.contains_key(header::IF_MATCH) {
        return request
            .get_all(header::IF_MATCH)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(entity_tags)
            .any(|candidate| candidate == "*" || etag_strong_eq(candidate, etag));
    }
    match (
        single_date(request, header::IF_UNMODIFIED_SINCE),
        last_modified,
    ) {
        (Some(since), Some(modified)) => modified <= since,
        _ => true,
    }
}

/// Evaluates a client's `If-None-Match` / `If-Modified-Since` against a stored response:
/// `true` means answer 304 Not Modified (RFC 9110 §13.2.2 order: If-None-Match wins).
/// `modified` is when the stored response last changed: its `Last-Modified`, else its `Date`, else
/// when it was received (RFC 9111 §4.3.2); asked only for an `If-Modified-Since`.
pub fn not_modified(
    request: &HeaderMap,
    etag: Option<&HeaderValue>,
    modified: impl FnOnce() -> SystemTime,
) -> bool {
    if request.contains_key(header::IF_NONE_MATCH) {
        return if_none_match_matches(request, etag);
    }
    single_date(request, header::IF_MODIFIED_SINCE).is_some_and(|since| modified() <= since)
}

/// What a GET with `Range` gets from a stored `200` (RFC 9110 §14).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeAnswer {
    /// The whole representation, `200`: no `Range`, a unit other than bytes, several ranges (which
    /// a server may answer in full), a malformed range, or an `If-Range` that does not match.
    Full,
    /// `206` with the bytes `first..=last`.
    Part { first: u64, last: u64 },
    /// `416`: the range starts at or past the end of the representation.
    Unsatisfiable,
}

/// A stored representation's validators, as `If-Range` compares them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Validators<'a> {
    pub etag: Option<&'a HeaderValue>,
    pub last_modified: Option<SystemTime>,
    /// The stored response's `Date`: a `Last-Modified` at least a second older is a strong
    /// validator (RFC 9110 §8.8.2.2).
    pub date: Option<SystemTime>,
}

/// Evaluates `Range` (and `If-Range`, RFC 9110 §13.1.5) against a stored representation of `len`
/// bytes. Either sent on several lines is invalid: the whole representation, as for a `Range` that
/// cannot be read, or an `If-Range` that does not hold.
pub fn byte_range(request: &HeaderMap, validators: Validators<'_>, len: u64) -> RangeAnswer {
    let Some(range) = single_line(request, header::RANGE).and_then(|v| v.to_str().ok()) else {
        return RangeAnswer::Full;
    };
    if request.contains_key(header::IF_RANGE) {
        match single_line(request, header::IF_RANGE) {
            Some(if_range) if if_range_holds(if_range, validators) => {}
            _ => return RangeAnswer::Full,
        }
    }
    let Some((unit, specs)) = range.trim().split_once('=') else {
        return RangeAnswer::Full;
    };
    let mut specs = specs
        .split(',')
        .map(str::trim)
        .filter(|spec| !spec.is_empty());
    let (Some(spec), None) = (specs.next(), specs.next()) else {
        return RangeAnswer::Full;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return RangeAnswer::Full;
    }
    let Some((first, last)) = spec.split_once('-') else {
        return RangeAnswer::Full;
    };
    let position = |digits: &str| {
        let digits = digits.trim();
        (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
            .then(|| digits.parse::<u64>().ok())
            .flatten()
    };
    let (first, last) = match (first.trim().is_empty(), position(first), position(last)) {
        // `-N`: the last N bytes (all of them when the representation is shorter).
        (true, _, Some(suffix)) => {
            if suffix == 0 {
                return RangeAnswer::Unsatisfiable;
            }
            // The one satisfiable range of an empty representation (§14.1.1): all of it, nothing.
            if len == 0 {
                return RangeAnswer::Full;
            }
            (len.saturating_sub(suffix), len - 1)
        }
        // `A-`: from A to the end.
        (false, Some(first), None) if last.trim().is_empty() => (first, u64::MAX),
        // `A-B`, B at or after A; a B past the end means the end.
        (false, Some(first), Some(last)) if last >= first => (first, last),
        _ => return RangeAnswer::Full,
    };
    if first >= len {
        return RangeAnswer::Unsatisfiable;
    }
    RangeAnswer::Part {
        first,
        last: last.min(len - 1),
    }
}

/// `If-Range` holds when its entity tag is strongly equal to the stored one, or its date is the
/// stored `Last-Modified` exactly and that is a strong validator; a weak tag never holds (RFC 9110
/// §13.1.5): otherwise a resource changed twice within a second could be stitched from two versions.
fn if_range_holds(if_range: &HeaderValue, validators: Validators<'_>) -> bool {
    let Ok(condition) = if_range.to_str() else {
        return false;
    };
    let condition = condition.trim();
    if condition.starts_with('"') || condition.starts_with("W/") {
        return etag_strong_eq(condition, validators.etag);
    }
    match (
        httpdate::parse_http_date(condition),
        validators.last_modified,
        validators.date,
    ) {
        (Ok(condition), Some(modified), Some(date)) => {
            condition == modified && date >= modified + Duration::from_secs(1)
        }
        _ => false,
    }
}

/// Whether a 304 that answered our revalidation really describes the stored response: a validator
/// it carries must agree with ours (RFC 9111 §4.3.4).
pub fn revalidation_matches(stored: &HeaderMap, not_modified: &HeaderMap) -> bool {
    match (stored.get(header::ETAG), not_modified.get(header::ETAG)) {
        (Some(old), Some(new)) => match (old.to_str(), new.to_str()) {
            (Ok(old), Ok(new)) => etag_weak_eq(old, new),
            _ => false,
        },
        (None, Some(_)) => false,
        _ => match (
            stored.get(header::LAST_MODIFIED),
            not_modified.get(header::LAST_MODIFIED),
        ) {
            (Some(old), Some(new)) => old == new,
            _ => true,
        },
    }
}

/// Stored headers updated with those of a 304 (RFC 9111 §3.2): each field the 304 carries replaces
/// all stored instances of that field, repeated values intact; framing fields are kept from the store.
pub fn merge_not_modified(stored: &HeaderMap, not_modified: &HeaderMap) -> HeaderMap {
    const KEEP: [HeaderName; 4] = [
        header::CONTENT_LENGTH,
        header::CONTENT_ENCODING,
        header::TRANSFER_ENCODING,
        header::CONTENT_RANGE,
    ];
    let mut merged = stored.clone();
    for name in not_modified.keys() {
        if KEEP.contains(name) {
            continue;
        }
        merged.remove(name);
        for value in not_modified.get_all(name) {
            merged.append(name.clone(), value.clone());
        }
    }
    merged
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn only_cache_related_request_fields_leave_the_fast_path() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("a.test"));
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        assert!(!needs_full_evaluation(&h));
        let fields = [header::CACHE_CONTROL, header::PRAGMA];
        for name in fields.iter().chain(&CONDITIONAL_REQUEST_FIELDS) {
            let mut with = h.clone();
            with.insert(name.clone(), HeaderValue::from_static("x"));
            assert!(needs_full_evaluation(&with), "{name}");
        }
    }

    /// A header map of `pairs`, repeated names appended (shared by the cache modules' tests).
    pub(crate) fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(*k, HeaderValue::from_static(v));
        }
        map
    }

    #[test]
    fn byte_ranges_of_a_stored_representation() {
        use RangeAnswer::{Full, Part, Unsatisfiable};
        let range = |value: &'static str, len: u64| {
            byte_range(&headers(&[("range", value)]), Validators::default(), len)
        };
        assert_eq!(
            byte_range(&HeaderMap::new(), Validators::default(), 10),
            Full
        );
        assert_eq!(range("bytes=0-3", 10), Part { first: 0, last: 3 });
        assert_eq!(range("Bytes = 2-", 10), Part { first: 2, last: 9 });
        assert_eq!(range("bytes=5-99", 10), Part { first: 5, last: 9 });
        assert_eq!(range("bytes=-3", 10), Part { first: 7, last: 9 });
        assert_eq!(range("bytes=-30", 10), Part { first: 0, last: 9 });
        assert_eq!(range("bytes=9-9", 10), Part { first: 9, last: 9 });
        // Starts at or past the end, an empty suffix, anything of an empty body: 416.
        for unsatisfiable in ["bytes=10-", "bytes=10-20", "bytes=-0"] {
            assert_eq!(range(unsatisfiable, 10), Unsatisfiable, "{unsatisfiable}");
        }
        assert_eq!(range("bytes=0-", 0), Unsatisfiable);
        // An empty representation satisfies a suffix range only as a whole.
        assert_eq!(range("bytes=-5", 0), Full);
        // Ignored (the full 200): malformed, other units, several ranges.
        for ignored in [
            "bytes=3-1",
            "bytes=a-b",
            "bytes=+1-2",
            "bytes=1",
            "bytes=-",
            "bytes 0-1",
            "items=0-1",
            "bytes=0-1, 4-5",
            "bytes=",
        ] {
            assert_eq!(range(ignored, 10), Full, "{ignored}");
        }
        // Range is one value: on two lines it is invalid, not the first line's range.
        let two_lines = headers(&[("range", "bytes=0-3"), ("range", "bytes=5-6")]);
        assert_eq!(byte_range(&two_lines, Validators::default(), 10), Full);
    }

    #[test]
    fn if_range_needs_a_strong_etag_or_the_exact_last_modified() {
        let etag = HeaderValue::from_static("\"v1\"");
        let weak = HeaderValue::from_static("W/\"v1\"");
        let modified = httpdate::parse_http_date("Tue, 24 Nov 2026 10:00:00 GMT").ok();
        let later = httpdate::parse_http_date("Tue, 24 Nov 2026 10:05:00 GMT").ok();
        let with = |if_range: &'static str, validators: Validators<'_>| {
            byte_range(
                &headers(&[("range", "bytes=0-0"), ("if-range", if_range)]),
                validators,
                10,
            )
        };
        let tagged = |etag| Validators {
            etag,
            ..Validators::default()
        };
        let part = RangeAnswer::Part { first: 0, last: 0 };
        assert_eq!(with("\"v1\"", tagged(Some(&etag))), part);
        assert_eq!(with("\"v2\"", tagged(Some(&etag))), RangeAnswer::Full);
        assert_eq!(with("W/\"v1\"", tagged(Some(&etag))), RangeAnswer::Full);
        assert_eq!(with("\"v1\"", tagged(Some(&weak))), RangeAnswer::Full);
        assert_eq!(with("\"v1\"", tagged(None)), RangeAnswer::Full);
        let dated = |date| Validators {
            etag: None,
            last_modified: modified,
            date,
        };
        let last_modified = "Tue, 24 Nov 2026 10:00:00 GMT";
        assert_eq!(with(last_modified, dated(later)), part);
        // Modified in the second the response was sent (or Date unknown): a weak validator.
        assert_eq!(with(last_modified, dated(modified)), RangeAnswer::Full);
        assert_eq!(with(last_modified, dated(None)), RangeAnswer::Full);
        assert_eq!(
            with("Tue, 24 Nov 2026 10:00:01 GMT", dated(later)),
            RangeAnswer::Full
        );
        assert_eq!(with("yesterday", dated(later)), RangeAnswer::Full);
        // On two lines, If-Range is invalid and so does not hold, even when both lines would.
        let twice = headers(&[
            ("range", "bytes=0-0"),
            ("if-range", "\"v1\""),
            ("if-range", "\"v1\""),
        ]);
        assert_eq!(
            byte_range(&twice, tagged(Some(&etag)), 10),
            RangeAnswer::Full
        );
    }

    #[test]
    fn request_directives_parse() {
        let d = RequestDirectives::parse(&headers(&[(
            "cache-control",
            "max-age=5, max-stale, only-if-cached",
        )]));
        assert_eq!(d.max_age, Some(5));
        assert_eq!(d.max_stale, Some(None));
        assert!(d.only_if_cached);
        let d = RequestDirectives::parse(&headers(&[("pragma", "no-cache")]));
        assert!(d.no_cache);
    }

    #[test]
    fn stale_directives_parse() {
        let d = ResponseDirectives::parse(&headers(&[(
            "cache-control",
            "max-age=1, stale-while-revalidate=30, stale-if-error=\"60\"",
        )]));
        assert_eq!(d.stale_while_revalidate, Some(30));
        assert_eq!(d.stale_if_error, Some(60));
        assert!(!d.forbids_stale());
    }

    #[test]
    fn huge_delta_seconds_are_capped_not_fatal() {
        assert_eq!(
            seconds(Some("99999999999999999999999")),
            Some(MAX_DELTA_SECONDS)
        );
        assert_eq!(seconds(Some("-1")), None);
        let now = SystemTime::now();
        assert!(later(now, Duration::MAX) > now);
    }

    #[test]
    fn policy_sees_capped_max_age_and_no_proxy_revalidate() {
        let mut h = headers(&[(
            "cache-control",
            "public, max-age=99999999999999999999999, proxy-revalidate",
        )]);
        normalize_for_policy(&mut h);
        assert_eq!(
            h.get(header::CACHE_CONTROL),
            Some(&HeaderValue::from_static("public, max-age=2147483648"))
        );
        let mut untouched =
            headers(&[("cache-control", "max-age=60"), ("cache-control", "public")]);
        normalize_for_policy(&mut untouched);
        assert_eq!(untouched.get_all(header::CACHE_CONTROL).iter().count(), 2);
    }

    #[test]
    fn policy_sees_lowercase_names_and_each_directive_once() {
        let mut h = headers(&[
            ("cache-control", "Private, MAX-AGE=600"),
            ("cache-control", "max-age=300, No-Store"),
        ]);
        normalize_for_policy(&mut h);
        assert_eq!(
            h.get(header::CACHE_CONTROL),
            Some(&HeaderValue::from_static("private, max-age=600, no-store"))
        );
    }

    fn test_config() -> Config {
        match Config::from_vars([("ORIGIN_URL", "http://origin.test")]) {
            Ok(config) => config,
            Err(error) => panic!("{error}"),
        }
    }

    /// A GET for `/` of `a.test` with these fields, as the cache sees it.
    fn get_request(pairs: &[(&'static str, &'static str)]) -> request::Parts {
        let (mut parts, ()) = http::Request::new(()).into_parts();
        parts.uri = http::Uri::from_static("/");
        parts.headers = headers(pairs);
        parts
            .headers
            .insert(header::HOST, HeaderValue::from_static("a.test"));
        parts
    }

    #[test]
    fn directive_names_in_any_case_forbid_storing() {
        for cache_control in ["Private, max-age=600", "NO-STORE, max-age=600"] {
            let response = headers(&[("cache-control", cache_control)]);
            let stored = admit(
                &get_request(&[]),
                StatusCode::OK,
                &response,
                SystemTime::now(),
                &test_config(),
            );
            assert!(stored.is_err(), "{cache_control} was stored");
        }
    }

    #[test]
    fn a_repeated_max_age_does_not_let_an_authorized_answer_be_stored() {
        let response = headers(&[
            ("cache-control", "max-age=600"),
            ("cache-control", "max-age=300"),
        ]);
        let stored = admit(
            &get_request(&[("authorization", "Bearer a")]),
            StatusCode::OK,
            &response,
            SystemTime::now(),
            &test_config(),
        );
        assert!(stored.is_err());
    }

    #[test]
    fn surrogate_keys_from_both_headers() {
        let h = headers(&[
            ("surrogate-key", "a  b"),
            ("cache-tag", "c, d,b"),
            ("surrogate-key", "e"),
        ]);
        assert_eq!(surrogate_keys(&h), ["a", "b", "e", "c", "d"]);
    }

    #[test]
    fn duplicate_freshness_forbids_stale() {
        let d = ResponseDirectives::parse(&headers(&[("cache-control", "max-age=10, max-age=20")]));
        assert!(d.forbids_stale());
    }

    #[test]
    fn vary_star_never_matches() {
        assert!(vary_names(&headers(&[("vary", "Accept-Encoding, *")])).is_err());
        let names = vary_names(&headers(&[
            ("vary", "User-Agent"),
            ("vary", "accept-encoding"),
        ]));
        assert_eq!(
            names.ok(),
            Some(vec![header::ACCEPT_ENCODING, header::USER_AGENT])
        );
    }

    #[test]
    fn conditionals_use_weak_comparison() {
        let etag = HeaderValue::from_static("\"v1\"");
        let never = || SystemTime::UNIX_EPOCH;
        assert!(not_modified(
            &headers(&[("if-none-match", "W/\"v1\"")]),
            Some(&etag),
            never
        ));
        assert!(not_modified(
            &headers(&[("if-none-match", "\"x\", *")]),
            Some(&etag),
            never
        ));
        assert!(!not_modified(
            &headers(&[("if-none-match", "\"v2\"")]),
            Some(&etag),
            never
        ));
    }

    #[test]
    fn entity_tag_lists_split_between_tags_not_inside_them() {
        let tags: Vec<&str> = entity_tags(r#""a,b", W/"c" ,, *,"d"#).collect();
        assert_eq!(tags, [r#""a,b""#, r#"W/"c""#, "*", r#""d"#]);
        let etag = HeaderValue::from_static(r#""a,b""#);
        let request = headers(&[("if-match", r#""x", "a,b""#)]);
        assert!(preconditions_hold(&request, Some(&etag), None));
        let request = headers(&[("if-none-match", r#"W/"a,b""#)]);
        assert!(if_none_match_matches(&request, Some(&etag)));
    }

    #[test]
    fn if_match_compares_strongly_and_if_unmodified_since_needs_a_last_modified() {
        let etag = HeaderValue::from_static("\"v1\"");
        let holds = |pairs, etag, modified| preconditions_hold(&headers(pairs), etag, modified);
        assert!(holds(&[("if-match", "\"v0\", \"v1\"")], Some(&etag), None));
        assert!(holds(&[("if-match", "*")], None, None));
        assert!(!holds(&[("if-match", "W/\"v1\"")], Some(&etag), None));
        assert!(!holds(&[("if-match", "\"v2\"")], Some(&etag), None));
        assert!(!holds(&[("if-match", "\"v1\"")], None, None));
        let modified = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").ok();
        let before = [("if-unmodified-since", "Sat, 05 Nov 1994 08:49:37 GMT")];
        let same = [("if-unmodified-since", "Sun, 06 Nov 1994 08:49:37 GMT")];
        assert!(!holds(&before, None, modified));
        assert!(holds(&same, None, modified));
        assert!(holds(&before, None, None), "no Last-Modified: ignored");
        assert!(holds(&[("if-unmodified-since", "soon")], None, modified));
        assert!(
            holds(&[("if-match", "*"), before[0]], Some(&etag), modified),
            "If-Match decides alone"
        );
    }

    #[test]
    fn if_modified_since_needs_one_valid_date_not_before_the_change() {
        let changed = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").ok();
        let Some(changed) = changed else {
            panic!("a valid date")
        };
        let at = || changed;
        let since = |value| headers(&[("if-modified-since", value)]);
        assert!(not_modified(
            &since("Sun, 06 Nov 1994 08:49:37 GMT"),
            None,
            at
        ));
        assert!(not_modified(
            &since("Mon, 07 Nov 1994 08:49:37 GMT"),
            None,
            at
        ));
        assert!(!not_modified(
            &since("Sat, 05 Nov 1994 08:49:37 GMT"),
            None,
            at
        ));
        assert!(!not_modified(&since("yesterday"), None, at));
        let twice = headers(&[
            ("if-modified-since", "Mon, 07 Nov 1994 08:49:37 GMT"),
            ("if-modified-since", "Mon, 07 Nov 1994 08:49:37 GMT"),
        ]);
        assert!(!not_modified(&twice, None, at), "several lines are ignored");
    }

    #[test]
    fn merge_keeps_repeated_headers_and_framing() {
        let stored = headers(&[
            ("set-cookie", "a=1"),
            ("set-cookie", "b=2"),
            ("content-length", "10"),
            ("cache-control", "max-age=1"),
        ]);
        let fresh = headers(&[("cache-control", "max-age=60"), ("content-length", "0")]);
        let merged = merge_not_modified(&stored, &fresh);
        assert_eq!(merged.get_all("set-cookie").iter().count(), 2);
        assert_eq!(
            merged.get("content-length"),
            Some(&HeaderValue::from_static("10"))
        );
        assert_eq!(
            merged.get("cache-control"),
            Some(&HeaderValue::from_static("max-age=60"))
        );
    }
}
