//! The VMM's jail (Firecracker's jailer is the model): QEMU starts in a mount
//! namespace of its own pivoted into a directory that holds only what it
//! needs, as a uid of its own with four file capabilities, under seccomp,
//! in a cgroup with limits and with rlimits. The plan is built before fork;
//! between fork and exec only raw system calls run.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::{Accel, HypervisorError, VmConfig};

/// What the caller decides about the jail of one VM.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Jail {
    /// An empty directory, private to this VM: a small tmpfs is mounted on
    /// it in the VMM's namespace and becomes its root.
    pub dir: PathBuf,
    /// Where the per-VM uids are locked (one file per uid in use).
    pub uid_dir: PathBuf,
    /// CPU limit in millicores (cpu.max); `None`: the VM's vCPUs.
    pub cpu_millis: Option<u64>,
    /// The VM's cgroup, relative to each hierarchy's root (a container's
    /// `cgroupsPath`, a pod's sandbox cgroup); `None`: `podvisor/vm-<uid>`.
    /// It must be empty of processes.
    pub cgroup: Option<String>,
    /// The guest RAM (MiB) the cgroup's memory limit is made for, when it is
    /// less than the VM's: a clone of a larger template held to the size its
    /// caller asked for. `None`: the VM's RAM.
    #[serde(default)]
    pub memory_mib: Option<u64>,
    /// The caller mounts into the shares after start and runs in a mount
    /// namespace of its own: each share becomes a shared mount point there,
    /// so those mounts reach the jail.
    pub propagate: bool,
}

/// The uids VMMs run as: one per live VM, never a host user's.
pub const UID_BASE: u32 = 0x5000_0000;
const UID_RANGE: u32 = 1 << 16;

/// The capabilities 9p passthrough needs to keep the guest's owners and
/// modes on the host; nothing else (no MKNOD, SETFCAP, SYS_ADMIN, KILL...).
const KEEP_CAPS: [u32; 4] = [
    0, // CAP_CHOWN
    1, // CAP_DAC_OVERRIDE
    2, // CAP_DAC_READ_SEARCH
    3, // CAP_FOWNER
];

/// Host memory a VMM may use beyond guest RAM (device state, TCG's
/// translation cache, 9p buffers), from measurements on TCG and KVM.
pub fn memory_overhead_mib(accel: Accel) -> u64 {
    match accel {
        Accel::Tcg => 512,
        Accel::Kvm => 160,
    }
}

const PIDS_MAX: u32 = 512;
const NOFILE_MAX: u64 = 8192;
const CPU_PERIOD_US: u64 = 100_000;

/// The paths QEMU is told about, as it sees them inside the jail.
#[derive(Clone, Debug)]
pub struct Paths {
    pub binary: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub shares: Vec<PathBuf>,
    /// Each disk's layers, bottom to top.
    pub disks: Vec<Vec<PathBuf>>,
    pub memory: Option<PathBuf>,
    /// The memory file is a template's, mapped privately, and this QEMU can
    /// open it read-only (`readonly=on,rom=off`): it is bound read-only.
    pub memory_readonly: bool,
    /// The directory that holds the VMM's sockets.
    pub vm_dir: PathBuf,
}

impl Paths {
    /// The paths as they are on the host (no jail).
    pub fn host(binary: &Path, config: &VmConfig) -> Paths {
        Paths {
            binary: binary.into(),
            kernel: config.kernel.clone(),
            initrd: config.initrd.clone(),
            shares: config.shares.iter().map(|s| s.path.clone()).collect(),
            disks: config.disks.iter().map(|d| d.layers.clone()).collect(),
            memory: match &config.memory {
                crate::MemoryBackend::File { path, .. } => Some(path.clone()),
                crate::MemoryBackend::Anonymous => None,
            },
            memory_readonly: memory_readonly(binary, config),
            vm_dir: vm_dir(config),
        }
    }
}

/// Whether `config`'s memory is a file mapped privately (a clone's template
/// memory) that `binary` can open read-only.
fn memory_readonly(binary: &Path, config: &VmConfig) -> bool {
    matches!(
        config.memory,
        crate::MemoryBackend::File { shared: false, .. }
    ) && crate::qemu::maps_readonly_files_privately(binary)
}

