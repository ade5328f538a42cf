//! One sandbox: a VM booted with our kernel and agent, its state directory,
//! and the agent client. `start` leaves nothing behind when it fails.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use agent_proto::Empty;
use hypervisor::qemu::{tail, QemuDriver, QemuVm};
use hypervisor::{Accel, Hypervisor, MemoryBackend, Share, VirtualMachine, VmConfig};

use crate::agent::{self, AgentClient, AgentError};
use crate::assets::GuestAssets;
use crate::state::StateDir;
use crate::template::Template;
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
    vmm: Vmm,
}

/// A VM a pool daemon handed over: it stays the daemon's until `conn` closes.
pub(crate) struct PooledVm {
    pub id: String,
    pub template: String,
    pub accel: Accel,
    pub kernel_release: String,
    pub conn: PoolConn,
    pub pid: u32,
}

/// The connection to the pool daemon that owns a VM, and its reader.
pub(crate) type PoolConn = std::sync::Mutex<(std::os::unix::net::UnixStream, crate::fdmsg::Reader)>;

/// Who owns the VM: this process, or a pool daemon that handed it over and
/// tears it down when the connection we hold closes.
enum Vmm {
    Owned {
        vm: QemuVm,
        dir: StateDir,
        hangup: agent::HangUp,
        nics: usize,
    },
    Pooled {
        conn: PoolConn,
        pid: u32,
        /// A state directory of the caller's, for its sockets (no VMM pid:
        /// the VMM is the daemon's).
        dir: Option<StateDir>,
    },
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
    vm: QemuVm,
    client: AgentClient,
    hangup: agent::HangUp,
    version: agent_proto::VersionResponse,
    vmm_ready: Duration,
    agent_ready: Duration,
}

pub(crate) fn host_entropy() -> Vec<u8> {
    let mut b = vec![0u8; 64];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    b
}

/// Boots (or, with a template, restores) the VM and handshakes with its
/// agent. On failure nothing of the VM is left running.
async fn launch(
    driver: &QemuDriver,
    config: &SandboxConfig,
    dir: &StateDir,
    template: Option<&Template>,
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
        (vmc.memory_mib, vmc.vcpus, _, vmc.accel) = t.shape();
        vmc.kernel = t.meta.kernel.clone();
        vmc.initrd = t.meta.initrd.clone();
        vmc.memory = MemoryBackend::File {
            path: t.memory(),
            shared: false,
        };
        vmc.incoming = true;
        vmc.nic_hubs = t.meta.nic_hubs;
    }
    let t0 = Instant::now();
    let mut vm = driver.launch(&vmc).await?;
    dir.record_vmm_pid(vm.pid());
    let ready = async {
        if let Some(t) = template {
            vm.restore(&t.state()).await.map_err(|e| {
                SandboxError::Invalid(format!("{e}: {}", tail(&vmc.vmm_log, 3).replace('\n', " ")))
            })?;
        }
        let vmm_ready = t0.elapsed();
        let (channel, hangup) = agent::channel_with_hangup(&vmc.agent_socket)?;
        let mut client = AgentClient::new(channel).max_decoding_message_size(16 << 20);
        let version =
            wait_for_agent(&mut vm, &mut client, config.boot_timeout, &vmc.console_log).await?;
        if template.is_some() {
            client
                .set_identity(agent_proto::IdentityRequest {
                    entropy: host_entropy(),
                    hostname: config.hostname.clone(),
                })
                .await
                .map_err(AgentError::from)?;
        }
        Ok::<_, SandboxError>((client, version, vmm_ready, hangup))
    }
    .await;
    match ready {
        Ok((client, version, vmm_ready, hangup)) => Ok(Launched {
            vm,
            client,
            hangup,
            version,
            vmm_ready,
            agent_ready: t0.elapsed(),
        }),
        Err(e) => {
            vm.stop(Duration::from_secs(1)).await;
            Err(e)
        }
    }
}

