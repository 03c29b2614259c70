//! `cargo xtask demo`: the Istio course's traffic-management labs on a local mesh, no cluster — bookinfo
//! stand-ins as netns pods on two nodes (the testbed's [`BookinfoLab`]), the controller in directory mode,
//! the shared conformance YAMLs applied unchanged in the order of Istio's tasks, and after each step a
//! table of what the product page showed: which reviews version answered, status codes, latency.
//! Each step also checks the outcome Istio documents; the demo fails when one does not hold.
use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use warren_testbed::bookinfo::{BookinfoLab, JASON, Page};

const DESTINATION_RULES: &str = "destination-rule-all.yaml";
const ALL_V1: &str = "virtual-service-all-v1.yaml";
const TEST_V2: &str = "virtual-service-reviews-test-v2.yaml";
const DELAY: &str = "virtual-service-ratings-test-delay.yaml";
const ABORT: &str = "virtual-service-ratings-test-abort.yaml";
const FIFTY_V3: &str = "virtual-service-reviews-50-v3.yaml";

pub fn run(keep: bool) -> Result<()> {
    if let Err(reason) = warren_testbed::check_privileges() {
        bail!("the demo needs root, BPF, cgroup2 and network namespaces: {reason}");
    }
    println!("Warren demo: Istio's bookinfo labs, no cluster, no sidecar, no waypoint.");
    println!("Starting two nodes, bookinfo's pods (productpage, details, reviews v1/v2/v3, ratings), a client");
    println!("`sleep`, warren-controller reading a directory, and one warren-agent per node…");
    let lab = BookinfoLab::start("demo")?;
    println!("Ready. The controller's directory: {}\n", lab.dir.display());
    println!("{}", lab.agent1.inspect_live(&["services"])?);
    let result = labs(&lab);
    if let Err(e) = &result {
        eprintln!("\n{}", lab.logs());
        eprintln!("\nA lab's outcome was not what Istio documents: {e:#}");
    }
    if keep {
        println!("\nThe mesh keeps running. Edit the controller's directory ({}) and, in another shell:", lab.dir.display());
        let agent = warren_testbed::bin_path("warren-agent")?;
        for what in ["routes", "faults", "policies", "connections"] {
            println!("  ip netns exec {} {} inspect {what}", lab.agent1.netns(), agent.display());
        }
        println!("Ctrl-C to tear down.");
        wait_for_interrupt().context("waiting for Ctrl-C")?;
    }
    println!("\nTearing down (pods, nodes, agents, controller).");
    result
}

