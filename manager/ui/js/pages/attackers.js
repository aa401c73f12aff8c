// Attackers: search by address or range, block (action, TTL, reason, group), unblock, allow
// (add to the allowlist, then unblock). Operators and admins see the controls; viewers read.

import { del, get, groups, post } from '../api.js';
import {
  action, appendRows, badge, button, card, clear, confirmButton, errorBox, field, form, h, header,
  input, link, notice, num, replace, select, td, when,
} from '../dom.js';

export const TTLS = [
  ['3600', '1 hour'], ['86400', '24 hours'], ['604800', '7 days'], ['2592000', '30 days'], ['', 'Never (until unblocked)'],
];
const ACTIONS = [['default', 'Group mode (default)'], ['drop', 'Drop'], ['redirect', 'Redirect to sandbox'], ['reflect', 'Reflect']];
const PAGE = 100;

/** "203.0.113.7" for a /32 or /128, the range otherwise. */
export function netLabel(net) {
  return String(net).replace(/\/(32|128)$/, '');
}

/** Manual/automatic badge plus rule and service. */
export function source(a) {
  const what = [a.rule, a.service].filter(Boolean).join(' · ');
  return [badge(a.manual ? 'manual' : 'auto', a.manual ? 'manual' : 'auto'), what ? h('span', { class: 'sub-line nowrap' }, what) : null];
}

/** The name of a group id ("all groups" for null). */
export function groupName(list, id) {
  if (id == null) return 'all groups';
  return list.find((g) => g.id === id)?.name ?? `group ${id}`;
}

/**
 * Allows an entry: adds its network to the allowlist of its group (of every group for an
 * every-group entry), then removes the entry.
 */
export async function allow(attacker, groupList) {
  const names = attacker.group_id == null
    ? groupList.map((g) => g.name)
    : [groupName(groupList, attacker.group_id)];
  for (const name of names) {
    try {
      await post('/allowlist', { net: attacker.net, group: name });
    } catch (err) {
      if (err.status !== 409) throw err; // already allowlisted there: fine
    }
  }
  await del(`/attackers/${Number(attacker.id)}`);
}

