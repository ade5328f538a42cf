//! An image layer from a registry, hostile like everything pulled:
//! `image::unpack::apply_layer` on the bytes as a layer blob (tar, gzip or
//! zstd, as its magic bytes say), into a fresh root each run. Besides not
//! panicking: nothing lands outside the root (a sentinel beside it stays as
//! it was) and the counts stay within the limits. Run it as root, as
//! podvisor unpacks: it makes device nodes and sets owners in its scratch
//! directory.
#![no_main]

mod common;

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use image::unpack::{apply_layer, Limits, Unpacked};
use libfuzzer_sys::fuzz_target;

fn base() -> &'static PathBuf {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        let base = common::scratch("layer");
        std::fs::create_dir(base.join("outside")).unwrap();
        std::fs::write(base.join("outside/secret"), b"s").unwrap();
        base
    })
}

fn check_outside(base: &std::path::Path) {
    let names: Vec<_> = std::fs::read_dir(base.join("outside"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["secret"], "an entry landed outside the root");
    let secret = base.join("outside/secret");
    assert_eq!(std::fs::read(&secret).unwrap(), b"s");
    assert_eq!(std::fs::metadata(&secret).unwrap().nlink(), 1);
    for e in std::fs::read_dir(base).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        assert!(
            name == "outside" || name.starts_with("root-"),
            "{name} appeared beside the root"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    static RUN: AtomicU64 = AtomicU64::new(0);
    let base = base();
    let root = base.join(format!("root-{}", RUN.fetch_add(1, Ordering::Relaxed)));
    std::fs::create_dir(&root).unwrap();
    let fd = File::open(&root).unwrap();
    // Small enough that a run stays fast, and trees shallow enough to remove.
    let limits = Limits {
        max_bytes: 64 << 20,
        max_entries: 10_000,
        max_path: 1024,
    };
    let mut seen = Unpacked::default();
    let _ = apply_layer(fd.as_fd(), data, 0, &limits, &mut seen);
    assert!(seen.files <= limits.max_entries, "{seen:?}");
    assert!(seen.bytes <= limits.max_bytes, "{seen:?}");
    drop(fd);
    check_outside(base);
    // A tree too deep for remove_dir_all stays, under another name.
    let _ = std::fs::remove_dir_all(&root);
});
