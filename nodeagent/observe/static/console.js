// nodeagent console: the live part of a page is fetched again every few seconds (server-rendered
// HTML), and a workload's tap arrives as server-rendered rows over an EventSource. The tap table
// keeps at most data-rows rows. No build step: this file is served as it is.
"use strict";

for (const live of document.querySelectorAll("[data-refresh]")) {
  const every = 1000 * Number(live.dataset.every || 3);
  let busy = false;
  setInterval(async () => {
    if (busy) return;
    busy = true;
    try {
      const response = await fetch(live.dataset.refresh, { cache: "no-store" });
      if (response.ok) live.innerHTML = await response.text();
    } catch (e) {
      // the console went away or is restarting: try again next time
    } finally {
      busy = false;
    }
  }, every);
}

const tap = document.getElementById("tap");
if (tap) {
  const rows = tap.querySelector("tbody");
  const routes = document.getElementById("routes");
  const limit = Number(tap.dataset.rows || 50);
  let seen = 0;
  const source = new EventSource(tap.dataset.stream);
  source.addEventListener("tap", (message) => {
    rows.insertAdjacentHTML("afterbegin", message.data);
    while (rows.rows.length > limit) rows.deleteRow(-1);
    tap.dataset.seen = String(++seen);
  });
  source.addEventListener("routes", (message) => {
    routes.innerHTML = message.data;
  });
  const problem = document.getElementById("tap-problem");
  source.addEventListener("problem", (message) => {
    problem.textContent = message.data; // plain text: the latest problem only
  });
}
