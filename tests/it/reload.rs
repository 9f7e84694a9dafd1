//! HUP: reload without dropping a request; a bad config or a failing generation changes nothing.

use std::collections::HashSet;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::config;
use crate::support::http;
use crate::support::load::Load;
use crate::support::{free_port, wait_until, Launch, ServerProcess};

const BOUND: Duration = Duration::from_secs(30);

#[test]
fn a_load_running_through_twenty_hups_sees_zero_failed_requests() {
    let server = ServerProcess::start(&config(2, "graceful_timeout = 10\n"));
    let load = Load::start(&server.addr(), 4);
    assert!(load.wait_for_progress(20, BOUND));
    for n in 1..=20 {
        server.signal(Signal::SIGHUP);
        assert!(
            server.wait_for_log(
                &format!("Reload complete: generation {} is serving", n + 1),
                BOUND
            ),
            "reload {n} did not complete:\n{}",
            server.logs()
        );
        assert!(
            load.wait_for_progress(10, BOUND),
            "no progress after reload {n}"
        );
    }
    let report = load.stop();
    assert_eq!(report.failed, 0, "{report:?}");
    assert!(report.ok > 200, "{report:?}");
    assert!(server.wait_for_workers(2, BOUND), "{:?}", server.workers());
    assert_eq!(server.count_in_log("died"), 0, "{}", server.logs());
}

#[test]
fn hup_with_a_broken_config_leaves_the_pool_untouched_and_logs_why() {
    let server = ServerProcess::start(&config(2, ""));
    let before = server.workers();
    server.rewrite_config("workers = 3\nbind = [\"127.0.0.1:0\"]\nmax_requets = 5\n");
    server.signal(Signal::SIGHUP);
    assert!(
        server.wait_for_log("Reload rejected", BOUND),
        "{}",
        server.logs()
    );
    let logs = server.logs();
    assert!(
        logs.contains("workers.toml:3: unknown key `max_requets` (did you mean `max_requests`?)"),
        "{logs}"
    );
    assert_eq!(
        server.workers(),
        before,
        "same processes, none started or stopped"
    );
    assert_eq!(server.count_in_log("Booting worker"), 2);
    assert_eq!(http::get(&server.addr(), "/health").unwrap().status, 200);

    // A good config afterwards still reloads.
    server.rewrite_config(&config(3, ""));
    server.signal(Signal::SIGHUP);
    assert!(
        server.wait_for_log("Reload complete", BOUND),
        "{}",
        server.logs()
    );
    assert!(server.wait_for_workers(3, BOUND));
}

#[test]
fn hup_changes_the_worker_count_and_the_bind_address() {
    let server = ServerProcess::start(&config(2, ""));
    let old_addr = server.addr();
    let port = free_port();
    let sock = server.path("new.sock");
    server.rewrite_config(&format!(
        "workers = 3\nbind = [\"127.0.0.1:{port}\", \"unix:{}\"]\naccesslog = \"\"\n",
        sock.display()
    ));
    server.signal(Signal::SIGHUP);
    assert!(
        server.wait_for_log("Reload complete", BOUND),
        "{}",
        server.logs()
    );
    assert!(server.wait_for_workers(3, BOUND), "{:?}", server.workers());
    let new_addr = format!("127.0.0.1:{port}");
    assert_eq!(http::get(&new_addr, "/health").unwrap().status, 200);
    assert_eq!(http::get_unix(&sock, "/health").unwrap().status, 200);
    // The old address closes once its generation has retired.
    assert!(
        wait_until(BOUND, || http::get(&old_addr, "/health").is_err()),
        "old address still answers"
    );
    // All answers now come from the three new workers.
    let workers: HashSet<i32> = server.workers().into_iter().collect();
    let mut seen = HashSet::new();
    assert!(wait_until(BOUND, || {
        seen.insert(
            http::get(&new_addr, "/health").unwrap().json()["pid"]
                .as_i64()
                .unwrap() as i32,
        );
        seen == workers
    }));
}

