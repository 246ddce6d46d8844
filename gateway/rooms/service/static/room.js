"use strict";
// The room page's script (served as a file: the page's Content-Security-Policy allows no inline code).
// Whatever participants choose (names) is shown as text only (textContent), never parsed as markup.
// Signalling with the room service only (it talks to Janus): three RTCPeerConnections, each with every ICE
// candidate in its SDP (we wait for gathering to complete). "audio": the microphone to the AudioBridge and
// the room's mix back; "video": the camera to the VideoRoom (none without a camera); "sub": Janus offers
// every other browser's camera, one m-line each (streams: mid -> feed, the publisher's participant id).
// Screens: pre-join (preview, name, devices, level), the room (a tile per participant, controls, the panel),
// ended (removed, room closed, locked out, connection lost...): every camera and microphone track is stopped.
const roomId = location.pathname.split("/")[2];
const q = new URLSearchParams(location.search);
const hostToken = q.get("host") || "";
const gw = window.gw = { screen: "prejoin", state: null, joined: false, role: null, id: null, peakHz: 0, rms: 0,
                         error: null, dial: null, dialProgress: [], closed: null, camera: false, mic: false,
                         notice: null, room: null };
const media = window.gwMedia = { pcs: {}, streams: [], iceServers: [], local: null, contexts: [], timers: [] };
let ws, speaker = null, joining = false, wantMic = q.get("mic") !== "0", wantCam = q.get("cam") !== "0";
let previewing = Promise.resolve(), generation = 0, infoLoaded, dialing = 0;
const $ = (id) => document.getElementById(id);
function stored(key) { try { return localStorage.getItem(key); } catch (e) { return null; } }  // site data may be blocked
$("name").value = q.get("name") || stored("gw.name") || "";

// -- icons (inline SVG: no image requests, no fonts needed)
const ICONS = {
  mic: "M12 14a3 3 0 0 0 3-3V5a3 3 0 0 0-6 0v6a3 3 0 0 0 3 3zm5-3a5 5 0 0 1-10 0H5a7 7 0 0 0 6 6.9V21h2v-3.1A7 7 0 0 0 19 11z",
  micoff: "M12 14a3 3 0 0 0 3-3V5a3 3 0 0 0-6 0v6a3 3 0 0 0 3 3zm5-3a5 5 0 0 1-10 0H5a7 7 0 0 0 6 6.9V21h2v-3.1A7 7 0 0 0 19 11zM3.3 2.3l18.4 18.4-1.4 1.4L1.9 3.7z",
  cam: "M4 6h11a1 1 0 0 1 1 1v3.5l4-3v9l-4-3V17a1 1 0 0 1-1 1H4a1 1 0 0 1-1-1V7a1 1 0 0 1 1-1z",
  camoff: "M4 6h11a1 1 0 0 1 1 1v3.5l4-3v9l-4-3V17a1 1 0 0 1-1 1H4a1 1 0 0 1-1-1V7a1 1 0 0 1 1-1zM3.3 2.3l18.4 18.4-1.4 1.4L1.9 3.7z",
  phone: "M6.6 10.8a15 15 0 0 0 6.6 6.6l2.2-2.2a1 1 0 0 1 1-.25c1.1.37 2.3.57 3.6.57a1 1 0 0 1 1 1V20a1 1 0 0 1-1 1A17 17 0 0 1 3 4a1 1 0 0 1 1-1h3.5a1 1 0 0 1 1 1c0 1.25.2 2.45.57 3.57a1 1 0 0 1-.25 1z",
  people: "M9 11a4 4 0 1 0 0-8 4 4 0 0 0 0 8zm7 0a3 3 0 1 0 0-6 3 3 0 0 0 0 6zM9 13c-3.3 0-7 1.7-7 4v2h14v-2c0-2.3-3.7-4-7-4zm7 0c-.5 0-1 0-1.5.1 1.5 1 2.5 2.3 2.5 3.9v2h5v-2c0-2.3-3.3-4-6-4z",
  leave: "M12 9c-1.6 0-3.2.25-4.7.7v3.1a1 1 0 0 1-.56.9 11 11 0 0 0-2.7 1.9 1 1 0 0 1-1.4 0L.3 13.2a1 1 0 0 1 0-1.4A16.9 16.9 0 0 1 12 7c4.5 0 8.6 1.8 11.7 4.8a1 1 0 0 1 0 1.4l-2.3 2.3a1 1 0 0 1-1.4 0 11 11 0 0 0-2.7-1.9 1 1 0 0 1-.56-.9V9.7A15 15 0 0 0 12 9z",
};
function icon(name) {
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", "0 0 24 24"); svg.setAttribute("class", "icon"); svg.setAttribute("aria-hidden", "true");
  const path = document.createElementNS("http://www.w3.org/2000/svg", "path"); path.setAttribute("d", ICONS[name]);
  svg.append(path); return svg;
}
function setButton(el, iconName, label, off) {
  // the label says what a press does ("Unmute your microphone"): no aria-pressed besides, it would read inverted
  el.replaceChildren(icon(iconName)); el.setAttribute("aria-label", label); el.title = label;
  el.classList.toggle("off", !!off);
}
function el(tag, cls, text) {
  const e = document.createElement(tag); if (cls) e.className = cls; if (text !== undefined) e.textContent = text; return e;
}

