//! Records the commit podvisor is built from, for `podvisor version` (as runc
//! prints its `commit:` line). PODVISOR_COMMIT overrides it (builds from a
//! tarball); without git it is "unknown".

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    (out.status.success() && !text.trim().is_empty()).then(|| text.trim().to_string())
}

fn main() {
    println!("cargo:rerun-if-env-changed=PODVISOR_COMMIT");
    // A new commit moves HEAD or the branch it names: rebuild then only.
    // (A missing file would make cargo rerun this on every build.)
    let branch = git(&["symbolic-ref", "-q", "HEAD"]);
    let watched = ["HEAD", "packed-refs"]
        .into_iter()
        .chain(branch.as_deref())
        .filter_map(|name| git(&["rev-parse", "--git-path", name]))
        .filter(|path| std::path::Path::new(path).exists());
    for path in watched {
        println!("cargo:rerun-if-changed={path}");
    }
    let commit = std::env::var("PODVISOR_COMMIT")
        .ok()
        .or_else(|| git(&["describe", "--always", "--tags", "--long", "--abbrev=12"]))
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=PODVISOR_COMMIT={commit}");
}
