//! Ports of the guest reached from the host without a NIC: one TCP
//! connection to the guest's loopback per `ConnectPort` call, its bytes
//! carried in the call's two streams.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use agent_proto::PortChunk;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tonic::{Status, Streaming};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const CHUNK: usize = 64 * 1024;

/// Connects to `port` on 127.0.0.1, then ::1 (a server bound to one
/// family only is found on either).
pub async fn connect(port: u32) -> Result<TcpStream, Status> {
    let port = u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| Status::invalid_argument(format!("port {port} is not a TCP port")))?;
    if let Err(e) = crate::network::loopback_up() {
        eprintln!("podvisor-agent: bringing lo up: {e}");
    }
    let mut last = None;
    for ip in [Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()] {
        let addr = SocketAddr::new(ip, port);
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Ok(Err(e)) => last = Some(e.to_string()),
            Err(_) => last = Some("timed out".into()),
        }
    }
    Err(Status::unavailable(format!(
        "nothing listens on port {port} in the sandbox ({})",
        last.unwrap_or_default()
    )))
}

/// Copies the host's chunks into the socket and the socket's bytes into
/// `tx` until both directions have ended.
pub fn relay(
    sock: TcpStream,
    mut inbound: Streaming<PortChunk>,
    first: Vec<u8>,
    tx: mpsc::Sender<Result<PortChunk, Status>>,
) {
    let (mut rd, mut wr) = sock.into_split();
    tokio::spawn(async move {
        if !first.is_empty() && wr.write_all(&first).await.is_err() {
            return;
        }
        while let Some(Ok(chunk)) = inbound.next().await {
            if wr.write_all(&chunk.data).await.is_err() {
                return;
            }
        }
        let _ = wr.shutdown().await;
    });
    tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let read = tokio::select! {
                r = rd.read(&mut buf) => r,
                // The host hung up: the connection goes with it.
                _ = tx.closed() => return,
            };
            match read {
                Ok(0) => return,
                Ok(n) => {
                    let chunk = PortChunk {
                        port: 0,
                        data: buf[..n].to_vec(),
                    };
                    if tx.send(Ok(chunk)).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(Status::aborted(e.to_string()))).await;
                    return;
                }
            }
        }
    });
}
