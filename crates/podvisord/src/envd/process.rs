//! envd's Process service over our agent: each started process is an exec
//! in the sandbox's container. Its output is pumped from the agent into a
//! bounded history (replayed to whoever connects later) and to the streams
//! attached to it; an attached stream that reads slowly slows the pump, so
//! a flood waits in the guest's pipe, not in host memory.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_proto::{
    ConsoleSize, ExecProcessRequest, OutputStream, ProcessRequest, ReadOutputRequest,
    ResizeTtyRequest, SignalProcessRequest, StdinChunk, User,
};
use axum::body::Body;
use axum::http::HeaderMap;
use axum::response::Response;
use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use super::connect::{self, Code, Codec, Envelopes, RpcError};
use super::pb::process as pb;
use crate::sandboxes::{Live, CONTAINER};

/// Output kept per process for `Connect` (the oldest dropped beyond it).
const HISTORY_BYTES: usize = 1 << 20;
/// Events in flight to one attached stream.
const SUBSCRIBER_QUEUE: usize = 16;
/// How long output still drains after the process exited (a background
/// child may hold the pipe open for ever).
const DRAIN: Duration = Duration::from_secs(2);

#[derive(Clone, Debug)]
enum Event {
    Data(pb::process_event::data_event::Output),
    End(pb::process_event::EndEvent),
}

impl Event {
    fn size(&self) -> usize {
        use pb::process_event::data_event::Output;
        match self {
            Event::Data(Output::Stdout(b) | Output::Stderr(b) | Output::Pty(b)) => b.len(),
            Event::End(_) => 0,
        }
    }

    fn message(self) -> pb::ProcessEvent {
        use pb::process_event::Event as E;
        pb::ProcessEvent {
            event: Some(match self {
                Event::Data(o) => E::Data(pb::process_event::DataEvent { output: Some(o) }),
                Event::End(e) => E::End(e),
            }),
        }
    }
}

#[derive(Default)]
struct Fanout {
    history: VecDeque<Event>,
    bytes: usize,
    subscribers: Vec<mpsc::Sender<Event>>,
    ended: bool,
}

/// A process started through envd.
pub struct Proc {
    pub pid: u32,
    exec_id: String,
    pub tag: Option<String>,
    pub config: pb::ProcessConfig,
    pty: bool,
    fanout: Mutex<Fanout>,
    stdin: Mutex<Option<mpsc::Sender<StdinChunk>>>,
    done: watch::Sender<bool>,
}

impl Proc {
    /// Attaches a stream: what was output so far, then what comes.
    fn subscribe(&self) -> (Vec<Event>, mpsc::Receiver<Event>) {
        let (tx, rx) = mpsc::channel(SUBSCRIBER_QUEUE);
        let mut f = self.fanout.lock().unwrap_or_else(|e| e.into_inner());
        let past = f.history.iter().cloned().collect();
        if !f.ended {
            f.subscribers.push(tx);
        }
        (past, rx)
    }

    async fn publish(&self, e: Event) {
        let subscribers = {
            let mut f = self.fanout.lock().unwrap_or_else(|e| e.into_inner());
            if matches!(e, Event::End(_)) {
                f.ended = true;
            }
            f.bytes += e.size();
            f.history.push_back(e.clone());
            while f.bytes > HISTORY_BYTES {
                match f.history.pop_front() {
                    Some(old) => f.bytes -= old.size(),
                    None => break,
                }
            }
            f.subscribers.retain(|s| !s.is_closed());
            if matches!(e, Event::End(_)) {
                std::mem::take(&mut f.subscribers)
            } else {
                f.subscribers.clone()
            }
        };
        for s in subscribers {
            let _ = s.send(e.clone()).await;
        }
    }

