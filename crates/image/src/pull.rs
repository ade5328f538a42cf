//! `pull`: an image from a registry (OCI distribution, through `oci-client`)
//! into the store, every blob checked against its digest and size first.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::{self, OciDescriptor, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use crate::auth::{AuthError, AuthFiles};
use crate::store::{now_secs, ImageRecord, Store, StoreError};
use crate::{layer_media_type_supported, manifest_media_type, platform_of, Platform};

const MANIFEST_TYPES: &[&str] = &[
    manifest::OCI_IMAGE_MEDIA_TYPE,
    manifest::OCI_IMAGE_INDEX_MEDIA_TYPE,
    manifest::IMAGE_MANIFEST_MEDIA_TYPE,
    manifest::IMAGE_MANIFEST_LIST_MEDIA_TYPE,
];

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("{reference:?} is not an image reference: {source}")]
    Reference {
        reference: String,
        #[source]
        source: oci_client::ParseError,
    },
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("registry {registry} is not reachable")]
    Unreachable {
        registry: String,
        #[source]
        source: OciDistributionError,
    },
    #[error("registry {registry}: no TLS session (a registry without TLS or with a certificate not trusted here needs --tls-verify=false or an insecure_registries entry)")]
    Tls {
        registry: String,
        #[source]
        source: OciDistributionError,
    },
    #[error("registry {registry} did not answer within {secs} s")]
    Timeout {
        registry: String,
        secs: u64,
        #[source]
        source: OciDistributionError,
    },
    #[error("registry {registry} refused the credentials (wrong user or password, or none given)")]
    Unauthorized {
        registry: String,
        #[source]
        source: OciDistributionError,
    },
    #[error("no image {reference} in its registry")]
    UnknownImage {
        reference: String,
        #[source]
        source: OciDistributionError,
    },
    #[error("{reference} has no linux/amd64 image, only: {}", .available.join(", "))]
    NoPlatform {
        reference: String,
        available: Vec<String>,
    },
    #[error("{reference}: unsupported manifest media type {media_type:?}")]
    ManifestType {
        reference: String,
        media_type: String,
    },
    #[error("{reference}: the manifest is not valid JSON of its type: {source}")]
    Manifest {
        reference: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{reference}: unsupported layer media type {media_type:?}")]
    LayerType {
        reference: String,
        media_type: String,
    },
    #[error("blob {digest}: the transfer broke after {received} of {size} bytes")]
    Truncated {
        digest: String,
        received: u64,
        size: u64,
        #[source]
        source: OciDistributionError,
    },
    #[error("registry {registry}")]
    Registry {
        registry: String,
        #[source]
        source: OciDistributionError,
    },
}

/// Watches blob transfers (a progress bar on a terminal).
pub trait Progress: Send + Sync {
    fn start(&self, digest: &str, size: u64);
    fn advance(&self, digest: &str, bytes: u64);
    fn finish(&self, digest: &str);
}

pub struct PullOptions {
    /// Verify registries' TLS certificates; without, HTTPS is tried with any
    /// certificate, then plain HTTP.
    pub tls_verify: bool,
    /// Registries (host:port) treated as if `tls_verify` were off.
    pub insecure_registries: Vec<String>,
    pub auth_files: AuthFiles,
    pub connect_timeout: Duration,
    /// The longest a transfer may stall.
    pub read_timeout: Duration,
    /// Attempts per request when the network fails (not when the registry says no).
    pub attempts: u32,
    pub progress: Option<Arc<dyn Progress>>,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            tls_verify: true,
            insecure_registries: Vec::new(),
            auth_files: AuthFiles::from_env(),
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            attempts: 3,
            progress: None,
        }
    }
}

/// What a pull did.
#[derive(Debug)]
pub struct Pulled {
    pub image: ImageRecord,
    /// Blobs fetched from the registry, and those already stored.
    pub fetched: usize,
    pub present: usize,
    pub bytes_fetched: u64,
}

