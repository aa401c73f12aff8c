// Policies: one per agent group (mode, redirect model, allowlisted sources and ports, sandbox
// targets, NAT settings, defaults for automatic entries). Operators edit; viewers read. The
// manager validates every field and its message is shown next to the form.

import { del, get, groups, post, put } from '../api.js';
import {
  button, card, clear, confirmButton, duration, errorBox, field, form, h, header, input, muted, notice,
  replace, select, when,
} from '../dom.js';

const MODES = ['unreal', 'honeypot', 'reflect', 'firewall'];
const MODE_HINTS = {
  unreal: 'Only attackers are moved to the sandbox; everyone else is untouched.',
  honeypot: 'Everything but allowlisted sources and ports goes to the sandbox (a decoy host).',
  reflect: 'Attackers are connected back to themselves (rate-capped).',
  firewall: 'Attackers are dropped.',
};
const MODELS = ['preserve-source', 'full-nat'];
const MODEL_HINTS = {
  'preserve-source': 'DNAT only: the sandbox sees the attacker’s real address.',
  'full-nat': 'DNAT + SNAT: the sandbox can be anywhere on the network.',
};

/** A select whose hint line follows its value. */
function hinted(label, control, hints) {
  const hint = h('span', { class: 'hint' });
  const show = () => { hint.textContent = hints[control.value] ?? ''; };
  control.addEventListener('change', show);
  show();
  return h('label', { class: 'field' }, h('span', { class: 'label' }, label), control, hint);
}
const DEFAULT_ACTIONS = [['default', 'the mode’s action'], ['drop', 'drop'], ['redirect', 'redirect'], ['reflect', 'reflect'], ['pass', 'pass (record only)']];

function lines(text) {
  return text.split(/[\n,]+/).map((l) => l.trim()).filter(Boolean);
}

function targetRow(t, readOnly) {
  const row = h('div', { class: 'target-row' },
    select('proto', [['', 'any'], ['tcp', 'tcp'], ['udp', 'udp']], t.proto ?? '', { disabled: readOnly, 'aria-label': 'Protocol' }),
    input('port', { value: t.port ?? '', placeholder: 'any port', class: 'port', disabled: readOnly, 'aria-label': 'Port', inputmode: 'numeric' }),
    h('span', { class: 'arrow' }, '→'),
    input('target', { value: t.target ?? '', placeholder: 'sandbox address[:port]', class: 'mono', disabled: readOnly, 'aria-label': 'Sandbox target' }),
    readOnly ? null : button('Remove', () => row.remove(), 'small btn-ghost'));
  return row;
}

function readTargets(box) {
  return [...box.querySelectorAll('.target-row')].map((row) => {
    const t = { target: row.querySelector('[name=target]').value.trim() };
    const proto = row.querySelector('[name=proto]').value;
    const port = row.querySelector('[name=port]').value.trim();
    if (proto) t.proto = proto;
    if (port) t.port = Number(port);
    return t;
  }).filter((t) => t.target);
}

