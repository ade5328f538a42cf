//! Fixtures for tests that boot real VMs: where the built assets are, a state
//! root per test that checks nothing was left behind, and initramfs images.

pub mod registry;

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// `target/release`, where `make build` puts the kernel, initramfs and rootfs.
pub fn build_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = manifest.join("../../target/release");
    for needed in ["vmlinux", "podvisor-initrd.cpio", "rootfs/bin/busybox"] {
        assert!(
            dir.join(needed).exists(),
            "{} is missing: run `make build` first (it builds the guest kernel, the agent's initramfs and a busybox rootfs)",
            dir.join(needed).display()
        );
    }
    dir
}

pub fn busybox_rootfs() -> PathBuf {
    build_dir().join("rootfs")
}

/// A private state root for one test; on drop it asserts that no sandbox
/// directory and no process mentioning it is left, then removes it.
pub struct StateRoot {
    pub path: PathBuf,
}

impl StateRoot {
    pub fn new(name: &str) -> StateRoot {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "podvisor-test-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        fs::create_dir_all(&path).unwrap();
        StateRoot { path }
    }

    /// Sandbox directories present under this root.
    pub fn sandboxes(&self) -> Vec<String> {
        names_in(&self.path.join("sandboxes"))
    }

    /// Pids of processes whose command line mentions this root.
    pub fn processes(&self) -> Vec<u32> {
        processes_mentioning(&self.path.to_string_lossy())
    }

    /// OCI container directories present under this root.
    pub fn containers(&self) -> Vec<String> {
        names_in(&self.path.join("containers"))
    }

    /// Asserts nothing of a sandbox is left under this root.
    pub fn assert_clean(&self) {
        assert_eq!(
            self.containers(),
            Vec::<String>::new(),
            "container state left under {}",
            self.path.display()
        );
        assert_eq!(
            self.sandboxes(),
            Vec::<String>::new(),
            "sandbox state left under {}",
            self.path.display()
        );
        assert_eq!(
            self.processes(),
            Vec::<u32>::new(),
            "processes left for {}",
            self.path.display()
        );
    }
}

