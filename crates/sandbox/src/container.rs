//! OCI containers on disk: `ROOT/containers/<id>/` outlives every runtime
//! process, so each verb works from a new process. The record is written once
//! the container exists; the status is derived from marker files and from
//! whether the holder (the process `state` reports as pid) still lives.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("container with id exists: {0}")]
    Exists(String),
    #[error("container \"{0}\" does not exist")]
    NotFound(String),
    #[error("invalid container id {0:?}: use letters, digits, '-', '_' and '.'")]
    InvalidId(String),
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("state of container {id}")]
    Corrupt {
        id: String,
        #[source]
        source: serde_json::Error,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Creating,
    Created,
    Running,
    Paused,
    Stopped,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Creating => "creating",
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        }
    }
}

/// What `create` records once the container exists.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct Record {
    pub id: String,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    /// The holder: host process that stands for the container's process.
    pub pid: i32,
    /// Its start time (clock ticks since boot), so a recycled pid is never
    /// mistaken for it.
    pub pid_start: u64,
    /// RFC 3339.
    pub created: String,
    pub owner: String,
    pub annotations: BTreeMap<String, String>,
    /// Network namespace the container joined (its taps live there).
    pub netns: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct ExitRecord {
    pub code: i32,
    pub signal: u32,
}

/// The OCI state JSON (`runc state`).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OciState {
    pub oci_version: String,
    pub id: String,
    pub status: String,
    pub pid: i32,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    pub created: String,
    pub owner: String,
    pub annotations: BTreeMap<String, String>,
}

pub const OCI_VERSION: &str = "1.0.2";

pub struct ContainerDir {
    pub id: String,
    pub path: PathBuf,
}

fn containers(root: &Path) -> PathBuf {
    root.join("containers")
}

pub fn valid_id(id: &str) -> Result<(), ContainerError> {
    if agent_proto::valid_id(id) {
        Ok(())
    } else {
        Err(ContainerError::InvalidId(id.into()))
    }
}

/// Start time of `pid` in clock ticks since boot (field 22 of /proc/pid/stat);
/// None if it is gone or a zombie.
pub fn process_start(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    // A zombie has exited: its status only waits for its parent to read it.
    if rest.starts_with('Z') || rest.starts_with('X') {
        return None;
    }
    rest.split(' ').nth(19)?.parse().ok()
}

