//! Gateways and egress on the bookinfo lab (warren_e2e::bookinfo), as Istio's ingress and egress tasks use
//! them: Istio's `bookinfo-gateway.yaml` applied unchanged routes a user outside the mesh to productpage
//! through a pod labelled `istio: ingressgateway` (served by its node's agent, no proxy in the pod); a TLS
//! Gateway terminates HTTPS with a `credentialName` Secret; a ServiceEntry opens one host outside the mesh
//! under `outboundTrafficPolicy: REGISTRY_ONLY` and everything else unknown is refused.
//!
//! The "internet" is un-enrolled pods (their own netns, reached without the mesh); the user is one of them.
use std::{net::SocketAddr, process::Command, time::Duration};

use anyhow::{Context, Result, ensure};
use warren_e2e::{bookinfo::{BookinfoLab, Page}, eventually};
use warren_testbed::{AppOptions, HttpRequests, HttpResult, Pod, require_privileges};

const GATEWAY_NAMESPACE: &str = "istio-system";

/// The ingress gateway's pod (node-1, namespace istio-system, which is not in the mesh: the pod's own label
/// enrolls it) and the user's pod (node-2, outside the mesh).
struct Ingress {
    gateway: Pod,
    user: Pod,
}

fn ingress(lab: &BookinfoLab) -> Result<Ingress> {
    let gateway = lab.nodes[0].add_pod_in(GATEWAY_NAMESPACE, "istio-ingressgateway", true)?;
    let user = lab.nodes[1].add_pod("user", false)?;
    let yaml = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {GATEWAY_NAMESPACE}}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata:\n  name: istio-ingressgateway\n  namespace: {GATEWAY_NAMESPACE}\n  uid: {}\n  \
         labels: {{istio: ingressgateway, warren.dev/mesh: enabled}}\n\
         spec: {{nodeName: node-1, serviceAccountName: istio-ingressgateway, containers: [{{name: gateway, image: warren-agent}}]}}\n\
         status: {{phase: Running, podIP: {}}}\n",
        gateway.uid, gateway.ip
    );
    lab.apply_yaml("00-ingress-gateway-pod", &yaml)?;
    lab.agent1.wait_enrolled(&gateway, true, Duration::from_secs(20))?;
    Ok(Ingress { gateway, user })
}

impl Ingress {
    fn get(&self, port: u16, path: &str, host: Option<&str>) -> Result<HttpResult> {
        let mut requests = HttpRequests::get(path, 1);
        requests.host = host.map(String::from);
        requests.timeout_ms = 10_000;
        Ok(self.user.http(SocketAddr::new(self.gateway.ip.into(), port), &requests)?.remove(0))
    }

    /// `curl` from the user's pod: the status, or curl's exit code and message.
    fn curl(&self, args: &[&str]) -> Result<std::result::Result<u16, String>> {
        let mut curl = Command::new("curl");
        curl.args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10"]).args(args);
        let out = self.user.run(curl)?;
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Ok(match out.status.success() {
            true => Ok(stdout.parse().with_context(|| format!("curl printed {stdout:?}"))?),
            false => Err(format!("curl {:?}: {}", out.status.code(), String::from_utf8_lossy(&out.stderr).trim())),
        })
    }
}

