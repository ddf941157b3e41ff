// kvae mobile demo: the exported ONNX decoder and encoder running in the browser (onnxruntime-web,
// WebAssembly). Served by `python -m kvae.demo RUN`: ./export/ holds the run's export folder,
// ./ort/ onnxruntime-web's dist/ folder. Nothing is computed on the server and nothing comes from a CDN.
//
// A conditional model (manifest "conditional": true) also takes y, the one-hot class label: the
// class picker sets the label every decode and encode of the page uses. A manifest that names a
// prior ("prior": {"file": "prior.json", ...}: the model's learned P(z), or a sampling prior
// fitted to the training codes) makes Sample draw z from that Gaussian mixture instead of N(0, I).
//
// Offline: sw.js (a service worker) keeps the app, onnxruntime-web and the export files the page
// can run (every file the manifest names but .tflite / .ort) in the browser's cache; the page
// asks for model files by content (export/NAME?sha256=HEX), so a new export is a new URL.
// ?threads=N runs onnxruntime-web on N threads where the page is cross-origin isolated.
//
// Test hook: window.kvae = {ready, offline, manifest, classes, label, prior, threads,
// decode(z, label), encode(x, label), sampleZ(seed, count), samplePrior(seed, n), open(file), ort,
// settled(), state}.

const EXPORT = "./export/";
const ORT = "./ort/";
const GRID = 4; // the sample grid is GRID x GRID
const MAX_SLIDERS = 16; // latent dims shown as sliders; the rest keep their values
const Z_RANGE = 3; // sliders and the pad span [-Z_RANGE, Z_RANGE]
const PAD_STEPS = 12; // the latent_dim == 2 pad shows a PAD_STEPS x PAD_STEPS decoded grid
const INTERP_STEPS = 8;
const DIGIT_BOX = 20 / 28; // MNIST digits fill a 20x20 box in 28x28, centred on their mass

const $ = (id) => document.getElementById(id);
const status = (text, isError = false) => {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
};

// ---------------------------------------------------------------- seeded normal numbers
/** mulberry32: a tiny 32-bit PRNG; same seed -> same numbers in every browser. */
function mulberry32(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296; // [0, 1)
  };
}

/** `count` N(0, 1) numbers from `seed` (Box-Muller on mulberry32). */
function sampleNormal(seed, count) {
  const uniform = mulberry32(seed);
  const out = new Float32Array(count);
  for (let i = 0; i < count; i += 2) {
    const u1 = 1 - uniform(); // (0, 1]: log stays finite
    const u2 = uniform();
    const r = Math.sqrt(-2 * Math.log(u1));
    out[i] = r * Math.cos(2 * Math.PI * u2);
    if (i + 1 < count) out[i + 1] = r * Math.sin(2 * Math.PI * u2);
  }
  return out;
}

// ---------------------------------------------------------------- the sampling prior
// N(0, I), or the Gaussian mixture the manifest names (kvae.prior: "prior": {"file", "sha256",
// "components"}; the file holds weights [K], loc and scale [K][latent_dim], and "model_prior":
// true when it is the model's learned P(z)).
const prior = { kind: "standard", components: 0, cumulative: null, loc: null, scale: null, learned: false };
const COMPONENT_STREAM = 0x9e3779b9; // the seed of the component picks is seed ^ this (eps keeps seed's own stream)

/** n latents from `seed`: eps = sampleNormal(seed, n * latent_dim) and z = eps under N(0, I); under
 * the fitted mixture z = loc[k] + scale[k] * eps, k = the component picked with probability
 * weights[k] by a uniform of mulberry32(seed ^ COMPONENT_STREAM), one per latent.
 * Returns {z, eps, components} (components: null under N(0, I)). */
function samplePrior(seed, n) {
  const L = model.latentDim;
  const eps = sampleNormal(seed, n * L);
  if (prior.kind === "standard") return { z: eps, eps, components: null };
  const uniform = mulberry32((seed ^ COMPONENT_STREAM) >>> 0);
  const z = new Float32Array(n * L);
  const components = new Int32Array(n);
  for (let i = 0; i < n; i++) {
    const u = uniform();
    let k = prior.cumulative.findIndex((c) => u < c);
    if (k < 0) k = prior.components - 1; // u within rounding of 1
    components[i] = k;
    for (let d = 0; d < L; d++) z[i * L + d] = prior.loc[k * L + d] + prior.scale[k * L + d] * eps[i * L + d];
  }
  return { z, eps, components };
}

