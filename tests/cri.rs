//! Kubernetes' view: containerd 1.6's CRI plugin (started by the test, CNI
//! bridge networking) with the runtime handler "podvisor", driven over the
//! CRI gRPC API as kubelet drives it. One pod is one VM with its containers
//! inside; pods reach each other by pod IP.

use std::time::{Duration, Instant};

use k8s_cri::v1::{
    AttachRequest, ContainerConfig, ContainerFilter, ContainerMetadata, ContainerState,
    ContainerStatus, ContainerStatusRequest, CreateContainerRequest, ExecRequest, ExecSyncRequest,
    ImageSpec, LinuxContainerConfig, LinuxContainerResources, LinuxPodSandboxConfig,
    LinuxSandboxSecurityContext, ListContainersRequest, NamespaceMode, NamespaceOption,
    PodSandboxConfig, PodSandboxState, PodSandboxStatus, PodSandboxStatusRequest,
    RunPodSandboxRequest, StartContainerRequest, StopPodSandboxRequest,
    UpdateContainerResourcesRequest,
};
use podvisor_client_tests::cri::{self, connect, Cri};
use podvisor_client_tests::{
    cmdline, owner, parent, pids, shim_of, Containerd, PoolDaemon, Scratch,
};

const IMAGE: &str = "localhost/busybox:latest";

fn pod_config(name: &str, logs: &std::path::Path) -> PodSandboxConfig {
    cri::pod_config(name, "default", logs)
}

async fn run_pod(cri: &mut Cri, config: &PodSandboxConfig) -> String {
    cri.run_pod_sandbox(RunPodSandboxRequest {
        config: Some(config.clone()),
        runtime_handler: "podvisor".into(),
    })
    .await
    .expect("RunPodSandbox")
    .into_inner()
    .pod_sandbox_id
}

fn container(name: &str, command: &[&str]) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: IMAGE.into(),
            ..Default::default()
        }),
        command: command.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        ..Default::default()
    }
}

async fn start_container(
    cri: &mut Cri,
    pod: &str,
    pod_config: &PodSandboxConfig,
    name: &str,
    command: &[&str],
) -> String {
    start_configured(cri, pod, pod_config, container(name, command)).await
}

async fn start_configured(
    cri: &mut Cri,
    pod: &str,
    pod_config: &PodSandboxConfig,
    config: ContainerConfig,
) -> String {
    let name = config
        .metadata
        .as_ref()
        .map(|m| m.name.clone())
        .unwrap_or_default();
    let id = cri
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(config),
            sandbox_config: Some(pod_config.clone()),
        })
        .await
        .unwrap_or_else(|s| panic!("CreateContainer {name}: {s}"))
        .into_inner()
        .container_id;
    cri.start_container(StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .unwrap_or_else(|s| panic!("StartContainer {name}: {s}"));
    id
}

async fn container_status(cri: &mut Cri, id: &str) -> ContainerStatus {
    cri.container_status(ContainerStatusRequest {
        container_id: id.into(),
        verbose: false,
    })
    .await
    .expect("ContainerStatus")
    .into_inner()
    .status
    .expect("a container status")
}

async fn pod_status(cri: &mut Cri, pod: &str) -> PodSandboxStatus {
    cri.pod_sandbox_status(PodSandboxStatusRequest {
        pod_sandbox_id: pod.into(),
        verbose: false,
    })
    .await
    .expect("PodSandboxStatus")
    .into_inner()
    .status
    .expect("a pod status")
}

async fn exec_sync(cri: &mut Cri, id: &str, cmd: &[&str]) -> (i32, String) {
    let r = cri
        .exec_sync(ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: 60,
        })
        .await
        .unwrap_or_else(|s| panic!("ExecSync {cmd:?}: {s}"))
        .into_inner();
    (
        r.exit_code,
        String::from_utf8_lossy(&r.stdout).into_owned() + &String::from_utf8_lossy(&r.stderr),
    )
}