/// Istio's ingress task: `bookinfo-gateway.yaml` (Gateway port 80, hosts `*`; VirtualService `bookinfo`
/// with /productpage, /static, /login, /logout, /api/v1/products → productpage:9080), unchanged.
#[test]
fn bookinfo_gateway_routes_the_users_requests_to_productpage() -> Result<()> {
    require_privileges!(Ok(()));
    BookinfoLab::scenario("gw-bookinfo", &[], |lab| {
        let ingress = ingress(lab)?;
        // Control: without the Gateway, nothing serves port 80 of the gateway pod.
        let before = ingress.get(80, "/productpage", None)?;
        ensure!(before.status == 0, "no gateway yet, yet port 80 answered: {before:?}");

        lab.apply("bookinfo-gateway.yaml")?;
        let page = eventually(Duration::from_secs(10), || {
            let page = Page::from_result(&ingress.get(80, "/productpage", Some("bookinfo.example")).ok()?);
            (page.status == 200).then_some(page)
        })
        .context("no product page through the gateway")?;
        ensure!(page.details == Some(Ok(200)) && page.reviews.is_ok(), "the whole page, with details and reviews: {page:?}");
        for path in ["/static/style.css", "/login", "/api/v1/products"] {
            let result = ingress.get(80, path, None)?;
            let app = result.app().with_context(|| format!("{path}: not productpage's answer: {result:?}"))?;
            ensure!(result.status == 200 && app.service == "productpage", "{path}: {result:?}");
        }
        // Only what the VirtualService routes: another path is Envoy's 404 (NR), not productpage's.
        let other = ingress.get(80, "/admin", None)?;
        ensure!(other.status == 404 && other.app().is_none(), "an unrouted path: {other:?}");
        let view = lab.agent1.inspect_live(&["gateways", "-n", GATEWAY_NAMESPACE])?;
        ensure!(view.contains("default/bookinfo-gateway") && view.contains("VirtualService default/bookinfo") && view.contains("serving"), "{view}");
        // `warren-agent analyze` on the node: nothing wrong; then a server Warren cannot serve (TCP) is an
        // error naming the Gateway, the server and why, and the exit status says so.
        let healthy = lab.agent1.cli(&["analyze", "-n", "default"])?;
        ensure!(healthy.status.success() && String::from_utf8_lossy(&healthy.stdout).contains("No problems"), "{healthy:?}");
        let tcp = "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: raw-tcp, namespace: default}\n\
            spec: {selector: {istio: ingressgateway}, servers: [{port: {number: 9000, name: tcp, protocol: TCP}, hosts: ['*']}]}\n";
        lab.apply_yaml("raw-tcp-gateway", tcp)?;
        let found = lab.agent1.cli(&["analyze"])?;
        let report = String::from_utf8_lossy(&found.stdout);
        ensure!(!found.status.success() && report.contains("Error [WAR0205] (Gateway default/raw-tcp) spec.servers[0] port 9000"), "{found:?}");
        // The gateway reached productpage over HBONE as its own identity.
        let connections = lab.agent1.connections()?.to_string();
        ensure!(connections.contains("spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway"), "{connections}");
        Ok(())
    })
}

/// A TLS certificate for `host` signed by a fresh CA: (CA PEM, chain PEM, key PEM).
fn certificate(host: &str) -> Result<(String, String, String)> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name.push(rcgen::DnType::CommonName, "bookinfo test CA");
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate()?;
    let leaf = rcgen::CertificateParams::new(vec![host.to_string()])?;
    let cert = leaf.signed_by(&key, &issuer)?;
    Ok((ca_cert.pem(), cert.pem(), key.serialize_pem()))
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            out.push(if i <= chunk.len() { ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char } else { '=' });
        }
    }
    out
}

