//! The operator's API under `/admin/`, authenticated by `X-Admin-Token`:
//! tenants, their API keys (shown once, stored hashed) and quotas, and
//! templates beyond the config file's.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::api::ApiJson;
use crate::auth::{self, AdminAuth};
use crate::db::Quotas;
use crate::error::ApiError;
use crate::{sandboxes, AppState};

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/admin/tenants", post(create_tenant).get(list_tenants))
        .route("/admin/tenants/{id}", get(get_tenant).delete(delete_tenant))
        .route("/admin/tenants/{id}/keys", post(create_key).get(list_keys))
        .route("/admin/tenants/{id}/keys/{key}", delete(revoke_key))
        .route("/admin/tenants/{id}/quotas", put(set_quotas))
        .route(
            "/admin/templates",
            get(list_templates).post(create_template),
        )
        .route(
            "/admin/templates/{name}",
            get(get_template).delete(delete_template),
        )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewTenant {
    name: String,
    #[serde(default)]
    quotas: Option<serde_json::Value>,
    /// Seconds until the first key expires (default: never).
    #[serde(default, rename = "keyExpiresIn")]
    key_expires_in: Option<i64>,
}

fn valid_name(n: &str) -> Result<(), ApiError> {
    if n.is_empty() || n.len() > 128 || n.chars().any(|c| c.is_control()) {
        return Err(ApiError::bad_request(
            "name must be 1 to 128 characters, none of them control characters",
        ));
    }
    Ok(())
}

/// `over` merged onto `base` (fields it names replace the base's).
fn merged_quotas(base: &Quotas, over: Option<serde_json::Value>) -> Result<Quotas, ApiError> {
    let Some(over) = over else {
        return Ok(base.clone());
    };
    let mut v = serde_json::to_value(base).map_err(|e| ApiError::internal(e.to_string()))?;
    let (Some(m), Some(o)) = (v.as_object_mut(), over.as_object()) else {
        return Err(ApiError::bad_request("quotas must be a JSON object"));
    };
    for (k, x) in o {
        m.insert(k.clone(), x.clone());
    }
    let q: Quotas =
        serde_json::from_value(v).map_err(|e| ApiError::bad_request(format!("quotas: {e}")))?;
    if q.max_sandboxes < 0 || q.max_vcpus < 0 || q.max_memory_mib < 0 || q.max_lifetime_s <= 0 {
        return Err(ApiError::bad_request(
            "quotas must not be negative, and maxLifetimeS must be positive",
        ));
    }
    // What a JSON number holds exactly (the schema's maximum).
    const MAX: i64 = (1 << 53) - 1;
    if [
        q.max_sandboxes,
        q.max_vcpus,
        q.max_memory_mib,
        q.max_lifetime_s,
    ]
    .iter()
    .any(|&n| n > MAX)
    {
        return Err(ApiError::bad_request(format!(
            "quotas must be at most {MAX}"
        )));
    }
    Ok(q)
}

fn new_key(
    state: &AppState,
    tenant: &str,
    expires_in: Option<i64>,
) -> Result<serde_json::Value, ApiError> {
    if expires_in.is_some_and(|s| s <= 0) {
        return Err(ApiError::bad_request(
            "keyExpiresIn must be a positive number of seconds",
        ));
    }
    let (key, hash, prefix) = auth::new_api_key();
    let id = format!("k{}", auth::random_hex(8));
    let expires = expires_in.map(|s| crate::db::now_ms() + s * 1000);
    let info = state.db.add_key(tenant, &id, &hash, &prefix, expires)?;
    Ok(json!({"key": info, "apiKey": key}))
}

async fn create_tenant(
    _: AdminAuth,
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<NewTenant>,
) -> Result<impl IntoResponse, ApiError> {
    valid_name(&req.name)?;
    let quotas = merged_quotas(&state.config.default_quotas, req.quotas)?;
    if state.db.tenants()?.iter().any(|t| t.name == req.name) {
        return Err(ApiError::conflict(format!(
            "a tenant named {:?} exists",
            req.name
        )));
    }
    let id = format!("t{}", auth::random_hex(8));
    let tenant = state.db.create_tenant(&id, &req.name, &quotas)?;
    let key = new_key(&state, &id, req.key_expires_in)?;
    state.db.event(Some(&id), None, "tenant created", &req.name);
    tracing::info!(tenant = %id, name = %req.name, "tenant created");
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "id": tenant.id,
            "name": tenant.name,
            "quotas": tenant.quotas,
            "apiKey": key["apiKey"],
            "key": key["key"],
        })),
    ))
}

async fn list_tenants(
    _: AdminAuth,
    State(state): State<Arc<AppState>>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(state.db.tenants()?))
}