function send(msg) { if (ws && ws.readyState === 1) ws.send(JSON.stringify(msg)); }
function show(screen) { gw.screen = screen; document.body.dataset.screen = screen; }
function status(text) { $("status").textContent = text; }
function initials(name) {
  const words = name.replace(/[^\p{L}\p{N} ]/gu, "").trim().split(/\s+/).filter(Boolean);
  return (words.length ? words.slice(0, 2).map((w) => [...w][0]).join("") : "?").toUpperCase();
}
function me() { return gw.state && gw.state.participants.find((p) => p.id === gw.id); }
let noticeTimer;
function notice(text) {
  gw.notice = text; const n = $("notice"); n.textContent = text; n.hidden = false;
  clearTimeout(noticeTimer); noticeTimer = setTimeout(() => { n.hidden = true; }, 6000);
}

// -- the room's name and dial-in details (the moderator PIN with a host link only)
async function loadInfo() {
  try {
    const r = await fetch(`/rooms/${roomId}/info${hostToken ? "?host=" + encodeURIComponent(hostToken) : ""}`);
    const body = await r.json();
    if (!r.ok) { gw.infoError = body.error || null; return; }
    gw.room = body;
    if (gw.joined) $("infobtn").hidden = !body.dial_in;
    $("title").textContent = body.name; document.title = body.name + " · Meeting";
    $("prejointitle").textContent = "Ready to join " + body.name + "?";
    renderDialIn($("dialin")); renderDialIn($("predialin"));
  } catch (e) { /* the title stays generic; joining still tells what is wrong */ }
}

function copy(text, button) {
  const done = () => { button.textContent = "Copied"; setTimeout(() => { button.textContent = "Copy"; }, 1500); };
  if (navigator.clipboard && window.isSecureContext) { navigator.clipboard.writeText(text).then(done, () => {}); return; }
  const area = el("textarea"); area.value = text; area.setAttribute("readonly", ""); area.className = "sr";
  document.body.append(area); area.select();
  try { document.execCommand("copy"); done(); } catch (e) { /* the text stays selectable */ }
  area.remove(); button.focus();
}

function renderDialIn(box) {
  box.replaceChildren();
  const d = gw.room && gw.room.dial_in;
  if (!d) return;
  box.append(el("h2", "", "Join by phone"));
  const dl = el("dl");
  const rows = [...d.numbers.map((n) => ["Dial", n]), ["Meeting ID", d.meeting_id], ["PIN", d.pin]];
  if (d.mpin) rows.push(["Moderator PIN", d.mpin]);
  for (const [label, value] of rows) {
    const b = el("button", "secondary", "Copy"); b.type = "button"; b.setAttribute("aria-label", "Copy " + label);
    b.onclick = () => copy(value, b);
    dl.append(el("dt", "", label), el("dd", "", value), b);
  }
  const all = el("button", "secondary", "Copy all"); all.type = "button";
  all.onclick = () => copy(rows.map(([l, v]) => `${l}: ${v}`).join("\n"), all);
  box.append(dl, all);
}

// -- devices: the preview before joining, and what the room gets
async function acquire() {
  // The chosen devices; without a camera, a microphone, or permission: whatever is left, with a clear note.
  if (!navigator.mediaDevices) return { stream: new MediaStream(), errors: { insecure: "insecure" } };
  const cam = $("camsel").value, mic = $("micsel").value;
  const audio = mic ? { deviceId: { exact: mic } } : true;
  const video = { width: { ideal: 640 }, height: { ideal: 360 }, ...(cam ? { deviceId: { exact: cam } } : {}) };
  const errors = {};
  for (const [a, v] of [[audio, video], [audio, false], [false, video]]) {
    try { return { stream: await navigator.mediaDevices.getUserMedia({ audio: a, video: v }), errors }; }
    catch (e) { errors[(a ? "a" : "") + (v ? "v" : "")] = e.name || String(e); }
  }
  return { stream: new MediaStream(), errors };
}

