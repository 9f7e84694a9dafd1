//! The shipped systemd units and logrotate file, checked by the real tools: `systemd-analyze
//! verify` on systemd/ragpool.service and systemd/ragpool.socket, `logrotate -d` on
//! deploy/logrotate/ragpool, and the unit settings the operator's manual relies on, against
//! the repo's workers.toml and nginx site.
//!
//! Without the tools these tests print a skip message and pass, unless RAGPOOL_REQUIRE_SYSTEMD=1
//! or RAGPOOL_REQUIRE_LOGROTATE=1.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support::nginx::SHIPPED_SITE;
use crate::support::BIN;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// Where the unit's install comment puts the binary; rewritten to the built one for `verify`.
const INSTALLED_BIN: &str = "/usr/local/bin/ragpool";

/// `program` from the usual system directories, or `None` (with a skip message) unless
/// `require_env=1`, which makes it a failure.
fn require_tool(program: &str, require_env: &str, package: &str) -> Option<PathBuf> {
    let found = ["/usr/bin", "/usr/sbin", "/bin", "/sbin", "/usr/local/bin"]
        .iter()
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.exists());
    if found.is_none() {
        if std::env::var(require_env).as_deref() == Ok("1") {
            panic!("{program} is missing and {require_env}=1: apt-get install {package}");
        }
        eprintln!("skipped: {program} is not installed (apt-get install {package})");
    }
    found
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(relative))
        .unwrap_or_else(|e| panic!("read {relative}: {e}"))
}

/// `Key=Value` settings of one section of a unit file, in order (comments and blanks skipped).
fn section(unit: &str, name: &str) -> Vec<(String, String)> {
    let mut current = String::new();
    let mut out = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') && line.ends_with(']') {
            current = line[1..line.len() - 1].to_string();
        } else if current == name {
            if let Some((k, v)) = line.split_once('=') {
                out.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
    }
    out
}

/// The one value of `key` in `settings`; fails if it is missing or set twice.
fn one<'a>(settings: &'a [(String, String)], key: &str) -> &'a str {
    let values: Vec<&str> = settings
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(values.len(), 1, "{key}= should be set once: {values:?}");
    values[0]
}

/// A systemd time span in the forms the unit uses: `45`, `45s`, `2min`, `1min 30s`.
fn timespan(value: &str) -> Duration {
    value
        .split_whitespace()
        .map(|part| {
            let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
            let n: u64 = digits
                .parse()
                .unwrap_or_else(|_| panic!("time span {value:?}"));
            match &part[digits.len()..] {
                "" | "s" | "sec" => Duration::from_secs(n),
                "min" | "m" => Duration::from_secs(60 * n),
                "ms" | "msec" => Duration::from_millis(n),
                unit => panic!("time span {value:?}: unit {unit:?}"),
            }
        })
        .sum()
}

#[test]
fn systemd_analyze_verify_accepts_the_shipped_units() {
    let Some(analyze) = require_tool("systemd-analyze", "RAGPOOL_REQUIRE_SYSTEMD", "systemd")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let service = read("systemd/ragpool.service");
    let exec_start = |l: &str| l.starts_with("ExecStart=");
    assert_eq!(service.lines().filter(|l| exec_start(l)).count(), 1);
    // verify checks that the Exec programs exist: point them at the built binary, nothing else.
    let runs_ragpool = |l: &str| exec_start(l) || l.starts_with("ExecReload=");
    let rewritten: String = service
        .lines()
        .map(|l| {
            if runs_ragpool(l) {
                assert!(l.contains(INSTALLED_BIN), "{l}");
                l.replace(INSTALLED_BIN, BIN)
            } else {
                l.to_string()
            }
        })
        .map(|l| l + "\n")
        .collect();
    std::fs::write(dir.path().join("ragpool.service"), rewritten).unwrap();
    std::fs::write(
        dir.path().join("ragpool.socket"),
        read("systemd/ragpool.socket"),
    )
    .unwrap();
    // --man=no: `Documentation=man:` pages are the host's business (CI images ship no man pages).
    let out = Command::new(analyze)
        .args(["verify", "--man=no"])
        .arg(dir.path().join("ragpool.service"))
        .arg(dir.path().join("ragpool.socket"))
        .output()
        .unwrap();
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{output}"
    );
    // Unknown keys and bad values are warnings with exit code 0: none may name our units.
    let complaints: Vec<&str> = output
        .lines()
        .filter(|l| l.contains("ragpool.service") || l.contains("ragpool.socket"))
        .collect();
    assert!(complaints.is_empty(), "systemd-analyze verify:\n{output}");
}

