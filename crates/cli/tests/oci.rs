//! The runc command line, driven the way conmon and containerd-shim drive it:
//! real VMs, a holder process reaped by us as child subreaper, state read back
//! by new processes, and bad input answered runc-style with nothing left.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use test_utils::{build_dir, output, processes_mentioning, Bundle, StateRoot};

fn podvisor() -> PathBuf {
    build_dir().join("podvisor")
}

fn pv(root: &StateRoot, args: &[&str]) -> Output {
    output(
        Command::new(podvisor())
            .arg("--root")
            .arg(&root.path)
            .args(args),
    )
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn state(root: &StateRoot, id: &str) -> serde_json::Value {
    serde_json::from_str(&ok(&pv(root, &["state", id]))).unwrap()
}

/// Like conmon and the runc shim: orphans (the holders) are reparented to us.
fn become_subreaper() {
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(rc, 0);
}

fn wait_exit(pid: i32, timeout: Duration) -> i32 {
    let deadline = Instant::now() + timeout;
    loop {
        match waitpid(
            Pid::from_raw(pid),
            Some(nix::sys::wait::WaitPidFlag::WNOHANG),
        ) {
            Ok(WaitStatus::Exited(_, code)) => return code,
            Ok(WaitStatus::Signaled(_, sig, _)) => return 128 + sig as i32,
            Ok(_) => {}
            Err(e) => panic!("waitpid({pid}): {e}"),
        }
        assert!(Instant::now() < deadline, "holder {pid} did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `create` with pipes for stdio, as conmon does; returns the pid-file pid.
fn create(root: &StateRoot, bundle: &Path, id: &str) -> (i32, std::process::Child) {
    let pid_file = root.path.join(format!("{id}.pid"));
    let mut child = Command::new(podvisor())
        .arg("--root")
        .arg(&root.path)
        .args(["create", "--bundle"])
        .arg(bundle)
        .arg("--pid-file")
        .arg(&pid_file)
        .arg(id)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // `create` returns once the container exists; its stdout pipe stays open
    // in the holder, so wait for the create process itself.
    let status = child.wait().unwrap();
    assert!(status.success(), "create failed");
    let pid: i32 = std::fs::read_to_string(&pid_file).unwrap().parse().unwrap();
    (pid, child)
}

#[test]
fn lifecycle_of_a_container_through_new_processes() {
    become_subreaper();
    let root = StateRoot::new("oci-life");
    let bundle = Bundle::new("life", |c| {
        c["process"]["args"] = serde_json::json!(["sh", "-c", "echo started; sleep 600"]);
        c["hostname"] = "lifebox".into();
    });
    let (pid, mut create_child) = create(&root, &bundle.path, "life");
    let s = state(&root, "life");
    assert_eq!(s["status"], "created");
    assert_eq!(s["pid"], pid);
    assert_eq!(s["bundle"], bundle.path.to_str().unwrap());
    assert!(Path::new(&format!("/proc/{pid}")).exists());

    ok(&pv(&root, &["start", "life"]));
    assert_eq!(state(&root, "life")["status"], "running");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(create_child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(
        line, "started\n",
        "the container's stdout is the pipe create was given"
    );

    let out = ok(&pv(
        &root,
        &["exec", "life", "sh", "-c", "hostname; echo $((6*7))"],
    ));
    assert_eq!(out, "lifebox\n42\n");
    let exec = pv(&root, &["exec", "life", "sh", "-c", "exit 3"]);
    assert_eq!(exec.status.code(), Some(3), "exec's status passes through");
    let pids: Vec<u32> =
        serde_json::from_str(&ok(&pv(&root, &["ps", "--format", "json", "life"]))).unwrap();
    assert!(!pids.is_empty());

    ok(&pv(&root, &["pause", "life"]));
    assert_eq!(state(&root, "life")["status"], "paused");
    ok(&pv(&root, &["resume", "life"]));
    assert_eq!(state(&root, "life")["status"], "running");

    ok(&pv(
        &root,
        &["update", "--memory", "96m", "--cpu-quota", "50000", "life"],
    ));
    let limits = ok(&pv(
        &root,
        &[
            "exec",
            "life",
            "cat",
            "/sys/fs/cgroup/memory.max",
            "/sys/fs/cgroup/cpu.max",
        ],
    ));
    assert_eq!(limits, format!("{}\n50000 100000\n", 96 << 20));
    let stats: serde_json::Value =
        serde_json::from_str(&ok(&pv(&root, &["events", "--stats", "life"]))).unwrap();
    assert_eq!(stats["type"], "stats");
    assert!(stats["data"]["memory"]["usage"]["usage"].as_u64().unwrap() > 0);

    let list: serde_json::Value =
        serde_json::from_str(&ok(&pv(&root, &["list", "-f", "json"]))).unwrap();
    assert_eq!(list[0]["id"], "life");

    // A detached exec has a holder of its own that exits with its status.
    let exec_pid_file = root.path.join("exec.pid");
    let out = pv(
        &root,
        &[
            "exec",
            "-d",
            "--pid-file",
            exec_pid_file.to_str().unwrap(),
            "life",
            "sh",
            "-c",
            "sleep 0.3; exit 5",
        ],
    );
    ok(&out);
    let exec_pid: i32 = std::fs::read_to_string(&exec_pid_file)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(wait_exit(exec_pid, Duration::from_secs(30)), 5);

    let refused = pv(&root, &["delete", "life"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not stopped: running"));

    ok(&pv(&root, &["kill", "life", "KILL"]));
    assert_eq!(
        wait_exit(pid, Duration::from_secs(30)),
        137,
        "the holder exits with the status"
    );
    assert_eq!(state(&root, "life")["status"], "stopped");
    ok(&pv(&root, &["delete", "life"]));
    let gone = pv(&root, &["state", "life"]);
    assert_eq!(gone.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&gone.stderr).contains("does not exist"));
}

#[test]
fn run_passes_output_and_exit_code_and_honours_the_config() {
    let root = StateRoot::new("oci-run");
    let host = std::env::temp_dir().join(format!("podvisor-oci-vol-{}", std::process::id()));
    std::fs::create_dir_all(&host).unwrap();
    std::fs::write(host.join("in.txt"), "from-host").unwrap();
    let bundle = Bundle::new("run", |c| {
        c["process"]["args"] = serde_json::json!([
            "sh",
            "-c",
            "cat /data/in.txt; echo; echo from-guest > /data/out.txt; \
             echo $GREETING; pwd; id -u; cat /sys/fs/cgroup/memory.max; \
             cat /proc/sys/net/ipv4/ip_forward; grep CapEff /proc/self/status; \
             touch /etc/x 2>/dev/null || echo root-is-readonly; \
             echo tmp > /scratch/f && echo tmpfs-ok; exit 7"
        ]);
        c["process"]["env"]
            .as_array_mut()
            .unwrap()
            .push("GREETING=hello".into());
        c["process"]["cwd"] = "/tmp".into();
        c["root"]["readonly"] = true.into();
        c["linux"]["resources"] = serde_json::json!({"memory": {"limit": 201326592}});
        c["linux"]["sysctl"] = serde_json::json!({"net.ipv4.ip_forward": "1"});
        c["mounts"].as_array_mut().unwrap().extend([
            serde_json::json!({"destination": "/data", "type": "bind", "source": host, "options": ["rbind", "rw"]}),
            serde_json::json!({"destination": "/scratch", "type": "tmpfs", "source": "tmpfs", "options": ["size=1m"]}),
        ]);
    });
    let out = pv(
        &root,
        &["run", "--bundle", bundle.path.to_str().unwrap(), "runner"],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(7),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "from-host",
            "hello",
            "/tmp",
            "0",
            "201326592",
            "1",
            // spec's default: CAP_AUDIT_WRITE, CAP_KILL, CAP_NET_BIND_SERVICE
            "CapEff:\t0000000020000420",
            "root-is-readonly",
            "tmpfs-ok",
        ]
    );
    assert_eq!(
        std::fs::read_to_string(host.join("out.txt")).unwrap(),
        "from-guest\n"
    );
    let _ = std::fs::remove_dir_all(&host);
}

#[test]
fn bad_input_gets_runc_style_errors_and_leaves_nothing() {
    let root = StateRoot::new("oci-bad");
    let log = root.path.join("log.json");
    let fail = |args: &[&str], want: &str| {
        let out = output(
            Command::new(podvisor())
                .arg("--root")
                .arg(&root.path)
                .arg("--log")
                .arg(&log)
                .args(["--log-format", "json"])
                .args(args),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains(want),
            "{args:?}: want {want:?} in {stderr:?}"
        );
        let last = std::fs::read_to_string(&log).unwrap();
        let line: serde_json::Value = serde_json::from_str(last.lines().last().unwrap()).unwrap();
        assert_eq!(line["level"], "error");
        assert!(line["msg"].as_str().unwrap().contains(want));
    };
    let empty = root.path.join("empty-bundle");
    std::fs::create_dir_all(&empty).unwrap();
    fail(
        &["create", "--bundle", empty.to_str().unwrap(), "a"],
        "config.json",
    );
    std::fs::write(empty.join("config.json"), "{not json").unwrap();
    fail(
        &["create", "--bundle", empty.to_str().unwrap(), "a"],
        "parsing",
    );
    let no_root = Bundle::new("noroot", |c| c["root"]["path"] = "missing".into());
    fail(
        &["create", "--bundle", no_root.path.to_str().unwrap(), "a"],
        "rootfs",
    );
    let bad_exec = Bundle::new("badexec", |c| {
        c["process"]["args"] = serde_json::json!(["/no/such/binary"])
    });
    fail(
        &["run", "--bundle", bad_exec.path.to_str().unwrap(), "a"],
        "not found",
    );
    fail(
        &[
            "create",
            "--bundle",
            no_root.path.to_str().unwrap(),
            "../escape",
        ],
        "invalid container id",
    );
    for verb in ["start", "state", "delete", "pause", "resume", "ps"] {
        fail(&[verb, "ghost"], "does not exist");
    }
    fail(&["kill", "ghost", "KILL"], "does not exist");
    fail(&["kill", "ghost", "NOSUCHSIG"], "unknown signal");
    fail(&["checkpoint", "x"], "not supported");
    fail(&["restore", "x"], "not supported");

    // A duplicate id and a second start.
    let good = Bundle::new("dup", |c| {
        c["process"]["args"] = serde_json::json!(["sleep", "600"])
    });
    let (pid, _c) = create(&root, &good.path, "dup");
    fail(
        &["create", "--bundle", good.path.to_str().unwrap(), "dup"],
        "container with id exists: dup",
    );
    ok(&pv(&root, &["start", "dup"]));
    fail(
        &["start", "dup"],
        "cannot start an already running container",
    );
    ok(&pv(&root, &["delete", "--force", "dup"]));
    assert!(
        !Path::new(&format!("/proc/{pid}/exe")).exists()
            || processes_mentioning(&root.path.to_string_lossy()).is_empty()
    );
}

#[test]
fn killed_holder_or_vmm_leaves_a_stopped_container_that_delete_cleans() {
    become_subreaper();
    let root = StateRoot::new("oci-faults");
    let bundle = Bundle::new("faults", |c| {
        c["process"]["args"] = serde_json::json!(["sleep", "600"])
    });

    // The holder SIGKILLed: its VM goes with it.
    let (pid, _c) = create(&root, &bundle.path, "h");
    ok(&pv(&root, &["start", "h"]));
    nix::sys::signal::kill(Pid::from_raw(pid), nix::sys::signal::SIGKILL).unwrap();
    assert_eq!(wait_exit(pid, Duration::from_secs(10)), 137);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !processes_mentioning(&format!("{}/sandboxes", root.path.display())).is_empty() {
        assert!(Instant::now() < deadline, "QEMU outlived its holder");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(state(&root, "h")["status"], "stopped");
    ok(&pv(&root, &["delete", "h"]));

    // QEMU SIGKILLed: the holder notices, says so in its status, exits.
    let (pid, _c) = create(&root, &bundle.path, "q");
    ok(&pv(&root, &["start", "q"]));
    let vmm = test_utils::qemu_mentioning(&format!("{}/sandboxes", root.path.display()))
        .expect("the container's QEMU");
    nix::sys::signal::kill(Pid::from_raw(vmm as i32), nix::sys::signal::SIGKILL).unwrap();
    assert_eq!(wait_exit(pid, Duration::from_secs(30)), 137);
    assert_eq!(state(&root, "q")["status"], "stopped");
    ok(&pv(&root, &["delete", "q"]));
}

#[test]
fn run_in_the_foreground_joins_the_container_pty_to_our_terminal() {
    assert!(
        Command::new("tmux").arg("-V").output().is_ok(),
        "tmux is missing: run scripts/install-deps.sh"
    );
    let root = StateRoot::new("oci-tty");
    let bundle = Bundle::new("tty", |c| {
        c["process"]["terminal"] = true.into();
        c["process"]["args"] = serde_json::json!(["sh"]);
    });
    let session = format!("pv-oci-tty-{}", std::process::id());
    let line = format!(
        "{} --root {} run --bundle {} t; echo EXIT=$?; sleep 60",
        podvisor().display(),
        root.path.display(),
        bundle.path.display()
    );
    let tmux = |args: &[&str]| ok(&output(Command::new("tmux").args(args)));
    tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "90",
        "-y",
        "25",
        &line,
    ]);
    let screen = || tmux(&["capture-pane", "-p", "-t", &session]);
    let expect = |text: &str| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !screen().contains(text) {
            assert!(
                Instant::now() < deadline,
                "{text:?} never showed:\n{}",
                screen()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    expect("/ #");
    tmux(&[
        "send-keys",
        "-t",
        &session,
        "echo run-$((3*14)); stty size",
        "Enter",
    ]);
    expect("run-42");
    expect("25 90");
    tmux(&["resize-window", "-t", &session, "-x", "110", "-y", "35"]);
    std::thread::sleep(Duration::from_millis(500));
    tmux(&["send-keys", "-t", &session, "stty size; exit 4", "Enter"]);
    expect("35 110");
    expect("EXIT=4");
    tmux(&["kill-session", "-t", &session]);
}