export async function render(ctx) {
  const groupList = await groups();
  const errors = errorBox();
  const flash = h('div', { class: 'flash' });
  const tbody = h('tbody');
  const more = button('Load more', () => load(false), 'ghost', { hidden: true, id: 'attackers-more' });
  const countLine = h('span', { class: 'muted' });
  let q = ctx.query.get('q') || '';
  let lastId = null;

  const row = (a) => h('tr', { dataset: { id: a.id, net: a.net } },
    td('mono nowrap', link(`/attackers/${Number(a.id)}`, netLabel(a.net))),
    td('', action(a.action), h('span', { class: 'sub-line nowrap' }, groupName(groupList, a.group_id))),
    td('', source(a)),
    td('reason', a.reason || h('span', { class: 'muted' }, '—')),
    td('num', num(a.evidence_count)),
    td('nowrap', when(a.last_seen)),
    td('nowrap', a.expires_at ? when(a.expires_at) : h('span', { class: 'muted' }, 'never')),
    ctx.canOperate ? td('actions nowrap',
      confirmButton('Unblock', 'Confirm unblock', async () => {
        await del(`/attackers/${Number(a.id)}`);
        flashOk(`Unblocked ${netLabel(a.net)}.`);
        await load(true);
      }, errors, { class: 'btn btn-small btn-danger-soft unblock' }),
      confirmButton('Allow', 'Confirm allow', async () => {
        await allow(a, groupList);
        flashOk(`${netLabel(a.net)} is on the allowlist and no longer blocked.`);
        await load(true);
      }, errors, { class: 'btn btn-small btn-ghost allow', title: 'Add to the allowlist (never blocked again) and unblock' })) : null);

  function flashOk(text) {
    replace(flash, notice(text));
  }

  async function load(reset) {
    errors.show(null);
    if (reset) lastId = null;
    let list;
    try {
      list = await get('/attackers', { q, limit: PAGE, before: lastId });
    } catch (err) {
      errors.show(err);
      return;
    }
    if (!ctx.live()) return;
    if (reset) clear(tbody);
    appendRows(tbody, ctx.canOperate ? 8 : 7, list.map(row), q ? `No entry overlaps ${q}.` : 'No attackers blocked. Detections from mirage-server and manual blocks appear here.');
    if (list.length) lastId = list[list.length - 1].id;
    more.hidden = list.length < PAGE;
    const shown = tbody.querySelectorAll('tr[data-id]').length;
    countLine.textContent = shown ? `${num(shown)}${more.hidden ? '' : '+'} entr${shown === 1 ? 'y' : 'ies'}${q ? ` overlapping ${q}` : ''}` : '';
  }

  const search = form({ class: 'search', role: 'search', id: 'attackers-search' }, [
    input('q', { value: q, placeholder: 'Address or range, e.g. 203.0.113.0/24', id: 'attackers-q', class: 'mono', 'aria-label': 'Address or range' }),
    h('button', { type: 'submit', class: 'btn' }, 'Search'),
    button('Clear', () => { search.querySelector('input').value = ''; q = ''; load(true); }, 'ghost'),
  ], async (values) => {
    q = values.q.trim();
    await load(true);
  });

  let blockCard = null;
  if (ctx.canOperate) {
    const groupOptions = [['', 'All groups'], ...groupList.map((g) => [g.name, g.name])];
    const blockForm = form({ class: 'inline-form', id: 'block-form' }, [
      field('Address or range', input('net', { id: 'block-net', class: 'mono', placeholder: '198.51.100.7 or …/24', required: true })),
      field('Action', select('action', ACTIONS, 'default', { id: 'block-action' })),
      field('Expires after', select('ttl', TTLS, '86400', { id: 'block-ttl' })),
      field('Group', select('group', groupOptions, '', { id: 'block-group' })),
      field('Reason', input('reason', { id: 'block-reason', placeholder: 'Why (shown in the audit log)', maxlength: 1000 }), null),
      h('button', { type: 'submit', class: 'btn btn-danger', id: 'block-submit' }, 'Block'),
      ctx.isAdmin ? h('label', { class: 'check force' }, h('input', { type: 'checkbox', name: 'force', id: 'block-force' }),
        ' Allow a range broader than /16 (IPv4) or /32 (IPv6) — admins only') : null,
    ], async (values, f) => {
      const body = { net: values.net.trim(), action: values.action, reason: values.reason.trim() };
      if (values.ttl) body.ttl_secs = Number(values.ttl);
      if (values.group) body.group = values.group;
      if (values.force) body.force = true;
      const created = await post('/attackers', body);
      f.querySelector('[name=net]').value = '';
      f.querySelector('[name=reason]').value = '';
      flashOk(`Blocked ${netLabel(created.net)} (policy revision ${created.revision}); agents receive it now.`);
      await load(true);
    });
    blockCard = card('Block an address or range', blockForm);
  }

  const columns = ['Address', 'Action · group', 'Source', 'Reason', { label: 'Evidence', class: 'num' }, 'Last seen', 'Expires'];
  if (ctx.canOperate) columns.push('');
  ctx.root.append(
    header('Attackers', 'Addresses and ranges the agents drop, redirect or reflect.', search),
    blockCard,
    flash,
    errors,
    card(null,
      h('div', { class: 'card-tools' }, countLine),
      h('div', { class: 'table-wrap' }, h('table', { class: 'grid', id: 'attackers-table' },
        h('thead', null, h('tr', null, columns.map((c) => (typeof c === 'string' ? h('th', null, c) : h('th', { class: c.class }, c.label))))),
        tbody)),
      h('div', { class: 'more' }, more)));
  await load(true);
}
