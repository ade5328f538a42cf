//! `podvisor service`: the operator's command line over podvisord's admin
//! REST API (`/admin/`, `X-Admin-Token`): tenants, their keys and quotas,
//! and templates. Every answer is printed as the API gives it (JSON), lists
//! as tables unless `--format json`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::{json, Value};

#[derive(Args)]
pub struct ServiceArgs {
    /// podvisord's address.
    #[arg(long, env = "PODVISORD_URL", default_value = "http://127.0.0.1:3000")]
    url: String,
    /// The file podvisord keeps its admin token in (or PODVISORD_ADMIN_TOKEN).
    #[arg(
        long,
        env = "PODVISORD_ADMIN_TOKEN_FILE",
        default_value = "/var/lib/podvisord/admin.token"
    )]
    admin_token_file: PathBuf,
    /// A CA certificate (PEM) to trust for an https URL, beside the system's.
    #[arg(long)]
    cacert: Option<PathBuf>,
    /// Lists as a table, or as the API's JSON.
    #[arg(long, default_value = "table", value_parser = ["table", "json"])]
    format: String,
    #[command(subcommand)]
    command: ServiceCommand,
}

#[derive(Subcommand)]
enum ServiceCommand {
    /// Tenants: create (prints its first API key, once), ls, show, rm.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// A tenant's API keys: create (printed once), ls, revoke.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Change a tenant's quotas (only the ones given).
    Quota(QuotaArgs),
    /// Templates: create (from a root directory), ls, show, rm.
    #[command(subcommand)]
    Template(TemplateCommand),
}

#[derive(Subcommand)]
enum TenantCommand {
    Create {
        name: String,
        #[command(flatten)]
        quotas: Quotas,
        /// Seconds until the first key expires (default: never).
        #[arg(long)]
        key_expires_in: Option<i64>,
    },
    Ls,
    Show {
        id: String,
    },
    /// Revokes its keys, then ends its sandboxes.
    Rm {
        id: String,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    Create {
        tenant: String,
        /// Seconds until it expires (default: never).
        #[arg(long)]
        expires_in: Option<i64>,
    },
    Ls {
        tenant: String,
    },
    Revoke {
        tenant: String,
        key: String,
    },
}

#[derive(Args)]
struct QuotaArgs {
    tenant: String,
    #[command(flatten)]
    quotas: Quotas,
}

#[derive(Args)]
struct Quotas {
    /// Sandboxes alive at once.
    #[arg(long)]
    max_sandboxes: Option<i64>,
    /// vCPUs of its live sandboxes together.
    #[arg(long)]
    max_vcpus: Option<i64>,
    /// Memory of its live sandboxes together, MiB.
    #[arg(long)]
    max_memory_mib: Option<i64>,
    /// A sandbox's longest lifetime, seconds.
    #[arg(long)]
    max_lifetime_s: Option<i64>,
    /// Templates it may use, comma-separated ("" for none; absent: all).
    #[arg(long)]
    templates: Option<String>,
}

impl Quotas {
    fn to_json(&self) -> Value {
        let mut m = serde_json::Map::new();
        let mut put = |k: &str, v: Option<i64>| {
            if let Some(v) = v {
                m.insert(k.into(), json!(v));
            }
        };
        put("maxSandboxes", self.max_sandboxes);
        put("maxVcpus", self.max_vcpus);
        put("maxMemoryMib", self.max_memory_mib);
        put("maxLifetimeS", self.max_lifetime_s);
        if let Some(t) = &self.templates {
            let names: Vec<&str> = t.split(',').filter(|s| !s.is_empty()).collect();
            m.insert("templates".into(), json!(names));
        }
        Value::Object(m)
    }
}

#[derive(Subcommand)]
enum TemplateCommand {
    /// Boots and saves the template's VM (seconds), then serves it.
    Create {
        name: String,
        /// A directory holding the root filesystem (default: the Debian 12
        /// base root podvisord builds).
        #[arg(long)]
        rootfs: Option<PathBuf>,
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        #[arg(long, default_value_t = 512)]
        memory_mib: u64,
        /// Each sandbox's writable disk, in MiB.
        #[arg(long, default_value_t = 2048)]
        disk_mib: u64,
        /// Ready clones to keep.
        #[arg(long, default_value_t = 0)]
        pool: usize,
    },
    Ls,
    Show {
        name: String,
    },
    Rm {
        name: String,
    },
}

struct Client {
    http: reqwest::Client,
    url: String,
    token: String,
}

impl Client {
    fn new(args: &ServiceArgs) -> anyhow::Result<Client> {
        let token = match std::env::var("PODVISORD_ADMIN_TOKEN") {
            Ok(t) if !t.is_empty() => t,
            _ => std::fs::read_to_string(&args.admin_token_file)
                .with_context(|| {
                    format!(
                        "reading the admin token {} (or set PODVISORD_ADMIN_TOKEN)",
                        args.admin_token_file.display()
                    )
                })?
                .trim()
                .to_string(),
        };
        let mut b = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(300))
            .connect_timeout(std::time::Duration::from_secs(10));
        if let Some(ca) = &args.cacert {
            let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
            b = b.tls_certs_merge(
                reqwest::Certificate::from_pem_bundle(&pem)
                    .with_context(|| format!("{} is not a PEM certificate", ca.display()))?,
            );
        }
        Ok(Client {
            http: b.build()?,
            url: args.url.trim_end_matches('/').to_string(),
            token,
        })
    }

    /// One admin call; an error answer becomes an error naming its status
    /// and podvisord's message.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.url))
            .header("X-Admin-Token", &self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("reaching podvisord at {}", self.url))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            let message = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["message"].as_str().map(str::to_string))
                .unwrap_or(text);
            anyhow::bail!("podvisord answered {}: {message}", status.as_u16());
        }
        if text.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).context("podvisord's answer is not JSON")
    }
}

