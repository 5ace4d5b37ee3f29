//! Files a test writes for the binaries it starts, removed when the test ends, passed or not.

use std::path::{Path, PathBuf};

/// An ENTITIES file (TOML) of the test's own, named `<what>-<uuid>.toml` in the temporary
/// directory so that tests running at once never read each other's.
pub struct EntitiesFile(PathBuf);

impl EntitiesFile {
    pub fn write(what: &str, text: &str) -> EntitiesFile {
        let path = std::env::temp_dir().join(format!("{what}-{}.toml", uuid::Uuid::new_v4()));
        std::fs::write(&path, text).unwrap();
        EntitiesFile(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The setting that points a binary at this file.
    pub fn var(&self) -> (&'static str, &str) {
        (
            "ENTITIES",
            self.0.to_str().expect("a temporary path in UTF-8"),
        )
    }
}

impl Drop for EntitiesFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A directory of the test's own, named `stalewatch-<what>-<uuid>` in the temporary directory,
/// removed with everything in it.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(what: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "stalewatch-{what}-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
