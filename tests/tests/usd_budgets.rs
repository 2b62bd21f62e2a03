//! USD budgets end to end: tollgate-admin stores dollars, tollgate-authz hands them to Envoy
//! in 1/10000 USD, the filter prices each stream from the configured per-model prices (the
//! reservation at admission, the real usage at stream end), and tollgate-ratelimit refuses
//! with `budget_exceeded` once the money is spent.

use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tollgate_e2e::http;
use tollgate_e2e::process::temp_dir;
use tollgate_e2e::redis::Redis;
use tollgate_e2e::stack::{Stack, StackOptions};
use tollgate_ratelimit::ledger::LedgerDb;

/// gpt-4o-mini at $100 per million input tokens (1 unit of 1/10000 USD a token) and $1000
/// per million output tokens (10 units a token); every other model has no price.
const PRICES: &str = r#"{"prices": {"models": [{"match": "gpt-4o-mini",
    "input_usd_per_mtok": 100, "output_usd_per_mtok": 1000}]}}"#;
/// What the mock reports for a stream of 10 chunks: 2 prompt and 10 completion tokens.
const COST_OF_A_STREAM: u64 = 2 + 10 * 10;

fn start_with(ratelimit_args: Vec<String>) -> Stack {
    Stack::start(StackOptions {
        filter_config: PRICES.into(),
        ratelimit_args,
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("stack did not start: {e}"))
}

fn start() -> Stack {
    start_with(Vec::new())
}

fn body(model: &str) -> Value {
    json!({"model": model, "stream": true, "max_tokens": 20,
           "messages": [{"role": "user", "content": "two words"}]})
}

/// The reservation of `body`: its prompt estimate (bytes / 4) at 1 unit a token plus the
/// 20 completion tokens it asks for at 10.
fn reservation(body: &Value) -> u64 {
    serde_json::to_vec(body).unwrap().len() as u64 / 4 + 20 * 10
}

fn stream(stack: &Stack, key: &str, model: &str) -> http::Response {
    let auth = format!("Bearer {key}");
    http::post_json(
        stack.envoy_port,
        "/v1/chat/completions",
        &[("authorization", &auth), ("x-mock-chunks", "10")],
        &body(model),
    )
    .unwrap()
}

/// Streams until refused; returns how many were admitted and the refusal.
fn until_refused(stack: &Stack, key: &str, max: usize) -> (usize, http::Response) {
    for i in 0..max {
        let r = stream(stack, key, "gpt-4o-mini");
        if r.status != 200 {
            return (i, r);
        }
        assert!(r.text().contains("data: [DONE]"), "{}", r.text());
        // The stream-done settlement is a separate call after the response: let it land.
        std::thread::sleep(Duration::from_millis(150));
    }
    panic!("never refused after {max} requests:\n{}", stack.logs());
}

/// Streams admitted under `budget` units: each needs what was spent plus its reservation
/// to fit, and then spends its real cost.
fn expected_admissions(budget: u64) -> usize {
    let reserve = reservation(&body("gpt-4o-mini"));
    let mut spent = 0;
    let mut admitted = 0;
    while spent + reserve <= budget {
        spent += COST_OF_A_STREAM;
        admitted += 1;
    }
    admitted
}

fn streamed_chats(stack: &Stack) -> usize {
    stack
        .mock_requests()
        .unwrap()
        .iter()
        .filter(|r| r["path"] == "/v1/chat/completions")
        .count()
}

fn assert_usd_refusal(r: &http::Response) {
    assert_eq!(
        (r.status, r.error_code()),
        (429, "budget_exceeded".to_string()),
        "{}",
        r.text()
    );
    let message = r.json()["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(message.contains("USD budget"), "{message}");
    assert_eq!(r.header("x-tollgate-error"), Some("budget_exceeded"));
    assert!(r.header("retry-after").is_some());
}

#[test]
fn key_usd_day_budget_refuses_after_the_priced_streams_it_can_pay_for() {
    let dir = temp_dir("usd-ledger");
    let ledger_url = format!("sqlite://{}", dir.join("ledger.db").display());
    let stack = start_with(vec![
        "--ledger-url".into(),
        ledger_url.clone(),
        "--ledger-buffer".into(),
        dir.join("buffer").display().to_string(),
    ]);
    let (key_id, key) = stack.create_key("acme", None).unwrap();
    // $0.05 = 500 units. A stream reserves ~225 and really costs 102: three fit
    // (306 spent + 225 > 500 refuses the fourth). Without the refund of unused
    // reservations only two would; without the real cost, more.
    stack
        .admin(&[
            "policy",
            "set",
            "--key",
            &key_id,
            "--budget-usd-day",
            "0.05",
        ])
        .unwrap();
    let want = expected_admissions(500);
    assert_eq!(want, 3, "the arithmetic of this test changed");
    let (admitted, refused) = until_refused(&stack, &key, 10);
    assert_eq!(admitted, want, "{}", stack.logs());
    assert_usd_refusal(&refused);
    assert_eq!(
        refused.json()["error"]["request_id"],
        refused.header("x-request-id").unwrap()
    );
    assert_eq!(
        streamed_chats(&stack),
        admitted,
        "the refused request reached the model server"
    );
    // The ledger has each stream's tokens and cost, and the USD counter matches it.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = rt.block_on(LedgerDb::connect(&ledger_url)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let rows = loop {
        let rows = rt.block_on(db.usage("key_id", &key_id, 0)).unwrap();
        if rows.len() >= admitted || Instant::now() > deadline {
            break rows;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let got: Vec<(u64, u64)> = rows.iter().map(|r| (r.tokens, r.cost_usd)).collect();
    assert_eq!(got, vec![(12, COST_OF_A_STREAM); admitted]);
    let drift = http::get(stack.ratelimit_http_port, "/ledger/drift", &[]).unwrap();
    assert_eq!(drift.status, 200, "{}", drift.text());
    let report = drift.json();
    let usd = report
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["subject_id"] == key_id.as_str() && d["measure"] == "usd")
        .unwrap_or_else(|| panic!("no USD counter in {report}"))
        .clone();
    let spent = admitted as i64 * COST_OF_A_STREAM as i64;
    assert!(
        (usd["ledger_tokens"].as_i64().unwrap() - spent).abs() <= 1,
        "{usd}"
    );
    assert!(usd["drift"].as_i64().unwrap().abs() <= 1, "{usd}");
    drop(db);
    let _ = std::fs::remove_dir_all(&dir);

    // The token budgets are other counters: a generous one changes nothing, and the USD
    // budget still refuses.
    stack
        .admin(&["policy", "set", "--key", &key_id, "--budget-day", "100000"])
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_usd_refusal(&stream(&stack, &key, "gpt-4o-mini"));
}

#[test]
fn tenant_usd_month_budget_bounds_its_keys_and_unpriced_models_are_refused() {
    let stack = start();
    let (_, key_a) = stack.create_key("acme", None).unwrap();
    let (_, key_b) = stack.create_key("acme", None).unwrap();
    // Before any USD budget, an unpriced model passes (nothing to charge it to).
    let r = stream(&stack, &key_a, "llama3.1:8b");
    assert_eq!(r.status, 200, "{}", r.text());
    // $0.04 = 400 units for the whole tenant: 225 reserved + 102 spent each.
    stack
        .admin(&[
            "policy",
            "set",
            "--tenant",
            "acme",
            "--budget-usd-month",
            "0.04",
        ])
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let before = streamed_chats(&stack);
    // Under a USD budget a model without a price is refused before the model server.
    let r = stream(&stack, &key_a, "llama3.1:8b");
    assert_eq!(
        (r.status, r.error_code()),
        (403, "model_not_priced".to_string()),
        "{}",
        r.text()
    );
    assert_eq!(streamed_chats(&stack), before);
    let want = expected_admissions(400);
    assert_eq!(want, 2, "the arithmetic of this test changed");
    let r = stream(&stack, &key_a, "gpt-4o-mini");
    assert_eq!(r.status, 200, "{}", r.text());
    std::thread::sleep(Duration::from_millis(150));
    // The second key spends from the same tenant budget.
    let (admitted, refused) = until_refused(&stack, &key_b, 10);
    assert_eq!(admitted + 1, want, "{}", stack.logs());
    assert_usd_refusal(&refused);
    assert_usd_refusal(&stream(&stack, &key_a, "gpt-4o-mini"));
}

#[test]
fn admin_sets_shows_and_unsets_usd_budgets_in_dollars() {
    let stack = start();
    let (key_id, _) = stack.create_key("acme", None).unwrap();
    let set = stack
        .admin(&[
            "--json",
            "policy",
            "set",
            "--key",
            &key_id,
            "--budget-usd-day",
            "12.50",
            "--budget-usd-month",
            "400",
        ])
        .unwrap();
    let set: Value = serde_json::from_str(set.trim()).unwrap();
    assert_eq!(set["budget_usd_day"], "12.50");
    assert_eq!(set["budget_usd_month"], "400.00");
    let shown = stack
        .admin(&["--json", "policy", "show", "--key", &key_id])
        .unwrap();
    let shown: Value = serde_json::from_str(shown.trim()).unwrap();
    assert_eq!(shown["policy"]["budget_usd_day"], "12.50");
    assert_eq!(shown["policy"]["budget_usd_month"], "400.00");
    let table = stack.admin(&["policy", "show", "--key", &key_id]).unwrap();
    let row = |field: &str| {
        table
            .lines()
            .find(|l| l.split_whitespace().next() == Some(field))
            .map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))
    };
    assert_eq!(
        row("budget_usd_day").as_deref(),
        Some("12.50 USD"),
        "{table}"
    );
    assert_eq!(
        row("budget_usd_month").as_deref(),
        Some("400.00 USD"),
        "{table}"
    );
    for bad in ["12.50001", "-1", "1e3", "429496.7296", "0", "$5"] {
        let r = stack.admin(&["policy", "set", "--key", &key_id, "--budget-usd-day", bad]);
        assert!(r.is_err(), "--budget-usd-day {bad} was accepted");
    }
    // The largest budget Envoy can carry is accepted.
    stack
        .admin(&[
            "policy",
            "set",
            "--key",
            &key_id,
            "--budget-usd-month",
            "429496.7295",
        ])
        .unwrap();
    let unset = stack
        .admin(&[
            "--json",
            "policy",
            "set",
            "--key",
            &key_id,
            "--unset",
            "budget-usd-day",
        ])
        .unwrap();
    let unset: Value = serde_json::from_str(unset.trim()).unwrap();
    assert_eq!(unset["budget_usd_day"], Value::Null);
    assert_eq!(unset["budget_usd_month"], "429496.7295");
}

