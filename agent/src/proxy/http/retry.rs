//! Sending one routed request as Envoy's router does: tries, each to an endpoint the cluster picks
//! (another one for a retry when there is one), under the per-try and the route's timeouts, retried on
//! the rule's `retryOn` conditions after a jittered back-off, while the retry budget and `maxRetries`
//! allow — the request body kept for replay up to [`REPLAY_LIMIT`]. Every try's outcome feeds outlier
//! detection; every try holds its place under `http2MaxRequests` until its response body ends.
use std::{
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Response};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use tokio::time::Instant;
use warren_api::resilience::{ConnectionPool, RetryOn, RetryPolicy};

use super::{Body, BoxError, Error, RouteTarget, Trace, boxed, flags::Flag, full, upstream::Destination};
use crate::{
    proxy::http::Upstreams,
    resilience::{
        backoff::Backoff,
        cluster::{Cluster, EndpointState, Held, Limit, Limits, Members, PickRequest},
        outlier::TryOutcome,
    },
};

/// A request body is kept for retries up to this size (Envoy's default buffer limit); a longer one goes
/// once.
pub const REPLAY_LIMIT: usize = 1024 * 1024;

/// `x-envoy-attempt-count` on every try: 1, 2, …
pub const ATTEMPT_HEADER: &str = "x-envoy-attempt-count";

/// Set by the destination's agent on its 503 when the workload refused the connection: over HBONE the
/// source's agent cannot see that failure itself, and treats the answer as the connect failure it is.
pub const CONNECT_FAILURE_HEADER: &str = "x-warren-upstream-connect-failure";

/// What a try needs besides the request: where it may go and under which rules.
pub struct Plan<'a> {
    pub policy: &'a RetryPolicy,
    pub cluster: Arc<Cluster>,
    pub members: Arc<Members>,
    pub pool: &'a ConnectionPool,
    /// The destination with no endpoint yet (service, subset, port, target port).
    pub target: RouteTarget,
    pub hash: Option<u64>,
    pub client_locality: Option<&'a warren_api::resilience::Locality>,
    pub client_labels: Option<&'a std::collections::BTreeMap<String, String>>,
    /// The route's timeout: it bounds every try and the back-offs between them.
    pub deadline: Option<(Instant, Duration)>,
}

/// Builds one try's request (with its body) for an endpoint: the head is the same for every try.
pub trait MakeRequest {
    fn make(&self, target: &RouteTarget, body: Body, attempt: u32) -> Result<http::Request<Body>, Error>;
}

/// The answer a try got, with what must live as long as its body (the places it holds under the pool
/// limits, its endpoint's active count).
pub struct Answered {
    pub response: Response<Incoming>,
    pub guards: Guards,
    /// The try's own deadline, for the body (the earlier of per-try and route timeouts).
    pub body_deadline: Option<Instant>,
}

pub struct Guards {
    _request: Option<Held>,
    _retry: Option<Held>,
    _budget: Option<crate::resilience::budget::RetryPermit>,
    _active: crate::resilience::cluster::ActiveGuard,
}

/// Sends the request's tries until one is answered in a way not to retry, or the tries, the budget or the
/// deadline run out; the last try's result is the answer (flags URX / UO added to `trace` as Envoy does).
pub async fn send(
    plan: &Plan<'_>,
    body: Body,
    make: &impl MakeRequest,
    upstreams: &Arc<Upstreams>,
    version: http::Version,
    trace: &mut Trace,
) -> Result<Answered, Error> {
    let retries = plan.policy.attempts;
    let (first, mut replay) = if retries > 0 { Replay::record(body) } else { (body, None) };
    let mut body = Some(first);
    let mut tried: Vec<IpAddr> = Vec::new();
    let (mut retry_slot, mut budget_permit) = (None, None);
    let backoff = Backoff::new(Duration::from_millis(plan.policy.backoff_ms()));
    plan.members.budget.on_request(Instant::now());
    for attempt in 1.. {
        let this_body = body.take().expect("a body for every try");
        let result = try_once(plan, this_body, make, upstreams, version, attempt, &tried, trace).await;
        let (settled, endpoint) = settle(plan.policy, result, &mut retry_slot, &mut budget_permit);
        let answer = match settled {
            Settled::Answer(answer) => return answer,
            Settled::Retriable(answer) => answer,
        };
        if attempt > retries {
            trace.attempts = attempt;
            trace.flags.add(Flag::RetryLimitExceeded);
            return answer;
        }
        let Some(next) = replay.as_mut().and_then(Replay::replay) else { return answer };
        let retry = match RetryGate::from(plan).open(attempt, &backoff, Instant::now(), super::random()) {
            Ok(retry) => retry,
            Err(Refused::Overflow) => {
                trace.flags.add(Flag::UpstreamOverflow);
                return answer;
            }
            Err(Refused::Deadline(limit)) => return Err(Error::UpstreamTimeout(limit)),
        };
        drop(answer);
        tokio::time::sleep(retry.wait).await;
        let Retry { slot, permit, .. } = retry;
        (retry_slot, budget_permit, body) = (Some(slot), Some(permit), Some(next));
        tried.extend(endpoint);
        trace.attempts = attempt + 1;
    }
    unreachable!("the loop returns")
}

