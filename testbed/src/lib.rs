//! Warren's test substrate: "nodes" and "pods" made of real kernel objects on this machine.
//!
//! ```text
//!  fabric netns:  br0 ──────────────┬──────────────────────┐
//!                                   │ 172.18.0.2           │ 172.18.0.3
//!  node netns:           eth0 ─ cni0 (10.244.0.1)   eth0 ─ cni0 (10.244.1.1)   (ip_forward, routes to peers)
//!                              │          │                 │
//!  pod netns + cgroup:     eth0 10.244.0.2  10.244.0.3     eth0 10.244.1.2
//! ```
//!
//! Every testbed has its own fabric, so testbeds running in parallel can reuse the same addresses; only
//! names (netns, cgroups, bpffs pin dirs) carry a unique id. Dropping the [`Testbed`] — also while a test
//! panics — kills its processes and removes every netns, cgroup and pin directory it made; a testbed whose
//! process died without dropping is swept by the next one.
//!
//! Scenario tests read like the scenario:
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! let bed = warren_testbed::Testbed::new("example")?;
//! let node = bed.add_node("node-1")?;
//! let client = node.add_pod("client", true)?;
//! let server = node.add_pod("server", false)?;
//! server.serve("v1")?;
//! let agent = node.start_agent()?;
//! let result = client.send(server.socket(warren_testbed::ECHO_PORT), 1 << 20)?;
//! assert!(result.ok);
//! # Ok(()) }
//! ```
mod agent;
pub mod app;
pub mod bookinfo;
pub mod otlp;
pub mod prometheus;
pub mod ztunnel;
mod bins;
mod capture;
mod controller;
mod net;
mod privileges;
mod process;

pub use agent::{Agent, AgentOptions, METRICS_PORT, http_get, sum_metric};
pub use app::{
    AppOptions, AppResponse, CallRecord, HttpRequests, HttpResult, Load, LoadReport, ReceivedRequest, Upstream,
};
pub use bins::bin_path;
pub use capture::{Capture, testapp_payload};
pub use controller::{Controller, ControllerOptions};
pub use net::in_netns;
pub use privileges::{check_privileges, in_ci};
pub use process::{Attempt, ConnectLoop, cpu_seconds, rss_anon_mib, rss_mib, HeldConnection, HoldEvent, Process, SendResult, now_ms};

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
};

use anyhow::{Context, Result, bail};

/// Port of warren-testapp's TCP echo server.
pub const ECHO_PORT: u16 = 7000;
/// Port of warren-testapp's HTTP server.
pub const HTTP_PORT: u16 = 8080;
/// Port of warren-testapp's sink ([`Pod::serve_with_sink`]): reads to the end, answers the count.
pub const SINK_PORT: u16 = 7001;

/// Polls `check` every 20 ms until it returns `Some` (that value) or `timeout` passes (`None`): the one
/// wait for "the system gets there" in scenarios, instead of hand-written deadline loops.
pub fn eventually<T>(timeout: std::time::Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Name prefix of every netns and cgroup a testbed creates.
const PREFIX: &str = "wrn";
/// cgroup (under the cgroup2 mount) that holds all testbeds' cgroups.
const CGROUP_PARENT: &str = "warren-testbed";
/// bpffs directory that holds all testbeds' agents' pin dirs.
pub const PIN_PARENT: &str = "/sys/fs/bpf/warren-testbed";

/// Skips the calling test (returns) with a clear message when this machine cannot run privileged
/// tests (root, cgroup2, netns, bpf); under `CI=true` it fails instead, since CI must run them all.
/// In a test that returns a value, give what it returns when skipped: `require_privileges!(Ok(()))`.
#[macro_export]
macro_rules! require_privileges {
    () => {
        $crate::require_privileges!(())
    };
    ($skipped:expr) => {
        if let Err(reason) = $crate::check_privileges() {
            if $crate::in_ci() {
                panic!("CI=true, but this test cannot run here: {reason}");
            }
            eprintln!("SKIPPED (needs root, BPF, cgroup2 and netns): {reason}");
            return $skipped;
        }
    };
}

/// A set of nodes and pods. Dropping it tears everything down.
pub struct Testbed {
    inner: Arc<Inner>,
}

struct Inner {
    id: String,
    fabric: String,
    cgroup: PathBuf,
    state_dir: PathBuf,
    nodes: Mutex<Vec<NodeRecord>>,
    processes: Mutex<Vec<Arc<Mutex<std::process::Child>>>>,
    extra_netns: Mutex<Vec<String>>,
    /// Listening sockets of host-port forwarders, shut down on teardown (they pin their netns).
    forwarders: Mutex<Vec<std::net::TcpListener>>,
    /// Every pod of every node, with its node and whether it is enrolled: the workloads file all agents
    /// read (each enrolls its own node's pods and routes to the others').
    pods: Mutex<Vec<(String, Pod, bool)>>,
    /// Istio PeerAuthentication objects applied to the testbed, as users write them.
    peer_authentications: Mutex<Vec<serde_json::Value>>,
}

struct NodeRecord {
    name: String,
    netns: String,
    pods: Vec<String>,
}

/// A node: a netns with a bridge for its pods, an uplink to the fabric, and a cgroup for its pods.
#[derive(Clone)]
pub struct Node {
    bed: Arc<Inner>,
    pub name: String,
    pub index: u8,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub cgroup: PathBuf,
    pub ip6: Ipv6Addr,
}

/// A pod: its own netns (eth0 on the node's bridge, lo up, IPv4 and IPv6) and its own cgroup
/// `pod<uid>` under the node's (as kubelet names them), with a pause process in it, so the agent finds
/// it by UID in /proc like on a real node. Or laid out as a cgroup v1 kubelet does on a hybrid host
/// ([`Node::add_pod_v1_kubelet`]): `pod<uid>` only in a cgroup v1 hierarchy, its cgroup v2 group one that
/// all such pods of the node share.
#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
    /// The pod's cgroup v2 group: its own, or the node's shared one for a cgroup v1 kubelet's pod.
    pub cgroup: PathBuf,
    /// The v1 group naming the pod, for a cgroup v1 kubelet's pod.
    pub v1_cgroup: Option<PathBuf>,
    bed_processes: Arc<Inner>,
}

