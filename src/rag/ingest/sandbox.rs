//! The sandbox: HTML and PDF text extraction in a short-lived helper process under limits.
//!
//! Owns both ends of the helper: [`Sandbox::extract`] (the caller's side: spawn, feed, watch,
//! read, classify how it ended) and [`run_helper`] (the helper's side, `ragpool extract`). It
//! must not store, chunk or log document contents.
//!
//! A hostile document can overflow the parser's stack (nested arrays: an abort that
//! `catch_unwind` cannot catch), inflate to gigabytes (a flate bomb) or burn minutes of CPU.
//! None of that may reach a serving worker, so the parser runs in a helper:
//!
//! - the same binary (`/proc/self/exe`, so an upgraded or deleted binary on disk does not
//!   matter), `ragpool extract --format pdf --max-text N`, the document on stdin, one JSON
//!   [`Reply`] on stdout;
//! - spawned by `std::process::Command` (fork + exec: nothing of the caller runs in the child
//!   but the `pre_exec` closure, which makes only async-signal-safe system calls: `setrlimit`
//!   for address space, CPU seconds and stack, `PR_SET_PDEATHSIG` so it dies with its caller,
//!   and `close_range(CLOEXEC)` so no listener or store fd of the caller survives the exec);
//! - watched against a wall-clock deadline (then SIGKILL), with stdout read up to a cap and
//!   stderr up to a few KiB (enough to tell "memory allocation failed" from a stack overflow).
//!
//! A limit that is hit becomes [`IngestError::Sandbox`] naming it ("exceeded the memory limit
//! (1024 MiB)"), which the HTTP layer turns into 422 and `ragpool ingest` reports per file. The
//! caller's memory grows by the reply only, never by the parse.

use std::ffi::OsString;
use std::io::{Read as _, Write};
use std::os::fd::AsFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use serde::{Deserialize, Serialize};

use super::extract;
use super::{Format, IngestError, MAX_DOCUMENT_BYTES};

/// How much of the helper's stderr is kept to classify a crash.
const STDERR_CAP: usize = 16 * 1024;
/// Extra room on the CPU limit's hard value: the soft one sends SIGXCPU, the hard one SIGKILL.
const CPU_HARD_EXTRA: u64 = 1;

/// The limits a helper runs under. From `[rag]` (`extract_*` keys).
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Address space (`RLIMIT_AS`), bytes: allocations beyond it fail and the helper aborts.
    pub memory: u64,
    /// CPU time (`RLIMIT_CPU`); the kernel stops the helper with SIGXCPU.
    pub cpu: Duration,
    /// Wall-clock deadline, for a helper that waits instead of computing.
    pub timeout: Duration,
    /// Main-thread stack (`RLIMIT_STACK`), bytes: deep recursion ends in a clean abort.
    pub stack: u64,
    /// Longest extracted text, bytes; a longer one is refused ([`IngestError::TextTooLarge`]).
    pub max_text: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            memory: 1024 * 1024 * 1024,
            cpu: Duration::from_secs(30),
            timeout: Duration::from_secs(60),
            stack: 8 * 1024 * 1024,
            max_text: 16 * 1024 * 1024,
        }
    }
}

/// How HTML and PDF are parsed: in a helper process (what serving and `ragpool ingest` use),
/// or in this process (unit tests of the parsers, which have no `ragpool` binary to run).
#[derive(Debug, Clone)]
pub enum Extractor {
    InProcess { max_text: usize },
    Sandboxed(Sandbox),
}

impl Extractor {
    /// The sandbox running this very binary's `extract` subcommand.
    pub fn sandboxed(limits: Limits) -> Extractor {
        Extractor::Sandboxed(Sandbox::this_binary(limits))
    }

    /// Parsers in this process, with the default text cap. Not for untrusted input in a
    /// serving process.
    pub fn in_process() -> Extractor {
        Extractor::InProcess {
            max_text: Limits::default().max_text,
        }
    }

