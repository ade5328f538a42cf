//! envd's file transfer over plain HTTP: `GET /files?path=` streams a
//! file down, `POST /files?path=` takes one up (`application/octet-stream`)
//! or several (`multipart/form-data`, each part's filename its path). Both
//! stream: nothing is held whole in host memory, and there is no size cap
//! but the sandbox's disk (507 when it is full).

// Handlers' errors are whole answers; they are made once per request.
#![allow(clippy::result_large_err)]

use std::sync::Arc;

use agent_proto::{FileChunk, PathRequest};
use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::filesystem::resolve;
use super::RpcError;
use crate::sandboxes::{Live, CONTAINER};

/// envd's error answer: `{"code": status, "message"}`.
fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        axum::Json(json!({"code": status.as_u16(), "message": message.into()})),
    )
        .into_response()
}

fn from_rpc(e: RpcError) -> Response {
    use super::connect::Code;
    let status = match e.code {
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::InvalidArgument | Code::FailedPrecondition => StatusCode::BAD_REQUEST,
        Code::ResourceExhausted => StatusCode::INSUFFICIENT_STORAGE,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, e.message)
}

#[derive(Deserialize)]
struct Query {
    path: Option<String>,
    username: Option<String>,
}

fn query(req: &Request) -> Result<Query, Response> {
    serde_urlencoded::from_str(req.uri().query().unwrap_or(""))
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("query: {e}")))
}

pub async fn download(live: Arc<Live>, req: Request) -> Response {
    let q = match query(&req) {
        Ok(q) => q,
        Err(r) => return r,
    };
    let Some(path) = q.path else {
        return error(StatusCode::BAD_REQUEST, "path is missing");
    };
    let (user, path) = match resolve(&live, req.headers(), &path, q.username.as_deref()) {
        Ok(r) => r,
        Err(e) => return from_rpc(e),
    };
    let mut chunks = match live
        .agent
        .clone()
        .read_file(PathRequest {
            container_id: CONTAINER.into(),
            path: path.clone(),
            user: Some(user),
        })
        .await
    {
        Ok(s) => s.into_inner(),
        Err(s) => return from_rpc(s.into()),
    };
    // The first chunk (or error) before the status line: a file that is
    // not there is a 404, not a 200 that breaks off.
    let first = match chunks.message().await {
        Ok(c) => c,
        Err(s) => return from_rpc(s.into()),
    };
    let body =
        futures::stream::iter(first.map(|c| Ok::<_, std::io::Error>(bytes::Bytes::from(c.data))))
            .chain(chunks.map(|c| {
                c.map(|c| bytes::Bytes::from(c.data))
                    .map_err(|s| std::io::Error::other(s.message().to_string()))
            }));
    let name = path.rsplit('/').next().unwrap_or("file").replace('"', "");
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("inline; filename=\"{name}\""),
            ),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

/// Streams `data` into `path` in the sandbox; the written file's entry.
async fn write_one<S>(
    live: &Live,
    user: agent_proto::User,
    path: String,
    data: S,
) -> Result<agent_proto::FileInfo, Response>
where
    S: Stream<Item = Result<bytes::Bytes, String>> + Send + Unpin,
{
    let (tx, rx) = mpsc::channel::<FileChunk>(4);
    let first = FileChunk {
        container_id: CONTAINER.into(),
        path,
        user: Some(user),
        data: Vec::new(),
    };
    if tx.send(first).await.is_err() {
        return Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "writing to the sandbox",
        ));
    }
    let mut agent = live.agent.clone();
    let call = agent.write_file(ReceiverStream::new(rx));
    let feed = async move {
        let mut data = data;
        while let Some(chunk) = data.next().await {
            let chunk = chunk?;
            let msg = FileChunk {
                data: chunk.to_vec(),
                ..Default::default()
            };
            if tx.send(msg).await.is_err() {
                return Ok(()); // the agent ended the call: its answer says why
            }
        }
        Ok::<_, String>(())
    };
    tokio::pin!(call);
    tokio::pin!(feed);
    let mut fed = false;
    loop {
        tokio::select! {
            r = &mut call => {
                return r.map(|r| r.into_inner()).map_err(|s| from_rpc(s.into()));
            }
            f = &mut feed, if !fed => {
                fed = true;
                if let Err(e) = f {
                    // Dropping the call resets its stream: the agent
                    // removes the partial file.
                    return Err(error(StatusCode::BAD_REQUEST, format!("upload broke off: {e}")));
                }
            }
        }
    }
}

fn written(info: &agent_proto::FileInfo) -> serde_json::Value {
    let kind = if info.kind == agent_proto::FileKind::KindDirectory as i32 {
        "dir"
    } else {
        "file"
    };
    json!({"name": info.name, "type": kind, "path": info.path})
}

pub async fn upload(live: Arc<Live>, req: Request) -> Response {
    let q = match query(&req) {
        Ok(q) => q,
        Err(r) => return r,
    };
    let headers: HeaderMap = req.headers().clone();
    if headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| v != "identity")
    {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "compressed uploads are not supported: send the file uncompressed",
        );
    }
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    if ct.starts_with("multipart/form-data") {
        let mut mp = match Multipart::from_request(req, &()).await {
            Ok(m) => m,
            Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
        };
        let mut out = Vec::new();
        loop {
            let field = match mp.next_field().await {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
            };
            let path = match (q.path.clone(), field.file_name()) {
                (Some(p), _) => p,
                (None, Some(f)) => f.to_string(),
                (None, None) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "a part names no file (filename) and there is no path",
                    )
                }
            };
            let (user, path) = match resolve(&live, &headers, &path, q.username.as_deref()) {
                Ok(r) => r,
                Err(e) => return from_rpc(e),
            };
            let data = field.map(|c| c.map_err(|e| e.to_string()));
            match write_one(&live, user, path, data).await {
                Ok(info) => out.push(written(&info)),
                Err(r) => return r,
            }
        }
        if out.is_empty() {
            return error(StatusCode::BAD_REQUEST, "the form holds no file");
        }
        return axum::Json(out).into_response();
    }
    let Some(path) = q.path else {
        return error(StatusCode::BAD_REQUEST, "path is missing");
    };
    let (user, path) = match resolve(&live, &headers, &path, q.username.as_deref()) {
        Ok(r) => r,
        Err(e) => return from_rpc(e),
    };
    let data = req
        .into_body()
        .into_data_stream()
        .map(|c| c.map_err(|e| e.to_string()));
    match write_one(&live, user, path, data).await {
        Ok(info) => axum::Json(vec![written(&info)]).into_response(),
        Err(r) => r,
    }
}
