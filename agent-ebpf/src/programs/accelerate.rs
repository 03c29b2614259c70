//! Socket acceleration of the local legs between workloads and the agent (sockops + sk_msg).
//!
//! Legs: app → agent's outbound listener (loopback, outbound port) and agent → app on inbound (made inside
//! the pod, from the pod's address to itself). Both ends of such a connection go into
//! `LOCAL_SOCKETS`; `sk_msg` then moves each sendmsg straight into the peer socket's receive queue,
//! skipping the TCP/IP stack and loopback device. The sock_ops program also records original
//! destinations (outbound.rs) since one sock_ops program per cgroup serves both.
//!
//! Ordering. The passive end of a connection joins the map when its handshake completes, which under load
//! can be after the active end has already sent: those first bytes take the normal TCP path into the
//! peer's receive queue. Were later bytes then redirected, the peer would hold data in two queues, and the
//! kernel's sockmap receive path reads its own queue first — bytes out of order, or left unread until the
//! close resets the connection. So each direction decides once, on its first message: a socket whose first
//! message found no peer is recorded in `UNACCELERATED_SOCKETS` and keeps the normal path for good.
use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, sk_action::SK_PASS},
    helpers::bpf_get_netns_cookie,
    macros::{sk_msg, sock_ops},
    programs::{SkMsgContext, SockOpsContext},
};
use core::ptr::read_volatile;

use warren_maps::{Counter, ENROLLED_NO_SOCKET_ACCELERATION, SocketKey};

use super::{
    AF_INET, AF_INET6, ENROLLED_NETNS, LOCAL_SOCKETS, UNACCELERATED_SOCKETS, count, outbound::record_original_dst, read_ip6, settings,
};

const BPF_ANY: u64 = 0;


#[inline(always)]
fn sock_ops_addresses(ctx: &SockOpsContext, family: u32) -> Option<([u32; 4], [u32; 4])> {
    let ops = ctx.ops;
    unsafe {
        match family {
            AF_INET => Some(([read_volatile(&(*ops).local_ip4), 0, 0, 0], [read_volatile(&(*ops).remote_ip4), 0, 0, 0])),
            AF_INET6 => Some((read_ip6(&(*ops).local_ip6), read_ip6(&(*ops).remote_ip6))),
            _ => None,
        }
    }
}

/// A v4-mapped IPv6 address (`::ffff:a.b.c.d`, the peer of a dual-stack `[::]` listener's IPv4 connection)
/// as the IPv4 address it is: the two ends of one connection then key alike whatever socket family each
/// end has (the agent's end is AF_INET, a workload listening on `[::]` holds an AF_INET6 one).
#[inline(always)]
fn unmapped(family: u32, ip: [u32; 4]) -> (u32, [u32; 4]) {
    if family == AF_INET6 && ip[0] == 0 && ip[1] == 0 && ip[2] == u32::to_be(0xffff) {
        (AF_INET, [ip[3], 0, 0, 0])
    } else {
        (family, ip)
    }
}

#[inline(always)]
fn is_loopback(family: u32, ip: &[u32; 4]) -> bool {
    if family == AF_INET {
        u32::from_be(ip[0]) >> 24 == 127
    } else {
        ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && ip[3] == u32::to_be(1)
    }
}

#[sock_ops]
pub fn track_sockets(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        return 0;
    }
    let family = ctx.family();
    let Some((local_ip, remote_ip)) = sock_ops_addresses(&ctx, family) else { return 0 };
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        record_original_dst(&ctx, family, local_ip);
    }
    let ((family, local_ip), (_, remote_ip)) = (unmapped(family, local_ip), unmapped(family, remote_ip));
    let settings = settings();
    if settings.socket_acceleration == 0 {
        return 0;
    }
    let local_port = ctx.local_port() as u16;
    let remote_port = (u32::from_be(ctx.remote_port())) as u16;
    let outbound = settings.outbound_port;
    // Outbound leg: the workload's redirected connection to the agent's loopback listener. Inbound leg:
    // the agent's connection to the workload, made from inside the pod to the pod's own address.
    let outbound_leg = outbound != 0 && (local_port == outbound || remote_port == outbound);
    let inbound_leg = local_ip == remote_ip && !is_loopback(family, &local_ip);
    if !(outbound_leg || inbound_leg) {
        return 0;
    }
    // Only pods in the mesh, and not those whose label opts out.
    // SAFETY: the helper reads the context's socket, which the kernel keeps valid while the program runs.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out at once (the `match` only reads `flags`), before any update of it.
    match unsafe { ENROLLED_NETNS.get(&netns_cookie) } {
        Some(enrolled) if enrolled.flags & ENROLLED_NO_SOCKET_ACCELERATION == 0 => {}
        _ => return 0,
    }
    let mut key = SocketKey {
        netns_cookie,
        local_ip,
        remote_ip,
        local_port,
        remote_port,
        family: family as u16,
        _pad: 0,
    };
    // A record left by an earlier connection with the same addresses must not hold this one back.
    let _ = UNACCELERATED_SOCKETS.remove(&key);
    if LOCAL_SOCKETS.update(&mut key, unsafe { &mut *ctx.ops }, BPF_ANY).is_ok() {
        count(Counter::AcceleratedSocket);
    }
    0
}

#[sk_msg]
pub fn redirect_to_peer(ctx: SkMsgContext) -> u32 {
    let msg = ctx.msg;
    let family = unsafe { read_volatile(&(*msg).family) };
    let addresses = unsafe {
        match family {
            AF_INET => Some(([read_volatile(&(*msg).local_ip4), 0, 0, 0], [read_volatile(&(*msg).remote_ip4), 0, 0, 0])),
            AF_INET6 => Some((read_ip6(&(*msg).local_ip6), read_ip6(&(*msg).remote_ip6))),
            _ => None,
        }
    };
    let Some((local_ip, remote_ip)) = addresses else { return SK_PASS };
    let ((family, local_ip), (_, remote_ip)) = (unmapped(family, local_ip), unmapped(family, remote_ip));
    let (remote_port, local_port) = unsafe { (read_volatile(&(*msg).remote_port), read_volatile(&(*msg).local_port)) };
    // SAFETY: as in track_sockets: the context's socket is valid while the program runs.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let (local_port, remote_port) = (local_port as u16, u32::from_be(remote_port) as u16);
    let own = SocketKey { netns_cookie, local_ip, remote_ip, local_port, remote_port, family: family as u16, _pad: 0 };
    // This direction already took the normal path (module docs: never mix the two).
    // SAFETY: only whether an entry exists is read, not the value behind the pointer.
    if unsafe { UNACCELERATED_SOCKETS.get(&own) }.is_some() {
        count(Counter::SkMsgPassed);
        return SK_PASS;
    }
    // The peer socket's key is this socket's key with the ends swapped.
    let mut peer = SocketKey {
        netns_cookie,
        local_ip: remote_ip,
        remote_ip: local_ip,
        local_port: remote_port,
        remote_port: local_port,
        family: family as u16,
        _pad: 0,
    };
    if LOCAL_SOCKETS.redirect_msg(&ctx, &mut peer, BPF_F_INGRESS as u64) == SK_PASS as i64 {
        count(Counter::SkMsgRedirected);
    } else {
        // No peer in the map (not established yet, or closed): this message and every later one of this
        // socket take the normal path.
        let _ = UNACCELERATED_SOCKETS.insert(&own, &1, BPF_ANY);
        count(Counter::SkMsgPassed);
    }
    SK_PASS
}
