//! The capped logs a guest (its console) and QEMU (its stderr) write:
//! `hypervisor::qemu::tail`, which error messages quote. The first byte is
//! how many lines are asked for, the second where the input splits between
//! the older half (`FILE.1`) and the newer (`FILE`).
#![no_main]

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

fn log() -> &'static PathBuf {
    static LOG: OnceLock<PathBuf> = OnceLock::new();
    LOG.get_or_init(|| common::scratch("console").join("console.log"))
}

fuzz_target!(|data: &[u8]| {
    let [lines, split, rest @ ..] = data else {
        return;
    };
    let at = rest.len() * usize::from(*split) / 255;
    let (older, newer) = rest.split_at(at);
    let path = log();
    let mut old = path.as_os_str().to_owned();
    old.push(".1");
    std::fs::write(&old, older).unwrap();
    std::fs::write(path, newer).unwrap();
    let lines = usize::from(*lines);
    let tail = hypervisor::qemu::tail(path, lines);
    assert!(
        tail.lines().count() <= lines,
        "{} lines, asked for {lines}",
        tail.lines().count()
    );
    assert!(tail.lines().all(|l| !l.trim().is_empty()));
});
