//! The numbered header: a header the records of a batch carry last, whose value is a prefix
//! shared by the batch followed by a decimal number — a pipeline's `quiver.source`
//! (`topic/partition/offset`) is one. A batch with [`super::ATTR_NUMBERED_HEADER`] names the
//! header once, in a preamble at the start of its records section:
//!
//! ```text
//! key_len (1..=255) | key (UTF-8) | prefix_len (0..=512) | prefix | base (>= 0)
//! ```
//!
//! and a record whose attributes byte has [`RECORD_ATTR_NUMBERED`] set carries, after its
//! other headers, one more varint: its number minus `base`. Decoded, that record ends with
//! the header `key` = `prefix` followed by the number in decimal. So the header costs a
//! record one to three bytes instead of its whole key and value (about 50 bytes for a
//! pipeline's `quiver.source`), and every reader sees the same headers either way.
//!
//! Decoding builds each such value, so a batch's decoded size can exceed its bytes: readers
//! count [`expansion_bound`] against the same limit as decompressed bytes.

use std::ops::Range;

use crate::varint::{get_varint, put_varint};
use crate::ProtocolError;

/// Record attribute bit: the record carries the batch's numbered header (its number's
/// distance from the preamble's base follows its other headers).
pub const RECORD_ATTR_NUMBERED: u8 = 1;
/// The longest numbered header key, in bytes.
pub const MAX_KEY_BYTES: usize = 255;
/// The longest prefix of a numbered header's values, in bytes (a topic name, a partition
/// and two separators fit with room to spare).
pub const MAX_PREFIX_BYTES: usize = 512;
/// Decimal digits of the largest number (`i64::MAX`).
const MAX_DIGITS: usize = 19;

/// A batch's numbered header, as positions in its records section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Preamble {
    /// The header's key (checked UTF-8).
    pub key: Range<usize>,
    /// The prefix of every value.
    pub prefix: Range<usize>,
    /// The number records count from.
    pub base: i64,
}

impl Preamble {
    /// The number of a record that carries `delta`: `base + delta`, which must be a
    /// non-negative i64.
    pub fn number(&self, delta: i64) -> Result<i64, ProtocolError> {
        self.base
            .checked_add(delta)
            .filter(|n| *n >= 0)
            .ok_or_else(|| {
                bad(format!(
                    "base {} plus a record's {delta} is not a number from 0 to i64::MAX",
                    self.base
                ))
            })
    }

    /// The most bytes decoding can add to a batch of `records` records: each may get the
    /// key and the prefix and a number's digits.
    pub fn expansion_bound(&self, records: i32) -> usize {
        let per_record = self.key.len() + self.prefix.len() + MAX_DIGITS;
        (records.max(0) as usize).saturating_mul(per_record)
    }
}

/// Reads the preamble at `*pos` of a records section and advances past it.
pub(crate) fn parse_preamble(data: &[u8], pos: &mut usize) -> Result<Preamble, ProtocolError> {
    let key_len = preamble_varint(data, pos, "key length")?;
    if !(1..=MAX_KEY_BYTES as i64).contains(&key_len) {
        return Err(bad(format!(
            "key length {key_len} is not 1 to {MAX_KEY_BYTES}"
        )));
    }
    let key = preamble_bytes(data, pos, key_len as usize, "key")?;
    if std::str::from_utf8(&data[key.clone()]).is_err() {
        return Err(bad("key is not UTF-8".into()));
    }
    let prefix_len = preamble_varint(data, pos, "prefix length")?;
    if !(0..=MAX_PREFIX_BYTES as i64).contains(&prefix_len) {
        return Err(bad(format!(
            "prefix length {prefix_len} is not 0 to {MAX_PREFIX_BYTES}"
        )));
    }
    let prefix = preamble_bytes(data, pos, prefix_len as usize, "prefix")?;
    let base = preamble_varint(data, pos, "base")?;
    if base < 0 {
        return Err(bad(format!("base {base} is negative")));
    }
    Ok(Preamble { key, prefix, base })
}

fn preamble_varint(data: &[u8], pos: &mut usize, what: &str) -> Result<i64, ProtocolError> {
    get_varint(data, pos).map_err(|e| match e {
        ProtocolError::Truncated { .. } => ends_inside(what),
        other => other,
    })
}

fn preamble_bytes(
    data: &[u8],
    pos: &mut usize,
    len: usize,
    what: &str,
) -> Result<Range<usize>, ProtocolError> {
    if data.len() - *pos < len {
        return Err(ends_inside(what));
    }
    let r = *pos..*pos + len;
    *pos = r.end;
    Ok(r)
}

/// A broken numbered header: `reason` says what is wrong.
fn bad(reason: String) -> ProtocolError {
    ProtocolError::malformed("numbered header", reason)
}

/// A preamble cut short inside its `what`.
fn ends_inside(what: &str) -> ProtocolError {
    bad(format!("the records section ends inside its {what}"))
}

/// Writes a preamble for `key` and values `prefix` + number, counting from `base`.
pub(crate) fn put_preamble(out: &mut Vec<u8>, key: &str, prefix: &[u8], base: i64) {
    put_varint(out, key.len() as i64);
    out.extend_from_slice(key.as_bytes());
    put_varint(out, prefix.len() as i64);
    out.extend_from_slice(prefix);
    put_varint(out, base);
}

