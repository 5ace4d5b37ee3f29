//! Key and member templates: `app:user:{id}`, literal text and `{column}` placeholders.
//!
//! A template is rendered from a row (`render`) and read back from a key found in Redis
//! (`parse_key`), which is how the key-side pass tells which row a cached key belongs to.
//!
//! Syntax: `{column}` is a placeholder; `{{` and `}}` are a literal `{` and `}`. Two
//! placeholders always have literal text between them, and a template has at least one
//! placeholder: otherwise a key could not be read back into its columns.
//!
//! Reading a key back: **a placeholder's value never contains the characters next to it in
//! the template**, the last character of the literal before it and the first character of
//! the literal after it (for `app:user:{id}` that is `:`). So a value ends at the first
//! occurrence of the following separator, and a key with extra segments does not parse:
//! `app:user:{id}` does not claim `app:user:email:ann@example.com`, which belongs to
//! `app:user:email:{email}`, nor `app:user:7:profile`. The price: a key rendered from a value
//! that contains its separator (an id `a:b` in `app:user:{id}`, a UUID in `user-{id}`) or is
//! empty does not parse back, so the key-side pass skips such keys instead of guessing.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Part {
    Literal(String),
    Column(String),
}

/// A parsed template such as `app:user:{id}` or `{user_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

impl Template {
    /// Parses a template. Errors: an unclosed `{`, a `}` that closes nothing (write `}}`), an
    /// empty `{}`, a placeholder name with surrounding spaces, two placeholders with no text
    /// between them, no placeholder at all.
    pub fn parse(s: &str) -> Result<Template, String> {
        let t = Template::parse_text(s)?;
        if t.columns().is_empty() {
            return Err(
                "no {column} placeholder: every row would get the same key, so a key could \
                 not tell its row"
                    .into(),
            );
        }
        Ok(t)
    }

    /// As [`Template::parse`], but a template without placeholders (one fixed key) is
    /// allowed: an invalidation rule may drop the same key on every change of its table,
    /// and never reads a key back.
    pub fn parse_text(s: &str) -> Result<Template, String> {
        let mut parts: Vec<Part> = Vec::new();
        let mut literal = String::new();
        let mut chars = s.char_indices().peekable();
        while let Some((at, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|&(_, c)| c) == Some('{') => {
                    chars.next();
                    literal.push('{');
                }
                '{' => {
                    let mut name = String::new();
                    let mut closed = false;
                    for (_, c) in chars.by_ref() {
                        match c {
                            '}' => {
                                closed = true;
                                break;
                            }
                            '{' => {
                                return Err(format!(
                                    "\"{{\" inside the placeholder \"{{{name}{{\" (write \
                                     \"{{{{\" for a literal brace)"
                                ))
                            }
                            c => name.push(c),
                        }
                    }
                    if !closed {
                        return Err(format!(
                            "\"{}\" is never closed (write \"{{{{\" for a literal brace)",
                            &s[at..]
                        ));
                    }
                    if name.is_empty() {
                        return Err("empty placeholder \"{}\": name a column".into());
                    }
                    if name.trim() != name {
                        return Err(format!(
                            "placeholder \"{{{name}}}\" has spaces around its column name"
                        ));
                    }
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    } else if let Some(Part::Column(previous)) = parts.last() {
                        return Err(format!(
                            "placeholders {{{previous}}} and {{{name}}} have no text between \
                             them, so a key could not be parsed back into its columns"
                        ));
                    }
                    parts.push(Part::Column(name));
                }
                '}' if chars.peek().map(|&(_, c)| c) == Some('}') => {
                    chars.next();
                    literal.push('}');
                }
                '}' => {
                    return Err(format!(
                        "\"}}\" at byte {at} closes nothing (write \"}}}}\" for a literal brace)"
                    ))
                }
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(Template {
            source: s.to_string(),
            parts,
        })
    }

    /// The template text, as parsed (`Template::parse(t.source()) == Ok(t)`).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The columns named by placeholders, in order of first appearance, without repeats.
    pub fn columns(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for part in &self.parts {
            if let Part::Column(c) = part {
                if !out.contains(&c.as_str()) {
                    out.push(c);
                }
            }
        }
        out
    }

