"use strict";
// The operator console: a live snapshot over Server-Sent Events, the CDR search, a call's timeline, drains.
// Everything the server sends is put in the page as text (textContent), never as markup.
(() => {
  const $ = (id) => document.getElementById(id);
  const state = { connected: false, snapshots: 0, snapshot: null, results: [], total: 0, timeline: null, page: 1,
                  drained: [] };
  window.gwConsole = state;
  const PER_PAGE = 25;
  const SVG = "http://www.w3.org/2000/svg";
  // against the origin: a page opened as http://user:key@host/console has a base URL fetch() refuses
  const api = (path, options) => fetch(location.origin + path, options);

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }
  function cell(tr, label, value, cls) {
    const td = el("td", value, cls);
    td.dataset.label = label;
    if (cls === "mono" && value) td.title = String(value);  // cut short on narrow tables: whole on hover
    tr.appendChild(td);
    return td;
  }
  function timelineButton(tr, voiceId) {  // the last cell of a call's row
    const b = el("button", "Timeline", "small");
    b.type = "button";
    b.addEventListener("click", () => showTimeline(voiceId));
    cell(tr, "", "").appendChild(b);
  }
  function duration(s) {
    if (s === null || s === undefined) return "";
    s = Math.round(s);
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
    return (h ? h + ":" + String(m).padStart(2, "0") : m) + ":" + String(sec).padStart(2, "0");
  }
  function localTime(iso) { return iso ? new Date(iso).toLocaleString() : ""; }
  function num(v, unit, digits) { return v === null || v === undefined ? "–" : Number(v).toFixed(digits) + unit; }

  // -- the live part
  function renderCalls(calls) {
    const body = $("calls").tBodies[0];
    body.replaceChildren();
    for (const c of calls) {
      const tr = el("tr");
      tr.dataset.voiceId = c.voice_id;
      cell(tr, "Direction", c.direction);
      cell(tr, "From", c.from, "mono");
      cell(tr, "To", c.to, "mono");
      cell(tr, "DID", c.did, "mono");
      cell(tr, "Project", c.project);
      cell(tr, "Phase", c.phase || c.state, "phase");
      cell(tr, "Room", c.room_id, "mono");
      cell(tr, "Duration", duration(c.duration_s), "duration");
      cell(tr, "Codec", c.codec);
      cell(tr, "Loss", num(c.loss_pct, " %", 1));
      cell(tr, "Jitter", num(c.jitter_ms, " ms", 1));
      cell(tr, "Worker", c.worker);
      timelineButton(tr, c.voice_id);
      body.appendChild(tr);
    }
    $("call-count").textContent = String(calls.length);
    $("no-calls").hidden = calls.length > 0;
    $("calls").hidden = calls.length === 0;
  }

  function renderRooms(rooms) {
    const list = $("rooms");
    list.replaceChildren();
    for (const r of rooms) {
      const li = el("li");
      li.appendChild(el("span", r.room_id, "mono room-id"));
      const who = el("ul", null, "people");
      for (const p of r.phones) who.appendChild(el("li", "☎ " + p.name, "phone"));
      for (const b of r.browsers) who.appendChild(el("li", "🖥 " + b.name + (b.role === "moderator" ? " (host)" : ""), "browser"));
      li.appendChild(who);
      list.appendChild(li);
    }
    $("no-rooms").hidden = rooms.length > 0;
  }

  function renderWorkers(workers, media) {
    const body = $("workers").tBodies[0];
    body.replaceChildren();
    for (const w of workers) {
      const load = w.load || {};
      const tr = el("tr");
      tr.dataset.worker = w.name;
      cell(tr, "Worker", w.name + (w.self ? " (this one)" : ""));
      const st = cell(tr, "Status", w.status, "status");
      st.dataset.status = w.status;
      cell(tr, "Calls", w.calls);
      cell(tr, "CPU", num(load.cpu, " %", 0));
      cell(tr, "Clock p99", num(load.lateness_p99_ms, " ms", 1));
      cell(tr, "Webhooks queued", load.webhooks_queued === undefined ? "–" : load.webhooks_queued);
      cell(tr, "RTP ports", w.rtp_ports_in_use === undefined || w.rtp_ports_in_use === null ? "–" : w.rtp_ports_in_use);
      cell(tr, "CDR", w.cdr_ok === false ? "failing" : w.cdr_ok ? "ok" : "–");
      const td = cell(tr, "", "");
      const b = el("button", "Drain", "small danger drain");
      b.type = "button";
      b.disabled = w.status !== "up" || state.drained.includes(w.name);
      b.addEventListener("click", () => askDrain(w.name, w.calls));
      td.appendChild(b);
      body.appendChild(tr);
    }
    const list = $("media");
    list.replaceChildren();
    if (!media.length) list.appendChild(el("li", "No room service running on this data directory.", "empty"));
    for (const m of media) {
      const li = el("li");
      const dot = el("span", m.connected ? "up" : "down", "status");
      dot.dataset.status = m.connected ? "up" : "down";
      li.appendChild(dot);
      li.appendChild(el("span", " " + m.url + " · " + m.rooms + " room" + (m.rooms === 1 ? "" : "s"), "mono"));
      list.appendChild(li);
    }
  }

  const CHARTS = [["calls", "Calls", ""], ["cpu", "CPU", " %"], ["lateness_p99_ms", "Media clock lateness p99", " ms"],
                  ["webhooks_queued", "Webhook backlog", ""]];
  function renderCharts(series) {
    const box = $("charts");
    box.replaceChildren();
    const names = Object.keys(series).sort();
    const now = Date.now() / 1000, span = 600;
    for (const [key, title, unit] of CHARTS) {
      let peak = 0;
      for (const n of names) for (const s of series[n]) if (s.t >= now - span) peak = Math.max(peak, s[key] || 0);
      const top = peak > 0 ? peak * 1.15 : 1;
      const fig = el("figure", null, "chart");
      fig.dataset.metric = key;
      const W = 300, H = 90;
      const svg = document.createElementNS(SVG, "svg");
      svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
      svg.setAttribute("role", "img");
      svg.setAttribute("aria-label", title);
      const base = document.createElementNS(SVG, "line");
      for (const [a, v] of [["x1", 0], ["y1", H - 1], ["x2", W], ["y2", H - 1]]) base.setAttribute(a, v);
      base.setAttribute("class", "axis");
      svg.appendChild(base);
      const legend = el("figcaption");
      legend.appendChild(el("span", title, "title"));
      names.forEach((n, i) => {
        const pts = series[n].filter((s) => s.t >= now - span)
          .map((s) => `${((s.t - (now - span)) / span * W).toFixed(1)},${(H - 2 - (s[key] || 0) / top * (H - 6)).toFixed(1)}`);
        const line = document.createElementNS(SVG, "polyline");
        line.setAttribute("points", pts.join(" "));
        line.setAttribute("class", "series s" + (i % 4));
        svg.appendChild(line);
        if (pts.length) {  // the latest sample as a dot (one sample alone draws no line)
          const [x, y] = pts[pts.length - 1].split(",");
          const dot = document.createElementNS(SVG, "circle");
          dot.setAttribute("cx", x); dot.setAttribute("cy", y); dot.setAttribute("r", "2.5");
          dot.setAttribute("class", "dot s" + (i % 4));
          svg.appendChild(dot);
        }
        const last = series[n].length ? series[n][series[n].length - 1][key] : null;
        legend.appendChild(el("span", `${n}: ${last === null ? "–" : Number(last).toFixed(key === "lateness_p99_ms" ? 1 : 0)}${unit}`, "key s" + (i % 4)));
      });
      const max = el("span", "max " + peak.toFixed(key === "lateness_p99_ms" ? 1 : 0) + unit, "max");
      fig.appendChild(legend);
      fig.appendChild(svg);
      fig.appendChild(max);
      box.appendChild(fig);
    }
  }

  function render(snap) {
    state.snapshot = snap;
    state.snapshots += 1;
    $("served").textContent = "served by " + snap.worker + " · " + snap.workers.length + " worker" + (snap.workers.length === 1 ? "" : "s");
    renderCalls(snap.calls);
    renderRooms(snap.rooms);
    renderWorkers(snap.workers, snap.media_servers);
    renderCharts(snap.series);
  }

  function connect() {
    const es = new EventSource("/console/api/live");
    es.addEventListener("open", () => { state.connected = true; setConn("live"); });
    es.addEventListener("snapshot", (e) => { try { render(JSON.parse(e.data)); } catch (err) { console.error(err); } });
    es.addEventListener("error", () => { state.connected = false; setConn("reconnecting"); });
  }
  function setConn(s) { $("conn").textContent = s; $("conn").dataset.state = s; }

  // -- drain
  let pending = null;
  function askDrain(name, calls) {
    pending = name;
    $("confirm-text").textContent = `Drain ${name}? It takes no new calls; its ${calls} call${calls === 1 ? "" : "s"} ` +
      "in progress may go on until they end (or the drain deadline), then it stops.";
    $("confirm").showModal();
  }
  $("confirm-no").addEventListener("click", () => { pending = null; $("confirm").close(); });
  $("confirm-yes").addEventListener("click", async () => {
    const name = pending;
    $("confirm").close();
    if (!name) return;
    const r = await api(`/console/api/workers/${encodeURIComponent(name)}/drain`,
                          { method: "POST", headers: { "X-Console": "drain" } });
    if (r.ok) state.drained.push(name);
    $("drain-msg").textContent = r.ok ? `${name} is draining.` : `The drain of ${name} failed: HTTP ${r.status}.`;
  });

  // -- search
  function query() {
    const p = new URLSearchParams();
    for (const k of ["since", "until"]) {
      const v = $("q-" + k).value;
      if (v) p.set(k, String(new Date(v).getTime() / 1000));
    }
    for (const k of ["number", "project", "state", "reason"]) {
      const v = $("q-" + k).value.trim();
      if (v) p.set(k, v);
    }
    return p;
  }
  async function search(page) {
    const p = query();
    $("csv").href = "/console/api/cdr.csv?" + p.toString();
    p.set("page", String(page));
    p.set("per_page", String(PER_PAGE));
    const r = await api("/console/api/cdr?" + p.toString());
    const body = await r.json();
    if (!r.ok) { $("found").textContent = body.error ? body.error.message : "HTTP " + r.status; return; }
    state.page = page;
    state.results = body.calls;
    state.total = body.total;
    const tbody = $("results").tBodies[0];
    tbody.replaceChildren();
    for (const c of body.calls) {
      const tr = el("tr");
      tr.dataset.voiceId = c.voice_id;
      cell(tr, "Started", localTime(c.started_at));
      cell(tr, "Direction", c.direction);
      cell(tr, "From", c.from, "mono");
      cell(tr, "To", c.to, "mono");
      cell(tr, "Project", c.project);
      cell(tr, "State", c.state);
      cell(tr, "Reason", c.reason);
      cell(tr, "Duration", duration(c.duration_s));
      cell(tr, "Worker", c.worker);
      timelineButton(tr, c.voice_id);
      tbody.appendChild(tr);
    }
    const first = body.total ? (page - 1) * PER_PAGE + 1 : 0;
    $("found").textContent = `${body.total} call${body.total === 1 ? "" : "s"}` +
      (body.total ? ` · ${first}–${first + body.calls.length - 1}` : "");
    $("prev").disabled = page <= 1;
    $("next").disabled = page * PER_PAGE >= body.total;
  }
  $("search").addEventListener("submit", (e) => { e.preventDefault(); search(1); });
  $("prev").addEventListener("click", () => search(Math.max(1, state.page - 1)));
  $("next").addEventListener("click", () => search(state.page + 1));

  // -- timeline
  async function showTimeline(voiceId) {
    const r = await api("/console/api/calls/" + encodeURIComponent(voiceId));
    const body = await r.json();
    if (!r.ok) return;
    state.timeline = body;
    const c = body.call;
    $("tl-id").textContent = c.voice_id;
    $("tl-summary").textContent = `${c.direction} · ${c.from} → ${c.to} · ${c.project || "no project"} · ` +
      `${c.state}${c.reason ? " (" + c.reason + ")" : ""} · worker ${c.worker}`;
    const list = $("timeline");
    list.replaceChildren();
    const t0 = body.events.length ? body.events[0].ts : 0;
    for (const e of body.events) {
      const li = el("li");
      li.dataset.state = e.state;
      li.appendChild(el("span", "+" + (e.ts - t0).toFixed(2) + " s", "offset mono"));
      li.appendChild(el("span", e.state, "state"));
      const detail = Object.entries(e.detail).filter(([, v]) => v !== null && v !== "" && typeof v !== "object")
        .map(([k, v]) => `${k}=${v}`).join(" ");
      li.appendChild(el("span", detail, "detail mono"));
      list.appendChild(li);
    }
    $("timeline-section").hidden = false;
    $("timeline-section").scrollIntoView({ block: "nearest" });
  }
  $("tl-close").addEventListener("click", () => { $("timeline-section").hidden = true; state.timeline = null; });

  connect();
  search(1);
})();
