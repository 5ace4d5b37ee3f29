// Names the template test database after the migrations' content, so a changed migration
// gets a fresh template instead of a stale one.
use std::{collections::hash_map::DefaultHasher, fs, hash::Hasher, path::Path};

fn main() {
    // Read when the script runs, not when it was compiled: a build script compiled for one
    // checkout (say a git worktree sharing target/) must not look in that checkout.
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let dir = Path::new(&manifest).join("../../migrations");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut entries: Vec<_> = fs::read_dir(&dir)
        .expect("migrations/ exists")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    entries.sort();
    let mut hasher = DefaultHasher::new();
    for migration in entries {
        println!("cargo:rerun-if-changed={}", migration.display());
        hasher.write(migration.file_name().unwrap().as_encoded_bytes());
        for file in ["up.sql", "down.sql"] {
            hasher.write(&fs::read(migration.join(file)).unwrap_or_default());
        }
    }
    println!("cargo:rustc-env=MIGRATIONS_HASH={:016x}", hasher.finish());
}
