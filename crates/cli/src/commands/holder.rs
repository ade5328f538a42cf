//! The holder: the host process `create` leaves behind and reports as the
//! container's pid. It owns the VM (QEMU dies with it), lives exactly as long
//! as the container's process, carries its stdio on the fds the caller gave,
//! relays signals to it, serves the agent proxy for the other verbs, and
//! exits with the process's status.

use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};

use agent_proto::{CreateContainerRequest, ProcessRequest};
use anyhow::Context;
use clap::Args;
use hypervisor::Share;
use sandbox::container::{self, ContainerDir, ExitRecord, OciState, Record, Status};
use sandbox::oci::{Spec, ANNOTATION_KERNEL};
use sandbox::{Sandbox, SandboxConfig};

use super::vm_args::{checked_accel, default_boot_timeout};
use crate::{console, hooks};

/// The 9p tag of the container's share: a template's, so that a clone's
/// device matches.
pub const SHARE_TAG: &str = sandbox::template::ROOTFS_TAG;
/// Where the container's share goes in a pooled VM's share.
const POOLED_SUBDIR: &str = "ctr";

#[derive(Args, Clone)]
pub struct HolderArgs {
    #[arg(long)]
    pub bundle: PathBuf,
    /// Where to say "ok" or the error once the container exists.
    #[arg(long)]
    pub sync_fd: i32,
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    pub id: String,
}

/// Reports the outcome of creation to the `create` process waiting on it.
struct Sync(Option<File>);

impl Sync {
    fn send(&mut self, msg: &str) {
        if let Some(mut f) = self.0.take() {
            let _ = f.write_all(msg.as_bytes());
        }
    }
}

/// The state hooks see while the container is being created.
fn creating_state(id: &str, bundle: &Path, spec: &Spec) -> OciState {
    OciState {
        oci_version: container::OCI_VERSION.into(),
        id: id.into(),
        status: Status::Creating.as_str().into(),
        pid: std::process::id() as i32,
        bundle: bundle.into(),
        rootfs: spec.rootfs(bundle).unwrap_or_default(),
        created: String::new(),
        owner: String::new(),
        annotations: spec.annotations.clone(),
    }
}

/// Runs the holder; never returns.
pub fn main(args: HolderArgs, root: &Path, log: &crate::logging::Log) -> ! {
    // Our children (QEMU) must not hold the pipe open.
    let _ = nix::fcntl::fcntl(
        args.sync_fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    // SAFETY: the fd was handed to us by `create` for this purpose only.
    let mut sync = Sync(Some(unsafe { File::from_raw_fd(args.sync_fd) }));
    let code = match prepare(&args) {
        Ok(spec) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            match runtime {
                Ok(rt) => {
                    let r = rt.block_on(run(&args, root, spec, &mut sync));
                    rt.shutdown_background();
                    r
                }
                Err(e) => Err(e.into()),
            }
        }
        Err(e) => Err(e),
    };
    match code {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            let msg = format!("{e:#}");
            log.error_to_file(&msg);
            sync.send(&format!("error: {msg}\n"));
            std::process::exit(1)
        }
    }
}

/// What must happen while this process has one thread: namespaces.
fn prepare(args: &HolderArgs) -> anyhow::Result<Spec> {
    let _ = nix::unistd::setsid();
    let spec = Spec::load(&args.bundle)?;
    sandbox::network::enter_namespace(&spec)?;
    sandbox::share::private_mount_namespace()?;
    let process = spec.process();
    if process.terminal {
        let socket = args
            .console_socket
            .as_ref()
            .context("process.terminal is set but no --console-socket was given")?;
        let size = process.console_size.unwrap_or_default();
        console::send_console(socket, size.height as u16, size.width as u16)?;
    }
    Ok(spec)
}

