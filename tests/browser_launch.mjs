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
