//! podvisor: runs containers so that every sandbox is a micro-VM with its own
//! guest kernel. This binary parses the command line and maps errors to exit codes.

mod commands;
mod console;
mod go_duration;
mod hooks;
mod logging;
mod tty;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "podvisor",
    about = "Runs every container in its own micro-VM",
    disable_version_flag = true
)]
struct Cli {
    /// Print the version (as `version` does).
    #[arg(short = 'v', long, action = clap::ArgAction::Version)]
    version: Option<bool>,
    /// Directory for podvisor's state.
    #[arg(long, global = true, default_value = sandbox::state::DEFAULT_ROOT)]
    root: PathBuf,
    /// Also write log lines (and errors) to this file.
    #[arg(long, global = true)]
    log: Option<PathBuf>,
    /// Format of the --log file: text or json.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Log debug detail.
    #[arg(long, global = true)]
    debug: bool,
    /// Accepted for runc compatibility: cgroups are the guest's.
    #[arg(long, global = true)]
    systemd_cgroup: bool,
    /// Accepted for runc compatibility.
    #[arg(long, global = true, hide = true, num_args = 0..=1, default_missing_value = "true")]
    rootless: Option<String>,
    /// Accepted for runc compatibility (checkpointing is not supported).
    #[arg(long, global = true, hide = true)]
    criu: Option<String>,
    #[command(subcommand)]
    command: Command,
}

/// The global flags, as verbs need them and pass them to helper processes.
pub struct Globals {
    pub root: PathBuf,
    pub log: Option<PathBuf>,
    pub log_format: String,
    pub debug: bool,
}

impl Globals {
    pub fn to_args(&self) -> Vec<std::ffi::OsString> {
        let mut a: Vec<std::ffi::OsString> = vec!["--root".into(), self.root.clone().into()];
        if let Some(l) = &self.log {
            a.extend(["--log".into(), l.clone().into()]);
        }
        a.extend(["--log-format".into(), self.log_format.clone().into()]);
        if self.debug {
            a.push("--debug".into());
        }
        a
    }
}

#[derive(Subcommand)]
enum Command {
    /// Sandboxes: a micro-VM running one command.
    #[command(subcommand)]
    Sandbox(commands::SandboxCommand),
    /// VM templates: sandboxes cloned from a paused, booted VM.
    #[command(subcommand)]
    Template(commands::template::TemplateCommand),
    /// Show what this host offers and whether podvisor can run here.
    Check(commands::check::CheckArgs),
    /// Images: pull from registries, import archives, list, remove, prune.
    Image(commands::image::ImageArgs),
    /// podvisord's administration: tenants, keys, quotas, templates (its admin API).
    Service(commands::service::ServiceArgs),
    /// Pools of ready clones (the factory policy in /etc/podvisor/config.toml).
    #[command(subcommand)]
    Pool(commands::pool::PoolCommand),
    /// Create a container (boot its VM; the process waits for `start`).
    Create(commands::create::CreateArgs),
    /// Let a created container's process run.
    Start(commands::start::StartArgs),
    /// Create and start a container; wait for it unless --detach.
    Run(commands::create::RunArgs),
    /// Print a container's OCI state as JSON.
    State(commands::state::StateArgs),
    /// Send a signal to a container's process (or all its processes).
    Kill(commands::kill::KillArgs),
    /// Delete a container and everything it left.
    Delete(commands::delete::DeleteArgs),
    /// List containers.
    List(commands::state::ListArgs),
    /// Run a process in a running container.
    Exec(commands::exec::ExecArgs),
    /// List a container's processes (guest pids).
    Ps(commands::ps::PsArgs),
    /// Freeze every process of a container.
    Pause(commands::pause::PauseArgs),
    /// Thaw a paused container.
    Resume(commands::pause::PauseArgs),
    /// Change a container's resource limits.
    Update(commands::update::UpdateArgs),
    /// Print a container's stats (once with --stats).
    Events(commands::events::EventsArgs),
    /// Print what this runtime supports (runtime-spec features JSON).
    Features,
    /// Print podvisor's version, commit and the runtime-spec version.
    Version,
    /// Write a starting config.json.
    Spec(commands::features::SpecArgs),
    /// Not supported: a VM's process cannot be checkpointed with CRIU.
    Checkpoint(commands::features::UnsupportedArgs),
    /// Not supported (see checkpoint).
    Restore(commands::features::UnsupportedArgs),
    /// Internal: the process that stands for a container's process.
    #[command(hide = true)]
    Holder(commands::holder::HolderArgs),
    /// Internal: the process that stands for a detached exec.
    #[command(hide = true)]
    ExecHolder(commands::exec::ExecHolderArgs),
}

/// An error that carries the exit code the command should end with.
#[derive(Debug)]
pub struct Exit(pub u8);

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {}", self.0)
    }
}

impl std::error::Error for Exit {}

/// What `version` and `--version` print after "podvisor ", in runc's lines.
fn version_text() -> String {
    format!(
        "version {}\ncommit: {}\nspec: {}",
        env!("CARGO_PKG_VERSION"),
        env!("PODVISOR_COMMIT"),
        sandbox::container::OCI_VERSION
    )
}

/// Parses the command line; clap prints help, errors and the version.
fn parse_cli() -> Cli {
    // Built once per process: the leak is the life of the process anyway.
    let version: &'static str = Box::leak(version_text().into_boxed_str());
    let parsed = Cli::command()
        .version(version)
        .try_get_matches()
        .and_then(|mut m| Cli::from_arg_matches_mut(&mut m));
    parsed.unwrap_or_else(|e| usage_error(e))
}