/// The QEMU processes of `pod`'s shim (started `-id POD`): their parent is
/// a VM supervisor that shim started.
fn vms_pids(pod: &str) -> Vec<String> {
    pids()
        .into_iter()
        .filter(|p| {
            cmdline(p)
                .split(' ')
                .next()
                .is_some_and(|a| a.contains("qemu-system"))
        })
        .filter(|p| {
            let supervisor = parent(p);
            let shim = cmdline(&owner(&supervisor));
            cmdline(&supervisor).contains("--podvisor-vm-supervisor")
                && shim.contains("containerd-shim-podvisor-v2")
                && shim.contains(pod)
        })
        .collect()
}

fn vms_of(pod: &str) -> usize {
    vms_pids(pod).len()
}

async fn eventually<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_pod_is_one_vm_with_two_containers_that_share_its_network() {
    let c = Containerd::start_with_subnet("10.88.91.0/24");
    c.import_busybox("k8s.io");
    let logs = Scratch::new("cri-logs");
    let mut cri = connect(c.socket()).await;

    let web = pod_config("web", &logs.0);
    let pod = run_pod(&mut cri, &web).await;
    assert_eq!(vms_of(&pod), 1, "one VM for the pod");
    let a = start_container(
        &mut cri,
        &pod,
        &web,
        "server",
        &[
            "sh",
            "-c",
            "echo serving-on-8080; mkdir -p /www && echo hello-from-a > /www/index.html && exec httpd -f -p 8080 -h /www",
        ],
    )
    .await;
    let b = start_container(&mut cri, &pod, &web, "client", &["sleep", "3600"]).await;
    assert_eq!(vms_of(&pod), 1, "still one VM with two containers");

    // ExecSync in each; each has its own root, both the pod's hostname.
    let (code, out) = exec_sync(&mut cri, &a, &["sh", "-c", "hostname; ls /www"]).await;
    assert_eq!((code, out.as_str()), (0, "web\nindex.html\n"));
    let (code, out) = exec_sync(
        &mut cri,
        &b,
        &["sh", "-c", "hostname; ls /www 2>&1; exit 3"],
    )
    .await;
    assert_eq!(code, 3, "{out}");
    assert!(
        out.starts_with("web\n") && out.contains("No such file"),
        "{out}"
    );

    // B reaches A on localhost: one network namespace for the pod.
    let mut fetched = String::new();
    for _ in 0..50 {
        let (code, out) =
            exec_sync(&mut cri, &b, &["wget", "-qO-", "http://127.0.0.1:8080/"]).await;
        fetched = out;
        if code == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(fetched, "hello-from-a\n");

    // Statuses and the pod's IP.
    for id in [&a, &b] {
        let s = container_status(&mut cri, id).await;
        assert_eq!(s.state, ContainerState::ContainerRunning as i32, "{s:?}");
    }
    let listed = cri
        .list_containers(ListContainersRequest {
            filter: Some(ContainerFilter {
                pod_sandbox_id: pod.clone(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .containers;
    assert_eq!(listed.len(), 2, "{listed:?}");
    let status = pod_status(&mut cri, &pod).await;
    assert_eq!(status.state, PodSandboxState::SandboxReady as i32);
    let ip = status.network.map(|n| n.ip).unwrap_or_default();
    assert!(ip.starts_with("10.88.91."), "pod IP {ip:?}");
    let (_, guest_ip) = exec_sync(&mut cri, &a, &["ip", "-4", "-o", "addr", "show", "eth0"]).await;
    assert!(
        guest_ip.contains(&format!("{ip}/")),
        "the guest has the pod's IP: {guest_ip}"
    );

    // The container's output reaches its CRI log (kubectl logs).
    let log = std::fs::read_to_string(logs.0.join("server.log")).unwrap_or_default();
    assert!(
        log.contains("stdout F serving-on-8080"),
        "server.log: {log:?}"
    );

    // UpdateContainerResources changes the container's guest cgroup.
    cri.update_container_resources(UpdateContainerResourcesRequest {
        container_id: b.clone(),
        linux: Some(LinuxContainerResources {
            memory_limit_in_bytes: 64 << 20,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .expect("UpdateContainerResources");
    let (_, max) = exec_sync(&mut cri, &b, &["cat", "/sys/fs/cgroup/memory.max"]).await;
    assert_eq!(max.trim(), (64u64 << 20).to_string());

    // A second pod, with limits that size its VM, reaches the first by its
    // pod IP.
    let mut other = pod_config("other", &logs.0);
    other.linux = Some(LinuxPodSandboxConfig {
        resources: Some(LinuxContainerResources {
            memory_limit_in_bytes: 256 << 20,
            cpu_quota: 200_000,
            cpu_period: 100_000,
            ..Default::default()
        }),
        ..Default::default()
    });
    let pod2 = run_pod(&mut cri, &other).await;
    let o = start_container(&mut cri, &pod2, &other, "fetch", &["sleep", "3600"]).await;
    let url = format!("http://{ip}:8080/");
    let (code, out) = exec_sync(&mut cri, &o, &["wget", "-qO-", &url]).await;
    assert_eq!((code, out.as_str()), (0, "hello-from-a\n"));
    let (_, cpus) = exec_sync(&mut cri, &o, &["nproc"]).await;
    assert_eq!(cpus.trim(), "2", "2 vCPUs from the pod's CPU quota");
    let (_, meminfo) = exec_sync(&mut cri, &o, &["head", "-1", "/proc/meminfo"]).await;
    let total_kib: u64 = meminfo
        .split_whitespace()
        .nth(1)
        .and_then(|k| k.parse().ok())
        .unwrap_or(0);
    assert!(
        (300 << 10..=384 << 10).contains(&total_kib),
        "the VM has the pod's 256 MiB + 128 MiB: {meminfo}"
    );

    // Attach to a container's terminal through CRI streaming.
    let mut interactive = container("shell", &["sh"]);
    interactive.stdin = true;
    interactive.tty = true;
    let sh = start_configured(&mut cri, &pod, &web, interactive).await;
    let url = cri
        .attach(AttachRequest {
            container_id: sh.clone(),
            stdin: true,
            tty: true,
            stdout: true,
            stderr: false,
        })
        .await
        .expect("Attach")
        .into_inner()
        .url;
    let screen =
        tokio::task::spawn_blocking(move || stream_exec(&url, b"echo attached-$((1+1))\nexit\n"))
            .await
            .unwrap();
    assert!(
        screen.contains("attached-2"),
        "the attached terminal showed: {screen:?}"
    );

    // A container over its memory limit is OOM-killed in the guest, and
    // containerd learns it (TaskOOM): CRI reports OOMKilled.
    let mut hog = container("hog", &["sh", "-c", "head -c 200m /dev/zero | tail"]);
    hog.linux = Some(LinuxContainerConfig {
        resources: Some(LinuxContainerResources {
            memory_limit_in_bytes: 32 << 20,
            ..Default::default()
        }),
        ..Default::default()
    });
    let hog = start_configured(&mut cri, &pod, &web, hog).await;
    let mut hog_status = None;
    for _ in 0..100 {
        let s = container_status(&mut cri, &hog).await;
        if s.state == ContainerState::ContainerExited as i32 {
            hog_status = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let hog_status = hog_status.expect("the memory hog to be killed");
    assert_eq!(hog_status.reason, "OOMKilled", "{hog_status:?}");
    assert_eq!(hog_status.exit_code, 137, "{hog_status:?}");
    // CRI deletes an exited container's task: its root and binds are
    // unmounted in the pod's shim (whose mounts live in its own namespace).
    let shim = shim_of(&pod).expect("the pod's shim");
    eventually(
        "the hog's mounts gone from the shim",
        Duration::from_secs(20),
        || {
            let (shim, hog) = (shim.clone(), hog.clone());
            async move {
                let mounts =
                    std::fs::read_to_string(format!("/proc/{shim}/mountinfo")).unwrap_or_default();
                !mounts.contains(&hog)
            }
        },
    )
    .await;

    // Exec through CRI streaming, with stdin and a tty.
    let url = cri
        .exec(ExecRequest {
            container_id: b.clone(),
            cmd: vec!["sh".into()],
            tty: true,
            stdin: true,
            stdout: true,
            stderr: false,
        })
        .await
        .expect("Exec")
        .into_inner()
        .url;
    let screen =
        tokio::task::spawn_blocking(move || stream_exec(&url, b"echo typed-$((40+2))\nexit\n"))
            .await
            .unwrap();
    assert!(
        screen.contains("typed-42"),
        "the tty session showed: {screen:?}"
    );

    // Teardown: both pods stop and go; no VM stays.
    for p in [&pod, &pod2] {
        cri::remove_pod(&mut cri, p).await;
    }
    eventually("the pods' VMs gone", Duration::from_secs(20), || {
        let (p1, p2) = (pod.clone(), pod2.clone());
        async move { vms_of(&p1) + vms_of(&p2) == 0 }
    })
    .await;
    let left = test_utils::processes_mentioning(&c.pv_root().to_string_lossy());
    assert!(left.is_empty(), "left running: {left:?}");
}

/// Runs a CRI streaming session (exec or attach) over a WebSocket
/// (channel.k8s.io, v4): sends `input` on stdin, returns what the terminal
/// printed until the end.
fn stream_exec(url: &str, input: &[u8]) -> String {
    use tungstenite::client::IntoClientRequest;
    use tungstenite::Message;
    let ws_url = url.replacen("http://", "ws://", 1);
    let mut req = ws_url.into_client_request().unwrap();
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "v4.channel.k8s.io".parse().unwrap(),
    );
    let (mut ws, _) = tungstenite::connect(req).expect("opening the exec stream");
    let mut stdin = vec![0u8];
    stdin.extend_from_slice(input);
    ws.send(Message::Binary(stdin.into())).unwrap();
    let mut screen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        match ws.read() {
            Ok(Message::Binary(m)) if m.first() == Some(&1) => screen.extend_from_slice(&m[1..]),
            Ok(Message::Binary(m)) if m.first() == Some(&3) && m.len() > 1 => {
                // The error channel carries the exit status (JSON), then ends.
                screen.extend_from_slice(&m[1..]);
            }
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => {}
        }
    }
    String::from_utf8_lossy(&screen).into_owned()
}

#[tokio::test(flavor = "current_thread")]
async fn bad_cri_requests_fail_clearly_and_leave_nothing() {
    let c = Containerd::start_with_subnet("10.88.92.0/24");
    c.import_busybox("k8s.io");
    let logs = Scratch::new("cri-bad");
    let mut cri = connect(c.socket()).await;

    let e = cri
        .container_status(ContainerStatusRequest {
            container_id: "no-such-container".into(),
            verbose: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
    let e = cri
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: "no-such-pod".into(),
        })
        .await
        .unwrap_err();
    assert!(
        e.message().contains("not found") || e.code() == tonic::Code::NotFound,
        "{e}"
    );

    // The node's namespaces (hostNetwork, hostPID, hostIPC): refused clearly.
    for (i, (which, says)) in ["hostNetwork", "hostPID", "hostIPC"]
        .iter()
        .zip([
            "hostNetwork pods are not supported",
            "hostPID pods are not supported",
            "hostIPC pods are not supported",
        ])
        .enumerate()
    {
        let node = NamespaceMode::Node as i32;
        let mut ns = NamespaceOption::default();
        match i {
            0 => ns.network = node,
            1 => ns.pid = node,
            _ => ns.ipc = node,
        }
        let mut cfg = pod_config(&format!("host{i}"), &logs.0);
        cfg.linux = Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(ns),
                ..Default::default()
            }),
            ..Default::default()
        });
        let e = cri
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(cfg),
                runtime_handler: "podvisor".into(),
            })
            .await
            .expect_err(which);
        assert!(e.message().contains(says), "{which}: {e}");
    }

    let cfg = pod_config("bad", &logs.0);
    let pod = run_pod(&mut cri, &cfg).await;
    // A container whose command does not exist fails to start, clearly.
    let id = cri
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: "missing".into(),
                    attempt: 0,
                }),
                image: Some(ImageSpec {
                    image: IMAGE.into(),
                    ..Default::default()
                }),
                command: vec!["/no/such/program".into()],
                ..Default::default()
            }),
            sandbox_config: Some(cfg.clone()),
        })
        .await;
    let started = match id {
        Ok(r) => cri
            .start_container(StartContainerRequest {
                container_id: r.into_inner().container_id,
            })
            .await
            .map(drop),
        Err(e) => Err(e),
    };
    let e = started.expect_err("a container without its program must not start");
    assert!(e.message().contains("/no/such/program"), "{e}");
    // An image that is not there.
    let e = cri
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: "noimage".into(),
                    attempt: 0,
                }),
                image: Some(ImageSpec {
                    image: "localhost/not-there:latest".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            sandbox_config: Some(cfg.clone()),
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("not-there"), "{e}");

    cri::remove_pod(&mut cri, &pod).await;
    eventually("the pod's VM gone", Duration::from_secs(20), || {
        let p = pod.clone();
        async move { vms_of(&p) == 0 }
    })
    .await;
    let left = test_utils::processes_mentioning(&c.pv_root().to_string_lossy());
    assert!(left.is_empty(), "left running: {left:?}");
}

