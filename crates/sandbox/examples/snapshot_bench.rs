//! The driver of `bench/snapshot.py`: one run of snapshot (pause), resume
//! and fork against real VMs, printed as one JSON line. Not a benchmark by
//! itself: the script repeats it, takes medians and prints the floor.
//!
//! snapshot_bench MEMORY_MIB TOUCH_MIB FORKS

use std::path::Path;
use std::time::Instant;

use hypervisor::HostVirt;
use podvisor_sandbox::template::Template;
use podvisor_sandbox::{Sandbox, SandboxConfig};
use test_utils::StateRoot;

#[path = "../tests/common/snapshot_vm.rs"]
mod snapshot_vm;
use snapshot_vm::{config, sh, start_parent};

/// The VMM's proportional set size, in KiB.
fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("MEMORY_MIB TOUCH_MIB FORKS"))
        .collect();
    let [memory, touch, forks] = args[..] else {
        panic!("usage: snapshot_bench MEMORY_MIB TOUCH_MIB FORKS");
    };
    let root = StateRoot::new("snapshot-bench");
    let mut parent = start_parent(&root, memory, "while :; do sleep 1; done").await;
    let a = parent.agent.clone();
    // Guest memory touched: random bytes in a tmpfs of the guest.
    let fill = format!(
        "mkdir -p /fill && mount -t tmpfs -o size={}m fill /fill && \
         head -c {touch}m /dev/urandom > /fill/bytes",
        touch + 8
    );
    assert_eq!(sh(&a, "fill", &fill).await.0, 0, "filling guest memory");
    let parent_pss = pss_kib(parent.vmm_pid());

    let t0 = Instant::now();
    let snap = parent
        .snapshot(&root.path, "snap", false)
        .await
        .expect("snapshot");
    let pause_ms = t0.elapsed().as_secs_f64() * 1e3;
    parent.destroy().await;
    let allocated = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0)
    };
    let snapshot_bytes: u64 = [snap.memory(), snap.state(), snap.layer()]
        .iter()
        .map(|p| allocated(p))
        .sum();

    // Resume: a clone of the snapshot, to its first exec.
    let t0 = Instant::now();
    let resumed = Sandbox::start(SandboxConfig {
        template: Some(Template::open(&root.path, "snap").expect("opens")),
        ..config(&root, "resumed", memory)
    })
    .await
    .expect("resume");
    assert!(resumed.fallback.is_none(), "{:?}", resumed.fallback);
    assert_eq!(sh(&resumed.agent, "first", "true").await.0, 0);
    let resume_ms = t0.elapsed().as_secs_f64() * 1e3;
    assert_eq!(
        sh(
            &resumed.agent,
            "check",
            &format!("test $(wc -c < /fill/bytes) -eq {}", touch << 20)
        )
        .await
        .0,
        0,
        "the touched memory did not survive"
    );
    resumed.destroy().await;

    // Fork N: all alive together, then each one's PSS.
    let t0 = Instant::now();
    let mut alive = Vec::new();
    for i in 0..forks {
        let f = Sandbox::start(SandboxConfig {
            template: Some(Template::open(&root.path, "snap").expect("opens")),
            ..config(&root, &format!("fork{i}"), memory)
        })
        .await
        .expect("fork");
        assert_eq!(sh(&f.agent, "ready", "true").await.0, 0);
        alive.push(f);
    }
    let forks_ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut pss: Vec<u64> = alive.iter().map(|f| pss_kib(f.vmm_pid())).collect();
    pss.sort();
    let fork_pss = pss.get(pss.len() / 2).copied().unwrap_or(0);
    for f in alive {
        f.destroy().await;
    }
    Template::remove(&root.path, "snap").unwrap();
    println!(
        "{}",
        serde_json::json!({
            "accel": HostVirt::detect().default_accel().to_string(),
            "memory_mib": memory, "touch_mib": touch, "forks": forks,
            "pause_ms": pause_ms, "resume_ms": resume_ms,
            "snapshot_bytes": snapshot_bytes, "forks_ms": forks_ms,
            "parent_pss_kib": parent_pss, "fork_pss_kib": fork_pss,
        })
    );
}