/** Reads and checks the prior the manifest names (learned or fitted); the page keeps N(0, I) without one. */
async function loadPrior(manifest) {
  const entry = manifest.prior;
  if (!entry) return;
  if (typeof entry.file !== "string") throw new Error(`manifest.json's "prior" names no file: export the run again`);
  const data = await (await fetchOk(exportUrl(entry.file))).json();
  const L = model.latentDim;
  const K = Array.isArray(data.weights) ? data.weights.length : 0;
  const rows = (key) => Array.isArray(data[key]) && data[key].length === K && data[key].every((r) => Array.isArray(r) && r.length === L && r.every(Number.isFinite));
  if (!K || !data.weights.every((w) => Number.isFinite(w) && w >= 0) || !rows("loc") || !rows("scale") || !data.scale.flat().every((v) => v > 0)) {
    throw new Error(`${entry.file} is not a prior for latent_dim ${L}: it needs weights [K] >= 0, loc and scale [K][${L}], scale > 0`);
  }
  const total = data.weights.reduce((a, b) => a + b, 0);
  if (!(total > 0)) throw new Error(`${entry.file}: the weights add up to ${total}`);
  let running = 0;
  prior.cumulative = data.weights.map((w) => (running += w / total));
  prior.loc = Float32Array.from(data.loc.flat());
  prior.scale = Float32Array.from(data.scale.flat());
  prior.components = K;
  prior.kind = "mixture";
  prior.learned = data.model_prior === true; // the model's own P(z), learned in training (kvae.prior)
}

// ---------------------------------------------------------------- model
let ort; // the onnxruntime-web module, imported in init()
const model = {
  manifest: null,
  latentDim: 0,
  shape: [0, 0, 0], // [H, W, C]
  encoder: null,
  decoder: null,
  decoderFile: "decoder.onnx",
  names: { x: "x", loc: "loc", scale: "scale", z: "z", xMean: "x_mean" },
  classes: [], // a conditional model's class names (index = class id); [] otherwise
  label: null, // the class id the picker shows (null: an unconditional model)
  condition: { encoder: null, decoder: null }, // the loaded files' condition input name (y), or null
};
const pixelsPerImage = () => model.shape[0] * model.shape[1] * model.shape[2];

// One run at a time per session: runs queue behind each other.
const queues = new Map();
function runQueued(session, feeds) {
  const previous = queues.get(session) || Promise.resolve();
  const next = previous.catch(() => {}).then(() => session.run(feeds));
  queues.set(session, next);
  return next;
}

// Measured times (ms) per call, by kind ("decode" / "encode") and batch size, for the nav bar:
// "decode 0.4 ms/call (batch 8: 2.1 ms, 16: 3.9 ms) · encode 0.5 ms/call", medians of the last 50.
const timings = new Map(); // kind -> Map(batch -> [ms])
function record(kind, batch, ms) {
  if (!timings.has(kind)) timings.set(kind, new Map());
  const byBatch = timings.get(kind);
  const list = byBatch.get(batch) || [];
  list.push(ms);
  if (list.length > 50) list.shift();
  byBatch.set(batch, list);
  const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
  const parts = [];
  const details = [];
  for (const [name, batches] of timings) {
    const sizes = [...batches.keys()].sort((a, b) => a - b);
    const ms = (n) => `${median(batches.get(n)).toFixed(1)} ms`;
    const others = sizes.filter((n) => n !== 1).map((n, i) => `${i ? "" : "batch "}${n}: ${ms(n)}`);
    if (batches.has(1)) parts.push(`${name} ${ms(1)}/call` + (others.length ? ` (${others.join(", ")})` : ""));
    else parts.push(`${name} per call: ${others.join(", ")}`);
    for (const n of sizes) details.push(`${name} batch ${n}: median ${median(batches.get(n)).toFixed(2)} ms over ${batches.get(n).length} calls`);
  }
  $("perf").textContent = parts.join(" · ");
  $("perf").title = details.join("\n");
  $("perf").dataset.lastMs = ms.toFixed(3);
}

/** A conditional half's second feed: y = one_hot(label), float32 [n, num_classes]; {} for an
 * unconditional model. */
function conditionFeed(half, n, label) {
  const name = model.condition[half];
  if (!name) return {};
  const K = model.classes.length;
  if (!Number.isInteger(label) || label < 0 || label >= K) throw new Error(`${half}: label must be a class id 0..${K - 1}, got ${label}`);
  const y = new Float32Array(n * K);
  for (let i = 0; i < n; i++) y[i * K + label] = 1;
  return { [name]: new ort.Tensor("float32", y, [n, K]) };
}

/** z: flat Float32Array (n * latent_dim) -> x_mean: flat Float32Array (n * H * W * C).
 * label: the class id of a conditional model (default: the picker's); unused otherwise. */
