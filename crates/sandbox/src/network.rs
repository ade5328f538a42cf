//! A container's network, as its caller made it: every Ethernet interface of
//! the network namespace gets a tap device joined to it by tc mirred
//! redirects (both ways), and the guest's device takes the interface's MAC,
//! addresses and routes. Runs inside that namespace; uses iproute2's `ip`/`tc`.

use std::os::fd::{FromRawFd, OwnedFd};
use std::process::Command;

use agent_proto::{NetworkInterface, NetworkRequest, Route};
use hypervisor::Nic;
use nix::errno::Errno;
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("running {cmd}: {detail}")]
    Command { cmd: String, detail: String },
    #[error("reading the network namespace: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("creating tap device {name}: {errno}")]
    Tap { name: String, errno: Errno },
    #[error("{what}: {detail}")]
    Namespace { what: String, detail: String },
}

/// The guest's network: devices for the VMM, addresses and routes for the agent.
pub struct Network {
    pub nics: Vec<Nic>,
    pub request: NetworkRequest,
    /// The tap devices' file descriptors: a tap lives as long as they do
    /// (and the VMM's copies), so nothing is left behind when we die.
    _taps: Vec<OwnedFd>,
    /// The caller's interfaces we put an ingress redirect on; removed on drop.
    redirected: Vec<String>,
}

impl Drop for Network {
    fn drop(&mut self) {
        for dev in &self.redirected {
            let _ = run("tc", &["qdisc", "del", "dev", dev, "ingress"]);
        }
    }
}

#[derive(Deserialize)]
struct Link {
    ifname: String,
    #[serde(default)]
    address: String,
    #[serde(default)]
    mtu: u32,
    #[serde(default)]
    link_type: String,
    #[serde(default)]
    addr_info: Vec<AddrInfo>,
}

#[derive(Deserialize)]
struct AddrInfo {
    family: String,
    local: String,
    prefixlen: u8,
}

#[derive(Deserialize)]
struct RouteEntry {
    dst: String,
    #[serde(default)]
    gateway: Option<String>,
    #[serde(default)]
    dev: String,
}

/// Our taps are named pv<pid>t<n>: unique per holder, under 16 bytes.
fn tap_name(n: usize) -> String {
    format!("pv{}t{n}", std::process::id() % 10_000_000)
}

fn is_tap(name: &str) -> bool {
    name.strip_prefix("pv")
        .and_then(|r| r.split_once('t'))
        .is_some_and(|(pid, n)| {
            !pid.is_empty()
                && pid.chars().all(|c| c.is_ascii_digit())
                && !n.is_empty()
                && n.chars().all(|c| c.is_ascii_digit())
        })
}

