//! The one place that defines what Warren's eBPF maps hold.
//!
//! Both sides compile this crate: `agent-ebpf` for `bpfel-unknown-none` (no_std) and `warren-agent` with
//! the `user` feature. Every key and value is `#[repr(C)]` with explicit padding, so the bytes the kernel
//! hashes are the bytes userspace writes (implicit padding would be uninitialised on one side).
//!
//! Conventions: IP addresses are stored as the kernel hands them to BPF programs — 32-bit words in network
//! byte order; an IPv4 address uses word 0 and leaves words 1..3 zero. Ports are in host byte order.
#![no_std]

/// Where warren-agent pins its maps (under bpffs) unless told otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/warren";

/// Map names: the name a map has in the eBPF object is also its pin file name.
pub mod names {
    /// network namespace cookie → [`EnrolledNetns`](super::EnrolledNetns): which pods' sockets are
    /// redirected into the agent. Keyed by netns, not cgroup, so that it works on every node layout: on a
    /// hybrid host the kubelet's pods have no cgroup v2 group of their own, but every pod has its own netns.
    /// (Replaces `ENROLLED_CGROUPS`; the new name keeps an old pinned map from ever being re-used.)
    pub const ENROLLED_NETNS: &str = "ENROLLED_NETNS";
    /// socket cookie → [`OriginalDst`](super::OriginalDst): written by connect4, consumed by sockops.
    pub const ORIGINAL_DST_BY_COOKIE: &str = "ORIGINAL_DST_BY_COOKIE";
    /// [`ConnectionKey`](super::ConnectionKey) (client side of the redirected connection) → original destination.
    pub const ORIGINAL_DST: &str = "ORIGINAL_DST";
    /// Per-CPU event counters, indexed by [`Counter`](super::Counter).
    pub const COUNTERS: &str = "COUNTERS";
    /// [`ListenerKey`](super::ListenerKey) (an enrolled pod's IP) → the agent's inbound listener in that pod.
    pub const INBOUND_LISTENERS: &str = "INBOUND_LISTENERS";
    /// [`SocketKey`](super::SocketKey) → the local sockets whose bytes sk_msg short-circuits.
    pub const LOCAL_SOCKETS: &str = "LOCAL_SOCKETS";
    /// [`SocketKey`](super::SocketKey) → 1: local sockets whose first message took the normal TCP path, so
    /// that their later messages take it too (LRU: entries of closed sockets age out).
    pub const UNACCELERATED_SOCKETS: &str = "UNACCELERATED_SOCKETS";
    /// Index 0: the agent's [`Settings`](super::Settings).
    pub const SETTINGS: &str = "SETTINGS";
    /// [`ServiceKey`](super::ServiceKey) (a service VIP and port) → [`ServiceRoute`](super::ServiceRoute):
    /// the L4 route the controller pushed for it.
    pub const SERVICE_ROUTES: &str = "SERVICE_ROUTES";
    /// LPM trie: [`AuthzTarget`](super::AuthzTarget) (family, port, an enrolled pod's address, client
    /// source prefix) → [`AuthzVerdict`](super::AuthzVerdict): AuthorizationPolicy decisions sk_lookup
    /// applies to plaintext inbound connections. (Replaces the hash map `L4_POLICY`, which could not
    /// express source addresses; the new name keeps an old pinned map from ever being re-used.)
    pub const L4_AUTHZ: &str = "L4_AUTHZ";
    /// Ring buffer of [`AuthzDenial`](super::AuthzDenial): one record per connection sk_lookup refused.
    pub const AUTHZ_DENIALS: &str = "AUTHZ_DENIALS";
    /// [`ServiceKey`](super::ServiceKey) → [`ConnectFault`](super::ConnectFault): connection faults
    /// connect4/6 inject for enrolled workloads' connects to a service address (Warren's L4 fault injection).
    pub const CONNECT_FAULTS: &str = "CONNECT_FAULTS";
}

/// Capacity of [`names::CONNECT_FAULTS`].
pub const MAX_CONNECT_FAULTS: u32 = 4096;

