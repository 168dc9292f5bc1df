// The agent's dashboard. Polls /api/timeline of the agent that served it and
// of the peers named in ?peers=HOST:PORT,HOST:PORT (other agents' --metrics
// addresses), and plots, per VM on each agent, its dirty rate (MiB/s, from its
// tracker) and the checkpoints it sent or committed (a running count); for a
// VM with a network (a serving VM), beside it, its traffic as its clients see
// it: frames in (requests) and out (replies, once released) per second, the
// longest time each second in which no reply went out (the reply gap), and the
// frames held for output commit. The table lists migration phases,
// checkpoints and failovers, newest first.
//
// For tests and scripts, the page keeps what it shows in data attributes:
// #status has data-samples, data-checkpoints, data-last-ms, data-net-samples;
// each .vm plot has data-agent, data-vm, data-points, data-last-rate (MiB/s),
// data-checkpoints; each .net plot has data-agent, data-vm, data-points,
// data-last-sent (frames/s), data-max-quiet-ms.
"use strict";

const POLL_MS = 500;
const MIB = 1 << 20;

const peers = (new URLSearchParams(location.search).get("peers") || "")
  .split(",").map(p => p.trim()).filter(p => p.length > 0);
const sources = [""].concat(peers.map(p => `http://${p}`)).map(base => ({ base, since: 0, agent: base || "this agent", error: null }));
const state = { samples: 0, checkpoints: 0, netSamples: 0, lastMs: 0, vms: new Map(), nets: new Map() };

function netView(agent, name) {
  const key = `${agent}\u0000${name}`;
  let n = state.nets.get(key);
  if (n) return n;
  const div = document.createElement("div");
  div.className = "net";
  div.dataset.agent = agent;
  div.dataset.vm = name;
  const title = document.createElement("h2");
  title.textContent = `VM ${name} on agent ${agent}: its clients' traffic`;
  div.appendChild(title);
  vmView(agent, name).div.after(div);
  n = { xs: [], received: [], sent: [], quiet: [], held: [], points: 0, lastSent: null, maxQuiet: 0, div, plot: null };
  n.plot = new uPlot({
    width: Math.min(window.innerWidth - 60, 1000), height: 220,
    scales: { x: { time: true }, quiet: {} },
    axes: [
      {},
      { label: "frames/s" },
      { scale: "quiet", side: 1, label: "reply gap ms", grid: { show: false } },
    ],
    series: [
      {},
      { label: "requests in (frames/s)", stroke: "#1e8449", spanGaps: true },
      { label: "replies out (frames/s)", stroke: "#7d3c98", spanGaps: true },
      { label: "longest reply gap (ms)", scale: "quiet", stroke: "#d35400", spanGaps: true },
      { label: "held for output commit (frames)", stroke: "#7f8c8d", dash: [4, 4], spanGaps: true },
    ],
  }, [[], [], [], [], []], div);
  state.nets.set(key, n);
  return n;
}

function vmView(agent, name) {
  const key = `${agent}\u0000${name}`;
  let v = state.vms.get(key);
  if (v) return v;
  const div = document.createElement("div");
  div.className = "vm";
  div.dataset.agent = agent;
  div.dataset.vm = name;
  const title = document.createElement("h2");
  title.textContent = `VM ${name} on agent ${agent}`;
  div.appendChild(title);
  document.getElementById("plots").appendChild(div);
  v = { xs: [], rate: [], ckpt: [], points: 0, lastRate: null, checkpoints: 0, div, plot: null };
  v.plot = new uPlot({
    width: Math.min(window.innerWidth - 60, 1000), height: 260,
    scales: { x: { time: true }, ckpt: {} },
    axes: [
      {},
      { label: "dirty MiB/s" },
      { scale: "ckpt", side: 1, label: "checkpoints", grid: { show: false } },
    ],
    series: [
      {},
      { label: "dirty rate (MiB/s)", stroke: "#c0392b", spanGaps: true },
      { label: "checkpoints", scale: "ckpt", stroke: "#2471a3", spanGaps: true, points: { show: true } },
    ],
  }, [[], [], []], div);
  state.vms.set(key, v);
  return v;
}

