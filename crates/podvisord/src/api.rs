//! E2B's sandbox REST API (the control plane), as its OpenAPI spec and SDKs
//! shape it: field names, status codes, `{"code", "message"}` errors. And
//! the router of everything podvisord serves on its one port.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::TenantAuth;
use crate::error::ApiError;
use crate::sandboxes::{self, CreateAsk, Live};
use crate::AppState;

/// The envd version we answer with: the protocol level of E2B's envd whose
/// features we serve (the SDKs switch behaviour on it).
pub const ENVD_VERSION: &str = "0.6.1";

/// The largest JSON body the REST API takes.
const MAX_JSON: usize = 1 << 20;

/// `Json`, with rejections (malformed JSON, wrong content type) as API errors.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(e) => Err(json_rejection(e)),
        }
    }
}

/// A JSON body that may be absent (empty): its type's default then.
pub fn optional_json<T: Default + serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("malformed JSON body: {e}")))
}

fn json_rejection(e: JsonRejection) -> ApiError {
    let status = match e.status() {
        StatusCode::UNPROCESSABLE_ENTITY => StatusCode::BAD_REQUEST,
        s => s,
    };
    ApiError::new(status, e.body_text())
}

pub fn router(state: Arc<AppState>) -> Router {
    let e2b = Router::new()
        .route("/sandboxes", post(create_v1).get(list_v1))
        .route("/v2/sandboxes", post(create_v2).get(list_v2))
        .route("/sandboxes/{id}", get(get_sandbox).delete(kill))
        .route("/sandboxes/{id}/timeout", post(set_timeout))
        .route("/sandboxes/{id}/refreshes", post(refresh))
        .route("/sandboxes/{id}/connect", post(connect))
        .route("/v2/sandboxes/{id}/connect", post(connect))
        .route("/sandboxes/{id}/pause", post(pause))
        .route("/sandboxes/{id}/fork", post(fork))
        .route("/sandboxes/{id}/snapshots", post(snapshot))
        .route("/snapshots", get(list_snapshots))
        .route("/templates/{id}", axum::routing::delete(delete_snapshot))
        .route("/sandboxes/{id}/resume", post(resume))
        .route("/sandboxes/{id}/metrics", get(metrics))
        .route("/sandboxes/{id}/logs", get(logs))
        .route("/v2/sandboxes/{id}/logs", get(logs_v2));
    let own = Router::new()
        .route("/health", get(|| async { StatusCode::OK }))
        .route("/metrics", get(prometheus))
        .route("/openapi.json", get(openapi));
    let api = e2b
        .merge(own)
        .merge(crate::admin::router())
        .layer(axum::extract::DefaultBodyLimit::max(MAX_JSON))
        .fallback(not_found)
        .with_state(Arc::clone(&state));
    let envd = crate::envd::router(Arc::clone(&state));
    let ports = Arc::clone(&state);
    Router::new()
        .fallback_service(tower::service_fn(move |req: Request| {
            let (api, envd, state) = (api.clone(), envd.clone(), Arc::clone(&ports));
            async move {
                use tower::ServiceExt;
                match crate::envd::target(&req) {
                    Some((id, port)) if port != crate::envd::ENVD_PORT => {
                        Ok(crate::ports::proxy(state, id, port, req).await)
                    }
                    Some(_) => envd.oneshot(req).await,
                    None => api.oneshot(req).await,
                }
            }
        }))
        .layer(middleware::from_fn_with_state(state, observe))
}

/// Logs each request (JSON, with its id) and counts it by route and status.
async fn observe(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let t0 = std::time::Instant::now();
    let request_id = crate::auth::random_hex(8);
    let method = req.method().clone();
    let route = route_of(&req);
    let span = tracing::info_span!("request", id = %request_id, tenant = tracing::field::Empty);
    let mut resp = {
        use tracing::Instrument;
        next.run(req).instrument(span.clone()).await
    };
    let status = resp.status().as_u16();
    state.metrics.request(&route, status);
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    span.in_scope(|| {
        tracing::info!(%method, route = %route, status, ms = t0.elapsed().as_millis() as u64, "request")
    });
    resp
}

