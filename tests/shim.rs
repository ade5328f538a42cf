//! containerd 1.6 (Debian) with podvisor's own shim:
//! `ctr run --runtime io.containerd.podvisor.v2`, each container a pod (one
//! VM) of its own. Faults: the shim or QEMU killed under a running task.

use std::time::{Duration, Instant};

use podvisor_client_tests::{ok, Containerd};
use test_utils::{output, processes_mentioning};

const RUNTIME: &str = "io.containerd.podvisor.v2";
const IMAGE: &str = "localhost/busybox:latest";

fn ctr(c: &Containerd, args: &[&str]) -> std::process::Output {
    output(c.ctr().args(args))
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The task's status as `ctr task ls` shows it ("" when there is none).
fn task_status(c: &Containerd, id: &str) -> String {
    ok(&ctr(c, &["task", "ls"]))
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or("")
        .to_string()
}

/// No VM, shim, mount or state directory of this containerd's is left.
fn assert_nothing_left(c: &Containerd, after: &str) {
    let root = c.pv_root();
    let mut left = (Vec::new(), Vec::new(), Vec::new());
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let entries = |sub: &str| test_utils::names_in(&root.join(sub));
        left.0 = entries("sandboxes");
        left.1 = entries("pods");
        left.2 = processes_mentioning(&root.to_string_lossy());
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mounted: Vec<&str> = mounts
            .lines()
            .filter(|l| l.contains(&*c.dir.0.to_string_lossy()))
            .collect();
        if left.0.is_empty() && left.1.is_empty() && left.2.is_empty() && mounted.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "left behind {after}: sandboxes {:?}, pods {:?}, processes {:?}, mounts {mounted:?}",
            left.0,
            left.1,
            left.2
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn ctr_runs_execs_inspects_and_kills_through_the_podvisor_shim() {
    let c = Containerd::start();
    c.import_busybox("default");

    assert_eq!(
        ok(&ctr(
            &c,
            &[
                "run",
                "--rm",
                "--runtime",
                RUNTIME,
                IMAGE,
                "s1",
                "echo",
                "hi"
            ]
        )),
        "hi\n",
        "{}",
        c.log()
    );
    let uname = ok(&ctr(
        &c,
        &[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            IMAGE,
            "s2",
            "uname",
            "-r",
        ],
    ));
    assert_ne!(
        uname.trim(),
        podvisor_client_tests::host_kernel().trim(),
        "ran in a VM"
    );
    // stdin reaches the container whole, and its end (CloseIO) ends `cat`.
    let data: String = (0..2000).map(|i| format!("line {i}\n")).collect();
    let mut cat = c
        .ctr()
        .args(["run", "--rm", "--runtime", RUNTIME, IMAGE, "s6", "cat"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = cat.stdin.take().unwrap();
        stdin.write_all(data.as_bytes()).unwrap();
    }
    let out = cat.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), data);
    let exit = ctr(
        &c,
        &[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            IMAGE,
            "s3",
            "sh",
            "-c",
            "exit 7",
        ],
    );
    assert_eq!(exit.status.code(), Some(7), "{exit:?}");

    run_sleeping(&c, "s4");
    assert_eq!(task_status(&c, "s4"), "RUNNING");
    assert_eq!(
        ok(&ctr(
            &c,
            &[
                "task",
                "exec",
                "--exec-id",
                "e1",
                "s4",
                "sh",
                "-c",
                "echo $((6*7))"
            ]
        )),
        "42\n"
    );
    // The agent forgets a finished exec: its id can be used again.
    assert_eq!(
        ok(&ctr(
            &c,
            &["task", "exec", "--exec-id", "e1", "s4", "echo", "again"]
        )),
        "again\n"
    );
    let exec_exit = ctr(
        &c,
        &[
            "task",
            "exec",
            "--exec-id",
            "e2",
            "s4",
            "sh",
            "-c",
            "exit 3",
        ],
    );
    assert_eq!(exec_exit.status.code(), Some(3), "{exec_exit:?}");
    let ps = ok(&ctr(&c, &["task", "ps", "s4"]));
    assert!(ps.lines().count() >= 2, "task ps: {ps}");
    let metrics = ok(&ctr(&c, &["task", "metrics", "s4"]));
    assert!(
        metrics.contains("memory") && metrics.contains("pids"),
        "task metrics: {metrics}"
    );
    ok(&ctr(&c, &["task", "pause", "s4"]));
    assert_eq!(task_status(&c, "s4"), "PAUSED");
    ok(&ctr(&c, &["task", "resume", "s4"]));
    assert_eq!(task_status(&c, "s4"), "RUNNING");
    ok(&ctr(&c, &["task", "kill", "--signal", "SIGKILL", "s4"]));
    wait_until("s4 stopped", Duration::from_secs(30), || {
        task_status(&c, "s4") == "STOPPED"
    });
    ok(&ctr(&c, &["task", "delete", "s4"]));
    ok(&ctr(&c, &["container", "delete", "s4"]));

    // Bad input: checkpoint is refused; an exec into a missing task fails.
    run_sleeping(&c, "s5");
    let cp = ctr(&c, &["task", "checkpoint", "s5"]);
    assert!(!cp.status.success(), "checkpoint must fail: {cp:?}");
    assert!(
        String::from_utf8_lossy(&cp.stderr).contains("not supported"),
        "{cp:?}"
    );
    let missing = ctr(&c, &["task", "exec", "--exec-id", "e1", "nope", "true"]);
    assert!(!missing.status.success());
    ok(&ctr(&c, &["task", "kill", "--signal", "SIGKILL", "s5"]));
    wait_until("s5 stopped", Duration::from_secs(30), || {
        task_status(&c, "s5") == "STOPPED"
    });
    ok(&ctr(&c, &["task", "delete", "s5"]));
    ok(&ctr(&c, &["container", "delete", "s5"]));
    assert_nothing_left(&c, "the ctr session");
}

/// The pid of the process whose command line has all of `words`.
fn pid_of(words: &[&str]) -> Option<i32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        words.iter().all(|w| cmd.contains(w)).then_some(pid)
    })
}

