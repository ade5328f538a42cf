//! A container's files, for the host's file calls (podvisord's envd). Each
//! call runs on a thread of its own that leaves the agent's filesystem
//! context (`unshare(CLONE_FS)`), joins the container's mount namespace and
//! takes the caller's uid and gid as its filesystem ids: paths, symlinks,
//! permissions and the owner of what it makes are as for the container's
//! own processes. The thread ends with the call, and its ids with it.

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use agent_proto::{FileInfo, FileKind, User, WatchEvent, WatchOp};
use tokio::sync::mpsc;
use tonic::Status;

/// Bytes per chunk of a file read.
const CHUNK: usize = 64 * 1024;
/// Entries a ListDir answers at most (the message must fit the channel).
const MAX_ENTRIES: usize = 20_000;

pub fn io_status(what: &str, e: std::io::Error) -> Status {
    use std::io::ErrorKind as K;
    let msg = format!("{what}: {e}");
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => return Status::resource_exhausted(msg),
        Some(libc::ENOTDIR) | Some(libc::EISDIR) | Some(libc::ENOTEMPTY) | Some(libc::ELOOP) => {
            return Status::failed_precondition(msg)
        }
        _ => {}
    }
    match e.kind() {
        K::NotFound => Status::not_found(msg),
        K::PermissionDenied => Status::permission_denied(msg),
        K::AlreadyExists => Status::already_exists(msg),
        K::InvalidInput => Status::invalid_argument(msg),
        _ => Status::internal(msg),
    }
}

/// A path as the host may name it: absolute, no NUL, not absurdly long.
pub fn valid_path(p: &str) -> Result<(), Status> {
    if !p.starts_with('/') || p.contains('\0') || p.len() > 4096 {
        return Err(Status::invalid_argument(format!(
            "path {p:?} must be absolute, without NUL, at most 4096 bytes"
        )));
    }
    Ok(())
}

/// Runs `f` on a new thread inside the container's mount namespace `mnt`
/// with `user`'s filesystem ids.
pub fn run_in<T: Send + 'static>(
    mnt: OwnedFd,
    user: Option<User>,
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> std::thread::JoinHandle<Result<T, Status>> {
    std::thread::spawn(move || {
        enter(&mnt, user.as_ref())?;
        f()
    })
}

fn enter(mnt: &OwnedFd, user: Option<&User>) -> Result<(), Status> {
    use nix::sched::{setns, unshare, CloneFlags};
    unshare(CloneFlags::CLONE_FS)
        .map_err(|e| Status::internal(format!("leaving the agent's fs context: {e}")))?;
    setns(mnt.as_fd(), CloneFlags::CLONE_NEWNS)
        .map_err(|e| Status::internal(format!("joining the container's mounts: {e}")))?;
    nix::unistd::chdir("/").map_err(|e| Status::internal(format!("chdir /: {e}")))?;
    let (uid, gid) = user.map(|u| (u.uid, u.gid)).unwrap_or((0, 0));
    // Per thread: setfsuid/setfsgid change this thread's credentials only.
    // SAFETY: plain syscalls on this thread's own credentials.
    unsafe {
        libc::setfsgid(gid);
        libc::setfsuid(uid);
    }
    // They report the old value; read back the new one to know it took.
    // SAFETY: as above; -1 is never a valid id, so this only queries.
    let now = unsafe { libc::setfsuid(u32::MAX) } as u32;
    if now != uid {
        return Err(Status::internal(format!("taking uid {uid} for the call")));
    }
    Ok(())
}

/// Waits for the thread of `run_in`.
pub async fn join<T: Send + 'static>(
    h: std::thread::JoinHandle<Result<T, Status>>,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(move || h.join())
        .await
        .map_err(|e| Status::internal(format!("file task: {e}")))?
        .map_err(|_| Status::internal("file task panicked"))?
}

/// Names of uids and gids in the container's /etc/passwd and /etc/group.
struct Names {
    users: HashMap<u32, String>,
    groups: HashMap<u32, String>,
}

impl Names {
    fn read() -> Names {
        let table = |p: &str| -> HashMap<u32, String> {
            fs::read_to_string(p)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| {
                    let f: Vec<&str> = l.split(':').collect();
                    Some((f.get(2)?.parse().ok()?, f.first()?.to_string()))
                })
                .collect()
        };
        Names {
            users: table("/etc/passwd"),
            groups: table("/etc/group"),
        }
    }
}

