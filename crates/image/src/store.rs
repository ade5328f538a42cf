//! The image store: content-addressed blobs under one root, an index of image
//! names to manifest digests, and the locks that keep concurrent users apart.
//!
//! ```text
//! ROOT/blobs/sha256/<hex>   verified blobs (manifests, configs, layers as pulled)
//! ROOT/index.json           name -> manifest digest, config, layers, size, time
//! ROOT/tmp/<id>/, <id>.lock a writer's staging directory, flocked while it lives
//! ROOT/locks/<hex>.lock     one per image name: pulls of one name run one at a time
//! ROOT/gc.lock              shared by writers, exclusive while blobs are collected
//! ROOT/index.lock           held while index.json is rewritten
//! ```
//!
//! A blob appears under `blobs/` only by rename, after its digest and size were
//! checked and its bytes synced; an image appears in the index only after all
//! its blobs did. A killed writer leaves its staging directory, which the next
//! writer or `prune` removes once its lock is free.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

pub const DEFAULT_ROOT: &str = "/var/lib/podvisor/images";

/// How often a waiter tries a lock another process holds.
const LOCK_POLL: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("locking {path}: {source}")]
    Lock {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("{path} is damaged: {source}")]
    DamagedIndex {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{0:?} is not a sha256 digest")]
    BadDigest(String),
    #[error("blob {expected} does not match its digest: its bytes hash to {actual}")]
    DigestMismatch { expected: String, actual: String },
    #[error(
        "blob {digest} is {actual} bytes, but {expected} were announced (truncated or padded)"
    )]
    SizeMismatch {
        digest: String,
        expected: u64,
        actual: u64,
    },
    #[error("no image {0} in the store")]
    UnknownImage(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One stored image, as the index keeps it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageRecord {
    /// The normalized reference it was stored under (`registry/repo:tag`, or
    /// `registry/repo@sha256:...` when pulled by digest).
    pub name: String,
    /// Digest of the platform's image manifest (the image's identity).
    pub digest: String,
    /// Digest of the image index the manifest was chosen from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_digest: Option<String>,
    pub media_type: String,
    pub config: String,
    pub layers: Vec<String>,
    /// Bytes of manifest, config and layers as stored (layers compressed).
    pub size: u64,
    /// When it was stored, seconds since the epoch.
    pub created: u64,
}

impl ImageRecord {
    /// Every blob this image needs.
    pub fn blobs(&self) -> impl Iterator<Item = &str> {
        [self.digest.as_str(), self.config.as_str()]
            .into_iter()
            .chain(self.layers.iter().map(String::as_str))
    }
}

#[derive(Default, Serialize, Deserialize)]
struct IndexFile {
    images: Vec<ImageRecord>,
}

/// What `prune` or `rm` gave back.
#[derive(Debug, Default, Serialize)]
pub struct Reclaimed {
    pub blobs: usize,
    pub bytes: u64,
    pub leftovers: usize,
}

/// The store at one root directory.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
}

