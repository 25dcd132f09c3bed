//! The library's layers, enforced: every `crate::<folder>` path in `modules/course/<folder>/**.rs`
//! must name its own folder or one that the **Layers** table in ARCHITECTURE.md allows. A failure
//! names the file, the line and the import. Comments are not imports and are skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The table under `## Layers` in ARCHITECTURE.md: rows `| \`folder\` | \`a\`, \`b\` | ... |`.
fn layer_table(md: &str) -> Result<BTreeMap<String, BTreeSet<String>>, String> {
    let start = md.find("\n## Layers").ok_or("ARCHITECTURE.md has no `## Layers` section")?;
    let section = &md[start + 1..];
    let section = &section[..section[3..].find("\n## ").map(|i| i + 3).unwrap_or(section.len())];
    let mut table = BTreeMap::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let folder = cells[1].trim_matches('`').to_string();
        let allowed = cells[2]
            .split(',')
            .map(|c| c.trim().trim_matches('`').to_string())
            .filter(|c| !c.is_empty() && c != "—" && c != "-")
            .collect();
        table.insert(folder, allowed);
    }
    if table.is_empty() {
        return Err("the `## Layers` section of ARCHITECTURE.md has no `| \\`folder\\` | ... |` rows".into());
    }
    Ok(table)
}

