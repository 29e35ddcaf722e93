//! The frame: `u32 length | u16 api | u16 version | body`, all big-endian.
//!
//! `length` counts the bytes after itself (api, version and body). A reader first reads the
//! 8-byte header, checks `length` against [`Limits::max_frame_bytes`], and only then reads the
//! body, so an oversized prefix is refused before anything is allocated.

use bytes::{BufMut, Bytes, BytesMut};

use crate::ProtocolError;

/// Bytes in a frame header (length, api, version).
pub const FRAME_HEADER_LEN: usize = 8;

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u16 = 1;

/// Size limits a decoder enforces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest frame accepted, header excluded.
    pub max_frame_bytes: u32,
    /// Largest decompressed size of one batch's records.
    pub max_decompressed_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: 64 * 1024 * 1024,
            max_decompressed_bytes: 64 * 1024 * 1024,
        }
    }
}

macro_rules! api_keys {
    ($($(#[$doc:meta])* $name:ident = $v:expr,)*) => {
        /// Identifies the request type of a frame. Numbers are stable.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u16)]
        pub enum ApiKey { $($(#[$doc])* $name = $v,)* }

        impl ApiKey {
            /// Every key, in wire-number order.
            pub const ALL: &'static [ApiKey] = &[$(ApiKey::$name,)*];

            /// Maps a wire number to a key.
            pub fn from_u16(v: u16) -> Result<ApiKey, ProtocolError> {
                match v {
                    $($v => Ok(ApiKey::$name),)*
                    other => Err(ProtocolError::UnknownApi(other)),
                }
            }

            /// A short name for logs and metrics.
            pub fn name(self) -> &'static str {
                match self { $(ApiKey::$name => stringify!($name),)* }
            }
        }
    };
}

api_keys! {
    /// Append record batches to a partition.
    Produce = 0,
    /// Read record batches from an offset (long-poll).
    Fetch = 1,
    /// Resolve earliest / latest / by-timestamp offsets.
    ListOffsets = 2,
    /// Brokers, topics and partitions.
    Metadata = 3,
    /// Create a topic.
    CreateTopic = 4,
    /// Delete a topic.
    DeleteTopic = 5,
    /// Describe one topic: config and per-partition offsets.
    DescribeTopic = 6,
    /// Change topic config keys.
    AlterTopicConfig = 7,
    /// Open a push stream of batches from an offset.
    Subscribe = 8,
    /// Grow a topic's partition count.
    CreatePartitions = 9,
    /// Move a partition's replicas to other brokers.
    ReassignPartition = 10,
    /// Set some topic config keys and remove the overrides of others.
    IncrementalAlterTopicConfig = 11,
    /// Join a consumer group.
    JoinGroup = 20,
    /// Consumer-group heartbeat long-poll carrying assignment changes.
    Heartbeat = 21,
    /// Leave a consumer group.
    LeaveGroup = 22,
    /// Commit a group's offsets.
    CommitOffsets = 23,
    /// Read a group's committed offsets.
    FetchOffsets = 24,
    /// List consumer groups.
    ListGroups = 25,
    /// Describe a consumer group: members, assignment, offsets and lag.
    DescribeGroup = 26,
    /// Move a group's committed offsets of a topic.
    ResetOffsets = 27,
    /// Delete a consumer group.
    DeleteGroup = 28,
    /// Store a plugin bundle (payload: the archive).
    DeployPlugin = 40,
    /// List deployed plugins.
    ListPlugins = 41,
    /// Describe one deployed plugin.
    DescribePlugin = 42,
    /// Remove one `name@version`.
    RemovePlugin = 43,
    /// Download a deployed bundle's archive.
    GetPlugin = 44,
    /// Run a pipeline inside the broker (or replace the one of the same name).
    DeployPipeline = 50,
    /// List deployed pipelines.
    ListPipelines = 51,
    /// A deployed pipeline's status: instances, counters, lag.
    DescribePipeline = 52,
    /// Stop and remove a deployed pipeline.
    StopPipeline = 53,
    /// Get the producer id and a new epoch for a transactional id.
    InitTransactions = 60,
    /// Add a group's offsets to the open transaction.
    TxnCommitOffsets = 61,
    /// Commit or abort the open transaction.
    EndTxn = 62,
    /// Add partitions to the open transaction (on its coordinator, before writing to them).
    AddPartitionsToTxn = 63,
    /// A transaction coordinator has a partition's leader append a commit or abort marker
    /// (brokers only).
    WriteTxnMarker = 64,
    /// A partition's leader asks a transaction's coordinator whether a transactional batch
    /// belongs to an open transaction that holds the partition (brokers only).
    VerifyTxnPartition = 65,
    /// The controller leader and the registered brokers, as this broker sees them.
    DescribeCluster = 70,
    /// A follower broker fetches a partition's batches from its leader (brokers only).
    ReplicaFetch = 71,
    /// A follower asks where its last leader epoch ends in the leader's log (brokers only).
    OffsetForLeaderEpoch = 72,
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Bytes of the body (the length field minus api and version).
    pub body_len: u32,
    /// Raw api key.
    pub api: u16,
    /// Request version.
    pub version: u16,
}

impl FrameHeader {
    /// Parses and checks a header: the length must cover api and version and be within limits.
    pub fn parse(buf: &[u8; FRAME_HEADER_LEN], limits: &Limits) -> Result<Self, ProtocolError> {
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        if len < 4 {
            return Err(ProtocolError::malformed(
                "frame",
                "length shorter than its header",
            ));
        }
        if len - 4 > limits.max_frame_bytes {
            return Err(ProtocolError::TooLarge {
                what: "frame",
                len: u64::from(len - 4),
                limit: u64::from(limits.max_frame_bytes),
            });
        }
        Ok(FrameHeader {
            body_len: len - 4,
            api: u16::from_be_bytes([buf[4], buf[5]]),
            version: u16::from_be_bytes([buf[6], buf[7]]),
        })
    }
}

/// A whole frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Raw api key (responses echo the request's).
    pub api: u16,
    /// Protocol version.
    pub version: u16,
    /// The body.
    pub body: Bytes,
}

impl Frame {
    /// Encodes the frame to bytes.
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(FRAME_HEADER_LEN + self.body.len());
        self.encode_header_into(&mut b);
        b.put_slice(&self.body);
        b.freeze()
    }

    /// Writes just the header (for writers that send the body separately, without a copy).
    pub fn encode_header_into(&self, b: &mut BytesMut) {
        b.put_u32(self.body.len() as u32 + 4);
        b.put_u16(self.api);
        b.put_u16(self.version);
    }

    /// Decodes one frame from the front of `buf`: `Ok(None)` when more bytes are needed,
    /// otherwise the frame and how many bytes it used.
    pub fn decode(buf: &[u8], limits: &Limits) -> Result<Option<(Frame, usize)>, ProtocolError> {
        let Some(head) = buf.get(..FRAME_HEADER_LEN) else {
            return Ok(None);
        };
        let mut h = [0u8; FRAME_HEADER_LEN];
        h.copy_from_slice(head);
        let header = FrameHeader::parse(&h, limits)?;
        let total = FRAME_HEADER_LEN + header.body_len as usize;
        let Some(body) = buf.get(FRAME_HEADER_LEN..total) else {
            return Ok(None);
        };
        Ok(Some((
            Frame {
                api: header.api,
                version: header.version,
                body: Bytes::copy_from_slice(body),
            },
            total,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn oversized_prefix_is_refused_before_reading() {
        let limits = Limits {
            max_frame_bytes: 1024,
            ..Limits::default()
        };
        let mut h = [0u8; 8];
        h[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            FrameHeader::parse(&h, &limits),
            Err(ProtocolError::TooLarge { .. })
        ));
    }

    #[test]
    fn every_truncated_prefix_needs_more() {
        let f = Frame {
            api: 3,
            version: 1,
            body: Bytes::from_static(b"hello world"),
        };
        let enc = f.encode();
        for n in 0..enc.len() {
            assert_eq!(Frame::decode(&enc[..n], &Limits::default()).unwrap(), None);
        }
        let (d, used) = Frame::decode(&enc, &Limits::default()).unwrap().unwrap();
        assert_eq!(d, f);
        assert_eq!(used, enc.len());
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Frame::decode(&data, &Limits { max_frame_bytes: 32, ..Limits::default() });
        }

        #[test]
        fn round_trip(api in any::<u16>(), version in any::<u16>(), body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let f = Frame { api, version, body: Bytes::from(body) };
            let (d, _) = Frame::decode(&f.encode(), &Limits::default()).unwrap().unwrap();
            prop_assert_eq!(d, f);
        }
    }
}
