//! The host↔guest protocol of podvisor: the generated gRPC types and the
//! constants both sides must agree on. Nothing else crosses the boundary.

#[allow(clippy::all, missing_docs)]
mod generated {
    tonic::include_proto!("podvisor.agent.v1");
}

pub use generated::*;

/// Bumped on every incompatible change of `agent.proto`; the host refuses an
/// agent that answers with another number.
pub const PROTOCOL_VERSION: u32 = 1;

/// The name of the virtio-serial port that carries the agent channel.
pub const AGENT_PORT_NAME: &str = "io.podvisor.agent.0";

/// What the host writes first on every connection to the agent channel. The
/// agent starts a fresh session wherever a read holds it, so a session
/// the guest never saw end (a clone resumed from a template saved before the
/// template's host had hung up) cannot swallow the next host's bytes.
pub const SESSION_MAGIC: &[u8; 16] = b"\0podvisor-sess1\0";

/// Whether `id` may name a container, exec or share on both sides: letters,
/// digits, '-', '_' and '.', not "." or "..", at most 1024 bytes (it becomes
/// a path component).
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 1024
        && id != "."
        && id != ".."
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// Kernel command-line keys the host passes to the agent.
pub mod cmdline {
    /// The guest's hostname.
    pub const HOSTNAME: &str = "podvisor.hostname";
}
