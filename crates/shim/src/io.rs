//! A task's stdio as containerd hands it over: FIFO paths (what `ctr` and
//! the CRI plugin give), `file://` paths, or nothing. Output is relayed from
//! the agent until the guest closes it; stdin until it ends or containerd
//! asks to close it.

use std::path::{Path, PathBuf};
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
    stdin_path: Option<PathBuf>,
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

/// A process's stdio, opened (before the process runs, so that a bad path
/// fails the request and not the process).
pub struct Stdio {
    out: Writer,
    err: Writer,
    input: Option<PathBuf>,
}

impl Stdio {
    pub fn open(stdin: &str, stdout: &str, stderr: &str) -> std::io::Result<Stdio> {
        let out = output(stdout)?;
        let err = output(stderr)?;
        let input = if stdin.is_empty() {
            None
        } else {
            std::fs::metadata(stdin)?;
            Some(PathBuf::from(stdin))
        };
        Ok(Stdio { out, err, input })
    }

    /// Starts relaying between these and the guest process.
    pub fn relay(self, client: &AgentClient, container_id: &str, exec_id: &str) -> Relays {
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
        let stdin = self.input.clone().map(|path| {
            let (client, cid, eid) = (
                client.clone(),
                container_id.to_string(),
                exec_id.to_string(),
            );
            let close = close_stdin.clone();
            tokio::spawn(async move {
                // As runc's shim does: a blocking open returns once the
                // writer has opened, and reads end (EOF) when it closes.
                let opened = tokio::task::spawn_blocking(move || std::fs::File::open(path)).await;
                let Ok(Ok(file)) = opened else { return };
                let Ok(input) = pipe::Receiver::from_file(file) else {
                    return;
                };
                let _ = sandbox::io::relay_stdin_until(client, cid, eid, input, Some(close)).await;
            })
        });
        Relays {
            out: relay(OutputStream::Stdout, self.out),
            err: relay(OutputStream::Stderr, self.err),
            stdin,
            stdin_path: self.input,
            close_stdin,
        }
    }
}

impl Relays {
    /// After the process exited: lets the output in flight arrive (unless a
    /// background process keeps it open), then stops relaying.
    pub async fn finish(self) {
        let drain = std::time::Duration::from_secs(3);
        let (mut out, mut err) = (self.out, self.err);
        let both = async {
            let _ = (&mut out).await;
            let _ = (&mut err).await;
        };
        if tokio::time::timeout(drain, both).await.is_err() {
            out.abort();
            err.abort();
        }
        if let Some(s) = self.stdin {
            s.abort();
        }
        // A blocking open of stdin still waiting for a writer that never
        // came: open the writer side ourselves so that it returns.
        if let Some(path) = self.stdin_path {
            use std::os::unix::fs::OpenOptionsExt;
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(path);
        }
    }
}
