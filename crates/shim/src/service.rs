//! The task service containerd calls, and the shim's start and delete.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
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
use sandbox::SandboxConfig;
use tokio::sync::Mutex;

use crate::pod::{Container, Exit, Kind, Pod, Process, State, Vm};

mod create;

use create::Target;

/// The 9p tag of the pod's share (a template's, so that a clone's device
/// matches); each container's root is `<id>/rootfs` in it.
const SHARE_TAG: &str = sandbox::template::ROOTFS_TAG;

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
    let root = std::env::var_os("PODVISOR_ROOT")
        .filter(|r| !r.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(sandbox::state::DEFAULT_ROOT));
    // Canonical: mount points are matched against the mount table's paths.
    let _ = std::fs::create_dir_all(&root);
    root.canonicalize().unwrap_or(root)
}

/// The pod's name on the host: its containerd namespace and id, hashed.
fn pod_key(namespace: &str, pod_id: &str) -> String {
    short_id('p', &format!("{namespace}/{pod_id}"))
}

/// Where a pod's share lives on the host.
fn pod_dir(key: &str) -> PathBuf {
    root().join("pods").join(key)
}

fn err(code: Code, msg: impl ToString) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg))
}

fn not_found(what: &str, id: &str) -> ttrpc::Error {
    err(Code::NOT_FOUND, format!("{what} {id} not found"))
}

fn container<'a>(pod: &'a Pod, id: &str) -> TtrpcResult<&'a Container> {
    pod.containers
        .get(id)
        .ok_or_else(|| not_found("container", id))
}

fn container_mut<'a>(pod: &'a mut Pod, id: &str) -> TtrpcResult<&'a mut Container> {
    pod.containers
        .get_mut(id)
        .ok_or_else(|| not_found("container", id))
}

impl Container {
    /// The init process ("") or an exec, or NotFound.
    fn process_or_err(&self, exec_id: &str) -> TtrpcResult<&Process> {
        self.process(exec_id)
            .ok_or_else(|| not_found("exec", exec_id))
    }

    fn process_mut_or_err(&mut self, exec_id: &str) -> TtrpcResult<&mut Process> {
        self.process_mut(exec_id)
            .ok_or_else(|| not_found("exec", exec_id))
    }
}

/// An agent error as containerd takes it: the gRPC code kept (containerd
/// treats NotFound as "already gone"), the message said in context.
fn agent_err(what: &str) -> impl Fn(tonic::Status) -> ttrpc::Error + '_ {
    move |s| {
        let code = match s.code() {
            tonic::Code::NotFound => Code::NOT_FOUND,
            tonic::Code::InvalidArgument => Code::INVALID_ARGUMENT,
            tonic::Code::FailedPrecondition => Code::FAILED_PRECONDITION,
            tonic::Code::AlreadyExists => Code::ALREADY_EXISTS,
            tonic::Code::Unimplemented => Code::UNIMPLEMENTED,
            tonic::Code::DeadlineExceeded => Code::DEADLINE_EXCEEDED,
            _ => Code::UNKNOWN,
        };
        err(code, format!("{what}: {}", s.message()))
    }
}

/// How long one agent call may take before the shim gives up on it.
const AGENT_CALL: std::time::Duration = std::time::Duration::from_secs(30);

