"use strict";
// localmoe's chat page. Streams replies from /v1/chat/completions (SSE), keeps
// chats in localStorage, shows /props, and draws a layer x expert heatmap of
// the tokens routed to each expert in the current chat (from /v1/experts).
(() => {
  const STORE = "localmoe.chats", CURRENT = "localmoe.current", SETTINGS = "localmoe.settings";
  const PARAMS = ["temperature", "top_k", "top_p", "min_p", "repeat_penalty", "max_tokens", "seed"];
  const INTS = new Set(["top_k", "max_tokens", "seed"]);
  const FIELDS = [...PARAMS, "system-prompt", "api-key"];  // kept in localStorage
  const POLL_MS = 300;
  const $ = (id) => document.getElementById(id);
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

  // ---------- storage
  function load(key, fallback) {
    try { return JSON.parse(localStorage.getItem(key)) ?? fallback; } catch { return fallback; }
  }
  function save() {
    try {
      localStorage.setItem(STORE, JSON.stringify(chats));
      localStorage.setItem(CURRENT, JSON.stringify(currentId));
    } catch (e) { setStatus(`could not save chats: ${e.message}`, true); }
  }
  // chat: {id, title, created, messages: [{role, content, reasoning, timings, finish, stopped, error}],
  //        experts: {counts: [[int]], n_tokens}}
  let chats = sanitize(load(STORE, []));
  let currentId = load(CURRENT, null);
  let experts = null;      // the last GET /v1/experts (shape and moe_layers)
  let controller = null;   // AbortController of the reply being streamed

  // Stored chats come from an older page or a hand edit: keep what can be shown.
  function sanitize(list) {
    const chats = Array.isArray(list) ? list.filter((c) => c && Array.isArray(c.messages)) : [];
    for (const c of chats) {
      c.messages = c.messages.filter((m) => m && typeof m.content === "string");
      for (const m of c.messages) if (m.streaming) { delete m.streaming; m.stopped = true; }  // cut by a reload
      if (!(c.experts && Array.isArray(c.experts.counts) && Array.isArray(c.experts.counts[0]))) c.experts = null;
    }
    return chats;
  }
  const currentChat = () => chats.find((c) => c.id === currentId) || null;

  // ---------- rendering model text: everything is HTML-escaped first, so the
  // only tags in the result are the ones added here, none with attributes.
  function escapeHtml(s) {
    return String(s).replace(/[&<>"']/g, (c) =>
      ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
  }
  function inline(s) {
    return s.split(/(`[^`\n]+`)/).map((p, i) => i % 2
      ? `<code>${p.slice(1, -1)}</code>`
      : p.replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")).join("");
  }
  // A markdown subset: ``` fences, `code`, **bold**; newlines kept by CSS.
  function renderMarkdown(text) {
    return escapeHtml(text).split("```").map((p, i) => i % 2
      ? `<pre><code>${p.replace(/^[^\n]*\n/, "")}</code></pre>`  // drops the language tag
      : inline(i ? p.replace(/^\n/, "") : p)).join("");
  }

  // ---------- messages
  function messageElement(msg, index) {
    const el = document.createElement("div");
    el.className = "msg";
    el.dataset.role = msg.role;
    el.dataset.index = index;
    el.innerHTML = `<div class="role"></div><details class="reasoning"><summary>Reasoning</summary>
      <div class="reasoning-text"></div></details><div class="content"></div><div class="meta"></div>`;
    el.querySelector(".role").textContent = msg.role;
    updateMessage(el, msg);
    return el;
  }
  function updateMessage(el, msg) {
    const content = el.querySelector(".content");
    if (msg.role === "assistant") content.innerHTML = renderMarkdown(msg.content.trimStart());
    else content.textContent = msg.content;
    const reasoning = el.querySelector(".reasoning");
    reasoning.hidden = !msg.reasoning;
    reasoning.querySelector(".reasoning-text").textContent = msg.reasoning || "";
    el.querySelector(".meta").textContent = metaText(msg);
    el.classList.toggle("error", !!msg.error);
    el.classList.toggle("streaming", !!msg.streaming);
  }
  function metaText(msg) {
    const parts = [];
    const t = msg.timings;
    if (t) {
      parts.push(`prompt ${t.prompt_n} tok, ${t.prompt_per_second.toFixed(1)} tok/s`);
      parts.push(`decode ${t.predicted_n} tok, ${t.predicted_per_second.toFixed(1)} tok/s`);
    }
    if (msg.finish === "length") parts.push("hit max_tokens");
    if (msg.stopped) parts.push("stopped");
    if (msg.error) parts.push(`error: ${msg.error}`);
    return parts.join(" · ");
  }
  function renderChat() {
    const box = $("messages");
    box.replaceChildren();
    const chat = currentChat();
    if (!chat) {
      const hello = document.createElement("p");
      hello.className = "empty";
      hello.textContent = "New chat. Type a message below.";
      box.append(hello);
    } else chat.messages.forEach((m, i) => box.append(messageElement(m, i)));
    box.scrollTop = box.scrollHeight;
    renderChatList();
    drawHeatmap(chat && chat.experts);
  }
  function renderChatList() {
    const list = $("chat-list");
    list.replaceChildren();
    for (const chat of [...chats].sort((a, b) => b.created - a.created)) {
      const li = document.createElement("li");
      li.dataset.chatId = chat.id;
      li.classList.toggle("active", chat.id === currentId);
      const open = document.createElement("button");
      open.className = "open";
      open.textContent = chat.title || "(empty)";
      open.onclick = () => { currentId = chat.id; save(); renderChat(); };
      const del = document.createElement("button");
      del.className = "delete";
      del.title = "Delete this chat";
      del.textContent = "×";
      del.onclick = () => {
        chats = chats.filter((c) => c !== chat);
        if (currentId === chat.id) currentId = null;
        save(); renderChat();
      };
      li.append(open, del);
      list.append(li);
    }
  }

  // ---------- settings
  function loadSettings() {
    const s = load(SETTINGS, {});
    for (const k of FIELDS) if (s[k] != null) $(k).value = s[k];
  }
  function saveSettings() {
    const s = {};
    for (const k of FIELDS) s[k] = $(k).value;
    localStorage.setItem(SETTINGS, JSON.stringify(s));
  }
  function samplingParams() {
    const out = {};
    for (const k of PARAMS) {
      const v = $(k).value.trim();
      if (v !== "") out[k] = INTS.has(k) ? parseInt(v, 10) : parseFloat(v);
    }
    return out;
  }

  // ---------- talking to the server
  function headers(extra = {}) {
    const key = $("api-key").value.trim();
    return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
  }
  async function getJSON(url) {
    const res = await fetch(url, { headers: headers() });
    if (!res.ok) throw new Error(await errorMessage(res));
    return res.json();
  }
  async function errorMessage(res) {
    try { return (await res.json()).error.message || `HTTP ${res.status}`; }
    catch { return `HTTP ${res.status}`; }
  }
  // Yields each JSON payload of an SSE body until `data: [DONE]`.
  async function* sseEvents(body) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += value.replace(/\r/g, "");
      let end;
      while ((end = buf.indexOf("\n\n")) >= 0) {
        const data = buf.slice(0, end).split("\n").filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).trim()).join("\n");
        buf = buf.slice(end + 2);
        if (data === "[DONE]") return;
        if (data) yield JSON.parse(data);
      }
    }
  }

  async function send(text) {
    let chat = currentChat();
    if (!chat) {
      chat = { id: `c${Date.now()}${Math.random().toString(36).slice(2, 6)}`, title: "",
               created: Date.now(), messages: [], experts: null };
      chats.push(chat);
      currentId = chat.id;
    }
    if (!chat.title) chat.title = text.replace(/\s+/g, " ").trim().slice(0, 48);
    const system = $("system-prompt").value.trim();
    const history = chat.messages.filter((m) => !m.error && m.content)
      .map((m) => ({ role: m.role, content: m.content }));
    chat.messages.push({ role: "user", content: text });
    const reply = { role: "assistant", content: "", reasoning: "", streaming: true };
    chat.messages.push(reply);
    save(); renderChat();
    const el = $("messages").lastElementChild;

    const body = {
      messages: [...(system ? [{ role: "system", content: system }] : []), ...history,
                 { role: "user", content: text }],
      stream: true, stream_options: { include_usage: true }, ...samplingParams(),
    };
    let requestId = null;
    controller = new AbortController();
    setBusy(true);
    const polling = (async () => {  // one poll at a time, POLL_MS apart: a slow server gets no pile-up
      while (reply.streaming) {
        await pollExperts(chat, reply, requestId);
        await sleep(POLL_MS);
      }
    })();
    try {
      const res = await fetch("/v1/chat/completions", {
        method: "POST", headers: headers({ "Content-Type": "application/json" }),
        body: JSON.stringify(body), signal: controller.signal,
      });
      if (!res.ok) throw new Error(await errorMessage(res));
      for await (const chunk of sseEvents(res.body)) {
        if (chunk.error) throw new Error(chunk.error.message || "server error");
        if (!requestId && chunk.id) {  // the first chunk names the request: show its counts now
          requestId = chunk.id;
          pollExperts(chat, reply, requestId);
        }
        for (const choice of chunk.choices || []) {
          const d = choice.delta || {};
          if (d.content) reply.content += d.content;
          if (d.reasoning_content) reply.reasoning += d.reasoning_content;
          if (choice.finish_reason) reply.finish = choice.finish_reason;
        }
        if (chunk.timings) reply.timings = chunk.timings;
        updateMessage(el, reply);
        scrollDown();
      }
    } catch (e) {
      if (e.name === "AbortError") reply.stopped = true;
      else reply.error = e.message;
    } finally {
      delete reply.streaming;
      updateMessage(el, reply);
      save();
      $("stop").disabled = true;
      await polling;
      await settleExperts(chat, requestId);
      controller = null;
      setBusy(false);
      $("input").focus();
    }
  }
  function scrollDown() {
    const box = $("messages");
    if (box.scrollHeight - box.scrollTop - box.clientHeight < 120) box.scrollTop = box.scrollHeight;
  }
  function setBusy(busy) {
    $("send").disabled = busy;
    $("stop").disabled = !busy;
    $("new-chat").disabled = busy;
    document.body.classList.toggle("busy", busy);
    setStatus(busy ? "generating…" : "");
  }
  function setStatus(text, isError = false) {
    $("status").textContent = text;
    $("status").classList.toggle("error", isError);
  }

  // ---------- expert usage
  // requestId: that request's counts (other chats may be running beside it)
  async function fetchExperts(requestId) {
    const url = requestId ? "/v1/experts?id=" + encodeURIComponent(requestId) : "/v1/experts";
    try { experts = await getJSON(url); } catch { return null; }
    return experts;
  }
  // While a reply streams: the chat's stored totals plus this request's counts so far.
  async function pollExperts(chat, reply, requestId) {
    const ex = await fetchExperts(requestId);
    if (ex && reply.streaming && requestId && ex.request.id === requestId && chat.id === currentId) {
      drawHeatmap(addCounts(chat.experts, ex.request));
    }
  }
  // After a reply: wait until the server has finished the request, then keep its counts.
  async function settleExperts(chat, requestId) {
    if (!requestId) return;
    for (let i = 0; i < 30; i++) {
      const ex = await fetchExperts(requestId);
      if (!ex || ex.request.id !== requestId) return;
      if (!ex.request.active) {
        chat.experts = addCounts(chat.experts, ex.request);
        save();
        if (chat.id === currentId) drawHeatmap(chat.experts);
        return;
      }
      await sleep(100);
    }
  }
  function addCounts(stored, request) {
    const same = stored && stored.counts.length === request.counts.length &&
      stored.counts[0].length === request.counts[0].length;
    return {
      n_tokens: (same ? stored.n_tokens : 0) + request.n_tokens,
      counts: request.counts.map((row, l) => row.map((c, e) => c + (same ? stored.counts[l][e] : 0))),
    };
  }
  function drawHeatmap(usage) {
    const nLayer = usage ? usage.counts.length : experts ? experts.n_layer : 0;
    const nExpert = usage ? usage.counts[0].length : experts ? experts.n_expert : 0;
    const counts = usage ? usage.counts : Array.from({ length: nLayer }, () => new Array(nExpert).fill(0));
    const grid = $("heatmap");
    if (grid.dataset.shape !== `${nLayer}x${nExpert}`) {
      grid.dataset.shape = `${nLayer}x${nExpert}`;
      grid.style.gridTemplateColumns = `2.5em repeat(${nExpert}, minmax(0, 1fr))`;
      grid.classList.toggle("wide", nExpert > 64);
      grid.classList.toggle("tall", nLayer > 24);
      grid.replaceChildren(document.createElement("span"));
      const step = 2 ** Math.max(0, Math.ceil(Math.log2(nExpert / 8)));  // at most 8 column labels
      for (let e = 0; e < nExpert; e += step) {
        const label = document.createElement("span");
        label.className = "expert-label";
        label.style.gridColumn = `span ${Math.min(step, nExpert - e)}`;
        label.style.textAlign = step === 1 ? "center" : "left";
        label.textContent = e;
        grid.append(label);
      }
      const moe = new Set(experts ? experts.moe_layers : []);
      for (let l = 0; l < nLayer; l++) {
        const label = document.createElement("span");
        label.className = "layer-label";
        label.textContent = `L${l}`;
        grid.append(label);
        for (let e = 0; e < nExpert; e++) {
          const cell = document.createElement("div");
          cell.className = "cell";
          cell.classList.toggle("dense", experts != null && !moe.has(l));
          cell.dataset.layer = l;
          cell.dataset.expert = e;
          grid.append(cell);
        }
      }
    }
    const max = Math.max(1, ...counts.flat());
    for (const cell of grid.querySelectorAll(".cell")) {
      const n = counts[cell.dataset.layer][cell.dataset.expert];
      cell.dataset.count = n;
      cell.style.setProperty("--heat", (n / max).toFixed(3));
      cell.title = `layer ${cell.dataset.layer}, expert ${cell.dataset.expert}: ${n} tokens`;
    }
    $("heatmap-total").textContent = usage ? `(${usage.n_tokens} tokens)` : "";
  }

  // ---------- model info
  function fmtCount(n) {
    return n >= 1e9 ? `${(n / 1e9).toFixed(2)}B` : n >= 1e6 ? `${(n / 1e6).toFixed(1)}M` : `${n}`;
  }
  function fmtBytes(n) {
    if (n == null) return "no limit";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
  }
  async function loadProps() {
    let props;
    try { props = await getJSON("/props"); } catch (e) {
      $("model-status").textContent = `waiting for the server (${e.message})`;
      setTimeout(loadProps, 1000);
      return;
    }
    const rows = [
      ["model", props.model], ["architecture", props.arch], ["parameters", fmtCount(props.n_params)],
      ["quant type", props.quant], ["layers", props.n_layer], ["experts per layer", props.n_expert],
      ["active experts", props.n_expert_used], ["context", props.n_ctx],
      ["RAM budget", fmtBytes(props.ram_budget)],
    ];
    const dl = $("model-props");
    dl.replaceChildren();
    for (const [k, v] of rows) {
      const dt = document.createElement("dt"), dd = document.createElement("dd");
      dt.textContent = k;
      dd.textContent = v;
      dd.dataset.prop = k;
      dl.append(dt, dd);
    }
    for (const [k, v] of Object.entries(props.default_sampling || {})) if ($(k)) $(k).placeholder = v;
    await fetchExperts();
    drawHeatmap(currentChat() && currentChat().experts);
  }

  // ---------- wiring
  $("composer").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("input").value;
    if (!text.trim() || controller) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("new-chat").addEventListener("click", () => { currentId = null; save(); renderChat(); $("input").focus(); });
  for (const k of FIELDS) $(k).addEventListener("input", saveSettings);

  window.localmoe = { renderMarkdown, escapeHtml };  // the browser test renders through these
  loadSettings();
  renderChat();
  loadProps();
})();
