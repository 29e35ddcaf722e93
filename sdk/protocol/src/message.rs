//! Request and response bodies: a postcard-encoded control part, then raw payload bytes.
//!
//! Request body:  `u32 control_len | control | payload`.
//! Response body: `u16 error_code | (code == 0: u32 control_len | control | payload)
//!                                 | (code != 0: postcard ErrorBody)`.
//! Record batches travel in `payload`, so they are never re-encoded by serde.

use bytes::{BufMut, Bytes, BytesMut};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::control::decode_control;
use crate::{ApiKey, ErrorCode, Frame, ProtocolError, PROTOCOL_VERSION};

/// A request type: its API key, and the type the broker answers with.
pub trait Message: Serialize + DeserializeOwned {
    /// The API key frames of this request carry.
    const API: ApiKey;
    /// The response control type.
    type Response: Serialize + DeserializeOwned;
}

/// The body of an error response.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    /// A human-readable explanation, saying what to do where possible.
    pub message: String,
}

fn put_control<T: Serialize>(b: &mut BytesMut, control: &T) {
    // Serializing plain structs into a Vec cannot fail.
    let enc = postcard::to_stdvec(control).unwrap_or_default();
    b.put_u32(enc.len() as u32);
    b.put_slice(&enc);
}

fn split_control<'a>(
    body: &'a [u8],
    what: &'static str,
) -> Result<(&'a [u8], &'a [u8]), ProtocolError> {
    let len = body
        .get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or(ProtocolError::Truncated { needed: 4 })?;
    let rest = &body[4..];
    if len > rest.len() {
        return Err(ProtocolError::malformed(
            what,
            "control length beyond the body",
        ));
    }
    Ok(rest.split_at(len))
}

/// Encodes a request frame with its payload.
pub fn encode_request<M: Message>(req: &M, payload: &[u8]) -> Frame {
    let mut b = BytesMut::with_capacity(64 + payload.len());
    put_control(&mut b, req);
    b.put_slice(payload);
    Frame {
        api: M::API as u16,
        version: PROTOCOL_VERSION,
        body: b.freeze(),
    }
}

/// Decodes a request body into its control part and the payload (a zero-copy slice).
pub fn decode_request<M: Message>(body: &Bytes) -> Result<(M, Bytes), ProtocolError> {
    let (control, payload) = split_control(body, M::API.name())?;
    let req = decode_control(control, M::API.name())?;
    let start = body.len() - payload.len();
    Ok((req, body.slice(start..)))
}

/// Encodes a success response frame.
pub fn encode_response<T: Serialize>(api: ApiKey, resp: &T, payload: &[u8]) -> Frame {
    let mut b = BytesMut::with_capacity(64 + payload.len());
    b.put_u16(ErrorCode::None as u16);
    put_control(&mut b, resp);
    b.put_slice(payload);
    Frame {
        api: api as u16,
        version: PROTOCOL_VERSION,
        body: b.freeze(),
    }
}

/// Encodes a response's control part once, for [`response_prefix`].
pub fn encode_control<T: Serialize>(resp: &T) -> Vec<u8> {
    postcard::to_stdvec(resp).unwrap_or_default()
}

/// The bytes of a success response up to its payload: frame header, error code 0, control
/// length and control. A server writes this, then the payload, without copying the payload.
pub fn response_prefix(api: u16, control: &[u8], payload_len: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(16 + control.len());
    let body_len = 2 + 4 + control.len() + payload_len;
    b.put_u32(body_len as u32 + 4);
    b.put_u16(api);
    b.put_u16(PROTOCOL_VERSION);
    b.put_u16(ErrorCode::None as u16);
    b.put_u32(control.len() as u32);
    b.put_slice(control);
    b.freeze()
}

/// Encodes an error response frame.
pub fn encode_error(api: u16, code: ErrorCode, message: &str) -> Frame {
    let mut b = BytesMut::new();
    b.put_u16(code as u16);
    let enc = postcard::to_stdvec(&ErrorBody {
        message: message.to_string(),
    })
    .unwrap_or_default();
    b.put_slice(&enc);
    Frame {
        api,
        version: PROTOCOL_VERSION,
        body: b.freeze(),
    }
}

/// Decodes a response body: the control part and payload, or the broker's error as
/// [`ProtocolError::Remote`].
pub fn decode_response<T: DeserializeOwned>(
    what: &'static str,
    body: &Bytes,
) -> Result<(T, Bytes), ProtocolError> {
    let code = body
        .get(..2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .ok_or(ProtocolError::Truncated { needed: 2 })?;
    if code != 0 {
        let eb: ErrorBody = decode_control(&body[2..], "error body")?;
        return Err(ProtocolError::Remote {
            code: ErrorCode::from_u16(code),
            message: eb.message,
        });
    }
    let rest = body.slice(2..);
    let (control, payload) = split_control(&rest, what)?;
    let resp = decode_control(control, what)?;
    let start = rest.len() - payload.len();
    Ok((resp, rest.slice(start..)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::requests::fetch::{FetchRequest, FetchResponse};

    #[test]
    fn request_round_trip_keeps_payload() {
        let req = FetchRequest {
            topic: "t".into(),
            partition: 2,
            offset: 7,
            max_bytes: 100,
            max_wait_ms: 5,
            min_bytes: 1,
            processor: None,
            isolation: Default::default(),
        };
        let f = encode_request(&req, b"payload");
        let (d, p): (FetchRequest, Bytes) = decode_request(&f.body).unwrap();
        assert_eq!(d, req);
        assert_eq!(&p[..], b"payload");
    }

    #[test]
    fn prefix_plus_payload_equals_response() {
        let resp = FetchResponse {
            high_watermark: 3,
            log_start_offset: 1,
            log_end_offset: 3,
            last_stable_offset: 3,
            aborted: Vec::new(),
        };
        let whole = encode_response(ApiKey::Fetch, &resp, b"batches").encode();
        let mut parts = response_prefix(ApiKey::Fetch as u16, &encode_control(&resp), 7).to_vec();
        parts.extend_from_slice(b"batches");
        assert_eq!(&whole[..], &parts[..]);
    }

    #[test]
    fn error_response_decodes_as_remote() {
        let f = encode_error(1, ErrorCode::OffsetOutOfRange, "offset 9 is past the end");
        let r: Result<(FetchResponse, Bytes), _> = decode_response("fetch", &f.body);
        assert!(matches!(
            r,
            Err(ProtocolError::Remote {
                code: ErrorCode::OffsetOutOfRange,
                ..
            })
        ));
    }

    #[test]
    fn truncated_bodies_are_errors() {
        let resp = FetchResponse {
            high_watermark: 10,
            log_start_offset: 0,
            log_end_offset: 10,
            last_stable_offset: 10,
            aborted: Vec::new(),
        };
        let f = encode_response(ApiKey::Fetch, &resp, b"");
        for n in 0..f.body.len() {
            let r: Result<(FetchResponse, Bytes), _> = decode_response("fetch", &f.body.slice(..n));
            assert!(r.is_err(), "prefix of {n} bytes decoded");
        }
    }
}
