//! Fixtures for image tests: Debian's `docker-registry` on loopback (plain, or
//! with htpasswd basic auth and a self-signed certificate), OCI layouts built
//! from local files, and a TCP relay that counts, corrupts, cuts or slows
//! what a registry sends.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

/// Panics naming the Debian package when `tool` is not on PATH.
pub fn need(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is missing: install Debian's {package} (scripts/install-deps.sh does)"
    );
}

/// A port nothing listens on (yet).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn run(cmd: &mut Command) {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A running `docker-registry`, killed on drop.
pub struct Registry {
    pub port: u16,
    pub dir: PathBuf,
    /// `user:password` when it asks for basic auth (and then it speaks TLS).
    pub creds: Option<String>,
    child: Child,
}

impl Registry {
    /// A plain HTTP registry on 127.0.0.1.
    pub fn plain(dir: &Path) -> Registry {
        Registry::start(dir, false)
    }

    /// HTTPS with a self-signed certificate and htpasswd basic auth.
    pub fn with_auth_and_tls(dir: &Path) -> Registry {
        Registry::start(dir, true)
    }

    fn start(dir: &Path, secure: bool) -> Registry {
        need("docker-registry", "docker-registry");
        std::fs::create_dir_all(dir).unwrap();
        let port = free_port();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:{port}\n",
            dir.join("data").display()
        );
        let mut creds = None;
        if secure {
            need("openssl", "openssl");
            need("htpasswd", "apache2-utils");
            let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
            run(Command::new("openssl")
                .args([
                    "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                ])
                .args([
                    "-subj",
                    "/CN=127.0.0.1",
                    "-addext",
                    "subjectAltName=IP:127.0.0.1",
                ])
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(&cert));
            let htpasswd = dir.join("htpasswd");
            let out = Command::new("htpasswd")
                .args(["-Bbn", "alice", "wonderland"])
                .output()
                .expect("htpasswd");
            std::fs::write(&htpasswd, out.stdout).unwrap();
            config.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n\
                 auth:\n  htpasswd:\n    realm: test\n    path: {}\n",
                cert.display(),
                key.display(),
                htpasswd.display()
            ));
            creds = Some("alice:wonderland".to_string());
        }
        let config_path = dir.join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("registry.log")).unwrap())
            .spawn()
            .expect("starting docker-registry");
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "docker-registry did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Registry {
            port,
            dir: dir.to_path_buf(),
            creds,
            child,
        }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `skopeo copy` of `oci:LAYOUT:TAG` to `NAME` in this registry; `extra`
    /// are more skopeo flags (`--all`, `--format v2s2`).
    pub fn push(&self, layout: &Path, tag: &str, name: &str, extra: &[&str]) {
        need("skopeo", "skopeo");
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--quiet", "--dest-tls-verify=false"]);
        if let Some(c) = &self.creds {
            cmd.arg("--dest-creds").arg(c);
        }
        cmd.args(extra)
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}/{name}", self.host()));
        run(&mut cmd);
    }
}

