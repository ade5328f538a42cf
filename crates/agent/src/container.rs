//! The agent's table of containers and their processes.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::reaper::{Exit, ExitWatch};
use crate::spawn::{Namespaces, Spawned};
use crate::stdio::HostEnds;

/// One process the agent started: a container's first process or an exec.
pub struct Process {
    /// Signals go through this, never to a pid that may have been recycled.
    pub pidfd: std::os::fd::OwnedFd,
    pub exit: ExitWatch,
    pub io: HostEnds,
    /// Until StartContainer: the forked process, held before exec.
    pub held: Mutex<Option<Spawned>>,
    /// Its pid, in the agent's pid namespace (for /proc; signals go by pidfd).
    pub pid: i32,
    /// When a container's first process exec'd (StartContainer).
    pub started: std::sync::OnceLock<std::time::Instant>,
}

impl Process {
    pub fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    pub fn take_output(&self, stderr: bool) -> Option<File> {
        let slot = if stderr {
            &self.io.stderr
        } else {
            &self.io.stdout
        };
        slot.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Gives back what `take_output` took, for the next reader.
    pub fn put_output(&self, stderr: bool, file: File) {
        let slot = if stderr {
            &self.io.stderr
        } else {
            &self.io.stdout
        };
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(file);
    }
}

pub struct Container {
    pub init: Arc<Process>,
    /// The first process's namespaces, for execs.
    pub ns: Arc<Namespaces>,
    pub execs: Mutex<HashMap<String, Arc<Process>>>,
    pub cgroup: PathBuf,
    /// Where the container's root (9p) and its devpts instance are mounted.
    pub dir: PathBuf,
}

impl Container {
    pub fn devpts(&self) -> PathBuf {
        self.dir.join("pts")
    }

    pub fn process(&self, exec_id: &str) -> Option<Arc<Process>> {
        if exec_id.is_empty() {
            return Some(Arc::clone(&self.init));
        }
        self.execs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(exec_id)
            .cloned()
    }
}

#[derive(Default)]
pub struct Table {
    pub containers: Mutex<HashMap<String, Arc<Container>>>,
    /// Ids of containers being created: taken before any work, so two
    /// creates of one id never touch the same mounts.
    creating: Mutex<HashSet<String>>,
}

impl Table {
    pub fn get(&self, id: &str) -> Option<Arc<Container>> {
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    /// Reserves `id`; false if it exists or is being created.
    pub fn reserve(&self, id: &str) -> bool {
        let containers = self.containers.lock().unwrap_or_else(|e| e.into_inner());
        let mut creating = self.creating.lock().unwrap_or_else(|e| e.into_inner());
        !containers.contains_key(id) && creating.insert(id.to_string())
    }

    /// Turns a reservation into a container.
    pub fn commit(&self, id: &str, c: Container) {
        let mut containers = self.containers.lock().unwrap_or_else(|e| e.into_inner());
        containers.insert(id.to_string(), Arc::new(c));
        self.creating
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    pub fn release(&self, id: &str) {
        self.creating
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }
}

/// Where the agent mounts a container's filesystems.
pub fn dir(container_id: &str) -> PathBuf {
    PathBuf::from("/run/podvisor/containers").join(container_id)
}
