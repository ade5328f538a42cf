//! `podvisor template create|list|rm`: VM templates that sandboxes are
//! cloned from instead of booted.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};
use sandbox::template::Template;
use sandbox::SandboxConfig;

use super::vm_args::{default_boot_timeout, VmArgs};

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
    #[command(flatten)]
    vm: VmArgs,
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
    let accel = args.vm.accel()?;
    let config = SandboxConfig {
        id: String::new(),
        root: root.to_path_buf(),
        memory_mib: args.vm.memory,
        vcpus: args.vm.vcpus,
        assets: args.vm.assets()?,
        accel,
        shares: Vec::new(),
        nics: Vec::new(),
        hostname: "podvisor".into(),
        boot_timeout: default_boot_timeout(accel),
        template: None,
    };
    let t = Template::create(config, &args.name).await?;
    println!(
        "{} ({} MiB, {} vcpus, {accel})",
        t.meta.name, t.meta.memory_mib, t.meta.vcpus
    );
    Ok(0)
}
