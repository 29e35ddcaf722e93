//! Plugin bundles: a folder or `.tar.gz` holding `plugin.toml` and the plugin's code.
//!
//! This module owns reading a bundle (from a folder, a `.tar.gz` file or archive bytes),
//! validating its manifest once at load (unknown keys, name, semver, kind, runtime, entry,
//! limits; errors name the file and the key), its content digest, and the canonical archive
//! the broker stores as one blob. It never executes plugin code. Unpacking is capped
//! (file count, file size, total size) and refuses absolute paths, `..`, links and devices.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::BundleError;

/// Name of the manifest at the root of every bundle.
pub const MANIFEST_FILE: &str = "plugin.toml";
/// Most files a bundle may hold (archive entries, folders included).
pub const MAX_FILES: usize = 1024;
/// Most bytes all files of a bundle may hold together (after decompression).
pub const MAX_TOTAL_BYTES: u64 = 64 * 1024 * 1024;
/// Bytes reserved up front for one archive entry, whatever its header claims.
const INITIAL_ENTRY_CAPACITY: u64 = 64 * 1024;

/// What a plugin does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Transforms batches of records (map, filter, flat-map, stateful).
    Processor,
    /// Picks the partition of a record at produce time.
    Partitioner,
}

/// How a plugin is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    /// A Lua 5.4 script run by mlua in a sandboxed state.
    Lua,
    /// A WASM component (world `quiver:plugin/processor` or `/partitioner`) run by wasmtime.
    Wasm,
}

/// Per-call limits a plugin asks for; the host's [`crate::HostLimits`] are the ceiling.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestLimits {
    /// CPU time per call, milliseconds.
    pub cpu_ms: Option<u64>,
    /// Memory, MiB.
    pub memory_mb: Option<u64>,
}

/// The parsed and validated `plugin.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// `[a-z0-9-]+`.
    pub name: String,
    /// Semantic version.
    pub version: String,
    /// Processor or partitioner.
    pub kind: Kind,
    /// Lua or WASM.
    pub runtime: Runtime,
    /// Path of the code inside the bundle.
    pub entry: String,
    /// One line for people.
    #[serde(default)]
    pub description: String,
    /// Default configuration (string values).
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// Requested limits.
    #[serde(default)]
    pub limits: ManifestLimits,
}

/// A loaded, validated bundle: its manifest and all its files in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    manifest: Manifest,
    files: BTreeMap<String, Vec<u8>>,
}

impl Bundle {
    /// Load a bundle from a folder or a `.tar.gz` / `.tgz` file and validate it.
    pub fn load(path: impl AsRef<Path>) -> Result<Bundle, BundleError> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|source| BundleError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let files = if meta.is_dir() {
            read_folder(path)?
        } else {
            let f = std::fs::File::open(path).map_err(|source| BundleError::Io {
                path: path.to_path_buf(),
                source,
            })?;
            read_archive(f, path)?
        };
        Bundle::from_files(files, path)
    }

    /// Rebuild a bundle from the bytes of [`Bundle::to_archive_bytes`] (or any `.tar.gz`).
    pub fn from_archive_bytes(bytes: &[u8]) -> Result<Bundle, BundleError> {
        let origin = Path::new("<archive>");
        Bundle::from_files(read_archive(bytes, origin)?, origin)
    }

    /// Build a bundle from in-memory files (relative `/`-separated paths), e.g. in tests.
    pub fn from_files(
        files: BTreeMap<String, Vec<u8>>,
        origin: &Path,
    ) -> Result<Bundle, BundleError> {
        let file = origin.join(MANIFEST_FILE);
        let text = files
            .get(MANIFEST_FILE)
            .ok_or_else(|| BundleError::Archive {
                path: origin.to_path_buf(),
                message: format!("no {MANIFEST_FILE} at the root of the bundle"),
            })?;
        let text = std::str::from_utf8(text).map_err(|_| BundleError::Manifest {
            file: file.clone(),
            message: "not UTF-8".into(),
        })?;
        let manifest: Manifest = toml::from_str(text).map_err(|e| BundleError::Manifest {
            file: file.clone(),
            message: e.to_string().trim_end().to_string(),
        })?;
        validate(&manifest, &files, &file)?;
        Ok(Bundle { manifest, files })
    }

    /// The validated manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// `name@version`, how plugins are referred to everywhere.
    pub fn id(&self) -> String {
        format!("{}@{}", self.manifest.name, self.manifest.version)
    }

    /// The bytes of a file of the bundle.
    pub fn file(&self, path: &str) -> Option<&[u8]> {
        self.files.get(path).map(Vec::as_slice)
    }

    /// Paths of all files, sorted.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.files.keys().map(String::as_str)
    }

    /// The entry file's bytes (validated to exist at load).
    pub fn entry_bytes(&self) -> &[u8] {
        self.file(&self.manifest.entry).unwrap_or_default()
    }

    /// SHA-256 (lowercase hex) over the canonical encoding of the bundle's files: for each
    /// file in path order, `u64 path length, path, u64 content length, content` (big-endian
    /// lengths). Same files, same digest, whatever the folder or archive they came from.
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        for (path, data) in &self.files {
            h.update((path.len() as u64).to_be_bytes());
            h.update(path.as_bytes());
            h.update((data.len() as u64).to_be_bytes());
            h.update(data);
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// A deterministic `.tar.gz` of the bundle (sorted paths, zero mtimes and owners), for
    /// storing as one blob and shipping to other nodes.
    pub fn to_archive_bytes(&self) -> Result<Vec<u8>, BundleError> {
        let enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        let mut tar = tar::Builder::new(enc);
        let err = |e: std::io::Error| BundleError::Io {
            path: PathBuf::from("<archive>"),
            source: e,
        };
        for (path, data) in &self.files {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_mtime(0);
            header.set_uid(0);
            header.set_gid(0);
            header.set_entry_type(tar::EntryType::Regular);
            tar.append_data(&mut header, path, data.as_slice())
                .map_err(err)?;
        }
        tar.into_inner().and_then(|gz| gz.finish()).map_err(err)
    }
}

