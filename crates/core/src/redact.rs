//! Masks credentials in text that reaches a log line or an error message.
//!
//! Every message that carries a PostgreSQL or Redis URL goes through [`url`]; the binaries
//! also pass their final error through [`scrub`] with the configured secrets, in case a
//! library quoted one some other way.

/// What a password is replaced with.
pub const MASK: &str = "***";

/// `text` with the password of every URL in it (`scheme://user:password@host`) and every
/// `password=...` parameter (a URL's query, libpq's `key=value` form) replaced by `***`.
/// The user name, host, port and database stay: they are what an operator needs to see.
pub fn url(text: &str) -> String {
    mask_parameters(&mask_userinfo(text))
}

/// `text` with every occurrence of each secret (as given, and percent-decoded) masked.
/// Secrets shorter than 3 characters are left alone: masking them would garble the text
/// more than it protects.
pub fn scrub(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_string();
    for secret in secrets {
        for form in [secret.clone(), percent_decode(secret)] {
            if form.len() >= 3 {
                out = out.replace(&form, MASK);
            }
        }
    }
    out
}

/// The password of a URL's userinfo, percent-decoded, if it has one.
pub fn password_of(url: &str) -> Option<String> {
    let start = url.find("://")? + 3;
    let authority = &url[start..start + authority_len(&url[start..])];
    let userinfo = &authority[..authority.rfind('@')?];
    let (_, password) = userinfo.split_once(':')?;
    (!password.is_empty()).then(|| percent_decode(password))
}

/// The length of the authority that starts `rest` (what follows `://`).
fn authority_len(rest: &str) -> usize {
    rest.find(|c: char| matches!(c, '/' | '?' | '#' | '"' | '\'' | '<' | '>') || c.is_whitespace())
        .unwrap_or(rest.len())
}

fn mask_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let start = i + 3;
        out.push_str(&rest[..start]);
        rest = &rest[start..];
        let authority = &rest[..authority_len(rest)];
        if let Some(at) = authority.rfind('@') {
            let userinfo = &authority[..at];
            if let Some((user, password)) = userinfo.split_once(':') {
                if !password.is_empty() {
                    out.push_str(user);
                    out.push(':');
                    out.push_str(MASK);
                    rest = &rest[at..];
                }
            }
        }
    }
    out.push_str(rest);
    out
}

fn mask_parameters(text: &str) -> String {
    const KEY: &str = "password=";
    let lower = text.to_ascii_lowercase();
    let mut out = String::with_capacity(text.len());
    let mut pos = 0;
    while let Some(i) = lower[pos..].find(KEY) {
        let value_start = pos + i + KEY.len();
        out.push_str(&text[pos..value_start]);
        let value = &text[value_start..];
        let len = if let Some(quoted) = value.strip_prefix('\'') {
            // libpq: 'a value with spaces', with \' inside.
            let mut escaped = false;
            quoted
                .char_indices()
                .find(|&(_, c)| {
                    let end = c == '\'' && !escaped;
                    escaped = c == '\\' && !escaped;
                    end
                })
                .map_or(value.len(), |(j, _)| j + 2)
        } else {
            value
                .find(|c: char| matches!(c, '&' | '#' | '"') || c.is_whitespace())
                .unwrap_or(value.len())
        };
        if len > 0 {
            out.push_str(MASK);
        }
        pos = value_start + len;
    }
    out.push_str(&text[pos..]);
    out
}

/// `s` with its `%XX` escapes decoded (invalid UTF-8 replaced).
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap() * 16 + hex(l).unwrap()) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_seed_node_of_a_cluster_list_is_masked() {
        let seeds = "redis://app:s3cret@10.0.0.1:7000,rediss://app:s3cret@10.0.0.2:7001/0";
        let shown = url(seeds);
        assert!(!shown.contains("s3cret"), "{shown}");
        assert_eq!(shown.matches(MASK).count(), 2, "{shown}");
        assert!(shown.contains("10.0.0.2:7001"), "{shown}");
        assert_eq!(password_of(seeds).as_deref(), Some("s3cret"));
    }

    #[test]
    fn passwords_in_urls_are_masked() {
        for (given, masked) in [
            (
                "postgres://app:s3cret@db.internal:5432/stalewatch",
                "postgres://app:***@db.internal:5432/stalewatch",
            ),
            (
                "connecting to Redis at redis://:hunter2@127.0.0.1:6379/0: refused",
                "connecting to Redis at redis://:***@127.0.0.1:6379/0: refused",
            ),
            (
                "rediss://default:p%40ss@cache:6380",
                "rediss://default:***@cache:6380",
            ),
            // An @ inside the password: the last @ of the authority ends the userinfo.
            ("redis://u:a@b@host", "redis://u:***@host"),
            (
                "postgres://db/x?user=app&password=s3cret&sslmode=require",
                "postgres://db/x?user=app&password=***&sslmode=require",
            ),
            (
                "host=db user=app password='a b\\' c' dbname=x",
                "host=db user=app password=*** dbname=x",
            ),
            (
                "host=db PASSWORD=x1 dbname=x",
                "host=db PASSWORD=*** dbname=x",
            ),
            (
                "a redis://:one@h and postgres://u:two@h/d",
                "a redis://:***@h and postgres://u:***@h/d",
            ),
        ] {
            let got = url(given);
            assert_eq!(got, masked, "{given}");
        }
    }

    #[test]
    fn urls_without_passwords_are_unchanged() {
        for text in [
            "postgres://postgres@127.0.0.1:5432/stalewatch",
            "redis://127.0.0.1:6379",
            "redis://user@host:1/2",
            "no url here: a:b@c",
            "",
            "password=",
        ] {
            assert_eq!(url(text), text);
        }
    }

    #[test]
    fn the_password_of_a_url() {
        assert_eq!(password_of("redis://:p%40ss@h").as_deref(), Some("p@ss"));
        assert_eq!(password_of("postgres://u:x@h/d").as_deref(), Some("x"));
        assert_eq!(password_of("postgres://u@h/d"), None);
        assert_eq!(password_of("postgres://h/d?x=a:b@c"), None);
    }

    #[test]
    fn secrets_are_scrubbed_as_given_and_decoded() {
        let secrets = vec!["p%40ssword".to_string(), "ab".to_string()];
        assert_eq!(
            scrub("auth failed for p@ssword (p%40ssword) ab", &secrets),
            "auth failed for *** (***) ab"
        );
    }
}
