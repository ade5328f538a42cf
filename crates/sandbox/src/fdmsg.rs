//! Lines of JSON over a Unix socket with file descriptors alongside
//! (SCM_RIGHTS): how a pool's caller hands its daemon tap devices and mount
//! trees. One line a message; its descriptors travel with its first byte.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

/// Descriptors one message may carry (a tree and eight taps, with room).
pub const MAX_FDS: usize = 16;
/// The most descriptors the kernel passes in one read (SCM_MAX_FD). Room is
/// made for them all: of a message cut off (MSG_CTRUNC) the descriptors
/// that fit are installed all the same, yet not named to us: they leaked.
const SCM_MAX_FD: usize = 253;
/// The longest line taken: the messages are small.
const MAX_LINE: usize = 64 << 10;

/// Sends `line` (newline added) with `fds` on a blocking socket.
pub fn send(sock: &impl AsRawFd, line: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let mut msg = line.to_vec();
    msg.push(b'\n');
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    let mut sent = sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(&msg)],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    while sent < msg.len() {
        sent += sendmsg::<()>(
            sock.as_raw_fd(),
            &[IoSlice::new(&msg[sent..])],
            &[],
            MsgFlags::MSG_NOSIGNAL,
            None,
        )?;
    }
    Ok(())
}

/// Reads messages off one socket, keeping what follows a line for the next.
#[derive(Default)]
pub struct Reader {
    buf: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Reader {
    /// The next line whole, if the buffer holds one.
    fn take_line(&mut self) -> Option<(Vec<u8>, Vec<OwnedFd>)> {
        let end = self.buf.iter().position(|&b| b == b'\n')?;
        let line: Vec<u8> = self.buf.drain(..=end).take(end).collect();
        Some((line, std::mem::take(&mut self.fds)))
    }

    /// One recvmsg: Ok(false) at end of stream.
    fn fill(&mut self, fd: RawFd) -> io::Result<bool> {
        let mut chunk = [0u8; 4096];
        let mut space = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
        let mut iov = [IoSliceMut::new(&mut chunk)];
        let msg = recvmsg::<()>(fd, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                // SAFETY: the kernel just installed these descriptors for us.
                self.fds
                    .extend(fds.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
            }
        }
        if self.fds.len() > MAX_FDS {
            self.fds.clear();
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "too many descriptors",
            ));
        }
        let n = msg.bytes;
        if n == 0 {
            return Ok(false);
        }
        if self.buf.len() + n > MAX_LINE {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(true)
    }

    /// The next message on a blocking socket; None at end of stream.
    pub fn recv(&mut self, sock: &impl AsRawFd) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
        loop {
            if let Some(m) = self.take_line() {
                return Ok(Some(m));
            }
            if !self.fill(sock.as_raw_fd())? {
                return Ok(None);
            }
        }
    }

    /// The next message on a (possibly non-blocking) socket, waiting until
    /// `deadline` at most; None at end of stream.
    pub fn recv_until(
        &mut self,
        fd: RawFd,
        deadline: std::time::Instant,
    ) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
        loop {
            if let Some(m) = self.take_line() {
                return Ok(Some(m));
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "no answer in time"));
            }
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
            // SAFETY: one pollfd that lives for the call.
            unsafe { libc::poll(&mut p, 1, ms) };
            match self.fill(fd) {
                Ok(true) => {}
                Ok(false) => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// The next message on a tokio socket; None at end of stream.
    pub async fn recv_async(
        &mut self,
        sock: &tokio::net::UnixStream,
    ) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
        loop {
            if let Some(m) = self.take_line() {
                return Ok(Some(m));
            }
            sock.readable().await?;
            let filled = sock.try_io(tokio::io::Interest::READABLE, || {
                self.fill(sock.as_raw_fd())
            });
            match filled {
                Ok(true) => {}
                Ok(false) => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Sends one line with `fds` on a tokio socket (small messages: a line the
/// socket cannot take whole is not resumed).
pub async fn send_async_with(
    sock: &tokio::net::UnixStream,
    line: &[u8],
    fds: &[RawFd],
) -> io::Result<()> {
    loop {
        sock.writable().await?;
        match sock.try_io(tokio::io::Interest::WRITABLE, || send(sock, line, fds)) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            done => return done,
        }
    }
}

/// Sends one line on a tokio socket (no descriptors).
pub async fn send_async(sock: &tokio::net::UnixStream, line: &[u8]) -> io::Result<()> {
    let mut msg = line.to_vec();
    msg.push(b'\n');
    let mut sent = 0;
    while sent < msg.len() {
        sock.writable().await?;
        match sock.try_write(&msg[sent..]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn lines_carry_their_descriptors() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        send(&a, br#"{"op":"one"}"#, &[file.as_raw_fd()]).unwrap();
        send(&a, br#"{"op":"two"}"#, &[]).unwrap();
        drop(a);
        let mut r = Reader::default();
        let (line, fds) = r.recv(&b).unwrap().unwrap();
        assert_eq!(line, br#"{"op":"one"}"#);
        assert_eq!(fds.len(), 1);
        let (line, fds) = r.recv(&b).unwrap().unwrap();
        assert_eq!(line, br#"{"op":"two"}"#);
        assert!(fds.is_empty());
        assert!(r.recv(&b).unwrap().is_none());
    }

    #[test]
    fn refuses_too_many_descriptors_and_keeps_none() {
        let path = std::env::temp_dir().join(format!("podvisor-fdmsg-{}", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        // Descriptors of this process open on `path` (other tests run alongside).
        let open = || {
            std::fs::read_dir("/proc/self/fd")
                .unwrap()
                .flatten()
                .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == path))
                .count()
        };
        let (a, b) = UnixStream::pair().unwrap();
        send(&a, br#"{"op":"one"}"#, &[file.as_raw_fd(); MAX_FDS + 4]).unwrap();
        let mut r = Reader::default();
        assert!(r.recv(&b).is_err());
        drop(r);
        assert_eq!(open(), 1);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn refuses_endless_lines() {
        let (a, b) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let junk = vec![b'x'; 8192];
            for _ in 0..20 {
                if std::io::Write::write_all(&mut &a, &junk).is_err() {
                    break;
                }
            }
        });
        assert!(Reader::default().recv(&b).is_err());
    }
}