async function decode(z, label = model.label) {
  z = Float32Array.from(z);
  const n = z.length / model.latentDim;
  if (!Number.isInteger(n) || n < 1) throw new Error(`decode: z has ${z.length} numbers, not a multiple of latent_dim ${model.latentDim}`);
  const feeds = { [model.names.z]: new ort.Tensor("float32", z, [n, model.latentDim]), ...conditionFeed("decoder", n, label) };
  const t0 = performance.now();
  const out = await runQueued(model.decoder, feeds);
  record("decode", n, performance.now() - t0);
  return out[model.names.xMean].data;
}

/** x: flat Float32Array (n * H * W * C) in [0, 1] -> {loc, scale} flat (n * latent_dim).
 * label: the class id of a conditional model (default: the picker's); unused otherwise. */
async function encode(x, label = model.label) {
  x = Float32Array.from(x);
  const n = x.length / pixelsPerImage();
  if (!Number.isInteger(n) || n < 1) throw new Error(`encode: x has ${x.length} numbers, not a multiple of H*W*C ${pixelsPerImage()}`);
  const feeds = { [model.names.x]: new ort.Tensor("float32", x, [n, ...model.shape]), ...conditionFeed("encoder", n, label) };
  const t0 = performance.now();
  const out = await runQueued(model.encoder, feeds);
  record("encode", n, performance.now() - t0);
  return { loc: out[model.names.loc].data, scale: out[model.names.scale].data };
}

/** Live views (sliders, pen): while a call runs, only the newest request waits behind it.
 * The promise returned resolves once the newest request has been drawn. */
const liveViews = []; // for settled(): each returns its running promise or null
function latestOnly(work) {
  let pending = null;
  let pumping = null;
  liveViews.push(() => pumping);
  const pump = async () => {
    while (pending) {
      const args = pending;
      pending = null;
      try {
        await work(...args);
      } catch (e) {
        fail(e);
      }
    }
    pumping = null;
  };
  return (...args) => {
    pending = args;
    if (!pumping) pumping = pump();
    return pumping;
  };
}

async function fetchOk(url) {
  const response = await fetch(url, { cache: "no-cache" });
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status} (is it in the run's export folder?)`);
  return response;
}

/** Where the page reads an export file: by content (./export/NAME?sha256=HEX) when the manifest
 * gives its sha256, so a new export is a new URL for the browser's caches (sw.js). */
function exportUrl(name) {
  const m = model.manifest || {};
  const named = Object.values(m).find((v) => v && typeof v === "object" && v.file === name);
  const sha = m.files?.[name]?.sha256 || named?.sha256;
  return sha ? `${EXPORT}${name}?sha256=${sha}` : EXPORT + name;
}

/** The export files kept for offline use: every file the manifest names (its model files and
 * header entries such as "prior": {"file": ...}), but .tflite and .ort, which browsers cannot run. */
function offlineFiles(manifest) {
  const files = manifest.files || {};
  const names = Object.keys(files).filter((f) => !["tflite", "ort"].includes(files[f].format));
  for (const value of Object.values(manifest)) {
    if (value && typeof value === "object" && typeof value.file === "string") names.push(value.file);
  }
  return [...new Set(names)];
}

/** The condition input of `file` on a conditional model: the input the manifest lists next to the
 * data input (x or z), "y" if the manifest lists none; null for an unconditional model. */
function conditionName(file, inputName) {
  if (!model.classes.length) return null;
  const listed = (model.manifest.files?.[file]?.inputs || []).map((i) => i.name).filter((name) => name !== inputName);
  return listed[0] || "y";
}

async function loadSession(file, inputName, outputNames) {
  const bytes = new Uint8Array(await (await fetchOk(exportUrl(file))).arrayBuffer());
  const session = await ort.InferenceSession.create(bytes, {
    executionProviders: ["wasm"],
    graphOptimizationLevel: "all",
    logSeverityLevel: 3, // errors only
  });
  const ins = session.inputNames.join(", ");
  const outs = session.outputNames.join(", ");
  const condition = conditionName(file, inputName);
  const inputNames = condition ? [inputName, condition] : [inputName];
  if (inputNames.some((i) => !session.inputNames.includes(i)) || outputNames.some((o) => !session.outputNames.includes(o))) {
    throw new Error(`${file} has inputs [${ins}] and outputs [${outs}]; expected ${inputNames.join(", ")} -> ${outputNames.join(", ")}`);
  }
  if (session.inputNames.some((i) => !inputNames.includes(i))) {
    throw new Error(`${file} takes [${ins}] but manifest.json describes [${inputNames.join(", ")}]: export the run again (python export/to_onnx.py RUN)`);
  }
  session.condition = condition;
  return session;
}