fn info_of(path: &Path, names: &Names) -> Result<FileInfo, Status> {
    let shown = path.display().to_string();
    let m = fs::symlink_metadata(path).map_err(|e| io_status(&shown, e))?;
    let ft = m.file_type();
    let kind = if ft.is_symlink() {
        FileKind::KindSymlink
    } else if ft.is_dir() {
        FileKind::KindDirectory
    } else if ft.is_file() {
        FileKind::KindFile
    } else {
        FileKind::KindUnknown
    };
    let symlink_target = if ft.is_symlink() {
        fs::read_link(path)
            .map(|t| t.display().to_string())
            .unwrap_or_default()
    } else {
        String::new()
    };
    Ok(FileInfo {
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "/".into()),
        path: shown,
        kind: kind as i32,
        size: m.len() as i64,
        mode: m.mode(),
        uid: m.uid(),
        gid: m.gid(),
        owner: names
            .users
            .get(&m.uid())
            .cloned()
            .unwrap_or_else(|| m.uid().to_string()),
        group: names
            .groups
            .get(&m.gid())
            .cloned()
            .unwrap_or_else(|| m.gid().to_string()),
        mtime_unix_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
        symlink_target,
    })
}

pub fn stat(path: String) -> Result<FileInfo, Status> {
    info_of(Path::new(&path), &Names::read())
}

pub fn list(path: String, depth: u32) -> Result<Vec<FileInfo>, Status> {
    let names = Names::read();
    let root = PathBuf::from(&path);
    let m = fs::metadata(&root).map_err(|e| io_status(&path, e))?;
    if !m.is_dir() {
        return Err(Status::invalid_argument(format!(
            "{path} is not a directory"
        )));
    }
    let mut out = Vec::new();
    let mut todo = vec![(root, 1u32)];
    while let Some((dir, level)) = todo.pop() {
        let entries = fs::read_dir(&dir).map_err(|e| io_status(&dir.display().to_string(), e))?;
        let mut here: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        here.sort();
        for p in here {
            let Ok(info) = info_of(&p, &names) else {
                continue; // gone meanwhile
            };
            if info.kind == FileKind::KindDirectory as i32 && level < depth.max(1) {
                todo.push((p.clone(), level + 1));
            }
            out.push(info);
            if out.len() >= MAX_ENTRIES {
                return Err(Status::resource_exhausted(format!(
                    "{path}: more than {MAX_ENTRIES} entries; list with less depth"
                )));
            }
        }
    }
    Ok(out)
}

pub fn make_dir(path: String) -> Result<FileInfo, Status> {
    let p = Path::new(&path);
    if p.is_dir() {
        return Err(Status::already_exists(format!("{path} exists")));
    }
    fs::create_dir_all(p).map_err(|e| io_status(&path, e))?;
    info_of(p, &Names::read())
}

pub fn rename(from: String, to: String) -> Result<FileInfo, Status> {
    if let Some(parent) = Path::new(&to).parent() {
        fs::create_dir_all(parent).map_err(|e| io_status(&to, e))?;
    }
    fs::rename(&from, &to).map_err(|e| io_status(&format!("{from} -> {to}"), e))?;
    info_of(Path::new(&to), &Names::read())
}

pub fn remove(path: String) -> Result<(), Status> {
    let m = fs::symlink_metadata(&path).map_err(|e| io_status(&path, e))?;
    if m.is_dir() {
        fs::remove_dir_all(&path)
    } else {
        fs::remove_file(&path)
    }
    .map_err(|e| io_status(&path, e))
}

/// Sends the file's bytes in chunks; stops when the receiver is gone.
pub fn read(
    path: String,
    tx: mpsc::Sender<Result<agent_proto::FileChunk, Status>>,
) -> Result<(), Status> {
    let m = fs::metadata(&path).map_err(|e| io_status(&path, e))?;
    if m.is_dir() {
        return Err(Status::failed_precondition(format!(
            "{path} is a directory"
        )));
    }
    let mut f = fs::File::open(&path).map_err(|e| io_status(&path, e))?;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = f.read(&mut buf).map_err(|e| io_status(&path, e))?;
        if n == 0 {
            return Ok(());
        }
        let chunk = agent_proto::FileChunk {
            data: buf[..n].to_vec(),
            ..Default::default()
        };
        if tx.blocking_send(Ok(chunk)).is_err() {
            return Ok(());
        }
    }
}

