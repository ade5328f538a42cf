//! `create`: the pod's VM booted for its first container, each container's
//! files staged and moved into the VM's share, its guest side made; all of
//! it without the pod's lock, which guards only the bookkeeping.

use super::*;

/// Boots the pod's VM in the shim's network namespace.
async fn boot_vm(key: &str, pod_id: &str, kind: &Kind, spec: &Spec) -> anyhow::Result<Vm> {
    if *kind == Kind::Sandbox && spec.network_namespace().is_none() {
        anyhow::bail!(
            "hostNetwork pods are not supported: a pod's VM has its own kernel and cannot share the host's network stack"
        );
    }
    // containerd leaves a namespace out of the pod's spec when the pod asks
    // for the node's (hostPID, hostIPC).
    let has = |kind: &str| {
        spec.linux
            .as_ref()
            .is_some_and(|l| l.namespaces.iter().any(|n| n.kind == kind))
    };
    if *kind == Kind::Sandbox && !has("pid") {
        anyhow::bail!(
            "hostPID pods are not supported: a pod's processes run in its VM and cannot share the host's pid namespace"
        );
    }
    if *kind == Kind::Sandbox && !has("ipc") {
        anyhow::bail!(
            "hostIPC pods are not supported: a pod's VM cannot share the host's IPC namespace"
        );
    }
    let policy = sandbox::pool::annotation_policy(&sandbox::pool::config_path())?;
    spec.check_annotations(&policy, *kind == Kind::Sandbox)?;
    let kernel = spec.annotations.get(ANNOTATION_KERNEL).map(PathBuf::from);
    let assets = sandbox::assets::GuestAssets::resolve(kernel.as_deref(), None)?;
    let accel = sandbox::checked_accel(None)?;
    let (memory_mib, vcpus) = match kind {
        Kind::Sandbox => spec.pod_vm_shape(),
        _ => (spec.vm_memory_mib(), spec.vm_vcpus()),
    };
    let network = match spec.network_namespace() {
        Some(_) => Some(sandbox::network::attach()?),
        None => None,
    };
    let dir = pod_dir(key);
    std::fs::create_dir_all(dir.parent().expect("pods dir"))?;
    // Not create_dir_all: a pod of the same name must not be taken over.
    std::fs::create_dir(&dir).map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
    let share = dir.join("share");
    let prepared = sandbox::share::create_top(&share)
        .map_err(std::io::Error::other)
        .and_then(|_| std::fs::create_dir(dir.join("stage")))
        .and_then(|_| std::fs::write(dir.join("shim.pid"), std::process::id().to_string()));
    if let Err(e) = prepared {
        sandbox::share::remove_with_top(&dir);
        return Err(e.into());
    }
    let hostname = if spec.hostname.is_empty() {
        pod_id.chars().take(12).collect()
    } else {
        spec.hostname.clone()
    };
    let nics = network.as_ref().map(|n| n.nics.clone()).unwrap_or_default();
    let config = SandboxConfig {
        cpu_millis: match kind {
            Kind::Sandbox => spec.pod_cpu_millis(),
            _ => spec.cpu_millis(),
        },
        cgroup: spec.vm_cgroup()?,
        id: key.to_string(),
        root: root(),
        memory_mib,
        vcpus,
        assets,
        accel,
        shares: vec![Share {
            tag: SHARE_TAG.into(),
            path: share.clone(),
            readonly: false,
        }],
        nics,
        hostname,
        boot_timeout: sandbox::default_boot_timeout(accel),
        template: None,
        block_root: None,
    };
    tracing::info!(pod = %pod_id, %accel, memory = memory_mib, vcpus, "starting the pod's VM");
    // From the factory: a pool's ready clone, a clone, or a cold boot.
    let sb = match sandbox::pool::provide(config).await {
        Ok(sb) => sb,
        Err(e) => {
            sandbox::share::remove_with_top(&dir);
            return Err(e.into());
        }
    };
    if let Some(n) = &network {
        if !n.request.interfaces.is_empty() {
            let configured = sb.agent.clone().configure_network(n.request.clone()).await;
            if let Err(s) = configured {
                sb.destroy().await;
                sandbox::share::remove_with_top(&dir);
                anyhow::bail!("configuring the guest network: {}", s.message());
            }
        }
    }
    let pid = sb.vmm_pid();
    Ok(Vm {
        sandbox: sb,
        network,
        share,
        pid,
    })
}

