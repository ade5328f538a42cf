//! `start`: let the created container's process run, then poststart hooks.

use std::path::Path;

use agent_proto::ContainerRequest;
use anyhow::bail;
use clap::Args;
use sandbox::container::Status;
use sandbox::oci::Spec;

use super::oci;
use super::oci::Bounded;
use crate::hooks;

#[derive(Args)]
pub struct StartArgs {
    pub id: String,
}

pub async fn start_id(root: &Path, id: &str) -> anyhow::Result<()> {
    let c = oci::open(root, id)?;
    match c.status {
        Status::Created => {}
        Status::Stopped => bail!("cannot start a container that has stopped"),
        Status::Running | Status::Paused => bail!("cannot start an already running container"),
        Status::Creating => bail!("container {id} is still being created"),
    }
    let mut agent = oci::agent(&c.dir)?;
    agent
        .start_container(ContainerRequest {
            container_id: id.into(),
        })
        .bounded()
        .await?;
    c.dir.set_marker("started", true)?;
    if let Ok(spec) = Spec::load(&c.record.bundle) {
        let poststart = spec
            .hooks
            .as_ref()
            .map(|h| h.poststart.clone())
            .unwrap_or_default();
        if let Err(e) = hooks::run("poststart", &poststart, &c.dir.oci_state()?) {
            // runc: a failing poststart hook is a warning, the container runs.
            tracing::warn!(container = %id, "{e:#}");
            eprintln!("podvisor: warning: {e:#}");
        }
    }
    Ok(())
}

pub async fn run(args: StartArgs, root: &Path) -> anyhow::Result<u8> {
    start_id(root, &args.id).await?;
    Ok(0)
}
