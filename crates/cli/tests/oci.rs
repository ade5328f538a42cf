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

/// `podvisor --root ROOT`, for more arguments.
fn pv_command(root: &StateRoot) -> Command {
    let mut cmd = Command::new(podvisor());
    cmd.arg("--root").arg(&root.path);
    cmd
}

fn pv(root: &StateRoot, args: &[&str]) -> Output {
    output(pv_command(root).args(args))
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
    fail(
        &["events", "--interval", "1x", "ghost"],
        "time: unknown unit \"x\" in duration \"1x\"",
    );
    fail(&["list", "--no-such-flag"], "--no-such-flag");
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

#[test]
fn version_and_forced_delete_of_nothing_answer_as_runc() {
    let root = StateRoot::new("oci-version");
    let version = ok(&pv(&root, &["version"]));
    let lines: Vec<&str> = version.lines().collect();
    assert_eq!(lines.len(), 3, "{version}");
    let number = lines[0].strip_prefix("podvisor version ").unwrap();
    assert!(
        number.split('.').count() == 3 && number.split('.').all(|n| n.parse::<u32>().is_ok()),
        "{version}"
    );
    assert!(lines[1].len() > "commit: ".len() && lines[1].starts_with("commit: "));
    let spec = lines[2].strip_prefix("spec: ").unwrap();
    assert!(spec.starts_with("1."), "{version}");
    for flag in ["-v", "--version"] {
        assert_eq!(ok(&pv(&root, &[flag])), version, "{flag}");
    }

    let gone = pv(&root, &["delete", "--force", "ghost"]);
    assert_eq!(gone.status.code(), Some(0));
    assert!(gone.stdout.is_empty() && gone.stderr.is_empty(), "{gone:?}");
    let gone = pv(&root, &["delete", "ghost"]);
    assert_eq!(
        gone.status.code(),
        Some(1),
        "without --force it is an error"
    );
    assert_eq!(ok(&pv(&root, &["list", "-f", "json"])), "null\n");
}

/// The keys of `object` (parsed from `text`) in the order `text` has them
/// (serde_json's map sorts them).
fn keys_in_order<'a>(
    text: &str,
    object: &'a serde_json::Map<String, serde_json::Value>,
) -> Vec<&'a str> {
    let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
    keys.sort_by_key(|k| text.find(&format!("\"{k}\":")).unwrap_or(usize::MAX));
    keys
}

/// Reads lines from `child`'s stdout until `n` came, within `within`.
fn lines_within(child: &mut std::process::Child, n: usize, within: Duration) -> Vec<String> {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
            // Keep draining after the test stopped listening: a closed
            // pipe would fail the writer.
            let _ = tx.send(line.unwrap_or_default());
        }
    });
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => got.push(line),
            Err(_) => {
                let _ = child.kill();
                panic!("{} of {n} lines within {within:?}: {got:?}", got.len());
            }
        }
    }
    got
}

