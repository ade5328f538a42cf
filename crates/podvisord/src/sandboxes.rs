//! Live sandboxes: made from a template (a pool's ready clone, else a clone,
//! else a cold boot), held by podvisord, ended by kill, by their deadline,
//! or with their tenant. Every VM is a podvisor sandbox whose supervisor
//! lives as long as podvisord holds it: a podvisord that dies takes its VMs
//! with it, and marks them ended when it starts again.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_proto::{ContainerRequest, CreateContainerRequest, User};
use hypervisor::Share;
use sandbox::agent::AgentClient;
use sandbox::template::Template;
use sandbox::{Sandbox, SandboxConfig};

use crate::db::{self, now_ms, OverQuota, SandboxRow, Tenant};
use crate::envd::process::Processes;
use crate::error::ApiError;
use crate::AppState;

/// The container every sandbox runs its commands in.
pub const CONTAINER: &str = "main";

/// The container's first process: reaps the orphans that commands leave
/// (they are reparented to it) and waits for the end.
const INIT: &[&str] = &[
    "/bin/sh",
    "-c",
    "trap 'exit 0' TERM; while :; do sleep 3600 & wait $!; done",
];

/// A template as podvisord's config names it: the podvisor template (a VM
/// snapshot) and the root filesystem its sandboxes get.
#[derive(Clone, Debug)]
pub struct TemplateSpec {
    pub name: String,
    /// The root's tree on the host (read for its users only).
    pub rootfs: PathBuf,
    /// The root as sandboxes get it: the tree as a read-only filesystem
    /// image and the empty one each sandbox's writable disk starts from
    /// (a block root, so that a sandbox's VM can be saved: QEMU cannot
    /// save a guest that holds 9p files).
    pub block: sandbox::BlockRoot,
    pub disk_mib: u64,
    /// A tenant's snapshot of a sandbox: its VM template restores the
    /// sandbox as it was (its container running), and only that tenant
    /// may start it.
    pub snapshot_of: Option<crate::config::SnapshotOf>,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Ready clones kept for it.
    pub pool: usize,
    /// Made through the admin API (and stored), not named in the config.
    pub from_api: bool,
    /// Users of the root (/etc/passwd, read on the host from the template's
    /// own tree, never from a guest).
    pub users: HashMap<String, (u32, u32, String)>,
}

impl TemplateSpec {
    /// The podvisor template's name in the VM root.
    pub fn vm_template(&self) -> String {
        format!("podvisord-{}", self.name)
    }

    pub fn user(&self, name: &str) -> Option<(u32, u32, String)> {
        self.users.get(name).cloned()
    }
}

/// Parses /etc/passwd lines into name → (uid, gid, home).
pub fn parse_passwd(text: &str) -> HashMap<String, (u32, u32, String)> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 7 {
                return None;
            }
            Some((
                f[0].to_string(),
                (f[2].parse().ok()?, f[3].parse().ok()?, f[5].to_string()),
            ))
        })
        .collect()
}

/// A running sandbox.
pub struct Live {
    pub id: String,
    pub tenant: String,
    pub template: TemplateSpec,
    pub envd_token: String,
    /// Asked of every request to the sandbox's own ports
    /// (`e2b-traffic-access-token`) when it was made with
    /// `network.allowPublicTraffic: false`; none asked otherwise.
    pub traffic_token: Option<String>,
    pub agent: AgentClient,
    /// The sandbox's environment (from `envVars`), under each command's own.
    pub env: HashMap<String, String>,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub started_ms: i64,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Milliseconds since the epoch at which it is killed.
    pub end_ms: Mutex<i64>,
    pub processes: Processes,
    pub watchers: crate::envd::filesystem::Watchers,
    /// Paused instead of killed at its deadline (`autoPause`).
    pub auto_pause: bool,
    /// Resumed by a request to it while paused (`autoResume`).
    pub auto_resume: bool,
    /// How many times it was paused before (its snapshots' generations).
    pub pauses: u32,
    /// The disk layers under its own (templates' and snapshots' layers,
    /// which are kept while it runs).
    pub chain: Vec<PathBuf>,
    /// Taken by whoever ends it.
    vm: tokio::sync::Mutex<Option<Sandbox>>,
}

/// What a paused sandbox's resume needs, kept in its row (JSON) while it is
/// paused: the snapshot, and what its clients hold (the envd token they
/// were given stays theirs).
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Paused {
    /// The podvisor template (a snapshot) in the VM root.
    pub snapshot: String,
    #[serde(flatten)]
    pub carried: Carried,
    pub paused_ms: i64,
}

/// What a sandbox is besides its VM: kept across its pauses, copied by its
/// forks (each with tokens of its own).
#[derive(Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Carried {
    pub envd_token: String,
    pub traffic_token: Option<String>,
    pub env: HashMap<String, String>,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub started_ms: i64,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub auto_pause: bool,
    pub auto_resume: bool,
    pub pauses: u32,
}

