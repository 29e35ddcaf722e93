//! `cluster.toml`: the brokers of a cluster run on one machine by `quiver cluster start` (see
//! `config/cluster.toml`). It names where the cluster keeps its data (`data_root`: broker N in
//! `<data_root>/broker-N`, the cluster CA in `<data_root>/tls/ca.pem`) and each broker's id
//! and listen address, with optional per-broker overrides of any `broker.toml` key. Unknown
//! keys, bad values, and duplicate ids or ports are refused with the file, line and key named.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::config::BrokerConfig;

/// A refused cluster file: where and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{file}{}{}: {reason}",
    line.map(|l| format!(":{l}")).unwrap_or_default(),
    if key.is_empty() { String::new() } else { format!(": key `{key}`") }
)]
pub struct ClusterFileError {
    /// The file.
    pub file: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// The key, e.g. `brokers[1].id` (empty when no one key is at fault).
    pub key: String,
    /// What is wrong and what to do.
    pub reason: String,
}

/// One broker of the file.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterBroker {
    /// Its broker id (unique).
    pub id: u32,
    /// Its QUIC listen address (unique port).
    pub listen: SocketAddr,
    /// Other `broker.toml` keys for this broker.
    pub overrides: toml::Table,
}

/// A checked cluster file.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterFile {
    /// Where the cluster's data lives.
    pub data_root: PathBuf,
    /// The brokers, in file order.
    pub brokers: Vec<ClusterBroker>,
}

/// The 1-based line of the `n`-th (0-based) line containing `needle` outside comments.
fn line_of(text: &str, needle: &str, n: usize) -> Option<usize> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| {
            let code = l.split('#').next().unwrap_or("");
            code.contains(needle)
        })
        .nth(n)
        .map(|(i, _)| i + 1)
}

/// The line where the `index`-th `[[brokers]]` table starts.
fn broker_line(text: &str, index: usize) -> Option<usize> {
    line_of(text, "[[brokers]]", index)
}

/// The line of `key = …` inside the `index`-th `[[brokers]]` table, else the table's own.
fn broker_key_line(text: &str, index: usize, key: &str) -> Option<usize> {
    let start = broker_line(text, index)?;
    text.lines()
        .enumerate()
        .skip(start)
        .take_while(|(_, l)| !l.trim_start().starts_with('['))
        .find(|(_, l)| {
            l.split('#')
                .next()
                .and_then(|code| code.split_once('='))
                .is_some_and(|(k, _)| k.trim() == key)
        })
        .map(|(i, _)| i + 1)
        .or(Some(start))
}

/// A `[[brokers]]` override `broker.toml` refused (`reason` names the key in backquotes):
/// at the key's own line, and without the keys the cluster file sets itself among those
/// it offers.
fn override_error(text: &str, file: &str, index: usize, reason: &str) -> ClusterFileError {
    let prefix = format!("brokers[{index}]");
    let bad = reason.split('`').nth(1);
    let reason = reason
        .replace("`broker_id`, ", "")
        .replace("`data_dir`, ", "")
        .replace(", `broker_id`", "")
        .replace(", `data_dir`", "");
    ClusterFileError {
        file: file.to_string(),
        line: bad.and_then(|k| broker_key_line(text, index, k)),
        key: bad.map_or(prefix.clone(), |k| format!("{prefix}.{k}")),
        reason,
    }
}