#[test]
fn the_documented_price_map_is_a_valid_filter_configuration() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let doc = std::fs::read_to_string(root.join("docs/CONFIGURATION.md")).unwrap();
    let shown = doc
        .split("```json\n")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .find(|b| b.contains("\"prices\""))
        .expect("docs/CONFIGURATION.md shows a price map");
    let config = tollgate_filter::config::Config::from_json(shown.as_bytes())
        .unwrap_or_else(|e| panic!("{e}"));
    let prices = config.prices.expect("prices");
    let price = |m: &str| prices.price_for(m).map(|p| (p.input, p.output));
    assert_eq!(price("gpt-4o-mini"), Some((1_500, 6_000)));
    assert_eq!(price("gpt-4o"), Some((25_000, 100_000)));
    assert_eq!(price("llama3.1:8b"), Some((0, 0)));
    assert_eq!(price("mistral"), Some((10_000, 30_000)));
}

#[test]
fn usd_budget_on_redis_has_its_own_counter_key_and_refuses_the_same() {
    let redis = Redis::start().unwrap_or_else(|e| panic!("redis did not start: {e}"));
    let stack = start_with(vec!["--redis-url".into(), redis.url()]);
    let (key_id, key) = stack.create_key("acme", None).unwrap();
    stack
        .admin(&[
            "policy",
            "set",
            "--key",
            &key_id,
            "--budget-usd-day",
            "0.05",
            "--budget-day",
            "100000",
        ])
        .unwrap();
    let (admitted, refused) = until_refused(&stack, &key, 10);
    assert_eq!(admitted, expected_admissions(500), "{}", stack.logs());
    assert_usd_refusal(&refused);
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "--scan", "--pattern", "tg:*"])
        .output()
        .unwrap();
    let keys = String::from_utf8_lossy(&out.stdout).into_owned();
    let counter =
        |tail: &str| format!("tg:{{tollgate|key_id={key_id}}}|tollgate_phase=tokens{tail}");
    // The USD budget and the token budget of the key: two counters, told apart by the unit.
    assert!(
        keys.lines()
            .any(|k| k == counter("|tollgate_unit=usd:500/day")),
        "{keys}"
    );
    assert!(keys.lines().any(|k| k == counter(":100000/day")), "{keys}");
}
