//! Who is asking: tenants by API key (`X-API-Key`, as E2B's SDKs send it),
//! the operator by admin token (`X-Admin-Token`), a sandbox's envd caller by
//! its access token (`X-Access-Token`). Keys and tokens are stored as
//! SHA-256 hashes: they are random, so a plain hash is as good as a slow one.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use sha2::{Digest, Sha256};

use crate::db::Tenant;
use crate::error::ApiError;
use crate::AppState;

pub fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    let mut f = std::fs::File::open("/dev/urandom").expect("/dev/urandom");
    std::io::Read::read_exact(&mut f, &mut b).expect("reading /dev/urandom");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn hash(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// A new API key: (the text, shown once; its hash, stored; its prefix).
pub fn new_api_key() -> (String, Vec<u8>, String) {
    // E2B's keys look like this; its SDKs accept any string.
    let key = format!("e2b_{}", random_hex(20));
    let prefix = key[..10].to_string();
    let hashed = hash(&key);
    (key, hashed, prefix)
}

/// Equal without telling by timing how much of it was.
pub fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn header<'a>(parts: &'a Parts, name: &str) -> Option<&'a str> {
    parts.headers.get(name).and_then(|v| v.to_str().ok())
}

/// A request made with a tenant's live API key.
pub struct TenantAuth(pub Tenant);

impl FromRequestParts<Arc<AppState>> for TenantAuth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let key = header(parts, "x-api-key")
            .or_else(|| header(parts, "authorization").and_then(|v| v.strip_prefix("Bearer ")));
        let Some(key) = key.filter(|k| !k.is_empty()) else {
            return Err(ApiError::unauthorized(
                "missing API key: send it in the X-API-Key header",
            ));
        };
        match state.db.tenant_by_key(&hash(key))? {
            Some(t) => {
                tracing::Span::current().record("tenant", t.id.as_str());
                Ok(TenantAuth(t))
            }
            None => Err(ApiError::unauthorized("invalid API key")),
        }
    }
}

/// A request made with the admin token.
pub struct AdminAuth;

impl FromRequestParts<Arc<AppState>> for AdminAuth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        match header(parts, "x-admin-token") {
            Some(t) if same(&hash(t), &state.admin_token_hash) => Ok(AdminAuth),
            Some(_) => Err(ApiError::unauthorized("invalid admin token")),
            None => Err(ApiError::unauthorized(
                "missing admin token: send it in the X-Admin-Token header",
            )),
        }
    }
}
