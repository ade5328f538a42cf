//! The OCI runtime spec as podvisor reads it (config.json of a bundle): the
//! fields that mean something for a container in a VM. Unknown fields are
//! accepted and ignored, as runc does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("open {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Spec {
    pub oci_version: String,
    pub process: Option<Process>,
    pub root: Option<Root>,
    pub hostname: String,
    pub mounts: Vec<Mount>,
    pub hooks: Option<Hooks>,
    pub annotations: BTreeMap<String, String>,
    pub linux: Option<Linux>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Process {
    pub terminal: bool,
    pub console_size: Option<ConsoleSize>,
    pub user: User,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub capabilities: Option<Capabilities>,
    pub rlimits: Vec<Rlimit>,
    pub no_new_privileges: bool,
    pub oom_score_adj: Option<i32>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct ConsoleSize {
    pub height: u32,
    pub width: u32,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub umask: Option<u32>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct Capabilities {
    pub bounding: Vec<String>,
    pub effective: Vec<String>,
    pub inheritable: Vec<String>,
    pub permitted: Vec<String>,
    pub ambient: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct Rlimit {
    #[serde(rename = "type")]
    pub kind: String,
    pub hard: u64,
    pub soft: u64,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct Root {
    pub path: String,
    pub readonly: bool,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct Mount {
    pub destination: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct Hook {
    pub path: String,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub timeout: Option<u64>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Hooks {
    pub prestart: Vec<Hook>,
    pub create_runtime: Vec<Hook>,
    pub create_container: Vec<Hook>,
    pub start_container: Vec<Hook>,
    pub poststart: Vec<Hook>,
    pub poststop: Vec<Hook>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Linux {
    #[serde(rename = "cgroupsPath")]
    pub cgroups_path: String,
    pub namespaces: Vec<Namespace>,
    pub resources: Option<Resources>,
    pub sysctl: BTreeMap<String, String>,
    pub seccomp: Option<crate::seccomp::Seccomp>,
    pub masked_paths: Vec<String>,
    pub readonly_paths: Vec<String>,
    pub rootfs_propagation: String,
    pub devices: Vec<Device>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Device {
    #[serde(rename = "type")]
    pub kind: String,
    pub path: String,
    pub major: i64,
    pub minor: i64,
    pub file_mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct Namespace {
    #[serde(rename = "type")]
    pub kind: String,
    pub path: String,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct Resources {
    pub memory: Option<Memory>,
    pub cpu: Option<Cpu>,
    pub pids: Option<Pids>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct Memory {
    pub limit: Option<i64>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct Cpu {
    pub quota: Option<i64>,
    pub period: Option<u64>,
    pub shares: Option<u64>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct Pids {
    pub limit: Option<i64>,
}

/// Annotations that size or shape the VM.
pub const ANNOTATION_MEMORY: &str = "io.podvisor.vm.memory";
pub const ANNOTATION_VCPUS: &str = "io.podvisor.vm.vcpus";
pub const ANNOTATION_KERNEL: &str = "io.podvisor.kernel";

/// What containerd's CRI says of a pod (1.6.7 and later).
pub const CRI_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
pub const CRI_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
pub const CRI_SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";
pub const CRI_SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
pub const CRI_SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";

/// A pod's VM when the pod states no limits: its containers share it, and
/// guest memory costs the host only once touched.
pub const DEFAULT_POD_MEMORY_MIB: u64 = 512;

/// Guest memory beyond the container's limit: kernel, agent, page cache.
pub const VM_OVERHEAD_MIB: u64 = 128;
pub const DEFAULT_VM_MEMORY_MIB: u64 = 256;

impl Spec {
    /// Reads and checks `bundle/config.json`.
    pub fn load(bundle: &Path) -> Result<Spec, SpecError> {
        let path = bundle.join("config.json");
        let text = std::fs::read(&path).map_err(|source| SpecError::Read {
            path: path.clone(),
            source,
        })?;
        Spec::parse(bundle, &text)
    }

    /// Parses and checks `text`, the bytes of `bundle/config.json`.
    pub fn parse(bundle: &Path, text: &[u8]) -> Result<Spec, SpecError> {
        let spec: Spec = serde_json::from_slice(text).map_err(|source| SpecError::Parse {
            path: bundle.join("config.json"),
            source,
        })?;
        spec.validate(bundle)?;
        Ok(spec)
    }

    fn validate(&self, bundle: &Path) -> Result<(), SpecError> {
        let invalid = |m: String| Err(SpecError::Invalid(m));
        if self.oci_version.is_empty() {
            return invalid("config.json: ociVersion is missing".into());
        }
        let Some(process) = &self.process else {
            return invalid("config.json: process is missing".into());
        };
        self.devices()?;
        if process.args.is_empty() {
            return invalid("config.json: process.args must not be empty".into());
        }
        if !process.cwd.is_empty() && !process.cwd.starts_with('/') {
            return invalid(format!(
                "config.json: process.cwd {:?} is not an absolute path",
                process.cwd
            ));
        }
        let rootfs = self.rootfs(bundle)?;
        if !rootfs.is_dir() {
            return invalid(format!("rootfs ({}) does not exist", rootfs.display()));
        }
        for m in &self.mounts {
            if !m.destination.starts_with('/') {
                return invalid(format!(
                    "config.json: mount destination {:?} is not absolute",
                    m.destination
                ));
            }
        }
        for (key, what) in [(ANNOTATION_MEMORY, "MiB"), (ANNOTATION_VCPUS, "count")] {
            if let Some(v) = self.annotations.get(key) {
                if v.parse::<u64>().map(|n| n == 0).unwrap_or(true) {
                    return invalid(format!("annotation {key}={v:?}: want a positive {what}"));
                }
            }
        }
        self.vm_cgroup()?;
        self.seccomp()?;
        Ok(())
    }

    /// `linux.seccomp` compiled for the agent (no programs without one).
    pub fn seccomp(&self) -> Result<crate::seccomp::Compiled, SpecError> {
        match self.linux.as_ref().and_then(|l| l.seccomp.as_ref()) {
            Some(profile) => crate::seccomp::compile(profile)
                .map_err(|e| SpecError::Invalid(format!("config.json: linux.seccomp: {e}"))),
            None => Ok(Default::default()),
        }
    }

    /// The container's first process for the agent, its seccomp filter
    /// included.
    pub fn agent_process(&self) -> Result<agent_proto::Process, SpecError> {
        let mut p = self.process().to_agent();
        self.apply_seccomp(&mut p)?;
        Ok(p)
    }

    /// Puts the container's seccomp filter on `process` (its first one or an
    /// exec: both run under it, as on runc).
    pub fn apply_seccomp(&self, process: &mut agent_proto::Process) -> Result<(), SpecError> {
        let c = self.seccomp()?;
        process.seccomp = c.programs;
        process.seccomp_flags = c.flags;
        Ok(())
    }

    /// The root filesystem, relative paths taken from the bundle.
    pub fn rootfs(&self, bundle: &Path) -> Result<PathBuf, SpecError> {
        let root = self
            .root
            .as_ref()
            .filter(|r| !r.path.is_empty())
            .ok_or_else(|| SpecError::Invalid("config.json: root.path is missing".into()))?;
        Ok(bundle.join(&root.path))
    }

    pub fn process(&self) -> &Process {
        self.process
            .as_ref()
            .expect("validated: process is present")
    }

    pub fn resources(&self) -> Option<&Resources> {
        self.linux.as_ref()?.resources.as_ref()
    }

    pub fn memory_limit(&self) -> Option<u64> {
        let l = self.resources()?.memory.as_ref()?.limit?;
        (l > 0).then_some(l as u64)
    }

    /// The VM's memory: the annotation, else the container's limit plus
    /// room for the guest itself, else the default.
    pub fn vm_memory_mib(&self) -> u64 {
        if let Some(m) = self.annotations.get(ANNOTATION_MEMORY) {
            return m.parse().unwrap_or(DEFAULT_VM_MEMORY_MIB);
        }
        match self.memory_limit() {
            Some(limit) => limit.div_ceil(1 << 20) + VM_OVERHEAD_MIB,
            None => DEFAULT_VM_MEMORY_MIB,
        }
    }

    /// The cgroup the VM goes in, relative to each hierarchy's root, from
    /// `linux.cgroupsPath`: a path (`/kubepods/pod1/abc`, as cgroupfs
    /// drivers give it) or systemd's `slice:prefix:name`
    /// (`machine.slice/libpod-abc.scope`, as runc's systemd driver lays it
    /// out). None: podvisor's own (`podvisor/vm-<uid>`).
    pub fn vm_cgroup(&self) -> Result<Option<String>, SpecError> {
        let path = self
            .linux
            .as_ref()
            .map(|l| l.cgroups_path.as_str())
            .unwrap_or("");
        cgroup_path(path)
            .map_err(|why| SpecError::Invalid(format!("linux.cgroupsPath {path:?}: {why}")))
    }

    /// The container's CPU limit in millicores, from its CFS quota and period.
    pub fn cpu_millis(&self) -> Option<u64> {
        self.cpu_quota().map(millis)
    }

    /// The pod's CPU limit in millicores, from the CRI sandbox annotations.
    pub fn pod_cpu_millis(&self) -> Option<u64> {
        self.pod_cpu_quota().map(millis)
    }

    /// The container's CFS quota and period (both positive), if it has a
    /// CPU limit.
    fn cpu_quota(&self) -> Option<(u64, u64)> {
        let cpu = self.resources()?.cpu.as_ref()?;
        let quota = u64::try_from(cpu.quota?).ok().filter(|q| *q > 0)?;
        let period = cpu.period.unwrap_or(100_000);
        (period > 0).then_some((quota, period))
    }

    /// The pod's CFS quota and period, from the CRI sandbox annotations.
    fn pod_cpu_quota(&self) -> Option<(u64, u64)> {
        let get = |k: &str| self.annotations.get(k).and_then(|v| v.parse::<i64>().ok());
        let quota = u64::try_from(get(CRI_SANDBOX_CPU_QUOTA)?)
            .ok()
            .filter(|q| *q > 0)?;
        let period = get(CRI_SANDBOX_CPU_PERIOD)
            .and_then(|p| u64::try_from(p).ok())
            .filter(|p| *p > 0)
            .unwrap_or(100_000);
        Some((quota, period))
    }

    /// The VM's vCPUs: the annotation, else the CPU quota rounded up, else 1.
    pub fn vm_vcpus(&self) -> u32 {
        if let Some(n) = self.annotations.get(ANNOTATION_VCPUS) {
            return n.parse().unwrap_or(1);
        }
        match self.cpu_quota() {
            Some((q, p)) => q.div_ceil(p).clamp(1, 64) as u32,
            None => 1,
        }
    }

    /// The network namespace the container asked for: None = the host's
    /// (no network device), Some(None) = a new one, Some(Some(path)) = join.
    pub fn network_namespace(&self) -> Option<Option<PathBuf>> {
        let ns = self
            .linux
            .as_ref()?
            .namespaces
            .iter()
            .find(|n| n.kind == "network")?;
        Some((!ns.path.is_empty()).then(|| PathBuf::from(&ns.path)))
    }

    /// linux.devices for the agent; a negative major or minor is refused.
    pub fn devices(&self) -> Result<Vec<agent_proto::Device>, SpecError> {
        let Some(l) = &self.linux else {
            return Ok(Vec::new());
        };
        l.devices
            .iter()
            .map(|d| {
                let num = |n: i64, what: &str| {
                    u32::try_from(n).map_err(|_| {
                        SpecError::Invalid(format!(
                            "config.json: linux.devices {:?}: {what} {n} is out of range",
                            d.path
                        ))
                    })
                };
                Ok(agent_proto::Device {
                    path: d.path.clone(),
                    r#type: d.kind.clone(),
                    major: num(d.major, "major")?,
                    minor: num(d.minor, "minor")?,
                    file_mode: d.file_mode,
                    uid: d.uid.unwrap_or(0),
                    gid: d.gid.unwrap_or(0),
                })
            })
            .collect()
    }

    pub fn rootfs_propagation(&self) -> String {
        self.linux
            .as_ref()
            .map(|l| l.rootfs_propagation.clone())
            .unwrap_or_default()
    }

    /// OCI linux.maskedPaths, for the agent.
    pub fn masked_paths(&self) -> Vec<String> {
        self.linux
            .as_ref()
            .map(|l| l.masked_paths.clone())
            .unwrap_or_default()
    }

    /// OCI linux.readonlyPaths, for the agent.
    pub fn readonly_paths(&self) -> Vec<String> {
        self.linux
            .as_ref()
            .map(|l| l.readonly_paths.clone())
            .unwrap_or_default()
    }

    /// The sysctls to write in the container's namespaces.
    pub fn sysctl(&self) -> std::collections::HashMap<String, String> {
        self.linux
            .as_ref()
            .map(|l| l.sysctl.clone().into_iter().collect())
            .unwrap_or_default()
    }

    /// The guest-side limits of the container's cgroup.
    pub fn agent_resources(&self) -> agent_proto::Resources {
        self.resources()
            .map(Resources::to_agent)
            .unwrap_or_default()
    }

    /// Refuses annotations that ask for more than the policy allows: a
    /// kernel not in `valid_kernel_paths`, memory or vCPUs above the limits
    /// the container or pod was given, or above the configured maximum.
    pub fn check_annotations(
        &self,
        policy: &crate::pool::AnnotationPolicy,
        pod: bool,
    ) -> Result<(), crate::SandboxError> {
        let refuse = |why: String| Err(crate::SandboxError::Invalid(why));
        if let Some(k) = self.annotations.get(ANNOTATION_KERNEL) {
            let canon = |p: &std::path::Path| std::fs::canonicalize(p).ok();
            let asked = canon(std::path::Path::new(k));
            let allowed =
                asked.is_some() && policy.valid_kernel_paths.iter().any(|v| canon(v) == asked);
            if !allowed {
                return refuse(format!(
                    "annotation {ANNOTATION_KERNEL}={k:?}: not one of the valid_kernel_paths in {}",
                    crate::pool::config_path().display()
                ));
            }
        }
        let get = |k: &str| self.annotations.get(k).and_then(|v| v.parse::<i64>().ok());
        if let Some(m) = self
            .annotations
            .get(ANNOTATION_MEMORY)
            .and_then(|v| v.parse::<u64>().ok())
        {
            let limit = if pod {
                get(CRI_SANDBOX_MEMORY).filter(|m| *m > 0).map(|l| l as u64)
            } else {
                self.memory_limit()
            };
            if let Some(l) = limit {
                let most = l.div_ceil(1 << 20) + VM_OVERHEAD_MIB;
                if m > most {
                    return refuse(format!(
                        "annotation {ANNOTATION_MEMORY}={m}: above the memory limit ({most} MiB with the VM's overhead)"
                    ));
                }
            }
            if let Some(max) = policy.max_memory_mib.filter(|max| m > *max) {
                return refuse(format!(
                    "annotation {ANNOTATION_MEMORY}={m}: above max_memory_mib = {max}"
                ));
            }
        }
        if let Some(n) = self
            .annotations
            .get(ANNOTATION_VCPUS)
            .and_then(|v| v.parse::<u32>().ok())
        {
            let quota = if pod {
                self.pod_cpu_quota()
            } else {
                self.cpu_quota()
            };
            if let Some((q, p)) = quota {
                let most = q.div_ceil(p) as u32;
                if n > most {
                    return refuse(format!(
                        "annotation {ANNOTATION_VCPUS}={n}: above the CPU limit ({most})"
                    ));
                }
            }
            if let Some(max) = policy.max_vcpus.filter(|max| n > *max) {
                return refuse(format!(
                    "annotation {ANNOTATION_VCPUS}={n}: above max_vcpus = {max}"
                ));
            }
        }
        Ok(())
    }

    /// The pod's VM, for a CRI sandbox: the podvisor annotations, else
    /// the sum of the pod's limits that containerd's CRI passes
    /// (`io.kubernetes.cri.sandbox-memory`, `-cpu-quota`, `-cpu-period`)
    /// plus room for the guest, else the defaults. Returns (MiB, vCPUs).
    pub fn pod_vm_shape(&self) -> (u64, u32) {
        let get = |k: &str| self.annotations.get(k).and_then(|v| v.parse::<i64>().ok());
        let memory = match (
            self.annotations.get(ANNOTATION_MEMORY),
            get(CRI_SANDBOX_MEMORY).filter(|m| *m > 0),
        ) {
            (Some(m), _) => m.parse().unwrap_or(DEFAULT_VM_MEMORY_MIB),
            (None, Some(limit)) => (limit as u64).div_ceil(1 << 20) + VM_OVERHEAD_MIB,
            (None, None) => DEFAULT_POD_MEMORY_MIB,
        };
        let vcpus = match (self.annotations.get(ANNOTATION_VCPUS), self.pod_cpu_quota()) {
            (Some(n), _) => n.parse().unwrap_or(1),
            (None, Some((q, p))) => q.div_ceil(p).clamp(1, 64) as u32,
            (None, None) => 1,
        };
        (memory, vcpus)
    }
}

/// Millicores of a CFS quota over its period (None: no limit).
fn millis((quota, period): (u64, u64)) -> u64 {
    ((quota as u128 * 1000).div_ceil(period as u128)).min(u64::MAX as u128) as u64
}

/// A cgroupsPath as a relative path under a hierarchy's root; None if empty.
fn cgroup_path(path: &str) -> Result<Option<String>, &'static str> {
    if path.is_empty() {
        return Ok(None);
    }
    if path.len() > 4096 || path.contains('\0') {
        return Err("too long or not text");
    }
    let relative = match path.split(':').collect::<Vec<_>>()[..] {
        [_] => path.trim_start_matches('/').to_string(),
        [slice, prefix, name] => {
            // systemd: a slice `a-b.slice` lives in `a.slice`; the unit is
            // `prefix-name.scope` (a name ending in .slice is a slice).
            let slice = if slice.is_empty() {
                "system.slice"
            } else {
                slice
            };
            let stem = slice
                .strip_suffix(".slice")
                .ok_or("the systemd slice does not end in .slice")?;
            let mut dirs = Vec::new();
            let mut acc = String::new();
            for part in stem.split('-') {
                if part.is_empty() {
                    return Err("empty part in the systemd slice");
                }
                if !acc.is_empty() {
                    acc.push('-');
                }
                acc.push_str(part);
                dirs.push(format!("{acc}.slice"));
            }
            let unit = match (prefix, name.ends_with(".slice")) {
                (_, true) => name.to_string(),
                ("", false) => format!("{name}.scope"),
                (p, false) => format!("{p}-{name}.scope"),
            };
            dirs.push(unit);
            dirs.join("/")
        }
        _ => return Err("neither a path nor slice:prefix:name"),
    };
    let ok = !relative.is_empty()
        && relative
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".." && !c.starts_with("cgroup."));
    if !ok {
        return Err("every component must be a plain name (no empty, `.`, `..` or cgroup.*)");
    }
    Ok(Some(relative))
}

impl Resources {
    /// The limits as the agent takes them (0 = unlimited).
    pub fn to_agent(&self) -> agent_proto::Resources {
        let cpu = self.cpu.as_ref();
        agent_proto::Resources {
            memory_limit: self
                .memory
                .as_ref()
                .and_then(|m| m.limit)
                .filter(|l| *l > 0)
                .unwrap_or(0),
            cpu_quota: cpu.and_then(|c| c.quota).filter(|q| *q > 0).unwrap_or(0),
            cpu_period: cpu.and_then(|c| c.period).unwrap_or(0),
            pids_limit: self
                .pids
                .as_ref()
                .and_then(|p| p.limit)
                .filter(|l| *l > 0)
                .unwrap_or(0),
        }
    }
}

impl Process {
    /// The process as the agent takes it.
    pub fn to_agent(&self) -> agent_proto::Process {
        agent_proto::Process {
            args: self.args.clone(),
            env: self.env.clone(),
            cwd: if self.cwd.is_empty() {
                "/".into()
            } else {
                self.cwd.clone()
            },
            user: Some(agent_proto::User {
                uid: self.user.uid,
                gid: self.user.gid,
                additional_gids: self.user.additional_gids.clone(),
            }),
            terminal: self.terminal,
            console_size: self.console_size.map(|c| agent_proto::ConsoleSize {
                rows: c.height,
                cols: c.width,
            }),
            rlimits: self
                .rlimits
                .iter()
                .map(|r| agent_proto::Rlimit {
                    r#type: r.kind.clone(),
                    hard: r.hard,
                    soft: r.soft,
                })
                .collect(),
            no_new_privileges: self.no_new_privileges,
            capabilities: self
                .capabilities
                .as_ref()
                .map(|c| agent_proto::Capabilities {
                    bounding: c.bounding.clone(),
                    effective: c.effective.clone(),
                    inheritable: c.inheritable.clone(),
                    permitted: c.permitted.clone(),
                    ambient: c.ambient.clone(),
                }),
            // The container's, put on by `Spec::apply_seccomp`.
            seccomp: Vec::new(),
            seccomp_flags: 0,
            umask: self.user.umask,
            oom_score_adj: self.oom_score_adj,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroups_paths() {
        let p = |s: &str| cgroup_path(s);
        assert_eq!(p(""), Ok(None));
        assert_eq!(
            p("/kubepods/pod1/abc"),
            Ok(Some("kubepods/pod1/abc".into()))
        );
        assert_eq!(p("docker/abc"), Ok(Some("docker/abc".into())));
        assert_eq!(
            p("kubepods-besteffort-pod1.slice:cri-containerd:abc"),
            Ok(Some(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/cri-containerd-abc.scope"
                    .into()
            ))
        );
        assert_eq!(
            p("machine.slice:libpod:abc"),
            Ok(Some("machine.slice/libpod-abc.scope".into()))
        );
        for bad in [
            "/",
            "/a/../b",
            "a//b",
            "/a/./b",
            "a/cgroup.procs",
            "a:b",
            "x:p:n",
            "a\0b",
        ] {
            assert!(p(bad).is_err(), "{bad}");
        }
        assert_eq!(millis((50_000, 100_000)), 500);
        assert_eq!(millis((u64::MAX, 1)), u64::MAX);
    }

    fn bundle(config: &str) -> (tempdir::Dir, Result<Spec, SpecError>) {
        let d = tempdir::Dir::new();
        std::fs::create_dir(d.0.join("rootfs")).unwrap();
        std::fs::write(d.0.join("config.json"), config).unwrap();
        let r = Spec::load(&d.0);
        (d, r)
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                let p = std::env::temp_dir().join(format!(
                    "podvisor-oci-{}-{:?}",
                    std::process::id(),
                    std::thread::current().id()
                ));
                let _ = std::fs::remove_dir_all(&p);
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn sizes_the_vm_from_limits_and_annotations() {
        let (_d, s) = bundle(
            r#"{"ociVersion":"1.0.2","process":{"args":["sh"],"cwd":"/"},"root":{"path":"rootfs"},
               "linux":{"resources":{"memory":{"limit":268435456},"cpu":{"quota":150000,"period":100000}},
                        "namespaces":[{"type":"network","path":"/run/netns/x"}]},
               "someFutureField":{"x":1}}"#,
        );
        let s = s.unwrap();
        assert_eq!(s.vm_memory_mib(), 256 + VM_OVERHEAD_MIB);
        assert_eq!(s.vm_vcpus(), 2);
        assert_eq!(s.agent_resources().memory_limit, 268435456);
        assert_eq!(
            s.network_namespace(),
            Some(Some(PathBuf::from("/run/netns/x")))
        );
    }

    #[test]
    fn refuses_broken_bundles() {
        let cases = [
            ("{", "parsing"),
            (
                r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"}}"#,
                "process is missing",
            ),
            (
                r#"{"ociVersion":"1.0.2","process":{"args":[]},"root":{"path":"rootfs"}}"#,
                "args must not be empty",
            ),
            (
                r#"{"ociVersion":"1.0.2","process":{"args":["sh"]},"root":{"path":"nope"}}"#,
                "does not exist",
            ),
            (
                r#"{"ociVersion":"1.0.2","process":{"args":["sh"]},"root":{"path":"rootfs"},
                   "annotations":{"io.podvisor.vm.memory":"lots"}}"#,
                "io.podvisor.vm.memory",
            ),
        ];
        for (config, want) in cases {
            let (_d, r) = bundle(config);
            let e = r.unwrap_err().to_string();
            assert!(e.contains(want), "{config}: {e}");
        }
    }
}
