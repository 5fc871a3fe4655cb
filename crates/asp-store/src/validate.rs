//! The rules every event received from a peer must keep before it may reach the
//! writer: the same limits a local write is held to, checked where the event enters.
//! An event that broke one would be appended, acknowledged and relayed, and could
//! then be read back as damage (a record past the log's limit cuts the log there on
//! the next open, taking every later acknowledged record with it) or break every read
//! of its key (a CRDT state that does not decode).
//!
//! One home: [`check_event`] holds every rule; a new rule is one more line there.
//! What the types already guarantee is not checked again: a `Namespace` and a `Key`
//! can only be made valid (their constructors check), a `NodeId` is never zero, a
//! content type is one of the known ones.

use asp_core::crdt::{Policy, State};
use asp_core::{Event, Op};

use crate::codec::{self, EventRef, RECORD_BYTES_MAX};
use crate::config::StoreConfig;
use crate::error::WriteError;

/// Checks every event of a batch from a peer; the first that breaks a rule refuses
/// the whole batch with [`WriteError::InvalidEvent`] naming the event and the rule.
pub(crate) fn check_remote_events(
    config: &StoreConfig,
    events: &[Event],
) -> Result<(), WriteError> {
    for (i, event) in events.iter().enumerate() {
        if let Err((reason, why)) = check_event(config, event) {
            return Err(WriteError::InvalidEvent {
                reason,
                message: format!(
                    "event {i} of the batch (dot {}, namespace {}, key {:?}) {why}; nothing of the batch was applied",
                    event.dot,
                    event.namespace,
                    event.key.as_str()
                ),
            });
        }
    }
    Ok(())
}

/// The rules, in order; on a break, the rule's name (for counting) and what is wrong.
fn check_event(config: &StoreConfig, event: &Event) -> Result<(), (&'static str, String)> {
    if event.dot.counter == 0 {
        return Err(("dot", "has counter 0; counters start at 1".into()));
    }
    let value_len = match &event.op {
        Op::Put { value, .. } => value.len(),
        Op::Delete => 0,
    };
    if value_len > config.value_bytes_max {
        return Err((
            "value_size",
            format!(
                "carries a value of {value_len} bytes; this node's limit is {} (value_bytes_max): give every node the same value_bytes_max",
                config.value_bytes_max
            ),
        ));
    }
    let record = EventRef::from_event(event);
    if !codec::record_fits(&record) {
        return Err((
            "record_size",
            format!(
                "would make a log record of {} bytes; the log's records are at most {RECORD_BYTES_MAX} bytes",
                record.body_len()
            ),
        ));
    }
    let Some(policy) = Policy::of_event(&event.context) else {
        return Err((
            "context",
            format!(
                "carries a context of {} bytes that is no policy marker this node knows (empty, or 0xC7 and a policy tag); is the peer a newer version?",
                event.context.len()
            ),
        ));
    };
    if policy != Policy::Lww {
        // Decoding costs time linear in the value, which is bounded above.
        match &event.op {
            Op::Put { value, .. } => match State::decode(value) {
                Ok(state) if state.policy() == policy => {}
                Ok(state) => {
                    return Err((
                        "crdt_state",
                        format!("is marked {policy} but carries a {} state", state.policy()),
                    ));
                }
                Err(e) => {
                    return Err((
                        "crdt_state",
                        format!("is marked {policy} but its value is no {policy} state: {e}"),
                    ));
                }
            },
            Op::Delete => {
                return Err((
                    "crdt_state",
                    format!(
                        "is a delete marked {policy}; keys of {policy} namespaces are written as states"
                    ),
                ));
            }
        }
    }
    Ok(())
}
