//! containerd-shim-podvisor-v2: containerd's task API v2 for podvisor. One
//! shim process and one micro-VM per pod: the CRI sandbox ("pause")
//! container is the VM itself, the pod's containers run inside it, each with
//! its own root and mount namespace, sharing the pod's network, IPC and UTS.
//! Outside Kubernetes (`ctr run --runtime io.containerd.podvisor.v2`) a
//! container is a pod of its own.
//!
//! The long-running shim lives in the pod's network namespace (taps for the
//! VM are made there) and in a mount namespace of its own (container roots
//! and the VM's share are mounted there), so that when it dies, however it
//! dies, its mounts go with it; QEMU dies with it (PDEATHSIG).

mod io;
mod pod;
mod service;

use containerd_shim::asynchronous::run;
use containerd_shim::Config;

pub const RUNTIME_ID: &str = "io.containerd.podvisor.v2";

/// The action containerd asked for: "start", "delete", or "" for the
/// long-running shim. Flags are Go-style (`-id X`, `-debug`).
fn action(args: &[String]) -> &str {
    const WITH_VALUE: [&str; 6] = [
        "namespace",
        "id",
        "socket",
        "bundle",
        "address",
        "publish-binary",
    ];
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        match a.strip_prefix("--").or_else(|| a.strip_prefix('-')) {
            Some(flag) if !flag.contains('=') && WITH_VALUE.contains(&flag) => {
                it.next();
            }
            Some(_) => {}
            None => return a,
        }
    }
    ""
}

fn main() {
    // Run again as a VM's supervisor: serves it and never returns.
    sandbox::supervisor::serve_if_asked();
    let args: Vec<String> = std::env::args().collect();
    let serving = action(&args).is_empty() && args.iter().any(|a| a.ends_with("socket"));
    if serving {
        // While this process has one thread: namespaces. containerd starts
        // us in the bundle of the pod's first container (its config.json
        // names the pod's network namespace). A failure here is reported by
        // `create`, which is where containerd can show it.
        service::set_startup_error(prepare().err());
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    runtime.block_on(run::<service::Service>(
        RUNTIME_ID,
        Some(Config {
            // We wait for our own children (QEMU, ip, tc): a shim-wide
            // reaper would steal their exit statuses.
            no_reaper: true,
            no_sub_reaper: true,
            ..Default::default()
        }),
    ));
}

fn prepare() -> anyhow::Result<()> {
    let bundle = std::env::current_dir()?;
    if bundle.join("config.json").exists() {
        let spec = sandbox::oci::Spec::load(&bundle)?;
        sandbox::network::enter_namespace(&spec)?;
    }
    sandbox::share::private_mount_namespace()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::action;

    fn a(args: &[&str]) -> String {
        let v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        action(&v).to_string()
    }

    #[test]
    fn finds_the_action_after_go_style_flags() {
        assert_eq!(
            a(&["shim", "-namespace", "k8s.io", "-id", "x", "start"]),
            "start"
        );
        assert_eq!(a(&["shim", "-id", "start", "-debug", "delete"]), "delete");
        assert_eq!(a(&["shim", "-id=x", "-socket", "unix:///s"]), "");
        assert_eq!(a(&["shim", "-info"]), "");
    }
}
