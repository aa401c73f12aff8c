// The attack log: detections newest first, with their raw evidence lines, filtered by address,
// service or rule, and updated live from the manager's event stream (EventSource on
// /api/v1/events, `detection` events; the browser resumes with Last-Event-ID after a drop).

import { get } from '../api.js';
import {
  appendRows, badge, button, card, clear, errorBox, form, h, header, input, link, num, severity, td, when,
} from '../dom.js';
import { netLabel } from './attackers.js';

const PAGE = 100;
/** Rows kept on the page; older ones fall off the bottom as live ones arrive. */
const MAX_ROWS = 1000;

/** The attacker's address of a detection. */
export function addrOf(d) {
  return netLabel(d.addr ?? d.attacker_addr ?? '');
}

/** Evidence lines as a block of monospace lines (text nodes: attacker-controlled). */
export function evidenceBlock(lines) {
  const list = Array.isArray(lines) ? lines : [];
  if (!list.length) return h('p', { class: 'muted' }, 'No evidence lines.');
  return h('ol', { class: 'evidence' }, list.map((line) => h('li', null, h('code', null, String(line)))));
}

function ipv4(addr) {
  const parts = addr.split('.');
  if (parts.length !== 4) return null;
  let n = 0;
  for (const p of parts) {
    const v = Number(p);
    if (!/^\d+$/.test(p) || v > 255) return null;
    n = n * 256 + v;
  }
  return n;
}

/** Does address `addr` fall in `filter` (an address or an IPv4 range)? */
function addrMatches(filter, addr) {
  if (!filter) return true;
  const [base, bits] = filter.split('/');
  if (bits === undefined) return base === addr;
  const a = ipv4(addr);
  const b = ipv4(base);
  if (a === null || b === null) return true; // IPv6 ranges: the next reload filters exactly
  const size = 2 ** (32 - Number(bits));
  return Math.floor(a / size) === Math.floor(b / size);
}

