//! The agent's state per (service, subset, port) its clients send requests to — Envoy's cluster: the
//! endpoints with their health and load, the connection pool's limits and counts, the retry budget. The
//! policy and the endpoint list come from each table version ([`Members`], swapped whole when the version
//! changes); what the traffic taught (ejections, counts) lives in [`EndpointState`]s that outlast versions.
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{
        Arc, Mutex, OnceLock, RwLock,
        atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};
use warren_api::{
    admin::{ClusterView, EndpointView, PoolCounts, PoolLimits, RetryBudgetView},
    resilience::{ClusterPolicy, HashRing, Locality, LocalityLb, SimpleLb},
    tables::Service,
};

use super::{
    balance::{self, Candidate, Maglev, RingHash},
    budget::{BudgetConfig, RetryBudget},
    locality,
    outlier::{self, Detection, EndpointHealth, TryOutcome},
};
use crate::state::MeshTables;

/// Every cluster this agent's clients used, by service hostname (then subset and port).
pub struct Clusters {
    by_host: RwLock<HashMap<String, Vec<Arc<Cluster>>>>,
    next_id: AtomicU64,
    /// The retry budget of clusters whose DestinationRule sets none.
    default_budget: BudgetConfig,
}

impl Clusters {
    pub fn new(default_budget: BudgetConfig) -> Clusters {
        Clusters { by_host: RwLock::default(), next_id: AtomicU64::new(1), default_budget }
    }

    /// The cluster of `service`'s `subset` at service port `port`, its members as of `tables`.
    pub fn get(&self, tables: &MeshTables, service: &Arc<Service>, subset: Option<&str>, port: u16) -> Arc<Cluster> {
        let found = {
            let by_host = self.by_host.read().unwrap_or_else(|e| e.into_inner());
            by_host.get(service.hostname.as_str()).and_then(|v| v.iter().find(|c| c.is(subset, port)).cloned())
        };
        let cluster = match found {
            Some(cluster) => cluster,
            None => {
                let mut by_host = self.by_host.write().unwrap_or_else(|e| e.into_inner());
                let entry = by_host.entry(service.hostname.clone()).or_default();
                match entry.iter().find(|c| c.is(subset, port)) {
                    Some(c) => c.clone(),
                    None => {
                        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                        let cluster = Arc::new(Cluster::new(id, service, subset, port));
                        entry.push(cluster.clone());
                        cluster
                    }
                }
            }
        };
        cluster.refresh(tables, service, &self.default_budget);
        cluster
    }

    /// What `inspect endpoints` shows.
    pub fn view(&self, client_locality: Option<&Locality>) -> Vec<ClusterView> {
        let by_host = self.by_host.read().unwrap_or_else(|e| e.into_inner());
        let mut views: Vec<_> = by_host.values().flatten().map(|c| c.view(client_locality)).collect();
        views.sort_by(|a, b| a.name.cmp(&b.name));
        views
    }
}

/// One (service, subset, port).
pub struct Cluster {
    pub id: u64,
    /// `namespace/name`.
    pub service: String,
    pub hostname: String,
    pub subset: Option<String>,
    pub port: u16,
    /// Outlier detection's sweeps are at `epoch + k × interval`.
    epoch: Instant,
    members: RwLock<Arc<Members>>,
    /// Endpoint state by address, kept across table versions.
    states: Mutex<HashMap<IpAddr, Arc<EndpointState>>>,
    pub limits: Limits,
    round_robin: AtomicUsize,
}

/// A cluster as one table version defines it.
pub struct Members {
    pub version: u64,
    pub policy: ClusterPolicy,
    pub detection: Option<Detection>,
    pub endpoints: Vec<Arc<EndpointState>>,
    pub budget: Arc<RetryBudget>,
    hash: OnceLock<HashTable>,
    /// Locality priorities per client locality (clients on one node almost always share one).
    priorities: Mutex<HashMap<Option<Locality>, Arc<Vec<u32>>>>,
}

