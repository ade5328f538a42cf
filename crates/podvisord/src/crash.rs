//! Crash points for the durability tests: with `PODVISORD_CRASH_AT=NAME`,
//! podvisord sends itself SIGKILL when it reaches the point NAME (a real
//! kill -9: no destructor, no handler runs). Unset, a point costs one
//! load of a cached value.

use std::sync::OnceLock;

/// Points, in `sandboxes.rs`: `create.admitted` (the row is in, no VM
/// yet), `create.booted` (a VM, no container), `create.started` (the
/// container runs, the row still says creating), `kill.begun` (out of the
/// registry, the VM still up), `kill.destroyed` (the VM gone, the row still
/// running), `pause.begun` (nothing saved yet), `pause.saved` (the snapshot
/// whole, the row still running), `resume.booted` (the VM restored, the row
/// still resuming).
pub fn point(name: &str) {
    static AT: OnceLock<Option<String>> = OnceLock::new();
    let at = AT.get_or_init(|| std::env::var("PODVISORD_CRASH_AT").ok());
    if at.as_deref() == Some(name) {
        eprintln!("podvisord: crash point {name}: SIGKILL");
        // SAFETY: kill(2) of ourselves.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}