function deviceNote(stream, errors) {
  if (errors.insecure) return "The camera and microphone need this page over HTTPS: you will join listen-only.";
  const hasCam = stream.getVideoTracks().length > 0, hasMic = stream.getAudioTracks().length > 0;
  const denied = Object.values(errors).some((n) => n === "NotAllowedError" || n === "SecurityError");
  if (!hasCam && !hasMic) {
    return denied ? "Camera and microphone are blocked: you will join listen-only. Allow them in the browser's site settings, then rejoin."
                  : "No camera or microphone found: you will join listen-only.";
  }
  if (!hasMic) return denied ? "The microphone is blocked: others will not hear you." : "No microphone found: others will not hear you.";
  if (!hasCam) return denied ? "The camera is blocked: you will join with audio only." : "No camera found: you will join with audio only.";
  return "";
}

function stopStream(stream) { if (stream) for (const t of stream.getTracks()) t.stop(); }

function preview() {
  previewing = previewing.then(previewOnce, previewOnce);  // one at a time: a later choice waits for the earlier
  return previewing;
}

async function previewOnce() {
  const mine = ++generation;
  stopStream(media.local); media.local = null;
  const { stream, errors } = await acquire();
  if (mine !== generation || joining) { stopStream(stream); return; }  // superseded, or joining meanwhile
  media.local = stream;
  gw.camera = stream.getVideoTracks().length > 0; gw.mic = stream.getAudioTracks().length > 0;
  $("prejoinnote").textContent = deviceNote(stream, errors);
  $("preview").srcObject = stream;
  applyWants();
  meter(stream);
  await listDevices();
}

function applyWants() {
  const cam = media.local && media.local.getVideoTracks()[0], mic = media.local && media.local.getAudioTracks()[0];
  if (cam) cam.enabled = wantCam;
  if (mic) mic.enabled = wantMic;
  setButton($("precam"), wantCam && cam ? "cam" : "camoff", !cam ? "No camera" : wantCam ? "Turn camera off" : "Turn camera on", !(wantCam && cam));
  setButton($("premic"), wantMic && mic ? "mic" : "micoff", !mic ? "No microphone" : wantMic ? "Mute microphone" : "Unmute microphone", !(wantMic && mic));
  $("precam").disabled = !cam; $("premic").disabled = !mic;
  $("previewoff").hidden = !!(cam && wantCam);
  $("previewoff").textContent = cam ? "Camera off" : "No camera";
}

async function listDevices() {
  let devices = [];
  try { devices = await navigator.mediaDevices.enumerateDevices(); } catch (e) { return; }
  const using = { videoinput: media.local && media.local.getVideoTracks()[0], audioinput: media.local && media.local.getAudioTracks()[0] };
  for (const [kind, sel, none] of [["videoinput", $("camsel"), "No camera"], ["audioinput", $("micsel"), "No microphone"]]) {
    const found = devices.filter((d) => d.kind === kind && d.deviceId);
    const current = using[kind] && using[kind].getSettings().deviceId;
    sel.replaceChildren(...(found.length ? found.map((d, i) => {
      const o = el("option", "", d.label || (kind === "videoinput" ? "Camera " : "Microphone ") + (i + 1)); o.value = d.deviceId;
      o.selected = d.deviceId === current; return o;
    }) : [Object.assign(el("option", "", none), { value: "" })]));
    sel.disabled = !found.length;
  }
}

function meter(stream) {
  // The microphone's level under the preview (a bar), so one sees the right microphone is picked.
  stopMeter();
  if (!stream.getAudioTracks().length) { $("level").style.width = "0"; return; }
  const ctx = media.meter = new AudioContext(); ctx.resume();
  const an = ctx.createAnalyser(); an.fftSize = 1024; ctx.createMediaStreamSource(stream).connect(an);
  const buf = new Float32Array(an.fftSize);
  media.meterTimer = setInterval(() => {
    an.getFloatTimeDomainData(buf);
    const rms = Math.sqrt(buf.reduce((a, v) => a + v * v, 0) / buf.length);
    $("level").style.width = Math.min(100, Math.round(rms * 400)) + "%";
  }, 100);
}