/// How a pod's cgroups are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CgroupLayout {
    /// A cgroup v2 group of its own (a cgroup v2 kubelet, kind).
    OwnV2,
    /// Named only in a cgroup v1 hierarchy, in a v2 group shared with the node's other such pods.
    V1Kubelet,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Testbed").field("id", &self.id).finish()
    }
}

static SEQUENCE: AtomicU32 = AtomicU32::new(0);

impl Testbed {
    /// Creates an empty testbed (a fabric netns with a bridge). `label` only helps humans reading names.
    pub fn new(label: &str) -> Result<Testbed> {
        check_privileges().map_err(anyhow::Error::msg)?;
        sweep_stale();
        let id = format!("{}-{}-{}", PREFIX, std::process::id(), SEQUENCE.fetch_add(1, Ordering::Relaxed));
        let cgroup = cgroup2_root()?.join(CGROUP_PARENT).join(&id);
        fs::create_dir_all(&cgroup).with_context(|| format!("creating cgroup {}", cgroup.display()))?;
        let state_dir = std::env::temp_dir().join("warren-testbed").join(&id);
        fs::create_dir_all(&state_dir)?;
        fs::write(state_dir.join("label"), label)?;
        let fabric = format!("{id}-fabric");
        let inner = Arc::new(Inner {
            id,
            fabric: fabric.clone(),
            cgroup,
            state_dir,
            nodes: Mutex::default(),
            processes: Mutex::default(),
            extra_netns: Mutex::new(vec![fabric.clone()]),
            forwarders: Mutex::default(),
            pods: Mutex::default(),
            peer_authentications: Mutex::default(),
        });
        let bed = Testbed { inner };
        net::add_netns(&fabric)?;
        net::ip(&["-n", &fabric, "link", "add", "br0", "type", "bridge"])?;
        net::ip(&["-n", &fabric, "link", "set", "br0", "up"])?;
        Ok(bed)
    }

    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// Directory for this testbed's files (configs, logs); removed on drop.
    pub fn state_dir(&self) -> &Path {
        &self.inner.state_dir
    }

    /// Adds a node: netns `…-<name>`, uplink 172.18.0.<index+2> on the fabric, pod bridge cni0 with
    /// 10.244.<index>.1/24, routes to every other node's pod range.
    pub fn add_node(&self, name: &str) -> Result<Node> {
        let mut nodes = self.inner.nodes.lock().unwrap();
        let index = u8::try_from(nodes.len()).context("too many nodes")?;
        if index > 200 {
            bail!("too many nodes");
        }
        let netns = format!("{}-{name}", self.inner.id);
        let ip = Ipv4Addr::new(172, 18, 0, index + 2);
        let ip6: Ipv6Addr = format!("fd00:172:18::{:x}", index + 2).parse()?;
        net::add_netns(&netns)?;
        nodes.push(NodeRecord { name: name.to_string(), netns: netns.clone(), pods: vec![] });
        let fabric = &self.inner.fabric;
        let uplink = format!("n{index}");
        net::ip(&["-n", fabric, "link", "add", &uplink, "type", "veth", "peer", "name", "eth0", "netns", &netns])?;
        net::ip(&["-n", fabric, "link", "set", &uplink, "master", "br0", "up"])?;
        net::ip(&["-n", &netns, "addr", "add", &format!("{ip}/16"), "dev", "eth0"])?;
        net::ip(&["-n", &netns, "addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"])?;
        net::ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        net::ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        net::ip(&["-n", &netns, "link", "add", "cni0", "type", "bridge"])?;
        net::ip(&["-n", &netns, "addr", "add", &format!("10.244.{index}.1/24"), "dev", "cni0"])?;
        net::ip(&["-n", &netns, "addr", "add", &format!("fd00:10:244:{index:x}::1/64"), "dev", "cni0", "nodad"])?;
        net::ip(&["-n", &netns, "link", "set", "cni0", "up"])?;
        net::sysctl_in(&netns, "net/ipv4/ip_forward", "1")?;
        net::sysctl_in(&netns, "net/ipv6/conf/all/forwarding", "1")?;
        // Routes between this node and every earlier one, both ways.
        for (other_index, other) in nodes.iter().enumerate().take(index as usize) {
            let other_ip = Ipv4Addr::new(172, 18, 0, other_index as u8 + 2);
            let other_ip6 = format!("fd00:172:18::{:x}", other_index + 2);
            net::ip(&["-n", &netns, "route", "add", &format!("10.244.{other_index}.0/24"), "via", &other_ip.to_string()])?;
            net::ip(&["-n", &other.netns, "route", "add", &format!("10.244.{index}.0/24"), "via", &ip.to_string()])?;
            net::ip(&["-n", &netns, "route", "add", &format!("fd00:10:244:{other_index:x}::/64"), "via", &other_ip6])?;
            net::ip(&["-n", &other.netns, "route", "add", &format!("fd00:10:244:{index:x}::/64"), "via", &ip6.to_string()])?;
        }
        let cgroup = self.inner.cgroup.join(name);
        fs::create_dir_all(&cgroup).with_context(|| format!("creating cgroup {}", cgroup.display()))?;
        Ok(Node {
            bed: self.inner.clone(),
            name: name.to_string(),
            index,
            netns,
            ip,
            ip6,
            cgroup,
        })
    }

