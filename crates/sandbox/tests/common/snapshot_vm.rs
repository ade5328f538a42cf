//! What the snapshot test and the snapshot benchmark's driver share: a
//! block root made with mkfs.ext4, a sandbox's config, a shell process,
//! the parent sandbox (container `c` on the block root) and execs in it.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use agent_proto::{
    ContainerRequest, CreateContainerRequest, ExecProcessRequest, OutputStream, Process,
    ProcessRequest,
};
use hypervisor::HostVirt;
use podvisor_sandbox::agent::AgentClient;
use podvisor_sandbox::assets::GuestAssets;
use podvisor_sandbox::SandboxConfig;
use podvisor_sandbox::{BlockRoot, Sandbox, IMAGE_SERIAL, LAYER_SERIAL};
use test_utils::{build_dir, busybox_rootfs, StateRoot};

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

/// A sandbox on a block root of busybox, its container `c` running `script`.
pub async fn start_parent(root: &StateRoot, memory_mib: u64, script: &str) -> Sandbox {
    let disks = root.path.join("disks");
    std::fs::create_dir_all(&disks).unwrap();
    let (image, empty) = (disks.join("root.ext4"), disks.join("empty.ext4"));
    mkfs(&image, Some(&busybox_rootfs()));
    mkfs(&empty, None);
    let parent = Sandbox::start(SandboxConfig {
        block_root: Some(BlockRoot { image, empty }),
        ..config(root, "parent", memory_mib)
    })
    .await
    .expect("the parent starts");
    let mut a = parent.agent.clone();
    a.create_container(CreateContainerRequest {
        container_id: "c".into(),
        hostname: "parent".into(),
        process: Some(process(script)),
        block_root: Some(agent_proto::BlockRoot {
            image_serial: IMAGE_SERIAL.into(),
            layer_serial: LAYER_SERIAL.into(),
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    a.start_container(ContainerRequest {
        container_id: "c".into(),
    })
    .await
    .unwrap();
    parent
}

/// Runs `script` in container `c`: (exit code, stdout).
pub async fn sh(c: &AgentClient, eid: &str, script: &str) -> (i32, String) {
    let mut c = c.clone();
    c.exec_process(ExecProcessRequest {
        container_id: "c".into(),
        exec_id: eid.into(),
        process: Some(process(script)),
    })
    .await
    .unwrap_or_else(|s| panic!("exec {eid}: {}", s.message()));
    let mut stream = c
        .read_output(agent_proto::ReadOutputRequest {
            container_id: "c".into(),
            exec_id: eid.into(),
            stream: OutputStream::Stdout as i32,
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        out.extend_from_slice(&chunk.data);
    }
    let status = c
        .wait_process(ProcessRequest {
            container_id: "c".into(),
            exec_id: eid.into(),
        })
        .await
        .unwrap()
        .into_inner();
    (
        status.exit_code,
        String::from_utf8_lossy(&out).trim().to_string(),
    )
}
