//! Starting container processes: fork into the container's namespaces, set up
//! its root, ids and stdio, then exec. The child runs only syscalls on data
//! prepared before the fork (the agent is multi-threaded: no allocation there).

use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::signal::{sigprocmask, SigSet, SigmaskHow};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use nix::unistd::{self, AccessFlags, ForkResult, Gid, Pid, Uid};

use crate::reaper::{ExitWatch, Reaper};

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Where the process goes.
// One per spawn, moved once: the size of `New` costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
pub enum Target {
    /// A new container: fresh pid, mount, uts, ipc and cgroup namespaces,
    /// rooted at `rootfs`.
    New {
        rootfs: PathBuf,
        devpts: PathBuf,
        hostname: String,
        readonly: bool,
        /// A pod's container: stays in the VM's UTS and IPC namespaces
        /// (the pod's hostname); `hostname` is ignored.
        pod_shared: bool,
        /// Mounted after the root's own filesystems, in order; mount points
        /// already exist (see `mounts::prepare`).
        mounts: Vec<crate::mounts::MountPlan>,
        /// (/proc/sys/... path, value), written inside the new namespaces.
        sysctl: Vec<(String, String)>,
        /// OCI maskedPaths and readonlyPaths, applied after the pivot.
        masked: Vec<String>,
        readonly_paths: Vec<String>,
        /// linux.rootfsPropagation, set on / after the pivot.
        root_propagation: Option<MsFlags>,
        /// linux.devices: (path in the container, kind, major, minor, mode, uid, gid).
        devices: Vec<DeviceNode>,
    },
    /// Into the namespaces of a running container's first process, opened
    /// when it was created (so a recycled pid can never be joined).
    Join { ns: Arc<Namespaces> },
}

/// A device node of OCI linux.devices, checked by the service.
#[derive(Clone, Debug)]
pub struct DeviceNode {
    pub path: String,
    pub kind: SFlag,
    pub major: u64,
    pub minor: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// A container's pid, ipc, uts, cgroup and mount namespaces, in that order.
pub struct Namespaces {
    fds: Vec<OwnedFd>,
}

impl Namespaces {
    /// Opens the namespaces of `pid`, which must be our unreaped child.
    pub fn of(pid: Pid) -> Result<Namespaces, SpawnError> {
        let mut fds = Vec::new();
        for ns in ["pid", "ipc", "uts", "cgroup", "mnt"] {
            let path = format!("/proc/{pid}/ns/{ns}");
            let fd = nix::fcntl::open(
                path.as_str(),
                nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| SpawnError::Os("opening the container's namespaces", e))?;
            // SAFETY: `open` just returned this fd and nothing else owns it.
            fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        Ok(Namespaces { fds })
    }

    /// The container's mount namespace.
    pub fn mnt(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        self.fds.get(4).map(|f| f.as_fd())
    }
}

/// Everything a container process needs, as the service hands it over.
pub struct ProcessSpec {
    pub target: Target,
    pub cgroup_procs: Option<PathBuf>,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub rlimits: Vec<(Resource, u64, u64)>,
    pub no_new_privs: bool,
    pub umask: Option<u32>,
    pub oom_score_adj: Option<i32>,
    /// Capability sets to keep; None keeps the agent's (all of them).
    pub caps: Option<crate::caps::CapSets>,
    pub seccomp: Seccomp,
    /// stdin, stdout, stderr as the child must see them.
    pub stdio: [RawFd; 3],
    pub tty: bool,
    /// Stop before exec until `Spawned::release` (OCI create/start).
    pub hold: bool,
}

/// seccomp filters the host compiled (`agent_proto::Process::seccomp`).
#[derive(Default)]
pub struct Seccomp {
    programs: Vec<Vec<libc::sock_filter>>,
    flags: u32,
}

impl Seccomp {
    /// Reads each program's 8-byte instructions; refuses a ragged or empty
    /// program, or one longer than the kernel takes (BPF_MAXINSNS).
    pub fn parse(programs: &[Vec<u8>], flags: u32) -> Result<Seccomp, String> {
        let mut out = Vec::new();
        for p in programs {
            if p.is_empty() || p.len() % 8 != 0 || p.len() / 8 > 4096 {
                return Err(format!("a seccomp program of {} bytes", p.len()));
            }
            out.push(
                p.chunks_exact(8)
                    .map(|i| libc::sock_filter {
                        code: u16::from_le_bytes([i[0], i[1]]),
                        jt: i[2],
                        jf: i[3],
                        k: u32::from_le_bytes([i[4], i[5], i[6], i[7]]),
                    })
                    .collect(),
            );
        }
        Ok(Seccomp {
            programs: out,
            flags,
        })
    }