fn tenant_or_404(state: &AppState, id: &str) -> Result<crate::db::Tenant, ApiError> {
    state
        .db
        .tenant(id)?
        .ok_or_else(|| ApiError::not_found(format!("tenant {id:?} does not exist")))
}

async fn get_tenant(
    _: AdminAuth,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let t = tenant_or_404(&state, &id)?;
    let live = state.db.live_sandboxes(Some(&id))?;
    Ok(Json(json!({
        "id": t.id,
        "name": t.name,
        "createdMs": t.created_ms,
        "quotas": t.quotas,
        "sandboxes": live.iter().map(|s| &s.id).collect::<Vec<_>>(),
    })))
}

/// Deletes the tenant: its keys stop working at once, its sandboxes end.
async fn delete_tenant(
    _: AdminAuth,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    tenant_or_404(&state, &id)?;
    // Keys first: no new sandbox can be made while the old ones end.
    state.db.delete_tenant(&id)?;
    for live in state.registry.all() {
        if live.tenant == id {
            sandboxes::kill(&state, &live.id, "tenant deleted").await;
        }
    }
    for row in state.db.paused_sandboxes(Some(&id))? {
        let _transition = state.transitions.lock(&row.id).await;
        sandboxes::discard_paused(&state, &row, "tenant deleted");
    }
    for row in state.db.live_sandboxes(Some(&id))? {
        // Rows of creates still under way end with them; mark the rest.
        if row.state != "creating" {
            state.db.mark_ended(&row.id, "tenant deleted")?;
        }
    }
    state.db.event(Some(&id), None, "tenant deleted", "");
    tracing::info!(tenant = %id, "tenant deleted");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct NewKey {
    #[serde(default, rename = "expiresIn")]
    expires_in: Option<i64>,
}

async fn create_key(
    _: AdminAuth,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<impl IntoResponse, ApiError> {
    tenant_or_404(&state, &id)?;
    let req: NewKey = crate::api::optional_json(&body)?;
    Ok((
        StatusCode::CREATED,
        Json(new_key(&state, &id, req.expires_in)?),
    ))
}

async fn list_keys(
    _: AdminAuth,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    tenant_or_404(&state, &id)?;
    Ok(Json(state.db.keys(&id)?))
}

async fn revoke_key(
    _: AdminAuth,
    State(state): State<Arc<AppState>>,
    Path((id, key)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    tenant_or_404(&state, &id)?;
    if !state.db.revoke_key(&id, &key)? {
        return Err(ApiError::not_found(format!(
            "tenant {id:?} has no live key {key:?}"
        )));
    }
    state.db.event(Some(&id), None, "key revoked", &key);
    Ok(StatusCode::NO_CONTENT)
}

async fn set_quotas(
    _: AdminAuth,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    ApiJson(over): ApiJson<serde_json::Value>,
) -> Result<impl IntoResponse, ApiError> {
    let t = tenant_or_404(&state, &id)?;
    let q = merged_quotas(&t.quotas, Some(over))?;
    state.db.set_quotas(&id, &q)?;
    Ok(Json(q))
}

fn template_json(state: &AppState, t: &sandboxes::TemplateSpec) -> serde_json::Value {
    let pool = sandbox::pool::status(&state.vm_root, &t.vm_template());
    json!({
        "name": t.name,
        "rootfs": t.rootfs,
        "vcpus": t.vcpus,
        "memoryMB": t.memory_mib,
        "diskSizeMB": t.disk_mib,
        "poolSize": t.pool,
        "source": if t.from_api { "api" } else { "config" },
        "pool": pool.map(|p| json!({"ready": p.ready, "size": p.size, "handedOut": p.handed_out})),
    })
}

async fn list_templates(
    _: AdminAuth,
    State(state): State<Arc<AppState>>,
) -> Result<impl IntoResponse, ApiError> {
    let out: Vec<_> = state
        .template_list()
        .iter()
        .map(|t| template_json(&state, t))
        .collect();
    Ok(Json(out))
}

fn template_or_404(state: &AppState, name: &str) -> Result<sandboxes::TemplateSpec, ApiError> {
    state
        .template(name)
        .ok_or_else(|| ApiError::not_found(format!("template {name:?} not found")))
}

async fn get_template(
    _: AdminAuth,
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let t = template_or_404(&state, &name)?;
    Ok(Json(template_json(&state, &t)))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct NewTemplate {
    name: String,
    /// A directory on the host holding the root filesystem; absent: the
    /// base root (Debian 12) podvisord builds.
    rootfs: Option<std::path::PathBuf>,
    #[serde(default = "one")]
    vcpus: u32,
    #[serde(rename = "memoryMB", default = "default_memory")]
    memory_mib: u64,
    #[serde(default)]
    pool: usize,
    #[serde(rename = "diskSizeMB", default = "crate::config::default_disk")]
    disk_mib: u64,
}

fn one() -> u32 {
    1
}
fn default_memory() -> u64 {
    512
}

/// Makes a template: its VM snapshot booted and saved (seconds), stored so
/// that a restart keeps it, its pool started.
async fn create_template(
    _: AdminAuth,
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<NewTemplate>,
) -> Result<impl IntoResponse, ApiError> {
    if !crate::config::sandbox_template_name_ok(&req.name) {
        return Err(ApiError::bad_request(
            "a template's name is 1 to 64 letters, digits, '-' and '_'",
        ));
    }
    if !(1..=16).contains(&req.vcpus) {
        return Err(ApiError::bad_request("vcpus must be 1 to 16"));
    }
    if !(128..=65536).contains(&req.memory_mib) {
        return Err(ApiError::bad_request("memoryMB must be 128 to 65536"));
    }
    if !(64..=1 << 20).contains(&req.disk_mib) {
        return Err(ApiError::bad_request("diskSizeMB must be 64 to 1048576"));
    }
    if req.pool > 16 {
        return Err(ApiError::bad_request("pool must be at most 16"));
    }
    if let Some(r) = &req.rootfs {
        if !r.is_absolute() || !r.join("bin").exists() {
            return Err(ApiError::bad_request(format!(
                "rootfs {} must be an absolute path to a root filesystem (it holds no /bin)",
                r.display()
            )));
        }
    }
    if state.template(&req.name).is_some() {
        return Err(ApiError::conflict(format!(
            "a template named {:?} exists",
            req.name
        )));
    }
    let t = crate::config::TemplateConfig {
        name: req.name,
        rootfs: req.rootfs,
        vcpus: req.vcpus,
        memory_mib: req.memory_mib,
        pool: req.pool,
        disk_mib: req.disk_mib,
        snapshot_of: None,
    };
    // The row claims the name: of two creates at once, one makes it.
    if !state.db.add_template(&t)? {
        return Err(ApiError::conflict(format!(
            "a template named {:?} exists",
            t.name
        )));
    }
    let made = crate::base::prepare_one(
        &t,
        true,
        &state.config.base_cache,
        &state.vm_root,
        &state.images,
        &state.assets,
        state.accel,
    )
    .await;
    let spec = match made {
        Ok(s) => s,
        Err(e) => {
            let _ = state.db.remove_template(&t.name);
            return Err(ApiError::internal(format!(
                "making template {:?}: {e:#}",
                t.name
            )));
        }
    };
    state
        .templates
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .insert(t.name.clone(), spec.clone());
    if t.pool > 0 {
        restart_pools(&state).await?;
    }
    state.db.event(None, None, "template created", &t.name);
    tracing::info!(template = %t.name, "template created");
    Ok((StatusCode::CREATED, Json(template_json(&state, &spec))))
}

/// The pool daemon restarted (it stops its clones first: off the runtime).
async fn restart_pools(state: &Arc<AppState>) -> Result<(), ApiError> {
    let st = Arc::clone(state);
    tokio::task::spawn_blocking(move || crate::pools::restart(&st))
        .await
        .map_err(|e| ApiError::internal(format!("pools: {e}")))?
        .map_err(|e| ApiError::internal(format!("pools: {e:#}")))
}

/// Removes a template made through the API; one of the config file's, or
/// one that live sandboxes run from, is refused (409).
async fn delete_template(
    _: AdminAuth,
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let t = template_or_404(&state, &name)?;
    if !t.from_api {
        return Err(ApiError::conflict(format!(
            "template {name:?} is named in the config file: remove it there"
        )));
    }
    let using = state
        .registry
        .all()
        .iter()
        .filter(|l| l.template.name == name)
        .count()
        + state
            .db
            .paused_sandboxes(None)?
            .iter()
            .filter(|r| r.template == name)
            .count();
    if using > 0 {
        return Err(ApiError::conflict(format!(
            "template {name:?} has {using} live sandbox(es), paused ones counted: kill them first"
        )));
    }
    state
        .templates
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&name);
    state.db.remove_template(&name)?;
    if t.pool > 0 {
        restart_pools(&state).await?;
    }
    let vm = t.vm_template();
    let _ = sandbox::template::Template::remove(&state.vm_root, &vm);
    let _ = std::fs::remove_file(state.vm_root.join(format!("{vm}.assets")));
    state.db.event(None, None, "template deleted", &name);
    tracing::info!(template = %name, "template deleted");
    Ok(StatusCode::NO_CONTENT)
}
