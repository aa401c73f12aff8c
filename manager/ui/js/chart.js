// Charts drawn by hand in SVG (no library: the console must work offline and be auditable).

import { h, link, num, s } from './dom.js';

/** The top of a y axis with four whole, round steps that reaches v: 4, 8, 20, 40, 100, 200… */
function niceCeil(v) {
  const raw = Math.max(1, v / 4);
  const mag = 10 ** Math.floor(Math.log10(raw));
  for (const m of [1, 2, 2.5, 5, 10]) {
    const step = m * mag;
    if (step >= raw && Number.isInteger(step)) return step * 4;
  }
  return 40 * mag;
}

const pad2 = (n) => String(n).padStart(2, '0');

/**
 * Attacks over time as a bar chart: `points` are `{t, count}` buckets (missing buckets count 0),
 * covering the last `hours` hours; `width` is the drawing width in CSS pixels.
 */
export function timeSeries(points, { hours = 24, width = 800, height = 190 } = {}) {
  const times = points.map((p) => new Date(p.t).getTime()).filter((t) => !Number.isNaN(t)).sort((a, b) => a - b);
  let step = 3600 * 1000;
  for (let i = 1; i < times.length; i += 1) {
    const d = times[i] - times[i - 1];
    if (d > 0 && d < step) step = d;
  }
  const now = Date.now();
  const end = Math.floor(now / step) * step;
  const start = Math.floor((now - hours * 3600 * 1000) / step) * step + step;
  const counts = new Map();
  for (const p of points) {
    const t = Math.floor(new Date(p.t).getTime() / step) * step;
    counts.set(t, (counts.get(t) || 0) + Number(p.count || 0));
  }
  const buckets = [];
  for (let t = start; t <= end; t += step) buckets.push({ t, count: counts.get(t) || 0 });

  const m = { top: 14, right: 12, bottom: 26, left: 44 };
  const w = Math.max(200, width);
  const innerW = w - m.left - m.right;
  const innerH = height - m.top - m.bottom;
  const max = niceCeil(Math.max(0, ...buckets.map((b) => b.count)));
  const y = (v) => m.top + innerH - (v / max) * innerH;
  const slot = innerW / Math.max(1, buckets.length);
  const barW = Math.max(1, slot * 0.72);

  const svg = s('svg', { class: 'chart', width: w, height, viewBox: `0 0 ${w} ${height}`, role: 'img', 'aria-label': `Attacks per ${step >= 3600000 ? 'hour' : 'interval'} over the last ${hours} hours` });
  // Grid and y labels.
  for (let i = 0; i <= 4; i += 1) {
    const v = (max / 4) * i;
    const yy = y(v);
    svg.appendChild(s('line', { class: i === 0 ? 'axis' : 'grid', x1: m.left, x2: w - m.right, y1: yy, y2: yy }));
    svg.appendChild(s('text', { class: 'tick', x: m.left - 6, y: yy + 4, 'text-anchor': 'end' }, num(v)));
  }
  // Bars.
  const multiDay = hours > 36;
  const labelEvery = Math.max(1, Math.ceil(buckets.length / Math.max(2, Math.floor(innerW / 64))));
  buckets.forEach((b, i) => {
    const x = m.left + i * slot + (slot - barW) / 2;
    const from = new Date(b.t);
    const to = new Date(b.t + step);
    const label = `${from.toLocaleString()} – ${pad2(to.getHours())}:${pad2(to.getMinutes())}: ${num(b.count)} detection${b.count === 1 ? '' : 's'}`;
    const g = s('g', { class: 'bar' }, s('title', null, label));
    // A full-height hit area makes thin bars easy to hover.
    g.appendChild(s('rect', { class: 'hit', x: m.left + i * slot, y: m.top, width: slot, height: innerH }));
    if (b.count > 0) g.appendChild(s('rect', { class: 'fill', x, y: y(b.count), width: barW, height: Math.max(1, y(0) - y(b.count)), rx: Math.min(2, barW / 2) }));
    svg.appendChild(g);
    if (i % labelEvery === 0) {
      const text = multiDay && from.getHours() === 0
        ? `${pad2(from.getMonth() + 1)}-${pad2(from.getDate())}`
        : `${pad2(from.getHours())}:${pad2(from.getMinutes())}`;
      svg.appendChild(s('text', { class: 'tick', x: m.left + i * slot + slot / 2, y: height - 8, 'text-anchor': 'middle' }, text));
    }
  });
  return svg;
}

/**
 * Horizontal bars: `items` are `{label, value, route?, mono?}`; the longest bar is the largest value.
 */
export function barList(items, { empty = 'No data.' } = {}) {
  if (!items.length) return h('p', { class: 'muted' }, empty);
  const max = Math.max(1, ...items.map((i) => Number(i.value) || 0));
  return h('ol', { class: 'bars' }, items.map((item) => {
    const fill = h('span', { class: 'bar-fill' });
    fill.style.width = `${Math.max(1, (100 * (Number(item.value) || 0)) / max)}%`;
    const label = item.route ? link(item.route, item.label) : item.label;
    return h('li', null,
      h('span', { class: ['bar-label', item.mono ? 'mono' : null], title: item.label }, label),
      h('span', { class: 'bar-track' }, fill),
      h('span', { class: 'bar-value' }, num(item.value)));
  }));
}
