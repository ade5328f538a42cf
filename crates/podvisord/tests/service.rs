//! podvisord driven by clients nobody here wrote: E2B's Python SDK from
//! PyPI (pinned, in the venv `scripts/e2b-venv.sh` makes) and its
//! JavaScript SDK from npm (pinned by a lock file, `scripts/e2b-node.sh`), unchanged,
//! pointed at a podvisord on loopback through its documented settings
//! (E2B_API_KEY, E2B_API_URL, E2B_SANDBOX_URL). Each test runs one script
//! of tests/podvisord/ against a podvisord of its own, real VMs behind it,
//! and checks that nothing of it is left once it stops.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const E2B_VERSION: &str = "2.63.0";

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/podvisord")
}

fn venv_python() -> PathBuf {
    let cache = std::env::var_os("PODVISOR_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/podvisor")
        });
    let py = cache.join(format!("venv-e2b-{E2B_VERSION}/bin/python"));
    assert!(
        py.exists(),
        "{} is missing: E2B's SDK is not installed (run scripts/e2b-venv.sh, or `make deps`)",
        py.display()
    );
    py
}

/// Where E2B's JS SDK is installed: `scripts/e2b-node.sh` installs it
/// once (npm ci of tests/podvisord/js) and prints the directory.
fn node_modules() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/e2b-node.sh");
    let out = Command::new(&script)
        .stdin(Stdio::null())
        .output()
        .expect("running scripts/e2b-node.sh");
    assert!(
        out.status.success(),
        "E2B's JS SDK is not installed and could not be: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    PathBuf::from(dir).join("node_modules")
}

struct Service {
    dir: PathBuf,
    url: String,
    token: String,
    child: Child,
}

