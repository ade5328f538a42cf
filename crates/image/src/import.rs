//! `import`: images from the tarballs `podman save` and `skopeo copy` write
//! (docker-archive and oci-archive) into the store. The archive is read once,
//! as a stream; its members go only into a staging directory of the store,
//! never to a path the archive names.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use oci_client::manifest;
use serde::Deserialize;

use crate::store::{now_secs, ImageRecord, StagedBlob, Staging, Store, StoreError};
use crate::{layer_media_type_supported, platform_of, Platform};

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{path} is neither a docker-archive (manifest.json) nor an oci-archive (index.json)")]
    UnknownFormat { path: PathBuf },
    #[error("{member} in the archive is not what it should be: {source}")]
    Json {
        member: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the archive lacks {member}")]
    Missing { member: String },
    #[error("the archive names no image: give it one with --name")]
    NoName,
    #[error("{name:?} is not an image name: {source}")]
    Name {
        name: String,
        #[source]
        source: oci_client::ParseError,
    },
    #[error("the archive has no linux/amd64 image")]
    NoPlatform,
    #[error("unsupported layer media type {0:?}")]
    LayerType(String),
}

/// Imports every image in the archive at `path`; `name` replaces the name the
/// archive gives (and names an archive that gives none).
pub async fn import(
    store: &Store,
    path: &Path,
    name: Option<&str>,
) -> Result<Vec<ImageRecord>, ImportError> {
    store.collect_leftovers()?;
    let _writer = store.writer_guard().await?;
    let staging = store.staging()?;
    let members = read_archive(path, &staging)?;
    let images = if members.contains("manifest.json") {
        docker_archive(&members, &staging, name)?
    } else if members.contains("index.json") {
        oci_archive(&members, name)?
    } else {
        return Err(ImportError::UnknownFormat {
            path: path.to_path_buf(),
        });
    };
    let mut records = Vec::new();
    for image in images {
        let _lock = store.lock_image(&image.record.name).await?;
        for blob in &image.blobs {
            store.promote(blob)?;
        }
        let mut record = image.record;
        record.created = now_secs();
        store.put_image(record.clone()).await?;
        records.push(record);
    }
    Ok(records)
}

/// The archive's regular files, each staged and hashed, by path.
struct Members {
    files: HashMap<String, StagedBlob>,
    links: HashMap<String, String>,
}

impl Members {
    fn contains(&self, member: &str) -> bool {
        self.get(member).is_some()
    }

    /// A member by path, following the archive's own symlinks (docker's
    /// archives link repeated layers).
    fn get(&self, member: &str) -> Option<&StagedBlob> {
        let mut m = normalize(Path::new(member))?;
        for _ in 0..16 {
            if let Some(f) = self.files.get(&m) {
                return Some(f);
            }
            m = self.links.get(&m)?.clone();
        }
        None
    }

    fn require(&self, member: &str) -> Result<&StagedBlob, ImportError> {
        self.get(member).ok_or_else(|| ImportError::Missing {
            member: member.to_string(),
        })
    }

