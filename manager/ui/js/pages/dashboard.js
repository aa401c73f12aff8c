// Dashboard: attacks over time (SVG), top attackers, attacks per service, agent health. Refreshes
// every 30 s while open.

import { get } from '../api.js';
import { barList, timeSeries } from '../chart.js';
import { card, h, header, link, num, replace, table, td, when, errorBox, muted } from '../dom.js';
import { agentStatus, statusDot } from './agents.js';

const RANGES = [[24, '24 h'], [24 * 7, '7 days'], [24 * 30, '30 days']];

function stat(label, value, detail, kind) {
  return h('div', { class: ['stat', kind ? `stat-${kind}` : null] },
    h('div', { class: 'stat-label' }, label),
    h('div', { class: 'stat-value' }, value),
    h('div', { class: 'stat-detail' }, detail || '\u00a0'));
}

function entries(value, key) {
  // per_service / per_severity may come as [{service, count}] or as {name: count}.
  if (Array.isArray(value)) return value.map((v) => ({ name: v[key] ?? v.name, count: v.count }));
  return Object.entries(value || {}).map(([name, count]) => ({ name, count }));
}

export async function render(ctx) {
  let hours = Number(ctx.query.get('hours')) || 24;
  const rangeButtons = h('div', { class: 'segmented', role: 'group', 'aria-label': 'Time range' });
  const stats = h('div', { class: 'stats' });
  const chartBox = h('div', { class: 'chart-box' });
  const top = h('div');
  const services = h('div');
  const health = h('div');
  const errors = errorBox();
  ctx.root.append(
    header('Dashboard', 'What the sensors caught, and whether every agent is enforcing.', rangeButtons),
    errors,
    stats,
    card('Detections over time', chartBox),
    h('div', { class: 'cols-3' },
      card('Top attackers', top),
      card('Attacks per service', services),
      card('Agent health', health)));

  let last = null;
  const drawChart = () => {
    if (!last) return;
    replace(chartBox, timeSeries(last.attacks_over_time || [], { hours, width: chartBox.clientWidth || 800 }));
  };

  const load = async () => {
    const [statsRes, agentsRes] = await Promise.allSettled([get('/stats', { hours }), get('/agents')]);
    if (!ctx.live()) return;
    errors.show(null);
    const agents = agentsRes.status === 'fulfilled' ? agentsRes.value : [];
    if (statsRes.status === 'fulfilled') {
      last = statsRes.value;
      const st = last;
      const total = (st.attacks_over_time || []).reduce((a, p) => a + Number(p.count || 0), 0);
      const sev = entries(st.per_severity, 'severity');
      const severe = sev.filter((e) => e.name === 'high' || e.name === 'critical').reduce((a, e) => a + Number(e.count || 0), 0);
      const ag = st.agents || {};
      const at = st.attackers || {};
      replace(stats,
        stat(`Detections (${RANGES.find((r) => r[0] === hours)?.[1] ?? `${hours} h`})`, num(total), severe ? `${num(severe)} high or critical` : 'none high or critical'),
        stat('Live attacker entries', num(at.live), `${num(at.automatic)} automatic · ${num(at.manual)} manual`),
        stat('Agents online', `${num(ag.online)} / ${num((ag.total ?? 0) - (ag.revoked ?? 0))}`,
          `${num(ag.stale)} stale · ${num(ag.revoked)} revoked`, ag.stale ? 'warn' : null),
        stat('Services attacked', num(entries(st.per_service, 'service').filter((e) => e.count > 0).length), 'in this range'));
      drawChart();
      replace(top, barList((st.top_attackers || []).map((a) => ({
        label: a.addr, value: a.count, mono: true, route: a.attacker_id ? `/attackers/${Number(a.attacker_id)}` : null,
      })), { empty: 'No attacks in this range.' }));
      replace(services, barList(entries(st.per_service, 'service').sort((a, b) => b.count - a.count)
        .map((e) => ({ label: e.name, value: e.count })), { empty: 'No attacks in this range.' }));
    } else {
      last = null;
      const msg = statsRes.reason.message;
      replace(stats);
      replace(chartBox, muted(msg));
      replace(top, muted(msg));
      replace(services, muted(msg));
    }
    if (agentsRes.status === 'fulfilled') {
      const live = agents.filter((a) => !a.revoked_at);
      replace(health, live.length
        ? table(['Agent', 'Mode', 'Heartbeat'], live.map((a) => {
          const status = agentStatus(a);
          return [td('nowrap', statusDot(status), ' ', link('/agents', a.name)), td('', a.mode || '—'), td('nowrap', when(a.last_heartbeat, 'never'))];
        }), { cls: 'compact' })
        : h('p', { class: 'muted' }, 'No agents enrolled. ', link('/agents', 'Enroll one'), '.'));
    } else {
      replace(health, muted(agentsRes.reason.message));
    }
  };

  const setRange = (value) => {
    hours = value;
    for (const b of rangeButtons.children) b.classList.toggle('active', Number(b.dataset.hours) === hours);
    load().catch((err) => errors.show(err));
  };
  for (const [value, label] of RANGES) {
    rangeButtons.appendChild(h('button', { type: 'button', class: ['seg', value === hours ? 'active' : null], dataset: { hours: value }, onclick: () => setRange(value) }, label));
  }

  await load();
  const timer = setInterval(() => load().catch((err) => errors.show(err)), 30000);
  const onResize = () => drawChart();
  window.addEventListener('resize', onResize);
  return () => {
    clearInterval(timer);
    window.removeEventListener('resize', onResize);
  };
}
