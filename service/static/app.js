// The search page: plain DOM calls against the JSON API, no framework and no build step.
// Every piece of data goes into the page as text nodes or attributes, never as HTML.
//
// State lives in the URL (?c=collection&q=text&f=filters&m=min score&s=sort&p=page, or
// like=ID instead of q for "items like item ID"), so that a search can be linked and the
// browser's back button steps through searches; the API key lives in
// sessionStorage (this tab only, never the URL) and goes out as X-API-Key. The filter box's
// text is read by where.js.
"use strict";

const PAGE_SIZE = 12;
const KEY_STORAGE = "cots.apiKey";

const $ = (testid) => document.querySelector(`[data-testid="${testid}"]`);
const ui = {
  form: $("search-form"),
  collection: $("collection"),
  query: $("query"),
  filters: $("filters"),
  minScore: $("min-score"),
  sort: $("sort"),
  similar: $("query-similar"),
  apiKey: $("api-key"),
  upload: $("upload"),
  queryImage: $("query-image"),
  error: $("error"),
  status: $("status"),
  results: $("results"),
  prev: $("prev"),
  next: $("next"),
  pageInfo: $("page-info"),
};

// The query being paged through: {text | file | similar (an item id), filters, minScore, sort};
// null before the first.
let current = null;
let offset = 0;
let nextOffset = null;
// Only the latest request may draw: an older one that answers late is aborted instead.
let inFlight = null;
// blob: URLs of media fetched with the key (see keyedMedia); revoked on redraw.
let mediaUrls = [];

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

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) ?? "";
}

function withKey(headers = {}) {
  const key = apiKey();
  return key ? { ...headers, "X-API-Key": key } : headers;
}

async function api(path, init = {}) {
  const response = await fetch(path, { ...init, headers: withKey(init.headers) });
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
    ui.collection.replaceChildren(el("option", { value: "", disabled: true }, "no collections"));
    showError(`Could not list the collections: ${error.message}`);
    return false;
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
  const chosen = ui.collection.value;
  ui.collection.replaceChildren(...options);
  if (chosen && body.collections.some((c) => c.name === chosen)) ui.collection.value = chosen;
  clearError();
  return true;
}

function formatSeconds(seconds) {
  return Number(seconds).toFixed(1);
}

function noPreview(node, className) {
  node.replaceWith(el("div", { class: `${className} missing` }, "no preview"));
}

// The grid shows thumbnails this wide (the server resizes, caches and EXIF-rotates them): a
// page of photos costs tens of kilobytes each, not megabytes. A click opens the full file.
const THUMB_WIDTH = 256;

function thumbUrl(hit) {
  return `${hit.media_url}?w=${THUMB_WIDTH}`;
}

// A blob: URL of media fetched with the key (an <img>, a poster or a new tab cannot send a
// header); revoked on the next redraw.
function keyedMedia(url) {
  return fetch(url, { headers: withKey() })
    .then((response) => (response.ok ? response.blob() : Promise.reject(new Error(response.status))))
    .then((blob) => {
      const local = URL.createObjectURL(blob);
      mediaUrls.push(local);
      return local;
    });
}

// Without a key the browser fetches media itself (and caches it). With one, the page fetches
// it with the header and hands the element a blob: URL; `fragment` keeps a video's moment.
function setMedia(node, url, className, fragment = "") {
  if (!apiKey()) {
    node.setAttribute("src", url + fragment);
    return;
  }
  keyedMedia(url)
    .then((local) => node.setAttribute("src", local + fragment))
    .catch(() => noPreview(node, className));
}

// The full file in a new tab. With a key the tab is opened at once (while the click still
// counts as one, so no popup blocker stops it) and sent to the file once fetched.
function fullFileLink(hit, child) {
  const link = el("a", {
    href: hit.media_url, target: "_blank", rel: "noopener", class: "full",
    "data-testid": "hit-full", title: "open the full file",
  }, child);
  link.addEventListener("click", (event) => {
    if (!apiKey()) return;
    event.preventDefault();
    const tab = window.open("", "_blank");
    keyedMedia(hit.media_url)
      .then((local) => {
        if (tab) tab.location.href = local;
      })
      .catch((error) => {
        tab?.close();
        showError(`Could not open the file: ${error.message}`);
      });
  });
  return link;
}

function thumbnail(hit, className) {
  const img = el("img", { alt: hit.caption ?? `item ${hit.id}`, class: className });
  // An item whose file is not on this server: a plain box says so instead of a broken icon.
  img.addEventListener("error", () => noPreview(img, className));
  setMedia(img, thumbUrl(hit), className);
  return fullFileLink(hit, img);
}