    /// Installs the filters (in the child: system calls only).
    fn install(&self) -> nix::Result<()> {
        for p in &self.programs {
            let prog = libc::sock_fprog {
                len: p.len() as u16,
                filter: p.as_ptr() as *mut libc::sock_filter,
            };
            // SAFETY: seccomp(SECCOMP_SET_MODE_FILTER) reads `prog`, which
            // points at `p`; both live across the call.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_seccomp,
                    libc::SECCOMP_SET_MODE_FILTER,
                    self.flags,
                    &prog as *const libc::sock_fprog,
                )
            };
            if rc < 0 {
                return Err(Errno::last());
            }
        }
        Ok(())
    }
}

/// A step of the child's setup, reported back with the errno that failed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Stage {
    Ready = 0,
    Cgroup,
    Namespaces,
    Mounts,
    PivotRoot,
    Hostname,
    Session,
    Stdio,
    Rlimit,
    Ids,
    Cwd,
    NoNewPrivs,
    FindExecutable,
    Exec,
    Sysctl,
    Capabilities,
    Seccomp,
    MaskedPaths,
    ReadonlyPaths,
    OomScoreAdj,
    Devices,
}

impl Stage {
    fn from_u32(v: u32) -> Stage {
        use Stage::*;
        [
            Ready,
            Cgroup,
            Namespaces,
            Mounts,
            PivotRoot,
            Hostname,
            Session,
            Stdio,
            Rlimit,
            Ids,
            Cwd,
            NoNewPrivs,
            FindExecutable,
            Exec,
            Sysctl,
            Capabilities,
            Seccomp,
            MaskedPaths,
            ReadonlyPaths,
            OomScoreAdj,
            Devices,
        ]
        .get(v as usize)
        .copied()
        .unwrap_or(Exec)
    }

