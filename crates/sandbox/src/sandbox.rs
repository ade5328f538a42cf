//! One sandbox: a VM booted with our kernel and agent, its state directory,
//! and the agent client. `start` leaves nothing behind when it fails.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agent_proto::Empty;
use std::os::fd::AsRawFd;

use hypervisor::qemu::{tail, QemuDriver};
use hypervisor::{Accel, MemoryBackend, Share, VmConfig};

use crate::agent::{self, AgentClient, AgentError};
use crate::assets::GuestAssets;
use crate::state::StateDir;
use crate::supervisor::{Handover, Request, Supervisor};
use crate::template::{Template, TemplateMeta, ROOTFS_TAG};
use crate::SandboxError;

pub const MIN_MEMORY_MIB: u64 = 64;
pub const MAX_VCPUS: u32 = 64;

#[derive(Clone, Debug)]
pub struct SandboxConfig {
    pub id: String,
    pub root: PathBuf,
    pub memory_mib: u64,
    pub vcpus: u32,
    pub assets: GuestAssets,
    pub accel: Accel,
    pub shares: Vec<Share>,
    /// Network devices, on tap devices made by the caller.
    pub nics: Vec<hypervisor::Nic>,
    pub hostname: String,
    /// How long the agent may take to answer after the VMM started.
    pub boot_timeout: Duration,
    /// The VM's CPU limit in millicores (its cgroup's cpu.max); `None`: its
    /// vCPUs.
    pub cpu_millis: Option<u64>,
    /// The VM's cgroup, relative to each hierarchy's root (a container's
    /// `cgroupsPath`, checked by `Spec`); `None`: podvisor's own.
    pub cgroup: Option<String>,
    /// Clone this template instead of booting (its shape overrides memory,
    /// vcpus, assets and accelerator); boot cold if it is unusable.
    pub template: Option<Template>,
    /// Give the guest a container root on block devices.
    pub block_root: Option<BlockRoot>,
}

/// The virtio-blk serials the guest finds a block root's disks by.
pub const IMAGE_SERIAL: &str = "podvisor-image";
pub const LAYER_SERIAL: &str = "podvisor-layer";

/// A container root on block devices: an image's filesystem, read-only
/// (shared by every sandbox of that image), and a writable layer of the
/// sandbox's own, a copy-on-write overlay of an empty filesystem. The guest
/// agent lays the two together with overlayfs.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockRoot {
    pub image: PathBuf,
    pub empty: PathBuf,
}

impl BlockRoot {
    /// The VM's disks: the writable one is `layers` over the empty
    /// filesystem (the sandbox's own on top; a clone's over its template's).
    pub(crate) fn disks(&self, layers: &[PathBuf]) -> Vec<hypervisor::Disk> {
        let mut chain = vec![self.empty.clone()];
        chain.extend_from_slice(layers);
        vec![
            hypervisor::Disk {
                serial: IMAGE_SERIAL.into(),
                layers: vec![self.image.clone()],
                readonly: true,
            },
            hypervisor::Disk {
                serial: LAYER_SERIAL.into(),
                layers: chain,
                readonly: false,
            },
        ]
    }
}

/// A sandbox's (or template's) writable layer, in its directory.
pub(crate) const LAYER_FILE: &str = "layer.qcow2";

