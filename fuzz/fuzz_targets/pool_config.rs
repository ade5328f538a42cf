//! The factory policy, /etc/podvisor/config.toml (`PODVISOR_CONFIG`):
//! `sandbox::pool::parse_config` (what `load_config` runs on the file's
//! text) and `parse_annotation_policy` (what `annotation_policy` runs; the
//! front ends' `template = ` goes through the same parse).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use sandbox::pool::{parse_annotation_policy, parse_config};

fuzz_target!(|data: &[u8]| {
    // The file is read with read_to_string: only UTF-8 gets this far.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/etc/podvisor/config.toml");
    if let Ok(pools) = parse_config(path, text) {
        for p in pools {
            assert!(
                (1..=64).contains(&p.size),
                "pool size {} let through",
                p.size
            );
        }
    }
    let _ = parse_annotation_policy(path, text);
});