/// Where an aborted connect is sent instead: a loopback port nothing listens on, so the kernel answers
/// the SYN with a reset and connect() fails with ECONNREFUSED (as a refused connection does).
pub const REFUSED_PORT: u16 = 1;

/// Value of [`names::CONNECT_FAULTS`]; shares are parts per million of connects.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectFault {
    pub abort_per_million: u32,
    pub delay_per_million: u32,
    /// How long the agent holds a delayed connection before it connects upstream.
    pub delay_ms: u32,
    pub _pad: u32,
}

/// Capacity of [`names::SERVICE_ROUTES`] (VIP:port pairs).
pub const MAX_SERVICE_ROUTES: u32 = 65536;
/// Capacity of [`names::L4_AUTHZ`] (entries; the trie is allocated as it fills, `BPF_F_NO_PREALLOC`).
pub const MAX_L4_AUTHZ: u32 = 65536;
/// Size of [`names::AUTHZ_DENIALS`] in bytes (a power-of-2 multiple of the page size): 5461 records of 48
/// bytes plus the kernel's 8-byte header each.
pub const AUTHZ_DENIALS_BYTES: u32 = 256 * 1024;
/// Weighted destinations one L4 route can hold.
pub const MAX_ROUTE_DESTINATIONS: usize = 8;

/// Key of [`names::SERVICE_ROUTES`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub ip: [u32; 4],
    pub port: u16,
    pub family: u16,
}

/// One weighted destination of a [`ServiceRoute`]: a service (or one of its subsets) by id. Ids are
/// FNV-1a hashes of `namespace/name` and `namespace/name/subset`, so every agent computes the same.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouteDestination {
    pub service_id: u32,
    /// 0: every endpoint of the service.
    pub subset_id: u32,
    pub port: u16,
    pub _pad: u16,
    /// Percent.
    pub weight: u32,
}

/// Value of [`names::SERVICE_ROUTES`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceRoute {
    pub service_id: u32,
    /// `ROUTE_*` bits.
    pub flags: u32,
    pub destination_count: u32,
    pub _pad: u32,
    pub destinations: [RouteDestination; MAX_ROUTE_DESTINATIONS],
}

/// A VirtualService routes this service (else: the service's own endpoints, weight 100).
pub const ROUTE_FROM_VIRTUAL_SERVICE: u32 = 1;
/// HTTP rules with match conditions exist (the L7 proxy decides per request).
pub const ROUTE_HAS_HTTP_MATCHES: u32 = 2;
/// HTTP fault injection is configured for this service.
pub const ROUTE_HAS_FAULT: u32 = 4;

/// Key data of [`names::L4_AUTHZ`]; the trie key is `{ prefix_len: u32, data: AuthzTarget }`
/// (`aya::maps::lpm_trie::Key` / `aya_ebpf::maps::lpm_trie::Key`).
///
/// The field order is the match order: the trie compares the data bit by bit from the first byte, so
/// `family`, `port` and `dst_ip` (the first [`AUTHZ_FIXED_PREFIX_BITS`] = 160 bits) are always matched
/// exactly and the longest-prefix match runs over `src_ip` alone: `prefix_len` = 160 + the source prefix
/// length. `src_ip` is in network byte order, so its bytes are in the order the prefix counts them;
/// the bits beyond the prefix must be zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AuthzTarget {
    /// [`AF_INET`] or [`AF_INET6`], of both addresses.
    pub family: u16,
    /// The pod's port, host byte order. 0: every port that no entry for this destination names.
    pub port: u16,
    /// The enrolled pod's address (the connection's local address in sk_lookup).
    pub dst_ip: [u32; 4],
    /// The client's address (sk_lookup's remote address), masked to the prefix.
    pub src_ip: [u32; 4],
}

/// Bits of an [`AuthzTarget`] before `src_ip` (family, port, dst_ip): every entry's prefix covers them.
pub const AUTHZ_FIXED_PREFIX_BITS: u32 = 160;

