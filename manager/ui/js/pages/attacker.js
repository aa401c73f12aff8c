// One attacker: the entry, the detections (with evidence lines) that caught it, and everything
// it then did in the sandbox (credentials tried, commands, files). Every one of those strings is
// attacker-controlled and goes in as text.

import { del, get, groups } from '../api.js';
import {
  action, bytes, card, confirmButton, duration, errorBox, h, header, link, muted, notice, num, replace,
  severity, shortTime, table, td, when,
} from '../dom.js';
import { allow, groupName, netLabel, source } from './attackers.js';
import { evidenceBlock } from './log.js';

function facts(pairs) {
  return h('dl', { class: 'facts' }, pairs.filter(Boolean).map(([k, v]) => [h('dt', null, k), h('dd', null, v)]));
}

function detectionCard(d) {
  const lines = Array.isArray(d.evidence) ? d.evidence : [];
  return h('article', { class: 'detection-card', dataset: { id: d.id } },
    h('div', { class: 'detection-head' },
      severity(d.severity),
      h('strong', null, d.rule),
      h('span', { class: 'muted' }, d.service),
      d.count != null && d.count > 1 ? h('span', { class: 'muted' }, `${num(d.count)} events`) : null,
      h('span', { class: 'spacer' }),
      d.server_name ? h('span', { class: 'muted' }, d.server_name) : null,
      when(d.at)),
    evidenceBlock(lines));
}

function sessionCard(sess) {
  const creds = Array.isArray(sess.credentials) ? sess.credentials : [];
  const cmds = Array.isArray(sess.commands) ? sess.commands : [];
  const files = Array.isArray(sess.files) ? sess.files : [];
  const started = sess.started_at ? new Date(sess.started_at).getTime() : null;
  const ended = sess.ended_at ? new Date(sess.ended_at).getTime() : null;
  const lasted = started && ended ? duration((ended - started) / 1000) : 'still open';
  return h('article', { class: 'session-card', dataset: { id: sess.id } },
    h('div', { class: 'session-head' },
      h('strong', null, sess.service),
      h('span', { class: 'muted' }, `on ${sess.sandbox ?? sess.sandbox_name ?? 'sandbox'}`),
      h('span', { class: 'muted' }, `· ${lasted}`),
      h('span', { class: 'spacer' }),
      when(sess.started_at)),
    h('div', { class: 'session-grid' },
      h('section', null, h('h3', null, `Credentials tried (${creds.length})`),
        table(['User', 'Password', 'When'], creds.map((c) => [td('mono', String(c.user ?? '')), td('mono', String(c.password ?? '')), td('nowrap', when(c.at))]),
          { empty: 'None.', cls: 'compact credentials' })),
      h('section', null, h('h3', null, `Files (${files.length})`),
        table(['Path', 'Size', 'SHA-256'], files.map((f) => [td('mono', String(f.path ?? '')), td('num nowrap', bytes(f.size)), td('mono hash', h('span', { title: String(f.sha256 ?? '') }, String(f.sha256 ?? '').slice(0, 16)))]),
          { empty: 'None.', cls: 'compact files' }))),
    h('section', null, h('h3', null, `Commands (${cmds.length})`),
      cmds.length
        ? h('ol', { class: 'terminal' }, cmds.map((c) => h('li', null,
          h('span', { class: 'term-time', title: c.at ? new Date(c.at).toString() : '' }, c.at ? shortTime(c.at) : ''),
          h('span', { class: 'term-prompt' }, '$'),
          h('code', null, String(c.input ?? '')))))
        : muted('No commands.')));
}

export async function render(ctx) {
  const id = Number(ctx.params[0]);
  const errors = errorBox();
  const flash = h('div', { class: 'flash' });
  const [data, groupList] = await Promise.all([get(`/attackers/${id}`), groups()]);
  if (!ctx.live()) return;
  const a = data.attacker;
  const detections = data.detections || [];
  const sessions = data.sessions || [];
  const tools = [];
  if (ctx.canOperate) {
    tools.push(
      confirmButton('Unblock', 'Confirm unblock', async () => {
        await del(`/attackers/${id}`);
        replace(flash, notice(`Unblocked ${netLabel(a.net)}. The evidence stays in the attack log.`));
      }, errors, { class: 'btn btn-danger-soft', id: 'attacker-unblock' }),
      confirmButton('Allow', 'Confirm allow', async () => {
        await allow(a, groupList);
        replace(flash, notice(`${netLabel(a.net)} is on the allowlist and no longer blocked.`));
      }, errors, { class: 'btn btn-ghost', id: 'attacker-allow' }));
  }
  ctx.root.append(
    h('p', { class: 'crumbs' }, link('/attackers', 'Attackers'), ' / '),
    header(h('span', { class: 'mono title-mono' }, netLabel(a.net)), null, ...tools),
    flash,
    errors,
    h('div', { class: 'cols-aside' },
      card('Entry', facts([
        ['Action', action(a.action)],
        ['Source', source(a)],
        ['Group', groupName(groupList, a.group_id)],
        ['Reason', a.reason || '—'],
        ['Evidence', num(a.evidence_count)],
        ['First seen', when(a.first_seen, '—', { full: true })],
        ['Last seen', when(a.last_seen, '—', { full: true })],
        ['Expires', a.expires_at ? when(a.expires_at, '—', { full: true }) : 'never'],
        ['Reported by', a.reported_by?.length ? a.reported_by.join(', ') : '—'],
        ['Revision', String(a.revision)],
      ])),
      h('div', null,
        card(`Evidence (${detections.length} detection${detections.length === 1 ? '' : 's'})`,
          detections.length ? h('div', { class: 'stack', id: 'attacker-detections' }, detections.map(detectionCard)) : muted('No detections recorded for this entry (a manual block, or retention removed them).'),
          h('p', { class: 'card-foot' }, link(`/log?addr=${encodeURIComponent(netLabel(a.net))}`, 'All detections for this address in the attack log →'))),
        card(`Sandbox sessions (${sessions.length})`,
          sessions.length ? h('div', { class: 'stack', id: 'attacker-sessions' }, sessions.map(sessionCard)) : muted('No sandbox sessions: the attacker has not reached the sandbox (or the entry does not redirect).')))));
}
