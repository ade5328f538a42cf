//! Pools (runV's cache factory): a daemon keeps N clones of a template booted,
//! paused and ready, and refills them in the background. A sandbox taken from
//! a pool is ready in milliseconds: the daemon binds the caller's root into
//! the clone's share, resumes it and answers with its agent socket. The
//! caller holds the connection for the sandbox's life; when it closes (the
//! caller is done, or was killed) the daemon tears the VM down.

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hypervisor::Share;
use nix::mount::{umount2, MntFlags};
use serde::{Deserialize, Serialize};
use tokio::net::{UnixListener, UnixStream};

use crate::agent::{self, AgentClient, AgentError};
use crate::fdmsg;
use crate::template::{Template, ROOTFS_TAG};
use crate::{Sandbox, SandboxConfig, SandboxError, Timings};

/// Where `sandbox run` attaches its root in a pooled clone's share (the
/// share's top is opened by the VMM at start and cannot be mounted over).
pub const ROOTFS_SUBPATH: &str = "rootfs";
pub const DEFAULT_CONFIG: &str = "/etc/podvisor/config.toml";

/// One pool of the factory policy: `[[pool]] template = "T" size = N`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub template: String,
    pub size: usize,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    pool: Vec<PoolConfig>,
    /// The template the OCI CLI and the containerd shim clone their VMs
    /// from, when its shape fits (`template = "T"`).
    #[serde(default)]
    template: Option<String>,
    /// Kernels a pod may name with `io.podvisor.kernel` (Kata's
    /// `valid_kernel_paths`); none by default.
    #[serde(default)]
    valid_kernel_paths: Vec<PathBuf>,
    /// The most memory (MiB) and vCPUs an annotation may ask for.
    #[serde(default)]
    max_memory_mib: Option<u64>,
    #[serde(default)]
    max_vcpus: Option<u32>,
}

/// What the policy file allows annotations to ask for.
#[derive(Clone, Debug, Default)]
pub struct AnnotationPolicy {
    pub valid_kernel_paths: Vec<PathBuf>,
    pub max_memory_mib: Option<u64>,
    pub max_vcpus: Option<u32>,
}

/// The annotation policy of the file at `path` (none there: the defaults,
/// which allow no kernel). A broken file is an error.
pub fn annotation_policy(path: &Path) -> Result<AnnotationPolicy, SandboxError> {
    if !path.exists() {
        return Ok(AnnotationPolicy::default());
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| SandboxError::Invalid(format!("reading {}: {e}", path.display())))?;
    parse_annotation_policy(path, &text)
}

/// The annotation policy in `text`, the policy file at `path`.
pub fn parse_annotation_policy(path: &Path, text: &str) -> Result<AnnotationPolicy, SandboxError> {
    let file = parse_config_file(path, text)?;
    Ok(AnnotationPolicy {
        valid_kernel_paths: file.valid_kernel_paths,
        max_memory_mib: file.max_memory_mib,
        max_vcpus: file.max_vcpus,
    })
}

/// The policy file at `path`, whose bytes are `text`.
fn parse_config_file(path: &Path, text: &str) -> Result<ConfigFile, SandboxError> {
    toml::from_str(text)
        .map_err(|e| SandboxError::Invalid(format!("{}: {}", path.display(), e.message())))
}

/// The factory policy's file: `PODVISOR_CONFIG`, else the default.
pub fn config_path() -> PathBuf {
    std::env::var_os("PODVISOR_CONFIG")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG))
}

/// The template front ends clone from, if the policy names one. No policy
/// file: none. A broken one is an error.
pub fn front_end_template(path: &Path) -> Result<Option<String>, SandboxError> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| SandboxError::Invalid(format!("reading {}: {e}", path.display())))?;
    Ok(parse_config_file(path, &text)?.template)
}

