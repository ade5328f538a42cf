//! `sandbox::fdmsg::Reader::recv`: how a pool daemon and its callers read
//! JSON lines with descriptors alongside (SCM_RIGHTS) off a Unix socket.
//! The input is a list of segments, each sent with one `sendmsg` on the
//! other end of a socketpair:
//!
//!   flags (1 byte)  length (2 bytes, little endian)  payload
//!
//! flags bits 0-1: descriptors sent along (0 to 3); bit 2: 17 instead (one
//! more than a message may carry); bit 4: 253 instead (the most the kernel
//! passes at once); bit 3: the segment is sent 32 times over (so lines can
//! outgrow the reader's limit).
//! The reader must hand back exactly the lines sent, in order, never
//! panic, and leave no descriptor open once its messages are dropped.
#![no_main]

use std::fs::File;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use sandbox::fdmsg::Reader;

/// At most this many descriptors go with one input.
const MAX_SENT_FDS: usize = 256;

struct Segment {
    bytes: Vec<u8>,
    fds: usize,
    times: usize,
}

fn segments(mut data: &[u8]) -> Vec<Segment> {
    let mut out = Vec::new();
    while let [flags, lo, hi, rest @ ..] = data {
        let len = usize::from(u16::from_le_bytes([*lo, *hi])).min(rest.len());
        let (bytes, tail) = rest.split_at(len);
        data = tail;
        if bytes.is_empty() {
            continue;
        }
        let fds = if flags & 16 != 0 {
            253
        } else if flags & 4 != 0 {
            17
        } else {
            usize::from(flags & 3)
        };
        let times = if flags & 8 != 0 { 32 } else { 1 };
        out.push(Segment {
            bytes: bytes.to_vec(),
            fds,
            times,
        });
    }
    out
}

fn dev_null() -> RawFd {
    static NULL: OnceLock<File> = OnceLock::new();
    NULL.get_or_init(|| File::open("/dev/null").expect("opening /dev/null"))
        .as_raw_fd()
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// Sends `segments` on `sock`, then hangs up; stops early when the reader
/// has gone. Returns the bytes sent.
fn write_all(sock: UnixStream, segments: Vec<Segment>) -> Vec<u8> {
    let mut sent = Vec::new();
    let mut fds_left = MAX_SENT_FDS;
    let null = dev_null();
    for seg in &segments {
        for _ in 0..seg.times {
            let n = seg.fds.min(fds_left);
            fds_left -= n;
            let fds = vec![null; n];
            let rights = [ControlMessage::ScmRights(&fds)];
            let cmsgs: &[ControlMessage] = if n == 0 { &[] } else { &rights };
            let mut off = 0;
            while off < seg.bytes.len() {
                let cmsgs = if off == 0 { cmsgs } else { &[] };
                match sendmsg::<()>(
                    sock.as_raw_fd(),
                    &[IoSlice::new(&seg.bytes[off..])],
                    cmsgs,
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                ) {
                    Ok(k) => {
                        sent.extend_from_slice(&seg.bytes[off..off + k]);
                        off += k;
                    }
                    // The reader gave up (a line too long) and hung up.
                    Err(_) => return sent,
                }
            }
        }
    }
    sent
}

fuzz_target!(|data: &[u8]| {
    let segments = segments(data);
    dev_null();
    let fds_before = open_fds();
    let (tx, rx) = UnixStream::pair().expect("a socketpair");
    let writer = std::thread::spawn(move || write_all(tx, segments));
    let mut reader = Reader::default();
    let mut got = Vec::new();
    let mut failed = false;
    loop {
        match reader.recv(&rx) {
            Ok(Some((line, _fds))) => {
                assert!(!line.contains(&b'\n'), "a line holds a newline");
                got.extend_from_slice(&line);
                got.push(b'\n');
            }
            Ok(None) => break,
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    drop(reader);
    drop(rx);
    let sent = writer.join().expect("the writer thread");
    // What came out is what went in, line by line.
    assert!(sent.starts_with(&got), "lines that were not sent");
    if !failed {
        // At the end of the stream only a partial line may be left unread.
        assert!(!sent[got.len()..].contains(&b'\n'), "a whole line was lost");
    }
    assert_eq!(open_fds(), fds_before, "descriptors leaked");
});
