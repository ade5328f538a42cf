//! The Connect protocol (connectrpc.com/docs/protocol), server side, as
//! E2B's SDKs speak it to envd: unary calls as plain POSTs of one message
//! (`application/json` or `application/proto`), streams as enveloped
//! messages (`application/connect+json`, `+proto`: a flags byte, a 32-bit
//! big-endian length, the message) ending with an end-of-stream envelope
//! (flags 2) that carries the error, if any. Messages are prost types with
//! pbjson's proto3-JSON mapping. The Rust Connect crates are pre-1.0
//! betas; the framing is a page of the spec, so it is done here.

use std::pin::Pin;

use axum::body::Body;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The largest message we take from a client (file contents go over HTTP,
/// not RPC; stdin comes in chunks).
pub const MAX_MESSAGE: usize = 4 << 20;

const FLAG_COMPRESSED: u8 = 1;
const FLAG_END: u8 = 2;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Codec {
    Json,
    Proto,
}

/// Connect's error codes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Code {
    Canceled,
    Unknown,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Aborted,
    OutOfRange,
    Unimplemented,
    Internal,
    Unavailable,
    DataLoss,
    Unauthenticated,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Canceled => "canceled",
            Code::Unknown => "unknown",
            Code::InvalidArgument => "invalid_argument",
            Code::DeadlineExceeded => "deadline_exceeded",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::PermissionDenied => "permission_denied",
            Code::ResourceExhausted => "resource_exhausted",
            Code::FailedPrecondition => "failed_precondition",
            Code::Aborted => "aborted",
            Code::OutOfRange => "out_of_range",
            Code::Unimplemented => "unimplemented",
            Code::Internal => "internal",
            Code::Unavailable => "unavailable",
            Code::DataLoss => "data_loss",
            Code::Unauthenticated => "unauthenticated",
        }
    }

    /// The HTTP status of a unary error with this code (the spec's table).
    pub fn http_status(self) -> StatusCode {
        match self {
            Code::Canceled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
                StatusCode::BAD_REQUEST
            }
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        }
    }

    /// From a guest agent's gRPC status.
    pub fn from_grpc(c: tonic::Code) -> Code {
        use tonic::Code as G;
        match c {
            G::Cancelled => Code::Canceled,
            G::InvalidArgument => Code::InvalidArgument,
            G::DeadlineExceeded => Code::DeadlineExceeded,
            G::NotFound => Code::NotFound,
            G::AlreadyExists => Code::AlreadyExists,
            G::PermissionDenied => Code::PermissionDenied,
            G::ResourceExhausted => Code::ResourceExhausted,
            G::FailedPrecondition => Code::FailedPrecondition,
            G::Aborted => Code::Aborted,
            G::OutOfRange => Code::OutOfRange,
            G::Unimplemented => Code::Unimplemented,
            G::Unavailable => Code::Unavailable,
            G::DataLoss => Code::DataLoss,
            G::Unauthenticated => Code::Unauthenticated,
            G::Internal => Code::Internal,
            _ => Code::Unknown,
        }
    }
}

#[derive(Clone, Debug)]
pub struct RpcError {
    pub code: Code,
    pub message: String,
}

impl RpcError {
    pub fn new(code: Code, message: impl Into<String>) -> RpcError {
        RpcError {
            code,
            message: message.into(),
        }
    }
    pub fn invalid(m: impl Into<String>) -> RpcError {
        RpcError::new(Code::InvalidArgument, m)
    }
    pub fn not_found(m: impl Into<String>) -> RpcError {
        RpcError::new(Code::NotFound, m)
    }
    fn json(&self) -> serde_json::Value {
        serde_json::json!({"code": self.code.as_str(), "message": self.message})
    }
}

impl From<tonic::Status> for RpcError {
    fn from(s: tonic::Status) -> RpcError {
        RpcError::new(Code::from_grpc(s.code()), s.message())
    }
}

impl From<sandbox::agent::AgentError> for RpcError {
    fn from(e: sandbox::agent::AgentError) -> RpcError {
        RpcError::new(Code::Unavailable, format!("sandbox agent: {e}"))
    }
}

impl RpcError {
    pub fn into_response_unary(self) -> Response {
        self.into_response()
    }
}

/// A unary error answer: the code's status and `{"code", "message"}`.
impl IntoResponse for RpcError {
    fn into_response(self) -> Response {
        (
            self.code.http_status(),
            [(header::CONTENT_TYPE, "application/json")],
            self.json().to_string(),
        )
            .into_response()
    }
}

