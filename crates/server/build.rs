//! Compiles `proto/topoplace/v1/placement.proto` with protox (a protoc written in Rust, so a
//! fresh machine needs no system protoc) and generates the tonic client and server. The
//! encoded descriptor set is written beside the code for the reflection service.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/topoplace/v1/placement.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("topoplace_v1_descriptor.bin"), descriptors.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
