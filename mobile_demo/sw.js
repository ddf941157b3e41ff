// kvae demo service worker: the demo opens, samples and encodes with the network off once it has
// been opened online (a secure context: https, or http on localhost / 127.0.0.1).
//
// Three caches:
//   kvae-app          the app's own files (APP_FILES): network first, the cache when offline, so
//                     a new version of the app shows up on the next online visit.
//   kvae-ort-VERSION  onnxruntime-web's files (ORT_FILES, 14 MB of WebAssembly): cache first; a
//                     new onnxruntime-web version (mobile_demo/package.json) is a new cache.
//   kvae-models       the run's export: export/manifest.json network first; the files it names,
//                     which app.js requests by content (export/NAME?sha256=HEX), cache first. The
//                     page sends the list for its manifest ("cache-export" message): missing files
//                     are fetched, files of an older export are deleted, so a new export (another
//                     sha256 in the manifest) replaces the cached one on the next online visit.
// Every path is relative to this file: the site works from any folder of a static host.

const ORT_VERSION = "1.30.0"; // onnxruntime-web, as mobile_demo/package.json pins it (tests/test_demo.py checks)
const APP_CACHE = "kvae-app";
const ORT_CACHE = `kvae-ort-${ORT_VERSION}`;
const MODEL_CACHE = "kvae-models";
const APP_FILES = ["./", "index.html", "app.js", "style.css", "manifest.webmanifest",
  "icons/icon-192.png", "icons/icon-512.png", "icons/icon-maskable-512.png", "icons/apple-touch-icon.png"];
const ORT_FILES = ["ort/ort.wasm.min.mjs", "ort/ort-wasm-simd-threaded.mjs", "ort/ort-wasm-simd-threaded.wasm"];
const NETWORK_WAIT_MS = 4000; // network first: after this long the cached copy answers

const scope = () => self.registration.scope; // ends with "/"
const absolute = (path) => new URL(path, scope()).href;

self.addEventListener("install", (event) => {
  event.waitUntil((async () => {
    const app = await caches.open(APP_CACHE);
    await app.addAll(APP_FILES.map((path) => new Request(absolute(path), { cache: "no-cache" })));
    const ort = await caches.open(ORT_CACHE);
    for (const path of ORT_FILES) {
      if (!(await ort.match(absolute(path)))) await ort.add(absolute(path));
    }
    await self.skipWaiting(); // the first visit's page is taken over at once (clients.claim below)
  })());
});

self.addEventListener("activate", (event) => {
  event.waitUntil((async () => {
    for (const name of await caches.keys()) {
      if (name.startsWith("kvae-ort-") && name !== ORT_CACHE) await caches.delete(name);
    }
    await self.clients.claim();
  })());
});

self.addEventListener("fetch", (event) => {
  const request = event.request;
  if (request.method !== "GET" || !request.url.startsWith(scope())) return; // not ours: the network
  const url = new URL(request.url);
  const path = url.href.slice(scope().length).split(/[?#]/)[0];
  if (path.startsWith("ort/")) {
    event.respondWith(cacheFirst(ORT_CACHE, request, { ignoreSearch: true }));
  } else if (path.startsWith("export/") && url.searchParams.has("sha256")) {
    event.respondWith(cacheFirst(MODEL_CACHE, request));
  } else if (path.startsWith("export/")) {
    event.respondWith(networkFirst(MODEL_CACHE, request));
  } else {
    // a navigation may carry a query (?threads=2): offline, any cached copy of the page will do
    event.respondWith(networkFirst(APP_CACHE, request, { ignoreSearch: request.mode === "navigate" }));
  }
});

async function cacheFirst(cacheName, request, matchOptions = {}) {
  const cache = await caches.open(cacheName);
  const hit = await cache.match(request, matchOptions);
  if (hit) return hit;
  const response = await fetch(request);
  if (response.ok && (await hasItsSha256(request.url, response.clone()))) await cache.put(request, response.clone());
  return response;
}

/** True unless `url` names a sha256 (?sha256=HEX) that the body does not have: the server already
 * holds a newer export than the manifest the page read. Such a file is served, never cached. */
async function hasItsSha256(url, response) {
  const want = new URL(url).searchParams.get("sha256");
  if (!want) return true;
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", await response.arrayBuffer()));
  return Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("") === want.toLowerCase();
}

async function networkFirst(cacheName, request, matchOptions = {}) {
  const cache = await caches.open(cacheName);
  const network = fetch(request).then(async (response) => {
    if (response.ok) await cache.put(request, response.clone());
    return response;
  });
  network.catch(() => {}); // answered from the cache below: a late failure is no error
  const waited = new Promise((resolve) => setTimeout(resolve, NETWORK_WAIT_MS, null));
  try {
    const response = await Promise.race([network, waited]);
    if (response) return response;
  } catch {
    // offline or the server is gone: the cached copy
  }
  return (await cache.match(request, matchOptions)) || network;
}

// {type: "cache-export", urls}: keeps exactly these export files in kvae-models (the manifest
// fetched again; the files it names, by content, fetched only when missing; older ones deleted).
self.addEventListener("message", (event) => {
  if (event.data?.type !== "cache-export" || !event.ports[0]) return;
  const port = event.ports[0];
  event.waitUntil(cacheExport(event.data.urls).then(
    (result) => port.postMessage(result),
    (error) => port.postMessage({ error: String(error?.message || error) })));
});

async function cacheExport(urls) {
  const cache = await caches.open(MODEL_CACHE);
  const wanted = [...new Set(urls.map(absolute))];
  const fetched = [];
  for (const url of wanted) {
    const byContent = new URL(url).searchParams.has("sha256");
    if (byContent && (await cache.match(url))) continue; // the same bytes: kept (the manifest is fetched again)
    let response;
    try {
      response = await fetch(url, { cache: "no-cache" });
    } catch (error) {
      if (!byContent && (await cache.match(url))) continue; // offline: the manifest cached before will do
      throw error;
    }
    if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
    if (!(await hasItsSha256(url, response.clone()))) throw new Error(`${url}: the file on the server changed (export again in progress?); reload`);
    await cache.put(url, response);
    if (byContent) fetched.push(url);
  }
  const removed = [];
  for (const request of await cache.keys()) {
    if (new URL(request.url).searchParams.has("sha256") && !wanted.includes(request.url)) {
      await cache.delete(request);
      removed.push(request.url);
    }
  }
  return { cached: wanted, fetched, removed };
}
