//! ragpool under a real systemd (252, Debian 12) as PID 1 of a `systemd-nspawn` container,
//! installed by running the README's operator's guide verbatim, then driven the way an
//! operator does: `systemctl reload`, `systemctl kill -s USR2`, `systemctl stop`/`restart`, a
//! frozen master, `journalctl -p warning`, logrotate. A bounded load runs from this process
//! into the container: through nginx on the container's loopback (a thread in its network
//! namespace) and straight to the socket unit's `/run/ragpool.sock`.
//!
//! Needs root, `systemd-nspawn` (apt-get install systemd-container) and a Debian 12 rootfs at
//! `RAGPOOL_NSPAWN_ROOTFS` (default /var/cache/ragpool-nspawn/rootfs; `.ci/run` debootstraps it).
//! The rootfs is only read: the container runs on a volatile overlay. Without them the test
//! prints why it was skipped, unless RAGPOOL_REQUIRE_SYSTEMD_REAL=1 (CI), which makes it fail.

use std::fs::File;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::load::{Load, Probe};
use crate::support::{children_of, http, wait_until, BIN};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const DEFAULT_ROOTFS: &str = "/var/cache/ragpool-nspawn/rootfs";
const REQUIRE: &str = "RAGPOOL_REQUIRE_SYSTEMD_REAL";
/// Short, so "no watchdog kill within 2 x WatchdogSec" and the frozen-master restart are quick.
const WATCHDOG: Duration = Duration::from_secs(4);
/// The drop-in the test adds to the shipped unit (test timing only; nothing else changes).
const DROP_IN: &str = "[Service]\nWatchdogSec=4\nTimeoutAbortSec=5\nLimitCORE=0\n";
const BOUND: Duration = Duration::from_secs(60);
/// Between two requests of one load thread: ~100 requests/s in all. The shipped config logs
/// each request to the journal, whose default rate limit (10000 lines per 30 s per service)
/// would otherwise drop the very lines the test looks for.
const LOAD_PAUSE: Duration = Duration::from_millis(20);

/// One line of the closing note's figures (`cargo test -- --nocapture`).
fn check(what: &str) {
    eprintln!("systemd_real check | {what}");
}

/// Returns `None` after printing why, or panics when the test is required.
fn unavailable(reason: &str) -> Option<Container> {
    if std::env::var(REQUIRE).as_deref() == Ok("1") {
        panic!("{REQUIRE}=1 but a real systemd cannot run here: {reason}");
    }
    eprintln!("skipped: no real systemd here: {reason}");
    None
}