    fn what(self) -> &'static str {
        match self {
            Stage::Ready => "ready",
            Stage::Cgroup => "joining the container cgroup",
            Stage::Namespaces => "entering namespaces",
            Stage::Mounts => "mounting the container filesystems",
            Stage::PivotRoot => "pivoting to the container root",
            Stage::Hostname => "setting the hostname",
            Stage::Session => "creating a session and controlling terminal",
            Stage::Stdio => "setting up stdio",
            Stage::Rlimit => "setting rlimits",
            Stage::Ids => "setting user and groups",
            Stage::Cwd => "changing to the working directory",
            Stage::NoNewPrivs => "setting no_new_privs",
            Stage::FindExecutable => "finding the executable",
            Stage::Exec => "exec",
            Stage::Sysctl => "writing sysctls",
            Stage::Capabilities => "setting capabilities",
            Stage::Seccomp => "installing the seccomp filter",
            Stage::MaskedPaths => "masking a path (maskedPaths)",
            Stage::ReadonlyPaths => "making a path read-only (readonlyPaths)",
            Stage::OomScoreAdj => "writing oom_score_adj",
            Stage::Devices => "making a device node (linux.devices)",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("exec: {0:?}: executable file not found in $PATH")]
    NotFound(String),
    #[error("{what} for {cmd:?}: {errno}")]
    Setup {
        what: &'static str,
        cmd: String,
        errno: Errno,
    },
    #[error("container process died during setup")]
    Died,
    #[error("{0}: {1}")]
    Os(&'static str, #[source] Errno),
}

/// A process that was forked; with `hold`, it waits for `release`.
pub struct Spawned {
    pub pid: Pid,
    pub pidfd: Option<OwnedFd>,
    pub exit: ExitWatch,
    start: Option<OwnedFd>,
    status: OwnedFd,
    cmd: String,
}

impl Spawned {
    /// Lets a held process exec and reports whether the exec worked.
    pub fn release(&mut self) -> Result<(), SpawnError> {
        if let Some(start) = self.start.take() {
            unistd::write(&start, b"s")
                .map_err(|e| SpawnError::Os("releasing container process", e))?;
        }
        match read_record(self.status.as_raw_fd()) {
            None => Ok(()),
            Some((stage, errno)) => Err(stage_error(stage, errno, &self.cmd)),
        }
    }
}

/// Forks the process described by `spec`. Returns once it is held before exec
/// (`hold`) or has exec'd.
pub fn spawn(spec: ProcessSpec, reaper: &Reaper) -> Result<Spawned, SpawnError> {
    let prepared = Prepared::new(&spec)?;
    let cmd = spec.args.first().cloned().unwrap_or_default();
    // pid namespaces apply to the children of the calling thread only, so fork
    // from a thread of our own.
    std::thread::scope(|s| {
        s.spawn(|| spawn_in_thread(&spec, &prepared, reaper, cmd.clone()))
            .join()
            .unwrap_or(Err(SpawnError::Died))
    })
}

fn spawn_in_thread(
    spec: &ProcessSpec,
    prepared: &Prepared,
    reaper: &Reaper,
    cmd: String,
) -> Result<Spawned, SpawnError> {
    let (status_r, status_w) =
        unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| SpawnError::Os("pipe", e))?;
    let (start_r, start_w) =
        unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| SpawnError::Os("pipe", e))?;
    let mut join_fds = Vec::new();
    match &spec.target {
        Target::New { .. } => unshare(CloneFlags::CLONE_NEWPID)
            .map_err(|e| SpawnError::Os("creating the pid namespace", e))?,
        Target::Join { ns } => {
            setns(&ns.fds[0], CloneFlags::CLONE_NEWPID)
                .map_err(|e| SpawnError::Os("joining the container's pid namespace", e))?;
            join_fds.extend(ns.fds[1..].iter().map(|f| f.as_raw_fd()));
        }
    }
    let child_ctx = ChildCtx {
        p: prepared,
        spec,
        status_w: status_w.as_raw_fd(),
        start_r: start_r.as_raw_fd(),
        join_fds,
    };
    let mut guard = reaper.lock();
    // SAFETY: the child runs `child_main`, which only makes syscalls on data
    // prepared before the fork and never returns (it execs or _exits).
    let fork = unsafe { unistd::fork() }.map_err(|e| SpawnError::Os("fork", e))?;
    let pid = match fork {
        ForkResult::Child => child_main(&child_ctx),
        ForkResult::Parent { child } => child,
    };
    let exit = Reaper::watch(&mut guard, pid);
    // Under the reaper lock the child cannot have been reaped, so its pid
    // still names it.
    let pidfd = pidfd_open(pid).map_err(|e| SpawnError::Os("pidfd_open", e))?;
    drop(guard);
    drop(status_w);
    drop(start_r);

    let record = read_record(status_r.as_raw_fd());
    if spec.hold {
        match record {
            Some((Stage::Ready, _)) => {}
            Some((stage, errno)) => return Err(stage_error(stage, errno, &cmd)),
            None => return Err(SpawnError::Died),
        }
    } else if let Some((stage, errno)) = record {
        return Err(stage_error(stage, errno, &cmd));
    }
    Ok(Spawned {
        pid,
        pidfd: Some(pidfd),
        exit,
        start: spec.hold.then_some(start_w),
        status: status_r,
        cmd,
    })
}