    async fn send_stdin(&self, data: Vec<u8>, close: bool) -> Result<(), RpcError> {
        let tx = self.stdin.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(tx) = tx else {
            return Err(RpcError::new(
                Code::FailedPrecondition,
                "stdin is closed (start the process with stdin enabled)",
            ));
        };
        let chunk = StdinChunk {
            container_id: CONTAINER.into(),
            exec_id: self.exec_id.clone(),
            data,
            close,
        };
        if close {
            self.stdin.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
        tx.send(chunk)
            .await
            .map_err(|_| RpcError::new(Code::FailedPrecondition, "stdin is closed"))
    }

    fn info(&self) -> pb::ProcessInfo {
        pb::ProcessInfo {
            config: Some(self.config.clone()),
            pid: self.pid,
            tag: self.tag.clone(),
        }
    }
}

pub struct Processes {
    by_pid: Mutex<HashMap<u32, Arc<Proc>>>,
    next: AtomicU64,
    /// In every exec id: a guest resumed or forked from a snapshot still
    /// holds the execs of the host session before, numbered from 0 too.
    session: String,
}

impl Default for Processes {
    fn default() -> Self {
        Processes {
            by_pid: Mutex::default(),
            next: AtomicU64::new(0),
            session: crate::auth::random_hex(4),
        }
    }
}

impl Processes {
    fn insert(&self, p: Arc<Proc>) {
        self.by_pid
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(p.pid, p);
    }

    fn remove(&self, pid: u32) {
        self.by_pid
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&pid);
    }

    fn select(&self, sel: Option<&pb::ProcessSelector>) -> Result<Arc<Proc>, RpcError> {
        use pb::process_selector::Selector;
        let map = self.by_pid.lock().unwrap_or_else(|e| e.into_inner());
        match sel.and_then(|s| s.selector.as_ref()) {
            Some(Selector::Pid(pid)) => map
                .get(pid)
                .cloned()
                .ok_or_else(|| RpcError::not_found(format!("process with pid {pid} not found"))),
            Some(Selector::Tag(tag)) => map
                .values()
                .find(|p| p.tag.as_deref() == Some(tag.as_str()))
                .cloned()
                .ok_or_else(|| RpcError::not_found(format!("process with tag {tag:?} not found"))),
            None => Err(RpcError::invalid("no process selected (pid or tag)")),
        }
    }

    fn list(&self) -> Vec<pb::ProcessInfo> {
        let map = self.by_pid.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = map.values().map(|p| p.info()).collect();
        v.sort_by_key(|p| p.pid);
        v
    }

    /// Detaches every stream (the sandbox is ending).
    pub fn end_all(&self) {
        let map = std::mem::take(&mut *self.by_pid.lock().unwrap_or_else(|e| e.into_inner()));
        for p in map.values() {
            let _ = p.done.send(true);
        }
    }
}

/// Who a process runs as: the `Authorization: Basic base64(user:)` the
/// SDKs send, else envd's default user `user` (root where the template
/// has none).
pub fn user_of(
    live: &Live,
    headers: &HeaderMap,
    username: Option<&str>,
) -> Result<(String, u32, u32, String), RpcError> {
    let from_header = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .map(|b| {
            use base64::Engine;
            let raw = base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .map_err(|_| {
                    RpcError::new(Code::Unauthenticated, "malformed Authorization header")
                })?;
            let text = String::from_utf8(raw).map_err(|_| {
                RpcError::new(Code::Unauthenticated, "malformed Authorization header")
            })?;
            Ok::<_, RpcError>(text.split(':').next().unwrap_or_default().to_string())
        })
        .transpose()?
        .filter(|u| !u.is_empty());
    let asked = username
        .filter(|u| !u.is_empty())
        .map(str::to_string)
        .or(from_header);
    let name = match asked {
        Some(u) => u,
        None if live.template.user("user").is_some() => "user".into(),
        None => "root".into(),
    };
    let (uid, gid, home) = live
        .template
        .user(&name)
        .ok_or_else(|| RpcError::invalid(format!("user {name:?} does not exist in the sandbox")))?;
    Ok((name, uid, gid, home))
}

