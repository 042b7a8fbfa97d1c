// Wan Attention Capture: the interactive viewer, shared by the node widget and viewer.html.
// Exports only (ComfyUI loads every .js here as an extension): a recording is browsed slice by slice from the
// server routes /wan_capture/* as float32 bytes, drawn on a canvas over the decoded frame when it was saved.

const ANCHORS = {
  viridis: "440154 472d7b 3b528b 2c728e 21918c 28ae80 5ec962 addc30 fde725",
  inferno: "000004 1f0c48 550f6d 88226a ba3655 e35932 f98c0a f9c932 fcffa4",
  magma: "000004 1c1044 4f127b 812581 b5367a e55064 fb8761 fec287 fcfdbf",
};
export const COLORMAPS = ["viridis", "inferno", "magma", "turbo", "jet", "gray"];
export const NORMALIZE = ["per_frame", "per_video", "fixed", "percentile"];

const clamp = (x) => Math.min(1, Math.max(0, x));

/** RGB (0..255) of value x in [0, 1], the same maps as the Python renderer. */
export function colormap(name, x) {
  x = clamp(Number.isFinite(x) ? x : 0);
  if (ANCHORS[name]) {
    const cols = ANCHORS[name].split(" ").map((h) => [0, 2, 4].map((i) => parseInt(h.slice(i, i + 2), 16)));
    const pos = x * (cols.length - 1);
    const i = Math.min(cols.length - 2, Math.floor(pos));
    const f = pos - i;
    return cols[i].map((c, k) => Math.round(c + (cols[i + 1][k] - c) * f));
  }
  let rgb;
  if (name === "turbo") {
    rgb = [
      0.13572138 + x * (4.6153926 + x * (-42.66032258 + x * (132.13108234 + x * (-152.94239396 + x * 59.28637943)))),
      0.09140261 + x * (2.19418839 + x * (4.84296658 + x * (-14.18503333 + x * (4.27729857 + x * 2.82956604)))),
      0.1066733 + x * (12.64194608 + x * (-60.58204836 + x * (110.36276771 + x * (-89.90310912 + x * 27.34824973)))),
    ];
  } else if (name === "jet") {
    rgb = [1.5 - Math.abs(4 * x - 3), 1.5 - Math.abs(4 * x - 2), 1.5 - Math.abs(4 * x - 1)];
  } else {
    rgb = [x, x, x];
  }
  return rgb.map((c) => Math.round(clamp(c) * 255));
}

const LUT_SIZE = 1024;  // colour table entries: adjacent entries differ by under one RGB unit in every map
const LUTS = {};
const PLAYBACK_FPS = 16;  // Wan's frame rate
const PRELOAD_AT_ONCE = 2;  // decoded frames fetched together in the background (the user's requests go first)
const SLICE_CACHE = 48;  // slices kept in the page (one is F x h x w float32: 131 KB at the 1.3B shape)

/** The colour table of a map: LUT_SIZE RGB triples, built once per map. */
function lut(name) {
  if (!LUTS[name]) {
    const t = new Uint8ClampedArray(LUT_SIZE * 3);
    for (let i = 0; i < LUT_SIZE; i++) t.set(colormap(name, i / (LUT_SIZE - 1)), i * 3);
    LUTS[name] = t;
  }
  return LUTS[name];
}

function range(values, mode, vmin, vmax) {
  if (mode === "fixed") return [vmin, vmax];
  if (mode === "percentile") {
    const s = Float32Array.from(values).sort();
    const at = (p) => s[Math.min(s.length - 1, Math.max(0, Math.round((p / 100) * (s.length - 1))))];
    return [at(1), at(99)];
  }
  let lo = Infinity, hi = -Infinity;
  for (const v of values) { if (v < lo) lo = v; if (v > hi) hi = v; }
  return [lo, hi];
}