function stopMeter() {
  clearInterval(media.meterTimer);
  if (media.meter) media.meter.close().catch(() => {});
  media.meter = null;
}

// -- the room
function render() {
  const s = gw.state; if (!s) return;
  const mine = me();
  $("count").textContent = "(" + s.participants.length + ")" + (s.locked ? " · locked" : "");
  $("lock").textContent = s.locked ? "Unlock the room" : "Lock the room";
  $("record").textContent = s.recording ? "Stop recording" : "Record";
  $("record").setAttribute("aria-pressed", s.recording ? "true" : "false");
  $("recbadge").hidden = !s.recording;  // everyone sees that the room is being recorded
  $("modbar").classList.toggle("hidden", gw.role !== "moderator");
  const muted = !!(mine && mine.muted);
  const mic = media.local && media.local.getAudioTracks()[0];
  if (mic && mine) mic.enabled = !muted;  // muted in the AudioBridge, and not even sent
  setButton($("muteme"), muted ? "micoff" : "mic", !mic ? "No microphone" : muted ? "Unmute your microphone" : "Mute your microphone", muted);
  $("muteme").disabled = !mic;
  const cam = media.local && media.local.getVideoTracks()[0];
  const camOn = !!(cam && cam.readyState === "live");
  setButton($("camera"), camOn ? "cam" : "camoff", !gw.camera ? "No camera" : camOn ? "Turn your camera off" : "Turn your camera on", !camOn);
  $("camera").disabled = !gw.camera;
  renderPeople(s.participants);
  renderTiles();
}

function renderPeople(people) {
  // Rows are kept by participant and updated in place: a state update (several a second while people talk) must
  // not replace a button between the press and the release, nor take the keyboard focus away.
  const ul = $("people");
  const rows = new Map([...ul.children].map((li) => [li.dataset.id, li]));
  for (const [id, li] of rows) if (!people.some((p) => p.id === id)) li.remove();
  people.forEach((p, i) => {
    let li = rows.get(p.id);
    if (!li) { li = el("li"); li.dataset.id = p.id; li.append(el("div", "who")); }
    Object.assign(li.dataset, { kind: p.kind, muted: p.muted, role: p.role, talking: p.talking });
    const tags = el("span", "tags");
    for (const [cls, on, text] of [["phone", p.kind === "phone", "phone"], ["moderator", p.role === "moderator", "moderator"],
                                   ["muted", p.muted, p.muted_by_moderator ? "muted by moderator" : "muted"],
                                   ["talking", p.talking && !p.muted, "speaking"]]) {
      if (on) tags.append(el("span", "tag " + cls, text));
    }
    li.querySelector(".who").replaceChildren(el("span", "name", p.name + (p.id === gw.id ? " (you)" : "")), tags);
    let actions = li.querySelector(".actions");
    const moderates = gw.role === "moderator" && p.id !== gw.id;
    if (moderates && !actions) {
      const current = () => gw.state && gw.state.participants.find((x) => x.id === p.id);
      actions = el("span", "actions");
      const m = el("button", "secondary mute"); m.type = "button";
      m.onclick = () => { const c = current(); if (c) send({ type: "mute", participant_id: c.id, muted: !c.muted }); };
      const r = el("button", "secondary remove", "Remove"); r.type = "button";
      r.onclick = () => send({ type: "remove", participant_id: p.id });
      actions.append(m, r); li.append(actions);
    } else if (!moderates && actions) { actions.remove(); actions = null; }
    if (actions) {
      const m = actions.querySelector(".mute");
      m.textContent = p.muted ? "Unmute" : "Mute"; m.setAttribute("aria-label", (p.muted ? "Unmute " : "Mute ") + p.name);
      actions.querySelector(".remove").setAttribute("aria-label", "Remove " + p.name);
    }
    if (ul.children[i] !== li) ul.insertBefore(li, ul.children[i] || null);
  });
}

function remoteTrack(p) {
  // The subscribed camera of browser `p`, if Janus relays it (an active stream) and its owner has it on.
  if (p.kind !== "browser" || !p.video || !media.pcs.sub) return null;
  const s = media.streams.find((x) => x.kind === "video" && x.active && x.feed === p.id);
  const t = s && media.pcs.sub.getTransceivers().find((x) => x.mid === s.mid);
  return t ? t.receiver.track : null;
}

