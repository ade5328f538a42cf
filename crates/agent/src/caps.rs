//! Capabilities of a container process (OCI `process.capabilities`): names
//! turned into masks before the fork, applied by the child around setuid.

use nix::errno::Errno;

const NAMES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CapSets {
    pub bounding: u64,
    pub effective: u64,
    pub inheritable: u64,
    pub permitted: u64,
    pub ambient: u64,
}

fn mask(names: &[String]) -> Result<u64, String> {
    names.iter().try_fold(0u64, |m, n| {
        let upper = n.to_ascii_uppercase();
        let full = if upper.starts_with("CAP_") {
            upper
        } else {
            format!("CAP_{upper}")
        };
        NAMES
            .iter()
            .position(|c| *c == full)
            .map(|bit| m | (1 << bit))
            .ok_or_else(|| format!("unknown capability {n:?}"))
    })
}

impl CapSets {
    pub fn from_proto(c: &agent_proto::Capabilities) -> Result<CapSets, String> {
        Ok(CapSets {
            bounding: mask(&c.bounding)?,
            effective: mask(&c.effective)?,
            inheritable: mask(&c.inheritable)?,
            permitted: mask(&c.permitted)?,
            ambient: mask(&c.ambient)?,
        })
    }

    /// Drops what is not in the bounding set (needs CAP_SETPCAP: before setuid).
    pub fn drop_bounding(&self) -> nix::Result<()> {
        for bit in 0..64u64 {
            if self.bounding & (1 << bit) != 0 {
                continue;
            }
            // SAFETY: prctl with integer arguments only.
            let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, bit, 0, 0, 0) };
            if rc < 0 {
                match Errno::last() {
                    // Past the kernel's last capability.
                    Errno::EINVAL => break,
                    e => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// Keeps the permitted set across the coming setuid away from root.
    pub fn keep_across_setuid(&self) -> nix::Result<()> {
        // SAFETY: prctl with integer arguments only.
        let rc = unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) };
        Errno::result(rc).map(drop)
    }

    /// Sets effective, permitted and inheritable, then raises what it can of
    /// the ambient set.
    pub fn apply(&self) -> nix::Result<()> {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        let header = Header {
            version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
            pid: 0,
        };
        let word = |m: u64, i: u32| (m >> (32 * i)) as u32;
        let data = [0, 1].map(|i| Data {
            effective: word(self.effective, i),
            permitted: word(self.permitted, i),
            inheritable: word(self.inheritable, i),
        });
        // SAFETY: capset reads one header and two data structs laid out as
        // the kernel's __user_cap_header_struct / __user_cap_data_struct.
        let rc = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
        Errno::result(rc)?;
        for bit in 0..64u64 {
            if self.ambient & (1 << bit) == 0 {
                continue;
            }
            // A capability not also inheritable cannot be ambient; runc
            // skips those too.
            // SAFETY: prctl with integer arguments only.
            let _ =
                unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_RAISE, bit, 0, 0) };
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_bits() {
        let c = agent_proto::Capabilities {
            bounding: vec!["CAP_CHOWN".into(), "net_bind_service".into()],
            ..Default::default()
        };
        let sets = CapSets::from_proto(&c).unwrap();
        assert_eq!(sets.bounding, 1 | (1 << 10));
        let bad = agent_proto::Capabilities {
            effective: vec!["CAP_FLY".into()],
            ..Default::default()
        };
        assert!(CapSets::from_proto(&bad).unwrap_err().contains("CAP_FLY"));
    }
}