/// A booted container; powered off (and its cgroups removed) on drop.
struct Container {
    nspawn: Child,
    /// The container's PID 1 (systemd), in this machine's pid namespace.
    leader: i32,
    cgroups: Vec<PathBuf>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Container {
    fn boot() -> Option<Container> {
        if !nix::unistd::geteuid().is_root() {
            return unavailable("not root");
        }
        if !Path::new("/usr/bin/systemd-nspawn").exists() {
            return unavailable("systemd-nspawn is missing (apt-get install systemd-container)");
        }
        let rootfs = std::env::var("RAGPOOL_NSPAWN_ROOTFS").unwrap_or(DEFAULT_ROOTFS.into());
        if !Path::new(&rootfs).join("usr/lib/systemd/systemd").exists() {
            return unavailable(&format!(
                "no Debian rootfs with systemd at {rootfs} (see .ci/run: debootstrap)"
            ));
        }
        let name = format!("ragpool-it-{}", std::process::id());
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("nspawn.log");
        // Its own cgroup first (the machine has hybrid cgroups; without it PID 1 lands in the
        // wrong one), then nspawn on a volatile overlay of the cached rootfs.
        let cgroups: Vec<PathBuf> = ["/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified"]
            .iter()
            .filter(|h| Path::new(h).is_dir())
            .map(|h| Path::new(h).join(&name))
            .collect();
        let script = r#"for c in $CGROUPS; do mkdir -p "$c" && echo $$ > "$c/cgroup.procs"; done
exec systemd-nspawn -D "$ROOTFS" -M "$NAME" -b --volatile=overlay --register=no --keep-unit \
  --private-network --console=passive"#;
        let mut command = Command::new("bash");
        command
            .args(["-c", script])
            .env(
                "CGROUPS",
                cgroups
                    .iter()
                    .map(|c| c.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" "),
            )
            .env("ROOTFS", &rootfs)
            .env("NAME", &name)
            .stdin(Stdio::null())
            .stdout(File::create(&log).unwrap())
            .stderr(File::create(&log).unwrap());
        // SAFETY: setsid(2) is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            command.pre_exec(|| nix::unistd::setsid().map(|_| ()).map_err(Into::into));
        }
        let nspawn = command.spawn().expect("spawn systemd-nspawn");
        let mut container = Container {
            nspawn,
            leader: 0,
            cgroups,
            log,
            _dir: dir,
        };
        let nspawn_pid = container.nspawn.id() as i32;
        let found = wait_until(BOUND, || {
            // nspawn's helper children come and go; PID 1 of the container is the one running
            // systemd.
            container.leader = children_of(nspawn_pid)
                .into_iter()
                .find(|pid| {
                    std::fs::read_to_string(format!("/proc/{pid}/comm"))
                        .is_ok_and(|comm| comm.trim() == "systemd")
                })
                .unwrap_or(0);
            container.leader > 0 || container.nspawn.try_wait().ok().flatten().is_some()
        });
        if !found || container.leader == 0 {
            let why = format!("systemd-nspawn did not start:\n{}", container.nspawn_log());
            return unavailable(&why);
        }
        // Until its manager answers on the bus, then until boot is over.
        let mut state = container.sh("true");
        wait_until(BOUND, || {
            state = container.sh("systemctl is-system-running --wait");
            // "offline": systemctl could not reach the manager yet.
            !matches!(
                String::from_utf8_lossy(&state.stdout).trim(),
                "" | "offline"
            )
        });
        let state_text = String::from_utf8_lossy(&state.stdout).trim().to_string();
        if state_text != "running" {
            let failed = container.sh("systemctl --failed --no-pager");
            panic!(
                "the container's systemd is {state_text:?}, not running ({}):\n{}{}\nnspawn: {}",
                String::from_utf8_lossy(&state.stderr),
                String::from_utf8_lossy(&failed.stdout),
                String::from_utf8_lossy(&failed.stderr),
                container.nspawn_log()
            );
        }
        Some(container)
    }

    fn nspawn_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs a shell script inside the container (all its namespaces), bounded in time.
    fn sh(&self, script: &str) -> Output {
        Command::new("timeout")
            .args(["120", "nsenter", "-t", &self.leader.to_string(), "-a"])
            .args(["sh", "-c", script])
            .stdin(Stdio::null())
            .output()
            .expect("run nsenter")
    }

