// cocatk serve: the search page. Vanilla JS, no build step, works offline.
const $ = (sel) => document.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
};
const icon = (name, cls = "icon") => {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", cls);
  const use = document.createElementNS(ns, "use");
  use.setAttribute("href", `#i-${name}`);
  svg.append(use);
  return svg;
};

const DEFAULT_N = "20";
const ui = {
  form: $("#search-form"), q: $("#q"), rerank: $("#rerank"), under: $("#under"), n: $("#n"),
  grid: $("#grid"), status: $("#status"), warnings: $("#warnings"), info: $("#info"),
  error: $("#error"), errorTitle: $("#error-title"), errorHint: $("#error-hint"),
  tokenForm: $("#token-form"), tokenInput: $("#token-input"),
  empty: $("#empty"), emptyTitle: $("#empty-title"), emptyHint: $("#empty-hint"),
  chip: $("#image-chip"), chipImg: $("#image-chip-img"), chipName: $("#image-chip-name"),
  imageClear: $("#image-clear"), imagePick: $("#image-pick"), fileInput: $("#file-input"),
  overlay: $("#drop-overlay"),
  lb: $("#lightbox"), lbImg: $("#lb-img"), lbPath: $("#lb-path"), lbScores: $("#lb-scores"),
  lbPrev: $("#lb-prev"), lbNext: $("#lb-next"), lbClose: $("#lb-close"), lbSimilar: $("#lb-similar"), lbOpen: $("#lb-open"),
};

const state = { hits: [], lbIndex: -1, image: null, imageUrl: null, seq: 0, lastLoaded: null };

