//! VM templates and clones against real VMs: a clone runs commands, clones
//! never share identity or writable memory, a template removed under running
//! clones leaves them running, and a damaged template falls back to a cold boot.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use test_utils::{output, StateRoot};

fn podvisor(root: &StateRoot) -> Command {
    test_utils::build_dir();
    let mut c = Command::new(env!("CARGO_BIN_EXE_podvisor"));
    c.arg("--root").arg(&root.path);
    c
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn create_template(root: &StateRoot, name: &str) {
    let o = output(podvisor(root).args(["template", "create", "--name", name, "--memory", "128"]));
    assert!(o.status.success(), "template create: {}", text(&o.stderr));
}

fn clone_run(root: &StateRoot, name: &str, script: &str) -> std::process::Output {
    output(podvisor(root).args([
        "sandbox",
        "run",
        "--template",
        name,
        "--timings",
        "--",
        "sh",
        "-c",
        script,
    ]))
}

/// Starts a clone that prints "ready" and then waits for stdin to close.
fn spawn_clone(
    root: &StateRoot,
    name: &str,
    script: &str,
) -> (Child, BufReader<std::process::ChildStdout>) {
    test_utils::spawn_until_ready(
        podvisor(root)
            .args([
                "sandbox",
                "run",
                "--template",
                name,
                "--boot-timeout",
                "300",
                "--",
                "sh",
                "-c",
                script,
            ])
            .stdin(Stdio::piped()),
    )
}

#[test]
fn clone_runs_commands_and_is_its_own_machine() {
    let root = StateRoot::new("tmpl-run");
    create_template(&root, "base");
    let list = output(podvisor(&root).args(["template", "list"]));
    let listing = text(&list.stdout);
    assert!(
        listing.contains("base") && listing.contains("128Mi"),
        "{listing}"
    );

    let script = "echo hello; cat /proc/sys/kernel/random/boot_id; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; exit 5";
    let a = clone_run(&root, "base", script);
    let b = clone_run(&root, "base", script);
    for o in [&a, &b] {
        assert_eq!(o.status.code(), Some(5), "{}", text(&o.stderr));
        assert!(
            text(&o.stderr).contains("\"cloned_from\":\"base\""),
            "not a clone: {}",
            text(&o.stderr)
        );
    }
    let (a, b) = (text(&a.stdout), text(&b.stdout));
    let (a, b): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    assert_eq!((a[0], b[0]), ("hello", "hello"));
    assert_ne!(a[1], b[1], "boot_id must differ between clones");
    assert_ne!(a[2], b[2], "/dev/urandom must differ between clones");
    assert_eq!(a[2].len(), 64);
}

#[test]
fn clones_never_share_writable_memory() {
    // Both clones start from the same memory image and do the same thing,
    // so their writes land on the same guest pages; each must read its own.
    let root = StateRoot::new("tmpl-cow");
    create_template(&root, "base");
    let script = |v: &str| format!("echo ready; echo {v} > /dev/shm/x; read go; cat /dev/shm/x");
    let (mut a, mut a_out) = spawn_clone(&root, "base", &script("value-from-a"));
    let (mut b, mut b_out) = spawn_clone(&root, "base", &script("value-from-b"));
    template_memory_is_read_only(&root);
    for c in [&mut a, &mut b] {
        c.stdin.take().unwrap().write_all(b"go\n").unwrap();
    }
    let mut line = String::new();
    a_out.read_line(&mut line).unwrap();
    assert_eq!(line, "value-from-a\n");
    line.clear();
    b_out.read_line(&mut line).unwrap();
    assert_eq!(line, "value-from-b\n");
    assert!(a.wait().unwrap().success() && b.wait().unwrap().success());
}

/// A clone's VMM holds its template's memory file open read-only (QEMU 8.2
/// and later can; an older one fails the test).
fn template_memory_is_read_only(root: &StateRoot) {
    let version = output(Command::new("qemu-system-x86_64").arg("--version"));
    let version = text(&version.stdout);
    let first = version.lines().next().unwrap_or_default().to_string();
    let number = first.split("version ").nth(1).unwrap_or_default();
    let mut parts = number.split(|c: char| !c.is_ascii_digit());
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    assert!(
        (major, minor) >= (8, 2),
        "a template's memory is mapped read-only from QEMU 8.2 (readonly=on,rom=off); \
         this is {first}: scripts/install-deps.sh installs 10.0 from bookworm-backports"
    );
    let qemus = test_utils::processes_mentioning(&root.path.to_string_lossy());
    let mut seen = 0;
    for pid in qemus {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let target = std::fs::read_link(fd.path()).unwrap_or_default();
            let t = target.to_string_lossy();
            if !(t.ends_with("/mem/memory") || t.ends_with("templates/base/memory")) {
                continue;
            }
            let info = std::fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                fd.file_name().to_string_lossy()
            ))
            .unwrap_or_default();
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
                .expect("fdinfo flags");
            assert_eq!(flags & 3, 0, "QEMU {pid} has {t} open for writing");
            seen += 1;
        }
    }
    assert!(seen > 0, "no clone's VMM holds the template memory open");
}

