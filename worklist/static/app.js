// The worklist page: the queue in reading order, kept live from the server's events, usable by keyboard.
// Plain JavaScript, no build step, nothing from outside this server (it must work offline).
"use strict";

(() => {
  const REFRESH_MS = 7000; // re-read the queue this often anyway: studies that become overdue must rise
  const PANELS_MS = 30000; // waits, agreement and dead letters
  const RECONNECT_MS = 10000; // after the server refused the event stream outright
  const CLASSES = ["STAT", "URGENT", "UNSCORED", "ROUTINE"];
  const STUDY_EVENTS = ["study", "claimed", "released", "read", "dismissed", "reopened", "prioritised", "feedback"];

  const state = {
    items: [],
    total: 0,
    signature: "",
    selected: null, // key of the row the keyboard is on
    details: null, // key shown in the details panel
    lastEventId: null,
    clockOffset: 0, // server clock minus ours, so waiting times count from the server's view
    scoring: null,
    serverDown: false,
    source: null,
    timers: {},
    queueRequests: 0, // numbers the queue reads, so that a slow old answer never replaces a newer one
    queueShown: 0,
  };

  const $ = (id) => document.getElementById(id);

  // Helpers -------------------------------------------------------------------------------------------------

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(props || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = value;
      else if (name === "data") Object.assign(node.dataset, value);
      else if (name in node && typeof value !== "string") node[name] = value;
      else node.setAttribute(name, value === true ? "" : value);
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  }

  function enc(key) {
    return encodeURIComponent(key);
  }

  function serverNow() {
    return Date.now() + state.clockOffset;
  }

  // "4m 05s" while it counts; `coarse` drops the seconds past a minute (the figures panel).
  function fmtDuration(seconds, coarse) {
    if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "—";
    const s = Math.max(0, Math.floor(seconds));
    const d = Math.floor(s / 86400);
    const h = Math.floor((s % 86400) / 3600);
    const m = Math.floor((s % 3600) / 60);
    const sec = s % 60;
    if (d > 0) return `${d}d ${h}h`;
    if (h > 0) return `${h}h ${String(m).padStart(2, "0")}m`;
    if (m > 0) return coarse ? `${m}m` : `${m}m ${String(sec).padStart(2, "0")}s`;
    return `${sec}s`;
  }

  function fmtScore(score) {
    return score === null || score === undefined ? "—" : score.toFixed(2);
  }

  function fmtTime(iso) {
    if (!iso) return "—";
    const date = new Date(iso);
    const sameDay = date.toDateString() === new Date(serverNow()).toDateString();
    return sameDay
      ? date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" })
      : date.toLocaleString([], { dateStyle: "short", timeStyle: "short" });
  }

  function shortKey(key) {
    return key.length > 22 ? `…${key.slice(-20)}` : key;
  }

  function modelText(model) {
    return model ? `${model.name || "?"} ${model.version || ""}`.trim() : "—";
  }

  function debounce(name, fn, ms) {
    clearTimeout(state.timers[name]);
    state.timers[name] = setTimeout(fn, ms);
  }

  function reader() {
    return $("reader").value.trim();
  }

  function toast(message) {
    const box = $("toast");
    box.textContent = message;
    box.hidden = false;
    debounce("toast", () => {
      box.hidden = true;
    }, 6000);
  }

  async function api(path, options) {
    let response;
    try {
      response = await fetch(path, { cache: "no-store", headers: { Accept: "application/json" }, ...options });
    } catch (error) {
      setServerDown(true);
      throw error;
    }
    setServerDown(false);
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      const detail = typeof body.detail === "string" ? body.detail : `the server answered ${response.status}`;
      const error = new Error(detail);
      error.status = response.status;
      throw error;
    }
    return body;
  }

  function setServerDown(down) {
    if (state.serverDown !== down) {
      state.serverDown = down;
      renderBanner();
    }
  }

  // The queue -----------------------------------------------------------------------------------------------

  function filters() {
    const params = new URLSearchParams();
    params.set("status", $("filter-status").value);
    for (const box of document.querySelectorAll('input[name="priority"]:checked')) params.append("priority", box.value);
    const finding = $("filter-finding").value.trim();
    if (finding) params.set("finding", finding);
    params.set("limit", "500");
    return params;
  }

  function filtered() {
    const params = filters();
    return params.get("status") !== "open" || params.has("priority") || params.has("finding");
  }

  async function refreshQueue() {
    debounce("queue", refreshQueue, REFRESH_MS); // the next periodic read, whatever triggered this one
    const request = ++state.queueRequests;
    try {
      const page = await api(`/api/studies?${filters()}`);
      if (request < state.queueShown) return;
      state.queueShown = request;
      state.clockOffset = Date.parse(page.now) - Date.now();
      state.scoring = page.scoring;
      renderBanner();
      renderQueue(page.items, page.total);
    } catch (error) {
      if (error.status) toast(`The queue could not be read: ${error.message}`);
    }
  }

  function scheduleQueue() {
    debounce("queue", refreshQueue, 250);
  }

  function renderQueue(items, total) {
    const signature = JSON.stringify(items);
    state.total = total;
    $("queue-count").textContent = items.length < total ? `(${items.length} of ${total})` : `(${total})`;
    $("queue-empty").hidden = items.length > 0;
    rememberFindings(items);
    if (signature === state.signature) {
      tick();
      return;
    }
    const active = document.activeElement;
    const body = $("queue-body");
    const focusRow = active && body.contains(active) ? active.closest("tr") : null;
    const focusKey = focusRow ? focusRow.dataset.key : null;
    const focusAction = focusRow && active !== focusRow ? active.dataset.action : null;
    const focusIndex = focusRow ? [...body.rows].indexOf(focusRow) : -1;

    state.items = items;
    state.signature = signature;
    body.replaceChildren(...items.map(rowFor));
    if (!items.some((item) => item.key === state.selected)) {
      state.selected = items.length ? items[Math.min(Math.max(focusIndex, 0), items.length - 1)].key : null;
    }
    for (const row of body.rows) {
      const selected = row.dataset.key === state.selected;
      row.tabIndex = selected ? 0 : -1;
      row.setAttribute("aria-selected", String(selected));
    }
    if (focusRow) {
      const row = rowByKey(focusKey) || rowByKey(state.selected);
      // The same control only on the same study: a double click must never act on the next one.
      const same = row && row.dataset.key === focusKey && focusAction;
      const control = same ? row.querySelector(`[data-action="${focusAction}"]`) : null;
      if (control && !control.disabled) control.focus();
      else if (row) row.focus();
    }
    tick();
  }

  function rowByKey(key) {
    if (key === null) return null;
    for (const row of $("queue-body").rows) if (row.dataset.key === key) return row;
    return null;
  }

  function itemByKey(key) {
    return state.items.find((item) => item.key === key) || null;
  }

  function rowFor(item) {
    const open = item.status === "unread" || item.status === "claimed";
    const priority = item.priority || "UNSCORED";
    const label = `study ${item.position || shortKey(item.accession || item.key)}`;
    const badge = el("span", { class: `badge p-${priority}`, text: priority });
    if (item.person_priority) {
      badge.append(el("span", { class: "set-by", text: " ✎", "aria-hidden": "true" }));
      badge.title = `Set by a reader (the AI said ${item.ai_priority || "nothing yet"})`;
    }
    let finding = item.top_finding || "—";
    if (!item.model) finding = item.images.failed && !item.images.pending ? "not scored" : "awaiting score";
    const waiting = el(
      "td",
      { class: "waiting" },
      el("span", { class: "wait" }),
      el("span", { class: "overdue-tag", text: "OVERDUE" }),
    );
    // The status is said only when it is not the usual "unread", under the study's accession.
    let statusText = item.status === "unread" ? null : item.status;
    if (item.status === "claimed" && item.claimed_by) statusText = `claimed by ${item.claimed_by}`;
    if (!open && item.closed_by) statusText = `${item.status} by ${item.closed_by}`;

    const actions = el("div", { class: "buttons" });
    const button = (action, text, extra) =>
      el("button", { type: "button", data: { action }, text, "aria-label": `${text} — ${label}`, ...extra });
    if (open) {
      if (item.status === "claimed" && item.claimed_by === reader()) actions.append(button("release", "Release"));
      else actions.append(button("claim", "Claim"));
      actions.append(button("read", "Read"), button("dismiss", "Dismiss"));
    } else {
      actions.append(button("reopen", "Reopen"));
    }
    // Agree / disagree with the AI: symbols to fit the row, named in full for screen readers and on hover.
    const verdict = (action, symbol, text) =>
      el("button", {
        type: "button",
        class: `verdict ${action}`,
        data: { action },
        text: symbol,
        title: item.model ? `${text} with the AI's finding` : "No AI finding to judge yet",
        disabled: !item.model,
        "aria-label": `${text} with the AI — ${label}`,
      });
    actions.append(verdict("agree", "✓", "Agree"), verdict("disagree", "✗", "Disagree"));

    return el(
      "tr",
      {
        class: open ? "" : "closed",
        data: { key: item.key, priority, overdue: String(Boolean(item.overdue)), status: item.status },
        tabIndex: -1,
        "aria-selected": "false",
      },
      el("td", { class: "num", text: item.position ? String(item.position) : "—" }),
      el("td", {}, badge),
      el(
        "td",
        { class: "finding" },
        el("span", { text: finding }),
        item.model ? el("small", { class: "model", text: modelText(item.model) }) : null,
      ),
      el("td", { class: "num", text: fmtScore(item.score) }),
      waiting,
      el(
        "td",
        { class: "study" },
        el("span", { class: "id", text: shortKey(item.accession || item.key), title: item.key }),
        statusText ? el("small", { class: `status ${item.status}`, text: statusText }) : null,
      ),
      el("td", { class: "actions" }, actions),
    );
  }

  // Every second: the waiting times count on, and a study past its maximum wait is marked (and the queue
  // re-read, so that it rises) without waiting for the next periodic read.
  function tick() {
    const now = serverNow();
    let newlyOverdue = false;
    for (const row of $("queue-body").rows) {
      const item = itemByKey(row.dataset.key);
      if (!item) continue;
      const open = item.status === "unread" || item.status === "claimed";
      const end = open ? now : Date.parse(item.closed_at || "") || now;
      row.querySelector(".wait").textContent = fmtDuration((end - Date.parse(item.arrived_at)) / 1000);
      const overdue = open && (item.overdue || now >= Date.parse(item.due_at));
      if (overdue && !item.overdue && row.dataset.overdue !== "true") newlyOverdue = true;
      row.dataset.overdue = String(overdue);
      row.classList.toggle("overdue", overdue);
    }
    if (newlyOverdue) scheduleQueue();
  }

  function rememberFindings(items) {
    const list = $("findings");
    const known = new Set([...list.options].map((option) => option.value));
    for (const item of items) {
      if (item.top_finding && !known.has(item.top_finding)) {
        known.add(item.top_finding);
        list.append(el("option", { value: item.top_finding }));
      }
    }
  }

  // Actions -------------------------------------------------------------------------------------------------

  async function act(key, action, extra) {
    const name = reader();
    if (action === "claim" && !name) {
      toast("Type your name under Reader to claim a study.");
      $("reader").focus();
      return;
    }
    let path = action;
    const body = { ...(name ? { reader: name } : {}), ...extra };
    if (action === "agree" || action === "disagree") {
      path = "feedback";
      body.verdict = action;
    }
    try {
      const study = await api(`/api/studies/${enc(key)}/${path}`, {
        method: "POST",
        headers: { Accept: "application/json", "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
      if (action === "agree" || action === "disagree") toast(`Recorded: you ${action} with the AI.`);
      if (state.details === key) renderDetails(study);
    } catch (error) {
      toast(`Could not ${action === "read" ? "mark it read" : action}: ${error.message}`);
    }
    await refreshQueue();
    debounce("panels", refreshPanels, 500);
  }

  // Details -------------------------------------------------------------------------------------------------

  async function openDetails(key, focusPanel) {
    state.details = key;
    try {
      renderDetails(await api(`/api/studies/${enc(key)}`));
      if (focusPanel) $("details").focus();
    } catch (error) {
      toast(`The study could not be read: ${error.message}`);
    }
  }

  function closeDetails() {
    state.details = null;
    $("details-body").hidden = true;
    $("details-empty").hidden = false;
    const row = rowByKey(state.selected);
    if (row) row.focus();
  }

  function renderDetails(study) {
    if (!study || study.key !== state.details) return;
    $("details-empty").hidden = true;
    $("details-body").hidden = false;
    $("details-title").textContent = `Study ${shortKey(study.accession || study.key)}`;

    const image = $("thumbnail");
    const source = `/api/studies/${enc(study.key)}/thumbnail?images=${study.images.total}`;
    if (image.dataset.source !== source) {
      image.hidden = true;
      image.dataset.source = source;
      image.src = source;
    }

    const fields = [
      ["Study UID", study.study_uid || "—"],
      ["Accession", study.accession || "—"],
      [
        "Priority",
        study.person_priority
          ? `${study.person_priority} (set by ${study.person_priority_by || "a reader"}; AI: ${study.ai_priority || "—"})`
          : study.priority || "UNSCORED",
      ],
      ["Finding", study.top_finding || "—"],
      ["Score", fmtScore(study.score)],
      ["Model", modelText(study.model)],
      ["Arrived", fmtTime(study.arrived_at)],
      ["Due", `${fmtTime(study.due_at)}${study.overdue ? " (overdue)" : ""}`],
      ["Status", study.claimed_by ? `${study.status} (${study.claimed_by})` : study.status],
    ];
    if (study.closed_by) fields.push(["Closed by", study.closed_by]);
    const priority = $("details-priority");
    if (document.activeElement !== priority) priority.value = study.person_priority || "";
    $("details-fields").replaceChildren(
      ...fields.flatMap(([name, value]) => [el("dt", { text: name }), el("dd", { text: value })]),
    );

    $("details-images").replaceChildren(
      ...study.image_list.map((img) => {
        let text;
        if (img.state === "scored") {
          const scores = Object.entries(img.scores || {})
            .map(([label, score]) => `${label} ${score.toFixed(2)}`)
            .join(", ");
          text = `${img.priority}: ${img.top_finding || "no finding"} — ${scores}`;
        } else if (img.state === "failed") {
          const error = img.error || {};
          text = `Could not be scored (${error.stage}/${error.code}): ${error.reason || ""}`;
        } else {
          text = "Waiting for the scorer.";
        }
        return el("li", { class: `image ${img.state}` }, el("span", { text }), " ",
          el("small", { text: `arrived ${fmtTime(img.arrived_at)}` }));
      }),
    );

    const feedback = study.feedback.map((f) =>
      el("li", { text: `${f.reader || "someone"} ${f.verdict === "agree" ? "agrees" : "disagrees"} with ` +
        `${f.finding || "no finding"} (${modelText(f.model)}), ${fmtTime(f.at)}` }),
    );
    $("details-feedback").replaceChildren(...(feedback.length ? feedback : [el("li", { text: "None yet." })]));
  }

  // Side panels ---------------------------------------------------------------------------------------------

  function renderDeadLetters(items, total) {
    $("dead-letters-count").textContent = total ? `(${total})` : "";
    $("dead-letters-empty").hidden = items.length > 0;
    $("dead-letters-list").replaceChildren(
      ...items.slice(0, 50).map((letter) =>
        el(
          "li",
          { data: { error: letter.error, stage: letter.stage } },
          el("span", { class: "code", text: `${letter.stage}/${letter.error}` }),
          " ",
          el("span", { class: "reason", text: letter.reason || "(no reason given)" }),
          el("br"),
          el("small", {
            text: `${fmtTime(letter.failed_at)}${letter.event_id ? ` · event ${shortKey(letter.event_id)}` : ""}`,
          }),
        ),
      ),
    );
  }

  async function refreshDeadLetters() {
    try {
      const page = await api("/api/dead-letters?limit=50");
      renderDeadLetters(page.items, page.total);
    } catch (error) {
      /* the banner says when the server is away */
    }
  }

  async function refreshStats() {
    try {
      const stats = await api("/api/stats");
      $("waits-body").replaceChildren(
        ...CLASSES.map((name) => {
          const w = stats.waits[name] || {};
          return el(
            "tr",
            { data: { class: name } },
            el("th", { scope: "row" }, el("span", { class: `badge p-${name}`, text: name })),
            el("td", { class: "num", text: String(w.count || 0) }),
            el("td", { class: "num", text: fmtDuration(w.median, true) }),
            el("td", { class: "num", text: fmtDuration(w.p95, true) }),
            el("td", { class: "num", text: fmtDuration(w.max, true) }),
          );
        }),
      );
    } catch (error) {
      /* as above */
    }
  }

  async function refreshAgreement() {
    try {
      const summary = await api("/api/feedback");
      const rows = summary.items.map((item) =>
        el(
          "tr",
          {},
          el("th", { scope: "row", text: modelText(item.model) }),
          el("td", { class: "num", text: String(item.agree) }),
          el("td", { class: "num", text: String(item.disagree) }),
          el("td", {
            class: "num",
            text: item.agreement === null ? "—" : `${Math.round(item.agreement * 100)}%`,
          }),
        ),
      );
      $("agreement-body").replaceChildren(
        ...(rows.length ? rows : [el("tr", {}, el("td", { colSpan: 4, class: "empty", text: "No verdicts yet." }))]),
      );
    } catch (error) {
      /* as above */
    }
  }

  function refreshPanels() {
    debounce("panels", refreshPanels, PANELS_MS);
    refreshStats();
    refreshAgreement();
    refreshDeadLetters();
  }

  // The banner: what a reader must know before trusting the order ---------------------------------------------

  function renderBanner() {
    const messages = [];
    const kinds = [];
    if (state.serverDown) {
      kinds.push("server");
      messages.push("The worklist server is not answering: the queue shown may be out of date.");
    }
    const scoring = state.scoring;
    if (scoring && scoring.kafka && !scoring.kafka.connected) {
      kinds.push("kafka");
      messages.push("The worklist has lost its connection to Kafka: new results are not arriving.");
    }
    if (scoring && scoring.state === "stalled") {
      kinds.push("stalled");
      const since = scoring.oldest_pending_at ? ` since ${fmtTime(scoring.oldest_pending_at)}` : "";
      messages.push(
        `Scoring has stalled: ${scoring.pending} image${scoring.pending === 1 ? "" : "s"} waiting${since} ` +
          "without a result. Unscored studies are listed in arrival order.",
      );
    }
    const banner = $("banner");
    const text = messages.join(" ");
    if (banner.textContent !== text) banner.textContent = text;
    banner.dataset.kind = kinds.join(" ");
    banner.hidden = messages.length === 0;
  }

  // Live updates --------------------------------------------------------------------------------------------

  async function loadSnapshot() {
    try {
      const snapshot = await api("/api/snapshot");
      state.clockOffset = Date.parse(snapshot.now) - Date.now();
      state.lastEventId = snapshot.last_event_id;
      state.scoring = snapshot.scoring;
      renderBanner();
      renderDeadLetters(snapshot.dead_letters, snapshot.dead_letters.length);
      if (filtered()) await refreshQueue();
      else {
        state.queueShown = ++state.queueRequests;
        renderQueue(snapshot.items, snapshot.total);
        debounce("queue", refreshQueue, REFRESH_MS);
      }
      if (state.details) openDetails(state.details, false);
      refreshPanels();
      return true;
    } catch (error) {
      debounce("snapshot", loadSnapshot, 5000);
      return false;
    }
  }

  function setLive(live, text) {
    const badge = $("live");
    badge.dataset.state = live;
    badge.textContent = text;
  }

  function onChange(event) {
    if (event.lastEventId) state.lastEventId = Number(event.lastEventId);
    let change = {};
    try {
      change = JSON.parse(event.data);
    } catch (error) {
      return;
    }
    scheduleQueue();
    if (change.what === "dead_letter") debounce("letters", refreshDeadLetters, 250);
    if (change.what === "feedback") debounce("agreement", refreshAgreement, 500);
    debounce("stats", refreshStats, 2000);
    if (state.details !== null && change.study_key === state.details) {
      if (change.study) renderDetails(change.study);
      else debounce("details", () => openDetails(state.details, false), 250);
    }
  }

  function connect() {
    if (state.source) state.source.close();
    const after = state.lastEventId === null ? "" : `?last_event_id=${state.lastEventId}`;
    const source = new EventSource(`/api/events${after}`);
    state.source = source;
    source.addEventListener("open", () => setLive("live", "live"));
    source.addEventListener("error", () => {
      if (source.readyState === EventSource.CLOSED) {
        // Refused (too many pages, or the server is gone): EventSource gives up, so try again later.
        setLive("down", "not live");
        debounce("connect", connect, RECONNECT_MS);
      } else {
        setLive("reconnecting", "reconnecting…");
      }
    });
    for (const name of [...STUDY_EVENTS, "dead_letter", "message"]) source.addEventListener(name, onChange);
    source.addEventListener("reset", async (event) => {
      if (event.lastEventId) state.lastEventId = Number(event.lastEventId);
      await loadSnapshot();
    });
    source.addEventListener("scoring", (event) => {
      try {
        state.scoring = JSON.parse(event.data);
      } catch (error) {
        return;
      }
      renderBanner();
    });
  }

  // Keyboard and clicks -------------------------------------------------------------------------------------

  function select(row, focus) {
    if (!row) return;
    state.selected = row.dataset.key;
    for (const other of $("queue-body").rows) {
      other.tabIndex = other === row ? 0 : -1;
      other.setAttribute("aria-selected", String(other === row));
    }
    if (focus) row.focus();
  }

  function typing(target) {
    return target && (target.tagName === "INPUT" || target.tagName === "SELECT" || target.tagName === "TEXTAREA");
  }

  function onQueueKey(event) {
    if (event.altKey || event.ctrlKey || event.metaKey || typing(event.target)) return;
    const row = event.target.closest("tr[data-key]");
    if (!row) return;
    const rows = [...$("queue-body").rows];
    const index = rows.indexOf(row);
    const onRow = event.target === row;
    let target = null;
    switch (event.key) {
      case "ArrowDown":
      case "j":
        target = rows[Math.min(index + 1, rows.length - 1)];
        break;
      case "ArrowUp":
      case "k":
        target = rows[Math.max(index - 1, 0)];
        break;
      case "Home":
        target = rows[0];
        break;
      case "End":
        target = rows[rows.length - 1];
        break;
      case "Enter":
        if (!onRow) return;
        select(row, false);
        openDetails(row.dataset.key, false);
        break;
      case "c": {
        const item = itemByKey(row.dataset.key);
        const mine = item && item.status === "claimed" && item.claimed_by === reader();
        act(row.dataset.key, mine ? "release" : "claim");
        break;
      }
      case "r":
        act(row.dataset.key, "read");
        break;
      default:
        return;
    }
    event.preventDefault();
    if (target) select(target, true);
  }

  function onQueueClick(event) {
    const control = event.target.closest("button[data-action]");
    const row = event.target.closest("tr[data-key]");
    if (!row) return;
    if (control) {
      select(row, false);
      act(row.dataset.key, control.dataset.action);
      return;
    }
    select(row, true);
    openDetails(row.dataset.key, false);
  }

  function onPriorityChange(event) {
    if (state.details !== null) act(state.details, "priority", { priority: event.target.value || null });
  }

  function onGlobalKey(event) {
    if (event.altKey || event.ctrlKey || event.metaKey) return;
    if (event.key === "Escape" && state.details !== null) {
      closeDetails();
      event.preventDefault();
    } else if (event.key === "/" && !typing(event.target)) {
      $("reader").focus();
      event.preventDefault();
    }
  }

  function start() {
    const saved = localStorage.getItem("cxr.worklist.reader");
    if (saved) $("reader").value = saved;
    $("reader").addEventListener("input", () => {
      localStorage.setItem("cxr.worklist.reader", reader());
      state.signature = ""; // the Claim / Release buttons depend on who is reading
    });
    $("controls").addEventListener("submit", (event) => event.preventDefault());
    $("controls").addEventListener("change", (event) => {
      if (event.target.id !== "reader") {
        state.signature = "";
        refreshQueue();
      }
    });
    const body = $("queue-body");
    body.addEventListener("keydown", onQueueKey);
    body.addEventListener("click", onQueueClick);
    $("details-priority").addEventListener("change", onPriorityChange);
    document.addEventListener("keydown", onGlobalKey);
    $("details-close").addEventListener("click", closeDetails);
    const image = $("thumbnail");
    image.addEventListener("load", () => {
      image.hidden = false;
    });
    image.addEventListener("error", () => {
      image.hidden = true;
    });
    setInterval(tick, 1000);
    loadSnapshot().then(connect);
  }

  start();
})();
