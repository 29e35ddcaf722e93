//! Every request and response decoder: the first byte picks the API key (modulo the number
//! of keys), the rest is the body. Decoding never panics, and a decoded value re-encodes
//! to itself.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use quiver_protocol::ApiKey;

mod common;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let api = ApiKey::ALL[first as usize % ApiKey::ALL.len()];
    common::decode_as(api, &Bytes::copy_from_slice(rest));
});
