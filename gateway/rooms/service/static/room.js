"use strict";
// The room page's script (served as a file: the page's Content-Security-Policy allows no inline code).
// Whatever participants choose (names) is shown as text only (textContent), never parsed as markup.
// Signalling with the room service only (it talks to Janus): three RTCPeerConnections, each with every ICE
// candidate in its SDP (we wait for gathering to complete). "audio": the microphone to the AudioBridge and
// the room's mix back; "video": the camera to the VideoRoom (none without a camera); "sub": Janus offers
// every other browser's camera, one m-line each (streams: mid -> feed, the publisher's participant id).
const roomId = location.pathname.split("/")[2];
const q = new URLSearchParams(location.search);
const gw = window.gw = { state: null, joined: false, role: null, id: null, peakHz: 0, rms: 0, error: null, dial: null,
                         closed: null, camera: false };
const media = window.gwMedia = { pcs: {}, streams: [], iceServers: [] };  // not in gw: tests read gw as JSON
let ws, local;
const $ = (id) => document.getElementById(id);
$("title").textContent = "Room " + roomId.slice(0, 8);
$("name").value = q.get("name") || "";

function send(msg) { if (ws && ws.readyState === 1) ws.send(JSON.stringify(msg)); }

function render() {
  const s = gw.state; if (!s) return;
  $("count").textContent = "(" + s.participants.length + ")" + (s.locked ? " · locked" : "");
  $("lock").textContent = s.locked ? "Unlock" : "Lock";
  $("modbar").classList.toggle("hidden", gw.role !== "moderator");
  const me = s.participants.find((p) => p.id === gw.id);
  $("muteme").textContent = me && me.muted ? "Unmute me" : "Mute me";
  const ul = $("people"); ul.replaceChildren();
  for (const p of s.participants) {
    const li = document.createElement("li");
    li.dataset.id = p.id; li.dataset.kind = p.kind; li.dataset.muted = p.muted; li.dataset.role = p.role;
    li.dataset.talking = p.talking;
    const name = document.createElement("span"); name.className = "name";
    name.textContent = (p.kind === "phone" ? "📞 " : "") + p.name + (p.id === gw.id ? " (you)" : "");
    li.append(name);
    for (const [cls, show, text] of [["phone", p.kind === "phone", "phone"], ["moderator", p.role === "moderator", "moderator"],
                                     ["muted", p.muted, "muted"], ["talking", p.talking && !p.muted, "talking"]]) {
      if (!show) continue; const t = document.createElement("span"); t.className = "tag " + cls; t.textContent = text; li.append(t);
    }
    if (gw.role === "moderator" && p.id !== gw.id) {
      const m = document.createElement("button"); m.className = "secondary"; m.textContent = p.muted ? "Unmute" : "Mute";
      m.onclick = () => send({ type: "mute", participant_id: p.id, muted: !p.muted });
      const r = document.createElement("button"); r.className = "secondary"; r.textContent = "Remove";
      r.onclick = () => send({ type: "remove", participant_id: p.id });
      li.append(m, r);
    }
    ul.append(li);
  }
  renderTiles();
}

// -- the other browsers' cameras: one tile per active subscribed video stream, labelled with its name
function renderTiles() {
  const here = new Set(gw.state ? gw.state.participants.map((p) => p.id) : []);
  const wanted = new Map();
  for (const s of media.streams) if (s.kind === "video" && s.active && here.has(s.feed)) wanted.set(s.feed, s.mid);
  const box = $("videos");
  for (const tile of [...box.children]) if (!wanted.has(tile.dataset.id)) tile.remove();
  const sub = media.pcs.sub;
  for (const [feed, mid] of wanted) {
    let tile = [...box.children].find((t) => t.dataset.id === feed);
    if (!tile) {
      tile = document.createElement("div"); tile.className = "tile"; tile.dataset.id = feed;
      const v = document.createElement("video"); v.autoplay = true; v.playsInline = true; v.muted = true;
      const label = document.createElement("span"); label.className = "label";
      tile.append(v, label); box.append(tile);
    }
    const who = gw.state.participants.find((p) => p.id === feed);
    tile.querySelector(".label").textContent = who ? who.name : "";
    const t = sub && sub.getTransceivers().find((x) => x.mid === mid);
    const v = tile.querySelector("video");
    if (t && (!v.srcObject || v.srcObject.getTracks()[0] !== t.receiver.track)) {
      v.srcObject = new MediaStream([t.receiver.track]); v.play().catch(() => {});
    }
    tile.dataset.mid = mid;
  }
}

function listen(stream) {
  // Play the room's mix, and measure it: dominant frequency and level (read by tests and meters).
  const sink = new Audio(); sink.srcObject = stream; sink.play().catch(() => {});
  const ctx = new AudioContext(); ctx.resume();
  const an = ctx.createAnalyser(); an.fftSize = 8192;
  ctx.createMediaStreamSource(stream).connect(an);
  const f = new Float32Array(an.frequencyBinCount), t = new Float32Array(an.fftSize);
  setInterval(() => {
    an.getFloatFrequencyData(f); an.getFloatTimeDomainData(t);
    let best = 0; for (let i = 1; i < f.length; i++) if (f[i] > f[best]) best = i;
    gw.peakHz = best * ctx.sampleRate / an.fftSize;
    gw.rms = Math.sqrt(t.reduce((a, v) => a + v * v, 0) / t.length);
  }, 200);
}

function gathered(pc) {
  return new Promise((ok) => {
    if (pc.iceGatheringState === "complete") return ok();
    pc.addEventListener("icegatheringstatechange", () => pc.iceGatheringState === "complete" && ok());
  });
}

