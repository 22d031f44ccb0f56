//! driver/openapi.yaml describes every route of the router (api.rs), with its methods.
//! Read from the sources: the router's `.route("PATH", get(..).post(..))` calls against the
//! `paths:` blocks of the document. No root needed.

use std::collections::BTreeMap;

fn src(rel: &str) -> String {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Router path -> methods, from api.rs.
fn routes() -> BTreeMap<String, Vec<String>> {
    let api = src("src/api.rs");
    let mut out = BTreeMap::new();
    let mut rest = api.as_str();
    while let Some(i) = rest.find(".route(") {
        rest = &rest[i + ".route(".len()..];
        let q1 = rest.find('"').expect("route path quote");
        let q2 = rest[q1 + 1..].find('"').expect("route path end") + q1 + 1;
        let path = rest[q1 + 1..q2].to_string();
        // The handler expression ends at the route call's closing parenthesis.
        let mut depth = 1;
        let mut end = q2;
        for (j, c) in rest[q2..].char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        end = q2 + j;
                        break;
                    }
                }
                _ => {}
            }
        }
        let handlers = &rest[q2..end];
        let mut methods = Vec::new();
        for m in ["get", "post", "put", "patch", "delete"] {
            if handlers.contains(&format!("{m}(")) {
                methods.push(m.to_string());
            }
        }
        out.insert(path, methods);
    }
    out
}

/// Path -> methods, from the `paths:` section (two-space path keys, four-space methods).
fn documented() -> BTreeMap<String, Vec<String>> {
    let doc = src("openapi.yaml");
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut in_paths = false;
    let mut cur: Option<String> = None;
    for line in doc.lines() {
        if !line.starts_with(' ') {
            in_paths = line.trim_end() == "paths:";
            cur = None;
            continue;
        }
        if !in_paths {
            continue;
        }
        if let Some(k) = line.strip_prefix("  /") {
            let k = k
                .trim_end()
                .strip_suffix(':')
                .expect("path key ends with ':'");
            cur = Some(format!("/{k}"));
            out.entry(format!("/{k}")).or_default();
        } else if let (Some(p), Some(k)) = (&cur, line.strip_prefix("    ")) {
            if let Some(m) = k.strip_suffix(':') {
                if ["get", "post", "put", "patch", "delete"].contains(&m) {
                    out.entry(p.clone()).or_default().push(m.to_string());
                }
            }
        }
    }
    out
}

#[test]
fn every_router_path_and_method_is_in_openapi() {
    let r = routes();
    assert!(r.len() >= 10, "router parse found only {r:?}");
    assert!(r.contains_key("/v1/images/pull/{id}"), "{r:?}");
    let d = documented();
    let mut missing = Vec::new();
    for (path, methods) in &r {
        match d.get(path) {
            None => missing.push(format!("{path} (all of {methods:?})")),
            Some(dm) => {
                for m in methods {
                    if !dm.contains(m) {
                        missing.push(format!("{m} {path}"));
                    }
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "not in driver/openapi.yaml: {missing:?}"
    );
    // And nothing documented that the router does not serve.
    let stale: Vec<&String> = d.keys().filter(|p| !r.contains_key(*p)).collect();
    assert!(stale.is_empty(), "documented but not routed: {stale:?}");
}