enum HashTable {
    Ring(RingHash),
    Maglev(Maglev),
}

/// One endpoint of a cluster.
pub struct EndpointState {
    pub ip: IpAddr,
    pub hostname: Option<String>,
    pub locality: Option<Locality>,
    /// The pod's labels (for `failoverPriority`).
    pub labels: BTreeMap<String, String>,
    /// When this agent first saw it (warm-up).
    pub first_seen: Instant,
    active: AtomicU32,
    requests: AtomicU64,
    failures: AtomicU64,
    health: Mutex<EndpointHealth>,
}

/// What a request is picked for.
#[derive(Default)]
pub struct PickRequest<'a> {
    /// The consistent hash key's hash, when the policy hashes and the request has the key.
    pub hash: Option<u64>,
    pub client_locality: Option<&'a Locality>,
    pub client_labels: Option<&'a BTreeMap<String, String>>,
    /// Endpoints tried already (a retry prefers others).
    pub tried: &'a [IpAddr],
    /// A retry may leave the priority levels tried already (`retryRemoteLocalities`).
    pub leave_tried_localities: bool,
}

impl Cluster {
    fn new(id: u64, service: &Service, subset: Option<&str>, port: u16) -> Cluster {
        let now = Instant::now();
        let members = Members::empty(now);
        Cluster {
            id,
            service: service.key(),
            hostname: service.hostname.clone(),
            subset: subset.map(str::to_string),
            port,
            epoch: now,
            members: RwLock::new(Arc::new(members)),
            states: Mutex::default(),
            limits: Limits::default(),
            round_robin: AtomicUsize::new(0),
        }
    }

    fn is(&self, subset: Option<&str>, port: u16) -> bool {
        self.port == port && self.subset.as_deref() == subset
    }

    /// Envoy's cluster name.
    pub fn name(&self) -> String {
        format!("outbound|{}|{}|{}", self.port, self.subset.as_deref().unwrap_or(""), self.hostname)
    }

