//! podvisord's state: one SQLite database under the state directory (WAL,
//! migrations applied at open). Tenants and their hashed API keys and
//! quotas, sandboxes and what became of them, events.
//!
//! Every call takes the connection's lock for one statement or one
//! transaction; none waits on anything but SQLite.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use rusqlite_migration::{Migrations, M};
use serde::Serialize;

/// The schema, one step per migration; append, never edit.
fn migrations() -> Migrations<'static> {
    Migrations::new(vec![
        M::up(
            "CREATE TABLE tenants (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            created_ms INTEGER NOT NULL,
            max_sandboxes INTEGER NOT NULL,
            max_vcpus INTEGER NOT NULL,
            max_memory_mib INTEGER NOT NULL,
            max_lifetime_s INTEGER NOT NULL,
            -- JSON array of template names, or NULL: every template.
            templates TEXT
        );
        CREATE TABLE api_keys (
            id TEXT PRIMARY KEY,
            tenant_id TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
            hash BLOB NOT NULL UNIQUE,
            -- The first characters, to tell keys apart when listed.
            prefix TEXT NOT NULL,
            created_ms INTEGER NOT NULL,
            expires_ms INTEGER,
            revoked_ms INTEGER
        );
        CREATE TABLE sandboxes (
            id TEXT PRIMARY KEY,
            tenant_id TEXT NOT NULL,
            template TEXT NOT NULL,
            -- creating, running, ended (and since the third migration
            -- paused and resuming)
            state TEXT NOT NULL,
            vcpus INTEGER NOT NULL,
            memory_mib INTEGER NOT NULL,
            metadata TEXT NOT NULL,
            envd_token_hash BLOB NOT NULL,
            created_ms INTEGER NOT NULL,
            started_ms INTEGER,
            end_ms INTEGER NOT NULL,
            ended_ms INTEGER,
            end_reason TEXT,
            -- pool, clone or cold
            path TEXT
        );
        CREATE INDEX sandboxes_tenant ON sandboxes(tenant_id, state);
        CREATE TABLE events (
            id INTEGER PRIMARY KEY,
            at_ms INTEGER NOT NULL,
            tenant_id TEXT,
            sandbox_id TEXT,
            kind TEXT NOT NULL,
            detail TEXT
        );",
        ),
        // Templates made through the admin API (the config's are not stored).
        M::up(
            "CREATE TABLE templates (
            name TEXT PRIMARY KEY,
            -- The template's config (config::TemplateConfig) as JSON.
            spec TEXT NOT NULL,
            created_ms INTEGER NOT NULL
        );",
        ),
        // Paused sandboxes (state 'paused', or 'resuming' while one is
        // resumed): what their resume needs (sandboxes::Paused as JSON).
        M::up("ALTER TABLE sandboxes ADD COLUMN paused TEXT;"),
    ])
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database migration: {0}")]
    Migration(#[from] rusqlite_migration::Error),
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Quotas {
    pub max_sandboxes: i64,
    pub max_vcpus: i64,
    pub max_memory_mib: i64,
    pub max_lifetime_s: i64,
    /// Templates the tenant may use; None: all.
    pub templates: Option<Vec<String>>,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            max_sandboxes: 20,
            max_vcpus: 40,
            max_memory_mib: 16384,
            max_lifetime_s: 24 * 3600,
            templates: None,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Tenant {
    pub id: String,
    pub name: String,
    pub created_ms: i64,
    pub quotas: Quotas,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyInfo {
    pub id: String,
    pub prefix: String,
    pub created_ms: i64,
    pub expires_ms: Option<i64>,
    pub revoked_ms: Option<i64>,
}

#[derive(Clone, Debug)]
pub struct SandboxRow {
    pub id: String,
    pub tenant_id: String,
    pub template: String,
    pub state: String,
    pub vcpus: i64,
    pub memory_mib: i64,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub envd_token_hash: Vec<u8>,
    pub created_ms: i64,
    pub started_ms: Option<i64>,
    pub end_ms: i64,
    pub ended_ms: Option<i64>,
    pub end_reason: Option<String>,
    /// A paused sandbox's resume state (JSON).
    pub paused: Option<String>,
}

/// The states in which a sandbox holds a VM (and counts against quotas);
/// a paused one holds only its snapshot.
const HOLDS_VM: &str = "state IN ('creating', 'running', 'resuming')";

/// What a create may not exceed, and what it would take.
pub struct Ask<'a> {
    pub sandbox: &'a SandboxRow,
}

/// Which quota a create would break.
#[derive(Debug, PartialEq)]
pub enum OverQuota {
    Sandboxes(i64),
    Vcpus(i64),
    Memory(i64),
}

impl std::fmt::Display for OverQuota {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            OverQuota::Sandboxes(n) => write!(f, "concurrent sandboxes quota reached ({n})"),
            OverQuota::Vcpus(n) => write!(f, "vCPU quota reached ({n} vCPUs in all)"),
            OverQuota::Memory(n) => write!(f, "memory quota reached ({n} MiB in all)"),
        }
    }
}

