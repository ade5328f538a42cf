//! podman (Debian's 4.3, conmon) with `--runtime podvisor`: every container
//! in its own micro-VM, and podman cannot tell.

use std::time::{Duration, Instant};

use std::process::Command;

use podvisor_client_tests::{
    host_kernel, http_get, ok, podvisor, Podman, PoolDaemon, Scratch, Terminal,
};
use test_utils::output;

#[test]
fn run_passes_output_exit_codes_env_user_memory_and_volumes() {
    let pm = Podman::new("run");
    assert_eq!(
        ok(&pm.run(&["run", "--rm", "localhost/busybox", "echo", "hi"])),
        "hi\n"
    );
    let out = pm.run(&["run", "--rm", "localhost/busybox", "sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7));
    let out = pm.run(&["run", "--rm", "localhost/busybox", "no-such-command"]);
    assert_eq!(
        out.status.code(),
        Some(127),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let vol = Scratch::new("podman-vol");
    std::fs::write(vol.0.join("in.txt"), "from-host").unwrap();
    // uid 1000 writes into it, as with runc.
    std::fs::set_permissions(&vol.0, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let out = ok(&pm.run(&[
        "run", "--rm", "--memory", "256m", "-e", "GREETING=hello", "-w", "/tmp", "-u", "1000:1000",
        "-v", &format!("{}:/data", vol.0.display()),
        "localhost/busybox", "sh", "-c",
        "echo $GREETING; pwd; id -u; id -g; cat /sys/fs/cgroup/memory.max; \
         grep MemTotal /proc/meminfo; uname -r; cat /data/in.txt; echo; echo from-guest > /data/out.txt",
    ]));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        &lines[..5],
        ["hello", "/tmp", "1000", "1000", "268435456"],
        "{out}"
    );
    let mem_kib: u64 = lines[5].split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(
        mem_kib >= 256 * 1024,
        "the guest has at least the 256 MiB asked for: {out}"
    );
    assert_ne!(lines[6], host_kernel(), "the guest runs its own kernel");
    assert_eq!(lines[7], "from-host");
    assert_eq!(
        std::fs::read_to_string(vol.0.join("out.txt")).unwrap(),
        "from-guest\n"
    );
    drop(pm);
}

#[test]
fn detached_exec_logs_stop_rm_and_published_port() {
    let pm = Podman::new("detached");
    // A free port: one fixed number collides with what a run before left.
    let port = test_utils::registry::free_port();
    let published = format!("{port}:80");
    let id = ok(&pm.run(&[
        "run",
        "-d",
        "--name",
        "web",
        "-p",
        published.as_str(),
        "localhost/busybox",
        "sh",
        "-c",
        "trap 'echo bye; exit 0' TERM; echo serving; echo hello-from-podvisor > /tmp/index.html; \
         httpd -p 80 -h /tmp; while :; do sleep 0.2; done",
    ]));
    assert_eq!(id.trim().len(), 64);
    let body = http_get(port, "/index.html");
    assert!(body.contains("hello-from-podvisor"), "{body}");
    assert_eq!(
        ok(&pm.run(&["exec", "web", "sh", "-c", "echo $((6*7)) from $(hostname)"]))
            .split_whitespace()
            .next(),
        Some("42")
    );
    let out = pm.run(&["exec", "web", "sh", "-c", "exit 4"]);
    assert_eq!(out.status.code(), Some(4));
    assert!(ok(&pm.run(&["logs", "web"])).contains("serving"));
    let ps = ok(&pm.run(&["ps", "--format", "{{.Names}} {{.Status}}"]));
    assert!(ps.contains("web Up"), "{ps}");

    // The container's PID 1 handles SIGTERM: it stops before the timeout.
    let t0 = Instant::now();
    ok(&pm.run(&["stop", "-t", "5", "web"]));
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "SIGTERM reached PID 1"
    );
    let exit = ok(&pm.run(&["inspect", "--format", "{{.State.ExitCode}}", "web"]));
    assert_eq!(exit.trim(), "0");

    // A PID 1 without a handler ignores SIGTERM (as with runc): podman
    // escalates to SIGKILL after -t.
    ok(&pm.run(&[
        "run",
        "-d",
        "--name",
        "stubborn",
        "localhost/busybox",
        "sleep",
        "600",
    ]));
    let t0 = Instant::now();
    ok(&pm.run(&["stop", "-t", "2", "stubborn"]));
    assert!(t0.elapsed() >= Duration::from_secs(2));
    let exit = ok(&pm.run(&["inspect", "--format", "{{.State.ExitCode}}", "stubborn"]));
    assert_eq!(exit.trim(), "137");
    ok(&pm.run(&["rm", "web", "stubborn"]));
    pm.pv_root.assert_clean();
}

#[test]
fn interactive_terminal_types_answers_and_resizes() {
    let pm = Podman::new("tty");
    let cmd = pm.cmd();
    let line = format!(
        "CONTAINERS_CONF={} {} run --rm -it localhost/busybox sh",
        cmd.get_envs().next().unwrap().1.unwrap().to_string_lossy(),
        std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let term = Terminal::start("podman", &line);
    podvisor_client_tests::drive_shell(&term);
    drop(term);

    // exec -it into a running container: conmon's detached exec with a console socket.
    ok(&pm.run(&[
        "run",
        "-d",
        "--name",
        "idle",
        "localhost/busybox",
        "sleep",
        "600",
    ]));
    let term = Terminal::start(
        "podman-exec",
        &line.replace("run --rm -it localhost/busybox sh", "exec -it idle sh"),
    );
    term.expect("/ #", Duration::from_secs(60));
    term.send("echo in-exec-$((2*21)); stty size; exit 5");
    term.expect("in-exec-42", Duration::from_secs(20));
    term.expect("30 100", Duration::from_secs(20));
    term.expect("EXIT=5", Duration::from_secs(30));
    drop(term);
    ok(&pm.run(&["rm", "-f", "-t", "0", "idle"]));
    pm.pv_root.assert_clean();
}

#[test]
fn podman_takes_a_ready_vm_from_the_pool_with_its_network() {
    let pm = Podman::new("pooled");
    // The container's VM shape (256 MiB, 1 vCPU) and podman's one network
    // interface: the template fits, and a pool keeps a clone of it ready.
    ok(&output(
        Command::new(podvisor())
            .arg("--root")
            .arg(&pm.pv_root.path)
            .args([
                "template", "create", "--name", "ctr", "--nics", "1", "--memory", "256",
            ]),
    ));
    std::fs::write(
        pm.policy(),
        "template = \"ctr\"\n[[pool]]\ntemplate = \"ctr\"\nsize = 1\n",
    )
    .unwrap();
    let pool = PoolDaemon::start(&pm.pv_root.path, &pm.policy(), "ctr: 1 of 1 ready");
    let volume = Scratch::new("pooled-volume");
    std::fs::write(volume.0.join("hello"), "from the host\n").unwrap();
    let out = ok(&pm.run(&[
        "run",
        "--rm",
        "-v",
        &format!("{}:/data", volume.0.display()),
        "localhost/busybox",
        "sh",
        "-c",
        "cat /data/hello; ip -4 -o addr show eth0; ip route",
    ]));
    assert!(out.starts_with("from the host\n"), "{out}");
    assert!(out.contains("eth0") && out.contains("inet "), "{out}");
    assert!(out.contains("default via"), "{out}");
    assert!(
        pool.status().contains("1 handed out"),
        "the container's VM did not come from the pool: {}",
        pool.status()
    );
    drop(pool);
    pm.pv_root.assert_clean();
}