    /// Runs a script that must succeed; returns its stdout.
    fn ok(&self, script: &str) -> String {
        let out = self.sh(script);
        assert!(
            out.status.success(),
            "`{script}` failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A path inside the container, as this process sees it.
    fn path(&self, inside: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{inside}", self.leader))
    }

    fn show(&self, property: &str) -> String {
        self.ok(&format!(
            "systemctl show -p {property} --value ragpool.service"
        ))
        .trim()
        .to_string()
    }

    fn main_pid(&self) -> i32 {
        self.show("MainPID").parse().unwrap_or(0)
    }

    /// The service's journal (message text only) since the container booted, without the
    /// access log's lines (the shipped config logs requests to stdout, so to the journal).
    fn journal(&self, extra: &str) -> String {
        self.ok(&format!(
            "journalctl -u ragpool.service -o cat --no-pager {extra} | grep -v 'HTTP/1.1\" ' || true"
        ))
    }

    /// The last lines of the whole journal (systemd's and ragpool's), for failure messages.
    fn tail(&self) -> String {
        self.ok("journalctl -o short-monotonic --no-pager | grep -v 'HTTP/1.1\" ' | tail -n 100")
    }

    fn wait_for_journal(&self, needle: &str) -> bool {
        wait_until(BOUND, || self.journal("").contains(needle))
    }

    /// The pool's `/status`, through the socket unit's socket.
    fn status(&self) -> serde_json::Value {
        let response = http::get_unix(&self.path("/run/ragpool.sock"), "/status")
            .expect("GET /status through /run/ragpool.sock");
        assert_eq!(response.status, 200, "{}", response.body);
        response.json()
    }

    /// Pids of the serving generation's workers, sorted.
    fn workers(&self) -> Vec<i64> {
        let status = self.status();
        let generation = status["generation"].as_i64();
        let mut pids: Vec<i64> = status["workers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|w| w["generation"].as_i64() == generation)
            .filter_map(|w| w["pid"].as_i64())
            .collect();
        pids.sort_unstable();
        pids
    }

    /// Load through nginx (port 80 on the container's loopback) and through the socket, paced
    /// ([`LOAD_PAUSE`]) so the access log stays under journald's rate limit.
    fn load(&self) -> Load {
        let netns = PathBuf::from(format!("/proc/{}/ns/net", self.leader));
        let socket = self.path("/run/ragpool.sock");
        let mut entered = false;
        let through_nginx: Probe = Box::new(move || {
            if !entered {
                // This thread only: the container's network namespace, where nginx listens.
                let ns = File::open(&netns)?;
                nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
                entered = true;
            }
            std::thread::sleep(LOAD_PAUSE);
            http::get("127.0.0.1:80", "/health")
        });
        let through_socket: Probe = Box::new(move || {
            std::thread::sleep(LOAD_PAUSE);
            http::get_unix(&socket, "/health")
        });
        Load::start_with(vec![through_nginx, through_socket])
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self.sh("systemctl poweroff");
        let stopped = wait_until(Duration::from_secs(30), || {
            self.nspawn.try_wait().ok().flatten().is_some()
        });
        if !stopped {
            // SIGKILL to the container's PID 1 ends its whole pid namespace (killing nspawn
            // alone would leave the container running); nspawn then exits by itself.
            if self.leader > 0 {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(self.leader),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let exited = wait_until(Duration::from_secs(10), || {
                self.nspawn.try_wait().ok().flatten().is_some()
            });
            if !exited {
                let _ = self.nspawn.kill();
                let _ = self.nspawn.wait();
            }
        }
        // systemd made sub-cgroups (payload/, supervisor/...): remove the tree, deepest first.
        for cgroup in &self.cgroups {
            wait_until(Duration::from_secs(10), || {
                remove_cgroup_tree(cgroup);
                !cgroup.exists()
            });
        }
    }
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// The README's install block, with its `cargo build --release && ` left out (the binary is
/// copied to where that build puts it).
fn operators_install_block() -> String {
    let readme = std::fs::read_to_string(Path::new(ROOT).join("README.md")).unwrap();
    let start = readme
        .find("**Install as a service**")
        .expect("README has the install block");
    let block = &readme[start..];
    let block = &block[block.find("```sh\n").expect("a sh block") + 6..];
    let block = &block[..block.find("```").expect("the block ends")];
    let build = "cargo build --release && ";
    assert!(block.contains(build), "{block}");
    block.replace(build, "")
}

fn copy_into(container: &Container, from: &Path, inside: &str) {
    let to = container.path(inside);
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    let status = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(&to)
        .status()
        .unwrap();
    assert!(status.success(), "cp {} {}", from.display(), to.display());
}

fn median(values: &mut [Duration]) -> Duration {
    values.sort_unstable();
    values[values.len() / 2]
}

#[test]
fn under_systemd_252_reloads_upgrades_restarts_and_logs_behave_as_the_guide_says() {
    let Some(c) = Container::boot() else { return };
    let started = Instant::now();

    // ----- install exactly as the operator's guide says -----------------------------------
    let src = "/root/ragpool";
    for item in ["workers.toml", "docs", "systemd", "deploy", "README.md"] {
        copy_into(&c, &Path::new(ROOT).join(item), &format!("{src}/{item}"));
    }
    copy_into(&c, Path::new(BIN), &format!("{src}/target/release/ragpool"));
    let drop_in = c.path("/etc/systemd/system/ragpool.service.d/50-test-timing.conf");
    std::fs::create_dir_all(drop_in.parent().unwrap()).unwrap();
    std::fs::write(&drop_in, DROP_IN).unwrap();
    let install = c.sh(&format!(
        "cd {src} && set -e -x\n{}",
        operators_install_block()
    ));
    assert!(
        install.status.success(),
        "the operator's guide failed:\n{}{}",
        String::from_utf8_lossy(&install.stdout),
        String::from_utf8_lossy(&install.stderr)
    );
    assert_eq!(c.show("ActiveState"), "active", "{}", c.tail());
    assert_eq!(c.show("WatchdogUSec"), "4s");
    // nginx's port 80 is ragpool (not Debian's default site), and the manual was ingested.
    let via_nginx = c.ok("curl -s -m 10 http://127.0.0.1/health");
    let health: serde_json::Value = serde_json::from_str(&via_nginx).unwrap_or_else(|e| {
        panic!("nginx did not answer with ragpool's /health ({e}): {via_nginx}")
    });
    let mut documents = 0;
    assert!(
        wait_until(BOUND, || {
            let h: serde_json::Value =
                serde_json::from_str(&c.ok("curl -s -m 10 http://127.0.0.1/health"))
                    .unwrap_or_default();
            documents = h["store"]["documents"].as_u64().unwrap_or(0);
            documents > 0
        }),
        "the store stayed empty: docs_dir was not found\n{health}\n{}",
        c.tail()
    );
    let security = c.ok("systemd-analyze security ragpool.service | tail -1");
    eprintln!("systemd_real: {}", security.trim());
    check(&format!(
        "install per the README's guide: active after {:?}, WatchdogUSec=4s, nginx :80 answers \
         ragpool's /health, {documents} documents ingested from docs_dir",
        started.elapsed()
    ));

    // ----- 20 reloads under load: each `systemctl reload` returns once the new generation
    // serves (the generation /status reports is already the new one) -------------------------
    let load = c.load();
    assert!(load.wait_for_progress(20, BOUND), "no load progress");
    let first_generation = c.status()["generation"].as_i64().unwrap();
    let mut reload_times = Vec::new();
    for n in 1..=20 {
        let t = Instant::now();
        c.ok("systemctl reload ragpool");
        reload_times.push(t.elapsed());
        let generation = c.status()["generation"].as_i64().unwrap();
        assert_eq!(
            generation,
            first_generation + n,
            "`systemctl reload` {n} returned before its generation served"
        );
        assert_eq!(c.show("ActiveState"), "active");
        assert!(
            load.wait_for_progress(5, BOUND),
            "no progress after reload {n}"
        );
    }
    assert!(c
        .show("StatusText")
        .contains(&format!("generation {}", first_generation + 20)));
    check(&format!(
        "20 x systemctl reload under load: each returned with its generation serving \
         (generation {first_generation} -> {}), median {:?}, max {:?}; requests so far {} ok, {} failed",
        first_generation + 20,
        median(&mut reload_times.clone()),
        reload_times.iter().max().unwrap(),
        load.ok(),
        load.failed()
    ));

    // ----- a broken config: `systemctl reload` fails, the service is untouched -------------
    // Once the last reload's old generation has drained.
    assert!(wait_until(BOUND, || {
        c.status()["workers"].as_array().map_or(0, Vec::len) == c.workers().len()
    }));
    let (pid, workers, generation) = (c.main_pid(), c.workers(), c.status()["generation"].clone());
    c.ok("cp -a /etc/ragpool/workers.toml /root/workers.toml.good && echo 'no_such_key = 1' >> /etc/ragpool/workers.toml");
    let t = Instant::now();
    let rejected = c.sh("systemctl reload ragpool");
    let rejected_after = t.elapsed();
    assert!(
        !rejected.status.success(),
        "a rejected config reported success"
    );
    assert!(c.wait_for_journal("Reload rejected"), "{}", c.tail());
    assert!(c.journal("").contains("no_such_key"), "{}", c.tail());
    assert_eq!(c.show("ActiveState"), "active", "{}", c.tail());
    assert_eq!(c.main_pid(), pid, "{}", c.tail());
    assert_eq!(c.workers(), workers, "the running workers are untouched");
    assert_eq!(c.status()["generation"], generation);
    check(&format!(
        "broken config: systemctl reload failed ({}) after {rejected_after:?}, \"Reload rejected\" \
         naming the key in the journal; MainPID {pid}, workers {workers:?}, generation {generation} \
         unchanged; requests so far {} ok, {} failed",
        rejected.status,
        load.ok(),
        load.failed()
    ));
    c.ok("cp -a /root/workers.toml.good /etc/ragpool/workers.toml");

    // ----- three binary upgrades: systemd follows the new master, which is its child and pets
    // the watchdog; the socket stays systemd's ----------------------------------------------
    c.ok("cp /root/ragpool/target/release/ragpool /usr/local/bin/ragpool.new && mv -f /usr/local/bin/ragpool.new /usr/local/bin/ragpool");
    let mut upgrade_times = Vec::new();
    let mut main_pids = vec![c.main_pid()];
    for n in 1..=3 {
        let old = c.main_pid();
        let t = Instant::now();
        c.ok("systemctl kill --kill-who=main -s USR2 ragpool");
        let mut new = 0;
        assert!(
            wait_until(BOUND, || {
                new = c.main_pid();
                new != old && new != 0 && !c.path(&format!("/proc/{old}")).exists()
            }),
            "upgrade {n}: MainPID stayed {old}\n{}",
            c.tail()
        );
        upgrade_times.push(t.elapsed());
        main_pids.push(new);
        let parent = c.ok(&format!("awk '/^PPid/ {{print $2}}' /proc/{new}/status"));
        assert_eq!(
            parent.trim(),
            "1",
            "upgrade {n}: the new master is systemd's child"
        );
        assert_eq!(c.show("ActiveState"), "active");
        assert!(
            c.path("/run/ragpool.sock").exists(),
            "the socket file is still there"
        );
        assert!(
            load.wait_for_progress(5, BOUND),
            "no progress after upgrade {n}"
        );
    }
    let upgraded = c.main_pid();
    // Two watchdog periods of doing nothing: a master that does not pet would be killed.
    std::thread::sleep(2 * WATCHDOG + Duration::from_secs(1));
    assert_eq!(c.main_pid(), upgraded, "{}", c.tail());
    assert_eq!(c.show("NRestarts"), "0", "{}", c.tail());
    let journal = c.journal("");
    assert!(!journal.contains("Watchdog timeout"), "{journal}");
    let manager = c.ok("journalctl -o cat --no-pager _PID=1");
    assert!(!manager.contains("not our child"), "{manager}");
    assert!(
        !journal.contains("127.0.0.1:8000"),
        "bind was not used: {journal}"
    );
    let report = load.stop();
    check(&format!(
        "3 x USR2 under load: MainPID {main_pids:?}, each new master systemd's child (PPid 1), \
         the socket kept, taking over in median {:?} (max {:?}); {:?} idle after: NRestarts 0, \
         no \"Watchdog timeout\", no \"not our child\", 127.0.0.1:8000 never bound",
        median(&mut upgrade_times.clone()),
        upgrade_times.iter().max().unwrap(),
        2 * WATCHDOG + Duration::from_secs(1)
    ));
    check(&format!(
        "load through the reloads, the rejected reload and the upgrades: {} ok ({} through nginx, \
         {} through /run/ragpool.sock), {} failed",
        report.ok, report.ok_by_probe[0], report.ok_by_probe[1], report.failed
    ));
    assert_eq!(report.failed, 0, "{report:?}");
    eprintln!(
        "systemd_real: 20 reloads (median {:?}, max {:?}), 3 upgrades (median {:?}): {} requests, {} failed",
        median(&mut reload_times.clone()),
        reload_times.iter().max().unwrap(),
        median(&mut upgrade_times),
        report.ok,
        report.failed
    );

    // ----- `systemctl stop` with a request in flight: it completes, no SIGKILL --------------
    let mut slow = UnixStream::connect(c.path("/run/ragpool.sock")).unwrap();
    slow.set_read_timeout(Some(BOUND)).unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n")
        .unwrap();
    let stopping = Instant::now();
    let mut stop = Command::new("timeout")
        .args(["120", "nsenter", "-t", &c.leader.to_string(), "-a"])
        .args(["systemctl", "stop", "ragpool.service"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_until(BOUND, || c.show("ActiveState") == "deactivating"));
    slow.write_all(b"Connection: close\r\n\r\n").unwrap();
    let response = http::read_response(&mut slow).expect("the in-flight request completes");
    assert_eq!(response.status, 200, "{}", response.body);
    assert!(stop.wait().unwrap().success());
    assert_eq!(c.show("ActiveState"), "inactive");
    assert_eq!(c.show("Result"), "success", "{}", c.tail());
    let manager = c.ok("journalctl -o cat --no-pager _PID=1");
    assert!(!manager.contains("SIGKILL"), "{manager}");
    check(&format!(
        "systemctl stop with a request in flight: the request got 200, the stop returned after \
         {:?}, Result=success, no SIGKILL in the manager's journal",
        stopping.elapsed()
    ));

    // ----- restart under load with the socket held: no refused connection ----------------
    c.ok("systemctl start ragpool");
    let load = c.load();
    assert!(load.wait_for_progress(20, BOUND));
    c.ok("systemctl restart ragpool");
    assert!(
        load.wait_for_progress(20, BOUND),
        "no progress after restart"
    );
    let report = load.stop();
    check(&format!(
        "systemctl restart under load, the socket held by systemd: {} ok ({} through nginx, {} \
         through the socket), {} failed",
        report.ok, report.ok_by_probe[0], report.ok_by_probe[1], report.failed
    ));
    assert_eq!(report.failed, 0, "{report:?}");

    // ----- logrotate + USR1: the access log is reopened ------------------------------------
    // (and recycling by max_requests, checked under the hardened unit further down)
    c.ok(r#"sed -i -e 's|^accesslog = .*|accesslog = "/var/log/ragpool/access.log"|' -e 's|^max_requests = 0$|max_requests = 100|' /etc/ragpool/workers.toml && systemctl reload ragpool"#);
    let curl = |agent: &str| {
        c.ok(&format!(
            "curl -s -o /dev/null -A {agent} --unix-socket /run/ragpool.sock http://localhost/health"
        ))
    };
    let access = c.path("/var/log/ragpool/access.log");
    let rotated = c.path("/var/log/ragpool/access.log.1");
    curl("before-rotation");
    assert!(wait_until(BOUND, || std::fs::read_to_string(&access)
        .unwrap_or_default()
        .contains("before-rotation")));
    c.ok("logrotate -f /etc/logrotate.d/ragpool");
    assert!(rotated.exists(), "logrotate rotated access.log");
    assert!(c.wait_for_journal("reopening log files"), "{}", c.tail());
    assert!(
        wait_until(BOUND, || {
            curl("after-rotation");
            std::fs::read_to_string(&access)
                .unwrap_or_default()
                .contains("after-rotation")
        }),
        "the workers did not reopen access.log"
    );
    assert!(!std::fs::read_to_string(&rotated)
        .unwrap()
        .contains("after-rotation"));
    check("logrotate -f: access.log rotated to access.log.1, USR1 logged (\"reopening log files\"), the next request in the new access.log only");

    // ----- recycling under the sandbox: workers replaced after max_requests, none failed -----
    let load = c.load();
    assert!(
        wait_until(BOUND, || c
            .journal("")
            .matches("(max_requests); recycling")
            .count()
            >= 2),
        "no worker was recycled\n{}",
        c.tail()
    );
    let report = load.stop();
    check(&format!(
        "recycling (max_requests = 100) under the hardened unit: {} workers recycled, {} ok, {} failed",
        c.journal("").matches("(max_requests); recycling").count(),
        report.ok,
        report.failed
    ));
    assert_eq!(report.failed, 0, "{report:?}");

    // ----- a frozen master stops petting the watchdog: systemd restarts the service -------
    let frozen = c.main_pid();
    let t = Instant::now();
    c.ok("systemctl kill --kill-who=main -s SIGSTOP ragpool");
    assert!(
        wait_until(BOUND, || {
            let pid = c.main_pid();
            pid != 0 && pid != frozen && c.show("ActiveState") == "active"
        }),
        "the watchdog did not restart a frozen master\n{}",
        c.tail()
    );
    let watchdog_restart = t.elapsed();
    assert_eq!(c.show("NRestarts"), "1");
    assert!(c.journal("").contains("Watchdog timeout"), "{}", c.tail());

    // ----- priorities reach the journal: -p warning shows the errors, not the info --------
    let warnings = c.journal("-p warning");
    assert!(warnings.contains("Reload rejected"), "{warnings}");
    // ... and ExecReload's own complaint.
    assert!(warnings.contains("the reload failed"), "{warnings}");
    assert!(!warnings.contains("are serving"), "{warnings}");
    assert!(c.journal("").contains("are serving"));
    check(&format!(
        "SIGSTOP of the master: the watchdog restarted the service after {watchdog_restart:?} \
         (WatchdogSec=4), NRestarts 1, \"Watchdog timeout\" in the journal"
    ));
    check(&format!(
        "journalctl -p warning: {} of the service's {} lines, \"Reload rejected\" and ExecReload's \
         \"the reload failed\" among them, no info line",
        warnings.lines().filter(|l| !l.trim().is_empty()).count(),
        c.journal("").lines().count()
    ));

    eprintln!(
        "systemd_real: watchdog restart of a frozen master after {watchdog_restart:?}; whole test {:?}",
        started.elapsed()
    );
}
