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

#[test]
fn check_prints_every_table_with_secrets_masked() {
    let (code, stdout, stderr) = check(
        "admin_token = \"tok-123\"\n[store]\napi_key = \"qd-456\"\n[llm]\nmodel = \"qwen2.5\"\napi_key = \"sk-789\"\n[rag]\ntop_k = 7\n",
    );
    assert_eq!(code, 0, "{stderr}");
    for table in ["[store]", "[embed]", "[llm]", "[rag]"] {
        assert!(stdout.contains(table), "{table} missing:\n{stdout}");
    }
    assert!(stdout.contains("model = \"qwen2.5\""), "{stdout}");
    assert!(stdout.contains("top_k = 7"), "{stdout}");
    assert!(stdout.contains("first_token_timeout = 60"), "{stdout}");
    for secret in ["tok-123", "qd-456", "sk-789"] {
        assert!(!stdout.contains(secret), "{secret} printed:\n{stdout}");
    }
    assert!(
        stdout.contains("admin_token = \"********\"  # set, masked"),
        "{stdout}"
    );
}

#[test]
fn check_refuses_absurd_numbers_naming_key_line_and_limit() {
    for (doc, want) in [
        (
            "workers = 2\nheader_timeout = 0\n",
            "workers.toml:2: key `header_timeout`: 0 is out of range 0.1..=3600",
        ),
        (
            "backlog = 2147483647\n",
            "workers.toml:1: key `backlog`: 2147483647 is out of range 1..=65535",
        ),
        (
            "\nworker_connections = 1e12\n",
            "workers.toml:2: key `worker_connections`: expected a whole number in 1..=1000000",
        ),
        (
            "max_body_size = 9200000000000000000\n",
            "workers.toml:1: key `max_body_size`: 9200000000000000000 is out of range 0..=1073741824",
        ),
    ] {
        let (code, _, stderr) = check(doc);
        assert_eq!(code, 2, "{doc}: {stderr}");
        assert!(stderr.contains(want), "{doc}: {stderr}");
        eprintln!("case | ragpool check, absurd value | refused (exit 2): {want}");
    }
}

#[test]
fn check_says_duplicate_key_with_its_line() {
    let (code, _, stderr) = check("workers = 2\nbind = [\"127.0.0.1:9100\"]\nworkers = 3\n");
    assert_eq!(code, 2);
    assert!(
        stderr.contains("workers.toml:3: duplicate key `workers`"),
        "{stderr}"
    );
    assert!(!stderr.contains("unknown key"), "{stderr}");
}

#[test]
fn check_refuses_an_empty_or_comments_only_file() {
    for doc in ["", "# workers = 4\n\n# bind = [\"0.0.0.0:80\"]\n"] {
        let (code, _, stderr) = check(doc);
        assert_eq!(code, 2, "{doc:?}: {stderr}");
        assert!(stderr.contains("sets no key"), "{stderr}");
    }
}

#[test]
fn check_shows_where_an_environment_value_came_from() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("workers.toml");
    std::fs::write(&path, "workers = 2\n").unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .env("RAGPOOL_LLM__MODEL", "bge-m3")
        .env("RAGPOOL_BACKLOG", "70000")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "environment variable RAGPOOL_BACKLOG: key `backlog`: 70000 is out of range 1..=65535"
        ),
        "{stderr}"
    );
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .env("RAGPOOL_LLM__MODEL", "bge-m3")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        stdout.contains("model = \"bge-m3\"  # from environment variable RAGPOOL_LLM__MODEL"),
        "{stdout}"
    );
}

#[test]
fn serve_with_a_missing_explicit_config_is_an_error() {
    let out = Command::new(BIN)
        .args(["serve", "--config", "/nonexistent/workers.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot read config file /nonexistent/workers.toml"),
        "{stderr}"
    );
}

#[test]
fn check_without_a_default_file_uses_the_built_in_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .arg("check")
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("(built-in defaults; no config file)"),
        "{stdout}"
    );
    assert!(stdout.contains("bind = [\"127.0.0.1:8000\"]"), "{stdout}");
}