/// Help and the version go out as clap prints them; bad usage is an error
/// as any other, as runc has it: also in --log (found in the raw
/// arguments, since they did not parse), exit status 1.
fn usage_error(e: clap::Error) -> ! {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit()
    }
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| {
        let eq = format!("{flag}=");
        args.iter()
            .enumerate()
            .find_map(|(i, a)| match a.strip_prefix(&eq) {
                Some(v) => Some(v.to_string()),
                None => (a == flag).then(|| args.get(i + 1).cloned()).flatten(),
            })
    };
    let file = value("--log").map(PathBuf::from);
    let format = value("--log-format").unwrap_or_else(|| "text".into());
    let _ = e.print();
    let msg = e.kind().as_str().unwrap_or("invalid usage");
    let detail = e.to_string();
    let first = detail.lines().next().unwrap_or(msg);
    logging::init(file.as_deref(), &format, false)
        .error_to_file(first.trim_start_matches("error: "));
    std::process::exit(1)
}

/// `--root` as an absolute path without symlinks: mount tables name it so,
/// and the unmount checks compare against them.
fn canonical_root(root: &std::path::Path) -> PathBuf {
    let _ = std::fs::create_dir_all(root);
    let _ = std::fs::set_permissions(
        root,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o700),
    );
    std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf())
}

fn main() -> ExitCode {
    // Run again as a VM's supervisor: serves it and never returns.
    sandbox::supervisor::serve_if_asked();
    let mut cli = parse_cli();
    cli.root = canonical_root(&cli.root);
    let log = logging::init(cli.log.as_deref(), &cli.log_format, cli.debug);
    let g = Globals {
        root: cli.root.clone(),
        log: cli.log.clone(),
        log_format: cli.log_format.clone(),
        debug: cli.debug,
    };
    // Holders set up namespaces while they have one thread: before any runtime.
    let command = match cli.command {
        Command::Holder(args) => commands::holder::main(args, &cli.root, &log),
        Command::ExecHolder(args) => commands::exec::holder_main(args, &cli.root, &log),
        Command::Pool(cmd) => {
            // The clones' shares get the callers' roots bound in: in a mount
            // namespace of the daemon's own, which dies with it.
            let ready = commands::pool::check(&cmd).and_then(|()| {
                if matches!(cmd, commands::pool::PoolCommand::Serve(_)) {
                    sandbox::share::private_mount_namespace()?;
                }
                Ok(())
            });
            if let Err(e) = ready {
                log.error(&format!("{e:#}"));
                return ExitCode::from(1);
            }
            Command::Pool(cmd)
        }
        other => other,
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            log.error(&format!("starting the async runtime: {e}"));
            return ExitCode::from(1);
        }
    };
    // The runtime runs on this thread: QEMU is spawned from it, so its
    // parent-death signal fires exactly when this process dies.
    let result = runtime.block_on(async {
        // Sandboxes whose owner died (SIGKILL) are cleaned up by the next call.
        sandbox::state::collect_garbage(&cli.root);
        sandbox::template::Template::collect_garbage(&cli.root);
        sandbox::pool::collect_garbage(&cli.root);
        let root = &g.root;
        match command {
            Command::Sandbox(cmd) => commands::sandbox(cmd, root).await,
            Command::Template(cmd) => commands::template::run(cmd, root).await,
            Command::Check(args) => commands::check::run(args).await,
            Command::Image(args) => commands::image::run(args, root).await,
            Command::Pool(cmd) => commands::pool::run(cmd, root).await,
            Command::Service(args) => commands::service::run(args).await,
            Command::Create(args) => commands::create::create(args, &g).await,
            Command::Start(args) => commands::start::run(args, root).await,
            Command::Run(args) => commands::create::run(args, &g).await,
            Command::State(args) => commands::state::state(args, root),
            Command::Kill(args) => commands::kill::run(args, root).await,
            Command::Delete(args) => commands::delete::run(args, root).await,
            Command::List(args) => commands::state::list(args, root),
            Command::Exec(args) => commands::exec::run(args, &g).await,
            Command::Ps(args) => commands::ps::run(args, root).await,
            Command::Pause(args) => commands::pause::pause(args, root).await,
            Command::Resume(args) => commands::pause::resume(args, root).await,
            Command::Update(args) => commands::update::run(args, root).await,
            Command::Events(args) => commands::events::run(args, root).await,
            Command::Features => commands::features::features(),
            Command::Version => {
                println!("podvisor {}", version_text());
                Ok(0)
            }
            Command::Spec(args) => commands::features::spec(args),
            Command::Checkpoint(_) => commands::features::unsupported("checkpoint"),
            Command::Restore(_) => commands::features::unsupported("restore"),
            Command::Holder(_) | Command::ExecHolder(_) => unreachable!("handled above"),
        }
    });
    // A read of a terminal stdin may still be blocked on a runtime thread;
    // it must not hold the exit back.
    runtime.shutdown_background();
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            if let Some(Exit(code)) = e.downcast_ref::<Exit>() {
                return ExitCode::from(*code);
            }
            let code = e
                .downcast_ref::<commands::CodedError>()
                .map(|c| c.code)
                .unwrap_or(1);
            log.error(&format!("{e:#}"));
            ExitCode::from(code)
        }
    }
}