#[test]
fn kill_zero_list_events_and_exec_details_as_runc() {
    become_subreaper();
    let root = StateRoot::new("oci-details");
    let bundle = Bundle::new("details", |c| {
        c["process"]["args"] = serde_json::json!(["sleep", "600"]);
        c["annotations"] = serde_json::json!({"org.example/k": "v"});
    });
    let (pid, _c) = create(&root, &bundle.path, "det");
    // Signal 0 asks only whether the process is there, created or running.
    ok(&pv(&root, &["kill", "det", "0"]));
    ok(&pv(&root, &["start", "det"]));
    ok(&pv(&root, &["kill", "--all", "det", "0"]));
    ok(&pv(&root, &["kill", "det", "0"]));
    assert_eq!(
        state(&root, "det")["status"],
        "running",
        "signal 0 sends nothing"
    );

    // list: runc's table (tabwriter, min width 12, padding 3), ids, JSON.
    let table = ok(&pv(&root, &["list"]));
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(rows.len(), 2, "{table}");
    let bundle_path = bundle.path.to_str().unwrap();
    let col = |row: &str, text: &str| {
        row.find(text)
            .unwrap_or_else(|| panic!("{text:?} in {row:?}"))
    };
    assert!(rows[0].starts_with("ID          PID         STATUS      BUNDLE   "));
    assert!(rows[1].starts_with(&format!(
        "det         {:<12}running     {bundle_path}   ",
        pid
    )));
    // CREATED starts after the bundle and its padding (a "20" of the year
    // could also be in the pid or the bundle's path).
    assert_eq!(
        col(rows[0], "CREATED"),
        col(rows[1], bundle_path) + bundle_path.len() + 3
    );
    assert_eq!(&rows[1][col(rows[0], "CREATED")..][..2], "20", "{table}");
    assert_eq!(col(rows[0], "OWNER"), bundle_path.len() + 36 + 3 + 30 + 3);
    assert!(rows[1].ends_with("   root"), "{table}");
    assert_eq!(ok(&pv(&root, &["list", "-q"])), "det\n");
    let json = ok(&pv(&root, &["list", "--format", "json"]));
    let listed: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        keys_in_order(&json, listed[0].as_object().unwrap()),
        [
            "ociVersion",
            "id",
            "pid",
            "status",
            "bundle",
            "rootfs",
            "created",
            "annotations",
            "owner"
        ],
        "runc's containerState order: {json}"
    );
    assert_eq!(listed[0]["pid"], pid);
    assert_eq!(listed[0]["annotations"]["org.example/k"], "v");

    // events: --stats once; --interval as Go reads it, streaming until the
    // container stops.
    let once = ok(&pv(&root, &["events", "--stats", "det"]));
    assert_eq!(once.lines().count(), 1, "{once}");
    let stats: serde_json::Value = serde_json::from_str(&once).unwrap();
    assert_eq!(
        (stats["type"].as_str(), stats["id"].as_str()),
        (Some("stats"), Some("det"))
    );
    assert_eq!(
        keys_in_order(&once, stats["data"].as_object().unwrap()),
        ["cpu", "memory", "pids"]
    );
    assert!(stats["data"]["pids"]["current"].as_u64().unwrap() >= 1);
    let mut events = pv_command(&root)
        .args(["events", "--interval", "100ms", "det"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let streamed = lines_within(&mut events, 3, Duration::from_secs(20));
    for line in &streamed {
        let e: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(e["type"], "stats", "{line}");
    }
    eprintln!(
        "3 stats events at 100ms intervals took {:?}",
        started.elapsed()
    );
    for bad in ["0s", "100", "1x", "-1s"] {
        let out = pv(&root, &["events", "--interval", bad, "det"]);
        assert_ne!(out.status.code(), Some(0), "--interval {bad}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("duration"), "--interval {bad}: {stderr}");
    }

    // exec: status, --pid-file (the exec process stands for it), --cwd made
    // when missing, globals before the verb, --preserve-fds refused.
    let exec = pv(&root, &["exec", "det", "sh", "-c", "exit 42"]);
    assert_eq!(exec.status.code(), Some(42));
    let exec_pid = root.path.join("fg-exec.pid");
    let out = ok(&pv(
        &root,
        &[
            "exec",
            "--pid-file",
            exec_pid.to_str().unwrap(),
            "det",
            "sh",
            "-c",
            "echo $$",
        ],
    ));
    assert_eq!(out.trim().parse::<u32>().map(|p| p > 0), Ok(true), "{out}");
    let written: u32 = std::fs::read_to_string(&exec_pid).unwrap().parse().unwrap();
    assert!(written > 0);
    assert_eq!(
        ok(&pv(
            &root,
            &["exec", "--cwd", "/new/deep/dir", "det", "pwd"]
        )),
        "/new/deep/dir\n"
    );
    let log = root.path.join("debug.log");
    let out = output(
        Command::new(podvisor())
            .arg("--debug")
            .arg("--log")
            .arg(&log)
            .arg("--root")
            .arg(&root.path)
            .args(["exec", "det", "echo", "with-globals"]),
    );
    assert_eq!(ok(&out), "with-globals\n");
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.lines().any(|l| l.contains("level=debug msg=")),
        "runc's debug lines in --log: {logged}"
    );
    let refused = output(pv_command(&root).arg("--log").arg(&log).args([
        "exec",
        "--preserve-fds",
        "1",
        "det",
        "true",
    ]));
    assert_eq!(refused.status.code(), Some(1));
    let why = "--preserve-fds is not supported";
    assert!(String::from_utf8_lossy(&refused.stderr).contains(why));
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .contains(why));

    // Once the container stops, the stream ends by itself.
    ok(&pv(&root, &["kill", "det", "KILL"]));
    assert_eq!(wait_exit(pid, Duration::from_secs(30)), 137);
    let deadline = Instant::now() + Duration::from_secs(10);
    while events.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "events outlived its container");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(events.wait().unwrap().success());
    let stopped = pv(&root, &["kill", "det", "0"]);
    assert_eq!(
        stopped.status.code(),
        Some(1),
        "signal 0 of a stopped container"
    );
    let stopped = pv(&root, &["events", "--stats", "det"]);
    assert!(String::from_utf8_lossy(&stopped.stderr).contains("is not running"));
    let table = ok(&pv(&root, &["list"]));
    assert!(
        table
            .lines()
            .nth(1)
            .unwrap()
            .starts_with("det         0           stopped     "),
        "{table}"
    );
    ok(&pv(&root, &["delete", "det"]));
}