/// The front ends' template, opened, if the policy names one whose shape
/// fits a VM of `memory_mib`, `vcpus` and `nics`; else why not (logged by
/// the caller; the VM then boots cold).
pub fn template_for(
    root: &Path,
    memory_mib: u64,
    vcpus: u32,
    nics: usize,
) -> Result<Option<crate::template::Template>, SandboxError> {
    let Some(name) = front_end_template(&config_path())? else {
        return Ok(None);
    };
    let t = crate::template::Template::open(root, &name)?;
    if t.meta.memory_mib < memory_mib || t.meta.vcpus < vcpus || t.meta.nics != nics {
        return Err(SandboxError::Invalid(format!(
            "template {name} ({} MiB, {} vCPUs, {} NICs) does not fit a VM of {memory_mib} MiB, {vcpus} vCPUs, {nics} NICs",
            t.meta.memory_mib, t.meta.vcpus, t.meta.nics
        )));
    }
    Ok(Some(t))
}

/// The factory, as the OCI CLI and the shim use it: a ready clone from the
/// pool of the policy's template when a pool serves it, else a clone of the
/// template when it fits `config`'s shape, else a cold boot. Logs which
/// (and why not a clone). A pooled VM's share starts empty: the caller
/// fills it with `Sandbox::attach` instead of `config.shares`.
pub async fn provide(mut config: SandboxConfig) -> Result<Sandbox, SandboxError> {
    let (mem, vcpus, nics) = (config.memory_mib, config.vcpus, config.nics.len());
    let template = match template_for(&config.root, mem, vcpus, nics) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(sandbox = %config.id, "booting cold: {e}");
            None
        }
    };
    if let Some(t) = &template {
        let taps: Option<Vec<RawFd>> = config.nics.iter().map(|n| n.fd).collect();
        let name = &t.meta.name;
        let taken = match taps {
            Some(taps) => take(&config.root, name, &config.hostname, &taps).await,
            None => Err(SandboxError::Invalid("a NIC has no open tap device".into())),
        };
        match taken {
            Ok(Some(mut sb)) => {
                if let Err(e) = sb.adopt(&config.root, &config.id) {
                    sb.destroy().await;
                    return Err(e);
                }
                let ms = sb.timings.agent_ready.as_millis() as u64;
                tracing::info!(sandbox = %config.id, template = %name, ready_ms = ms, "took a ready VM from the pool");
                return Ok(sb);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(sandbox = %config.id, template = %name, "pool: {e}; cloning instead")
            }
        }
    }
    config.template = template;
    let sb = Sandbox::start(config).await?;
    let ms = sb.timings.agent_ready.as_millis() as u64;
    match (&sb.cloned_from, &sb.fallback) {
        (Some(t), _) => {
            tracing::info!(sandbox = %sb.id, template = %t, ready_ms = ms, "cloned the VM")
        }
        (None, Some(why)) => tracing::warn!(sandbox = %sb.id, "{why}"),
        _ => tracing::info!(sandbox = %sb.id, ready_ms = ms, "booted the VM cold"),
    }
    Ok(sb)
}

/// Reads the factory policy.
pub fn load_config(path: &Path) -> Result<Vec<PoolConfig>, SandboxError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| SandboxError::Invalid(format!("reading {}: {e}", path.display())))?;
    parse_config(path, &text)
}

/// The factory policy in `text`, the policy file at `path`: its pools, checked.
pub fn parse_config(path: &Path, text: &str) -> Result<Vec<PoolConfig>, SandboxError> {
    let file = parse_config_file(path, text)?;
    for p in &file.pool {
        if p.size == 0 || p.size > 64 {
            return Err(SandboxError::Invalid(format!(
                "{}: pool {}: size {} is out of range (1 to 64)",
                path.display(),
                p.template,
                p.size
            )));
        }
    }
    Ok(file.pool)
}

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
        if let Ok(members) = std::fs::read_dir(dir.join(&template)) {
            for m in members.flatten() {
                crate::share::remove_unmounted(&m.path());
            }
        }
        let _ = std::fs::remove_dir(dir.join(&template));
        if held.is_some() {
            let _ = std::fs::remove_file(&lock_path);
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
    /// template, made in the caller's network namespace.
    Take { nics: usize },
    /// Mount the tree the message carries (an `open_tree` clone of one of
    /// the caller's directories) at `name` in the clone's share.
    Attach { name: String },
    /// Unmount `name` from the clone's share.
    Detach { name: String },
}

