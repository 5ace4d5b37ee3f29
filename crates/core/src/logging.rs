//! Structured logs through `tracing`, as text for people or JSON for collectors.

use std::{fmt::Write as _, io::IsTerminal};

use tracing::{
    field::{Field, Visit},
    Event, Level, Metadata, Subscriber,
};
use tracing_subscriber::{
    field::MakeExt,
    filter::filter_fn,
    fmt,
    layer::{Context, SubscriberExt},
    util::SubscriberInitExt,
    EnvFilter, Layer,
};

use crate::config::LogFormat;

/// Where actix-http's HTTP/1 connection handling logs.
const ACTIX_DISPATCHER: &str = "actix_http::h1::dispatcher";

/// What actix-http logs at ERROR for every connection that ends in an error: a malformed
/// request, a URI too long, a head that came too slowly, a client gone mid-request.
const CONNECTION_ERROR: &str = "stream error: ";

/// Installs the global subscriber. `RUST_LOG` overrides the default level (info).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let output = match format {
        // Colour codes only for a terminal: in a file or a collector they are noise.
        LogFormat::Text => text(std::io::stdout, std::io::stdout().is_terminal()),
        LogFormat::Json => fmt::layer()
            .with_target(false)
            .json()
            .flatten_event(true)
            .boxed(),
    };
    // try_init: a second call (tests) keeps the first subscriber instead of panicking.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(output.with_filter(filter_fn(|m| !from_dispatcher(m))))
        .with(ClientFaults)
        .try_init();
}

/// The text format, every field value and message escaped ([`escape`]).
fn text<S, W>(writer: W, ansi: bool) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'w> fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let fields = fmt::format::debug_fn(|w, field, value| {
        let text = format!("{value:?}");
        match field.name() {
            "message" => write!(w, "{}", escape(&text)),
            name => write!(w, "{name}={}", escape(&text)),
        }
    })
    .delimited(" ");
    fmt::layer()
        .with_target(false)
        .with_ansi(ansi)
        .fmt_fields(fields)
        .with_writer(writer)
        .boxed()
}

/// `s` with control characters and invisible format characters (bidirectional overrides,
/// zero-width spaces, line separators) escaped as Rust does (`\n`, `\u{1b}`).
///
/// Logged values carry text clients chose (cache keys built from row ids, keys seen in
/// Redis, request paths): a newline in one must not start a forged log line, nor an escape
/// byte reach the terminal. `key` fields logged with `?` or as `&str` are quoted and escaped
/// by `Debug` already; this covers `%` (Display) fields and messages too. The JSON format
/// escapes by itself.
fn escape(s: &str) -> std::borrow::Cow<'_, str> {
    fn needs(c: char) -> bool {
        c.is_control()
            || matches!(c, '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2060}'..='\u{206f}' | '\u{feff}' | '\u{fff9}'..='\u{fffb}')
    }
    if !s.chars().any(needs) {
        return s.into();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            c if c.is_control() => out.extend(c.escape_debug()),
            c if needs(c) => out.extend(c.escape_unicode()),
            c => out.push(c),
        }
    }
    out.into()
}

/// An ERROR of actix-http's connection handling: [`ClientFaults`] logs it again.
fn from_dispatcher(m: &Metadata<'_>) -> bool {
    m.target() == ACTIX_DISPATCHER && *m.level() == Level::ERROR
}

/// Logs actix-http's connection errors at the level they deserve.
///
/// actix-http logs each connection that ends in an error at ERROR, yet all of those are the
/// client's doing or the network's (the response already went out: an empty 400, 431 or
/// 408), and any client can cause one at will: an ERROR line would page someone for it. They
/// are logged again here at WARN, with the error as a field; an I/O error (a client that went
/// away) at DEBUG. actix's other ERROR lines there (its own internal errors) stay at ERROR.
struct ClientFaults;

impl<S: Subscriber> Layer<S> for ClientFaults {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        if !from_dispatcher(event.metadata()) {
            return;
        }
        let mut message = Message(String::new());
        event.record(&mut message);
        match message.0.strip_prefix(CONNECTION_ERROR) {
            Some(error) if error.starts_with("I/O error") => {
                tracing::debug!(error, "HTTP connection closed by an I/O error")
            }
            Some(error) => tracing::warn!(error, "HTTP connection closed on a client error"),
            None => tracing::error!(error = message.0, "HTTP server error"),
        }
    }
}

/// The `message` of an event, whatever else it carries.
struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// What a text subscriber wrote.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn client_chosen_text_cannot_forge_a_text_log_line() {
        let buffer = Buffer::default();
        let out = buffer.clone();
        let subscriber = tracing_subscriber::registry().with(text(move || out.clone(), false));
        let key =
            "app:user:1\n2026-11-24T00:00:00Z ERROR FORGED log line admin=true\u{1b}[31m\u{202e}";
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(key = %key, path = key, "incident transition {key}");
        });
        let written = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        assert_eq!(written.lines().count(), 1, "{written}");
        assert!(
            !written.contains('\u{1b}') && !written.contains('\u{202e}'),
            "{written:?}"
        );
        assert!(written.contains(r"app:user:1\n2026"), "{written}");
        assert!(written.contains(r"\u{1b}[31m"), "{written}");
        assert!(written.contains("INFO"), "{written}");
    }
}
