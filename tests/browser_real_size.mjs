// The standalone viewer on a real-size recording in Debian's chromium: the time to the first picture, to each
// step / frame / block / word / colormap / alpha change, to a point probe, and the playback rate; then the pixels
// of one picture for the test to check. Prints one JSON line. Usage: node browser_real_size.mjs URL
import { launch } from "./browser_launch.mjs";

const [url] = process.argv.slice(2);
const browser = await launch();
const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
const errors = [];
page.on("pageerror", (e) => errors.push(String(e)));
await page.goto(url);
await page.waitForFunction(() => window.viewer && window.viewer.firstDrawnAt, null, { timeout: 60000 });
const firstPicture = await page.evaluate(() => window.viewer.firstDrawnAt);  // ms since the navigation started
// the decoded frames finish loading in the background; changes are timed once they are in
await page.waitForFunction(() => {
  const v = window.viewer, n = (v.summary.frames_saved || []).length;
  return Object.keys(v.frames).length >= n;
}, null, { timeout: 120000 });
await page.evaluate(() => Promise.all(Object.values(window.viewer.frames)));

// one change: set a control, wait for the picture it asks for; the time from the input to the drawn picture
// (from a quiet page: the next step the viewer fetches behind each picture has come in)
const change = (control, value) => page.evaluate(async ([c, val]) => {
  const v = window.viewer, el = v.$(c);
  await Promise.all([...v.slices.values()].map((p) => p.catch(() => null)));
  const done = new Promise((r) => v.root.addEventListener("wcv-drawn", r, { once: true }));
  const t0 = performance.now();
  el.value = String(val);
  el.dispatchEvent(new Event("input"));
  await done;
  return performance.now() - t0;
}, [control, value]);
const series = async (control, values) => { const out = []; for (const x of values) out.push(await change(control, x)); return out; };
const tokens = await page.evaluate(() => [...window.viewer.$("token").options].map((o) => o.value).filter((t) => !t.startsWith("__")));
const blocks = await page.evaluate(() => [...window.viewer.$("block").options].map((o) => o.value));
const times = {
  step_first_visit: await series("step", [1, 2, 3, 4, 5, 6, 7, 8]),
  step_revisit: await series("step", [1, 2, 3, 4, 5, 6, 7, 8]),
  frame: await series("frame", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]),
  block: await series("block", blocks.slice(1, 9)),
  word: await series("token", [...tokens.slice(1), tokens[0], ...tokens.slice(1)]),
  colormap: await series("cmap", ["viridis", "magma", "turbo", "gray", "jet", "inferno"]),
  alpha: await series("alpha", [0.2, 0.4, 0.8, 1.0, 0.6]),
};
await change("block", "mean");
await change("step", 0);
// the point probe: the table and the marker on the frame
const probe = await page.evaluate(async () => {
  const v = window.viewer;
  await Promise.all([...v.slices.values()].map((p) => p.catch(() => null)));
  const ms = [], route = [];
  let p;
  for (const [y, x] of [[10, 20], [3, 40], [25, 7]]) {
    const t0 = performance.now();
    p = await v.probe(Number(v.$("frame").value), y, x);
    ms.push(performance.now() - t0);
    const t1 = performance.now();
    await v.json("probe", { path: v.path, video: v.$("video").value, branch: "cond", frame: 0, y, x });
    route.push(performance.now() - t1);
  }
  return { ms, route, cell: p.cell, words: Object.keys(p.words), mean: p.words[Object.keys(p.words)[0]].mean };
});
// playback over the frames for three seconds: pictures drawn per second
const playback = await page.evaluate(async () => {
  const v = window.viewer;
  let drawn = 0;
  const count = () => { drawn += 1; };
  v.root.addEventListener("wcv-drawn", count);
  v.toggle("frame");
  const t0 = performance.now();
  await new Promise((r) => setTimeout(r, 3000));
  v.toggle("frame");
  const seconds = (performance.now() - t0) / 1000;
  v.root.removeEventListener("wcv-drawn", count);
  return { fps: drawn / seconds, drawn };
});
// one picture's pixels at each cell centre (alpha 1, viridis, per frame), for the test to compare with the arrays
await page.evaluate(() => { const v = window.viewer; v.$("cmap").value = "viridis"; v.$("norm").value = "per_frame"; v.$("alpha").value = "1"; });
await change("frame", 3);
const picture = await page.evaluate(() => {
  const v = window.viewer, c = v.$("canvas"), ctx = c.getContext("2d");
  const [, h, w] = v.slice.shape;
  const all = ctx.getImageData(0, 0, c.width, c.height).data;
  const cells = [];
  for (let cy = 0; cy < h; cy++) for (let cx = 0; cx < w; cx++) {
    const x = Math.floor(((cx + 0.5) * c.width) / w), y = Math.floor(((cy + 0.5) * c.height) / h);
    const o = 4 * (y * c.width + x);
    cells.push([all[o], all[o + 1], all[o + 2]]);
  }
  return { step: v.slice.step, token: v.slice.token, frame: 3, range: v.range, width: c.width, height: c.height,
           shape: v.slice.shape, cells };
});
console.log(JSON.stringify({ firstPicture, times, probe, playback, picture, errors }));
await browser.close();