    /// The key (or member) of a row; `value` gives a column's text, None when it is NULL,
    /// which makes the whole result None.
    pub fn render(&self, mut value: impl FnMut(&str) -> Option<String>) -> Option<String> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(l) => out.push_str(l),
                Part::Column(c) => out.push_str(&value(c)?),
            }
        }
        Some(out)
    }

    /// The column values `key` was rendered from, one pair per column in [`Template::columns`]
    /// order; None when `key` does not have this template's shape. See the module
    /// documentation for how values are delimited: each is non-empty and contains neither
    /// character next to its placeholder. A column named twice must have the same value at
    /// both places.
    pub fn parse_key(&self, key: &str) -> Option<Vec<(String, String)>> {
        let mut rest = key;
        let mut out: Vec<(String, String)> = Vec::new();
        for (i, part) in self.parts.iter().enumerate() {
            match part {
                Part::Literal(l) => rest = rest.strip_prefix(l.as_str())?,
                Part::Column(c) => {
                    let before = match i.checked_sub(1).map(|j| &self.parts[j]) {
                        Some(Part::Literal(l)) => l.chars().next_back(),
                        _ => None,
                    };
                    let after = match self.parts.get(i + 1) {
                        Some(Part::Literal(l)) => l.chars().next(),
                        _ => None,
                    };
                    let end = match after {
                        Some(sep) => rest.find(sep)?,
                        None => rest.len(),
                    };
                    let value = &rest[..end];
                    if value.is_empty() || before.is_some_and(|sep| value.contains(sep)) {
                        return None;
                    }
                    match out.iter().find(|(name, _)| name == c) {
                        Some((_, seen)) if seen != value => return None,
                        Some(_) => {}
                        None => out.push((c.clone(), value.to_string())),
                    }
                    rest = &rest[end..];
                }
            }
        }
        rest.is_empty().then_some(out)
    }

    /// A Redis `SCAN ... MATCH` glob for every key of this template: each placeholder becomes
    /// `*`, and the glob characters `* ? [ ] \` of the literal text are escaped with `\`.
    /// The glob is wider than the template (`*` matches separators too): filter what SCAN
    /// returns with [`Template::parse_key`].
    pub fn pattern(&self) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(l) => {
                    for c in l.chars() {
                        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                            out.push('\\');
                        }
                        out.push(c);
                    }
                }
                Part::Column(_) => out.push('*'),
            }
        }
        out
    }

    /// A Redis glob matching exactly the key `render` makes, with every glob character of the
    /// literal text and of the values escaped: a value `1*` must not widen a pattern delete
    /// to other rows' keys. None when a value is NULL.
    pub fn render_glob(&self, mut value: impl FnMut(&str) -> Option<String>) -> Option<String> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(l) => glob_escape_into(&mut out, l),
                Part::Column(c) => glob_escape_into(&mut out, &value(c)?),
            }
        }
        Some(out)
    }

    /// Whether the template ends with a placeholder (no literal text after it).
    pub fn ends_with_placeholder(&self) -> bool {
        matches!(self.parts.last(), Some(Part::Column(_)))
    }

    /// The literal text and placeholders with their names erased: two templates with the
    /// same shape make the same keys.
    pub(crate) fn shape(&self) -> Vec<Option<&str>> {
        self.parts
            .iter()
            .map(|p| match p {
                Part::Literal(l) => Some(l.as_str()),
                Part::Column(_) => None,
            })
            .collect()
    }
}