impl ContainerDir {
    /// Claims `id` (fails if a container of that id exists).
    pub fn create(root: &Path, id: &str) -> Result<ContainerDir, ContainerError> {
        valid_id(id)?;
        let parent = containers(root);
        fs::create_dir_all(&parent).map_err(|source| ContainerError::Io {
            what: "creating",
            path: parent.clone(),
            source,
        })?;
        let path = parent.join(id);
        match fs::create_dir(&path) {
            Ok(()) => Ok(ContainerDir {
                id: id.into(),
                path,
            }),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                Err(ContainerError::Exists(id.into()))
            }
            Err(source) => Err(ContainerError::Io {
                what: "creating",
                path,
                source,
            }),
        }
    }

    pub fn open(root: &Path, id: &str) -> Result<ContainerDir, ContainerError> {
        valid_id(id).map_err(|_| ContainerError::NotFound(id.into()))?;
        let path = containers(root).join(id);
        if !path.is_dir() {
            return Err(ContainerError::NotFound(id.into()));
        }
        Ok(ContainerDir {
            id: id.into(),
            path,
        })
    }

    pub fn list(root: &Path) -> Vec<ContainerDir> {
        let mut out: Vec<_> = fs::read_dir(containers(root))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| ContainerDir {
                id: e.file_name().to_string_lossy().into_owned(),
                path: e.path(),
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// The id of the sandbox (VM) of this container: short, because Unix
    /// socket paths in its directory must stay under 108 bytes whatever the
    /// container id (docker's are 64 characters).
    pub fn sandbox_id(&self) -> String {
        short_id('c', &self.id)
    }

    /// The agent proxy the holder serves, in its sandbox's directory.
    pub fn proxy_socket(&self) -> PathBuf {
        let root = self
            .path
            .parent()
            .and_then(Path::parent)
            .unwrap_or(Path::new("/"));
        crate::state::sandbox_dir(root, &self.sandbox_id()).join("proxy.sock")
    }

    /// Where the container's host files are gathered for the VM.
    pub fn share(&self) -> PathBuf {
        self.file("share")
    }

    fn write_atomic(&self, name: &str, data: &[u8]) -> Result<(), ContainerError> {
        let tmp = self.file(&format!(".{name}.tmp"));
        let io = |source| ContainerError::Io {
            what: "writing",
            path: self.file(name),
            source,
        };
        fs::write(&tmp, data).map_err(io)?;
        fs::rename(&tmp, self.file(name)).map_err(io)
    }

    pub fn write_record(&self, r: &Record) -> Result<(), ContainerError> {
        let json = serde_json::to_vec_pretty(r).map_err(|source| ContainerError::Corrupt {
            id: self.id.clone(),
            source,
        })?;
        self.write_atomic("state.json", &json)
    }

    /// None while the container is still being created.
    pub fn record(&self) -> Result<Option<Record>, ContainerError> {
        let path = self.file("state.json");
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(ContainerError::Io {
                    what: "reading",
                    path,
                    source,
                })
            }
        };
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|source| ContainerError::Corrupt {
                id: self.id.clone(),
                source,
            })
    }

    /// Records the holder while it creates the container (before the full
    /// record exists), so `delete --force` can stop a creation midway.
    pub fn write_creator(&self, pid: i32) -> Result<(), ContainerError> {
        let r = Record {
            id: self.id.clone(),
            pid,
            pid_start: process_start(pid).unwrap_or(0),
            ..Default::default()
        };
        let json = serde_json::to_vec(&r).unwrap_or_default();
        self.write_atomic("creator.json", &json)
    }

    pub fn creator(&self) -> Option<Record> {
        serde_json::from_slice(&fs::read(self.file("creator.json")).ok()?).ok()
    }

    pub fn set_marker(&self, name: &str, on: bool) -> Result<(), ContainerError> {
        if on {
            self.write_atomic(name, b"")
        } else {
            match fs::remove_file(self.file(name)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(ContainerError::Io {
                    what: "removing",
                    path: self.file(name),
                    source: e,
                }),
                _ => Ok(()),
            }
        }
    }

    fn marker(&self, name: &str) -> bool {
        self.file(name).exists()
    }

    pub fn write_exit(&self, e: ExitRecord) -> Result<(), ContainerError> {
        let json = serde_json::to_vec(&e).unwrap_or_default();
        self.write_atomic("exit.json", &json)
    }

    pub fn exit(&self) -> Option<ExitRecord> {
        serde_json::from_slice(&fs::read(self.file("exit.json")).ok()?).ok()
    }

    /// Whether the holder of `r` still runs.
    pub fn holder_alive(r: &Record) -> bool {
        r.pid > 0 && process_start(r.pid) == Some(r.pid_start)
    }

    pub fn status(&self, record: Option<&Record>) -> Status {
        let Some(r) = record else {
            return Status::Creating;
        };
        if !Self::holder_alive(r) || self.exit().is_some() {
            return Status::Stopped;
        }
        if self.marker("paused") {
            Status::Paused
        } else if self.marker("started") {
            Status::Running
        } else {
            Status::Created
        }
    }

    pub fn oci_state(&self) -> Result<OciState, ContainerError> {
        let record = self.record()?;
        let status = self.status(record.as_ref());
        let r = record.unwrap_or_default();
        Ok(OciState {
            oci_version: OCI_VERSION.into(),
            id: self.id.clone(),
            status: status.as_str().into(),
            pid: if status == Status::Stopped { 0 } else { r.pid },
            bundle: r.bundle,
            rootfs: r.rootfs,
            created: r.created,
            owner: r.owner,
            annotations: r.annotations,
        })
    }

    /// Removes the directory. The share's binds live only in the holder's
    /// mount namespace: here they are empty files and directories.
    pub fn remove(self) -> Result<(), ContainerError> {
        fs::remove_dir_all(&self.path).map_err(|source| ContainerError::Io {
            what: "removing",
            path: self.path.clone(),
            source,
        })
    }
}

/// RFC 3339 in UTC with nanoseconds, as runc writes `created`.
/// A short, fixed-length name for `id` (socket paths must stay under 108
/// bytes): `prefix` and 15 hex digits of its FNV-1a hash, the same from every
/// build of podvisor (std's DefaultHasher may change between Rust releases).
pub fn short_id(prefix: char, id: &str) -> String {
    let h = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{prefix}{:015x}", h >> 4)
}

pub fn rfc3339_now() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_nanos()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_of_self_and_ids() {
        let me = std::process::id() as i32;
        assert!(process_start(me).is_some());
        assert!(valid_id("abc-1_2.x").is_ok());
        for bad in ["", "..", "a/b", "a b"] {
            assert!(valid_id(bad).is_err(), "{bad:?}");
        }
        let t = rfc3339_now();
        assert_eq!(t.len(), 30, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z'));
    }
}