// ---------------------------------------------------------------- drawing images
/** Paints n images (flat x_mean, values in [0, 1]) into `canvas` as a rows x cols grid. */
function paintGrid(canvas, x, n, cols) {
  const [H, W, C] = model.shape;
  const rows = Math.ceil(n / cols);
  if (canvas.width !== cols * W || canvas.height !== rows * H) {
    canvas.width = cols * W;
    canvas.height = rows * H;
  }
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(cols * W, rows * H);
  const rgba = image.data;
  for (let k = 0; k < n; k++) {
    const r0 = Math.floor(k / cols) * H;
    const c0 = (k % cols) * W;
    for (let i = 0; i < H; i++) {
      for (let j = 0; j < W; j++) {
        const src = ((k * H + i) * W + j) * C;
        const dst = ((r0 + i) * cols * W + c0 + j) * 4;
        for (let ch = 0; ch < 3; ch++) {
          const v = x[src + (C === 1 ? 0 : ch)];
          rgba[dst + ch] = Math.round(255 * Math.min(1, Math.max(0, v)));
        }
        rgba[dst + 3] = 255;
      }
    }
  }
  ctx.putImageData(image, 0, 0);
}

const paintOne = (canvas, x) => paintGrid(canvas, x, 1, 1);

// ---------------------------------------------------------------- the page's state
// `label`: the class id each view was decoded (and the drawing encoded) with; null when unconditional.
const state = {
  sample: null, // {seed, n, z, x, label, components (the prior's picks; null under N(0, I))}
  explore: { z: null, x: null, label: null, version: 0 },
  draw: { x: null, loc: null, scale: null, recon: null, label: null, version: 0 },
  slots: { a: null, b: null },
  interp: null, // {z, x, label}
};

// ---------------------------------------------------------------- Sample
async function renderSample(seed) {
  const n = GRID * GRID;
  const { z, components } = samplePrior(seed, n);
  const label = model.label;
  const x = await decode(z, label);
  paintGrid($("grid"), x, n, GRID);
  state.sample = { seed, n, z, x, label, components };
  $("seed").value = String(seed);
}

function readSeed() {
  const seed = Number.parseInt($("seed").value, 10);
  return Number.isFinite(seed) && seed >= 0 ? seed >>> 0 : 0;
}

function pickSample(event) {
  if (!state.sample) return;
  const rect = $("grid").getBoundingClientRect();
  const col = Math.min(GRID - 1, Math.floor(((event.clientX - rect.left) / rect.width) * GRID));
  const row = Math.min(GRID - 1, Math.floor(((event.clientY - rect.top) / rect.height) * GRID));
  const k = row * GRID + col;
  const L = model.latentDim;
  setExplore(state.sample.z.slice(k * L, (k + 1) * L));
  $("explore").scrollIntoView({ behavior: "smooth", block: "start" });
}

// ---------------------------------------------------------------- Explore
const renderExplore = latestOnly(async (z) => {
  const label = model.label;
  const x = await decode(z, label);
  paintOne($("explore-out"), x);
  state.explore = { z, x, label, version: state.explore.version + 1 };
  movePadDot(z);
});

// The z Explore shows; sliders change one dimension each, so values beyond their range survive.
let exploreCurrent = null;

function setExplore(z) {
  exploreCurrent = Float32Array.from(z);
  document.querySelectorAll("#sliders input").forEach((slider) => {
    const d = Number(slider.dataset.dim);
    slider.value = String(exploreCurrent[d]);
    slider.nextElementSibling.textContent = exploreCurrent[d].toFixed(2);
  });
  return renderExplore(Float32Array.from(exploreCurrent));
}

const exploreZ = () => Float32Array.from(exploreCurrent || new Float32Array(model.latentDim));

function buildSliders() {
  const box = $("sliders");
  box.replaceChildren();
  const shown = Math.min(model.latentDim, MAX_SLIDERS);
  for (let d = 0; d < shown; d++) {
    const label = document.createElement("label");
    const name = document.createElement("span");
    name.textContent = `z${d + 1}`;
    const slider = document.createElement("input");
    Object.assign(slider, { type: "range", min: -Z_RANGE, max: Z_RANGE, step: 0.01, value: 0 });
    slider.dataset.dim = String(d);
    slider.setAttribute("aria-label", `latent dimension ${d + 1}`);
    const value = document.createElement("output");
    value.textContent = "0.00";
    slider.addEventListener("input", () => {
      const z = exploreZ();
      z[d] = Number(slider.value);
      value.textContent = z[d].toFixed(2);
      exploreCurrent = z;
      renderExplore(Float32Array.from(z));
    });
    label.append(name, slider, value);
    box.append(label);
  }
  if (model.latentDim > shown) {
    $("explore-hint").textContent += ` Showing ${shown} of ${model.latentDim} dimensions; the others keep their values.`;
  }
}

