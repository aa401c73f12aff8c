// Alert channels (admins edit, everyone reads) and recent deliveries. Each channel has a severity
// floor, a de-duplication window and an hourly cap beyond which detections wait for a digest.

import { del, get, patch, post } from '../api.js';
import {
  badge, button, card, confirmButton, duration, errorBox, field, form, h, header, input, muted, notice,
  num, replace, select, severity, table, td, when,
} from '../dom.js';

const KINDS = [['webhook', 'Webhook (JSON)'], ['slack', 'Slack-compatible webhook'], ['email', 'E-mail (SMTP)']];
const SEVERITIES = ['info', 'low', 'medium', 'high', 'critical'];

/** Where a channel sends to, for the table (the API already redacted secrets). */
function target(c) {
  const cfg = c.config || {};
  if (c.kind === 'email') {
    const to = Array.isArray(cfg.to) ? cfg.to.join(', ') : cfg.to;
    return [to || '—', cfg.host ? h('span', { class: 'sub-line' }, `via ${cfg.host}:${cfg.port ?? ''} (${cfg.tls ?? 'tls'})`) : null];
  }
  return cfg.url ?? '—';
}

/** A password input that shows a stored (redacted) secret as its value: sent back unchanged, the
 * manager keeps the stored one; cleared, the secret is removed. */
function secretInput(name, value, placeholder) {
  return h('input', { type: 'password', name, value: value ?? '', autocomplete: 'new-password', placeholder });
}

function channelForm(existing, onDone) {
  const c = existing || { kind: 'webhook', min_severity: 'medium', enabled: true, dedup_window_secs: 600, max_per_hour: 12, config: {} };
  const cfg = c.config || {};
  const kind = select('kind', KINDS, c.kind, { id: 'channel-kind', disabled: Boolean(existing) });
  const hookFields = h('div', { class: 'form-grid two' },
    field('URL', input('url', { value: cfg.url ?? '', class: 'mono', placeholder: 'https://hooks.example/…', id: 'channel-url' })),
    field('Signing secret (webhook, optional)', secretInput('secret', cfg.secret, '16+ random characters'),
      'Each POST carries X-Mirage-Signature: sha256=HMAC of the body.'));
  const mailFields = h('div', null,
    h('div', { class: 'form-grid' },
      field('SMTP host', input('host', { value: cfg.host ?? '', class: 'mono', placeholder: 'mail.example.org' })),
      field('Port', input('port', { value: cfg.port ?? 587, inputmode: 'numeric' })),
      field('Security', select('tls', [['starttls', 'STARTTLS (587)'], ['tls', 'TLS (465)'], ['none', 'none (local relay)']], cfg.tls ?? 'starttls')),
      field('SMTP user (optional)', input('username', { value: cfg.username ?? '' })),
      field('SMTP password', secretInput('password', cfg.password, 'optional'))),
    h('div', { class: 'form-grid two' },
      field('From', input('from', { value: cfg.from ?? '', placeholder: 'Mirage <mirage@example.org>' })),
      field('To', input('to', { value: Array.isArray(cfg.to) ? cfg.to.join(', ') : (cfg.to ?? ''), placeholder: 'soc@example.org, …' }))));
  const showKind = () => {
    hookFields.hidden = kind.value === 'email';
    mailFields.hidden = kind.value !== 'email';
    hookFields.querySelector('[name=secret]').closest('.field').hidden = kind.value !== 'webhook';
  };
  kind.addEventListener('change', showKind);
  showKind();
  return form({ class: 'channel-form', id: 'channel-form' }, [
    h('div', { class: 'form-grid' },
      field('Name', input('name', { value: c.name ?? '', required: true, id: 'channel-name' })),
      field('Kind', kind),
      field('Minimum severity', select('min_severity', SEVERITIES, c.min_severity)),
      h('label', { class: 'check field-check' }, h('input', { type: 'checkbox', name: 'enabled', checked: c.enabled !== false }), ' Enabled')),
    hookFields,
    mailFields,
    h('div', { class: 'form-grid' },
      field('De-duplication window (s)', input('dedup_window_secs', { value: c.dedup_window_secs ?? 600, inputmode: 'numeric' }), 'The same rule and attacker inside it is one alert.'),
      field('At most per hour', input('max_per_hour', { value: c.max_per_hour ?? 12, inputmode: 'numeric' }), 'Beyond this, detections wait for the next digest.')),
    h('div', { class: 'form-foot' },
      h('span'),
      h('span', { class: 'foot-tools' },
        button('Cancel', () => onDone(null), 'ghost'),
        h('button', { type: 'submit', class: 'btn btn-primary', id: 'channel-save' }, existing ? 'Save channel' : 'Add channel'))),
  ], async (values) => {
    let config;
    if (kind.value === 'email') {
      config = {
        host: values.host.trim(), port: Number(values.port), tls: values.tls, from: values.from.trim(),
        to: values.to.split(',').map((t) => t.trim()).filter(Boolean),
      };
      if (values.username.trim()) config.username = values.username.trim();
      if (values.password) config.password = values.password;
    } else {
      config = { url: values.url.trim() };
      if (kind.value === 'webhook' && values.secret) config.secret = values.secret;
    }
    const body = {
      name: values.name.trim(),
      min_severity: values.min_severity,
      enabled: values.enabled,
      dedup_window_secs: Number(values.dedup_window_secs),
      max_per_hour: Number(values.max_per_hour),
      config,
    };
    if (existing) await patch(`/alert-channels/${Number(existing.id)}`, body);
    else await post('/alert-channels', { ...body, kind: kind.value });
    onDone(body.name);
  });
}

