// rapido viewer: lists live sessions and plays one over WHEP. Vanilla JS, no build step.
// Every server-provided string goes into the DOM through textContent.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_ITEM = "rapido.apiKey";

let viewer = null;  // {session, pc, location, timer, last, events}

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

// -- the API, with the key when the node needs one -------------------------------------

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = sessionStorage.getItem(KEY_ITEM);
  if (key) headers.set("Authorization", `Bearer ${key}`);
  const r = await fetch(path, { ...options, headers });
  if (r.status === 401) {
    $("key-form").hidden = false;
    throw new Error(key ? "the API key was refused" : "this node needs an API key");
  }
  if (!r.ok) {
    let message = `HTTP ${r.status}`;
    try { message = (await r.json()).message || message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return r.json();
}

$("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem(KEY_ITEM, $("key").value.trim());
  $("key").value = "";
  $("key-form").hidden = true;
  refresh();
});

// -- live sessions ------------------------------------------------------------------------

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text === undefined || text === null ? "" : String(text);
  if (cls) td.className = cls;
  return td;
}

async function refresh() {
  const body = $("sessions").tBodies[0];
  let sessions;
  try {
    sessions = (await api("/api/sessions")).sessions;
  } catch (e) {
    body.replaceChildren();
    cell(body.insertRow(), `sessions: ${e.message}`, "muted").colSpan = 8;
    return;
  }
  body.replaceChildren();
  for (const s of sessions) {
    const row = body.insertRow();
    cell(row, s.lesson_id);
    cell(row, s.session_id, "id");
    cell(row, s.sink);
    cell(row, s.state);
    cell(row, s.stats.buffered_ms);
    cell(row, s.stats.underruns);
    cell(row, s.stats.frames_out);
    const td = row.insertCell();
    if (s.whep_url) {
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = "Watch";
      b.addEventListener("click", () => play(s).catch(fail));
      td.append(b);
    }
  }
  if (!sessions.length) {
    cell(body.insertRow(), 'none yet: press Demo, or POST /api/sessions with "sink": "webrtc"',
         "muted").colSpan = 8;
  }
}

// -- WHEP playback -------------------------------------------------------------------------

function iceGathered(pc, timeoutMs) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { if (pc.iceGatheringState === "complete") resolve(); };
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, timeoutMs);
  });
}

async function play(session) {
  if (!session.whep_url || !session.viewer_token) {
    throw new Error(`session ${session.session_id} has sink ${session.sink}: only ` +
                    "webrtc sessions can be watched");
  }
  await stop();
  const pc = new RTCPeerConnection();
  const v = { session, pc, location: null, timer: null, last: null, events: null };
  viewer = v;
  pc.addTransceiver("video", { direction: "recvonly" });
  pc.addTransceiver("audio", { direction: "recvonly" });
  const stream = new MediaStream();
  $("video").srcObject = stream;
  pc.addEventListener("track", (ev) => {
    stream.addTrack(ev.track);
    $("video").play().catch(() => setStatus("press play on the video to start it"));
  });
  pc.addEventListener("connectionstatechange", () => {
    $("st-conn").textContent = pc.connectionState;
  });
  await pc.setLocalDescription(await pc.createOffer());
  await iceGathered(pc, 2000);  // WHEP without trickle: the offer carries the candidates
  const r = await fetch(session.whep_url, {
    method: "POST",
    body: pc.localDescription.sdp,
    headers: { "Content-Type": "application/sdp",
               "Authorization": `Bearer ${session.viewer_token}` },
  });
  if (r.status !== 201) {
    let message = `WHEP: HTTP ${r.status}`;
    try { message = `WHEP: ${(await r.json()).message}`; } catch (e) { /* not JSON */ }
    if (viewer === v) await stop();
    throw new Error(message);
  }
  const location = r.headers.get("Location");
  v.location = location ? new URL(location, session.whep_url).href : null;
  await pc.setRemoteDescription({ type: "answer", sdp: await r.text() });
  if (viewer !== v) return;  // stopped meanwhile
  $("session-id").value = session.session_id;
  $("st-session").textContent = session.session_id;
  $("st-state").textContent = session.state;
  for (const id of ["stop", "interrupt", "wav"]) $(id).disabled = false;
  v.timer = setInterval(() => updateStats(v).catch(() => {}), 1000);
  v.events = openEvents(v);
  setStatus(`watching ${session.lesson_id}`);
}

// The session's events over its WebSocket. The browser connects with the session's own
// short-lived ws_token (never the API key: it would sit in the URL).
function openEvents(v) {
  const s = v.session;
  if (!s.ws_url || !s.ws_token) return null;
  const url = new URL(s.ws_url, location.href);
  url.searchParams.set("token", s.ws_token);
  const ws = new WebSocket(url.href);
  ws.addEventListener("message", (ev) => {
    if (viewer !== v || typeof ev.data !== "string") return;
    let msg;
    try { msg = JSON.parse(ev.data); } catch (e) { return; }
    if (msg.type === "playback_started") {
      $("st-state").textContent = "speaking";
    } else if (msg.type === "playback_finished") {
      $("st-state").textContent = msg.interrupted ? "interrupted" : "idle";
    } else if (msg.type === "closed") {
      $("st-state").textContent = "closed";
      setStatus(`the session ended (${String(msg.reason)})`);
    }
  });
  return ws;
}

