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
/// The pid of the process the directory is for (its creator, or the
/// process a pool handed the VM to).
const OWNER: &str = "owner";
const VM: &str = "vm";
const JAIL: &str = "jail";

/// A sandbox's directory, locked for as long as this value lives.
pub struct StateDir {
    pub path: PathBuf,
    _lock: File,
}

/// The lock files of the uids jailed VMMs run as: one directory for the
/// whole host, whatever the `--root`: a uid (and the cgroup named after it)
/// belongs to one VM at a time across all roots.
pub fn uids() -> PathBuf {
    PathBuf::from(UIDS)
}

const UIDS: &str = "/run/podvisor/uids";

fn sandboxes(root: &Path) -> PathBuf {
    root.join("sandboxes")
}

/// Where the sandbox `id` keeps its sockets and logs.
pub fn sandbox_dir(root: &Path, id: &str) -> PathBuf {
    sandboxes(root).join(id)
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
    /// Creates and locks `ROOT/sandboxes/<id>`. The directory is made under
    /// a hidden name and renamed into place once locked, so garbage
    /// collection never sees it unlocked.
    pub fn create(root: &Path, id: &str) -> Result<StateDir, StateError> {
        let parent = sandboxes(root);
        fs::create_dir_all(&parent).map_err(|source| StateError::Create {
            path: parent.clone(),
            source,
        })?;
        let path = parent.join(id);
        if path.exists() {
            return Err(StateError::Exists(id.into()));
        }
        let staging = parent.join(format!(".{id}.{}", std::process::id()));
        fs::create_dir(&staging).map_err(|source| StateError::Create {
            path: staging.clone(),
            source,
        })?;
        let _ = fs::write(staging.join(OWNER), std::process::id().to_string());
        // The VMM's sockets, and the empty directory its jail is built on.
        for sub in [VM, JAIL] {
            if let Err(source) = fs::create_dir(staging.join(sub)) {
                let _ = fs::remove_dir_all(&staging);
                return Err(StateError::Create {
                    path: staging.join(sub),
                    source,
                });
            }
        }
        let lock_path = staging.join(LOCK);
        let locked = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .and_then(|f| match try_lock(&f)? {
                true => Ok(f),
                false => Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "held by another process",
                )),
            });
        let lock = match locked {
            Ok(f) => f,
            Err(source) => {
                let _ = fs::remove_dir_all(&staging);
                return Err(StateError::Lock {
                    path: lock_path,
                    source,
                });
            }
        };
        // rename(2) onto an existing non-empty directory fails: ids stay unique.
        if let Err(e) = fs::rename(&staging, &path) {
            let _ = fs::remove_dir_all(&staging);
            return Err(match e.kind() {
                io::ErrorKind::AlreadyExists | io::ErrorKind::DirectoryNotEmpty => {
                    StateError::Exists(id.into())
                }
                _ => StateError::Create { path, source: e },
            });
        }
        Ok(StateDir { path, _lock: lock })
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// A file in the directory the VMM sees (its sockets).
    pub fn vm_file(&self, name: &str) -> PathBuf {
        self.path.join(VM).join(name)
    }

    /// The lock file: whoever holds a copy keeps the directory from being
    /// collected.
    pub(crate) fn lock(&self) -> &File {
        &self._lock
    }

    pub fn record_vmm_pid(&self, pid: u32) {
        let _ = fs::write(self.file(VMM_PID), pid.to_string());
    }

    pub fn remove(self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Records process `pid` as the owner of sandbox directory `dir` (a VM
/// handed to it).
pub fn record_owner(dir: &Path, pid: u32) {
    let _ = fs::write(dir.join(OWNER), pid.to_string());
}

/// Whether the directory's owner is gone (or never said who it was).
fn owner_gone(dir: &Path) -> bool {
    let Some(pid) = fs::read_to_string(dir.join(OWNER))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
    else {
        return true;
    };
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat.rsplit_once(") ").and_then(|(_, r)| r.chars().next());
    matches!(state, None | Some('Z' | 'X'))
}

/// Takes the lock of a directory whose owner died and whose VM's
/// supervisor is still cleaning up (it lets go once the VMM is gone).
fn lock_after_owner(dir: &Path, lock: &File) -> bool {
    if !owner_gone(dir) {
        return false;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while std::time::Instant::now() < deadline {
        if matches!(try_lock(lock), Ok(true)) {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    false
}

/// Whether the directory of sandbox `id` is held (its owner, or its VM's
/// supervisor, lives).
pub fn is_held(root: &Path, id: &str) -> bool {
    File::open(sandbox_dir(root, id).join(LOCK))
        .map(|f| !matches!(try_lock(&f), Ok(true)))
        .unwrap_or(false)
}

/// Whether process `pid` is a VMM started for the sandbox directory `dir`
/// (guards against a recycled pid): its command line names files inside
/// `dir/` and its executable is a QEMU.
fn is_vmm_of(pid: i32, dir: &Path) -> bool {
    let needle = format!("{}/", dir.display());
    let cmdline_ok = fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(&needle))
        .unwrap_or(false);
    let exe_ok = fs::read_link(format!("/proc/{pid}/exe"))
        .map(|e| e.to_string_lossy().contains("qemu"))
        .unwrap_or(false);
    cmdline_ok && exe_ok
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
        let staging = entry.file_name().to_string_lossy().starts_with('.');
        let lock = File::open(dir.join(LOCK)).ok().filter(|_| !staging);
        let Some(lock) = lock else {
            // Being created right now (hidden name), or broken: leave it
            // unless it is old.
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
        if !matches!(try_lock(&lock), Ok(true)) && !lock_after_owner(&dir, &lock) {
            continue;
        }
        if let Some(pid) = fs::read_to_string(dir.join(VMM_PID))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            if is_vmm_of(pid, &dir) {
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
