//! E2B's in-sandbox protocol (envd), served by podvisord on the sandbox's
//! behalf and carried to its agent. A request is for a sandbox when its
//! `Host` is `{port}-{sandboxID}.{domain}` or it carries the
//! `E2b-Sandbox-Id` and `E2b-Sandbox-Port` headers (E2B's SDKs send both
//! ways); it must carry the sandbox's access token (`X-Access-Token`).

pub use podvisord::{connect, pb};

pub mod files;
pub mod filesystem;
pub mod process;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::sandboxes::Live;
use crate::AppState;
use connect::{Code, RpcError};

/// The port E2B's SDKs reach envd on.
pub const ENVD_PORT: u16 = 49983;

/// Which sandbox and port a request is for, if any.
pub fn target(req: &Request) -> Option<(String, u16)> {
    let h = req.headers();
    let header = |n: &str| h.get(n).and_then(|v| v.to_str().ok());
    if let Some(id) = header("e2b-sandbox-id") {
        let port = header("e2b-sandbox-port")
            .and_then(|p| p.parse().ok())
            .unwrap_or(ENVD_PORT);
        return Some((id.to_string(), port));
    }
    let host = header("host")
        .map(str::to_string)
        .or_else(|| req.uri().host().map(str::to_string))?;
    let first = host.split('.').next()?;
    // A dotless host ("localhost:3000") is podvisord's own.
    if !host.contains('.') {
        return None;
    }
    let (port, id) = first.split_once('-')?;
    let port: u16 = port.parse().ok()?;
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    Some((id.to_string(), port))
}

/// The live sandbox a request is for, its token checked; a paused one made
/// with `autoResume` is resumed for a request that carries its token.
async fn sandbox_of(
    state: &Arc<AppState>,
    req_target: Option<(String, u16)>,
    headers: &HeaderMap,
) -> Result<Arc<Live>, RpcError> {
    let Some((id, port)) = req_target else {
        return Err(RpcError::not_found("no sandbox named"));
    };
    let token = headers
        .get("x-access-token")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let live = match state.registry.get(&id) {
        Some(live) => Some(live),
        None if port == ENVD_PORT => {
            crate::sandboxes::auto_resume(state, &id, Some(token.as_bytes())).await
        }
        None => None,
    };
    // The same answer for a sandbox that does not exist and one whose
    // token is wrong: ids are not secrets, but nothing is told.
    let live = live.ok_or_else(|| RpcError::not_found(format!("sandbox {id:?} not found")))?;
    if !crate::auth::same(token.as_bytes(), live.envd_token.as_bytes()) {
        return Err(RpcError::new(
            Code::Unauthenticated,
            "missing or wrong X-Access-Token for this sandbox",
        ));
    }
    // Other ports are the sandbox's own (`crate::ports`), never envd.
    if port != ENVD_PORT {
        return Err(RpcError::not_found(format!("port {port} is not envd's")));
    }
    Ok(live)
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/process.Process/{method}", post(process_call))
        .route("/filesystem.Filesystem/{method}", post(filesystem_call))
        .route(
            "/files",
            get(files_call)
                .post(files_call)
                .layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/health", get(health))
        .fallback(|| async { RpcError::not_found("no such envd route") })
        .with_state(state)
}

async fn health(State(state): State<Arc<AppState>>, req: Request) -> Response {
    match sandbox_of(&state, target(&req), req.headers()).await {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => e.into_response(),
    }
}

async fn unary<T: connect::Msg>(
    headers: &HeaderMap,
    body: Body,
) -> Result<(connect::Codec, T), RpcError> {
    let bytes = axum::body::to_bytes(body, connect::MAX_MESSAGE)
        .await
        .map_err(|_| RpcError::new(Code::ResourceExhausted, "message too large"))?;
    connect::decode_unary(headers, &bytes)
}

async fn process_call(
    State(state): State<Arc<AppState>>,
    Path(method): Path<String>,
    req: Request,
) -> Response {
    let t = target(&req);
    let (parts, body) = req.into_parts();
    let headers = parts.headers;
    let live = match sandbox_of(&state, t, &headers).await {
        Ok(l) => l,
        Err(e) => return e.into_response(),
    };
    let r = match method.as_str() {
        "Start" => return process::start(live, headers, body).await,
        "Connect" => return process::connect_to(live, headers, body).await,
        "StreamInput" => return process::stream_input(live, headers, body).await,
        "List" => match unary(&headers, body).await {
            Ok((c, m)) => process::list(live, c, m).await,
            Err(e) => Err(e),
        },
        "SendInput" => match unary(&headers, body).await {
            Ok((c, m)) => process::send_input(live, c, m).await,
            Err(e) => Err(e),
        },
        "SendSignal" => match unary(&headers, body).await {
            Ok((c, m)) => process::send_signal(live, c, m).await,
            Err(e) => Err(e),
        },
        "CloseStdin" => match unary(&headers, body).await {
            Ok((c, m)) => process::close_stdin(live, c, m).await,
            Err(e) => Err(e),
        },
        "Update" => match unary(&headers, body).await {
            Ok((c, m)) => process::update(live, c, m).await,
            Err(e) => Err(e),
        },
        other => Err(RpcError::new(
            Code::Unimplemented,
            format!("process.Process/{other} does not exist"),
        )),
    };
    r.unwrap_or_else(IntoResponse::into_response)
}

async fn files_call(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let live = match sandbox_of(&state, target(&req), req.headers()).await {
        Ok(l) => l,
        Err(e) => return e.into_response(),
    };
    if req.method() == axum::http::Method::GET {
        files::download(live, req).await
    } else {
        files::upload(live, req).await
    }
}

async fn filesystem_call(
    State(state): State<Arc<AppState>>,
    Path(method): Path<String>,
    req: Request,
) -> Response {
    let t = target(&req);
    let (parts, body) = req.into_parts();
    let headers = parts.headers;
    let live = match sandbox_of(&state, t, &headers).await {
        Ok(l) => l,
        Err(e) => return e.into_response(),
    };
    macro_rules! call {
        ($f:path) => {
            match unary(&headers, body).await {
                Ok((c, m)) => $f(live, &headers, c, m).await,
                Err(e) => Err(e),
            }
        };
    }
    let r = match method.as_str() {
        "WatchDir" => return filesystem::watch_dir(live, headers, body).await,
        "Stat" => call!(filesystem::stat),
        "ListDir" => call!(filesystem::list_dir),
        "MakeDir" => call!(filesystem::make_dir),
        "Move" => call!(filesystem::move_path),
        "Remove" => call!(filesystem::remove),
        "CreateWatcher" => call!(filesystem::create_watcher),
        "GetWatcherEvents" => match unary(&headers, body).await {
            Ok((c, m)) => filesystem::get_watcher_events(live, c, m).await,
            Err(e) => Err(e),
        },
        "RemoveWatcher" => match unary(&headers, body).await {
            Ok((c, m)) => filesystem::remove_watcher(live, c, m).await,
            Err(e) => Err(e),
        },
        other => Err(RpcError::new(
            Code::Unimplemented,
            format!("filesystem.Filesystem/{other} does not exist"),
        )),
    };
    r.unwrap_or_else(IntoResponse::into_response)
}
