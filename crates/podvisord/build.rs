//! envd's messages: prost types, with pbjson's proto3-JSON serde impls (the
//! Connect JSON codec E2B's SDKs use).
fn main() {
    let protos = ["proto/envd/process.proto", "proto/envd/filesystem.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let descriptors = out.join("envd_descriptors.bin");
    prost_build::Config::new()
        .file_descriptor_set_path(&descriptors)
        .compile_well_known_types()
        .extern_path(".google.protobuf", "::pbjson_types")
        .compile_protos(&protos, &["proto/envd"])
        .expect("compiling envd's protos (needs protoc: apt-get install protobuf-compiler)");
    let set = std::fs::read(&descriptors).expect("reading the descriptors");
    pbjson_build::Builder::new()
        .register_descriptors(&set)
        .expect("registering the descriptors")
        .build(&[".process", ".filesystem"])
        .expect("generating the JSON impls");
}
