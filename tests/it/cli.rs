//! `ragpool check` and `--version`: exit codes and messages an operator reads.

use std::process::Command;

use crate::support::BIN;

fn check(doc: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("workers.toml");
    std::fs::write(&path, doc).unwrap();
    let out = Command::new(BIN)
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_accepts_a_good_file_and_prints_the_effective_config() {
    let (code, stdout, stderr) =
        check("workers = 3\nbind = [\"127.0.0.1:9100\", \"unix:/tmp/x.sock\"]\n");
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("workers = 3"), "{stdout}");
    assert!(stdout.contains("\"unix:/tmp/x.sock\""), "{stdout}");
    assert!(
        stdout.contains("limit_request_line = 4094"),
        "defaults are shown: {stdout}"
    );
}

#[test]
fn check_accepts_the_shipped_workers_toml() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/workers.toml")).unwrap();
    let (code, _, stderr) = check(&doc);
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn check_names_a_typod_key_its_line_and_the_likely_spelling() {
    let (code, _, stderr) = check("workers = 2\n\ngracefull_timeout = 10\n");
    assert_eq!(code, 2);
    assert!(stderr.contains("workers.toml:3"), "{stderr}");
    assert!(stderr.contains("`gracefull_timeout`"), "{stderr}");
    assert!(
        stderr.contains("did you mean `graceful_timeout`"),
        "{stderr}"
    );
}

#[test]
fn check_names_a_wrong_type_with_key_and_line() {
    let (code, _, stderr) = check("bind = [\"127.0.0.1:9100\"]\nworkers = \"four\"\n");
    assert_eq!(code, 2);
    assert!(stderr.contains("workers.toml:2"), "{stderr}");
    assert!(stderr.contains("key `workers`"), "{stderr}");
    let (code, _, stderr) = check("reuse_port = \"yes\"\n");
    assert_eq!(code, 2);
    assert!(
        stderr.contains("workers.toml:1: key `reuse_port`"),
        "{stderr}"
    );
}

#[test]
fn check_fails_on_a_missing_explicit_file() {
    let out = Command::new(BIN)
        .args(["check", "--config", "/nonexistent/workers.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/workers.toml"));
}

#[test]
fn version_is_printed() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn check_accepts_the_container_config() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/docker/workers.toml"
    ))
    .unwrap();
    let (code, stdout, stderr) = check(&doc);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("bind = [\"0.0.0.0:8000\"]"), "{stdout}");
}