/// A held flock; released on drop.
pub struct Lock(#[allow(dead_code)] Flock<File>);

impl Store {
    /// Opens (creating if needed) the store at `root`.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        for d in ["blobs/sha256", "tmp", "locks", "roots"] {
            let p = root.join(d);
            std::fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        Ok(Store {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob `digest` lives (whether or not it is there).
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, StoreError> {
        Ok(self.root.join("blobs/sha256").join(digest_hex(digest)?))
    }

    pub fn has_blob(&self, digest: &str) -> Result<bool, StoreError> {
        Ok(self.blob_path(digest)?.is_file())
    }

    pub fn read_blob(&self, digest: &str) -> Result<Vec<u8>, StoreError> {
        let p = self.blob_path(digest)?;
        std::fs::read(&p).map_err(io_err(&p))
    }

    /// A fresh staging directory for a writer (pull or import).
    pub fn staging(&self) -> Result<Staging, StoreError> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let id = format!(
            "{}-{nanos}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let lock_path = self.root.join("tmp").join(format!("{id}.lock"));
        // Created under another name and renamed once locked, so a collector
        // never sees (and takes for dead) a lock file not yet locked.
        let fresh = self.root.join("tmp").join(format!("{id}.new"));
        let file = File::create(&fresh).map_err(io_err(&fresh))?;
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
            StoreError::Lock {
                path: fresh.clone(),
                source: e,
            }
        })?;
        std::fs::rename(&fresh, &lock_path).map_err(io_err(&lock_path))?;
        let dir = self.root.join("tmp").join(&id);
        std::fs::create_dir(&dir).map_err(io_err(&dir))?;
        Ok(Staging {
            store: self.clone(),
            dir,
            lock_path,
            seq: AtomicU64::new(0),
            _lock: lock,
        })
    }

    /// Moves a staged, checked blob into `blobs/` (a no-op if it is there).
    pub fn promote(&self, blob: &StagedBlob) -> Result<(), StoreError> {
        let dest = self.blob_path(&blob.digest)?;
        if dest.is_file() {
            return Ok(());
        }
        std::fs::rename(&blob.path, &dest).map_err(io_err(&dest))?;
        sync_dir(dest.parent().unwrap_or(&self.root))
    }

    /// Waits for the lock on image `name`, held for the whole of a pull or
    /// import of that name so a second one finds the work done.
    pub async fn lock_image(&self, name: &str) -> Result<Lock, StoreError> {
        let hex = hex::encode(Sha256::digest(name.as_bytes()));
        let path = self.root.join("locks").join(format!("{hex}.lock"));
        wait_lock(&path, false).await
    }

    /// Held (shared) by anything that writes blobs: a collection waits for it.
    pub async fn writer_guard(&self) -> Result<Lock, StoreError> {
        wait_lock(&self.root.join("gc.lock"), true).await
    }

    /// The collector's side of `writer_guard`, if no writer holds it now.
    fn try_gc_guard(&self) -> Result<Option<Lock>, StoreError> {
        try_lock(&self.root.join("gc.lock"), FlockArg::LockExclusiveNonblock)
    }

    /// Every stored image.
    pub fn images(&self) -> Result<Vec<ImageRecord>, StoreError> {
        let path = self.root.join("index.json");
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<IndexFile>(&bytes)
                .map(|f| f.images)
                .map_err(|source| StoreError::DamagedIndex { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// The image a user named: by stored name, full digest, or a digest
    /// prefix of at least 12 hex digits.
    pub fn find(&self, query: &str, normalized: Option<&str>) -> Result<ImageRecord, StoreError> {
        let images = self.images()?;
        let hex = query.strip_prefix("sha256:").unwrap_or(query);
        let by_digest = |r: &ImageRecord| {
            hex.len() >= 12
                && hex.bytes().all(|b| b.is_ascii_hexdigit())
                && r.digest["sha256:".len()..].starts_with(hex)
        };
        images
            .iter()
            .find(|r| r.name == query || Some(r.name.as_str()) == normalized)
            .or_else(|| images.iter().find(|r| by_digest(r)))
            .cloned()
            .ok_or_else(|| StoreError::UnknownImage(query.to_string()))
    }

    /// Records `image` (replacing one of the same name). Its blobs must be in.
    pub async fn put_image(&self, image: ImageRecord) -> Result<(), StoreError> {
        let _lock = wait_lock(&self.root.join("index.lock"), false).await?;
        let mut images = self.images()?;
        images.retain(|r| r.name != image.name);
        images.push(image);
        self.write_index(images)
    }

    /// Drops `name` from the index, then its blobs no other image uses (unless
    /// a writer is busy: `prune` gets them later).
    pub async fn remove_image(&self, name: &str) -> Result<Reclaimed, StoreError> {
        {
            let _lock = wait_lock(&self.root.join("index.lock"), false).await?;
            let mut images = self.images()?;
            let before = images.len();
            images.retain(|r| r.name != name);
            if images.len() == before {
                return Err(StoreError::UnknownImage(name.to_string()));
            }
            self.write_index(images)?;
        }
        match self.try_gc_guard()? {
            Some(_gc) => self.collect_blobs(),
            None => Ok(Reclaimed::default()),
        }
    }

    /// Removes blobs no image uses and writers' leftovers. Waits for writers.
    pub async fn prune(&self) -> Result<Reclaimed, StoreError> {
        let _gc = wait_lock(&self.root.join("gc.lock"), false).await?;
        let leftovers = self.collect_leftovers()?;
        let mut r = self.collect_blobs()?;
        r.leftovers = leftovers;
        Ok(r)
    }

    /// Removes staging directories whose writer is gone; returns how many.
    pub fn collect_leftovers(&self) -> Result<usize, StoreError> {
        let tmp = self.root.join("tmp");
        let mut n = 0;
        for entry in std::fs::read_dir(&tmp).map_err(io_err(&tmp))? {
            let path = entry.map_err(io_err(&tmp))?.path();
            if path.extension().is_none_or(|e| e != "lock") {
                continue;
            }
            if let Some(_held) = try_lock(&path, FlockArg::LockExclusiveNonblock)? {
                let _ = std::fs::remove_dir_all(path.with_extension(""));
                let _ = std::fs::remove_file(&path);
                n += 1;
            }
        }
        Ok(n)
    }

    /// Removes unreferenced blobs. The caller holds the gc lock.
    fn collect_blobs(&self) -> Result<Reclaimed, StoreError> {
        let images = self.images()?;
        let used: HashSet<String> = images
            .iter()
            .flat_map(|r| {
                r.blobs()
                    .map(|d| d.trim_start_matches("sha256:").to_string())
            })
            .collect();
        let dir = self.root.join("blobs/sha256");
        let mut r = Reclaimed::default();
        for entry in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if used.contains(&name) {
                continue;
            }
            let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
            if std::fs::remove_file(entry.path()).is_ok() {
                r.blobs += 1;
                r.bytes += size;
            }
        }
        Ok(r)
    }

    fn write_index(&self, images: Vec<ImageRecord>) -> Result<(), StoreError> {
        let path = self.root.join("index.json");
        let tmp = self.root.join("index.json.tmp");
        let bytes = serde_json::to_vec_pretty(&IndexFile { images }).map_err(|source| {
            StoreError::DamagedIndex {
                path: path.clone(),
                source,
            }
        })?;
        let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(&bytes).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
        sync_dir(&self.root)
    }
}

/// A writer's private directory in the store; removed when dropped.
pub struct Staging {
    store: Store,
    dir: PathBuf,
    lock_path: PathBuf,
    seq: AtomicU64,
    _lock: Flock<File>,
}

impl Staging {
    /// A file to write one blob into. With `expected` (digest, size) the
    /// writer refuses bytes past the size and `finish` checks both.
    pub fn blob(&self, expected: Option<(&str, u64)>) -> Result<BlobWriter, StoreError> {
        if let Some((d, _)) = expected {
            digest_hex(d)?;
        }
        let path = self
            .dir
            .join(format!("blob-{}", self.seq.fetch_add(1, Ordering::Relaxed)));
        let file = File::create(&path).map_err(io_err(&path))?;
        Ok(BlobWriter {
            file,
            path,
            hasher: Sha256::new(),
            written: 0,
            expected: expected.map(|(d, s)| (d.to_string(), s)),
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The writer's directory: anything may be built in it (it goes with
    /// the writer); move results out with a rename.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(&self.lock_path);
    }
}

/// Bytes on their way into the store, hashed and counted as they come.
pub struct BlobWriter {
    file: File,
    path: PathBuf,
    hasher: Sha256,
    written: u64,
    expected: Option<(String, u64)>,
}

/// A complete blob in a staging directory, digest and size known.
#[derive(Clone, Debug)]
pub struct StagedBlob {
    pub digest: String,
    pub size: u64,
    pub path: PathBuf,
}

impl BlobWriter {
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        let total = self.written + bytes.len() as u64;
        if let Some((digest, size)) = &self.expected {
            if total > *size {
                return Err(StoreError::SizeMismatch {
                    digest: digest.clone(),
                    expected: *size,
                    actual: total,
                });
            }
        }
        self.file.write_all(bytes).map_err(io_err(&self.path))?;
        self.hasher.update(bytes);
        self.written = total;
        Ok(())
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    /// Syncs the bytes and checks them against what was announced.
    pub fn finish(self) -> Result<StagedBlob, StoreError> {
        let digest = format!("sha256:{}", hex::encode(self.hasher.finalize()));
        if let Some((expected, size)) = self.expected {
            if self.written != size {
                return Err(StoreError::SizeMismatch {
                    digest: expected,
                    expected: size,
                    actual: self.written,
                });
            }
            if digest != expected {
                return Err(StoreError::DigestMismatch {
                    expected,
                    actual: digest,
                });
            }
        }
        self.file.sync_all().map_err(io_err(&self.path))?;
        Ok(StagedBlob {
            digest,
            size: self.written,
            path: self.path,
        })
    }
}

/// The hex part of a `sha256:<64 hex>` digest.
pub fn digest_hex(digest: &str) -> Result<&str, StoreError> {
    match digest.strip_prefix("sha256:") {
        Some(h) if h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) => {
            Ok(h)
        }
        _ => Err(StoreError::BadDigest(digest.to_string())),
    }
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

fn open_lock_file(path: &Path) -> Result<File, StoreError> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io_err(path))
}

/// A lock on `path` (made if missing); `None` if another holds it and `arg`
/// does not wait.
pub(crate) fn try_lock(path: &Path, arg: FlockArg) -> Result<Option<Lock>, StoreError> {
    let file = match OpenOptions::new().write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => open_lock_file(path)?,
        Err(e) => return Err(io_err(path)(e)),
    };
    match Flock::lock(file, arg) {
        Ok(l) => Ok(Some(Lock(l))),
        Err((_, nix::Error::EWOULDBLOCK)) => Ok(None),
        Err((_, source)) => Err(StoreError::Lock {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Waits, without blocking the async runtime, for a lock on `path`.
async fn wait_lock(path: &Path, shared: bool) -> Result<Lock, StoreError> {
    let arg = if shared {
        FlockArg::LockSharedNonblock
    } else {
        FlockArg::LockExclusiveNonblock
    };
    loop {
        if let Some(l) = try_lock(path, arg)? {
            return Ok(l);
        }
        tokio::time::sleep(LOCK_POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(b: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(b)))
    }

    #[test]
    fn a_blob_is_stored_only_when_digest_and_size_match() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let staging = store.staging().unwrap();
        let d = sha(b"hello");

        let mut w = staging.blob(Some((&d, 5))).unwrap();
        w.write(b"hellx").unwrap();
        assert!(matches!(w.finish(), Err(StoreError::DigestMismatch { .. })));

        let mut w = staging.blob(Some((&d, 5))).unwrap();
        w.write(b"hel").unwrap();
        assert!(matches!(w.finish(), Err(StoreError::SizeMismatch { .. })));

        let mut w = staging.blob(Some((&d, 5))).unwrap();
        assert!(
            w.write(b"hello!").is_err(),
            "bytes past the size are refused"
        );

        let mut w = staging.blob(Some((&d, 5))).unwrap();
        w.write(b"hello").unwrap();
        let b = w.finish().unwrap();
        assert!(!store.has_blob(&d).unwrap());
        store.promote(&b).unwrap();
        assert_eq!(store.read_blob(&d).unwrap(), b"hello");
    }

    #[test]
    fn leftovers_of_a_dead_writer_are_collected_but_not_a_live_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let live = store.staging().unwrap();
        live.blob(None).unwrap().write(b"x").unwrap();
        // A dead writer: a directory and an unlocked lock file.
        std::fs::create_dir(dir.path().join("tmp/dead")).unwrap();
        std::fs::write(dir.path().join("tmp/dead/blob-0"), b"partial").unwrap();
        std::fs::write(dir.path().join("tmp/dead.lock"), b"").unwrap();
        assert_eq!(store.collect_leftovers().unwrap(), 1);
        assert!(!dir.path().join("tmp/dead").exists());
        assert!(live.dir.exists());
        drop(live);
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }

    #[tokio::test]
    async fn rm_and_prune_keep_blobs_other_images_use() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let staging = store.staging().unwrap();
        let put = |bytes: &[u8]| {
            let mut w = staging.blob(None).unwrap();
            w.write(bytes).unwrap();
            let b = w.finish().unwrap();
            store.promote(&b).unwrap();
            b.digest
        };
        let (m1, m2, c, shared, only1) = (put(b"m1"), put(b"m2"), put(b"c"), put(b"l"), put(b"l1"));
        let orphan = put(b"orphan");
        let rec = |name: &str, digest: &str, layers: Vec<String>| ImageRecord {
            name: name.into(),
            digest: digest.into(),
            index_digest: None,
            media_type: "m".into(),
            config: c.clone(),
            layers,
            size: 0,
            created: 0,
        };
        store
            .put_image(rec("a/x:1", &m1, vec![shared.clone(), only1.clone()]))
            .await
            .unwrap();
        store
            .put_image(rec("a/y:1", &m2, vec![shared.clone()]))
            .await
            .unwrap();
        let r = store.remove_image("a/x:1").await.unwrap();
        assert_eq!(r.blobs, 3, "m1, only1 and the orphan");
        assert!(!store.has_blob(&only1).unwrap() && !store.has_blob(&orphan).unwrap());
        assert!(store.has_blob(&shared).unwrap() && store.has_blob(&c).unwrap());
        assert_eq!(store.find(&m2[7..19], None).unwrap().name, "a/y:1");
        assert!(matches!(
            store.remove_image("a/x:1").await,
            Err(StoreError::UnknownImage(_))
        ));
        drop(staging);
        assert_eq!(store.prune().await.unwrap().blobs, 0);
    }
}
