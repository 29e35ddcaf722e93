//! Zigzag varints (the Kafka record encoding): small signed numbers take few bytes.
//!
//! Decoding is bounded: at most 10 bytes are read, and a longer varint is an error.

use crate::ProtocolError;

/// Appends `v` as a zigzag varint.
pub fn put_varint(buf: &mut Vec<u8>, v: i64) {
    let mut z = zigzag(v);
    while z >= 0x80 {
        buf.push((z as u8) | 0x80);
        z >>= 7;
    }
    buf.push(z as u8);
}

/// Number of bytes `put_varint` writes for `v`.
pub fn varint_len(v: i64) -> usize {
    let mut z = zigzag(v);
    let mut n = 1;
    while z >= 0x80 {
        z >>= 7;
        n += 1;
    }
    n
}

/// The most bytes a varint of an `i64` takes.
const MAX_VARINT_LEN: usize = 10;

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

/// Reads a zigzag varint from `buf` at `*pos`, advancing `*pos`.
///
/// Inlined: it runs several times for every record produced or read; its errors are built
/// out of line. Away from the end of `buf` the bytes are read without a bounds check each.
#[inline(always)]
pub fn get_varint(buf: &[u8], pos: &mut usize) -> Result<i64, ProtocolError> {
    let start = *pos;
    if let Some(&b) = buf.get(start) {
        if b & 0x80 == 0 {
            *pos = start + 1;
            return Ok(unzigzag(u64::from(b)));
        }
    }
    if let Some(bytes) = buf
        .get(start..start.saturating_add(MAX_VARINT_LEN))
        .and_then(|b| <&[u8; MAX_VARINT_LEN]>::try_from(b).ok())
    {
        let mut z: u64 = 0;
        for (i, &b) in bytes.iter().enumerate() {
            z |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                *pos = start + i + 1;
                return Ok(unzigzag(z));
            }
        }
        return Err(overlong());
    }
    let mut z: u64 = 0;
    for i in 0..MAX_VARINT_LEN {
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

        /// Within a longer buffer (the path that reads without a bounds check per byte)
        /// and near its end (the checked one), the same value comes back.
        #[test]
        fn round_trip_amid_other_bytes(
            v in any::<i64>(),
            before in proptest::collection::vec(any::<u8>(), 0..4),
            after in proptest::collection::vec(any::<u8>(), 0..12),
        ) {
            let mut b = before.clone();
            put_varint(&mut b, v);
            let end = b.len();
            b.extend_from_slice(&after);
            let mut pos = before.len();
            prop_assert_eq!(get_varint(&b, &mut pos).unwrap(), v);
            prop_assert_eq!(pos, end);
        }
    }

    #[test]
    fn overlong_is_error() {
        for len in [10, 11, 20] {
            let b = vec![0xffu8; len];
            assert_eq!(get_varint(&b, &mut 0), Err(ProtocolError::OverlongVarint));
        }
    }

    #[test]
    fn truncated_is_error() {
        for b in [&[0x80][..], &[0xff; 9][..], &[][..]] {
            assert!(matches!(
                get_varint(b, &mut 0),
                Err(ProtocolError::Truncated { .. })
            ));
        }
        // A position past the end is truncated too, not a panic.
        assert!(matches!(
            get_varint(&[1, 2], &mut 5),
            Err(ProtocolError::Truncated { .. })
        ));
    }
}
