//! Embeds the eBPF object when `cargo xtask build-ebpf` has built it (at
//! target/bpf/pcft-ebpf.o, or where PCFT_EBPF_OBJECT says), so that one pcft
//! binary carries its programs. Without it the agent builds all the same (the
//! `ebpf` dirty tracker then says how to get it), and `cargo check`/clippy
//! never need the nightly toolchain or bpf-linker.

use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(pcft_ebpf)");
    println!("cargo::rerun-if-env-changed=PCFT_EBPF_OBJECT");
    let object = match std::env::var_os("PCFT_EBPF_OBJECT") {
        Some(path) => PathBuf::from(path),
        None => {
            let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
            manifest.join("../target/bpf/pcft-ebpf.o")
        }
    };
    println!("cargo::rerun-if-changed={}", object.display());
    if object.is_file() {
        println!("cargo::rustc-cfg=pcft_ebpf");
        println!("cargo::rustc-env=PCFT_EBPF_OBJECT={}", object.canonicalize().expect("the object exists").display());
    }
}
