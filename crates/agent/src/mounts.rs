//! A container's own mounts (OCI `mounts`): planned from the request before
//! the fork, mount point made and mounted by the child inside its namespace.

use std::ffi::{CStr, CString, NulError};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};
use nix::sys::stat::Mode;

/// Destinations the agent always mounts itself (proc, a fresh /dev, sysfs,
/// cgroup2); the same fs types asked for there are already in place. A
/// host's /dev/shm would be shared memory over 9p: the guest's tmpfs stands in.
const STANDARD: &[(&str, &[&str])] = &[
    ("/proc", &["proc"]),
    ("/dev", &["tmpfs", "devtmpfs"]),
    ("/dev/pts", &["devpts"]),
    ("/dev/mqueue", &["mqueue"]),
    ("/sys", &["sysfs"]),
    ("/sys/fs/cgroup", &["cgroup", "cgroup2"]),
];

pub struct MountPlan {
    /// Absolute in the agent's view (a bind source is inside the share).
    pub source: String,
    pub destination: String,
    pub fstype: Option<String>,
    pub flags: MsFlags,
    pub data: String,
    pub bind: bool,
    pub is_file: bool,
    pub extra: Extra,
}

/// What a mount gets after it is made: its propagation (`rshared`...) and
/// the recursive attributes (`rro`, `rnosuid`...) set or cleared on it and
/// every mount under it (mount_setattr(2), AT_RECURSIVE), as runc does.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Extra {
    pub propagation: Option<MsFlags>,
    pub attr_set: u64,
    pub attr_clr: u64,
}

use libc::{
    MOUNT_ATTR_NOATIME, MOUNT_ATTR_NODEV, MOUNT_ATTR_NODIRATIME, MOUNT_ATTR_NOEXEC,
    MOUNT_ATTR_NOSUID, MOUNT_ATTR_NOSYMFOLLOW, MOUNT_ATTR_RDONLY, MOUNT_ATTR_STRICTATIME,
    MOUNT_ATTR__ATIME as MOUNT_ATTR_ATIME,
};

/// Prepared for the child: C strings only.
pub struct Prepared {
    source: CString,
    target: CString,
    parent: CString,
    fstype: Option<CString>,
    flags: MsFlags,
    data: Option<CString>,
    bind: bool,
    is_file: bool,
    extra: Extra,
}

/// Whether the request's mount is one the agent provides anyway.
pub fn is_standard(m: &agent_proto::Mount) -> bool {
    let dest = m.destination.trim_end_matches('/');
    if dest == "/dev/shm" {
        return true;
    }
    STANDARD
        .iter()
        .any(|(d, types)| *d == dest && types.contains(&m.r#type.as_str()))
}

/// Parses OCI mount options into flags, the fs data string, whether it is
/// a bind mount, and what is set after the mount (propagation, recursive
/// attributes).
fn parse_options(options: &[String]) -> (MsFlags, String, bool, Extra) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    let mut bind = false;
    let mut extra = Extra::default();
    for o in options {
        if let Some(p) = propagation(o) {
            extra.propagation = Some(p);
            continue;
        }
        if let Some((on, attr)) = recursive_attr(o) {
            if matches!(o.as_str(), "rrelatime" | "rnoatime" | "rstrictatime") {
                // The atime modes are one field: cleared, then one set.
                extra.attr_clr |= MOUNT_ATTR_ATIME;
                extra.attr_set = (extra.attr_set & !MOUNT_ATTR_ATIME) | attr;
            } else if on {
                extra.attr_set |= attr;
                extra.attr_clr &= !attr;
            } else {
                extra.attr_clr |= attr;
                extra.attr_set &= !attr;
            }
            continue;
        }
        match o.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" => flags &= !MsFlags::MS_RDONLY,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "suid" => flags &= !MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "dev" => flags &= !MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "exec" => flags &= !MsFlags::MS_NOEXEC,
            "sync" => flags |= MsFlags::MS_SYNCHRONOUS,
            "dirsync" => flags |= MsFlags::MS_DIRSYNC,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "nodiratime" => flags |= MsFlags::MS_NODIRATIME,
            "relatime" => flags |= MsFlags::MS_RELATIME,
            "strictatime" => flags |= MsFlags::MS_STRICTATIME,
            "bind" => bind = true,
            "rbind" => {
                bind = true;
                flags |= MsFlags::MS_REC;
            }
            // SELinux relabelling and podman's copy-up are host-side matters.
            "z" | "Z" | "tmpcopyup" | "notmpcopyup" | "copy" | "nocopy" | "defaults" => {}
            other => data.push(other.to_string()),
        }
    }
    (flags, data.join(","), bind, extra)
}

