//! The binaries' command lines and start-up.

use std::process::Command;

use stalewatch_testkit::{bin_path, TestEnv};

#[test]
fn a_bad_setting_stops_either_binary_with_a_message_naming_it() {
    for bin in ["stalewatch-api", "stalewatch-worker"] {
        let out = Command::new(bin_path(bin))
            .env("GRACE_PERIOD_MS", "two seconds")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{bin} started anyway");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("GRACE_PERIOD_MS"), "{bin}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_applies_nothing_on_a_migrated_database_and_unknown_commands_fail() {
    let env = TestEnv::new().await.unwrap();
    let run = |args: &[&str]| {
        Command::new(bin_path("stalewatch-worker"))
            .args(args)
            .envs(env.env_vars())
            .output()
            .unwrap()
    };
    let out = run(&["migrate"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("applied 0 migration(s)"));
    let out = run(&["frobnicate"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage: stalewatch-worker"));
}
