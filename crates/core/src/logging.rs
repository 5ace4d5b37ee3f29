//! Structured logs through `tracing`, as text for people or JSON for collectors.

use std::fmt::Write as _;

use tracing::{
    field::{Field, Visit},
    Event, Level, Metadata, Subscriber,
};
use tracing_subscriber::{
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
        LogFormat::Text => fmt::layer().with_target(false).boxed(),
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