/// A qcow2 overlay at `path` of `base` (a raw image, or with `qcow2_base`
/// a template's layer): it starts empty (a few hundred KiB) and grows by
/// what the guest writes.
pub(crate) fn make_overlay(base: &Path, qcow2_base: bool, path: &Path) -> Result<(), SandboxError> {
    // A qcow2 base's virtual size is its raw base's, which is what the
    // guest's filesystem spans.
    let size = match qcow2_base {
        true => virtual_size(base)?,
        false => std::fs::metadata(base)
            .map_err(|e| SandboxError::Invalid(format!("{}: {e}", base.display())))?
            .len(),
    };
    let format = if qcow2_base { "qcow2" } else { "raw" };
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-u", "-F", format, "-b"])
        .arg(base)
        .arg(path)
        .arg(size.to_string())
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| {
            SandboxError::Invalid(format!("qemu-img (install Debian's qemu-utils): {e}"))
        })?;
    if !out.status.success() {
        return Err(SandboxError::Invalid(format!(
            "qemu-img create {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// The virtual size of qcow2 image `path` (its header's, at byte 24).
fn virtual_size(path: &Path) -> Result<u64, SandboxError> {
    use std::io::Read;
    let mut header = [0u8; 32];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut header))
        .map_err(|e| SandboxError::Invalid(format!("{}: {e}", path.display())))?;
    if &header[..4] != b"QFI\xfb" {
        return Err(SandboxError::Invalid(format!(
            "{} is not a qcow2 image",
            path.display()
        )));
    }
    let mut size = [0u8; 8];
    size.copy_from_slice(&header[24..32]);
    Ok(u64::from_be_bytes(size))
}

/// Where the time of `start` went.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timings {
    /// From `start` until the VMM answered its control socket.
    pub vmm_ready: Duration,
    /// From `start` until the agent answered the handshake.
    pub agent_ready: Duration,
    /// The guest's own clock when the agent began to serve.
    pub guest_ready_ms: u64,
}

pub struct Sandbox {
    pub id: String,
    /// The template this sandbox was cloned from.
    pub cloned_from: Option<String>,
    /// Why a template asked for could not be used (the sandbox booted cold).
    pub fallback: Option<String>,
    pub accel: Accel,
    pub agent: AgentClient,
    pub timings: Timings,
    pub kernel_release: String,
    /// The VM's supervisor (QEMU's parent), ours for as long as we hold it.
    vm: Supervisor,
    /// Our state directory (a pooled VM's comes with `adopt`).
    dir: Option<StateDir>,
    agent_socket: PathBuf,
    hangup: agent::HangUp,
    nics: usize,
    /// The VM's share is in its supervisor's mount namespace, not ours (a
    /// VM a pool made): `attach` fills it.
    remote_share: bool,
    /// The VM has a block root's disks (`IMAGE_SERIAL`, `LAYER_SERIAL`).
    block_root: bool,
    /// What a snapshot of it is; none for a pool's VM (made elsewhere).
    origin: Option<TemplateMeta>,
}

/// A VM a pool hands over: its supervisor's connection, and who it is.
pub(crate) struct PooledVm {
    pub id: String,
    pub template: String,
    pub accel: Accel,
    pub kernel_release: String,
    pub supervisor: Handover,
    pub agent_socket: PathBuf,
    pub hangup: agent::HangUp,
    pub nics: usize,
}

/// Total host memory in MiB, from /proc/meminfo.
fn host_memory_mib() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024)
}

impl SandboxConfig {
    pub fn validate(&self) -> Result<(), SandboxError> {
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(SandboxError::Invalid(format!(
                "memory {} MiB is too small: a sandbox needs at least {MIN_MEMORY_MIB} MiB",
                self.memory_mib
            )));
        }
        if let Some(host) = host_memory_mib() {
            if self.memory_mib > host {
                return Err(SandboxError::Invalid(format!(
                    "memory {} MiB is more than this host has ({host} MiB)",
                    self.memory_mib
                )));
            }
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(SandboxError::Invalid(format!(
                "vcpus {} is out of range (1 to {MAX_VCPUS})",
                self.vcpus
            )));
        }
        valid_hostname(&self.hostname)?;
        if let Some(b) = &self.block_root {
            for f in [&b.image, &b.empty] {
                if !f.is_file() {
                    return Err(SandboxError::Invalid(format!(
                        "disk image {} does not exist",
                        f.display()
                    )));
                }
            }
        }
        for share in &self.shares {
            if !share.path.is_dir() {
                return Err(SandboxError::Invalid(format!(
                    "{} is not a directory",
                    share.path.display()
                )));
            }
        }
        Ok(())
    }
}

/// RFC 1123 host names, at most 64 bytes (the kernel's limit): it goes on
/// the kernel command line, which splits at spaces.
pub fn valid_hostname(name: &str) -> Result<(), SandboxError> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if name.is_empty() || name.len() > 64 || !name.split('.').all(label_ok) {
        return Err(SandboxError::Invalid(format!(
            "invalid hostname {name:?}: letters, digits, '-' and '.' (RFC 1123), at most 64 bytes"
        )));
    }
    Ok(())
}