/// A route's name for metrics: sandbox ids and the like left out.
fn route_of(req: &Request) -> String {
    match crate::envd::target(req) {
        // A sandbox's own server's paths are its own: one label for all.
        Some((_, port)) if port != crate::envd::ENVD_PORT => return "sandbox port".into(),
        Some(_) => return format!("envd {}", req.uri().path()),
        None => {}
    }
    let parts: Vec<&str> = req.uri().path().split('/').collect();
    let mut out = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        let prev = if i > 0 { parts[i - 1] } else { "" };
        if matches!(prev, "sandboxes" | "tenants" | "keys") && !p.is_empty() {
            out.push(":id");
        } else {
            out.push(p);
        }
    }
    format!("{} {}", req.method(), out.join("/"))
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewSandbox {
    #[serde(rename = "templateID")]
    template_id: String,
    timeout: Option<i64>,
    metadata: Option<Value>,
    env_vars: Option<Value>,
    // Accepted as E2B does; see docs/podvisord.md for what they do here.
    #[serde(default)]
    auto_pause: Option<bool>,
    /// `false`: a timeout pauses filesystem only (not done here).
    #[serde(default)]
    auto_pause_memory: Option<bool>,
    #[serde(default)]
    auto_resume: Option<AutoResume>,
    #[serde(default)]
    secure: Option<bool>,
    #[serde(default)]
    allow_internet_access: Option<bool>,
    #[serde(default)]
    network: Option<NetworkAsk>,
    #[serde(flatten)]
    _rest: HashMap<String, Value>,
}

#[derive(Deserialize)]
struct AutoResume {
    enabled: bool,
}

/// The part of E2B's `network` object podvisord acts on so far; egress
/// rules (`allowOut`, `denyOut`) come with tenant networks.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct NetworkAsk {
    allow_public_traffic: Option<bool>,
    #[serde(flatten)]
    _rest: HashMap<String, Value>,
}

fn string_map(v: Option<Value>, what: &str) -> Result<serde_json::Map<String, Value>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(Default::default()),
        Some(Value::Object(m)) => {
            if m.values().any(|x| !x.is_string()) {
                return Err(ApiError::bad_request(format!(
                    "{what} values must be strings"
                )));
            }
            if m.len() > 256
                || m.iter()
                    .any(|(k, v)| k.len() + v.as_str().map_or(0, str::len) > 16384)
            {
                return Err(ApiError::bad_request(format!("{what} is too large")));
            }
            Ok(m)
        }
        Some(_) => Err(ApiError::bad_request(format!("{what} must be an object"))),
    }
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The `Sandbox` of a create or connect answer.
fn created_json(state: &AppState, live: &Live) -> Value {
    json!({
        "templateID": live.template.name,
        "sandboxID": live.id,
        "clientID": "podvisord",
        "envdVersion": ENVD_VERSION,
        "envdAccessToken": live.envd_token,
        "domain": state.config.domain,
        "trafficAccessToken": live.traffic_token,
    })
}

/// `ListedSandbox` / `SandboxDetail` of a live sandbox.
fn detail_json(state: &AppState, live: &Live, detail: bool) -> Value {
    let mut v = json!({
        "templateID": live.template.name,
        "sandboxID": live.id,
        "clientID": "podvisord",
        "startedAt": rfc3339(live.started_ms),
        "endAt": rfc3339(live.end_ms()),
        "cpuCount": live.vcpus,
        "memoryMB": live.memory_mib,
        "diskSizeMB": live.template.disk_mib,
        "metadata": live.metadata,
        "state": "running",
        "envdVersion": ENVD_VERSION,
    });
    if detail {
        v["envdAccessToken"] = json!(live.envd_token);
        v["domain"] = json!(state.config.domain);
    }
    v
}

