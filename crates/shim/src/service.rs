//! The task service containerd calls, and the shim's start and delete.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use agent_proto::{
    ContainerRequest, CreateContainerRequest, ExecProcessRequest as AgentExec, ProcessRequest,
    ResizeTtyRequest, SignalProcessRequest, UpdateContainerRequest,
};
use async_trait::async_trait;
use containerd_shim::api;
use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::{MessageDyn, MessageField};
use containerd_shim::protos::shim_async::Task;
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::{self, Code};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, Flags, StartOpts, TtrpcContext, TtrpcResult};
use hypervisor::Share;
use sandbox::agent::AgentClient;
use sandbox::container::short_id;
use sandbox::oci::{Spec, ANNOTATION_KERNEL, CRI_SANDBOX_ID};
use sandbox::{Sandbox, SandboxConfig};
use tokio::sync::Mutex;

use crate::pod::{Container, Exit, Kind, Pod, Process, State, Vm};

/// The 9p tag of the pod's share; each container's root is `<id>/rootfs`.
const SHARE_TAG: &str = "share";

static STARTUP_ERROR: OnceLock<String> = OnceLock::new();

/// What went wrong before the shim could serve (reported by `create`).
pub fn set_startup_error(e: Option<anyhow::Error>) {
    if let Some(e) = e {
        let _ = STARTUP_ERROR.set(format!("{e:#}"));
    }
}

/// podvisor's state root: `PODVISOR_ROOT` in containerd's environment, else
/// the CLI's default.
fn root() -> PathBuf {
    std::env::var_os("PODVISOR_ROOT")
        .filter(|r| !r.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(sandbox::state::DEFAULT_ROOT))
}

/// Where a pod's share lives on the host.
fn pod_dir(pod_id: &str) -> PathBuf {
    root().join("pods").join(short_id('p', pod_id))
}

fn err(code: Code, msg: impl ToString) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg))
}

fn not_found(what: &str, id: &str) -> ttrpc::Error {
    err(Code::NOT_FOUND, format!("{what} {id} not found"))
}

fn agent_err(what: &str) -> impl Fn(tonic::Status) -> ttrpc::Error + '_ {
    move |s| err(Code::UNKNOWN, format!("{what}: {}", s.message()))
}

#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    exit: Arc<ExitSignal>,
    namespace: String,
    publisher: OnceLock<RemotePublisher>,
    pod: Mutex<Pod>,
}