fn glob_escape_into(out: &mut String, text: &str) {
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Template {
        Template::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn row<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |c| {
            pairs
                .iter()
                .find(|(k, _)| *k == c)
                .map(|(_, v)| v.to_string())
        }
    }

    fn pairs(p: &[(&str, &str)]) -> Option<Vec<(String, String)>> {
        Some(
            p.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn a_glob_escapes_literal_text_and_values_and_a_fixed_key_parses_as_text() {
        let t = t("shop[1]:cat:{id}:");
        assert_eq!(
            t.render_glob(row(&[("id", "1*?")])).as_deref(),
            Some("shop\\[1\\]:cat:1\\*\\?:")
        );
        assert_eq!(t.render_glob(|_| None), None);
        assert!(!t.ends_with_placeholder());
        assert!(Template::parse("products:all").is_err());
        let fixed = Template::parse_text("products:all").unwrap();
        assert!(fixed.columns().is_empty());
        assert_eq!(fixed.render(|_| None).as_deref(), Some("products:all"));
        assert!(Template::parse_text("a:{id}")
            .unwrap()
            .ends_with_placeholder());
        assert!(Template::parse_text("a:{").is_err());
    }

    #[test]
    fn renders_and_parses_back() {
        let user = t("app:user:{id}");
        assert_eq!(user.columns(), vec!["id"]);
        assert_eq!(user.source(), "app:user:{id}");
        assert_eq!(user.to_string(), "app:user:{id}");
        let key = user.render(row(&[("id", "42")])).unwrap();
        assert_eq!(key, "app:user:42");
        assert_eq!(user.parse_key(&key), pairs(&[("id", "42")]));
        assert_eq!(user.pattern(), "app:user:*");
    }

    #[test]
    fn composite_keys_round_trip() {
        let members = t("app:campaign:{campaign_id}:members");
        assert_eq!(members.columns(), vec!["campaign_id"]);
        let key = members.render(row(&[("campaign_id", "9")])).unwrap();
        assert_eq!(key, "app:campaign:9:members");
        assert_eq!(members.parse_key(&key), pairs(&[("campaign_id", "9")]));
        assert_eq!(members.pattern(), "app:campaign:*:members");

        let tenant = t("{tenant_id}/user:{id}.json");
        assert_eq!(tenant.columns(), vec!["tenant_id", "id"]);
        let r = row(&[("tenant_id", "acme"), ("id", "7")]);
        let key = tenant.render(r).unwrap();
        assert_eq!(key, "acme/user:7.json");
        assert_eq!(
            tenant.parse_key(&key),
            pairs(&[("tenant_id", "acme"), ("id", "7")])
        );
        assert_eq!(tenant.pattern(), "*/user:*.json");
        // UUIDs and emails round-trip with a ':' separator.
        let id = "0191c4a2-7b3e-7c1d-9a55-3f2e1d0c9b8a";
        let k = format!("app:user:{id}");
        assert_eq!(t("app:user:{id}").parse_key(&k), pairs(&[("id", id)]));
        let by_email = t("app:user:email:{email}");
        assert_eq!(
            by_email.parse_key("app:user:email:ann.lee+x@example.com"),
            pairs(&[("email", "ann.lee+x@example.com")])
        );
    }

    #[test]
    fn a_member_template_is_the_whole_text() {
        let member = t("{user_id}");
        assert_eq!(
            member.render(row(&[("user_id", "a:b c")])).unwrap(),
            "a:b c"
        );
        assert_eq!(member.parse_key("a:b c"), pairs(&[("user_id", "a:b c")]));
        assert_eq!(member.parse_key(""), None);
        assert_eq!(member.pattern(), "*");
    }

    #[test]
    fn keys_of_another_shape_do_not_parse() {
        let user = t("app:user:{id}");
        for key in [
            "app:user:",                      // empty value
            "app:user:7:profile",             // an extra segment
            "app:user:email:ann@example.com", // another template's key
            "app:users:7",                    // another literal
            "other:app:user:7",               // another prefix
            "app:user",                       // too short
        ] {
            assert_eq!(user.parse_key(key), None, "{key}");
        }
        let members = t("app:campaign:{campaign_id}:members");
        for key in [
            "app:campaign:9:members:extra",
            "app:campaign:9:extra:members",
            "app:campaign:9:member",
            "app:campaign::members",
            "app:campaign:9",
        ] {
            assert_eq!(members.parse_key(key), None, "{key}");
        }
        let two = t("t:{a}:{b}");
        assert_eq!(two.parse_key("t:1:2"), pairs(&[("a", "1"), ("b", "2")]));
        assert_eq!(two.parse_key("t:1:2:3"), None);
        assert_eq!(two.parse_key("t:1:"), None);
    }

    #[test]
    fn values_containing_their_separator_render_but_do_not_parse() {
        let user = t("app:user:{id}");
        let key = user.render(row(&[("id", "a:b")])).unwrap();
        assert_eq!(key, "app:user:a:b");
        assert_eq!(user.parse_key(&key), None);
        let dash = t("user-{id}");
        assert_eq!(dash.parse_key("user-12"), pairs(&[("id", "12")]));
        assert_eq!(dash.parse_key("user-1-2"), None);
        // Characters that are not next to the placeholder are fine.
        assert_eq!(user.parse_key("app:user:a-b.c"), pairs(&[("id", "a-b.c")]));
    }

    #[test]
    fn a_null_column_renders_nothing() {
        let tenant = t("{tenant_id}:{id}");
        assert_eq!(tenant.render(row(&[("id", "7")])), None);
        assert_eq!(
            tenant
                .render(row(&[("tenant_id", "a"), ("id", "")]))
                .unwrap(),
            "a:"
        );
    }

    #[test]
    fn a_column_named_twice_must_agree() {
        let twice = t("{id}:copy:{id}");
        assert_eq!(twice.columns(), vec!["id"]);
        assert_eq!(twice.render(row(&[("id", "5")])).unwrap(), "5:copy:5");
        assert_eq!(twice.parse_key("5:copy:5"), pairs(&[("id", "5")]));
        assert_eq!(twice.parse_key("5:copy:6"), None);
    }

    #[test]
    fn literal_braces_and_glob_characters() {
        let odd = t("x{{y}}*?[a]\\:{id}");
        let key = odd.render(row(&[("id", "1")])).unwrap();
        assert_eq!(key, "x{y}*?[a]\\:1");
        assert_eq!(odd.parse_key(&key), pairs(&[("id", "1")]));
        assert_eq!(odd.pattern(), "x{y}\\*\\?\\[a\\]\\\\:*");
        assert_eq!(Template::parse(odd.source()), Ok(odd.clone()));
        // A test prefix needs no escaping.
        assert_eq!(t("sw_test:ab12:item:{id}").pattern(), "sw_test:ab12:item:*");
    }

    #[test]
    fn a_redis_cluster_hash_tag_is_written_with_literal_braces() {
        // `{{` and `}}` are the braces of the key; `{id}` the placeholder inside them.
        let tagged = t("app:{{user:{id}}}:profile");
        assert_eq!(tagged.columns(), vec!["id"]);
        let key = tagged.render(row(&[("id", "42")])).unwrap();
        assert_eq!(key, "app:{user:42}:profile");
        assert_eq!(tagged.parse_key(&key), pairs(&[("id", "42")]));
        assert_eq!(tagged.parse_key("app:{user:42}:other"), None);
        assert_eq!(tagged.parse_key("app:{user:4}2}:profile"), None);
        // Redis's glob takes braces literally: the pattern keeps them.
        assert_eq!(tagged.pattern(), "app:{user:*}:profile");
        // Every key of one user shares the tag, so the slot (crate::slots).
        assert_eq!(
            crate::slots::slot(key.as_bytes()),
            crate::slots::slot(b"app:{user:42}:settings")
        );
        // A tag of the whole key, the placeholder at its end.
        let whole = t("{{app:user:{id}}}");
        assert_eq!(
            whole.render(row(&[("id", "7")])).as_deref(),
            Some("{app:user:7}")
        );
        assert_eq!(whole.parse_key("{app:user:7}"), pairs(&[("id", "7")]));
        // A single brace is a placeholder's, and says how to write a literal one.
        let err = Template::parse("app:{user:{id}}").unwrap_err();
        assert!(err.contains("{{"), "{err}");
    }

    #[test]
    fn errors() {
        for (s, fragment) in [
            ("app:{id", "never closed"),
            ("app:{", "never closed"),
            ("app:}{id}", "closes nothing"),
            ("app:{id}}", "closes nothing"),
            ("app:{}", "empty placeholder"),
            ("app:{a{b}}", "inside the placeholder"),
            ("app:{ id }", "spaces"),
            ("app:{a}{b}", "no text between"),
            ("{a}{b}:x", "no text between"),
            ("app:user", "no {column} placeholder"),
            ("", "no {column} placeholder"),
            ("app:{{id}}", "no {column} placeholder"),
        ] {
            let err = Template::parse(s).unwrap_err();
            assert!(err.contains(fragment), "{s:?}: {err}");
        }
    }

    #[test]
    fn shapes_ignore_column_names() {
        assert_eq!(t("a:{x}:b").shape(), t("a:{y}:b").shape());
        assert_ne!(t("a:{x}").shape(), t("a:{x}:b").shape());
    }
}
