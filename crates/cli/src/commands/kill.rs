//! `kill ID [SIGNAL]`: signal the container's process (or, with --all, every
//! process of the container) inside the VM.

use std::path::Path;

use agent_proto::SignalProcessRequest;
use anyhow::bail;
use clap::Args;
use sandbox::container::Status;

use super::oci;
use super::oci::Bounded;

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
    let sent = agent
        .signal_process(SignalProcessRequest {
            container_id: args.id.clone(),
            exec_id: String::new(),
            signal: signal as u32,
            all: args.all,
        })
        .bounded()
        .await;
    match sent {
        Ok(_) => Ok(0),
        // A guest that does not answer a SIGKILL loses its VM: the holder
        // goes, and its VMM with it (parent-death signal).
        Err(e) if signal == libc::SIGKILL => {
            tracing::warn!(container = %args.id, "{e:#}; killing the holder");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.record.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            Ok(0)
        }
        Err(e) => Err(e),
    }
}
