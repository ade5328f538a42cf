//! The hypervisor driver: what the sandbox manager asks of a VMM (launch a VM
//! with these devices, pause, resume, stop), and the accelerator choice.
//! The first driver is QEMU's microvm machine; a builtin VMM can follow.

mod accel;
pub mod jail;
pub mod qemu;

use std::path::PathBuf;

pub use accel::{Accel, HostVirt};
pub use jail::Jail;

#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("{0} not found (install Debian's qemu-system-x86)")]
    Missing(String),
    #[error("starting {binary}")]
    Spawn {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error("VM exited during start: {0}")]
    EarlyExit(String),
    #[error("QMP socket {0} did not appear")]
    QmpTimeout(PathBuf),
    #[error("QMP: {0}")]
    Qmp(String),
    #[error("QMP I/O")]
    QmpIo(#[source] std::io::Error),
    #[error("invalid VM configuration: {0}")]
    Config(String),
    #[error("preparing the VMM's jail: {0}")]
    Jail(String),
}

/// A directory the guest mounts over virtio-9p under `tag`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Share {
    pub tag: String,
    pub path: PathBuf,
    pub readonly: bool,
}

/// A network device backed by a tap device the caller made (in the network
/// namespace the VMM runs in).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Nic {
    pub tap: String,
    /// The guest device's MAC address, "aa:bb:cc:dd:ee:ff".
    pub mac: String,
    /// An open, inheritable fd of the tap device: the VMM uses it instead
    /// of opening `tap` by name.
    pub fd: Option<i32>,
}

/// A virtio-blk disk the guest finds by `serial`: a chain of image files,
/// the bottom one raw and each one above it a qcow2 overlay of the one
/// below (its header's backing file name is not used: the chain is given
/// here). Only the top one is ever written, and only unless `readonly`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Disk {
    pub serial: String,
    pub layers: Vec<PathBuf>,
    pub readonly: bool,
}

impl Disk {
    /// Whether the guest can tell this disk by its serial: virtio-blk keeps
    /// 20 bytes of it, and QEMU's option syntax and the guest's sysfs want
    /// plain characters.
    pub fn valid_serial(serial: &str) -> bool {
        !serial.is_empty()
            && serial.len() <= 20
            && serial
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    }
}

/// Where guest memory lives.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub enum MemoryBackend {
    /// Private anonymous memory.
    #[default]
    Anonymous,
    /// A file (on tmpfs or hugetlbfs), mapped shared or private, from byte
    /// `offset` on (a snapshot's pages region; 0 for a template's memory).
    File {
        path: PathBuf,
        shared: bool,
        #[serde(default)]
        offset: u64,
    },
}

/// Everything a driver needs to launch one VM.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct VmConfig {
    pub id: String,
    pub memory_mib: u64,
    pub vcpus: u32,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Extra kernel command-line words (the driver adds console and panic ones).
    pub kernel_args: Vec<String>,
    pub shares: Vec<Share>,
    #[serde(default)]
    pub disks: Vec<Disk>,
    pub nics: Vec<Nic>,
    /// Put each NIC behind a hub of its own, so that its tap can join after
    /// start (templates and their clones: the tap is the clone's, the device
    /// state the template's; both must see the same backend features). A
    /// NIC with neither `fd` nor `tap` then starts unconnected.
    pub nic_hubs: bool,
    pub memory: MemoryBackend,
    pub accel: Accel,
    /// Unix socket the agent channel is served on (the VMM listens).
    pub agent_socket: PathBuf,
    /// The virtio-serial port name the guest agent looks for.
    pub agent_port_name: String,
    /// Unix socket for the VMM's control protocol.
    pub control_socket: PathBuf,
    /// The guest's serial console goes here.
    pub console_log: PathBuf,
    /// The VMM's own stderr goes here.
    pub vmm_log: PathBuf,
    /// Start paused, waiting for a saved state (`VirtualMachine::restore`).
    pub incoming: bool,
    /// Confine the VMM (see `jail`); `None` runs it as its caller.
    pub jail: Option<Jail>,
}

/// A running VM.
#[allow(async_fn_in_trait)]
pub trait VirtualMachine {
    /// The VMM's host process id.
    fn pid(&self) -> u32;
    /// Whether the VMM process has exited, and how.
    fn try_exit(&mut self) -> Option<std::process::ExitStatus>;
    async fn pause(&mut self) -> Result<(), HypervisorError>;
    async fn resume(&mut self) -> Result<(), HypervisorError>;
    /// Asks the VMM to quit, then kills it if it has not within `grace`.
    async fn stop(&mut self, grace: std::time::Duration);
    /// Pauses the VM and writes its device state to `state`. Guest memory is
    /// not copied: it stays in the file-backed memory (templates).
    async fn save(&mut self, state: &std::path::Path) -> Result<(), HypervisorError>;
    /// Loads device state saved by `save` into a VM launched with
    /// `incoming`, whose memory maps the saved memory file, and resumes it.
    async fn restore(&mut self, state: &std::path::Path) -> Result<(), HypervisorError>;
    /// Pauses the VM and writes all of it, memory included, to the new file
    /// `memory` (QEMU's mapped-ram layout: every page at a fixed offset,
    /// zero pages left as holes), synced before it returns. The VM stays
    /// paused, whether or not it succeeded: its caller resumes it.
    async fn snapshot(&mut self, memory: &std::path::Path) -> Result<(), HypervisorError>;
    /// Loads `state` (a snapshot's companion, `mapped_ram::companion`) into
    /// a VM launched `incoming` whose memory maps the snapshot's pages, and
    /// resumes it.
    async fn restore_snapshot(&mut self, state: &std::path::Path) -> Result<(), HypervisorError>;
}

/// A VMM that can launch VMs.
#[allow(async_fn_in_trait)]
pub trait Hypervisor {
    type Vm: VirtualMachine;
    /// Starts a VM and returns once its control channel answers.
    async fn launch(&self, config: &VmConfig) -> Result<Self::Vm, HypervisorError>;
}
