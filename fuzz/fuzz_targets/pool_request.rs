//! A pool daemon's side of its socket: the request lines a caller sends
//! (`sandbox::pool::parse_request`, as `read_request` and `hand_out` use
//! it), and the attach point a name in one becomes (`attach_point`): one
//! plain component right under the clone's share, whatever the name.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use sandbox::pool::{attach_point, parse_request, Request};

const SHARE: &str = "/run/podvisor/pools/t/pool-t-1-1";

fn check(name: &str) {
    let share = Path::new(SHARE);
    if let Ok(at) = attach_point(share, name) {
        assert_eq!(at.parent(), Some(share), "{name:?} leaves the share");
        assert_eq!(
            at.file_name().map(|n| n.as_encoded_bytes()),
            Some(name.as_bytes()),
            "{name:?} is not one component"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    match parse_request(data) {
        Ok(Request::Attach { name }) | Ok(Request::Detach { name }) => check(&name),
        Ok(Request::Take { .. }) | Err(_) => {}
    }
    if let Ok(name) = std::str::from_utf8(data) {
        check(name);
    }
});
