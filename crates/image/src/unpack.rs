//! Flattens an image's layers into one directory tree, as OCI's "Applying
//! Changesets" says. Layers are hostile: every name resolves inside the root.
//!
//! Parents are opened with openat2(RESOLVE_IN_ROOT), so a symlink an earlier
//! entry planted (`evil -> /etc`) leads back into the root, never out of it;
//! the last component is never followed: it is made or replaced with *at()
//! calls relative to that parent.

use std::cell::Cell;
use std::collections::HashSet;
use std::ffi::CString;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{self, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{self, FchmodatFlags, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{self, Gid, Uid, UnlinkatFlags};
use tar::EntryType;

use crate::store::{ImageRecord, Store, StoreError};

/// How much of an image one unpack may produce, counted over all its layers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Apparent bytes (file sizes, holes included).
    pub max_bytes: u64,
    /// Tar entries, whiteouts and skipped ones included.
    pub max_entries: u64,
    /// Bytes of one entry's path or link target, as the tar names it.
    pub max_path: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_bytes: 64 << 30,
            max_entries: 2_000_000,
            max_path: 4096,
        }
    }
}

/// What the layers applied so far amounted to (what `Limits` bounds).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Unpacked {
    /// Tar entries: files of every kind, whiteouts and skipped ones too.
    pub files: u64,
    /// Apparent bytes of their data.
    pub bytes: u64,
}

/// Why an entry's path (or hard-link target) is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathProblem {
    #[error("it has a `..` component")]
    DotDot,
    #[error("it names no file")]
    Empty,
    #[error("it contains a NUL byte")]
    Nul,
    #[error("it is longer than {0} bytes")]
    TooLong(usize),
}

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("layer {layer}: entry {path:?}: refused path")]
    BadPath {
        layer: usize,
        path: String,
        #[source]
        problem: PathProblem,
    },
    #[error("layer {layer}: entry {path:?}: refused link target {target:?}")]
    BadLinkTarget {
        layer: usize,
        path: String,
        target: String,
        #[source]
        problem: PathProblem,
    },
    #[error("layer {layer}: entry {path:?}: a link without a target")]
    NoLinkTarget { layer: usize, path: String },
    #[error("layer {layer}: entry {path:?}: hard link target {target:?} does not exist")]
    LinkTargetMissing {
        layer: usize,
        path: String,
        target: String,
    },
    #[error("layer {layer}: entry {path:?}: hard link to the directory {target:?}")]
    LinkToDirectory {
        layer: usize,
        path: String,
        target: String,
    },
    #[error("layer {layer}: entry {path:?}: bad {field} in its header")]
    Header {
        layer: usize,
        path: String,
        field: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("layer {layer}: entry {path:?}: the image has more than {max} entries")]
    TooManyEntries {
        layer: usize,
        path: String,
        max: u64,
    },
    #[error("layer {layer}: entry {path:?}: the image has more than {max} bytes")]
    TooManyBytes {
        layer: usize,
        path: String,
        max: u64,
    },
    #[error("layer {layer}: after entry {after:?}: a long name or PAX header over {max} bytes")]
    MetadataTooLarge {
        layer: usize,
        after: String,
        max: u64,
    },
    #[error("layer {layer}: after entry {after:?}: the stream is damaged")]
    Corrupt {
        layer: usize,
        after: String,
        #[source]
        source: io::Error,
    },
    #[error("layer {layer}: after entry {after:?}: the stream ends before the tar end marker")]
    Truncated { layer: usize, after: String },
    #[error("layer {layer}: entry {path:?}: the stream ends after {got} of its {size} bytes")]
    ShortData {
        layer: usize,
        path: String,
        got: u64,
        size: u64,
    },
    #[error("layer {layer}: entry {path:?}: reading its data")]
    Data {
        layer: usize,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("layer {layer}: entry {path:?}: {op}")]
    Fs {
        layer: usize,
        path: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {op}")]
    Root {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("layer {layer} ({digest})")]
    Blob {
        layer: usize,
        digest: String,
        #[source]
        source: StoreError,
    },
    #[error("layer {layer}: opening {path}")]
    OpenLayer {
        layer: usize,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Bytes the tar reader may take between two entries (headers, GNU long
/// names, PAX records, sparse maps): it holds them all in memory.
const METADATA_MAX: u64 = 4 << 20;
/// Zero runs this long are left as holes.
const BLOCK: usize = 64 << 10;
/// What `after` says before the first entry.
const START: &str = "(start of layer)";

/// Applies `layer` (a tar stream, plain or gzip or zstd: detected by its
/// magic bytes) on top of the tree at `root`, an open directory. `index` is
/// the layer's place in the image, for messages; `seen` carries the counts
/// `limits` bounds from one layer to the next.
pub fn apply_layer(
    root: BorrowedFd<'_>,
    layer: impl Read,
    index: usize,
    limits: &Limits,
    seen: &mut Unpacked,
) -> Result<(), UnpackError> {
    let corrupt = |after: &str| {
        let after = after.to_string();
        move |source| UnpackError::Corrupt {
            layer: index,
            after,
            source,
        }
    };
    let gauge = Rc::new(Gauge::default());
    let stream = decompress(layer).map_err(corrupt(START))?;
    let mut archive = tar::Archive::new(Gauged {
        inner: stream,
        gauge: Rc::clone(&gauge),
    });
    let mut applier = Applier {
        root,
        layer: index,
        limits,
        ours: HashSet::new(),
        dir_times: Vec::new(),
    };
    let mut after = START.to_string();
    let mut entries = archive.entries().map_err(corrupt(START))?;
    loop {
        gauge.budget.set(Some(METADATA_MAX));
        let next = entries.next();
        gauge.budget.set(None);
        let mut entry = match next {
            None if gauge.eof.get() => {
                return Err(UnpackError::Truncated {
                    layer: index,
                    after,
                })
            }
            None => break,
            Some(Err(_)) if gauge.over.get() => {
                return Err(UnpackError::MetadataTooLarge {
                    layer: index,
                    after,
                    max: METADATA_MAX,
                })
            }
            Some(Err(source)) => return Err(corrupt(&after)(source)),
            Some(Ok(entry)) => entry,
        };
        after = applier.apply(&mut entry, seen)?;
    }
    // The rest (tar padding, the compressor's checksum) must read cleanly.
    let budget = limits.max_bytes.saturating_sub(seen.bytes) + METADATA_MAX;
    let trailing = io::copy(
        &mut archive.into_inner().take(budget.saturating_add(1)),
        &mut io::sink(),
    )
    .map_err(corrupt(&after))?;
    if trailing > budget {
        return Err(UnpackError::TooManyBytes {
            layer: index,
            path: after,
            max: limits.max_bytes,
        });
    }
    applier.finish()
}

/// Every layer of `record`, bottom to top, into `root_dir`, which must not
/// exist yet. On error nothing of it is left.
pub fn unpack_image(
    store: &Store,
    record: &ImageRecord,
    root_dir: &Path,
    limits: &Limits,
) -> Result<Unpacked, UnpackError> {
    let root_err = |op| {
        move |source| UnpackError::Root {
            path: root_dir.to_path_buf(),
            op,
            source,
        }
    };
    std::fs::create_dir(root_dir).map_err(root_err("creating"))?;
    let result = unpack_into(store, record, root_dir, limits);
    if result.is_err() {
        if let Err(e) = remove_path(root_dir) {
            tracing::warn!(root = %root_dir.display(), error = %e, "removing a partial unpack");
        }
    }
    result
}

fn unpack_into(
    store: &Store,
    record: &ImageRecord,
    root_dir: &Path,
    limits: &Limits,
) -> Result<Unpacked, UnpackError> {
    let root = fcntl::open(
        root_dir,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map(owned)
    .map_err(|e| UnpackError::Root {
        path: root_dir.to_path_buf(),
        op: "opening",
        source: e.into(),
    })?;
    let mut seen = Unpacked::default();
    for (layer, digest) in record.layers.iter().enumerate() {
        let path = store
            .blob_path(digest)
            .map_err(|source| UnpackError::Blob {
                layer,
                digest: digest.clone(),
                source,
            })?;
        let file = File::open(&path).map_err(|source| UnpackError::OpenLayer {
            layer,
            path: path.clone(),
            source,
        })?;
        apply_layer(root.as_fd(), file, layer, limits, &mut seen)?;
    }
    Ok(seen)
}

/// The decompressed tar stream of a layer, by its first bytes.
fn decompress<'a>(layer: impl Read + 'a) -> io::Result<Box<dyn Read + 'a>> {
    let mut input = BufReader::with_capacity(256 << 10, layer);
    let mut magic = [0u8; 4];
    let mut n = 0;
    while n < magic.len() {
        match input.read(&mut magic[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let input = io::Cursor::new(magic[..n].to_vec()).chain(input);
    Ok(match magic[..n] {
        [0x1f, 0x8b, ..] => Box::new(BufReader::new(flate2::bufread::MultiGzDecoder::new(input))),
        [0x28, 0xb5, 0x2f, 0xfd] => Box::new(BufReader::new(
            zstd::stream::read::Decoder::with_buffer(input)?,
        )),
        _ => Box::new(input),
    })
}

/// What the tar reader did with the stream between two entries.
#[derive(Default)]
struct Gauge {
    /// Bytes it may still take (None while we read an entry's data).
    budget: Cell<Option<u64>>,
    /// It asked for more than `budget`.
    over: Cell<bool>,
    /// It found the stream's end, not the archive's end marker.
    eof: Cell<bool>,
}

struct Gauged<R> {
    inner: R,
    gauge: Rc<Gauge>,
}

impl<R: Read> Read for Gauged<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let g = &self.gauge;
        let buf = match g.budget.get() {
            None => buf,
            Some(0) if !buf.is_empty() => {
                g.over.set(true);
                return Err(io::Error::other("tar metadata over budget"));
            }
            Some(left) => {
                let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                &mut buf[..n]
            }
        };
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            g.eof.set(true);
        }
        if let Some(left) = g.budget.get() {
            g.budget.set(Some(left - n as u64));
        }
        Ok(n)
    }
}

/// Ownership, mode, time and xattrs of an entry, from its header.
struct Meta {
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: TimeSpec,
    xattrs: Vec<(CString, Vec<u8>)>,
}

/// One layer being applied.
struct Applier<'a> {
    root: BorrowedFd<'a>,
    layer: usize,
    limits: &'a Limits,
    /// (device, inode) of a directory and a name in it this layer put there:
    /// what its whiteouts and opaque markers must keep.
    ours: HashSet<(u64, u64, Vec<u8>)>,
    /// Set last: every entry made inside a directory changes its mtime.
    dir_times: Vec<(Vec<u8>, TimeSpec)>,
}

/// Names the entry in errors.
struct At<'e> {
    layer: usize,
    path: &'e str,
}

