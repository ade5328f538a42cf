//! A pool's caller: the daemon's answer line (`sandbox::pool::parse_reply`,
//! as `ask` uses it) and the pool's status file (`pool::status` reads it
//! as a `PoolStatus`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sandbox::pool::{parse_reply, PoolStatus};

fuzz_target!(|data: &[u8]| {
    let _ = parse_reply(data);
    let _ = serde_json::from_slice::<PoolStatus>(data);
});
