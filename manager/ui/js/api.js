// The JSON API client. The session lives in an HttpOnly cookie the script never sees; the CSRF
// token (from login or GET /api/v1/me) is kept in memory only and sent on every state-changing
// request in X-CSRF-Token.

let csrfToken = null;
let onUnauthorized = () => {};

/** Sets the CSRF token (null after logout). */
export function setCsrf(token) {
  csrfToken = token;
}

/** Called on a 401 from anything but the login call: the session ended. */
export function setUnauthorizedHandler(fn) {
  onUnauthorized = fn;
}

/** An API failure with the manager's message. */
export class ApiError extends Error {
  constructor(status, message, path) {
    super(message);
    this.status = status;
    this.path = path;
  }

  /** The endpoint does not exist on this manager (an unknown route answers 404 with no body). */
  get missing() {
    return this.status === 404 && this.bare;
  }
}

/** `?a=1&b=2` from an object, leaving out empty values. */
export function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params || {})) {
    if (v !== undefined && v !== null && v !== '') q.set(k, String(v));
  }
  const s = q.toString();
  return s ? `?${s}` : '';
}

/** Calls `/api/v1{path}`; resolves to the parsed JSON (or null), throws ApiError. */
export async function api(method, path, body) {
  const headers = { Accept: 'application/json' };
  const init = { method, headers, credentials: 'same-origin', cache: 'no-store' };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  if (method !== 'GET' && csrfToken) headers['X-CSRF-Token'] = csrfToken;
  let resp;
  try {
    resp = await fetch(`/api/v1${path}`, init);
  } catch (err) {
    throw new ApiError(0, `cannot reach the manager (${err.message})`, path);
  }
  const text = await resp.text();
  let data = null;
  if (text) {
    try { data = JSON.parse(text); } catch { data = text; }
  }
  if (resp.ok) return data;
  if (resp.status === 401 && path !== '/login') onUnauthorized();
  let message;
  if (data && typeof data === 'object' && typeof data.error === 'string') message = data.error;
  else if (resp.status === 404 && !text) message = `this manager does not serve ${method} /api/v1${path.split('?')[0]} yet`;
  else if (resp.status >= 500) message = `the manager failed (HTTP ${resp.status}); its log has the cause`;
  else message = typeof data === 'string' && data ? data : `HTTP ${resp.status}`;
  const err = new ApiError(resp.status, message, path);
  err.bare = !text;
  throw err;
}

export const get = (path, params) => api('GET', path + query(params));
export const post = (path, body = {}) => api('POST', path, body);
export const put = (path, body) => api('PUT', path, body);
export const patch = (path, body) => api('PATCH', path, body);
export const del = (path, params) => api('DELETE', path + query(params));

/**
 * The agent groups as `[{id, name}]`; on a manager without GET /api/v1/groups, just `default`
 * (whose id is then unknown).
 */
export async function groups() {
  try {
    const list = await get('/groups');
    return (Array.isArray(list) ? list : list.groups || []).map((g) => ({ ...g, id: g.id ?? g.group_id }));
  } catch (err) {
    if (err.missing) return [{ id: null, name: 'default' }];
    throw err;
  }
}