impl At<'_> {
    fn fs(&self, op: &'static str) -> impl FnOnce(Errno) -> UnpackError + '_ {
        move |e| UnpackError::Fs {
            layer: self.layer,
            path: self.path.to_string(),
            op,
            source: e.into(),
        }
    }

    fn header(&self, field: &'static str) -> impl FnOnce(io::Error) -> UnpackError + '_ {
        move |source| UnpackError::Header {
            layer: self.layer,
            path: self.path.to_string(),
            field,
            source,
        }
    }

    fn bad_path(&self, problem: PathProblem) -> UnpackError {
        UnpackError::BadPath {
            layer: self.layer,
            path: self.path.to_string(),
            problem,
        }
    }

    fn bad_target(&self, target: &[u8], problem: PathProblem) -> UnpackError {
        UnpackError::BadLinkTarget {
            layer: self.layer,
            path: self.path.to_string(),
            target: String::from_utf8_lossy(target).into_owned(),
            problem,
        }
    }
}

impl Applier<'_> {
    /// Applies one entry; returns its path as messages show it.
    fn apply<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        seen: &mut Unpacked,
    ) -> Result<String, UnpackError> {
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let at = At {
            layer: self.layer,
            path: &shown,
        };
        let size = entry.size();
        if seen.files >= self.limits.max_entries {
            return Err(UnpackError::TooManyEntries {
                layer: self.layer,
                path: shown,
                max: self.limits.max_entries,
            });
        }
        if size > self.limits.max_bytes - seen.bytes.min(self.limits.max_bytes) {
            return Err(UnpackError::TooManyBytes {
                layer: self.layer,
                path: shown,
                max: self.limits.max_bytes,
            });
        }
        seen.files += 1;
        seen.bytes += size;

        let kind = entry.header().entry_type();
        // Nothing in a global PAX header (a comment, a default mtime)
        // changes the tree.
        let written = if kind.is_pax_global_extensions() {
            0
        } else {
            self.place(&at, &raw, entry, kind, size)?
        };
        // Data nobody wanted is read here, not by the tar reader on its
        // metadata budget.
        let drained = io::copy(entry, &mut io::sink()).map_err(|source| UnpackError::Data {
            layer: self.layer,
            path: shown.clone(),
            source,
        })?;
        if written + drained != size {
            return Err(UnpackError::ShortData {
                layer: self.layer,
                path: shown,
                got: written + drained,
                size,
            });
        }
        Ok(shown)
    }

    /// Puts the entry in the tree; returns how much of its data it read.
    fn place<R: Read>(
        &mut self,
        at: &At<'_>,
        raw: &[u8],
        entry: &mut tar::Entry<'_, R>,
        kind: EntryType,
        size: u64,
    ) -> Result<u64, UnpackError> {
        let path = normalize(raw, self.limits.max_path).map_err(|p| at.bad_path(p))?;
        let is_file = matches!(
            kind,
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse
        );
        // Old tars mark directories by a trailing slash on a regular entry.
        let is_dir = kind.is_dir() || (kind == EntryType::Regular && raw.ends_with(b"/"));
        let (dir, name) = split_parent(&path);
        if path.is_empty() {
            if !is_dir {
                return Err(at.bad_path(PathProblem::Empty));
            }
            let meta = self.meta(at, entry)?;
            let fd = open_in_root(self.root, b"", OFlag::O_RDONLY | OFlag::O_DIRECTORY)
                .map_err(at.fs("opening the root"))?;
            set_meta_fd(fd.as_fd(), &meta, at)?;
            self.dir_times.push((Vec::new(), meta.mtime));
        } else if let Some(target) = name.strip_prefix(b".wh.") {
            self.whiteout(at, dir, target)?;
        } else if is_file && !is_dir {
            return self.file(at, dir, name, entry, size);
        } else {
            self.other(at, &path, entry, kind, is_dir)?;
        }
        Ok(0)
    }

    /// Everything but a regular file: its data, if any, is not read here.
    fn other<R: Read>(
        &mut self,
        at: &At<'_>,
        path: &[u8],
        entry: &mut tar::Entry<'_, R>,
        kind: EntryType,
        is_dir: bool,
    ) -> Result<(), UnpackError> {
        let (dir, name) = split_parent(path);
        let known = is_dir
            || kind.is_symlink()
            || kind.is_hard_link()
            || kind.is_character_special()
            || kind.is_block_special()
            || kind.is_fifo();
        if !known {
            tracing::warn!(layer = self.layer, path = ?at.path, kind = ?kind, "skipping an entry of unknown type");
            return Ok(());
        }
        let parent = self
            .resolve_dir(dir, true)
            .map_err(at.fs("opening its parent directory"))?;
        let parent = parent.as_fd();
        if kind.is_hard_link() {
            return self.hard_link(at, parent, name, entry);
        }
        let meta = self.meta(at, entry)?;
        if is_dir {
            match stat::fstatat(Some(parent.as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(st) if is_dir_mode(st.st_mode) => {}
                Ok(_) => {
                    remove_tree(parent, name).map_err(at.fs("removing what was there"))?;
                    mkdir(parent, name).map_err(at.fs("creating the directory"))?;
                }
                Err(Errno::ENOENT) => {
                    mkdir(parent, name).map_err(at.fs("creating the directory"))?
                }
                Err(e) => return Err(at.fs("looking at what is there")(e)),
            }
            self.mark(parent, name)
                .map_err(at.fs("opening its parent directory"))?;
            let fd = open_at(parent, name, OFlag::O_RDONLY | OFlag::O_DIRECTORY)
                .map_err(at.fs("opening the directory"))?;
            set_meta_fd(fd.as_fd(), &meta, at)?;
            self.dir_times.push((path.to_vec(), meta.mtime));
            return Ok(());
        }
        remove_tree(parent, name).map_err(at.fs("removing what was there"))?;
        let p = Some(parent.as_raw_fd());
        if kind.is_symlink() {
            let target = match entry.link_name_bytes() {
                Some(t) if !t.is_empty() => t.into_owned(),
                _ => {
                    return Err(UnpackError::NoLinkTarget {
                        layer: self.layer,
                        path: at.path.to_string(),
                    })
                }
            };
            if target.len() > self.limits.max_path {
                return Err(at.bad_target(&target, PathProblem::TooLong(self.limits.max_path)));
            }
            if target.contains(&0) {
                return Err(at.bad_target(&target, PathProblem::Nul));
            }
            unistd::symlinkat(&target[..], p, name).map_err(at.fs("creating the symlink"))?;
        } else {
            let (sflag, dev) = if kind.is_fifo() {
                (SFlag::S_IFIFO, 0)
            } else {
                let h = entry.header();
                let major = h.device_major().map_err(at.header("device major"))?;
                let minor = h.device_minor().map_err(at.header("device minor"))?;
                let dev = stat::makedev(major.unwrap_or(0).into(), minor.unwrap_or(0).into());
                let sflag = if kind.is_block_special() {
                    SFlag::S_IFBLK
                } else {
                    SFlag::S_IFCHR
                };
                (sflag, dev)
            };
            stat::mknodat(p, name, sflag, Mode::from_bits_truncate(0o600), dev)
                .map_err(at.fs("creating the node"))?;
        }
        self.mark(parent, name)
            .map_err(at.fs("opening its parent directory"))?;
        let nofollow = AtFlags::AT_SYMLINK_NOFOLLOW;
        unistd::fchownat(
            p,
            name,
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
            nofollow,
        )
        .map_err(at.fs("setting the owner"))?;
        if !kind.is_symlink() {
            let mode = Mode::from_bits_truncate(meta.mode);
            match stat::fchmodat(p, name, mode, FchmodatFlags::NoFollowSymlink) {
                // No fchmodat2 (before Linux 6.6): we just made it, it is no symlink.
                Err(Errno::EOPNOTSUPP | Errno::ENOSYS) => {
                    stat::fchmodat(p, name, mode, FchmodatFlags::FollowSymlink)
                }
                r => r,
            }
            .map_err(at.fs("setting the mode"))?;
        }
        if !meta.xattrs.is_empty() {
            tracing::warn!(layer = self.layer, path = ?at.path, "skipping xattrs on a symlink or device");
        }
        stat::utimensat(
            p,
            name,
            &meta.mtime,
            &meta.mtime,
            UtimensatFlags::NoFollowSymlink,
        )
        .map_err(at.fs("setting the mtime"))?;
        Ok(())
    }

    fn file<R: Read>(
        &mut self,
        at: &At<'_>,
        dir: &[u8],
        name: &[u8],
        entry: &mut tar::Entry<'_, R>,
        size: u64,
    ) -> Result<u64, UnpackError> {
        let meta = self.meta(at, entry)?;
        let parent = self
            .resolve_dir(dir, true)
            .map_err(at.fs("opening its parent directory"))?;
        let parent = parent.as_fd();
        remove_tree(parent, name).map_err(at.fs("removing what was there"))?;
        let fd = fcntl::openat(
            Some(parent.as_raw_fd()),
            name,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map(owned)
        .map_err(at.fs("creating the file"))?;
        self.mark(parent, name)
            .map_err(at.fs("opening its parent directory"))?;
        let mut file = File::from(fd);
        let write_err = |source| UnpackError::Fs {
            layer: self.layer,
            path: at.path.to_string(),
            op: "writing",
            source,
        };
        let mut buf = vec![0u8; BLOCK];
        let mut got = 0u64;
        loop {
            let n = fill(entry, &mut buf).map_err(|source| UnpackError::Data {
                layer: self.layer,
                path: at.path.to_string(),
                source,
            })?;
            if n == 0 {
                break;
            }
            if buf[..n].iter().all(|b| *b == 0) {
                file.seek(SeekFrom::Current(n as i64)).map_err(write_err)?;
            } else {
                file.write_all(&buf[..n]).map_err(write_err)?;
            }
            got += n as u64;
        }
        if got != size {
            return Err(UnpackError::ShortData {
                layer: self.layer,
                path: at.path.to_string(),
                got,
                size,
            });
        }
        file.set_len(size).map_err(write_err)?;
        set_meta_fd(file.as_fd(), &meta, at)?;
        stat::futimens(file.as_raw_fd(), &meta.mtime, &meta.mtime)
            .map_err(at.fs("setting the mtime"))?;
        Ok(got)
    }

    fn hard_link<R: Read>(
        &mut self,
        at: &At<'_>,
        parent: BorrowedFd<'_>,
        name: &[u8],
        entry: &tar::Entry<'_, R>,
    ) -> Result<(), UnpackError> {
        let raw = match entry.link_name_bytes() {
            Some(t) if !t.is_empty() => t.into_owned(),
            _ => {
                return Err(UnpackError::NoLinkTarget {
                    layer: self.layer,
                    path: at.path.to_string(),
                })
            }
        };
        let target = normalize(&raw, self.limits.max_path).map_err(|p| at.bad_target(&raw, p))?;
        if target.is_empty() {
            return Err(at.bad_target(&raw, PathProblem::Empty));
        }
        let layer = self.layer;
        let missing = || UnpackError::LinkTargetMissing {
            layer,
            path: at.path.to_string(),
            target: String::from_utf8_lossy(&raw).into_owned(),
        };
        let (tdir, tname) = split_parent(&target);
        let tparent = match self.resolve_dir(tdir, false) {
            Ok(fd) => fd,
            Err(Errno::ENOENT | Errno::ENOTDIR) => return Err(missing()),
            Err(e) => return Err(at.fs("opening the link target's directory")(e)),
        };
        let nofollow = AtFlags::AT_SYMLINK_NOFOLLOW;
        let st = match stat::fstatat(Some(tparent.as_raw_fd()), tname, nofollow) {
            Ok(st) => st,
            Err(Errno::ENOENT) => return Err(missing()),
            Err(e) => return Err(at.fs("looking at the link target")(e)),
        };
        if is_dir_mode(st.st_mode) {
            return Err(UnpackError::LinkToDirectory {
                layer: self.layer,
                path: at.path.to_string(),
                target: String::from_utf8_lossy(&raw).into_owned(),
            });
        }
        let p = Some(parent.as_raw_fd());
        let already = stat::fstatat(p, name, nofollow)
            .is_ok_and(|d| (d.st_dev, d.st_ino) == (st.st_dev, st.st_ino));
        if !already {
            remove_tree(parent, name).map_err(at.fs("removing what was there"))?;
            match unistd::linkat(Some(tparent.as_raw_fd()), tname, p, name, AtFlags::empty()) {
                // The target was under the name it replaced.
                Err(Errno::ENOENT) => return Err(missing()),
                r => r.map_err(at.fs("creating the hard link"))?,
            }
        }
        self.mark(parent, name)
            .map_err(at.fs("opening its parent directory"))
    }

    /// `.wh.NAME` in `dir`: NAME from the lower layers goes; `.wh..wh..opq`:
    /// all of `dir` from the lower layers goes.
    fn whiteout(&mut self, at: &At<'_>, dir: &[u8], target: &[u8]) -> Result<(), UnpackError> {
        if target == b".wh..opq" {
            return self.opaque(at, dir);
        }
        if target.starts_with(b".wh.") {
            tracing::warn!(layer = self.layer, path = ?at.path, "skipping an unknown whiteout marker");
            return Ok(());
        }
        match target {
            b"" | b"." => return Err(at.bad_path(PathProblem::Empty)),
            b".." => return Err(at.bad_path(PathProblem::DotDot)),
            _ => {}
        }
        let parent = match self.resolve_dir(dir, false) {
            Ok(fd) => fd,
            Err(Errno::ENOENT | Errno::ENOTDIR) => return Ok(()),
            Err(e) => return Err(at.fs("opening its parent directory")(e)),
        };
        if self
            .is_ours(parent.as_fd(), target)
            .map_err(at.fs("opening its parent directory"))?
        {
            return Ok(());
        }
        remove_tree(parent.as_fd(), target).map_err(at.fs("removing the whited-out file"))
    }

    /// Removes from `dir` what this layer did not put there, and from the
    /// directories it did put there, wherever the marker is in the tar.
    fn opaque(&mut self, at: &At<'_>, dir: &[u8]) -> Result<(), UnpackError> {
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY;
        let top = if dir.is_empty() {
            open_in_root(self.root, b"", flags)
        } else {
            let (up, name) = split_parent(dir);
            self.resolve_dir(up, false)
                .and_then(|p| open_at(p.as_fd(), name, flags))
        };
        let top = match top {
            Ok(fd) => fd,
            Err(Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP) => return Ok(()),
            Err(e) => return Err(at.fs("opening the opaque directory")(e)),
        };
        let mut todo: Vec<Vec<u8>> = vec![Vec::new()];
        while let Some(rel) = todo.pop() {
            let d = if rel.is_empty() {
                open_at(top.as_fd(), b".", flags)
            } else {
                open_beneath(top.as_fd(), &rel, flags)
            };
            let d = d.map_err(at.fs("clearing the opaque directory"))?;
            let dfd = d.as_fd();
            let names = children(dfd).map_err(at.fs("clearing the opaque directory"))?;
            for name in names {
                if !self
                    .is_ours(dfd, &name)
                    .map_err(at.fs("clearing the opaque directory"))?
                {
                    remove_tree(dfd, &name).map_err(at.fs("clearing the opaque directory"))?;
                    continue;
                }
                let st = stat::fstatat(
                    Some(dfd.as_raw_fd()),
                    &name[..],
                    AtFlags::AT_SYMLINK_NOFOLLOW,
                );
                if st.is_ok_and(|st| is_dir_mode(st.st_mode)) {
                    let mut sub = rel.clone();
                    if !sub.is_empty() {
                        sub.push(b'/');
                    }
                    sub.extend_from_slice(&name);
                    todo.push(sub);
                }
            }
        }
        Ok(())
    }

    fn meta<R: Read>(
        &self,
        at: &At<'_>,
        entry: &mut tar::Entry<'_, R>,
    ) -> Result<Meta, UnpackError> {
        let h = entry.header();
        let id = |v: u64, field| {
            u32::try_from(v).map_err(|_| at.header(field)(io::Error::other("out of range")))
        };
        let uid = id(h.uid().map_err(at.header("uid"))?, "uid")?;
        let gid = id(h.gid().map_err(at.header("gid"))?, "gid")?;
        let mode = h.mode().map_err(at.header("mode"))? & 0o7777;
        let mtime = h.mtime().map_err(at.header("mtime"))?;
        let mtime = TimeSpec::new(i64::try_from(mtime).unwrap_or(i64::MAX), 0);
        let mut xattrs = Vec::new();
        if let Some(pax) = entry.pax_extensions().map_err(at.header("PAX records"))? {
            for ext in pax {
                let ext = ext.map_err(at.header("PAX records"))?;
                let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") else {
                    continue;
                };
                let kept = [&b"user."[..], b"trusted.", b"security."]
                    .iter()
                    .any(|p| name.starts_with(p));
                match CString::new(name) {
                    Ok(c) if kept => xattrs.push((c, ext.value_bytes().to_vec())),
                    _ => tracing::warn!(
                        layer = self.layer,
                        path = ?at.path,
                        xattr = ?String::from_utf8_lossy(name),
                        "skipping an xattr outside user., trusted. and security."
                    ),
                }
            }
        }
        Ok(Meta {
            uid,
            gid,
            mode,
            mtime,
            xattrs,
        })
    }

    /// The directory `dir` (relative to the root) resolved inside the root,
    /// as an O_PATH descriptor; with `create`, what is missing of it is made
    /// (0755, root's), a dangling symlink's target included, as containerd
    /// does.
    fn resolve_dir(&mut self, dir: &[u8], create: bool) -> nix::Result<OwnedFd> {
        let mut dir = dir.to_vec();
        // As many symlinks as the kernel follows in one lookup.
        for _ in 0..40 {
            match open_in_root(self.root, &dir, OFlag::O_PATH | OFlag::O_DIRECTORY) {
                Err(Errno::ENOENT) if create => {}
                r => return r,
            }
            match self.make_dirs(&dir)? {
                Ok(fd) => return Ok(fd),
                Err(redirected) => dir = redirected,
            }
        }
        Err(Errno::ELOOP)
    }

    /// Makes what is missing of `dir`; or, where a dangling symlink is in
    /// the way, returns `dir` with that component replaced by its target.
    fn make_dirs(&mut self, dir: &[u8]) -> nix::Result<Result<OwnedFd, Vec<u8>>> {
        let flags = OFlag::O_PATH | OFlag::O_DIRECTORY;
        let mut fd = open_in_root(self.root, b"", flags)?;
        let mut start = 0;
        while start < dir.len() {
            let stop = dir[start..]
                .iter()
                .position(|b| *b == b'/')
                .map_or(dir.len(), |i| start + i);
            let name = &dir[start..stop];
            let before = start;
            start = stop + 1;
            if name.is_empty() {
                continue;
            }
            match open_in_root(self.root, &dir[..stop], flags) {
                Ok(next) => {
                    fd = next;
                    continue;
                }
                Err(Errno::ENOENT) => {}
                Err(e) => return Err(e),
            }
            match mkdir(fd.as_fd(), name) {
                Ok(()) => {}
                Err(Errno::EEXIST) => {
                    let target =
                        fcntl::readlinkat(Some(fd.as_raw_fd()), name).map_err(|_| Errno::EEXIST)?;
                    let target = target.as_bytes();
                    let mut redirected = match target.strip_prefix(b"/") {
                        Some(abs) => abs.to_vec(),
                        None => [&dir[..before], target].concat(),
                    };
                    redirected.extend_from_slice(&dir[stop..]);
                    return Ok(Err(redirected));
                }
                Err(e) => return Err(e),
            }
            // Made just now, by us: no symlink to follow.
            let mode = Mode::from_bits_truncate(0o755);
            stat::fchmodat(
                Some(fd.as_raw_fd()),
                name,
                mode,
                FchmodatFlags::FollowSymlink,
            )?;
            self.mark(fd.as_fd(), name)?;
            fd = open_at(fd.as_fd(), name, flags)?;
        }
        Ok(Ok(fd))
    }

    fn mark(&mut self, dir: BorrowedFd<'_>, name: &[u8]) -> nix::Result<()> {
        let st = stat::fstat(dir.as_raw_fd())?;
        self.ours.insert((st.st_dev, st.st_ino, name.to_vec()));
        Ok(())
    }

    fn is_ours(&self, dir: BorrowedFd<'_>, name: &[u8]) -> nix::Result<bool> {
        let st = stat::fstat(dir.as_raw_fd())?;
        Ok(self.ours.contains(&(st.st_dev, st.st_ino, name.to_vec())))
    }

    /// Directory mtimes, now that nothing more is made inside them.
    fn finish(self) -> Result<(), UnpackError> {
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY;
        for (path, mtime) in &self.dir_times {
            let (up, name) = split_parent(path);
            let fd = if path.is_empty() {
                open_in_root(self.root, b"", flags)
            } else {
                open_in_root(self.root, up, OFlag::O_PATH | OFlag::O_DIRECTORY)
                    .and_then(|p| open_at(p.as_fd(), name, flags))
            };
            // Replaced or whited out later in the layer: nothing to date.
            let Ok(fd) = fd else { continue };
            stat::futimens(fd.as_raw_fd(), mtime, mtime).map_err(|e| UnpackError::Fs {
                layer: self.layer,
                path: String::from_utf8_lossy(path).into_owned(),
                op: "setting the mtime",
                source: e.into(),
            })?;
        }
        Ok(())
    }
}