function renderTiles() {
  // One tile per participant: a camera (a video, labelled) or an avatar (initials; phones: the phone mark).
  const people = gw.state ? gw.state.participants : [];
  const grid = $("grid");
  const byId = new Map([...grid.children].map((t) => [t.dataset.id, t]));
  for (const [id, tile] of byId) if (!people.some((p) => p.id === id)) { tile.querySelector("video").srcObject = null; tile.remove(); }
  const talking = people.find((p) => p.talking && !p.muted && p.id !== gw.id);
  if (talking) speaker = talking.id;
  for (const p of people) {
    let tile = byId.get(p.id);
    if (!tile) {
      tile = el("div", "tile"); tile.dataset.id = p.id; tile.setAttribute("role", "group");
      const v = el("video"); v.autoplay = true; v.playsInline = true; v.muted = true;
      const avatar = el("div", "avatar"); avatar.setAttribute("aria-hidden", "true");
      const label = el("div", "label");
      tile.append(v, avatar, label); grid.append(tile);
    }
    const self = p.id === gw.id;
    const track = self ? (media.local && media.local.getVideoTracks()[0]) : remoteTrack(p);
    const video = !!track && (self ? track.readyState === "live" : !track.muted);  // no black tile before a frame
    Object.assign(tile.dataset, { kind: p.kind, self, speaking: !!(p.talking && !p.muted), muted: !!p.muted, video });
    tile.setAttribute("aria-label", p.name + (self ? " (you)" : "") + (p.kind === "phone" ? ", phone" : "") + (p.muted ? ", muted" : ""));
    const v = tile.querySelector("video");
    if (track && (!v.srcObject || v.srcObject.getTracks()[0] !== track)) { v.srcObject = new MediaStream([track]); v.play().catch(() => {}); }
    if (!track && v.srcObject) v.srcObject = null;
    const avatar = tile.querySelector(".avatar");
    if (p.kind === "phone") { if (!avatar.querySelector("svg")) avatar.replaceChildren(icon("phone")); }
    else avatar.textContent = initials(p.name);
    const label = tile.querySelector(".label"); label.replaceChildren();
    if (p.kind === "phone") { const m = el("span", "mark"); m.append(icon("phone")); label.append(m); }
    if (p.muted) { const m = el("span", "mark muted-mark"); m.append(icon("micoff")); label.append(m); }
    label.append(el("span", "name", p.name + (self ? " (you)" : "")));
    tile.classList.toggle("featured", people.length > 6 && p.id === speaker);
  }
  layout();
}

function layout() {
  // The grid's columns: the arrangement whose tiles are largest in the stage; past six, a speaker view.
  const grid = $("grid"), n = grid.children.length, stage = $("stage");
  const W = stage.clientWidth, H = stage.clientHeight;
  grid.classList.toggle("speaker", n > 6);
  if (!n || !W || !H) return;
  if (n > 6) { grid.style.setProperty("--cols", String(Math.max(2, Math.min(6, Math.floor(W / 160))))); return; }
  let best = 1, bestW = 0;
  for (let cols = 1; cols <= n; cols++) {
    const rows = Math.ceil(n / cols);
    const w = Math.min((W - 8 * (cols - 1)) / cols, ((H - 8 * (rows - 1)) / rows) * 16 / 9);
    if (w > bestW) { bestW = w; best = cols; }
  }
  grid.style.setProperty("--cols", String(best)); grid.style.setProperty("--tile-w", Math.floor(bestW) + "px");
}
window.addEventListener("resize", layout);

function listen(stream) {
  // Play the room's mix, and measure it: dominant frequency and level (read by tests and meters).
  const sink = new Audio(); sink.srcObject = stream; sink.play().catch(() => {});
  const ctx = new AudioContext(); ctx.resume(); media.contexts.push(ctx);
  const an = ctx.createAnalyser(); an.fftSize = 8192;
  ctx.createMediaStreamSource(stream).connect(an);
  const f = new Float32Array(an.frequencyBinCount), t = new Float32Array(an.fftSize);
  media.timers.push(setInterval(() => {
    an.getFloatFrequencyData(f); an.getFloatTimeDomainData(t);
    let best = 0; for (let i = 1; i < f.length; i++) if (f[i] > f[best]) best = i;
    gw.peakHz = best * ctx.sampleRate / an.fftSize;
    gw.rms = Math.sqrt(t.reduce((a, v) => a + v * v, 0) / t.length);
  }, 200));
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
  // After `joined`: the microphone (or receive-only) to the AudioBridge, then the camera to the VideoRoom. The
  // video connection exists whenever there is a camera, off or on (turning it on is a replaceTrack).
  const pcs = media.pcs, local = media.local;
  const audio = pcs.audio = new RTCPeerConnection({ iceServers: media.iceServers });
  const mic = local.getAudioTracks()[0];
  if (mic) audio.addTransceiver(mic, { direction: "sendrecv", streams: [local] });
  else audio.addTransceiver("audio", { direction: "recvonly" });
  audio.ontrack = (e) => listen(new MediaStream([e.track]));
  await offer("audio", audio);
  if (gw.closed || !gw.camera) return;  // ended meanwhile (closeMedia closed what was there), or no camera
  const video = pcs.video = new RTCPeerConnection({ iceServers: media.iceServers });
  video.addTransceiver(local.getVideoTracks()[0] || "video", { direction: "sendonly", streams: [local] });
  await offer("video", video);
}

