//! Agents with a pre-shared key let in only peers that hold it: the CLI
//! without the key, or with another, is refused with a line that says why;
//! a peer that greets with a key but forges its frames is refused at its
//! first frame; an agent with another key cannot take a migration (the VM
//! keeps running at the source). Each refusal is logged and counted in
//! `pcft_auth_refusals_total`. With the same key, everything works.

use pcft_agent::wire::control::ControlMessage;
use pcft_agent::wire::frame::{decode_header, decode_payload, encode_message, Frame, HEADER_BYTES};
use pcft_agent::wire::greeting::{Greeting, Role};
use pcft_tests::{http_get, metric, pcft_output, Agent};
use std::path::{Path, PathBuf};

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

#[test]
fn only_peers_with_the_agents_key_get_in() {
    let dir = tempfile::tempdir().unwrap();
    let (key, other) = (keygen(dir.path(), "key"), keygen(dir.path(), "other"));
    let keyed = Agent::start("keyed", &["--metrics", "127.0.0.1:0", "--psk-file", key.to_str().unwrap()]);

    let (code, out, err) = status(&keyed, Some(&key));
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains(r#""agent":"keyed""#), "{out}");

    let (code, _, err) = status(&keyed, None);
    assert_eq!(code, Some(2), "no key: refused: {err}");
    assert!(err.contains("requires authentication") && err.contains("--psk-file"), "{err}");
    assert_eq!(refusals(&keyed, "no-key"), 1.0);

    let (code, _, err) = status(&keyed, Some(&other));
    assert_eq!(code, Some(2), "another key: refused: {err}");
    assert!(err.contains("HMAC") && err.contains("same --psk-file"), "{err}");

    // A keyless agent does not pretend: a client with a key is told.
    let open = Agent::start("open", &["--metrics", "127.0.0.1:0"]);
    let (code, _, err) = status(&open, Some(&key));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("does not authenticate"), "{err}");
    assert_eq!(refusals(&open, "unexpected-key"), 1.0);
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
    assert!(text.contains("HMAC"), "{text}");
    assert!(!text.contains("keyed\""), "no status was sent");
    assert_eq!(refusals(&keyed, "bad-mac"), 1.0);
}

#[test]
fn an_agent_with_another_key_cannot_take_a_migration() {
    let dir = tempfile::tempdir().unwrap();
    let (key, other) = (keygen(dir.path(), "key"), keygen(dir.path(), "other"));
    let source = Agent::start("source", &["--psk-file", key.to_str().unwrap()]);
    let stranger = Agent::start("stranger", &["--psk-file", other.to_str().unwrap()]);
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
    assert!(err.contains("HMAC") && err.contains("keeps running here"), "{err}");
    let (_, out, _) = with_key(&["status", "--agent", &source.addr, "--json"]);
    assert!(out.contains(r#""phase":"running""#), "the VM still runs at the source: {out}");

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
