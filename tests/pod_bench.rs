//! Pod benchmark over containerd's CRI (run by `bench/pod.py`): for the
//! runtime handlers "podvisor" and "runc" (the floor), alternating, in one
//! run: pod start (RunPodSandbox until its first container runs), pod
//! teardown (StopPodSandbox + RemovePodSandbox), and the host memory (PSS) of
//! one pod with two idle containers; then for pods whose VM is cloned from a
//! template, and taken ready from a pool of clones. Medians; the
//! accelerator is printed.

use std::time::{Duration, Instant};

use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, CreateContainerRequest, ImageSpec, PodSandboxConfig,
    RunPodSandboxRequest, StartContainerRequest,
};
use podvisor_client_tests::cri::{self, connect, Cri};
use podvisor_client_tests::{cmdline, owner, parent, pids, Containerd, Scratch};

fn pod_config(name: &str, logs: &std::path::Path) -> PodSandboxConfig {
    cri::pod_config(name, "bench", logs)
}

async fn add_container(cri: &mut Cri, pod: &str, config: &PodSandboxConfig, name: &str) {
    let id = cri
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: name.into(),
                    attempt: 0,
                }),
                image: Some(ImageSpec {
                    image: "localhost/busybox:latest".into(),
                    ..Default::default()
                }),
                command: vec!["sleep".into(), "3600".into()],
                log_path: format!("{name}.log"),
                ..Default::default()
            }),
            sandbox_config: Some(config.clone()),
        })
        .await
        .expect("CreateContainer")
        .into_inner()
        .container_id;
    cri.start_container(StartContainerRequest { container_id: id })
        .await
        .expect("StartContainer");
}