/// Pulls `reference` into `store`: the linux/amd64 manifest, its config and
/// layers (as the registry sends them, compressed). A concurrent pull of the
/// same name waits and then finds the blobs stored.
pub async fn pull(
    store: &Store,
    reference: &str,
    options: &PullOptions,
) -> Result<Pulled, PullError> {
    let r: Reference = reference.parse().map_err(|source| PullError::Reference {
        reference: reference.to_string(),
        source,
    })?;
    let name = r.whole();
    store.collect_leftovers()?;
    let _image_lock = store.lock_image(&name).await?;
    let _writer = store.writer_guard().await?;
    let registry = r.resolve_registry().to_string();
    let auth = options.auth_files.credentials_for(&registry)?;
    let insecure = !options.tls_verify || options.insecure_registries.contains(&registry);
    let session = Session::connect(&r, &auth, insecure, options).await?;
    let Session {
        client,
        auth,
        manifest: (bytes, digest),
    } = session;
    let mut index_digest = None;
    let (bytes, digest) = if let Some(entries) = index_entries(&r, &bytes)? {
        let chosen = entries
            .iter()
            .find(|e| platform_of(e) == Some(Platform::LINUX_AMD64))
            .ok_or_else(|| PullError::NoPlatform {
                reference: name.clone(),
                available: entries
                    .iter()
                    .map(|e| platform_name(e.get("platform")))
                    .collect(),
            })?;
        let chosen = chosen["digest"].as_str().unwrap_or_default().to_string();
        index_digest = Some(digest);
        let by_digest = r.clone_with_digest(chosen.clone());
        let got = fetch_manifest(&client, &auth, &by_digest, options).await?;
        (got.0, chosen)
    } else {
        (bytes, digest)
    };
    let parsed: OciImageManifest =
        serde_json::from_slice(&bytes).map_err(|source| PullError::Manifest {
            reference: name.clone(),
            source,
        })?;
    let media_type = manifest_media_type(&parsed, &bytes);
    if media_type != manifest::OCI_IMAGE_MEDIA_TYPE
        && media_type != manifest::IMAGE_MANIFEST_MEDIA_TYPE
    {
        return Err(PullError::ManifestType {
            reference: name,
            media_type,
        });
    }
    if let Some(l) = parsed
        .layers
        .iter()
        .find(|l| !layer_media_type_supported(&l.media_type))
    {
        return Err(PullError::LayerType {
            reference: name,
            media_type: l.media_type.clone(),
        });
    }

    let staging = store.staging()?;
    let mut pulled = Pulled {
        image: ImageRecord {
            name,
            digest: digest.clone(),
            index_digest,
            media_type,
            config: parsed.config.digest.clone(),
            layers: parsed.layers.iter().map(|l| l.digest.clone()).collect(),
            size: bytes.len() as u64,
            created: 0,
        },
        fetched: 0,
        present: 0,
        bytes_fetched: 0,
    };
    // The manifest's bytes were checked against `digest` by the client (and
    // are checked again here as they are written).
    let mut w = staging.blob(Some((&digest, bytes.len() as u64)))?;
    w.write(&bytes)?;
    store.promote(&w.finish()?)?;
    for desc in std::iter::once(&parsed.config).chain(parsed.layers.iter()) {
        let size = u64::try_from(desc.size).unwrap_or(0);
        pulled.image.size += size;
        if store.has_blob(&desc.digest)? {
            pulled.present += 1;
            continue;
        }
        let blob = fetch_blob(&client, &r, desc, &staging, options).await?;
        store.promote(&blob)?;
        pulled.fetched += 1;
        pulled.bytes_fetched += blob.size;
    }
    pulled.image.created = now_secs();
    store.put_image(pulled.image.clone()).await?;
    Ok(pulled)
}

/// A client that reached the registry, and the manifest it got.
struct Session {
    client: Client,
    auth: RegistryAuth,
    manifest: (Vec<u8>, String),
}

