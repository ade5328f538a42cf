//! Fixtures for the real-client suites: a busybox image from local material,
//! podman with its own storage, a dockerd and a containerd started for the
//! test, an HTTP GET, and a terminal driven through tmux. A client that is
//! missing fails the test with what to install.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use test_utils::{build_dir, output, StateRoot};

pub fn podvisor() -> PathBuf {
    build_dir().join("podvisor")
}

/// Fails the test unless `program` is installed.
pub fn require(program: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/sbin", "/bin", "/sbin", "/usr/local/bin"] {
        let p = Path::new(dir).join(program);
        if p.exists() {
            return p;
        }
    }
    panic!("{program} is missing: run scripts/install-deps.sh (Debian packages podman, docker.io, containerd, runc, tmux)");
}

pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed ({:?}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("pv-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // PODVISOR_KEEP=1 keeps it, to read a failed test's daemon logs.
        if std::env::var_os("PODVISOR_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A tarball of the busybox rootfs `make build` made (what `podman import` and
/// `docker import` take).
pub fn busybox_tar(dir: &Path) -> PathBuf {
    let tar = dir.join("busybox.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(build_dir().join("rootfs"))
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success(), "tar of the busybox rootfs");
    tar
}

/// podman with storage, run root and podvisor's state of its own.
pub struct Podman {
    pub dir: Scratch,
    pub pv_root: StateRoot,
}

impl Podman {
    pub fn new(name: &str) -> Podman {
        require("podman");
        require("conmon");
        let dir = Scratch::new(&format!("podman-{name}"));
        // This host withholds CAP_SYS_RESOURCE (no raising RLIMIT_NOFILE) and
        // has no systemd; podman passes --log-format json only to runtimes
        // it is told support it.
        let pv_root = StateRoot::new(&format!("podman-{name}"));
        // podman gives the runtime no --root, and its cleanup process (which
        // deletes --rm containers) gets no --runtime-flag: a wrapper gives
        // every call this test's state root.
        let wrapper = dir.0.join("podvisor");
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nPODVISOR_CONFIG={} exec {} --root {} \"$@\"\n",
                dir.0.join("podvisor.toml").display(),
                podvisor().display(),
                pv_root.path.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(
            &wrapper,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let conf = format!(
            "[containers]\ndefault_ulimits = []\n[engine]\ncgroup_manager = \"cgroupfs\"\n\
             runtime_supports_json = [\"podvisor\", \"runc\"]\n[engine.runtimes]\npodvisor = [\"{}\"]\n",
            wrapper.display()
        );
        std::fs::write(dir.0.join("containers.conf"), conf).unwrap();
        let p = Podman { dir, pv_root };
        let tar = busybox_tar(&p.dir.0);
        ok(&output(
            p.cmd()
                .arg("import")
                .arg(&tar)
                .arg("localhost/busybox:latest"),
        ));
        p
    }

    /// The factory policy podvisor reads under this podman (none until a
    /// test writes it).
    pub fn policy(&self) -> PathBuf {
        self.dir.0.join("podvisor.toml")
    }

    /// `podman` with this fixture's storage; `run`/`create` go to podvisor.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new("podman");
        c.env("CONTAINERS_CONF", self.dir.0.join("containers.conf"))
            .arg("--root")
            .arg(self.dir.0.join("storage"))
            .arg("--runroot")
            .arg(self.dir.0.join("run"))
            .args(["--storage-driver", "vfs", "--runtime", "podvisor"]);
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        output(self.cmd().args(args))
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = output(self.cmd().args(["rm", "-af", "-t", "0"]));
    }
}

fn wait_for(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        assert!(
            Instant::now() < deadline,
            "{what} did not come up within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Starts a daemon with its output in `log`.
fn spawn_logged(cmd: &mut Command, log: &Path) -> Child {
    let log = std::fs::File::create(log).unwrap();
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"))
}

/// Whether `cmd` runs and succeeds (output discarded).
fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn stop_daemon(child: &mut Child) {
    // SAFETY: kill with a pid we spawned and have not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(15);
    while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A dockerd of the test's own with podvisor registered as runtime "podvisor".
pub struct Dockerd {
    pub dir: Scratch,
    daemon: Child,
}

impl Dockerd {
    pub fn start(bridge_cidr: &str) -> Dockerd {
        let dockerd = require("dockerd");
        require("containerd");
        require("runc");
        let dir = Scratch::new("dockerd");
        let mut daemon = Command::new(dockerd);
        daemon
            .arg("--data-root")
            .arg(dir.0.join("data"))
            .arg("--exec-root")
            .arg(dir.0.join("exec"))
            .arg("--pidfile")
            .arg(dir.0.join("docker.pid"))
            .arg("-H")
            .arg(format!("unix://{}", dir.0.join("docker.sock").display()))
            .arg("--add-runtime")
            .arg(format!("podvisor={}", podvisor().display()))
            .args(["--storage-driver", "vfs", "--bip", bridge_cidr]);
        let daemon = spawn_logged(&mut daemon, &dir.0.join("dockerd.log"));
        let d = Dockerd { dir, daemon };
        wait_for("dockerd", Duration::from_secs(60), || {
            succeeds(d.cmd().arg("version"))
        });
        let tar = busybox_tar(&d.dir.0);
        ok(&output(
            d.cmd().arg("import").arg(&tar).arg("busybox:local"),
        ));
        d
    }

    /// Debian's docker 20.10 client, on this daemon.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new("/usr/bin/docker");
        c.env(
            "DOCKER_HOST",
            format!("unix://{}", self.dir.0.join("docker.sock").display()),
        );
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        output(self.cmd().args(args))
    }

    /// dockerd gives the runtime `--root EXEC_ROOT/runtime-runc/moby`.
    pub fn assert_clean(&self) {
        assert_no_runtime_left(&self.dir.0.join("exec/runtime-runc/moby"));
    }
}

/// Nothing of podvisor's is left under the state root `root`: no container
/// or sandbox directory, no holder, no QEMU.
pub fn assert_no_runtime_left(root: &Path) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let entries = |sub: &str| test_utils::names_in(&root.join(sub));
        let left = (
            entries("containers"),
            entries("sandboxes"),
            test_utils::processes_mentioning(&root.to_string_lossy()),
        );
        if left.0.is_empty() && left.1.is_empty() && left.2.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "left under {}: containers {:?}, sandboxes {:?}, processes {:?}",
            root.display(),
            left.0,
            left.1,
            left.2
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let _ = output(
            self.cmd()
                .args(["rm", "-f"])
                .args(ok(&output(self.cmd().args(["ps", "-aq"]))).split_whitespace()),
        );
        stop_daemon(&mut self.daemon);
    }
}

/// A containerd of the test's own (CRI plugin on, as it would be for kubelet).
pub struct Containerd {
    pub dir: Scratch,
    daemon: Child,
    /// The CNI bridge its pods join (removed with it).
    bridge: String,
}

impl Containerd {
    /// containerd with its own root, state and sockets; the CRI plugin uses
    /// CNI's bridge on `subnet` (an /24, unique per test) and knows the
    /// runtime handler "podvisor" (our shim, found on PATH in the build
    /// directory, keeping its state under `pv_root`).
    pub fn start() -> Containerd {
        Containerd::start_with_subnet("10.88.90.0/24")
    }

    pub fn start_with_subnet(subnet: &str) -> Containerd {
        Containerd::start_with(subnet, None)
    }

    /// As `start_with_subnet`; the shim reads podvisor's factory policy from
    /// `policy` (a config.toml) when given.
    pub fn start_with(subnet: &str, policy: Option<&str>) -> Containerd {
        let containerd = require("containerd");
        require("ctr");
        require("runc");
        let cni_bin = Path::new("/usr/lib/cni");
        assert!(
            cni_bin.join("bridge").exists() && cni_bin.join("host-local").exists(),
            "CNI plugins are missing: install Debian's containernetworking-plugins"
        );
        let dir = Scratch::new("containerd");
        let cni_conf = dir.0.join("cni");
        std::fs::create_dir_all(&cni_conf).unwrap();
        // The bridge's name must fit in 15 bytes and differ between tests.
        // Unique per test process and subnet; at most 15 bytes.
        let octet = subnet.split('.').nth(2).unwrap_or("0");
        let bridge = format!("pv{}b{octet}", std::process::id() % 1_000_000);
        let net = format!("pv-{}", std::process::id());
        std::fs::write(
            cni_conf.join("10-podvisor-test.conflist"),
            format!(
                r#"{{"cniVersion": "0.4.0", "name": "{net}", "plugins": [
  {{"type": "bridge", "bridge": "{bridge}", "isGateway": true, "ipMasq": false,
    "ipam": {{"type": "host-local", "ranges": [[{{"subnet": "{subnet}"}}]],
              "routes": [{{"dst": "0.0.0.0/0"}}], "dataDir": "{}"}}}},
  {{"type": "loopback"}}
]}}"#,
                dir.0.join("ipam").display()
            ),
        )
        .unwrap();
        let config = format!(
            r#"version = 2
root = "{0}/root"
state = "{0}/state"
[grpc]
  address = "{0}/containerd.sock"
[ttrpc]
  address = "{0}/containerd.sock.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  restrict_oom_score_adj = true
  sandbox_image = "localhost/pause:latest"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{1}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.podvisor]
    runtime_type = "io.containerd.podvisor.v2"
"#,
            dir.0.display(),
            cni_conf.display()
        );
        std::fs::write(dir.0.join("config.toml"), config).unwrap();
        let path = format!(
            "{}:{}",
            build_dir().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut daemon = Command::new(containerd);
        daemon
            .arg("--config")
            .arg(dir.0.join("config.toml"))
            .env("PATH", path)
            .env("PODVISOR_ROOT", dir.0.join("pv-root"));
        if let Some(policy) = policy {
            let file = dir.0.join("podvisor.toml");
            std::fs::write(&file, policy).unwrap();
            daemon.env("PODVISOR_CONFIG", file);
        } else {
            // Not the machine's policy: a test states its own.
            daemon.env("PODVISOR_CONFIG", dir.0.join("no-policy.toml"));
        }
        let daemon = spawn_logged(&mut daemon, &dir.0.join("containerd.log"));
        let c = Containerd {
            dir,
            daemon,
            bridge,
        };
        wait_for("containerd", Duration::from_secs(30), || {
            succeeds(c.ctr().arg("version"))
        });
        c
    }

    pub fn ctr(&self) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address").arg(self.dir.0.join("containerd.sock"));
        c
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.0.join("containerd.sock")
    }

    /// The factory policy the shim reads (written by `start_with`).
    pub fn policy(&self) -> PathBuf {
        self.dir.0.join("podvisor.toml")
    }

    /// Where the podvisor shim keeps its VMs' state for this containerd.
    pub fn pv_root(&self) -> PathBuf {
        self.dir.0.join("pv-root")
    }

    /// Imports the busybox image (an OCI archive podman makes from local
    /// files) into `namespace` as localhost/busybox:latest, and the same
    /// files as localhost/pause:latest with `sleep infinity` for a command
    /// (CRI's sandbox image; runc runs it, podvisor does not).
    pub fn import_busybox(&self, namespace: &str) {
        let pm = Podman::new("for-ctr");
        let tar = busybox_tar(&pm.dir.0);
        ok(&pm.run(&[
            "import",
            "--change",
            "CMD [\"/bin/sleep\", \"infinity\"]",
            tar.to_str().unwrap(),
            "localhost/pause:latest",
        ]));
        for image in ["busybox", "pause"] {
            let archive = pm.dir.0.join(format!("{image}-oci.tar"));
            ok(&pm.run(&[
                "save",
                "--format",
                "oci-archive",
                "-o",
                archive.to_str().unwrap(),
                &format!("localhost/{image}"),
            ]));
            ok(&output(
                self.ctr()
                    .args(["-n", namespace, "images", "import", "--base-name"])
                    .arg(format!("localhost/{image}"))
                    .arg(&archive),
            ));
        }
    }

    /// The contents of containerd's log (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("containerd.log")).unwrap_or_default()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        stop_daemon(&mut self.daemon);
        // Shims outlive their containerd (to survive its restarts): those a
        // failed test left running go now, and their VMs with them.
        let socket = self.socket().to_string_lossy().into_owned();
        for pid in test_utils::processes_mentioning(&socket) {
            // SAFETY: kill(2) with a pid read from /proc.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        // CNI's bridge plugin leaves its bridge behind.
        let _ = succeeds(Command::new("ip").args(["link", "delete", &self.bridge]));
    }
}

