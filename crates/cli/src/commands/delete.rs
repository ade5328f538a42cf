//! `delete [--force] ID`: a stopped (or never started) container's state goes;
//! with --force a running one is killed first. Nothing of it is left: the
//! holder and its VM are gone before the directory is removed.

use std::path::Path;
use std::time::Duration;

use agent_proto::SignalProcessRequest;
use anyhow::bail;
use clap::Args;
use sandbox::container::{ContainerDir, ContainerError, Status};
use sandbox::oci::Spec;

use super::oci;
use crate::hooks;

#[derive(Args)]
pub struct DeleteArgs {
    /// Kill the container first if it still runs; a missing one is no error.
    #[arg(short, long)]
    pub force: bool,
    pub id: String,
}

/// How long a holder may take to tear its VM down once its process died.
const HOLDER_GRACE: Duration = Duration::from_secs(10);

pub async fn run(args: DeleteArgs, root: &Path) -> anyhow::Result<u8> {
    let dir = match ContainerDir::open(root, &args.id) {
        // As runc: forcing the removal of what is not there is no error.
        Err(ContainerError::NotFound(_)) if args.force => return Ok(0),
        opened => opened?,
    };
    let Some(record) = dir.record()? else {
        if !args.force {
            bail!("container {} is still being created", args.id);
        }
        // Stop the creation midway: its holder first, then its state.
        if let Some(creator) = dir.creator() {
            oci::wait_holder_gone(&creator, Duration::ZERO).await;
        }
        dir.remove()?;
        sandbox::state::collect_garbage(root);
        return Ok(0);
    };
    let status = dir.status(Some(&record));
    match status {
        Status::Running | Status::Paused if !args.force => {
            bail!(
                "cannot delete container {} that is not stopped: {}",
                args.id,
                status.as_str()
            )
        }
        Status::Stopped => {}
        _ => {
            if let Ok(mut agent) = oci::agent(&dir) {
                let kill = agent.signal_process(SignalProcessRequest {
                    container_id: args.id.clone(),
                    exec_id: String::new(),
                    signal: libc::SIGKILL as u32,
                    all: true,
                });
                let _ = tokio::time::timeout(Duration::from_secs(2), kill).await;
            }
        }
    }
    oci::wait_holder_gone(&record, HOLDER_GRACE).await;
    finish(dir, &record.bundle, &args.id)?;
    Ok(0)
}

/// poststop hooks (warnings only, as runc), then the directory.
fn finish(dir: ContainerDir, bundle: &Path, id: &str) -> anyhow::Result<()> {
    if let Ok(spec) = Spec::load(bundle) {
        let poststop = spec
            .hooks
            .as_ref()
            .map(|h| h.poststop.clone())
            .unwrap_or_default();
        let mut state = dir.oci_state()?;
        state.status = Status::Stopped.as_str().into();
        if let Err(e) = hooks::run("poststop", &poststop, &state) {
            tracing::warn!(container = %id, "{e:#}");
        }
    }
    dir.remove()?;
    Ok(())
}

/// For `run` in the foreground: the holder exited; remove what is left.
pub async fn remove_stopped(root: &Path, id: &str) {
    let Ok(dir) = ContainerDir::open(root, id) else {
        return;
    };
    if let Ok(Some(record)) = dir.record() {
        oci::wait_holder_gone(&record, HOLDER_GRACE).await;
        let _ = finish(dir, &record.bundle, id);
    } else {
        let _ = dir.remove();
    }
}
