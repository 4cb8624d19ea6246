// The page that tries a specialist. It talks only to the server that served it (relative URLs;
// the Content-Security-Policy set by page.py forbids anything else) and renders every server
// string with textContent, never as HTML: a label or a model card cannot inject markup.
"use strict";

const TOKEN_KEY = "headstart.token";
const $ = (id) => document.getElementById(id);
const state = { models: [], current: null, chat: [], abort: null, file: null, previewUrl: null };

class ServerError extends Error {
  constructor(status, message, code) { super(message); this.status = status; this.code = code; }
}

// ---- talking to the server ------------------------------------------------------------------

function withToken(headers) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { ...headers, Authorization: `Bearer ${token}` } : { ...headers };
}

// The server's own words: {"error": {"code", "message"}} (v2's {"error": "..."}, FastAPI's {"detail"} too).
async function errorFrom(resp) {
  let message = `${resp.status} ${resp.statusText}`.trim();
  let code;
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) { message = body.error.message; code = body.error.code; }
    else if (body && typeof body.error === "string") message = body.error;  // Open Inference Protocol v2
    else if (body && typeof body.detail === "string") message = body.detail;
  } catch (_) { /* not JSON: the status line says it */ }
  return new ServerError(resp.status, message, code);
}

async function api(path, options = {}) {
  let resp;
  try {
    resp = await fetch(path, { ...options, headers: withToken(options.headers || {}) });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ServerError(0, "The server cannot be reached.");
  }
  if (resp.status === 401) {
    const err = await errorFrom(resp);
    askForToken(err.message);
    throw err;
  }
  if (!resp.ok) throw await errorFrom(resp);
  return resp;
}

// ---- the token: asked once, kept for this tab ---------------------------------------------------

function askForToken(message) {
  const hadToken = sessionStorage.getItem(TOKEN_KEY) !== null;
  sessionStorage.removeItem(TOKEN_KEY);
  $("token-form").hidden = false;
  setStatus(hadToken ? `Token refused: ${message}` : "This server needs its access token.");
  $("token").focus();
}

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  $("token").value = "";
  $("token-form").hidden = true;
  loadModels();
});

// ---- status, errors, facts ----------------------------------------------------------------------

function setStatus(text) { $("status").textContent = text; }
function showError(err) {
  if (err && err.name === "AbortError") return;
  $("error").textContent = err ? (err.message || String(err)) : "";
}

function formatValue(value) {
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : String(Number(value.toPrecision(4)));
  if (Array.isArray(value)) return value.map(formatValue).join(", ");
  if (value && typeof value === "object") {
    return Object.entries(value).map(([k, v]) => `${k} ${formatValue(v)}`).join(", ");
  }
  return value === null || value === undefined ? "" : String(value);
}

const SHOWN_LABELS = 12;
// What a user wants to know first, in this order; `describe` says each one in words.
const FACTS = {
  task: (m) => m.task,
  base: (m) => {
    const base = m.base || {};
    if (typeof base === "string") return base;
    const size = typeof base.params === "number" ? `, ${(base.params / 1e6).toFixed(1)}M params` : "";
    return base.name ? `${base.name}${base.kind ? ` (${base.kind}${size})` : ""}` : "";
  },
  method: (m) => formatValue(m.method),
  labels: (m) => {
    const labels = m.labels || [];
    const more = labels.length > SHOWN_LABELS ? `, … (${labels.length} in all)` : "";
    return labels.slice(0, SHOWN_LABELS).join(", ") + more;
  },
  // Scalars only: per-class tables would drown the headline numbers.
  metrics: (m) => Object.entries(m.metrics || {}).filter(([, v]) => typeof v !== "object")
    .map(([k, v]) => `${k} ${formatValue(v)}`).join(", "),
  created: (m) => m.created,
};

function renderFacts(model) {
  const list = document.createElement("dl");
  list.className = "facts";
  for (const [key, describe] of Object.entries(FACTS)) {
    const text = describe(model);
    if (!text) continue;
    const dt = Object.assign(document.createElement("dt"), { textContent: key });
    const dd = Object.assign(document.createElement("dd"), { textContent: text });
    dd.dataset.fact = key;
    list.append(dt, dd);
  }
  $("facts").replaceChildren(list);
}

