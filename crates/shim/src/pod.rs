//! What one shim holds: the pod's VM and the containers (tasks) in it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use sandbox::network::Network;
use sandbox::oci::{Spec, CRI_CONTAINER_TYPE, CRI_SANDBOX_ID};
use sandbox::Sandbox;
use tokio::sync::{watch, Notify};

use crate::io::Relays;

/// What a container is to the pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// CRI's sandbox ("pause") container: the VM itself, no process.
    Sandbox,
    /// A CRI container of the pod whose sandbox has this id.
    Member(String),
    /// A container outside Kubernetes (`ctr run`): a pod of its own.
    Alone,
}

impl Kind {
    pub fn of(id: &str, spec: &Spec) -> Kind {
        let a = &spec.annotations;
        match a.get(CRI_CONTAINER_TYPE).map(String::as_str) {
            Some("sandbox") => Kind::Sandbox,
            Some(_) => match a.get(CRI_SANDBOX_ID) {
                Some(s) if s != id => Kind::Member(s.clone()),
                _ => Kind::Alone,
            },
            None => Kind::Alone,
        }
    }

    /// Whether creating this container boots the pod's VM.
    pub fn boots_vm(&self) -> bool {
        !matches!(self, Kind::Member(_))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Created,
    Running,
    Paused,
    Stopped,
}

#[derive(Clone, Copy, Debug)]
pub struct Exit {
    pub code: u32,
    pub secs: i64,
    pub nanos: i32,
}

impl Exit {
    pub fn now(code: u32) -> Exit {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Exit {
            code,
            secs: d.as_secs() as i64,
            nanos: d.subsec_nanos() as i32,
        }
    }

    pub fn timestamp(&self) -> Timestamp {
        Timestamp {
            seconds: self.secs,
            nanos: self.nanos,
            ..Default::default()
        }
    }
}

/// A container's init process or one exec.
pub struct Process {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
    pub state: State,
    /// The guest said the process ended (its exit is reported once its
    /// output has drained): signals no longer reach it.
    pub ended: bool,
    /// None until the process's exit is reported.
    pub exit: Arc<watch::Sender<Option<Exit>>>,
    /// Closes the process's stdin (containerd's CloseIO).
    pub close_stdin: Option<Arc<Notify>>,
    /// The relays, until the process is waited for.
    pub relays: Option<Relays>,
    /// An exec's process, until it starts.
    pub spec: Option<agent_proto::Process>,
    /// A guest call on its behalf (start, pause, resume) is under way,
    /// made without the pod's lock: no second one may begin.
    pub busy: bool,
}

impl Process {
    pub fn new(stdin: &str, stdout: &str, stderr: &str, terminal: bool) -> Process {
        Process {
            stdin: stdin.into(),
            stdout: stdout.into(),
            stderr: stderr.into(),
            terminal,
            state: State::Created,
            ended: false,
            exit: Arc::new(watch::channel(None).0),
            close_stdin: None,
            relays: None,
            spec: None,
            busy: false,
        }
    }

    pub fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    /// Records the exit once; returns false if it was already recorded.
    pub fn set_exit(&mut self, e: Exit) -> bool {
        self.state = State::Stopped;
        self.exit.send_if_modified(|x| {
            if x.is_some() {
                return false;
            }
            *x = Some(e);
            true
        })
    }
}

pub struct Container {
    pub id: String,
    pub bundle: PathBuf,
    pub kind: Kind,
    /// bundle/rootfs, when we mounted it from containerd's rootfs mounts.
    pub mounted_rootfs: Option<PathBuf>,
    /// The container's directory in the VM's share (its root and binds).
    pub share: Option<PathBuf>,
    /// A pool daemon mounted a copy of `share` in the VM's share.
    pub attached: bool,
    pub init: Process,
    pub execs: HashMap<String, Process>,
}

impl Container {
    pub fn process(&self, exec_id: &str) -> Option<&Process> {
        if exec_id.is_empty() {
            Some(&self.init)
        } else {
            self.execs.get(exec_id)
        }
    }

