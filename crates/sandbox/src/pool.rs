//! Pools (runV's cache factory): a daemon keeps N clones of a template booted,
//! paused and ready, and refills them in the background. A sandbox taken from
//! a pool is ready in milliseconds: the daemon binds the caller's root into
//! the clone's share, resumes it and answers with its agent socket. The
//! caller holds the connection for the sandbox's life; when it closes (the
//! caller is done, or was killed) the daemon tears the VM down.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hypervisor::Share;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use crate::agent::{self, AgentClient, AgentError};
use crate::template::{Template, ROOTFS_TAG};
use crate::{Sandbox, SandboxConfig, SandboxError, Timings};

/// Where a pooled clone's container root is bound inside its share (the
/// share's top is opened by the VMM at start and cannot be mounted over).
pub const ROOTFS_SUBPATH: &str = "rootfs";
pub const DEFAULT_CONFIG: &str = "/etc/podvisor/config.toml";

/// One pool of the factory policy: `[[pool]] template = "T" size = N`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub template: String,
    pub size: usize,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    pool: Vec<PoolConfig>,
    /// The template the OCI CLI and the containerd shim clone their VMs
    /// from, when its shape fits (`template = "T"`).
    #[serde(default)]
    template: Option<String>,
}

/// The factory policy's file: `PODVISOR_CONFIG`, else the default.
pub fn config_path() -> PathBuf {
    std::env::var_os("PODVISOR_CONFIG")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG))
}

/// The template front ends clone from, if the policy names one. No policy
/// file: none. A broken one is an error.
pub fn front_end_template(path: &Path) -> Result<Option<String>, SandboxError> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| SandboxError::Invalid(format!("reading {}: {e}", path.display())))?;
    let file: ConfigFile = toml::from_str(&text)
        .map_err(|e| SandboxError::Invalid(format!("{}: {}", path.display(), e.message())))?;
    Ok(file.template)
}

/// The front ends' template, opened, if the policy names one whose shape
/// fits a VM of `memory_mib`, `vcpus` and `nics`; else why not (logged by
/// the caller; the VM then boots cold).
pub fn template_for(
    root: &Path,
    memory_mib: u64,
    vcpus: u32,
    nics: usize,
) -> Result<Option<crate::template::Template>, SandboxError> {
    let Some(name) = front_end_template(&config_path())? else {
        return Ok(None);
    };
    let t = crate::template::Template::open(root, &name)?;
    if t.meta.memory_mib < memory_mib || t.meta.vcpus < vcpus || t.meta.nics != nics {
        return Err(SandboxError::Invalid(format!(
            "template {name} ({} MiB, {} vCPUs, {} NICs) does not fit a VM of {memory_mib} MiB, {vcpus} vCPUs, {nics} NICs",
            t.meta.memory_mib, t.meta.vcpus, t.meta.nics
        )));
    }
    Ok(Some(t))
}

/// Reads the factory policy.
pub fn load_config(path: &Path) -> Result<Vec<PoolConfig>, SandboxError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| SandboxError::Invalid(format!("reading {}: {e}", path.display())))?;
    let file: ConfigFile = toml::from_str(&text)
        .map_err(|e| SandboxError::Invalid(format!("{}: {}", path.display(), e.message())))?;
    for p in &file.pool {
        if p.size == 0 || p.size > 64 {
            return Err(SandboxError::Invalid(format!(
                "{}: pool {}: size {} is out of range (1 to 64)",
                path.display(),
                p.template,
                p.size
            )));
        }
    }
    Ok(file.pool)
}

fn pools_dir(root: &Path) -> PathBuf {
    root.join("pools")
}

/// The socket of template `name`'s pool.
pub fn socket(root: &Path, template: &str) -> PathBuf {
    pools_dir(root).join(format!("{template}.sock"))
}

/// How many clones are ready: `ROOT/pools/<template>.json`.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct PoolStatus {
    pub ready: usize,
    pub size: usize,
    pub handed_out: u64,
}

pub fn status(root: &Path, template: &str) -> Option<PoolStatus> {
    let text = std::fs::read(pools_dir(root).join(format!("{template}.json"))).ok()?;
    serde_json::from_slice(&text).ok()
}

fn write_status(root: &Path, template: &str, s: PoolStatus) {
    let path = pools_dir(root).join(format!("{template}.json"));
    let tmp = path.with_extension("json.tmp");
    if std::fs::write(&tmp, serde_json::to_vec(&s).unwrap_or_default()).is_ok() {
        let _ = std::fs::rename(&tmp, &path);
    }
}

#[derive(Serialize, Deserialize)]
struct Request {
    rootfs: PathBuf,
}

#[derive(Serialize, Deserialize, Default)]
struct Reply {
    #[serde(default)]
    error: String,
    #[serde(default)]
    sandbox_id: String,
    #[serde(default)]
    agent_socket: PathBuf,
    #[serde(default)]
    vmm_pid: u32,
    #[serde(default)]
    kernel_release: String,
}

