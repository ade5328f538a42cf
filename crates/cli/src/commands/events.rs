//! `events`: the container's stats as runc prints them, one JSON object a
//! line (`--stats`: once; else one every --interval, plus an `oom` event when
//! the guest's OOM killer struck, until the container stops).

use std::path::Path;
use std::time::Duration;

use agent_proto::{ContainerRequest, ContainerStats};
use anyhow::bail;
use clap::Args;
use sandbox::container::Status;
use serde::Serialize;

use super::oci;
use super::oci::Bounded;
use crate::go_duration;

#[derive(Args)]
pub struct EventsArgs {
    /// Print stats once and exit.
    #[arg(long)]
    pub stats: bool,
    /// Time between stats, as Go writes durations (5s, 100ms, 1m30s).
    #[arg(long, default_value = "5s", value_parser = go_duration::parse, allow_hyphen_values = true)]
    pub interval: Duration,
    pub id: String,
}

/// runc's `types.Event`, fields in its order.
#[derive(Serialize)]
struct Event<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<Stats>,
}

/// The part of runc's `types.Stats` a guest cgroup gives, in runc's order
/// and with its names and omissions (`omitempty` ones left out when zero).
#[derive(Serialize)]
struct Stats {
    cpu: Cpu,
    memory: Memory,
    pids: Pids,
}

#[derive(Serialize)]
struct Cpu {
    usage: CpuUsage,
}

/// Nanoseconds.
#[derive(Serialize)]
struct CpuUsage {
    #[serde(skip_serializing_if = "is_zero")]
    total: u64,
    kernel: u64,
    user: u64,
}

#[derive(Serialize)]
struct Memory {
    usage: MemoryEntry,
}

#[derive(Serialize)]
struct MemoryEntry {
    limit: u64,
    #[serde(skip_serializing_if = "is_zero")]
    usage: u64,
    #[serde(skip_serializing_if = "is_zero")]
    max: u64,
    failcnt: u64,
}

#[derive(Serialize)]
struct Pids {
    #[serde(skip_serializing_if = "is_zero")]
    current: u64,
    #[serde(skip_serializing_if = "is_zero")]
    limit: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn stats(s: &ContainerStats) -> Stats {
    Stats {
        cpu: Cpu {
            usage: CpuUsage {
                total: s.cpu_usage_usec.saturating_mul(1000),
                kernel: s.cpu_system_usec.saturating_mul(1000),
                user: s.cpu_user_usec.saturating_mul(1000),
            },
        },
        memory: Memory {
            usage: MemoryEntry {
                limit: s.memory_limit,
                usage: s.memory_usage,
                max: s.memory_max_usage,
                failcnt: 0,
            },
        },
        pids: Pids {
            current: s.pids_current,
            limit: s.pids_limit,
        },
    }
}

fn print(event: &Event) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(event)?);
    Ok(())
}

pub async fn run(args: EventsArgs, root: &Path) -> anyhow::Result<u8> {
    if args.interval.is_zero() {
        bail!("duration interval must be greater than 0");
    }
    let c = oci::open(root, &args.id)?;
    if matches!(c.status, Status::Stopped | Status::Creating) {
        bail!("container with id {} is not running", args.id);
    }
    let mut agent = oci::agent(&c.dir)?;
    let request = || ContainerRequest {
        container_id: args.id.clone(),
    };
    if args.stats {
        let s = agent
            .stats_container(request())
            .bounded()
            .await?
            .into_inner();
        print(&Event {
            kind: "stats",
            id: &args.id,
            data: Some(stats(&s)),
        })?;
        return Ok(0);
    }
    // As runc's ticker: the first stats after one interval.
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + args.interval, args.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut oom_kills = None;
    loop {
        tick.tick().await;
        if oci::open(root, &args.id)?.status == Status::Stopped {
            return Ok(0);
        }
        let s = match agent.stats_container(request()).bounded().await {
            Ok(s) => s.into_inner(),
            // The container stopped between the look and the call.
            Err(_) if oci::open(root, &args.id)?.status == Status::Stopped => return Ok(0),
            Err(e) => {
                // runc logs a failed reading and goes on with the next.
                tracing::error!(container = %args.id, "{e:#}");
                continue;
            }
        };
        if oom_kills.is_some_and(|before| s.oom_kills > before) {
            print(&Event {
                kind: "oom",
                id: &args.id,
                data: None,
            })?;
        }
        oom_kills = Some(s.oom_kills);
        print(&Event {
            kind: "stats",
            id: &args.id,
            data: Some(stats(&s)),
        })?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_keep_runcs_names_order_and_omissions() {
        let s = ContainerStats {
            memory_usage: 5,
            memory_limit: 9,
            cpu_usage_usec: 3,
            cpu_user_usec: 2,
            cpu_system_usec: 1,
            pids_current: 4,
            ..Default::default()
        };
        let text = serde_json::to_string(&Event {
            kind: "stats",
            id: "c",
            data: Some(stats(&s)),
        })
        .unwrap();
        assert_eq!(
            text,
            r#"{"type":"stats","id":"c","data":{"cpu":{"usage":{"total":3000,"kernel":1000,"user":2000}},"memory":{"usage":{"limit":9,"usage":5,"failcnt":0}},"pids":{"current":4}}}"#
        );
        let oom = Event {
            kind: "oom",
            id: "c",
            data: None,
        };
        assert_eq!(
            serde_json::to_string(&oom).unwrap(),
            r#"{"type":"oom","id":"c"}"#
        );
    }
}
