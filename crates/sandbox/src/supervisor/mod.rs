//! The VM's supervisor: one small process per VM, QEMU's parent, used by
//! every front end. It launches QEMU in its jail, does what the front end
//! asks of the VMM (restore, pause, resume, taps, mounts into the share,
//! stop), and lives exactly as long as its connection: when the last holder
//! of the other end closes it (a front end that exits or is killed), it
//! kills QEMU, removes the jail's uid and cgroups and what it was told to
//! clean, and exits. The connection can be passed on: a pool hands a ready
//! VM over whole by sending it to the caller, so the VM no longer depends
//! on the pool daemon's life.
//!
//! The supervisor is the front end's own binary run again (`serve_if_asked`
//! at the top of its `main`); it detaches from the process that started it
//! so that no one has to reap it.

mod serve;

pub use serve::attach_point;

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hypervisor::VmConfig;
use serde::{Deserialize, Serialize};

use crate::fdmsg;
use crate::SandboxError;

/// The first argument that makes a podvisor binary a supervisor.
const ARG: &str = "--podvisor-vm-supervisor";

/// Set by binaries that call `serve_if_asked`: they can be run again as a
/// supervisor.
static HOSTED: AtomicBool = AtomicBool::new(false);

/// Call first in `main` of every binary that starts VMs: when this process
/// was started as a supervisor, it serves and never returns.
pub fn serve_if_asked() {
    HOSTED.store(true, Ordering::SeqCst);
    // argv: starter, ARG, connection fd, lock fd or "-", VM id, starter pid.
    let args: Vec<std::ffi::OsString> = std::env::args_os().take(4).collect();
    if args.get(1).map(|a| a == ARG) != Some(true) {
        return;
    }
    let fd = |i: usize| -> Option<RawFd> { args.get(i)?.to_str()?.parse().ok() };
    let (Some(conn), lock) = (fd(2), fd(3)) else {
        eprintln!("{ARG}: no connection given");
        std::process::exit(2);
    };
    std::process::exit(serve::main(conn, lock));
}

/// The binary to run as a supervisor: this one when it hosts them, else the
/// `podvisor` next to it (or one directory up: test binaries), else $PATH's.
fn supervisor_binary() -> PathBuf {
    if HOSTED.load(Ordering::SeqCst) {
        return PathBuf::from("/proc/self/exe");
    }
    let me = std::env::current_exe().unwrap_or_default();
    me.ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join("podvisor"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("podvisor"))
}

/// What a front end asks of its supervisor, a JSON line at a time; it waits
/// for each answer before asking more.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum Request {
    /// Start the VMM (the first request, once).
    Launch {
        config: Box<VmConfig>,
    },
    /// Remove these directories once the VMM is gone (unmounting what was
    /// attached at their top first), whoever holds the VM then.
    CleanUp {
        dirs: Vec<PathBuf>,
    },
    /// Pause the VM and write its device state to `state` (a template's).
    Save {
        state: PathBuf,
    },
    /// Load a template's saved state into a VM launched `incoming`.
    Restore {
        state: PathBuf,
    },
    /// Write the whole VM, memory included, to the new file `memory`
    /// (`VirtualMachine::snapshot`), leaving it paused.
    Snapshot {
        memory: PathBuf,
    },
    /// Load a snapshot's companion state into a VM launched `incoming`
    /// whose memory maps the snapshot's pages.
    RestoreSnapshot {
        state: PathBuf,
    },
    Pause,
    Resume,
    /// Join the tap device the message carries to NIC `index`.
    ConnectTap {
        index: usize,
    },
    /// Mount the tree the message carries (`open_tree` of a directory of
    /// the caller's) at `name` in the share tagged `tag`.
    Attach {
        tag: String,
        name: String,
    },
    Detach {
        tag: String,
        name: String,
    },
    /// Move the VMM into cgroup `cgroup` (relative to each hierarchy's root;
    /// `None`: it keeps its own) with CPU limit `cpu_millis` and the memory
    /// limit of a VM of `memory_mib` (at most its own RAM): a pool's VM
    /// taken by a caller with limits of its own.
    Cgroup {
        cgroup: Option<String>,
        cpu_millis: Option<u64>,
        #[serde(default)]
        memory_mib: Option<u64>,
    },
    /// Ask the VMM to quit; kill it after `grace_ms`.
    Stop {
        grace_ms: u64,
    },
    /// How the VMM exited, if it has.
    Status,
}

