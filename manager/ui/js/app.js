// The console shell: session bootstrap, the left navigation and hash routing. Each page module
// exports `render(ctx)`, which fills `ctx.root` and may return a cleanup function (closing an
// event stream, stopping a timer) that runs when the user leaves the page.

import { ApiError, get, post, setCsrf, setUnauthorizedHandler } from './api.js';
import { badge, clear, h, refreshAges, s } from './dom.js';
import * as agents from './pages/agents.js';
import * as alerts from './pages/alerts.js';
import * as attacker from './pages/attacker.js';
import * as attackers from './pages/attackers.js';
import * as audit from './pages/audit.js';
import * as dashboard from './pages/dashboard.js';
import * as log from './pages/log.js';
import * as login from './pages/login.js';
import * as policies from './pages/policies.js';
import * as settings from './pages/settings.js';
import * as users from './pages/users.js';

const RANK = { viewer: 0, operator: 1, admin: 2 };

// Icons: 24×24 stroke paths.
const ICONS = {
  dashboard: 'M4 13h6V4H4zM14 20h6v-9h-6zM4 20h6v-4H4zM14 4v4h6V4z',
  log: 'M5 5h14M5 10h14M5 15h9M5 20h6',
  attackers: 'M12 3l8 3v6c0 5-3.5 8-8 9-4.5-1-8-4-8-9V6z',
  agents: 'M4 5h16v10H4zM8 19h8M12 15v4',
  policies: 'M6 4h9l3 3v13H6zM9 10h6M9 14h6',
  alerts: 'M12 4a5 5 0 0 1 5 5v4l2 3H5l2-3V9a5 5 0 0 1 5-5zM10 19a2 2 0 0 0 4 0',
  users: 'M9 11a3.5 3.5 0 1 0 0-7 3.5 3.5 0 0 0 0 7zM3 20c0-3.5 2.7-6 6-6s6 2.5 6 6M16 4.5a3.5 3.5 0 0 1 0 6.5M18 14c2 .8 3 3 3 6',
  audit: 'M5 4h14v16H5zM8 8h8M8 12h8M8 16h5',
  settings: 'M12 9a3 3 0 1 0 0 6 3 3 0 0 0 0-6zM4 12h2M18 12h2M12 4v2M12 18v2M6.3 6.3l1.4 1.4M16.3 16.3l1.4 1.4M6.3 17.7l1.4-1.4M16.3 7.7l1.4-1.4',
};

const NAV = [
  { route: '/', label: 'Dashboard', icon: 'dashboard', page: dashboard },
  { route: '/log', label: 'Attack log', icon: 'log', page: log },
  { route: '/attackers', label: 'Attackers', icon: 'attackers', page: attackers },
  { route: '/agents', label: 'Agents', icon: 'agents', page: agents },
  { route: '/policies', label: 'Policies', icon: 'policies', page: policies },
  { route: '/alerts', label: 'Alerts', icon: 'alerts', page: alerts },
  { route: '/users', label: 'Users', icon: 'users', page: users, role: 'admin' },
  { route: '/audit', label: 'Audit log', icon: 'audit', page: audit, role: 'admin' },
  { route: '/settings', label: 'Settings', icon: 'settings', page: settings, role: 'admin' },
];

/** Routes beyond the nav entries: [pattern, page, nav route it highlights]. */
const EXTRA = [[/^\/attackers\/(\d+)$/, attacker, '/attackers']];

const state = { me: null, cleanup: null, shell: null, main: null, generation: 0 };

function icon(name) {
  return s('svg', { class: 'icon', viewBox: '0 0 24 24', 'aria-hidden': 'true' },
    s('path', { d: ICONS[name], fill: 'none', stroke: 'currentColor', 'stroke-width': 1.8, 'stroke-linecap': 'round', 'stroke-linejoin': 'round' }));
}

function allowed(entry) {
  return !entry.role || RANK[state.me.user.role] >= RANK[entry.role];
}

