"use strict";
// What both pages share: the token, API calls that tell "the server is gone" from "the server said no",
// the server's limits (/v1/info) applied to the form, the portrait preview and the status card.

// The token, when the server has one, comes in the page's address (?token=T) and goes on every request.
const token = new URLSearchParams(location.search).get("token");
const auth = token ? {Authorization: "Bearer " + token} : {};
const withToken = url => token ? url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token) : url;
const $ = id => document.getElementById(id);

// No answer at all (server stopped, network down): the page shows "server unreachable" with a retry.
class ServerGone extends Error {}
// An answer with an error status: its {"error": line} is shown as it is.
class Refused extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, {...options, headers: {...auth, ...(options.headers || {})}});
  } catch (error) {
    throw new ServerGone("the server does not answer (stopped, restarting, or the network is down)");
  }
  let body = null;
  try { body = await response.json(); } catch (error) { /* not JSON: a proxy's page, say */ }
  if (!response.ok) {
    const line = body && body.error ? body.error : `HTTP ${response.status} ${response.statusText}`;
    if (response.status >= 502 && response.status <= 504) throw new ServerGone(line);
    throw new Refused(response.status, line);
  }
  return body;
}

// The server's limits (/v1/info), or null once the status card says why not: no answer (offline, with a
// retry) or a refusal.
async function loadInfo(retry) {
  showStatus({state: "connecting", title: "connecting to the server…", progress: "busy"});
  try {
    return await api("/v1/info");
  } catch (error) {
    if (error instanceof ServerGone) showStatus({state: "offline", title: "server unreachable", detail: error.message,
                                                 action: {label: "retry", run: retry}});
    else showStatus({state: "error", title: "the server refused the page", detail: error.message});
    return null;
  }
}

// Offer only what the server accepts: its sizes, its step limit, its prompt length.
function applyInfo(info, preferred = {}) {
  const size = $("size"), steps = $("steps");
  size.replaceChildren(...info.sizes.map(value => {
    const [w, h] = value.split(/[*x]/).map(Number);
    return new Option(`${value}${value === info.default_size ? " (default)" : ""} · ${Math.round(w * h / 1000)}k px`, value);
  }));
  size.value = info.sizes.includes(preferred.size) ? preferred.size : info.default_size;
  steps.max = info.max_steps;
  steps.value = Math.min(preferred.steps || info.default_steps, info.max_steps);
  $("steps-hint").textContent = `1 to ${info.max_steps}`;
  if ($("prompt")) $("prompt").maxLength = info.max_prompt_chars;
}

// The portrait as soon as it is chosen: the stage shows who will speak (or says the browser cannot show it;
// the server then says whether it reads it).
function previewPortrait(input, img, placeholder) {
  const file = input.files[0];
  if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
  placeholder.dataset.text ??= placeholder.innerHTML;
  placeholder.innerHTML = placeholder.dataset.text;
  img.dataset.broken = "";
  img.onerror = () => {
    img.dataset.broken = "yes";
    img.hidden = true;
    placeholder.hidden = false;
    placeholder.textContent = "this file does not show as a picture here";
  };
  img.hidden = !file;
  placeholder.hidden = !!file;
  if (file) img.src = URL.createObjectURL(file);
}

// Whether the stage should show the portrait (one is chosen and the browser could draw it).
const portraitShows = (input, img) => input.files.length > 0 && img.dataset.broken !== "yes";

// The status card: a coloured pill (the state), a title, a detail line, optional progress (a fraction, or
// "busy" for an indeterminate bar) and an action button; both pages have an empty #status for it.
$("status").innerHTML = `
  <div class="line"><span id="status-pill" class="pill"></span><span id="status-title" class="title"></span></div>
  <progress id="status-progress" max="1" hidden></progress>
  <div id="status-detail" class="detail"></div>
  <div><button id="status-action" type="button" hidden></button></div>`;

function showStatus({state, title, detail = "", progress = null, action = null}) {
  const card = $("status");
  card.dataset.state = state;
  card.className = "status" + (state === "error" || state === "offline" ? " error" : "");
  $("status-pill").className = "pill " + state;
  $("status-pill").textContent = state;
  $("status-title").textContent = title;
  $("status-detail").textContent = detail;
  $("status-progress").hidden = progress === null;
  if (progress === "busy") $("status-progress").removeAttribute("value");
  else if (progress !== null) $("status-progress").value = progress;
  $("status-action").hidden = !action;
  if (action) { $("status-action").textContent = action.label; $("status-action").onclick = action.run; }
}

function plural(n, word) { return `${n} ${word}${n === 1 ? "" : "s"}`; }