    fn json<T: serde::de::DeserializeOwned>(&self, member: &str) -> Result<T, ImportError> {
        let f = self.require(member)?;
        let bytes = std::fs::read(&f.path).map_err(|source| ImportError::Read {
            path: f.path.clone(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|source| ImportError::Json {
            member: member.to_string(),
            source,
        })
    }

    /// A blob of an oci-archive, by digest.
    fn blob(&self, digest: &str) -> Result<&StagedBlob, ImportError> {
        let hex = crate::store::digest_hex(digest)?;
        self.require(&format!("blobs/sha256/{hex}"))
    }
}

fn read_archive(path: &Path, staging: &Staging) -> Result<Members, ImportError> {
    let read_err = |source| ImportError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut archive = tar::Archive::new(file);
    let mut members = Members {
        files: HashMap::new(),
        links: HashMap::new(),
    };
    for entry in archive.entries().map_err(read_err)? {
        let mut entry = entry.map_err(read_err)?;
        let Some(member) = normalize(&entry.path().map_err(read_err)?) else {
            continue;
        };
        match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                // A blob named by digest is checked against it.
                let expected = member
                    .strip_prefix("blobs/sha256/")
                    .map(|hex| (format!("sha256:{hex}"), entry.size()));
                let mut w = staging.blob(expected.as_ref().map(|(d, s)| (d.as_str(), *s)))?;
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    let n = entry.read(&mut buf).map_err(read_err)?;
                    if n == 0 {
                        break;
                    }
                    w.write(&buf[..n])?;
                }
                members.files.insert(member, w.finish()?);
            }
            tar::EntryType::Symlink | tar::EntryType::Link => {
                let Some(target) = entry.link_name().map_err(read_err)? else {
                    continue;
                };
                let base = if entry.header().entry_type() == tar::EntryType::Link {
                    PathBuf::new()
                } else {
                    Path::new(&member)
                        .parent()
                        .map(Path::to_path_buf)
                        .unwrap_or_default()
                };
                if let Some(t) = normalize(&base.join(target)) {
                    members.links.insert(member, t);
                }
            }
            _ => {}
        }
    }
    Ok(members)
}

/// A member path without `.`, `..` resolved inside the archive; None if it
/// climbs out of it or is empty.
fn normalize(p: &Path) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => parts.push(s.to_str()?),
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// An image found in an archive: its record and the blobs to promote.
struct Found {
    record: ImageRecord,
    blobs: Vec<StagedBlob>,
}

fn full_name(name: &str) -> Result<String, ImportError> {
    name.parse::<oci_client::Reference>()
        .map(|r| r.whole())
        .map_err(|source| ImportError::Name {
            name: name.to_string(),
            source,
        })
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// docker-archive: `manifest.json` lists config and layer files (plain tar
/// layers, stored as they are, under an OCI manifest made here).
fn docker_archive(
    members: &Members,
    staging: &Staging,
    name: Option<&str>,
) -> Result<Vec<Found>, ImportError> {
    let entries: Vec<DockerEntry> = members.json("manifest.json")?;
    let mut found = Vec::new();
    for e in entries {
        let config = members.require(&e.config)?.clone();
        let mut layers = Vec::new();
        for l in &e.layers {
            let blob = members.require(l)?.clone();
            let media_type = layer_media_type(&blob)?;
            layers.push((blob, media_type));
        }
        let descriptor = |digest: &str, size: u64, media_type: &str| serde_json::json!({ "mediaType": media_type, "digest": digest, "size": size });
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": manifest::OCI_IMAGE_MEDIA_TYPE,
            "config": descriptor(&config.digest, config.size, manifest::IMAGE_CONFIG_MEDIA_TYPE),
            "layers": layers.iter().map(|(b, t)| descriptor(&b.digest, b.size, t)).collect::<Vec<_>>(),
        });
        let mut w = staging.blob(None)?;
        w.write(manifest.to_string().as_bytes())?;
        let manifest = w.finish()?;
        let names = match name {
            Some(n) => vec![n.to_string()],
            None => e.repo_tags.clone().unwrap_or_default(),
        };
        if names.is_empty() {
            return Err(ImportError::NoName);
        }
        let mut blobs = vec![manifest.clone(), config.clone()];
        blobs.extend(layers.iter().map(|(b, _)| b.clone()));
        for n in names {
            found.push(Found {
                record: ImageRecord {
                    name: full_name(&n)?,
                    digest: manifest.digest.clone(),
                    index_digest: None,
                    media_type: manifest::OCI_IMAGE_MEDIA_TYPE.to_string(),
                    config: config.digest.clone(),
                    layers: layers.iter().map(|(b, _)| b.digest.clone()).collect(),
                    size: blobs.iter().map(|b| b.size).sum(),
                    created: 0,
                },
                blobs: blobs.clone(),
            });
        }
    }
    Ok(found)
}

