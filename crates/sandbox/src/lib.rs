//! The sandbox manager: a sandbox is one VM with our kernel and agent. Front
//! ends (the CLI, the shim) call only this crate.

pub mod agent;
pub mod assets;
pub mod container;
pub mod io;
pub mod network;
pub mod oci;
pub mod pool;
pub mod proxy;
mod sandbox;
pub mod share;
pub mod state;
pub mod template;

pub use sandbox::{Sandbox, SandboxConfig, Timings};

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
