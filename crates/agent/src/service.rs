//! The gRPC service the host calls: containers, processes and their stdio.

use std::collections::HashSet;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use agent_proto::agent_server::Agent;
use agent_proto::*;

use crate::files;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::cgroup;
use crate::container::{self, Container, Process, Table};
use crate::reaper::{Exit, Reaper};
use crate::spawn::{self, Namespaces, ProcessSpec, Spawned, Target};
use crate::stdio;

pub struct AgentService {
    table: Arc<Table>,
    reaper: Reaper,
    ready_ms: u64,
    /// 9p tags mounted under SHARES (a virtio-9p tag can be mounted only once).
    shares: Arc<Mutex<HashSet<String>>>,
}

const SHARES: &str = "/run/podvisor/shares";
/// Where block devices are mounted, by serial.
const DISKS: &str = "/run/podvisor/disks";

impl AgentService {
    pub fn new(reaper: Reaper, ready_ms: u64) -> Self {
        AgentService {
            table: Arc::default(),
            reaper,
            ready_ms,
            shares: Arc::default(),
        }
    }

    fn container(&self, id: &str) -> Result<Arc<Container>, Status> {
        self.table
            .get(id)
            .ok_or_else(|| Status::not_found(format!("container {id:?} does not exist")))
    }

    /// A handle on container `id`'s mount namespace, for a file call.
    fn mount_ns(&self, id: &str) -> Result<std::os::fd::OwnedFd, Status> {
        let c = self.container(id)?;
        let mnt = c.ns.mnt().ok_or_else(|| {
            Status::failed_precondition(format!("container {id:?} has no mount namespace"))
        })?;
        mnt.try_clone_to_owned()
            .map_err(|e| Status::internal(format!("container {id:?}: {e}")))
    }

    fn process(&self, id: &str, exec_id: &str) -> Result<Arc<Process>, Status> {
        self.container(id)?.process(exec_id).ok_or_else(|| {
            Status::not_found(format!(
                "process {exec_id:?} of container {id:?} does not exist"
            ))
        })
    }
}

fn internal(what: &str) -> impl Fn(std::io::Error) -> Status + '_ {
    move |e| Status::internal(format!("{what}: {e}"))
}

fn errno(what: &str) -> impl Fn(nix::errno::Errno) -> Status + '_ {
    move |e| Status::internal(format!("{what}: {e}"))
}

fn valid_id(id: &str) -> Result<(), Status> {
    if agent_proto::valid_id(id) {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!("invalid id {id:?}")))
    }
}

/// Builds the spawn description shared by containers and execs.
/// linux.devices, checked: absolute paths without `..`, a known type.
fn devices(ds: &[agent_proto::Device]) -> Result<Vec<spawn::DeviceNode>, Status> {
    let paths: Vec<String> = ds.iter().map(|d| d.path.clone()).collect();
    container_paths(&paths, "linux.devices")?;
    ds.iter()
        .map(|d| {
            use nix::sys::stat::SFlag;
            let kind = match d.r#type.as_str() {
                "c" | "u" => SFlag::S_IFCHR,
                "b" => SFlag::S_IFBLK,
                "p" => SFlag::S_IFIFO,
                other => {
                    return Err(Status::invalid_argument(format!(
                        "linux.devices {:?}: type {other:?} is not c, u, b or p",
                        d.path
                    )))
                }
            };
            if d.path == "/dev" || d.path == "/" {
                return Err(Status::invalid_argument(format!(
                    "linux.devices: {:?} is not a device path",
                    d.path
                )));
            }
            Ok(spawn::DeviceNode {
                path: d.path.clone(),
                kind,
                major: d.major.into(),
                minor: d.minor.into(),
                mode: d.file_mode.unwrap_or(0o666) & 0o7777,
                uid: d.uid,
                gid: d.gid,
            })
        })
        .collect()
}

/// Paths of the container as the host names them: absolute, no `..`, no
/// NUL (resolved in the container's own root after the pivot).
fn container_paths(paths: &[String], what: &str) -> Result<Vec<String>, Status> {
    for p in paths {
        let bad = !p.starts_with('/')
            || p.contains('\0')
            || p.split('/').any(|c| c == "..")
            || p.len() > 4096;
        if bad {
            return Err(Status::invalid_argument(format!(
                "{what}: {p:?} must be an absolute path without '..'"
            )));
        }
    }
    Ok(paths.to_vec())
}