    pub fn members(&self) -> Arc<Members> {
        self.members.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Rebuilds the members when `tables` is a newer version than they were built from.
    fn refresh(&self, tables: &MeshTables, service: &Service, default_budget: &BudgetConfig) {
        let current = self.members();
        if current.version == tables.version && current.version != 0 {
            return;
        }
        let policy = service.cluster_policy(self.subset.as_deref(), self.port);
        let budget_config = policy.retry_budget.as_ref().map(BudgetConfig::from_istio).unwrap_or_else(|| default_budget.clone());
        // The budget's counts carry over while its settings stay the same.
        let budget = if *current.budget.config() == budget_config {
            current.budget.clone()
        } else {
            Arc::new(RetryBudget::new(budget_config, Instant::now()))
        };
        let endpoints = self.endpoint_states(tables, service);
        let members = Members {
            version: tables.version,
            detection: policy.outlier_detection.as_ref().map(Detection::from),
            policy,
            endpoints,
            budget,
            hash: OnceLock::new(),
            priorities: Mutex::default(),
        };
        *self.members.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(members);
    }

    /// The states of the endpoints `tables` gives the cluster: kept for addresses seen before, new for
    /// the rest; states of endpoints that left are dropped.
    fn endpoint_states(&self, tables: &MeshTables, service: &Service) -> Vec<Arc<EndpointState>> {
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let endpoints: Vec<_> = service
            .endpoints_in(self.subset.as_deref())
            .map(|e| {
                let state = states.entry(e.ip).or_insert_with(|| {
                    let pod = e.workload.as_deref().and_then(|w| tables.pod(w));
                    Arc::new(EndpointState {
                        ip: e.ip,
                        hostname: e.hostname.clone(),
                        locality: e.locality.as_deref().and_then(Locality::parse),
                        labels: pod.map(|p| p.labels.clone()).unwrap_or_default(),
                        first_seen: now,
                        active: AtomicU32::new(0),
                        requests: AtomicU64::new(0),
                        failures: AtomicU64::new(0),
                        health: Mutex::default(),
                    })
                });
                state.clone()
            })
            .collect();
        states.retain(|ip, _| endpoints.iter().any(|e| e.ip == *ip));
        endpoints
    }

    /// An endpoint for a request, by the policy: outlier ejections, locality priority, previously tried
    /// hosts, then the load balancer. `None`: no endpoint (or none healthy).
    pub fn pick(&self, members: &Members, request: &PickRequest<'_>, now: Instant) -> Option<Arc<EndpointState>> {
        let all = &members.endpoints;
        if all.is_empty() {
            return None;
        }
        let mut usable = members.usable(now);
        members.prefer_locality(&mut usable, request);
        // A retry goes elsewhere when elsewhere is possible (Envoy's previous_hosts predicate).
        if usable.iter().enumerate().any(|(i, u)| *u && !request.tried.contains(&all[i].ip)) {
            for (i, u) in usable.iter_mut().enumerate() {
                *u &= !request.tried.contains(&all[i].ip);
            }
        }
        let index = self.balance(members, &usable, request.hash, now)?;
        Some(all[index].clone())
    }

    fn balance(&self, members: &Members, usable: &[bool], hash: Option<u64>, now: Instant) -> Option<usize> {
        let lb = members.policy.load_balancer.as_ref();
        if let (Some(table), Some(key)) = (members.hash_table(), hash) {
            return table.pick(key, |i| usable[i]);
        }
        let warmup = lb.and_then(|l| l.warmup_ms).map(Duration::from_millis);
        let indices: Vec<usize> = (0..usable.len()).filter(|i| usable[*i]).collect();
        let candidates: Vec<Candidate> = indices
            .iter()
            .map(|i| {
                let e = &members.endpoints[*i];
                let weight = warmup.map(|w| balance::warmup_weight(now.saturating_duration_since(e.first_seen), w)).unwrap_or(1.0);
                Candidate { active: e.active.load(Ordering::Relaxed), weight }
            })
            .collect();
        let mut random = crate::proxy::http::random;
        let simple = lb.and_then(|l| l.simple).unwrap_or_default();
        let chosen = match simple {
            SimpleLb::RoundRobin => {
                balance::round_robin(&candidates, self.round_robin.fetch_add(1, Ordering::Relaxed), &mut random)
            }
            SimpleLb::Random | SimpleLb::Passthrough => balance::random_pick(&candidates, &mut random),
            SimpleLb::LeastRequest => balance::least_request(&candidates, &mut random),
        }?;
        Some(indices[chosen])
    }

    /// Counts a try's outcome for `endpoint`; ejects it when outlier detection says so and the cluster
    /// may lose one more endpoint.
    pub fn report(&self, members: &Members, endpoint: &EndpointState, outcome: TryOutcome, now: Instant) {
        endpoint.requests.fetch_add(1, Ordering::Relaxed);
        if matches!(outcome, TryOutcome::LocalFailure) || matches!(outcome, TryOutcome::Status(s) if s >= 500) {
            endpoint.failures.fetch_add(1, Ordering::Relaxed);
        }
        let Some(detection) = &members.detection else { return };
        let wants_ejection = endpoint.health().record(outcome, detection);
        if !wants_ejection {
            return;
        }
        // Counted with no other endpoint's lock held while this one's is (no lock order to get wrong).
        let ejected = members.endpoints.iter().filter(|e| e.ip != endpoint.ip && e.health().is_ejected(now)).count();
        if outlier::may_eject(ejected, members.endpoints.len(), detection.max_ejection_percent) {
            let mut health = endpoint.health();
            health.eject(now, self.epoch, detection);
            tracing::info!(cluster = %self.name(), endpoint = %endpoint.ip, times = health.times_ejected(), "outlier detection: endpoint ejected");
        }
    }

    pub(crate) fn view(&self, client_locality: Option<&Locality>) -> ClusterView {
        let members = self.members();
        let now = Instant::now();
        let priorities = members.priorities_for(client_locality, None);
        let pool = members.policy.connection_pool.clone().unwrap_or_default();
        let budget = members.budget.snapshot(now);
        ClusterView {
            name: self.name(),
            service: self.service.clone(),
            subset: self.subset.clone(),
            port: self.port,
            load_balancer: lb_name(&members.policy),
            outlier_detection: members.detection.is_some(),
            limits: PoolLimits {
                max_connections: pool.tcp.max_connections,
                max_pending_requests: pool.http.http1_max_pending_requests,
                max_requests: pool.http.http2_max_requests,
                max_requests_per_connection: pool.http.max_requests_per_connection,
                max_retries: pool.http.max_retries,
                connect_timeout_ms: pool.tcp.connect_timeout_ms(),
                idle_timeout_ms: pool.http.idle_timeout_ms(),
            },
            open: self.limits.open(),
            overflows: self.limits.overflows(),
            retry_budget: RetryBudgetView {
                policy: budget_name(members.budget.config()),
                window_requests: budget.requests,
                window_retries: budget.retries,
                refused: budget.refused,
            },
            endpoints: members
                .endpoints
                .iter()
                .enumerate()
                .map(|(i, e)| e.view(now, members.detection.is_some().then(|| priorities[i])))
                .collect(),
        }
    }
}

impl Members {
    fn empty(now: Instant) -> Members {
        Members {
            version: 0,
            policy: ClusterPolicy::default(),
            detection: None,
            endpoints: Vec::new(),
            budget: Arc::new(RetryBudget::new(BudgetConfig::Unlimited, now)),
            hash: OnceLock::new(),
            priorities: Mutex::default(),
        }
    }

