//! The templates' pools of ready clones (`pool = N` in the config or the
//! admin API's template), kept
//! by podvisor's own pool daemon (`podvisor pool serve`), run as a child
//! that dies with podvisord. (Served in this process, the clones it handed
//! out did not see the root attached to them; a daemon of its own, as the
//! CLI runs it, does.)

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use anyhow::Context;

use crate::AppState;

pub struct Pools {
    daemon: Option<Child>,
}

/// The `podvisor` binary beside ours.
fn podvisor() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("podvisor")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| "podvisor".into())
}

/// (Re)starts the pool daemon with every template's pool: the one running
/// (if any) retires its clones first. No daemon when no template has one.
pub fn restart(state: &AppState) -> anyhow::Result<()> {
    let mut slot = state.pools.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(old) = slot.take() {
        old.stop();
    }
    *slot = Some(start(state)?);
    Ok(())
}

pub fn stop(state: &AppState) {
    let old = state.pools.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(old) = old {
        old.stop();
    }
}

fn start(state: &AppState) -> anyhow::Result<Pools> {
    let mut policy = String::new();
    for t in state.template_list() {
        if t.pool > 0 {
            let name = t.vm_template();
            policy.push_str(&format!(
                "[[pool]]\ntemplate = \"{name}\"\nsize = {}\n",
                t.pool
            ));
            eprintln!("podvisord: pool of {} ready clones for {}", t.pool, t.name);
        }
    }
    if policy.is_empty() {
        return Ok(Pools { daemon: None });
    }
    let path = state.vm_root.join("podvisord-pools.toml");
    std::fs::write(&path, policy)?;
    let mut cmd = Command::new(podvisor());
    cmd.arg("--root")
        .arg(&state.vm_root)
        .args(["pool", "serve"])
        .env("PODVISOR_CONFIG", &path)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    // SAFETY: prctl in the child before exec: it gets SIGTERM when we die.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let daemon = cmd
        .spawn()
        .with_context(|| format!("running {} pool serve", podvisor().display()))?;
    Ok(Pools {
        daemon: Some(daemon),
    })
}

impl Pools {
    /// Stops the daemon; it retires its ready clones first.
    pub fn stop(mut self) {
        if let Some(mut d) = self.daemon.take() {
            // SAFETY: kill(2) of our own child.
            unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
            let _ = d.wait();
        }
    }
}
