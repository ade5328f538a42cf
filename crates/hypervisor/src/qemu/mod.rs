//! The QEMU microvm driver: launches `qemu-system-x86_64 -M microvm` with
//! virtio-mmio devices only and drives it over QMP.

mod cmdline;
pub mod console;
pub mod mapped_ram;
pub mod qmp;

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use cmdline::{args, kernel_cmdline, valid_kernel_arg};
pub use console::tail;
use qmp::Qmp;

use crate::jail::{self, Jail, Paths, Plan};
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
        version_text(&self.binary)
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

    fn spawn(&self, config: &VmConfig) -> Result<(Child, Option<Arc<Plan>>), HypervisorError> {
        let spawn_err = |source| HypervisorError::Spawn {
            binary: self.binary.display().to_string(),
            source,
        };
        let (plan, paths) = match &config.jail {
            Some(j) => {
                let (plan, paths) = Plan::new(j, &self.binary, config)?;
                (Some(Arc::new(plan)), paths)
            }
            None => (None, Paths::host(&self.binary, config)),
        };
        let (log_r, log_w) = std::io::pipe().map_err(spawn_err)?;
        let root = nix::unistd::geteuid().is_root();
        let parent = std::process::id() as libc::pid_t;
        let mut cmd = Command::new(&paths.binary);
        cmd.args(args(config, &paths, root))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_w)
            // Its own process group: a Ctrl-C at the caller's terminal is for
            // the container, not for QEMU.
            .process_group(0);
        let inner = plan.clone();
        // SAFETY: the closure runs between fork and exec and calls only
        // async-signal-safe functions (prctl, getppid, _exit, and the
        // system calls of `Plan::enter`, which allocates nothing).
        unsafe {
            cmd.pre_exec(move || {
                if let Some(plan) = &inner {
                    plan.enter()?;
                }
                // QEMU dies with the thread that started it: a SIGKILLed
                // runtime leaves no VM behind. Set after the jail: a change
                // of credentials clears it.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            })
        };
        let child = cmd.spawn();
        drop(cmd);
        match child {
            Ok(child) => {
                console::drain(log_r, config.vmm_log.clone());
                Ok((child, plan))
            }
            Err(e) => {
                if let Some(p) = &plan {
                    jail::remove_cgroups(&p.cgroups);
                }
                Err(spawn_err(e))
            }
        }
    }
}

impl Hypervisor for QemuDriver {
    type Vm = QemuVm;

    async fn launch(&self, config: &VmConfig) -> Result<QemuVm, HypervisorError> {
        if config.memory_mib == 0 || config.vcpus == 0 {
            return Err(HypervisorError::Config(
                "memory and vcpus must be positive".into(),
            ));
        }
        if let Some(bad) = config.kernel_args.iter().find(|w| !valid_kernel_arg(w)) {
            return Err(HypervisorError::Config(format!(
                "kernel argument {bad:?} is not one plain token"
            )));
        }
        if let Some(d) = config.disks.iter().find(|d| {
            !crate::Disk::valid_serial(&d.serial) || d.layers.is_empty() || d.layers.len() > 8
        }) {
            return Err(HypervisorError::Config(format!(
                "disk {:?}: a serial of up to 20 letters, digits, - or _, and 1 to 8 layers",
                d.serial
            )));
        }
        let (mut child, plan) = self.spawn(config)?;
        let console_socket = jail::vm_dir(config).join(cmdline::CONSOLE_SOCKET);
        let mut console = false;
        let start = Instant::now();
        let qmp = loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(HypervisorError::EarlyExit(format!(
                    "{status}: {}",
                    tail(&config.vmm_log, 5)
                )));
            }
            // QEMU waits for the console's reader before it goes on.
            if !console && console_socket.exists() {
                if let Ok(s) = std::os::unix::net::UnixStream::connect(&console_socket) {
                    console::drain(s, config.console_log.clone());
                    console = true;
                }
            }
            if console && config.control_socket.exists() {
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
        tracing::debug!(vm = %config.id, pid = child.id(), jailed = plan.is_some(), "qemu started");
        let cgroups = plan.as_ref().map(|p| p.cgroups.clone()).unwrap_or_default();
        Ok(QemuVm {
            child,
            qmp,
            plan,
            cgroups,
        })
    }
}

pub struct QemuVm {
    child: Child,
    qmp: Qmp,
    /// The jail's uid lock, held while the VMM lives.
    plan: Option<Arc<Plan>>,
    /// The VMM's cgroup leaves, removed once it has exited.
    cgroups: Vec<PathBuf>,
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            jail::remove_cgroups(&self.cgroups);
        }
    }
}

