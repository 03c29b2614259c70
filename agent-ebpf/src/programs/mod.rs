//! Maps shared by the programs, and small helpers. Layouts: the `warren-maps` crate.
mod accelerate;
mod inbound;
mod outbound;

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, SockHash},
};
use warren_maps::{
    AUTHZ_DENIALS_BYTES, AuthzTarget, AuthzVerdict, ConnectFault, ConnectionKey, Counter, EnrolledNetns, ListenerKey,
    MAX_CONNECT_FAULTS, MAX_L4_AUTHZ, MAX_SERVICE_ROUTES, NUM_COUNTERS, OriginalDst, ServiceKey, ServiceRoute, Settings,
    SocketKey,
};

pub(crate) const AF_INET: u32 = warren_maps::AF_INET as u32;
pub(crate) const AF_INET6: u32 = warren_maps::AF_INET6 as u32;

#[map(name = "ENROLLED_NETNS")]
pub(crate) static ENROLLED_NETNS: HashMap<u64, EnrolledNetns> = HashMap::pinned(16384, 0);

/// Short-lived: lives from connect() until the handshake completes (LRU so that connects that never
/// establish cannot fill it).
#[map(name = "ORIGINAL_DST_BY_COOKIE")]
pub(crate) static ORIGINAL_DST_BY_COOKIE: LruHashMap<u64, OriginalDst> = LruHashMap::pinned(65536, 0);

/// Read by the agent on accept. LRU: entries age out instead of needing a close hook on every socket.
#[map(name = "ORIGINAL_DST")]
pub(crate) static ORIGINAL_DST: LruHashMap<ConnectionKey, OriginalDst> = LruHashMap::pinned(65536, 0);

#[map(name = "INBOUND_LISTENERS")]
pub(crate) static INBOUND_LISTENERS: SockHash<ListenerKey> = SockHash::pinned(16384, 0);

#[map(name = "LOCAL_SOCKETS")]
pub(crate) static LOCAL_SOCKETS: SockHash<SocketKey> = SockHash::pinned(131072, 0);

/// Local sockets whose first message found no peer in `LOCAL_SOCKETS` and took the normal TCP path: their
/// later messages take it too (accelerate.rs says why). LRU, so entries of closed sockets age out.
#[map(name = "UNACCELERATED_SOCKETS")]
pub(crate) static UNACCELERATED_SOCKETS: LruHashMap<SocketKey, u8> = LruHashMap::pinned(131072, 0);

#[map(name = "SETTINGS")]
pub(crate) static SETTINGS: Array<Settings> = Array::pinned(1, 0);

/// Written by the agent from the controller's push. (connect4/6 do not translate VIPs: enrolled pods'
/// connections all go to the agent, which picks the endpoint by this route.)
#[map(name = "SERVICE_ROUTES")]
pub(crate) static SERVICE_ROUTES: HashMap<ServiceKey, ServiceRoute> = HashMap::pinned(MAX_SERVICE_ROUTES, 0);

/// AuthorizationPolicy decisions, consulted by sk_lookup before capture: denied connections are refused
/// in the kernel. An LPM trie so that an entry can name a client source prefix (the longest one that
/// matches decides); see `warren_maps::AuthzTarget`. (`BPF_F_NO_PREALLOC` is added by aya, as LPM needs.)
#[map(name = "L4_AUTHZ")]
pub(crate) static L4_AUTHZ: LpmTrie<AuthzTarget, AuthzVerdict> = LpmTrie::pinned(MAX_L4_AUTHZ, 0);

/// One `warren_maps::AuthzDenial` per connection sk_lookup refused; the agent reads it.
#[map(name = "AUTHZ_DENIALS")]
pub(crate) static AUTHZ_DENIALS: RingBuf = RingBuf::pinned(AUTHZ_DENIALS_BYTES, 0);

/// Connection faults (Warren's L4 fault injection), written by the agent from the controller's push.
#[map(name = "CONNECT_FAULTS")]
pub(crate) static CONNECT_FAULTS: HashMap<ServiceKey, ConnectFault> = HashMap::pinned(MAX_CONNECT_FAULTS, 0);

#[map(name = "COUNTERS")]
pub(crate) static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(NUM_COUNTERS, 0);

/// Reads an IPv6 address field of a program context.
///
/// Context fields are read with read_volatile, one load per field at a fixed offset: otherwise LLVM may
/// merge the IPv4 and IPv6 branches' loads, or copy the array through a computed context pointer, which
/// the verifier rejects ("dereference of modified ctx ptr").
///
/// # Safety
/// `words` must point at a readable `[u32; 4]` (a field of the program's context).
#[inline(always)]
pub(crate) unsafe fn read_ip6(words: *const [u32; 4]) -> [u32; 4] {
    let w = words as *const u32;
    // SAFETY: the caller guarantees `words` points at four readable u32s; `add` stays inside them.
    unsafe {
        [
            core::ptr::read_volatile(w),
            core::ptr::read_volatile(w.add(1)),
            core::ptr::read_volatile(w.add(2)),
            core::ptr::read_volatile(w.add(3)),
        ]
    }
}

#[inline(always)]
pub(crate) fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // Per-CPU slot: no other writer, a plain add is exact.
        // SAFETY: get_ptr_mut returned a non-null pointer to this CPU's u64 in COUNTERS, valid for the
        // program's run; nothing else writes it meanwhile (preemption is off while a program runs).
        unsafe { *slot += 1 };
    }
}

/// The agent's settings; all zero (capture ports unknown, acceleration off) until the agent writes them.
#[inline(always)]
pub(crate) fn settings() -> Settings {
    SETTINGS.get(0).copied().unwrap_or_default()
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
