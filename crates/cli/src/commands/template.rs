//! `podvisor template create|list|rm`: VM templates that sandboxes are
//! cloned from instead of booted.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};
use hypervisor::{Accel, HostVirt};
use sandbox::assets::GuestAssets;
use sandbox::template::Template;
use sandbox::SandboxConfig;

#[derive(Subcommand)]
pub enum TemplateCommand {
    /// Boot a VM to a ready agent, pause it and save it as a template.
    Create(CreateArgs),
    /// List templates: name, shape, size on disk, age.
    List,
    /// Remove a template (sandboxes cloned from it keep running).
    Rm {
        /// Template name.
        name: String,
    },
}

#[derive(Args)]
pub struct CreateArgs {
    /// Template name.
    #[arg(long)]
    name: String,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    memory: u64,
    /// Virtual CPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Guest kernel (vmlinux with a PVH entry).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Guest initramfs holding podvisor-agent as /init.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Accelerator: kvm or tcg.
    #[arg(long)]
    accel: Option<Accel>,
}

pub async fn run(cmd: TemplateCommand, root: &Path) -> anyhow::Result<u8> {
    match cmd {
        TemplateCommand::Create(args) => create(args, root).await,
        TemplateCommand::List => {
            println!(
                "{:<20} {:>8} {:>6} {:>10} {:>6} {:>10}",
                "NAME", "MEMORY", "VCPUS", "SIZE", "ACCEL", "AGE"
            );
            for t in Template::list(root) {
                match t {
                    Ok(t) => {
                        let age = SystemTime::now()
                            .duration_since(UNIX_EPOCH)
                            .map(|d| d.as_secs().saturating_sub(t.meta.created_unix))
                            .unwrap_or(0);
                        println!(
                            "{:<20} {:>6}Mi {:>6} {:>8}Mi {:>6} {:>9}s",
                            t.meta.name,
                            t.meta.memory_mib,
                            t.meta.vcpus,
                            t.size() >> 20,
                            t.meta.accel,
                            age
                        );
                    }
                    Err(e) => eprintln!("podvisor: {e}"),
                }
            }
            Ok(0)
        }
        TemplateCommand::Rm { name } => {
            Template::remove(root, &name)?;
            Ok(0)
        }
    }
}

async fn create(args: CreateArgs, root: &Path) -> anyhow::Result<u8> {
    let assets = GuestAssets::resolve(args.kernel.as_deref(), args.initrd.as_deref())?;
    let host = HostVirt::detect();
    let accel = args.accel.unwrap_or_else(|| host.default_accel());
    if accel == Accel::Kvm && !matches!(host, HostVirt::Kvm { .. }) {
        anyhow::bail!("--accel kvm asked for, but this host offers {host}");
    }
    let config = SandboxConfig {
        id: String::new(),
        root: root.to_path_buf(),
        memory_mib: args.memory,
        vcpus: args.vcpus,
        assets,
        accel,
        shares: Vec::new(),
        hostname: "podvisor".into(),
        boot_timeout: Duration::from_secs(if accel == Accel::Kvm { 10 } else { 60 }),
        template: None,
    };
    let t = Template::create(config, &args.name).await?;
    println!(
        "{} ({} MiB, {} vcpus, {accel})",
        t.meta.name, t.meta.memory_mib, t.meta.vcpus
    );
    Ok(0)
}
