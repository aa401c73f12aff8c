// The login form. Errors (wrong password, throttled) come from the API and are shown inline.

import { post } from '../api.js';
import { field, form, h, input } from '../dom.js';

export function render(container, message, onLogin) {
  const user = input('username', { id: 'login-username', autocomplete: 'username', required: true, autofocus: true });
  const pass = h('input', { name: 'password', id: 'login-password', type: 'password', autocomplete: 'current-password', required: true });
  const f = form({ class: 'login-form', id: 'login-form' }, [
    field('Username', user),
    field('Password', pass),
    h('button', { type: 'submit', class: 'btn btn-primary btn-wide', id: 'login-submit' }, 'Log in'),
  ], async (values) => {
    const session = await post('/login', { username: values.username, password: values.password });
    onLogin(session);
  });
  if (message) f.errors.show(new Error(message));
  container.appendChild(h('div', { class: 'login-page' },
    h('div', { class: 'login-card' },
      h('div', { class: 'login-brand' }, h('img', { src: '/ui/icon.svg', alt: '', width: 40, height: 40 }),
        h('div', null, h('h1', null, 'Mirage'), h('p', { class: 'sub' }, 'Attack deception console'))),
      f)));
  user.focus();
}
