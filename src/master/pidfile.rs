//! The master's pidfile: written atomically, refused while a live master holds it, removed on
//! exit only if it still names us.

use std::io;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::signal::kill;
use nix::unistd::Pid;

#[derive(Debug, thiserror::Error)]
pub enum PidfileError {
    #[error("pidfile {} names pid {pid}, which is still running: is another ragpool master up? Stop it or choose another pidfile", path.display())]
    InUse { path: PathBuf, pid: i32 },
    #[error("cannot write pidfile {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

pub struct Pidfile {
    path: PathBuf,
    pid: i32,
}

impl Pidfile {
    pub fn create(path: &Path) -> Result<Pidfile, PidfileError> {
        let me = std::process::id() as i32;
        if let Some(pid) = read_pid(path) {
            if pid != me && is_alive(pid) {
                return Err(PidfileError::InUse {
                    path: path.to_path_buf(),
                    pid,
                });
            }
        }
        write_atomically(path, me).map_err(|source| PidfileError::Write {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Pidfile {
            path: path.to_path_buf(),
            pid: me,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves the file to `to` (USR2 renames it `<pidfile>.oldbin`); this value follows it.
    pub fn rename(&mut self, to: &Path) -> std::io::Result<()> {
        std::fs::rename(&self.path, to)?;
        self.path = to.to_path_buf();
        Ok(())
    }
}

impl Drop for Pidfile {
    fn drop(&mut self) {
        if read_pid(&self.path) == Some(self.pid) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

pub fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn is_alive(pid: i32) -> bool {
    !matches!(kill(Pid::from_raw(pid), None), Err(Errno::ESRCH))
}

fn write_atomically(path: &Path, pid: i32) -> io::Result<()> {
    let tmp = path.with_extension(format!("tmp.{pid}"));
    std::fs::write(&tmp, format!("{pid}\n"))?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_a_live_pid_and_replaces_a_stale_one() {
        let dir = std::env::temp_dir().join(format!("ragpool-pid-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ragpool.pid");
        // pid 1 is always alive.
        std::fs::write(&path, "1\n").unwrap();
        assert!(matches!(
            Pidfile::create(&path),
            Err(PidfileError::InUse { pid: 1, .. })
        ));
        // A pid far above pid_max is certainly not running.
        std::fs::write(&path, "999999999\n").unwrap();
        let pidfile = Pidfile::create(&path).unwrap();
        assert_eq!(read_pid(&path), Some(std::process::id() as i32));
        drop(pidfile);
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
