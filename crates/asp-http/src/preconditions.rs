//! Conditional writes and reads (RFC 9110 §13): `If-Match` / `If-None-Match` as
//! lists of entity tags, turned into the one condition the store checks when it
//! writes.

use asp_core::Dot;
use asp_store::Condition;
use axum::http::{HeaderMap, header};

use crate::error::ApiError;
use crate::routes::header_str;

/// An entity tag of an `If-Match` / `If-None-Match` list (RFC 9110 §8.8.3), without
/// its quotes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct EntityTag<'a> {
    weak: bool,
    opaque: &'a str,
}

impl EntityTag<'_> {
    /// The version this tag names, if it is one of ours (`"17@9f3c2a0b11d4e5f6"`).
    fn dot(&self) -> Option<Dot> {
        self.opaque.parse().ok()
    }
}

/// Reads `#entity-tag`: tags separated by commas and optional white space (empty list
/// elements are skipped, as RFC 9110 §5.6.1 asks). `None` when the value does not
/// follow that grammar or holds no tag.
fn parse_etag_list(value: &str) -> Option<Vec<EntityTag<'_>>> {
    let mut tags = Vec::new();
    let mut rest = value;
    loop {
        rest = rest.trim_start_matches([' ', '\t', ',']);
        if rest.is_empty() {
            break;
        }
        let (weak, tail) = match rest.strip_prefix("W/") {
            Some(t) => (true, t),
            None => (false, rest),
        };
        let tail = tail.strip_prefix('"')?;
        let end = tail.find('"')?;
        let opaque = &tail[..end];
        // etagc: any visible character but DQUOTE (obs-text never reaches here: the
        // header was checked to be visible ASCII).
        if !opaque
            .bytes()
            .all(|b| b == 0x21 || (0x23..=0x7e).contains(&b))
        {
            return None;
        }
        tags.push(EntityTag { weak, opaque });
        rest = tail[end + 1..].trim_start_matches([' ', '\t']);
        if !rest.is_empty() && !rest.starts_with(',') {
            return None;
        }
    }
    (!tags.is_empty()).then_some(tags)
}

/// A write's precondition as the client sent it, before it is checked against the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Precondition {
    /// `If-Match: *`.
    Exists,
    /// `If-None-Match: *`.
    Absent,
    /// `If-Match` with tags: the current version must be one of these. Strong
    /// comparison: weak tags and tags that are not versions of ours never match, so
    /// they are not kept.
    Match(Vec<Dot>),
    /// `If-None-Match` with tags: the current version must be none of these (weak
    /// comparison, RFC 9110 §13.1.2).
    NoneMatch(Vec<Dot>),
}

fn tag_list_error(header: &str, value: &str) -> ApiError {
    ApiError::bad_request(
        "invalid_header",
        format!(
            "{header} must be * or a list of entity tags such as \"17@9f3c2a0b11d4e5f6\" (quoted, comma-separated); got {value:?}"
        ),
    )
}

pub(crate) fn parse_if_match(m: &str) -> Result<Precondition, ApiError> {
    if m.trim() == "*" {
        return Ok(Precondition::Exists);
    }
    let tags = parse_etag_list(m).ok_or_else(|| tag_list_error("If-Match", m))?;
    Ok(Precondition::Match(
        tags.iter()
            .filter(|t| !t.weak)
            .filter_map(EntityTag::dot)
            .collect(),
    ))
}

pub(crate) fn parse_if_none_match(n: &str) -> Result<Precondition, ApiError> {
    if n.trim() == "*" {
        return Ok(Precondition::Absent);
    }
    let tags = parse_etag_list(n).ok_or_else(|| tag_list_error("If-None-Match", n))?;
    Ok(Precondition::NoneMatch(
        tags.iter().filter_map(EntityTag::dot).collect(),
    ))
}

/// The preconditions of a single-key write from `If-Match` / `If-None-Match`, in the
/// order RFC 9110 §13.2.2 evaluates them (If-Match first).
pub(crate) fn write_preconditions(headers: &HeaderMap) -> Result<Vec<Precondition>, ApiError> {
    let mut preconditions = Vec::new();
    if let Some(m) = header_str(headers, header::IF_MATCH)? {
        preconditions.push(parse_if_match(m)?);
    }
    if let Some(n) = header_str(headers, header::IF_NONE_MATCH)? {
        preconditions.push(parse_if_none_match(n)?);
    }
    Ok(preconditions)
}

/// Turns preconditions into the condition the store checks when it writes, against
/// the state the write replaces (so a write in between fails it, 412, as if it had come
/// first). Nothing is read here: the store checks lists of versions itself.
pub(crate) fn condition(preconditions: Vec<Precondition>) -> Condition {
    let mut conditions: Vec<Condition> = preconditions
        .into_iter()
        .filter_map(|p| match p {
            Precondition::Exists => Some(Condition::IfExists),
            Precondition::Absent => Some(Condition::IfAbsent),
            Precondition::Match(dots) if dots.len() == 1 => Some(Condition::IfVersion(dots[0])),
            Precondition::Match(dots) => Some(Condition::IfVersionIn(dots)),
            // No listed tag is a version of ours: none can match, so nothing is required.
            Precondition::NoneMatch(dots) if dots.is_empty() => None,
            Precondition::NoneMatch(dots) => Some(Condition::IfVersionNotIn(dots)),
        })
        .collect();
    match conditions.len() {
        0 => Condition::None,
        1 => conditions.pop().expect("one"),
        _ => Condition::All(conditions),
    }
}

/// A batch operation's `if_match` / `if_none_match`: a version as answers write it
/// (`17@9f3c2a0b11d4e5f6`), or what the header of the same name takes.
pub(crate) fn batch_precondition(
    value: &str,
    parse_header: fn(&str) -> Result<Precondition, ApiError>,
    one: fn(Vec<Dot>) -> Precondition,
) -> Result<Precondition, ApiError> {
    // A bare version is a tag like any other: one that is not ours never matches.
    let bare_version = value.split_once('@').is_some_and(|(counter, node)| {
        !counter.is_empty()
            && counter.bytes().all(|b| b.is_ascii_digit())
            && node.len() == 16
            && node.bytes().all(|b| b.is_ascii_hexdigit())
    });
    if bare_version {
        return Ok(one(value.parse::<Dot>().into_iter().collect()));
    }
    parse_header(value)
}