function addPoint(v, tMs, rate, ckpt) {
  v.xs.push(tMs / 1000); v.rate.push(rate); v.ckpt.push(ckpt);
}

function render() {
  for (const v of state.vms.values()) {
    const order = v.xs.map((_, i) => i).sort((a, b) => v.xs[a] - v.xs[b]);
    v.plot.setData([order.map(i => v.xs[i]), order.map(i => v.rate[i]), order.map(i => v.ckpt[i])]);
    v.div.dataset.points = v.points;
    v.div.dataset.lastRate = v.lastRate === null ? "" : v.lastRate.toFixed(3);
    v.div.dataset.checkpoints = v.checkpoints;
  }
  for (const n of state.nets.values()) {
    n.plot.setData([n.xs, n.received, n.sent, n.quiet, n.held]);
    n.div.dataset.points = n.points;
    n.div.dataset.lastSent = n.lastSent === null ? "" : n.lastSent.toFixed(1);
    n.div.dataset.maxQuietMs = Math.round(n.maxQuiet);
  }
  const status = document.getElementById("status");
  status.dataset.samples = state.samples;
  status.dataset.checkpoints = state.checkpoints;
  status.dataset.lastMs = Math.round(state.lastMs);
  status.dataset.netSamples = state.netSamples;
  const errors = sources.filter(s => s.error).map(s => `cannot reach ${s.base || "this agent"}: ${s.error}`);
  const latest = state.lastMs ? new Date(state.lastMs).toLocaleTimeString() : "none yet";
  status.textContent = `${sources.length} agent(s): ${sources.map(s => s.agent).join(", ")}; ` +
    `${state.samples} dirty-rate samples, ${state.checkpoints} checkpoint events, latest ${latest} ` +
    `(updates every ${POLL_MS / 1000} s)` + (errors.length ? ` — ${errors.join("; ")}` : "");
}

function addEvent(agent, e) {
  const row = document.createElement("tr");
  for (const text of [new Date(e.t_ms).toLocaleTimeString(), agent, e.vm, e.kind, e.detail]) {
    const td = document.createElement("td");
    td.textContent = text;
    row.appendChild(td);
  }
  const body = document.querySelector("#events tbody");
  body.insertBefore(row, body.firstChild);
  while (body.children.length > 200) body.removeChild(body.lastChild);
}

async function pollOne(source) {
  const response = await fetch(`${source.base}/api/timeline?since=${source.since}`);
  if (!response.ok) throw new Error(`HTTP ${response.status}`);
  const data = await response.json();
  source.agent = data.agent;
  for (const s of data.samples) {
    const v = vmView(data.agent, s.vm);
    addPoint(v, s.t_ms, s.bytes_per_second / MIB, null);
    v.points += 1;
    v.lastRate = s.bytes_per_second / MIB;
    state.samples += 1;
    state.lastMs = Math.max(state.lastMs, s.t_ms);
  }
  for (const s of data.net || []) {
    const n = netView(data.agent, s.vm);
    n.xs.push(s.t_ms / 1000); n.received.push(s.received_per_second); n.sent.push(s.sent_per_second);
    n.quiet.push(s.longest_quiet_ms); n.held.push(s.held_frames);
    n.points += 1;
    n.lastSent = s.sent_per_second;
    n.maxQuiet = Math.max(n.maxQuiet, s.longest_quiet_ms);
    state.netSamples += 1;
    state.lastMs = Math.max(state.lastMs, s.t_ms);
  }
  for (const e of data.events) {
    if (e.kind === "checkpoint-sent" || e.kind === "checkpoint-committed") {
      const v = vmView(data.agent, e.vm);
      v.checkpoints += 1;
      addPoint(v, e.t_ms, null, v.checkpoints);
      state.checkpoints += 1;
    }
    addEvent(data.agent, e);
    state.lastMs = Math.max(state.lastMs, e.t_ms);
  }
  // The agent's clock when it answered: everything up to it has been seen.
  source.since = data.now_ms;
}

async function poll() {
  await Promise.all(sources.map(async source => {
    try {
      await pollOne(source);
      source.error = null;
    } catch (err) {
      source.error = String(err);
    }
  }));
  render();
  setTimeout(poll, POLL_MS);
}

poll();
