//! The factory policy (`/etc/podvisor/config.toml`) and the front ends'
//! choice: a pool's ready clone, a clone, or a cold boot.

use super::*;

pub const DEFAULT_CONFIG: &str = "/etc/podvisor/config.toml";

/// One pool of the factory policy: `[[pool]] template = "T" size = N`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub template: String,
    pub size: usize,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    pool: Vec<PoolConfig>,
    /// The template the OCI CLI and the containerd shim clone their VMs
    /// from, when its shape fits (`template = "T"`).
    #[serde(default)]
    template: Option<String>,
    /// Kernels a pod may name with `io.podvisor.kernel` (Kata's
    /// `valid_kernel_paths`); none by default.
    #[serde(default)]
    valid_kernel_paths: Vec<PathBuf>,
    /// The most memory (MiB) and vCPUs an annotation may ask for.
    #[serde(default)]
    max_memory_mib: Option<u64>,
    #[serde(default)]
    max_vcpus: Option<u32>,
    /// The image store's table, read by the image crate.
    #[serde(default)]
    #[allow(dead_code)]
    images: Option<toml::Table>,
}

/// What the policy file allows annotations to ask for.
#[derive(Clone, Debug, Default)]
pub struct AnnotationPolicy {
    pub valid_kernel_paths: Vec<PathBuf>,
    pub max_memory_mib: Option<u64>,
    pub max_vcpus: Option<u32>,
}

/// The annotation policy of the file at `path` (none there: the defaults,
/// which allow no kernel). A broken file is an error.
pub fn annotation_policy(path: &Path) -> Result<AnnotationPolicy, SandboxError> {
    if !path.exists() {
        return Ok(AnnotationPolicy::default());
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| SandboxError::Invalid(format!("reading {}: {e}", path.display())))?;
    parse_annotation_policy(path, &text)
}

/// The annotation policy in `text`, the policy file at `path`.
pub fn parse_annotation_policy(path: &Path, text: &str) -> Result<AnnotationPolicy, SandboxError> {
    let file = parse_config_file(path, text)?;
    Ok(AnnotationPolicy {
        valid_kernel_paths: file.valid_kernel_paths,
        max_memory_mib: file.max_memory_mib,
        max_vcpus: file.max_vcpus,
    })
}

/// The policy file at `path`, whose bytes are `text`.
fn parse_config_file(path: &Path, text: &str) -> Result<ConfigFile, SandboxError> {
    toml::from_str(text)
        .map_err(|e| SandboxError::Invalid(format!("{}: {}", path.display(), e.message())))
}

/// The factory policy's file: `PODVISOR_CONFIG`, else the default.
pub fn config_path() -> PathBuf {
    std::env::var_os("PODVISOR_CONFIG")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG))
}

/// The template front ends clone from, if the policy names one. No policy
/// file: none. A broken one is an error.
pub fn front_end_template(path: &Path) -> Result<Option<String>, SandboxError> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| SandboxError::Invalid(format!("reading {}: {e}", path.display())))?;
    Ok(parse_config_file(path, &text)?.template)
}

/// The front ends' template, opened, if the policy names one whose shape
/// fits a VM of `memory_mib`, `vcpus` and `nics`; else why not (logged by
/// the caller; the VM then boots cold).
pub fn template_for(
    root: &Path,
    memory_mib: u64,
    vcpus: u32,
    nics: usize,
) -> Result<Option<crate::template::Template>, SandboxError> {
    let Some(name) = front_end_template(&config_path())? else {
        return Ok(None);
    };
    let t = crate::template::Template::open(root, &name)?;
    if t.meta.memory_mib < memory_mib || t.meta.vcpus < vcpus || t.meta.nics != nics {
        return Err(SandboxError::Invalid(format!(
            "template {name} ({} MiB, {} vCPUs, {} NICs) does not fit a VM of {memory_mib} MiB, {vcpus} vCPUs, {nics} NICs",
            t.meta.memory_mib, t.meta.vcpus, t.meta.nics
        )));
    }
    Ok(Some(t))
}

/// The factory, as the OCI CLI and the shim use it: a ready clone from the
/// pool of the policy's template when a pool serves it, else a clone of the
/// template when it fits `config`'s shape, else a cold boot. Logs which
/// (and why not a clone). A pooled VM's share starts empty: the caller
/// fills it with `Sandbox::attach` instead of `config.shares`.
pub async fn provide(mut config: SandboxConfig) -> Result<Sandbox, SandboxError> {
    let (mem, vcpus, nics) = (config.memory_mib, config.vcpus, config.nics.len());
    let template = match template_for(&config.root, mem, vcpus, nics) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(sandbox = %config.id, "booting cold: {e}");
            None
        }
    };
    if let Some(t) = &template {
        let taps: Option<Vec<RawFd>> = config.nics.iter().map(|n| n.fd).collect();
        let name = &t.meta.name;
        let taken = match taps {
            Some(taps) => take(&config.root, name, &config.hostname, &taps).await,
            None => Err(SandboxError::Invalid("a NIC has no open tap device".into())),
        };
        match taken {
            Ok(Some(mut sb)) => {
                let owned = match sb.adopt(&config.root, &config.id) {
                    Ok(()) => {
                        sb.limit(config.cgroup.clone(), config.cpu_millis, mem)
                            .await
                    }
                    Err(e) => Err(e),
                };
                if let Err(e) = owned {
                    sb.destroy().await;
                    return Err(e);
                }
                let ms = sb.timings.agent_ready.as_millis() as u64;
                tracing::info!(sandbox = %config.id, template = %name, ready_ms = ms, "took a ready VM from the pool");
                return Ok(sb);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(sandbox = %config.id, template = %name, "pool: {e}; cloning instead")
            }
        }
    }
    config.template = template;
    let sb = Sandbox::start(config).await?;
    let ms = sb.timings.agent_ready.as_millis() as u64;
    match (&sb.cloned_from, &sb.fallback) {
        (Some(t), _) => {
            tracing::info!(sandbox = %sb.id, template = %t, ready_ms = ms, "cloned the VM")
        }
        (None, Some(why)) => tracing::warn!(sandbox = %sb.id, "{why}"),
        _ => tracing::info!(sandbox = %sb.id, ready_ms = ms, "booted the VM cold"),
    }
    Ok(sb)
}

/// Reads the factory policy.
pub fn load_config(path: &Path) -> Result<Vec<PoolConfig>, SandboxError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| SandboxError::Invalid(format!("reading {}: {e}", path.display())))?;
    parse_config(path, &text)
}

/// The factory policy in `text`, the policy file at `path`: its pools, checked.
pub fn parse_config(path: &Path, text: &str) -> Result<Vec<PoolConfig>, SandboxError> {
    let file = parse_config_file(path, text)?;
    for p in &file.pool {
        if p.size == 0 || p.size > 64 {
            return Err(SandboxError::Invalid(format!(
                "{}: pool {}: size {} is out of range (1 to 64)",
                path.display(),
                p.template,
                p.size
            )));
        }
    }
    Ok(file.pool)
}