impl Service {
    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        let Some(p) = self.inner.publisher.get() else {
            return;
        };
        let ctx = ttrpc::context::Context::default();
        if let Err(e) = p.publish(ctx, topic, &self.inner.namespace, event).await {
            tracing::warn!("publishing {topic}: {e}");
        }
    }

    async fn publish_exit(&self, container_id: &str, exec_id: &str, pid: u32, e: Exit) {
        let id = if exec_id.is_empty() {
            container_id
        } else {
            exec_id
        };
        self.publish(
            topics::TASK_EXIT_EVENT_TOPIC,
            Box::new(TaskExit {
                container_id: container_id.into(),
                id: id.into(),
                pid,
                exit_status: e.code,
                exited_at: MessageField::some(e.timestamp()),
                ..Default::default()
            }),
        )
        .await;
    }

    fn agent(pod: &Pod) -> TtrpcResult<AgentClient> {
        pod.vm
            .as_ref()
            .map(|v| v.sandbox.agent.clone())
            .ok_or_else(|| err(Code::FAILED_PRECONDITION, "the pod's VM is gone"))
    }

    /// Waits for a process in the guest, lets its output drain, records its
    /// exit and tells containerd. A VM that dies takes its processes along:
    /// they exit with 137.
    fn watch(&self, client: AgentClient, cid: String, eid: String, pid: u32) {
        let this = self.clone();
        tokio::spawn(async move {
            let waited = client
                .clone()
                .wait_process(ProcessRequest {
                    container_id: cid.clone(),
                    exec_id: eid.clone(),
                })
                .await;
            let code = match waited {
                Ok(r) => r.into_inner().exit_code.clamp(0, 255) as u32,
                Err(s) => {
                    tracing::warn!(container = %cid, exec = %eid, "lost the process: {}", s.message());
                    128 + libc::SIGKILL as u32
                }
            };
            if eid.is_empty() {
                this.report_oom(client.clone(), &cid).await;
            }
            let relays = {
                let mut pod = this.inner.pod.lock().await;
                pod.containers
                    .get_mut(&cid)
                    .and_then(|c| c.process_mut(&eid))
                    .and_then(|p| p.relays.take())
            };
            if let Some(r) = relays {
                r.finish().await;
            }
            this.exited(&cid, &eid, pid, code).await;
        });
    }

    /// Tells containerd the OOM killer struck in the container (kubelet then
    /// reports the container OOMKilled).
    async fn report_oom(&self, mut client: AgentClient, cid: &str) {
        let stats = client
            .stats_container(ContainerRequest {
                container_id: cid.into(),
            })
            .await;
        if stats.is_ok_and(|s| s.into_inner().oom_kills > 0) {
            self.publish(
                topics::TASK_OOM_EVENT_TOPIC,
                Box::new(TaskOOM {
                    container_id: cid.into(),
                    ..Default::default()
                }),
            )
            .await;
        }
    }

    async fn exited(&self, cid: &str, eid: &str, pid: u32, code: u32) {
        let e = Exit::now(code);
        let recorded = {
            let mut pod = self.inner.pod.lock().await;
            pod.containers
                .get_mut(cid)
                .and_then(|c| c.process_mut(eid))
                .is_some_and(|p| p.set_exit(e))
        };
        if recorded {
            self.publish_exit(cid, eid, pid, e).await;
        }
    }

    /// Watches the VM itself: if QEMU dies, the sandbox task exits too (its
    /// processes' waits fail on their own).
    fn watch_vm(&self) {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                let mut pod = this.inner.pod.lock().await;
                let Some(vm) = pod.vm.as_mut() else { return };
                let Some(why) = vm.sandbox.vm_exit() else {
                    continue;
                };
                tracing::error!("the pod's VM died: {why}");
                let pid = vm.pid;
                let sandboxes: Vec<String> = pod
                    .containers
                    .values()
                    .filter(|c| c.kind == Kind::Sandbox)
                    .map(|c| c.id.clone())
                    .collect();
                pod.destroy_vm().await;
                drop(pod);
                for id in sandboxes {
                    this.exited(&id, "", pid, 128 + libc::SIGKILL as u32).await;
                }
                return;
            }
        });
    }
}