fn process_spec(
    process: &agent_proto::Process,
    target: Target,
    cgroup_dir: &Path,
    child: &stdio::ChildEnds,
    hold: bool,
) -> Result<ProcessSpec, Status> {
    if process.args.is_empty() {
        return Err(Status::invalid_argument("process args must not be empty"));
    }
    let user = process.user.clone().unwrap_or_default();
    let rlimits = process
        .rlimits
        .iter()
        .map(|r| {
            spawn::rlimit_resource(&r.r#type)
                .map(|res| (res, r.soft, r.hard))
                .ok_or_else(|| Status::invalid_argument(format!("unknown rlimit {:?}", r.r#type)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let caps = process
        .capabilities
        .as_ref()
        .map(crate::caps::CapSets::from_proto)
        .transpose()
        .map_err(Status::invalid_argument)?;
    Ok(ProcessSpec {
        target,
        cgroup_procs: Some(cgroup_dir.join("cgroup.procs")),
        args: process.args.clone(),
        env: process.env.clone(),
        cwd: process.cwd.clone(),
        uid: user.uid,
        gid: user.gid,
        groups: user.additional_gids,
        rlimits,
        no_new_privs: process.no_new_privileges,
        umask: process.umask.map(|m| m & 0o777),
        oom_score_adj: process
            .oom_score_adj
            .map(|v| {
                (-1000..=1000).contains(&v).then_some(v).ok_or_else(|| {
                    Status::invalid_argument(format!("oomScoreAdj {v} is not in -1000..=1000"))
                })
            })
            .transpose()?,
        caps,
        seccomp: crate::spawn::Seccomp::parse(&process.seccomp, process.seccomp_flags)
            .map_err(Status::invalid_argument)?,
        stdio: child.raw(),
        tty: process.terminal,
        hold,
    })
}

fn open_stdio(
    process: &agent_proto::Process,
    devpts: &Path,
) -> Result<(stdio::HostEnds, stdio::ChildEnds), Status> {
    if process.terminal {
        let size = process.console_size.unwrap_or_default();
        stdio::pty(devpts, size.rows as u16, size.cols as u16).map_err(errno("opening a pty"))
    } else {
        stdio::pipes().map_err(errno("creating stdio pipes"))
    }
}

/// How long after its exec a container's first process may take to set a
/// handler for a signal that came before it had one.
const SIGNAL_HOLD: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether process `pid` has a handler for `signal` (or ignores it): its
/// `SigCgt` or `SigIgn` in /proc has the signal's bit.
fn handles(pid: i32, signal: i32) -> bool {
    let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
        return true;
    };
    let bit = 1u64 << (signal - 1);
    status.lines().any(|l| {
        let mask = l
            .strip_prefix("SigCgt:")
            .or_else(|| l.strip_prefix("SigIgn:"));
        mask.and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
            .is_some_and(|m| m & bit != 0)
    })
}

/// A container's first process is PID 1 of its pid namespace, which drops
/// a signal it has no handler for. Right after its exec it may not have set
/// one yet (a shell's `trap`), and a VM starts it later than runc would:
/// the signal is held until the handler exists, for at most SIGNAL_HOLD
/// after the exec, then sent all the same (and dropped, as on runc).
async fn deliver_when_handled(p: Arc<Process>, signal: i32) {
    let deadline = p
        .started
        .get()
        .copied()
        .unwrap_or_else(std::time::Instant::now)
        + SIGNAL_HOLD;
    while std::time::Instant::now() < deadline && p.exited().is_none() && !handles(p.pid, signal) {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    if p.exited().is_none() {
        let _ = spawn::pidfd_signal(&p.pidfd, signal);
    }
}

/// Runs blocking work (fork, pipe reads) off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("agent task failed: {e}")))
}

/// Undoes `mount_container`. Never removes recursively: a directory that is
/// still a mount point may be a share of host files.
fn unmount_container(dir: &Path) {
    for sub in ["pts", "rootfs", "layer"] {
        let path = dir.join(sub);
        while umount2(&path, MntFlags::MNT_DETACH).is_ok() {}
        let _ = fs::remove_dir(&path);
    }
    let _ = fs::remove_dir(dir);
}

/// Mounts the 9p share `tag` once, under SHARES, and returns where.
fn mount_share(shares: &Mutex<HashSet<String>>, tag: &str) -> Result<PathBuf, Status> {
    valid_id(tag)?;
    let path = Path::new(SHARES).join(tag);
    let mut mounted = shares.lock().unwrap_or_else(|e| e.into_inner());
    if mounted.contains(tag) {
        return Ok(path);
    }
    fs::create_dir_all(&path).map_err(internal("creating the share mount point"))?;
    let opts = "trans=virtio,version=9p2000.L,msize=262144,cache=mmap,access=client";
    mount(Some(tag), &path, Some("9p"), MsFlags::empty(), Some(opts)).map_err(|e| {
        Status::invalid_argument(format!("mounting root filesystem share {tag:?}: {e}"))
    })?;
    mounted.insert(tag.to_string());
    Ok(path)
}

/// The block device whose virtio-blk serial is `serial`, as /dev/NAME.
fn disk_by_serial(serial: &str) -> Result<PathBuf, Status> {
    let entries = fs::read_dir("/sys/block").map_err(internal("listing block devices"))?;
    for entry in entries.flatten() {
        let found = fs::read_to_string(entry.path().join("serial")).unwrap_or_default();
        if found.trim_end_matches(['\0', '\n']) == serial {
            return Ok(Path::new("/dev").join(entry.file_name()));
        }
    }
    Err(Status::invalid_argument(format!(
        "no disk with serial {serial:?} in this VM"
    )))
}

/// Mounts the ext4 disk `serial` once, under DISKS, and returns where.
/// Read-only is for an image shared by every sandbox: never written, not
/// even to replay a journal (it has none).
fn mount_disk(
    mounted: &Mutex<HashSet<String>>,
    serial: &str,
    readonly: bool,
) -> Result<PathBuf, Status> {
    valid_id(serial)?;
    let key = format!("disk:{serial}");
    let path = Path::new(DISKS).join(serial);
    let mut mounted = mounted.lock().unwrap_or_else(|e| e.into_inner());
    if mounted.contains(&key) {
        return Ok(path);
    }
    let device = disk_by_serial(serial)?;
    fs::create_dir_all(&path).map_err(internal("creating the disk mount point"))?;
    let flags = if readonly {
        MsFlags::MS_RDONLY
    } else {
        MsFlags::empty()
    };
    // A writable layer is a fresh filesystem made with lazy_itable_init:
    // without noinit_itable the guest kernel would spend its first seconds
    // zeroing inode tables (and grow the layer's file by them).
    let data = if readonly { "" } else { "noinit_itable" };
    mount(Some(&device), &path, Some("ext4"), flags, Some(data)).map_err(|e| {
        Status::invalid_argument(format!(
            "mounting disk {serial:?} ({}): {e}",
            device.display()
        ))
    })?;
    mounted.insert(key);
    Ok(path)
}

/// The container's root inside its share; refuses paths that leave it.
fn rootfs_source(share: &Path, subpath: &str) -> Result<PathBuf, Status> {
    let sub = Path::new(subpath);
    let normal = sub
        .components()
        .all(|c| matches!(c, std::path::Component::Normal(_)));
    if !normal {
        return Err(Status::invalid_argument(format!(
            "invalid rootfs subpath {subpath:?}"
        )));
    }
    let source = share.join(sub);
    if !source.is_dir() {
        return Err(Status::invalid_argument(format!(
            "rootfs {subpath:?} is not a directory in its share"
        )));
    }
    Ok(source)
}

/// Mounts the container's root at `dir`/rootfs: `source` itself, or with
/// `overlay` a writable layer over it, in `disk_layer` (a directory of the
/// container's own on a writable disk) or else on a tmpfs.
fn mount_container(
    dir: &Path,
    source: &Path,
    overlay: bool,
    disk_layer: Option<&Path>,
) -> Result<(), Status> {
    let rootfs = dir.join("rootfs");
    let pts = dir.join("pts");
    fs::create_dir_all(&rootfs).map_err(internal("creating the container directory"))?;
    fs::create_dir_all(&pts).map_err(internal("creating the container directory"))?;
    // Where the writable layer's upper and work directories go: on the
    // container's directory of a writable disk, or on a tmpfs in guest
    // memory (the host's copy of the root stays as it is).
    let layer = match disk_layer {
        Some(layer) if layer.exists() => {
            return Err(Status::already_exists(format!(
                "{} already has a writable layer",
                layer.display()
            )))
        }
        Some(layer) => Some(layer.to_path_buf()),
        None if overlay => {
            let layer = dir.join("layer");
            fs::create_dir_all(&layer).map_err(internal("creating the container directory"))?;
            mount(
                Some("layer"),
                &layer,
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                Some("mode=0755"),
            )
            .map_err(errno("mounting the root's writable layer"))?;
            Some(layer)
        }
        None => None,
    };
    if let Some(layer) = layer {
        for sub in ["upper", "work"] {
            fs::create_dir_all(layer.join(sub)).map_err(internal("creating the writable layer"))?;
        }
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            source.display(),
            layer.join("upper").display(),
            layer.join("work").display()
        );
        mount(
            Some("overlay"),
            &rootfs,
            Some("overlay"),
            MsFlags::empty(),
            Some(opts.as_str()),
        )
        .map_err(errno("mounting the container root's overlay"))?;
    } else {
        mount(
            Some(source),
            &rootfs,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(errno("bind-mounting the container root"))?;
    }
    mount(
        Some("devpts"),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )
    .map_err(errno("mounting devpts"))?;
    Ok(())
}

/// The table's record of a process just forked. A held one (a container
/// created, not started) keeps its `Spawned` until StartContainer releases it.
fn tracked(mut spawned: Spawned, io: stdio::HostEnds, held: bool) -> Result<Process, Status> {
    let pidfd = spawned
        .pidfd
        .take()
        .ok_or_else(|| Status::internal("no pidfd"))?;
    Ok(Process {
        pidfd,
        exit: spawned.exit.clone(),
        io,
        pid: spawned.pid.as_raw(),
        held: Mutex::new(held.then_some(spawned)),
        started: std::sync::OnceLock::new(),
    })
}

/// OCI sysctl keys ("net.ipv4.ip_forward") as /proc/sys paths.
fn sysctl_paths(
    sysctl: &std::collections::HashMap<String, String>,
) -> Result<Vec<(String, String)>, Status> {
    let mut out: Vec<_> = sysctl
        .iter()
        .map(|(k, v)| {
            let ok = !k.is_empty()
                && k.split(['.', '/']).all(|p| {
                    !p.is_empty()
                        && p != ".."
                        && p.chars()
                            .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
                });
            if !ok {
                return Err(Status::invalid_argument(format!("invalid sysctl {k:?}")));
            }
            Ok((format!("/proc/sys/{}", k.replace('.', "/")), v.clone()))
        })
        .collect::<Result<_, _>>()?;
    out.sort();
    Ok(out)
}

fn build_container(
    req: &CreateContainerRequest,
    process: &agent_proto::Process,
    dir: &Path,
    cg: &Path,
    reaper: &Reaper,
    shares: &Mutex<HashSet<String>>,
) -> Result<Container, Status> {
    let share = match (&req.block_root, req.rootfs_tag.as_str()) {
        // No share: a bind mount's source is nowhere to be found.
        (Some(_), "") => PathBuf::from("/nonexistent"),
        _ => mount_share(shares, &req.rootfs_tag)?,
    };
    let mounts = crate::mounts::plan(&req.mounts, &share).map_err(Status::invalid_argument)?;
    let sysctl = sysctl_paths(&req.sysctl)?;
    match &req.block_root {
        Some(b) => {
            let image = mount_disk(shares, &b.image_serial, true)?;
            let layer = mount_disk(shares, &b.layer_serial, false)?;
            mount_container(dir, &image, true, Some(&layer.join(&req.container_id)))?;
        }
        None => mount_container(
            dir,
            &rootfs_source(&share, &req.rootfs_subpath)?,
            req.rootfs_overlay,
            None,
        )?,
    }
    cgroup::create(cg, req.resources.as_ref())
        .map_err(internal("creating the container cgroup"))?;
    let (host, child) = open_stdio(process, &dir.join("pts"))?;
    let target = Target::New {
        rootfs: dir.join("rootfs"),
        devpts: dir.join("pts"),
        hostname: req.hostname.clone(),
        readonly: req.rootfs_readonly,
        pod_shared: req.pod_shared,
        mounts,
        sysctl,
        masked: container_paths(&req.masked_paths, "maskedPaths")?,
        readonly_paths: container_paths(&req.readonly_paths, "readonlyPaths")?,
        devices: devices(&req.devices)?,
        root_propagation: match req.rootfs_propagation.as_str() {
            "" => None,
            p => Some(crate::mounts::propagation(p).ok_or_else(|| {
                Status::invalid_argument(format!("rootfsPropagation {p:?} is not a propagation"))
            })?),
        },
    };
    let spec = process_spec(process, target, cg, &child, true)?;
    let spawned =
        spawn::spawn(spec, reaper).map_err(|e| Status::invalid_argument(e.to_string()))?;
    drop(child);
    let ns = Namespaces::of(spawned.pid).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Container {
        init: Arc::new(tracked(spawned, host, true)?),
        ns: Arc::new(ns),
        execs: Mutex::default(),
        cgroup: cg.to_path_buf(),
        dir: dir.to_path_buf(),
    })
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn version(
        &self,
        req: Request<VersionRequest>,
    ) -> Result<Response<VersionResponse>, Status> {
        let req = req.into_inner();
        crate::init::set_clock(req.host_time_unix_ns);
        let host = req.protocol;
        if host != agent_proto::PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "host speaks protocol {host}, agent speaks {}",
                agent_proto::PROTOCOL_VERSION
            )));
        }
        Ok(Response::new(VersionResponse {
            protocol: agent_proto::PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            kernel_release: nix::sys::utsname::uname()
                .map(|u| u.release().to_string_lossy().into_owned())
                .unwrap_or_default(),
            ready_ms: self.ready_ms,
        }))
    }

    async fn create_container(
        &self,
        req: Request<CreateContainerRequest>,
    ) -> Result<Response<Empty>, Status> {
        let req = req.into_inner();
        let id = req.container_id.clone();
        valid_id(&id)?;
        let process = req
            .process
            .clone()
            .ok_or_else(|| Status::invalid_argument("process is missing"))?;
        if !self.table.reserve(&id) {
            return Err(Status::already_exists(format!(
                "container {id:?} already exists"
            )));
        }
        let (reaper, shares, table) = (
            self.reaper.clone(),
            Arc::clone(&self.shares),
            Arc::clone(&self.table),
        );
        // All of it, cleanup and table update included, runs on the blocking
        // thread: a cancelled request cannot leave half a container behind.
        blocking(move || {
            let dir = container::dir(&id);
            let cg = cgroup::path(&id);
            match build_container(&req, &process, &dir, &cg, &reaper, &shares) {
                Ok(c) => {
                    table.commit(&id, c);
                    Ok(Response::new(Empty {}))
                }
                Err(status) => {
                    let _ = cgroup::remove(&cg);
                    unmount_container(&dir);
                    table.release(&id);
                    Err(status)
                }
            }
        })
        .await?
    }

    async fn start_container(
        &self,
        req: Request<ContainerRequest>,
    ) -> Result<Response<Empty>, Status> {
        let id = req.into_inner().container_id;
        let c = self.container(&id)?;
        let held = c.init.held.lock().unwrap_or_else(|e| e.into_inner()).take();
        let mut held = held.ok_or_else(|| {
            Status::failed_precondition(format!("container {id:?} was already started"))
        })?;
        blocking(move || held.release())
            .await?
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let _ = c.init.started.set(std::time::Instant::now());
        Ok(Response::new(Empty {}))
    }

    async fn remove_container(
        &self,
        req: Request<ContainerRequest>,
    ) -> Result<Response<Empty>, Status> {
        let id = req.into_inner().container_id;
        let c = self.container(&id)?;
        // Dropping a held process closes its start pipe: it exits unstarted.
        c.init.held.lock().unwrap_or_else(|e| e.into_inner()).take();
        let _ = cgroup::kill_all(&c.cgroup);
        let mut exit = c.init.exit.clone();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            exit.wait_for(|e| e.is_some()),
        )
        .await;
        let (cg, dir) = (c.cgroup.clone(), c.dir.clone());
        blocking(move || {
            let _ = cgroup::remove(&cg);
            unmount_container(&dir);
        })
        .await?;
        self.table
            .containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        Ok(Response::new(Empty {}))
    }

    async fn stats_container(
        &self,
        req: Request<ContainerRequest>,
    ) -> Result<Response<ContainerStats>, Status> {
        let c = self.container(&req.into_inner().container_id)?;
        Ok(Response::new(cgroup::stats(&c.cgroup)))
    }

    async fn update_container(
        &self,
        req: Request<UpdateContainerRequest>,
    ) -> Result<Response<Empty>, Status> {
        let req = req.into_inner();
        let c = self.container(&req.container_id)?;
        let res = req.resources.unwrap_or_default();
        cgroup::apply(&c.cgroup, &res)
            .map_err(|e| Status::invalid_argument(format!("updating cgroup: {e}")))?;
        Ok(Response::new(Empty {}))
    }

    async fn pause_container(
        &self,
        req: Request<ContainerRequest>,
    ) -> Result<Response<Empty>, Status> {
        let c = self.container(&req.into_inner().container_id)?;
        let cg = c.cgroup.clone();
        blocking(move || cgroup::freeze(&cg, true))
            .await?
            .map_err(internal("freezing the container"))?;
        Ok(Response::new(Empty {}))
    }

    async fn resume_container(
        &self,
        req: Request<ContainerRequest>,
    ) -> Result<Response<Empty>, Status> {
        let c = self.container(&req.into_inner().container_id)?;
        let cg = c.cgroup.clone();
        blocking(move || cgroup::freeze(&cg, false))
            .await?
            .map_err(internal("thawing the container"))?;
        Ok(Response::new(Empty {}))
    }

    async fn configure_network(
        &self,
        req: Request<NetworkRequest>,
    ) -> Result<Response<Empty>, Status> {
        let req = req.into_inner();
        blocking(move || crate::network::configure(&req))
            .await?
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(Empty {}))
    }

    async fn exec_process(
        &self,
        req: Request<ExecProcessRequest>,
    ) -> Result<Response<ExecProcessResponse>, Status> {
        let req = req.into_inner();
        valid_id(&req.exec_id)?;
        let c = self.container(&req.container_id)?;
        if c.process(&req.exec_id).is_some() {
            return Err(Status::already_exists(format!(
                "exec {:?} already exists",
                req.exec_id
            )));
        }
        if c.init
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
            || c.init.exited().is_some()
        {
            return Err(Status::failed_precondition(format!(
                "container {:?} is not running",
                req.container_id
            )));
        }
        let process = req
            .process
            .ok_or_else(|| Status::invalid_argument("process is missing"))?;
        let (reaper, c2) = (self.reaper.clone(), Arc::clone(&c));
        let proc_ = blocking(move || -> Result<Process, Status> {
            let (host, child) = open_stdio(&process, &c2.devpts())?;
            let target = Target::Join {
                ns: Arc::clone(&c2.ns),
            };
            let spec = process_spec(&process, target, &c2.cgroup, &child, false)?;
            let spawned =
                spawn::spawn(spec, &reaper).map_err(|e| Status::invalid_argument(e.to_string()))?;
            tracked(spawned, host, false)
        })
        .await??;
        let pid = proc_.pid as u32;
        c.execs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(req.exec_id, Arc::new(proc_));
        Ok(Response::new(ExecProcessResponse { pid }))
    }

    async fn remove_process(
        &self,
        req: Request<ProcessRequest>,
    ) -> Result<Response<Empty>, Status> {
        let req = req.into_inner();
        if req.exec_id.is_empty() {
            return Err(Status::invalid_argument(
                "a container's first process goes with RemoveContainer",
            ));
        }
        let c = self.container(&req.container_id)?;
        let p = self.process(&req.container_id, &req.exec_id)?;
        if p.exited().is_none() {
            return Err(Status::failed_precondition(format!(
                "exec {} is still running",
                req.exec_id
            )));
        }
        c.execs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&req.exec_id);
        Ok(Response::new(Empty {}))
    }

    async fn signal_process(
        &self,
        req: Request<SignalProcessRequest>,
    ) -> Result<Response<Empty>, Status> {
        let req = req.into_inner();
        // Signal 0 sends nothing: it asks whether the process exists (kill(2)).
        let sig = match req.signal {
            0 => None,
            n => Some(
                Signal::try_from(n as i32)
                    .map_err(|_| Status::invalid_argument(format!("invalid signal {n}")))?,
            ),
        };
        let c = self.container(&req.container_id)?;
        if req.all && sig == Some(Signal::SIGKILL) {
            cgroup::kill_all(&c.cgroup).map_err(internal("killing the container's processes"))?;
            return Ok(Response::new(Empty {}));
        }
        if req.all {
            let pids = cgroup::pids(&c.cgroup);
            if sig.is_none() && pids.is_empty() {
                return Err(Status::failed_precondition("container not running"));
            }
            for pid in pids {
                let _ = kill(Pid::from_raw(pid as i32), sig);
            }
            return Ok(Response::new(Empty {}));
        }
        let p = self.process(&req.container_id, &req.exec_id)?;
        if p.exited().is_some() {
            return Err(Status::failed_precondition("process already exited"));
        }
        let number = sig.map_or(0, |s| s as i32);
        let hold = req.exec_id.is_empty()
            && sig.is_some_and(|s| s != Signal::SIGKILL && s != Signal::SIGSTOP)
            && p.started.get().is_some_and(|t| t.elapsed() < SIGNAL_HOLD)
            && !handles(p.pid, number);
        if hold {
            tokio::spawn(deliver_when_handled(p, number));
        } else {
            spawn::pidfd_signal(&p.pidfd, number).map_err(errno("kill"))?;
        }
        Ok(Response::new(Empty {}))
    }

    async fn wait_process(
        &self,
        req: Request<ProcessRequest>,
    ) -> Result<Response<WaitProcessResponse>, Status> {
        let req = req.into_inner();
        let p = self.process(&req.container_id, &req.exec_id)?;
        let mut exit = p.exit.clone();
        let status = exit
            .wait_for(|e| e.is_some())
            .await
            .map_err(|_| Status::internal("exit status lost"))?
            .unwrap_or(Exit::Code(255));
        let signal = match status {
            Exit::Signal(s) => s as u32,
            Exit::Code(_) => 0,
        };
        Ok(Response::new(WaitProcessResponse {
            exit_code: status.status(),
            signal,
        }))
    }

    async fn list_processes(
        &self,
        req: Request<ContainerRequest>,
    ) -> Result<Response<ListProcessesResponse>, Status> {
        let c = self.container(&req.into_inner().container_id)?;
        Ok(Response::new(ListProcessesResponse {
            pids: cgroup::pids(&c.cgroup),
        }))
    }

    async fn write_stdin(
        &self,
        req: Request<Streaming<StdinChunk>>,
    ) -> Result<Response<Empty>, Status> {
        let mut stream = req.into_inner();
        let mut target: Option<Arc<Process>> = None;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            let p = match &target {
                Some(p) => Arc::clone(p),
                None => {
                    let p = self.process(&chunk.container_id, &chunk.exec_id)?;
                    target = Some(Arc::clone(&p));
                    p
                }
            };
            let file = p.io.stdin.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let Some(file) = file else {
                return Err(Status::failed_precondition("stdin is closed"));
            };
            if !chunk.data.is_empty() {
                let data = chunk.data;
                blocking(move || (&*file).write_all(&data))
                    .await?
                    .map_err(|e| Status::aborted(format!("writing stdin: {e}")))?;
            }
            if chunk.close {
                if p.io.pty.is_some() {
                    // A pty's main side is also the output: send end-of-file
                    // (VEOF) to the line discipline instead of closing it.
                    let f = p.io.stdin.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    if let Some(f) = f {
                        let _ = blocking(move || (&*f).write_all(&[4])).await;
                    }
                } else {
                    p.io.stdin.lock().unwrap_or_else(|e| e.into_inner()).take();
                }
            }
        }
        Ok(Response::new(Empty {}))
    }

    type ReadOutputStream = ReceiverStream<Result<OutputChunk, Status>>;

    async fn read_output(
        &self,
        req: Request<ReadOutputRequest>,
    ) -> Result<Response<Self::ReadOutputStream>, Status> {
        let req = req.into_inner();
        let p = self.process(&req.container_id, &req.exec_id)?;
        let stderr = req.stream == OutputStream::Stderr as i32;
        let (tx, rx) = mpsc::channel(8);
        let file = if stderr && p.io.pty.is_some() {
            None // a tty merges stderr into stdout: an empty stream
        } else {
            Some(
                p.take_output(stderr)
                    .ok_or_else(|| Status::failed_precondition("output is already attached"))?,
            )
        };
        if let Some(mut file) = file {
            std::thread::spawn(move || {
                use std::os::fd::AsRawFd;
                let mut buf = vec![0u8; 32 * 1024];
                loop {
                    // A reader that went away (its host session ended, as
                    // when a sandbox is paused) gives the output back for
                    // the next one: the process writes on, never to a
                    // closed pipe.
                    let mut pfd = libc::pollfd {
                        fd: file.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: poll(2) on one pollfd that lives on the stack.
                    let ready = unsafe { libc::poll(&mut pfd, 1, 1000) };
                    if tx.is_closed() {
                        p.put_output(stderr, file);
                        return;
                    }
                    if ready == 0
                        || (ready < 0
                            && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR))
                    {
                        continue;
                    }
                    match file.read(&mut buf) {
                        // EIO: the pty's last replica closed.
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            let chunk = OutputChunk {
                                data: buf[..n].to_vec(),
                            };
                            if tx.blocking_send(Ok(chunk)).is_err() {
                                p.put_output(stderr, file);
                                return;
                            }
                        }
                    }
                }
            });
        }
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn resize_tty(&self, req: Request<ResizeTtyRequest>) -> Result<Response<Empty>, Status> {
        let req = req.into_inner();
        let p = self.process(&req.container_id, &req.exec_id)?;
        let pty =
            p.io.pty
                .as_ref()
                .ok_or_else(|| Status::failed_precondition("process has no terminal"))?;
        stdio::resize(pty, req.rows as u16, req.cols as u16)
            .map_err(errno("resizing the terminal"))?;
        Ok(Response::new(Empty {}))
    }

    async fn set_identity(&self, req: Request<IdentityRequest>) -> Result<Response<Empty>, Status> {
        let req = req.into_inner();
        if req.entropy.len() < 32 {
            return Err(Status::invalid_argument(
                "entropy must be at least 32 bytes",
            ));
        }
        crate::init::reseed_rng(&req.entropy).map_err(internal("re-seeding the RNG"))?;
        if !req.hostname.is_empty() {
            nix::unistd::sethostname(&req.hostname).map_err(errno("setting the hostname"))?;
        }
        Ok(Response::new(Empty {}))
    }

    async fn shutdown(&self, _req: Request<Empty>) -> Result<Response<Empty>, Status> {
        let table = Arc::clone(&self.table);
        tokio::spawn(async move {
            // Let the reply reach the host first.
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            let containers: Vec<_> = table
                .containers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .cloned()
                .collect();
            for c in containers {
                let _ = cgroup::kill_all(&c.cgroup);
            }
            nix::unistd::sync();
            let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
        });
        Ok(Response::new(Empty {}))
    }

    async fn stat_path(&self, req: Request<PathRequest>) -> Result<Response<FileInfo>, Status> {
        let r = req.into_inner();
        files::valid_path(&r.path)?;
        let mnt = self.mount_ns(&r.container_id)?;
        let info = files::join(files::run_in(mnt, r.user, move || files::stat(r.path))).await?;
        Ok(Response::new(info))
    }

    async fn list_dir(
        &self,
        req: Request<ListDirRequest>,
    ) -> Result<Response<FileInfoList>, Status> {
        let r = req.into_inner();
        files::valid_path(&r.path)?;
        let mnt = self.mount_ns(&r.container_id)?;
        let depth = r.depth;
        let entries = files::join(files::run_in(mnt, r.user, move || {
            files::list(r.path, depth)
        }))
        .await?;
        Ok(Response::new(FileInfoList { entries }))
    }

    async fn make_dir(&self, req: Request<PathRequest>) -> Result<Response<FileInfo>, Status> {
        let r = req.into_inner();
        files::valid_path(&r.path)?;
        let mnt = self.mount_ns(&r.container_id)?;
        let info = files::join(files::run_in(mnt, r.user, move || files::make_dir(r.path))).await?;
        Ok(Response::new(info))
    }

    async fn move_path(&self, req: Request<MoveRequest>) -> Result<Response<FileInfo>, Status> {
        let r = req.into_inner();
        files::valid_path(&r.source)?;
        files::valid_path(&r.destination)?;
        let mnt = self.mount_ns(&r.container_id)?;
        let (from, to) = (r.source, r.destination);
        let info = files::join(files::run_in(mnt, r.user, move || files::rename(from, to))).await?;
        Ok(Response::new(info))
    }

    async fn remove_path(&self, req: Request<PathRequest>) -> Result<Response<Empty>, Status> {
        let r = req.into_inner();
        files::valid_path(&r.path)?;
        let mnt = self.mount_ns(&r.container_id)?;
        files::join(files::run_in(mnt, r.user, move || files::remove(r.path))).await?;
        Ok(Response::new(Empty {}))
    }

    type ReadFileStream = ReceiverStream<Result<FileChunk, Status>>;

    async fn read_file(
        &self,
        req: Request<PathRequest>,
    ) -> Result<Response<Self::ReadFileStream>, Status> {
        let r = req.into_inner();
        files::valid_path(&r.path)?;
        let mnt = self.mount_ns(&r.container_id)?;
        let (tx, rx) = mpsc::channel(4);
        let errors = tx.clone();
        let h = files::run_in(mnt, r.user, move || files::read(r.path, tx));
        tokio::spawn(async move {
            if let Err(e) = files::join(h).await {
                let _ = errors.send(Err(e)).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn write_file(
        &self,
        req: Request<Streaming<FileChunk>>,
    ) -> Result<Response<FileInfo>, Status> {
        let mut stream = req.into_inner();
        let first = stream
            .next()
            .await
            .ok_or_else(|| Status::invalid_argument("no chunk names the file"))??;
        files::valid_path(&first.path)?;
        let mnt = self.mount_ns(&first.container_id)?;
        let (tx, rx) = mpsc::channel::<Result<Vec<u8>, ()>>(4);
        let h = files::run_in(mnt, first.user, move || files::write(first.path, rx));
        if !first.data.is_empty() {
            let _ = tx.send(Ok(first.data)).await;
        }
        while let Some(chunk) = stream.next().await {
            let sent = match chunk {
                Ok(c) => tx.send(Ok(c.data)).await,
                // The host's stream broke off: the file must not stay.
                Err(_) => tx.send(Err(())).await,
            };
            if sent.is_err() {
                break; // the writer failed: its error tells why
            }
        }
        drop(tx);
        Ok(Response::new(files::join(h).await?))
    }

    type WatchDirStream = ReceiverStream<Result<WatchEvent, Status>>;

    async fn watch_dir(
        &self,
        req: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchDirStream>, Status> {
        let r = req.into_inner();
        files::valid_path(&r.path)?;
        let mnt = self.mount_ns(&r.container_id)?;
        let (tx, rx) = mpsc::channel(64);
        let errors = tx.clone();
        let recursive = r.recursive;
        let h = files::run_in(mnt, r.user, move || files::watch(r.path, recursive, tx));
        tokio::spawn(async move {
            if let Err(e) = files::join(h).await {
                let _ = errors.send(Err(e)).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type ConnectPortStream = ReceiverStream<Result<PortChunk, Status>>;

    async fn connect_port(
        &self,
        req: Request<Streaming<PortChunk>>,
    ) -> Result<Response<Self::ConnectPortStream>, Status> {
        let mut inbound = req.into_inner();
        let first = inbound
            .next()
            .await
            .ok_or_else(|| Status::invalid_argument("no chunk names the port"))??;
        let sock = crate::ports::connect(first.port).await?;
        let (tx, rx) = mpsc::channel(8);
        crate::ports::relay(sock, inbound, first.data, tx);
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
