// Wan Attention Capture: puts the interactive viewer in the Save Attention Maps node; after the node runs it opens
// what was just written, and any saved recording can be opened by its path (<batch>/attention_maps).
import { app } from "../../scripts/app.js";
import { Viewer, STYLE } from "./viewer_core.js";

const VIEWER_HEIGHT = 420;

app.registerExtension({
  name: "wan_attention_capture.viewer",
  async setup() {
    const style = document.createElement("style");
    style.textContent = STYLE;
    document.head.appendChild(style);
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "WanSaveAttention") return;
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = created?.apply(this, arguments);
      const el = document.createElement("div");
      // a fixed height that the node's size includes (nothing hangs below the node); the viewer scrolls inside
      el.style.cssText = `height:${VIEWER_HEIGHT}px;overflow:auto;box-sizing:border-box`;
      this.wanViewer = new Viewer(el);
      this.addDOMWidget("attention_viewer", "viewer", el, {
        serialize: false, getMinHeight: () => VIEWER_HEIGHT, getMaxHeight: () => VIEWER_HEIGHT,
      });
      const [w, h] = this.computeSize();
      this.setSize([Math.max(w, 440), h]);
      return r;
    };
    const executed = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      executed?.apply(this, arguments);
      const report = message?.attention_maps?.[0];
      if (report && this.wanViewer) {
        const path = report.subfolder.split("/").slice(0, -1).join("/");
        this.wanViewer.open(path, report.video_id).catch((e) => console.warn("Wan attention viewer:", e));
      }
    };
  },
});
