//! VM templates: a VM booted to a ready agent, paused, its memory kept in a
//! file and its device state in another. Clones map the memory privately
//! (copy on write) and load the device state instead of booting.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hypervisor::qemu::QemuDriver;
use hypervisor::{Accel, MemoryBackend, Share};
use serde::{Deserialize, Serialize};

use crate::assets::GuestAssets;
use crate::sandbox::{vm_config, wait_for_agent, SandboxConfig};
use crate::state::StateDir;
use crate::supervisor::{Request, Supervisor};
use crate::SandboxError;

const META: &str = "template.json";
const MEMORY: &str = "memory";
const STATE: &str = "state";
/// The share clones mount their root from; empty in the template itself.
pub const ROOTFS_TAG: &str = "rootfs";

/// How long saving a template's VM may take.
const SAVE_WAIT: Duration = Duration::from_secs(70);

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TemplateMeta {
    pub name: String,
    pub memory_mib: u64,
    pub vcpus: u32,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub accel: String,
    pub created_unix: u64,
    /// Network devices the template's VM has: a clone supplies as many
    /// tap devices of its own (and the agent gives each its MAC).
    #[serde(default)]
    pub nics: usize,
    /// The NICs sit behind hubs (`VmConfig::nic_hubs`), so a pool's clones
    /// can take their taps after start. Templates made before had not.
    #[serde(default)]
    pub nic_hubs: bool,
    /// The VM has an image's disks; the template keeps its writable layer
    /// as it was when saved (`layer.qcow2`), and each clone writes to an
    /// overlay of its own over it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_root: Option<crate::BlockRoot>,
    /// Read-only layers under this template's own (a snapshot of a clone
    /// keeps its template's layers beneath the clone's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub base_layers: Vec<PathBuf>,
    /// A snapshot of a running sandbox (`Sandbox::snapshot`): `memory` is
    /// QEMU's mapped-ram file whose pages begin at `memory_offset`, and
    /// `state` its companion.
    #[serde(default)]
    pub snapshot: bool,
    #[serde(default)]
    pub memory_offset: u64,
    /// The memory file's length (snapshots), checked at every open.
    #[serde(default)]
    pub memory_bytes: u64,
    /// SHA-256 of `state` (snapshots), checked at every open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_sha256: Option<String>,
}

#[derive(Clone, Debug)]
pub struct Template {
    pub dir: PathBuf,
    pub meta: TemplateMeta,
}

fn templates(root: &Path) -> PathBuf {
    root.join("templates")
}

fn valid_name(name: &str) -> Result<(), SandboxError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(SandboxError::Invalid(format!(
            "invalid template name {name:?} (letters, digits, - _ . only)"
        )))
    }
}

/// For a new template `name`: the templates directory, the template's
/// directory-to-be (which must not exist) and a fresh staging directory
/// (`.NAME.PID`, which `collect_garbage` removes once its process is gone).
fn staging(root: &Path, name: &str) -> Result<(PathBuf, PathBuf, PathBuf), SandboxError> {
    valid_name(name)?;
    let parent = templates(root);
    fs::create_dir_all(&parent).map_err(io_err(format!("creating {}", parent.display())))?;
    let dir = parent.join(name);
    if dir.exists() {
        return Err(SandboxError::Invalid(format!(
            "template {name} already exists"
        )));
    }
    let staging = parent.join(format!(".{name}.{}", std::process::id()));
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir(&staging).map_err(io_err(format!("creating {}", staging.display())))?;
    Ok((parent, dir, staging))
}

fn io_err(what: String) -> impl FnOnce(io::Error) -> SandboxError {
    move |e| SandboxError::Invalid(format!("{what}: {e}"))
}

impl Template {
    pub fn memory(&self) -> PathBuf {
        self.dir.join(MEMORY)
    }

    pub fn state(&self) -> PathBuf {
        self.dir.join(STATE)
    }

    /// The writable layer as the template's VM left it (with a block root).
    pub fn layer(&self) -> PathBuf {
        self.dir.join(crate::sandbox::LAYER_FILE)
    }

    pub fn accel(&self) -> Accel {
        self.meta.accel.parse().unwrap_or(Accel::Tcg)
    }

    /// A snapshot's state file against its checksum (checked again at
    /// every resume: a state altered since `open` is never loaded).
    pub fn check_state(&self) -> Result<(), SandboxError> {
        let name = &self.meta.name;
        let corrupt =
            |why: String| SandboxError::Invalid(format!("template {name} is unusable: {why}"));
        let start = self.meta.memory_offset;
        let hole = start..start + (self.meta.memory_mib << 20);
        let sum =
            sha256_file(&self.state(), hole).map_err(|e| corrupt(format!("state file: {e}")))?;
        if Some(&sum) != self.meta.state_sha256.as_ref() {
            return Err(corrupt("state file does not match its checksum".into()));
        }
        Ok(())
    }