function currentPath() {
  const raw = location.hash.replace(/^#/, '') || '/';
  return raw.split('?')[0];
}

/** Parameters after `?` in the hash: `#/log?addr=1.2.3.4`. */
function hashParams() {
  const i = location.hash.indexOf('?');
  return new URLSearchParams(i >= 0 ? location.hash.slice(i + 1) : '');
}

function resolve(path) {
  for (const entry of NAV) {
    if (entry.route === path) return { entry, page: entry.page, params: [], nav: entry.route };
  }
  for (const [pattern, page, nav] of EXTRA) {
    const m = path.match(pattern);
    if (m) return { entry: NAV.find((n) => n.route === nav), page, params: m.slice(1), nav };
  }
  return null;
}

async function logout() {
  try {
    await post('/logout');
  } catch {
    // The session may already be gone; the login page follows either way.
  }
  setCsrf(null);
  state.me = null;
  showLogin();
}

function buildShell() {
  const me = state.me.user;
  const nav = h('nav', { class: 'nav', 'aria-label': 'Main' },
    NAV.filter(allowed).map((entry) => h('a', { href: `#${entry.route}`, dataset: { route: entry.route } }, icon(entry.icon), h('span', null, entry.label))));
  const main = h('main', { id: 'main', tabindex: '-1' });
  const shell = h('div', { class: 'shell' },
    h('aside', { class: 'sidebar' },
      h('a', { class: 'brand', href: '#/' }, h('img', { src: '/ui/icon.svg', alt: '', width: 26, height: 26 }), h('span', null, 'Mirage')),
      nav,
      h('div', { class: 'whoami' },
        h('div', { class: 'who' }, h('span', { class: 'user', title: me.username }, me.username), badge(me.role, `role-${me.role}`)),
        h('button', { type: 'button', class: 'btn btn-small btn-ghost', id: 'logout', onclick: logout }, 'Log out'))),
    main);
  state.shell = shell;
  state.main = main;
  const app = document.getElementById('app');
  app.classList.remove('booting');
  clear(app).appendChild(shell);
}

async function route() {
  if (!state.me) return;
  if (!state.shell) buildShell();
  if (state.cleanup) {
    try { state.cleanup(); } catch { /* a page's cleanup must not break navigation */ }
    state.cleanup = null;
  }
  const path = currentPath();
  const found = resolve(path);
  for (const a of state.shell.querySelectorAll('.nav a')) a.classList.toggle('active', found?.nav === a.dataset.route);
  const root = clear(state.main);
  const generation = ++state.generation;
  if (!found) {
    root.appendChild(h('div', { class: 'page' }, h('h1', null, 'Not found'), h('p', null, 'No page at this address. ', h('a', { href: '#/' }, 'Back to the dashboard'))));
    return;
  }
  if (found.entry && !allowed(found.entry)) {
    root.appendChild(h('div', { class: 'page' }, h('h1', null, found.entry.label), h('p', { class: 'error' }, `This page needs the ${found.entry.role} role; you are ${state.me.user.role}.`)));
    return;
  }
  document.title = `${found.entry?.label ?? 'Mirage'} · Mirage`;
  const page = h('div', { class: 'page' });
  root.appendChild(page);
  const role = state.me.user.role;
  const ctx = {
    root: page,
    me: state.me.user,
    role,
    canOperate: RANK[role] >= RANK.operator,
    isAdmin: role === 'admin',
    params: found.params,
    query: hashParams(),
    /** False once the user navigated away (async work checks before touching the page). */
    live: () => generation === state.generation,
  };
  try {
    const cleanup = await found.page.render(ctx);
    if (typeof cleanup === 'function') {
      if (ctx.live()) state.cleanup = cleanup;
      else cleanup();
    }
  } catch (err) {
    if (ctx.live()) page.appendChild(h('p', { class: 'error' }, err instanceof ApiError ? err.message : `This page failed: ${err.message}`));
  }
}

function showLogin(message) {
  if (state.cleanup) {
    try { state.cleanup(); } catch { /* ignore */ }
    state.cleanup = null;
  }
  state.shell = null;
  state.main = null;
  state.generation += 1;
  document.title = 'Log in · Mirage';
  const app = document.getElementById('app');
  app.classList.remove('booting');
  login.render(clear(app), message, (session) => {
    state.me = session;
    setCsrf(session.csrf_token);
    if (!location.hash || location.hash === '#/login') location.hash = '#/';
    route();
  });
}

async function boot() {
  setUnauthorizedHandler(() => {
    if (state.me) {
      state.me = null;
      setCsrf(null);
      showLogin('Your session ended. Log in again.');
    }
  });
  window.addEventListener('hashchange', route);
  setInterval(refreshAges, 15000);
  try {
    const me = await get('/me');
    state.me = me;
    setCsrf(me.csrf_token);
    route();
  } catch (err) {
    showLogin(err.status === 401 ? null : err.message);
  }
}

boot();
