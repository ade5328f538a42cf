//! `podvisor sandbox run`: boot a VM, run one command from a root filesystem
//! in it with stdio attached, tear everything down, exit with its status.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agent_proto::{
    ConsoleSize, ContainerRequest, CreateContainerRequest, OutputStream, ProcessRequest,
    ResizeTtyRequest, SignalProcessRequest, User,
};
use anyhow::Context;
use clap::Args;
use hypervisor::Share;
use sandbox::agent::AgentClient;
use sandbox::template::Template;
use sandbox::{Sandbox, SandboxConfig};
use tokio::signal::unix::{signal, SignalKind};

use super::vm_args::{default_boot_timeout, VmArgs};
use super::CodedError;
use crate::tty;

const CONTAINER_ID: &str = "main";
const ROOTFS_TAG: &str = "rootfs";

#[derive(Args)]
pub struct RunArgs {
    /// Root filesystem of the command (default: the busybox rootfs installed beside podvisor).
    #[arg(long, conflicts_with = "image")]
    rootfs: Option<PathBuf>,
    /// Run from this image (pulled first if it is not stored): its
    /// filesystem on a read-only disk, under a writable disk of the
    /// sandbox's own. Its Env, WorkingDir, User, Entrypoint and Cmd apply.
    #[arg(long, conflicts_with = "template")]
    image: Option<String>,
    /// Size of the sandbox's writable disk, in MiB (with --image).
    #[arg(long, default_value_t = 2048, value_name = "MIB", requires = "image")]
    disk_size: u64,
    /// The image store's directory (see `podvisor image --help`).
    #[arg(long)]
    image_root: Option<PathBuf>,
    /// podvisor's config file (its [images] table).
    #[arg(long, env = "PODVISOR_CONFIG", default_value = sandbox::pool::DEFAULT_CONFIG)]
    config: PathBuf,
    /// Verify the registry's TLS certificate when --image is pulled.
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true",
          action = clap::ArgAction::Set)]
    tls_verify: bool,
    #[command(flatten)]
    vm: VmArgs,
    /// Environment variable KEY=VALUE for the command (repeatable).
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Working directory of the command (default: the image's, else /).
    #[arg(short = 'w', long)]
    cwd: Option<String>,
    /// UID[:GID] to run the command as (default: the image's, else 0:0).
    #[arg(short, long)]
    user: Option<String>,
    /// Give the command a terminal.
    #[arg(short, long)]
    tty: bool,
    /// Guest hostname.
    #[arg(long, default_value = "podvisor")]
    hostname: String,
    /// Seconds the guest may take to boot to a ready agent.
    #[arg(long)]
    boot_timeout: Option<u64>,
    /// Clone this template instead of booting (its memory, vcpus, kernel and
    /// accelerator apply); a template that cannot be used gives a warning and a cold boot.
    #[arg(long)]
    template: Option<String>,
    /// Print where the time went (JSON, on stderr) when done.
    #[arg(long)]
    timings: bool,
    /// The command and its arguments (default with --image: its Entrypoint
    /// and Cmd).
    #[arg(
        trailing_var_arg = true,
        required_unless_present = "image",
        value_name = "CMD"
    )]
    command: Vec<String>,
}

/// What an image's config says about how to run it.
#[derive(Default)]
struct ImageProcess {
    env: Vec<String>,
    cwd: Option<String>,
    user: Option<String>,
    command: Vec<String>,
}

impl ImageProcess {
    /// From an OCI image config blob (`config` of it); a field that is not
    /// there or not of its type is left out.
    fn parse(blob: &[u8]) -> ImageProcess {
        let v: serde_json::Value = serde_json::from_slice(blob).unwrap_or_default();
        let c = &v["config"];
        let strings = |k: &str| -> Vec<String> {
            c[k].as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        };
        let text = |k: &str| c[k].as_str().filter(|s| !s.is_empty()).map(String::from);
        let mut command = strings("Entrypoint");
        command.extend(strings("Cmd"));
        ImageProcess {
            env: strings("Env"),
            cwd: text("WorkingDir"),
            user: text("User"),
            command,
        }
    }
}

fn parse_user(s: &str) -> anyhow::Result<User> {
    let (uid, gid) = match s.split_once(':') {
        Some((u, g)) => (u, g),
        None => (s, s),
    };
    let parse = |v: &str| {
        v.parse::<u32>()
            .with_context(|| format!("--user {s:?}: expected UID[:GID] as numbers"))
    };
    Ok(User {
        uid: parse(uid)?,
        gid: parse(gid)?,
        additional_gids: Vec::new(),
    })
}

