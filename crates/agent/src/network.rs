//! The guest's network: each virtio-net device takes the name, addresses and
//! MTU of the host interface it stands for, then the routes are added.

use std::ffi::CString;
use std::fs;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use agent_proto::{NetworkRequest, Route};
use nix::errno::Errno;

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("no network device has MAC address {0}")]
    NoDevice(String),
    #[error("invalid {what} {value:?}")]
    Invalid { what: &'static str, value: String },
    #[error("{what} {dev}: {errno}")]
    Os {
        what: &'static str,
        dev: String,
        errno: Errno,
    },
}

fn device_by_mac(mac: &str) -> Option<String> {
    fs::read_dir("/sys/class/net")
        .ok()?
        .flatten()
        .find_map(|e| {
            let addr = fs::read_to_string(e.path().join("address")).ok()?;
            addr.trim()
                .eq_ignore_ascii_case(mac)
                .then(|| e.file_name().to_string_lossy().into_owned())
        })
}

/// The Ethernet devices (not lo), in the order the kernel made them.
fn ethernet_devices() -> Vec<String> {
    let mut devs: Vec<(u32, String)> = fs::read_dir("/sys/class/net")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let kind = fs::read_to_string(e.path().join("type")).ok()?;
                    // ARPHRD_ETHER
                    (kind.trim() == "1").then_some(())?;
                    let index = fs::read_to_string(e.path().join("ifindex")).ok()?;
                    Some((index.trim().parse().ok()?, name))
                })
                .collect()
        })
        .unwrap_or_default();
    devs.sort();
    devs.into_iter().map(|(_, n)| n).collect()
}

fn parse_mac(mac: &str) -> Option<[u8; 6]> {
    let bytes: Vec<u8> = mac
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .ok()?;
    bytes.try_into().ok()
}

fn socket() -> Result<OwnedFd, NetworkError> {
    // SAFETY: socket(2) with constant arguments; the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(NetworkError::Os {
            what: "socket",
            dev: String::new(),
            errno: Errno::last(),
        });
    }
    // SAFETY: socket just returned this fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq(name: &str) -> Result<libc::ifreq, NetworkError> {
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.is_empty() || name.len() >= req.ifr_name.len() {
        return Err(NetworkError::Invalid {
            what: "interface name",
            value: name.into(),
        });
    }
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(req)
}

fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; the kernel reads
    // the family to know which one it got.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ioctl(
    sock: &OwnedFd,
    request: libc::Ioctl,
    arg: *mut libc::c_void,
    what: &'static str,
    dev: &str,
) -> Result<(), NetworkError> {
    // SAFETY: every caller passes a pointer to the struct `request` expects
    // (ifreq or rtentry), alive for the call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), request, arg) };
    if rc < 0 {
        return Err(NetworkError::Os {
            what,
            dev: dev.into(),
            errno: Errno::last(),
        });
    }
    Ok(())
}

fn set_up(sock: &OwnedFd, dev: &str) -> Result<(), NetworkError> {
    let mut req = ifreq(dev)?;
    ioctl(
        sock,
        libc::SIOCGIFFLAGS,
        (&mut req as *mut libc::ifreq).cast(),
        "reading flags of",
        dev,
    )?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    ioctl(
        sock,
        libc::SIOCSIFFLAGS,
        (&mut req as *mut libc::ifreq).cast(),
        "bringing up",
        dev,
    )
}

fn parse_cidr(cidr: &str) -> Result<(Ipv4Addr, u8), NetworkError> {
    let invalid = || NetworkError::Invalid {
        what: "IPv4 address",
        value: cidr.into(),
    };
    let (ip, len) = cidr.split_once('/').unwrap_or((cidr, "32"));
    let ip: Ipv4Addr = ip.parse().map_err(|_| invalid())?;
    let len: u8 = len.parse().map_err(|_| invalid())?;
    if len > 32 {
        return Err(invalid());
    }
    Ok((ip, len))
}

fn netmask(len: u8) -> Ipv4Addr {
    Ipv4Addr::from(if len == 0 { 0 } else { u32::MAX << (32 - len) })
}

fn add_route(sock: &OwnedFd, r: &Route) -> Result<(), NetworkError> {
    let dest = if r.destination.is_empty() {
        "0.0.0.0/0"
    } else {
        &r.destination
    };
    let (ip, len) = parse_cidr(dest)?;
    // SAFETY: rtentry is plain data; all zeroes is a valid value.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr(ip);
    rt.rt_genmask = sockaddr(netmask(len));
    rt.rt_flags = libc::RTF_UP;
    if !r.gateway.is_empty() {
        let gw: Ipv4Addr = r.gateway.parse().map_err(|_| NetworkError::Invalid {
            what: "gateway",
            value: r.gateway.clone(),
        })?;
        rt.rt_gateway = sockaddr(gw);
        rt.rt_flags |= libc::RTF_GATEWAY;
    }
    if len == 32 {
        rt.rt_flags |= libc::RTF_HOST;
    }
    let dev = CString::new(r.device.as_str()).map_err(|_| NetworkError::Invalid {
        what: "device",
        value: r.device.clone(),
    })?;
    if !r.device.is_empty() {
        rt.rt_dev = dev.as_ptr().cast_mut();
    }
    match ioctl(
        sock,
        libc::SIOCADDRT,
        (&mut rt as *mut libc::rtentry).cast(),
        "adding a route via",
        &r.device,
    ) {
        // The kernel made the on-link route of an address already.
        Err(NetworkError::Os {
            errno: Errno::EEXIST,
            ..
        }) => Ok(()),
        other => other,
    }
}

