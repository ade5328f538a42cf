//! Relaying a guest process's stdio to host file descriptors.

use agent_proto::{OutputStream, ReadOutputRequest, StdinChunk};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::agent::{AgentClient, AgentError};

/// Copies one output stream of a process to `out` until the guest closes it.
pub async fn relay_output(
    mut client: AgentClient,
    container_id: String,
    exec_id: String,
    stream: OutputStream,
    mut out: impl AsyncWrite + Unpin,
) -> Result<u64, AgentError> {
    let mut chunks = client
        .read_output(ReadOutputRequest {
            container_id,
            exec_id,
            stream: stream as i32,
        })
        .await?
        .into_inner();
    let mut total = 0u64;
    while let Some(chunk) = chunks.message().await? {
        total += chunk.data.len() as u64;
        // The reader on our side may be gone (a closed pipe): keep draining
        // so the guest process is not blocked on a full pipe.
        if out.write_all(&chunk.data).await.is_ok() {
            let _ = out.flush().await;
        }
    }
    Ok(total)
}

/// How long stdin is still read after a close was asked for.
const STDIN_DRAIN: std::time::Duration = std::time::Duration::from_millis(50);

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Copies `input` to the process's stdin; at EOF closes the process's stdin.
pub async fn relay_stdin(
    client: AgentClient,
    container_id: String,
    exec_id: String,
    input: impl AsyncRead + Unpin + Send + 'static,
) -> Result<(), AgentError> {
    relay_stdin_until(client, container_id, exec_id, input, None).await
}

/// As `relay_stdin`, and also closes the process's stdin when `close` is
/// notified (a caller's "close stdin" on an input that never ends by itself).
pub async fn relay_stdin_until(
    mut client: AgentClient,
    container_id: String,
    exec_id: String,
    mut input: impl AsyncRead + Unpin + Send + 'static,
    close: Option<std::sync::Arc<tokio::sync::Notify>>,
) -> Result<(), AgentError> {
    let (tx, rx) = mpsc::channel(4);
    let (cid, eid) = (container_id.clone(), exec_id.clone());
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 32 * 1024];
        let mut closing = false;
        loop {
            let read = match (&close, closing) {
                (Some(c), false) => tokio::select! {
                    biased;
                    r = input.read(&mut buf) => r,
                    _ = c.notified() => {
                        closing = true;
                        continue;
                    }
                },
                // Told to close: forward what is still buffered (the
                // writer wrote it before asking), then end.
                (Some(_), true) => {
                    match tokio::time::timeout(STDIN_DRAIN, input.read(&mut buf)).await {
                        Ok(r) => r,
                        Err(_) => Ok(0),
                    }
                }
                (None, _) => input.read(&mut buf).await,
            };
            let (data, close) = match read {
                Ok(0) | Err(_) => (Vec::new(), true),
                Ok(n) => (buf[..n].to_vec(), false),
            };
            let chunk = StdinChunk {
                container_id: cid.clone(),
                exec_id: eid.clone(),
                data,
                close,
            };
            if tx.send(chunk).await.is_err() || close {
                return;
            }
        }
    });
    // Aborted however this ends (also when our caller aborts us): the
    // reader may block forever on an input that never ends.
    let _reader = AbortOnDrop(reader);
    let result = client.write_stdin(ReceiverStream::new(rx)).await;
    result.map(drop).map_err(AgentError::from)
}
