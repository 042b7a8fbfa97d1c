// Drives the standalone viewer in Debian's chromium: opens a recording, reads the canvas, moves the step slider,
// reads it again, keeps a screenshot. Prints one JSON line. Usage: node browser_viewer.mjs URL OUT_PNG
import { launch } from "./browser_launch.mjs";

const [url, shot] = process.argv.slice(2);
const browser = await launch();
const page = await browser.newPage();
const errors = [];
page.on("pageerror", (e) => errors.push(String(e)));
await page.goto(url);
const ready = () => page.waitForFunction(() => document.querySelector("#viewer").dataset.ready === "1", null, { timeout: 30000 });
await ready();
const read = () => page.evaluate(() => {
  const v = window.viewer, c = v.$("canvas"), ctx = c.getContext("2d");
  const [F, h, w] = v.slice.shape;
  const cells = [];
  for (let cy = 0; cy < h; cy++) for (let cx = 0; cx < w; cx++) {
    const x = Math.floor(((cx + 0.5) * c.width) / w), y = Math.floor(((cy + 0.5) * c.height) / h);
    cells.push(Array.from(ctx.getImageData(x, y, 1, 1).data.slice(0, 3)));
  }
  return { step: v.slice.step, frame: Number(v.$("frame").value), shape: v.slice.shape, range: v.range, cells,
           width: c.width, height: c.height };
});
await page.evaluate(() => { const v = window.viewer; v.$("alpha").value = "1"; v.$("cmap").value = "viridis"; v.$("norm").value = "per_frame"; });
await page.evaluate(() => window.viewer.draw());
const before = await read();
const drawn = (step, frame) => page.waitForFunction(([s, f]) => {
  const v = window.viewer;
  return document.querySelector("#viewer").dataset.ready === "1" && v.drawn && v.drawn.step === s && v.drawn.frame === f;
}, [step, frame], { timeout: 30000 });
const last = await page.evaluate(() => { const v = window.viewer; return v.summary.steps[v.summary.steps.length - 1]; });
await page.evaluate(() => { const s = window.viewer.$("step"); s.value = s.max; s.dispatchEvent(new Event("input")); });
await drawn(last, 0);
await page.evaluate(() => { const f = window.viewer.$("frame"); f.value = "1"; f.dispatchEvent(new Event("input")); });
await drawn(last, 1);
const after = await read();
await page.mouse.move(5, 5);
await page.screenshot({ path: shot, fullPage: true });
console.log(JSON.stringify({ before, after, errors }));
await browser.close();
