// pathvl view: slide list, deep-zoom viewer, text-query heatmap, magnification tree, report.
// URL parameters honoured on load: ?slide=ID&q=TEXT&mag=M&opacity=A&root=INDEX (the page keeps them up to date).
// Coordinates from the API are level-0 pixels; OpenSeadragon's viewport has the Deep Zoom image's width = 1.
"use strict";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const state = { slide: null, meta: null, overlay: null, overlayToken: 0, highlight: null, root: null };
let viewer = null;

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

async function api(path, opts) {
  const r = await fetch(path, opts);
  const json = (r.headers.get("content-type") || "").includes("json");
  const body = json ? await r.json() : await r.text();
  if (!r.ok) throw new Error((json && body.detail) ? (typeof body.detail === "string" ? body.detail
    : JSON.stringify(body.detail)) : `${r.status} ${r.statusText}`);
  return body;
}

function status(msg, error) {
  const s = $("status");
  s.textContent = msg || "";
  s.classList.toggle("error", !!error);
}

const slidePath = (id) => "api/slides/" + encodeURIComponent(id);
const slideUrl = (id, tail) => slidePath(id) + "/" + tail;

function vpRect(x, y, w, h) {
  const g = state.meta.dzi;
  return new OpenSeadragon.Rect((x - g.offset_x) / g.width, (y - g.offset_y) / g.width, w / g.width, h / g.width);
}

function updateUrl() {
  const p = new URLSearchParams();
  if (state.slide) p.set("slide", state.slide);
  const q = $("q").value.trim();
  if (q) p.set("q", q);
  if ($("mag").value) p.set("mag", $("mag").value);
  if ($("opacity").value !== "0.5") p.set("opacity", $("opacity").value);
  if (state.root) p.set("root", String(state.root.index));
  history.replaceState(null, "", "?" + p.toString());
}

function goTo(p) {
  if (!state.meta || !state.meta.dzi) return;
  viewer.viewport.fitBounds(vpRect(p.x - p.size, p.y - p.size, 3 * p.size, 3 * p.size));
  if (state.highlight) viewer.removeOverlay(state.highlight);
  state.highlight = el("div", { class: "hl" });
  viewer.addOverlay({ element: state.highlight, location: vpRect(p.x, p.y, p.size, p.size) });
}

function patchLine(p) {
  const parts = [el("span", { class: "meta" }, `${p.magnification}x at (${p.x}, ${p.y})`)];
  if (p.caption !== undefined) parts.push(el("div", {}, p.caption || "(no caption)"));
  return parts;
}

// ------------------------------------------------------------------------------------------- slides
async function loadSlides() {
  const slides = await api("api/slides");
  const list = $("slide-list");
  list.replaceChildren();
  for (const s of slides) {
    const img = el("img", { alt: "", loading: "lazy" });
    if (s.slide_available) img.src = slideUrl(s.id, "thumbnail.png?max_px=128");
    const sub = `${s.width} x ${s.height} px, ${s.patches} patches` + (s.has_tree ? ", tree" : "");
    list.append(el("li", { "data-id": s.id, onclick: () => openSlide(s.id).catch((e) => status(e.message, true)) },
      img, el("div", {}, el("div", { class: "sid" }, s.id), el("div", { class: "sub" }, sub))));
  }
  return slides;
}

function clearSlideState() {
  state.overlay = null;
  state.overlayToken++;
  state.highlight = null;
  state.root = null;
  $("topk").replaceChildren();
  $("scale").hidden = true;
  $("tree").replaceChildren();
  $("roots").replaceChildren();
  $("report").textContent = "";
  delete document.body.dataset.overlay;
}

async function openSlide(id, query) {
  const meta = await api(slidePath(id));
  clearSlideState();
  state.slide = id;
  state.meta = meta;
  for (const li of $("slide-list").children) li.classList.toggle("active", li.dataset.id === id);
  const mag = $("mag"), want = mag.value || params.get("mag") || "";
  mag.replaceChildren(el("option", { value: "" }, "all"));
  for (const m of meta.magnifications) mag.append(el("option", { value: String(m) }, `${m}x`));
  mag.value = meta.magnifications.map(String).includes(want) ? want : "";
  if (meta.slide_available) {
    await new Promise((resolve) => {
      viewer.addOnceHandler("open", resolve);
      viewer.addOnceHandler("open-failed", (e) => { status(`cannot open ${id}: ${e.message}`, true); resolve(); });
      viewer.open(slideUrl(id, "slide.dzi"));
    });
  } else {
    viewer.close();
    status(`slide ${id}: its slide file is missing; captions and the tree still work`, true);
  }
  $("tree-box").hidden = !meta.has_tree;
  if (meta.has_tree) {
    loadRoots(meta).then((roots) => {
      const want = roots && roots.find((r) => String(r.index) === params.get("root"));
      if (want && params.get("slide") === id) return openRoot(want);
    }).catch((e) => status(e.message, true));
  }
  if (query) $("q").value = query;
  updateUrl();
  if ($("q").value.trim()) await runQuery();
}

// ------------------------------------------------------------------------------------------- query
async function runQuery() {
  const q = $("q").value.trim();
  if (!q || !state.slide) return;
  const p = new URLSearchParams({ q, k: "10" });
  if ($("mag").value) p.set("mag", $("mag").value);
  updateUrl();
  status("scoring patches...");
  const slide = state.slide;
  const res = await api(slideUrl(slide, "query?" + p.toString()));
  if (state.slide !== slide) return;
  showOverlay(res);
  showTopk(res);
  $("vmin").textContent = res.vmin.toFixed(3);
  $("vmax").textContent = res.vmax.toFixed(3);
  $("scale").hidden = false;
  status(`${res.scored} patches scored in ${res.seconds.toFixed(2)} s` + (res.cached ? " (cached)" : ""));
}