fn pidfd_open(pid: Pid) -> nix::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: the syscall returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Sends `sig` to the process behind `pidfd`.
pub fn pidfd_signal(pidfd: &OwnedFd, sig: i32) -> nix::Result<()> {
    // SAFETY: pidfd_send_signal takes an fd, a signal number, a NULL siginfo
    // and flags; no memory is passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

fn stage_error(stage: Stage, errno: Errno, cmd: &str) -> SpawnError {
    if stage == Stage::FindExecutable {
        SpawnError::NotFound(cmd.to_string())
    } else {
        SpawnError::Setup {
            what: stage.what(),
            cmd: cmd.to_string(),
            errno,
        }
    }
}

fn read_record(fd: RawFd) -> Option<(Stage, Errno)> {
    let mut buf = [0u8; 8];
    let mut got = 0;
    while got < buf.len() {
        match unistd::read(fd, &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(Errno::EINTR) => continue,
            Err(_) => break,
        }
    }
    if got < buf.len() {
        return None;
    }
    let stage = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let errno = i32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    Some((Stage::from_u32(stage), Errno::from_raw(errno)))
}

/// C strings and pointer arrays built before the fork.
struct Prepared {
    /// Owners of what `argv_ptrs` and `envp_ptrs` point to.
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    _envp: Vec<CString>,
    envp_ptrs: Vec<*const libc::c_char>,
    candidates: Vec<CString>,
    cwd: CString,
    cgroup_procs: Option<CString>,
    mounts: Option<RootMounts>,
    hostname: Option<CString>,
    groups: Vec<Gid>,
    oom_score_adj: Option<CString>,
}

// SAFETY: the raw pointers point into the CStrings owned by the same struct,
// which is only read, and never outlives them.
unsafe impl Sync for Prepared {}
// SAFETY: as above; moving the struct moves the owners of the pointed-to data
// without moving the heap buffers the pointers refer to.
unsafe impl Send for Prepared {}

struct RootMounts {
    rootfs: CString,
    readonly: bool,
    devpts: CString,
    dirs: Vec<(CString, Mode)>,
    proc_: CString,
    dev: CString,
    pts: CString,
    shm: CString,
    mqueue: CString,
    sys: CString,
    cgroup: CString,
    nodes: Vec<(CString, u64, u64)>,
    links: Vec<(CString, CString)>,
    extra: Vec<crate::mounts::Prepared>,
    sysctl: Vec<(CString, CString)>,
    masked: Vec<CString>,
    readonly_paths: Vec<CString>,
    root_propagation: Option<MsFlags>,
    /// (path under the root, its parent, the node).
    devices: Vec<(CString, CString, DeviceNode)>,
    pod_shared: bool,
}

fn cstr(s: impl AsRef<[u8]>) -> Result<CString, SpawnError> {
    CString::new(s.as_ref()).map_err(|_| SpawnError::Os("string with a NUL byte", Errno::EINVAL))
}

fn path_c(p: &Path) -> Result<CString, SpawnError> {
    cstr(p.as_os_str().as_encoded_bytes())
}

impl Prepared {
    fn new(spec: &ProcessSpec) -> Result<Self, SpawnError> {
        if spec.args.is_empty() {
            return Err(SpawnError::Os("process args are empty", Errno::EINVAL));
        }
        let argv = spec.args.iter().map(cstr).collect::<Result<Vec<_>, _>>()?;
        let envp = spec.env.iter().map(cstr).collect::<Result<Vec<_>, _>>()?;
        let mut argv_ptrs: Vec<_> = argv.iter().map(|c| c.as_ptr()).collect();
        argv_ptrs.push(std::ptr::null());
        let mut envp_ptrs: Vec<_> = envp.iter().map(|c| c.as_ptr()).collect();
        envp_ptrs.push(std::ptr::null());

        let program = &spec.args[0];
        let candidates = if program.contains('/') {
            vec![cstr(program)?]
        } else {
            let path = spec
                .env
                .iter()
                .find_map(|e| e.strip_prefix("PATH="))
                .unwrap_or(DEFAULT_PATH);
            path.split(':')
                .filter(|d| !d.is_empty())
                .map(|d| cstr(format!("{}/{program}", d.trim_end_matches('/'))))
                .collect::<Result<Vec<_>, _>>()?
        };
        let cwd = cstr(if spec.cwd.is_empty() { "/" } else { &spec.cwd })?;
        let cgroup_procs = spec.cgroup_procs.as_deref().map(path_c).transpose()?;
        let (mounts, hostname) = match &spec.target {
            Target::New {
                rootfs,
                devpts,
                hostname,
                readonly,
                pod_shared,
                mounts,
                sysctl,
                masked,
                readonly_paths,
                root_propagation,
                devices,
            } => {
                let at = |p: &str| path_c(&rootfs.join(p));
                let extra = mounts
                    .iter()
                    .map(|m| m.prepare(rootfs))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|_| SpawnError::Os("string with a NUL byte", Errno::EINVAL))?;
                let sysctl = sysctl
                    .iter()
                    .map(|(k, v)| Ok((cstr(k)?, cstr(v)?)))
                    .collect::<Result<Vec<_>, SpawnError>>()?;
                let mounts = RootMounts {
                    rootfs: path_c(rootfs)?,
                    readonly: *readonly,
                    devpts: path_c(devpts)?,
                    dirs: vec![
                        (at("proc")?, Mode::from_bits_truncate(0o555)),
                        (at("dev")?, Mode::from_bits_truncate(0o755)),
                        (at("sys")?, Mode::from_bits_truncate(0o555)),
                    ],
                    proc_: at("proc")?,
                    dev: at("dev")?,
                    pts: at("dev/pts")?,
                    shm: at("dev/shm")?,
                    mqueue: at("dev/mqueue")?,
                    sys: at("sys")?,
                    cgroup: at("sys/fs/cgroup")?,
                    nodes: [
                        ("null", 1, 3),
                        ("zero", 1, 5),
                        ("full", 1, 7),
                        ("random", 1, 8),
                        ("urandom", 1, 9),
                        ("tty", 5, 0),
                    ]
                    .iter()
                    .map(|(n, maj, min)| Ok((at(&format!("dev/{n}"))?, *maj, *min)))
                    .collect::<Result<Vec<_>, SpawnError>>()?,
                    links: [
                        ("pts/ptmx", "dev/ptmx"),
                        ("/proc/self/fd", "dev/fd"),
                        ("/proc/self/fd/0", "dev/stdin"),
                        ("/proc/self/fd/1", "dev/stdout"),
                        ("/proc/self/fd/2", "dev/stderr"),
                    ]
                    .iter()
                    .map(|(target, link)| Ok((cstr(target)?, at(link)?)))
                    .collect::<Result<Vec<_>, SpawnError>>()?,
                    extra,
                    sysctl,
                    masked: masked.iter().map(cstr).collect::<Result<_, _>>()?,
                    readonly_paths: readonly_paths.iter().map(cstr).collect::<Result<_, _>>()?,
                    root_propagation: *root_propagation,
                    devices: devices
                        .iter()
                        .map(|d| {
                            let target = rootfs.join(d.path.trim_start_matches('/'));
                            let parent = target.parent().unwrap_or(rootfs).to_path_buf();
                            Ok((path_c(&target)?, path_c(&parent)?, d.clone()))
                        })
                        .collect::<Result<_, SpawnError>>()?,
                    pod_shared: *pod_shared,
                };
                let hostname = if *pod_shared {
                    None
                } else {
                    Some(cstr(hostname)?)
                };
                (Some(mounts), hostname)
            }
            Target::Join { .. } => (None, None),
        };
        Ok(Prepared {
            _argv: argv,
            argv_ptrs,
            _envp: envp,
            envp_ptrs,
            candidates,
            cwd,
            cgroup_procs,
            mounts,
            hostname,
            groups: spec.groups.iter().map(|g| Gid::from_raw(*g)).collect(),
            oom_score_adj: spec
                .oom_score_adj
                .map(|v| cstr(v.to_string()))
                .transpose()?,
        })
    }
}

