//! Shared by the targets: decode a body as the request and the response of an API key,
//! for every key (the `match` stops compiling when a key is added without its types to
//! `quiver_protocol::with_all_messages!`), and check that what decodes re-encodes to the
//! same value.
#![allow(dead_code)]

use bytes::Bytes;
use quiver_protocol::{decode_request, decode_response, encode_request, encode_response, ApiKey};

macro_rules! dispatch {
    ($($key:ident: $req:ty => $resp:ty,)*) => {
        /// Decodes `body` as `api`'s request and as its response; whatever decodes must
        /// survive a re-encode unchanged.
        pub fn decode_as(api: ApiKey, body: &Bytes) {
            match api {
                $(ApiKey::$key => {
                    if let Ok((req, payload)) = decode_request::<$req>(body) {
                        let again = encode_request(&req, &payload);
                        let (req2, payload2) = decode_request::<$req>(&again.body)
                            .expect("a decoded request re-encodes to something decodable");
                        assert_eq!(req, req2);
                        assert_eq!(payload, payload2);
                    }
                    if let Ok((resp, payload)) = decode_response::<$resp>(stringify!($key), body) {
                        let again = encode_response(api, &resp, &payload);
                        let (resp2, payload2) = decode_response::<$resp>(stringify!($key), &again.body)
                            .expect("a decoded response re-encodes to something decodable");
                        assert_eq!(resp, resp2);
                        assert_eq!(payload, payload2);
                    }
                })*
            }
        }
    };
}

quiver_protocol::with_all_messages!(dispatch);
