//! Frames and request/response bodies: any bytes decode to a value or an error, never a
//! panic, and nothing past the limits is allocated.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use quiver_protocol::requests::{FetchRequest, FetchResponse, ProduceRequest, TopicDescription};
use quiver_protocol::{decode_request, decode_response, Frame, Limits};

fuzz_target!(|data: &[u8]| {
    let limits = Limits { max_frame_bytes: 1 << 16, max_decompressed_bytes: 1 << 16 };
    if let Ok(Some((frame, used))) = Frame::decode(data, &limits) {
        assert!(used <= data.len());
        let _ = decode_request::<ProduceRequest>(&frame.body);
        let _ = decode_request::<FetchRequest>(&frame.body);
        let _ = decode_response::<FetchResponse>("fetch", &frame.body);
        let _ = decode_response::<TopicDescription>("describe", &frame.body);
    }
    let body = Bytes::copy_from_slice(data);
    let _ = decode_request::<ProduceRequest>(&body);
});
