//! The one-way rule of docs/architecture.md ("Modules and the one-way rule"): the library's
//! modules form an ordered list and a module may use only modules before it. This test reads
//! every `.rs` file under `node/src`, finds each path that names another top-level module
//! (`crate::m`, `use crate::{m, ...}` groups, `super::` chains that climb out of the module,
//! inline `mod` blocks included) and fails naming the file, the line and the upward edge.
//! Comments and string literals are ignored. It also checks that only `storage` names
//! `rocksdb`, that nothing below `raft` names `openraft`, and that every module is listed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The layers, lowest first. A module may import any module earlier in this list; nothing
/// later. `error`, `model`, `config` and `tasks` are the leaves every layer may use.
const LAYERS: &[&str] = &[
    "error",       // the one error-code table
    "model",       // pure logic: assertions, ids, lenses, authority, signatures
    "config",      // the config tree and its validation (names model types)
    "tasks",       // the tracker of background tasks
    "tls",         // certificates and TLS configs of the ports (rustls), the dev CA
    "metrics",     // the registry; each layer's collectors live beside its code
    "storage",     // the only module that names rocksdb
    "meta",        // the meta group's replicated state (no openraft)
    "shard",       // a data shard's replicated state (no openraft); its log commands carry meta's
    "raft",        // openraft: type config, adapters, log store, network, the group set
    "coordinator", // the request path over the groups: propose, forward, batch, read
    "cluster",     // identity, placement driver
    "rpc",         // gRPC server
    "api",         // client API and node admin
    "admin",       // cluster admin
    "dashboard",   // the web dashboard on 18188: embedded assets over the api and admin routers
    "bench",       // `stemedb bench`: a client of the HTTP API, uses no other module but tls
    "ctl",         // `stemedb cluster`: a client of the cluster admin API, uses no other module but tls
    "listener",    // the node's closable listeners
    "server",      // lifecycle: start-up and the shutdown order
    "backup_ctl",  // `stemedb backup`: the admin API for create; list, verify and restore offline
    "lib",         // the crate root re-exports the node's entry points
];

/// Edges allowed although they point upward. Keep empty; every entry needs a reason.
const ALLOWED_UPWARD: &[(&str, &str)] = &[];

/// Modules that must not name openraft (they hold state or logic independent of consensus).
const NO_OPENRAFT: &[&str] = &["error", "model", "config", "tasks", "metrics", "storage", "meta", "shard"];

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> =
        std::fs::read_dir(dir).expect("read src dir").map(|e| e.expect("dir entry").path()).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module path of a file relative to `src`: `raft/mod.rs` is `[raft]`, `raft/x.rs` is
/// `[raft, x]`, `server.rs` is `[server]`, `lib.rs` is `[]`.
fn module_path(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let last = parts.pop().expect("a file name");
    let stem = last.trim_end_matches(".rs").to_string();
    if stem != "mod" && stem != "lib" {
        parts.push(stem);
    }
    parts
}

