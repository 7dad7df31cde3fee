// jblip playground: plain JavaScript on purpose (no build step, no CDN; the page works offline).
// It asks the server it came from: GET limits for the decoding bounds, then a streaming
// POST v1/chat/completions per question, read as server-sent events.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { limits: null, image: null, controller: null };

// ------------------------------------------------------------------------ tabs
// Each feature has its <section class="panel"> in index.html and calls addTab(label, panel)
// (search.js does, when the server has an index); the tab bar appears once there are two.
const tabs = [];

function addTab(label, panel) {
  const button = document.createElement("button");
  button.type = "button";
  button.textContent = label;
  button.setAttribute("role", "tab");
  button.addEventListener("click", () => showTab(panel));
  tabs.push({ button, panel });
  $("tabs").append(button);
  $("tabs").hidden = tabs.length < 2;
  showTab(tabs[0].panel);
}

function showTab(panel) {
  for (const tab of tabs) {
    const on = tab.panel === panel;
    tab.panel.hidden = !on;
    tab.button.setAttribute("aria-selected", String(on));
  }
}

window.jblipPlayground = { addTab, errorMessage };

// ------------------------------------------------------------------------ limits
async function loadLimits() {
  try {
    const response = await fetch("limits");
    if (!response.ok) throw new Error(`GET limits answered ${response.status}`);
    state.limits = await response.json();
  } catch (e) {
    showError(`Could not read the server's limits (${e.message}); is jblip serve still running?`);
    return;
  }
  const l = state.limits;
  $("model-name").textContent = l.model;
  const maxTokens = $("max-tokens");
  maxTokens.max = l.max_tokens;
  maxTokens.value = l.default_max_tokens;
  $("max-tokens-limit").textContent = `(1–${l.max_tokens})`;
  const temperature = $("temperature");
  temperature.min = l.temperature.min;
  temperature.max = l.temperature.max;
  $("beams").max = l.max_beams;
  $("limits").textContent = `Images up to ${formatBytes(l.max_image_bytes)} and ` +
    `${(l.max_image_pixels / 1e6).toFixed(0)} megapixels; prompts up to ${l.max_prompt_tokens} tokens.`;
  document.body.dataset.ready = "true";
}

function formatBytes(n) {
  return n >= 1 << 20 ? `${(n / (1 << 20)).toFixed(0)} MiB` : `${(n / 1024).toFixed(0)} KiB`;
}

// ------------------------------------------------------------------------ image
function useFile(file) {
  if (!file) return;
  const reader = new FileReader();
  reader.addEventListener("load", () => {
    const url = String(reader.result);
    const isImage = /^data:image\//i.test(url);
    state.image = { name: file.name, type: file.type || "unknown type", url, isImage };
    const thumbnail = $("thumbnail");
    thumbnail.hidden = !isImage;
    if (isImage) {
      thumbnail.src = url;
      thumbnail.alt = `Chosen image: ${file.name}`;
    } else {
      thumbnail.removeAttribute("src");
      thumbnail.alt = "";
    }
    $("file-name").textContent = isImage ? file.name : `${file.name} (${state.image.type})`;
    $("drop-hint").textContent = "Drop another image or choose a file";
    hideError();
  });
  reader.addEventListener("error", () => showError(`Could not read ${file.name}.`));
  reader.readAsDataURL(file);
}

function setUpImageInput() {
  const input = $("image-input");
  input.addEventListener("change", () => useFile(input.files[0]));
  const zone = $("drop-zone");
  for (const kind of ["dragenter", "dragover"]) {
    zone.addEventListener(kind, (e) => { e.preventDefault(); zone.classList.add("dragging"); });
  }
  for (const kind of ["dragleave", "drop"]) {
    zone.addEventListener(kind, () => zone.classList.remove("dragging"));
  }
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    useFile(e.dataTransfer && e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    const file = [...(e.clipboardData ? e.clipboardData.files : [])].find((f) => f.type.startsWith("image/"));
    if (file) useFile(file);
  });
}

// ------------------------------------------------------------------------ errors
function showError(message) {
  const error = $("error");
  error.textContent = message;
  error.hidden = false;
}

function hideError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

async function errorMessage(response) {
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON: fall back to the status */ }
  const message = body && body.error && body.error.message;
  return `The server refused the request (${response.status}): ${message || response.statusText}`;
}

// ------------------------------------------------------------------------ decoding controls
function syncBeams() {
  const sampling = Number($("temperature").value) > 0;
  const beams = $("beams");
  beams.disabled = sampling;  // the server refuses beam search with sampling
  if (sampling) beams.value = 1;
  $("beams-note").textContent = sampling ? "(1 when sampling)" : "";
}

