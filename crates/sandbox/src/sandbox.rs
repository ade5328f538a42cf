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
    pub hostname: String,
    /// How long the agent may take to answer after the VMM started.
    pub boot_timeout: Duration,
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
    pub accel: Accel,
    pub agent: AgentClient,
    pub timings: Timings,
    pub kernel_release: String,
    vm: QemuVm,
    dir: StateDir,
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

impl Sandbox {
    pub async fn start(config: SandboxConfig) -> Result<Sandbox, SandboxError> {
        config.validate()?;
        let driver = QemuDriver::locate()?;
        let dir = StateDir::create(&config.root, &config.id)?;
        let vm_config = VmConfig {
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
            memory: MemoryBackend::Anonymous,
            accel: config.accel,
            agent_socket: dir.file("agent.sock"),
            agent_port_name: agent_proto::AGENT_PORT_NAME.into(),
            control_socket: dir.file("qmp.sock"),
            console_log: dir.file("console.log"),
            vmm_log: dir.file("vmm.log"),
        };
        let t0 = Instant::now();
        let mut vm = match driver.launch(&vm_config).await {
            Ok(vm) => vm,
            Err(e) => {
                dir.remove();
                return Err(e.into());
            }
        };
        dir.record_vmm_pid(vm.pid());
        let vmm_ready = t0.elapsed();
        tracing::debug!(sandbox = %config.id, accel = %config.accel, ?vmm_ready, "vmm ready");

        let mut client = match agent::channel(&vm_config.agent_socket) {
            Ok(ch) => AgentClient::new(ch).max_decoding_message_size(16 << 20),
            Err(e) => {
                vm.stop(Duration::from_secs(1)).await;
                dir.remove();
                return Err(e.into());
            }
        };
        let ready = wait_for_agent(
            &mut vm,
            &mut client,
            config.boot_timeout,
            &vm_config.console_log,
        )
        .await;
        let version = match ready {
            Ok(v) => v,
            Err(e) => {
                vm.stop(Duration::from_secs(1)).await;
                dir.remove();
                return Err(e);
            }
        };
        let timings = Timings {
            vmm_ready,
            agent_ready: t0.elapsed(),
            guest_ready_ms: version.ready_ms,
        };
        tracing::debug!(sandbox = %config.id, ?timings, "agent ready");
        Ok(Sandbox {
            id: config.id,
            accel: config.accel,
            agent: client,
            timings,
            kernel_release: version.kernel_release,
            vm,
            dir,
        })
    }

    /// The VMM's host pid.
    pub fn vmm_pid(&self) -> u32 {
        self.vm.pid()
    }

    /// Powers the guest off and removes every trace of the sandbox.
    pub async fn destroy(mut self) {
        if self.vm.try_exit().is_none() {
            let _ = tokio::time::timeout(Duration::from_millis(500), self.agent.shutdown(Empty {}))
                .await;
            let deadline = Instant::now() + Duration::from_millis(500);
            while self.vm.try_exit().is_none() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        self.vm.stop(Duration::from_secs(2)).await;
        self.dir.remove();
    }

    /// Why the VM is gone, if it is: exit status and the console's last lines.
    pub fn vm_exit(&mut self) -> Option<String> {
        let status = self.vm.try_exit()?;
        Some(format!(
            "VM exited ({status}); console: {}",
            tail(&self.dir.file("console.log"), 5)
        ))
    }
}

/// Handshakes with the agent, failing early if the VM dies (a kernel panic
/// reboots and so exits QEMU) and late if nothing answers.
async fn wait_for_agent(
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