/// A propagation option's flags ("rshared" → MS_SHARED | MS_REC).
pub fn propagation(o: &str) -> Option<MsFlags> {
    let rec = MsFlags::MS_REC;
    Some(match o {
        "private" => MsFlags::MS_PRIVATE,
        "rprivate" => MsFlags::MS_PRIVATE | rec,
        "shared" => MsFlags::MS_SHARED,
        "rshared" => MsFlags::MS_SHARED | rec,
        "slave" => MsFlags::MS_SLAVE,
        "rslave" => MsFlags::MS_SLAVE | rec,
        "unbindable" => MsFlags::MS_UNBINDABLE,
        "runbindable" => MsFlags::MS_UNBINDABLE | rec,
        _ => return None,
    })
}

/// runc's recursive mount options: (set or clear, the attribute).
fn recursive_attr(o: &str) -> Option<(bool, u64)> {
    Some(match o {
        "rro" => (true, MOUNT_ATTR_RDONLY),
        "rrw" => (false, MOUNT_ATTR_RDONLY),
        "rnosuid" => (true, MOUNT_ATTR_NOSUID),
        "rsuid" => (false, MOUNT_ATTR_NOSUID),
        "rnodev" => (true, MOUNT_ATTR_NODEV),
        "rdev" => (false, MOUNT_ATTR_NODEV),
        "rnoexec" => (true, MOUNT_ATTR_NOEXEC),
        "rexec" => (false, MOUNT_ATTR_NOEXEC),
        "rnodiratime" => (true, MOUNT_ATTR_NODIRATIME),
        "rdiratime" => (false, MOUNT_ATTR_NODIRATIME),
        "rnosymfollow" => (true, MOUNT_ATTR_NOSYMFOLLOW),
        "rsymfollow" => (false, MOUNT_ATTR_NOSYMFOLLOW),
        // relatime is the atime field's zero.
        "rrelatime" => (true, 0),
        "rnoatime" => (true, MOUNT_ATTR_NOATIME),
        "rstrictatime" => (true, MOUNT_ATTR_STRICTATIME),
        _ => return None,
    })
}

