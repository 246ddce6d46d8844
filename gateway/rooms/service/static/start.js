"use strict";
// The start page: open a meeting link, or find a meeting by its ID and PIN (the room service answers with the link).
const $ = (id) => document.getElementById(id);
function say(text) { $("startmsg").textContent = text; }

$("bylink").onsubmit = (ev) => {
  ev.preventDefault();
  let url;
  try { url = new URL($("link").value.trim(), location.href); } catch (e) { say("That is not a link."); return; }
  if (url.origin !== location.origin || !/^\/rooms\/[A-Za-z0-9_-]+$/.test(url.pathname)) {
    say("That is not a meeting link of this server."); return;
  }
  location.assign(url.pathname + url.search);
};

$("bymeeting").onsubmit = async (ev) => {
  ev.preventDefault();
  const body = { meeting_id: $("meeting").value.replace(/\s/g, ""), pin: $("pin").value.replace(/\s/g, "") };
  say("Looking for the meeting…");
  try {
    const r = await fetch("/rooms/lookup", { method: "POST", headers: { "Content-Type": "application/json" },
                                             body: JSON.stringify(body) });
    const answer = await r.json();
    if (r.ok) { location.assign(answer.url); return; }
    say(answer.error ? answer.error.message : "Could not find the meeting.");
  } catch (e) { say("Could not reach the server."); }
};
