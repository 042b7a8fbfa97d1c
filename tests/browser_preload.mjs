// The standalone viewer on a real-size recording in Debian's chromium, while its decoded frames still preload: each
// step change's time from the input to the drawn picture, and which frame requests started in that time (the user's
// request goes first: none should). Prints one JSON line. Usage: node browser_preload.mjs URL
import { launch } from "./browser_launch.mjs";

const [url] = process.argv.slice(2);
const browser = await launch();
const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
const errors = [];
page.on("pageerror", (e) => errors.push(String(e)));
await page.goto(url);
await page.waitForFunction(() => window.viewer && window.viewer.firstDrawnAt, null, { timeout: 60000 });
const result = await page.evaluate(async () => {
  const v = window.viewer, total = (v.summary.frames_saved || []).length;
  performance.setResourceTimingBufferSize(10000);
  const changes = [];
  for (const step of [1, 2, 3, 4, 5, 6]) {
    await new Promise((r) => setTimeout(r, 40));  // the preload goes on between the user's changes
    const now = performance.now();
    const loaded = performance.getEntriesByType("resource").filter((e) => e.name.includes("/wan_capture/frame?")
      && e.responseEnd > 0 && e.responseEnd < now).length;  // frames already in
    const done = new Promise((r) => v.root.addEventListener("wcv-drawn", r, { once: true }));
    const t0 = performance.now();
    v.$("step").value = String(step);
    v.$("step").dispatchEvent(new Event("input"));
    await done;
    const t1 = performance.now();
    const started = performance.getEntriesByType("resource").filter((e) => e.name.includes("/wan_capture/frame?")
      && e.startTime > t0 && e.startTime < t1).length;
    changes.push({ ms: t1 - t0, framesLoaded: loaded, framesStartedMeanwhile: started });
  }
  const deadline = performance.now() + 120000;  // the preload goes on to the last frame
  while (Object.keys(v.frames).length < total && performance.now() < deadline) await new Promise((r) => setTimeout(r, 50));
  const decoded = (await Promise.all(Object.values(v.frames))).filter(Boolean).length;
  return { total, changes, framesAtEnd: decoded };
});
console.log(JSON.stringify({ ...result, errors }));
await browser.close();
