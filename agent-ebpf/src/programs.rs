//! Outbound redirect of enrolled workloads into the node agent.
//!
//! 1. `connect4` (cgroup/connect4): a TCP connect() from a socket whose cgroup (or an ancestor) is in
//!    `ENROLLED_CGROUPS` is rewritten to 127.0.0.1:<outbound_port> — the agent's listener inside the same
//!    network namespace. The destination the workload dialed is stored under the socket cookie.
//! 2. `record_original_dst` (sockops, ACTIVE_ESTABLISHED): once the client's source port is known, the original destination is
//!    re-keyed by (netns cookie, client ip, client port) — exactly what the agent sees as the peer of the
//!    accepted connection — so the agent can recover it with one map lookup.
use aya_ebpf::{
    bindings::BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_netns_cookie,
        bpf_get_socket_cookie,
    },
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{HashMap, LruHashMap, PerCpuArray},
    programs::{SockAddrContext, SockOpsContext},
    EbpfContext,
};
use aya_log_ebpf::{debug, warn};
use warren_maps::{
    ConnectionKey, Counter, EnrolledCgroup, OriginalDst, AF_INET, MAX_CGROUP_DEPTH, NUM_COUNTERS,
};

const SOCK_STREAM: u32 = 1;
/// Return value of cgroup sock_addr programs that lets the syscall proceed.
const ALLOW: i32 = 1;

#[map(name = "ENROLLED_CGROUPS")]
static ENROLLED_CGROUPS: HashMap<u64, EnrolledCgroup> = HashMap::pinned(16384, 0);

/// Short-lived: lives from connect() until the handshake completes (LRU so that connects that never
/// establish cannot fill it).
#[map(name = "ORIGINAL_DST_BY_COOKIE")]
static ORIGINAL_DST_BY_COOKIE: LruHashMap<u64, OriginalDst> = LruHashMap::pinned(65536, 0);

/// Read by the agent on accept. LRU: entries age out instead of needing a close hook on every socket.
#[map(name = "ORIGINAL_DST")]
static ORIGINAL_DST: LruHashMap<ConnectionKey, OriginalDst> = LruHashMap::pinned(65536, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(NUM_COUNTERS, 0);

#[inline(always)]
fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // Per-CPU slot: no other writer, a plain add is exact.
        unsafe { *slot += 1 };
    }
}

/// The enrollment of the calling task's cgroup, or of its nearest enrolled ancestor.
#[inline(always)]
fn enrolled_cgroup() -> Option<(u64, EnrolledCgroup)> {
    let own = unsafe { bpf_get_current_cgroup_id() };
    if let Some(e) = unsafe { ENROLLED_CGROUPS.get(&own) } {
        return Some((own, *e));
    }
    let mut level = 1;
    while level <= MAX_CGROUP_DEPTH {
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if id == 0 || id == own {
            // Past the task's own depth: nothing above matched either.
            return None;
        }
        if let Some(e) = unsafe { ENROLLED_CGROUPS.get(&id) } {
            return Some((id, *e));
        }
        level += 1;
    }
    None
}

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    let addr = unsafe { &mut *ctx.sock_addr };
    if addr.type_ != SOCK_STREAM {
        return ALLOW; // UDP (DNS included) is never touched
    }
    count(Counter::Connect4);
    let Some((cgroup_id, enrolled)) = enrolled_cgroup() else {
        return ALLOW;
    };
    let dst_ip = addr.user_ip4; // network byte order
    // A workload talking to itself over loopback stays local (this also covers the redirect target).
    if u32::from_be(dst_ip) >> 24 == 127 {
        return ALLOW;
    }
    let dst_port = u16::from_be(addr.user_port as u16);
    let original = OriginalDst {
        ip: [dst_ip, 0, 0, 0],
        port: dst_port,
        family: AF_INET,
        _pad: 0,
        cgroup_id,
    };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if ORIGINAL_DST_BY_COOKIE.insert(&cookie, &original, 0).is_err() {
        // Without a recorded destination the agent could not forward: leave the connect alone.
        count(Counter::OriginalDstRecordFailed);
        warn!(&ctx, "connect4: cannot record original destination, not redirecting cookie={}", cookie);
        return ALLOW;
    }
    unsafe {
        core::ptr::write_volatile(&mut addr.user_ip4, u32::to_be(0x7f00_0001));
        core::ptr::write_volatile(&mut addr.user_port, u16::to_be(enrolled.outbound_port) as u32);
    }
    count(Counter::Connect4Redirected);
    debug!(
        &ctx,
        "connect4: cgroup {} dialed {:i}:{}, redirected to 127.0.0.1:{}",
        cgroup_id,
        u32::from_be(dst_ip),
        dst_port,
        enrolled.outbound_port
    );
    ALLOW
}

#[sock_ops]
pub fn record_original_dst(ctx: SockOpsContext) -> u32 {
    if ctx.op() != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB || ctx.family() != AF_INET as u32 {
        return 0;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(original) = (unsafe { ORIGINAL_DST_BY_COOKIE.get(&cookie) }).copied() else {
        return 0;
    };
    let key = ConnectionKey {
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        ip: [ctx.local_ip4(), 0, 0, 0],
        port: ctx.local_port() as u16, // host byte order in bpf_sock_ops
        family: AF_INET,
        _pad: 0,
    };
    if ORIGINAL_DST.insert(&key, &original, 0).is_ok() {
        count(Counter::OriginalDstRecorded);
    }
    let _ = ORIGINAL_DST_BY_COOKIE.remove(&cookie);
    0
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
