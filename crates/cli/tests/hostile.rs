//! A hostile guest against the host: attacks run from inside real guests, as
//! container root with the default OCI capabilities and as a privileged
//! container, and the jail checked from the host. Each attack must fail and
//! leave the host as it was.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use test_utils::{build_dir, output, Bundle, StateRoot};

fn pv(root: &StateRoot) -> Command {
    let mut c = Command::new(build_dir().join("podvisor"));
    c.arg("--root").arg(&root.path);
    c
}

fn text(o: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Every capability a privileged container gets.
const ALL_CAPS: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// The attack script: device nodes, set-id bits and a file capability on
/// files in the container's root, which is the host directory over 9p.
const PLANT: &str = "mknod /blk b 8 0 2>/dev/null; chmod 0666 /blk 2>/dev/null; \
    mknod /chr c 1 1 2>/dev/null; chmod 0666 /chr 2>/dev/null; \
    cp /bin/busybox /suid; chmod 4755 /suid 2>/dev/null; \
    cp /bin/busybox /sgid; chmod 2755 /sgid 2>/dev/null; \
    cp /bin/busybox /capped; \
    printf 'planted\\n'";

/// Runs PLANT in a container whose root is `bundle`'s, then checks what the
/// host sees there: no device it can open, nothing set-id or capable.
fn plant_and_check(privileged: bool) {
    let root = StateRoot::new(if privileged {
        "hostile-priv"
    } else {
        "hostile"
    });
    let bundle = Bundle::new("hostile", |c| {
        c["process"]["args"] = serde_json::json!(["sh", "-c", PLANT]);
        if privileged {
            let caps = serde_json::json!(ALL_CAPS.to_vec());
            for set in ["bounding", "effective", "permitted"] {
                c["process"]["capabilities"][set] = caps.clone();
            }
        }
    });
    let o = output(
        pv(&root)
            .args(["run", "--bundle"])
            .arg(&bundle.path)
            .arg("hostile"),
    );
    assert!(text(&o).contains("planted"), "{}", text(&o));
    let rootfs = bundle.path.join("rootfs");
    for dev in ["blk", "chr"] {
        let p = rootfs.join(dev);
        if let Ok(m) = std::fs::symlink_metadata(&p) {
            use std::os::unix::fs::FileTypeExt;
            let t = m.file_type();
            assert!(
                !t.is_block_device() && !t.is_char_device(),
                "the guest made a real device node {} ({:o})",
                p.display(),
                m.mode()
            );
        }
    }
    for f in ["suid", "sgid", "capped"] {
        let p = rootfs.join(f);
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o6000,
            0,
            "{} is set-id on the host: {mode:o}",
            p.display()
        );
        let mut cap = [0u8; 64];
        let name = std::ffi::CString::new("security.capability").unwrap();
        let path = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: getxattr on NUL-terminated strings into a buffer we own.
        let n =
            unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), cap.as_mut_ptr().cast(), 64) };
        assert!(n < 0, "{} has a file capability on the host", p.display());
    }
}

#[test]
fn no_device_or_setid_file_reaches_the_host() {
    plant_and_check(false);
}

#[test]
fn no_device_or_setid_file_reaches_the_host_from_a_privileged_container() {
    plant_and_check(true);
}

