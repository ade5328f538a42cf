//! Host-side stdio of a guest process: the process's own fds 0-2 (pipes,
//! files, or a pty replica whose main side went to the caller over
//! `--console-socket`), relayed to the guest, with signals forwarded.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;

use agent_proto::{OutputStream, ResizeTtyRequest, SignalProcessRequest};
use anyhow::Context;
use nix::pty::openpty;
use nix::sys::socket::{
    connect, sendmsg, socket, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr,
};
use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
use sandbox::agent::AgentClient;
use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinHandle;

/// Makes a pty, sends its main side to `socket` (SCM_RIGHTS, as runc does)
/// and makes the replica this process's stdio and controlling terminal, in
/// raw mode: the guest's own pty does the line discipline.
pub fn send_console(socket_path: &Path, rows: u16, cols: u16) -> anyhow::Result<()> {
    let pty = openpty(None, None).context("opening a pty")?;
    if rows > 0 && cols > 0 {
        set_size(pty.slave.as_raw_fd(), rows, cols);
    }
    let mut attrs = tcgetattr(&pty.slave).context("reading the pty's mode")?;
    cfmakeraw(&mut attrs);
    tcsetattr(&pty.slave, SetArg::TCSANOW, &attrs).context("setting the pty raw")?;
    let sock = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("console socket")?;
    let addr = UnixAddr::new(socket_path).context("console socket path")?;
    connect(sock.as_raw_fd(), &addr)
        .with_context(|| format!("connecting to console socket {}", socket_path.display()))?;
    let fds = [pty.master.as_raw_fd()];
    let name = b"/dev/ptmx";
    let iov = [std::io::IoSlice::new(name)];
    sendmsg::<()>(
        sock.as_raw_fd(),
        &iov,
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .context("sending the pty over the console socket")?;
    drop(pty.master);
    become_stdio(pty.slave)?;
    // SAFETY: TIOCSCTTY takes an int; fd 0 is the replica and we lead a session.
    unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) };
    Ok(())
}

fn become_stdio(fd: OwnedFd) -> anyhow::Result<()> {
    for target in 0..3 {
        nix::unistd::dup2(fd.as_raw_fd(), target).context("dup2 onto stdio")?;
    }
    Ok(())
}

fn set_size(fd: RawFd, rows: u16, cols: u16) {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize through the valid pointer.
    unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) };
}

/// Relays of one guest process to this process's fds 0-2.
pub struct Attached {
    out: JoinHandle<Result<u64, sandbox::agent::AgentError>>,
    err: JoinHandle<Result<u64, sandbox::agent::AgentError>>,
    tasks: Vec<JoinHandle<()>>,
}

pub fn attach(client: &AgentClient, cid: &str, eid: &str, tty: bool) -> Attached {
    let relay = |stream, out| {
        tokio::spawn(sandbox::io::relay_output(
            client.clone(),
            cid.into(),
            eid.into(),
            stream,
            out,
        ))
    };
    let out = relay(
        OutputStream::Stdout,
        Box::new(tokio::io::stdout()) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
    );
    let err = relay(OutputStream::Stderr, Box::new(tokio::io::stderr()));
    let stdin = tokio::spawn({
        let (client, cid, eid) = (client.clone(), cid.to_string(), eid.to_string());
        async move {
            let _ = sandbox::io::relay_stdin(client, cid, eid, tokio::io::stdin()).await;
        }
    });
    let mut tasks = vec![stdin];
    tasks.extend(forward_signals(client, cid, eid, tty));
    Attached { out, err, tasks }
}

impl Attached {
    /// After the process exited: lets the output in flight arrive (unless a
    /// background process keeps it open), then stops relaying.
    pub async fn finish(self) {
        let drain = std::time::Duration::from_secs(3);
        let _ = tokio::time::timeout(drain, self.out).await;
        let _ = tokio::time::timeout(drain, self.err).await;
        self.tasks.iter().for_each(|t| t.abort());
    }
}

/// Rows and columns of the terminal on fd 0, if it is one.
pub fn stdin_size() -> Option<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize through the valid pointer.
    let ok = unsafe { libc::ioctl(0, libc::TIOCGWINSZ, &mut ws) } == 0 && ws.ws_row > 0;
    ok.then_some((ws.ws_row, ws.ws_col))
}

/// The signals a holder (and `run`) passes on to the container's process.
pub fn forwarded_signals() -> [SignalKind; 6] {
    [
        SignalKind::interrupt(),
        SignalKind::terminate(),
        SignalKind::hangup(),
        SignalKind::quit(),
        SignalKind::user_defined1(),
        SignalKind::user_defined2(),
    ]
}