/// Value of [`names::L4_AUTHZ`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AuthzVerdict {
    /// [`AUTHZ_ALLOW`] or [`AUTHZ_DENY`].
    pub verdict: u32,
    /// The policy and rule that decided, as userspace numbers them. 0: ALLOW policies apply to the pod
    /// and none of their rules matched.
    pub decision_id: u32,
}

/// The connection proceeds (is captured by the agent as without the entry).
pub const AUTHZ_ALLOW: u32 = 0;
/// sk_lookup refuses the connection: the client's SYN is answered with a reset ("connection refused").
pub const AUTHZ_DENY: u32 = 1;

/// Record of [`names::AUTHZ_DENIALS`]: a connection sk_lookup refused.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AuthzDenial {
    pub family: u16,
    /// Host byte order.
    pub dst_port: u16,
    /// Host byte order (sk_lookup hands the remote port in network order; the program converts it).
    pub src_port: u16,
    pub _pad: u16,
    pub src_ip: [u32; 4],
    pub dst_ip: [u32; 4],
    /// [`AuthzVerdict::decision_id`] of the entry that denied.
    pub decision_id: u32,
    pub _pad2: u32,
}

/// FNV-1a (32 bit): stable ids for service and subset names.
pub const fn name_id(name: &[u8]) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    let mut i = 0;
    while i < name.len() {
        hash ^= name[i] as u32;
        hash = hash.wrapping_mul(0x0100_0193);
        i += 1;
    }
    hash
}

/// Where pinned links live, below the pin directory.
pub const LINKS_DIR: &str = "links";

/// Value of [`names::SETTINGS`] (one entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Outbound capture port (the agent's listener on loopback in every enrolled pod).
    pub outbound_port: u16,
    /// Inbound capture port (the agent's listener on every address in every enrolled pod).
    pub inbound_port: u16,
    /// HBONE port, never captured on inbound.
    pub hbone_port: u16,
    /// 1: sockops/sk_msg short-circuit the app ↔ agent loopback legs.
    pub socket_acceleration: u16,
}

/// Key of [`names::INBOUND_LISTENERS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    pub ip: [u32; 4],
    pub family: u16,
    pub _pad: u16,
}

/// Key of [`names::LOCAL_SOCKETS`]: one end of a local TCP connection, qualified by its netns.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SocketKey {
    pub netns_cookie: u64,
    pub local_ip: [u32; 4],
    pub remote_ip: [u32; 4],
    pub local_port: u16,
    pub remote_port: u16,
    pub family: u16,
    pub _pad: u16,
}

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// SO_MARK of the sockets the agent itself makes inside a pod's network namespace (to the pod's app, or
/// upstream from the pod's own address): connect4/6 never redirect them, though the netns is enrolled.
/// Marks stay inside the pod's netns (the kernel clears them when a packet crosses into another), so the
/// value meets no node routing; it is the one ztunnel uses in the same place.
pub const AGENT_SOCKET_MARK: u32 = 0x539;

/// Value of [`names::ENROLLED_NETNS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EnrolledNetns {
    /// Port on 127.0.0.1 inside the pod's network namespace where the agent accepts redirected
    /// outbound connections (15001, as ztunnel uses).
    pub outbound_port: u16,
    pub _pad: u16,
    /// Flags, see `ENROLLED_*`.
    pub flags: u32,
}

/// [`EnrolledNetns::flags`]: leave this pod's local legs out of socket acceleration (its pod label
/// `warren.dev/socket-acceleration=false`).
pub const ENROLLED_NO_SOCKET_ACCELERATION: u32 = 1;

/// Key of [`names::ORIGINAL_DST`]: the client end of a redirected TCP connection as the agent sees it
/// from its accepted socket (peer address), qualified by network namespace because every pod has its own
/// 127.0.0.1.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnectionKey {
    pub netns_cookie: u64,
    pub ip: [u32; 4],
    pub port: u16,
    pub family: u16,
    pub _pad: u32,
}

