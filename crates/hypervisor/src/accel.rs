//! Picking the accelerator: KVM where the host has VMX/SVM, TCG where it has
//! none or only `kvm_pvm` (which emulates ordinary guest kernels very slowly).

use std::fmt;
use std::path::Path;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

impl FromStr for Accel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            other => Err(format!("unknown accelerator {other:?} (kvm or tcg)")),
        }
    }
}

/// What the host offers for virtualization.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostVirt {
    /// /dev/kvm backed by VMX or SVM.
    Kvm { module: &'static str },
    /// /dev/kvm backed by kvm_pvm: only PVM guest kernels run at speed.
    Pvm,
    /// No usable /dev/kvm.
    None { why: String },
}

impl HostVirt {
    pub fn detect() -> HostVirt {
        Self::detect_at(Path::new("/"))
    }

    fn detect_at(root: &Path) -> HostVirt {
        let dev = root.join("dev/kvm");
        if !dev.exists() {
            return HostVirt::None {
                why: "/dev/kvm does not exist".into(),
            };
        }
        let module = |m: &str| root.join("sys/module").join(m).exists();
        if module("kvm_intel") {
            return HostVirt::Kvm {
                module: "kvm_intel",
            };
        }
        if module("kvm_amd") {
            return HostVirt::Kvm { module: "kvm_amd" };
        }
        if module("kvm_pvm") {
            return HostVirt::Pvm;
        }
        HostVirt::None {
            why: "/dev/kvm exists but neither kvm_intel, kvm_amd nor kvm_pvm is loaded".into(),
        }
    }

    /// The accelerator to use when the user does not choose.
    pub fn default_accel(&self) -> Accel {
        match self {
            HostVirt::Kvm { .. } => Accel::Kvm,
            HostVirt::Pvm | HostVirt::None { .. } => Accel::Tcg,
        }
    }
}

impl fmt::Display for HostVirt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostVirt::Kvm { module } => write!(f, "KVM ({module})"),
            HostVirt::Pvm => {
                f.write_str("kvm_pvm (PVM: ordinary guest kernels run emulated, so TCG is used)")
            }
            HostVirt::None { why } => write!(f, "none ({why})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(modules: &[&str], dev: bool) -> tempdir::Dir {
        let d = tempdir::Dir::new();
        std::fs::create_dir_all(d.0.join("sys/module")).unwrap();
        std::fs::create_dir_all(d.0.join("dev")).unwrap();
        for m in modules {
            std::fs::create_dir_all(d.0.join("sys/module").join(m)).unwrap();
        }
        if dev {
            std::fs::write(d.0.join("dev/kvm"), "").unwrap();
        }
        d
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "podvisor-accel-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::SeqCst)
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn pvm_host_uses_tcg() {
        let d = fake(&["kvm", "kvm_pvm"], true);
        let v = HostVirt::detect_at(&d.0);
        assert_eq!(v, HostVirt::Pvm);
        assert_eq!(v.default_accel(), Accel::Tcg);
    }

    #[test]
    fn vmx_host_uses_kvm() {
        let d = fake(&["kvm", "kvm_intel"], true);
        assert_eq!(HostVirt::detect_at(&d.0).default_accel(), Accel::Kvm);
    }

    #[test]
    fn no_dev_kvm_uses_tcg() {
        let d = fake(&["kvm_intel"], false);
        assert!(matches!(HostVirt::detect_at(&d.0), HostVirt::None { .. }));
    }

    #[test]
    fn accel_parses() {
        assert_eq!("kvm".parse::<Accel>(), Ok(Accel::Kvm));
        assert!("xen".parse::<Accel>().is_err());
    }
}
