//! `podvisor sandbox run --image`: images from a real registry on loopback
//! (Debian's `docker-registry`, fed by `skopeo copy` from OCI layouts that
//! GNU tar makes here) become read-only ext4 disks, and each sandbox writes
//! to a qcow2 layer of its own. Layer semantics are checked inside real
//! guests; hostile layers must fail with one clear error and write nothing
//! outside the store. Needs docker-registry, skopeo, e2fsprogs, qemu-utils,
//! busybox-static and libcap2-bin (setcap): scripts/install-deps.sh.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use test_utils::registry::{need, sha256, OciLayout, Registry};
use test_utils::StateRoot;

/// A test's store, layouts and registry.
struct Env {
    dir: PathBuf,
    state: StateRoot,
    registry: Registry,
}

impl Env {
    fn new(name: &str) -> Env {
        let dir = std::env::temp_dir().join(format!("podvisor-blk-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let registry = Registry::plain(&dir.join("registry"));
        Env {
            dir,
            state: StateRoot::new(&format!("blk-{name}")),
            registry,
        }
    }

    fn store(&self) -> PathBuf {
        self.dir.join("store")
    }

    fn podvisor(&self, args: &[&str]) -> Command {
        test_utils::build_dir();
        let mut c = Command::new(env!("CARGO_BIN_EXE_podvisor"));
        c.arg("--root").arg(&self.state.path).args(args);
        c.env("PODVISOR_CONFIG", self.dir.join("config.toml"))
            .env("HOME", &self.dir)
            .stdin(Stdio::null());
        c
    }

    /// `sandbox run --image REF` of the registry's `repo`, running `script`.
    fn run(&self, repo: &str, script: &str) -> Output {
        self.run_as(repo, "0:0", script)
    }

    fn run_as(&self, repo: &str, user: &str, script: &str) -> Output {
        let image = format!("{}/{repo}", self.registry.host());
        let store = self.store();
        let args = [
            "sandbox",
            "run",
            "--user",
            user,
            "--image-root",
            store.to_str().unwrap(),
            "--tls-verify=false",
            "--image",
            &image,
            "--",
            "sh",
            "-c",
            script,
        ];
        test_utils::output(&mut self.podvisor(&args))
    }

    fn image(&self, args: &[&str]) -> Output {
        let store = self.store();
        let mut all = vec!["image", "--image-root", store.to_str().unwrap()];
        all.extend_from_slice(args);
        test_utils::output(&mut self.podvisor(&all))
    }

    /// The block roots built so far.
    fn roots(&self) -> Vec<String> {
        let mut r: Vec<String> = test_utils::names_in(&self.store().join("roots"))
            .into_iter()
            .filter(|n| n.ends_with(".ext4") && !n.starts_with("empty-"))
            .collect();
        r.sort();
        r
    }

    /// Staging directories left in the store.
    fn staging(&self) -> Vec<String> {
        test_utils::names_in(&self.store().join("tmp"))
    }

    /// Pushes an image of `layers` (blobs of `layout()`) as `repo`.
    fn push(&self, repo: &str, layers: &[test_utils::registry::Layer]) {
        let mut layout = self.layout();
        let m = layout.image(layers, "amd64");
        layout.tag("1", &m);
        self.registry.push(&layout.dir, "1", repo, &[]);
    }

    fn layout(&self) -> OciLayout {
        OciLayout::new(&self.dir.join("layout"))
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    text(&o.stdout)
}

/// A busybox-static root with every applet linked in /bin.
fn busybox_root(dir: &Path) -> PathBuf {
    need("busybox", "busybox-static");
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox")).unwrap();
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    for applet in text(&list.stdout).lines() {
        let _ = std::os::unix::fs::symlink("busybox", bin.join(applet));
    }
    for d in ["etc", "tmp", "proc", "sys", "dev", "root"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    dir.to_path_buf()
}

/// A layer from a tar file made by `python3`'s tarfile from `script`
/// (which adds members to `t`): for entries GNU tar will not write.
fn crafted_layer(
    layout: &OciLayout,
    dir: &Path,
    name: &str,
    script: &str,
) -> test_utils::registry::Layer {
    need("python3", "python3");
    let tar = dir.join(format!("{name}.tar"));
    let program = format!(
        "import tarfile, io, sys\nt = tarfile.open(sys.argv[1], 'w', format=tarfile.PAX_FORMAT)\n\
         def add(name, data=b'', **kw):\n    i = tarfile.TarInfo(name); i.size = len(data)\n    \
         [setattr(i, k, v) for k, v in kw.items()]\n    t.addfile(i, io.BytesIO(data))\n{script}\nt.close()\n"
    );
    let out = Command::new("python3")
        .arg("-c")
        .arg(&program)
        .arg(&tar)
        .output()
        .unwrap();
    assert!(out.status.success(), "python3: {}", text(&out.stderr));
    let tree = dir.join(format!("{name}-tree"));
    std::fs::create_dir_all(&tree).unwrap();
    // The layer of a tree holding only this tar's members.
    let bytes = std::fs::read(&tar).unwrap();
    let (digest, size) = layout.blob(&bytes);
    test_utils::registry::Layer {
        descriptor: serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": digest, "size": size,
        }),
        diff_id: sha256(&bytes),
    }
}

#[test]
fn an_image_runs_from_a_read_only_disk_under_a_writable_layer_of_its_own() {
    let env = Env::new("run");
    let layout = env.layout();
    let base = busybox_root(&env.dir.join("base"));
    let extra = env.dir.join("extra");
    std::fs::create_dir_all(extra.join("etc")).unwrap();
    std::fs::write(extra.join("etc/motd"), "hello from layer two\n").unwrap();
    env.push(
        "busybox:1",
        &[layout.layer(&base, "gzip"), layout.layer(&extra, "zstd")],
    );

    let first = ok(&env.run(
        "busybox:1",
        "cat /etc/motd; grep -c '^overlay / overlay' /proc/mounts; \
         echo mine > /etc/motd; cat /etc/motd; touch /mark; df -m / | tail -1",
    ));
    let lines: Vec<&str> = first.lines().collect();
    assert_eq!(lines[..3], ["hello from layer two", "1", "mine"], "{first}");
    // The writable layer is the --disk-size default (2048 MiB) disk.
    let df: Vec<&str> = lines[3].split_whitespace().collect();
    let total: u64 = df[1].parse().unwrap();
    assert!(
        (1900..=2048).contains(&total),
        "writable layer size: {first}"
    );
    let roots = env.roots();
    assert_eq!(roots.len(), 1, "one block root: {roots:?}");
    let root_file = env.store().join("roots").join(&roots[0]);
    let before = sha256(&std::fs::read(&root_file).unwrap());

    // A second sandbox sees the image, not the first one's writes.
    let second = ok(&env.run(
        "busybox:1",
        "cat /etc/motd; ls /mark 2>/dev/null || echo no-mark",
    ));
    assert_eq!(second, "hello from layer two\nno-mark\n");
    assert_eq!(
        sha256(&std::fs::read(&root_file).unwrap()),
        before,
        "the image's disk is never written"
    );
    assert_eq!(env.roots(), roots, "built once");

    // Container root writing the image's disk itself, through a device node
    // it makes: the disk is read-only in QEMU (and in its jail).
    let attack = ok(&env.run(
        "busybox:1",
        "for d in /sys/block/vd*; do [ \"$(cat $d/serial)\" = podvisor-image ] && dev=$d; done; \
         mknod /tmp/disk b $(tr : ' ' < $dev/dev) || echo no-node; \
         dd if=/dev/zero of=/tmp/disk bs=4096 count=16 conv=fsync 2>/dev/null \
         && echo wrote-the-image || echo refused",
    ));
    assert_eq!(attack, "refused\n");
    assert_eq!(
        sha256(&std::fs::read(&root_file).unwrap()),
        before,
        "the image's disk is never written, not even raw"
    );
    assert!(
        env.staging().is_empty(),
        "no staging left: {:?}",
        env.staging()
    );

    // `image rm` refuses an image a running sandbox uses.
    let image = format!("{}/busybox:1", env.registry.host());
    let store = env.store();
    let mut running = env
        .podvisor(&[
            "sandbox",
            "run",
            "--image-root",
            store.to_str().unwrap(),
            "--image",
            &image,
            "--",
            "sh",
            "-c",
            "echo ready; read x",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(running.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "ready\n");
    let refused = env.image(&["rm", &image]);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("in use by a running sandbox"),
        "{}",
        text(&refused.stderr)
    );
    running.stdin.take().unwrap().write_all(b"go\n").unwrap();
    assert!(running.wait().unwrap().success());
    ok(&env.image(&["rm", &image]));
    assert!(env.roots().is_empty(), "rm removes the block root");
}

#[test]
fn layer_semantics_hold_inside_the_guest() {
    need("setcap", "libcap2-bin");
    let env = Env::new("semantics");
    let layout = env.layout();
    let base = busybox_root(&env.dir.join("base"));
    std::fs::create_dir_all(base.join("data/dir")).unwrap();
    std::fs::create_dir_all(base.join("data/gonedir/sub")).unwrap();
    for f in [
        "data/gone",
        "data/dir/old",
        "data/keep",
        "data/gonedir/sub/f",
        "data/becomes-dir",
    ] {
        std::fs::write(base.join(f), "lower\n").unwrap();
    }
    std::fs::create_dir_all(base.join("data/becomes-file")).unwrap();

    let top = env.dir.join("top");
    let data = top.join("data");
    std::fs::create_dir_all(data.join("dir")).unwrap();
    std::fs::create_dir_all(data.join("becomes-dir")).unwrap();
    std::fs::write(data.join("becomes-dir/inside"), "upper\n").unwrap();
    std::fs::write(data.join("becomes-file"), "upper\n").unwrap();
    for wh in [".wh.gone", ".wh.gonedir", "dir/.wh..wh..opq"] {
        std::fs::write(data.join(wh), "").unwrap();
    }
    std::fs::write(data.join("dir/new"), "upper\n").unwrap();
    std::fs::write(data.join("link1"), "linked\n").unwrap();
    std::fs::hard_link(data.join("link1"), data.join("link2")).unwrap();
    let st = Command::new("mknod")
        .arg(data.join("null"))
        .args(["c", "1", "3"])
        .status();
    assert!(st.unwrap().success());
    // GNU tar's own sparse entries: in the POSIX format (which --xattrs
    // needs) it writes sparse files another way, so they get a layer.
    let holes = env.dir.join("holes");
    std::fs::create_dir_all(holes.join("data")).unwrap();
    let mut sparse = std::fs::File::create(holes.join("data/sparse")).unwrap();
    sparse.set_len(1 << 30).unwrap();
    std::io::Seek::seek(&mut sparse, std::io::SeekFrom::Start(1 << 29)).unwrap();
    sparse.write_all(b"middle").unwrap();
    drop(sparse);
    std::fs::write(data.join("suid"), "#!/bin/sh\n").unwrap();
    let chmod = Command::new("chmod")
        .arg("4755")
        .arg(data.join("suid"))
        .status();
    assert!(chmod.unwrap().success());
    std::fs::write(data.join("owned"), "x\n").unwrap();
    std::os::unix::fs::chown(data.join("owned"), Some(1234), Some(5678)).unwrap();
    // A copy of busybox named for an applet, with a file capability.
    std::fs::create_dir_all(data.join("cap")).unwrap();
    std::fs::copy("/bin/busybox", data.join("cap/cat")).unwrap();
    let setcap = Command::new("setcap")
        .args(["cap_net_raw+ep"])
        .arg(data.join("cap/cat"))
        .output()
        .unwrap();
    assert!(setcap.status.success(), "setcap: {}", text(&setcap.stderr));
    let top_layer = layout.layer_with(
        &top,
        "gzip",
        &[
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=security.capability",
            "--sparse",
        ],
    );
    let holes_layer = layout.layer_with(
        &holes,
        "gzip",
        &["--numeric-owner", "--sparse", "--format=gnu"],
    );
    env.push(
        "layers:1",
        &[layout.layer(&base, "gzip"), top_layer, holes_layer],
    );

    let script = "cd /data; ls gone gonedir 2>&1 | grep -c 'No such file'; ls dir; cat keep; \
        cat becomes-dir/inside becomes-file; \
        [ $(stat -c %i link1) = $(stat -c %i link2) ] && stat -c %h link1; \
        stat -c '%F %t,%T' null; echo x > null && echo wrote-null; \
        stat -c '%s %b' sparse; dd if=sparse bs=1 skip=536870912 count=6 2>/dev/null; echo; stat -c %a suid; stat -c %u:%g owned";
    let out = ok(&env.run("layers:1", script));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0], "2",
        "whiteouts remove a file and a directory: {out}"
    );
    assert_eq!(
        lines[1], "new",
        "an opaque directory keeps only its own layer's entries: {out}"
    );
    assert_eq!(lines[2], "lower", "{out}");
    assert_eq!(
        lines[3..5],
        ["upper", "upper"],
        "file <-> directory replaced: {out}"
    );
    assert_eq!(lines[5], "2", "hard links share an inode: {out}");
    assert_eq!(lines[6], "character special file 1,3", "{out}");
    assert_eq!(lines[7], "wrote-null", "{out}");
    let sparse: Vec<u64> = lines[8].split(' ').map(|n| n.parse().unwrap()).collect();
    assert_eq!(sparse[0], 1 << 30, "{out}");
    assert!(
        sparse[1] < 2048,
        "a sparse file stays sparse (blocks {}): {out}",
        sparse[1]
    );
    assert_eq!(
        lines[9], "middle",
        "a sparse file's data where it was: {out}"
    );
    assert_eq!(lines[10], "4755", "set-id bits kept: {out}");
    assert_eq!(lines[11], "1234:5678", "ownership kept: {out}");
    let caps = ok(&env.run_as("layers:1", "65534:65534", "/data/cap/cat /proc/self/status"));
    assert!(
        caps.lines()
            .any(|l| l.starts_with("CapPrm:") && l.ends_with("0000000000002000")),
        "the file capability gives a non-root user CAP_NET_RAW: {caps}"
    );
    // On the host the root is as small as its content: the sparse GiB is a hole.
    let root = env.store().join("roots").join(&env.roots()[0]);
    let used = std::fs::metadata(&root).unwrap().blocks() * 512;
    assert!(used < 64 << 20, "block root uses {used} bytes");
}

#[test]
fn hostile_layers_fail_with_one_error_and_write_nothing_outside_the_store() {
    let env = Env::new("hostile");
    let layout = env.layout();
    let base = busybox_root(&env.dir.join("base"));
    let sentinel = env.dir.join("sentinel");
    std::fs::create_dir_all(&sentinel).unwrap();
    std::fs::write(sentinel.join("keep"), "untouched\n").unwrap();
    let s = sentinel.display().to_string();
    let cases = [
        (
            "dotdot",
            format!("add('../../../{}/pwned', b'x')", s.trim_start_matches('/')),
        ),
        (
            "hardlink",
            "add('escape', type=tarfile.LNKTYPE, linkname='../../../etc/passwd')".to_string(),
        ),
        ("nested-dotdot", "add('a/../../x', b'x')".to_string()),
    ];
    for (name, script) in &cases {
        let layer = crafted_layer(&layout, &env.dir, name, script);
        let repo = format!("{name}:1");
        env.push(&repo, &[layout.layer(&base, "gzip"), layer]);
        let out = env.run(&repo, "echo ran");
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{name}: the layer is refused");
        assert!(!text(&out.stdout).contains("ran"), "{name}: nothing ran");
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{name}: one error line: {err}"
        );
        assert!(
            err.contains(".."),
            "{name}: the error names the entry: {err}"
        );
        assert!(
            env.roots().is_empty(),
            "{name}: no block root: {:?}",
            env.roots()
        );
        assert!(env.staging().is_empty(), "{name}: no staging left");
        assert_eq!(
            test_utils::names_in(&sentinel),
            ["keep"],
            "{name}: nothing written outside"
        );
    }