struct ChildCtx<'a> {
    p: &'a Prepared,
    spec: &'a ProcessSpec,
    status_w: RawFd,
    start_r: RawFd,
    join_fds: Vec<RawFd>,
}

fn report(fd: RawFd, stage: Stage, errno: Errno) {
    let mut buf = [0u8; 8];
    buf[..4].copy_from_slice(&(stage as u32).to_le_bytes());
    buf[4..].copy_from_slice(&(errno as i32).to_le_bytes());
    // SAFETY: `fd` is the status pipe's write end, open for the child's life.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let _ = unistd::write(fd, &buf);
}

fn child_main(ctx: &ChildCtx) -> ! {
    let (stage, errno) = match child_setup(ctx) {
        Ok(never) => match never {},
        Err(failure) => failure,
    };
    report(ctx.status_w, stage, errno);
    exit_now(127)
}

fn exit_now(code: i32) -> ! {
    // SAFETY: _exit ends the forked child at once, running no atexit handlers
    // that could touch state copied from the multi-threaded parent.
    unsafe { libc::_exit(code) }
}

enum Never {}

fn at(stage: Stage) -> impl Fn(Errno) -> (Stage, Errno) {
    move |e| (stage, e)
}

fn child_setup(ctx: &ChildCtx) -> Result<Never, (Stage, Errno)> {
    let p = ctx.p;
    let spec = ctx.spec;
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
    // Rust ignores SIGPIPE; an ignored signal stays ignored across exec.
    // SAFETY: restoring the default disposition installs no handler.
    let _ = unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigDfl,
        )
    };

    if let Some(procs) = &p.cgroup_procs {
        let fd = nix::fcntl::open(procs.as_c_str(), nix::fcntl::OFlag::O_WRONLY, Mode::empty())
            .map_err(at(Stage::Cgroup))?;
        // SAFETY: `open` just returned this fd.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        unistd::write(&fd, b"0").map_err(at(Stage::Cgroup))?;
    }
    match &p.mounts {
        Some(m) => {
            let mut flags = CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWCGROUP;
            if !m.pod_shared {
                flags |= CloneFlags::CLONE_NEWUTS | CloneFlags::CLONE_NEWIPC;
            }
            unshare(flags).map_err(at(Stage::Namespaces))?;
            setup_root(m).map_err(at(Stage::Mounts))?;
            for extra in &m.extra {
                extra.mount().map_err(at(Stage::Mounts))?;
            }
            for (path, parent, d) in &m.devices {
                make_device(path, parent, d).map_err(at(Stage::Devices))?;
            }
            for (key, value) in &m.sysctl {
                write_file(key, value).map_err(at(Stage::Sysctl))?;
            }
            pivot(&m.rootfs).map_err(at(Stage::PivotRoot))?;
            for path in &m.masked {
                mask(path).map_err(at(Stage::MaskedPaths))?;
            }
            for path in &m.readonly_paths {
                read_only(path).map_err(at(Stage::ReadonlyPaths))?;
            }
            if let Some(p) = m.root_propagation {
                mount(None::<&CStr>, c"/", None::<&CStr>, p, None::<&CStr>)
                    .map_err(at(Stage::Mounts))?;
            }
            if m.readonly {
                mount(
                    None::<&CStr>,
                    c"/",
                    None::<&CStr>,
                    MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
                    None::<&CStr>,
                )
                .map_err(at(Stage::Mounts))?;
            }
            if let Some(h) = &p.hostname {
                if !h.is_empty() {
                    unistd::sethostname(
                        <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(h.to_bytes()),
                    )
                    .map_err(at(Stage::Hostname))?;
                }
            }
        }
        None => {
            for (fd, flag) in ctx.join_fds.iter().zip([
                CloneFlags::CLONE_NEWIPC,
                CloneFlags::CLONE_NEWUTS,
                CloneFlags::CLONE_NEWCGROUP,
                CloneFlags::CLONE_NEWNS,
            ]) {
                // SAFETY: the fds were opened before the fork and stay open.
                let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(*fd) };
                setns(fd, flag).map_err(at(Stage::Namespaces))?;
            }
        }
    }

    unistd::setsid().map_err(at(Stage::Session))?;
    for (want, fd) in spec.stdio.iter().enumerate() {
        unistd::dup2(*fd, want as RawFd).map_err(at(Stage::Stdio))?;
    }
    // Everything else the agent had open (other processes' pipes, the
    // channel, sockets) must not reach the container, nor be held by a
    // process waiting to be started.
    close_fds_except(&[ctx.status_w, ctx.start_r]).map_err(at(Stage::Stdio))?;
    if spec.tty {
        // SAFETY: TIOCSCTTY takes an int argument; fd 0 is the pty's replica.
        let rc = unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) };
        if rc < 0 {
            return Err((Stage::Session, Errno::last()));
        }
    }
    for (resource, soft, hard) in &spec.rlimits {
        setrlimit(*resource, *soft, *hard).map_err(at(Stage::Rlimit))?;
    }
    // Lowering it takes CAP_SYS_RESOURCE: while the process still has it.
    if let Some(v) = &p.oom_score_adj {
        write_file(c"/proc/self/oom_score_adj", v).map_err(at(Stage::OomScoreAdj))?;
    }
    if let Some(mask) = spec.umask {
        nix::sys::stat::umask(Mode::from_bits_truncate(mask));
    }
    if unistd::chdir(p.cwd.as_c_str()).is_err() {
        mkdir_all(&p.cwd).map_err(at(Stage::Cwd))?;
    }
    // Without no_new_privs installing a filter takes CAP_SYS_ADMIN: before
    // the capabilities go (as runc does; the profile must allow what follows).
    if !spec.no_new_privs {
        spec.seccomp.install().map_err(at(Stage::Seccomp))?;
    }
    if let Some(caps) = &spec.caps {
        caps.drop_bounding().map_err(at(Stage::Capabilities))?;
        caps.keep_across_setuid().map_err(at(Stage::Capabilities))?;
    }
    unistd::setgroups(&p.groups).map_err(at(Stage::Ids))?;
    unistd::setgid(Gid::from_raw(spec.gid)).map_err(at(Stage::Ids))?;
    unistd::setuid(Uid::from_raw(spec.uid)).map_err(at(Stage::Ids))?;
    if let Some(caps) = &spec.caps {
        caps.apply().map_err(at(Stage::Capabilities))?;
    }
    unistd::chdir(p.cwd.as_c_str()).map_err(at(Stage::Cwd))?;
    if spec.no_new_privs {
        nix::sys::prctl::set_no_new_privs().map_err(at(Stage::NoNewPrivs))?;
    }

    let program = p
        .candidates
        .iter()
        .find(|c| unistd::access(c.as_c_str(), AccessFlags::X_OK).is_ok())
        .ok_or((Stage::FindExecutable, Errno::ENOENT))?;

    if spec.hold {
        report(ctx.status_w, Stage::Ready, Errno::from_raw(0));
        let mut b = [0u8; 1];
        match unistd::read(ctx.start_r, &mut b) {
            Ok(1) => {}
            // The host removed the container instead of starting it.
            _ => exit_now(0),
        }
    }
    // With it, as late as can be: only execve follows.
    if spec.no_new_privs {
        spec.seccomp.install().map_err(at(Stage::Seccomp))?;
    }
    // SAFETY: `program`, `argv_ptrs` and `envp_ptrs` are NUL-terminated C
    // strings and NULL-terminated arrays owned by `Prepared`.
    unsafe { libc::execve(program.as_ptr(), p.argv_ptrs.as_ptr(), p.envp_ptrs.as_ptr()) };
    Err((Stage::Exec, Errno::last()))
}