fn sha(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

#[test]
fn a_run_cannot_change_the_next_runs_root() {
    let root = StateRoot::new("hostile-rootfs");
    let sh = build_dir().join("rootfs/bin/busybox");
    let before = sha(&sh);
    let o = output(pv(&root).args([
        "sandbox",
        "run",
        "--",
        "sh",
        "-c",
        "echo evil > /bin/sh; echo evil > /bin/busybox; rm -f /bin/ls; echo done",
    ]));
    assert!(text(&o).contains("done"), "{}", text(&o));
    assert_eq!(sha(&sh), before, "a run changed the default root's busybox");
    assert!(
        build_dir().join("rootfs/bin/ls").exists(),
        "a run removed /bin/ls"
    );
    let o = output(pv(&root).args([
        "sandbox",
        "run",
        "--",
        "sh",
        "-c",
        "ls /bin/ls && echo fine",
    ]));
    assert!(text(&o).contains("fine"), "{}", text(&o));
}

#[test]
fn hostname_with_a_space_is_refused() {
    let root = StateRoot::new("hostile-hostname");
    for bad in ["a rdinit=/bin/sh", "x\ty", &"a".repeat(70)] {
        let o = output(pv(&root).args(["sandbox", "run", "--hostname", bad, "--", "true"]));
        assert!(!o.status.success());
        assert!(text(&o).contains("invalid hostname"), "{}", text(&o));
    }
}

/// Waits (10 s at most) for the VMMs of `root` to die with their owner.
fn wait_processes_gone(root: &StateRoot) {
    let t = Instant::now();
    while !root.processes().is_empty() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Total size of a capped log and its older half.
fn log_size(dir: &Path) -> u64 {
    ["console.log", "console.log.1"]
        .iter()
        .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
        .map(|m| m.len())
        .sum()
}

#[test]
fn a_console_flood_stays_at_the_cap() {
    // The guest kernel's own init writes 4 MiB to the serial console.
    let root = StateRoot::new("hostile-console");
    let initrd = test_utils::script_initrd(
        &root.path,
        "/bin/busybox mkdir -p /dev; /bin/busybox mount -t devtmpfs dev /dev; \
         /bin/busybox yes 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef \
         | /bin/busybox head -c 4194304 > /dev/ttyS0; echo FLOOD-DONE > /dev/ttyS0; \
         /bin/busybox sleep 1000",
    );
    let mut child = pv(&root)
        .args(["sandbox", "run", "--boot-timeout", "200", "--initrd"])
        .arg(&initrd)
        .args(["--", "true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let mut max = 0;
    let mut done = false;
    while t.elapsed() < Duration::from_secs(180) && !done {
        for sb in root.sandboxes() {
            let dir = root.path.join("sandboxes").join(sb);
            max = max.max(log_size(&dir));
            let tail = std::fs::read_to_string(dir.join("console.log")).unwrap_or_default();
            done |= tail.contains("FLOOD-DONE");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = child.kill();
    let _ = child.wait();
    wait_processes_gone(&root);
    assert!(done, "the guest did not finish its flood within 180 s");
    assert!(max <= 1 << 20, "console logs grew to {max} bytes");
    assert!(
        max >= 512 << 10,
        "the log kept less than half its cap: {max}"
    );
    // The killed run's VM and directory go at the next call.
    let _ = output(pv(&root).arg("list"));
}

/// The first QEMU whose command line names `needle`.
fn qemu_of(needle: &str) -> Option<u32> {
    test_utils::qemu_mentioning(needle)
}

fn status_field(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{field}:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default()
}

#[test]
fn qemu_runs_jailed() {
    let root = StateRoot::new("hostile-jail");
    let (mut child, _out) = test_utils::spawn_until_ready(
        pv(&root)
            .args(["sandbox", "run", "--", "sh", "-c", "echo ready; sleep 30"])
            .stdin(Stdio::null()),
    );
    let pid = qemu_of(&root.path.to_string_lossy()).expect("no QEMU for this root");
    let uid: u32 = status_field(pid, "Uid")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(uid >= 0x5000_0000, "QEMU runs as uid {uid}");
    for f in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(status_field(pid, f), "000000000000000f", "{f}");
    }
    assert_eq!(status_field(pid, "Seccomp"), "2");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    // It holds neither its supervisor's sockets (it could answer the front
    // end in the supervisor's name) nor its state directory's lock.
    let fds = |p: &str| -> Vec<String> {
        std::fs::read_dir(format!("/proc/{p}/fd"))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| std::fs::read_link(e.path()).ok())
                    .map(|l| l.to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let supervisor = status_field(pid, "PPid");
    let ours = fds(&supervisor);
    assert!(!ours.is_empty(), "no supervisor's descriptors seen");
    for fd in fds(&pid.to_string()) {
        let shared_socket = fd.starts_with("socket:") && ours.contains(&fd);
        assert!(!shared_socket && !fd.ends_with("/lock"), "QEMU holds {fd}");
    }
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/mnt")).unwrap();
    assert_ne!(
        ns(&pid.to_string()),
        ns("self"),
        "QEMU shares our mount namespace"
    );
    let mut top: Vec<String> = test_utils::names_in(&PathBuf::from(format!("/proc/{pid}/root")));
    top.sort();
    assert_eq!(
        top,
        ["bin", "boot", "dev", "etc", "lib", "lib64", "proc", "sbin", "share", "usr", "vm"]
    );
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    for m in mounts.lines() {
        let point = m.split(' ').nth(4).unwrap();
        let opts = m.split(' ').nth(5).unwrap();
        if point.starts_with("/share") || point == "/usr" || point == "/vm" {
            assert!(opts.contains("nosuid") && opts.contains("nodev"), "{m}");
        }
    }
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let leaf = cgroup
        .lines()
        .find_map(|l| l.split(':').nth(2).filter(|p| p.starts_with("/podvisor/")))
        .expect("QEMU is not in a podvisor cgroup")
        .to_string();
    let v2 = Path::new("/sys/fs/cgroup").join(leaf.trim_start_matches('/'));
    let (mem, pids) = if v2.join("memory.max").exists() {
        (v2.join("memory.max"), v2.join("pids.max"))
    } else {
        let v1 = |c: &str| {
            Path::new("/sys/fs/cgroup")
                .join(c)
                .join(leaf.trim_start_matches('/'))
        };
        (
            v1("memory").join("memory.limit_in_bytes"),
            v1("pids").join("pids.max"),
        )
    };
    let mem: u64 = std::fs::read_to_string(mem)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(mem > 256 << 20 && mem < 2 << 30, "memory limit {mem}");
    assert_eq!(std::fs::read_to_string(pids).unwrap().trim(), "512");
    let _ = child.kill();
    let _ = child.wait();
    // QEMU dies with its owner (parent-death signal, set again after the
    // jail changed its uid).
    wait_processes_gone(&root);
    assert_eq!(
        root.processes(),
        Vec::<u32>::new(),
        "QEMU outlived its owner"
    );
    let _ = output(pv(&root).arg("list"));
}

#[test]
fn a_killed_template_create_leaves_nothing_after_the_next_call() {
    let root = StateRoot::new("hostile-template");
    let mut child = pv(&root)
        .args(["template", "create", "--name", "t"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let staging = root.path.join("templates");
    let t = Instant::now();
    while test_utils::names_in(&staging).is_empty() && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    let _ = child.kill();
    let _ = child.wait();
    let _ = output(pv(&root).arg("list"));
    assert_eq!(test_utils::names_in(&staging), Vec::<String>::new());
}

#[test]
fn a_second_pool_serve_is_refused() {
    let root = StateRoot::new("hostile-pool");
    let o = output(pv(&root).args(["template", "create", "--name", "p"]));
    assert!(o.status.success(), "{}", text(&o));
    let config = root.path.join("config.toml");
    std::fs::write(&config, "[[pool]]\ntemplate = \"p\"\nsize = 1\n").unwrap();
    let mut first = quiet_group(pv(&root).args(["pool", "serve", "--config"]).arg(&config));
    let sock = root.path.join("pools/p.sock");
    let t = Instant::now();
    while !sock.exists() && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let second = output(pv(&root).args(["pool", "serve", "--config"]).arg(&config));
    assert!(!second.status.success());
    assert!(
        text(&second).contains("already served"),
        "{}",
        text(&second)
    );
    assert!(
        sock.exists(),
        "the second daemon removed the first one's socket"
    );
    // SAFETY: a signal to the child we spawned.
    unsafe { libc::kill(first.id() as i32, libc::SIGTERM) };
    let _ = first.wait();
    let _ = output(pv(&root).args(["template", "rm", "p"]));
}

/// Runs `args` and returns its output and how long it took.
fn timed(root: &StateRoot, args: &[&str]) -> (Output, Duration) {
    let t = Instant::now();
    let o = output(pv(root).args(args));
    (o, t.elapsed())
}

#[test]
fn a_frozen_guest_does_not_hang_the_verbs() {
    let root = StateRoot::new("hostile-frozen");
    let bundle = Bundle::new("frozen", |c| {
        c["process"]["args"] = serde_json::json!(["sleep", "600"]);
    });
    let mut run = pv(&root)
        .args(["run", "--bundle"])
        .arg(&bundle.path)
        .arg("frozen")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    loop {
        let o = output(pv(&root).args(["state", "frozen"]));
        if String::from_utf8_lossy(&o.stdout).contains("\"running\"") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "never running: {}",
            text(&o)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The guest stops answering anything: its VMM is frozen.
    let qemu = qemu_of(&root.path.to_string_lossy()).expect("no QEMU");
    // SAFETY: a signal to the QEMU this test's container runs in.
    unsafe { libc::kill(qemu as i32, libc::SIGSTOP) };
    let (o, took) = timed(&root, &["ps", "frozen"]);
    assert!(
        !o.status.success() && took < Duration::from_secs(15),
        "ps: {took:?} {}",
        text(&o)
    );
    assert!(text(&o).contains("did not answer"), "{}", text(&o));
    let (o, took) = timed(&root, &["state", "frozen"]);
    assert!(
        o.status.success() && took < Duration::from_secs(2),
        "state: {took:?} {}",
        text(&o)
    );
    let (o, took) = timed(&root, &["kill", "frozen", "9"]);
    assert!(
        o.status.success() && took < Duration::from_secs(15),
        "kill: {took:?} {}",
        text(&o)
    );
    let (o, took) = timed(&root, &["delete", "--force", "frozen"]);
    // `run` may be removing it at the same time, once its VM was gone:
    // either way it answers quickly and the container is gone soon after.
    assert!(
        took < Duration::from_secs(15),
        "delete: {took:?} {}",
        text(&o)
    );
    let t = Instant::now();
    while !root.containers().is_empty() && t.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(root.containers(), Vec::<String>::new(), "{}", text(&o));
    let _ = run.kill();
    let _ = run.wait();
    wait_processes_gone(&root);
    // The killed holder's sandbox directory goes at the next call.
    let _ = output(pv(&root).arg("list"));
}

#[test]
fn annotations_cannot_name_a_kernel_or_outgrow_the_limits() {
    let root = StateRoot::new("hostile-annotations");
    let cases: [(serde_json::Value, &str); 3] = [
        (
            serde_json::json!({"io.podvisor.kernel": "/etc/shadow"}),
            "valid_kernel_paths",
        ),
        (
            serde_json::json!({"io.podvisor.vm.memory": "8192"}),
            "above the memory limit",
        ),
        (
            serde_json::json!({"io.podvisor.vm.vcpus": "8"}),
            "above the CPU limit",
        ),
    ];
    for (i, (annotations, why)) in cases.into_iter().enumerate() {
        let bundle = Bundle::new("annotations", |c| {
            c["process"]["args"] = serde_json::json!(["true"]);
            c["annotations"] = annotations.clone();
            c["linux"]["resources"] = serde_json::json!({
                "memory": {"limit": 268435456},
                "cpu": {"quota": 100000, "period": 100000}
            });
        });
        let id = format!("a{i}");
        let o = output(
            pv(&root)
                .args(["run", "--bundle"])
                .arg(&bundle.path)
                .arg(&id),
        );
        assert!(!o.status.success(), "{annotations}: {}", text(&o));
        assert!(text(&o).contains(why), "{annotations}: {}", text(&o));
        let _ = output(pv(&root).args(["delete", "--force", &id]));
    }
}

/// `run`s container `id` (its config edited by `edit`) that says ready and
/// sleeps; returns the running `run`, its QEMU's pid and the bundle.
fn run_until_ready(
    root: &StateRoot,
    id: &str,
    edit: impl FnOnce(&mut serde_json::Value),
) -> (std::process::Child, u32, Bundle) {
    let bundle = Bundle::new(id, |c| {
        c["process"]["args"] = serde_json::json!(["sh", "-c", "echo ready; sleep 60"]);
        edit(c);
    });
    let (child, _out) = test_utils::spawn_until_ready(
        pv(root)
            .args(["run", "--bundle"])
            .arg(&bundle.path)
            .arg(id)
            .stdin(Stdio::null()),
    );
    let pid = qemu_of(&root.path.to_string_lossy()).expect("no QEMU for this root");
    (child, pid, bundle)
}

#[test]
fn a_full_share_top_gives_enospc_not_host_memory() {
    // The share's top directory is what a guest kernel (through QEMU's 9p
    // server) can fill besides the container's own files: it is a capped
    // tmpfs. Written from inside the VMM's jail, as a compromised guest
    // would have QEMU write.
    let root = StateRoot::new("hostile-top");
    let (mut child, pid, _bundle) = run_until_ready(&root, "top", |_| {});
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let top = mounts
        .lines()
        .find(|m| m.split(' ').nth(4) == Some("/share/0"))
        .expect("no /share/0 in the jail");
    assert!(
        top.contains(" - tmpfs "),
        "the share top is not a tmpfs: {top}"
    );
    let fill = output(
        Command::new("nsenter")
            .arg("-t")
            .arg(pid.to_string())
            .args([
                "-m",
                "--",
                "/usr/bin/dd",
                "if=/dev/zero",
                "of=/share/0/fill",
                "bs=64k",
                "count=64",
            ]),
    );
    let said = text(&fill);
    assert!(!fill.status.success(), "4 MiB fit in the share top: {said}");
    assert!(said.contains("No space left on device"), "{said}");
    let size = output(
        Command::new("nsenter")
            .arg("-t")
            .arg(pid.to_string())
            .args(["-m", "--", "/usr/bin/stat", "-c", "%s", "/share/0/fill"]),
    );
    let size: u64 = String::from_utf8_lossy(&size.stdout)
        .trim()
        .parse()
        .unwrap();
    assert!(size <= 1 << 20, "the share top took {size} bytes");
    let _ = child.kill();
    let _ = child.wait();
    wait_processes_gone(&root);
    let _ = output(pv(&root).args(["delete", "--force", "top"]));
}

#[test]
fn a_write_under_a_submount_of_a_read_only_bind_is_refused() {
    // A privileged container remounts its read-only volume read-write in the
    // guest: the host side is read-only throughout, submounts included.
    let root = StateRoot::new("hostile-ro");
    let vol = root.path.join("vol");
    std::fs::create_dir_all(vol.join("sub")).unwrap();
    let bundle = Bundle::new("ro", |c| {
        let caps = serde_json::json!(ALL_CAPS.to_vec());
        for set in ["bounding", "effective", "permitted"] {
            c["process"]["capabilities"][set] = caps.clone();
        }
        c["process"]["args"] = serde_json::json!([
            "sh",
            "-c",
            "mount -o remount,rw,bind /vol 2>&1; mount -o remount,rw,bind /vol/sub 2>&1; \
             echo x > /vol/top; echo top=$?; echo x > /vol/sub/f; echo sub=$?"
        ]);
        c["mounts"].as_array_mut().unwrap().push(serde_json::json!({
            "destination": "/vol",
            "type": "bind",
            "source": vol,
            "options": ["rbind", "ro"]
        }));
    });
    // The submount exists only in this command's mount namespace (and the
    // holder's, which inherits it): nothing is left on the host.
    let script = format!(
        "mount -t tmpfs -o size=1m podvisor-test {} && exec \"$@\"",
        vol.join("sub").display()
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["-m", "--propagation", "slave", "sh", "-c", &script, "sh"])
        .arg(build_dir().join("podvisor"))
        .arg("--root")
        .arg(&root.path)
        .args(["run", "--bundle"])
        .arg(&bundle.path)
        .arg("ro");
    let o = output(&mut cmd);
    let said = text(&o);
    eprintln!("{said}");
    assert!(said.contains("top=1") || said.contains("top=2"), "{said}");
    assert!(said.contains("sub=1") || said.contains("sub=2"), "{said}");
    assert!(said.contains("Read-only file system"), "{said}");
    assert!(
        !vol.join("top").exists(),
        "the guest wrote through a ro bind"
    );
    let _ = output(pv(&root).args(["delete", "--force", "ro"]));
}

#[test]
fn the_vm_goes_in_the_containers_cgroups_path_with_its_cpu_limit() {
    let root = StateRoot::new("hostile-cgroup");
    let parent = format!("podvisor-test-{}", std::process::id());
    let leaf = format!("{parent}/c1");
    let (mut child, pid, _bundle) = run_until_ready(&root, "cg", |c| {
        c["linux"]["cgroupsPath"] = format!("/{leaf}").into();
        c["linux"]["resources"]["cpu"] = serde_json::json!({"quota": 50000, "period": 100000});
    });
    test_utils::in_cgroup(pid, &leaf).unwrap();
    assert_eq!(test_utils::cpu_quota(&leaf), Some(50000), "half a CPU");
    let _ = child.kill();
    let _ = child.wait();
    wait_processes_gone(&root);
    let _ = output(pv(&root).args(["delete", "--force", "cg"]));
    // The leaf goes with the VM; the parent was made for it and stays, as
    // runc leaves it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while test_utils::cgroup_file(&leaf, "", "memory", "").exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let left = test_utils::cgroup_file(&leaf, "", "memory", "").exists();
    for ctl in ["", "memory", "pids", "cpu"] {
        let base = Path::new("/sys/fs/cgroup").join(ctl);
        let _ = std::fs::remove_dir(base.join(&leaf));
        let _ = std::fs::remove_dir(base.join(&parent));
    }
    assert!(!left, "the VM's cgroup {leaf} outlived it");

    // A path out of the hierarchy is refused before anything starts.
    let bad = Bundle::new("cgroup-bad", |c| {
        c["linux"]["cgroupsPath"] = "/a/../../etc".into();
    });
    let o = output(
        pv(&root)
            .args(["run", "--bundle"])
            .arg(&bad.path)
            .arg("cgbad"),
    );
    assert!(!o.status.success());
    assert!(text(&o).contains("cgroupsPath"), "{}", text(&o));
    assert_eq!(root.processes(), Vec::<u32>::new());
}

/// Spawns `cmd` in a process group of its own, with no stdio.
fn quiet_group(cmd: &mut Command) -> std::process::Child {
    cmd.process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// When a SIGKILL lands: from right after the start to after the VM is up
/// (a cold TCG boot takes about 2 s here).
const KILL_AFTER_MS: [u64; 5] = [30, 250, 700, 1400, 3000];

/// Runs `start` (a fresh command each time) and kills its process group with
/// SIGKILL after each of KILL_AFTER_MS, then runs `next` (the call a client
/// makes next) and checks nothing of it is left: no process, mount,
/// directory, socket or memory file under the root.
fn killed_at_each_step(
    root: &StateRoot,
    mut start: impl FnMut() -> Command,
    mut next: impl FnMut(),
    kept: &[&str],
) {
    for ms in KILL_AFTER_MS {
        let mut child = quiet_group(&mut start());
        std::thread::sleep(Duration::from_millis(ms));
        // SAFETY: a signal to the process group of the child we spawned.
        unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
        let _ = child.wait();
        // What it started dies with it (parent-death signals); then the
        // next call collects what is left on disk.
        wait_processes_gone(root);
        next();
        let at = format!("killed after {ms} ms");
        assert_eq!(root.processes(), Vec::<u32>::new(), "processes left, {at}");
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let root_path = root.path.to_string_lossy();
        let mounted: Vec<&str> = mounts.lines().filter(|l| l.contains(&*root_path)).collect();
        assert!(mounted.is_empty(), "mounts left, {at}: {mounted:?}");
        for dir in ["sandboxes", "containers", "pools"] {
            let left: Vec<String> = test_utils::names_in(&root.path.join(dir))
                .into_iter()
                .filter(|n| !kept.contains(&n.as_str()))
                .collect();
            assert_eq!(left, Vec::<String>::new(), "{dir} left, {at}");
        }
        let templates: Vec<String> = test_utils::names_in(&root.path.join("templates"))
            .into_iter()
            .filter(|n| !kept.contains(&n.as_str()))
            .collect();
        assert_eq!(templates, Vec::<String>::new(), "templates left, {at}");
    }
}

#[test]
fn a_killed_create_leaves_nothing_after_the_next_call() {
    let root = StateRoot::new("hostile-kill-create");
    let bundle = Bundle::new("kill", |c| {
        c["process"]["args"] = serde_json::json!(["sleep", "60"]);
    });
    killed_at_each_step(
        &root,
        || {
            let mut c = pv(&root);
            c.args(["create", "--bundle"]).arg(&bundle.path).arg("k");
            c
        },
        // What containerd or podman does after a failed create.
        || {
            let _ = output(pv(&root).args(["delete", "--force", "k"]));
            let _ = output(pv(&root).arg("list"));
        },
        &[],
    );
}

#[test]
fn a_killed_template_create_at_each_step_leaves_nothing() {
    let root = StateRoot::new("hostile-kill-template");
    killed_at_each_step(
        &root,
        || {
            let mut c = pv(&root);
            c.args(["template", "create", "--name", "t", "--memory", "128"]);
            c
        },
        || {
            let _ = output(pv(&root).args(["template", "list"]));
            let _ = output(pv(&root).args(["template", "rm", "t"]));
        },
        &[],
    );
}

#[test]
fn a_killed_pool_serve_at_each_step_leaves_nothing() {
    let root = StateRoot::new("hostile-kill-pool");
    let o = output(pv(&root).args(["template", "create", "--name", "p", "--memory", "128"]));
    assert!(o.status.success(), "{}", text(&o));
    let config = root.path.join("config.toml");
    std::fs::write(&config, "[[pool]]\ntemplate = \"p\"\nsize = 2\n").unwrap();
    killed_at_each_step(
        &root,
        || {
            let mut c = pv(&root);
            c.args(["pool", "serve", "--config"]).arg(&config);
            c
        },
        || {
            let _ = output(pv(&root).arg("list"));
        },
        &["p"],
    );
    let _ = output(pv(&root).args(["template", "rm", "p"]));
}