/// A request with the number its answer carries back: an answer to a
/// request whose asker stopped waiting is told apart.
#[derive(Serialize, Deserialize)]
struct Envelope {
    seq: u64,
    #[serde(flatten)]
    request: Request,
}

/// The number of the first request (`Launch`).
const FIRST: u64 = 1;

/// The supervisor's answer to each request.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Reply {
    /// The request's number.
    #[serde(default)]
    pub seq: u64,
    #[serde(default)]
    pub error: String,
    /// The VMM's pid (to `Launch`).
    #[serde(default)]
    pub pid: u32,
    /// How the VMM exited (to `Status`), empty while it runs.
    #[serde(default)]
    pub exit: String,
}

impl Reply {
    fn error(e: impl std::fmt::Display) -> Reply {
        Reply {
            error: e.to_string(),
            ..Default::default()
        }
    }
}

/// What the supervisor makes of a request line: its number and request.
pub fn parse_request(line: &[u8]) -> serde_json::Result<(u64, Request)> {
    serde_json::from_slice::<Envelope>(line).map(|e| (e.seq, e.request))
}

/// The front end's side: the connection to one VM's supervisor.
pub(crate) struct Supervisor {
    conn: tokio::sync::Mutex<Conn>,
    /// The connection's descriptor, to hang up while a request waits.
    raw: RawFd,
    /// Becomes readable when the VMM exits.
    pidfd: OwnedFd,
    pub pid: u32,
}

/// The connection, its reader and the last request's number.
type Conn = (tokio::net::UnixStream, fdmsg::Reader, u64);

/// A VM's supervisor connection and VMM pidfd, on their way to another
/// process (a pool's caller).
pub(crate) struct Handover {
    pub conn: OwnedFd,
    /// The last request's number.
    pub seq: u64,
    pub pidfd: OwnedFd,
    pub pid: u32,
}

fn io_err(what: &str) -> impl Fn(std::io::Error) -> SandboxError + '_ {
    move |e| SandboxError::Invalid(format!("{what}: {e}"))
}