/// Istio's secure-ingress task: a Gateway server on 443, `tls.mode: SIMPLE` with `credentialName`, a
/// `kubernetes.io/tls` Secret in the gateway's namespace; the client trusts the CA and sends the SNI.
#[test]
fn a_tls_gateway_terminates_https_with_its_credential() -> Result<()> {
    require_privileges!(Ok(()));
    BookinfoLab::scenario("gw-tls", &[], |lab| {
        let ingress = ingress(lab)?;
        let (ca, chain, key) = certificate("bookinfo.example.com")?;
        std::fs::write(lab.dir.join("../ca.pem"), &ca)?;
        let ca_file = lab.dir.join("../ca.pem").canonicalize()?;
        let yaml = format!(
            "apiVersion: v1\nkind: Secret\ntype: kubernetes.io/tls\nmetadata: {{name: bookinfo-credential, namespace: {GATEWAY_NAMESPACE}}}\n\
             data: {{tls.crt: {}, tls.key: {}}}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: bookinfo-tls, namespace: default}}\n\
             spec:\n  selector: {{istio: ingressgateway}}\n  servers:\n  - port: {{number: 443, name: https, protocol: HTTPS}}\n\
             \x20   tls: {{mode: SIMPLE, credentialName: bookinfo-credential}}\n    hosts: [bookinfo.example.com]\n---\n\
             apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: bookinfo-tls, namespace: default}}\n\
             spec:\n  hosts: [bookinfo.example.com]\n  gateways: [bookinfo-tls]\n  http:\n\
             \x20 - match: [{{uri: {{exact: /productpage}}}}]\n    route: [{{destination: {{host: productpage, port: {{number: 9080}}}}}}]\n",
            base64(chain.as_bytes()),
            base64(key.as_bytes())
        );
        lab.apply_yaml("tls-gateway", &yaml)?;
        let ip = ingress.gateway.ip.to_string();
        let resolve = format!("bookinfo.example.com:443:{ip}");
        let https = |host: &str| {
            let resolve = format!("{host}:443:{ip}");
            let url = format!("https://{host}/productpage");
            ingress.curl(&["--cacert", ca_file.to_str().unwrap_or_default(), "--resolve", &resolve, &url])
        };
        let status = eventually(Duration::from_secs(10), || https("bookinfo.example.com").ok()?.ok().filter(|s| *s == 200));
        ensure!(status == Some(200), "HTTPS through the gateway: {:?}", https("bookinfo.example.com")?);
        // Controls: a host the server does not take gets no handshake; the CA's trust is what made it work
        // (without --cacert the certificate is not trusted); plaintext on 443 is no HTTP server.
        let other = https("other.example.com")?;
        ensure!(other.is_err(), "a host no TLS server takes: {other:?}");
        let untrusted = ingress.curl(&["--resolve", &resolve, "https://bookinfo.example.com/productpage"])?;
        ensure!(untrusted.as_ref().is_err_and(|e| e.contains("certificate")), "without the CA: {untrusted:?}");
        let plaintext = ingress.get(443, "/productpage", Some("bookinfo.example.com"))?;
        ensure!(plaintext.status == 0, "plaintext to the TLS port: {plaintext:?}");
        Ok(())
    })
}

/// Istio's egress task: with `outboundTrafficPolicy: REGISTRY_ONLY` in the mesh config, a workload reaches
/// the host a ServiceEntry declares and nothing else outside the registry; a VirtualService's fault
/// applies to the external host as to any service.
#[test]
fn registry_only_lets_the_service_entry_host_through_and_refuses_the_rest() -> Result<()> {
    require_privileges!(Ok(()));
    BookinfoLab::scenario("gw-egress", &[], |lab| {
        let api = lab.nodes[1].add_pod("api-external", false)?;
        let other = lab.nodes[1].add_pod("other-external", false)?;
        let _servers = [api.serve_app(&AppOptions::new("api", "v1"))?, other.serve_app(&AppOptions::new("other", "v1"))?];
        let (api_addr, other_addr) = (SocketAddr::new(api.ip.into(), 9080), SocketAddr::new(other.ip.into(), 9080));
        let get = |to: SocketAddr| -> Result<HttpResult> {
            let mut requests = HttpRequests::get("/", 1);
            requests.timeout_ms = 5_000;
            Ok(lab.sleep.http(to, &requests)?.remove(0))
        };
        // Control: ALLOW_ANY (Istio's default) reaches both.
        ensure!(get(api_addr)?.status == 200 && get(other_addr)?.status == 200, "ALLOW_ANY");

        let yaml = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: istio, namespace: istio-system}}\n\
             data:\n  mesh: |\n    outboundTrafficPolicy:\n      mode: REGISTRY_ONLY\n---\n\
             apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: api-external, namespace: default}}\n\
             spec:\n  hosts: [api.external.example]\n  addresses: ['{}/32']\n  location: MESH_EXTERNAL\n  resolution: NONE\n\
             \x20 ports: [{{number: 9080, name: http, protocol: HTTP}}]\n",
            api.ip
        );
        lab.apply_yaml("egress", &yaml)?;
        let allowed = get(api_addr)?;
        ensure!(allowed.status == 200 && allowed.app().is_some_and(|a| a.service == "api"), "the entry's host: {allowed:?}");
        let refused = get(other_addr)?;
        ensure!(refused.status == 0, "a host outside the registry must be refused: {refused:?}");
        ensure!(lab.agent1.metric("warren_outbound_registry_only_refused_total", &[])? >= 1.0, "counted");

        // Routing applies to the external host: a fault on it answers for it.
        let fault = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: api-external, namespace: default}\n\
             spec:\n  hosts: [api.external.example]\n  http:\n  - fault: {abort: {httpStatus: 418, percentage: {value: 100}}}\n\
             \x20   route: [{destination: {host: api.external.example}}]\n";
        lab.apply_yaml("egress-fault", fault)?;
        let aborted = get(api_addr)?;
        ensure!(aborted.status == 418 && aborted.app().is_none(), "the fault answers for the external host: {aborted:?}");
        Ok(())
    })
}