/// A ready clone: paused, its agent session closed, an empty share.
struct Member {
    sb: Sandbox,
    share: PathBuf,
    agent_socket: PathBuf,
}

async fn launch_member(root: &Path, template: &Template, n: u64) -> Result<Member, SandboxError> {
    let id = format!("pool-{}-{}-{n}", template.meta.name, std::process::id());
    let share = pools_dir(root).join(&template.meta.name).join(&id);
    std::fs::create_dir_all(share.join(ROOTFS_SUBPATH))
        .map_err(|e| SandboxError::Invalid(format!("creating {}: {e}", share.display())))?;
    let (memory_mib, vcpus, assets, accel) = template.shape();
    let config = SandboxConfig {
        id,
        root: root.to_path_buf(),
        memory_mib,
        vcpus,
        assets,
        accel,
        shares: vec![Share {
            tag: ROOTFS_TAG.into(),
            path: share.clone(),
            readonly: false,
        }],
        nics: Vec::new(),
        hostname: "podvisor".into(),
        boot_timeout: Duration::from_secs(60),
        template: Some(template.clone()),
    };
    let mut sb = match Sandbox::start(config).await {
        Ok(sb) => sb,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&share);
            return Err(e);
        }
    };
    let agent_socket = sb.agent_socket().unwrap_or_default();
    // Hang up: whoever takes the clone opens a session of its own.
    let paused = match sb.hang_up_agent() {
        Ok(()) => {
            // Let the guest see the hang-up before its vCPUs stop.
            tokio::time::sleep(Duration::from_millis(50)).await;
            sb.pause().await
        }
        Err(e) => Err(e),
    };
    if let Err(e) = paused {
        sb.destroy().await;
        let _ = std::fs::remove_dir_all(&share);
        return Err(e);
    }
    Ok(Member {
        sb,
        share,
        agent_socket,
    })
}

async fn retire(member: Member) {
    let rootfs = member.share.join(ROOTFS_SUBPATH);
    member.sb.destroy().await;
    while umount2(&rootfs, MntFlags::MNT_DETACH).is_ok() {}
    let _ = std::fs::remove_dir(&rootfs);
    let _ = std::fs::remove_dir(&member.share);
}

/// Hands `member` to the caller on `conn`; tears it down when `conn` closes.
async fn hand_out(mut member: Member, req: Request, mut conn: UnixStream) {
    let rootfs = member.share.join(ROOTFS_SUBPATH);
    let bound = mount(
        Some(&req.rootfs),
        &rootfs,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    );
    let reply = match bound {
        Err(e) => Reply {
            error: format!("binding {} into the clone: {e}", req.rootfs.display()),
            ..Default::default()
        },
        Ok(()) => match member.sb.resume().await {
            Err(e) => Reply {
                error: e.to_string(),
                ..Default::default()
            },
            Ok(()) => Reply {
                sandbox_id: member.sb.id.clone(),
                agent_socket: member.agent_socket.clone(),
                vmm_pid: member.sb.vmm_pid(),
                kernel_release: member.sb.kernel_release.clone(),
                ..Default::default()
            },
        },
    };
    let mut line = serde_json::to_vec(&reply).unwrap_or_default();
    line.push(b'\n');
    if conn.write_all(&line).await.is_ok() && reply.error.is_empty() {
        // The caller holds the connection while it uses the sandbox.
        let mut buf = [0u8; 64];
        while matches!(conn.read(&mut buf).await, Ok(n) if n > 0) {}
    }
    retire(member).await;
}

async fn read_request(conn: &mut UnixStream) -> Option<Request> {
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(conn);
    tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line))
        .await
        .ok()?
        .ok()?;
    serde_json::from_str(&line).ok()
}

