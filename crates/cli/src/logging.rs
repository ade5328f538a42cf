//! Logs and errors the way runc callers expect: errors on stderr, and with
//! `--log FILE --log-format json` logrus-style JSON lines in that file.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tracing_subscriber::EnvFilter;

pub struct Log {
    file: Option<(PathBuf, bool)>,
}

fn now_rfc3339() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_nanos()
    )
}

impl Log {
    /// Prints an error on stderr and, when --log is set, into the log file.
    pub fn error(&self, msg: &str) {
        eprintln!("podvisor: {msg}");
        if let Some((path, json)) = &self.file {
            let line = if *json {
                serde_json::json!({"level": "error", "msg": msg, "time": now_rfc3339()}).to_string()
            } else {
                format!("time=\"{}\" level=error msg={:?}", now_rfc3339(), msg)
            };
            if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(path) {
                let _ = writeln!(f, "{line}");
            }
        }
    }
}

pub fn init(file: Option<&Path>, format: &str, debug: bool) -> Log {
    let level = if debug { "debug" } else { "info" };
    let filter = EnvFilter::try_from_env("PODVISOR_LOG").unwrap_or_else(|_| EnvFilter::new(level));
    let json = format == "json";
    if let Some(path) = file {
        if let Ok(f) = OpenOptions::new().create(true).append(true).open(path) {
            let builder = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(Mutex::new(f))
                .with_ansi(false);
            let _ = if json {
                builder.json().try_init()
            } else {
                builder.try_init()
            };
        }
    } else if debug {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .try_init();
    }
    Log {
        file: file.map(|p| (p.to_path_buf(), json)),
    }
}
