// Opens the real ComfyUI frontend in Debian's chromium, loads a UI workflow, reports what the graph holds.
// Usage: node browser_frontend.mjs URL WORKFLOW_JSON OUT_PNG
import { launch, offline } from "./browser_launch.mjs";
import { readFileSync } from "fs";

const [url, workflowPath, shot] = process.argv.slice(2);
const workflow = JSON.parse(readFileSync(workflowPath, "utf8"));
const browser = await launch();
const page = await offline(await browser.newPage({ viewport: { width: 1600, height: 1000 } }));
const errors = [];
const frontend = [];  // errors raised inside the frontend's own bundle (/assets/), no frame of an extension's code
page.on("pageerror", (e) => {
  const text = String(e) + " @ " + String(e.stack || "").split("\n").slice(0, 14).join(" | ");
  const own = /\/extensions\/|wan|viewer/i.test(String(e.stack || e)) || !/\/assets\//.test(String(e.stack || ""));
  (own ? errors : frontend).push(text);
});
page.on("console", (m) => { if (m.type() === "error" && /wan|viewer/i.test(m.text())) errors.push(m.text()); });
await page.goto(url);
await page.waitForFunction(() => (window.app || window.comfyAPI?.app?.app) && (window.app || window.comfyAPI?.app?.app).graph && (window.app || window.comfyAPI?.app?.app).extensionManager !== undefined, null, { timeout: 90000 });
await page.waitForFunction(() => ((window.app || window.comfyAPI?.app?.app).extensions || []).some((e) => e.name === "wan_attention_capture.viewer"), null, { timeout: 30000 });
await page.waitForTimeout(1500);
const startup = errors.splice(0);  // errors the frontend raises on its own, before our workflow is loaded
const result = await page.evaluate(async (wf) => {
  await (window.app || window.comfyAPI?.app?.app).loadGraphData(wf);
  const nodes = (window.app || window.comfyAPI?.app?.app).graph._nodes || (window.app || window.comfyAPI?.app?.app).graph.nodes;
  const save = nodes.find((n) => n.type === "WanSaveAttention");
  return {
    types: nodes.map((n) => n.type).sort(),
    links: Object.keys((window.app || window.comfyAPI?.app?.app).graph.links || {}).length || ((window.app || window.comfyAPI?.app?.app).graph.links?.size ?? 0),
    saveWidgets: save ? save.widgets.map((w) => w.name) : null,
    hasViewer: !!(save && save.wanViewer),
  };
}, workflow);
await page.keyboard.press("Escape");  // the first-run template dialog
await page.waitForTimeout(500);
await page.screenshot({ path: shot });
console.log(JSON.stringify({ ...result, errors, startup, frontend }));
await browser.close();
