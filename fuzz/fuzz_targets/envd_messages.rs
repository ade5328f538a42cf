//! What an E2B client sends podvisord's envd: Connect envelopes (the
//! framing of every streaming call) and envd's messages in both codecs
//! (proto3 JSON via pbjson, binary protobuf via prost), as
//! `podvisord::connect` parses them for the calls that take them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use podvisord::connect::{parse_all, parse_one, Codec};
use podvisord::pb::{filesystem as fs, process as pr};

fn each<T: podvisord::connect::Msg>(data: &[u8]) {
    for codec in [Codec::Json, Codec::Proto] {
        let _ = parse_one::<T>(codec, data);
        let _ = parse_all::<T>(codec, data);
    }
}

fuzz_target!(|data: &[u8]| {
    each::<pr::StartRequest>(data);
    each::<pr::ConnectRequest>(data);
    each::<pr::StreamInputRequest>(data);
    each::<pr::SendInputRequest>(data);
    each::<pr::SendSignalRequest>(data);
    each::<pr::UpdateRequest>(data);
    each::<fs::ListDirRequest>(data);
    each::<fs::MoveRequest>(data);
    each::<fs::WatchDirRequest>(data);
    each::<fs::GetWatcherEventsRequest>(data);
});