function media(hit) {
  if (hit.kind === "image") return thumbnail(hit, "picture");
  if (hit.kind === "caption") return thumbnail(hit, "thumb");
  // Video and segment: the media fragment makes the player start (and stop) at the moment;
  // the poster is the moment's first frame, small, until it plays.
  const timed = hit.start_s !== null && hit.end_s !== null;
  const video = el("video", { controls: true, muted: true, playsinline: true, preload: "metadata" });
  setMedia(video, hit.media_url, "video", timed ? `#t=${hit.start_s},${hit.end_s}` : "");
  if (!apiKey()) video.setAttribute("poster", thumbUrl(hit));
  else keyedMedia(thumbUrl(hit)).then((local) => video.setAttribute("poster", local), () => {});
  return video;
}

function revokeMedia() {
  for (const url of mediaUrls) URL.revokeObjectURL(url);
  mediaUrls = [];
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
  meta.push(similarLink(hit.id));
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
  revokeMedia();
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
  revokeMedia();
  ui.results.replaceChildren();
  ui.pageInfo.textContent = "";
  ui.status.textContent = "";
  ui.prev.disabled = true;
  ui.next.disabled = true;
}

// A link that searches for items like this one (its stored vector); a plain link too, so a
// middle click opens that search in a new tab.
function similarLink(id) {
  const link = el("a", {
    class: "similar", "data-testid": "hit-similar", href: searchUrl({ like: id }),
    title: "search for items like this one",
  }, "similar");
  link.addEventListener("click", (event) => {
    if (event.button !== 0 || event.ctrlKey || event.metaKey || event.shiftKey) return;
    event.preventDefault();
    const options = readOptions();
    if (!options) return;
    current = { similar: id, ...options };
    ui.query.value = "";
    showQueryImage(null);
    search(0);
  });
  return link;
}

// The fields only given ones go out as: a server without them refuses what it does not know.
function relevanceFields() {
  const fields = {};
  if (current.minScore !== null && current.minScore !== undefined) fields.min_score = current.minScore;
  if (current.sort) fields.sort = current.sort;
  return fields;
}

function request(name, at) {
  const path = `/v1/collections/${encodeURIComponent(name)}/search`;
  const signal = inFlight.signal;
  if (current.file) {
    const form = new FormData();
    form.append("image", current.file);
    form.append("k", String(PAGE_SIZE));
    form.append("offset", String(at));
    if (current.filters) form.append("filters", JSON.stringify(current.filters));
    for (const [field, value] of Object.entries(relevanceFields())) form.append(field, String(value));
    return api(`${path}/upload`, { method: "POST", body: form, signal });
  }
  const query = current.similar !== undefined ? { similar_to: current.similar } : { text: current.text };
  const body = { ...query, k: PAGE_SIZE, offset: at, ...relevanceFields() };
  if (current.filters) body.filters = current.filters;
  return api(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
    signal,
  });
}

// ---- the URL: ?c=collection&q=text (or like=item id)&f=filters&m=min score&s=sort&p=page -----

function stateFromUrl() {
  const params = new URLSearchParams(window.location.search);
  const page = Number.parseInt(params.get("p") ?? "1", 10);
  const like = /^\d{1,15}$/.test(params.get("like") ?? "") ? Number(params.get("like")) : null;
  return {
    collection: params.get("c") ?? "",
    text: params.get("q") ?? "",
    like,
    filters: params.get("f") ?? "",
    minScore: params.get("m") ?? "",
    sort: params.get("s") ?? "",
    page: Number.isSafeInteger(page) && page >= 1 ? page : 1,
  };
}

// The address of a search: ``query`` {text} or {like}, the rest as the controls show now.
function searchUrl(query, at = 0) {
  const params = new URLSearchParams();
  if (ui.collection.value) params.set("c", ui.collection.value);
  if (query.text) params.set("q", query.text);
  if (query.like !== undefined) params.set("like", String(query.like));
  const filters = ui.filters.value.trim();
  if (filters) params.set("f", filters);
  const minScore = ui.minScore.value.trim();
  if (minScore) params.set("m", minScore);
  if (ui.sort.value) params.set("s", ui.sort.value);
  const linked = query.text || query.like !== undefined;
  if (linked && at > 0) params.set("p", String(Math.floor(at / PAGE_SIZE) + 1));
  return `${window.location.pathname}${params.size ? `?${params}` : ""}`;
}

// An image query cannot go in a URL: its address keeps the collection and the controls only.
function saveUrl(at, how) {
  if (how === "none") return;
  const query = current?.similar !== undefined ? { like: current.similar } : { text: current?.text };
  const url = searchUrl(query, at);
  if (url === `${window.location.pathname}${window.location.search}`) return;
  if (how === "push") history.pushState(null, "", url);
  else history.replaceState(null, "", url);
}