/// Splits a header value into its prefix's length and the number that ends it, when
/// writing it as prefix + number gives back exactly these bytes: the value ends in 1 to 19
/// decimal digits without a leading zero (a lone `0` is fine) that fit an i64, and the
/// prefix is at most [`MAX_PREFIX_BYTES`].
pub(crate) fn split_value(value: &[u8]) -> Option<(usize, i64)> {
    let digits = value
        .iter()
        .rev()
        .take_while(|b| b.is_ascii_digit())
        .count();
    let prefix = value.len() - digits;
    if prefix > MAX_PREFIX_BYTES {
        return None;
    }
    Some((prefix, number_in(&value[prefix..])?))
}

/// The number `digits` spell, when they are 1 to 19 decimal digits without a leading zero
/// (a lone `0` is fine) that fit an i64: exactly what [`value_of`] writes for it.
#[inline]
pub(crate) fn number_in(digits: &[u8]) -> Option<i64> {
    let leading_zero = digits.len() > 1 && digits[0] == b'0';
    if digits.is_empty() || digits.len() > MAX_DIGITS || leading_zero {
        return None;
    }
    digits.iter().try_fold(0i64, |n, d| {
        if !d.is_ascii_digit() {
            return None;
        }
        n.checked_mul(10)?.checked_add(i64::from(d - b'0'))
    })
}

/// The header value of number `n`: the prefix, then `n` in decimal.
pub(crate) fn value_of(prefix: &[u8], n: i64) -> Vec<u8> {
    let mut digits = itoa::Buffer::new();
    let digits = digits.format(n).as_bytes();
    let mut v = Vec::with_capacity(prefix.len() + digits.len());
    v.extend_from_slice(prefix);
    v.extend_from_slice(digits);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_split_only_when_prefix_and_number_give_them_back() {
        assert_eq!(split_value(b"lines/3/1234"), Some((8, 1234)));
        assert_eq!(split_value(b"lines/3/0"), Some((8, 0)));
        assert_eq!(split_value(b"42"), Some((0, 42)));
        assert_eq!(
            split_value(b"t/9223372036854775807"),
            Some((2, i64::MAX)),
            "the largest i64"
        );
        for kept_whole in [
            &b"lines/3/"[..],          // no number
            b"lines/3/007",            // a leading zero would be lost
            b"t/9223372036854775808",  // past i64::MAX
            b"t/12345678901234567890", // 20 digits
            b"",
        ] {
            assert_eq!(split_value(kept_whole), None, "{kept_whole:?}");
        }
        let long = [b'x'; MAX_PREFIX_BYTES + 1];
        let mut v = long.to_vec();
        v.push(b'1');
        assert_eq!(split_value(&v), None, "prefix over the limit");
        // After a known prefix (the builder's check): digits only.
        assert_eq!(number_in(b"1234"), Some(1234));
        for not_a_number in [&b"12a"[..], b"1/2", b"", b"01", b"-1"] {
            assert_eq!(number_in(not_a_number), None, "{not_a_number:?}");
        }
        for (prefix, n) in [(&b"a/1/"[..], 0), (b"", 7), (b"x-", i64::MAX)] {
            let v = value_of(prefix, n);
            assert_eq!(split_value(&v), Some((prefix.len(), n)));
        }
    }

    #[test]
    fn a_preamble_reads_back_and_a_lying_one_is_refused() {
        let mut out = Vec::new();
        put_preamble(&mut out, "quiver.source", b"in/0/", 17);
        out.push(0xAA); // the first record would start here
        let mut pos = 0;
        let p = parse_preamble(&out, &mut pos).unwrap();
        assert_eq!(&out[p.key.clone()], b"quiver.source");
        assert_eq!(&out[p.prefix.clone()], b"in/0/");
        assert_eq!((p.base, pos), (17, out.len() - 1));
        assert_eq!(p.number(3).unwrap(), 20);
        assert!(p.number(-18).is_err(), "below 0");
        assert!(p.number(i64::MAX).is_err(), "overflow");

        let lying = |build: &dyn Fn(&mut Vec<u8>)| {
            let mut b = Vec::new();
            build(&mut b);
            parse_preamble(&b, &mut 0).unwrap_err().to_string()
        };
        let e = lying(&|b| put_varint(b, 0));
        assert!(e.contains("key length 0"), "{e}");
        let e = lying(&|b| put_varint(b, 256));
        assert!(e.contains("key length 256"), "{e}");
        let e = lying(&|b| {
            put_varint(b, 2);
            b.extend_from_slice(&[0xff, 0xfe]);
        });
        assert!(e.contains("UTF-8"), "{e}");
        let e = lying(&|b| {
            put_varint(b, 1);
            b.push(b'k');
            put_varint(b, 513);
        });
        assert!(e.contains("prefix length 513"), "{e}");
        let e = lying(&|b| {
            put_varint(b, 1);
            b.push(b'k');
            put_varint(b, 4);
            b.push(b'p');
        });
        assert!(e.contains("ends inside its prefix"), "{e}");
        let e = lying(&|b| put_preamble(b, "k", b"p", -1));
        assert!(e.contains("negative"), "{e}");
        let e = lying(&|b| {
            put_varint(b, 1);
            b.push(b'k');
            put_varint(b, 0);
        });
        assert!(e.contains("ends inside its base"), "{e}");
    }
}