    /// The testbed's certificate authority (made on first use): root and key PEM files an agent with
    /// `AgentOptions::mtls` signs its pods' certificates with.
    pub fn ca_files(&self) -> Result<(PathBuf, PathBuf)> {
        ca_files(&self.inner)
    }

    /// Applies an Istio PeerAuthentication (YAML as users write it); running agents follow live.
    pub fn apply_peer_authentication(&self, yaml: &str) -> Result<()> {
        let object: serde_json::Value = serde_yaml::from_str(yaml)?;
        self.inner.peer_authentications.lock().unwrap().push(object);
        let pods = self.inner.pods.lock().unwrap();
        write_workloads(&self.inner, &pods)
    }

    /// Starts warren-controller in the host's netns with the testbed's CA; waits until it serves pushes.
    pub fn start_controller(&self, options: ControllerOptions) -> Result<Controller> {
        Controller::start(self, options)
    }

    /// Starts capturing every frame between the nodes.
    pub fn capture_fabric(&self) -> Result<Capture> {
        Capture::start(&self.inner.fabric)
    }

}

impl Node {
    /// Adds a pod on this node (enrolled or not), with eth0 on the node's bridge and lo up, and a pause
    /// process in its cgroup. A running agent picks it up from the workloads file.
    pub fn add_pod(&self, name: &str, enrolled: bool) -> Result<Pod> {
        self.add_pod_with_uid(name, enrolled, None)
    }

    /// [`Node::add_pod`] in Kubernetes namespace `namespace` (default: `default`): the workloads file
    /// lists it there (and the namespace as enrolled), so its identity is
    /// spiffe://cluster.local/ns/<namespace>/sa/<name>. Pod names stay unique per node (they name the netns).
    pub fn add_pod_in(&self, namespace: &str, name: &str, enrolled: bool) -> Result<Pod> {
        self.add_pod_full(namespace, name, enrolled, None, CgroupLayout::OwnV2)
    }

    /// [`Node::add_pod`] laid out as a cgroup v1 kubelet on a hybrid host lays out its pods: `pod<uid>` in
    /// a cgroup v1 hierarchy (`pids`), and as its cgroup v2 group `<node>/containerd`, which every such
    /// pod of the node shares (the runtime's service group). Fails where no v1 hierarchy is mounted.
    pub fn add_pod_v1_kubelet(&self, name: &str, enrolled: bool) -> Result<Pod> {
        self.add_pod_full("default", name, enrolled, None, CgroupLayout::V1Kubelet)
    }

    /// [`Node::add_pod`] with a given UID (e.g. the UID the API server gave a Pod object).
    pub fn add_pod_with_uid(&self, name: &str, enrolled: bool, uid: Option<&str>) -> Result<Pod> {
        self.add_pod_full("default", name, enrolled, uid, CgroupLayout::OwnV2)
    }

