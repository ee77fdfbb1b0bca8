// The search page: plain DOM calls against the JSON API, no framework and no build step.
// Every piece of data goes into the page as text nodes or attributes, never as HTML.
"use strict";

const PAGE_SIZE = 12;

const $ = (testid) => document.querySelector(`[data-testid="${testid}"]`);
const ui = {
  form: $("search-form"),
  collection: $("collection"),
  query: $("query"),
  upload: $("upload"),
  queryImage: $("query-image"),
  error: $("error"),
  status: $("status"),
  results: $("results"),
  prev: $("prev"),
  next: $("next"),
  pageInfo: $("page-info"),
};

// The query being paged through: {text} or {file}; null before the first search.
let current = null;
let offset = 0;
let nextOffset = null;
// Only the latest request may draw: an older one that answers late is aborted instead.
let inFlight = null;

class ApiError extends Error {}

function el(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value !== null && value !== undefined && value !== false) {
      node.setAttribute(name, value === true ? "" : String(value));
    }
  }
  node.append(...[].concat(children)); // strings become text nodes
  return node;
}

async function api(path, init = {}) {
  const response = await fetch(path, init);
  let body = null;
  try {
    body = await response.json();
  } catch {
    // Not JSON (a proxy's error page, say): the status line below says what happened.
  }
  if (!response.ok) {
    const message = body?.error?.message ?? `${response.status} ${response.statusText}`;
    throw new ApiError(message);
  }
  return body;
}

function showError(message) {
  ui.error.textContent = message;
  ui.error.hidden = false;
}

function clearError() {
  ui.error.textContent = "";
  ui.error.hidden = true;
}

async function loadCollections() {
  let body;
  try {
    body = await api("/v1/collections");
  } catch (error) {
    showError(`Could not list the collections: ${error.message}`);
    return;
  }
  const options = body.collections.map((c) =>
    el("option", { value: c.name, "data-kind": c.kind },
      `${c.name} (${c.kind}, ${c.live.toLocaleString()} items)`));
  for (const [name, why] of Object.entries(body.unavailable ?? {})) {
    options.push(el("option", { value: name, disabled: true, title: why }, `${name} (unavailable)`));
  }
  if (!body.collections.length) {
    options.unshift(el("option", { value: "", disabled: true }, "no collections served"));
  }
  ui.collection.replaceChildren(...options);
}

function formatSeconds(seconds) {
  return Number(seconds).toFixed(1);
}

function thumbnail(hit, className) {
  const img = el("img", { src: hit.media_url, alt: hit.caption ?? `item ${hit.id}`, class: className });
  // An item whose file is not on this server: a plain box says so instead of a broken icon.
  img.addEventListener("error", () => img.replaceWith(el("div", { class: `${className} missing` }, "no preview")));
  return img;
}

function media(hit) {
  if (hit.kind === "image") return thumbnail(hit, "picture");
  if (hit.kind === "caption") return thumbnail(hit, "thumb");
  // Video and segment: the media fragment makes the player start (and stop) at the moment.
  const timed = hit.start_s !== null && hit.end_s !== null;
  const src = timed ? `${hit.media_url}#t=${hit.start_s},${hit.end_s}` : hit.media_url;
  return el("video", { src, controls: true, muted: true, playsinline: true, preload: "metadata" });
}

function card(hit) {
  const meta = [
    el("span", { class: "score", "data-testid": "hit-score", title: "cosine similarity" },
      hit.score.toFixed(3)),
    el("span", { class: "kind" }, hit.kind),
  ];
  if (hit.start_s !== null && hit.end_s !== null) {
    meta.push(el("span", { class: "range", "data-testid": "hit-range" },
      `${formatSeconds(hit.start_s)}–${formatSeconds(hit.end_s)} s`));
  }
  const caption = hit.caption ?? (hit.kind === "segment" ? `a moment of ${hit.group_id}` : "");
  return el("article", {
    class: `card ${hit.kind}`, "data-testid": "hit", "data-id": hit.id, "data-kind": hit.kind,
  }, [
    media(hit),
    el("div", { class: "body" }, [
      el("p", { class: "text", "data-testid": "hit-caption" }, caption),
      el("p", { class: "meta" }, meta),
    ]),
  ]);
}

function render(page) {
  offset = page.offset;
  nextOffset = page.next_offset;
  const hits = page.hits;
  ui.results.replaceChildren(...(hits.length ? hits.map(card) : [el("p", { class: "empty" }, "No results.")]));
  ui.pageInfo.textContent = hits.length ? `results ${offset + 1}–${offset + hits.length}` : "";
  ui.prev.disabled = offset === 0;
  ui.next.disabled = nextOffset === null;
  const cached = page.cached ? "query embedding cached" : "query embedding computed";
  ui.status.textContent =
    `${page.query} query on ${page.collection} v${page.version}: ${page.took_ms.toFixed(1)} ms, ${cached}`;
}

function clearResults() {
  ui.results.replaceChildren();
  ui.pageInfo.textContent = "";
  ui.status.textContent = "";
  ui.prev.disabled = true;
  ui.next.disabled = true;
}

function request(name, at) {
  const path = `/v1/collections/${encodeURIComponent(name)}/search`;
  const signal = inFlight.signal;
  if (current.file) {
    const form = new FormData();
    form.append("image", current.file);
    form.append("k", String(PAGE_SIZE));
    form.append("offset", String(at));
    return api(`${path}/upload`, { method: "POST", body: form, signal });
  }
  return api(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ text: current.text, k: PAGE_SIZE, offset: at }),
    signal,
  });
}

async function search(at) {
  const name = ui.collection.value;
  if (!current) return;
  if (!name) {
    showError("Choose a collection to search.");
    return;
  }
  inFlight?.abort();
  const controller = new AbortController();
  inFlight = controller;
  clearError();
  ui.results.dataset.state = "loading";
  ui.results.setAttribute("aria-busy", "true");
  try {
    render(await request(name, at));
    ui.results.dataset.state = "done";
  } catch (error) {
    if (error.name === "AbortError") return; // a newer search replaced this one
    clearResults();
    showError(error.message);
    ui.results.dataset.state = "error";
  } finally {
    if (inFlight === controller) {
      inFlight = null;
      ui.results.removeAttribute("aria-busy");
    }
  }
}

function showQueryImage(file) {
  const img = ui.queryImage.querySelector("img");
  if (img.src) URL.revokeObjectURL(img.src);
  if (file) {
    img.hidden = false;
    img.src = URL.createObjectURL(file);
    ui.queryImage.querySelector("span").textContent = `searching by image: ${file.name}`;
  } else {
    img.removeAttribute("src");
  }
  ui.queryImage.hidden = !file;
}

// A file the browser cannot show (the server will say why it is no image): just its name.
ui.queryImage.querySelector("img").addEventListener("error", (event) => {
  event.target.hidden = true;
});

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.query.value.trim();
  if (!text) {
    showError("Type a query, or choose an image to search with.");
    return;
  }
  current = { text };
  showQueryImage(null);
  search(0);
});

ui.upload.addEventListener("change", () => {
  const file = ui.upload.files[0];
  if (!file) return;
  current = { file };
  // Cleared, so choosing the same file again searches again; the File stays in `current`.
  ui.upload.value = "";
  ui.query.value = "";
  showQueryImage(file);
  search(0);
});

ui.collection.addEventListener("change", () => search(0));
ui.prev.addEventListener("click", () => search(Math.max(0, offset - PAGE_SIZE)));
ui.next.addEventListener("click", () => {
  if (nextOffset !== null) search(nextOffset);
});

loadCollections();
