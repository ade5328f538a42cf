//! `create` and `run`: claim the id, start the holder (which boots the VM and
//! creates the container in it), and return once it says the container exists.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use sandbox::container::ContainerDir;
use sandbox::oci::Spec;

use super::oci;
use crate::Globals;

#[derive(Args, Clone)]
pub struct CreateArgs {
    /// Path to the bundle (the directory holding config.json).
    #[arg(short, long, default_value = ".")]
    pub bundle: PathBuf,
    /// Write the container process's host pid here.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Unix socket to send the pty's main side to (process.terminal).
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Accepted for runc compatibility (the guest always pivots).
    #[arg(long)]
    pub no_pivot: bool,
    /// Accepted for runc compatibility (keyrings are the guest kernel's).
    #[arg(long)]
    pub no_new_keyring: bool,
    /// Refused when above 0: host fds cannot reach a process in a VM.
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: u32,
    pub id: String,
}

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub create: CreateArgs,
    /// Return once started instead of waiting for the container to exit.
    #[arg(short, long)]
    pub detach: bool,
    /// Keep the stopped container's state after it exits (`delete` removes it).
    #[arg(long)]
    pub keep: bool,
    /// Accepted for runc compatibility: the holder reaps in its own way.
    #[arg(long)]
    pub no_subreaper: bool,
}

/// A started holder, as `create` leaves it.
pub struct Holder {
    pub pid: u32,
    pub child: std::process::Child,
}

/// Starts the holder and waits for its word. On failure nothing is left.
pub fn spawn_holder(args: &CreateArgs, g: &Globals) -> anyhow::Result<Holder> {
    let dir = ContainerDir::create(&g.root, &args.id)?;
    let result = spawn_in(args, g);
    if result.is_err() {
        let _ = dir.remove();
    }
    result
}

fn spawn_in(args: &CreateArgs, g: &Globals) -> anyhow::Result<Holder> {
    let bundle = std::fs::canonicalize(&args.bundle)
        .with_context(|| format!("bundle {}", args.bundle.display()))?;
    if args.preserve_fds > 0 {
        bail!("--preserve-fds is not supported: host file descriptors cannot reach a process inside a VM");
    }
    // Fail fast on a broken config.json, before any process starts.
    let spec = Spec::load(&bundle)?;
    if spec.process().terminal && args.console_socket.is_none() {
        bail!("cannot allocate tty if runc will detach without setting console socket");
    }
    let (mut child, outcome) = oci::spawn_helper(g, "the container's holder", |cmd, sync| {
        cmd.arg("holder")
            .arg("--bundle")
            .arg(&bundle)
            .arg("--sync-fd")
            .arg(sync.to_string());
        if let Some(s) = &args.console_socket {
            cmd.arg("--console-socket").arg(s);
        }
        cmd.arg(&args.id);
    })?;
    if outcome.is_ok() {
        let pid = child.id();
        if let Some(p) = &args.pid_file {
            if let Err(e) = oci::write_pid_file(p, pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                let _ = child.wait();
                return Err(e);
            }
        }
        return Ok(Holder { pid, child });
    }
    let _ = child.wait();
    sandbox::state::collect_garbage(&g.root);
    match outcome {
        Err(msg) => bail!("{msg}"),
        Ok(()) => unreachable!("handled above"),
    }
}

pub async fn create(args: CreateArgs, g: &Globals) -> anyhow::Result<u8> {
    let _holder = spawn_holder(&args, g)?;
    // The holder outlives us: our caller (conmon, containerd-shim) reaps it.
    Ok(0)
}

pub async fn run(mut args: RunArgs, g: &Globals) -> anyhow::Result<u8> {
    // In the foreground from a terminal, as runc does: the container's pty
    // comes to us and is joined to our terminal.
    let mut console = None;
    if !args.detach && args.create.console_socket.is_none() {
        let bundle = std::fs::canonicalize(&args.create.bundle)
            .with_context(|| format!("bundle {}", args.create.bundle.display()))?;
        if Spec::load(&bundle)?.process().terminal {
            std::fs::create_dir_all(&g.root).context("creating the state root")?;
            let path = g.root.join(format!(".console-{}.sock", std::process::id()));
            let receiver = crate::console::ConsoleReceiver::listen(path.clone())?;
            args.create.console_socket = Some(path);
            console = Some(receiver);
        }
    }
    let holder = spawn_holder(&args.create, g);
    if let (Err(_), Some(c)) = (&holder, &console) {
        let _ = std::fs::remove_file(&c.path);
    }
    let mut holder = holder?;
    if let Err(e) = super::start::start_id(&g.root, &args.create.id).await {
        let _ = holder.child.kill();
        let _ = holder.child.wait();
        if let Ok(dir) = ContainerDir::open(&g.root, &args.create.id) {
            let _ = dir.remove();
        }
        return Err(e);
    }
    if args.detach {
        return Ok(0);
    }
    let output = console.map(|c| c.relay()).transpose()?;
    let forward = forward_to(holder.pid);
    let status = tokio::task::spawn_blocking(move || holder.child.wait())
        .await
        .context("waiting for the container")??;
    forward.iter().for_each(|t| t.abort());
    if let Some(t) = output {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    let code = status.code().unwrap_or(137).clamp(0, 255) as u8;
    if !args.keep {
        super::delete::remove_stopped(&g.root, &args.create.id).await;
    }
    Ok(code)
}

/// Signals `run` gets go to the holder, which relays them into the VM.
fn forward_to(pid: u32) -> Vec<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::signal;
    crate::console::forwarded_signals()
        .into_iter()
        .filter_map(|k| signal(k).ok().map(|s| (k, s)))
        .map(|(kind, mut stream)| {
            tokio::spawn(async move {
                while stream.recv().await.is_some() {
                    if let Ok(sig) = nix::sys::signal::Signal::try_from(kind.as_raw_value()) {
                        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
                    }
                }
            })
        })
        .collect()
}
