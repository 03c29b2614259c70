//! Istio's traffic-management tasks on bookinfo (request routing, traffic shifting, fault injection), with
//! the samples of the shared conformance data unchanged, as the tasks apply them; the lab is
//! warren_e2e::bookinfo's (productpage, details, ratings and the client `sleep` on node-1, reviews v1/v2/v3
//! on node-2, stand-ins with bookinfo's timeouts and keep-alive connections).
//!
//! Routing by header, weights per request and faults need the agent's L7 proxy: bookinfo's apps keep their
//! connections alive, so routing each connection (L4) decides for every request on it.
use std::{collections::BTreeMap, time::Duration};

use anyhow::{Result, ensure};
use warren_e2e::bookinfo::{BookinfoLab, JASON, Page, reviews_tally};
use warren_testbed::require_privileges;

const DESTINATION_RULES: &str = "destination-rule-all.yaml";
const ALL_V1: &str = "virtual-service-all-v1.yaml";

fn all_ok(pages: &[Page]) -> Result<()> {
    let bad: Vec<&Page> = pages.iter().filter(|p| p.status != 200 || p.details != Some(Ok(200))).collect();
    ensure!(bad.is_empty(), "{} of {} pages failed, e.g. {:?}", bad.len(), pages.len(), bad.first());
    Ok(())
}

/// `count` of `total` is `share` of it, give or take five points.
fn within_five_points(count: usize, total: usize, share: f64) -> bool {
    (count as f64 / total as f64 - share).abs() <= 0.05
}

/// Control for the routing tasks: with no VirtualService, reviews is a plain service of three pods and
/// productpage's calls reach every version (v1 without ratings, v2 and v3 with).
#[test]
fn without_virtual_services_reviews_answers_from_every_version() -> Result<()> {
    require_privileges!(Ok(()));
    BookinfoLab::scenario("bookinfo-control", &[], |lab| {
        // 32 pages at a time over as many connections: the L7 proxy balances every request (and even a
        // per-connection route would reach all three versions but for a chance of 3 × (2/3)^32).
        let pages = lab.productpage_with(None, 128, 32)?;
        all_ok(&pages)?;
        let tally = reviews_tally(&pages);
        ensure!(tally.keys().eq(["v1", "v2", "v3"]), "reviews versions that answered: {tally:?}");
        for page in &pages {
            match page.reviews.as_deref() {
                Ok("v1") => ensure!(page.ratings.is_none(), "reviews v1 calls no ratings: {page:?}"),
                _ => ensure!(page.ratings == Some(Ok(200)), "reviews v2/v3 show ratings: {page:?}"),
            }
        }
        Ok(())
    })
}

/// Request routing, step 1: `virtual-service-all-v1.yaml` (with `destination-rule-all.yaml`) sends every
/// request to v1: the page never shows ratings. Applied to a running lab whose apps hold keep-alive
/// connections to every version: the next requests on them follow the new rules.
#[test]
fn all_v1_routes_every_page_to_reviews_v1() -> Result<()> {
    require_privileges!(Ok(()));
    BookinfoLab::scenario("bookinfo-all-v1", &[], |lab| {
        let before = reviews_tally(&lab.productpage_with(None, 60, 8)?);
        ensure!(before.len() == 3, "control: every version answers before the rules: {before:?}");
        lab.apply(DESTINATION_RULES)?;
        lab.apply(ALL_V1)?;
        let pages = lab.productpage_with(None, 200, 16)?;
        all_ok(&pages)?;
        let tally = reviews_tally(&pages);
        ensure!(tally == BTreeMap::from([("v1".to_string(), 200)]), "reviews versions: {tally:?}");
        ensure!(pages.iter().all(|p| p.ratings.is_none()), "no ratings on v1 pages");
        let jason = lab.productpage(Some(JASON), 20)?;
        ensure!(reviews_tally(&jason).keys().eq(["v1"]), "jason too: {:?}", reviews_tally(&jason));
        Ok(())
    })
}

