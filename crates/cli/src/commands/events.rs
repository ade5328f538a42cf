//! `events`: the container's stats as runc prints them (`--stats` once,
//! else every --interval until the container stops).

use std::path::Path;
use std::time::Duration;

use agent_proto::ContainerRequest;
use anyhow::bail;
use clap::Args;
use sandbox::container::Status;

use super::oci;
use super::oci::Bounded;

#[derive(Args)]
pub struct EventsArgs {
    /// Print stats once and exit.
    #[arg(long)]
    pub stats: bool,
    /// Seconds between stats (5s, 1s or a number).
    #[arg(long, default_value = "5s")]
    pub interval: String,
    pub id: String,
}

pub async fn run(args: EventsArgs, root: &Path) -> anyhow::Result<u8> {
    let secs: u64 = args
        .interval
        .trim_end_matches('s')
        .parse()
        .map_err(|_| anyhow::anyhow!("invalid --interval {:?}", args.interval))?;
    loop {
        let c = oci::open(root, &args.id)?;
        if matches!(c.status, Status::Stopped | Status::Creating) {
            if args.stats {
                bail!("container {} is not running", args.id);
            }
            return Ok(0);
        }
        let s = oci::agent(&c.dir)?
            .stats_container(ContainerRequest {
                container_id: args.id.clone(),
            })
            .bounded()
            .await?
            .into_inner();
        let event = serde_json::json!({
            "type": "stats",
            "id": args.id,
            "data": {
                "cpu": {"usage": {
                    "total": s.cpu_usage_usec.saturating_mul(1000),
                    "user": s.cpu_user_usec.saturating_mul(1000),
                    "kernel": s.cpu_system_usec.saturating_mul(1000),
                }},
                "memory": {
                    "usage": {"usage": s.memory_usage, "limit": s.memory_limit, "max": s.memory_max_usage},
                },
                "pids": {"current": s.pids_current, "limit": s.pids_limit},
            }
        });
        println!("{event}");
        if args.stats {
            return Ok(0);
        }
        tokio::time::sleep(Duration::from_secs(secs.max(1))).await;
    }
}
