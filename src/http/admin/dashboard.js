// The admin dashboard: signs in, then draws the sales and audit API's
// figures. Plain JavaScript with no build step; uPlot (vendor/) is loaded
// before this file.
//
// `window.dashboard` exposes what the page shows, for tests and for anyone
// at the console:
//   dashboard.snapshot()  the figures as drawn: `sales` (the range applied,
//                         the summary cards, the chart's own data arrays,
//                         the top-products rows) and `stock` (the chosen
//                         variant's cards and chart arrays), each null
//                         until loaded;
//   dashboard.errors      script errors and Content-Security-Policy
//                         violations seen since the page loaded.
// `<body data-sales="loaded">` and `data-stock="loaded"` say when a part is
// drawn ("loading" and "failed" otherwise).
(() => {
  "use strict";

  const API = "/api/v1";
  const HOUR_MS = 3600 * 1000;
  const RANGES = {
    "24h": { hours: 24, interval: "hour" },
    "7d": { hours: 24 * 7, interval: "hour" },
    "30d": { hours: 24 * 30, interval: "day" },
    "90d": { hours: 24 * 90, interval: "day" },
  };
  const COLOURS = {
    revenue: "#2563eb",
    orders: "rgba(245, 158, 11, 0.55)",
    onHand: "#1f2937",
    available: "#16a34a",
    reserved: "#f59e0b",
    holds: "#db2777",
  };

  const $ = (id) => document.getElementById(id);
  const errors = [];
  const charts = { sales: null, stock: null };
  let drawnSales = null;
  let drawnStock = null;

  window.addEventListener("error", (event) => errors.push(`error: ${event.message}`));
  window.addEventListener("unhandledrejection", (event) =>
    errors.push(`unhandled rejection: ${event.reason}`),
  );
  document.addEventListener("securitypolicyviolation", (event) =>
    errors.push(`CSP blocked ${event.blockedURI || "inline code"} (${event.violatedDirective})`),
  );

  window.dashboard = {
    errors,
    snapshot() {
      return JSON.parse(JSON.stringify({ sales: drawnSales, stock: drawnStock, errors }));
    },
  };

  // ---- talking to the API ------------------------------------------------

  class ApiProblem extends Error {
    constructor(status, body) {
      super((body && (body.detail || body.title)) || `the server answered ${status}`);
      this.status = status;
      this.code = body && body.code;
    }
  }
  class SignedOut extends Error {}

  // The access token lives in memory only; across reloads the HttpOnly
  // cookies the sign-in set carry the session, and the refresh token renews
  // it when the 15-minute access token runs out.
  let accessToken = null;
  const NO_RENEWAL = new Set(["/auth/login", "/auth/refresh-token", "/auth/logout"]);

  async function api(path, { method = "GET", body } = {}, renewed = false) {
    const headers = { Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (accessToken) headers.Authorization = `Bearer ${accessToken}`;
    const response = await fetch(API + path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "same-origin",
    });
    if (response.status === 401 && !renewed && !NO_RENEWAL.has(path)) {
      if (await renewSession()) return api(path, { method, body }, true);
      throw new SignedOut("the session has ended");
    }
    const payload = response.status === 204 ? null : await response.json().catch(() => null);
    if (!response.ok) throw new ApiProblem(response.status, payload);
    return payload;
  }

  async function renewSession() {
    accessToken = null;
    try {
      const renewed = await api("/auth/refresh-token", { method: "POST", body: {} });
      accessToken = renewed.access_token;
      return true;
    } catch {
      return false;
    }
  }

  // ---- formatting ----------------------------------------------------------

  let shopCurrency = "USD";
  const moneyFormats = new Map();
  function moneyFormat(currency) {
    if (!moneyFormats.has(currency)) {
      const format = new Intl.NumberFormat(undefined, { style: "currency", currency });
      // Cents are minor units: ¥ has none, so its "cents" are yen.
      const scale = 10 ** format.resolvedOptions().maximumFractionDigits;
      moneyFormats.set(currency, { format, scale });
    }
    return moneyFormats.get(currency);
  }
  function money(cents, currency = shopCurrency) {
    if (cents === null || cents === undefined) return "–";
    const { format, scale } = moneyFormat(currency);
    return format.format(cents / scale);
  }
  const count = new Intl.NumberFormat();
  const percent = new Intl.NumberFormat(undefined, { style: "percent", maximumFractionDigits: 1 });
  const utcTime = new Intl.DateTimeFormat(undefined, {
    dateStyle: "medium",
    timeStyle: "medium",
    timeZone: "UTC",
  });
  const utcHour = new Intl.DateTimeFormat(undefined, {
    dateStyle: "medium",
    timeStyle: "short",
    timeZone: "UTC",
  });
  const wholeSeconds = (date) => date.toISOString().replace(/\.\d{3}Z$/, "Z");
  const epochSeconds = (text) => Date.parse(text) / 1000;
  const shortId = (id) => (id ? String(id).slice(0, 8) : "");

  function element(tag, { text, className, title, data } = {}, children = []) {
    const node = document.createElement(tag);
    if (text !== undefined) node.textContent = text;
    if (className) node.className = className;
    if (title) node.title = title;
    for (const [key, value] of Object.entries(data || {})) node.dataset[key] = String(value);
    for (const child of children) node.append(child);
    return node;
  }

  function fillCards(list, cards) {
    list.replaceChildren(
      ...cards.map((card) =>
        element("div", { data: { card: card.key, value: card.value } }, [
          element("dt", { text: card.label }),
          element("dd", {
            text: card.text,
            className: typeof card.value === "number" && card.value < 0 ? "negative" : "",
          }),
        ]),
      ),
    );
    return cards.map(({ key, label, value, text }) => ({ key, label, value, text }));
  }

  function showError(id, error) {
    const node = $(id);
    node.textContent = error ? error.message : "";
    node.hidden = !error;
  }

  // ---- charts --------------------------------------------------------------

  // The API's buckets are UTC hours and days; so are the axes.
  const utcDate = (ts) => uPlot.tzDate(new Date(ts * 1000), "Etc/UTC");

  function chartWidth(container) {
    return Math.max(320, container.clientWidth || 800);
  }

  function replaceChart(slot, container, options, data) {
    if (charts[slot]) charts[slot].destroy();
    container.replaceChildren();
    charts[slot] = new uPlot({ ...options, width: chartWidth(container) }, data, container);
    return charts[slot];
  }

  const resizeObserver = new ResizeObserver(() => {
    for (const [slot, id] of [["sales", "sales-chart"], ["stock", "stock-chart"]]) {
      const chart = charts[slot];
      if (chart) chart.setSize({ width: chartWidth($(id)), height: chart.height });
    }
  });
  resizeObserver.observe($("sales-chart"));
  resizeObserver.observe($("stock-chart"));

  const fromZero = (_u, min, max) => [Math.min(0, min), max > 0 ? max * 1.1 : 1];
  const wholeNumbers = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 50000, 100000];

  function salesChartOptions(interval) {
    return {
      height: 300,
      tzDate: utcDate,
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: true }, cents: { range: fromZero }, orders: { range: fromZero } },
      axes: [
        {},
        { scale: "cents", size: 80, values: (_u, ticks) => ticks.map((tick) => money(tick)) },
        { scale: "orders", side: 1, size: 50, grid: { show: false }, incrs: wholeNumbers },
      ],
      series: [
        {
          label: interval === "hour" ? "Hour (UTC)" : "Day (UTC)",
          value: (_u, ts) => (ts === null ? "–" : utcHour.format(new Date(ts * 1000))),
        },
        {
          label: "Paid orders",
          scale: "orders",
          stroke: COLOURS.orders,
          fill: COLOURS.orders,
          width: 0,
          paths: uPlot.paths.bars({ size: [0.7, 48, 3] }),
          value: (_u, value) => (value === null ? "–" : count.format(value)),
        },
        {
          label: "Revenue",
          scale: "cents",
          stroke: COLOURS.revenue,
          width: 2,
          points: { show: false },
          value: (_u, value) => money(value),
        },
      ],
    };
  }

  function stockChartOptions() {
    const stepped = uPlot.paths.stepped({ align: 1 });
    const units = (_u, value) => (value === null ? "–" : count.format(value));
    return {
      height: 260,
      tzDate: utcDate,
      cursor: { drag: { x: true, y: false } },
      scales: { x: { time: true }, units: { range: fromZero }, holds: { range: fromZero } },
      axes: [
        {},
        { scale: "units", size: 60, incrs: wholeNumbers, label: "units" },
        { scale: "holds", side: 1, size: 50, grid: { show: false }, incrs: wholeNumbers, label: "holds" },
      ],
      series: [
        { label: "Time (UTC)", value: (_u, ts) => (ts === null ? "–" : utcTime.format(new Date(ts * 1000))) },
        { label: "On hand", scale: "units", stroke: COLOURS.onHand, width: 2, paths: stepped, value: units },
        { label: "Available", scale: "units", stroke: COLOURS.available, width: 2, paths: stepped, value: units },
        {
          label: "Reserved (held units)",
          scale: "units",
          stroke: COLOURS.reserved,
          fill: "rgba(245, 158, 11, 0.15)",
          width: 2,
          paths: stepped,
          value: units,
        },
        { label: "Active holds", scale: "holds", stroke: COLOURS.holds, width: 1.5, dash: [6, 4], paths: stepped, value: units },
      ],
    };
  }

  // uPlot keeps typed or plain arrays; copy them out as plain numbers.
  const seriesOf = (chart) => chart.data.map((values) => Array.from(values, (v) => (v === null ? null : Number(v))));

  // ---- sales ---------------------------------------------------------------

  let salesRequest = 0;

  function chosenRange() {
    const choice = RANGES[$("range").value] || RANGES["7d"];
    // To the next whole hour: the current hour is in, and the buckets line up.
    const to = new Date(Math.ceil(Date.now() / HOUR_MS) * HOUR_MS);
    const from = new Date(to.getTime() - choice.hours * HOUR_MS);
    return { from: wholeSeconds(from), to: wholeSeconds(to), interval: choice.interval };
  }

  async function loadSales() {
    const request = ++salesRequest;
    const range = chosenRange();
    document.body.dataset.sales = "loading";
    $("refresh").disabled = true;
    showError("sales-error", null);
    try {
      const span = new URLSearchParams({ from: range.from, to: range.to });
      const [summary, series, top] = await Promise.all([
        api(`/sales/summary?${span}`),
        api(`/sales/timeseries?${span}&interval=${range.interval}`),
        api(`/sales/top-products?${span}&limit=10`),
      ]);
      if (request !== salesRequest) return; // a newer range was asked for meanwhile
      shopCurrency = summary.currency;
      drawSales(range, summary, series, top);
      document.body.dataset.sales = "loaded";
    } catch (error) {
      if (request !== salesRequest) return;
      if (error instanceof SignedOut) return showSignIn("Your session has ended; sign in again.");
      document.body.dataset.sales = "failed";
      showError("sales-error", error);
    } finally {
      if (request === salesRequest) $("refresh").disabled = false;
    }
  }

  function drawSales(range, summary, series, top) {
    $("range-text").textContent = `${utcHour.format(new Date(summary.from || range.from))} – ${utcHour.format(
      new Date(summary.to || range.to),
    )} UTC`;
    const cards = fillCards($("summary-cards"), [
      { key: "revenue_cents", label: "Revenue", value: summary.revenue_cents, text: money(summary.revenue_cents) },
      { key: "orders_paid", label: "Paid orders", value: summary.orders_paid, text: count.format(summary.orders_paid) },
      { key: "units_sold", label: "Units sold", value: summary.units_sold, text: count.format(summary.units_sold) },
      {
        key: "average_order_cents",
        label: "Average order",
        value: summary.average_order_cents,
        text: money(summary.average_order_cents),
      },
      {
        key: "conversion_rate",
        label: "Holds converted",
        value: summary.conversion_rate,
        text: `${percent.format(summary.conversion_rate || 0)} of ${count.format(summary.holds_placed || 0)}`,
      },
      { key: "orders_expired", label: "Expired", value: summary.orders_expired, text: count.format(summary.orders_expired) },
      {
        key: "orders_cancelled",
        label: "Cancelled",
        value: summary.orders_cancelled,
        text: count.format(summary.orders_cancelled),
      },
    ]);

    const points = series.points || [];
    const chart = replaceChart("sales", $("sales-chart"), salesChartOptions(series.interval), [
      points.map((point) => epochSeconds(point.bucket_start)),
      points.map((point) => point.orders_paid),
      points.map((point) => point.revenue_cents),
    ]);
    const [x, ordersPaid, revenueCents] = seriesOf(chart);

    const items = top.items || [];
    const mostUnits = Math.max(1, ...items.map((item) => item.units_sold));
    const rows = items.map((item, index) => {
      const fill = element("span", { className: "fill" });
      fill.style.width = `${Math.round((item.units_sold / mostUnits) * 180)}px`;
      const row = element(
        "tr",
        {
          className: "clickable",
          title: "Find this product's variants",
          data: { productId: item.product_id, unitsSold: item.units_sold, revenueCents: item.revenue_cents },
        },
        [
          element("td", { text: String(index + 1), className: "num" }),
          element("td", { text: item.name }),
          element("td", {}, [element("div", { className: "bar" }, [fill, element("span", { text: count.format(item.units_sold) })])]),
          element("td", { text: money(item.revenue_cents), className: "num" }),
        ],
      );
      row.addEventListener("click", () => {
        $("product-query").value = item.name;
        findProducts(item.name);
      });
      return row;
    });
    $("top-products").tBodies[0].replaceChildren(...rows);
    $("top-products-empty").hidden = rows.length > 0;

    drawnSales = {
      range: { from: summary.from || range.from, to: summary.to || range.to, interval: series.interval },
      currency: summary.currency,
      cards,
      chart: { bucket_start: x, orders_paid: ordersPaid, revenue_cents: revenueCents },
      top_products: rows.map((row) => ({
        product_id: row.dataset.productId,
        name: row.cells[1].textContent,
        units_sold: Number(row.dataset.unitsSold),
        revenue_cents: Number(row.dataset.revenueCents),
      })),
    };
  }

  // ---- one variant's stock -------------------------------------------------

  let stockRequest = 0;
  const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

  // Stored payloads are serde's externally tagged enums: {"StockAdded": {...}}.
  const payloadOf = (event) => (event.payload && event.payload[event.event_type]) || event.payload || {};

  // The stock after each event (every inventory event carries it), and how
  // many orders held units then. Events stored in one commit share a time:
  // the chart keeps the last state of each instant.
  function stockHistory(inventory) {
    const holds = new Map();
    const history = { time: [], on_hand: [], reserved: [], available: [], holds: [] };
    const push = (time, onHand, reserved) => {
      const last = history.time.length - 1;
      const at = last >= 0 && history.time[last] === time ? last : history.time.length;
      history.time[at] = time;
      history.on_hand[at] = onHand;
      history.reserved[at] = reserved;
      history.available[at] = onHand - reserved;
      history.holds[at] = holds.size;
    };
    let state = { onHand: 0, reserved: 0 };
    for (const event of inventory.events) {
      const body = payloadOf(event);
      if (event.event_type === "StockReserved") holds.set(body.order_id, (holds.get(body.order_id) || 0) + body.quantity);
      if (event.event_type === "ReservationReleased" || event.event_type === "ReservationCommitted") {
        holds.delete(body.order_id);
      }
      state = { onHand: body.on_hand ?? state.onHand, reserved: body.reserved ?? state.reserved };
      push(epochSeconds(event.recorded_at), state.onHand, state.reserved);
    }
    // The last step runs on to the moment the stock was read.
    push(epochSeconds(inventory.at), inventory.on_hand, inventory.reserved);
    return { history, holds };
  }

  function describe(event) {
    const body = payloadOf(event);
    switch (event.event_type) {
      case "ItemRegistered":
        return { what: `Registered ${body.sku || ""}`.trim(), units: `${body.on_hand}` };
      case "StockAdded":
        return { what: body.reason ? `Stock added: ${body.reason}` : "Stock added", units: `+${body.quantity}` };
      case "OnHandSet":
        return { what: body.reason ? `Counted: ${body.reason}` : "Counted", units: `${body.previous_on_hand} → ${body.on_hand}` };
      case "StockReserved":
        return { what: "Held for an order", units: `${body.quantity}` };
      case "ReservationReleased":
        return { what: `Hold released (${String(body.reason || "").replace(/_/g, " ")})`, units: `${body.quantity}` };
      case "ReservationCommitted":
        return { what: "Sold", units: `−${body.quantity}` };
      case "CommittedReturned":
        return { what: "Sold units returned (payment refunded)", units: `+${body.quantity}` };
      default:
        return { what: event.event_type, units: "" };
    }
  }

  async function loadVariant(variantId) {
    const id = variantId.trim();
    showError("stock-error", null);
    if (!UUID.test(id)) {
      showError("stock-error", new Error("A variant id is a UUID, like 0190f3c2-7d1e-7a52-9c41-3b8f0e6d2a11."));
      return;
    }
    const request = ++stockRequest;
    document.body.dataset.stock = "loading";
    try {
      const inventory = await api(`/audit/inventory/${id}`);
      if (request !== stockRequest) return;
      drawStock(inventory);
      window.history.replaceState(null, "", `#variant=${id}`);
      document.body.dataset.stock = "loaded";
    } catch (error) {
      if (request !== stockRequest) return;
      if (error instanceof SignedOut) return showSignIn("Your session has ended; sign in again.");
      document.body.dataset.stock = "failed";
      showError("stock-error", error.status === 404 ? new Error("No stock has ever been recorded for that variant.") : error);
    }
  }

  function drawStock(inventory) {
    const { history: points, holds } = stockHistory(inventory);
    const registered = inventory.events.find((event) => event.event_type === "ItemRegistered");
    const sku = registered ? payloadOf(registered).sku : null;
    $("stock").hidden = false;
    $("variant-id").value = inventory.variant_id;
    $("stock-title").textContent = `${sku || "Variant"} · ${inventory.variant_id}`;
    const cards = fillCards($("stock-cards"), [
      { key: "on_hand", label: "On hand", value: inventory.on_hand, text: count.format(inventory.on_hand) },
      { key: "reserved", label: "Reserved", value: inventory.reserved, text: count.format(inventory.reserved) },
      { key: "available", label: "Available", value: inventory.available, text: count.format(inventory.available) },
      { key: "active_holds", label: "Active holds", value: holds.size, text: count.format(holds.size) },
      { key: "events", label: "Events", value: inventory.events.length, text: count.format(inventory.events.length) },
    ]);
    const chart = replaceChart("stock", $("stock-chart"), stockChartOptions(), [
      points.time,
      points.on_hand,
      points.available,
      points.reserved,
      points.holds,
    ]);
    const [time, onHand, available, reserved, activeHolds] = seriesOf(chart);

    const latest = inventory.events.slice(-25).reverse();
    $("stock-events").tBodies[0].replaceChildren(
      ...latest.map((event) => {
        const body = payloadOf(event);
        const { what, units } = describe(event);
        return element("tr", { data: { position: event.position } }, [
          element("td", { text: utcTime.format(new Date(event.recorded_at)) }),
          element("td", { text: what }),
          element("td", { text: units, className: "num" }),
          element("td", { text: `${body.on_hand ?? "–"} / ${body.reserved ?? 0}` }),
          element("td", {}, body.order_id ? [element("code", { text: shortId(body.order_id), title: body.order_id })] : []),
          element("td", { text: describeActor(event.metadata) }),
        ]);
      }),
    );

    drawnStock = {
      variant_id: inventory.variant_id,
      at: inventory.at,
      cards,
      chart: { time, on_hand: onHand, available, reserved, holds: activeHolds },
    };
  }

  function describeActor(metadata) {
    const actor = metadata && metadata.actor;
    if (!actor) return "";
    return UUID.test(actor) ? `user ${shortId(actor)}` : String(actor);
  }

  async function findProducts(query) {
    const results = $("product-results");
    showError("stock-error", null);
    if (!query.trim()) {
      results.hidden = true;
      return;
    }
    try {
      const listing = await api(`/products/get-products?${new URLSearchParams({ q: query.trim(), per_page: "8" })}`);
      const products = listing.items || [];
      const details = await Promise.all(
        products.map((product) => api(`/products/get-product/${encodeURIComponent(product.slug)}`).catch(() => null)),
      );
      const lines = details.filter(Boolean).map((product) =>
        element("li", {}, [
          element("strong", { text: product.name }),
          ...product.variants.map((variant) => {
            const button = element("button", {
              text: `${variant.sku}${variant.title ? ` · ${variant.title}` : ""}`,
              className: "quiet",
              title: variant.id,
            });
            button.type = "button";
            button.addEventListener("click", () => loadVariant(variant.id));
            return button;
          }),
        ]),
      );
      results.replaceChildren(...(lines.length ? lines : [element("li", { text: "No active product matches.", className: "muted" })]));
      results.hidden = false;
    } catch (error) {
      if (error instanceof SignedOut) return showSignIn("Your session has ended; sign in again.");
      showError("stock-error", error);
    }
  }

  // ---- signing in and out --------------------------------------------------

  function showSignIn(message) {
    accessToken = null;
    document.body.dataset.view = "sign-in";
    $("dashboard").hidden = true;
    $("who").hidden = true;
    $("sign-in").hidden = false;
    const problem = $("sign-in-error");
    problem.textContent = message || "";
    problem.hidden = !message;
    $("email").focus();
  }

  function showDashboard(account) {
    document.body.dataset.view = "dashboard";
    $("sign-in").hidden = true;
    $("dashboard").hidden = false;
    $("who").hidden = false;
    $("who-email").textContent = account.email;
    loadSales();
    const chosen = /^#variant=(.+)$/.exec(location.hash);
    if (chosen) loadVariant(decodeURIComponent(chosen[1]));
  }

  async function signIn(event) {
    event.preventDefault();
    const button = $("sign-in-button");
    button.disabled = true;
    showError("sign-in-error", null);
    try {
      const answer = await api("/auth/login", {
        method: "POST",
        body: { email: $("email").value.trim(), password: $("password").value },
      });
      if (answer.user.role !== "admin") {
        accessToken = answer.access_token;
        await api("/auth/logout", { method: "POST", body: {} }).catch(() => null);
        return showSignIn("That account is not an admin. Admins are made with commerce create-admin.");
      }
      accessToken = answer.access_token;
      $("password").value = "";
      showDashboard(answer.user);
    } catch (error) {
      showSignIn(error.status === 401 ? "Wrong email or password." : error.message);
    } finally {
      button.disabled = false;
    }
  }

  async function signOut() {
    await api("/auth/logout", { method: "POST", body: {} }).catch(() => null);
    drawnSales = null;
    drawnStock = null;
    showSignIn("Signed out.");
  }

  $("sign-in-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", signOut);
  $("range").addEventListener("change", loadSales);
  $("refresh").addEventListener("click", loadSales);
  $("variant-form").addEventListener("submit", (event) => {
    event.preventDefault();
    loadVariant($("variant-id").value);
  });
  $("product-search").addEventListener("submit", (event) => {
    event.preventDefault();
    findProducts($("product-query").value);
  });

  // A session from an earlier visit (the cookies) skips the form.
  api("/auth/me")
    .then((account) => (account.role === "admin" ? showDashboard(account) : showSignIn()))
    .catch(() => showSignIn());
})();