impl Registry {
    /// The manifest (or index) bytes the registry serves for `name`.
    pub fn raw_manifest(&self, name: &str) -> Vec<u8> {
        need("skopeo", "skopeo");
        let mut cmd = Command::new("skopeo");
        cmd.args(["inspect", "--raw", "--tls-verify=false"]);
        if let Some(c) = &self.creds {
            cmd.arg("--creds").arg(c);
        }
        let out = cmd
            .arg(format!("docker://{}/{name}", self.host()))
            .stdin(Stdio::null())
            .output()
            .expect("skopeo inspect");
        assert!(out.status.success(), "skopeo inspect {name}");
        out.stdout
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An OCI image layout being built from local files.
pub struct OciLayout {
    pub dir: PathBuf,
    index: Vec<Value>,
}

/// A layer as a manifest names it, and its uncompressed digest.
#[derive(Clone)]
pub struct Layer {
    pub descriptor: Value,
    pub diff_id: String,
}

impl OciLayout {
    pub fn new(dir: &Path) -> OciLayout {
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        OciLayout {
            dir: dir.to_path_buf(),
            index: Vec::new(),
        }
    }

    /// Writes a blob; returns its digest and size.
    pub fn blob(&self, bytes: &[u8]) -> (String, u64) {
        let digest = sha256(bytes);
        std::fs::write(self.blob_path(&digest), bytes).unwrap();
        (digest, bytes.len() as u64)
    }

    pub fn blob_path(&self, digest: &str) -> PathBuf {
        self.dir
            .join("blobs/sha256")
            .join(&digest["sha256:".len()..])
    }

    /// The tree at `rootfs` as a layer: `compression` is gzip, zstd or none.
    pub fn layer(&self, rootfs: &Path, compression: &str) -> Layer {
        self.layer_with(
            rootfs,
            compression,
            &["--numeric-owner", "--owner=0", "--group=0"],
        )
    }

    /// `layer`, GNU tar called with `tar_args` (ownership, `--xattrs`,
    /// `--sparse`, ...) before the tree.
    pub fn layer_with(&self, rootfs: &Path, compression: &str, tar_args: &[&str]) -> Layer {
        let tar = Command::new("tar")
            .args(tar_args)
            .arg("-C")
            .arg(rootfs)
            .args(["-cf", "-", "."])
            .output()
            .expect("tar");
        assert!(tar.status.success(), "tar of {}", rootfs.display());
        let (bytes, media_type) = match compression {
            "gzip" => (filter("gzip", &["-n", "-c"], &tar.stdout), "tar+gzip"),
            "zstd" => (filter("zstd", &["-q", "-c"], &tar.stdout), "tar+zstd"),
            _ => (tar.stdout.clone(), "tar"),
        };
        let (digest, size) = self.blob(&bytes);
        Layer {
            descriptor: json!({
                "mediaType": format!("application/vnd.oci.image.layer.v1.{media_type}"),
                "digest": digest, "size": size,
            }),
            diff_id: sha256(&tar.stdout),
        }
    }

    /// An image manifest of `layers` for linux/`arch`; returns its descriptor.
    pub fn image(&self, layers: &[Layer], arch: &str) -> Value {
        let config = json!({
            "architecture": arch, "os": "linux",
            "config": { "Cmd": ["/bin/sh"] },
            "rootfs": { "type": "layers", "diff_ids": layers.iter().map(|l| &l.diff_id).collect::<Vec<_>>() },
        });
        let (cd, cs) = self.blob(config.to_string().as_bytes());
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs },
            "layers": layers.iter().map(|l| &l.descriptor).collect::<Vec<_>>(),
        });
        let (md, ms) = self.blob(manifest.to_string().as_bytes());
        json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": md, "size": ms,
            "platform": { "architecture": arch, "os": "linux" },
        })
    }

    /// An image index over `manifests`; returns its descriptor.
    pub fn index_of(&self, manifests: &[Value]) -> Value {
        let index = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests,
        });
        let (d, s) = self.blob(index.to_string().as_bytes());
        json!({ "mediaType": "application/vnd.oci.image.index.v1+json", "digest": d, "size": s })
    }

    /// Names `descriptor` `tag` in the layout's index.json.
    pub fn tag(&mut self, tag: &str, descriptor: &Value) {
        let mut d = descriptor.clone();
        d["annotations"] = json!({ "org.opencontainers.image.ref.name": tag });
        self.index.push(d);
        let index = json!({ "schemaVersion": 2, "manifests": self.index });
        std::fs::write(self.dir.join("index.json"), index.to_string()).unwrap();
    }
}

fn filter(tool: &str, args: &[&str], input: &[u8]) -> Vec<u8> {
    need(tool, tool);
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{tool}: {e}"));
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success(), "{tool} failed");
    out.stdout
}