/// `ListedSandbox` / `SandboxDetail` of a paused sandbox (from its row).
fn paused_json(state: &AppState, row: &crate::db::SandboxRow, detail: bool) -> Value {
    let paused: Option<sandboxes::Paused> = row
        .paused
        .as_deref()
        .and_then(|p| serde_json::from_str(p).ok());
    let mut v = json!({
        "templateID": row.template,
        "sandboxID": row.id,
        "clientID": "podvisord",
        "startedAt": rfc3339(paused.as_ref().map_or(row.created_ms, |p| p.carried.started_ms)),
        "endAt": rfc3339(row.end_ms),
        "cpuCount": row.vcpus,
        "memoryMB": row.memory_mib,
        "diskSizeMB": state.template(&row.template).map_or(0, |t| t.disk_mib),
        "metadata": row.metadata,
        "state": "paused",
        "envdVersion": ENVD_VERSION,
    });
    if detail {
        v["envdAccessToken"] = json!(paused.map(|p| p.carried.envd_token));
        v["domain"] = json!(state.config.domain);
    }
    v
}

async fn create(
    state: Arc<AppState>,
    tenant: crate::db::Tenant,
    req: NewSandbox,
) -> Result<Response, ApiError> {
    let _ = (req.secure, req.allow_internet_access);
    if req.auto_pause_memory == Some(false) {
        return Err(ApiError::bad_request(
            "autoPauseMemory false (a filesystem-only pause) is not supported: \
             podvisord pauses memory and disk together",
        ));
    }
    let auto_pause = req.auto_pause.unwrap_or(false);
    let auto_resume = req.auto_resume.is_some_and(|a| a.enabled);
    if auto_resume && !auto_pause {
        return Err(ApiError::bad_request(
            "autoResume needs autoPause (only a paused sandbox resumes)",
        ));
    }
    let metadata = string_map(req.metadata, "metadata")?;
    let env = string_map(req.env_vars, "envVars")?
        .into_iter()
        .map(|(k, v)| (k, v.as_str().unwrap_or_default().to_string()))
        .collect::<HashMap<_, _>>();
    if env
        .keys()
        .any(|k| k.is_empty() || k.contains('=') || k.contains('\0'))
    {
        return Err(ApiError::bad_request(
            "envVars names must be non-empty, without '=' or NUL",
        ));
    }
    let ask = CreateAsk {
        template: req.template_id,
        timeout_s: req.timeout.unwrap_or(state.config.default_timeout_s),
        metadata,
        env,
        public: req
            .network
            .and_then(|n| n.allow_public_traffic)
            .unwrap_or(true),
        auto_pause,
        auto_resume,
    };
    let live = sandboxes::create(&state, &tenant, ask).await?;
    Ok((StatusCode::CREATED, Json(created_json(&state, &live))).into_response())
}

async fn create_v1(
    TenantAuth(tenant): TenantAuth,
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<NewSandbox>,
) -> Result<Response, ApiError> {
    create(state, tenant, req).await
}

async fn create_v2(
    TenantAuth(tenant): TenantAuth,
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<NewSandbox>,
) -> Result<Response, ApiError> {
    create(state, tenant, req).await
}

/// The `metadata` filter as the SDKs send it: `k=v&k2=v2`, each key and
/// value percent-encoded once more.
fn metadata_filter(q: Option<&str>) -> Result<Vec<(String, String)>, ApiError> {
    let Some(q) = q.filter(|q| !q.is_empty()) else {
        return Ok(Vec::new());
    };
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(q)
        .map_err(|e| ApiError::bad_request(format!("metadata filter: {e}")))?;
    let unquote = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .map(|c| c.into_owned())
            .map_err(|_| ApiError::bad_request("metadata filter: not UTF-8"))
    };
    pairs
        .iter()
        .map(|(k, v)| Ok((unquote(k)?, unquote(v)?)))
        .collect()
}

