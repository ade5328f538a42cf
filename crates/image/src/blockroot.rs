//! Block roots: each stored image, once per manifest digest, made into one
//! read-only ext4 filesystem image that sandboxes get on virtio-blk, and the
//! empty filesystems their writable layers start from.
//!
//! ```text
//! ROOT/roots/<hex>.ext4        the image's layers, flattened (read-only)
//! ROOT/roots/<hex>.lock        held while it is built: one build per digest
//! ROOT/roots/empty-<MiB>.ext4  an empty filesystem of that size (sparse)
//! ROOT/roots/tree-<key>.ext4   a directory tree's root (`tree_root`)
//! ```
//!
//! A root appears under its name only by rename, after `mkfs.ext4` finished
//! and its bytes were synced; a killed build leaves a staging directory that
//! the next writer or `prune` removes.
//!
//! ext4 (`mkfs.ext4 -d`, e2fsprogs), not erofs: Debian 12's erofs-utils 1.5
//! writes a sparse file's holes as data (a 1 GiB sparse file takes 1 GiB),
//! while `mkfs.ext4 -d` keeps holes, xattrs (file capabilities), device
//! nodes and hard links; the image is mounted read-only all the same.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::fcntl::FlockArg;

use crate::store::{digest_hex, sync_dir, try_lock, ImageRecord, Lock, Store, StoreError};
use crate::unpack::{self, Limits, UnpackError};

#[derive(Debug, thiserror::Error)]
pub enum BlockRootError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Unpack(#[from] UnpackError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mkfs.ext4 not found (install Debian's e2fsprogs): {0}")]
    MissingMkfs(std::io::Error),
    #[error("mkfs.ext4 failed for {path}: {stderr}")]
    Mkfs { path: PathBuf, stderr: String },
    #[error("block root name {0:?}: use 1 to 64 of a-z, 0-9 and -")]
    BadKey(String),
    #[error("writable layer size {0} MiB is out of range (16 MiB to 16 TiB)")]
    BadSize(u64),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BlockRootError + '_ {
    move |source| BlockRootError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where image `record`'s block root lives (whether or not it was built).
pub fn root_path(store: &Store, record: &ImageRecord) -> Result<PathBuf, BlockRootError> {
    let hex = digest_hex(&record.digest)?;
    Ok(store.root().join("roots").join(format!("{hex}.ext4")))
}

/// Image `record`'s block root, built now if it was not yet (waiting for a
/// build of the same image another process runs).
pub fn block_root(
    store: &Store,
    record: &ImageRecord,
    limits: &Limits,
) -> Result<PathBuf, BlockRootError> {
    let dest = root_path(store, record)?;
    build_once(store, &dest, |staging| {
        let image = staging.join("root.ext4");
        build_root(store, record, limits, staging, &image)?;
        Ok(image)
    })
}

/// `dest`, built by `build` in a staging directory (returning the file to
/// rename to `dest`) unless it is there; one build at a time per `dest`.
fn build_once(
    store: &Store,
    dest: &Path,
    build: impl FnOnce(&Path) -> Result<PathBuf, BlockRootError>,
) -> Result<PathBuf, BlockRootError> {
    if dest.is_file() {
        return Ok(dest.to_path_buf());
    }
    let _lock = lock(&dest.with_extension("lock"))?;
    if dest.is_file() {
        return Ok(dest.to_path_buf());
    }
    let staging = store.staging()?;
    let built = build(staging.dir())?;
    File::open(&built)
        .and_then(|f| f.sync_all())
        .map_err(io_err(&built))?;
    std::fs::rename(&built, dest).map_err(io_err(dest))?;
    sync_dir(dest.parent().unwrap_or(store.root()))?;
    Ok(dest.to_path_buf())
}

/// Unpacks `record`'s layers in `staging` and makes `image` of them.
fn build_root(
    store: &Store,
    record: &ImageRecord,
    limits: &Limits,
    staging: &Path,
    image: &Path,
) -> Result<(), BlockRootError> {
    let tree = staging.join("tree");
    let seen = unpack::unpack_image(store, record, &tree, limits)?;
    tracing::debug!(files = seen.files, "unpacked for a block root");
    mkfs_tree(&tree, image)
}

/// Directory `tree` made into a read-only root named `key` (the caller's
/// name for that tree's contents, such as a hash of what built it), built
/// unless it is there: for roots that are trees, not stored images
/// (podvisord's templates). `collect` leaves these alone.
pub fn tree_root(store: &Store, tree: &Path, key: &str) -> Result<PathBuf, BlockRootError> {
    if key.is_empty()
        || key.len() > 64
        || !key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(BlockRootError::BadKey(key.into()));
    }
    let dest = store
        .root()
        .join("roots")
        .join(format!("{TREE_PREFIX}{key}.ext4"));
    build_once(store, &dest, |staging| {
        let image = staging.join("root.ext4");
        mkfs_tree(tree, &image)?;
        Ok(image)
    })
}