/// A busybox-static root: /bin/busybox and /bin/sh.
pub fn busybox_tree(dir: &Path) -> PathBuf {
    need("busybox", "busybox-static");
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", bin.join("sh")).unwrap();
    dir.to_path_buf()
}

/// What a relay does to the registry's replies.
#[derive(Clone)]
pub enum RelayMode {
    /// Passes everything.
    Pass,
    /// Flips a bit of the last byte of every occurrence of the pattern.
    Flip(Vec<u8>),
    /// Closes the connection where the pattern begins.
    Cut(Vec<u8>),
    /// Passes at most this many bytes per 100 ms.
    Throttle(usize),
}

/// A TCP relay on loopback to a registry; it counts blob requests.
pub struct Relay {
    pub port: u16,
    blob_requests: Arc<AtomicUsize>,
}

impl Relay {
    /// Relays to 127.0.0.1:`upstream` (a silent listener if `upstream` is 0:
    /// it accepts and never answers).
    pub fn start(upstream: u16, mode: RelayMode) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let blob_requests = Arc::new(AtomicUsize::new(0));
        let count = blob_requests.clone();
        std::thread::spawn(move || {
            let mut silent = Vec::new();
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if upstream == 0 {
                    silent.push(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let count = count.clone();
                std::thread::spawn(move || requests(client, server, &count));
                let mode = mode.clone();
                std::thread::spawn(move || replies(s2, c2, mode));
            }
        });
        Relay {
            port,
            blob_requests,
        }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Blob GETs relayed so far.
    pub fn blob_requests(&self) -> usize {
        self.blob_requests.load(Ordering::SeqCst)
    }
}

fn requests(mut from: TcpStream, mut to: TcpStream, count: &AtomicUsize) {
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 {
            break;
        }
        let chunk = &buf[..n];
        let gets = chunk
            .windows(4)
            .enumerate()
            .filter(|(_, w)| *w == b"GET ")
            .filter(|(i, _)| {
                let line = &chunk[*i..];
                let end = line.iter().position(|&b| b == b'\n').unwrap_or(line.len());
                line[..end].windows(7).any(|w| w == b"/blobs/")
            })
            .count();
        count.fetch_add(gets, Ordering::SeqCst);
        if to.write_all(chunk).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

fn replies(mut from: TcpStream, mut to: TcpStream, mode: RelayMode) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    let pattern = match &mode {
        RelayMode::Flip(p) | RelayMode::Cut(p) => p.clone(),
        _ => Vec::new(),
    };
    // What is held back (a possible pattern start) goes out once the
    // registry pauses, or the end of a reply would wait for the next one.
    let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
    loop {
        let n = match &mode {
            RelayMode::Throttle(per_tick) => {
                std::thread::sleep(Duration::from_millis(100));
                let n = (*per_tick).min(buf.len());
                from.read(&mut buf[..n])
            }
            _ => from.read(&mut buf),
        };
        let n = match n {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if to.write_all(&pending).is_err() {
                    break;
                }
                pending.clear();
                continue;
            }
            Err(_) => break,
        };
        if n == 0 {
            let _ = to.write_all(&pending);
            break;
        }
        pending.extend_from_slice(&buf[..n]);
        if !pattern.is_empty() {
            if let Some(at) = pending.windows(pattern.len()).position(|w| w == pattern) {
                if let RelayMode::Cut(_) = mode {
                    let _ = to.write_all(&pending[..at]);
                    let _ = to.shutdown(Shutdown::Both);
                    let _ = from.shutdown(Shutdown::Both);
                    return;
                }
                pending[at + pattern.len() - 1] ^= 0x01;
            }
        }
        // Keep what could be the start of a pattern split across reads.
        let keep = pattern.len().saturating_sub(1).min(pending.len());
        let send = pending.len() - keep;
        if to.write_all(&pending[..send]).is_err() {
            break;
        }
        pending.drain(..send);
    }
    let _ = to.shutdown(Shutdown::Write);
}