impl Live {
    /// Sandbox `id` of `tenant`, running in `vm` until `end_ms`.
    fn hold(
        id: &str,
        tenant: &str,
        template: TemplateSpec,
        c: Carried,
        vm: Sandbox,
        end_ms: i64,
    ) -> Arc<Live> {
        Arc::new(Live {
            id: id.to_string(),
            tenant: tenant.to_string(),
            template,
            envd_token: c.envd_token,
            traffic_token: c.traffic_token,
            agent: vm.agent.clone(),
            env: c.env,
            metadata: c.metadata,
            started_ms: c.started_ms,
            vcpus: c.vcpus,
            memory_mib: c.memory_mib,
            end_ms: Mutex::new(end_ms),
            processes: Processes::default(),
            watchers: Default::default(),
            auto_pause: c.auto_pause,
            auto_resume: c.auto_resume,
            pauses: c.pauses,
            chain: vm.disk_chain(),
            vm: tokio::sync::Mutex::new(Some(vm)),
        })
    }

    fn carried(&self) -> Carried {
        Carried {
            envd_token: self.envd_token.clone(),
            traffic_token: self.traffic_token.clone(),
            env: self.env.clone(),
            metadata: self.metadata.clone(),
            started_ms: self.started_ms,
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            auto_pause: self.auto_pause,
            auto_resume: self.auto_resume,
            pauses: self.pauses,
        }
    }
}

/// The name of a sandbox's `n`th snapshot. Each resume's writable layer is
/// an overlay of the snapshot's, so a sandbox's snapshots are kept until
/// it ends.
fn snapshot_name(id: &str, n: u32) -> String {
    format!("podvisord-paused-{id}-{n}")
}

/// One lock per sandbox id, held by whoever pauses, resumes or kills it:
/// of two resumes at once, the second finds the sandbox running.
#[derive(Default)]
pub struct Transitions {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Transitions {
    pub async fn lock(&self, id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut map = self.locks.lock().unwrap_or_else(|e| e.into_inner());
            // Locks nobody holds or waits for go.
            map.retain(|_, l| Arc::strong_count(l) > 1);
            Arc::clone(map.entry(id.to_string()).or_default())
        };
        lock.lock_owned().await
    }
}

impl Live {
    pub fn end_ms(&self) -> i64 {
        *self.end_ms.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Default)]
pub struct Registry {
    live: Mutex<HashMap<String, Arc<Live>>>,
}

