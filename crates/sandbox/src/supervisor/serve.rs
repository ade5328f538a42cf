//! The supervisor process: launches one VMM, serves its front end, and
//! cleans up when the front end hangs up.

use std::os::fd::{AsFd, FromRawFd};
use std::time::Duration;

use hypervisor::qemu::{QemuDriver, QemuVm};
use hypervisor::{Hypervisor, VirtualMachine};
use nix::mount::{umount2, MntFlags};
use tokio::io::unix::AsyncFd;
use tokio::net::UnixStream;

use super::*;

/// Runs the supervisor on connection `conn`, holding `lock` while its VM lives.
pub(super) fn main(conn: RawFd, lock: Option<RawFd>) -> i32 {
    // Leave the process that started us: it reaps this parent at once and
    // never waits for us; our life is the connection's.
    // SAFETY: one thread so far (no runtime yet): fork is safe.
    match unsafe { libc::fork() } {
        -1 => return 1,
        0 => {}
        // SAFETY: leaving the forked-from parent without running destructors.
        _ => unsafe { libc::_exit(0) },
    }
    // Its own session: a terminal's signals are not for the VM.
    // SAFETY: plain system call.
    unsafe { libc::setsid() };
    // Neither goes on to the VMM: it must not hold the lock, nor be able to
    // answer the front end in our name.
    for fd in [Some(conn), lock].into_iter().flatten() {
        // SAFETY: fcntl on descriptor numbers we were given; no memory.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    // SAFETY: descriptors our starter made inheritable for us, used once.
    let conn = unsafe { std::os::unix::net::UnixStream::from_raw_fd(conn) };
    // SAFETY: as for `conn`: ours alone from here on.
    let lock = lock.map(|l| unsafe { OwnedFd::from_raw_fd(l) });
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return 1;
    };
    runtime.block_on(serve(conn, lock));
    0
}

/// An error and its causes, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

async fn reply(conn: &UnixStream, r: &Reply, fds: &[RawFd]) -> std::io::Result<()> {
    let line = serde_json::to_vec(r).unwrap_or_default();
    fdmsg::send_async_with(conn, &line, fds).await
}

/// `pidfd_open(2)`: a descriptor that becomes readable when `pid` exits.
fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain system call; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel just gave us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Serves the VM of `conn`, holding `lock` (its state directory's) until
/// the VMM is gone. Garbage collection waits a little for a directory
/// whose owner died and whose lock is still held: that is us, cleaning up.
async fn serve(conn: std::os::unix::net::UnixStream, lock: Option<OwnedFd>) {
    let Ok(conn) = conn
        .set_nonblocking(true)
        .and_then(|()| UnixStream::from_std(conn))
    else {
        return;
    };
    let mut reader = fdmsg::Reader::default();
    let Ok(Some((line, _))) = reader.recv_async(&conn).await else {
        return;
    };
    let config = match parse_request(&line) {
        Ok((_, Request::Launch { config })) => *config,
        Ok(_) => {
            let _ = reply(&conn, &Reply::error("launch the VM first"), &[]).await;
            return;
        }
        Err(e) => {
            let _ = reply(&conn, &Reply::error(format!("bad request: {e}")), &[]).await;
            return;
        }
    };
    let launched = match QemuDriver::locate() {
        Ok(driver) => driver.launch(&config).await,
        Err(e) => Err(e),
    };
    // The VMM has the taps now: keep no copy that outlives it.
    for nic in &config.nics {
        if let Some(fd) = nic.fd {
            // SAFETY: a descriptor our starter left open for the VMM.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
    let (mut vm, pidfd) = match launched.and_then(|vm| {
        let fd = pidfd_open(vm.pid()).map_err(hypervisor::HypervisorError::QmpIo)?;
        Ok((vm, fd))
    }) {
        Ok(v) => v,
        Err(e) => {
            let _ = reply(&conn, &Reply::error(chain(&e)), &[]).await;
            return;
        }
    };
    let launched = Reply {
        seq: FIRST,
        pid: vm.pid(),
        ..Default::default()
    };
    let mut cleanup = Vec::new();
    if reply(&conn, &launched, &[pidfd.as_raw_fd()]).await.is_ok() {
        // SAFETY: an OwnedFd: open, and the same descriptor for its life.
        let pidfd =
            unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) };
        if let Ok(pidfd) = pidfd {
            let mut served = Served {
                vm: &mut vm,
                config: &config,
                cleanup: &mut cleanup,
            };
            serve_requests(&conn, &mut reader, &mut served, &pidfd).await;
        }
    }
    vm.stop(Duration::ZERO).await;
    // Dropping the VMM releases its jail's uid and cgroups.
    drop(vm);
    drop(lock);
    clean(&cleanup);
}

/// Serves requests until the front end hangs up. A request that comes
/// while one is being served (its asker gave up waiting) replaces it.
async fn serve_requests(
    conn: &UnixStream,
    reader: &mut fdmsg::Reader,
    served: &mut Served<'_>,
    pidfd: &AsyncFd<OwnedFd>,
) {
    let mut exit = String::new();
    let mut next = None;
    loop {
        let (line, fds) = match next.take() {
            Some(m) => m,
            None => tokio::select! {
                m = reader.recv_async(conn) => match m {
                    Ok(Some(m)) => m,
                    _ => return,
                },
                _ = pidfd.readable(), if exit.is_empty() => {
                    exit = exit_text(served.vm);
                    if exit.is_empty() {
                        exit = "exited".into();
                    }
                    continue;
                }
            },
        };
        let (seq, answer) = match parse_request(&line) {
            Ok((seq, req)) => tokio::select! {
                r = served.handle(req, &fds) => (seq, r),
                m = reader.recv_async(conn) => match m {
                    Ok(Some(m)) => {
                        next = Some(m);
                        continue;
                    }
                    _ => return,
                },
            },
            Err(e) => (0, Reply::error(format!("bad request: {e}"))),
        };
        if exit.is_empty() {
            exit = exit_text(served.vm);
        }
        let answer = Reply {
            seq,
            exit: exit.clone(),
            ..answer
        };
        if reply(conn, &answer, &[]).await.is_err() {
            return;
        }
    }
}

fn exit_text(vm: &mut QemuVm) -> String {
    vm.try_exit().map(|s| s.to_string()).unwrap_or_default()
}

/// What requests act on.
struct Served<'a> {
    vm: &'a mut QemuVm,
    config: &'a VmConfig,
    cleanup: &'a mut Vec<PathBuf>,
}

