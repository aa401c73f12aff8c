// DOM helpers. Everything the console shows is built with createElement and text nodes: values
// from the API (log lines, usernames and passwords attackers tried, their commands) are never
// parsed as HTML. Do not add an HTML-parsing path (see routes/ui.rs for the list `cargo test` rejects).

const PROPS = new Set(['value', 'checked', 'disabled', 'selected', 'hidden', 'open', 'readOnly', 'required', 'multiple']);

/** Appends children: strings and numbers become text nodes, arrays are flattened, null is skipped. */
export function append(parent, children) {
  for (const child of children) {
    if (child == null || child === false) continue;
    if (Array.isArray(child)) append(parent, child);
    else if (child instanceof Node) parent.appendChild(child);
    else parent.appendChild(document.createTextNode(String(child)));
  }
  return parent;
}

function applyProps(el, props) {
  if (!props) return;
  for (const [key, value] of Object.entries(props)) {
    if (value == null || value === false) continue;
    if (key === 'class') el.setAttribute('class', Array.isArray(value) ? value.filter(Boolean).join(' ') : value);
    else if (key.startsWith('on') && typeof value === 'function') el.addEventListener(key.slice(2), value);
    else if (key === 'dataset') Object.assign(el.dataset, value);
    else if (PROPS.has(key)) el[key] = value;
    else el.setAttribute(key, value === true ? '' : String(value));
  }
}

/** `h('td', {class: 'mono'}, text)`: an element with attributes, listeners and text children. */
export function h(tag, props, ...children) {
  const el = document.createElement(tag);
  applyProps(el, props);
  return append(el, children);
}

const SVG_NS = 'http://www.w3.org/2000/svg';

/** An SVG element. */
export function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value != null) el.setAttribute(key, String(value));
  }
  return append(el, children);
}

/** Removes every child. */
export function clear(el) {
  while (el.firstChild) el.removeChild(el.firstChild);
  return el;
}

/** Replaces el's children. */
export function replace(el, ...children) {
  return append(clear(el), children);
}

/** A link to a route inside the console; only ever built from our own paths and numeric ids. */
export function link(route, ...children) {
  return h('a', { href: '#' + route }, ...children);
}

// Time ---------------------------------------------------------------------------------------

const pad = (n) => String(n).padStart(2, '0');