impl Session {
    /// Asks for the manifest over HTTPS, and for an insecure registry that
    /// does not speak TLS, over HTTP.
    async fn connect(
        r: &Reference,
        auth: &RegistryAuth,
        insecure: bool,
        options: &PullOptions,
    ) -> Result<Session, PullError> {
        let protocols: &[ClientProtocol] = if insecure {
            &[ClientProtocol::Https, ClientProtocol::Http]
        } else {
            &[ClientProtocol::Https]
        };
        let mut last = None;
        for (i, protocol) in protocols.iter().enumerate() {
            let client = Client::new(ClientConfig {
                protocol: protocol.clone(),
                accept_invalid_certificates: insecure,
                connect_timeout: Some(options.connect_timeout),
                read_timeout: Some(options.read_timeout),
                platform_resolver: None,
                ..ClientConfig::default()
            });
            client
                .store_auth_if_needed(r.resolve_registry(), auth)
                .await;
            let probe = i + 1 < protocols.len();
            // A probe that may fall back to plain HTTP is tried once.
            let tries = if probe { 1 } else { options.attempts };
            let got = retrying(tries, || async {
                client
                    .pull_manifest_raw(r, auth, MANIFEST_TYPES)
                    .await
                    .map(|(b, d)| (b.to_vec(), d))
            })
            .await;
            match got {
                Ok(manifest) => {
                    return Ok(Session {
                        client,
                        auth: auth.clone(),
                        manifest,
                    })
                }
                Err(e) if probe && is_connect(&e) => last = Some(e),
                Err(e) => return Err(classify(r, e, options)),
            }
        }
        Err(classify(r, last.expect("one protocol tried"), options))
    }
}

async fn fetch_manifest(
    client: &Client,
    auth: &RegistryAuth,
    r: &Reference,
    options: &PullOptions,
) -> Result<(Vec<u8>, String), PullError> {
    retrying(options.attempts, || async {
        client
            .pull_manifest_raw(r, auth, MANIFEST_TYPES)
            .await
            .map(|(b, d)| (b.to_vec(), d))
    })
    .await
    .map_err(|e| classify(r, e, options))
}

/// One blob into `staging`, retried from the start when the network fails.
async fn fetch_blob(
    client: &Client,
    r: &Reference,
    desc: &OciDescriptor,
    staging: &crate::store::Staging,
    options: &PullOptions,
) -> Result<crate::store::StagedBlob, PullError> {
    enum Failure {
        Net(OciDistributionError),
        Store(StoreError),
    }
    let size = u64::try_from(desc.size).unwrap_or(0);
    let progress = options.progress.as_deref();
    let mut attempt = 0;
    loop {
        attempt += 1;
        if let Some(p) = progress {
            p.start(&desc.digest, size);
        }
        let mut w = staging.blob(Some((&desc.digest, size)))?;
        let transfer = async {
            let mut stream = client
                .pull_blob_stream(r, desc)
                .await
                .map_err(Failure::Net)?;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| Failure::Net(e.into()))?;
                w.write(&chunk).map_err(Failure::Store)?;
                if let Some(p) = progress {
                    p.advance(&desc.digest, chunk.len() as u64);
                }
            }
            Ok(())
        }
        .await;
        if let Some(p) = progress {
            p.finish(&desc.digest);
        }
        let e = match transfer {
            Ok(()) => return Ok(w.finish()?),
            Err(Failure::Store(e)) => return Err(e.into()),
            Err(Failure::Net(e)) => e,
        };
        let received = w.written();
        if received == size {
            // Every byte came and the client still objects (its digest
            // check): ours names what is wrong.
            return Err(match w.finish() {
                Err(se) => se.into(),
                Ok(_) => classify(r, e, options),
            });
        }
        if transient(&e) && attempt < options.attempts {
            backoff(attempt).await;
            continue;
        }
        if transient(&e) && request_error(&e).is_none_or(|re| !re.is_timeout()) {
            return Err(PullError::Truncated {
                digest: desc.digest.clone(),
                received,
                size,
                source: e,
            });
        }
        return Err(classify(r, e, options));
    }
}

/// The HTTP client's error inside `e`, if it is one.
fn request_error(e: &OciDistributionError) -> Option<&reqwest::Error> {
    match e {
        OciDistributionError::RequestError(re) => Some(re),
        OciDistributionError::IoError(io) => io.get_ref()?.downcast_ref::<reqwest::Error>(),
        _ => None,
    }
}

/// The entries of an image index, or None if `bytes` is an image manifest.
fn index_entries(r: &Reference, bytes: &[u8]) -> Result<Option<Vec<serde_json::Value>>, PullError> {
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|source| PullError::Manifest {
            reference: r.whole(),
            source,
        })?;
    Ok(v.get("manifests")
        .and_then(|m| m.as_array())
        .map(|m| m.to_vec()))
}