impl Registry {
    pub fn get(&self, id: &str) -> Option<Arc<Live>> {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    /// The tenant's live sandbox `id`; another tenant's is as absent as one
    /// that does not exist.
    pub fn of_tenant(&self, tenant: &str, id: &str) -> Result<Arc<Live>, ApiError> {
        self.get(id)
            .filter(|l| l.tenant == tenant)
            .ok_or_else(|| ApiError::sandbox_not_found(id))
    }

    pub fn all(&self) -> Vec<Arc<Live>> {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn insert(&self, l: Arc<Live>) {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(l.id.clone(), l);
    }

    fn remove(&self, id: &str) -> Option<Arc<Live>> {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id)
    }
}

/// What a create asks for.
pub struct CreateAsk {
    pub template: String,
    pub timeout_s: i64,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub env: HashMap<String, String>,
    /// `network.allowPublicTraffic` (true when not given, as E2B's default).
    pub public: bool,
    pub auto_pause: bool,
    pub auto_resume: bool,
}

/// A sandbox id as E2B's look: lower-case letters and digits.
fn new_id() -> String {
    let hex = crate::auth::random_hex(10);
    format!("i{hex}")
}

fn quota_error(e: OverQuota) -> ApiError {
    ApiError::too_many(
        format!("over quota: {e}; kill a sandbox or ask for more"),
        5,
    )
}

/// Makes a sandbox for `tenant`: admitted against its quotas, then a VM
/// from the template's pool, clone or cold boot, then its container.
pub async fn create(
    state: &Arc<AppState>,
    tenant: &Tenant,
    ask: CreateAsk,
) -> Result<Arc<Live>, ApiError> {
    let template = state
        .template(&ask.template)
        .ok_or_else(|| ApiError::not_found(format!("template '{}' not found", ask.template)))?;
    let others = template
        .snapshot_of
        .as_ref()
        .is_some_and(|of| of.tenant != tenant.id);
    if others {
        return Err(ApiError::not_found(format!(
            "template '{}' not found",
            ask.template
        )));
    }
    if let Some(allowed) = &tenant.quotas.templates {
        if !allowed.contains(&template.name) && template.snapshot_of.is_none() {
            return Err(ApiError::not_found(format!(
                "template '{}' not found",
                ask.template
            )));
        }
    }
    if ask.timeout_s <= 0 {
        return Err(ApiError::bad_request(
            "timeout must be a positive number of seconds",
        ));
    }
    if ask.timeout_s > tenant.quotas.max_lifetime_s {
        return Err(ApiError::bad_request(format!(
            "timeout {} s is over this account's maximum sandbox lifetime ({} s)",
            ask.timeout_s, tenant.quotas.max_lifetime_s
        )));
    }
    let token = crate::auth::random_hex(24);
    let id = new_id();
    let row = SandboxRow {
        id: id.clone(),
        tenant_id: tenant.id.clone(),
        template: template.name.clone(),
        state: "creating".into(),
        vcpus: template.vcpus.into(),
        memory_mib: template.memory_mib as i64,
        metadata: ask.metadata.clone(),
        envd_token_hash: crate::auth::hash(&token),
        created_ms: now_ms(),
        started_ms: None,
        end_ms: now_ms() + ask.timeout_s * 1000,
        ended_ms: None,
        end_reason: None,
        paused: None,
    };
    state
        .db
        .admit(tenant, db::Ask { sandbox: &row })?
        .map_err(quota_error)?;
    crate::crash::point("create.admitted");
    let t0 = Instant::now();
    // A pool's clones cannot be paused (yet): one that may be does not
    // come from the pool.
    let made = start_vm(state, &template, &id, !ask.auto_pause).await;
    // A snapshot carries its container; one that would not restore booted
    // cold, without it.
    let made = match made {
        Ok((vm, _)) if template.snapshot_of.is_some() && vm.cloned_from.is_none() => {
            let why = vm.fallback.clone().unwrap_or_default();
            vm.destroy().await;
            Err(ApiError::internal(format!(
                "the snapshot '{}' would not restore: {why}",
                template.name
            )))
        }
        other => other,
    };
    let (vm, path) = match made {
        Ok(v) => v,
        Err(e) => {
            state.db.mark_ended(&id, "failed")?;
            state.metrics.create_failed();
            return Err(e);
        }
    };
    crate::crash::point("create.booted");
    let agent = vm.agent.clone();
    let started = match template.snapshot_of {
        Some(_) => Ok(()),
        None => start_container(agent.clone()).await,
    };
    if let Err(e) = started {
        vm.destroy().await;
        state.db.mark_ended(&id, "failed")?;
        state.metrics.create_failed();
        return Err(e);
    }
    crate::crash::point("create.started");
    let started = now_ms();
    let end_ms = started + ask.timeout_s * 1000;
    let carried = Carried {
        envd_token: token,
        traffic_token: (!ask.public).then(|| crate::auth::random_hex(16)),
        env: ask.env,
        metadata: ask.metadata,
        started_ms: started,
        vcpus: row.vcpus as u32,
        memory_mib: row.memory_mib as u64,
        auto_pause: ask.auto_pause,
        auto_resume: ask.auto_resume,
        pauses: 0,
    };
    let live = Live::hold(&id, &tenant.id, template, carried, vm, end_ms);
    state.registry.insert(Arc::clone(&live));
    state.db.mark_running(&id, path, end_ms)?;
    state.metrics.created(path, t0.elapsed());
    state.db.event(Some(&tenant.id), Some(&id), "created", path);
    tracing::info!(tenant = %tenant.id, sandbox = %id, path, ms = t0.elapsed().as_millis() as u64, "sandbox created");
    Ok(live)
}

/// A VM for `template`: from its pool, else a clone, else a cold boot.
async fn start_vm(
    state: &AppState,
    template: &TemplateSpec,
    id: &str,
    pooled: bool,
) -> Result<(Sandbox, &'static str), ApiError> {
    let name = template.vm_template();
    let root = &state.vm_root;
    // A pool's clone has the template's disks, and a writable layer of
    // its own over the template's.
    if pooled {
        match sandbox::pool::take(root, &name, "sandbox", &[]).await {
            Ok(Some(sb)) => return Ok((sb, "pool")),
            Ok(None) => {}
            Err(e) => tracing::warn!(sandbox = %id, "pool of {name}: {e}"),
        }
    }
    let vm_template = Template::open(root, &name).ok();
    let (memory, vcpus, assets, accel) = match &vm_template {
        Some(t) => t.shape(),
        None => (
            template.memory_mib,
            template.vcpus,
            state.assets.clone(),
            state.accel,
        ),
    };
    let config = SandboxConfig {
        memory_mib: memory,
        vcpus,
        assets,
        accel,
        template: vm_template,
        ..vm_config(state, id, Some(template.block.clone()))?
    };
    let sb = Sandbox::start(config).await.map_err(|e| {
        tracing::error!(sandbox = %id, "starting the VM: {e}");
        ApiError::internal(format!("starting the sandbox's VM: {e}"))
    })?;
    let path = if sb.cloned_from.is_some() {
        "clone"
    } else {
        "cold"
    };
    Ok((sb, path))
}

/// A sandbox VM's config, shaped as the state's defaults (callers set the
/// template and the shape it has).
fn vm_config(
    state: &AppState,
    id: &str,
    block_root: Option<sandbox::BlockRoot>,
) -> Result<SandboxConfig, ApiError> {
    Ok(SandboxConfig {
        cpu_millis: None,
        cgroup: None,
        id: id.to_string(),
        root: state.vm_root.clone(),
        memory_mib: 512,
        vcpus: 1,
        assets: state.assets.clone(),
        accel: state.accel,
        nics: Vec::new(),
        // The template's device set has a 9p share, which the container
        // (on the block root) never mounts: an empty one.
        shares: vec![Share {
            tag: sandbox::template::ROOTFS_TAG.into(),
            path: empty_share(&state.vm_root)?,
            readonly: true,
        }],
        hostname: "sandbox".into(),
        boot_timeout: sandbox::default_boot_timeout(state.accel),
        template: None,
        block_root,
    })
}

/// An empty directory, what sandboxes' unused 9p share exports.
fn empty_share(root: &std::path::Path) -> Result<PathBuf, ApiError> {
    let dir = root.join("empty-share");
    match std::fs::create_dir(&dir) {
        Ok(()) => Ok(dir),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(dir),
        Err(e) => Err(ApiError::internal(format!("{}: {e}", dir.display()))),
    }
}

async fn start_container(mut agent: AgentClient) -> Result<(), ApiError> {
    let process = agent_proto::Process {
        args: INIT.iter().map(|s| s.to_string()).collect(),
        env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
        cwd: "/".into(),
        user: Some(User {
            uid: 0,
            gid: 0,
            additional_gids: Vec::new(),
        }),
        ..Default::default()
    };
    agent
        .create_container(CreateContainerRequest {
            container_id: CONTAINER.into(),
            // The template's root is a read-only disk that all its
            // sandboxes share; each writes to an overlay on a disk of its
            // own (a copy-on-write layer over an empty filesystem).
            block_root: Some(agent_proto::BlockRoot {
                image_serial: sandbox::IMAGE_SERIAL.into(),
                layer_serial: sandbox::LAYER_SERIAL.into(),
            }),
            rootfs_overlay: true,
            hostname: "sandbox".into(),
            process: Some(process),
            ..Default::default()
        })
        .await
        .map_err(|s| {
            ApiError::internal(format!("creating the sandbox's container: {}", s.message()))
        })?;
    agent
        .start_container(ContainerRequest {
            container_id: CONTAINER.into(),
        })
        .await
        .map_err(|s| {
            ApiError::internal(format!("starting the sandbox's container: {}", s.message()))
        })?;
    Ok(())
}

/// Ends sandbox `id`: its VM destroyed (or, paused, its snapshots
/// removed), its row ended with `reason`. False when it was neither live
/// nor paused.
pub async fn kill(state: &AppState, id: &str, reason: &str) -> bool {
    let _transition = state.transitions.lock(id).await;
    let Some(live) = state.registry.remove(id) else {
        return match state.db.sandbox(id) {
            Ok(Some(row)) if row.state == "paused" => {
                discard_paused(state, &row, reason);
                true
            }
            _ => false,
        };
    };
    crate::crash::point("kill.begun");
    live.processes.end_all();
    live.watchers.clear();
    if let Some(vm) = live.vm.lock().await.take() {
        vm.destroy().await;
    }
    crate::crash::point("kill.destroyed");
    if let Err(e) = state.db.mark_ended(id, reason) {
        tracing::error!(sandbox = %id, "{e}");
    }
    collect_snapshots(state);
    state
        .db
        .event(Some(&live.tenant), Some(id), "ended", reason);
    tracing::info!(tenant = %live.tenant, sandbox = %id, reason, "sandbox ended");
    true
}

/// Ends paused sandbox `row`: its snapshots removed, its row ended.
pub fn discard_paused(state: &AppState, row: &SandboxRow, reason: &str) {
    if let Err(e) = state.db.mark_ended(&row.id, reason) {
        tracing::error!(sandbox = %row.id, "{e}");
    }
    collect_snapshots(state);
    state
        .db
        .event(Some(&row.tenant_id), Some(&row.id), "ended", reason);
    tracing::info!(tenant = %row.tenant_id, sandbox = %row.id, reason, "paused sandbox ended");
}

/// Pauses `live`: its whole VM saved as a snapshot (synced before this
/// answers), then ended; its row paused. A failed pause leaves it running
/// as it was. False when it was no longer running.
pub async fn pause(state: &AppState, live: &Arc<Live>) -> Result<bool, ApiError> {
    let _transition = state.transitions.lock(&live.id).await;
    if state.registry.get(&live.id).is_none() {
        return Ok(false);
    }
    let t0 = Instant::now();
    let mut vm = live.vm.lock().await;
    let Some(sb) = vm.as_mut() else {
        return Ok(false);
    };
    if sb.is_pooled() {
        return Err(ApiError::bad_request(
            "a sandbox from a template's pool cannot be paused; create it with autoPause \
             (which leaves the pool out) to pause it",
        ));
    }
    let n = live.pauses + 1;
    let name = snapshot_name(&live.id, n);
    let _in_use = InUse::new(state, &name);
    // What a pause killed before it finished left.
    let _ = Template::remove(&state.vm_root, &name);
    crate::crash::point("pause.begun");
    sb.snapshot(&state.vm_root, &name, false)
        .await
        .map_err(|e| {
            tracing::error!(sandbox = %live.id, "pausing: {e}");
            ApiError::internal(format!("pausing the sandbox: {e}"))
        })?;
    crate::crash::point("pause.saved");
    let paused = Paused {
        snapshot: name.clone(),
        carried: Carried {
            pauses: n,
            ..live.carried()
        },
        paused_ms: now_ms(),
    };
    let json = serde_json::to_string(&paused).map_err(|e| ApiError::internal(e.to_string()))?;
    if !state.db.mark_paused(&live.id, &json)? {
        let _ = Template::remove(&state.vm_root, &name);
        return Ok(false);
    }
    let sb = vm.take();
    state.registry.remove(&live.id);
    live.processes.end_all();
    live.watchers.clear();
    if let Some(sb) = sb {
        sb.destroy().await;
    }
    record(state, &live.tenant, &live.id, "paused", t0);
    Ok(true)
}

/// Sandbox `id` became `kind` ("paused", "resumed") in the time since
/// `t0`: an event and a log line.
fn record(state: &AppState, tenant: &str, id: &str, kind: &str, t0: Instant) {
    let ms = t0.elapsed().as_millis() as u64;
    state
        .db
        .event(Some(tenant), Some(id), kind, &format!("{ms} ms"));
    tracing::info!(tenant, sandbox = id, ms, "sandbox {kind}");
}

/// Sandbox `id` of `tenant`, running: live already (false), or resumed
/// from its snapshot now (true) with `timeout_s` to live (its old timeout
/// when None). Not found when it is neither live nor paused.
pub async fn resume(
    state: &Arc<AppState>,
    tenant: &Tenant,
    id: &str,
    timeout_s: Option<i64>,
) -> Result<(Arc<Live>, bool), ApiError> {
    let _transition = state.transitions.lock(id).await;
    if let Ok(live) = state.registry.of_tenant(&tenant.id, id) {
        return Ok((live, false));
    }
    let row = match state.db.begin_resume(tenant, id)? {
        None => return Err(ApiError::sandbox_not_found(id)),
        Some(Err(over)) => return Err(quota_error(over)),
        Some(Ok(row)) => row,
    };
    match resume_vm(state, tenant, &row, timeout_s).await {
        Ok(live) => Ok((live, true)),
        Err(e) => {
            state.db.resume_failed(id)?;
            tracing::error!(sandbox = %id, "resuming: {}", e.message);
            Err(e)
        }
    }
}

/// VM `id` carrying on from snapshot `name`; an error (never a cold boot)
/// when the snapshot will not restore.
async fn from_snapshot(state: &AppState, name: &str, id: &str) -> Result<Sandbox, String> {
    let snapshot = Template::open(&state.vm_root, name).map_err(|e| e.to_string())?;
    let (memory, vcpus, assets, accel) = snapshot.shape();
    let config = SandboxConfig {
        memory_mib: memory,
        vcpus,
        assets,
        accel,
        block_root: snapshot.meta.block_root.clone(),
        template: Some(snapshot),
        ..vm_config(state, id, None).map_err(|e| e.message)?
    };
    let sb = Sandbox::start(config).await.map_err(|e| e.to_string())?;
    // A snapshot that would not restore boots cold: that is not the
    // sandbox it was any more.
    if sb.cloned_from.is_none() {
        let why = sb.fallback.clone().unwrap_or_default();
        sb.destroy().await;
        return Err(why);
    }
    Ok(sb)
}

/// Snapshot `name` kept by `collect_snapshots` while this lives.
struct InUse<'a> {
    state: &'a AppState,
    name: String,
}

