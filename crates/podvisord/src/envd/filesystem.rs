//! envd's Filesystem service over the agent's file calls: stat, list with
//! depth, mkdir, move, remove, watch as a stream and as polled watchers.
//! Paths are the container's; a relative one (or `~/...`) is under the
//! caller's home, as envd has it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use agent_proto::{
    FileInfo, FileKind, ListDirRequest, MoveRequest, PathRequest, User, WatchOp, WatchRequest,
};
use axum::body::Body;
use axum::http::HeaderMap;
use axum::response::Response;
use futures::StreamExt;

use super::connect::{self, Code, Codec, RpcError};
use super::pb::filesystem as pb;
use crate::sandboxes::{Live, CONTAINER};

/// Events a polled watcher keeps between polls (the oldest dropped).
const WATCHER_EVENTS: usize = 10_000;
/// Polled watchers per sandbox.
const MAX_WATCHERS: usize = 64;

/// The caller's user and the path it names, resolved against its home.
pub fn resolve(
    live: &Live,
    headers: &HeaderMap,
    path: &str,
    username: Option<&str>,
) -> Result<(User, String), RpcError> {
    let (_, uid, gid, home) = super::process::user_of(live, headers, username)?;
    if path.contains('\0') {
        return Err(RpcError::invalid("path contains NUL"));
    }
    let path = if let Some(rest) = path.strip_prefix("~/") {
        format!("{}/{rest}", home.trim_end_matches('/'))
    } else if path == "~" || path.is_empty() {
        home.clone()
    } else if !path.starts_with('/') {
        format!("{}/{path}", home.trim_end_matches('/'))
    } else {
        path.to_string()
    };
    Ok((
        User {
            uid,
            gid,
            additional_gids: Vec::new(),
        },
        path,
    ))
}

/// Go's os.FileMode.String() of a Unix mode ("drwxr-xr-x").
pub fn permissions(mode: u32) -> String {
    let kind = match mode & libc::S_IFMT {
        libc::S_IFDIR => 'd',
        libc::S_IFLNK => 'L',
        libc::S_IFIFO => 'p',
        libc::S_IFSOCK => 'S',
        libc::S_IFCHR => 'c',
        libc::S_IFBLK => 'D',
        _ => '-',
    };
    let mut s = String::with_capacity(10);
    s.push(kind);
    for (i, c) in "rwxrwxrwx".chars().enumerate() {
        s.push(if mode & (1 << (8 - i)) != 0 { c } else { '-' });
    }
    s
}

pub fn entry(i: FileInfo) -> pb::EntryInfo {
    let kind = FileKind::try_from(i.kind).unwrap_or(FileKind::KindUnknown);
    let r#type = match kind {
        FileKind::KindFile => pb::FileType::File,
        FileKind::KindDirectory => pb::FileType::Directory,
        FileKind::KindSymlink => pb::FileType::Symlink,
        FileKind::KindUnknown => pb::FileType::Unspecified,
    };
    pb::EntryInfo {
        name: i.name,
        r#type: r#type as i32,
        path: i.path,
        size: i.size,
        mode: i.mode & 0o7777,
        permissions: permissions(i.mode),
        owner: i.owner,
        group: i.group,
        modified_time: Some(pbjson_types::Timestamp {
            seconds: i.mtime_unix_ns.div_euclid(1_000_000_000),
            nanos: i.mtime_unix_ns.rem_euclid(1_000_000_000) as i32,
        }),
        symlink_target: (!i.symlink_target.is_empty()).then_some(i.symlink_target),
        metadata: HashMap::new(),
        is_symlink: kind == FileKind::KindSymlink,
    }
}

fn agent_err(live: &Live, s: tonic::Status) -> RpcError {
    let _ = live;
    RpcError::from(s)
}

pub async fn stat(
    live: Arc<Live>,
    headers: &HeaderMap,
    codec: Codec,
    req: pb::StatRequest,
) -> Result<Response, RpcError> {
    let (user, path) = resolve(&live, headers, &req.path, None)?;
    let info = live
        .agent
        .clone()
        .stat_path(PathRequest {
            container_id: CONTAINER.into(),
            path,
            user: Some(user),
        })
        .await
        .map_err(|s| agent_err(&live, s))?
        .into_inner();
    Ok(connect::unary_response(
        codec,
        &pb::StatResponse {
            entry: Some(entry(info)),
        },
    ))
}

