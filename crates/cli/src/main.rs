//! podvisor: runs containers so that every sandbox is a micro-VM with its own
//! guest kernel. This binary parses the command line and maps errors to exit codes.

mod commands;
mod logging;
mod tty;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "podvisor",
    version,
    about = "Runs every container in its own micro-VM"
)]
struct Cli {
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
    #[command(subcommand)]
    command: Command,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log = logging::init(cli.log.as_deref(), &cli.log_format, cli.debug);
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
        match cli.command {
            Command::Sandbox(cmd) => commands::sandbox(cmd, &cli.root).await,
            Command::Template(cmd) => commands::template::run(cmd, &cli.root).await,
            Command::Check(args) => commands::check::run(args).await,
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
