//! podvisord's config file (TOML): everything but the listen address, the
//! state directory and the admin token.
//!
//! ```toml
//! domain = "sandbox.example.com"   # sandboxes are {port}-{id}.{domain}
//! base_cache = "/var/cache/podvisord"
//! [default_quotas]
//! maxSandboxes = 20
//! [[templates]]
//! name = "base"                    # built (Debian 12) when it has no rootfs
//! vcpus = 1
//! memory_mib = 512
//! pool = 2                         # ready clones kept
//! disk_mib = 2048                  # each sandbox's writable disk
//! [[templates]]
//! name = "busybox"
//! rootfs = "/srv/roots/busybox"
//! ```

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::db::Quotas;

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateConfig {
    pub name: String,
    /// The root filesystem (a directory). Absent for `base`: podvisord
    /// builds a Debian 12 root in `base_cache`.
    pub rootfs: Option<PathBuf>,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    /// Ready clones kept for it (a create then takes one: milliseconds).
    #[serde(default)]
    pub pool: usize,
    /// Each sandbox's writable disk (what it may write over its root).
    #[serde(default = "default_disk")]
    pub disk_mib: u64,
    /// Set by podvisord for a tenant's snapshot of a sandbox (E2B's
    /// `create_snapshot`): its VM template is that snapshot, and only that
    /// tenant sees it. Never in a config file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_of: Option<SnapshotOf>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotOf {
    pub tenant: String,
    pub sandbox: String,
}

pub fn default_disk() -> u64 {
    2048
}

fn default_vcpus() -> u32 {
    1
}
fn default_memory() -> u64 {
    512
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The domain sandboxes' hosts are under (`{port}-{sandboxID}.{domain}`).
    #[serde(default = "default_domain")]
    pub domain: String,
    /// Where the base template's root is built and kept (outside the state
    /// directory: a fresh state directory reuses it).
    #[serde(default = "default_cache")]
    pub base_cache: PathBuf,
    #[serde(default)]
    pub default_quotas: Quotas,
    /// Sandbox lifetime when a create names none (E2B's default: 300 s).
    #[serde(default = "default_timeout")]
    pub default_timeout_s: i64,
    #[serde(default = "default_templates")]
    pub templates: Vec<TemplateConfig>,
}

fn default_domain() -> String {
    "localhost".into()
}
fn default_timeout() -> i64 {
    300
}
fn default_cache() -> PathBuf {
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    std::env::var_os("PODVISOR_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(home).join(".cache/podvisor"))
        .join("podvisord")
}
fn default_templates() -> Vec<TemplateConfig> {
    vec![TemplateConfig {
        name: "base".into(),
        rootfs: None,
        vcpus: default_vcpus(),
        memory_mib: default_memory(),
        pool: 0,
        disk_mib: default_disk(),
        snapshot_of: None,
    }]
}

impl Default for Config {
    fn default() -> Self {
        toml::from_str("").expect("the empty config parses")
    }
}

impl Config {
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let c: Config =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let mut seen = std::collections::HashSet::new();
        for t in &c.templates {
            if !sandbox_template_name_ok(&t.name) {
                anyhow::bail!(
                    "{}: template name {:?}: use letters, digits, '-' and '_'",
                    path.display(),
                    t.name
                );
            }
            if !seen.insert(&t.name) {
                anyhow::bail!("{}: template {:?} is named twice", path.display(), t.name);
            }
            if t.rootfs.is_none() && t.name != "base" {
                anyhow::bail!("{}: template {:?} needs a rootfs", path.display(), t.name);
            }
            if t.snapshot_of.is_some() {
                anyhow::bail!(
                    "{}: template {:?}: snapshot_of is podvisord's own",
                    path.display(),
                    t.name
                );
            }
        }
        Ok(c)
    }
}

pub fn sandbox_template_name_ok(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_empty_config_serves_base() {
        let c = Config::default();
        assert_eq!(c.templates.len(), 1);
        assert_eq!(c.templates[0].name, "base");
        assert_eq!(c.domain, "localhost");
        assert_eq!(c.default_quotas, Quotas::default());
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(toml::from_str::<Config>("domian = \"x\"").is_err());
    }
}