impl Sandbox {
    pub async fn start(config: SandboxConfig) -> Result<Sandbox, SandboxError> {
        config.validate()?;
        let driver = QemuDriver::locate()?;
        let dir = StateDir::create(&config.root, &config.id)?;
        let mut fallback = None;
        let mut launched = None;
        if let Some(t) = &config.template {
            match launch(&driver, &config, &dir, Some(t)).await {
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
                }
            }
        }
        let cloned_from = launched
            .as_ref()
            .and(config.template.as_ref())
            .map(|t| t.meta.name.clone());
        let l = match launched {
            Some(l) => l,
            None => match launch(&driver, &config, &dir, None).await {
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
            vmm: Vmm::Owned {
                vm: l.vm,
                dir,
                hangup: l.hangup,
                nics: config.nics.len(),
            },
        })
    }

    /// A sandbox whose VM a pool daemon owns (see `pool::take`).
    pub(crate) fn pooled(vm: PooledVm, agent: AgentClient, timings: Timings) -> Sandbox {
        Sandbox {
            id: vm.id,
            cloned_from: Some(vm.template),
            fallback: None,
            accel: vm.accel,
            agent,
            timings,
            kernel_release: vm.kernel_release,
            vmm: Vmm::Pooled {
                conn: vm.conn,
                pid: vm.pid,
                dir: None,
            },
        }
    }

    /// Names a pooled sandbox `id` and gives it a state directory of ours.
    pub(crate) fn adopt(&mut self, root: &std::path::Path, id: &str) -> Result<(), SandboxError> {
        if let Vmm::Pooled { dir, .. } = &mut self.vmm {
            *dir = Some(StateDir::create(root, id)?);
            self.id = id.into();
        }
        Ok(())
    }

    /// Whether a pool daemon owns this sandbox's VM.
    pub fn is_pooled(&self) -> bool {
        matches!(self.vmm, Vmm::Pooled { .. })
    }

    /// Makes directory `dir` of this process's mount namespace, with what
    /// is mounted below it, appear at `name` in a pooled VM's root share
    /// (its daemon mounts a copy of the tree). A VM of our own shares a
    /// directory of ours: its caller fills that directly.
    pub fn attach(
        &self,
        dir: &std::path::Path,
        name: &str,
        readonly: bool,
    ) -> Result<(), SandboxError> {
        match &self.vmm {
            Vmm::Pooled { conn, .. } => crate::pool::attach_remote(conn, dir, name, readonly),
            Vmm::Owned { .. } => Err(SandboxError::Invalid(
                "attach: this VM shares its caller's own directory".into(),
            )),
        }
    }

    /// Undoes `attach`.
    pub fn detach(&self, name: &str) -> Result<(), SandboxError> {
        match &self.vmm {
            Vmm::Pooled { conn, .. } => crate::pool::detach_remote(conn, name),
            Vmm::Owned { .. } => Ok(()),
        }
    }

    /// How many NICs the VM has (known for VMs of our own).
    pub(crate) fn nics(&self) -> usize {
        match &self.vmm {
            Vmm::Owned { nics, .. } => *nics,
            Vmm::Pooled { .. } => 0,
        }
    }

    /// Joins tap device `fd` to NIC `index` of a clone started without one.
    pub(crate) async fn connect_tap(
        &mut self,
        index: usize,
        fd: std::os::fd::BorrowedFd<'_>,
    ) -> Result<(), SandboxError> {
        match &mut self.vmm {
            Vmm::Owned { vm, .. } => Ok(vm.connect_tap(index, fd).await?),
            Vmm::Pooled { .. } => Err(SandboxError::Invalid("a pooled VM is its daemon's".into())),
        }
    }

    /// The VMM's host pid.
    pub fn vmm_pid(&self) -> u32 {
        match &self.vmm {
            Vmm::Owned { vm, .. } => vm.pid(),
            Vmm::Pooled { pid, .. } => *pid,
        }
    }

    /// Powers the guest off and removes every trace of the sandbox. A pooled
    /// one goes back to its daemon, which tears it down.
    pub async fn destroy(self) {
        let (mut vm, dir) = match self.vmm {
            Vmm::Owned { vm, dir, .. } => (vm, dir),
            Vmm::Pooled { dir, conn, .. } => {
                // Hanging up hands the VM back: its daemon tears it down.
                drop(conn);
                if let Some(dir) = dir {
                    dir.remove();
                }
                return;
            }
        };
        let mut agent = self.agent;
        if vm.try_exit().is_none() {
            let _ =
                tokio::time::timeout(Duration::from_millis(500), agent.shutdown(Empty {})).await;
            let deadline = Instant::now() + Duration::from_millis(500);
            while vm.try_exit().is_none() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        vm.stop(Duration::from_secs(2)).await;
        dir.remove();
    }

    /// Why the VM is gone, if it is: exit status and the console's last lines.
    pub fn vm_exit(&mut self) -> Option<String> {
        let (vm, dir) = match &mut self.vmm {
            Vmm::Owned { vm, dir, .. } => (vm, dir),
            // The daemon's child: gone, or a zombie it has not reaped yet.
            Vmm::Pooled { pid, .. } => {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                let state = stat.rsplit_once(") ").and_then(|(_, r)| r.chars().next());
                return match state {
                    Some('Z' | 'X') | None => Some(format!(
                        "VM exited (process {pid} of its pool daemon is gone)"
                    )),
                    Some(_) => None,
                };
            }
        };
        let status = vm.try_exit()?;
        Some(format!(
            "VM exited ({status}); console: {}",
            tail(&dir.file("console.log"), 5)
        ))
    }

    /// Stops the guest's vCPUs (a pool keeps its ready clones paused).
    pub async fn pause(&mut self) -> Result<(), SandboxError> {
        match &mut self.vmm {
            Vmm::Owned { vm, .. } => Ok(vm.pause().await?),
            Vmm::Pooled { .. } => Err(SandboxError::Invalid("a pooled VM is its daemon's".into())),
        }
    }

    pub async fn resume(&mut self) -> Result<(), SandboxError> {
        match &mut self.vmm {
            Vmm::Owned { vm, .. } => Ok(vm.resume().await?),
            Vmm::Pooled { .. } => Err(SandboxError::Invalid("a pooled VM is its daemon's".into())),
        }
    }

    /// The VM's agent socket (for a new session after this one hangs up).
    pub fn agent_socket(&self) -> Option<PathBuf> {
        match &self.vmm {
            Vmm::Owned { dir, .. } => Some(dir.vm_file("agent.sock")),
            Vmm::Pooled { .. } => None,
        }
    }

    /// Closes this host's agent session now, so that another process can
    /// open its own; later calls here open a fresh one.
    pub fn hang_up_agent(&mut self) -> Result<(), SandboxError> {
        let Vmm::Owned { dir, hangup, .. } = &mut self.vmm else {
            return Ok(());
        };
        hangup.now();
        let (channel, fresh) = agent::channel_with_hangup(&dir.vm_file("agent.sock"))?;
        *hangup = fresh;
        self.agent = AgentClient::new(channel).max_decoding_message_size(16 << 20);
        Ok(())
    }
}

/// Handshakes with the agent, failing early if the VM dies (a kernel panic
/// reboots and so exits QEMU) and late if nothing answers.
pub(crate) async fn wait_for_agent(
    vm: &mut QemuVm,
    client: &mut AgentClient,
    timeout: Duration,
    console: &std::path::Path,
) -> Result<agent_proto::VersionResponse, SandboxError> {
    let handshake = agent::handshake(client);
    tokio::pin!(handshake);
    let deadline = tokio::time::Instant::now() + timeout;
    let exited = |status: std::process::ExitStatus| {
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
                for _ in 0..100 {
                    if let Some(status) = vm.try_exit() {
                        return Err(exited(status));
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                return Err(e.into());
            }
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
        if let Some(status) = vm.try_exit() {
            return Err(exited(status));
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
