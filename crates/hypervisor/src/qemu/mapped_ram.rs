//! QEMU's mapped-ram snapshot file, as far as we read it: where the guest
//! RAM block's pages lie, so that a VM can map them (copy on write) instead
//! of loading them, and the companion that lets QEMU load the rest.
//!
//! ```text
//! stream head (magic, configuration, the "ram" section's start)
//!   per RAM block: len, idstr, be64 used_length, MappedRamHeader
//!     (be32 version, be64 page_size, be64 bitmap_offset, be64 pages_offset)
//! bitmap of each block (a bit per page written)
//! pages of each block at pages_offset + guest offset (holes: zero pages)
//! the rest of the stream (device state), after the last block's pages
//! ```
//!
//! QEMU 10 writes `x-ignore-shared`'s block address before the header but
//! reads it after: snapshots never set that capability.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// The RAM block of our `memory-backend-*,id=mem`.
const BLOCK: &[u8] = b"mem";
/// How far into the file the header may lie (it follows the stream's
/// magic, configuration and a few other blocks' headers).
const HEAD: usize = 64 << 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Guest RAM bytes in the block.
    pub length: u64,
    pub page_size: u64,
    pub bitmap_offset: u64,
    /// Page `n` of guest RAM is at `pages_offset + n * page_size`.
    pub pages_offset: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum MappedRamError {
    #[error("not a QEMU mapped-ram snapshot: {0}")]
    Format(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap_or_default())
}

/// Finds block `mem` of `length` bytes in `head` (the file's first bytes)
/// and checks its header against a file of `file_len` bytes.
pub fn layout(head: &[u8], length: u64, file_len: u64) -> Result<Layout, MappedRamError> {
    let bad = |why: &str| MappedRamError::Format(why.to_string());
    if head.len() < 8 || &head[..4] != b"QEVM" || head[4..8] != [0, 0, 0, 3] {
        return Err(bad("no QEVM version 3 header"));
    }
    // The block's record: u8 len, "mem", be64 used_length; then the header.
    let mut needle = vec![BLOCK.len() as u8];
    needle.extend_from_slice(BLOCK);
    needle.extend_from_slice(&length.to_be_bytes());
    let at = head
        .windows(needle.len())
        .position(|w| w == needle.as_slice())
        .ok_or_else(|| bad("no RAM block `mem` of the VM's size"))?;
    let h = head
        .get(at + needle.len()..at + needle.len() + 28)
        .ok_or_else(|| bad("the RAM block's header is cut short"))?;
    let version = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
    let l = Layout {
        length,
        page_size: be64(&h[4..]),
        bitmap_offset: be64(&h[12..]),
        pages_offset: be64(&h[20..]),
    };
    if version != 1 {
        return Err(bad(&format!("header version {version}, not 1")));
    }
    if l.page_size != 4096 {
        return Err(bad(&format!("page size {}", l.page_size)));
    }
    let bitmap_end = l
        .bitmap_offset
        .checked_add(length.div_ceil(l.page_size * 8))
        .ok_or_else(|| bad("bitmap offset overflows"))?;
    let pages_end = l
        .pages_offset
        .checked_add(length)
        .ok_or_else(|| bad("pages offset overflows"))?;
    if !l.pages_offset.is_multiple_of(l.page_size) || bitmap_end > l.pages_offset {
        return Err(bad("pages region misplaced"));
    }
    if pages_end >= file_len {
        return Err(bad(&format!(
            "file has {file_len} bytes, its pages end at {pages_end} (truncated)"
        )));
    }
    Ok(l)
}

/// Reads snapshot `path`'s layout for a VM of `length` bytes of RAM.
pub fn read_layout(path: &Path, length: u64) -> Result<Layout, MappedRamError> {
    let mut f = File::open(path)?;
    let file_len = f.metadata()?.len();
    let mut head = vec![0u8; HEAD.min(file_len as usize)];
    f.read_exact(&mut head)?;
    layout(&head, length, file_len)
}

/// Writes `out` (a new file): snapshot `snapshot` with block `mem`'s bitmap
/// cleared and its pages left out (a hole). QEMU loading it reads no guest
/// page and the device state at the offsets the snapshot has; the guest's
/// memory is the snapshot's pages region, mapped. Synced before it returns.
pub fn companion(snapshot: &Path, l: &Layout, out: &Path) -> Result<(), MappedRamError> {
    let src = File::open(snapshot)?;
    let len = src.metadata()?.len();
    let mut dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(out)?;
    let copy = |dst: &mut File, from: u64, to: u64| -> std::io::Result<()> {
        let mut buf = vec![0u8; 1 << 20];
        let mut at = from;
        while at < to {
            let n = ((to - at) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], at)?;
            // All-zero chunks stay holes (other blocks' sparse pages).
            if buf[..n].iter().any(|b| *b != 0) {
                dst.write_all_at(&buf[..n], at)?;
            }
            at += n as u64;
        }
        Ok(())
    };
    let bitmap_end = l.bitmap_offset + l.length.div_ceil(l.page_size * 8);
    copy(&mut dst, 0, l.bitmap_offset)?;
    copy(&mut dst, bitmap_end, l.pages_offset)?;
    copy(&mut dst, l.pages_offset + l.length, len)?;
    dst.set_len(len)?;
    dst.flush()?;
    dst.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(length: u64, version: u32, pages: u64) -> Vec<u8> {
        let mut h = b"QEVM\0\0\0\x03\x07junk\x03ram".to_vec();
        h.push(3);
        h.extend_from_slice(b"mem");
        h.extend_from_slice(&length.to_be_bytes());
        h.extend_from_slice(&version.to_be_bytes());
        h.extend_from_slice(&4096u64.to_be_bytes());
        h.extend_from_slice(&0x9cu64.to_be_bytes());
        h.extend_from_slice(&pages.to_be_bytes());
        h
    }

    #[test]
    fn finds_the_block() {
        let l = layout(&head(64 << 20, 1, 1 << 20), 64 << 20, 80 << 20).unwrap();
        assert_eq!(l.pages_offset, 1 << 20);
        assert_eq!(l.bitmap_offset, 0x9c);
    }

    #[test]
    fn refuses_what_is_not_a_whole_snapshot() {
        let m = 64 << 20;
        for (h, file, what) in [
            (head(m, 1, 1 << 20), m, "truncated"),
            (head(m, 2, 1 << 20), 80 << 20, "version 2"),
            (head(m, 1, 100), 80 << 20, "misplaced"),
            (head(m, 1, u64::MAX - 5), 80 << 20, "overflows"),
            (head(32 << 20, 1, 1 << 20), 80 << 20, "size"),
            (b"QFI\xfb".to_vec(), 80 << 20, "QEVM"),
            (head(m, 1, 1 << 20)[..40].to_vec(), 80 << 20, "cut short"),
        ] {
            let e = layout(&h, m, file).unwrap_err().to_string();
            assert!(e.contains(what), "{what}: {e}");
        }
    }
}
