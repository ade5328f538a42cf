//! A sandbox's own ports. A request for `{port}-{sandboxID}.{domain}` (or
//! with the `E2b-Sandbox-Id` / `E2b-Sandbox-Port` headers) whose port is
//! not envd's is relayed, as HTTP/1.1 with WebSocket upgrades, to that port
//! on the guest's loopback: each request opens one TCP connection there
//! through the agent (`ConnectPort`), so publishing a port needs no NIC and
//! no host port. A sandbox made with `network.allowPublicTraffic: false`
//! asks for its traffic token in `e2b-traffic-access-token`.

use std::sync::Arc;

use agent_proto::PortChunk;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::sandboxes::Live;
use crate::AppState;

const TOKEN_HEADER: &str = "e2b-traffic-access-token";
const BUFFER: usize = 64 * 1024;

/// E2B's answer shape for its sandbox proxy's errors.
fn error(status: StatusCode, id: &str, port: u16, message: impl Into<String>) -> Response {
    let body = json!({
        "sandboxId": id,
        "port": port,
        "message": message.into(),
        "code": status.as_u16(),
    });
    (status, axum::Json(body)).into_response()
}

/// Headers that belong to one hop (RFC 9110 7.6.1) and podvisord's own
/// routing headers: not passed to the guest. `Connection` and `Upgrade`
/// stay on an upgrade, which needs them.
fn strip(headers: &mut axum::http::HeaderMap, upgrade: bool) {
    const HOP: [&str; 6] = [
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
    ];
    for h in HOP {
        headers.remove(h);
    }
    headers.remove(header::TRANSFER_ENCODING);
    if !upgrade {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
    for h in ["e2b-sandbox-id", "e2b-sandbox-port", TOKEN_HEADER] {
        headers.remove(HeaderName::from_static(h));
    }
}

fn wants_upgrade(req: &Request) -> bool {
    req.headers().contains_key(header::UPGRADE)
}

/// One byte stream to `port` in the guest: an in-memory pipe whose other
/// end the agent call carries.
async fn open(live: &Live, port: u16) -> Result<tokio::io::DuplexStream, tonic::Status> {
    let (ours, theirs) = tokio::io::duplex(BUFFER);
    let (tx, rx) = mpsc::channel(8);
    let first = PortChunk {
        port: port.into(),
        data: Vec::new(),
    };
    tx.send(first)
        .await
        .map_err(|_| tonic::Status::internal("relay closed"))?;
    let mut replies = live
        .agent
        .clone()
        .connect_port(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let (mut rd, mut wr) = tokio::io::split(theirs);
    tokio::spawn(async move {
        let mut buf = vec![0u8; BUFFER];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return, // dropping tx half-closes the guest's end
                Ok(n) => {
                    let chunk = PortChunk {
                        port: 0,
                        data: buf[..n].to_vec(),
                    };
                    if tx.send(chunk).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    tokio::spawn(async move {
        while let Ok(Some(chunk)) = replies.message().await {
            if wr.write_all(&chunk.data).await.is_err() {
                return;
            }
        }
        let _ = wr.shutdown().await;
    });
    Ok(ours)
}

pub async fn proxy(state: Arc<AppState>, id: String, port: u16, mut req: Request) -> Response {
    let live = match state.registry.get(&id) {
        Some(live) => Some(live),
        None => {
            let token = req
                .headers()
                .get(TOKEN_HEADER)
                .map(|v| v.as_bytes().to_vec());
            crate::sandboxes::auto_resume_for_traffic(&state, &id, token.as_deref()).await
        }
    };
    let Some(live) = live else {
        return error(
            StatusCode::NOT_FOUND,
            &id,
            port,
            format!("sandbox {id:?} not found"),
        );
    };
    if let Some(token) = &live.traffic_token {
        let given = req.headers().get(TOKEN_HEADER).map(|v| v.as_bytes());
        let message = match given {
            None => Some(format!(
                "Sandbox is secured with traffic access token. Token header '{TOKEN_HEADER}' is missing"
            )),
            Some(g) if !crate::auth::same(g, token.as_bytes()) => Some(format!(
                "Sandbox is secured with traffic access token. Token header '{TOKEN_HEADER}' is invalid"
            )),
            Some(_) => None,
        };
        if let Some(m) = message {
            return error(StatusCode::FORBIDDEN, &id, port, m);
        }
    }
    let io = match open(&live, port).await {
        Ok(io) => io,
        Err(s) if s.code() == tonic::Code::Unavailable => {
            return error(
                StatusCode::BAD_GATEWAY,
                &id,
                port,
                format!(
                    "The sandbox is running but port is not open: {}",
                    s.message()
                ),
            )
        }
        Err(s) => {
            state.metrics.agent_error();
            return error(StatusCode::BAD_GATEWAY, &id, port, s.message().to_string());
        }
    };
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(io)).await {
        Ok(c) => c,
        Err(e) => return error(StatusCode::BAD_GATEWAY, &id, port, e.to_string()),
    };
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let upgrade = wants_upgrade(&req);
    let from_client = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    strip(&mut parts.headers, upgrade);
    // Origin form: the guest's server sees the path, and Host as sent.
    if let Some(pq) = parts.uri.path_and_query().cloned() {
        parts.uri = pq.as_str().parse().unwrap_or_default();
    }
    parts.version = axum::http::Version::HTTP_11;
    if !parts.headers.contains_key(header::HOST) {
        if let Ok(v) = format!("{port}-{id}.{}", state.config.domain).parse() {
            parts.headers.insert(header::HOST, v);
        }
    }
    let mut resp = match sender.send_request(Request::from_parts(parts, body)).await {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_GATEWAY,
                &id,
                port,
                format!("the server on port {port} did not answer: {e}"),
            )
        }
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(from_client) = from_client {
            let from_guest = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                if let (Ok(c), Ok(g)) = (from_client.await, from_guest.await) {
                    let _ =
                        tokio::io::copy_bidirectional(&mut TokioIo::new(c), &mut TokioIo::new(g))
                            .await;
                }
            });
        }
    }
    resp.map(Body::new)
}