#[test]
fn run_keep_leaves_a_stopped_container_for_delete() {
    let root = StateRoot::new("oci-keep");
    let bundle = Bundle::new("keep", |c| {
        c["process"]["args"] = serde_json::json!(["sh", "-c", "echo kept; exit 3"]);
    });
    let out = pv(
        &root,
        &[
            "run",
            "--keep",
            "--bundle",
            bundle.path.to_str().unwrap(),
            "kept",
        ],
    );
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "kept\n");
    let s = state(&root, "kept");
    assert_eq!(
        (s["status"].as_str(), s["pid"].as_i64()),
        (Some("stopped"), Some(0))
    );
    assert_eq!(ok(&pv(&root, &["list", "-q"])), "kept\n");
    ok(&pv(&root, &["delete", "kept"]));
    assert!(root.containers().is_empty());

    // Without --keep the state goes with the container.
    let out = pv(
        &root,
        &["run", "--bundle", bundle.path.to_str().unwrap(), "gone"],
    );
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(root.containers().is_empty());
}

/// containerd's StopContainer sends SIGTERM within a millisecond of start. The
/// container's init has no handler for it yet (here: not for 300 ms, while
/// its first command runs), and as PID 1 of its namespace it would drop it;
/// the agent holds it until the handler exists.
#[test]
fn a_term_right_after_start_waits_for_the_trap_and_is_not_lost() {
    become_subreaper();
    let root = StateRoot::new("oci-term");
    let bundle = Bundle::new("term", |c| {
        c["process"]["args"] = serde_json::json!([
            "sh",
            "-c",
            "sleep 0.3; trap 'echo trapped; exit 3' TERM; while :; do sleep 0.05; done"
        ]);
    });
    let (pid, mut create_child) = create(&root, &bundle.path, "term");
    ok(&pv(&root, &["start", "term"]));
    ok(&pv(&root, &["kill", "term", "TERM"]));
    assert_eq!(
        wait_exit(pid, Duration::from_secs(10)),
        3,
        "the SIGTERM sent right after start reached the trap"
    );
    let mut out = String::new();
    std::io::Read::read_to_string(&mut create_child.stdout.take().unwrap(), &mut out).unwrap();
    assert_eq!(out, "trapped\n");
    assert_eq!(state(&root, "term")["status"], "stopped");
    ok(&pv(&root, &["delete", "term"]));
}

