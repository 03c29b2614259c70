//! Opening HBONE streams: an HTTP/2 connection over an established mTLS stream, then one CONNECT per
//! tunnelled TCP connection, with the headers ztunnel sends ([`super::headers`]).
use std::net::SocketAddr;

use anyhow::{Context, Result};
use bytes::Bytes;
use h2::client::SendRequest;
use http::{Method, Request};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{
    CONNECTION_WINDOW, H2Stream, MAX_FRAME, STREAM_WINDOW,
    headers::{self, Baggage, Forwarded, ForwardedFor, TraceParent},
};

/// What one CONNECT carries: where it goes, and for whom (one stream's, so pooled connections can carry
/// tunnels of many clients and services).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelRequest {
    /// The destination workload's `ip:port`, sent as `:authority`.
    pub destination: SocketAddr,
    /// The client the tunnel carries (`forwarded: for=`).
    pub forwarded_for: ForwardedFor,
    /// The service hostname the client addressed, if it addressed one (`forwarded: …;host=`).
    pub service_host: Option<String>,
    /// The source workload (`baggage`); nothing is sent when nothing is known.
    pub baggage: Baggage,
}

impl TunnelRequest {
    /// The CONNECT, with a fresh `traceparent`.
    fn http(&self) -> Request<()> {
        let forwarded = Forwarded { client: self.forwarded_for, host: self.service_host.clone() };
        let mut request = Request::builder()
            .method(Method::CONNECT)
            .uri(self.destination.to_string())
            .header(headers::FORWARDED, forwarded.header())
            .header(headers::TRACEPARENT, TraceParent::random().header());
        if let Some(baggage) = self.baggage.header() {
            request = request.header(headers::BAGGAGE, baggage);
        }
        request.body(()).expect("a socket address is a valid authority")
    }
}

/// Why a CONNECT did not open a tunnel.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The peer answered, with another status than 200 — 401: its AuthorizationPolicy refused us; 400: it
    /// did not take the request (not its address, no such service there); 503: its workload is
    /// unreachable (the statuses ztunnel answers too). The connection itself is fine, and asking again on a
    /// new one would get the same answer.
    #[error("HBONE CONNECT {destination}: peer answered {status}")]
    Refused { destination: SocketAddr, status: http::StatusCode },
    /// The HTTP/2 connection could not carry the request (it went away, or was reset).
    #[error("HBONE connection: {0}")]
    Connection(#[from] h2::Error),
}

/// An HTTP/2 connection to a peer's HBONE server; cheap to clone, shared by every stream to that peer.
#[derive(Clone)]
pub struct Connection {
    requests: SendRequest<Bytes>,
}

impl Connection {
    /// Runs the HTTP/2 handshake on `io` (an mTLS stream whose ALPN chose h2) and drives the connection
    /// on a task of its own.
    pub async fn handshake<IO>(io: IO) -> Result<Self>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (requests, connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .handshake(io)
            .await
            .context("HBONE HTTP/2 handshake")?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("HBONE connection ended: {e}");
            }
        });
        Ok(Connection { requests })
    }

    /// Opens the tunnel `request` describes; fails unless the peer answers 200.
    pub async fn connect(&self, request: &TunnelRequest) -> Result<H2Stream, ConnectError> {
        let mut requests = self.requests.clone().ready().await?;
        let (response, send) = requests.send_request(request.http(), false)?;
        let response = response.await?;
        if response.status() != http::StatusCode::OK {
            return Err(ConnectError::Refused { destination: request.destination, status: response.status() });
        }
        Ok(H2Stream::new(send, response.into_body()))
    }
}
