//! The VM-shape flags that `sandbox run` and `template create` share, and
//! what follows from them: guest assets, the accelerator, the boot timeout.

use std::path::PathBuf;

use clap::Args;
use hypervisor::Accel;
use sandbox::assets::GuestAssets;

#[derive(Args)]
pub struct VmArgs {
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    pub memory: u64,
    /// Virtual CPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Guest kernel (vmlinux with a PVH entry); default: the one built by `make`.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Guest initramfs holding podvisor-agent as /init.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Accelerator: kvm or tcg (default: kvm where the host has VMX/SVM).
    #[arg(long)]
    pub accel: Option<Accel>,
}

impl VmArgs {
    pub fn assets(&self) -> anyhow::Result<GuestAssets> {
        Ok(GuestAssets::resolve(
            self.kernel.as_deref(),
            self.initrd.as_deref(),
        )?)
    }

    /// `--accel`, else what the host offers; KVM only where the host has it.
    pub fn accel(&self) -> anyhow::Result<Accel> {
        checked_accel(self.accel)
    }
}

pub fn checked_accel(asked: Option<Accel>) -> anyhow::Result<Accel> {
    Ok(sandbox::checked_accel(asked)?)
}

pub use sandbox::default_boot_timeout;
