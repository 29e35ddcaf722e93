//! Output helpers shared by commands: the `--output` formats, aligned tables, and JSON.
//! Everything goes through a caller-supplied writer so commands can buffer stdout.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::Write;

use clap::ValueEnum;

/// `--output` of list/describe commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Format {
    /// Aligned columns (also accepted as `text`, the name `bench` and `consume` use).
    #[default]
    #[value(alias = "text")]
    Table,
    /// One JSON document.
    Json,
}

/// Bytes for a JSON line: as text (bytes that are not UTF-8 replaced by U+FFFD), and, only
/// when they are not UTF-8, their exact bytes in base64 (standard alphabet, padded), which
/// the line carries beside the text as `<field>_base64`.
fn json_bytes(b: &[u8]) -> (Cow<'_, str>, Option<String>) {
    use base64::Engine;
    let text = String::from_utf8_lossy(b);
    let exact =
        matches!(text, Cow::Owned(_)).then(|| base64::engine::general_purpose::STANDARD.encode(b));
    (text, exact)
}

/// A record's key, value and headers in a JSON line: as text, plus the exact bytes in
/// base64 of any that are not UTF-8 (`key_base64`, `value_base64`, `headers_base64`).
/// Flattened into the line's other fields.
#[derive(serde::Serialize)]
pub struct JsonPayload<'a> {
    key: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_base64: Option<String>,
    value: Cow<'a, str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_base64: Option<String>,
    headers: BTreeMap<&'a str, Cow<'a, str>>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    headers_base64: BTreeMap<&'a str, String>,
}

impl<'a> JsonPayload<'a> {
    /// The payload of one record.
    pub fn new(
        key: Option<&'a [u8]>,
        value: &'a [u8],
        headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> Self {
        let (key, key_base64) = match key.map(json_bytes) {
            Some((k, exact)) => (Some(k), exact),
            None => (None, None),
        };
        let (value, value_base64) = json_bytes(value);
        let mut p = JsonPayload {
            key,
            key_base64,
            value,
            value_base64,
            headers: BTreeMap::new(),
            headers_base64: BTreeMap::new(),
        };
        // A name given twice shows its last value, in both maps.
        for (name, v) in headers {
            let (text, exact) = json_bytes(v);
            p.headers.insert(name, text);
            match exact {
                Some(exact) => p.headers_base64.insert(name, exact),
                None => p.headers_base64.remove(name),
            };
        }
        p
    }
}

/// Writes rows as left-aligned columns separated by two spaces, with a header row.
pub fn table(out: &mut impl Write, headers: &[&str], rows: &[Vec<String>]) -> std::io::Result<()> {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line =
        |out: &mut dyn Write, cells: &mut dyn Iterator<Item = &str>| -> std::io::Result<()> {
            let mut s = String::new();
            for (i, c) in cells.enumerate() {
                if i > 0 {
                    s.push_str("  ");
                }
                s.push_str(c);
                let pad = widths
                    .get(i)
                    .copied()
                    .unwrap_or(0)
                    .saturating_sub(c.chars().count());
                s.extend(std::iter::repeat_n(' ', pad));
            }
            writeln!(out, "{}", s.trim_end())
        };
    line(out, &mut headers.iter().copied())?;
    for row in rows {
        line(out, &mut row.iter().map(String::as_str))?;
    }
    Ok(())
}

/// Writes `value` as pretty JSON and a newline.
pub fn json(out: &mut impl Write, value: &impl serde::Serialize) -> anyhow::Result<()> {
    serde_json::to_writer_pretty(&mut *out, value)?;
    writeln!(out)?;
    Ok(())
}

/// True when an I/O error means the reader of our output went away (`| head`).
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_aligned() {
        let mut out = Vec::new();
        table(
            &mut out,
            &["NAME", "PARTITIONS"],
            &[
                vec!["a".into(), "3".into()],
                vec!["longer".into(), "12".into()],
            ],
        )
        .unwrap();
        let s = String::from_utf8(out).unwrap();
        assert_eq!(s, "NAME    PARTITIONS\na       3\nlonger  12\n");
    }

    #[test]
    fn only_bytes_that_are_not_utf8_get_base64() {
        assert_eq!(json_bytes(b"caf\xc3\xa9"), ("café".into(), None));
        let (text, exact) = json_bytes(&[0xff, 0x00, b'a']);
        assert_eq!(text, "\u{fffd}\u{0}a");
        assert_eq!(exact.as_deref(), Some("/wBh"));
    }

    #[test]
    fn a_payload_carries_base64_fields_only_when_needed() {
        let text =
            serde_json::to_value(JsonPayload::new(Some(b"k"), b"v", [("h", &b"x"[..])])).unwrap();
        assert_eq!(
            text,
            serde_json::json!({"key": "k", "value": "v", "headers": {"h": "x"}})
        );
        let binary = serde_json::to_value(JsonPayload::new(
            Some(&[0x80]),
            &[0xfe, 0xff],
            [("h", &[0xc0][..]), ("t", &b"ok"[..])],
        ))
        .unwrap();
        assert_eq!(binary["key_base64"], "gA==");
        assert_eq!(binary["value_base64"], "/v8=");
        assert_eq!(binary["headers_base64"], serde_json::json!({"h": "wA=="}));
        assert_eq!(binary["headers"]["t"], "ok");
        // A repeated name: its last value, and no base64 left over from an earlier one.
        let repeated = serde_json::to_value(JsonPayload::new(
            None,
            b"v",
            [("h", &[0xc0][..]), ("h", &b"text"[..])],
        ))
        .unwrap();
        assert_eq!(repeated["headers"]["h"], "text");
        assert!(repeated.get("headers_base64").is_none(), "{repeated}");
    }
}
