//! Templates at start: each config template's root filesystem (the `base`
//! one built here, Debian 12 with bash, coreutils and python3, cached
//! outside the state directory), made into a block root (an ext4 image of
//! the tree, read-only, and an empty filesystem for each sandbox's writable
//! disk), and its podvisor template, the VM snapshot that sandboxes are
//! cloned from, made when missing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use hypervisor::Accel;
use sandbox::assets::GuestAssets;
use sandbox::template::Template;
use sandbox::{BlockRoot, SandboxConfig};

use crate::config::{Config, TemplateConfig};
use crate::sandboxes::{parse_passwd, TemplateSpec};

/// Debian's suite, and what the base root holds beyond minbase.
const SUITE: &str = "bookworm";
const PACKAGES: &str = "bash,coreutils,python3,procps,ca-certificates";
const MIRROR: &str = "http://deb.debian.org/debian";

/// The base root in `cache`, built when missing: `debootstrap` (minutes,
/// once), then the user `user` (uid 1000) that E2B's SDKs run commands as.
pub fn base_rootfs(cache: &Path) -> anyhow::Result<PathBuf> {
    let tree = cache.join(format!("base-debian12-{}", short_hash(PACKAGES)));
    if tree.join(".complete").exists() {
        return Ok(tree);
    }
    std::fs::create_dir_all(cache).with_context(|| format!("creating {}", cache.display()))?;
    // One builder at a time; the others wait and use its tree.
    let lock = std::fs::File::create(cache.join(".base.lock"))?;
    // SAFETY: flock(2) on a file we own, released when it is closed.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
        anyhow::bail!(
            "locking {}: {}",
            cache.display(),
            std::io::Error::last_os_error()
        );
    }
    if tree.join(".complete").exists() {
        return Ok(tree);
    }
    let _ = std::fs::remove_dir_all(&tree);
    let staging = cache.join(format!(".base.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    eprintln!(
        "podvisord: building the base template's root (debootstrap {SUITE}, once) in {}",
        tree.display()
    );
    let ok = Command::new("debootstrap")
        .args(["--variant=minbase", &format!("--include={PACKAGES}"), SUITE])
        .arg(&staging)
        .arg(MIRROR)
        .status()
        .context("running debootstrap (apt-get install debootstrap)")?
        .success();
    if !ok {
        let _ = std::fs::remove_dir_all(&staging);
        anyhow::bail!("debootstrap of the base root failed (see above)");
    }
    let ok = Command::new("chroot")
        .arg(&staging)
        .args([
            "useradd",
            "--create-home",
            "--uid",
            "1000",
            "--shell",
            "/bin/bash",
            "user",
        ])
        .status()
        .context("running useradd in the base root")?
        .success();
    if !ok {
        let _ = std::fs::remove_dir_all(&staging);
        anyhow::bail!("adding the user `user` to the base root failed");
    }
    // What a sandbox's commands may not need from a build host.
    let _ = std::fs::remove_dir_all(staging.join("var/cache/apt/archives"));
    std::fs::create_dir_all(staging.join("var/cache/apt/archives/partial"))?;
    std::fs::rename(&staging, &tree)?;
    std::fs::write(tree.join(".complete"), b"")?;
    Ok(tree)
}

/// What a VM template was made from: the guest assets (size and mtime),
/// the VM's shape and its disks.
fn assets_stamp(
    assets: &GuestAssets,
    memory: u64,
    vcpus: u32,
    accel: Accel,
    block: &BlockRoot,
) -> String {
    use std::os::unix::fs::MetadataExt;
    let file = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| {
                format!(
                    "{}:{}:{}",
                    p.display(),
                    m.len(),
                    m.mtime_nsec() + m.mtime() * 1_000_000_000
                )
            })
            .unwrap_or_default()
    };
    format!(
        "{}\n{}\nmemory={memory} vcpus={vcpus} accel={accel}\n{}\n{}\n",
        file(&assets.kernel),
        file(&assets.initrd),
        block.image.display(),
        block.empty.display(),
    )
}

/// The block root of tree `rootfs` in `images`: built when the tree is
/// new or changed (by its own, its /etc's and its /usr's mtime; a tree is
/// read when its template is made, not after). Roots made of older trees
/// stay: paused sandboxes' snapshots may still name them.
fn block_root(
    images: &image::store::Store,
    name: &str,
    rootfs: &Path,
    disk_mib: u64,
) -> anyhow::Result<BlockRoot> {
    use std::os::unix::fs::MetadataExt;
    let mut what = format!("{name}\n{}\n", rootfs.display());
    for sub in ["", "etc", "usr"] {
        if let Ok(m) = std::fs::metadata(rootfs.join(sub)) {
            what.push_str(&format!("{sub}:{}.{}\n", m.mtime(), m.mtime_nsec()));
        }
    }
    let key = format!(
        "{}-{}",
        name.to_ascii_lowercase().replace('_', "-"),
        short_hash(&what)
    );
    let image = image::blockroot::tree_root(images, rootfs, &key)
        .with_context(|| format!("making the block root of {}", rootfs.display()))?;
    let empty = image::blockroot::empty_fs(images, disk_mib)
        .with_context(|| format!("making an empty {disk_mib} MiB filesystem"))?;
    Ok(BlockRoot { image, empty })
}

