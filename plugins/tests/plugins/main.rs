//! Integration tests of the plugin host, in one test binary: every example plugin does what its
//! README says, and hostile Lua and WASM plugins are stopped by every limit, get a fresh
//! instance afterwards, and are quarantined when they keep failing.

mod examples;
mod local;
mod lua_sandbox;
mod state;
mod support;
mod wasm_sandbox;