/// The media type of a docker-archive layer, by its first bytes.
fn layer_media_type(blob: &StagedBlob) -> Result<&'static str, ImportError> {
    let mut magic = [0u8; 4];
    let n = std::fs::File::open(&blob.path)
        .and_then(|mut f| f.read(&mut magic))
        .map_err(|source| ImportError::Read {
            path: blob.path.clone(),
            source,
        })?;
    Ok(match &magic[..n] {
        [0x1f, 0x8b, ..] => manifest::IMAGE_LAYER_GZIP_MEDIA_TYPE,
        [0x28, 0xb5, 0x2f, 0xfd] => "application/vnd.oci.image.layer.v1.tar+zstd",
        _ => manifest::IMAGE_LAYER_MEDIA_TYPE,
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OciIndex {
    manifests: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OciDescriptor {
    media_type: String,
    digest: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OciManifest {
    #[serde(default)]
    media_type: Option<String>,
    config: OciDescriptor,
    layers: Vec<OciDescriptor>,
}

const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// oci-archive: an OCI layout; `index.json` names the images.
fn oci_archive(members: &Members, name: Option<&str>) -> Result<Vec<Found>, ImportError> {
    let index: OciIndex = members.json("index.json")?;
    let mut found = Vec::new();
    for entry in &index.manifests {
        let ref_name = entry
            .pointer(&format!("/annotations/{}", REF_NAME.replace('/', "~1")))
            .and_then(|v| v.as_str());
        let Some(n) = name.or(ref_name.filter(|n| n.contains('/') || n.contains(':'))) else {
            return Err(ImportError::NoName);
        };
        let digest = entry["digest"].as_str().unwrap_or_default();
        let (digest, index_digest) = if entry["mediaType"] == manifest::OCI_IMAGE_INDEX_MEDIA_TYPE {
            let nested: OciIndex = members.json(&members_path(digest)?)?;
            let chosen = nested
                .manifests
                .iter()
                .find(|e| platform_of(e) == Some(Platform::LINUX_AMD64))
                .and_then(|e| e["digest"].as_str())
                .ok_or(ImportError::NoPlatform)?;
            (chosen.to_string(), Some(digest.to_string()))
        } else {
            (digest.to_string(), None)
        };
        let m: OciManifest = members.json(&members_path(&digest)?)?;
        if let Some(l) = m
            .layers
            .iter()
            .find(|l| !layer_media_type_supported(&l.media_type))
        {
            return Err(ImportError::LayerType(l.media_type.clone()));
        }
        let mut blobs = vec![
            members.blob(&digest)?.clone(),
            members.blob(&m.config.digest)?.clone(),
        ];
        for l in &m.layers {
            blobs.push(members.blob(&l.digest)?.clone());
        }
        found.push(Found {
            record: ImageRecord {
                name: full_name(n)?,
                digest,
                index_digest,
                media_type: m
                    .media_type
                    .unwrap_or_else(|| manifest::OCI_IMAGE_MEDIA_TYPE.to_string()),
                config: m.config.digest,
                layers: m.layers.into_iter().map(|l| l.digest).collect(),
                size: blobs.iter().map(|b| b.size).sum(),
                created: 0,
            },
            blobs,
        });
        if name.is_some() {
            break;
        }
    }
    Ok(found)
}

fn members_path(digest: &str) -> Result<String, ImportError> {
    Ok(format!(
        "blobs/sha256/{}",
        crate::store::digest_hex(digest)?
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_paths_stay_inside_the_archive() {
        assert_eq!(normalize(Path::new("./a/b/../c")).as_deref(), Some("a/c"));
        assert_eq!(normalize(Path::new("/abs/x")).as_deref(), Some("abs/x"));
        assert_eq!(normalize(Path::new("../../etc/passwd")), None);
        assert_eq!(normalize(Path::new(".")), None);
    }
}
