//! `count`: a keyed running count kept in the host's state (not in the plugin's memory), so it
//! survives restarts and moves with its input partition. The word is the record's key, or its
//! value when it has no key; each record becomes `word → count of that word so far` (key =
//! word, value = the count as decimal text). Needs a pipeline: run without one (e.g. at
//! consume time), every call fails with "state is not available".

use quiver_plugin_sdk::{processor, state, Record};

#[processor]
fn count(mut record: Record) -> Record {
    let word = record.key.take().unwrap_or_else(|| record.value.clone());
    let n = state::get_u64(&word).unwrap_or(0) + 1;
    state::put_u64(&word, n);
    record.key = Some(word);
    record.value = n.to_string().into_bytes();
    record
}