function editor(ctx, group, policy, onSaved) {
  const ro = !ctx.canOperate;
  const targets = h('div', { class: 'targets' }, (Array.isArray(policy.sandbox_targets) ? policy.sandbox_targets : []).map((t) => targetRow(t, ro)));
  const ttl = input('default_ttl_secs', { value: policy.default_ttl_secs ?? '', placeholder: 'never', inputmode: 'numeric', disabled: ro, id: 'policy-ttl' });
  const ttlHint = h('span', { class: 'hint' });
  const showTtl = () => { ttlHint.textContent = ttl.value.trim() ? `= ${duration(Number(ttl.value))}` : 'empty: until removed'; };
  ttl.addEventListener('input', showTtl);
  showTtl();
  const nat = policy.nat && typeof policy.nat === 'object' ? policy.nat : {};
  const ports = Array.isArray(nat.nat_ports) ? nat.nat_ports.join('-') : (nat.nat_ports ?? '');
  return form({ class: 'policy-form', id: 'policy-form' }, [
    h('div', { class: 'form-grid' },
      hinted('Mode', select('mode', MODES, policy.mode, { disabled: ro, id: 'policy-mode' }), MODE_HINTS),
      hinted('Redirect model', select('redirect_model', MODELS, policy.redirect_model, { disabled: ro }), MODEL_HINTS),
      field('Auto entries: action', select('default_action', DEFAULT_ACTIONS, policy.default_action, { disabled: ro }), 'What a detection makes agents do.'),
      h('label', { class: 'field' }, h('span', { class: 'label' }, 'Auto entries: lifetime (s)'), ttl, ttlHint)),
    h('div', { class: 'form-grid two' },
      field('Allowlisted sources (never acted on)', h('textarea', { name: 'allowlist', rows: 5, class: 'mono', disabled: ro, id: 'policy-allowlist', spellcheck: 'false', placeholder: 'one address or range per line' }, (policy.allowlist || []).join('\n')),
        'Admin workstations, the manager and the servers. An over-broad range is refused.'),
      field('Allowlisted ports (honeypot mode)', h('textarea', { name: 'allowlisted_ports', rows: 5, class: 'mono', disabled: ro, spellcheck: 'false', placeholder: 'tcp/22\nudp/53\n443' }, (policy.allowlisted_ports || []).join('\n')),
        'Left to the real services in honeypot mode: tcp/22, udp/53, or a bare port for both.')),
    h('div', { class: 'field' }, h('span', { class: 'label' }, 'Sandbox targets'), targets,
      ro ? null : h('div', null, button('Add target', () => targets.appendChild(targetRow({}, false)), 'small btn-ghost')),
      h('span', { class: 'hint' }, 'Protected port → sandbox address:port. A row without a port is the default target.')),
    h('div', { class: 'field' }, h('span', { class: 'label' }, 'NAT and reflect'),
      h('div', { class: 'form-grid nat' },
        field('full-nat source IPv4', input('snat_v4', { value: nat.snat_v4 ?? '', class: 'mono', placeholder: 'this host toward the sandbox', disabled: ro })),
        field('full-nat source IPv6', input('snat_v6', { value: nat.snat_v6 ?? '', class: 'mono', placeholder: 'optional', disabled: ro })),
        field('full-nat source ports', input('nat_ports', { value: ports, class: 'mono', placeholder: '20000-29999', disabled: ro })),
        field('Reflect cap (packets/s per source)', input('reflect_pps', { value: nat.reflect_pps ?? '', inputmode: 'numeric', placeholder: 'default', disabled: ro }), '0 switches reflection off.'))),
    h('div', { class: 'form-foot' },
      h('span', { class: 'muted' }, `Revision ${policy.revision ?? '—'}`, policy.updated_by ? ` · changed by ${policy.updated_by} ` : ' · changed ', policy.updated_at ? when(policy.updated_at) : null),
      ro ? h('span', { class: 'muted' }, 'Read-only: editing needs the operator role.')
        : h('span', { class: 'foot-tools' },
          ctx.isAdmin ? h('label', { class: 'check', title: 'Ranges broader than /16 (IPv4) or /32 (IPv6), or a honeypot with nothing allowlisted' }, h('input', { type: 'checkbox', name: 'force' }), ' Allow broad ranges') : null,
          h('button', { type: 'submit', class: 'btn btn-primary', id: 'policy-save' }, 'Save policy'))),
  ], async (values, f) => {
    const natBody = {};
    if (values.snat_v4.trim()) natBody.snat_v4 = values.snat_v4.trim();
    if (values.snat_v6.trim()) natBody.snat_v6 = values.snat_v6.trim();
    if (values.nat_ports.trim()) natBody.nat_ports = values.nat_ports.trim();
    if (String(values.reflect_pps).trim() !== '') natBody.reflect_pps = Number(values.reflect_pps);
    const body = {
      mode: values.mode,
      redirect_model: values.redirect_model,
      default_action: values.default_action,
      default_ttl_secs: values.default_ttl_secs.trim() ? Number(values.default_ttl_secs) : null,
      allowlist: lines(values.allowlist),
      allowlisted_ports: lines(values.allowlisted_ports),
      sandbox_targets: readTargets(f),
      nat: natBody,
      expected_revision: policy.revision,
    };
    if (values.force) body.force = true;
    const saved = await put(`/groups/${encodeURIComponent(group.name)}/policy`, body);
    onSaved(saved);
  });
}

