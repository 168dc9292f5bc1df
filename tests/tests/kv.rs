//! The `kv` guest, a key-value server speaking Redis's protocol on smoltcp
//! behind our virtio-net, reached over a real tap by real clients: Debian's
//! redis-cli and redis-benchmark, and a RESP client of our own that checks
//! what the store holds against what it saw acknowledged.

use pcft_tests::resp::Reply;
use pcft_tests::{pcft_output, unique_net, KvVm};
use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

fn redis_cli(vm: &KvVm, args: &[&str]) -> String {
    let ip = vm.ip.to_string();
    let out = Command::new("redis-cli")
        .args(["-h", &ip, "-p", "6379"])
        .args(args)
        .output()
        .expect("run redis-cli (apt-get install redis-tools; cargo xtask setup does)");
    assert!(out.status.success(), "redis-cli {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim_end().to_string()
}

#[test]
fn redis_cli_and_ping_reach_the_guest() {
    let vm = KvVm::start(&["--seconds", "300"]);
    assert_eq!(vm.lines.last().unwrap()["address"], format!("{}:6379", vm.ip));
    let ping = Command::new("ping").args(["-c", "2", "-W", "5", &vm.ip.to_string()]).output().expect("run ping");
    assert!(ping.status.success(), "ping: {}", String::from_utf8_lossy(&ping.stdout));

    assert_eq!(redis_cli(&vm, &["PING"]), "PONG");
    assert_eq!(redis_cli(&vm, &["SET", "greeting", "hello world"]), "OK");
    assert_eq!(redis_cli(&vm, &["GET", "greeting"]), "hello world");
    assert_eq!(redis_cli(&vm, &["GET", "nothing"]), "");
    for n in 1..=3 {
        assert_eq!(redis_cli(&vm, &["INCR", "counter"]), n.to_string());
    }
    assert_eq!(redis_cli(&vm, &["MSET", "a", "1", "b", "2"]), "OK");
    // The third is nil (an empty line, trimmed here).
    assert_eq!(redis_cli(&vm, &["MGET", "a", "b", "zz"]), "1\n2");
    assert_eq!(redis_cli(&vm, &["EXISTS", "a", "b", "zz"]), "2");
    assert_eq!(redis_cli(&vm, &["DBSIZE"]), "4");
    assert_eq!(redis_cli(&vm, &["DEL", "a", "zz"]), "1");
    assert!(redis_cli(&vm, &["INCR", "greeting"]).contains("not an integer"));
    let info = redis_cli(&vm, &["INFO"]);
    assert!(info.contains("keys=3") || info.contains("keys:3"), "{info}");
    assert_eq!(redis_cli(&vm, &["FLUSHALL"]), "OK");
    assert_eq!(redis_cli(&vm, &["DBSIZE"]), "0");
    let (code, rest) = vm.stop();
    assert_eq!(code, Some(0), "{rest:?}");
    let stopped = rest.iter().find(|l| l["event"] == "stopped").expect("a stopped line");
    assert!(stopped["rx_frames"].as_u64().unwrap() > 10 && stopped["tx_frames"].as_u64().unwrap() > 10);
}

#[test]
fn redis_benchmark_with_four_clients_completes_without_errors() {
    let vm = KvVm::start(&["--seconds", "600"]);
    let ip = vm.ip.to_string();
    let out = Command::new("redis-benchmark")
        .args(["-h", &ip, "-p", "6379", "-t", "set,get,incr", "-n", "2000", "-c", "4", "-q"])
        .output()
        .expect("run redis-benchmark (apt-get install redis-tools)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    for test in ["SET", "GET", "INCR"] {
        assert!(
            text.lines().any(|l| l.contains(&format!("{test}: ")) && l.contains("requests per second")),
            "{test} missing: {text}"
        );
    }
    assert!(!text.contains("ERR") && !text.contains("Error"), "{text}");
    // Every INCR was applied once: the counter saw 2000 of them.
    let mut client = vm.client();
    assert_eq!(client.cmd(&["GET", "counter:__rand_int__"]).unwrap().bulk_text().as_deref(), Some("2000"));
    drop(client);
    // Twelve clients, closing all and opening all again between tests: the
    // guest keeps enough sockets listening (with 12 sockets it refused some
    // and redis-benchmark hung, 2 runs in 3).
    let out = Command::new("timeout")
        .args(["120", "redis-benchmark", "-h", &ip, "-p", "6379", "-t", "set,get,incr", "-n", "600", "-c", "12", "-q"])
        .output()
        .expect("run redis-benchmark");
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "\n");
    assert!(out.status.success(), "12 clients: {text}");
    assert_eq!(text.lines().filter(|l| l.contains("requests per second")).count(), 3, "{text}");
}