    /// Which endpoints may take requests: all but the ejected — unless too few are left (`minHealthPercent`).
    fn usable(&self, now: Instant) -> Vec<bool> {
        let Some(detection) = &self.detection else { return vec![true; self.endpoints.len()] };
        let healthy: Vec<bool> = self.endpoints.iter().map(|e| !e.health().is_ejected(now)).collect();
        let count = healthy.iter().filter(|h| **h).count();
        if count == 0 || outlier::in_panic(count, healthy.len(), detection.min_health_percent) {
            return vec![true; self.endpoints.len()];
        }
        healthy
    }

    /// Keeps the endpoints of one locality priority level (chosen by Envoy's priority load: the client's
    /// own first, spilling over as it loses healthy endpoints), or weights by `distribute`. Acts only
    /// with outlier detection, as in Istio.
    fn prefer_locality(&self, usable: &mut [bool], request: &PickRequest<'_>) {
        let setting = self.policy.load_balancer.as_ref().and_then(|l| l.locality.clone()).unwrap_or_default();
        if self.detection.is_none() || setting.enabled == Some(false) || request.client_locality.is_none() {
            return;
        }
        if !setting.distribute.is_empty() {
            return self.distribute(usable, request, &setting);
        }
        let priorities = self.priorities_for(request.client_locality, request.client_labels);
        let levels = priorities.iter().copied().max().unwrap_or(0) as usize + 1;
        let mut counts = vec![(0usize, 0usize); levels];
        for (i, p) in priorities.iter().enumerate() {
            counts[*p as usize].1 += 1;
            counts[*p as usize].0 += usize::from(usable[i]);
        }
        if request.leave_tried_localities {
            for (i, e) in self.endpoints.iter().enumerate() {
                if request.tried.contains(&e.ip) {
                    counts[priorities[i] as usize].0 = 0;
                }
            }
        }
        let loads = locality::priority_load(&counts);
        let level = locality::pick_level(&loads, crate::proxy::http::random()) as u32;
        if !usable.iter().enumerate().any(|(i, u)| *u && priorities[i] == level) {
            return;
        }
        for (i, u) in usable.iter_mut().enumerate() {
            *u &= priorities[i] == level;
        }
    }

