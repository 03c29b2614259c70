//! Keeps the enrolled pods on this node in line with the workloads a source reports: enrolls new ones,
//! un-enrolls the ones that left, live and without touching the pods.
//!
//! Enroll, in this order so that no connection meets a half-built path: find the pod's netns → open the
//! agent's listeners in it → register the inbound listener and attach sk_lookup → put the netns in
//! ENROLLED_NETNS (keyed by its cookie, so enrollment works whether or not the pod has a cgroup v2 group
//! of its own). Un-enroll in reverse: map entry and sk_lookup first (new connections go
//! around the agent at once), listeners a moment later (a connect already redirected still lands).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use serde::Serialize;
use tokio::{net::TcpSocket, task::JoinHandle};
use tracing::{info, warn};
use warren_maps::{ENROLLED_NO_SOCKET_ACCELERATION, EnrolledNetns, ListenerKey};

use super::{Netns, discover};
use crate::{
    ebpf::Datapath,
    proxy::{self, ProxyShared, hbone::HBONE_PORT},
    state::{MeshIndex, Pod, Workloads},
};

/// How long listeners of an un-enrolled pod stay open for connects redirected just before.
const UNENROLL_GRACE: Duration = Duration::from_millis(500);

pub struct PortConfig {
    pub outbound: u16,
    pub inbound: u16,
}

struct EnrolledPod {
    key: String,
    netns_cookie: u64,
    cgroup: Option<PathBuf>,
    ips: Vec<IpAddr>,
    listener_keys: Vec<ListenerKey>,
    listeners: Vec<JoinHandle<()>>,
}

/// What `inspect workloads` shows of a pod.
#[derive(Debug, Clone, Serialize)]
pub struct PodStatus {
    pub pod: String,
    pub uid: String,
    pub ips: Vec<IpAddr>,
    pub enrolled: bool,
    /// The pod's own cgroup v2 group; none under a cgroup v1 kubelet (a hybrid host).
    pub cgroup: Option<PathBuf>,
    /// The cookie of the pod's netns: its key in ENROLLED_NETNS.
    pub netns_cookie: Option<u64>,
    /// Why a pod that should be enrolled is not (yet).
    pub error: Option<String>,
}

pub struct InpodManager {
    datapath: Arc<Mutex<Datapath>>,
    node_name: String,
    ports: PortConfig,
    cgroup2_mount: PathBuf,
    shared: ProxyShared,
    enrolled: BTreeMap<String, EnrolledPod>,
    status: Arc<Mutex<Vec<PodStatus>>>,
    /// The cookie of the agent's own (the node's) netns, which is never enrolled.
    host_netns_cookie: Option<u64>,
}

impl InpodManager {
    pub fn new(
        datapath: Arc<Mutex<Datapath>>,
        node_name: String,
        ports: PortConfig,
        cgroup2_mount: PathBuf,
        shared: ProxyShared,
    ) -> Self {
        let host_netns_cookie = TcpSocket::new_v4().and_then(|s| crate::sys::socket_netns_cookie(&s)).ok();
        InpodManager {
            datapath,
            node_name,
            ports,
            cgroup2_mount,
            shared,
            enrolled: BTreeMap::new(),
            status: Arc::default(),
            host_netns_cookie,
        }
    }

    /// A live view of every known pod's enrollment, for the admin endpoint.
    pub fn status_handle(&self) -> Arc<Mutex<Vec<PodStatus>>> {
        self.status.clone()
    }

    /// Brings enrollment in line with `workloads`. Pods that cannot be enrolled yet (no process found)
    /// are reported in the status and retried on the next call.
    pub async fn reconcile(&mut self, workloads: &Workloads) {
        *self.shared.mesh.write().unwrap() = MeshIndex::new(workloads);
        let wanted: BTreeMap<&str, &Pod> = workloads
            .enrolled_pods()
            .into_iter()
            .filter(|p| p.is_on(&self.node_name))
            .map(|p| (p.uid.as_str(), p))
            .collect();
        let leaving: Vec<String> = self.enrolled.keys().filter(|uid| !wanted.contains_key(uid.as_str())).cloned().collect();
        for uid in leaving {
            self.unenroll(&uid);
        }
        let mut errors = BTreeMap::new();
        for (uid, pod) in &wanted {
            if self.enrolled.contains_key(*uid) {
                continue;
            }
            if let Err(e) = self.enroll(pod).await {
                warn!(pod = %pod.key(), uid, "cannot enroll: {e:#}");
                errors.insert(uid.to_string(), format!("{e:#}"));
            }
        }
        *self.status.lock().unwrap() = workloads
            .pods
            .iter()
            .filter(|p| p.is_on(&self.node_name))
            .map(|p| {
                let enrolled = self.enrolled.get(&p.uid);
                PodStatus {
                    pod: p.key(),
                    uid: p.uid.clone(),
                    ips: p.ips.clone(),
                    enrolled: enrolled.is_some(),
                    cgroup: enrolled.and_then(|e| e.cgroup.clone()),
                    netns_cookie: enrolled.map(|e| e.netns_cookie),
                    error: errors.get(&p.uid).cloned(),
                }
            })
            .collect();
    }

