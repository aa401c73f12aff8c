// Agents: enrollment tokens (shown once), the enrolled agents with mode, version and heartbeat,
// revoke, and each agent's reported per-IP counters.

import { del, get, groups, post } from '../api.js';
import {
  bytes, card, confirmButton, errorBox, field, form, h, header, muted, notice, num, replace,
  secretBox, select, table, td, when,
} from '../dom.js';
import { groupName, netLabel } from './attackers.js';

/** An agent whose last heartbeat is older than this is stale. */
const STALE_AFTER_MS = 2 * 60 * 1000;

/** `online`, `stale`, `never` or `revoked`. */
export function agentStatus(a) {
  if (a.revoked_at) return 'revoked';
  if (a.status) return a.status;
  if (!a.last_heartbeat) return 'never';
  return Date.now() - new Date(a.last_heartbeat).getTime() > STALE_AFTER_MS ? 'stale' : 'online';
}

/** A coloured dot with the status as its label. */
export function statusDot(status) {
  return h('span', { class: ['dot', `dot-${status}`], title: status, role: 'img', 'aria-label': status });
}

const TOKEN_TTLS = [['3600', '1 hour'], ['86400', '24 hours'], ['604800', '7 days']];

/** The top sources of an agent's counters report, as rows of {addr, action, packets, bytes, ...}. */
function topSources(counters) {
  if (!counters || typeof counters !== 'object') return [];
  const list = counters.top_sources ?? counters.sources ?? counters.per_ip ?? [];
  return Array.isArray(list) ? list : [];
}

function countersView(a) {
  const rows = topSources(a.counters);
  const at = a.counters_at ?? a.counters?.at;
  if (!rows.length) return muted(a.counters === undefined ? 'This manager does not report agent counters yet.' : 'The agent has not reported per-IP counters yet.');
  // Columns: address, then one pair (packets, bytes) per action present, then last seen.
  const perAction = rows.some((r) => r.actions && typeof r.actions === 'object');
  if (perAction) {
    const actions = [...new Set(rows.flatMap((r) => Object.keys(r.actions || {})))].sort();
    return h('div', null,
      at ? h('p', { class: 'muted' }, 'Reported ', when(at)) : null,
      table(['Source', ...actions.flatMap((x) => [{ label: `${x} pkts`, class: 'num' }, { label: `${x} bytes`, class: 'num' }]), 'Last seen'],
        rows.map((r) => [td('mono', netLabel(r.addr ?? r.ip ?? '')),
          ...actions.flatMap((x) => [td('num', num(r.actions?.[x]?.packets ?? 0)), td('num', bytes(r.actions?.[x]?.bytes ?? 0))]),
          td('nowrap', when(r.last_seen))]), { cls: 'compact counters' }));
  }
  return h('div', null,
    at ? h('p', { class: 'muted' }, 'Reported ', when(at)) : null,
    table(['Source', 'Action', { label: 'Packets', class: 'num' }, { label: 'Bytes', class: 'num' }, 'Last seen'],
      rows.map((r) => [td('mono', netLabel(r.addr ?? r.ip ?? '')), td('', r.action ?? '—'), td('num', num(r.packets)), td('num', bytes(r.bytes)), td('nowrap', when(r.last_seen))]),
      { cls: 'compact counters' }));
}

export async function render(ctx) {
  const groupList = await groups();
  const errors = errorBox();
  const flash = h('div', { class: 'flash' });
  const list = h('div');
  const showRevoked = h('input', { type: 'checkbox', id: 'agents-show-revoked' });

  async function load() {
    const agents = await get('/agents');
    if (!ctx.live()) return;
    const visible = agents.filter((a) => showRevoked.checked || !a.revoked_at);
    const columns = ['', 'Agent', 'Group', 'Addresses', 'Mode', 'Version', 'Applied rev.', 'Last heartbeat', 'Enrolled'];
    columns.push('');
    const rows = [];
    for (const a of visible) {
      const status = agentStatus(a);
      const detail = h('tr', { class: 'detail', hidden: true }, h('td', { colspan: columns.length }, countersView(a)));
      const toggle = h('button', { type: 'button', class: 'btn btn-small btn-ghost', title: 'Per-IP counters', 'aria-expanded': 'false' }, 'Counters');
      toggle.addEventListener('click', () => {
        detail.hidden = !detail.hidden;
        toggle.setAttribute('aria-expanded', String(!detail.hidden));
      });
      rows.push(h('tr', { class: status === 'revoked' ? 'revoked' : null, dataset: { id: a.id } },
        td('', statusDot(status)),
        td('', h('strong', null, a.name), a.hostname && a.hostname !== a.name ? h('span', { class: 'sub-line' }, a.hostname) : null),
        td('', groupName(groupList, a.group_id)),
        td('mono', (a.addresses || []).join(', ') || '—'),
        td('', a.mode || h('span', { class: 'muted' }, 'not reported')),
        td('mono', a.version || '—'),
        td('num', a.applied_revision != null ? String(a.applied_revision) : '—'),
        td('nowrap', when(a.last_heartbeat, 'never')),
        td('nowrap', when(a.enrolled_at)),
        td('actions nowrap', toggle, !ctx.canOperate || status === 'revoked' ? null : confirmButton('Revoke', 'Confirm revoke', async () => {
          await del(`/agents/${Number(a.id)}`);
          replace(flash, notice(`Revoked ${a.name}: its credential no longer works and its streams ended.`));
          await load();
        }, errors, { class: 'btn btn-small btn-danger-soft' }))), detail);
    }
    replace(list, table(columns, rows, { empty: agents.length ? 'Only revoked agents.' : 'No agents enrolled yet. Create an enrollment token above and give it to mirage-agent.', cls: 'agents' }));
  }
  showRevoked.addEventListener('change', () => load().catch((err) => errors.show(err)));

  let enrollCard = null;
  if (ctx.canOperate) {
    const result = h('div');
    const enroll = form({ class: 'inline-form', id: 'enroll-form' }, [
      field('Group', select('group', groupList.map((g) => g.name), 'default', { id: 'enroll-group' })),
      field('Valid for', select('ttl', TOKEN_TTLS, '3600', { id: 'enroll-ttl' })),
      h('button', { type: 'submit', class: 'btn btn-primary', id: 'enroll-submit' }, 'Create enrollment token'),
    ], async (values) => {
      const tok = await post('/enrollment-tokens', { group: values.group, ttl_secs: Number(values.ttl) });
      replace(result, secretBox(`One-time enrollment token for group ${tok.group}`, tok.token,
        `Valid until ${new Date(tok.expires_at).toLocaleString()} and for one enrollment. Shown this once: the manager keeps only its hash.`));
    });
    enrollCard = card('Enroll an agent', enroll, result);
  }

  ctx.root.append(
    header('Agents', 'The protected hosts enforcing the policy.', h('label', { class: 'check' }, showRevoked, ' Show revoked')),
    enrollCard,
    flash,
    errors,
    card(null, list));
  await load();
  const timer = setInterval(() => load().catch(() => {}), 30000);
  return () => clearInterval(timer);
}