    /// `distribute`: one usable endpoint drawn by the rule's weights, the rest masked.
    fn distribute(&self, usable: &mut [bool], request: &PickRequest<'_>, setting: &LocalityLb) {
        let localities: Vec<_> = self.endpoints.iter().map(|e| e.locality.as_ref()).collect();
        let Some(weights) = locality::distribute_weights(request.client_locality, &localities, setting) else { return };
        let total: f64 = weights.iter().enumerate().filter(|(i, _)| usable[*i]).map(|(_, w)| *w).sum();
        if total <= 0.0 {
            return;
        }
        let mut draw = (crate::proxy::http::random() % 1_000_000) as f64 / 1_000_000.0 * total;
        let mut chosen = None;
        for (i, w) in weights.iter().enumerate().filter(|(i, _)| usable[*i]) {
            chosen = Some(i);
            if draw < *w {
                break;
            }
            draw -= w;
        }
        for (i, u) in usable.iter_mut().enumerate() {
            *u = Some(i) == chosen;
        }
    }

    fn priorities_for(&self, client: Option<&Locality>, labels: Option<&BTreeMap<String, String>>) -> Arc<Vec<u32>> {
        let mut cache = self.priorities.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .entry(client.cloned())
            .or_insert_with(|| {
                let setting = self.policy.load_balancer.as_ref().and_then(|l| l.locality.clone()).unwrap_or_default();
                let empty = BTreeMap::new();
                let endpoints: Vec<_> = self.endpoints.iter().map(|e| (e.locality.as_ref(), &e.labels)).collect();
                Arc::new(locality::priorities(client, labels.unwrap_or(&empty), &endpoints, &setting))
            })
            .clone()
    }

    fn hash_table(&self) -> Option<&HashTable> {
        let hash = self.policy.load_balancer.as_ref()?.consistent_hash.as_ref()?;
        Some(self.hash.get_or_init(|| {
            let hosts: Vec<u64> = self.endpoints.iter().map(|e| balance::stable_hash(e.ip.to_string().as_bytes())).collect();
            match hash.ring {
                HashRing::RingHash { minimum_ring_size } => HashTable::Ring(RingHash::new(&hosts, minimum_ring_size)),
                HashRing::Maglev { table_size } => HashTable::Maglev(Maglev::new(&hosts, table_size)),
            }
        }))
    }
}

impl HashTable {
    fn pick(&self, key: u64, usable: impl Fn(usize) -> bool) -> Option<usize> {
        match self {
            HashTable::Ring(ring) => ring.pick(key, usable),
            HashTable::Maglev(maglev) => maglev.pick(key, usable),
        }
    }
}

impl EndpointState {
    fn health(&self) -> std::sync::MutexGuard<'_, EndpointHealth> {
        self.health.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a request in flight to this endpoint until the guard drops (least request reads it).
    pub fn start(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(self.clone())
    }

