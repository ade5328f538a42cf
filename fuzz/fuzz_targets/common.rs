//! Helpers the targets share.
#![allow(dead_code)]

use std::future::Future;
use std::path::PathBuf;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

/// A fresh directory for this process under `$TMPDIR` (scripts/fuzz.sh
/// points it at a scratch directory it removes afterwards).
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("podvisor-fuzz-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating the fuzz scratch directory");
    dir
}

/// Runs a future that never waits (it reads a byte slice) to its end.
pub fn now<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("a read from a byte slice waited"),
    }
}