    fn add_pod_full(
        &self,
        namespace: &str,
        name: &str,
        enrolled: bool,
        uid: Option<&str>,
        layout: CgroupLayout,
    ) -> Result<Pod> {
        let mut pods = self.bed.pods.lock().unwrap();
        let on_node = pods.iter().filter(|(node, _, _)| *node == self.name).count();
        let host = u8::try_from(on_node + 2).ok().filter(|h| *h < 250).context("too many pods")?;
        let netns = format!("{}-{name}", self.netns);
        let ip = Ipv4Addr::new(10, 244, self.index, host);
        let ip6: Ipv6Addr = format!("fd00:10:244:{:x}::{:x}", self.index, host).parse()?;
        let uid = uid.map(str::to_string).unwrap_or_else(|| pod_uid(self.index, host));
        net::add_netns(&netns)?;
        {
            let mut nodes = self.bed.nodes.lock().unwrap();
            if let Some(n) = nodes.iter_mut().find(|n| n.netns == self.netns) {
                n.pods.push(netns.clone());
            }
        }
        let host_side = format!("veth{host}");
        net::ip(&["-n", &self.netns, "link", "add", &host_side, "type", "veth", "peer", "name", "eth0", "netns", &netns])?;
        net::ip(&["-n", &self.netns, "link", "set", &host_side, "master", "cni0", "up"])?;
        net::ip(&["-n", &netns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        net::ip(&["-n", &netns, "addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"])?;
        net::ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        // `ip netns add` leaves lo down; the redirect targets 127.0.0.1 and ::1 need it.
        net::ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        net::ip(&["-n", &netns, "route", "add", "default", "via", &format!("10.244.{}.1", self.index)])?;
        net::ip(&["-n", &netns, "-6", "route", "add", "default", "via", &format!("fd00:10:244:{:x}::1", self.index)])?;
        let (cgroup, v1_cgroup) = match layout {
            CgroupLayout::OwnV2 => (self.cgroup.join(format!("pod{uid}")), None),
            CgroupLayout::V1Kubelet => {
                let v1 = v1_root()?.join(&self.bed.id).join(&self.name).join(format!("pod{uid}"));
                fs::create_dir_all(&v1).with_context(|| format!("creating cgroup {}", v1.display()))?;
                (self.cgroup.join("containerd"), Some(v1))
            }
        };
        fs::create_dir_all(&cgroup).with_context(|| format!("creating cgroup {}", cgroup.display()))?;
        let pod = Pod {
            name: name.to_string(),
            namespace: namespace.to_string(),
            uid,
            netns,
            ip,
            ip6,
            cgroup,
            v1_cgroup,
            bed_processes: self.bed.clone(),
        };
        // The pod's "pause container": the process the agent finds the pod through.
        let mut pause = std::process::Command::new(bin_path("warren-testapp")?);
        pause.arg("pause");
        pod.spawn(pause)?;
        pods.push((self.name.clone(), pod.clone(), enrolled));
        write_workloads(&self.bed, &pods)?;
        Ok(pod)
    }

    pub fn pods(&self) -> Vec<Pod> {
        self.bed.pods.lock().unwrap().iter().filter(|(n, _, _)| *n == self.name).map(|(_, p, _)| p.clone()).collect()
    }

    pub fn is_enrolled(&self, pod: &Pod) -> bool {
        self.bed.pods.lock().unwrap().iter().any(|(_, p, enrolled)| p.uid == pod.uid && *enrolled)
    }

    /// Enrolls or un-enrolls a pod live: flips its `warren.dev/mesh` label in the workloads file.
    pub fn set_enrolled(&self, pod: &Pod, enrolled: bool) -> Result<()> {
        let mut pods = self.bed.pods.lock().unwrap();
        for (_, p, e) in pods.iter_mut() {
            if p.uid == pod.uid {
                *e = enrolled;
            }
        }
        write_workloads(&self.bed, &pods)
    }

    /// Where the agents read the workloads (one file for the whole testbed, as the API server is one).
    pub fn workloads_file(&self) -> PathBuf {
        self.bed.state_dir.join("workloads.yaml")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.bed.state_dir.join(&self.name)
    }

    /// Where this node's agent pins its maps.
    pub fn pin_dir(&self) -> PathBuf {
        pin_dir(&self.bed.id, &self.name)
    }

    /// Starts warren-agent in this node's netns, configured with this node's pods; waits until ready.
    pub fn start_agent(&self) -> Result<Agent> {
        self.start_agent_with(AgentOptions::default())
    }

    pub(crate) fn ca_files(&self) -> Result<(PathBuf, PathBuf)> {
        ca_files(&self.bed)
    }

    pub fn start_agent_with(&self, options: AgentOptions) -> Result<Agent> {
        Agent::start(self, options)
    }

    /// Makes the host's `127.0.0.1:port` reachable at `127.0.0.1:port` inside this node's netns, as a
    /// node reaches its control plane (the local API server listens on the host's loopback only).
    pub fn reach_host_port(&self, port: u16) -> Result<()> {
        let listener = in_netns(&self.netns, || std::net::TcpListener::bind(("127.0.0.1", port)))??;
        self.bed.forwarders.lock().unwrap().push(listener.try_clone()?);
        std::thread::spawn(move || {
            for inbound in listener.incoming() {
                let Ok(inbound) = inbound else { return };
                // This thread is in the test process's own (host) netns.
                let Ok(host) = std::net::TcpStream::connect(("127.0.0.1", port)) else { continue };
                // Small frames (push updates, ACKs) must not wait for delayed ACKs.
                let _ = (host.set_nodelay(true), inbound.set_nodelay(true));
                for (mut from, mut to) in [(inbound.try_clone(), host.try_clone()), (host.try_clone(), inbound.try_clone())]
                    .into_iter()
                    .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
                {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        Ok(())
    }

    /// Spawns a process in this node's netns (not in any pod cgroup), tracked for teardown.
    pub fn spawn(&self, command: std::process::Command) -> Result<Process> {
        Process::spawn(&self.bed, command, &self.netns, &[])
    }

    /// Spawns a process in this node's netns, in cgroup `<node cgroup>/<name>` (created if missing).
    pub fn spawn_in_cgroup(&self, command: std::process::Command, name: &str) -> Result<Process> {
        let cgroup = self.cgroup.join(name);
        fs::create_dir_all(&cgroup).with_context(|| format!("creating cgroup {}", cgroup.display()))?;
        Process::spawn(&self.bed, command, &self.netns, &[&cgroup])
    }
}

/// A pod UID in Kubernetes' format, unique per testbed process.
fn pod_uid(node: u8, host: u8) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}", std::process::id(), SEQUENCE.load(Ordering::Relaxed), node, host, nanos)
}

impl Pod {
    /// `ip:port` of this pod (IPv4).
    pub fn socket(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ip), port)
    }

    /// `[ip6]:port` of this pod.
    pub fn socket6(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V6(self.ip6), port)
    }

    /// Sets a network sysctl in this pod's netns (`net/ipv4/tcp_tw_reuse`, …).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        net::sysctl_in(&self.netns, key, value)
    }