/** Attacker entries the new allowlist overrides (the agents will not act on them). */
function shadowedNote(list) {
  return h('div', { class: 'notice notice-warn' },
    h('strong', null, `The allowlist now overrides ${list.length} attacker entr${list.length === 1 ? 'y' : 'ies'}: `),
    list.map((x, i) => [i ? ', ' : '', h('span', { class: 'mono' }, `${x.net}`), ` (by ${x.allowlisted_by})`]));
}

export async function render(ctx) {
  const errors = errorBox();
  const flash = h('div', { class: 'flash' });
  const side = h('div', { class: 'group-list' });
  const pane = h('div');
  let current = ctx.query.get('group') || 'default';

  async function showGroup(list) {
    const group = list.find((g) => g.name === current) ?? list[0];
    if (!group) { replace(pane, muted('No groups.')); return; }
    current = group.name;
    for (const b of side.querySelectorAll('.group-item')) b.classList.toggle('active', b.dataset.name === current);
    replace(pane, card(`Policy of ${group.name}`, h('div', { class: 'loading' }, 'Loading…')));
    let policy;
    try {
      policy = await get(`/groups/${encodeURIComponent(group.name)}/policy`);
    } catch (err) {
      replace(pane, card(`Policy of ${group.name}`, h('p', { class: 'error' }, err.message)));
      return;
    }
    if (!ctx.live()) return;
    const tools = [];
    if (ctx.isAdmin && group.name !== 'default') {
      tools.push(confirmButton('Delete group', 'Confirm delete', async () => {
        await del(`/groups/${encodeURIComponent(group.name)}`);
        replace(flash, notice(`Deleted group ${group.name}.`));
        current = 'default';
        await load();
      }, errors, { class: 'btn btn-small btn-danger-soft' }));
    }
    replace(pane, card(null,
      h('div', { class: 'card-title-row' }, h('h2', null, `Policy of ${group.name}`), ...tools),
      group.description ? h('p', { class: 'muted' }, group.description) : null,
      editor(ctx, group, policy, (saved) => {
        if (saved && saved.changed === false) {
          replace(flash, notice(`Nothing changed in the policy of ${group.name}.`));
          return;
        }
        const rev = saved?.policy?.revision;
        replace(flash, notice(`Saved the policy of ${group.name}${rev ? ` (revision ${rev})` : ''}; its agents apply it now.`),
          saved?.shadowed?.length ? shadowedNote(saved.shadowed) : null);
        load();
      })));
  }

  async function load() {
    const list = await groups();
    if (!ctx.live()) return;
    clear(side);
    for (const g of list) {
      side.appendChild(h('button', { type: 'button', class: 'group-item', dataset: { name: g.name }, onclick: () => { current = g.name; showGroup(list); } },
        h('strong', null, g.name),
        h('span', { class: 'muted small' }, g.policy?.mode ?? '', g.agents != null ? ` · ${g.agents} agent${g.agents === 1 ? '' : 's'}` : '')));
    }
    if (ctx.isAdmin) {
      side.appendChild(form({ class: 'new-group', id: 'group-form' }, [
        input('name', { placeholder: 'new group name', 'aria-label': 'New group name', required: true }),
        h('button', { type: 'submit', class: 'btn btn-small' }, 'Add group'),
      ], async (values) => {
        const name = values.name.trim();
        await post('/groups', { name });
        current = name;
        replace(flash, notice(`Created group ${name} with the default policy.`));
        await load();
      }));
    }
    await showGroup(list);
  }

  ctx.root.append(
    header('Policies', 'What each group of agents enforces besides the attacker list.'),
    flash,
    errors,
    h('div', { class: 'cols-side' }, card('Groups', side), pane));
  await load();
}
