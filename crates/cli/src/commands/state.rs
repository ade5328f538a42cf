//! `state` (the OCI state JSON) and `list` (runc's table, ids or JSON).

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use clap::Args;
use sandbox::container::ContainerDir;
use serde::Serialize;

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

/// One container as runc's `list` shows it: its `containerState`, fields in
/// runc's order (which is not the state JSON's).
#[derive(Serialize)]
struct Listed {
    #[serde(rename = "ociVersion")]
    oci_version: String,
    id: String,
    pid: i32,
    status: String,
    bundle: PathBuf,
    rootfs: PathBuf,
    created: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
    owner: String,
}

/// The name of the user owning the container's directory, "#UID" without one.
fn owner(dir: &Path) -> String {
    let Ok(meta) = std::fs::metadata(dir) else {
        return String::new();
    };
    let uid = nix::unistd::Uid::from_raw(meta.uid());
    match nix::unistd::User::from_uid(uid) {
        Ok(Some(user)) => user.name,
        _ => format!("#{uid}"),
    }
}

pub fn list(args: ListArgs, root: &Path) -> anyhow::Result<u8> {
    let listed: Vec<Listed> = ContainerDir::list(root)
        .iter()
        .filter_map(|d| {
            let s = d.oci_state().ok()?;
            Some(Listed {
                oci_version: s.oci_version,
                id: s.id,
                pid: s.pid,
                status: s.status,
                bundle: s.bundle,
                rootfs: s.rootfs,
                created: s.created,
                annotations: s.annotations,
                owner: owner(&d.path),
            })
        })
        .collect();
    if args.quiet {
        listed.iter().for_each(|s| println!("{}", s.id));
    } else if args.format == "json" {
        // runc encodes a nil slice: `null` when there is no container.
        if listed.is_empty() {
            println!("null");
        } else {
            println!("{}", serde_json::to_string(&listed)?);
        }
    } else {
        let mut rows =
            vec![["ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER"].map(String::from)];
        rows.extend(listed.iter().map(|s| {
            [
                s.id.clone(),
                s.pid.to_string(),
                s.status.clone(),
                s.bundle.display().to_string(),
                s.created.clone(),
                s.owner.clone(),
            ]
        }));
        print!("{}", table(&rows));
    }
    Ok(0)
}

/// Columns as Go's `tabwriter.NewWriter(out, 12, 1, 3, ' ', 0)` sets runc's:
/// each cell but the last of a row padded with spaces to its column's widest
/// cell plus 3, and to at least 12.
fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count() + 3).max(12);
        }
    }
    let mut out = String::new();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == N {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}", width = widths[i]));
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_aligned_as_runcs_tabwriter() {
        let rows = [
            ["ID", "PID", "STATUS"].map(String::from),
            ["a-long-container-id", "42", "running"].map(String::from),
        ];
        assert_eq!(
            table(&rows),
            "ID                    PID         STATUS\n\
             a-long-container-id   42          running\n"
        );
    }
}