let subChain = Promise.resolve();
function subscriberOffer(m) {
  // Janus' offers for the subscription, answered one after the other
  subChain = subChain.then(async () => {
    if (gw.closed) return;
    if (!media.pcs.sub) {
      media.pcs.sub = new RTCPeerConnection({ iceServers: media.iceServers });
      media.pcs.sub.ontrack = (e) => { e.track.onunmute = e.track.onmute = renderTiles; };
    }
    const pc = media.pcs.sub;
    await pc.setRemoteDescription({ type: "offer", sdp: m.sdp });
    await pc.setLocalDescription(await pc.createAnswer());
    await gathered(pc);
    if (gw.closed) { pc.close(); return; }
    media.streams = m.streams || [];
    send({ type: "answer", pc: "sub", sdp: pc.localDescription.sdp });
    renderTiles();
  }).catch((e) => { gw.error = "subscription: " + e; });
}

async function toggleCamera() {
  // Off: the track is stopped (the camera's light goes off) and the sender sends nothing; on: a new track.
  const sender = media.pcs.video && media.pcs.video.getSenders()[0];
  const cam = media.local && media.local.getVideoTracks()[0];
  if (cam) {
    media.local.removeTrack(cam); cam.stop();
    if (sender) await sender.replaceTrack(null).catch(() => {});
    send({ type: "camera", on: false });
  } else if (sender) {
    const id = $("camsel").value;
    try {
      const [track] = (await navigator.mediaDevices.getUserMedia(
        { video: { width: { ideal: 640 }, height: { ideal: 360 }, ...(id ? { deviceId: { exact: id } } : {}) } })).getVideoTracks();
      if (gw.closed) { track.stop(); return; }
      media.local.addTrack(track);
      await sender.replaceTrack(track);
      send({ type: "camera", on: true });
    } catch (e) { notice("Could not turn the camera on: " + (e.message || e.name)); }
  }
  render();
}

// -- the end: every screen that is not the room releases the camera and the microphone
const ENDINGS = {
  left: ["You left the meeting", "", true],
  removed: ["You were removed from the meeting", "A moderator removed you.", false],
  room_closed: ["The meeting has ended", "The room was closed.", false],
  room_locked: ["The meeting is locked", "A moderator locked the room: nobody else can join for now.", true],
  room_full: ["The meeting is full", "Try again when someone leaves.", true],
  disconnected: ["Connection lost", "The connection to the meeting was lost.", true],
  media_server_lost: ["Connection lost", "The meeting's media server was lost.", true],
};

function closeMedia() {
  generation++;  // a preview still waiting for its devices stops them when they come
  for (const pc of Object.values(media.pcs)) pc.close();
  media.pcs = {}; media.streams = [];
  stopStream(media.local);
  stopMeter();
  for (const t of media.timers) clearInterval(t);
  media.timers = [];
  for (const c of media.contexts) c.close().catch(() => {});
  media.contexts = [];
  for (const v of document.querySelectorAll("video")) v.srcObject = null;
  $("grid").replaceChildren();
}

const NO_RETRY = new Set(["invalid_host_link", "host_link_expired", "room_not_found", "forbidden_origin", "not_allowed"]);
let rejoinWith = null;  // the camera and microphone as they were, for Rejoin

function end(kind, text) {
  // `kind`: an ENDINGS key, or an error code (then `text` says why)
  const [title, detail, again] = ENDINGS[kind] || ["Could not join the meeting", "", !NO_RETRY.has(kind)];
  gw.closed = gw.closed || kind;
  const mine = me(), cam = media.local && media.local.getVideoTracks()[0];
  rejoinWith = gw.joined ? { cam: !!(cam && cam.readyState === "live"), mic: !(mine && mine.muted) } : { cam: wantCam, mic: wantMic };
  closeMedia();
  if (ws && ws.readyState <= 1) ws.close();
  $("endtitle").textContent = title;
  $("endtext").textContent = text || detail;
  $("rejoin").hidden = !again;
  status(text || title);
  show("ended"); $("infobtn").hidden = true;
  $(again ? "rejoin" : "home").focus();
}

