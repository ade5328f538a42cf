//! The sandbox manager: a sandbox is one VM with our kernel and agent. Front
//! ends (the CLI, the shim) call only this crate.

pub mod agent;
pub mod assets;
pub mod container;
pub mod fdmsg;
pub mod io;
pub mod network;
pub mod oci;
pub mod pool;
pub mod proxy;
mod sandbox;
pub mod seccomp;
pub mod share;
pub mod state;
pub mod supervisor;
pub mod template;

pub use sandbox::{
    jail_enabled, BlockRoot, Sandbox, SandboxConfig, Timings, IMAGE_SERIAL, LAYER_SERIAL,
};

use hypervisor::{Accel, HostVirt};

/// The accelerator asked for, else what the host offers; KVM only where the
/// host has it.
pub fn checked_accel(asked: Option<Accel>) -> Result<Accel, SandboxError> {
    let host = HostVirt::detect();
    let accel = asked.unwrap_or_else(|| host.default_accel());
    if accel == Accel::Kvm && !matches!(host, HostVirt::Kvm { .. }) {
        return Err(SandboxError::Invalid(format!(
            "--accel kvm asked for, but this host offers {host}"
        )));
    }
    Ok(accel)
}

/// How long a guest may take to boot to a ready agent.
pub fn default_boot_timeout(accel: Accel) -> std::time::Duration {
    std::time::Duration::from_secs(match accel {
        Accel::Kvm => 10,
        Accel::Tcg => 60,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Assets(#[from] assets::AssetsError),
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error(transparent)]
    Hypervisor(#[from] hypervisor::HypervisorError),
    #[error(transparent)]
    Agent(#[from] agent::AgentError),
    #[error("{0}")]
    Invalid(String),
}