#[tokio::test(flavor = "current_thread")]
async fn pods_take_their_vm_from_the_factory() {
    let policy = "template = \"pod\"\n[[pool]]\ntemplate = \"pod\"\nsize = 1\n";
    let c = Containerd::start_with("10.88.94.0/24", Some(policy));
    c.import_busybox("k8s.io");
    // The template the policy names: the default pod shape (512 MiB, 1
    // vCPU) with one NIC, in the shim's state root.
    let made = test_utils::output(
        std::process::Command::new(podvisor_client_tests::podvisor())
            .arg("--root")
            .arg(c.pv_root())
            .args([
                "template", "create", "--name", "pod", "--nics", "1", "--memory", "512",
            ]),
    );
    podvisor_client_tests::ok(&made);
    let logs = Scratch::new("cri-template");
    let mut cri = connect(c.socket()).await;

    let mut ips = Vec::new();
    let mut pods = Vec::new();
    let mut macs = Vec::new();
    let mut pool: Option<PoolDaemon> = None;
    for name in ["one", "two"] {
        let cfg = pod_config(name, &logs.0);
        let pod = run_pod(&mut cri, &cfg).await;
        if let Some(pool) = &pool {
            // The pool's ready clone, its NIC joined to the pod's tap.
            assert_eq!(
                cloned_vm_cmdline(&pod),
                "",
                "the shim booted a VM of its own"
            );
            let status = pool.status();
            assert!(status.contains("1 handed out"), "{status}\n{}", c.log());
        } else {
            // No pool serves the template yet: the shim clones it.
            let qemu_cmdline = cloned_vm_cmdline(&pod);
            assert!(
                qemu_cmdline.contains("-incoming"),
                "the pod's VM was not cloned: {qemu_cmdline}\n{}",
                c.log()
            );
            pool = Some(PoolDaemon::start(
                &c.pv_root(),
                &c.policy(),
                "pod: 1 of 1 ready",
            ));
        }
        let id = start_container(
            &mut cri,
            &pod,
            &cfg,
            "web",
            &["sh", "-c", &format!("mkdir /www && echo from-{name} > /www/index.html && exec httpd -f -p 8080 -h /www")],
        )
        .await;
        let status = pod_status(&mut cri, &pod).await;
        let ip = status.network.map(|n| n.ip).unwrap_or_default();
        let (_, addr) = exec_sync(&mut cri, &id, &["ip", "-4", "-o", "addr", "show", "eth0"]).await;
        assert!(
            addr.contains(&format!("{ip}/")),
            "clone has the pod's IP {ip}: {addr}"
        );
        let (_, mac) = exec_sync(&mut cri, &id, &["cat", "/sys/class/net/eth0/address"]).await;
        assert_ne!(
            mac.trim(),
            "52:54:00:00:00:01",
            "the clone took the pod's MAC"
        );
        macs.push(mac);
        ips.push(ip);
        pods.push((pod, id));
    }
    assert_ne!(macs[0], macs[1]);
    // Two clones on one bridge reach each other by pod IP.
    let (_, web2) = &pods[1];
    let url = format!("http://{}:8080/", ips[0]);
    let mut got = (1, String::new());
    for _ in 0..30 {
        got = exec_sync(&mut cri, web2, &["wget", "-qO-", &url]).await;
        if got.0 == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(got, (0, "from-one\n".to_string()));

    for (pod, _) in &pods {
        cri::remove_pod(&mut cri, pod).await;
    }
    eventually("the clones gone", Duration::from_secs(20), || {
        let pods: Vec<String> = pods.iter().map(|p| p.0.clone()).collect();
        async move { pods.iter().map(|p| vms_of(p)).sum::<usize>() == 0 }
    })
    .await;
    // The pooled pod's VM went back to the daemon, which retired it: left
    // is the pool's one ready clone.
    let sandboxes = c.pv_root().join("sandboxes");
    eventually("the pooled VM retired", Duration::from_secs(20), || {
        let n = std::fs::read_dir(&sandboxes)
            .map(|d| d.count())
            .unwrap_or(0);
        async move { n == 1 }
    })
    .await;
    drop(pool);
}

/// The command line of the pod's QEMU.
fn cloned_vm_cmdline(pod: &str) -> String {
    vms_pids(pod)
        .first()
        .map(|p| cmdline(p))
        .unwrap_or_default()
}

/// The share path QEMU serves in its jail, from its command line.
fn jail_share(qemu: &str) -> String {
    let cmd = cmdline(qemu);
    let at = cmd.find("path=").expect("an -fsdev path") + "path=".len();
    cmd[at..].split(',').next().unwrap_or_default().to_string()
}

/// The mount points (field 5 of mountinfo) in `pid`'s mount namespace whose
/// source root (field 4) ends with `root`.
fn mounts_of(pid: &str, root: &str) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.split(' ').nth(3).is_some_and(|r| r.ends_with(root)))
        .filter_map(|l| l.split(' ').nth(4).map(String::from))
        .collect()
}