#[test]
fn hup_whose_new_generation_cannot_boot_keeps_the_old_one() {
    let server = ServerProcess::start(&config(2, ""));
    let before = server.workers();
    server.rewrite_config(&config(2, "accesslog = \"{dir}/no/such/dir/access.log\"\n"));
    server.signal(Signal::SIGHUP);
    assert!(
        server.wait_for_log("keeps serving", BOUND),
        "{}",
        server.logs()
    );
    assert!(
        server.logs().contains("cannot open access log"),
        "{}",
        server.logs()
    );
    assert!(server.wait_for_workers(2, BOUND));
    assert_eq!(server.workers(), before);
    assert_eq!(http::get(&server.addr(), "/health").unwrap().status, 200);
}

/// `ragpool reload --pid PID` (what `ExecReload=` runs): its exit status and stderr.
fn ragpool_reload(server: &ServerProcess) -> (std::process::ExitStatus, String) {
    let output = std::process::Command::new(crate::support::BIN)
        .args(["reload", "--timeout", "60", "--pid"])
        .arg(server.pid().to_string())
        .arg("--config")
        .arg(&server.config_path)
        .output()
        .expect("run ragpool reload");
    (
        output.status,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn ragpool_reload_returns_once_the_new_generation_serves_and_fails_on_a_rejected_config() {
    let server = ServerProcess::start(&config(2, ""));
    for n in 2..=4 {
        let (status, stderr) = ragpool_reload(&server);
        assert!(status.success(), "{status:?} {stderr}\n{}", server.logs());
        assert!(
            stderr.contains(&format!("generation {n} is serving")),
            "{stderr}"
        );
        // The master logs the commit before it answers (the pipe to this test may lag).
        assert!(
            server.wait_for_log(
                &format!("Reload complete: generation {n} is serving"),
                Duration::from_secs(5)
            ),
            "{}",
            server.logs()
        );
    }
    assert!(server.wait_for_workers(2, BOUND), "{:?}", server.workers());
    let workers = server.workers();
    std::fs::write(
        &server.config_path,
        "workers = 2\nbind = [\"127.0.0.1:0\"]\ntimeout = \"soon\"\n",
    )
    .unwrap();
    let (status, stderr) = ragpool_reload(&server);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("the reload failed"), "{stderr}");
    assert!(
        stderr.contains("timeout"),
        "the config error is shown: {stderr}"
    );
    assert!(
        server.wait_for_log("Reload rejected", Duration::from_secs(5)),
        "{}",
        server.logs()
    );
    assert_eq!(
        server.workers(),
        workers,
        "the running workers are untouched"
    );
    assert_eq!(http::get(&server.addr(), "/health").unwrap().status, 200);

    // No master there: a clear error, not a hang.
    let output = std::process::Command::new(crate::support::BIN)
        .args(["reload", "--timeout", "5", "--pid", "999999"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot signal the master"));
}

/// What a HUP after `rewrite` must leave alone: the same worker processes, the same address,
/// and a log line saying why the reload was refused.
fn assert_hup_is_rejected(server: &ServerProcess, rejections: usize, why: &str) {
    let before = server.workers();
    let addr = server.addr();
    let generations = server.count_in_log("Reloading: starting generation");
    server.signal(Signal::SIGHUP);
    assert!(
        server.wait_for_log_count("Reload rejected", rejections, BOUND),
        "{}",
        server.logs()
    );
    let logs = server.logs();
    let line = logs
        .lines()
        .filter(|l| l.contains("Reload rejected"))
        .nth(rejections - 1)
        .unwrap_or_default();
    assert!(line.contains(why), "expected {why:?} in {line:?}\n{logs}");
    assert_eq!(
        server.workers(),
        before,
        "same processes, none started or stopped"
    );
    assert_eq!(
        server.count_in_log("Reloading: starting generation"),
        generations,
        "no generation was started:\n{logs}"
    );
    assert_eq!(http::get(&addr, "/health").unwrap().status, 200);
}

#[test]
fn hup_with_an_empty_or_comments_only_config_keeps_the_pool() {
    let server = ServerProcess::start(&config(2, ""));
    let load = Load::start(&server.addr(), 2);
    assert!(load.wait_for_progress(20, BOUND));
    server.rewrite_config("");
    assert_hup_is_rejected(&server, 1, "sets no key (empty, or only comments)");
    server.rewrite_config("# workers = 4\n\n# bind = [\"127.0.0.1:8000\"]\n[llm]\n");
    assert_hup_is_rejected(&server, 2, "sets no key");
    assert_eq!(server.count_in_log("Booting worker"), 2);
    assert!(load.wait_for_progress(20, BOUND));
    let report = load.stop();
    server.report_case(
        "empty and comments-only workers.toml on HUP, under /health load",
        report.ok + report.failed,
        report.failed,
    );
    assert_eq!(report.failed, 0, "{report:?}");

    server.rewrite_config(&config(3, ""));
    server.signal(Signal::SIGHUP);
    assert!(
        server.wait_for_log("Reload complete", BOUND),
        "{}",
        server.logs()
    );
    assert!(server.wait_for_workers(3, BOUND), "{:?}", server.workers());
}

#[test]
fn hup_after_the_config_file_was_deleted_keeps_the_pool() {
    // Named with --config.
    let server = ServerProcess::start(&config(2, ""));
    std::fs::remove_file(&server.config_path).unwrap();
    assert_hup_is_rejected(&server, 1, "cannot read config file");

    // The implicit ./workers.toml, present at start.
    let server = ServerProcess::launch(
        &config(2, ""),
        Launch {
            implicit_config: true,
            ..Launch::default()
        },
    );
    assert!(
        server.wait_for_log("are serving", BOUND),
        "{}",
        server.logs()
    );
    std::fs::remove_file(&server.config_path).unwrap();
    assert_hup_is_rejected(&server, 1, "is gone (ragpool has read it before)");
    server.report_case("./workers.toml deleted, then HUP", 1, 0);
}

#[test]
fn without_a_workers_toml_at_start_the_defaults_serve_until_a_file_is_read() {
    let port = free_port();
    let bind = format!("127.0.0.1:{port}");
    let server = ServerProcess::launch(
        "",
        Launch {
            implicit_config: true,
            no_file: true,
            env: &[
                ("RAGPOOL_BIND", bind.as_str()),
                ("RAGPOOL_RAG__INGEST_DOCS_ON_FIRST_RUN", "false"),
            ],
            ..Launch::default()
        },
    );
    assert!(
        server.wait_for_log("are serving", BOUND),
        "{}",
        server.logs()
    );
    assert!(
        server.logs().contains("No config file at") && server.logs().contains("built-in defaults"),
        "{}",
        server.logs()
    );
    assert!(server.wait_for_workers(1, BOUND), "{:?}", server.workers());

    // Still no file: a reload re-reads the same defaults.
    server.signal(Signal::SIGHUP);
    assert!(
        server.wait_for_log("Reload complete: generation 2 is serving", BOUND),
        "{}",
        server.logs()
    );

    // The operator creates the file: the next reload reads it...
    server.rewrite_config("workers = 2\n");
    server.signal(Signal::SIGHUP);
    assert!(
        server.wait_for_log("Reload complete: generation 3 is serving", BOUND),
        "{}",
        server.logs()
    );
    assert!(server.wait_for_workers(2, BOUND), "{:?}", server.workers());

    // ... and from then on its disappearing is refused, not a reset to one worker.
    std::fs::remove_file(&server.config_path).unwrap();
    assert_hup_is_rejected(&server, 1, "is gone");
    assert_eq!(server.workers().len(), 2);
    assert_eq!(http::get(&bind, "/health").unwrap().status, 200);
}
