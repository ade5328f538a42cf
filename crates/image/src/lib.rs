//! podvisor's image store: images pulled from OCI registries or imported
//! from archives, kept as verified, content-addressed blobs.

pub mod auth;
pub mod blockroot;
pub mod config;
pub mod import;
pub mod pull;
pub mod store;
pub mod unpack;

pub use config::ImagesConfig;
pub use import::{import, ImportError};
pub use pull::{pull, Progress, PullError, PullOptions, Pulled};
pub use store::{ImageRecord, Reclaimed, Store, StoreError};
pub use unpack::{apply_layer, unpack_image, Limits, UnpackError, Unpacked};

use oci_client::manifest::{self, OciImageManifest};

/// The one platform podvisor's guests run.
#[derive(Debug, PartialEq, Eq)]
pub struct Platform {
    pub os: &'static str,
    pub architecture: &'static str,
}

impl Platform {
    pub const LINUX_AMD64: Platform = Platform {
        os: "linux",
        architecture: "amd64",
    };
}

/// The platform an index entry (JSON) names, if it is linux/amd64 or
/// something else recognisable.
pub(crate) fn platform_of(entry: &serde_json::Value) -> Option<Platform> {
    let p = entry.get("platform")?;
    let os = p.get("os")?.as_str()?;
    let arch = p.get("architecture")?.as_str()?;
    (os == "linux" && arch == "amd64").then_some(Platform::LINUX_AMD64)
}

/// Layer media types we store (and will unpack): tar, gzip or zstd.
pub(crate) fn layer_media_type_supported(media_type: &str) -> bool {
    matches!(
        media_type,
        manifest::IMAGE_LAYER_MEDIA_TYPE
            | manifest::IMAGE_LAYER_GZIP_MEDIA_TYPE
            | manifest::IMAGE_DOCKER_LAYER_TAR_MEDIA_TYPE
            | manifest::IMAGE_DOCKER_LAYER_GZIP_MEDIA_TYPE
            | "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.docker.image.rootfs.diff.tar.zstd"
    )
}

/// A manifest's media type: its own field, or OCI's when it has none.
pub(crate) fn manifest_media_type(m: &OciImageManifest, _raw: &[u8]) -> String {
    m.media_type
        .clone()
        .unwrap_or_else(|| manifest::OCI_IMAGE_MEDIA_TYPE.to_string())
}

/// `reference` as the store names it (`registry/repository:tag` or
/// `...@digest`), or None if it does not parse.
pub fn normalize(reference: &str) -> Option<String> {
    reference
        .parse::<oci_client::Reference>()
        .ok()
        .map(|r| r.whole())
}