#[async_trait]
impl Shim for Service {
    type T = Service;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        Service {
            inner: Arc::new(Inner {
                exit: Arc::new(ExitSignal::default()),
                namespace: args.namespace.clone(),
                publisher: OnceLock::new(),
                pod: Mutex::new(Pod::default()),
            }),
        }
    }

    /// One shim per pod: a CRI container goes to the shim of its sandbox.
    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, containerd_shim::Error> {
        start_shim(opts).await
    }

    /// After a shim died: nothing of its VM may stay behind. QEMU died with
    /// it and its mounts with its mount namespace; what is left on disk
    /// (state directories, a QEMU that outlived it) is collected here.
    async fn delete_shim(&mut self) -> Result<api::DeleteResponse, containerd_shim::Error> {
        let bundle = std::env::current_dir().unwrap_or_default();
        crate::pod::unmount_tree(&bundle.join("rootfs"));
        let collected = sandbox::state::collect_garbage(&root());
        if !collected.is_empty() {
            tracing::info!(?collected, "removed the state of dead sandboxes");
        }
        if let Ok(spec) = Spec::load(&bundle) {
            let id = bundle
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if Kind::of(&id, &spec).boots_vm() {
                let dir = pod_dir(&id);
                let live = std::fs::read_to_string(dir.join("shim.pid"))
                    .ok()
                    .and_then(|p| p.trim().parse::<i32>().ok())
                    // Not a zombie either: a dead shim may wait to be reaped.
                    .is_some_and(|p| sandbox::container::process_start(p).is_some());
                if !live {
                    let _ = std::fs::remove_dir_all(&dir);
                }
            }
        }
        let e = Exit::now(128 + libc::SIGKILL as u32);
        Ok(api::DeleteResponse {
            exit_status: e.code,
            exited_at: MessageField::some(e.timestamp()),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.inner.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        let _ = self.inner.publisher.set(publisher);
        self.clone()
    }
}

/// Starts the long-running shim for the pod of the container in the current
/// directory (its bundle), or finds the one already serving it: a CRI
/// container goes to the shim of its sandbox. Returns its socket address.
pub async fn start_shim(opts: StartOpts) -> Result<String, containerd_shim::Error> {
    let grouping = Spec::load(Path::new("."))
        .ok()
        .and_then(|s| s.annotations.get(CRI_SANDBOX_ID).cloned())
        .unwrap_or_else(|| opts.id.clone());
    let address = spawn(opts, &grouping, Vec::new()).await?;
    let _ = std::fs::write("address", &address);
    Ok(address)
}

/// Boots the pod's VM in the shim's network namespace.
async fn boot_vm(pod_id: &str, kind: &Kind, spec: &Spec) -> anyhow::Result<Vm> {
    let network = match spec.network_namespace() {
        Some(_) => Some(sandbox::network::attach()?),
        None => None,
    };
    let (memory_mib, vcpus) = match kind {
        Kind::Sandbox => spec.pod_vm_shape(),
        _ => (spec.vm_memory_mib(), spec.vm_vcpus()),
    };
    let dir = pod_dir(pod_id);
    let share = dir.join("share");
    std::fs::create_dir_all(&share)?;
    std::fs::write(dir.join("shim.pid"), std::process::id().to_string())?;
    let kernel = spec.annotations.get(ANNOTATION_KERNEL).map(PathBuf::from);
    let assets = sandbox::assets::GuestAssets::resolve(kernel.as_deref(), None)?;
    let accel = sandbox::checked_accel(None)?;
    let hostname = if spec.hostname.is_empty() {
        pod_id.chars().take(12).collect()
    } else {
        spec.hostname.clone()
    };
    let config = SandboxConfig {
        id: short_id('p', pod_id),
        root: root(),
        memory_mib,
        vcpus,
        assets,
        accel,
        shares: vec![Share {
            tag: SHARE_TAG.into(),
            path: share.clone(),
            readonly: false,
        }],
        nics: network.as_ref().map(|n| n.nics.clone()).unwrap_or_default(),
        hostname,
        boot_timeout: sandbox::default_boot_timeout(accel),
        template: None,
    };
    tracing::info!(pod = %pod_id, %accel, memory = memory_mib, vcpus, "booting the pod's VM");
    let sb = match Sandbox::start(config).await {
        Ok(sb) => sb,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e.into());
        }
    };
    if let Some(n) = &network {
        if !n.request.interfaces.is_empty() {
            let configured = sb.agent.clone().configure_network(n.request.clone()).await;
            if let Err(s) = configured {
                sb.destroy().await;
                let _ = std::fs::remove_dir_all(&dir);
                anyhow::bail!("configuring the guest network: {}", s.message());
            }
        }
    }
    let pid = sb.vmm_pid();
    Ok(Vm {
        sandbox: sb,
        network,
        share,
        pid,
    })
}

/// Mounts containerd's rootfs mounts (a snapshot) at bundle/rootfs.
fn mount_rootfs(
    bundle: &Path,
    mounts: &[containerd_shim::protos::api::Mount],
) -> anyhow::Result<Option<PathBuf>> {
    if mounts.is_empty() {
        return Ok(None);
    }
    let target = bundle.join("rootfs");
    std::fs::create_dir_all(&target)?;
    for m in mounts {
        containerd_shim::mount::mount_rootfs(
            Some(m.type_.as_str()),
            Some(m.source.as_str()),
            &m.options,
            &target,
        )
        .map_err(|e| {
            crate::pod::unmount_tree(&target);
            anyhow::anyhow!(
                "mounting the root filesystem ({} {}): {e}",
                m.type_,
                m.source
            )
        })?;
    }
    Ok(Some(target))
}

