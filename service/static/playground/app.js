// The playground's only script: loaded from this origin (the CSP forbids inline scripts
// and eval), no build step, no dependencies. It calls the same API any client does:
// GET /v1/models, POST /classify and POST /similarity, with the visitor's key if given.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "clip-playground-key";
const images = []; // {name, dataUrl}: a data URI is what the API's `images` accept as is

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c); // strings become text nodes, never markup
  return node;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

class ApiError extends Error {}

async function api(method, path, body) {
  const headers = {};
  const key = $("api-key").value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = null;
  try { data = await r.json(); } catch (_) { /* not JSON: described by the status */ }
  if (!r.ok) {
    const e = (data && data.error) || { type: "http_error", message: r.statusText };
    const err = new ApiError(`${e.type}: ${e.message}`);
    err.status = r.status;
    throw err;
  }
  return data;
}

async function loadModels() {
  const select = $("model");
  try {
    const list = await api("GET", "/v1/models");
    $("key-row").classList.remove("needed");
    select.replaceChildren(...list.data.filter((m) => m.status === "ready").map(
      (m) => el("option", { value: m.name }, `${m.name} (${m.dimension}-d)`)));
    setStatus(select.options.length ? "Ready." : "No model is ready yet.");
  } catch (e) {
    select.replaceChildren();
    if (e.status === 401) {
      $("key-row").classList.add("needed");
      setStatus("This server needs an API key: enter it above.", true);
      $("api-key").focus();
    } else {
      setStatus(`Could not list the models: ${e.message}`, true);
    }
  }
}

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function addFiles(files) {
  for (const f of files) {
    if (!f.type.startsWith("image/")) continue;
    images.push({ name: f.name, dataUrl: await readAsDataUrl(f) });
  }
  renderThumbs();
}

function renderThumbs() {
  $("thumbs").replaceChildren(...images.map(
    (im) => el("li", {}, el("img", { src: im.dataUrl, alt: im.name, title: im.name }))));
  setStatus(images.length ? `${images.length} image(s); press Run.` : "");
}

function labels() {
  const seen = new Set();
  return $("labels").value.split("\n").map((s) => s.trim())
    .filter((s) => s && !seen.has(s) && seen.add(s));
}

function renderBars(results) {
  $("bars").replaceChildren(...results.map((res, i) => {
    const top = res.labels[0];
    const rows = res.labels.map((s, j) => {
      const fill = el("div", { class: "fill" });
      fill.style.width = `${(100 * s.probability).toFixed(1)}%`; // CSSOM, allowed by the CSP
      return el("div", { class: j === 0 ? "row top" : "row" },
        el("span", { class: "label", title: s.label }, s.label),
        el("div", { class: "track" }, fill),
        el("span", { class: "value" }, `${(100 * s.probability).toFixed(1)}%`));
    });
    return el("article", { class: "card", "data-image": String(i) },
      el("header", {}, el("img", { src: images[i].dataUrl, alt: "" }),
        el("div", {}, el("div", { class: "name" }, images[i].name),
          el("div", { class: "top-label" }, top.label))),
      ...rows);
  }));
}

function renderHeatmap(texts, cosine) {
  const flat = cosine.flat();
  const lo = Math.min(...flat), hi = Math.max(...flat);
  const head = el("tr", {}, el("th"), ...texts.map((t) => el("th", { title: t }, t)));
  const rows = cosine.map((row, i) => el("tr", {},
    el("th", {}, el("img", { src: images[i].dataUrl, alt: "" }), images[i].name),
    ...row.map((c) => {
      const t = hi > lo ? (c - lo) / (hi - lo) : 1;
      const td = el("td", { class: t > 0.55 ? "hi" : "" }, c.toFixed(3));
      td.style.backgroundColor = `rgba(47, 111, 237, ${(0.08 + 0.92 * t).toFixed(3)})`;
      return td;
    })));
  $("heatmap").replaceChildren(el("table", {}, el("thead", {}, head), el("tbody", {}, ...rows)));
}

async function run() {
  const texts = labels();
  if (!images.length || !texts.length) {
    setStatus("Add at least one image and one label.", true);
    return;
  }
  const model = $("model").value || undefined;
  const sources = images.map((im) => im.dataUrl);
  $("run").disabled = true;
  setStatus("Running…");
  try {
    const [cls, sim] = await Promise.all([
      api("POST", "/classify", { model, images: sources, labels: texts }),
      api("POST", "/similarity", {
        model, queries: { images: sources }, candidates: { texts },
      }),
    ]);
    renderBars(cls.results);
    renderHeatmap(texts, sim.cosine);
    setStatus(`Done: ${cls.model}.`);
  } catch (e) {
    setStatus(e.message, true);
  } finally {
    $("run").disabled = false;
  }
}

function init() {
  $("api-key").value = sessionStorage.getItem(KEY_STORE) || "";
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem(KEY_STORE, $("api-key").value.trim());
    loadModels();
  });
  $("files").addEventListener("change", (e) => addFiles(e.target.files));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    addFiles(e.dataTransfer.files);
  });
  $("run").addEventListener("click", run);
  $("clear").addEventListener("click", () => {
    images.length = 0;
    renderThumbs();
    $("bars").replaceChildren();
    $("heatmap").replaceChildren();
  });
  loadModels();
}

document.addEventListener("DOMContentLoaded", init);
