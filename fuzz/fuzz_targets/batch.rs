//! Record batches: validation, splitting and record decoding of arbitrary bytes, with
//! decompression capped.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use quiver_protocol::batch::{split_batches, validate, RecordIter};

fuzz_target!(|data: &[u8]| {
    let b = Bytes::copy_from_slice(data);
    let _ = validate(&b, 1 << 20);
    if let Ok(batches) = split_batches(&b, 1 << 20) {
        for batch in batches {
            if let Ok(it) = RecordIter::new(&batch, 1 << 20) {
                for r in it {
                    if r.is_err() {
                        break;
                    }
                }
            }
        }
    }
});
