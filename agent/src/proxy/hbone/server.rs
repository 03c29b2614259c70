//! Serving HBONE: accept CONNECT streams on an mTLS connection and hand each — with its destination, the
//! peer's verified identity and what the client's proxy says of it — to a handler that opens the upstream
//! and then accepts or refuses it.
use std::{future::Future, sync::Arc};

use anyhow::{Context, Result};
use bytes::Bytes;
use h2::{RecvStream, server::SendResponse};
use http::{Method, Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, warn};
use warren_identity::Identity;

use super::{
    CONNECTION_WINDOW, H2Stream, MAX_FRAME, STREAM_WINDOW,
    headers::{self, AuthorityError, Baggage, Forwarded, HboneAddress, TraceParent},
};

/// A CONNECT as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub address: HboneAddress,
    /// The identity the peer's certificate proved in this connection's handshake.
    pub peer: Identity,
    /// `forwarded`'s `host=`: the service the client addressed, as the client's proxy says — a claim, so
    /// only good for choosing among the services the destination backs anyway.
    pub forwarded_host: Option<String>,
    /// `traceparent`: the client's name for the tunnel, for the logs.
    pub trace: Option<TraceParent>,
}

impl Connect {
    /// The CONNECT `request` from `peer`, unless its authority names no destination (then: 400).
    fn of(request: &Request<RecvStream>, peer: &Identity) -> Result<Connect, AuthorityError> {
        let authority = request.uri().authority().ok_or(AuthorityError::Missing)?;
        let header = |name: &str| request.headers().get(name);
        Ok(Connect {
            address: HboneAddress::parse(authority.as_str())?,
            peer: peer.clone(),
            forwarded_host: header(headers::FORWARDED).and_then(Forwarded::host_of),
            trace: header(headers::TRACEPARENT).and_then(TraceParent::parse),
        })
    }
}

/// A CONNECT the handler has not answered yet.
pub struct PendingTunnel {
    respond: SendResponse<Bytes>,
    body: RecvStream,
}

impl PendingTunnel {
    /// Answers 200 with `baggage` naming the destination workload (ztunnel's response header): the tunnel
    /// is open.
    pub fn accept(mut self, baggage: &Baggage) -> Result<H2Stream> {
        let mut ok = status(StatusCode::OK);
        if let Some(value) = baggage.header() {
            ok.headers_mut().insert(headers::BAGGAGE, value);
        }
        let send = self.respond.send_response(ok, false).context("answering CONNECT")?;
        Ok(H2Stream::new(send, self.body))
    }

    /// Answers with an error status and ends the stream.
    pub fn refuse(mut self, code: StatusCode) {
        let _ = self.respond.send_response(status(code), true);
    }
}

/// Serves one mTLS connection from `peer` until it closes: every CONNECT to `ip:port` or `hostname:port`
/// goes to `handle(connect, tunnel)` on a task of its own; anything else is answered 400.
pub async fn serve<IO, H, F>(io: IO, peer: Identity, handle: H) -> Result<()>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Connect, PendingTunnel) -> F + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let mut connection = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .handshake::<_, Bytes>(io)
        .await
        .context("HBONE HTTP/2 handshake")?;
    let handle = Arc::new(handle);
    while let Some(request) = connection.accept().await {
        let (request, mut respond) = match request {
            Ok(r) => r,
            Err(e) => {
                debug!(peer = %peer, "HBONE connection ended: {e}");
                break;
            }
        };
        if request.method() != Method::CONNECT {
            warn!(peer = %peer, method = %request.method(), uri = %request.uri(), "HBONE: not a CONNECT; answered 400");
            let _ = respond.send_response(status(StatusCode::BAD_REQUEST), true);
            continue;
        }
        let connect = match Connect::of(&request, &peer) {
            Ok(connect) => connect,
            Err(e) => {
                warn!(peer = %peer, "HBONE CONNECT: {e}; answered 400");
                let _ = respond.send_response(status(StatusCode::BAD_REQUEST), true);
                continue;
            }
        };
        let tunnel = PendingTunnel { respond, body: request.into_body() };
        tokio::spawn(handle(connect, tunnel));
    }
    Ok(())
}

fn status(code: StatusCode) -> Response<()> {
    Response::builder().status(code).body(()).expect("static response")
}