/// Mounts containerd's rootfs mounts (a snapshot) at bundle/rootfs.
fn mount_rootfs(
    bundle: &Path,
    mounts: &[containerd_shim::protos::api::Mount],
) -> anyhow::Result<Option<PathBuf>> {
    if mounts.is_empty() {
        return Ok(None);
    }
    let target = bundle.join("rootfs");
    std::fs::create_dir_all(&target)?;
    for m in mounts {
        containerd_shim::mount::mount_rootfs(
            Some(m.type_.as_str()),
            Some(m.source.as_str()),
            &m.options,
            &target,
        )
        .map_err(|e| {
            sandbox::share::unmount_all(&target);
            anyhow::anyhow!(
                "mounting the root filesystem ({} {}): {e}",
                m.type_,
                m.source
            )
        })?;
    }
    Ok(Some(target))
}

/// Where a container's guest side is made: a VM the create itself just
/// booted (not yet the pod's), or the pod's VM of a generation.
pub(super) enum Target<'a> {
    Own(&'a Vm),
    Pod(u64),
}

impl Service {
    /// Runs `f` on the VM of `target`, taking the pod's lock for the pod's
    /// (`f` makes host calls only: mounts, the pool daemon).
    async fn with_vm<T>(
        &self,
        target: &Target<'_>,
        f: impl FnOnce(&Vm) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        match target {
            Target::Own(vm) => f(vm),
            Target::Pod(generation) => {
                let pod = self.inner.pod.lock().await;
                match pod.vm.as_ref() {
                    Some(vm) if pod.generation == *generation => f(vm),
                    _ => anyhow::bail!("the pod's VM is gone"),
                }
            }
        }
    }

    /// Undoes a container's host mounts, with its target's VM if it lives.
    pub(super) async fn unmount(&self, c: &mut Container, target: &Target<'_>) {
        let done = self
            .with_vm(target, |vm| {
                c.unmount(Some(vm));
                Ok(())
            })
            .await;
        if done.is_err() {
            c.unmount(None);
        }
    }

    /// Creates the container in the guest (not the sandbox one) and starts
    /// relaying its stdio. The pod's lock is taken only for host calls.
    async fn create_in_guest(
        &self,
        target: &Target<'_>,
        c: &mut Container,
        spec: &Spec,
        rootfs: &Path,
    ) -> anyhow::Result<()> {
        let p = &c.init;
        let stdio = crate::io::Stdio::open(&p.stdin, &p.stdout, &p.stderr)
            .map_err(|e| anyhow::anyhow!("opening the container's stdio: {e}"))?;
        let (share, pooled, mut client) = self
            .with_vm(target, |vm| {
                Ok((
                    vm.share.clone(),
                    vm.sandbox.is_pooled(),
                    vm.sandbox.agent.clone(),
                ))
            })
            .await?;
        // Gathered where the guest cannot see, then moved into the share
        // whole: the guest can write to the share, and must not steer our
        // mounts (a symlink planted where a bind is about to go).
        let stage = share.with_file_name("stage").join(&c.id);
        std::fs::create_dir(&stage)?;
        let undo = |stage: &Path| {
            sandbox::share::unmount_all(stage);
            sandbox::share::remove_unmounted(stage);
        };
        let mut mounts = match sandbox::share::populate(&stage, rootfs, &spec.mounts) {
            Ok(m) => m,
            Err(e) => {
                undo(&stage);
                return Err(e.into());
            }
        };
        let id = c.id.clone();
        let placed = self
            .with_vm(target, |vm| {
                if pooled {
                    // The pool daemon mounts a copy of the tree in the
                    // VM's share.
                    vm.sandbox.attach(&stage, &id, false)?;
                    Ok(stage.clone())
                } else {
                    // One mount into the share, which reaches the VMM's
                    // jail; the staged originals go.
                    sandbox::share::attach_tree(&stage, &vm.share, &id).map_err(|e| {
                        anyhow::anyhow!("moving the container's files into the share: {e}")
                    })
                }
            })
            .await;
        if !pooled || placed.is_err() {
            undo(&stage);
        }
        c.share = Some(placed?);
        c.attached = pooled;
        for m in mounts.iter_mut().filter(|m| m.r#type == "bind") {
            m.source = format!("{}/{}", c.id, m.source);
        }
        let request = CreateContainerRequest {
            container_id: c.id.clone(),
            rootfs_tag: SHARE_TAG.into(),
            rootfs_subpath: format!("{}/rootfs", c.id),
            rootfs_readonly: spec.root.as_ref().is_some_and(|r| r.readonly),
            hostname: spec.hostname.clone(),
            process: Some(spec.agent_process()?),
            resources: Some(spec.agent_resources()),
            mounts,
            sysctl: spec.sysctl(),
            pod_shared: matches!(c.kind, Kind::Member(_)),
            rootfs_overlay: false,
            block_root: None,
            masked_paths: spec.masked_paths(),
            readonly_paths: spec.readonly_paths(),
            rootfs_propagation: spec.rootfs_propagation(),
            devices: spec.devices()?,
        };
        bounded("creating the container", client.create_container(request))
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let relays = stdio.relay(&client, &c.id, "");
        c.init.close_stdin = Some(relays.close_stdin.clone());
        c.init.relays = Some(relays);
        Ok(())
    }