/// Brings the loopback device up (a VM with no NIC is never configured,
/// yet its containers' servers listen on it).
pub fn loopback_up() -> Result<(), NetworkError> {
    set_up(&socket()?, "lo")
}

pub fn configure(req: &NetworkRequest) -> Result<(), NetworkError> {
    let sock = socket()?;
    set_up(&sock, "lo")?;
    // A VM cloned from a template has the template's MACs: a device no
    // one asked for by MAC takes the next interface's, in order.
    let mut spare: Vec<String> = ethernet_devices()
        .into_iter()
        .filter(|d| {
            let mac = fs::read_to_string(format!("/sys/class/net/{d}/address")).unwrap_or_default();
            !req.interfaces
                .iter()
                .any(|i| i.mac.eq_ignore_ascii_case(mac.trim()))
        })
        .collect();
    spare.reverse();
    for iface in &req.interfaces {
        let found = match device_by_mac(&iface.mac) {
            Some(d) => d,
            None => {
                let d = spare
                    .pop()
                    .ok_or_else(|| NetworkError::NoDevice(iface.mac.clone()))?;
                let mac = parse_mac(&iface.mac)
                    .ok_or_else(|| NetworkError::NoDevice(iface.mac.clone()))?;
                let mut req = ifreq(&d)?;
                // SAFETY: ifru_hwaddr is a sockaddr; family and the first
                // six bytes of its data are the hardware address.
                unsafe {
                    req.ifr_ifru.ifru_hwaddr.sa_family = libc::ARPHRD_ETHER;
                    for (dst, b) in req.ifr_ifru.ifru_hwaddr.sa_data.iter_mut().zip(mac) {
                        *dst = b as libc::c_char;
                    }
                }
                ioctl(
                    &sock,
                    libc::SIOCSIFHWADDR,
                    (&mut req as *mut libc::ifreq).cast(),
                    "setting the MAC address of",
                    &d,
                )?;
                d
            }
        };
        let mut dev = found.clone();
        if !iface.name.is_empty() && iface.name != found {
            let mut req = ifreq(&found)?;
            let new = ifreq(&iface.name)?;
            req.ifr_ifru.ifru_newname = new.ifr_name;
            ioctl(
                &sock,
                libc::SIOCSIFNAME,
                (&mut req as *mut libc::ifreq).cast(),
                "renaming",
                &found,
            )?;
            dev = iface.name.clone();
        }
        if iface.mtu > 0 {
            let mut req = ifreq(&dev)?;
            req.ifr_ifru.ifru_mtu = iface.mtu as libc::c_int;
            ioctl(
                &sock,
                libc::SIOCSIFMTU,
                (&mut req as *mut libc::ifreq).cast(),
                "setting the MTU of",
                &dev,
            )?;
        }
        // ioctls set one IPv4 address per device: the first.
        if let Some(cidr) = iface.addresses.first() {
            let (ip, len) = parse_cidr(cidr)?;
            let mut req = ifreq(&dev)?;
            req.ifr_ifru.ifru_addr = sockaddr(ip);
            ioctl(
                &sock,
                libc::SIOCSIFADDR,
                (&mut req as *mut libc::ifreq).cast(),
                "setting the address of",
                &dev,
            )?;
            let mut req = ifreq(&dev)?;
            req.ifr_ifru.ifru_netmask = sockaddr(netmask(len));
            ioctl(
                &sock,
                libc::SIOCSIFNETMASK,
                (&mut req as *mut libc::ifreq).cast(),
                "setting the netmask of",
                &dev,
            )?;
        }
        set_up(&sock, &dev)?;
    }
    for r in &req.routes {
        add_route(&sock, r)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_and_masks() {
        assert_eq!(
            parse_cidr("10.88.0.5/16").unwrap(),
            (Ipv4Addr::new(10, 88, 0, 5), 16)
        );
        assert!(parse_cidr("10.88.0.5/33").is_err());
        assert!(parse_cidr("fe80::1/64").is_err());
        assert_eq!(netmask(16), Ipv4Addr::new(255, 255, 0, 0));
        assert_eq!(netmask(0), Ipv4Addr::UNSPECIFIED);
    }
}