fn run(program: &str, args: &[&str]) -> Result<String, NetworkError> {
    let cmd = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| NetworkError::Command {
            cmd: cmd.clone(),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(NetworkError::Command {
            cmd,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Opens a tap device named `name` (gone when the last fd closes). The fd is
/// inheritable: the VMM takes it over as `-netdev tap,fd=N`.
fn open_tap(name: &str) -> Result<OwnedFd, NetworkError> {
    let err = |errno| NetworkError::Tap {
        name: name.into(),
        errno,
    };
    let fd = nix::fcntl::open(
        "/dev/net/tun",
        nix::fcntl::OFlag::O_RDWR,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(err)?;
    // SAFETY: `open` just returned this fd.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads an ifreq; `req` lives for the call.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            libc::TUNSETIFF,
            &mut req as *mut libc::ifreq,
        )
    };
    if rc < 0 {
        return Err(err(Errno::last()));
    }
    Ok(fd)
}

/// Redirects everything arriving on `from` out of `to`.
fn redirect(from: &str, to: &str) -> Result<(), NetworkError> {
    run(
        "tc",
        &["qdisc", "add", "dev", from, "handle", "ffff:", "ingress"],
    )?;
    run(
        "tc",
        &[
            "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all", "u32", "match",
            "u8", "0", "0", "action", "mirred", "egress", "redirect", "dev", to,
        ],
    )?;
    Ok(())
}

/// Joins every Ethernet interface of the current network namespace to a new
/// tap device. An empty namespace (only lo) gives a guest without a NIC.
pub fn attach() -> Result<Network, NetworkError> {
    let links: Vec<Link> = serde_json::from_str(&run("ip", &["-j", "addr", "show"])?)?;
    let routes: Vec<RouteEntry> =
        serde_json::from_str(&run("ip", &["-j", "-4", "route", "show"])?)?;
    // Built up as we go: on an error, dropping it undoes what was done.
    let mut net = Network {
        nics: Vec::new(),
        request: NetworkRequest::default(),
        _taps: Vec::new(),
        redirected: Vec::new(),
    };
    for link in links
        .iter()
        .filter(|l| l.link_type == "ether" && !is_tap(&l.ifname))
    {
        let tap = tap_name(net.nics.len());
        let fd = open_tap(&tap)?;
        let fd_num = std::os::fd::AsRawFd::as_raw_fd(&fd);
        net._taps.push(fd);
        let mtu = link.mtu.max(68).to_string();
        run("ip", &["link", "set", "dev", &tap, "mtu", &mtu, "up"])?;
        redirect(&link.ifname, &tap).map_err(|e| match e {
            NetworkError::Command { cmd, detail } if detail.contains("Exclusivity") || detail.contains("File exists") => {
                NetworkError::Command {
                    cmd,
                    detail: format!(
                        "{} already has an ingress qdisc: is another podvisor container using this network namespace? ({detail})",
                        link.ifname
                    ),
                }
            }
            other => other,
        })?;
        net.redirected.push(link.ifname.clone());
        redirect(&tap, &link.ifname)?;
        net.nics.push(Nic {
            tap: tap.clone(),
            mac: link.address.clone(),
            fd: Some(fd_num),
        });
        net.request.interfaces.push(NetworkInterface {
            mac: link.address.clone(),
            name: link.ifname.clone(),
            addresses: link
                .addr_info
                .iter()
                .filter(|a| a.family == "inet")
                .map(|a| format!("{}/{}", a.local, a.prefixlen))
                .collect(),
            mtu: link.mtu,
        });
        // The kernel makes on-link routes from the address; routes through
        // a gateway are what the guest needs to be told.
        for r in routes
            .iter()
            .filter(|r| r.dev == link.ifname && r.gateway.is_some())
        {
            net.request.routes.push(Route {
                destination: if r.dst == "default" {
                    String::new()
                } else {
                    r.dst.clone()
                },
                gateway: r.gateway.clone().unwrap_or_default(),
                device: link.ifname.clone(),
            });
        }
    }
    Ok(net)
}

/// Network devices for a template's VM: `n` tap devices of our own (gone
/// when the returned fds close), with fixed MACs a clone's agent replaces.
pub fn scratch_nics(n: usize) -> Result<(Vec<Nic>, Vec<OwnedFd>), NetworkError> {
    let mut nics = Vec::new();
    let mut fds = Vec::new();
    for i in 0..n {
        let tap = tap_name(100 + i);
        let fd = open_tap(&tap)?;
        nics.push(Nic {
            tap,
            mac: format!("52:54:00:00:00:{:02x}", i + 1),
            fd: Some(std::os::fd::AsRawFd::as_raw_fd(&fd)),
        });
        fds.push(fd);
    }
    Ok((nics, fds))
}

/// Brings up lo in a namespace made for the container.
pub fn loopback_up() -> Result<(), NetworkError> {
    run("ip", &["link", "set", "dev", "lo", "up"]).map(drop)
}

/// Puts the calling thread (call while the process has one thread) in the
/// network namespace `spec` asks for: the path it names, or a new one with
/// lo up. No network namespace in the spec: stays in the caller's.
pub fn enter_namespace(spec: &crate::oci::Spec) -> Result<(), NetworkError> {
    use nix::sched::{setns, unshare, CloneFlags};
    match spec.network_namespace() {
        Some(Some(path)) => {
            let f = std::fs::File::open(&path).map_err(|e| NetworkError::Namespace {
                what: format!("opening network namespace {}", path.display()),
                detail: e.to_string(),
            })?;
            setns(f, CloneFlags::CLONE_NEWNET).map_err(|e| NetworkError::Namespace {
                what: format!("joining network namespace {}", path.display()),
                detail: e.to_string(),
            })
        }
        Some(None) => {
            unshare(CloneFlags::CLONE_NEWNET).map_err(|e| NetworkError::Namespace {
                what: "creating a network namespace".into(),
                detail: e.to_string(),
            })?;
            loopback_up()
        }
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_fit_and_are_recognised() {
        let name = tap_name(3);
        assert!(name.len() < 16, "{name}");
        assert!(is_tap(&name));
        for other in ["eth0", "pv", "pvt1", "pv12t", "pvxt1", "veth1234"] {
            assert!(!is_tap(other), "{other}");
        }
    }
}
