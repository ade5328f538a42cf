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
    .map_err(ShareError::Namespace)?;
    PRIVATE.store(true, std::sync::atomic::Ordering::SeqCst);
    Ok(())
}

static PRIVATE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether this process made itself a private mount namespace.
pub fn in_private_namespace() -> bool {
    PRIVATE.load(std::sync::atomic::Ordering::SeqCst)
}

/// The most a guest can store in a share's top directory (next to the
/// container's root and its binds, which live elsewhere): the top is a tmpfs
/// in host memory, so it is capped.
pub const TOP_BYTES: u64 = 1 << 20;

/// Creates `dir` (its parent must exist), the top directory of a share the
/// guest can write. In a private mount namespace it becomes a tmpfs of at
/// most [`TOP_BYTES`] and 1024 inodes (nosuid, nodev, noexec): a guest
/// filling it gets ENOSPC and host memory stays untouched. Outside one (no
/// mounts of ours may outlive the process) it stays a plain directory.
pub fn create_top(dir: &Path) -> Result<(), ShareError> {
    fs::create_dir(dir).map_err(|source| ShareError::Io {
        what: "creating",
        path: dir.into(),
        source,
    })?;
    if !in_private_namespace() {
        return Ok(());
    }
    let data = format!("size={TOP_BYTES},nr_inodes=1024,mode=0755");
    mount(
        Some("podvisor-share"),
        dir,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some(data.as_str()),
    )
    .map_err(|errno| {
        let _ = fs::remove_dir(dir);
        ShareError::Bind {
            src: "tmpfs".into(),
            errno,
        }
    })
}

fn is_bind(m: &oci::Mount) -> bool {
    m.kind == "bind" || m.options.iter().any(|o| o == "bind" || o == "rbind")
}

use hypervisor::jail::{set_mount_attrs, MOUNT_ATTR_NODEV, MOUNT_ATTR_NOSUID, MOUNT_ATTR_RDONLY};

/// Sets `attrs` on every mount of the detached tree `tree` (`open_tree`).
pub(crate) fn set_tree_attrs(tree: &std::os::fd::OwnedFd, attrs: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    set_mount_attrs(tree.as_raw_fd(), c"", libc::AT_EMPTY_PATH, attrs)
}