export async function render(ctx) {
  const errors = errorBox();
  const flash = h('div', { class: 'flash' });
  const channels = h('div');
  const deliveries = h('div');
  const editorBox = h('div');
  let channelList = [];

  const openEditor = (existing) => {
    replace(editorBox, card(existing ? `Edit ${existing.name}` : 'Add a channel', channelForm(existing, (name) => {
      replace(editorBox);
      if (name) replace(flash, notice(`Saved ${name}.`));
      load();
    })));
  };
  const addButton = () => button('Add a channel', () => openEditor(null), 'primary', { id: 'channel-add' });

  async function loadChannels() {
    channelList = await get('/alert-channels');
    if (!ctx.live()) return;
    const cols = ['Channel', 'Kind', 'Target', 'Min. severity', 'De-dup', 'Max/hour', 'Status'];
    if (ctx.isAdmin) cols.push('');
    replace(channels, table(cols, channelList.map((c) => [
      td('', h('strong', null, c.name)),
      td('', c.kind),
      td('mono target', target(c)),
      td('', severity(c.min_severity)),
      td('nowrap', duration(c.dedup_window_secs)),
      td('num', num(c.max_per_hour)),
      td('', c.enabled ? badge('enabled', 'ok') : badge('disabled', 'muted')),
      ctx.isAdmin ? td('actions nowrap',
        button('Test', async (ev) => {
          errors.show(null);
          ev.target.disabled = true;
          try {
            const d = await post(`/alert-channels/${Number(c.id)}/test`);
            if (d && d.status === 'failed') errors.show(new Error(`The test message through ${c.name} failed: ${d.last_error ?? 'no reason given'}`));
            else replace(flash, notice(`Sent a test message through ${c.name}.`));
          } catch (err) { errors.show(err); } finally { ev.target.disabled = false; }
          loadDeliveries().catch(() => {});
        }, 'small btn-ghost'),
        button('Edit', () => openEditor(c), 'small btn-ghost'),
        confirmButton('Delete', 'Confirm delete', async () => {
          await del(`/alert-channels/${Number(c.id)}`);
          replace(flash, notice(`Deleted ${c.name}.`));
          await load();
        }, errors, { class: 'btn btn-small btn-danger-soft' })) : null,
    ]), { empty: ctx.isAdmin ? 'No channels. Add one to hear about attacks by e-mail or webhook.' : 'No channels configured.' }));
  }

  async function loadDeliveries() {
    const list = await get('/alert-deliveries', { limit: 50 });
    if (!ctx.live()) return;
    const name = (id) => channelList.find((c) => c.id === id)?.name ?? `channel ${id}`;
    replace(deliveries, table(['Created', 'Channel', 'Message', 'Status', { label: 'Detections', class: 'num' }, { label: 'Attempts', class: 'num' }, 'Sent', 'Last error'],
      (Array.isArray(list) ? list : list.deliveries || []).map((d) => [
        td('nowrap', when(d.created_at)),
        td('nowrap', d.channel ?? d.channel_name ?? name(d.channel_id)),
        td('subject', d.subject ?? d.dedup_key ?? ''),
        td('', badge(d.status, { sent: 'ok', failed: 'bad', pending: 'warn', suppressed: 'muted' }[d.status] ?? 'muted')),
        td('num', num(d.detection_count)),
        td('num', num(d.attempts)),
        td('nowrap', when(d.sent_at)),
        td('error-text', d.last_error ?? ''),
      ]), { empty: 'Nothing sent yet.' }));
  }

  async function load() {
    const results = await Promise.allSettled([loadChannels(), loadDeliveries()]);
    const failed = results.find((r) => r.status === 'rejected');
    if (failed && ctx.live()) {
      if (results[0].status === 'rejected') replace(channels, muted(results[0].reason.message));
      if (results[1].status === 'rejected') replace(deliveries, muted(results[1].reason.message));
    }
  }

  ctx.root.append(
    header('Alerts', 'Where detections are announced, and what was sent.', ctx.isAdmin ? addButton() : null),
    flash,
    errors,
    editorBox,
    card('Channels', channels),
    card('Recent deliveries', deliveries));
  await load();
}