    // Symlinks pointing out are kept as they are but resolved inside the
    // root: what is written through them lands in the image, never in the
    // host's /tmp (where a naive unpacker would put it).
    let pid = std::process::id();
    let escape = crafted_layer(
        &layout,
        &env.dir,
        "symlinks",
        &format!(
            "add('evil', type=tarfile.SYMTYPE, linkname='/')\nadd('evil/tmp/pwned-{pid}', b'inside')\n\
             add('up', type=tarfile.SYMTYPE, linkname='../../../../..')\n\
             add('up/tmp/pwned2-{pid}', b'inside2')\n\
             add('hl', type=tarfile.LNKTYPE, linkname='evil/tmp/pwned-{pid}')"
        ),
    );
    env.push("symlinks:1", &[layout.layer(&base, "gzip"), escape]);
    let out = ok(&env.run(
        "symlinks:1",
        &format!("readlink /evil; cat /tmp/pwned-{pid} /tmp/pwned2-{pid} /hl"),
    ));
    assert_eq!(out, "/\ninsideinside2inside");
    for f in [format!("/tmp/pwned-{pid}"), format!("/tmp/pwned2-{pid}")] {
        assert!(!Path::new(&f).exists(), "{f} written on the host");
    }

    // A layer cut short (its digest is of the short bytes: the registry
    // serves it whole) is refused at unpack.
    let gz = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "tar -C {} -cf - . | gzip -c | head -c 20000",
            base.display()
        ))
        .output()
        .unwrap();
    let (digest, size) = layout.blob(&gz.stdout);
    let cut = test_utils::registry::Layer {
        descriptor: serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": digest, "size": size,
        }),
        diff_id: digest.clone(),
    };
    env.push("cut:1", &[cut]);
    let out = env.run("cut:1", "echo ran");
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "one error line: {err}");
    assert_eq!(env.roots().len(), 1, "only the symlink image's root");
    assert!(env.staging().is_empty());
}

