//! Frames and the bodies they carry: any bytes decode to a frame, "need more", or an
//! error, never a panic, nothing past the limits is allocated, and a frame whose api key
//! is known is decoded as that key's request and response.
#![no_main]

use libfuzzer_sys::fuzz_target;
use quiver_protocol::{ApiKey, Frame, Limits};

mod common;

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_frame_bytes: 1 << 16,
        max_decompressed_bytes: 1 << 16,
    };
    let mut rest = data;
    // Several frames back to back, as on a stream.
    while let Ok(Some((frame, used))) = Frame::decode(rest, &limits) {
        assert!(used >= 8 && used <= rest.len());
        assert_eq!(frame.encode()[..], rest[..used]);
        if let Ok(api) = ApiKey::from_u16(frame.api) {
            common::decode_as(api, &frame.body);
        }
        rest = &rest[used..];
    }
});