fn validate(
    m: &Manifest,
    files: &BTreeMap<String, Vec<u8>>,
    file: &Path,
) -> Result<(), BundleError> {
    let invalid = |key: &str, message: String| BundleError::Invalid {
        file: file.to_path_buf(),
        key: key.into(),
        message,
    };
    if m.name.is_empty()
        || !m
            .name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(invalid(
            "name",
            format!("{:?} must match [a-z0-9-]+", m.name),
        ));
    }
    if let Err(e) = semver::Version::parse(&m.version) {
        return Err(invalid(
            "version",
            format!("{:?} is not a semantic version: {e}", m.version),
        ));
    }
    let entry = normalize(&m.entry).ok_or_else(|| {
        invalid(
            "entry",
            format!("{:?} is not a relative path inside the bundle", m.entry),
        )
    })?;
    if entry != m.entry || !files.contains_key(&entry) {
        // A Rust→WASM bundle's module is built, not checked in: say how to build it.
        let hint = if entry.ends_with(".wasm") {
            " (a Rust→WASM bundle's module is built, not checked in: build it into the bundle folder first; for the examples, run scripts/build-wasm-examples.sh)"
        } else {
            ""
        };
        return Err(invalid(
            "entry",
            format!("{:?} is not a file of the bundle{hint}", m.entry),
        ));
    }
    if m.limits.cpu_ms == Some(0) {
        return Err(invalid("limits.cpu_ms", "must be greater than 0".into()));
    }
    if m.limits.memory_mb == Some(0) {
        return Err(invalid("limits.memory_mb", "must be greater than 0".into()));
    }
    Ok(())
}

/// A safe relative `/`-separated path, or `None` (absolute, `..`, empty, prefix).
fn normalize(p: &str) -> Option<String> {
    let mut parts = Vec::new();
    for c in Path::new(p).components() {
        match c {
            Component::Normal(s) => parts.push(s.to_str()?.to_string()),
            Component::CurDir => {}
            _ => return None,
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

struct Caps {
    count: usize,
    total: u64,
}

impl Caps {
    fn add(&mut self, size: u64, origin: &Path) -> Result<(), BundleError> {
        self.count += 1;
        self.total = self.total.saturating_add(size);
        if self.count > MAX_FILES {
            return Err(archive_err(origin, format!("more than {MAX_FILES} files")));
        }
        if self.total > MAX_TOTAL_BYTES {
            return Err(archive_err(
                origin,
                format!("more than {MAX_TOTAL_BYTES} bytes of files"),
            ));
        }
        Ok(())
    }
}

fn archive_err(origin: &Path, message: String) -> BundleError {
    BundleError::Archive {
        path: origin.to_path_buf(),
        message,
    }
}

/// Every regular file under `root`, skipping dot-files and `target/` build folders.
fn read_folder(root: &Path) -> Result<BTreeMap<String, Vec<u8>>, BundleError> {
    let mut files = BTreeMap::new();
    let mut caps = Caps { count: 0, total: 0 };
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, prefix)) = stack.pop() {
        let io = |source| BundleError::Io {
            path: dir.clone(),
            source,
        };
        for entry in std::fs::read_dir(&dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                return Err(archive_err(&entry.path(), "file name is not UTF-8".into()));
            };
            if name.starts_with('.') || (name == "target" && prefix.is_empty()) {
                continue;
            }
            let rel = format!("{prefix}{name}");
            let ft = entry.file_type().map_err(io)?;
            if ft.is_dir() {
                stack.push((entry.path(), format!("{rel}/")));
            } else if ft.is_file() {
                let data = std::fs::read(entry.path()).map_err(|source| BundleError::Io {
                    path: entry.path(),
                    source,
                })?;
                caps.add(data.len() as u64, root)?;
                files.insert(rel, data);
            } else {
                return Err(archive_err(
                    &entry.path(),
                    "links and special files are not allowed in a bundle".into(),
                ));
            }
        }
    }
    Ok(files)
}

