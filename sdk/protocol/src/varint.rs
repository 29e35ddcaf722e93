//! Zigzag varints (the Kafka record encoding): small signed numbers take few bytes.
//!
//! Decoding is bounded: at most 10 bytes are read, and a longer varint is an error.

use crate::ProtocolError;

/// Appends `v` as a zigzag varint.
pub fn put_varint(buf: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        buf.push((z as u8) | 0x80);
        z >>= 7;
    }
    buf.push(z as u8);
}

/// Number of bytes `put_varint` writes for `v`.
pub fn varint_len(v: i64) -> usize {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    let mut n = 1;
    while z >= 0x80 {
        z >>= 7;
        n += 1;
    }
    n
}

/// Reads a zigzag varint from `buf` at `*pos`, advancing `*pos`.
///
/// Inlined: it runs several times for every record produced or read; its errors are built
/// out of line.
#[inline(always)]
pub fn get_varint(buf: &[u8], pos: &mut usize) -> Result<i64, ProtocolError> {
    let mut z: u64 = 0;
    for i in 0..10 {
        let Some(&b) = buf.get(*pos) else {
            return Err(truncated());
        };
        *pos += 1;
        z |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(unzigzag(z));
        }
    }
    Err(overlong())
}

#[cold]
fn truncated() -> ProtocolError {
    ProtocolError::Truncated { needed: 1 }
}

#[cold]
fn overlong() -> ProtocolError {
    ProtocolError::OverlongVarint
}

fn unzigzag(z: u64) -> i64 {
    ((z >> 1) as i64) ^ -((z & 1) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(v in any::<i64>()) {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            prop_assert_eq!(b.len(), varint_len(v));
            let mut pos = 0;
            prop_assert_eq!(get_varint(&b, &mut pos).unwrap(), v);
            prop_assert_eq!(pos, b.len());
        }
    }

    #[test]
    fn overlong_is_error() {
        let b = [0xffu8; 11];
        assert_eq!(get_varint(&b, &mut 0), Err(ProtocolError::OverlongVarint));
    }

    #[test]
    fn truncated_is_error() {
        assert!(matches!(
            get_varint(&[0x80], &mut 0),
            Err(ProtocolError::Truncated { .. })
        ));
    }
}