pub struct Db {
    conn: Mutex<Connection>,
}

const SANDBOX_COLUMNS: &str = "id, tenant_id, template, state, vcpus, memory_mib, metadata,
     envd_token_hash, created_ms, started_ms, end_ms, ended_ms, end_reason, paused";

fn sandbox_row(r: &rusqlite::Row) -> rusqlite::Result<SandboxRow> {
    let metadata: String = r.get(6)?;
    Ok(SandboxRow {
        id: r.get(0)?,
        tenant_id: r.get(1)?,
        template: r.get(2)?,
        state: r.get(3)?,
        vcpus: r.get(4)?,
        memory_mib: r.get(5)?,
        metadata: serde_json::from_str(&metadata).unwrap_or_default(),
        envd_token_hash: r.get(7)?,
        created_ms: r.get(8)?,
        started_ms: r.get(9)?,
        end_ms: r.get(10)?,
        ended_ms: r.get(11)?,
        end_reason: r.get(12)?,
        paused: r.get(13)?,
    })
}

fn tenant_row(r: &rusqlite::Row) -> rusqlite::Result<Tenant> {
    let templates: Option<String> = r.get(7)?;
    Ok(Tenant {
        id: r.get(0)?,
        name: r.get(1)?,
        created_ms: r.get(2)?,
        quotas: Quotas {
            max_sandboxes: r.get(3)?,
            max_vcpus: r.get(4)?,
            max_memory_mib: r.get(5)?,
            max_lifetime_s: r.get(6)?,
            templates: templates.and_then(|t| serde_json::from_str(&t).ok()),
        },
    })
}

const TENANT_COLUMNS: &str =
    "id, name, created_ms, max_sandboxes, max_vcpus, max_memory_mib, max_lifetime_s, templates";