fn platform_name(p: Option<&serde_json::Value>) -> String {
    let field = |k: &str| {
        p.and_then(|p| p.get(k))
            .and_then(|v| v.as_str())
            .unwrap_or("?")
            .to_string()
    };
    let mut s = format!("{}/{}", field("os"), field("architecture"));
    if let Some(v) = p.and_then(|p| p.get("variant")).and_then(|v| v.as_str()) {
        s = format!("{s}/{v}");
    }
    s
}

async fn retrying<T, F, Fut>(attempts: u32, mut f: F) -> Result<T, OciDistributionError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, OciDistributionError>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        match f().await {
            Err(e) if transient(&e) && attempt < attempts => backoff(attempt).await,
            other => return other,
        }
    }
}

async fn backoff(attempt: u32) {
    let ms = 250u64 << attempt.min(5);
    tracing::debug!(attempt, ms, "network error: trying again");
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// A failure the network may not repeat.
fn transient(e: &OciDistributionError) -> bool {
    if let OciDistributionError::ServerError { code, .. } = e {
        return *code >= 500 || *code == 429;
    }
    if let Some(r) = request_error(e) {
        return r.is_connect() || r.is_timeout() || r.is_request() || r.is_body() || r.is_decode();
    }
    matches!(e, OciDistributionError::IoError(_))
}

/// Whether a connect error came from the TLS handshake (a certificate not
/// trusted, a server without TLS) rather than from the TCP connection.
fn tls_failed(re: &reqwest::Error) -> bool {
    std::error::Error::source(re).is_some_and(carries_tls)
}

fn carries_tls(e: &(dyn std::error::Error + 'static)) -> bool {
    if e.is::<rustls::Error>() {
        return true;
    }
    // io::Error's source() skips the error it carries (itself often an
    // io::Error carrying rustls's): look inside.
    let carried = e
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref());
    if carried.is_some_and(|c| carries_tls(c as &(dyn std::error::Error + 'static))) {
        return true;
    }
    e.source().is_some_and(carries_tls)
}

fn is_connect(e: &OciDistributionError) -> bool {
    request_error(e).is_some_and(|r| r.is_connect())
}

fn classify(r: &Reference, e: OciDistributionError, options: &PullOptions) -> PullError {
    let registry = r.resolve_registry().to_string();
    tracing::debug!(error = ?e, "registry request failed");
    if let Some(re) = request_error(&e) {
        if re.is_timeout() {
            return PullError::Timeout {
                registry,
                secs: options.read_timeout.as_secs(),
                source: e,
            };
        }
        if re.is_connect() && tls_failed(re) {
            return PullError::Tls {
                registry,
                source: e,
            };
        }
        if re.is_connect() {
            return PullError::Unreachable {
                registry,
                source: e,
            };
        }
    }
    match &e {
        OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_) => PullError::Unauthorized {
            registry,
            source: e,
        },
        OciDistributionError::ServerError { code: 401, .. } => PullError::Unauthorized {
            registry,
            source: e,
        },
        OciDistributionError::ImageManifestNotFoundError(_)
        | OciDistributionError::ServerError { code: 404, .. } => PullError::UnknownImage {
            reference: r.whole(),
            source: e,
        },
        OciDistributionError::RegistryError { envelope, .. }
            if envelope.errors.iter().any(|x| {
                use oci_client::errors::OciErrorCode as C;
                matches!(x.code, C::ManifestUnknown | C::NameUnknown | C::BlobUnknown)
            }) =>
        {
            PullError::UnknownImage {
                reference: r.whole(),
                source: e,
            }
        }
        OciDistributionError::RegistryError { envelope, .. }
            if envelope.errors.iter().any(|x| {
                use oci_client::errors::OciErrorCode as C;
                matches!(x.code, C::Unauthorized | C::Denied)
            }) =>
        {
            PullError::Unauthorized {
                registry,
                source: e,
            }
        }
        _ => PullError::Registry {
            registry,
            source: e,
        },
    }
}