fn random_id() -> String {
    let mut b = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn default_rootfs() -> Option<PathBuf> {
    sandbox::assets::search_dirs()
        .into_iter()
        .map(|d| d.join("rootfs"))
        .find(|p| p.join("bin").is_dir())
}

fn environment(args: &RunArgs, user: &User, image: &[String]) -> anyhow::Result<Vec<String>> {
    let home = if user.uid == 0 { "/root" } else { "/" };
    let mut env = vec![
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        format!("HOME={home}"),
        format!("HOSTNAME={}", args.hostname),
    ];
    for kv in image {
        if let Some((key, _)) = kv.split_once('=') {
            env.retain(|e| !e.starts_with(&format!("{key}=")));
            env.push(kv.clone());
        }
    }
    if args.tty {
        env.push("TERM=xterm".into());
    }
    for kv in &args.env {
        let key = kv.split_once('=').map(|(k, _)| k).filter(|k| !k.is_empty());
        let key = key.with_context(|| format!("--env {kv:?}: expected KEY=VALUE"))?;
        env.retain(|e| !e.starts_with(&format!("{key}=")));
        env.push(kv.clone());
    }
    Ok(env)
}

pub async fn run(mut args: RunArgs, root: &Path) -> anyhow::Result<u8> {
    let t0 = Instant::now();
    let (block_root, image, _image_lock) = match args.image.clone() {
        Some(reference) => {
            let source = super::image::ImageSource {
                image_root: args.image_root.as_deref(),
                config: &args.config,
                tls_verify: args.tls_verify,
            };
            let (b, config, lock) = source.block_root(&reference, args.disk_size).await?;
            (Some(b), ImageProcess::parse(&config), Some(lock))
        }
        None => (None, ImageProcess::default(), None),
    };
    if args.command.is_empty() {
        if image.command.is_empty() {
            anyhow::bail!("no command given and the image names none (Entrypoint, Cmd)");
        }
        args.command = image.command.clone();
    }
    let user_spec = args.user.clone().or(image.user.clone());
    let user = parse_user(user_spec.as_deref().unwrap_or("0:0"))?;
    args.cwd = args.cwd.take().or(image.cwd.clone());
    let env = environment(&args, &user, &image.env)?;
    let rootfs = match (&args.rootfs, &block_root) {
        (_, Some(_)) => None,
        (Some(p), None) => Some(p.clone()),
        (None, None) => Some(default_rootfs().context(
            "no --rootfs given and no default rootfs installed beside podvisor (run `make build`)",
        )?),
    };
    if let Some(rootfs) = rootfs.as_ref().filter(|r| !r.is_dir()) {
        anyhow::bail!(
            "rootfs {} does not exist or is not a directory",
            rootfs.display()
        );
    }
    // A ready clone from the template's pool, when a pool serves it; else a
    // clone of the template, else a cold boot.
    let pooled = match (&args.template, &rootfs) {
        (Some(name), Some(rootfs)) => take_pooled(root, name, rootfs, &args.hostname)
            .await
            .unwrap_or_else(|e| {
                eprintln!("podvisor: warning: pool of {name}: {e}; cloning instead");
                None
            }),
        _ => None,
    };
    let mut sb = match pooled {
        Some(sb) => sb,
        None => start(&args, root, rootfs, block_root).await?,
    };
    let accel = sb.accel;
    let id = sb.id.clone();
    let result = run_in(&mut sb, &args, user, env).await;
    let ran = t0.elapsed();
    if let Some(why) = sb.vm_exit() {
        tracing::warn!(sandbox = %id, "{why}");
    }
    let timings = sb.timings;
    let sb_cloned = sb.cloned_from.clone();
    let pooled = sb.is_pooled();
    sb.destroy().await;
    if args.timings {
        let t = serde_json::json!({
            "accel": accel.to_string(),
            "cloned_from": sb_cloned,
            "pooled": pooled,
            "vmm_ready_ms": timings.vmm_ready.as_secs_f64() * 1e3,
            "agent_ready_ms": timings.agent_ready.as_secs_f64() * 1e3,
            "guest_agent_ready_ms": timings.guest_ready_ms,
            "process_exit_ms": ran.as_secs_f64() * 1e3,
            "total_ms": t0.elapsed().as_secs_f64() * 1e3,
        });
        eprintln!("{t}");
    }
    result
}

/// A ready clone from template `name`'s pool, with `rootfs` attached.
async fn take_pooled(
    root: &Path,
    name: &str,
    rootfs: &Path,
    hostname: &str,
) -> anyhow::Result<Option<Sandbox>> {
    let Some(sb) = sandbox::pool::take(root, name, hostname, &[]).await? else {
        return Ok(None);
    };
    if let Err(e) = sb.attach(rootfs, sandbox::pool::ROOTFS_SUBPATH, true) {
        sb.destroy().await;
        return Err(e.into());
    }
    Ok(Some(sb))
}

/// Clones the template (or boots cold) for `run`.
async fn start(
    args: &RunArgs,
    root: &Path,
    rootfs: Option<PathBuf>,
    block_root: Option<sandbox::BlockRoot>,
) -> anyhow::Result<Sandbox> {
    let template = match &args.template {
        Some(name) => match Template::open(root, name) {
            Ok(t) => Some(t),
            Err(e) if e.to_string().contains("does not exist") => return Err(e.into()),
            // A damaged template: say so, and boot cold.
            Err(e) => {
                eprintln!("podvisor: warning: {e}; booting cold");
                None
            }
        },
        None => None,
    };
    let (memory, vcpus, assets, accel) = match &template {
        Some(t) => t.shape(),
        None => (
            args.vm.memory,
            args.vm.vcpus,
            args.vm.assets()?,
            args.vm.accel()?,
        ),
    };
    let boot_timeout = args
        .boot_timeout
        .map(Duration::from_secs)
        .unwrap_or_else(|| default_boot_timeout(accel));
    let id = random_id();
    tracing::info!(sandbox = %id, %accel, "starting sandbox");
    let config = SandboxConfig {
        cpu_millis: None,
        cgroup: None,
        id: id.clone(),
        root: root.to_path_buf(),
        memory_mib: memory,
        vcpus,
        assets,
        accel,
        nics: Vec::new(),
        shares: rootfs
            .into_iter()
            .map(|path| Share {
                tag: ROOTFS_TAG.into(),
                path,
                readonly: true,
            })
            .collect(),
        hostname: args.hostname.clone(),
        boot_timeout,
        template,
        block_root,
    };
    let sb = Sandbox::start(config).await?;
    if let Some(why) = &sb.fallback {
        eprintln!("podvisor: warning: {why}");
    }
    Ok(sb)
}

/// How long a command may take to exit after SIGINT, SIGTERM or SIGHUP
/// before everything in it is SIGKILLed (docker stop's default).
const STOP_GRACE: Duration = Duration::from_secs(10);

fn signal_request(signal: i32, all: bool) -> SignalProcessRequest {
    SignalProcessRequest {
        container_id: CONTAINER_ID.into(),
        exec_id: String::new(),
        signal: signal as u32,
        all,
    }
}

/// Forwards signals sent to podvisor to the command. The command is PID 1 of
/// its pid namespace and ignores signals it has no handler for, so a stop
/// signal also arms a SIGKILL of the whole container after STOP_GRACE, at
/// once on a second one. Returns the tasks, to abort when the command ended.
fn signal_forwarder(client: AgentClient, tty: bool) -> Vec<tokio::task::JoinHandle<()>> {
    let stop = [
        SignalKind::interrupt(),
        SignalKind::terminate(),
        SignalKind::hangup(),
    ];
    let plain = [
        SignalKind::quit(),
        SignalKind::user_defined1(),
        SignalKind::user_defined2(),
    ];
    let mut tasks = Vec::new();
    let (stop_tx, mut stop_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    for kind in stop.into_iter().chain(plain) {
        let Ok(mut stream) = signal(kind) else {
            continue;
        };
        let mut client = client.clone();
        let is_stop = stop.contains(&kind);
        let stop_tx = stop_tx.clone();
        tasks.push(tokio::spawn(async move {
            while stream.recv().await.is_some() {
                let _ = client
                    .signal_process(signal_request(kind.as_raw_value(), false))
                    .await;
                if is_stop {
                    let _ = stop_tx.send(());
                }
            }
        }));
    }
    let mut killer = client.clone();
    tasks.push(tokio::spawn(async move {
        if stop_rx.recv().await.is_none() {
            return;
        }
        let _ = tokio::time::timeout(STOP_GRACE, stop_rx.recv()).await;
        let _ = killer
            .signal_process(signal_request(libc::SIGKILL, true))
            .await;
    }));
    if tty {
        if let Ok(mut winch) = signal(SignalKind::window_change()) {
            let mut client = client.clone();
            tasks.push(tokio::spawn(async move {
                while winch.recv().await.is_some() {
                    if let Some((rows, cols)) = tty::size() {
                        let _ = client
                            .resize_tty(ResizeTtyRequest {
                                container_id: CONTAINER_ID.into(),
                                exec_id: String::new(),
                                rows: rows.into(),
                                cols: cols.into(),
                            })
                            .await;
                    }
                }
            }));
        }
    }
    tasks
}

async fn run_in(
    sb: &mut Sandbox,
    args: &RunArgs,
    user: User,
    env: Vec<String>,
) -> anyhow::Result<u8> {
    let mut client = sb.agent.clone();
    let (rows, cols) = tty::size().unwrap_or((24, 80));
    let process = agent_proto::Process {
        args: args.command.clone(),
        env,
        cwd: args.cwd.clone().unwrap_or_else(|| "/".into()),
        user: Some(user),
        terminal: args.tty,
        console_size: args.tty.then_some(ConsoleSize {
            rows: rows.into(),
            cols: cols.into(),
        }),
        rlimits: Vec::new(),
        no_new_privileges: false,
        capabilities: None,
        seccomp: Vec::new(),
        seccomp_flags: 0,
        umask: None,
        oom_score_adj: None,
    };
    let t_create = Instant::now();
    let block_root = sb.has_block_root().then(|| agent_proto::BlockRoot {
        image_serial: sandbox::IMAGE_SERIAL.into(),
        layer_serial: sandbox::LAYER_SERIAL.into(),
    });
    let created = client
        .create_container(CreateContainerRequest {
            container_id: CONTAINER_ID.into(),
            rootfs_tag: match block_root {
                Some(_) => String::new(),
                None => ROOTFS_TAG.into(),
            },
            // A pooled VM's share is its daemon's, with our root attached.
            rootfs_subpath: match sb.is_pooled() {
                true => sandbox::pool::ROOTFS_SUBPATH.into(),
                false => String::new(),
            },
            rootfs_readonly: false,
            // The root is shared read-only; the run writes to a layer of its
            // own in guest memory, so no run changes the next one's root.
            rootfs_overlay: true,
            block_root,
            hostname: args.hostname.clone(),
            process: Some(process),
            resources: None,
            ..Default::default()
        })
        .await;
    if let Err(status) = created {
        let msg = status.message().to_string();
        let code = if msg.contains("executable file not found") {
            127
        } else {
            125
        };
        return Err(CodedError { code, msg }.into());
    }

    let out = tokio::spawn(sandbox::io::relay_output(
        client.clone(),
        CONTAINER_ID.into(),
        String::new(),
        OutputStream::Stdout,
        tokio::io::stdout(),
    ));
    let err = tokio::spawn(sandbox::io::relay_output(
        client.clone(),
        CONTAINER_ID.into(),
        String::new(),
        OutputStream::Stderr,
        tokio::io::stderr(),
    ));
    let stdin = tokio::spawn(sandbox::io::relay_stdin(
        client.clone(),
        CONTAINER_ID.into(),
        String::new(),
        tokio::io::stdin(),
    ));
    let raw = if args.tty {
        tty::RawMode::enter()
    } else {
        None
    };
    let forwarders = signal_forwarder(client.clone(), args.tty);

    tracing::debug!(elapsed = ?t_create.elapsed(), "container created");
    let request = ContainerRequest {
        container_id: CONTAINER_ID.into(),
    };
    let t_start = Instant::now();
    let started = client.start_container(request).await;
    tracing::debug!(elapsed = ?t_start.elapsed(), "container started");
    if let Err(status) = started {
        forwarders.iter().for_each(|t| t.abort());
        drop(raw);
        return Err(CodedError {
            code: 126,
            msg: status.message().to_string(),
        }
        .into());
    }
    let waited = client
        .wait_process(ProcessRequest {
            container_id: CONTAINER_ID.into(),
            exec_id: String::new(),
        })
        .await;
    tracing::debug!(elapsed = ?t_start.elapsed(), "process exited");
    // Output still in flight when the process exited is delivered, unless a
    // background process keeps the stream open.
    let drain = Duration::from_secs(3);
    let _ = tokio::time::timeout(drain, out).await;
    let _ = tokio::time::timeout(drain, err).await;
    stdin.abort();
    forwarders.iter().for_each(|t| t.abort());
    drop(raw);
    let status = waited.map_err(|s| anyhow::anyhow!("waiting for the command: {}", s.message()))?;
    Ok(status.into_inner().exit_code.clamp(0, 255) as u8)
}