// latent_dim == 2: a touch pad over the decoded manifold.
async function paintPad() {
  const n = PAD_STEPS * PAD_STEPS;
  const z = new Float32Array(2 * n);
  for (let i = 0; i < PAD_STEPS; i++) {
    for (let j = 0; j < PAD_STEPS; j++) {
      const k = i * PAD_STEPS + j;
      z[2 * k] = -Z_RANGE + (2 * Z_RANGE * (j + 0.5)) / PAD_STEPS; // x axis: z1
      z[2 * k + 1] = Z_RANGE - (2 * Z_RANGE * (i + 0.5)) / PAD_STEPS; // y axis (up): z2
    }
  }
  paintGrid($("pad-manifold"), await decode(z), n, PAD_STEPS);
}

function setupPad() {
  const pad = $("pad");
  pad.hidden = false;
  $("explore-hint").textContent = `Drag over the map of decoded z (z1 across, z2 up, each in [-${Z_RANGE}, ${Z_RANGE}]), or move a slider.`;
  const fromPointer = (event) => {
    const rect = pad.getBoundingClientRect();
    const u = Math.min(1, Math.max(0, (event.clientX - rect.left) / rect.width));
    const v = Math.min(1, Math.max(0, (event.clientY - rect.top) / rect.height));
    setExplore([-Z_RANGE + 2 * Z_RANGE * u, Z_RANGE - 2 * Z_RANGE * v]);
  };
  pad.addEventListener("pointerdown", (event) => {
    event.preventDefault();
    pad.setPointerCapture(event.pointerId);
    fromPointer(event);
  });
  pad.addEventListener("pointermove", (event) => {
    if (pad.hasPointerCapture(event.pointerId)) fromPointer(event);
  });
}

function movePadDot(z) {
  if ($("pad").hidden) return;
  const u = (z[0] + Z_RANGE) / (2 * Z_RANGE);
  const v = (Z_RANGE - z[1]) / (2 * Z_RANGE);
  $("pad-dot").style.left = `${100 * Math.min(1, Math.max(0, u))}%`;
  $("pad-dot").style.top = `${100 * Math.min(1, Math.max(0, v))}%`;
}

// ---------------------------------------------------------------- Draw
const pen = { drawing: false, last: null, ink: false };
// Read back after every stroke: keep the pixels on the CPU (the first getContext call decides).
const penContext = () => $("pen").getContext("2d", { willReadFrequently: true });

function clearPen() {
  const canvas = $("pen");
  const ctx = penContext();
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  pen.ink = false;
  for (const id of ["draw-input", "draw-recon"]) {
    const c = $(id);
    c.getContext("2d").clearRect(0, 0, c.width, c.height);
  }
  $("posterior").querySelector("tbody").replaceChildren();
  state.draw = { x: null, loc: null, scale: null, recon: null, label: null, version: state.draw.version + 1 };
}

function penPoint(event) {
  const canvas = $("pen");
  const rect = canvas.getBoundingClientRect();
  return [((event.clientX - rect.left) / rect.width) * canvas.width, ((event.clientY - rect.top) / rect.height) * canvas.height];
}

function strokeTo(point) {
  const ctx = penContext();
  ctx.strokeStyle = "#fff";
  ctx.lineWidth = $("pen").width / 14; // ~2 px once the digit is scaled to 20 px
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  ctx.beginPath();
  ctx.moveTo(...(pen.last || point));
  ctx.lineTo(...point);
  ctx.stroke();
  pen.last = point;
  pen.ink = true;
}

/** The pen canvas -> the model's input: MNIST-style (digit scaled into a 20/28 box, centred on
 * its centre of mass), area-averaged down to H x W, ink = 1. Returns null when nothing is drawn. */
