//! warren-testapp's `app` and `http` on this host's loopback (no mesh, no privileges): what the bookinfo
//! scenarios and the L7 proxy's tests rely on them for.
use std::{
    io::{BufRead, BufReader, Read},
    net::{SocketAddr, TcpListener},
    process::{Child, Command, Stdio},
    time::Duration,
};

use warren_testbed::app::{AppOptions, HttpReport, HttpRequests, ReceivedRequest, Upstream};

const TESTAPP: &str = env!("CARGO_BIN_EXE_warren-testapp");

struct App {
    child: Child,
    address: SocketAddr,
}

impl App {
    /// Starts `options` (its port replaced by a free one) and waits for `ready`.
    fn start(mut options: AppOptions) -> App {
        options.port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut child = Command::new(TESTAPP).args(options.to_args()).stdout(Stdio::piped()).spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready");
        App { child, address: SocketAddr::from(([127, 0, 0, 1], options.port)) }
    }

    /// Stops it and returns the requests it printed.
    fn received(mut self) -> Vec<ReceivedRequest> {
        self.child.kill().unwrap();
        let mut out = String::new();
        self.child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
        out.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http(to: SocketAddr, requests: &HttpRequests) -> HttpReport {
    let out = Command::new(TESTAPP).args(requests.to_args(to)).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[test]
fn app_calls_its_upstreams_as_bookinfo_does() {
    let ratings = App::start(AppOptions::new("ratings", "v1"));
    let reviews = App::start(AppOptions::new("reviews", "v2").call(Upstream::new("ratings", ratings.address)));
    // Accepts connections (the kernel's backlog) but never answers.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let productpage = App::start(
        AppOptions::new("productpage", "v1")
            .call(Upstream::new("details", silent.local_addr().unwrap()).timeout(Duration::from_millis(200)).retries(1))
            .call(Upstream::new("reviews", reviews.address).timeout(Duration::from_secs(3)).retries(1)),
    );
    let reviews_port = reviews.address.port();
    let requests = HttpRequests::get("/productpage?u=1", 3).header("end-user", "jason").header("x-b3-traceid", "abc");
    let report = http(productpage.address, &requests.header("x-not-propagated", "1"));
    assert!(report.errors.is_empty(), "{report:?}");
    for result in &report.results {
        assert_eq!((result.status, result.version.as_str()), (200, "HTTP/1.1"));
        let page = result.app().expect("an app's answer");
        let seen = (page.service.as_str(), page.path.as_str(), page.headers["end-user"].as_str());
        assert_eq!(seen, ("productpage", "/productpage?u=1", "jason"));
        let details = page.call("details").unwrap();
        assert_eq!((details.error.as_deref(), details.attempts), (Some("timeout"), 2), "{details:?}");
        assert!(details.latency_ms >= 400, "two attempts of 200 ms: {details:?}");
        let reviews = page.call("reviews").unwrap().response().expect("reviews answered");
        let host = format!("reviews:{}", reviews_port);
        assert_eq!((reviews.version.as_str(), reviews.host.as_str()), ("v2", host.as_str()));
        assert_eq!(reviews.path, "/reviews/0");
        let propagated = (reviews.headers.get("end-user"), reviews.headers.get("x-b3-traceid"));
        assert_eq!(propagated, (Some(&"jason".into()), Some(&"abc".into())));
        assert!(!reviews.headers.contains_key("x-not-propagated"), "{reviews:?}");
        let ratings = reviews.call("ratings").unwrap();
        assert_eq!((ratings.status, ratings.response().unwrap().service.as_str()), (Some(200), "ratings"));
    }
    drop(productpage);
    // Keep-alive: productpage's three requests reached reviews on one connection, all printed.
    let received = reviews.received();
    assert_eq!(received.len(), 3, "{received:?}");
    let expected = |r: &ReceivedRequest| r.event == "request" && r.path == "/reviews/0" && r.headers["end-user"] == "jason";
    assert!(received.iter().all(expected));
}

#[test]
fn app_answers_status_delay_h2c_grpc_and_upgrades() {
    let app = App::start(AppOptions::new("echo", "v7"));
    let status = http(app.address, &HttpRequests::get("/status/503", 1));
    assert_eq!(status.results[0].status, 503);

    let delayed = http(app.address, &HttpRequests::get("/delay/300", 2).concurrency(2));
    let waited = |r: &warren_testbed::HttpResult| r.status == 200 && r.latency() >= Duration::from_millis(300);
    assert!(delayed.results.iter().all(waited), "{delayed:?}");
    let mut timed_out = HttpRequests::get("/x?delay_ms=2000", 1);
    timed_out.timeout_ms = 200;
    assert_eq!(http(app.address, &timed_out).results[0].error.as_deref(), Some("timeout"));

    let mut h2 = HttpRequests::get("/h2", 4).concurrency(2);
    h2.http2 = true;
    h2.host = Some("echo.default:80".into());
    let report = http(app.address, &h2);
    for result in &report.results {
        assert_eq!((result.status, result.version.as_str()), (200, "HTTP/2.0"), "{report:?}");
        assert_eq!(result.app().unwrap().host, "echo.default:80");
    }

    let mut grpc =
        HttpRequests::get("/echo.Echo/Say", 1).header("content-type", "application/grpc").header("x-grpc-status", "7");
    (grpc.method, grpc.http2, grpc.body_bytes) = ("POST".into(), true, 9);
    let report = http(app.address, &grpc);
    let result = &report.results[0];
    assert_eq!((result.status, result.headers["content-type"].as_str()), (200, "application/grpc"), "{report:?}");
    assert_eq!((result.trailers["grpc-status"].as_str(), result.trailers["x-echo-service"].as_str()), ("7", "echo"));

    let mut upgrade = HttpRequests::get("/ws", 2);
    upgrade.upgrade_websocket = true;
    let report = http(app.address, &upgrade);
    assert!(report.results.iter().all(|r| r.status == 101), "{report:?}");
    assert_eq!(report.results[1].body, "warren-testapp upgraded echo #1");

    let received = app.received();
    assert_eq!(received.iter().filter(|r| r.version == "HTTP/2.0").count(), 5, "{received:?}");
    assert!(received.iter().any(|r| r.path == "/ws" && r.headers["upgrade"] == "websocket"));
}