impl<'a> InUse<'a> {
    fn new(state: &'a AppState, name: &str) -> InUse<'a> {
        state.snapshot_in_use(name, true);
        InUse {
            state,
            name: name.to_string(),
        }
    }
}

impl Drop for InUse<'_> {
    fn drop(&mut self) {
        self.state.snapshot_in_use(&self.name, false);
    }
}

/// The most forks one request makes (E2B's SDK sends 1 to 20).
pub const MAX_FORKS: usize = 20;

/// `count` copies of running sandbox `live`, each a new sandbox of
/// `tenant` (admitted against its quotas, its own id, envd token and
/// writable layers) carrying on from one snapshot taken now; the parent
/// runs on, its id and deadline untouched. One result per fork.
pub async fn fork(
    state: &Arc<AppState>,
    tenant: &Tenant,
    live: &Arc<Live>,
    count: usize,
    timeout_s: i64,
) -> Result<Vec<Result<Arc<Live>, ApiError>>, ApiError> {
    let name = format!("podvisord-fork-{}-{}", live.id, crate::auth::random_hex(4));
    let in_use = InUse::new(state, &name);
    {
        let _transition = state.transitions.lock(&live.id).await;
        let mut vm = live.vm.lock().await;
        let Some(sb) = vm.as_mut() else {
            return Err(ApiError::sandbox_not_found(&live.id));
        };
        if sb.is_pooled() {
            return Err(ApiError::bad_request(
                "a sandbox from a template's pool cannot be forked; create it with autoPause \
                 (which leaves the pool out) to fork it",
            ));
        }
        let t0 = Instant::now();
        if let Err(e) = sb.snapshot(&state.vm_root, &name, true).await {
            tracing::error!(sandbox = %live.id, "forking: {e}");
            return Err(ApiError::internal(format!("snapshotting the sandbox: {e}")));
        }
        tracing::info!(sandbox = %live.id, ms = t0.elapsed().as_millis() as u64, "fork snapshot taken");
    }
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        out.push(fork_one(state, tenant, live, &name, timeout_s).await);
    }
    drop(in_use);
    collect_snapshots(state);
    Ok(out)
}