// ---- the list of specialists ----------------------------------------------------------------

function modeOf(model) {
  if (model.task === "text-generation" || model.kind === "generator") return "chat";
  if (model.task === "image-classification") return "image";
  return "text";
}

async function loadModels() {
  setStatus("Loading specialists…");
  try {
    const body = await (await api("/models")).json();
    state.models = Array.isArray(body) ? body : (body.models || body.data || []);
  } catch (err) {
    if (err.status !== 401) { setStatus(""); showError(err); }
    return;
  }
  const box = $("models");
  box.querySelectorAll(".model").forEach((el) => el.remove());
  $("models-empty").hidden = state.models.length > 0;
  $("models-empty").textContent = "No specialist is served.";
  for (const model of state.models) {
    const label = document.createElement("label");
    label.className = "model";
    const radio = Object.assign(document.createElement("input"), { type: "radio", name: "model", value: model.id });
    radio.addEventListener("change", () => selectModel(model.id));
    const name = Object.assign(document.createElement("span"), { className: "name", textContent: model.id });
    const task = Object.assign(document.createElement("span"), { className: "task", textContent: model.task || "" });
    label.append(radio, name, task);
    box.append(label);
  }
  setStatus(`${state.models.length} specialist${state.models.length === 1 ? "" : "s"} served.`);
  if (state.models.length === 1) box.querySelector("input").click();
}

async function selectModel(id) {
  const listed = state.models.find((m) => m.id === id) || { id };
  state.current = listed;
  state.chat = [];
  $("chat-log").replaceChildren();
  $("results").replaceChildren();
  showError(null);
  $("work-title").textContent = id;
  renderFacts(listed);
  const mode = modeOf(listed);
  for (const name of ["text", "image", "chat"]) $(`${name}-form`).hidden = name !== mode;
  // The card box is there from the start and closed: its text arriving moves nothing.
  $("card").textContent = "Loading…";
  $("card-box").hidden = false;
  try {
    const details = await (await api(`/models/${encodeURIComponent(id)}`)).json();
    if (state.current !== listed) return;  // another specialist was picked meanwhile
    // The listed headline metrics stay: the full set (timings, memory) would bury accuracy.
    renderFacts({ ...details, metrics: listed.metrics || details.metrics });
    $("card").textContent = details.card || "This specialist has no model card.";
  } catch (err) { showError(err); }
}

// ---- classification: text and images -----------------------------------------------------------

function topK(inputId) { return Math.max(1, Math.min(20, parseInt($(inputId).value, 10) || 5)); }

// One input gives `[{label, score}]`; a batch of one gives `[[...]]`: accept both.
function firstRow(body) {
  const rows = Array.isArray(body) ? body : (body.predictions || body.outputs || []);
  return Array.isArray(rows[0]) ? rows[0] : rows;
}

function renderBars(rows) {
  const items = rows.map(({ label, score }) => {
    const li = document.createElement("li");
    li.dataset.label = label;
    li.dataset.score = String(score);
    const name = Object.assign(document.createElement("span"), { className: "label", textContent: label });
    const track = Object.assign(document.createElement("span"), { className: "track" });
    track.setAttribute("aria-hidden", "true");
    const fill = Object.assign(document.createElement("span"), { className: "fill" });
    fill.style.display = "block";
    fill.style.width = `${Math.max(0, Math.min(1, score)) * 100}%`;
    track.append(fill);
    const value = Object.assign(document.createElement("span"), { className: "score", textContent: score.toFixed(3) });
    li.append(name, track, value);
    return li;
  });
  $("results").replaceChildren(...items);
}

async function classify(button, request) {
  const id = state.current.id;
  showError(null);
  button.disabled = true;
  setStatus(`Asking ${id}…`);
  try {
    const resp = await api(`/models/${encodeURIComponent(id)}/predict${request.query || ""}`, request);
    const rows = firstRow(await resp.json());
    if (state.current && state.current.id === id) renderBars(rows);
    setStatus(`${id} answered.`);
  } catch (err) {
    $("results").replaceChildren();
    setStatus("");
    showError(err);
  } finally {
    button.disabled = false;
  }
}

