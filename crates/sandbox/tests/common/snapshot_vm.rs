//! What the snapshot test and the snapshot benchmark's driver share: a
//! block root made with mkfs.ext4, a sandbox's config, a shell process.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use agent_proto::Process;
use hypervisor::HostVirt;
use podvisor_sandbox::assets::GuestAssets;
use podvisor_sandbox::SandboxConfig;
use test_utils::{build_dir, StateRoot};

pub fn mkfs(image: &Path, tree: Option<&Path>) {
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args(["-q", "-F", "-O", "^has_journal", "-E", "root_owner=0:0"]);
    if let Some(t) = tree {
        cmd.arg("-d").arg(t);
    }
    let out = cmd
        .arg(image)
        .arg("64M")
        .output()
        .expect("mkfs.ext4 (e2fsprogs)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn config(root: &StateRoot, id: &str, memory_mib: u64) -> SandboxConfig {
    let dir = build_dir();
    SandboxConfig {
        cpu_millis: None,
        cgroup: None,
        id: id.into(),
        root: root.path.clone(),
        memory_mib,
        vcpus: 1,
        assets: GuestAssets {
            kernel: dir.join("vmlinux"),
            initrd: dir.join("podvisor-initrd.cpio"),
        },
        accel: HostVirt::detect().default_accel(),
        nics: Vec::new(),
        shares: Vec::new(),
        hostname: id.into(),
        boot_timeout: Duration::from_secs(120),
        template: None,
        block_root: None,
    }
}

pub fn process(script: &str) -> Process {
    Process {
        args: vec!["sh".into(), "-c".into(), script.into()],
        env: vec!["PATH=/bin:/sbin:/usr/bin".into()],
        cwd: "/".into(),
        ..Default::default()
    }
}