    pub(super) async fn create_task(&self, req: &api::CreateTaskRequest) -> anyhow::Result<u32> {
        if let Some(e) = STARTUP_ERROR.get() {
            anyhow::bail!("the shim could not start: {e}");
        }
        if !req.checkpoint.is_empty() {
            anyhow::bail!("restoring from a checkpoint is not supported by podvisor");
        }
        sandbox::container::valid_id(&req.id)?;
        let bundle = PathBuf::from(&req.bundle);
        let spec = Spec::load(&bundle)?;
        let kind = Kind::of(&req.id, &spec);
        // Reserved under the lock; booted and made without it.
        let generation = {
            let mut pod = self.inner.pod.lock().await;
            if pod.containers.contains_key(&req.id) || pod.creating.contains(&req.id) {
                anyhow::bail!("container {} already exists", req.id);
            }
            match (&kind, &pod.vm) {
                (Kind::Member(s), None) => {
                    anyhow::bail!("pod sandbox {s} is not running in this shim")
                }
                (Kind::Member(s), Some(_)) if !pod.containers.contains_key(s) => {
                    anyhow::bail!("pod sandbox {s} is not running in this shim")
                }
                (Kind::Sandbox | Kind::Alone, vm) if vm.is_some() || pod.booting => {
                    anyhow::bail!(
                        "this shim already runs a pod; {} cannot have its own",
                        req.id
                    )
                }
                _ => {}
            }
            pod.creating.insert(req.id.clone());
            pod.booting |= kind.boots_vm();
            pod.generation
        };
        let made = self
            .create_unlocked(req, &bundle, &spec, &kind, generation)
            .await;
        let mut pod = self.inner.pod.lock().await;
        pod.creating.remove(&req.id);
        if kind.boots_vm() {
            pod.booting = false;
        }
        let (mut c, vm) = made?;
        let booted = vm.is_some();
        if let Some(vm) = vm {
            self.inner.vm_pid.store(vm.pid, Ordering::Relaxed);
            pod.install(vm);
        } else if c.in_guest() && (pod.generation != generation || pod.vm.is_none()) {
            // The pod ended while its member was being made.
            c.unmount(None);
            anyhow::bail!("the pod's VM ended while {} was being created", req.id);
        }
        let pid = pod.vm_pid();
        pod.containers.insert(req.id.clone(), c);
        drop(pod);
        if booted {
            self.watch_vm();
        }
        self.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                }),
                pid,
                ..Default::default()
            }),
        )
        .await;
        Ok(pid)
    }

    /// The part of `create` made without the pod's lock: the root mounted,
    /// the VM booted (for a pod's first container), the guest side made.
    /// Undoes what it did if it fails.
    async fn create_unlocked(
        &self,
        req: &api::CreateTaskRequest,
        bundle: &Path,
        spec: &Spec,
        kind: &Kind,
        generation: u64,
    ) -> anyhow::Result<(Container, Option<Vm>)> {
        let key = pod_key(&self.inner.namespace, &req.id);
        let mounted = mount_rootfs(bundle, &req.rootfs)?;
        let rootfs = match &mounted {
            Some(r) => r.clone(),
            None => spec.rootfs(bundle)?,
        };
        let mut c = Container {
            id: req.id.clone(),
            bundle: bundle.to_path_buf(),
            kind: kind.clone(),
            mounted_rootfs: mounted,
            share: None,
            attached: false,
            init: Process::new(&req.stdin, &req.stdout, &req.stderr, req.terminal),
            execs: Default::default(),
        };
        let vm = match kind.boots_vm() {
            true => match boot_vm(&key, &req.id, kind, spec).await {
                Ok(vm) => Some(vm),
                Err(e) => {
                    c.unmount(None);
                    return Err(e);
                }
            },
            false => None,
        };
        if c.in_guest() {
            let made = {
                let target = match &vm {
                    Some(vm) => Target::Own(vm),
                    None => Target::Pod(generation),
                };
                let made = self.create_in_guest(&target, &mut c, spec, &rootfs).await;
                if made.is_err() {
                    self.unmount(&mut c, &target).await;
                }
                made
            };
            if let Err(e) = made {
                if let Some(vm) = vm {
                    vm.destroy().await;
                }
                return Err(e);
            }
        }
        Ok((c, vm))
    }
}