/// An agent call bounded by AGENT_CALL.
async fn bounded<T>(
    what: &str,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> TtrpcResult<T> {
    match tokio::time::timeout(AGENT_CALL, call).await {
        Ok(r) => r.map(tonic::Response::into_inner).map_err(agent_err(what)),
        Err(_) => Err(err(
            Code::DEADLINE_EXCEEDED,
            format!("{what}: the guest did not answer within {AGENT_CALL:?}"),
        )),
    }
}

#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    exit: Arc<ExitSignal>,
    namespace: String,
    /// QEMU's pid, readable without the pod's lock (`connect`).
    vm_pid: AtomicU32,
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
            let mut failures = 0;
            let code = loop {
                let waited = client
                    .clone()
                    .wait_process(ProcessRequest {
                        container_id: cid.clone(),
                        exec_id: eid.clone(),
                    })
                    .await;
                match waited {
                    Ok(r) => break r.into_inner().exit_code.clamp(0, 255) as u32,
                    Err(s) => {
                        // A broken call is not a dead process: ask again
                        // while the VM lives.
                        failures += 1;
                        let vm_alive = {
                            let mut pod = this.inner.pod.lock().await;
                            pod.vm
                                .as_mut()
                                .is_some_and(|v| v.sandbox.vm_exit().is_none())
                        };
                        if !vm_alive || failures > 20 || s.code() == tonic::Code::NotFound {
                            tracing::warn!(container = %cid, exec = %eid, "lost the process: {}", s.message());
                            break 128 + libc::SIGKILL as u32;
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    }
                }
            };
            // The exit's time is now, whatever the drain takes.
            let e = Exit::now(code);
            let relays = {
                let mut pod = this.inner.pod.lock().await;
                pod.containers
                    .get_mut(&cid)
                    .and_then(|c| c.process_mut(&eid))
                    .and_then(|p| {
                        p.ended = true;
                        p.relays.take()
                    })
            };
            if eid.is_empty() {
                this.report_oom(client.clone(), &cid).await;
            }
            if let Some(r) = relays {
                r.finish().await;
            }
            this.exited(&cid, &eid, pid, e).await;
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

    async fn exited(&self, cid: &str, eid: &str, pid: u32, e: Exit) {
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

    /// Watches the VM itself: if QEMU dies, every process of the pod that
    /// has not exited yet (the sandbox task, created tasks and execs too)
    /// exits with 137.
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
                let vm = this.take_vm(&mut pod);
                let exits = pod.end_all(Exit::now(128 + libc::SIGKILL as u32));
                drop(pod);
                if let Some(vm) = vm {
                    vm.destroy().await;
                }
                for (cid, eid, e) in exits {
                    this.publish_exit(&cid, &eid, pid, e).await;
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
                vm_pid: AtomicU32::new(0),
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
        sandbox::share::unmount_all(&bundle.join("rootfs"));
        if let Ok(spec) = Spec::load(&bundle) {
            let id = bundle
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            // The pod's own task (not a member's, whose pod lives on):
            // containerd gave up on its shim, so nothing of it may stay.
            if Kind::of(&id, &spec).boots_vm() {
                let dir = pod_dir(&pod_key(&self.inner.namespace, &id));
                let shim = std::fs::read_to_string(dir.join("shim.pid"))
                    .ok()
                    .and_then(|p| p.trim().parse::<i32>().ok())
                    // Not a zombie either: a dead shim may wait to be reaped.
                    .filter(|p| sandbox::container::process_start(*p).is_some())
                    .filter(|p| is_our_shim(*p));
                if let Some(pid) = shim {
                    tracing::warn!(
                        pid,
                        "killing the pod's unresponsive shim (its VM dies with it)"
                    );
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    for _ in 0..50 {
                        if sandbox::container::process_start(pid).is_none() {
                            break;
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
                // Its mounts were in its own mount namespace: gone with it.
                sandbox::share::remove_unmounted(&dir);
            }
        }
        let collected = sandbox::state::collect_garbage(&root());
        if !collected.is_empty() {
            tracing::info!(?collected, "removed the state of dead sandboxes");
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

/// Whether `pid` runs this same shim binary.
fn is_our_shim(pid: i32) -> bool {
    let exe = |p: &str| std::fs::read_link(p).ok();
    exe(&format!("/proc/{pid}/exe")).is_some_and(|e| Some(e) == exe("/proc/self/exe"))
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
        let (pid, client, stdio, spec) = {
            let mut pod = self.inner.pod.lock().await;
            let pid = pod.vm_pid();
            let client = Self::agent(&pod);
            let c = container_mut(&mut pod, &req.id)?;
            let sandbox = c.kind == Kind::Sandbox;
            let p = c.process_mut_or_err(&req.exec_id)?;
            if p.state != State::Created || p.busy {
                return Err(err(
                    Code::FAILED_PRECONDITION,
                    format!("{} is not in the created state", req.id),
                ));
            }
            let client = match req.exec_id.is_empty() && sandbox {
                true => None,
                false => Some(client?),
            };
            match client {
                // The sandbox task has no process: started here.
                None => p.state = State::Running,
                Some(_) => p.busy = true,
            }
            let stdio = (p.stdin.clone(), p.stdout.clone(), p.stderr.clone());
            (pid, client, stdio, p.spec.clone())
        };
        let started = match &client {
            None => Ok(None),
            Some(client) => self
                .start_in_guest(&req, client.clone(), stdio, spec)
                .await
                .map(Some),
        };
        {
            let mut pod = self.inner.pod.lock().await;
            let p = pod
                .containers
                .get_mut(&req.id)
                .and_then(|c| c.process_mut(&req.exec_id));
            match (p, started) {
                (Some(p), Ok(relays)) => {
                    p.busy = false;
                    if p.state == State::Created {
                        p.state = State::Running;
                    }
                    p.spec = None;
                    if let Some(r) = relays.flatten() {
                        p.close_stdin = Some(r.close_stdin.clone());
                        p.relays = Some(r);
                    }
                }
                (Some(p), Err(e)) => {
                    p.busy = false;
                    return Err(e);
                }
                // Deleted meanwhile: its start went through or not.
                (None, r) => {
                    r?;
                }
            }
        }
        let Some(client) = client else {
            self.publish_start(&req.id, pid).await;
            return Ok(api::StartResponse {
                pid,
                ..Default::default()
            });
        };
        if req.exec_id.is_empty() {
            // Started before its exit can be: the watcher comes after.
            self.publish_start(&req.id, pid).await;
            self.watch(client, req.id.clone(), String::new(), pid);
        } else {
            self.watch(client, req.id.clone(), req.exec_id.clone(), pid);
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
        let generation = pod.generation;
        let client = Self::agent(&pod).ok();
        let c = container_mut(&mut pod, &req.id)?;
        let p = c.process_or_err(&req.exec_id)?;
        if matches!(p.state, State::Running | State::Paused) || p.busy {
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
            drop(pod);
            if let Some(mut client) = client {
                let request = ProcessRequest {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                };
                let _ = bounded("forgetting the exec", client.remove_process(request)).await;
            }
            return Ok(response);
        }
        // Execs die with the container; those not yet reported are now.
        let mut ended = Vec::new();
        for (eid, p) in c.execs.iter_mut() {
            let e = Exit::now(128 + libc::SIGKILL as u32);
            if p.set_exit(e) {
                ended.push((eid.clone(), e));
            }
        }
        let mut c = pod.containers.remove(&req.id).expect("looked up above");
        // The pod's own container ends its VM: taken out now, destroyed
        // once the guest was told and the lock let go.
        let vm = match c.kind.boots_vm() {
            true => self.take_vm(&mut pod),
            false => None,
        };
        drop(pod);
        if let (true, Some(mut client)) = (c.in_guest(), client) {
            let request = ContainerRequest {
                container_id: req.id.clone(),
            };
            let _ = bounded("removing the container", client.remove_container(request)).await;
        }
        match &vm {
            Some(vm) => c.unmount(Some(vm)),
            None => self.unmount(&mut c, &Target::Pod(generation)).await,
        }
        if let Some(vm) = vm {
            vm.destroy().await;
        }
        for (eid, e) in ended {
            self.publish_exit(&req.id, &eid, pid, e).await;
        }
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
        let (client, vm_pid) = {
            let pod = self.inner.pod.lock().await;
            let c = container(&pod, &req.id)?;
            let client = if c.in_guest() {
                Some(Self::agent(&pod)?)
            } else {
                None
            };
            (client, pod.vm_pid())
        };
        let pids = match client {
            Some(mut client) => {
                let request = ContainerRequest {
                    container_id: req.id.clone(),
                };
                bounded("listing the processes", client.list_processes(request))
                    .await?
                    .pids
            }
            None => vec![vm_pid],
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
        let c = container_mut(&mut pod, &req.id)?;
        let kind = c.kind.clone();
        let p = c.process_mut_or_err(&req.exec_id)?;
        if p.state == State::Stopped || p.ended {
            return Err(err(Code::NOT_FOUND, "process already finished"));
        }
        // Nothing runs yet (or, for the sandbox, ever): the task ends here.
        let ends_here = p.state == State::Created || kind == Kind::Sandbox;
        if !ends_here {
            let request = SignalProcessRequest {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                signal: req.signal,
                // "all" is the container's; an exec is one process.
                all: req.all && req.exec_id.is_empty(),
            };
            let mut client = client?;
            drop(pod);
            bounded("signalling the process", client.signal_process(request)).await?;
            return Ok(api::Empty::default());
        }
        let ends = req.signal == libc::SIGKILL as u32
            || req.signal == libc::SIGTERM as u32
            || req.signal == libc::SIGINT as u32;
        if !ends {
            return Ok(api::Empty::default());
        }
        let e = Exit::now(signal_exit(req.signal));
        let mut exits = Vec::new();
        if kind != Kind::Sandbox {
            if p.set_exit(e) {
                exits.push((req.id.clone(), req.exec_id.clone(), e));
            }
            drop(pod);
        } else {
            // The pod is over: its VM goes, and with it anything still
            // running in it. The exits are recorded once it is gone: a
            // waiter told earlier would delete the pod and end the shim
            // under the teardown.
            let vm = self.take_vm(&mut pod);
            drop(pod);
            if let Some(vm) = vm {
                vm.destroy().await;
            }
            let mut pod = self.inner.pod.lock().await;
            if let Some(p) = pod
                .containers
                .get_mut(&req.id)
                .and_then(|c| c.process_mut(&req.exec_id))
            {
                if p.set_exit(e) {
                    exits.push((req.id.clone(), req.exec_id.clone(), e));
                }
            }
            exits.extend(pod.end_all(Exit::now(128 + libc::SIGKILL as u32)));
        }
        for (cid, eid, e) in exits {
            self.publish_exit(&cid, &eid, pid, e).await;
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
        let c = container_mut(&mut pod, &req.id)?;
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
        // An exec runs under its container's seccomp filter, as on runc.
        Spec::load(&c.bundle)
            .and_then(|s| s.apply_seccomp(&mut process))
            .map_err(|e| err(Code::INVALID_ARGUMENT, format!("container spec: {e}")))?;
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
        let mut client = {
            let pod = self.inner.pod.lock().await;
            if !pod.containers.contains_key(&req.id) {
                return Err(not_found("container", &req.id));
            }
            Self::agent(&pod)?
        };
        let request = ResizeTtyRequest {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            rows: req.height,
            cols: req.width,
        };
        bounded("resizing the terminal", client.resize_tty(request)).await?;
        Ok(api::Empty::default())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        let pod = self.inner.pod.lock().await;
        let p = container(&pod, &req.id)?.process_or_err(&req.exec_id)?;
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
        let mut client = {
            let pod = self.inner.pod.lock().await;
            let c = container(&pod, &req.id)?;
            if !c.in_guest() {
                // The pod's limits size the VM; they cannot change after boot.
                return Ok(api::Empty::default());
            }
            Self::agent(&pod)?
        };
        let request = UpdateContainerRequest {
            container_id: req.id.clone(),
            resources: Some(resources.to_agent()),
        };
        bounded("updating the container", client.update_container(request)).await?;
        Ok(api::Empty::default())
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let mut exit = {
            let pod = self.inner.pod.lock().await;
            container(&pod, &req.id)?
                .process_or_err(&req.exec_id)?
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
        let client = {
            let pod = self.inner.pod.lock().await;
            let c = container(&pod, &req.id)?;
            if c.in_guest() {
                Some(Self::agent(&pod)?)
            } else {
                None
            }
        };
        let mut metrics = Metrics::default();
        if let Some(mut client) = client {
            let request = ContainerRequest {
                container_id: req.id.clone(),
            };
            let s = bounded(
                "reading the container's cgroup",
                client.stats_container(request),
            )
            .await?;
            metrics.pids = MessageField::some(PidsStat {
                current: s.pids_current,
                limit: s.pids_limit,
                ..Default::default()
            });
            metrics.cpu = MessageField::some(CPUStat {
                usage: MessageField::some(CPUUsage {
                    total: s.cpu_usage_usec.saturating_mul(1000),
                    user: s.cpu_user_usec.saturating_mul(1000),
                    kernel: s.cpu_system_usec.saturating_mul(1000),
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
        // Without the pod's lock: containerd reconnecting after a restart
        // gives up on a shim that does not answer within seconds.
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: self.inner.vm_pid.load(Ordering::Relaxed),
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        let vm = {
            let mut pod = self.inner.pod.lock().await;
            if !pod.idle() {
                return Ok(api::Empty::default());
            }
            self.take_vm(&mut pod)
        };
        if let Some(vm) = vm {
            vm.destroy().await;
        }
        self.inner.exit.signal();
        Ok(api::Empty::default())
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let pod = self.inner.pod.lock().await;
        let c = container(&pod, &req.id)?;
        let p = c.process_or_err(&req.exec_id)?;
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
    /// Takes the VM out of the pod, to be destroyed once the lock is let go.
    fn take_vm(&self, pod: &mut Pod) -> Option<Vm> {
        self.inner.vm_pid.store(0, Ordering::Relaxed);
        pod.vm.take()
    }

    async fn publish_start(&self, id: &str, pid: u32) {
        self.publish(
            topics::TASK_START_EVENT_TOPIC,
            Box::new(TaskStart {
                container_id: id.into(),
                pid,
                ..Default::default()
            }),
        )
        .await;
    }

    /// Starts a container's init (`exec` empty) or an exec in the guest,
    /// without the pod's lock; an exec's stdio starts relaying.
    async fn start_in_guest(
        &self,
        req: &api::StartRequest,
        mut client: AgentClient,
        (stdin, stdout, stderr): (String, String, String),
        spec: Option<agent_proto::Process>,
    ) -> TtrpcResult<Option<crate::io::Relays>> {
        if req.exec_id.is_empty() {
            let request = ContainerRequest {
                container_id: req.id.clone(),
            };
            bounded("starting the container", client.start_container(request)).await?;
            return Ok(None);
        }
        // Opened first: a bad path fails the start, not a running process.
        let stdio = crate::io::Stdio::open(&stdin, &stdout, &stderr).map_err(|e| {
            err(
                Code::INVALID_ARGUMENT,
                format!("opening the exec's stdio: {e}"),
            )
        })?;
        let request = AgentExec {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            process: spec,
        };
        bounded("starting the exec", client.exec_process(request)).await?;
        Ok(Some(stdio.relay(&client, &req.id, &req.exec_id)))
    }

    async fn set_paused(&self, id: &str, paused: bool) -> TtrpcResult<api::Empty> {
        let (from, to) = if paused {
            (State::Running, State::Paused)
        } else {
            (State::Paused, State::Running)
        };
        let client = {
            let mut pod = self.inner.pod.lock().await;
            let client = Self::agent(&pod);
            let c = container_mut(&mut pod, id)?;
            if c.init.state != from || c.init.busy {
                return Err(err(
                    Code::FAILED_PRECONDITION,
                    format!(
                        "container {id} is not {}",
                        if paused { "running" } else { "paused" }
                    ),
                ));
            }
            if !c.in_guest() {
                c.init.state = to;
                None
            } else {
                let client = client?;
                c.init.busy = true;
                Some(client)
            }
        };
        if let Some(mut client) = client {
            let req = ContainerRequest {
                container_id: id.into(),
            };
            let done = if paused {
                bounded("pausing", client.pause_container(req)).await
            } else {
                bounded("resuming", client.resume_container(req)).await
            };
            let mut pod = self.inner.pod.lock().await;
            if let Some(c) = pod.containers.get_mut(id) {
                c.init.busy = false;
                if done.is_ok() && c.init.state == from {
                    c.init.state = to;
                }
            }
            done?;
        }
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
