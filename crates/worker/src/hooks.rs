//! Test-only pause points, for the tests that kill a process at one exact place (between the
//! two writes of an ingest batch) rather than hoping a SIGKILL lands there.
//!
//! Honoured only when `STALEWATCH_TEST_HOOKS` names a directory, which no deployment sets (it
//! is not a setting: neither `--help` nor the README's table lists it). At a pause point
//! `NAME`, if the file `DIR/NAME` exists, the process writes `DIR/NAME.reached` (holding its
//! pid) and waits until `DIR/NAME` is removed. Unset, a pause point costs one check of a value
//! read once.

use std::{path::PathBuf, sync::LazyLock, time::Duration};

static DIR: LazyLock<Option<PathBuf>> =
    LazyLock::new(|| std::env::var_os("STALEWATCH_TEST_HOOKS").map(PathBuf::from));

/// Between an ingest batch's database statement (committed) and its cache pipeline.
pub const INGEST_BETWEEN_STORES: &str = "ingest-between-stores";

/// Waits at pause point `name` while the test holds it (see the module).
pub async fn pause(name: &str) {
    let Some(dir) = DIR.as_ref() else { return };
    let gate = dir.join(name);
    if !gate.exists() {
        return;
    }
    let _ = std::fs::write(
        dir.join(format!("{name}.reached")),
        std::process::id().to_string(),
    );
    tracing::warn!(point = name, "held at a test pause point");
    while gate.exists() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