export async function render(ctx) {
  const filters = {
    addr: ctx.query.get('addr') || '',
    service: ctx.query.get('service') || '',
    rule: ctx.query.get('rule') || '',
  };
  const errors = errorBox();
  const tbody = h('tbody');
  const seen = new Set();
  let lastId = null;
  const more = button('Load older', () => load(false), 'ghost', { hidden: true });
  const status = h('span', { class: 'live-status', id: 'live-status', dataset: { state: 'connecting' } }, 'Connecting…');
  const counter = h('span', { class: 'muted' });
  let liveCount = 0;

  const rowFor = (d, fresh) => {
    const lines = Array.isArray(d.evidence) ? d.evidence : [];
    const attackerId = d.attacker_id != null ? Number(d.attacker_id) : null;
    const addr = addrOf(d);
    const first = lines[0] ?? '';
    const tr = h('tr', { class: ['detection', fresh ? 'fresh' : null], dataset: { id: d.id }, tabindex: 0, title: 'Show the evidence lines' },
      td('nowrap', when(d.at)),
      td('mono nowrap', attackerId ? link(`/attackers/${attackerId}`, addr) : addr),
      td('', d.service),
      td('', d.rule, d.count > 1 ? h('span', { class: 'muted' }, ` ×${num(d.count)}`) : null),
      td('nowrap', severity(d.severity), d.allowlisted ? [' ', badge('allowlisted', 'muted')] : null),
      td('evidence-cell', h('code', { class: 'line' }, String(first)), lines.length > 1 ? h('span', { class: 'more-lines' }, `+${lines.length - 1}`) : null));
    const detail = h('tr', { class: 'detail', hidden: true }, h('td', { colspan: 6 }, evidenceBlock(lines),
      h('p', { class: 'detail-foot muted' }, `Reported by ${d.server ?? d.server_name ?? 'unknown'} · received `, when(d.received_at ?? d.at),
        d.action ? ` · action ${d.action}` : '', d.group ? ` · group ${d.group}` : '')));
    const toggle = (ev) => {
      if (ev.target.closest('a')) return;
      detail.hidden = !detail.hidden;
      tr.classList.toggle('open', !detail.hidden);
    };
    tr.addEventListener('click', toggle);
    tr.addEventListener('keydown', (ev) => { if (ev.key === 'Enter' || ev.key === ' ') { ev.preventDefault(); toggle(ev); } });
    return [tr, detail];
  };

  async function load(reset) {
    errors.show(null);
    if (reset) lastId = null;
    let page;
    try {
      page = await get('/detections', { ...filters, limit: PAGE, before: lastId });
    } catch (err) {
      errors.show(err);
      return;
    }
    if (!ctx.live()) return;
    const list = Array.isArray(page) ? page : page.detections || [];
    if (reset) { clear(tbody); seen.clear(); }
    const rows = [];
    for (const d of list) {
      if (seen.has(d.id)) continue;
      seen.add(d.id);
      rows.push(...rowFor(d, false));
    }
    appendRows(tbody, 6, rows, Object.values(filters).some(Boolean) ? 'No detection matches these filters.' : 'No detections yet. They appear here the moment mirage-server reports one.');
    if (list.length) lastId = list[list.length - 1].id;
    more.hidden = list.length < PAGE;
  }

  function onDetection(d) {
    if (!d || d.id == null || seen.has(d.id)) return;
    if (!addrMatches(filters.addr, addrOf(d))) return;
    if (filters.service && d.service !== filters.service) return;
    if (filters.rule && d.rule !== filters.rule) return;
    seen.add(d.id);
    const empty = tbody.querySelector('tr.empty');
    if (empty) empty.remove();
    const [tr, detail] = rowFor(d, true);
    tbody.insertBefore(detail, tbody.firstChild);
    tbody.insertBefore(tr, detail);
    while (tbody.children.length > MAX_ROWS * 2) tbody.lastChild.remove();
    liveCount += 1;
    counter.textContent = `${num(liveCount)} new since you opened this page`;
  }

  const filterForm = form({ class: 'search filters', id: 'log-filters' }, [
    input('addr', { value: filters.addr, placeholder: 'Address or range', class: 'mono', 'aria-label': 'Address or range' }),
    input('service', { value: filters.service, placeholder: 'Service (ssh, ftp…)', 'aria-label': 'Service' }),
    input('rule', { value: filters.rule, placeholder: 'Rule', 'aria-label': 'Rule' }),
    h('button', { type: 'submit', class: 'btn' }, 'Filter'),
    button('Clear', () => {
      for (const el of filterForm.querySelectorAll('input')) el.value = '';
      Object.keys(filters).forEach((k) => { filters[k] = ''; });
      load(true);
    }, 'ghost'),
  ], async (values) => {
    for (const k of Object.keys(filters)) filters[k] = (values[k] || '').trim();
    await load(true);
  });

  ctx.root.append(
    header('Attack log', 'Every detection with the raw lines that matched. New ones appear without a reload.', status),
    filterForm,
    errors,
    card(null,
      h('div', { class: 'card-tools' }, counter),
      h('div', { class: 'table-wrap' }, h('table', { class: 'grid log', id: 'log-table' },
        h('thead', null, h('tr', null, ['Time', 'Address', 'Service', 'Rule', 'Severity', 'Evidence'].map((c) => h('th', null, c)))),
        tbody)),
      h('div', { class: 'more' }, more)));

  // Subscribe first, so nothing committed while the first page loads is missed (duplicates are
  // dropped by id).
  const events = new EventSource('/api/v1/events');
  const setStatus = (state, text) => {
    status.dataset.state = state;
    status.textContent = text;
  };
  events.addEventListener('open', () => setStatus('live', 'Live'));
  events.addEventListener('error', () => {
    if (events.readyState === EventSource.CLOSED) {
      setStatus('down', 'Live updates unavailable');
      // A refused stream is most often an ended session: /me sends the user to the login form.
      get('/me').catch(() => {});
    }
    else setStatus('connecting', 'Reconnecting…');
  });
  events.addEventListener('detection', (ev) => {
    try {
      onDetection(JSON.parse(ev.data));
    } catch {
      // A malformed event is skipped; the next reload shows the row.
    }
  });
  await load(true);
  return () => events.close();
}
