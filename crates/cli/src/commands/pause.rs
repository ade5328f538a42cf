//! `pause` and `resume`: freeze and thaw every process of the container
//! (the guest's cgroup freezer; the VM itself keeps running).

use std::path::Path;

use agent_proto::ContainerRequest;
use anyhow::bail;
use clap::Args;
use sandbox::container::Status;

use super::oci;
use super::oci::Bounded;

#[derive(Args)]
pub struct PauseArgs {
    pub id: String,
}

pub async fn pause(args: PauseArgs, root: &Path) -> anyhow::Result<u8> {
    let c = oci::open(root, &args.id)?;
    if c.status != Status::Running {
        bail!("container {} is not running", args.id);
    }
    oci::agent(&c.dir)?
        .pause_container(ContainerRequest {
            container_id: args.id.clone(),
        })
        .bounded()
        .await?;
    c.dir.set_marker("paused", true)?;
    Ok(0)
}

pub async fn resume(args: PauseArgs, root: &Path) -> anyhow::Result<u8> {
    let c = oci::open(root, &args.id)?;
    if c.status != Status::Paused {
        bail!("container {} is not paused", args.id);
    }
    oci::agent(&c.dir)?
        .resume_container(ContainerRequest {
            container_id: args.id.clone(),
        })
        .bounded()
        .await?;
    c.dir.set_marker("paused", false)?;
    Ok(0)
}
