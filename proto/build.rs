//! Compiles the .proto files with a vendored protoc, so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; tonic-prost-build reads PROTOC from the env.
    unsafe { std::env::set_var("PROTOC", protoc) };
    tonic_prost_build::configure().compile_protos(&["proto/mtl/v1/coordinator.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