/// What decides whether a retry may go, once a try's answer is retriable: the retry budget, `maxRetries`,
/// and the route's deadline against the back-off.
struct RetryGate<'a> {
    cluster: &'a Arc<Cluster>,
    members: &'a Members,
    max_retries: Option<u32>,
    deadline: Option<(Instant, Duration)>,
}

/// A retry allowed: its wait, and the places it holds (in the budget, under `maxRetries`) until it ends.
struct Retry {
    wait: Duration,
    slot: Held,
    permit: crate::resilience::budget::RetryPermit,
}

/// Why a retry may not go.
#[derive(Debug, PartialEq, Eq)]
enum Refused {
    /// The retry budget or `maxRetries` is spent (Envoy: flag UO, the try's answer stands).
    Overflow,
    /// The back-off would end past the route's timeout (this limit): the request times out now.
    Deadline(Duration),
}

impl<'a> From<&'a Plan<'a>> for RetryGate<'a> {
    fn from(plan: &'a Plan<'a>) -> RetryGate<'a> {
        RetryGate { cluster: &plan.cluster, members: &plan.members, max_retries: plan.pool.http.max_retries, deadline: plan.deadline }
    }
}

impl RetryGate<'_> {
    /// Retry `retry` (1 = the first) at `now`, its back-off drawn from `random`.
    fn open(&self, retry: u32, backoff: &Backoff, now: Instant, random: u64) -> Result<Retry, Refused> {
        let in_flight = self.cluster.limits.in_flight(Limit::Requests);
        let permit = self.members.budget.try_retry(now, in_flight).ok_or(Refused::Overflow)?;
        let slot = Limits::acquire(self.cluster, Limit::Retries, self.max_retries).ok_or(Refused::Overflow)?;
        let wait = backoff.delay(retry, random);
        if let Some((_, limit)) = self.deadline.filter(|(at, _)| now + wait >= *at) {
            return Err(Refused::Deadline(limit));
        }
        Ok(Retry { wait, slot, permit })
    }
}

/// How a try ended, for the loop.
enum Settled {
    /// Not retried: this is the answer.
    Answer(Result<Answered, Error>),
    /// A condition of `retryOn` holds: the answer unless a retry is made.
    Retriable(Result<Answered, Error>),
}

/// Sorts a try's result; hands the retry's held places to the answer's guards.
fn settle(
    policy: &RetryPolicy,
    result: (Result<Answered, Error>, Option<IpAddr>),
    retry_slot: &mut Option<Held>,
    budget_permit: &mut Option<crate::resilience::budget::RetryPermit>,
) -> (Settled, Option<IpAddr>) {
    let (mut result, endpoint) = result;
    if let Ok(answered) = &mut result {
        answered.guards._retry = retry_slot.take();
        answered.guards._budget = budget_permit.take();
    }
    let retriable = match &result {
        Ok(answered) => retriable_response(policy, &answered.response),
        Err(e) => retriable_error(policy, e),
    };
    (if retriable { Settled::Retriable(result) } else { Settled::Answer(result) }, endpoint)
}