/// Request routing, step 2: `virtual-service-reviews-test-v2.yaml` sends jason (header `end-user: jason`)
/// to v2, everyone else to v1.
#[test]
fn reviews_test_v2_routes_jason_to_v2_and_everyone_else_to_v1() -> Result<()> {
    require_privileges!(Ok(()));
    BookinfoLab::scenario("bookinfo-test-v2", &[DESTINATION_RULES, ALL_V1], |lab| {
        lab.apply("virtual-service-reviews-test-v2.yaml")?;
        let jason = lab.productpage(Some(JASON), 50)?;
        let anonymous = lab.productpage(None, 50)?;
        all_ok(&jason)?;
        all_ok(&anonymous)?;
        ensure!(reviews_tally(&jason) == BTreeMap::from([("v2".into(), 50)]), "jason: {:?}", reviews_tally(&jason));
        ensure!(jason.iter().all(|p| p.ratings == Some(Ok(200))), "jason sees ratings (black stars): {:?}", jason[0]);
        ensure!(
            reviews_tally(&anonymous) == BTreeMap::from([("v1".into(), 50)]),
            "anonymous: {:?}",
            reviews_tally(&anonymous)
        );
        Ok(())
    })
}

/// Traffic shifting: `virtual-service-reviews-50-v3.yaml` splits reviews 50/50 between v1 and v3, per
/// request: 1000 pages, each version within five points of half.
#[test]
fn reviews_50_v3_splits_requests_half_and_half() -> Result<()> {
    require_privileges!(Ok(()));
    BookinfoLab::scenario("bookinfo-50-v3", &[DESTINATION_RULES, ALL_V1], |lab| {
        lab.apply("virtual-service-reviews-50-v3.yaml")?;
        let pages = lab.productpage(None, 1000)?;
        all_ok(&pages)?;
        let tally = reviews_tally(&pages);
        let (v1, v3) = (tally.get("v1").copied().unwrap_or(0), tally.get("v3").copied().unwrap_or(0));
        ensure!(v1 + v3 == 1000, "only v1 and v3: {tally:?}");
        ensure!(within_five_points(v1, 1000, 0.5) && within_five_points(v3, 1000, 0.5), "50/50 ± 5 %: {tally:?}");
        Ok(())
    })
}

/// Fault injection, delay: `virtual-service-ratings-test-delay.yaml` delays jason's ratings calls 7 s;
/// reviews v2 waits for ratings (10 s timeout), but productpage gives reviews 3 s and one retry, so
/// jason's page shows the reviews error after about 6 s (the bug Istio's task finds); others are unaffected.
#[test]
fn ratings_test_delay_times_out_jasons_reviews_after_six_seconds() -> Result<()> {
    require_privileges!(Ok(()));
    BookinfoLab::scenario("bookinfo-delay", &[DESTINATION_RULES, ALL_V1], |lab| {
        lab.apply("virtual-service-reviews-test-v2.yaml")?;
        lab.apply("virtual-service-ratings-test-delay.yaml")?;
        let jason = lab.productpage_with(Some(JASON), 2, 2)?;
        for page in &jason {
            ensure!(page.status == 200, "the page itself loads: {page:?}");
            ensure!(page.reviews == Err("timeout".into()), "reviews unavailable to jason: {page:?}");
            let latency = page.latency;
            ensure!(
                latency >= Duration::from_millis(5900) && latency < Duration::from_secs(8),
                "after productpage's 3 s and its retry's 3 s: {latency:?}"
            );
        }
        let anonymous = lab.productpage(None, 20)?;
        all_ok(&anonymous)?;
        ensure!(reviews_tally(&anonymous).keys().eq(["v1"]), "anonymous: {:?}", reviews_tally(&anonymous));
        let slowest = anonymous.iter().map(|p| p.latency).max().unwrap_or_default();
        ensure!(slowest < Duration::from_secs(1), "anonymous pages are not delayed: {slowest:?}");
        Ok(())
    })
}

