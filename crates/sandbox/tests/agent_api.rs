//! The agent's RPC surface, driven through the sandbox manager against one
//! real VM: containers, execs, signals, stdio, tty, cgroup limits and stats.

use std::time::Duration;

use agent_proto::{
    ConsoleSize, ContainerRequest, CreateContainerRequest, ExecProcessRequest, OutputStream,
    Process, ProcessRequest, ResizeTtyRequest, Resources, SignalProcessRequest,
    UpdateContainerRequest,
};
use hypervisor::{HostVirt, Share};
use podvisor_sandbox::agent::AgentClient;
use podvisor_sandbox::assets::GuestAssets;
use podvisor_sandbox::{Sandbox, SandboxConfig};
use test_utils::{build_dir, busybox_rootfs, StateRoot};
use tonic::Code;

fn process(args: &[&str], terminal: bool) -> Process {
    Process {
        args: args.iter().map(|s| s.to_string()).collect(),
        env: vec!["PATH=/bin:/sbin:/usr/bin".into()],
        cwd: "/".into(),
        user: None,
        terminal,
        console_size: terminal.then_some(ConsoleSize { rows: 24, cols: 80 }),
        rlimits: Vec::new(),
        no_new_privileges: false,
        capabilities: None,
        ..Default::default()
    }
}

async fn start_sandbox(root: &StateRoot) -> Sandbox {
    let dir = build_dir();
    Sandbox::start(SandboxConfig {
        cpu_millis: None,
        cgroup: None,
        id: "api".into(),
        root: root.path.clone(),
        memory_mib: 256,
        vcpus: 1,
        assets: GuestAssets {
            kernel: dir.join("vmlinux"),
            initrd: dir.join("podvisor-initrd.cpio"),
        },
        accel: HostVirt::detect().default_accel(),
        nics: Vec::new(),
        shares: vec![Share {
            tag: "rootfs".into(),
            path: busybox_rootfs(),
            readonly: false,
        }],
        hostname: "api".into(),
        boot_timeout: Duration::from_secs(120),
        template: None,
        block_root: None,
    })
    .await
    .expect("sandbox starts")
}

async fn exec_start(c: &mut AgentClient, cid: &str, eid: &str, p: Process) {
    c.exec_process(ExecProcessRequest {
        container_id: cid.into(),
        exec_id: eid.into(),
        process: Some(p),
    })
    .await
    .unwrap_or_else(|s| panic!("exec {eid}: {}", s.message()));
}