/// One try: pick, hold a request place, send under the try's deadline, report the outcome.
#[allow(clippy::too_many_arguments)]
async fn try_once(
    plan: &Plan<'_>,
    body: Body,
    make: &impl MakeRequest,
    upstreams: &Arc<Upstreams>,
    version: http::Version,
    attempt: u32,
    tried: &[IpAddr],
    trace: &mut Trace,
) -> (Result<Answered, Error>, Option<IpAddr>) {
    let pick = PickRequest {
        hash: plan.hash,
        client_locality: plan.client_locality,
        client_labels: plan.client_labels,
        tried,
        leave_tried_localities: plan.policy.retry_remote_localities,
    };
    let Some(endpoint) = plan.cluster.pick(&plan.members, &pick, Instant::now()) else {
        let subset = plan.target.subset.as_deref().map(|s| format!(" subset {s}")).unwrap_or_default();
        let what = if plan.members.endpoints.is_empty() { "has no endpoints" } else { "has no healthy endpoint" };
        return (Err(Error::NoHealthyUpstream(format!("{}{subset} {what}", plan.target.service.key()))), None);
    };
    let ip = endpoint.ip;
    let result = send_to(plan, &endpoint, body, make, upstreams, version, attempt, trace).await;
    let outcome = match &result {
        Ok(answered) => Some(TryOutcome::Status(answered.response.status().as_u16())),
        Err(Error::UpstreamConnect(_) | Error::UpstreamReset(_) | Error::UpstreamRefused(_) | Error::UpstreamTimeout(_)) => {
            Some(TryOutcome::LocalFailure)
        }
        Err(_) => None,
    };
    if let Some(outcome) = outcome {
        plan.cluster.report(&plan.members, &endpoint, outcome, Instant::now());
    }
    (result, Some(ip))
}

#[allow(clippy::too_many_arguments)]
async fn send_to(
    plan: &Plan<'_>,
    endpoint: &Arc<EndpointState>,
    body: Body,
    make: &impl MakeRequest,
    upstreams: &Arc<Upstreams>,
    version: http::Version,
    attempt: u32,
    trace: &mut Trace,
) -> Result<Answered, Error> {
    let mut target = plan.target.clone();
    target.endpoint = SocketAddr::new(endpoint.ip, target.endpoint.port());
    target.hostname = endpoint.hostname.clone();
    let target = target.resolved().await?;
    trace.chosen = Some(target.clone());
    let Some(request_slot) = Limits::acquire(&plan.cluster, Limit::Requests, plan.pool.http.http2_max_requests) else {
        return Err(Error::Overflow(format!("{}: requests over http2MaxRequests", plan.cluster.name())));
    };
    let active = endpoint.start();
    let request = make.make(&target, body, attempt)?;
    let try_deadline = plan.policy.per_try_timeout_ms.map(|ms| {
        let limit = Duration::from_millis(ms);
        (Instant::now() + limit, limit)
    });
    let deadline = match (try_deadline, plan.deadline) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    };
    let to = Destination { endpoint: target.endpoint, cluster: Some(&plan.cluster), pool: plan.pool };
    let send = upstreams.send(&to, version, request);
    let mut response = match deadline {
        Some((at, limit)) => tokio::time::timeout_at(at, send).await.map_err(|_| Error::UpstreamTimeout(limit))??,
        None => send.await?,
    };
    if response.headers_mut().remove(CONNECT_FAILURE_HEADER).is_some() && upstreams.tunnels_to(&target.endpoint.ip()) {
        return Err(Error::UpstreamConnect(format!("{}: the destination's agent could not connect", target.endpoint)));
    }
    let guards = Guards { _request: Some(request_slot), _retry: None, _budget: None, _active: active };
    Ok(Answered { response, guards, body_deadline: deadline.map(|(at, _)| at) })
}