/// The VM description of a sandbox, with its sockets and logs in `dir`.
pub(crate) fn vm_config(config: &SandboxConfig, dir: &StateDir) -> VmConfig {
    VmConfig {
        id: config.id.clone(),
        memory_mib: config.memory_mib,
        vcpus: config.vcpus,
        kernel: config.assets.kernel.clone(),
        initrd: config.assets.initrd.clone(),
        kernel_args: vec![format!(
            "{}={}",
            agent_proto::cmdline::HOSTNAME,
            config.hostname
        )],
        shares: config.shares.clone(),
        disks: config
            .block_root
            .as_ref()
            .map(|b| b.disks(&[dir.file(LAYER_FILE)]))
            .unwrap_or_default(),
        nics: config.nics.clone(),
        memory: MemoryBackend::Anonymous,
        accel: config.accel,
        agent_socket: dir.vm_file("agent.sock"),
        agent_port_name: agent_proto::AGENT_PORT_NAME.into(),
        control_socket: dir.vm_file("qmp.sock"),
        console_log: dir.file("console.log"),
        vmm_log: dir.file("vmm.log"),
        incoming: false,
        nic_hubs: false,
        jail: jail_enabled().then(|| hypervisor::Jail {
            dir: dir.file("jail"),
            uid_dir: crate::state::uids(),
            cpu_millis: config.cpu_millis,
            cgroup: config.cgroup.clone(),
            memory_mib: Some(config.memory_mib),
            propagate: crate::share::in_private_namespace(),
        }),
    }
}

/// Whether VMMs start in their jail: whenever we are root, unless
/// `PODVISOR_JAIL=off` (the benchmarks' A/B switch; never for production).
pub fn jail_enabled() -> bool {
    nix::unistd::geteuid().is_root()
        && std::env::var("PODVISOR_JAIL")
            .map(|v| v != "off")
            .unwrap_or(true)
}

struct Launched {
    /// What a snapshot of this VM is (its name aside).
    origin: TemplateMeta,
    vm: Supervisor,
    client: AgentClient,
    hangup: agent::HangUp,
    version: agent_proto::VersionResponse,
    vmm_ready: Duration,
    agent_ready: Duration,
}

/// How long loading a template's state may take.
const RESTORE_WAIT: Duration = Duration::from_secs(70);
/// How long pausing, resuming or joining a tap may take.
const VMM_WAIT: Duration = Duration::from_secs(10);

pub(crate) fn host_entropy() -> Vec<u8> {
    let mut b = vec![0u8; 64];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    b
}