    pub fn netns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.netns)
    }

    /// Opens a TCP connection from this process as if from a process of this pod: the socket is made in
    /// the pod's netns while this process sits in the pod's cgroup (cgroup hooks follow the creating
    /// task's cgroup), then the process moves back. For benchmarks that time the client themselves; any
    /// socket another thread creates meanwhile would count as the pod's too.
    pub fn connect(&self, to: SocketAddr) -> Result<std::net::TcpStream> {
        let own = fs::read_to_string("/proc/self/cgroup")?
            .lines()
            .find_map(|l| l.strip_prefix("0::").map(|p| p.trim().trim_start_matches('/').to_string()))
            .context("this process has no cgroup v2 membership")?;
        let home = cgroup2_root()?.join(own).join("cgroup.procs");
        fs::write(self.cgroup.join("cgroup.procs"), "0").context("joining the pod's cgroup")?;
        let stream = in_netns(&self.netns, || std::net::TcpStream::connect(to));
        fs::write(&home, "0").context("leaving the pod's cgroup")?;
        Ok(stream??)
    }

    /// [`Pod::connect`] with the agent's socket mark ([`warren_maps::AGENT_SOCKET_MARK`]): connect4 leaves it
    /// alone, as it does the agent's own sockets in a pod, so a connection to the pod's own address is a
    /// local leg exactly like the agent's inbound one (IPv4).
    pub fn connect_as_agent(&self, to: std::net::SocketAddrV4) -> Result<std::net::TcpStream> {
        let own = fs::read_to_string("/proc/self/cgroup")?
            .lines()
            .find_map(|l| l.strip_prefix("0::").map(|p| p.trim().trim_start_matches('/').to_string()))
            .context("this process has no cgroup v2 membership")?;
        let home = cgroup2_root()?.join(own).join("cgroup.procs");
        fs::write(self.cgroup.join("cgroup.procs"), "0").context("joining the pod's cgroup")?;
        let stream = in_netns(&self.netns, || marked_connect(to));
        fs::write(&home, "0").context("leaving the pod's cgroup")?;
        Ok(stream??)
    }

    /// Spawns a process inside this pod (its netns and cgroups), tracked for teardown.
    pub fn spawn(&self, command: std::process::Command) -> Result<Process> {
        let cgroups: Vec<&Path> = std::iter::once(self.cgroup.as_path()).chain(self.v1_cgroup.as_deref()).collect();
        Process::spawn(&self.bed_processes, command, &self.netns, &cgroups)
    }

    /// Runs a command inside this pod to completion.
    pub fn run(&self, command: std::process::Command) -> Result<std::process::Output> {
        self.spawn(command)?.wait_with_output()
    }

    /// Starts warren-testapp's echo (7000) and HTTP (8080) servers here, reporting `version`; returns
    /// once both listen.
    pub fn serve(&self, version: &str) -> Result<Process> {
        let mut cmd = std::process::Command::new(bin_path("warren-testapp")?);
        cmd.args(["serve", "--name", &self.name, "--version", version]);
        let mut process = self.spawn(cmd)?;
        process.wait_for_line("ready", std::time::Duration::from_secs(10))?;
        Ok(process)
    }

    /// [`Pod::serve`] with a sink on [`SINK_PORT`] too: each connection is read to its end, then answered
    /// with the byte count (8 bytes, little endian) — for one-way throughput.
    pub fn serve_with_sink(&self, version: &str) -> Result<Process> {
        let mut cmd = std::process::Command::new(bin_path("warren-testapp")?);
        cmd.args(["serve", "--name", &self.name, "--version", version, "--sink-port", &SINK_PORT.to_string()]);
        let mut process = self.spawn(cmd)?;
        process.wait_for_line("ready", std::time::Duration::from_secs(10))?;
        Ok(process)
    }

    /// Starts warren-testapp's echo server on `port` only (its HTTP server takes an ephemeral port): a
    /// workload listening on a second port, for port-level policy. Returns once it listens.
    pub fn serve_echo(&self, port: u16) -> Result<Process> {
        let mut cmd = std::process::Command::new(bin_path("warren-testapp")?);
        cmd.args(["serve", "--name", &self.name, "--echo-port", &port.to_string(), "--http-port", "0"]);
        let mut process = self.spawn(cmd)?;
        process.wait_for_line("ready", std::time::Duration::from_secs(10))?;
        Ok(process)
    }

    /// Starts warren-testapp's application stand-in here ([`app`]: `options.service` `options.version`
    /// on `options.port`, calling `options.calls` per request), reporting this pod's name; returns once it
    /// listens. [`app::received`] reads what it was sent.
    pub fn serve_app(&self, options: &AppOptions) -> Result<Process> {
        let mut cmd = std::process::Command::new(bin_path("warren-testapp")?);
        cmd.args(options.to_args()).args(["--pod", &self.name]);
        let mut process = self.spawn(cmd)?;
        process.wait_for_line("ready", std::time::Duration::from_secs(10))?;
        Ok(process)
    }

    /// Sends `requests` to `to` from inside this pod (warren-testapp http); one result per request, in
    /// order. Requests that got no response are results too (status 0, `error`); fails only when the
    /// client itself did.
    pub fn http(&self, to: SocketAddr, requests: &HttpRequests) -> Result<Vec<HttpResult>> {
        let mut cmd = std::process::Command::new(bin_path("warren-testapp")?);
        cmd.args(requests.to_args(to));
        let out = self.run(cmd)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout.lines().rev().find(|l| l.starts_with('{')).with_context(|| {
            let stderr = String::from_utf8_lossy(&out.stderr);
            format!("warren-testapp http printed no report ({}); stderr: {stderr}", out.status)
        })?;
        let report: app::HttpReport = serde_json::from_str(line).context("warren-testapp http's report")?;
        if report.results.len() != requests.count {
            bail!("{} → {to}: {} results for {} requests", self.name, report.results.len(), requests.count);
        }
        Ok(report.results)
    }

    /// Runs `load` against `to` from inside this pod (warren-testapp load) to the end; its report.
    pub fn load(&self, to: SocketAddr, load: &Load) -> Result<LoadReport> {
        app::load_report(self.spawn_load(to, load)?)
    }

    /// Starts `load` against `to` from inside this pod: its stdout says `measuring` and `measured` around
    /// the counted part (to sample something over just that window); [`app::load_report`] waits for the
    /// report.
    pub fn spawn_load(&self, to: SocketAddr, load: &Load) -> Result<Process> {
        let mut cmd = std::process::Command::new(bin_path("warren-testapp")?);
        cmd.args(load.to_args(to));
        self.spawn(cmd)
    }

    /// Opens `count` connections to `to` from inside this pod, one after another, each with one echo of
    /// `bytes`; returns how long each took, from `connect()` until the echo was back.
    pub fn connect_times(&self, to: SocketAddr, count: usize, bytes: usize) -> Result<Vec<std::time::Duration>> {
        let mut cmd = std::process::Command::new(bin_path("warren-testapp")?);
        cmd.args(["connect-times", "--to", &to.to_string(), "--count", &count.to_string(), "--bytes", &bytes.to_string()]);
        let out = self.run(cmd)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout.lines().rev().find(|l| l.starts_with('{')).with_context(|| {
            format!("connect-times printed no result ({}); stderr: {}", out.status, String::from_utf8_lossy(&out.stderr))
        })?;
        let result: serde_json::Value = serde_json::from_str(line)?;
        if result["ok"] != true {
            bail!("{} → {to}: {}", self.name, result["error"]);
        }
        let micros = result["micros"].as_array().context("no micros")?;
        Ok(micros.iter().filter_map(|m| m.as_u64()).map(std::time::Duration::from_micros).collect())
    }

    /// Opens `count` connections to `to` from inside this pod, one after another, each echoing `bytes`, and
    /// keeps going past failures: what each attempt came to.
    pub fn connect_outcomes(&self, to: SocketAddr, count: usize, bytes: usize) -> Result<ConnectOutcomes> {
        let mut cmd = std::process::Command::new(bin_path("warren-testapp")?);
        cmd.args(["connect-outcomes", "--to", &to.to_string(), "--count", &count.to_string(), "--bytes", &bytes.to_string()]);
        let out = self.run(cmd)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout.lines().rev().find(|l| l.starts_with('{')).with_context(|| {
            format!("connect-outcomes printed no result ({}); stderr: {}", out.status, String::from_utf8_lossy(&out.stderr))
        })?;
        Ok(serde_json::from_str(line)?)
    }

    /// Opens one long-lived connection to `to` from inside this pod: returns once an echo crossed it
    /// (fails if it could not be opened); [`HeldConnection::wait_closed`] reports when it ended. With
    /// `probe`, the client echoes one byte that often ([`HeldConnection::probes`]); without, it sits in a
    /// read, waiting for the server to speak (as a client awaiting a reply).
    pub fn hold_connection(&self, to: SocketAddr, probe: Option<std::time::Duration>) -> Result<HeldConnection> {
        let probe_ms = probe.map_or(0, |p| p.as_millis().max(1)).to_string();
        let mut cmd = std::process::Command::new(bin_path("warren-testapp")?);
        cmd.args(["hold", "--to", &to.to_string(), "--probe-ms", &probe_ms, "--max-ms", "120000"]);
        let process = self.spawn(cmd)?;
        process.wait_for(std::time::Duration::from_secs(10), |out, _| out.contains("\"event\""))?;
        let held = HeldConnection { process };
        match held.events()?.first() {
            Some(HoldEvent { event, .. }) if event == "connected" => Ok(held),
            other => bail!("{} → {to}: the connection did not open: {other:?}", self.name),
        }
    }

    /// Opens `connections` connections to `to` from inside this pod (all open at once), then exchanges
    /// `bytes` on each and checks every echo.
    pub fn send_concurrently(&self, to: SocketAddr, bytes: usize, connections: usize) -> Result<serde_json::Value> {
        let mut cmd = std::process::Command::new(bin_path("warren-testapp")?);
        cmd.args(["send", "--to", &to.to_string(), "--bytes", &bytes.to_string(), "--connections", &connections.to_string()]);
        let out = self.run(cmd)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout.lines().rev().find(|l| l.starts_with('{')).with_context(|| {
            format!("no result ({}); stderr: {}", out.status, String::from_utf8_lossy(&out.stderr))
        })?;
        Ok(serde_json::from_str(line)?)
    }

    /// Starts a client loop in this pod: connect to `to`, exchange 1 KiB, close, every `interval_ms`
    /// for `duration_ms`. [`ConnectLoop::attempts`] reads the results once it finished.
    pub fn connect_loop(&self, to: SocketAddr, interval_ms: u64, duration_ms: u64) -> Result<ConnectLoop> {
        let mut cmd = std::process::Command::new(bin_path("warren-testapp")?);
        cmd.args([
            "loop",
            "--to",
            &to.to_string(),
            "--interval-ms",
            &interval_ms.to_string(),
            "--duration-ms",
            &duration_ms.to_string(),
        ]);
        Ok(ConnectLoop { process: self.spawn(cmd)? })
    }

    /// [`Pod::send`] on a connection kept open for `hold` halfway through (a long-lived connection).
    pub fn send_holding(&self, to: SocketAddr, bytes: usize, hold: std::time::Duration) -> Result<SendResult> {
        let mut cmd = std::process::Command::new(bin_path("warren-testapp")?);
        cmd.args(["send", "--to", &to.to_string(), "--bytes", &bytes.to_string(), "--hold-ms", &hold.as_millis().to_string()]);
        let out = self.run(cmd)?;
        SendResult::parse(&out)
    }

    /// Sends `bytes` pseudo-random bytes to `to` from inside this pod and checks the echo is byte-exact.
    pub fn send(&self, to: SocketAddr, bytes: usize) -> Result<SendResult> {
        let mut cmd = std::process::Command::new(bin_path("warren-testapp")?);
        cmd.args(["send", "--to", &to.to_string(), "--bytes", &bytes.to_string()]);
        let out = self.run(cmd)?;
        SendResult::parse(&out)
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        let inner = &self.inner;
        for process in inner.processes.lock().unwrap().drain(..) {
            process::terminate(&process);
        }
        for listener in inner.forwarders.lock().unwrap().drain(..) {
            // Wakes the accept loop, which then drops its handle.
            unsafe { libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(&listener), libc::SHUT_RDWR) };
        }
        let nodes = std::mem::take(&mut *inner.nodes.lock().unwrap());
        for node in &nodes {
            let _ = std::fs::remove_dir_all(pin_dir(&inner.id, &node.name));
        }
        remove_cgroup_tree(&inner.cgroup);
        if let Ok(v1) = v1_root() {
            remove_v1_tree(&v1.join(&inner.id));
        }
        for node in &nodes {
            for pod in &node.pods {
                net::del_netns(pod);
            }
            net::del_netns(&node.netns);
        }
        for netns in inner.extra_netns.lock().unwrap().drain(..) {
            net::del_netns(&netns);
        }
        let _ = std::fs::remove_dir_all(&inner.state_dir);
    }
}