/// Reads a process's stdout to EOF.
async fn read_all(c: &AgentClient, cid: &str, eid: &str) -> String {
    let mut stream = c
        .clone()
        .read_output(agent_proto::ReadOutputRequest {
            container_id: cid.into(),
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
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads stdout to EOF, then waits: (exit code, stdout).
async fn collect(c: &mut AgentClient, cid: &str, eid: &str) -> (i32, String) {
    let out = read_all(c, cid, eid).await;
    let status = c
        .wait_process(ProcessRequest {
            container_id: cid.into(),
            exec_id: eid.into(),
        })
        .await
        .unwrap()
        .into_inner();
    (status.exit_code, out)
}

async fn exec_output(c: &mut AgentClient, cid: &str, eid: &str, p: Process) -> (i32, String) {
    exec_start(c, cid, eid, p).await;
    collect(c, cid, eid).await
}

#[tokio::test(flavor = "current_thread")]
async fn agent_api_end_to_end() {
    let root = StateRoot::new("agent-api");
    let sb = start_sandbox(&root).await;
    let mut c = sb.agent.clone();
    let cid = "c1";
    let create = CreateContainerRequest {
        container_id: cid.into(),
        rootfs_tag: "rootfs".into(),
        rootfs_subpath: String::new(),
        rootfs_readonly: false,
        hostname: "c1host".into(),
        process: Some(process(
            &[
                "sh",
                "-c",
                "trap 'exit 7' TERM; echo started; while :; do sleep 1; done",
            ],
            false,
        )),
        resources: Some(Resources {
            memory_limit: 64 << 20,
            pids_limit: 50,
            ..Default::default()
        }),
        ..Default::default()
    };
    c.create_container(create.clone()).await.unwrap();
    let dup = c.create_container(create).await.unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists);
    let mut first = c
        .read_output(agent_proto::ReadOutputRequest {
            container_id: cid.into(),
            exec_id: String::new(),
            stream: OutputStream::Stdout as i32,
        })
        .await
        .unwrap()
        .into_inner();
    let req = ContainerRequest {
        container_id: cid.into(),
    };
    c.start_container(req.clone()).await.unwrap();
    assert_eq!(
        c.start_container(req.clone()).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    assert_eq!(first.message().await.unwrap().unwrap().data, b"started\n");

    // Limits are the container's cgroup, seen from inside.
    let (code, out) = exec_output(
        &mut c,
        cid,
        "e1",
        process(
            &[
                "cat",
                "/sys/fs/cgroup/memory.max",
                "/sys/fs/cgroup/pids.max",
            ],
            false,
        ),
    )
    .await;
    assert_eq!((code, out.as_str()), (0, "67108864\n50\n"));
    let (_, out) = exec_output(&mut c, cid, "e2", process(&["hostname"], false)).await;
    assert_eq!(out, "c1host\n");

    // User, additional groups and rlimits of an exec.
    let mut p = process(
        &["sh", "-c", "id -u; id -g; id -G; ulimit -n; ulimit -Hn"],
        false,
    );
    p.user = Some(agent_proto::User {
        uid: 1000,
        gid: 1000,
        additional_gids: vec![27, 100],
    });
    p.rlimits = vec![agent_proto::Rlimit {
        r#type: "RLIMIT_NOFILE".into(),
        hard: 2048,
        soft: 1234,
    }];
    let (code, out) = exec_output(&mut c, cid, "ids", p).await;
    assert_eq!(
        (code, out.as_str()),
        (0, "1000\n1000\n1000 27 100\n1234\n2048\n")
    );
    let mut p = process(&["true"], false);
    p.rlimits = vec![agent_proto::Rlimit {
        r#type: "RLIMIT_BOGUS".into(),
        hard: 1,
        soft: 1,
    }];
    let err = c
        .exec_process(ExecProcessRequest {
            container_id: cid.into(),
            exec_id: "bogus".into(),
            process: Some(p),
        })
        .await
        .unwrap_err();
    assert!(
        err.message().contains("unknown rlimit"),
        "{}",
        err.message()
    );

    // An exec shares the container's pid namespace: it sees the first process as PID 1.
    let (_, out) = exec_output(
        &mut c,
        cid,
        "e3",
        process(&["sh", "-c", "cat /proc/1/cmdline | tr '\\0' ' '"], false),
    )
    .await;
    assert!(out.starts_with("sh -c trap"), "{out:?}");

    // A tty exec, resized while it runs.
    exec_start(
        &mut c,
        cid,
        "e4",
        process(&["sh", "-c", "tty; sleep 2; stty size"], true),
    )
    .await;
    c.resize_tty(ResizeTtyRequest {
        container_id: cid.into(),
        exec_id: "e4".into(),
        rows: 40,
        cols: 120,
    })
    .await
    .unwrap();
    let (code, out) = collect(&mut c, cid, "e4").await;
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    assert!(lines[0].starts_with("/dev/pts/"), "{out:?}");
    assert_eq!(lines[1], "40 120");

    // Stdin into an exec, closed at EOF.
    exec_start(&mut c, cid, "e6", process(&["wc", "-c"], false)).await;
    let out = tokio::spawn({
        let c = c.clone();
        async move { read_all(&c, "c1", "e6").await }
    });
    podvisor_sandbox::io::relay_stdin(c.clone(), cid.into(), "e6".into(), &[7u8; 100_000][..])
        .await
        .unwrap();
    assert_eq!(out.await.unwrap().trim(), "100000");

    // Bad requests.
    let err = c
        .exec_process(ExecProcessRequest {
            container_id: cid.into(),
            exec_id: "e7".into(),
            process: Some(process(&["/no/such/binary"], false)),
        })
        .await
        .unwrap_err();
    assert!(
        err.message().contains("executable file not found"),
        "{}",
        err.message()
    );
    let err = c
        .exec_process(ExecProcessRequest {
            container_id: "nope".into(),
            exec_id: "e8".into(),
            process: Some(process(&["true"], false)),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = c
        .create_container(CreateContainerRequest {
            container_id: "../escape".into(),
            rootfs_tag: "rootfs".into(),
            process: Some(process(&["true"], false)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c
        .create_container(CreateContainerRequest {
            container_id: "c9".into(),
            rootfs_tag: "no-such-tag".into(),
            process: Some(process(&["true"], false)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("no-such-tag"), "{}", err.message());
    let err = c
        .create_container(CreateContainerRequest {
            container_id: "c9".into(),
            rootfs_tag: "rootfs".into(),
            rootfs_subpath: "../..".into(),
            process: Some(process(&["true"], false)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        err.message().contains("invalid rootfs subpath"),
        "{}",
        err.message()
    );

    // Processes, stats and a live limit change.
    let pids = c
        .list_processes(req.clone())
        .await
        .unwrap()
        .into_inner()
        .pids;
    assert!(pids.len() >= 2, "sh and sleep at least: {pids:?}");
    let stats = c.stats_container(req.clone()).await.unwrap().into_inner();
    assert_eq!(stats.memory_limit, 64 << 20);
    assert!(
        stats.memory_usage > 0 && stats.pids_current >= 2,
        "{stats:?}"
    );
    c.update_container(UpdateContainerRequest {
        container_id: cid.into(),
        resources: Some(Resources {
            memory_limit: 128 << 20,
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    let (_, out) = exec_output(
        &mut c,
        cid,
        "e9",
        process(&["cat", "/sys/fs/cgroup/memory.max"], false),
    )
    .await;
    assert_eq!(out, "134217728\n");

    // A second container in the same VM, read-only root.
    c.create_container(CreateContainerRequest {
        container_id: "c2".into(),
        rootfs_tag: "rootfs".into(),
        rootfs_subpath: String::new(),
        rootfs_readonly: true,
        hostname: "c2host".into(),
        process: Some(process(
            &[
                "sh",
                "-c",
                "hostname; touch /x 2>/dev/null && echo writable || echo read-only",
            ],
            false,
        )),
        resources: None,
        ..Default::default()
    })
    .await
    .unwrap();
    let out2 = tokio::spawn({
        let c = c.clone();
        async move { read_all(&c, "c2", "").await }
    });
    c.start_container(ContainerRequest {
        container_id: "c2".into(),
    })
    .await
    .unwrap();
    assert_eq!(out2.await.unwrap(), "c2host\nread-only\n");

    // SIGTERM reaches the trap; the exit code comes back.
    c.signal_process(SignalProcessRequest {
        container_id: cid.into(),
        exec_id: String::new(),
        signal: 15,
        all: false,
    })
    .await
    .unwrap();
    let status = c
        .wait_process(ProcessRequest {
            container_id: cid.into(),
            exec_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((status.exit_code, status.signal), (7, 0));
    let err = c
        .exec_process(ExecProcessRequest {
            container_id: cid.into(),
            exec_id: "e10".into(),
            process: Some(process(&["true"], false)),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    for id in ["c1", "c2"] {
        c.remove_container(ContainerRequest {
            container_id: id.into(),
        })
        .await
        .unwrap();
    }
    assert_eq!(
        c.stats_container(req).await.unwrap_err().code(),
        Code::NotFound
    );
    sb.destroy().await;
}