impl Drop for StateRoot {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.assert_clean();
        }
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// The names of the entries of directory `dir` (none if it is missing).
pub fn names_in(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Cgroup file `v2` of `leaf` on a unified host, else file `v1` of `leaf`
/// in controller `ctl`'s hierarchy (v1 or hybrid hosts).
pub fn cgroup_file(leaf: &str, v2: &str, ctl: &str, v1: &str) -> PathBuf {
    let base = Path::new("/sys/fs/cgroup");
    let unified = base.join(leaf).join(v2);
    if unified.exists() {
        unified
    } else {
        base.join(ctl).join(leaf).join(v1)
    }
}

/// Whether process `pid` is in cgroup `/leaf`: in the memory and pids
/// hierarchies on v1, in the unified one on v2.
pub fn in_cgroup(pid: u32, leaf: &str) -> Result<(), String> {
    let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let v1 = cgroups.lines().any(|l| l.contains(":memory:"));
    let inside = cgroups
        .lines()
        .filter(|l| match v1 {
            true => l.contains(":memory:") || l.contains(":pids:"),
            false => l.starts_with("0::"),
        })
        .all(|l| l.ends_with(&format!(":/{leaf}")));
    match inside && !cgroups.is_empty() {
        true => Ok(()),
        false => Err(format!("process {pid} is not in /{leaf}: {cgroups}")),
    }
}

/// The CFS quota of cgroup `leaf` (µs per 100 ms period).
pub fn cpu_quota(leaf: &str) -> Option<u64> {
    let text = fs::read_to_string(cgroup_file(leaf, "cpu.max", "cpu", "cpu.cfs_quota_us")).ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// The first QEMU whose command line mentions `needle`.
pub fn qemu_mentioning(needle: &str) -> Option<u32> {
    processes_mentioning(needle).into_iter().find(|p| {
        fs::read_link(format!("/proc/{p}/exe"))
            .map(|e| e.to_string_lossy().contains("qemu"))
            .unwrap_or(false)
    })
}

pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter(|pid| *pid != me)
                .filter(|pid| {
                    fs::read(format!("/proc/{pid}/cmdline"))
                        .map(|c| String::from_utf8_lossy(&c).contains(needle))
                        .unwrap_or(false)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Spawns `cmd` (stdout and stderr piped) and waits for the first line it
/// prints to be "ready"; returns the child and the rest of its stdout.
pub fn spawn_until_ready(
    cmd: &mut Command,
) -> (std::process::Child, BufReader<std::process::ChildStdout>) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n", "{cmd:?} did not say ready");
    (child, out)
}

/// Runs a command and returns its output, with stdin closed.
pub fn output(cmd: &mut Command) -> Output {
    cmd.stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

/// One file of an initramfs.
pub struct Entry<'a> {
    pub path: &'a str,
    pub mode: u32,
    pub data: &'a [u8],
}

/// Writes an uncompressed newc cpio archive (what the kernel unpacks as initramfs).
pub fn cpio(entries: &[Entry]) -> Vec<u8> {
    fn header(out: &mut Vec<u8>, ino: u32, mode: u32, size: usize, name: &str) {
        let fields = [
            ino,
            mode,
            0,
            0,
            1,
            0,
            size as u32,
            0,
            0,
            0,
            0,
            name.len() as u32 + 1,
            0,
        ];
        out.extend_from_slice(b"070701");
        for f in fields {
            out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
    }
    let mut out = Vec::new();
    let mut dirs: Vec<String> = Vec::new();
    let mut ino = 1;
    for e in entries {
        let mut prefix = String::new();
        for part in Path::new(e.path)
            .parent()
            .into_iter()
            .flat_map(|p| p.iter())
        {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(&part.to_string_lossy());
            if !dirs.contains(&prefix) {
                header(&mut out, ino, 0o040755, 0, &prefix);
                ino += 1;
                dirs.push(prefix.clone());
            }
        }
        header(&mut out, ino, 0o100000 | e.mode, e.data.len(), e.path);
        ino += 1;
        out.extend_from_slice(e.data);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
    }
    header(&mut out, 0, 0, 0, "TRAILER!!!");
    out
}

/// An initramfs whose /init is a busybox shell script instead of the agent:
/// for the faults "the guest never answers" and "init dies".
pub fn script_initrd(dir: &Path, script: &str) -> PathBuf {
    let busybox = fs::read(busybox_rootfs().join("bin/busybox")).unwrap();
    let init = format!("#!/bin/busybox sh\n{script}\n");
    let image = cpio(&[
        Entry {
            path: "bin/busybox",
            mode: 0o755,
            data: &busybox,
        },
        Entry {
            path: "init",
            mode: 0o755,
            data: init.as_bytes(),
        },
    ]);
    let path = dir.join("script-initrd.cpio");
    fs::write(&path, image).unwrap();
    path
}

/// An OCI bundle for one test: a copy of the busybox rootfs and the
/// config.json `podvisor spec` writes, with `edit` applied to it.
pub struct Bundle {
    pub path: PathBuf,
}

impl Bundle {
    pub fn new(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> Bundle {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "podvisor-bundle-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        let cp = Command::new("cp")
            .arg("-a")
            .arg(busybox_rootfs())
            .arg(path.join("rootfs"))
            .status()
            .unwrap();
        assert!(cp.success(), "copying the busybox rootfs");
        let spec = output(
            Command::new(build_dir().join("podvisor"))
                .args(["spec", "--bundle"])
                .arg(&path),
        );
        assert!(spec.status.success(), "podvisor spec: {spec:?}");
        let text = fs::read_to_string(path.join("config.json")).unwrap();
        let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
        config["process"]["terminal"] = false.into();
        config["root"]["readonly"] = false.into();
        // No network namespace: the VM gets no NIC (tests of networking add one).
        if let Some(ns) = config["linux"]["namespaces"].as_array_mut() {
            ns.retain(|n| n["type"] != "network");
        }
        edit(&mut config);
        fs::write(path.join("config.json"), config.to_string()).unwrap();
        Bundle { path }
    }
}

impl Drop for Bundle {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_layout() {
        let img = cpio(&[Entry {
            path: "a/b",
            mode: 0o644,
            data: b"xyz",
        }]);
        assert!(img.starts_with(b"070701"));
        assert_eq!(img.len() % 4, 0);
        let text = String::from_utf8_lossy(&img);
        assert!(text.contains("a\0") && text.contains("a/b\0") && text.contains("TRAILER!!!"));
    }
}