impl Db {
    pub fn open(path: &Path) -> Result<Db, DbError> {
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrations().to_latest(&mut conn)?;
        Ok(Db {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Templates made through the admin API, oldest first.
    pub fn templates(&self) -> Result<Vec<crate::config::TemplateConfig>, DbError> {
        let conn = self.conn();
        let mut st = conn.prepare("SELECT spec FROM templates ORDER BY created_ms, name")?;
        let rows = st.query_map([], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for spec in rows {
            match serde_json::from_str(&spec?) {
                Ok(t) => out.push(t),
                Err(e) => tracing::warn!("a stored template does not parse: {e}"),
            }
        }
        Ok(out)
    }

    /// False when a template of that name is stored already.
    pub fn add_template(&self, t: &crate::config::TemplateConfig) -> Result<bool, DbError> {
        let spec = serde_json::to_string(t).expect("a template serializes");
        let n = self.conn().execute(
            "INSERT OR IGNORE INTO templates (name, spec, created_ms) VALUES (?1, ?2, ?3)",
            params![t.name, spec, now_ms()],
        )?;
        Ok(n == 1)
    }

    pub fn remove_template(&self, name: &str) -> Result<bool, DbError> {
        let n = self
            .conn()
            .execute("DELETE FROM templates WHERE name = ?1", params![name])?;
        Ok(n == 1)
    }

    pub fn event(&self, tenant: Option<&str>, sandbox: Option<&str>, kind: &str, detail: &str) {
        let r = self.conn().execute(
            "INSERT INTO events (at_ms, tenant_id, sandbox_id, kind, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![now_ms(), tenant, sandbox, kind, detail],
        );
        if let Err(e) = r {
            tracing::warn!("recording event {kind}: {e}");
        }
    }

    // --- tenants and keys

    pub fn create_tenant(&self, id: &str, name: &str, quotas: &Quotas) -> Result<Tenant, DbError> {
        let created = now_ms();
        self.conn().execute(
            "INSERT INTO tenants (id, name, created_ms, max_sandboxes, max_vcpus, max_memory_mib,
                 max_lifetime_s, templates) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                id,
                name,
                created,
                quotas.max_sandboxes,
                quotas.max_vcpus,
                quotas.max_memory_mib,
                quotas.max_lifetime_s,
                quotas
                    .templates
                    .as_ref()
                    .map(|t| serde_json::to_string(t).unwrap_or_default()),
            ],
        )?;
        Ok(Tenant {
            id: id.into(),
            name: name.into(),
            created_ms: created,
            quotas: quotas.clone(),
        })
    }

    pub fn tenant(&self, id: &str) -> Result<Option<Tenant>, DbError> {
        let sql = format!("SELECT {TENANT_COLUMNS} FROM tenants WHERE id = ?1");
        Ok(self.conn().query_row(&sql, [id], tenant_row).optional()?)
    }

    pub fn tenants(&self) -> Result<Vec<Tenant>, DbError> {
        let conn = self.conn();
        let sql = format!("SELECT {TENANT_COLUMNS} FROM tenants ORDER BY created_ms");
        let mut st = conn.prepare(&sql)?;
        let rows = st.query_map([], tenant_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn set_quotas(&self, id: &str, q: &Quotas) -> Result<bool, DbError> {
        let n = self.conn().execute(
            "UPDATE tenants SET max_sandboxes = ?2, max_vcpus = ?3, max_memory_mib = ?4,
                 max_lifetime_s = ?5, templates = ?6 WHERE id = ?1",
            params![
                id,
                q.max_sandboxes,
                q.max_vcpus,
                q.max_memory_mib,
                q.max_lifetime_s,
                q.templates
                    .as_ref()
                    .map(|t| serde_json::to_string(t).unwrap_or_default()),
            ],
        )?;
        Ok(n == 1)
    }

    /// Removes the tenant and its keys; its sandboxes' rows stay, ended.
    pub fn delete_tenant(&self, id: &str) -> Result<bool, DbError> {
        let n = self
            .conn()
            .execute("DELETE FROM tenants WHERE id = ?1", [id])?;
        Ok(n == 1)
    }

    pub fn add_key(
        &self,
        tenant: &str,
        key_id: &str,
        hash: &[u8],
        prefix: &str,
        expires_ms: Option<i64>,
    ) -> Result<KeyInfo, DbError> {
        let created = now_ms();
        self.conn().execute(
            "INSERT INTO api_keys (id, tenant_id, hash, prefix, created_ms, expires_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![key_id, tenant, hash, prefix, created, expires_ms],
        )?;
        Ok(KeyInfo {
            id: key_id.into(),
            prefix: prefix.into(),
            created_ms: created,
            expires_ms,
            revoked_ms: None,
        })
    }

    pub fn keys(&self, tenant: &str) -> Result<Vec<KeyInfo>, DbError> {
        let conn = self.conn();
        let mut st = conn.prepare(
            "SELECT id, prefix, created_ms, expires_ms, revoked_ms FROM api_keys
                 WHERE tenant_id = ?1 ORDER BY created_ms",
        )?;
        let rows = st.query_map([tenant], |r| {
            Ok(KeyInfo {
                id: r.get(0)?,
                prefix: r.get(1)?,
                created_ms: r.get(2)?,
                expires_ms: r.get(3)?,
                revoked_ms: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn revoke_key(&self, tenant: &str, key_id: &str) -> Result<bool, DbError> {
        let n = self.conn().execute(
            "UPDATE api_keys SET revoked_ms = ?3 WHERE tenant_id = ?1 AND id = ?2
                 AND revoked_ms IS NULL",
            params![tenant, key_id, now_ms()],
        )?;
        Ok(n == 1)
    }

    /// The tenant whose live key hashes to `hash`.
    pub fn tenant_by_key(&self, hash: &[u8]) -> Result<Option<Tenant>, DbError> {
        let sql = format!(
            "SELECT {} FROM tenants t JOIN api_keys k ON k.tenant_id = t.id
                 WHERE k.hash = ?1 AND k.revoked_ms IS NULL
                 AND (k.expires_ms IS NULL OR k.expires_ms > ?2)",
            TENANT_COLUMNS
                .split(", ")
                .map(|c| format!("t.{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok(self
            .conn()
            .query_row(&sql, params![hash, now_ms()], tenant_row)
            .optional()?)
    }

    // --- sandboxes

    /// Inserts `ask.sandbox` (state "creating") unless it would break one of
    /// the tenant's quotas, checked in the same transaction.
    pub fn admit(&self, tenant: &Tenant, ask: Ask) -> Result<Result<(), OverQuota>, DbError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let s = ask.sandbox;
        if let Err(over) = check_quotas(&tx, tenant, s.vcpus, s.memory_mib)? {
            return Ok(Err(over));
        }
        tx.execute(
            &format!(
                "INSERT INTO sandboxes ({SANDBOX_COLUMNS}) VALUES
                 (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, NULL)"
            ),
            params![
                s.id,
                s.tenant_id,
                s.template,
                s.state,
                s.vcpus,
                s.memory_mib,
                serde_json::to_string(&s.metadata).unwrap_or_else(|_| "{}".into()),
                s.envd_token_hash,
                s.created_ms,
                s.started_ms,
                s.end_ms,
                s.ended_ms,
                s.end_reason,
            ],
        )?;
        tx.commit()?;
        Ok(Ok(()))
    }

    /// A running sandbox paused, with what its resume needs; false when it
    /// was not running.
    pub fn mark_paused(&self, id: &str, paused: &str) -> Result<bool, DbError> {
        let n = self.conn().execute(
            "UPDATE sandboxes SET state = 'paused', paused = ?2
                 WHERE id = ?1 AND state = 'running'",
            params![id, paused],
        )?;
        Ok(n == 1)
    }

    /// Claims paused sandbox `id` of `tenant` for a resume ('resuming'), if
    /// the tenant's quotas have room for its VM again: None when it is not
    /// paused (another resume took it, or it is not the tenant's).
    pub fn begin_resume(
        &self,
        tenant: &Tenant,
        id: &str,
    ) -> Result<Option<Result<SandboxRow, OverQuota>>, DbError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let sql = format!(
            "SELECT {SANDBOX_COLUMNS} FROM sandboxes
                 WHERE id = ?1 AND tenant_id = ?2 AND state = 'paused'"
        );
        let Some(row) = tx
            .query_row(&sql, [id, &tenant.id], sandbox_row)
            .optional()?
        else {
            return Ok(None);
        };
        if let Err(over) = check_quotas(&tx, tenant, row.vcpus, row.memory_mib)? {
            return Ok(Some(Err(over)));
        }
        tx.execute(
            "UPDATE sandboxes SET state = 'resuming' WHERE id = ?1",
            [id],
        )?;
        tx.commit()?;
        Ok(Some(Ok(row)))
    }

    /// A resume that failed: the sandbox is paused again.
    pub fn resume_failed(&self, id: &str) -> Result<(), DbError> {
        self.conn().execute(
            "UPDATE sandboxes SET state = 'paused' WHERE id = ?1 AND state = 'resuming'",
            [id],
        )?;
        Ok(())
    }

    pub fn mark_resumed(&self, id: &str, end_ms: i64) -> Result<(), DbError> {
        self.conn().execute(
            "UPDATE sandboxes SET state = 'running', end_ms = ?2, paused = NULL
                 WHERE id = ?1 AND state = 'resuming'",
            params![id, end_ms],
        )?;
        Ok(())
    }

    /// Paused sandboxes (all, or the tenant's), oldest first.
    pub fn paused_sandboxes(&self, tenant: Option<&str>) -> Result<Vec<SandboxRow>, DbError> {
        let conn = self.conn();
        let sql = format!(
            "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE state IN ('paused', 'resuming')
                 AND (?1 IS NULL OR tenant_id = ?1) ORDER BY created_ms, id"
        );
        let mut st = conn.prepare(&sql)?;
        let rows = st.query_map([tenant], sandbox_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn mark_running(&self, id: &str, path: &str, end_ms: i64) -> Result<(), DbError> {
        self.conn().execute(
            "UPDATE sandboxes SET state = 'running', started_ms = ?2, path = ?3, end_ms = ?4
                 WHERE id = ?1 AND state = 'creating'",
            params![id, now_ms(), path, end_ms],
        )?;
        Ok(())
    }

    /// Ends the sandbox; false when it had already ended.
    pub fn mark_ended(&self, id: &str, reason: &str) -> Result<bool, DbError> {
        let n = self.conn().execute(
            "UPDATE sandboxes SET state = 'ended', ended_ms = ?2, end_reason = ?3
                 WHERE id = ?1 AND state != 'ended'",
            params![id, now_ms(), reason],
        )?;
        Ok(n == 1)
    }

    pub fn set_end(&self, id: &str, end_ms: i64) -> Result<(), DbError> {
        self.conn().execute(
            "UPDATE sandboxes SET end_ms = ?2 WHERE id = ?1 AND state != 'ended'",
            params![id, end_ms],
        )?;
        Ok(())
    }

    pub fn sandbox(&self, id: &str) -> Result<Option<SandboxRow>, DbError> {
        let sql = format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE id = ?1");
        Ok(self.conn().query_row(&sql, [id], sandbox_row).optional()?)
    }

    /// The tenant's sandboxes that hold a VM, oldest first.
    pub fn live_sandboxes(&self, tenant: Option<&str>) -> Result<Vec<SandboxRow>, DbError> {
        let conn = self.conn();
        let sql = format!(
            "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE {HOLDS_VM}
                 AND (?1 IS NULL OR tenant_id = ?1) ORDER BY created_ms, id"
        );
        let mut st = conn.prepare(&sql)?;
        let rows = st.query_map([tenant], sandbox_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Counts by tenant and state, for /metrics.
    pub fn counts(&self) -> Result<Vec<(String, String, i64)>, DbError> {
        let conn = self.conn();
        let mut st = conn.prepare(
            "SELECT tenant_id, state, COUNT(*) FROM sandboxes GROUP BY tenant_id, state",
        )?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

/// Whether `tenant`'s quotas have room for one more VM of this shape, by
/// what its sandboxes hold now (in `tx`, so that the insert or update that
/// follows is checked with it).
fn check_quotas(
    tx: &rusqlite::Transaction,
    tenant: &Tenant,
    vcpus: i64,
    memory_mib: i64,
) -> Result<Result<(), OverQuota>, DbError> {
    let (n, used_vcpus, mem): (i64, i64, i64) = tx.query_row(
        &format!(
            "SELECT COUNT(*), COALESCE(SUM(vcpus), 0), COALESCE(SUM(memory_mib), 0)
                 FROM sandboxes WHERE tenant_id = ?1 AND {HOLDS_VM}"
        ),
        [&tenant.id],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    let q = &tenant.quotas;
    if n + 1 > q.max_sandboxes {
        return Ok(Err(OverQuota::Sandboxes(q.max_sandboxes)));
    }
    if used_vcpus + vcpus > q.max_vcpus {
        return Ok(Err(OverQuota::Vcpus(q.max_vcpus)));
    }
    if mem + memory_mib > q.max_memory_mib {
        return Ok(Err(OverQuota::Memory(q.max_memory_mib)));
    }
    Ok(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, tenant: &str, vcpus: i64, mem: i64) -> SandboxRow {
        SandboxRow {
            id: id.into(),
            tenant_id: tenant.into(),
            template: "base".into(),
            state: "creating".into(),
            vcpus,
            memory_mib: mem,
            metadata: Default::default(),
            envd_token_hash: vec![1],
            created_ms: now_ms(),
            started_ms: None,
            end_ms: now_ms() + 1000,
            ended_ms: None,
            end_reason: None,
            paused: None,
        }
    }

    #[test]
    fn quotas_are_checked_with_the_insert() {
        let dir = std::env::temp_dir().join(format!("podvisord-db-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let db = Db::open(&dir.join("state.db")).unwrap();
        let q = Quotas {
            max_sandboxes: 2,
            max_vcpus: 3,
            max_memory_mib: 1000,
            ..Quotas::default()
        };
        let t = db.create_tenant("t1", "one", &q).unwrap();
        let ok = |s: &SandboxRow| db.admit(&t, Ask { sandbox: s }).unwrap();
        assert_eq!(ok(&row("a", "t1", 2, 400)), Ok(()));
        assert_eq!(ok(&row("b", "t1", 2, 400)), Err(OverQuota::Vcpus(3)));
        assert_eq!(ok(&row("b", "t1", 1, 700)), Err(OverQuota::Memory(1000)));
        assert_eq!(ok(&row("b", "t1", 1, 400)), Ok(()));
        assert_eq!(ok(&row("c", "t1", 0, 0)), Err(OverQuota::Sandboxes(2)));
        assert!(db.mark_ended("a", "killed").unwrap());
        assert!(!db.mark_ended("a", "killed").unwrap());
        assert_eq!(ok(&row("c", "t1", 1, 100)), Ok(()));
        assert_eq!(db.live_sandboxes(Some("t1")).unwrap().len(), 2);
        // Reopening applies no migration twice.
        drop(db);
        let db = Db::open(&dir.join("state.db")).unwrap();
        assert_eq!(db.tenants().unwrap().len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
