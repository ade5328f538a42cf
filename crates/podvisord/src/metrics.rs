//! Prometheus metrics (`GET /metrics`, OpenMetrics text): sandboxes by
//! tenant and state, create latency by path (pool, clone, cold), pool
//! levels, API requests by route and status, agent call errors.

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathLabel {
    pub path: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SandboxLabels {
    pub tenant: String,
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TemplateLabel {
    pub template: String,
}

pub struct Metrics {
    registry: Registry,
    create_seconds: Family<PathLabel, Histogram>,
    create_failures: Counter,
    requests: Family<RequestLabels, Counter>,
    agent_errors: Counter,
    sandboxes: Family<SandboxLabels, Gauge>,
    pool_ready: Family<TemplateLabel, Gauge>,
    /// Serializes `render` (it resets and refills the gauges).
    render: Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("podvisord");
        let create_seconds = Family::<PathLabel, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ])
        });
        registry.register(
            "sandbox_create_seconds",
            "Time to make a sandbox, by how it was made (pool, clone, cold)",
            create_seconds.clone(),
        );
        let create_failures = Counter::default();
        registry.register(
            "sandbox_create_failures",
            "Sandbox creates that failed after admission",
            create_failures.clone(),
        );
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "api_requests",
            "API requests by route and status",
            requests.clone(),
        );
        let agent_errors = Counter::default();
        registry.register(
            "agent_call_errors",
            "Calls to a sandbox's guest agent that failed",
            agent_errors.clone(),
        );
        let sandboxes = Family::<SandboxLabels, Gauge>::default();
        registry.register(
            "sandboxes",
            "Sandboxes by tenant and state",
            sandboxes.clone(),
        );
        let pool_ready = Family::<TemplateLabel, Gauge>::default();
        registry.register(
            "pool_ready",
            "Ready clones kept by the template's pool",
            pool_ready.clone(),
        );
        Metrics {
            registry,
            create_seconds,
            create_failures,
            requests,
            agent_errors,
            sandboxes,
            pool_ready,
            render: Mutex::new(()),
        }
    }
}

impl Metrics {
    pub fn created(&self, path: &str, took: Duration) {
        self.create_seconds
            .get_or_create(&PathLabel { path: path.into() })
            .observe(took.as_secs_f64());
    }

    pub fn create_failed(&self) {
        self.create_failures.inc();
    }

    pub fn request(&self, route: &str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                route: route.into(),
                status: status.to_string(),
            })
            .inc();
    }

    pub fn agent_error(&self) {
        self.agent_errors.inc();
    }

    /// The text exposition, with the gauges read now.
    pub fn render(&self, counts: &[(String, String, i64)], pools: &[(String, i64)]) -> String {
        let _guard = self.render.lock().unwrap_or_else(|e| e.into_inner());
        self.sandboxes.clear();
        for (tenant, state, n) in counts {
            if state == "ended" {
                continue;
            }
            self.sandboxes
                .get_or_create(&SandboxLabels {
                    tenant: tenant.clone(),
                    state: state.clone(),
                })
                .set(*n);
        }
        for (template, n) in pools {
            self.pool_ready
                .get_or_create(&TemplateLabel {
                    template: template.clone(),
                })
                .set(*n);
        }
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
