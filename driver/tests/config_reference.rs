//! docs/configuration.md is the operator's configuration reference; this test keeps it honest
//! against the `Config` struct both ways:
//! - every key `Config::default()` has is documented;
//! - every documented key, set to the value the table shows, is accepted by `Config::load` and
//!   survives the round trip (an unknown or misspelt key would be silently dropped by serde).
//!
//! Table rows look like: | `key` | `TOML value` | meaning |, under a heading `### [section]`
//! (or `### top level`).

use std::collections::BTreeSet;
use std::path::Path;

use driver::config::Config;
use serde_json::Value;

const DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/configuration.md");

struct Entry {
    key: String,
    value: String,
}

fn documented() -> Vec<Entry> {
    let text = std::fs::read_to_string(DOC).expect("docs/configuration.md");
    let mut section: Option<String> = None;
    let mut out = Vec::new();
    for line in text.lines() {
        if let Some(h) = line.strip_prefix("### ") {
            let h = h.trim();
            section = if h == "top level" {
                Some(String::new())
            } else {
                h.strip_prefix('[')
                    .and_then(|s| s.strip_suffix(']'))
                    .map(str::to_string)
            };
            continue;
        }
        let Some(sec) = &section else { continue };
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // "", key, value, meaning, ""
        if cells.len() < 5 || !cells[1].starts_with('`') {
            continue;
        }
        let key = cells[1].trim_matches('`');
        let value = cells[2].trim_matches('`');
        let key = if sec.is_empty() {
            key.to_string()
        } else {
            format!("{sec}.{key}")
        };
        out.push(Entry {
            key,
            value: value.to_string(),
        });
    }
    out
}

/// Dotted leaf keys; a null (an unset Option) is a leaf.
fn leaves(v: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                leaves(v, &p, out);
            }
        }
        _ => {
            out.insert(prefix.to_string());
        }
    }
}

fn lookup<'a>(v: &'a Value, dotted: &str) -> Option<&'a Value> {
    dotted.split('.').try_fold(v, |v, k| v.get(k))
}

#[test]
fn every_default_key_is_documented() {
    let docs: BTreeSet<String> = documented().into_iter().map(|e| e.key).collect();
    assert!(!docs.is_empty(), "no keys found in {DOC}");
    let mut keys = BTreeSet::new();
    leaves(
        &serde_json::to_value(Config::default()).unwrap(),
        "",
        &mut keys,
    );
    // An optional section (null by default) is documented by its keys instead.
    let missing: Vec<&String> = keys
        .iter()
        .filter(|k| !docs.contains(*k) && !docs.iter().any(|d| d.starts_with(&format!("{k}."))))
        .collect();
    assert!(
        missing.is_empty(),
        "keys of Config missing from docs/configuration.md: {missing:?}"
    );
}

#[test]
fn every_documented_key_is_accepted() {
    let entries = documented();
    // One TOML file holding every documented key with its documented value.
    let mut top = String::new();
    let mut sections: std::collections::BTreeMap<String, String> = Default::default();
    for e in &entries {
        match e.key.rsplit_once('.') {
            None => top.push_str(&format!("{} = {}\n", e.key, e.value)),
            Some((sec, k)) => sections
                .entry(sec.to_string())
                .or_default()
                .push_str(&format!("{k} = {}\n", e.value)),
        }
    }
    for (sec, body) in &sections {
        top.push_str(&format!("\n[{sec}]\n{body}"));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fatbox.toml");
    std::fs::write(&path, &top).unwrap();
    let cfg = Config::load(Some(Path::new(&path)))
        .unwrap_or_else(|e| panic!("documented values do not load: {e}\n---\n{top}"));
    let back = serde_json::to_value(cfg).unwrap();
    let dropped: Vec<&str> = entries
        .iter()
        .filter(|e| lookup(&back, &e.key).is_none_or(Value::is_null))
        .map(|e| e.key.as_str())
        .collect();
    assert!(
        dropped.is_empty(),
        "documented keys that Config ignores (misspelt or removed): {dropped:?}"
    );
}

#[test]
fn misspelt_key_in_the_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fatbox.toml");
    std::fs::write(&path, "state_dri = \"/x\"\n[procfs]\nenabeld = false\n").unwrap();
    let err = Config::load(Some(&path)).unwrap_err().to_string();
    assert!(
        err.contains("`state_dri`") && err.contains("`procfs.enabeld`"),
        "{err}"
    );
}
