//! Plain SQL and plain Redis commands, as the watched application (or an operator with psql
//! and redis-cli) issues them: nothing here goes through stalewatch.

use diesel_async::RunQueryDsl;
use stalewatch_testkit::TestEnv;

/// Runs one statement on the test's database and returns the number of rows it touched. The
/// statement is sent whole, so a `DO` block with `;` inside is fine.
pub async fn sql(env: &TestEnv, statement: &str) -> usize {
    let mut conn = env.pool.get().await.unwrap();
    diesel::sql_query(statement)
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{statement}: {e}"))
}

/// Runs a script (a schema, seed rows) one statement at a time, split at each `;`: a prepared
/// statement holds one command only. Not for statements with a `;` of their own (`sql` is).
pub async fn sql_script(env: &TestEnv, script: &str) {
    let mut conn = env.pool.get().await.unwrap();
    for statement in script.split(';').filter(|s| !s.trim().is_empty()) {
        diesel::sql_query(statement)
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{statement}: {e}"));
    }
}

/// One command on the watched cache, `args[0]` its name, and its reply as `T` (`redis::Value`
/// when the test does not care).
pub async fn redis_cmd<T: redis::FromRedisValue>(env: &TestEnv, args: &[&str]) -> T {
    let mut conn = env.cache.connection();
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(&mut conn).await.unwrap()
}

/// Deletes every cached key matching `pattern`, a thousand to a DEL.
pub async fn flush_keys(env: &TestEnv, pattern: &str) {
    let keys: Vec<String> = redis_cmd(env, &["KEYS", pattern]).await;
    for chunk in keys.chunks(1000) {
        let mut args = vec!["DEL"];
        args.extend(chunk.iter().map(String::as_str));
        let _: u64 = redis_cmd(env, &args).await;
    }
}