/// GET `path` from 127.0.0.1:`port`, retrying while the server comes up.
pub fn http_get(port: u16, path: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
            let mut body = String::new();
            s.read_to_string(&mut body)?;
            Ok(body)
        })();
        match attempt {
            Ok(body) if body.starts_with("HTTP/1") => return body,
            other => assert!(Instant::now() < deadline, "GET :{port}{path}: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// An interactive session in a tmux pane of its own size.
pub struct Terminal {
    name: String,
}

impl Terminal {
    pub fn start(name: &str, command: &str) -> Terminal {
        require("tmux");
        let name = format!("pv-{name}-{}", std::process::id());
        ok(&output(Command::new("tmux").args([
            "new-session",
            "-d",
            "-s",
            &name,
            "-x",
            "100",
            "-y",
            "30",
            &format!("{command}; echo EXIT=$?; sleep 60"),
        ])));
        Terminal { name }
    }

    pub fn send(&self, keys: &str) {
        ok(&output(Command::new("tmux").args([
            "send-keys",
            "-t",
            &self.name,
            keys,
            "Enter",
        ])));
    }

    pub fn resize(&self, cols: u16, rows: u16) {
        ok(&output(Command::new("tmux").args([
            "resize-window",
            "-t",
            &self.name,
            "-x",
            &cols.to_string(),
            "-y",
            &rows.to_string(),
        ])));
    }

    pub fn screen(&self) -> String {
        ok(&output(Command::new("tmux").args([
            "capture-pane",
            "-p",
            "-t",
            &self.name,
        ])))
    }

    /// Waits until the screen shows `text`.
    pub fn expect(&self, text: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.screen();
            if s.contains(text) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{text:?} never appeared; screen:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = output(Command::new("tmux").args(["kill-session", "-t", &self.name]));
    }
}

/// Drives an interactive busybox shell in a 100x30 pane: type, read the
/// answer, resize the pane and see the guest's terminal follow, exit 3.
pub fn drive_shell(term: &Terminal) {
    term.expect("/ #", Duration::from_secs(60));
    term.send("echo typed-$((6*7)); stty size");
    term.expect("typed-42", Duration::from_secs(20));
    term.expect("30 100", Duration::from_secs(20));
    term.resize(120, 40);
    std::thread::sleep(Duration::from_millis(500));
    term.send("stty size; exit 3");
    term.expect("40 120", Duration::from_secs(20));
    term.expect("EXIT=3", Duration::from_secs(30));
}

/// The host's kernel release, to tell it from the guest's.
pub fn host_kernel() -> String {
    ok(&output(Command::new("uname").arg("-r")))
        .trim()
        .to_string()
}

/// Processes on this host, as pid strings.
pub fn pids() -> Vec<String> {
    std::fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str().map(String::from))
                .filter(|p| p.chars().all(|c| c.is_ascii_digit()))
                .collect()
        })
        .unwrap_or_default()
}

