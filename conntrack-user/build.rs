//! Embeds the eBPF object that `cargo xtask build` produced. Without one, an
//! empty placeholder is embedded so that unit tests and `cargo check` work
//! without nightly or bpf-linker; ctwatch then says how to build it.
use std::{env, fs, path::PathBuf};

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap()).join("ctwatch-ebpf.o");
    let src = match env::var_os("CTWATCH_EBPF_OBJECT") {
        Some(p) => PathBuf::from(p),
        None => {
            let root = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
            root.join("../target/bpfel-unknown-none/release/ctwatch-ebpf")
        }
    };
    println!("cargo:rerun-if-env-changed=CTWATCH_EBPF_OBJECT");
    println!("cargo:rerun-if-changed={}", src.display());
    match fs::read(&src) {
        Ok(bytes) => fs::write(&out, bytes).unwrap(),
        Err(_) => fs::write(&out, []).unwrap(),
    }
}