export class Viewer {
  constructor(root, apiBase = "") {
    this.api = apiBase;
    this.root = root;
    this.root.classList.add("wan-capture-viewer");
    this.root.innerHTML = `
      <div class="wcv-row"><input class="wcv-path" placeholder="batch/attention_maps" size="28">
        <select class="wcv-video"></select><button class="wcv-open">open</button></div>
      <div class="wcv-row"><select class="wcv-token"></select><select class="wcv-branch"></select>
        <select class="wcv-cmap"></select><select class="wcv-norm"></select>
        alpha <input class="wcv-alpha" type="range" min="0" max="1" step="0.05" value="0.6"></div>
      <div class="wcv-row">step <input class="wcv-step" type="range" min="0" max="0" value="0"><span class="wcv-step-v"></span>
        block <select class="wcv-block"></select> head <select class="wcv-head"></select>
        frame <input class="wcv-frame" type="range" min="0" max="0" value="0"><span class="wcv-frame-v"></span></div>
      <div class="wcv-row"><button class="wcv-play-frames" title="play / pause over frames">&#9654; frames</button>
        <button class="wcv-play-steps" title="play / pause over steps">&#9654; steps</button>
        <label title="every tracked word at this step and frame, side by side"><input class="wcv-compare-on"
          type="checkbox"> words side by side</label>
        <button class="wcv-export" title="save the current view as PNG">export PNG</button></div>
      <canvas class="wcv-canvas" width="320" height="180" title="click a point: each word's value there over steps"></canvas>
      <div class="wcv-legend"><canvas class="wcv-bar" width="240" height="12"></canvas>
        <span class="wcv-legend-text"></span></div>
      <div class="wcv-readout">&nbsp;</div><div class="wcv-compare"></div><div class="wcv-probe"></div>`;
    this.$ = (c) => this.root.querySelector(".wcv-" + c);
    for (const c of COLORMAPS) this.$("cmap").add(new Option(c, c));
    for (const n of NORMALIZE) this.$("norm").add(new Option(n, n));
    this.$("cmap").value = "inferno";
    this.$("norm").value = "per_video";
    this.$("open").onclick = () => this.open(this.$("path").value, this.$("video").value);
    for (const c of ["token", "step", "block", "head"]) this.$(c).oninput = () => this.load();
    this.$("branch").oninput = () => { this.fillTokens(); this.load(); };
    for (const c of ["frame", "cmap", "norm", "alpha"]) this.$(c).oninput = () => this.draw();
    this.$("compare-on").oninput = () => this.draw();
    this.$("canvas").onmousemove = (e) => this.hover(e);
    this.$("canvas").onclick = (e) => this.probeAt(e);
    this.$("play-frames").onclick = () => this.toggle("frame");
    this.$("play-steps").onclick = () => this.toggle("step");
    this.$("export").onclick = () => this.download();
    this.playing = {};
    this.slice = null;
    this.slices = new Map();  // recently loaded slices by request: going back to a step, block or word is instant
    this.heat = document.createElement("canvas");  // the map at one pixel per cell, scaled onto the frame
  }

  /** Play or pause: the frame or step slider advances every ``ms`` milliseconds (16 a second, Wan's frame rate),
   * wrapping at the end; a picture still being drawn is not skipped over. */
  toggle(which, ms = 1000 / PLAYBACK_FPS) {
    const button = this.$(which === "frame" ? "play-frames" : "play-steps");
    if (this.playing[which]) {
      clearInterval(this.playing[which]);
      this.playing[which] = null;
      button.innerHTML = `&#9654; ${which}s`;
      return false;
    }
    this.playing[which] = setInterval(() => {
      if (this.root.dataset.ready !== "1") return;  // the previous picture is still being drawn
      const el = this.$(which);
      el.value = String(Number(el.value) >= Number(el.max) ? 0 : Number(el.value) + 1);
      el.dispatchEvent(new Event("input"));
    }, ms);
    button.innerHTML = `&#10074;&#10074; ${which}s`;
    return true;
  }

  tokensOf(branch) {
    const s = this.summary;
    return (branch === "uncond" && s.negative_tokens ? s.negative_tokens : s.tokens) || [];
  }

  fillTokens() {
    const s = this.summary, el = this.$("token"), keep = el.value;
    el.innerHTML = "";
    for (const t of this.tokensOf(this.$("branch").value)) el.add(new Option(`token: ${t.label}`, t.label));
    if (s.self_attention) {
      el.add(new Option("attention received (sinks)", "__sink__"));
      el.add(new Option(s.causal ? "frame x frame mass (causal, S = sink)" : "frame x frame mass", "__frame_mass__"));
    }
    if ([...el.options].some((o) => o.value === keep)) el.value = keep;
  }

  /** The current view as a PNG data URL (the heat over the frame, as drawn), also offered as a download. */
  exportPNG() {
    return this.$("canvas").toDataURL("image/png");
  }

