//! DescribePlugin: one deployed plugin; without a version, its highest (semver) version.

use serde::{Deserialize, Serialize};

use super::plugin::PluginInfo;
use crate::{ApiKey, Message};

/// Describes `name@version`, or the highest version of `name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DescribePluginRequest {
    /// Plugin name.
    pub name: String,
    /// Exact version, or `None` for the highest deployed.
    pub version: Option<String>,
}

/// The plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DescribePluginResponse {
    /// What is stored.
    pub plugin: PluginInfo,
}

impl Message for DescribePluginRequest {
    const API: ApiKey = ApiKey::DescribePlugin;
    type Response = DescribePluginResponse;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode_request, encode_request};

    #[test]
    fn round_trip_and_truncation() {
        let req = DescribePluginRequest {
            name: "grep".into(),
            version: Some("1.0.0".into()),
        };
        let f = encode_request(&req, b"");
        let (d, _): (DescribePluginRequest, _) = decode_request(&f.body).unwrap();
        assert_eq!(d, req);
        for n in 0..f.body.len() {
            assert!(decode_request::<DescribePluginRequest>(&f.body.slice(..n)).is_err());
        }
    }
}