// The filter box read now, or null after showing why it does not read.
function readFilters() {
  try {
    return { ok: true, filters: parseWhere(ui.filters.value) };
  } catch (error) {
    if (!(error instanceof WhereError)) throw error;
    showError(`Filter: ${error.message}`);
    return { ok: false, filters: null };
  }
}

// The min score and order controls read now, or null after showing why they do not read.
function readRelevance() {
  const raw = ui.minScore.value.trim();
  const minScore = raw === "" ? null : Number(raw);
  if (minScore !== null && !(Number.isFinite(minScore) && minScore >= -1 && minScore <= 1)) {
    showError("Min score: a number from -1 to 1 (empty: any score).");
    return null;
  }
  const sort = ui.sort.value || null;
  if (sort && minScore === null) {
    showError("Sorting needs a min score: the hits scoring at least that are what gets sorted.");
    return null;
  }
  return { minScore, sort };
}

// Every control beside the query (filters, min score, order), or null after showing why not.
function readOptions() {
  const { ok, filters } = readFilters();
  if (!ok) return null;
  const relevance = readRelevance();
  return relevance && { filters, ...relevance };
}

async function search(at, how = "push") {
  const name = ui.collection.value;
  if (!current) return;
  ui.similar.hidden = current.similar === undefined;
  ui.similar.textContent = current.similar === undefined ? "" : `items like item ${current.similar}`;
  if (!name) {
    showError("Choose a collection to search.");
    return;
  }
  saveUrl(at, how);
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
  const options = readOptions();
  if (!options) return;
  current = { text, ...options };
  showQueryImage(null);
  search(0);
});

ui.upload.addEventListener("change", () => {
  const file = ui.upload.files[0];
  if (!file) return;
  const options = readOptions();
  if (!options) return;
  current = { file, ...options };
  // Cleared, so choosing the same file again searches again; the File stays in `current`.
  ui.upload.value = "";
  ui.query.value = "";
  showQueryImage(file);
  search(0);
});

ui.collection.addEventListener("change", () => {
  if (current) search(0);
  else saveUrl(0, "replace");
});
// A new min score or order applies to the query on screen, from its first page.
for (const control of [ui.minScore, ui.sort]) {
  control.addEventListener("change", () => {
    if (!current) {
      saveUrl(0, "replace");
      return;
    }
    const relevance = readRelevance();
    if (!relevance) return;
    current = { ...current, ...relevance };
    search(0);
  });
}
ui.prev.addEventListener("click", () => search(Math.max(0, offset - PAGE_SIZE)));
ui.next.addEventListener("click", () => {
  if (nextOffset !== null) search(nextOffset);
});

// A new key may open what the old one could not: list the collections again, then redo the
// search on screen.
ui.apiKey.value = apiKey();
ui.apiKey.addEventListener("change", async () => {
  const key = ui.apiKey.value.trim();
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
  if (await loadCollections()) {
    if (current) search(offset, "none");
    else applyUrl();
  }
});

// Put the URL's search on screen and run it (on load, and on the back and forward buttons).
function applyUrl() {
  const state = stateFromUrl();
  const listed = [...ui.collection.options].some(
    (option) => option.value === state.collection && !option.disabled);
  if (listed) ui.collection.value = state.collection;
  ui.query.value = state.text;
  ui.filters.value = state.filters;
  ui.minScore.value = state.minScore;
  showSort(state.sort);
  showQueryImage(null);
  if (!state.text && state.like === null) {
    current = null;
    ui.similar.hidden = true;
    clearResults();
    return;
  }
  if (state.collection && !listed) {
    showError(`No collection '${state.collection}' is served here.`);
    return;
  }
  const options = readOptions();
  if (!options) return;
  const query = state.like !== null ? { similar: state.like } : { text: state.text };
  current = { ...query, ...options };
  search((state.page - 1) * PAGE_SIZE, "none");
}

// The order a URL names; one the menu lacks (a hand-written ?s=-folder) joins it.
function showSort(sort) {
  const valid = /^-?[A-Za-z0-9_]{1,64}$/.test(sort);
  if (valid && ![...ui.sort.options].some((option) => option.value === sort)) {
    const field = sort.replace(/^-/, "");
    const label = `by ${field}, ${sort.startsWith("-") ? "descending" : "ascending"}`;
    ui.sort.append(el("option", { value: sort }, label));
  }
  ui.sort.value = valid ? sort : "";
}

window.addEventListener("popstate", applyUrl);

loadCollections().then((loaded) => {
  if (loaded) applyUrl();
});