    pub fn process_mut(&mut self, exec_id: &str) -> Option<&mut Process> {
        if exec_id.is_empty() {
            Some(&mut self.init)
        } else {
            self.execs.get_mut(exec_id)
        }
    }

    /// Records `e` as the exit of its processes not yet exited (execs first).
    pub fn end_all(&mut self, e: Exit) -> Vec<(String, String, Exit)> {
        let mut ended = Vec::new();
        for (eid, p) in self.execs.iter_mut() {
            if p.set_exit(e) {
                ended.push((self.id.clone(), eid.clone(), e));
            }
        }
        if self.init.set_exit(e) {
            ended.push((self.id.clone(), String::new(), e));
        }
        ended
    }

    /// Whether the guest knows this container (the sandbox one it does not).
    pub fn in_guest(&self) -> bool {
        self.kind != Kind::Sandbox
    }

    /// Unmounts what we mounted for it (on the host side), and has the pool
    /// daemon owning `vm` unmount its copy.
    pub fn unmount(&mut self, vm: Option<&Vm>) {
        if std::mem::take(&mut self.attached) {
            if let Some(vm) = vm {
                if let Err(e) = vm.sandbox.detach(&self.id) {
                    tracing::warn!(container = %self.id, "{e}");
                }
            }
        }
        if let Some(dir) = self.share.take() {
            sandbox::share::unmount_all(&dir);
            sandbox::share::remove_unmounted(&dir);
        }
        if let Some(root) = self.mounted_rootfs.take() {
            sandbox::share::unmount_all(&root);
        }
    }
}

/// The pod's VM.
pub struct Vm {
    pub sandbox: Sandbox,
    pub network: Option<Network>,
    /// The host directory the guest sees as its share.
    pub share: PathBuf,
    pub pid: u32,
}

impl Vm {
    /// Powers the VM off and removes its share. Called without the pod's
    /// lock: the guest is asked to shut down first.
    pub async fn destroy(self) {
        tracing::info!(pid = self.pid, "tearing the pod's VM down");
        self.sandbox.destroy().await;
        drop(self.network);
        sandbox::share::unmount_all(&self.share);
        if let Some(parent) = self.share.parent() {
            sandbox::share::remove_unmounted(parent);
        }
    }
}

/// What the pod's lock guards. It is never held across a guest call or a
/// boot: a verb takes what it needs (an agent client, the VM itself when it
/// ends it), marks what is under way, and calls without it.
#[derive(Default)]
pub struct Pod {
    pub vm: Option<Vm>,
    /// Counts the VMs this pod had: a call that let go of the lock knows
    /// whether the VM it started with is still the pod's.
    pub generation: u64,
    pub containers: HashMap<String, Container>,
    /// Containers being created (their VM booting or their guest side
    /// being made), not yet in `containers`.
    pub creating: std::collections::HashSet<String>,
    /// A create is booting the pod's VM.
    pub booting: bool,
}

impl Pod {
    /// Installs a new VM.
    pub fn install(&mut self, vm: Vm) {
        self.vm = Some(vm);
        self.generation += 1;
    }

    /// Whether nothing is left and nothing is on its way.
    pub fn idle(&self) -> bool {
        self.containers.is_empty() && self.creating.is_empty() && !self.booting
    }

    /// Records `e` as the exit of every process not yet exited; returns
    /// (container, exec, exit) of each, to be reported.
    pub fn end_all(&mut self, e: Exit) -> Vec<(String, String, Exit)> {
        let mut ended = Vec::new();
        for c in self.containers.values_mut() {
            ended.extend(c.end_all(e));
        }
        ended
    }

    pub fn vm_pid(&self) -> u32 {
        self.vm.as_ref().map(|v| v.pid).unwrap_or(0)
    }
}
