//! The agents' live dashboard, loaded in headless Chromium (Debian's
//! `chromium`, installed by `cargo xtask setup`) against real agents: the
//! plot of a running VM shows its dirty rate at the rate the guest really
//! writes (and the agent exports), the data moves as time passes, and a PostCopyFT migration's
//! checkpoints show on both agents, as many as the source committed.

use pcft_tests::{http_get, metric, pcft_json, Agent};
use std::collections::HashMap;
use std::process::Command;

/// Pages per second the guest writes, and so the dirty rate the plot must show.
const GUEST_PAGES_PER_SECOND: f64 = 10_000.0;

/// The page at `url` after Chromium ran its scripts for `budget_ms` of virtual time, as HTML.
fn rendered_dom(url: &str, budget_ms: u64) -> String {
    let profile = tempfile::tempdir().expect("a profile directory");
    let out = Command::new("chromium")
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--virtual-time-budget={budget_ms}"))
        .args(["--dump-dom", url])
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run chromium ({e}): install it with `cargo xtask setup` (Debian's chromium)")
        });
    assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("UTF-8 HTML")
}

/// The attributes of every start tag in `html` that contains `marker`.
fn tags_with(html: &str, marker: &str) -> Vec<HashMap<String, String>> {
    html.split('<')
        .filter_map(|tag| tag.split_once('>').map(|(inside, _)| inside))
        .filter(|inside| inside.contains(marker))
        .map(|inside| {
            inside
                .split('"')
                .collect::<Vec<_>>()
                .chunks(2)
                .filter_map(|pair| match pair {
                    [name, value] => Some((name.trim().trim_end_matches('=').to_string(), value.to_string())),
                    _ => None,
                })
                .collect()
        })
        .collect()
}

/// What the dashboard showed, from its data attributes.
struct Shown {
    samples: u64,
    last_ms: f64,
    /// Per (agent, VM): the attributes of its plot.
    plots: HashMap<(String, String), HashMap<String, String>>,
}

