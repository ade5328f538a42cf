//! `ps`: the container's processes. They live in the guest, so the pids are
//! the guest's (pid namespace of the VM); the host has no process for them.

use std::path::Path;

use agent_proto::ContainerRequest;
use anyhow::bail;
use clap::Args;
use sandbox::container::Status;

use super::oci;
use super::oci::Bounded;

#[derive(Args)]
pub struct PsArgs {
    /// table or json.
    #[arg(short, long, default_value = "table", value_parser = ["table", "json"])]
    pub format: String,
    pub id: String,
    /// Accepted for runc compatibility (ps(1) options).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub ps_args: Vec<String>,
}

pub async fn run(args: PsArgs, root: &Path) -> anyhow::Result<u8> {
    let c = oci::open(root, &args.id)?;
    if matches!(c.status, Status::Stopped | Status::Creating) {
        bail!("container {} is not running", args.id);
    }
    let pids = oci::agent(&c.dir)?
        .list_processes(ContainerRequest {
            container_id: args.id.clone(),
        })
        .bounded()
        .await?
        .into_inner()
        .pids;
    if args.format == "json" {
        println!("{}", serde_json::to_string(&pids)?);
    } else {
        println!("PID");
        pids.iter().for_each(|p| println!("{p}"));
    }
    Ok(0)
}