/// Sets the recursive attributes of `extra` on `target` and every mount
/// under it.
fn set_recursive(target: &CStr, extra: &Extra) -> nix::Result<()> {
    let attr = libc::mount_attr {
        attr_set: extra.attr_set,
        attr_clr: extra.attr_clr,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: mount_setattr(2) reads `attr` (its size given) and the path.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            target.as_ptr(),
            libc::AT_RECURSIVE,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// `path` relative to the share, refusing anything that leaves it.
fn inside(share: &Path, rel: &str) -> Result<PathBuf, String> {
    let rel = Path::new(rel.trim_start_matches('/'));
    if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(format!("mount source {rel:?} leaves its share"));
    }
    Ok(share.join(rel))
}

/// Plans the request's mounts; `share` is where the root's share is mounted.
pub fn plan(mounts: &[agent_proto::Mount], share: &Path) -> Result<Vec<MountPlan>, String> {
    let mut out = Vec::new();
    for m in mounts {
        if !m.destination.starts_with('/')
            || Path::new(&m.destination)
                .components()
                .any(|c| c == Component::ParentDir)
        {
            return Err(format!(
                "mount destination {:?} must be an absolute path without ..",
                m.destination
            ));
        }
        if is_standard(m) {
            continue;
        }
        let (flags, data, bind_opt, extra) = parse_options(&m.options);
        let bind = bind_opt || m.r#type == "bind";
        let (source, is_file) = if bind {
            let source = inside(share, &m.source)?;
            let meta = std::fs::metadata(&source)
                .map_err(|e| format!("mount source {:?}: {e}", m.source))?;
            (source.to_string_lossy().into_owned(), !meta.is_dir())
        } else {
            (m.source.clone(), false)
        };
        out.push(MountPlan {
            source,
            destination: m.destination.clone(),
            fstype: (!bind).then(|| m.r#type.clone()),
            flags,
            data,
            bind,
            is_file,
            extra,
        });
    }
    Ok(out)
}

impl MountPlan {
    pub fn prepare(&self, rootfs: &Path) -> Result<Prepared, NulError> {
        let target = rootfs.join(self.destination.trim_start_matches('/'));
        let parent = target.parent().unwrap_or(rootfs).to_path_buf();
        let c = |p: &Path| CString::new(p.as_os_str().as_encoded_bytes());
        Ok(Prepared {
            source: CString::new(self.source.as_str())?,
            target: c(&target)?,
            parent: c(&parent)?,
            fstype: self.fstype.as_deref().map(CString::new).transpose()?,
            flags: self.flags,
            data: (!self.data.is_empty())
                .then(|| CString::new(self.data.as_str()))
                .transpose()?,
            bind: self.bind,
            is_file: self.is_file,
            extra: self.extra,
        })
    }
}

impl Prepared {
    /// Runs in the forked child: syscalls only.
    pub fn mount(&self) -> nix::Result<()> {
        if self.is_file {
            crate::spawn::mkdir_all(&self.parent)?;
            let fd = nix::fcntl::open(
                self.target.as_c_str(),
                nix::fcntl::OFlag::O_CREAT | nix::fcntl::OFlag::O_WRONLY,
                Mode::from_bits_truncate(0o644),
            )?;
            // SAFETY: `open` just returned this fd; dropping it closes it.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        } else {
            crate::spawn::mkdir_all(&self.target)?;
        }
        let none = None::<&CStr>;
        if self.bind {
            let rec = self.flags & MsFlags::MS_REC;
            mount(
                Some(self.source.as_c_str()),
                self.target.as_c_str(),
                none,
                MsFlags::MS_BIND | rec,
                none,
            )?;
            let rest = self.flags & !MsFlags::MS_REC;
            if !rest.is_empty() {
                mount(
                    none,
                    self.target.as_c_str(),
                    none,
                    MsFlags::MS_BIND | MsFlags::MS_REMOUNT | rest,
                    none,
                )?;
            }
            return self.after();
        }
        let fstype = self.fstype.as_deref().ok_or(Errno::EINVAL)?;
        mount(
            Some(self.source.as_c_str()),
            self.target.as_c_str(),
            Some(fstype),
            self.flags,
            self.data.as_deref(),
        )?;
        self.after()
    }

    /// Propagation, then the recursive attributes.
    fn after(&self) -> nix::Result<()> {
        let none = None::<&CStr>;
        if let Some(p) = self.extra.propagation {
            mount(none, self.target.as_c_str(), none, p, none)?;
        }
        if self.extra.attr_set != 0 || self.extra.attr_clr != 0 {
            set_recursive(&self.target, &self.extra)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(dest: &str, ty: &str, src: &str, opts: &[&str]) -> agent_proto::Mount {
        agent_proto::Mount {
            destination: dest.into(),
            r#type: ty.into(),
            source: src.into(),
            options: opts.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn options_become_flags_and_data() {
        let (flags, data, bind, extra) = parse_options(&[
            "rbind".into(),
            "ro".into(),
            "nosuid".into(),
            "rprivate".into(),
            "size=65536k".into(),
            "mode=1777".into(),
        ]);
        assert!(bind);
        assert!(flags.contains(MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_REC));
        assert_eq!(data, "size=65536k,mode=1777");
        assert_eq!(
            extra.propagation,
            Some(MsFlags::MS_PRIVATE | MsFlags::MS_REC)
        );
    }

    #[test]
    fn recursive_attributes_and_propagation_parse_as_runc_reads_them() {
        let opts = |o: &[&str]| parse_options(&o.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let (_, data, _, e) = opts(&["rbind", "rro", "rnosuid", "rshared"]);
        assert_eq!(data, "");
        assert_eq!(e.attr_set, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID);
        assert_eq!(e.propagation, Some(MsFlags::MS_SHARED | MsFlags::MS_REC));
        // The last word wins.
        let (_, _, _, e) = opts(&["rro", "rrw", "slave"]);
        assert_eq!((e.attr_set, e.attr_clr), (0, MOUNT_ATTR_RDONLY));
        assert_eq!(e.propagation, Some(MsFlags::MS_SLAVE));
        let (_, _, _, e) = opts(&["rnoatime"]);
        assert_eq!(
            (e.attr_set, e.attr_clr),
            (MOUNT_ATTR_NOATIME, MOUNT_ATTR_ATIME)
        );
    }

    #[test]
    fn standard_mounts_are_skipped_and_escapes_refused() {
        let share = Path::new("/nonexistent-share");
        let planned = plan(
            &[
                m("/proc", "proc", "proc", &[]),
                m("/dev/shm", "bind", "/host/shm", &["rbind"]),
                m("/run", "tmpfs", "tmpfs", &["nosuid", "size=1m"]),
            ],
            share,
        )
        .unwrap();
        assert_eq!(planned.len(), 1);
        assert_eq!(planned[0].fstype.as_deref(), Some("tmpfs"));
        assert!(plan(&[m("/x", "bind", "../../etc", &["bind"])], share).is_err());
        assert!(plan(&[m("relative", "tmpfs", "tmpfs", &[])], share).is_err());
        assert!(plan(&[m("/a/../b", "tmpfs", "tmpfs", &[])], share).is_err());
    }
}
