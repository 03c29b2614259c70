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
    /// cgroup id → [`EnrolledCgroup`]: which cgroups' sockets are redirected into the agent.
    pub const ENROLLED_CGROUPS: &str = "ENROLLED_CGROUPS";
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
    /// Index 0: the agent's [`Settings`](super::Settings).
    pub const SETTINGS: &str = "SETTINGS";
    /// [`ServiceKey`](super::ServiceKey) (a service VIP and port) → [`ServiceRoute`](super::ServiceRoute):
    /// the L4 route the controller pushed for it.
    pub const SERVICE_ROUTES: &str = "SERVICE_ROUTES";
    /// [`PolicyKey`](super::PolicyKey) (an enrolled pod's address, port or 0 for all) →
    /// [`PolicyVerdict`](super::PolicyVerdict): connections AuthorizationPolicy refuses outright.
    pub const L4_POLICY: &str = "L4_POLICY";
}

/// Capacity of [`names::SERVICE_ROUTES`] (VIP:port pairs).
pub const MAX_SERVICE_ROUTES: u32 = 65536;
/// Capacity of [`names::L4_POLICY`].
pub const MAX_L4_POLICY: u32 = 16384;
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

/// Key of [`names::L4_POLICY`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub ip: [u32; 4],
    /// 0: every port.
    pub port: u16,
    pub family: u16,
}

/// Value of [`names::L4_POLICY`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyVerdict {
    /// `VERDICT_*`.
    pub verdict: u32,
    pub _pad: u32,
}

/// Refuse the connection (no rule of any policy could allow it).
pub const VERDICT_DENY: u32 = 1;

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

/// How deep the connect hook looks up a socket's cgroup ancestry for an enrolled cgroup
/// (a pod's containers are children of the pod cgroup that is enrolled).
pub const MAX_CGROUP_DEPTH: u32 = 12;

/// Value of [`names::ENROLLED_CGROUPS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EnrolledCgroup {
    /// Port on 127.0.0.1 inside the pod's network namespace where the agent accepts redirected
    /// outbound connections (15001, as ztunnel uses).
    pub outbound_port: u16,
    pub _pad: u16,
    /// Flags, see `ENROLLED_*`; reserved for later use.
    pub flags: u32,
}

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
    pub _pad: u32,
    /// The cgroup that was matched in [`names::ENROLLED_CGROUPS`].
    pub cgroup_id: u64,
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
    /// sk_lookup refused an inbound connection that L4 policy denies.
    InboundDenied = 9,
}

impl Counter {
    pub const ALL: [Counter; 10] = [
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
        }
    }
}

pub const NUM_COUNTERS: u32 = 16;

#[cfg(feature = "user")]
mod user {
    use super::*;
    use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

    // SAFETY: plain #[repr(C)] data with explicit padding, every bit pattern valid.
    unsafe impl aya::Pod for EnrolledCgroup {}
    unsafe impl aya::Pod for ConnectionKey {}
    unsafe impl aya::Pod for OriginalDst {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for ListenerKey {}
    unsafe impl aya::Pod for SocketKey {}
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceRoute {}
    unsafe impl aya::Pod for PolicyKey {}
    unsafe impl aya::Pod for PolicyVerdict {}

    impl ServiceKey {
        pub fn new(addr: SocketAddr) -> Self {
            let (ip, family) = ip_to_words(addr.ip());
            ServiceKey { ip, port: addr.port(), family }
        }
        pub fn socket_addr(&self) -> Option<SocketAddr> {
            words_to_ip(self.ip, self.family).map(|ip| SocketAddr::new(ip, self.port))
        }
    }

    impl PolicyKey {
        pub fn new(ip: IpAddr, port: u16) -> Self {
            let (ip, family) = ip_to_words(ip);
            PolicyKey { ip, port, family }
        }
        pub fn ip_addr(&self) -> Option<IpAddr> {
            words_to_ip(self.ip, self.family)
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
        use super::*;

        #[test]
        fn layouts_have_no_implicit_padding() {
            assert_eq!(core::mem::size_of::<EnrolledCgroup>(), 8);
            assert_eq!(core::mem::size_of::<ConnectionKey>(), 32);
            assert_eq!(core::mem::size_of::<OriginalDst>(), 32);
            assert_eq!(core::mem::size_of::<Settings>(), 8);
            assert_eq!(core::mem::size_of::<ListenerKey>(), 20);
            assert_eq!(core::mem::size_of::<SocketKey>(), 48);
            assert_eq!(core::mem::size_of::<ServiceKey>(), 20);
            assert_eq!(core::mem::size_of::<RouteDestination>(), 16);
            assert_eq!(core::mem::size_of::<ServiceRoute>(), 16 + 16 * MAX_ROUTE_DESTINATIONS);
            assert_eq!(core::mem::size_of::<PolicyKey>(), 20);
            assert_eq!(core::mem::size_of::<PolicyVerdict>(), 8);
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
pub use user::{ip_to_words, words_to_ip};