function penToInput() {
  const [H, W, C] = model.shape;
  const canvas = $("pen");
  const { width: cw, height: ch } = canvas;
  const src = penContext().getImageData(0, 0, cw, ch).data;
  let x0 = cw, y0 = ch, x1 = -1, y1 = -1, mass = 0, mx = 0, my = 0;
  for (let y = 0; y < ch; y++) {
    for (let x = 0; x < cw; x++) {
      const v = src[(y * cw + x) * 4] / 255;
      if (v > 0.05) {
        x0 = Math.min(x0, x); x1 = Math.max(x1, x);
        y0 = Math.min(y0, y); y1 = Math.max(y1, y);
      }
      mass += v; mx += v * x; my += v * y;
    }
  }
  if (x1 < 0) return null;
  const K = 4; // supersampling factor for the area average
  const box = DIGIT_BOX * Math.min(H, W) * K;
  const s = box / Math.max(x1 - x0 + 1, y1 - y0 + 1);
  const work = document.createElement("canvas");
  work.width = W * K;
  work.height = H * K;
  const ctx = work.getContext("2d", { willReadFrequently: true });
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, work.width, work.height);
  ctx.imageSmoothingEnabled = true;
  ctx.imageSmoothingQuality = "high";
  // Place the centre of mass at the image centre.
  const dx = work.width / 2 - (mx / mass - x0) * s;
  const dy = work.height / 2 - (my / mass - y0) * s;
  ctx.drawImage(canvas, x0, y0, x1 - x0 + 1, y1 - y0 + 1, dx, dy, (x1 - x0 + 1) * s, (y1 - y0 + 1) * s);
  const big = ctx.getImageData(0, 0, work.width, work.height).data;
  const x = new Float32Array(H * W * C);
  for (let i = 0; i < H; i++) {
    for (let j = 0; j < W; j++) {
      let sum = 0;
      for (let a = 0; a < K; a++) for (let b = 0; b < K; b++) sum += big[((i * K + a) * work.width + j * K + b) * 4];
      const v = sum / (K * K * 255);
      for (let c = 0; c < C; c++) x[(i * W + j) * C + c] = v;
    }
  }
  return x;
}

const renderDraw = latestOnly(async () => {
  const x = penToInput();
  if (!x) return;
  const label = model.label; // the drawing is encoded and reconstructed with the picked class
  const { loc, scale } = await encode(x, label);
  const recon = await decode(loc, label);
  paintOne($("draw-input"), x);
  paintOne($("draw-recon"), recon);
  const rows = [];
  for (let d = 0; d < Math.min(model.latentDim, MAX_SLIDERS); d++) {
    const tr = document.createElement("tr");
    for (const text of [`z${d + 1}`, loc[d].toFixed(2), scale[d].toFixed(2)]) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.append(td);
    }
    rows.push(tr);
  }
  $("posterior").querySelector("tbody").replaceChildren(...rows);
  state.draw = { x, loc, scale, recon, label, version: state.draw.version + 1 };
});

function setupPen() {
  const canvas = $("pen");
  clearPen();
  canvas.addEventListener("pointerdown", (event) => {
    event.preventDefault();
    canvas.setPointerCapture(event.pointerId);
    pen.drawing = true;
    pen.last = null;
    strokeTo(penPoint(event));
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!pen.drawing) return;
    const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
    for (const e of events.length ? events : [event]) strokeTo(penPoint(e));
    renderDraw();
  });
  const end = () => {
    if (!pen.drawing) return;
    pen.drawing = false;
    pen.last = null;
    renderDraw();
  };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);
  $("pen-clear").addEventListener("click", clearPen);
}

// ---------------------------------------------------------------- Interpolate
async function setSlot(name, z) {
  if (!z) {
    status("Draw a digit first.");
    return;
  }
  z = Float32Array.from(z);
  state.slots[name] = z;
  await paintSlot(name);
  await renderInterp();
}

async function paintSlot(name) {
  if (state.slots[name]) paintOne($(`slot-${name}`), await decode(state.slots[name]));
}

async function renderInterp() {
  const { a, b } = state.slots;
  if (!a || !b) return;
  const L = model.latentDim;
  const z = new Float32Array(INTERP_STEPS * L);
  for (let k = 0; k < INTERP_STEPS; k++) {
    const t = k / (INTERP_STEPS - 1);
    for (let d = 0; d < L; d++) z[k * L + d] = (1 - t) * a[d] + t * b[d];
  }
  const label = model.label;
  const x = await decode(z, label);
  paintGrid($("interp"), x, INTERP_STEPS, INTERP_STEPS);
  state.interp = { z, x, label };
}

// ---------------------------------------------------------------- start-up
function fail(error) {
  console.error(error);
  status(`Error: ${error.message || error}`, true);
}

async function loadDecoder(file) {
  model.decoder = await loadSession(file, model.names.z, [model.names.xMean]);
  model.condition.decoder = model.decoder.condition;
  model.decoderFile = file;
}

function describe() {
  const m = model.manifest;
  const [H, W, C] = model.shape;
  const classes = model.classes.length ? `, conditional on ${model.classes.length} classes` : "";
  const threads = ort.env.wasm.numThreads === 1 ? "1 thread" : `${ort.env.wasm.numThreads} threads`;
  status(`Ready: ${model.decoderFile} + encoder.onnx, latent_dim ${model.latentDim}, image ${H}×${W}×${C}, ${m.likelihood || "?"} likelihood${classes}; running on this device (WebAssembly, ${threads}).`);
  $("about").textContent = `Model files from ./export/ (kvae ${m.kvae_version || "?"}). onnxruntime-web ${ort.env.versions?.web || ""}.`;
}