// -- joining
async function join() {
  if (joining) return; joining = true;
  const name = $("name").value.trim() || "Guest";
  try { localStorage.setItem("gw.name", name); } catch (e) { /* private mode */ }
  status("joining…"); $("joinbtn").disabled = true;
  await previewing.catch(() => {});  // a preview under way ends first (its stream is ours, or dropped)
  stopMeter();
  await infoLoaded;
  if (gw.infoError && NO_RETRY.has(gw.infoError.code)) {  // a bad host link: said once, no WebSocket tried
    gw.error = gw.infoError.code; end(gw.infoError.code, gw.infoError.message); return;
  }
  if (!media.local) {
    const { stream, errors } = await acquire();
    if (gw.closed) { stopStream(stream); return; }
    media.local = stream;
    const note = deviceNote(stream, errors);
    if (note) notice(note);
  }
  gw.camera = media.local.getVideoTracks().length > 0; gw.mic = media.local.getAudioTracks().length > 0;
  const cam = media.local.getVideoTracks()[0];
  if (cam) { cam.enabled = true; if (!wantCam) { media.local.removeTrack(cam); cam.stop(); } }  // off: light off too
  setTimeout(() => { if (!gw.joined && !gw.closed) end("timeout", "The meeting did not answer: check the connection and try again."); }, 20000);
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const path = `/rooms/${roomId}/ws${hostToken ? "?host=" + encodeURIComponent(hostToken) : ""}`;
  ws = new WebSocket(`${scheme}://${location.host}${path}`);
  ws.onopen = () => send({ type: "join", name, kind: "browser", muted: !wantMic || !gw.mic, video: !!(cam && wantCam) });
  ws.onclose = () => {
    if (gw.joined && !gw.closed) end("disconnected");
    else if (!gw.joined && !gw.closed && !gw.error) refused(path);
  };
  ws.onmessage = async (ev) => {
    const m = JSON.parse(ev.data);
    if (m.type === "joined") {
      gw.id = m.participant_id; gw.role = m.role; gw.joined = true; gw.state = m.state;
      media.iceServers = m.ice_servers || [];
      status(m.role === "moderator" ? "you are a moderator" : "in the meeting");
      show("room"); $("infobtn").hidden = !(gw.room && gw.room.dial_in);
      if (window.innerWidth > 820) openPanel(true);
      render();
      $("muteme").focus();
      startMedia().catch((e) => { gw.error = "media: " + e; notice("Could not connect your audio or video: " + (e.message || e)); });
    } else if (m.type === "answer") {
      const pc = media.pcs[m.pc];
      if (pc) await pc.setRemoteDescription({ type: "answer", sdp: m.sdp }).catch((e) => {
        gw.error = "media: " + e; notice("Could not connect your " + m.pc + ": " + (e.message || e));
      });
    } else if (m.type === "offer" && m.pc === "sub") { subscriberOffer(m); }
    else if (m.type === "state") {
      const before = me(), wasRecording = !!(gw.state && gw.state.recording); gw.state = m; const after = me();
      if (after && after.muted_by_moderator && !(before && before.muted_by_moderator)) notice("A moderator muted you");
      if (m.recording !== wasRecording) notice(m.recording ? "This meeting is being recorded" : "Recording stopped");
      render();
    } else if (m.type === "removed" || m.type === "room_closed") { end(m.type); }
    else if (m.type === "error") {
      gw.error = m.code || m.message;
      if (!gw.joined || m.code === "media_server_lost") end(m.code, m.message);
      else notice(m.message);
    }
  };
}

async function refused(path) {
  // The WebSocket was refused before it opened (a browser does not tell why): ask the same URL over HTTP.
  let why = "Could not connect to the meeting.", code = "refused";
  try { const body = await (await fetch(path)).json(); if (body.error) { gw.error = code = body.error.code; why = body.error.message; } }
  catch (e) { /* keep the generic reason */ }
  end(code, why);
}

