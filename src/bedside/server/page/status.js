// The bedside status page: one Server-Sent Events stream (/status/stream) of snapshots, read with
// fetch so a bearer token can go in a header (EventSource cannot send one). Everything is drawn
// with textContent and DOM nodes: no HTML is built from data.
"use strict";

const TOKEN_KEY = "bedside-token";
const RISK_CLASS = { low: "low", "low-medium": "low-medium", medium: "medium", high: "high" };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(child == null ? "" : String(child)));
  }
  return node;
}

function fmt(value, digits) {
  return value == null ? "–" : Number(value).toFixed(digits);
}

function timeOf(epochSeconds) {
  return new Date(epochSeconds * 1000).toLocaleTimeString();
}

function drawBeds(beds) {
  const box = document.getElementById("beds");
  document.getElementById("beds-count").textContent = beds.length ? `(${beds.length})` : "";
  if (!beds.length) {
    box.replaceChildren(el("p", { class: "muted" }, "No bed has sent vital signs yet."));
    return;
  }
  box.replaceChildren(
    ...beds.map((bed) => {
      const card = el("div", { class: `bed ${RISK_CLASS[bed.news2_risk] || ""}`, "data-bed": bed.bed });
      card.append(el("div", { class: "name" }, bed.bed));
      card.append(el("div", { class: "news2", title: "NEWS2" }, bed.news2 == null ? "–" : bed.news2));
      const risk = bed.risk == null ? "model risk –" : `model risk ${(bed.risk * 100).toFixed(0)} %`;
      card.append(el("div", {}, `NEWS2 ${bed.news2_risk || "not scored yet"} · qSOFA ${bed.qsofa ?? "–"}`));
      card.append(el("div", { class: "muted" }, risk));
      if (bed.degraded) card.append(el("div", { class: "degraded" }, "AI degraded: rules only"));
      if (bed.scored_at) card.append(el("div", { class: "muted" }, `scored ${timeOf(bed.scored_at)}`));
      return card;
    }),
  );
}

function drawAlerts(alerts) {
  const list = document.getElementById("alerts");
  if (!alerts.length) {
    list.replaceChildren(el("li", { class: "muted" }, "No alerts."));
    return;
  }
  list.replaceChildren(
    ...alerts.map((a) =>
      el(
        "li",
        { class: `level-${a.level}`, "data-bed": a.bed },
        `${timeOf(a.time)} · bed ${a.bed} · level ${a.level} · ${a.reason}`,
        a.degraded ? " (AI degraded)" : "",
        ` — ${a.source}`,
      ),
    ),
  );
}

function histogram(hist) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "hist");
  const counts = hist ? hist.counts : [];
  const width = 8 * Math.max(counts.length, 1);
  svg.setAttribute("width", String(width));
  svg.setAttribute("height", "34");
  const top = Math.max(1, ...counts);
  counts.forEach((n, i) => {
    const h = n ? Math.max(2, Math.round((30 * Math.log1p(n)) / Math.log1p(top))) : 0;
    const bar = document.createElementNS(ns, "rect");
    bar.setAttribute("x", String(i * 8));
    bar.setAttribute("y", String(32 - h));
    bar.setAttribute("width", "7");
    bar.setAttribute("height", String(h));
    const title = document.createElementNS(ns, "title");
    const bound = i < hist.le_ms.length ? `≤ ${hist.le_ms[i]} ms` : `> ${hist.le_ms[hist.le_ms.length - 1]} ms`;
    title.textContent = `${bound}: ${n}`;
    bar.append(title);
    svg.append(bar);
  });
  return svg;
}