fn environment(
    live: &Live,
    user: &str,
    home: &str,
    extra: &HashMap<String, String>,
    pty: bool,
) -> Vec<String> {
    let mut env: Vec<(String, String)> = vec![
        (
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ),
        ("HOME".into(), home.into()),
        ("USER".into(), user.into()),
        ("LOGNAME".into(), user.into()),
        ("SHELL".into(), "/bin/bash".into()),
    ];
    if pty {
        env.push(("TERM".into(), "xterm-256color".into()));
    }
    let mut set = |k: &String, v: &String| {
        env.retain(|(key, _)| key != k);
        env.push((k.clone(), v.clone()));
    };
    let mut sandbox: Vec<_> = live.env.iter().collect();
    sandbox.sort();
    for (k, v) in sandbox {
        set(k, v);
    }
    let mut asked: Vec<_> = extra.iter().collect();
    asked.sort();
    for (k, v) in asked {
        set(k, v);
    }
    env.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

fn valid_env(envs: &HashMap<String, String>) -> Result<(), RpcError> {
    for (k, v) in envs {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(RpcError::invalid(format!(
                "environment variable {k:?} is not valid"
            )));
        }
    }
    Ok(())
}

/// The keep-alive interval the client asked for (`Keepalive-Ping-Interval`,
/// seconds).
fn keepalive(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get("keepalive-ping-interval")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map(Duration::from_secs)
}

/// `Connect-Timeout-Ms`: when a stream must end.
fn deadline(headers: &HeaderMap) -> Option<tokio::time::Instant> {
    headers
        .get("connect-timeout-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map(|ms| tokio::time::Instant::now() + Duration::from_millis(ms))
}

pub async fn start(live: Arc<Live>, headers: HeaderMap, body: Body) -> Response {
    let (codec, req) = match connect::first_message::<pb::StartRequest>(&headers, body).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    match spawn(&live, &headers, req).await {
        Ok((p, past, rx)) => {
            let events = attached(p, past, rx, &headers);
            connect::stream_response(
                codec,
                futures::StreamExt::map(events, |r| {
                    r.map(|e| pb::StartResponse { event: Some(e) })
                }),
            )
        }
        Err(e) => connect::stream_error(codec, e),
    }
}

pub async fn connect_to(live: Arc<Live>, headers: HeaderMap, body: Body) -> Response {
    let (codec, req) = match connect::first_message::<pb::ConnectRequest>(&headers, body).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let p = match live.processes.select(req.process.as_ref()) {
        Ok(p) => p,
        Err(e) => return connect::stream_error(codec, e),
    };
    let (past, rx) = p.subscribe();
    let events = attached(p, past, rx, &headers);
    connect::stream_response(
        codec,
        futures::StreamExt::map(events, |r| {
            r.map(|e| pb::ConnectResponse { event: Some(e) })
        }),
    )
}

/// What a stream attached to `p` sends: its start (pid), what it output so
/// far, then the rest, with keep-alives and the call's deadline as asked.
fn attached(
    p: Arc<Proc>,
    past: Vec<Event>,
    rx: mpsc::Receiver<Event>,
    headers: &HeaderMap,
) -> impl Stream<Item = Result<pb::ProcessEvent, RpcError>> + Send + 'static {
    let start = pb::ProcessEvent {
        event: Some(pb::process_event::Event::Start(
            pb::process_event::StartEvent { pid: p.pid },
        )),
    };
    follow(
        p,
        Some(start),
        past,
        rx,
        keepalive(headers),
        deadline(headers),
    )
}

