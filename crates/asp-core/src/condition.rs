//! Preconditions of local writes: what a compare-and-set checks against the key's
//! current version, as the store's writer sees it at the write's turn.

use crate::Dot;

/// A precondition on the key's state, checked when the batch is applied; if any
/// operation's condition fails, nothing of the batch is applied.
///
/// The list forms are what HTTP's `If-Match` / `If-None-Match` with several entity
/// tags ask (RFC 9110 §13.1): checked here, by the writer, against the state the write
/// would replace, so that a caller asks the store nothing before it writes.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Condition {
    #[default]
    None,
    /// The key exists and its current version is this dot.
    IfVersion(Dot),
    /// The key exists (not absent, not deleted).
    IfExists,
    /// The key is absent or deleted.
    IfAbsent,
    /// The key exists and its current version is one of these (an empty list never
    /// holds).
    IfVersionIn(Vec<Dot>),
    /// The key is absent or deleted, or its current version is none of these.
    IfVersionNotIn(Vec<Dot>),
    /// Every one of these, checked in order; the first that fails is reported.
    All(Vec<Condition>),
}

impl Condition {
    /// Checks the condition against the key's current version (`None`: absent or
    /// deleted); `Err` says why it fails.
    pub fn check(&self, current: Option<Dot>) -> Result<(), String> {
        let failure = match (self, current) {
            (Condition::None, _) => None,
            (Condition::IfVersion(want), Some(have))
                if *want == have
                    || crate::mutation::active(
                        crate::mutation::Mutation::ConditionIgnoresVersion,
                    ) =>
            {
                None
            }
            (Condition::IfVersion(want), Some(have)) => Some(format!(
                "expected version {want}, the current version is {have}"
            )),
            (Condition::IfVersion(want), None) => Some(format!(
                "expected version {want}, but the key does not exist"
            )),
            (Condition::IfExists, None) => Some("the key does not exist".to_owned()),
            (Condition::IfExists, Some(_)) => None,
            (Condition::IfAbsent, Some(have)) => Some(format!("the key exists at version {have}")),
            (Condition::IfAbsent, None) => None,
            (Condition::IfVersionIn(dots), Some(have)) if dots.contains(&have) => None,
            (Condition::IfVersionIn(dots), have) => Some(format!(
                "the key is {}, which is none of the versions asked for ({})",
                describe(have),
                list(dots)
            )),
            (Condition::IfVersionNotIn(dots), Some(have)) if dots.contains(&have) => Some(format!(
                "the key is at version {have}, which the condition excludes"
            )),
            (Condition::IfVersionNotIn(_), _) => None,
            (Condition::All(all), _) => return all.iter().try_for_each(|c| c.check(current)),
        };
        failure.map_or(Ok(()), Err)
    }
}

fn describe(current: Option<Dot>) -> String {
    current.map_or("absent".to_owned(), |d| format!("at version {d}"))
}

fn list(dots: &[Dot]) -> String {
    if dots.is_empty() {
        return "none that can match".to_owned();
    }
    dots.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}
