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
    pub rootfs: PathBuf,
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
    /// Taken by whoever ends it.
    vm: tokio::sync::Mutex<Option<Sandbox>>,
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
    if let Some(allowed) = &tenant.quotas.templates {
        if !allowed.contains(&template.name) {
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
    };
    state
        .db
        .admit(tenant, db::Ask { sandbox: &row })?
        .map_err(quota_error)?;
    crate::crash::point("create.admitted");
    let t0 = Instant::now();
    let made = start_vm(state, &template, &id).await;
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
    if let Err(e) = start_container(&vm, agent.clone(), &template).await {
        vm.destroy().await;
        state.db.mark_ended(&id, "failed")?;
        state.metrics.create_failed();
        return Err(e);
    }
    crate::crash::point("create.started");
    let started = now_ms();
    let end_ms = started + ask.timeout_s * 1000;
    let live = Arc::new(Live {
        id: id.clone(),
        tenant: tenant.id.clone(),
        template,
        envd_token: token,
        traffic_token: (!ask.public).then(|| crate::auth::random_hex(16)),
        agent,
        env: ask.env,
        metadata: ask.metadata,
        started_ms: started,
        vcpus: row.vcpus as u32,
        memory_mib: row.memory_mib as u64,
        end_ms: Mutex::new(end_ms),
        processes: Processes::default(),
        watchers: Default::default(),
        vm: tokio::sync::Mutex::new(Some(vm)),
    });
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
) -> Result<(Sandbox, &'static str), ApiError> {
    let name = template.vm_template();
    let root = &state.vm_root;
    match sandbox::pool::take(root, &name, "sandbox", &[]).await {
        Ok(Some(sb)) => match sb.attach(&template.rootfs, sandbox::pool::ROOTFS_SUBPATH, true) {
            Ok(()) => return Ok((sb, "pool")),
            Err(e) => {
                tracing::warn!(sandbox = %id, "pool clone unusable: {e}");
                sb.destroy().await;
            }
        },
        Ok(None) => {}
        Err(e) => tracing::warn!(sandbox = %id, "pool of {name}: {e}"),
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
        cpu_millis: None,
        cgroup: None,
        id: id.to_string(),
        root: root.clone(),
        memory_mib: memory,
        vcpus,
        assets,
        accel,
        nics: Vec::new(),
        shares: vec![Share {
            tag: sandbox::template::ROOTFS_TAG.into(),
            path: template.rootfs.clone(),
            readonly: true,
        }],
        hostname: "sandbox".into(),
        boot_timeout: sandbox::default_boot_timeout(accel),
        template: vm_template,
        block_root: None,
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

async fn start_container(
    sb: &Sandbox,
    mut agent: AgentClient,
    template: &TemplateSpec,
) -> Result<(), ApiError> {
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
    let _ = template;
    agent
        .create_container(CreateContainerRequest {
            container_id: CONTAINER.into(),
            rootfs_tag: sandbox::template::ROOTFS_TAG.into(),
            rootfs_subpath: match sb.is_pooled() {
                true => sandbox::pool::ROOTFS_SUBPATH.into(),
                false => String::new(),
            },
            rootfs_readonly: false,
            // The template's root is shared read-only by all its sandboxes;
            // each writes to a layer of its own in guest memory.
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

/// Ends sandbox `id`: its VM destroyed, its row ended with `reason`.
/// False when it was not live.
pub async fn kill(state: &AppState, id: &str, reason: &str) -> bool {
    let Some(live) = state.registry.remove(id) else {
        return false;
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
    state
        .db
        .event(Some(&live.tenant), Some(id), "ended", reason);
    tracing::info!(tenant = %live.tenant, sandbox = %id, reason, "sandbox ended");
    true
}

/// Sets the sandbox's deadline `timeout_s` from now.
pub fn set_timeout(state: &AppState, live: &Live, timeout_s: i64) -> Result<(), ApiError> {
    let end = now_ms() + timeout_s * 1000;
    *live.end_ms.lock().unwrap_or_else(|e| e.into_inner()) = end;
    state.db.set_end(&live.id, end)?;
    Ok(())
}

/// Kills sandboxes past their deadline, every second, for ever.
pub async fn reap(state: Arc<AppState>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = now_ms();
        for live in state.registry.all() {
            if live.end_ms() <= now {
                kill(&state, &live.id, "timeout").await;
            }
        }
    }
}

/// At start: sandboxes the database holds as live died with the podvisord
/// that held them (their supervisors end with its connections).
pub fn recover(state: &AppState) -> Result<usize, db::DbError> {
    let rows = state.db.live_sandboxes(None)?;
    for r in &rows {
        state.db.mark_ended(&r.id, "podvisord restarted")?;
        state.db.event(
            Some(&r.tenant_id),
            Some(&r.id),
            "ended",
            "podvisord restarted",
        );
    }
    Ok(rows.len())
}
