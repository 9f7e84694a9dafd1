//! The access log: one line per request, Gunicorn's combined format plus duration and pid:
//!
//! `127.0.0.1 - - [27/Nov/2026:21:31:47 +0000] "GET /health HTTP/1.1" 200 31 "-" "curl/8.5" 0.000412 4242`
//!
//! Each line is one `write(2)` (the file is opened `O_APPEND`), so lines from many workers
//! never interleave. `SIGUSR1` reopens the file.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::LogTarget;
use crate::logging::open_append;

#[derive(Debug, thiserror::Error)]
#[error("cannot open access log {}: {source}", path.display())]
pub struct AccessLogError {
    path: PathBuf,
    #[source]
    source: io::Error,
}

/// Where access lines go. Lives in one worker, on one thread.
pub enum AccessLog {
    Off,
    Stdout,
    File { path: PathBuf, file: RefCell<File> },
}

/// What one access line says.
pub struct Entry<'a> {
    pub remote: &'a str,
    pub request_line: &'a str,
    pub status: u16,
    pub bytes: u64,
    pub referer: &'a str,
    pub user_agent: &'a str,
    pub duration: Duration,
}

impl AccessLog {
    pub fn open(target: Option<&LogTarget>) -> Result<AccessLog, AccessLogError> {
        Ok(match target {
            None => AccessLog::Off,
            Some(LogTarget::Std) => AccessLog::Stdout,
            Some(LogTarget::File(path)) => {
                let file = open_append(path).map_err(|source| AccessLogError {
                    path: path.clone(),
                    source,
                })?;
                AccessLog::File {
                    path: path.clone(),
                    file: RefCell::new(file),
                }
            }
        })
    }

    pub fn is_on(&self) -> bool {
        !matches!(self, AccessLog::Off)
    }

    pub fn reopen(&self) -> Result<(), AccessLogError> {
        if let AccessLog::File { path, file } = self {
            let fresh = open_append(path).map_err(|source| AccessLogError {
                path: path.clone(),
                source,
            })?;
            *file.borrow_mut() = fresh;
        }
        Ok(())
    }

    pub fn write(&self, entry: &Entry<'_>) {
        if !self.is_on() {
            return;
        }
        let line = format_entry(entry, SystemTime::now(), std::process::id());
        let result = match self {
            AccessLog::Off => Ok(()),
            AccessLog::Stdout => io::stdout().lock().write_all(line.as_bytes()),
            AccessLog::File { file, .. } => file.borrow_mut().write_all(line.as_bytes()),
        };
        if let Err(e) = result {
            log::warn!("cannot write the access log: {e}");
        }
    }
}

pub fn format_entry(entry: &Entry<'_>, now: SystemTime, pid: u32) -> String {
    let mut line = String::with_capacity(160);
    let _ = writeln!(
        line,
        "{} - - [{}] \"{}\" {} {} \"{}\" \"{}\" {:.6} {}",
        entry.remote,
        clf_time(now),
        entry.request_line.escape_debug(),
        entry.status,
        entry.bytes,
        entry.referer.escape_debug(),
        entry.user_agent.escape_debug(),
        entry.duration.as_secs_f64(),
        pid
    );
    line
}

/// `27/Nov/2026:21:31:47 +0000` (Common Log Format, UTC).
pub fn clf_time(now: SystemTime) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{day:02}/{}/{year}:{:02}:{:02}:{:02} +0000",
        MONTHS[(month - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day): Howard Hinnant's algorithm.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_gunicorn() {
        // 2026-11-27T21:31:47Z
        let t = UNIX_EPOCH + Duration::from_secs(1_795_815_107);
        assert_eq!(clf_time(t), "27/Nov/2026:21:31:47 +0000");
        assert_eq!(
            clf_time(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "29/Feb/2000:00:00:00 +0000"
        );
        let line = format_entry(
            &Entry {
                remote: "127.0.0.1",
                request_line: "GET /health HTTP/1.1",
                status: 200,
                bytes: 31,
                referer: "-",
                user_agent: "curl/8",
                duration: Duration::from_micros(412),
            },
            t,
            42,
        );
        assert_eq!(
            line,
            "127.0.0.1 - - [27/Nov/2026:21:31:47 +0000] \"GET /health HTTP/1.1\" 200 31 \"-\" \"curl/8\" 0.000412 42\n"
        );
    }
}
