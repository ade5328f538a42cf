//! containerd 1.6 (Debian) with its runc v2 shim told to use podvisor as the
//! runc binary (`ctr run --runc-binary`, the shim's BinaryName).

use std::time::Duration;

use podvisor_client_tests::{assert_no_runtime_left, ok, podvisor, Containerd};
use test_utils::output;

#[test]
fn ctr_runs_execs_lists_and_kills_through_the_runc_shim() {
    let c = Containerd::start();
    c.import_busybox("default");
    let pv = podvisor();
    let pv = pv.to_str().unwrap();
    let image = "localhost/busybox:latest";
    let ctr = |args: &[&str]| output(c.ctr().args(args));

    assert_eq!(
        ok(&ctr(&[
            "run",
            "--rm",
            "--runc-binary",
            pv,
            image,
            "c1",
            "echo",
            "hi"
        ])),
        "hi\n"
    );
    assert_eq!(
        ctr(&[
            "run",
            "--rm",
            "--runc-binary",
            pv,
            image,
            "c2",
            "sh",
            "-c",
            "exit 7"
        ])
        .status
        .code(),
        Some(7)
    );

    ok(&ctr(&[
        "run",
        "-d",
        "--runc-binary",
        pv,
        image,
        "c3",
        "sleep",
        "600",
    ]));
    assert_eq!(
        ok(&ctr(&[
            "task",
            "exec",
            "--exec-id",
            "e1",
            "c3",
            "sh",
            "-c",
            "echo $((6*7))"
        ])),
        "42\n"
    );
    let ps = ok(&ctr(&["task", "ps", "c3"]));
    assert!(ps.lines().count() >= 2, "{ps}");
    let tasks = ok(&ctr(&["task", "ls"]));
    assert!(tasks.contains("c3") && tasks.contains("RUNNING"), "{tasks}");
    ok(&ctr(&["task", "kill", "--signal", "SIGKILL", "c3"]));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !ok(&ctr(&["task", "ls"])).contains("STOPPED") {
        assert!(std::time::Instant::now() < deadline, "c3 never stopped");
        std::thread::sleep(Duration::from_millis(200));
    }
    ok(&ctr(&["task", "delete", "c3"]));
    ok(&ctr(&["container", "delete", "c3"]));
    // The runc shim gives its runtime --root /run/containerd/runc/<namespace>.
    assert_no_runtime_left(std::path::Path::new("/run/containerd/runc/default"));
}