/// `fcntl(F_SETFD, 0)`: the descriptor survives exec.
fn inheritable(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: fcntl on a descriptor number; no memory is passed.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl Supervisor {
    /// Starts a supervisor and has it launch `config`'s VMM. `lock` (the
    /// sandbox directory's lock) is held by the supervisor too, so that the
    /// directory is not collected while its VM lives.
    pub async fn launch(
        config: &VmConfig,
        lock: Option<&std::fs::File>,
    ) -> Result<Supervisor, SandboxError> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()
            .map_err(io_err("making the supervisor's socket"))?;
        let theirs_fd = theirs.as_raw_fd();
        let lock_fd = lock.map(|l| l.as_raw_fd());
        let mut cmd = std::process::Command::new(supervisor_binary());
        // As `ps` shows it: who started it, for which VM.
        let starter = std::env::current_exe().unwrap_or_default();
        cmd.arg0(starter.as_os_str())
            .arg(ARG)
            .arg(theirs_fd.to_string())
            .arg(lock_fd.map(|l| l.to_string()).unwrap_or("-".into()))
            .arg(&config.id)
            .arg(std::process::id().to_string());
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null());
        // SAFETY: runs between fork and exec; fcntl is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                inheritable(theirs_fd)?;
                if let Some(l) = lock_fd {
                    inheritable(l)?;
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(io_err("starting the VM's supervisor"))?;
        drop(theirs);
        // It forks away at once (no one reaps the supervisor itself).
        let _ = child.wait();
        ours.set_nonblocking(true)
            .map_err(io_err("the supervisor's socket"))?;
        let conn =
            tokio::net::UnixStream::from_std(ours).map_err(io_err("the supervisor's socket"))?;
        let raw = conn.as_raw_fd();
        let mut reader = fdmsg::Reader::default();
        let request = Request::Launch {
            config: Box::new(config.clone()),
        };
        let (reply, mut fds) =
            exchange(&conn, &mut reader, FIRST, &request, &[], LAUNCH_WAIT).await?;
        if !reply.error.is_empty() {
            return Err(SandboxError::Invalid(reply.error));
        }
        let pidfd = fds
            .pop()
            .ok_or_else(|| SandboxError::Invalid("the supervisor sent no pidfd".into()))?;
        Ok(Supervisor {
            conn: tokio::sync::Mutex::new((conn, reader, FIRST)),
            raw,
            pidfd,
            pid: reply.pid,
        })
    }

    /// Takes over a supervisor another process handed over.
    pub fn adopt(h: Handover) -> Result<Supervisor, SandboxError> {
        let std = std::os::unix::net::UnixStream::from(h.conn);
        std.set_nonblocking(true)
            .map_err(io_err("the supervisor's socket"))?;
        let conn =
            tokio::net::UnixStream::from_std(std).map_err(io_err("the supervisor's socket"))?;
        Ok(Supervisor {
            raw: conn.as_raw_fd(),
            // Numbers go on from where the last holder left them.
            conn: tokio::sync::Mutex::new((conn, fdmsg::Reader::default(), h.seq)),
            pidfd: h.pidfd,
            pid: h.pid,
        })
    }

    /// Gives up this process's hold on the VM: the connection and pidfd go
    /// to another process (this copy closes without hanging up).
    pub fn hand_over(self) -> Result<Handover, SandboxError> {
        let (conn, _, seq) = self.conn.into_inner();
        let conn = conn.into_std().map_err(io_err("the supervisor's socket"))?;
        Ok(Handover {
            conn: OwnedFd::from(conn),
            seq,
            pidfd: self.pidfd,
            pid: self.pid,
        })
    }

    /// Asks one thing, waiting at most `wait`.
    pub async fn ask(
        &self,
        request: &Request,
        fds: &[RawFd],
        wait: Duration,
    ) -> Result<Reply, SandboxError> {
        let mut guard = self.conn.lock().await;
        let (conn, reader, seq) = &mut *guard;
        *seq += 1;
        let (reply, _) = exchange(conn, reader, *seq, request, fds, wait).await?;
        match reply.error.is_empty() {
            true => Ok(reply),
            false => Err(SandboxError::Invalid(reply.error)),
        }
    }

    /// `ask` for callers that cannot wait asynchronously (it blocks the
    /// thread); refused while another request is in flight.
    pub fn ask_blocking(
        &self,
        request: &Request,
        fds: &[RawFd],
        wait: Duration,
    ) -> Result<Reply, SandboxError> {
        let mut guard = self.conn.try_lock().map_err(|_| {
            SandboxError::Invalid("the VM's supervisor is busy with another request".into())
        })?;
        let (conn, reader, seq) = &mut *guard;
        *seq += 1;
        let line = envelope(*seq, request);
        let io = io_err("asking the VM's supervisor");
        fdmsg::send(&*conn, &line, fds).map_err(&io)?;
        let deadline = std::time::Instant::now() + wait;
        loop {
            let (answer, _) = reader
                .recv_until(conn.as_raw_fd(), deadline)
                .map_err(&io)?
                .ok_or_else(gone)?;
            let reply = decode(&answer)?;
            if matches(&reply, *seq) {
                return match reply.error.is_empty() {
                    true => Ok(reply),
                    false => Err(SandboxError::Invalid(reply.error)),
                };
            }
        }
    }

    /// Whether the VMM has exited.
    pub fn exited(&self) -> bool {
        let mut p = libc::pollfd {
            fd: self.pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd that lives for the call; no wait.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        n > 0
    }

    /// Waits up to `wait` for the VMM to exit.
    pub async fn wait_exit(&self, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        while !self.exited() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    /// Stops the VMM (quit, then kill after `grace`), then hangs up and
    /// waits for the supervisor to have cleaned up.
    pub async fn finish(self, grace: Duration) {
        if !self.exited() {
            let stop = Request::Stop {
                grace_ms: grace.as_millis() as u64,
            };
            let _ = self
                .ask(&stop, &[], grace * 2 + Duration::from_secs(1))
                .await;
        }
        self.hang_up();
        let mut guard = self.conn.lock().await;
        let (conn, reader, _) = &mut *guard;
        // Its end closes once the VMM is gone and the cleanup done.
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while let Ok(Some(_)) = reader.recv_async(conn).await {}
        })
        .await;
    }

    /// Hangs up now, even while a request waits: the supervisor kills the
    /// VMM at once. Every process holding the connection loses it.
    pub fn hang_up(&self) {
        // SAFETY: shutdown on a descriptor this value owns.
        unsafe { libc::shutdown(self.raw, libc::SHUT_WR) };
    }
}

