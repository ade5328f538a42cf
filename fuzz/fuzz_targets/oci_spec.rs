//! A bundle's config.json, as `create`, `run` and the holder read it:
//! `Spec::parse` (what `Spec::load` runs on the file's bytes: the parse and
//! `validate`), then everything the CLI and the shim ask of a loaded spec.
//! None of it may panic, and `check_annotations` must hold what it promises:
//! a VM sized by an annotation is never above the container's (or pod's)
//! limits nor above the policy's maximum, and boots only an allowed kernel.
#![no_main]

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sandbox::oci::{
    Spec, ANNOTATION_KERNEL, ANNOTATION_MEMORY, ANNOTATION_VCPUS, CRI_SANDBOX_CPU_PERIOD,
    CRI_SANDBOX_CPU_QUOTA, CRI_SANDBOX_MEMORY, VM_OVERHEAD_MIB,
};
use sandbox::pool::AnnotationPolicy;

struct Fixture {
    bundle: PathBuf,
    kernel: PathBuf,
}

/// A bundle with a root filesystem, and a kernel the strict policy allows.
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let bundle = common::scratch("oci");
        std::fs::create_dir(bundle.join("rootfs")).unwrap();
        let kernel = bundle.join("vmlinux");
        std::fs::write(&kernel, b"").unwrap();
        Fixture { bundle, kernel }
    })
}

/// The most MiB a VM may have for a memory limit of `bytes`.
fn most_mib(bytes: u64) -> u128 {
    u128::from(bytes).div_ceil(1 << 20) + u128::from(VM_OVERHEAD_MIB)
}

/// The most vCPUs for a CPU quota and period.
fn most_vcpus(quota: i64, period: i64) -> u128 {
    (quota as u128).div_ceil(period as u128)
}

fn annotation<T: std::str::FromStr>(spec: &Spec, key: &str) -> Option<T> {
    spec.annotations.get(key).and_then(|v| v.parse().ok())
}

fn check(spec: &Spec, policy: &AnnotationPolicy, pod: bool, kernel: &Path) {
    if spec.check_annotations(policy, pod).is_err() {
        return;
    }
    let (memory, vcpus) = if pod {
        spec.pod_vm_shape()
    } else {
        (spec.vm_memory_mib(), spec.vm_vcpus())
    };
    if let Some(k) = spec.annotations.get(ANNOTATION_KERNEL) {
        let canon = |p: &Path| std::fs::canonicalize(p).ok();
        assert!(
            canon(Path::new(k)).is_some() && canon(Path::new(k)) == canon(kernel),
            "kernel {k:?} let through"
        );
    }
    let cpu = spec.resources().and_then(|r| r.cpu.as_ref());
    if spec.annotations.contains_key(ANNOTATION_MEMORY) {
        if let Some(max) = policy.max_memory_mib {
            assert!(memory <= max, "{memory} MiB above max_memory_mib = {max}");
        }
        let limit = if pod {
            annotation::<i64>(spec, CRI_SANDBOX_MEMORY)
                .filter(|m| *m > 0)
                .map(|m| m as u64)
        } else {
            spec.memory_limit()
        };
        if let Some(l) = limit {
            assert!(
                u128::from(memory) <= most_mib(l),
                "{memory} MiB above the limit of {l} bytes"
            );
        }
    }
    if spec.annotations.contains_key(ANNOTATION_VCPUS) {
        if let Some(max) = policy.max_vcpus {
            assert!(vcpus <= max, "{vcpus} vCPUs above max_vcpus = {max}");
        }
        let quota = if pod {
            annotation::<i64>(spec, CRI_SANDBOX_CPU_QUOTA)
                .filter(|q| *q > 0)
                .map(|q| {
                    let p = annotation::<i64>(spec, CRI_SANDBOX_CPU_PERIOD).filter(|p| *p > 0);
                    (q, p.unwrap_or(100_000))
                })
        } else {
            cpu.and_then(|c| {
                let p = c.period.unwrap_or(100_000);
                let q = c.quota.filter(|q| *q > 0)?;
                // A period no i64 holds: the limit is below one CPU.
                Some((q, i64::try_from(p).unwrap_or(i64::MAX)))
            })
            .filter(|(_, p)| *p > 0)
        };
        if let Some((q, p)) = quota {
            assert!(
                u128::from(vcpus) <= most_vcpus(q, p),
                "{vcpus} vCPUs above the CPU limit {q}/{p}"
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let Ok(spec) = Spec::parse(&f.bundle, data) else {
        return;
    };
    // What the holder, `create`, `run`, `exec` and the shim ask of it.
    let _ = spec.process().to_agent();
    let _ = spec.agent_resources();
    let _ = spec.sysctl();
    let _ = spec.network_namespace();
    let _ = spec.rootfs(&f.bundle).expect("validated: a root");
    let _ = spec.memory_limit();
    let _ = spec.vm_memory_mib();
    let _ = spec.vm_vcpus();
    let _ = spec.pod_vm_shape();
    let open = AnnotationPolicy::default();
    let strict = AnnotationPolicy {
        valid_kernel_paths: vec![f.kernel.clone()],
        max_memory_mib: Some(1024),
        max_vcpus: Some(4),
    };
    for pod in [false, true] {
        check(&spec, &open, pod, &f.kernel);
        check(&spec, &strict, pod, &f.kernel);
    }
});