    fn view(&self, now: Instant, priority: Option<u32>) -> EndpointView {
        let mut health = self.health();
        let ejected = health.is_ejected(now);
        EndpointView {
            address: self.ip,
            locality: self.locality.as_ref().map(Locality::to_string),
            health: if ejected { "EJECTED" } else { "HEALTHY" }.into(),
            ejected_for_ms: health.ejected_until().filter(|_| ejected).map(|t| t.saturating_duration_since(now).as_millis() as u64),
            times_ejected: health.times_ejected(),
            priority,
            active: self.active.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
        }
    }
}

/// A request in flight to an endpoint.
pub struct ActiveGuard(Arc<EndpointState>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

fn lb_name(policy: &ClusterPolicy) -> String {
    let lb = policy.load_balancer.as_ref();
    match lb.and_then(|l| l.consistent_hash.as_ref()).map(|h| h.ring) {
        Some(HashRing::RingHash { .. }) => "RING_HASH".into(),
        Some(HashRing::Maglev { .. }) => "MAGLEV".into(),
        None => match lb.and_then(|l| l.simple).unwrap_or_default() {
            SimpleLb::LeastRequest => "LEAST_REQUEST".into(),
            SimpleLb::RoundRobin => "ROUND_ROBIN".into(),
            SimpleLb::Random => "RANDOM".into(),
            SimpleLb::Passthrough => "PASSTHROUGH".into(),
        },
    }
}

fn budget_name(config: &BudgetConfig) -> String {
    match config {
        BudgetConfig::Concurrent { percent, min_concurrency } => format!("concurrent {percent}% (min {min_concurrency})"),
        BudgetConfig::Windowed { window, percent, floor } => format!("{percent}% of {}s + {floor}", window.as_secs_f64()),
        BudgetConfig::Unlimited => "unlimited".into(),
    }
}

/// The connection pool's counts against its limits (`connectionPool`), for the whole cluster across
/// every client pod on the node; a full limit answers 503 with flag UO.
#[derive(Default)]
pub struct Limits {
    connections: AtomicU32,
    pending: AtomicU32,
    requests: AtomicU32,
    retries: AtomicU32,
    overflow: [AtomicU64; 4],
    /// Woken when a connection closes or returns to the pool (what pending requests wait for).
    pub released: Notify,
}

/// Which limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Connections = 0,
    Pending = 1,
    Requests = 2,
    Retries = 3,
}

/// One unit of a limit, given back on drop.
pub struct Held {
    cluster: Arc<Cluster>,
    limit: Limit,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.cluster.limits.counter(self.limit).fetch_sub(1, Ordering::AcqRel);
        if self.limit == Limit::Connections {
            self.cluster.limits.released.notify_waiters();
        }
    }
}

impl Limits {
    fn counter(&self, limit: Limit) -> &AtomicU32 {
        match limit {
            Limit::Connections => &self.connections,
            Limit::Pending => &self.pending,
            Limit::Requests => &self.requests,
            Limit::Retries => &self.retries,
        }
    }

    /// Takes one unit of `limit` unless `max` units are out (`None`: unlimited); a refusal is counted.
    pub fn acquire(cluster: &Arc<Cluster>, limit: Limit, max: Option<u32>) -> Option<Held> {
        let counter = cluster.limits.counter(limit);
        let max = max.unwrap_or(u32::MAX);
        let taken = counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).is_ok();
        if !taken {
            cluster.limits.overflow[limit as usize].fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(Held { cluster: cluster.clone(), limit })
    }

    pub fn in_flight(&self, limit: Limit) -> u32 {
        self.counter(limit).load(Ordering::Acquire)
    }

    fn open(&self) -> PoolCounts {
        PoolCounts {
            connections: self.connections.load(Ordering::Relaxed).into(),
            pending: self.pending.load(Ordering::Relaxed).into(),
            requests: self.requests.load(Ordering::Relaxed).into(),
            retries: self.retries.load(Ordering::Relaxed).into(),
        }
    }

    fn overflows(&self) -> PoolCounts {
        let n = |l: Limit| self.overflow[l as usize].load(Ordering::Relaxed);
        PoolCounts {
            connections: n(Limit::Connections),
            pending: n(Limit::Pending),
            requests: n(Limit::Requests),
            retries: n(Limit::Retries),
        }
    }
}

/// A cluster built as the proxy builds it — from Istio YAML compiled by the controller's own code.
#[cfg(test)]
pub(crate) mod testing {
    use std::{net::IpAddr, sync::Arc};

    use warren_config::{cluster::ClusterState, compile::compile};

    use super::{Cluster, Clusters, EndpointState, Members};
    use crate::{resilience::budget::BudgetConfig, state::MeshTables};

