//! A task's stdio as containerd hands it over: FIFO paths (what `ctr` and
//! the CRI plugin give), `file://` paths, or nothing. Output is relayed from
//! the agent until the guest closes it; stdin until it ends or containerd
//! asks to close it.

use std::path::Path;
use std::sync::Arc;

use agent_proto::OutputStream;
use sandbox::agent::AgentClient;
use tokio::io::AsyncWrite;
use tokio::net::unix::pipe;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// The relays of one process.
pub struct Relays {
    out: JoinHandle<()>,
    err: JoinHandle<()>,
    stdin: Option<JoinHandle<()>>,
    pub close_stdin: Arc<Notify>,
}

fn output(uri: &str) -> std::io::Result<Writer> {
    if uri.is_empty() {
        return Ok(Box::new(tokio::io::sink()));
    }
    if let Some(path) = uri.strip_prefix("file://") {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        return Ok(Box::new(tokio::fs::File::from_std(f)));
    }
    if uri.contains("://") {
        return Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            format!("stdio {uri}: only FIFOs and file:// are supported (no logging binaries)"),
        ));
    }
    // Read-write: opening never waits for (or fails without) a reader.
    let fifo = pipe::OpenOptions::new()
        .read_write(true)
        .open_sender(Path::new(uri))?;
    Ok(Box::new(fifo))
}

/// Opens the process's stdio and starts relaying it.
pub fn attach(
    client: &AgentClient,
    container_id: &str,
    exec_id: &str,
    stdin: &str,
    stdout: &str,
    stderr: &str,
) -> std::io::Result<Relays> {
    let out = output(stdout)?;
    let err = output(stderr)?;
    let input = if stdin.is_empty() {
        None
    } else {
        // Read-write, so that it never reads EOF before containerd's writer
        // opens: stdin ends when containerd says so (CloseIO).
        Some(
            pipe::OpenOptions::new()
                .read_write(true)
                .open_receiver(Path::new(stdin))?,
        )
    };
    let relay = |stream, w: Writer| {
        let (client, cid, eid) = (
            client.clone(),
            container_id.to_string(),
            exec_id.to_string(),
        );
        tokio::spawn(async move {
            let _ = sandbox::io::relay_output(client, cid, eid, stream, w).await;
        })
    };
    let close_stdin = Arc::new(Notify::new());
    let stdin = input.map(|input| {
        let (client, cid, eid) = (
            client.clone(),
            container_id.to_string(),
            exec_id.to_string(),
        );
        let close = close_stdin.clone();
        tokio::spawn(async move {
            let _ = sandbox::io::relay_stdin_until(client, cid, eid, input, Some(close)).await;
        })
    });
    Ok(Relays {
        out: relay(OutputStream::Stdout, out),
        err: relay(OutputStream::Stderr, err),
        stdin,
        close_stdin,
    })
}

impl Relays {
    /// After the process exited: lets the output in flight arrive (unless a
    /// background process keeps it open), then stops relaying.
    pub async fn finish(self) {
        let drain = std::time::Duration::from_secs(3);
        for mut relay in [self.out, self.err] {
            if tokio::time::timeout(drain, &mut relay).await.is_err() {
                relay.abort();
            }
        }
        if let Some(s) = self.stdin {
            s.abort();
        }
    }
}
