//! The QEMU microvm command line for a `VmConfig`.

use std::path::Path;

use crate::jail::Paths;
use crate::{Accel, MemoryBackend, VmConfig};

/// The guest console's socket, in the VMM's socket directory: we read it
/// into a capped log (QEMU waits for that reader before it starts).
pub const CONSOLE_SOCKET: &str = "console.sock";

/// QEMU's own seccomp filter: no obsolete calls, no setuid, no fork or exec
/// (migration goes through fds we pass), no scheduler or priority changes.
const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// QEMU option values separate keys with commas; a comma in a value is doubled.
fn escape(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

/// Whether `word` is one kernel command-line token: the kernel splits at
/// spaces and treats quotes specially, so none of those, nor control bytes.
pub fn valid_kernel_arg(word: &str) -> bool {
    !word.is_empty()
        && word.len() <= 256
        && word
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\'')
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

/// The command line of `config`, naming files by `paths` (inside the jail
/// when there is one).
pub fn args(config: &VmConfig, paths: &Paths, root: bool) -> Vec<String> {
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
        MemoryBackend::File {
            path,
            shared,
            offset,
        } => format!(
            "memory-backend-file,id=mem,size={mem},mem-path={},share={}{}{}",
            escape(paths.memory.as_deref().unwrap_or(path)),
            if *shared { "on" } else { "off" },
            match offset {
                0 => String::new(),
                o => format!(",offset={o}"),
            },
            // QEMU 8.2: opened O_RDONLY, mapped copy-on-write.
            if paths.memory_readonly {
                ",readonly=on,rom=off"
            } else {
                ""
            }
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
    // The host path of the socket directory, for `ps` and the garbage
    // collector to tell whose VMM this is (the paths below may be the jail's).
    push(&[
        "-name",
        &format!("guest=podvisor:{}", escape(&crate::jail::vm_dir(config))),
    ]);
    if config.jail.is_some() {
        push(&["-sandbox", SANDBOX]);
    }
    push(&[
        "-kernel",
        &escape(&paths.kernel),
        "-initrd",
        &escape(&paths.initrd),
    ]);
    push(&["-append", &kernel_cmdline(config)]);
    let sock = |name: &str| escape(&paths.vm_dir.join(name));
    push(&[
        "-chardev",
        &format!(
            "socket,id=console,path={},server=on,wait=on",
            sock(CONSOLE_SOCKET)
        ),
    ]);
    push(&["-serial", "chardev:console"]);
    push(&["-device", "virtio-serial-device,max_ports=2"]);
    push(&[
        "-chardev",
        &format!(
            "socket,id=agent,path={},server=on,wait=off",
            sock(&file_name(&config.agent_socket))
        ),
    ]);
    push(&[
        "-device",
        &format!(
            "virtserialport,chardev=agent,name={}",
            config.agent_port_name
        ),
    ]);
    // passthrough keeps the guest's file owners on the host; it needs root
    // or, in the jail, CAP_CHOWN, CAP_FOWNER and CAP_DAC_OVERRIDE. Device
    // nodes and set-id files it cannot make there (no CAP_MKNOD, seccomp).
    let model = if root { "passthrough" } else { "none" };
    for (i, share) in config.shares.iter().enumerate() {
        let ro = if share.readonly { ",readonly=on" } else { "" };
        let path = paths.shares.get(i).unwrap_or(&share.path);
        push(&[
            "-fsdev",
            &format!(
                "local,id=fs{i},path={},security_model={model},multidevs=remap{ro}",
                escape(path)
            ),
        ]);
        push(&[
            "-device",
            &format!("virtio-9p-device,fsdev=fs{i},mount_tag={}", share.tag),
        ]);
    }
    for (i, disk) in config.disks.iter().enumerate() {
        let files = paths.disks.get(i).unwrap_or(&disk.layers);
        let top = files.len().saturating_sub(1);
        for (j, file) in files.iter().enumerate() {
            let ro = if j < top || disk.readonly {
                "on"
            } else {
                "off"
            };
            push(&[
                "-blockdev",
                &format!(
                    "driver=file,node-name=d{i}f{j},filename={},read-only={ro}",
                    escape(file)
                ),
            ]);
            let format = match j {
                0 => format!("driver=raw,file=d{i}f0"),
                _ => format!("driver=qcow2,file=d{i}f{j},backing=d{i}l{}", j - 1),
            };
            let discard = if ro == "off" { ",discard=unmap" } else { "" };
            push(&[
                "-blockdev",
                &format!("{format},node-name=d{i}l{j},read-only={ro}{discard}"),
            ]);
        }
        push(&[
            "-device",
            &format!("virtio-blk-device,drive=d{i}l{top},serial={}", disk.serial),
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
        &format!(
            "unix:{},server=on,wait=off",
            sock(&file_name(&config.control_socket))
        ),
    ]);
    if config.incoming {
        push(&["-incoming", "defer", "-S"]);
    }
    a
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
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
            disks: vec![],
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
            jail: None,
        }
    }

    fn qemu_args(c: &VmConfig) -> Vec<String> {
        args(c, &Paths::host(Path::new("/usr/bin/qemu"), c), true)
    }

    #[test]
    fn kernel_args_are_single_tokens() {
        assert!(valid_kernel_arg("podvisor.hostname=box"));
        for bad in ["", "a b", "x\trdinit=/bin/sh", "\"q", "a\nb"] {
            assert!(!valid_kernel_arg(bad), "{bad:?}");
        }
    }

    #[test]
    fn builds_microvm_line() {
        let a = qemu_args(&config());
        let line = a.join(" ");
        assert!(line.contains("-accel tcg -cpu max"));
        assert!(line.contains("memory-backend-ram,id=mem,size=256M"));
        assert!(line.contains("path=/data/a,,b,security_model=passthrough,multidevs=remap"));
        assert!(line.contains("socket,id=console,path=/run/s/console.sock,server=on,wait=on"));
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
            offset: 0,
        };
        c.accel = Accel::Kvm;
        let line = qemu_args(&c).join(" ");
        assert!(line.contains("memory-backend-file,id=mem,size=256M,mem-path=/dev/shm/t,share=on"));
        assert!(line.contains("-accel kvm -cpu host"));
        assert!(!line.contains("-incoming"));
        c.incoming = true;
        assert!(qemu_args(&c).join(" ").ends_with("-incoming defer -S"));
        c.memory = MemoryBackend::File {
            path: "/s/memory".into(),
            shared: false,
            offset: 1 << 20,
        };
        assert!(qemu_args(&c)
            .join(" ")
            .contains("mem-path=/s/memory,share=off,offset=1048576"));
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
        let line = qemu_args(&c).join(" ");
        assert!(line.contains(
            "-netdev tap,id=net0,fd=7 -device virtio-net-device,netdev=net0,mac=02:00:00:00:00:01"
        ));
        c.nic_hubs = true;
        let line = qemu_args(&c).join(" ");
        assert!(line.contains("-netdev hubport,id=net0,hubid=0 -netdev tap,id=tap0,fd=7 -netdev hubport,id=up0,hubid=0,netdev=tap0 -device virtio-net-device,netdev=net0"));
        // No tap yet: the hub waits for one.
        assert!(line.contains("-netdev hubport,id=net1,hubid=1 -device virtio-net-device,netdev=net1,mac=02:00:00:00:00:02"));
    }
}
