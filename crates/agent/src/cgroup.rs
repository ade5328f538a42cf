//! Container cgroups (v2) inside the guest: one directory per container under
//! the root, limits written from `Resources`, stats read back.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use agent_proto::{ContainerStats, Resources};

pub const ROOT: &str = "/sys/fs/cgroup";

/// Turns on the controllers containers use. Called once at boot.
pub fn enable_controllers() -> io::Result<()> {
    fs::write(
        Path::new(ROOT).join("cgroup.subtree_control"),
        "+cpu +memory +pids",
    )
}

pub fn path(container_id: &str) -> PathBuf {
    Path::new(ROOT).join(format!("podvisor-{container_id}"))
}

pub fn create(dir: &Path, res: Option<&Resources>) -> io::Result<()> {
    fs::create_dir(dir)?;
    if let Some(res) = res {
        apply(dir, res)?;
    }
    Ok(())
}

pub fn apply(dir: &Path, res: &Resources) -> io::Result<()> {
    if res.memory_limit > 0 {
        fs::write(dir.join("memory.max"), res.memory_limit.to_string())?;
        // Without swap in the guest a container over its limit is OOM-killed.
        let _ = fs::write(dir.join("memory.swap.max"), "0");
    }
    if res.cpu_quota > 0 {
        let period = if res.cpu_period > 0 {
            res.cpu_period
        } else {
            100_000
        };
        fs::write(dir.join("cpu.max"), format!("{} {period}", res.cpu_quota))?;
    }
    if res.pids_limit > 0 {
        fs::write(dir.join("pids.max"), res.pids_limit.to_string())?;
    }
    Ok(())
}

pub fn pids(dir: &Path) -> Vec<u32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Freezes (or thaws) the cgroup and waits until the kernel says it is done.
pub fn freeze(dir: &Path, frozen: bool) -> io::Result<()> {
    fs::write(dir.join("cgroup.freeze"), if frozen { "1" } else { "0" })?;
    let want = if frozen { "frozen 1" } else { "frozen 0" };
    for _ in 0..500 {
        let events = fs::read_to_string(dir.join("cgroup.events"))?;
        if events.lines().any(|l| l == want) {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        "the cgroup did not settle",
    ))
}

/// SIGKILLs every process in the cgroup at once.
pub fn kill_all(dir: &Path) -> io::Result<()> {
    fs::write(dir.join("cgroup.kill"), "1")
}

/// Removes the directory, waiting a little for the last processes to go.
pub fn remove(dir: &Path) -> io::Result<()> {
    let mut last = Ok(());
    for _ in 0..100 {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => last = Err(e),
        }
        let _ = kill_all(dir);
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    last
}

fn read_u64(dir: &Path, file: &str) -> u64 {
    fs::read_to_string(dir.join(file))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn keyed(dir: &Path, file: &str, key: &str) -> u64 {
    fs::read_to_string(dir.join(file))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0)
}

pub fn stats(dir: &Path) -> ContainerStats {
    ContainerStats {
        memory_usage: read_u64(dir, "memory.current"),
        // "max" does not parse and reads as 0: unlimited.
        memory_limit: read_u64(dir, "memory.max"),
        memory_max_usage: read_u64(dir, "memory.peak"),
        cpu_usage_usec: keyed(dir, "cpu.stat", "usage_usec"),
        cpu_user_usec: keyed(dir, "cpu.stat", "user_usec"),
        cpu_system_usec: keyed(dir, "cpu.stat", "system_usec"),
        pids_current: read_u64(dir, "pids.current"),
        pids_limit: read_u64(dir, "pids.max"),
        oom_kills: keyed(dir, "memory.events", "oom_kill"),
    }
}
