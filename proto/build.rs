//! Generates the protobuf types from `schemas/` without a system `protoc`:
//! `protox` parses the .proto files in pure Rust and hands prost-build a
//! file descriptor set. Runs only with feature `std` (firmware builds have no
//! use for protobuf and no allocator).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=schemas");
    #[cfg(feature = "std")]
    {
        let files = [
            "outpost/v1/telemetry.proto",
            "outpost/v1/status.proto",
            "outpost/v1/ack.proto",
            "outpost/v1/alert.proto",
        ];
        let fds = protox::compile(files, ["schemas"])?;
        prost_build::Config::new().compile_fds(fds)?;
    }
    Ok(())
}
