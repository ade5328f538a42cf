//! podvisor-agent: the guest's PID 1. It mounts the guest's filesystems, reaps
//! every process and serves the host's gRPC calls over a virtio-serial port.

mod caps;
mod cgroup;
mod channel;
mod container;
mod files;
mod init;
mod mounts;
mod network;
mod ports;
mod reaper;
mod service;
mod spawn;
mod stdio;

use std::time::Duration;

use agent_proto::agent_server::AgentServer;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;

fn main() {
    let pid1 = std::process::id() == 1;
    if pid1 {
        if let Err(e) = init::leave_initramfs() {
            eprintln!("podvisor-agent: leaving the initramfs: {e}");
        }
        init::mount_guest_filesystems();
        if let Some(name) = init::cmdline_value(agent_proto::cmdline::HOSTNAME) {
            let _ = nix::unistd::sethostname(&name);
        }
        if let Err(e) = cgroup::enable_controllers() {
            eprintln!("podvisor-agent: enabling cgroup controllers: {e}");
        }
        // Containers share the VM's network: their servers and clients
        // use 127.0.0.1 whether or not the VM has a NIC.
        if let Err(e) = network::loopback_up() {
            eprintln!("podvisor-agent: bringing lo up: {e}");
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("podvisor-agent: starting the async runtime");
    let result = runtime.block_on(serve());
    if let Err(e) = result {
        eprintln!("podvisor-agent: {e}");
    }
    if pid1 {
        // PID 1 must not exit: power off instead.
        nix::unistd::sync();
        let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    }
    std::process::exit(1);
}

async fn serve() -> Result<(), Box<dyn std::error::Error>> {
    let reaper = reaper::Reaper::default();
    tokio::spawn(reaper::run(reaper.clone()));

    let port = channel::find_port(agent_proto::AGENT_PORT_NAME, Duration::from_secs(10))?;
    let (tx, rx) = mpsc::unbounded_channel();
    channel::serve_port(port, tx)?;
    let incoming = UnboundedReceiverStream::new(rx).map(|s| {
        s.set_nonblocking(true)?;
        tokio::net::UnixStream::from_std(s)
    });
    let service = service::AgentService::new(reaper, init::uptime_ms());
    tonic::transport::Server::builder()
        .add_service(AgentServer::new(service))
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}
