//! `update`: change the container's memory, CPU and pids limits (its guest
//! cgroup). The VM's own size is fixed at create: a limit above it is
//! accepted but the guest cannot give more than the VM has.

use std::io::Read;
use std::path::{Path, PathBuf};

use agent_proto::UpdateContainerRequest;
use anyhow::{bail, Context};
use clap::Args;
use sandbox::container::Status;

use super::oci;
use super::oci::Bounded;

#[derive(Args)]
pub struct UpdateArgs {
    /// A JSON file (or - for stdin) with OCI linux.resources.
    #[arg(short, long)]
    pub resources: Option<PathBuf>,
    /// Memory limit in bytes (k, m, g suffixes allowed).
    #[arg(short, long)]
    pub memory: Option<String>,
    #[arg(long)]
    pub cpu_quota: Option<i64>,
    #[arg(long)]
    pub cpu_period: Option<u64>,
    #[arg(long)]
    pub pids_limit: Option<i64>,
    /// Accepted for runc compatibility (no swap in the guest).
    #[arg(long)]
    pub memory_swap: Option<String>,
    #[arg(long)]
    pub memory_reservation: Option<String>,
    #[arg(long)]
    pub cpu_share: Option<u64>,
    #[arg(long)]
    pub cpuset_cpus: Option<String>,
    #[arg(long)]
    pub cpuset_mems: Option<String>,
    pub id: String,
}

fn parse_bytes(s: &str) -> anyhow::Result<i64> {
    let lower = s.to_ascii_lowercase();
    let t = lower.trim_end_matches('b');
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1i64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let n: i64 = num.parse().with_context(|| format!("invalid size {s:?}"))?;
    Ok(n * mult)
}

pub async fn run(args: UpdateArgs, root: &Path) -> anyhow::Result<u8> {
    let mut res = agent_proto::Resources::default();
    if let Some(path) = &args.resources {
        let mut text = Vec::new();
        if path.as_os_str() == "-" {
            std::io::stdin().read_to_end(&mut text)?;
        } else {
            text = std::fs::read(path).with_context(|| format!("open {}", path.display()))?;
        }
        let r: sandbox::oci::Resources =
            serde_json::from_slice(&text).context("parsing the resources")?;
        res = r.to_agent();
    }
    if let Some(m) = &args.memory {
        res.memory_limit = parse_bytes(m)?;
    }
    if let Some(q) = args.cpu_quota {
        res.cpu_quota = q;
    }
    if let Some(p) = args.cpu_period {
        res.cpu_period = p;
    }
    if let Some(p) = args.pids_limit {
        res.pids_limit = p;
    }
    let c = oci::open(root, &args.id)?;
    if matches!(c.status, Status::Stopped | Status::Creating) {
        bail!("container {} is not running", args.id);
    }
    oci::agent(&c.dir)?
        .update_container(UpdateContainerRequest {
            container_id: args.id.clone(),
            resources: Some(res),
        })
        .bounded()
        .await?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes() {
        assert_eq!(super::parse_bytes("256m").unwrap(), 256 << 20);
        assert_eq!(super::parse_bytes("1G").unwrap(), 1 << 30);
        assert_eq!(super::parse_bytes("4096").unwrap(), 4096);
        assert!(super::parse_bytes("lots").is_err());
    }
}
