//! Compiles agent-ebpf for bpfel-unknown-none and places the object in OUT_DIR, where src/ebpf embeds it.
//! `WARREN_EBPF_OBJECT=/path/to/object` skips the build (packaging, or a machine without the toolchain).
use std::{env, path::PathBuf};

fn main() {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let workspace_root = manifest_dir.parent().expect("agent/ is inside the workspace").to_path_buf();
    for watched in ["agent-ebpf/src", "agent-ebpf/Cargo.toml", "maps/src", "maps/Cargo.toml"] {
        println!("cargo:rerun-if-changed={}", workspace_root.join(watched).display());
    }
    for var in ["WARREN_EBPF_OBJECT", "WARREN_EBPF_TOOLCHAIN", "WARREN_CACHE"] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let object = match env::var_os("WARREN_EBPF_OBJECT") {
        Some(prebuilt) => PathBuf::from(prebuilt),
        None => {
            // Cargo marks the target directory's root with CACHEDIR.TAG; the nested build gets its own
            // directory under it so the two cargo invocations never wait on each other's lock.
            let target_root = out_dir
                .ancestors()
                .find(|d| d.join("CACHEDIR.TAG").is_file())
                .map(|d| d.to_path_buf())
                .unwrap_or_else(|| workspace_root.join("target"));
            let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".into());
            match warren_ebpf_build::build(&workspace_root, &target_root.join("ebpf"), &arch) {
                Ok(object) => object,
                Err(reason) => {
                    eprintln!("error: {reason}");
                    panic!("warren-agent needs its eBPF object: {} (details above)", reason.lines().next().unwrap_or(""));
                }
            }
        }
    };
    std::fs::copy(&object, out_dir.join("warren-ebpf.o"))
        .unwrap_or_else(|e| panic!("copying {} into OUT_DIR: {e}", object.display()));
}
