//! The agent's table of containers and their processes.

use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use nix::unistd::Pid;

use crate::reaper::{Exit, ExitWatch};
use crate::spawn::Spawned;
use crate::stdio::HostEnds;

/// One process the agent started: a container's first process or an exec.
pub struct Process {
    pub pid: Pid,
    pub exit: ExitWatch,
    pub io: HostEnds,
    /// Until StartContainer: the forked process, held before exec.
    pub held: Mutex<Option<Spawned>>,
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
}

pub struct Container {
    pub init: Arc<Process>,
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
}

impl Table {
    pub fn get(&self, id: &str) -> Option<Arc<Container>> {
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }
}

/// Where the agent mounts a container's filesystems.
pub fn dir(container_id: &str) -> PathBuf {
    PathBuf::from("/run/podvisor/containers").join(container_id)
}