/// Boots (or, with a template, restores) the VM and handshakes with its
/// agent. On failure nothing of the VM is left running. `cleanup` are
/// directories its supervisor removes once the VM is gone.
async fn launch(
    config: &SandboxConfig,
    dir: &StateDir,
    template: Option<&Template>,
    cleanup: Vec<PathBuf>,
) -> Result<Launched, SandboxError> {
    let mut vmc = vm_config(config, dir);
    if let Some(t) = template {
        if t.meta.nics != config.nics.len() {
            return Err(SandboxError::Invalid(format!(
                "template {} has {} network devices, this sandbox needs {}",
                t.meta.name,
                t.meta.nics,
                config.nics.len()
            )));
        }
        if t.meta.snapshot {
            t.check_state()?;
        }
        (vmc.memory_mib, vmc.vcpus, _, vmc.accel) = t.shape();
        vmc.kernel = t.meta.kernel.clone();
        vmc.initrd = t.meta.initrd.clone();
        vmc.memory = MemoryBackend::File {
            path: t.memory(),
            shared: false,
            offset: t.meta.memory_offset,
        };
        vmc.incoming = true;
        vmc.nic_hubs = t.meta.nic_hubs;
        // The template's device set: its disks, with a writable layer of
        // this clone's own over the template's (which the saved guest
        // state describes).
        vmc.disks = Vec::new();
        if let Some(b) = &t.meta.block_root {
            make_overlay(&t.layer(), true, &dir.file(LAYER_FILE))?;
            let mut chain = t.meta.base_layers.clone();
            chain.extend([t.layer(), dir.file(LAYER_FILE)]);
            vmc.disks = b.disks(&chain);
        }
    } else if let Some(b) = &config.block_root {
        make_overlay(&b.empty, false, &dir.file(LAYER_FILE))?;
    }
    let t0 = Instant::now();
    let vm = Supervisor::launch(&vmc, Some(dir.lock())).await?;
    dir.record_vmm_pid(vm.pid);
    let ready = async {
        if let Some(t) = template {
            let restore = match t.meta.snapshot {
                true => Request::RestoreSnapshot { state: t.state() },
                false => Request::Restore { state: t.state() },
            };
            vm.ask(&restore, &[], RESTORE_WAIT).await.map_err(|e| {
                SandboxError::Invalid(format!("{e}: {}", tail(&vmc.vmm_log, 3).replace('\n', " ")))
            })?;
        }
        let vmm_ready = t0.elapsed();
        let (channel, hangup) = agent::channel_with_hangup(&vmc.agent_socket)?;
        let mut client = AgentClient::new(channel).max_decoding_message_size(16 << 20);
        let version =
            wait_for_agent(&vm, &mut client, config.boot_timeout, &vmc.console_log).await?;
        if template.is_some() {
            client
                .set_identity(agent_proto::IdentityRequest {
                    entropy: host_entropy(),
                    hostname: config.hostname.clone(),
                })
                .await
                .map_err(AgentError::from)?;
        }
        if !cleanup.is_empty() {
            let request = Request::CleanUp { dirs: cleanup };
            vm.ask(&request, &[], VMM_WAIT).await?;
        }
        Ok::<_, SandboxError>((client, version, vmm_ready, hangup))
    }
    .await;
    let origin = TemplateMeta {
        name: String::new(),
        memory_mib: vmc.memory_mib,
        vcpus: vmc.vcpus,
        kernel: vmc.kernel.clone(),
        initrd: vmc.initrd.clone(),
        accel: vmc.accel.to_string(),
        created_unix: 0,
        nics: vmc.nics.len(),
        nic_hubs: vmc.nic_hubs,
        block_root: template
            .and_then(|t| t.meta.block_root.clone())
            .or(config.block_root.clone()),
        // The layers under this VM's own (which a snapshot takes).
        base_layers: match template {
            Some(t) if t.meta.block_root.is_some() => {
                let mut chain = t.meta.base_layers.clone();
                chain.push(t.layer());
                chain
            }
            _ => Vec::new(),
        },
        memory_offset: 0,
        memory_bytes: 0,
        snapshot: false,
        state_sha256: None,
    };
    match ready {
        Ok((client, version, vmm_ready, hangup)) => Ok(Launched {
            origin,
            vm,
            client,
            hangup,
            version,
            vmm_ready,
            agent_ready: t0.elapsed(),
        }),
        Err(e) => {
            vm.finish(Duration::from_secs(1)).await;
            Err(e)
        }
    }
}

impl Sandbox {
    pub async fn start(config: SandboxConfig) -> Result<Sandbox, SandboxError> {
        Self::start_with_cleanup(config, Vec::new()).await
    }

    /// `start`, with directories the VM's supervisor removes once the VM is
    /// gone (with its state directory), whoever holds the VM then: for VMs
    /// that are handed over.
    pub(crate) async fn start_handed_over(
        config: SandboxConfig,
        mut cleanup: Vec<PathBuf>,
    ) -> Result<Sandbox, SandboxError> {
        cleanup.push(crate::state::sandbox_dir(&config.root, &config.id));
        Self::start_with_cleanup(config, cleanup).await
    }

