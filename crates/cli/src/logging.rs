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

use sandbox::container::rfc3339_now as now_rfc3339;

impl Log {
    /// Prints an error on stderr and, when --log is set, into the log file.
    pub fn error(&self, msg: &str) {
        eprintln!("podvisor: {msg}");
        self.error_to_file(msg);
    }

    /// Only into the --log file: for processes whose stderr is a container's.
    pub fn error_to_file(&self, msg: &str) {
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

/// logrus's text lines, as runc writes them with `--log FILE`:
/// `time="..." level=debug msg="..." key=value`.
struct Logrus;

/// The event's message and its other fields, each already `key=value`.
#[derive(Default)]
struct LogrusFields {
    msg: String,
    rest: String,
}

impl tracing::field::Visit for LogrusFields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.msg = value.to_string();
        } else {
            self.rest.push_str(&format!(" {}={value:?}", field.name()));
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.record_str(field, &format!("{value:?}"));
    }
}

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for Logrus
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let mut fields = LogrusFields::default();
        event.record(&mut fields);
        let level = event.metadata().level().as_str().to_ascii_lowercase();
        writeln!(
            writer,
            "time={:?} level={level} msg={:?}{}",
            now_rfc3339(),
            fields.msg,
            fields.rest
        )
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
                builder.event_format(Logrus).try_init()
            };
        }
    } else if debug {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .event_format(Logrus)
            .try_init();
    }
    Log {
        file: file.map(|p| (p.to_path_buf(), json)),
    }
}