/// The regular files of a `.tar.gz`; a single top-level folder holding `plugin.toml` is
/// stripped so that both `tar czf b.tgz -C dir .` and `tar czf b.tgz dir` work.
fn read_archive(r: impl Read, origin: &Path) -> Result<BTreeMap<String, Vec<u8>>, BundleError> {
    let gz = flate2::read::GzDecoder::new(r);
    let mut ar = tar::Archive::new(gz);
    let io = |source| BundleError::Io {
        path: origin.to_path_buf(),
        source,
    };
    let mut files = BTreeMap::new();
    let mut caps = Caps { count: 0, total: 0 };
    for entry in ar.entries().map_err(io)? {
        let mut entry = entry.map_err(io)?;
        let kind = entry.header().entry_type();
        let raw = entry.path_bytes().into_owned();
        let raw = String::from_utf8(raw)
            .map_err(|_| archive_err(origin, "entry path is not UTF-8".into()))?;
        if kind.is_dir() {
            // Counted too, so an archive of endless empty folders is refused early.
            caps.add(0, origin)?;
            continue;
        }
        if !(kind.is_file() || kind == tar::EntryType::Continuous) {
            return Err(archive_err(
                origin,
                format!("{raw:?}: links and special files are not allowed in a bundle"),
            ));
        }
        let path = normalize(&raw)
            .ok_or_else(|| archive_err(origin, format!("{raw:?}: unsafe path in archive")))?;
        let size = entry.header().size().map_err(io)?;
        caps.add(size, origin)?;
        // The size is the archive's claim: reserve a little and let the read grow the buffer,
        // so a header claiming 64 MiB in front of a few bytes allocates only what is there.
        let mut data = Vec::with_capacity(size.min(INITIAL_ENTRY_CAPACITY) as usize);
        (&mut entry)
            .take(MAX_TOTAL_BYTES + 1)
            .read_to_end(&mut data)
            .map_err(io)?;
        if data.len() as u64 != size {
            return Err(archive_err(origin, format!("{raw:?}: size mismatch")));
        }
        if files.insert(path.clone(), data).is_some() {
            return Err(archive_err(origin, format!("{path:?}: duplicate entry")));
        }
    }
    if !files.contains_key(MANIFEST_FILE) && files.keys().any(|p| p.ends_with("/plugin.toml")) {
        let tops: std::collections::BTreeSet<&str> = files
            .keys()
            .filter_map(|p| p.split_once('/').map(|(t, _)| t))
            .collect();
        if tops.len() == 1 && files.keys().all(|p| p.contains('/')) {
            let top = format!("{}/", tops.iter().next().copied().unwrap_or_default());
            files = files
                .into_iter()
                .map(|(p, d)| (p[top.len()..].to_string(), d))
                .collect();
        }
    }
    files.retain(|p, _| !skipped(p));
    Ok(files)
}