/// Fault injection, abort: `virtual-service-ratings-test-abort.yaml` answers jason's ratings calls 500
/// ("Ratings service is currently unavailable" on his page, from reviews v2); others are unaffected.
#[test]
fn ratings_test_abort_fails_jasons_ratings_with_500() -> Result<()> {
    require_privileges!(Ok(()));
    BookinfoLab::scenario("bookinfo-abort", &[DESTINATION_RULES, ALL_V1], |lab| {
        lab.apply("virtual-service-reviews-test-v2.yaml")?;
        lab.apply("virtual-service-ratings-test-abort.yaml")?;
        let jason = lab.productpage(Some(JASON), 20)?;
        all_ok(&jason)?;
        for page in &jason {
            ensure!(page.reviews == Ok("v2".into()), "jason is routed to v2: {page:?}");
            ensure!(page.ratings == Some(Ok(500)), "ratings aborted with 500: {page:?}");
        }
        let anonymous = lab.productpage(None, 20)?;
        all_ok(&anonymous)?;
        ensure!(
            anonymous.iter().all(|p| p.reviews == Ok("v1".into()) && p.ratings.is_none()),
            "anonymous: v1, no ratings call: {:?}",
            reviews_tally(&anonymous)
        );
        // With everyone on v2 (a test's own route), anonymous ratings calls are not aborted either.
        lab.apply_yaml("virtual-service-reviews-v2", REVIEWS_V2)?;
        let anonymous = lab.productpage(None, 20)?;
        all_ok(&anonymous)?;
        ensure!(
            anonymous.iter().all(|p| p.reviews == Ok("v2".into()) && p.ratings == Some(Ok(200))),
            "anonymous on v2 get ratings: {:?}",
            anonymous.iter().find(|p| p.ratings != Some(Ok(200)))
        );
        Ok(())
    })
}

/// Every reviews request to v2 (whose pages call ratings).
const REVIEWS_V2: &str = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
  - reviews
  http:
  - route:
    - destination:
        host: reviews
        subset: v2
";

/// Half of all ratings calls aborted with 500.
const RATINGS_ABORT_50: &str = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: ratings
spec:
  hosts:
  - ratings
  http:
  - fault:
      abort:
        percentage:
          value: 50
        httpStatus: 500
    route:
    - destination:
        host: ratings
        subset: v1
";

/// Fault injection by percentage: an abort at 50 % fails half of the ratings calls, measured over 1000
/// pages (all reviews on v2, which calls ratings once per page), within five points.
#[test]
fn ratings_abort_at_50_percent_fails_half_the_calls() -> Result<()> {
    require_privileges!(Ok(()));
    BookinfoLab::scenario("bookinfo-abort-50", &[DESTINATION_RULES, ALL_V1], |lab| {
        lab.apply_yaml("virtual-service-reviews-v2", REVIEWS_V2)?;
        lab.apply_yaml("virtual-service-ratings-abort-50", RATINGS_ABORT_50)?;
        let pages = lab.productpage(None, 1000)?;
        all_ok(&pages)?;
        ensure!(reviews_tally(&pages).keys().eq(["v2"]), "reviews: {:?}", reviews_tally(&pages));
        let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
        for page in &pages {
            *outcomes.entry(format!("{:?}", page.ratings)).or_default() += 1;
        }
        let aborted = pages.iter().filter(|p| p.ratings == Some(Ok(500))).count();
        let answered = pages.iter().filter(|p| p.ratings == Some(Ok(200))).count();
        ensure!(aborted + answered == 1000, "ratings either answered or aborted: {outcomes:?}");
        ensure!(within_five_points(aborted, 1000, 0.5), "50 % ± 5 aborted: {outcomes:?}");
        Ok(())
    })
}