pub async fn list_dir(
    live: Arc<Live>,
    headers: &HeaderMap,
    codec: Codec,
    req: pb::ListDirRequest,
) -> Result<Response, RpcError> {
    let (user, path) = resolve(&live, headers, &req.path, None)?;
    let list = live
        .agent
        .clone()
        .list_dir(ListDirRequest {
            container_id: CONTAINER.into(),
            path,
            user: Some(user),
            depth: req.depth.max(1),
        })
        .await
        .map_err(|s| agent_err(&live, s))?
        .into_inner();
    Ok(connect::unary_response(
        codec,
        &pb::ListDirResponse {
            entries: list.entries.into_iter().map(entry).collect(),
        },
    ))
}

pub async fn make_dir(
    live: Arc<Live>,
    headers: &HeaderMap,
    codec: Codec,
    req: pb::MakeDirRequest,
) -> Result<Response, RpcError> {
    let (user, path) = resolve(&live, headers, &req.path, None)?;
    let info = live
        .agent
        .clone()
        .make_dir(PathRequest {
            container_id: CONTAINER.into(),
            path,
            user: Some(user),
        })
        .await
        .map_err(|s| agent_err(&live, s))?
        .into_inner();
    Ok(connect::unary_response(
        codec,
        &pb::MakeDirResponse {
            entry: Some(entry(info)),
        },
    ))
}

pub async fn move_path(
    live: Arc<Live>,
    headers: &HeaderMap,
    codec: Codec,
    req: pb::MoveRequest,
) -> Result<Response, RpcError> {
    let (user, source) = resolve(&live, headers, &req.source, None)?;
    let (_, destination) = resolve(&live, headers, &req.destination, None)?;
    let info = live
        .agent
        .clone()
        .move_path(MoveRequest {
            container_id: CONTAINER.into(),
            source,
            destination,
            user: Some(user),
        })
        .await
        .map_err(|s| agent_err(&live, s))?
        .into_inner();
    Ok(connect::unary_response(
        codec,
        &pb::MoveResponse {
            entry: Some(entry(info)),
        },
    ))
}

pub async fn remove(
    live: Arc<Live>,
    headers: &HeaderMap,
    codec: Codec,
    req: pb::RemoveRequest,
) -> Result<Response, RpcError> {
    let (user, path) = resolve(&live, headers, &req.path, None)?;
    live.agent
        .clone()
        .remove_path(PathRequest {
            container_id: CONTAINER.into(),
            path,
            user: Some(user),
        })
        .await
        .map_err(|s| agent_err(&live, s))?;
    Ok(connect::unary_response(codec, &pb::RemoveResponse {}))
}

fn event_type(op: i32) -> pb::EventType {
    match WatchOp::try_from(op) {
        Ok(WatchOp::WatchCreate) => pb::EventType::Create,
        Ok(WatchOp::WatchWrite) => pb::EventType::Write,
        Ok(WatchOp::WatchRemove) => pb::EventType::Remove,
        Ok(WatchOp::WatchRename) => pb::EventType::Rename,
        Ok(WatchOp::WatchChmod) => pb::EventType::Chmod,
        _ => pb::EventType::Unspecified,
    }
}

/// The agent's watch of a directory: its events after the start.
async fn agent_watch(
    live: &Live,
    headers: &HeaderMap,
    path: &str,
    recursive: bool,
) -> Result<tonic::Streaming<agent_proto::WatchEvent>, RpcError> {
    let (user, path) = resolve(live, headers, path, None)?;
    let mut events = live
        .agent
        .clone()
        .watch_dir(WatchRequest {
            container_id: CONTAINER.into(),
            path,
            user: Some(user),
            recursive,
        })
        .await
        .map_err(RpcError::from)?
        .into_inner();
    // The first event says the watch is in place (or the error why not).
    match events.message().await {
        Ok(Some(_)) => Ok(events),
        Ok(None) => Err(RpcError::new(Code::Aborted, "the watch ended at once")),
        Err(s) => Err(RpcError::from(s)),
    }
}