    /// Bytes on disk (memory file and device state).
    pub fn size(&self) -> u64 {
        [self.memory(), self.state()]
            .iter()
            .filter_map(|p| fs::metadata(p).ok())
            .map(|m| m.len())
            .sum()
    }

    /// Boots a VM to a ready agent, pauses it and saves it as template `name`.
    pub async fn create(config: SandboxConfig, name: &str) -> Result<Template, SandboxError> {
        config.validate()?;
        let (_, dir, staging) = staging(&config.root, name)?;
        let result = Self::build(&config, name, &staging).await;
        let meta = match result {
            Ok(meta) => meta,
            Err(e) => {
                let _ = fs::remove_dir_all(&staging);
                return Err(e);
            }
        };
        if let Err(e) = fs::rename(&staging, &dir) {
            let _ = fs::remove_dir_all(&staging);
            return Err(SandboxError::Invalid(format!("template {name}: {e}")));
        }
        Ok(Template { dir, meta })
    }

    async fn build(
        config: &SandboxConfig,
        name: &str,
        dir: &Path,
    ) -> Result<TemplateMeta, SandboxError> {
        let share = dir.join("share");
        fs::create_dir(&share).map_err(io_err("creating the template share".into()))?;
        QemuDriver::locate()?;
        // The template's own VM lives in a sandbox state dir like any other,
        // so a killed `template create` is cleaned up the same way.
        let state_dir = StateDir::create(&config.root, &format!("template-{name}"))?;
        let mut vmc = vm_config(config, &state_dir);
        vmc.shares = vec![Share {
            tag: ROOTFS_TAG.into(),
            path: share,
            readonly: true,
        }];
        vmc.memory = MemoryBackend::File {
            path: dir.join(MEMORY),
            shared: true,
            offset: 0,
        };
        vmc.nic_hubs = true;
        if let Some(b) = &config.block_root {
            let layer = dir.join(crate::sandbox::LAYER_FILE);
            crate::sandbox::make_overlay(&b.empty, false, &layer)?;
            vmc.disks = b.disks(&[layer]);
        }
        let result = async {
            let vm = Supervisor::launch(&vmc, Some(state_dir.lock())).await?;
            state_dir.record_vmm_pid(vm.pid);
            let saved = async {
                let channel = crate::agent::channel(&vmc.agent_socket)?;
                let mut client = crate::agent::AgentClient::new(channel);
                wait_for_agent(&vm, &mut client, config.boot_timeout, &vmc.console_log).await?;
                // Hang up. The guest may not see it before the save; each
                // clone's host starts a fresh session (SESSION_MAGIC) anyway.
                drop(client);
                let save = Request::Save {
                    state: dir.join(STATE),
                };
                vm.ask(&save, &[], SAVE_WAIT).await?;
                Ok::<_, SandboxError>(())
            }
            .await;
            vm.finish(Duration::from_secs(2)).await;
            saved
        }
        .await;
        state_dir.remove();
        result?;
        let meta = TemplateMeta {
            name: name.into(),
            memory_mib: config.memory_mib,
            vcpus: config.vcpus,
            kernel: config.assets.kernel.clone(),
            initrd: config.assets.initrd.clone(),
            accel: config.accel.to_string(),
            nics: config.nics.len(),
            nic_hubs: true,
            block_root: config.block_root.clone(),
            base_layers: Vec::new(),
            snapshot: false,
            memory_offset: 0,
            memory_bytes: 0,
            state_sha256: None,
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        let json =
            serde_json::to_vec_pretty(&meta).map_err(|e| SandboxError::Invalid(e.to_string()))?;
        fs::write(dir.join(META), json).map_err(io_err("writing template.json".into()))?;
        // Read-only once saved: clones map the memory privately and never write it.
        let layer = crate::sandbox::LAYER_FILE;
        for f in [MEMORY, STATE, META, layer] {
            if f == layer && meta.block_root.is_none() {
                continue;
            }
            fs::set_permissions(dir.join(f), fs::Permissions::from_mode(0o444))
                .map_err(io_err(format!("sealing {f}")))?;
        }
        Ok(meta)
    }

    /// Opens template `name` and checks that its files are whole.
    pub fn open(root: &Path, name: &str) -> Result<Template, SandboxError> {
        valid_name(name)?;
        let dir = templates(root).join(name);
        if !dir.is_dir() {
            return Err(SandboxError::Invalid(format!(
                "template {name} does not exist"
            )));
        }
        let corrupt =
            |why: String| SandboxError::Invalid(format!("template {name} is unusable: {why}"));
        let text = fs::read(dir.join(META)).map_err(|e| corrupt(format!("{META}: {e}")))?;
        let meta: TemplateMeta =
            serde_json::from_slice(&text).map_err(|e| corrupt(format!("{META}: {e}")))?;
        // The name becomes a path component (a pool's shares, its socket).
        if meta.name != name {
            return Err(corrupt(format!("{META} names template {:?}", meta.name)));
        }
        let t = Template { dir, meta };
        let mem = fs::metadata(t.memory()).map_err(|e| corrupt(format!("memory file: {e}")))?;
        let expected = t.meta.memory_mib.checked_mul(1 << 20);
        if t.meta.snapshot {
            let layout = hypervisor::qemu::mapped_ram::read_layout(
                &t.memory(),
                expected.unwrap_or_default(),
            )
            .map_err(|e| corrupt(format!("memory file: {e}")))?;
            if mem.len() != t.meta.memory_bytes {
                return Err(corrupt(format!(
                    "memory file has {} bytes, {META} says {} (truncated or altered)",
                    mem.len(),
                    t.meta.memory_bytes
                )));
            }
            if layout.pages_offset != t.meta.memory_offset {
                return Err(corrupt(format!(
                    "memory file's pages begin at {}, {META} says {}",
                    layout.pages_offset, t.meta.memory_offset
                )));
            }
            t.check_state()?;
            for l in &t.meta.base_layers {
                if !l.is_file() {
                    return Err(corrupt(format!("its base layer {} is gone", l.display())));
                }
            }
        } else if Some(mem.len()) != expected {
            return Err(corrupt(format!(
                "memory file has {} bytes, expected {} MiB",
                mem.len(),
                t.meta.memory_mib
            )));
        }
        let state = fs::metadata(t.state()).map_err(|e| corrupt(format!("state file: {e}")))?;
        if state.len() == 0 {
            return Err(corrupt("state file is empty".into()));
        }
        Ok(t)
    }

    /// Saves a running sandbox as template `name` under `root`: `save`
    /// writes the whole VM to the path it is given and leaves it paused;
    /// then its writable layer (`layer`, with a block root) is copied, the
    /// companion state written, everything synced and the directory renamed
    /// into place. A failure leaves no trace under `templates/`.
    pub(crate) async fn from_sandbox<F, Fut>(
        root: &Path,
        name: &str,
        origin: TemplateMeta,
        layer: Option<&Path>,
        save: F,
    ) -> Result<Template, SandboxError>
    where
        F: FnOnce(PathBuf) -> Fut,
        Fut: std::future::Future<Output = Result<(), SandboxError>>,
    {
        let (parent, dir, staging) = staging(root, name)?;
        let made = async {
            save(staging.join(MEMORY)).await?;
            let file_err = |what: &str| {
                let what = what.to_string();
                move |e: std::io::Error| SandboxError::Invalid(format!("snapshot {what}: {e}"))
            };
            let memory = staging.join(MEMORY);
            let length = origin.memory_mib << 20;
            let (layout, state) = {
                let (m, st) = (memory.clone(), staging.join(STATE));
                tokio::task::spawn_blocking(move || {
                    let l = hypervisor::qemu::mapped_ram::read_layout(&m, length)?;
                    hypervisor::qemu::mapped_ram::companion(&m, &l, &st)?;
                    Ok::<_, hypervisor::qemu::mapped_ram::MappedRamError>((l, st))
                })
                .await
                .map_err(|e| SandboxError::Invalid(e.to_string()))?
                .map_err(|e| SandboxError::Invalid(format!("snapshot memory: {e}")))?
            };
            if origin.block_root.is_some() {
                let from = layer.ok_or_else(|| {
                    SandboxError::Invalid("the sandbox's writable layer is not ours".into())
                })?;
                let to = staging.join(crate::sandbox::LAYER_FILE);
                fs::copy(from, &to).map_err(file_err("layer"))?;
                fs::File::open(&to)
                    .and_then(|f| f.sync_all())
                    .map_err(file_err("layer"))?;
            }
            let meta = TemplateMeta {
                name: name.into(),
                snapshot: true,
                memory_offset: layout.pages_offset,
                memory_bytes: fs::metadata(&memory).map_err(file_err("memory"))?.len(),
                state_sha256: Some(
                    sha256_file(&state, layout.pages_offset..layout.pages_offset + length)
                        .map_err(file_err("state"))?,
                ),
                created_unix: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
                ..origin
            };
            let json = serde_json::to_vec_pretty(&meta)
                .map_err(|e| SandboxError::Invalid(e.to_string()))?;
            let meta_path = staging.join(META);
            fs::write(&meta_path, json).map_err(file_err(META))?;
            for f in [MEMORY, STATE, META, crate::sandbox::LAYER_FILE] {
                let p = staging.join(f);
                if !p.exists() {
                    continue;
                }
                fs::File::open(&p)
                    .and_then(|f| f.sync_all())
                    .map_err(file_err(f))?;
                fs::set_permissions(&p, fs::Permissions::from_mode(0o444)).map_err(file_err(f))?;
            }
            fs::rename(&staging, &dir).map_err(file_err("rename"))?;
            fs::File::open(&parent)
                .and_then(|d| d.sync_all())
                .map_err(file_err("directory"))?;
            Ok(Template {
                dir: dir.clone(),
                meta,
            })
        }
        .await;
        if made.is_err() {
            let _ = fs::remove_dir_all(&staging);
        }
        made
    }

    /// Every template under `root`, with those that fail to open reported as errors.
    /// Removes what a killed `template create` left: `.NAME.PID` staging
    /// directories (memory file included) whose process is gone.
    pub fn collect_garbage(root: &Path) {
        let Ok(entries) = fs::read_dir(templates(root)) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name
                .strip_prefix('.')
                .and_then(|n| n.rsplit_once('.'))
                .and_then(|(_, pid)| pid.parse::<u32>().ok());
            if let Some(pid) = pid {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    crate::share::remove_unmounted(&e.path());
                }
            }
        }
    }

    pub fn list(root: &Path) -> Vec<Result<Template, SandboxError>> {
        let mut names: Vec<String> = fs::read_dir(templates(root))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.retain(|n| !n.starts_with('.'));
        names.sort();
        names.iter().map(|n| Template::open(root, n)).collect()
    }

    /// Removes template `name`. Clones running from it keep running: they
    /// hold their own mapping of the memory file.
    pub fn remove(root: &Path, name: &str) -> Result<(), SandboxError> {
        valid_name(name)?;
        let dir = templates(root).join(name);
        if !dir.is_dir() {
            return Err(SandboxError::Invalid(format!(
                "template {name} does not exist"
            )));
        }
        fs::remove_dir_all(&dir).map_err(io_err(format!("removing template {name}")))
    }

    /// The sandbox settings a clone of this template must use.
    pub fn shape(&self) -> (u64, u32, GuestAssets, Accel) {
        (
            self.meta.memory_mib,
            self.meta.vcpus,
            GuestAssets {
                kernel: self.meta.kernel.clone(),
                initrd: self.meta.initrd.clone(),
            },
            self.accel(),
        )
    }
}