/// Owner, then mode (chown clears set-id bits), then xattrs (chown clears
/// security.capability) of a file or directory we hold open.
fn set_meta_fd(fd: BorrowedFd<'_>, meta: &Meta, at: &At<'_>) -> Result<(), UnpackError> {
    let raw = fd.as_raw_fd();
    unistd::fchown(
        raw,
        Some(Uid::from_raw(meta.uid)),
        Some(Gid::from_raw(meta.gid)),
    )
    .map_err(at.fs("setting the owner"))?;
    stat::fchmod(raw, Mode::from_bits_truncate(meta.mode)).map_err(at.fs("setting the mode"))?;
    for (name, value) in &meta.xattrs {
        // SAFETY: `name` is NUL-terminated and `value` is valid for its
        // length for the whole call; the kernel only reads them.
        let r =
            unsafe { libc::fsetxattr(raw, name.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
        match Errno::result(r) {
            Ok(_) => {}
            Err(Errno::EOPNOTSUPP) => tracing::warn!(
                layer = at.layer,
                path = ?at.path,
                xattr = ?name,
                "the filesystem does not take this xattr"
            ),
            Err(e) => return Err(at.fs("setting an xattr")(e)),
        }
    }
    Ok(())
}

/// `raw` as a relative path with no empty, `.` or `..` components ("" is
/// the root itself).
fn normalize(raw: &[u8], max: usize) -> Result<Vec<u8>, PathProblem> {
    if raw.len() > max {
        return Err(PathProblem::TooLong(max));
    }
    if raw.contains(&0) {
        return Err(PathProblem::Nul);
    }
    let mut out = Vec::with_capacity(raw.len());
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(PathProblem::DotDot),
            _ => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(c);
            }
        }
    }
    Ok(out)
}