/// Files a bundle never includes, whether read from a folder or an archive: dot-files and
/// dot-folders anywhere, and a `target/` build folder at the root.
fn skipped(path: &str) -> bool {
    path.starts_with("target/") || path.split('/').any(|c| c.starts_with('.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(manifest: &str) -> BTreeMap<String, Vec<u8>> {
        let mut f = BTreeMap::new();
        f.insert(MANIFEST_FILE.to_string(), manifest.as_bytes().to_vec());
        f.insert(
            "grep.lua".to_string(),
            b"function process(r) return r end".to_vec(),
        );
        f
    }

    const GOOD: &str = r#"
name = "grep"
version = "1.0.0"
kind = "processor"
runtime = "lua"
entry = "grep.lua"
[config]
pattern = "ERROR"
[limits]
cpu_ms = 50
"#;

    #[test]
    fn a_valid_manifest_loads() {
        let b = Bundle::from_files(files(GOOD), Path::new("grep")).unwrap();
        assert_eq!(b.id(), "grep@1.0.0");
        assert_eq!(b.manifest().config["pattern"], "ERROR");
        assert_eq!(b.manifest().limits.cpu_ms, Some(50));
    }

    #[test]
    fn errors_name_the_file_and_the_key() {
        let cases = [
            (GOOD.replace("kind", "knd"), "knd"),
            (GOOD.replace("\"grep\"", "\"Grep!\""), "`name`"),
            (GOOD.replace("1.0.0", "1.0"), "`version`"),
            (GOOD.replace("\"grep.lua\"", "\"../x.lua\""), "`entry`"),
            (GOOD.replace("\"grep.lua\"", "\"missing.lua\""), "`entry`"),
            (GOOD.replace("cpu_ms = 50", "cpu_ms = 0"), "`limits.cpu_ms`"),
            (GOOD.replace("cpu_ms = 50", "cpu = 1"), "cpu"),
            (GOOD.replace("\"processor\"", "\"mapper\""), "mapper"),
        ];
        for (text, needle) in cases {
            let err = Bundle::from_files(files(&text), Path::new("b")).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains("plugin.toml"), "{msg}");
            assert!(msg.contains(needle), "{needle} not in {msg}");
        }
    }

    #[test]
    fn an_entry_claiming_more_bytes_than_it_has_is_refused() {
        // A tar header claiming 60 MiB, followed by 10 bytes and the end of the stream.
        let mut header = tar::Header::new_gnu();
        header.set_path("plugin.toml").unwrap();
        header.set_size(60 * 1024 * 1024);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        let mut raw = header.as_bytes().to_vec();
        raw.extend_from_slice(b"name = \"x\"");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut gz, &raw).unwrap();
        let bytes = gz.finish().unwrap();
        assert!(Bundle::from_archive_bytes(&bytes).is_err());
    }

    #[test]
    fn archive_round_trip_keeps_the_digest() {
        let b = Bundle::from_files(files(GOOD), Path::new("grep")).unwrap();
        let bytes = b.to_archive_bytes().unwrap();
        let b2 = Bundle::from_archive_bytes(&bytes).unwrap();
        assert_eq!(b, b2);
        assert_eq!(b.digest(), b2.digest());
        assert_eq!(
            bytes,
            b2.to_archive_bytes().unwrap(),
            "archives are deterministic"
        );
        let mut other = files(GOOD);
        other.insert("README.md".into(), b"x".to_vec());
        let b3 = Bundle::from_files(other, Path::new("grep")).unwrap();
        assert_ne!(b.digest(), b3.digest());
    }

    #[test]
    fn folders_and_tar_gz_files_load_to_the_same_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("grep");
        std::fs::create_dir_all(folder.join("target")).unwrap();
        for (p, d) in files(GOOD) {
            std::fs::write(folder.join(p), d).unwrap();
        }
        std::fs::write(folder.join(".hidden"), b"skipped").unwrap();
        std::fs::write(folder.join("target/junk"), b"skipped").unwrap();
        let from_folder = Bundle::load(&folder).unwrap();
        assert_eq!(
            from_folder.paths().collect::<Vec<_>>(),
            ["grep.lua", "plugin.toml"]
        );

        // `tar czf grep.tgz grep`: a single top-level folder is stripped.
        let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::fast(),
        ));
        tar.append_dir_all("grep", &folder).unwrap();
        let tgz = dir.path().join("grep.tar.gz");
        std::fs::write(&tgz, tar.into_inner().unwrap().finish().unwrap()).unwrap();
        let from_tgz = Bundle::load(&tgz).unwrap();
        assert_eq!(from_tgz.digest(), from_folder.digest());

        let err = Bundle::load(dir.path().join("missing")).unwrap_err();
        assert!(matches!(err, BundleError::Io { .. }), "{err}");
    }

    #[test]
    fn archives_with_traversal_or_links_are_refused() {
        fn raw_tar(name: &[u8], kind: tar::EntryType) -> Vec<u8> {
            let mut header = tar::Header::new_old();
            header.as_old_mut().name[..name.len()].copy_from_slice(name);
            header.set_size(1);
            header.set_mode(0o644);
            header.set_entry_type(kind);
            header.set_cksum();
            let mut out = header.as_bytes().to_vec();
            out.extend_from_slice(&[b'x'; 1]);
            out.resize(1024, 0);
            out.extend_from_slice(&[0; 1024]);
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            std::io::Write::write_all(&mut gz, &out).unwrap();
            gz.finish().unwrap()
        }
        for (name, kind) in [
            (&b"../evil"[..], tar::EntryType::Regular),
            (b"/etc/evil", tar::EntryType::Regular),
            (b"link", tar::EntryType::Symlink),
        ] {
            let err = Bundle::from_archive_bytes(&raw_tar(name, kind)).unwrap_err();
            assert!(matches!(err, BundleError::Archive { .. }), "{err}");
        }
    }
}