fn matches(live: &Live, filter: &[(String, String)]) -> bool {
    filter
        .iter()
        .all(|(k, v)| live.metadata.get(k).and_then(Value::as_str) == Some(v.as_str()))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListQuery {
    metadata: Option<String>,
    state: Option<String>,
    template: Option<String>,
    order: Option<String>,
    limit: Option<usize>,
    next_token: Option<String>,
    #[serde(flatten)]
    _rest: HashMap<String, String>,
}

fn tenant_live(state: &AppState, tenant: &str) -> Vec<Arc<Live>> {
    let mut all: Vec<_> = state
        .registry
        .all()
        .into_iter()
        .filter(|l| l.tenant == tenant)
        .collect();
    all.sort_by(|a, b| (a.started_ms, &a.id).cmp(&(b.started_ms, &b.id)));
    all
}

async fn list_v1(
    TenantAuth(tenant): TenantAuth,
    State(state): State<Arc<AppState>>,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let filter = metadata_filter(q.metadata.as_deref())?;
    let out: Vec<Value> = tenant_live(&state, &tenant.id)
        .iter()
        .filter(|l| matches(l, &filter))
        .map(|l| detail_json(&state, l, false))
        .collect();
    Ok(Json(out).into_response())
}

const MAX_LIMIT: usize = 1000;

async fn list_v2(
    TenantAuth(tenant): TenantAuth,
    State(state): State<Arc<AppState>>,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let filter = metadata_filter(q.metadata.as_deref())?;
    if let Some(states) = &q.state {
        for s in states.split(',') {
            if s != "running" && s != "paused" {
                return Err(ApiError::bad_request(format!(
                    "state {s:?}: expected running or paused"
                )));
            }
        }
    }
    let wants = |s: &str| {
        q.state
            .as_deref()
            .is_none_or(|w| w.split(',').any(|x| x == s))
    };
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::bad_request(format!(
            "limit must be 1 to {MAX_LIMIT}"
        )));
    }
    // (started, id, listing) of each, running and paused alike.
    let mut all: Vec<(i64, String, Value)> = Vec::new();
    if wants("running") {
        all.extend(
            tenant_live(&state, &tenant.id)
                .into_iter()
                .filter(|l| matches(l, &filter))
                .filter(|l| q.template.as_ref().is_none_or(|t| &l.template.name == t))
                .map(|l| (l.started_ms, l.id.clone(), detail_json(&state, &l, false))),
        );
    }
    if wants("paused") {
        all.extend(
            state
                .db
                .paused_sandboxes(Some(&tenant.id))?
                .into_iter()
                .filter(|r| {
                    filter
                        .iter()
                        .all(|(k, v)| r.metadata.get(k).and_then(Value::as_str) == Some(v))
                })
                .filter(|r| q.template.as_ref().is_none_or(|t| &r.template == t))
                .map(|r| (r.created_ms, r.id.clone(), paused_json(&state, &r, false))),
        );
    }
    all.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    match q.order.as_deref() {
        None | Some("desc") => all.reverse(),
        Some("asc") => {}
        Some(o) => {
            return Err(ApiError::bad_request(format!(
                "order {o:?}: expected asc or desc"
            )))
        }
    }
    // The token is the id of the first sandbox of the next page.
    let start = match &q.next_token {
        Some(t) => all
            .iter()
            .position(|l| &l.1 == t)
            .ok_or_else(|| ApiError::bad_request("nextToken is not valid (any more)"))?,
        None => 0,
    };
    let page: Vec<Value> = all
        .iter()
        .skip(start)
        .take(limit)
        .map(|l| l.2.clone())
        .collect();
    let mut resp = Json(page).into_response();
    if let Some(next) = all.get(start + limit) {
        if let Ok(v) = HeaderValue::from_str(&next.1) {
            resp.headers_mut().insert("x-next-token", v);
        }
    }
    Ok(resp)
}

async fn get_sandbox(
    TenantAuth(tenant): TenantAuth,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    if let Ok(live) = state.registry.of_tenant(&tenant.id, &id) {
        return Ok(Json(detail_json(&state, &live, true)).into_response());
    }
    match paused_row(&state, &tenant, &id)? {
        Some(row) => Ok(Json(paused_json(&state, &row, true)).into_response()),
        None => Err(ApiError::sandbox_not_found(&id)),
    }
}

/// Not found unless `id` is one of the tenant's sandboxes, live or paused.
fn known(state: &AppState, tenant: &crate::db::Tenant, id: &str) -> Result<(), ApiError> {
    if state.registry.of_tenant(&tenant.id, id).is_ok() || paused_row(state, tenant, id)?.is_some()
    {
        return Ok(());
    }
    Err(ApiError::sandbox_not_found(id))
}

