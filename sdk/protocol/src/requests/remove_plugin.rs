//! RemovePlugin: delete one `name@version`; refused while a topic's partitioner or a
//! running consume-time processor uses it.

use serde::{Deserialize, Serialize};

use crate::{ApiKey, Message};

/// Removes `name@version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemovePluginRequest {
    /// Plugin name.
    pub name: String,
    /// Exact version (required: removal never guesses).
    pub version: String,
}

/// Confirms the removal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemovePluginResponse {
    /// The removed bundle's digest.
    pub digest: String,
    /// True when no other `name@version` shared the bytes, so they were deleted too.
    pub blob_deleted: bool,
}

impl Message for RemovePluginRequest {
    const API: ApiKey = ApiKey::RemovePlugin;
    type Response = RemovePluginResponse;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode_request, encode_request};

    #[test]
    fn round_trip_and_truncation() {
        let req = RemovePluginRequest {
            name: "grep".into(),
            version: "1.0.0".into(),
        };
        let f = encode_request(&req, b"");
        let (d, _): (RemovePluginRequest, _) = decode_request(&f.body).unwrap();
        assert_eq!(d, req);
        for n in 0..f.body.len() {
            assert!(decode_request::<RemovePluginRequest>(&f.body.slice(..n)).is_err());
        }
    }
}
