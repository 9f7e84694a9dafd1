//! The error log: `log` records formatted like Gunicorn's, to standard error or to a file that
//! `SIGUSR1` reopens (logrotate's `postrotate`). No background thread: the master must stay
//! single-threaded, and each write is one `write(2)` of a whole line.
//!
//! When standard error is the journal (systemd sets `JOURNAL_STREAM` to its device and inode),
//! each line starts with its syslog priority, `<3>` error, `<4>` warning, `<6>` info, `<7>`
//! debug (sd-daemon(3)'s convention), so `journalctl -p warning` finds the warnings. Lines to a
//! file or a terminal are unchanged.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::config::LogTarget;

/// The open error-log file, if logging to one.
static ERROR_LOG: Mutex<Option<(PathBuf, File)>> = Mutex::new(None);

/// Installs the logger. `RUST_LOG` wins over `loglevel`.
pub fn init(target: &LogTarget, loglevel: &str) -> io::Result<()> {
    let mut builder = env_logger::Builder::new();
    builder.parse_filters(loglevel);
    if let Ok(filters) = std::env::var("RUST_LOG") {
        builder.parse_filters(&filters);
    }
    let journal = matches!(target, LogTarget::Std) && stderr_is_journal();
    builder.format(move |buf, record| {
        if journal {
            write!(buf, "<{}>", syslog_priority(record.level()))?;
        }
        writeln!(
            buf,
            "[{}] [{}] [{}] {}",
            buf.timestamp_millis(),
            std::process::id(),
            record.level(),
            record.args()
        )
    });
    if let LogTarget::File(path) = target {
        let file = open_append(path)?;
        *lock() = Some((path.clone(), file));
        builder.target(env_logger::Target::Pipe(Box::new(ErrorLogFile)));
    } else {
        builder.target(env_logger::Target::Stderr);
    }
    // A second init (tests) is harmless.
    let _ = builder.try_init();
    Ok(())
}

/// sd-daemon's priority prefix for a level.
fn syslog_priority(level: log::Level) -> u8 {
    match level {
        log::Level::Error => 3,
        log::Level::Warn => 4,
        log::Level::Info => 6,
        log::Level::Debug | log::Level::Trace => 7,
    }
}

/// Whether standard error is the stream systemd named in `JOURNAL_STREAM` ("device:inode"):
/// the variable alone is not enough, as it is inherited by processes whose stderr was redirected.
pub fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    nix::sys::stat::fstat(libc::STDERR_FILENO)
        .is_ok_and(|st| st.st_dev as u64 == dev && st.st_ino as u64 == ino)
}

/// Reopens the error-log file at its path (after logrotate moved it away).
pub fn reopen_error_log() -> io::Result<()> {
    let mut guard = lock();
    if let Some((path, file)) = guard.as_mut() {
        *file = open_append(path)?;
    }
    Ok(())
}

pub fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

fn lock() -> std::sync::MutexGuard<'static, Option<(PathBuf, File)>> {
    ERROR_LOG
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct ErrorLogFile;

impl Write for ErrorLogFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match lock().as_mut() {
            Some((_, file)) => file.write_all(buf).map(|()| buf.len()),
            None => io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
