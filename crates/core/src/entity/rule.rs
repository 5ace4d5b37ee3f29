//! `[[invalidate]]`: invalidation-only rules, for cache keys that are not tracked entities
//! (lists, pages, aggregates). A change captured from a rule's table deletes the rule's keys,
//! rendered from the old and the new row; nothing is checked afterwards.
//!
//! ```toml
//! [[invalidate]]
//! name = "category_pages"      # optional, [a-z0-9_]+ (default invalidate_<line>)
//! table = "public.products"
//! keys = [
//!   "app:product:{id}:html",             # one key per row
//!   "app:category:{category_id}:products:*",  # ends in `*`: every key with that prefix
//!   "app:products:count",                # no placeholder: the same key on every change
//! ]
//! strategy = "batched"         # or immediate (default)
//! batch_count = 1000           # batched: a batch goes out at this many changes (default 1000)
//! batch_time = "50ms"          # ... or when its oldest change has waited this long (50ms)
//! ```
//!
//! A key ending in `*` is a pattern delete: the consumer `SCAN`s with `MATCH` and `UNLINK`s
//! what it finds (never `KEYS`, which blocks Redis for the whole keyspace). The values put
//! into a pattern are glob-escaped, and literal text must come between the last placeholder
//! and the `*`: `cat:{id}*` for category 1 would also delete category 12's keys.

use std::ops::Range;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{Builder, Table, Template};
use crate::invalidation::{Strategy, BATCH_COUNT, BATCH_WITHIN};

/// One `[[invalidate]]` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub name: String,
    pub table: Table,
    pub keys: Vec<RuleKey>,
    pub strategy: Strategy,
    /// 1-based line of the rule's `[[invalidate]]` header.
    pub line: usize,
}

/// A key template of a rule, or a pattern (written with a trailing `*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleKey {
    /// The key, or the pattern's prefix (without the `*`).
    pub template: Template,
    pub pattern: bool,
}

impl RuleKey {
    /// The key (`pattern` false) or the Redis glob of the keys (true) of one side of a
    /// change; None when a value is NULL.
    pub fn render(&self, value: impl FnMut(&str) -> Option<String>) -> Option<String> {
        if self.pattern {
            self.template.render_glob(value).map(|g| g + "*")
        } else {
            self.template.render(value)
        }
    }
}

impl std::fmt::Display for RuleKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}{}",
            self.template,
            if self.pattern { "*" } else { "" }
        )
    }
}

impl Rule {
    /// Every column the rule's templates name, without repeats.
    pub fn named_columns(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for k in &self.keys {
            for c in k.template.columns() {
                if !out.contains(&c) {
                    out.push(c);
                }
            }
        }
        out
    }
}

/// One `[[invalidate]]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    name: Option<Spanned<String>>,
    table: Option<Spanned<String>>,
    keys: Option<Spanned<Vec<Spanned<String>>>>,
    strategy: Option<Spanned<String>>,
    batch_count: Option<Spanned<i64>>,
    batch_time: Option<Spanned<String>>,
}

impl Builder<'_> {
    pub(super) fn build_rule(&mut self, raw: RawRule) -> Option<Rule> {
        let before = self.errors.len();
        let name = match &raw.name {
            None => Some(format!("invalidate_{}", self.header)),
            Some(s) => self.name(s),
        };
        let table = match &raw.table {
            None => {
                self.missing("table", ": the table whose changes invalidate the keys");
                None
            }
            Some(s) => self.table(s),
        };
        let keys = match &raw.keys {
            None => {
                self.missing(
                    "keys",
                    ": the keys a change deletes, e.g. [\"app:category:{category_id}:products:*\"]",
                );
                None
            }
            Some(list) if list.get_ref().is_empty() => {
                self.error(Some(list.span()), "keys is empty".into());
                None
            }
            Some(list) => {
                let mut out = Vec::new();
                let mut ok = true;
                for item in list.get_ref() {
                    match self.rule_key(item) {
                        Some(k) => out.push(k),
                        None => ok = false,
                    }
                }
                ok.then_some(out)
            }
        };
        let strategy = self.strategy(&raw);
        if self.errors.len() > before {
            return None;
        }
        Some(Rule {
            name: name?,
            table: table?,
            keys: keys?,
            strategy: strategy?,
            line: self.header,
        })
    }

    fn rule_key(&mut self, s: &Spanned<String>) -> Option<RuleKey> {
        let text = self.expand("keys", s, true)?;
        let (text, pattern) = match text.strip_suffix('*') {
            Some(prefix) => (prefix.to_string(), true),
            None => (text, false),
        };
        let fail = |b: &mut Self, why: String| {
            b.error(Some(s.span()), format!("keys {:?}: {why}", s.get_ref()));
            None
        };
        if text.contains('*') {
            return fail(
                self,
                "a '*' may only end a key, for a pattern delete of every key with that prefix"
                    .into(),
            );
        }
        if pattern && text.is_empty() {
            return fail(self, "a pattern of '*' alone would delete every key".into());
        }
        let template = match Template::parse_text(&text) {
            Ok(t) => t,
            Err(e) => return fail(self, e),
        };
        if pattern && template.ends_with_placeholder() {
            return fail(
                self,
                "put literal text between the last placeholder and '*' (\"cat:{id}:*\", not \
                 \"cat:{id}*\"): else the pattern of id 1 also deletes the keys of id 12"
                    .into(),
            );
        }
        Some(RuleKey { template, pattern })
    }

    fn strategy(&mut self, raw: &RawRule) -> Option<Strategy> {
        let batched = match &raw.strategy {
            None => false,
            Some(s) => match self.expand("strategy", s, false)?.as_str() {
                "immediate" => false,
                "batched" => true,
                other => {
                    self.error(
                        Some(s.span()),
                        format!("strategy {other:?} is not immediate or batched"),
                    );
                    return None;
                }
            },
        };
        let spans: [(&str, Option<Range<usize>>); 2] = [
            ("batch_count", raw.batch_count.as_ref().map(|c| c.span())),
            ("batch_time", raw.batch_time.as_ref().map(|c| c.span())),
        ];
        if !batched {
            let mut ok = true;
            for (field, span) in spans {
                if let Some(span) = span {
                    self.error(
                        Some(span),
                        format!("{field} applies to strategy = \"batched\" only"),
                    );
                    ok = false;
                }
            }
            return ok.then_some(Strategy::Immediate);
        }
        let count = match &raw.batch_count {
            None => Some(BATCH_COUNT),
            Some(c) if *c.get_ref() >= 1 => Some(*c.get_ref() as usize),
            Some(c) => {
                self.error(
                    Some(c.span()),
                    format!("batch_count {} is not a count of at least 1", c.get_ref()),
                );
                None
            }
        };
        let within = match &raw.batch_time {
            None => Some(BATCH_WITHIN),
            Some(s) => self.expand("batch_time", s, false).and_then(|t| {
                match humantime::parse_duration(t.trim()) {
                    Ok(d) if !d.is_zero() && d <= Duration::from_secs(60) => Some(d),
                    _ => {
                        self.error(
                            Some(s.span()),
                            format!(
                                "batch_time: {t:?} is not a duration from 1ms to 60s, such \
                                 as \"50ms\""
                            ),
                        );
                        None
                    }
                }
            }),
        };
        Some(Strategy::Batched {
            count: count?,
            within: within?,
        })
    }
}