fn print(v: &Value) {
    if !v.is_null() {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    }
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A list answer: a table of `columns`, or the API's JSON.
fn list(rows: &Value, as_table: bool, columns: &[(&str, &str)]) {
    if as_table {
        table(rows, columns)
    } else {
        print(rows)
    }
}

/// A table of `rows` with `columns` (header, JSON pointer).
fn table(rows: &Value, columns: &[(&str, &str)]) {
    let rows = rows.as_array().cloned().unwrap_or_default();
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            columns
                .iter()
                .map(|(_, p)| cell(r.pointer(p).unwrap_or(&Value::Null)))
                .collect()
        })
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, (h, _))| {
            cells
                .iter()
                .map(|c| c[i].len())
                .max()
                .unwrap_or(0)
                .max(h.len())
        })
        .collect();
    let line = |vals: Vec<&str>| {
        let parts: Vec<String> = vals
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(columns.iter().map(|(h, _)| *h).collect());
    for c in &cells {
        line(c.iter().map(String::as_str).collect());
    }
}

pub async fn run(args: ServiceArgs) -> anyhow::Result<u8> {
    use reqwest::Method;
    let c = Client::new(&args)?;
    let as_table = args.format == "table";
    match args.command {
        ServiceCommand::Tenant(t) => match t {
            TenantCommand::Create {
                name,
                quotas,
                key_expires_in,
            } => {
                let mut body = json!({"name": name, "quotas": quotas.to_json()});
                if let Some(e) = key_expires_in {
                    body["keyExpiresIn"] = json!(e);
                }
                print(&c.call(Method::POST, "/admin/tenants", Some(body)).await?);
            }
            TenantCommand::Ls => {
                let v = c.call(Method::GET, "/admin/tenants", None).await?;
                list(
                    &v,
                    as_table,
                    &[
                        ("ID", "/id"),
                        ("NAME", "/name"),
                        ("SANDBOXES", "/quotas/maxSandboxes"),
                        ("VCPUS", "/quotas/maxVcpus"),
                        ("MEMORY MIB", "/quotas/maxMemoryMib"),
                        ("LIFETIME S", "/quotas/maxLifetimeS"),
                    ],
                );
            }
            TenantCommand::Show { id } => {
                let path = format!("/admin/tenants/{}", percent_encode(&id));
                print(&c.call(Method::GET, &path, None).await?);
            }
            TenantCommand::Rm { id } => {
                let path = format!("/admin/tenants/{}", percent_encode(&id));
                print(&c.call(Method::DELETE, &path, None).await?);
            }
        },
        ServiceCommand::Key(k) => match k {
            KeyCommand::Create { tenant, expires_in } => {
                let path = format!("/admin/tenants/{}/keys", percent_encode(&tenant));
                let body = expires_in.map_or(json!({}), |e| json!({"expiresIn": e}));
                print(&c.call(Method::POST, &path, Some(body)).await?);
            }
            KeyCommand::Ls { tenant } => {
                let path = format!("/admin/tenants/{}/keys", percent_encode(&tenant));
                let v = c.call(Method::GET, &path, None).await?;
                list(
                    &v,
                    as_table,
                    &[
                        ("ID", "/id"),
                        ("PREFIX", "/prefix"),
                        ("CREATED MS", "/createdMs"),
                        ("EXPIRES MS", "/expiresMs"),
                        ("REVOKED MS", "/revokedMs"),
                    ],
                );
            }
            KeyCommand::Revoke { tenant, key } => {
                let path = format!(
                    "/admin/tenants/{}/keys/{}",
                    percent_encode(&tenant),
                    percent_encode(&key)
                );
                print(&c.call(Method::DELETE, &path, None).await?);
            }
        },
        ServiceCommand::Quota(q) => {
            let path = format!("/admin/tenants/{}/quotas", percent_encode(&q.tenant));
            print(&c.call(Method::PUT, &path, Some(q.quotas.to_json())).await?);
        }
        ServiceCommand::Template(t) => match t {
            TemplateCommand::Create {
                name,
                rootfs,
                vcpus,
                memory_mib,
                disk_mib,
                pool,
            } => {
                let rootfs = match rootfs {
                    // podvisord reads it on its own host: an absolute path.
                    Some(r) => Some(std::path::absolute(&r)?),
                    None => None,
                };
                let body = json!({
                    "name": name, "rootfs": rootfs, "vcpus": vcpus,
                    "memoryMB": memory_mib, "diskSizeMB": disk_mib, "pool": pool,
                });
                print(&c.call(Method::POST, "/admin/templates", Some(body)).await?);
            }
            TemplateCommand::Ls => {
                let v = c.call(Method::GET, "/admin/templates", None).await?;
                list(
                    &v,
                    as_table,
                    &[
                        ("NAME", "/name"),
                        ("SOURCE", "/source"),
                        ("VCPUS", "/vcpus"),
                        ("MEMORY MB", "/memoryMB"),
                        ("DISK MB", "/diskSizeMB"),
                        ("POOL", "/poolSize"),
                        ("READY", "/pool/ready"),
                        ("ROOTFS", "/rootfs"),
                    ],
                );
            }
            TemplateCommand::Show { name } => {
                let path = format!("/admin/templates/{}", percent_encode(&name));
                print(&c.call(Method::GET, &path, None).await?);
            }
            TemplateCommand::Rm { name } => {
                let path = format!("/admin/templates/{}", percent_encode(&name));
                print(&c.call(Method::DELETE, &path, None).await?);
            }
        },
    }
    Ok(0)
}

/// One path segment, percent-encoded (ids are plain, but nothing is trusted).
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
