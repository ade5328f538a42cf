//! Reaping: as PID 1 the agent waits for every process in the guest; the ones
//! it started have their exit published to whoever waits on them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::sync::watch;

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl Exit {
    /// The shell's convention: the code, or 128 + the signal.
    pub fn status(self) -> i32 {
        match self {
            Exit::Code(c) => c,
            Exit::Signal(s) => 128 + s,
        }
    }
}

pub type ExitWatch = watch::Receiver<Option<Exit>>;

#[derive(Default)]
pub struct Tracked {
    waiting: HashMap<Pid, watch::Sender<Option<Exit>>>,
}

/// Shared between the forking code and the SIGCHLD loop. A pid is registered
/// under the same lock `reap` takes, so no exit can be reaped before its pid
/// is known.
#[derive(Clone, Default)]
pub struct Reaper {
    inner: Arc<Mutex<Tracked>>,
}

impl Reaper {
    pub fn lock(&self) -> MutexGuard<'_, Tracked> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers `pid` and returns a receiver that sees its exit.
    pub fn watch(guard: &mut MutexGuard<'_, Tracked>, pid: Pid) -> ExitWatch {
        let (tx, rx) = watch::channel(None);
        guard.waiting.insert(pid, tx);
        rx
    }

    /// Reaps every child that has exited. Called on SIGCHLD.
    pub fn reap(&self) {
        let mut guard = self.lock();
        loop {
            let (pid, exit) = match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, Exit::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, Exit::Signal(sig as i32)),
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(_) => continue,
            };
            if let Some(tx) = guard.waiting.remove(&pid) {
                let _ = tx.send(Some(exit));
            }
        }
    }
}

/// Runs `reap` on every SIGCHLD, forever.
pub async fn run(reaper: Reaper) {
    let mut sigchld = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()) {
        Ok(s) => s,
        Err(_) => return,
    };
    loop {
        reaper.reap();
        if sigchld.recv().await.is_none() {
            return;
        }
    }
}