async function init() {
  try {
    ort = await import(`${ORT}ort.wasm.min.mjs`);
  } catch (e) {
    throw new Error(`cannot load onnxruntime-web from ${ORT} (run npm ci in mobile_demo/): ${e.message}`);
  }
  ort.env.wasm.wasmPaths = new URL(ORT, location.href).href; // local files, never a CDN
  // One thread unless ?threads=N asks for more: threads need a cross-origin isolated page (the
  // kvae server sends COOP/COEP; a plain static host does not), and one is plenty for this model.
  const asked = Number.parseInt(new URLSearchParams(location.search).get("threads") || "1", 10);
  ort.env.wasm.numThreads = self.crossOriginIsolated && asked > 1 ? Math.min(asked, 16) : 1;
  ort.env.logLevel = "error";

  const manifest = await (await fetchOk(`${EXPORT}manifest.json`)).json();
  if (!Number.isInteger(manifest.latent_dim) || !Array.isArray(manifest.image_shape) || manifest.image_shape.length !== 3) {
    throw new Error("manifest.json lacks latent_dim or image_shape [H, W, C]");
  }
  model.manifest = manifest;
  model.latentDim = manifest.latent_dim;
  model.shape = manifest.image_shape.map(Number);
  if (manifest.conditional) {
    if (!Array.isArray(manifest.classes) || !manifest.classes.length) {
      throw new Error("manifest.json says conditional but lists no classes: export the run again (python export/to_onnx.py RUN)");
    }
    model.classes = manifest.classes.map(String);
    model.label = 0;
  }
  await loadPrior(manifest);
  $("sample-hint").textContent = sampleHint();

  // Decoder files the manifest lists (float32 first, then quantized variants).
  const files = manifest.files || {};
  const decoders = Object.keys(files).filter((f) => files[f].format === "onnx" && files[f].half === "decoder");
  if (!decoders.includes("decoder.onnx")) decoders.unshift("decoder.onnx");
  decoders.sort((a, b) => (a === "decoder.onnx" ? -1 : b === "decoder.onnx" ? 1 : a.localeCompare(b)));
  $("decoder-file").replaceChildren(...decoders.map((f) => new Option(f, f)));

  [model.encoder] = await Promise.all([
    loadSession("encoder.onnx", model.names.x, [model.names.loc, model.names.scale]),
    loadDecoder("decoder.onnx"),
  ]);
  model.condition.encoder = model.encoder.condition;

  $("input-caption").textContent = `model input (${model.shape[0]}×${model.shape[1]})`;
  buildSliders();
  if (model.latentDim === 2) {
    setupPad();
    await paintPad();
  }
  setupPen();
  if (model.classes.length) setupClasses();
  await renderSample(readSeed());
  await setExplore(new Float32Array(model.latentDim));
  const L = model.latentDim;
  await setSlot("a", state.sample.z.slice(0, L));
  await setSlot("b", state.sample.z.slice(L, 2 * L));
  describe();

  $("seed").addEventListener("change", () => renderSample(readSeed()).catch(fail));
  $("resample").addEventListener("click", () => renderSample((readSeed() + 1) >>> 0).catch(fail));
  $("grid").addEventListener("click", pickSample);
  $("class").addEventListener("change", (event) => setClass(Number(event.target.value)).catch(fail));
  $("explore-zero").addEventListener("click", () => setExplore(new Float32Array(L)));
  $("explore-random").addEventListener("click", () => setExplore(samplePrior((Math.random() * 2 ** 32) >>> 0, 1).z));
  $("a-from-draw").addEventListener("click", () => setSlot("a", state.draw.loc).catch(fail));
  $("b-from-draw").addEventListener("click", () => setSlot("b", state.draw.loc).catch(fail));
  $("a-from-explore").addEventListener("click", () => setSlot("a", exploreZ()).catch(fail));
  $("b-from-explore").addEventListener("click", () => setSlot("b", exploreZ()).catch(fail));
  $("decoder-file").addEventListener("change", async (event) => {
    const file = event.target.value;
    status(`Loading ${file}…`);
    try {
      await loadDecoder(file);
      timings.clear();
      await renderSample(state.sample.seed);
      if (model.latentDim === 2) await paintPad();
      await renderExplore(exploreZ());
      await renderInterp();
      describe();
    } catch (e) {
      fail(e);
    }
  });
  return { latentDim: model.latentDim, imageShape: model.shape, decoderFile: model.decoderFile };
}

/** Every view again with the picked class; the drawing is encoded again too. */
async function setClass(label) {
  model.label = label;
  $("class").value = String(label);
  await renderSample(state.sample.seed);
  if (model.latentDim === 2) await paintPad();
  await renderExplore(exploreZ());
  if (pen.ink) await renderDraw();
  await paintSlot("a");
  await paintSlot("b");
  await renderInterp();
}

