//! Pools (runV's cache factory): a daemon keeps N clones of a template booted,
//! paused and ready, and refills them in the background. A sandbox taken from
//! a pool is ready in milliseconds: the daemon binds the caller's root into
//! the clone's share, resumes it and answers with its agent socket. The
//! caller holds the connection for the sandbox's life; when it closes (the
//! caller is done, or was killed) the daemon tears the VM down.
//!
//! `policy`: the factory policy file and the front ends' choice (pool,
//! clone, cold boot); `daemon`: `pool serve`; `client`: taking a clone and
//! attaching trees to it. Here: what both sides share (paths, lock,
//! protocol, mount trees).

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hypervisor::Share;
use serde::{Deserialize, Serialize};
use tokio::net::{UnixListener, UnixStream};

use crate::agent::{self, AgentClient, AgentError};
use crate::fdmsg;
use crate::template::{Template, ROOTFS_TAG};
use crate::{Sandbox, SandboxConfig, SandboxError, Timings};

mod client;
mod daemon;
mod policy;

pub use crate::supervisor::attach_point;
pub use client::take;
pub use daemon::serve;
pub use policy::*;

/// Where `sandbox run` attaches its root in a pooled clone's share (the
/// share's top is opened by the VMM at start and cannot be mounted over).
pub const ROOTFS_SUBPATH: &str = "rootfs";

fn pools_dir(root: &Path) -> PathBuf {
    root.join("pools")
}

/// The socket of template `name`'s pool.
pub fn socket(root: &Path, template: &str) -> PathBuf {
    pools_dir(root).join(format!("{template}.sock"))
}

/// How many clones are ready: `ROOT/pools/<template>.json`.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct PoolStatus {
    pub ready: usize,
    pub size: usize,
    pub handed_out: u64,
}

/// The pool's status, if its daemon is alive (it holds the pool's lock).
pub fn status(root: &Path, template: &str) -> Option<PoolStatus> {
    if lock(root, template).is_ok() {
        // Nobody serves it: whatever the status file says is stale.
        return None;
    }
    let text = std::fs::read(pools_dir(root).join(format!("{template}.json"))).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Takes template `template`'s pool lock (`ROOT/pools/<T>.lock`): one daemon
/// per pool. Fails while another process holds it.
fn lock(root: &Path, template: &str) -> std::io::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    let path = pools_dir(root).join(format!("{template}.lock"));
    // The garbage collector unlinks a lock it holds: a file locked after
    // that is no longer the pool's, so lock again.
    for _ in 0..8 {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let ours = f.metadata()?;
        match std::fs::metadata(&path) {
            Ok(m) if m.ino() == ours.ino() && m.dev() == ours.dev() => return Ok(f),
            _ => continue,
        }
    }
    Err(std::io::Error::other(
        "the pool's lock file keeps being replaced",
    ))
}

/// Removes what daemons that died (SIGKILL) left of their pools: socket,
/// status file, member shares (their mounts died with the daemon's mount
/// namespace) and lock, for every pool no live daemon holds.
pub fn collect_garbage(root: &Path) {
    use std::os::fd::AsRawFd;
    let dir = pools_dir(root);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    let mut pools = std::collections::BTreeSet::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let stem = [".lock", ".sock", ".json", ".json.tmp"]
            .iter()
            .find_map(|x| name.strip_suffix(x))
            .map(str::to_string)
            .unwrap_or(name);
        pools.insert(stem);
    }
    for template in pools {
        let lock_path = dir.join(format!("{template}.lock"));
        let held = match std::fs::OpenOptions::new().write(true).open(&lock_path) {
            // SAFETY: flock on an fd we own.
            Ok(f) => match unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } {
                0 => Some(f),
                _ => continue,
            },
            Err(_) => None,
        };
        let _ = std::fs::remove_file(socket(root, &template));
        for x in ["json", "json.tmp"] {
            let _ = std::fs::remove_file(dir.join(format!("{template}.{x}")));
        }
        sweep_shares(root, &template);
        let _ = std::fs::remove_dir(dir.join(&template));
        if held.is_some() {
            let _ = std::fs::remove_file(&lock_path);
        }
    }
}

/// Removes the shares of pool `template`'s members whose VM is gone. A VM
/// handed over lives on after its daemon: its supervisor holds its state
/// directory, and its share (in the supervisor's mount namespace) must not
/// be removed from under it here.
fn sweep_shares(root: &Path, template: &str) {
    let Ok(members) = std::fs::read_dir(pools_dir(root).join(template)) else {
        return;
    };
    for m in members.flatten() {
        let id = m.file_name().to_string_lossy().into_owned();
        if !crate::state::is_held(root, &id) {
            crate::share::remove_unmounted(&m.path());
        }
    }
}