    /// Service `shop/web` (port 80 named `http`) with three pods, 10.244.1.1–3, and a DestinationRule with
    /// `traffic_policy` (YAML, indented four spaces) when it is not empty; the cluster of port 80.
    pub fn web(traffic_policy: &str, budget: BudgetConfig) -> (Arc<Cluster>, Arc<Members>) {
        let mut yaml = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {warren.dev/mesh: enabled}}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
             spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{name: http, port: 80, targetPort: 8080}]}\n"
            .to_string();
        for i in 1..=3 {
            yaml += &format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: web-{i}, namespace: shop, uid: u{i}, labels: {{app: web}}}}\n\
                 spec: {{containers: [], nodeName: n1}}\nstatus: {{podIP: 10.244.1.{i}}}\n"
            );
        }
        if !traffic_policy.is_empty() {
            yaml += &format!(
                "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: web, namespace: shop}}\n\
                 spec:\n  host: web\n  trafficPolicy:\n{traffic_policy}"
            );
        }
        let mut state = ClusterState::default();
        state.add_yaml(&yaml).unwrap();
        let tables = MeshTables::new(1, compile(&state).tables_for_node("n1")).unwrap();
        let service = tables.service("shop/web").expect("shop/web compiled").clone();
        let cluster = Clusters::new(budget).get(&tables, &service, None, 80);
        let members = cluster.members();
        (cluster, members)
    }

    pub fn endpoint(members: &Members, ip: &str) -> Arc<EndpointState> {
        let ip: IpAddr = ip.parse().unwrap();
        members.endpoints.iter().find(|e| e.ip == ip).cloned().unwrap_or_else(|| panic!("no endpoint {ip}"))
    }
}

