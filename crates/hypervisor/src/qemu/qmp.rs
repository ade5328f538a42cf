//! A minimal QMP client: the greeting, capability negotiation, and commands
//! whose replies are matched by skipping interleaved events.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

use serde_json::{json, Value};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Interest};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use crate::HypervisorError;

/// The longest QMP line we read (replies to our commands are small).
pub const MAX_LINE: u64 = 1 << 20;

pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

/// What one line from QEMU says.
#[derive(Debug, PartialEq)]
pub enum Reply {
    Return(Value),
    Error(String),
    Event(String),
    Greeting,
}

/// Parses one QMP line. QEMU's bytes are not trusted to be well formed.
pub fn parse_reply(line: &str) -> Result<Reply, HypervisorError> {
    let v: Value = serde_json::from_str(line)
        .map_err(|e| HypervisorError::Qmp(format!("bad reply {line:?}: {e}")))?;
    if let Some(r) = v.get("return") {
        return Ok(Reply::Return(r.clone()));
    }
    if let Some(e) = v.get("error") {
        let desc = e
            .get("desc")
            .and_then(Value::as_str)
            .unwrap_or("unknown error");
        return Ok(Reply::Error(desc.to_string()));
    }
    if let Some(ev) = v.get("event") {
        return Ok(Reply::Event(ev.as_str().unwrap_or("?").to_string()));
    }
    if v.get("QMP").is_some() {
        return Ok(Reply::Greeting);
    }
    Err(HypervisorError::Qmp(format!("unexpected reply {line:?}")))
}

/// Reads and parses the next line from QEMU. A compromised QEMU may send a
/// line without end: at most `max_line` bytes of it are read.
pub async fn read_reply_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    max_line: u64,
) -> Result<Reply, HypervisorError> {
    let mut line = Vec::new();
    let n = reader
        .take(max_line)
        .read_until(b'\n', &mut line)
        .await
        .map_err(HypervisorError::QmpIo)?;
    if n == 0 {
        return Err(HypervisorError::Qmp("QEMU closed the QMP socket".into()));
    }
    if !line.ends_with(b"\n") {
        return Err(HypervisorError::Qmp(format!(
            "a QMP reply longer than {max_line} bytes"
        )));
    }
    parse_reply(String::from_utf8_lossy(&line).trim())
}

/// One command as QMP takes it: a JSON object on a line.
fn command_line(command: &str, arguments: Option<Value>) -> String {
    let mut msg = json!({ "execute": command });
    if let Some(args) = arguments {
        msg["arguments"] = args;
    }
    let mut line = msg.to_string();
    line.push('\n');
    line
}

impl Qmp {
    pub async fn connect(path: &Path) -> Result<Self, HypervisorError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(HypervisorError::QmpIo)?;
        let (r, writer) = stream.into_split();
        let mut qmp = Qmp {
            reader: BufReader::new(r),
            writer,
        };
        match qmp.read_reply().await? {
            Reply::Greeting => {}
            other => {
                return Err(HypervisorError::Qmp(format!(
                    "expected the QMP greeting, got {other:?}"
                )))
            }
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    async fn read_reply(&mut self) -> Result<Reply, HypervisorError> {
        read_reply_line(&mut self.reader, MAX_LINE).await
    }

    /// Runs one command and returns its `return` value.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, HypervisorError> {
        let line = command_line(command, arguments);
        self.writer
            .write_all(line.as_bytes())
            .await
            .map_err(HypervisorError::QmpIo)?;
        self.reply_to(command).await
    }

    /// Runs one command with `fd` passed alongside (SCM_RIGHTS), as `getfd`
    /// and `add-fd` take theirs.
    pub async fn execute_with_fd(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        fd: BorrowedFd<'_>,
    ) -> Result<Value, HypervisorError> {
        let line = command_line(command, arguments);
        let stream = self.writer.as_ref();
        let sent = loop {
            stream.writable().await.map_err(HypervisorError::QmpIo)?;
            let fds = [fd.as_raw_fd()];
            let sent = stream.try_io(Interest::WRITABLE, || {
                sendmsg::<()>(
                    stream.as_raw_fd(),
                    &[IoSlice::new(line.as_bytes())],
                    &[ControlMessage::ScmRights(&fds)],
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(std::io::Error::from)
            });
            match sent {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                other => break other.map_err(HypervisorError::QmpIo)?,
            }
        };
        // The fd went with the first byte; the rest of a long line follows.
        self.writer
            .write_all(&line.as_bytes()[sent..])
            .await
            .map_err(HypervisorError::QmpIo)?;
        self.reply_to(command).await
    }

    async fn reply_to(&mut self, command: &str) -> Result<Value, HypervisorError> {
        loop {
            match self.read_reply().await? {
                Reply::Return(v) => return Ok(v),
                Reply::Error(desc) => {
                    return Err(HypervisorError::Qmp(format!("{command}: {desc}")))
                }
                Reply::Event(_) | Reply::Greeting => continue,
            }
        }
    }

    /// The run state QEMU reports ("running", "paused", ...).
    pub async fn status(&mut self) -> Result<String, HypervisorError> {
        let v = self.execute("query-status", None).await?;
        Ok(v.get("status")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_replies() {
        assert_eq!(
            parse_reply(r#"{"return": {}}"#).unwrap(),
            Reply::Return(json!({}))
        );
        assert_eq!(
            parse_reply(r#"{"error": {"class": "GenericError", "desc": "nope"}}"#).unwrap(),
            Reply::Error("nope".into())
        );
        assert_eq!(
            parse_reply(r#"{"event": "STOP", "timestamp": {}}"#).unwrap(),
            Reply::Event("STOP".into())
        );
        assert_eq!(
            parse_reply(r#"{"QMP": {"version": {}}}"#).unwrap(),
            Reply::Greeting
        );
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse_reply("not json").is_err());
        assert!(parse_reply("{}").is_err());
        assert!(parse_reply("[1,2]").is_err());
    }
}