/// Signals this process gets go to the guest process; with a terminal,
/// size changes of fd 0 follow it.
fn forward_signals(client: &AgentClient, cid: &str, eid: &str, tty: bool) -> Vec<JoinHandle<()>> {
    let mut tasks = Vec::new();
    for kind in forwarded_signals() {
        let Ok(mut stream) = signal(kind) else {
            continue;
        };
        let (mut client, cid, eid) = (client.clone(), cid.to_string(), eid.to_string());
        tasks.push(tokio::spawn(async move {
            while stream.recv().await.is_some() {
                let _ = client
                    .signal_process(SignalProcessRequest {
                        container_id: cid.clone(),
                        exec_id: eid.clone(),
                        signal: kind.as_raw_value() as u32,
                        all: false,
                    })
                    .await;
            }
        }));
    }
    if tty {
        if let Ok(mut winch) = signal(SignalKind::window_change()) {
            let (mut client, cid, eid) = (client.clone(), cid.to_string(), eid.to_string());
            tasks.push(tokio::spawn(async move {
                loop {
                    if let Some((rows, cols)) = stdin_size() {
                        let _ = client
                            .resize_tty(ResizeTtyRequest {
                                container_id: cid.clone(),
                                exec_id: eid.clone(),
                                rows: rows.into(),
                                cols: cols.into(),
                            })
                            .await;
                    }
                    if winch.recv().await.is_none() {
                        return;
                    }
                }
            }));
        }
    }
    tasks
}

/// The caller's side of `--console-socket`, for `run` in the foreground from
/// a terminal: receives the pty's main side and joins it to our terminal.
pub struct ConsoleReceiver {
    pub path: std::path::PathBuf,
    accepted: std::thread::JoinHandle<anyhow::Result<OwnedFd>>,
}

impl ConsoleReceiver {
    pub fn listen(path: std::path::PathBuf) -> anyhow::Result<ConsoleReceiver> {
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path)
            .with_context(|| format!("binding console socket {}", path.display()))?;
        let accepted = std::thread::spawn(move || -> anyhow::Result<OwnedFd> {
            let (conn, _) = listener.accept().context("accepting the console")?;
            let mut buf = [0u8; 256];
            let mut iov = [std::io::IoSliceMut::new(&mut buf)];
            let mut space = nix::cmsg_space!([RawFd; 1]);
            let msg = nix::sys::socket::recvmsg::<()>(
                conn.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .context("receiving the console")?;
            for c in msg.cmsgs().context("reading the console message")? {
                if let nix::sys::socket::ControlMessageOwned::ScmRights(fds) = c {
                    if let Some(fd) = fds.first() {
                        // SAFETY: the kernel just installed this fd for us.
                        return Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(*fd) });
                    }
                }
            }
            anyhow::bail!("no pty came over the console socket")
        });
        Ok(ConsoleReceiver { path, accepted })
    }

    /// Waits for the pty, then relays it to our stdin/stdout (raw mode) with
    /// our window size, until the pty closes.
    pub fn relay(self) -> anyhow::Result<std::thread::JoinHandle<()>> {
        let master = self
            .accepted
            .join()
            .map_err(|_| anyhow::anyhow!("console thread failed"))??;
        let _ = std::fs::remove_file(&self.path);
        if let Some((rows, cols)) = stdin_size() {
            set_size(master.as_raw_fd(), rows, cols);
        }
        let raw = crate::tty::RawMode::enter();
        let input = master.try_clone().context("pty")?;
        std::thread::spawn(move || {
            let mut out = std::fs::File::from(input);
            let _ = std::io::copy(&mut std::io::stdin(), &mut out);
        });
        // The size task has an fd of its own: the output thread closes its
        // copy when the pty ends.
        let sizer = master.try_clone().context("pty")?;
        if let Ok(mut winch) = signal(SignalKind::window_change()) {
            tokio::spawn(async move {
                while winch.recv().await.is_some() {
                    if let Some((rows, cols)) = stdin_size() {
                        set_size(sizer.as_raw_fd(), rows, cols);
                    }
                }
            });
        }
        Ok(std::thread::spawn(move || {
            let mut from = std::fs::File::from(master);
            let mut out = std::io::stdout();
            let mut buf = [0u8; 8192];
            // EIO: the holder, the replica's last user, has exited.
            while let Ok(n) = std::io::Read::read(&mut from, &mut buf) {
                if n == 0 || std::io::Write::write_all(&mut out, &buf[..n]).is_err() {
                    break;
                }
                let _ = std::io::Write::flush(&mut out);
            }
            drop(raw);
        }))
    }
}
