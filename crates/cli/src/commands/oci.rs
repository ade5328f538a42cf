//! What the runc-compatible verbs share: opening a container, reaching its
//! agent through the holder's proxy, and waiting for a holder to go.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use anyhow::bail;
use sandbox::agent::AgentClient;
use sandbox::container::{ContainerDir, Record, Status};

pub struct Opened {
    pub dir: ContainerDir,
    pub record: Record,
    pub status: Status,
}

/// Opens a container that has finished `create`.
pub fn open(root: &Path, id: &str) -> anyhow::Result<Opened> {
    let dir = ContainerDir::open(root, id)?;
    let Some(record) = dir.record()? else {
        bail!("container {id} is still being created");
    };
    let status = dir.status(Some(&record));
    Ok(Opened {
        dir,
        record,
        status,
    })
}

/// A client of the container's agent, through its holder.
pub fn agent(dir: &ContainerDir) -> anyhow::Result<AgentClient> {
    let channel = sandbox::agent::proxy_channel(&dir.proxy_socket())?;
    Ok(AgentClient::new(channel).max_decoding_message_size(16 << 20))
}

/// How long a verb waits for the guest's agent: a wedged or hostile guest
/// makes the verb fail, never hang (`docker stop` must return).
pub const AGENT_CALL: Duration = Duration::from_secs(10);

/// A deadline on an agent call: `client.call(req).bounded().await?`.
pub trait Bounded<T>:
    std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>> + Sized
{
    fn bounded(self) -> impl std::future::Future<Output = anyhow::Result<tonic::Response<T>>> {
        async move {
            match tokio::time::timeout(AGENT_CALL, self).await {
                Ok(r) => r.map_err(rpc),
                Err(_) => Err(anyhow::anyhow!(
                    "the guest did not answer within {} s",
                    AGENT_CALL.as_secs()
                )),
            }
        }
    }
}

impl<T, F> Bounded<T> for F where
    F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>
{
}

/// The agent's words, without gRPC's.
pub fn rpc(status: tonic::Status) -> anyhow::Error {
    if status.code() == tonic::Code::Unavailable {
        return anyhow::anyhow!(
            "the container's holder is not answering (it exited?): {}",
            status.message()
        );
    }
    anyhow::anyhow!("{}", status.message())
}

/// Waits for the holder of `record` to exit; SIGKILLs it after `grace`.
pub async fn wait_holder_gone(record: &Record, grace: Duration) {
    let deadline = Instant::now() + grace;
    while ContainerDir::holder_alive(record) {
        if Instant::now() > deadline {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(record.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
            if !ContainerDir::holder_alive(record) {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts a helper process of ours (`podvisor GLOBALS VERB ... --sync-fd N
/// ...`) with our stdio, and waits for its word on the sync pipe: "ok", or
/// "error: MSG". `args` gets the pipe's write end to pass on.
pub fn spawn_helper(
    g: &crate::Globals,
    what: &str,
    args: impl FnOnce(&mut Command, i32),
) -> anyhow::Result<(Child, Result<(), String>)> {
    let (r, w) = nix::unistd::pipe().context("pipe")?;
    nix::fcntl::fcntl(
        r.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .context("pipe")?;
    let mut cmd = Command::new(std::env::current_exe().context("locating podvisor")?);
    cmd.args(g.to_args());
    args(&mut cmd, w.as_raw_fd());
    cmd.stdin(Stdio::inherit())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    let child = cmd.spawn().with_context(|| format!("starting {what}"))?;
    drop(w);
    // SAFETY: `r` is ours; the File takes it over.
    let mut reader = unsafe { std::fs::File::from_raw_fd(r.into_raw_fd()) };
    let mut word = String::new();
    let _ = reader.read_to_string(&mut word);
    let outcome = match word.trim() {
        "ok" => Ok(()),
        other => Err(match other.strip_prefix("error: ") {
            Some(msg) => msg.to_string(),
            None => format!("{what} died before it was ready"),
        }),
    };
    Ok((child, outcome))
}

/// "KILL", "SIGKILL", "kill" or "9" as a signal number; 0 (as kill(2)
/// takes it) asks only whether the process exists.
pub fn parse_signal(s: &str) -> anyhow::Result<i32> {
    if let Ok(n) = s.parse::<i32>() {
        if (0..=64).contains(&n) {
            return Ok(n);
        }
        bail!("invalid signal: {s}");
    }
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse::<nix::sys::signal::Signal>()
        .map(|sig| sig as i32)
        .map_err(|_| anyhow::anyhow!("unknown signal {s:?}"))
}

/// Writes `pid` to `path` the way runc does (no newline), atomically.
pub fn write_pid_file(path: &Path, pid: u32) -> anyhow::Result<()> {
    let tmp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    std::fs::write(&tmp, pid.to_string())
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| anyhow::anyhow!("writing pid file {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_by_name_and_number() {
        assert_eq!(parse_signal("9").unwrap(), 9);
        assert_eq!(parse_signal("KILL").unwrap(), 9);
        assert_eq!(parse_signal("sigterm").unwrap(), 15);
        assert_eq!(parse_signal("0").unwrap(), 0);
        assert!(parse_signal("65").is_err());
        assert!(parse_signal("-1").is_err());
        assert!(parse_signal("BOGUS").is_err());
    }
}
