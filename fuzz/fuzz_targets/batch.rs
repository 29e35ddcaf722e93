//! Record batches as stored and fetched: validation, splitting a payload of concatenated
//! batches, and record decoding of arbitrary bytes, with decompression capped.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use quiver_protocol::batch::{check_crc, split_batches, validate, RecordIter};

fuzz_target!(|data: &[u8]| {
    let b = Bytes::copy_from_slice(data);
    let _ = validate(&b, 1 << 20);
    let _ = check_crc(&b);
    if let Ok(batches) = split_batches(&b, 1 << 20) {
        let total: usize = batches.iter().map(|x| x.len()).sum();
        assert_eq!(total, b.len());
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
