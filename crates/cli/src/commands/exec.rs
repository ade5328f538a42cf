//! `exec`: run another process in a running container. Detached (`-d`, as
//! conmon and containerd-shim call it) a holder of its own stands for it, as
//! for the container's first process: it carries the stdio, relays signals
//! and exits with the process's status.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};

use agent_proto::{ExecProcessRequest, ProcessRequest};
use anyhow::{bail, Context};
use clap::Args;
use sandbox::container::Status;
use sandbox::oci::{self as spec, Spec};

use super::oci;
use super::oci::Bounded;
use crate::{console, tty, Globals};

#[derive(Args)]
pub struct ExecArgs {
    /// A JSON file with the process (OCI `process`); replaces the arguments.
    #[arg(short, long)]
    pub process: Option<PathBuf>,
    /// Allocate a pseudo-TTY.
    #[arg(short, long)]
    pub tty: bool,
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Return once started; a holder process stands for the process.
    #[arg(short, long)]
    pub detach: bool,
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// KEY=VALUE (repeatable).
    #[arg(short, long = "env")]
    pub env: Vec<String>,
    #[arg(long)]
    pub cwd: Option<String>,
    /// UID[:GID].
    #[arg(short, long)]
    pub user: Option<String>,
    /// Additional gids (repeatable).
    #[arg(short = 'g', long = "additional-gids")]
    pub additional_gids: Vec<u32>,
    /// Set no_new_privileges.
    #[arg(long)]
    pub no_new_privs: bool,
    /// Accepted for runc compatibility (no host-side labels in a VM).
    #[arg(long)]
    pub process_label: Option<String>,
    #[arg(long)]
    pub apparmor: Option<String>,
    #[arg(short, long = "cap")]
    pub cap: Vec<String>,
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: u32,
    #[arg(long)]
    pub ignore_paused: bool,
    #[arg(long)]
    pub cgroup: Option<String>,
    pub id: String,
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

#[derive(Args)]
pub struct ExecHolderArgs {
    #[arg(long)]
    pub sync_fd: i32,
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    #[arg(long)]
    pub process: PathBuf,
    #[arg(long)]
    pub exec_id: String,
    pub id: String,
}

fn exec_id() -> String {
    let mut b = [0u8; 8];
    if let Ok(mut f) = File::open("/dev/urandom") {
        let _ = f.read_exact(&mut b);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The process to run: --process, or the arguments on top of config.json's.
fn process(args: &ExecArgs, bundle: &Path) -> anyhow::Result<spec::Process> {
    if let Some(path) = &args.process {
        let text = std::fs::read(path).with_context(|| format!("open {}", path.display()))?;
        let p: spec::Process = serde_json::from_slice(&text)
            .with_context(|| format!("parsing process {}", path.display()))?;
        if p.args.is_empty() {
            bail!("process args must not be empty");
        }
        return Ok(p);
    }
    if args.command.is_empty() {
        bail!("exec: no command given (arguments or --process)");
    }
    let mut p = Spec::load(bundle)
        .map(|s| s.process().clone())
        .unwrap_or_default();
    p.args = args.command.clone();
    p.terminal = args.tty;
    p.console_size = None;
    for kv in &args.env {
        let Some((key, _)) = kv.split_once('=') else {
            bail!("--env {kv:?}: expected KEY=VALUE");
        };
        p.env.retain(|e| !e.starts_with(&format!("{key}=")));
        p.env.push(kv.clone());
    }
    if let Some(cwd) = &args.cwd {
        p.cwd = cwd.clone();
    }
    if let Some(u) = &args.user {
        let (uid, gid) = u.split_once(':').unwrap_or((u, "0"));
        p.user.uid = uid
            .parse()
            .with_context(|| format!("--user {u:?}: want UID[:GID]"))?;
        p.user.gid = gid
            .parse()
            .with_context(|| format!("--user {u:?}: want UID[:GID]"))?;
    }
    if !args.additional_gids.is_empty() {
        p.user.additional_gids = args.additional_gids.clone();
    }
    p.no_new_privileges |= args.no_new_privs;
    if let Some(caps) = p.capabilities.as_mut() {
        for c in &args.cap {
            for set in [
                &mut caps.bounding,
                &mut caps.effective,
                &mut caps.permitted,
                &mut caps.inheritable,
            ] {
                set.push(c.clone());
            }
        }
    }
    Ok(p)
}

pub async fn run(args: ExecArgs, g: &Globals) -> anyhow::Result<u8> {
    if args.preserve_fds > 0 {
        bail!("--preserve-fds is not supported: host file descriptors cannot reach a process inside a VM");
    }
    let c = oci::open(&g.root, &args.id)?;
    match c.status {
        Status::Running => {}
        Status::Paused if args.ignore_paused => {}
        Status::Paused => bail!("cannot exec in a paused container (use --ignore-paused)"),
        Status::Created | Status::Creating => {
            bail!("cannot exec in a container that has not been started")
        }
        Status::Stopped => bail!("cannot exec in a stopped container"),
    }
    let process = process(&args, &c.record.bundle)?;
    let eid = exec_id();
    if process.terminal && args.detach && args.console_socket.is_none() {
        bail!("cannot allocate tty if runc will detach without setting console socket");
    }
    if !args.detach {
        let raw = if process.terminal && args.console_socket.is_none() {
            tty::RawMode::enter()
        } else {
            None
        };
        if let Some(socket) = &args.console_socket {
            console::send_console(socket, 0, 0)?;
        }
        // This process stands for the exec (it relays signals and exits
        // with its status): its pid is the one to write.
        let pid_file = args.pid_file.as_deref();
        let code = exec_in(&g.root, &args.id, &eid, &process, || {
            pid_file.map_or(Ok(()), |p| oci::write_pid_file(p, std::process::id()))
        })
        .await;
        drop(raw);
        return code.map(|c| c.clamp(0, 255) as u8);
    }
    let file = c.dir.file(&format!("exec-{eid}.json"));
    std::fs::write(&file, serde_json::to_vec(&process)?).context("writing the exec's process")?;
    let result = spawn_exec_holder(&args, g, &file, &eid);
    let _ = std::fs::remove_file(&file);
    let pid = result?;
    if let Some(p) = &args.pid_file {
        oci::write_pid_file(p, pid)?;
    }
    Ok(0)
}

fn spawn_exec_holder(args: &ExecArgs, g: &Globals, file: &Path, eid: &str) -> anyhow::Result<u32> {
    let (mut child, outcome) = oci::spawn_helper(g, "the exec's holder", |cmd, sync| {
        cmd.arg("exec-holder")
            .arg("--sync-fd")
            .arg(sync.to_string())
            .arg("--process")
            .arg(file)
            .arg("--exec-id")
            .arg(eid);
        if let Some(s) = &args.console_socket {
            cmd.arg("--console-socket").arg(s);
        }
        cmd.arg(&args.id);
    })?;
    match outcome {
        Ok(()) => Ok(child.id()),
        Err(msg) => {
            let _ = child.wait();
            bail!("{msg}")
        }
    }
}

/// Starts the exec through the holder's proxy, relays it, returns its status.
async fn exec_in(
    root: &Path,
    id: &str,
    eid: &str,
    process: &spec::Process,
    started: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<i32> {
    let c = oci::open(root, id)?;
    let mut agent = oci::agent(&c.dir)?;
    let mut p = process.to_agent();
    // An exec runs under its container's seccomp filter, as on runc.
    Spec::load(&c.record.bundle)?.apply_seccomp(&mut p)?;
    if p.terminal && p.console_size.is_none() {
        if let Some((rows, cols)) = console::stdin_size() {
            p.console_size = Some(agent_proto::ConsoleSize {
                rows: rows.into(),
                cols: cols.into(),
            });
        }
    }
    agent
        .exec_process(ExecProcessRequest {
            container_id: id.into(),
            exec_id: eid.into(),
            process: Some(p),
        })
        .bounded()
        .await?;
    let attached = console::attach(&agent, id, eid, process.terminal);
    if let Err(e) = started() {
        let _ = agent
            .signal_process(agent_proto::SignalProcessRequest {
                container_id: id.into(),
                exec_id: eid.into(),
                signal: libc::SIGKILL as u32,
                all: false,
            })
            .bounded()
            .await;
        attached.finish().await;
        return Err(e);
    }
    let waited = agent
        .wait_process(ProcessRequest {
            container_id: id.into(),
            exec_id: eid.into(),
        })
        .await;
    attached.finish().await;
    let code = match waited {
        Ok(r) => r.into_inner().exit_code,
        Err(_) => 128 + libc::SIGKILL,
    };
    Ok(code)
}

/// The detached exec's holder; never returns.
pub fn holder_main(args: ExecHolderArgs, root: &Path, log: &crate::logging::Log) -> ! {
    // Our children (QEMU) must not hold the pipe open.
    let _ = nix::fcntl::fcntl(
        args.sync_fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    // SAFETY: the fd was handed to us by `exec` for this purpose only.
    let mut sync = Some(unsafe { File::from_raw_fd(args.sync_fd) });
    let _ = nix::unistd::setsid();
    let result = (|| -> anyhow::Result<i32> {
        let text = std::fs::read(&args.process)?;
        let process: spec::Process = serde_json::from_slice(&text)?;
        if process.terminal {
            let socket = args
                .console_socket
                .as_ref()
                .context("a terminal needs --console-socket")?;
            let size = process.console_size.unwrap_or_default();
            console::send_console(socket, size.height as u16, size.width as u16)?;
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let r = rt.block_on(exec_in(root, &args.id, &args.exec_id, &process, || {
            if let Some(mut f) = sync.take() {
                let _ = f.write_all(b"ok\n");
            }
            Ok(())
        }));
        rt.shutdown_background();
        r
    })();
    match result {
        Ok(code) => std::process::exit(code.clamp(0, 255)),
        Err(e) => {
            let msg = format!("{e:#}");
            log.error_to_file(&msg);
            if let Some(mut f) = sync {
                let _ = f.write_all(format!("error: {msg}\n").as_bytes());
            }
            std::process::exit(1)
        }
    }
}