/// Every x86_64 system call name, from the kernel's headers (linux-libc-dev).
fn syscall_names() -> Vec<String> {
    let header = "/usr/include/x86_64-linux-gnu/asm/unistd_64.h";
    let text = std::fs::read_to_string(header)
        .unwrap_or_else(|e| panic!("{header}: {e} (install Debian's linux-libc-dev)"));
    text.lines()
        .filter_map(|l| l.strip_prefix("#define __NR_"))
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .collect()
}

/// `linux.seccomp` is enforced in the guest, for the container and its
/// execs: a deny-list (default allow) and an allow-list (default deny) that
/// leave out sethostname; what a VM cannot do is refused at create.
#[test]
fn seccomp_profiles_are_enforced_in_the_guest_and_notify_is_refused() {
    become_subreaper();
    let root = StateRoot::new("oci-seccomp");
    let script =
        "grep Seccomp: /proc/self/status; hostname blocked 2>&1; hostname; echo still-running";
    let deny_list = serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["sethostname"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}],
    });
    let names: Vec<String> = syscall_names()
        .into_iter()
        .filter(|n| n != "sethostname")
        .collect();
    assert!(names.len() > 300, "{} syscall names", names.len());
    let allow_list = serde_json::json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [
            {"names": names, "action": "SCMP_ACT_ALLOW"},
            {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"}]},
        ],
    });
    for (name, profile, error, nnp) in [
        ("deny", deny_list, "Function not implemented", false),
        ("allow", allow_list, "Operation not permitted", true),
    ] {
        let bundle = Bundle::new(&format!("sc-{name}"), |c| {
            c["process"]["args"] = serde_json::json!(["sh", "-c", script]);
            c["process"]["noNewPrivileges"] = nnp.into();
            c["hostname"] = "box".into();
            c["linux"]["seccomp"] = profile.clone();
        });
        let out = pv(
            &root,
            &["run", "--bundle", bundle.path.to_str().unwrap(), name],
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(out.status.code(), Some(0), "{name}: {out:?}");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0].split_whitespace().collect::<Vec<_>>(),
            ["Seccomp:", "2"],
            "{name}: {text}"
        );
        assert!(
            lines[1].contains(error),
            "{name}: sethostname fails with the profile's errno: {text}"
        );
        assert_eq!(lines[2..], ["box", "still-running"], "{name}: {text}");
    }

    // An exec runs under its container's filter.
    let bundle = Bundle::new("sc-exec", |c| {
        c["process"]["args"] = serde_json::json!(["sleep", "600"]);
        c["linux"]["seccomp"] = serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["sethostname"], "action": "SCMP_ACT_ERRNO"}],
        });
    });
    let (pid, _child) = create(&root, &bundle.path, "sc-exec");
    ok(&pv(&root, &["start", "sc-exec"]));
    let out = ok(&pv(
        &root,
        &[
            "exec",
            "sc-exec",
            "sh",
            "-c",
            "grep Seccomp: /proc/self/status; hostname x 2>&1; true",
        ],
    ));
    assert!(
        out.contains("Seccomp:\t2") && out.contains("Operation not permitted"),
        "{out}"
    );
    ok(&pv(&root, &["kill", "sc-exec", "KILL"]));
    wait_exit(pid, Duration::from_secs(30));
    ok(&pv(&root, &["delete", "sc-exec"]));

    let bundle = Bundle::new("sc-notify", |c| {
        c["linux"]["seccomp"] = serde_json::json!({"defaultAction": "SCMP_ACT_NOTIFY"});
    });
    let out = pv(
        &root,
        &["run", "--bundle", bundle.path.to_str().unwrap(), "notify"],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("SCMP_ACT_NOTIFY is not supported"), "{err}");
    assert!(
        root.containers().is_empty(),
        "nothing left of a refused create"
    );
}

