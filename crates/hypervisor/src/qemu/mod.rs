//! The QEMU microvm driver: launches `qemu-system-x86_64 -M microvm` with
//! virtio-mmio devices only and drives it over QMP.

mod cmdline;
pub mod qmp;

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub use cmdline::{args, kernel_cmdline};
use qmp::Qmp;

use crate::{Hypervisor, HypervisorError, VirtualMachine, VmConfig};

const BINARY: &str = "qemu-system-x86_64";
const QMP_WAIT: Duration = Duration::from_secs(10);

/// Finds a program on `PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

pub struct QemuDriver {
    pub binary: PathBuf,
}

impl QemuDriver {
    /// `$PODVISOR_QEMU`, else `qemu-system-x86_64` on `PATH`.
    pub fn locate() -> Result<Self, HypervisorError> {
        if let Some(p) = std::env::var_os("PODVISOR_QEMU") {
            let p = PathBuf::from(p);
            return if p.is_file() {
                Ok(QemuDriver { binary: p })
            } else {
                Err(HypervisorError::Missing(p.display().to_string()))
            };
        }
        which(BINARY)
            .map(|binary| QemuDriver { binary })
            .ok_or_else(|| HypervisorError::Missing(BINARY.into()))
    }

    /// `qemu-system-x86_64 --version`, first line.
    pub fn version(&self) -> Option<String> {
        let out = Command::new(&self.binary).arg("--version").output().ok()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .map(str::to_string)
    }

    /// Whether this QEMU has a device model (`-device help`).
    pub fn devices(&self) -> String {
        Command::new(&self.binary)
            .args(["-M", "microvm", "-device", "help"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    fn spawn(&self, config: &VmConfig) -> Result<Child, HypervisorError> {
        let log = File::create(&config.vmm_log).map_err(|source| HypervisorError::Spawn {
            binary: self.binary.display().to_string(),
            source,
        })?;
        let root = nix::unistd::geteuid().is_root();
        let parent = std::process::id() as libc::pid_t;
        let mut cmd = Command::new(&self.binary);
        cmd.args(args(config, root))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            // Its own process group: a Ctrl-C at the caller's terminal is for
            // the container, not for QEMU.
            .process_group(0);
        // SAFETY: the closure runs between fork and exec and calls only
        // async-signal-safe functions (prctl, getppid, _exit).
        unsafe {
            cmd.pre_exec(move || {
                // QEMU dies with the thread that started it: a SIGKILLed
                // runtime leaves no VM behind.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            })
        };
        cmd.spawn().map_err(|source| HypervisorError::Spawn {
            binary: self.binary.display().to_string(),
            source,
        })
    }
}

/// The last lines of a log file, for error messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Hypervisor for QemuDriver {
    type Vm = QemuVm;

    async fn launch(&self, config: &VmConfig) -> Result<QemuVm, HypervisorError> {
        if config.memory_mib == 0 || config.vcpus == 0 {
            return Err(HypervisorError::Config(
                "memory and vcpus must be positive".into(),
            ));
        }
        let mut child = self.spawn(config)?;
        let start = Instant::now();
        let qmp = loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(HypervisorError::EarlyExit(format!(
                    "{status}: {}",
                    tail(&config.vmm_log, 5)
                )));
            }
            if config.control_socket.exists() {
                match Qmp::connect(&config.control_socket).await {
                    Ok(q) => break q,
                    Err(e) if start.elapsed() > QMP_WAIT => {
                        let _ = child.kill();
                        let _ = child.wait();
                        return Err(e);
                    }
                    Err(_) => {}
                }
            }
            if start.elapsed() > QMP_WAIT {
                let _ = child.kill();
                let _ = child.wait();
                return Err(HypervisorError::QmpTimeout(config.control_socket.clone()));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        tracing::debug!(vm = %config.id, pid = child.id(), "qemu started");
        Ok(QemuVm { child, qmp })
    }
}

pub struct QemuVm {
    child: Child,
    qmp: Qmp,
}

/// A shell-quoted path for QEMU's `exec:` migration URIs.
fn sh_quote(p: &Path) -> String {
    format!("'{}'", p.to_string_lossy().replace('\'', "'\\''"))
}

const MIGRATION_WAIT: Duration = Duration::from_secs(60);

impl QemuVm {
    pub async fn status(&mut self) -> Result<String, HypervisorError> {
        self.qmp.status().await
    }

    /// Joins tap device `fd` to NIC `index`'s hub (a VM launched with
    /// `nic_hubs` whose NIC has no tap yet). QEMU keeps its own copy of `fd`.
    pub async fn connect_tap(
        &mut self,
        index: usize,
        fd: std::os::fd::BorrowedFd<'_>,
    ) -> Result<(), HypervisorError> {
        let name = format!("tap{index}");
        self.qmp
            .execute_with_fd("getfd", Some(serde_json::json!({ "fdname": name })), fd)
            .await?;
        self.qmp
            .execute(
                "netdev_add",
                Some(serde_json::json!({ "type": "tap", "id": name, "fd": name })),
            )
            .await?;
        self.qmp
            .execute(
                "netdev_add",
                Some(serde_json::json!({
                    "type": "hubport",
                    "id": format!("up{index}"),
                    "hubid": index,
                    "netdev": name,
                })),
            )
            .await
            .map(drop)
    }

    async fn ignore_shared(&mut self) -> Result<(), HypervisorError> {
        let caps =
            serde_json::json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]});
        self.qmp
            .execute("migrate-set-capabilities", Some(caps))
            .await
            .map(drop)
    }
}

impl VirtualMachine for QemuVm {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    async fn pause(&mut self) -> Result<(), HypervisorError> {
        self.qmp.execute("stop", None).await.map(drop)
    }

