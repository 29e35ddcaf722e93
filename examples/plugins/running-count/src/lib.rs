//! `running-count`: a stateful processor. It counts the records seen per key (records without
//! a key count under the empty key) and replaces each value with the count so far, as decimal
//! text. The counts live in the instance's memory: they persist from one batch to the next and
//! start again from zero when the host replaces the instance (after a failure or a restart).
//! A value of exactly `panic` makes the plugin panic (used by the host's tests).

use std::cell::RefCell;
use std::collections::HashMap;

use quiver_plugin_sdk::{processor, Record};

thread_local! {
    static COUNTS: RefCell<HashMap<Vec<u8>, u64>> = RefCell::new(HashMap::new());
}

#[processor]
fn process(mut record: Record) -> Record {
    if record.value == b"panic" {
        panic!("asked to panic");
    }
    let key = record.key.clone().unwrap_or_default();
    let n = COUNTS.with(|c| {
        let mut c = c.borrow_mut();
        let n = c.entry(key).or_insert(0);
        *n += 1;
        *n
    });
    record.value = n.to_string().into_bytes();
    record
}