/// Names of roots made by `tree_root`.
const TREE_PREFIX: &str = "tree-";

/// `image`, an ext4 filesystem holding `tree` with room for its metadata.
fn mkfs_tree(tree: &Path, image: &Path) -> Result<(), BlockRootError> {
    let (bytes, inodes) = usage(tree)?;
    // Room for ext4's own metadata (inode tables, bitmaps, directories'
    // blocks) over what the files use: a quarter more, and 32 MiB at least.
    let size_mib = (bytes + bytes / 4) / (1 << 20) + 32;
    let inodes = inodes + inodes / 4 + 1024;
    tracing::debug!(bytes, size_mib, "building block root");
    mkfs(
        image,
        size_mib,
        Some(tree),
        &["-N", &inodes.to_string(), "-L", "podvisor-root"],
    )
}

/// An empty ext4 filesystem of `size_mib` (sparse: a few MiB on disk), the
/// base every writable layer of that size is a copy-on-write overlay of.
pub fn empty_fs(store: &Store, size_mib: u64) -> Result<PathBuf, BlockRootError> {
    if !(16..=16 << 20).contains(&size_mib) {
        return Err(BlockRootError::BadSize(size_mib));
    }
    let dest = store
        .root()
        .join("roots")
        .join(format!("empty-{size_mib}.ext4"));
    build_once(store, &dest, |staging| {
        let image = staging.join("empty.ext4");
        mkfs(&image, size_mib, None, &["-L", "podvisor-layer"])?;
        Ok(image)
    })
}

/// Removes the block roots of images no longer stored, and every empty
/// filesystem (made again on demand); returns the bytes given back. Roots in
/// use stay readable by their users (unlinked, not overwritten).
pub fn collect(store: &Store) -> Result<u64, BlockRootError> {
    let dir = store.root().join("roots");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(0);
    };
    let images = store.images()?;
    let kept: Vec<String> = images
        .iter()
        .filter_map(|r| digest_hex(&r.digest).ok().map(|h| format!("{h}.ext4")))
        .collect();
    let mut freed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".ext4") || kept.contains(&name) || name.starts_with(TREE_PREFIX) {
            continue;
        }
        let lock = entry.path().with_extension("lock");
        let Some(_held) = try_lock(&lock, FlockArg::LockExclusiveNonblock)? else {
            continue;
        };
        let blocks = entry.metadata().map(|m| m.blocks() * 512).unwrap_or(0);
        if std::fs::remove_file(entry.path()).is_ok() {
            freed += blocks;
        }
    }
    Ok(freed)
}

/// Bytes the tree's files occupy (blocks, so holes count nothing) and how
/// many inodes it has. Never follows symlinks.
fn usage(tree: &Path) -> Result<(u64, u64), BlockRootError> {
    let mut bytes = 0;
    let mut inodes = 0;
    let mut todo = vec![tree.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            let meta = entry.metadata().map_err(io_err(&entry.path()))?;
            inodes += 1;
            bytes += meta.blocks() * 512;
            if meta.is_dir() {
                todo.push(entry.path());
            }
        }
    }
    Ok((bytes, inodes))
}

/// `mkfs.ext4` of a new sparse file `image` of `size_mib`, filled from
/// `tree` when given. No journal: roots are read-only, and a writable layer
/// lives only as long as its sandbox.
fn mkfs(
    image: &Path,
    size_mib: u64,
    tree: Option<&Path>,
    extra: &[&str],
) -> Result<(), BlockRootError> {
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args([
        "-q",
        "-F",
        "-t",
        "ext4",
        "-b",
        "4096",
        "-m",
        "0",
        "-O",
        "^has_journal",
    ])
    .args(["-E", "lazy_itable_init=1,root_owner=0:0"])
    .args(extra);
    if let Some(tree) = tree {
        cmd.arg("-d").arg(tree);
    }
    cmd.arg(image).arg(format!("{size_mib}M"));
    let out = cmd.output().map_err(BlockRootError::MissingMkfs)?;
    if !out.status.success() {
        let _ = std::fs::remove_file(image);
        return Err(BlockRootError::Mkfs {
            path: image.to_path_buf(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// The build lock of `path`, waited for.
fn lock(path: &Path) -> Result<Lock, BlockRootError> {
    try_lock(path, FlockArg::LockExclusive)?.ok_or_else(|| {
        BlockRootError::Store(StoreError::Lock {
            path: path.to_path_buf(),
            source: nix::Error::EWOULDBLOCK,
        })
    })
}