function drawModels(models) {
  const body = document.querySelector("#models tbody");
  body.replaceChildren(
    ...models.map((m) => {
      const depth = Object.entries(m.queue_depth || {})
        .filter(([, n]) => n)
        .map(([p, n]) => `${p}: ${n}`)
        .join(", ");
      const drift = m.drift ? m.drift.state + (m.drift.drifted.length ? ` (${m.drift.drifted.join(", ")})` : "") : "–";
      return el(
        "tr",
        { "data-model": m.name },
        el("td", {}, m.name),
        el("td", {}, m.version),
        el("td", { class: `state-${m.state}` }, m.state),
        el("td", { class: "num" }, m.ok),
        el("td", { class: "num" }, `${m.failed} / ${m.rejected}`),
        el("td", { class: "num" }, fmt(m.p50_ms, 3)),
        el("td", { class: "num" }, fmt(m.p99_ms, 3)),
        el("td", {}, depth || "empty"),
        el("td", { class: m.drift ? `drift-${m.drift.state}` : "" }, drift),
        el("td", {}, histogram(m.histogram)),
      );
    }),
  );
}

function drawStreams(streams, updates) {
  const facts = document.getElementById("streams");
  const rows = [];
  if (streams) {
    rows.push(["HL7 messages accepted / refused", `${streams.hl7_accepted} / ${streams.hl7_refused}`]);
    rows.push(["Beds scored by the model / by rules only", `${streams.scored_by_model} / ${streams.degraded_to_rules}`]);
    rows.push(["ECG windows (over budget)", `${streams.ecg_windows} (${streams.ecg_over_budget})`]);
    rows.push(["ECG p99 ms / budget", `${fmt(streams.ecg_p99_ms, 2)} / ${streams.ecg_budget_ms}`]);
  } else {
    rows.push(["Streams", "off"]);
  }
  facts.replaceChildren(...rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
  const list = document.getElementById("updates");
  if (!updates) {
    list.replaceChildren(el("li", { class: "muted" }, "Over-the-air updates: not configured on this box."));
    return;
  }
  const models = Object.entries(updates.models || {});
  list.replaceChildren(
    ...(models.length
      ? models.map(([name, u]) =>
          el("li", {}, `${name}: ${u.now || "–"}; last change ${u.last || "none"}`, u.version ? ` v${u.version}` : "",
            u.reason ? ` (${u.reason})` : ""),
        )
      : [el("li", { class: "muted" }, "Update agent: no pass yet.")]),
  );
}

function draw(snapshot) {
  document.getElementById("server").textContent = `v${snapshot.server_version}`;
  document.getElementById("clock").textContent = `as of ${timeOf(snapshot.time)}`;
  drawBeds(snapshot.beds || []);
  drawAlerts(snapshot.alerts || []);
  drawModels(snapshot.models || []);
  drawStreams(snapshot.streams, snapshot.updates);
  document.body.dataset.snapshots = String(Number(document.body.dataset.snapshots || 0) + 1);
}

function setLink(up, text) {
  const link = document.getElementById("link");
  link.className = `link ${up ? "up" : "down"}`;
  link.textContent = text;
}

function askToken(message) {
  const form = document.getElementById("login");
  form.hidden = false;
  document.getElementById("login-error").textContent = message || "";
  setLink(false, "needs a token");
}

async function follow() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  let response;
  try {
    response = await fetch("/status/stream", { headers, cache: "no-store" });
  } catch (err) {
    setLink(false, "disconnected, retrying…");
    setTimeout(follow, 2000);
    return;
  }
  if (response.status === 401 || response.status === 403) {
    const doc = await response.json().catch(() => ({}));
    askToken(token ? doc.error || "refused" : "");
    return;
  }
  if (!response.ok || !response.body) {
    setLink(false, `server answered ${response.status}, retrying…`);
    setTimeout(follow, 5000);
    return;
  }
  document.getElementById("login").hidden = true;
  setLink(true, "live");
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let event = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("event: ")) event = line.slice(7);
          else if (line.startsWith("data: ")) data.push(line.slice(6));
        }
        if (event === "snapshot" && data.length) draw(JSON.parse(data.join("\n")));
      }
    }
  } catch (err) {
    // the stream broke (server restart, network): reconnect below
  }
  setLink(false, "disconnected, retrying…");
  setTimeout(follow, 2000);
}

document.getElementById("login").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, document.getElementById("token").value.trim());
  follow();
});

follow();