/// maskedPaths, readonlyPaths, process.user.umask and process.oomScoreAdj
/// applied in the guest as runc applies them; container root (without
/// CAP_SYS_ADMIN, as Docker's default) cannot lift a mask; a relative path
/// is refused at create and leaves nothing.
#[test]
fn masked_and_readonly_paths_umask_and_oom_score_adj_apply_in_the_guest() {
    become_subreaper();
    let root = StateRoot::new("oci-masked");
    let script = "echo file=$(wc -c < /etc/masked-file); \
        echo dir=$(ls -A /etc/masked-dir | wc -l); \
        touch /etc/masked-dir/x 2>/dev/null && echo dir-writable || echo dir-ro; \
        echo sys=$(awk '$5 == \"/proc/sys\" {print $6}' /proc/self/mountinfo | cut -d, -f1-4); \
        touch /etc/ro-dir/x 2>/dev/null && echo ro-writable || echo ro-ro; \
        touch /etc/other && echo other-writable; \
        umount /etc/masked-file 2>/dev/null && echo unmasked || echo mask-holds; \
        echo umask=$(umask); touch /tmp/f; echo mode=$(stat -c %a /tmp/f); \
        echo oom=$(cat /proc/self/oom_score_adj)";
    let caps: Vec<&str> = [
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FOWNER",
        "CAP_SETUID",
        "CAP_SETGID",
    ]
    .to_vec();
    let bundle = Bundle::new("masked", |c| {
        c["process"]["args"] = serde_json::json!(["sh", "-c", script]);
        c["process"]["user"]["umask"] = 0o077.into();
        c["process"]["oomScoreAdj"] = 500.into();
        c["process"]["capabilities"] = serde_json::json!({
            "bounding": caps, "effective": caps, "permitted": caps,
        });
        c["linux"]["maskedPaths"] = serde_json::json!([
            "/proc/kcore",
            "/etc/masked-file",
            "/etc/masked-dir",
            "/does/not/exist",
        ]);
        c["linux"]["readonlyPaths"] = serde_json::json!(["/proc/sys", "/etc/ro-dir", "/nor/this"]);
    });
    std::fs::write(bundle.path.join("rootfs/etc/masked-file"), "secret\n").unwrap();
    std::fs::create_dir_all(bundle.path.join("rootfs/etc/masked-dir")).unwrap();
    std::fs::write(bundle.path.join("rootfs/etc/masked-dir/secret"), "hidden").unwrap();
    std::fs::create_dir_all(bundle.path.join("rootfs/etc/ro-dir")).unwrap();
    let out = pv(
        &root,
        &["run", "--bundle", bundle.path.to_str().unwrap(), "masked"],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        [
            "file=0",
            "dir=0",
            "dir-ro",
            "sys=ro,nosuid,nodev,noexec",
            "ro-ro",
            "other-writable",
            "mask-holds",
            "umask=0077",
            "mode=600",
            "oom=500",
        ],
        "{text}"
    );
    assert!(
        bundle.path.join("rootfs/etc/masked-dir/secret").exists(),
        "the masked directory is hidden, not emptied"
    );

    let bad = Bundle::new("masked-bad", |c| {
        c["linux"]["maskedPaths"] = serde_json::json!(["proc/kcore"]);
    });
    let out = pv(
        &root,
        &[
            "create",
            "--bundle",
            bad.path.to_str().unwrap(),
            "masked-bad",
        ],
    );
    assert_ne!(
        out.status.code(),
        Some(0),
        "a relative masked path was accepted"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("maskedPaths"), "{err}");
    root.assert_clean();
}

