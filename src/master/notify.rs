//! systemd's notify protocol, spoken by the master only: one datagram per state change to the
//! socket named by `NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace).
//!
//! READY=1 once the first generation serves; RELOADING=1 with MONOTONIC_USEC on HUP and READY=1
//! once the new generation serves (so `Type=notify-reload` works); STOPPING=1 on shutdown;
//! STATUS= one line for `systemctl status`; MAINPID= after a binary upgrade; WATCHDOG=1 at half
//! of WATCHDOG_USEC, sent from the master loop, so a wedged loop stops petting the watchdog.
//!
//! A master pets on its first loop turn: after USR2 the old master stops petting once it drains,
//! and a new master that waited half an interval first could leave systemd without a ping for
//! longer than WatchdogSec across upgrades in quick succession.

use std::os::fd::{AsRawFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::{Duration, Instant};

/// The notify socket, when systemd gave us one.
pub struct Notifier {
    socket: Option<(UnixDatagram, SocketAddr)>,
    /// Half of WATCHDOG_USEC, when the watchdog is on for this process.
    watchdog_every: Option<Duration>,
    /// None until the first WATCHDOG=1.
    last_watchdog: Option<Instant>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET` (and `WATCHDOG_USEC`/`WATCHDOG_PID`) from the environment.
    pub fn from_env() -> Notifier {
        let socket = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            let path = path.to_string_lossy().into_owned();
            let addr = match path.strip_prefix('@') {
                Some(name) => SocketAddr::from_abstract_name(name.as_bytes()).ok()?,
                None => SocketAddr::from_pathname(&path).ok()?,
            };
            let socket = UnixDatagram::unbound().ok()?;
            Some((socket, addr))
        });
        let watchdog_pid_ok = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            .is_none_or(|pid| pid == std::process::id());
        let watchdog_every = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|us| us.parse::<u64>().ok())
            .filter(|us| *us > 0 && watchdog_pid_ok)
            .map(|us| Duration::from_micros(us / 2));
        Notifier {
            socket,
            watchdog_every,
            last_watchdog: None,
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// The socket's fd, which workers must not keep.
    pub fn fd(&self) -> Option<RawFd> {
        self.socket.as_ref().map(|(s, _)| s.as_raw_fd())
    }

    pub fn send(&self, message: &str) {
        if let Some((socket, addr)) = &self.socket {
            if let Err(e) = socket.send_to_addr(message.as_bytes(), addr) {
                log::warn!("cannot notify systemd: {e}");
            }
        }
    }

    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}"));
    }

    pub fn reloading(&self) {
        self.send(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading",
            monotonic_usec()
        ));
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=stopping");
    }

    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={status}"));
    }

    pub fn main_pid(&self, pid: u32) {
        self.send(&format!("MAINPID={pid}"));
    }

    /// Pets the watchdog if half its interval has passed; called once per healthy loop turn.
    pub fn watchdog(&mut self) {
        if let Some(every) = self.watchdog_every {
            if self
                .last_watchdog
                .is_none_or(|last| last.elapsed() >= every)
            {
                self.send("WATCHDOG=1");
                self.last_watchdog = Some(Instant::now());
            }
        }
    }

    /// How long the loop may sleep without missing a watchdog deadline.
    pub fn max_sleep(&self) -> Option<Duration> {
        self.watchdog_every.map(|every| match self.last_watchdog {
            Some(last) => every.saturating_sub(last.elapsed()),
            None => Duration::ZERO,
        })
    }
}

fn monotonic_usec() -> u64 {
    crate::scoreboard::monotonic_ms() * 1000
}
