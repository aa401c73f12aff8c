// Settings (admins): retention of the evidence tables, and the service credentials that
// mirage-server instances use to report verdicts (shown once, revocable).

import { del, get, post, put } from '../api.js';
import {
  badge, card, confirmButton, errorBox, field, form, h, header, input, muted, notice, replace,
  secretBox, table, td, when,
} from '../dom.js';

const RETENTION = [
  ['detections_days', 'Detections (attack log)'],
  ['sandbox_sessions_days', 'Sandbox sessions'],
  ['audit_log_days', 'Audit log'],
  ['login_attempts_days', 'Login attempts'],
  ['policy_revisions_days', 'Policy revisions'],
];

export async function render(ctx) {
  const errors = errorBox();
  const flash = h('div', { class: 'flash' });
  const retentionBox = h('div');
  const credsBox = h('div');
  const createdBox = h('div');

  async function loadRetention() {
    let r;
    try {
      r = await get('/settings/retention');
    } catch (err) {
      replace(retentionBox, muted(err.message));
      return;
    }
    if (!ctx.live()) return;
    const values = r.retention ?? r;
    replace(retentionBox, form({ class: 'retention-form', id: 'retention-form' }, [
      h('div', { class: 'form-grid' }, RETENTION.map(([key, label]) => field(`${label} (days)`, input(key, { value: values[key] ?? '', inputmode: 'numeric' })))),
      h('div', { class: 'form-foot' }, h('span', { class: 'muted' }, 'Older rows are deleted by the manager.'), h('button', { type: 'submit', class: 'btn btn-primary' }, 'Save retention')),
    ], async (v) => {
      const body = {};
      for (const [key] of RETENTION) if (String(v[key]).trim() !== '') body[key] = Number(v[key]);
      await put('/settings/retention', body);
      replace(flash, notice('Retention saved.'));
    }));
  }

  async function loadCreds() {
    const list = await get('/service-credentials');
    if (!ctx.live()) return;
    replace(credsBox, table(['Server', 'Status', 'Created', 'Last used', ''], list.map((c) => [
      td('', h('strong', null, c.name)),
      td('', c.revoked_at ? badge('revoked', 'muted') : badge('active', 'ok')),
      td('nowrap', when(c.created_at)),
      td('nowrap', when(c.last_used_at, 'never')),
      td('actions', c.revoked_at ? null : confirmButton('Revoke', 'Confirm revoke', async () => {
        await del(`/service-credentials/${Number(c.id)}`);
        replace(flash, notice(`Revoked ${c.name}.`));
        await loadCreds();
      }, errors, { class: 'btn btn-small btn-danger-soft' })),
    ]), { empty: 'No server credentials. mirage-server needs one to report verdicts.' }));
  }

  const createForm = form({ class: 'inline-form', id: 'credential-form' }, [
    field('Server name', input('name', { required: true, placeholder: 'server-1' })),
    h('button', { type: 'submit', class: 'btn btn-primary' }, 'Create credential'),
  ], async (values, f) => {
    const res = await post('/service-credentials', { name: values.name.trim() });
    f.reset();
    replace(createdBox, secretBox(`Credential for ${res.name}`, res.credential, 'Shown this once. Put it in the server’s configuration; the manager keeps only its hash.'));
    await loadCreds();
  });

  ctx.root.append(
    header('Settings', 'Retention and server credentials.'),
    flash,
    errors,
    h('div', { class: 'cols-2' },
      card('Retention', retentionBox),
      card('Server credentials', createForm, createdBox, credsBox)));
  await Promise.all([loadRetention(), loadCreds().catch((err) => replace(credsBox, muted(err.message)))]);
}
