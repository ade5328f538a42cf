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
    /// Network devices in the template's VM. Pods and OCI containers with
    /// a network (one Ethernet interface: 1) clone only a template with as
    /// many; each clone gets its own tap devices and MACs.
    #[arg(long, default_value_t = 0)]
    nics: usize,
    /// Give the template an image's disks (pulled first if it is not
    /// stored): its clones' containers run from the image, each on a
    /// writable layer of its own (`sandbox run --template NAME`).
    #[arg(long)]
    image: Option<String>,
    /// Size of the writable disk, in MiB (with --image).
    #[arg(long, default_value_t = 2048, value_name = "MIB", requires = "image")]
    disk_size: u64,
    /// The image store's directory (see `podvisor image --help`).
    #[arg(long)]
    image_root: Option<std::path::PathBuf>,
    /// podvisor's config file (its [images] table).
    #[arg(long, env = "PODVISOR_CONFIG", default_value = sandbox::pool::DEFAULT_CONFIG)]
    config: std::path::PathBuf,
    /// Verify the registry's TLS certificate when --image is pulled.
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true",
          action = clap::ArgAction::Set)]
    tls_verify: bool,
    #[command(flatten)]
    vm: VmArgs,
}

pub async fn run(cmd: TemplateCommand, root: &Path) -> anyhow::Result<u8> {
    match cmd {
        TemplateCommand::Create(args) => create(args, root).await,
        TemplateCommand::List => {
            println!(
                "{:<20} {:>8} {:>6} {:>5} {:>10} {:>6} {:>10}",
                "NAME", "MEMORY", "VCPUS", "NICS", "SIZE", "ACCEL", "AGE"
            );
            for t in Template::list(root) {
                match t {
                    Ok(t) => {
                        let age = SystemTime::now()
                            .duration_since(UNIX_EPOCH)
                            .map(|d| d.as_secs().saturating_sub(t.meta.created_unix))
                            .unwrap_or(0);
                        println!(
                            "{:<20} {:>6}Mi {:>6} {:>5} {:>8}Mi {:>6} {:>9}s",
                            t.meta.name,
                            t.meta.memory_mib,
                            t.meta.vcpus,
                            t.meta.nics,
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
    if args.nics > 8 {
        anyhow::bail!("--nics {}: at most 8", args.nics);
    }
    // Taps of our own, gone when we exit: only the device model is saved.
    let (nics, _taps) = sandbox::network::scratch_nics(args.nics)?;
    let block_root = match &args.image {
        Some(reference) => {
            let source = super::image::ImageSource {
                image_root: args.image_root.as_deref(),
                config: &args.config,
                tls_verify: args.tls_verify,
            };
            Some(source.block_root(reference, args.disk_size).await?.0)
        }
        None => None,
    };
    let config = SandboxConfig {
        cpu_millis: None,
        cgroup: None,
        id: String::new(),
        root: root.to_path_buf(),
        memory_mib: args.vm.memory,
        vcpus: args.vm.vcpus,
        assets: args.vm.assets()?,
        accel,
        shares: Vec::new(),
        nics,
        hostname: "podvisor".into(),
        boot_timeout: default_boot_timeout(accel),
        template: None,
        block_root,
    };
    let t = Template::create(config, &args.name).await?;
    println!(
        "{} ({} MiB, {} vcpus, {} nics, {accel})",
        t.meta.name, t.meta.memory_mib, t.meta.vcpus, t.meta.nics
    );
    Ok(0)
}