/// Ejection and its end as the proxy meets them: `Instant::now()` on tokio's paused clock, moved by
/// `advance`, so every boundary is exact to the nanosecond and no test waits.
#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, time::Duration};

    use tokio::time::{Instant, advance};

    use super::{testing::*, *};

    fn picks(cluster: &Cluster, members: &Members, n: usize) -> BTreeMap<IpAddr, usize> {
        let mut counts = BTreeMap::new();
        for _ in 0..n {
            let e = cluster.pick(members, &PickRequest::default(), Instant::now()).expect("an endpoint");
            *counts.entry(e.ip).or_default() += 1;
        }
        counts
    }

    fn fail(cluster: &Cluster, members: &Members, endpoint: &EndpointState, times: usize) {
        for _ in 0..times {
            cluster.report(members, endpoint, TryOutcome::Status(500), Instant::now());
        }
    }

    const ODD: &str = "    loadBalancer: {simple: ROUND_ROBIN}\n    outlierDetection: {consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 4s, maxEjectionPercent: 100}\n";

    #[tokio::test(start_paused = true)]
    async fn an_ejection_lasts_base_time_per_ejection_and_ends_at_the_next_sweep() {
        let (cluster, members) = web(ODD, BudgetConfig::Unlimited);
        let bad = endpoint(&members, "10.244.1.1");
        advance(Duration::from_millis(300)).await;
        fail(&cluster, &members, &bad, 1);
        assert_eq!(picks(&cluster, &members, 30).len(), 3, "one 5xx of two: not ejected");
        fail(&cluster, &members, &bad, 1);
        assert_eq!(picks(&cluster, &members, 30).get(&bad.ip), None, "ejected after 2 consecutive 5xx");
        // Ejected at 0.3 s for 4 s: it ends at the first sweep (each second from the cluster's start) at or
        // after 4.3 s — 5 s.
        let view = || cluster.view(None).endpoints.into_iter().find(|e| e.address == bad.ip).unwrap();
        assert_eq!(view().ejected_for_ms, Some(4_700));
        advance(Duration::from_millis(4_699)).await;
        assert_eq!(picks(&cluster, &members, 30).get(&bad.ip), None, "still ejected 1 ms before the sweep");
        advance(Duration::from_millis(1)).await;
        assert_eq!(picks(&cluster, &members, 30)[&bad.ip], 10, "back at the sweep, in round robin's turn");
        assert_eq!(view().health, "HEALTHY");
        // Again at once: twice the base time (no interval spent healthy to decay the multiplier), 5 s → 13 s.
        fail(&cluster, &members, &bad, 2);
        assert_eq!((view().health.as_str(), view().ejected_for_ms, view().times_ejected), ("EJECTED", Some(8_000), 2));
        advance(Duration::from_millis(7_999)).await;
        assert_eq!(picks(&cluster, &members, 30).get(&bad.ip), None);
        advance(Duration::from_millis(1)).await;
        assert_eq!(picks(&cluster, &members, 30)[&bad.ip], 10);
    }

    #[tokio::test(start_paused = true)]
    async fn results_while_ejected_are_ignored_and_healthy_time_decays_the_multiplier() {
        let (cluster, members) = web(ODD, BudgetConfig::Unlimited);
        let bad = endpoint(&members, "10.244.1.2");
        fail(&cluster, &members, &bad, 2);
        fail(&cluster, &members, &bad, 10);
        advance(Duration::from_secs(4)).await;
        let view = || cluster.view(None).endpoints.into_iter().find(|e| e.address == bad.ip).unwrap();
        assert_eq!((view().health.as_str(), view().times_ejected), ("HEALTHY", 1), "errors while ejected counted nothing");
        // One interval healthy per step: after 3 s healthy the multiplier (1) is spent, so the next
        // ejection is the base time again, not twice it.
        advance(Duration::from_secs(3)).await;
        fail(&cluster, &members, &bad, 2);
        assert_eq!((view().ejected_for_ms, view().times_ejected), (Some(4_000), 1));
    }

    #[tokio::test(start_paused = true)]
    async fn max_ejection_percent_keeps_endpoints_and_min_health_percent_panics_to_all() {
        let capped = "    outlierDetection: {consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 30s, maxEjectionPercent: 30}\n";
        let (cluster, members) = web(capped, BudgetConfig::Unlimited);
        for ip in ["10.244.1.1", "10.244.1.2"] {
            fail(&cluster, &members, &endpoint(&members, ip), 1);
        }
        let ejected = |c: &Cluster| c.view(None).endpoints.iter().filter(|e| e.health == "EJECTED").count();
        assert_eq!(ejected(&cluster), 1, "30 % of 3: the first ejection only (at least one always may go)");

        let panics = "    outlierDetection: {consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 30s, maxEjectionPercent: 100, minHealthPercent: 50}\n";
        let (cluster, members) = web(panics, BudgetConfig::Unlimited);
        fail(&cluster, &members, &endpoint(&members, "10.244.1.1"), 1);
        assert_eq!(picks(&cluster, &members, 300).len(), 2, "2 of 3 healthy (67 %): the ejected one is out");
        fail(&cluster, &members, &endpoint(&members, "10.244.1.2"), 1);
        assert_eq!(ejected(&cluster), 2);
        assert_eq!(picks(&cluster, &members, 300).len(), 3, "1 of 3 healthy is under 50 %: every endpoint takes traffic");
        advance(Duration::from_secs(30)).await;
        assert_eq!(ejected(&cluster), 0, "both back at the sweep 30 s on");
    }

    #[tokio::test(start_paused = true)]
    async fn without_outlier_detection_failures_are_counted_and_nothing_is_ejected() {
        let (cluster, members) = web("    loadBalancer: {simple: ROUND_ROBIN}\n", BudgetConfig::Unlimited);
        let bad = endpoint(&members, "10.244.1.3");
        fail(&cluster, &members, &bad, 50);
        assert_eq!(picks(&cluster, &members, 30)[&bad.ip], 10);
        let view = cluster.view(None).endpoints.into_iter().find(|e| e.address == bad.ip).unwrap();
        assert_eq!((view.health.as_str(), view.failures, view.requests), ("HEALTHY", 50, 50));
    }
}
