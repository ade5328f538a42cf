//! `podvisor check`: what this host offers, and whether podvisor can run here.

use std::path::PathBuf;

use clap::Args;
use hypervisor::qemu::QemuDriver;
use hypervisor::{Accel, HostVirt};
use sandbox::assets::GuestAssets;

#[derive(Args)]
pub struct CheckArgs {
    /// Check this guest kernel instead of the default one.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Check this initramfs instead of the default one.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// The accelerator that would be asked for.
    #[arg(long)]
    accel: Option<Accel>,
}

const DEVICES: [&str; 4] = [
    "virtio-serial-device",
    "virtserialport",
    "virtio-9p-device",
    "virtio-rng-device",
];

pub async fn run(args: CheckArgs) -> anyhow::Result<u8> {
    let mut missing: Vec<String> = Vec::new();
    let host = HostVirt::detect();
    println!("host virtualization: {host}");
    let accel = args.accel.unwrap_or_else(|| host.default_accel());
    println!("accelerator:         {accel}");
    if accel == Accel::Kvm && !matches!(host, HostVirt::Kvm { .. }) {
        missing.push(format!(
            "KVM (asked for with --accel kvm; host offers {host})"
        ));
    }
    match QemuDriver::locate() {
        Ok(q) => {
            println!(
                "qemu:                {} ({})",
                q.binary.display(),
                q.version().unwrap_or_else(|| "version unknown".into())
            );
            let devices = q.devices();
            for d in DEVICES {
                let ok = devices.contains(&format!("name \"{d}\""));
                println!("  device {d:<21} {}", if ok { "ok" } else { "MISSING" });
                if !ok {
                    missing.push(format!("QEMU device {d}"));
                }
            }
        }
        Err(e) => {
            println!("qemu:                MISSING ({e})");
            missing.push("qemu-system-x86_64".into());
        }
    }
    match GuestAssets::kernel(args.kernel.as_deref()) {
        Ok(k) => println!("guest kernel:        {}", k.display()),
        Err(e) => report_missing(&e.to_string(), "guest kernel", &mut missing),
    }
    match GuestAssets::initrd(args.initrd.as_deref()) {
        Ok(i) => println!("guest initramfs:     {}", i.display()),
        Err(e) => report_missing(&e.to_string(), "guest initramfs", &mut missing),
    }
    if missing.is_empty() {
        println!("ok: podvisor can run sandboxes here ({accel})");
        Ok(0)
    } else {
        eprintln!("podvisor check: missing: {}", missing.join("; "));
        Ok(1)
    }
}

fn report_missing(err: &str, what: &str, missing: &mut Vec<String>) {
    println!("{:<20} MISSING ({err})", format!("{what}:"));
    missing.push(what.to_string());
}