impl Service {
    /// Creates the container in the guest (not the sandbox one) and starts
    /// relaying its stdio.
    async fn create_in_guest(
        &self,
        vm: &Vm,
        c: &mut Container,
        spec: &Spec,
        rootfs: &Path,
    ) -> anyhow::Result<()> {
        let dir = vm.share.join(&c.id);
        std::fs::create_dir(&dir)?;
        c.share = Some(dir.clone());
        let mut mounts = sandbox::share::populate(&dir, rootfs, &spec.mounts)?;
        for m in mounts.iter_mut().filter(|m| m.r#type == "bind") {
            m.source = format!("{}/{}", c.id, m.source);
        }
        let mut client = vm.sandbox.agent.clone();
        client
            .create_container(CreateContainerRequest {
                container_id: c.id.clone(),
                rootfs_tag: SHARE_TAG.into(),
                rootfs_subpath: format!("{}/rootfs", c.id),
                rootfs_readonly: spec.root.as_ref().is_some_and(|r| r.readonly),
                hostname: spec.hostname.clone(),
                process: Some(spec.process().to_agent()),
                resources: Some(spec.agent_resources()),
                mounts,
                sysctl: spec
                    .linux
                    .as_ref()
                    .map(|l| l.sysctl.clone().into_iter().collect())
                    .unwrap_or_default(),
                pod_shared: matches!(c.kind, Kind::Member(_)),
            })
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
        let p = &mut c.init;
        let relays = crate::io::attach(&client, &c.id, "", &p.stdin, &p.stdout, &p.stderr);
        match relays {
            Ok(r) => {
                p.close_stdin = Some(r.close_stdin.clone());
                p.relays = Some(r);
                Ok(())
            }
            Err(e) => {
                let _ = client
                    .remove_container(ContainerRequest {
                        container_id: c.id.clone(),
                    })
                    .await;
                Err(anyhow::anyhow!("opening the container's stdio: {e}"))
            }
        }
    }

    async fn create_task(&self, req: &api::CreateTaskRequest) -> anyhow::Result<u32> {
        if let Some(e) = STARTUP_ERROR.get() {
            anyhow::bail!("the shim could not start: {e}");
        }
        if !req.checkpoint.is_empty() {
            anyhow::bail!("restoring from a checkpoint is not supported by podvisor");
        }
        sandbox::container::valid_id(&req.id)?;
        let bundle = PathBuf::from(&req.bundle);
        let spec = Spec::load(&bundle)?;
        let kind = Kind::of(&req.id, &spec);
        let mut pod = self.inner.pod.lock().await;
        if pod.containers.contains_key(&req.id) {
            anyhow::bail!("container {} already exists", req.id);
        }
        match (&kind, &pod.vm) {
            (Kind::Member(s), None) => {
                anyhow::bail!("pod sandbox {s} is not running in this shim")
            }
            (Kind::Member(s), Some(_)) if !pod.containers.contains_key(s) => {
                anyhow::bail!("pod sandbox {s} is not running in this shim")
            }
            (Kind::Sandbox | Kind::Alone, Some(_)) => {
                anyhow::bail!(
                    "this shim already runs a pod; {} cannot have its own",
                    req.id
                )
            }
            _ => {}
        }
        let mounted = mount_rootfs(&bundle, &req.rootfs)?;
        let rootfs = match &mounted {
            Some(r) => r.clone(),
            None => spec.rootfs(&bundle)?,
        };
        let mut c = Container {
            id: req.id.clone(),
            bundle: bundle.clone(),
            kind: kind.clone(),
            mounted_rootfs: mounted,
            share: None,
            init: Process::new(&req.stdin, &req.stdout, &req.stderr, req.terminal),
            execs: Default::default(),
        };
        let mut booted = false;
        if kind.boots_vm() {
            match boot_vm(&req.id, &kind, &spec).await {
                Ok(vm) => {
                    pod.vm = Some(vm);
                    booted = true;
                }
                Err(e) => {
                    c.unmount();
                    return Err(e);
                }
            }
        }
        if c.in_guest() {
            let vm = pod.vm.as_ref().expect("the pod's VM");
            if let Err(e) = self.create_in_guest(vm, &mut c, &spec, &rootfs).await {
                c.unmount();
                if booted {
                    pod.destroy_vm().await;
                }
                return Err(e);
            }
        }
        let pid = pod.vm_pid();
        pod.containers.insert(req.id.clone(), c);
        drop(pod);
        if booted {
            self.watch_vm();
        }
        self.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                }),
                pid,
                ..Default::default()
            }),
        )
        .await;
        Ok(pid)
    }
}

