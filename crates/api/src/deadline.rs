//! How long a client may take to send its request (`HTTP_CLIENT_TIMEOUT_MS`).
//!
//! actix-web bounds the time to the end of a request's head and an idle kept-alive
//! connection (set in `main`) but not the body: a client that declares 100 bytes and
//! sends 11 would hold its connection, and the handler waiting on it, for as long as it
//! likes. [`BodyDeadline`] gives the whole body the same time from the moment the head
//! arrived; past it the body reads as a timed-out I/O error, which the JSON extractor turns
//! into a 408 ([`crate::error::json_error`]). A handler that reads no body answers at once,
//! and actix closes a connection whose body was left unread.

use std::{
    future::Future,
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use actix_web::{
    body::MessageBody,
    dev::{Payload, ServiceRequest, ServiceResponse},
    error::PayloadError,
    http::header,
    middleware::Next,
    web::Bytes,
    HttpMessage,
};
use futures::Stream;
use tokio::time::{sleep, Sleep};

/// Once the server has decided to close a connection, how long it waits for the client to
/// read the last response.
pub const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The error a body that did not arrive in time reads as: [`is_timeout`] knows it.
fn timed_out(limit: Duration) -> PayloadError {
    PayloadError::Io(io::Error::new(
        io::ErrorKind::TimedOut,
        format!(
            "the request body did not arrive within {} ms",
            limit.as_millis()
        ),
    ))
}

/// Whether a body read failed because the client took too long.
pub fn is_timeout(e: &PayloadError) -> bool {
    matches!(e, PayloadError::Io(e) if e.kind() == io::ErrorKind::TimedOut)
}

/// Middleware (`actix_web::middleware::from_fn`) that gives every request body `limit`.
#[derive(Debug, Clone, Copy)]
pub struct BodyDeadline(pub Duration);

impl BodyDeadline {
    pub async fn apply(
        self,
        mut req: ServiceRequest,
        next: Next<impl MessageBody>,
    ) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
        let has_body = req.headers().contains_key(header::TRANSFER_ENCODING)
            || req
                .headers()
                .get(header::CONTENT_LENGTH)
                .is_some_and(|v| v.as_bytes() != b"0");
        if has_body {
            let inner = req.take_payload();
            let stream = Deadlined {
                inner,
                timer: Box::pin(sleep(self.0)),
                limit: self.0,
                expired: false,
            };
            req.set_payload(Payload::Stream {
                payload: Box::pin(stream),
            });
        }
        next.call(req).await
    }
}

/// A body stream that ends with [`timed_out`] once its deadline passes.
struct Deadlined {
    inner: Payload,
    timer: Pin<Box<Sleep>>,
    limit: Duration,
    expired: bool,
}

impl Stream for Deadlined {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.expired {
            return Poll::Ready(None);
        }
        // What has arrived is delivered even at the deadline: only waiting is cut short.
        if let Poll::Ready(item) = Pin::new(&mut self.inner).poll_next(cx) {
            return Poll::Ready(item);
        }
        if self.timer.as_mut().poll(cx).is_ready() {
            self.expired = true;
            return Poll::Ready(Some(Err(timed_out(self.limit))));
        }
        Poll::Pending
    }
}
