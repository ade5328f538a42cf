//! docker (Debian's docker.io 20.10) with a dockerd the test starts and
//! podvisor registered as a runtime: `docker run --runtime podvisor`.

use podvisor_client_tests::{host_kernel, http_get, ok, Dockerd, Scratch, Terminal};

#[test]
fn docker_runs_execs_publishes_mounts_and_stops() {
    let d = Dockerd::start("172.31.250.1/24");
    let run = |args: &[&str]| {
        let mut a = vec!["run", "--runtime", "podvisor"];
        a.extend_from_slice(args);
        d.run(&a)
    };
    assert_eq!(ok(&run(&["--rm", "busybox:local", "echo", "hi"])), "hi\n");
    assert_eq!(
        run(&["--rm", "busybox:local", "sh", "-c", "exit 7"])
            .status
            .code(),
        Some(7)
    );

    let vol = Scratch::new("docker-vol");
    std::fs::write(vol.0.join("in.txt"), "from-host").unwrap();
    std::fs::set_permissions(&vol.0, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let out = ok(&run(&[
        "--rm", "--memory", "256m", "-e", "GREETING=hello", "-w", "/tmp", "-u", "1000:1000",
        "-v", &format!("{}:/data", vol.0.display()),
        "busybox:local", "sh", "-c",
        "echo $GREETING; pwd; id -u; cat /sys/fs/cgroup/memory.max; uname -r; cat /data/in.txt; echo; echo from-guest > /data/out.txt",
    ]));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(&lines[..4], ["hello", "/tmp", "1000", "268435456"], "{out}");
    assert_ne!(lines[4], host_kernel());
    assert_eq!(lines[5], "from-host");
    assert_eq!(
        std::fs::read_to_string(vol.0.join("out.txt")).unwrap(),
        "from-guest\n"
    );

    // A free port: one fixed number collides with what a run before left.
    let port = test_utils::registry::free_port();
    let published = format!("{port}:80");
    // docker's networking is a prestart hook that configures the holder's
    // network namespace; port publishing reaches the guest through it.
    ok(&run(&[
        "-d",
        "--name",
        "web",
        "-p",
        published.as_str(),
        "busybox:local",
        "sh",
        "-c",
        "trap 'echo bye; exit 0' TERM; echo serving; echo hello-docker > /tmp/index.html; \
         httpd -p 80 -h /tmp; while :; do sleep 0.2; done",
    ]));
    let body = http_get(port, "/index.html");
    assert!(body.contains("hello-docker"), "{body}");
    assert_eq!(
        ok(&d.run(&["exec", "web", "sh", "-c", "echo $((6*7))"])),
        "42\n"
    );
    assert_eq!(
        d.run(&["exec", "web", "sh", "-c", "exit 4"]).status.code(),
        Some(4)
    );
    assert!(ok(&d.run(&["logs", "web"])).contains("serving"));
    ok(&d.run(&["stop", "-t", "5", "web"]));
    assert_eq!(
        ok(&d.run(&["inspect", "--format", "{{.State.ExitCode}}", "web"])).trim(),
        "0"
    );
    ok(&run(&[
        "-d",
        "--name",
        "stubborn",
        "busybox:local",
        "sleep",
        "600",
    ]));
    ok(&d.run(&["stop", "-t", "2", "stubborn"]));
    assert_eq!(
        ok(&d.run(&["inspect", "--format", "{{.State.ExitCode}}", "stubborn"])).trim(),
        "137"
    );
    ok(&d.run(&["rm", "web", "stubborn"]));

    // The VM frozen after start (its QEMU stopped): `docker stop` and
    // `docker rm -f` end it within their deadlines.
    ok(&d.run(&[
        "run",
        "--runtime",
        "podvisor",
        "-d",
        "--name",
        "frozen",
        "busybox:local",
        "sleep",
        "600",
    ]));
    let root = d.dir.0.join("exec/runtime-runc/moby");
    let qemu = test_utils::qemu_mentioning(&root.to_string_lossy()).expect("the container's QEMU");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(qemu as i32),
        nix::sys::signal::SIGSTOP,
    )
    .unwrap();
    let t = std::time::Instant::now();
    let stopped = d.run(&["stop", "-t", "2", "frozen"]);
    let took = t.elapsed();
    assert!(
        took < std::time::Duration::from_secs(40),
        "docker stop took {took:?}"
    );
    let t = std::time::Instant::now();
    ok(&d.run(&["rm", "-f", "frozen"]));
    let took_rm = t.elapsed();
    assert!(
        took_rm < std::time::Duration::from_secs(30),
        "docker rm -f took {took_rm:?} (stop said {stopped:?})"
    );

    let line = format!(
        "DOCKER_HOST=unix://{} /usr/bin/docker run --rm -it --runtime podvisor busybox:local sh",
        d.dir.0.join("docker.sock").display()
    );
    let term = Terminal::start("docker", &line);
    podvisor_client_tests::drive_shell(&term);
    drop(term);
    d.assert_clean();
}