async fn fork_one(
    state: &Arc<AppState>,
    tenant: &Tenant,
    parent: &Live,
    snapshot: &str,
    timeout_s: i64,
) -> Result<Arc<Live>, ApiError> {
    let token = crate::auth::random_hex(24);
    let id = new_id();
    let row = SandboxRow {
        id: id.clone(),
        tenant_id: tenant.id.clone(),
        template: parent.template.name.clone(),
        state: "creating".into(),
        vcpus: parent.vcpus.into(),
        memory_mib: parent.memory_mib as i64,
        metadata: parent.metadata.clone(),
        envd_token_hash: crate::auth::hash(&token),
        created_ms: now_ms(),
        started_ms: None,
        end_ms: now_ms() + timeout_s * 1000,
        ended_ms: None,
        end_reason: None,
        paused: None,
    };
    state
        .db
        .admit(tenant, db::Ask { sandbox: &row })?
        .map_err(quota_error)?;
    let t0 = Instant::now();
    let sb = match from_snapshot(state, snapshot, &id).await {
        Ok(sb) => sb,
        Err(e) => {
            state.db.mark_ended(&id, "failed")?;
            return Err(ApiError::internal(format!("starting the fork: {e}")));
        }
    };
    let started = now_ms();
    let end_ms = started + timeout_s * 1000;
    let carried = Carried {
        envd_token: token,
        traffic_token: parent
            .traffic_token
            .as_ref()
            .map(|_| crate::auth::random_hex(16)),
        started_ms: started,
        pauses: 0,
        ..parent.carried()
    };
    let live = Live::hold(
        &id,
        &tenant.id,
        parent.template.clone(),
        carried,
        sb,
        end_ms,
    );
    state.registry.insert(Arc::clone(&live));
    state.db.mark_running(&id, "fork", end_ms)?;
    state.metrics.created("fork", t0.elapsed());
    state.db.event(
        Some(&tenant.id),
        Some(&id),
        "created",
        &format!("fork of {}", parent.id),
    );
    tracing::info!(tenant = %tenant.id, sandbox = %id, parent = %parent.id, ms = t0.elapsed().as_millis() as u64, "sandbox forked");
    Ok(live)
}