/// A stream of the process's events: `first`, the history, then live
/// events, keep-alives while idle, until the end (or the deadline).
fn follow(
    p: Arc<Proc>,
    first: Option<pb::ProcessEvent>,
    past: Vec<Event>,
    rx: mpsc::Receiver<Event>,
    keepalive: Option<Duration>,
    deadline: Option<tokio::time::Instant>,
) -> impl Stream<Item = Result<pb::ProcessEvent, RpcError>> + Send + 'static {
    struct St {
        _p: Arc<Proc>,
        queue: VecDeque<pb::ProcessEvent>,
        rx: mpsc::Receiver<Event>,
        ended: bool,
        keepalive: Option<Duration>,
        deadline: Option<tokio::time::Instant>,
        done: watch::Receiver<bool>,
    }
    let mut queue: VecDeque<pb::ProcessEvent> = first.into_iter().collect();
    let ended = past.iter().any(|e| matches!(e, Event::End(_)));
    queue.extend(past.into_iter().map(Event::message));
    let done = p.done.subscribe();
    let st = St {
        _p: p,
        queue,
        rx,
        ended,
        keepalive,
        deadline,
        done,
    };
    futures::stream::unfold(Some(st), |st| async move {
        let mut st = st?;
        if let Some(e) = st.queue.pop_front() {
            return Some((Ok(e), Some(st)));
        }
        if st.ended {
            return None;
        }
        let ka = st.keepalive.unwrap_or(Duration::from_secs(3600));
        let dl = st.deadline;
        let sleep_deadline = async move {
            match dl {
                Some(d) => tokio::time::sleep_until(d).await,
                None => futures::future::pending().await,
            }
        };
        enum Next {
            Event(Option<Event>),
            KeepAlive,
            Deadline,
            Ended,
        }
        let next = tokio::select! {
            e = st.rx.recv() => Next::Event(e),
            _ = tokio::time::sleep(ka), if st.keepalive.is_some() => Next::KeepAlive,
            _ = sleep_deadline => Next::Deadline,
            _ = st.done.wait_for(|d| *d) => Next::Ended,
        };
        match next {
            Next::Event(Some(e)) => {
                if matches!(e, Event::End(_)) {
                    st.ended = true;
                }
                Some((Ok(e.message()), Some(st)))
            }
            Next::Event(None) => None,
            Next::KeepAlive => {
                let k = pb::ProcessEvent {
                    event: Some(pb::process_event::Event::Keepalive(
                        pb::process_event::KeepAlive {},
                    )),
                };
                Some((Ok(k), Some(st)))
            }
            Next::Deadline => Some((
                Err(RpcError::new(
                    Code::DeadlineExceeded,
                    "the call's deadline passed (the process runs on)",
                )),
                None,
            )),
            Next::Ended => Some((
                Err(RpcError::new(Code::Unavailable, "the sandbox ended")),
                None,
            )),
        }
    })
}

type Spawned = (Arc<Proc>, Vec<Event>, mpsc::Receiver<Event>);

async fn spawn(
    live: &Arc<Live>,
    headers: &HeaderMap,
    req: pb::StartRequest,
) -> Result<Spawned, RpcError> {
    let config = req
        .process
        .ok_or_else(|| RpcError::invalid("process is missing"))?;
    if config.cmd.is_empty() {
        return Err(RpcError::invalid("cmd is empty"));
    }
    valid_env(&config.envs)?;
    let (user, uid, gid, home) = user_of(live, headers, None)?;
    let pty = req.pty.as_ref().map(|p| p.size.unwrap_or_default());
    let mut args = vec![config.cmd.clone()];
    args.extend(config.args.iter().cloned());
    let cwd = config
        .cwd
        .clone()
        .filter(|c| !c.is_empty())
        .unwrap_or(home.clone());
    if !cwd.starts_with('/') {
        return Err(RpcError::invalid(format!(
            "cwd {cwd:?} is not an absolute path"
        )));
    }
    let process = agent_proto::Process {
        args,
        env: environment(live, &user, &home, &config.envs, pty.is_some()),
        cwd,
        user: Some(User {
            uid,
            gid,
            additional_gids: Vec::new(),
        }),
        terminal: pty.is_some(),
        console_size: pty.as_ref().map(|s| ConsoleSize {
            rows: s.rows.max(1),
            cols: s.cols.max(1),
        }),
        ..Default::default()
    };
    let n = live.processes.next.fetch_add(1, Ordering::Relaxed);
    let exec_id = format!("envd-{}-{n}", live.processes.session);
    let mut agent = live.agent.clone();
    let pid = agent
        .exec_process(ExecProcessRequest {
            container_id: CONTAINER.into(),
            exec_id: exec_id.clone(),
            process: Some(process),
        })
        .await
        .map_err(|s| {
            let m = s.message().to_string();
            RpcError::new(Code::from_grpc(s.code()), m)
        })?
        .into_inner()
        .pid;
    let (stdin_tx, stdin_rx) = mpsc::channel::<StdinChunk>(8);
    let (done, _) = watch::channel(false);
    let p = Arc::new(Proc {
        pid,
        exec_id: exec_id.clone(),
        tag: req.tag.clone(),
        config,
        pty: pty.is_some(),
        fanout: Mutex::new(Fanout::default()),
        stdin: Mutex::new(Some(stdin_tx)),
        done,
    });
    let (past, rx) = p.subscribe();
    live.processes.insert(Arc::clone(&p));
    // Stdin: one stream to the agent for the process's life.
    {
        let mut agent = agent.clone();
        tokio::spawn(async move {
            let _ = agent.write_stdin(ReceiverStream::new(stdin_rx)).await;
        });
    }
    if !req.stdin.unwrap_or(false) && !p.pty {
        let _ = p.send_stdin(Vec::new(), true).await;
    }
    tokio::spawn(pump(Arc::clone(live), Arc::clone(&p)));
    Ok((p, past, rx))
}

