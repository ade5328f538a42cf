//! The host's client of the guest agent: gRPC over the VMM's Unix socket
//! that carries the virtio-serial port.

use std::path::{Path, PathBuf};
use std::time::Duration;

use agent_proto::agent_client::AgentClient as Grpc;
use agent_proto::{VersionRequest, VersionResponse, PROTOCOL_VERSION};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("connecting to the agent at {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("agent speaks protocol {agent}, podvisor speaks {host}")]
    Protocol { agent: u32, host: u32 },
    #[error("agent: {}", .0.message())]
    Rpc(#[from] tonic::Status),
}

pub type AgentClient = Grpc<Channel>;

/// Opens the gRPC channel to the VMM's agent socket (lazily: no byte moves
/// until the first call).
pub fn channel(socket: &Path) -> Result<Channel, AgentError> {
    connect(socket, true, None)
}

/// Like `channel`, with a way to close its connection at once (dropping a
/// channel closes it only when its background task gets to it, and the VMM
/// serves one connection at a time).
pub fn channel_with_hangup(socket: &Path) -> Result<(Channel, HangUp), AgentError> {
    let hangup = HangUp::default();
    Ok((connect(socket, true, Some(hangup.clone()))?, hangup))
}

/// Opens a channel to the agent proxy of the process that owns a VM.
pub fn proxy_channel(socket: &Path) -> Result<Channel, AgentError> {
    connect(socket, false, None)
}

/// Shuts down the connections of a channel (see `channel_with_hangup`).
#[derive(Clone, Default)]
pub struct HangUp(std::sync::Arc<std::sync::Mutex<Vec<std::os::fd::OwnedFd>>>);

impl HangUp {
    pub fn now(&self) {
        let fds = std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()));
        for fd in fds {
            let _ = nix::sys::socket::shutdown(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                nix::sys::socket::Shutdown::Both,
            );
        }
    }
}

fn connect(
    socket: &Path,
    session_marker: bool,
    hangup: Option<HangUp>,
) -> Result<Channel, AgentError> {
    let path = socket.to_path_buf();
    let endpoint =
        Endpoint::try_from("http://podvisor-agent").map_err(|source| AgentError::Connect {
            path: path.clone(),
            source,
        })?;
    Ok(
        endpoint.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            let hangup = hangup.clone();
            async move {
                let mut stream = UnixStream::connect(path).await?;
                if let Some(h) = hangup {
                    // A duplicate of our own: shutting it down closes the socket.
                    let dup = std::os::fd::AsFd::as_fd(&stream).try_clone_to_owned()?;
                    h.0.lock().unwrap_or_else(|e| e.into_inner()).push(dup);
                }
                if session_marker {
                    stream.write_all(agent_proto::SESSION_MAGIC).await?;
                }
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        })),
    )
}

/// The handshake: waits for the agent to answer and checks its protocol.
pub async fn handshake(client: &mut AgentClient) -> Result<VersionResponse, AgentError> {
    let v = client
        .version(VersionRequest {
            protocol: PROTOCOL_VERSION,
            host_time_unix_ns: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0),
        })
        .await?
        .into_inner();
    if v.protocol != PROTOCOL_VERSION {
        return Err(AgentError::Protocol {
            agent: v.protocol,
            host: PROTOCOL_VERSION,
        });
    }
    Ok(v)
}
