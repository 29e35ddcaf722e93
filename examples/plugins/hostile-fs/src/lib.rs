//! `hostile-fs`: reads `/etc/passwd` through WASI. Its component imports `wasi:filesystem`,
//! so the plugin host refuses to load it (tested in plugins/tests/).

use quiver_plugin_sdk::{processor, Record};

#[processor]
fn process(mut record: Record) -> Record {
    if let Ok(text) = std::fs::read("/etc/passwd") {
        record.value = text;
    }
    record
}