/// Proportional set size (KiB) of a process, from smaps_rollup.
fn pss_kib(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Pss:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// PSS (MiB) of everything the pod runs on the host: its shim and the
/// shim's descendants (QEMU for podvisor; pause and containers for runc).
fn pod_pss_mib(pod: &str) -> f64 {
    let pids = pids();
    let shims: Vec<&String> = pids
        .iter()
        .filter(|p| {
            let c = cmdline(p);
            c.contains("containerd-shim") && c.contains(pod)
        })
        .collect();
    let mut total = 0;
    for p in &pids {
        let mut q = p.clone();
        for _ in 0..8 {
            if shims.contains(&&q) {
                total += pss_kib(p);
                break;
            }
            q = owner(&q);
            if q.is_empty() || q == "1" || q == "0" {
                break;
            }
        }
    }
    total as f64 / 1024.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[derive(Default)]
struct Results {
    start_ms: Vec<f64>,
    teardown_ms: Vec<f64>,
    pss_mib: Vec<f64>,
}

/// The pool daemon serving a containerd's podvisor root, if any: its pid,
/// its policy's pool size and its status file.
struct Pool {
    pid: String,
    size: usize,
    status: std::path::PathBuf,
}

impl Pool {
    /// Waits until every clone of the pool is ready.
    async fn wait_full(&self) {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let ready = std::fs::read(&self.status)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| v["ready"].as_u64());
            if ready == Some(self.size as u64) {
                return;
            }
            assert!(Instant::now() < deadline, "the pool never filled");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// PSS (MiB) of the VM the pool handed out last: its oldest live clone
    /// (the daemon hands out first in, first out and refills at the back).
    fn handed_out_pss_mib(&self) -> f64 {
        let start = |p: &String| -> u64 {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| s.rsplit_once(") ")?.1.split(' ').nth(19)?.parse().ok())
                .unwrap_or(u64::MAX)
        };
        pids()
            .into_iter()
            .filter(|p| owner(&parent(p)) == self.pid && cmdline(p).contains("qemu-system"))
            .min_by_key(start)
            .map(|p| pss_kib(&p) as f64 / 1024.0)
            .unwrap_or(0.0)
    }
}

/// Pods of `handler`: start, teardown, PSS, `runs` times, alternating
/// between the handlers given. With a pool, each pod starts from a full one.
async fn measure(
    c: &Containerd,
    handlers: &[&str],
    runs: usize,
    tag: &str,
    pool: Option<&Pool>,
) -> Vec<Results> {
    let logs = Scratch::new(&format!("pod-bench-{tag}"));
    let mut cri = connect(c.socket()).await;
    let mut results: Vec<Results> = handlers.iter().map(|_| Results::default()).collect();
    for i in 0..runs {
        for (h, handler) in handlers.iter().enumerate() {
            let config = pod_config(&format!("{tag}-{handler}-{i}"), &logs.0);
            if let Some(pool) = pool {
                pool.wait_full().await;
            }
            let t0 = Instant::now();
            let pod = cri
                .run_pod_sandbox(RunPodSandboxRequest {
                    config: Some(config.clone()),
                    runtime_handler: handler.to_string(),
                })
                .await
                .unwrap_or_else(|s| panic!("RunPodSandbox ({handler}): {s}\n{}", c.log()))
                .into_inner()
                .pod_sandbox_id;
            add_container(&mut cri, &pod, &config, "first").await;
            results[h]
                .start_ms
                .push(t0.elapsed().as_secs_f64() * 1000.0);
            add_container(&mut cri, &pod, &config, "second").await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            let vm = pool.map(Pool::handed_out_pss_mib).unwrap_or(0.0);
            results[h].pss_mib.push(pod_pss_mib(&pod) + vm);
            let t1 = Instant::now();
            cri::remove_pod(&mut cri, &pod).await;
            results[h]
                .teardown_ms
                .push(t1.elapsed().as_secs_f64() * 1000.0);
        }
    }
    results
}

fn row(name: &str, r: &Results) {
    println!(
        "{:<20} {:>14.0} {:>14.0} {:>22.1}",
        name,
        median(r.start_ms.clone()),
        median(r.teardown_ms.clone()),
        median(r.pss_mib.clone())
    );
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(7);
    // Cold boots: no factory policy.
    let cold = {
        let c = Containerd::start_with("10.88.93.0/24", None);
        c.import_busybox("k8s.io");
        measure(&c, &["podvisor", "runc"], runs, "cold", None).await
    };
    // Clones, then ready clones from a pool: the policy names a template of
    // the default pod shape, and a pool of it that `pool serve` keeps.
    let (cloned, pooled) = {
        let policy = "template = \"pod\"\n[[pool]]\ntemplate = \"pod\"\nsize = 2\n";
        let c = Containerd::start_with("10.88.95.0/24", Some(policy));
        c.import_busybox("k8s.io");
        let podvisor = || {
            let mut cmd = std::process::Command::new(podvisor_client_tests::podvisor());
            cmd.arg("--root").arg(c.pv_root());
            cmd
        };
        let made = podvisor()
            .args([
                "template", "create", "--name", "pod", "--nics", "1", "--memory", "512",
            ])
            .output()
            .expect("podvisor template create");
        assert!(made.status.success(), "template create: {made:?}");
        let cloned = measure(&c, &["podvisor"], runs, "clone", None).await;
        let mut daemon = podvisor()
            .args(["pool", "serve", "--config"])
            .arg(c.policy())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("podvisor pool serve");
        let pool = Pool {
            pid: daemon.id().to_string(),
            size: 2,
            status: c.pv_root().join("pools/pod.json"),
        };
        let pooled = measure(&c, &["podvisor"], runs, "pool", Some(&pool)).await;
        let _ = daemon.kill();
        let _ = daemon.wait();
        (cloned, pooled)
    };
    let accel = hypervisor::HostVirt::detect().default_accel();
    println!("pod benchmark over containerd's CRI ({runs} runs each, alternating; medians)");
    println!("accelerator for podvisor: {accel}");
    println!(
        "{:<20} {:>14} {:>14} {:>22}",
        "handler", "pod start ms", "teardown ms", "PSS 1 pod+2 idle MiB"
    );
    row("podvisor (cold)", &cold[0]);
    row("podvisor (template)", &cloned[0]);
    row("podvisor (pool)", &pooled[0]);
    row("runc", &cold[1]);
    let runc = median(cold[1].start_ms.clone());
    println!(
        "pod start / runc: cold {:.1}x, template {:.1}x, pool {:.1}x",
        median(cold[0].start_ms.clone()) / runc,
        median(cloned[0].start_ms.clone()) / runc,
        median(pooled[0].start_ms.clone()) / runc
    );
}