impl Served<'_> {
    async fn handle(&mut self, req: Request, fds: &[OwnedFd]) -> Reply {
        let (vm, config) = (&mut *self.vm, self.config);
        let done: Result<(), String> = match req {
            Request::Launch { .. } => Err("the VM is launched already".into()),
            Request::CleanUp { dirs } => {
                *self.cleanup = dirs;
                Ok(())
            }
            Request::Save { state } => vm.save(&state).await.map_err(|e| chain(&e)),
            Request::Restore { state } => vm.restore(&state).await.map_err(|e| chain(&e)),
            Request::Snapshot { memory } => vm.snapshot(&memory).await.map_err(|e| chain(&e)),
            Request::RestoreSnapshot { state } => {
                vm.restore_snapshot(&state).await.map_err(|e| chain(&e))
            }
            Request::Pause => vm.pause().await.map_err(|e| chain(&e)),
            Request::Resume => vm.resume().await.map_err(|e| chain(&e)),
            Request::ConnectTap { index } => match fds.first() {
                Some(tap) => vm
                    .connect_tap(index, tap.as_fd())
                    .await
                    .map_err(|e| chain(&e)),
                None => Err("no tap device came with the request".into()),
            },
            Request::Attach { tag, name } => match share_path(config, &tag) {
                Some(share) => attach(share, &name, fds.first()),
                None => Err(format!("the VM has no share {tag:?}")),
            },
            Request::Detach { tag, name } => match share_path(config, &tag) {
                Some(share) => detach(share, &name),
                None => Err(format!("the VM has no share {tag:?}")),
            },
            Request::Cgroup {
                cgroup,
                cpu_millis,
                memory_mib,
            } => vm
                .move_cgroup(config, cgroup, cpu_millis, memory_mib)
                .map_err(|e| chain(&e)),
            Request::Stop { grace_ms } => {
                vm.stop(Duration::from_millis(grace_ms.min(60_000))).await;
                Ok(())
            }
            Request::Status => Ok(()),
        };
        done.err().map(Reply::error).unwrap_or_default()
    }
}

/// A name a caller may attach a tree at: one plain path component.
pub fn attach_point(share: &Path, name: &str) -> Result<PathBuf, String> {
    let plain = !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\0');
    if plain {
        Ok(share.join(name))
    } else {
        Err(format!("{name:?} is not a plain name"))
    }
}

/// Mounts the detached tree `tree` (from `open_tree`) at `share/name`.
fn attach(share: &Path, name: &str, tree: Option<&OwnedFd>) -> Result<(), String> {
    let at = attach_point(share, name)?;
    let tree = tree.ok_or("no mount tree came with the request")?;
    std::fs::create_dir(&at).map_err(|e| format!("creating {}: {e}", at.display()))?;
    let moved = crate::pool::move_mount(tree, &at);
    if let Err(e) = moved {
        let _ = std::fs::remove_dir(&at);
        return Err(format!("mounting the tree at {name}: {e}"));
    }
    Ok(())
}

fn detach(share: &Path, name: &str) -> Result<(), String> {
    let at = attach_point(share, name)?;
    while umount2(&at, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW).is_ok() {}
    std::fs::remove_dir(&at).map_err(|e| format!("removing {name}: {e}"))
}

/// Unmounts what was attached at the top of each directory (not following
/// a symlink the guest may have put in its place) and removes it, unless
/// something stayed mounted.
fn clean(dirs: &[PathBuf]) {
    for dir in dirs {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let flags = MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW;
                while umount2(&e.path(), flags).is_ok() {}
            }
        }
        crate::share::remove_unmounted(dir);
    }
}