    /// Removes what an earlier agent left for pods that are not enrolled now (call after the first
    /// reconcile).
    pub fn drop_stale_state(&self) -> Result<()> {
        let netns: BTreeSet<u64> = self.enrolled.values().map(|p| p.netns_cookie).collect();
        let uids: BTreeSet<String> = self.enrolled.keys().cloned().collect();
        let mut datapath = self.datapath.lock().unwrap();
        datapath.retain_enrolled(&netns)?;
        datapath.retain_pod_links(&uids);
        Ok(())
    }

    async fn enroll(&mut self, pod: &Pod) -> Result<()> {
        let location = discover::find_pod(&pod.uid, std::path::Path::new("/proc"), &self.cgroup2_mount)?;
        let label = PathBuf::from(format!("/proc/{}/ns/net", location.pid));
        let netns = Arc::new(Netns::from_file(location.netns, &label)?);
        let key = Arc::new(pod.key());
        let has_v6 = pod.ips.iter().any(IpAddr::is_ipv6);

        // Outbound: loopback listeners for redirected connects.
        let mut outbound = vec![bind(&netns, SocketAddr::new(Ipv4Addr::LOCALHOST.into(), self.ports.outbound)).await?];
        if has_v6 {
            outbound.push(bind(&netns, SocketAddr::new(Ipv6Addr::LOCALHOST.into(), self.ports.outbound)).await?);
        }
        // Inbound: any-address listeners that sk_lookup assigns connections to, whatever their port.
        let inbound_v4 = bind(&netns, SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), self.ports.inbound)).await?;
        let inbound_v6 = if has_v6 {
            Some(bind(&netns, SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), self.ports.inbound)).await?)
        } else {
            None
        };
        // HBONE, when the agent has identities to give: the pod's own 15008, presenting its identity.
        let identity = self.shared.hbone.as_ref().map(|pool| pod.identity(pool.certificates().trust_domain()));
        let mut hbone = vec![];
        if identity.is_some() {
            hbone.push(bind(&netns, SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), HBONE_PORT)).await?);
            if has_v6 {
                hbone.push(bind(&netns, SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), HBONE_PORT)).await?);
            }
        }
        let netns_cookie = crate::sys::socket_netns_cookie(&outbound[0]).context("SO_NETNS_COOKIE")?;
        // A pod in the node's own netns (hostNetwork, which the enrollment rules already leave out) must
        // never be enrolled: every connect of the node, the agent's own included, would be redirected.
        anyhow::ensure!(
            Some(netns_cookie) != self.host_netns_cookie,
            "pod {} shares the node's network namespace: not enrolled",
            pod.key()
        );

        let mut listener_keys = vec![];
        {
            let mut datapath = self.datapath.lock().unwrap();
            for ip in &pod.ips {
                let listener = if ip.is_ipv4() { Some(&inbound_v4) } else { inbound_v6.as_ref() };
                if let Some(listener) = listener {
                    let listener_key = ListenerKey::new(*ip);
                    datapath.add_inbound_listener(listener_key, listener)?;
                    listener_keys.push(listener_key);
                }
            }
            datapath.attach_inbound_capture(netns.file(), &pod.uid)?;
            datapath.enroll(netns_cookie, EnrolledNetns { outbound_port: self.ports.outbound, _pad: 0, flags: enrolled_flags(pod) })?;
        }

        let mut listeners = vec![];
        // One pool of upstream connections per pod, for its own requests and for it as a gateway.
        let upstreams = proxy::http::Upstreams::new(netns.clone(), key.clone(), identity.clone(), self.shared.clone());
        for listener in outbound {
            listeners.push(tokio::spawn(proxy::outbound::serve(
                listener,
                netns_cookie,
                netns.clone(),
                key.clone(),
                identity.clone(),
                upstreams.clone(),
                self.shared.clone(),
            )));
        }
        let gateway = Arc::new(proxy::gateway::GatewayPod {
            pod: key.clone(),
            upstreams,
            netns: netns.clone(),
            identity: identity.clone(),
        });
        let pod_ips = Arc::new(pod.ips.clone());
        for listener in hbone {
            let identity = identity.clone().expect("HBONE listeners only with an identity");
            listeners.push(tokio::spawn(proxy::inbound::serve_hbone(
                listener,
                netns.clone(),
                key.clone(),
                identity,
                pod_ips.clone(),
                gateway.clone(),
                self.shared.clone(),
            )));
        }
        for listener in std::iter::once(inbound_v4).chain(inbound_v6) {
            listeners.push(tokio::spawn(proxy::inbound::serve(
                listener,
                netns.clone(),
                key.clone(),
                gateway.clone(),
                self.shared.clone(),
            )));
        }
        let cgroup = location.cgroup.as_ref().map(|c| c.display().to_string());
        info!(pod = %key, uid = %pod.uid, netns_cookie, cgroup = cgroup.as_deref().unwrap_or("(none of its own)"), "pod enrolled");
        self.enrolled.insert(
            pod.uid.clone(),
            EnrolledPod {
                key: key.to_string(),
                netns_cookie,
                cgroup: location.cgroup,
                ips: pod.ips.clone(),
                listener_keys,
                listeners,
            },
        );
        Ok(())
    }

    fn unenroll(&mut self, uid: &str) {
        let Some(pod) = self.enrolled.remove(uid) else { return };
        {
            let mut datapath = self.datapath.lock().unwrap();
            if let Err(e) = datapath.unenroll(pod.netns_cookie) {
                warn!(pod = %pod.key, "{e:#}");
            }
            datapath.detach_inbound_capture(uid);
            for key in &pod.listener_keys {
                datapath.remove_inbound_listener(key);
            }
        }
        info!(pod = %pod.key, uid, ips = ?pod.ips, "pod un-enrolled");
        let listeners = pod.listeners;
        tokio::spawn(async move {
            tokio::time::sleep(UNENROLL_GRACE).await;
            for listener in listeners {
                listener.abort();
            }
        });
    }

    /// Un-enrolls every pod (the node is being left for good: see `uninstall`).
    pub fn unenroll_all(&mut self) {
        let uids: Vec<String> = self.enrolled.keys().cloned().collect();
        for uid in uids {
            self.unenroll(&uid);
        }
    }

    /// Stops accepting new connections in every pod (connections in flight continue).
    pub fn stop_listening(&mut self) {
        for pod in self.enrolled.values() {
            for listener in &pod.listeners {
                listener.abort();
            }
        }
    }
}

