//! The module graph, checked: every `crate::` edge in the library's code (comments aside) is one
//! that [`crate`]'s layering allows. A new edge that breaks a layer fails here, naming the file
//! and line, before it can grow into a cycle.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Each top-level module and the modules it may use. Ground floor: `config`, `metrics`; then
/// `logging`, `status`, `scoreboard`; the app (`rag`), its boundary (`http`); and the two
/// process roles, `worker` (-> http -> rag) and `master` (never the app nor a runtime).
const ALLOWED: &[(&str, &[&str])] = &[
    ("config", &[]),
    ("metrics", &[]),
    ("logging", &["config"]),
    ("status", &["config"]),
    ("scoreboard", &["metrics"]),
    ("rag", &["config"]),
    (
        "http",
        &["config", "logging", "metrics", "rag", "scoreboard"],
    ),
    (
        "worker",
        &["config", "http", "logging", "rag", "scoreboard"],
    ),
    ("master", &["config", "logging", "metrics", "scoreboard"]),
];

fn rust_files(root: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read src").flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files
}

/// The top-level module a file belongs to (`src/rag/store/mod.rs` -> `rag`).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let first = file.strip_prefix(src).ok()?.components().next()?;
    let name = first.as_os_str().to_str()?;
    Some(name.trim_end_matches(".rs").to_string())
}

/// The `crate::NAME` edges of one line of code.
fn edges(line: &str) -> Vec<String> {
    line.match_indices("crate::")
        .map(|(at, m)| {
            line[at + m.len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

#[test]
fn every_crate_edge_follows_the_layering() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut seen = BTreeSet::new();
    for file in rust_files(&src) {
        let Some(module) = module_of(&src, &file) else {
            continue;
        };
        if module == "lib" || module == "layering" {
            continue;
        }
        let allowed = ALLOWED
            .iter()
            .find(|(m, _)| *m == module)
            .map(|(_, to)| *to)
            .unwrap_or_else(|| panic!("{}: module {module} is not in ALLOWED", file.display()));
        let text = std::fs::read_to_string(&file).expect("read a source file");
        for (n, line) in text.lines().enumerate() {
            let code = line.trim_start();
            // Doc links and comments name modules without depending on them; string literals
            // (the master's own guard) are not edges either.
            if code.starts_with("//") || code.starts_with('"') {
                continue;
            }
            for to in edges(code) {
                if to == module {
                    continue;
                }
                assert!(
                    allowed.contains(&to.as_str()),
                    "{}:{}: {module} -> {to} breaks the layering (see src/lib.rs): {line}",
                    file.display(),
                    n + 1
                );
                seen.insert((module.clone(), to));
            }
        }
    }
    // The check reads real edges: the worker's use of the app's boundary is one of them.
    assert!(
        seen.contains(&("worker".to_string(), "http".to_string())),
        "{seen:?}"
    );
    assert!(
        seen.contains(&("http".to_string(), "rag".to_string())),
        "{seen:?}"
    );
}

#[test]
fn the_edge_reader_finds_each_name() {
    assert_eq!(
        edges("use crate::{a, b}; crate::config::Config; x.crate::y"),
        ["", "config", "y"]
    );
}
