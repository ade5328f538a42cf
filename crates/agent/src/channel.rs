//! The agent's end of the host channel: a virtio-serial port turned into a
//! stream of sessions, one per host connection, each a local socket tonic serves.
//! A session begins where a read starts with `SESSION_MAGIC` and ends at the
//! host's hang-up (EOF) or the next magic; bytes outside a session are dropped.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use agent_proto::SESSION_MAGIC;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tokio::sync::mpsc;

const POLL_MS: u16 = 100;

/// How long to sleep while no host is connected: short at first (the host is
/// usually waiting for us right after boot), longer once the port has been idle.
fn idle_sleep(idle_rounds: &mut u32) {
    *idle_rounds = idle_rounds.saturating_add(1);
    let ms = if *idle_rounds < 400 { 5 } else { 20 };
    thread::sleep(Duration::from_millis(ms));
}

/// Finds `/dev/vportNpM` whose sysfs name is `name`, waiting for the device to appear.
pub fn find_port(name: &str, wait: Duration) -> io::Result<PathBuf> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        if let Ok(entries) = std::fs::read_dir("/sys/class/virtio-ports") {
            for entry in entries.flatten() {
                let port_name =
                    std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
                if port_name.trim() == name {
                    return Ok(PathBuf::from("/dev").join(entry.file_name()));
                }
            }
        }
        if std::time::Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no virtio-serial port named {name}"),
            ));
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Bridges the port to local sockets: every host session becomes one
/// `UnixStream` sent on `sessions`. Runs forever on its own threads.
pub fn serve_port(path: PathBuf, sessions: mpsc::UnboundedSender<UnixStream>) -> io::Result<()> {
    let port = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(&path)?;
    let port = Arc::new(port);
    thread::Builder::new()
        .name("channel".into())
        .spawn(move || read_port(&port, &sessions))?;
    Ok(())
}

/// One host session: the local socket tonic serves, and the thread copying
/// its replies to the port.
struct Session {
    local: UnixStream,
    ended: Arc<AtomicBool>,
}

impl Session {
    fn start(port: &Arc<File>, sessions: &mpsc::UnboundedSender<UnixStream>) -> Option<Session> {
        let (ours, theirs) = UnixStream::pair().ok()?;
        let replies = ours.try_clone().ok()?;
        sessions.send(theirs).ok()?;
        let ended = Arc::new(AtomicBool::new(false));
        let (port, flag) = (Arc::clone(port), Arc::clone(&ended));
        thread::spawn(move || {
            local_to_port(&port, replies, &flag);
            flag.store(true, Ordering::SeqCst);
        });
        Some(Session { local: ours, ended })
    }

    fn end(self) {
        self.ended.store(true, Ordering::SeqCst);
        let _ = self.local.shutdown(std::net::Shutdown::Both);
    }
}

fn end_session(current: &mut Option<Session>) {
    if let Some(s) = current.take() {
        s.end();
    }
}

fn read_port(port: &Arc<File>, sessions: &mpsc::UnboundedSender<UnixStream>) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut current: Option<Session> = None;
    let mut idle_rounds = 0;
    loop {
        if current
            .as_ref()
            .is_some_and(|s| s.ended.load(Ordering::SeqCst))
        {
            end_session(&mut current);
        }
        let mut fds = [PollFd::new(port.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(POLL_MS)) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(_) => return,
        }
        let n = match (&**port).read(&mut buf) {
            Ok(n) => n,
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                continue
            }
            Err(_) => return,
        };
        if n == 0 {
            // EOF: no host is connected (any more).
            end_session(&mut current);
            idle_sleep(&mut idle_rounds);
            continue;
        }
        idle_rounds = 0;
        let mut data = &buf[..n];
        // A new host connection may arrive in the same read as the last
        // bytes of the one before it (a VM paused and resumed between them):
        // look for the marker anywhere in the chunk.
        if let Some(at) = find_magic(data) {
            if let Some(session) = &current {
                let _ = (&session.local).write_all(&data[..at]);
            }
            end_session(&mut current);
            current = Session::start(port, sessions);
            data = &data[at + SESSION_MAGIC.len()..];
        }
        let Some(session) = &current else { continue };
        if !data.is_empty() && (&session.local).write_all(data).is_err() {
            end_session(&mut current);
        }
    }
}

fn find_magic(data: &[u8]) -> Option<usize> {
    data.windows(SESSION_MAGIC.len())
        .position(|w| w == SESSION_MAGIC)
}

fn local_to_port(port: &File, mut local: UnixStream, ended: &AtomicBool) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match local.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            if ended.load(Ordering::SeqCst) {
                return;
            }
            match (&*port).write(rest) {
                Ok(0) => return,
                Ok(w) => rest = &rest[w..],
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::Interrupted =>
                {
                    // Without a host the port polls as HUP, never writable.
                    let mut fds = [PollFd::new(port.as_fd(), PollFlags::POLLOUT)];
                    let _ = poll(&mut fds, PollTimeout::from(POLL_MS));
                    let writable = fds[0]
                        .revents()
                        .is_some_and(|r| r.contains(PollFlags::POLLOUT));
                    if !writable {
                        thread::sleep(Duration::from_millis(5));
                    }
                }
                Err(_) => return,
            }
        }
    }
}
