// The audit log (admins): who changed what, when, from where. Newest first, paged.

import { get } from '../api.js';
import { appendRows, button, card, clear, errorBox, h, header, td, when } from '../dom.js';

const PAGE = 100;

const SHORT = 60;

/**
 * `{"id": 3, "action": "drop"}` as `id=3 action=drop` (values as text, long ones shortened),
 * with the whole JSON one click away.
 */
function details(value) {
  if (!value || typeof value !== 'object') return value == null ? '' : String(value);
  const entries = Object.entries(value).filter(([, v]) => v !== null && v !== undefined && v !== '');
  if (!entries.length) return '';
  let long = false;
  const summary = entries.map(([k, v]) => {
    let text;
    if (Array.isArray(v)) text = v.length > 3 || JSON.stringify(v).length > SHORT ? `[${v.length} items]` : JSON.stringify(v);
    else text = typeof v === 'object' ? JSON.stringify(v) : String(v);
    if (text.length > SHORT) { text = `${text.slice(0, SHORT)}…`; long = true; }
    if (Array.isArray(v) && text.startsWith('[') && text.endsWith('items]')) long = true;
    return `${k}=${text}`;
  }).join('  ');
  if (!long) return summary;
  return h('details', null, h('summary', null, summary), h('pre', { class: 'json' }, JSON.stringify(value, null, 2)));
}

export async function render(ctx) {
  const errors = errorBox();
  const tbody = h('tbody');
  let lastId = null;
  const more = button('Load older', () => load(false), 'ghost', { hidden: true });

  async function load(reset) {
    errors.show(null);
    if (reset) { lastId = null; clear(tbody); }
    let rows;
    try {
      rows = await get('/audit-log', { limit: PAGE, before: lastId });
    } catch (err) {
      errors.show(err);
      return;
    }
    if (!ctx.live()) return;
    appendRows(tbody, 6, rows.map((r) => [
      td('nowrap', when(r.at)),
      td('', h('strong', null, r.actor)),
      td('mono', r.action),
      td('mono', r.target ?? ''),
      td('mono details', details(r.details)),
      td('mono muted', r.ip ?? ''),
    ]), 'No changes recorded yet.');
    if (rows.length) lastId = rows[rows.length - 1].id;
    more.hidden = rows.length < PAGE;
  }

  ctx.root.append(
    header('Audit log', 'Every change, by whom, when and from where.'),
    errors,
    card(null,
      h('div', { class: 'table-wrap' }, h('table', { class: 'grid audit', id: 'audit-table' },
        h('thead', null, h('tr', null, ['When', 'Actor', 'Action', 'Target', 'Details', 'From'].map((c) => h('th', null, c)))),
        tbody)),
      h('div', { class: 'more' }, more)));
  await load(true);
}