impl ClusterFile {
    /// Reads and checks a cluster file.
    pub fn load(path: &Path) -> Result<ClusterFile, ClusterFileError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ClusterFileError {
            file: file.clone(),
            line: None,
            key: String::new(),
            reason: format!("cannot read the file: {e}"),
        })?;
        Self::parse(&text, &file)
    }

    /// Checks cluster-file text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<ClusterFile, ClusterFileError> {
        let err = |line: Option<usize>, key: &str, reason: String| ClusterFileError {
            file: file.to_string(),
            line,
            key: key.to_string(),
            reason,
        };
        let table: toml::Table = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            err(line, "", e.message().to_string())
        })?;
        for key in table.keys() {
            if key != "data_root" && key != "brokers" {
                return Err(err(
                    line_of(text, key, 0),
                    key,
                    "unknown key; a cluster file has `data_root` and `[[brokers]]` tables".into(),
                ));
            }
        }
        let data_root = match table.get("data_root") {
            Some(toml::Value::String(s)) if !s.trim().is_empty() => PathBuf::from(s),
            Some(_) => {
                return Err(err(
                    line_of(text, "data_root", 0),
                    "data_root",
                    "must be a non-empty path string".into(),
                ))
            }
            None => {
                return Err(err(
                    None,
                    "data_root",
                    "missing: say where the cluster keeps its data, e.g. data_root = \"quiver-cluster\""
                        .into(),
                ))
            }
        };
        let Some(toml::Value::Array(list)) = table.get("brokers") else {
            return Err(err(
                line_of(text, "brokers", 0),
                "brokers",
                "list the brokers as [[brokers]] tables with `id` and `listen`".into(),
            ));
        };
        if list.is_empty() {
            return Err(err(None, "brokers", "at least one broker is needed".into()));
        }
        let mut brokers = Vec::with_capacity(list.len());
        let mut ids: BTreeMap<u32, usize> = BTreeMap::new();
        let mut ports: BTreeMap<u16, usize> = BTreeMap::new();
        for (i, v) in list.iter().enumerate() {
            let line = broker_line(text, i);
            let prefix = format!("brokers[{i}]");
            let toml::Value::Table(t) = v else {
                return Err(err(line, &prefix, "must be a [[brokers]] table".into()));
            };
            let id = match t.get("id") {
                Some(toml::Value::Integer(n)) if *n >= 0 && *n <= i64::from(u32::MAX) => *n as u32,
                Some(_) => {
                    return Err(err(
                        line,
                        &format!("{prefix}.id"),
                        "must be a broker id from 0 to 4294967295".into(),
                    ))
                }
                None => return Err(err(line, &format!("{prefix}.id"), "missing".into())),
            };
            let listen: SocketAddr = match t.get("listen") {
                Some(toml::Value::String(s)) => s.parse().map_err(|e| {
                    err(
                        line,
                        &format!("{prefix}.listen"),
                        format!("{s:?} is not HOST:PORT with an IP address: {e}"),
                    )
                })?,
                _ => {
                    // A misspelt `listen` is named as the unknown key it is.
                    let mut others = t.clone();
                    others.remove("id");
                    let probe = ClusterBroker {
                        id,
                        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
                        overrides: others,
                    };
                    Self::broker_config_of(&data_root, &probe)
                        .map_err(|reason| override_error(text, file, i, &reason))?;
                    return Err(err(
                        line,
                        &format!("{prefix}.listen"),
                        "missing: give the broker's address, e.g. listen = \"127.0.0.1:7401\""
                            .into(),
                    ));
                }
            };
            if let Some(first) = ids.insert(id, i) {
                return Err(err(
                    line,
                    &format!("{prefix}.id"),
                    format!("broker id {id} is also brokers[{first}]'s; ids must be unique"),
                ));
            }
            if let Some(first) = ports.insert(listen.port(), i) {
                return Err(err(
                    line,
                    &format!("{prefix}.listen"),
                    format!(
                        "port {} is also brokers[{first}]'s; each broker needs its own port",
                        listen.port()
                    ),
                ));
            }
            let mut overrides = t.clone();
            overrides.remove("id");
            overrides.remove("listen");
            for reserved in ["broker_id", "data_dir"] {
                if overrides.contains_key(reserved) {
                    return Err(err(
                        line,
                        &format!("{prefix}.{reserved}"),
                        format!(
                            "set by the cluster file (`id`, and {}/broker-{id}); remove it",
                            data_root.display()
                        ),
                    ));
                }
            }
            let broker = ClusterBroker {
                id,
                listen,
                overrides,
            };
            // Every override must be a broker.toml key with a good value.
            Self::broker_config_of(&data_root, &broker)
                .map_err(|reason| override_error(text, file, i, &reason))?;
            brokers.push(broker);
        }
        Ok(ClusterFile { data_root, brokers })
    }

    /// The data directory of broker `id`.
    pub fn broker_dir(&self, id: u32) -> PathBuf {
        self.data_root.join(format!("broker-{id}"))
    }

    /// The cluster CA certificate clients trust.
    pub fn ca_path(&self) -> PathBuf {
        self.data_root.join("tls").join("ca.pem")
    }

    /// The full broker config of `broker`: its overrides, id, listen address and data
    /// directory.
    pub fn broker_config(&self, broker: &ClusterBroker) -> Result<BrokerConfig, String> {
        Self::broker_config_of(&self.data_root, broker)
    }

    fn broker_config_of(data_root: &Path, broker: &ClusterBroker) -> Result<BrokerConfig, String> {
        let mut t = broker.overrides.clone();
        t.insert(
            "broker_id".into(),
            toml::Value::Integer(i64::from(broker.id)),
        );
        t.insert(
            "listen".into(),
            toml::Value::String(broker.listen.to_string()),
        );
        t.insert(
            "data_dir".into(),
            toml::Value::String(
                data_root
                    .join(format!("broker-{}", broker.id))
                    .display()
                    .to_string(),
            ),
        );
        let cfg: BrokerConfig = toml::Value::Table(t)
            .try_into()
            .map_err(|e: toml::de::Error| e.message().to_string())?;
        cfg.validate(&format!("broker {}", broker.id))
            .map_err(|e| e.to_string())?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const THREE: &str = "data_root = \"qc\"\n\n[[brokers]]\nid = 1\nlisten = \"127.0.0.1:7401\"\n\n[[brokers]]\nid = 2\nlisten = \"127.0.0.1:7402\"\n\n[[brokers]]\nid = 3\nlisten = \"127.0.0.1:7403\"\nshutdown_timeout_ms = 5000\n";

    fn refused(text: &str) -> ClusterFileError {
        ClusterFile::parse(text, "c.toml").unwrap_err()
    }

    #[test]
    fn the_documented_sample_parses_into_three_brokers() {
        let f = ClusterFile::parse(include_str!("../../../config/cluster.toml"), "cluster.toml")
            .unwrap();
        assert_eq!(f.brokers.len(), 3);
        assert_eq!(f.data_root, PathBuf::from("quiver-cluster"));
        assert_eq!(f.ca_path(), PathBuf::from("quiver-cluster/tls/ca.pem"));
    }

    #[test]
    fn brokers_get_their_id_listen_data_dir_and_overrides() {
        let f = ClusterFile::parse(THREE, "c.toml").unwrap();
        let ids: Vec<u32> = f.brokers.iter().map(|b| b.id).collect();
        assert_eq!(ids, [1, 2, 3]);
        let c = f.broker_config(&f.brokers[2]).unwrap();
        assert_eq!(c.broker_id, 3);
        assert_eq!(c.listen, "127.0.0.1:7403");
        assert_eq!(c.data_dir, PathBuf::from("qc/broker-3"));
        assert_eq!(c.shutdown_timeout_ms, 5000);
        assert_eq!(f.broker_dir(2), PathBuf::from("qc/broker-2"));
    }

    #[test]
    fn unknown_keys_duplicates_and_bad_values_name_file_line_and_key() {
        let e = refused(&format!("colour = 1\n{THREE}"));
        assert_eq!((e.line, e.key.as_str()), (Some(1), "colour"), "{e}");
        let e = refused(&THREE.replace("id = 2", "id = 1"));
        assert_eq!((e.line, e.key.as_str()), (Some(7), "brokers[1].id"), "{e}");
        assert!(e.reason.contains("unique"), "{e}");
        let e = refused(&THREE.replace("7402", "7401"));
        assert_eq!(e.key, "brokers[1].listen", "{e}");
        assert!(e.reason.contains("port 7401"), "{e}");
        // A misspelt override: at its own line, and the keys offered leave out those the
        // cluster file sets itself.
        let e = refused(&THREE.replace("shutdown_timeout_ms = 5000", "shutdown_timout_ms = 5"));
        assert_eq!(e.line, Some(14), "{e}");
        assert_eq!(e.key, "brokers[2].shutdown_timout_ms", "{e}");
        assert!(
            e.reason.contains("shutdown_timeout_ms")
                && !e.reason.contains("`broker_id`")
                && !e.reason.contains("`data_dir`"),
            "{e}"
        );
        // A misspelt `listen` is named as the unknown key, not reported missing.
        let e =
            refused(&THREE.replace("listen = \"127.0.0.1:7403\"", "listn = \"127.0.0.1:7403\""));
        assert_eq!(
            (e.line, e.key.as_str()),
            (Some(13), "brokers[2].listn"),
            "{e}"
        );
        let e = refused(&THREE.replace("listen = \"127.0.0.1:7403\"", "listen = \"nowhere\""));
        assert_eq!(e.key, "brokers[2].listen", "{e}");
        let e = refused(&THREE.replace("id = 3", "id = 3\ndata_dir = \"x\""));
        assert_eq!(e.key, "brokers[2].data_dir", "{e}");
        let e = refused("[[brokers]]\nid = 1\nlisten = \"127.0.0.1:1\"\n");
        assert_eq!(e.key, "data_root", "{e}");
        assert!(e.to_string().starts_with("c.toml"), "{e}");
    }
}