/// The file's text with comments, string and char literals blanked (newlines kept).
fn code_only(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
        } else if c == 'r' && (next == Some('"') || next == Some('#')) && !prev_is_ident(&chars, i) {
            // A raw string r"..." or r#"..."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while chars.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if chars.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                if j >= chars.len() {
                    break;
                }
                if chars[j] == '"' && (0..hashes).all(|h| chars.get(j + 1 + h) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            for k in i..j.min(chars.len()) {
                out.push(blank(chars[k]));
            }
            i = j;
        } else if c == '"' {
            out.push(' ');
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < chars.len() {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
            out.push(' ');
            i += 1;
        } else if c == '\'' {
            // A char literal ('x', '\n', '\u{..}'), or a lifetime ('a).
            let end = if next == Some('\\') {
                (i + 2..chars.len()).find(|&k| chars[k] == '\'')
            } else if chars.get(i + 2) == Some(&'\'') {
                Some(i + 2)
            } else {
                None
            };
            match end {
                Some(end) => {
                    for _ in i..=end {
                        out.push(' ');
                    }
                    i = end + 1;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn prev_is_ident(chars: &[char], i: usize) -> bool {
    i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_')
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The identifier starting at `i` (after optional whitespace), and where it ends.
fn ident_at(chars: &[char], mut i: usize) -> (String, usize) {
    while i < chars.len() && chars[i].is_whitespace() {
        i += 1;
    }
    let start = i;
    while i < chars.len() && is_ident(chars[i]) {
        i += 1;
    }
    (chars[start..i].iter().collect(), i)
}

/// A reference from a file to a top-level module: the line and the module named.
struct Reference {
    line: usize,
    target: String,
}

/// Every top-level module the code names, resolving `crate::`, `crate::{...}` and `super::`.
fn references(code: &str, file_module: &[String]) -> Vec<Reference> {
    let chars: Vec<char> = code.chars().collect();
    let mut line_of = Vec::with_capacity(chars.len());
    let mut line = 1;
    for &c in &chars {
        line_of.push(line);
        if c == '\n' {
            line += 1;
        }
    }
    let mut refs = Vec::new();
    // Inline `mod name {` blocks: (name, brace depth inside them).
    let mut inline: Vec<usize> = Vec::new();
    let mut depth = 0usize;
    let mut pending_mod = false;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '{' {
            depth += 1;
            if pending_mod {
                inline.push(depth);
                pending_mod = false;
            }
            i += 1;
            continue;
        }
        if c == '}' {
            if inline.last() == Some(&depth) {
                inline.pop();
            }
            depth = depth.saturating_sub(1);
            i += 1;
            continue;
        }
        if c == ';' {
            pending_mod = false;
        }
        if !is_ident(c) || prev_is_ident(&chars, i) {
            i += 1;
            continue;
        }
        let (word, end) = ident_at(&chars, i);
        if word == "mod" {
            pending_mod = true;
            i = end;
            continue;
        }
        if word == "crate" && chars.get(end) == Some(&':') && chars.get(end + 1) == Some(&':') {
            let after = end + 2;
            let mut j = after;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            if chars.get(j) == Some(&'{') {
                // A group: the first identifier of each top-level item.
                let mut level = 0;
                let mut k = j;
                let mut expect_item = true;
                while k < chars.len() {
                    match chars[k] {
                        '{' => {
                            level += 1;
                            k += 1;
                        }
                        '}' => {
                            level -= 1;
                            k += 1;
                            if level == 0 {
                                break;
                            }
                        }
                        ',' if level == 1 => {
                            expect_item = true;
                            k += 1;
                        }
                        ch if level == 1 && expect_item && is_ident(ch) => {
                            let (name, e) = ident_at(&chars, k);
                            refs.push(Reference { line: line_of[k], target: name });
                            expect_item = false;
                            k = e;
                        }
                        _ => k += 1,
                    }
                }
                i = k;
            } else {
                let (name, e) = ident_at(&chars, j);
                refs.push(Reference { line: line_of[i], target: name });
                i = e;
            }
            continue;
        }
        if word == "super" {
            // Count the chain of `super::`, then resolve against the file and inline modules.
            let mut ups = 0;
            let mut k = i;
            loop {
                let (w, e) = ident_at(&chars, k);
                if w == "super" && chars.get(e) == Some(&':') && chars.get(e + 1) == Some(&':') {
                    ups += 1;
                    k = e + 2;
                } else {
                    break;
                }
            }
            let mut path: Vec<String> = file_module.to_vec();
            path.extend(inline.iter().map(|_| "<inline>".to_string()));
            if ups > path.len() {
                panic!("`super::` climbs above the crate at line {}", line_of[i]);
            }
            path.truncate(path.len() - ups);
            let (name, e) = ident_at(&chars, k);
            let target = match path.first() {
                Some(top) => top.clone(),
                None if !name.is_empty() => name,
                None => "lib".to_string(),
            };
            refs.push(Reference { line: line_of[i], target });
            i = e.max(i + 1);
            continue;
        }
        i = end;
    }
    refs
}

fn words(code: &str) -> impl Iterator<Item = (usize, &str)> {
    code.lines()
        .enumerate()
        .flat_map(|(n, line)| line.split(|c: char| !is_ident(c)).filter(|w| !w.is_empty()).map(move |w| (n + 1, w)))
}

#[test]
fn modules_import_only_downward() {
    let src = src_dir();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let rank: BTreeMap<&str, usize> = LAYERS.iter().enumerate().map(|(i, m)| (*m, i)).collect();
    let mut problems = Vec::new();
    let mut checked = 0;
    for file in &files {
        let rel = file.strip_prefix(&src).expect("under src");
        if rel == Path::new("main.rs") {
            continue; // the binary: it uses the library by its public paths
        }
        let module = module_path(rel);
        let top = module.first().cloned().unwrap_or_else(|| "lib".to_string());
        let Some(&own) = rank.get(top.as_str()) else {
            problems.push(format!("{}: module `{top}` is not in LAYERS; place it in the order", rel.display()));
            continue;
        };
        let text = std::fs::read_to_string(file).expect("read a source file");
        let code = code_only(&text);
        for reference in references(&code, &module) {
            if reference.target == top {
                continue;
            }
            let Some(&other) = rank.get(reference.target.as_str()) else {
                problems.push(format!(
                    "{}:{}: names `crate::{}`, which is not a module in LAYERS",
                    rel.display(),
                    reference.line,
                    reference.target
                ));
                continue;
            };
            if other > own && !ALLOWED_UPWARD.contains(&(top.as_str(), reference.target.as_str())) {
                problems.push(format!(
                    "{}:{}: upward import {top} -> {} ({} is below {} in the one-way order)",
                    rel.display(),
                    reference.line,
                    reference.target,
                    top,
                    reference.target
                ));
            }
        }
        for (line, word) in words(&code) {
            if word == "rocksdb" && top != "storage" {
                problems.push(format!("{}:{line}: names rocksdb outside `storage`", rel.display()));
            }
            if word == "openraft" && NO_OPENRAFT.contains(&top.as_str()) {
                problems.push(format!("{}:{line}: `{top}` names openraft", rel.display()));
            }
        }
        checked += 1;
    }
    assert!(checked > 50, "found only {checked} source files under {}", src.display());
    assert!(problems.is_empty(), "the one-way module rule is broken:\n{}", problems.join("\n"));
}

#[test]
fn the_checker_sees_every_form_of_import() {
    let module = vec!["raft".to_string(), "x".to_string()];
    let code = code_only(
        "use crate::server::run;\nuse crate::{model::id, api};\nfn f() { crate::admin::g(); }\n\
         // crate::rpc in a comment\nconst S: &str = \"crate::rpc\";\nmod tests { use super::super::shard; \
         use super::super::super::cluster::x; }\nuse super::keys;\n",
    );
    let found: Vec<(usize, String)> = references(&code, &module).into_iter().map(|r| (r.line, r.target)).collect();
    assert_eq!(
        found,
        vec![
            (1, "server".to_string()),
            (2, "model".to_string()),
            (2, "api".to_string()),
            (3, "admin".to_string()),
            (6, "raft".to_string()),
            (6, "cluster".to_string()),
            (7, "raft".to_string()),
        ]
    );
}