/// The daemon's answer to each request, a JSON line.
#[derive(Serialize, Deserialize, Default)]
pub struct Reply {
    #[serde(default)]
    error: String,
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

/// A ready clone: paused, its agent session closed, an empty share, its
/// NICs on hubs with no tap yet.
struct Member {
    sb: Sandbox,
    share: PathBuf,
    agent_socket: PathBuf,
}

async fn launch_member(root: &Path, template: &Template, n: u64) -> Result<Member, SandboxError> {
    let id = format!("pool-{}-{}-{n}", template.meta.name, std::process::id());
    let share = pools_dir(root).join(&template.meta.name).join(&id);
    let parent = share.parent().expect("a member's share has a parent");
    std::fs::create_dir_all(parent)
        .map_err(|e| SandboxError::Invalid(format!("creating {}: {e}", parent.display())))?;
    crate::share::create_top(&share).map_err(|e| SandboxError::Invalid(format!("{e}")))?;
    let (memory_mib, vcpus, assets, accel) = template.shape();
    // The caller's taps join the hubs when it takes the clone.
    let nics = (0..template.meta.nics)
        .map(|i| hypervisor::Nic {
            tap: String::new(),
            mac: format!("02:00:00:00:00:{i:02x}"),
            fd: None,
        })
        .collect();
    let config = SandboxConfig {
        cpu_millis: None,
        cgroup: None,
        id,
        root: root.to_path_buf(),
        memory_mib,
        vcpus,
        assets,
        accel,
        shares: vec![Share {
            tag: ROOTFS_TAG.into(),
            path: share.clone(),
            readonly: false,
        }],
        nics,
        hostname: "podvisor".into(),
        boot_timeout: Duration::from_secs(60),
        template: Some(template.clone()),
    };
    let mut sb = match Sandbox::start(config).await {
        Ok(sb) if sb.cloned_from.is_some() => sb,
        // A pool holds clones only: a cold VM has no hubs to join taps to.
        Ok(sb) => {
            let why = sb.fallback.clone().unwrap_or_default();
            sb.destroy().await;
            let _ = std::fs::remove_dir_all(&share);
            return Err(SandboxError::Invalid(why));
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&share);
            return Err(e);
        }
    };
    warm_up(&sb, &share).await;
    let agent_socket = sb.agent_socket().unwrap_or_default();
    // Hang up: whoever takes the clone opens a session of its own.
    let paused = match sb.hang_up_agent() {
        Ok(()) => {
            // Let the guest see the hang-up before its vCPUs stop.
            tokio::time::sleep(Duration::from_millis(50)).await;
            sb.pause().await
        }
        Err(e) => Err(e),
    };
    if let Err(e) = paused {
        sb.destroy().await;
        let _ = std::fs::remove_dir_all(&share);
        return Err(e);
    }
    Ok(Member {
        sb,
        share,
        agent_socket,
    })
}

/// The warm-up container's id and directory in a fresh clone's share.
const WARM_UP: &str = ".podvisor-warm-up";
/// Its program, alone in its root.
const WARM_UP_EXE: &str = "exit0";

/// The smallest static x86-64 program: one ELF header, one loadable
/// segment, and `exit(0)` (xor edi,edi; mov eax,60; syscall).
fn exit0_elf() -> Vec<u8> {
    const BASE: u64 = 0x40_0000;
    const HEADERS: u64 = 64 + 56;
    let code = [0x31, 0xff, 0xb8, 0x3c, 0, 0, 0, 0x0f, 0x05];
    let size = HEADERS + code.len() as u64;
    let mut elf = b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0".to_vec();
    elf.extend(2u16.to_le_bytes()); // ET_EXEC
    elf.extend(0x3eu16.to_le_bytes()); // EM_X86_64
    elf.extend(1u32.to_le_bytes()); // EV_CURRENT
    elf.extend((BASE + HEADERS).to_le_bytes()); // entry: the code
    elf.extend(64u64.to_le_bytes()); // program headers right after this one
    elf.extend(0u64.to_le_bytes()); // no section headers
    elf.extend(0u32.to_le_bytes()); // flags
    for half in [64u16, 56, 1, 0, 0, 0] {
        // header size, program header size and count, no sections
        elf.extend(half.to_le_bytes());
    }
    elf.extend(1u32.to_le_bytes()); // PT_LOAD
    elf.extend(5u32.to_le_bytes()); // PF_R | PF_X
    for word in [0, BASE, BASE, size, size, 0x1000] {
        // offset, vaddr, paddr, file size, memory size, alignment
        elf.extend(word.to_le_bytes());
    }
    elf.extend(code);
    elf
}