#[test]
fn malformed_requests_get_an_error_and_the_guest_serves_on() {
    let vm = KvVm::start(&["--seconds", "300"]);
    // Broken RESP: an error, and the connection closed (as Redis does).
    let cases: [&[u8]; 5] =
        [b"*x\r\n", b"*2\r\n$-5\r\nab\r\n", b"*1\r\n$3\r\nabcdef\r\n", b"*99999999999\r\n", b"*1\r\n:12\r\n"];
    for case in cases {
        let mut client = vm.client();
        client.send_raw(case).unwrap();
        match client.read_reply() {
            Ok(Reply::Error(e)) => assert!(e.starts_with("ERR"), "{case:?}: {e}"),
            other => panic!("{:?}: expected an error reply, got {other:?}", String::from_utf8_lossy(case)),
        }
        assert!(client.closed(), "{:?}: the connection should be closed", String::from_utf8_lossy(case));
        let mut fresh = vm.client();
        assert_eq!(fresh.cmd(&["PING"]).unwrap(), Reply::Simple("PONG".into()));
    }
    // A line that is not an array is an inline command: an unknown one is an error, and the connection stays.
    let mut client = vm.client();
    client.send_raw(b"$abc\r\n").unwrap();
    assert!(matches!(client.read_reply().unwrap(), Reply::Error(e) if e.contains("unknown command")));
    assert_eq!(client.cmd(&["PING"]).unwrap(), Reply::Simple("PONG".into()));
    // Inline commands (as telnet sends them) and pipelined requests work.
    let mut client = vm.client();
    client.send_raw(b"PING\r\n*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n").unwrap();
    assert_eq!(client.read_reply().unwrap(), Reply::Simple("PONG".into()));
    assert_eq!(client.read_reply().unwrap(), Reply::Simple("OK".into()));
    assert_eq!(client.read_reply().unwrap(), Reply::Bulk(Some(b"v".to_vec())));
    match client.cmd(&["NOSUCHCOMMAND", "x"]).unwrap() {
        Reply::Error(e) => assert!(e.contains("unknown command"), "{e}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_store_digest_matches_the_acknowledged_writes() {
    let vm = KvVm::start(&["--seconds", "300", "--store-size", "64K"]);
    let mut client = vm.client();
    let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    for i in 0..120u32 {
        let key = format!("user:{i}");
        let value = format!("{}-{}", i * 7919, "x".repeat((i % 40) as usize));
        assert_eq!(client.cmd(&["SET", &key, &value]).unwrap(), Reply::Simple("OK".into()));
        model.insert(key.into_bytes(), value.into_bytes());
        if i % 10 == 0 {
            let counter = format!("hits:{}", i % 3);
            let n = client.cmd(&["INCR", &counter]).unwrap();
            let Reply::Integer(n) = n else { panic!("{n:?}") };
            model.insert(counter.into_bytes(), n.to_string().into_bytes());
        }
        if i % 17 == 5 {
            let key = format!("user:{}", i - 5);
            assert_eq!(client.cmd(&["DEL", &key]).unwrap(), Reply::Integer(1));
            model.remove(key.as_bytes());
        }
    }
    let digest = vm_fixtures::kv::store_digest(model.iter().map(|(k, v)| (k.as_slice(), v.as_slice())));
    assert_eq!(client.cmd(&["PCFT.DIGEST"]).unwrap().bulk_text(), Some(format!("{digest:016x}")));
    assert_eq!(client.cmd(&["DBSIZE"]).unwrap(), Reply::Integer(model.len() as i64));
    // The store is bounded: past --store-size, writes get an error and the guest serves on.
    let big = "v".repeat(4000);
    let mut refused = false;
    for i in 0..40 {
        match client.cmd(&["SET", &format!("big:{i}"), &big]).unwrap() {
            Reply::Simple(ok) => assert_eq!(ok, "OK"),
            Reply::Error(e) => {
                assert!(e.contains("OOM") || e.contains("ERR"), "{e}");
                refused = true;
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(refused, "64K of store should not hold 160K of values");
    assert_eq!(client.cmd(&["PING"]).unwrap(), Reply::Simple("PONG".into()));
}

#[test]
fn a_snapshot_under_client_load_keeps_every_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let snapshot = dir.path().join("kv.snap");
    let (tap, ip, host_ip) = unique_net();
    let snap = snapshot.to_str().unwrap();
    let vm =
        KvVm::start_on(&tap, ip, host_ip, &["vm", "run"], &["--snapshot-out", snap, "--snapshot-after-ms", "6000"]);
    // Write until the VM stops under the client (the snapshot was taken).
    let mut acked: BTreeMap<String, String> = BTreeMap::new();
    let mut client = vm.client();
    let started = Instant::now();
    for i in 0u32.. {
        let (key, value) = (format!("k{i}"), format!("value-{i}-{}", i.wrapping_mul(2_654_435_761)));
        match client.cmd(&["SET", &key, &value]) {
            Ok(Reply::Simple(ok)) if ok == "OK" => {
                acked.insert(key, value);
            }
            Ok(other) => panic!("SET {key}: {other:?}"),
            Err(_) => break,
        }
        assert!(started.elapsed() < Duration::from_secs(120), "the snapshot never came");
    }
    let (code, rest) = vm.wait();
    assert_eq!(code, Some(0), "{rest:?}");
    assert!(rest.iter().any(|l| l["event"] == "snapshot"), "{rest:?}");
    assert!(acked.len() > 20, "only {} writes before the snapshot", acked.len());

    // Another process restores it on the same tap (made again: the first removed its own).
    let restored = KvVm::start_on(&tap, ip, host_ip, &["vm", "restore", snap], &["--seconds", "300"]);
    let mut client = restored.client();
    for (key, value) in &acked {
        assert_eq!(client.cmd(&["GET", key]).unwrap().bulk_text().as_deref(), Some(value.as_str()), "{key}");
    }
    let Reply::Integer(size) = client.cmd(&["DBSIZE"]).unwrap() else { panic!() };
    // At most one write more than was acknowledged: the one in flight when it stopped.
    assert!(size as usize == acked.len() || size as usize == acked.len() + 1, "{size} vs {}", acked.len());
}

#[test]
fn a_network_that_cannot_be_set_up_is_refused_in_words() {
    let vm = KvVm::start(&["--seconds", "120"]);
    let (other_tap, other_ip, other_host) = unique_net();
    let (ip, host) = (other_ip.to_string(), other_host.to_string());
    let (vm_ip, vm_host) = (vm.ip.to_string(), vm.host_ip.to_string());
    // An address in the running VM's network, for a new tap: it collides.
    let (clash_ip, clash_host) = (
        std::net::Ipv4Addr::from(u32::from(vm.ip) + 1).to_string(),
        std::net::Ipv4Addr::from(u32::from(vm.host_ip) + 3).to_string(),
    );
    let run = |extra: &[&str]| {
        let mut args = vec!["vm", "run", "--fixture", "kv", "--mem", "64M", "--seconds", "5"];
        args.extend_from_slice(extra);
        pcft_output(&args)
    };
    let cases: Vec<(Vec<&str>, &str)> = vec![
        // The tap of a running VM: in use.
        (vec!["--net", "tap", "--tap", &vm.tap, "--guest-ip", &vm_ip, "--host-ip", &vm_host], "in use"),
        (
            vec!["--net", "tap", "--tap", &other_tap, "--guest-ip", "10.0.0.9", "--host-ip", &vm_host],
            "must differ and be in one",
        ),
        // A new tap in a network the host already has.
        (
            vec!["--net", "tap", "--tap", &other_tap, "--guest-ip", &clash_ip, "--host-ip", &clash_host],
            "already in use",
        ),
        (vec!["--net", "tap", "--tap", "no spaces allowed", "--guest-ip", &ip, "--host-ip", &host], "not usable"),
        (vec!["--net", "tap", "--tap", "lo", "--guest-ip", &ip, "--host-ip", &host], "not a tap"),
        (vec!["--net", "tap", "--guest-ip", "10.1.2", "--host-ip", &host], "10.1.2"),
        (vec![], "add --net tap"),
    ];
    for (extra, expected) in cases {
        let (code, _, stderr) = run(&extra);
        assert_eq!(code, Some(2), "{extra:?}: {stderr}");
        // One line names the problem (clap adds a hint line to its own).
        let first = stderr.lines().next().unwrap_or_default();
        assert!(first.contains(expected), "{extra:?}: expected {expected:?} in the first line of: {stderr}");
    }
    assert!(!std::path::Path::new("/sys/class/net").join(&other_tap).exists(), "a refused run left its tap");
}