/// Moves the process's output from the agent to its streams, then its end.
async fn pump(live: Arc<Live>, p: Arc<Proc>) {
    use pb::process_event::data_event::Output;
    let read = |stream: OutputStream| {
        let mut agent = live.agent.clone();
        let p = Arc::clone(&p);
        async move {
            let chunks = agent
                .read_output(ReadOutputRequest {
                    container_id: CONTAINER.into(),
                    exec_id: p.exec_id.clone(),
                    stream: stream as i32,
                })
                .await;
            let Ok(chunks) = chunks else { return };
            let mut chunks = chunks.into_inner();
            while let Ok(Some(c)) = chunks.message().await {
                if c.data.is_empty() {
                    continue;
                }
                let out = match (stream, p.pty) {
                    (_, true) => Output::Pty(c.data),
                    (OutputStream::Stdout, false) => Output::Stdout(c.data),
                    (OutputStream::Stderr, false) => Output::Stderr(c.data),
                };
                p.publish(Event::Data(out)).await;
            }
        }
    };
    let out = tokio::spawn(read(OutputStream::Stdout));
    let err = tokio::spawn(read(OutputStream::Stderr));
    let mut agent = live.agent.clone();
    let waited = agent
        .wait_process(ProcessRequest {
            container_id: CONTAINER.into(),
            exec_id: p.exec_id.clone(),
        })
        .await;
    let _ = tokio::time::timeout(DRAIN, out).await;
    let _ = tokio::time::timeout(DRAIN, err).await;
    let end = match waited {
        Ok(w) => {
            let w = w.into_inner();
            if w.signal != 0 {
                pb::process_event::EndEvent {
                    exit_code: -1,
                    exited: false,
                    status: format!("signal: {}", signal_name(w.signal)),
                    error: None,
                }
            } else {
                pb::process_event::EndEvent {
                    exit_code: w.exit_code,
                    exited: true,
                    status: format!("exit status {}", w.exit_code),
                    error: None,
                }
            }
        }
        Err(s) => pb::process_event::EndEvent {
            exit_code: -1,
            exited: false,
            status: "unknown".into(),
            error: Some(format!("waiting for the process: {}", s.message())),
        },
    };
    p.publish(Event::End(end)).await;
    p.stdin.lock().unwrap_or_else(|e| e.into_inner()).take();
    live.processes.remove(p.pid);
    let _ = agent
        .remove_process(ProcessRequest {
            container_id: CONTAINER.into(),
            exec_id: p.exec_id.clone(),
        })
        .await;
}

fn signal_name(sig: u32) -> &'static str {
    match sig as i32 {
        libc::SIGKILL => "killed",
        libc::SIGTERM => "terminated",
        libc::SIGINT => "interrupt",
        libc::SIGHUP => "hangup",
        libc::SIGSEGV => "segmentation fault",
        libc::SIGABRT => "aborted",
        libc::SIGPIPE => "broken pipe",
        _ => "signal",
    }
}

