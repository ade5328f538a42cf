//! State on disk: one directory per sandbox under the root, held by a lock
//! its owner keeps for its whole life. A directory whose lock is free belongs
//! to a dead owner; `collect_garbage` kills what it left and removes it.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("creating state directory {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("sandbox {0} already exists")]
    Exists(String),
    #[error("locking {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

pub const DEFAULT_ROOT: &str = "/run/podvisor";
const LOCK: &str = "lock";
const VMM_PID: &str = "vmm.pid";

/// A sandbox's directory, locked for as long as this value lives.
pub struct StateDir {
    pub path: PathBuf,
    _lock: File,
}

fn sandboxes(root: &Path) -> PathBuf {
    root.join("sandboxes")
}

fn try_lock(file: &File) -> io::Result<bool> {
    // SAFETY: flock on a valid, open fd; no memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

impl StateDir {
    pub fn create(root: &Path, id: &str) -> Result<StateDir, StateError> {
        let parent = sandboxes(root);
        fs::create_dir_all(&parent).map_err(|source| StateError::Create {
            path: parent.clone(),
            source,
        })?;
        let path = parent.join(id);
        match fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(StateError::Exists(id.into()))
            }
            Err(source) => return Err(StateError::Create { path, source }),
        }
        let lock_path = path.join(LOCK);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .and_then(|f| try_lock(&f).map(|_| f))
            .map_err(|source| StateError::Lock {
                path: lock_path,
                source,
            })?;
        Ok(StateDir { path, _lock: lock })
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    pub fn record_vmm_pid(&self, pid: u32) {
        let _ = fs::write(self.file(VMM_PID), pid.to_string());
    }

    pub fn remove(self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Whether process `pid` is alive and was started with `needle` in its
/// command line (guards against a recycled pid).
fn process_matches(pid: i32, needle: &str) -> bool {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(needle))
        .unwrap_or(false)
}

/// Removes the directories of sandboxes whose owner died, killing the VMM
/// they left if it still runs. Returns the ids removed.
pub fn collect_garbage(root: &Path) -> Vec<String> {
    let mut removed = Vec::new();
    let Ok(entries) = fs::read_dir(sandboxes(root)) else {
        return removed;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let Ok(lock) = File::open(dir.join(LOCK)) else {
            // A directory without a lock is being created right now, or broken:
            // leave it unless it is old.
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .map(|t| t.elapsed().map(|e| e.as_secs() > 60).unwrap_or(false))
                .unwrap_or(false);
            if old {
                let _ = fs::remove_dir_all(&dir);
            }
            continue;
        };
        if !matches!(try_lock(&lock), Ok(true)) {
            continue;
        }
        if let Some(pid) = fs::read_to_string(dir.join(VMM_PID))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            if process_matches(pid, &dir.to_string_lossy()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        if fs::remove_dir_all(&dir).is_ok() {
            removed.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "podvisor-state-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        fs::create_dir_all(&p).unwrap();
        p
    }

    #[test]
    fn live_sandbox_survives_gc_and_dead_one_goes() {
        let r = root();
        let live = StateDir::create(&r, "live").unwrap();
        let dead = StateDir::create(&r, "dead").unwrap();
        let dead_path = dead.path.clone();
        drop(dead); // owner gone, lock released, directory left behind
        assert_eq!(collect_garbage(&r), vec!["dead".to_string()]);
        assert!(!dead_path.exists());
        assert!(live.path.exists());
        live.remove();
        fs::remove_dir_all(&r).unwrap();
    }

    #[test]
    fn duplicate_id_is_refused() {
        let r = root();
        let a = StateDir::create(&r, "x").unwrap();
        assert!(matches!(
            StateDir::create(&r, "x"),
            Err(StateError::Exists(_))
        ));
        a.remove();
        fs::remove_dir_all(&r).unwrap();
    }
}
