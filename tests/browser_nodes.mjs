// The pack's nodes in the real ComfyUI frontend at default zoom: each one created, laid out in columns, measured
// and shot. Prints one JSON line. Usage: node browser_nodes.mjs URL OUT_PNG
import { launch, offline } from "./browser_launch.mjs";

const [url, shot] = process.argv.slice(2);
const W = 1920, H = 1200;
const browser = await launch();
const page = await offline(await browser.newPage({ viewport: { width: W, height: H } }));
const errors = [];
page.on("pageerror", (e) => errors.push(String(e) + " @ " + String(e.stack || "").split("\n").slice(0, 12).join(" | ")));
await page.goto(url);
await page.waitForFunction(() => (window.app || window.comfyAPI?.app?.app) && (window.app || window.comfyAPI?.app?.app).graph && window.LiteGraph, null, { timeout: 90000 });
await page.waitForFunction(() => ((window.app || window.comfyAPI?.app?.app).extensions || []).some((e) => e.name === "wan_attention_capture.viewer"), null, { timeout: 30000 });
await page.waitForTimeout(1500);
await page.keyboard.press("Escape");  // the first-run template dialog
const startup = errors.splice(0);  // errors the frontend raises on its own at startup
const result = await page.evaluate(async () => {
  const app = (window.app || window.comfyAPI?.app?.app), LG = window.LiteGraph;
  app.graph.clear();
  const defs = await (await fetch("/object_info")).json();
  const types = Object.keys(defs).filter((t) => defs[t].category?.startsWith("Wan Attention Capture")
    && !defs[t].deprecated).sort();
  const canvasEl = app.canvas.canvas, rect = canvasEl.getBoundingClientRect();
  app.canvas.ds.scale = 1;  // default zoom
  app.canvas.ds.offset = [0, 0];
  const margin = 20, title = LG.NODE_TITLE_HEIGHT || 30;
  let x = margin, y = margin + title, colWidth = 0;
  const placed = [];
  for (const t of types) {
    const node = LG.createNode(t);
    app.graph.add(node);
    const [w, h] = node.size;
    if (y + h > rect.height - margin) { x += colWidth + margin; y = margin + title; colWidth = 0; }
    node.pos = [x, y];
    y += h + title + margin;
    colWidth = Math.max(colWidth, w);
    placed.push(node);
  }
  app.canvas.setDirty(true, true);
  app.canvas.draw(true, true);
  await new Promise((r) => setTimeout(r, 800));  // DOM widgets follow the canvas on the next frames
  const domOutside = [];
  for (const n of placed) {
    for (const w of n.widgets || []) {
      if (!w.element) continue;
      const e = w.element.getBoundingClientRect();
      const bottom = rect.top + n.pos[1] + n.size[1], right = rect.left + n.pos[0] + n.size[0];
      if (e.height > 0 && (e.bottom > bottom + 2 || e.right > right + 2)) {
        domOutside.push({ type: n.type, widget: w.name, element: [e.left, e.top, e.right, e.bottom], node: [right, bottom] });
      }
    }
  }
  return {
    domOutside,
    viewport: [rect.width, rect.height],
    nodes: placed.map((n) => ({ type: n.type, title: n.title, pos: Array.from(n.pos), size: Array.from(n.size), inputs: n.inputs.length,
      widgets: (n.widgets || []).length,
      box: [n.pos[0], n.pos[1] - title, n.pos[0] + n.size[0], n.pos[1] + n.size[1]] })),
  };
});
await page.waitForTimeout(800);
await page.screenshot({ path: shot });
console.log(JSON.stringify({ ...result, errors, startup }));
await browser.close();
