//! `state` (the OCI state JSON) and `list`.

use std::path::Path;

use clap::Args;
use sandbox::container::ContainerDir;

#[derive(Args)]
pub struct StateArgs {
    pub id: String,
}

#[derive(Args)]
pub struct ListArgs {
    /// table or json.
    #[arg(short, long, default_value = "table", value_parser = ["table", "json"])]
    pub format: String,
    /// Print only the ids.
    #[arg(short, long)]
    pub quiet: bool,
}

pub fn state(args: StateArgs, root: &Path) -> anyhow::Result<u8> {
    let dir = ContainerDir::open(root, &args.id)?;
    println!("{}", serde_json::to_string_pretty(&dir.oci_state()?)?);
    Ok(0)
}

pub fn list(args: ListArgs, root: &Path) -> anyhow::Result<u8> {
    let states: Vec<_> = ContainerDir::list(root)
        .iter()
        .filter_map(|d| d.oci_state().ok())
        .collect();
    if args.quiet {
        states.iter().for_each(|s| println!("{}", s.id));
    } else if args.format == "json" {
        println!("{}", serde_json::to_string(&states)?);
    } else {
        println!(
            "{:<24} {:<8} {:<10} {:<40} {:<31} OWNER",
            "ID", "PID", "STATUS", "BUNDLE", "CREATED"
        );
        for s in &states {
            println!(
                "{:<24} {:<8} {:<10} {:<40} {:<31} {}",
                s.id,
                s.pid,
                s.status,
                s.bundle.display(),
                s.created,
                if s.owner.is_empty() { "root" } else { &s.owner }
            );
        }
    }
    Ok(0)
}
