//! What both binaries' command lines share: one-line errors and the exit codes.
//!
//! `--help` and `--version` print and exit 0 before anything connects; a usage error (an
//! unknown flag or command, a value that does not parse) is one line on stderr and exit code
//! 2; a runtime error (a service unreachable, a bind refused) is one line and exit code 1.
//! Never a backtrace, whatever RUST_BACKTRACE says, and never a password: the message is
//! passed through [`redact::url`] and scrubbed of the configured secrets.

use std::process::ExitCode;

use clap::error::ErrorKind;

use crate::redact;

/// Exit code of a usage error (as clap's own).
pub const USAGE: u8 = 2;
/// Exit code of a runtime error.
pub const RUNTIME: u8 = 1;

/// Parses the command line; on `--help`/`--version` prints and exits 0, on a usage error
/// prints one line and exits 2.
pub fn parse<C: clap::Parser>() -> C {
    match C::try_parse() {
        Ok(cli) => cli,
        Err(e) => match e.kind() {
            ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => e.exit(),
            _ => {
                let bin = C::command().get_name().to_string();
                eprintln!("{bin}: {}", usage_line(&e.render().to_string()));
                std::process::exit(USAGE.into())
            }
        },
    }
}

/// clap's several-line error as one line: `error: ...; usage: ...`.
fn usage_line(rendered: &str) -> String {
    // The first paragraph is the error (a list of missing arguments runs over lines).
    let error = rendered
        .trim_start()
        .split("\n\n")
        .next()
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ");
    let error = if error.is_empty() {
        "error: bad command line".to_string()
    } else {
        error
    };
    match rendered
        .lines()
        .find_map(|l| l.trim().strip_prefix("Usage: "))
    {
        Some(usage) => format!("{error}; usage: {usage} (see --help)"),
        None => format!("{error} (see --help)"),
    }
}

/// Prints `error` as one line, credentials masked, and returns the exit code to end with.
/// `error` is typically `format!("{e:#}")` of an `anyhow::Error`: its whole chain.
pub fn fail(bin: &str, code: u8, error: &str, secrets: &[String]) -> ExitCode {
    eprintln!("{bin}: error: {}", one_line(error, secrets));
    ExitCode::from(code)
}

/// `text` on one line, URLs' passwords and the given secrets masked.
pub fn one_line(text: &str, secrets: &[String]) -> String {
    let text = redact::scrub(&redact::url(text), secrets);
    text.split(['\n', '\r'])
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clap_errors_become_one_line_with_the_usage() {
        let rendered = "error: unrecognized subcommand 'frobnicate'\n\n  tip: a similar subcommand exists: 'migrate'\n\nUsage: stalewatch-worker [OPTIONS] [COMMAND]\n\nFor more information, try '--help'.\n";
        assert_eq!(
            usage_line(rendered),
            "error: unrecognized subcommand 'frobnicate'; usage: stalewatch-worker [OPTIONS] [COMMAND] (see --help)"
        );
    }

    #[test]
    fn a_list_of_missing_arguments_stays_on_the_line() {
        let rendered = "error: the following required arguments were not provided:\n  --once\n\nUsage: stalewatch-worker sweep --once\n";
        assert_eq!(
            usage_line(rendered),
            "error: the following required arguments were not provided: --once; usage: stalewatch-worker sweep --once (see --help)"
        );
    }

    #[test]
    fn errors_are_one_line_without_secrets() {
        let text = "connecting to Redis at redis://:hunter22@10.0.0.1:6379\nCaused by:\n  token abcdefabcdefabcdef refused";
        assert_eq!(
            one_line(text, &["abcdefabcdefabcdef".into()]),
            "connecting to Redis at redis://:***@10.0.0.1:6379; Caused by:; token *** refused"
        );
    }
}
