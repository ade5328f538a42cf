//! What PID 1 does before serving: the guest's own filesystems, cgroup
//! controllers and hostname, from the kernel command line.

use std::ffi::CStr;
use std::fs;

use nix::mount::{mount, MsFlags};

fn mnt(src: &CStr, target: &str, fstype: &CStr, flags: MsFlags, data: Option<&CStr>) {
    let _ = fs::create_dir_all(target);
    if let Err(e) = mount(Some(src), target, Some(fstype), flags, data) {
        if e != nix::errno::Errno::EBUSY {
            eprintln!("podvisor-agent: mount {target}: {e}");
        }
    }
}

/// Moves the agent's root from the initramfs onto a fresh tmpfs, as
/// switch_root does: pivot_root(2), which containers need, refuses to work
/// while the root is the initramfs.
pub fn leave_initramfs() -> nix::Result<()> {
    let new = "/newroot";
    fs::create_dir_all(new).map_err(|_| nix::errno::Errno::last())?;
    mount(
        Some("tmpfs"),
        new,
        Some("tmpfs"),
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )?;
    // The running binary stays mapped; its file in the initramfs is not
    // needed any more and would hold memory for nothing.
    let _ = fs::remove_file("/init");
    nix::unistd::chdir(new)?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)?;
    nix::unistd::chroot(".")?;
    nix::unistd::chdir("/")
}

/// Mounts /proc, /sys, /dev, /run, /tmp and cgroup2.
pub fn mount_guest_filesystems() {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mnt(c"proc", "/proc", c"proc", nosuid, None);
    mnt(c"sysfs", "/sys", c"sysfs", nosuid, None);
    mnt(
        c"devtmpfs",
        "/dev",
        c"devtmpfs",
        MsFlags::MS_NOSUID,
        Some(c"mode=0755"),
    );
    mnt(
        c"devpts",
        "/dev/pts",
        c"devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some(c"mode=0620,ptmxmode=0666,gid=5"),
    );
    mnt(c"shm", "/dev/shm", c"tmpfs", nosuid, Some(c"mode=1777"));
    mnt(
        c"tmpfs",
        "/run",
        c"tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(c"mode=0755"),
    );
    mnt(
        c"tmpfs",
        "/tmp",
        c"tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(c"mode=1777"),
    );
    mnt(c"cgroup2", crate::cgroup::ROOT, c"cgroup2", nosuid, None);
}

/// The value of `key=value` on the kernel command line.
pub fn cmdline_value(key: &str) -> Option<String> {
    let cmdline = fs::read_to_string("/proc/cmdline").ok()?;
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('=').map(str::to_string))
}

/// Milliseconds since the guest booted.
pub fn uptime_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
        .unwrap_or(0)
}

/// Steps the guest's wall clock to the host's when they differ by more than
/// a second (a microvm has no RTC: the guest boots in 1970).
pub fn set_clock(host_unix_ns: u64) {
    use nix::time::{clock_gettime, clock_settime, ClockId};
    if host_unix_ns == 0 {
        return;
    }
    let now = clock_gettime(ClockId::CLOCK_REALTIME)
        .map(|t| t.tv_sec() as i128 * 1_000_000_000 + t.tv_nsec() as i128)
        .unwrap_or(0);
    if (now - host_unix_ns as i128).abs() > 1_000_000_000 {
        let ts = nix::sys::time::TimeSpec::new(
            (host_unix_ns / 1_000_000_000) as i64,
            (host_unix_ns % 1_000_000_000) as i64,
        );
        if let Err(e) = clock_settime(ClockId::CLOCK_REALTIME, ts) {
            eprintln!("podvisor-agent: setting the clock: {e}");
        }
    }
}

/// Mixes `entropy` into the kernel's pool, credits it, and forces the CRNG to
/// reseed, so a clone's random numbers part from its template's at once.
pub fn reseed_rng(entropy: &[u8]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
    let random = fs::OpenOptions::new().write(true).open("/dev/random")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + entropy.len());
    info.extend_from_slice(&((entropy.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(entropy.len() as i32).to_ne_bytes());
    info.extend_from_slice(entropy);
    // SAFETY: RNDADDENTROPY reads a rand_pool_info whose buf_size bytes
    // follow its header; `info` holds exactly that.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