const LAUNCH_WAIT: Duration = Duration::from_secs(30);

fn envelope(seq: u64, request: &Request) -> Vec<u8> {
    #[derive(Serialize)]
    struct Out<'a> {
        seq: u64,
        #[serde(flatten)]
        request: &'a Request,
    }
    serde_json::to_vec(&Out { seq, request }).unwrap_or_default()
}

fn gone() -> SandboxError {
    SandboxError::Invalid("the VM's supervisor is gone".into())
}

fn decode(answer: &[u8]) -> Result<Reply, SandboxError> {
    serde_json::from_slice(answer)
        .map_err(|e| SandboxError::Invalid(format!("the VM's supervisor's answer: {e}")))
}

/// Whether `reply` answers request `seq`: not an earlier request's late
/// answer (a refused line is answered as number 0).
fn matches(reply: &Reply, seq: u64) -> bool {
    reply.seq == seq || (reply.seq == 0 && !reply.error.is_empty())
}

/// Sends `request` and reads the answer with its descriptors.
async fn exchange(
    conn: &tokio::net::UnixStream,
    reader: &mut fdmsg::Reader,
    seq: u64,
    request: &Request,
    fds: &[RawFd],
    wait: Duration,
) -> Result<(Reply, Vec<OwnedFd>), SandboxError> {
    let line = envelope(seq, request);
    let io = io_err("asking the VM's supervisor");
    let talk = async {
        fdmsg::send_async_with(conn, &line, fds)
            .await
            .map_err(&io)?;
        loop {
            let (answer, fds) = reader
                .recv_async(conn)
                .await
                .map_err(&io)?
                .ok_or_else(gone)?;
            let reply = decode(&answer)?;
            if matches(&reply, seq) {
                return Ok((reply, fds));
            }
        }
    };
    tokio::time::timeout(wait, talk).await.map_err(|_| {
        SandboxError::Invalid(format!(
            "the VM's supervisor did not answer within {wait:?}"
        ))
    })?
}

/// The share `tag` of `config`, where `Attach` and `Detach` act.
fn share_path<'a>(config: &'a VmConfig, tag: &str) -> Option<&'a Path> {
    config
        .shares
        .iter()
        .find(|s| s.tag == tag)
        .map(|s| s.path.as_path())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_nonsense_is_refused() {
        let line = br#"{"seq":7,"op":"connect_tap","index":2}"#;
        assert!(matches!(
            parse_request(line),
            Ok((7, Request::ConnectTap { index: 2 }))
        ));
        for bad in [
            &b"{}"[..],
            b"{\"op\":\"pause\"}",
            b"{\"seq\":1,\"op\":\"format_disk\"}",
            b"\xff",
            b"",
        ] {
            assert!(parse_request(bad).is_err());
        }
    }
}