async fn run(args: &HolderArgs, root: &Path, spec: Spec, sync: &mut Sync) -> anyhow::Result<i32> {
    let dir = ContainerDir::open(root, &args.id)?;
    dir.write_creator(std::process::id() as i32)?;
    let bundle = &args.bundle;
    let hooks = spec.hooks.clone().unwrap_or_default();
    let state = creating_state(&args.id, bundle, &spec);
    hooks::run("createRuntime", &hooks.create_runtime, &state)?;
    hooks::run("prestart", &hooks.prestart, &state)?;

    let network = match spec.network_namespace() {
        Some(_) => Some(sandbox::network::attach()?),
        None => None,
    };
    let rootfs = spec.rootfs(bundle)?;
    // Not create_dir_all: if `delete --force` removed the container
    // meanwhile, creation must stop here.
    sandbox::share::create_top(&dir.share()).context("creating the share directory")?;
    let mounts = sandbox::share::populate(&dir.share(), &rootfs, &spec.mounts)?;

    let policy = sandbox::pool::annotation_policy(&sandbox::pool::config_path())?;
    spec.check_annotations(&policy, false)?;
    let kernel = spec.annotations.get(ANNOTATION_KERNEL).map(PathBuf::from);
    let assets = sandbox::assets::GuestAssets::resolve(kernel.as_deref(), None)?;
    let accel = checked_accel(None)?;
    let nics = network.as_ref().map(|n| n.nics.clone()).unwrap_or_default();
    let config = SandboxConfig {
        cpu_millis: spec.cpu_millis(),
        cgroup: spec.vm_cgroup()?,
        id: dir.sandbox_id(),
        root: root.to_path_buf(),
        memory_mib: spec.vm_memory_mib(),
        vcpus: spec.vm_vcpus(),
        assets,
        accel,
        shares: vec![Share {
            tag: SHARE_TAG.into(),
            path: dir.share(),
            readonly: false,
        }],
        nics,
        hostname: if spec.hostname.is_empty() {
            args.id.chars().take(12).collect()
        } else {
            spec.hostname.clone()
        },
        boot_timeout: default_boot_timeout(accel),
        template: None,
        block_root: None,
    };
    tracing::info!(container = %args.id, %accel, memory = config.memory_mib, vcpus = config.vcpus, "starting the container's VM");
    // From the factory: a pool's ready clone, a clone, or a cold boot.
    let sb = sandbox::pool::provide(config).await?;
    // A pooled VM shares its daemon's directory: ours goes in as a subtree.
    let prefix = match sb.is_pooled() {
        true => match sb.attach(&dir.share(), POOLED_SUBDIR, false) {
            Ok(()) => format!("{POOLED_SUBDIR}/"),
            Err(e) => {
                sb.destroy().await;
                return Err(e.into());
            }
        },
        false => String::new(),
    };
    let mounts = mounts
        .into_iter()
        .map(|mut m| {
            if m.r#type == "bind" {
                m.source = format!("{prefix}{}", m.source);
            }
            m
        })
        .collect();
    let created = create_in(&sb, args, &spec, network.as_ref(), mounts, &prefix).await;
    if let Err(e) = created {
        sb.destroy().await;
        return Err(e);
    }
    let record = Record {
        id: args.id.clone(),
        bundle: bundle.clone(),
        rootfs,
        pid: std::process::id() as i32,
        pid_start: container::process_start(std::process::id() as i32).unwrap_or(0),
        created: container::rfc3339_now(),
        owner: String::new(),
        annotations: spec.annotations.clone(),
        netns: spec.network_namespace().flatten(),
    };
    dir.write_record(&record)?;

    let client = sb.agent.clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let listener = sandbox::proxy::bind(&dir.proxy_socket()).context("binding the agent proxy")?;
    let proxy = tokio::spawn({
        let client = client.clone();
        async move {
            let _ = sandbox::proxy::serve(client, listener, async {
                let _ = stop_rx.await;
            })
            .await;
        }
    });
    let attached = console::attach(&client, &args.id, "", spec.process().terminal);
    sync.send("ok\n");

    let waited = client
        .clone()
        .wait_process(ProcessRequest {
            container_id: args.id.clone(),
            exec_id: String::new(),
        })
        .await;
    let exit = match waited {
        Ok(r) => {
            let r = r.into_inner();
            ExitRecord {
                code: r.exit_code,
                signal: r.signal,
            }
        }
        // The VM is gone (QEMU killed): the container died with it.
        Err(status) => {
            tracing::warn!(container = %args.id, "lost the container's process: {}", status.message());
            ExitRecord {
                code: 128 + libc::SIGKILL,
                signal: libc::SIGKILL as u32,
            }
        }
    };
    let _ = dir.write_exit(exit);
    attached.finish().await;
    // Nothing more can be asked of an exited container: stop serving at once
    // (a graceful stop would wait for every client's connection to close).
    let _ = stop_tx.send(());
    proxy.abort();
    sb.destroy().await;
    drop(network);
    Ok(exit.code.clamp(0, 255))
}

async fn create_in(
    sb: &Sandbox,
    args: &HolderArgs,
    spec: &Spec,
    network: Option<&sandbox::network::Network>,
    mounts: Vec<agent_proto::Mount>,
    prefix: &str,
) -> anyhow::Result<()> {
    let mut client = sb.agent.clone();
    if let Some(n) = network {
        if !n.request.interfaces.is_empty() {
            client
                .configure_network(n.request.clone())
                .await
                .map_err(|s| anyhow::anyhow!("configuring the guest network: {}", s.message()))?;
        }
    }
    let mut process = spec.agent_process()?;
    if process.terminal && process.console_size.is_none() {
        if let Some((rows, cols)) = console::stdin_size() {
            process.console_size = Some(agent_proto::ConsoleSize {
                rows: rows.into(),
                cols: cols.into(),
            });
        }
    }
    client
        .create_container(CreateContainerRequest {
            container_id: args.id.clone(),
            rootfs_tag: SHARE_TAG.into(),
            rootfs_subpath: format!("{prefix}rootfs"),
            rootfs_readonly: spec.root.as_ref().is_some_and(|r| r.readonly),
            hostname: spec.hostname.clone(),
            process: Some(process),
            resources: Some(spec.agent_resources()),
            mounts,
            sysctl: spec.sysctl(),
            pod_shared: false,
            rootfs_overlay: false,
            block_root: None,
            masked_paths: spec.masked_paths(),
            readonly_paths: spec.readonly_paths(),
            rootfs_propagation: spec.rootfs_propagation(),
            devices: spec.devices()?,
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    Ok(())
}