  download() {
    const a = document.createElement("a");
    a.href = this.exportPNG();
    a.download = `${this.$("video").value}_${this.drawn?.token || "view"}_step${this.drawn?.step}_frame${this.drawn?.frame}.png`;
    a.click();
  }

  /** Click on the frame: each tracked word's value at that cell over every saved step (and per block). */
  async probeAt(e) {
    if (!this.slice || this.slice.matrix) return;
    const [, h, w] = this.slice.shape;
    const r = this.$("canvas").getBoundingClientRect();
    const x = Math.min(w - 1, Math.floor(((e.clientX - r.left) / r.width) * w));
    const y = Math.min(h - 1, Math.floor(((e.clientY - r.top) / r.height) * h));
    return this.probe(Number(this.$("frame").value), y, x);
  }

  async probe(frame, y, x) {
    this.root.dataset.probed = "0";
    const p = await this.json("probe", { path: this.path, video: this.$("video").value, branch: this.$("branch").value,
      frame, y, x });
    this.probed = p;
    const words = Object.keys(p.words);
    const all = words.flatMap((k) => p.words[k].mean);
    const lo = Math.min(...all), hi = Math.max(...all), span = hi > lo ? hi - lo : 1;
    const W = 240, H = 80, n = Math.max(1, p.steps.length - 1);
    const colors = ["#ff6b6b", "#4dabf7", "#69db7c", "#ffd43b", "#da77f2", "#ffa94d"];
    const lines = words.map((k, i) => `<polyline fill="none" stroke="${colors[i % colors.length]}" stroke-width="1.5"
      points="${p.words[k].mean.map((v, j) => `${(j / n) * W},${H - ((v - lo) / span) * H}`).join(" ")}"/>`).join("");
    const head = `<tr><th>word \ step</th>${p.steps.map((s) => `<th>${s}</th>`).join("")}</tr>`;
    const rows = words.map((k, i) => `<tr data-word="${k}"><td style="color:${colors[i % colors.length]}">${k}</td>` +
      p.words[k].mean.map((v) => `<td>${v.toPrecision(4)}</td>`).join("") + "</tr>").join("");
    const perBlock = () => words.map((k) => p.words[k].blocks.map((vals, b) => `<tr><td>${k}, block ${p.blocks[b]}</td>` +
      vals.map((v) => `<td>${v.toPrecision(4)}</td>`).join("") + "</tr>").join("")).join("");
    this.$("probe").innerHTML = `<div>point: latent frame ${frame}, cell (${y}, ${x}); mean over blocks and heads
      (${this.$("branch").value})</div><svg width="${W}" height="${H}" class="wcv-chart">${lines}</svg>
      <table class="wcv-probe-table">${head}${rows}</table>
      <details><summary>per block</summary><table class="wcv-probe-blocks">${head}</table></details>`;
    // the per-block table (words x blocks rows) is built when it is opened, not with every probe
    const details = this.$("probe").querySelector("details");
    details.ontoggle = () => {
      const table = details.querySelector("table");
      if (details.open && table.rows.length === 1) table.insertAdjacentHTML("beforeend", perBlock());
    };
    this.root.dataset.probed = "1";
    await this.draw();  // the marker on the frame
    return p;
  }

  async json(route, params) {
    const r = await fetch(`${this.api}/wan_capture/${route}?${new URLSearchParams(params)}`);
    if (!r.ok) throw new Error(`${route}: HTTP ${r.status}`);
    return r.json();
  }

  async open(path, video) {
    this.path = path;
    this.$("path").value = path;
    const list = (await this.json("videos", { path })).videos;
    const sel = this.$("video");
    sel.innerHTML = "";
    for (const v of list) sel.add(new Option(v, v));
    sel.value = video && list.includes(video) ? video : list[0];
    this.summary = await this.json("summary", { path, video: sel.value });
    const s = this.summary;
    const fill = (el, items) => { el.innerHTML = ""; for (const [v, t] of items) el.add(new Option(t, v)); };
    fill(this.$("branch"), s.branches.map((b) => [b, b]));
    this.fillTokens();
    fill(this.$("block"), [["mean", "mean"], ...s.blocks.filter((b) => b >= 0).map((b) => [String(b), String(b)])]);
    fill(this.$("head"), [["mean", "mean"], ...s.heads.filter((h) => h >= 0).map((h) => [String(h), String(h)])]);
    this.$("step").max = String(s.steps.length - 1);
    this.$("step").value = "0";
    this.frames = {};
    this.slices.clear();
    await this.load();
    this.preloadFrames();  // the decoded frames come in behind the first picture, so playback never waits
  }