async function offer(name, pc) {
  await pc.setLocalDescription(await pc.createOffer());
  await gathered(pc);
  send({ type: "offer", pc: name, sdp: pc.localDescription.sdp });
}

async function startMedia() {
  const pcs = media.pcs;
  pcs.audio = new RTCPeerConnection({ iceServers: media.iceServers });
  const mic = local.getAudioTracks()[0];
  if (mic) pcs.audio.addTransceiver(mic, { direction: "sendrecv", streams: [local] });
  else pcs.audio.addTransceiver("audio", { direction: "recvonly" });
  pcs.audio.ontrack = (e) => listen(new MediaStream([e.track]));
  await offer("audio", pcs.audio);
  const cam = local.getVideoTracks()[0];
  if (cam) {
    pcs.video = new RTCPeerConnection({ iceServers: media.iceServers });
    pcs.video.addTransceiver(cam, { direction: "sendonly", streams: [local] });
    await offer("video", pcs.video);
  }
}

let subChain = Promise.resolve();
function subscriberOffer(m) {
  // Janus' offers for the subscription, answered one after the other
  subChain = subChain.then(async () => {
    if (!media.pcs.sub) media.pcs.sub = new RTCPeerConnection({ iceServers: media.iceServers });
    const pc = media.pcs.sub;
    await pc.setRemoteDescription({ type: "offer", sdp: m.sdp });
    await pc.setLocalDescription(await pc.createAnswer());
    await gathered(pc);
    media.streams = m.streams || [];
    send({ type: "answer", pc: "sub", sdp: pc.localDescription.sdp });
    renderTiles();
  }).catch((e) => { gw.error = "subscription: " + e; });
}

function closeMedia(text) {
  for (const pc of Object.values(media.pcs)) pc.close();
  media.pcs = {}; media.streams = [];
  if (local) for (const t of local.getTracks()) t.stop();
  $("videos").replaceChildren(); $("status").textContent = text;
}

async function join() {
  $("join").classList.add("hidden"); $("status").textContent = "joining…";
  try { local = await navigator.mediaDevices.getUserMedia({ audio: true, video: { width: 320, height: 240 } }); }
  catch (e) {
    try { local = await navigator.mediaDevices.getUserMedia({ audio: true }); }  // no camera, or refused: audio only
    catch (e2) { local = new MediaStream(); }  // no microphone either: listen only
  }
  gw.camera = local.getVideoTracks().length > 0;
  $("local").srcObject = local;
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const path = `/rooms/${roomId}/ws${q.get("host") ? "?host=" + encodeURIComponent(q.get("host")) : ""}`;
  ws = new WebSocket(`${scheme}://${location.host}${path}`);
  ws.onopen = () => send({ type: "join", name: $("name").value || "Guest", kind: "browser" });
  ws.onclose = () => {
    if (gw.joined && !gw.closed) { gw.closed = "disconnected"; closeMedia("disconnected"); }
    else if (!gw.joined && !gw.error) refused(path);
  };
  ws.onmessage = async (ev) => {
    const m = JSON.parse(ev.data);
    if (m.type === "joined") {
      gw.id = m.participant_id; gw.role = m.role; gw.joined = true; gw.state = m.state;
      media.iceServers = m.ice_servers || [];
      $("status").textContent = "in the room as " + m.role; render();
      startMedia().catch((e) => { gw.error = "media: " + e; });
    } else if (m.type === "answer") {
      const pc = media.pcs[m.pc]; if (pc) await pc.setRemoteDescription({ type: "answer", sdp: m.sdp });
    } else if (m.type === "offer" && m.pc === "sub") { subscriberOffer(m); }
    else if (m.type === "state") { gw.state = m; render(); }
    else if (m.type === "removed" || m.type === "room_closed") {
      gw.closed = m.type; closeMedia(m.type === "removed" ? "you were removed" : "the room was closed");
    } else if (m.type === "error") {
      gw.error = m.code || m.message; $("status").textContent = m.message;
      if (m.code === "media_server_lost") { gw.closed = m.code; closeMedia(m.message); }
    }
  };
}

async function refused(path) {
  // The WebSocket was refused before it opened (a browser does not tell why): ask the same URL over HTTP.
  let why = "could not connect to the room";
  try { const body = await (await fetch(path)).json(); if (body.error) { gw.error = body.error.code; why = body.error.message; } }
  catch (e) { /* keep the generic reason */ }
  closeMedia(why);
}

$("dialform").onsubmit = async (ev) => {
  // the moderator's outbound call: the room service places it through the Voice API with the project's keys
  ev.preventDefault();
  const to = $("dialto").value.trim(); if (!to) return;
  $("dialstatus").textContent = "calling " + to + "…";
  try {
    const r = await fetch(`/rooms/${roomId}/dial`, { method: "POST", headers: { "Content-Type": "application/json" },
                                                   body: JSON.stringify({ to, host: q.get("host") || "" }) });
    const body = await r.json();
    gw.dial = { status: r.status, ...body };
    $("dialstatus").textContent = r.ok ? "ringing " + to + " (" + body.voice_id.slice(0, 8) + ")"
                                       : "could not call: " + ((body.error && body.error.message) || r.status);
  } catch (e) { $("dialstatus").textContent = "could not call: " + e; }
};
$("joinbtn").onclick = join;
$("muteme").onclick = () => { const me = gw.state && gw.state.participants.find((p) => p.id === gw.id); send({ type: "mute", muted: !(me && me.muted) }); };
$("muteall").onclick = () => send({ type: "mute_all", muted: true });
$("unmuteall").onclick = () => send({ type: "mute_all", muted: false });
$("lock").onclick = () => send({ type: "lock", locked: !(gw.state && gw.state.locked) });
if (q.get("autojoin") === "1") join();
