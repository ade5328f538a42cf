//! The agent's end of the host channel: a virtio-serial port turned into a
//! stream of sessions, one per host connection, each a local socket tonic serves.

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

/// Bridges the port to local sockets: every host connection becomes one
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
        .spawn(move || loop {
            let (ours, theirs) = match UnixStream::pair() {
                Ok(pair) => pair,
                Err(_) => return,
            };
            if sessions.send(theirs).is_err() {
                return;
            }
            run_session(&port, ours);
        })?;
    Ok(())
}

/// Copies bytes both ways until the host disconnects (the port reads EOF
/// after having carried data) or the local side closes.
fn run_session(port: &Arc<File>, local: UnixStream) {
    let ended = Arc::new(AtomicBool::new(false));
    let writer = {
        let port = Arc::clone(port);
        let ended = Arc::clone(&ended);
        let local = local.try_clone();
        thread::spawn(move || {
            if let Ok(local) = local {
                local_to_port(&port, local, &ended);
            }
            ended.store(true, Ordering::SeqCst);
        })
    };
    port_to_local(port, &local, &ended);
    ended.store(true, Ordering::SeqCst);
    let _ = local.shutdown(std::net::Shutdown::Both);
    let _ = writer.join();
}

fn port_to_local(port: &File, mut local: &UnixStream, ended: &AtomicBool) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut carried = false;
    let mut idle_rounds = 0;
    while !ended.load(Ordering::SeqCst) {
        let mut fds = [PollFd::new(port.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(POLL_MS)) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return,
        }
        match (&*port).read(&mut buf) {
            Ok(0) => {
                // EOF: no host is connected. Before this session carried
                // anything that just means the host has not come yet.
                if carried {
                    return;
                }
                idle_sleep(&mut idle_rounds);
            }
            Ok(n) => {
                carried = true;
                if local.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
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
