//! The consistency SLO, in the style of Meta's Polaris: for every change stalewatch observes,
//! did the cache agree with the database within each window (by default 1 s, 10 s and 60 s)?
//!
//! A change's keys are probed once per window, `window` after the change committed, with the
//! same comparison as a check but nothing recorded. One job carries the keys through every
//! window: each probe queues the next window's (`SloJob::into_next`). A probe only counts
//! (`stalewatch_slo_changes_total{entity, window, result}`), so Prometheus can compute "nines"
//! such as 99.99% consistent within 10 s. A key the application has not caught up with by
//! then counts as inconsistent in that window, whether or not it is fixed later.

use std::time::Duration;

use crate::check::{CheckError, Checker};
use crate::watch;

/// `SLO_WINDOWS` when unset.
pub const DEFAULT_WINDOWS: &str = "1s,10s,60s";

/// Reads a comma-separated list of durations with units (`1s,10s,60s`, `500ms, 1m`), in
/// ascending order, without repeats; `off` is none (no probes, no SLO series).
pub fn parse_windows(s: &str) -> Result<Vec<Duration>, String> {
    if s.trim() == "off" {
        return Ok(Vec::new());
    }
    let mut windows = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let d = humantime::parse_duration(part)
            .map_err(|_| format!("{part:?} is not a duration such as 1s or 500ms"))?;
        if d.is_zero() {
            return Err("a window must be longer than zero".into());
        }
        windows.push(d);
    }
    if windows.is_empty() {
        return Err("at least one window, such as 1s,10s,60s, or off".into());
    }
    windows.sort();
    windows.dedup();
    Ok(windows)
}

/// The window as a metric label: `1s`, `10s`, `1m`, `500ms`.
pub fn window_label(d: Duration) -> String {
    humantime::format_duration(d).to_string().replace(' ', "")
}

/// How many probed keys agreed with their rows.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Agreement {
    pub consistent: u64,
    pub inconsistent: u64,
}

/// Compares `keys` of `entity` with their rows now, as a check would, recording nothing. A key
/// that is not the entity's is not counted.
pub async fn probe(
    checker: &Checker,
    entity: &str,
    keys: &[String],
) -> Result<Agreement, CheckError> {
    let rows = checker
        .watched
        .source(entity)
        .ok_or_else(|| CheckError::UnknownEntity(entity.to_string()))?;
    let (keys, values): (Vec<String>, Vec<Vec<String>>) = keys
        .iter()
        .filter_map(|k| rows.key_values(k).map(|v| (k.clone(), v)))
        .unzip();
    let mut out = Agreement::default();
    let shape = watch::shape(&rows.entity.representation);
    // As a check after a change does (`Checker::check_absent_first`): a key absent from the
    // cache of an entity invalidated on change agrees with its row, which need not be read.
    let (keys, values) = if checker.watched.invalidated_and_aside(rows) && !keys.is_empty() {
        let (absent, present) = checker.split_absent(rows, keys, values).await?;
        out.consistent += absent.len() as u64;
        present
    } else {
        (keys, values)
    };
    if keys.is_empty() {
        return Ok(out);
    }
    let found = {
        let mut conn = checker.pool.get().await?;
        rows.by_keys(&mut conn, &values).await?.1
    };
    let cached = checker.cache.read_many(shape, &keys).await?;
    for ((key, found), cached) in keys.into_iter().zip(found).zip(cached) {
        if checker
            .watched
            .evidence(rows, key, found, cached)
            .kind
            .is_match()
        {
            out.consistent += 1;
        } else {
            out.inconsistent += 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_read_sorted_and_labelled() {
        let w = parse_windows("60s, 1s,10s,1s").unwrap();
        assert_eq!(
            w,
            [
                Duration::from_secs(1),
                Duration::from_secs(10),
                Duration::from_secs(60)
            ]
        );
        let labels: Vec<String> = w.into_iter().map(window_label).collect();
        assert_eq!(labels, ["1s", "10s", "1m"]);
        assert_eq!(window_label(Duration::from_millis(500)), "500ms");
        assert_eq!(parse_windows(DEFAULT_WINDOWS).unwrap().len(), 3);
    }

    #[test]
    fn off_means_no_window() {
        assert_eq!(parse_windows("off").unwrap(), Vec::<Duration>::new());
        assert!(parse_windows("off,1s").is_err());
    }

    #[test]
    fn bad_windows_are_refused() {
        for bad in ["", "10", "0s", "1s,soon"] {
            assert!(parse_windows(bad).is_err(), "{bad:?}");
        }
    }
}