/// Source with comments blanked out (line structure kept), so doc links are not counted.
fn strip_comments(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let (mut i, mut in_str) = (0, false);
    while i < b.len() {
        let c = b[i] as char;
        if in_str {
            if c == '\\' && i + 1 < b.len() {
                out.push(' ');
                out.push(if b[i + 1] == b'\n' { '\n' } else { ' ' });
                i += 2;
                continue;
            }
            if c == '"' {
                in_str = false;
            }
            out.push(if c == '\n' { '\n' } else { ' ' });
            i += 1;
        } else if c == '"' {
            in_str = true;
            out.push(' ');
            i += 1;
        } else if src[i..].starts_with("//") {
            while i < b.len() && b[i] != b'\n' {
                out.push(' ');
                i += 1;
            }
        } else if src[i..].starts_with("/*") {
            while i < b.len() && !src[i..].starts_with("*/") {
                out.push(if b[i] == b'\n' { '\n' } else { ' ' });
                i += 1;
            }
            i = (i + 2).min(b.len());
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// Every folder named by a `crate::` path in `src`, with its 1-based line.
fn crate_imports(src: &str) -> Vec<(usize, String)> {
    let s = strip_comments(src);
    let line_of = |pos: usize| s[..pos].matches('\n').count() + 1;
    let ident =
        |from: usize| -> String { s[from..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect() };
    let mut found = vec![];
    let mut at = 0;
    while let Some(k) = s[at..].find("crate::") {
        let pos = at + k;
        at = pos + 7;
        // `xcrate::` is some other path; `$crate::` is a macro's.
        if pos > 0 && (s.as_bytes()[pos - 1].is_ascii_alphanumeric() || matches!(s.as_bytes()[pos - 1], b'_' | b'$')) {
            continue;
        }
        let rest = s[at..].trim_start();
        let start = s.len() - rest.len();
        if rest.starts_with('{') {
            // `crate::{a::b, c, d::{e, f}}`: the heads at depth one.
            let (mut depth, mut head_next) = (0usize, true);
            for (j, ch) in s[start..].char_indices() {
                match ch {
                    '{' => {
                        depth += 1;
                        head_next = depth == 1;
                    }
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => head_next = true,
                    c if head_next && depth == 1 && (c.is_ascii_alphabetic() || c == '_') => {
                        found.push((line_of(start + j), ident(start + j)));
                        head_next = false;
                    }
                    _ => {}
                }
            }
        } else {
            found.push((line_of(start), ident(start)));
        }
    }
    found
}

/// `path:line: ...` for every import the table does not allow. `files`: (path under
/// modules/course/, source).
fn violations(table: &BTreeMap<String, BTreeSet<String>>, files: &[(String, String)]) -> Vec<String> {
    let mut bad = vec![];
    for (path, src) in files {
        let Some((folder, _)) = path.split_once('/') else { continue }; // lib.rs: the map itself
        let Some(allowed) = table.get(folder) else {
            bad.push(format!("modules/course/{path}: folder `{folder}` has no row in ARCHITECTURE.md's Layers table"));
            continue;
        };
        for (line, name) in crate_imports(src) {
            // Root re-exports (`crate::Run`, `crate::CUDA_KERNELS`) are not folders.
            if name.is_empty() || name.chars().next().is_some_and(|c| c.is_ascii_uppercase()) {
                continue;
            }
            if name != folder && !allowed.contains(&name) {
                bad.push(format!(
                    "modules/course/{path}:{line}: `{folder}` imports `crate::{name}`, which the Layers table does not allow (allowed: {})",
                    if allowed.is_empty() { "nothing of ours".to_string() } else { allowed.iter().cloned().collect::<Vec<_>>().join(", ") }
                ));
            }
        }
    }
    bad
}

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = e.unwrap().path();
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn table() -> BTreeMap<String, BTreeSet<String>> {
    let md = std::fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap();
    layer_table(&md).unwrap()
}

#[test]
fn library_imports_follow_the_layers() {
    let lib = root().join("modules/course");
    let mut paths = vec![];
    rs_files(&lib, &mut paths);
    paths.sort();
    let files: Vec<(String, String)> = paths
        .iter()
        .map(|p| (p.strip_prefix(&lib).unwrap().to_string_lossy().into_owned(), std::fs::read_to_string(p).unwrap()))
        .collect();
    assert!(files.len() > 40, "found only {} files under modules/course", files.len());
    let table = table();
    // Every folder of the library has a row, and every row is a folder.
    let folders: BTreeSet<String> =
        files.iter().filter_map(|(p, _)| p.split_once('/').map(|(f, _)| f.to_string())).collect();
    let rows: BTreeSet<String> = table.keys().cloned().collect();
    assert_eq!(folders, rows, "folders under modules/course/ vs rows of ARCHITECTURE.md's Layers table");
    let bad = violations(&table, &files);
    assert!(bad.is_empty(), "imports against the layers:\n{}", bad.join("\n"));
}

#[test]
fn the_layers_are_a_strict_order() {
    // No cycles: following "may import" from any folder never comes back to it.
    let table = table();
    for start in table.keys() {
        let mut seen = BTreeSet::new();
        let mut todo: Vec<&String> = table[start].iter().collect();
        while let Some(f) = todo.pop() {
            assert_ne!(f, start, "the Layers table lets `{start}` import itself through `{f}`");
            if seen.insert(f.clone()) {
                todo.extend(table.get(f).into_iter().flatten());
            }
        }
    }
}

#[test]
fn a_bad_import_is_named_with_its_file_and_line() {
    let table = table();
    let src = "//! doc naming crate::dist, which does not count\nuse crate::sys::rng::Rng;\nuse crate::{\n    ops,\n    dist::c10d::ProcessGroup,\n};\nfn f() { let _ = crate::train::optim::AdamW::default; let _ = \"crate::dist\"; }\n";
    let files = vec![("models/bad.rs".to_string(), src.to_string())];
    let bad = violations(&table, &files);
    assert_eq!(bad.len(), 2, "{bad:#?}");
    assert!(bad[0].starts_with("modules/course/models/bad.rs:5: `models` imports `crate::dist`"), "{}", bad[0]);
    assert!(bad[1].starts_with("modules/course/models/bad.rs:7: `models` imports `crate::train`"), "{}", bad[1]);
    // A folder missing from the table is named too.
    let bad = violations(&table, &[("extra/x.rs".to_string(), String::new())]);
    assert!(bad[0].contains("folder `extra` has no row"), "{bad:?}");
}