pub async fn watch_dir(live: Arc<Live>, headers: HeaderMap, body: Body) -> Response {
    let (codec, req) = match connect::first_message::<pb::WatchDirRequest>(&headers, body).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let events = match agent_watch(&live, &headers, &req.path, req.recursive).await {
        Ok(e) => e,
        Err(e) => return connect::stream_error(codec, e),
    };
    use pb::watch_dir_response::Event as E;
    let start = futures::stream::once(async {
        Ok(pb::WatchDirResponse {
            event: Some(E::Start(pb::watch_dir_response::StartEvent {})),
        })
    });
    let rest = events.map(|e| match e {
        Ok(e) => Ok(pb::WatchDirResponse {
            event: Some(E::Filesystem(pb::FilesystemEvent {
                name: e.name,
                r#type: event_type(e.op) as i32,
                entry: None,
            })),
        }),
        Err(s) => Err(RpcError::from(s)),
    });
    connect::stream_response(codec, start.chain(rest))
}

/// Polled watchers: each a task that buffers its watch's events.
#[derive(Default)]
pub struct Watchers {
    by_id: Mutex<HashMap<String, Watcher>>,
}

struct Watcher {
    events: Arc<Mutex<VecDeque<pb::FilesystemEvent>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Watchers {
    pub fn clear(&self) {
        self.by_id.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

pub async fn create_watcher(
    live: Arc<Live>,
    headers: &HeaderMap,
    codec: Codec,
    req: pb::CreateWatcherRequest,
) -> Result<Response, RpcError> {
    if live
        .watchers
        .by_id
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .len()
        >= MAX_WATCHERS
    {
        return Err(RpcError::new(
            Code::ResourceExhausted,
            format!("at most {MAX_WATCHERS} watchers per sandbox"),
        ));
    }
    let mut stream = agent_watch(&live, headers, &req.path, req.recursive).await?;
    let events: Arc<Mutex<VecDeque<pb::FilesystemEvent>>> = Arc::default();
    let sink = Arc::clone(&events);
    let task = tokio::spawn(async move {
        while let Ok(Some(e)) = stream.message().await {
            let mut q = sink.lock().unwrap_or_else(|e| e.into_inner());
            if q.len() >= WATCHER_EVENTS {
                q.pop_front();
            }
            q.push_back(pb::FilesystemEvent {
                name: e.name,
                r#type: event_type(e.op) as i32,
                entry: None,
            });
        }
    });
    let id = crate::auth::random_hex(8);
    live.watchers
        .by_id
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id.clone(), Watcher { events, task });
    Ok(connect::unary_response(
        codec,
        &pb::CreateWatcherResponse { watcher_id: id },
    ))
}

pub async fn get_watcher_events(
    live: Arc<Live>,
    codec: Codec,
    req: pb::GetWatcherEventsRequest,
) -> Result<Response, RpcError> {
    let map = live
        .watchers
        .by_id
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let w = map
        .get(&req.watcher_id)
        .ok_or_else(|| RpcError::not_found(format!("watcher {:?} not found", req.watcher_id)))?;
    let events: Vec<_> = w
        .events
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .drain(..)
        .collect();
    drop(map);
    Ok(connect::unary_response(
        codec,
        &pb::GetWatcherEventsResponse { events },
    ))
}

pub async fn remove_watcher(
    live: Arc<Live>,
    codec: Codec,
    req: pb::RemoveWatcherRequest,
) -> Result<Response, RpcError> {
    let removed = live
        .watchers
        .by_id
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&req.watcher_id);
    if removed.is_none() {
        return Err(RpcError::not_found(format!(
            "watcher {:?} not found",
            req.watcher_id
        )));
    }
    Ok(connect::unary_response(
        codec,
        &pb::RemoveWatcherResponse {},
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permissions_read_as_go_prints_them() {
        assert_eq!(permissions(libc::S_IFDIR | 0o755), "drwxr-xr-x");
        assert_eq!(permissions(libc::S_IFREG | 0o644), "-rw-r--r--");
        assert_eq!(permissions(libc::S_IFLNK | 0o777), "Lrwxrwxrwx");
    }
}