/// Serves one pool until `shutdown` fires; then retires its ready clones.
pub async fn serve(
    root: PathBuf,
    config: PoolConfig,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<(), SandboxError> {
    let template = Template::open(&root, &config.template)?;
    std::fs::create_dir_all(pools_dir(&root)).map_err(|e| {
        SandboxError::Invalid(format!("creating {}: {e}", pools_dir(&root).display()))
    })?;
    let sock = socket(&root, &config.template);
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock)
        .map_err(|e| SandboxError::Invalid(format!("binding {}: {e}", sock.display())))?;
    let mut ready: VecDeque<Member> = VecDeque::new();
    let mut status = PoolStatus {
        ready: 0,
        size: config.size,
        handed_out: 0,
    };
    write_status(&root, &config.template, status);
    let mut n = 0u64;
    let mut failures = 0u32;
    // The clone being made runs as a task of its own: a caller arriving
    // meanwhile must not cancel it halfway (and leak its VM).
    let mut refill: Option<tokio::task::JoinHandle<Result<Member, SandboxError>>> = None;
    // Requests are read by their own tasks: a silent caller holds nothing up.
    let (req_tx, mut req_rx) = tokio::sync::mpsc::unbounded_channel::<(Request, UnixStream)>();
    loop {
        if refill.is_none() && ready.len() < config.size {
            n += 1;
            let (root, template, delay) = (root.clone(), template.clone(), failures);
            refill = Some(tokio::spawn(async move {
                if delay > 0 {
                    tokio::time::sleep(Duration::from_secs(1 << delay.min(5))).await;
                }
                launch_member(&root, &template, n).await
            }));
        }
        let made = async {
            match refill.as_mut() {
                Some(task) => task.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            member = made => {
                refill = None;
                match member {
                    Ok(Ok(m)) => {
                        failures = 0;
                        ready.push_back(m);
                    }
                    Ok(Err(e)) => {
                        failures += 1;
                        tracing::warn!(template = %config.template, "refilling the pool: {e}");
                    }
                    Err(e) => {
                        failures += 1;
                        tracing::warn!(template = %config.template, "refilling the pool: {e}");
                    }
                }
            }
            conn = listener.accept() => {
                if let Ok((mut conn, _)) = conn {
                    let tx = req_tx.clone();
                    tokio::spawn(async move {
                        if let Some(req) = read_request(&mut conn).await {
                            let _ = tx.send((req, conn));
                        }
                    });
                }
            }
            Some((req, mut conn)) = req_rx.recv() => match ready.pop_front() {
                Some(m) => {
                    status.handed_out += 1;
                    tokio::spawn(hand_out(m, req, conn));
                }
                None => {
                    let reply = Reply { error: "the pool is empty".into(), ..Default::default() };
                    let mut line = serde_json::to_vec(&reply).unwrap_or_default();
                    line.push(b'\n');
                    let _ = conn.write_all(&line).await;
                }
            },
            _ = shutdown.changed() => break,
        }
        status.ready = ready.len();
        write_status(&root, &config.template, status);
    }
    if let Some(task) = refill {
        if let Ok(Ok(m)) = task.await {
            ready.push_back(m);
        }
    }
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(pools_dir(&root).join(format!("{}.json", config.template)));
    for m in ready {
        retire(m).await;
    }
    let _ = std::fs::remove_dir(pools_dir(&root).join(&config.template));
    Ok(())
}

/// Takes a ready sandbox from template `template`'s pool, for a container
/// rooted at `rootfs`. None when no pool serves it or it is empty.
pub async fn take(
    root: &Path,
    template: &str,
    rootfs: &Path,
    hostname: &str,
) -> Result<Option<Sandbox>, SandboxError> {
    let sock = socket(root, template);
    if !sock.exists() {
        return Ok(None);
    }
    let accel = Template::open(root, template)?.shape().3;
    let t0 = Instant::now();
    let Ok(mut conn) = std::os::unix::net::UnixStream::connect(&sock) else {
        return Ok(None);
    };
    let rootfs = std::fs::canonicalize(rootfs)
        .map_err(|e| SandboxError::Invalid(format!("rootfs {}: {e}", rootfs.display())))?;
    let mut line = serde_json::to_vec(&Request { rootfs }).unwrap_or_default();
    line.push(b'\n');
    let io = |e: std::io::Error| SandboxError::Invalid(format!("asking the pool: {e}"));
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io)?;
    conn.write_all(&line).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(&conn).read_line(&mut answer).map_err(io)?;
    let reply: Reply = serde_json::from_str(&answer)
        .map_err(|e| SandboxError::Invalid(format!("the pool's answer: {e}")))?;
    if !reply.error.is_empty() {
        tracing::info!(template, "pool: {}", reply.error);
        return Ok(None);
    }
    let handout = t0.elapsed();
    // A session the guest did not see begin (its marker split across reads
    // of a just-resumed VM) is answered by a fresh connection: try again.
    let mut attempt = 0;
    let (mut client, version) = loop {
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
            Ok(Ok(v)) => break (client, v),
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
        conn,
        pid: reply.vmm_pid,
    };
    Ok(Some(Sandbox::pooled(vm, client, timings)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factory_policy_parses_and_refuses_nonsense() {
        let dir = std::env::temp_dir().join(format!("podvisor-pool-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.toml");
        std::fs::write(&path, "[[pool]]\ntemplate = \"small\"\nsize = 3\n").unwrap();
        assert_eq!(
            load_config(&path).unwrap(),
            vec![PoolConfig {
                template: "small".into(),
                size: 3
            }]
        );
        for bad in [
            "[[pool]]\ntemplate = \"t\"\nsize = 0\n",
            "[[pool]]\ntemplate = \"t\"\n",
            "[[pool]]\ntemplate = \"t\"\nsize = 1\ncolour = \"red\"\n",
            "not toml at all [",
        ] {
            std::fs::write(&path, bad).unwrap();
            assert!(load_config(&path).is_err(), "{bad}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