#[test]
fn a_template_of_an_image_gives_every_clone_a_writable_layer_of_its_own() {
    let env = Env::new("template");
    let layout = env.layout();
    let base = busybox_root(&env.dir.join("base"));
    std::fs::write(base.join("etc/motd"), "from the image\n").unwrap();
    env.push("tpl:1", &[layout.layer(&base, "gzip")]);
    let image = format!("{}/tpl:1", env.registry.host());
    let store = env.store();
    let store = store.to_str().unwrap();
    ok(&test_utils::output(&mut env.podvisor(&[
        "template",
        "create",
        "--name",
        "img",
        "--image-root",
        store,
        "--tls-verify=false",
        "--image",
        &image,
        "--disk-size",
        "512",
    ])));
    let layer = env.state.path.join("templates/img/layer.qcow2");
    let sealed = sha256(&std::fs::read(&layer).unwrap());
    let clone = |script: &str| {
        test_utils::output(&mut env.podvisor(&[
            "sandbox",
            "run",
            "--timings",
            "--template",
            "img",
            "--",
            "sh",
            "-c",
            script,
        ]))
    };
    let script =
        "cat /etc/motd; ls /mark 2>/dev/null || echo no-mark; touch /mark; df -m / | tail -1";
    for _ in 0..2 {
        let out = clone(script);
        let stdout = ok(&out);
        assert!(
            text(&out.stderr).contains("\"cloned_from\":\"img\""),
            "cloned, not booted cold: {}",
            text(&out.stderr)
        );
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines[..2], ["from the image", "no-mark"], "{stdout}");
        let total: u64 = lines[2].split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(
            (450..=512).contains(&total),
            "the template's disk size: {stdout}"
        );
    }
    assert_eq!(
        sha256(&std::fs::read(&layer).unwrap()),
        sealed,
        "clones never write the template's layer"
    );
    let refused = env.image(&["rm", &image]);
    assert!(
        text(&refused.stderr).contains("in use by template img"),
        "{}",
        text(&refused.stderr)
    );
    ok(&test_utils::output(
        &mut env.podvisor(&["template", "rm", "img"]),
    ));
    ok(&env.image(&["rm", &image]));
}
