//! podvisord's parsers of client bytes, as a library for the fuzz targets
//! (and the binary): the Connect protocol's framing and envd's messages.

pub mod connect;

/// envd's messages (prost types with pbjson's proto3-JSON impls).
pub mod pb {
    #[allow(clippy::all, missing_docs)]
    pub mod process {
        include!(concat!(env!("OUT_DIR"), "/process.rs"));
        include!(concat!(env!("OUT_DIR"), "/process.serde.rs"));
    }
    #[allow(clippy::all, missing_docs)]
    pub mod filesystem {
        include!(concat!(env!("OUT_DIR"), "/filesystem.rs"));
        include!(concat!(env!("OUT_DIR"), "/filesystem.serde.rs"));
    }
}