const MIGRATION_WAIT: Duration = Duration::from_secs(60);

impl QemuVm {
    pub async fn status(&mut self) -> Result<String, HypervisorError> {
        self.qmp.status().await
    }

    /// Moves the jailed VMM into cgroup `cgroup` (relative to each
    /// hierarchy's root; `None`: its own `podvisor/vm-<uid>`) with CPU limit
    /// `cpu_millis` and the memory limit of a VM of `memory_mib` (at most
    /// the RAM it has). `config` is the one it was launched with. An
    /// unjailed VMM has no cgroup of its own: nothing to do.
    pub fn move_cgroup(
        &mut self,
        config: &VmConfig,
        cgroup: Option<String>,
        cpu_millis: Option<u64>,
        memory_mib: Option<u64>,
    ) -> Result<(), HypervisorError> {
        let (Some(plan), Some(jail)) = (&self.plan, &config.jail) else {
            return Ok(());
        };
        let jail = Jail {
            cgroup,
            cpu_millis,
            memory_mib: memory_mib.or(jail.memory_mib),
            ..jail.clone()
        };
        let old = std::mem::take(&mut self.cgroups);
        let moved = match jail.cgroup.is_some() {
            true => jail::move_cgroup(self.child.id(), plan.uid, config, &jail, &old),
            // Its own leaf stays: only its limits change.
            false => jail::set_limits(&old, config, &jail).map(|()| old.clone()),
        };
        match moved {
            Ok(new) => {
                self.cgroups = new;
                Ok(())
            }
            Err(e) => {
                self.cgroups = old;
                Err(e)
            }
        }
    }

    /// The uid the VMM runs as in its jail.
    pub fn jail_uid(&self) -> Option<u32> {
        self.plan.as_ref().map(|p| p.uid)
    }

    /// Hands QEMU an open file for migration (`fd:NAME`): it needs no
    /// program to run (`-sandbox spawn=deny`) and no path of ours.
    async fn migration_fd(&mut self, name: &str, file: &File) -> Result<String, HypervisorError> {
        self.qmp
            .execute_with_fd(
                "getfd",
                Some(serde_json::json!({ "fdname": name })),
                file.as_fd(),
            )
            .await?;
        Ok(format!("fd:{name}"))
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

    /// Hands QEMU `file` as fd set `set`, for a `file:/dev/fdset/N` URI
    /// (mapped-ram needs a seekable file, which `fd:` is not taken for).
    async fn fdset(&mut self, set: u32, file: &File) -> Result<String, HypervisorError> {
        self.qmp
            .execute_with_fd(
                "add-fd",
                Some(serde_json::json!({ "fdset-id": set })),
                file.as_fd(),
            )
            .await?;
        Ok(format!("file:/dev/fdset/{set}"))
    }

    /// Mapped-ram on (and x-ignore-shared off: a clone of a template has it
    /// on from its restore, and QEMU 10 misplaces its block address in a
    /// mapped-ram stream), or off.
    async fn mapped_ram(&mut self, on: bool) -> Result<(), HypervisorError> {
        let mut list = vec![serde_json::json!({"capability": "mapped-ram", "state": on})];
        if on {
            list.push(serde_json::json!({"capability": "x-ignore-shared", "state": false}));
        }
        let caps = serde_json::json!({ "capabilities": list });
        self.qmp
            .execute("migrate-set-capabilities", Some(caps))
            .await
            .map(drop)
    }

    /// Waits for the outgoing migration to end.
    async fn migrated(&mut self, what: &str) -> Result<(), HypervisorError> {
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
                    return Err(HypervisorError::Qmp(format!("{what} failed: {why}")));
                }
                _ if start.elapsed() > MIGRATION_WAIT => {
                    return Err(HypervisorError::Qmp(format!("{what} did not complete")))
                }
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }

    /// Waits for an incoming migration to leave the VM paused, and resumes it.
    async fn loaded(&mut self) -> Result<(), HypervisorError> {
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
        let file = File::create(state).map_err(HypervisorError::QmpIo)?;
        let uri = self.migration_fd("migout", &file).await?;
        drop(file);
        self.qmp
            .execute("migrate", Some(serde_json::json!({ "uri": uri })))
            .await?;
        self.migrated("saving the VM").await
    }

