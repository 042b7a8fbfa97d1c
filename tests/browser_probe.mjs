// The viewer's tools in Debian's chromium: a click on the frame probes that point over steps, playback advances
// frames, words side by side, the legend bar, PNG export. Prints one JSON line. Usage: node browser_probe.mjs URL OUT_PNG
import { launch } from "./browser_launch.mjs";

const [url, shot] = process.argv.slice(2);
const browser = await launch();
const page = await browser.newPage({ viewport: { width: 1200, height: 1400 } });
const errors = [];
page.on("pageerror", (e) => errors.push(String(e)));
await page.goto(url);
await page.waitForFunction(() => document.querySelector("#viewer").dataset.ready === "1", null, { timeout: 30000 });
// a real click on latent frame 1, cell (2, 3) of the canvas
await page.evaluate(() => { const f = window.viewer.$("frame"); f.value = "1"; f.dispatchEvent(new Event("input")); });
await page.waitForFunction(() => window.viewer.drawn && window.viewer.drawn.frame === 1 &&
  document.querySelector("#viewer").dataset.ready === "1", null, { timeout: 30000 });
const box = await page.evaluate(() => {
  const r = window.viewer.$("canvas").getBoundingClientRect();
  const [, h, w] = window.viewer.slice.shape;
  return { x: r.left + ((3 + 0.5) * r.width) / w, y: r.top + ((2 + 0.5) * r.height) / h };
});
await page.mouse.click(box.x, box.y);
await page.waitForFunction(() => document.querySelector("#viewer").dataset.probed === "1", null, { timeout: 30000 });
const probe = await page.evaluate(() => ({
  data: window.viewer.probed,
  table: [...document.querySelectorAll(".wcv-probe-table tr[data-word]")].map((tr) =>
    [tr.dataset.word, [...tr.querySelectorAll("td")].slice(1).map((td) => Number(td.textContent))]),
  lines: document.querySelectorAll(".wcv-chart polyline").length,
}));
// playback over frames: the slider moves on its own, and the picture follows
const seen = new Set();
await page.click(".wcv-play-frames");
for (let i = 0; i < 40 && seen.size < 3; i++) {
  await page.waitForTimeout(150);
  seen.add(await page.evaluate(() => window.viewer.drawn.frame));
}
const playLabel = await page.evaluate(() => window.viewer.$("play-frames").textContent);
await page.click(".wcv-play-frames");  // pause
await page.waitForTimeout(600);
const pausedAt = await page.evaluate(() => window.viewer.drawn.frame);
await page.waitForTimeout(900);
const stillAt = await page.evaluate(() => window.viewer.drawn.frame);
// words side by side, the legend bar, the export
await page.evaluate(() => { const c = window.viewer.$("compare-on"); c.checked = true; c.dispatchEvent(new Event("input")); });
await page.waitForFunction(() => window.viewer.compared && document.querySelector("#viewer").dataset.ready === "1",
  null, { timeout: 30000 });
const rest = await page.evaluate(() => {
  const v = window.viewer, bar = v.$("bar").getContext("2d");
  return {
    compare: [...document.querySelectorAll(".wcv-compare canvas")].map((c) => c.dataset.word),
    legendText: v.$("legend-text").textContent,
    barEnds: [Array.from(bar.getImageData(0, 5, 1, 1).data.slice(0, 3)),
              Array.from(bar.getImageData(v.$("bar").width - 1, 5, 1, 1).data.slice(0, 3))],
    png: v.exportPNG(), width: v.$("canvas").width, height: v.$("canvas").height,
    cmap: v.$("cmap").value,
  };
});
await page.screenshot({ path: shot, fullPage: true });
console.log(JSON.stringify({ probe, seen: [...seen], playLabel, pausedAt, stillAt, ...rest, errors }));
await browser.close();