impl Service {
    /// A podvisord with `config` (TOML) as its config file.
    fn start(name: &str, config: &str) -> Service {
        test_utils::build_dir();
        // Short: VM sockets live under it.
        let dir = PathBuf::from(format!("/tmp/pvd-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Service::start_in(dir, test_utils::registry::free_port(), config)
    }

    /// Starts podvisord in `dir` (kept: a restart finds its state).
    fn start_in(dir: PathBuf, port: u16, config: &str) -> Service {
        Service::start_with(dir, port, config, &[], &[])
    }

    fn start_with(
        dir: PathBuf,
        port: u16,
        config: &str,
        extra: &[&str],
        envs: &[(&str, &str)],
    ) -> Service {
        std::fs::write(dir.join("config.toml"), config).unwrap();
        let log = std::fs::File::create(dir.join("podvisord.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_podvisord"))
            .args(extra)
            .envs(envs.iter().copied())
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--admin-token-file")
            .arg(dir.join("admin.token"))
            .arg("--config")
            .arg(dir.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("running podvisord");
        let scheme = if extra.contains(&"--tls-cert") {
            "https"
        } else {
            "http"
        };
        let mut s = Service {
            url: format!("{scheme}://127.0.0.1:{port}"),
            token: String::new(),
            dir,
            child,
        };
        // The first start on a machine builds the base root (debootstrap).
        let deadline = Instant::now() + Duration::from_secs(900);
        loop {
            if let Ok(Some(status)) = s.child.try_wait() {
                panic!("podvisord exited ({status}):\n{}", s.log());
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "podvisord did not listen:\n{}",
                s.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        s.token = std::fs::read_to_string(s.dir.join("admin.token"))
            .unwrap()
            .trim()
            .to_string();
        s
    }

    /// Stops podvisord (SIGTERM: it ends its sandboxes) and starts it again
    /// on the same state and port.
    fn restart(mut self) -> Service {
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let port: u16 = self.url.rsplit(':').next().unwrap().parse().unwrap();
        let config = std::fs::read_to_string(self.dir.join("config.toml")).unwrap();
        let dir = self.dir.clone();
        // Its Drop would remove the directory the next one uses.
        std::mem::forget(self);
        Service::start_in(dir, port, &config)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("podvisord.log")).unwrap_or_default()
    }

    /// Runs `script` with E2B's SDK; panics with its output when it fails.
    fn run(&self, script: &str, env: &[(&str, &str)]) {
        let args = [
            scripts().join(script).display().to_string(),
            "before".into(),
        ];
        self.run_args(&args, env, script)
    }

    fn run_args(&self, args: &[String], env: &[(&str, &str)], script: &str) {
        self.run_with(Command::new(venv_python()).args(args), env, script)
    }

    /// Runs `js/{script}` with node and E2B's JS SDK.
    fn run_js(&self, script: &str) {
        let modules = node_modules();
        let mut cmd = Command::new("node");
        cmd.arg(scripts().join("js").join(script))
            .env("E2B_NODE_MODULES", &modules);
        self.run_with(&mut cmd, &[], script)
    }

    fn run_with(&self, cmd: &mut Command, env: &[(&str, &str)], script: &str) {
        let out = cmd
            .current_dir(scripts())
            .env("PODVISORD_URL", &self.url)
            .env("PODVISORD_ADMIN_TOKEN", &self.token)
            .env_remove("E2B_API_KEY")
            .env_remove("E2B_DOMAIN")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .output()
            .expect("running python");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        print!("{text}");
        assert!(
            out.status.success() && (text.contains("PASS") || script == "schemathesis"),
            "{script} failed:\n{text}\n--- podvisord's log (tail):\n{}",
            tail(&self.log(), 40)
        );
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Drop for Service {
    fn drop(&mut self) {
        // SIGTERM: podvisord ends every sandbox, then exits.
        // SAFETY: a plain kill(2) of our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::thread::sleep(Duration::from_millis(500));
        let left = test_utils::processes_mentioning(&self.dir.display().to_string());
        if !std::thread::panicking() {
            assert!(left.is_empty(), "processes left behind: {left:?}");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn sdk_creates_runs_lists_and_kills() {
    let s = Service::start("basic", "[[templates]]\nname = \"base\"\npool = 1\n");
    s.run("sdk_basic.py", &[("EXPECT_POOL", "1")]);
}

/// `get_host` ports: HTTP, upgrades, routing headers, traffic tokens, and
/// a guest server that answers garbage, nothing, or without end.
#[test]
fn sdk_reaches_the_sandboxs_own_ports_and_survives_their_servers() {
    let s = Service::start("ports", "");
    s.run("sdk_ports.py", &[]);
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl is missing (apt install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A test CA and a server certificate it signed for 127.0.0.1 and
/// *.localhost (webpki refuses a self-signed CA as the server's own), made
/// with openssl in `dir`: (ca, cert, key).
fn certificate(dir: &Path) -> (String, String, String) {
    let p = |n: &str| dir.join(n).display().to_string();
    let (ca, ca_key, cert, key, csr, ext) = (
        p("ca.pem"),
        p("ca.key"),
        p("cert.pem"),
        p("key.pem"),
        p("req.csr"),
        p("ext.cnf"),
    );
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut args = vec!["req", "-x509"];
    args.extend(ec);
    args.extend(["-days", "2", "-subj", "/CN=podvisord test CA"]);
    args.extend(["-keyout", &ca_key, "-out", &ca]);
    openssl(&args);
    let mut args = vec!["req"];
    args.extend(ec);
    args.extend(["-subj", "/CN=127.0.0.1", "-keyout", &key, "-out", &csr]);
    openssl(&args);
    std::fs::write(
        &ext,
        "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n\
         subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:*.localhost\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        &ca,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &ext,
        "-out",
        &cert,
    ]);
    (ca, cert, key)
}

/// TLS: E2B's SDK over https with the test's certificate trusted; a key
/// that is not one stops podvisord at start with a clear error.
#[test]
fn tls_serves_the_sdk_and_a_bad_key_is_refused_at_start() {
    test_utils::build_dir();
    let dir = PathBuf::from(format!("/tmp/pvd-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (ca, cert, key) = certificate(&dir);
    let bad = dir.join("bad.pem");
    std::fs::write(
        &bad,
        "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_podvisord"))
        .args(["--listen", "127.0.0.1:0", "--state-dir"])
        .arg(dir.join("bad-state"))
        .arg("--admin-token-file")
        .arg(dir.join("bad.token"))
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a bad key was accepted: {err}");
    assert!(err.contains("key"), "the error names the key: {err}");
    assert!(
        !dir.join("bad-state").exists(),
        "a refused start left its state dir"
    );

    let s = Service::start_with(
        dir,
        test_utils::registry::free_port(),
        "",
        &["--tls-cert", &cert, "--tls-key", &key],
        &[],
    );
    s.run("sdk_tls.py", &[("SSL_CERT_FILE", &ca)]);
}

/// `podvisor service ...` against this podvisord: (exit ok, stdout, stderr).
fn service_cli(s: &Service, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(test_utils::build_dir().join("podvisor"))
        .args(["service", "--url", &s.url, "--admin-token-file"])
        .arg(s.dir.join("admin.token"))
        .args(args)
        .env_remove("PODVISORD_ADMIN_TOKEN")
        .stdin(Stdio::null())
        .output()
        .expect("running podvisor service");
    let (o, e) = (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    );
    println!("$ podvisor service {}\n{o}{e}", args.join(" "));
    (out.status.success(), o, e)
}

fn service_ok(s: &Service, args: &[&str]) -> String {
    let (ok, o, e) = service_cli(s, args);
    assert!(ok, "podvisor service {args:?} failed: {e}");
    o
}

fn service_fails(s: &Service, args: &[&str], says: &str) {
    let (ok, _, e) = service_cli(s, args);
    assert!(!ok, "podvisor service {args:?} succeeded");
    assert!(
        e.contains(says),
        "podvisor service {args:?}: {e:?} should say {says:?}"
    );
}

/// The admin CLI over the admin API: tenants, keys, quotas; a template
/// made at runtime (with a pool) that serves the SDK, survives a restart of
/// podvisord, and is removed only when nothing runs from it.
#[test]
fn the_admin_cli_manages_tenants_keys_quotas_and_templates() {
    let s = Service::start("cli", "");
    let made: serde_json::Value = serde_json::from_str(&service_ok(
        &s,
        &["tenant", "create", "acme", "--max-sandboxes", "3"],
    ))
    .unwrap();
    let (id, key) = (
        made["id"].as_str().unwrap(),
        made["apiKey"].as_str().unwrap(),
    );
    assert!(key.starts_with("e2b_"), "{made}");
    assert_eq!(made["quotas"]["maxSandboxes"], 3);
    let ls = service_ok(&s, &["tenant", "ls"]);
    assert!(
        ls.starts_with("ID") && ls.contains("acme") && ls.contains(id),
        "{ls}"
    );
    service_fails(&s, &["tenant", "create", "acme"], "409");
    service_fails(&s, &["tenant", "show", "tnosuch"], "404");

    let second: serde_json::Value = serde_json::from_str(&service_ok(
        &s,
        &["key", "create", id, "--expires-in", "600"],
    ))
    .unwrap();
    let kid = second["key"]["id"].as_str().unwrap();
    let keys = service_ok(&s, &["key", "ls", id]);
    assert_eq!(keys.lines().count(), 3, "a header and two keys: {keys}");
    service_ok(&s, &["key", "revoke", id, kid]);
    let keys = service_ok(&s, &["--format", "json", "key", "ls", id]);
    let keys: serde_json::Value = serde_json::from_str(&keys).unwrap();
    let revoked = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == kid)
        .unwrap();
    assert!(revoked["revokedMs"].is_i64(), "{keys}");

    let q: serde_json::Value = serde_json::from_str(&service_ok(
        &s,
        &["quota", id, "--max-vcpus", "7", "--templates", "small"],
    ))
    .unwrap();
    assert_eq!(
        (q["maxVcpus"].as_i64(), q["maxSandboxes"].as_i64()),
        (Some(7), Some(3)),
        "{q}"
    );
    assert_eq!(q["templates"], serde_json::json!(["small"]));

    // Bad templates: each refused, nothing made.
    service_fails(&s, &["template", "create", "bad/name"], "400");
    service_fails(
        &s,
        &["template", "create", "x", "--rootfs", "/nonexistent"],
        "no /bin",
    );
    service_fails(&s, &["template", "create", "x", "--vcpus", "99"], "vcpus");
    service_fails(&s, &["template", "create", "base"], "409");
    service_fails(&s, &["template", "rm", "base"], "config file");
    let (ok, _, e) = Command::new(test_utils::build_dir().join("podvisor"))
        .args(["service", "--url", &s.url, "tenant", "ls"])
        .env("PODVISORD_ADMIN_TOKEN", "wrong")
        .output()
        .map(|o| {
            (
                o.status.success(),
                (),
                String::from_utf8_lossy(&o.stderr).to_string(),
            )
        })
        .unwrap();
    assert!(!ok && e.contains("401"), "a wrong admin token: {e}");

    let t: serde_json::Value = serde_json::from_str(&service_ok(
        &s,
        &[
            "template",
            "create",
            "small",
            "--memory-mib",
            "384",
            "--pool",
            "1",
        ],
    ))
    .unwrap();
    assert_eq!(
        (t["name"].as_str(), t["source"].as_str()),
        (Some("small"), Some("api")),
        "{t}"
    );
    let ls = service_ok(&s, &["template", "ls"]);
    assert!(ls.contains("small") && ls.contains("384"), "{ls}");
    s.run(
        "service_cli.py",
        &[("E2B_API_KEY", key), ("TEMPLATE", "small")],
    );

    // A restart keeps it (and its pool).
    let s = s.restart();
    let ls = service_ok(&s, &["template", "ls"]);
    assert!(
        ls.contains("small"),
        "the template is kept across a restart: {ls}"
    );
    s.run(
        "service_cli.py",
        &[
            ("E2B_API_KEY", key),
            ("TEMPLATE", "small"),
            ("LEAVE_RUNNING", "1"),
        ],
    );
    service_fails(&s, &["template", "rm", "small"], "live sandbox");
    service_ok(&s, &["tenant", "rm", id]);
    service_ok(&s, &["template", "rm", "small"]);
    let ls = service_ok(&s, &["template", "ls"]);
    assert!(!ls.contains("small"), "{ls}");
    service_fails(&s, &["template", "show", "small"], "404");
}

/// E2B's JS SDK, a smaller set (create, commands, files, getHost, list,
/// setTimeout, connect, kill).
#[test]
fn the_js_sdk_creates_runs_and_kills() {
    let s = Service::start("js", "");
    s.run_js("sdk.mjs");
}

#[test]
fn sdk_files_pty_and_a_100_mib_round_trip() {
    let s = Service::start("files", "");
    s.run("sdk_files.py", &[("BIG_MIB", "100")]);
}

#[test]
fn tenants_are_isolated_limited_and_bad_input_is_refused() {
    let s = Service::start("tenants", "");
    s.run("service_tenants.py", &[]);
}

/// schemathesis (PyPI, pinned) fuzzes the whole REST surface from
/// /openapi.json, bounded: every answer documented, no 500, schema-valid
/// requests accepted. Left out: creates (a VM per example) and the calls
/// that would delete the run's own tenant and key.
#[test]
fn the_openapi_document_holds_under_schemathesis() {
    let s = Service::start("openapi", "");
    let out = Command::new(venv_python())
        .arg(scripts().join("common.py"))
        .arg("--new-tenant")
        .env("PODVISORD_URL", &s.url)
        .env("PODVISORD_ADMIN_TOKEN", &s.token)
        .output()
        .unwrap();
    let key = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(key.starts_with("e2b_"), "no key: {out:?}");
    let st = venv_python().with_file_name("schemathesis");
    let out = Command::new(st)
        .arg("run")
        .arg(format!("{}/openapi.json", s.url))
        .args(["-H", &format!("X-API-Key: {key}")])
        .args(["-H", &format!("X-Admin-Token: {}", s.token)])
        .args(["--max-examples", "15", "--seed", "1"])
        .args([
            "--exclude-path-regex",
            "^/((v2/)?sandboxes|admin/templates)$",
        ])
        .args(["--exclude-method", "DELETE"])
        .stdin(Stdio::null())
        .output()
        .expect("running schemathesis");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "schemathesis found failures:\n{text}");
}

/// kill -9 of podvisord: its VMs end with it (nothing orphaned), and the
/// podvisord started again on the same state marks their sandboxes ended
/// and serves new ones.
#[test]
fn a_killed_podvisord_leaves_no_vm_and_its_restart_agrees_with_the_host() {
    let mut s = Service::start("restart", "");
    let state = s.dir.join("client.json");
    let env = [("RESTART_STATE", state.to_str().unwrap())];
    s.run("service_restart.py", &env);
    // The script ran "before" (argv defaults below); kill -9 now.
    // SAFETY: kill(2) of our own child.
    unsafe { libc::kill(s.child.id() as i32, libc::SIGKILL) };
    let _ = s.child.wait();
    let dir = s.dir.display().to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !test_utils::processes_mentioning(&dir).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let left = test_utils::processes_mentioning(&dir);
    assert!(
        left.is_empty(),
        "VM processes outlived podvisord's kill -9: {left:?}"
    );
    let port: u16 = s.url.rsplit(':').next().unwrap().parse().unwrap();
    let config = std::fs::read_to_string(s.dir.join("config.toml")).unwrap();
    let again = Service::start_in(s.dir.clone(), port, &config);
    // The first one is dead: its Drop must not remove the directory.
    std::mem::forget(s);
    let args = [
        scripts().join("service_restart.py").display().to_string(),
        "after".to_string(),
    ];
    again.run_args(&args, &env, "service_restart.py");
}

/// kill -9 of podvisord at each crash point of a create, a kill, a pause
/// and a resume (`PODVISORD_CRASH_AT`, see src/crash.rs), then a restart on the same
/// state: no VM outlives it, no row is left creating or running, no VM
/// directory is left once the restart has cleaned up, and it serves again.
#[test]
fn kill_9_at_each_point_of_create_and_kill_leaves_the_database_and_host_agreeing() {
    use std::os::unix::process::ExitStatusExt;
    test_utils::build_dir();
    let points = [
        "create.admitted",
        "create.booted",
        "create.started",
        "kill.begun",
        "kill.destroyed",
        "pause.begun",
        "pause.saved",
        "resume.booted",
    ];
    for point in points {
        let dir = PathBuf::from(format!("/tmp/pvd-crash-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let port = test_utils::registry::free_port();
        let crash = [("PODVISORD_CRASH_AT", point)];
        let mut s = Service::start_with(dir.clone(), port, "", &[], &crash);
        let state = dir.join("client.json").display().to_string();
        let db = dir.join("state/podvisord.db").display().to_string();
        let snapshots = dir.join("state/vm/templates").display().to_string();
        let env = [
            ("CRASH_POINT", point),
            ("CRASH_STATE", state.as_str()),
            ("PODVISORD_DB", db.as_str()),
            ("SNAPSHOT_DIR", snapshots.as_str()),
        ];
        s.run("service_crash.py", &env);
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(st) = s.child.try_wait().unwrap() {
                break st;
            }
            assert!(
                Instant::now() < deadline,
                "podvisord did not die at {point}"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{point}: {status}");
        let needle = dir.display().to_string();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !test_utils::processes_mentioning(&needle).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        let left = test_utils::processes_mentioning(&needle);
        assert!(left.is_empty(), "{point}: VMs outlived podvisord: {left:?}");
        // The dead one's Drop must not remove the directory.
        std::mem::forget(s);
        let again = Service::start_in(dir.clone(), port, "");
        let args = [
            scripts().join("service_crash.py").display().to_string(),
            "after".to_string(),
        ];
        again.run_args(&args, &env, "service_crash.py");
        let vms: Vec<String> = test_utils::names_in(&dir.join("state/vm/sandboxes"))
            .into_iter()
            .filter(|n| !n.starts_with('.'))
            .collect();
        assert!(vms.is_empty(), "{point}: VM directories left: {vms:?}");
    }
}

/// A command flooding stdout: unread, podvisord's memory stays flat (the
/// history is capped); read, every byte arrives.
#[test]
fn a_flood_of_output_neither_grows_the_host_nor_loses_bytes() {
    let s = Service::start("flood", "");
    let pid = s.child.id().to_string();
    s.run("service_flood.py", &[("PODVISORD_PID", &pid)]);
}

/// 10 clients, 200 sandboxes in all: every one answered, none left, the
/// database consistent afterwards.
#[test]
fn ten_clients_and_two_hundred_sandboxes() {
    let s = Service::start("load", "");
    let db = s.dir.join("state/podvisord.db");
    s.run("service_load.py", &[("PODVISORD_DB", db.to_str().unwrap())]);
}

/// Pause and resume through E2B's SDK around a restart of podvisord
/// (tests/podvisord/sdk_pause.py): a process's memory, open file and
/// listening socket survive; two connects at once resume once; a damaged
/// snapshot (its saved device state cut short here) is refused and stays
/// paused; `on_timeout: pause` and `auto_resume` work; killed sandboxes
/// leave no snapshot behind.
#[test]
fn paused_sandboxes_survive_a_restart_and_resume_with_their_processes() {
    let s = Service::start("pause", "");
    let saved = s.dir.join("pause.json");
    let env = [("PAUSE_STATE", saved.to_str().unwrap())];
    s.run("sdk_pause.py", &env);
    let ids: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&saved).unwrap()).unwrap();
    let templates = s.dir.join("state/vm/templates");
    let damaged = templates
        .join(format!(
            "podvisord-paused-{}-1",
            ids["damaged"].as_str().unwrap()
        ))
        .join("state");
    let len = std::fs::metadata(&damaged).unwrap().len();
    // The snapshot is sealed read-only; root cuts it short all the same.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&damaged)
        .unwrap();
    f.set_len(len / 2).unwrap();
    drop(f);
    {
        // A disk too small for a snapshot, over the snapshots' directory
        // (hiding the others until it is unmounted).
        let _full = Tmpfs::mount(&templates, "64m");
        let dir = templates.display().to_string();
        let args = [
            scripts().join("sdk_pause.py").display().to_string(),
            "full".to_string(),
        ];
        s.run_args(&args, &[env[0], ("SNAPSHOT_DIR", &dir)], "sdk_pause.py");
    }
    let s = s.restart();
    let args = [
        scripts().join("sdk_pause.py").display().to_string(),
        "after".to_string(),
    ];
    s.run_args(&args, &env, "sdk_pause.py");
    let left: Vec<String> = test_utils::names_in(&templates)
        .into_iter()
        .filter(|n| n.contains("paused"))
        .collect();
    assert!(
        left.is_empty(),
        "snapshots outlived their sandboxes: {left:?}"
    );
}

/// Fork through E2B's SDK (tests/podvisord/sdk_fork.py): five forks see
/// the parent's state as of the fork and then diverge; a fork over quota
/// fails alone; forks outlive their parent; once every sandbox is killed
/// no fork snapshot is left.
#[test]
fn forks_diverge_from_their_parent_and_leave_nothing_behind() {
    let s = Service::start("fork", "");
    s.run("sdk_fork.py", &[]);
    let left: Vec<String> = test_utils::names_in(&s.dir.join("state/vm/templates"))
        .into_iter()
        .filter(|n| n.contains("fork") || n.contains("paused"))
        .collect();
    assert!(
        left.is_empty(),
        "snapshots outlived their sandboxes: {left:?}"
    );
}

/// A tmpfs mounted for a test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("mount(8)")
            .success();
        assert!(ok, "mounting a tmpfs on {}", dir.display());
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}
