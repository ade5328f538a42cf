//! A template's template.json, as `Template::open` reads it (for a clone,
//! a pool, `template list`): written to a template directory whose memory
//! file holds 2 MiB, then opened. An open template must be what its files
//! say: a memory file of exactly `memory_mib` MiB, and the name it was
//! opened by (the name becomes a path component of pools and shares).
#![no_main]

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sandbox::template::Template;

const NAME: &str = "t";
const MEMORY_MIB: u64 = 2;

fn root() -> &'static PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let root = common::scratch("template");
        let dir = root.join("templates").join(NAME);
        std::fs::create_dir_all(&dir).unwrap();
        let memory = std::fs::File::create(dir.join("memory")).unwrap();
        memory.set_len(MEMORY_MIB << 20).unwrap();
        std::fs::write(dir.join("state"), b"QEVM").unwrap();
        root
    })
}

fuzz_target!(|data: &[u8]| {
    let root = root();
    std::fs::write(
        root.join("templates").join(NAME).join("template.json"),
        data,
    )
    .unwrap();
    let Ok(t) = Template::open(root, NAME) else {
        return;
    };
    assert_eq!(
        t.meta.memory_mib, MEMORY_MIB,
        "opened with a memory file of another size"
    );
    assert_eq!(t.meta.name, NAME, "opened under another name");
    let _ = t.shape();
    let _ = t.accel();
    let _ = t.size();
});
