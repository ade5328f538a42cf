//! One module per verb.

pub mod check;
pub mod create;
pub mod delete;
pub mod events;
pub mod exec;
pub mod features;
pub mod holder;
pub mod image;
pub mod kill;
pub mod oci;
pub mod pause;
pub mod pool;
pub mod ps;
pub mod sandbox_run;
pub mod service;
pub mod start;
pub mod state;
pub mod template;
pub mod update;
pub mod vm_args;

use std::path::Path;

use clap::Subcommand;

/// An error with the exit code it should end the process with.
#[derive(Debug)]
pub struct CodedError {
    pub code: u8,
    pub msg: String,
}

impl std::fmt::Display for CodedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for CodedError {}

#[derive(Subcommand)]
pub enum SandboxCommand {
    /// Boot a micro-VM, run CMD in it with stdio attached, exit with CMD's status.
    Run(sandbox_run::RunArgs),
}

pub async fn sandbox(cmd: SandboxCommand, root: &Path) -> anyhow::Result<u8> {
    match cmd {
        SandboxCommand::Run(args) => sandbox_run::run(args, root).await,
    }
}