/// Istio's egress-gateway task: a ServiceEntry for the external host, a Gateway for the egress gateway's
/// pods, and one VirtualService that sends the mesh's requests for the host to the egress gateway and the
/// gateway's on to the host. The external server sees the gateway's `x-forwarded-for`; the gateway's agent
/// (node-2) carried the request.
#[test]
fn an_egress_gateway_carries_the_meshs_requests_to_the_external_host() -> Result<()> {
    require_privileges!(Ok(()));
    BookinfoLab::scenario("gw-egress-gateway", &[], |lab| {
        let egress = lab.nodes[1].add_pod_in(GATEWAY_NAMESPACE, "istio-egressgateway", true)?;
        let api = lab.nodes[1].add_pod("api-external", false)?;
        let server = api.serve_app(&AppOptions::new("api", "v1"))?;
        let yaml = format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {GATEWAY_NAMESPACE}}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata:\n  name: istio-egressgateway\n  namespace: {GATEWAY_NAMESPACE}\n  uid: {uid}\n  \
             labels: {{istio: egressgateway, warren.dev/mesh: enabled}}\n\
             spec: {{nodeName: node-2, serviceAccountName: istio-egressgateway, containers: [{{name: gateway, image: warren-agent}}]}}\n\
             status: {{phase: Running, podIP: {ip}}}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {{name: istio-egressgateway, namespace: {GATEWAY_NAMESPACE}}}\n\
             spec: {{clusterIP: 10.96.9.9, selector: {{istio: egressgateway}}, ports: [{{name: http2, port: 80, targetPort: 80}}]}}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: api-external, namespace: default}}\n\
             spec:\n  hosts: [api.external.example]\n  addresses: [240.240.0.10]\n  location: MESH_EXTERNAL\n  resolution: STATIC\n\
             \x20 endpoints: [{{address: {api_ip}}}]\n  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 9080}}]\n",
            uid = egress.uid,
            ip = egress.ip,
            api_ip = api.ip,
        );
        lab.apply_yaml("00-egress-gateway", &yaml)?;
        lab.agent2.wait_enrolled(&egress, true, Duration::from_secs(20))?;
        let get = || -> Result<HttpResult> {
            let mut requests = HttpRequests::get("/", 1);
            requests.host = Some("api.external.example".into());
            requests.timeout_ms = 5_000;
            Ok(lab.sleep.http("240.240.0.10:80".parse()?, &requests)?.remove(0))
        };
        let forwarded_for = || -> Result<Option<String>> {
            let last = warren_testbed::app::received(&server)?.pop().context("the external server got no request")?;
            Ok(last.headers.get("x-forwarded-for").cloned())
        };
        // Control: the ServiceEntry alone sends the request straight to the host (no gateway on the way).
        ensure!(get()?.status == 200, "the external host through its ServiceEntry");
        ensure!(forwarded_for()?.is_none(), "no gateway yet, yet x-forwarded-for: {:?}", forwarded_for()?);

        let routing = format!(
            "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: istio-egressgateway, namespace: default}}\n\
             spec:\n  selector: {{istio: egressgateway}}\n  servers:\n  - port: {{number: 80, name: http, protocol: HTTP}}\n    hosts: [api.external.example]\n---\n\
             apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: direct-api-through-egress-gateway, namespace: default}}\n\
             spec:\n  hosts: [api.external.example]\n  gateways: [istio-egressgateway, mesh]\n  http:\n\
             \x20 - match: [{{gateways: [mesh], port: 80}}]\n    route: [{{destination: {{host: istio-egressgateway.{GATEWAY_NAMESPACE}.svc.cluster.local, port: {{number: 80}}}}}}]\n\
             \x20 - match: [{{gateways: [istio-egressgateway], port: 80}}]\n    route: [{{destination: {{host: api.external.example, port: {{number: 80}}}}}}]\n"
        );
        lab.apply_yaml("egress-gateway-routing", &routing)?;
        let through = get()?;
        ensure!(through.status == 200 && through.app().is_some_and(|a| a.service == "api"), "through the egress gateway: {through:?}");
        ensure!(forwarded_for()? == Some(lab.sleep.ip.to_string()), "the gateway's x-forwarded-for names the client: {:?}", forwarded_for()?);
        let carried = lab.agent2.connections()?.to_string();
        ensure!(carried.contains("istio-system/istio-egressgateway") && carried.contains("\"gateway\""), "node-2's connections: {carried}");
        Ok(())
    })
}