/// Writes what comes from `rx` to `path` (parents made, the file created
/// or truncated); a partial file is removed when the write fails or the
/// sender gives up (`Err`: the host's stream broke off).
pub fn write(
    path: String,
    mut rx: mpsc::Receiver<Result<Vec<u8>, ()>>,
) -> Result<FileInfo, Status> {
    let p = Path::new(&path);
    if let Some(parent) = p.parent() {
        fs::create_dir_all(parent).map_err(|e| io_status(&path, e))?;
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(p)
        .map_err(|e| io_status(&path, e))?;
    let result = (|| {
        while let Some(data) = rx.blocking_recv() {
            let data =
                data.map_err(|()| Status::aborted(format!("{path}: the upload broke off")))?;
            f.write_all(&data).map_err(|e| io_status(&path, e))?;
        }
        f.sync_data().map_err(|e| io_status(&path, e))
    })();
    if let Err(e) = result {
        drop(f);
        let _ = fs::remove_file(p);
        return Err(e);
    }
    let _ = fs::set_permissions(p, fs::Permissions::from_mode(0o644)).ok();
    info_of(p, &Names::read())
}

/// inotify on `path` (and, with `recursive`, the directories below it, as
/// they come): events to `tx` until it is dropped.
pub fn watch(
    path: String,
    recursive: bool,
    tx: mpsc::Sender<Result<WatchEvent, Status>>,
) -> Result<(), Status> {
    use nix::sys::inotify::{AddWatchFlags as F, InitFlags, Inotify, WatchDescriptor};
    let m = fs::metadata(&path).map_err(|e| io_status(&path, e))?;
    if !m.is_dir() {
        return Err(Status::invalid_argument(format!(
            "{path} is not a directory"
        )));
    }
    let ino = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
        .map_err(|e| Status::internal(format!("inotify: {e}")))?;
    let mask = F::IN_CREATE
        | F::IN_MODIFY
        | F::IN_DELETE
        | F::IN_MOVED_FROM
        | F::IN_MOVED_TO
        | F::IN_ATTRIB
        | F::IN_DELETE_SELF;
    let mut dirs: HashMap<WatchDescriptor, PathBuf> = HashMap::new();
    let root = PathBuf::from(&path);
    let add = |ino: &Inotify, dirs: &mut HashMap<WatchDescriptor, PathBuf>, rel: PathBuf| {
        if let Ok(wd) = ino.add_watch(&root.join(&rel), mask) {
            dirs.insert(wd, rel);
        }
    };
    add(&ino, &mut dirs, PathBuf::new());
    if recursive {
        let mut todo = vec![PathBuf::new()];
        while let Some(rel) = todo.pop() {
            let Ok(rd) = fs::read_dir(root.join(&rel)) else {
                continue;
            };
            for e in rd.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    let sub = rel.join(e.file_name());
                    add(&ino, &mut dirs, sub.clone());
                    todo.push(sub);
                }
            }
        }
    }
    let started = WatchEvent {
        name: String::new(),
        op: WatchOp::WatchStarted as i32,
    };
    if tx.blocking_send(Ok(started)).is_err() {
        return Ok(());
    }
    loop {
        if tx.is_closed() {
            return Ok(());
        }
        let fd = ino.as_fd();
        let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(500u16));
        let events = match ino.read_events() {
            Ok(ev) => ev,
            Err(nix::errno::Errno::EAGAIN) => continue,
            Err(e) => return Err(Status::internal(format!("inotify: {e}"))),
        };
        for ev in events {
            if ev.mask.contains(F::IN_IGNORED)
                && dirs.get(&ev.wd).is_some_and(|r| r.as_os_str().is_empty())
            {
                return Ok(()); // the watched directory is gone
            }
            let Some(dir) = dirs.get(&ev.wd).cloned() else {
                continue;
            };
            let Some(name) = ev.name.as_ref() else {
                continue;
            };
            let rel = dir.join(name);
            let op = if ev.mask.contains(F::IN_CREATE) {
                if recursive && ev.mask.contains(F::IN_ISDIR) {
                    add(&ino, &mut dirs, rel.clone());
                }
                WatchOp::WatchCreate
            } else if ev.mask.contains(F::IN_MODIFY) {
                WatchOp::WatchWrite
            } else if ev.mask.contains(F::IN_DELETE) {
                WatchOp::WatchRemove
            } else if ev.mask.intersects(F::IN_MOVED_FROM | F::IN_MOVED_TO) {
                WatchOp::WatchRename
            } else if ev.mask.contains(F::IN_ATTRIB) {
                WatchOp::WatchChmod
            } else {
                continue;
            };
            let e = WatchEvent {
                name: rel.display().to_string(),
                op: op as i32,
            };
            if tx.blocking_send(Ok(e)).is_err() {
                return Ok(());
            }
        }
        let _ = fd.as_raw_fd();
    }
}