/// Namespace `default` (and every other namespace a pod is in) is enrolled (`warren.dev/mesh=enabled`); pods that must not be are labelled
/// `warren.dev/mesh=disabled`, the opt-out a user would use. Each pod's service account is its name,
/// so its identity is spiffe://cluster.local/ns/default/sa/<pod>. Written atomically (rename).
fn write_workloads(bed: &Inner, pods: &[(String, Pod, bool)]) -> Result<()> {
    let mut namespaces: Vec<&str> = pods.iter().map(|(_, p, _)| p.namespace.as_str()).chain(["default"]).collect();
    namespaces.sort_unstable();
    namespaces.dedup();
    let namespaces: Vec<_> =
        namespaces.iter().map(|n| serde_json::json!({"name": n, "labels": {"warren.dev/mesh": "enabled"}})).collect();
    let pods: Vec<_> = pods
        .iter()
        .map(|(node, p, enrolled)| {
            let labels = if *enrolled {
                serde_json::json!({"app": p.name})
            } else {
                serde_json::json!({"app": p.name, "warren.dev/mesh": "disabled"})
            };
            serde_json::json!({"name": p.name, "namespace": p.namespace, "uid": p.uid, "ips": [p.ip, p.ip6],
                "labels": labels, "node": node, "serviceAccount": p.name})
        })
        .collect();
    let doc = serde_json::json!({
        "namespaces": namespaces,
        "pods": pods,
        "peerAuthentications": *bed.peer_authentications.lock().unwrap(),
    });
    let path = bed.state_dir.join("workloads.yaml");
    let tmp = path.with_extension("yaml.tmp");
    fs::write(&tmp, serde_yaml::to_string(&doc)?)?;
    fs::rename(&tmp, &path)?;
    Ok(())
}