/// An `openssl s_server` in `pod` on 8443 with a certificate for `host` (from its own CA); the CA's PEM
/// file, and the server process.
fn tls_server(lab: &BookinfoLab, pod: &Pod, host: &str) -> Result<(std::path::PathBuf, warren_testbed::Process)> {
    let (ca, chain, key) = certificate(host)?;
    let dir = lab.bed.state_dir().join(format!("tls-{host}"));
    std::fs::create_dir_all(&dir)?;
    for (name, pem) in [("ca.pem", &ca), ("cert.pem", &chain), ("key.pem", &key)] {
        std::fs::write(dir.join(name), pem)?;
    }
    let mut server = Command::new("openssl");
    server.args(["s_server", "-www", "-accept", "8443", "-cert"]).arg(dir.join("cert.pem")).arg("-key").arg(dir.join("key.pem"));
    let mut process = pod.spawn(server)?;
    // s_server says ACCEPT once it listens.
    process.wait_for_line("ACCEPT", Duration::from_secs(10)).with_context(|| format!("openssl s_server in {}", pod.name))?;
    Ok((dir.join("ca.pem"), process))
}

const SECURE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: secure-a, namespace: default}\n\
    spec: {clusterIP: 10.96.7.1, selector: {app: secure-a}, ports: [{name: tls, port: 8443, targetPort: 8443}]}\n---\n\
    apiVersion: v1\nkind: Service\nmetadata: {name: secure-b, namespace: default}\n\
    spec: {clusterIP: 10.96.7.2, selector: {app: secure-b}, ports: [{name: tls, port: 8443, targetPort: 8443}]}\n";

