// Debian's chromium, headless, for the browser_*.mjs tests (CHROMIUM names another binary); one set of flags for
// all of them: no sandbox, GPU, QUIC or background network traffic.
import { chromium } from "playwright-core";

export function launch() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
}

// The tests run offline: the editor of frontend 1.58.1 (hiddenswitch 0.12.1) loads its code editor (ace) from a CDN
// during setup, and a failed load leaves the editor without a graph. Every request that leaves the machine gets an
// inert script instead (an object that answers any property or call with itself), so the editor sets up as it would
// online; the page under test is served by the local ComfyUI and is untouched.
const INERT = "(function(){const h={get:(t,k)=>k===Symbol.toPrimitive||k==='then'?undefined:p,apply:()=>p,"
  + "construct:()=>p};const p=new Proxy(function(){},h);window.ace=window.ace||p;})();";

export async function offline(page) {
  await page.route(/^https?:\/\/(?!(127\.0\.0\.1|localhost)[:/])/, (route) =>
    route.fulfill({ status: 200, contentType: "application/javascript", body: INERT }));
  return page;
}
