// jblip playground, "Search images" tab: text -> image search over the server's index
// (POST v1/search), the best matches shown as a grid with their scores. The tab is added only
// when GET v1/search/index says the server was started with --index.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  let searching = false;

  function showError(message) {
    $("search-error").textContent = message;
    $("search-error").hidden = false;
  }

  function hideError() {
    $("search-error").hidden = true;
    $("search-error").textContent = "";
  }

  async function loadIndex() {
    let info;
    try {
      const response = await fetch("v1/search/index");
      if (!response.ok) return;  // a server without the search endpoints: no tab
      info = await response.json();
    } catch (_) {
      return;
    }
    if (!info.loaded) return;
    const topK = $("search-top-k");
    topK.max = info.top_k.max;
    topK.value = Math.min(info.top_k.default, info.top_k.max);
    $("search-about").textContent = `${info.images} image${info.images === 1 ? "" : "s"} indexed, ` +
      `searched with ${info.model}; queries up to ${info.max_query_tokens} tokens.`;
    window.jblipPlayground.addTab($("search-panel").dataset.tab, $("search-panel"));
    document.body.dataset.search = "ready";
  }

  function showHits(body, seconds) {
    const grid = $("search-results");
    grid.replaceChildren();
    for (const hit of body.data) {
      const item = $("search-hit").content.firstElementChild.cloneNode(true);
      const image = item.querySelector("img");
      image.src = hit.url;
      image.alt = `${hit.name}, rank ${hit.rank}`;
      item.querySelector(".hit-rank").textContent = `#${hit.rank}`;
      item.querySelector(".hit-score").textContent = `score ${hit.score.toFixed(3)}`;
      item.querySelector(".hit-name").textContent = hit.name;
      item.dataset.id = hit.id;
      grid.append(item);
    }
    $("search-status").textContent = `The ${body.data.length} best of ${body.images} images for ` +
      `“${body.query}” · ${seconds} s`;
    grid.dataset.query = body.query;
  }

  async function search(event) {
    event.preventDefault();
    if (searching) return;
    hideError();
    const query = $("search-query").value;
    const topK = $("search-top-k");
    if (!query.trim()) return showError("Type what to look for, e.g. “blue square”.");
    if (topK.value === "" || !topK.checkValidity()) {
      return showError(`Images to show must be a whole number from 1 to ${topK.max}.`);
    }
    searching = true;
    $("search-button").disabled = true;
    const started = performance.now();
    try {
      const response = await fetch("v1/search", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ query, top_k: Number(topK.value) }),
      });
      if (!response.ok) return showError(await window.jblipPlayground.errorMessage(response));
      showHits(await response.json(), ((performance.now() - started) / 1000).toFixed(2));
    } catch (_) {
      showError("Could not reach the server.");
    } finally {
      searching = false;
      $("search-button").disabled = false;
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("search-form").addEventListener("submit", search);
    loadIndex();
  });
})();