  /** Every saved frame, fetched and decoded in the background, PRELOAD_AT_ONCE at a time, at low priority; it
   * waits while a picture the user asked for is coming (the user's request goes first). */
  async preloadFrames() {
    const saved = this.summary.frames_saved || [];
    const video = this.$("video").value;
    for (let i = 0; i < saved.length; i += PRELOAD_AT_ONCE) {
      await this.userIdle();
      if (this.$("video").value !== video) return;
      const batch = [];
      for (let k = i; k < Math.min(saved.length, i + PRELOAD_AT_ONCE); k++) batch.push(this.pixelFrame(k, "low"));
      await Promise.all(batch);
    }
  }

  /** Resolves when no picture the user asked for is on its way. */
  userIdle() {
    if (!this.userBusy) return Promise.resolve();
    return new Promise((resolve) => (this.idleWaiters = [...(this.idleWaiters || []), resolve]));
  }

  /** ``work`` is a request of the user's: background loading waits until it is drawn. */
  async asUser(work) {
    this.userBusy = (this.userBusy || 0) + 1;
    try {
      return await work();
    } finally {
      this.userBusy -= 1;
      if (!this.userBusy) for (const resolve of this.idleWaiters?.splice(0) || []) resolve();
    }
  }

  /** The slice request of the current controls (``step``, ``token``: another step's, word's). */
  sliceQuery(step, token = this.$("token").value) {
    const params = { path: this.path, video: this.$("video").value, step, branch: this.$("branch").value,
      block: this.$("block").value, head: this.$("head").value };
    if (token === "__sink__") params.kind = "sink";
    else if (token === "__frame_mass__") params.kind = "frame_mass";
    else params.token = token;
    return String(new URLSearchParams(params));
  }

  /** A slice, from the page's cache or the server (kept in the cache either way); ``priority``: the fetch's. */
  async fetchSlice(query, priority = "high") {
    let got = this.slices.get(query);
    if (!got) {
      got = fetch(`${this.api}/wan_capture/slice?${query}`, { priority }).then(async (r) => {
        if (!r.ok) throw new Error(`slice: HTTP ${r.status}`);
        return { shape: r.headers.get("X-Shape").split(",").map(Number), data: new Float32Array(await r.arrayBuffer()),
          sinks: (r.headers.get("X-Sinks") || "").split(",").filter((x) => x !== "").map(Number), ranges: {} };
      });
      this.slices.set(query, got);
      got.catch(() => this.slices.delete(query));
      if (this.slices.size > SLICE_CACHE) this.slices.delete(this.slices.keys().next().value);
    }
    return got;
  }

  async load() {
    const s = this.summary;
    const index = Number(this.$("step").value);
    const step = s.steps[index];
    this.$("step-v").textContent = ` ${step} `;
    const token = this.$("token").value;
    const id = (this.loadId = (this.loadId || 0) + 1);
    this.root.dataset.ready = "0";
    const drawn = await this.asUser(async () => {
      const { data, shape, sinks, ranges } = await this.fetchSlice(this.sliceQuery(step));
      if (id !== this.loadId) return false;  // a later request superseded this one
      this.slice = { data, shape, step, token, sinks, ranges, matrix: token === "__frame_mass__" };
      this.$("frame").max = String(shape[0] - 1);
      if (Number(this.$("frame").value) > shape[0] - 1) this.$("frame").value = "0";
      await this.draw();
      return true;
    });
    // the next step comes in behind this picture: stepping forward (or playing the steps) finds it here
    if (drawn && index + 1 < s.steps.length) this.fetchSlice(this.sliceQuery(s.steps[index + 1]), "low").catch(() => null);
  }

  async frameImage(t) {
    const saved = this.summary.frames_saved || [];
    if (!saved.length) return null;
    return this.pixelFrame(Math.min(saved.length - 1, t === 0 ? 0 : 4 * t - 3));  // latent frame t: 4t-3..4t
  }