/// Saves running sandbox `live` as template `name` of `tenant` (E2B's
/// `create_snapshot`): sandboxes created from it carry on from now, the
/// sandbox runs on. Kept in the database; only `tenant` sees it.
pub async fn snapshot_template(
    state: &Arc<AppState>,
    tenant: &Tenant,
    live: &Arc<Live>,
    name: &str,
) -> Result<(), ApiError> {
    if state.template(name).is_some() {
        return Err(ApiError::conflict(format!(
            "a template named {name:?} exists"
        )));
    }
    let parent = &live.template;
    let of = crate::config::SnapshotOf {
        tenant: tenant.id.clone(),
        sandbox: live.id.clone(),
    };
    let config = crate::config::TemplateConfig {
        name: name.to_string(),
        rootfs: Some(parent.rootfs.clone()),
        vcpus: parent.vcpus,
        memory_mib: parent.memory_mib,
        pool: 0,
        disk_mib: parent.disk_mib,
        snapshot_of: Some(of.clone()),
    };
    // The row claims the name: of two snapshots at once, one makes it.
    if !state.db.add_template(&config)? {
        return Err(ApiError::conflict(format!(
            "a template named {name:?} exists"
        )));
    }
    let vm_name = format!("podvisord-{name}");
    let made = async {
        let _transition = state.transitions.lock(&live.id).await;
        let mut vm = live.vm.lock().await;
        let sb = vm
            .as_mut()
            .ok_or_else(|| ApiError::sandbox_not_found(&live.id))?;
        if sb.is_pooled() {
            return Err(ApiError::bad_request(
                "a sandbox from a template's pool cannot be snapshotted; create it with \
                 autoPause (which leaves the pool out)",
            ));
        }
        let _ = Template::remove(&state.vm_root, &vm_name);
        sb.snapshot(&state.vm_root, &vm_name, true)
            .await
            .map_err(|e| ApiError::internal(format!("snapshotting the sandbox: {e}")))?;
        crate::base::snapshot_spec(&config, &of, &state.vm_root)
            .map_err(|e| ApiError::internal(format!("{e:#}")))
    }
    .await;
    match made {
        Ok(spec) => {
            state
                .templates
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(name.to_string(), spec);
            state
                .db
                .event(Some(&tenant.id), Some(&live.id), "snapshot", name);
            tracing::info!(tenant = %tenant.id, sandbox = %live.id, snapshot = name, "snapshot made");
            Ok(())
        }
        Err(e) => {
            let _ = state.db.remove_template(name);
            let _ = Template::remove(&state.vm_root, &vm_name);
            Err(e)
        }
    }
}