/// A guest that has taken over its VMM (all a hostile guest kernel can do
/// through 9p, and more: root, in QEMU's own mount namespace) swaps
/// renames and symlinks into the pod's share while containerd removes a
/// container and then the pod. Nothing outside what is removed is
/// unmounted or deleted: the other container keeps its volume, the host
/// its mounts and files.
#[tokio::test(flavor = "current_thread")]
async fn a_symlink_swapped_in_during_a_delete_unmounts_nothing_else() {
    use k8s_cri::v1::{Mount, RemoveContainerRequest, StopContainerRequest};
    use std::process::{Command, Stdio};
    let c = Containerd::start_with_subnet("10.88.95.0/24");
    c.import_busybox("k8s.io");
    let logs = Scratch::new("cri-swap");
    let victim = Scratch::new("cri-swap-victim");
    let attack = Scratch::new("cri-swap-attack");
    std::fs::write(victim.0.join("probe"), "still-here").unwrap();
    // A host mount outside the pod, a target for a redirected unmount.
    let sentinel = Scratch::new("cri-swap-sentinel");
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "sentinel"])
        .arg(&sentinel.0)
        .status()
        .unwrap();
    assert!(st.success(), "mounting the sentinel tmpfs");
    std::fs::write(sentinel.0.join("probe"), "sentinel").unwrap();
    let mut cri = connect(c.socket()).await;

    let cfg = pod_config("swap", &logs.0);
    let pod = run_pod(&mut cri, &cfg).await;
    let with_volume = |name: &str, host: &std::path::Path, at: &str| {
        let mut k = container(name, &["sleep", "3600"]);
        k.mounts = vec![Mount {
            container_path: at.into(),
            host_path: host.to_string_lossy().into_owned(),
            ..Default::default()
        }];
        k
    };
    let keeper =
        start_configured(&mut cri, &pod, &cfg, with_volume("keeper", &victim.0, "/v")).await;
    let doomed =
        start_configured(&mut cri, &pod, &cfg, with_volume("doomed", &attack.0, "/a")).await;
    let (code, out) = exec_sync(&mut cri, &keeper, &["cat", "/v/probe"]).await;
    assert_eq!((code, out.as_str()), (0, "still-here"));

    let qemu = vms_pids(&pod).pop().expect("the pod's QEMU");
    let shim = shim_of(&pod).expect("the pod's shim");
    let share = jail_share(&qemu);
    let victim_root = victim.0.to_string_lossy().into_owned();
    let before = mounts_of(&shim, &victim_root);
    assert_eq!(before.len(), 1, "the keeper's volume, once: {before:?}");
    // In QEMU's mount namespace, as root, for at most 30 s: every entry of
    // the share's top is moved away and replaced with a link to the
    // keeper's entry or to the sentinel, over and over.
    let script = format!(
        "end=$(( $(date +%s) + 30 )); n=0
         while [ $(date +%s) -lt $end ] && [ ! -e {share}/../stop-attack ]; do
           for e in {share}/*; do
             [ -L \"$e\" ] && continue
             case \"$e\" in *{keeper}*) t={share}/{keeper} ;; *) t={sentinel} ;; esac
             mv \"$e\" \"$e.moved$n\" 2>/dev/null && ln -s \"$t\" \"$e\" 2>/dev/null
             rmdir \"$e\" 2>/dev/null && ln -s \"$t\" \"$e\" 2>/dev/null
             n=$((n+1))
           done
         done; echo swapped $n",
        share = share,
        keeper = keeper,
        sentinel = sentinel.0.display(),
    );
    let mut attacker = Command::new("nsenter")
        .args(["-t", &qemu, "-m", "--", "sh", "-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("nsenter");

    cri.stop_container(StopContainerRequest {
        container_id: doomed.clone(),
        timeout: 2,
    })
    .await
    .expect("StopContainer");
    cri.remove_container(RemoveContainerRequest {
        container_id: doomed.clone(),
    })
    .await
    .expect("RemoveContainer");
    // The keeper's volume is where it was, in the shim's view and the guest's.
    assert_eq!(
        mounts_of(&shim, &victim_root),
        before,
        "the keeper's volume moved"
    );
    let (code, out) = exec_sync(&mut cri, &keeper, &["cat", "/v/probe"]).await;
    assert_eq!((code, out.as_str()), (0, "still-here"));
    let attack_root = attack.0.to_string_lossy().into_owned();
    assert!(
        mounts_of(&shim, &attack_root).is_empty(),
        "the removed container's volume is still mounted in the shim"
    );

    cri::remove_pod(&mut cri, &pod).await;
    eventually("the pod's VM gone", Duration::from_secs(20), || {
        let p = pod.clone();
        async move { vms_of(&p) == 0 }
    })
    .await;
    let _ = attacker.kill();
    let _ = attacker.wait();
    // The host: the sentinel is still mounted with its file, the volumes'
    // files are all there, and nothing of the pod is left.
    let host_mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        host_mounts.contains(&format!(" {} ", sentinel.0.display())),
        "the sentinel tmpfs was unmounted"
    );
    assert_eq!(
        std::fs::read_to_string(sentinel.0.join("probe")).unwrap(),
        "sentinel"
    );
    assert_eq!(
        std::fs::read_to_string(victim.0.join("probe")).unwrap(),
        "still-here"
    );
    let _ = Command::new("umount").arg(&sentinel.0).status();
    let left = test_utils::processes_mentioning(&c.pv_root().to_string_lossy());
    assert!(left.is_empty(), "left running: {left:?}");
}