/// Writes `value` to the file at `path` (open, write, close: no allocation).
fn write_file(path: &CStr, value: &CStr) -> nix::Result<()> {
    let fd = nix::fcntl::open(path, nix::fcntl::OFlag::O_WRONLY, Mode::empty())?;
    // SAFETY: `open` just returned this fd.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    unistd::write(&fd, value.to_bytes()).map(|_| ())
}

fn ignore_exists(r: nix::Result<()>) -> nix::Result<()> {
    match r {
        Err(Errno::EEXIST) => Ok(()),
        other => other,
    }
}

fn setup_root(m: &RootMounts) -> nix::Result<()> {
    let none = None::<&CStr>;
    mount(
        none,
        c"/",
        none,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        none,
    )?;
    mount(
        Some(m.rootfs.as_c_str()),
        m.rootfs.as_c_str(),
        none,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        none,
    )?;
    for (dir, mode) in &m.dirs {
        ignore_exists(unistd::mkdir(dir.as_c_str(), *mode))?;
    }
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(
        Some(c"proc"),
        m.proc_.as_c_str(),
        Some(c"proc"),
        nosuid,
        none,
    )?;
    mount(
        Some(c"tmpfs"),
        m.dev.as_c_str(),
        Some(c"tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME,
        Some(c"mode=755,size=65536k"),
    )?;
    for (node, major, minor) in &m.nodes {
        ignore_exists(mknod(
            node.as_c_str(),
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(*major, *minor),
        ))?;
        // mknod honours the umask; the nodes must be 0666.
        nix::sys::stat::fchmodat(
            None,
            node.as_c_str(),
            Mode::from_bits_truncate(0o666),
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        )?;
    }
    for dir in [&m.pts, &m.shm, &m.mqueue] {
        ignore_exists(unistd::mkdir(
            dir.as_c_str(),
            Mode::from_bits_truncate(0o755),
        ))?;
    }
    mount(
        Some(m.devpts.as_c_str()),
        m.pts.as_c_str(),
        none,
        MsFlags::MS_BIND,
        none,
    )?;
    mount(
        Some(c"shm"),
        m.shm.as_c_str(),
        Some(c"tmpfs"),
        nosuid,
        Some(c"mode=1777,size=65536k"),
    )?;
    mount(
        Some(c"mqueue"),
        m.mqueue.as_c_str(),
        Some(c"mqueue"),
        nosuid,
        none,
    )?;
    for (target, link) in &m.links {
        ignore_exists(unistd::symlinkat(target.as_c_str(), None, link.as_c_str()))?;
    }
    mount(
        Some(c"sysfs"),
        m.sys.as_c_str(),
        Some(c"sysfs"),
        nosuid | MsFlags::MS_RDONLY,
        none,
    )?;
    mount(
        Some(c"cgroup2"),
        m.cgroup.as_c_str(),
        Some(c"cgroup2"),
        nosuid | MsFlags::MS_RDONLY,
        none,
    )?;
    Ok(())
}

/// One node of linux.devices: made (replacing what was there, as runc
/// does), given its mode (mknod honours the umask) and owner.
fn make_device(path: &CStr, parent: &CStr, d: &DeviceNode) -> nix::Result<()> {
    mkdir_all(parent)?;
    match nix::unistd::unlink(path) {
        Ok(()) | Err(Errno::ENOENT) => {}
        Err(e) => return Err(e),
    }
    let mode = Mode::from_bits_truncate(d.mode);
    mknod(path, d.kind, mode, makedev(d.major, d.minor))?;
    nix::sys::stat::fchmodat(
        None,
        path,
        mode,
        nix::sys::stat::FchmodatFlags::NoFollowSymlink,
    )?;
    unistd::chown(path, Some(Uid::from_raw(d.uid)), Some(Gid::from_raw(d.gid)))
}

/// Hides `path` as runc's maskPath does: /dev/null bound over a file, an
/// empty read-only tmpfs over a directory; a missing path is left alone.
fn mask(path: &CStr) -> nix::Result<()> {
    let none = None::<&CStr>;
    match mount(Some(c"/dev/null"), path, none, MsFlags::MS_BIND, none) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        // A directory: a file cannot be bound over it.
        Err(Errno::ENOTDIR) => mount(
            Some(c"tmpfs"),
            path,
            Some(c"tmpfs"),
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some(c"size=0"),
        ),
        Err(e) => Err(e),
    }
}

