//! HBONE: TCP tunnelled as HTTP/2 CONNECT streams over mutual TLS, port 15008 — Istio ambient's
//! data-plane protocol, so Warren agents and ztunnels can talk. One TLS connection (per source identity
//! and destination) carries many streams; each stream's `:authority` is the original destination
//! `ip:port` (or, from ztunnel, a service `hostname:port`); each side knows the other's SPIFFE identity
//! from the handshake.
//!
//! - [`client`]: open streams on an established connection.
//! - [`server`]: accept streams and hand each, with the peer's identity, to a connector.
//! - [`headers`]: what a CONNECT carries besides its bytes (`forwarded`, `baggage`, `traceparent`).
//! - [`H2Stream`]: an h2 stream as `AsyncRead + AsyncWrite`, so the proxy's copy works unchanged.
pub mod client;
pub mod headers;
pub mod pool;
pub mod server;
mod stream;

pub use stream::H2Stream;

/// Istio's HBONE port.
pub const HBONE_PORT: u16 = 15008;

/// Flow-control windows: large enough that one stream can fill a fast link (ztunnel uses similar sizes).
pub(crate) const STREAM_WINDOW: u32 = 4 << 20;
pub(crate) const CONNECTION_WINDOW: u32 = 16 << 20;
pub(crate) const MAX_FRAME: u32 = 1 << 20;

#[cfg(test)]
mod tests;