fn split_parent(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|b| *b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (b"", path),
    }
}

fn is_dir_mode(mode: libc::mode_t) -> bool {
    mode & libc::S_IFMT == libc::S_IFDIR
}

/// Fills `buf` unless the entry ends first; returns how much it holds.
fn fill(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: called only on a descriptor a successful open just returned,
    // which nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn mkdir(parent: BorrowedFd<'_>, name: &[u8]) -> nix::Result<()> {
    stat::mkdirat(
        Some(parent.as_raw_fd()),
        name,
        Mode::from_bits_truncate(0o700),
    )
}

/// `path` under the root, symlinks in it resolved as if the root were `/`.
fn open_in_root(root: BorrowedFd<'_>, path: &[u8], flags: OFlag) -> nix::Result<OwnedFd> {
    let resolve = ResolveFlag::RESOLVE_IN_ROOT
        | ResolveFlag::RESOLVE_NO_MAGICLINKS
        | ResolveFlag::RESOLVE_NO_XDEV;
    openat2(root, path, flags, resolve)
}

/// `path` under `dir`, through no symlink at all.
fn open_beneath(dir: BorrowedFd<'_>, path: &[u8], flags: OFlag) -> nix::Result<OwnedFd> {
    let resolve = ResolveFlag::RESOLVE_BENEATH
        | ResolveFlag::RESOLVE_NO_SYMLINKS
        | ResolveFlag::RESOLVE_NO_XDEV;
    openat2(dir, path, flags, resolve)
}

