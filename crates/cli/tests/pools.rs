//! Pools of ready clones (`podvisor pool serve`): hand-out, refill, a killed
//! caller's clone torn down, a clean stop, and a broken policy refused.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use test_utils::{output, spawn_until_ready, StateRoot};

fn podvisor(root: &StateRoot) -> Command {
    test_utils::build_dir();
    let mut c = Command::new(env!("CARGO_BIN_EXE_podvisor"));
    c.arg("--root").arg(&root.path);
    c
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn status(root: &StateRoot, config: &std::path::Path) -> String {
    text(
        &output(
            podvisor(root)
                .arg("pool")
                .arg("status")
                .arg("--config")
                .arg(config),
        )
        .stdout,
    )
}

fn wait_status(root: &StateRoot, config: &std::path::Path, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = status(root, config);
        if s.contains(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pool never reached {want:?}: {s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits for `n` sandboxes under the root: handed-out clones retired.
fn wait_sandboxes(root: &StateRoot, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while root.sandboxes().len() != n {
        assert!(
            Instant::now() < deadline,
            "a handed-out clone stayed: {:?}",
            root.sandboxes()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The daemon, killed if the test fails before it stops it (its VMs die with it).
struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Makes template `name` of `memory` MiB, writes `policy` as the factory
/// policy and serves it until the status shows `ready`.
fn serve(
    root: &StateRoot,
    name: &str,
    memory: &str,
    policy: &str,
    ready: &str,
) -> (Daemon, std::path::PathBuf) {
    let o = output(podvisor(root).args(["template", "create", "--name", name, "--memory", memory]));
    assert!(o.status.success(), "template create: {}", text(&o.stderr));
    let config = root.path.join("config.toml");
    std::fs::write(&config, policy).unwrap();
    let (daemon, _out) = spawn_until_ready(
        podvisor(root)
            .arg("pool")
            .arg("serve")
            .arg("--config")
            .arg(&config),
    );
    let daemon = Daemon(daemon);
    wait_status(root, &config, ready);
    (daemon, config)
}

#[test]
fn pool_hands_out_ready_clones_and_refills() {
    let root = StateRoot::new("pool");
    let policy = "[[pool]]\ntemplate = \"p\"\nsize = 2\n";
    let (daemon, config) = serve(&root, "p", "128", policy, "p: 2 of 2 ready");
    // Each ready clone ran a warm-up container: nothing of it is left in
    // the share the caller gets.
    for member in std::fs::read_dir(root.path.join("pools/p")).unwrap() {
        let share = member.unwrap().path();
        let left: Vec<_> = std::fs::read_dir(&share).unwrap().collect();
        assert!(left.is_empty(), "{}: {left:?}", share.display());
    }

    let mut boot_ids = Vec::new();
    for _ in 0..2 {
        let o = output(podvisor(&root).args([
            "sandbox",
            "run",
            "--template",
            "p",
            "--timings",
            "--",
            "cat",
            "/proc/sys/kernel/random/boot_id",
        ]));
        assert!(o.status.success(), "{}", text(&o.stderr));
        let timings: serde_json::Value =
            serde_json::from_str(text(&o.stderr).lines().last().unwrap()).unwrap();
        assert_eq!(timings["pooled"], true, "{}", text(&o.stderr));
        boot_ids.push(text(&o.stdout));
    }
    assert_ne!(
        boot_ids[0], boot_ids[1],
        "pooled clones are machines of their own"
    );
    wait_status(&root, &config, "p: 2 of 2 ready, 2 handed out");

    // A caller killed while it holds a pooled clone: the daemon tears it down.
    let mut caller = podvisor(&root)
        .args(["sandbox", "run", "--template", "p", "--", "sleep", "600"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_status(&root, &config, "3 handed out");
    std::thread::sleep(Duration::from_millis(500));
    caller.kill().unwrap();
    caller.wait().unwrap();
    wait_status(&root, &config, "p: 2 of 2 ready, 3 handed out");
    wait_sandboxes(&root, 2);

    // SIGTERM: the daemon retires its ready clones and leaves nothing.
    stop(daemon);
    assert!(status(&root, &config).contains("not served"));
    let o = output(podvisor(&root).args(["template", "rm", "p"]));
    assert!(o.status.success());
}

#[test]
fn broken_policy_is_refused() {
    let root = StateRoot::new("pool-bad");
    let config = root.path.join("config.toml");
    for (policy, want) in [
        (
            "[[pool]]\ntemplate = \"t\"\nsize = 0\n",
            "size 0 is out of range",
        ),
        ("[[pool]]\nsize = 1\n", "missing field `template`"),
        ("[pool\n", "config.toml"),
        ("", "no [[pool]]"),
        (
            "[[pool]]\ntemplate = \"ghost\"\nsize = 1\n",
            "template ghost does not exist",
        ),
    ] {
        std::fs::write(&config, policy).unwrap();
        let o = output(
            podvisor(&root)
                .arg("pool")
                .arg("serve")
                .arg("--config")
                .arg(&config),
        );
        assert_eq!(o.status.code(), Some(1), "{policy}");
        assert!(
            text(&o.stderr).contains(want),
            "{policy}: {}",
            text(&o.stderr)
        );
    }
    let o = output(podvisor(&root).args(["pool", "serve", "--config", "/nonexistent/config.toml"]));
    assert!(text(&o.stderr).contains("/nonexistent/config.toml"));
}

/// Stops the daemon with SIGTERM and waits for a clean exit.
fn stop(mut daemon: Daemon) {
    // SAFETY: kill with the pid of our own child.
    unsafe { libc::kill(daemon.0.id() as i32, libc::SIGTERM) };
    assert!(daemon.0.wait().unwrap().success());
}

#[test]
fn oci_run_takes_its_vm_from_the_pool() {
    let root = StateRoot::new("pool-oci");
    // One policy file: the front ends' template, and a pool of it.
    let policy = "template = \"oci\"\n[[pool]]\ntemplate = \"oci\"\nsize = 1\n";
    let (daemon, config) = serve(&root, "oci", "256", policy, "oci: 1 of 1 ready");

    // A volume: the container's share goes into the pooled VM whole.
    let volume = root.path.join("volume");
    std::fs::create_dir_all(&volume).unwrap();
    std::fs::write(volume.join("hello"), "from the host\n").unwrap();
    let bundle = test_utils::Bundle::new("pooled", |c| {
        c["process"]["args"] = serde_json::json!([
            "sh",
            "-c",
            "cat /data/hello; echo written > /data/back; echo on $(hostname); exit 4"
        ]);
        c["hostname"] = "pooled-box".into();
        c["mounts"].as_array_mut().unwrap().push(serde_json::json!({
            "destination": "/data",
            "type": "bind",
            "source": volume,
            "options": ["rbind", "rw"],
        }));
    });
    let log = root.path.join("run.log");
    let out = output(
        podvisor(&root)
            .env("PODVISOR_CONFIG", &config)
            .arg("--log")
            .arg(&log)
            .args(["run", "--bundle", bundle.path.to_str().unwrap(), "p1"]),
    );
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "from the host\non pooled-box\n");
    assert_eq!(
        std::fs::read_to_string(volume.join("back")).unwrap(),
        "written\n"
    );
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        logged.contains("took a ready VM from the pool"),
        "the holder's log: {logged}"
    );
    // The pool refills, and the container's clone is gone with it.
    wait_status(&root, &config, "oci: 1 of 1 ready, 1 handed out");
    wait_sandboxes(&root, 1);
    assert!(root.containers().is_empty(), "{:?}", root.containers());
    stop(daemon);
    let o = output(podvisor(&root).args(["template", "rm", "oci"]));
    assert!(o.status.success());
}

#[test]
fn a_pooled_vm_takes_its_callers_cgroup_and_cpu_limit() {
    let root = StateRoot::new("pool-cgroup");
    let policy = "template = \"cg\"\n[[pool]]\ntemplate = \"cg\"\nsize = 1\n";
    let (daemon, config) = serve(&root, "cg", "256", policy, "cg: 1 of 1 ready");
    let parent = format!("podvisor-test-pool-{}", std::process::id());
    let leaf = format!("{parent}/c1");
    let bundle = test_utils::Bundle::new("pooled-cgroup", |c| {
        c["process"]["args"] = serde_json::json!(["sleep", "60"]);
        c["linux"]["cgroupsPath"] = format!("/{leaf}").into();
        c["linux"]["resources"]["cpu"] = serde_json::json!({"quota": 50000, "period": 100000});
        // A VM of 64 + 128 = 192 MiB, smaller than the 256 MiB template.
        c["linux"]["resources"]["memory"] = serde_json::json!({"limit": 64u64 << 20});
    });
    // The container's stdio is what `create` was given (as with runc).
    let created = podvisor(&root)
        .env("PODVISOR_CONFIG", &config)
        .args(["create", "--bundle", bundle.path.to_str().unwrap(), "pcg"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(created.success(), "create failed");
    wait_status(&root, &config, "1 handed out");
    // The pooled VM's QEMU left the daemon's cgroup for the container's.
    let procs = test_utils::cgroup_file(&leaf, "cgroup.procs", "memory", "cgroup.procs");
    let pid = std::fs::read_to_string(&procs)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse::<u64>().ok())
        .find(|p| qemu_alive(*p))
        .unwrap_or_else(|| panic!("no QEMU in {}", procs.display()));
    test_utils::in_cgroup(pid as u32, &leaf).unwrap();
    assert_eq!(test_utils::cpu_quota(&leaf), Some(50000), "half a CPU");
    // The host holds the guest to the container's size, not the template's:
    // 192 MiB plus the VMM's overhead (512 MiB under TCG, 160 under KVM).
    let limit = test_utils::cgroup_file(&leaf, "memory.max", "memory", "memory.limit_in_bytes");
    let limit: u64 = std::fs::read_to_string(&limit)
        .unwrap_or_default()
        .trim()
        .parse()
        .unwrap_or(0);
    assert!(
        [(192 + 512) << 20, (192 + 160) << 20].contains(&limit),
        "memory limit {limit}, not the container's 192 MiB VM"
    );
    let o = output(podvisor(&root).args(["delete", "--force", "pcg"]));
    assert!(o.status.success(), "delete: {}", text(&o.stderr));
    let deadline = Instant::now() + Duration::from_secs(10);
    while test_utils::cgroup_file(&leaf, "", "memory", "").exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let left = test_utils::cgroup_file(&leaf, "", "memory", "").exists();
    for ctl in ["", "memory", "pids", "cpu"] {
        let base = std::path::Path::new("/sys/fs/cgroup").join(ctl);
        let _ = std::fs::remove_dir(base.join(&leaf));
        let _ = std::fs::remove_dir(base.join(&parent));
    }
    assert!(!left, "the VM's cgroup {leaf} outlived it");
    stop(daemon);
    let o = output(podvisor(&root).args(["template", "rm", "cg"]));
    assert!(o.status.success());
}

/// Sends one line on the pool's socket and returns the answer.
fn ask(conn: &mut std::os::unix::net::UnixStream, line: &str) -> String {
    use std::io::{BufRead, Write};
    conn.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut answer = String::new();
    std::io::BufReader::new(&*conn)
        .read_line(&mut answer)
        .unwrap();
    answer
}

/// Whether process `pid` is a live QEMU.
fn qemu_alive(pid: u64) -> bool {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|e| e.to_string_lossy().contains("qemu"))
        .unwrap_or(false)
}

#[test]
fn pool_daemon_refuses_bad_requests_and_hands_over_vms_whole() {
    let root = StateRoot::new("pool-requests");
    let policy = "[[pool]]\ntemplate = \"q\"\nsize = 1\n";
    let (daemon, config) = serve(&root, "q", "128", policy, "q: 1 of 1 ready");
    let sock = root.path.join("pools/q.sock");
    let connect = || std::os::unix::net::UnixStream::connect(&sock).unwrap();

    // Anything but a request for a clone (garbage, an unknown op) gets no
    // answer, only a hang-up; a silent caller holds nothing up.
    for line in [&b"not json\n"[..], b"{\"op\":\"attach\",\"name\":\"x\"}\n"] {
        let mut c = connect();
        std::io::Write::write_all(&mut c, line).unwrap();
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut c, &mut rest);
        assert_eq!(rest, "", "{line:?} gets no answer, only a hang-up");
    }
    let _silent = connect();

    // Tap devices the template has no NICs for: refused (the clone is
    // retired, and the pool refills).
    let mut c = connect();
    assert!(
        ask(&mut c, r#"{"op":"take","nics":2}"#).contains("the template has 0 NICs"),
        "a take with NICs the template lacks"
    );
    drop(c);
    wait_status(&root, &config, "q: 1 of 1 ready, 1 handed out");

    // A clone taken: the answer carries the VM's supervisor connection and
    // its VMM's pidfd.
    let c = connect();
    sandbox::fdmsg::send(&c, br#"{"op":"take","nics":0}"#, &[]).unwrap();
    let mut reader = sandbox::fdmsg::Reader::default();
    let (answer, fds) = reader.recv(&c).unwrap().expect("an answer");
    let answer: serde_json::Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(fds.len(), 2, "{answer}");
    let pid = answer["vmm_pid"].as_u64().unwrap();
    let mut seq = answer["seq"].as_u64().unwrap();
    drop(c);
    let mut fds = fds.into_iter();
    let vm = std::os::unix::net::UnixStream::from(fds.next().unwrap());
    // The daemon's copy was non-blocking (one open file for both).
    vm.set_nonblocking(false).unwrap();
    vm.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut vm_reader = sandbox::fdmsg::Reader::default();
    let mut ask_vm = |body: &str| {
        seq += 1;
        let line = format!(r#"{{"seq":{seq},{body}}}"#);
        sandbox::fdmsg::send(&vm, line.as_bytes(), &[]).unwrap();
        let (a, _) = vm_reader
            .recv(&vm)
            .unwrap()
            .expect("the supervisor answers");
        String::from_utf8_lossy(&a).into_owned()
    };
    // Its supervisor refuses bad requests and serves on.
    for (body, want) in [
        (
            r#""op":"attach","tag":"rootfs","name":"../etc""#,
            "not a plain name",
        ),
        (
            r#""op":"attach","tag":"rootfs","name":"""#,
            "not a plain name",
        ),
        (
            r#""op":"attach","tag":"rootfs","name":"ok""#,
            "no mount tree came",
        ),
        (
            r#""op":"attach","tag":"host","name":"ok""#,
            "the VM has no share",
        ),
        (
            r#""op":"detach","tag":"rootfs","name":"a/b""#,
            "not a plain name",
        ),
        (r#""op":"connect_tap","index":0"#, "no tap device came"),
        (r#""op":"dance""#, "bad request"),
        (r#""op":"status""#, r#""error":"""#),
    ] {
        let answer = ask_vm(body);
        assert!(answer.contains(want), "{body}: {answer}");
    }
    // The daemon stops: the VM it handed over is ours and lives on.
    stop(daemon);
    assert!(qemu_alive(pid), "the handed-over VM died with its daemon");
    assert!(ask_vm(r#""op":"status""#).contains(r#""exit":"""#));
    // Hanging up ends it, its share and its state directory.
    drop(vm);
    let deadline = Instant::now() + Duration::from_secs(10);
    while qemu_alive(pid) || !root.sandboxes().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the VM or its state stayed: {:?}",
            root.sandboxes()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let shares = test_utils::names_in(&root.path.join("pools/q"));
    assert!(shares.is_empty(), "shares left: {shares:?}");
    let o = output(podvisor(&root).args(["template", "rm", "q"]));
    assert!(o.status.success());
}
