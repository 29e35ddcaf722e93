//! `noop-map`: returns every record unchanged. Used to measure the host's per-record cost.

use quiver_plugin_sdk::{processor, Record};

#[processor]
fn process(record: Record) -> Record {
    record
}
