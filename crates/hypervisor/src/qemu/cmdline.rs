//! The QEMU microvm command line for a `VmConfig`.

use std::path::Path;

use crate::{Accel, MemoryBackend, VmConfig};

/// QEMU option values separate keys with commas; a comma in a value is doubled.
fn escape(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

/// The kernel command line: console on the serial port, reboot (and so exit,
/// with -no-reboot) at once on panic, then the caller's words.
pub fn kernel_cmdline(config: &VmConfig) -> String {
    let mut words = vec![
        "console=ttyS0".to_string(),
        "quiet".into(),
        "panic=-1".into(),
        "reboot=t".into(),
        "rdinit=/init".into(),
    ];
    words.extend(config.kernel_args.iter().cloned());
    words.join(" ")
}

pub fn args(config: &VmConfig, root: bool) -> Vec<String> {
    let mem = format!("{}M", config.memory_mib);
    let mut a: Vec<String> = Vec::new();
    let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
    push(&[
        "-M",
        "microvm,acpi=off,isa-serial=on,rtc=off,memory-backend=mem",
    ]);
    match config.accel {
        Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
        Accel::Tcg => push(&["-accel", "tcg", "-cpu", "max"]),
    }
    push(&["-m", &mem, "-smp", &config.vcpus.to_string()]);
    let backend = match &config.memory {
        MemoryBackend::Anonymous => format!("memory-backend-ram,id=mem,size={mem}"),
        MemoryBackend::File { path, shared } => format!(
            "memory-backend-file,id=mem,size={mem},mem-path={},share={}",
            escape(path),
            if *shared { "on" } else { "off" }
        ),
    };
    push(&["-object", &backend]);
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ]);
    push(&[
        "-kernel",
        &escape(&config.kernel),
        "-initrd",
        &escape(&config.initrd),
    ]);
    push(&["-append", &kernel_cmdline(config)]);
    push(&[
        "-chardev",
        &format!("file,id=console,path={}", escape(&config.console_log)),
    ]);
    push(&["-serial", "chardev:console"]);
    push(&["-device", "virtio-serial-device,max_ports=2"]);
    push(&[
        "-chardev",
        &format!(
            "socket,id=agent,path={},server=on,wait=off",
            escape(&config.agent_socket)
        ),
    ]);
    push(&[
        "-device",
        &format!(
            "virtserialport,chardev=agent,name={}",
            config.agent_port_name
        ),
    ]);
    // passthrough keeps the guest's file owners on the host; it needs root.
    let model = if root { "passthrough" } else { "none" };
    for (i, share) in config.shares.iter().enumerate() {
        let ro = if share.readonly { ",readonly=on" } else { "" };
        push(&[
            "-fsdev",
            &format!(
                "local,id=fs{i},path={},security_model={model}{ro}",
                escape(&share.path)
            ),
        ]);
        push(&[
            "-device",
            &format!("virtio-9p-device,fsdev=fs{i},mount_tag={}", share.tag),
        ]);
    }
    for (i, nic) in config.nics.iter().enumerate() {
        let tap = match (nic.fd, nic.tap.is_empty()) {
            (Some(fd), _) => Some(format!("fd={fd}")),
            (None, false) => Some(format!("ifname={},script=no,downscript=no", nic.tap)),
            (None, true) => None,
        };
        if config.nic_hubs {
            // The device's peer is a hub port; the tap joins the hub, now or
            // later (`QemuVm::connect_tap`).
            push(&["-netdev", &format!("hubport,id=net{i},hubid={i}")]);
            if let Some(tap) = tap {
                push(&["-netdev", &format!("tap,id=tap{i},{tap}")]);
                push(&[
                    "-netdev",
                    &format!("hubport,id=up{i},hubid={i},netdev=tap{i}"),
                ]);
            }
        } else {
            let tap = tap.unwrap_or_default();
            push(&["-netdev", &format!("tap,id=net{i},{tap}")]);
        }
        push(&[
            "-device",
            &format!("virtio-net-device,netdev=net{i},mac={}", nic.mac),
        ]);
    }
    push(&["-device", "virtio-rng-device"]);
    push(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", escape(&config.control_socket)),
    ]);
    if config.incoming {
        push(&["-incoming", "defer", "-S"]);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Share;
    use std::path::PathBuf;

    fn config() -> VmConfig {
        VmConfig {
            id: "t".into(),
            memory_mib: 256,
            vcpus: 2,
            kernel: "/k/vmlinux".into(),
            initrd: "/k/initrd".into(),
            kernel_args: vec!["podvisor.hostname=box".into()],
            shares: vec![Share {
                tag: "rootfs".into(),
                path: PathBuf::from("/data/a,b"),
                readonly: false,
            }],
            nics: vec![],
            memory: MemoryBackend::Anonymous,
            accel: Accel::Tcg,
            agent_socket: "/run/s/agent.sock".into(),
            agent_port_name: "io.podvisor.agent.0".into(),
            control_socket: "/run/s/qmp.sock".into(),
            console_log: "/run/s/console.log".into(),
            vmm_log: "/run/s/qemu.log".into(),
            incoming: false,
            nic_hubs: false,
        }
    }

    #[test]
    fn builds_microvm_line() {
        let a = args(&config(), true);
        let line = a.join(" ");
        assert!(line.contains("-accel tcg -cpu max"));
        assert!(line.contains("memory-backend-ram,id=mem,size=256M"));
        assert!(line.contains("path=/data/a,,b,security_model=passthrough"));
        assert!(line.contains("mount_tag=rootfs"));
        assert!(line.contains("name=io.podvisor.agent.0"));
        let append = &a[a.iter().position(|x| x == "-append").unwrap() + 1];
        assert!(append.ends_with("podvisor.hostname=box"));
    }

    #[test]
    fn file_backed_memory_for_templates() {
        let mut c = config();
        c.memory = MemoryBackend::File {
            path: "/dev/shm/t".into(),
            shared: true,
        };
        c.accel = Accel::Kvm;
        let line = args(&c, false).join(" ");
        assert!(line.contains("memory-backend-file,id=mem,size=256M,mem-path=/dev/shm/t,share=on"));
        assert!(line.contains("-accel kvm -cpu host"));
        assert!(!line.contains("-incoming"));
        c.incoming = true;
        assert!(args(&c, false).join(" ").ends_with("-incoming defer -S"));
        assert!(line.contains("security_model=none"));
    }

    #[test]
    fn nics_direct_or_behind_hubs() {
        let mut c = config();
        c.nics = vec![
            crate::Nic {
                tap: "pv1t0".into(),
                mac: "02:00:00:00:00:01".into(),
                fd: Some(7),
            },
            crate::Nic {
                tap: String::new(),
                mac: "02:00:00:00:00:02".into(),
                fd: None,
            },
        ];
        let line = args(&c, false).join(" ");
        assert!(line.contains(
            "-netdev tap,id=net0,fd=7 -device virtio-net-device,netdev=net0,mac=02:00:00:00:00:01"
        ));
        c.nic_hubs = true;
        let line = args(&c, false).join(" ");
        assert!(line.contains("-netdev hubport,id=net0,hubid=0 -netdev tap,id=tap0,fd=7 -netdev hubport,id=up0,hubid=0,netdev=tap0 -device virtio-net-device,netdev=net0"));
        // No tap yet: the hub waits for one.
        assert!(line.contains("-netdev hubport,id=net1,hubid=1 -device virtio-net-device,netdev=net1,mac=02:00:00:00:00:02"));
    }
}
