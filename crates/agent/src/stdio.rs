//! A process's stdio as the agent holds it: three pipes, or a pty whose
//! replica becomes the process's stdin, stdout and stderr.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::{Arc, Mutex};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

/// The agent's ends.
pub struct HostEnds {
    pub stdin: Mutex<Option<Arc<File>>>,
    pub stdout: Mutex<Option<File>>,
    pub stderr: Mutex<Option<File>>,
    /// The pty main side, for resizing; `None` without a terminal.
    pub pty: Option<File>,
}

/// The child's ends, closed in the agent once the child holds them.
pub struct ChildEnds {
    pub fds: [OwnedFd; 3],
}

impl ChildEnds {
    pub fn raw(&self) -> [RawFd; 3] {
        [
            self.fds[0].as_raw_fd(),
            self.fds[1].as_raw_fd(),
            self.fds[2].as_raw_fd(),
        ]
    }
}

pub fn pipes() -> nix::Result<(HostEnds, ChildEnds)> {
    let (in_r, in_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let (out_r, out_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let (err_r, err_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    Ok((
        HostEnds {
            stdin: Mutex::new(Some(Arc::new(File::from(in_w)))),
            stdout: Mutex::new(Some(File::from(out_r))),
            stderr: Mutex::new(Some(File::from(err_r))),
            pty: None,
        },
        ChildEnds {
            fds: [in_r, out_w, err_w],
        },
    ))
}

/// Opens a pty in the devpts instance mounted at `devpts`.
pub fn pty(devpts: &Path, rows: u16, cols: u16) -> nix::Result<(HostEnds, ChildEnds)> {
    let ptmx = nix::fcntl::open(
        &devpts.join("ptmx"),
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // SAFETY: `open` just returned this fd and nothing else owns it.
    let main = unsafe { OwnedFd::from_raw_fd(ptmx) };
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads one int through the pointer, which is valid.
    if unsafe { libc::ioctl(main.as_raw_fd(), libc::TIOCSPTLCK, &unlock) } < 0 {
        return Err(Errno::last());
    }
    // SAFETY: TIOCGPTPEER takes open flags by value and returns a new fd.
    let replica = unsafe {
        libc::ioctl(
            main.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if replica < 0 {
        return Err(Errno::last());
    }
    // SAFETY: the ioctl returned a new fd that nothing else owns.
    let replica = unsafe { OwnedFd::from_raw_fd(replica) };
    resize(&main, rows, cols)?;
    let main = File::from(main);
    let stdin = main.try_clone().map_err(|_| Errno::last())?;
    let pty = main.try_clone().map_err(|_| Errno::last())?;
    let fds = [
        replica.try_clone().map_err(|_| Errno::last())?,
        replica.try_clone().map_err(|_| Errno::last())?,
        replica,
    ];
    Ok((
        HostEnds {
            stdin: Mutex::new(Some(Arc::new(stdin))),
            stdout: Mutex::new(Some(main)),
            stderr: Mutex::new(None),
            pty: Some(pty),
        },
        ChildEnds { fds },
    ))
}

pub fn resize(fd: &impl AsRawFd, rows: u16, cols: u16) -> nix::Result<()> {
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize through the pointer, which is valid.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(Errno::last());
    }
    Ok(())
}