/// Binds (in the pod's netns) and listens on `addr`; IPv6 listeners are v6-only so that the v4 and v6
/// listeners on the same port coexist.
async fn bind(netns: &Netns, addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    let socket = netns
        .run(move || -> std::io::Result<TcpSocket> {
            let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
            socket.set_reuseaddr(true)?;
            if addr.is_ipv6() {
                let on: libc::c_int = 1;
                let rc = unsafe {
                    libc::setsockopt(
                        socket.as_raw_fd(),
                        libc::IPPROTO_IPV6,
                        libc::IPV6_V6ONLY,
                        (&on as *const libc::c_int).cast(),
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    )
                };
                if rc != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            socket.bind(addr)?;
            Ok(socket)
        })
        .await?
        .with_context(|| format!("binding {addr} in the pod's netns"))?;
    Ok(socket.listen(4096)?)
}

/// The pod's [`EnrolledNetns::flags`]: its opt-out of socket acceleration.
fn enrolled_flags(pod: &Pod) -> u32 {
    match warren_api::workloads::socket_acceleration(pod) {
        Ok(true) => 0,
        Ok(false) => ENROLLED_NO_SOCKET_ACCELERATION,
        Err(problem) => {
            warn!("{problem}; socket acceleration stays on for it");
            0
        }
    }
}