/// A tenant's snapshot as a template: its VM template is the snapshot
/// (made already; never made again), its disks the snapshot's.
pub fn snapshot_spec(
    t: &TemplateConfig,
    of: &crate::config::SnapshotOf,
    vm_root: &Path,
) -> anyhow::Result<TemplateSpec> {
    let vm = format!("podvisord-{}", t.name);
    let snapshot = Template::open(vm_root, &vm)
        .with_context(|| format!("the snapshot {} is unusable", t.name))?;
    let block = snapshot
        .meta
        .block_root
        .clone()
        .with_context(|| format!("the snapshot {} has no block root", t.name))?;
    let rootfs = t.rootfs.clone().unwrap_or_default();
    let users =
        parse_passwd(&std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap_or_default());
    Ok(TemplateSpec {
        name: t.name.clone(),
        rootfs,
        block,
        disk_mib: t.disk_mib,
        snapshot_of: Some(of.clone()),
        vcpus: t.vcpus,
        memory_mib: t.memory_mib,
        pool: 0,
        from_api: true,
        users,
    })
}

fn short_hash(s: &str) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(s.as_bytes());
    d[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// Every template of the config and of the database, ready: roots found
/// (or built), VM templates made where missing.
pub async fn prepare(
    config: &Config,
    stored: &[TemplateConfig],
    vm_root: &Path,
    images: &image::store::Store,
    assets: &GuestAssets,
    accel: Accel,
) -> anyhow::Result<HashMap<String, TemplateSpec>> {
    let mut out = HashMap::new();
    for t in &config.templates {
        let spec =
            prepare_one(t, false, &config.base_cache, vm_root, images, assets, accel).await?;
        out.insert(t.name.clone(), spec);
    }
    for t in stored {
        if out.contains_key(&t.name) {
            tracing::warn!(template = %t.name, "a stored template is shadowed by the config's");
            continue;
        }
        let spec = prepare_one(t, true, &config.base_cache, vm_root, images, assets, accel)
            .await
            .with_context(|| format!("the stored template {}", t.name));
        match spec {
            Ok(spec) => {
                out.insert(t.name.clone(), spec);
            }
            // A snapshot damaged or removed meanwhile is not served.
            Err(e) if t.snapshot_of.is_some() => tracing::warn!("{e:#}"),
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// One template ready: its root checked (the base one built when it has
/// none), its VM template made when missing or made with other assets.
pub async fn prepare_one(
    t: &TemplateConfig,
    from_api: bool,
    base_cache: &Path,
    vm_root: &Path,
    images: &image::store::Store,
    assets: &GuestAssets,
    accel: Accel,
) -> anyhow::Result<TemplateSpec> {
    if let Some(of) = &t.snapshot_of {
        return snapshot_spec(t, of, vm_root);
    }
    let rootfs = match &t.rootfs {
        Some(p) => p.clone(),
        None => {
            let cache = base_cache.to_path_buf();
            tokio::task::spawn_blocking(move || base_rootfs(&cache)).await??
        }
    };
    if !rootfs.join("bin").exists() {
        anyhow::bail!(
            "template {}: rootfs {} holds no /bin",
            t.name,
            rootfs.display()
        );
    }
    let users =
        parse_passwd(&std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap_or_default());
    let block = {
        let (images, name, tree, disk) =
            (images.clone(), t.name.clone(), rootfs.clone(), t.disk_mib);
        tokio::task::spawn_blocking(move || block_root(&images, &name, &tree, disk)).await??
    };
    let spec = TemplateSpec {
        name: t.name.clone(),
        rootfs,
        block: block.clone(),
        disk_mib: t.disk_mib,
        snapshot_of: None,
        vcpus: t.vcpus,
        memory_mib: t.memory_mib,
        pool: t.pool,
        from_api,
        users,
    };
    let name = spec.vm_template();
    // A template saved with other guest assets (a rebuilt agent) or
    // another shape is made again.
    let stamp_file = vm_root.join(format!("{name}.assets"));
    let stamp = assets_stamp(assets, t.memory_mib, t.vcpus, accel, &block);
    let usable = Template::open(vm_root, &name).is_ok()
        && std::fs::read_to_string(&stamp_file).ok().as_deref() == Some(stamp.as_str());
    if !usable {
        let _ = Template::remove(vm_root, &name);
        let t0 = std::time::Instant::now();
        let vm = SandboxConfig {
            cpu_millis: None,
            cgroup: None,
            id: format!("podvisord-template-{}", t.name),
            root: vm_root.to_path_buf(),
            memory_mib: t.memory_mib,
            vcpus: t.vcpus,
            assets: assets.clone(),
            accel,
            nics: Vec::new(),
            shares: Vec::new(),
            hostname: "sandbox".into(),
            boot_timeout: sandbox::default_boot_timeout(accel),
            template: None,
            block_root: Some(block),
        };
        Template::create(vm, &name)
            .await
            .with_context(|| format!("making the VM template of {}", t.name))?;
        std::fs::write(&stamp_file, &stamp)?;
        eprintln!(
            "podvisord: template {} made in {} ms ({accel})",
            t.name,
            t0.elapsed().as_millis()
        );
    }
    Ok(spec)
}
