//! Compression codecs of the records section: none, lz4 (block, size-prefixed), zstd.
//!
//! Decompression is capped: a compression bomb fails with `TooLarge` before the output
//! buffer grows past the caller's limit.

use crate::ProtocolError;

/// The codec of a batch's records section (attribute bits 0–2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Stored as is.
    #[default]
    None,
    /// LZ4 block format with a 4-byte little-endian size prefix.
    Lz4,
    /// Zstandard.
    Zstd,
}

impl Compression {
    /// Attribute bits for this codec.
    pub fn attribute_bits(self) -> i16 {
        match self {
            Compression::None => 0,
            Compression::Lz4 => 3,
            Compression::Zstd => 4,
        }
    }

    /// Reads the codec from batch attributes.
    pub fn from_attributes(attrs: i16) -> Result<Compression, ProtocolError> {
        match attrs & 0x7 {
            0 => Ok(Compression::None),
            3 => Ok(Compression::Lz4),
            4 => Ok(Compression::Zstd),
            other => Err(ProtocolError::Compression(format!(
                "unsupported codec {other} (use none, lz4 or zstd)"
            ))),
        }
    }

    /// Parses `none`, `lz4` or `zstd`.
    pub fn parse(s: &str) -> Result<Compression, String> {
        match s {
            "none" => Ok(Compression::None),
            "lz4" => Ok(Compression::Lz4),
            "zstd" => Ok(Compression::Zstd),
            other => Err(format!(
                "compression must be none, lz4 or zstd, got {other:?}"
            )),
        }
    }

    pub(crate) fn compress(self, data: &[u8]) -> Vec<u8> {
        match self {
            Compression::None => data.to_vec(),
            Compression::Lz4 => lz4_flex::compress_prepend_size(data),
            // Level 1: fast, and compression errors cannot happen on in-memory input.
            Compression::Zstd => zstd::bulk::compress(data, 1).unwrap_or_default(),
        }
    }

    /// The most memory [`decompress`](Self::decompress) allocates for `data` within
    /// `limit`: what a caller sharing memory among many decompressions reserves first.
    /// Uncompressed data costs nothing more (it is read in place); lz4 costs its size
    /// prefix, zstd its frame's declared content size, or without one the most its bytes
    /// can inflate to. Input that would need more is refused before it gets more.
    pub(crate) fn inflated_bound(self, data: &[u8], limit: usize) -> usize {
        match self {
            Compression::None => 0,
            Compression::Lz4 => data.get(..4).map_or(0, |b| {
                let size = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
                size.min(limit).min(lz4_max_output(data.len() - 4))
            }),
            Compression::Zstd => {
                let bound = zstd_max_output(data.len()).min(limit);
                match zstd_declared_size(data) {
                    Some(n) => usize::try_from(n).map_or(bound, |n| n.min(bound)),
                    None => bound,
                }
            }
        }
    }