    async fn start_with_cleanup(
        config: SandboxConfig,
        cleanup: Vec<PathBuf>,
    ) -> Result<Sandbox, SandboxError> {
        config.validate()?;
        QemuDriver::locate()?;
        let mut config = config;
        // A clone of an image's template that boots cold after all gets
        // the image all the same.
        if let Some(t) = &config.template {
            config.block_root = config.block_root.take().or(t.meta.block_root.clone());
        }
        let dir = StateDir::create(&config.root, &config.id)?;
        let mut fallback = None;
        let mut launched = None;
        if let Some(t) = &config.template {
            match launch(&config, &dir, Some(t), cleanup.clone()).await {
                Ok(l) => launched = Some(l),
                Err(e) => {
                    tracing::warn!(sandbox = %config.id, template = %t.meta.name, "clone failed, booting cold: {e}");
                    fallback = Some(format!(
                        "template {} unusable ({e}); booted cold",
                        t.meta.name
                    ));
                    for f in ["agent.sock", "qmp.sock", "console.sock"] {
                        let _ = std::fs::remove_file(dir.vm_file(f));
                    }
                    let _ = std::fs::remove_file(dir.file(LAYER_FILE));
                }
            }
        }
        let cloned_from = launched
            .as_ref()
            .and(config.template.as_ref())
            .map(|t| t.meta.name.clone());
        let l = match launched {
            Some(l) => l,
            None => match launch(&config, &dir, None, cleanup).await {
                Ok(l) => l,
                Err(e) => {
                    dir.remove();
                    return Err(e);
                }
            },
        };
        let timings = Timings {
            vmm_ready: l.vmm_ready,
            agent_ready: l.agent_ready,
            guest_ready_ms: l.version.ready_ms,
        };
        tracing::debug!(sandbox = %config.id, ?timings, cloned = cloned_from.is_some(), "agent ready");
        Ok(Sandbox {
            id: config.id,
            cloned_from,
            fallback,
            accel: config.accel,
            agent: l.client,
            timings,
            kernel_release: l.version.kernel_release,
            vm: l.vm,
            agent_socket: dir.vm_file("agent.sock"),
            dir: Some(dir),
            hangup: l.hangup,
            nics: config.nics.len(),
            remote_share: false,
            block_root: config.block_root.is_some(),
            origin: Some(l.origin),
        })
    }

    /// A sandbox whose VM a pool made and handed over (see `pool::take`).
    pub(crate) fn pooled(
        vm: PooledVm,
        agent: AgentClient,
        timings: Timings,
    ) -> Result<Sandbox, SandboxError> {
        Ok(Sandbox {
            id: vm.id,
            cloned_from: Some(vm.template),
            fallback: None,
            accel: vm.accel,
            agent,
            timings,
            kernel_release: vm.kernel_release,
            vm: Supervisor::adopt(vm.supervisor)?,
            dir: None,
            agent_socket: vm.agent_socket,
            hangup: vm.hangup,
            nics: vm.nics,
            remote_share: true,
            block_root: false,
            origin: None,
        })
    }

    /// Our state directory.
    pub(crate) fn state_dir(&self) -> Option<&std::path::Path> {
        self.dir.as_ref().map(|d| d.path.as_path())
    }

    /// Gives the VM up to another process: its supervisor's connection, to
    /// send on. This process's hold ends without stopping the VM; its state
    /// directory stays for the supervisor to remove.
    pub(crate) fn hand_over(self) -> Result<Handover, SandboxError> {
        self.vm.hand_over()
    }

    /// Puts a pooled VM in the caller's cgroup (`cgroup`, else its own) with
    /// the caller's CPU limit and the memory limit of a VM of `memory_mib`:
    /// what it would have had if the caller had booted it. A template larger
    /// than the caller's VM gives the guest more RAM than that; the host
    /// holds it to the caller's size (past it, the VMM is OOM-killed, as a
    /// container past its limit is).
    pub(crate) async fn limit(
        &self,
        cgroup: Option<String>,
        cpu_millis: Option<u64>,
        memory_mib: u64,
    ) -> Result<(), SandboxError> {
        let request = Request::Cgroup {
            cgroup,
            cpu_millis,
            memory_mib: Some(memory_mib),
        };
        self.vm.ask(&request, &[], VMM_WAIT).await.map(drop)
    }

    /// Names a pooled sandbox `id` and gives it a state directory of ours.
    pub(crate) fn adopt(&mut self, root: &std::path::Path, id: &str) -> Result<(), SandboxError> {
        if self.remote_share && self.dir.is_none() {
            self.dir = Some(StateDir::create(root, id)?);
            self.id = id.into();
        }
        Ok(())
    }

