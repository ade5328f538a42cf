//! The caller's side: taking a ready clone, whole.

use super::*;

/// Takes a ready clone from template `template`'s pool, its NICs joined to
/// `taps` (tap devices of this process's network namespace, one per NIC of
/// the template). None when no pool serves the template or it is empty.
/// The clone's share starts empty: `Sandbox::attach` fills it.
pub async fn take(
    root: &Path,
    template: &str,
    hostname: &str,
    taps: &[RawFd],
) -> Result<Option<Sandbox>, SandboxError> {
    let sock = socket(root, template);
    if !sock.exists() {
        return Ok(None);
    }
    let accel = Template::open(root, template)?.shape().3;
    let t0 = Instant::now();
    let Ok(conn) = std::os::unix::net::UnixStream::connect(&sock) else {
        return Ok(None);
    };
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| SandboxError::Invalid(format!("asking the pool: {e}")))?;
    let mut reader = fdmsg::Reader::default();
    let io = |e: std::io::Error| SandboxError::Invalid(format!("asking the pool: {e}"));
    let request = Request::Take { nics: taps.len() };
    let line = serde_json::to_vec(&request).unwrap_or_default();
    fdmsg::send(&conn, &line, taps).map_err(io)?;
    let (answer, fds) = reader
        .recv(&conn)
        .map_err(io)?
        .ok_or_else(|| SandboxError::Invalid("the pool daemon hung up".into()))?;
    let reply = parse_reply(&answer)?;
    drop(conn);
    if !reply.error.is_empty() {
        tracing::info!(template, "pool: {}", reply.error);
        return Ok(None);
    }
    let mut fds = fds.into_iter();
    let (Some(vm_conn), Some(pidfd)) = (fds.next(), fds.next()) else {
        return Err(SandboxError::Invalid(
            "the pool's answer carried no VM".into(),
        ));
    };
    // From here on the VM is ours: dropping these ends it.
    let supervisor = crate::supervisor::Handover {
        conn: vm_conn,
        seq: reply.seq,
        pidfd,
        pid: reply.vmm_pid,
    };
    let handout = t0.elapsed();
    // A session the guest did not see begin (its marker split across reads
    // of a just-resumed VM) is answered by a fresh connection: try again.
    let mut attempt = 0;
    let (mut client, version, hangup) = loop {
        attempt += 1;
        let (channel, hangup) = agent::channel_with_hangup(&reply.agent_socket)?;
        let mut client = AgentClient::new(channel).max_decoding_message_size(16 << 20);
        let wait = Duration::from_secs(3);
        let answer = tokio::time::timeout(wait, agent::handshake(&mut client)).await;
        if !matches!(answer, Ok(Ok(_))) {
            // The VMM serves one connection at a time: free it for the next.
            hangup.now();
        }
        match answer {
            Ok(Ok(v)) => break (client, v, hangup),
            Ok(Err(e)) if attempt >= 3 => return Err(e.into()),
            Err(_) if attempt >= 3 => return Err(AgentError::Timeout(wait * 3).into()),
            _ => tracing::debug!(
                template,
                attempt,
                "pooled clone's agent silent; reconnecting"
            ),
        }
    };
    client
        .set_identity(agent_proto::IdentityRequest {
            entropy: crate::sandbox::host_entropy(),
            hostname: hostname.into(),
        })
        .await
        .map_err(AgentError::from)?;
    let timings = Timings {
        vmm_ready: handout,
        agent_ready: t0.elapsed(),
        guest_ready_ms: version.ready_ms,
    };
    let vm = crate::sandbox::PooledVm {
        id: reply.sandbox_id,
        template: template.into(),
        accel,
        kernel_release: version.kernel_release,
        supervisor,
        agent_socket: reply.agent_socket,
        hangup,
        nics: taps.len(),
    };
    Ok(Some(Sandbox::pooled(vm, client, timings)?))
}
