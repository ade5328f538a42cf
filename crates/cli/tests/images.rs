//! `podvisor image ...` against a real registry on loopback (Debian's
//! `docker-registry`), fed by `skopeo copy` from OCI layouts built here from
//! busybox-static. Needs docker-registry, skopeo, openssl, apache2-utils
//! (htpasswd), zstd and busybox-static: scripts/install-deps.sh.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use test_utils::registry::{
    busybox_tree, free_port, sha256, OciLayout, Registry, Relay, RelayMode,
};

/// A test's own directory: store, state root, HOME, registry, layouts.
struct Env {
    dir: PathBuf,
}

impl Env {
    fn new(name: &str) -> Env {
        let dir =
            std::env::temp_dir().join(format!("podvisor-images-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("home")).unwrap();
        Env { dir }
    }

    fn store(&self) -> PathBuf {
        self.dir.join("store")
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_podvisor"));
        c.arg("--root")
            .arg(self.dir.join("run"))
            .arg("image")
            .arg("--image-root")
            .arg(self.store())
            .args(args)
            .env("HOME", self.dir.join("home"))
            .env("PODVISOR_CONFIG", self.dir.join("config.toml"))
            .env_remove("REGISTRY_AUTH_FILE")
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("DOCKER_CONFIG")
            .stdin(Stdio::null());
        c
    }

    fn pv(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("running podvisor")
    }

    /// Runs podvisor, asserts success, returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.pv(args);
        assert!(
            out.status.success(),
            "podvisor image {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs podvisor, asserts failure, returns stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.pv(args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "podvisor image {args:?} succeeded");
        assert_eq!(err.trim().lines().count(), 1, "one error line: {err}");
        err
    }

    fn images(&self) -> Vec<Value> {
        serde_json::from_str(&self.ok(&["ls", "--format", "json"])).unwrap()
    }

    fn blobs(&self) -> Vec<String> {
        let mut b = test_utils::names_in(&self.store().join("blobs/sha256"));
        b.sort();
        b
    }

    fn has_blob(&self, digest: &str) -> bool {
        self.store()
            .join("blobs/sha256")
            .join(&digest["sha256:".len()..])
            .is_file()
    }

    fn staging_entries(&self) -> Vec<String> {
        test_utils::names_in(&self.store().join("tmp"))
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A layout with tag `1`: busybox (gzip) plus a small file layer, and the
/// manifest's descriptor.
fn busybox_layout(env: &Env, compression: &str) -> (OciLayout, Value) {
    let mut layout = OciLayout::new(&env.dir.join(format!("layout-{compression}")));
    let tree = busybox_tree(&env.dir.join(format!("rootfs-{compression}")));
    let extra = env.dir.join(format!("extra-{compression}"));
    std::fs::create_dir_all(extra.join("etc")).unwrap();
    std::fs::write(extra.join("etc/motd"), "hello from layer two\n").unwrap();
    let layers = [
        layout.layer(&tree, compression),
        layout.layer(&extra, compression),
    ];
    let m = layout.image(&layers, "amd64");
    layout.tag("1", &m);
    (layout, m)
}

/// A test's env and registry (with auth and TLS if `secure`) serving
/// `busybox_layout`'s image as `repo`.
fn served(name: &str, repo: &str, secure: bool) -> (Env, Registry, OciLayout, Value) {
    let env = Env::new(name);
    let dir = env.dir.join("registry");
    let reg = if secure {
        Registry::with_auth_and_tls(&dir)
    } else {
        Registry::plain(&dir)
    };
    let (layout, m) = busybox_layout(&env, "gzip");
    reg.push(&layout.dir, "1", repo, &[]);
    (env, reg, layout, m)
}

fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn digest(v: &Value) -> String {
    v["digest"].as_str().unwrap().to_string()
}

/// The layer digests of the manifest `m` in `layout`.
fn manifest_blobs(layout: &OciLayout, m: &Value) -> Vec<String> {
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(layout.blob_path(&digest(m))).unwrap()).unwrap();
    let mut blobs = vec![digest(&manifest["config"])];
    blobs.extend(manifest["layers"].as_array().unwrap().iter().map(digest));
    blobs
}

#[test]
fn pull_by_tag_and_by_digest_oci_and_docker_schema2() {
    let (env, reg, layout, m) = served("tag-digest", "busybox:1", false);
    reg.push(&layout.dir, "1", "busybox:v2s2", &["--format", "v2s2"]);
    let by_tag = format!("{}/busybox:1", reg.host());

    let out = env.ok(&["pull", "--tls-verify=false", &by_tag]);
    assert_eq!(out.trim(), digest(&m), "prints the manifest digest");
    for b in manifest_blobs(&layout, &m) {
        assert!(env.has_blob(&b), "{b} stored");
        // Layers are stored as pulled: the same compressed bytes.
        assert_eq!(
            std::fs::read(env.store().join("blobs/sha256").join(&b[7..])).unwrap(),
            std::fs::read(layout.blob_path(&b)).unwrap()
        );
    }
    let by_digest = format!("{}/busybox@{}", reg.host(), digest(&m));
    let out = env.pv(&["pull", "--tls-verify=false", &by_digest]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("0 blobs fetched"),
        "the second pull finds every blob: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let images = env.images();
    let names: Vec<&str> = images.iter().map(|i| i["name"].as_str().unwrap()).collect();
    assert_eq!(names, [by_tag.as_str(), by_digest.as_str()]);
    assert!(images.iter().all(|i| i["digest"] == m["digest"]));

    let v2s2 = format!("{}/busybox:v2s2", reg.host());
    env.ok(&["pull", "--tls-verify=false", "--quiet", &v2s2]);
    let inspect: Value = serde_json::from_str(&env.ok(&["inspect", &v2s2])).unwrap();
    assert_eq!(
        inspect["image"]["media_type"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    assert_eq!(inspect["config"]["architecture"], "amd64");
    assert_eq!(
        inspect["manifest"]["layers"][0]["mediaType"],
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    );
    let table = env.ok(&["ls"]);
    assert!(table.lines().next().unwrap().starts_with("NAME"));
    assert!(table.contains(&v2s2) && table.contains("seconds ago"));
    assert!(env.staging_entries().is_empty(), "no staging left");
}

#[test]
fn an_index_yields_linux_amd64_and_an_arm64_only_index_is_refused() {
    let env = Env::new("index");
    let reg = Registry::plain(&env.dir.join("registry"));
    let (mut layout, amd64) = busybox_layout(&env, "gzip");
    let arm_tree = env.dir.join("rootfs-arm64");
    std::fs::create_dir_all(&arm_tree).unwrap();
    std::fs::write(arm_tree.join("arch"), "arm64\n").unwrap();
    let arm_layer = layout.layer(&arm_tree, "gzip");
    let arm64 = layout.image(&[arm_layer], "arm64");
    let both = layout.index_of(&[arm64.clone(), amd64.clone()]);
    let arm_only = layout.index_of(std::slice::from_ref(&arm64));
    layout.tag("multi", &both);
    layout.tag("arm", &arm_only);
    reg.push(&layout.dir, "multi", "multi:1", &["--all"]);
    reg.push(&layout.dir, "arm", "arm:1", &["--all"]);

    let out = env.ok(&[
        "pull",
        "--tls-verify=false",
        &format!("{}/multi:1", reg.host()),
    ]);
    // What the registry holds (skopeo may have rewritten what it pushed).
    let raw = reg.raw_manifest("multi:1");
    let index: Value = serde_json::from_slice(&raw).unwrap();
    let amd64_entry = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["platform"]["architecture"] == "amd64")
        .unwrap();
    assert_eq!(out.trim(), digest(amd64_entry));
    let images = env.images();
    assert_eq!(
        images[0]["index_digest"].as_str(),
        Some(sha256(&raw).as_str())
    );
    assert_ne!(images[0]["index_digest"], images[0]["digest"]);
    let arm_blobs = manifest_blobs(&layout, &arm64);
    assert!(
        !env.has_blob(&arm_blobs[1]),
        "the arm64 layer is not pulled"
    );

    let before = env.blobs();
    let err = env.fails(&[
        "pull",
        "--tls-verify=false",
        &format!("{}/arm:1", reg.host()),
    ]);
    assert!(
        err.contains("no linux/amd64 image, only: linux/arm64"),
        "{err}"
    );
    assert_eq!(env.images().len(), 1);
    assert_eq!(env.blobs(), before, "nothing stored");
}

#[test]
fn zstd_layers_are_stored_as_pulled() {
    let env = Env::new("zstd");
    let reg = Registry::plain(&env.dir.join("registry"));
    let (layout, m) = busybox_layout(&env, "zstd");
    reg.push(&layout.dir, "1", "zbox:1", &[]);
    env.ok(&[
        "pull",
        "--tls-verify=false",
        &format!("{}/zbox:1", reg.host()),
    ]);
    let inspect: Value = serde_json::from_str(&env.ok(&["inspect", &digest(&m)])).unwrap();
    let layer = &inspect["manifest"]["layers"][0];
    assert_eq!(
        layer["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+zstd"
    );
    let bytes = std::fs::read(env.store().join("blobs/sha256").join(&digest(layer)[7..])).unwrap();
    assert_eq!(&bytes[..4], &[0x28, 0xb5, 0x2f, 0xfd], "zstd frame magic");
}

#[test]
fn two_concurrent_pulls_fetch_each_blob_once() {
    let (env, reg, layout, m) = served("concurrent", "busybox:1", false);
    // Slowed, so the second pull starts while the first is fetching.
    let relay = Relay::start(reg.port, RelayMode::Throttle(256 * 1024));
    let r = format!("{}/busybox:1", relay.host());
    let spawn = || {
        env.cmd(&["pull", "--tls-verify=false", "--quiet", &r])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    for o in [&a, &b] {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), digest(&m));
    }
    assert_eq!(
        relay.blob_requests(),
        manifest_blobs(&layout, &m).len(),
        "config and each layer fetched once"
    );
    assert_eq!(env.images().len(), 1);
}

#[test]
fn a_pull_killed_midway_leaves_nothing_complete_and_the_next_one_finishes() {
    let env = Env::new("killed");
    let reg = Registry::plain(&env.dir.join("registry"));
    let mut layout = OciLayout::new(&env.dir.join("layout"));
    let big = env.dir.join("big");
    std::fs::create_dir_all(&big).unwrap();
    // xorshift64: bytes gzip cannot shrink, so the layer takes a while.
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let noise: Vec<u8> = (0..4 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(big.join("noise"), noise).unwrap();
    let layer = layout.layer(&big, "gzip");
    let m = layout.image(std::slice::from_ref(&layer), "amd64");
    layout.tag("1", &m);
    reg.push(&layout.dir, "1", "big:1", &[]);

    let relay = Relay::start(reg.port, RelayMode::Throttle(64 * 1024));
    let mut child = env
        .cmd(&[
            "pull",
            "--tls-verify=false",
            &format!("{}/big:1", relay.host()),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the layer is partly written into a staging directory.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let partial = walk(&env.store().join("tmp"))
            .iter()
            .any(|f| f.metadata().map(|m| m.len() > 100_000).unwrap_or(false));
        if partial {
            break;
        }
        assert!(Instant::now() < deadline, "the pull never got going");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(env.images().is_empty(), "a killed pull lists nothing");
    assert!(
        !env.has_blob(&digest(&layer.descriptor)),
        "no partial layer in blobs/"
    );
    assert!(
        !env.staging_entries().is_empty(),
        "the dead pull's staging is left"
    );

    let out = env.ok(&[
        "pull",
        "--tls-verify=false",
        &format!("{}/big:1", reg.host()),
    ]);
    assert_eq!(out.trim(), digest(&m));
    assert!(env.has_blob(&digest(&layer.descriptor)));
    assert!(
        env.staging_entries().is_empty(),
        "the next pull collected the leftovers"
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn basic_auth_over_tls_with_right_and_wrong_credentials() {
    let (env, reg, _layout, m) = served("auth", "private/busybox:1", true);
    let r = format!("{}/private/busybox:1", reg.host());

    let err = env.fails(&["pull", &r]);
    assert!(
        err.contains("no TLS session") && err.contains("--tls-verify=false"),
        "{err}"
    );

    let err = env.fails(&["pull", "--tls-verify=false", &r]);
    assert!(err.contains("refused the credentials"), "anonymous: {err}");

    let b64 = base64_auth;
    let auth_file = env.dir.join("auth.json");
    std::fs::write(&auth_file, b64(&reg.host(), "alice:rabbit")).unwrap();
    let out = env
        .cmd(&["pull", "--tls-verify=false", &r])
        .env("REGISTRY_AUTH_FILE", &auth_file)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("refused the credentials"),
        "wrong: {err}"
    );
    assert!(
        env.images().is_empty() && env.blobs().is_empty(),
        "nothing stored"
    );

    // Right credentials in docker's config.json under $HOME.
    let docker = env.dir.join("home/.docker");
    std::fs::create_dir_all(&docker).unwrap();
    std::fs::write(
        docker.join("config.json"),
        b64(&reg.host(), "alice:wonderland"),
    )
    .unwrap();
    assert_eq!(
        env.ok(&["pull", "--tls-verify=false", &r]).trim(),
        digest(&m)
    );

    // Containers' auth.json wins over docker's, and the registry may be
    // insecure by config instead of by flag.
    std::fs::write(docker.join("config.json"), b64(&reg.host(), "alice:rabbit")).unwrap();
    std::fs::write(&auth_file, b64(&reg.host(), "alice:wonderland")).unwrap();
    std::fs::write(
        env.dir.join("config.toml"),
        format!("[images]\ninsecure_registries = [\"{}\"]\n", reg.host()),
    )
    .unwrap();
    let out = env
        .cmd(&["pull", "--quiet", &r])
        .env("REGISTRY_AUTH_FILE", &auth_file)
        .output()
        .unwrap();
    assert_success(&out);
}

/// An auth.json / config.json naming `host` with `user:password`.
fn base64_auth(host: &str, creds: &str) -> String {
    let out = Command::new("base64")
        .arg("-w0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(creds.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    format!(
        r#"{{"auths":{{"{host}":{{"auth":"{}"}}}}}}"#,
        String::from_utf8(out.stdout).unwrap()
    )
}

#[test]
fn a_registry_down_or_silent_gives_one_clear_error_in_bounded_time() {
    let env = Env::new("down");
    let down = format!("127.0.0.1:{}/busybox:1", free_port());
    let t = Instant::now();
    let err = env.fails(&["pull", "--tls-verify=false", &down]);
    assert!(
        err.contains("is not reachable") && err.contains("Connection refused"),
        "{err}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "refused: {:?}",
        t.elapsed()
    );

    let silent = Relay::start(0, RelayMode::Pass);
    let t = Instant::now();
    let err = env.fails(&[
        "pull",
        "--tls-verify=false",
        "--timeout",
        "1",
        &format!("{}/busybox:1", silent.host()),
    ]);
    assert!(err.contains("did not answer within 1 s"), "{err}");
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "silent: {:?}",
        t.elapsed()
    );

    let reg = Registry::plain(&env.dir.join("registry"));
    let err = env.fails(&[
        "pull",
        "--tls-verify=false",
        &format!("{}/nothing:1", reg.host()),
    ]);
    assert!(
        err.contains("no image") && err.contains("nothing:1"),
        "{err}"
    );
    assert!(env.images().is_empty() && env.blobs().is_empty());
}

#[test]
fn a_corrupted_or_truncated_blob_is_refused_and_nothing_is_stored() {
    let (env, reg, layout, m) = served("corrupt", "busybox:1", false);
    let layer = manifest_blobs(&layout, &m)[1].clone();
    let bytes = std::fs::read(layout.blob_path(&layer)).unwrap();
    let pattern = bytes[bytes.len() / 2..bytes.len() / 2 + 32].to_vec();

    let flip = Relay::start(reg.port, RelayMode::Flip(pattern.clone()));
    let err = env.fails(&[
        "pull",
        "--tls-verify=false",
        &format!("{}/busybox:1", flip.host()),
    ]);
    assert!(
        err.contains(&layer) && err.contains("does not match its digest"),
        "{err}"
    );
    assert!(!env.has_blob(&layer) && env.images().is_empty());
    assert!(env.staging_entries().is_empty());

    let cut = Relay::start(reg.port, RelayMode::Cut(pattern));
    let err = env.fails(&[
        "pull",
        "--tls-verify=false",
        &format!("{}/busybox:1", cut.host()),
    ]);
    assert!(err.contains(&layer) && err.contains("broke after"), "{err}");
    assert!(!env.has_blob(&layer) && env.images().is_empty());
}

#[test]
fn an_http_proxy_from_the_environment_is_honoured() {
    let (env, reg, _layout, m) = served("proxy", "busybox:1", false);
    // The relay forwards whatever it gets to the registry, which serves
    // absolute-form requests: a name that resolves nowhere works only
    // through the proxy.
    let relay = Relay::start(reg.port, RelayMode::Pass);
    let out = env
        .cmd(&[
            "pull",
            "--tls-verify=false",
            "registry.invalid:5000/busybox:1",
        ])
        .env("HTTP_PROXY", format!("http://{}", relay.host()))
        .env("http_proxy", format!("http://{}", relay.host()))
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .output()
        .unwrap();
    assert_success(&out);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), digest(&m));
    assert!(relay.blob_requests() >= 2, "blobs came through the proxy");
}

#[test]
fn import_of_oci_and_docker_archives() {
    let env = Env::new("import");
    need_skopeo();
    let (layout, m) = busybox_layout(&env, "gzip");
    let oci = env.dir.join("oci.tar");
    let docker = env.dir.join("docker.tar");
    for (transport, file, name) in [
        ("oci-archive", &oci, "localhost/busy:oci"),
        ("docker-archive", &docker, "localhost/busy:docker"),
    ] {
        let st = Command::new("skopeo")
            .args(["copy", "--quiet"])
            .arg(format!("oci:{}:1", layout.dir.display()))
            .arg(format!("{transport}:{}:{name}", file.display()))
            .status()
            .unwrap();
        assert!(st.success(), "skopeo copy to {transport}");
    }
    let out = env.ok(&["import", oci.to_str().unwrap()]);
    assert_eq!(out.trim(), format!("localhost/busy:oci {}", digest(&m)));
    let out = env.ok(&["import", docker.to_str().unwrap()]);
    assert!(out.starts_with("localhost/busy:docker sha256:"), "{out}");
    let inspect: Value =
        serde_json::from_str(&env.ok(&["inspect", "localhost/busy:docker"])).unwrap();
    assert_eq!(
        inspect["manifest"]["layers"][0]["mediaType"], "application/vnd.oci.image.layer.v1.tar",
        "docker-archive layers are plain tar"
    );
    assert_eq!(inspect["config"]["architecture"], "amd64");
    assert_eq!(env.images().len(), 2);
    let out = env.ok(&[
        "import",
        "--name",
        "localhost/renamed:1",
        oci.to_str().unwrap(),
    ]);
    assert!(out.starts_with("localhost/renamed:1 "));

    let junk = env.dir.join("junk.tar");
    std::fs::write(&junk, vec![7u8; 4096]).unwrap();
    let before = env.blobs();
    let err = env.fails(&["import", junk.to_str().unwrap()]);
    assert!(err.contains("junk.tar"), "{err}");
    assert_eq!(env.blobs(), before, "nothing stored");
    assert_eq!(env.images().len(), 3);
}

fn need_skopeo() {
    test_utils::registry::need("skopeo", "skopeo");
}

#[test]
fn rm_keeps_shared_blobs_and_prune_collects_the_rest() {
    let env = Env::new("rm-prune");
    let reg = Registry::plain(&env.dir.join("registry"));
    let (mut layout, m) = busybox_layout(&env, "gzip");
    let blobs = manifest_blobs(&layout, &m);
    // A second image sharing the busybox layer, with a layer of its own.
    let own = env.dir.join("own");
    std::fs::create_dir_all(&own).unwrap();
    std::fs::write(own.join("only-here"), "x").unwrap();
    let busybox_layer = test_utils::registry::Layer {
        descriptor: serde_json::from_slice::<Value>(
            &std::fs::read(layout.blob_path(&digest(&m))).unwrap(),
        )
        .unwrap()["layers"][0]
            .clone(),
        diff_id: String::new(),
    };
    let own_layer = layout.layer(&own, "gzip");
    let m2 = layout.image(&[busybox_layer, own_layer.clone()], "amd64");
    layout.tag("2", &m2);
    reg.push(&layout.dir, "1", "a:1", &[]);
    reg.push(&layout.dir, "2", "b:1", &[]);
    env.ok(&["pull", "--tls-verify=false", &format!("{}/a:1", reg.host())]);
    env.ok(&["pull", "--tls-verify=false", &format!("{}/b:1", reg.host())]);

    env.ok(&["rm", &format!("{}/b:1", reg.host())]);
    assert!(
        !env.has_blob(&digest(&own_layer.descriptor)),
        "b's own layer is gone"
    );
    assert!(!env.has_blob(&digest(&m2)), "b's manifest is gone");
    for b in &blobs {
        assert!(env.has_blob(b), "a's {b} stays");
    }
    let err = env.fails(&["rm", &format!("{}/b:1", reg.host())]);
    assert!(err.contains("no image"), "{err}");

    // Leftovers of a dead writer and a blob no image names.
    let tmp = env.store().join("tmp");
    std::fs::create_dir_all(tmp.join("dead")).unwrap();
    std::fs::write(tmp.join("dead/blob-0"), "partial").unwrap();
    std::fs::write(tmp.join("dead.lock"), "").unwrap();
    let orphan = test_utils::registry::sha256(b"orphan");
    std::fs::write(
        env.store().join("blobs/sha256").join(&orphan[7..]),
        "orphan",
    )
    .unwrap();
    let out = env.ok(&["prune"]);
    assert!(
        out.contains("removed 1 blobs") && out.contains("1 leftovers"),
        "{out}"
    );
    assert!(env.staging_entries().is_empty() && !env.has_blob(&orphan));
    // By a digest prefix, as ls shows it.
    env.ok(&["rm", &digest(&m)[7..19]]);
    assert!(env.images().is_empty() && env.blobs().is_empty());
}