  /** One decoded frame, fetched once (a promise while it comes); ``priority``: the fetch's ("low": preloading). */
  pixelFrame(pixel, priority = "auto") {
    if (!(pixel in this.frames)) {
      const img = new Image();
      img.fetchPriority = priority;
      img.src = `${this.api}/wan_capture/frame?${new URLSearchParams({ path: this.path, video: this.$("video").value, index: pixel })}`;
      this.frames[pixel] = img.decode().then(() => (img.naturalWidth ? img : null), () => null);
    }
    return this.frames[pixel];
  }

  async draw() {
    if (!this.slice) return;
    const id = (this.drawId = (this.drawId || 0) + 1);  // a later draw supersedes this one
    this.root.dataset.ready = "0";
    const [F, h, w] = this.slice.shape;
    const t = Number(this.$("frame").value);
    this.$("frame-v").textContent = ` ${t} `;
    const frame = this.slice.data.subarray(t * h * w, (t + 1) * h * w);
    const mode = this.$("norm").value;
    // the whole video's range is the same for every frame of a slice: computed once
    const whole = mode === "per_video";
    const [lo, hi] = whole ? (this.slice.ranges[mode] ||= range(this.slice.data, mode, 0, 1)) : range(frame, mode, 0, 1);
    const img = this.slice.matrix ? null : await this.frameImage(t);
    if (id !== this.drawId) return;
    const canvas = this.$("canvas");
    const cell = Math.max(1, Math.floor(320 / w));
    const width = img ? img.naturalWidth : w * cell, height = img ? img.naturalHeight : h * cell;
    if (canvas.width !== width || canvas.height !== height) { canvas.width = width; canvas.height = height; }
    // the map is coloured at one pixel per cell through the colour table, then scaled onto the frame
    const heat = this.heat;
    if (heat.width !== w || heat.height !== h) { heat.width = w; heat.height = h; }
    const hctx = heat.getContext("2d");
    const pixels = hctx.createImageData(w, h), px = pixels.data, table = lut(this.$("cmap").value);
    const scale = (LUT_SIZE - 1) / (hi > lo ? hi - lo : 1);
    for (let i = 0; i < h * w; i++) {
      let v = (frame[i] - lo) * scale;
      v = v > 0 ? (v < LUT_SIZE - 1 ? Math.round(v) : LUT_SIZE - 1) : 0;  // below the range and NaN: the first colour
      px[4 * i] = table[3 * v]; px[4 * i + 1] = table[3 * v + 1]; px[4 * i + 2] = table[3 * v + 2]; px[4 * i + 3] = 255;
    }
    hctx.putImageData(pixels, 0, 0);
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, width, height);
    if (img) ctx.drawImage(img, 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.globalAlpha = img ? Number(this.$("alpha").value) : 1;
    ctx.drawImage(heat, 0, 0, width, height);
    ctx.globalAlpha = 1;
    this.range = [lo, hi];
    const sinkNote = this.slice.matrix && this.slice.sinks.length ? `; sink frames: ${this.slice.sinks.join(", ")}` : "";
    if (this.slice.matrix && this.slice.sinks.length) {  // mark the sink frames' key columns
      ctx.strokeStyle = "#00e5ff";
      for (const f of this.slice.sinks) ctx.strokeRect(f * (canvas.width / w) + 0.5, 0.5, canvas.width / w - 1, canvas.height - 1);
    }
    const pr = this.probed;
    if (pr && !this.slice.matrix && pr.cell[0] === t) {  // mark the probed point on its frame
      const [, py, pxl] = pr.cell;
      ctx.strokeStyle = "#00e5ff";
      ctx.lineWidth = 2;
      ctx.strokeRect((pxl * canvas.width) / w + 1, (py * canvas.height) / h + 1, canvas.width / w - 2, canvas.height / h - 2);
    }
    this.legend(lo, hi, `${mode}: ${lo.toPrecision(3)} .. ${hi.toPrecision(3)}${sinkNote}`);
    if (this.$("compare-on").checked && !this.slice.matrix) await this.compare(t, lo, hi);
    else this.$("compare").innerHTML = "";
    if (id !== this.drawId) return;
    this.drawn = { step: this.slice.step, frame: t, token: this.slice.token, at: performance.now() };
    this.firstDrawnAt ||= this.drawn.at;
    this.root.dataset.ready = "1";
    this.root.dispatchEvent(new CustomEvent("wcv-drawn", { detail: this.drawn }));
  }