/// Message types we speak: prost for the binary codec, pbjson's serde impls
/// for JSON.
pub trait Msg: prost::Message + Default + Serialize + DeserializeOwned + Send + 'static {}
impl<T: prost::Message + Default + Serialize + DeserializeOwned + Send + 'static> Msg for T {}

fn content_type(headers: &HeaderMap) -> &str {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
}

fn decode<T: Msg>(codec: Codec, bytes: &[u8]) -> Result<T, RpcError> {
    match codec {
        Codec::Json => serde_json::from_slice(if bytes.is_empty() { b"{}" } else { bytes })
            .map_err(|e| RpcError::invalid(format!("malformed JSON message: {e}"))),
        Codec::Proto => T::decode(bytes)
            .map_err(|e| RpcError::invalid(format!("malformed protobuf message: {e}"))),
    }
}

fn encode<T: Msg>(codec: Codec, m: &T) -> Bytes {
    match codec {
        Codec::Json => serde_json::to_vec(m).unwrap_or_default().into(),
        Codec::Proto => m.encode_to_vec().into(),
    }
}

/// The codec of a unary request.
pub fn unary_codec(headers: &HeaderMap) -> Result<Codec, RpcError> {
    match content_type(headers) {
        "application/json" | "" => Ok(Codec::Json),
        "application/proto" => Ok(Codec::Proto),
        other => Err(RpcError::new(
            Code::Unknown,
            format!("unsupported content type {other:?}"),
        )),
    }
}

/// The codec of a streaming request.
pub fn stream_codec(headers: &HeaderMap) -> Result<Codec, RpcError> {
    match content_type(headers) {
        "application/connect+json" => Ok(Codec::Json),
        "application/connect+proto" => Ok(Codec::Proto),
        other => Err(RpcError::new(
            Code::Unknown,
            format!("unsupported content type {other:?} for a streaming call"),
        )),
    }
}

pub fn decode_unary<T: Msg>(headers: &HeaderMap, body: &[u8]) -> Result<(Codec, T), RpcError> {
    if headers
        .get("content-encoding")
        .is_some_and(|v| v != "identity")
    {
        return Err(RpcError::new(
            Code::Unimplemented,
            "compressed requests are not supported",
        ));
    }
    let codec = unary_codec(headers)?;
    if body.len() > MAX_MESSAGE {
        return Err(RpcError::new(Code::ResourceExhausted, "message too large"));
    }
    Ok((codec, decode(codec, body)?))
}

pub fn unary_response<T: Msg>(codec: Codec, m: &T) -> Response {
    let ct = match codec {
        Codec::Json => "application/json",
        Codec::Proto => "application/proto",
    };
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, ct)],
        encode(codec, m),
    )
        .into_response()
}

/// Reads enveloped messages from a request body.
pub struct Envelopes {
    body: Pin<Box<dyn Stream<Item = Result<Bytes, axum::Error>> + Send>>,
    buf: BytesMut,
    done: bool,
}

impl Envelopes {
    pub fn new(body: Body) -> Envelopes {
        Envelopes {
            body: Box::pin(body.into_data_stream()),
            buf: BytesMut::new(),
            done: false,
        }
    }

    /// The next message; None at the end of the body (or its end envelope).
    pub async fn next<T: Msg>(&mut self, codec: Codec) -> Result<Option<T>, RpcError> {
        loop {
            if self.buf.len() >= 5 {
                let flags = self.buf[0];
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if len > MAX_MESSAGE {
                    return Err(RpcError::new(Code::ResourceExhausted, "message too large"));
                }
                if self.buf.len() >= 5 + len {
                    self.buf.advance(5);
                    let data = self.buf.split_to(len);
                    if flags & FLAG_COMPRESSED != 0 {
                        return Err(RpcError::new(
                            Code::Unimplemented,
                            "compressed messages are not supported",
                        ));
                    }
                    if flags & FLAG_END != 0 {
                        self.done = true;
                        return Ok(None);
                    }
                    return Ok(Some(decode(codec, &data)?));
                }
            }
            if self.done {
                return Ok(None);
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buf.extend_from_slice(&chunk),
                Some(Err(e)) => {
                    return Err(RpcError::new(Code::Canceled, format!("request body: {e}")))
                }
                None => {
                    self.done = true;
                    if !self.buf.is_empty() {
                        return Err(RpcError::invalid("request body ends inside a message"));
                    }
                    return Ok(None);
                }
            }
        }
    }
}

