//! Socket acceleration of the local legs between workloads and the agent (sockops + sk_msg).
//!
//! Legs: app → agent's outbound listener (loopback, outbound port) and agent → app on inbound (made inside
//! the pod, from the pod's address to itself). Both ends of such a connection go into
//! `LOCAL_SOCKETS`; `sk_msg` then moves each sendmsg straight into the peer socket's receive queue,
//! skipping the TCP/IP stack and loopback device. The sock_ops program also records original
//! destinations (outbound.rs) since one sock_ops program per cgroup serves both.
use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, sk_action::SK_PASS},
    helpers::bpf_get_netns_cookie,
    macros::{sk_msg, sock_ops},
    programs::{SkMsgContext, SockOpsContext},
};
use core::ptr::read_volatile;

use warren_maps::{Counter, SocketKey};

use super::{AF_INET, AF_INET6, LOCAL_SOCKETS, count, outbound::record_original_dst, read_ip6, settings};

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
    let mut key = SocketKey {
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        local_ip,
        remote_ip,
        local_port,
        remote_port,
        family: family as u16,
        _pad: 0,
    };
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
    let (remote_port, local_port) = unsafe { (read_volatile(&(*msg).remote_port), read_volatile(&(*msg).local_port)) };
    // The peer socket's key is this socket's key with the ends swapped.
    let mut peer = SocketKey {
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        local_ip: remote_ip,
        remote_ip: local_ip,
        local_port: u32::from_be(remote_port) as u16,
        remote_port: local_port as u16,
        family: family as u16,
        _pad: 0,
    };
    // Without a peer in the map (e.g. it closed) the message takes the normal path.
    if LOCAL_SOCKETS.redirect_msg(&ctx, &mut peer, BPF_F_INGRESS as u64) == SK_PASS as i64 {
        count(Counter::SkMsgRedirected);
    }
    SK_PASS
}
