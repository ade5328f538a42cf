//! The OCI fragments the CLI and the shim take apart from a whole bundle:
//! a process (`exec --process FILE`, the shim's exec spec) and resources
//! (`update --resources FILE`, the shim's update), parsed as they parse
//! them and converted with `to_agent` as they convert them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sandbox::oci::{Process, Resources};

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = serde_json::from_slice::<Process>(data) {
        let agent = p.to_agent();
        assert_eq!(agent.args, p.args);
        assert!(!agent.cwd.is_empty());
    }
    if let Ok(r) = serde_json::from_slice::<Resources>(data) {
        let agent = r.to_agent();
        assert!(agent.memory_limit >= 0 && agent.cpu_quota >= 0 && agent.pids_limit >= 0);
    }
});