/// The tenant's running sandbox `id`; 409 (`paused_says` after its id)
/// when it is paused, 404 when it is neither.
fn running(
    state: &AppState,
    tenant: &crate::db::Tenant,
    id: &str,
    paused_says: &str,
) -> Result<Arc<Live>, ApiError> {
    if let Ok(live) = state.registry.of_tenant(&tenant.id, id) {
        return Ok(live);
    }
    match paused_row(state, tenant, id)? {
        Some(_) => Err(ApiError::conflict(format!(
            "sandbox \"{id}\" {paused_says}"
        ))),
        None => Err(ApiError::sandbox_not_found(id)),
    }
}

/// The tenant's paused sandbox `id`.
fn paused_row(
    state: &AppState,
    tenant: &crate::db::Tenant,
    id: &str,
) -> Result<Option<crate::db::SandboxRow>, ApiError> {
    Ok(state
        .db
        .sandbox(id)?
        .filter(|r| r.tenant_id == tenant.id && (r.state == "paused" || r.state == "resuming")))
}

async fn kill(
    TenantAuth(tenant): TenantAuth,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    known(&state, &tenant, &id)?;
    if !sandboxes::kill(&state, &id, "killed").await {
        return Err(ApiError::sandbox_not_found(&id));
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct TimeoutRequest {
    timeout: i64,
}

fn check_timeout(tenant: &crate::db::Tenant, t: i64) -> Result<(), ApiError> {
    if t <= 0 {
        return Err(ApiError::bad_request(
            "timeout must be a positive number of seconds",
        ));
    }
    if t > tenant.quotas.max_lifetime_s {
        return Err(ApiError::bad_request(format!(
            "timeout {t} s is over this account's maximum sandbox lifetime ({} s)",
            tenant.quotas.max_lifetime_s
        )));
    }
    Ok(())
}

async fn set_timeout(
    TenantAuth(tenant): TenantAuth,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<TimeoutRequest>,
) -> Result<StatusCode, ApiError> {
    let live = state.registry.of_tenant(&tenant.id, &id)?;
    check_timeout(&tenant, req.timeout)?;
    sandboxes::set_timeout(&state, &live, req.timeout)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Moves the deadline to `t` seconds from now if that is later.
fn extend(
    state: &AppState,
    tenant: &crate::db::Tenant,
    live: &Live,
    t: i64,
) -> Result<(), ApiError> {
    check_timeout(tenant, t)?;
    if crate::db::now_ms() + t * 1000 > live.end_ms() {
        sandboxes::set_timeout(state, live, t)?;
    }
    Ok(())
}

#[derive(Deserialize, Default)]
struct RefreshRequest {
    duration: Option<i64>,
}

/// Extends the deadline to `duration` seconds from now (never shortens it).
async fn refresh(
    TenantAuth(tenant): TenantAuth,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<StatusCode, ApiError> {
    let live = state.registry.of_tenant(&tenant.id, &id)?;
    let d = optional_json::<RefreshRequest>(&body)?
        .duration
        .unwrap_or(60);
    extend(&state, &tenant, &live, d)?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, Default)]
struct ConnectRequest {
    timeout: Option<i64>,
    /// false: resume cold from the disk only (not done here).
    memory: Option<bool>,
}

/// Connects to a sandbox: a running one has its deadline extended to
/// `timeout` from now when that is later (200); a paused one is resumed
/// with that timeout (201).
async fn connect(
    TenantAuth(tenant): TenantAuth,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let req = optional_json::<ConnectRequest>(&body)?;
    known(&state, &tenant, &id)?;
    if let Some(t) = req.timeout {
        check_timeout(&tenant, t)?;
    }
    if req.memory == Some(false) {
        return Err(ApiError::bad_request(
            "memory false (resume by a cold boot from the disk) is not supported here",
        ));
    }
    let (live, resumed) = sandboxes::resume(&state, &tenant, &id, req.timeout).await?;
    if resumed {
        return Ok((StatusCode::CREATED, Json(created_json(&state, &live))).into_response());
    }
    if let Some(t) = req.timeout {
        extend(&state, &tenant, &live, t)?;
    }
    Ok((StatusCode::OK, Json(created_json(&state, &live))).into_response())
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct PauseRequest {
    /// false: keep the disk only (not done here).
    memory: Option<bool>,
    /// Refuse when the guest's agent does not answer.
    require_healthy_guest: Option<bool>,
}

/// Pauses a running sandbox (204): saved whole, memory and disk, then its
/// VM ended. 409 when it is paused already.
async fn pause(
    TenantAuth(tenant): TenantAuth,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<StatusCode, ApiError> {
    let req = optional_json::<PauseRequest>(&body)?;
    if req.memory == Some(false) {
        return Err(ApiError::bad_request(
            "memory false (a filesystem-only pause) is not supported: \
             podvisord pauses memory and disk together",
        ));
    }
    let live = running(&state, &tenant, &id, "is already paused")?;
    if req.require_healthy_guest == Some(true) {
        let mut agent = live.agent.clone();
        let ping = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            agent.version(agent_proto::VersionRequest::default()),
        )
        .await;
        if !matches!(ping, Ok(Ok(_))) {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the sandbox's guest agent does not answer; not paused",
            ));
        }
    }
    match sandboxes::pause(&state, &live).await? {
        true => Ok(StatusCode::NO_CONTENT),
        // Ended or paused by another request meanwhile.
        false => Err(running(&state, &tenant, &id, "is already paused")
            .err()
            .unwrap_or_else(|| ApiError::sandbox_not_found(&id))),
    }
}

#[derive(Deserialize, Default)]
struct SnapshotRequest {
    name: Option<String>,
    /// false: the disk only (not done here).
    memory: Option<bool>,
}

fn snapshot_json(name: &str) -> Value {
    json!({"snapshotID": name, "names": [name]})
}

/// Saves a running sandbox as a template of the tenant's own (201
/// `{"snapshotID", "names"}`); `Sandbox.create(snapshotID)` starts copies of
/// it, the sandbox runs on.
async fn snapshot(
    TenantAuth(tenant): TenantAuth,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let req = optional_json::<SnapshotRequest>(&body)?;
    if req.memory == Some(false) {
        return Err(ApiError::bad_request(
            "memory false (a filesystem-only snapshot) is not supported: \
             podvisord snapshots memory and disk together",
        ));
    }
    let name = req
        .name
        .unwrap_or_else(|| format!("snapshot-{}", crate::auth::random_hex(6)));
    if !crate::config::sandbox_template_name_ok(&name) {
        return Err(ApiError::bad_request(
            "a snapshot's name is 1 to 64 letters, digits, '-' and '_'",
        ));
    }
    let live = state.registry.of_tenant(&tenant.id, &id)?;
    sandboxes::snapshot_template(&state, &tenant, &live, &name).await?;
    Ok((StatusCode::CREATED, Json(snapshot_json(&name))).into_response())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SnapshotQuery {
    #[serde(rename = "sandboxID")]
    sandbox_id: Option<String>,
    #[serde(flatten)]
    _rest: HashMap<String, String>,
}

/// The tenant's snapshots (of one sandbox with `sandboxID`).
async fn list_snapshots(
    TenantAuth(tenant): TenantAuth,
    State(state): State<Arc<AppState>>,
    q: Result<Query<SnapshotQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let out: Vec<Value> = state
        .template_list()
        .iter()
        .filter(|t| {
            t.snapshot_of.as_ref().is_some_and(|o| {
                o.tenant == tenant.id && q.sandbox_id.as_ref().is_none_or(|s| s == &o.sandbox)
            })
        })
        .map(|t| snapshot_json(&t.name))
        .collect();
    Ok(Json(out).into_response())
}

/// Removes one of the tenant's snapshots (204).
async fn delete_snapshot(
    TenantAuth(tenant): TenantAuth,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    sandboxes::delete_snapshot(&state, &tenant, &id)?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, Default)]
struct ForkRequest {
    timeout: Option<i64>,
    count: Option<usize>,
}

/// Forks a running sandbox into `count` new ones (201, one result each:
/// `{"sandbox": ...}` or `{"error": {"code", "message"}}`).
async fn fork(
    TenantAuth(tenant): TenantAuth,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let req = optional_json::<ForkRequest>(&body)?;
    let count = req.count.unwrap_or(1);
    if !(1..=sandboxes::MAX_FORKS).contains(&count) {
        return Err(ApiError::bad_request(format!(
            "count must be 1 to {}",
            sandboxes::MAX_FORKS
        )));
    }
    let timeout = req.timeout.unwrap_or(state.config.default_timeout_s);
    let live = running(&state, &tenant, &id, "is paused: connect to it first")?;
    check_timeout(&tenant, timeout)?;
    let forks = sandboxes::fork(&state, &tenant, &live, count, timeout).await?;
    let out: Vec<Value> = forks
        .into_iter()
        .map(|f| match f {
            Ok(l) => json!({"sandbox": created_json(&state, &l)}),
            Err(e) => json!({"error": {"code": e.status.as_u16(), "message": e.message}}),
        })
        .collect();
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ResumeRequest {
    timeout: Option<i64>,
    #[serde(default)]
    auto_pause: Option<bool>,
}

/// E2B's older resume (201): 409 when the sandbox is running.
async fn resume(
    TenantAuth(tenant): TenantAuth,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let req = optional_json::<ResumeRequest>(&body)?;
    let _ = req.auto_pause;
    known(&state, &tenant, &id)?;
    if let Some(t) = req.timeout {
        check_timeout(&tenant, t)?;
    }
    if state.registry.of_tenant(&tenant.id, &id).is_ok() {
        return Err(ApiError::conflict(format!(
            "sandbox \"{id}\" is already running"
        )));
    }
    let (live, _) = sandboxes::resume(&state, &tenant, &id, req.timeout).await?;
    Ok((StatusCode::CREATED, Json(created_json(&state, &live))).into_response())
}

/// One sample now: the container's CPU and memory from the guest's cgroup.
async fn metrics(
    TenantAuth(tenant): TenantAuth,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let live = state.registry.of_tenant(&tenant.id, &id)?;
    let mut agent = live.agent.clone();
    let stats = agent
        .stats_container(agent_proto::ContainerRequest {
            container_id: sandboxes::CONTAINER.into(),
        })
        .await
        .map_err(|s| {
            state.metrics.agent_error();
            ApiError::internal(format!("sandbox agent: {}", s.message()))
        })?
        .into_inner();
    let now = crate::db::now_ms();
    let sample = json!({
        "timestamp": rfc3339(now),
        "timestampUnix": now / 1000,
        "cpuCount": live.vcpus,
        "cpuUsedPct": 0.0,
        "memUsed": stats.memory_usage,
        "memTotal": live.memory_mib * 1024 * 1024,
        "diskUsed": 0,
        "diskTotal": 0,
    });
    Ok(Json(vec![sample]).into_response())
}

/// The sandbox's own log lines: none are kept (its commands' output goes to
/// their callers), so an empty list in E2B's shape.
async fn logs(
    TenantAuth(tenant): TenantAuth,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    state.registry.of_tenant(&tenant.id, &id)?;
    Ok(Json(json!({"logs": [], "logEntries": []})).into_response())
}

async fn logs_v2(
    TenantAuth(tenant): TenantAuth,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    state.registry.of_tenant(&tenant.id, &id)?;
    Ok(Json(json!({"logs": []})).into_response())
}

async fn prometheus(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let _ = headers;
    let counts = state.db.counts().unwrap_or_default();
    let pools: Vec<(String, i64)> = state
        .template_list()
        .iter()
        .filter_map(|t| {
            sandbox::pool::status(&state.vm_root, &t.vm_template())
                .map(|p| (t.name.clone(), p.ready as i64))
        })
        .collect();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(&counts, &pools),
    )
        .into_response()
}

async fn openapi() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_filters_decode_as_the_sdks_encode() {
        // Python: urlencode({quote(k): quote(v)}) of {"a b": "c&d", "x": "y"}
        let f = metadata_filter(Some("a%2520b=c%2526d&x=y")).unwrap();
        assert_eq!(
            f,
            vec![
                ("a b".to_string(), "c&d".to_string()),
                ("x".into(), "y".into())
            ]
        );
        assert!(metadata_filter(Some("")).unwrap().is_empty());
    }
}