fn openat2(
    dir: BorrowedFd<'_>,
    path: &[u8],
    flags: OFlag,
    resolve: ResolveFlag,
) -> nix::Result<OwnedFd> {
    let path = if path.is_empty() { &b"."[..] } else { path };
    let how = OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC)
        .resolve(resolve);
    // EAGAIN: a rename elsewhere raced the lookup; the kernel asks us to retry.
    let mut tries = 0;
    loop {
        match fcntl::openat2(dir.as_raw_fd(), path, how) {
            Err(Errno::EAGAIN | Errno::EINTR) if tries < 16 => tries += 1,
            r => return r.map(owned),
        }
    }
}

/// `name` in `dir`, not followed if it is a symlink.
fn open_at(dir: BorrowedFd<'_>, name: &[u8], flags: OFlag) -> nix::Result<OwnedFd> {
    fcntl::openat(
        Some(dir.as_raw_fd()),
        name,
        flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map(owned)
}

/// The names in `dir` but `.` and `..`.
fn children(dir: BorrowedFd<'_>) -> nix::Result<Vec<Vec<u8>>> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let mut d = Dir::openat(Some(dir.as_raw_fd()), ".", flags, Mode::empty())?;
    let mut names = Vec::new();
    for e in d.iter() {
        let name = e?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            names.push(name);
        }
    }
    Ok(names)
}

/// Removes `name` from `parent`, a whole tree if it is a directory, never
/// following a symlink. One directory is open at a time (going back up by
/// `..`), as a hostile tree may be deeper than the descriptor limit.
fn remove_tree(parent: BorrowedFd<'_>, name: &[u8]) -> nix::Result<()> {
    match unistd::unlinkat(Some(parent.as_raw_fd()), name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => return Ok(()),
        Err(Errno::EISDIR) => {}
        Err(e) => return Err(e),
    }
    let flags = OFlag::O_PATH | OFlag::O_DIRECTORY;
    let mut dir = open_at(parent, name, flags)?;
    let mut stack = vec![(name.to_vec(), children(dir.as_fd())?)];
    loop {
        let next = match stack.last_mut() {
            Some((_, pending)) => pending.pop(),
            None => return Ok(()),
        };
        if let Some(child) = next {
            match unistd::unlinkat(
                Some(dir.as_raw_fd()),
                &child[..],
                UnlinkatFlags::NoRemoveDir,
            ) {
                Ok(()) | Err(Errno::ENOENT) => {}
                Err(Errno::EISDIR) => {
                    let sub = open_at(dir.as_fd(), &child, flags)?;
                    let kids = children(sub.as_fd())?;
                    dir = sub;
                    stack.push((child, kids));
                }
                Err(e) => return Err(e),
            }
            continue;
        }
        let Some((done, _)) = stack.pop() else {
            return Ok(());
        };
        if stack.is_empty() {
            return unistd::unlinkat(
                Some(parent.as_raw_fd()),
                &done[..],
                UnlinkatFlags::RemoveDir,
            );
        }
        dir = open_at(dir.as_fd(), b"..", flags)?;
        unistd::unlinkat(Some(dir.as_raw_fd()), &done[..], UnlinkatFlags::RemoveDir)?;
    }
}