/// How many live or paused sandboxes read template `vm_name`'s files.
fn template_users(state: &AppState, vm_name: &str) -> usize {
    let dir = state.vm_root.join("templates").join(vm_name);
    let live = state
        .registry
        .all()
        .iter()
        .filter(|l| l.chain.iter().any(|p| p.starts_with(&dir)))
        .count();
    let paused = state.db.paused_sandboxes(None).unwrap_or_default();
    let paused = paused
        .iter()
        .filter_map(|r| serde_json::from_str::<Paused>(r.paused.as_deref()?).ok())
        .filter(|p| {
            let meta = std::fs::read(
                state
                    .vm_root
                    .join("templates")
                    .join(&p.snapshot)
                    .join("template.json"),
            )
            .ok()
            .and_then(|b| serde_json::from_slice::<sandbox::template::TemplateMeta>(&b).ok());
            meta.is_some_and(|m| m.base_layers.iter().any(|l| l.starts_with(&dir)))
        })
        .count();
    live + paused
}

/// Removes `tenant`'s snapshot `name` (E2B's `delete_snapshot`): 409 while
/// sandboxes made from it run or are paused.
pub fn delete_snapshot(state: &AppState, tenant: &Tenant, name: &str) -> Result<(), ApiError> {
    let t = state
        .template(name)
        .filter(|t| {
            t.snapshot_of
                .as_ref()
                .is_some_and(|o| o.tenant == tenant.id)
        })
        .ok_or_else(|| ApiError::not_found(format!("template '{name}' not found")))?;
    let vm_name = t.vm_template();
    let users = template_users(state, &vm_name);
    if users > 0 {
        return Err(ApiError::conflict(format!(
            "snapshot {name:?} is in use by {users} sandbox(es): kill them first"
        )));
    }
    state
        .templates
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .remove(name);
    state.db.remove_template(name)?;
    let _ = Template::remove(&state.vm_root, &vm_name);
    collect_snapshots(state);
    state
        .db
        .event(Some(&tenant.id), None, "snapshot deleted", name);
    Ok(())
}

/// Whether template `name` is one of podvisord's own snapshots (of a
/// pause or a fork), removed once nothing needs it.
fn own_snapshot(name: &str) -> bool {
    name.starts_with("podvisord-paused-") || name.starts_with("podvisord-fork-")
}