/// Runs a new clone through a container's whole life once (create, start,
/// exec, exit, wait, remove) with a tiny program, so that the caller's
/// first container finds the share mounted and, under TCG, the guest code
/// it runs already translated: QEMU keeps translations per process, and a
/// pooled clone's QEMU is the one that warmed up. Best effort.
async fn warm_up(sb: &Sandbox, share: &Path) {
    let dir = share.join(WARM_UP);
    let written = std::fs::create_dir(&dir).and_then(|()| {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o755)
            .open(dir.join(WARM_UP_EXE))?;
        std::io::Write::write_all(&mut f, &exit0_elf())
    });
    if written.is_ok() {
        let t0 = Instant::now();
        let ran = tokio::time::timeout(Duration::from_secs(10), run_warm_up(sb)).await;
        tracing::debug!(sandbox = %sb.id, elapsed = ?t0.elapsed(), ?ran, "warmed up");
        let id = WARM_UP.trim_start_matches('.').to_string();
        let mut agent = sb.agent.clone();
        let remove = agent.remove_container(agent_proto::ContainerRequest { container_id: id });
        let _ = tokio::time::timeout(Duration::from_secs(10), remove).await;
    }
    // The guest made mount points in it: plain directories on this side.
    crate::share::remove_unmounted(&dir);
}

