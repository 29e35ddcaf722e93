//! DeployPlugin: store a plugin bundle in the broker. The payload is the bundle archive
//! (`Bundle::to_archive_bytes`); the broker validates it by loading and building it once.
//! The same bytes under the same `name@version` are a no-op; different bytes are refused.

use serde::{Deserialize, Serialize};

use super::plugin::PluginInfo;
use crate::{ApiKey, Message};

/// Deploys the bundle archive carried as payload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployPluginRequest {}

/// The stored plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployPluginResponse {
    /// What is stored now.
    pub plugin: PluginInfo,
    /// True when exactly these bytes were already deployed under this `name@version`
    /// (nothing changed).
    pub already_deployed: bool,
}

impl Message for DeployPluginRequest {
    const API: ApiKey = ApiKey::DeployPlugin;
    type Response = DeployPluginResponse;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode_request, encode_request};

    #[test]
    fn round_trip_and_truncation() {
        let f = encode_request(&DeployPluginRequest {}, b"archive");
        let (d, p): (DeployPluginRequest, _) = decode_request(&f.body).unwrap();
        assert_eq!(d, DeployPluginRequest {});
        assert_eq!(&p[..], b"archive");
        for n in 0..4 {
            assert!(decode_request::<DeployPluginRequest>(&f.body.slice(..n)).is_err());
        }
    }
}
