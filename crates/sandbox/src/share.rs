//! The files a container sees from the host, gathered in one directory that
//! the VM shares over virtio-9p: the root filesystem at `rootfs/` and every
//! bind-mount source at `m<N>`. The binds are made in a private mount
//! namespace of the process that owns the VM, so they vanish with it.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};

use crate::oci;

#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("creating a private mount namespace")]
    Namespace(#[source] nix::errno::Errno),
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("bind-mounting {src} into the share")]
    Bind {
        src: PathBuf,
        #[source]
        errno: nix::errno::Errno,
    },
}

/// Gives this process a mount namespace of its own (call while it has a
/// single thread). Host mounts still propagate in; ours never leak out.
pub fn private_mount_namespace() -> Result<(), ShareError> {
    unshare(CloneFlags::CLONE_NEWNS).map_err(ShareError::Namespace)?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .map_err(ShareError::Namespace)
}

fn is_bind(m: &oci::Mount) -> bool {
    m.kind == "bind" || m.options.iter().any(|o| o == "bind" || o == "rbind")
}

fn bind(src: &Path, dst: &Path, readonly: bool) -> Result<(), ShareError> {
    let meta = fs::metadata(src).map_err(|source| ShareError::Io {
        what: "mount source",
        path: src.into(),
        source,
    })?;
    let made = if meta.is_dir() {
        fs::create_dir_all(dst)
    } else {
        fs::write(dst, b"")
    };
    made.map_err(|source| ShareError::Io {
        what: "creating",
        path: dst.into(),
        source,
    })?;
    let err = |errno| ShareError::Bind {
        src: src.into(),
        errno,
    };
    mount(
        Some(src),
        dst,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(err)?;
    if readonly {
        // Read-only on the host side too: a guest cannot write through 9p.
        mount(
            None::<&str>,
            dst,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(err)?;
    }
    Ok(())
}

/// Fills `dir` (which must exist) with the container's root and bind
/// sources, and returns the mounts as the agent takes them: bind sources
/// become paths relative to the share.
pub fn populate(
    dir: &Path,
    rootfs: &Path,
    mounts: &[oci::Mount],
) -> Result<Vec<agent_proto::Mount>, ShareError> {
    // The root stays writable on the host side: the guest creates mount
    // points in it before making it read-only, as runc does on the host.
    bind(rootfs, &dir.join("rootfs"), false)?;
    let mut out = Vec::new();
    for (i, m) in mounts.iter().enumerate() {
        let mut am = agent_proto::Mount {
            destination: m.destination.clone(),
            r#type: m.kind.clone(),
            source: m.source.clone(),
            options: m.options.clone(),
        };
        if is_bind(m) {
            if agent_standard(&m.destination) {
                // /dev/shm and friends: the guest has its own.
                continue;
            }
            let name = format!("m{i}");
            let ro = m.options.iter().any(|o| o == "ro");
            bind(Path::new(&m.source), &dir.join(&name), ro)?;
            am.r#type = "bind".into();
            am.source = name;
        }
        out.push(am);
    }
    Ok(out)
}

/// Destinations under the guest's own /dev, /proc and /sys trees that a bind
/// from the host cannot serve (shared memory, devices, kernel state).
fn agent_standard(dest: &str) -> bool {
    let d = dest.trim_end_matches('/');
    d == "/dev/shm" || d == "/dev" || d == "/proc" || d == "/sys" || d == "/sys/fs/cgroup"
}

/// Mount points at or under `dir`, from this process's mount table.
fn mounts_under(dir: &Path) -> Vec<String> {
    let dir = dir.to_string_lossy().trim_end_matches('/').to_string();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(String::from))
        .filter(|m| *m == dir || m.starts_with(&format!("{dir}/")))
        .collect()
}

/// Removes `dir` and what is in it, unless something is still mounted there:
/// a recursive removal would go into a bind of a host volume.
pub fn remove_unmounted(dir: &Path) {
    let left = mounts_under(dir);
    if left.is_empty() {
        let _ = fs::remove_dir_all(dir);
    } else {
        tracing::error!(dir = %dir.display(), ?left, "still mounted; left in place");
    }
}
