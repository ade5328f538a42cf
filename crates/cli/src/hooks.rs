//! OCI hooks run on the host, in order, with the container's state on stdin
//! (docker's networking is a prestart hook that configures the namespace of
//! the pid in that state).

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use sandbox::container::OciState;
use sandbox::oci::Hook;

pub fn run(kind: &str, hooks: &[Hook], state: &OciState) -> anyhow::Result<()> {
    let json = serde_json::to_vec(state)?;
    for hook in hooks {
        let mut cmd = Command::new(&hook.path);
        if let Some((arg0, rest)) = hook.args.split_first() {
            cmd.arg0(arg0).args(rest);
        }
        cmd.env_clear()
            .envs(hook.env.iter().filter_map(|kv| kv.split_once('=')))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("{kind} hook {}", hook.path))?;
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(&json);
        }
        let deadline = hook
            .timeout
            .map(|s| Instant::now() + Duration::from_secs(s));
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if deadline.is_some_and(|d| Instant::now() > d) {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{kind} hook {} timed out", hook.path);
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        if !status.success() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            bail!(
                "{kind} hook {} failed ({status}): {}",
                hook.path,
                err.trim()
            );
        }
    }
    Ok(())
}
