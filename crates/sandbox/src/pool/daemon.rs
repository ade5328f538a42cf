//! `pool serve`: keeps N clones of a template ready and hands them out.

use super::*;

/// A ready clone: paused, its agent session closed, an empty share, its
/// NICs on hubs with no tap yet.
struct Member {
    sb: Sandbox,
    agent_socket: PathBuf,
}

async fn launch_member(root: &Path, template: &Template, n: u64) -> Result<Member, SandboxError> {
    let id = format!("pool-{}-{}-{n}", template.meta.name, std::process::id());
    let share = pools_dir(root).join(&template.meta.name).join(&id);
    let parent = share.parent().expect("a member's share has a parent");
    std::fs::create_dir_all(parent)
        .map_err(|e| SandboxError::Invalid(format!("creating {}: {e}", parent.display())))?;
    crate::share::create_top(&share).map_err(|e| SandboxError::Invalid(format!("{e}")))?;
    let (memory_mib, vcpus, assets, accel) = template.shape();
    // The caller's taps join the hubs when it takes the clone.
    let nics = (0..template.meta.nics)
        .map(|i| hypervisor::Nic {
            tap: String::new(),
            mac: format!("02:00:00:00:00:{i:02x}"),
            fd: None,
        })
        .collect();
    let config = SandboxConfig {
        cpu_millis: None,
        cgroup: None,
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
        nics,
        hostname: "podvisor".into(),
        boot_timeout: Duration::from_secs(60),
        template: Some(template.clone()),
        block_root: None,
    };
    // The VM's supervisor removes the share (and the VM's state directory)
    // once the VM is gone, whoever holds the VM then.
    let mut sb = match Sandbox::start_handed_over(config, vec![share.clone()]).await {
        Ok(sb) if sb.cloned_from.is_some() => sb,
        // A pool holds clones only: a cold VM has no hubs to join taps to.
        Ok(sb) => {
            let why = sb.fallback.clone().unwrap_or_default();
            sb.destroy().await;
            let _ = std::fs::remove_dir_all(&share);
            return Err(SandboxError::Invalid(why));
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&share);
            return Err(e);
        }
    };
    warm_up(&sb, &share).await;
    let agent_socket = sb.agent_socket();
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
    Ok(Member { sb, agent_socket })
}

/// The warm-up container's id and directory in a fresh clone's share.
const WARM_UP: &str = ".podvisor-warm-up";
/// Its program, alone in its root.
const WARM_UP_EXE: &str = "exit0";

/// The smallest static x86-64 program: one ELF header, one loadable
/// segment, and `exit(0)` (xor edi,edi; mov eax,60; syscall).
fn exit0_elf() -> Vec<u8> {
    const BASE: u64 = 0x40_0000;
    const HEADERS: u64 = 64 + 56;
    let code = [0x31, 0xff, 0xb8, 0x3c, 0, 0, 0, 0x0f, 0x05];
    let size = HEADERS + code.len() as u64;
    let mut elf = b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0".to_vec();
    elf.extend(2u16.to_le_bytes()); // ET_EXEC
    elf.extend(0x3eu16.to_le_bytes()); // EM_X86_64
    elf.extend(1u32.to_le_bytes()); // EV_CURRENT
    elf.extend((BASE + HEADERS).to_le_bytes()); // entry: the code
    elf.extend(64u64.to_le_bytes()); // program headers right after this one
    elf.extend(0u64.to_le_bytes()); // no section headers
    elf.extend(0u32.to_le_bytes()); // flags
    for half in [64u16, 56, 1, 0, 0, 0] {
        // header size, program header size and count, no sections
        elf.extend(half.to_le_bytes());
    }
    elf.extend(1u32.to_le_bytes()); // PT_LOAD
    elf.extend(5u32.to_le_bytes()); // PF_R | PF_X
    for word in [0, BASE, BASE, size, size, 0x1000] {
        // offset, vaddr, paddr, file size, memory size, alignment
        elf.extend(word.to_le_bytes());
    }
    elf.extend(code);
    elf
}

/// Runs a new clone through a container's whole life once (create, start,
/// exec, exit, wait, remove) with a tiny program, so that the caller's
/// first container finds the share mounted and, under TCG, the guest code
/// it runs already translated: QEMU keeps translations per process, and a
/// pooled clone's QEMU is the one that warmed up. Best effort.
async fn warm_up(sb: &Sandbox, share: &Path) {
    let dir = share.join(WARM_UP);
    let written = std::fs::create_dir(&dir).and_then(|()| {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o755)
            .open(dir.join(WARM_UP_EXE))?;
        std::io::Write::write_all(&mut f, &exit0_elf())
    });
    if written.is_ok() {
        let t0 = Instant::now();
        let ran = tokio::time::timeout(Duration::from_secs(10), run_warm_up(sb)).await;
        tracing::debug!(sandbox = %sb.id, elapsed = ?t0.elapsed(), ?ran, "warmed up");
        let id = WARM_UP.trim_start_matches('.').to_string();
        let mut agent = sb.agent.clone();
        let remove = agent.remove_container(agent_proto::ContainerRequest { container_id: id });
        let _ = tokio::time::timeout(Duration::from_secs(10), remove).await;
    }
    // The guest made mount points in it: plain directories on this side.
    crate::share::remove_unmounted(&dir);
}