    /// Whether the VM has a block root's disks: its containers' roots are
    /// on them (`agent_proto::BlockRoot`), not on a share.
    /// The disk layers under this sandbox's own writable one (its
    /// template's, and theirs): files it reads as long as it runs.
    pub fn disk_chain(&self) -> Vec<PathBuf> {
        self.origin
            .as_ref()
            .map(|o| o.base_layers.clone())
            .unwrap_or_default()
    }

    pub fn has_block_root(&self) -> bool {
        self.block_root
    }

    /// Whether the VM came from a pool: its share is not a directory of
    /// ours, and `attach` fills it.
    pub fn is_pooled(&self) -> bool {
        self.remote_share
    }

    /// Makes directory `dir` of this process's mount namespace, with what
    /// is mounted below it, appear at `name` in a pooled VM's root share
    /// (its supervisor mounts a copy of the tree). A VM of our own shares a
    /// directory of ours: its caller fills that directly.
    pub fn attach(
        &self,
        dir: &std::path::Path,
        name: &str,
        readonly: bool,
    ) -> Result<(), SandboxError> {
        if !self.remote_share {
            return Err(SandboxError::Invalid(
                "attach: this VM shares its caller's own directory".into(),
            ));
        }
        let tree = crate::pool::open_tree(dir, readonly)?;
        let request = Request::Attach {
            tag: ROOTFS_TAG.into(),
            name: name.into(),
        };
        self.vm
            .ask_blocking(&request, &[tree.as_raw_fd()], VMM_WAIT)
            .map(drop)
            .map_err(|e| {
                SandboxError::Invalid(format!("attaching {} to the pooled VM: {e}", dir.display()))
            })
    }

    /// Undoes `attach`.
    pub fn detach(&self, name: &str) -> Result<(), SandboxError> {
        if !self.remote_share {
            return Ok(());
        }
        let request = Request::Detach {
            tag: ROOTFS_TAG.into(),
            name: name.into(),
        };
        self.vm
            .ask_blocking(&request, &[], VMM_WAIT)
            .map(drop)
            .map_err(|e| SandboxError::Invalid(format!("detaching {name} from the pooled VM: {e}")))
    }

    /// How many NICs the VM has.
    pub(crate) fn nics(&self) -> usize {
        self.nics
    }

    /// Joins tap device `fd` to NIC `index` of a clone started without one.
    pub(crate) async fn connect_tap(
        &mut self,
        index: usize,
        fd: std::os::fd::BorrowedFd<'_>,
    ) -> Result<(), SandboxError> {
        let request = Request::ConnectTap { index };
        self.vm
            .ask(&request, &[fd.as_raw_fd()], VMM_WAIT)
            .await
            .map(drop)
    }

    /// The VMM's host pid.
    pub fn vmm_pid(&self) -> u32 {
        self.vm.pid
    }

    /// Powers the guest off and removes every trace of the sandbox.
    pub async fn destroy(self) {
        let mut agent = self.agent;
        if !self.vm.exited() {
            let _ =
                tokio::time::timeout(Duration::from_millis(500), agent.shutdown(Empty {})).await;
            self.vm.wait_exit(Duration::from_millis(500)).await;
        }
        self.vm.finish(Duration::from_secs(2)).await;
        if let Some(dir) = self.dir {
            dir.remove();
        }
    }

    /// Why the VM is gone, if it is: exit status and the console's last lines.
    pub fn vm_exit(&mut self) -> Option<String> {
        if !self.vm.exited() {
            return None;
        }
        let status = self
            .vm
            .ask_blocking(&Request::Status, &[], Duration::from_secs(1))
            .map(|r| r.exit)
            .unwrap_or_else(|_| format!("process {} is gone", self.vm.pid));
        let console = match &self.dir {
            Some(dir) if !self.remote_share => tail(&dir.file("console.log"), 5),
            _ => String::from("(in its pool's directory)"),
        };
        Some(format!("VM exited ({status}); console: {console}"))
    }