    /// (title, text) of a document. Markdown and plain text are decoded here (linear work in
    /// our own code); HTML and PDF go to the helper when sandboxed.
    pub fn text_of(
        &self,
        name: &str,
        bytes: &[u8],
        format: Format,
    ) -> Result<(Option<String>, String), IngestError> {
        match (self, format) {
            (Extractor::InProcess { max_text }, _) => {
                extract::text_of(name, bytes, format, *max_text)
            }
            (Extractor::Sandboxed(sandbox), Format::Markdown | Format::Text) => {
                extract::text_of(name, bytes, format, sandbox.limits.max_text)
            }
            (Extractor::Sandboxed(sandbox), Format::Html | Format::Pdf) => {
                sandbox.extract(name, bytes, format)
            }
        }
    }
}

/// A helper program and the limits it runs under.
#[derive(Debug, Clone)]
pub struct Sandbox {
    program: PathBuf,
    /// Arguments before ours (`extract --format ...`); empty for the ragpool binary itself.
    leading_args: Vec<OsString>,
    limits: Limits,
}

/// What the helper prints on stdout: one JSON value.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Text {
        title: Option<String>,
        text: String,
    },
    /// The document is bad in a way the parser could say (not a limit).
    NotUtf8 {
        offset: usize,
    },
    NoTextLayer,
    Malformed {
        reason: String,
    },
    Empty,
    TextTooLarge,
}

impl Sandbox {
    /// `/proc/self/exe extract ...`: the binary this process runs, even if the file on disk was
    /// replaced by an upgrade.
    pub fn this_binary(limits: Limits) -> Sandbox {
        Sandbox {
            program: PathBuf::from("/proc/self/exe"),
            leading_args: Vec::new(),
            limits,
        }
    }

