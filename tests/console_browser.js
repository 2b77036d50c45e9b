// Drives Debian's chromium (headless, through playwright-core) over the nodeagent console while
// the lab carries live traffic; prints what the pages showed as one JSON line for
// tests/test_console_browser.py to judge. Usage: node console_browser.js BASE_URL SCREENSHOT_DIR
"use strict";
const { chromium } = require(process.env.PLAYWRIGHT_CORE);

const [base, shots] = process.argv.slice(2);
const WAIT_MS = 20000;

// The text of every cell of the rows `selector` finds.
function texts(page, selector) {
  return page.$$eval(selector, (rows) => rows.map((r) => Array.from(r.cells, (c) => c.textContent.trim())));
}

// Waits until the live table's row named `name` shows requests per second (4th column), as the
// page refreshes itself; then the table's rows.
async function liveRows(page, table, name) {
  await page.waitForFunction(([table, name]) => {
    const row = Array.from(document.querySelectorAll(`table.${table} tbody tr`))
      .find((r) => r.cells[0].textContent.trim() === name);
    return row && Number(row.cells[3].textContent) > 0;
  }, [table, name]);
  return texts(page, `table.${table} tbody tr`);
}

(async () => {
  const browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-background-networking"],
  });
  const seen = { console: [] };
  try {
    const page = await browser.newPage();
    page.setDefaultTimeout(WAIT_MS);
    page.on("console", (message) => seen.console.push(message.text()));
    page.on("pageerror", (error) => seen.console.push(`page error: ${error.message}`));

    // Overview: the namespace's live numbers (refreshed in place until RPS shows), the call graph.
    await page.goto(base + "/");
    seen.namespace = await liveRows(page, "namespaces", "default");
    seen.graph = {
      nodes: await page.$$eval("svg.graph .node text.name", (t) => t.map((x) => x.textContent)),
      secured: await page.$$eval("svg.graph .arc.secured title", (t) => t.map((x) => x.textContent)),
    };
    await page.screenshot({ path: `${shots}/overview.png`, fullPage: true });

    // The namespace's page, by its link: workloads with meshed pods and live rates.
    await page.click("table.namespaces a >> text=default");
    seen.workloads = await liveRows(page, "workloads", "app/http");

    // A workload's page: its numbers, routes and live tap, which keeps coming.
    await page.click("table.workloads a >> text=app/http");
    await page.waitForFunction(() => Number(document.getElementById("tap").dataset.seen || 0) >= 3);
    const first = Number(await page.$eval("#tap", (t) => t.dataset.seen));
    await page.waitForFunction((n) => Number(document.getElementById("tap").dataset.seen) > n + 5, first);
    await page.waitForSelector("#routes table.routes tbody tr");
    seen.tap = {
      first,
      later: Number(await page.$eval("#tap", (t) => t.dataset.seen)),
      rows: await texts(page, "#tap tbody tr"),
    };
    seen.routes = await texts(page, "#routes table.routes tbody tr");
    seen.golden = await texts(page, "table.golden tbody tr");
    seen.source = await page.$eval("#live", (live) => live.textContent);
    seen.pods = await texts(page, "table.pods tbody tr");
    await page.screenshot({ path: `${shots}/workload.png`, fullPage: true });

    // Edges.
    await page.click("header nav a >> text=Edges");
    await page.waitForSelector("table.edges tbody tr");
    seen.edges = await texts(page, "table.edges tbody tr");
  } catch (error) {
    seen.error = String(error);
  } finally {
    await browser.close();
  }
  console.log(JSON.stringify(seen));
})();
