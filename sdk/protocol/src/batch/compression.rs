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

    pub(crate) fn decompress(self, data: &[u8], limit: usize) -> Result<Vec<u8>, ProtocolError> {
        match self {
            Compression::None => Ok(data.to_vec()),
            Compression::Lz4 => {
                let size = data
                    .get(..4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
                    .ok_or(ProtocolError::Truncated { needed: 4 })?;
                if size > limit {
                    return Err(ProtocolError::TooLarge {
                        what: "decompressed records",
                        len: size as u64,
                        limit: limit as u64,
                    });
                }
                lz4_flex::decompress(&data[4..], size)
                    .map_err(|e| ProtocolError::Compression(format!("lz4: {e}")))
            }
            Compression::Zstd => zstd::bulk::decompress(data, limit).map_err(|e| {
                ProtocolError::Compression(format!("zstd (limit {limit} bytes): {e}"))
            }),
        }
    }
}