async fn run_warm_up(sb: &Sandbox) -> Result<i32, tonic::Status> {
    let id = WARM_UP.trim_start_matches('.').to_string();
    let mut agent = sb.agent.clone();
    let request = agent_proto::CreateContainerRequest {
        container_id: id.clone(),
        rootfs_tag: ROOTFS_TAG.into(),
        rootfs_subpath: WARM_UP.into(),
        process: Some(agent_proto::Process {
            args: vec![format!("/{WARM_UP_EXE}")],
            cwd: "/".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    agent.create_container(request).await?;
    let container = agent_proto::ContainerRequest {
        container_id: id.clone(),
    };
    agent.start_container(container).await?;
    let process = agent_proto::ProcessRequest {
        container_id: id,
        exec_id: String::new(),
    };
    Ok(agent.wait_process(process).await?.into_inner().exit_code)
}

/// Ends a ready clone (its supervisor removes its share).
async fn retire(member: Member) {
    member.sb.destroy().await;
}

/// Resumes `member` for the caller on `conn`, its taps joined to the NICs.
async fn wake(member: &mut Member, nics: usize, taps: &[OwnedFd]) -> Result<Reply, SandboxError> {
    let want = member.sb.nics();
    if nics != want || taps.len() != want {
        return Err(SandboxError::Invalid(format!(
            "the template has {want} NICs; the request named {nics} and carried {} tap devices",
            taps.len()
        )));
    }
    for (i, tap) in taps.iter().enumerate() {
        member.sb.connect_tap(i, tap.as_fd()).await?;
    }
    let t = Instant::now();
    member.sb.resume().await?;
    tracing::debug!(sandbox = %member.sb.id, resume_us = t.elapsed().as_micros() as u64, "resumed a ready clone");
    Ok(Reply {
        sandbox_id: member.sb.id.clone(),
        agent_socket: member.agent_socket.clone(),
        vmm_pid: member.sb.vmm_pid(),
        kernel_release: member.sb.kernel_release.clone(),
        ..Default::default()
    })
}

/// Hands `member` over whole to the caller on `conn`: its supervisor's
/// connection goes with the answer, and the VM is the caller's from then
/// on (it outlives this daemon). A clone that cannot be woken is retired.
async fn hand_out(mut member: Member, nics: usize, taps: Vec<OwnedFd>, conn: UnixStream) {
    let woken = wake(&mut member, nics, &taps).await;
    drop(taps);
    let reply = match woken {
        Ok(reply) => reply,
        Err(e) => {
            let _ = fdmsg::send_async(&conn, &Reply::error(e).line()).await;
            retire(member).await;
            return;
        }
    };
    // The VM is the caller's: its state directory says so to garbage
    // collection (which waits for a dead owner's VM to be cleaned up).
    let caller = conn.peer_cred().ok().and_then(|c| c.pid());
    if let (Some(pid), Some(dir)) = (caller, member.sb.state_dir()) {
        crate::state::record_owner(dir, pid as u32);
    }
    let vm = member.sb.hand_over();
    match vm {
        Ok(vm) => {
            let reply = Reply {
                seq: vm.seq,
                ..reply
            };
            let fds = [vm.conn.as_raw_fd(), vm.pidfd.as_raw_fd()];
            if let Err(e) = fdmsg::send_async_with(&conn, &reply.line(), &fds).await {
                // The caller is gone: so is the VM, when `vm` closes here.
                tracing::warn!(sandbox = %reply.sandbox_id, "handing over: {e}");
            }
        }
        Err(e) => {
            let _ = fdmsg::send_async(&conn, &Reply::error(e).line()).await;
        }
    }
}

/// The caller's first message, with its descriptors.
async fn read_request(
    conn: &UnixStream,
    reader: &mut fdmsg::Reader,
) -> Option<(Request, Vec<OwnedFd>)> {
    let (line, fds) = tokio::time::timeout(Duration::from_secs(5), reader.recv_async(conn))
        .await
        .ok()?
        .ok()??;
    Some((parse_request(&line).ok()?, fds))
}

/// Serves one pool until `shutdown` fires; then retires its ready clones.
/// The caller holds the pool's `claim`.
pub async fn serve(
    root: PathBuf,
    config: PoolConfig,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<(), SandboxError> {
    let template = Template::open(&root, &config.template)?;
    std::fs::create_dir_all(pools_dir(&root)).map_err(|e| {
        SandboxError::Invalid(format!("creating {}: {e}", pools_dir(&root).display()))
    })?;
    // Shares a daemon killed before left (its mounts died with it), but
    // not those of the VMs it handed over.
    sweep_shares(&root, &config.template);
    let sock = socket(&root, &config.template);
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock)
        .map_err(|e| SandboxError::Invalid(format!("binding {}: {e}", sock.display())))?;
    // Callers hand the daemon mount trees and taps: root's alone.
    let private = <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600);
    std::fs::set_permissions(&sock, private)
        .map_err(|e| SandboxError::Invalid(format!("securing {}: {e}", sock.display())))?;

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
    type Asked = (usize, Vec<OwnedFd>, UnixStream);
    let (req_tx, mut req_rx) = tokio::sync::mpsc::unbounded_channel::<Asked>();
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
                if let Ok((conn, _)) = conn {
                    let tx = req_tx.clone();
                    tokio::spawn(async move {
                        let mut reader = fdmsg::Reader::default();
                        match read_request(&conn, &mut reader).await {
                            Some((Request::Take { nics }, taps)) => {
                                let _ = tx.send((nics, taps, conn));
                            }
                            None => {}
                        }
                    });
                }
            }
            Some((nics, taps, conn)) = req_rx.recv() => match ready.pop_front() {
                Some(m) => {
                    status.handed_out += 1;
                    tokio::spawn(hand_out(m, nics, taps, conn));
                }
                None => {
                    let empty = Reply::error("the pool is empty");
                    let _ = fdmsg::send_async(&conn, &empty.line()).await;
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