  /** The colour bar from lo to hi, with the range written beside it. */
  legend(lo, hi, text) {
    const bar = this.$("bar"), ctx = bar.getContext("2d");
    const pixels = ctx.createImageData(bar.width, bar.height), table = lut(this.$("cmap").value);
    for (let x = 0; x < bar.width; x++) {
      const v = Math.round((x / (bar.width - 1)) * (LUT_SIZE - 1));
      for (let y = 0; y < bar.height; y++) pixels.data.set([table[3 * v], table[3 * v + 1], table[3 * v + 2], 255], 4 * (y * bar.width + x));
    }
    ctx.putImageData(pixels, 0, 0);
    this.$("legend-text").textContent = ` ${text}`;
  }

  /** Every tracked word at this step and frame, side by side, all in one colour range (so they compare). */
  async compare(t, lo, hi) {
    const words = this.tokensOf(this.$("branch").value).map((x) => x.label);
    const maps = [];
    for (const token of words) {  // the same slices the page keeps: a frame change fetches nothing again
      const { shape, data } = await this.fetchSlice(this.sliceQuery(this.slice.step, token));
      const [, h, w] = shape;
      maps.push({ token, h, w, data: data.subarray(t * h * w, (t + 1) * h * w) });
    }
    const all = maps.flatMap((m) => Array.from(m.data));
    const [a, b] = [Math.min(...all), Math.max(...all)];
    const span = b > a ? b - a : 1;
    const box = this.$("compare");
    box.innerHTML = "";
    for (const m of maps) {
      const fig = document.createElement("figure");
      const c = document.createElement("canvas");
      const cell = Math.max(1, Math.floor(96 / m.w));
      c.width = m.w * cell; c.height = m.h * cell; c.dataset.word = m.token;
      const ctx = c.getContext("2d");
      for (let y = 0; y < m.h; y++) for (let x = 0; x < m.w; x++) {
        const [r, g, bb] = colormap(this.$("cmap").value, (m.data[y * m.w + x] - a) / span);
        ctx.fillStyle = `rgb(${r},${g},${bb})`;
        ctx.fillRect(x * cell, y * cell, cell, cell);
      }
      fig.appendChild(c);
      fig.insertAdjacentHTML("beforeend", `<figcaption>${m.token}</figcaption>`);
      box.appendChild(fig);
    }
    box.insertAdjacentHTML("beforeend", `<div>shared range ${a.toPrecision(3)} .. ${b.toPrecision(3)}</div>`);
    this.compared = { words, range: [a, b] };
  }

  hover(e) {
    if (!this.slice) return;
    const [, h, w] = this.slice.shape;
    const canvas = this.$("canvas");
    const r = canvas.getBoundingClientRect();
    const cx = Math.min(w - 1, Math.floor(((e.clientX - r.left) / r.width) * w));
    const cy = Math.min(h - 1, Math.floor(((e.clientY - r.top) / r.height) * h));
    const t = Number(this.$("frame").value);
    const v = this.slice.data[t * h * w + cy * w + cx];
    this.$("readout").textContent = this.slice.matrix
      ? `step ${this.slice.step}, query frame ${cy}, key frame ${cx}${this.slice.sinks.includes(cx) ? " (sink)" : ""}: ${v.toPrecision(4)}`
      : `step ${this.slice.step}, frame ${t}, cell (${cy}, ${cx}): ${v.toPrecision(4)}`;
  }
}

export const STYLE = `.wan-capture-viewer{font:12px sans-serif;color:#ddd}.wan-capture-viewer .wcv-row{margin:2px 0}
.wan-capture-viewer .wcv-canvas{image-rendering:pixelated;width:480px;max-width:100%;border:1px solid #444;cursor:crosshair}
.wan-capture-viewer .wcv-bar{vertical-align:middle;border:1px solid #444}
.wan-capture-viewer .wcv-compare figure{display:inline-block;margin:2px 6px 2px 0}
.wan-capture-viewer .wcv-compare canvas{image-rendering:pixelated;width:96px;border:1px solid #444}
.wan-capture-viewer figcaption{text-align:center}
.wan-capture-viewer .wcv-probe-table{border-collapse:collapse}.wan-capture-viewer .wcv-probe-table td,
.wan-capture-viewer .wcv-probe-table th{border:1px solid #444;padding:1px 4px}
.wan-capture-viewer .wcv-chart{background:#111;border:1px solid #444;display:block}`;