fn ca_files(bed: &Inner) -> Result<(PathBuf, PathBuf)> {
    let (cert, key) = (bed.state_dir.join("ca.pem"), bed.state_dir.join("ca-key.pem"));
    if !cert.is_file() {
        let ca = warren_identity::CertificateAuthority::generate("cluster.local", std::time::Duration::from_secs(24 * 3600))?;
        fs::write(&key, ca.key_pem())?;
        fs::write(&cert, ca.root_pem())?;
    }
    Ok((cert, key))
}

pub(crate) fn pin_dir(testbed_id: &str, node: &str) -> PathBuf {
    Path::new(PIN_PARENT).join(format!("{testbed_id}-{node}"))
}

pub(crate) fn cgroup2_root() -> Result<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo")?;
    info.lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            if right.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            left.split_whitespace().nth(4).map(PathBuf::from)
        })
        .context("no cgroup2 mount")
}

/// Where the testbed makes cgroup v1 groups: a directory in the `pids` v1 hierarchy, as a hybrid host
/// has it mounted (/sys/fs/cgroup/pids).
fn v1_root() -> Result<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo")?;
    let pids = info.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mut fields = right.split_whitespace();
        let (fstype, options) = (fields.next()?, fields.nth(1)?);
        (fstype == "cgroup" && options.split(',').any(|o| o == "pids")).then(|| left.split_whitespace().nth(4))?
    });
    let pids = pids.context("no cgroup v1 `pids` hierarchy is mounted (a hybrid host has one)")?;
    Ok(Path::new(pids).join(CGROUP_PARENT))
}

