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

/// The daemon, killed if the test fails before it stops it (its VMs die with it).
struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn pool_hands_out_ready_clones_and_refills() {
    let root = StateRoot::new("pool");
    let o = output(podvisor(&root).args(["template", "create", "--name", "p", "--memory", "128"]));
    assert!(o.status.success(), "{}", text(&o.stderr));
    let config = root.path.join("config.toml");
    std::fs::write(&config, "[[pool]]\ntemplate = \"p\"\nsize = 2\n").unwrap();
    let (daemon, _out) = spawn_until_ready(
        podvisor(&root)
            .arg("pool")
            .arg("serve")
            .arg("--config")
            .arg(&config),
    );
    let mut daemon = Daemon(daemon);
    wait_status(&root, &config, "p: 2 of 2 ready");

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
    let deadline = Instant::now() + Duration::from_secs(30);
    while root.sandboxes().len() != 2 {
        assert!(
            Instant::now() < deadline,
            "the killed caller's clone stayed: {:?}",
            root.sandboxes()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // SIGTERM: the daemon retires its ready clones and leaves nothing.
    // SAFETY: kill with the pid of our own child.
    unsafe { libc::kill(daemon.0.id() as i32, libc::SIGTERM) };
    assert!(daemon.0.wait().unwrap().success());
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
