//! Snapshots of running sandboxes, against real VMs: a sandbox on an
//! image's block root is saved whole while its process counts, runs on,
//! and two forks carry on from the snapshot with memory and disk of their
//! own. A truncated or altered snapshot is refused; a 9p-rooted sandbox
//! cannot be saved and keeps running.

use std::path::PathBuf;
use std::time::Duration;

use agent_proto::{ContainerRequest, CreateContainerRequest};
use hypervisor::Share;
use podvisor_sandbox::agent::AgentClient;
use podvisor_sandbox::template::Template;
use podvisor_sandbox::{Sandbox, SandboxConfig};
use test_utils::{busybox_rootfs, StateRoot};

mod common;
use common::snapshot_vm::{config as config_mib, process, sh, start_parent};

fn config(root: &StateRoot, id: &str) -> SandboxConfig {
    config_mib(root, id, 256)
}

const COUNTER: &str =
    "i=0; echo parent > /who; while :; do i=$((i+1)); echo $i > /count; sleep 0.1; done";

async fn count(c: &AgentClient, eid: &str) -> u64 {
    let (code, out) = sh(c, eid, "cat /count").await;
    assert_eq!(code, 0, "{out}");
    out.parse().unwrap_or_else(|_| panic!("count {out:?}"))
}

#[tokio::test(flavor = "current_thread")]
async fn a_running_sandbox_is_snapshotted_and_forked_with_its_memory_and_disk() {
    let root = StateRoot::new("snapshot");
    let mut parent = start_parent(&root, 256, COUNTER).await;
    let pa = parent.agent.clone();
    let mut n = 0;
    for i in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (_, out) = sh(&pa, &format!("w{i}"), "cat /count 2>/dev/null").await;
        n = out.parse().unwrap_or(0);
        if n >= 3 {
            break;
        }
    }
    assert!(n >= 3, "the counter never ran");
    // A jailed QEMU writes no file larger than its RAM (or its 64 MiB
    // disk) and slack: a QEMU the guest took over cannot fill the host's
    // disk through the snapshot's file.
    if podvisor_sandbox::jail_enabled() {
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", parent.vmm_pid())).unwrap();
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max file size"))
            .unwrap();
        let cap: u64 = line.split_whitespace().nth(3).unwrap().parse().unwrap_or(0);
        assert!(
            (256 << 20..=(256 + 256) << 20).contains(&cap),
            "QEMU's file size cap: {line}"
        );
    }

    // Saved whole, the parent running on.
    let t0 = std::time::Instant::now();
    let snap = parent
        .snapshot(&root.path, "snap", true)
        .await
        .expect("snapshot");
    eprintln!(
        "snapshot of a 256 MiB guest: {} ms",
        t0.elapsed().as_millis()
    );
    assert!(snap.meta.snapshot && snap.meta.memory_offset.is_multiple_of(4096));
    let at_snapshot = count(&pa, "p1").await;
    assert!(
        at_snapshot >= n,
        "parent's count went back: {at_snapshot} < {n}"
    );

    // Two forks: each carries on from the snapshot's count (not from 1),
    // then writes its own file, which no one else sees.
    let mut forks = Vec::new();
    for id in ["fork1", "fork2"] {
        let t = Template::open(&root.path, "snap").expect("the snapshot opens");
        let t0 = std::time::Instant::now();
        let f = Sandbox::start(SandboxConfig {
            template: Some(t),
            ..config(&root, id)
        })
        .await
        .expect("a fork starts");
        assert!(f.fallback.is_none(), "{:?}", f.fallback);
        assert_eq!(f.cloned_from.as_deref(), Some("snap"));
        eprintln!("{id} ready in {} ms", t0.elapsed().as_millis());
        forks.push(f);
    }
    for (i, f) in forks.iter().enumerate() {
        let first = count(&f.agent, "f1").await;
        assert!(first >= n, "fork {i} restarted its count: {first} < {n}");
        tokio::time::sleep(Duration::from_millis(600)).await;
        let later = count(&f.agent, "f2").await;
        assert!(later > first, "fork {i}'s process is not running");
        let (_, who) = sh(&f.agent, "f3", "cat /who").await;
        assert_eq!(who, "parent");
        let (code, _) = sh(&f.agent, "f4", &format!("echo {i} > /mine")).await;
        assert_eq!(code, 0);
    }
    let mut random = Vec::new();
    for (i, f) in forks.iter().enumerate() {
        let (_, mine) = sh(&f.agent, "f5", "cat /mine").await;
        assert_eq!(mine, i.to_string(), "fork {i} reads another's write");
        // Reseeded at resume: the forks' random streams differ.
        let (_, r) = sh(&f.agent, "f6", "head -c 16 /dev/urandom | od -An -tx1").await;
        random.push(r);
    }
    assert_ne!(random[0], random[1], "two forks share their random state");
    let (code, _) = sh(&pa, "p2", "test -e /mine").await;
    assert_ne!(code, 0, "the parent sees a fork's write");
    assert!(count(&pa, "p3").await > at_snapshot, "the parent stopped");

    // A snapshot that is not whole is refused.
    let memory = snap.memory();
    let len = std::fs::metadata(&memory).unwrap().len();
    let keep = root.path.join("memory.whole");
    std::fs::copy(&memory, &keep).unwrap();
    let set_len = |p: &PathBuf, l: u64| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(p)
            .unwrap()
            .set_len(l)
            .unwrap();
    };
    for cut in [len - 4096, snap.meta.memory_offset + (1 << 20)] {
        set_len(&memory, cut);
        let e = Template::open(&root.path, "snap").unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
    }
    std::fs::rename(&keep, &memory).unwrap();
    let state = snap.state();
    let mut bytes = std::fs::read(&state).unwrap();
    let last = bytes.len() - 10;
    bytes[last] ^= 0xff;
    set_len(&state, 0);
    std::fs::write(&state, &bytes).unwrap();
    let e = Template::open(&root.path, "snap").unwrap_err().to_string();
    assert!(e.contains("checksum"), "{e}");
    let damaged = Template {
        dir: snap.dir.clone(),
        meta: snap.meta.clone(),
    };
    let f = Sandbox::start(SandboxConfig {
        template: Some(damaged),
        ..config(&root, "fork3")
    })
    .await;
    // Either refused or booted cold: never half-resumed from it.
    if let Ok(f) = f {
        assert!(f.fallback.is_some(), "a damaged snapshot was resumed");
        f.destroy().await;
    }

    for f in forks {
        f.destroy().await;
    }
    parent.destroy().await;
    Template::remove(&root.path, "snap").unwrap();
    assert!(
        !root
            .path
            .join("templates")
            .read_dir()
            .unwrap()
            .any(|_| true),
        "snapshot left files behind"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_sandbox_rooted_on_9p_is_refused_and_keeps_running() {
    let root = StateRoot::new("snapshot-9p");
    let mut sb = Sandbox::start(SandboxConfig {
        shares: vec![Share {
            tag: "rootfs".into(),
            path: busybox_rootfs(),
            readonly: true,
        }],
        ..config(&root, "ninep")
    })
    .await
    .expect("starts");
    let a = sb.agent.clone();
    a.clone()
        .create_container(CreateContainerRequest {
            container_id: "c".into(),
            rootfs_tag: "rootfs".into(),
            rootfs_overlay: true,
            hostname: "ninep".into(),
            process: Some(process("while :; do sleep 1; done")),
            ..Default::default()
        })
        .await
        .unwrap();
    a.clone()
        .start_container(ContainerRequest {
            container_id: "c".into(),
        })
        .await
        .unwrap();
    let e = sb
        .snapshot(&root.path, "nope", false)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("9p"), "{e}");
    let (code, out) = sh(&a, "e1", "echo alive").await;
    assert_eq!((code, out.as_str()), (0, "alive"));
    assert!(Template::open(&root.path, "nope").is_err());
    let left: Vec<_> = std::fs::read_dir(root.path.join("templates"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "a failed snapshot left {left:?}");
    sb.destroy().await;
}
