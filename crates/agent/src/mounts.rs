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
}

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

/// Parses OCI mount options into flags and the fs data string.
fn parse_options(options: &[String]) -> (MsFlags, String, bool) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    let mut bind = false;
    for o in options {
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
            // Propagation has no meaning across the VM boundary; SELinux
            // relabelling and podman's copy-up are host-side matters.
            "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave" | "unbindable"
            | "runbindable" | "z" | "Z" | "tmpcopyup" | "notmpcopyup" | "copy" | "nocopy"
            | "defaults" => {}
            other => data.push(other.to_string()),
        }
    }
    (flags, data.join(","), bind)
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
        let (flags, data, bind_opt) = parse_options(&m.options);
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
            return Ok(());
        }
        let fstype = self.fstype.as_deref().ok_or(Errno::EINVAL)?;
        mount(
            Some(self.source.as_c_str()),
            self.target.as_c_str(),
            Some(fstype),
            self.flags,
            self.data.as_deref(),
        )
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
        let (flags, data, bind) = parse_options(&[
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
