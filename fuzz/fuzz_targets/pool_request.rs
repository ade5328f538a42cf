//! The request lines a pool daemon reads from a caller
//! (`sandbox::pool::parse_request`) and a VM's supervisor reads from its
//! front end (`sandbox::supervisor::parse_request`), and the attach point a
//! name in one becomes (`attach_point`): one plain component right under
//! the VM's share, whatever the name.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use sandbox::pool::{attach_point, parse_request, Request};
use sandbox::supervisor::{self, Request as VmRequest};

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
    if let Ok(Request::Take { nics }) = parse_request(data) {
        let _ = nics;
    }
    match supervisor::parse_request(data) {
        Ok((_, VmRequest::Attach { name, .. })) | Ok((_, VmRequest::Detach { name, .. })) => {
            check(&name)
        }
        _ => {}
    }
    if let Ok(name) = std::str::from_utf8(data) {
        check(name);
    }
});
