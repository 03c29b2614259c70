//! Outbound redirect of enrolled workloads into the node agent.
//!
//! 1. `connect4`/`connect6` (attached at the cgroup v2 root, or the subtree `cgroupAttach` names): a TCP
//!    connect() from a socket whose network namespace is in `ENROLLED_NETNS` is rewritten to the agent's
//!    listener on loopback inside that netns. The destination the workload dialed is stored under the
//!    socket cookie. Keyed by netns rather than cgroup: every pod has a netns of its own on every node
//!    layout, while a cgroup v1 kubelet on a hybrid host leaves all pods in one cgroup v2 group.
//! 2. `track_sockets` (sock_ops ACTIVE_ESTABLISHED, in accelerate.rs): once the client's source port is
//!    known, [`record_original_dst`] re-keys it by (netns cookie, client ip, client port) — what the agent
//!    sees as the peer of the accepted connection — so the agent recovers it with one lookup.
use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie,
    },
    macros::cgroup_sock_addr,
    programs::{SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::{debug, warn};
use warren_maps::{AGENT_SOCKET_MARK, ConnectionKey, Counter, EnrolledNetns, OriginalDst, REFUSED_PORT, ServiceKey};

use super::{AF_INET, AF_INET6, CONNECT_FAULTS, ENROLLED_NETNS, ORIGINAL_DST, ORIGINAL_DST_BY_COOKIE, count};

/// What a connection fault decides for one connect.
enum Fault {
    None,
    Abort,
    /// The agent holds the connection this many milliseconds before connecting upstream.
    Delay(u32),
}

/// Rolls the service's connection fault, if it has one (the shares are parts per million).
#[inline(always)]
fn connect_fault(ip: [u32; 4], port: u16, family: u16) -> Fault {
    let key = ServiceKey { ip, port, family };
    let Some(fault) = (unsafe { CONNECT_FAULTS.get(&key) }) else {
        return Fault::None;
    };
    // SAFETY: a helper without arguments or memory access.
    let roll = || unsafe { bpf_get_prandom_u32() } % 1_000_000;
    if roll() < fault.abort_per_million {
        count(Counter::ConnectAborted);
        return Fault::Abort;
    }
    if fault.delay_ms > 0 && roll() < fault.delay_per_million {
        count(Counter::ConnectDelayed);
        return Fault::Delay(fault.delay_ms);
    }
    Fault::None
}

const SOCK_STREAM: u32 = 1;
/// Return value of cgroup sock_addr programs that lets the syscall proceed.
const ALLOW: i32 = 1;

/// The socket's network namespace and its enrollment, when it is an enrolled pod's and the socket is not
/// one the agent made there (marked [`AGENT_SOCKET_MARK`]: redirected, the agent would dial itself).
#[inline(always)]
fn enrolled_netns(ctx: &SockAddrContext) -> Option<(u64, EnrolledNetns)> {
    // SAFETY: `sk` of a sock_addr program's context is the calling socket (the verifier's PTR_TO_SOCKET),
    // valid for the whole call.
    let mark = unsafe { (*(*ctx.sock_addr).__bindgen_anon_1.sk).mark };
    if mark == AGENT_SOCKET_MARK {
        return None;
    }
    // SAFETY: the helper reads the netns of the socket behind this program's own context.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: a plain hash map lookup; the value is copied out at once.
    let enrolled = unsafe { ENROLLED_NETNS.get(&cookie) }?;
    Some((cookie, *enrolled))
}

/// Stores what the socket dialed; false when the map refused (then the connect must not be redirected).
#[inline(always)]
fn remember(ctx: &SockAddrContext, original: &OriginalDst) -> bool {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if ORIGINAL_DST_BY_COOKIE.insert(&cookie, original, 0).is_err() {
        count(Counter::OriginalDstRecordFailed);
        warn!(ctx, "connect: cannot record original destination, not redirecting cookie={}", cookie);
        return false;
    }
    true
}

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    let addr = unsafe { &mut *ctx.sock_addr };
    if addr.type_ != SOCK_STREAM {
        return ALLOW; // UDP (DNS included) is never touched
    }
    count(Counter::Connect4);
    let Some((netns_cookie, enrolled)) = enrolled_netns(&ctx) else {
        return ALLOW;
    };
    let dst_ip = addr.user_ip4; // network byte order
    // A workload talking to itself over loopback stays local (this also covers the redirect target).
    if u32::from_be(dst_ip) >> 24 == 127 {
        return ALLOW;
    }
    let dst_port = u16::from_be(addr.user_port as u16);
    let delay_ms = match connect_fault([dst_ip, 0, 0, 0], dst_port, AF_INET as u16) {
        Fault::Abort => {
            // To a loopback port nothing listens on: the kernel resets it, connect() gets ECONNREFUSED.
            unsafe {
                core::ptr::write_volatile(&mut addr.user_ip4, u32::to_be(0x7f00_0001));
                core::ptr::write_volatile(&mut addr.user_port, u16::to_be(REFUSED_PORT) as u32);
            }
            return ALLOW;
        }
        Fault::Delay(ms) => ms,
        Fault::None => 0,
    };
    let original = OriginalDst { ip: [dst_ip, 0, 0, 0], port: dst_port, family: AF_INET as u16, delay_ms, netns_cookie };
    if !remember(&ctx, &original) {
        return ALLOW;
    }
    unsafe {
        core::ptr::write_volatile(&mut addr.user_ip4, u32::to_be(0x7f00_0001));
        core::ptr::write_volatile(&mut addr.user_port, u16::to_be(enrolled.outbound_port) as u32);
    }
    count(Counter::Connect4Redirected);
    debug!(
        &ctx,
        "connect4: netns {} dialed {:i}:{}, redirected to 127.0.0.1:{}",
        netns_cookie,
        u32::from_be(dst_ip),
        dst_port,
        enrolled.outbound_port
    );
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    let addr = unsafe { &mut *ctx.sock_addr };
    if addr.type_ != SOCK_STREAM {
        return ALLOW;
    }
    count(Counter::Connect6);
    let Some((netns_cookie, enrolled)) = enrolled_netns(&ctx) else {
        return ALLOW;
    };
    let dst = unsafe { super::read_ip6(&addr.user_ip6) }; // four network-order words
    let is_loopback = dst[0] == 0 && dst[1] == 0 && dst[2] == 0 && dst[3] == u32::to_be(1);
    let is_v4_mapped_loopback = dst[0] == 0 && dst[1] == 0 && dst[2] == u32::to_be(0xffff) && u32::from_be(dst[3]) >> 24 == 127;
    if is_loopback || is_v4_mapped_loopback {
        return ALLOW;
    }
    let dst_port = u16::from_be(addr.user_port as u16);
    let delay_ms = match connect_fault(dst, dst_port, AF_INET6 as u16) {
        Fault::Abort => {
            unsafe {
                core::ptr::write_volatile(&mut addr.user_ip6[0], 0);
                core::ptr::write_volatile(&mut addr.user_ip6[1], 0);
                core::ptr::write_volatile(&mut addr.user_ip6[2], 0);
                core::ptr::write_volatile(&mut addr.user_ip6[3], u32::to_be(1));
                core::ptr::write_volatile(&mut addr.user_port, u16::to_be(REFUSED_PORT) as u32);
            }
            return ALLOW;
        }
        Fault::Delay(ms) => ms,
        Fault::None => 0,
    };
    let original = OriginalDst { ip: dst, port: dst_port, family: AF_INET6 as u16, delay_ms, netns_cookie };
    if !remember(&ctx, &original) {
        return ALLOW;
    }
    unsafe {
        core::ptr::write_volatile(&mut addr.user_ip6[0], 0);
        core::ptr::write_volatile(&mut addr.user_ip6[1], 0);
        core::ptr::write_volatile(&mut addr.user_ip6[2], 0);
        core::ptr::write_volatile(&mut addr.user_ip6[3], u32::to_be(1));
        core::ptr::write_volatile(&mut addr.user_port, u16::to_be(enrolled.outbound_port) as u32);
    }
    count(Counter::Connect6Redirected);
    // The words are in network order, so their in-memory bytes are the address's bytes.
    let dst_bytes: [u8; 16] = unsafe { core::mem::transmute(dst) };
    debug!(
        &ctx,
        "connect6: netns {} dialed [{:i}]:{}, redirected to [::1]:{}",
        netns_cookie,
        dst_bytes,
        dst_port,
        enrolled.outbound_port
    );
    ALLOW
}

/// sockops ACTIVE_ESTABLISHED: move the original destination from the socket cookie to the client tuple.
#[inline(always)]
pub(crate) fn record_original_dst(ctx: &SockOpsContext, family: u32, local_ip: [u32; 4]) {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(original) = (unsafe { ORIGINAL_DST_BY_COOKIE.get(&cookie) }).copied() else {
        return;
    };
    let key = ConnectionKey {
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        ip: local_ip,
        port: ctx.local_port() as u16, // host byte order in bpf_sock_ops
        family: family as u16,
        _pad: 0,
    };
    if ORIGINAL_DST.insert(&key, &original, 0).is_ok() {
        count(Counter::OriginalDstRecorded);
    }
    let _ = ORIGINAL_DST_BY_COOKIE.remove(&cookie);
}