/// Makes `path` read-only as runc's readonlyPath does: bound onto itself,
/// then remounted read-only with the flags it had; a missing path is left
/// alone.
fn read_only(path: &CStr) -> nix::Result<()> {
    use nix::sys::statvfs::{statvfs, FsFlags};
    let none = None::<&CStr>;
    match mount(
        Some(path),
        path,
        none,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        none,
    ) {
        Ok(()) => {}
        Err(Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(e),
    }
    let had = statvfs(path)?.flags();
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_REC;
    for (fs, ms) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
    ] {
        if had.contains(fs) {
            flags |= ms;
        }
    }
    mount(none, path, none, flags, none)
}

fn pivot(rootfs: &CStr) -> nix::Result<()> {
    unistd::chdir(rootfs)?;
    unistd::pivot_root(c".", c".")?;
    umount2(c".", MntFlags::MNT_DETACH)?;
    unistd::chdir(c"/")
}

/// Closes every fd from 3 up except `keep` (close_range, no allocation).
fn close_fds_except(keep: &[RawFd]) -> nix::Result<()> {
    let mut keep_sorted = [RawFd::MAX; 2];
    keep_sorted[..keep.len()].copy_from_slice(keep);
    keep_sorted.sort_unstable();
    let mut from: RawFd = 3;
    for k in keep_sorted {
        let to = if k == RawFd::MAX {
            u32::MAX
        } else {
            (k - 1) as u32
        };
        if k == RawFd::MAX || k > from {
            // SAFETY: close_range takes plain integers; closing fds this
            // single-threaded child owns cannot break memory safety.
            let rc = unsafe { libc::syscall(libc::SYS_close_range, from as u32, to, 0u32) };
            if rc < 0 {
                return Err(Errno::last());
            }
        }
        if k == RawFd::MAX {
            break;
        }
        from = k + 1;
    }
    Ok(())
}

