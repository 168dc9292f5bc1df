//! Agents with a pre-shared key let in only peers that hold it: the CLI
//! without the key, or with another, is refused with a line that says why;
//! a peer that greets with a key but forges its frames is refused at its
//! first frame, and one that holds the key but tampers with a later frame at
//! that frame; an agent with another key cannot take a migration (the VM
//! keeps running at the source). Each refusal is a warning in the refusing
//! agent's log, naming the peer's address, the reason and the fix, and one
//! count in `pcft_auth_refusals_total` under its reason (`no-key`,
//! `unexpected-key`, `wrong-key`, `bad-mac`). With the same key, everything works.

use pcft_agent::wire::auth::{Psk, TAG_BYTES};
use pcft_agent::wire::control::ControlMessage;
use pcft_agent::wire::frame::{decode_header, decode_payload, encode_message, Frame, HEADER_BYTES};
use pcft_agent::wire::greeting::{Greeting, Role};
use pcft_tests::{http_get, metric, pcft_output, Agent};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn keygen(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let (code, _, err) = pcft_output(&["keygen", "--out", path.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    path
}

fn status(agent: &Agent, key: Option<&Path>) -> (Option<i32>, String, String) {
    let mut args = vec!["status", "--agent", &agent.addr, "--json"];
    if let Some(key) = key {
        args.extend(["--psk-file", key.to_str().unwrap()]);
    }
    pcft_output(&args)
}

fn refusals(agent: &Agent, reason: &str) -> f64 {
    let text = http_get(agent.metrics.as_deref().expect("--metrics"));
    metric(&text, &format!(r#"pcft_auth_refusals_total{{reason="{reason}"}}"#)).unwrap_or(0.0)
}

/// Waits (a refusal the peer does not wait for is counted a moment later) until
/// `agent` counted `count` refusals for `reason`.
fn wait_for_refusals(agent: &Agent, reason: &str, count: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while refusals(agent, reason) < count && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(refusals(agent, reason), count, "{reason}");
}

/// Waits until the agent's log at `log` has a warning that holds every one of
/// `words`, and returns it.
fn warning(log: &Path, words: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let found = text.lines().find(|l| l.contains(" WARN ") && words.iter().all(|w| l.contains(w)));
        match found {
            Some(line) => return line.to_string(),
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            None => panic!("no warning with {words:?} in the agent's log:\n{text}"),
        }
    }
}

#[test]
fn only_peers_with_the_agents_key_get_in() {
    let dir = tempfile::tempdir().unwrap();
    let (key, other) = (keygen(dir.path(), "key"), keygen(dir.path(), "other"));
    let (keyed_log, open_log) = (dir.path().join("keyed.log"), dir.path().join("open.log"));
    let keyed = Agent::start_logging_to(
        "keyed",
        &["--metrics", "127.0.0.1:0", "--psk-file", key.to_str().unwrap()],
        &keyed_log,
    );

    let (code, out, err) = status(&keyed, Some(&key));
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains(r#""agent":"keyed""#), "{out}");

    let (code, _, err) = status(&keyed, None);
    assert_eq!(code, Some(2), "no key: refused: {err}");
    assert!(err.contains("requires authentication") && err.contains("--psk-file"), "{err}");
    assert_eq!(refusals(&keyed, "no-key"), 1.0);
    warning(&keyed_log, &["requires authentication", "sent no key", "--psk-file", "peer=127.0.0.1:"]);

    // Another key: the CLI finds the agent's Welcome wrong, and the agent,
    // which cannot see that by itself, learns it from the CLI's last frame.
    let (code, _, err) = status(&keyed, Some(&other));
    assert_eq!(code, Some(2), "another key: refused: {err}");
    assert!(err.contains("MAC check") && err.contains("same --psk-file"), "{err}");
    wait_for_refusals(&keyed, "wrong-key", 1.0);
    warning(&keyed_log, &["(wrong-key)", "pcft-cli-", "give both ends the same --psk-file", "peer=127.0.0.1:"]);
    assert_eq!(refusals(&keyed, "bad-mac"), 0.0);
    assert_eq!(refusals(&keyed, "no-key"), 1.0, "each refusal counted once");

    // A keyless agent does not pretend: a client with a key is told.
    let open = Agent::start_logging_to("open", &["--metrics", "127.0.0.1:0"], &open_log);
    let (code, _, err) = status(&open, Some(&key));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("does not authenticate"), "{err}");
    assert_eq!(refusals(&open, "unexpected-key"), 1.0);
    warning(&open_log, &["does not authenticate", "give both ends the same key", "peer=127.0.0.1:"]);
}

/// Reads one frame (header, payload, and a tag if `tagged`) from `stream`.
fn read_frame(stream: &mut std::net::TcpStream, tagged: bool) -> ([u8; HEADER_BYTES], Vec<u8>) {
    use std::io::Read;
    let mut header = [0u8; HEADER_BYTES];
    stream.read_exact(&mut header).unwrap();
    let mut payload = vec![0u8; decode_header(&header).unwrap().payload_len()];
    stream.read_exact(&mut payload).unwrap();
    if tagged {
        stream.read_exact(&mut [0u8; TAG_BYTES]).unwrap();
    }
    (header, payload)
}

#[test]
fn a_peer_with_the_key_that_tampers_with_a_later_frame_is_refused_there() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "key");
    let log = dir.path().join("keyed.log");
    let keyed =
        Agent::start_logging_to("keyed", &["--metrics", "127.0.0.1:0", "--psk-file", key.to_str().unwrap()], &log);
    let mut stream = std::net::TcpStream::connect(&keyed.addr).unwrap();
    let client_nonce = [9; 16];
    let hello = Greeting::Hello { role: Role::Control, agent: "tamperer".into(), nonce: Some(client_nonce) };
    stream.write_all(&encode_message(&hello)).unwrap();
    let (header, payload) = read_frame(&mut stream, true);
    let server_nonce = match decode_payload::<Greeting>(decode_header(&header).unwrap(), payload) {
        Ok(Frame::Message(Greeting::Welcome { nonce: Some(nonce), .. })) => nonce,
        other => panic!("{other:?}"),
    };
    let mut session = Psk::load(&key).unwrap().session(true, &client_nonce, &server_nonce);
    let mut send = |stream: &mut std::net::TcpStream, tamper: bool| {
        let request = encode_message(&ControlMessage::Status);
        let mut tag = session.send.tag(&request);
        tag[0] ^= u8::from(tamper);
        stream.write_all(&request).unwrap();
        stream.write_all(&tag).unwrap();
    };
    // The first request passes (the peer proved it holds the key) and is answered...
    send(&mut stream, false);
    let (_, answer) = read_frame(&mut stream, true);
    assert!(String::from_utf8_lossy(&answer).contains("keyed"), "a status report");
    // ...the second, with its tag changed on the way, is refused.
    send(&mut stream, true);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    assert!(text.contains("(bad-mac)") && text.contains("tampered"), "{text}");
    assert_eq!(refusals(&keyed, "bad-mac"), 1.0);
    assert_eq!(refusals(&keyed, "wrong-key"), 0.0);
    warning(&log, &["refused tamperer (bad-mac)", "tampered", "peer=127.0.0.1:"]);
}

#[test]
fn a_peer_that_forges_its_frames_is_refused_at_the_first_one() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "key");
    let keyed = Agent::start("keyed", &["--metrics", "127.0.0.1:0", "--psk-file", key.to_str().unwrap()]);
    let mut stream = std::net::TcpStream::connect(&keyed.addr).unwrap();
    let hello = Greeting::Hello { role: Role::Control, agent: "forger".into(), nonce: Some([7; 16]) };
    stream.write_all(&encode_message(&hello)).unwrap();
    // The Welcome (tagged with a key the forger cannot derive)...
    let mut header = [0u8; HEADER_BYTES];
    stream.read_exact(&mut header).unwrap();
    let header = decode_header(&header).unwrap();
    let mut payload = vec![0u8; header.payload_len()];
    stream.read_exact(&mut payload).unwrap();
    let welcome = decode_payload::<Greeting>(header, payload);
    assert!(matches!(welcome, Ok(Frame::Message(Greeting::Welcome { nonce: Some(_), .. }))), "{welcome:?}");
    let mut tag = [0u8; 16];
    stream.read_exact(&mut tag).unwrap();
    // ...then a request with a made-up tag.
    let request = encode_message(&ControlMessage::Status);
    stream.write_all(&request).unwrap();
    stream.write_all(&[0x5a; 16]).unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    assert!(answer.len() >= HEADER_BYTES, "the agent says why before it closes");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.contains("MAC"), "{text}");
    assert!(!text.contains("keyed\""), "no status was sent");
    // Its first tagged frame failed: it does not hold the key.
    assert_eq!(refusals(&keyed, "wrong-key"), 1.0);
    assert_eq!(refusals(&keyed, "bad-mac"), 0.0);
}