/// Bind mounts' propagation (rshared, runbindable), recursive read-only
/// (rro, by mount_setattr) and linux.rootfsPropagation, as the guest's
/// /proc/self/mountinfo shows them.
#[test]
fn mount_propagation_and_recursive_read_only_are_as_asked() {
    become_subreaper();
    let root = StateRoot::new("oci-propagation");
    let script = "awk '{o=\"\"; for (i = 7; $i != \"-\"; i++) o = o \" \" $i; print $5, $6, o}' \
        /proc/self/mountinfo | grep -E '^(/ |/mnt/)'; \
        touch /mnt/rro/x 2>/dev/null && echo rro-writable || echo rro-holds";
    let bundle = Bundle::new("propagation", |c| {
        c["process"]["args"] = serde_json::json!(["sh", "-c", script]);
        c["linux"]["rootfsPropagation"] = "shared".into();
    });
    let mut mounts = Vec::new();
    for (name, opts) in [
        ("sh", vec!["rbind", "rshared"]),
        ("ub", vec!["bind", "runbindable"]),
        ("rro", vec!["rbind", "rro"]),
    ] {
        let src = bundle.path.join(format!("src-{name}"));
        std::fs::create_dir_all(&src).unwrap();
        mounts.push(serde_json::json!({
            "destination": format!("/mnt/{name}"), "type": "bind",
            "source": src, "options": opts,
        }));
    }
    let config = bundle.path.join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    c["mounts"].as_array_mut().unwrap().extend(mounts);
    std::fs::write(&config, c.to_string()).unwrap();
    let out = pv(
        &root,
        &["run", "--bundle", bundle.path.to_str().unwrap(), "prop"],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let line = |dest: &str| {
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(dest))
            .unwrap_or_else(|| panic!("no mount at {dest}: {text}"))
            .to_string()
    };
    assert!(
        line("/").contains("shared:"),
        "rootfsPropagation shared: {text}"
    );
    assert!(line("/mnt/sh").contains("shared:"), "rshared: {text}");
    assert!(
        line("/mnt/ub").contains("unbindable"),
        "runbindable: {text}"
    );
    let rro = line("/mnt/rro");
    let opts = rro.split_whitespace().nth(1).unwrap();
    assert!(opts.starts_with("ro"), "rro makes it read-only: {text}");
    assert!(text.contains("rro-holds"), "{text}");
    root.assert_clean();
}

/// linux.devices: nodes made in the container with their type, numbers,
/// mode and owner; a negative major is refused at create, leaving nothing.
#[test]
fn linux_devices_are_made_in_the_container() {
    become_subreaper();
    let root = StateRoot::new("oci-devices");
    let script = "ls -ln /dev/mynull /dev/sub/zero | awk '{print $1, $3, $4, $5, $6}'; \
        stat -c %F /dev/mypipe; echo x > /dev/sub/zero && echo wrote; \
        (echo x > /dev/mynull) 2>/dev/null || echo denied; head -c 3 /dev/sub/zero | wc -c";
    let bundle = Bundle::new("devices", |c| {
        c["process"]["args"] = serde_json::json!(["sh", "-c", script]);
        c["linux"]["devices"] = serde_json::json!([
            {"path": "/dev/mynull", "type": "c", "major": 1, "minor": 3,
             "fileMode": 0o600, "uid": 1000, "gid": 1001},
            {"path": "/dev/sub/zero", "type": "c", "major": 1, "minor": 5, "fileMode": 0o666},
            {"path": "/dev/mypipe", "type": "p", "major": 0, "minor": 0},
        ]);
    });
    let out = pv(
        &root,
        &["run", "--bundle", bundle.path.to_str().unwrap(), "devices"],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        [
            "crw------- 1000 1001 1, 3",
            "crw-rw-rw- 0 0 1, 5",
            "fifo",
            "wrote",
            // Its mode holds: root of the default spec has no CAP_DAC_OVERRIDE.
            "denied",
            "3",
        ],
        "{text}"
    );

    for (name, device, says) in [
        (
            "devices-bad",
            serde_json::json!({"path": "/dev/x", "type": "c", "major": -1, "minor": 0}),
            "major -1 is out of range",
        ),
        (
            "devices-type",
            serde_json::json!({"path": "/dev/x", "type": "q", "major": 1, "minor": 3}),
            "is not c, u, b or p",
        ),
    ] {
        let bad = Bundle::new(name, |c| {
            c["linux"]["devices"] = serde_json::json!([device])
        });
        let out = pv(
            &root,
            &["create", "--bundle", bad.path.to_str().unwrap(), name],
        );
        assert_ne!(out.status.code(), Some(0), "{name} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{name}: {err}");
    }
    root.assert_clean();
}