/// The VMM's sockets live in one directory of their own (the only host
/// directory besides the shares that it may write).
pub fn vm_dir(config: &VmConfig) -> PathBuf {
    config
        .control_socket
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// `mount_setattr(2)` flags.
pub const MOUNT_ATTR_RDONLY: u64 = 0x1;
pub const MOUNT_ATTR_NOSUID: u64 = 0x2;
pub const MOUNT_ATTR_NODEV: u64 = 0x4;
pub const MOUNT_ATTR_NOEXEC: u64 = 0x8;

/// Sets `attrs` on the mount at `path` (relative to `dirfd`, with `flags`
/// such as `AT_EMPTY_PATH`) and on every mount below it. A bare system call:
/// safe between fork and exec.
pub fn set_mount_attrs(
    dirfd: libc::c_int,
    path: &std::ffi::CStr,
    flags: libc::c_int,
    attrs: u64,
) -> io::Result<()> {
    let attr = MountAttr {
        attr_set: attrs,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: a system call on a NUL-terminated path and a struct that both
    // outlive it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            dirfd,
            path.as_ptr(),
            flags | libc::AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

struct Bind {
    src: CString,
    dst: CString,
    is_dir: bool,
    attrs: u64,
}

/// Everything the child does between fork and exec, prepared in advance.
pub(crate) struct Plan {
    root: CString,
    dirs: Vec<CString>,
    binds: Vec<Bind>,
    links: Vec<(CString, CString)>,
    proc_dir: CString,
    cgroup_procs: Vec<CString>,
    pub uid: u32,
    cap_last: u32,
    filters: [BpfProgram; 2],
    /// The uid's lock: held for the VM's life by its owner.
    _uid_lock: File,
    pub cgroups: Vec<PathBuf>,
    /// The largest file QEMU may write (`RLIMIT_FSIZE`), or `u64::MAX`.
    pub file_size_max: u64,
}

/// What a snapshot file may hold beyond guest RAM: the page bitmap (a bit
/// per page), the other RAM blocks (firmware, option ROMs) and the
/// devices' state.
const SNAPSHOT_SLACK: u64 = 256 << 20;

/// The largest file the VMM of `config` has reason to write: its guest
/// RAM (a template's memory file, a snapshot) or a writable disk's top
/// layer (a qcow2 file: its virtual size, its tables and some slack). A
/// VMM a guest took over then cannot fill the host's disk through the
/// files it was handed. A VM with a writable share gets no cap: its guest
/// writes files of any size there.
pub fn file_size_max(config: &VmConfig) -> u64 {
    if config.shares.iter().any(|s| !s.readonly) {
        return u64::MAX;
    }
    let disks = config
        .disks
        .iter()
        .filter(|d| !d.readonly)
        .filter_map(|d| d.layers.last())
        .map(|top| disk_size(top) + disk_size(top) / 8 + (64 << 20));
    disks
        .chain([(config.memory_mib << 20) + SNAPSHOT_SLACK])
        .max()
        .unwrap_or(u64::MAX)
}

/// A disk image's size as the guest sees it: a qcow2 file's virtual size
/// (its header's, at byte 24), else the file's length.
fn disk_size(path: &Path) -> u64 {
    use std::io::Read;
    let mut header = [0u8; 32];
    let read = File::open(path).and_then(|mut f| f.read_exact(&mut header));
    if read.is_ok() && &header[..4] == b"QFI\xfb" {
        let mut size = [0u8; 8];
        size.copy_from_slice(&header[24..32]);
        return u64::from_be_bytes(size);
    }
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap_or_default()
}

fn io_err(what: &str, path: &Path, e: io::Error) -> HypervisorError {
    HypervisorError::Jail(format!("{what} {}: {e}", path.display()))
}

/// Takes a free per-VM uid: the first in the range, from a hash of `id`,
/// whose lock file nobody holds.
fn take_uid(dir: &Path, id: &str) -> Result<(u32, File), HypervisorError> {
    fs::create_dir_all(dir).map_err(|e| io_err("creating", dir, e))?;
    let h = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    for i in 0..UID_RANGE {
        let uid = UID_BASE + ((h as u32).wrapping_add(i) % UID_RANGE);
        let path = dir.join(uid.to_string());
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| io_err("opening", &path, e))?;
        // SAFETY: flock on an fd we own; no memory is involved.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok((uid, f));
        }
    }
    Err(HypervisorError::Jail("no free VMM uid".into()))
}

/// The cgroup of one VM: the one its caller names, else a leaf named after
/// its uid under `podvisor/`; on cgroup v2 when its controllers are there,
/// else on the v1 hierarchies. Returns the leaves (one per hierarchy) after
/// writing the limits.
/// The CFS quota (per `CPU_PERIOD_US`) of `jail`'s CPU limit, at most the
/// VM's vCPUs.
fn cpu_quota(config: &VmConfig, jail: &Jail) -> u64 {
    let millis = jail
        .cpu_millis
        .unwrap_or(config.vcpus as u64 * 1000)
        .clamp(10, config.vcpus as u64 * 1000);
    millis * CPU_PERIOD_US / 1000
}

/// The memory limit (bytes) of a VM's cgroup: its guest RAM, or the
/// smaller size its caller asked for, plus the VMM's overhead.
fn memory_limit(config: &VmConfig, jail: &Jail) -> u64 {
    let ram = jail
        .memory_mib
        .map_or(config.memory_mib, |m| m.min(config.memory_mib));
    (ram + memory_overhead_mib(config.accel)) << 20
}

/// Sets `jail`'s CPU limit and the memory limit of a VM of `config`'s size
/// on a VM's cgroup leaves `dirs`.
pub(crate) fn set_limits(
    dirs: &[PathBuf],
    config: &VmConfig,
    jail: &Jail,
) -> Result<(), HypervisorError> {
    let quota = cpu_quota(config, jail);
    let memory = memory_limit(config, jail);
    for dir in dirs {
        let limits = [
            ("cpu.max", format!("{quota} {CPU_PERIOD_US}")),
            ("cpu.cfs_quota_us", quota.to_string()),
            ("memory.max", memory.to_string()),
            ("memory.limit_in_bytes", memory.to_string()),
        ];
        for (file, value) in limits.iter().filter(|(f, _)| dir.join(f).exists()) {
            fs::write(dir.join(file), value).map_err(|e| io_err("writing", &dir.join(file), e))?;
        }
    }
    Ok(())
}

fn make_cgroup(uid: u32, config: &VmConfig, jail: &Jail) -> Result<Vec<PathBuf>, HypervisorError> {
    let memory = memory_limit(config, jail);
    let quota = cpu_quota(config, jail);
    let write = |dir: &Path, file: &str, value: String| {
        fs::write(dir.join(file), value).map_err(|e| io_err("writing", &dir.join(file), e))
    };
    let leaf = match &jail.cgroup {
        Some(c) if c.split('/').all(|p| !p.is_empty() && p != "." && p != "..") => c.clone(),
        Some(c) => return Err(HypervisorError::Jail(format!("cgroup path {c:?}"))),
        None => format!("podvisor/vm-{uid}"),
    };
    let fresh = |dir: &Path| -> Result<(), HypervisorError> {
        // A leaf left by a VM that died with its owner: empty, reused. One
        // with processes is somebody else's.
        let _ = fs::remove_dir(dir);
        let busy = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        if !busy.trim().is_empty() {
            return Err(HypervisorError::Jail(format!(
                "cgroup {} is in use by other processes",
                dir.display()
            )));
        }
        match fs::create_dir_all(dir) {
            Ok(()) => Ok(()),
            Err(e) => Err(io_err("creating cgroup", dir, e)),
        }
    };
    let v2 = Path::new("/sys/fs/cgroup");
    let controllers = fs::read_to_string(v2.join("cgroup.controllers")).unwrap_or_default();
    let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
    if has("memory") && has("pids") && has("cpu") {
        let dir = v2.join(&leaf);
        let parent = dir.parent().expect("a leaf under the root");
        fs::create_dir_all(parent).map_err(|e| io_err("creating cgroup", parent, e))?;
        // The controllers enabled on the way down to the leaf.
        let mut at = v2.to_path_buf();
        let _ = fs::write(at.join("cgroup.subtree_control"), "+memory +pids +cpu");
        for part in Path::new(&leaf)
            .parent()
            .into_iter()
            .flat_map(Path::components)
        {
            at.push(part);
            let _ = fs::write(at.join("cgroup.subtree_control"), "+memory +pids +cpu");
        }
        fresh(&dir)?;
        write(&dir, "memory.max", memory.to_string())?;
        write(&dir, "memory.swap.max", "0".into()).ok();
        write(&dir, "pids.max", PIDS_MAX.to_string())?;
        write(&dir, "cpu.max", format!("{quota} {CPU_PERIOD_US}"))?;
        return Ok(vec![dir]);
    }
    // Hybrid or v1 (this workplace): memory, pids and cpu each on their own.
    let mut dirs = Vec::new();
    for ctl in ["memory", "pids", "cpu"] {
        let base = v2.join(ctl);
        if !base.join("cgroup.procs").exists() {
            return Err(HypervisorError::Jail(format!(
                "no cgroup controller {ctl}: neither cgroup v2 with memory, pids and cpu nor {} is there",
                base.display()
            )));
        }
        let dir = base.join(&leaf);
        fresh(&dir)?;
        match ctl {
            "memory" => write(&dir, "memory.limit_in_bytes", memory.to_string())?,
            "pids" => write(&dir, "pids.max", PIDS_MAX.to_string())?,
            _ => {
                write(&dir, "cpu.cfs_period_us", CPU_PERIOD_US.to_string())?;
                write(&dir, "cpu.cfs_quota_us", quota.to_string())?;
            }
        }
        dirs.push(dir);
    }
    Ok(dirs)
}

/// Makes `dir` a mount point (a bind onto itself) with shared propagation.
fn shared_mount_point(dir: &Path) -> Result<(), HypervisorError> {
    let c = cstr(dir);
    let mounted = fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(&*dir.to_string_lossy()));
    // SAFETY: mount(2) on a NUL-terminated path that outlives the calls.
    unsafe {
        if !mounted
            && libc::mount(
                c.as_ptr(),
                c.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ) != 0
        {
            return Err(io_err("binding", dir, io::Error::last_os_error()));
        }
        if libc::mount(
            std::ptr::null(),
            c.as_ptr(),
            std::ptr::null(),
            libc::MS_SHARED,
            std::ptr::null(),
        ) != 0
        {
            return Err(io_err("sharing", dir, io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Moves the running VMM `pid` (jailed as `uid`) into the cgroup `jail`
/// names, with `jail`'s CPU limit, and removes the leaves it leaves
/// (`old`): a pool's ready VM taken by a caller with a `cgroupsPath` of its
/// own. Returns the new leaves.
pub(crate) fn move_cgroup(
    pid: u32,
    uid: u32,
    config: &VmConfig,
    jail: &Jail,
    old: &[PathBuf],
) -> Result<Vec<PathBuf>, HypervisorError> {
    let new = make_cgroup(uid, config, jail)?;
    for dir in &new {
        let procs = dir.join("cgroup.procs");
        if let Err(e) = fs::write(&procs, pid.to_string()) {
            remove_cgroups(&new);
            return Err(io_err("moving the VMM into", &procs, e));
        }
    }
    remove_cgroups(old);
    Ok(new)
}

/// Removes a VM's cgroup leaves (once its VMM has exited).
pub(crate) fn remove_cgroups(dirs: &[PathBuf]) {
    for d in dirs {
        let _ = fs::remove_dir(d);
    }
}

/// Our seccomp filter, beneath QEMU's own `-sandbox`: 9p may not make a
/// device node or a set-id file on the host, whatever the guest asks;
/// debugging another process and io_uring (which bypasses seccomp) are out.
fn filter() -> Result<[BpfProgram; 2], HypervisorError> {
    let err = |e: seccompiler::BackendError| HypervisorError::Jail(format!("seccomp: {e}"));
    let masked = |arg: u8, mask: u64, value: u64| {
        SeccompCondition::new(
            arg,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(mask),
            value,
        )
        .map(|c| SeccompRule::new(vec![c]))
        .and_then(|r| r)
        .map_err(err)
    };
    // Either set-id bit in the mode argument `arg`.
    let set_id = |arg: u8| -> Result<Vec<SeccompRule>, HypervisorError> {
        Ok(vec![
            masked(arg, 0o4000, 0o4000)?,
            masked(arg, 0o2000, 0o2000)?,
        ])
    };
    let s_ifmt = libc::S_IFMT as u64;
    let device = |arg: u8| -> Result<Vec<SeccompRule>, HypervisorError> {
        let mut r = set_id(arg)?;
        r.push(masked(arg, s_ifmt, libc::S_IFCHR as u64)?);
        r.push(masked(arg, s_ifmt, libc::S_IFBLK as u64)?);
        Ok(r)
    };
    let mut eperm: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    eperm.insert(libc::SYS_chmod, set_id(1)?);
    eperm.insert(libc::SYS_fchmod, set_id(1)?);
    eperm.insert(libc::SYS_fchmodat, set_id(2)?);
    eperm.insert(libc::SYS_fchmodat2, set_id(2)?);
    eperm.insert(libc::SYS_creat, set_id(1)?);
    eperm.insert(libc::SYS_open, set_id(2)?);
    eperm.insert(libc::SYS_openat, set_id(3)?);
    eperm.insert(libc::SYS_mknod, device(1)?);
    eperm.insert(libc::SYS_mknodat, device(2)?);
    for nr in [
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_pidfd_getfd,
        libc::SYS_kcmp,
    ] {
        eperm.insert(nr, vec![]);
    }
    let mut enosys: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    // openat2 carries its mode in a struct seccomp cannot read.
    for nr in [
        libc::SYS_openat2,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
    ] {
        enosys.insert(nr, vec![]);
    }
    let build = |rules, errno: i32| -> Result<BpfProgram, HypervisorError> {
        SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            SeccompAction::Errno(errno as u32),
            TargetArch::x86_64,
        )
        .map_err(|e| HypervisorError::Jail(format!("seccomp: {e}")))?
        .try_into()
        .map_err(|e: seccompiler::BackendError| HypervisorError::Jail(format!("seccomp: {e}")))
    };
    // Two programs, one errno each; the kernel runs both.
    Ok([build(enosys, libc::ENOSYS)?, build(eperm, libc::EPERM)?])
}

impl Plan {
    /// Prepares the jail of one VM: takes its uid, makes its cgroup and the
    /// jail directory, and returns the paths QEMU will use.
    pub(crate) fn new(
        jail: &Jail,
        binary: &Path,
        config: &VmConfig,
    ) -> Result<(Plan, Paths), HypervisorError> {
        let (uid, uid_lock) = take_uid(&jail.uid_dir, &config.id)?;
        fs::create_dir_all(&jail.dir).map_err(|e| io_err("creating", &jail.dir, e))?;
        let root = jail.dir.clone();
        let mut dirs = Vec::new();
        let mut binds = Vec::new();
        let mut links = Vec::new();
        let inside = |p: &str| root.join(p.trim_start_matches('/'));
        let mut bind = |src: &Path, dst: &str, attrs: u64| -> Result<PathBuf, HypervisorError> {
            let meta = fs::metadata(src).map_err(|e| io_err("jail source", src, e))?;
            binds.push(Bind {
                src: cstr(src),
                dst: cstr(&inside(dst)),
                is_dir: meta.is_dir(),
                attrs,
            });
            Ok(PathBuf::from(dst))
        };
        let ro = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
        // The program and its libraries, read-only.
        bind(Path::new("/usr"), "/usr", ro)?;
        for top in ["/lib", "/lib64", "/bin", "/sbin"] {
            match fs::read_link(top) {
                Ok(target) => links.push((cstr(&target), cstr(&inside(top)))),
                Err(_) if Path::new(top).is_dir() => drop(bind(Path::new(top), top, ro)?),
                Err(_) => {}
            }
        }
        dirs.push(cstr(&inside("/etc")));
        if Path::new("/etc/ld.so.cache").is_file() {
            bind(Path::new("/etc/ld.so.cache"), "/etc/ld.so.cache", ro)?;
        }
        let canonical = fs::canonicalize(binary).map_err(|e| io_err("resolving", binary, e))?;
        let binary_in = if canonical.starts_with("/usr/") {
            canonical.clone()
        } else {
            bind(&canonical, "/qemu", ro & !MOUNT_ATTR_NOEXEC)?
        };
        dirs.push(cstr(&inside("/dev")));
        let mut devices = vec!["null", "zero", "full", "random", "urandom"];
        if config.accel == Accel::Kvm {
            devices.push("kvm");
        }
        for d in devices {
            let src = Path::new("/dev").join(d);
            bind(
                &src,
                &format!("/dev/{d}"),
                MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC,
            )?;
        }
        if config
            .nics
            .iter()
            .any(|n| n.fd.is_none() && !n.tap.is_empty())
        {
            dirs.push(cstr(&inside("/dev/net")));
            bind(
                Path::new("/dev/net/tun"),
                "/dev/net/tun",
                MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC,
            )?;
        }
        let file = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC;
        dirs.push(cstr(&inside("/boot")));
        let kernel = bind(&config.kernel, "/boot/kernel", file | MOUNT_ATTR_RDONLY)?;
        let initrd = bind(&config.initrd, "/boot/initrd", file | MOUNT_ATTR_RDONLY)?;
        let memory = match &config.memory {
            crate::MemoryBackend::Anonymous => None,
            crate::MemoryBackend::File { path, .. } => {
                if !path.exists() {
                    File::create(path).map_err(|e| io_err("creating", path, e))?;
                }
                dirs.push(cstr(&inside("/mem")));
                let ro = match memory_readonly(binary, config) {
                    true => MOUNT_ATTR_RDONLY,
                    false => 0,
                };
                Some(bind(path, "/mem/memory", file | ro)?)
            }
        };
        dirs.push(cstr(&inside("/share")));
        // Trees the owner mounts into a share after start (pools, pods)
        // must reach the jail: the share becomes a shared mount point in the
        // owner's own mount namespace (never the host's), of which the
        // jail's bind is a slave.
        if jail.propagate {
            for s in &config.shares {
                shared_mount_point(&s.path)?;
            }
        }
        let mut shares = Vec::new();
        for (i, s) in config.shares.iter().enumerate() {
            let attrs = MOUNT_ATTR_NOSUID
                | MOUNT_ATTR_NODEV
                | if s.readonly { MOUNT_ATTR_RDONLY } else { 0 };
            shares.push(bind(&s.path, &format!("/share/{i}"), attrs)?);
        }
        // Disk images: only the top layer of a writable disk is writable.
        let mut disks = Vec::new();
        if !config.disks.is_empty() {
            dirs.push(cstr(&inside("/disk")));
        }
        for (i, d) in config.disks.iter().enumerate() {
            let top = d.layers.len().saturating_sub(1);
            let mut layers = Vec::new();
            for (j, layer) in d.layers.iter().enumerate() {
                let ro = if j < top || d.readonly {
                    MOUNT_ATTR_RDONLY
                } else {
                    0
                };
                layers.push(bind(layer, &format!("/disk/{i}-{j}"), file | ro)?);
            }
            disks.push(layers);
        }
        let vm_dir = vm_dir(config);
        let vm = bind(&vm_dir, "/vm", file)?;
        let proc_dir = cstr(&inside("/proc"));
        let cgroups = make_cgroup(uid, config, jail)?;
        let cgroup_procs = cgroups
            .iter()
            .map(|d| cstr(&d.join("cgroup.procs")))
            .collect();
        let cap_last = fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(40);
        let plan = Plan {
            root: cstr(&root),
            dirs,
            binds,
            links,
            proc_dir,
            cgroup_procs,
            uid,
            cap_last,
            filters: filter()?,
            _uid_lock: uid_lock,
            cgroups,
            file_size_max: file_size_max(config),
        };
        let paths = Paths {
            binary: binary_in,
            kernel,
            initrd,
            shares,
            disks,
            memory,
            memory_readonly: memory_readonly(binary, config),
            vm_dir: vm,
        };
        Ok((plan, paths))
    }

    /// Runs in the child between fork and exec: only system calls, no
    /// allocation. Fails with the errno of the step that failed.
    pub(crate) fn enter(&self) -> io::Result<()> {
        let check = |r: libc::c_int| {
            if r < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        let checkl = |r: libc::c_long| {
            if r < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        // SAFETY: every call below is a system call on NUL-terminated
        // strings and plain structs that live in `self` or on the stack for
        // the duration of the call; none allocates or takes a lock.
        unsafe {
            for procs in &self.cgroup_procs {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                check(fd)?;
                let w = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if w != 1 {
                    return Err(io::Error::last_os_error());
                }
            }
            check(libc::unshare(libc::CLONE_NEWNS))?;
            check(libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_SLAVE,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                c"podvisor-jail".as_ptr(),
                self.root.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                c"size=1m,mode=0755".as_ptr().cast(),
            ))?;
            for d in &self.dirs {
                check(libc::mkdir(d.as_ptr(), 0o755))?;
            }
            for (target, link) in &self.links {
                check(libc::symlink(target.as_ptr(), link.as_ptr()))?;
            }
            for b in &self.binds {
                if b.is_dir {
                    check(libc::mkdir(b.dst.as_ptr(), 0o755))?;
                } else {
                    let fd = libc::open(
                        b.dst.as_ptr(),
                        libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                        0o600,
                    );
                    check(fd)?;
                    libc::close(fd);
                }
                check(libc::mount(
                    b.src.as_ptr(),
                    b.dst.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                ))?;
                set_mount_attrs(libc::AT_FDCWD, &b.dst, libc::AT_SYMLINK_NOFOLLOW, b.attrs)?;
            }
            check(libc::mkdir(self.proc_dir.as_ptr(), 0o555))?;
            check(libc::mount(
                c"proc".as_ptr(),
                self.proc_dir.as_ptr(),
                c"proc".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                c"subset=pid,hidepid=invisible".as_ptr().cast(),
            ))?;
            check(libc::chdir(self.root.as_ptr()))?;
            checkl(libc::syscall(
                libc::SYS_pivot_root,
                c".".as_ptr(),
                c".".as_ptr(),
            ))?;
            check(libc::umount2(c".".as_ptr(), libc::MNT_DETACH))?;
            check(libc::chdir(c"/".as_ptr()))?;
            check(libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT
                    | libc::MS_RDONLY
                    | libc::MS_NOSUID
                    | libc::MS_NODEV
                    | libc::MS_NOEXEC,
                std::ptr::null(),
            ))?;
            for (res, lim) in [
                (libc::RLIMIT_CORE, 0),
                (libc::RLIMIT_NOFILE, NOFILE_MAX),
                (libc::RLIMIT_NPROC, PIDS_MAX as u64),
                (libc::RLIMIT_FSIZE, self.file_size_max),
            ] {
                let mut cur = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                check(libc::getrlimit(res, &mut cur))?;
                let max = cur.rlim_max.min(lim);
                check(libc::setrlimit(
                    res,
                    &libc::rlimit {
                        rlim_cur: max,
                        rlim_max: max,
                    },
                ))?;
            }
            // Capabilities: the bounding set first (needs CAP_SETPCAP), then
            // the uid, keeping the four 9p needs as ambient ones.
            let keep = |c: u32| KEEP_CAPS.contains(&c);
            for c in 0..=self.cap_last {
                if !keep(c) {
                    check(libc::prctl(
                        libc::PR_CAPBSET_DROP,
                        c as libc::c_ulong,
                        0,
                        0,
                        0,
                    ))?;
                }
            }
            check(libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0))?;
            checkl(libc::syscall(
                libc::SYS_setgroups,
                0,
                std::ptr::null::<libc::gid_t>(),
            ))?;
            let id = self.uid;
            checkl(libc::syscall(libc::SYS_setresgid, id, id, id))?;
            checkl(libc::syscall(libc::SYS_setresuid, id, id, id))?;
            let mask: u32 = KEEP_CAPS.iter().fold(0, |m, c| m | (1 << c));
            let header = CapHeader {
                version: 0x2008_0522,
                pid: 0,
            };
            let data = [
                CapData {
                    effective: mask,
                    permitted: mask,
                    inheritable: mask,
                },
                CapData {
                    effective: 0,
                    permitted: 0,
                    inheritable: 0,
                },
            ];
            checkl(libc::syscall(
                libc::SYS_capset,
                &header as *const CapHeader,
                data.as_ptr(),
            ))?;
            for c in KEEP_CAPS {
                check(libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                    c as libc::c_ulong,
                    0,
                    0,
                ))?;
            }
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
            for prog in &self.filters {
                let fprog = libc::sock_fprog {
                    len: prog.len() as u16,
                    filter: prog.as_ptr() as *mut libc::sock_filter,
                };
                checkl(libc::syscall(
                    libc::SYS_seccomp,
                    libc::SECCOMP_SET_MODE_FILTER,
                    0,
                    &fprog as *const libc::sock_fprog,
                ))?;
            }
        }
        Ok(())
    }
}

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_builds_two_programs() {
        let [a, b] = filter().unwrap();
        assert!(a.len() > 4 && b.len() > a.len());
    }

    #[test]
    fn uids_are_exclusive() {
        let dir = std::env::temp_dir().join(format!("podvisor-uids-{}", std::process::id()));
        let (a, _la) = take_uid(&dir, "x").unwrap();
        let (b, lb) = take_uid(&dir, "x").unwrap();
        assert_ne!(a, b);
        assert!(a >= UID_BASE && b >= UID_BASE);
        drop(lb);
        let (c, _lc) = take_uid(&dir, "x").unwrap();
        assert_eq!(b, c);
        let _ = fs::remove_dir_all(dir);
    }
}