fn state_of(s: State) -> api::Status {
    match s {
        State::Created => api::Status::CREATED,
        State::Running => api::Status::RUNNING,
        State::Paused => api::Status::PAUSED,
        State::Stopped => api::Status::STOPPED,
    }
}

/// The exit status a signal gives a process that dies of it.
fn signal_exit(signal: u32) -> u32 {
    if signal == libc::SIGTERM as u32 || signal == libc::SIGINT as u32 {
        0
    } else {
        128 + signal
    }
}

#[async_trait]
impl Task for Service {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        tracing::info!(id = %req.id, bundle = %req.bundle, "create");
        match self.create_task(&req).await {
            Ok(pid) => Ok(api::CreateTaskResponse {
                pid,
                ..Default::default()
            }),
            Err(e) => {
                tracing::error!(id = %req.id, "create failed: {e:#}");
                Err(err(Code::UNKNOWN, format!("podvisor: {e:#}")))
            }
        }
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let mut pod = self.inner.pod.lock().await;
        let pid = pod.vm_pid();
        let client = Self::agent(&pod);
        let c = pod
            .containers
            .get_mut(&req.id)
            .ok_or_else(|| not_found("container", &req.id))?;
        let kind = c.kind.clone();
        let p = c
            .process_mut(&req.exec_id)
            .ok_or_else(|| not_found("exec", &req.exec_id))?;
        if p.state != State::Created {
            return Err(err(
                Code::FAILED_PRECONDITION,
                format!("{} is not in the created state", req.id),
            ));
        }
        if req.exec_id.is_empty() {
            if kind != Kind::Sandbox {
                client?
                    .start_container(ContainerRequest {
                        container_id: req.id.clone(),
                    })
                    .await
                    .map_err(agent_err("starting the container"))?;
                self.watch(Self::agent(&pod)?, req.id.clone(), String::new(), pid);
            }
            let p = pod.containers.get_mut(&req.id).map(|c| &mut c.init);
            if let Some(p) = p {
                p.state = State::Running;
            }
            drop(pod);
            self.publish(
                topics::TASK_START_EVENT_TOPIC,
                Box::new(TaskStart {
                    container_id: req.id.clone(),
                    pid,
                    ..Default::default()
                }),
            )
            .await;
        } else {
            let mut client = client?;
            let process = p.spec.take().unwrap_or_default();
            client
                .exec_process(AgentExec {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    process: Some(process),
                })
                .await
                .map_err(agent_err("starting the exec"))?;
            let relays = crate::io::attach(
                &client,
                &req.id,
                &req.exec_id,
                &p.stdin,
                &p.stdout,
                &p.stderr,
            )
            .map_err(|e| err(Code::UNKNOWN, format!("opening the exec's stdio: {e}")))?;
            p.close_stdin = Some(relays.close_stdin.clone());
            p.relays = Some(relays);
            p.state = State::Running;
            self.watch(client, req.id.clone(), req.exec_id.clone(), pid);
            drop(pod);
            self.publish(
                topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                Box::new(TaskExecStarted {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    pid,
                    ..Default::default()
                }),
            )
            .await;
        }
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let mut pod = self.inner.pod.lock().await;
        let pid = pod.vm_pid();
        let client = Self::agent(&pod).ok();
        let c = pod
            .containers
            .get_mut(&req.id)
            .ok_or_else(|| not_found("container", &req.id))?;
        let p = c
            .process(&req.exec_id)
            .ok_or_else(|| not_found("exec", &req.exec_id))?;
        if matches!(p.state, State::Running | State::Paused) {
            return Err(err(
                Code::FAILED_PRECONDITION,
                format!("{} is still running: kill it first", req.id),
            ));
        }
        let e = p.exited().unwrap_or_else(|| Exit::now(0));
        let response = api::DeleteResponse {
            pid,
            exit_status: e.code,
            exited_at: MessageField::some(e.timestamp()),
            ..Default::default()
        };
        if !req.exec_id.is_empty() {
            c.execs.remove(&req.exec_id);
            return Ok(response);
        }
        if let (true, Some(mut client)) = (c.in_guest(), client) {
            let _ = client
                .remove_container(ContainerRequest {
                    container_id: req.id.clone(),
                })
                .await;
        }
        c.unmount();
        let kind = c.kind.clone();
        pod.containers.remove(&req.id);
        if kind.boots_vm() {
            pod.destroy_vm().await;
        }
        drop(pod);
        self.publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(TaskDelete {
                container_id: req.id.clone(),
                pid,
                exit_status: e.code,
                exited_at: MessageField::some(e.timestamp()),
                id: req.id.clone(),
                ..Default::default()
            }),
        )
        .await;
        Ok(response)
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        let pod = self.inner.pod.lock().await;
        let c = pod
            .containers
            .get(&req.id)
            .ok_or_else(|| not_found("container", &req.id))?;
        let pids = if c.in_guest() {
            Self::agent(&pod)?
                .list_processes(ContainerRequest {
                    container_id: req.id.clone(),
                })
                .await
                .map_err(agent_err("listing the processes"))?
                .into_inner()
                .pids
        } else {
            vec![pod.vm_pid()]
        };
        Ok(api::PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| containerd_shim::protos::api::ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        self.set_paused(&req.id, true).await
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResumeRequest,
    ) -> TtrpcResult<api::Empty> {
        self.set_paused(&req.id, false).await
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(err(
            Code::UNIMPLEMENTED,
            "checkpoint is not supported by podvisor",
        ))
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let mut pod = self.inner.pod.lock().await;
        let pid = pod.vm_pid();
        let client = Self::agent(&pod);
        let c = pod
            .containers
            .get_mut(&req.id)
            .ok_or_else(|| not_found("container", &req.id))?;
        let kind = c.kind.clone();
        let p = c
            .process_mut(&req.exec_id)
            .ok_or_else(|| not_found("exec", &req.exec_id))?;
        match p.state {
            State::Stopped => {
                return Err(err(Code::NOT_FOUND, "process already finished"));
            }
            // Nothing runs yet (or, for the sandbox, ever): the task ends.
            State::Created => {}
            _ if kind == Kind::Sandbox => {}
            _ => {
                client?
                    .signal_process(SignalProcessRequest {
                        container_id: req.id.clone(),
                        exec_id: req.exec_id.clone(),
                        signal: req.signal,
                        all: req.all,
                    })
                    .await
                    .map_err(agent_err("signalling the process"))?;
                return Ok(api::Empty::default());
            }
        }
        let ends = req.signal == libc::SIGKILL as u32
            || req.signal == libc::SIGTERM as u32
            || req.signal == libc::SIGINT as u32;
        if !ends {
            return Ok(api::Empty::default());
        }
        let e = Exit::now(signal_exit(req.signal));
        let recorded = p.set_exit(e);
        if kind == Kind::Sandbox {
            // The pod is over: its VM goes, and with it anything still
            // running in it (their waits end with 137).
            pod.destroy_vm().await;
        }
        drop(pod);
        if recorded {
            self.publish_exit(&req.id, &req.exec_id, pid, e).await;
        }
        Ok(api::Empty::default())
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        sandbox::container::valid_id(&req.exec_id)
            .map_err(|e| err(Code::INVALID_ARGUMENT, format!("exec id: {e}")))?;
        let spec: sandbox::oci::Process = serde_json::from_slice(&req.spec.value)
            .map_err(|e| err(Code::INVALID_ARGUMENT, format!("exec process spec: {e}")))?;
        if spec.args.is_empty() {
            return Err(err(
                Code::INVALID_ARGUMENT,
                "exec process spec: args must not be empty",
            ));
        }
        let mut pod = self.inner.pod.lock().await;
        let c = pod
            .containers
            .get_mut(&req.id)
            .ok_or_else(|| not_found("container", &req.id))?;
        if !c.in_guest() {
            return Err(err(
                Code::FAILED_PRECONDITION,
                "the pod sandbox runs no processes to exec beside",
            ));
        }
        if c.init.state != State::Running {
            return Err(err(
                Code::FAILED_PRECONDITION,
                format!("container {} is not running", req.id),
            ));
        }
        if c.execs.contains_key(&req.exec_id) {
            return Err(err(
                Code::ALREADY_EXISTS,
                format!("exec {} already exists", req.exec_id),
            ));
        }
        let mut p = Process::new(&req.stdin, &req.stdout, &req.stderr, req.terminal);
        let mut process = spec.to_agent();
        process.terminal = req.terminal;
        p.spec = Some(process);
        c.execs.insert(req.exec_id.clone(), p);
        drop(pod);
        self.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            }),
        )
        .await;
        Ok(api::Empty::default())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let pod = self.inner.pod.lock().await;
        if !pod.containers.contains_key(&req.id) {
            return Err(not_found("container", &req.id));
        }
        Self::agent(&pod)?
            .resize_tty(ResizeTtyRequest {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                rows: req.height,
                cols: req.width,
            })
            .await
            .map_err(agent_err("resizing the terminal"))?;
        Ok(api::Empty::default())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        let pod = self.inner.pod.lock().await;
        let p = pod
            .containers
            .get(&req.id)
            .ok_or_else(|| not_found("container", &req.id))?
            .process(&req.exec_id)
            .ok_or_else(|| not_found("exec", &req.exec_id))?;
        if req.stdin {
            if let Some(n) = &p.close_stdin {
                n.notify_one();
            }
        }
        Ok(api::Empty::default())
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        let resources: sandbox::oci::Resources = serde_json::from_slice(&req.resources.value)
            .map_err(|e| err(Code::INVALID_ARGUMENT, format!("resources: {e}")))?;
        let pod = self.inner.pod.lock().await;
        let c = pod
            .containers
            .get(&req.id)
            .ok_or_else(|| not_found("container", &req.id))?;
        if !c.in_guest() {
            // The pod's limits size the VM; they cannot change after boot.
            return Ok(api::Empty::default());
        }
        Self::agent(&pod)?
            .update_container(UpdateContainerRequest {
                container_id: req.id.clone(),
                resources: Some(resources.to_agent()),
            })
            .await
            .map_err(agent_err("updating the container"))?;
        Ok(api::Empty::default())
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let mut exit = {
            let pod = self.inner.pod.lock().await;
            pod.containers
                .get(&req.id)
                .ok_or_else(|| not_found("container", &req.id))?
                .process(&req.exec_id)
                .ok_or_else(|| not_found("exec", &req.exec_id))?
                .exit
                .subscribe()
        };
        let e = exit
            .wait_for(Option::is_some)
            .await
            .map_err(|_| err(Code::UNKNOWN, "the shim is shutting down"))?
            .expect("an exit");
        Ok(api::WaitResponse {
            exit_status: e.code,
            exited_at: MessageField::some(e.timestamp()),
            ..Default::default()
        })
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        // The cgroup v1 shape: what containerd 1.6's task API carries.
        use containerd_shim::protos::cgroups::metrics::{
            CPUStat, CPUUsage, MemoryEntry, MemoryStat, Metrics, PidsStat,
        };
        let pod = self.inner.pod.lock().await;
        let c = pod
            .containers
            .get(&req.id)
            .ok_or_else(|| not_found("container", &req.id))?;
        let mut metrics = Metrics::default();
        if c.in_guest() {
            let s = Self::agent(&pod)?
                .stats_container(ContainerRequest {
                    container_id: req.id.clone(),
                })
                .await
                .map_err(agent_err("reading the container's cgroup"))?
                .into_inner();
            metrics.pids = MessageField::some(PidsStat {
                current: s.pids_current,
                limit: s.pids_limit,
                ..Default::default()
            });
            metrics.cpu = MessageField::some(CPUStat {
                usage: MessageField::some(CPUUsage {
                    total: s.cpu_usage_usec * 1000,
                    user: s.cpu_user_usec * 1000,
                    kernel: s.cpu_system_usec * 1000,
                    ..Default::default()
                }),
                ..Default::default()
            });
            metrics.memory = MessageField::some(MemoryStat {
                usage: MessageField::some(MemoryEntry {
                    usage: s.memory_usage,
                    limit: s.memory_limit,
                    max: s.memory_max_usage,
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
        let any = containerd_shim::util::convert_to_any(Box::new(metrics))
            .map_err(|e| err(Code::INTERNAL, e.to_string()))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let pod = self.inner.pod.lock().await;
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: pod.vm_pid(),
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        let mut pod = self.inner.pod.lock().await;
        if !pod.containers.is_empty() {
            return Ok(api::Empty::default());
        }
        pod.destroy_vm().await;
        self.inner.exit.signal();
        Ok(api::Empty::default())
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let pod = self.inner.pod.lock().await;
        let c = pod
            .containers
            .get(&req.id)
            .ok_or_else(|| not_found("container", &req.id))?;
        let p = c
            .process(&req.exec_id)
            .ok_or_else(|| not_found("exec", &req.exec_id))?;
        let e = p.exited();
        Ok(api::StateResponse {
            id: req.id.clone(),
            bundle: c.bundle.to_string_lossy().into_owned(),
            pid: pod.vm_pid(),
            status: state_of(p.state).into(),
            stdin: p.stdin.clone(),
            stdout: p.stdout.clone(),
            stderr: p.stderr.clone(),
            terminal: p.terminal,
            exit_status: e.map(|e| e.code).unwrap_or(0),
            exited_at: match e {
                Some(e) => MessageField::some(e.timestamp()),
                None => MessageField::none(),
            },
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }
}

impl Service {
    async fn set_paused(&self, id: &str, paused: bool) -> TtrpcResult<api::Empty> {
        let mut pod = self.inner.pod.lock().await;
        let client = Self::agent(&pod);
        let c = pod
            .containers
            .get_mut(id)
            .ok_or_else(|| not_found("container", id))?;
        let (from, to) = if paused {
            (State::Running, State::Paused)
        } else {
            (State::Paused, State::Running)
        };
        if c.init.state != from {
            return Err(err(
                Code::FAILED_PRECONDITION,
                format!(
                    "container {id} is not {}",
                    if paused { "running" } else { "paused" }
                ),
            ));
        }
        if c.in_guest() {
            let mut client = client?;
            let req = ContainerRequest {
                container_id: id.into(),
            };
            let r = if paused {
                client.pause_container(req).await
            } else {
                client.resume_container(req).await
            };
            r.map_err(agent_err(if paused { "pausing" } else { "resuming" }))?;
        }
        c.init.state = to;
        drop(pod);
        let event: Box<dyn MessageDyn> = if paused {
            Box::new(TaskPaused {
                container_id: id.into(),
                ..Default::default()
            })
        } else {
            Box::new(TaskResumed {
                container_id: id.into(),
                ..Default::default()
            })
        };
        let topic = if paused {
            topics::TASK_PAUSED_EVENT_TOPIC
        } else {
            topics::TASK_RESUMED_EVENT_TOPIC
        };
        self.publish(topic, event).await;
        Ok(api::Empty::default())
    }
}
