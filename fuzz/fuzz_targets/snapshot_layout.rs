//! A snapshot's head as a (possibly compromised) QEMU writes it: the
//! mapped-ram layout read from it never lies outside the file or overlaps
//! the bitmap, whatever the bytes, sizes and file length.
#![no_main]

use hypervisor::qemu::mapped_ram::layout;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    // The VM's RAM size and the file's length come from the first bytes.
    let length = u64::from(data[0]) << 20;
    let file_len = u64::from(data[1]) << 21;
    if let Ok(l) = layout(&data[2..], length, file_len) {
        assert!(l.pages_offset + l.length < file_len);
        assert!(l.bitmap_offset + l.length.div_ceil(l.page_size * 8) <= l.pages_offset);
        assert_eq!(l.pages_offset % l.page_size, 0);
    }
});
