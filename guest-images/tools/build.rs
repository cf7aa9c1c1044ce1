//! Compiles libtessera (C) into a static library and links it in.

use std::path::PathBuf;
use std::process::Command;

fn run(cmd: &mut Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(status.success(), "{cmd:?} failed: {status}");
}

fn main() {
    let root =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("manifest dir")).join("../..");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let src = root.join("guest-images/libtessera/libtessera.c");
    let obj = out.join("libtessera.o");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    // With the `sessions` feature libtessera calls the session transports of tessera-capi
    // (a dependency, so its symbols are linked into the tools).
    let sessions = std::env::var_os("CARGO_FEATURE_SESSIONS").is_some();
    run(Command::new(&cc)
        .args(["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-c"])
        .args(sessions.then_some("-DTESSERA_SESSIONS"))
        .arg("-I")
        .arg(root.join("guest-images/libtessera"))
        .arg("-I")
        .arg(root.join("guest-images/driver"))
        .arg("-I")
        .arg(root.join("vgpu/abi/include"))
        .arg(&src)
        .arg("-o")
        .arg(&obj));
    let lib = out.join("libtessera.a");
    let _ = std::fs::remove_file(&lib);
    run(Command::new("ar").arg("rcs").arg(&lib).arg(&obj));
    println!("cargo:rustc-link-search=native={}", out.display());
    println!("cargo:rustc-link-lib=static=tessera");
    for f in [
        "guest-images/libtessera/libtessera.c",
        "guest-images/libtessera/tessera.h",
        "guest-images/driver/tessera_vgpu_ioctl.h",
        "vgpu/abi/include/tessera_vgpu.h",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(f).display());
    }
}