/// `ctr run -d` of a container `id` that sleeps, in a pod of its own.
fn run_sleeping(c: &Containerd, id: &str) {
    ok(&ctr(
        c,
        &["run", "-d", "--runtime", RUNTIME, IMAGE, id, "sleep", "600"],
    ));
}

#[test]
fn a_killed_shim_or_vm_ends_the_task_and_leaves_nothing() {
    let c = Containerd::start();
    c.import_busybox("default");
    let root = c.pv_root();
    let root = root.to_string_lossy();

    // QEMU killed: the task exits (137) and containerd sees it stopped.
    run_sleeping(&c, "q1");
    let qemu = pid_of(&["qemu-system", &root]).expect("the pod's QEMU");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(qemu), nix::sys::signal::SIGKILL).unwrap();
    wait_until(
        "q1 stopped after its VM died",
        Duration::from_secs(30),
        || task_status(&c, "q1") == "STOPPED",
    );
    let info = ok(&ctr(&c, &["task", "delete", "q1"]));
    assert!(info.contains("137") || info.is_empty(), "{info}");
    ok(&ctr(&c, &["container", "delete", "q1"]));
    assert_nothing_left(&c, "QEMU was killed");

    // The shim killed: containerd cleans up (shim delete), the VM dies with
    // the shim, and nothing stays behind.
    run_sleeping(&c, "k1");
    let shim = pid_of(&["containerd-shim-podvisor-v2", "-id k1"]).expect("the shim");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(shim), nix::sys::signal::SIGKILL).unwrap();
    wait_until(
        "k1 gone after its shim died",
        Duration::from_secs(30),
        || {
            let s = task_status(&c, "k1");
            s.is_empty() || s == "STOPPED"
        },
    );
    let _ = ctr(&c, &["task", "delete", "k1"]);
    ok(&ctr(&c, &["container", "delete", "k1"]));
    assert_nothing_left(&c, "the shim was killed");
}

#[test]
fn a_frozen_guest_does_not_lock_the_shim() {
    // A guest call that hangs (its VMM stopped) must not hold the pod's
    // lock: containerd's other calls on the pod answer meanwhile.
    let c = Containerd::start();
    c.import_busybox("default");
    let root = c.pv_root();
    let root = root.to_string_lossy();
    run_sleeping(&c, "f1");
    let qemu = pid_of(&["qemu-system", &root]).expect("the pod's QEMU");
    let qemu = nix::unistd::Pid::from_raw(qemu);
    nix::sys::signal::kill(qemu, nix::sys::signal::SIGSTOP).unwrap();
    // The pause waits for a guest that cannot answer (up to its deadline).
    let mut pause = c
        .ctr()
        .args(["task", "pause", "f1"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let t = Instant::now();
    let status = task_status(&c, "f1");
    let took = t.elapsed();
    assert_eq!(status, "RUNNING", "task ls during a hung pause");
    assert!(
        took < Duration::from_secs(5),
        "task ls waited {took:?} behind a hung guest call"
    );
    assert!(
        pause.try_wait().unwrap().is_none(),
        "the pause did not wait for the frozen guest"
    );
    // The VM killed: the task ends and the hung call fails.
    nix::sys::signal::kill(qemu, nix::sys::signal::SIGKILL).unwrap();
    wait_until(
        "f1 stopped after its VM died",
        Duration::from_secs(30),
        || task_status(&c, "f1") == "STOPPED",
    );
    let paused = pause.wait().unwrap();
    assert!(!paused.success(), "a pause of a dead VM succeeded");
    let _ = ctr(&c, &["task", "delete", "f1"]);
    ok(&ctr(&c, &["container", "delete", "f1"]));
    assert_nothing_left(&c, "a frozen guest");
}