/// `mkdir -p` on a fixed buffer (no allocation after fork).
pub fn mkdir_all(path: &CStr) -> nix::Result<()> {
    let bytes = path.to_bytes();
    let mut buf = [0u8; 4096];
    if bytes.len() >= buf.len() {
        return Err(Errno::ENAMETOOLONG);
    }
    for end in 1..=bytes.len() {
        if end == bytes.len() || bytes[end] == b'/' {
            buf[..end].copy_from_slice(&bytes[..end]);
            buf[end] = 0;
            let part = CStr::from_bytes_until_nul(&buf).map_err(|_| Errno::EINVAL)?;
            ignore_exists(unistd::mkdir(part, Mode::from_bits_truncate(0o755)))?;
        }
    }
    Ok(())
}

/// Maps an OCI rlimit name to the kernel resource.
pub fn rlimit_resource(name: &str) -> Option<Resource> {
    Some(match name {
        "RLIMIT_AS" => Resource::RLIMIT_AS,
        "RLIMIT_CORE" => Resource::RLIMIT_CORE,
        "RLIMIT_CPU" => Resource::RLIMIT_CPU,
        "RLIMIT_DATA" => Resource::RLIMIT_DATA,
        "RLIMIT_FSIZE" => Resource::RLIMIT_FSIZE,
        "RLIMIT_LOCKS" => Resource::RLIMIT_LOCKS,
        "RLIMIT_MEMLOCK" => Resource::RLIMIT_MEMLOCK,
        "RLIMIT_MSGQUEUE" => Resource::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => Resource::RLIMIT_NICE,
        "RLIMIT_NOFILE" => Resource::RLIMIT_NOFILE,
        "RLIMIT_NPROC" => Resource::RLIMIT_NPROC,
        "RLIMIT_RSS" => Resource::RLIMIT_RSS,
        "RLIMIT_RTPRIO" => Resource::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => Resource::RLIMIT_RTTIME,
        "RLIMIT_SIGPENDING" => Resource::RLIMIT_SIGPENDING,
        "RLIMIT_STACK" => Resource::RLIMIT_STACK,
        _ => return None,
    })
}