/// Whether an answer meets a `retryOn` condition: its status (5xx, gateway errors, 409, listed codes) or
/// its gRPC status (in the headers of a trailers-only answer).
fn retriable_response(policy: &RetryPolicy, response: &Response<Incoming>) -> bool {
    let status = response.status().as_u16();
    let on = |c| policy.retries_on(c);
    if (on(RetryOn::FiveXx) && status >= 500)
        || (on(RetryOn::GatewayError) && matches!(status, 502..=504))
        || (on(RetryOn::Retriable4xx) && status == 409)
        || (on(RetryOn::RetriableStatusCodes) && policy.status_codes.contains(&status))
    {
        return true;
    }
    let grpc = response.headers().get("grpc-status").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u32>().ok());
    grpc.is_some_and(|code| policy.retry_on.iter().any(|c| c.grpc_code() == Some(code)))
}

/// Whether a try that got no answer meets a `retryOn` condition (Envoy: 5xx, gateway-error and reset
/// cover every failure to get an answer; connect-failure and refused-stream their own).
fn retriable_error(policy: &RetryPolicy, error: &Error) -> bool {
    let on = |c| policy.retries_on(c);
    let any_failure = on(RetryOn::FiveXx) || on(RetryOn::GatewayError) || on(RetryOn::Reset);
    match error {
        Error::UpstreamConnect(_) => any_failure || on(RetryOn::ConnectFailure),
        Error::UpstreamRefused(_) => any_failure || on(RetryOn::RefusedStream),
        Error::UpstreamReset(_) | Error::UpstreamTimeout(_) => any_failure,
        _ => false,
    }
}

/// A response body that keeps `guards` until it ends (or is dropped).
pub struct Guarded<B> {
    inner: B,
    _guards: Guards,
}

impl<B> Guarded<B> {
    pub fn new(inner: B, guards: Guards) -> Guarded<B> {
        Guarded { inner, _guards: guards }
    }
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for Guarded<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body as it streams to the first try, recorded (up to [`REPLAY_LIMIT`]) so a retry can send
/// it again; a longer body, or one the first try did not read to its end, cannot be replayed.
struct Replay {
    recorded: Arc<Mutex<Recorded>>,
}

#[derive(Default)]
struct Recorded {
    data: BytesMut,
    trailers: Option<HeaderMap>,
    complete: bool,
    overflow: bool,
}

struct Recording {
    inner: Body,
    recorded: Arc<Mutex<Recorded>>,
}

impl Replay {
    /// The body for the first try, and its recorder.
    fn record(body: Body) -> (Body, Option<Replay>) {
        let recorded = Arc::new(Mutex::new(Recorded { complete: body.is_end_stream(), ..Default::default() }));
        let recording = Recording { inner: body, recorded: recorded.clone() };
        (recording.boxed_unsync(), Some(Replay { recorded }))
    }