// ---------- token ----------
const TOKEN_KEY = "cocatk_token";
function setToken(token) {
  if (token) {
    sessionStorage.setItem(TOKEN_KEY, token);
    document.cookie = `cocatk_token=${encodeURIComponent(token)}; path=/; SameSite=Strict`;
  } else {
    sessionStorage.removeItem(TOKEN_KEY);
    document.cookie = "cocatk_token=; path=/; SameSite=Strict; max-age=0";
  }
}
function tokenFromFragment() {
  const m = /(?:^|[#&])token=([^&]*)/.exec(location.hash);
  if (!m) return;
  setToken(decodeURIComponent(m[1]));
  history.replaceState(history.state, "", location.pathname + location.search); // keep the token out of the address bar
}
const token = () => sessionStorage.getItem(TOKEN_KEY);

class ApiError extends Error {
  constructor(status, error, hint) { super(error); this.status = status; this.hint = hint; }
}
async function api(path, opts = {}) {
  const headers = new Headers(opts.headers || {});
  const t = token();
  if (t) headers.set("Authorization", `Bearer ${t}`);
  let resp;
  try {
    resp = await fetch(path, { ...opts, headers });
  } catch (e) {
    throw new ApiError(0, "Cannot reach the server", "Is `cocatk serve` still running?");
  }
  let body = null;
  const text = await resp.text();
  try { body = text ? JSON.parse(text) : null; } catch { body = null; }
  if (!resp.ok) {
    const err = body && typeof body === "object" ? body : {};
    let msg = err.error || (typeof err.detail === "string" ? err.detail : null) || `${resp.status} ${resp.statusText}`;
    if (!err.error && Array.isArray(err.detail)) msg = err.detail.map((d) => d.msg || JSON.stringify(d)).join("; ");
    throw new ApiError(resp.status, msg, err.hint || "");
  }
  return body;
}

// ---------- URL state ----------
function readUrl() {
  const p = new URLSearchParams(location.search);
  return {
    q: p.get("q") || "",
    rerank: p.get("rerank") !== "0" && p.get("rerank") !== "false",
    under: p.get("under") || "",
    n: p.get("n") || DEFAULT_N,
    similar: p.get("similar") || "",
  };
}
function urlFor(s) {
  const p = new URLSearchParams();
  if (s.similar) p.set("similar", s.similar);
  else if (s.q) p.set("q", s.q);
  if (!s.rerank) p.set("rerank", "0");
  if (s.under) p.set("under", s.under);
  if (s.n && s.n !== DEFAULT_N) p.set("n", s.n);
  const qs = p.toString();
  return location.pathname + (qs ? `?${qs}` : "");
}
function formState(extra = {}) {
  return { q: ui.q.value.trim(), rerank: ui.rerank.checked, under: ui.under.value, n: ui.n.value, similar: "", ...extra };
}
function applyToForm(s) {
  ui.q.value = s.q;
  ui.rerank.checked = s.rerank;
  if (s.under && ![...ui.under.options].some((o) => o.value === s.under)) ui.under.append(el("option", { value: s.under, text: s.under }));
  ui.under.value = s.under;
  if (![...ui.n.options].some((o) => o.value === s.n)) ui.n.append(el("option", { value: s.n, text: s.n }));
  ui.n.value = s.n;
}
function pushUrl(s) {
  const url = urlFor(s);
  if (url !== location.pathname + location.search) history.pushState(s, "", url);
}

// ---------- views ----------
function show(view) {
  ui.error.hidden = view !== "error";
  ui.empty.hidden = view !== "empty";
  ui.grid.hidden = view !== "grid" && view !== "loading";
}
function showEmpty(title, hint) {
  ui.emptyTitle.textContent = title;
  ui.emptyHint.textContent = hint;
  ui.grid.replaceChildren();
  show("empty");
}
function showWelcome() {
  ui.status.replaceChildren();
  ui.warnings.hidden = true;
  showEmpty("Search your photos", "Describe what you are looking for, or drop, paste (Ctrl+V) or pick an image to find similar ones.");
}
function showError(err) {
  ui.grid.replaceChildren();
  ui.status.replaceChildren();
  ui.errorTitle.textContent = err.message || String(err);
  ui.errorHint.textContent = err.hint || "";
  const needsToken = err.status === 401 || err.status === 403;
  ui.tokenForm.hidden = !needsToken;
  if (needsToken && !err.hint) ui.errorHint.textContent = "This server needs an access token: paste the one `cocatk serve` printed.";
  show("error");
  if (needsToken) ui.tokenInput.focus();
}
function showLoading() {
  document.body.classList.add("loading");
  const count = Math.min(Number(ui.n.value) || 20, 20);
  const cards = [];
  for (let i = 0; i < count; i++) {
    cards.push(el("div", { class: "card skeleton", "aria-hidden": "true" },
      el("div", { class: "thumb" }),
      el("div", { class: "card-body" }, el("div", { class: "sk-line" }), el("div", { class: "sk-line short" }))));
  }
  ui.grid.replaceChildren(...cards);
  ui.grid.setAttribute("aria-busy", "true");
  ui.status.replaceChildren(el("span", { text: "Searching…" }));
  show("loading");
}

const fmt = (x, digits) => (x === null || x === undefined || Number.isNaN(Number(x)) ? "–" : Number(x).toFixed(digits));
const basename = (p) => String(p).split(/[\\/]/).pop();
const dirname = (p) => { const s = String(p); const i = Math.max(s.lastIndexOf("/"), s.lastIndexOf("\\")); return i >= 0 ? s.slice(0, i + 1) : ""; };

function scoreBadges(hit) {
  return el("div", { class: "scores" },
    el("span", { class: "score sim", title: "cosine similarity of the image and the query" }, el("span", { class: "k", text: "sim" }), fmt(hit.similarity, 3)),
    el("span", { class: "score loglik", title: "caption log-likelihood of the query given the image (rerank score)" }, el("span", { class: "k", text: "loglik" }), fmt(hit.loglik, 2)));
}

function renderHits(data) {
  state.hits = data.hits || [];
  const cards = state.hits.map((hit, i) => {
    const img = el("img", { src: hit.thumb_url, alt: basename(hit.path), loading: "lazy", decoding: "async", draggable: "false" });
    img.addEventListener("load", () => img.classList.add("loaded"));
    img.addEventListener("error", () => img.classList.add("loaded"));
    return el("figure", { class: "card", "data-id": hit.id, "data-rank": hit.rank },
      el("button", { type: "button", class: "thumb", title: hit.path, "aria-label": `Open ${basename(hit.path)}`, onclick: () => openLightbox(i) },
        img, el("span", { class: "rank", text: `#${hit.rank ?? i + 1}` })),
      el("figcaption", { class: "card-body" },
        el("div", { class: "name", title: hit.path, text: basename(hit.path) }),
        hit.caption ? el("div", { class: "caption", title: "caption (cocatk caption, or the dataset's own)", text: hit.caption }) : null,
        hit.tags && hit.tags.length ? el("div", { class: "tags", title: "zero-shot tags (cocatk tag)" },
          ...hit.tags.slice(0, 6).map((t) => el("span", { class: "tag", text: t }))) : null,
        el("div", { class: "card-row" },
          scoreBadges(hit),
          el("button", { type: "button", class: "card-btn similar", title: "Find images similar to this one", onclick: () => searchSimilar(hit.id) },
            icon("similar"), "Similar"))));
  });
  ui.grid.replaceChildren(...cards);
  ui.grid.removeAttribute("aria-busy");
  if (!cards.length) {
    const s = readUrl();
    showEmpty("No matches", s.under ? `Nothing found under ${s.under}. Try another folder or query.` : "Nothing matched this query. Try other words or another image.");
  } else show("grid");
}

function renderStatus(data) {
  const parts = [];
  const t = data.timings_ms || {};
  const hits = (data.hits || []).length;
  let what = `${hits} result${hits === 1 ? "" : "s"}`;
  if (data.candidates) what += ` of ${data.candidates} candidates`;
  parts.push(el("span", {}, el("b", { text: what })));
  parts.push(el("span", { class: "pill", text: data.reranked ? "reranked by caption likelihood" : "similarity only" }));
  const timing = ["embed", "search", "rerank"].filter((k) => t[k] !== undefined && t[k] !== null).map((k) => `${k} ${Math.round(t[k])} ms`);
  if (t.total !== undefined) timing.push(`total ${Math.round(t.total)} ms`);
  if (timing.length) parts.push(el("span", { class: "timings", text: timing.join(" · ") }));
  const dropped = data.dropped || [];
  if (dropped.length) {
    parts.push(el("span", { class: "dropped", title: dropped.map((d) => `${d.path}: ${d.reason}`).join("\n"), text: `${dropped.length} dropped (missing or unreadable)` }));
  }
  const m = data.model || {};
  const model = m.name || m.model || m.preset || m.arch;
  if (model) parts.push(el("span", { class: "model", text: `model ${model}` }));
  ui.status.replaceChildren(...parts);
  const warnings = data.warnings || [];
  ui.warnings.hidden = !warnings.length;
  ui.warnings.replaceChildren(icon("warn"), el("ul", {}, ...warnings.map((w) => el("li", { text: w }))));
}

// ---------- searching ----------
async function run(fn) {
  const seq = ++state.seq;
  closeLightbox();
  showLoading();
  try {
    const data = await fn();
    if (seq !== state.seq) return;
    renderStatus(data);
    renderHits(data);
  } catch (err) {
    if (seq !== state.seq) return;
    showError(err);
  } finally {
    if (seq === state.seq) document.body.classList.remove("loading");
  }
}

function searchParams(s) {
  const p = new URLSearchParams();
  if (s.q) p.set("q", s.q);
  p.set("n", s.n);
  p.set("rerank", s.rerank ? "true" : "false");
  if (s.under) p.set("under", s.under);
  return p;
}

// Run the search that the state `s` (from the URL or the form) describes, without touching history.
function runState(s) {
  state.lastLoaded = s;
  if (s.similar) {
    const p = new URLSearchParams({ n: s.n });
    if (s.under) p.set("under", s.under);
    return run(() => api(`/api/similar/${encodeURIComponent(s.similar)}?${p}`));
  }
  if (state.image) {
    const fd = new FormData();
    fd.append("file", state.image, state.image.name || "image");
    for (const [k, v] of searchParams(s)) fd.append(k, v);
    return run(() => api("/api/search/image", { method: "POST", body: fd }));
  }
  return run(() => api(`/api/search?${searchParams(s)}`));
}

function submit() {
  const s = formState();
  if (!s.q && !state.image) {
    // Nothing to search for: say how, without a round trip.
    pushUrl(s);
    state.seq++;
    state.lastLoaded = null;
    showWelcome();
    ui.q.focus();
    return;
  }
  if (!state.image) pushUrl(s);
  runState(s);
}
function searchSimilar(id) {
  clearImage(false);
  const s = formState({ similar: String(id), q: "" });
  ui.q.value = "";
  pushUrl(s);
  runState(s);
}

// ---------- query image ----------
function setImage(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    showError(new ApiError(0, `${file.name || "That file"} is not an image`, "Drop or paste a JPEG, PNG, WebP, … photo."));
    return;
  }
  state.image = file;
  if (state.imageUrl) URL.revokeObjectURL(state.imageUrl);
  state.imageUrl = URL.createObjectURL(file);
  ui.chipImg.src = state.imageUrl;
  ui.chipName.textContent = file.name || "pasted image";
  ui.chip.hidden = false;
  ui.q.placeholder = "Add words to the image (optional)";
}
function clearImage(rerun = true) {
  if (!state.image) return;
  state.image = null;
  if (state.imageUrl) URL.revokeObjectURL(state.imageUrl);
  state.imageUrl = null;
  ui.chip.hidden = true;
  ui.chipImg.removeAttribute("src");
  ui.q.placeholder = "Describe a photo… (press /)";
  ui.fileInput.value = "";
  if (rerun) {
    if (ui.q.value.trim()) submit();
    else { history.pushState(null, "", urlFor(formState({ q: "" }))); showWelcome(); }
  }
}
function imageFrom(list) {
  for (const item of list || []) {
    const file = item instanceof File ? item : item.kind === "file" ? item.getAsFile() : null;
    if (file && (!file.type || file.type.startsWith("image/"))) return file;
  }
  return null;
}

// ---------- lightbox ----------
function renderPath(path) {
  ui.lbPath.replaceChildren(el("span", { class: "dir", text: dirname(path) }), el("span", { class: "file", text: basename(path) }));
  ui.lbPath.title = path;
}
function openLightbox(i) {
  if (!state.hits.length) return;
  state.lbIndex = (i + state.hits.length) % state.hits.length;
  const hit = state.hits[state.lbIndex];
  // The thumbnail (already cached) at once, the original when it has loaded: big photos take a while.
  ui.lbImg.src = hit.thumb_url;
  const original = new Image();
  original.onload = () => { if (state.hits[state.lbIndex] === hit) ui.lbImg.src = hit.image_url; };
  original.src = hit.image_url;
  ui.lbImg.alt = basename(hit.path);
  renderPath(hit.path);
  ui.lbScores.textContent = `#${hit.rank ?? state.lbIndex + 1} of ${state.hits.length} · similarity ${fmt(hit.similarity, 3)} · caption log-likelihood ${fmt(hit.loglik, 2)}` + (hit.caption ? ` · “${hit.caption}”` : "");
  ui.lbOpen.href = hit.image_url;
  ui.lbPrev.disabled = ui.lbNext.disabled = state.hits.length < 2;
  if (!ui.lb.open) ui.lb.showModal();
}
function closeLightbox() {
  if (ui.lb.open) ui.lb.close();
}
ui.lbPrev.addEventListener("click", () => openLightbox(state.lbIndex - 1));
ui.lbNext.addEventListener("click", () => openLightbox(state.lbIndex + 1));
ui.lbClose.addEventListener("click", closeLightbox);
ui.lbSimilar.addEventListener("click", () => { const hit = state.hits[state.lbIndex]; if (hit) searchSimilar(hit.id); });
ui.lb.addEventListener("click", (e) => { if (e.target === ui.lb || e.target.classList.contains("lb-stage")) closeLightbox(); });
ui.lb.addEventListener("close", () => { ui.lbImg.removeAttribute("src"); state.lbIndex = -1; });
ui.lb.addEventListener("keydown", (e) => {
  if (e.key === "ArrowLeft") { e.preventDefault(); openLightbox(state.lbIndex - 1); }
  else if (e.key === "ArrowRight") { e.preventDefault(); openLightbox(state.lbIndex + 1); }
  else if (e.key === "Escape") { e.preventDefault(); closeLightbox(); }
});

// ---------- events ----------
ui.form.addEventListener("submit", (e) => { e.preventDefault(); ui.q.blur(); submit(); });
ui.rerank.addEventListener("change", () => {
  const last = state.lastLoaded;
  if (last && last.similar) { const s = { ...formState(), similar: last.similar, q: "" }; pushUrl(s); runState(s); }
  else if (ui.q.value.trim() || state.image) submit();
  else history.replaceState(null, "", urlFor(formState()));
});
for (const sel of [ui.under, ui.n]) {
  sel.addEventListener("change", () => {
    const last = state.lastLoaded;
    if (last && last.similar) { const s = { ...formState(), similar: last.similar, q: "" }; pushUrl(s); runState(s); }
    else if (ui.q.value.trim() || state.image) submit();
  });
}
ui.imagePick.addEventListener("click", (e) => { e.preventDefault(); ui.fileInput.click(); });
ui.fileInput.addEventListener("change", () => { const f = ui.fileInput.files[0]; if (f) { setImage(f); submit(); } });
ui.imageClear.addEventListener("click", (e) => { e.preventDefault(); e.stopPropagation(); clearImage(); ui.q.focus(); });
ui.tokenForm.addEventListener("submit", (e) => {
  e.preventDefault();
  setToken(ui.tokenInput.value.trim());
  ui.tokenInput.value = "";
  loadMeta();
  runState(readUrl().q || readUrl().similar ? readUrl() : formState());
});
ui.q.addEventListener("keydown", (e) => {
  if (e.key === "Escape" && !ui.q.value && state.image) clearImage();
  if (e.key === "Backspace" && !ui.q.value && state.image) clearImage(false);
});

document.addEventListener("keydown", (e) => {
  if (e.key === "/" && !ui.lb.open && !e.ctrlKey && !e.metaKey && !e.altKey) {
    const t = e.target;
    if (t instanceof HTMLInputElement || t instanceof HTMLTextAreaElement || t instanceof HTMLSelectElement || t.isContentEditable) return;
    e.preventDefault();
    ui.q.focus();
    ui.q.select();
  }
});
document.addEventListener("paste", (e) => {
  const file = imageFrom(e.clipboardData && (e.clipboardData.files.length ? e.clipboardData.files : e.clipboardData.items));
  if (!file) return; // ordinary text paste into the search box
  e.preventDefault();
  setImage(file);
  submit();
});

let dragDepth = 0;
const hasFiles = (e) => e.dataTransfer && [...(e.dataTransfer.types || [])].includes("Files");
document.addEventListener("dragenter", (e) => { if (!hasFiles(e)) return; dragDepth++; ui.overlay.hidden = false; });
document.addEventListener("dragleave", () => { dragDepth = Math.max(0, dragDepth - 1); if (!dragDepth) ui.overlay.hidden = true; });
document.addEventListener("dragover", (e) => { if (hasFiles(e)) e.preventDefault(); });
document.addEventListener("drop", (e) => {
  dragDepth = 0;
  ui.overlay.hidden = true;
  if (!e.dataTransfer) return;
  e.preventDefault();
  const file = imageFrom(e.dataTransfer.files.length ? e.dataTransfer.files : e.dataTransfer.items);
  if (file) { setImage(file); submit(); }
});

window.addEventListener("popstate", () => {
  const s = readUrl();
  clearImage(false);
  applyToForm(s);
  if (s.q || s.similar) runState(s);
  else { state.lastLoaded = null; state.seq++; showWelcome(); }
});

// ---------- start ----------
async function loadMeta() {
  try {
    const info = await api("/api/health");
    if (info && typeof info === "object") {
      const m = info.model || {};
      const model = typeof m === "string" ? m : m.name || m.model || m.preset;
      const images = info.images ?? info.count ?? info.ntotal ?? (info.index && (info.index.images ?? info.index.count ?? info.index.ntotal));
      const bits = [];
      if (images !== undefined && images !== null) bits.push(`${Number(images).toLocaleString()} images`);
      if (model) bits.push(model);
      ui.info.textContent = bits.join(" · ");
    }
  } catch { /* the search reports errors */ }
  try {
    const data = await api("/api/folders");
    const list = Array.isArray(data) ? data : (data && (data.folders || data.items)) || [];
    const roots = ((data && data.roots) || []).map((r) => (typeof r === "string" ? r : r.path)).filter(Boolean);
    const current = ui.under.value;
    const options = [el("option", { value: "", text: "All folders" })];
    for (const f of list) {
      const path = typeof f === "string" ? f : f.path || f.folder || f.name;
      if (!path) continue;
      const count = typeof f === "object" ? f.files ?? f.count ?? f.images : undefined;
      const root = roots.find((r) => path !== r && path.startsWith(r.replace(/\/$/, "") + "/"));
      const label = root ? `${basename(root)}/${path.slice(root.replace(/\/$/, "").length + 1)}` : path;
      options.push(el("option", { value: path, title: path, text: count !== undefined ? `${label} (${count})` : label }));
    }
    ui.under.replaceChildren(...options);
    if (current && ![...ui.under.options].some((o) => o.value === current)) ui.under.append(el("option", { value: current, text: current }));
    ui.under.value = current;
  } catch { /* optional */ }
}

tokenFromFragment();
const initial = readUrl();
applyToForm(initial);
history.replaceState(initial, "", location.href);
loadMeta();
if (initial.q || initial.similar) runState(initial);
else showWelcome();
window.cocatkReady = true;