/// The command line of process `pid`, arguments joined by spaces ("" if gone).
pub fn cmdline(pid: &str) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .unwrap_or_default()
}

/// The parent pid of process `pid` ("" if gone).
pub fn parent(pid: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit(')')
                .next()?
                .split_whitespace()
                .nth(1)
                .map(String::from)
        })
        .unwrap_or_default()
}

/// Who answers for process `pid`: for a VM's supervisor (which leaves the
/// process that started it), that starter, named last on its command line;
/// for any other process, its parent.
pub fn owner(pid: &str) -> String {
    let args: Vec<String> = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            String::from_utf8_lossy(&c)
                .split('\0')
                .filter(|a| !a.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    match args.iter().any(|a| a == "--podvisor-vm-supervisor") {
        true => args.last().cloned().unwrap_or_default(),
        false => parent(pid),
    }
}

/// The pid of the podvisor shim serving `pod` (started with `-id POD`).
pub fn shim_of(pod: &str) -> Option<String> {
    pids().into_iter().find(|p| {
        let cmd = cmdline(p);
        cmd.contains("containerd-shim-podvisor-v2") && cmd.contains(pod)
    })
}

/// A CRI client (what kubelet speaks) on containerd's socket.
pub mod cri {
    use std::path::{Path, PathBuf};

    use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
    use k8s_cri::v1::{
        PodSandboxConfig, PodSandboxMetadata, RemovePodSandboxRequest, StopPodSandboxRequest,
    };
    use tonic::transport::{Channel, Endpoint, Uri};

    pub type Cri = RuntimeServiceClient<Channel>;

    pub async fn connect(socket: PathBuf) -> Cri {
        let channel = Endpoint::try_from("http://cri")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let socket = socket.clone();
                async move {
                    let s = tokio::net::UnixStream::connect(socket).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                }
            }))
            .await
            .expect("connecting to containerd's CRI socket");
        RuntimeServiceClient::new(channel)
    }

    /// StopPodSandbox then RemovePodSandbox, as kubelet does when a pod goes.
    pub async fn remove_pod(cri: &mut Cri, pod: &str) {
        cri.stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod.into(),
        })
        .await
        .expect("StopPodSandbox");
        cri.remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod.into(),
        })
        .await
        .expect("RemovePodSandbox");
    }

    /// A pod named `name` in Kubernetes namespace `namespace`, logging to `logs`.
    pub fn pod_config(name: &str, namespace: &str, logs: &Path) -> PodSandboxConfig {
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.into(),
                uid: format!("uid-{name}-{}", std::process::id()),
                namespace: namespace.into(),
                attempt: 0,
            }),
            hostname: name.into(),
            log_directory: logs.to_string_lossy().into_owned(),
            ..Default::default()
        }
    }
}

/// `podvisor pool serve` for a state root and policy, until dropped (then
/// stopped with SIGTERM, which retires its clones).
pub struct PoolDaemon {
    child: std::process::Child,
    root: PathBuf,
    policy: PathBuf,
}

impl PoolDaemon {
    /// Starts the daemon and waits until its status shows `ready`.
    pub fn start(root: &Path, policy: &Path, ready: &str) -> PoolDaemon {
        let (child, _out) = test_utils::spawn_until_ready(
            Command::new(podvisor())
                .arg("--root")
                .arg(root)
                .args(["pool", "serve", "--config"])
                .arg(policy),
        );
        let d = PoolDaemon {
            child,
            root: root.into(),
            policy: policy.into(),
        };
        wait_for(
            &format!("the pool ({ready})"),
            Duration::from_secs(120),
            || d.status().contains(ready),
        );
        d
    }

    /// What `podvisor pool status` says.
    pub fn status(&self) -> String {
        let o = output(
            Command::new(podvisor())
                .arg("--root")
                .arg(&self.root)
                .args(["pool", "status", "--config"])
                .arg(&self.policy),
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

impl Drop for PoolDaemon {
    fn drop(&mut self) {
        // SAFETY: kill with the pid of our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
