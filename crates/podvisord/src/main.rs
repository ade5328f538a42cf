//! podvisord: a self-hosted, multi-tenant sandbox service. Each sandbox is
//! a podvisor micro-VM made from a template; tenants drive them with E2B's
//! REST API and E2B's in-sandbox protocol (envd, Connect RPC), so E2B's own
//! SDKs work unchanged. One binary, one port, one SQLite database.

mod admin;
mod api;
mod auth;
mod base;
mod config;
mod crash;
mod db;
mod envd;
mod error;
mod metrics;
mod pools;
mod ports;
mod sandboxes;
mod tls;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use hypervisor::Accel;
use sandbox::assets::GuestAssets;

use crate::sandboxes::{Registry, TemplateSpec};

/// podvisord: sandboxes as a service, speaking E2B's API.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// Address to listen on (HTTP/1.1 and HTTP/2; cleartext unless
    /// --tls-cert and --tls-key are given).
    #[arg(long, default_value = "127.0.0.1:3000")]
    listen: std::net::SocketAddr,
    /// Where the database and the sandboxes' VM state are kept.
    #[arg(long, default_value = "/var/lib/podvisord")]
    state_dir: PathBuf,
    /// File holding the admin token (`X-Admin-Token`); a random one is
    /// written to it (mode 0600) when it does not exist.
    #[arg(long)]
    admin_token_file: PathBuf,
    /// TOML config: domain, templates, default quotas (see docs/podvisord.md).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Serve TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

pub struct AppState {
    pub db: db::Db,
    pub admin_token_hash: Vec<u8>,
    pub registry: Registry,
    /// Pauses, resumes and kills, one at a time per sandbox.
    pub transitions: sandboxes::Transitions,
    /// Snapshots being made or started from (a pause's before its row says
    /// paused, a fork's before its forks run): kept by `collect_snapshots`.
    pub in_use: std::sync::Mutex<std::collections::HashSet<String>>,
    /// The config's templates and those made through the admin API.
    pub templates: std::sync::RwLock<HashMap<String, TemplateSpec>>,
    /// The pool daemon, restarted when the templates' pools change.
    pub pools: std::sync::Mutex<Option<pools::Pools>>,
    pub config: config::Config,
    /// podvisor's root for the VMs: templates, pools, sandbox state.
    pub vm_root: PathBuf,
    /// Where templates' block roots are kept (an image store of its own,
    /// in the config's `base_cache`).
    pub images: image::store::Store,
    pub assets: GuestAssets,
    pub accel: Accel,
    pub metrics: metrics::Metrics,
}

impl AppState {
    pub fn template(&self, name: &str) -> Option<TemplateSpec> {
        let t = self.templates.read().unwrap_or_else(|e| e.into_inner());
        t.get(name).cloned()
    }

    /// Marks snapshot `name` in use by a pause or a fork under way, or not.
    pub fn snapshot_in_use(&self, name: &str, on: bool) {
        let mut f = self.in_use.lock().unwrap_or_else(|e| e.into_inner());
        match on {
            true => f.insert(name.to_string()),
            false => f.remove(name),
        };
    }

    pub fn snapshots_in_use(&self) -> Vec<String> {
        let f = self.in_use.lock().unwrap_or_else(|e| e.into_inner());
        f.iter().cloned().collect()
    }

    /// Every template, by name.
    pub fn template_list(&self) -> Vec<TemplateSpec> {
        let t = self.templates.read().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = t.values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}

fn admin_token(path: &std::path::Path) -> anyhow::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_string()),
        Ok(_) => anyhow::bail!("admin token file {} is empty", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).context(format!("reading {}", path.display())),
    }
    let token = auth::random_hex(32);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing a new admin token to {}", path.display()))?;
    writeln!(f, "{token}")?;
    eprintln!("podvisord: wrote a new admin token to {}", path.display());
    Ok(token)
}

fn main() -> std::process::ExitCode {
    // A supervisor of one of our VMs is this binary run again.
    sandbox::supervisor::serve_if_asked();
    let args = Args::parse();
    tracing_subscriber::fmt()
        .json()
        .with_current_span(true)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PODVISORD_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("podvisord: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(serve(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("podvisord: {e:#}");
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let config = match &args.config {
        Some(p) => config::Config::load(p)?,
        None => config::Config::default(),
    };
    // A bad certificate is found before anything is built.
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => Some(tls::config(c, k)?),
        _ => None,
    };
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating {}", args.state_dir.display()))?;
    let token = admin_token(&args.admin_token_file)?;
    let db = db::Db::open(&args.state_dir.join("podvisord.db"))?;
    let vm_root = args.state_dir.join("vm");
    std::fs::create_dir_all(&vm_root)?;
    let assets = GuestAssets::resolve(None, None)?;
    let accel = sandbox::checked_accel(None)?;
    eprintln!("podvisord: accelerator {accel}");
    // Beside the base root, outside the state directory: a fresh state
    // directory reuses the block roots made before.
    let images = image::store::Store::open(&config.base_cache.join("images"))?;
    let stored = db.templates()?;
    let templates = base::prepare(&config, &stored, &vm_root, &images, &assets, accel).await?;
    let state = Arc::new(AppState {
        db,
        admin_token_hash: auth::hash(&token),
        registry: Registry::default(),
        transitions: Default::default(),
        in_use: Default::default(),
        templates: std::sync::RwLock::new(templates),
        pools: std::sync::Mutex::new(None),
        config,
        vm_root,
        images,
        assets,
        accel,
        metrics: metrics::Metrics::default(),
    });
    // What a podvisord killed before this one left on the host: its VMs'
    // directories (their VMMs died with it), then its rows.
    let gone = sandbox::state::collect_garbage(&state.vm_root);
    if !gone.is_empty() {
        tracing::warn!(
            count = gone.len(),
            "removed the VM state a killed podvisord left"
        );
    }
    let ended = sandboxes::recover(&state)?;
    if ended > 0 {
        tracing::warn!(
            count = ended,
            "sandboxes of the podvisord before this one marked ended"
        );
    }
    tokio::spawn(sandboxes::reap(Arc::clone(&state)));
    pools::restart(&state)?;
    let app = api::router(Arc::clone(&state));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    eprintln!("podvisord: listening on {scheme}://{addr}");
    tracing::info!(%addr, scheme, "listening");
    let shutdown = {
        let state = Arc::clone(&state);
        async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("shutting down: ending every sandbox");
            for live in state.registry.all() {
                sandboxes::kill(&state, &live.id, "podvisord stopped").await;
            }
            pools::stop(&state);
            // Streams still open end with the process.
            std::process::exit(0);
        }
    };
    match tls {
        Some(tls) => {
            axum::serve(tls::Listener::new(listener, tls)?, app)
                .with_graceful_shutdown(shutdown)
                .await?
        }
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await?
        }
    }
    Ok(())
}