    /// Any program speaking the helper protocol (tests use a shell to play a crashing helper).
    pub fn with_program(program: PathBuf, leading_args: Vec<OsString>, limits: Limits) -> Sandbox {
        Sandbox {
            program,
            leading_args,
            limits,
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Runs the helper on `bytes`, blocking until it answers, fails or runs out of time.
    pub fn extract(
        &self,
        name: &str,
        bytes: &[u8],
        format: Format,
    ) -> Result<(Option<String>, String), IngestError> {
        let failed = |reason: String| IngestError::Sandbox {
            name: name.to_string(),
            format,
            reason,
        };
        let mut child = self
            .command(format)
            .spawn()
            .map_err(|e| failed(format!("could not start the parser process: {e}")))?;
        let started = Instant::now();
        let outcome = self.exchange(&mut child, bytes, started);
        let status = match outcome.killed_at_deadline {
            true => None,
            false => wait_until(&mut child, started + self.limits.timeout),
        };
        let status = match status {
            Some(status) => status,
            None => {
                // Over time (or it would not exit after closing its output): stop it for good.
                let _ = child.kill();
                let _ = child.wait();
                return Err(failed(format!(
                    "took longer than {} s (extract_timeout)",
                    self.limits.timeout.as_secs()
                )));
            }
        };
        if outcome.stdout_overflow {
            return Err(IngestError::TextTooLarge {
                name: name.to_string(),
                limit: self.limits.max_text,
            });
        }
        if status.success() {
            let reply: Reply = serde_json::from_slice(&outcome.stdout)
                .map_err(|e| failed(format!("the parser process answered nonsense ({e})")))?;
            return reply_to_result(name, format, reply, self.limits.max_text);
        }
        Err(failed(self.classify(status, &outcome.stderr)))
    }

    fn command(&self, format: Format) -> Command {
        let mut command = Command::new(&self.program);
        command
            .args(&self.leading_args)
            .arg("extract")
            .arg("--format")
            .arg(format_arg(format))
            .arg("--max-text")
            .arg(self.limits.max_text.to_string())
            .env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LIB_BACKTRACE")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let limits = RawLimits::from(&self.limits);
        // SAFETY: the closure runs in the forked child before exec and only makes system calls
        // that are async-signal-safe (setrlimit, prctl, close_range); it allocates nothing and
        // takes no lock. `limits` is plain data copied into the closure.
        unsafe {
            command.pre_exec(move || limits.apply());
        }
        command
    }

    /// Feeds `bytes` to the helper's stdin while reading its stdout and stderr, all
    /// non-blocking under one `poll`, until both outputs close or the deadline passes.
    fn exchange(&self, child: &mut Child, bytes: &[u8], started: Instant) -> Exchange {
        let deadline = started + self.limits.timeout;
        // The reply is JSON: escaping can double the text, plus room for the title.
        let stdout_cap = self.limits.max_text.saturating_mul(2) + 64 * 1024;
        let mut stdin = child.stdin.take();
        let mut stdout = child.stdout.take();
        let mut stderr = child.stderr.take();
        for fd in [
            stdin.as_ref().map(|p| p.as_fd()),
            stdout.as_ref().map(|p| p.as_fd()),
            stderr.as_ref().map(|p| p.as_fd()),
        ]
        .into_iter()
        .flatten()
        {
            set_nonblocking(fd);
        }
        let mut out = Exchange::default();
        let mut written = 0;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if written == bytes.len() {
                stdin = None; // EOF for the helper
            }
            if stdin.is_none() && stdout.is_none() && stderr.is_none() {
                return out;
            }
            let now = Instant::now();
            if now >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                out.killed_at_deadline = true;
                return out;
            }
            let wait = (deadline - now).min(Duration::from_secs(1));
            let mut fds = Vec::with_capacity(3);
            let mut which = Vec::with_capacity(3);
            if let Some(p) = &stdin {
                fds.push(PollFd::new(p.as_fd(), PollFlags::POLLOUT));
                which.push(0);
            }
            if let Some(p) = &stdout {
                fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
                which.push(1);
            }
            if let Some(p) = &stderr {
                fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
                which.push(2);
            }
            let timeout =
                PollTimeout::try_from(wait.as_millis().max(1) as i32).unwrap_or(PollTimeout::MAX);
            match poll(&mut fds, timeout) {
                Ok(0) => continue,
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => {
                    // Cannot watch the pipes: give up on this helper.
                    let _ = child.kill();
                    let _ = child.wait();
                    out.killed_at_deadline = true;
                    return out;
                }
            }
            let ready: Vec<(usize, bool)> = fds
                .iter()
                .zip(&which)
                .map(|(fd, w)| (*w, fd.revents().is_some_and(|r| !r.is_empty())))
                .collect();
            drop(fds);
            for (w, is_ready) in ready {
                if !is_ready {
                    continue;
                }
                match w {
                    0 => {
                        let Some(pipe) = stdin.as_mut() else { continue };
                        match pipe.write(&bytes[written..]) {
                            Ok(n) => written += n,
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                            // The helper stopped reading (it died): its status will say why.
                            Err(_) => written = bytes.len(),
                        }
                    }
                    1 => {
                        let Some(pipe) = stdout.as_mut() else {
                            continue;
                        };
                        match read_some(pipe, &mut buf) {
                            ReadOutcome::NotYet => {}
                            ReadOutcome::Closed => stdout = None,
                            ReadOutcome::Data(n) => {
                                if out.stdout.len() + n > stdout_cap {
                                    // More than any reply within the cap: stop it now.
                                    out.stdout_overflow = true;
                                    let _ = child.kill();
                                    stdout = None;
                                } else {
                                    out.stdout.extend_from_slice(&buf[..n]);
                                }
                            }
                        }
                    }
                    _ => {
                        let Some(pipe) = stderr.as_mut() else {
                            continue;
                        };
                        match read_some(pipe, &mut buf) {
                            ReadOutcome::NotYet => {}
                            ReadOutcome::Closed => stderr = None,
                            ReadOutcome::Data(n) => {
                                let room = STDERR_CAP.saturating_sub(out.stderr.len());
                                out.stderr.extend_from_slice(&buf[..n.min(room)]);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Why a helper that did not answer ended, in the words of the limit it hit.
    fn classify(&self, status: std::process::ExitStatus, stderr: &[u8]) -> String {
        let stderr = String::from_utf8_lossy(stderr);
        let mib = |bytes: u64| bytes / (1024 * 1024);
        if stderr.contains("memory allocation of") || stderr.contains("capacity overflow") {
            return format!(
                "exceeded the memory limit ({} MiB, extract_memory)",
                mib(self.limits.memory)
            );
        }
        if stderr.contains("overflowed its stack") {
            return format!(
                "nested too deeply: exceeded the stack limit ({} MiB)",
                mib(self.limits.stack)
            );
        }
        match status.signal() {
            Some(libc::SIGXCPU) => format!(
                "exceeded the CPU time limit ({} s, extract_cpu)",
                self.limits.cpu.as_secs()
            ),
            Some(libc::SIGKILL) => format!(
                "the parser process was killed (the CPU limit of {} s, or the system ran out of memory)",
                self.limits.cpu.as_secs()
            ),
            Some(signal) => format!("the parser crashed (signal {signal})"),
            None => {
                let last = stderr.lines().rev().find(|l| !l.trim().is_empty());
                match last {
                    Some(line) => format!(
                        "the parser process failed (exit {}): {}",
                        status.code().unwrap_or(-1),
                        line.trim()
                    ),
                    None => format!(
                        "the parser process failed (exit {})",
                        status.code().unwrap_or(-1)
                    ),
                }
            }
        }
    }
}

/// What came back over the pipes.
#[derive(Default)]
struct Exchange {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    /// The reply passed its cap; the helper was killed.
    stdout_overflow: bool,
    /// The deadline passed; the helper was killed and reaped.
    killed_at_deadline: bool,
}

/// One non-blocking read.
enum ReadOutcome {
    Data(usize),
    /// End of file, or an error: either way this pipe is done.
    Closed,
    /// A spurious wake-up: nothing to read yet.
    NotYet,
}

fn read_some(pipe: &mut impl std::io::Read, buf: &mut [u8]) -> ReadOutcome {
    loop {
        match pipe.read(buf) {
            Ok(0) => return ReadOutcome::Closed,
            Ok(n) => return ReadOutcome::Data(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return ReadOutcome::NotYet,
            Err(_) => return ReadOutcome::Closed,
        }
    }
}

fn set_nonblocking(fd: std::os::fd::BorrowedFd<'_>) {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    use std::os::fd::AsRawFd;
    if let Ok(flags) = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL) {
        let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
        let _ = fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags));
    }
}

/// Waits for the child until `deadline`; `None` if it is still running then.
fn wait_until(child: &mut Child, deadline: Instant) -> Option<std::process::ExitStatus> {
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => return None,
            Err(_) => return None,
        }
    }
}

fn format_arg(format: Format) -> &'static str {
    match format {
        Format::Markdown => "markdown",
        Format::Text => "text",
        Format::Html => "html",
        Format::Pdf => "pdf",
    }
}

/// `--format` of the helper.
pub fn parse_format_arg(arg: &str) -> Option<Format> {
    match arg {
        "markdown" => Some(Format::Markdown),
        "text" => Some(Format::Text),
        "html" => Some(Format::Html),
        "pdf" => Some(Format::Pdf),
        _ => None,
    }
}

fn reply_to_result(
    name: &str,
    format: Format,
    reply: Reply,
    max_text: usize,
) -> Result<(Option<String>, String), IngestError> {
    let name = name.to_string();
    match reply {
        Reply::Text { title, text } if text.len() > max_text => {
            drop((title, text));
            Err(IngestError::TextTooLarge {
                name,
                limit: max_text,
            })
        }
        Reply::Text { title, text } => Ok((title, text)),
        Reply::NotUtf8 { offset } => Err(IngestError::NotUtf8 { name, offset }),
        Reply::NoTextLayer => Err(IngestError::NoTextLayer { name }),
        Reply::Malformed { reason } => Err(IngestError::Malformed {
            name,
            format,
            reason,
        }),
        Reply::Empty => Err(IngestError::Empty { name }),
        Reply::TextTooLarge => Err(IngestError::TextTooLarge {
            name,
            limit: max_text,
        }),
    }
}

/// The limits as the raw numbers `setrlimit` takes, computed before fork.
#[derive(Clone, Copy)]
struct RawLimits {
    memory: libc::rlim_t,
    cpu: libc::rlim_t,
    stack: libc::rlim_t,
}

impl From<&Limits> for RawLimits {
    fn from(limits: &Limits) -> RawLimits {
        RawLimits {
            memory: limits.memory as libc::rlim_t,
            cpu: limits.cpu.as_secs().max(1) as libc::rlim_t,
            stack: limits.stack as libc::rlim_t,
        }
    }
}

impl RawLimits {
    /// In the forked child, before exec: only async-signal-safe system calls.
    fn apply(&self) -> std::io::Result<()> {
        set_rlimit(libc::RLIMIT_AS, self.memory, self.memory)?;
        set_rlimit(libc::RLIMIT_CPU, self.cpu, self.cpu + CPU_HARD_EXTRA)?;
        set_rlimit(libc::RLIMIT_STACK, self.stack, self.stack)?;
        // SAFETY: plain system calls on this (child) process; no memory is passed.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            // Every fd but stdio closes at exec (listeners, the store, other pipes). Older
            // kernels without close_range keep them; the helper never touches them anyway.
            libc::syscall(
                libc::SYS_close_range,
                3 as libc::c_uint,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC as libc::c_uint,
            );
        }
        Ok(())
    }
}

fn set_rlimit(
    resource: libc::__rlimit_resource_t,
    soft: libc::rlim_t,
    hard: libc::rlim_t,
) -> std::io::Result<()> {
    // Never raise a hard limit the caller already has below ours (that would fail).
    let mut current = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write/read the one struct we pass; async-signal-safe.
    unsafe {
        if libc::getrlimit(resource, &mut current) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let hard = hard.min(current.rlim_max);
        let limit = libc::rlimit {
            rlim_cur: soft.min(hard),
            rlim_max: hard,
        };
        if libc::setrlimit(resource, &limit) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The helper's side (`ragpool extract`): reads the document from stdin, extracts, prints one
/// JSON [`Reply`]. Returns the exit code: 0 with a reply, 2 when the input could not be read.
/// Runs in its own process under the limits set before exec; it may die of them, which is the
/// point.
pub fn run_helper(format: Format, max_text: usize) -> i32 {
    // A panic is caught inside the parsers and becomes `Malformed`; keep stderr for aborts.
    std::panic::set_hook(Box::new(|_| {}));
    let mut bytes = Vec::new();
    if let Err(e) = std::io::stdin()
        .lock()
        .take(MAX_DOCUMENT_BYTES + 1)
        .read_to_end(&mut bytes)
    {
        eprintln!("ragpool extract: cannot read the document from stdin: {e}");
        return 2;
    }
    let reply = match extract::text_of("document", &bytes, format, max_text) {
        Ok((title, text)) => Reply::Text { title, text },
        Err(IngestError::NotUtf8 { offset, .. }) => Reply::NotUtf8 { offset },
        Err(IngestError::NoTextLayer { .. }) => Reply::NoTextLayer,
        Err(IngestError::Malformed { reason, .. }) => Reply::Malformed { reason },
        Err(IngestError::Empty { .. }) => Reply::Empty,
        Err(IngestError::TextTooLarge { .. }) => Reply::TextTooLarge,
        Err(other) => Reply::Malformed {
            reason: other.to_string(),
        },
    };
    drop(bytes);
    let mut stdout = std::io::stdout().lock();
    let written = serde_json::to_writer(&mut stdout, &reply)
        .map_err(std::io::Error::from)
        .and_then(|()| stdout.flush());
    match written {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("ragpool extract: cannot write the reply: {e}");
            2
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shell plays the helper: `sh -c SCRIPT sh extract --format ...`.
    fn shell(script: &str, limits: Limits) -> Sandbox {
        Sandbox::with_program(
            PathBuf::from("/bin/sh"),
            vec!["-c".into(), script.into(), "sh".into()],
            limits,
        )
    }

    fn reason(result: Result<(Option<String>, String), IngestError>) -> String {
        match result {
            Err(IngestError::Sandbox { reason, .. }) => reason,
            other => panic!("expected a sandbox error, got {other:?}"),
        }
    }

    #[test]
    fn the_helper_runs_under_the_limits_with_only_stdio_open() {
        let limits = Limits {
            memory: 900 * 1024 * 1024,
            cpu: Duration::from_secs(7),
            stack: 4 * 1024 * 1024,
            ..Limits::default()
        };
        let script = r#"cat >/dev/null; fds=$(ls /proc/self/fd | tr '\n' ' ')
printf '{"malformed":{"reason":"%s %s %s fds %s"}}' "$(ulimit -v)" "$(ulimit -t)" "$(ulimit -s)" "$fds""#;
        let err = shell(script, limits)
            .extract("a.pdf", b"%PDF-1.4", Format::Pdf)
            .unwrap_err();
        let IngestError::Malformed { reason, name, .. } = err else {
            panic!("{err:?}");
        };
        assert_eq!(name, "a.pdf");
        // KiB of address space, CPU seconds, KiB of stack; then the open fds: 0, 1, 2 and the
        // one `ls` opened to list them.
        assert!(reason.starts_with("921600 7 4096 fds "), "{reason}");
        let fds: Vec<&str> = reason
            .split("fds ")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .collect();
        assert_eq!(fds.len(), 4, "{reason}");
        assert_eq!(&fds[..3], ["0", "1", "2"], "{reason}");
    }

    #[test]
    fn a_reply_comes_back_as_title_and_text() {
        let script = r#"cat >/dev/null; printf '{"text":{"title":"T","text":"hello"}}'"#;
        let (title, text) = shell(script, Limits::default())
            .extract("a.html", b"<p>x</p>", Format::Html)
            .unwrap();
        assert_eq!((title.as_deref(), text.as_str()), (Some("T"), "hello"));
    }

    #[test]
    fn a_helper_past_its_deadline_is_killed_and_named() {
        let limits = Limits {
            timeout: Duration::from_secs(1),
            ..Limits::default()
        };
        let started = Instant::now();
        let reason = reason(shell("exec sleep 30", limits).extract("a.pdf", b"x", Format::Pdf));
        assert!(reason.contains("took longer than 1 s"), "{reason}");
        assert!(started.elapsed() < Duration::from_secs(20));
    }

    #[test]
    fn crashes_are_told_apart_by_what_the_helper_said() {
        let abort = |message: &str| {
            let script = format!("cat >/dev/null; echo '{message}' >&2; kill -ABRT $$");
            reason(shell(&script, Limits::default()).extract("a.pdf", b"x", Format::Pdf))
        };
        assert!(abort("memory allocation of 4096 bytes failed")
            .contains("exceeded the memory limit (1024 MiB"));
        assert!(abort("thread 'main' has overflowed its stack").contains("nested too deeply"));
        let segv = reason(
            shell("cat >/dev/null; kill -SEGV $$", Limits::default()).extract(
                "a.pdf",
                b"x",
                Format::Pdf,
            ),
        );
        assert_eq!(segv, "the parser crashed (signal 11)");
        let cpu = reason(
            shell("cat >/dev/null; kill -XCPU $$", Limits::default()).extract(
                "a.pdf",
                b"x",
                Format::Pdf,
            ),
        );
        assert!(cpu.contains("exceeded the CPU time limit (30 s"), "{cpu}");
        let exit = reason(
            shell("echo 'no such thing' >&2; exit 7", Limits::default()).extract(
                "a.pdf",
                b"x",
                Format::Pdf,
            ),
        );
        assert_eq!(exit, "the parser process failed (exit 7): no such thing");
        let nonsense = reason(
            shell("cat >/dev/null; echo '{not json'", Limits::default()).extract(
                "a.pdf",
                b"x",
                Format::Pdf,
            ),
        );
        assert!(
            nonsense.starts_with("the parser process answered nonsense"),
            "{nonsense}"
        );
    }

    #[test]
    fn output_past_the_text_cap_stops_the_helper() {
        let limits = Limits {
            max_text: 1000,
            ..Limits::default()
        };
        // Endless output: only the cap (and the kill that follows) ends it.
        let err = shell("cat >/dev/null; exec yes", limits)
            .extract("a.pdf", b"x", Format::Pdf)
            .unwrap_err();
        assert!(
            matches!(err, IngestError::TextTooLarge { limit: 1000, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn a_large_document_is_fed_whole_while_output_is_read() {
        // The helper echoes its input back as the text: 4 MiB each way through 64 KiB pipes.
        let script = r#"printf '{"text":{"title":null,"text":"'; cat; printf '"}}'"#;
        let input = vec![b'a'; 4 << 20];
        let (_, text) = shell(script, Limits::default())
            .extract("a.html", &input, Format::Html)
            .unwrap();
        assert_eq!(text.len(), input.len());
    }

    #[test]
    fn a_helper_that_cannot_start_is_a_clear_error() {
        let sandbox = Sandbox::with_program(
            PathBuf::from("/nonexistent/ragpool"),
            vec![],
            Limits::default(),
        );
        let reason = reason(sandbox.extract("a.pdf", b"x", Format::Pdf));
        assert!(
            reason.starts_with("could not start the parser process"),
            "{reason}"
        );
    }
}