/** A conditional model: the class picker (the manifest's class names) and the hints that name it. */
function setupClasses() {
  $("class").replaceChildren(...model.classes.map((name, id) => new Option(name, String(id))));
  $("class").value = String(model.label);
  $("class-picker").hidden = false;
  // The picker can wrap the sticky nav onto a second line: keep the sections' tops clear of it.
  const nav = document.querySelector("nav");
  new ResizeObserver(() => document.documentElement.style.setProperty("--nav-height", `${nav.offsetHeight + 8}px`)).observe(nav);
  $("sample-hint").textContent = sampleHint(" as the class picked at the top");
  $("explore-hint").textContent += " Decoded as the picked class.";
  $("draw-hint").textContent = "Draw a digit with a finger or the mouse. It is scaled to the model's input, encoded to Q(z|X, y) (loc, scale) with y the picked class, and decoded from loc with the same class.";
  $("posterior").querySelector("caption").textContent = "Q(z|X, y) = N(loc, scale²): dimension, loc, scale";
}

/** The Sample card's hint: where z comes from. */
function sampleHint(asClass = "") {
  const from = prior.kind === "standard" ? "z ~ N(0, I)"
    : prior.learned ? `z from the model's learned prior P(z) (a ${prior.components}-component Gaussian mixture)`
    : `z from the fitted prior (a ${prior.components}-component Gaussian mixture over the training codes)`;
  return `${from}, drawn here from a seeded generator, decoded in one call${asClass}. Tap a digit to explore it.`;
}

/** A session on any encoder or decoder file the manifest lists (bench/browser_latency.py). */
function openFile(file) {
  const half = model.manifest.files?.[file]?.half;
  if (half === "encoder") return loadSession(file, model.names.x, [model.names.loc, model.names.scale]);
  if (half === "decoder") return loadSession(file, model.names.z, [model.names.xMean]);
  return Promise.reject(new Error(`${file} is no encoder or decoder that manifest.json lists`));
}

// ---------------------------------------------------------------- offline (sw.js)
/** Registers sw.js and has it keep this manifest's files; resolves with what it did, or with
 * {supported: false, reason} where the browser cannot (no service workers, or plain http on a
 * LAN address: not a secure context). Shown in the footer. */
async function keepOffline(manifest) {
  const show = (text) => { $("offline").textContent = text; };
  if (!("serviceWorker" in navigator) || !self.isSecureContext) {
    const reason = self.isSecureContext ? "this browser has no service workers"
      : "not a secure context (plain http on a network address): open it over https, or on localhost";
    show(`Offline use: off (${reason}).`);
    return { supported: false, reason };
  }
  await navigator.serviceWorker.register("sw.js");
  const registration = await navigator.serviceWorker.ready;
  const urls = [`${EXPORT}manifest.json`, ...offlineFiles(manifest).map(exportUrl)];
  const reply = await new Promise((resolve, reject) => {
    const channel = new MessageChannel();
    channel.port1.onmessage = (event) => (event.data.error ? reject(new Error(event.data.error)) : resolve(event.data));
    registration.active.postMessage({ type: "cache-export", urls }, [channel.port2]);
  });
  show(`Available offline: the app, onnxruntime-web, the manifest and ${reply.cached.length - 1} export files are kept on this device` +
    (reply.fetched.length || reply.removed.length ? ` (${reply.fetched.length} fetched now, ${reply.removed.length} of an older export removed).` : "."));
  return { supported: true, ...reply };
}

/** Resolves once no live view has a decode or encode in flight or waiting. */
async function settled() {
  for (;;) {
    const running = liveViews.map((current) => current()).filter(Boolean);
    if (!running.length) return;
    await Promise.all(running);
  }
}

const ready = init();
ready.catch(fail);
const offline = ready.then(() => keepOffline(model.manifest)).catch((e) => {
  console.warn("kvae: offline copy failed:", e); // the demo itself still runs
  $("offline").textContent = `Offline use: failed (${e.message || e}).`;
  return { supported: true, error: String(e.message || e) };
});

window.kvae = {
  ready,
  offline,
  get manifest() {
    return model.manifest;
  },
  get classes() {
    return model.classes;
  },
  get label() {
    return model.label;
  },
  get prior() {
    return { kind: prior.kind, components: prior.components };
  },
  get threads() {
    return ort?.env.wasm.numThreads;
  },
  get ort() {
    return ort;
  },
  decode,
  encode,
  sampleZ: sampleNormal,
  samplePrior,
  open: openFile,
  settled,
  state,
};