#[test]
fn the_service_unit_keeps_what_the_operator_relies_on() {
    let unit = read("systemd/ragpool.service");
    let service = section(&unit, "Service");
    // The master speaks the notify protocol; after a USR2 upgrade the new master sends MAINPID=.
    assert_eq!(one(&service, "Type"), "notify");
    assert_eq!(one(&service, "NotifyAccess"), "all");
    let exec_start = one(&service, "ExecStart");
    assert!(
        exec_start.starts_with(&format!("{INSTALLED_BIN} serve")),
        "{exec_start}"
    );
    // `systemctl reload` = `ragpool reload`: HUP to the master, waiting for its answer.
    let reload = one(&service, "ExecReload");
    let words: Vec<&str> = reload.split_whitespace().collect();
    assert_eq!(words[..2], [INSTALLED_BIN, "reload"], "{reload}");
    assert_eq!(words[words.len() - 2..], ["--pid", "$MAINPID"], "{reload}");
    // TERM to the master alone, which drains its workers, within TimeoutStopSec.
    assert_eq!(one(&service, "KillMode"), "mixed");
    let workers: toml::Value = read("workers.toml").parse().expect("workers.toml");
    let graceful = workers
        .get("graceful_timeout")
        .and_then(toml::Value::as_integer)
        .unwrap_or(30);
    let stop = timespan(one(&service, "TimeoutStopSec"));
    assert!(
        stop > Duration::from_secs(graceful as u64),
        "TimeoutStopSec ({stop:?}) must exceed graceful_timeout ({graceful} s)"
    );
    // Hardening, and the paths the pool writes.
    assert_eq!(one(&service, "NoNewPrivileges"), "yes");
    assert_eq!(one(&service, "ProtectSystem"), "strict");
    let writable: Vec<&str> = one(&service, "ReadWritePaths").split_whitespace().collect();
    assert!(writable.contains(&"/var/lib/ragpool"), "{writable:?}");
    // The logs logrotate rotates are in a writable directory.
    let rotated = read("deploy/logrotate/ragpool");
    assert!(rotated.contains("/var/log/ragpool/*.log {"), "{rotated}");
    assert!(writable.contains(&"/var/log/ragpool"), "{writable:?}");
}

#[test]
fn the_socket_unit_is_the_one_nginx_connects_to() {
    let socket = section(&read("systemd/ragpool.socket"), "Socket");
    let listen = one(&socket, "ListenStream");
    assert_eq!(one(&socket, "Service"), "ragpool.service");
    let site = std::fs::read_to_string(SHIPPED_SITE).unwrap();
    assert!(
        site.contains(&format!("server unix:{listen};")),
        "deploy/nginx/ragpool.conf should proxy to the socket unit's {listen}"
    );
    // nginx (www-data on Debian) connects through the socket's group.
    assert_eq!(one(&socket, "SocketGroup"), "www-data");
    assert_eq!(one(&socket, "SocketMode"), "0660");
}

#[test]
fn logrotate_accepts_the_shipped_file() {
    let Some(logrotate) = require_tool("logrotate", "RAGPOOL_REQUIRE_LOGROTATE", "logrotate")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let shipped = read("deploy/logrotate/ragpool");
    // The `ragpool` user exists on a server (see the unit's install notes), not here: the
    // owner of re-created logs is the only value rewritten, to whoever runs the test.
    let create = "create 0640 ragpool ragpool";
    assert_eq!(shipped.matches(create).count(), 1, "{shipped}");
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::effective())
        .unwrap()
        .expect("current user");
    let group = nix::unistd::Group::from_gid(nix::unistd::Gid::effective())
        .unwrap()
        .expect("current group");
    let config = dir.path().join("ragpool");
    std::fs::write(
        &config,
        shipped.replace(create, &format!("create 0640 {} {}", user.name, group.name)),
    )
    .unwrap();
    let out = Command::new(logrotate)
        .arg("-d")
        .arg("-s")
        .arg(dir.path().join("status"))
        .arg(&config)
        .output()
        .unwrap();
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "logrotate -d failed:\n{output}");
    assert!(!output.lines().any(|l| l.starts_with("error:")), "{output}");
    assert!(
        output.contains("rotating pattern: /var/log/ragpool/*.log"),
        "{output}"
    );
    // USR1 reopens the logs: to the master only, which tells its workers.
    assert!(
        shipped.contains("--kill-who=main --signal=USR1 ragpool.service"),
        "{shipped}"
    );
}

/// Starts ragpool with `JOURNAL_STREAM` naming its real stderr (as systemd does) or another
/// file, makes it log an error (a rejected reload) and returns its log lines.
fn log_lines_with_journal_stream(matching: bool) -> Vec<String> {
    // The wrapper sets JOURNAL_STREAM to its own stderr's device:inode, which ragpool inherits.
    let script = if matching {
        "JOURNAL_STREAM=$(stat -L -c %d:%i /dev/stderr) exec \"$0\" \"$@\""
    } else {
        "JOURNAL_STREAM=$(stat -L -c %d:%i /dev/null) exec \"$0\" \"$@\""
    };
    let server = crate::support::ServerProcess::launch(
        &crate::config(1, ""),
        crate::support::Launch {
            wrapper: &["sh", "-c", script],
            ..Default::default()
        },
    );
    assert!(
        server.wait_for_log("are serving", Duration::from_secs(20)),
        "{}",
        server.logs()
    );
    std::fs::write(&server.config_path, "workers = \"many\"\n").unwrap();
    server.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(
        server.wait_for_log("Reload rejected", Duration::from_secs(20)),
        "{}",
        server.logs()
    );
    server.logs().lines().map(str::to_string).collect()
}

#[test]
fn journal_lines_carry_their_priority_only_when_stderr_is_the_journal() {
    let lines = log_lines_with_journal_stream(true);
    let rejected = lines
        .iter()
        .find(|l| l.contains("Reload rejected"))
        .unwrap();
    assert!(rejected.starts_with("<3>["), "{rejected}");
    let serving = lines.iter().find(|l| l.contains("are serving")).unwrap();
    assert!(serving.starts_with("<6>["), "{serving}");

    // JOURNAL_STREAM inherited by a process whose stderr goes elsewhere: plain lines.
    let lines = log_lines_with_journal_stream(false);
    assert!(
        lines.iter().all(|l| !l.starts_with('<')),
        "{}",
        lines.join("\n")
    );
    assert!(lines.iter().any(|l| l.contains("Reload rejected")));
}