    pub(crate) fn decompress(self, data: &[u8], limit: usize) -> Result<Vec<u8>, ProtocolError> {
        match self {
            Compression::None => {
                if data.len() > limit {
                    return Err(too_large(data.len(), limit));
                }
                Ok(data.to_vec())
            }
            Compression::Lz4 => {
                let size = data
                    .get(..4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
                    .ok_or(ProtocolError::Truncated { needed: 4 })?;
                if size > limit {
                    return Err(too_large(size, limit));
                }
                let block = &data[4..];
                // The size prefix is untrusted and lz4_flex allocates (and zeroes) all of it
                // up front: refuse a prefix that no LZ4 block of this many bytes can inflate to.
                let most = lz4_max_output(block.len());
                if size > most {
                    return Err(ProtocolError::Compression(format!(
                        "lz4: size prefix says {size} bytes, but {} compressed bytes inflate to at most {most}",
                        block.len()
                    )));
                }
                lz4_flex::decompress(block, size)
                    .map_err(|e| ProtocolError::Compression(format!("lz4: {e}")))
            }
            Compression::Zstd => zstd_decompress(data, limit),
        }
    }
}

fn too_large(len: usize, limit: usize) -> ProtocolError {
    ProtocolError::TooLarge {
        what: "decompressed records",
        len: len as u64,
        limit: limit as u64,
    }
}

/// The most an LZ4 block of `compressed` bytes can inflate to. Each sequence is a token, a
/// 2-byte offset and a match of at most 19 bytes plus 255 per extra length byte, so the
/// output never exceeds 255 bytes per input byte (plus a small constant).
pub(crate) fn lz4_max_output(compressed: usize) -> usize {
    compressed.saturating_mul(255).saturating_add(64)
}

/// The most a zstd input of `compressed` bytes can inflate to: a block is at most 128 KiB
/// of output and takes at least 4 bytes (a 3-byte block header and one RLE byte).
pub(crate) fn zstd_max_output(compressed: usize) -> usize {
    (compressed / 4)
        .saturating_mul(128 * 1024)
        .saturating_add(1024)
}

/// Decompresses zstd into a buffer sized by what the input can actually produce, never by
/// the caller's limit alone: a lone frame's declared content size (checked against the
/// limit and against [`zstd_max_output`]; a frame holding more than it declares is
/// refused rather than given more room) or, without one (or for several frames), a guess
/// that grows ×4 while the output does not fit, up to `limit`.
/// The content size a zstd input declares, when it is one frame that declares it (the
/// first frame of several says nothing of the others).
fn zstd_declared_size(data: &[u8]) -> Option<u64> {
    let one_frame =
        zstd::zstd_safe::find_frame_compressed_size(data).is_ok_and(|n| n == data.len());
    one_frame
        .then(|| zstd::zstd_safe::get_frame_content_size(data).ok().flatten())
        .flatten()
}

fn zstd_decompress(data: &[u8], limit: usize) -> Result<Vec<u8>, ProtocolError> {
    let declared = zstd_declared_size(data);
    if let Some(n) = declared {
        if n > limit as u64 {
            return Err(too_large(usize::try_from(n).unwrap_or(usize::MAX), limit));
        }
    }
    let bound = zstd_max_output(data.len()).min(limit);
    let mut capacity = match declared {
        Some(n) => (n as usize).min(bound),
        None => data.len().saturating_mul(4).saturating_add(4096).min(bound),
    };
    let mut decompressor = zstd::bulk::Decompressor::new()
        .map_err(|e| ProtocolError::Compression(format!("zstd: {e}")))?;
    loop {
        let mut out = Vec::with_capacity(capacity);
        match decompressor.decompress_to_buffer(data, &mut out) {
            Ok(_) => return Ok(out),
            Err(e) if is_dst_too_small(&e) => {
                if let Some(n) = declared {
                    return Err(ProtocolError::Compression(format!(
                        "zstd: the frame declares {n} bytes of content but holds more \
                         (send one frame whose header gives its true size)"
                    )));
                }
                if capacity >= bound {
                    // Only a lie can get here: the output would exceed what the input can
                    // produce, or the caller's limit.
                    return Err(if bound == limit {
                        ProtocolError::TooLarge {
                            what: "decompressed records",
                            len: limit as u64 + 1,
                            limit: limit as u64,
                        }
                    } else {
                        ProtocolError::Compression(format!(
                            "zstd: output larger than {bound} bytes from {} compressed bytes",
                            data.len()
                        ))
                    });
                }
                capacity = capacity.saturating_mul(4).max(64).min(bound);
            }
            Err(e) => {
                return Err(ProtocolError::Compression(format!(
                    "zstd (limit {limit} bytes): {e}"
                )))
            }
        }
    }
}

fn is_dst_too_small(e: &std::io::Error) -> bool {
    e.to_string().contains("Destination buffer is too small")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codecs_round_trip_and_respect_the_limit() {
        let data: Vec<u8> = (0..100_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        for c in [Compression::None, Compression::Lz4, Compression::Zstd] {
            let z = c.compress(&data);
            assert_eq!(c.decompress(&z, data.len()).unwrap(), data, "{c:?}");
            assert!(
                matches!(
                    c.decompress(&z, data.len() - 1),
                    Err(ProtocolError::TooLarge { .. })
                ),
                "{c:?}"
            );
        }
    }

    #[test]
    fn the_ratio_bounds_hold_for_the_most_compressible_input() {
        for len in [0usize, 1, 100, 1 << 20, 8 << 20] {
            let zeros = vec![0u8; len];
            let l = Compression::Lz4.compress(&zeros);
            assert!(
                len <= lz4_max_output(l.len() - 4),
                "lz4 {len} from {}",
                l.len()
            );
            let z = Compression::Zstd.compress(&zeros);
            assert!(
                len <= zstd_max_output(z.len()),
                "zstd {len} from {}",
                z.len()
            );
            assert_eq!(
                Compression::Lz4.decompress(&l, 16 << 20).unwrap().len(),
                len
            );
            assert_eq!(
                Compression::Zstd.decompress(&z, 16 << 20).unwrap().len(),
                len
            );
        }
    }

    #[test]
    fn a_lying_lz4_size_prefix_is_refused_before_allocating() {
        let mut z = Compression::Lz4.compress(b"tiny");
        z[..4].copy_from_slice(&(60u32 << 20).to_le_bytes());
        let e = Compression::Lz4.decompress(&z, 64 << 20).unwrap_err();
        assert!(e.to_string().contains("size prefix says"), "{e}");
    }

    #[test]
    fn zstd_without_a_declared_size_grows_to_fit() {
        let data = vec![7u8; 3 << 20];
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 1).unwrap();
        enc.include_contentsize(false).unwrap();
        std::io::Write::write_all(&mut enc, &data).unwrap();
        let z = enc.finish().unwrap();
        assert!(matches!(
            zstd::zstd_safe::get_frame_content_size(&z),
            Ok(None)
        ));
        assert_eq!(Compression::Zstd.decompress(&z, 4 << 20).unwrap(), data);
        assert!(matches!(
            Compression::Zstd.decompress(&z, 1 << 20),
            Err(ProtocolError::TooLarge { .. })
        ));
    }

    #[test]
    fn the_inflated_bound_covers_what_decompression_allocates() {
        let data = vec![3u8; 1 << 20];
        for c in [Compression::Lz4, Compression::Zstd] {
            let z = c.compress(&data);
            assert_eq!(c.inflated_bound(&z, 64 << 20), data.len(), "{c:?}");
            assert_eq!(c.inflated_bound(&z, 1000), 1000, "{c:?}");
        }
        assert_eq!(Compression::None.inflated_bound(&data, 64 << 20), 0);
        // Without a declared size, zstd may need what its bytes can inflate to.
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 1).unwrap();
        enc.include_contentsize(false).unwrap();
        std::io::Write::write_all(&mut enc, &data).unwrap();
        let z = enc.finish().unwrap();
        let bound = Compression::Zstd.inflated_bound(&z, 64 << 20);
        assert_eq!(bound, zstd_max_output(z.len()).min(64 << 20));
        assert!(bound >= data.len());
    }

    #[test]
    fn several_zstd_frames_decompress_within_their_bound() {
        // Two frames: the first declares 1000 bytes, the whole input holds 2000.
        let mut z = Compression::Zstd.compress(&[1u8; 1000]);
        z.extend(Compression::Zstd.compress(&[2u8; 1000]));
        let out = Compression::Zstd.decompress(&z, 64 << 20).unwrap();
        assert_eq!(out.len(), 2000);
        assert!(Compression::Zstd.inflated_bound(&z, 64 << 20) >= 2000);
    }

    #[test]
    fn zstd_declaring_more_than_the_limit_is_refused_at_once() {
        let data = vec![1u8; 1000];
        let z = Compression::Zstd.compress(&data);
        assert!(matches!(
            Compression::Zstd.decompress(&z, 999),
            Err(ProtocolError::TooLarge { len: 1000, .. })
        ));
    }
}