    async fn resume(&mut self) -> Result<(), HypervisorError> {
        self.qmp.execute("cont", None).await.map(drop)
    }

    async fn save(&mut self, state: &Path) -> Result<(), HypervisorError> {
        self.qmp.execute("stop", None).await?;
        self.ignore_shared().await?;
        let uri = format!("exec:cat > {}", sh_quote(state));
        self.qmp
            .execute("migrate", Some(serde_json::json!({ "uri": uri })))
            .await?;
        let start = Instant::now();
        loop {
            let v = self.qmp.execute("query-migrate", None).await?;
            match v.get("status").and_then(serde_json::Value::as_str) {
                Some("completed") => return Ok(()),
                Some("failed") | Some("cancelled") => {
                    let why = v
                        .get("error-desc")
                        .and_then(serde_json::Value::as_str)
                        .unwrap_or("no reason given");
                    return Err(HypervisorError::Qmp(format!("saving the VM failed: {why}")));
                }
                _ if start.elapsed() > MIGRATION_WAIT => {
                    return Err(HypervisorError::Qmp(
                        "saving the VM did not complete".into(),
                    ))
                }
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }

    async fn restore(&mut self, state: &Path) -> Result<(), HypervisorError> {
        self.ignore_shared().await?;
        let uri = format!("exec:cat {}", sh_quote(state));
        self.qmp
            .execute("migrate-incoming", Some(serde_json::json!({ "uri": uri })))
            .await?;
        let start = Instant::now();
        loop {
            // A state QEMU cannot load makes it exit: report its words.
            if let Some(status) = self.try_exit() {
                return Err(HypervisorError::EarlyExit(format!(
                    "{status} while loading the saved state"
                )));
            }
            match self.qmp.status().await {
                Ok(s) if s == "paused" => break,
                Ok(_) | Err(_) if start.elapsed() > MIGRATION_WAIT => {
                    return Err(HypervisorError::Qmp(
                        "loading the saved state did not complete".into(),
                    ))
                }
                Ok(_) => tokio::time::sleep(Duration::from_millis(2)).await,
                Err(e) => return Err(e),
            }
        }
        self.qmp.execute("cont", None).await.map(drop)
    }

    async fn stop(&mut self, grace: Duration) {
        if self.try_exit().is_some() {
            return;
        }
        let _ = tokio::time::timeout(grace, self.qmp.execute("quit", None)).await;
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.try_exit().is_some() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
