//! What the VMM writes (the guest's console, QEMU's own stderr) goes to a
//! log on the host through a pipe or socket we drain, so a guest cannot grow
//! it past a cap: the newest half of the cap in `FILE`, the half before in
//! `FILE.1`. Reads take a bounded tail.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// At most this many bytes of a log are kept (in two files).
pub const LOG_CAP: u64 = 1 << 20;
/// A tail reads at most this many bytes.
const TAIL_BYTES: u64 = 16 << 10;

fn older(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".1");
    PathBuf::from(s)
}

/// Copies `src` into the capped log at `path` until `src` ends, on a thread
/// of its own.
pub fn drain(mut src: impl Read + Send + 'static, path: PathBuf) {
    let half = LOG_CAP / 2;
    let open = |p: &Path| OpenOptions::new().create(true).append(true).open(p).ok();
    let Some(mut out) = open(&path) else {
        return;
    };
    let mut size = out.metadata().map(|m| m.len()).unwrap_or(0);
    let name = path.display().to_string();
    let spawned = std::thread::Builder::new()
        .name("vmm-log".into())
        .spawn(move || {
            let mut buf = [0u8; 16 << 10];
            loop {
                let n = match src.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if size + n as u64 > half {
                    let _ = fs::rename(&path, older(&path));
                    match File::create(&path) {
                        Ok(f) => out = f,
                        Err(_) => return,
                    }
                    size = 0;
                }
                if out.write_all(&buf[..n]).is_err() {
                    return;
                }
                size += n as u64;
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("no thread for {name}: {e}");
    }
}

fn last_bytes(path: &Path, max: u64) -> Vec<u8> {
    let Ok(mut f) = File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut out = Vec::new();
    let _ = f.take(max).read_to_end(&mut out);
    out
}

/// The last `lines` non-empty lines of a capped log, read in bounded bytes.
pub fn tail(path: &Path, lines: usize) -> String {
    let mut bytes = last_bytes(path, TAIL_BYTES);
    if (bytes.len() as u64) < TAIL_BYTES {
        let mut before = last_bytes(&older(path), TAIL_BYTES - bytes.len() as u64);
        before.append(&mut bytes);
        bytes = before;
    }
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.trim().is_empty())
        .collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_stays_under_cap_and_tail_is_bounded() {
        let dir = std::env::temp_dir().join(format!("podvisor-log-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("console.log");
        let (r, mut w) = std::os::unix::net::UnixStream::pair().unwrap();
        drain(r, path.clone());
        let line = [b'x'; 1023];
        for i in 0..4096 {
            w.write_all(&line).unwrap();
            w.write_all(if i == 4095 { b"\xffend\n" } else { b"\n" })
                .unwrap();
        }
        drop(w);
        for _ in 0..200 {
            if tail(&path, 1).ends_with("end") {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let total = fs::metadata(&path).unwrap().len() + fs::metadata(older(&path)).unwrap().len();
        assert!(total <= LOG_CAP, "{total}");
        assert!(tail(&path, 1).ends_with("end"));
        assert!(tail(&path, 1000).len() as u64 <= TAIL_BYTES * 2);
        let _ = fs::remove_dir_all(dir);
    }
}
