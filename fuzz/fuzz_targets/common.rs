//! Shared by the targets: decode a body as the request and the response of an API key,
//! for every key (the `match` stops compiling when a key is added without its types to
//! `quiver_protocol::with_all_messages!`), and check that what decodes re-encodes to the
//! same value. "Same" is compared on the encoding (decode, encode, decode, encode gives the
//! same bytes twice), not with `==`: a float field may hold NaN, which is never equal to
//! itself although it round-trips bit for bit.
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
                        assert_eq!(payload, payload2);
                        assert_eq!(again.body, encode_request(&req2, &payload2).body);
                    }
                    if let Ok((resp, payload)) = decode_response::<$resp>(stringify!($key), body) {
                        let again = encode_response(api, &resp, &payload);
                        let (resp2, payload2) = decode_response::<$resp>(stringify!($key), &again.body)
                            .expect("a decoded response re-encodes to something decodable");
                        assert_eq!(payload, payload2);
                        assert_eq!(again.body, encode_response(api, &resp2, &payload2).body);
                    }
                })*
            }
        }
    };
}

quiver_protocol::with_all_messages!(dispatch);