/// Removes `path` (a partial unpack) the way a layer's entries are removed.
fn remove_path(path: &Path) -> nix::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let Some(name) = path.file_name() else {
        return Err(Errno::EINVAL);
    };
    let parent = fcntl::open(
        parent,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map(owned)?;
    remove_tree(parent.as_fd(), name.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    /// The tests make device nodes and set owners: they need root.
    fn root_or_skip() -> bool {
        let ok = unistd::geteuid().is_root();
        if !ok {
            eprintln!("skipped: needs root (mknod, chown, security.* xattrs)");
        }
        ok
    }

    struct Fixture {
        dir: tempfile::TempDir,
        fd: OwnedFd,
    }

    impl Fixture {
        /// A root directory, and a sentinel `outside` beside it that no layer
        /// may reach.
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir(dir.path().join("root")).unwrap();
            std::fs::create_dir(dir.path().join("outside")).unwrap();
            std::fs::write(dir.path().join("outside/secret"), b"s").unwrap();
            let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
            let fd = fcntl::open(&dir.path().join("root"), flags, Mode::empty()).unwrap();
            Fixture { dir, fd: owned(fd) }
        }

        fn root(&self) -> PathBuf {
            self.dir.path().join("root")
        }

        fn apply(&self, layers: &[Vec<u8>]) -> Result<Unpacked, UnpackError> {
            self.apply_with(layers, &Limits::default())
        }

        fn apply_with(&self, layers: &[Vec<u8>], limits: &Limits) -> Result<Unpacked, UnpackError> {
            let mut seen = Unpacked::default();
            for (i, l) in layers.iter().enumerate() {
                apply_layer(self.fd.as_fd(), &l[..], i, limits, &mut seen)?;
            }
            Ok(seen)
        }

        fn outside_untouched(&self) {
            let names: Vec<_> = std::fs::read_dir(self.dir.path().join("outside"))
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names, ["secret"], "something was written outside the root");
            let secret = self.dir.path().join("outside/secret");
            assert_eq!(std::fs::read(&secret).unwrap(), b"s");
            assert_eq!(std::fs::metadata(&secret).unwrap().nlink(), 1);
        }

        /// The sentinel's absolute path, as an entry under a symlink to `/`
        /// would name it.
        fn outside_rel(&self) -> String {
            let p = self.dir.path().join("outside");
            p.to_str().unwrap().trim_start_matches('/').to_string()
        }
    }

    #[derive(Clone, Copy)]
    enum K {
        File,
        Dir,
        Sym,
        Hard,
        Char(u32, u32),
        Block(u32, u32),
        Fifo,
    }

    /// A tar of raw entries: names go into the header as they are (the tar
    /// crate's own setters refuse `..` and absolute paths).
    #[derive(Default)]
    struct Tar(Vec<u8>);

    impl Tar {
        fn add(self, kind: K, path: &str, data: &[u8]) -> Tar {
            self.add_full(kind, path, "", data, 0o644, 0, &[])
        }

        fn link(self, kind: K, path: &str, target: &str) -> Tar {
            self.add_full(kind, path, target, b"", 0o777, 0, &[])
        }

        #[allow(clippy::too_many_arguments)]
        fn add_full(
            mut self,
            kind: K,
            path: &str,
            link: &str,
            data: &[u8],
            mode: u32,
            uid: u64,
            xattrs: &[(&str, &[u8])],
        ) -> Tar {
            // PAX records: the xattrs, and a path too long for the header.
            let mut pax: Vec<(String, &[u8])> = xattrs
                .iter()
                .map(|(k, v)| (format!("SCHILY.xattr.{k}"), *v))
                .collect();
            if path.len() >= 100 {
                pax.push(("path".into(), path.as_bytes()));
            }
            if !pax.is_empty() {
                let mut records = Vec::new();
                for (k, v) in pax {
                    let body = [format!(" {k}=").as_bytes(), v, b"\n"].concat();
                    // The length counts its own digits.
                    let mut len = body.len() + 1;
                    while body.len() + len.to_string().len() != len {
                        len = body.len() + len.to_string().len();
                    }
                    records.extend_from_slice(len.to_string().as_bytes());
                    records.extend_from_slice(&body);
                }
                let x = tar::EntryType::XHeader;
                self = self.raw(x, "PaxHeader", "", &records, 0o644, 0, |_| {});
            }
            let path = if path.len() >= 100 { "long" } else { path };
            let (kind, dev) = match kind {
                K::File => (EntryType::Regular, None),
                K::Dir => (EntryType::Directory, None),
                K::Sym => (EntryType::Symlink, None),
                K::Hard => (EntryType::Link, None),
                K::Char(a, b) => (EntryType::Char, Some((a, b))),
                K::Block(a, b) => (EntryType::Block, Some((a, b))),
                K::Fifo => (EntryType::Fifo, None),
            };
            self.raw(kind, path, link, data, mode, uid, |h| {
                if let Some((a, b)) = dev {
                    h.set_device_major(a).unwrap();
                    h.set_device_minor(b).unwrap();
                }
            })
        }

        #[allow(clippy::too_many_arguments)]
        fn raw(
            mut self,
            kind: EntryType,
            path: &str,
            link: &str,
            data: &[u8],
            mode: u32,
            uid: u64,
            edit: impl FnOnce(&mut tar::Header),
        ) -> Tar {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_size(data.len() as u64);
            h.set_mode(mode);
            h.set_uid(uid);
            h.set_gid(uid);
            h.set_mtime(1_000_000);
            let old = h.as_old_mut();
            old.name[..path.len()].copy_from_slice(path.as_bytes());
            old.linkname[..link.len()].copy_from_slice(link.as_bytes());
            edit(&mut h);
            h.set_cksum();
            self.0.extend_from_slice(h.as_bytes());
            self.0.extend_from_slice(data);
            self.0.resize(self.0.len().next_multiple_of(512), 0);
            self
        }

        fn end(mut self) -> Vec<u8> {
            self.0.extend_from_slice(&[0; 1024]);
            self.0
        }
    }

    fn lstat(p: &Path) -> std::fs::Metadata {
        std::fs::symlink_metadata(p).unwrap()
    }

    fn exists(p: &Path) -> bool {
        std::fs::symlink_metadata(p).is_ok()
    }

    #[test]
    fn every_kind_lands_with_its_metadata() {
        if !root_or_skip() {
            return;
        }
        let f = Fixture::new();
        let layer = Tar::default()
            .add_full(K::Dir, "./etc/", "", b"", 0o750, 7, &[])
            .add_full(K::File, "/etc/conf", "", b"hello", 0o640, 1000, &[])
            .link(K::Sym, "etc/abs", "/no/such/../place")
            .link(K::Hard, "etc/hard", "./etc/conf")
            .add_full(K::Char(1, 3), "dev/null", "", b"", 0o666, 0, &[])
            .add_full(K::Block(7, 0), "dev/loop0", "", b"", 0o660, 0, &[])
            .add_full(K::Fifo, "run/fifo", "", b"", 0o600, 0, &[])
            .raw(
                EntryType::new(b'Z'),
                "odd",
                "",
                b"skipped data",
                0o644,
                0,
                |_| {},
            )
            .end();
        let seen = f.apply(&[layer]).unwrap();
        assert_eq!(
            seen,
            Unpacked {
                files: 8,
                bytes: 17
            }
        );
        let r = f.root();
        let etc = lstat(&r.join("etc"));
        assert!(etc.is_dir());
        assert_eq!(
            (etc.mode() & 0o7777, etc.uid(), etc.mtime()),
            (0o750, 7, 1_000_000)
        );
        let conf = lstat(&r.join("etc/conf"));
        assert_eq!(std::fs::read(r.join("etc/conf")).unwrap(), b"hello");
        assert_eq!(
            (conf.mode() & 0o7777, conf.uid(), conf.gid()),
            (0o640, 1000, 1000)
        );
        assert_eq!(conf.mtime(), 1_000_000);
        assert_eq!(
            std::fs::read_link(r.join("etc/abs")).unwrap(),
            Path::new("/no/such/../place")
        );
        assert_eq!(lstat(&r.join("etc/hard")).ino(), conf.ino());
        let null = lstat(&r.join("dev/null"));
        assert!(null.file_type().is_char_device());
        assert_eq!(
            (null.rdev(), null.mode() & 0o777),
            (stat::makedev(1, 3), 0o666)
        );
        assert!(lstat(&r.join("dev/loop0")).file_type().is_block_device());
        assert!(lstat(&r.join("run/fifo")).file_type().is_fifo());
        let implicit = lstat(&r.join("dev"));
        assert_eq!((implicit.mode() & 0o7777, implicit.uid()), (0o755, 0));
        assert!(!exists(&r.join("odd")));
    }

    #[test]
    fn whiteouts_remove_lower_files_but_not_this_layers() {
        if !root_or_skip() {
            return;
        }
        let f = Fixture::new();
        let lower = Tar::default()
            .add(K::File, "a/f", b"1")
            .add(K::File, "a/g", b"2")
            .add(K::File, "b/deep/x", b"3")
            .end();
        let upper = Tar::default()
            .add(K::File, "a/.wh.f", b"")
            .add(K::File, ".wh.b", b"")
            .add(K::File, "a/mine", b"4")
            .add(K::File, "a/.wh.mine", b"")
            .add(K::File, "a/.wh..wh.plnk", b"")
            .add(K::File, "nowhere/.wh.x", b"")
            .end();
        f.apply(&[lower, upper]).unwrap();
        let r = f.root();
        assert!(!exists(&r.join("a/f")) && !exists(&r.join("b")));
        assert!(exists(&r.join("a/g")) && exists(&r.join("a/mine")));
        assert!(!exists(&r.join("a/.wh.f")) && !exists(&r.join("a/.wh..wh.plnk")));
        assert!(!exists(&r.join("nowhere")));
        let bad = Tar::default().add(K::File, "a/.wh...", b"").end();
        assert!(matches!(
            f.apply(&[bad]),
            Err(UnpackError::BadPath {
                problem: PathProblem::DotDot,
                ..
            })
        ));
    }

    #[test]
    fn an_opaque_directory_keeps_only_this_layers_entries_wherever_the_marker_is() {
        if !root_or_skip() {
            return;
        }
        for marker_first in [true, false] {
            let f = Fixture::new();
            let lower = Tar::default()
                .add(K::File, "d/old", b"1")
                .add(K::File, "d/sub/old", b"2")
                .add(K::File, "other/kept", b"3")
                .end();
            let marker = |t: Tar| t.add(K::File, "d/.wh..wh..opq", b"");
            let mut upper = Tar::default();
            if marker_first {
                upper = marker(upper);
            }
            upper = upper
                .add(K::File, "d/new", b"4")
                .add(K::Dir, "d/sub/", b"")
                .add(K::File, "d/sub/new", b"5");
            if !marker_first {
                upper = marker(upper);
            }
            f.apply(&[lower, upper.end()]).unwrap();
            let r = f.root();
            let mut names: Vec<_> = ["d", "d/sub"]
                .iter()
                .flat_map(|d| std::fs::read_dir(r.join(d)).unwrap())
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            assert_eq!(names, ["new", "new", "sub"], "marker first: {marker_first}");
            assert!(exists(&r.join("other/kept")));
        }
    }

    #[test]
    fn a_hard_link_reaches_a_lower_layers_file_but_no_directory() {
        if !root_or_skip() {
            return;
        }
        let f = Fixture::new();
        let lower = Tar::default().add(K::File, "bin/busybox", b"bb").end();
        let upper = Tar::default().link(K::Hard, "bin/sh", "bin/busybox").end();
        f.apply(&[lower, upper]).unwrap();
        let r = f.root();
        assert_eq!(
            lstat(&r.join("bin/sh")).ino(),
            lstat(&r.join("bin/busybox")).ino()
        );
        let to_dir = Tar::default().link(K::Hard, "x", "bin").end();
        assert!(matches!(
            f.apply(&[to_dir]),
            Err(UnpackError::LinkToDirectory { .. })
        ));
        let missing = Tar::default().link(K::Hard, "x", "nope").end();
        assert!(matches!(
            f.apply(&[missing]),
            Err(UnpackError::LinkTargetMissing { .. })
        ));
    }

    #[test]
    fn symlinks_planted_by_a_layer_lead_back_into_the_root() {
        if !root_or_skip() {
            return;
        }
        let f = Fixture::new();
        let out = f.outside_rel();
        let layer = Tar::default()
            .link(K::Sym, "evil", "/")
            .link(K::Sym, "up", "../../..")
            .link(K::Sym, "sib", "../outside")
            .link(K::Sym, "direct", &format!("/{out}"))
            .add(K::File, &format!("evil/{out}/a"), b"x")
            .add(K::File, &format!("up/{out}/b"), b"x")
            .add(K::File, "sib/c", b"x")
            .add(K::File, "direct/d", b"x")
            .add(K::File, &format!("evil/{out}/.wh.secret"), b"")
            .end();
        f.apply(&[layer]).unwrap();
        f.outside_untouched();
        let inside = f.root().join(&out);
        for n in ["a", "b", "d"] {
            assert!(exists(&inside.join(n)), "{n} not under the root");
        }
        assert!(exists(&f.root().join("outside/c")));
        // A hard link to the sentinel through the symlink finds nothing.
        let link = Tar::default()
            .link(K::Hard, "h", &format!("evil/{out}/secret"))
            .end();
        assert!(matches!(
            f.apply(&[link]),
            Err(UnpackError::LinkTargetMissing { .. })
        ));
        for (kind, path, target) in [
            (K::Hard, "h", "evil/../../../etc/passwd"),
            (K::File, "../outside/x", ""),
            (K::File, "a/../../outside/x", ""),
            (K::Dir, "..", ""),
        ] {
            let layer = Tar::default().link(kind, path, target).end();
            match f.apply(&[layer]) {
                Err(UnpackError::BadPath {
                    problem: PathProblem::DotDot,
                    ..
                })
                | Err(UnpackError::BadLinkTarget {
                    problem: PathProblem::DotDot,
                    ..
                }) => {}
                other => panic!("{path} -> {target}: {other:?}"),
            }
        }
        f.outside_untouched();
    }

    #[test]
    fn a_new_entry_replaces_what_is_there_without_following_it() {
        if !root_or_skip() {
            return;
        }
        let f = Fixture::new();
        let lower = Tar::default()
            .add(K::File, "x", b"file")
            .add(K::File, "y/z", b"z")
            .add_full(K::Dir, "keep/", "", b"", 0o700, 0, &[])
            .add(K::File, "keep/child", b"c")
            .link(K::Sym, "s", "../outside")
            .end();
        let upper = Tar::default()
            .add(K::Dir, "x", b"")
            .add(K::File, "x/inner", b"i")
            .add(K::File, "y", b"now a file")
            .add_full(K::Dir, "keep", "", b"", 0o755, 0, &[])
            .add(K::File, "s", b"replaced the link")
            .end();
        f.apply(&[lower, upper]).unwrap();
        let r = f.root();
        assert_eq!(std::fs::read(r.join("x/inner")).unwrap(), b"i");
        assert_eq!(std::fs::read(r.join("y")).unwrap(), b"now a file");
        assert_eq!(lstat(&r.join("keep")).mode() & 0o7777, 0o755);
        assert!(exists(&r.join("keep/child")));
        assert!(lstat(&r.join("s")).is_file());
        f.outside_untouched();
    }

    #[test]
    fn a_deep_tree_is_removed_one_directory_at_a_time() {
        if !root_or_skip() {
            return;
        }
        let f = Fixture::new();
        let deep = format!("d/{}f", "a/".repeat(1500));
        let lower = Tar::default()
            .add(K::File, &deep, b"x")
            .add(K::File, "d/a/a/b/c", b"x")
            .add(K::File, "d/a/sibling", b"x")
            .link(K::Sym, "d/a/a/up", "../../..")
            .end();
        f.apply(&[lower]).unwrap();
        assert!(exists(&f.root().join(&deep)));
        let upper = Tar::default().add(K::File, ".wh.d", b"").end();
        f.apply(&[upper]).unwrap();
        assert_eq!(std::fs::read_dir(f.root()).unwrap().count(), 0);
        f.outside_untouched();
    }

    #[test]
    fn setuid_bits_and_file_capabilities_survive() {
        if !root_or_skip() {
            return;
        }
        let f = Fixture::new();
        // VFS_CAP_REVISION_2, effective; permitted CAP_NET_BIND_SERVICE.
        let mut cap = vec![0u8; 20];
        cap[..4].copy_from_slice(&0x0200_0001u32.to_le_bytes());
        cap[4..8].copy_from_slice(&(1u32 << 10).to_le_bytes());
        let xattrs: &[(&str, &[u8])] = &[
            ("security.capability", &cap),
            ("user.note", b"hi"),
            ("system.posix_acl_access", b"\x02\0\0\0"),
        ];
        let layer = Tar::default()
            .add_full(K::File, "bin/ping", "", b"\x7fELF", 0o4755, 1000, xattrs)
            .end();
        f.apply(&[layer]).unwrap();
        let p = f.root().join("bin/ping");
        let m = lstat(&p);
        assert_eq!((m.mode() & 0o7777, m.uid()), (0o4755, 1000));
        let get = |name: &str| {
            let path = CString::new(p.as_os_str().as_bytes()).unwrap();
            let name = CString::new(name).unwrap();
            let mut buf = [0u8; 64];
            // SAFETY: both strings are NUL-terminated; `buf` is writable for its length.
            let n = unsafe {
                libc::lgetxattr(
                    path.as_ptr(),
                    name.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
            (n >= 0).then(|| buf[..n as usize].to_vec())
        };
        assert_eq!(get("security.capability").as_deref(), Some(&cap[..]));
        assert_eq!(get("user.note").as_deref(), Some(&b"hi"[..]));
        assert_eq!(get("system.posix_acl_access"), None);
    }

    #[test]
    fn a_gigabyte_of_zeros_takes_no_disk() {
        if !root_or_skip() {
            return;
        }
        const GIB: u64 = 1 << 30;
        let f = Fixture::new();
        // Streamed: a plain entry of 1 GiB of zeros and a tail.
        let mut h = tar::Header::new_gnu();
        h.set_path("zeros").unwrap();
        h.set_size(GIB + 3);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_cksum();
        let pad = (512 - (GIB + 3) % 512) as usize;
        let stream = io::Cursor::new(h.as_bytes().to_vec())
            .chain(io::repeat(0).take(GIB))
            .chain(io::Cursor::new(
                [&b"end"[..], &vec![0; pad + 1024]].concat(),
            ));
        let mut seen = Unpacked::default();
        apply_layer(f.fd.as_fd(), stream, 0, &Limits::default(), &mut seen).unwrap();
        // A GNU sparse entry: 1 GiB, with 512 bytes of data at its end.
        let mut h = tar::Header::new_gnu();
        h.set_path("sparse").unwrap();
        h.set_entry_type(EntryType::GNUSparse);
        h.set_size(512);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        let gnu = h.as_gnu_mut().unwrap();
        gnu.set_real_size(GIB);
        gnu.sparse[0].set_offset(GIB - 512);
        gnu.sparse[0].set_length(512);
        h.set_cksum();
        let layer = [h.as_bytes(), &[b'x'; 512][..], &[0; 1024]].concat();
        apply_layer(f.fd.as_fd(), &layer[..], 1, &Limits::default(), &mut seen).unwrap();
        assert_eq!(seen.bytes, 2 * GIB + 3);
        for (name, size) in [("zeros", GIB + 3), ("sparse", GIB)] {
            let m = lstat(&f.root().join(name));
            assert_eq!(m.len(), size);
            assert!(m.blocks() * 512 < 1 << 20, "{name}: {} blocks", m.blocks());
        }
        let mut tail = File::open(f.root().join("sparse")).unwrap();
        tail.seek(SeekFrom::Start(GIB - 512)).unwrap();
        let mut buf = Vec::new();
        tail.read_to_end(&mut buf).unwrap();
        assert_eq!(buf, [b'x'; 512]);
    }

    fn gzip(b: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(b).unwrap();
        e.finish().unwrap()
    }

    /// A layer big enough that a cut lands inside its data.
    fn big_layer() -> Vec<u8> {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        Tar::default()
            .add(K::File, "a", &data)
            .add(K::File, "b", b"b")
            .end()
    }

    #[test]
    fn gzip_and_zstd_layers_are_detected() {
        if !root_or_skip() {
            return;
        }
        let f = Fixture::new();
        let gz = gzip(&Tar::default().add(K::File, "g", b"gzip").end());
        let zst =
            zstd::encode_all(&Tar::default().add(K::File, "z", b"zstd").end()[..], 3).unwrap();
        f.apply(&[gz, zst]).unwrap();
        assert_eq!(std::fs::read(f.root().join("g")).unwrap(), b"gzip");
        assert_eq!(std::fs::read(f.root().join("z")).unwrap(), b"zstd");
    }

    #[test]
    fn a_truncated_stream_is_an_error() {
        if !root_or_skip() {
            return;
        }
        let plain = big_layer();
        let gz = gzip(&plain);
        let zst = zstd::encode_all(&plain[..], 3).unwrap();
        let cases = [
            ("gzip, half", gz[..gz.len() / 2].to_vec()),
            ("gzip, no trailer", gz[..gz.len() - 8].to_vec()),
            ("gzip, one byte short", gz[..gz.len() - 1].to_vec()),
            ("zstd, half", zst[..zst.len() / 2].to_vec()),
            ("zstd, one byte short", zst[..zst.len() - 1].to_vec()),
            ("tar, inside data", plain[..100_000].to_vec()),
            ("tar, at a header", plain[..plain.len() - 1024].to_vec()),
            (
                "tar, in padding",
                plain[..plain.len() - 1024 - 100].to_vec(),
            ),
            ("tar, inside a header", plain[..200_704 + 100].to_vec()),
            ("empty", Vec::new()),
        ];
        for (what, layer) in cases {
            let f = Fixture::new();
            let r = f.apply(&[layer]);
            let cut = matches!(
                r,
                Err(UnpackError::Truncated { .. }
                    | UnpackError::ShortData { .. }
                    | UnpackError::Corrupt { .. }
                    | UnpackError::Data { .. })
            );
            assert!(cut, "{what}: {r:?}");
        }
    }

    #[test]
    fn limits_are_errors() {
        if !root_or_skip() {
            return;
        }
        let f = Fixture::new();
        let layer = (0..10)
            .fold(Tar::default(), |t, i| {
                t.add(K::File, &format!("f{i}"), b"12")
            })
            .end();
        let few = Limits {
            max_entries: 9,
            ..Limits::default()
        };
        assert!(matches!(
            f.apply_with(std::slice::from_ref(&layer), &few),
            Err(UnpackError::TooManyEntries { max: 9, .. })
        ));
        let small = Limits {
            max_bytes: 19,
            ..Limits::default()
        };
        assert!(matches!(
            f.apply_with(&[layer], &small),
            Err(UnpackError::TooManyBytes { max: 19, .. })
        ));
        let long = Tar::default().add(K::File, &"a/".repeat(40), b"").end();
        let short = Limits {
            max_path: 50,
            ..Limits::default()
        };
        assert!(matches!(
            f.apply_with(&[long], &short),
            Err(UnpackError::BadPath {
                problem: PathProblem::TooLong(50),
                ..
            })
        ));
        // A GNU long name the tar reader would hold in memory whole.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(0);
        b.append_data(&mut h, "n".repeat(5 << 20), &b""[..])
            .unwrap();
        let huge = b.into_inner().unwrap();
        assert!(matches!(
            f.apply(&[huge]),
            Err(UnpackError::MetadataTooLarge { .. })
        ));
    }

    #[test]
    fn a_failed_unpack_leaves_nothing() {
        if !root_or_skip() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let put = |bytes: &[u8]| {
            use sha2::Digest as _;
            let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)));
            std::fs::write(store.blob_path(&digest).unwrap(), bytes).unwrap();
            digest
        };
        let good = put(&gzip(
            &Tar::default().add(K::File, "deep/a/b/c", b"1").end(),
        ));
        let bad = put(&Tar::default().add(K::File, "../x", b"").end());
        let record = |layers: Vec<String>| ImageRecord {
            name: "r/x:1".into(),
            digest: good.clone(),
            index_digest: None,
            media_type: "m".into(),
            config: good.clone(),
            layers,
            size: 0,
            created: 0,
        };
        let tree = dir.path().join("tree");
        let ok = unpack_image(
            &store,
            &record(vec![good.clone()]),
            &tree,
            &Limits::default(),
        );
        assert_eq!(ok.unwrap().files, 1);
        assert!(tree.join("deep/a/b/c").is_file());
        assert!(matches!(
            unpack_image(
                &store,
                &record(vec![good.clone()]),
                &tree,
                &Limits::default()
            ),
            Err(UnpackError::Root { .. })
        ));
        assert!(
            tree.join("deep/a/b/c").is_file(),
            "a tree it did not make is kept"
        );
        let tree2 = dir.path().join("tree2");
        let r = unpack_image(
            &store,
            &record(vec![good.clone(), bad]),
            &tree2,
            &Limits::default(),
        );
        assert!(
            matches!(r, Err(UnpackError::BadPath { layer: 1, .. })),
            "{r:?}"
        );
        assert!(!exists(&tree2));
    }
}