fn write_status(root: &Path, template: &str, s: PoolStatus) {
    let path = pools_dir(root).join(format!("{template}.json"));
    let tmp = path.with_extension("json.tmp");
    if std::fs::write(&tmp, serde_json::to_vec(&s).unwrap_or_default()).is_ok() {
        let _ = std::fs::rename(&tmp, &path);
    }
}

/// What a caller says on a pool's socket, a JSON line at a time; it waits
/// for each answer before saying more.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum Request {
    /// A ready clone. The message carries one tap device per NIC of the
    /// template, made in the caller's network namespace. The answer carries
    /// the clone's supervisor connection and VMM pidfd: the VM is the
    /// caller's from then on (see `supervisor`).
    Take { nics: usize },
}

/// The daemon's answer to each request, a JSON line.
#[derive(Serialize, Deserialize, Default)]
pub struct Reply {
    #[serde(default)]
    error: String,
    /// The number of the last request the clone's supervisor answered.
    #[serde(default)]
    seq: u64,
    #[serde(default)]
    sandbox_id: String,
    #[serde(default)]
    agent_socket: PathBuf,
    #[serde(default)]
    vmm_pid: u32,
    #[serde(default)]
    kernel_release: String,
}

impl Reply {
    fn error(e: impl std::fmt::Display) -> Reply {
        Reply {
            error: e.to_string(),
            ..Default::default()
        }
    }

    fn line(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// What the daemon makes of a request line.
pub fn parse_request(line: &[u8]) -> serde_json::Result<Request> {
    serde_json::from_slice(line)
}

/// What a caller makes of the daemon's answer line.
pub fn parse_reply(answer: &[u8]) -> Result<Reply, SandboxError> {
    serde_json::from_slice(answer)
        .map_err(|e| SandboxError::Invalid(format!("the pool's answer: {e}")))
}

/// `move_mount(2)` of a detached tree onto `at`.
pub(crate) fn move_mount(tree: &OwnedFd, at: &Path) -> std::io::Result<()> {
    let at = std::ffi::CString::new(at.as_os_str().as_encoded_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: plain syscall; both strings are NUL-terminated and live.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            at.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const OPEN_TREE_CLONE: libc::c_uint = 1;

/// A detached copy of the mount tree at `dir` (with everything mounted
/// below it), to hand to a pool daemon in another mount namespace.
pub fn open_tree(dir: &Path, readonly: bool) -> Result<OwnedFd, SandboxError> {
    let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|e| SandboxError::Invalid(format!("{}: {e}", dir.display())))?;
    // SAFETY: plain syscall on a NUL-terminated path.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            path.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | libc::AT_RECURSIVE as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(SandboxError::Invalid(format!(
            "cloning the mount tree at {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: a descriptor the kernel just gave us.
    let tree = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    // No set-id or device file takes effect through it; read-only through
    // and through when asked.
    use hypervisor::jail::{MOUNT_ATTR_NODEV, MOUNT_ATTR_NOSUID, MOUNT_ATTR_RDONLY};
    let ro = if readonly { MOUNT_ATTR_RDONLY } else { 0 };
    let attrs = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | ro;
    crate::share::set_tree_attrs(&tree, attrs).map_err(|e| {
        SandboxError::Invalid(format!(
            "making the tree at {} nosuid,nodev: {e}",
            dir.display()
        ))
    })?;
    Ok(tree)
}

/// Claims template `template`'s pool for this process (held while the
/// returned file is open): one daemon per pool.
pub fn claim(root: &Path, template: &str) -> Result<std::fs::File, SandboxError> {
    std::fs::create_dir_all(pools_dir(root)).map_err(|e| {
        SandboxError::Invalid(format!("creating {}: {e}", pools_dir(root).display()))
    })?;
    lock(root, template).map_err(|e| {
        SandboxError::Invalid(format!(
            "the pool of template {template} is already served by another `pool serve` ({e})"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factory_policy_parses_and_refuses_nonsense() {
        let dir = std::env::temp_dir().join(format!("podvisor-pool-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.toml");
        std::fs::write(&path, "[[pool]]\ntemplate = \"small\"\nsize = 3\n").unwrap();
        assert_eq!(
            load_config(&path).unwrap(),
            vec![PoolConfig {
                template: "small".into(),
                size: 3
            }]
        );
        for bad in [
            "[[pool]]\ntemplate = \"t\"\nsize = 0\n",
            "[[pool]]\ntemplate = \"t\"\n",
            "[[pool]]\ntemplate = \"t\"\nsize = 1\ncolour = \"red\"\n",
            "not toml at all [",
        ] {
            std::fs::write(&path, bad).unwrap();
            assert!(load_config(&path).is_err(), "{bad}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