function checkControls() {
  for (const [id, name] of [["max-tokens", "Max tokens"], ["temperature", "Temperature"], ["beams", "Beams"]]) {
    const input = $(id);
    if (!input.disabled && (input.value === "" || !input.checkValidity())) {
      return `${name} must be a number from ${input.min} to ${input.max}` +
        (input.step === "1" ? " (whole numbers)." : ".");
    }
  }
  return null;
}

function requestBody(question) {
  const temperature = Number($("temperature").value);
  const beams = Number($("beams").value);
  const body = {
    model: state.limits.model,
    stream: true,
    stream_options: { include_usage: true },
    max_tokens: Number($("max-tokens").value),
    temperature,
    messages: [{ role: "user", content: [
      { type: "text", text: question },
      { type: "image_url", image_url: { url: state.image.url } },
    ] }],
  };
  if (temperature === 0 && beams > 1) body.num_beams = beams;
  return body;
}

function describe(body) {
  if (body.num_beams) return `beam search (${body.num_beams} beams)`;
  return body.temperature > 0 ? `sampling at temperature ${body.temperature}` : "greedy";
}

// ------------------------------------------------------------------------ history
function addEntry(question, image) {
  const item = $("history-item").content.firstElementChild.cloneNode(true);
  const thumb = item.querySelector(".entry-thumb");
  if (image.isImage) {
    thumb.src = image.url;
    thumb.alt = image.name;
  } else {
    thumb.style.visibility = "hidden";
  }
  item.querySelector(".entry-question").textContent = question || "(no question)";
  item.querySelector(".entry-reuse").addEventListener("click", () => {
    $("question").value = question;
    $("question").focus();
  });
  item.dataset.state = "streaming";
  item.dataset.chunks = "0";
  $("history").append(item);
  $("history-empty").hidden = true;
  item.scrollIntoView({ block: "nearest" });
  return item;
}

function finishEntry(item, status, meta) {
  item.dataset.state = status;
  item.querySelector(".entry-meta").textContent = meta;
}

// ------------------------------------------------------------------------ asking
async function* serverSentEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart()).join("\n");
      if (data) yield data;
    }
  }
}

function setBusy(busy) {
  $("ask-button").disabled = busy;
  $("stop-button").hidden = !busy;
}

async function ask(event) {
  event.preventDefault();
  hideError();
  if (!state.limits) return showError("The server's limits are not loaded yet; reload the page.");
  if (!state.image) return showError("Choose or drop an image first.");
  const invalid = checkControls();
  if (invalid) return showError(invalid);
  const question = $("question").value.trim();
  const body = requestBody(question);
  const item = addEntry(question, state.image);
  const answer = item.querySelector(".entry-answer");
  const started = performance.now();
  state.controller = new AbortController();
  setBusy(true);
  let finish = null, tokens = null, chunks = 0;
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal: state.controller.signal,
    });
    if (!response.ok) {
      const message = await errorMessage(response);
      answer.textContent = message;
      finishEntry(item, "error", describe(body));
      return showError(message);
    }
    for await (const data of serverSentEvents(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
      for (const choice of chunk.choices || []) {
        if (choice.delta && choice.delta.content) {
          answer.textContent += choice.delta.content;
          item.dataset.chunks = String(++chunks);
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
    const seconds = ((performance.now() - started) / 1000).toFixed(2);
    const why = finish === "length" ? "stopped at max tokens" : "finished";
    const count = tokens === null ? "" : ` · ${tokens} token${tokens === 1 ? "" : "s"}`;
    finishEntry(item, "done", `${describe(body)} · ${why}${count} · ${seconds} s`);
  } catch (e) {
    if (e.name === "AbortError") {
      finishEntry(item, "stopped", `${describe(body)} · stopped`);
    } else {
      const message = e instanceof TypeError ? "Could not reach the server." : `The answer failed: ${e.message}`;
      if (!answer.textContent) answer.textContent = message;
      finishEntry(item, "error", describe(body));
      showError(message);
    }
  } finally {
    state.controller = null;
    setBusy(false);
  }
}

// ------------------------------------------------------------------------ start
document.addEventListener("DOMContentLoaded", () => {
  addTab($("ask-panel").dataset.tab, $("ask-panel"));
  setUpImageInput();
  $("temperature").addEventListener("input", syncBeams);
  $("ask-form").addEventListener("submit", ask);
  $("stop-button").addEventListener("click", () => state.controller && state.controller.abort());
  syncBeams();
  loadLimits();
});