/// Removes podvisord's own snapshots that nothing needs any more: needed
/// are a paused sandbox's snapshot, one that forks under way start from,
/// every template a running sandbox's disk chain reads, and, for each
/// template kept, those its own layers are built on (a pause of a resumed
/// or forked sandbox, a fork of one, is a layer over another snapshot's).
pub fn collect_snapshots(state: &AppState) {
    let dir = state.vm_root.join("templates");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    let names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    // The template a layer file lives in.
    let owner = |p: &std::path::Path| {
        let rest = p.strip_prefix(&dir).ok()?;
        Some(rest.components().next()?.as_os_str().to_str()?.to_string())
    };
    let mut todo: Vec<String> = names.iter().filter(|n| !own_snapshot(n)).cloned().collect();
    let Ok(paused) = state.db.paused_sandboxes(None) else {
        // Unsure what is needed: keep everything.
        return;
    };
    todo.extend(paused.iter().filter_map(|r| {
        let p: Paused = serde_json::from_str(r.paused.as_deref()?).ok()?;
        Some(p.snapshot)
    }));
    todo.extend(state.snapshots_in_use());
    for live in state.registry.all() {
        todo.extend(live.chain.iter().filter_map(|p| owner(p)));
    }
    let mut keep = std::collections::HashSet::new();
    while let Some(name) = todo.pop() {
        if !keep.insert(name.clone()) {
            continue;
        }
        let meta = std::fs::read(dir.join(&name).join("template.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<sandbox::template::TemplateMeta>(&b).ok());
        if let Some(meta) = meta {
            todo.extend(meta.base_layers.iter().filter_map(|p| owner(p)));
        }
    }
    for name in names {
        if own_snapshot(&name) && !keep.contains(&name) {
            if let Err(e) = Template::remove(&state.vm_root, &name) {
                tracing::warn!("removing snapshot {name}: {e}");
            }
        }
    }
}

async fn resume_vm(
    state: &Arc<AppState>,
    tenant: &Tenant,
    row: &SandboxRow,
    timeout_s: Option<i64>,
) -> Result<Arc<Live>, ApiError> {
    let t0 = Instant::now();
    let paused: Paused = row
        .paused
        .as_deref()
        .and_then(|p| serde_json::from_str(p).ok())
        .ok_or_else(|| ApiError::internal("the paused sandbox's record is unreadable"))?;
    let template = state.template(&row.template).ok_or_else(|| {
        ApiError::internal(format!(
            "the sandbox's template {:?} is gone; it cannot be resumed",
            row.template
        ))
    })?;
    let damaged = |e: &dyn std::fmt::Display| {
        ApiError::internal(format!(
            "the sandbox's snapshot cannot be resumed (damaged or removed): {e}"
        ))
    };
    let sb = from_snapshot(state, &paused.snapshot, &row.id)
        .await
        .map_err(|e| damaged(&e))?;
    crate::crash::point("resume.booted");
    let timeout_s = timeout_s.unwrap_or(state.config.default_timeout_s);
    let end_ms = now_ms() + timeout_s * 1000;
    let live = Live::hold(&row.id, &tenant.id, template, paused.carried, sb, end_ms);
    state.registry.insert(Arc::clone(&live));
    state.db.mark_resumed(&row.id, end_ms)?;
    record(state, &tenant.id, &row.id, "resumed", t0);
    Ok(live)
}

/// Paused sandbox `id` resumed for a request to its envd that carries its
/// envd token, when it was made with `autoResume`; None otherwise (the
/// caller answers as for a sandbox that does not exist).
pub async fn auto_resume(
    state: &Arc<AppState>,
    id: &str,
    envd_token: Option<&[u8]>,
) -> Option<Arc<Live>> {
    auto_resume_if(state, id, |p| {
        envd_token.is_some_and(|t| crate::auth::same(t, p.envd_token.as_bytes()))
    })
    .await
}

/// `auto_resume` for traffic to one of the sandbox's own ports: its
/// traffic token, when it was made with one, must be given.
pub async fn auto_resume_for_traffic(
    state: &Arc<AppState>,
    id: &str,
    traffic_token: Option<&[u8]>,
) -> Option<Arc<Live>> {
    auto_resume_if(state, id, |p| match &p.traffic_token {
        None => true,
        Some(want) => traffic_token.is_some_and(|t| crate::auth::same(t, want.as_bytes())),
    })
    .await
}

async fn auto_resume_if(
    state: &Arc<AppState>,
    id: &str,
    allowed: impl FnOnce(&Carried) -> bool,
) -> Option<Arc<Live>> {
    let row = state.db.sandbox(id).ok()??;
    if row.state != "paused" && row.state != "resuming" {
        return None;
    }
    let paused: Paused = serde_json::from_str(row.paused.as_deref()?).ok()?;
    if !paused.carried.auto_resume || !allowed(&paused.carried) {
        return None;
    }
    let tenant = state.db.tenant(&row.tenant_id).ok()??;
    match resume(state, &tenant, id, None).await {
        Ok((live, _)) => Some(live),
        Err(e) => {
            tracing::warn!(sandbox = %id, "auto-resume failed: {}", e.message);
            None
        }
    }
}

/// Sets the sandbox's deadline `timeout_s` from now.
pub fn set_timeout(state: &AppState, live: &Live, timeout_s: i64) -> Result<(), ApiError> {
    let end = now_ms() + timeout_s * 1000;
    *live.end_ms.lock().unwrap_or_else(|e| e.into_inner()) = end;
    state.db.set_end(&live.id, end)?;
    Ok(())
}

/// Kills (or, with `autoPause`, pauses) sandboxes past their deadline,
/// every second, for ever.
pub async fn reap(state: Arc<AppState>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = now_ms();
        for live in state.registry.all() {
            if live.end_ms() > now {
                continue;
            }
            if live.auto_pause {
                match pause(&state, &live).await {
                    Ok(_) => continue,
                    Err(e) => {
                        tracing::error!(sandbox = %live.id, "auto-pause failed, killing it: {}", e.message)
                    }
                }
            }
            kill(&state, &live.id, "timeout").await;
        }
    }
}

/// At start: sandboxes the database holds as live died with the podvisord
/// that held them (their supervisors end with its connections); paused
/// ones stay paused (a resume under way is undone: its snapshot is whole).
pub fn recover(state: &AppState) -> Result<usize, db::DbError> {
    let rows = state.db.live_sandboxes(None)?;
    for r in &rows {
        if r.state == "resuming" {
            state.db.resume_failed(&r.id)?;
            continue;
        }
        state.db.mark_ended(&r.id, "podvisord restarted")?;
        state.db.event(
            Some(&r.tenant_id),
            Some(&r.id),
            "ended",
            "podvisord restarted",
        );
    }
    collect_snapshots(state);
    Ok(rows.len())
}