function showOverlay(res) {
  const token = ++state.overlayToken;
  if (state.overlay) { viewer.world.removeItem(state.overlay); state.overlay = null; }
  if (!state.meta.dzi) return;
  const g = state.meta.dzi;
  viewer.addSimpleImage({
    url: res.overlay.url, x: -g.offset_x / g.width, y: -g.offset_y / g.width, width: res.slide_size[0] / g.width,
    opacity: Number($("opacity").value),
    success: (e) => {
      if (token !== state.overlayToken) { viewer.world.removeItem(e.item); return; }
      state.overlay = e.item;
      e.item.addOnceHandler("fully-loaded-change", () => { document.body.dataset.overlay = "ready"; });
      if (e.item.getFullyLoaded && e.item.getFullyLoaded()) document.body.dataset.overlay = "ready";
    },
    error: (e) => status(`overlay failed: ${e.message || e}`, true),
  });
}

function showTopk(res) {
  const list = $("topk");
  list.replaceChildren();
  for (const p of res.topk) {
    list.append(el("li", { onclick: () => goTo(p), title: "show this patch" },
      el("span", { class: "score" }, p.score.toFixed(3)), " ", ...patchLine(p)));
  }
}

// ------------------------------------------------------------------------------------------- tree
async function loadRoots(meta) {
  const sel = $("captioner");
  sel.replaceChildren(...meta.captioners.map((c) => el("option", { value: c }, c)));
  $("captioner-label").hidden = meta.captioners.length < 2;
  const res = await api(slideUrl(meta.id, "tree"));
  if (state.slide !== meta.id) return;
  const box = $("roots");
  box.replaceChildren();
  for (const r of res.roots) {
    box.append(el("button", { type: "button", class: "plain", "data-index": r.index,
      title: `${r.magnification}x parent at (${r.x}, ${r.y})`,
      onclick: () => openRoot(r).catch((e) => status(e.message, true)) }, `#${r.index}`));
  }
  return res.roots;
}

async function openRoot(r) {
  state.root = r;
  updateUrl();
  for (const b of $("roots").children) b.classList.toggle("active", Number(b.dataset.index) === r.index);
  goTo(r);
  const cap = $("captioner").value;
  const res = await api(slideUrl(state.slide, `tree/${r.index}` + (cap ? "?captioner=" + encodeURIComponent(cap) : "")));
  const groups = new Map();
  for (const p of res.patches) {
    if (!groups.has(p.magnification)) groups.set(p.magnification, []);
    groups.get(p.magnification).push(p);
  }
  const tree = $("tree");
  tree.replaceChildren(el("div", { class: "meta" }, `${res.patches.length} patches under #${r.index}`));
  for (const [m, ps] of groups) {
    const cards = el("div", { class: "cards" });
    for (const p of ps) {
      const img = el("img", { alt: "", loading: "lazy" });
      if (state.meta.slide_available) img.src = slideUrl(state.slide, `patches/${p.index}.jpeg`);
      cards.append(el("div", { class: "card", onclick: () => goTo(p) }, img, el("div", {}, p.caption || "")));
    }
    tree.append(el("div", { class: "mag-group" }, el("h3", {}, `${m}x (${ps.length})`), cards));
  }
}

// ------------------------------------------------------------------------------------------- report
async function generate() {
  if (!state.slide) return;
  $("report").textContent = "generating...";
  const res = await api(slideUrl(state.slide, "generate"), { method: "POST" });
  $("report").textContent = res.text !== null ? res.text : res.reason;
}

// ------------------------------------------------------------------------------------------- start
async function init() {
  viewer = OpenSeadragon({
    id: "viewer", prefixUrl: "static/openseadragon/images/", showNavigator: true, navigatorPosition: "BOTTOM_RIGHT",
    maxZoomPixelRatio: 2, animationTime: 0.4, crossOriginPolicy: false, immediateRender: true,
  });
  if (params.get("opacity") !== null) $("opacity").value = params.get("opacity");
  $("query-form").addEventListener("submit", (e) => { e.preventDefault(); runQuery().catch((x) => status(x.message, true)); });
  $("mag").addEventListener("change", () => { if ($("q").value.trim()) runQuery().catch((x) => status(x.message, true)); });
  $("opacity").addEventListener("input", () => { if (state.overlay) state.overlay.setOpacity(Number($("opacity").value)); updateUrl(); });
  $("captioner").addEventListener("change", () => { if (state.root) openRoot(state.root).catch((x) => status(x.message, true)); });
  $("generate").addEventListener("click", () => generate().catch((x) => { $("report").textContent = x.message; }));
  const info = await api("api/info");
  $("dataset").textContent = `${info.dataset} (${info.slides} slides)`;
  $("model").textContent = info.scorer ? `scorer: ${info.scorer.name}, features/${info.scorer.features}`
    : "no checkpoint: browsing only";
  $("q").disabled = !info.scorer;
  $("generate").disabled = !info.scorer;
  const slides = await loadSlides();
  const want = params.get("slide");
  const first = slides.find((s) => s.id === want) || slides[0];
  if (want && first && first.id !== want) status(`no slide ${want} in this dataset`, true);
  if (first) await openSlide(first.id, first.id === want ? params.get("q") : null);
}

init().catch((e) => status(e.message, true));