/// The destination an enrolled workload dialed before connect4 rewrote it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OriginalDst {
    pub ip: [u32; 4],
    pub port: u16,
    pub family: u16,
    /// A connection fault connect4/6 decided: the agent waits this long before it connects (0: none).
    pub delay_ms: u32,
    /// The enrolled network namespace the connect came from (its key in [`names::ENROLLED_NETNS`]).
    pub netns_cookie: u64,
}

/// Indices into [`names::COUNTERS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// connect4 ran for a TCP socket.
    Connect4 = 0,
    /// connect4 rewrote the destination to the agent.
    Connect4Redirected = 1,
    /// sockops moved an original destination from the cookie map to the connection map.
    OriginalDstRecorded = 2,
    /// connect4/6 found an enrolled cgroup but could not record the original destination (map full).
    OriginalDstRecordFailed = 3,
    /// connect6 ran for a TCP socket.
    Connect6 = 4,
    /// connect6 rewrote the destination to the agent.
    Connect6Redirected = 5,
    /// sk_lookup steered an inbound connection to the agent's inbound listener.
    InboundCaptured = 6,
    /// sockops added a socket to the acceleration map.
    AcceleratedSocket = 7,
    /// sk_msg handed a message straight to the peer socket.
    SkMsgRedirected = 8,
    /// sk_lookup refused an inbound connection: its `L4_AUTHZ` entry says deny.
    InboundDenied = 9,
    /// sk_lookup refused a connection but `AUTHZ_DENIALS` was full: the denial record was dropped (the
    /// refusal itself still happened and was counted in `InboundDenied`).
    DenialEventsLost = 10,
    /// connect4/6 aborted a connect by a [`ConnectFault`] (the agent never sees it).
    ConnectAborted = 11,
    /// connect4/6 marked a connection for a fault delay.
    ConnectDelayed = 12,
    /// sk_msg left a message on the normal TCP path because its connection's first message took it (the
    /// peer socket was not in `LOCAL_SOCKETS` yet): one direction of a connection never mixes the paths.
    SkMsgPassed = 13,
}

impl Counter {
    pub const ALL: [Counter; 14] = [
        Counter::Connect4,
        Counter::Connect4Redirected,
        Counter::OriginalDstRecorded,
        Counter::OriginalDstRecordFailed,
        Counter::Connect6,
        Counter::Connect6Redirected,
        Counter::InboundCaptured,
        Counter::AcceleratedSocket,
        Counter::SkMsgRedirected,
        Counter::InboundDenied,
        Counter::DenialEventsLost,
        Counter::ConnectAborted,
        Counter::ConnectDelayed,
        Counter::SkMsgPassed,
    ];
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Connect4 => "connect4",
            Counter::Connect4Redirected => "connect4_redirected",
            Counter::OriginalDstRecorded => "original_dst_recorded",
            Counter::OriginalDstRecordFailed => "original_dst_record_failed",
            Counter::Connect6 => "connect6",
            Counter::Connect6Redirected => "connect6_redirected",
            Counter::InboundCaptured => "inbound_captured",
            Counter::AcceleratedSocket => "accelerated_socket",
            Counter::SkMsgRedirected => "sk_msg_redirected",
            Counter::InboundDenied => "inbound_denied",
            Counter::DenialEventsLost => "denial_events_lost",
            Counter::ConnectAborted => "connect_aborted",
            Counter::ConnectDelayed => "connect_delayed",
            Counter::SkMsgPassed => "sk_msg_passed",
        }
    }
}

pub const NUM_COUNTERS: u32 = 16;

#[cfg(feature = "user")]
mod user {
    use super::*;
    use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

    // SAFETY: plain #[repr(C)] data with explicit padding, every bit pattern valid.
    unsafe impl aya::Pod for EnrolledNetns {}
    unsafe impl aya::Pod for ConnectionKey {}
    unsafe impl aya::Pod for OriginalDst {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for ListenerKey {}
    unsafe impl aya::Pod for SocketKey {}
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceRoute {}
    unsafe impl aya::Pod for ConnectFault {}
    unsafe impl aya::Pod for AuthzTarget {}
    unsafe impl aya::Pod for AuthzVerdict {}
    unsafe impl aya::Pod for AuthzDenial {}