#[test]
fn removing_a_template_leaves_its_clones_running() {
    let root = StateRoot::new("tmpl-rm");
    create_template(&root, "base");
    let (mut clone, mut out) = spawn_clone(&root, "base", "echo ready; read x; echo still-alive");
    let o = output(podvisor(&root).args(["template", "rm", "base"]));
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(!root.path.join("templates/base").exists());
    clone.stdin.take().unwrap().write_all(b"x\n").unwrap();
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "still-alive\n");
    assert!(clone.wait().unwrap().success());
    // And it is gone for new sandboxes.
    let o = clone_run(&root, "base", "true");
    assert_ne!(o.status.code(), Some(0));
    assert!(
        text(&o.stderr).contains("template base does not exist"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn thirty_clones_alive_at_once() {
    let root = StateRoot::new("tmpl-30");
    create_template(&root, "base");
    let t = Instant::now();
    let mut clones: Vec<_> = (0..30)
        .map(|_| spawn_clone(&root, "base", "echo ready; read x; echo done"))
        .collect();
    eprintln!("30 clones ready in {:?}", t.elapsed());
    assert_eq!(root.sandboxes().len(), 30);
    for (child, _) in clones.iter_mut() {
        child.stdin.take().unwrap().write_all(b"x\n").unwrap();
    }
    for (mut child, mut out) in clones {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line, "done\n");
        assert!(child.wait().unwrap().success());
    }
}

#[test]
fn damaged_template_warns_and_boots_cold() {
    let root = StateRoot::new("tmpl-bad");
    create_template(&root, "base");
    let dir = root.path.join("templates/base");
    // A truncated device state: QEMU refuses it, the sandbox boots cold.
    let state = std::fs::read(dir.join("state")).unwrap();
    std::fs::write(dir.join("state"), &state[..state.len() / 2]).unwrap();
    let o = clone_run(&root, "base", "echo cold-but-fine");
    assert_eq!(text(&o.stdout), "cold-but-fine\n", "{}", text(&o.stderr));
    let err = text(&o.stderr);
    assert!(
        err.contains("warning: template base unusable") && err.contains("booted cold"),
        "{err}"
    );
    assert!(err.contains("\"cloned_from\":null"));
    // A truncated memory file is caught before QEMU starts.
    std::fs::write(dir.join("memory"), b"short").unwrap();
    let o = clone_run(&root, "base", "echo cold-again");
    assert_eq!(text(&o.stdout), "cold-again\n");
    assert!(
        text(&o.stderr).contains("memory file has 5 bytes"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn template_verbs_refuse_bad_input() {
    let root = StateRoot::new("tmpl-input");
    let bad = |args: &[&str], expect: &str| {
        let o = output(podvisor(&root).args(args));
        assert_ne!(o.status.code(), Some(0));
        assert!(
            text(&o.stderr).contains(expect),
            "{args:?}: {}",
            text(&o.stderr)
        );
    };
    bad(
        &["template", "create", "--name", "../x"],
        "invalid template name",
    );
    bad(&["template", "rm", "nope"], "template nope does not exist");
    bad(
        &["template", "create", "--name", "t", "--memory", "1"],
        "too small",
    );
    bad(
        &["sandbox", "run", "--template", "nope", "--", "true"],
        "template nope does not exist",
    );
    assert!(!root.path.join("templates/t").exists());
}

#[test]
fn oci_run_clones_its_vm_from_the_policy_template() {
    let root = StateRoot::new("oci-policy");
    // The container's VM is the default shape (256 MiB, 1 vCPU, no NIC).
    let o =
        output(podvisor(&root).args(["template", "create", "--name", "oci", "--memory", "256"]));
    assert!(o.status.success(), "template create: {}", text(&o.stderr));
    let policy = root.path.join("policy.toml");
    std::fs::write(&policy, "template = \"oci\"\n").unwrap();
    let log = root.path.join("run.log");
    let bundle = test_utils::Bundle::new("policy", |c| {
        c["process"]["args"] = serde_json::json!(["sh", "-c", "echo hi from $(hostname); exit 3"]);
        c["hostname"] = "cloned-box".into();
    });
    let out = output(
        podvisor(&root)
            .env("PODVISOR_CONFIG", &policy)
            .arg("--log")
            .arg(&log)
            .args(["run", "--bundle", bundle.path.to_str().unwrap(), "c1"]),
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hi from cloned-box\n");
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        logged.contains("cloned the VM") && logged.contains("oci"),
        "the holder's log: {logged}"
    );
    // A policy naming a template that does not fit: a cold boot, said why.
    let o =
        output(podvisor(&root).args(["template", "create", "--name", "tiny", "--memory", "128"]));
    assert!(o.status.success(), "template create: {}", text(&o.stderr));
    std::fs::write(&policy, "template = \"tiny\"\n").unwrap();
    let out = output(
        podvisor(&root)
            .env("PODVISOR_CONFIG", &policy)
            .arg("--log")
            .arg(&log)
            .args(["run", "--bundle", bundle.path.to_str().unwrap(), "c2"]),
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        logged.contains("does not fit"),
        "the holder's log: {logged}"
    );
    root.assert_clean();
}