#[test]
fn an_agent_with_another_key_cannot_take_a_migration() {
    let dir = tempfile::tempdir().unwrap();
    let (key, other) = (keygen(dir.path(), "key"), keygen(dir.path(), "other"));
    let (source_log, stranger_log) = (dir.path().join("source.log"), dir.path().join("stranger.log"));
    let keyed = |name: &str, key: &Path, log: &Path| {
        Agent::start_logging_to(name, &["--metrics", "127.0.0.1:0", "--psk-file", key.to_str().unwrap()], log)
    };
    let (source, stranger) = (keyed("source", &key, &source_log), keyed("stranger", &other, &stranger_log));
    let friend = Agent::start("friend", &["--psk-file", key.to_str().unwrap()]);
    let with_key = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--psk-file", key.to_str().unwrap()]);
        pcft_output(&all)
    };
    let (code, _, err) =
        with_key(&["vm", "start", "--agent", &source.addr, "--name", "vm1", "--mem", "64M", "--steps", "40000"]);
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = with_key(&["migrate", "vm1", "--agent", &source.addr, "--to", &stranger.addr]);
    assert_eq!(code, Some(2), "refused before anything moved: {err}");
    assert!(err.contains("MAC check") && err.contains("keeps running here"), "{err}");
    let (_, out, _) = with_key(&["status", "--agent", &source.addr, "--json"]);
    assert!(out.contains(r#""phase":"running""#), "the VM still runs at the source: {out}");
    // Each agent refused the other, said so and counted it once.
    assert_eq!(refusals(&source, "wrong-key"), 1.0);
    warning(&source_log, &["refused the destination", "wrong-key", &stranger.addr, "same --psk-file"]);
    wait_for_refusals(&stranger, "wrong-key", 1.0);
    warning(&stranger_log, &["refused source (wrong-key)", "give both ends the same --psk-file", "peer=127.0.0.1:"]);

    let (code, _, err) = with_key(&["migrate", "vm1", "--agent", &source.addr, "--to", &friend.addr]);
    assert_eq!(code, Some(0), "the same key: {err}");
    let (code, out, err) = with_key(&["vm", "wait", "vm1", "--agent", &friend.addr, "--json"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains(r#""verified":true"#), "{out}");
}

#[test]
fn an_agent_without_a_key_starts_only_when_told_it_may_run_open() {
    let (code, _, err) = pcft_tests::pcft_output(&["agent", "--listen", "127.0.0.1:0"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--psk-file") && err.contains("pcft keygen") && err.contains("--insecure"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    pcft_tests::pcft_json(&["keygen", "--out", key.to_str().unwrap(), "--json"]);
    let (code, _, err) = pcft_tests::pcft_output(&[
        "agent",
        "--listen",
        "127.0.0.1:0",
        "--insecure",
        "--psk-file",
        key.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("contradict"), "{err}");
}