async fn run_warm_up(sb: &Sandbox) -> Result<i32, tonic::Status> {
    let id = WARM_UP.trim_start_matches('.').to_string();
    let mut agent = sb.agent.clone();
    let request = agent_proto::CreateContainerRequest {
        container_id: id.clone(),
        rootfs_tag: ROOTFS_TAG.into(),
        rootfs_subpath: WARM_UP.into(),
        process: Some(agent_proto::Process {
            args: vec![format!("/{WARM_UP_EXE}")],
            cwd: "/".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    agent.create_container(request).await?;
    let container = agent_proto::ContainerRequest {
        container_id: id.clone(),
    };
    agent.start_container(container).await?;
    let process = agent_proto::ProcessRequest {
        container_id: id,
        exec_id: String::new(),
    };
    Ok(agent.wait_process(process).await?.into_inner().exit_code)
}

/// Unmounts everything a caller attached and removes the share (with what
/// the guest wrote at its top), unless something stayed mounted.
fn clear_share(share: &Path) {
    if let Ok(entries) = std::fs::read_dir(share) {
        for e in entries.flatten() {
            // Not following a symlink the guest may have put in its place.
            let flags = MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW;
            while umount2(&e.path(), flags).is_ok() {}
        }
    }
    crate::share::remove_unmounted(share);
}

async fn retire(member: Member) {
    member.sb.destroy().await;
    clear_share(&member.share);
}

/// A name a caller may attach a tree at: one plain path component.
pub fn attach_point(share: &Path, name: &str) -> Result<PathBuf, String> {
    let plain = !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\0');
    if plain {
        Ok(share.join(name))
    } else {
        Err(format!("{name:?} is not a plain name"))
    }
}

/// Mounts the detached tree `tree` (from `open_tree`) at `share/name`.
fn attach(share: &Path, name: &str, tree: Option<&OwnedFd>) -> Result<(), String> {
    let at = attach_point(share, name)?;
    let tree = tree.ok_or("no mount tree came with the request")?;
    std::fs::create_dir(&at).map_err(|e| format!("creating {}: {e}", at.display()))?;
    let moved = move_mount(tree, &at);
    if let Err(e) = moved {
        let _ = std::fs::remove_dir(&at);
        return Err(format!("mounting the tree at {name}: {e}"));
    }
    Ok(())
}

fn detach(share: &Path, name: &str) -> Result<(), String> {
    let at = attach_point(share, name)?;
    while umount2(&at, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW).is_ok() {}
    std::fs::remove_dir(&at).map_err(|e| format!("removing {name}: {e}"))
}

/// Resumes `member` for the caller on `conn`, its taps joined to the NICs.
async fn wake(member: &mut Member, nics: usize, taps: &[OwnedFd]) -> Result<Reply, SandboxError> {
    let want = member.sb.nics();
    if nics != want || taps.len() != want {
        return Err(SandboxError::Invalid(format!(
            "the template has {want} NICs; the request named {nics} and carried {} tap devices",
            taps.len()
        )));
    }
    for (i, tap) in taps.iter().enumerate() {
        member.sb.connect_tap(i, tap.as_fd()).await?;
    }
    member.sb.resume().await?;
    Ok(Reply {
        sandbox_id: member.sb.id.clone(),
        agent_socket: member.agent_socket.clone(),
        vmm_pid: member.sb.vmm_pid(),
        kernel_release: member.sb.kernel_release.clone(),
        ..Default::default()
    })
}

/// Hands `member` to the caller on `conn`, serves its attach and detach
/// requests, and tears the clone down when `conn` closes.
async fn hand_out(
    mut member: Member,
    nics: usize,
    taps: Vec<OwnedFd>,
    mut reader: fdmsg::Reader,
    conn: UnixStream,
) {
    let reply = wake(&mut member, nics, &taps)
        .await
        .unwrap_or_else(Reply::error);
    drop(taps);
    let ok = reply.error.is_empty();
    if fdmsg::send_async(&conn, &reply.line()).await.is_ok() && ok {
        // The caller holds the connection while it uses the sandbox.
        while let Ok(Some((line, fds))) = reader.recv_async(&conn).await {
            let done = match parse_request(&line) {
                Ok(Request::Attach { name }) => attach(&member.share, &name, fds.first()),
                Ok(Request::Detach { name }) => detach(&member.share, &name),
                Ok(Request::Take { .. }) => Err("this connection already holds a clone".into()),
                Err(e) => Err(format!("bad request: {e}")),
            };
            let reply = done.err().map(Reply::error).unwrap_or_default();
            if fdmsg::send_async(&conn, &reply.line()).await.is_err() {
                break;
            }
        }
    }
    retire(member).await;
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

/// The caller's first message, with its descriptors.
async fn read_request(
    conn: &UnixStream,
    reader: &mut fdmsg::Reader,
) -> Option<(Request, Vec<OwnedFd>)> {
    let (line, fds) = tokio::time::timeout(Duration::from_secs(5), reader.recv_async(conn))
        .await
        .ok()?
        .ok()??;
    Some((parse_request(&line).ok()?, fds))
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

/// Serves one pool until `shutdown` fires; then retires its ready clones.
/// The caller holds the pool's `claim`.
pub async fn serve(
    root: PathBuf,
    config: PoolConfig,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<(), SandboxError> {
    let template = Template::open(&root, &config.template)?;
    std::fs::create_dir_all(pools_dir(&root)).map_err(|e| {
        SandboxError::Invalid(format!("creating {}: {e}", pools_dir(&root).display()))
    })?;
    // Shares a daemon killed before left (its mounts died with it).
    if let Ok(entries) = std::fs::read_dir(pools_dir(&root).join(&config.template)) {
        for e in entries.flatten() {
            crate::share::remove_unmounted(&e.path());
        }
    }
    let sock = socket(&root, &config.template);
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock)
        .map_err(|e| SandboxError::Invalid(format!("binding {}: {e}", sock.display())))?;
    // Callers hand the daemon mount trees and taps: root's alone.
    let private = <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600);
    std::fs::set_permissions(&sock, private)
        .map_err(|e| SandboxError::Invalid(format!("securing {}: {e}", sock.display())))?;

    let mut ready: VecDeque<Member> = VecDeque::new();
    let mut status = PoolStatus {
        ready: 0,
        size: config.size,
        handed_out: 0,
    };
    write_status(&root, &config.template, status);
    let mut n = 0u64;
    let mut failures = 0u32;
    // The clone being made runs as a task of its own: a caller arriving
    // meanwhile must not cancel it halfway (and leak its VM).
    let mut refill: Option<tokio::task::JoinHandle<Result<Member, SandboxError>>> = None;
    // Requests are read by their own tasks: a silent caller holds nothing up.
    type Asked = (usize, Vec<OwnedFd>, fdmsg::Reader, UnixStream);
    let (req_tx, mut req_rx) = tokio::sync::mpsc::unbounded_channel::<Asked>();
    loop {
        if refill.is_none() && ready.len() < config.size {
            n += 1;
            let (root, template, delay) = (root.clone(), template.clone(), failures);
            refill = Some(tokio::spawn(async move {
                if delay > 0 {
                    tokio::time::sleep(Duration::from_secs(1 << delay.min(5))).await;
                }
                launch_member(&root, &template, n).await
            }));
        }
        let made = async {
            match refill.as_mut() {
                Some(task) => task.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            member = made => {
                refill = None;
                match member {
                    Ok(Ok(m)) => {
                        failures = 0;
                        ready.push_back(m);
                    }
                    Ok(Err(e)) => {
                        failures += 1;
                        tracing::warn!(template = %config.template, "refilling the pool: {e}");
                    }
                    Err(e) => {
                        failures += 1;
                        tracing::warn!(template = %config.template, "refilling the pool: {e}");
                    }
                }
            }
            conn = listener.accept() => {
                if let Ok((conn, _)) = conn {
                    let tx = req_tx.clone();
                    tokio::spawn(async move {
                        let mut reader = fdmsg::Reader::default();
                        match read_request(&conn, &mut reader).await {
                            Some((Request::Take { nics }, taps)) => {
                                let _ = tx.send((nics, taps, reader, conn));
                            }
                            Some(_) => {
                                let no = Reply::error("ask for a clone first");
                                let _ = fdmsg::send_async(&conn, &no.line()).await;
                            }
                            None => {}
                        }
                    });
                }
            }
            Some((nics, taps, reader, conn)) = req_rx.recv() => match ready.pop_front() {
                Some(m) => {
                    status.handed_out += 1;
                    tokio::spawn(hand_out(m, nics, taps, reader, conn));
                }
                None => {
                    let empty = Reply::error("the pool is empty");
                    let _ = fdmsg::send_async(&conn, &empty.line()).await;
                }
            },
            _ = shutdown.changed() => break,
        }
        status.ready = ready.len();
        write_status(&root, &config.template, status);
    }
    if let Some(task) = refill {
        if let Ok(Ok(m)) = task.await {
            ready.push_back(m);
        }
    }
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(pools_dir(&root).join(format!("{}.json", config.template)));
    for m in ready {
        retire(m).await;
    }
    let _ = std::fs::remove_dir(pools_dir(&root).join(&config.template));
    Ok(())
}

/// Asks `conn` one thing and reads the answer (blocking, bounded by the
/// socket's read timeout).
pub(crate) fn ask(
    conn: &std::os::unix::net::UnixStream,
    reader: &mut fdmsg::Reader,
    request: &Request,
    fds: &[RawFd],
) -> Result<Reply, SandboxError> {
    let io = |e: std::io::Error| SandboxError::Invalid(format!("asking the pool: {e}"));
    let line = serde_json::to_vec(request).unwrap_or_default();
    fdmsg::send(conn, &line, fds).map_err(io)?;
    let (answer, _) = reader
        .recv(conn)
        .map_err(io)?
        .ok_or_else(|| SandboxError::Invalid("the pool daemon hung up".into()))?;
    parse_reply(&answer)
}

/// Takes a ready clone from template `template`'s pool, its NICs joined to
/// `taps` (tap devices of this process's network namespace, one per NIC of
/// the template). None when no pool serves the template or it is empty.
/// The clone's share starts empty: `Sandbox::attach` fills it.
pub async fn take(
    root: &Path,
    template: &str,
    hostname: &str,
    taps: &[RawFd],
) -> Result<Option<Sandbox>, SandboxError> {
    let sock = socket(root, template);
    if !sock.exists() {
        return Ok(None);
    }
    let accel = Template::open(root, template)?.shape().3;
    let t0 = Instant::now();
    let Ok(conn) = std::os::unix::net::UnixStream::connect(&sock) else {
        return Ok(None);
    };
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| SandboxError::Invalid(format!("asking the pool: {e}")))?;
    let mut reader = fdmsg::Reader::default();
    let request = Request::Take { nics: taps.len() };
    let reply = ask(&conn, &mut reader, &request, taps)?;
    if !reply.error.is_empty() {
        tracing::info!(template, "pool: {}", reply.error);
        return Ok(None);
    }
    let handout = t0.elapsed();
    // A session the guest did not see begin (its marker split across reads
    // of a just-resumed VM) is answered by a fresh connection: try again.
    let mut attempt = 0;
    let (mut client, version) = loop {
        attempt += 1;
        let (channel, hangup) = agent::channel_with_hangup(&reply.agent_socket)?;
        let mut client = AgentClient::new(channel).max_decoding_message_size(16 << 20);
        let wait = Duration::from_secs(3);
        let answer = tokio::time::timeout(wait, agent::handshake(&mut client)).await;
        if !matches!(answer, Ok(Ok(_))) {
            // The VMM serves one connection at a time: free it for the next.
            hangup.now();
        }
        match answer {
            Ok(Ok(v)) => break (client, v),
            Ok(Err(e)) if attempt >= 3 => return Err(e.into()),
            Err(_) if attempt >= 3 => return Err(AgentError::Timeout(wait * 3).into()),
            _ => tracing::debug!(
                template,
                attempt,
                "pooled clone's agent silent; reconnecting"
            ),
        }
    };
    client
        .set_identity(agent_proto::IdentityRequest {
            entropy: crate::sandbox::host_entropy(),
            hostname: hostname.into(),
        })
        .await
        .map_err(AgentError::from)?;
    let timings = Timings {
        vmm_ready: handout,
        agent_ready: t0.elapsed(),
        guest_ready_ms: version.ready_ms,
    };
    let vm = crate::sandbox::PooledVm {
        id: reply.sandbox_id,
        template: template.into(),
        accel,
        kernel_release: version.kernel_release,
        conn: std::sync::Mutex::new((conn, reader)),
        pid: reply.vmm_pid,
    };
    Ok(Some(Sandbox::pooled(vm, client, timings)))
}

/// Asks the daemon that owns a pooled VM to mount `dir`'s tree at `name`
/// in its share.
pub(crate) fn attach_remote(
    conn: &std::sync::Mutex<(std::os::unix::net::UnixStream, fdmsg::Reader)>,
    dir: &Path,
    name: &str,
    readonly: bool,
) -> Result<(), SandboxError> {
    let tree = open_tree(dir, readonly)?;
    let mut guard = conn.lock().unwrap_or_else(|p| p.into_inner());
    let (conn, reader) = &mut *guard;
    let request = Request::Attach { name: name.into() };
    let reply = ask(conn, reader, &request, &[tree.as_raw_fd()])?;
    match reply.error.is_empty() {
        true => Ok(()),
        false => Err(SandboxError::Invalid(format!(
            "attaching {} to the pooled VM: {}",
            dir.display(),
            reply.error
        ))),
    }
}

pub(crate) fn detach_remote(
    conn: &std::sync::Mutex<(std::os::unix::net::UnixStream, fdmsg::Reader)>,
    name: &str,
) -> Result<(), SandboxError> {
    let mut guard = conn.lock().unwrap_or_else(|p| p.into_inner());
    let (conn, reader) = &mut *guard;
    let reply = ask(conn, reader, &Request::Detach { name: name.into() }, &[])?;
    match reply.error.is_empty() {
        true => Ok(()),
        false => Err(SandboxError::Invalid(format!(
            "detaching {name} from the pooled VM: {}",
            reply.error
        ))),
    }
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