/** `2025-03-01 14:03:07` in the browser's time zone. */
export function localTime(iso) {
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

/** `5 min ago`, `in 2 h`. */
export function relative(iso, now = Date.now()) {
  const t = new Date(iso).getTime();
  if (Number.isNaN(t)) return '';
  const secs = Math.round((t - now) / 1000);
  const abs = Math.abs(secs);
  let text;
  if (abs < 10) return 'just now';
  if (abs < 60) text = `${abs} s`;
  else if (abs < 3600) text = `${Math.floor(abs / 60)} min`;
  else if (abs < 86400) text = `${Math.floor(abs / 3600)} h`;
  else text = `${Math.floor(abs / 86400)} d`;
  return secs < 0 ? `${text} ago` : `in ${text}`;
}

/** Local time, short: `05:10:25` today, `Nov 27 07:18` this year, `2024-11-27 07:18` before. */
export function shortTime(iso, now = new Date()) {
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso);
  const hm = `${pad(d.getHours())}:${pad(d.getMinutes())}`;
  if (d.toDateString() === now.toDateString()) return `${hm}:${pad(d.getSeconds())}`;
  if (d.getFullYear() === now.getFullYear()) return `${d.toLocaleDateString(undefined, { month: 'short', day: 'numeric' })} ${hm}`;
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${hm}`;
}

/**
 * A timestamp: local time (short in tables, `full` for detail views) and the relative age, kept
 * fresh by `refreshAges`; the tooltip has the full date and zone.
 */
export function when(iso, fallback = '—', { full = false } = {}) {
  if (!iso) return h('span', { class: 'muted' }, fallback);
  return h('span', { class: 'when', title: new Date(iso).toString() },
    h('time', { datetime: iso }, full ? localTime(iso) : shortTime(iso)),
    h('span', { class: 'age', dataset: { t: iso } }, relative(iso)));
}

/** Updates every relative age on the page. */
export function refreshAges() {
  const now = Date.now();
  for (const el of document.querySelectorAll('.age[data-t]')) el.textContent = relative(el.dataset.t, now);
}

/** `1h 30m` for a number of seconds. */
export function duration(secs) {
  if (secs == null) return '—';
  const units = [['d', 86400], ['h', 3600], ['m', 60], ['s', 1]];
  const parts = [];
  let rest = Math.max(0, Math.round(secs));
  for (const [name, size] of units) {
    if (rest >= size) {
      parts.push(`${Math.floor(rest / size)}${name}`);
      rest %= size;
    }
    if (parts.length === 2) break;
  }
  return parts.length ? parts.join(' ') : '0s';
}

/** `1.2 MB`. */
export function bytes(n) {
  if (n == null) return '—';
  const units = ['B', 'kB', 'MB', 'GB', 'TB'];
  let v = Number(n);
  let i = 0;
  while (v >= 1000 && i < units.length - 1) { v /= 1000; i += 1; }
  return `${i === 0 ? v : v.toFixed(1)} ${units[i]}`;
}

/** `12,345`. */
export function num(n) {
  return n == null ? '—' : Number(n).toLocaleString();
}

// Building blocks -----------------------------------------------------------------------------

/** A page header: title, optional subtitle and right-aligned tools. */
export function header(title, subtitle, ...tools) {
  return h('header', { class: 'page-head' },
    h('div', null, h('h1', null, title), subtitle ? h('p', { class: 'sub' }, subtitle) : null),
    h('div', { class: 'tools' }, ...tools));
}

/** A card with a title. */
export function card(title, ...children) {
  return h('section', { class: 'card' }, title ? h('h2', null, title) : null, ...children);
}

/** A table: `columns` are header labels (or `{label, class}`), `rows` arrays of cells or `<tr>`s. */
export function table(columns, rows, { empty = 'Nothing here yet.', cls = '' } = {}) {
  const head = h('tr', null, columns.map((c) => (typeof c === 'string' ? h('th', null, c) : h('th', { class: c.class }, c.label))));
  const body = h('tbody');
  appendRows(body, columns.length, rows, empty);
  return h('div', { class: 'table-wrap' }, h('table', { class: ['grid', cls] }, h('thead', null, head), body));
}

/** Fills a tbody with rows (or the empty message). */
export function appendRows(tbody, width, rows, empty) {
  if (!rows.length && empty && !tbody.children.length) {
    tbody.appendChild(h('tr', { class: 'empty' }, h('td', { colspan: width }, empty)));
    return;
  }
  for (const row of rows) tbody.appendChild(row instanceof Node ? row : h('tr', null, row.map((c) => (c instanceof HTMLTableCellElement ? c : h('td', null, c)))));
}

/** A `<td>` with a class. */
export function td(cls, ...children) {
  return h('td', { class: cls }, ...children);
}

/** A coloured label. */
export function badge(text, kind) {
  return h('span', { class: ['badge', kind ? `badge-${kind}` : null] }, text);
}

/** A severity badge. */
export function severity(level) {
  return badge(level || 'unknown', `sev-${['info', 'low', 'medium', 'high', 'critical'].includes(level) ? level : 'info'}`);
}

/** An action badge (drop, redirect, reflect, default). */
export function action(name) {
  return badge(name, `act-${['drop', 'redirect', 'reflect', 'pass'].includes(name) ? name : 'default'}`);
}

/** An inline error line; `show(err)` fills it, `show(null)` hides it. */
export function errorBox() {
  const el = h('div', { class: 'error', role: 'alert', hidden: true });
  el.show = (err) => {
    if (!err) { el.hidden = true; el.textContent = ''; return; }
    el.textContent = err.message || String(err);
    el.hidden = false;
  };
  return el;
}

/** A short-lived confirmation line. */
export function notice(text, kind = 'ok') {
  return h('div', { class: ['notice', `notice-${kind}`], role: 'status' }, text);
}

/** A button. */
export function button(label, onclick, kind = '', props = {}) {
  return h('button', { type: 'button', class: ['btn', kind ? `btn-${kind}` : null], onclick, ...props }, label);
}

/**
 * A two-step button for destructive actions: the first click arms it ("Confirm unblock?"), the
 * second within 5 s runs `run`; errors land in `errors` (an errorBox).
 */
export function confirmButton(label, confirmLabel, run, errors, props = {}) {
  let timer = null;
  const btn = button(label, async () => {
    if (!btn.classList.contains('armed')) {
      btn.classList.add('armed');
      btn.textContent = confirmLabel;
      timer = setTimeout(() => { btn.classList.remove('armed'); btn.textContent = label; }, 5000);
      return;
    }
    clearTimeout(timer);
    btn.disabled = true;
    try {
      errors?.show(null);
      await run();
    } catch (err) {
      errors?.show(err);
      btn.classList.remove('armed');
      btn.textContent = label;
    } finally {
      btn.disabled = false;
    }
  }, 'danger-soft', props);
  return btn;
}

/** A labelled form field. */
export function field(label, control, hint) {
  return h('label', { class: 'field' }, h('span', { class: 'label' }, label), control, hint ? h('span', { class: 'hint' }, hint) : null);
}

/** A `<select>` of `[value, label]` pairs (or plain values). */
export function select(name, options, value, props = {}) {
  return h('select', { name, ...props }, options.map((o) => {
    const [v, l] = Array.isArray(o) ? o : [o, o];
    return h('option', { value: v, selected: String(v) === String(value ?? '') }, l);
  }));
}

/** A text `<input>`. */
export function input(name, props = {}) {
  return h('input', { name, type: 'text', autocomplete: 'off', spellcheck: 'false', ...props });
}

/**
 * Wires a form: on submit, disables its buttons, runs `onSubmit(values)` and shows errors inline.
 * Returns the form.
 */
export function form(props, children, onSubmit) {
  const errors = errorBox();
  const f = h('form', { ...props, novalidate: true }, ...children, errors);
  f.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const values = Object.fromEntries(new FormData(f).entries());
    for (const box of f.querySelectorAll('input[type=checkbox][name]')) values[box.name] = box.checked;
    const buttons = [...f.querySelectorAll('button')];
    buttons.forEach((b) => { b.disabled = true; });
    errors.show(null);
    try {
      await onSubmit(values, f);
    } catch (err) {
      errors.show(err);
    } finally {
      buttons.forEach((b) => { b.disabled = false; });
    }
  });
  f.errors = errors;
  return f;
}

/** A box showing a secret once, with a copy button. */
export function secretBox(title, secret, note) {
  const code = h('code', { class: 'secret' }, secret);
  const copy = button('Copy', async () => {
    try {
      await navigator.clipboard.writeText(secret);
      copy.textContent = 'Copied';
    } catch {
      const range = document.createRange();
      range.selectNodeContents(code);
      const sel = window.getSelection();
      sel.removeAllRanges();
      sel.addRange(range);
      copy.textContent = 'Selected — press Ctrl+C';
    }
  }, 'small');
  return h('div', { class: 'secret-box', role: 'status' },
    h('strong', null, title), h('div', { class: 'secret-row' }, code, copy),
    h('p', { class: 'hint' }, note || 'Shown this once: copy it now. The manager keeps only its hash.'));
}

/** A loading placeholder. */
export function loading(text = 'Loading…') {
  return h('div', { class: 'loading' }, text);
}

/** An empty-state or "not available" line. */
export function muted(text) {
  return h('p', { class: 'muted' }, text);
}