    /// The same body again, when it was read whole and within the limit.
    fn replay(&mut self) -> Option<Body> {
        let recorded = self.recorded.lock().unwrap_or_else(|e| e.into_inner());
        if !recorded.complete || recorded.overflow {
            return None;
        }
        let data = recorded.data.clone().freeze();
        Some(match recorded.trailers.clone() {
            None => full(data),
            Some(trailers) => {
                let frames = [Ok::<_, BoxError>(Frame::data(data)), Ok(Frame::trailers(trailers))];
                boxed(http_body_util::StreamBody::new(futures::stream::iter(frames)))
            }
        })
    }
}

impl hyper::body::Body for Recording {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let mut recorded = self.recorded.lock().unwrap_or_else(|e| e.into_inner());
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if recorded.data.len() + data.len() > REPLAY_LIMIT {
                        recorded.overflow = true;
                        recorded.data = BytesMut::new();
                    } else if !recorded.overflow {
                        recorded.data.extend_from_slice(data);
                    }
                } else if let Some(trailers) = frame.trailers_ref() {
                    recorded.trailers = Some(trailers.clone());
                }
            }
            Poll::Ready(None) => recorded.complete = true,
            Poll::Ready(Some(Err(_))) => recorded.overflow = true,
            Poll::Pending => {}
        }
        if self.inner.is_end_stream() {
            recorded.complete = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The retry gate on tokio's paused clock: the budget's window, `maxRetries` and the route's deadline
/// against the back-off, each at its exact boundary.
#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::{Instant, advance};

    use super::*;
    use crate::resilience::{budget::BudgetConfig, cluster::testing::web};

    /// Envoy's default: 25 ms base, capped at 250 ms.
    const BACKOFF: Backoff = Backoff::new(Duration::from_millis(25));

    fn gate<'a>(cluster: &'a Arc<Cluster>, members: &'a Members, max_retries: Option<u32>) -> RetryGate<'a> {
        RetryGate { cluster, members, max_retries, deadline: None }
    }

    #[tokio::test(start_paused = true)]
    async fn a_spent_budget_refuses_until_new_requests_enter_its_window() {
        let budget = BudgetConfig::Windowed { window: Duration::from_secs(10), percent: 20.0, floor: 0 };
        let (cluster, members) = web("", budget);
        let gate = gate(&cluster, &members, None);
        for _ in 0..10 {
            members.budget.on_request(Instant::now());
        }
        let allowed: Vec<_> = (0..5).map_while(|_| gate.open(1, &BACKOFF, Instant::now(), 0).ok()).collect();
        assert_eq!(allowed.len(), 2, "20 % of 10 requests");
        assert_eq!(gate.open(1, &BACKOFF, Instant::now(), 0).err(), Some(Refused::Overflow));
        drop(allowed);
        assert!(gate.open(1, &BACKOFF, Instant::now(), 0).is_err(), "a windowed budget counts retries made, not held");
        advance(Duration::from_millis(9_999)).await;
        members.budget.on_request(Instant::now());
        assert!(gate.open(1, &BACKOFF, Instant::now(), 0).is_err(), "11 requests, 2 retries in the window: 2.2 allows 2");
        advance(Duration::from_millis(1)).await;
        for _ in 0..4 {
            members.budget.on_request(Instant::now());
        }
        assert!(gate.open(1, &BACKOFF, Instant::now(), 0).is_ok(), "the first slot left at 10 s: 5 requests, 0 retries");
        assert_eq!(members.budget.snapshot(Instant::now()).refused, 4);
    }

    #[tokio::test(start_paused = true)]
    async fn max_retries_bounds_retries_in_flight_and_counts_the_overflow() {
        let (cluster, members) = web("    connectionPool: {http: {maxRetries: 1}}\n", BudgetConfig::Unlimited);
        let gate = gate(&cluster, &members, members.policy.connection_pool.as_ref().and_then(|p| p.http.max_retries));
        let first = gate.open(1, &BACKOFF, Instant::now(), 0).expect("one retry in flight");
        assert_eq!(gate.open(1, &BACKOFF, Instant::now(), 0).err(), Some(Refused::Overflow));
        assert_eq!(cluster.limits.in_flight(Limit::Retries), 1);
        drop(first);
        assert!(gate.open(1, &BACKOFF, Instant::now(), 0).is_ok(), "the slot came back with the retry");
        assert_eq!(cluster.view(None).overflows.retries, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_backoff_is_slept_exactly_and_a_retry_past_the_route_deadline_times_out_now() {
        let (cluster, members) = web("", BudgetConfig::Unlimited);
        let t0 = Instant::now();
        let deadline = Some((t0 + Duration::from_millis(100), Duration::from_millis(100)));
        let gate = RetryGate { deadline, ..gate(&cluster, &members, None) };
        // Retry 1 draws in [0, 25 ms), retry 2 in [0, 75 ms): the random value reduced into the range.
        let retry = gate.open(1, &BACKOFF, Instant::now(), 24_000_000).unwrap();
        assert_eq!(retry.wait, Duration::from_millis(24));
        tokio::time::sleep(retry.wait).await;
        let retry = gate.open(2, &BACKOFF, Instant::now(), 75_000_000 + 60_000_000).unwrap();
        assert_eq!(retry.wait, Duration::from_millis(60));
        tokio::time::sleep(retry.wait).await;
        assert_eq!(Instant::now() - t0, Duration::from_millis(84), "the paused clock moved by the two waits");
        // At 84 ms, a 16 ms wait would end at the deadline: no retry, the request's timeout.
        assert_eq!(gate.open(1, &BACKOFF, Instant::now(), 16_000_000).err(), Some(Refused::Deadline(Duration::from_millis(100))));
        assert!(gate.open(1, &BACKOFF, Instant::now(), 15_999_999).is_ok());
    }
}