async function stop() {
  const v = viewer;
  if (!v) return;
  viewer = null;
  clearInterval(v.timer);
  if (v.events) v.events.close();
  v.pc.close();
  $("video").srcObject = null;
  for (const id of ["stop", "interrupt", "wav"]) $(id).disabled = true;
  for (const dd of $("stats").querySelectorAll("dd")) dd.textContent = "–";
  if (v.location) {
    try {
      await fetch(v.location, { method: "DELETE",
        headers: { "Authorization": `Bearer ${v.session.viewer_token}` } });
    } catch (e) { /* the session may be gone already */ }
  }
}

// -- stats ------------------------------------------------------------------------------------

function inbound(report, kind) {
  for (const s of report.values()) {
    if (s.type === "inbound-rtp" && (s.kind || s.mediaType) === kind) return s;
  }
  return null;
}

// Mean jitter-buffer delay (s) over the last interval, else over the whole stream.
function bufferDelay(now, before) {
  if (!now || !now.jitterBufferEmittedCount) return null;
  if (before && now.jitterBufferEmittedCount > before.jitterBufferEmittedCount) {
    return (now.jitterBufferDelay - before.jitterBufferDelay) /
           (now.jitterBufferEmittedCount - before.jitterBufferEmittedCount);
  }
  return now.jitterBufferDelay / now.jitterBufferEmittedCount;
}

async function updateStats(v) {
  const report = await v.pc.getStats();
  const video = inbound(report, "video");
  const audio = inbound(report, "audio");
  const now = performance.now();
  const last = v.last;
  v.last = { t: now, video, audio };
  if (viewer !== v) return;

  let fps = video && video.framesPerSecond;
  if (fps === undefined && video && last && last.video) {
    fps = (video.framesDecoded - last.video.framesDecoded) / ((now - last.t) / 1000);
  }
  $("st-fps").textContent = typeof fps === "number" ? fps.toFixed(1) : "–";
  if (video && video.frameWidth) {
    $("st-size").textContent = `${video.frameWidth}×${video.frameHeight}`;
  }

  // A/V offset estimate: how much longer video waits in its jitter buffer than audio
  // (positive: video plays later than audio). estimatedPlayoutTimestamp, where both
  // tracks report one, is the receiver's own estimate and is preferred.
  let offsetMs = null;
  let how = "jitter buffers";
  if (video && audio && video.estimatedPlayoutTimestamp && audio.estimatedPlayoutTimestamp) {
    const d = video.estimatedPlayoutTimestamp - audio.estimatedPlayoutTimestamp;
    if (Math.abs(d) < 5000) { offsetMs = -d; how = "playout timestamps"; }
  }
  if (offsetMs === null) {
    const dv = bufferDelay(video, last && last.video);
    const da = bufferDelay(audio, last && last.audio);
    if (dv !== null && da !== null) offsetMs = (dv - da) * 1000;
  }
  $("st-av").textContent = offsetMs === null ? "–" :
    `${offsetMs >= 0 ? "+" : ""}${offsetMs.toFixed(0)} ms (from ${how})`;

  try {
    const s = await api(`/api/sessions/${encodeURIComponent(v.session.session_id)}`);
    if (viewer !== v) return;
    $("st-state").textContent = s.state;
    $("st-underruns").textContent = String(s.stats.underruns);
    const q = s.stats.sink && s.stats.sink.quality;
    $("st-quality").textContent = q ?
      `${q.score.toFixed(2)} · ${q.fps} fps · ${Math.round(q.bitrate / 1000)} kbps` +
      (q.limited_by ? ` (${q.limited_by})` : "") : "–";
  } catch (e) {
    if (viewer === v) $("st-state").textContent = "gone";
  }
}

// -- buttons ----------------------------------------------------------------------------------

function fail(e) { setStatus(e.message || String(e), true); }

$("demo").addEventListener("click", async () => {
  $("demo").disabled = true;
  try {
    setStatus("starting the demo…");
    await play(await api("/api/demo", { method: "POST" }));
    refresh();
  } catch (e) { fail(e); } finally { $("demo").disabled = false; }
});

$("watch-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const id = $("session-id").value.trim();
  try { await play(await api(`/api/sessions/${encodeURIComponent(id)}`)); } catch (e) { fail(e); }
});

$("stop").addEventListener("click", () => { stop(); setStatus("stopped"); });

$("interrupt").addEventListener("click", async () => {
  if (!viewer) return;
  const id = encodeURIComponent(viewer.session.session_id);
  try { await api(`/api/sessions/${id}/interrupt`, { method: "POST" }); setStatus("interrupted"); }
  catch (e) { fail(e); }
});

$("wav").addEventListener("change", async () => {
  const file = $("wav").files[0];
  if (!viewer || !file) return;
  const id = encodeURIComponent(viewer.session.session_id);
  try {
    const r = await api(`/api/sessions/${id}/audio`,
                        { method: "POST", body: file, headers: { "Content-Type": "audio/wav" } });
    setStatus(`queued ${(r.duration_ms / 1000).toFixed(1)} s of speech`);
  } catch (e) { fail(e); } finally { $("wav").value = ""; }
});

window.addEventListener("pagehide", () => { stop(); });
refresh();
setInterval(refresh, 2000);