    async fn restore(&mut self, state: &Path) -> Result<(), HypervisorError> {
        self.ignore_shared().await?;
        let file = File::open(state).map_err(HypervisorError::QmpIo)?;
        let uri = self.migration_fd("migin", &file).await?;
        drop(file);
        self.qmp
            .execute("migrate-incoming", Some(serde_json::json!({ "uri": uri })))
            .await?;
        self.loaded().await
    }

    async fn snapshot(&mut self, memory: &Path) -> Result<(), HypervisorError> {
        self.qmp.execute("stop", None).await?;
        let taken = async {
            // A jailed QEMU writes no file larger than its guest's RAM and
            // slack (`jail::file_size_max`): the snapshot is bounded.
            self.mapped_ram(true).await?;
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(memory)
                .map_err(HypervisorError::QmpIo)?;
            let uri = self.fdset(1, &file).await?;
            self.qmp
                .execute("migrate", Some(serde_json::json!({ "uri": uri })))
                .await?;
            self.migrated("writing the snapshot").await?;
            file.sync_all().map_err(HypervisorError::QmpIo)
        }
        .await;
        // Mapped-ram stays on for no later migration (a template's save).
        let _ = self.mapped_ram(false).await;
        let _ = self
            .qmp
            .execute("remove-fd", Some(serde_json::json!({ "fdset-id": 1 })))
            .await;
        taken
    }

    async fn restore_snapshot(&mut self, state: &Path) -> Result<(), HypervisorError> {
        self.mapped_ram(true).await?;
        let file = File::open(state).map_err(HypervisorError::QmpIo)?;
        let uri = self.fdset(2, &file).await?;
        drop(file);
        self.qmp
            .execute("migrate-incoming", Some(serde_json::json!({ "uri": uri })))
            .await?;
        self.loaded().await
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

/// Whether the QEMU at `binary` can map a file read-only yet writable
/// copy-on-write (`memory-backend-file,readonly=on,rom=off`, QEMU 8.2 and
/// later): a clone then opens its template's memory file `O_RDONLY`. Older
/// ones open it read-write (guest writes never reach it: the mapping is
/// private, but a compromised QEMU could write the fd).
pub fn maps_readonly_files_privately(binary: &std::path::Path) -> bool {
    static ANSWER: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ANSWER.get_or_init(|| version_at_least(&version_text(binary), (8, 2)))
}

/// `binary --version`, remembered under /run/podvisor per binary (device,
/// inode, mtime): asking QEMU costs ~10 ms, on every VM start otherwise.
fn version_text(binary: &std::path::Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let cache = std::fs::metadata(binary).ok().map(|m| {
        std::path::PathBuf::from(format!(
            "/run/podvisor/qemu-version-{}-{}-{}",
            m.dev(),
            m.ino(),
            m.mtime_nsec() + m.mtime() * 1_000_000_000
        ))
    });
    if let Some(text) = cache.as_ref().and_then(|c| std::fs::read_to_string(c).ok()) {
        return text;
    }
    let text = Command::new(binary)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if let (Some(c), false) = (&cache, text.is_empty()) {
        // Written whole, then renamed: a reader never sees half of it.
        let tmp = c.with_extension(format!("{}.tmp", std::process::id()));
        let _ = c.parent().map(std::fs::create_dir_all);
        if std::fs::write(&tmp, &text).is_ok() && std::fs::rename(&tmp, c).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    text
}

/// Whether `qemu --version`'s text says at least `want` (major, minor).
fn version_at_least(text: &str, want: (u32, u32)) -> bool {
    let Some(v) = text.split("version ").nth(1) else {
        return false;
    };
    let mut parts = v.split(|c: char| !c.is_ascii_digit());
    let major = parts.next().and_then(|p| p.parse().ok());
    let minor = parts.next().and_then(|p| p.parse().ok());
    matches!((major, minor), (Some(a), Some(b)) if (a, b) >= want)
}

#[cfg(test)]
mod version_tests {
    #[test]
    fn versions() {
        let v = |t: &str| super::version_at_least(t, (8, 2));
        assert!(!v(
            "QEMU emulator version 7.2.18 (Debian 1:7.2+dfsg-7+deb12u18)"
        ));
        assert!(v(
            "QEMU emulator version 8.2.2 (Debian 1:8.2.2+ds-0ubuntu1)"
        ));
        assert!(v("QEMU emulator version 10.0.0"));
        assert!(!v("QEMU emulator version 8.1.5"));
        assert!(!v("garbage"));
    }
}