$("text-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const body = JSON.stringify({ inputs: $("text-input").value, parameters: { top_k: topK("text-top-k") } });
  classify(event.submitter || $("text-form").querySelector("button"),
           { method: "POST", headers: { "Content-Type": "application/json" }, body });
});

function classifyImage() {
  if (!state.file) return;
  // Raw bytes with the file's own type: the server decodes them, no base64 round trip.
  classify($("image-submit"), {
    method: "POST", body: state.file, query: `?top_k=${topK("image-top-k")}`,
    headers: { "Content-Type": state.file.type || "application/octet-stream" },
  });
}

function chooseFile(file) {
  if (!file) return;
  state.file = file;
  if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
  state.previewUrl = URL.createObjectURL(file);
  $("preview").src = state.previewUrl;
  $("preview").alt = `Chosen image: ${file.name}`;
  $("preview").hidden = false;
  $("drop-text").textContent = `${file.name}: drop or choose another`;
  $("image-submit").disabled = false;
  classifyImage();
}

$("image-input").addEventListener("change", () => chooseFile($("image-input").files[0]));
$("image-form").addEventListener("submit", (event) => { event.preventDefault(); classifyImage(); });
const dropZone = $("drop-zone");
dropZone.addEventListener("dragover", (event) => { event.preventDefault(); dropZone.classList.add("dragging"); });
dropZone.addEventListener("dragleave", () => dropZone.classList.remove("dragging"));
dropZone.addEventListener("drop", (event) => {
  event.preventDefault();
  dropZone.classList.remove("dragging");
  chooseFile(event.dataTransfer && event.dataTransfer.files[0]);
});

// ---- generators: a chat streamed over SSE ---------------------------------------------------------

function addTurn(who, text) {
  const turn = Object.assign(document.createElement("p"), { className: "turn" });
  turn.dataset.role = who;
  const name = Object.assign(document.createElement("span"), { className: "who", textContent: `${who}:` });
  const body = Object.assign(document.createElement("span"), { className: "text", textContent: text });
  turn.append(name, body);
  $("chat-log").append(turn);
  $("chat-log").scrollTop = $("chat-log").scrollHeight;
  return body;
}

// Server-sent events from a fetch body: events end with a blank line, each `data:` line carries JSON
// (an OpenAI chunk, or {"error": ...} when the server fails mid-stream), `[DONE]` ends the stream.
async function readEvents(resp, onData) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
    const events = buffer.split(/\r?\n\r?\n/);
    buffer = done ? "" : events.pop();
    for (const event of events) {
      const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ServerError(500, chunk.error.message || String(chunk.error), chunk.error.code);
      onData(chunk);
    }
    if (done) return;
  }
}

$("chat-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text || state.abort) return;
  showError(null);
  $("chat-input").value = "";
  state.chat.push({ role: "user", content: text });
  addTurn("user", text);
  const answer = addTurn("assistant", "");
  const id = state.current.id;
  state.abort = new AbortController();
  $("chat-send").disabled = true;
  $("chat-stop").disabled = false;
  setStatus(`${id} is writing…`);
  const maxTokens = Math.max(1, parseInt($("max-tokens").value, 10) || 128);
  try {
    const resp = await api("/v1/chat/completions", {
      method: "POST", signal: state.abort.signal, headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: id, messages: state.chat, stream: true, max_tokens: maxTokens }),
    });
    await readEvents(resp, (chunk) => {
      const choice = (chunk.choices || [])[0] || {};
      const piece = (choice.delta && choice.delta.content) || choice.text || "";
      answer.textContent += piece;
      $("chat-log").scrollTop = $("chat-log").scrollHeight;
    });
    setStatus(`${id} answered.`);
  } catch (err) {
    setStatus(err.name === "AbortError" ? "Stopped." : "");
    showError(err);
  } finally {
    if (answer.textContent) state.chat.push({ role: "assistant", content: answer.textContent });
    answer.parentElement.dataset.done = "true";
    state.abort = null;
    $("chat-send").disabled = false;
    $("chat-stop").disabled = true;
  }
});
$("chat-stop").addEventListener("click", () => state.abort && state.abort.abort());
// Enter sends, Shift+Enter makes a new line (as in most chat boxes).
$("chat-input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("chat-form").requestSubmit(); }
});

loadModels();
