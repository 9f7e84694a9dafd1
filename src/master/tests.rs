//! The master's module graph: bin -> master and bin -> worker, never master -> worker, http or
//! rag, neither directly nor through the modules it uses (config, scoreboard, metrics, logging).

use std::path::{Path, PathBuf};

/// Every `.rs` file under the master's directories and the single-file modules it uses.
fn master_graph_sources() -> Vec<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files: Vec<PathBuf> = ["scoreboard.rs", "metrics.rs", "logging.rs"]
        .iter()
        .map(|f| src.join(f))
        .collect();
    let mut dirs = vec![src.join("master"), src.join("config")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs")
                && path.file_name() != Some("tests.rs".as_ref())
            {
                files.push(path);
            }
        }
    }
    files
}

#[test]
fn the_master_never_reaches_the_worker_http_the_app_or_a_runtime() {
    let forbidden = [
        "crate::worker",
        "crate::http",
        "crate::rag",
        "tokio::",
        "hyper::",
    ];
    let files = master_graph_sources();
    assert!(files.len() > 15, "{files:?}");
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.trim_start();
            if code.starts_with("//") {
                continue;
            }
            for edge in forbidden {
                assert!(
                    !code.contains(edge),
                    "{}:{}: `{edge}` in the master's module graph: {line}",
                    file.display(),
                    n + 1
                );
            }
        }
    }
}
