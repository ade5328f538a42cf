//! `podvisor pool serve`: the factory. Keeps the pools of the policy in
//! config.toml filled with paused clones until SIGTERM or SIGINT.

use std::path::{Path, PathBuf};

use anyhow::bail;
use clap::{Args, Subcommand};
use sandbox::pool::{self, PoolConfig};
use tokio::signal::unix::{signal, SignalKind};

#[derive(Subcommand)]
pub enum PoolCommand {
    /// Keep the pools of the factory policy filled (runs until SIGTERM/SIGINT).
    ///
    /// `sandbox run --template T`, and `create`/`run` and the containerd shim
    /// when the policy's `template = "T"` fits, take ready clones of T from it.
    Serve(ServeArgs),
    /// Show each pool's ready clones.
    Status(ServeArgs),
}

#[derive(Args)]
pub struct ServeArgs {
    /// The factory policy: `[[pool]] template = "NAME" size = N` entries (and
    /// `template = "NAME"` for the OCI runtime and the shim).
    #[arg(long, env = "PODVISOR_CONFIG", default_value = pool::DEFAULT_CONFIG)]
    pub config: PathBuf,
}

fn policy(path: &Path) -> anyhow::Result<Vec<PoolConfig>> {
    let pools = pool::load_config(path)?;
    if pools.is_empty() {
        bail!("{}: no [[pool]] in the factory policy", path.display());
    }
    Ok(pools)
}

/// Checked before the daemon gives itself a mount namespace and a runtime.
pub fn check(cmd: &PoolCommand) -> anyhow::Result<()> {
    if let PoolCommand::Serve(args) = cmd {
        policy(&args.config)?;
    }
    Ok(())
}

pub async fn run(cmd: PoolCommand, root: &Path) -> anyhow::Result<u8> {
    match cmd {
        PoolCommand::Status(args) => {
            for p in policy(&args.config)? {
                match pool::status(root, &p.template) {
                    Some(s) => println!(
                        "{}: {} of {} ready, {} handed out",
                        p.template, s.ready, s.size, s.handed_out
                    ),
                    None => println!("{}: not served", p.template),
                }
            }
            Ok(0)
        }
        PoolCommand::Serve(args) => {
            let pools = policy(&args.config)?;
            let mut claims = Vec::new();
            for p in &pools {
                sandbox::template::Template::open(root, &p.template)?;
                claims.push(pool::claim(root, &p.template)?);
            }
            let (tx, rx) = tokio::sync::watch::channel(false);
            let mut tasks = Vec::new();
            for p in pools {
                tasks.push(tokio::spawn(pool::serve(root.to_path_buf(), p, rx.clone())));
            }
            let mut term = signal(SignalKind::terminate())?;
            let mut int = signal(SignalKind::interrupt())?;
            println!("ready");
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            let _ = tx.send(true);
            for t in tasks {
                if let Ok(Err(e)) = t.await {
                    eprintln!("podvisor: {e}");
                }
            }
            drop(claims);
            Ok(0)
        }
    }
}
