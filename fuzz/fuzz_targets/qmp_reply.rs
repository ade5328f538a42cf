//! QMP: the lines a (possibly compromised) QEMU sends on its control socket.
//! `parse_reply` on the input as one line, then `read_reply_line` (what
//! `Qmp` reads replies with) over the input as a byte stream: with the real
//! line limit, and with one the first byte picks, so that the "too long"
//! path is reached too.
#![no_main]

mod common;

use hypervisor::qemu::qmp::{parse_reply, read_reply_line, MAX_LINE};
use libfuzzer_sys::fuzz_target;

fn read_all(mut reader: &[u8], limit: u64) {
    while !reader.is_empty() {
        let before = reader.len();
        let _ = common::now(read_reply_line(&mut reader, limit));
        let taken = (before - reader.len()) as u64;
        // Every read makes progress, and none takes more than the limit.
        assert!(
            taken > 0 && taken <= limit,
            "read {taken} bytes, limit {limit}"
        );
    }
    // The end of the stream: QEMU hung up.
    assert!(common::now(read_reply_line(&mut reader, limit)).is_err());
}

fuzz_target!(|data: &[u8]| {
    if let Ok(line) = std::str::from_utf8(data) {
        let _ = parse_reply(line);
    }
    read_all(data, MAX_LINE);
    if let Some(&first) = data.first() {
        read_all(data, u64::from(first) + 1);
    }
});