/// Opens `path` as an `O_PATH` fd with no symlink (magic or not) followed
/// on the way: a component swapped for a link fails instead of redirecting.
fn open_nofollow(path: &Path) -> io::Result<std::os::fd::OwnedFd> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
    const RESOLVE_NO_SYMLINKS: u64 = 0x04;
    let how = OpenHow {
        flags: (libc::O_PATH | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: openat2 on a NUL-terminated path and a struct that outlive
    // the call; a non-negative result is a new fd we then own.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            c.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this fd; nothing else owns it.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) })
}

/// Opens a bind source as an `O_PATH` fd: the path is resolved once
/// (canonically, following the caller's symlinks), then opened with no
/// symlink followed, so a component swapped for a link in between (a guest
/// writing a volume the path goes through) fails instead of redirecting.
fn open_source(src: &Path) -> Result<std::os::fd::OwnedFd, ShareError> {
    let io = |source| ShareError::Io {
        what: "mount source",
        path: src.into(),
        source,
    };
    let canonical = fs::canonicalize(src).map_err(io)?;
    open_nofollow(&canonical).map_err(io)
}

/// Bind-mounts `src` (and what is mounted below it) at `dst`, nosuid and
/// nodev throughout, and read-only throughout when `readonly`.
fn bind(src: &Path, dst: &Path, readonly: bool) -> Result<(), ShareError> {
    use std::os::fd::AsRawFd;
    let fd = open_source(src)?;
    let by_fd = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    let meta = fs::metadata(&by_fd).map_err(|source| ShareError::Io {
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
        Some(&by_fd),
        dst,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(err)?;
    // Read-only on the host side too, submounts included: a guest cannot
    // write through 9p. No set-id or device files take effect from here.
    let ro = if readonly { MOUNT_ATTR_RDONLY } else { 0 };
    let c = std::ffi::CString::new(dst.as_os_str().as_encoded_bytes())
        .map_err(|_| err(nix::errno::Errno::EINVAL))?;
    set_mount_attrs(
        libc::AT_FDCWD,
        &c,
        libc::AT_SYMLINK_NOFOLLOW,
        MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | ro,
    )
    .map_err(|e| {
        err(nix::errno::Errno::from_raw(
            e.raw_os_error().unwrap_or(libc::EIO),
        ))
    })
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

/// Mounts a copy of the tree at `src` (with everything mounted below it,
/// nosuid and nodev) at `share/name`, as one mount: unlike a rename, a mount
/// reaches a running VMM's jail (the share is a shared mount point). The
/// caller then unmounts `src`; the copy stays.
pub fn attach_tree(src: &Path, share: &Path, name: &str) -> Result<PathBuf, crate::SandboxError> {
    let tree = crate::pool::open_tree(src, false)?;
    let at = share.join(name);
    fs::create_dir(&at)
        .map_err(|e| crate::SandboxError::Invalid(format!("creating {}: {e}", at.display())))?;
    if let Err(e) = crate::pool::move_mount(&tree, &at) {
        let _ = fs::remove_dir(&at);
        return Err(crate::SandboxError::Invalid(format!(
            "mounting the tree at {}: {e}",
            at.display()
        )));
    }
    Ok(at)
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
        .filter_map(|l| l.split(' ').nth(4).map(unescape))
        .filter(|m| *m == dir || m.starts_with(&format!("{dir}/")))
        .collect()
}

/// A mountinfo path with its octal escapes (`\040` for a space) undone.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = |c: u8| (b'0'..=b'7').contains(&c);
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|&c| octal(c)) {
            let v = b[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, &c| acc * 8 + u32::from(c - b'0'));
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Detaches the mount whose root is `point`, with everything below it,
/// without following a path a guest could change: the point is opened with
/// no symlink followed and unmounted through its fd, so a component swapped
/// for a link (in a volume the guest writes) fails instead of redirecting
/// the unmount elsewhere. Stacked mounts go too.
fn detach(point: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    for _ in 0..64 {
        let fd = open_nofollow(point)?;
        let by_fd = std::ffi::CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .expect("no NUL in a number");
        // SAFETY: umount2 on a NUL-terminated path that outlives the call.
        if unsafe { libc::umount2(by_fd.as_ptr(), libc::MNT_DETACH) } != 0 {
            let e = io::Error::last_os_error();
            // EINVAL: not (any more) the root of a mount.
            return match e.raw_os_error() {
                Some(libc::EINVAL) => Ok(()),
                _ => Err(e),
            };
        }
    }
    Ok(())
}

/// Unmounts everything at and under `dir`: each outermost mount point is
/// detached whole (its submounts with it) through [`detach`], so no
/// unmount goes through a path inside a guest-writable tree.
pub fn unmount_all(dir: &Path) {
    let mut points = mounts_under(dir);
    points.sort();
    points.dedup();
    let mut outer: Vec<&String> = Vec::new();
    for p in &points {
        if !outer.iter().any(|o| p.starts_with(&format!("{o}/"))) {
            outer.push(p);
        }
    }
    for p in outer {
        if let Err(e) = detach(Path::new(p)) {
            tracing::warn!(point = %p, "unmounting: {e}");
        }
    }
}

/// Removes `dir` and what is in it, unless something is still mounted there:
/// a recursive removal would go into a bind of a host volume.
pub fn remove_unmounted(dir: &Path) {
    let own = dir.to_string_lossy().trim_end_matches('/').to_string();
    let under = mounts_under(dir);
    if !under.is_empty() && under.iter().all(|m| *m == own) {
        // Only the share's own mounts (its tmpfs top, the bind made for the
        // VMM's jail) are left.
        if let Err(e) = detach(dir) {
            tracing::warn!(dir = %dir.display(), "unmounting: {e}");
        }
    }
    let left = mounts_under(dir);
    if left.is_empty() {
        let _ = fs::remove_dir_all(dir);
    } else {
        tracing::error!(dir = %dir.display(), ?left, "still mounted; left in place");
    }
}

/// Unmounts a share's top (and whatever the caller left mounted in it), then
/// removes `dir`, the directory holding it.
pub fn remove_with_top(dir: &Path) {
    unmount_all(dir);
    remove_unmounted(dir);
}