    /// Saves the whole VM as template `name` under `root` (see
    /// `Template::from_sandbox`): it then ends with `leave_running` false,
    /// else runs on. Its clones carry on from this moment.
    pub async fn snapshot(
        &mut self,
        root: &Path,
        name: &str,
        leave_running: bool,
    ) -> Result<Template, SandboxError> {
        let Some(origin) = self.origin.clone() else {
            return Err(SandboxError::Invalid(
                "a pool's sandbox cannot be snapshotted (its VM's shape is the pool's)".into(),
            ));
        };
        let layer = self.dir.as_ref().map(|d| d.file(LAYER_FILE));
        let vm = &self.vm;
        let made = crate::template::Template::from_sandbox(
            root,
            name,
            origin,
            layer.as_deref(),
            |memory: PathBuf| async move {
                let ask = Request::Snapshot { memory };
                vm.ask(&ask, &[], RESTORE_WAIT)
                    .await
                    .map(drop)
                    .map_err(|e| {
                        match e.to_string().contains("VirtFS") {
                            // QEMU cannot save a VM whose guest holds 9p fids.
                            true => SandboxError::Invalid(format!(
                                "a sandbox whose root or volumes are shared over 9p \
                             cannot be snapshotted (use an image's block root): {e}"
                            )),
                            false => e,
                        }
                    })
            },
        )
        .await;
        // A failed snapshot leaves the sandbox running as it was.
        if leave_running || made.is_err() {
            self.vm.ask(&Request::Resume, &[], VMM_WAIT).await?;
        }
        made
    }

    /// Stops the guest's vCPUs (a pool keeps its ready clones paused).
    pub async fn pause(&mut self) -> Result<(), SandboxError> {
        self.vm.ask(&Request::Pause, &[], VMM_WAIT).await.map(drop)
    }

    pub async fn resume(&mut self) -> Result<(), SandboxError> {
        self.vm.ask(&Request::Resume, &[], VMM_WAIT).await.map(drop)
    }

    /// The VM's agent socket (for a new session after this one hangs up).
    pub fn agent_socket(&self) -> PathBuf {
        self.agent_socket.clone()
    }

    /// Closes this host's agent session now, so that another process can
    /// open its own; later calls here open a fresh one.
    pub fn hang_up_agent(&mut self) -> Result<(), SandboxError> {
        self.hangup.now();
        let (channel, fresh) = agent::channel_with_hangup(&self.agent_socket)?;
        self.hangup = fresh;
        self.agent = AgentClient::new(channel).max_decoding_message_size(16 << 20);
        Ok(())
    }
}

/// Handshakes with the agent, failing early if the VM dies (a kernel panic
/// reboots and so exits QEMU) and late if nothing answers.
pub(crate) async fn wait_for_agent(
    vm: &Supervisor,
    client: &mut AgentClient,
    timeout: Duration,
    console: &std::path::Path,
) -> Result<agent_proto::VersionResponse, SandboxError> {
    let handshake = agent::handshake(client);
    tokio::pin!(handshake);
    let deadline = tokio::time::Instant::now() + timeout;
    let exited = || async {
        let status = vm
            .ask(&Request::Status, &[], Duration::from_secs(1))
            .await
            .map(|r| r.exit)
            .unwrap_or_default();
        SandboxError::Invalid(format!(
            "VM exited before its agent answered ({status}); guest console:\n{}",
            tail(console, 8)
        ))
    };
    loop {
        tokio::select! {
            r = &mut handshake => {
                let Err(e) = r else { return r.map_err(SandboxError::from) };
                // A broken channel usually means the VM died: say that instead.
                if vm.wait_exit(Duration::from_secs(1)).await {
                    return Err(exited().await);
                }
                return Err(e.into());
            }
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
        if vm.exited() {
            return Err(exited().await);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(SandboxError::Invalid(format!(
                "{}; guest console:\n{}",
                AgentError::Timeout(timeout),
                tail(console, 8)
            )));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::valid_hostname;

    #[test]
    fn hostnames() {
        let long_label = "a".repeat(63);
        let too_long = format!("{long_label}.b");
        for ok in ["podvisor", "a", "web-1.example", &long_label] {
            assert!(valid_hostname(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a b",
            "a rdinit=/bin/sh",
            "-a",
            "a-",
            "a..b",
            "x\n",
            "ü",
            &too_long,
        ] {
            assert!(valid_hostname(bad).is_err(), "{bad}");
        }
    }
}