/// TLS routed by its SNI without being terminated, as Istio's ingress SNI-passthrough task and mesh `tls`
/// rules: each backend serves its own certificate, so a client that verifies it knows which one answered.
#[test]
fn tls_is_routed_by_sni_unterminated_at_a_passthrough_gateway_and_in_the_mesh() -> Result<()> {
    require_privileges!(Ok(()));
    BookinfoLab::scenario("gw-passthrough", &[], |lab| {
        let ingress = ingress(lab)?;
        let (a, b) = (lab.nodes[0].add_pod("secure-a", true)?, lab.nodes[1].add_pod("secure-b", true)?);
        let pods = [(&a, "secure-a", "node-1"), (&b, "secure-b", "node-2")]
            .map(|(pod, app, node)| warren_e2e::pod_yaml(pod, node, &format!("app: {app}")))
            .concat();
        lab.apply_yaml("00-secure", &format!("{SECURE}---\n{pods}"))?;
        lab.agent1.wait_enrolled(&a, true, Duration::from_secs(20))?;
        lab.agent2.wait_enrolled(&b, true, Duration::from_secs(20))?;
        let (ca_a, _server_a) = tls_server(lab, &a, "a.example.com")?;
        let (ca_b, _server_b) = tls_server(lab, &b, "b.example.com")?;

        // At the gateway: port 443, PASSTHROUGH, b.example.com → secure-b.
        let gateway = "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: passthrough, namespace: default}\n\
            spec:\n  selector: {istio: ingressgateway}\n  servers:\n  - port: {number: 443, name: tls, protocol: TLS}\n\
            \x20   tls: {mode: PASSTHROUGH}\n    hosts: [b.example.com]\n---\n\
            apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: passthrough, namespace: default}\n\
            spec:\n  hosts: [b.example.com]\n  gateways: [passthrough]\n  tls:\n\
            \x20 - match: [{port: 443, sniHosts: [b.example.com]}]\n    route: [{destination: {host: secure-b, port: {number: 8443}}}]\n";
        lab.apply_yaml("passthrough-gateway", gateway)?;
        let ip = ingress.gateway.ip.to_string();
        let through_gateway = |host: &str, ca: &std::path::Path| {
            let resolve = format!("{host}:443:{ip}");
            ingress.curl(&["--cacert", ca.to_str().unwrap_or_default(), "--resolve", &resolve, &format!("https://{host}/")])
        };
        let reached = eventually(Duration::from_secs(10), || through_gateway("b.example.com", &ca_b).ok()?.ok());
        ensure!(reached == Some(200), "b's own certificate through the gateway: {:?}", through_gateway("b.example.com", &ca_b)?);
        let other = through_gateway("a.example.com", &ca_a)?;
        ensure!(other.is_err(), "a host the PASSTHROUGH server does not take is closed: {other:?}");

        // In the mesh: sleep connects to secure-a's VIP; with SNI b.example.com a `tls` rule sends it to b.
        let mesh = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: secure-a, namespace: default}\n\
            spec:\n  hosts: [secure-a]\n  tls:\n\
            \x20 - match: [{sniHosts: [b.example.com]}]\n    route: [{destination: {host: secure-b}}]\n";
        let from_sleep = |host: &str, ca: &std::path::Path| -> Result<std::result::Result<u16, String>> {
            let mut curl = Command::new("curl");
            let resolve = format!("{host}:8443:10.96.7.1");
            curl.args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10", "--cacert"]).arg(ca).args(["--resolve", &resolve, &format!("https://{host}:8443/")]);
            let out = lab.sleep.run(curl)?;
            Ok(if out.status.success() { Ok(200) } else { Err(String::from_utf8_lossy(&out.stderr).trim().to_string()) })
        };
        ensure!(from_sleep("b.example.com", &ca_b)?.is_err(), "control: without the rule, secure-a answers b.example.com with a's certificate");
        lab.apply_yaml("secure-a-tls-route", mesh)?;
        ensure!(from_sleep("b.example.com", &ca_b)? == Ok(200), "the tls rule sends b.example.com to b");
        ensure!(from_sleep("a.example.com", &ca_a)? == Ok(200), "an SNI no rule takes goes to the service itself");
        Ok(())
    })
}
