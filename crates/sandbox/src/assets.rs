//! Guest assets: the kernel and the initramfs holding the agent. Found from
//! flags, then environment, then beside the podvisor binary, then system dirs.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum AssetsError {
    #[error("guest kernel {0} not found (build it with `make kernel`, or pass --kernel)")]
    KernelMissing(PathBuf),
    #[error("guest initramfs {0} not found (build it with `make build`, or pass --initrd)")]
    InitrdMissing(PathBuf),
    #[error("no guest kernel found: looked in {0} (build it with `make build`, or pass --kernel / set PODVISOR_KERNEL)")]
    KernelNotFound(String),
    #[error("no guest initramfs found: looked in {0} (build it with `make build`, or pass --initrd / set PODVISOR_INITRD)")]
    InitrdNotFound(String),
}

pub const KERNEL_FILE: &str = "vmlinux";
pub const INITRD_FILE: &str = "podvisor-initrd.cpio";

#[derive(Clone, Debug)]
pub struct GuestAssets {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// Directories searched for assets, in order.
pub fn search_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        if let Some(d) = exe.parent() {
            dirs.push(d.to_path_buf());
        }
    }
    dirs.push("/usr/local/lib/podvisor".into());
    dirs.push("/usr/lib/podvisor".into());
    dirs
}

fn find(
    explicit: Option<&Path>,
    env: &str,
    file: &str,
) -> Result<PathBuf, (Option<PathBuf>, String)> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err((Some(p.to_path_buf()), String::new()))
        };
    }
    if let Some(p) = std::env::var_os(env) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err((Some(p), String::new()))
        };
    }
    let dirs = search_dirs();
    dirs.iter()
        .map(|d| d.join(file))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            (
                None,
                dirs.iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            )
        })
}

impl GuestAssets {
    pub fn resolve(kernel: Option<&Path>, initrd: Option<&Path>) -> Result<Self, AssetsError> {
        Ok(GuestAssets {
            kernel: Self::kernel(kernel)?,
            initrd: Self::initrd(initrd)?,
        })
    }

    pub fn kernel(explicit: Option<&Path>) -> Result<PathBuf, AssetsError> {
        find(explicit, "PODVISOR_KERNEL", KERNEL_FILE).map_err(|(p, looked)| match p {
            Some(p) => AssetsError::KernelMissing(p),
            None => AssetsError::KernelNotFound(looked),
        })
    }

    pub fn initrd(explicit: Option<&Path>) -> Result<PathBuf, AssetsError> {
        find(explicit, "PODVISOR_INITRD", INITRD_FILE).map_err(|(p, looked)| match p {
            Some(p) => AssetsError::InitrdMissing(p),
            None => AssetsError::InitrdNotFound(looked),
        })
    }
}
