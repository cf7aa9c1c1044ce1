//! Writes the seed corpus: `cargo +nightly run --manifest-path fuzz/Cargo.toml --example seeds`
//! (run from the repository root or anywhere; paths are relative to this crate). With
//! `--check` it only runs every seed through its target once (no libFuzzer needed).

use std::path::Path;

fn main() {
    let check = std::env::args().any(|a| a == "--check");
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (target, seeds) in tessera_fuzz::seeds::all() {
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir).expect("create the corpus directory");
        for (name, bytes) in seeds {
            if check {
                let run: fn(&[u8]) = match target {
                    "bar0_registers" => tessera_fuzz::bar0::run,
                    "command_stream" => tessera_fuzz::stream::run,
                    "page_tables" => tessera_fuzz::ptables::run,
                    "vfio_user_messages" => tessera_fuzz::vfu::run,
                    "session_messages" => tessera_fuzz::sess::run,
                    _ => tessera_fuzz::pcicfg::run,
                };
                run(&bytes);
                println!("{target}/{name}: ok");
            } else {
                let path = dir.join(format!("seed-{name}"));
                std::fs::write(&path, &bytes).expect("write a seed");
                println!("{} ({} bytes)", path.display(), bytes.len());
            }
        }
    }
}
