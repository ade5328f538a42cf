//! `kill ID [SIGNAL]`: signal the container's process (or, with --all, every
//! process of the container) inside the VM.

use std::path::Path;

use agent_proto::SignalProcessRequest;
use anyhow::bail;
use clap::Args;
use sandbox::container::Status;

use super::oci;

#[derive(Args)]
pub struct KillArgs {
    /// Send the signal to every process of the container.
    #[arg(short, long)]
    pub all: bool,
    pub id: String,
    /// Name (KILL, SIGKILL) or number; default SIGTERM.
    #[arg(default_value = "SIGTERM")]
    pub signal: String,
}

pub async fn run(args: KillArgs, root: &Path) -> anyhow::Result<u8> {
    let signal = oci::parse_signal(&args.signal)?;
    let c = oci::open(root, &args.id)?;
    if matches!(c.status, Status::Stopped | Status::Creating) {
        bail!("container not running");
    }
    let mut agent = oci::agent(&c.dir)?;
    agent
        .signal_process(SignalProcessRequest {
            container_id: args.id.clone(),
            exec_id: String::new(),
            signal: signal as u32,
            all: args.all,
        })
        .await
        .map_err(oci::rpc)?;
    Ok(0)
}