pub async fn list(
    live: Arc<Live>,
    codec: Codec,
    _req: pb::ListRequest,
) -> Result<Response, RpcError> {
    Ok(connect::unary_response(
        codec,
        &pb::ListResponse {
            processes: live.processes.list(),
        },
    ))
}

fn input_bytes(input: Option<pb::ProcessInput>) -> Vec<u8> {
    use pb::process_input::Input;
    match input.and_then(|i| i.input) {
        Some(Input::Stdin(b) | Input::Pty(b)) => b,
        None => Vec::new(),
    }
}

pub async fn send_input(
    live: Arc<Live>,
    codec: Codec,
    req: pb::SendInputRequest,
) -> Result<Response, RpcError> {
    let p = live.processes.select(req.process.as_ref())?;
    p.send_stdin(input_bytes(req.input), false).await?;
    Ok(connect::unary_response(codec, &pb::SendInputResponse {}))
}

pub async fn close_stdin(
    live: Arc<Live>,
    codec: Codec,
    req: pb::CloseStdinRequest,
) -> Result<Response, RpcError> {
    let p = live.processes.select(req.process.as_ref())?;
    p.send_stdin(Vec::new(), true).await?;
    Ok(connect::unary_response(codec, &pb::CloseStdinResponse {}))
}

pub async fn send_signal(
    live: Arc<Live>,
    codec: Codec,
    req: pb::SendSignalRequest,
) -> Result<Response, RpcError> {
    let p = live.processes.select(req.process.as_ref())?;
    let signal = match pb::Signal::try_from(req.signal) {
        Ok(pb::Signal::Sigterm) => libc::SIGTERM,
        Ok(pb::Signal::Sigkill) => libc::SIGKILL,
        _ => return Err(RpcError::invalid("signal must be SIGTERM or SIGKILL")),
    };
    let mut agent = live.agent.clone();
    agent
        .signal_process(SignalProcessRequest {
            container_id: CONTAINER.into(),
            exec_id: p.exec_id.clone(),
            signal: signal as u32,
            all: false,
        })
        .await?;
    Ok(connect::unary_response(codec, &pb::SendSignalResponse {}))
}

pub async fn update(
    live: Arc<Live>,
    codec: Codec,
    req: pb::UpdateRequest,
) -> Result<Response, RpcError> {
    let p = live.processes.select(req.process.as_ref())?;
    if let Some(size) = req.pty.and_then(|p| p.size) {
        let mut agent = live.agent.clone();
        agent
            .resize_tty(ResizeTtyRequest {
                container_id: CONTAINER.into(),
                exec_id: p.exec_id.clone(),
                rows: size.rows.max(1),
                cols: size.cols.max(1),
            })
            .await?;
    }
    Ok(connect::unary_response(codec, &pb::UpdateResponse {}))
}

/// Client stream: a start event naming the process, then data events.
pub async fn stream_input(live: Arc<Live>, headers: HeaderMap, body: Body) -> Response {
    use pb::stream_input_request::Event as E;
    let codec = match connect::stream_codec(&headers) {
        Ok(c) => c,
        Err(e) => return e.into_response_unary(),
    };
    let mut env = Envelopes::new(body);
    let mut target: Option<Arc<Proc>> = None;
    let result = async {
        while let Some(m) = env.next::<pb::StreamInputRequest>(codec).await? {
            match m.event {
                Some(E::Start(s)) => target = Some(live.processes.select(s.process.as_ref())?),
                Some(E::Data(d)) => {
                    let p = target
                        .as_ref()
                        .ok_or_else(|| RpcError::invalid("data before the start event"))?;
                    p.send_stdin(input_bytes(d.input), false).await?;
                }
                Some(E::Keepalive(_)) | None => {}
            }
        }
        Ok::<_, RpcError>(())
    }
    .await;
    match result {
        Ok(()) => connect::stream_response(
            codec,
            futures::stream::once(async { Ok(pb::StreamInputResponse {}) }),
        ),
        Err(e) => connect::stream_error(codec, e),
    }
}