/// Every message of an enveloped body, in order (the fuzz targets' way in:
/// the same parser the streaming calls use).
pub fn parse_all<T: Msg>(codec: Codec, body: &[u8]) -> Result<Vec<T>, RpcError> {
    futures::executor::block_on(async {
        let mut env = Envelopes::new(Body::from(body.to_vec()));
        let mut out = Vec::new();
        while let Some(m) = env.next(codec).await? {
            out.push(m);
        }
        Ok(out)
    })
}

/// One unary message, as `decode_unary` reads it once the codec is known.
pub fn parse_one<T: Msg>(codec: Codec, body: &[u8]) -> Result<T, RpcError> {
    decode(codec, body)
}

fn envelope(flags: u8, data: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + data.len());
    b.put_u8(flags);
    b.put_u32(data.len() as u32);
    b.put_slice(data);
    b.freeze()
}

/// A streaming answer: each message enveloped, then the end envelope with
/// the stream's error if it ended with one.
pub fn stream_response<T, S>(codec: Codec, messages: S) -> Response
where
    T: Msg,
    S: Stream<Item = Result<T, RpcError>> + Send + 'static,
{
    let ct = match codec {
        Codec::Json => "application/connect+json",
        Codec::Proto => "application/connect+proto",
    };
    let body = async_stream(codec, messages);
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, ct)],
        Body::from_stream(body),
    )
        .into_response()
}

fn async_stream<T, S>(
    codec: Codec,
    messages: S,
) -> impl Stream<Item = Result<Bytes, std::io::Error>>
where
    T: Msg,
    S: Stream<Item = Result<T, RpcError>> + Send + 'static,
{
    let messages = Box::pin(messages);
    futures::stream::unfold(Some(messages), move |state| async move {
        let mut messages = state?;
        match messages.next().await {
            Some(Ok(m)) => Some((Ok(envelope(0, &encode(codec, &m))), Some(messages))),
            Some(Err(e)) => {
                let end = serde_json::json!({"error": e.json()}).to_string();
                Some((Ok(envelope(FLAG_END, end.as_bytes())), None))
            }
            None => Some((Ok(envelope(FLAG_END, b"{}")), None)),
        }
    })
}

/// The one request message of a server-streaming call; an error answer
/// (as a stream, or unary for a wrong content type) when there is none.
pub async fn first_message<T: Msg>(
    headers: &HeaderMap,
    body: Body,
) -> Result<(Codec, T), Response> {
    let codec = stream_codec(headers).map_err(IntoResponse::into_response)?;
    match Envelopes::new(body).next(codec).await {
        Ok(Some(m)) => Ok((codec, m)),
        Ok(None) => Err(stream_error(codec, RpcError::invalid("no request message"))),
        Err(e) => Err(stream_error(codec, e)),
    }
}

/// An error answer to a streaming call: a whole stream of just the end.
pub fn stream_error(codec: Codec, e: RpcError) -> Response {
    stream_response::<pbjson_types::Empty, _>(codec, futures::stream::once(async move { Err(e) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn envelopes_split_and_joined_anywhere() {
        let m = pbjson_types::Duration {
            seconds: 3,
            nanos: 0,
        };
        let one = envelope(0, &encode(Codec::Proto, &m));
        let mut all = BytesMut::new();
        all.extend_from_slice(&one);
        all.extend_from_slice(&one);
        all.extend_from_slice(&envelope(FLAG_END, b"{}"));
        let all = all.freeze();
        for cut in 0..all.len() {
            let (a, b) = (all.slice(..cut), all.slice(cut..));
            let body = Body::from_stream(futures::stream::iter(vec![
                Ok::<_, std::io::Error>(a),
                Ok(b),
            ]));
            let mut env = Envelopes::new(body);
            for _ in 0..2 {
                let got: pbjson_types::Duration = env.next(Codec::Proto).await.unwrap().unwrap();
                assert_eq!(got, m);
            }
            assert!(env
                .next::<pbjson_types::Duration>(Codec::Proto)
                .await
                .unwrap()
                .is_none());
        }
    }

    #[tokio::test]
    async fn oversized_and_truncated_messages_are_refused() {
        let mut big = BytesMut::new();
        big.put_u8(0);
        big.put_u32(u32::MAX);
        let mut env = Envelopes::new(Body::from(big.freeze()));
        let e = env
            .next::<pbjson_types::Empty>(Codec::Json)
            .await
            .unwrap_err();
        assert_eq!(e.code, Code::ResourceExhausted);
        let mut env = Envelopes::new(Body::from(vec![0u8, 0, 0, 0, 9, b'{']));
        let e = env
            .next::<pbjson_types::Empty>(Codec::Json)
            .await
            .unwrap_err();
        assert_eq!(e.code, Code::InvalidArgument);
    }
}
