// Users (admins only): create (a generated password is shown once), change role, disable or
// enable, set a new password, delete. The manager refuses to remove the last enabled admin and
// says so; that message appears inline.

import { del, get, patch, post } from '../api.js';
import {
  badge, button, card, confirmButton, errorBox, field, form, h, header, input, notice, replace,
  secretBox, select, table, td, when,
} from '../dom.js';

const ROLES = ['viewer', 'operator', 'admin'];

export async function render(ctx) {
  const errors = errorBox();
  const flash = h('div', { class: 'flash' });
  const list = h('div');

  async function load() {
    const users = await get('/users');
    if (!ctx.live()) return;
    replace(list, table(['User', 'Role', 'Status', 'Created', 'Updated', ''], users.map((u) => {
      const self = u.id === ctx.me.id;
      const role = select('role', ['viewer', 'operator', 'admin'], u.role, { 'aria-label': `Role of ${u.username}`, class: 'small' });
      role.addEventListener('change', async () => {
        errors.show(null);
        try {
          await patch(`/users/${Number(u.id)}`, { role: role.value });
          replace(flash, notice(`${u.username} is now ${role.value}.`));
        } catch (err) {
          errors.show(err);
          role.value = u.role;
        }
      });
      const pwForm = form({ class: 'inline-mini', hidden: true }, [
        h('input', { type: 'password', name: 'password', placeholder: 'new password', autocomplete: 'new-password', 'aria-label': `New password for ${u.username}` }),
        h('button', { type: 'submit', class: 'btn btn-small' }, 'Set'),
      ], async (values, f) => {
        await patch(`/users/${Number(u.id)}`, { password: values.password });
        f.hidden = true;
        replace(flash, notice(`Password of ${u.username} changed; their sessions ended.`));
      });
      return [
        td('', h('strong', null, u.username), self ? h('span', { class: 'muted' }, ' (you)') : null),
        td('', role),
        td('', u.disabled ? badge('disabled', 'muted') : badge('enabled', 'ok')),
        td('nowrap', when(u.created_at)),
        td('nowrap', when(u.updated_at)),
        td('actions nowrap',
          button('Password…', () => { pwForm.hidden = !pwForm.hidden; }, 'small btn-ghost'),
          button(u.disabled ? 'Enable' : 'Disable', async () => {
            errors.show(null);
            try {
              await patch(`/users/${Number(u.id)}`, { disabled: !u.disabled });
              replace(flash, notice(`${u.username} ${u.disabled ? 'enabled' : 'disabled'}.`));
              await load();
            } catch (err) { errors.show(err); }
          }, 'small btn-ghost'),
          confirmButton('Delete', 'Confirm delete', async () => {
            await del(`/users/${Number(u.id)}`);
            replace(flash, notice(`Deleted ${u.username}.`));
            await load();
          }, errors, { class: 'btn btn-small btn-danger-soft' }),
          pwForm),
      ];
    }), { cls: 'users' }));
  }

  const created = h('div');
  const createForm = form({ class: 'inline-form', id: 'user-form' }, [
    field('Username', input('username', { required: true, placeholder: 'a-z 0-9 . _ @ -', id: 'user-name' })),
    field('Role', select('role', ROLES, 'viewer', { id: 'user-role' })),
    field('Password', h('input', { type: 'password', name: 'password', autocomplete: 'new-password', placeholder: 'empty: generate one', id: 'user-password' })),
    h('button', { type: 'submit', class: 'btn btn-primary', id: 'user-submit' }, 'Create user'),
  ], async (values, f) => {
    const body = { username: values.username.trim(), role: values.role };
    if (values.password) body.password = values.password;
    const res = await post('/users', body);
    f.reset();
    replace(created, res.password
      ? secretBox(`Generated password for ${res.user.username}`, res.password, 'Shown this once. Give it to the user over a safe channel.')
      : notice(`Created ${res.user.username} (${res.user.role}).`));
    await load();
  });

  ctx.root.append(
    header('Users', 'Viewers read everything; operators also block, allow and edit policies and agents; admins also manage users, alerts and settings.'),
    card('Add a user', createForm, created),
    flash,
    errors,
    card(null, list));
  await load();
}
