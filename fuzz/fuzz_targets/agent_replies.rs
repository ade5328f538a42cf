//! What the host decodes from the guest agent (hostile once the guest is):
//! every reply of the Agent service, decoded with prost as tonic decodes
//! a message, then re-encoded and decoded again to the same value. A
//! `WaitProcessResponse` also goes where the holder puts it: the
//! container's exit record, written and read back.
#![no_main]

mod common;

use std::sync::OnceLock;

use agent_proto::{
    ContainerStats, Empty, ExecProcessResponse, FileChunk, FileInfo, FileInfoList,
    ListProcessesResponse, OutputChunk, PortChunk, VersionResponse, WaitProcessResponse,
    WatchEvent,
};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use sandbox::container::{ContainerDir, ExitRecord};

fn roundtrip<M: Message + Default + PartialEq + std::fmt::Debug>(data: &[u8]) -> Option<M> {
    let m = M::decode(data).ok()?;
    let again = M::decode(m.encode_to_vec().as_slice()).expect("our own encoding decodes");
    assert_eq!(m, again);
    Some(m)
}

fn container() -> &'static ContainerDir {
    static DIR: OnceLock<ContainerDir> = OnceLock::new();
    DIR.get_or_init(|| {
        ContainerDir::create(&common::scratch("agent"), "c1").expect("a container directory")
    })
}

fuzz_target!(|data: &[u8]| {
    roundtrip::<VersionResponse>(data);
    roundtrip::<Empty>(data);
    roundtrip::<ContainerStats>(data);
    roundtrip::<ListProcessesResponse>(data);
    roundtrip::<OutputChunk>(data);
    roundtrip::<ExecProcessResponse>(data);
    roundtrip::<FileInfo>(data);
    roundtrip::<FileInfoList>(data);
    roundtrip::<FileChunk>(data);
    roundtrip::<WatchEvent>(data);
    roundtrip::<PortChunk>(data);
    if let Some(w) = roundtrip::<WaitProcessResponse>(data) {
        let exit = ExitRecord {
            code: w.exit_code,
            signal: w.signal,
        };
        let dir = container();
        dir.write_exit(exit).expect("writing the exit record");
        assert_eq!(dir.exit(), Some(exit));
    }
});