fn labs(lab: &BookinfoLab) -> Result<()> {
    step("No routing rules: reviews is a service of three versions, each request goes to any of them");
    let pages = lab.productpage_with(None, 60, 8)?;
    show(&[("anyone", &pages)]);
    ensure!(tally(&pages).len() == 3, "every version answers");

    step(&format!("Request routing: {DESTINATION_RULES} + {ALL_V1} — everything to v1"));
    lab.apply(DESTINATION_RULES)?;
    lab.apply(ALL_V1)?;
    let pages = lab.productpage(None, 60)?;
    show(&[("anyone", &pages)]);
    ensure!(tally(&pages).keys().eq(["v1"]), "all v1");

    step(&format!("Request routing: {TEST_V2} — jason (header end-user: jason) to v2, everyone else to v1"));
    lab.apply(TEST_V2)?;
    let (jason, others) = (lab.productpage(Some(JASON), 30)?, lab.productpage(None, 30)?);
    show(&[("jason", &jason), ("anyone else", &others)]);
    ensure!(tally(&jason).keys().eq(["v2"]) && tally(&others).keys().eq(["v1"]), "jason v2, others v1");

    step(&format!("Fault injection: {DELAY} — a 7 s delay on jason's ratings calls"));
    lab.apply(DELAY)?;
    let (jason, others) = (lab.productpage(Some(JASON), 1)?, lab.productpage(None, 10)?);
    show(&[("jason", &jason), ("anyone else", &others)]);
    println!("  productpage gives up on reviews after 3 s + one retry (bookinfo's client timeouts): the page");
    println!("  shows \"Sorry, product reviews are currently unavailable\" after ≈6 s, as Istio's task documents.");
    ensure!(jason[0].reviews.is_err() && jason[0].latency >= Duration::from_secs(5), "jason's reviews time out");

    step(&format!("Fault injection: {ABORT} — jason's ratings calls answered HTTP 500"));
    lab.remove(DELAY)?;
    lab.apply(ABORT)?;
    let (jason, others) = (lab.productpage(Some(JASON), 20)?, lab.productpage(None, 20)?);
    show(&[("jason", &jason), ("anyone else", &others)]);
    ensure!(jason.iter().all(|p| p.ratings == Some(Ok(500))), "\"Ratings service is currently unavailable\"");

    step(&format!("Traffic shifting: {FIFTY_V3} (after all-v1) — half of the requests to v3"));
    lab.remove(ABORT)?;
    lab.remove(TEST_V2)?;
    lab.apply(FIFTY_V3)?;
    let pages = lab.productpage_with(None, 400, 8)?;
    show(&[("anyone", &pages)]);
    let v3 = tally(&pages).get("v3").copied().unwrap_or(0) as f64 / pages.len() as f64;
    ensure!((v3 - 0.5).abs() <= 0.08, "about half to v3, got {:.0} %", v3 * 100.0);
    println!("\nEvery lab behaved as Istio's tasks document.");
    Ok(())
}

fn step(title: &str) {
    println!("\n== {title}");
}

fn tally(pages: &[Page]) -> BTreeMap<String, usize> {
    warren_testbed::bookinfo::reviews_tally(pages)
}

/// One row per group of pages: how many each reviews version served, the statuses, what ratings did, and
/// the page latency (p50 / max).
fn show(groups: &[(&str, &[Page])]) {
    println!("  {:<12} {:>5}  {:<34} {:<22} {:<18} {:>8} {:>8}", "who", "pages", "reviews", "status", "ratings", "p50", "max");
    for (who, pages) in groups {
        let reviews = tally(pages).iter().map(|(v, n)| format!("{v}:{n}")).collect::<Vec<_>>().join(" ");
        let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
        let mut ratings: BTreeMap<String, usize> = BTreeMap::new();
        for page in pages.iter() {
            *statuses.entry(page.status).or_default() += 1;
            let rating = match &page.ratings {
                Some(Ok(status)) => status.to_string(),
                Some(Err(e)) => e.clone(),
                None => "-".into(),
            };
            *ratings.entry(rating).or_default() += 1;
        }
        let counts = |m: &BTreeMap<String, usize>| m.iter().map(|(k, n)| format!("{k}:{n}")).collect::<Vec<_>>().join(" ");
        let statuses = statuses.iter().map(|(s, n)| format!("{s}:{n}")).collect::<Vec<_>>().join(" ");
        let mut latencies: Vec<Duration> = pages.iter().map(|p| p.latency).collect();
        latencies.sort();
        let p50 = latencies.get(latencies.len() / 2).copied().unwrap_or_default();
        let max = latencies.last().copied().unwrap_or_default();
        println!(
            "  {who:<12} {:>5}  {reviews:<34} {statuses:<22} {:<18} {:>8} {:>8}",
            pages.len(),
            counts(&ratings),
            format!("{:.0?}", p50),
            format!("{:.0?}", max)
        );
    }
}

fn wait_for_interrupt() -> Result<()> {
    // Block SIGINT/SIGTERM and wait for one, so the testbed's Drop still runs afterwards.
    // SAFETY: a zeroed sigset_t is a valid argument for sigemptyset, which initialises it; the calls only
    // touch this local set and the calling thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let mut sig = 0;
        libc::sigwait(&set, &mut sig);
    }
    Ok(())
}