// -- the host's "call a phone", with the call's progress
const PROGRESS = { initiated: "calling", ringing: "ringing", answered: "answered", joined: "in the room" };
async function followCall(to, voiceId) {
  // until the call ends (or 3 minutes, or another call is placed: the newest is the one shown)
  const url = `/rooms/${roomId}/dial/${voiceId}?host=${encodeURIComponent(hostToken)}`, mine = dialing;
  for (let i = 0; i < 180 && gw.screen === "room" && mine === dialing; i++) {
    let call;
    try { const r = await fetch(url); call = await r.json(); if (!r.ok) break; } catch (e) { break; }
    let phase = call.phase === "in_room" ? "in the room" : PROGRESS[call.state] || (call.answered_at ? "answered" : "calling");
    if (call.ended_at) phase = call.answered_at ? "ended" : "failed";
    if (mine !== dialing) return;
    if (gw.dialProgress[gw.dialProgress.length - 1] !== phase) gw.dialProgress.push(phase);
    const why = call.reason ? " (" + String(call.reason).replace(/_/g, " ") + (call.sip_code ? ", " + call.sip_code : "") + ")" : "";
    $("dialstatus").textContent = `${to}: ${phase}${call.ended_at ? why : ""}`;
    if (call.ended_at) return;
    await new Promise((ok) => setTimeout(ok, 1000));
  }
}

$("dialform").onsubmit = async (ev) => {
  // the moderator's outbound call: the room service places it through the Voice API with the project's keys
  ev.preventDefault();
  const to = $("dialto").value.trim(); if (!to || $("dialbtn").disabled) return;
  dialing++; $("dialbtn").disabled = true;
  $("dialstatus").textContent = "calling " + to + "…"; gw.dialProgress = [];
  try {
    const r = await fetch(`/rooms/${roomId}/dial`, { method: "POST", headers: { "Content-Type": "application/json" },
                                                   body: JSON.stringify({ to, host: hostToken }) });
    const body = await r.json();
    gw.dial = { status: r.status, ...body };
    if (!r.ok) { $("dialstatus").textContent = "could not call: " + ((body.error && body.error.message) || r.status); return; }
    $("dialto").value = "";
    followCall(to, body.voice_id);
  } catch (e) { $("dialstatus").textContent = "could not call: " + e; }
  finally { $("dialbtn").disabled = false; }
};

const narrow = () => window.matchMedia("(max-width: 820px)").matches;
function openPanel(open) {
  $("room").classList.toggle("panel-open", open);
  for (const b of [$("peoplebtn"), $("infobtn")]) b.setAttribute("aria-expanded", open ? "true" : "false");
  if (open && narrow() && gw.screen === "room") $("closepanel").focus();  // a sheet over the videos: into it
  requestAnimationFrame(layout);
}
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape" && narrow() && $("room").classList.contains("panel-open")) { openPanel(false); $("peoplebtn").focus(); }
});

$("joinbtn").onclick = join;
$("precam").onclick = () => { wantCam = !wantCam; applyWants(); };
$("premic").onclick = () => { wantMic = !wantMic; applyWants(); };
$("camsel").onchange = $("micsel").onchange = () => preview();
$("muteme").onclick = () => { const p = me(); send({ type: "mute", muted: !(p && p.muted) }); };
$("camera").onclick = () => { toggleCamera(); };
$("peoplebtn").onclick = $("infobtn").onclick = () => openPanel(!$("room").classList.contains("panel-open"));
$("closepanel").onclick = () => { openPanel(false); $("peoplebtn").focus(); };
$("leave").onclick = () => { send({ type: "leave" }); end("left"); };
$("rejoin").onclick = () => {
  const next = new URLSearchParams(location.search); next.set("autojoin", "1"); next.set("name", $("name").value.trim());
  next.set("cam", rejoinWith && !rejoinWith.cam ? "0" : "1"); next.set("mic", rejoinWith && !rejoinWith.mic ? "0" : "1");
  location.replace(location.pathname + "?" + next.toString());
};
$("muteall").onclick = () => send({ type: "mute_all", muted: true });
$("unmuteall").onclick = () => send({ type: "mute_all", muted: false });
$("lock").onclick = () => send({ type: "lock", locked: !(gw.state && gw.state.locked) });
$("record").onclick = () => send({ type: "record", on: !(gw.state && gw.state.recording) });
setButton($("peoplebtn"), "people", "People and meeting details", false);
setButton($("leave"), "leave", "Leave the meeting", false);
$("leave").classList.remove("off");

infoLoaded = loadInfo();
if (q.get("autojoin") === "1") join();
else preview().catch((e) => { $("prejoinnote").textContent = "Could not open the camera or microphone: " + e; });