/// Removes a cgroup v1 subtree once its processes are gone (the v2 side's cgroup.kill kills them: every
/// such pod's process is also in the testbed's v2 tree).
fn remove_v1_tree(root: &Path) {
    if root.is_dir() {
        remove_dirs_leaves_first(root);
    }
}

/// Kills every process in a cgroup subtree and removes it, leaves first.
fn remove_cgroup_tree(root: &Path) {
    if !root.is_dir() {
        return;
    }
    // cgroup.kill (5.14+) kills the whole subtree at once.
    let _ = fs::write(root.join("cgroup.kill"), "1");
    remove_dirs_leaves_first(root);
}

/// Removes a cgroup directory tree, leaves first, waiting briefly on each for its last processes to exit.
fn remove_dirs_leaves_first(root: &Path) {
    let mut dirs = vec![];
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if let Ok(entries) = fs::read_dir(&dir) {
            stack.extend(entries.flatten().filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false)).map(|e| e.path()));
        }
        dirs.push(dir);
    }
    for dir in dirs.iter().rev() {
        for _ in 0..50 {
            if fs::remove_dir(dir).is_ok() || !dir.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// Removes what testbeds of dead processes left behind (netns, cgroups, pin dirs, state dirs).
fn sweep_stale() {
    let dead = |name: &str| -> bool {
        let mut parts = name.split('-');
        parts.next() == Some(PREFIX)
            && parts.next().and_then(|p| p.parse::<i32>().ok()).is_some_and(|pid| {
                pid != std::process::id() as i32 && !Path::new(&format!("/proc/{pid}")).exists()
            })
    };
    if let Ok(entries) = fs::read_dir("/run/netns") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if dead(&name) {
                net::del_netns(&name);
            }
        }
    }
    if let Ok(root) = cgroup2_root() {
        if let Ok(entries) = fs::read_dir(root.join(CGROUP_PARENT)) {
            for e in entries.flatten() {
                if dead(&e.file_name().to_string_lossy()) {
                    remove_cgroup_tree(&e.path());
                }
            }
        }
    }
    if let Ok(entries) = v1_root().and_then(|root| Ok(fs::read_dir(root)?)) {
        for e in entries.flatten() {
            if dead(&e.file_name().to_string_lossy()) {
                remove_v1_tree(&e.path());
            }
        }
    }
    for dir in [PathBuf::from(PIN_PARENT), std::env::temp_dir().join("warren-testbed")] {
        if let Ok(entries) = fs::read_dir(&dir) {
            for e in entries.flatten() {
                if dead(&e.file_name().to_string_lossy()) {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
    }
}

/// What [`Pod::connect_outcomes`] saw.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct ConnectOutcomes {
    /// Each working connection's time, from `connect()` until its echo was back (µs).
    pub micros: Vec<u64>,
    /// Connects that failed with ECONNREFUSED.
    pub refused: usize,
    /// Every other failure.
    pub failed: Vec<String>,
}

/// A blocking IPv4 TCP connection whose socket carries [`warren_maps::AGENT_SOCKET_MARK`] from before its
/// connect (the mark connect4 checks).
fn marked_connect(to: std::net::SocketAddrV4) -> std::io::Result<std::net::TcpStream> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: plain socket(2); the fd is owned at once below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket no one else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mark: u32 = warren_maps::AGENT_SOCKET_MARK;
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: to.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(*to.ip()).to_be() },
        sin_zero: [0; 8],
    };
    use std::os::fd::AsRawFd;
    // SAFETY: the option value and the address point at live locals of the sizes passed.
    let failed = unsafe {
        libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_MARK, (&raw const mark).cast(), 4) != 0
            || libc::connect(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            ) != 0
    };
    if failed {
        return Err(std::io::Error::last_os_error());
    }
    Ok(std::net::TcpStream::from(fd))
}
