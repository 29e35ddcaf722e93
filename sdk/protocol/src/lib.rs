//! quiver-protocol: the wire contract shared by the Quiver broker and its clients.
//!
//! It owns three things and does no I/O (no tokio, no sockets, no storage):
//! - [`frame`]: the length-prefixed frame (`u32 length | u16 api | u16 version | body`);
//! - [`requests`]: one module per request type with its request and response bodies;
//! - [`batch`]: the record-batch format, which is the same bytes on the wire and on disk.
//!
//! Control parts decode across builds: fields appended later are ignored by older peers
//! and defaulted for newer ones (see `control`).
//!
//! Every decoder is total: any input yields a value or a typed [`ProtocolError`], never a
//! panic, and nothing is allocated past the [`Limits`] the caller passes.

pub mod batch;
mod control;
pub mod error;
pub mod frame;
pub mod message;
pub mod requests;
pub mod varint;

pub use error::{ErrorCode, ProtocolError};
pub use frame::{ApiKey, Frame, FrameHeader, Limits, FRAME_HEADER_LEN, PROTOCOL_VERSION};
pub use message::{
    decode_request, decode_response, encode_control, encode_error, encode_request, encode_response,
    response_prefix, Message,
};

/// ALPN protocol id spoken by Quiver clients and brokers.
pub const ALPN: &[u8] = b"quiver/1";
