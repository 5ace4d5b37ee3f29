//! What this deployment watches: the entities of the `ENTITIES` file, each checked against
//! the live table at start-up, with the statements to read its rows.
//!
//! Also the one place that turns what was read for a key (its rows, its cached value) into
//! the evidence the state machine records, whatever the representation.

use std::collections::HashMap;

use serde_json::Value;

use crate::cache::{Cached, Shape};
use crate::compare::{self, CachePolicy, EntityOptions, Kind, TypedRow, Verdict};
use crate::db::incidents::Evidence;
use crate::db::{DbError, PgPool};
use crate::entity::{self, Entity, Model, ModelError, Representation, Table};
use crate::rows::{self, Found, Row, Rows};

/// Cap, in bytes, of a verdict's diff.
const MAX_DIFF_LEN: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("{}", join(.0))]
    Model(Vec<ModelError>),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

fn join(errors: &[ModelError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// The watched entities, ready to be read.
#[derive(Debug, Clone)]
pub struct Watched {
    model: Model,
    sources: Vec<Rows>,
    options: Vec<EntityOptions>,
    /// How the records of each entity with `ingest = true` are written.
    ingest: Vec<crate::ingest::Plan>,
}

impl Watched {
    /// Parses `text`, checks it against the live tables, and builds each entity's
    /// statements. Every mistake is reported, with its line and entity.
    pub async fn load(
        pool: &PgPool,
        text: &str,
        vars: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Watched, WatchError> {
        let model = entity::parse(text, vars).map_err(WatchError::Model)?;
        Self::from_model(pool, model).await
    }

    /// The entities `config` names (`ENTITIES`, or the built-in file).
    pub async fn configured(
        config: &crate::config::Config,
        pool: &PgPool,
    ) -> Result<Watched, WatchError> {
        let text = config.entities_text()?;
        let mut model = entity::parse(&text, &config.entity_vars()).map_err(WatchError::Model)?;
        if config.entities.is_none() {
            // IGNORE_FIELDS (like CACHE_POLICY, through ${CACHE_POLICY}) describes the demo
            // table's cache, so it applies to the built-in entity.
            for e in &mut model.entities {
                e.ignore.extend(config.ignore_fields.iter().cloned());
            }
        }
        Self::from_model(pool, model).await
    }

    /// A readable summary of what is watched, for `stalewatch-worker entities check`.
    pub fn describe(&self) -> String {
        self.model.describe()
    }

    /// The names of the watched entities, in file order.
    pub fn names(&self) -> Vec<&str> {
        self.sources
            .iter()
            .map(|s| s.entity.name.as_str())
            .collect()
    }

    pub async fn from_model(pool: &PgPool, model: Model) -> Result<Watched, WatchError> {
        let mut tables: Vec<Table> = model
            .entities
            .iter()
            .map(|e| e.table.clone())
            .chain(model.rules.iter().map(|r| r.table.clone()))
            .collect();
        tables.sort_by_key(|t| t.to_string());
        tables.dedup();
        let catalog = {
            let mut conn = pool.get().await.map_err(DbError::from)?;
            rows::catalog(&mut conn, &tables).await?
        };
        entity::validate(&model, &catalog).map_err(WatchError::Model)?;
        let ingest = ingest_plans(pool, &model).await?;
        let sources: Vec<Rows> = model
            .entities
            .iter()
            .map(|e| Rows::new(e, &catalog))
            .collect();
        let options = model.entities.iter().map(options).collect();
        Ok(Watched {
            model,
            sources,
            options,
            ingest,
        })
    }

    /// The plans of the entities with `ingest = true`.
    pub fn ingest_plans(&self) -> &[crate::ingest::Plan] {
        &self.ingest
    }

    /// The GRANTs this role lacks to ingest, as mistakes of the file: what stops a worker that
    /// would ingest, and `entities check`.
    pub fn ingest_grants_missing(&self) -> Vec<ModelError> {
        self.ingest
            .iter()
            .filter_map(|p| {
                let reason = p.missing_grant.clone()?;
                let e = self.model.entity(&p.entity)?;
                Some(ModelError {
                    line: Some(e.line),
                    entity: Some(e.name.clone()),
                    reason,
                })
            })
            .collect()
    }

    /// The `[[invalidate]]` rules (checked against their tables like the entities).
    pub fn rules(&self) -> &[entity::Rule] {
        &self.model.rules
    }

    pub fn sources(&self) -> &[Rows] {
        &self.sources
    }

    pub fn source(&self, entity: &str) -> Option<&Rows> {
        self.sources.iter().find(|s| s.entity.name == entity)
    }

    /// The entity a cache key belongs to, and its template values. When the patterns of
    /// several entities match (`user:{id}` also matches `user:email:x` if ids are text), the
    /// template with the most literal text, the most specific, wins.
    pub fn owner(&self, key: &str) -> Option<(&Rows, Vec<String>)> {
        self.sources
            .iter()
            .filter_map(|s| s.key_values(key).map(|v| (s, v)))
            .max_by_key(|(s, _)| literal_len(&s.entity))
    }

    /// The template values of `key` when it is a key of `source`'s entity and no other entity
    /// owns it: the same answer as [`Watched::owner`] naming `source`, but only the entities
    /// that would win against it parse the key. The key-side sweep asks this of every key it
    /// scans, and with a single entity that is one parse.
    pub fn owned(&self, source: &Rows, key: &str) -> Option<Vec<String>> {
        let values = source.key_values(key)?;
        let index = self.index(source);
        let mine = literal_len(&source.entity);
        // `owner` takes the longest literal text, the last of equals (`max_by_key`).
        let beaten = self.sources.iter().enumerate().any(|(i, s)| {
            i != index && {
                let theirs = literal_len(&s.entity);
                (theirs > mine || (theirs == mine && i > index)) && s.key_values(key).is_some()
            }
        });
        (!beaten).then_some(values)
    }

    fn index(&self, source: &Rows) -> usize {
        self.sources
            .iter()
            .position(|s| s.entity.name == source.entity.name)
            .expect("a source of this model")
    }

    /// Whether a key of `source`'s entity is expected to be absent right after a change: the
    /// entity is invalidated on change (`on_change = "invalidate"`) and cache-aside, where an
    /// absent key agrees with its row whatever the row holds. Checks after a change and SLO
    /// probes then read the cache first and the rows only of keys that are there
    /// ([`Watched::absent`]).
    pub fn invalidated_and_aside(&self, source: &Rows) -> bool {
        source.entity.on_change == entity::OnChange::Invalidate
            && self.options[self.index(source)].policy == CachePolicy::CacheAside
    }

    /// The evidence of `key` found absent from the cache of an entity that
    /// [`Watched::invalidated_and_aside`]: a match whatever its row, which was not read (so
    /// no database version: the match does not depend on it).
    pub fn absent(&self, source: &Rows, key: String) -> Evidence {
        debug_assert!(self.invalidated_and_aside(source));
        Evidence {
            cache_key: key,
            entity: source.entity.name.clone(),
            entity_id: String::new(),
            kind: Kind::Match,
            db_version: None,
            cache_version: None,
            db_value: None,
            cache_value: None,
            diff: String::new(),
        }
    }

    /// Compares what was read for `key` of `source`'s entity.
    pub fn evidence(&self, source: &Rows, key: String, found: Found, cached: Cached) -> Evidence {
        let opts = &self.options[self.index(source)];
        let (verdict, row) = match found {
            Err(reason) => (
                Verdict {
                    kind: Kind::Undecodable,
                    db_version: None,
                    cache_version: None,
                    diff: format!("the database row cannot be decoded: {reason}"),
                },
                None,
            ),
            Ok(row) => (verdict(source, row.as_ref(), &cached, opts), row),
        };
        // Only an incident that opens stores the entity id and the snapshots, and only a
        // mismatch opens one: a match (most keys, in a sweep) neither parses its key again
        // nor prints its row.
        let (db_value, cache_value, entity_id) = if verdict.kind.is_match() {
            (None, None, String::new())
        } else {
            let entity_id = source
                .key_values(&key)
                .map(|v| v.join(":"))
                .unwrap_or_default();
            (
                row.as_ref().map(snapshot),
                cached_snapshot(&cached),
                entity_id,
            )
        };
        Evidence {
            cache_key: key,
            entity: source.entity.name.clone(),
            entity_id,
            kind: verdict.kind,
            db_version: verdict.db_version,
            cache_version: verdict.cache_version,
            db_value,
            cache_value,
            diff: verdict.diff,
        }
    }
}

/// The ingest plan of every entity with `ingest = true`, each table checked for what the
/// upsert needs (rights, a unique index on the primary key): every mistake reported.
async fn ingest_plans(
    pool: &PgPool,
    model: &Model,
) -> Result<Vec<crate::ingest::Plan>, WatchError> {
    let mut plans = Vec::new();
    let mut errors = Vec::new();
    for e in model.entities.iter().filter(|e| e.ingest) {
        let (columns, access) = {
            let mut conn = pool.get().await.map_err(DbError::from)?;
            crate::ingest::inspect(&mut conn, e).await?
        };
        match crate::ingest::check_table(e, &columns, &access) {
            Ok(()) => plans.push(crate::ingest::Plan::with_access(
                e,
                &columns,
                crate::ingest::missing_grant(e, &access),
            )),
            Err(reasons) => errors.extend(reasons.into_iter().map(|reason| ModelError {
                line: Some(e.line),
                entity: Some(e.name.clone()),
                reason,
            })),
        }
    }
    if errors.is_empty() {
        Ok(plans)
    } else {
        Err(WatchError::Model(errors))
    }
}

/// How the keys of `representation` are read.
pub fn shape(representation: &Representation) -> Shape {
    match representation {
        Representation::Json { .. } | Representation::String { .. } => Shape::String,
        Representation::Hash { .. } => Shape::Hash,
        Representation::Set { .. } => Shape::Set,
    }
}

fn options(e: &Entity) -> EntityOptions {
    EntityOptions {
        policy: e.policy,
        version: e.version.clone(),
        ignore: e.ignore.clone(),
        max_diff_len: MAX_DIFF_LEN,
    }
}

fn literal_len(e: &Entity) -> usize {
    let source = e.key.source();
    let placeholders: usize = e.key.columns().iter().map(|c| c.len() + 2).sum();
    source.len().saturating_sub(placeholders)
}

fn verdict(source: &Rows, row: Option<&Row>, cached: &Cached, opts: &EntityOptions) -> Verdict {
    if let Cached::Unreadable(why) = cached {
        return Verdict {
            kind: Kind::Undecodable,
            db_version: None,
            cache_version: None,
            diff: format!("the cached value cannot be read: {why}"),
        };
    }
    let doc = match row {
        Some(Row::Doc(d)) => Some(d),
        _ => None,
    };
    let typed_row = || {
        doc.map(|doc| TypedRow {
            doc,
            types: &source.types,
        })
    };
    match &source.entity.representation {
        Representation::Json { .. } => compare::compare_json(typed_row(), bytes(cached), opts),
        Representation::String { value } => {
            let db = doc.map(|d| (d.get(value).unwrap_or(&Value::Null), source.types[value]));
            compare::compare_string(db, bytes(cached), opts)
        }
        Representation::Hash { .. } => {
            let hash = match cached {
                Cached::Hash(h) => Some(h),
                _ => None,
            };
            compare::compare_hash(typed_row(), hash, opts)
        }
        Representation::Set { .. } => {
            let members = match row {
                Some(Row::Members(m)) => Some(m),
                _ => None,
            };
            let set = match cached {
                Cached::Set(s) => Some(s),
                _ => None,
            };
            compare::compare_set(members, set, opts)
        }
    }
}

fn bytes(cached: &Cached) -> Option<&[u8]> {
    match cached {
        Cached::Bytes(b) => Some(b),
        _ => None,
    }
}

/// A row as stored with an incident: its JSON text.
fn snapshot(row: &Row) -> String {
    match row {
        Row::Doc(d) => serde_json::to_string(d).unwrap_or_default(),
        Row::Members(m) => serde_json::to_string(m).unwrap_or_default(),
    }
}

fn cached_snapshot(cached: &Cached) -> Option<String> {
    match cached {
        Cached::Missing => None,
        Cached::Bytes(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Cached::Hash(h) => {
            let map: HashMap<&str, String> = h
                .iter()
                .map(|(k, v)| (k.as_str(), String::from_utf8_lossy(v).into_owned()))
                .collect();
            serde_json::to_string(&map).ok()
        }
        Cached::Set(s) => {
            let members: Vec<String> = s
                .iter()
                .map(|m| String::from_utf8_lossy(m).into_owned())
                .collect();
            serde_json::to_string(&members).ok()
        }
        Cached::Unreadable(why) => Some(why.clone()),
    }
}