fn shown(url: &str) -> Shown {
    let html = rendered_dom(url, 2_000);
    let status = tags_with(&html, r#"id="status""#).pop().unwrap_or_else(|| panic!("no status line: {html}"));
    let number = |attrs: &HashMap<String, String>, name: &str| -> f64 {
        attrs.get(name).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no {name} in {attrs:?}"))
    };
    let plots = tags_with(&html, r#"class="vm""#)
        .into_iter()
        .map(|attrs| ((attrs["data-agent"].clone(), attrs["data-vm"].clone()), attrs))
        .collect();
    Shown { samples: number(&status, "data-samples") as u64, last_ms: number(&status, "data-last-ms"), plots }
}

fn attr(plot: &HashMap<String, String>, name: &str) -> f64 {
    plot.get(name).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no {name} in {plot:?}"))
}

#[test]
fn the_dashboard_plots_live_dirty_rates_and_checkpoints() {
    let source = Agent::start("hostA", &["--metrics", "127.0.0.1:0"]);
    let destination = Agent::start("hostB", &["--metrics", "127.0.0.1:0"]);
    let started = pcft_json(&[
        "vm",
        "start",
        "--agent",
        &source.addr,
        "--name",
        "web",
        "--fixture",
        "dirty",
        "--mem",
        "64M",
        "--forever",
        "--rate",
        &GUEST_PAGES_PER_SECOND.to_string(),
        "--dirty-tracker",
        "ring",
        "--json",
    ]);
    assert_eq!(started["started"], true, "{started}");
    // http://HOST:PORT/metrics → HOST:PORT
    let host_port = |agent: &Agent| {
        let metrics = agent.metrics.clone().expect("--metrics");
        metrics.trim_start_matches("http://").trim_end_matches("/metrics").to_string()
    };
    // The source's page, plotting the destination's timeline too.
    let url = format!("http://{}/?peers={}", host_port(&source), host_port(&destination));

    // The ring is sampled once a second: wait for a few samples.
    std::thread::sleep(std::time::Duration::from_millis(3_500));
    let before = shown(&url);
    let web = &before.plots[&("hostA".to_string(), "web".to_string())];
    assert!(attr(web, "data-points") >= 2.0, "{web:?}");
    // The guest writes its data pages at the paced rate and, each step, its
    // progress word in one more page. The ring pushes that page once per reset
    // (the harvester resets every millisecond) on hardware, and once per write
    // under PVM's emulation: the ring sees 1.1x to 2x the data rate.
    let data_mib_s = GUEST_PAGES_PER_SECOND * 4096.0 / f64::from(1 << 20);
    let rate = attr(web, "data-last-rate");
    assert!(
        (0.9 * data_mib_s..2.2 * data_mib_s).contains(&rate),
        "the plot shows {rate} MiB/s, the guest writes {data_mib_s} MiB/s of data pages"
    );
    // And it is a rate the agent recorded and exports: the plot shows one of the
    // agent's samples, and the exported gauge is one of its latest. (Compared
    // by value, not by time: the live rate moves between the two reads on a
    // busy host.)
    let exported = metric(
        &http_get(source.metrics.as_deref().expect("--metrics")),
        r#"pcft_vm_dirty_rate_bytes_per_second{vm="web",tracker="ring"}"#,
    )
    .expect("the exported dirty rate")
        / f64::from(1 << 20);
    let metrics_url = source.metrics.as_deref().expect("--metrics");
    let timeline: serde_json::Value =
        serde_json::from_str(&http_get(&metrics_url.replace("/metrics", "/api/timeline?since=0"))).expect("JSON");
    let recorded: Vec<f64> = timeline["samples"]
        .as_array()
        .expect("samples")
        .iter()
        .filter(|s| s["vm"] == "web")
        .filter_map(|s| s["bytes_per_second"].as_f64())
        .map(|b| b / f64::from(1 << 20))
        .collect();
    assert!(
        recorded.iter().any(|r| (r - rate).abs() < 0.001),
        "the plot shows {rate} MiB/s, which the agent never recorded: {recorded:?}"
    );
    let latest = &recorded[recorded.len().saturating_sub(3)..];
    assert!(
        latest.iter().any(|r| (r - exported).abs() < 0.001 * exported.max(1.0)),
        "the agent exports {exported} MiB/s, not one of its latest samples {latest:?}"
    );

    // While it migrates, `pcft status` shows how far it has got.
    let (source_addr, destination_addr) = (source.addr.clone(), destination.addr.clone());
    let migration = std::thread::spawn(move || {
        pcft_json(&[
            "migrate",
            "web",
            "--agent",
            &source_addr,
            "--to",
            &destination_addr,
            "--mode",
            "postcopy-ft",
            "--postcopy-rate",
            "8000",
            "--json",
        ])
    });
    let mut progress = Vec::new();
    while !migration.is_finished() {
        let status = pcft_json(&["status", "--agent", &source.addr, "--json"]);
        if let Some(m) = status["vms"][0]["migration"].as_object() {
            progress.push(m.clone());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let report = migration.join().expect("the migration thread");
    let postcopy: Vec<_> = progress.iter().filter(|m| m["phase"] == "postcopy").collect();
    assert!(postcopy.len() >= 2, "status showed no post-copy progress: {progress:?}");
    let sent: Vec<u64> = postcopy.iter().map(|m| m["pages_sent"].as_u64().expect("pages_sent")).collect();
    assert!(sent.windows(2).all(|w| w[0] <= w[1]) && sent.last() > sent.first(), "pages sent: {sent:?}");
    assert!(postcopy.iter().all(|m| m["pages_total"] == 16384), "64M is 16384 pages: {postcopy:?}");
    assert!(sent.iter().all(|&n| n <= 16384), "{sent:?}");
    let committed = report["checkpoints_committed"].as_f64().expect("checkpoints_committed");
    assert!(committed >= 2.0, "{report}");
    std::thread::sleep(std::time::Duration::from_millis(1_500));

    let after = shown(&url);
    assert!(after.samples > before.samples, "no new samples: {} then {}", before.samples, after.samples);
    assert!(after.last_ms > before.last_ms, "the timeline did not move");
    let at_source = &after.plots[&("hostA".to_string(), "web".to_string())];
    assert_eq!(attr(at_source, "data-checkpoints"), committed, "committed checkpoints plotted at the source");
    let at_destination = after
        .plots
        .get(&("hostB".to_string(), "web".to_string()))
        .unwrap_or_else(|| panic!("the peer agent's plot is missing: {:?}", after.plots.keys()));
    assert!(attr(at_destination, "data-checkpoints") >= committed, "{at_destination:?}");
    assert!(attr(at_destination, "data-points") >= 1.0, "the destination's dirty rate: {at_destination:?}");
}

#[test]
fn an_agent_says_where_its_dashboard_is_and_serves_it() {
    use std::io::BufRead;
    let mut child =
        pcft_tests::pcft(&["agent", "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--json", "--insecure"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn pcft agent");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("agent stdout");
    let started: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    let dashboard = started["dashboard"].as_str().unwrap_or_else(|| panic!("no dashboard URL: {started}")).to_string();
    let page = http_get(&dashboard);
    let script = http_get(&format!("{dashboard}dashboard.js"));
    let plotting = http_get(&format!("{dashboard}vendor/uPlot.iife.min.js"));
    let _ = child.kill();
    let _ = child.wait();
    assert!(started["addr"].as_str().is_some_and(|a| a.starts_with("127.0.0.1:")), "{started}");
    assert!(page.contains(r#"<script src="/dashboard.js">"#), "{page}");
    assert!(script.contains("/api/timeline"), "{script}");
    assert!(plotting.starts_with("/*! https://github.com/leeoniya/uPlot"), "the vendored uPlot");
}

#[test]
fn a_serving_vm_shows_its_clients_traffic_beside_its_dirty_rate() {
    let agent = Agent::start("hostK", &["--metrics", "127.0.0.1:0"]);
    let (tap, ip, host_ip) = pcft_tests::unique_net();
    let net = pcft_tests::kv_on_tap(&tap, ip, host_ip);
    let mut start = vec!["vm", "start", "--agent", &agent.addr, "--name", "kv", "--json"];
    start.extend(net.iter().map(String::as_str));
    let started = pcft_json(&start);
    assert_eq!(started["started"], true, "{started}");
    // A client asks for 3 s: about as many replies out as requests in.
    let addr = std::net::SocketAddr::from((ip, 6379));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut client = loop {
        match pcft_tests::resp::Client::connect(addr, std::time::Duration::from_secs(10)) {
            Ok(client) => break client,
            Err(e) if std::time::Instant::now() > deadline => panic!("the kv VM does not serve at {addr}: {e}"),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(200)),
        }
    };
    let until = std::time::Instant::now() + std::time::Duration::from_secs(3);
    let mut answered = 0;
    while std::time::Instant::now() < until {
        client.cmd(&["SET", "k", &answered.to_string()]).expect("SET");
        answered += 1;
    }
    let metrics = agent.metrics.clone().expect("--metrics");
    let url = format!("http://{}/", metrics.trim_start_matches("http://").trim_end_matches("/metrics"));
    let html = rendered_dom(&url, 2_000);
    let net = tags_with(&html, r#"class="net""#).pop().unwrap_or_else(|| panic!("no traffic plot: {html}"));
    assert_eq!(net["data-vm"], "kv", "{net:?}");
    assert!(attr(&net, "data-points") >= 2.0, "a sample a second: {net:?}");
    // The last sample may hold the last second's replies or the quiet after them; some sample had many.
    let exported = http_get(&metrics);
    let sent = metric(&exported, r#"pcft_net_sent_frames_total{vm="kv"}"#).expect("pcft_net_sent_frames_total");
    let received =
        metric(&exported, r#"pcft_net_received_frames_total{vm="kv"}"#).expect("pcft_net_received_frames_total");
    assert!(sent >= f64::from(answered), "every reply is a frame out: {sent} < {answered}");
    assert!(received >= f64::from(answered), "every request is a frame in: {received} < {answered}");
    assert!(attr(&net, "data-max-quiet-ms") > 0.0, "{net:?}");
    assert!(metric(&exported, r#"pcft_net_longest_quiet_seconds{vm="kv"}"#).is_some(), "{exported}");
}