/// Lower-case hex SHA-256 of the file at `path` but its bytes `hole`
/// (a snapshot companion's guest pages, never read: a hole of zeros).
fn sha256_file(path: &Path, hole: std::ops::Range<u64>) -> io::Result<String> {
    use io::{Read, Seek};
    use sha2::Digest;
    let mut f = fs::File::open(path)?;
    let len = f.metadata()?.len();
    let mut h = sha2::Sha256::new();
    io::copy(&mut (&mut f).take(hole.start.min(len)), &mut h)?;
    f.seek(io::SeekFrom::Start(hole.end.min(len)))?;
    io::copy(&mut f, &mut h)?;
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(valid_name("py-3.12_small").is_ok());
        for bad in ["", ".hidden", "a/b", "../x", "sp ace"] {
            assert!(valid_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn open_reports_truncated_memory() {
        let root = std::env::temp_dir().join(format!("podvisor-tmpl-{}", std::process::id()));
        let dir = templates(&root).join("t");
        fs::create_dir_all(&dir).unwrap();
        let meta = TemplateMeta {
            name: "t".into(),
            memory_mib: 2,
            vcpus: 1,
            kernel: "/k".into(),
            initrd: "/i".into(),
            accel: "tcg".into(),
            created_unix: 0,
            nics: 0,
            nic_hubs: true,
            block_root: None,
            base_layers: Vec::new(),
            snapshot: false,
            memory_offset: 0,
            memory_bytes: 0,
            state_sha256: None,
        };
        fs::write(dir.join(META), serde_json::to_vec(&meta).unwrap()).unwrap();
        fs::write(dir.join(MEMORY), vec![0u8; 1024]).unwrap();
        fs::write(dir.join(STATE), b"x").unwrap();
        let err = Template::open(&root, "t").unwrap_err().to_string();
        assert!(err.contains("memory file has 1024 bytes"), "{err}");
        fs::write(dir.join(META), b"{not json").unwrap();
        assert!(Template::open(&root, "t")
            .unwrap_err()
            .to_string()
            .contains("template.json"));
        fs::remove_dir_all(&root).unwrap();
    }
}