    impl ServiceKey {
        pub fn new(addr: SocketAddr) -> Self {
            let (ip, family) = ip_to_words(addr.ip());
            ServiceKey { ip, port: addr.port(), family }
        }
        pub fn socket_addr(&self) -> Option<SocketAddr> {
            words_to_ip(self.ip, self.family).map(|ip| SocketAddr::new(ip, self.port))
        }
    }

    /// The longest prefix an address of `family` has (32 or 128); 0 for an unknown family.
    const fn max_prefix(family: u16) -> u8 {
        match family {
            AF_INET => 32,
            AF_INET6 => 128,
            _ => 0,
        }
    }

    /// `ip` with every bit after the first `prefix_len` zeroed.
    fn mask_ip(ip: IpAddr, prefix_len: u8) -> IpAddr {
        match ip {
            IpAddr::V4(v4) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix_len.min(32))).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask))
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix_len.min(128))).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
        }
    }

    /// One `L4_AUTHZ` entry's key in a form userspace can sort and compare: the [`AuthzTarget`] (source
    /// masked to the prefix) and the source prefix length. aya's `lpm_trie::Key` is `repr(packed)` and not
    /// `Ord`; [`AuthzEntryKey::trie_key`] and [`AuthzEntryKey::from_trie_key`] convert.
    ///
    /// The fields are private so that every value is canonical: same family on both sides, prefix length
    /// within the family's, no source bits beyond the prefix. Two keys are equal exactly when the trie
    /// would hold them as one entry.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
    pub struct AuthzEntryKey {
        target: AuthzTarget,
        src_prefix_len: u8,
    }

    impl AuthzEntryKey {
        /// Connections to `dst`:`port` (0: every port no entry for `dst` names) from `src`/`src_prefix_len`.
        /// The source bits beyond the prefix are ignored (zeroed). `None` when `src` is not of `dst`'s family
        /// or the prefix is longer than its addresses.
        pub fn new(dst: IpAddr, port: u16, src: IpAddr, src_prefix_len: u8) -> Option<Self> {
            let (dst_ip, family) = ip_to_words(dst);
            let (src_ip, src_family) = ip_to_words(mask_ip(src, src_prefix_len));
            if src_family != family || src_prefix_len > max_prefix(family) {
                return None;
            }
            Some(AuthzEntryKey { target: AuthzTarget { family, port, dst_ip, src_ip }, src_prefix_len })
        }

        /// The key as the trie holds it: `prefix_len` = 160 + the source prefix length.
        pub fn trie_key(&self) -> aya::maps::lpm_trie::Key<AuthzTarget> {
            aya::maps::lpm_trie::Key::new(AUTHZ_FIXED_PREFIX_BITS + u32::from(self.src_prefix_len), self.target)
        }

        /// Decodes a key read from the trie; `None` if it is not one [`AuthzEntryKey::new`] could have made
        /// (unknown family, a prefix not covering family, port and destination, or longer than the source
        /// address, source bits set beyond the prefix).
        pub fn from_trie_key(key: &aya::maps::lpm_trie::Key<AuthzTarget>) -> Option<Self> {
            let target = key.data();
            let src_prefix_len = u8::try_from(key.prefix_len().checked_sub(AUTHZ_FIXED_PREFIX_BITS)?).ok()?;
            let decoded = Self::new(
                words_to_ip(target.dst_ip, target.family)?,
                target.port,
                words_to_ip(target.src_ip, target.family)?,
                src_prefix_len,
            )?;
            (decoded.target == target).then_some(decoded)
        }

        pub fn target(&self) -> AuthzTarget {
            self.target
        }
        /// The enrolled pod's address.
        pub fn dst(&self) -> IpAddr {
            words_to_ip(self.target.dst_ip, self.target.family).expect("family checked on construction")
        }
        /// The pod's port; 0: every port no other entry for this destination names.
        pub fn port(&self) -> u16 {
            self.target.port
        }
        /// The client source prefix: its (masked) address and length.
        pub fn src(&self) -> (IpAddr, u8) {
            (words_to_ip(self.target.src_ip, self.target.family).expect("family checked on construction"), self.src_prefix_len)
        }
    }

    /// `dst ip:port|* from src/len`, as `inspect maps` shows an entry.
    impl core::fmt::Display for AuthzEntryKey {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            let (src, len) = self.src();
            match (self.dst(), self.port()) {
                (IpAddr::V4(dst), 0) => write!(f, "{dst}:*")?,
                (IpAddr::V6(dst), 0) => write!(f, "[{dst}]:*")?,
                (dst, port) => write!(f, "{}", SocketAddr::new(dst, port))?,
            }
            write!(f, " from {src}/{len}")
        }
    }

    /// The `L4_AUTHZ` trie key for connections to `dst`:`port` from `src`/`src_prefix_len`; see
    /// [`AuthzEntryKey::new`] (`None`: families differ, or the prefix is too long).
    pub fn authz_key(dst: IpAddr, port: u16, src: IpAddr, src_prefix_len: u8) -> Option<aya::maps::lpm_trie::Key<AuthzTarget>> {
        AuthzEntryKey::new(dst, port, src, src_prefix_len).map(|k| k.trie_key())
    }

    impl AuthzDenial {
        /// The refused client's address and port; `None` for an unknown family.
        pub fn client(&self) -> Option<SocketAddr> {
            words_to_ip(self.src_ip, self.family).map(|ip| SocketAddr::new(ip, self.src_port))
        }
        /// The enrolled pod's address and port the client tried to reach; `None` for an unknown family.
        pub fn destination(&self) -> Option<SocketAddr> {
            words_to_ip(self.dst_ip, self.family).map(|ip| SocketAddr::new(ip, self.dst_port))
        }
        /// Decodes one ring buffer record; `None` if it has not exactly the size of an `AuthzDenial`.
        pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
            if bytes.len() != core::mem::size_of::<AuthzDenial>() {
                return None;
            }
            // SAFETY: the length is checked; AuthzDenial is plain #[repr(C)] data for which every bit
            // pattern is valid, and read_unaligned needs no alignment of the ring buffer's bytes.
            Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<AuthzDenial>()) })
        }
    }

    impl ListenerKey {
        pub fn new(ip: IpAddr) -> Self {
            let (ip, family) = ip_to_words(ip);
            ListenerKey { ip, family, _pad: 0 }
        }
    }

    /// Converts an address to the map representation (network-order words).
    pub fn ip_to_words(ip: IpAddr) -> ([u32; 4], u16) {
        match ip {
            IpAddr::V4(v4) => ([u32::from_ne_bytes(v4.octets()), 0, 0, 0], AF_INET),
            IpAddr::V6(v6) => {
                let o = v6.octets();
                let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                ([w(0), w(4), w(8), w(12)], AF_INET6)
            }
        }
    }

    /// Converts the map representation back to an address; `None` for an unknown family.
    pub fn words_to_ip(words: [u32; 4], family: u16) -> Option<IpAddr> {
        match family {
            AF_INET => Some(IpAddr::V4(Ipv4Addr::from(words[0].to_ne_bytes()))),
            AF_INET6 => {
                let mut o = [0u8; 16];
                for (i, w) in words.iter().enumerate() {
                    o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
                }
                Some(IpAddr::V6(Ipv6Addr::from(o)))
            }
            _ => None,
        }
    }

    impl ConnectionKey {
        pub fn new(netns_cookie: u64, peer: SocketAddr) -> Self {
            let (ip, family) = ip_to_words(peer.ip());
            ConnectionKey { netns_cookie, ip, port: peer.port(), family, _pad: 0 }
        }
        pub fn socket_addr(&self) -> Option<SocketAddr> {
            words_to_ip(self.ip, self.family).map(|ip| SocketAddr::new(ip, self.port))
        }
    }

    impl OriginalDst {
        pub fn socket_addr(&self) -> Option<SocketAddr> {
            words_to_ip(self.ip, self.family).map(|ip| SocketAddr::new(ip, self.port))
        }
    }

    #[cfg(test)]
    mod tests {
        extern crate std;
        use super::*;
        use std::string::ToString;

        #[test]
        fn layouts_have_no_implicit_padding() {
            assert_eq!(core::mem::size_of::<EnrolledNetns>(), 8);
            assert_eq!(core::mem::size_of::<ConnectFault>(), 16);
            assert_eq!(core::mem::size_of::<ConnectionKey>(), 32);
            assert_eq!(core::mem::size_of::<OriginalDst>(), 32);
            assert_eq!(core::mem::size_of::<Settings>(), 8);
            assert_eq!(core::mem::size_of::<ListenerKey>(), 20);
            assert_eq!(core::mem::size_of::<SocketKey>(), 48);
            assert_eq!(core::mem::size_of::<ServiceKey>(), 20);
            assert_eq!(core::mem::size_of::<RouteDestination>(), 16);
            assert_eq!(core::mem::size_of::<ServiceRoute>(), 16 + 16 * MAX_ROUTE_DESTINATIONS);
            assert_eq!(core::mem::size_of::<AuthzTarget>(), 36);
            assert_eq!(core::mem::size_of::<AuthzVerdict>(), 8);
            assert_eq!(core::mem::size_of::<AuthzDenial>(), 48);
            // The trie key: prefix_len (u32) then the data, packed; the prefix may span all of the data.
            assert_eq!(core::mem::size_of::<aya::maps::lpm_trie::Key<AuthzTarget>>(), 40);
            assert_eq!(AUTHZ_FIXED_PREFIX_BITS as usize, 8 * core::mem::offset_of!(AuthzTarget, src_ip));
            assert_eq!(core::mem::offset_of!(AuthzDenial, src_ip), 8);
            assert_eq!(core::mem::offset_of!(AuthzDenial, decision_id), 40);
        }

        fn ip(s: &str) -> IpAddr {
            s.parse().unwrap()
        }

        #[test]
        fn authz_keys_mask_the_source_to_its_prefix() {
            let key = AuthzEntryKey::new(ip("10.244.2.2"), 7000, ip("10.244.1.77"), 24).unwrap();
            assert_eq!(key.src(), (ip("10.244.1.0"), 24));
            assert_eq!(key, AuthzEntryKey::new(ip("10.244.2.2"), 7000, ip("10.244.1.0"), 24).unwrap());
            let trie = key.trie_key();
            assert_eq!(trie.prefix_len(), 160 + 24);
            let data = trie.data();
            assert_eq!((data.family, data.port), (AF_INET, 7000));
            // Network byte order in memory: the prefix's bytes come first.
            let src: [u8; 4] = data.src_ip[0].to_ne_bytes();
            assert_eq!(src, [10, 244, 1, 0]);
            assert_eq!(data.src_ip[1..], [0, 0, 0]);
            assert_eq!(key.to_string(), "10.244.2.2:7000 from 10.244.1.0/24");

            // An odd prefix keeps exactly its bits; /0 keeps none; v6 works the same.
            let odd = AuthzEntryKey::new(ip("10.0.0.1"), 0, ip("192.168.255.255"), 17).unwrap();
            assert_eq!(odd.src().0, ip("192.168.128.0"));
            assert_eq!(odd.to_string(), "10.0.0.1:* from 192.168.128.0/17");
            let any = AuthzEntryKey::new(ip("10.0.0.1"), 0, ip("1.2.3.4"), 0).unwrap();
            assert_eq!((any.src(), any.trie_key().prefix_len()), ((ip("0.0.0.0"), 0), 160));
            let v6 = AuthzEntryKey::new(ip("fd00::2"), 80, ip("fd00:10:244:1::ff"), 64).unwrap();
            assert_eq!(v6.src(), (ip("fd00:10:244:1::"), 64));
            assert_eq!(v6.trie_key().prefix_len(), 160 + 64);
            assert_eq!(v6.to_string(), "[fd00::2]:80 from fd00:10:244:1::/64");
        }

        #[test]
        fn authz_keys_refuse_mixed_families_and_overlong_prefixes() {
            assert_eq!(AuthzEntryKey::new(ip("10.0.0.1"), 80, ip("fd00::1"), 0), None);
            assert_eq!(AuthzEntryKey::new(ip("fd00::1"), 80, ip("10.0.0.1"), 0), None);
            assert_eq!(AuthzEntryKey::new(ip("10.0.0.1"), 80, ip("10.0.0.2"), 33), None);
            assert!(AuthzEntryKey::new(ip("10.0.0.1"), 80, ip("10.0.0.2"), 32).is_some());
            assert_eq!(AuthzEntryKey::new(ip("fd00::1"), 80, ip("fd00::2"), 129), None);
            assert!(authz_key(ip("10.0.0.1"), 80, ip("fd00::1"), 0).is_none());
        }

        #[test]
        fn authz_keys_decode_from_the_trie_and_refuse_foreign_ones() {
            for key in [
                AuthzEntryKey::new(ip("10.244.2.2"), 7000, ip("10.244.1.0"), 24).unwrap(),
                AuthzEntryKey::new(ip("10.244.2.2"), 0, ip("0.0.0.0"), 0).unwrap(),
                AuthzEntryKey::new(ip("fd00::2"), 443, ip("fd00::77"), 128).unwrap(),
            ] {
                assert_eq!(AuthzEntryKey::from_trie_key(&key.trie_key()), Some(key));
            }
            let good = AuthzEntryKey::new(ip("10.244.2.2"), 7000, ip("10.244.1.0"), 24).unwrap().target();
            let key = |len: u32, data: AuthzTarget| aya::maps::lpm_trie::Key::new(len, data);
            // A prefix that does not cover the destination, one longer than an IPv4 source, unmasked bits.
            assert_eq!(AuthzEntryKey::from_trie_key(&key(100, good)), None);
            assert_eq!(AuthzEntryKey::from_trie_key(&key(160 + 33, good)), None);
            assert_eq!(AuthzEntryKey::from_trie_key(&key(160 + 16, good)), None);
            assert_eq!(AuthzEntryKey::from_trie_key(&key(160 + 24, AuthzTarget { family: 7, ..good })), None);
        }

        #[test]
        fn denial_records_decode() {
            let record = AuthzDenial {
                family: AF_INET,
                dst_port: 7000,
                src_port: 40000,
                _pad: 0,
                src_ip: ip_to_words(ip("10.244.1.3")).0,
                dst_ip: ip_to_words(ip("10.244.2.2")).0,
                decision_id: 42,
                _pad2: 0,
            };
            // SAFETY: reading the bytes of a plain #[repr(C)] value without implicit padding.
            let bytes = unsafe {
                core::slice::from_raw_parts((&record as *const AuthzDenial).cast::<u8>(), core::mem::size_of::<AuthzDenial>())
            };
            let decoded = AuthzDenial::from_bytes(bytes).unwrap();
            assert_eq!(decoded, record);
            assert_eq!(decoded.client(), Some("10.244.1.3:40000".parse().unwrap()));
            assert_eq!(decoded.destination(), Some("10.244.2.2:7000".parse().unwrap()));
            assert_eq!(AuthzDenial::from_bytes(&bytes[..47]), None);
        }

        #[test]
        fn addresses_round_trip_through_map_words() {
            for s in ["10.1.2.3:80", "[fd00::1:2]:8080", "127.0.0.1:15001"] {
                let addr: SocketAddr = s.parse().unwrap();
                let key = ConnectionKey::new(7, addr);
                assert_eq!(key.socket_addr(), Some(addr), "{s}");
            }
            // IPv4 word 0 holds the address in network byte order, as the kernel's user_ip4 does.
            let (w, f) = ip_to_words("10.1.2.3".parse().unwrap());
            assert_eq!((u32::from_be(w[0]), f), (0x0a01_0203, AF_INET));
        }
    }
}
#[cfg(feature = "user")]
pub use user::{AuthzEntryKey, authz_key, ip_to_words, words_to_ip};
